"""The stream worker end to end: real Tansu broker, real chDB, the worker in-process.

Every number is checked exactly against the replay's ground truth: the stored
events, the dead-lettered records (bytes and reason header), the window rows
against the raw rows they summarise, and the cost against the price table.
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections import Counter
from typing import Any

import clickhouse_connect
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError
from helpers_worker import read_topic, start_worker
from helpers_worker import wait_for as _wait_for

from driftline.schemas.event import decode_event
from driftline.schemas.prices import PriceTable
from driftline.streams.auth import client_credentials
from driftline.streams.cli.sql import run_sql
from driftline.streams.devdata.replay import ReplayConfig, ReplayData, generate
from driftline.streams.ingest.bulk_producer import produce_records
from driftline.streams.local.broker import free_port
from driftline.streams.sinks.clickhouse import chdb_path
from driftline.streams.stages.windows import WindowConfig
from driftline.streams.worker import WorkerConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUANTILES = {"latency_p50_ms": 0.5, "latency_p95_ms": 0.95, "latency_p99_ms": 0.99}


def _config(bootstrap: str, dsn: str, topic: str) -> WorkerConfig:
    return WorkerConfig(
        max_event_age_s=1e10,  # the events replay fixed 2025 timestamps
        kafka=bootstrap, clickhouse=dsn, group_id=f"g-{uuid.uuid4().hex[:10]}",
        topics=(topic,), dlq_topic=f"{topic}.dlq",
        window=WindowConfig(size_ms=60_000), emit_interval_s=0.5, idle_close_s=1.0,
    )








async def test_events_windows_dlq_exact(kafka_bootstrap: str, make_topics: Any, chdb_dsn: str) -> None:
    topic = f"w-{uuid.uuid4().hex[:10]}"
    # One partition: with several, a batch of one partition can move the watermark past
    # another partition's windows and make its events late (dropped from the window rows
    # by design), which would make the per-window equality below untrue by construction.
    make_topics({topic: 1, f"{topic}.dlq": 1})
    records = list(generate(ReplayConfig(n_events=3_000, seed=7, malformed_rate=0.02),
                            ReplayData.synthetic(7)))
    valid = [r for r in records if r.valid]
    malformed = [r for r in records if not r.valid]
    assert len(malformed) == 60 and len(valid) == 2_940
    # hand-made events for the paths the replay does not take: an unpriced model, unknown
    # keys kept in extra, no event_id (derived from content), RFC 3339 time, explicit nulls
    odd = [
        {"event_id": "odd-1", "app": "chat", "request_model": "no-such-model-x", "timestamp": 1735689601000,
         "latency_ms": 10, "input_tokens": 5, "output_tokens": 7, "team": "blue", "tags": [1, 2]},
        {"app": "chat", "request_model": "gpt-4o", "timestamp": "2025-01-01T00:00:02.5Z", "latency_ms": 20.5,
         "input_tokens": 100, "output_tokens": 10, "cache_read_input_tokens": 60, "feedback": 1},
        {"event_id": "odd-3", "app": "chat", "request_model": "gpt-4o", "response_model": None,
         "timestamp": 1735689603000, "latency_ms": 30, "operation": None, "guardrails": None,
         "reasoning_output_tokens": None, "prompt": "hello", "extra": {"k": "v"}},
    ]
    odd_values = [json.dumps(d).encode() for d in odd]
    events = [decode_event(r.value) for r in valid] + [decode_event(v) for v in odd_values]
    valid_ids = {e.event_id for e in events}
    assert len(valid_ids) == len(events), "the event ids are unique"
    prices = PriceTable.default()
    costs = [prices.cost(e) for e in events]
    expected_cost = math.fsum(c for c in costs if c is not None)
    assert expected_cost > 0

    await produce_records(kafka_bootstrap, topic, [(r.key, r.value) for r in records]
                          + [(None, v) for v in odd_values])
    n_valid = len(events)
    cfg = _config(kafka_bootstrap, chdb_dsn, topic)
    stop, task, worker = await start_worker(cfg, sql_port=None)
    try:
        await _wait_for(lambda: (worker.stored_events >= n_valid and worker.dead_lettered >= len(malformed))
                        or task.done(), 60,
                        lambda: f"stored {worker.stored_events}/{n_valid}, "
                                f"dlq {worker.dead_lettered}/{len(malformed)}")
        assert not task.done()
        assert worker.stored_events == n_valid
        assert worker.dead_lettered == len(malformed)
        assert worker.processed_records == len(records) + len(odd)

        db = worker.sink.database
        rows = await asyncio.to_thread(worker.sink.query_rows, f"SELECT count() FROM {db}.llm_events FINAL", None)
        assert rows[0][0] == n_valid
        ids = await asyncio.to_thread(worker.sink.query_rows, f"SELECT event_id FROM {db}.llm_events FINAL", None)
        assert {r[0] for r in ids} == valid_ids

        dlq = await read_topic(kafka_bootstrap, cfg.dlq_topic, len(malformed))
        assert Counter(m.value for m in dlq) == Counter(r.value for r in malformed)
        for m in dlq:
            reason = dict(m.headers).get("driftline-reason")
            assert reason, f"DLQ record without a driftline-reason header: {m.headers}"
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)

    # the worker released the chDB path: open it ourselves
    client = clickhouse_connect.get_client(dsn=chdb_dsn)
    try:
        db = "driftline"
        assert client.query(f"SELECT count() FROM {db}.llm_events").result_rows[0][0] == n_valid
        total = client.query(f"SELECT sum(cost_usd) FROM {db}.llm_events FINAL").result_rows[0][0]
        assert total == pytest.approx(expected_cost, rel=0, abs=1e-9)
        stored = {r[0]: r[1:] for r in client.query(
            f"SELECT event_id, toUnixTimestamp64Milli(timestamp), app, model, prompt_version, user_id, "
            f"input_tokens, output_tokens, cache_read_input_tokens, reasoning_output_tokens, latency_ms, "
            f"ttft_ms, status, finish_reasons, guardrail_names, guardrail_verdicts, guardrail_scores, "
            f"guardrail_hit, feedback, prompt, response, cost_usd, extra "
            f"FROM {db}.llm_events FINAL").result_rows}
    finally:
        client.close()
    # every stored row is its event, column by column (the columnar/Arrow path loses nothing)
    assert len(stored) == len(events)
    for e, cost in zip(events, costs, strict=True):
        g = e.guardrails or []
        want = (e.timestamp_ms, e.app, e.model, e.prompt_version or "", e.user_id or "",
                e.input_tokens, e.output_tokens, e.cache_read_input_tokens, e.reasoning_output_tokens,
                e.latency_ms, e.ttft_ms, e.status, e.finish_reasons or [], [x.name for x in g],
                [x.verdict for x in g], [x.score for x in g],
                int(any(x.verdict in ("flagged", "blocked") for x in g)), e.feedback, e.prompt,
                e.response)
        got = stored[e.event_id]
        assert got[:20] == want, e.event_id
        assert (got[20] is None) == (cost is None), e.event_id
        if cost is not None:
            assert got[20] == pytest.approx(cost, rel=1e-12)
        assert json.loads(got[21]) == e.extra, e.event_id
    # the data exercises what the path must keep: unpriced models, extras, guardrails, feedback
    assert sum(c is None for c in costs) > 0
    assert sum(bool(e.extra) for e in events) > 0
    assert sum(bool(e.guardrails) for e in events) > 0
    assert sum(e.feedback is not None for e in events) > 0
    client = clickhouse_connect.get_client(dsn=chdb_dsn)
    try:

        wins = client.query(
            f"SELECT app, model, prompt_version, toUnixTimestamp64Milli(window_start), events, "
            f"latency_p50_ms, latency_p95_ms, latency_p99_ms, cost_usd, sketch_relative_accuracy, late_events "
            f"FROM {db}.llm_window_metrics FINAL").result_rows
        raw = client.query(
            f"SELECT app, model, prompt_version, "
            f"intDiv(toUnixTimestamp64Milli(timestamp), 60000) * 60000 AS ws, count(), "
            f"quantileExact(0.5)(latency_ms), quantileExact(0.95)(latency_ms), "
            f"quantileExact(0.99)(latency_ms), sum(cost_usd) "
            f"FROM {db}.llm_events FINAL GROUP BY app, model, prompt_version, ws").result_rows
    finally:
        client.close()
    by_key = {(a, m, p, int(ws)): rest for a, m, p, ws, *rest in raw}
    assert wins, "no window rows"
    assert {(a, m, p, int(ws)) for a, m, p, ws, *_ in wins} == set(by_key)
    assert sum(w[4] for w in wins) == n_valid
    assert sum(w[10] for w in wins) == 0
    for a, m, p, ws, n, p50, p95, p99, cost, acc, _late in wins:
        rn, e50, e95, e99, rcost = by_key[(a, m, p, int(ws))]
        key = (a, m, p, ws)
        assert n == rn, key
        assert acc == pytest.approx(0.01)
        for got, exact in ((p50, e50), (p95, e95), (p99, e99)):
            assert abs(got - exact) <= 0.0101 * abs(exact) + 1e-9, (key, got, exact)
        assert cost == pytest.approx(rcost or 0.0, rel=0, abs=1e-9), key


async def test_sql_endpoint_while_worker_holds_chdb(kafka_bootstrap: str, make_topics: Any,
                                                    chdb_dsn: str) -> None:
    topic = f"s-{uuid.uuid4().hex[:10]}"
    make_topics({topic: 2, f"{topic}.dlq": 1})
    records = list(generate(ReplayConfig(n_events=500, seed=11, malformed_rate=0.02),
                            ReplayData.synthetic(11)))
    n_valid = sum(r.valid for r in records)
    await produce_records(kafka_bootstrap, topic, [(r.key, r.value) for r in records])
    sql_port = free_port()
    stop, task, worker = await start_worker(_config(kafka_bootstrap, chdb_dsn, topic), sql_port=sql_port)
    try:
        await _wait_for(lambda: worker.stored_events >= n_valid or task.done(), 60,
                        lambda: f"stored {worker.stored_events}/{n_valid}")
        assert worker.stored_events == n_valid
        q = "SELECT count() FROM driftline.llm_events FINAL"

        creds = client_credentials(chdb_path(chdb_dsn))  # made by the worker next to the store, 0600
        assert creds is not None and creds[0] == "driftline"

        def via_http(user: str = creds[0], password: str = creds[1]) -> int:
            c = clickhouse_connect.get_client(host="127.0.0.1", port=sql_port, username=user, password=password)
            try:
                return int(c.query(q).result_rows[0][0])
            finally:
                c.close()

        assert await asyncio.to_thread(via_http) == n_valid
        # the endpoint is closed without the password (mutation: no auth middleware -> this returns n_valid)
        with pytest.raises(DatabaseError, match="Code: 516"):
            await asyncio.to_thread(via_http, "default", "")
        out = await asyncio.to_thread(run_sql, chdb_dsn, q, "TabSeparated")
        assert out.strip() == str(n_valid).encode()
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
