"""Every Kafka compression codec through a running worker: 100 events each produced by
librdkafka (confluent-kafka) with gzip, snappy, lz4 and zstd, and by aiokafka with the
same four codecs, to the real Tansu broker; the worker stores exactly 800 rows (chDB).

Mutation caught (checked): uninstalling cramjam (the aiokafka[snappy,lz4,zstd] extras)
makes getmany raise UnsupportedCodecError on the first snappy batch and the worker dies.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from helpers_worker import wait_for

from driftline.streams.app import serve_worker
from driftline.streams.local.broker import free_port
from driftline.streams.worker import Worker, WorkerConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]
confluent_kafka = pytest.importorskip("confluent_kafka")

CODECS = ("gzip", "snappy", "lz4", "zstd")
N = 100


def _event(tag: str, i: int, now_ms: int) -> bytes:
    return json.dumps({"event_id": f"{tag}-{i}", "app": tag, "request_model": "gpt-4o",
                       "timestamp": now_ms - 60_000 + i, "latency_ms": 10.0, "input_tokens": 1,
                       "prompt": "the same words again and again " * 8}).encode()


def _produce_librdkafka(bootstrap: str, topic: str, codec: str, now_ms: int) -> None:
    p = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "compression.type": codec,
                                  "linger.ms": 50, "acks": "all"})
    for i in range(N):
        p.produce(topic, _event(f"rd-{codec}", i, now_ms), partition=0)
    assert p.flush(30) == 0, f"librdkafka {codec}: not every record acknowledged"


async def _produce_aiokafka(bootstrap: str, topic: str, codec: str, now_ms: int) -> None:
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, compression_type=codec, linger_ms=50)
    await p.start()
    try:
        futs = [await p.send(topic, _event(f"aio-{codec}", i, now_ms), partition=0) for i in range(N)]
        await asyncio.gather(*futs)
    finally:
        await p.stop()


async def test_every_codec_from_librdkafka_and_aiokafka_is_stored(kafka_bootstrap: str, make_topics: Any,
                                                                   chdb_dsn: str) -> None:
    topic = f"c-{uuid.uuid4().hex[:10]}"
    make_topics({topic: 1, f"{topic}.dlq": 1})
    now_ms = int(time.time() * 1000)
    for codec in CODECS:
        await asyncio.to_thread(_produce_librdkafka, kafka_bootstrap, topic, codec, now_ms)
    cfg = WorkerConfig(kafka=kafka_bootstrap, clickhouse=chdb_dsn, group_id=f"g-{uuid.uuid4().hex[:8]}",
                       topics=(topic,), dlq_topic=f"{topic}.dlq", emit_interval_s=0.5, idle_close_s=1.0)
    stop = asyncio.Event()
    box: list[Worker] = []
    task = asyncio.create_task(serve_worker(cfg, stop, web_port=free_port(), sql_port=None,
                                            on_ready=box.append))
    try:
        await wait_for(lambda: bool(box) or task.done(), 30, lambda: "worker never became ready")
        if task.done():
            task.result()
        w = box[0]
        for total in (len(CODECS) * N, 2 * len(CODECS) * N):
            if total > len(CODECS) * N:  # then the same through aiokafka's producer
                for codec in CODECS:
                    await _produce_aiokafka(kafka_bootstrap, topic, codec, now_ms)
            await wait_for(lambda t=total: w.stored_events >= t or task.done(), 60,  # type: ignore[misc]
                           lambda t=total: f"stored {w.stored_events}/{t}")  # type: ignore[misc]
            if task.done():
                task.result()  # shows why the worker died
        assert w.stored_events == total and w.dead_lettered == 0
        rows = await asyncio.to_thread(w.sink.query_rows,
                                       f"SELECT app, count() FROM {w.sink.database}.llm_events GROUP BY app", None)
        assert dict(rows) == {f"{lib}-{c}": N for lib in ("rd", "aio") for c in CODECS}
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
