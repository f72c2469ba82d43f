"""The write step: processed batches -> ClickHouse, then the DLQ, then the safe offsets.

A write step is one or more processed batches (:class:`Work`), merged by the
writer up to ``max_insert_rows`` events (lingering ``insert_linger_s`` for an
insert smaller than ``min_insert_rows``), written in this order (README "What the
worker does, and guarantees"; streams/worker.py's docstring says why):

  1. ``llm_events``          the events (rows ClickHouse refuses: to the DLQ)
  2. ``dlq_outbox``          the step's rejected records
  3. ``llm_window_metrics``  the window rows
  4. ``ingest_log``          one row per source partition, written LAST
  5. the stages (``on_stored``), the DLQ sends (streams/sinks/dlq.py), and
     ``on_safe(offsets)``: the offsets the host may commit.

Every insert carries a deduplication token derived from the step's source offsets
(:func:`batch_token`), so a retried insert stores nothing twice. The queue in
front of the writer is bounded (4 batches): a slow ClickHouse holds the fetch
loop back (backpressure), and while an insert is retried the host's
``keepalive`` keeps the consumer group's membership.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiokafka import TopicPartition

from driftline.detectors.redact import Redaction
from driftline.schemas.columns import LOG_COLUMNS, OUTBOX_COLUMNS, WINDOW_COLUMNS
from driftline.schemas.window_stats import WindowStats
from driftline.streams.ingest.transforms import ArrowColumns, Rejected
from driftline.streams.sinks.batch import BatchProcessor, ExportResult
from driftline.streams.sinks.clickhouse import ClickHouseSink
from driftline.streams.sinks.dlq import DeadLetters, now_utc, outbox_rows
from driftline.streams.sinks.prometheus import WorkerMetrics
from driftline.streams.stages.privacy import redact_events, redact_rejected

if TYPE_CHECKING:
    from driftline.streams.worker import Stage

log = logging.getLogger("driftline.worker")

__all__ = ["Work", "WriteLog", "WriteStep", "StoredBatch", "merge_marks", "batch_token", "drop_stored"]

#: per source partition of a write step: (first offset, last offset, last timestamp, last fingerprint)
Marks = dict[TopicPartition, tuple[int, int, int, int]]
#: ``retry(what, fn, *args)``: ``fn(*args)`` on a thread, retried until it succeeds
Retry = Callable[..., Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class StoredBatch:
    """What one write stored: handed to every stage after ClickHouse accepted it.

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


@dataclass(slots=True)
class Work:
    """One processed batch on its way to the writer."""

    event_cols: ArrowColumns | None
    windows: list[WindowStats]
    rejected: list[Rejected]
    offsets: dict[TopicPartition, int]
    #: first offset and the last record's (timestamp, fingerprint) per partition
    firsts: dict[TopicPartition, int] = field(default_factory=dict)
    lasts: dict[TopicPartition, tuple[int, int]] = field(default_factory=dict)
    #: the source records, to dead-letter an event that ClickHouse refuses
    records: Sequence[Any] = ()
    #: the stream watermark once this batch was windowed (None before any event)
    watermark_ms: int | None = None

    @property
    def arrow(self) -> Any:
        """The events as an Arrow table, what the writer inserts (None without events)."""
        return self.event_cols.table if self.event_cols is not None else None


@dataclass(slots=True)
class WriteLog:
    """What the write log says per source partition, shared by the write step (which
    extends it) and the host (which reads it on each assignment)."""

    #: the write-log epoch (bumped when the topic was recreated)
    epoch: dict[TopicPartition, int] = field(default_factory=dict)
    #: last offset of the write log (the window rebuild reads rows up to it)
    logged: dict[TopicPartition, int] = field(default_factory=dict)
    #: (offset, event_id) stored by a write step that did not finish
    torn: dict[TopicPartition, set[tuple[int, str]]] = field(default_factory=dict)

    def forget(self, tp: TopicPartition) -> None:
        """Drop what is known of ``tp`` (its epoch stays)."""
        self.torn.pop(tp, None)
        self.logged.pop(tp, None)


