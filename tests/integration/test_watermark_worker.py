"""Event time that one record cannot break, through a running worker (real Tansu broker,
real chDB): a partition 7 minutes behind another, an event 4 minutes in the future (inside
the decode's clock-skew bound, beyond the watermark's), one dated 9999, and a restart that
rebuilds the open windows per partition. Afterwards no event is late and every window row
equals an exact recount of the raw rows."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import clickhouse_connect
import pytest
from aiokafka import AIOKafkaProducer
from helpers_worker import SESSION_MS, start_worker, wait_for

from driftline.streams.stages.windows import WindowConfig
from driftline.streams.worker import WorkerConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MIN = 60_000
YEAR_9999_MS = 253_402_300_799_000


def _event(n: int, ts: int) -> dict[str, Any]:
    return {"event_id": f"wm-{n}", "app": "chat", "request_model": "gpt-4o", "timestamp": ts,
            "latency_ms": 100.0 + n % 50}


async def _send(bootstrap: str, topic: str, batch: list[tuple[int, dict[str, Any]]]) -> None:
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False)
    await p.start()
    try:
        for part, ev in batch:
            await p.send(topic, json.dumps(ev).encode(), partition=part)
        await p.flush()
    finally:
        await p.stop()




def _windows_vs_raw(dsn: str) -> tuple[dict[int, tuple[int, int]], dict[int, int]]:
    """{window start: (events, late_events)} of the newest window rows, {window start: raw count}."""
    c = clickhouse_connect.get_client(dsn=dsn)
    try:
        wins = c.query("SELECT toUnixTimestamp64Milli(window_start), events, late_events "
                       "FROM driftline.llm_window_metrics FINAL").result_rows
        raw = c.query("SELECT intDiv(toUnixTimestamp64Milli(timestamp), 60000) * 60000, count() "
                      "FROM driftline.llm_events FINAL GROUP BY 1").result_rows
    finally:
        c.close()
    return {int(s): (int(n), int(late)) for s, n, late in wins}, {int(s): int(n) for s, n in raw}


async def test_skew_future_events_and_restart_leave_no_event_late(kafka_bootstrap: str, make_topics: Any,
                                                                  chdb_dsn: str) -> None:
    # Mutations caught: a global watermark (max event time over both partitions, the code
    # before) makes step 2's 110 events late (late_events 110, windows short of them) and
    # step 4's 40 late behind the +4 min event; a global max(timestamp) in the rebuild
    # (window_restore.recent_rows) rebuilds only the future rows after the restart, their watermark
    # makes step 5's 20 events late and window m0-1min short of them. (The wall-clock bound
    # alone is covered by tests/unit/test_watermarks.py: here partition 1 holds the minimum.)
    topic = f"wm-{uuid.uuid4().hex[:10]}"
    make_topics({topic: 2, f"{topic}.dlq": 1})
    now = int(time.time() * 1000)
    m0 = now - now % MIN
    lead, lag = m0 - 3 * MIN, m0 - 10 * MIN                     # partition 0 runs 7 min ahead
    steps: list[list[tuple[int, dict[str, Any]]]] = [
        [(0, _event(i, lead + i * 1_000)) for i in range(10)]
        + [(1, _event(100 + i, lag + i * 1_000)) for i in range(10)],
        [(1, _event(200 + i, lag + (10 + i) * 1_000)) for i in range(110)],        # partition 1 goes on
        [(1, _event(400 + i, m0 - MIN + i * 1_000)) for i in range(20)]            # and catches up,
        + [(0, _event(500, now + 4 * MIN)), (0, _event(501, YEAR_9999_MS))],       # p0: 2 future events
        [(0, _event(600 + i, m0 - 40_000 + i * 1_000)) for i in range(20)]
        + [(1, _event(700 + i, m0 - 40_000 + i * 1_000)) for i in range(20)],
    ]
    cfg = WorkerConfig(kafka=kafka_bootstrap, clickhouse=chdb_dsn, group_id=f"g-{uuid.uuid4().hex[:8]}",
                       topics=(topic,), dlq_topic=f"{topic}.dlq", window=WindowConfig(size_ms=MIN),
                       emit_interval_s=0.5, idle_close_s=120.0, session_timeout_ms=SESSION_MS)
    sent = 0
    stop, task, worker = await start_worker(cfg)
    try:
        for batch in steps:
            await _send(kafka_bootstrap, topic, batch)
            sent += len(batch)
            # the year-9999 event is stored, or dead-lettered where decode bounds event time
            await wait_for(lambda n=sent: worker.stored_events + worker.dead_lettered >= n or task.done(), 60,
                           lambda n=sent: f"stored {worker.stored_events} + dlq {worker.dead_lettered} of {n}")
        assert worker.stored_events + worker.dead_lettered == sent == 192
        assert worker.metrics.late_events == 0
        assert worker.windows.watermark_ms is not None and worker.windows.watermark_ms < now + 4 * MIN
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    wins, raw = _windows_vs_raw(chdb_dsn)
    assert sum(late for _n, late in wins.values()) == 0
    assert {s: n for s, (n, _late) in wins.items()} == raw
    assert raw[lag] == 60 and raw[lag + MIN] == 60              # partition 1's skewed windows, whole

    # restart: the open windows are rebuilt per partition, past the two future rows
    step5 = [(p, _event(800 + 10 * p + i, m0 - 15_000 + i * 1_000)) for p in (0, 1) for i in range(10)]
    cfg2 = WorkerConfig(**{**cfg.__dict__, "group_id": f"g-{uuid.uuid4().hex[:8]}"})
    stop, task, worker = await start_worker(cfg2)
    try:
        await _send(kafka_bootstrap, topic, step5)
        await wait_for(lambda: worker.stored_events >= 20 or task.done(), 60,
                       lambda: f"stored {worker.stored_events} of 20")
        assert worker.stored_events == 20 and worker.metrics.late_events == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    wins, raw = _windows_vs_raw(chdb_dsn)
    assert sum(late for _n, late in wins.values()) == 0
    assert {s: n for s, (n, _late) in wins.items()} == raw
    assert raw[m0 - MIN] == 80                                   # 20 + 40 before, 20 after the restart


async def test_restart_with_a_quiet_partition_does_not_reopen_final_windows(
        kafka_bootstrap: str, make_topics: Any, chdb_dsn: str) -> None:
    # Mutation caught: without the write log's watermark (window_restore.open_at / closed_below),
    # the rebuild reopens window lag from partition 1's rows alone (partition 0's rows that
    # old are not loaded) and its partial row, newer than the final one, replaces 60
    # events with 30. Found by review.
    topic = f"wm-q-{uuid.uuid4().hex[:10]}"
    make_topics({topic: 2, f"{topic}.dlq": 1})
    now = int(time.time() * 1000)
    m0 = now - now % MIN
    lag = m0 - 10 * MIN
    both = [(p, _event(1000 * (p + 1) + i, lag + i * 1_000)) for p in (0, 1) for i in range(30)]
    ahead = [(0, _event(3000 + i, lag + MIN + i * 10_000)) for i in range(48)]    # partition 1 goes quiet
    later = [(0, _event(4000 + i, m0 - 50_000 + i * 1_000)) for i in range(10)]
    cfg = WorkerConfig(kafka=kafka_bootstrap, clickhouse=chdb_dsn, group_id=f"g-{uuid.uuid4().hex[:8]}",
                       topics=(topic,), dlq_topic=f"{topic}.dlq",
                       window=WindowConfig(size_ms=MIN, idle_partition_ms=1_000),
                       emit_interval_s=0.5, idle_close_s=120.0, session_timeout_ms=SESSION_MS)
    stop, task, worker = await start_worker(cfg)
    sent = 0
    try:
        for batch in (both, ahead, later):
            await _send(kafka_bootstrap, topic, batch)
            sent += len(batch)
            await wait_for(lambda n=sent: worker.stored_events >= n or task.done(), 60,
                           lambda n=sent: f"stored {worker.stored_events} of {n}")
            await asyncio.sleep(2.0)                                  # partition 1 idles meanwhile
        assert worker.windows.watermark_ms is not None and worker.windows.watermark_ms > lag + 2 * MIN
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    wins, raw = _windows_vs_raw(chdb_dsn)
    assert raw[lag] == 60 and wins[lag][0] == 60

    cfg2 = WorkerConfig(**{**cfg.__dict__, "group_id": f"g-{uuid.uuid4().hex[:8]}"})
    stop, task, worker = await start_worker(cfg2)
    try:
        await _send(kafka_bootstrap, topic, [(0, _event(5000 + i, m0 - 20_000 + i * 1_000)) for i in range(5)])
        await wait_for(lambda: worker.stored_events >= 5 or task.done(), 60,
                       lambda: f"stored {worker.stored_events} of 5")
        await asyncio.sleep(2.0)                                      # partial rows are written meanwhile
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    wins, raw = _windows_vs_raw(chdb_dsn)
    assert raw[lag] == 60
    assert {s: n for s, (n, _late) in wins.items()} == raw
