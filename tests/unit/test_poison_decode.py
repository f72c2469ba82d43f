"""Poison records: each class is rejected alone, with its exact reason, on both decode
paths, and the valid records around it become rows that ``to_columns`` can build.

Mutations each test catches are named in its docstring (checked by hand: the test fails
with the mutation applied).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

import driftline.streams.ingest.transforms as _pl
from driftline.schemas.event import MAX_TOKENS, NESTED_TOO_DEEP
from driftline.schemas.prices import PriceTable
from driftline.streams.ingest.transforms import MemoryRecord, decode_batch, enrich, to_columns

NOW = 1_790_000_000_000  # 2026-09-21T14:13:20Z, the injected wall clock
DAY = 86_400_000




def _ev(i: int, **kw: Any) -> dict[str, Any]:
    return {"event_id": f"e{i}", "app": "chat", "request_model": "gpt-4o", "timestamp": NOW - 1000,
            "latency_ms": 10.0, "input_tokens": 5, **kw}


def _raw(i: int, **kw: Any) -> bytes:
    return json.dumps(_ev(i, **kw), separators=(",", ":")).encode()


DEEP = b'{"event_id":"d","app":"chat","request_model":"m","timestamp":1,"latency_ms":1,"x":' \
       + b"[" * 5000 + b"]" * 5000 + b"}"
DEEPER = b'{"app":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
#: (poison record, its exact reason, the field named)
POISON: list[tuple[bytes | None, str, str | None]] = [
    (DEEP, NESTED_TOO_DEEP, None),
    (DEEPER, NESTED_TOO_DEEP, None),
    (_raw(900, extra={"a": json.loads("[" * 70 + "]" * 70)}), NESTED_TOO_DEEP, None),
    (_raw(901, input_tokens=2**64), "input_tokens: Expected `int` <= 1000000000000 - at `$.input_tokens`",
     "input_tokens"),
    (_raw(902, output_tokens=2**63 - 1),
     "output_tokens: Expected `int` <= 1000000000000 - at `$.output_tokens`", "output_tokens"),
    (_raw(903, timestamp=253402214400000),
     "timestamp: 9999-12-31T00:00:00.000Z is more than 300 s in the future (max_clock_skew_s)", "timestamp"),
    (_raw(904, timestamp=0),
     "timestamp: 1970-01-01T00:00:00.000Z is more than 2592000 s in the past (max_event_age_s)", "timestamp"),
    (_raw(905, app="a" * 100_000), "app: Expected `str` of length <= 256 - at `$.app`", "app"),
    (_raw(906, user_id="u" * 129), "user_id: Expected `str` of length <= 128 - at `$.user_id`", "user_id"),
    (_raw(907, finish_reasons=["s" * 257]),
     "finish_reasons: Expected `str` of length <= 256 - at `$.finish_reasons[0]`", "finish_reasons"),
    (_raw(908, guardrails=[{"name": "g" * 257, "verdict": "pass"}]),
     "guardrails: Expected `str` of length <= 256 - at `$.guardrails[0].name`", "guardrails"),
    (b'{"event_id":"u","app":"\xff\xfe","request_model":"m","timestamp":1,"latency_ms":1}',
     "not valid UTF-8: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte", None),
    (_raw(909).replace(b'"latency_ms":10.0', b'"latency_ms":1e400'),
     "not valid JSON: Number out of range - at `$[...]`", None),
    (b"not json", "not valid JSON: JSON is malformed: invalid character (byte 4)", None),
    (None, "empty record (tombstone)", None),
]


@pytest.mark.parametrize("fast", [True, False])
def test_each_poison_class_rejected_with_its_reason_among_valid_events(
        fast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every poison record is one Rejected with its exact reason; the 300 valid events
    around it all decode, and to_columns builds their rows without raising.

    Catches: dropping the depth limit or the RecursionError catch (RecursionError),
    dropping the le=MAX_TOKENS bound
    (OverflowError in to_columns for 2^64; 2^63-1 silently stored), the time bounds, the
    length limits, or the per-record catch-all."""
    monkeypatch.setattr(_pl, "_CHUNK_MIN", 1)  # bisect down to the poison record itself
    valid = [_raw(i) for i in range(300)]
    raws = valid[:150] + [p for p, _, _ in POISON] + valid[150:]
    recs = [MemoryRecord("llm.events", 0, i, None, r) for i, r in enumerate(raws)]
    out = decode_batch(recs, fast=fast, now_ms=NOW)
    assert out.n_events == 300
    if fast:
        assert out.table is not None and out.table.num_rows == 300
    got = sorted((r.offset, r.reason, r.field) for r in out.rejected)
    assert got == [(150 + i, reason, fld) for i, (_, reason, fld) in enumerate(POISON)]
    cols, w = to_columns(enrich(out, PriceTable.default()), now_ms=NOW)
    assert cols.num_rows == 300 and int(w.input_tokens.sum()) == 5 * 300


