"""Semantic guardrail scan: nearest known attacks against a benign reference, calibrated.

The regex scan (:mod:`.guardrails`) only sees trigger words ("ignore previous
instructions", "DAN"); most in-the-wild jailbreaks use none of them. This scanner
compares a text's sentence embedding (unit vectors, the drift stage's model) with
reference sets of known attacks per *category* and with a *benign* reference for
the same field:

``similarity_c(x) = mean of the k largest cosines between x and category c's references``

``score_c(x) = similarity_c(x) - similarity_benign(x)``

and flags ``c`` when ``score_c(x) > threshold_c``. Subtracting the benign
similarity removes what every text of the field shares (long role-play prompts
are close to long benign prompts too); ``k = 1`` is the max cosine (LangKit's
themes, Rebuff's vector check), ``k > 1`` a top-k mean (the benchmark compares
them: ``benchmarks/bench_semantic_guard.py``). The threshold of a category is
not guessed: :func:`threshold_for_fpr` picks it from scores of benign texts that
were *not* used as references, for a stated false-positive rate.

Pure and stateless apart from the references: :class:`SemanticGuard` holds a
:class:`GuardState` (reference matrices, ids, thresholds), ``state`` gives it back
and ``SemanticGuard(state)`` restores it; ``get_state()`` / ``from_state()`` round-trip
it through JSON-safe dicts like the other detectors. A batch costs one matrix product per
field (``(n, d) @ (d, m)`` against every reference of that field at once).
A verdict names the nearest reference by *id* only: the matched attack text is
never copied into a result.

Users add their own attack examples as JSONL, one ``{"id", "category", "text"}``
object per line: :func:`parse_examples` validates them with line-numbered errors;
the caller embeds the texts and adds them with :meth:`GuardState.with_examples`.

Examples
--------
>>> import numpy as np
>>> e = np.eye(3, dtype=np.float32)
>>> state = GuardState(
...     references=(ReferenceSet("jailbreak", e[:1], ("jb:0",)),),
...     benign={"prompt": ReferenceSet("benign", e[1:2], ("alpaca:0",))},
...     thresholds={"jailbreak": 0.15})
>>> guard = SemanticGuard(state)
>>> x = np.array([[0.8, 0.6, 0.0], [0.0, 1.0, 0.0]], dtype=np.float32)
>>> [(h.category, round(h.score, 2), h.nearest_id, h.flagged) for h in guard.scan(x, "prompt")[0]]
[('jailbreak', 0.2, 'jb:0', True)]
>>> guard.scan(x, "prompt")[1][0].flagged
False
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt

from .base import decode_array, encode_array

__all__ = [
    "CATEGORY_FIELDS",
    "FIELDS",
    "MAX_EXAMPLES",
    "AttackExample",
    "CategoryHit",
    "ExampleError",
    "GuardState",
    "ReferenceSet",
    "ScoreMatrix",
    "SemanticGuard",
    "example_lines",
    "hits_to_guardrail_dicts",
    "parse_examples",
    "threshold_for_fpr",
]

Mat = npt.NDArray[np.float32]

FIELDS: tuple[str, ...] = ("prompt", "response")
CATEGORY_FIELDS: Mapping[str, str] = {
    "jailbreak": "prompt",
    "harmful_request": "prompt",
    "toxic": "response",
}
"""The built-in categories and the event field each one scans."""

_NORM_TOL = 1e-3
_MAX_ID = 128
MAX_EXAMPLES = 10_000
"""Most user attack examples one file may hold (each is embedded at the worker's start)."""


def _clip(s: str, n: int = 40) -> str:
    return s if len(s) <= n else s[:n] + "…"


def _check_unit_rows(name: str, m: Mat) -> None:
    if m.ndim != 2 or m.shape[0] < 1 or m.shape[1] < 1:
        raise ValueError(f"{name}: vectors must be a non-empty 2-D array, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{name}: vectors contain NaN or inf")
    norms = np.linalg.norm(m.astype(np.float64), axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > _NORM_TOL)
    if bad.size:
        raise ValueError(
            f"{name}: vectors must be unit length (normalized embeddings); row {int(bad[0])} "
            f"has norm {float(norms[bad[0]]):.4f}"
        )


@dataclass(frozen=True)
class ReferenceSet:
    """Reference embeddings of one category (or of the benign texts of one field).

    ``vectors``: ``(n, d)`` unit rows, float32; ``ids``: one short id per row
    (``"jailbreak:17"``), unique; never the text itself.
    """

    category: str
    vectors: Mat
    ids: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.category or not isinstance(self.category, str):
            raise ValueError(f"category must be a non-empty string, got {self.category!r}")
        v = np.ascontiguousarray(self.vectors, dtype=np.float32)
        _check_unit_rows(f"reference set {self.category!r}", v)
        ids = tuple(self.ids)
        if len(ids) != v.shape[0]:
            raise ValueError(
                f"reference set {self.category!r}: {len(ids)} ids for {v.shape[0]} vectors"
            )
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"reference set {self.category!r}: id {dup!r} appears twice")
        v.setflags(write=False)
        object.__setattr__(self, "vectors", v)
        object.__setattr__(self, "ids", ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return int(self.vectors.shape[0])


@dataclass(frozen=True)
class GuardState:
    """Everything a :class:`SemanticGuard` needs; save it, restore it, ship it.

    ``references``: one :class:`ReferenceSet` per attack category (each category
    at most once; its field from ``fields`` or :data:`CATEGORY_FIELDS`);
    ``benign``: the benign reference per field; ``thresholds``: the calibrated
    score threshold per category (a category without one is scored, never
    flagged); ``k``: how many nearest references are averaged (1 = max cosine).
    """

    references: tuple[ReferenceSet, ...]
    benign: Mapping[str, ReferenceSet]
    thresholds: Mapping[str, float] = field(default_factory=dict)
    k: int = 1
    fields: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        refs = tuple(self.references)
        if not refs:
            raise ValueError("at least one attack reference set is needed")
        cats = [r.category for r in refs]
        if len(set(cats)) != len(cats):
            raise ValueError(f"each category may have one reference set, got {cats}")
        fields = {c: self.fields.get(c, CATEGORY_FIELDS.get(c, "")) for c in cats}
        for c, f in fields.items():
            if f not in FIELDS:
                raise ValueError(
                    f"category {c!r} has no field: give fields={{{c!r}: 'prompt' or 'response'}}"
                )
        extra = set(self.fields) - set(cats)
        if extra:
            raise ValueError(f"fields given for unknown categories {sorted(extra)}")
        benign = dict(self.benign)
        for f in sorted(set(fields.values())):
            if f not in benign:
                raise ValueError(f"no benign reference for field {f!r} (needed by {sorted(c for c in cats if fields[c] == f)})")
        dims = {r.dim for r in refs} | {b.dim for b in benign.values()}
        if len(dims) != 1:
            raise ValueError(f"reference sets differ in dimension: {sorted(dims)}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an int >= 1, got {self.k!r}")
        small = [r.category for r in (*refs, *benign.values()) if len(r) < self.k]
        if small:
            raise ValueError(f"k={self.k} is larger than reference set(s) {small}")
        thresholds = {c: float(t) for c, t in self.thresholds.items()}
        unknown = set(thresholds) - set(cats)
        if unknown:
            raise ValueError(f"thresholds given for unknown categories {sorted(unknown)}")
        for c, t in thresholds.items():
            if not math.isfinite(t):
                raise ValueError(f"threshold of {c!r} must be finite, got {t!r}")
        object.__setattr__(self, "references", refs)
        object.__setattr__(self, "benign", benign)
        object.__setattr__(self, "thresholds", thresholds)
        object.__setattr__(self, "fields", fields)

    @property
    def dim(self) -> int:
        return self.references[0].dim

    def categories(self, field_name: str | None = None) -> tuple[str, ...]:
        """The attack categories (of one field when given), in reference order."""
        return tuple(r.category for r in self.references
                     if field_name is None or self.fields[r.category] == field_name)

    def with_thresholds(self, thresholds: Mapping[str, float]) -> GuardState:
        """A copy with these thresholds set (others kept)."""
        return GuardState(self.references, self.benign, {**self.thresholds, **thresholds},
                          self.k, self.fields)

    def with_examples(self, category: str, vectors: Mat, ids: Sequence[str]) -> GuardState:
        """A copy with extra attack examples (embedded by the caller) appended to ``category``.

        A new category needs its field in ``fields`` first (:data:`CATEGORY_FIELDS`
        covers the built-in ones). Ids must not clash with the category's ids.
        """
        refs = list(self.references)
        for i, r in enumerate(refs):
            if r.category == category:
                refs[i] = ReferenceSet(category, np.vstack([r.vectors, vectors]), (*r.ids, *ids))
                break
        else:
            refs.append(ReferenceSet(category, vectors, tuple(ids)))
        return GuardState(tuple(refs), self.benign, self.thresholds, self.k, self.fields)


@dataclass(frozen=True, slots=True)
class CategoryHit:
    """One category's result for one text.

    ``score`` = ``similarity - benign_similarity``; ``flagged`` when it exceeds
    the category's threshold; ``nearest_id`` is the id of the most similar
    reference of the category (never its text).
    """

    category: str
    score: float
    similarity: float
    benign_similarity: float
    nearest_id: str
    flagged: bool


@dataclass(frozen=True)
class ScoreMatrix:
    """Scores of a batch for every category of one field, as arrays (for calibration).

    ``scores``, ``similarity``: ``(n, c)``; ``benign``: ``(n,)``; ``nearest``:
    ``(n, c)`` row index into each category's reference set.
    """

    categories: tuple[str, ...]
    scores: npt.NDArray[np.float64]
    similarity: npt.NDArray[np.float64]
    benign: npt.NDArray[np.float64]
    nearest: npt.NDArray[np.intp]


def _topk_mean(sims: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.float64]:
    if k == 1:
        top: npt.NDArray[np.float64] = sims.max(axis=1).astype(np.float64)
        return top
    part = np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:]
    mean: npt.NDArray[np.float64] = part.astype(np.float64).mean(axis=1)
    return mean


