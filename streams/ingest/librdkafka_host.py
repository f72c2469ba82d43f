"""The worker's consumer group on librdkafka (confluent-kafka): :class:`LibrdkafkaHost`.

The same host as :class:`~driftline.streams.ingest.kafka_host.KafkaHost` (same
:class:`HostHooks`, same guarantees), fetching through librdkafka instead of aiokafka:
librdkafka fetches and checks record batches on its own C threads, so the Python
side only turns each message into a small record (:class:`Rec`) - on the consumer
thread, off the event loop. ``driftline worker --consumer librdkafka``.

confluent-kafka's ``Consumer`` blocks, and runs its rebalance callbacks inside
``consume`` on the calling thread. So:

- every call on the consumer runs on one thread (:class:`ConsumerThread`);
- a rebalance callback hands the revocation or assignment to the event loop
  (``run_coroutine_threadsafe``) and, while it waits, keeps running the calls queued
  for the consumer meanwhile (the revoke's drain commits what the sinks confirmed):
  neither side waits on the other;
- the assignment's hooks do not seek: they say where each partition resumes, and the
  callback assigns the partitions at those offsets (the write log's last record, the
  beginning of a recreated topic, else the committed offset);
- a ``consume`` during which a callback ran is dropped whole, and the partitions
  assigned again at those offsets: its messages from before the rebalance are not
  the new assignment's (librdkafka returns them in the same call);
- a batch fetched before a rebalance is dropped (``generation``): the assignment
  resumes each partition at or before it, so it is fetched again.

librdkafka reports a record batch it cannot read (bad CRC, corrupt compressed data)
as a message whose ``error()`` is set, at the batch's first offset, and again on every
fetch (it does not move past it): the host seeks past the batch (its end read from the
batch header through aiokafka) and returns it as one rejected record with that reason,
dead-lettered like the aiokafka host's undecodable batches.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiokafka import TopicPartition

from driftline.streams.ingest.kafka_host import (
    CUT_OFF_MS,
    HostHooks,
    InFlight,
    KafkaHost,
    failed_batch_end,
    read_alone,
)

if TYPE_CHECKING:
    from driftline.streams.worker import WorkerConfig

log = logging.getLogger("driftline.worker")

__all__ = ["LibrdkafkaHost", "ConsumerThread", "Rec", "librdkafka_config", "group_messages"]

#: librdkafka's statistics interval: how fresh :meth:`LibrdkafkaHost.cut_off`'s view of the brokers is
STATS_MS = 500


class Rec:
    """A fetched record as the decoder reads it (the attributes of aiokafka's
    ``ConsumerRecord`` that :class:`~driftline.streams.ingest.transforms.Record` names)."""

    __slots__ = ("topic", "partition", "offset", "timestamp", "key", "value", "headers")

    def __init__(self, topic: str, partition: int, offset: int, timestamp: int, key: bytes | None,
                 value: bytes | None, headers: Any) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.timestamp = timestamp
        self.key = key
        self.value = value
        self.headers = headers or ()


def group_messages(msgs: list[Any]) -> tuple[dict[TopicPartition, list[Rec]],
                                               dict[TopicPartition, tuple[int, int, str]]]:
    """confluent-kafka messages as records per partition, and per partition the
    offsets librdkafka could not read (first, last, reason), from its error messages.
    An error naming no partition (broker down, unknown topic) is logged, not raised:
    librdkafka retries on its own."""
    from confluent_kafka import KafkaError

    data: dict[tuple[str, int], list[Rec]] = {}
    bad: dict[TopicPartition, tuple[int, int, str]] = {}
    for m in msgs:
        err = m.error()
        if err is None:
            t, p = m.topic(), m.partition()
            lst = data.get((t, p))
            if lst is None:
                lst = data[(t, p)] = []
            lst.append(Rec(t, p, m.offset(), m.timestamp()[1], m.key(), m.value(), m.headers()))
            continue
        if err.code() == KafkaError._PARTITION_EOF:
            continue
        off, t, p = m.offset(), m.topic(), m.partition()
        if t is None or p is None or off is None or off < 0:
            log.warning("Kafka consumer: %s", err.str())
            continue
        tp = TopicPartition(t, p)
        why = f"KafkaError {err.name()}: {err.str()}"
        first, last, reason = bad.get(tp, (off, off, why))
        bad[tp] = (min(first, off), max(last, off), reason)
    return {TopicPartition(t, p): recs for (t, p), recs in data.items()}, bad


async def batch_end(cfg: WorkerConfig, tp: TopicPartition, pos: int) -> int:
    """The last offset of the record batch at ``pos`` that librdkafka could not read,
    from its header: read by a consumer of no group on aiokafka, whose unpacking error
    carries the header (:func:`~driftline.streams.ingest.kafka_host.failed_batch_end`).
    ``pos`` itself when aiokafka reads the record (one offset skipped at a time) or
    the read fails."""
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(bootstrap_servers=cfg.kafka, group_id=None, enable_auto_commit=False,
                         auto_offset_reset="earliest", **cfg.kafka_security.aiokafka_kwargs())
    try:
        await c.start()
        c.assign([tp])
        c.seek(tp, pos)
        _, err = await read_alone(c, tp, 1, 2_000)
        if err is not None:
            return failed_batch_end(err, pos)
    except Exception as exc:  # noqa: BLE001 - one offset skipped at a time then
        log.warning("%s[%d]: reading the undecodable batch's header failed: %s", tp.topic, tp.partition, exc)
    finally:
        with contextlib.suppress(Exception):
            await c.stop()
    return pos


def librdkafka_config(cfg: WorkerConfig) -> dict[str, Any]:
    """The group consumer's librdkafka settings, from the worker's (the same as
    :func:`~driftline.streams.ingest.kafka_host.group_consumer`'s; CRCs checked, as
    aiokafka does; rebalance timeout = ``max.poll.interval.ms`` in librdkafka)."""
    return {
        "bootstrap.servers": cfg.kafka, "group.id": cfg.group_id, "enable.auto.commit": False,
        "enable.auto.offset.store": False, "auto.offset.reset": cfg.auto_offset_reset,
        "max.partition.fetch.bytes": 8 << 20, "fetch.max.bytes": 64 << 20,
        "session.timeout.ms": cfg.session_timeout_ms,
        "heartbeat.interval.ms": max(500, min(3_000, cfg.session_timeout_ms // 4)),
        "max.poll.interval.ms": max(600_000, cfg.rebalance_timeout_ms), "check.crcs": True,
        "statistics.interval.ms": STATS_MS, "enable.partition.eof": False,
        "logger": logging.getLogger("driftline.librdkafka"),
        **cfg.kafka_security.confluent_config(),
    }


class ConsumerThread:
    """One thread that runs every call on the consumer, in order.

    :meth:`wait` is for a rebalance callback (on this thread, inside ``consume``) that
    waits on the event loop: it runs the calls queued meanwhile until the loop answers,
    so a hook that commits (on this thread) while the callback waits cannot deadlock.
    """

    def __init__(self, name: str = "driftline-consumer") -> None:
        self._q: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], concurrent.futures.Future[Any]] | None] \
            = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        #: True while a rebalance callback waits on the event loop (calls are run by :meth:`wait`)
        self.in_callback = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Run ``fn(*args)`` on the consumer thread; an awaitable of its result."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._q.put((fn, args, fut))
        return asyncio.wrap_future(fut)

    def stop(self) -> None:
        """End the thread once the calls queued before are run."""
        self._q.put(None)

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            self._do(item)

    @staticmethod
    def _do(item: tuple[Callable[..., Any], tuple[Any, ...], concurrent.futures.Future[Any]]) -> None:
        fn, args, fut = item
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            fut.set_exception(exc)

    def wait(self, fut: concurrent.futures.Future[Any]) -> Any:
        """On the consumer thread: ``fut``'s result, running queued calls meanwhile."""
        self.in_callback = True
        try:
            while not fut.done():
                try:
                    item = self._q.get(timeout=0.02)
                except queue.Empty:
                    continue
                if item is None:  # stopping: keep the sentinel for _run
                    self._q.put(None)
                    break
                self._do(item)
            return fut.result()
        finally:
            self.in_callback = False


