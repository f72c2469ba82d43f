"""FROZEN COPY of ``schemas/otlp.py`` before issue 20 (commit 9406375), kept unchanged as
the reference of the OTLP decode benchmark (``bench_otlp.py`` times it beside the current
path in the same run) and of the differential test (``tests/unit/test_otlp_differential.py``: the
current path must give events equal, field by field, to this one's). Do not edit; do not
import from the package.

Original module docstring follows.

OTLP trace ingestion: decode ``ExportTraceServiceRequest`` and map GenAI spans to LLMEvents.

The ``otlp_spans`` topic carries whole OTLP export requests, as the OpenTelemetry
Collector Kafka exporter writes them (``otlp_proto``, its default, or
``otlp_json``), and the ``driftline otlp`` receiver forwards them unchanged.
:func:`decode_request` turns one such payload into an :class:`OtlpBatch`:

- every GenAI span (one with ``gen_ai.operation.name``, ``gen_ai.provider.name``,
  ``gen_ai.system`` or ``gen_ai.request.model``) that is a model call becomes one
  :class:`~driftline.schemas.event.LLMEvent`;
- agent and tool spans (``invoke_agent``, ``create_agent``, ``invoke_workflow``,
  ``execute_tool``; OpenTelemetry GenAI agent conventions) become events too, with that
  ``operation`` and no model needed: a trace's tool calls and agent runs are then rows of
  ``llm_events`` that the ``trace_summary`` view counts. Usage on an agent span stays in
  ``extra`` (agent frameworks report there the sum of the model calls below it, which
  are events of their own: pricing both would count the cost twice), and so does its
  model (an agent run is not a model call: its duration must not enter the model's
  latency windows);
- ``gen_ai.agent.name`` / ``gen_ai.agent.id`` fill ``agent_name`` / ``agent_id``; a span
  without them takes those of its nearest ``invoke_agent`` (``create_agent``,
  ``invoke_workflow``) ancestor in the same request; ``gen_ai.tool.name`` fills
  ``tool_name``;
- ``apply_guardrail`` spans are folded into their parent span's ``guardrails``;
- other GenAI spans that are not model calls (``retrieval``, ``create_memory``,
  ``search_memory`` without a model) are counted in ``skipped_non_model``;
- other spans are counted in ``skipped_non_genai``;
- a GenAI span with bad attributes (tokens ``"abc"`` or negative, a negative
  duration, an unknown guardrail verdict, ...) becomes a :class:`RejectedSpan` with
  the reason, while the valid spans of the same request are kept;
- a payload that is not an OTLP trace request raises :class:`OtlpDecodeError`
  (the worker dead-letters the record with ``reason``).

The attribute mapping (current and deprecated semantic-convention names) is
documented in ``docs/otlp-mapping.md``; :data:`MAPPING_DOC` points there.

Events are built without a second ``event_from_dict`` pass (every value is checked while
mapping), and spans that are not GenAI are skipped on their attribute keys alone.
``otlp_json`` goes through ``json_format.ParseDict``, which is pure Python: prefer
``otlp_proto`` (the Collector's default) for volume. Speed: ``benchmarks/RESULTS.md``,
"OTLP decode".

>>> from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
>>> decode_request(ExportTraceServiceRequest().SerializeToString()).events
[]
"""

from __future__ import annotations

import base64
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import msgspec
from google.protobuf import json_format, unknown_fields
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from driftline.schemas.event import (
    MAX_TOKENS,
    MODEL_OPTIONAL_OPERATIONS,
    EventError,
    Guardrail,
    LLMEvent,
    check_limits,
)

__all__ = [
    "ENCODINGS",
    "MAPPING_DOC",
    "OtlpBatch",
    "OtlpDecodeError",
    "RejectedSpan",
    "decode_request",
    "detect_encoding",
    "encoding_from_header",
    "is_genai_span",
    "map_request",
]

#: the two payload encodings on ``otlp_spans`` (the Kafka header ``content-type``)
ENCODINGS: tuple[str, str] = ("otlp_proto", "otlp_json")

#: where the mapping table lives (for the README)
MAPPING_DOC = "docs/otlp-mapping.md"


