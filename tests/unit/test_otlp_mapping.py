"""OTLP GenAI span -> LLMEvent mapping, on requests built with the official opentelemetry-proto."""

from __future__ import annotations

import json
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from driftline.schemas.event import (
    Guardrail,
    LLMEvent,
    decode_event,
    encode_event,
    event_from_dict,
    event_to_dict,
)
from driftline.schemas.otlp import (
    OtlpBatch,
    OtlpDecodeError,
    _to_otlp_json,
    decode_request,
    detect_encoding,
    encoding_from_header,
)

T0 = 1_700_000_000_123_456_789  # ns
TRACE = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")


def av(v: Any) -> AnyValue:
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, str):
        return AnyValue(string_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    if isinstance(v, list):
        return AnyValue(array_value=ArrayValue(values=[av(x) for x in v]))
    if isinstance(v, dict):
        return AnyValue(kvlist_value=KeyValueList(values=kvs(v)))
    raise TypeError(v)


def kvs(d: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=av(v)) for k, v in d.items()]


def span(n: int, attrs: dict[str, Any], *, name: str = "chat gpt-4o", dur_ms: float = 1500.0,
         events: list[tuple[str, dict[str, Any]]] | None = None, error: bool = False,
         parent: int | None = None) -> Span:
    s = Span(trace_id=TRACE, span_id=n.to_bytes(8, "big"), name=name,
             kind=Span.SPAN_KIND_CLIENT, start_time_unix_nano=T0 + n * 10**9,
             end_time_unix_nano=T0 + n * 10**9 + int(dur_ms * 1e6), attributes=kvs(attrs),
             events=[Span.Event(name=en, time_unix_nano=T0 + n * 10**9, attributes=kvs(ea))
                     for en, ea in (events or [])])
    if parent is not None:
        s.parent_span_id = parent.to_bytes(8, "big")
    if error:
        s.status.code = Status.STATUS_CODE_ERROR
    return s


def request(*spans: Span, resource: dict[str, Any] | None = None) -> ExportTraceServiceRequest:
    res = {"service.name": "support-bot", "deployment.environment.name": "prod"}
    if resource is not None:
        res = resource
    rs = ResourceSpans(scope_spans=[ScopeSpans(spans=list(spans))])
    rs.resource.attributes.extend(kvs(res))
    rs.scope_spans[0].scope.name = "opentelemetry.instrumentation.openai_v2"
    return ExportTraceServiceRequest(resource_spans=[rs])


def both(req: ExportTraceServiceRequest) -> OtlpBatch:
    """Decode in both encodings, check they agree, return the protobuf result."""
    pb = decode_request(req.SerializeToString())
    js = decode_request(_to_otlp_json(req))
    assert js.events == pb.events
    assert js.rejected == pb.rejected
    assert js.skipped_non_genai == pb.skipped_non_genai
    # events are built without a second validation pass: validating them gives the same
    for e in pb.events:
        assert event_from_dict(event_to_dict(e)) == e
        # the OTLP re-keyer's wire form (streams/ingest/rekey.py): the JSON event it
        # produces to llm.events decodes back to the same event
        assert decode_event(encode_event(e)) == e
    return pb


def sid(n: int) -> str:
    return n.to_bytes(8, "big").hex()


