"""A worker killed after ClickHouse accepted a batch and before Kafka got the offsets.

This is the window where at-least-once delivery duplicates data: the next worker
is handed the uncommitted records again. The first worker runs in a subprocess
whose ``AIOKafkaConsumer.commit`` is replaced by ``os._exit`` — the process dies
at the first commit, i.e. right after its first insert. A second worker on the
same group and chDB path must then skip what is stored (its source offsets) and
store the rest: every event exactly once, *without* ``FINAL``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest
from helpers_worker import SESSION_MS

from driftline.streams.devdata.replay import ReplayConfig, ReplayData, generate
from driftline.streams.ingest.bulk_producer import produce_records
from driftline.streams.stages.windows import WindowConfig
from driftline.streams.worker import WorkerConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

CRASHING_WORKER = textwrap.dedent("""
    import os, sys
    import aiokafka
    from driftline.streams.app import run_worker
    from driftline.streams.worker import WorkerConfig

    async def die(self, *a, **k):
        os._exit(17)  # after the insert, before the offsets reach Kafka

    aiokafka.AIOKafkaConsumer.commit = die
    from driftline.streams.ingest import librdkafka_host
    # the same moment with DRIFTLINE_CONSUMER=librdkafka (on its consumer thread)
    librdkafka_host.LibrdkafkaHost._commit_now = lambda self, offsets: os._exit(17) if offsets else None
    kafka, dsn, topic, group = sys.argv[1:5]
    run_worker(WorkerConfig(max_event_age_s=1e10, kafka=kafka, clickhouse=dsn, group_id=group, topics=(topic,),
                            dlq_topic=topic + ".dlq", max_batch=700, max_insert_rows=700,
                            consumer=os.environ.get("DRIFTLINE_CONSUMER", "aiokafka"),
                            session_timeout_ms=int(sys.argv[5])),  # the next worker waits for it to expire
               web_port=0, sql_port=None)
""")


def _count(dsn: str, sql: str) -> Any:
    c = clickhouse_connect.get_client(dsn=dsn)
    try:
        return c.query(sql).result_rows[0]
    finally:
        c.close()


async def test_kill_between_insert_and_commit_stores_each_event_once(
        kafka_bootstrap: str, make_topics: Any, chdb_dsn: str, tmp_path: Path) -> None:
    topic = f"k-{uuid.uuid4().hex[:10]}"
    group = f"g-{uuid.uuid4().hex[:10]}"
    make_topics({topic: 2, f"{topic}.dlq": 1})
    records = list(generate(ReplayConfig(n_events=6_000, seed=3, malformed_rate=0.01),
                            ReplayData.synthetic(3)))
    n_valid = sum(r.valid for r in records)
    await produce_records(kafka_bootstrap, topic, [(r.key, r.value) for r in records])

    script = tmp_path / "crashing_worker.py"
    script.write_text(CRASHING_WORKER)
    proc = await asyncio.to_thread(subprocess.run, [sys.executable, str(script), kafka_bootstrap, chdb_dsn,
                                                    topic, group, str(SESSION_MS)], capture_output=True,
                                   timeout=180)
    assert proc.returncode == 17, proc.stderr.decode()[-3000:]
    first, = _count(chdb_dsn, "SELECT count() FROM driftline.llm_events")
    assert 0 < first < n_valid, "the first worker must die part-way, after storing something"

    from driftline.streams.app import serve_worker
    from driftline.streams.local.broker import free_port

    cfg = WorkerConfig(max_event_age_s=1e10, kafka=kafka_bootstrap, clickhouse=chdb_dsn, group_id=group, topics=(topic,),
                       dlq_topic=f"{topic}.dlq", window=WindowConfig(size_ms=60_000),
                       emit_interval_s=0.5, idle_close_s=1.0, session_timeout_ms=SESSION_MS)
    stop = asyncio.Event()
    box: list[Any] = []
    task = asyncio.create_task(serve_worker(cfg, stop, web_port=free_port(), sql_port=None,
                                            on_ready=box.append))
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while not box or box[0].stored_events < n_valid - first:
            assert not task.done(), task.exception()
            assert loop.time() < deadline, f"stored {box[0].stored_events if box else 0} of {n_valid - first}"
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # anything more (a duplicate batch) would land now
        worker = box[0]
        assert worker.stored_events == n_valid - first  # the stored part was skipped, not re-inserted
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    total, distinct = _count(chdb_dsn, "SELECT count(), uniqExact(event_id) FROM driftline.llm_events")
    assert total == n_valid  # no FINAL: not a single duplicate row was written
    assert distinct == n_valid

    # A worker of a *new* group (no committed offsets) on the same store: it fetches from
    # offset 0 and may get records before it has read the stored offsets; those
    # records must be dropped and skipped, not stored (or handed to the stages) again.
    cfg2 = WorkerConfig(max_event_age_s=1e10, kafka=kafka_bootstrap, clickhouse=chdb_dsn, group_id=f"{group}-new", topics=(topic,),
                        dlq_topic=f"{topic}.dlq", emit_interval_s=0.5, idle_close_s=1.0, session_timeout_ms=SESSION_MS)
    stop = asyncio.Event()
    box.clear()
    task = asyncio.create_task(serve_worker(cfg2, stop, web_port=free_port(), sql_port=None,
                                            on_ready=box.append))
    try:
        deadline = loop.time() + 90
        while not box or len(box[0]._ready) < 2:
            assert not task.done(), task.exception()
            assert loop.time() < deadline, "the new group never got both partitions"
            await asyncio.sleep(0.2)
        await asyncio.sleep(3.0)
        assert box[0].stored_events == 0
        assert box[0].dead_lettered == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    assert _count(chdb_dsn, "SELECT count() FROM driftline.llm_events") == (n_valid,)
