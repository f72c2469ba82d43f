"""The thin Kafka host: the worker's consumer group, fetch loop, rebalances and commits.

Its only job is to deliver batches and commit what the sinks confirmed (issue 15).
Window policy, SQL and the stored data stay out: a rebalance calls the worker's
:class:`HostHooks` for those (drain the writes, read the write log, rebuild windows).

- :class:`KafkaHost` fetches batches (decoded on a thread while the next one is
  fetched), drops a batch in flight across a rebalance (``generation``) and fetches
  it again, skips a record batch aiokafka cannot unpack (poison: returned as
  rejected records), resumes each assigned partition after its write log and
  checks that the record there is the logged one (else: the topic was recreated).
- :func:`group_consumer` builds the group's consumer from the worker's settings
  (batches of up to ``max_batch`` records, a short session timeout, a rebalance
  timeout longer than the revoke drain).
- :class:`GroupListener` hands revocations and assignments to two callbacks.
- :func:`hold` keeps the group membership while a sink is down, fetching nothing.
- :func:`cut_off` says whether an empty fetch says anything about traffic.
- :func:`commit_confirmed` resumes fetching and commits the offsets the sinks
  confirmed (a hint only: the write log in ClickHouse is the truth).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from driftline.streams.ingest.transforms import Rejected

if TYPE_CHECKING:
    from driftline.streams.worker import WorkerConfig

log = logging.getLogger("driftline.worker")

__all__ = ["KafkaHost", "HostHooks", "InFlight", "GroupListener", "group_consumer", "hold", "cut_off",
           "commit_confirmed", "unpacking_error", "failed_batch_end", "same_record", "fingerprint"]

#: an assigned partition with no fetch answer for this long: the broker is unreachable
CUT_OFF_MS = 2_000


class GroupListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hands the group's revocations and assignments (as lists) to two callbacks."""

    def __init__(self, on_revoked: Callable[[list[TopicPartition]], Awaitable[None]],
                 on_assigned: Callable[[list[TopicPartition]], Awaitable[None]]) -> None:
        self._on_revoked = on_revoked
        self._on_assigned = on_assigned

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._on_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._on_assigned(list(assigned))