def test_event_time_bounds_are_inclusive_and_off_without_now() -> None:
    """Exactly max_event_age back and max_clock_skew ahead are accepted, 1 ms more is not;
    without now_ms only the absolute range applies. Catches an off-by-one in either bound
    or a clock read inside decode_batch."""
    raws = [_raw(0, timestamp=NOW - 30 * DAY), _raw(1, timestamp=NOW + 300_000),
            _raw(2, timestamp=NOW - 30 * DAY - 1), _raw(3, timestamp=NOW + 300_001)]
    recs = [MemoryRecord("llm.events", 0, i, None, r) for i, r in enumerate(raws)] * 1
    for fast in (True, False):
        out = decode_batch(recs * 20, fast=fast, now_ms=NOW)
        assert out.n_events == 40 and len(out.rejected) == 40
        out = decode_batch(recs, fast=fast, now_ms=NOW, max_event_age_s=31 * 86400, max_clock_skew_s=1)
        assert [r.offset for r in out.rejected] == [1, 3] and out.rejected[0].reason.endswith(
            "is more than 1 s in the future (max_clock_skew_s)")
        assert decode_batch(recs, fast=fast).n_events == 4


def _span(i: int, attrs: dict[str, Any], start_ms: int = NOW - 1000) -> Span:
    kvs = []
    for k, v in attrs.items():
        av = AnyValue(int_value=v) if isinstance(v, int) else AnyValue(string_value=v)
        kvs.append(KeyValue(key=k, value=av))
    return Span(trace_id=bytes([i + 1]) * 16, span_id=bytes([i + 1]) * 8, name=f"chat {i}",
                start_time_unix_nano=start_ms * 1_000_000, end_time_unix_nano=(start_ms + 5) * 1_000_000,
                attributes=kvs)


def _otlp(spans: list[Span], service: str = "svc") -> bytes:
    req = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])])
    req.resource_spans[0].resource.attributes.append(
        KeyValue(key="service.name", value=AnyValue(string_value=service)))
    return req.SerializeToString()


def test_otlp_poison_spans_rejected_with_reasons_others_kept() -> None:
    """One request: a valid span, tokens as an int64 string over 2^64, tokens near 2^63,
    a span dated 2477, and a request-level
    poison (service.name of 100,000 chars, deep OTLP/JSON). Catches the missing
    MAX_TOKENS check in _tokens, check_limits not called on OTLP events, the OTLP time
    bounds, and the per-request catch-all."""
    m = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"}
    good = _span(0, m)
    big = _span(1, {**m, "gen_ai.usage.input_tokens": "99999999999999999999"})
    near = _span(2, {**m, "gen_ai.usage.output_tokens": 2**63 - 1})
    late = _span(3, m, start_ms=16_000_000_000_000)
    recs = [MemoryRecord("otlp_spans", 0, 0, None, _otlp([good, big, near, late])),
            MemoryRecord("otlp_spans", 0, 1, None, _otlp([_span(4, m)], service="s" * 100_000)),
            MemoryRecord("otlp_spans", 0, 2, None, b'{"resourceSpans":' + b"[" * 5000 + b"]" * 5000 + b"}"),
            MemoryRecord("otlp_spans", 0, 3, None, None)]
    out = decode_batch(recs, now_ms=NOW)
    assert [e.span_id for e in out.events] == ["01" * 8]
    reasons = {r.offset: r.reason for r in out.rejected}
    assert reasons[0] == (
        "otlp: 3 of 4 GenAI spans rejected (1 stored): "
        "span 0202020202020202 (chat 1): gen_ai.usage.input_tokens: out of range: "
        f"99999999999999999999 (0 to {MAX_TOKENS}); "
        "span 0303030303030303 (chat 2): gen_ai.usage.output_tokens: out of range: "
        f"{2**63 - 1} (0 to {MAX_TOKENS}); "
        "span 0404040404040404 (chat 3): timestamp: 2477-01-07T04:26:40.000Z is more than 300 s "
        "in the future (max_clock_skew_s)")
    assert reasons[1] == ("otlp: 1 of 1 GenAI spans rejected (0 stored): span 0505050505050505 (chat 4): "
                          "app: longer than 256 characters (100000)")
    assert reasons[2] == f"otlp: {NESTED_TOO_DEEP}"
    assert reasons[3] == "empty record (tombstone)" and len(out.rejected) == 4


def test_worker_config_event_time_bounds_validated() -> None:
    """The bounds are WorkerConfig fields with the documented defaults, validated on
    creation."""
    from driftline.streams.worker import WorkerConfig

    cfg = WorkerConfig(kafka="127.0.0.1:9092", clickhouse="chdb:///tmp/x")
    assert (cfg.max_event_age_s, cfg.max_clock_skew_s) == (30 * 86400, 300)
    for bad in ({"max_event_age_s": 0}, {"max_clock_skew_s": -1}):
        with pytest.raises(ValueError, match="max_event_age_s must be > 0"):
            WorkerConfig(kafka="127.0.0.1:9092", clickhouse="chdb:///tmp/x", **bad)  # type: ignore[arg-type]
