"""The dead-letter path: ``dlq_outbox`` rows -> the DLQ topic, sent once.

A write step stores its rejected records in the ``dlq_outbox`` table first
(:func:`outbox_rows`), keyed by source offset and index; once the write log holds
the step, :meth:`DeadLetters.send` sends them to the DLQ topic, retried until
Kafka takes each one. A worker killed between the write log and the sends
leaves rows the DLQ does not hold: the next owner of the partition reads the
DLQ from where the log says the step's sends would land (:meth:`DeadLetters.ends`,
recorded in ``ingest_log.dlq_start``) and sends the missing ones
(:meth:`DeadLetters.recover`).

The class is given only what it uses: the Kafka address and security, the DLQ
topic, the metrics, and a ``keepalive`` the host calls while the DLQ is down
(it keeps the consumer group's membership, fetching nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from driftline.streams.ingest.kafka_security import KafkaSecurity
from driftline.streams.ingest.transforms import Rejected
from driftline.streams.sinks.prometheus import WorkerMetrics

log = logging.getLogger("driftline.worker")

__all__ = ["DeadLetters", "outbox_rows", "dlq_stub", "dlq_headers", "start_producer", "highwaters",
           "source_ids", "SourceId", "REFUSED_RECORD"]

#: the (source topic, partition, offset, index) of a dead-lettered record
SourceId = tuple[str, int, int, int]


def now_utc() -> dt.datetime:
    """The wall clock, timezone-aware (``written_at`` of the outbox and the write log)."""
    return dt.datetime.now(dt.UTC)


def outbox_rows(rejected: Sequence[Rejected], epochs: Mapping[TopicPartition, int]) -> list[dict[str, Any]]:
    """The ``dlq_outbox`` rows of a write step's rejected records: each numbered
    (``idx``) among the rejections of its source record, under its partition's epoch."""
    now = now_utc()
    seen: dict[tuple[str, int, int], int] = {}
    rows = []
    for r in rejected:
        k = (r.topic, r.partition, r.offset)
        idx = seen[k] = seen.get(k, -1) + 1
        rows.append({"source_topic": r.topic, "source_partition": r.partition,
                     "epoch": epochs.get(TopicPartition(r.topic, r.partition), 0), "source_offset": r.offset,
                     "idx": idx, "key": r.key, "value": r.value, "reason": r.reason, "field": r.field or "",
                     "written_at": now})
    return rows


def _refused_record_errors() -> tuple[type[BaseException], ...]:
    """Producer errors that refuse the record itself: retrying it as it is cannot pass."""
    import aiokafka.errors as ke

    names = ("MessageSizeTooLargeError", "RecordTooLargeError", "RecordListTooLargeError",
             "CorruptRecordException", "InvalidRecordError")
    return tuple(getattr(ke, n) for n in names if isinstance(getattr(ke, n, None), type))


REFUSED_RECORD = _refused_record_errors()


def dlq_stub(row: dict[str, Any]) -> dict[str, Any]:
    """An outbox row whose record Kafka refused: the same source headers (so recovery
    finds it), no value, the key cut to 1 KiB, the value's length and SHA-256 in the reason."""
    value = row["value"] or b""
    digest = hashlib.sha256(value).hexdigest()
    out = dict(row)
    out["stub"] = True
    out["value"] = b""
    out["key"] = row["key"][:1024] if row["key"] else row["key"]
    out["reason"] = f"{row['reason']} [value of {len(value)} bytes left out: the DLQ refused it; sha256 {digest}]"
    return out


