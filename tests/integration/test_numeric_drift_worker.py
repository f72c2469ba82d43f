"""Numeric drift in a real worker: real broker, real worker, real chDB, one seeded stream whose
TTFT doubles at event 1,000; the worker is stopped after 1,200 events and a new one reads the
rest.

Checked exactly: every ``drift_scores`` row of the two workers equals what the pure engine
(NumericEngine) gives on the same stream in one piece (same windows, statistics, p-values,
verdicts): so the worker takes the stored columns in Kafka order, and the second worker
resumed the first one's reference, window and test positions from ``numeric_drift_state``.
TTFT is flagged, after the shift only; output tokens never.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from helpers_worker import SESSION_MS
from helpers_worker import wait_for as _wait_for

from driftline.streams.app import serve_worker
from driftline.streams.ingest.bulk_producer import produce_records
from driftline.streams.local.broker import free_port
from driftline.streams.sinks.clickhouse import ClickHouseSink
from driftline.streams.stages.numeric_drift import (
    NumericDriftConfig,
    NumericDriftStage,
    NumericEngine,
)
from driftline.streams.stages.windows import WindowConfig
from driftline.streams.worker import Worker, WorkerConfig

pytestmark = [pytest.mark.integration]

_spec = importlib.util.spec_from_file_location(
    "bench_numeric_drift", Path(__file__).resolve().parents[2] / "benchmarks" / "bench_numeric_drift.py")
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

N, SHIFT, PHASE1 = 1600, 1000, 1200
FIELDS = ("ttft_ms", "output_tokens")
NCFG = NumericDriftConfig(fields=FIELDS, ref_size=500, window_size=500, test_every=100, control_topic=None)


async def _run(cfg: WorkerConfig, until_scores: int) -> tuple[Worker, NumericDriftStage]:
    stop = asyncio.Event()
    box: list[Worker] = []
    stages: list[NumericDriftStage] = []

    def make(registry: Any) -> NumericDriftStage:
        st = NumericDriftStage(NCFG, registry)
        stages.append(st)
        return st

    task = asyncio.create_task(serve_worker(cfg, stop, web_port=free_port(), sql_port=None,
                                            on_ready=box.append, stages=[make]))
    try:
        await _wait_for(lambda: (bool(box) and box[0].started.is_set()) or task.done(), 60,
                        lambda: "worker never started")
        if task.done():
            task.result()
        st = stages[0]
        await _wait_for(lambda: st.stored_scores >= until_scores or task.done(), 60,
                        lambda: f"stored {box[0].stored_events} events, {st.stored_scores} scores")
        assert await st.drain(30)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    return box[0], st


async def test_numeric_drift_in_the_worker_flags_ttft_and_resumes_after_a_restart(
        kafka_bootstrap: str, make_topics: Any, chdb_dsn: str) -> None:
    topic = f"n-{uuid.uuid4().hex[:10]}"
    make_topics({topic: 1, f"{topic}.dlq": 1})
    values = bench.stream(3, N, "ttft", SHIFT)
    t0 = (int(time.time()) - 3600) * 1000
    events = [{"event_id": f"ev-{i:05d}", "app": "bot", "request_model": "gpt-x", "prompt_version": "v1",
               "timestamp": t0 + i, "latency_ms": float(values["latency_ms"][i]),
               "ttft_ms": float(values["ttft_ms"][i]), "output_tokens": int(values["output_tokens"][i])}
              for i in range(N)]
    records = [(b"bot/gpt-x", json.dumps(e).encode()) for e in events]
    wcfg = WorkerConfig(max_event_age_s=1e10, kafka=kafka_bootstrap, clickhouse=chdb_dsn,
                        group_id=f"g-{uuid.uuid4().hex[:8]}", topics=(topic,), dlq_topic=f"{topic}.dlq",
                        window=WindowConfig(size_ms=60_000), emit_interval_s=0.5, idle_close_s=1.0,
                        session_timeout_ms=SESSION_MS)
    # the pure engine on the whole stream: tests at 1,000, 1,100, ... 1,600 values per field,
    # and a change_point row for each flagged one (ttft_ms at 1,100 ... 1,600)
    eng = NumericEngine(NCFG)
    _, expected = eng.process([("bot", "gpt-x", "v1")] * N, [e["timestamp"] for e in events],
                              {f: values[f].tolist() for f in FIELDS})
    assert len(expected) == 20
    await produce_records(kafka_bootstrap, topic, records[:PHASE1])
    w1, st1 = await _run(wcfg, 8)
    assert w1.stored_events == PHASE1 and st1.stored_scores == 8
    await produce_records(kafka_bootstrap, topic, records[PHASE1:])
    w2, st2 = await _run(wcfg, 12)
    assert st2.stored_scores == 12
    assert st2.engine is not None and st2.engine.loaded == 2 and st2.engine.references_made == 0

    sink = ClickHouseSink(chdb_dsn)
    try:
        rows = sink.call(lambda c: c.query(
            "SELECT field, method, statistic, p_value, drifted, explanation FROM driftline.drift_scores "
            "ORDER BY field, ts, method").result_rows)
    finally:
        sink.close()
    got = [(f, m, s, p, bool(d), json.loads(x)["window"]["seq_to"]) for f, m, s, p, d, x in rows]
    want = sorted(((kf.field, r.method, r.statistic, r.p_value, r.drifted, r.explanation["window"]["seq_to"])
                   for kf, r in expected), key=lambda t: (t[0], t[5], t[1]))
    assert got == want
    flagged = [(f, seq) for f, _, _, _, d, seq in got if d]
    assert flagged and {f for f, _ in flagged} == {"ttft_ms"} and min(seq for _, seq in flagged) > SHIFT
    first = [json.loads(rows[i][5]) for i, g in enumerate(got) if g[4]][:2]  # change_point, ks
    assert first[1]["summary"].startswith("ttft_ms p50 ")
    assert first[0]["summary"].startswith("ttft_ms changed at ") and abs(first[0]["change"]["seq"] - SHIFT) <= 25
    assert first[0]["change"]["ts_ms"] == t0 + first[0]["change"]["seq"]  # the event time of that call
