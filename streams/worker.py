"""The stream worker: Kafka -> decode -> enrich -> windows -> ClickHouse (+ DLQ, metrics).

The spine, top to bottom (its steps are plain functions in streams/ingest/transforms.py and
streams/stages/windows.py; the whole pipeline, stages included, reads in streams/wiring.py):

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

Exactly once (README "What the worker does, and guarantees"). A *write step*
(one or more fetched batches, merged by the writer) goes, in this order:

  1. ``llm_events``      the events (refused rows: bisected out, to the DLQ)
  2. ``dlq_outbox``      the step's rejected records, keyed by source offset + index
  3. ``llm_window_metrics``
  4. ``ingest_log``      one row per source partition: the last offset, and the Kafka
                         timestamp + CRC of the record there. Written LAST: a row
                         here means steps 1-3 are complete up to that offset.
  5. DLQ sends of the outbox rows, then the Kafka offset commit (a hint only).

Every insert carries ``insert_deduplication_token`` = hash(step's source offset
ranges, epochs) + table, and every table keeps ``non_replicated_deduplication_window``:
a retried insert that had in fact landed (wholly, or some of its month partitions)
stores nothing twice. Why the write log is last, and how a kill anywhere recovers:

- killed before (4): the step's records are fetched again (the new owner resumes
  after the write log). Events that (1) had stored are recognised by (offset,
  event_id) and not inserted again (``WriteLog.torn``); the open windows are rebuilt only
  from rows up to the write log, and the re-processed records complete them, so
  the windows that this step closed are recomputed from all their events; outbox
  rows written twice collapse (ReplacingMergeTree) and were never sent.
- killed after (4), before or during (5): on assignment, the last logged step's
  outbox rows that the DLQ topic does not hold (read from the DLQ end offsets the
  log recorded, by their ``driftline-source-*`` headers) are sent.
- the topic behind the log changed (recreated, in-memory broker restarted): the
  record at the logged offset is read back before fetching (``_probe``) and again
  on the first fetch (``_same_topic``); a topic that ends before it, restarts below
  it or holds another record there is read from its beginning under a new epoch.
- ClickHouse down in the rebalance callback: its reads are retried there until
  they succeed (heartbeats run on their own task); the rebalance timeout (75 s)
  exceeds the revoke drain (60 s), so a next owner does not read the log before
  this worker's writes land, unless ClickHouse is slower than that.

The write step runs on the sink's ingest lane (its own client); the rebuild,
stages and ad-hoc SQL use the query lane, with ``max_execution_time``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from aiokafka import AIOKafkaConsumer, TopicPartition

from driftline.detectors.redact import Redaction
from driftline.schemas.topics import CONTROL_TOPIC, DLQ_TOPIC, EVENTS_TOPIC, OTLP_TOPIC
from driftline.streams.ingest.kafka_host import (
    GroupListener,
    commit_confirmed,
    cut_off,
    group_consumer,
    hold,
)
from driftline.streams.ingest.kafka_security import KafkaSecurity
from driftline.streams.ingest.transforms import (
    DEFAULT_MAX_CLOCK_SKEW_S,
    DEFAULT_MAX_EVENT_AGE_S,
    DecodedBatch,
    Rejected,
    decode_batch,
    enrich,
    to_columns,
)
from driftline.streams.ports import ControlAuth, KafkaPort, StagePorts, TableWriter, WindowView
from driftline.streams.redact_secrets import redact_url, redact_urls_in
from driftline.streams.sinks.clickhouse import ClickHouseSink, Retention
from driftline.streams.sinks.dlq import DeadLetters
from driftline.streams.sinks.prometheus import WorkerMetrics
from driftline.streams.sinks.write_step import StoredBatch, Work, WriteLog, WriteStep
from driftline.streams.stages.window_restore import rebuild, recent_rows
from driftline.streams.stages.windows import WindowAggregator, WindowClock, WindowConfig

log = logging.getLogger("driftline.worker")

__all__ = ["WorkerConfig", "Worker", "Stage", "StoredBatch"]


@dataclass(frozen=True)
class WorkerConfig:
    kafka: str
    clickhouse: str = field(repr=False)  # may carry a password
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
    #: how long the group waits for members to rejoin in a rebalance: longer than the
    #: drain, so the next owner never reads the write log before this worker's writes land
    rebalance_timeout_ms: int = 75_000
    fetch_timeout_ms: int = 200
    emit_interval_s: float = 5.0
    idle_close_s: float = 10.0
    price_files: tuple[Path, ...] = ()
    scan_guardrails: bool = False
    create_topics: bool = True
    auto_offset_reset: str = "earliest"
    #: Kafka (and Tansu) hold a new group's first assignment for up to about half of
    #: this; a member that stops heartbeating is replaced after it
    session_timeout_ms: int = 10_000
    #: events dated more than this before the wall clock go to the DLQ (a backfill of the
    #: last 30 days is accepted; one insert stays within a few monthly partitions)
    max_event_age_s: float = DEFAULT_MAX_EVENT_AGE_S
    #: events dated more than this after the wall clock go to the DLQ (clock skew)
    max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S
    #: --redact: prompt/response in llm_events and the DLQ copies (detectors/redact.py)
    redaction: Redaction = field(default_factory=Redaction)
    #: --retention-days(-text): TTLs set on the tables at start (sinks.Retention)
    retention: Retention = field(default_factory=Retention)
    #: TLS / SASL of every Kafka client of the worker (consumers, DLQ producer, admin, faust)
    kafka_security: KafkaSecurity = field(default_factory=KafkaSecurity)
    #: HMAC secret control commands must be signed with (None: unsigned commands accepted)
    control_secret: bytes | None = field(default=None, repr=False)
    #: with a secret: also refuse signed commands older than this (None: any age; see control_auth)
    control_max_age_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if not self.max_event_age_s > 0 or not self.max_clock_skew_s >= 0:
            raise ValueError("max_event_age_s must be > 0 and max_clock_skew_s >= 0")
        if self.emit_interval_s <= 0:
            raise ValueError("emit_interval_s must be > 0")
        if self.auto_offset_reset not in ("earliest", "latest"):
            raise ValueError("auto_offset_reset must be earliest or latest")
        if self.control_max_age_s is not None and not self.control_max_age_s > 0:
            raise ValueError("control_max_age_s must be > 0 (or None: any age)")
        if self.rebalance_timeout_ms < self.revoke_drain_s * 1000 + 5_000:
            raise ValueError("rebalance_timeout_ms must exceed revoke_drain_s by 5 s at least")


@runtime_checkable
class Stage(Protocol):
    """A part of the stream that runs beside the spine (alerting, drift).

    ``start`` is awaited once the worker is consuming, with the stage's ports
    (streams/ports.py: a writer for its ``tables``, metrics, a view of the open
    windows, …; never the worker itself); ``on_stored`` is called in the writer after
    each batch is safe in ClickHouse and must be cheap and never block (queue heavy
    work onto a task of your own); an exception it raises is logged and counted,
    never propagated. ``stop`` is awaited when the worker stops, after the last batch.
    """

    name: str
    #: the tables the stage writes (its ``StagePorts.tables`` refuses the others)
    tables: tuple[str, ...]

    async def start(self, ports: StagePorts) -> None: ...

    def on_stored(self, batch: StoredBatch) -> None: ...

    async def stop(self) -> None: ...


def load_prices(cfg: WorkerConfig) -> Any:
    """enrich's price table: the shipped one, or ``cfg.price_files`` on top of it."""
    from driftline.schemas.prices import PriceTable

    return PriceTable.load(*cfg.price_files) if cfg.price_files else PriceTable.default()


