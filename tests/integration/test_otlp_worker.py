"""OTLP spans through the real worker into ClickHouse: every path in, exact rows out.

(1) Full path: the official openai-v2 instrumentation of the real ``openai`` client (plain
    and streaming chat completions with usage, against a local OpenAI-compatible server)
    -> the real OTLP/HTTP exporter -> ``OtlpReceiver`` -> the real local broker -> the
    worker -> chDB. Once with content capture on and once with it off.
(2) Records written as the OpenTelemetry Collector's Kafka exporter writes them: an
    ``ExportTraceServiceRequest`` serialized with ``opentelemetry-proto`` as ``otlp_proto``
    and as ``otlp_json`` (camelCase, hex ids, int64 as strings, enums as integers), with
    no record header (the exporter sets none) and with a ``content-type`` header (as
    ``driftline otlp`` writes them): the same rows from all four.
(3) Bad input on the topic: dead-lettered with reasons and the original bytes, the valid
    spans of the same requests and batch stored, the worker keeps consuming.

Topics are named ``otlp_spans.<test id>``: the worker reads ``otlp_spans`` and every
``otlp_spans.*`` topic as OTLP (streams/ingest/transforms.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import clickhouse_connect
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from google.protobuf import json_format
from helpers_otlp import (  # noqa: F401 (fixture)
    CHAT_MODEL,
    FIRST_CHUNK_DELAY,
    HAND_MODEL,
    PLAIN_ANSWER,
    PLAIN_DELAY,
    PLAIN_PROMPT,
    PLAIN_SYSTEM,
    PLAIN_USAGE,
    RESP_MODEL,
    STREAM_ANSWER,
    STREAM_PROMPT,
    STREAM_USAGE,
    fake_openai,
    instrumented_calls,
)
from helpers_worker import wait_for as _wait_for
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status
from prometheus_client import CollectorRegistry

from driftline.schemas.prices import PriceTable
from driftline.streams.app import serve_worker
from driftline.streams.ingest.otlp_receiver import OtlpReceiver
from driftline.streams.local.broker import free_port
from driftline.streams.stages.windows import WindowConfig
from driftline.streams.worker import Worker, WorkerConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]

PRICES = PriceTable.default()
MINI = PRICES.lookup(CHAT_MODEL)
SONNET = PRICES.lookup("claude-sonnet-4")
assert MINI is not None and SONNET is not None
ROW_COLUMNS = (
    "app", "environment", "provider", "operation", "request_model", "response_model", "model",
    "input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens",
    "reasoning_output_tokens", "latency_ms", "ttft_ms", "tpot_ms", "status", "error_type",
    "finish_reasons", "guardrail_names", "guardrail_verdicts", "guardrail_scores",
    "guardrail_hit", "feedback", "prompt", "response", "cost_usd", "conversation_id",
    "trace_id", "span_id", "extra", "source_topic",
)


# --------------------------------------------------------------------------- harness


@pytest.fixture
def otlp_topics(make_topics: Any) -> tuple[str, str]:
    """(topic, dlq topic) for one test: ``otlp_spans.<id>`` and its own dead-letter topic."""
    tid = uuid.uuid4().hex[:10]
    topic, dlq = f"otlp_spans.{tid}", f"dlq-{tid}"
    make_topics({topic: 1, dlq: 1})
    return topic, dlq




@asynccontextmanager
async def running_worker(bootstrap: str, dsn: str, topic: str, dlq: str
                         ) -> AsyncIterator[Worker]:
    """The real worker (``serve_worker``) on ``topic``; stopped (and chDB released) on exit."""
    cfg = WorkerConfig(max_event_age_s=1e10, kafka=bootstrap, clickhouse=dsn, group_id=f"g-{uuid.uuid4().hex[:10]}",
                       topics=(topic,), dlq_topic=dlq, window=WindowConfig(size_ms=60_000),
                       emit_interval_s=0.5, idle_close_s=1.0)
    stop = asyncio.Event()
    box: list[Worker] = []
    task = asyncio.create_task(serve_worker(cfg, stop, web_port=free_port(), sql_port=None,
                                            on_ready=box.append))
    try:
        await _wait_for(lambda: bool(box) or task.done(), 30, lambda: "worker never ready")
        if task.done():
            task.result()
        yield box[0]
        assert not task.done(), "the worker stopped by itself"
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def wait_stored(worker: Worker, events: int, dead: int = 0, timeout: float = 60) -> None:
    await _wait_for(lambda: worker.stored_events >= events and worker.dead_lettered >= dead,
                    timeout, lambda: f"stored {worker.stored_events}/{events}, "
                                     f"dead-lettered {worker.dead_lettered}/{dead}")
    await asyncio.sleep(0.5)  # anything beyond the expected would show up now
    assert (worker.stored_events, worker.dead_lettered) == (events, dead)


def stored_rows(dsn: str) -> list[dict[str, Any]]:
    """All ``llm_events`` rows (after the worker released the chDB path)."""
    client = clickhouse_connect.get_client(dsn=dsn)
    try:
        res = client.query(f"SELECT {', '.join(ROW_COLUMNS)} FROM driftline.llm_events FINAL "
                           "ORDER BY timestamp, trace_id, span_id")
        rows = list(res.named_results())
    finally:
        client.close()
    for r in rows:
        r["extra"] = json.loads(r["extra"])
    return rows


def cost(price: Any, inp: int, out: int, cache_read: int = 0, cache_write: int = 0) -> float:
    """USD from the price table's per-million rates (cache tokens are part of ``inp``)."""
    return ((inp - cache_read - cache_write) * price.input + cache_read * price.cache_read
            + cache_write * (price.cache_write or price.input) + out * price.output) / 1e6


