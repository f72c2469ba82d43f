"""A looping agent trace, as OTLP spans through the real ``driftline otlp`` receiver and
the real broker into a worker with the alerting stage: the runaway alerts fire with the
trace id as a label (the ``alerts`` table rows say so), a healthy trace of the same app
fires nothing, and ``trace_summary`` counts the loop exactly. The same worker runs two
``compare`` rules from the store: a candidate prompt version twice as slow fires exactly
one alert naming the metric, with the interval ``driftline gate`` gives on the same
calls; an A/A pair fires none.

One worker for every check (the suite's budget: one started worker per new test file).
"""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
import uuid
from typing import Any

import aiohttp
import clickhouse_connect
import numpy as np
import pytest
from helpers_worker import wait_for
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from driftline.schemas.rules import fingerprint, parse_rules
from driftline.streams.app import serve_worker
from driftline.streams.cli.main import app as cli_app
from driftline.streams.ingest.otlp_receiver import OtlpReceiver
from driftline.streams.local.broker import free_port
from driftline.streams.stages.alerting import AlertingStage
from driftline.streams.stages.windows import WindowConfig
from driftline.streams.worker import Worker, WorkerConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(150)]

RULES = parse_rules(textwrap.dedent("""\
    rules:
      - name: AgentLoop
        kind: runaway
        expr: "calls.count > 20"
        group_by: [trace_id]
        window: 10m
        annotations: {summary: "trace {trace_id} of {app}: {value:.0f} calls"}
      - name: SamePrompt
        kind: runaway
        expr: "prompt.repeats > 5"
        group_by: [trace_id]
        window: 10m
      - name: CandidateSlower
        kind: compare
        app: ab-app
        baseline: {prompt_version: v1}
        candidate: {prompt_version: v2}
        max_latency_increase: 10%
        min_samples: 30
        lookback: 10m
        interval: 1s
        annotations: {summary: "{candidate} vs {baseline}: {failing}"}
      - name: AAControl
        kind: compare
        app: ab-app
        baseline: {prompt_version: a1}
        candidate: {prompt_version: a2}
        max_latency_increase: 10%
        min_samples: 30
        lookback: 10m
        interval: 1s
    """))
APP = "travel-agent"
LOOP, HEALTHY = "7" * 32, "a" * 32


def _kv(k: str, v: Any) -> KeyValue:
    return KeyValue(key=k, value=AnyValue(int_value=v) if isinstance(v, int) else AnyValue(string_value=v))


def _span(trace: str, n: int, parent: int | None, attrs: dict[str, Any], start_ns: int, dur_ms: int) -> Span:
    s = Span(trace_id=bytes.fromhex(trace), span_id=n.to_bytes(8, "big"), name=f"span {n}",
             start_time_unix_nano=start_ns, end_time_unix_nano=start_ns + dur_ms * 10**6,
             attributes=[_kv(k, v) for k, v in attrs.items()])
    if parent is not None:
        s.parent_span_id = parent.to_bytes(8, "big")
    return s


def agent_trace(trace: str, loops: int, t0_ns: int) -> ExportTraceServiceRequest:
    """An invoke_agent span; under it ``loops`` rounds of a chat call with the same prompt
    up to the attempt number, each followed by a tool call that fails; one HTTP span."""
    msgs = lambda i: json.dumps([{"role": "user", "parts": [  # noqa: E731
        {"type": "text", "content": f"Find a flight to Paris (attempt {i})"}]}])
    spans = [_span(trace, 1, None, {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "planner",
                                    "gen_ai.agent.id": "asst_7"}, t0_ns, 5_000)]
    for i in range(loops):
        start = t0_ns + (10 + 200 * i) * 10**6
        spans.append(_span(trace, 10 + 2 * i, 1, {
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "gpt-4o-mini", "gen_ai.usage.input_tokens": 100,
            "gen_ai.usage.output_tokens": 10, "gen_ai.input.messages": msgs(i)}, start, 120))
        spans.append(_span(trace, 11 + 2 * i, 10 + 2 * i, {
            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "flight_search",
            "error.type": "TimeoutError"}, start + 130 * 10**6, 50))
    spans.append(_span(trace, 2, 1, {"http.request.method": "GET"}, t0_ns + 10**6, 5))
    rs = ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])
    rs.resource.attributes.extend([_kv("service.name", APP)])
    return ExportTraceServiceRequest(resource_spans=[rs])


