"""Shared pieces of the OTLP tests: a local OpenAI-compatible server and real instrumentation.

- ``fake_openai``: an aiohttp server on 127.0.0.1 answering ``POST /v1/chat/completions``
  (non-streaming, and streaming with ``stream_options.include_usage``) with fixed texts
  and token counts, so every number downstream is known.
- :func:`instrumented_calls`: the official ``opentelemetry-instrumentation-openai-v2``
  instruments the real ``openai`` client, the real OTLP/HTTP exporter sends the spans to
  an OTLP/HTTP endpoint (the driftline receiver), one plain and one streaming call.

Use from a test module: ``from helpers_otlp import fake_openai, instrumented_calls``
(``tests/`` is on ``sys.path`` through the rootdir conftest).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from driftline.streams.local.broker import free_port

CHAT_MODEL, RESP_MODEL = "gpt-4o-mini", "gpt-4o-mini-2024-07-18"
FIRST_CHUNK_DELAY = 0.08
PLAIN_DELAY = 0.02
CHUNK_GAP = 0.02

# what the fake server answers (the fixed numbers the tests assert on)
PLAIN_PROMPT, PLAIN_SYSTEM, PLAIN_ANSWER = "What is OTLP?", "Be brief.", "OTLP is a protocol."
PLAIN_USAGE = (12, 5)
STREAM_PROMPT, STREAM_ANSWER = "How do I reset it?", "Open Settings."
STREAM_USAGE = (20, 3)
HAND_MODEL = "llama-3-8b"


async def _chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    created = int(time.time())
    if not body.get("stream"):
        await asyncio.sleep(PLAIN_DELAY)
        return web.json_response({
            "id": "chatcmpl-plain", "object": "chat.completion", "created": created,
            "model": RESP_MODEL,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": PLAIN_ANSWER}}],
            "usage": {"prompt_tokens": PLAIN_USAGE[0], "completion_tokens": PLAIN_USAGE[1],
                      "total_tokens": sum(PLAIN_USAGE)},
        })
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await asyncio.sleep(FIRST_CHUNK_DELAY)

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": "chatcmpl-stream", "object": "chat.completion.chunk", "created": created,
                "model": RESP_MODEL,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    chunks = [chunk({"role": "assistant", "content": "Open"}), chunk({"content": " Settings"}),
              chunk({"content": "."}), chunk({}, "stop")]
    if (body.get("stream_options") or {}).get("include_usage"):
        chunks.append({"id": "chatcmpl-stream", "object": "chat.completion.chunk",
                       "created": created, "model": RESP_MODEL, "choices": [],
                       "usage": {"prompt_tokens": STREAM_USAGE[0],
                                 "completion_tokens": STREAM_USAGE[1],
                                 "total_tokens": sum(STREAM_USAGE)}})
    for c in chunks:
        await resp.write(f"data: {json.dumps(c)}\n\n".encode())
        await asyncio.sleep(CHUNK_GAP)
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


@pytest.fixture
async def fake_openai() -> AsyncIterator[str]:
    """Base URL (``http://127.0.0.1:PORT/v1``) of a local OpenAI-compatible server."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/v1"
    await runner.cleanup()


async def hand_instrumented_stream(tracer: Any, base_url: str) -> None:
    """A streaming call traced by the app itself, as the GenAI conventions describe it
    (openai-v2 2.4b0 does not record ``gen_ai.response.time_to_first_chunk``)."""
    from opentelemetry.trace import SpanKind

    with tracer.start_as_current_span(f"chat {HAND_MODEL}", kind=SpanKind.CLIENT) as sp:
        sp.set_attributes({"gen_ai.operation.name": "chat", "gen_ai.provider.name": "vllm",
                           "gen_ai.request.model": HAND_MODEL})
        t0, first = time.monotonic(), None
        async with aiohttp.ClientSession() as http, http.post(
                f"{base_url}/chat/completions",
                json={"model": HAND_MODEL, "stream": True,
                      "stream_options": {"include_usage": True},
                      "messages": [{"role": "user", "content": "hi"}]}) as r:
            async for line in r.content:
                if line.startswith(b"data: {") and first is None:
                    first = time.monotonic() - t0
        assert first is not None
        sp.set_attributes({"gen_ai.response.time_to_first_chunk": first,
                           "gen_ai.usage.input_tokens": STREAM_USAGE[0],
                           "gen_ai.usage.output_tokens": STREAM_USAGE[1],
                           "gen_ai.response.model": RESP_MODEL})


async def instrumented_calls(base_url: str, otlp_url: str, capture: str | None,
                             monkeypatch: pytest.MonkeyPatch, hand_span: bool = False,
                             service_name: str = "support-bot") -> None:
    """One plain and one streaming chat completion through the instrumented real client;
    the spans are exported (OTLP/HTTP, gzip) to ``otlp_url`` and flushed before returning.

    ``capture`` is the value of ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``
    (None: unset, the instrumentation's default, no content).
    """
    openai_v2 = pytest.importorskip(
        "opentelemetry.instrumentation.openai_v2",
        reason="opentelemetry-instrumentation-openai-v2 2.4b0 needs opentelemetry-util-genai<1.2")
    from openai import AsyncOpenAI
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if capture is None:
        monkeypatch.delenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", raising=False)
    else:
        monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", capture)
    tp = TracerProvider(resource=Resource.create(
        {"service.name": service_name, "deployment.environment.name": "test"}))
    tp.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=otlp_url, compression=Compression.Gzip, timeout=10)))
    instrumentor = openai_v2.OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=tp)
    try:
        client = AsyncOpenAI(base_url=base_url, api_key="sk-test", max_retries=0)
        plain = await client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "system", "content": PLAIN_SYSTEM},
                                        {"role": "user", "content": PLAIN_PROMPT}])
        assert plain.choices[0].message.content == PLAIN_ANSWER
        stream = await client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": STREAM_PROMPT}],
            stream=True, stream_options={"include_usage": True})
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == STREAM_ANSWER
        await client.close()
        if hand_span:
            await hand_instrumented_stream(tp.get_tracer(service_name), base_url)
    finally:
        instrumentor.uninstrument()
        # the exporter runs in the SDK's thread and posts to the receiver on this loop
        assert await asyncio.to_thread(tp.force_flush, 15_000)
        await asyncio.to_thread(tp.shutdown)


