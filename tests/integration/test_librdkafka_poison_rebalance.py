"""A record batch librdkafka cannot read at the END of a partition, then a rebalance
that gives the partition back to the same worker (the real Tansu broker, confluent-kafka;
the worker's hooks replaced by plain functions that keep a write log of what is
delivered, as the worker's ClickHouse log does).

The host remembers, per partition, the end of the last bad batch it skipped
(``_skipped_to``), to move one offset at a time when librdkafka reports a batch again
below it. After the rebalance the partition resumes at the write log's last record (the
bad batch's end, 149); librdkafka reports the batch again at its first offset (100).
Asserted: the batch is not dead-lettered again, and the next records produced (150-154)
are all delivered, none dead-lettered.

Mutation caught (checked): without forgetting ``_skipped_to`` on assignment the host
took the reported batch for one it had skipped and moved one offset further: record 150,
a good record (not even produced yet when skipped), was dead-lettered as undecodable and
never stored.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from confluent_kafka import Consumer, Producer
from helpers_worker import SESSION_MS
from test_librdkafka_poison import PRODUCER

from driftline.streams.ingest.kafka_host import HostHooks, InFlight, LogMark
from driftline.streams.ingest.librdkafka_host import LibrdkafkaHost
from driftline.streams.worker import WorkerConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_bad_batch_at_the_end_then_a_rebalance_skips_no_good_record(
        tmp_path: Path, kafka_bootstrap: str, make_topics: Any) -> None:
    topic, other = f"r-{uuid.uuid4().hex[:10]}", f"o-{uuid.uuid4().hex[:10]}"
    make_topics({topic: 1, other: 1})
    script = tmp_path / "produce.py"
    script.write_text(PRODUCER.replace("range(150, 250)", "range(150, 150)"))  # the bad batch ends the partition
    proc = await asyncio.to_thread(subprocess.run, [sys.executable, str(script), kafka_bootstrap, topic,
                                                    str(int(time.time() * 1000))],
                                   capture_output=True, timeout=60, env={**os.environ, "AIOKAFKA_NO_EXTENSIONS": "1"})
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    tp = TopicPartition(topic, 0)
    stored: list[int] = []
    dlq: list[tuple[int, str]] = []
    wlog: dict[TopicPartition, LogMark] = {}

    async def deliver(batch: InFlight, decoded: Any) -> None:
        stored.extend(r.offset for r in batch.records)
        dlq.extend((r.offset, r.reason) for r in batch.undecodable)
        for t, nxt in batch.offsets.items():
            wlog[t] = (nxt - 1, *batch.lasts[t])

    async def revoke() -> None:
        await a.commit({t: m[0] + 1 for t, m in wlog.items()})

    async def resume(assigned: list[TopicPartition]) -> dict[TopicPartition, LogMark]:
        return {t: wlog[t] for t in assigned if t in wlog}

    async def nothing(*a: Any) -> None:
        return None

    hooks = HostHooks(decode=lambda recs: None, deliver=deliver, revoke=revoke, resume=resume,
                      recreated=lambda tp, why: None, assigned=nothing)
    group = f"g-{uuid.uuid4().hex[:8]}"
    cfg = WorkerConfig(kafka=kafka_bootstrap, clickhouse="chdb:///unused", group_id=group, topics=(topic,),
                       session_timeout_ms=SESSION_MS, auto_offset_reset="earliest")
    pool = concurrent.futures.ThreadPoolExecutor(1)
    a = LibrdkafkaHost(cfg, hooks, pool)
    stop_b = threading.Event()
    b_thread: threading.Thread | None = None

    async def fetch_until(cond: Any, timeout: float, what: Any) -> None:
        async def loop() -> None:
            while not cond():
                await a.fetch()
            await a.finish()
        try:
            await asyncio.wait_for(loop(), timeout)
        except TimeoutError:
            raise AssertionError(what()) from None

    await a.start()
    try:
        await fetch_until(lambda: len(stored) == 100 and bool(dlq), 60,
                          lambda: f"stored {len(stored)}, dead-lettered {dlq}")
        for _ in range(3):
            await a.fetch()
        await a.finish()
        assert (stored, [o for o, _ in dlq]) == (list(range(100)), [100])

        def member_b() -> None:  # same group, another topic: A keeps its partition
            c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False,
                          "session.timeout.ms": SESSION_MS})
            c.subscribe([other])
            while not stop_b.is_set():
                c.poll(0.1)
            c.close()
        b_thread = threading.Thread(target=member_b, daemon=True)
        b_thread.start()
        gen = a.generation
        await fetch_until(lambda: a.generation >= gen + 2 and tp in a.ready, 30,
                          lambda: f"no rebalance: generation {a.generation}, ready {a.ready}")
        p = Producer({"bootstrap.servers": kafka_bootstrap})
        for i in range(5):
            p.produce(topic, b'{"event_id": "late-%d"}' % i, partition=0)
        assert p.flush(10) == 0
        await fetch_until(lambda: len(stored) + len(dlq) >= 106, 30,
                          lambda: f"stored {stored[100:]}, dead-lettered {dlq}")
        for _ in range(5):
            await a.fetch()
        await a.finish()
        assert stored == [*range(100), *range(150, 155)]
        assert [o for o, _ in dlq] == [100]
    finally:
        stop_b.set()
        await a.stop()
        if b_thread is not None:
            await asyncio.to_thread(b_thread.join, 30)
        pool.shutdown()
