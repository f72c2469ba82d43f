"""LLMEvent v1: the wire contract on the ``llm.events`` topic.

One JSON object per Kafka record. Keys follow OpenTelemetry ``gen_ai.*``
attributes flattened to snake_case. Required: ``app``, ``request_model`` (or
``response_model``; neither for the agent and tool operations of
:data:`MODEL_OPTIONAL_OPERATIONS`), ``timestamp``, ``latency_ms``. Unknown keys are kept in
:attr:`LLMEvent.extra`, never dropped.

Decoding has a fast path and an exact one. The fast path decodes the bytes
straight into the typed :class:`LLMEvent` (msgspec validates while it parses,
about 3 µs for a 1.4 KB event); it applies when the record carries an
``event_id`` and only known keys. Anything else (unknown keys to keep in
``extra``, a missing ``event_id`` to derive from the content, nulls, any error)
takes the exact path: bytes -> dict, then a strict conversion of the known keys.
Both paths give the same event for the same record, and every failure raises
:class:`EventError` from the exact path, whose message names the key and the
problem.

>>> ev = decode_event(b'{"app":"chat","request_model":"gpt-4o","timestamp":0,"latency_ms":12.5,"team":"a"}')
>>> ev.model, ev.timestamp_ms, ev.extra
('gpt-4o', 0, {'team': 'a'})
"""

from __future__ import annotations

import hashlib
import math
import sys
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

__all__ = [
    "SCHEMA_VERSION",
    "EventError",
    "Guardrail",
    "LLMEvent",
    "KNOWN_KEYS",
    "MAX_ID_CHARS",
    "MAX_LABEL_CHARS",
    "MAX_NESTING",
    "MAX_TOKENS",
    "MODEL_OPTIONAL_OPERATIONS",
    "NESTED_TOO_DEEP",
    "check_limits",
    "decode_event",
    "event_from_dict",
    "event_to_dict",
    "encode_event",
    "json_schema",
    "nesting_exceeds",
    "parse_timestamp_ms",
    "timestamp_text",
]

SCHEMA_VERSION = 1

#: Input limits (README "Input limits"). A record over any of them is rejected with a
#: reason naming the key, never stored: they keep one record from becoming an
#: unbounded metric label, a column overflow or a crash.
#: Token counts: no LLM call comes near 10^12 tokens, and 9.2 million such calls still
#: sum to less than 2^63, so window sums cannot wrap in int64/UInt64 (a count near 2^63
#: would wrap them to INT64_MIN, and one >= 2^64 fits no int64 column).
MAX_TOKENS = 10**12
#: Label fields (app, environment, provider, operation, request/response model,
#: prompt_version, error_type, finish_reasons items, guardrail names): these become
#: window keys, metric labels and ClickHouse LowCardinality values.
MAX_LABEL_CHARS = 256
#: Identifier fields (event_id, conversation_id, user_id, trace_id, span_id).
MAX_ID_CHARS = 128
#: JSON nesting (arrays and objects, at any key, ``extra`` included): deeper input makes
#: the decoders recurse until RecursionError.
MAX_NESTING = 64
#: the reason given for a record nested deeper than :data:`MAX_NESTING`
NESTED_TOO_DEEP = f"nested too deep: more than {MAX_NESTING} levels of arrays/objects"

#: Operations of agent and tool spans (OpenTelemetry GenAI agent conventions): no model call,
#: so an event with one of them needs no ``request_model``/``response_model`` (its grouping
#: model is ``""``). Every other operation is a model call and needs a model.
MODEL_OPTIONAL_OPERATIONS: frozenset[str] = frozenset({"execute_tool", "invoke_agent", "create_agent",
                                                       "invoke_workflow"})

NonNegInt = Annotated[int, Meta(ge=0, le=MAX_TOKENS)]
NonNegFloat = Annotated[float, Meta(ge=0, le=sys.float_info.max)]  # finite
Finite = Annotated[float, Meta(ge=-sys.float_info.max, le=sys.float_info.max)]
Label = Annotated[str, Meta(max_length=MAX_LABEL_CHARS)]
Ident = Annotated[str, Meta(max_length=MAX_ID_CHARS)]