def group_consumer(cfg: WorkerConfig, listener: ConsumerRebalanceListener) -> AIOKafkaConsumer:
    """The worker's group consumer (not started), subscribed to ``cfg.host_topics``.

    Offsets are committed by hand (:func:`commit_confirmed`); Kafka, like Tansu, holds
    a new group's first assignment for about half of ``session_timeout_ms``.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=cfg.kafka, group_id=cfg.group_id, enable_auto_commit=False,
        auto_offset_reset=cfg.auto_offset_reset, max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20, max_poll_records=cfg.max_batch,
        session_timeout_ms=cfg.session_timeout_ms, rebalance_timeout_ms=cfg.rebalance_timeout_ms,
        heartbeat_interval_ms=max(500, min(3_000, cfg.session_timeout_ms // 4)),
        max_poll_interval_ms=600_000, **cfg.kafka_security.aiokafka_kwargs(),
    )
    consumer.subscribe(list(cfg.host_topics), listener=listener)
    return consumer


async def hold(consumer: AIOKafkaConsumer | None) -> None:
    """While a sink is down: pause every assigned partition and poll once, so the group
    membership stays (heartbeats) and nothing more is fetched."""
    if consumer is not None:
        parts = consumer.assignment()
        if parts:
            consumer.pause(*parts)
            with contextlib.suppress(Exception):
                await consumer.getmany(timeout_ms=0)


def cut_off(consumer: AIOKafkaConsumer | None) -> bool:
    """True while fetching is paused or an assigned partition has had no fetch answer
    for 2 s (the broker unreachable): an empty fetch then says nothing about traffic."""
    if consumer is None:
        return False
    parts = consumer.assignment()
    if not parts or consumer.paused():  # no partition (group lost while Kafka is cut) or paused
        return True
    wall_ms = time.time() * 1000
    for tp in parts:
        ts = consumer.last_poll_timestamp(tp)
        if ts is None or wall_ms - ts > CUT_OFF_MS:
            return True
    return False


async def commit_confirmed(consumer: AIOKafkaConsumer | None, offsets: Mapping[TopicPartition, int]) -> None:
    """After a write step is safe: resume fetching, and commit ``offsets`` (the next
    offset per partition) of the partitions still assigned. A failed commit (a rebalance
    in flight) is logged: the write log holds the offsets."""
    if consumer is None:
        return
    parts = consumer.assignment()
    if consumer.paused():
        consumer.resume(*parts)
    commit = {tp: off for tp, off in offsets.items() if tp in parts}
    if commit:
        try:
            await consumer.commit(commit)
        except Exception as exc:  # noqa: BLE001 - rebalance in flight: the write log makes it safe
            log.warning("offset commit failed (the write log holds the offsets): %s", exc)


# ----------------------------------------------------------------------------- the host
@dataclass
class InFlight:
    """A fetched batch whose decode runs on the decode thread."""

    records: list[Any]
    offsets: dict[TopicPartition, int]
    firsts: dict[TopicPartition, int]
    lasts: dict[TopicPartition, tuple[int, int]]
    #: :attr:`KafkaHost.generation` when it was fetched
    generation: int
    decoded: Any  # asyncio future of the decoded batch, None for an empty batch
    #: skipped record batches that could not be unpacked (see KafkaHost._undecodable)
    undecodable: list[Rejected] = field(default_factory=list)


#: per partition: (offset, Kafka timestamp, fingerprint) of the last record the write log holds
LogMark = tuple[int, int, int]


@dataclass(frozen=True)
class HostHooks:
    """What the host calls; everything the stored data needs happens behind these.

    decode(records) -> decoded batch        on the decode thread
    deliver(batch, decoded)                 a batch of the current generation, decoded
    revoke()                                before partitions go (emit, drain the writes)
    resume(assigned) -> {tp: LogMark}       on assignment: the write log's last record of
                                            each logged partition (absent: none logged)
    recreated(tp, why)                      ``tp`` is not the logged topic: forget its stored
                                            state (new epoch)
    assigned(partitions)                    once the assigned partitions are ready (all assigned)
    """

    decode: Callable[[Sequence[Any]], Any]
    deliver: Callable[[InFlight, Any], Awaitable[None]]
    revoke: Callable[[], Awaitable[None]]
    resume: Callable[[list[TopicPartition]], Awaitable[dict[TopicPartition, LogMark]]]
    recreated: Callable[[TopicPartition, str], None]
    assigned: Callable[[list[TopicPartition]], Awaitable[None]]


class KafkaHost:
    """The consumer group: delivers decoded batches, resumes each assigned partition after
    its write log, and commits what the sinks confirmed.

    Fetching overlaps decoding: each :meth:`fetch` fetches a batch, starts decoding it on
    the decode thread, and delivers the batch fetched before. A batch in flight across a
    rebalance (``generation`` counts revocations and assignments) is dropped, with the
    batch after it, and fetched again. Poison: a fetch aiokafka cannot unpack is read
    again partition by partition and the bad record batch skipped (returned as rejected).
    A partition whose logged record is not found where the log says (topic recreated,
    broker lost its data) is read from its beginning.
    """

    def __init__(self, cfg: WorkerConfig, hooks: HostHooks, pool: concurrent.futures.Executor) -> None:
        self.cfg = cfg
        self.hooks = hooks
        self.pool = pool
        self.consumer: AIOKafkaConsumer | None = None
        self.generation = 0
        self.assigned: set[TopicPartition] = set()
        #: partitions whose assignment has been handled (stored offsets known)
        self.ready: set[TopicPartition] = set()
        #: first offset fetched (and dropped) from a partition before it was ready
        self._rewind: dict[TopicPartition, int] = {}
        self._skip_below: dict[TopicPartition, int] = {}
        #: per partition: the write log's last record; the first fetch must find it there
        self._verify: dict[TopicPartition, LogMark] = {}
        self.pending: InFlight | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.consumer = group_consumer(self.cfg, GroupListener(self._on_revoked, self._on_assigned))
        await self.consumer.start()

    async def stop(self) -> None:
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await self.consumer.stop()
            self.consumer = None

    def cut_off(self) -> bool:
        """True while the group's fetches say nothing about traffic (:func:`cut_off`)."""
        return cut_off(self.consumer)

    async def hold(self) -> None:
        """While a sink is down: keep the group membership, fetch nothing more."""
        await hold(self.consumer)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """A write step is safe: resume fetching, commit its offsets."""
        await commit_confirmed(self.consumer, offsets)

    async def finish(self) -> None:
        """Deliver the batch still being decoded (on stop)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            await self._complete(pending)

    # ------------------------------------------------------------------ fetch
    async def fetch(self) -> None:
        """Fetch a batch and start decoding it on the decode thread, then deliver the
        batch fetched before.

        Decoding is mostly Arrow's JSON reader, which runs without the GIL, so it
        overlaps with the next ``getmany`` (aiokafka's per-record work, on this
        thread). A batch that was in flight while partitions were revoked or
        assigned is dropped, with every batch after it, and fetched again from
        its first offsets: it is never added to the windows of a new assignment.
        """
        # with a batch in flight, take only what is already fetched: when traffic stops,
        # that batch is finished at once rather than after a fetch timeout
        busy = self.pending is not None and bool(self.pending.records)
        data, bad = await self._get(busy)
        await self._take(data, bad)

    async def _get(self, busy: bool) -> tuple[Mapping[TopicPartition, list[Any]],
                                               dict[TopicPartition, tuple[int, int, str]]]:
        """One fetch: the records per partition, and the record batches skipped as
        undecodable, per partition (first offset, last offset, reason)."""
        assert self.consumer is not None
        before = self._positions()
        bad: dict[TopicPartition, tuple[int, int, str]] = {}
        try:
            data = await self.consumer.getmany(timeout_ms=0 if busy else self.cfg.fetch_timeout_ms,
                                               max_records=self.cfg.max_batch)
        except Exception as exc:  # noqa: BLE001 - only a batch aiokafka cannot unpack; anything else re-raised
            if not unpacking_error(exc):
                raise
            data, bad = await self._undecodable(exc, before)
        return data, bad

    async def _take(self, data: Mapping[TopicPartition, list[Any]],
                    bad: dict[TopicPartition, tuple[int, int, str]]) -> None:
        """Make a fetch the batch in flight (its decode started), and deliver the one before."""
        batch = self._batch(data)
        for tp, (first, last_off, reason) in bad.items():
            # the skipped batch is logged and dead-lettered by the write step like any rejected record
            batch.undecodable.append(Rejected(tp.topic, tp.partition, first, None, b"", reason))
            batch.firsts.setdefault(tp, first)
            batch.lasts[tp] = (0, 0)  # no record to fingerprint: a restart finds it undecodable again
            batch.offsets[tp] = last_off + 1
        if batch.records:
            batch.decoded = asyncio.get_running_loop().run_in_executor(self.pool, self.hooks.decode, batch.records)
        prev, self.pending = self.pending, batch
        if prev is not None:
            await self._complete(prev)

    def _batch(self, data: Mapping[TopicPartition, list[Any]]) -> InFlight:
        """The records of a fetch that are to be processed: not those of partitions not
        ready yet (rewound to), nor below the write log, nor of a recreated topic."""
        out = InFlight([], {}, {}, {}, self.generation, None)
        for tp, recs in data.items():
            if not recs:
                continue
            if tp not in self.ready:
                # fetched while the assignment is still being handled (aiokafka fetches as
                # soon as it is assigned): drop them, _on_assigned seeks back to them
                first = recs[0].offset
                self._rewind[tp] = min(first, self._rewind.get(tp, first))
                continue
            if tp in self._verify and not self._same_topic(tp, recs[0]):
                continue  # recreated: fetched again from its beginning
            last = recs[-1]
            floor = self._skip_below.get(tp)
            kept = [r for r in recs if r.offset >= floor] if floor is not None else recs
            if kept:
                out.firsts[tp] = kept[0].offset
                out.lasts[tp] = (int(last.timestamp), fingerprint(last))
            out.records.extend(kept)
            out.offsets[tp] = last.offset + 1
        return out

    async def _complete(self, p: InFlight) -> None:
        decoded = await p.decoded if p.decoded is not None else None
        if p.generation != self.generation:
            self._refetch(p)
            return
        await self.hooks.deliver(p, decoded)

    def _refetch(self, stale: InFlight) -> None:
        """Drop ``stale`` and the batch fetched after it; seek their partitions back."""
        back = dict(stale.firsts)
        nxt, self.pending = self.pending, None
        if nxt is not None:
            if nxt.decoded is not None:
                nxt.decoded.cancel()
            for tp, off in nxt.firsts.items():
                back[tp] = min(off, back.get(tp, off))
        assert self.consumer is not None
        for tp, off in back.items():
            if tp in self.ready:
                self.consumer.seek(tp, off)
        log.info("rebalance while %d records were in flight: fetching them again", len(stale.records))

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

    # ------------------------------------------------------------------ poison
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
        for tp in sorted(self.ready & set(before), key=lambda t: (t.topic, t.partition)):
            recs, skipped = await self._read_alone(tp, before[tp])
            if skipped is not None:
                bad[tp] = skipped
            if recs:
                data[tp] = recs
        return data, bad

    async def _read_alone(self, tp: TopicPartition, start: int
                          ) -> tuple[list[Any], tuple[int, int, str] | None]:
        """Read ``tp`` one record at a time (up to ``max_batch``) until it ends or a record
        batch raises; that batch is skipped (seeked past) and returned as (first, last, reason)."""
        assert self.consumer is not None
        recs, err = await read_alone(self.consumer, tp, self.cfg.max_batch, self.cfg.fetch_timeout_ms)
        if err is None:
            return recs, None
        return recs, self._skip_batch(tp, err, self._positions().get(tp, start))

    def _skip_batch(self, tp: TopicPartition, err: BaseException, pos: int) -> tuple[int, int, str] | None:
        """Seek ``tp`` past the record batch at ``pos`` that raised ``err``; (first, last, reason)
        of its offsets above the write log (None when all are at or below it)."""
        assert self.consumer is not None
        end = failed_batch_end(err, pos)
        self.consumer.seek(tp, end + 1)  # past the batch: never fetched again by this worker
        self._verify.pop(tp, None)  # the logged record cannot be read to be checked
        first = max(pos, self._skip_below.get(tp, pos))
        why = str(err)
        if not why.startswith(type(err).__name__):  # aiokafka's errors name themselves
            why = f"{type(err).__name__}: {why}"
        log.warning("%s[%d]: skipping the undecodable record batch at offsets %d to %d: %s",
                    tp.topic, tp.partition, pos, end, why)
        if first > end:
            return None
        return first, end, f"undecodable record batch (offsets {pos} to {end}): {why}"

    # ------------------------------------------------------------------ topic identity
    def _same_topic(self, tp: TopicPartition, rec: Any) -> bool:
        """The first record fetched after an assignment, checked against the write log.

        The host seeks to the last logged offset; the record there must be the one
        logged (same Kafka timestamp and fingerprint). An earlier offset, or a different
        record, means the topic was recreated (or the in-memory broker restarted): the
        stored offsets belong to the old topic, so the new one is read from its
        beginning under a new epoch, not skipped into. A later offset means retention
        deleted the logged record: the topic is the same.
        """
        off, ts, fp = self._verify.pop(tp)
        if rec.offset > off or (rec.offset == off and same_record(rec, ts, fp)):
            return True
        self._recreated(tp, f"its offsets start at {rec.offset}, below the stored {off}" if rec.offset < off
                        else f"the record at stored offset {off} is another record")
        self._seek(tp, 0)  # out of range (retention) resets to the earliest offset
        return False

    def _seek(self, tp: TopicPartition, offset: int) -> None:
        """Fetch ``tp`` from ``offset`` next."""
        assert self.consumer is not None
        self.consumer.seek(tp, offset)

    async def _probe(self, marks: dict[TopicPartition, LogMark]) -> dict[TopicPartition, str]:
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
                    why = _probed(marks[tp], data.get(tp), c.highwater(tp))
                    if why is not None:
                        pending.discard(tp)
                        if why:
                            out[tp] = why
        except Exception as exc:  # noqa: BLE001 - the first fetched record is checked anyway
            log.warning("checking the stored offsets against the topic failed (%s): checking on fetch", exc)
        finally:
            with contextlib.suppress(Exception):
                await c.stop()
        return out

    def _recreated(self, tp: TopicPartition, why: str) -> None:
        """``tp`` is not the topic whose offsets are stored: forget them (hooks.recreated)."""
        self._verify.pop(tp, None)
        self._skip_below.pop(tp, None)
        self.hooks.recreated(tp, why)

    # ------------------------------------------------------------------ rebalance
    async def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        if not revoked:
            return
        self.generation += 1
        await self.hooks.revoke()
        self.assigned -= set(revoked)
        self.ready -= set(revoked)

    async def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        """Resume each partition after its write log, checking that it is the same topic.

        The hooks' reads of the write log are retried until they succeed (a partition is
        only made ready, and fetched, once its stored offsets are known); the consumer
        keeps its membership meanwhile (heartbeats run on their own task).
        """
        if not assigned:
            return
        self.generation += 1
        marks = await self.hooks.resume(assigned)
        self.assigned |= set(assigned)
        seek_to: dict[TopicPartition, int] = {}
        for tp in assigned:
            self._verify.pop(tp, None)
            if tp in marks:
                last, ts, fp = marks[tp]
                self._skip_below[tp] = last + 1
                self._verify[tp] = (last, ts, fp)
                seek_to[tp] = last  # read the logged record again: is it the same topic?
            else:
                self._skip_below.pop(tp, None)  # nothing logged: from the committed offset
        # the record at each logged offset, read before fetching starts: a topic that ends
        # at or before it is not the logged topic (Tansu answers a fetch past the end
        # with nothing, not "out of range"; its ListOffsets is wrong, its high watermark right)
        fresh: set[TopicPartition] = set()
        for tp, why in (await self._probe({tp: self._verify[tp] for tp in assigned if tp in self._verify})).items():
            self._recreated(tp, why)
            seek_to[tp] = 0
            fresh.add(tp)
        # no await from here on: records fetched before this point were dropped (see
        # _batch); fetching resumes at them, or at the logged record
        for tp in assigned:
            self._seek_resumed(tp, seek_to.get(tp), fresh)
        self.ready |= set(assigned)
        await self.hooks.assigned(sorted(self.assigned))

    def _seek_resumed(self, tp: TopicPartition, target: int | None, fresh: set[TopicPartition]) -> None:
        """Where fetching of a newly assigned ``tp`` resumes: the logged record (or 0 for a
        recreated topic), or the first record dropped before it was ready, if later."""
        assert self.consumer is not None
        rewind = self._rewind.pop(tp, None)
        if target is None:
            target = rewind
        elif rewind is not None and tp not in self._verify and tp not in fresh:
            target = max(rewind, target)
        if target is not None:
            self.consumer.seek(tp, target)


def _probed(mark: LogMark, recs: list[Any] | None, hw: int | None) -> str | None:
    """The verdict on one partition of :meth:`KafkaHost._probe`: None (undecided yet), ''
    (the logged topic), or why it is not."""
    off, ts, fp = mark
    if recs:
        r = recs[0]
        if r.offset < off:
            return f"its offsets restart at {r.offset}, below the stored {off}"
        if r.offset == off and not same_record(r, ts, fp):
            return f"the record at stored offset {off} is another record"
        return ""
    if hw is not None and hw <= off:
        return f"it ends at offset {hw}, at or before the stored {off}"
    return None


async def read_alone(consumer: Any, tp: TopicPartition, max_records: int, timeout_ms: int
                     ) -> tuple[list[Any], BaseException | None]:
    """Read ``tp`` one record at a time (up to ``max_records``) until it ends or a record
    batch aiokafka cannot unpack raises: the records read before it, and that error (the
    caller seeks past the batch, :func:`failed_batch_end`; the consumer's position is then
    the failing batch's first offset). One record at a time, so the good records fetched
    with a bad batch are not skipped with it. Any other error is raised."""
    recs: list[Any] = []
    while len(recs) < max_records:
        try:
            got = await consumer.getmany(tp, timeout_ms=0 if recs else timeout_ms, max_records=1)
        except Exception as err:  # noqa: BLE001 - returned when it is an unpacking error
            if not unpacking_error(err):
                raise
            return recs, err
        if not got.get(tp):
            break
        recs += got[tp]
    return recs, None


def unpacking_error(exc: BaseException) -> bool:
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


def failed_batch_end(exc: BaseException, pos: int) -> int:
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


def same_record(rec: Any, ts: int, fp: int) -> bool:
    """Is ``rec`` the record the write log saw at its offset (Kafka timestamp and
    fingerprint)? A logged (0, 0) is a skipped undecodable batch, which has no record
    to fingerprint: it cannot be checked, and is taken as the same (were it taken as
    another record, the partition would be read again from its beginning, twice)."""
    return (ts, fp) == (0, 0) or (int(rec.timestamp) == ts and fingerprint(rec) == fp)


def fingerprint(rec: Any) -> int:
    """A record's identity beside its offset: CRC-32 of the value and of the key (UInt64)."""
    return (zlib.crc32(rec.value or b"") << 32) | zlib.crc32(rec.key or b"")
