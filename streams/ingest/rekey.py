"""Re-keying OTLP input: every (app, model) key on one partition of the events topic.

``driftline otlp`` and the Collector's Kafka exporter write whole OTLP requests to
``otlp_spans[.<suffix>]`` without a key, so one key's spans arrive on every partition.
With several workers, a key's windows, drift and alert state would then be split over
workers. The re-keyer is the repartition step of Kafka Streams (``through``) and of
faust (``group_by``): a consumer group of its own (``<group>.otlp-rekey``) decodes the
OTLP requests and produces one JSON ``LLMEvent`` per GenAI span to the events topic,
keyed ``app/model`` like every other producer of driftline. The worker's group then
reads them like any JSON event, so a key's state lives in the worker that owns its
partition, and a rebalance moves it whole.

    otlp_spans[.x] --(group <group>.otlp-rekey)--> decode (OTLP -> LLMEvent)
        -> events topic, key app/model, headers driftline-source-{topic,partition,offset,index}
        -> DLQ topic: undecodable requests, rejected spans (the request's bytes, the reason)
        -> ClickHouse ``rekey_log``: next offset + where later sends land  [the commit]
        -> Kafka offset commit (a hint)

Exactly once, without Kafka transactions (the local Tansu broker refuses idempotent
producers and transactions, and a user's Kafka may not allow them either): each
produced record carries its source (OTLP topic, partition, offset, index of the span
within the request) in headers, the same ``driftline-source-*`` headers as the DLQ.
After a batch is acknowledged, one ``rekey_log`` row per source partition records
``next_offset`` and, per partition of the events topic and of the DLQ, an offset at or
below which every later send lands. A new owner (after a rebalance, a crash, a
SIGKILL) resumes at ``next_offset`` and, for its first batch (and the next ones while
the previous owner sent past them), reads the events topic and the DLQ from those
offsets: a span whose source id is already there is not sent again
(``driftline_otlp_rekey_already_held``). A send that fails is retried the same
way, after reading what landed. On revocation the batch in flight finishes (sent and
logged) before the partition goes.

A partition with no ``rekey_log`` row yet resumes after the worker's ``ingest_log``
(a worker that decoded OTLP directly before, ``--otlp-direct``) or at the group's
position, and gets a first row before anything is sent, so every send has a row to
recover from.

What this does not cover: a producer retry inside the Kafka client after a lost
acknowledgement can store a record twice where the broker has no idempotent
producer (as for the DLQ); a topic recreated under the same name is not detected here
(the worker's ``ingest_log`` probe does that for the topics it reads).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from driftline.schemas.columns import REKEY_LOG_COLUMNS
from driftline.schemas.event import encode_event
from driftline.streams.ingest.kafka_host import failed_batch_end, read_alone, unpacking_error
from driftline.streams.ingest.kafka_security import KafkaSecurity
from driftline.streams.ingest.transforms import DecodedBatch, Rejected, decode_batch
from driftline.streams.sinks.clickhouse import ClickHouseSink
from driftline.streams.sinks.dlq import (
    REFUSED_RECORD,
    DeadLetters,
    SourceId,
    highwaters,
    now_utc,
    outbox_rows,
    source_ids,
)
from driftline.streams.sinks.prometheus import WorkerMetrics

log = logging.getLogger("driftline.rekey")

__all__ = ["RekeyConfig", "Rekeyer", "event_key", "source_headers"]

#: seconds between reads of the events topic's and the DLQ's ends (``events_start`` and
#: ``dlq_start`` of the log follow them, see :meth:`Rekeyer._refresh_ends`)
ENDS_REFRESH_S = 30.0

#: the DLQ index of a span the events topic refused (too large): 1 + its index in the
#: request; index 0 is the request's own rejection (undecodable, or some spans refused)
_REFUSED_BASE = 1


@dataclass(frozen=True)
class RekeyConfig:
    """Where the re-keyer reads (``sources``: OTLP topics) and writes (``target``: the
    events topic the worker's group reads; ``dlq_topic``), its consumer group, and the
    Kafka client settings (as the worker's)."""

    kafka: str
    sources: tuple[str, ...]
    target: str
    dlq_topic: str
    group_id: str
    security: KafkaSecurity = field(default_factory=KafkaSecurity)
    #: OTLP requests per fetch (each holds many spans)
    max_batch: int = 500
    session_timeout_ms: int = 10_000
    rebalance_timeout_ms: int = 75_000
    auto_offset_reset: str = "earliest"
    fetch_timeout_ms: int = 200

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("the re-keyer needs at least one OTLP topic")
        if self.target in self.sources or self.dlq_topic in self.sources:
            raise ValueError(f"the re-keyer cannot write to a topic it reads: {self.target}")
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")


def event_key(app: str, model: str) -> bytes:
    """The Kafka key of an event: ``app/model``, as ``driftline emit`` keys JSON events."""
    return f"{app}/{model}".encode()


def source_headers(topic: str, partition: int, offset: int, index: int) -> list[tuple[str, bytes]]:
    """The headers naming a re-keyed event's source (read back by ``dlq.source_ids``)."""
    return [("driftline-source-topic", topic.encode()), ("driftline-source-partition", str(partition).encode()),
            ("driftline-source-offset", str(offset).encode()), ("driftline-source-index", str(index).encode())]


@dataclass
class _Send:
    """One event to produce to the target topic."""

    src: SourceId
    key: bytes
    value: bytes


@dataclass
class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    revoked: Callable[[list[TopicPartition]], Awaitable[None]]
    assigned: Callable[[list[TopicPartition]], Awaitable[None]]

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.assigned(list(assigned))


class Rekeyer:
    """Reads OTLP topics in its own consumer group and re-produces their GenAI spans
    as JSON events keyed ``app/model`` (see the module docstring).

    ``sink``: the worker's ClickHouse sink (``rekey_log``, and ``ingest_log`` for a first
    start after direct decoding); ``ch_retry(what, fn, *args)``: the worker's retry of a
    ClickHouse read until it succeeds.
    """

    def __init__(self, cfg: RekeyConfig, sink: ClickHouseSink, metrics: WorkerMetrics,
                 ch_retry: Callable[..., Awaitable[Any]]) -> None:
        self.cfg = cfg
        self.sink = sink
        self.metrics = metrics
        self.ch_retry = ch_retry
        self.dlq = DeadLetters(cfg.kafka, cfg.dlq_topic, metrics, security=cfg.security, keepalive=self._hold)
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self._reader: AIOKafkaConsumer | None = None
        self._parts: list[TopicPartition] = []
        #: per target partition: an offset at or below which every later send of this re-keyer lands
        self._hw: dict[int, int] = {}
        #: per assigned source partition, until its first batch is logged: (events_start, dlq_start)
        #: to read for what a previous owner sent
        self._recover: dict[TopicPartition, tuple[dict[int, int], str]] = {}
        #: what the recovery read found (events topic, DLQ), kept for the next batches of the
        #: partition while the previous owner sent past them (it is gone: nothing new comes)
        self._found: dict[TopicPartition, tuple[set[SourceId], set[SourceId]]] = {}
        #: per partition: the position it was last sought back to (a gap in the records)
        self._sought: dict[TopicPartition, int] = {}
        #: per assigned source partition (its assignment handled): the next offset to re-key
        #: (None: never re-keyed, read from the group's position)
        self._pos: dict[TopicPartition, int | None] = {}
        #: assigned partitions with no rekey_log row yet
        self._unlogged: set[TopicPartition] = set()
        self._lock = asyncio.Lock()
        self._partitioner = DefaultPartitioner()
        self._stopping = False
        self._ends_due = time.monotonic() + ENDS_REFRESH_S
        self.rekeyed = 0
        self.already_held = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the producer, the reader of the target topic, the DLQ path and the group."""
        cfg, kw = self.cfg, self.cfg.security.aiokafka_kwargs()
        from driftline.streams.sinks.dlq import start_producer

        # one record batch per partition and send: 1 MiB, uncompressed (gzip would cost more CPU
        # than the decode); aiokafka keeps one batch in flight per partition, so small batches
        # would wait one round trip each
        self.producer = await start_producer(cfg.kafka, cfg.security, compression=None, max_batch_size=1 << 20)
        self._reader = AIOKafkaConsumer(bootstrap_servers=cfg.kafka, group_id=None, enable_auto_commit=False,
                                        auto_offset_reset="earliest", **kw)
        await self._reader.start()
        await self._reader.topics()
        self._parts = [TopicPartition(cfg.target, p)
                       for p in sorted(self._reader.partitions_for_topic(cfg.target) or {0})]
        self._reader.assign(self._parts)
        self._hw = await highwaters(self._reader, self._parts)
        await self.dlq.start()
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=cfg.kafka, group_id=cfg.group_id, enable_auto_commit=False,
            auto_offset_reset=cfg.auto_offset_reset, max_partition_fetch_bytes=16 << 20,
            fetch_max_bytes=64 << 20, max_poll_records=cfg.max_batch,
            session_timeout_ms=cfg.session_timeout_ms, rebalance_timeout_ms=cfg.rebalance_timeout_ms,
            heartbeat_interval_ms=max(500, min(3_000, cfg.session_timeout_ms // 4)),
            max_poll_interval_ms=600_000, **kw)
        self.consumer.subscribe(list(cfg.sources), listener=_Listener(self._on_revoked, self._on_assigned))
        await self.consumer.start()
        log.info("re-keying OTLP %s into %s (key app/model), group %s", ",".join(cfg.sources), cfg.target,
                 cfg.group_id)

    async def stop(self) -> None:
        """Leave the group (the batch in flight is finished by :meth:`run` first), close the clients."""
        self._stopping = True
        for c in (self.consumer, self._reader):
            if c is not None:
                with contextlib.suppress(Exception):
                    await c.stop()
        self.consumer = self._reader = None
        await self.dlq.stop()
        if self.producer is not None:
            with contextlib.suppress(Exception):
                await self.producer.stop()
            self.producer = None

    async def run(self, stop: asyncio.Event) -> None:
        """Re-key until ``stop`` is set; a batch started is finished (sent and logged)."""
        consumer = self.consumer
        assert consumer is not None
        while not stop.is_set():
            bad: dict[TopicPartition, tuple[Rejected, int]] = {}
            try:
                data = await consumer.getmany(timeout_ms=self.cfg.fetch_timeout_ms, max_records=self.cfg.max_batch)
            except Exception as exc:  # noqa: BLE001 - never ends the re-keyer
                if not unpacking_error(exc):
                    log.warning("OTLP re-keyer: fetch failed (%s: %s); retrying in 1 s", type(exc).__name__, exc)
                    await asyncio.sleep(1.0)
                    continue
                data, bad = await self._read_alone(consumer, exc)
            async with self._lock:
                for tp in sorted(set(data) | set(bad), key=lambda t: (t.topic, t.partition)):
                    recs = self._in_order(tp, data.get(tp, []))
                    if recs or tp in bad and tp in self._pos:
                        await self._rekey(tp, recs, bad.get(tp))
            if time.monotonic() >= self._ends_due:
                await self._refresh_ends()

    async def _refresh_ends(self) -> None:
        """Move the offsets the log records (events topic, DLQ) up to the topics' current
        ends, between batches (no send in flight: every later send lands at or after them).
        Without it a partition of the events topic this re-keyer never sends to (no OTLP key
        hashes there; JSON producers fill it) kept the end read at start, and every new
        owner's recovery read all of it written since, after each rebalance."""
        self._ends_due = time.monotonic() + ENDS_REFRESH_S
        async with self._lock:
            assert self._reader is not None
            for p, o in (await highwaters(self._reader, self._parts)).items():
                self._hw[p] = max(self._hw.get(p, 0), o)
            await self.dlq.refresh_ends()

    def _in_order(self, tp: TopicPartition, recs: list[Any]) -> list[Any]:
        """The records of ``tp`` that continue where it stands (:attr:`_pos`): none of a
        partition no longer assigned, none fetched from a position before the assignment
        was handled (the fetcher starts at the committed offset, a hint); after a gap the
        partition is sought back to its position; when the records still start past it
        after that, the offsets between are gone (retention deleted them while nobody
        re-keyed, a compacted topic, transaction markers): the partition goes on from there
        (sought back again each time, it never would). A partition never re-keyed before
        (position None) takes its records from where the group's position put it."""
        if tp not in self._pos:
            return []
        pos = self._pos[tp]
        if pos is None:
            return recs
        recs = [r for r in recs if r.offset >= pos]
        if recs and recs[0].offset != pos:
            if self._sought.get(tp) != pos:
                assert self.consumer is not None
                self.consumer.seek(tp, pos)
                self._sought[tp] = pos
                return []
            log.warning("OTLP re-keyer: %s[%d]: offsets %d to %d are not in the topic (deleted by retention, "
                        "compacted, or transaction markers): going on at %d", tp.topic, tp.partition, pos,
                        recs[0].offset - 1, recs[0].offset)
        if recs:
            self._sought.pop(tp, None)
        return recs

    async def _read_alone(self, consumer: AIOKafkaConsumer, exc: BaseException
                          ) -> tuple[dict[TopicPartition, list[Any]], dict[TopicPartition, tuple[Rejected, int]]]:
        """A fetched record batch cannot be unpacked: read each partition alone; a batch
        that raises is skipped and dead-lettered (empty value, the reason, its last offset)."""
        log.warning("OTLP re-keyer: a fetched record batch cannot be unpacked (%s: %s): reading each "
                    "partition alone", type(exc).__name__, exc)
        data: dict[TopicPartition, list[Any]] = {}
        bad: dict[TopicPartition, tuple[Rejected, int]] = {}
        for tp in sorted(self._pos, key=lambda t: (t.topic, t.partition)):
            if tp not in self._pos:  # revoked while an earlier partition was read
                continue
            at = self._pos[tp]
            try:  # a partition revoked meanwhile raises IllegalStateError here: left out
                if at is not None:
                    consumer.seek(tp, at)
                recs, err = await read_alone(consumer, tp, self.cfg.max_batch, self.cfg.fetch_timeout_ms)
                pos = await consumer.position(tp) if err is not None else 0
            except Exception as other:  # noqa: BLE001 - retried on the next round
                log.warning("OTLP re-keyer: %s[%d]: fetch failed (%s)", tp.topic, tp.partition, other)
                continue
            if recs:
                data[tp] = recs
            if err is not None:
                end = failed_batch_end(err, pos)
                with contextlib.suppress(Exception):  # revoked meanwhile: the next owner meets the batch
                    consumer.seek(tp, end + 1)
                bad[tp] = (Rejected(tp.topic, tp.partition, pos, None, b"",
                                    f"undecodable record batch (offsets {pos} to {end}): "
                                    f"{type(err).__name__}: {err}"), end)
        return data, bad

    # ------------------------------------------------------------------ rebalances
    async def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        """The batch in flight is sent and logged before the partitions go: the next owner
        then reads a log that covers everything this re-keyer sent."""
        async with self._lock:
            for tp in revoked:
                self._pos.pop(tp, None)
                self._sought.pop(tp, None)
                self._recover.pop(tp, None)
                self._found.pop(tp, None)
                self._unlogged.discard(tp)

    async def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        """Where each assigned partition resumes, and what its first batch must read to skip
        what a previous owner sent (see the module docstring)."""
        consumer = self.consumer
        assert consumer is not None
        async with self._lock:
            by_topic: dict[str, list[int]] = {}
            for tp in assigned:
                by_topic.setdefault(tp.topic, []).append(tp.partition)
            pos: dict[TopicPartition, int | None] = {}
            for topic, parts in by_topic.items():
                marks = await self.ch_retry("reading the rekey log", self.sink.rekey_marks, topic, parts)
                missing = [p for p in parts if p not in marks]
                direct = (await self.ch_retry("reading the write log", self.sink.ingest_marks, topic, missing)
                          if missing else {})
                for p in parts:
                    tp = TopicPartition(topic, p)
                    nxt: int | None = None
                    if p in marks:
                        nxt, events_start, dlq_start = marks[p]
                        self._found.pop(tp, None)
                        self._recover[tp] = ({int(k): int(v) for k, v in json.loads(events_start or "{}").items()},
                                             dlq_start)
                    elif p in direct:  # decoded directly by a worker before: resume after its write log
                        nxt = int(direct[p][2]) + 1
                    if nxt is not None:
                        consumer.seek(tp, nxt)
                    # None: never re-keyed, at the group's position (not asked here: the
                    # consumer's position waits for this callback); its first batch writes
                    # a first log row before sending anything
                    pos[tp] = nxt
                    if p not in marks:
                        self._unlogged.add(tp)
            self._pos.update(pos)

    # ------------------------------------------------------------------ one batch
    async def _rekey(self, tp: TopicPartition, records: list[Any], bad: tuple[Rejected, int] | None) -> None:
        """Decode one partition's records, send the events and the rejections (skipping what
        is already there when recovering), then log and commit the next offset."""
        decoded: DecodedBatch = await asyncio.to_thread(decode_batch, records, fast=False)
        sends: list[_Send] = []
        index: dict[int, int] = {}
        for ev, off in zip(decoded.events, decoded.offsets, strict=True):
            i = index[off] = index.get(off, -1) + 1
            sends.append(_Send((tp.topic, tp.partition, off, i), event_key(ev.app, ev.model), encode_event(ev)))
        rejected = [*([bad[0]] if bad is not None else []), *decoded.rejected]
        if tp in self._unlogged:  # a first row before anything of this partition is sent
            first = min([r.offset for r in records[:1]] + ([bad[0].offset] if bad is not None else []))
            await self._write_log([self._log_row(tp, first)])
            self._unlogged.discard(tp)
        outbox = outbox_rows(rejected, {})  # one rejection per request at most: index 0
        held: set[SourceId] = set()
        dlq_held: set[SourceId] = set()
        recovering = self._recover.get(tp)
        if recovering is not None:  # the first batches after an assignment: skip what is there
            if tp not in self._found:  # this partition's source ids only (the others' are not needed)
                ids, dlq_ids = await self._held(recovering[0]), await self._dlq_held(recovering[1])
                self._found[tp] = ({x for x in ids if x[:2] == (tp.topic, tp.partition)},
                                   {x for x in dlq_ids if x[:2] == (tp.topic, tp.partition)})
            held, dlq_held = self._found[tp]
            keep = [s for s in sends if s.src not in held]
            self._count_held(tp, len(sends) - len(keep))
            sends = keep
        outbox += await self._send_events(sends)
        if dlq_held:
            keep_rows = [r for r in outbox if (r["source_topic"], r["source_partition"], r["source_offset"],
                                               r["idx"]) not in dlq_held]
            self._count_held(tp, len(outbox) - len(keep_rows))
            outbox = keep_rows
        if outbox:
            await self.dlq.send(outbox)
        nxt = max(records[-1].offset if records else -1, bad[1] if bad is not None else -1) + 1
        await self._write_log([self._log_row(tp, nxt)])
        self._pos[tp] = nxt
        if not any(o >= nxt for _, _, o, _ in held | dlq_held):  # the previous owner sent past this
            # batch (it fetched larger ones): check the next ones too
            self._recover.pop(tp, None)
            self._found.pop(tp, None)
        if self.consumer is not None:
            with contextlib.suppress(Exception):  # a hint only: the rekey log is what a new owner reads
                await asyncio.wait_for(self.consumer.commit({tp: nxt}), 5.0)
        for r in rejected:
            self.metrics.observe_dlq(r.reason_class)
        self.metrics.skipped_spans += decoded.skipped_spans

    def _count_held(self, tp: TopicPartition, n: int) -> None:
        if n:
            log.warning("OTLP re-keyer: %s[%d]: %d record(s) were already sent by the previous owner: "
                        "not sent again", tp.topic, tp.partition, n)
            self.already_held += n
            self.metrics.rekey_already_held += n

    async def _held(self, starts: Mapping[int, int]) -> set[SourceId]:
        """Source ids in the target topic from ``starts`` (retried while Kafka is down)."""
        while True:
            try:
                assert self._reader is not None
                return await source_ids(self._reader, self._parts, starts)
            except Exception as exc:  # noqa: BLE001 - Kafka down: wait for it
                if self._stopping:
                    raise
                log.warning("OTLP re-keyer: reading %s failed, retrying: %r", self.cfg.target, exc)
                await self._hold_for(1.0)

    async def _dlq_held(self, dlq_start: str) -> set[SourceId]:
        """Source ids in the DLQ from ``dlq_start`` (retried while Kafka is down)."""
        while True:
            try:
                return await self.dlq.held(dlq_start)
            except Exception as exc:  # noqa: BLE001 - Kafka down: wait for it
                if self._stopping:
                    raise
                log.warning("OTLP re-keyer: reading the DLQ failed, retrying: %r", exc)
                await self._hold_for(1.0)

    async def _send_events(self, sends: Sequence[_Send]) -> list[dict[str, Any]]:
        """Produce ``sends`` until the target topic holds each one: a failed send is sent
        again only when a read of the topic (from before this batch) does not find it.
        Returns DLQ rows for the events the topic refused for themselves (too large)."""
        starts = dict(self._hw)
        pending = list(sends)
        refused: list[dict[str, Any]] = []
        delay = 0.2
        while pending:
            failed = []
            for s, res in await self._send_all(pending):
                if not isinstance(res, BaseException):
                    part, offset = res
                    self._hw[part] = max(self._hw.get(part, 0), offset + 1)
                    self.rekeyed += 1
                    self.metrics.rekeyed += 1
                elif isinstance(res, REFUSED_RECORD):
                    topic, part, off, i = s.src
                    refused.append({
                        "source_topic": topic, "source_partition": part, "epoch": 0, "source_offset": off,
                        "idx": _REFUSED_BASE + i, "key": s.key, "value": s.value, "field": "",
                        "reason": f"otlp: span {i} of the request: {self.cfg.target} refused its event "
                                  f"({len(s.value)} bytes): {type(res).__name__}: {res}",
                        "written_at": now_utc()})
                    self.metrics.observe_dlq("otlp")
                else:
                    failed.append(s)
            if failed:
                log.warning("OTLP re-keyer: %d send(s) to %s failed, retrying in %.1fs", len(failed),
                            self.cfg.target, delay)
                await self._hold_for(delay)
                delay = min(10.0, delay * 2)
                held = await self._held(starts)
                failed = [s for s in failed if s.src not in held]
            pending = failed
        return refused

    async def _send_all(self, sends: Sequence[_Send]) -> list[tuple[_Send, Any]]:
        """Send in record batches per partition (aiokafka's ``create_batch``/``send_batch``:
        a ``send`` per record costs ~20 times more), the partition chosen by the producer's
        own partitioner on the key (as ``driftline emit`` and any keyed producer); then
        await each batch: (send, (partition, offset)) or (send, the error), per send."""
        producer = self.producer
        if producer is None:
            return [(s, RuntimeError("the re-keyer's producer is closed")) for s in sends]
        ids = [tp.partition for tp in self._parts]
        by_part: dict[int, list[_Send]] = {}
        for s in sends:
            by_part.setdefault(self._partitioner(s.key, ids, ids), []).append(s)
        queued: list[tuple[list[_Send], Any]] = []
        for part, group in by_part.items():
            queued += await self._queue_partition(producer, part, group)
        out: list[tuple[_Send, Any]] = []
        for members, fut in queued:
            res: Any = fut
            if not isinstance(fut, BaseException):
                try:
                    res = await fut
                except Exception as exc:  # noqa: BLE001 - sorted by the caller
                    res = exc
            if isinstance(res, REFUSED_RECORD) and len(members) > 1:
                # the record batch was too large for the topic (its max.message.bytes below the
                # client's batch size), not each record: each alone, so only a record too large
                # by itself goes to the DLQ
                for s in members:
                    out += await self._send_all([s])
            elif isinstance(res, BaseException):
                out += [(s, res) for s in members]
            else:
                out += [(s, (res.partition, int(res.offset) + i)) for i, s in enumerate(members)]
        return out

    async def _queue_partition(self, producer: AIOKafkaProducer, part: int, group: list[_Send]
                               ) -> list[tuple[list[_Send], Any]]:
        """Queue ``group`` on partition ``part`` in full record batches: (members, future or error)."""
        topic = self.cfg.target
        queued: list[tuple[list[_Send], Any]] = []

        async def flush(batch: Any, members: list[_Send]) -> None:
            batch.close()
            try:
                queued.append((members, await producer.send_batch(batch, topic, partition=part)))
            except Exception as exc:  # noqa: BLE001 - sorted by the caller
                queued.append((members, exc))

        batch, members = producer.create_batch(), []
        for s in group:
            headers = source_headers(*s.src)
            if batch.append(key=s.key, value=s.value, timestamp=None, headers=headers) is not None:
                members.append(s)
                continue
            if members:
                await flush(batch, members)
            batch, members = producer.create_batch(), []
            if batch.append(key=s.key, value=s.value, timestamp=None, headers=headers) is not None:
                members.append(s)
                continue
            try:  # larger than a batch: alone (the broker may refuse it: to the DLQ then)
                queued.append(([s], await producer.send(topic, s.value, key=s.key, partition=part, headers=headers)))
            except Exception as exc:  # noqa: BLE001 - sorted by the caller
                queued.append(([s], exc))
        if members:
            await flush(batch, members)
        return queued

    # ------------------------------------------------------------------ the log
    def _log_row(self, tp: TopicPartition, next_offset: int) -> dict[str, Any]:
        """A ``rekey_log`` row: ``tp`` resumes at ``next_offset``; later sends land at or after
        the offsets recorded now (this re-keyer's next sends follow its acknowledged ones)."""
        return {"source_topic": tp.topic, "source_partition": tp.partition, "next_offset": next_offset,
                "events_start": json.dumps({str(p): o for p, o in sorted(self._hw.items())}),
                "dlq_start": self.dlq.ends(), "written_at": now_utc()}

    async def _write_log(self, rows: list[dict[str, Any]], *, keepalive: bool = True) -> None:
        """Insert ``rows`` into ``rekey_log``, retried until ClickHouse takes them (the
        group membership kept meanwhile, with ``keepalive``)."""
        if rows:
            await self.sink.insert_rows("rekey_log", rows, REKEY_LOG_COLUMNS, self._hold if keepalive else None)

    async def _hold(self) -> None:
        """While a sink is down: keep the group membership, fetch nothing."""
        c = self.consumer
        if c is not None and c.assignment():
            parts = c.assignment()
            c.pause(*parts)
            with contextlib.suppress(Exception):
                await c.getmany(timeout_ms=0)
            c.resume(*parts)

    async def _hold_for(self, delay: float) -> None:
        end = time.monotonic() + delay
        while time.monotonic() < end:
            await self._hold()
            await asyncio.sleep(min(0.5, max(0.0, end - time.monotonic())))