def ab_calls(t0_ns: int, n: int = 40) -> ExportTraceServiceRequest:
    """``n`` chat calls of app ab-app per prompt version, each its own trace: latencies
    uniform in [100, 200) ms (seeded), v2's twice as long; a1 and a2 alike (A/A)."""
    rng = np.random.default_rng(18)
    spans = []
    for j, (v, factor) in enumerate((("v1", 1), ("v2", 2), ("a1", 1), ("a2", 1))):
        for i in range(n):
            k = j * n + i
            spans.append(_span(f"{0xab << 120 | k:032x}", 100 + k, None, {
                "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o-mini",
                "driftline.prompt_version": v}, t0_ns + k * 10**6, int(rng.integers(100, 200)) * factor))
    rs = ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])
    rs.resource.attributes.extend([_kv("service.name", "ab-app")])
    return ExportTraceServiceRequest(resource_spans=[rs])


async def test_a_looping_agent_trace_fires_the_runaway_alerts_with_its_trace_id(
        kafka_bootstrap: str, make_topics: Any, chdb_dsn: str) -> None:
    tid = uuid.uuid4().hex[:10]
    topic, dlq = f"otlp_spans.{tid}", f"dlq-{tid}"
    make_topics({topic: 1, dlq: 1})
    cfg = WorkerConfig(max_event_age_s=1e10, kafka=kafka_bootstrap, clickhouse=chdb_dsn,
                       group_id=f"g-{tid}", topics=(topic,), dlq_topic=dlq,
                       window=WindowConfig(size_ms=60_000), emit_interval_s=0.5, idle_close_s=1.0)
    stages: list[AlertingStage] = []

    def make(registry: Any) -> AlertingStage:
        st = AlertingStage(RULES, registry=registry, eval_interval_s=0.2)
        stages.append(st)
        return st

    stop = asyncio.Event()
    box: list[Worker] = []
    task = asyncio.create_task(serve_worker(cfg, stop, web_port=free_port(), sql_port=None,
                                            on_ready=box.append, stages=[make]))
    now_ns = time.time_ns() - 30 * 10**9
    try:
        await wait_for(lambda: bool(box) and box[0].started.is_set(), 30, lambda: "worker never ready")
        worker, stage = box[0], stages[0]
        async with OtlpReceiver(kafka_bootstrap, port=0, topic=topic, registry=CollectorRegistry()) as rx, \
                aiohttp.ClientSession() as http:
            for req in (agent_trace(HEALTHY, 2, now_ns), agent_trace(LOOP, 12, now_ns + 10**9), ab_calls(now_ns)):
                async with http.post(rx.url, data=req.SerializeToString(),
                                     headers={"Content-Type": "application/x-protobuf"}) as r:
                    assert r.status == 200, await r.text()
        # healthy: 1 agent + 2 chat + 2 tool; loop: 1 + 12 + 12; the HTTP spans are skipped; A/B: 160
        await wait_for(lambda: worker.stored_events >= 190, 60, lambda: f"stored {worker.stored_events}/190")
        fired = lambda: sorted((t.rule, t.state) for t in stage.transitions)  # noqa: E731
        await wait_for(lambda: len(fired()) >= 3, 20, lambda: f"transitions {fired()}")
        # anything more would show up now (the compare rules run every second)
        await asyncio.sleep(1.5)
        assert (worker.stored_events, worker.metrics.skipped_spans) == (190, 2)
        assert fired() == [("AgentLoop", "firing"), ("CandidateSlower", "firing"), ("SamePrompt", "firing")]
        assert stage.compare_owned == {"CandidateSlower", "AAControl"}  # the one worker runs both
        runs = lambda r: stage.registry.get_sample_value(  # noqa: E731
            "driftline_alert_compare_runs_total", {"rule": r, "outcome": "ok"})
        assert runs("AAControl") >= 2 and runs("CandidateSlower") >= 2
        labels = {"app": APP, "trace_id": LOOP}
        by_rule = {t.rule: t for t in stage.transitions}
        assert all(t.labels == labels for t in stage.transitions if t.rule != "CandidateSlower")
        cmp = by_rule["CandidateSlower"]
        cmp_labels = {"app": "ab-app", "baseline": "prompt_version=v1", "candidate": "prompt_version=v2"}
        assert (cmp.labels, cmp.value, cmp.annotations["metrics"]) == (cmp_labels, 1.0, "latency_mean_ms")
        # one request, one stored batch: every call of the loop was counted at the first evaluation
        assert (by_rule["AgentLoop"].value, by_rule["SamePrompt"].value) == (25.0, 12.0)
        assert by_rule["AgentLoop"].annotations["summary"] == f"trace {LOOP} of {APP}: 25 calls"
        await wait_for(lambda: stage.rows_written >= 2, 10, lambda: f"alert rows written {stage.rows_written}/2")
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    # the alert's interval is the one `driftline gate` gives for the calls the rule read
    gate = CliRunner().invoke(cli_app, [
        "gate", "--baseline", "prompt_version=v1", "--candidate", "prompt_version=v2", "--app", "ab-app",
        "--since", str(cmp.ts_ms - 600_000), "--until", str(cmp.ts_ms), "--max-latency-increase", "10%",
        "--min-samples", "30", "--json", "--clickhouse", chdb_dsn], catch_exceptions=False)
    assert gate.exit_code == 1, gate.output
    (crit,) = json.loads(gate.output)["criteria"]
    assert cmp.annotations["summary"] == f"prompt_version=v2 vs prompt_version=v1: {crit['why']}"
    assert json.loads(gate.output)["n_candidate"] == 40
    client = clickhouse_connect.get_client(dsn=chdb_dsn)
    try:
        rows = client.query("SELECT rule, state, app, model, value, labels, fingerprint FROM driftline.alerts "
                            "ORDER BY rule").result_rows
        assert [tuple(r) for r in rows] == [
            ("AgentLoop", "firing", APP, "", 25.0, labels, fingerprint("AgentLoop", labels)),
            ("CandidateSlower", "firing", "ab-app", "", 1.0, cmp_labels, fingerprint("CandidateSlower", cmp_labels)),
            ("SamePrompt", "firing", APP, "", 12.0, labels, fingerprint("SamePrompt", labels))]
        summary = client.query(
            "SELECT trace_id, calls, llm_calls, tool_calls, agent_spans, errors, input_tokens, agents, tools, "
            f"cost_usd FROM driftline.trace_summary WHERE trace_id IN ('{LOOP}', '{HEALTHY}') "
            "ORDER BY trace_id").result_rows
        sums = dict(client.query(f"SELECT trace_id, sum(cost_usd) FROM driftline.llm_events FINAL "
                                 f"WHERE app = '{APP}' GROUP BY trace_id").result_rows)
        assert [tuple(r[:9]) for r in summary] == [
            (LOOP, 25, 12, 12, 1, 12, 1200, ["planner"], ["flight_search"]),
            (HEALTHY, 5, 2, 2, 1, 2, 200, ["planner"], ["flight_search"])]
        assert {r[0]: r[9] for r in summary} == sums and sums[LOOP] > 0
        # the agent was inherited by the chat and tool spans below it
        assert client.query("SELECT count() FROM driftline.llm_events FINAL WHERE agent_name = 'planner'"
                            ).result_rows == [(30,)]
    finally:
        client.close()
