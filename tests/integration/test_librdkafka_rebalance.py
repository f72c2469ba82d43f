"""The librdkafka host across a rebalance while a sink is down (the real Tansu broker,
confluent-kafka; the worker's hooks replaced by plain functions that record what is
delivered and commit it on revocation, as the worker's drain does: no ClickHouse is
involved in this scenario).

While ClickHouse is down the fetch loop waits on the writer, and only the writer's
``hold`` (every 0.5 s) polls librdkafka, which runs rebalance callbacks only inside a
poll. Scenario: worker A holds, a second member B joins (the group rebalances inside
A's holds), ClickHouse comes back (A commits), B leaves, new records arrive.
Asserted: A gets its share of the partitions while holding, then fetches exactly the
new records of both partitions, once.

Mutations caught (checked): ``_hold_now`` returning when nothing is assigned (the
eager rebalance's revocation empties the assignment: A never polls again, never gets
its assignment, and the group waits for it up to max.poll.interval.ms, 10 min); no
``resume`` of the assigned partitions in ``LibrdkafkaHost._cb_assign`` (librdkafka
keeps a partition's pause across unassign/assign, measured on 2.16: A fetches nothing
after the rebalance, ever, while the host believes its partitions resumed).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import uuid
from typing import Any

import pytest
from aiokafka import TopicPartition
from confluent_kafka import Consumer, Producer
from helpers_worker import SESSION_MS

from driftline.streams.ingest.kafka_host import HostHooks, InFlight
from driftline.streams.ingest.librdkafka_host import LibrdkafkaHost
from driftline.streams.worker import WorkerConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _produce(bootstrap: str, topic: str, per_partition: int, start: int) -> None:
    p = Producer({"bootstrap.servers": bootstrap})
    for i in range(start, start + per_partition):
        for part in (0, 1):
            p.produce(topic, b"v%d" % i, partition=part)
    assert p.flush(10) == 0


async def test_a_rebalance_during_a_hold_leaves_no_partition_paused(kafka_bootstrap: str, make_topics: Any) -> None:
    topic = f"t-{uuid.uuid4().hex[:10]}"
    make_topics({topic: 2})
    _produce(kafka_bootstrap, topic, 5, 0)
    got: list[tuple[int, int]] = []
    done: dict[TopicPartition, int] = {}

    async def deliver(batch: InFlight, decoded: Any) -> None:
        got.extend((r.partition, r.offset) for r in batch.records)
        done.update(batch.offsets)

    async def revoke() -> None:  # as the worker's drain: what was delivered is stored and committed
        await a.commit(dict(done))

    async def nothing(*a: Any) -> Any:
        return {}

    hooks = HostHooks(decode=lambda recs: None, deliver=deliver, revoke=revoke, resume=nothing,
                      recreated=lambda tp, why: None, assigned=nothing)
    group = f"g-{uuid.uuid4().hex[:8]}"
    cfg = WorkerConfig(kafka=kafka_bootstrap, clickhouse="chdb:///unused", group_id=group, topics=(topic,),
                       session_timeout_ms=SESSION_MS, auto_offset_reset="earliest")
    pool = concurrent.futures.ThreadPoolExecutor(1)
    a = LibrdkafkaHost(cfg, hooks, pool)
    stop_b = threading.Event()
    b_thread: threading.Thread | None = None
    await a.start()
    try:
        async def fetch_until(cond: Any, timeout: float, what: Any) -> None:
            async def loop() -> None:
                while not cond():
                    await a.fetch()
            try:
                await asyncio.wait_for(loop(), timeout)
            except TimeoutError:
                raise AssertionError(what()) from None

        await fetch_until(lambda: len(got) == 10, 60, lambda: f"A delivered {got}")
        await a.finish()
        await a.commit({TopicPartition(topic, p): 5 for p in (0, 1)})
        # ClickHouse down: the writer holds every 0.5 s; B joins meanwhile
        await a.hold()
        assert a._paused

        def member_b() -> None:
            c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False,
                          "session.timeout.ms": SESSION_MS, "auto.offset.reset": "latest"})
            c.subscribe([topic])
            while not stop_b.is_set():
                c.poll(0.1)
            c.close()
        b_thread = threading.Thread(target=member_b, daemon=True)
        b_thread.start()
        gen = a.generation

        async def held_through_rebalance() -> None:
            while not (a.generation > gen and len(a.ready) == 1 and not a._thread.in_callback):  # type: ignore[union-attr]
                await a.hold()
                await asyncio.sleep(0.5)
        try:
            await asyncio.wait_for(held_through_rebalance(), 30)
        except TimeoutError:
            raise AssertionError(f"A never got its new assignment while holding: {sorted(a.ready)}") from None
        assert len(a.assigned) == 1  # the group rebalanced while A held (its callbacks served)
        # ClickHouse is back: the pending write step lands and commits; B leaves, A owns both again
        await a.commit({})
        stop_b.set()
        await asyncio.to_thread(b_thread.join, 30)
        got.clear()
        _produce(kafka_bootstrap, topic, 3, 5)
        await fetch_until(lambda: len(got) >= 6 and len(a.ready) == 2, 60,
                          lambda: f"A (owning {sorted(a.ready)}) fetched {got} after the rebalance")
        for _ in range(5):
            await a.fetch()
        await a.finish()
        assert sorted(got) == [(p, off) for p in (0, 1) for off in (5, 6, 7)]
    finally:
        stop_b.set()
        await a.stop()
        if b_thread is not None:
            await asyncio.to_thread(b_thread.join, 30)
        pool.shutdown()