class OtlpDecodeError(ValueError):
    """The payload is not a decodable OTLP ``ExportTraceServiceRequest``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RejectedSpan:
    """A GenAI span that could not be mapped; ``reason`` names the attribute and the problem."""

    reason: str
    span_name: str
    trace_id: str
    span_id: str


@dataclass(slots=True)
class OtlpBatch:
    """The result of decoding one export request."""

    events: list[LLMEvent] = field(default_factory=list)
    rejected: list[RejectedSpan] = field(default_factory=list)
    skipped_non_genai: int = 0
    #: GenAI spans that are not model calls, agent or tool spans (retrieval, memory)
    skipped_non_model: int = 0
    #: events that took ``agent_name``/``agent_id`` from an agent span above them
    inherited_agents: int = 0
    #: ``apply_guardrail`` spans folded into their parent's ``guardrails``
    attached_guardrails: int = 0
    #: ``apply_guardrail`` spans whose parent span is not in this request
    detached_guardrails: int = 0


# --------------------------------------------------------------------------- decoding


def detect_encoding(data: bytes) -> str:
    """``otlp_json`` when the payload starts with ``{`` (or ``[``), maybe after whitespace,
    else ``otlp_proto``.

    An OTLP protobuf request never starts with ``{``/``[`` (its first byte is ``0x0a``,
    field 1), but ``0x0a`` is also a newline: a protobuf request whose first
    ``ResourceSpans`` is 123 (or 91) bytes long starts ``b"\\n{"``. Such a payload
    is guessed ``otlp_json`` here; :func:`decode_request` then falls back to
    ``otlp_proto`` when it is not JSON.
    """
    first = data[:1]
    if first in (b"{", b"["):
        return "otlp_json"
    if first in (b" ", b"\t", b"\r", b"\n") and data[:64].lstrip()[:1] in (b"{", b"["):
        return "otlp_json"
    return "otlp_proto"


_HEADER_ENCODINGS: dict[str, str] = {
    "otlp_proto": "otlp_proto", "otlp_json": "otlp_json",
    "application/x-protobuf": "otlp_proto", "application/protobuf": "otlp_proto",
    "application/json": "otlp_json",
}


def encoding_from_header(value: bytes | str | None) -> str | None:
    """The encoding named by a Kafka ``content-type`` header, or None to sniff the payload.

    ``otlp_proto``/``otlp_json`` (what ``driftline otlp`` writes) and the OTLP/HTTP MIME
    types are understood (parameters such as ``; charset=utf-8`` are ignored); anything
    else, and no header at all (the Collector's Kafka exporter sets none), gives None.
    """
    if not value:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return _HEADER_ENCODINGS.get(value.split(";", 1)[0].strip().lower())


def decode_request(data: bytes, encoding: str | None = None) -> OtlpBatch:
    """Decode one OTLP trace export request and map its GenAI spans.

    ``encoding`` is ``"otlp_proto"`` or ``"otlp_json"``; ``None`` detects it.
    Raises :class:`OtlpDecodeError` when the payload is not an OTLP trace request.
    """
    if encoding is None:
        encoding = detect_encoding(data)
        if encoding == "otlp_json" and data[:1] == b"\n":
            # a newline, then "{": JSON, or protobuf whose first length byte is "{"
            try:
                return map_request(_parse_json(data))
            except OtlpDecodeError:
                encoding = "otlp_proto"
    if encoding == "otlp_proto":
        req = _parse_proto(data)
    elif encoding == "otlp_json":
        req = _parse_json(data)
    else:
        raise OtlpDecodeError(f"unknown encoding {encoding!r} (expected otlp_proto or otlp_json)")
    return map_request(req)


def _parse_proto(data: bytes) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    try:
        req.ParseFromString(data)
    except DecodeError as exc:
        raise OtlpDecodeError(f"otlp_proto: not a valid ExportTraceServiceRequest: {exc}") from None
    if not req.resource_spans and data and len(unknown_fields.UnknownFieldSet(req)):
        raise OtlpDecodeError("otlp_proto: no resource_spans, only unknown fields "
                              "(not an ExportTraceServiceRequest)")
    return req


_ID_KEYS = (("traceId", "trace_id"), ("spanId", "span_id"), ("parentSpanId", "parent_span_id"))


def _hex_to_b64(obj: dict[str, Any], where: str) -> None:
    for camel, snake in _ID_KEYS:
        for key in (camel, snake):
            v = obj.get(key)
            if isinstance(v, str) and v:
                try:
                    obj[key] = base64.b64encode(bytes.fromhex(v)).decode("ascii")
                except ValueError:
                    raise OtlpDecodeError(f"otlp_json: {where}.{key} {v[:40]!r} is not hex") from None


def _list(obj: Any, *keys: str) -> list[Any]:
    if not isinstance(obj, dict):
        return []
    for k in keys:
        v = obj.get(k)
        if isinstance(v, list):
            return v
    return []


def _parse_json(data: bytes) -> ExportTraceServiceRequest:
    try:
        doc = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise OtlpDecodeError(f"otlp_json: not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise OtlpDecodeError(f"otlp_json: expected a JSON object, got {type(doc).__name__}")
    if "resourceSpans" not in doc and "resource_spans" not in doc:
        raise OtlpDecodeError("otlp_json: no resourceSpans (not an OTLP ExportTraceServiceRequest)")
    # OTLP/JSON writes trace and span ids as hex; the protobuf JSON mapping expects base64.
    for i, rs in enumerate(_list(doc, "resourceSpans", "resource_spans")):
        for j, ss in enumerate(_list(rs, "scopeSpans", "scope_spans")):
            for k, sp in enumerate(_list(ss, "spans")):
                if isinstance(sp, dict):
                    where = f"resourceSpans[{i}].scopeSpans[{j}].spans[{k}]"
                    _hex_to_b64(sp, where)
                    for n, link in enumerate(_list(sp, "links")):
                        if isinstance(link, dict):
                            _hex_to_b64(link, f"{where}.links[{n}]")
    req = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(doc, req, ignore_unknown_fields=True)
    except (json_format.ParseError, TypeError, ValueError) as exc:
        raise OtlpDecodeError(f"otlp_json: not an ExportTraceServiceRequest: {exc}") from None
    return req


# --------------------------------------------------------------------------- attribute values


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "string_value":
        return v.string_value
    if kind == "int_value":
        return v.int_value
    if kind == "double_value":
        return v.double_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return base64.b64encode(v.bytes_value).decode("ascii")
    return None


def _attrs(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        v = kv.value
        kind = v.WhichOneof("value")
        if kind == "string_value":
            out[kv.key] = v.string_value
        elif kind == "int_value":
            out[kv.key] = v.int_value
        elif kind == "double_value":
            out[kv.key] = v.double_value
        else:
            out[kv.key] = _value(v)
    return out


class _Reject(Exception):
    pass


def _tokens(a: dict[str, Any], key: str, old: str | None = None) -> int | None:
    v = a.pop(key, None)
    if old is not None:
        ov = a.pop(old, None)
        if v is None:
            v, key = ov, old
    if v is None:
        return None
    if v.__class__ is int and 0 <= v <= MAX_TOKENS:  # the common case, first
        return v
    if isinstance(v, bool):
        raise _Reject(f"{key}: expected a non-negative integer, got bool {v}")
    if isinstance(v, int):
        n = v
    elif isinstance(v, float) and v.is_integer():
        n = int(v)
    elif isinstance(v, str) and len(v) <= 40 and v.strip().isdigit():  # int64 as a string
        n = int(v)
    else:
        raise _Reject(f"{key}: expected a non-negative integer, got {v[:40] if isinstance(v, str) else v!r}")
    if n < 0:
        raise _Reject(f"{key}: must be >= 0, got {n}")
    if n > MAX_TOKENS:
        raise _Reject(f"{key}: out of range: {n} (0 to {MAX_TOKENS})")
    return n


def _string(a: dict[str, Any], key: str, old: str | None = None) -> str | None:
    v = a.pop(key, None)
    if old is not None:
        ov = a.pop(old, None)
        if v is None:
            v, key = ov, old
    if v.__class__ is str:
        return v or None
    if v is None:
        return None
    if not isinstance(v, str):
        raise _Reject(f"{key}: expected a string, got {v!r}")
    return v or None


def _seconds_ms(a: dict[str, Any], key: str) -> float | None:
    v = a.pop(key, None)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Reject(f"{key}: expected seconds as a number, got {v!r}")
    if not math.isfinite(v) or v < 0:
        raise _Reject(f"{key}: must be a finite number >= 0, got {v!r}")
    return float(v) * 1000.0


# --------------------------------------------------------------------------- content


def _load(v: Any) -> Any:
    """Attribute content: a JSON string (span attributes) or structured value (events)."""
    if v.__class__ is str:
        c = v[:1]
        if c not in ("[", "{") and not (c.isspace() and v.lstrip()[:1] in ("[", "{")):
            return v
        try:
            return msgspec.json.decode(v)
        except msgspec.DecodeError:
            return v
    return v


def _part_texts(parts: Any, out: list[str]) -> None:
    if isinstance(parts, str):
        if parts:
            out.append(parts)
        return
    if isinstance(parts, dict):
        parts = [parts]
    if not isinstance(parts, list):
        return
    for p in parts:
        if isinstance(p, str):
            if p:
                out.append(p)
        elif isinstance(p, dict):
            t = p.get("type")
            if t not in (None, "text", "input_text", "output_text"):
                continue
            c = p.get("content", p.get("text"))
            if isinstance(c, str) and c:
                out.append(c)


def _message_text(m: Any) -> str:
    if m.__class__ is dict:  # the common shape: one text part
        parts = m.get("parts")
        if parts.__class__ is list and len(parts) == 1:
            p = parts[0]
            if p.__class__ is dict and p.get("type") == "text":
                c = p.get("content")
                if c.__class__ is str:
                    return c
    out: list[str] = []
    if isinstance(m, dict):
        if "parts" in m:
            _part_texts(m["parts"], out)
        elif "content" in m:
            _part_texts(m["content"], out)
        elif isinstance(m.get("message"), dict):  # gen_ai.choice body
            return _message_text(m["message"])
    elif isinstance(m, str):
        out.append(m)
    return "\n".join(out)


def _messages(v: Any) -> list[Any]:
    v = _load(v)
    if isinstance(v, list):
        return v
    if isinstance(v, (dict, str)):
        return [v]
    return []


def _prompt_text(v: Any) -> str | None:
    """The last user message's text (or the last message's when no role says ``user``)."""
    msgs = _messages(v)
    if not msgs:
        return None
    for m in reversed(msgs):
        if isinstance(m, dict) and m.get("role") == "user":
            return _message_text(m) or None
    return _message_text(msgs[-1]) or None


def _system_text(v: Any) -> str | None:
    """Text of the ``system``-role messages among input messages (older instrumentations put
    the system prompt there instead of in ``gen_ai.system_instructions``)."""
    texts = [t for t in (_message_text(m) for m in _messages(v)
                         if isinstance(m, dict) and m.get("role") == "system") if t]
    return "\n".join(texts) or None


def _all_text(v: Any) -> str | None:
    texts = [t for t in (_message_text(m) for m in _messages(v)) if t]
    return "\n".join(texts) or None


def _output(v: Any, d: dict[str, Any]) -> None:
    """Response text from output messages; their ``finish_reason`` fills ``finish_reasons``
    when the span has no ``gen_ai.response.finish_reasons``."""
    msgs = _messages(v)
    d["response"] = "\n".join(t for t in (_message_text(m) for m in msgs) if t) or None
    if d.get("finish_reasons") is None:
        reasons = [m["finish_reason"] for m in msgs
                   if isinstance(m, dict) and isinstance(m.get("finish_reason"), str)]
        if reasons:
            d["finish_reasons"] = reasons


def _event_content(ev_attrs: dict[str, Any]) -> Any:
    for k in ("content", "body", "gen_ai.event.content", "message"):
        if k in ev_attrs:
            return ev_attrs[k]
    return None


# --------------------------------------------------------------------------- guardrails, evaluations

_VERDICTS: dict[str, str] = {
    "pass": "pass", "passed": "pass", "allow": "pass", "allowed": "pass", "ok": "pass",
    "none": "pass", "audit": "pass", "safe": "pass",
    "flagged": "flagged", "flag": "flagged", "warn": "flagged", "warning": "flagged",
    "modify": "flagged", "modified": "flagged", "redact": "flagged", "redacted": "flagged",
    "blocked": "blocked", "block": "blocked", "deny": "blocked", "denied": "blocked",
    "reject": "blocked", "rejected": "blocked",
}


def _verdict(v: Any, key: str) -> str:
    if isinstance(v, bool):  # e.g. gen_ai.guardrail.triggered
        return "flagged" if v else "pass"
    if isinstance(v, str) and v.lower() in _VERDICTS:
        return _VERDICTS[v.lower()]
    raise _Reject(f"{key}: unknown guardrail verdict {v!r} (expected pass/flagged/blocked "
                  "or allow/warn/modify/deny/audit)")


def _score(v: Any, key: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _Reject(f"{key}: expected a finite number, got {v!r}")
    return float(v)


_VERDICT_KEYS = ("gen_ai.guardrail.verdict", "gen_ai.guardrail.decision", "gen_ai.guardrail.action",
                 "gen_ai.security.decision.type", "gen_ai.guardrail.triggered", "verdict", "decision")
_GNAME_KEYS = ("gen_ai.guardrail.name", "gen_ai.guardian.name", "gen_ai.security.policy.name",
               "name")
_GSCORE_KEYS = ("gen_ai.guardrail.score", "gen_ai.security.risk.score", "score")


def _first(a: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, Any]:
    for k in keys:
        if k in a:
            return k, a[k]
    return keys[0], None


def _guardrail_from_event(name: str, ea: dict[str, Any]) -> dict[str, Any]:
    vv = ea.get("gen_ai.guardrail.verdict")
    if vv is not None and vv.__class__ is str:  # the common shape, without the search below
        gname = ea.get("gen_ai.guardrail.name")
        sv = ea.get("gen_ai.guardrail.score")
        verdict = _VERDICTS.get(vv) or _VERDICTS.get(vv.lower())
        if (verdict is not None and gname.__class__ is str and gname
                and (sv is None or (sv.__class__ is float and math.isfinite(sv)))):
            return {"name": gname, "verdict": verdict, "score": sv}
    vk, vv = _first(ea, _VERDICT_KEYS)
    if vv is None:
        raise _Reject(f"{name}: event has no verdict ({', '.join(_VERDICT_KEYS[:4])})")
    _, gname = _first(ea, _GNAME_KEYS)
    if not isinstance(gname, str) or not gname:
        suffix = name[len("gen_ai.guardrail."):] if name.startswith("gen_ai.guardrail.") else ""
        gname = suffix or "guardrail"
    sk, sv = _first(ea, _GSCORE_KEYS)
    return {"name": gname, "verdict": _verdict(vv, vk), "score": _score(sv, sk)}


def _guardrail_from_span(span: Span, a: dict[str, Any]) -> dict[str, Any]:
    decision = a.get("gen_ai.security.decision.type")
    if decision is None:
        raise _Reject("gen_ai.security.decision.type: required on apply_guardrail spans")
    name = a.get("gen_ai.guardian.name") or a.get("gen_ai.security.policy.name")
    if not isinstance(name, str) or not name:
        name = span.name.removeprefix("apply_guardrail").strip() or "guardrail"
    g: dict[str, Any] = {"name": name, "verdict": _verdict(decision, "gen_ai.security.decision.type")}
    score: float | None = None
    for ev in span.events:
        if ev.name == "gen_ai.security.finding":
            ea = _attrs(ev.attributes)
            s = _score(ea.get("gen_ai.security.risk.score"), "gen_ai.security.risk.score")
            if s is not None and (score is None or s > score):
                score = s
    if score is not None:
        g["score"] = score
    return g


_POSITIVE = frozenset({"pass", "passed", "correct", "relevant", "good", "positive", "thumbs_up",
                       "thumbsup", "up", "like", "helpful", "yes", "true", "accept", "accepted"})
_NEGATIVE = frozenset({"fail", "failed", "incorrect", "not_relevant", "irrelevant", "bad",
                       "negative", "thumbs_down", "thumbsdown", "down", "dislike", "unhelpful",
                       "not_helpful", "no", "false", "reject", "rejected"})
_NEUTRAL = frozenset({"neutral", "mixed", "partial", "partially_correct", "partially_relevant"})


def _feedback(label: Any, score: float | None) -> int | None:
    """-1/0/1 from an evaluation: the label when it is known, else the score.

    Scores -1, 0 and 1 are taken as they are; other scores in [0, 1] are 1 at 0.5 and
    above and -1 below; scores outside [-1, 1] give their sign.
    """
    if isinstance(label, str):
        lab = label.strip().lower().replace(" ", "_").replace("-", "_")
        if lab in _POSITIVE:
            return 1
        if lab in _NEGATIVE:
            return -1
        if lab in _NEUTRAL:
            return 0
    if score is None:
        return None
    if score in (-1.0, 0.0, 1.0):
        return int(score)
    if 0.0 < score < 1.0:
        return 1 if score >= 0.5 else -1
    return 1 if score > 0 else -1


# --------------------------------------------------------------------------- spans -> events

_DETECT = ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.system", "gen_ai.request.model")
_DETECT_SET = frozenset(_DETECT)
_NON_MODEL_OPS = frozenset({"execute_tool", "create_agent", "invoke_agent", "invoke_workflow",
                            "retrieval", "apply_guardrail", "create_memory", "search_memory"})
#: agent spans: events of their own, their usage left in extra, their agent inherited below them
_AGENT_OPS = frozenset({"invoke_agent", "create_agent", "invoke_workflow"})
#: how many parents up an event looks for its agent span (bounds a cycle of bad parent ids)
_MAX_AGENT_HOPS = 64
_PROMPT_VERSION_KEYS = ("driftline.prompt_version", "gen_ai.prompt.version", "prompt_version")
_ERROR = Status.STATUS_CODE_ERROR


def is_genai_span(attr_keys: Any) -> bool:
    """True when a span's attribute keys mark it as a GenAI span."""
    return ("gen_ai.operation.name" in attr_keys or "gen_ai.provider.name" in attr_keys
            or "gen_ai.system" in attr_keys or "gen_ai.request.model" in attr_keys)


def _event_id(trace_id: bytes, span_id: bytes) -> str:
    h = hashlib.blake2b(trace_id + span_id, digest_size=16).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _resource_info(kvs: Any) -> tuple[str, str | None, dict[str, Any]]:
    ra = _attrs(kvs)
    app = ra.pop("service.name", None)
    env_new = ra.pop("deployment.environment.name", None)
    env_old = ra.pop("deployment.environment", None)
    env = env_new if env_new is not None else env_old
    return (
        app if isinstance(app, str) and app else "unknown_service",
        env if isinstance(env, str) and env else None,
        ra,
    )


def _map_span(span: Span, a: dict[str, Any], app: str, env: str | None,
              resource: dict[str, Any], scope: str) -> dict[str, Any]:
    """One GenAI model-call span -> an LLMEvent dict (``a`` is consumed). Raises _Reject.

    Each step pops the attributes it maps from ``a``; what is left goes to ``extra``.
    """
    d, latency_ms = _span_timing(span, app, env)
    _model_fields(a, d)
    _agent_fields(a, d)
    if d.get("operation") in _AGENT_OPS:  # not a model call: model and usage stay in extra (module doc)
        for key, attr in (("request_model", "gen_ai.request.model"), ("response_model", "gen_ai.response.model")):
            v = d.pop(key, None)
            if v is not None:
                a[attr] = v
    else:
        _usage_fields(a, d, latency_ms)
    _outcome_fields(span, a, d)
    system = _span_content(a, d)
    guardrails: list[dict[str, Any]] = []
    evaluations: list[dict[str, Any]] = []
    if span.events:
        system = _apply_events(span, d, guardrails, evaluations, system)
    if guardrails:
        d["guardrails"] = guardrails
    if evaluations:
        fbs = [e.pop("_feedback") for e in evaluations]
        known = [f for f in fbs if f is not None]
        if known:
            d["feedback"] = min(known)
    d["extra"] = _span_extra(span, a, system, evaluations, scope, resource)
    return d


def _span_timing(span: Span, app: str, env: str | None) -> tuple[dict[str, Any], float]:
    """The event's app, environment, time, latency and ids; the latency in ms comes back too."""
    start, end = span.start_time_unix_nano, span.end_time_unix_nano
    if start <= 0:
        raise _Reject("start_time_unix_nano: missing")
    if end < start:
        raise _Reject(f"end_time_unix_nano: before the start ({end} < {start})")
    latency_ms = (end - start) / 1e6
    d: dict[str, Any] = {
        "app": app,
        "timestamp": start // 1_000_000,
        "latency_ms": latency_ms,
        "event_id": _event_id(span.trace_id, span.span_id),
        "trace_id": span.trace_id.hex() or None,
        "span_id": span.span_id.hex() or None,
    }
    if env is not None:
        d["environment"] = env
    return d, latency_ms


def _model_fields(a: dict[str, Any], d: dict[str, Any]) -> None:
    """Operation, provider, models (one of them required), conversation, user, prompt version."""
    op = _string(a, "gen_ai.operation.name")
    if op is not None:
        d["operation"] = op
    d["provider"] = _string(a, "gen_ai.provider.name", "gen_ai.system")
    d["request_model"] = _string(a, "gen_ai.request.model")
    d["response_model"] = _string(a, "gen_ai.response.model")
    if (d["request_model"] is None and d["response_model"] is None
            and op not in MODEL_OPTIONAL_OPERATIONS):
        raise _Reject("gen_ai.request.model: missing (and no gen_ai.response.model)")
    d["conversation_id"] = _string(a, "gen_ai.conversation.id")
    d["user_id"] = _string(a, "user.id", "enduser.id")
    for k in _PROMPT_VERSION_KEYS:
        if k in a:
            d["prompt_version"] = _string(a, k)
            break


def _agent_fields(a: dict[str, Any], d: dict[str, Any]) -> None:
    """The agent and tool of the span (``gen_ai.agent.name``, ``gen_ai.agent.id``, ``gen_ai.tool.name``)."""
    d["agent_name"] = _string(a, "gen_ai.agent.name")
    d["agent_id"] = _string(a, "gen_ai.agent.id")
    d["tool_name"] = _string(a, "gen_ai.tool.name")


def _usage_fields(a: dict[str, Any], d: dict[str, Any], latency_ms: float) -> None:
    """Token counts, time to first token, and the time per output token derived from them."""
    d["input_tokens"] = _tokens(a, "gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens")
    out_tok = _tokens(a, "gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens")
    d["output_tokens"] = out_tok
    d["cache_read_input_tokens"] = _tokens(a, "gen_ai.usage.cache_read.input_tokens")
    d["cache_creation_input_tokens"] = _tokens(a, "gen_ai.usage.cache_creation.input_tokens")
    d["reasoning_output_tokens"] = _tokens(a, "gen_ai.usage.reasoning.output_tokens")
    ttft = _seconds_ms(a, "gen_ai.response.time_to_first_chunk")
    if ttft is not None:
        d["ttft_ms"] = ttft
        if out_tok is not None and out_tok > 1 and latency_ms >= ttft:
            d["tpot_ms"] = (latency_ms - ttft) / (out_tok - 1)


def _outcome_fields(span: Span, a: dict[str, Any], d: dict[str, Any]) -> None:
    """Finish reasons, the error type, and the status (an error span or an error.type)."""
    fr = a.pop("gen_ai.response.finish_reasons", None)
    if fr is not None:
        if isinstance(fr, str):
            fr = [fr]
        if not isinstance(fr, list) or not all(isinstance(x, str) for x in fr):
            raise _Reject(f"gen_ai.response.finish_reasons: expected a string array, got {fr!r}")
        d["finish_reasons"] = fr
    err = _string(a, "error.type")
    if err is not None:
        d["error_type"] = err
    if span.status.code == _ERROR or err is not None:
        d["status"] = "error"


def _span_content(a: dict[str, Any], d: dict[str, Any]) -> str | None:
    """Prompt and response on the span (gen_ai.input.messages, ...), then the older
    gen_ai.prompt.N.* form; returns the system instructions found."""
    system: str | None = None
    inp = None
    if "gen_ai.input.messages" in a:
        inp = _load(a.pop("gen_ai.input.messages"))
        d["prompt"] = _prompt_text(inp)
    if "gen_ai.output.messages" in a:
        _output(a.pop("gen_ai.output.messages"), d)
    if "gen_ai.system_instructions" in a:
        system = _all_text(a.pop("gen_ai.system_instructions"))
    elif inp is not None:
        system = _system_text(inp)
    if d.get("prompt") is None and "gen_ai.prompt.0.content" in a:
        d["prompt"], system2 = _indexed_content(a, "gen_ai.prompt.")
        system = system or system2
    if d.get("response") is None and "gen_ai.completion.0.content" in a:
        d["response"], _ = _indexed_content(a, "gen_ai.completion.")
    return system


def _span_extra(span: Span, a: dict[str, Any], system: str | None,
                evaluations: list[dict[str, Any]], scope: str,
                resource: dict[str, Any]) -> dict[str, Any]:
    """``extra``: the attributes no field took, then the system prompt, evaluations, span,
    scope and resource (in this order)."""
    extra: dict[str, Any] = a
    if system is not None:
        extra["gen_ai.system_instructions"] = system
    if evaluations:
        extra["gen_ai.evaluation.results"] = evaluations
    extra["otel.span.name"] = span.name
    if scope:
        extra["otel.scope.name"] = scope
    if resource:
        extra["otel.resource"] = resource
    return extra


def _indexed_content(a: dict[str, Any], prefix: str) -> tuple[str | None, str | None]:
    """OpenLLMetry-style ``gen_ai.prompt.{i}.role`` / ``.content`` attributes."""
    msgs: list[tuple[str | None, str]] = []
    i = 0
    while f"{prefix}{i}.content" in a:
        c = a.pop(f"{prefix}{i}.content")
        r = a.pop(f"{prefix}{i}.role", None)
        if isinstance(c, str):
            msgs.append((r if isinstance(r, str) else None, c))
        i += 1
    system = "\n".join(c for r, c in msgs if r == "system") or None
    users = [c for r, c in msgs if r == "user"]
    if users:
        return users[-1], system
    rest = [c for r, c in msgs if r != "system"]
    return ("\n".join(rest) or None), system


def _apply_events(span: Span, d: dict[str, Any], guardrails: list[dict[str, Any]],
                  evaluations: list[dict[str, Any]], system: str | None) -> str | None:
    """Content, guardrails and evaluations from the span's ``gen_ai.*`` events.

    Content already on the span wins; returns the system instructions.
    """
    last_user: str | None = None
    choices: list[str] = []
    choice_reasons: list[str] = []
    for ev in span.events:
        name = ev.name
        if not name.startswith("gen_ai."):
            continue
        ea = _attrs(ev.attributes)
        if name == "gen_ai.client.inference.operation.details":
            system = _details_event(ea, d, system)
        elif name in ("gen_ai.content.prompt", "gen_ai.content.completion"):
            _content_event(name, ea, d)
        elif name == "gen_ai.user.message":
            last_user = _message_text(_load(_event_content(ea))) or last_user
        elif name == "gen_ai.system.message":
            if system is None:
                system = _message_text(_load(_event_content(ea))) or None
        elif name == "gen_ai.choice":
            _choice_event(ea, choices, choice_reasons)
        elif name.startswith("gen_ai.guardrail"):
            guardrails.append(_guardrail_from_event(name, ea))
        elif name == "gen_ai.security.finding":
            guardrails.append(_security_finding(ea))
        elif name == "gen_ai.evaluation.result":
            evaluations.append(_evaluation(ea))
    if d.get("prompt") is None and last_user is not None:
        d["prompt"] = last_user
    if d.get("response") is None and choices:
        d["response"] = "\n".join(choices)
    if d.get("finish_reasons") is None and choice_reasons:
        d["finish_reasons"] = choice_reasons
    return system


def _details_event(ea: dict[str, Any], d: dict[str, Any], system: str | None) -> str | None:
    """A ``gen_ai.client.inference.operation.details`` event fills what is still missing."""
    if d.get("prompt") is None and "gen_ai.input.messages" in ea:
        d["prompt"] = _prompt_text(ea["gen_ai.input.messages"])
    if d.get("response") is None and "gen_ai.output.messages" in ea:
        _output(ea["gen_ai.output.messages"], d)
    if system is None and "gen_ai.system_instructions" in ea:
        system = _all_text(ea["gen_ai.system_instructions"])
    if system is None and "gen_ai.input.messages" in ea:
        system = _system_text(ea["gen_ai.input.messages"])
    return system


def _content_event(name: str, ea: dict[str, Any], d: dict[str, Any]) -> None:
    """The older ``gen_ai.content.prompt`` / ``.completion`` events fill a missing prompt / response."""
    if name == "gen_ai.content.prompt":
        if d.get("prompt") is None and "gen_ai.prompt" in ea:
            d["prompt"] = _prompt_text(ea["gen_ai.prompt"])
    elif d.get("response") is None and "gen_ai.completion" in ea:
        d["response"] = _all_text(ea["gen_ai.completion"])


def _choice_event(ea: dict[str, Any], choices: list[str], choice_reasons: list[str]) -> None:
    """A ``gen_ai.choice`` event: its text and finish reason (on the event or in its body)."""
    body = _load(_event_content(ea))
    t = _message_text(body)
    if t:
        choices.append(t)
    fr = ea.get("finish_reason")
    if fr is None and isinstance(body, dict):
        fr = body.get("finish_reason")
    if isinstance(fr, str):
        choice_reasons.append(fr)


def _security_finding(ea: dict[str, Any]) -> dict[str, Any]:
    """A ``gen_ai.security.finding`` event as a flagged guardrail named after its category."""
    cat = ea.get("gen_ai.security.risk.category")
    g: dict[str, Any] = {"name": cat if isinstance(cat, str) and cat else "security_finding",
                         "verdict": "flagged"}
    s = _score(ea.get("gen_ai.security.risk.score"), "gen_ai.security.risk.score")
    if s is not None:
        g["score"] = s
    return g


def _evaluation(ea: dict[str, Any]) -> dict[str, Any]:
    name = ea.get("gen_ai.evaluation.name")
    if not isinstance(name, str) or not name:
        raise _Reject("gen_ai.evaluation.name: required on gen_ai.evaluation.result events")
    score = _score(ea.get("gen_ai.evaluation.score.value"), "gen_ai.evaluation.score.value")
    label = ea.get("gen_ai.evaluation.score.label")
    r: dict[str, Any] = {"name": name}
    if score is not None:
        r["score"] = score
    if isinstance(label, str):
        r["label"] = label
    expl = ea.get("gen_ai.evaluation.explanation")
    if isinstance(expl, str):
        r["explanation"] = expl
    r["_feedback"] = _feedback(label, score)
    return r


def _reject(batch: OtlpBatch, span: Span, reason: str) -> None:
    batch.rejected.append(RejectedSpan(reason, span.name, span.trace_id.hex(), span.span_id.hex()))


def _build_event(d: dict[str, Any]) -> LLMEvent:
    """The LLMEvent of a mapped span, built without a second validation pass.

    Every value was checked while mapping (strings are str, token counts ints >= 0,
    durations finite and >= 0, verdicts and feedback from closed sets, a model and a
    non-empty app present), which is what ``event_from_dict`` would check again; the
    unit tests assert that ``event_from_dict`` gives the same event.
    """
    gs = d.get("guardrails")
    if gs:
        d["guardrails"] = [Guardrail(g["name"], g["verdict"], g.get("score")) for g in gs]
    # keys left None are fields whose default is None (operation/status are set or absent)
    return LLMEvent(**d)


def _agent_above(parent: bytes, parents: dict[bytes, bytes],
                 agents: dict[bytes, tuple[str | None, str | None]]) -> tuple[str | None, str | None] | None:
    """(name, id) of the nearest agent span among the ancestors of a span (``parent`` first)
    in the same request, None when there is none (or the chain leaves the request)."""
    for _ in range(_MAX_AGENT_HOPS):
        if not parent:
            return None
        found = agents.get(parent)
        if found is not None and (found[0] is not None or found[1] is not None):
            return found
        parent = parents.get(parent, b"")
    return None


def _inherit_agents(batch: OtlpBatch, pending: list[tuple[Span, dict[str, Any]]], parents: dict[bytes, bytes],
                    agents: dict[bytes, tuple[str | None, str | None]]) -> None:
    """Events without an agent of their own take that of their nearest agent span above them."""
    for span, d in pending:
        if d.get("agent_name") is None and d.get("agent_id") is None:
            found = _agent_above(span.parent_span_id, parents, agents)
            if found is not None:
                d["agent_name"], d["agent_id"] = found
                batch.inherited_agents += 1


def map_request(req: ExportTraceServiceRequest) -> OtlpBatch:
    """Map the GenAI spans of a decoded request to LLMEvents (see the module docstring)."""
    batch = OtlpBatch()
    pending: list[tuple[Span, dict[str, Any]]] = []
    guards: dict[bytes, list[dict[str, Any]]] = {}
    parents: dict[bytes, bytes] = {}  # span id -> parent span id, every span of the request
    agents: dict[bytes, tuple[str | None, str | None]] = {}  # agent span id -> (name, id)
    for rs in req.resource_spans:
        app, env, resource = _resource_info(rs.resource.attributes)
        for ss in rs.scope_spans:
            scope = ss.scope.name
            for span in ss.spans:
                if span.parent_span_id:
                    parents[span.span_id] = span.parent_span_id
                kvs = span.attributes
                for kv in kvs:  # keys first: other spans are skipped without reading values
                    if kv.key in _DETECT_SET:
                        break
                else:
                    batch.skipped_non_genai += 1
                    continue
                a = _attrs(kvs)
                op = a.get("gen_ai.operation.name")
                try:
                    if op == "apply_guardrail":
                        guards.setdefault(span.parent_span_id, []).append(
                            _guardrail_from_span(span, a))
                        continue
                    if (op in _NON_MODEL_OPS and op not in MODEL_OPTIONAL_OPERATIONS
                            and "gen_ai.request.model" not in a and "gen_ai.response.model" not in a):
                        batch.skipped_non_model += 1
                        continue
                    d = _map_span(span, a, app, env, dict(resource) if resource else resource,
                                  scope)
                except _Reject as exc:
                    _reject(batch, span, str(exc))
                    continue
                except RecursionError:
                    _reject(batch, span, "nested too deep")
                    continue
                except Exception as exc:  # noqa: BLE001 - one span never stops the request
                    _reject(batch, span, f"{type(exc).__name__}: {exc}")
                    continue
                pending.append((span, d))
                if d.get("operation") in _AGENT_OPS:
                    agents[span.span_id] = (d.get("agent_name"), d.get("agent_id"))
    if agents:
        _inherit_agents(batch, pending, parents, agents)
    _build_events(batch, pending, guards)
    return batch


def _build_events(batch: OtlpBatch, pending: list[tuple[Span, dict[str, Any]]],
                  guards: dict[bytes, list[dict[str, Any]]]) -> None:
    """The events of the mapped spans, their guardrail child spans attached; into ``batch``."""
    for span, d in pending:
        g = guards.pop(span.span_id, None) if guards else None
        if g:
            d["guardrails"] = (d.get("guardrails") or []) + g
            batch.attached_guardrails += len(g)
        try:
            ev = _build_event(d)
            check_limits(ev)
            batch.events.append(ev)
        except (EventError, TypeError, ValueError) as exc:
            _reject(batch, span, str(exc))
    for g in guards.values():
        batch.detached_guardrails += len(g)


# --------------------------------------------------------------------------- OTLP/JSON


def _to_otlp_json(req: ExportTraceServiceRequest) -> bytes:
    """OTLP/JSON of a request as the spec writes it (lowerCamelCase, hex ids, int64 as
    strings, enums as integers); used by the benchmark and tests."""
    doc = json_format.MessageToDict(req, use_integers_for_enums=True)
    for rs in doc.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for sp in ss.get("spans", []):
                for k in ("traceId", "spanId", "parentSpanId"):
                    if k in sp:
                        sp[k] = base64.b64decode(sp[k]).hex()
    return msgspec.json.encode(doc)