def merge_marks(batch: list[Work]) -> Marks:
    """Per partition of a write step: (first offset, last offset, last timestamp, last fingerprint)."""
    out: Marks = {}
    for w in batch:
        for tp, nxt in w.offsets.items():
            if tp not in w.lasts:
                continue
            ts, fp = w.lasts[tp]
            first = w.firsts.get(tp, nxt - 1)
            prev = out.get(tp)
            if prev is not None:
                first = min(first, prev[0])
            out[tp] = (first, nxt - 1, ts, fp)
    return out


def batch_token(marks: Marks, epochs: Mapping[TopicPartition, int]) -> str:
    """The deduplication token of a write step: a hash of its source offset ranges (and
    epochs), so a retried insert of the same step is dropped by ClickHouse."""
    if not marks:
        import uuid

        return uuid.uuid4().hex  # windows only (flush, revocation): no source records
    key = ";".join(f"{tp.topic}:{tp.partition}:{epochs.get(tp, 0)}:{m[0]}-{m[1]}" for tp, m in sorted(marks.items()))
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def drop_stored(table: Any, torn: Mapping[TopicPartition, set[tuple[int, str]]]) -> Any:
    """``table`` without the events a cut-short write step stored already."""
    import pyarrow as pa

    tps = table.column("source_topic").to_pylist()
    parts = table.column("source_partition").to_pylist()
    offs = table.column("source_offset").to_pylist()
    ids = table.column("event_id").to_pylist()
    keep = [not ((s := torn.get(TopicPartition(t, p))) is not None and (o, e) in s)
            for t, p, o, e in zip(tps, parts, offs, ids, strict=True)]
    return table if all(keep) else table.filter(pa.array(keep))


def refused_records(table: Any, refused: list[tuple[list[int], str]], batch: list[Work]) -> list[Rejected]:
    """The source records of the event rows ClickHouse refused, as rejected records
    (one per source record, with ClickHouse's message)."""
    src = {(r.topic, r.partition, r.offset): r for w in batch for r in w.records}
    tps = table.column("source_topic").to_pylist()
    parts = table.column("source_partition").to_pylist()
    offs = table.column("source_offset").to_pylist()
    out: dict[tuple[str, int, int], Rejected] = {}
    for rows, msg in refused:
        for i in rows:
            k = (tps[i], int(parts[i]), int(offs[i]))
            rec = src.get(k)
            if k not in out and rec is not None:
                out[k] = Rejected(k[0], k[1], k[2], rec.key, rec.value, f"ClickHouse refused the event: {msg}")
    return list(out.values())


def _concat_arrow(tables: list[Any]) -> Any:
    import pyarrow as pa

    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def _rows(work: Work) -> int:
    return work.arrow.num_rows if work.arrow is not None else 0


async def _stay() -> None:
    return None


class _WriteExporter:
    """The write step as :attr:`WriteStep.batches`' exporter: one export is one write step."""

    def __init__(self, step: WriteStep) -> None:
        self.step = step

    async def export(self, items: Sequence[Work]) -> ExportResult:
        await self.step.write(list(items))
        return ExportResult.SUCCESS

    async def force_flush(self, timeout_s: float = 30.0) -> bool:
        return True

    async def shutdown(self) -> None:
        return None