CURRENT = {
    "gen_ai.operation.name": "chat",
    "gen_ai.provider.name": "openai",
    "gen_ai.request.model": "gpt-4o",
    "gen_ai.response.model": "gpt-4o-2024-08-06",
    "gen_ai.usage.input_tokens": 120,
    "gen_ai.usage.output_tokens": 51,
    "gen_ai.usage.cache_read.input_tokens": 64,
    "gen_ai.usage.cache_creation.input_tokens": 8,
    "gen_ai.usage.reasoning.output_tokens": 10,
    "gen_ai.response.time_to_first_chunk": 0.25,
    "gen_ai.response.finish_reasons": ["stop"],
    "gen_ai.conversation.id": "conv-7",
    "gen_ai.response.id": "chatcmpl-1",
    "server.address": "api.openai.com",
    "gen_ai.input.messages": json.dumps([
        {"role": "user", "parts": [{"type": "text", "content": "Hi"}]},
        {"role": "assistant", "parts": [{"type": "text", "content": "Hello!"}]},
        {"role": "user", "parts": [{"type": "text", "content": "Reset my password"},
                                   {"type": "uri", "uri": "https://x/y.png", "modality": "image"},
                                   {"type": "text", "content": "please"}]},
    ]),
    "gen_ai.output.messages": json.dumps([
        {"role": "assistant", "parts": [{"type": "text", "content": "Open Settings."}],
         "finish_reason": "stop"}]),
    "gen_ai.system_instructions": json.dumps([{"type": "text", "content": "Be brief."}]),
}


def test_current_names_map_every_field() -> None:
    b = both(request(span(1, CURRENT)))
    assert b.rejected == [] and b.skipped_non_genai == 0
    (ev,) = b.events
    d = event_to_dict(ev)
    res = d.pop("otel.resource", None)
    assert res is None
    assert d == {
        "app": "support-bot",
        "environment": "prod",
        "timestamp": (T0 + 10**9) // 1_000_000,
        "latency_ms": 1500.0,
        "event_id": d["event_id"],
        "operation": "chat",
        "provider": "openai",
        "request_model": "gpt-4o",
        "response_model": "gpt-4o-2024-08-06",
        "conversation_id": "conv-7",
        "trace_id": TRACE.hex(),
        "span_id": sid(1),
        "input_tokens": 120,
        "output_tokens": 51,
        "cache_read_input_tokens": 64,
        "cache_creation_input_tokens": 8,
        "reasoning_output_tokens": 10,
        "ttft_ms": 250.0,
        "tpot_ms": (1500.0 - 250.0) / 50,
        "finish_reasons": ["stop"],
        "prompt": "Reset my password\nplease",
        "response": "Open Settings.",
        "gen_ai.response.id": "chatcmpl-1",
        "server.address": "api.openai.com",
        "gen_ai.system_instructions": "Be brief.",
        "otel.span.name": "chat gpt-4o",
        "otel.scope.name": "opentelemetry.instrumentation.openai_v2",
    }
    assert ev.status == "ok" and ev.operation == "chat"
    assert len(d["event_id"]) == 36 and d["event_id"].count("-") == 4
    assert ev.model == "gpt-4o-2024-08-06" and ev.timestamp_ms == (T0 + 10**9) // 10**6


def test_event_id_is_stable_per_span_and_distinct_between_spans() -> None:
    req = request(span(1, CURRENT), span(2, CURRENT))
    a, b = decode_request(req.SerializeToString()).events
    again = decode_request(req.SerializeToString()).events
    assert a.event_id == again[0].event_id and a.event_id != b.event_id


def test_deprecated_names_and_legacy_content_events() -> None:
    attrs = {
        "gen_ai.system": "anthropic",
        "gen_ai.request.model": "claude-3-5-sonnet",
        "gen_ai.usage.prompt_tokens": 30,
        "gen_ai.usage.completion_tokens": 7,
        "error.type": "overloaded_error",
    }
    events = [
        ("gen_ai.content.prompt", {"gen_ai.prompt": json.dumps(
            [{"role": "system", "content": "sys"}, {"role": "user", "content": "What is 2+2?"}])}),
        ("gen_ai.content.completion", {"gen_ai.completion": json.dumps(
            [{"role": "assistant", "content": "4"}])}),
    ]
    b = both(request(span(3, attrs, events=events, error=True, dur_ms=200.0),
                     resource={"service.name": "calc", "deployment.environment": "staging",
                               "host.name": "h1"}))
    (ev,) = b.events
    assert (ev.app, ev.environment, ev.provider, ev.request_model, ev.response_model) == (
        "calc", "staging", "anthropic", "claude-3-5-sonnet", None)
    assert (ev.input_tokens, ev.output_tokens, ev.latency_ms) == (30, 7, 200.0)
    assert (ev.status, ev.error_type, ev.operation) == ("error", "overloaded_error", "chat")
    assert (ev.prompt, ev.response, ev.ttft_ms, ev.tpot_ms) == ("What is 2+2?", "4", None, None)
    assert ev.extra["otel.resource"] == {"host.name": "h1"}


