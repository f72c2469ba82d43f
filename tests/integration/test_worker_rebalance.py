"""Scaling out: a second worker joins the group mid-stream.

The first worker has batches in flight (fetched, being decoded, queued for the
writer) when the group rebalances and half of its partitions move to the
newcomer. Every event must still be stored exactly once: counted without
``FINAL``, so a duplicate row would show.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from helpers_worker import wait_for

from driftline.streams.devdata.replay import ReplayConfig, ReplayData, generate
from driftline.streams.ingest.bulk_producer import produce_records
from driftline.streams.sinks.clickhouse import ClickHouseSink
from driftline.streams.stages.windows import WindowConfig
from driftline.streams.worker import Worker, WorkerConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 40_000


async def test_second_worker_joins_mid_stream_each_event_stored_once(
        kafka_bootstrap: str, make_topics: Any, chdb_dsn: str) -> None:
    topic = f"t-{uuid.uuid4().hex[:10]}"
    make_topics({topic: 4, f"{topic}.dlq": 1})
    recs = [(r.key, r.value) for r in generate(
        ReplayConfig(n_events=N, seed=5, malformed_rate=0.0), ReplayData.synthetic(5))]
    cfg = WorkerConfig(max_event_age_s=1e10, kafka=kafka_bootstrap, clickhouse=chdb_dsn, group_id=f"g-{uuid.uuid4().hex[:8]}",
                       topics=(topic,), dlq_topic=f"{topic}.dlq", window=WindowConfig(size_ms=60_000),
                       max_batch=2_000, emit_interval_s=0.5, idle_close_s=1.0, session_timeout_ms=6_000)
    sink = ClickHouseSink(cfg.clickhouse, cfg.database)
    a, b = Worker(cfg, sink=sink), Worker(cfg, sink=sink)
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    await produce_records(kafka_bootstrap, topic, recs[: N // 4])
    run_a = asyncio.create_task(a.run(stop_a))
    run_b: asyncio.Task[None] | None = None
    try:
        await wait_for(lambda: a.stored_events > 0, 60, lambda: "worker A stored nothing")
        # more traffic while B joins: A has batches in flight when its partitions are revoked
        producing = asyncio.create_task(produce_records(kafka_bootstrap, topic, recs[N // 4: 3 * N // 4]))
        await asyncio.sleep(0.2)
        run_b = asyncio.create_task(b.run(stop_b))
        await producing
        await wait_for(lambda: bool(b._ready) and bool(a._ready), 60,
                       lambda: f"no split: A {a._ready}, B {b._ready}")
        # the last quarter without keys: spread over all partitions, so B gets some
        await produce_records(kafka_bootstrap, topic, [(None, v) for _, v in recs[3 * N // 4:]])

        def stored() -> tuple[int, int]:
            row = sink.query_rows(f"SELECT count(), uniqExact(event_id) FROM {sink.database}.llm_events "
                                  f"WHERE source_topic = '{topic}'")[0]
            return int(row[0]), int(row[1])

        await wait_for(lambda: stored()[1] >= N, 120, lambda: f"stored (rows, distinct) {stored()}")
        await asyncio.sleep(2.0)  # anything written twice would land by now
        rows, distinct = stored()
        assert distinct == N
        assert rows == N  # no duplicate row, without FINAL
        assert b.stored_events > 0 and a.stored_events > 0
        assert a.stored_events + b.stored_events == N
    finally:
        stop_a.set()
        stop_b.set()
        await asyncio.wait_for(run_a, 60)
        if run_b is not None:
            await asyncio.wait_for(run_b, 60)
        sink.close()