class WriteStep:
    """Takes processed batches on :attr:`batches`, writes them in write steps, and
    reports the offsets each step made safe to ``on_safe``.

    :attr:`batches` is a blocking :class:`~driftline.streams.sinks.batch.BatchProcessor`
    cut by event rows: at most 4 fetched batches wait (a full queue holds the fetch loop
    back: backpressure); the writer merges what waits into one insert of up to
    ``max_insert_rows`` events (the last batch may pass it), and an insert smaller than
    ``min_insert_rows`` waits up to ``insert_linger_s`` (from when the writer took its
    first batch) for more: fewer, larger inserts, fewer parts to merge. An exception
    from :meth:`write` is a bug (sink failures are retried inside the sink): it ends
    the writer and :meth:`raise_if_failed` raises it, rather than retrying a step half
    applied (the stages were fed).

    Parameters
    ----------
    sink, dlq:
        ClickHouse (its ingest lane) and the outbox -> DLQ topic path.
    log:
        The write log's per-partition state, shared with the host.
    stages:
        Fed each stored batch (``on_stored``); an exception is logged and counted.
    on_safe:
        Awaited with the next offset per partition once a step is stored and dead-lettered.
    keepalive:
        Awaited while an insert is retried (the host keeps its group membership).
    """

    def __init__(self, sink: ClickHouseSink, dlq: DeadLetters, log: WriteLog, metrics: WorkerMetrics, *,
                 stages: Sequence[Stage] = (), redaction: Redaction | None = None,
                 on_safe: Callable[[dict[TopicPartition, int]], Awaitable[None]],
                 keepalive: Callable[[], Awaitable[None]] = _stay,
                 max_insert_rows: int = 100_000, min_insert_rows: int = 20_000,
                 insert_linger_s: float = 0.2) -> None:
        self.sink = sink
        self.dlq = dlq
        self.log = log
        self.metrics = metrics
        self.stages = stages
        self.redaction = redaction or Redaction()
        self.on_safe = on_safe
        self.keepalive = keepalive
        #: bounded: a full queue holds the fetch loop back (backpressure)
        self.batches: BatchProcessor[Work] = BatchProcessor(
            _WriteExporter(self), max_queue_size=4, on_full="block", schedule_delay_s=insert_linger_s,
            max_export_units=max_insert_rows, export_trigger_units=min(min_insert_rows, max_insert_rows),
            raise_on_exception=True, size_of=_rows, name="writer")
        self.stored_events = 0

    async def start(self) -> None:
        """Start writing what :attr:`batches` takes."""
        await self.batches.start()

    def raise_if_failed(self) -> None:
        """Raise the exception that ended the writer (a bug; sink failures never get here)."""
        self.batches.raise_if_failed()

    async def shutdown(self) -> None:
        """Write everything queued, as long as it takes (the sink retries until stored)."""
        await self.batches.shutdown(timeout_s=None)

    async def write(self, batch: list[Work]) -> None:
        """One write step: llm_events, dlq_outbox, llm_window_metrics, then ingest_log
        (last: its rows say the step is complete), then the stages, the DLQ sends and
        the safe offsets. Every insert carries a deduplication token derived from the
        step's source offsets, so a retry stores nothing twice."""
        marks = merge_marks(batch)
        token = batch_token(marks, self.log.epoch)
        rejected = [r for work in batch for r in work.rejected]
        rejected += await self._insert_events(batch, marks, token)
        if rejected and self.redaction.active:  # the DLQ copies (table and topic) redacted too
            rejected = [redact_rejected(r, self.redaction) for r in rejected]
        outbox = outbox_rows(rejected, self.log.epoch) if rejected else []
        if outbox:
            await self.sink.insert_rows("dlq_outbox", outbox, OUTBOX_COLUMNS, self.keepalive, token=f"{token}-dlq",
                                        ingest=True)
        await self._insert_windows([w for work in batch for w in work.windows], token)
        if marks:
            await self._insert_log(batch, marks, token, self.dlq.ends() if outbox else "")
        self._feed_stages(batch)
        if outbox:
            await self.dlq.send(outbox)
        offsets: dict[TopicPartition, int] = {}
        for work in batch:
            offsets.update(work.offsets)  # later batches carry later offsets
        await self.on_safe(offsets)

    async def _insert_events(self, batch: list[Work], marks: Marks, token: str) -> list[Rejected]:
        """Insert the step's events (without those a cut-short step stored; redacted on
        the ClickHouse thread with --redact); returns the records of refused rows."""
        tables = [w.arrow for w in batch if w.arrow is not None]
        if not tables:
            return []
        built: list[Any] = []
        torn = {tp: s for tp, s in self.log.torn.items() if tp in marks}
        red = self.redaction

        def build() -> Any:
            t = _concat_arrow(tables)
            if torn:  # a write step that did not finish stored these already
                t = drop_stored(t, torn)
            if red.active:  # --redact: on the ClickHouse thread; the stages keep the original texts
                t = redact_events(t, red)
            built.append(t)
            return t

        refused: list[tuple[list[int], str]] = []
        await self.sink.insert_arrow("llm_events", build, self.keepalive, token=f"{token}-events", ingest=True,
                                     on_rejected=lambda rows, msg: refused.append((rows, msg)))
        n = built[0].num_rows if built else 0
        out: list[Rejected] = []
        if refused:
            out = refused_records(built[0], refused, batch)
            n -= sum(len(rows) for rows, _ in refused)
        self.stored_events += n
        return out

    async def _insert_windows(self, windows: list[WindowStats], token: str) -> None:
        if not windows:
            return
        stamp = time.time_ns() // 1000  # DateTime64(6) ticks
        rows = []
        for i, w in enumerate(windows):
            r = w.row()
            r["updated_at"] = stamp + i  # strictly increasing versions, in stream order
            rows.append(r)
        await self.sink.insert_rows("llm_window_metrics", rows, WINDOW_COLUMNS, self.keepalive,
                                    token=f"{token}-windows", ingest=True)

    async def _insert_log(self, batch: list[Work], marks: Marks, token: str, dlq_start: str) -> None:
        """The write log rows of the step (written last), then the shared state follows them."""
        wm = max((w.watermark_ms for w in batch if w.watermark_ms is not None), default=0)
        epoch = self.log.epoch
        log_rows = [{"source_topic": tp.topic, "source_partition": tp.partition,
                     "epoch": epoch.get(tp, 0), "first_offset": first, "last_offset": last,
                     "last_timestamp": ts, "last_fingerprint": fp, "dlq_start": dlq_start,
                     "written_at": now_utc(), "watermark_ms": wm}
                    for tp, (first, last, ts, fp) in marks.items()]
        await self.sink.insert_rows("ingest_log", log_rows, LOG_COLUMNS, self.keepalive, token=f"{token}-log",
                                    ingest=True)
        for tp, (_, last, _, _) in marks.items():
            self.log.logged[tp] = last
            t = self.log.torn.get(tp)
            if t is not None and max(o for o, _ in t) <= last:
                del self.log.torn[tp]

    def _feed_stages(self, batch: list[Work]) -> None:
        """Hand each stored batch to every stage; a stage never breaks the stream."""
        if not self.stages:
            return
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

    # ------------------------------------------------------------------ rebalances
    async def drain(self, timeout_s: float) -> bool:
        """Wait until every batch queued so far, and the one the fetch loop may be blocked
        adding (backpressure), is written (not lingering for more), ``timeout_s`` at most:
        False if not."""
        return await self.batches.drain(timeout_s)

    async def resume(self, assigned: Sequence[TopicPartition], retry: Retry,
                     stopping: Callable[[], bool]) -> tuple[dict[TopicPartition, tuple[int, int, int]], int | None]:
        """On assignment: read the write log of ``assigned`` into :attr:`log` (epoch, last
        offset, the events of a step cut short), and send the last logged step's outbox
        rows the DLQ does not hold. ``retry(what, fn, *args)`` runs each ClickHouse read
        until it succeeds. Returns, per logged partition, (last offset, Kafka timestamp,
        fingerprint) of the logged record, and the highest watermark the log recorded
        (the windows that closed below it were written final: None if none)."""
        by_topic: dict[str, list[int]] = {}
        for tp in assigned:
            by_topic.setdefault(tp.topic, []).append(tp.partition)
        out: dict[TopicPartition, tuple[int, int, int]] = {}
        closed_below: int | None = None
        for topic, parts in by_topic.items():
            marks = await retry("reading the write log", self.sink.ingest_marks, topic, parts)
            for p in parts:
                tp = TopicPartition(topic, p)
                self.log.forget(tp)
                if p not in marks:
                    # nothing logged: a first write step cut short may have stored events
                    await self._read_torn(tp, -1, retry, "events of a first write step cut short")
                    continue
                epoch, first, last, ts, fp, dlq_start, wm = marks[p]
                if int(wm) > 0:
                    closed_below = max(closed_below or 0, int(wm))
                self.log.epoch[tp] = int(epoch)
                self.log.logged[tp] = int(last)
                out[tp] = (int(last), int(ts), int(fp))
                await self._read_torn(tp, int(last), retry, "events past the write log (a write step cut short)")
                outbox = await retry("reading the DLQ outbox", self.sink.outbox, topic, p, int(epoch), int(first),
                                     int(last))
                await self.dlq.recover(tp, int(epoch), outbox, str(dlq_start), stopping)
        return out, closed_below

    async def _read_torn(self, tp: TopicPartition, last: int, retry: Retry, what: str) -> None:
        """The events of ``tp`` stored past offset ``last`` by a step that did not finish."""
        torn = await retry("reading stored events", self.sink.stored_after, tp.topic, tp.partition, last)
        if torn:
            self.log.torn[tp] = torn
            log.info("%s[%d]: %d %s will not be stored again", tp.topic, tp.partition, len(torn), what)
