"""Embedding throughput: driftline's batcher end to end against raw ``model.encode``.

The same distinct real texts (AlpacaEval 0.6.6 instructions, or the model
outputs with ``--field response``) are embedded twice, in one run:

1. **raw**: sentence-transformers ``model.encode(texts, batch_size=b)`` on the
   whole list for each ``b`` of ``--batch-sizes``; the best ``b`` is the baseline;
2. **batcher**: the texts are submitted to ``EmbeddingBatcher`` in chunks as the
   drift stage does (a chunk per Kafka batch, ``--chunk`` texts), with the
   stage's encoder (``SentenceEncoder``) for each batcher size of
   ``--embed-batches`` (the worker's ``--embed-batch``; 64 is its default), no
   cache hits (distinct texts), timed from the first submit until every vector
   was delivered.

Raw ``encode`` over the whole list sorts *all* texts by length before cutting
them into batches, so its batches carry little padding; the batcher can only
sort the texts of one of its batches, so the larger its batches, the closer it
gets (on CPU, ``SentenceEncoder`` cuts a batch into chunks of 32 after sorting).

It prints sentences/s for both and the ratio (the issue's target: >= 0.8 of raw
at its best batch size), and checks that both give the same vectors. Device
``auto``: CUDA with fp16 when present, else CPU with the stage's thread count.

    python benchmarks/bench_embed.py                 # 805 prompts, CPU here (~4 min)
    python benchmarks/bench_embed.py --field response --batch-sizes 64,128,256,512 --embed-batches 64,256,1024   # on a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine  # noqa: E402


def load_texts(field: str, n: int) -> list[str]:
    from driftline.streams.devdata.real_prompts import ensure_data, load_alpaca

    items = load_alpaca(ensure_data())
    seen: set[str] = set()
    out: list[str] = []
    for it in items:
        t = it.instruction if field == "prompt" else it.output
        if t and t not in seen:
            seen.add(t)
            out.append(t)
    if len(out) < n:
        print(f"note: only {len(out)} distinct {field} texts; using them all", flush=True)
    return out[:n]


def raw_rate(model, texts: list[str], batch_size: int, normalize: bool) -> tuple[float, np.ndarray]:
    t = time.perf_counter()
    v = model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                     normalize_embeddings=normalize, show_progress_bar=False)
    return len(texts) / (time.perf_counter() - t), np.asarray(v, dtype=np.float32)


async def batcher_rate(encoder, texts: list[str], batch_size: int, chunk: int) -> tuple[float, np.ndarray, dict]:
    from driftline.streams.stages.embedding import EmbeddingBatcher

    got: dict[int, np.ndarray] = {}

    def on_batch(payloads: list[int], _hashes: list[int], vecs: np.ndarray) -> None:
        for i, v in zip(payloads, vecs, strict=True):
            got[i] = v

    b = EmbeddingBatcher(encoder, on_batch, batch_size=batch_size, max_delay_s=0.5,
                         max_queue=max(len(texts), batch_size), cache_size=0)
    await b.start()
    t = time.perf_counter()
    for s in range(0, len(texts), chunk):
        b.submit([(texts[i], i) for i in range(s, min(s + chunk, len(texts)))])
        await asyncio.sleep(0)  # the stage hands over a chunk per processed Kafka batch
    ok = await b.drain(timeout=3600)
    dt = time.perf_counter() - t
    stats = {"batches": b.batches, "dropped": b.dropped, "encode_s": b.encode_seconds, "drained": ok}
    await b.stop()
    if len(got) != len(texts):
        raise SystemExit(f"batcher delivered {len(got)} of {len(texts)} texts ({stats})")
    return len(texts) / dt, np.stack([got[i] for i in range(len(texts))]), stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=805, help="distinct texts to embed (default 805: every AlpacaEval prompt)")
    ap.add_argument("--field", choices=("prompt", "response"), default="prompt")
    ap.add_argument("--device", default="auto", help="auto (CUDA + fp16 when present), cpu, cuda")
    ap.add_argument("--batch-sizes", default="16,32,64,128", help="raw model.encode batch sizes to try")
    ap.add_argument("--embed-batches", default="64,256", help="batcher sizes (the worker's --embed-batch) to try")
    ap.add_argument("--chunk", type=int, default=100, help="texts submitted to the batcher at a time")
    ap.add_argument("--repeat", type=int, default=2, help="passes per setting (best kept)")
    a = ap.parse_args(argv)

    from driftline.streams.stages.embedding import SentenceEncoder

    texts = load_texts(a.field, a.texts)
    enc = SentenceEncoder(device=a.device)
    import torch

    print(f"machine: {machine()}; torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"device {enc.device}{' fp16' if enc.fp16 else ''}", flush=True)
    if enc.device.startswith("cuda"):
        print(f"gpu: {torch.cuda.get_device_name(0)}", flush=True)
    print(f"{len(texts)} distinct {a.field} texts, mean {np.mean([len(t) for t in texts]):.0f} chars; "
          f"max_seq_length {enc.max_seq_length}", flush=True)
    enc.encode(texts[:64])  # warm-up (kernels, allocator)

    raw: dict[int, float] = {}
    ref_vecs = None
    for b in [int(x) for x in a.batch_sizes.split(",") if x]:
        best = 0.0
        for _ in range(a.repeat):
            r, v = raw_rate(enc.model, texts, b, enc.normalize)
            best = max(best, r)
            ref_vecs = v
        raw[b] = best
        print(f"  raw model.encode batch_size={b:4d}: {best:8.1f} sentences/s", flush=True)
    best_b = max(raw, key=raw.__getitem__)
    print(f"raw best: {raw[best_b]:.1f} sentences/s at batch_size={best_b}", flush=True)

    rows = []
    for eb in [int(x) for x in a.embed_batches.split(",") if x]:
        best, stats, vecs = 0.0, {}, None
        for _ in range(a.repeat):
            r, vecs, st = asyncio.run(batcher_rate(enc, texts, eb, a.chunk))
            if r > best:
                best, stats = r, st
        assert vecs is not None and ref_vecs is not None
        diff = float(np.max(np.abs(vecs - ref_vecs)))
        rows.append((eb, best, stats, diff))
        print(f"  batcher --embed-batch {eb:4d}: {best:8.1f} sentences/s  ratio to raw best "
              f"{best / raw[best_b]:.2f}  ({stats['batches']} model calls, encode {stats['encode_s']:.1f} s, "
              f"max |vector - raw| {diff:.1e})", flush=True)
    eb, best, _, _ = max(rows, key=lambda r: r[1])
    ratio = best / raw[best_b]
    print(f"\nbatcher end to end: {best:.1f} sentences/s (--embed-batch {eb}) vs raw model.encode "
          f"{raw[best_b]:.1f} at batch_size {best_b}: ratio {ratio:.2f} "
          f"({'MET' if ratio >= 0.8 else 'MISSED'}: target >= 0.8)")
    print(f"cpus={os.cpu_count()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