def test_current_name_wins_over_deprecated() -> None:
    attrs = {"gen_ai.provider.name": "openai", "gen_ai.system": "old", "gen_ai.request.model": "m",
             "gen_ai.usage.input_tokens": 5, "gen_ai.usage.prompt_tokens": 99}
    (ev,) = both(request(span(1, attrs))).events
    assert (ev.provider, ev.input_tokens) == ("openai", 5)
    assert "gen_ai.system" not in ev.extra and "gen_ai.usage.prompt_tokens" not in ev.extra


def test_per_message_events_and_choice() -> None:
    attrs = {"gen_ai.system": "openai", "gen_ai.request.model": "gpt-4o-mini"}
    events = [
        ("gen_ai.system.message", {"content": "You are terse."}),
        ("gen_ai.user.message", {"content": "first"}),
        ("gen_ai.user.message", {"content": "second question"}),
        ("gen_ai.choice", {"body": json.dumps(
            {"index": 0, "finish_reason": "length", "message": {"content": "an answer"}})}),
    ]
    (ev,) = both(request(span(1, attrs, events=events))).events
    assert (ev.prompt, ev.response, ev.finish_reasons) == ("second question", "an answer", ["length"])
    assert ev.extra["gen_ai.system_instructions"] == "You are terse."


def test_inference_details_event_with_structured_messages() -> None:
    attrs = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"}
    details = {
        "gen_ai.input.messages": [{"role": "user", "parts": [{"type": "text", "content": "Q?"}]}],
        "gen_ai.output.messages": [
            {"role": "assistant", "parts": [{"type": "text", "content": "A1"}]},
            {"role": "assistant", "parts": [{"type": "text", "content": "A2"}]}],
        "gen_ai.system_instructions": json.dumps([{"type": "text", "content": "S"}]),
    }
    details["gen_ai.output.messages"][1]["finish_reason"] = "length"
    (ev,) = both(request(span(1, attrs, events=[
        ("gen_ai.client.inference.operation.details", details)]))).events
    assert (ev.prompt, ev.response, ev.extra["gen_ai.system_instructions"]) == ("Q?", "A1\nA2", "S")
    assert ev.finish_reasons == ["length"]  # from the output messages when the attribute is absent


def test_guardrail_events_and_apply_guardrail_spans() -> None:
    attrs = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"}
    events = [
        ("gen_ai.guardrail.result", {"gen_ai.guardrail.name": "pii", "gen_ai.guardrail.verdict":
                                     "flagged", "gen_ai.guardrail.score": 0.7}),
        ("gen_ai.guardrail.toxicity", {"gen_ai.guardrail.triggered": False}),
    ]
    parent = span(1, attrs, events=events)
    guard = span(2, {"gen_ai.operation.name": "apply_guardrail",
                     "gen_ai.security.decision.type": "deny",
                     "gen_ai.security.target.type": "llm_input",
                     "gen_ai.guardian.name": "Prompt Shield"},
                 name="apply_guardrail Prompt Shield", parent=1,
                 events=[("gen_ai.security.finding", {"gen_ai.security.risk.category":
                                                      "prompt_injection",
                                                      "gen_ai.security.risk.severity": "high",
                                                      "gen_ai.security.risk.score": 0.93}),
                         ("gen_ai.security.finding", {"gen_ai.security.risk.category": "jailbreak",
                                                      "gen_ai.security.risk.severity": "low",
                                                      "gen_ai.security.risk.score": 0.2})])
    orphan = span(3, {"gen_ai.operation.name": "apply_guardrail",
                      "gen_ai.security.decision.type": "allow"}, parent=99)
    b = both(request(guard, parent, orphan))
    (ev,) = b.events
    assert ev.guardrails == [Guardrail("pii", "flagged", 0.7), Guardrail("toxicity", "pass"),
                             Guardrail("Prompt Shield", "blocked", 0.93)]
    assert (b.attached_guardrails, b.detached_guardrails, b.rejected) == (1, 1, [])