class EventError(ValueError):
    """An event failed to decode or validate. ``key`` names the offending key (or ``None``)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class Guardrail(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """One guardrail result on a call (``gen_ai.guardrail.*``)."""

    name: Label
    verdict: Literal["pass", "flagged", "blocked"]
    score: Finite | None = None


class LLMEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """One LLM call, as emitted by an app (schema v1).

    ``timestamp`` accepts an RFC 3339 string or epoch milliseconds on the wire;
    after decoding, :attr:`timestamp_ms` holds epoch milliseconds (UTC).
    """

    app: Label
    timestamp: str | int | float
    latency_ms: NonNegFloat
    request_model: Label | None = None
    response_model: Label | None = None
    event_id: Ident | None = None
    environment: Label | None = None
    provider: Label | None = None
    operation: Label = "chat"
    prompt_version: Label | None = None
    conversation_id: Ident | None = None
    user_id: Ident | None = None
    trace_id: Ident | None = None
    span_id: Ident | None = None
    agent_name: Label | None = None
    agent_id: Ident | None = None
    tool_name: Label | None = None
    input_tokens: NonNegInt | None = None
    output_tokens: NonNegInt | None = None
    cache_read_input_tokens: NonNegInt | None = None
    cache_creation_input_tokens: NonNegInt | None = None
    reasoning_output_tokens: NonNegInt | None = None
    ttft_ms: NonNegFloat | None = None
    tpot_ms: NonNegFloat | None = None
    status: Literal["ok", "error"] = "ok"
    error_type: Label | None = None
    finish_reasons: list[Label] | None = None
    guardrails: list[Guardrail] | None = None
    feedback: Literal[-1, 0, 1] | None = None
    prompt: str | None = None
    response: str | None = None
    extra: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def model(self) -> str:
        """The grouping model: ``response_model`` when present, else ``request_model``."""
        return self.response_model or self.request_model or ""

    @property
    def timestamp_ms(self) -> int:
        """Event time (request start) in epoch milliseconds, UTC."""
        return parse_timestamp_ms(self.timestamp)


KNOWN_KEYS: frozenset[str] = frozenset(f for f in LLMEvent.__struct_fields__ if f != "extra")

_MIN_TS_MS = 0
_MAX_TS_MS = 253402300799999  # 9999-12-31T23:59:59.999Z


def _short(value: object, n: int = 64) -> str:
    """``repr(value)``, cut to about ``n`` characters (a reason must stay readable)."""
    r = repr(value)
    return r if len(r) <= n else f"{r[:n]}...({len(r)} chars)"


def parse_timestamp_ms(value: str | int | float) -> int:
    """Epoch milliseconds from an RFC 3339 string or an epoch-milliseconds number."""
    if isinstance(value, bool):
        raise EventError("timestamp: expected RFC 3339 string or epoch milliseconds, got bool", "timestamp")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise EventError("timestamp: not a finite number", "timestamp")
        ms = int(value)
    else:
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise EventError(f"timestamp: {_short(value)} is not an RFC 3339 date-time",
                             "timestamp") from None
        if dt.tzinfo is None:
            raise EventError(f"timestamp: {_short(value)} has no UTC offset (RFC 3339 requires one)",
                             "timestamp")
        try:
            ms = round(dt.timestamp() * 1000)
        except (OverflowError, ValueError):
            raise EventError(f"timestamp: {_short(value)} is out of range", "timestamp") from None
    if not _MIN_TS_MS <= ms <= _MAX_TS_MS:
        raise EventError(f"timestamp: {_short(value)} is out of range", "timestamp")
    return ms


def timestamp_text(ms: int) -> str:
    """Epoch milliseconds as RFC 3339 UTC with milliseconds (``1970-01-01T00:00:00.000Z``)."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def nesting_exceeds(obj: Any, limit: int = MAX_NESTING) -> bool:
    """True when ``obj`` nests lists/dicts more than ``limit`` levels deep (the outer
    container is level 1). Iterative: never recurses, whatever the depth."""
    if not isinstance(obj, (dict, list)):
        return False
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > limit:
            return True
        for v in o.values() if isinstance(o, dict) else o:
            if isinstance(v, (dict, list)):
                stack.append((v, d + 1))
    return False


