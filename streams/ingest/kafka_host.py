"""The worker's consumer group: its settings, rebalance callbacks, pausing and commits.

The first slice of a thin Kafka host (issue 15): what only concerns the Kafka
consumer group lives here, as small functions over an ``AIOKafkaConsumer``; the
worker (streams/worker.py) keeps what a rebalance must do to the stored data
(the write log, the read-back of the logged record, the window rebuild).

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

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

if TYPE_CHECKING:
    from driftline.streams.worker import WorkerConfig

log = logging.getLogger("driftline.worker")

__all__ = ["GroupListener", "group_consumer", "hold", "cut_off", "commit_confirmed"]

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
    """The worker's group consumer (not started), subscribed to ``cfg.topics``.

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
    consumer.subscribe(list(cfg.topics), listener=listener)
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