async def produce(bootstrap: str, topic: str,
                  records: list[tuple[bytes | None, list[tuple[str, bytes]] | None]]) -> None:
    """Write records in order, as the Collector's Kafka exporter does: no key, no headers
    unless given."""
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=16 << 20)
    await p.start()
    try:
        for value, headers in records:
            await p.send_and_wait(topic, value, headers=headers)
    finally:
        await p.stop()


async def read_dlq(bootstrap: str, topic: str, expected: int, timeout: float = 20) -> list[Any]:
    c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                         auto_offset_reset="earliest", enable_auto_commit=False)
    await c.start()
    out: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while len(out) < expected and time.monotonic() < deadline:
            for recs in (await c.getmany(timeout_ms=300)).values():
                out.extend(recs)
        for _ in range(3):
            for recs in (await c.getmany(timeout_ms=300)).values():
                out.extend(recs)
    finally:
        await c.stop()
    return out


# --------------------------------------------------------------------------- (1) full path


async def test_instrumented_openai_through_receiver_and_worker_to_clickhouse(
        fake_openai: str, kafka_bootstrap: str, otlp_topics: tuple[str, str],  # noqa: F811
        chdb_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    topic, dlq = otlp_topics
    async with OtlpReceiver(kafka_bootstrap, port=0, topic=topic,
                            registry=CollectorRegistry()) as receiver, \
            running_worker(kafka_bootstrap, chdb_dsn, topic, dlq) as worker:
        # content capture on (the value openai-v2 2.4b0 needs), plus a hand-made streaming
        # span with time-to-first-chunk; then capture off (the instrumentation's default)
        await instrumented_calls(fake_openai, receiver.url, "span_only", monkeypatch,
                                 hand_span=True, service_name="support-bot")
        await instrumented_calls(fake_openai, receiver.url, None, monkeypatch,
                                 service_name="support-bot-private")
        await wait_stored(worker, 5)
        assert worker.metrics.skipped_spans == 0
    rows = stored_rows(chdb_dsn)
    assert len(rows) == 5
    assert {r["source_topic"] for r in rows} == {topic}
    for r in rows:
        assert (r["environment"], r["operation"], r["status"], r["error_type"]) == (
            "test", "chat", "ok", "")
        assert (r["response_model"], r["model"]) == (RESP_MODEL, RESP_MODEL)
        assert len(r["trace_id"]) == 32 and len(r["span_id"]) == 16
        assert r["extra"]["otel.span.name"].startswith("chat ")
    on = [r for r in rows if r["app"] == "support-bot"]
    off = [r for r in rows if r["app"] == "support-bot-private"]
    assert len(on) == 3 and len(off) == 2

    def pick(rs: list[dict[str, Any]], usage: tuple[int, int], provider: str = "openai"
             ) -> dict[str, Any]:
        [r] = [r for r in rs if (r["input_tokens"], r["output_tokens"]) == usage
               and r["provider"] == provider]
        return r

    plain_cost = cost(MINI, *PLAIN_USAGE)
    stream_cost = cost(MINI, *STREAM_USAGE)
    assert plain_cost == pytest.approx((12 * 0.15 + 5 * 0.60) / 1e6, rel=1e-12)
    for rs, captured in ((on, True), (off, False)):
        plain, streamed = pick(rs, PLAIN_USAGE), pick(rs, STREAM_USAGE)
        for r in (plain, streamed):
            assert (r["provider"], r["request_model"]) == ("openai", CHAT_MODEL)
            assert r["extra"]["otel.scope.name"] == "opentelemetry.util.genai.handler"
        assert plain["extra"]["gen_ai.response.id"] == "chatcmpl-plain"
        assert streamed["extra"]["gen_ai.response.id"] == "chatcmpl-stream"
        # the latency is the span's: the fake server's sleeps bound it from below
        assert PLAIN_DELAY * 1000 <= plain["latency_ms"] < 5_000
        assert FIRST_CHUNK_DELAY * 1000 <= streamed["latency_ms"] < 5_000
        # openai-v2 2.4b0 records no time-to-first-chunk on its spans (see docs/otlp-mapping.md)
        assert (plain["ttft_ms"], streamed["ttft_ms"], streamed["tpot_ms"]) == (None, None, None)
        assert plain["cost_usd"] == pytest.approx(plain_cost, rel=1e-12)
        assert streamed["cost_usd"] == pytest.approx(stream_cost, rel=1e-12)
        assert plain["finish_reasons"] == ["stop"]
        if captured:
            assert (plain["prompt"], plain["response"]) == (PLAIN_PROMPT, PLAIN_ANSWER)
            assert plain["extra"]["gen_ai.system_instructions"] == PLAIN_SYSTEM
            assert (streamed["prompt"], streamed["response"]) == (STREAM_PROMPT, STREAM_ANSWER)
            # from the output messages: 2.4b0 sets no finish_reasons attribute on streams
            assert streamed["finish_reasons"] == ["stop"]
        else:
            # capture off: measured all the same, but no text anywhere
            for r in (plain, streamed):
                assert (r["prompt"], r["response"]) == (None, None)
                assert "gen_ai.system_instructions" not in r["extra"]
                assert not any(k.startswith(("gen_ai.input", "gen_ai.output"))
                               for k in r["extra"])
                assert PLAIN_ANSWER not in json.dumps(r["extra"])
            assert streamed["finish_reasons"] == []

    # the streaming span written as the GenAI conventions describe (time_to_first_chunk set)
    hand = pick(on, STREAM_USAGE, provider="vllm")
    assert hand["request_model"] == HAND_MODEL
    assert FIRST_CHUNK_DELAY * 1000 * 0.9 <= hand["ttft_ms"] <= hand["latency_ms"] < 5_000
    assert hand["tpot_ms"] == pytest.approx((hand["latency_ms"] - hand["ttft_ms"])
                                            / (STREAM_USAGE[1] - 1))
    assert hand["cost_usd"] == pytest.approx(stream_cost, rel=1e-12)

    # the window rows summarise the same calls (windows may split at a minute boundary)
    client = clickhouse_connect.get_client(dsn=chdb_dsn)
    try:
        wins = client.query(
            "SELECT app, sum(events), sum(input_tokens), sum(output_tokens), sum(cost_usd), "
            "max(ttft_p95_ms) FROM driftline.llm_window_metrics FINAL GROUP BY app "
            "ORDER BY app").result_rows
    finally:
        client.close()
    assert [w[:4] for w in wins] == [("support-bot", 3, 12 + 20 + 20, 5 + 3 + 3),
                                     ("support-bot-private", 2, 12 + 20, 5 + 3)]
    assert wins[0][4] == pytest.approx(plain_cost + 2 * stream_cost, rel=1e-9)
    assert wins[1][4] == pytest.approx(plain_cost + stream_cost, rel=1e-9)
    # only the hand-made span carries a TTFT: its window's p95 is that value (1% sketch)
    assert wins[0][5] == pytest.approx(hand["ttft_ms"], rel=0.0101)


# --------------------------------------------------------------------------- (2) Collector


def kv(k: str, v: Any) -> KeyValue:
    if isinstance(v, bool):
        return KeyValue(key=k, value=AnyValue(bool_value=v))
    if isinstance(v, str):
        return KeyValue(key=k, value=AnyValue(string_value=v))
    if isinstance(v, float):
        return KeyValue(key=k, value=AnyValue(double_value=v))
    if isinstance(v, int):
        return KeyValue(key=k, value=AnyValue(int_value=v))
    return KeyValue(key=k, value=AnyValue(array_value=ArrayValue(
        values=[AnyValue(string_value=x) for x in v])))


T0 = 1_763_800_000_000_000_000  # ns


def span(tid: bytes, sid: int, name: str, start_ms: int, dur_ms: int, attrs: dict[str, Any],
         parent: int | None = None, events: list[Span.Event] | None = None,
         error: bool = False) -> Span:
    s = Span(trace_id=tid, span_id=sid.to_bytes(8, "big"), name=name, kind=Span.SPAN_KIND_CLIENT,
             start_time_unix_nano=T0 + start_ms * 1_000_000,
             end_time_unix_nano=T0 + (start_ms + dur_ms) * 1_000_000,
             attributes=[kv(k, v) for k, v in attrs.items()], events=events or [])
    if parent is not None:
        s.parent_span_id = parent.to_bytes(8, "big")
    if error:
        s.status.CopyFrom(Status(code=Status.STATUS_CODE_ERROR, message="rate limited"))
    return s


def collector_request(variant: int) -> ExportTraceServiceRequest:
    """What a Collector batches from a GenAI app: current and deprecated conventions,
    content on attributes and on events, a guardrail child span, an evaluation event, an
    error, a tool span and a plain HTTP span. ``variant`` makes the trace id unique."""
    tid = bytes([variant]) + bytes(range(1, 16))
    msgs_in = json.dumps([{"role": "system", "parts": [{"type": "text", "content": "Be kind."}]},
                          {"role": "user", "parts": [{"type": "text",
                                                      "content": "Reset my password"}]}])
    msgs_out = json.dumps([{"role": "assistant", "finish_reason": "stop",
                            "parts": [{"type": "text", "content": "Open Settings."}]}])
    spans = [
        span(tid, 1, "chat gpt-4o-mini", 0, 900, {
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
            "gen_ai.request.model": CHAT_MODEL, "gen_ai.response.model": RESP_MODEL,
            "gen_ai.usage.input_tokens": 120, "gen_ai.usage.output_tokens": 48,
            "gen_ai.response.time_to_first_chunk": 0.21,
            "gen_ai.response.finish_reasons": ["stop"], "gen_ai.conversation.id": "conv-7",
            "gen_ai.input.messages": msgs_in, "gen_ai.output.messages": msgs_out,
            "server.address": "api.openai.com"},
            events=[Span.Event(name="gen_ai.evaluation.result", attributes=[
                kv("gen_ai.evaluation.name", "relevance"),
                kv("gen_ai.evaluation.score.value", 0.8)])]),
        span(tid, 2, "apply_guardrail pii", 1, 5, {
            "gen_ai.operation.name": "apply_guardrail", "gen_ai.guardian.name": "pii",
            "gen_ai.security.decision.type": "modify"}, parent=1),
        # deprecated names, content in the older per-message events
        span(tid, 3, "chat claude-sonnet-4", 1000, 2500, {
            "gen_ai.system": "anthropic", "gen_ai.request.model": "claude-sonnet-4-20250514",
            "gen_ai.usage.prompt_tokens": 1000, "gen_ai.usage.completion_tokens": 200,
            "gen_ai.usage.cache_read.input_tokens": 800,
            "gen_ai.usage.cache_creation.input_tokens": 100},
            events=[Span.Event(name="gen_ai.user.message", attributes=[kv("content", "Summarise")]),
                    Span.Event(name="gen_ai.choice", attributes=[
                        kv("message", '{"role": "assistant", "content": "A summary."}'),
                        kv("finish_reason", "length")])]),
        span(tid, 4, "chat gpt-4o", 4000, 150, {
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "gpt-4o", "error.type": "RateLimitError"}, error=True),
        span(tid, 5, "execute_tool lookup", 4200, 30, {
            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup"}),
        span(tid, 6, "GET /v1/users", 4300, 12, {"http.request.method": "GET"}),
    ]
    rs = ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])
    rs.scope_spans[0].scope.name = "my.genai.app"
    rs.resource.attributes.extend([kv("service.name", "billing-bot"),
                                   kv("deployment.environment", "staging")])
    return ExportTraceServiceRequest(resource_spans=[rs])


def collector_otlp_json(req: ExportTraceServiceRequest) -> bytes:
    """The Collector's ``otlp_json``: protobuf JSON mapping with lowerCamelCase names,
    int64 as strings and enums as integers, but trace/span ids as hex (OTLP/JSON rule)."""
    doc = json_format.MessageToDict(req, use_integers_for_enums=True)
    for rs in doc["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for sp in ss["spans"]:
                for k in ("traceId", "spanId", "parentSpanId"):
                    if k in sp:
                        sp[k] = base64.b64decode(sp[k]).hex()
    return json.dumps(doc).encode()


def expected_collector_rows(variant: int) -> list[dict[str, Any]]:
    tid = (bytes([variant]) + bytes(range(1, 16))).hex()
    common = {"app": "billing-bot", "environment": "staging", "trace_id": tid,
              "reasoning_output_tokens": None}
    return [
        {**common, "span_id": "0000000000000001", "provider": "openai", "operation": "chat",
         "request_model": CHAT_MODEL, "response_model": RESP_MODEL, "model": RESP_MODEL,
         "input_tokens": 120, "output_tokens": 48, "cache_read_input_tokens": None,
         "cache_creation_input_tokens": None, "latency_ms": 900.0, "ttft_ms": 210.0,
         "tpot_ms": pytest.approx((900.0 - 210.0) / 47), "status": "ok", "error_type": "",
         "finish_reasons": ["stop"], "guardrail_names": ["pii"],
         "guardrail_verdicts": ["flagged"], "guardrail_scores": [None], "guardrail_hit": 1,
         "feedback": 1, "prompt": "Reset my password", "response": "Open Settings.",
         "cost_usd": pytest.approx(cost(MINI, 120, 48), rel=1e-12),
         "conversation_id": "conv-7"},
        {**common, "span_id": "0000000000000003", "provider": "anthropic", "operation": "chat",
         "request_model": "claude-sonnet-4-20250514", "response_model": "",
         "model": "claude-sonnet-4-20250514", "input_tokens": 1000, "output_tokens": 200,
         "cache_read_input_tokens": 800, "cache_creation_input_tokens": 100,
         "latency_ms": 2500.0, "ttft_ms": None, "tpot_ms": None, "status": "ok",
         "error_type": "", "finish_reasons": ["length"], "guardrail_names": [],
         "guardrail_verdicts": [], "guardrail_scores": [], "guardrail_hit": 0,
         "feedback": None, "prompt": "Summarise", "response": "A summary.",
         "cost_usd": pytest.approx(cost(SONNET, 1000, 200, 800, 100), rel=1e-12),
         "conversation_id": ""},
        {**common, "span_id": "0000000000000004", "provider": "openai", "operation": "chat",
         "request_model": "gpt-4o", "response_model": "", "model": "gpt-4o",
         "input_tokens": None, "output_tokens": None, "cache_read_input_tokens": None,
         "cache_creation_input_tokens": None, "latency_ms": 150.0, "ttft_ms": None,
         "tpot_ms": None, "status": "error", "error_type": "RateLimitError",
         "finish_reasons": [], "guardrail_names": [], "guardrail_verdicts": [],
         "guardrail_scores": [], "guardrail_hit": 0, "feedback": None, "prompt": None,
         "response": None, "cost_usd": None, "conversation_id": ""},
        # a tool call: an event of its own (operation execute_tool, no model, no cost)
        {**common, "span_id": "0000000000000005", "provider": "", "operation": "execute_tool",
         "request_model": "", "response_model": "", "model": "",
         "input_tokens": None, "output_tokens": None, "cache_read_input_tokens": None,
         "cache_creation_input_tokens": None, "latency_ms": 30.0, "ttft_ms": None,
         "tpot_ms": None, "status": "ok", "error_type": "",
         "finish_reasons": [], "guardrail_names": [], "guardrail_verdicts": [],
         "guardrail_scores": [], "guardrail_hit": 0, "feedback": None, "prompt": None,
         "response": None, "cost_usd": None, "conversation_id": ""},
    ]


async def test_collector_kafka_exporter_records_both_encodings(
        kafka_bootstrap: str, otlp_topics: tuple[str, str], chdb_dsn: str) -> None:
    topic, dlq = otlp_topics
    reqs = {v: collector_request(v) for v in (1, 2, 3, 4)}
    proto1, proto3 = reqs[1].SerializeToString(), reqs[3].SerializeToString()
    json2, json4 = collector_otlp_json(reqs[2]), collector_otlp_json(reqs[4])
    doc = json.loads(json2)  # really the Collector's otlp_json shape
    sp0 = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert sp0["traceId"] == "02" + bytes(range(1, 16)).hex() and sp0["kind"] == 3
    assert sp0["startTimeUnixNano"] == str(T0)
    assert {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "120"}} in \
        sp0["attributes"]
    await produce(kafka_bootstrap, topic, [
        (proto1, None),                                  # Collector default: otlp_proto
        (json2, None),                                   # Collector with encoding: otlp_json
        (proto3, [("content-type", b"otlp_proto")]),     # as `driftline otlp` writes them
        (json4, [("content-type", b"application/json")]),
    ])
    async with running_worker(kafka_bootstrap, chdb_dsn, topic, dlq) as worker:
        await wait_stored(worker, 16)
        assert worker.processed_records == 4
        # per request: the HTTP span is skipped (the tool span is an event)
        assert worker.metrics.skipped_spans == 4
    rows = stored_rows(chdb_dsn)
    assert len(rows) == 16
    by_variant: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_variant.setdefault(int(r["trace_id"][:2], 16), []).append(r)
    assert sorted(by_variant) == [1, 2, 3, 4]
    for v, got in by_variant.items():
        got.sort(key=lambda r: r["span_id"])
        exp = expected_collector_rows(v)
        assert len(got) == len(exp), f"variant {v}: {got}"
        for r, e in zip(got, exp, strict=True):
            for k, want in e.items():
                assert r[k] == want, f"variant {v}, span {r['span_id']}, {k}: {r[k]!r} != {want!r}"
        assert got[0]["extra"]["gen_ai.system_instructions"] == "Be kind."
        assert got[0]["extra"]["gen_ai.evaluation.results"] == [
            {"name": "relevance", "score": 0.8}]
        assert got[0]["extra"]["otel.scope.name"] == "my.genai.app"
    # the four encodings/headers gave the same rows, ids aside
    def strip(r: dict[str, Any]) -> dict[str, Any]:
        return {k: x for k, x in r.items() if k not in ("trace_id",)}
    assert all([strip(r) for r in by_variant[v]] == [strip(r) for r in by_variant[1]]
               for v in (2, 3, 4))


# --------------------------------------------------------------------------- (3) bad input


def mixed_request(tid_byte: int) -> ExportTraceServiceRequest:
    """Valid GenAI spans next to ones with missing or wrongly typed attributes."""
    tid = bytes([tid_byte]) * 16
    good = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
            "gen_ai.request.model": CHAT_MODEL, "gen_ai.usage.input_tokens": 10,
            "gen_ai.usage.output_tokens": 2}
    spans = [
        span(tid, 1, "chat ok-1", 0, 100, good),
        span(tid, 2, "chat no model", 10, 100, {"gen_ai.operation.name": "chat",
                                                "gen_ai.provider.name": "openai"}),
        span(tid, 3, "chat tokens abc", 20, 100, {**good, "gen_ai.usage.input_tokens": "abc"}),
        span(tid, 4, "chat finish int", 30, 100, {**good, "gen_ai.response.finish_reasons": 7}),
        span(tid, 5, "chat ttft text", 40, 100,
             {**good, "gen_ai.response.time_to_first_chunk": "fast"}),
        span(tid, 6, "chat ok-2", 50, 100, good),
        span(tid, 7, "GET /health", 60, 5, {"http.request.method": "GET"}),
    ]
    rs = ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])
    rs.resource.attributes.append(kv("service.name", "svc"))
    return ExportTraceServiceRequest(resource_spans=[rs])


