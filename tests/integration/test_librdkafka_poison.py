"""A record batch librdkafka cannot read is dead-lettered once and skipped (the worker
on ``consumer="librdkafka"``, the real Tansu broker, real chDB).

The topic holds 100 events, one gzip record batch of 50 whose compressed bytes are not
gzip (produced by aiokafka's pure-Python builder with its gzip encoder replaced; the
batch's CRC is valid), then 100 events. librdkafka reports the batch as an error at
offset 100 on every fetch and never moves past it on its own.

Asserted: exactly the 200 good events stored (200 distinct in chDB), exactly one DLQ
record, at source offset 100, whose reason names the whole batch (offsets 100 to 149)
and librdkafka's error.

Mutations caught (checked): without the seek past the batch in
``LibrdkafkaHost._skip_bad`` the worker dead-letters offset 100 on every fetch and never
stores the last 100 events; with the batch's end not read from its header
(``batch_end`` returning ``pos``) the batch is skipped one offset per fetch: 50 DLQ
records instead of one.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from helpers_worker import SESSION_MS, wait_for

from driftline.streams.worker import Worker, WorkerConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PRODUCER = textwrap.dedent("""
    import asyncio, json, sys
    import aiokafka.record.default_records as dr  # pure Python (AIOKAFKA_NO_EXTENSIONS): patchable
    from aiokafka import AIOKafkaProducer
    kafka, topic, now_ms = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def event(i):
        return json.dumps({"event_id": f"e-{i}", "app": "a", "request_model": "gpt-4o", "timestamp": now_ms + i,
                           "latency_ms": 10.0, "input_tokens": 1}).encode()

    async def main():
        plain = AIOKafkaProducer(bootstrap_servers=kafka)
        gz = AIOKafkaProducer(bootstrap_servers=kafka, compression_type="gzip")
        await plain.start(); await gz.start()
        await asyncio.gather(*[await plain.send(topic, event(i), partition=0) for i in range(100)])
        real, dr.gzip_encode = dr.gzip_encode, lambda data, *a, **k: b"\\x1f\\x8bnot gzip" + bytes(32)
        batch = gz.create_batch()
        for i in range(100, 150):
            assert batch.append(key=None, value=event(i), timestamp=None) is not None
        await (await gz.send_batch(batch, topic, partition=0))
        dr.gzip_encode = real
        await asyncio.gather(*[await plain.send(topic, event(i), partition=0) for i in range(150, 250)])
        await plain.stop(); await gz.stop()

    asyncio.run(main())
""")
PREFIX = "undecodable record batch (offsets 100 to 149): KafkaError _BAD_COMPRESSION: Decompression (codec 0x1) " \
         "of message at 100 of "
SUFFIX = " bytes failed: Local: Invalid compressed data"


async def _dlq(kafka: str, topic: str) -> collections.Counter[tuple[int, str]]:
    """(source offset, reason) of every DLQ record, counted."""
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(topic, bootstrap_servers=kafka, group_id=None, auto_offset_reset="earliest",
                         enable_auto_commit=False)
    await c.start()
    out: collections.Counter[tuple[int, str]] = collections.Counter()
    try:
        empty = 0
        while empty < 3:
            data = await c.getmany(timeout_ms=500)
            empty = 0 if any(data.values()) else empty + 1
            for recs in data.values():
                for r in recs:
                    h = dict(r.headers)
                    out[(int(h["driftline-source-offset"]), h["driftline-reason"].decode())] += 1
    finally:
        await c.stop()
    return out


async def test_unreadable_batch_dead_lettered_once_and_skipped(tmp_path: Path, kafka_bootstrap: str,
                                                               make_topics: Any, chdb_dsn: str) -> None:
    topic = f"r-{uuid.uuid4().hex[:10]}"
    make_topics({topic: 1, f"{topic}.dlq": 1})
    script = tmp_path / "produce.py"
    script.write_text(PRODUCER)
    proc = await asyncio.to_thread(subprocess.run, [sys.executable, str(script), kafka_bootstrap, topic,
                                                    str(int(time.time() * 1000))],
                                   capture_output=True, timeout=60, env={**os.environ, "AIOKAFKA_NO_EXTENSIONS": "1"})
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]

    w = Worker(WorkerConfig(kafka=kafka_bootstrap, clickhouse=chdb_dsn, group_id=f"g-{uuid.uuid4().hex[:8]}",
                            topics=(topic,), dlq_topic=f"{topic}.dlq", max_event_age_s=1e10, min_insert_rows=1,
                            session_timeout_ms=SESSION_MS, consumer="librdkafka"))
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    try:
        await wait_for(lambda: w.stored_events + w.dead_lettered >= 201 or task.done(), 60,
                       lambda: f"stored {w.stored_events}, dead-lettered {w.dead_lettered}")
        await asyncio.sleep(2.0)  # a batch dead-lettered again would land now
        assert not task.done()
        assert (w.stored_events, w.dead_lettered) == (200, 1)
    finally:
        stop.set()
        await task
    try:  # the stopped worker closed its store: this opens it again, so close it after (one chDB path per process)
        rows = w.sink.query_rows(f"SELECT count(), uniqExact(event_id) FROM {w.sink.database}.llm_events", None)
    finally:
        w.sink.close()
    assert list(rows[0]) == [200, 200]
    dlq = await _dlq(kafka_bootstrap, f"{topic}.dlq")
    assert len(dlq) == 1 and sum(dlq.values()) == 1, json.dumps(list(dlq))
    (off, reason), = dlq
    assert off == 100 and reason.startswith(PREFIX) and reason.endswith(SUFFIX), reason