_LABEL_FIELDS = ("app", "environment", "provider", "operation", "request_model", "response_model",
                 "prompt_version", "error_type", "agent_name", "tool_name")
_ID_FIELDS = ("event_id", "conversation_id", "user_id", "trace_id", "span_id", "agent_id")
_TOKEN_KEYS = ("input_tokens", "output_tokens", "cache_read_input_tokens",
               "cache_creation_input_tokens", "reasoning_output_tokens")
_FLOAT_KEYS = ("latency_ms", "ttft_ms", "tpot_ms")


def check_limits(ev: LLMEvent) -> None:
    """Check the input limits on an event built without msgspec's validation (the OTLP
    mapping builds them directly): label and id lengths, token counts, finite durations
    and scores, nesting of ``extra``. Raises :class:`EventError` naming the key.

    The JSON paths get the same checks from the struct's annotations while decoding.
    """
    for f in _LABEL_FIELDS:
        v = getattr(ev, f)
        if v is not None and len(v) > MAX_LABEL_CHARS:
            raise EventError(f"{f}: longer than {MAX_LABEL_CHARS} characters ({len(v)})", f)
    for f in _ID_FIELDS:
        v = getattr(ev, f)
        if v is not None and len(v) > MAX_ID_CHARS:
            raise EventError(f"{f}: longer than {MAX_ID_CHARS} characters ({len(v)})", f)
    for f in _TOKEN_KEYS:
        v = getattr(ev, f)
        if v is not None and not 0 <= v <= MAX_TOKENS:
            raise EventError(f"{f}: out of range: {_short(v)} (0 to {MAX_TOKENS})", f)
    for f in _FLOAT_KEYS:
        v = getattr(ev, f)
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise EventError(f"{f}: must be a finite number >= 0, got {v!r}", f)
    for r in ev.finish_reasons or ():
        if len(r) > MAX_LABEL_CHARS:
            raise EventError(f"finish_reasons: an item is longer than {MAX_LABEL_CHARS} "
                             f"characters ({len(r)})", "finish_reasons")
    for g in ev.guardrails or ():
        if len(g.name) > MAX_LABEL_CHARS:
            raise EventError(f"guardrails: a name is longer than {MAX_LABEL_CHARS} "
                             f"characters ({len(g.name)})", "guardrails")
        if g.score is not None and not math.isfinite(g.score):
            raise EventError(f"guardrails: score {g.score!r} is not finite", "guardrails")
    if ev.extra and nesting_exceeds(ev.extra):
        raise EventError(NESTED_TOO_DEEP)


_canonical = msgspec.json.Encoder(order="sorted")


def _content_event_id(d: dict[str, Any]) -> str:
    """A UUID-shaped id from the event's content (canonical JSON, keys sorted, ``event_id``
    left out), so that re-sends of the same event dedup. blake2b-128, formatted by hand:
    ``uuid.UUID`` costs several microseconds per event on the hot path."""
    body = {k: v for k, v in d.items() if k != "event_id"}
    h = hashlib.blake2b(_canonical.encode(body), digest_size=16).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_MSG_PATH = "`$."


def _key_of(msg: str) -> str | None:
    i = msg.find(_MSG_PATH)
    if i < 0:
        return None
    j = msg.find("`", i + 3)
    path = msg[i + 3 : j]
    return path.split("[", 1)[0].split(".", 1)[0] or None


