"""The OTLP/HTTP receiver end to end, with real clients and the real local broker.

(a) the official opentelemetry-instrumentation-openai-v2 instruments the real ``openai``
    client calling a local OpenAI-compatible server; the real OTLP/HTTP exporter sends the
    spans to the receiver, which writes them to Kafka; we consume them with aiokafka and
    decode them with driftline's decoder.
(b) bad input over HTTP, and the receiver keeps answering.
(c) Kafka unreachable -> 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord
from google.rpc.status_pb2 import Status
from helpers_otlp import (  # noqa: F401 (fixture)
    CHAT_MODEL,
    FIRST_CHUNK_DELAY,
    RESP_MODEL,
    fake_openai,
    instrumented_calls,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from prometheus_client import CollectorRegistry

from driftline.schemas.event import LLMEvent
from driftline.schemas.otlp import ExportTraceServiceRequest, _to_otlp_json, decode_request
from driftline.streams.ingest.otlp_receiver import OtlpReceiver
from driftline.streams.local.broker import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
async def receiver(kafka_bootstrap: str, topic_name: str, make_topics: Any
                   ) -> AsyncIterator[OtlpReceiver]:
    make_topics({topic_name: 1})
    r = OtlpReceiver(kafka_bootstrap, port=0, topic=topic_name, registry=CollectorRegistry())
    await r.start()
    yield r
    await r.stop()


async def consume(bootstrap: str, topic: str, want_events: int, timeout: float = 20.0
                  ) -> tuple[list[ConsumerRecord[bytes, bytes]], list[LLMEvent]]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    events: list[LLMEvent] = []
    try:
        deadline = time.monotonic() + timeout
        while len(events) < want_events and time.monotonic() < deadline:
            for msgs in (await consumer.getmany(timeout_ms=300)).values():
                for m in msgs:
                    records.append(m)
                    assert m.value is not None
                    enc = dict(m.headers)["content-type"].decode()
                    events.extend(decode_request(m.value, enc).events)
    finally:
        await consumer.stop()
    return records, events


# --------------------------------------------------------------------------- (a) real SDK


async def test_openai_instrumentation_spans_reach_kafka(
        fake_openai: str, receiver: OtlpReceiver, kafka_bootstrap: str,  # noqa: F811
        topic_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    await instrumented_calls(fake_openai, receiver.url, "SPAN_ONLY", monkeypatch, hand_span=True)
    records, events = await consume(kafka_bootstrap, topic_name, 3)
    assert {dict(r.headers)["content-type"] for r in records} == {b"otlp_proto"}
    assert len(events) == 3
    by_prompt = {e.prompt: e for e in events}
    plain, streamed = by_prompt["What is OTLP?"], by_prompt["How do I reset it?"]
    hand = next(e for e in events if e.provider == "vllm")
    for ev in (plain, streamed, hand):
        assert (ev.app, ev.environment, ev.operation, ev.status) == (
            "support-bot", "test", "chat", "ok")
        assert ev.response_model == RESP_MODEL
        assert ev.latency_ms > 0 and len(ev.trace_id or "") == 32 and len(ev.span_id or "") == 16
    for ev in (plain, streamed):
        assert (ev.provider, ev.request_model) == ("openai", CHAT_MODEL)
        assert ev.extra["otel.scope.name"] == "opentelemetry.util.genai.handler"
    assert (plain.input_tokens, plain.output_tokens, plain.ttft_ms) == (12, 5, None)
    assert (plain.response, plain.finish_reasons) == ("OTLP is a protocol.", ["stop"])
    assert (streamed.input_tokens, streamed.output_tokens) == (20, 3)
    assert streamed.response == "Open Settings."
    # finish_reasons come from gen_ai.output.messages: 2.4b0 leaves the attribute unset on streams
    assert streamed.finish_reasons == ["stop"]
    # finding: openai-v2 2.4b0's ChatStreamWrapper never records time-to-first-chunk
    assert streamed.ttft_ms is None
    assert (hand.request_model, hand.input_tokens, hand.output_tokens) == ("llama-3-8b", 20, 3)
    assert hand.ttft_ms is not None and hand.tpot_ms is not None
    assert FIRST_CHUNK_DELAY * 1000 * 0.9 <= hand.ttft_ms <= hand.latency_ms
    assert hand.tpot_ms == pytest.approx((hand.latency_ms - hand.ttft_ms) / 2)
    reg = receiver.registry
    assert reg.get_sample_value("driftline_otlp_spans_accepted_total") == 3
    assert reg.get_sample_value("driftline_otlp_spans_rejected_total") == 0


async def test_capture_true_is_not_a_mode_of_openai_v2_2_4(
        fake_openai: str, receiver: OtlpReceiver, kafka_bootstrap: str,  # noqa: F811
        topic_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With openai-v2 2.4b0 the value ``true`` captures nothing: span_only etc. are needed."""
    await instrumented_calls(fake_openai, receiver.url, "true", monkeypatch)
    _, events = await consume(kafka_bootstrap, topic_name, 2)
    assert len(events) == 2
    assert [(e.prompt, e.response) for e in events] == [(None, None), (None, None)]
    assert sorted(e.output_tokens or 0 for e in events) == [3, 5]