def load_scanner(cfg: WorkerConfig) -> Any:
    """enrich's guardrail scanner with ``cfg.scan_guardrails``, else None."""
    if not cfg.scan_guardrails:
        return None
    from driftline.detectors.guardrails import GuardrailScanner

    return GuardrailScanner()


def count_sink_error(metrics: WorkerMetrics, what: str, exc: BaseException) -> None:
    """Count a failed ClickHouse call (retried by the caller) by its first word."""
    metrics.sink_errors[what.split(" ")[0]] += 1


def clickhouse_sink(cfg: WorkerConfig, metrics: WorkerMetrics) -> ClickHouseSink:
    """The ClickHouse sink of ``cfg`` (TTLs of ``cfg.retention``), its errors counted."""
    return ClickHouseSink(cfg.clickhouse, cfg.database, retention=cfg.retention,
                          on_error=lambda what, exc: count_sink_error(metrics, what, exc))


@dataclass
class InFlight:
    """A fetched batch whose decode runs on the decode thread."""

    records: list[Any]
    offsets: dict[TopicPartition, int]
    firsts: dict[TopicPartition, int]
    lasts: dict[TopicPartition, tuple[int, int]]
    #: ``Worker._rebalances`` when it was fetched
    generation: int
    decoded: Any  # asyncio future of the DecodedBatch, None for an empty batch
    #: skipped record batches that could not be unpacked (see Worker._undecodable)
    undecodable: list[Rejected] = field(default_factory=list)


