"""The stream worker: Kafka -> decode -> enrich -> windows -> ClickHouse (+ DLQ, metrics).

Wiring, top to bottom (the stages are plain functions in streams/pipeline.py and
streams/windows.py):

    consumer group (aiokafka, batched getmany)            [fetch]
      -> skip records already stored (restart / rebalance)
      -> decode_batch -> enrich -> to_columns -> windows   [process]
      -> queue (bounded: backpressure)
      -> ClickHouse llm_events + llm_window_metrics        [write, retried until accepted]
      -> llm.events.dlq (rejected records, with reason)
      -> commit offsets                                    [only after the data is safe]

Why not one faust agent per record: faust-streaming dispatches every Kafka
message through ``wait_first(callback(message), …)``, two tasks per record;
measured here that caps a faust agent (``stream.take``) at ~5,000 records/s
on one core, five times below our target. The worker therefore runs inside a
faust ``App`` (lifecycle, signals, web server for ``/metrics``, timers) while
records reach it through an aiokafka consumer group in batches of thousands.
(The faust app that hosts this worker is in streams/app.py.)

Exactly-once rows: every ``llm_events`` row carries its source topic, partition
and offset. When partitions are assigned, the worker seeks past the highest
offset already stored for each (one INSERT is atomic), so a worker killed
between the insert and the offset commit does not insert twice; the open
windows of the assigned partitions are rebuilt from the stored rows.
Re-sent events (same ``event_id``) collapse in the ReplacingMergeTree; query
with ``FINAL`` for exact counts at any moment.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from driftline.schemas.metrics import WindowKey, WindowStats
from driftline.streams.metrics import WorkerMetrics
from driftline.streams.pipeline import (
    DLQ_TOPIC,
    EVENTS_TOPIC,
    OTLP_TOPIC,
    ArrowColumns,
    DecodedBatch,
    Rejected,
    decode_batch,
    enrich,
    to_columns,
)
from driftline.streams.sinks import WINDOW_COLUMNS, ClickHouseSink
from driftline.streams.windows import EventBatchColumns, WindowAggregator, WindowConfig

log = logging.getLogger("driftline.worker")

__all__ = ["WorkerConfig", "Worker", "Stage", "StoredBatch"]


@dataclass(frozen=True)
class WorkerConfig:
    kafka: str
    clickhouse: str
    database: str | None = None
    group_id: str = "driftline-worker"
    topics: tuple[str, ...] = (EVENTS_TOPIC, OTLP_TOPIC)
    dlq_topic: str = DLQ_TOPIC
    window: WindowConfig = field(default_factory=WindowConfig)
    max_batch: int = 20_000
    #: the writer merges queued batches into one insert up to this many events
    max_insert_rows: int = 100_000
    #: an insert smaller than ``min_insert_rows`` waits up to ``insert_linger_s`` for
    #: more batches: fewer, larger parts, so ClickHouse spends less on merging them
    min_insert_rows: int = 20_000
    insert_linger_s: float = 0.2
    #: on revocation, wait this long at most for queued batches to be written
    revoke_drain_s: float = 60.0
    fetch_timeout_ms: int = 200
    emit_interval_s: float = 5.0
    idle_close_s: float = 10.0
    price_files: tuple[Path, ...] = ()
    rules_file: Path | None = None
    scan_guardrails: bool = False
    create_topics: bool = True
    auto_offset_reset: str = "earliest"
    #: Kafka (and Tansu) hold a new group's first assignment for up to about half of
    #: this; a member that stops heartbeating is replaced after it
    session_timeout_ms: int = 10_000

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if self.emit_interval_s <= 0:
            raise ValueError("emit_interval_s must be > 0")
        if self.auto_offset_reset not in ("earliest", "latest"):
            raise ValueError("auto_offset_reset must be earliest or latest")


@dataclass(frozen=True, slots=True)
class StoredBatch:
    """What one write stored: handed to every :class:`Stage` after ClickHouse accepted it.

    ``events`` are the ``llm_events`` columns exactly as inserted (see
    ``pipeline.EVENT_COLUMNS``), or None when the batch held no event: sequences of
    equal length; ``timestamp`` in epoch ms; optional strings (``user_id``,
    ``environment``, ``prompt``, ``response`` …) may be ``None`` (stored as ``''``
    or NULL); ``cost_usd`` is a float64 numpy array with NaN for unpriced events;
    the ``guardrail_*`` list columns are pyarrow ``ListArray``s. ``windows`` are the
    window rows written (partial and final).
    """

    events: Mapping[str, Any] | None
    windows: list[WindowStats]
    rejected: list[Rejected]


@runtime_checkable
class Stage(Protocol):
    """A part of the stream that runs beside the spine (alerting, drift).

    ``start`` is awaited once the worker is consuming; ``on_stored`` is called in the
    writer after each batch is safe in ClickHouse and must be cheap and never block
    (queue heavy work onto a task of your own); an exception it raises is logged and
    counted, never propagated. ``stop`` is awaited when the worker stops, after the
    last batch.
    """

    name: str

    async def start(self, worker: Worker) -> None: ...

    def on_stored(self, batch: StoredBatch) -> None: ...

    async def stop(self) -> None: ...


@dataclass(slots=True)
class _Work:
    """One processed batch on its way to the writer."""

    event_cols: ArrowColumns | None
    windows: list[WindowStats]
    rejected: list[Rejected]
    offsets: dict[TopicPartition, int]

    @property
    def arrow(self) -> Any:
        """The events as an Arrow table, what the writer inserts (None without events)."""
        return self.event_cols.table if self.event_cols is not None else None


@dataclass
class _Pending:
    """A fetched batch whose decode runs on the decode thread."""

    records: list[Any]
    offsets: dict[TopicPartition, int]
    firsts: dict[TopicPartition, int]
    #: ``Worker._rebalances`` when it was fetched
    generation: int
    decoded: Any  # asyncio future of the DecodedBatch, None for an empty batch


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.worker._on_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.worker._on_assigned(list(assigned))


class Worker:
    """Runs the pipeline against Kafka and ClickHouse. ``await run(stop)``; no faust needed."""

    def __init__(self, config: WorkerConfig, metrics: WorkerMetrics | None = None,
                 sink: ClickHouseSink | None = None, stages: Sequence[Stage] = ()) -> None:
        from driftline.schemas.prices import PriceTable

        self.cfg = config
        self.metrics = metrics or WorkerMetrics()
        self.sink = sink or ClickHouseSink(config.clickhouse, config.database, on_error=self._sink_error)
        self.prices = PriceTable.load(*config.price_files) if config.price_files else PriceTable.default()
        self.scanner: Any = None
        if config.scan_guardrails:
            from driftline.detectors.guardrails import GuardrailScanner

            self.scanner = GuardrailScanner()
        self.windows = WindowAggregator(config.window)
        self.stages: list[Stage] = list(stages)
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self._queue: asyncio.Queue[_Work | None] = asyncio.Queue(maxsize=4)
        self._last_emit = 0.0
        self._wall_at_watermark = time.monotonic()
        self._assigned: set[TopicPartition] = set()
        #: partitions whose assignment has been handled (stored offsets known)
        self._ready: set[TopicPartition] = set()
        #: first offset fetched (and dropped) from a partition before it was ready
        self._rewind: dict[TopicPartition, int] = {}
        self._skip_below: dict[TopicPartition, int] = {}
        #: counts revocations and assignments: a batch in flight across one is fetched again
        self._rebalances = 0
        self._pending: _Pending | None = None
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="driftline-decode")
        self.processed_records = 0
        self.stored_events = 0
        self.dead_lettered = 0
        self.started = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle
    def _sink_error(self, what: str, exc: BaseException) -> None:
        self.metrics.sink_errors[what.split(" ")[0]] += 1

    async def start(self) -> None:
        cfg = self.cfg
        if cfg.create_topics:
            from driftline.streams.broker import DEFAULT_TOPICS, ensure_topics

            want = {t: DEFAULT_TOPICS.get(t, 1) for t in (*cfg.topics, cfg.dlq_topic, "driftline.control")}
            await asyncio.to_thread(ensure_topics, cfg.kafka, want)
        await asyncio.to_thread(self.sink.ensure_schema)
        self.producer = AIOKafkaProducer(bootstrap_servers=cfg.kafka, linger_ms=20, acks="all",
                                         max_request_size=16 << 20, enable_idempotence=False)
        await self.producer.start()
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=cfg.kafka, group_id=cfg.group_id, enable_auto_commit=False,
            auto_offset_reset=cfg.auto_offset_reset, max_partition_fetch_bytes=8 << 20,
            fetch_max_bytes=64 << 20, max_poll_records=cfg.max_batch,
            session_timeout_ms=cfg.session_timeout_ms,
            heartbeat_interval_ms=max(500, min(3_000, cfg.session_timeout_ms // 4)),
            max_poll_interval_ms=600_000,
        )
        self.consumer.subscribe(list(cfg.topics), listener=_Rebalance(self))
        await self.consumer.start()
        log.info("worker consuming %s from %s into %s (database %s)", ",".join(cfg.topics),
                 cfg.kafka, cfg.clickhouse, self.sink.database)

    async def stop(self) -> None:
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await self.consumer.stop()
            self.consumer = None
        if self.producer is not None:
            with contextlib.suppress(Exception):
                await self.producer.stop()
            self.producer = None

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; then write what is in flight and commit it."""
        await self.start()
        writer = asyncio.create_task(self._writer(), name="driftline-writer")
        started: list[Stage] = []
        try:
            for st in self.stages:
                await st.start(self)
                started.append(st)
            # What start-up allocated (modules, model, price table, rules) lives as long as
            # the worker: move it out of the collector's generations, so the full
            # collections that each batch's garbage triggers do not walk it again
            # (Instagram's gc.freeze pattern; the collector stays on for new objects).
            gc.collect()
            gc.freeze()
            self.started.set()
            while not stop.is_set():
                await self._fetch_and_process()
                if writer.done():
                    writer.result()  # surfaces a writer bug; sink failures never get here
            if self._pending is not None:  # the batch still being decoded is written too
                pending, self._pending = self._pending, None
                await self._complete(pending)
        finally:
            with contextlib.suppress(Exception):
                # windows still open are stored as partial rows: visible, and rebuilt on restart
                await self._queue.put(_Work(None, self.windows.partial(), [], {}))
            await self._queue.put(None)
            with contextlib.suppress(Exception):
                await writer
            for st in reversed(started):
                try:
                    await st.stop()
                except Exception:  # noqa: BLE001 - stopping one stage never blocks the rest
                    log.exception("stage %s failed to stop", st.name)
            await self.stop()

    def request_flush(self) -> None:
        """Write the open windows as partial rows with the next batch."""
        self._last_emit = 0.0

    # ------------------------------------------------------------------ fetch + process
    async def _fetch_and_process(self) -> None:
        """Fetch a batch and start decoding it on the decode thread, then finish the
        batch fetched before (windows, queue for the writer).

        Decoding is mostly Arrow's JSON reader, which runs without the GIL, so it
        overlaps with the next ``getmany`` (aiokafka's per-record work, on this
        thread). A batch that was in flight while partitions were revoked or
        assigned is dropped, with every batch after it, and fetched again from
        its first offsets: it is never added to the windows of a new assignment.
        """
        assert self.consumer is not None
        # with a batch in flight, take only what is already fetched: when traffic stops,
        # that batch is finished at once rather than after a fetch timeout
        busy = self._pending is not None and bool(self._pending.records)
        data = await self.consumer.getmany(timeout_ms=0 if busy else self.cfg.fetch_timeout_ms,
                                           max_records=self.cfg.max_batch)
        records: list[Any] = []
        offsets: dict[TopicPartition, int] = {}
        firsts: dict[TopicPartition, int] = {}
        for tp, recs in data.items():
            if not recs:
                continue
            if tp not in self._ready:
                # fetched while the assignment is still being handled (aiokafka fetches as
                # soon as it is assigned): drop them, _on_assigned seeks back to them
                first = recs[0].offset
                self._rewind[tp] = min(first, self._rewind.get(tp, first))
                continue
            floor = self._skip_below.get(tp)
            if floor is not None:
                recs = [r for r in recs if r.offset >= floor]
            if recs:
                firsts[tp] = recs[0].offset
            records.extend(recs)
            offsets[tp] = data[tp][-1].offset + 1
        fut: Any = None
        if records:
            fut = asyncio.get_running_loop().run_in_executor(
                self._decode_pool, functools.partial(decode_batch, records, fast=self.scanner is None))
        prev, self._pending = self._pending, _Pending(records, offsets, firsts, self._rebalances, fut)
        if prev is not None:
            await self._complete(prev)

    async def _complete(self, p: _Pending) -> None:
        decoded = await p.decoded if p.decoded is not None else None
        if p.generation != self._rebalances:
            self._refetch(p)
            return
        work = self.process(p.records, p.offsets, decoded)
        t = time.monotonic()
        await self._queue.put(work)
        if time.monotonic() - t > 1.0:
            self._wall_at_watermark = time.monotonic()  # held up by the writer: not idleness

    def _refetch(self, stale: _Pending) -> None:
        """Drop ``stale`` and the batch fetched after it; seek their partitions back."""
        back = dict(stale.firsts)
        nxt, self._pending = self._pending, None
        if nxt is not None:
            if nxt.decoded is not None:
                nxt.decoded.cancel()
            for tp, off in nxt.firsts.items():
                back[tp] = min(off, back.get(tp, off))
        assert self.consumer is not None
        for tp, off in back.items():
            if tp in self._ready:
                self.consumer.seek(tp, off)
        log.info("rebalance while %d records were in flight: fetching them again", len(stale.records))

    def process(self, records: Sequence[Any], offsets: dict[TopicPartition, int],
                decoded: DecodedBatch | None = None) -> _Work:
        """Decode, enrich and window one batch (CPU only; no I/O).

        The cyclic garbage collector is held off while a batch is built: the batch
        allocates hundreds of thousands of acyclic objects (freed by reference
        counting), and each automatic collection would walk every live object of
        the batches in flight — measured, that tripled the decode time. One young
        collection runs after each batch instead.
        """
        gc_was = gc.isenabled()
        gc.disable()
        try:
            return self._process(records, offsets, decoded)
        finally:
            if gc_was:
                gc.enable()
                gc.collect(0)

    def _process(self, records: Sequence[Any], offsets: dict[TopicPartition, int],
                 decoded: DecodedBatch | None) -> _Work:
        now = time.monotonic()
        m = self.metrics
        if decoded is None:
            decoded = decode_batch(records, fast=self.scanner is None)  # the scan needs event objects
        event_cols = None
        if decoded.n_events:
            enriched = enrich(decoded, self.prices, self.scanner)
            event_cols, wcols = to_columns(enriched)
            late = self.windows.add(wcols)
            m.late_events += late
            m.observe_batch(wcols)
            self._wall_at_watermark = now
        for r in decoded.rejected:
            m.observe_dlq(r.reason_class)
        m.skipped_spans += decoded.skipped_spans
        m.batches += 1
        m.records += len(records)
        self.processed_records += len(records)
        windows = self.windows.advance()
        wm = self.windows.watermark_ms
        if not records and self._cut_off():
            # paused on a ClickHouse outage, or Kafka not answering: that is not idle traffic,
            # and event time must not follow wall time through it (the records held back in
            # Kafka would all be late). tests/integration/test_faults.py catches this.
            self._wall_at_watermark = now
        if not records and wm is not None and now - self._wall_at_watermark > self.cfg.idle_close_s:
            # no traffic: let event time follow wall time so the last windows close
            windows += self.windows.advance(wm + int((now - self._wall_at_watermark) * 1000))
            self._wall_at_watermark = now
        if now - self._last_emit >= self.cfg.emit_interval_s:
            self._last_emit = now
            closed = {(w.key, w.window_start_ms) for w in windows}
            windows += [w for w in self.windows.partial() if (w.key, w.window_start_ms) not in closed]
        return _Work(event_cols, windows, decoded.rejected, offsets)

    def _cut_off(self) -> bool:
        """True while fetching is paused or an assigned partition has had no fetch answer
        for 2 s (the broker unreachable): an empty fetch then says nothing about traffic."""
        c = self.consumer
        if c is None:
            return False
        parts = c.assignment()
        if not parts or c.paused():  # no partition (group lost while Kafka is cut) or paused
            return True
        wall_ms = time.time() * 1000
        for tp in parts:
            ts = c.last_poll_timestamp(tp)
            if ts is None or wall_ms - ts > 2_000:
                return True
        return False

    # ------------------------------------------------------------------ write + commit
    async def _keepalive(self) -> None:
        """While ClickHouse is down: keep the group membership, fetch nothing more."""
        c = self.consumer
        if c is not None:
            parts = c.assignment()
            if parts:
                c.pause(*parts)
                with contextlib.suppress(Exception):
                    await c.getmany(timeout_ms=0)

    async def _writer(self) -> None:
        queue = self._queue
        cfg = self.cfg
        while True:
            work = await queue.get()
            if work is None:
                queue.task_done()
                return
            # coalesce what queues up meanwhile, lingering briefly for a small insert:
            # fewer, larger inserts (fewer parts to merge)
            batch = [work]
            n = work.arrow.num_rows if work.arrow is not None else 0
            done = False
            deadline = time.monotonic() + cfg.insert_linger_s
            while n < cfg.max_insert_rows:
                if queue.empty():
                    left = deadline - time.monotonic()
                    if n >= cfg.min_insert_rows or left <= 0:
                        break
                    try:
                        nxt = await asyncio.wait_for(queue.get(), left)
                    except TimeoutError:
                        break
                else:
                    nxt = queue.get_nowait()
                if nxt is None:
                    done = True
                    break
                batch.append(nxt)
                n += nxt.arrow.num_rows if nxt.arrow is not None else 0
            await self._write(batch)
            for _ in range(len(batch) + done):
                queue.task_done()
            if done:
                return

    async def _write(self, batch: list[_Work]) -> None:
        sink = self.sink
        tables = [w.arrow for w in batch if w.arrow is not None]
        if tables:
            await sink.insert_arrow("llm_events", lambda: _concat_arrow(tables), self._keepalive)
            self.stored_events += sum(t.num_rows for t in tables)
        windows = [w for work in batch for w in work.windows]
        if windows:
            stamp = time.time_ns() // 1000  # DateTime64(6) ticks
            rows = []
            for i, w in enumerate(windows):
                r = w.row()
                r["updated_at"] = stamp + i  # strictly increasing versions, in stream order
                rows.append(r)
            await sink.insert_rows("llm_window_metrics", rows, WINDOW_COLUMNS, self._keepalive)
        if self.stages:
            for work in batch:
                if not (work.event_cols or work.windows or work.rejected):
                    continue
                stored = StoredBatch(work.event_cols, work.windows, work.rejected)
                for st in self.stages:
                    try:
                        st.on_stored(stored)
                    except Exception:  # noqa: BLE001 - a stage never breaks the stream
                        self.metrics.stage_errors[st.name] += 1
                        log.exception("stage %s failed on a batch", st.name)
        rejected = [r for work in batch for r in work.rejected]
        if rejected:
            await self._dead_letter(rejected)
        c = self.consumer
        if c is not None:
            parts = c.assignment()
            if c.paused():
                c.resume(*parts)
            offsets: dict[TopicPartition, int] = {}
            for work in batch:
                offsets.update(work.offsets)  # later batches carry later offsets
            commit = {tp: off for tp, off in offsets.items() if tp in parts}
            if commit:
                try:
                    await c.commit(commit)
                except Exception as exc:  # noqa: BLE001 - rebalance in flight: stored rows make it safe
                    log.warning("offset commit failed (will be skipped via stored offsets): %s", exc)

    async def _dead_letter(self, rejected: list[Rejected]) -> None:
        assert self.producer is not None
        delay = 0.2
        pending = list(rejected)
        while pending:
            futs = []
            for r in pending:
                futs.append(await self.producer.send(self.cfg.dlq_topic, r.value, key=r.key,
                                                     headers=r.dlq_headers()))
            results = await asyncio.gather(*futs, return_exceptions=True)
            failed = [r for r, res in zip(pending, results, strict=True) if isinstance(res, BaseException)]
            self.dead_lettered += len(pending) - len(failed)
            if failed:
                log.warning("dead-letter send failed for %d records, retrying", len(failed))
                await asyncio.sleep(delay)
                delay = min(10.0, delay * 2)
            pending = failed

    # ------------------------------------------------------------------ rebalance
    async def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        if not revoked:
            return
        self._rebalances += 1
        # Keep what is open visible; the next owner rebuilds it from the stored rows.
        partial = self.windows.partial()
        if partial:
            await self._queue.put(_Work(None, partial, [], {}))
        self.windows = WindowAggregator(self.cfg.window)
        # Everything processed so far is written (and committed) before the group moves
        # on: the next owner of a partition reads its stored offsets after this returns,
        # so it skips what this worker stored instead of storing it again.
        try:
            await asyncio.wait_for(self._queue.join(), self.cfg.revoke_drain_s)
        except TimeoutError:
            log.warning("revoked with writes still pending after %.0f s (ClickHouse slow or down); "
                        "the next owner may store some events again (FINAL collapses them)",
                        self.cfg.revoke_drain_s)
        self._assigned -= set(revoked)
        self._ready -= set(revoked)

    async def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        if not assigned:
            return
        self._rebalances += 1
        self._assigned |= set(assigned)
        assert self.consumer is not None
        by_topic: dict[str, list[int]] = {}
        for tp in assigned:
            by_topic.setdefault(tp.topic, []).append(tp.partition)
        seek_to: dict[TopicPartition, int] = {}
        for topic, parts in by_topic.items():
            stored = await asyncio.to_thread(self.sink.stored_offsets, topic, parts)
            for p in parts:
                tp = TopicPartition(topic, p)
                if p in stored:
                    nxt = stored[p] + 1
                    self._skip_below[tp] = nxt
                    committed = await self.consumer.committed(tp)
                    if committed is None or committed < nxt:
                        seek_to[tp] = nxt
                        log.info("%s[%d]: resuming after stored offset %d (committed %s)",
                                 topic, p, stored[p], committed)
        # no await from here on: records fetched before this point were dropped (see
        # _fetch_and_process); fetching resumes at them, or past what is stored
        for tp in assigned:
            rewind = self._rewind.pop(tp, None)
            target = seek_to.get(tp)
            if rewind is not None:
                target = max(rewind, self._skip_below.get(tp, rewind)) if target is None else max(rewind, target)
            if target is not None:
                self.consumer.seek(tp, target)
        self._ready |= set(assigned)
        # rebuild open windows of every assigned partition from the stored rows
        self.windows = WindowAggregator(self.cfg.window)
        cols = await self.sink.acall(lambda c: _recent_rows(c, self.sink.database, sorted(self._assigned),
                                                            self.cfg.window))
        if cols is not None and len(cols):
            self.windows.add(cols)
            self.windows.advance()
            self._wall_at_watermark = time.monotonic()
            log.info("rebuilt %d open windows from %d stored events", self.windows.open_windows, len(cols))