def dlq_headers(row: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The DLQ headers of an outbox row: :meth:`Rejected.dlq_headers` (reason, source
    topic/partition/offset, field) and the row's index among its record's rejections."""
    r = Rejected(row["source_topic"], int(row["source_partition"]), int(row["source_offset"]), row["key"],
                 row["value"], str(row["reason"]), str(row["field"]) or None)
    return [*r.dlq_headers(), ("driftline-source-index", str(row["idx"]).encode())]


def _source_id(headers: Any) -> SourceId | None:
    """The source of a DLQ record from its ``driftline-source-*`` headers (None without them)."""
    h = dict(headers or ())
    try:
        return (h["driftline-source-topic"].decode(), int(h["driftline-source-partition"]),
                int(h["driftline-source-offset"]), int(h.get("driftline-source-index", b"0")))
    except (KeyError, ValueError):
        return None


async def start_producer(kafka: str, security: KafkaSecurity | None = None, *,
                         compression: str | None = "gzip", max_batch_size: int = 16384) -> AIOKafkaProducer:
    """The DLQ producer, idempotent where the broker supports it (a send the client
    retries after a lost acknowledgement is stored once); the local Tansu broker
    answers InitProducerId with an error, so there it falls back to a plain producer
    (a client-side retry after a lost acknowledgement can then duplicate a record).
    gzip by default: a rejected record compressed by its producer fits the DLQ
    compressed too (the OTLP re-keyer sends uncompressed batches of 1 MiB instead)."""
    for idempotent in (True, False):
        producer = AIOKafkaProducer(bootstrap_servers=kafka, linger_ms=20, acks="all",
                                    max_request_size=16 << 20, enable_idempotence=idempotent,
                                    compression_type=compression, max_batch_size=max_batch_size,
                                    **(security or KafkaSecurity()).aiokafka_kwargs())
        try:
            await producer.start()
            return producer
        except Exception as exc:
            with contextlib.suppress(Exception):
                await producer.stop()
            if not idempotent:
                raise
            log.warning("the broker refused an idempotent producer (%s): the DLQ producer is not idempotent",
                        exc)
    raise AssertionError("unreachable")


async def highwaters(reader: AIOKafkaConsumer, parts: Sequence[TopicPartition]) -> dict[int, int]:
    """The high watermarks of ``parts`` (assigned to ``reader``, a consumer without a group),
    from a fetch response (Tansu's ListOffsets is wrong, its fetch high watermark right);
    partitions Kafka does not answer for in 5 s are left out."""
    for tp in parts:
        reader.seek(tp, 0)
    out: dict[int, int] = {}
    deadline = time.monotonic() + 5.0
    with contextlib.suppress(Exception):
        while len(out) < len(parts) and time.monotonic() < deadline:
            await reader.getmany(*parts, timeout_ms=500, max_records=1)
            for tp in parts:
                hw = reader.highwater(tp)
                if hw is not None:
                    out[tp.partition] = int(hw)
    return out


async def source_ids(reader: AIOKafkaConsumer, parts: Sequence[TopicPartition], starts: Mapping[int, int],
                     timeout_s: float = 120.0) -> set[SourceId]:
    """The ``driftline-source-*`` headers (topic, partition, offset, index) of every record
    of ``parts`` (assigned to ``reader``) from ``starts`` (partition -> offset; 0 when
    absent) up to the high watermark of the latest fetch response: which sources a
    topic already holds (the DLQ's recovery, the OTLP re-keyer's). TimeoutError after
    ``timeout_s`` without a record (a long read that progresses is not cut off: its
    caller would retry it from the start, never finishing)."""
    held: set[SourceId] = set()
    todo = set(parts)
    for tp in todo:
        reader.seek(tp, int(starts.get(tp.partition, 0)))
    deadline = time.monotonic() + timeout_s
    while todo:
        if time.monotonic() > deadline:
            raise TimeoutError(f"reading {parts[0].topic}: no record for {timeout_s:.0f} s")
        data = await reader.getmany(*todo, timeout_ms=500)
        if any(data.values()):
            deadline = time.monotonic() + timeout_s
        for recs in data.values():
            held.update(s for r in recs if (s := _source_id(r.headers)) is not None)
        for tp in list(todo):  # read up to the high watermark of the latest fetch response
            hw = reader.highwater(tp)
            if hw is not None and await reader.position(tp) >= hw:
                todo.discard(tp)
    return held


async def _no_keepalive() -> None:
    return None


class DeadLetters:
    """Owns the outbox -> DLQ topic path: the producer, a reader of the DLQ (to
    recover), and where this worker's sends land (per DLQ partition).

    ``keepalive`` is awaited between retries while Kafka refuses the sends;
    ``dead_lettered`` counts the records Kafka took.
    """

    def __init__(self, kafka: str, topic: str, metrics: WorkerMetrics, *,
                 security: KafkaSecurity | None = None,
                 keepalive: Callable[[], Awaitable[None]] = _no_keepalive) -> None:
        self.kafka = kafka
        self.topic = topic
        self.metrics = metrics
        self.security = security or KafkaSecurity()
        self.keepalive = keepalive
        self.producer: AIOKafkaProducer | None = None
        self._reader: AIOKafkaConsumer | None = None
        self._parts: list[TopicPartition] = []
        #: per DLQ partition: an offset at or below which every later send of this worker lands
        self._hw: dict[int, int] = {}
        self.dead_lettered = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the producer and the DLQ reader; read where the DLQ ends now."""
        self.producer = await start_producer(self.kafka, self.security)
        self._reader = AIOKafkaConsumer(bootstrap_servers=self.kafka, group_id=None, enable_auto_commit=False,
                                        auto_offset_reset="earliest", **self.security.aiokafka_kwargs())
        await self._reader.start()
        await self._reader.topics()
        self._parts = [TopicPartition(self.topic, p)
                       for p in sorted(self._reader.partitions_for_topic(self.topic) or {0})]
        self._reader.assign(self._parts)
        self._hw = await self._highwaters()

    async def stop(self) -> None:
        """Close the reader, then the producer (errors ignored)."""
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader.stop()
            self._reader = None
        if self.producer is not None:
            with contextlib.suppress(Exception):
                await self.producer.stop()
            self.producer = None

    async def _highwaters(self) -> dict[int, int]:
        """The DLQ partitions' high watermarks (:func:`highwaters`)."""
        assert self._reader is not None
        return await highwaters(self._reader, self._parts)

    async def refresh_ends(self) -> None:
        """Move :meth:`ends` up to the DLQ's current ends (call it with no send in flight:
        every later send lands at or after them), so recovery reads what came since, not
        all that other writers of the DLQ sent since this one started."""
        for p, o in (await self._highwaters()).items():
            self._hw[p] = max(self._hw.get(p, 0), o)

    def ends(self) -> str:
        """Where this step's DLQ sends will land at the earliest (JSON, per DLQ partition):
        the end of the DLQ at start, then past this worker's last send; recovery reads
        the DLQ from here. '' (read from the beginning) when unknown."""
        if len(self._hw) < len(self._parts):
            return ""
        return json.dumps({str(p): o for p, o in self._hw.items()})

    # ------------------------------------------------------------------ sending
    async def send(self, outbox: list[dict[str, Any]]) -> None:
        """Send outbox rows to the DLQ; retried (with the consumer kept alive) until
        Kafka takes each one: never raises, so a Kafka outage only pauses the writer.

        Only the sends that failed are retried (a send queued before a failing one is
        delivered once, not resent). A record Kafka refuses for itself (larger than the
        DLQ topic or the producer takes, say) is never retried as it is: it is sent as a
        stub instead, its value left out and its length and SHA-256 in headers (the
        whole value stays in the ``dlq_outbox`` table)."""
        delay = 0.2
        pending = list(outbox)
        while pending:
            failed = self._classify(await self._send_all(pending))
            if failed and any(not r.get("stub") or r.get("retry") for r in failed):
                log.warning("dead-letter send failed for %d records, retrying in %.1fs", len(failed), delay)
                await self._wait(delay)
                delay = min(10.0, delay * 2)
            for r in failed:
                if r.get("stub"):
                    r["retry"] = True
            pending = failed

    async def _send_all(self, rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], Any]]:
        """Queue every row on the producer, then await each delivery: (row, metadata or error)."""
        queued: list[tuple[dict[str, Any], Any]] = []
        for r in rows:
            try:
                if self.producer is None:
                    raise RuntimeError("the DLQ producer is closed")
                queued.append((r, await self.producer.send(self.topic, r["value"], key=r["key"],
                                                           headers=dlq_headers(r))))
            except Exception as exc:  # noqa: BLE001 - classified by _classify; never raised
                queued.append((r, exc))
        out: list[tuple[dict[str, Any], Any]] = []
        for r, fut in queued:
            res: Any = fut
            if not isinstance(fut, BaseException):
                try:
                    res = await fut
                except Exception as exc:  # noqa: BLE001 - classified by _classify
                    res = exc
            out.append((r, res))
        return out

    def _classify(self, results: list[tuple[dict[str, Any], Any]]) -> list[dict[str, Any]]:
        """Count the delivered rows; return those to send again (a refused record as a stub)."""
        failed: list[dict[str, Any]] = []
        for r, res in results:
            if not isinstance(res, BaseException):
                if res is not None:
                    self._hw[res.partition] = max(self._hw.get(res.partition, 0), int(res.offset) + 1)
                self.dead_lettered += 1
            elif isinstance(res, REFUSED_RECORD) and not r.get("stub"):
                log.error("the DLQ refused the rejected record %s[%s]@%s (%s: %s): sending a stub without "
                          "its value", r["source_topic"], r["source_partition"], r["source_offset"],
                          type(res).__name__, res)
                failed.append(dlq_stub(r))
            elif isinstance(res, REFUSED_RECORD):
                log.error("the DLQ refused even the stub of %s[%s]@%s (%s); it stays in dlq_outbox only",
                          r["source_topic"], r["source_partition"], r["source_offset"], res)
                self.metrics.sink_errors["dlq"] += 1
            else:
                failed.append(r)
        return failed

    async def _wait(self, delay: float) -> None:
        """Wait ``delay`` seconds, keeping the consumer group's membership meanwhile."""
        end = time.monotonic() + delay
        while time.monotonic() < end:
            await self.keepalive()
            await asyncio.sleep(min(0.5, max(0.0, end - time.monotonic())))

    # ------------------------------------------------------------------ recovery
    async def held(self, dlq_start: str) -> set[SourceId]:
        """(source topic, partition, offset, index) of every DLQ record from ``dlq_start``
        (JSON end offsets; '' = the beginning) to the current end."""
        assert self._reader is not None
        start = json.loads(dlq_start) if dlq_start else {}
        return await source_ids(self._reader, self._parts, {int(p): int(o) for p, o in start.items()})

    async def recover(self, tp: TopicPartition, epoch: int, rows: Sequence[Sequence[Any]], dlq_start: str,
                      stopping: Callable[[], bool]) -> None:
        """Send the outbox ``rows`` (offset, idx, key, value, reason, field) of the last
        logged write step of ``tp`` that the DLQ does not hold yet (the worker died
        between the write log and the sends). Waits for Kafka while it is down, unless
        ``stopping()``: the outbox keeps the rows for the next owner then."""
        if not rows:
            return
        while True:
            if stopping() or self._reader is None:
                log.info("stopping: DLQ recovery of %s[%d] left to the next owner", tp.topic, tp.partition)
                return
            try:
                held = await self.held(dlq_start)
                break
            except Exception as exc:  # noqa: BLE001 - Kafka down: wait for it
                log.warning("reading the DLQ to recover %s[%d] failed, retrying: %r", tp.topic, tp.partition, exc,
                            exc_info=True)
                await asyncio.sleep(1.0)
        missing = [{"source_topic": tp.topic, "source_partition": tp.partition, "epoch": epoch,
                    "source_offset": int(o), "idx": int(i), "key": k, "value": v,
                    "reason": reason.decode(errors="replace"), "field": field_.decode(errors="replace"),
                    "written_at": now_utc()}
                   for o, i, k, v, reason, field_ in rows if (tp.topic, tp.partition, int(o), int(i)) not in held]
        if missing:
            log.warning("%s[%d]: %d rejected records of the last write step are not in the DLQ yet: sending them",
                        tp.topic, tp.partition, len(missing))
            await self.send(missing)
