"""A stream of random app names through a running worker (real Tansu broker, real chDB, the
alerting stage): the open windows, the alert evaluator and the metric label sets stay at
their caps, what was evicted is counted on /metrics, and no event is lost from the window
rows (an evicted key's window is closed early, not dropped)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import numpy as np
import pytest
from helpers_worker import wait_for
from prometheus_client import CollectorRegistry

from driftline.streams.app import serve_worker
from driftline.streams.ingest.bulk_producer import produce_records
from driftline.streams.local.broker import free_port
from driftline.streams.stages.alerting import AlertingStage
from driftline.streams.stages.windows import WindowConfig
from driftline.streams.worker import Worker, WorkerConfig
from tests.unit.test_alert_catch_up import RULES

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_random_app_names_stay_within_the_caps_and_lose_no_event(
        kafka_bootstrap: str, make_topics: Any, chdb_dsn: str) -> None:
    # 2,000 distinct app names, one call each, inside one minute: window cap 100 -> exactly
    # 100 keys open and 1,900 evicted; evaluator cap 100 -> 1,900 app/model pairs dropped;
    # metric label sets 500 -> 1,500 folded into other. Mutations caught: without
    # WindowAggregator._evict 2,000 keys stay open; dropping the evicted windows' rows
    # (_evicted_out) hides 1,900 windows from the evaluator and from llm_window_metrics.
    topic = f"rn-{uuid.uuid4().hex[:10]}"
    make_topics({topic: 1, f"{topic}.dlq": 1})
    rng = np.random.default_rng(5)
    names = [f"rnd-{x:016x}" for x in rng.integers(0, 1 << 62, 2_000)]
    assert len(set(names)) == 2_000
    now = int(time.time() * 1000)
    t0 = now - now % 60_000 - 5 * 60_000
    events = [{"event_id": f"rn-{i}", "app": a, "request_model": "m", "timestamp": t0 + i * 20,
               "latency_ms": 50.0} for i, a in enumerate(names)]
    await produce_records(kafka_bootstrap, topic, [(None, json.dumps(e).encode()) for e in events])
    registry = CollectorRegistry()
    stages: list[AlertingStage] = []

    def make(reg: Any) -> AlertingStage:
        st = AlertingStage(RULES, registry=reg, write_alerts=False, max_keys=100)
        stages.append(st)
        return st

    cfg = WorkerConfig(kafka=kafka_bootstrap, clickhouse=chdb_dsn, group_id=f"g-{uuid.uuid4().hex[:8]}",
                       topics=(topic,), dlq_topic=f"{topic}.dlq",
                       window=WindowConfig(size_ms=60_000, max_keys=100), emit_interval_s=0.5)
    stop = asyncio.Event()
    box: list[Worker] = []
    task = asyncio.create_task(serve_worker(cfg, stop, web_port=free_port(), sql_port=None,
                                            on_ready=box.append, stages=[make], registry=registry))
    try:
        await wait_for(lambda: bool(box) or task.done(), 30, lambda: "worker never became ready")
        worker, stage = box[0], stages[0]
        await wait_for(lambda: worker.stored_events >= 2_000 or task.done(), 60,
                       lambda: f"stored {worker.stored_events}/2000")
        # two ticks after the stage took the stored batches (under load a tick can come before
        # the last batch reached the stage: then nothing was evicted yet)
        await wait_for(lambda: stage.evaluations >= 2 and {"last_seen", "windows"} <= set(stage.evaluator.evicted),
                       30, lambda: f"two alert ticks with evictions: {dict(stage.evaluator.evicted)}")
        assert worker.windows.open_keys == 100
        value = registry.get_sample_value
        assert value("driftline_evicted_keys_total", {"dimension": "window_keys"}) == 1_900
        assert value("driftline_evicted_keys_total", {"dimension": "metric_series"}) == 1_500
        assert value("driftline_events_total", {"app": "other", "model": "other"}) == 1_500
        ev = stage.evaluator
        assert len(ev._last_seen) == 100 and len(ev._windows) == 100
        # a key evicted and seen again (its events, then its window rows) is evicted again:
        # at least 1,900 per dimension, and /metrics says exactly what the evaluator counted
        for dim in ("last_seen", "windows"):
            assert ev.evicted[dim] >= 1_900
            assert value("driftline_alert_evicted_keys_total", {"dimension": dim}) == ev.evicted[dim]
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    import clickhouse_connect

    c = clickhouse_connect.get_client(dsn=chdb_dsn)
    try:
        apps, total = c.query("SELECT uniqExact(app), sum(events) FROM driftline.llm_window_metrics FINAL"
                              ).result_rows[0]
    finally:
        c.close()
    assert (apps, total) == (2_000, 2_000)