def event_from_dict(d: Any) -> LLMEvent:
    """Validate one decoded JSON value into an :class:`LLMEvent`.

    Raises :class:`EventError` naming the key and the problem.
    """
    if not isinstance(d, dict):
        raise EventError(f"event must be a JSON object, got {type(d).__name__}")
    if nesting_exceeds(d):
        raise EventError(NESTED_TOO_DEEP)
    known: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for k, v in d.items():
        if k in KNOWN_KEYS:
            if v is not None:
                known[k] = v
        elif k == "extra" and isinstance(v, dict):
            extra.update(v)
        else:
            extra[k] = v
    for req in ("app", "timestamp", "latency_ms"):
        if req not in known:
            raise EventError(f"{req}: required key is missing", req)
    if ("request_model" not in known and "response_model" not in known
            and known.get("operation") not in MODEL_OPTIONAL_OPERATIONS):
        raise EventError("request_model: required key is missing (or give response_model; only "
                         "agent and tool operations go without)", "request_model")
    if not known.get("app"):
        raise EventError("app: must be a non-empty string", "app")
    if "event_id" not in known:
        known["event_id"] = _content_event_id(d)
    if extra:
        known["extra"] = extra
    try:
        ev = msgspec.convert(known, LLMEvent)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        key = _key_of(msg)
        raise EventError(f"{key}: {msg}" if key else msg, key) from None
    parse_timestamp_ms(ev.timestamp)  # validates the form; raises EventError
    return ev


_decoder = msgspec.json.Decoder()
_typed_decoder = msgspec.json.Decoder(LLMEvent)


def decode_event(data: bytes | str) -> LLMEvent:
    """Decode and validate one JSON record. Raises :class:`EventError` (and nothing else
    for any input: JSON nested deeper than :data:`MAX_NESTING` is :data:`NESTED_TOO_DEEP`,
    whether or not the decoder's own recursion limit tripped first)."""
    try:
        ev = _typed_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError):  # unknown key, null, bad value, not JSON,
        ev = None                                       # bad UTF-8: the exact path says which
    except RecursionError:
        raise EventError(NESTED_TOO_DEEP) from None
    if (ev is not None and ev.event_id is not None and ev.app and not ev.extra
            and (ev.request_model is not None or ev.response_model is not None
                 or ev.operation in MODEL_OPTIONAL_OPERATIONS)):
        ts = ev.timestamp
        if type(ts) is int:
            if not _MIN_TS_MS <= ts <= _MAX_TS_MS:
                raise EventError(f"timestamp: {ts!r} is out of range", "timestamp")
        else:
            parse_timestamp_ms(ts)
        return ev
    try:
        obj = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise EventError(f"not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:  # msgspec raises it for a string that is not UTF-8
        raise EventError(f"not valid UTF-8: {exc}") from None
    except RecursionError:
        raise EventError(NESTED_TOO_DEEP) from None
    return event_from_dict(obj)


def event_to_dict(ev: LLMEvent) -> dict[str, Any]:
    """The event as a JSON-ready dict; unknown keys are put back at top level."""
    d: dict[str, Any] = msgspec.to_builtins(ev)
    extra = d.pop("extra", None) or {}
    for k, v in extra.items():
        d.setdefault(k, v)
    return d


_encoder = msgspec.json.Encoder()


def encode_event(ev: LLMEvent | dict[str, Any]) -> bytes:
    """Encode an event (struct or dict) as the JSON wire format."""
    return _encoder.encode(event_to_dict(ev) if isinstance(ev, LLMEvent) else ev)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of LLMEvent v1, generated from the struct.

    ``extra`` is not a wire key: unknown keys stand at top level and are
    allowed (``additionalProperties``), and ``request_model`` or
    ``response_model`` must be present (``anyOf``), unless ``operation`` is an agent or
    tool operation (:data:`MODEL_OPTIONAL_OPERATIONS`).
    """
    schema: dict[str, Any] = msgspec.json.schema(LLMEvent)
    defs = schema.get("$defs", {})
    body = defs["LLMEvent"]
    body["properties"].pop("extra", None)
    body["additionalProperties"] = True
    body["anyOf"] = [{"required": ["request_model"]}, {"required": ["response_model"]},
                     {"required": ["operation"],
                      "properties": {"operation": {"enum": sorted(MODEL_OPTIONAL_OPERATIONS)}}}]
    body["title"] = "LLMEvent"
    body["description"] = f"driftline LLMEvent JSON v{SCHEMA_VERSION}: one LLM call."
    out: dict[str, Any] = {"$schema": "https://json-schema.org/draft/2020-12/schema"}
    out.update(body)
    out["$defs"] = {k: v for k, v in defs.items() if k != "LLMEvent"}
    return out
