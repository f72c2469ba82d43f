"""LLMEvent v1: the wire contract on the ``llm.events`` topic.

One JSON object per Kafka record. Keys follow OpenTelemetry ``gen_ai.*``
attributes flattened to snake_case. Required: ``app``, ``request_model`` (or
``response_model``), ``timestamp``, ``latency_ms``. Unknown keys are kept in
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
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

__all__ = [
    "SCHEMA_VERSION",
    "EventError",
    "Guardrail",
    "LLMEvent",
    "KNOWN_KEYS",
    "decode_event",
    "event_from_dict",
    "event_to_dict",
    "encode_event",
    "json_schema",
    "parse_timestamp_ms",
]

SCHEMA_VERSION = 1

NonNegInt = Annotated[int, Meta(ge=0)]
NonNegFloat = Annotated[float, Meta(ge=0)]


class EventError(ValueError):
    """An event failed to decode or validate. ``key`` names the offending key (or ``None``)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class Guardrail(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """One guardrail result on a call (``gen_ai.guardrail.*``)."""

    name: str
    verdict: Literal["pass", "flagged", "blocked"]
    score: float | None = None


class LLMEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """One LLM call, as emitted by an app (schema v1).

    ``timestamp`` accepts an RFC 3339 string or epoch milliseconds on the wire;
    after decoding, :attr:`timestamp_ms` holds epoch milliseconds (UTC).
    """

    app: str
    timestamp: str | int | float
    latency_ms: NonNegFloat
    request_model: str | None = None
    response_model: str | None = None
    event_id: str | None = None
    environment: str | None = None
    provider: str | None = None
    operation: str = "chat"
    prompt_version: str | None = None
    conversation_id: str | None = None
    user_id: str | None = None
    trace_id: str | None = None
    span_id: str | None = None
    input_tokens: NonNegInt | None = None
    output_tokens: NonNegInt | None = None
    cache_read_input_tokens: NonNegInt | None = None
    cache_creation_input_tokens: NonNegInt | None = None
    reasoning_output_tokens: NonNegInt | None = None
    ttft_ms: NonNegFloat | None = None
    tpot_ms: NonNegFloat | None = None
    status: Literal["ok", "error"] = "ok"
    error_type: str | None = None
    finish_reasons: list[str] | None = None
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
            raise EventError(f"timestamp: {value!r} is not an RFC 3339 date-time", "timestamp") from None
        if dt.tzinfo is None:
            raise EventError(f"timestamp: {value!r} has no UTC offset (RFC 3339 requires one)", "timestamp")
        ms = round(dt.timestamp() * 1000)
    if not _MIN_TS_MS <= ms <= _MAX_TS_MS:
        raise EventError(f"timestamp: {value!r} is out of range", "timestamp")
    return ms


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
    if "request_model" not in known and "response_model" not in known:
        raise EventError("request_model: required key is missing (or give response_model)", "request_model")
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
    """Decode and validate one JSON record. Raises :class:`EventError`."""
    try:
        ev = _typed_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError):  # unknown key, null, bad value, not JSON,
        ev = None                                       # bad UTF-8: the exact path says which
    if (ev is not None and ev.event_id is not None and ev.app
            and (ev.request_model is not None or ev.response_model is not None)):
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
    ``response_model`` must be present (``anyOf``).
    """
    schema: dict[str, Any] = msgspec.json.schema(LLMEvent)
    defs = schema.get("$defs", {})
    body = defs["LLMEvent"]
    body["properties"].pop("extra", None)
    body["additionalProperties"] = True
    body["anyOf"] = [{"required": ["request_model"]}, {"required": ["response_model"]}]
    body["title"] = "LLMEvent"
    body["description"] = f"driftline LLMEvent JSON v{SCHEMA_VERSION}: one LLM call."
    out: dict[str, Any] = {"$schema": "https://json-schema.org/draft/2020-12/schema"}
    out.update(body)
    out["$defs"] = {k: v for k, v in defs.items() if k != "LLMEvent"}
    return out