# --------------------------------------------------------------------------- (b) bad input


def _genai_request(bad: bool = False) -> ExportTraceServiceRequest:
    def kv(k: str, v: Any) -> KeyValue:
        return KeyValue(key=k, value=AnyValue(string_value=v) if isinstance(v, str)
                        else AnyValue(int_value=v))

    spans = [Span(trace_id=b"\x01" * 16, span_id=bytes([0, 0, 0, 0, 0, 0, 0, i + 1]),
                  name=f"chat {i}", start_time_unix_nano=1_700_000_000_000_000_000,
                  end_time_unix_nano=1_700_000_000_500_000_000,
                  attributes=[kv("gen_ai.operation.name", "chat"),
                              kv("gen_ai.request.model", "gpt-4o"),
                              kv("gen_ai.usage.input_tokens", "abc" if bad and i == 1 else 10)])
             for i in range(3)]
    rs = ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])
    rs.resource.attributes.append(kv("service.name", "svc"))
    return ExportTraceServiceRequest(resource_spans=[rs])


async def test_bad_requests_are_answered_and_the_receiver_keeps_working(
        receiver: OtlpReceiver, kafka_bootstrap: str, topic_name: str) -> None:
    url, proto = receiver.url, {"Content-Type": "application/x-protobuf"}
    good = _genai_request().SerializeToString()
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=good[: len(good) // 2], headers=proto) as r:
            assert r.status == 400 and r.headers["Content-Type"] == "application/x-protobuf"
            st = Status.FromString(await r.read())
            assert st.code == 3 and "not a valid ExportTraceServiceRequest" in st.message
        async with http.post(url, data=good, headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 415
        async with http.post(url, data=b'{"hello": "world"}',
                             headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400
            assert "no resourceSpans" in (await r.json())["message"]
        async with http.post(url, data=b"\0" * (20 * 1024 * 1024), headers=proto) as r:
            assert r.status == 413
        bomb = gzip.compress(b"\0" * (20 * 1024 * 1024))  # 20 KB on the wire
        async with http.post(url, data=bomb, headers={**proto, "Content-Encoding": "gzip"}) as r:
            assert r.status == 413
        async with http.post(url, data=b"not gzip",
                             headers={**proto, "Content-Encoding": "gzip"}) as r:
            assert r.status == 400
        # still answers valid requests: protobuf, then gzipped OTLP/JSON with one bad span
        async with http.post(url, data=good, headers=proto) as r:
            assert r.status == 200
            assert ExportTraceServiceResponse.FromString(await r.read()) == \
                ExportTraceServiceResponse()
        js = _to_otlp_json(_genai_request(bad=True))
        async with http.post(url, data=gzip.compress(js),
                             headers={"Content-Type": "application/json",
                                      "Content-Encoding": "gzip"}) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "application/json"
            ps = (await r.json())["partialSuccess"]
            assert ps["rejectedSpans"] == "1"
            assert "gen_ai.usage.input_tokens: expected a non-negative integer, got 'abc'" in \
                ps["errorMessage"]
        async with http.get(f"http://127.0.0.1:{receiver.port}/healthz") as r:
            assert await r.json() == {"status": "ok", "kafka": "connected"}
    records, events = await consume(kafka_bootstrap, topic_name, 5)
    assert [r.value for r in records] == [good, js]  # the original bytes, gunzipped
    assert [dict(r.headers)["content-type"] for r in records] == [b"otlp_proto", b"otlp_json"]
    assert len(events) == 5
    reg = receiver.registry
    assert reg.get_sample_value("driftline_otlp_requests_total", {"code": "200"}) == 2
    assert reg.get_sample_value("driftline_otlp_requests_total", {"code": "400"}) == 3
    assert reg.get_sample_value("driftline_otlp_requests_total", {"code": "413"}) == 2
    assert reg.get_sample_value("driftline_otlp_requests_total", {"code": "415"}) == 1
    assert reg.get_sample_value("driftline_otlp_spans_accepted_total") == 5
    assert reg.get_sample_value("driftline_otlp_spans_rejected_total") == 1
    assert reg.get_sample_value("driftline_otlp_errors_total", {"reason": "decode"}) == 2


# --------------------------------------------------------------------------- (c) Kafka down


async def test_kafka_unavailable_answers_503_with_retry_after() -> None:
    reg = CollectorRegistry()
    r = OtlpReceiver(f"127.0.0.1:{free_port()}", port=0, registry=reg, send_timeout=3.0,
                     retry_after=7)
    await r.start()
    try:
        body = _genai_request().SerializeToString()
        async with aiohttp.ClientSession() as http:
            for _ in range(2):
                async with http.post(r.url, data=body,
                                     headers={"Content-Type": "application/x-protobuf"}) as resp:
                    assert resp.status == 503 and resp.headers["Retry-After"] == "7"
                    assert Status.FromString(await resp.read()).code == 14
                await asyncio.sleep(1.1)  # past the reconnect back-off: a real retry
            async with http.get(f"http://127.0.0.1:{r.port}/healthz") as resp:
                assert await resp.json() == {"status": "ok", "kafka": "disconnected"}
    finally:
        await r.stop()
    assert reg.get_sample_value("driftline_otlp_errors_total", {"reason": "kafka_unavailable"}) == 2