def test_evaluation_events_give_feedback_and_keep_raw_scores() -> None:
    attrs = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m"}

    def ev_for(*evals: dict[str, Any]) -> LLMEvent:
        (ev,) = both(request(span(1, attrs, events=[("gen_ai.evaluation.result", e)
                                                     for e in evals]))).events
        return ev

    e = ev_for({"gen_ai.evaluation.name": "relevance", "gen_ai.evaluation.score.value": 0.8})
    assert e.feedback == 1
    assert e.extra["gen_ai.evaluation.results"] == [{"name": "relevance", "score": 0.8}]
    assert ev_for({"gen_ai.evaluation.name": "r", "gen_ai.evaluation.score.value": 0.2}).feedback == -1
    assert ev_for({"gen_ai.evaluation.name": "r", "gen_ai.evaluation.score.value": 0}).feedback == 0
    assert ev_for({"gen_ai.evaluation.name": "r", "gen_ai.evaluation.score.value": 4.0}).feedback == 1
    e = ev_for({"gen_ai.evaluation.name": "user", "gen_ai.evaluation.score.label": "thumbs_down",
                "gen_ai.evaluation.score.value": 1.0, "gen_ai.evaluation.explanation": "wrong"})
    assert e.feedback == -1  # a known label wins over the score
    assert e.extra["gen_ai.evaluation.results"] == [
        {"name": "user", "score": 1.0, "label": "thumbs_down", "explanation": "wrong"}]
    e = ev_for({"gen_ai.evaluation.name": "a", "gen_ai.evaluation.score.label": "pass"},
               {"gen_ai.evaluation.name": "b", "gen_ai.evaluation.score.label": "neutral"})
    assert e.feedback == 0  # the most negative evaluation wins
    assert ev_for({"gen_ai.evaluation.name": "x", "gen_ai.evaluation.score.label": "meh"}).feedback is None