class SemanticGuard:
    """Scores batches of unit embeddings against a :class:`GuardState`.

    Construction stacks each field's references into one matrix, so
    :meth:`scan` is one matrix product per batch and field.
    """

    def __init__(self, state: GuardState) -> None:
        self._state = state
        self._stack: dict[str, tuple[Mat, list[tuple[str, int, int]]]] = {}
        for f in sorted(set(state.fields.values())):
            parts: list[Mat] = []
            spans: list[tuple[str, int, int]] = []
            at = 0
            for r in (*[r for r in state.references if state.fields[r.category] == f], state.benign[f]):
                parts.append(r.vectors)
                spans.append((r.category, at, at + len(r)))
                at += len(r)
            self._stack[f] = (np.ascontiguousarray(np.vstack(parts).T), spans)

    @property
    def state(self) -> GuardState:
        return self._state

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state (the project's detector convention): every reference
        matrix (exact, base64), its ids, the thresholds, ``k`` and the fields."""
        def ref(r: ReferenceSet) -> dict[str, Any]:
            return {"category": r.category, "ids": list(r.ids), "vectors": encode_array(r.vectors)}

        st = self._state
        return {"detector": type(self).__name__, "settings": {"k": st.k},
                "data": {"references": [ref(r) for r in st.references],
                         "benign": {f: ref(b) for f, b in sorted(st.benign.items())},
                         "thresholds": dict(st.thresholds), "fields": dict(st.fields)}}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SemanticGuard:
        """Rebuild a guard from :meth:`get_state` output (validated like a new one)."""
        if state.get("detector") != cls.__name__:
            raise ValueError(f"state is for {state.get('detector')!r}, not {cls.__name__}")
        data = state["data"]

        def ref(d: dict[str, Any]) -> ReferenceSet:
            return ReferenceSet(d["category"], decode_array(d["vectors"]).astype(np.float32), tuple(d["ids"]))

        return cls(GuardState(tuple(ref(r) for r in data["references"]),
                              {f: ref(b) for f, b in data["benign"].items()},
                              data["thresholds"], int(state["settings"]["k"]), data["fields"]))

    def score(self, vectors: Mat, field_name: str) -> ScoreMatrix:
        """All category scores of ``vectors`` (``(n, d)`` unit rows) for one field."""
        if field_name not in self._stack:
            raise ValueError(f"no category scans field {field_name!r}; fields: {sorted(self._stack)}")
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self._state.dim:
            raise ValueError(f"vectors must have shape (n, {self._state.dim}), got {x.shape}")
        mat, spans = self._stack[field_name]
        sims = x @ mat  # the one matrix product of the batch
        k = self._state.k
        *cats, (_, b0, b1) = spans
        benign = _topk_mean(sims[:, b0:b1], k) if x.shape[0] else np.zeros(0)
        n = x.shape[0]
        sim = np.zeros((n, len(cats)))
        nearest = np.zeros((n, len(cats)), dtype=np.intp)
        for j, (_, a0, a1) in enumerate(cats):
            if n:
                block = sims[:, a0:a1]
                sim[:, j] = _topk_mean(block, k)
                nearest[:, j] = block.argmax(axis=1)
        return ScoreMatrix(tuple(c for c, _, _ in cats), sim - benign[:, None], sim, benign, nearest)

    def scan(self, vectors: Mat, field_name: str) -> list[list[CategoryHit]]:
        """Per text of the batch, one :class:`CategoryHit` per category of ``field_name``."""
        sm = self.score(vectors, field_name)
        refs = {r.category: r for r in self._state.references}
        th = self._state.thresholds
        out: list[list[CategoryHit]] = []
        for i in range(sm.scores.shape[0]):
            row: list[CategoryHit] = []
            for j, c in enumerate(sm.categories):
                s = float(sm.scores[i, j])
                t = th.get(c)
                row.append(CategoryHit(c, s, float(sm.similarity[i, j]), float(sm.benign[i]),
                                       refs[c].ids[int(sm.nearest[i, j])], t is not None and s > t))
            out.append(row)
        return out


def threshold_for_fpr(benign_scores: Sequence[float] | npt.NDArray[np.float64], fpr: float) -> float:
    """Split-conformal threshold: a fresh benign text scores above it with probability <= ``fpr``.

    With ``n`` calibration scores of benign texts (exchangeable with the benign
    texts to come), the threshold is the ``ceil((n + 1) * (1 - fpr))``-th smallest
    score; then ``P(score > threshold) <= fpr`` for a new benign text, on average
    over calibration sets (the standard split-conformal bound; at least
    ``fpr - 1/(n + 1)`` when scores have no ties). The plain empirical quantile
    would allow ``floor(fpr * n)`` scores above it and overshoot ``fpr`` by up to
    ``1/(n + 1)``. Too few scores to promise ``fpr`` (``n < 1/fpr - 1``) raise
    ``ValueError``.

    >>> threshold_for_fpr([0.1, 0.5, 0.2, 0.4, 0.3], 0.34)
    0.4
    >>> threshold_for_fpr([0.1, 0.5, 0.2, 0.4, 0.3], 0.2)
    0.5
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr!r}")
    s = np.sort(np.asarray(benign_scores, dtype=np.float64))
    n = int(s.size)
    if n == 0:
        raise ValueError("no benign scores to calibrate on")
    if not np.all(np.isfinite(s)):
        raise ValueError("benign scores contain NaN or inf")
    rank = math.ceil((n + 1) * (1.0 - fpr) - 1e-9)
    if rank > n:
        need = math.ceil(1.0 / fpr - 1.0 - 1e-9)
        raise ValueError(f"{n} benign scores cannot support fpr={fpr}: at least {need} are needed")
    return float(s[rank - 1])


