"""The stream worker: Kafka -> decode -> enrich -> windows -> ClickHouse (+ DLQ, metrics).

The composition of the spine's parts (the whole pipeline, stages included, reads in
streams/wiring.py): the Kafka host (streams/ingest/kafka_host.py: consumer group,
fetch loop, poison, rebalances, commits), the process step here (plain functions of
streams/ingest/transforms.py, the windows of streams/stages/windows.py on the wall
clock), the write step (streams/sinks/write_step.py) and the DLQ
(streams/sinks/dlq.py); the window rebuild after a rebalance is
streams/stages/window_restore.py.

    consumer group (librdkafka or aiokafka, batches)      [fetch]
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
records reach it through a consumer group of its own (aiokafka by default; librdkafka,
streams/ingest/librdkafka_host.py, with ``--consumer librdkafka``) in batches of thousands.
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
  record at the logged offset is read back before fetching (``KafkaHost._probe``) and
  again on the first fetch (``KafkaHost._same_topic``); a topic that ends before it, restarts below
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from aiokafka import AIOKafkaConsumer, TopicPartition

from driftline.detectors.redact import Redaction
from driftline.schemas.topics import (
    CONTROL_TOPIC,
    DLQ_TOPIC,
    EVENTS_TOPIC,
    OTLP_TOPIC,
    is_otlp_topic,
)
from driftline.streams.ingest.kafka_host import HostHooks, InFlight, KafkaHost, LogMark
from driftline.streams.ingest.kafka_security import KafkaSecurity
from driftline.streams.ingest.rekey import RekeyConfig, Rekeyer
from driftline.streams.ingest.transforms import (
    DEFAULT_MAX_CLOCK_SKEW_S,
    DEFAULT_MAX_EVENT_AGE_S,
    DecodedBatch,
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
    #: the OTLP topics of ``topics`` are re-keyed (streams/ingest/rekey.py): decoded in a group
    #: of their own and re-produced to :attr:`rekey_target` keyed app/model, so that each key
    #: lives in one worker whatever the input. False: decoded by the worker that reads them
    #: (a key's spans then reach every worker: correct with ONE worker only; ``--otlp-direct``)
    otlp_rekey: bool = False
    #: the group's Kafka client (``--consumer``): "aiokafka" (streams/ingest/kafka_host.py, the
    #: default) or "librdkafka" (confluent-kafka, streams/ingest/librdkafka_host.py: less CPU
    #: per record on the worker's threads); same guarantees (README "Kafka client")
    consumer: str = "aiokafka"

    def __post_init__(self) -> None:
        if self.consumer not in ("aiokafka", "librdkafka"):
            raise ValueError(f"consumer must be aiokafka or librdkafka, not {self.consumer!r}")
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
        if self.rekey_sources and self.rekey_target == self.dlq_topic:
            raise ValueError(f"OTLP events cannot be re-keyed into the DLQ topic {self.dlq_topic}")

    @property
    def rekey_sources(self) -> tuple[str, ...]:
        """The OTLP topics the re-keyer reads (none unless :attr:`otlp_rekey`)."""
        return tuple(t for t in self.topics if is_otlp_topic(t)) if self.otlp_rekey else ()

    @property
    def rekey_target(self) -> str:
        """Where re-keyed OTLP events go: the first JSON topic of ``topics``, else ``llm.events``."""
        return next((t for t in self.topics if not is_otlp_topic(t)), EVENTS_TOPIC)

    @property
    def host_topics(self) -> tuple[str, ...]:
        """The topics the worker's group reads: ``topics``, or with re-keying their JSON
        topics (the re-keyer's target among them)."""
        if not self.rekey_sources:
            return self.topics
        return tuple(t for t in self.topics if not is_otlp_topic(t)) or (self.rekey_target,)


@runtime_checkable
class Stage(Protocol):
    """A part of the stream that runs beside the spine (alerting, drift).

    ``start`` is awaited once the worker is consuming, with the stage's ports
    (streams/ports.py: a writer for its ``tables``, metrics, a view of the open
    windows, …; never the worker itself); ``on_stored`` is called in the writer after
    each batch is safe in ClickHouse and must be cheap and never block (queue heavy
    work onto a task of your own); an exception it raises is logged and counted,
    never propagated. ``stop`` is awaited when the worker stops, after the last batch.

    Optional rebalance hooks (looked up with ``getattr``; an exception is logged and
    counted, never propagated): ``async on_revoked()`` before the partitions go, after the
    worker's queued writes landed; ``async on_assigned(partitions)`` once the open windows
    of every assigned partition are rebuilt (also after ``start`` when partitions were
    assigned before the stage started: it may be called twice for one assignment).
    """

    name: str
    #: the tables the stage writes (its ``StagePorts.tables`` refuses the others)
    tables: tuple[str, ...]

    async def start(self, ports: StagePorts) -> None: ...

    def on_stored(self, batch: StoredBatch) -> None: ...

    async def stop(self) -> None: ...


def librdkafka_host(cfg: WorkerConfig, hooks: HostHooks, pool: concurrent.futures.Executor) -> KafkaHost:
    """The consumer group on confluent-kafka (imported only when chosen)."""
    from driftline.streams.ingest.librdkafka_host import LibrdkafkaHost

    return LibrdkafkaHost(cfg, hooks, pool)


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


class Worker:
    """Runs the pipeline against Kafka and ClickHouse. ``await run(stop)``; no faust needed.

    The parts: :attr:`host` (the consumer group), the process step (:meth:`process`:
    decode, enrich, columns, windows on :attr:`clock`), :attr:`write_step` (ClickHouse,
    then :attr:`dlq`), and the stages fed after each write step.
    """

    def __init__(self, config: WorkerConfig, metrics: WorkerMetrics | None = None,
                 sink: ClickHouseSink | None = None, stages: Sequence[Stage] = (), *,
                 prices: Any = None, scanner: Any = None) -> None:
        """The parts left None are built from ``config`` as streams/wiring.py builds them."""
        self.cfg = config
        self.metrics = metrics or WorkerMetrics()
        self.sink = sink or clickhouse_sink(config, self.metrics)
        self.prices = prices if prices is not None else load_prices(config)
        self.scanner: Any = scanner if scanner is not None else load_scanner(config)
        self.stages: list[Stage] = list(stages)
        #: the windows, closed and emitted on the wall clock (streams/stages/windows.py)
        self.clock = WindowClock(config.window, idle_close_s=config.idle_close_s,
                                 emit_interval_s=config.emit_interval_s, now=time.monotonic())
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="driftline-decode")
        hooks = HostHooks(decode=self._decode, deliver=self._deliver, revoke=self._revoke, resume=self._resume,
                          recreated=self._recreated, assigned=self._rebuild_windows)
        #: the consumer group: fetch, poison, rebalances, commits (streams/ingest/kafka_host.py)
        self.host = KafkaHost(config, hooks, self._decode_pool) if config.consumer == "aiokafka" \
            else librdkafka_host(config, hooks, self._decode_pool)
        #: per partition: the write log's epoch, last offset, events of a step cut short
        self.log = WriteLog()
        #: the outbox -> DLQ topic path (streams/sinks/dlq.py)
        self.dlq = DeadLetters(config.kafka, config.dlq_topic, self.metrics, security=config.kafka_security,
                               keepalive=self.host.hold)
        #: llm_events, dlq_outbox, llm_window_metrics, ingest_log; the DLQ; the safe offsets
        self.write_step = WriteStep(self.sink, self.dlq, self.log, self.metrics, stages=self.stages,
                                    redaction=config.redaction, on_safe=self.host.commit,
                                    keepalive=self.host.hold, max_insert_rows=config.max_insert_rows,
                                    min_insert_rows=config.min_insert_rows, insert_linger_s=config.insert_linger_s)
        #: OTLP topics -> the events topic keyed app/model (streams/ingest/rekey.py), or None
        self.rekeyer = self._rekeyer() if config.rekey_sources else None
        #: the highest watermark the write log recorded for the partitions being assigned
        self._closed_below: int | None = None
        self._stopping = False
        #: the stages started so far: the ones the rebalance hooks are called on
        self._hooked: list[Stage] = []
        self.processed_records = 0
        self.started = asyncio.Event()

    # ------------------------------------------------------------------ what the parts hold
    @property
    def windows(self) -> WindowAggregator:
        """The open windows (replaced on each rebalance)."""
        return self.clock.windows

    @property
    def stored_events(self) -> int:
        """Events stored in ``llm_events`` (the write step's count)."""
        return self.write_step.stored_events

    @property
    def dead_lettered(self) -> int:
        """Records the DLQ topic took (streams/sinks/dlq.py), the OTLP re-keyer's included."""
        return self.dlq.dead_lettered + (self.rekeyer.dlq.dead_lettered if self.rekeyer is not None else 0)

    @property
    def consumer(self) -> AIOKafkaConsumer | None:
        """The group's consumer (the host's; None before start and after stop)."""
        return self.host.consumer

    @property
    def _ready(self) -> set[TopicPartition]:
        """The partitions being fetched (their assignment handled)."""
        return self.host.ready

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        cfg = self.cfg
        if cfg.create_topics:
            from driftline.streams.local.broker import DEFAULT_TOPICS, ensure_topics

            want = {t: DEFAULT_TOPICS.get(t, 1) for t in (*cfg.topics, *cfg.host_topics, cfg.dlq_topic,
                                                          CONTROL_TOPIC)}
            await asyncio.to_thread(ensure_topics, cfg.kafka, want, security=cfg.kafka_security)
        await self._ch_retry("creating the schema", self.sink.ensure_schema)
        if cfg.kafka_security.security_protocol != "PLAINTEXT":
            log.info("Kafka security: %s", cfg.kafka_security.describe())
            cfg.kafka_security.warn_cleartext(cfg.kafka)
        await self.dlq.start()
        await self.host.start()
        if self.rekeyer is not None:
            await self.rekeyer.start()
        log.info("worker consuming %s from %s into %s (database %s) through %s", ",".join(cfg.host_topics),
                 cfg.kafka, redact_url(cfg.clickhouse), self.sink.database, cfg.consumer)

    def _rekeyer(self) -> Rekeyer:
        """The OTLP re-keyer of this worker's config: its own group ``<group>.otlp-rekey``."""
        cfg = self.cfg
        rc = RekeyConfig(kafka=cfg.kafka, sources=cfg.rekey_sources, target=cfg.rekey_target,
                         dlq_topic=cfg.dlq_topic, group_id=f"{cfg.group_id}.otlp-rekey",
                         security=cfg.kafka_security, session_timeout_ms=cfg.session_timeout_ms,
                         rebalance_timeout_ms=cfg.rebalance_timeout_ms, auto_offset_reset=cfg.auto_offset_reset,
                         fetch_timeout_ms=cfg.fetch_timeout_ms)
        return Rekeyer(rc, self.sink, self.metrics, self._ch_retry)

    async def _ch_retry(self, what: str, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on a thread, retried with backoff (logged) until it succeeds:
        for the reads and DDL that start-up and rebalances need from ClickHouse."""
        delay, attempt = 0.2, 0
        while True:
            attempt += 1
            try:
                return await asyncio.to_thread(fn, *args)
            except Exception as exc:  # noqa: BLE001 - ClickHouse down: wait for it
                count_sink_error(self.metrics, f"{what.split(' ')[0]} (read)", exc)
                log.warning("ClickHouse %s failed (attempt %d), retrying in %.1fs: %s", what, attempt, delay,
                            redact_urls_in(str(exc)))
                if self._stopping:
                    raise
                await asyncio.sleep(delay)
                delay = min(10.0, delay * 2)

    async def stop(self) -> None:
        self._stopping = True
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        if self.rekeyer is not None:
            await self.rekeyer.stop()
        # the consumer first: stopping it waits for a rebalance callback in flight, which
        # may be reading the DLQ (recovery) through the reader closed after it
        await self.host.stop()
        await self.dlq.stop()

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; then write what is in flight and commit it.

        ``stop`` also ends the start-up, which waits for ClickHouse as long as it takes
        (SIGINT/SIGTERM stopped nothing while ClickHouse was unreachable)."""
        if not await self._started(stop):
            return
        await self.write_step.start()
        started: list[Stage] = []
        rekey_stop = asyncio.Event()
        rekeying: asyncio.Task[None] | None = None
        try:
            for st in self.stages:
                await st.start(self.ports_for(st))
                started.append(st)
                self._hooked.append(st)
                if self.host.ready:  # assigned before the stage started: it learns its partitions now
                    await self._stage_hook("on_assigned", sorted(self.host.assigned), only=st)
            # What start-up allocated (modules, model, price table, rules) lives as long as
            # the worker: move it out of the collector's generations, so the full
            # collections that each batch's garbage triggers do not walk it again
            # (Instagram's gc.freeze pattern; the collector stays on for new objects).
            gc.collect()
            gc.freeze()
            self.started.set()
            if self.rekeyer is not None:
                rekeying = asyncio.create_task(self.rekeyer.run(rekey_stop), name="driftline-rekey")
            while not stop.is_set():
                await self.host.fetch()
                self.write_step.raise_if_failed()  # a writer bug; sink failures never get here
                if rekeying is not None and rekeying.done():
                    rekeying.result()  # a re-keyer bug; Kafka and ClickHouse failures never get here
            await self.host.finish()  # the batch still being decoded is written too
        finally:
            await self._stop_rekeying(rekey_stop, rekeying)
            await self._shut_down(started)

    async def _stop_rekeying(self, rekey_stop: asyncio.Event, rekeying: asyncio.Task[None] | None) -> None:
        """Let the re-keyer finish its batch in flight (sent and logged; bounded like the
        revoke drain), so the next owner of its partitions resumes after it."""
        rekey_stop.set()
        if rekeying is None:
            return
        done, _ = await asyncio.wait({rekeying}, timeout=self.cfg.revoke_drain_s)
        if not done:
            log.warning("the OTLP re-keyer's batch in flight did not finish in %.0f s: the next owner "
                        "reads what it sent and skips it", self.cfg.revoke_drain_s)
            rekeying.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await rekeying

    async def _started(self, stop: asyncio.Event) -> bool:
        """Run :meth:`start` until it completes (True) or ``stop`` is set (False, stopped)."""
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
            return False
        starting.result()
        return True

    async def _shut_down(self, started: list[Stage]) -> None:
        """Write the open windows and what is queued, stop the stages (in reverse), then the clients."""
        with contextlib.suppress(Exception):
            # windows still open are stored as partial rows: visible, and rebuilt on restart
            await self.write_step.batches.add(Work(None, self.windows.partial(), [], {}))
        await self.write_step.shutdown()  # a writer bug is logged there
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
                          windows=WindowView(lambda: self.windows, self.host.cut_off),
                          kafka=KafkaPort(cfg.kafka, cfg.kafka_security),
                          control=ControlAuth(cfg.control_secret, cfg.control_max_age_s),
                          redaction=cfg.redaction, topics=cfg.host_topics)

    def request_flush(self) -> None:
        """Write the open windows as partial rows with the next batch."""
        self.clock.request_flush()

    # ------------------------------------------------------------------ process
    def _decode(self, records: Sequence[Any]) -> DecodedBatch:
        """decode_batch with the wall clock for the event-time bounds (the scan needs
        event objects, so it turns the columnar path off)."""
        cfg = self.cfg
        return decode_batch(records, fast=self.scanner is None, now_ms=int(time.time() * 1000),
                            max_event_age_s=cfg.max_event_age_s, max_clock_skew_s=cfg.max_clock_skew_s)

    async def _deliver(self, p: InFlight, decoded: DecodedBatch | None) -> None:
        """A fetched batch of the current generation: process it, queue it for the writer
        (waiting while the queue is full: backpressure)."""
        work = self.process(p.records, p.offsets, decoded)
        work.firsts, work.lasts, work.records = p.firsts, p.lasts, p.records
        if p.undecodable:
            work.rejected = [*work.rejected, *p.undecodable]
            self.metrics.observe_dlq("undecodable_batch", len(p.undecodable))
        t = time.monotonic()
        await self.write_step.batches.add(work)
        if time.monotonic() - t > 1.0:
            self.clock.not_idle(time.monotonic())  # held up by the writer: not idleness

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
        windows = self.clock.advance(now=now, wall_ms=wall_ms, records=bool(records), cut_off=self.host.cut_off)
        m.observe_evicted("window_keys", self.windows.pop_evicted())
        return Work(event_cols, windows, decoded.rejected, offsets, watermark_ms=self.windows.watermark_ms)

    # ------------------------------------------------------------------ rebalance (the host's hooks)
    async def _revoke(self) -> None:
        """Partitions go: keep what is open visible, then let the queued writes land."""
        partial = self.clock.reset()
        if partial:
            # visibility only (the next owner rebuilds the open windows from stored rows):
            # dropped when the queue is full, so a ClickHouse outage cannot hold the
            # callback past the group's rebalance timeout here
            with contextlib.suppress(asyncio.QueueFull):
                self.write_step.batches.add_nowait(Work(None, partial, [], {}))
        # Everything processed so far is written (and committed) before the group moves
        # on: the next owner of a partition reads its stored offsets after this returns,
        # so it skips what this worker stored instead of storing it again.
        if not await self.write_step.drain(self.cfg.revoke_drain_s):
            log.warning("revoked with writes still pending after %.0f s (ClickHouse slow or down); "
                        "the next owner may store some events again (FINAL collapses them)",
                        self.cfg.revoke_drain_s)
        await self._stage_hook("on_revoked")  # the stages drop the state of their keys

    async def _resume(self, assigned: list[TopicPartition]) -> dict[TopicPartition, LogMark]:
        """Partitions come: where each resumes, from the write log (retried until read)."""
        # this worker's own queued write steps land before the write log is read: a
        # partition it keeps (or gets back) would otherwise be fetched again from a stale
        # log and its records stored twice (bounded like the revoke drain)
        if not await self.write_step.drain(self.cfg.revoke_drain_s):
            log.warning("assigned with writes still pending after %.0f s (ClickHouse slow or down)",
                        self.cfg.revoke_drain_s)
        marks, self._closed_below = await self.write_step.resume(assigned, self._ch_retry, lambda: self._stopping)
        return marks

    def _recreated(self, tp: TopicPartition, why: str) -> None:
        """``tp`` is not the topic whose offsets are stored: forget them, new epoch."""
        epoch = self.log.epoch.get(tp, 0) + 1
        log.warning("%s[%d] is not the topic whose offsets are stored (%s): it was recreated or the "
                    "broker lost its data; reading it from its beginning (epoch %d)", tp.topic, tp.partition,
                    why, epoch)
        self.metrics.sink_errors["topic_recreated"] += 1
        self.log.epoch[tp] = epoch
        self.log.forget(tp)

    async def _rebuild_windows(self, assigned: list[TopicPartition]) -> None:
        """Rebuild the open windows of every assigned partition from the rows of finished write steps."""
        self.clock.windows = WindowAggregator(self.cfg.window)
        wall_ms = int(time.time() * 1000)
        bounds = dict(self.log.logged)
        cols = await self._ch_retry("rebuilding windows", self.sink.call, lambda c: recent_rows(
            c, self.sink.database, assigned, self.cfg.window, wall_ms, bounds))
        n = rebuild(self.clock.windows, cols, self._closed_below, wall_ms)
        if n:
            self.clock.not_idle(time.monotonic())
            log.info("rebuilt %d open windows from %d stored events", self.windows.open_windows, n)
        await self._stage_hook("on_assigned", assigned)  # the stages restore their keys' state

    async def _stage_hook(self, hook: str, *args: Any, only: Stage | None = None) -> None:
        """Await the optional rebalance ``hook`` of every started stage (or of ``only``);
        a failure is logged and counted in ``stage_errors``, never propagated."""
        for st in (only,) if only is not None else tuple(self._hooked):
            fn = getattr(st, hook, None)
            if fn is None:
                continue
            try:
                await fn(*args)
            except Exception:  # noqa: BLE001 - a stage never takes the rebalance down
                log.exception("stage %s: %s failed", st.name, hook)
                self.metrics.stage_errors[st.name] += 1