def test_non_genai_and_non_model_spans_are_counted_not_mapped() -> None:
    """Agent and tool spans are events (tests/unit/test_agents.py); retrieval and memory
    spans without a model, and non-GenAI spans, are counted only."""
    b = both(request(
        span(1, {"http.request.method": "POST", "url.full": "https://x"}, name="POST"),
        span(2, {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "search"}),
        span(3, {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "a"}),
        span(4, {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m"}),
        span(5, {"gen_ai.operation.name": "retrieval", "gen_ai.data_source.id": "kb"}),
    ))
    assert (len(b.events), b.skipped_non_genai, b.skipped_non_model, b.rejected) == (3, 1, 1, [])
    assert [e.span_id for e in b.events] == [sid(2), sid(3), sid(4)]


@pytest.mark.parametrize(("attrs", "reason"), [
    ({"gen_ai.usage.input_tokens": "abc"},
     "gen_ai.usage.input_tokens: expected a non-negative integer, got 'abc'"),
    ({"gen_ai.usage.output_tokens": -3}, "gen_ai.usage.output_tokens: must be >= 0, got -3"),
    ({"gen_ai.usage.completion_tokens": True},
     "gen_ai.usage.completion_tokens: expected a non-negative integer, got bool True"),
    ({"gen_ai.usage.input_tokens": 1.5},
     "gen_ai.usage.input_tokens: expected a non-negative integer, got 1.5"),
    ({"gen_ai.response.time_to_first_chunk": "fast"},
     "gen_ai.response.time_to_first_chunk: expected seconds as a number, got 'fast'"),
    ({"gen_ai.response.time_to_first_chunk": -0.1},
     "gen_ai.response.time_to_first_chunk: must be a finite number >= 0, got -0.1"),
    ({"gen_ai.request.model": 5}, "gen_ai.request.model: expected a string, got 5"),
    ({"gen_ai.request.model": ""}, "gen_ai.request.model: missing (and no gen_ai.response.model)"),
    ({"gen_ai.response.finish_reasons": [1, 2]},
     "gen_ai.response.finish_reasons: expected a string array, got [1, 2]"),
])
def test_bad_attributes_reject_the_span_and_keep_the_others(attrs: dict[str, Any],
                                                            reason: str) -> None:
    bad = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o", **attrs}
    b = both(request(span(1, CURRENT), span(2, bad, name="bad span"), span(3, CURRENT)))
    assert [e.span_id for e in b.events] == [sid(1), sid(3)]
    (rej,) = b.rejected
    assert (rej.reason, rej.span_name, rej.trace_id, rej.span_id) == (
        reason, "bad span", TRACE.hex(), sid(2))


def test_numeric_token_strings_are_accepted() -> None:
    attrs = {"gen_ai.request.model": "m", "gen_ai.usage.input_tokens": "42",
             "gen_ai.usage.output_tokens": 7.0}
    (ev,) = both(request(span(1, attrs))).events
    assert (ev.input_tokens, ev.output_tokens) == (42, 7)


def test_bad_guardrail_and_evaluation_and_time_reject() -> None:
    base = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m"}
    s1 = span(1, base, events=[("gen_ai.guardrail.result", {"gen_ai.guardrail.verdict": "maybe"})])
    s2 = span(2, base, events=[("gen_ai.evaluation.result", {"gen_ai.evaluation.score.value": 1})])
    s3 = span(3, base)
    s3.end_time_unix_nano = s3.start_time_unix_nano - 1
    s4 = span(4, {"gen_ai.operation.name": "apply_guardrail"})
    b = both(request(s1, s2, s3, s4))
    assert b.events == []
    assert [r.reason for r in b.rejected] == [
        "gen_ai.guardrail.verdict: unknown guardrail verdict 'maybe' (expected pass/flagged/blocked "
        "or allow/warn/modify/deny/audit)",
        "gen_ai.evaluation.name: required on gen_ai.evaluation.result events",
        f"end_time_unix_nano: before the start ({s3.end_time_unix_nano} < {s3.start_time_unix_nano})",
        "gen_ai.security.decision.type: required on apply_guardrail spans",
    ]


def test_openllmetry_indexed_content_and_missing_service_name() -> None:
    attrs = {"gen_ai.system": "openai", "gen_ai.request.model": "m",
             "gen_ai.prompt.0.role": "system", "gen_ai.prompt.0.content": "sys",
             "gen_ai.prompt.1.role": "user", "gen_ai.prompt.1.content": "hello",
             "gen_ai.completion.0.role": "assistant", "gen_ai.completion.0.content": "hi there"}
    (ev,) = both(request(span(1, attrs), resource={})).events
    assert (ev.app, ev.environment, ev.prompt, ev.response) == (
        "unknown_service", None, "hello", "hi there")
    assert ev.extra["gen_ai.system_instructions"] == "sys"


def test_otlp_json_has_hex_ids_and_string_int64() -> None:
    req = request(span(1, CURRENT))
    doc = json.loads(_to_otlp_json(req))
    sp = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert sp["traceId"] == TRACE.hex() and sp["spanId"] == sid(1)
    assert isinstance(sp["startTimeUnixNano"], str)
    assert detect_encoding(b"  \n{") == "otlp_json" and detect_encoding(b"\x0a\x02") == "otlp_proto"


def test_truncated_protobuf_raises() -> None:
    data = request(span(1, CURRENT)).SerializeToString()
    with pytest.raises(OtlpDecodeError, match="otlp_proto: not a valid ExportTraceServiceRequest"):
        decode_request(data[: len(data) // 2], "otlp_proto")


@pytest.mark.parametrize(("payload", "match"), [
    (b'{"hello": "world"}', "no resourceSpans"),
    (b'[1, 2, 3]', "expected a JSON object, got list"),
    (b'{"resourceSpans": "nope"}', "not an ExportTraceServiceRequest"),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}', "is not hex"),
    (b'{"resourceSpans": [', "not valid JSON"),
])
def test_json_that_is_not_otlp_raises(payload: bytes, match: str) -> None:
    with pytest.raises(OtlpDecodeError, match=match):
        decode_request(payload)


def test_empty_and_unknown_encoding() -> None:
    assert decode_request(b"").events == []
    assert decode_request(b'{"resourceSpans": []}').events == []
    with pytest.raises(OtlpDecodeError, match="unknown encoding"):
        decode_request(b"", "avro")
    with pytest.raises(OtlpDecodeError, match="only unknown fields"):
        decode_request(b"\x78\x01", "otlp_proto")  # field 15 varint: valid wire data, not OTLP


def test_system_role_input_messages_become_system_instructions() -> None:
    msgs = json.dumps([{"role": "system", "parts": [{"type": "text", "content": "Be kind."}]},
                       {"role": "user", "parts": [{"type": "text", "content": "Hi"}]}])
    [ev] = both(request(span(1, {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m",
                                 "gen_ai.input.messages": msgs}))).events
    assert ev.prompt == "Hi" and ev.extra["gen_ai.system_instructions"] == "Be kind."
    # the dedicated attribute wins
    [ev] = both(request(span(1, {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m",
                                 "gen_ai.input.messages": msgs,
                                 "gen_ai.system_instructions": "Be brief."}))).events
    assert ev.extra["gen_ai.system_instructions"] == "Be brief."


def test_encoding_from_header() -> None:
    assert encoding_from_header(None) is None
    assert encoding_from_header(b"") is None
    assert encoding_from_header(b"otlp_proto") == "otlp_proto"
    assert encoding_from_header("otlp_json") == "otlp_json"
    assert encoding_from_header(b"application/x-protobuf") == "otlp_proto"
    assert encoding_from_header(b"Application/JSON; charset=utf-8") == "otlp_json"
    assert encoding_from_header(b"text/plain") is None  # unknown: sniff the payload


def test_protobuf_starting_like_json_is_still_sniffed_as_protobuf() -> None:
    """0x0a (field 1) is a newline: a first ResourceSpans of 123 bytes starts b"\\n{"."""
    for n in range(1, 120):
        sp = Span(trace_id=TRACE, span_id=b"\1" * 8, start_time_unix_nano=T0,
                  end_time_unix_nano=T0 + 10**9, attributes=kvs({"gen_ai.request.model": "m" * n}))
        req = ExportTraceServiceRequest(resource_spans=[ResourceSpans(
            scope_spans=[ScopeSpans(spans=[sp])])])
        data = req.SerializeToString()
        if data[1:2] == b"{":
            break
    else:  # pragma: no cover
        raise AssertionError("no payload starting b'\\n{' found")
    assert detect_encoding(data) == "otlp_json"  # the guess...
    [ev] = decode_request(data).events  # ...falls back to protobuf
    assert ev.request_model == "m" * n
    # real JSON with a leading newline stays JSON; a broken one says so
    assert len(decode_request(b"\n" + _to_otlp_json(req)).events) == 1
    with pytest.raises(OtlpDecodeError, match="otlp_proto"):
        decode_request(b"\n{not json")
