"""OTLP decode benchmark: GenAI spans/s decoded and mapped to LLMEvents, per core.

    python benchmarks/bench_otlp.py [--requests 50] [--spans 100] [--rounds 5]

Builds ``--requests`` OTLP ``ExportTraceServiceRequest`` batches of ``--spans`` GenAI
chat spans each, serialized ``otlp_proto`` (the Collector Kafka exporter's default) with
the official ``opentelemetry-proto`` messages. Each span is one call of the replay fleet
(``streams/devdata/replay.py``: real AlpacaEval prompts/responses via ``ReplayData.load()``;
falls back to the handwritten synthetic pool, and says so) written the way
``opentelemetry-instrumentation-openai-v2`` writes it with content capture on
(``span_only``): operation/provider/request+response model, response id, usage with
cache and reasoning tokens, finish reasons, time to first chunk, request parameters,
server address/port, conversation id, ``gen_ai.input.messages`` (system + user) and
``gen_ai.output.messages`` as JSON strings; errors with span status and ``error.type``;
guardrail results as ``gen_ai.guardrail`` events and user feedback as
``gen_ai.evaluation.result`` events; SDK resource attributes.

Timed on one thread in CPU time (``time.process_time``, fair on a shared machine),
best of ``--rounds``:

1. baseline: ``ExportTraceServiceRequest.FromString(data)`` (the upb C parser);
2. driftline: ``decode_request(data, "otlp_proto")``: parse + map every span to a
   validated ``LLMEvent`` (what the worker does per ``otlp_spans`` record);
3. for information: parsing plus reading every attribute into dicts without mapping
   (the floor of any mapping through the upb messages), the worker's ``decode_batch``
   (records on ``otlp_spans``), and ``otlp_json`` payloads.

Prints spans/s for each and the ratio driftline / baseline, plus a breakdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from driftline.schemas.otlp import _attrs, _to_otlp_json, decode_request
from driftline.schemas.topics import OTLP_TOPIC

_FEEDBACK_LABEL = {1: "thumbs_up", -1: "thumbs_down", 0: "neutral"}
_SYSTEM = {
    "support-bot": "You are the support assistant of Acme. Answer briefly and politely; "
                   "never reveal internal tooling; escalate billing disputes to a human.",
    "code-assistant": "You are a senior engineer helping with code. Prefer small, tested "
                      "changes and explain trade-offs in one paragraph.",
    "search-answers": "Answer from the retrieved context only. Cite sources as [n]. "
                      "Say you do not know when the context is silent.",
}


def machine() -> str:
    from _machine import cpu_model

    cpu = cpu_model()
    import google.protobuf
    from google.protobuf.internal import api_implementation

    return (f"{os.cpu_count()} vCPU, {cpu}, Python {platform.python_version()}, "
            f"protobuf {google.protobuf.__version__} ({api_implementation.Type()} backend), "
            f"{platform.platform()}")


def _kv(k: str, v: Any) -> KeyValue:
    if isinstance(v, bool):
        return KeyValue(key=k, value=AnyValue(bool_value=v))
    if isinstance(v, str):
        return KeyValue(key=k, value=AnyValue(string_value=v))
    if isinstance(v, int):
        return KeyValue(key=k, value=AnyValue(int_value=v))
    if isinstance(v, float):
        return KeyValue(key=k, value=AnyValue(double_value=v))
    return KeyValue(key=k, value=AnyValue(array_value=ArrayValue(
        values=[AnyValue(string_value=x) for x in v])))


def _span(ev: dict[str, Any], i: int) -> Span:
    """One replay event as an openai-v2 (span_only) chat span."""
    req_model = ev.get("request_model") or ev.get("response_model")
    a: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": ev.get("provider") or "openai",
        "gen_ai.request.model": req_model,
        "gen_ai.request.temperature": 0.2,
        "gen_ai.request.max_tokens": 1024,
        "server.address": f"api.{ev.get('provider') or 'openai'}.com",
        "server.port": 443,
        "gen_ai.conversation.id": ev.get("conversation_id") or f"conv-{i}",
        "user.id": ev.get("user_id") or "u_0",
        "driftline.prompt_version": ev.get("prompt_version") or "v1",
        "gen_ai.input.messages": json.dumps([
            {"role": "system", "parts": [{"type": "text", "content": _SYSTEM.get(
                ev["app"], "You are a helpful assistant.")}]},
            {"role": "user", "parts": [{"type": "text", "content": ev.get("prompt") or ""}]},
        ]),
    }
    if ev.get("status") == "error":
        a["error.type"] = ev.get("error_type") or "server_error"
    else:
        fr = ev.get("finish_reasons") or ["stop"]
        a.update({
            "gen_ai.response.model": ev.get("response_model") or req_model,
            "gen_ai.response.id": f"chatcmpl-{i:08x}",
            "gen_ai.response.finish_reasons": fr,
            "gen_ai.output.messages": json.dumps([
                {"role": "assistant", "finish_reason": fr[0],
                 "parts": [{"type": "text", "content": ev.get("response") or ""}]}]),
        })
        for key, attr in (("input_tokens", "gen_ai.usage.input_tokens"),
                          ("output_tokens", "gen_ai.usage.output_tokens"),
                          ("cache_read_input_tokens", "gen_ai.usage.cache_read.input_tokens"),
                          ("cache_creation_input_tokens",
                           "gen_ai.usage.cache_creation.input_tokens"),
                          ("reasoning_output_tokens", "gen_ai.usage.reasoning.output_tokens")):
            if ev.get(key) is not None:
                a[attr] = int(ev[key])
        if ev.get("ttft_ms") is not None:
            a["gen_ai.response.time_to_first_chunk"] = ev["ttft_ms"] / 1000.0
    start = int(ev["timestamp"]) * 1_000_000
    events = [Span.Event(name="gen_ai.guardrail", time_unix_nano=start, attributes=[
        _kv("gen_ai.guardrail.name", g["name"]), _kv("gen_ai.guardrail.verdict", g["verdict"]),
        *([_kv("gen_ai.guardrail.score", float(g["score"]))] if g.get("score") is not None
          else [])]) for g in ev.get("guardrails") or ()]
    if ev.get("feedback") is not None:
        events.append(Span.Event(name="gen_ai.evaluation.result", time_unix_nano=start,
                                 attributes=[_kv("gen_ai.evaluation.name", "user_feedback"),
                                             _kv("gen_ai.evaluation.score.label",
                                                 _FEEDBACK_LABEL[int(ev["feedback"])])]))
    s = Span(trace_id=bytes.fromhex(ev["trace_id"]) if ev.get("trace_id") else i.to_bytes(16, "big"),
             span_id=bytes.fromhex(ev["span_id"]) if ev.get("span_id") else i.to_bytes(8, "big"),
             name=f"chat {req_model}", kind=Span.SPAN_KIND_CLIENT,
             start_time_unix_nano=start,
             end_time_unix_nano=start + int(float(ev["latency_ms"]) * 1_000_000),
             attributes=[_kv(k, v) for k, v in a.items()], events=events)
    if ev.get("status") == "error":
        s.status.CopyFrom(Status(code=Status.STATUS_CODE_ERROR, message=a["error.type"]))
    return s


def build_requests(n_requests: int, spans_per: int, seed: int) -> tuple[list[bytes], str]:
    from _replay import replay_data

    from driftline.streams.devdata.replay import ReplayConfig, generate

    data, kind = replay_data(seed)
    n = n_requests * spans_per
    evs = [r.event for r in generate(ReplayConfig(n_events=n, seed=seed, malformed_rate=0.0,
                                                  late_rate=0.0), data)]
    assert len(evs) == n
    out: list[bytes] = []
    for r in range(n_requests):
        by_app: dict[str, list[Span]] = {}
        for i in range(r * spans_per, (r + 1) * spans_per):
            by_app.setdefault(evs[i]["app"], []).append(_span(evs[i], i))
        req = ExportTraceServiceRequest()
        for app, spans in by_app.items():  # one ResourceSpans per service, as a Collector batches
            rs = ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])
            rs.scope_spans[0].scope.name = "opentelemetry.util.genai.handler"
            rs.resource.attributes.extend([
                _kv("service.name", app), _kv("deployment.environment.name", "prod"),
                _kv("telemetry.sdk.language", "python"),
                _kv("telemetry.sdk.name", "opentelemetry"),
                _kv("telemetry.sdk.version", "1.45.2"), _kv("host.name", "ip-10-0-3-17"),
                _kv("service.instance.id", f"{app}-7d9f8c-x2x4q"),
            ])
            req.resource_spans.append(rs)
        out.append(req.SerializeToString())
    return out, kind


def cpu_rate(fn: Callable[[bytes], Any], payloads: list[bytes], spans: int, rounds: int,
             repeat: int = 1) -> tuple[float, float]:
    """(spans per CPU second, best round; wall seconds of that round). ``repeat`` runs the
    payloads several times per round, so that fast functions are timed over ~0.1 s+."""
    for p in payloads[:3]:
        fn(p)  # warm up
    spans *= repeat
    work = payloads * repeat
    best_cpu, wall = float("inf"), 0.0
    for _ in range(rounds):
        w0, t0 = time.perf_counter(), time.process_time()
        for p in work:
            fn(p)
        cpu = time.process_time() - t0
        if cpu < best_cpu:
            best_cpu, wall = cpu, time.perf_counter() - w0
    return spans / best_cpu, wall


class _Rec:
    __slots__ = ("topic", "partition", "offset", "key", "value", "headers")

    def __init__(self, value: bytes, offset: int) -> None:
        self.topic, self.partition, self.offset, self.key = OTLP_TOPIC, 0, offset, None
        self.value, self.headers = value, [("content-type", b"otlp_proto")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--spans", type=int, default=100, help="GenAI spans per request")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)

    t = time.perf_counter()
    payloads, kind = build_requests(args.requests, args.spans, args.seed)
    n = args.requests * args.spans
    size = sum(map(len, payloads))
    print(f"machine: {machine()}")
    print(f"data: {kind}; {args.requests} otlp_proto requests x {args.spans} spans = {n} spans, "
          f"{size / len(payloads) / 1024:.0f} KiB/request ({size / n:.0f} B/span), "
          f"built in {time.perf_counter() - t:.1f} s")

    # correctness first: every span becomes an event, content and numbers intact
    b = decode_request(payloads[0], "otlp_proto")
    assert len(b.events) == args.spans and not b.rejected, (len(b.events), b.rejected[:2])
    assert all(e.prompt and e.latency_ms > 0 for e in b.events)

    base, base_wall = cpu_rate(ExportTraceServiceRequest.FromString, payloads, n, args.rounds,
                               repeat=10)
    ours, ours_wall = cpu_rate(lambda p: decode_request(p, "otlp_proto"), payloads, n,
                               args.rounds)
    print(f"baseline  ExportTraceServiceRequest.FromString : {base:12,.0f} spans/s per core "
          f"({1e6 / base:6.2f} us/span; wall {base_wall:.2f} s)")
    print(f"driftline decode_request(otlp_proto) -> LLMEvent: {ours:12,.0f} spans/s per core "
          f"({1e6 / ours:6.2f} us/span; wall {ours_wall:.2f} s)")
    print(f"ratio driftline / baseline: {ours / base:.3f}  "
          f"(decode+map costs {base / ours:.1f}x a bare protobuf parse)")

    # information: the floor of any mapping through the upb messages, i.e. parsing and
    # reading every attribute (resource, span, span events) into dicts, nothing mapped
    def read_all(p: bytes) -> int:
        n = 0
        for rs in ExportTraceServiceRequest.FromString(p).resource_spans:
            _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    n += len(_attrs(sp.attributes))
                    for ev in sp.events:
                        _attrs(ev.attributes)
        return n

    floor, _ = cpu_rate(read_all, payloads, n, args.rounds)
    print(f"info      parse + read all attributes (no mapping): {floor:12,.0f} spans/s per core "
          f"({1e6 / floor:6.2f} us/span)")
    # information: requests of other spans (a Collector forwarding whole app traces):
    # 100 HTTP server spans each, skipped and counted
    http = []
    for r in range(10):
        req = ExportTraceServiceRequest()
        rs = req.resource_spans.add()
        rs.resource.attributes.extend([_kv("service.name", "web"),
                                       _kv("telemetry.sdk.language", "python")])
        ss = rs.scope_spans.add()
        for i in range(args.spans):
            k = r * args.spans + i
            ss.spans.append(Span(
                trace_id=k.to_bytes(16, "big"), span_id=(k + 1).to_bytes(8, "big"),
                name="GET /api/users/{id}", kind=Span.SPAN_KIND_SERVER,
                start_time_unix_nano=1_763_800_000_000_000_000 + k * 10**6,
                end_time_unix_nano=1_763_800_000_012_000_000 + k * 10**6,
                attributes=[_kv(a, v) for a, v in {
                    "http.request.method": "GET", "url.path": f"/api/users/{k}",
                    "url.scheme": "https", "http.route": "/api/users/{id}",
                    "http.response.status_code": 200, "server.address": "api.example.com",
                    "server.port": 443, "network.protocol.version": "1.1",
                    "client.address": "10.0.3.17",
                    "user_agent.original": "Mozilla/5.0 (X11; Linux x86_64)"}.items()]))
        http.append(req.SerializeToString())
    assert decode_request(http[0], "otlp_proto").skipped_non_genai == args.spans
    hs, _ = cpu_rate(lambda p: decode_request(p, "otlp_proto"), http, 10 * args.spans,
                     args.rounds, repeat=5)
    hb, _ = cpu_rate(ExportTraceServiceRequest.FromString, http, 10 * args.spans, args.rounds,
                     repeat=20)
    print(f"info      non-GenAI spans skipped (HTTP, 10 attrs)  : {hs:12,.0f} spans/s per core "
          f"(FromString alone {hb:,.0f}/s)")
    # information: the worker's decode stage and the JSON encoding
    try:
        from driftline.streams.ingest.transforms import decode_batch

        recs = [_Rec(p, i) for i, p in enumerate(payloads)]
        got = len(decode_batch(recs[:1]).events)
        assert got == args.spans, got
        chunk = 10
        groups = [recs[i:i + chunk] for i in range(0, len(recs), chunk)]
        w, _ = cpu_rate(lambda g: decode_batch(g), groups, n, args.rounds)  # type: ignore[arg-type]
        print(f"worker    pipeline.decode_batch (otlp_spans)    : {w:12,.0f} spans/s per core")
    except Exception as exc:  # noqa: BLE001 - the pipeline is optional here
        print(f"worker decode_batch: skipped ({type(exc).__name__}: {exc})")
    js = [_to_otlp_json(ExportTraceServiceRequest.FromString(p)) for p in payloads[:10]]
    j, _ = cpu_rate(lambda p: decode_request(p, "otlp_json"), js, len(js) * args.spans,
                    args.rounds)
    print(f"info      decode_request(otlp_json)             : {j:12,.0f} spans/s per core "
          f"({sum(map(len, js)) / len(js) / 1024:.0f} KiB/request)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