def _concat_arrow(tables: list[Any]) -> Any:
    import pyarrow as pa

    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def _recent_rows(client: Any, db: str, tps: list[TopicPartition], wc: WindowConfig) -> EventBatchColumns | None:
    """The stored events of the windows that may still be open, as window-stage columns."""
    if not tps:
        return None
    cond = " OR ".join(f"(source_topic = '{tp.topic}' AND source_partition = {int(tp.partition)})"
                       for tp in tps if "'" not in tp.topic)
    mx = client.query(f"SELECT toUnixTimestamp64Milli(max(timestamp)), count() FROM {db}.llm_events "
                      f"WHERE {cond}").result_rows
    if not mx or not mx[0][1]:
        return None
    horizon = int(mx[0][0]) - 2 * (wc.size_ms + wc.allowed_lateness_ms)
    res = client.query(
        "SELECT app, model, prompt_version, toUnixTimestamp64Milli(timestamp), latency_ms, "
        "ifNull(ttft_ms, nan), ifNull(tpot_ms, nan), status = 'error', ifNull(input_tokens, 0), "
        "ifNull(output_tokens, 0), ifNull(cache_read_input_tokens, 0), "
        "ifNull(cache_creation_input_tokens, 0), ifNull(reasoning_output_tokens, 0), "
        "ifNull(cost_usd, nan), length(guardrail_verdicts) > 0, guardrail_hit, "
        "has(guardrail_verdicts, 'blocked'), ifNull(toFloat64(feedback), nan) "
        f"FROM {db}.llm_events FINAL WHERE ({cond}) AND timestamp >= fromUnixTimestamp64Milli({horizon}) "
        "ORDER BY timestamp", column_oriented=True)
    c = res.result_columns
    if not c or not len(c[0]):
        return None
    keys = [WindowKey(a, m, p) for a, m, p in zip(c[0], c[1], c[2], strict=True)]

    def f(i: int) -> np.ndarray:
        return np.asarray(c[i], dtype=float)

    def n(i: int) -> np.ndarray:
        return np.asarray(c[i], dtype=np.int64)

    def b(i: int) -> np.ndarray:
        return np.asarray(c[i], dtype=bool)

    return EventBatchColumns(keys, n(3), f(4), f(5), f(6), b(7), n(8), n(9), n(10), n(11), n(12),
                             f(13), b(14), b(15), b(16), f(17))
