"""The control topic: one broadcast consumer that hands each command to its subscribers.

``driftline.control`` carries JSON commands ``{"cmd": ...}``: ``flush`` (write the open
windows now: :meth:`~driftline.streams.worker.Worker.request_flush`) and ``baseline``
(rebase, pin or reset drift references: the drift stage's
:meth:`~driftline.streams.stages.semantic_drift.DriftStage.on_command`). Every worker
must see every command, so the :class:`ControlConsumer` has no consumer group: it
assigns itself every partition of its topics. A :class:`Subscription` names the
commands it takes (``cmds``; None: every command no other subscription of the topic
names) and whether it also wants the records already on the topic when the consumer
started (``replay``): the drift stage reads the topic from its start and skips what
``drift_control_log`` says it applied, so a worker that was down applies what it
missed; ``flush`` only acts on commands sent while the worker runs. The wiring
(streams/wiring.py) makes the subscriptions; the host (streams/app.py) runs the
consumer once the worker's stages have started.

Signatures (streams/ingest/control_auth.py) are checked by each subscriber, which
knows whether a command is new to it; one bad record (not JSON, nested too deep, a
failing handler) is logged and skipped, never ends the consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from driftline.streams.ingest.control_auth import admit
from driftline.streams.ports import ControlAuth, KafkaPort

log = logging.getLogger("driftline.control")

#: how often a control topic that did not exist at start is looked for again
_LOOK_AGAIN_S = 5.0

__all__ = ["ControlRecord", "Subscription", "ControlConsumer", "decode_record", "handle_control"]


@dataclass(frozen=True)
class ControlRecord:
    """One decoded command of a control topic and where it was read."""

    cmd: dict[str, Any]
    topic: str
    partition: int
    offset: int
    timestamp: int

    @property
    def name(self) -> str:
        """The command: ``cmd["cmd"]`` (``flush``, ``baseline``, ...)."""
        return str(self.cmd["cmd"])


@dataclass(frozen=True)
class Subscription:
    """Who gets which commands of ``topic``.

    ``cmds``: the commands ``handler`` takes; None takes every command that no other
    subscription of the topic names. ``replay``: also the records that were on the topic
    when the consumer started (read from its beginning); else only those sent after.
    """

    topic: str
    handler: Callable[[ControlRecord], Any]
    cmds: frozenset[str] | None = None
    replay: bool = False

    def __post_init__(self) -> None:
        if not self.topic:
            raise ValueError("a subscription needs a topic")
        if self.cmds is not None and not self.cmds:
            raise ValueError("cmds must name at least one command (or be None: the others)")


def decode_record(value: bytes | None, topic: str, partition: int, offset: int,
                  timestamp: int) -> ControlRecord | None:
    """The command in one record's value, or None (logged) when it is not a JSON object
    with a string ``cmd``. Deep nesting is refused like bad JSON, never raised."""
    try:
        cmd = json.loads(value)  # type: ignore[arg-type]
    except (ValueError, TypeError, RecursionError):
        log.warning("control: record %s[%d]@%d is not JSON", topic, partition, offset)
        return None
    if not isinstance(cmd, dict) or not isinstance(cmd.get("cmd"), str):
        log.warning("control: ignoring a %s at %s[%d]@%d (expected {\"cmd\": ...})", type(cmd).__name__,
                    topic, partition, offset)
        return None
    return ControlRecord(cmd, topic, partition, offset, timestamp)


def handle_control(cmd: Any, *, auth: ControlAuth, refused: Any, flush: Callable[[], None],
                   hooks: Sequence[tuple[str, Callable[[dict[str, Any]], None]]] = ()) -> None:
    """The host's commands: ``{"cmd": "flush"}`` calls ``flush``; every admitted command
    also goes to each ``(name, hook)`` of ``hooks``. Bad commands are logged and ignored.
    With a control secret (``auth``), unsigned or badly signed commands are refused and
    counted in ``refused``. ``baseline`` commands belong to the drift stage (which checks
    them), so they are skipped here."""
    if not isinstance(cmd, dict) or not isinstance(cmd.get("cmd"), str):
        log.warning("control: ignoring a %s (expected {\"cmd\": ...})", type(cmd).__name__)
        return
    if cmd["cmd"] == "baseline":
        return
    if not admit(cmd, auth.secret, refused, max_age_s=auth.max_age_s):
        return
    if cmd["cmd"] == "flush":
        flush()
    for name, fn in hooks:
        try:
            fn(cmd)
        except Exception:  # noqa: BLE001 - a command never breaks the worker
            log.exception("control: stage %s failed on %r", name, cmd)


class ControlConsumer:
    """One group-less consumer of the subscriptions' topics (see the module docstring).

    Parameters
    ----------
    kafka
        Bootstrap servers and TLS/SASL settings.
    subscriptions
        Who gets which commands; their topics are the topics read.
    find_timeout_s
        How long to wait for a topic to appear in the metadata; a topic still missing
        then is logged and left out (its commands are off until the next start).
    """

    def __init__(self, kafka: KafkaPort, subscriptions: Sequence[Subscription], *,
                 find_timeout_s: float = 10.0) -> None:
        self.kafka = kafka
        self.subscriptions = tuple(subscriptions)
        self.find_timeout_s = find_timeout_s
        #: per (topic, partition): the end offset when the consumer started; below it a
        #: record is history (only for ``replay`` subscriptions)
        self._live_from: dict[tuple[str, int], int] = {}
        #: the partitions assigned (read alone when a fetch hits an undecodable batch)
        self._assigned: list[Any] = []
        #: topics not found yet (looked for again every _LOOK_AGAIN_S)
        self._missing: list[str] = []
        self._task: asyncio.Task[None] | None = None
        #: set once the partitions are assigned and positioned (or the consumer gave up)
        self.ready = asyncio.Event()
        self.dispatched = 0

    @property
    def topics(self) -> list[str]:
        return sorted({s.topic for s in self.subscriptions})

    # -- routing (pure) --------------------------------------------------------------
    def takers(self, rec: ControlRecord, *, live: bool) -> list[Subscription]:
        """The subscriptions ``rec`` goes to."""
        subs = [s for s in self.subscriptions if s.topic == rec.topic and (live or s.replay)]
        named = {c for s in self.subscriptions if s.topic == rec.topic and s.cmds for c in s.cmds}
        return [s for s in subs if (rec.name in s.cmds if s.cmds is not None else rec.name not in named)]

    def dispatch(self, rec: ControlRecord, *, live: bool) -> int:
        """Hand ``rec`` to its subscribers; returns how many took it. A failing handler is
        logged and the others still get the record."""
        subs = self.takers(rec, live=live)
        for s in subs:
            try:
                s.handler(rec)
            except Exception:  # noqa: BLE001 - one bad record never ends the consumer
                log.exception("control: %s command %s[%d]@%d failed", rec.name, rec.topic, rec.partition,
                              rec.offset)
        self.dispatched += len(subs)
        return len(subs)

    def on_record(self, value: bytes | None, topic: str, partition: int, offset: int, timestamp: int) -> int:
        """One raw record: decoded and dispatched (history or live by its offset)."""
        rec = decode_record(value, topic, partition, offset, timestamp)
        if rec is None:
            return 0
        return self.dispatch(rec, live=offset >= self._live_from.get((topic, partition), 0))

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Start consuming in a task of its own (returns at once; :attr:`ready` says when reading)."""
        if self._task is None and self.subscriptions:
            self._task = asyncio.create_task(self._run(), name="driftline-control")
        elif not self.subscriptions:
            self.ready.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _run(self) -> None:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(bootstrap_servers=self.kafka.bootstrap, group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest",
                                    **self.kafka.security.aiokafka_kwargs())
        await consumer.start()
        loop = asyncio.get_running_loop()
        try:
            await self._assign(consumer)
            next_look = loop.time() + _LOOK_AGAIN_S
            while True:
                if self._missing and loop.time() >= next_look:
                    await self._pick_up(consumer)
                    next_look = loop.time() + _LOOK_AGAIN_S
                if not self._assigned:
                    await asyncio.sleep(0.5)
                    continue
                try:
                    data = await consumer.getmany(timeout_ms=500)
                except Exception as exc:  # noqa: BLE001 - the consumer never ends on what it reads
                    data = await self._after_fetch_error(consumer, exc)
                self._dispatch(data)
        finally:
            self.ready.set()
            with contextlib.suppress(Exception):
                await consumer.stop()

    def _dispatch(self, data: dict[Any, Any]) -> None:
        for tp, recs in data.items():
            for r in recs:
                self.on_record(r.value, tp.topic, tp.partition, r.offset, r.timestamp)

    async def _after_fetch_error(self, consumer: Any, exc: Exception) -> dict[Any, Any]:
        """A fetch failed. A record batch aiokafka cannot unpack (a codec library missing,
        corrupt data, a bad CRC) is skipped, as the worker's host does: each partition is
        read alone, and the one that raises is moved past its failing batch (the replayed
        topic would otherwise hit it at every start). Anything else is logged and retried
        after a pause. Returns the records the partitions read alone gave."""
        from driftline.streams.ingest.kafka_host import (
            failed_batch_end,
            read_alone,
            unpacking_error,
        )

        if not unpacking_error(exc):
            log.warning("control: fetch failed (%s: %s); retrying in 1 s", type(exc).__name__, exc)
            await asyncio.sleep(1.0)
            return {}
        out: dict[Any, Any] = {}
        for tp in self._assigned:
            try:
                recs, err = await read_alone(consumer, tp, 1000, 200)
            except Exception as other:  # noqa: BLE001 - never ends the consumer
                log.warning("control: %s[%d]: fetch failed (%s); retried next round", tp.topic,
                            tp.partition, other)
                continue
            if recs:
                out[tp] = recs
            if err is not None:
                pos = await consumer.position(tp)
                end = failed_batch_end(err, pos)
                consumer.seek(tp, end + 1)
                log.warning("control: %s[%d]: skipped the undecodable record batch at offsets %d to %d: %s",
                            tp.topic, tp.partition, pos, end, err)
        return out

    async def _assign(self, consumer: Any) -> None:
        """Assign every partition of the topics found; replayed topics from their start,
        the others from their end. A topic not found yet is looked for again every
        ``_LOOK_AGAIN_S`` (:meth:`_pick_up`): created later, it is read from its start."""
        from aiokafka import TopicPartition

        found = await self._partitions(consumer)
        self._missing = sorted(set(self.topics) - set(found))
        for topic in self._missing:
            log.warning("control: topic %s not found; its commands are off until it exists "
                        "(looked for again every %.0f s)", topic, _LOOK_AGAIN_S)
        tps = [TopicPartition(t, p) for t in sorted(found) for p in sorted(found[t])]
        if tps:
            consumer.assign(tps)
            self._assigned = tps
            ends = await consumer.end_offsets(tps)
            self._live_from = {(tp.topic, tp.partition): int(off) for tp, off in ends.items()}
            replayed = {s.topic for s in self.subscriptions if s.replay}
            for tp in tps:
                if tp.topic in replayed:  # commands are rare; the subscriber skips what it applied
                    await consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, self._live_from[(tp.topic, tp.partition)])
        self.ready.set()

    async def _pick_up(self, consumer: Any) -> None:
        """Assign the partitions of the missing topics that exist now, from their start
        (everything on a topic created after this consumer started is live), keeping the
        positions of the partitions already read."""
        from aiokafka import TopicPartition

        parts = await _cluster_partitions(consumer, self._missing)
        new = [TopicPartition(t, p) for t in self._missing for p in sorted(parts.get(t, ()))]
        if not new:
            return
        at = {tp: await consumer.position(tp) for tp in self._assigned}
        consumer.assign([*self._assigned, *new])
        for tp, pos in at.items():
            consumer.seek(tp, pos)
        for tp in new:
            self._live_from[(tp.topic, tp.partition)] = 0
            await consumer.seek_to_beginning(tp)
        self._assigned = [*self._assigned, *new]
        found = {tp.topic for tp in new}
        self._missing = [t for t in self._missing if t not in found]
        log.info("control: topic(s) %s found; their commands are on", ", ".join(sorted(found)))

    async def _partitions(self, consumer: Any) -> dict[str, set[int]]:
        """The partitions of each topic found within ``find_timeout_s`` (one deadline for all)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.find_timeout_s
        while True:
            found = await _cluster_partitions(consumer, self.topics)
            if len(found) == len(self.topics) or loop.time() >= deadline:
                return found
            await asyncio.sleep(0.2)


async def _cluster_partitions(consumer: Any, topics: Sequence[str]) -> dict[str, set[int]]:
    """The partitions of those of ``topics`` that exist now, from a metadata request for
    every topic (what aiokafka's public ``topics()`` sends, keeping the partitions): a
    consumer's own metadata covers only the topics it was assigned. Empty on an error
    (the caller looks again later)."""
    try:
        cluster = await consumer._client.fetch_all_metadata()
    except Exception as exc:  # noqa: BLE001
        log.debug("control: metadata request failed: %s", exc)
        return {}
    found: dict[str, set[int]] = {}
    for topic in topics:
        parts = cluster.partitions_for_topic(topic)
        if parts:
            found[topic] = set(parts)
    return found