class Worker:
    """Runs the pipeline against Kafka and ClickHouse. ``await run(stop)``; no faust needed."""

    def __init__(self, config: WorkerConfig, metrics: WorkerMetrics | None = None,
                 sink: ClickHouseSink | None = None, stages: Sequence[Stage] = (), *,
                 prices: Any = None, scanner: Any = None) -> None:
        """The parts left None are built from ``config`` as streams/wiring.py builds them."""
        self.cfg = config
        self.metrics = metrics or WorkerMetrics()
        self.sink = sink or clickhouse_sink(config, self.metrics)
        self.prices = prices if prices is not None else load_prices(config)
        self.scanner: Any = scanner if scanner is not None else load_scanner(config)
        #: the windows, closed and emitted on the wall clock (streams/stages/windows.py)
        self.clock = WindowClock(config.window, idle_close_s=config.idle_close_s,
                                 emit_interval_s=config.emit_interval_s, now=time.monotonic())
        self.stages: list[Stage] = list(stages)
        self.consumer: AIOKafkaConsumer | None = None
        self._assigned: set[TopicPartition] = set()
        #: partitions whose assignment has been handled (stored offsets known)
        self._ready: set[TopicPartition] = set()
        #: first offset fetched (and dropped) from a partition before it was ready
        self._rewind: dict[TopicPartition, int] = {}
        self._skip_below: dict[TopicPartition, int] = {}
        #: per partition: the offset, timestamp and fingerprint of the last record the
        #: write log holds; the first fetch must find that same record there
        self._verify: dict[TopicPartition, tuple[int, int, int]] = {}
        #: per partition: the write log's epoch, last offset, events of a step cut short
        self.log = WriteLog()
        #: the outbox -> DLQ topic path (streams/sinks/dlq.py)
        self.dlq = DeadLetters(config.kafka, config.dlq_topic, self.metrics, security=config.kafka_security,
                               keepalive=self._keepalive)
        #: llm_events, dlq_outbox, llm_window_metrics, ingest_log; the DLQ; the safe offsets
        self.write_step = WriteStep(self.sink, self.dlq, self.log, self.metrics, stages=self.stages,
                                    redaction=config.redaction, on_safe=self._commit, keepalive=self._keepalive,
                                    max_insert_rows=config.max_insert_rows, min_insert_rows=config.min_insert_rows,
                                    insert_linger_s=config.insert_linger_s)
        self._stopping = False
        #: counts revocations and assignments: a batch in flight across one is fetched again
        self._rebalances = 0
        self._pending: InFlight | None = None
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="driftline-decode")
        self.processed_records = 0
        self.started = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle
    def _sink_error(self, what: str, exc: BaseException) -> None:
        count_sink_error(self.metrics, what, exc)

    async def start(self) -> None:
        cfg = self.cfg
        if cfg.create_topics:
            from driftline.streams.local.broker import DEFAULT_TOPICS, ensure_topics

            want = {t: DEFAULT_TOPICS.get(t, 1) for t in (*cfg.topics, cfg.dlq_topic, CONTROL_TOPIC)}
            await asyncio.to_thread(ensure_topics, cfg.kafka, want, security=cfg.kafka_security)
        await self._ch_retry("creating the schema", self.sink.ensure_schema)
        if cfg.kafka_security.security_protocol != "PLAINTEXT":
            log.info("Kafka security: %s", cfg.kafka_security.describe())
            cfg.kafka_security.warn_cleartext(cfg.kafka)
        await self.dlq.start()
        self.consumer = group_consumer(cfg, GroupListener(self._on_revoked, self._on_assigned))
        await self.consumer.start()
        log.info("worker consuming %s from %s into %s (database %s)", ",".join(cfg.topics),
                 cfg.kafka, redact_url(cfg.clickhouse), self.sink.database)

    async def _ch_retry(self, what: str, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on a thread, retried with backoff (logged) until it succeeds:
        for the reads and DDL that start-up and rebalances need from ClickHouse."""
        delay, attempt = 0.2, 0
        while True:
            attempt += 1
            try:
                return await asyncio.to_thread(fn, *args)
            except Exception as exc:  # noqa: BLE001 - ClickHouse down: wait for it
                self._sink_error(f"{what.split(' ')[0]} (read)", exc)
                log.warning("ClickHouse %s failed (attempt %d), retrying in %.1fs: %s", what, attempt, delay,
                            redact_urls_in(str(exc)))
                if self._stopping:
                    raise
                await asyncio.sleep(delay)
                delay = min(10.0, delay * 2)

    async def stop(self) -> None:
        self._stopping = True
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        # the consumer first: stopping it waits for a rebalance callback in flight, which
        # may be reading the DLQ (recovery) through the reader closed after it
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await self.consumer.stop()
            self.consumer = None
        await self.dlq.stop()

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; then write what is in flight and commit it.

        ``stop`` also ends the start-up, which waits for ClickHouse as long as it takes
        (SIGINT/SIGTERM stopped nothing while ClickHouse was unreachable)."""
        starting = asyncio.create_task(self.start(), name="driftline-start")
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # run() cancelled: so is the start-up
            starting.cancel()
            raise
        finally:
            stopped.cancel()
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
            log.info("stopped during start-up")
            await self.stop()
            return
        starting.result()
        writer = asyncio.create_task(self.write_step.run(), name="driftline-writer")
        started: list[Stage] = []
        try:
            for st in self.stages:
                await st.start(self.ports_for(st))
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
                await self.write_step.queue.put(Work(None, self.windows.partial(), [], {}))
            await self.write_step.queue.put(None)
            with contextlib.suppress(Exception):
                await writer
            for st in reversed(started):
                try:
                    await st.stop()
                except Exception:  # noqa: BLE001 - stopping one stage never blocks the rest
                    log.exception("stage %s failed to stop", st.name)
            await self.stop()

    def ports_for(self, stage: Stage) -> StagePorts:
        """What ``stage`` is given at start: a writer for its own tables, the metrics,
        a read-only view of the open windows, the Kafka and control settings."""
        cfg = self.cfg
        return StagePorts(tables=TableWriter(self.sink, stage.tables), metrics=self.metrics,
                          windows=WindowView(lambda: self.windows, self._cut_off),
                          kafka=KafkaPort(cfg.kafka, cfg.kafka_security),
                          control=ControlAuth(cfg.control_secret, cfg.control_max_age_s),
                          redaction=cfg.redaction)

    def request_flush(self) -> None:
        """Write the open windows as partial rows with the next batch."""
        self.clock.request_flush()

    @property
    def windows(self) -> WindowAggregator:
        """The open windows (replaced on each rebalance)."""
        return self.clock.windows

    @property
    def dead_lettered(self) -> int:
        """Records the DLQ topic took (streams/sinks/dlq.py)."""
        return self.dlq.dead_lettered

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
        before = self._positions()
        bad: dict[TopicPartition, tuple[int, int, str]] = {}
        try:
            data = await self.consumer.getmany(timeout_ms=0 if busy else self.cfg.fetch_timeout_ms,
                                               max_records=self.cfg.max_batch)
        except Exception as exc:  # noqa: BLE001 - only a batch aiokafka cannot unpack; anything else re-raised
            if not _unpacking(exc):
                raise
            data, bad = await self._undecodable(exc, before)
        records: list[Any] = []
        offsets: dict[TopicPartition, int] = {}
        firsts: dict[TopicPartition, int] = {}
        lasts: dict[TopicPartition, tuple[int, int]] = {}
        for tp, recs in data.items():
            if not recs:
                continue
            if tp not in self._ready:
                # fetched while the assignment is still being handled (aiokafka fetches as
                # soon as it is assigned): drop them, _on_assigned seeks back to them
                first = recs[0].offset
                self._rewind[tp] = min(first, self._rewind.get(tp, first))
                continue
            if tp in self._verify and not self._same_topic(tp, recs[0]):
                continue  # recreated: fetched again from its beginning
            last = recs[-1]
            floor = self._skip_below.get(tp)
            if floor is not None:
                recs = [r for r in recs if r.offset >= floor]
            if recs:
                firsts[tp] = recs[0].offset
                lasts[tp] = (int(last.timestamp), _fingerprint(last))
            records.extend(recs)
            offsets[tp] = data[tp][-1].offset + 1
        rejected: list[Rejected] = []
        for tp, (first, last_off, reason) in bad.items():
            # the skipped batch is logged and dead-lettered by the write step like any rejected record
            rejected.append(Rejected(tp.topic, tp.partition, first, None, b"", reason))
            firsts.setdefault(tp, first)
            lasts[tp] = (0, 0)  # no record to fingerprint: a restart finds it undecodable again
            offsets[tp] = last_off + 1
        fut: Any = None
        if records:
            fut = asyncio.get_running_loop().run_in_executor(self._decode_pool, self._decode, records)
        prev, self._pending = self._pending, InFlight(records, offsets, firsts, lasts, self._rebalances, fut,
                                                      rejected)
        if prev is not None:
            await self._complete(prev)

    def _positions(self) -> dict[TopicPartition, int]:
        """The fetch position of each assigned partition (aiokafka's assignment state, read
        without awaiting): where to seek back when a fetch cannot be unpacked."""
        assert self.consumer is not None
        out: dict[TopicPartition, int] = {}
        sub = self.consumer._subscription.subscription
        if sub is None or sub.assignment is None:
            return out
        for tp in sub.assignment.tps:
            st = sub.assignment.state_value(tp)
            if st is not None and st.has_valid_position:
                out[tp] = st.position
        return out

    async def _undecodable(self, exc: BaseException, before: dict[TopicPartition, int]
                           ) -> tuple[dict[TopicPartition, list[Any]], dict[TopicPartition, tuple[int, int, str]]]:
        """A fetch raised while aiokafka unpacked a record batch (codec library missing,
        corrupt compressed data, bad CRC), naming no partition. Each ready partition is
        read again from where the fetch began, one record at a time: its good records
        come back as a batch, and a batch that raises is skipped whole (its base offset
        to its last offset, from aiokafka's batch header; one offset when that is not
        known), returned as (first, last, reason) for the dead-letter topic.
        Skipped offsets at or below the write log are not returned again."""
        c = self.consumer
        assert c is not None
        log.warning("a fetched record batch cannot be unpacked (%s: %s): reading each partition alone",
                    type(exc).__name__, exc)
        for tp, off in before.items():
            c.seek(tp, off)  # records of other partitions drained by the failed fetch are lost otherwise
        data: dict[TopicPartition, list[Any]] = {}
        bad: dict[TopicPartition, tuple[int, int, str]] = {}
        for tp in sorted(self._ready & set(before), key=lambda t: (t.topic, t.partition)):
            recs: list[Any] = []
            while len(recs) < self.cfg.max_batch:
                try:
                    got = await c.getmany(tp, timeout_ms=0 if recs else self.cfg.fetch_timeout_ms, max_records=1)
                except Exception as err:  # noqa: BLE001 - as in _fetch_and_process
                    if not _unpacking(err):
                        raise
                    pos = self._positions().get(tp, before[tp])  # the failed call did not move it
                    end = _failed_batch_end(err, pos)
                    c.seek(tp, end + 1)  # past the batch: never fetched again by this worker
                    self._verify.pop(tp, None)  # the logged record cannot be read to be checked
                    first = max(pos, self._skip_below.get(tp, pos))
                    why = str(err)
                    if not why.startswith(type(err).__name__):  # aiokafka's errors name themselves
                        why = f"{type(err).__name__}: {why}"
                    if first <= end:
                        bad[tp] = (first, end, f"undecodable record batch (offsets {pos} to {end}): {why}")
                    log.warning("%s[%d]: skipping the undecodable record batch at offsets %d to %d: %s",
                                tp.topic, tp.partition, pos, end, why)
                    break
                if not got.get(tp):
                    break
                recs += got[tp]
            if recs:
                data[tp] = recs
        return data, bad

    async def _complete(self, p: InFlight) -> None:
        decoded = await p.decoded if p.decoded is not None else None
        if p.generation != self._rebalances:
            self._refetch(p)
            return
        work = self.process(p.records, p.offsets, decoded)
        work.firsts, work.lasts, work.records = p.firsts, p.lasts, p.records
        if p.undecodable:
            work.rejected = [*work.rejected, *p.undecodable]
            self.metrics.observe_dlq("undecodable_batch", len(p.undecodable))
        t = time.monotonic()
        await self.write_step.queue.put(work)
        if time.monotonic() - t > 1.0:
            self.clock.not_idle(time.monotonic())  # held up by the writer: not idleness

    def _same_topic(self, tp: TopicPartition, rec: Any) -> bool:
        """The first record fetched after an assignment, checked against the write log.

        The worker seeks to the last logged offset; the record there must be the one it
        logged (same Kafka timestamp and fingerprint). An earlier offset, or a different
        record, means the topic was recreated (or the in-memory broker restarted): the
        stored offsets belong to the old topic, so the new one is read from its
        beginning under a new epoch, not skipped into. A later offset means retention
        deleted the logged record: the topic is the same.
        """
        off, ts, fp = self._verify.pop(tp)
        if rec.offset > off or (rec.offset == off and _same_record(rec, ts, fp)):
            return True
        self._recreated(tp, f"its offsets start at {rec.offset}, below the stored {off}" if rec.offset < off
                        else f"the record at stored offset {off} is another record")
        assert self.consumer is not None
        self.consumer.seek(tp, 0)  # out of range (retention) resets to the earliest offset
        return False

    async def _probe(self, marks: dict[TopicPartition, tuple[int, int, int]]) -> dict[TopicPartition, str]:
        """Read the record at each logged offset with a consumer of no group; returns the
        partitions that are not the logged topic, with why. Undecided after 5 s (Kafka
        slow or down): left to the check of the first fetched record."""
        if not marks:
            return {}
        out: dict[TopicPartition, str] = {}
        c = AIOKafkaConsumer(bootstrap_servers=self.cfg.kafka, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest", **self.cfg.kafka_security.aiokafka_kwargs())
        try:
            await c.start()
            c.assign(list(marks))
            for tp, (off, _, _) in marks.items():
                c.seek(tp, off)
            pending = set(marks)
            deadline = time.monotonic() + 5.0
            while pending and time.monotonic() < deadline:
                data = await c.getmany(*pending, timeout_ms=500, max_records=len(pending))
                for tp in list(pending):
                    off, ts, fp = marks[tp]
                    recs = data.get(tp)
                    hw = c.highwater(tp)
                    if recs:
                        r = recs[0]
                        pending.discard(tp)
                        if r.offset < off:
                            out[tp] = f"its offsets restart at {r.offset}, below the stored {off}"
                        elif r.offset == off and not _same_record(r, ts, fp):
                            out[tp] = f"the record at stored offset {off} is another record"
                    elif hw is not None and hw <= off:
                        pending.discard(tp)
                        out[tp] = f"it ends at offset {hw}, at or before the stored {off}"
        except Exception as exc:  # noqa: BLE001 - the first fetched record is checked anyway
            log.warning("checking the stored offsets against the topic failed (%s): checking on fetch", exc)
        finally:
            with contextlib.suppress(Exception):
                await c.stop()
        return out

    def _recreated(self, tp: TopicPartition, why: str) -> None:
        """``tp`` is not the topic whose offsets are stored: forget them, new epoch."""
        log.warning("%s[%d] is not the topic whose offsets are stored (%s): it was recreated or the "
                    "broker lost its data; reading it from its beginning (epoch %d)", tp.topic, tp.partition,
                    why, self.log.epoch.get(tp, 0) + 1)
        self.metrics.sink_errors["topic_recreated"] += 1
        self.log.epoch[tp] = self.log.epoch.get(tp, 0) + 1
        self._verify.pop(tp, None)
        self._skip_below.pop(tp, None)
        self.log.forget(tp)

    def _refetch(self, stale: InFlight) -> None:
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

    def _decode(self, records: Sequence[Any]) -> DecodedBatch:
        """decode_batch with the wall clock for the event-time bounds (the scan needs
        event objects, so it turns the columnar path off)."""
        cfg = self.cfg
        return decode_batch(records, fast=self.scanner is None, now_ms=int(time.time() * 1000),
                            max_event_age_s=cfg.max_event_age_s, max_clock_skew_s=cfg.max_clock_skew_s)

    def process(self, records: Sequence[Any], offsets: dict[TopicPartition, int],
                decoded: DecodedBatch | None = None) -> Work:
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
                 decoded: DecodedBatch | None) -> Work:
        now = time.monotonic()
        wall_ms = int(time.time() * 1000)  # per-partition watermarks: idleness, upper bound
        m = self.metrics
        if decoded is None:
            decoded = self._decode(records)
        event_cols = None
        if decoded.n_events:
            enriched = enrich(decoded, self.prices, self.scanner)
            event_cols, wcols = to_columns(enriched)
            self.clock.add(wcols, wall_ms=wall_ms, now=now)
            m.observe_late(self.windows.last_late)
            m.observe_batch(wcols)
        for r in decoded.rejected:
            m.observe_dlq(r.reason_class)
        m.skipped_spans += decoded.skipped_spans
        m.batches += 1
        m.records += len(records)
        self.processed_records += len(records)
        # closed windows, the idle close on the wall clock, partial rows every emit interval
        windows = self.clock.advance(now=now, wall_ms=wall_ms, records=bool(records), cut_off=self._cut_off)
        m.observe_evicted("window_keys", self.windows.pop_evicted())
        return Work(event_cols, windows, decoded.rejected, offsets, watermark_ms=self.windows.watermark_ms)

    def _cut_off(self) -> bool:
        """True while the group's fetches say nothing about traffic (kafka_host.cut_off)."""
        return cut_off(self.consumer)

    # ------------------------------------------------------------------ write + commit
    async def _keepalive(self) -> None:
        """While ClickHouse is down: keep the group membership, fetch nothing more."""
        await hold(self.consumer)

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        """A write step is safe: resume fetching, commit its offsets (kafka_host)."""
        await commit_confirmed(self.consumer, offsets)

    @property
    def stored_events(self) -> int:
        """Events stored in ``llm_events`` (the write step's count)."""
        return self.write_step.stored_events

    # ------------------------------------------------------------------ rebalance
    async def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        if not revoked:
            return
        self._rebalances += 1
        # Keep what is open visible; the next owner rebuilds it from the stored rows.
        partial = self.clock.reset()
        if partial:
            # visibility only (the next owner rebuilds the open windows from stored rows):
            # dropped when the queue is full, so a ClickHouse outage cannot hold the
            # callback past the group's rebalance timeout here
            with contextlib.suppress(asyncio.QueueFull):
                self.write_step.queue.put_nowait(Work(None, partial, [], {}))
        # Everything processed so far is written (and committed) before the group moves
        # on: the next owner of a partition reads its stored offsets after this returns,
        # so it skips what this worker stored instead of storing it again.
        try:
            await asyncio.wait_for(self.write_step.queue.join(), self.cfg.revoke_drain_s)
        except TimeoutError:
            log.warning("revoked with writes still pending after %.0f s (ClickHouse slow or down); "
                        "the next owner may store some events again (FINAL collapses them)",
                        self.cfg.revoke_drain_s)
        self._assigned -= set(revoked)
        self._ready -= set(revoked)

    async def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        """Resume each partition after its write log, checking that it is the same topic.

        ClickHouse reads here are retried until they succeed (a partition is only made
        ready, and fetched, once its stored offsets are known); the consumer keeps
        its membership meanwhile (heartbeats run on their own task).
        """
        if not assigned:
            return
        self._rebalances += 1
        # this worker's own queued write steps land before the write log is read: a
        # partition it keeps (or gets back) would otherwise be fetched again from a stale
        # log and its records stored twice (bounded like the revoke drain)
        try:
            await asyncio.wait_for(self.write_step.queue.join(), self.cfg.revoke_drain_s)
        except TimeoutError:
            log.warning("assigned with writes still pending after %.0f s (ClickHouse slow or down)",
                        self.cfg.revoke_drain_s)
        self._assigned |= set(assigned)
        assert self.consumer is not None
        by_topic: dict[str, list[int]] = {}
        for tp in assigned:
            by_topic.setdefault(tp.topic, []).append(tp.partition)
        seek_to: dict[TopicPartition, int] = {}
        #: the highest watermark the write log recorded for these partitions: the windows
        #: that closed below it were written final and are not reopened
        closed_below: int | None = None
        for topic, parts in by_topic.items():
            marks = await self._ch_retry("reading the write log", self.sink.ingest_marks, topic, parts)
            for p in parts:
                tp = TopicPartition(topic, p)
                self.log.forget(tp)
                self._verify.pop(tp, None)
                if p in marks:
                    epoch, first, last, ts, fp, dlq_start, wm = marks[p]
                    if int(wm) > 0:
                        closed_below = max(closed_below or 0, int(wm))
                    self.log.epoch[tp] = int(epoch)
                    self.log.logged[tp] = int(last)
                    self._skip_below[tp] = int(last) + 1
                    self._verify[tp] = (int(last), int(ts), int(fp))
                    seek_to[tp] = int(last)  # read the logged record again: is it the same topic?
                    torn = await self._ch_retry("reading stored events", self.sink.stored_after, topic, p, int(last))
                    if torn:
                        self.log.torn[tp] = torn
                        log.info("%s[%d]: %d events past the write log (a write step cut short) will not be "
                                 "stored again", topic, p, len(torn))
                    outbox = await self._ch_retry("reading the DLQ outbox", self.sink.outbox, topic, p,
                                                  int(epoch), int(first), int(last))
                    await self.dlq.recover(tp, int(epoch), outbox, str(dlq_start), lambda: self._stopping)
                else:
                    # nothing logged: read from the committed offset (or the beginning); a
                    # first write step cut short may have stored events, not stored again
                    self._skip_below.pop(tp, None)
                    torn = await self._ch_retry("reading stored events", self.sink.stored_after, topic, p, -1)
                    if torn:
                        self.log.torn[tp] = torn
                        log.info("%s[%d]: %d events of a first write step cut short will not be stored again",
                                 topic, p, len(torn))
        # the record at each logged offset, read before fetching starts: a topic that ends
        # at or before it is not the logged topic (Tansu answers a fetch past the end
        # with nothing, not "out of range"; its ListOffsets is wrong, its high watermark right)
        fresh: set[TopicPartition] = set()
        for tp, why in (await self._probe({tp: self._verify[tp] for tp in assigned if tp in self._verify})).items():
            self._recreated(tp, why)
            seek_to[tp] = 0
            fresh.add(tp)
        # no await from here on: records fetched before this point were dropped (see
        # _fetch_and_process); fetching resumes at them, or at the logged record
        for tp in assigned:
            rewind = self._rewind.pop(tp, None)
            target = seek_to.get(tp)
            if target is None:
                target = rewind
            elif rewind is not None and tp not in self._verify and tp not in fresh:
                target = max(rewind, target)
            if target is not None:
                self.consumer.seek(tp, target)
        self._ready |= set(assigned)
        # rebuild open windows of every assigned partition from the rows of finished write steps
        self.clock.windows = WindowAggregator(self.cfg.window)
        wall_ms = int(time.time() * 1000)
        bounds = dict(self.log.logged)
        cols = await self._ch_retry("rebuilding windows", self.sink.call, lambda c: recent_rows(
            c, self.sink.database, sorted(self._assigned), self.cfg.window, wall_ms, bounds))
        self.clock.windows, n = rebuild(self.cfg.window, cols, closed_below, wall_ms)
        if n:
            self.clock.not_idle(time.monotonic())
            log.info("rebuilt %d open windows from %d stored events", self.windows.open_windows, n)



def _unpacking(exc: BaseException) -> bool:
    """True when ``exc`` was raised while aiokafka unpacked a fetched record batch
    (its ``PartitionRecords._unpack_records``): a codec library missing, corrupt
    compressed data, a bad CRC. Network and protocol errors are not."""
    from aiokafka.errors import CorruptRecordException, UnsupportedCodecError

    if isinstance(exc, (UnsupportedCodecError, CorruptRecordException)):
        return True
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_unpack_records":
            return True
        tb = tb.tb_next
    return False


def _failed_batch_end(exc: BaseException, pos: int) -> int:
    """The last offset of the record batch that raised ``exc`` at fetch position ``pos``:
    read from the batch header in aiokafka's unpacking frame (``next_offset - 1``);
    ``pos`` itself when that batch is not found (one offset skipped at a time)."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_unpack_records":
            batch = tb.tb_frame.f_locals.get("next_batch")
            nxt = getattr(batch, "next_offset", None)
            if isinstance(nxt, int) and nxt > pos:  # not a batch read before the failing one
                return nxt - 1
        tb = tb.tb_next
    return pos


def _same_record(rec: Any, ts: int, fp: int) -> bool:
    """Is ``rec`` the record the write log saw at its offset (Kafka timestamp and
    fingerprint)? A logged (0, 0) is a skipped undecodable batch, which has no record
    to fingerprint: it cannot be checked, and is taken as the same (were it taken as
    another record, the partition would be read again from its beginning, twice)."""
    return (ts, fp) == (0, 0) or (int(rec.timestamp) == ts and _fingerprint(rec) == fp)


def _fingerprint(rec: Any) -> int:
    """A record's identity beside its offset: CRC-32 of the value and of the key (UInt64)."""
    return (zlib.crc32(rec.value or b"") << 32) | zlib.crc32(rec.key or b"")
