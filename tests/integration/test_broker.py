"""The real local broker: produce with kafka-python, consume with aiokafka, exact counts."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer
from kafka import KafkaProducer

pytestmark = pytest.mark.integration


async def _consume_all(bootstrap: str, topic: str, expected: int) -> list[bytes]:
    c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                         group_id=None, enable_auto_commit=False)
    await c.start()
    out: list[bytes] = []
    try:
        deadline = asyncio.get_running_loop().time() + 20
        while len(out) < expected and asyncio.get_running_loop().time() < deadline:
            batch = await c.getmany(timeout_ms=500)
            for recs in batch.values():
                out.extend(r.value for r in recs)
    finally:
        await c.stop()
    return out


def test_produce_and_consume_exact(kafka_bootstrap: str, topic_name: str, make_topics) -> None:
    make_topics({topic_name: 3})
    p = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for i in range(300):
        p.send(topic_name, f"m{i}".encode(), key=f"k{i % 7}".encode())
    p.flush()
    p.close()
    got = asyncio.run(_consume_all(kafka_bootstrap, topic_name, 300))
    assert sorted(got) == sorted(f"m{i}".encode() for i in range(300))