def hits_to_guardrail_dicts(hits: Iterable[CategoryHit]) -> list[dict[str, Any]]:
    """The flagged hits as guardrail results ``{name, verdict, score, nearest_id}``.

    Named ``driftline.semantic.<category>``; ``verdict`` is always ``flagged``
    (a similarity is evidence, not proof); no text of the reference is included.
    """
    return [{"name": f"driftline.semantic.{h.category}", "verdict": "flagged",
             "score": round(h.score, 6), "nearest_id": h.nearest_id}
            for h in hits if h.flagged]


# ----------------------------------------------------------------- user examples


class ExampleError(ValueError):
    """A user attack-example file is invalid; the message names the line."""


@dataclass(frozen=True, slots=True)
class AttackExample:
    """One user-supplied attack example (``id`` is stored, ``text`` only embedded)."""

    id: str
    category: str
    text: str
    line: int


_EXAMPLE_KEYS = frozenset({"id", "category", "text"})


def example_lines(fh: TextIO, max_chars: int = 100_000) -> Iterator[str]:
    """The lines of an open examples file for :func:`parse_examples`, each read with a bound:
    a line longer than any valid example (a ``max_chars`` text, escaped) comes back cut to
    that bound plus one character (so parse_examples refuses it by number) and the rest of
    it is skipped chunk by chunk, so a 2 GB file without a newline is never held whole."""
    limit = 6 * max_chars + 1_001
    while True:
        line = fh.readline(limit)
        if not line:
            return
        if len(line) == limit and not line.endswith("\n"):
            while True:  # skip the rest of the over-long line
                more = fh.readline(limit)
                if not more or more.endswith("\n"):
                    break
        yield line


