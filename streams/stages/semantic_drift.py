"""Semantic drift in the stream: sample -> embed -> reference -> sliding-window tests.

A :class:`DriftStage` is a worker :class:`~driftline.streams.worker.Stage`. After
every batch is safe in ClickHouse (``on_stored``) it

1. **samples** events per key, uniformly: an event is kept when a 32-bit hash of its
   ``event_id`` is below ``sample_rate * 2**32`` (:func:`keep_event`; CRC-32 finalised
   with murmur3's mixer). The decision
   depends on the event alone, so it is uniform within every window and key, the
   same on every worker and after restarts, and prompt and response of a kept
   event are both kept (each a separate *field*, each with its own drift);
2. hands the texts to the :class:`~driftline.streams.stages.embedding.EmbeddingBatcher`
   (bounded: a full queue drops and counts, never blocks the spine);
3. on the drift thread (off the event loop), per key ``(app, model, prompt_version)``
   and field: numbers the samples (``seq``) in Kafka order (:func:`kafka_order`),
   builds the **reference** from the first ``ref_size`` samples after first sight
   (a new ``prompt_version`` is a new key, so it starts a new reference by
   itself), keeps a sliding **current window** of the last ``window_size``
   samples after the reference, and every ``test_every`` samples (or
   ``test_interval_s`` seconds) tests it against the reference with MMD²
   (permutation p-value), topic mix (G-test, with the explanation: which
   clusters grew or shrank, with example texts) and centroid cosine distance
   (permutation p-value);
4. writes the embeddings to ``llm_embeddings``, references to
   ``drift_references`` and results to ``drift_scores``, sets the
   ``driftline_drift_*`` gauges and hands each result to every stage with an
   ``observe_drift`` method (alert rules of kind ``drift``);
5. scans the same vectors with the semantic guard when it has one
   (:mod:`.guard_scan`, ``semantic_guard``): ``guard_results`` rows, per-key share tests
   (``drift_scores`` method ``guard_<category>``), handed on like the other results.

**Calibration.** ``alpha`` is a family-wise level per test round over all keys
and fields: each test runs at ``alpha / (K x F x M)`` (Bonferroni; ``K`` keys with
a reference, ``F`` fields, ``M`` methods, counted when the test runs). The number
of permutations grows so that the smallest attainable p-value stays below
that level (``ceil(3 / alpha_test)`` rounded up to a power of
two, 256 to 8192).

**Durability.** References are rows of ``drift_references`` (the event ids of the
samples, their ``seq`` range and how they were made); the embeddings stay in
``llm_embeddings``. A key seen for the first time since start is loaded from
there: its reference, its last ``seq`` and its current window, so a restarted
worker resumes the same tests. Tests fire at fixed positions after the reference
(``p >= min_current`` and ``(p - min_current) % test_every == 0``), so a restart
does not move them.

**Baseline commands.** ``driftline baseline rebase|pin|reset`` produce a JSON
command ``{"cmd": "baseline", ...}`` to the Kafka topic ``driftline.control``
(``DriftConfig.control_topic``). The worker's one control consumer
(streams/ingest/control.py, subscribed in streams/wiring.py) reads that topic from
the beginning without a consumer group (every worker sees every command) and hands
each ``baseline`` command to :meth:`DriftStage.on_command`, which queues each command
it has not applied before; the drift loop applies it to the matching keys and logs it
in ``drift_control_log`` (with the number of references it made, n_references, also 0)
under the command's ``id``, so a worker that was down applies what it missed when it
starts, and a recreated topic (the memory broker restarted) cannot hide new commands
behind old offsets. With a control secret (``WorkerConfig.control_secret``), a command
must carry a valid HMAC signature (streams/ingest/control_auth.py); others are refused,
logged and counted in ``driftline_control_refused_total{reason}``.
``driftline baseline show`` is a query.

**Golden sets.** ``driftline baseline load`` (streams/cli/golden.py) sends a golden set's
texts as ``golden_part`` commands, then a ``golden`` command. The parts are kept here
(:attr:`DriftStage._golden_parts`, not logged) until their golden command, which the drift
loop applies: the set is read from ``drift_golden`` when stored (another worker, a retry),
else embedded once with the stage's encoder (:meth:`EmbeddingBatcher.encode_now`) and
stored; then :meth:`DriftEngine.apply_golden` makes it the reference of the matching keys.

The engine (per key-field state, references, tests, its SQL) is
streams/stages/drift_references.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from prometheus_client.registry import CollectorRegistry

from driftline.detectors.at_level import drifted_at
from driftline.detectors.permutation import n_resamples
from driftline.detectors.sampling import keep_event, sample_mask
from driftline.schemas.columns import (
    CONTROL_LOG_COLUMNS,
    EMBEDDING_COLUMNS,
    REFERENCE_COLUMNS,
    SCORE_COLUMNS,
)
from driftline.schemas.drift_result import DriftResult
from driftline.schemas.topics import CONTROL_TOPIC
from driftline.streams.sinks.prometheus import DriftStageMetrics
from driftline.streams.stages.drift_references import (
    FIELDS,
    METHODS,
    DriftEngine,
    Key,
    check_test_schedule,
    make_detector,
    ms_to_dt,
    per_test_alpha,
)
from driftline.streams.stages.embedding import EmbeddingBatcher, EmbeddingConfig, load_encoder
from driftline.streams.stages.guard_scan import GuardScan, load_guard
from driftline.streams.stages.inbox_loop import InboxLoop

if TYPE_CHECKING:
    from collections.abc import Callable

    from driftline.schemas.rules import DriftObservation
    from driftline.streams.ingest.control import ControlRecord
    from driftline.streams.ports import StagePorts

log = logging.getLogger("driftline.drift")

__all__ = [
    "DriftConfig",
    "DriftStage",
    "DriftEngine",
    "Sample",
    "FIELDS",
    "METHODS",
    "keep_event",
    "sample_mask",
    "per_test_alpha",
    "n_resamples",
    "make_detector",
    "drifted_at",
    "CONTROL_TOPIC",
    "EMBEDDING_COLUMNS",
    "REFERENCE_COLUMNS",
    "SCORE_COLUMNS",
    "CONTROL_LOG_COLUMNS",
    "kafka_order",
]


# --------------------------------------------------------------------------- pure helpers


def _texts_at(events: Any, field: str, rows: list[int]) -> Any:
    """``field`` of the stored events, indexable by the sampled ``rows`` (None when the
    events have no such column). Over an Arrow table (``ArrowColumns``) only those rows
    are turned into Python strings."""
    table = getattr(events, "table", None)
    if table is None:
        return events.get(field)
    if field not in table.column_names:
        return None
    return dict(zip(rows, table.column(field).take(rows).to_pylist(), strict=True))


def _column_at(events: Any, name: str, rows: np.ndarray) -> np.ndarray | None:
    """Column ``name`` of the stored events at ``rows`` as numpy (None when absent)."""
    table = getattr(events, "table", None)
    if table is not None:
        if name not in table.column_names:
            return None
        return np.asarray(table.column(name).take(rows).to_numpy(zero_copy_only=False))
    col = events.get(name)
    return None if col is None else np.asarray(col)[rows]


def kafka_order(events: Any, rows: np.ndarray) -> np.ndarray:
    """The sampled ``rows`` of a stored batch in Kafka order: by source topic, partition and
    offset (stable: the events of one OTLP record keep their order), i.e. the order the app
    produced them in on each partition.

    The engine numbers a key's samples (``seq``) in the order it gets them, and its reference
    and windows are ranges of ``seq``; but a stored batch does not hold its rows in Kafka order:
    the decode path puts the records it parsed column-wise first and those it decoded one by
    one after them (a 256-record chunk holding one malformed record goes whole to the second
    group), so later events came before earlier ones, a reference could hold events of the
    drift it should precede, and several windows shared one end time. Rows without source
    columns keep their order."""
    if len(rows) < 2:
        return rows
    part = _column_at(events, "source_partition", rows)
    off = _column_at(events, "source_offset", rows)
    if part is None or off is None:
        return rows
    topic = _column_at(events, "source_topic", rows)
    keys = [off.astype(np.int64), part.astype(np.int64)]
    if topic is not None:
        keys.append(np.unique(topic.astype(str), return_inverse=True)[1])
    return rows[np.lexsort(keys)]


@dataclass(frozen=True)
class DriftConfig:
    """Settings of the drift stage (see the module docstring for what each does).

    ``sample_rate``: share of events whose texts are embedded (1.0 on GPU is fine;
    a 2-core CPU embeds ~60 short texts/s). ``ref_size``: samples in an automatic
    reference. ``window_size``: the sliding current window; ``min_current``
    (default ``window_size``) samples are needed before the first test.
    ``test_every``: samples between tests; ``test_interval_s``: also test when this
    many seconds passed since the last test and new samples arrived (``None``: off).
    """

    fields: tuple[str, ...] = FIELDS
    sample_rate: float = 0.2
    sample_salt: int = 0
    ref_size: int = 300
    window_size: int = 300
    min_current: int | None = None
    test_every: int = 100
    test_interval_s: float | None = 60.0
    alpha: float = 0.05
    methods: tuple[str, ...] = METHODS
    min_effect: float = 0.0
    seed: int = 0
    embedding: EmbeddingConfig = dc_field(default_factory=EmbeddingConfig)
    control_topic: str | None = CONTROL_TOPIC
    drain_timeout_s: float = 60.0
    #: key-fields held in memory (2-3 MB each); past it the least recently sampled one is
    #: dropped (counted) and reloaded from ClickHouse when it is sampled again
    max_keys: int = 500
    #: on a rebalance, wait this long at most for the samples in flight to be embedded,
    #: tested and written before the keys' state is dropped (what is left is dropped)
    revoke_drain_s: float = 5.0
    #: the semantic guard on every embedded text (streams/stages/guard_scan.py): ``auto`` when
    #: its reference embeddings are cached, ``build`` (cache them first, in the background), ``off``
    semantic_guard: str = "auto"
    #: a JSONL file of the user's own attack examples (``{"id", "category", "text"}`` a line)
    #: that join the guard's references (embedded at start, even under ``auto``: few texts)
    guard_examples: str | None = None

    def __post_init__(self) -> None:
        if not self.fields or set(self.fields) - set(FIELDS):
            raise ValueError(f"fields must be a non-empty subset of {FIELDS}")
        check_test_schedule(self)
        if not self.methods or set(self.methods) - set(METHODS):
            raise ValueError(f"methods must be a non-empty subset of {METHODS}")
        if not self.revoke_drain_s >= 0:
            raise ValueError("revoke_drain_s must be >= 0")
        if self.semantic_guard not in ("auto", "build", "off"):
            raise ValueError(f"semantic_guard must be auto, build or off, got {self.semantic_guard!r}")

    @property
    def min_cur(self) -> int:
        return self.min_current if self.min_current is not None else self.window_size


@dataclass(slots=True)
class Sample:
    """One sampled text on its way through the embedder."""

    key: Key
    field: str
    event_id: str
    ts_ms: int
    text: str
    #: the stage's assignment generation when the sample's event was stored (on_revoked)
    gen: int = 0


# --------------------------------------------------------------------------- the stage


class _Control(NamedTuple):
    """An admitted baseline command waiting for the drift loop."""

    cmd: dict[str, Any]
    control_id: str
    topic: str
    partition: int
    offset: int


#: baseline commands held while drift_control_log cannot be read (commands are rare)
_MAX_EARLY_COMMANDS = 10_000
#: golden sets whose parts are held until their golden command (each up to 20,000 texts)
_MAX_GOLDEN_PENDING = 4
#: embedded samples held for the drift loop at most (about 77 MB of vectors at d 384 with
#: their texts): while the loop is busy (a golden set embedded or awaited, a slow store) the
#: oldest are dropped and counted (DriftStage.inbox_dropped), as samples are at most once
_MAX_INBOX_SAMPLES = 50_000

class DriftStage(InboxLoop):
    """The worker stage (``name = "drift"``). ``DriftStage.factory(cfg)`` for ``serve_worker(stages=…)``."""

    name = "drift"
    tables = ("llm_embeddings", "drift_references", "drift_scores", "drift_control_log", "drift_golden",
              "guard_results")

    def __init__(self, cfg: DriftConfig | None = None, registry: CollectorRegistry | None = None,
                 encoder: Any = None, guard: Any = None) -> None:
        self.cfg = cfg or DriftConfig()
        self._encoder = encoder
        #: a :class:`~driftline.detectors.semantic_guard.SemanticGuard` given by the caller (tests, a
        #: stand-in encoder); else loaded at start per ``cfg.semantic_guard`` with the stage's encoder
        self._guard = guard
        #: the guard in the stream (None: texts are not scanned); set once, read on the drift thread
        self.guard: GuardScan | None = None
        self.metrics = DriftStageMetrics(self, registry)
        self.batcher: EmbeddingBatcher[Sample] | None = None
        self.engine: DriftEngine | None = None
        #: what start() is given (streams/ports.py); None before start
        self._ports: StagePorts | None = None
        #: called with every drift test result (a ``drift_scores`` row), e.g. the alerting
        #: stage's ``observe_drift``: linked by the wiring (streams/wiring.py)
        self.observers: list[Callable[[DriftObservation], None]] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drift")
        self._inbox: list[tuple[list[Sample], list[int], np.ndarray]] = []
        self.max_inbox_samples = _MAX_INBOX_SAMPLES
        self._controls: list[_Control] = []
        self._wake = asyncio.Event()
        #: set while the inbox and the controls are empty and the drift loop is between rounds
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self.stored_embeddings = 0
        self.stored_scores = 0
        #: guard_results rows written (one per scanned text and category of its field)
        self.stored_guard_results = 0
        self.controls_applied = 0
        self._applied_ids: set[str] = set()
        #: False until drift_control_log was read; commands meanwhile wait in _early
        self._ids_loaded = False
        self._early: list[ControlRecord] = []
        self._ids_task: asyncio.Task[None] | None = None
        #: assignment generation: bumped when the worker's partitions are revoked; samples
        #: and test rounds of an older generation are dropped, not written (on_revoked)
        self._gen = 0
        #: samples dropped because their key's partitions were revoked before they were tested
        self.revoked_samples = 0
        #: samples dropped because the inbox held _MAX_INBOX_SAMPLES while the drift loop was busy
        self.inbox_dropped = 0
        self._inbox_units = 0
        #: golden sets being received: golden id -> part index -> texts (until the golden command)
        self._golden_parts: dict[str, dict[int, list[str]]] = {}
        #: golden texts this stage embedded (a set another worker stored, or a restart, adds 0)
        self.golden_embedded = 0
        #: the worker's partitions (on_assigned): the one holding partition 0 embeds golden sets
        self._assigned: set[tuple[str, int]] = set()
        #: how often a worker that does not embed a golden set looks for it in drift_golden
        self.golden_poll_s = 1.0

    @classmethod
    def factory(cls, cfg: DriftConfig | None = None, encoder: Any = None, guard: Any = None) -> Any:
        return lambda registry: cls(cfg, registry, encoder, guard)

    # -- lifecycle ---------------------------------------------------------------
    def add_observer(self, fn: Callable[[DriftObservation], None]) -> None:
        """Hand every drift test result to ``fn`` too (safe to call from the drift loop)."""
        self.observers.append(fn)

    async def start(self, ports: StagePorts) -> None:
        self._ports = ports
        ecfg = self.cfg.embedding
        enc = self._encoder if self._encoder is not None else (lambda: load_encoder(ecfg))
        self.batcher = EmbeddingBatcher(enc, self._on_embedded, batch_size=ecfg.batch_size,
                                        max_delay_s=ecfg.max_delay_s, max_queue=ecfg.max_queue,
                                        cache_size=ecfg.cache_size)
        await self.batcher.start()
        assert self.batcher.encoder is not None
        self.engine = DriftEngine(self.cfg, ports.tables.query, ports.tables.database,
                                  getattr(self.batcher.encoder, "name", "encoder"))
        self.engine.redaction = ports.redaction
        await self._start_guard()
        if self.cfg.control_topic:  # the commands applied before: the control topic is read from its start
            if not await self._read_applied_ids():  # ClickHouse down: retried, never fails the start
                self._ids_task = asyncio.create_task(self._load_applied_ids(), name="driftline-drift-ids")
        else:
            self._ids_loaded = True
        self._task = asyncio.create_task(self._loop(), name="driftline-drift")
        log.info("drift stage: %s on %s, sample rate %.3g, fields %s, reference %d, window %d, every %d",
                 self.batcher.encoder.name, getattr(self.batcher.encoder, "device", "?"),
                 self.cfg.sample_rate, ",".join(self.cfg.fields), self.cfg.ref_size, self.cfg.window_size,
                 self.cfg.test_every)

    async def _start_guard(self) -> None:
        """The semantic guard: the one given, else (with the stage's own encoder, never a stand-in)
        loaded from the cached references (``auto``) or built first in the background (``build``,
        and ``auto`` on CUDA, where the ~2,000 texts take seconds; fp16 vectors differ from a CPU cache).
        Without it the stage runs unchanged; why is logged once."""
        mode = self.cfg.semantic_guard
        if self._guard is not None:
            self.guard = self._guard_scan(self._guard)
        elif mode == "off":
            log.info("semantic guard: off (--semantic-guard off)")
        elif self._encoder is not None:
            log.info("semantic guard: off (the stage was given an encoder but no guard)")
        elif mode == "auto" and not str(getattr(self.batcher and self.batcher.encoder, "device", "")).startswith("cuda"):
            guard, how = await asyncio.to_thread(load_guard, self.batcher.encoder if self.batcher else None,
                                                 examples=self._examples_path())
            self._guard_ready(guard, how)
        else:  # build (or auto on CUDA: seconds): ~2,000 texts to embed when not cached, meanwhile the stream runs
            enc = self.batcher.encoder if self.batcher else None
            ex = self._examples_path()
            threading.Thread(target=lambda: self._guard_ready(*load_guard(enc, build=True, examples=ex)),
                             name="driftline-guard-build", daemon=True).start()
            log.info("semantic guard: loading or building its reference embeddings in the background")
        if self.guard is not None:
            log.info("semantic guard: scanning %s (%s)", ",".join(self.guard.fields) or "nothing",
                     self.guard.version)

    def _examples_path(self) -> Path | None:
        return Path(self.cfg.guard_examples) if self.cfg.guard_examples else None

    def _guard_scan(self, guard: Any) -> GuardScan:
        """The guard in the stream, reading its keys' share state from the engine's store; it
        names the attack clusters of the engine's topic-mix explanations."""
        assert self.engine is not None
        gs = GuardScan(guard, self.cfg, self.engine.query, self.engine.db)
        self.engine.cluster_labeler = gs.label_clusters
        return gs

    def _guard_ready(self, guard: Any, how: str) -> None:
        if guard is None:
            log.warning("semantic guard: off: %s", how)
            return
        self.guard = self._guard_scan(guard)
        log.info("semantic guard: on (%s); texts embedded from now on are scanned", how)

    async def _read_applied_ids(self) -> bool:
        """Read which control commands were applied before (``drift_control_log``) and
        queue the commands that waited for it; False when ClickHouse did not answer."""
        assert self._ports is not None
        tables = self._ports.tables
        try:
            done = await tables.aquery("SELECT DISTINCT control_id FROM {db:Identifier}.drift_control_log",
                                       {"db": tables.database})
        except Exception as exc:  # noqa: BLE001 - retried by _load_applied_ids
            log.warning("drift: reading drift_control_log failed (%s); baseline commands wait", exc)
            return False
        self._applied_ids |= {r[0] for r in done}
        self._ids_loaded = True
        for gid in [g for g in self._golden_parts if g in self._applied_ids]:  # held before: applied then
            del self._golden_parts[gid]
        early, self._early = self._early, []
        for rec in early:
            self.on_command(rec)
        return True

    async def _load_applied_ids(self) -> None:
        """:meth:`_read_applied_ids` retried with backoff until ClickHouse answers: an
        outage at start delays baseline commands (they wait in :attr:`_early`), it never
        fails the stage or the worker."""
        delay = 0.5
        while True:
            await asyncio.sleep(delay)
            if await self._read_applied_ids():
                return
            delay = min(delay * 2, 30.0)

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every accepted sample is embedded, tested and written, and every
        queued baseline command applied and logged."""
        async def _all() -> None:
            assert self.batcher is not None
            await self.batcher.drain()
            await self._idle.wait()  # the batcher delivered: whatever it gave is in the inbox or in work
        try:
            await asyncio.wait_for(_all(), timeout)
            return True
        except TimeoutError:
            return False

    async def stop(self) -> None:
        if self.batcher is not None:
            if not await self.drain(self.cfg.drain_timeout_s):
                log.warning("drift: stopped before every sample was embedded")
            await self.batcher.stop(0)
        for task in (self._ids_task, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._pool.shutdown(wait=True)

    # -- input (event loop, cheap) ---------------------------------------------------
    def on_stored(self, batch: Any) -> None:
        ev = batch.events
        if not ev or self.batcher is None:
            return
        ids, apps, models, pvs, tss = (ev["event_id"], ev["app"], ev["model"], ev["prompt_version"],
                                       ev["timestamp"])
        items: list[tuple[str, Sample]] = []
        m = self.metrics
        for (a, mo), c in Counter(zip(apps, models, strict=True)).items():
            m.seen[m.label(a, mo)] += c
        picked = kafka_order(ev, np.flatnonzero(sample_mask(ids, self.cfg.sample_rate, self.cfg.sample_salt))).tolist()
        cols = [(f, _texts_at(ev, f, picked)) for f in self.cfg.fields]
        for i in picked:
            key = (apps[i], models[i], pvs[i] or "")
            lab = m.label(apps[i], models[i])
            for f, col in cols:
                text = col[i] if col is not None else None
                if text:
                    items.append((text, Sample(key, f, ids[i], int(tss[i]), text, self._gen)))
                    m.sampled[(*lab, f)] += 1
        if items:
            self.batcher.submit(items)

    def _on_embedded(self, samples: list[Sample], hashes: list[int], vecs: np.ndarray) -> None:
        self._queue((samples, hashes, vecs), self.max_inbox_samples,
                    "drift: the drift loop is behind; the oldest embedded samples are "
                    "dropped (counted in DriftStage.inbox_dropped)")

    # -- the drift loop (streams/stages/inbox_loop.py) ---------------------------------
    def _units(self, item: tuple[list[Sample], list[int], np.ndarray]) -> int:
        return len(item[0])

    async def _apply_next_control(self) -> None:
        await self._apply_control(self._controls.pop(0))

    async def _process_inbox(self) -> None:
        """Number, reference and test everything embedded so far (on the drift thread), then write it."""
        assert self.engine is not None
        work = self._take_inbox()
        gen = self._gen
        samples = [s for w in work for s in w[0]]
        hashes = [h for w in work for h in w[1]]
        vecs = np.concatenate([w[2] for w in work])
        if any(s.gen != gen for s in samples):  # stored before a revocation: another worker's now
            keep = [i for i, s in enumerate(samples) if s.gen == gen]
            self.revoked_samples += len(samples) - len(keep)
            samples, hashes, vecs = [samples[i] for i in keep], [hashes[i] for i in keep], vecs[keep]
            if not samples:
                return
        loop = asyncio.get_running_loop()
        emb, refs, results, scan = await loop.run_in_executor(self._pool, self._process, samples, hashes, vecs)
        if gen != self._gen:  # revoked while testing: the new owner numbers and tests these keys
            self.revoked_samples += len(samples)
            return
        await self._write(emb, refs, results, scan)

    def _process(self, samples: list[Sample], hashes: list[int], vecs: np.ndarray) -> tuple[Any, ...]:
        """On the drift thread: number, reference and test (the engine), then the semantic guard's
        scan of the same vectors (one matrix product per field) and its share tests."""
        assert self.engine is not None
        emb, refs, results = self.engine.process(samples, hashes, vecs)
        gs = self.guard
        if gs is None:
            return emb, refs, results, None
        cols, g_results, scanned, flagged = gs.process(samples, vecs, self.engine.active_keys())
        m = self.metrics
        for (a, mo, f, c), n in scanned.items():
            m.guard_scanned[(*m.label(a, mo), f, c)] += n
        for (a, mo, f, c), n in flagged.items():
            m.guard_flagged[(*m.label(a, mo), f, c)] += n
        return emb, refs, [*results, *g_results], cols

    def _golden_part(self, cmd: dict[str, Any]) -> None:
        """Keep one part of a golden set's texts until its golden command comes."""
        from driftline.streams.cli.golden import MAX_TEXTS, held_texts, part_problem

        gid, i, texts = cmd.get("golden_id"), cmd.get("i"), cmd.get("texts")
        why = part_problem(cmd)
        if why is not None:
            log.warning("drift: golden part %s ignored: %s", str(cmd.get("id"))[:80], why)
            return
        assert isinstance(gid, str) and isinstance(i, int) and isinstance(texts, list)
        if gid not in self._golden_parts and len(self._golden_parts) >= _MAX_GOLDEN_PENDING:
            oldest = next(iter(self._golden_parts))  # a load whose golden command never came
            log.warning("drift: %d golden sets wait for their golden command; dropped the parts of %s",
                        len(self._golden_parts), oldest)
            del self._golden_parts[oldest]
        self._golden_parts.setdefault(gid, {})[i] = texts
        if held_texts(self._golden_parts[gid]) > MAX_TEXTS:
            log.warning("drift: golden set %s: its parts hold over %d texts; dropped", gid, MAX_TEXTS)
            del self._golden_parts[gid]

    async def _golden_set(self, cmd: dict[str, Any], gid: str) -> Any:
        """The golden set of a ``golden`` command: stored in ``drift_golden`` already (another
        worker, or this one before a restart), else put together from its parts, embedded
        once with the stage's encoder and stored. None when its parts are missing or do not
        match the command's count and digest (logged)."""
        from driftline.schemas.columns import GOLDEN_COLUMNS
        from driftline.streams.cli.golden import command_count, texts_digest
        from driftline.streams.stages.drift_references import GoldenSet

        assert self.engine is not None and self.batcher is not None and self._ports is not None
        loop = asyncio.get_running_loop()
        n = command_count(cmd)
        if n is None:
            log.error("drift: golden set %s: n_texts %.40r is not a count within a set's cap; not applied", gid,
                      cmd.get("n_texts"))
            return None
        stored = await loop.run_in_executor(self._pool, self.engine.golden_set, gid, n)
        # one worker embeds (the one with partition 0), the others wait for its rows; past the
        # time that worker should need (10 texts/s; a loaded 2-core CPU did 12), or when this one becomes it,
        # it embeds itself
        deadline = time.monotonic() + max(60.0, n / 10)
        while stored is None and not self._embeds_golden() and time.monotonic() < deadline:
            await asyncio.sleep(self.golden_poll_s)
            stored = await loop.run_in_executor(self._pool, self.engine.golden_set, gid, n)
        if stored is not None:
            return stored
        parts = self._golden_parts.get(gid, {})
        n_parts = int(cmd.get("n_parts") or 0)
        if sorted(parts) != list(range(n_parts)):
            log.error("drift: golden set %s: %d of its %d parts arrived; not applied", gid, len(parts), n_parts)
            return None
        texts = [t for i in range(n_parts) for t in parts[i]]
        if len(texts) != n or texts_digest(texts) != cmd.get("sha256"):
            log.error("drift: golden set %s: its parts do not match its count or digest; not applied", gid)
            return None
        vecs = await self.batcher.encode_now(texts)
        self.golden_embedded += len(texts)
        red = self._ports.redaction
        shown = [red.text(t) or "" for t in texts] if red.active else texts  # stored like the events' texts
        at = ms_to_dt(int(self._ports.clock() * 1000))
        model = self.engine.embed_model
        cols = dict(zip(GOLDEN_COLUMNS, (
            [gid] * n, list(range(n)), shown, [v.tolist() for v in vecs], [model] * n, [at] * n), strict=True))
        await self._ports.tables.insert_columns("drift_golden", cols)
        return GoldenSet(gid, vecs, shown)

    async def _apply_control(self, c: _Control) -> None:
        """Apply one baseline command, write its references, then log it in ``drift_control_log``."""
        assert self.engine is not None and self._ports is not None
        loop = asyncio.get_running_loop()
        action = str(c.cmd.get("action"))
        if action == "golden":
            gs = await self._golden_set(c.cmd, c.control_id)
            refs = [] if gs is None else await loop.run_in_executor(self._pool, self.engine.apply_golden, c.cmd, gs)
            self._golden_parts.pop(c.control_id, None)
            action = action if gs is not None else "golden_refused"  # not a load new keys look up
        else:
            refs = await loop.run_in_executor(self._pool, self.engine.apply, c.cmd, c.control_id)
        await self._write({}, refs, [])
        log_row = {"control_id": c.control_id, "applied_at": ms_to_dt(int(self._ports.clock() * 1000)),
                   "action": action, "command": json.dumps(c.cmd, sort_keys=True),
                   "n_references": len(refs), "topic": c.topic, "partition": c.partition, "offset": c.offset}
        await self._ports.tables.insert_rows("drift_control_log", [log_row], CONTROL_LOG_COLUMNS)
        self._applied_ids.add(c.control_id)
        self.controls_applied += 1

    async def _write(self, emb: dict[str, list[Any]], refs: list[dict[str, Any]],
                     results: list[tuple[Sample, DriftResult]], guard: dict[str, list[Any]] | None = None) -> None:
        assert self._ports is not None
        sink = self._ports.tables
        if emb and emb["event_id"]:
            await sink.insert_columns("llm_embeddings", emb)
            self.stored_embeddings += len(emb["event_id"])
        if guard and guard["event_id"]:  # as llm_embeddings: a rewrite collapses (ReplacingMergeTree)
            await sink.insert_columns("guard_results", guard)
            self.stored_guard_results += len(guard["event_id"])
        plain = [r for r in refs if r["mode"] != "golden"]
        if plain:
            await sink.insert_rows("drift_references", plain, REFERENCE_COLUMNS)
        for r in refs:
            if r["mode"] == "golden":  # one golden reference per key, set and version, whichever worker writes it
                await sink.insert_rows("drift_references", [r], REFERENCE_COLUMNS, token=(
                    f"golden:{r['control_id']}:{r['version']}:{json.dumps([r['app'], r['model'], r['prompt_version'], r['field']])}"))
        if not results:
            return
        rows = []
        for s, r in results:
            row = r.to_row()
            row.update(ts=ms_to_dt(r.explanation["window"]["to_ms"]), app=s.key[0], model=s.key[1],
                       prompt_version=s.key[2], field=s.field)
            rows.append(row)
        await sink.insert_rows("drift_scores", rows, SCORE_COLUMNS)
        self.stored_scores += len(rows)
        self._publish(results)

    def _publish(self, results: list[tuple[Sample, DriftResult]]) -> None:
        from driftline.schemas.rules import DriftObservation

        assert self._ports is not None
        metrics, observers = self._ports.metrics, self.observers
        for s, r in results:
            a, m, p = s.key
            metrics.observe_drift(a, m, p, s.field, r.method, r.statistic, r.p_value, r.drifted)
            if observers:
                obs = DriftObservation(ts_ms=int(r.explanation["window"]["to_ms"]), app=a, model=m,
                                       prompt_version=p, field=s.field, method=r.method,
                                       statistic=float(r.statistic), p_value=r.p_value, drifted=r.drifted)
                for f in observers:
                    try:
                        f(obs)
                    except Exception:  # noqa: BLE001
                        log.exception("drift: observe_drift of a stage failed")

    # -- rebalances (worker hooks) ----------------------------------------------------
    async def on_assigned(self, partitions: Any) -> None:
        """The worker's partitions after a rebalance (``TopicPartition``): see :meth:`_embeds_golden`."""
        self._assigned = {(tp.topic, int(tp.partition)) for tp in partitions}

    def _embeds_golden(self) -> bool:
        """Does this worker embed golden sets? When it holds partition 0 of the first of its
        topics: one worker of a group (more only for a moment during a rebalance, or when a
        worker holds no partition of the first topic; their rows are the same and collapse)."""
        if not self._assigned:
            return False
        first = min(t for t, _ in self._assigned)
        return (first, 0) in self._assigned

    async def on_revoked(self) -> None:
        """The worker's partitions go: the samples in flight are embedded, tested and written
        (at most ``revoke_drain_s``), then every key's state is dropped. The next owner of a
        key (maybe this worker again) loads it from ClickHouse when it samples the key
        (``DriftEngine.get``): its numbering continues after the stored samples and its tests
        after the stored windows, so one key's results come from one worker. Samples still
        in flight after the drain are dropped (counted in :attr:`revoked_samples`; as a
        crash would lose them), never numbered beside the next owner's.

        With unkeyed input a key's events reach several partitions, so several workers
        sample and number the same key between rebalances: key the input (``app/model``).
        """
        if self.engine is None:
            return
        if not await self.drain(self.cfg.revoke_drain_s):
            log.warning("drift: samples still in flight %.0f s after the revocation: dropped",
                        self.cfg.revoke_drain_s)
        self._gen += 1
        self._assigned = set()
        engine = self.engine
        # on the drift thread: after the test round that may be running there
        await asyncio.get_running_loop().run_in_executor(self._pool, engine.state.clear)
        if self.guard is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, self.guard.clear)

    # -- baseline commands (from the control consumer, streams/ingest/control.py) -------
    def on_control_record(self, value: bytes | None, topic: str, partition: int, offset: int,
                          timestamp: int) -> bool:
        """One raw record of the control topic: decoded, then :meth:`on_command`.
        Returns True when queued."""
        from driftline.streams.ingest.control import decode_record

        rec = decode_record(value, topic, partition, offset, timestamp)
        return rec is not None and self.on_command(rec)

    def on_command(self, rec: ControlRecord) -> bool:
        """A ``baseline`` command from the control topic (the control consumer calls this for
        every one, from the topic's start): one that passes the signature check (when the
        worker has a control secret) and was not applied before is queued for the drift loop,
        which applies it and logs it in ``drift_control_log``. Returns True when queued."""
        from driftline.streams.ingest.control_auth import admit

        cmd = rec.cmd
        if cmd.get("cmd") != "baseline":
            return False
        part = cmd.get("action") == "golden_part"
        # which were applied before is not known yet: hold it (bounded; parts as parts, below)
        if not self._ids_loaded and not part:
            if len(self._early) < _MAX_EARLY_COMMANDS:
                self._early.append(rec)
            else:
                log.warning("drift: %d baseline commands wait for drift_control_log; dropped one",
                            len(self._early))
            return False
        cid = str(cmd.get("id") or f"{rec.topic}:{rec.partition}:{rec.offset}:{rec.timestamp}")
        if cid in self._applied_ids:  # applied before (the topic is read from its start each time)
            return False
        if part and str(cmd.get("golden_id")) in self._applied_ids:  # its golden set is applied
            return False
        assert self._ports is not None
        auth = self._ports.control
        if not admit(cmd, auth.secret, self._ports.metrics.control_refused,
                     max_age_s=auth.max_age_s, where="drift"):
            return False
        if part:
            self._golden_part(cmd)
            return False
        log.info("drift: baseline command %s", {k: v for k, v in cmd.items() if k != "sig"})
        self._applied_ids.add(cid)
        self._controls.append(_Control(cmd, cid, rec.topic, rec.partition, rec.offset))
        self._poke()
        return True