class LibrdkafkaHost(KafkaHost):
    """:class:`KafkaHost` on a confluent-kafka ``Consumer`` (see the module docstring)."""

    def __init__(self, cfg: WorkerConfig, hooks: HostHooks, pool: concurrent.futures.Executor) -> None:
        super().__init__(cfg, hooks, pool)
        self.consumer: Any = None
        self._thread: ConsumerThread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: where each partition of the assignment being handled resumes (None: its committed offset)
        self._starts: dict[TopicPartition, int | None] = {}
        #: the current assignment as given to librdkafka (with the offsets it started at)
        self._assignment: list[Any] = []
        #: rebalance callbacks run so far (a consume during which one ran is dropped)
        self._callbacks = 0
        #: seeks to apply before the next consume (on the consumer thread)
        self._seeks: dict[TopicPartition, int] = {}
        #: messages a hold's poll returned, handed out by the next fetch
        self._carry: list[Any] = []
        self._paused = False
        self._closing = False
        #: from librdkafka's statistics: the assigned partitions whose leader is connected, and when
        self._up: set[tuple[str, int]] = set()
        self._stats_at = 0.0
        #: per partition: the last offset of the last undecodable batch skipped
        self._skipped_to: dict[TopicPartition, int] = {}

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        from confluent_kafka import Consumer

        self._loop = asyncio.get_running_loop()
        self._thread = ConsumerThread()
        conf = {**librdkafka_config(self.cfg), "stats_cb": self._on_stats}

        def make() -> Any:
            c = Consumer(conf)
            c.subscribe(list(self.cfg.host_topics), on_assign=self._cb_assign, on_revoke=self._cb_revoke,
                        on_lost=self._cb_revoke)
            return c
        self.consumer = await self._thread.submit(make)

    async def stop(self) -> None:
        if self.consumer is None or self._thread is None:
            return
        self._closing = True  # close() revokes: the worker's writes are already finished
        c, self.consumer = self.consumer, None
        with contextlib.suppress(Exception):
            await self._thread.submit(c.close)
        self._thread.stop()

    def cut_off(self) -> bool:
        """True while fetching is paused, nothing is assigned, or an assigned partition's
        leader is not connected by librdkafka's last statistics (or they are older than
        2 s): an empty fetch then says nothing about traffic."""
        if self.consumer is None:
            return False
        if not self.assigned or self._paused:
            return True
        if time.monotonic() - self._stats_at > CUT_OFF_MS / 1000:
            return True
        return any((tp.topic, tp.partition) not in self._up for tp in self.assigned)

    def _on_stats(self, stats: str) -> None:
        """librdkafka's statistics (on the consumer thread): which partitions' leaders are up."""
        try:
            st = json.loads(stats)
            # real brokers only: librdkafka's logical "GroupCoordinator" broker has nodeid -1 (and is UP
            # while the coordinator is), which is also the leader of a partition whose leader is unknown
            up_nodes = {b.get("nodeid") for b in st.get("brokers", {}).values()
                        if b.get("state") == "UP" and isinstance(b.get("nodeid"), int) and b["nodeid"] >= 0}
            self._up = {(t, int(p)) for t, td in st.get("topics", {}).items()
                        for p, pd in td.get("partitions", {}).items()
                        if int(p) >= 0 and pd.get("leader") in up_nodes}
            self._stats_at = time.monotonic()
        except (ValueError, TypeError, AttributeError) as exc:
            log.debug("unreadable librdkafka statistics: %s", exc)

    async def hold(self) -> None:
        """While a sink is down: pause every assigned partition and poll once (rebalance
        callbacks served; heartbeats run on librdkafka's own thread), fetching nothing."""
        if self.consumer is None or self._thread is None:
            return
        with contextlib.suppress(Exception):
            await self._thread.submit(self._hold_now)

    def _hold_now(self) -> None:
        from confluent_kafka import TopicPartition as CkTp

        c = self.consumer
        if c is None or self._thread is None or self._thread.in_callback:
            return  # in a rebalance: nothing to pause, and consume is not re-entrant
        parts = c.assignment()
        if parts:
            c.pause([CkTp(p.topic, p.partition) for p in parts])
            self._paused = True
        # polled even with nothing assigned: between an eager rebalance's revocation and
        # its assignment only this poll serves the assignment callback while the fetch
        # loop waits on the writer (the whole group would wait for this member otherwise)
        n = self._callbacks
        got = c.consume(self.cfg.max_batch, 0)
        if self._callbacks != n:
            self._reassign()
        else:
            self._carry.extend(got)  # fetched before the pause: handed out next, not lost

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """A write step is safe: resume fetching, commit its offsets (of the partitions
        still assigned; a failure is logged: the write log holds the offsets)."""
        if self.consumer is None or self._thread is None:
            return
        try:
            await self._thread.submit(self._commit_now, offsets)
        except Exception as exc:  # noqa: BLE001 - rebalance in flight: the write log makes it safe
            log.warning("offset commit failed (the write log holds the offsets): %s", exc)

    def _commit_now(self, offsets: Mapping[TopicPartition, int]) -> None:
        from confluent_kafka import TopicPartition as CkTp

        c = self.consumer
        if c is None:
            return
        parts = c.assignment()
        if self._paused and parts:
            c.resume([CkTp(p.topic, p.partition) for p in parts])
            self._paused = False
        have = {(p.topic, p.partition) for p in parts}
        commit = [CkTp(tp.topic, tp.partition, off) for tp, off in offsets.items() if (tp.topic, tp.partition) in have]
        if commit:
            c.commit(offsets=commit, asynchronous=False)

    # ------------------------------------------------------------------ fetch
    async def _get(self, busy: bool) -> tuple[Mapping[TopicPartition, list[Any]],
                                               dict[TopicPartition, tuple[int, int, str]]]:
        assert self._thread is not None
        timeout = 0.0 if busy else self.cfg.fetch_timeout_ms / 1000
        seeks, self._seeks = self._seeks, {}
        data, bad = await self._thread.submit(self._consume, timeout, seeks)
        skipped: dict[TopicPartition, tuple[int, int, str]] = {}
        for tp, (first, last, why) in bad.items():
            if tp not in self.ready:
                continue
            out = await self._skip_bad(tp, first, last, why)
            if tp in data:  # records after the bad batch are fetched again from past it
                data[tp] = [r for r in data[tp] if r.offset < first]
            if out is not None:
                skipped[tp] = out
        return data, skipped

    async def _skip_bad(self, tp: TopicPartition, pos: int, last: int, why: str) -> tuple[int, int, str] | None:
        """librdkafka reports a record batch it cannot read at the batch's first offset,
        and reports it again on every fetch: seek ``tp`` past the batch (its last offset
        read from the batch header by aiokafka, :func:`batch_end`), and return (first,
        last, reason) of its offsets above the write log (None when all are at or below
        it), as :meth:`KafkaHost._skip_batch` does."""
        end = max(last, await batch_end(self.cfg, tp, pos))
        prev = self._skipped_to.get(tp)
        if prev is not None and end <= prev:  # reported again below what was skipped: one more offset
            pos = end = prev + 1
        self._skipped_to[tp] = end
        self._seek(tp, end + 1)  # past the batch: never fetched again by this worker
        self._verify.pop(tp, None)  # the logged record cannot be read to be checked
        first = max(pos, self._skip_below.get(tp, pos))
        log.warning("%s[%d]: skipping the undecodable record batch at offsets %d to %d: %s",
                    tp.topic, tp.partition, pos, end, why)
        if first > end:
            return None
        return first, end, f"undecodable record batch (offsets {pos} to {end}): {why}"

    def _consume(self, timeout: float, seeks: dict[TopicPartition, int]) -> tuple[
            dict[TopicPartition, list[Rec]], dict[TopicPartition, tuple[int, int, str]]]:
        """On the consumer thread: the seeks asked for, then one ``consume``."""
        from confluent_kafka import TopicPartition as CkTp

        c = self.consumer
        for tp, off in seeks.items():
            try:
                c.seek(CkTp(tp.topic, tp.partition, off))
            except Exception as exc:  # noqa: BLE001 - partition no longer assigned: its new owner resumes
                log.info("%s[%d]: seek to %d not applied: %s", tp.topic, tp.partition, off, exc)
        if self._carry:  # fetched before a hold; a seeked partition's are refetched from its new offset
            got, self._carry = self._carry, []
            moved = {(tp.topic, tp.partition) for tp in seeks}
            return group_messages([m for m in got if (m.topic(), m.partition()) not in moved] if moved else got)
        n = self._callbacks
        got = c.consume(self.cfg.max_batch, timeout)
        if self._callbacks != n:  # a rebalance inside this consume: see the module docstring
            self._reassign()
            return {}, {}
        return group_messages(got)

    def _reassign(self) -> None:
        """Start every assigned partition again where its assignment put it."""
        if self._assignment and self.consumer is not None:
            self.consumer.assign(self._assignment)

    def _seek(self, tp: TopicPartition, offset: int) -> None:
        self._seeks[tp] = offset  # applied on the consumer thread before the next consume
        prev = self._skipped_to.get(tp)
        if prev is not None and offset <= prev:  # read again from before (recreated topic)
            del self._skipped_to[tp]

    def _refetch(self, stale: InFlight) -> None:
        """Drop ``stale`` (and the batch after it if it is of the same generation): the
        assignment resumed its partitions at or before it, so it is fetched again."""
        nxt = self.pending
        if nxt is not None and nxt.generation == stale.generation:
            self.pending = None
            if nxt.decoded is not None:
                nxt.decoded.cancel()
        log.info("rebalance while %d records were in flight: fetching them again", len(stale.records))

    def _positions(self) -> dict[TopicPartition, int]:
        return {}  # undecodable batches come as error messages (group_messages), not exceptions

    def _seek_resumed(self, tp: TopicPartition, target: int | None, fresh: set[TopicPartition]) -> None:
        """Where ``tp`` resumes: set in the assignment by the rebalance callback."""
        self._rewind.pop(tp, None)
        self._starts[tp] = target
        # a bad batch reported again after the assignment is not one skipped before it:
        # resumed at or before it, the batch is dropped again (its end, not one offset more)
        self._skipped_to.pop(tp, None)

    # ------------------------------------------------------------------ rebalance callbacks
    def _bridge(self, coro: Any) -> Any:
        """On the consumer thread: run ``coro`` on the event loop and wait for it."""
        assert self._loop is not None and self._thread is not None
        return self._thread.wait(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def _cb_revoke(self, consumer: Any, parts: list[Any]) -> None:
        self._callbacks += 1
        self._carry = []
        self._assignment = []
        self._paused = False
        if self._closing:
            return
        try:
            self._bridge(self._on_revoked([TopicPartition(p.topic, p.partition) for p in parts]))
        except Exception:  # noqa: BLE001 - raised into consume otherwise
            log.exception("handling the revocation failed")

    def _cb_assign(self, consumer: Any, parts: list[Any]) -> None:
        from confluent_kafka import OFFSET_BEGINNING, OFFSET_INVALID
        from confluent_kafka import TopicPartition as CkTp

        self._callbacks += 1
        self._carry = []
        self._paused = False
        if self._closing:
            return
        self._starts = {}
        try:
            self._bridge(self._on_assigned([TopicPartition(p.topic, p.partition) for p in parts]))
        except Exception:  # noqa: BLE001 - raised into consume otherwise
            log.exception("handling the assignment failed: fetching nothing")
            consumer.assign([])
            return
        out = []
        for p in parts:
            start = self._starts.get(TopicPartition(p.topic, p.partition))
            out.append(CkTp(p.topic, p.partition, OFFSET_INVALID if start is None
                            else OFFSET_BEGINNING if start == 0 else start))
        self._assignment = out
        consumer.assign(out)
        # librdkafka keeps a partition's pause across unassign/assign: one paused by a
        # hold before this rebalance would fetch nothing ever again (_paused is reset)
        consumer.resume(out)