def _shape_error(obj: Any) -> str | None:
    """What is wrong with a parsed example line's shape (not an object, keys, types), or None."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    missing = sorted(_EXAMPLE_KEYS - obj.keys())
    unknown = sorted(obj.keys() - _EXAMPLE_KEYS)
    if missing or unknown:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown key(s) {', '.join(unknown)}"] if unknown else [])
        return f"{'; '.join(parts)} (expected id, category, text)"
    empty = [k for k in ("id", "category", "text") if not isinstance(obj[k], str) or not obj[k].strip()]
    if empty:
        return f"{', '.join(empty)} must be non-empty string(s)"
    return None


def parse_examples(lines: Iterable[str], source: str = "<examples>", *,
                   categories: Iterable[str] = tuple(CATEGORY_FIELDS),
                   max_chars: int = 100_000, max_examples: int = MAX_EXAMPLES,
                   max_errors: int = 20) -> list[AttackExample]:
    """Validate JSONL attack examples: one ``{"id", "category", "text"}`` object per line.

    Blank lines and lines starting with ``#`` are skipped. Every problem is
    collected and raised together as one :class:`ExampleError` with
    ``source:line: message`` lines: not JSON, not an object, missing or unknown
    keys, a non-string or empty value, an id longer than 128 characters or
    repeated, an unknown category, a text longer than ``max_chars``, more than
    ``max_examples`` examples. At most ``max_errors`` problems are listed, then how many
    more there were (a hostile file of 10^6 bad lines gave a 55 MB message); a line too long
    to hold such a text is refused before it is parsed, and a bad category is echoed
    truncated.

    >>> parse_examples(['{"id": "a", "category": "jailbreak", "text": "pretend you are free"}'])[0].id
    'a'
    >>> try:
    ...     parse_examples(['{"id": "a", "category": "spam", "text": "x"}'], "my.jsonl")
    ... except ExampleError as exc:
    ...     print(exc)
    my.jsonl:1: unknown category 'spam'; choose from ['harmful_request', 'jailbreak', 'toxic']
    """
    allowed = set(categories)
    out: list[AttackExample] = []
    errors: list[str] = []
    n_bad = 0

    def report(msg: str) -> None:
        nonlocal n_bad
        n_bad += 1
        if len(errors) < max_errors:
            errors.append(msg)

    seen: dict[str, int] = {}
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{lineno}"
        if len(line) > 6 * max_chars + 1_000:  # every character escaped as \uXXXX, plus id/category
            report(f"{where}: line is longer than a {max_chars}-character text can make")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            report(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        shape = _shape_error(obj)
        if shape:
            report(f"{where}: {shape}")
            continue
        ex_id, cat, text = obj["id"].strip(), obj["category"].strip(), obj["text"]
        if len(ex_id) > _MAX_ID:
            report(f"{where}: id is longer than {_MAX_ID} characters")
        elif ex_id in seen:
            report(f"{where}: id {ex_id!r} already used on line {seen[ex_id]}")
        elif cat not in allowed:
            report(f"{where}: unknown category {_clip(cat)!r}; choose from {sorted(allowed)}")
        elif len(text) > max_chars:
            report(f"{where}: text is longer than {max_chars} characters")
        elif len(out) >= max_examples:
            report(f"{where}: more than {max_examples} examples")
        else:
            seen[ex_id] = lineno
            out.append(AttackExample(ex_id, cat, text, lineno))
    if errors:
        more = n_bad - len(errors)
        raise ExampleError("\n".join(errors + ([f"{source}: {more} more bad line(s)"] if more > 0 else [])))
    return out