def small_request(tid_byte: int, n: int, bad_tokens: int | None = None
                  ) -> ExportTraceServiceRequest:
    tid = bytes([tid_byte]) * 16
    spans = [span(tid, i + 1, f"chat {i}", i * 10, 100, {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
        "gen_ai.request.model": CHAT_MODEL,
        "gen_ai.usage.input_tokens": bad_tokens if bad_tokens is not None and i == 0 else 10,
        "gen_ai.usage.output_tokens": 2}) for i in range(n)]
    rs = ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])
    rs.resource.attributes.append(kv("service.name", "svc"))
    return ExportTraceServiceRequest(resource_spans=[rs])


async def test_bad_records_are_dead_lettered_and_nothing_valid_is_lost(
        kafka_bootstrap: str, otlp_topics: tuple[str, str], chdb_dsn: str) -> None:
    topic, dlq = otlp_topics
    valid = small_request(0x11, 2).SerializeToString()
    mixed = mixed_request(0x22).SerializeToString()
    mixed_json = collector_otlp_json(small_request(0x33, 2, bad_tokens=-5))
    llm_event = json.dumps({"app": "svc", "request_model": CHAT_MODEL, "latency_ms": 5,
                            "timestamp": 1_700_000_000_000}).encode()
    records: list[tuple[bytes | None, list[tuple[str, bytes]] | None]] = [
        (valid, None),                                      # 0: 2 events
        (valid[:-1], None),                                 # 1: truncated protobuf
        (b'{"hello": "world"}', None),                      # 2: JSON, not OTLP
        (llm_event, None),                                  # 3: an LLMEvent on the OTLP topic
        (valid, [("content-type", b"otlp_json")]),          # 4: header says JSON, body is proto
        (mixed, None),                                      # 5: 2 events, 4 spans rejected
        (mixed_json, None),                                 # 6: 1 event, 1 span rejected
    ]
    await produce(kafka_bootstrap, topic, records)
    async with running_worker(kafka_bootstrap, chdb_dsn, topic, dlq) as worker:
        await wait_stored(worker, 2 + 2 + 1, dead=6)
        assert worker.metrics.skipped_spans == 1
        assert worker.metrics.dlq == {"otlp": 6}
        # still consuming: a later good record is stored
        later = collector_otlp_json(small_request(0x44, 3))
        await produce(kafka_bootstrap, topic, [(later, [("content-type", b"otlp_json")])])
        await wait_stored(worker, 2 + 2 + 1 + 3, dead=6)
        assert worker.processed_records == len(records) + 1
    rows = stored_rows(chdb_dsn)
    names = sorted((r["trace_id"][:2], r["extra"]["otel.span.name"]) for r in rows)
    assert names == [("11", "chat 0"), ("11", "chat 1"), ("22", "chat ok-1"), ("22", "chat ok-2"),
                     ("33", "chat 1"), ("44", "chat 0"), ("44", "chat 1"), ("44", "chat 2")]
    assert all(r["input_tokens"] == 10 and r["output_tokens"] == 2 for r in rows)
    assert all(r["cost_usd"] == pytest.approx(cost(MINI, 10, 2), rel=1e-12) for r in rows)

    dlq_recs = await read_dlq(kafka_bootstrap, dlq, 6)
    assert len(dlq_recs) == 6
    by_offset = {int(dict(m.headers)["driftline-source-offset"]): m for m in dlq_recs}
    assert sorted(by_offset) == [1, 2, 3, 4, 5, 6]
    for off, m in by_offset.items():
        h = dict(m.headers)
        assert m.value == records[off][0], f"offset {off}: not the original bytes"
        assert h["driftline-source-topic"] == topic.encode()
    reason = {off: dict(m.headers)["driftline-reason"].decode() for off, m in by_offset.items()}
    assert reason[1].startswith("otlp: otlp_proto: not a valid ExportTraceServiceRequest")
    assert reason[2] == ("otlp: otlp_json: no resourceSpans "
                         "(not an OTLP ExportTraceServiceRequest)")
    assert reason[3] == reason[2]
    assert reason[4].startswith("otlp: otlp_json: not valid JSON")
    assert reason[5].startswith("otlp: 4 of 6 GenAI spans rejected (2 stored): ")
    for sid, why in (
            (2, "gen_ai.request.model: missing (and no gen_ai.response.model)"),
            (3, "gen_ai.usage.input_tokens: expected a non-negative integer, got 'abc'"),
            (4, "gen_ai.response.finish_reasons: expected a string array, got 7"),
            (5, "gen_ai.response.time_to_first_chunk: expected seconds as a number, got 'fast'")):
        assert f"span {sid:016x} (" in reason[5] and why in reason[5], (sid, reason[5])
    assert reason[6] == ("otlp: 1 of 2 GenAI spans rejected (1 stored): span 0000000000000001 "
                         "(chat 0): gen_ai.usage.input_tokens: must be >= 0, got -5")
