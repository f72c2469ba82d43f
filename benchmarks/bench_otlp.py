"""OTLP decode benchmark: GenAI spans/s decoded and mapped to LLMEvents, per core.

    python benchmarks/bench_otlp.py [--requests 50] [--spans 100] [--rounds 9] [--runs 3]

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
best of ``--rounds`` (before and after: their rounds interleaved), in ``--runs`` runs,
each printing the machine's steal time:

1. baseline: ``ExportTraceServiceRequest.FromString(data)`` (the upb C parser);
2. before: ``decode_request`` of ``benchmarks/_otlp_before.py``, the frozen copy of
   ``schemas/otlp.py`` before issue 20 (parse + map every span to a validated LLMEvent);
3. after: ``decode_request(data, "otlp_proto")`` of ``schemas/otlp.py`` now (what the
   worker does per ``otlp_spans`` record); the differential test
   ``tests/unit/test_otlp_differential.py`` checks both give equal events;
4. for information, once: floors of any mapping through upb messages (parse and iterate
   the attributes; parse and read every attribute into dicts), the alternative of a
   hand-written protobuf wire reader in Python, the worker's ``decode_batch`` before and
   after, non-GenAI spans, and ``otlp_json`` payloads.

Prints spans/s for each, the ratios to the baseline, after / before, and the steal time.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

import _otlp_before as before
from bench_throughput import steal_s
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from driftline.schemas import otlp as after_mod
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


# --------------------------------------------------------------------------- wire reader
# The alternative the issue names: read each span's attributes from their protobuf bytes in
# Python instead of through upb messages. A shadow of the schema (span and event attributes
# declared ``repeated bytes``) hands over each ``KeyValue``'s bytes in one C call; the
# common shapes are read with slices (the rest would go to upb). Measured, not used.

def _shadow_request_class() -> Any:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
    from opentelemetry.proto.common.v1 import common_pb2
    from opentelemetry.proto.resource.v1 import resource_pb2
    from opentelemetry.proto.trace.v1 import trace_pb2

    pool = descriptor_pool.DescriptorPool()
    for mod in (common_pb2, resource_pb2, trace_pb2, trace_service_pb2):
        fdp = descriptor_pb2.FileDescriptorProto()
        mod.DESCRIPTOR.CopyToProto(fdp)
        if mod is trace_pb2:
            span = next(m for m in fdp.message_type if m.name == "Span")
            event = next(m for m in span.nested_type if m.name == "Event")
            for msg in (span, event):
                f = next(f for f in msg.field if f.name == "attributes")
                f.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
                f.ClearField("type_name")
        pool.Add(fdp)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName(ExportTraceServiceRequest.DESCRIPTOR.full_name))


_unpack_double = struct.Struct("<d").unpack_from


def _varint(b: bytes, i: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        c = b[i]
        i += 1
        v |= (c & 0x7F) << shift
        if c < 0x80:
            return v, i
        shift += 7


def _wire_value(b: bytes, k: int, end: int) -> Any:
    t = b[k]
    if t == 0x0A:  # string_value
        n, s = _varint(b, k + 1)
        return b[s:s + n].decode()
    if t == 0x18:  # int_value
        v, _ = _varint(b, k + 1)
        return v - (1 << 64) if v >> 63 else v
    if t == 0x21:  # double_value
        return _unpack_double(b, k + 1)[0]
    if t == 0x10:  # bool_value
        return b[k + 1] != 0
    if t == 0x2A:  # array_value of scalars
        n, s = _varint(b, k + 1)
        out = []
        while s < end:
            n, s = _varint(b, s + 1)
            out.append(_wire_value(b, s, s + n) if n else None)
            s += n
        return out
    if t == 0x3A:  # bytes_value
        n, s = _varint(b, k + 1)
        return base64.b64encode(b[s:s + n]).decode("ascii")
    raise ValueError("not a common shape")


def wire_attrs(kvs: Any) -> dict[str, Any]:
    """``_attrs`` of ``KeyValue`` bytes (key, then value), the short string inlined."""
    out: dict[str, Any] = {}
    for b in kvs:
        n = len(b)
        kl, i = _varint(b, 1)
        j = i + kl
        key = b[i:j].decode()
        if j == n:
            out[key] = None
            continue
        vl, k = _varint(b, j + 1)
        if k == n:
            out[key] = None
        elif b[k] == 0x0A and b[k + 1] == n - k - 2:
            out[key] = b[k + 2:n].decode()
        else:
            out[key] = _wire_value(b, k, n)
    return out


class _Rec:
    __slots__ = ("topic", "partition", "offset", "key", "value", "headers")

    def __init__(self, value: bytes, offset: int) -> None:
        self.topic, self.partition, self.offset, self.key = OTLP_TOPIC, 0, offset, None
        self.value, self.headers = value, [("content-type", b"otlp_proto")]


def _per_core(rate: float) -> str:
    return f"{rate:10,.0f} spans/s per core ({1e6 / rate:6.2f} us/span)"


def paired_rates(fns: dict[str, Callable[[bytes], Any]], payloads: list[bytes], spans: int,
                 rounds: int) -> dict[str, float]:
    """Spans per CPU second of each function, best of ``rounds``, their rounds interleaved
    (one round of each in turn, the order alternating), so that a change of load on a
    shared machine falls on all of them alike."""
    for fn in fns.values():
        for p in payloads[:3]:
            fn(p)  # warm up
    best = dict.fromkeys(fns, float("inf"))
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            fn, t0 = fns[name], time.process_time()
            for p in payloads:
                fn(p)
            best[name] = min(best[name], time.process_time() - t0)
    return {name: spans / cpu for name, cpu in best.items()}


def timed_runs(payloads: list[bytes], n: int, rounds: int, runs: int) -> dict[str, list[float]]:
    """``runs`` runs of baseline, then before and after (rounds interleaved), each best of
    ``rounds``; prints one line per run with the steal time over it."""
    def old(p: bytes) -> Any:
        return before.decode_request(p, "otlp_proto")

    def new(p: bytes) -> Any:
        return decode_request(p, "otlp_proto")

    got: dict[str, list[float]] = {"base": [], "before": [], "after": []}
    for r in range(runs):
        st0, w0 = steal_s(), time.perf_counter()
        base, _ = cpu_rate(ExportTraceServiceRequest.FromString, payloads, n, rounds, repeat=10)
        rates = paired_rates({"before": old, "after": new}, payloads, n, rounds)
        got["base"].append(base)
        got["before"].append(rates["before"])
        got["after"].append(rates["after"])
        steal, wall = steal_s() - st0, time.perf_counter() - w0
        b, a = rates["before"], rates["after"]
        print(f"run {r + 1}: FromString {base:,.0f}/s | before {b:,.0f}/s ({b / base:.3f} of "
              f"FromString) | after {a:,.0f}/s ({a / base:.3f}) | after/before {a / b:.2f}x | "
              f"steal {steal:.2f} CPU-s over {wall:.1f} s wall "
              f"({100 * steal / max(wall * (os.cpu_count() or 1), 1e-9):.1f}% of the CPUs)",
              flush=True)
    return got


def info_floors(payloads: list[bytes], n: int, rounds: int) -> None:
    """What any mapping through upb messages costs at least, and the wire-reader alternative."""
    def iterate(p: bytes) -> int:
        k = 0
        for rs in ExportTraceServiceRequest.FromString(p).resource_spans:
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    for _kv in sp.attributes:
                        k += 1
                    for ev in sp.events:
                        for _kv in ev.attributes:
                            k += 1
        return k

    def read_all(p: bytes) -> int:
        k = 0
        for rs in ExportTraceServiceRequest.FromString(p).resource_spans:
            _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    k += len(_attrs(sp.attributes))
                    for ev in sp.events:
                        _attrs(ev.attributes)
        return k

    shadow = _shadow_request_class()

    def wire_all(p: bytes) -> int:
        k = 0
        for rs in shadow.FromString(p).resource_spans:
            _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    k += len(wire_attrs(sp.attributes))
                    for ev in sp.events:
                        wire_attrs(ev.attributes)
        return k

    real = ExportTraceServiceRequest.FromString(payloads[0]).resource_spans[0].scope_spans[0]
    wired = shadow.FromString(payloads[0]).resource_spans[0].scope_spans[0]
    assert all(list(_attrs(a.attributes).items()) == list(wire_attrs(b.attributes).items())
               for a, b in zip(real.spans, wired.spans, strict=True))
    kvs = sum(len(sp.attributes) + sum(len(e.attributes) for e in sp.events) for sp in real.spans)
    print(f"info      attributes per span (span + its events): {kvs / len(real.spans):.1f}")
    for label, fn in (("parse + iterate the KeyValues, nothing read", iterate),
                      ("parse + read all attributes into dicts (upb)", read_all),
                      ("same with a Python wire reader (shadow schema)", wire_all)):
        rate, _ = cpu_rate(fn, payloads, n, rounds)
        print(f"info      {label:47s}: {_per_core(rate)}")


def info_worker(payloads: list[bytes], n: int, rounds: int, spans: int) -> None:
    """The worker's decode stage (``decode_batch`` on ``otlp_spans`` records), before and
    after (before: the stage calling the frozen copy's ``decode_request``)."""
    from driftline.streams.ingest.transforms import decode_batch

    recs = [_Rec(p, i) for i, p in enumerate(payloads)]
    groups = [recs[i:i + 10] for i in range(0, len(recs), 10)]
    best = {"after": 0.0, "before": 0.0}
    saved = after_mod.decode_request
    for label in ("after", "before", "before", "after"):  # alternating, best kept
        after_mod.decode_request = (  # type: ignore[assignment]
            saved if label == "after" else before.decode_request)
        try:
            got = len(decode_batch(recs[:1]).events)  # type: ignore[arg-type]
            assert got == spans, got
            w, _ = cpu_rate(lambda g: decode_batch(g), groups, n, rounds)  # type: ignore[arg-type]
            best[label] = max(best[label], w)
        finally:
            after_mod.decode_request = saved  # type: ignore[assignment]
    for label, w in best.items():
        print(f"worker    decode_batch (otlp_spans), {label:6s}         : {_per_core(w)}")


def _http_requests(spans: int) -> list[bytes]:
    """Requests of 100 HTTP server spans each (a Collector forwarding whole app traces)."""
    http = []
    for r in range(10):
        req = ExportTraceServiceRequest()
        rs = req.resource_spans.add()
        rs.resource.attributes.extend([_kv("service.name", "web"),
                                       _kv("telemetry.sdk.language", "python")])
        ss = rs.scope_spans.add()
        for i in range(spans):
            k = r * spans + i
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
    return http


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=50, help="export requests to build")
    ap.add_argument("--spans", type=int, default=100, help="GenAI spans per request")
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds per figure (best kept)")
    ap.add_argument("--runs", type=int, default=3,
                    help="runs of baseline/before/after, each with its steal time")
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

    # correctness first: every span becomes an event, content and numbers intact, and the
    # current path gives the same events as the frozen one
    b = decode_request(payloads[0], "otlp_proto")
    assert len(b.events) == args.spans and not b.rejected, (len(b.events), b.rejected[:2])
    assert all(e.prompt and e.latency_ms > 0 for e in b.events)
    assert all(decode_request(p, "otlp_proto").events == before.decode_request(p, "otlp_proto").events
               for p in payloads[:5])

    got = timed_runs(payloads, n, args.rounds, args.runs)
    base, old, new = (statistics.median(got[k]) for k in ("base", "before", "after"))
    print(f"median of {args.runs} runs:")
    print(f"baseline  ExportTraceServiceRequest.FromString   : {_per_core(base)}")
    print(f"before    decode_request (frozen copy) -> LLMEvent: {_per_core(old)}, "
          f"{old / base:.3f} of FromString")
    print(f"after     decode_request(otlp_proto) -> LLMEvent  : {_per_core(new)}, "
          f"{new / base:.3f} of FromString")
    print(f"after / before: {new / old:.2f}x; target 50,000 spans/s per core: "
          f"{'met' if new >= 50_000 else 'NOT met'}")

    info_floors(payloads, n, args.rounds)
    http = _http_requests(args.spans)
    assert decode_request(http[0], "otlp_proto").skipped_non_genai == args.spans
    hs, _ = cpu_rate(lambda p: decode_request(p, "otlp_proto"), http, 10 * args.spans,
                     args.rounds, repeat=5)
    hb, _ = cpu_rate(ExportTraceServiceRequest.FromString, http, 10 * args.spans, args.rounds,
                     repeat=20)
    print(f"info      non-GenAI spans skipped (HTTP, 10 attrs)   : {_per_core(hs)} "
          f"(FromString alone {hb:,.0f}/s)")
    try:
        info_worker(payloads, n, args.rounds, args.spans)
    except ImportError as exc:  # the pipeline is optional here
        print(f"worker decode_batch: skipped ({type(exc).__name__}: {exc})")
    js = [_to_otlp_json(ExportTraceServiceRequest.FromString(p)) for p in payloads[:10]]
    j, _ = cpu_rate(lambda p: decode_request(p, "otlp_json"), js, len(js) * args.spans,
                    args.rounds)
    print(f"info      decode_request(otlp_json)                  : {_per_core(j)} "
          f"({sum(map(len, js)) / len(js) / 1024:.0f} KiB/request)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