def genai_request(spans: list[tuple[str, str, int, int, int, int]], trace: int, *, prompts: bool = False,
                  prompt_version: str | None = None) -> bytes:
    """A protobuf OTLP request of GenAI client spans, one per ``(app, model, start_ms,
    duration_ms, input_tokens, output_tokens)`` (``service.name`` = app), all in trace
    ``trace``, span ids 1, 2, ...: as the Collector's Kafka exporter writes them. With
    ``prompts``, each span carries a user message (``gen_ai.input.messages``); with
    ``prompt_version``, the ``driftline.prompt_version`` attribute."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

    def kv(k: str, v: str | int) -> KeyValue:
        return KeyValue(key=k, value=AnyValue(int_value=v) if isinstance(v, int) else AnyValue(string_value=v))

    by_app: dict[str, list[Any]] = {}
    for i, (app, model, start_ms, dur_ms, tin, tout) in enumerate(spans):
        by_app.setdefault(app, []).append(Span(
            trace_id=trace.to_bytes(16, "big"), span_id=(i + 1).to_bytes(8, "big"), name=f"chat {model}",
            kind=Span.SPAN_KIND_CLIENT, start_time_unix_nano=start_ms * 1_000_000,
            end_time_unix_nano=(start_ms + dur_ms) * 1_000_000,
            attributes=[kv("gen_ai.operation.name", "chat"), kv("gen_ai.provider.name", "openai"),
                        kv("gen_ai.request.model", model), kv("gen_ai.response.model", model),
                        kv("gen_ai.usage.input_tokens", tin),
                        *([kv("driftline.prompt_version", prompt_version)] if prompt_version else []),
                        *([kv("gen_ai.input.messages", json.dumps([{"role": "user", "parts": [
                            {"type": "text", "content": f"{app} question {trace}.{i}: how do I reset my "
                                                        "password?"}]}]))] if prompts else []),
                        kv("gen_ai.usage.output_tokens", tout)]))
    req = ExportTraceServiceRequest()
    for app, app_spans in by_app.items():
        rs = ResourceSpans(scope_spans=[ScopeSpans(spans=app_spans)])
        rs.resource.attributes.append(kv("service.name", app))
        req.resource_spans.append(rs)
    return req.SerializeToString()
