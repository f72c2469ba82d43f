"""A record batch the worker cannot unpack is dead-lettered and skipped, never a crash.

The worker runs in a subprocess whose aiokafka cannot import cramjam (the snappy
library), fed by the real Tansu broker: 100 plain events, one snappy record batch
of 50 (produced here, where cramjam exists), 100 plain, another snappy batch of 50.
getmany raises UnsupportedCodecError on a snappy batch, naming no partition.

Asserted (chDB, the DLQ topic): the worker stays up, exactly 200 events are stored
(200 distinct), the DLQ holds exactly one record per snappy batch (source offsets
100 and 250, index 0) with the exact reason naming the batch's offsets; a restarted
worker, whose write log ends inside the last snappy batch, stores and dead-letters
nothing more.

Mutations caught (checked): without the ``except`` around getmany in
``KafkaHost.fetch`` the worker dies with UnsupportedCodecError (the
subprocess exits, 100 rows stored); without the seek past the batch in
``KafkaHost._skip_batch`` it refetches the batch forever (the DLQ gets the record
again on every fetch, and the second 100 events are never stored).
"""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

pytestmark = [pytest.mark.integration, pytest.mark.slow]
pytest.importorskip("cramjam")  # this process writes the snappy batch

NO_SNAPPY_WORKER = """
import asyncio, json, sys, time
sys.modules["cramjam"] = None  # aiokafka then has no snappy, lz4 or zstd decoder
from aiokafka import TopicPartition
from driftline.streams.worker import Worker, WorkerConfig
kafka, dsn, topic, group, want, settle = sys.argv[1:7]

async def main() -> None:
    w = Worker(WorkerConfig(kafka=kafka, clickhouse=dsn, group_id=group, topics=(topic,), dlq_topic=topic + ".dlq",
                            max_event_age_s=1e10, min_insert_rows=1, emit_interval_s=0.2, fetch_timeout_ms=200,
                            session_timeout_ms=3_000, consumer="aiokafka"))  # aiokafka: its codecs are what this test removes; the group's first assignment waits about half of it
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    deadline = time.monotonic() + 40
    while not task.done() and (w.stored_events + w.dead_lettered < int(want) or not w._ready) \\
            and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(float(settle))  # anything stored or dead-lettered twice lands now
    alive = not task.done()
    position = await w.consumer.position(TopicPartition(topic, 0)) if alive else None
    stop.set()
    await task  # raises what killed the worker
    rows = w.sink.query_rows(f"SELECT count(), uniqExact(event_id) FROM {w.sink.database}.llm_events", None)
    print(json.dumps({"alive": alive, "position": position, "stored": w.stored_events, "dead_lettered": w.dead_lettered,
                      "rows": list(rows[0])}))

asyncio.run(main())
"""
REASON = ("undecodable record batch (offsets {} to {}): "
          "UnsupportedCodecError: Libraries for snappy compression codec not found")


def _event(i: int, now_ms: int) -> bytes:
    return json.dumps({"event_id": f"e-{i}", "app": "a", "request_model": "gpt-4o", "timestamp": now_ms + i,
                       "latency_ms": 10.0, "input_tokens": 1}).encode()


async def _dlq(kafka: str, topic: str) -> collections.Counter[tuple[int, int, str]]:
    """(source offset, index, reason) of every DLQ record, counted."""
    c = AIOKafkaConsumer(topic, bootstrap_servers=kafka, group_id=None, auto_offset_reset="earliest",
                         enable_auto_commit=False)
    await c.start()
    out: collections.Counter[tuple[int, int, str]] = collections.Counter()
    try:
        empty = 0
        while empty < 3:
            data = await c.getmany(timeout_ms=500)
            empty = 0 if any(data.values()) else empty + 1
            for recs in data.values():
                for r in recs:
                    h = dict(r.headers)
                    out[(int(h["driftline-source-offset"]), int(h.get("driftline-source-index", b"0")),
                         h["driftline-reason"].decode())] += 1
    finally:
        await c.stop()
    return out


def _run(script: Path, args: list[str], want: int, settle: float) -> dict[str, Any]:
    """Run the worker until it stored or dead-lettered ``want`` records, then ``settle`` s more."""
    proc = subprocess.run([sys.executable, str(script), *args, str(want), str(settle)], capture_output=True,
                          timeout=90)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


async def test_undecodable_batch_is_dead_lettered_and_skipped(tmp_path: Path, kafka_bootstrap: str,
                                                                make_topics: Any, chdb_dsn: str) -> None:
    topic, group = f"u-{uuid.uuid4().hex[:10]}", f"g-{uuid.uuid4().hex[:8]}"
    make_topics({topic: 1, f"{topic}.dlq": 1})
    now_ms = int(time.time() * 1000)
    plain = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    snappy = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, compression_type="snappy")
    await plain.start()
    await snappy.start()
    try:
        for lo in (0, 150):  # plain 0-99, snappy 100-149, plain 150-249, snappy 250-299
            await asyncio.gather(*[await plain.send(topic, _event(i, now_ms), partition=0)
                                   for i in range(lo, lo + 100)])
            batch = snappy.create_batch()  # one record batch of 50
            for i in range(lo + 100, lo + 150):
                assert batch.append(key=None, value=_event(i, now_ms), timestamp=None) is not None
            await (await snappy.send_batch(batch, topic, partition=0))
    finally:
        await plain.stop()
        await snappy.stop()
    script = tmp_path / "worker.py"
    script.write_text(NO_SNAPPY_WORKER)
    args = [kafka_bootstrap, chdb_dsn, topic, group]
    dlq = {(100, 0, REASON.format(100, 149)): 1, (250, 0, REASON.format(250, 299)): 1}
    first = await asyncio.to_thread(_run, script, args, 202, 2.0)
    assert first == {"alive": True, "position": 300, "stored": 200, "dead_lettered": 2, "rows": [200, 200]}
    assert await _dlq(kafka_bootstrap, f"{topic}.dlq") == dlq
    # restarted: its write log ends at 299, inside the second undecodable batch; it resumes there
    again = await asyncio.to_thread(_run, script, args, 0, 3.0)
    assert again == {"alive": True, "position": 300, "stored": 0, "dead_lettered": 0, "rows": [200, 200]}
    assert await _dlq(kafka_bootstrap, f"{topic}.dlq") == dlq
