"""Differential test of the OTLP decode speed-up (issue 20): the current
``schemas/otlp.py`` against its frozen copy from before the work
(``benchmarks/_otlp_before.py``), on the same inputs.

For every input both give the same outcome: equal events (``==``, field by field, and the
same JSON bytes, so the key order of ``extra`` too), the same rejected spans (reason,
name, ids), the same counters; or the same exception type and message. The inputs:

- the benchmark's generated GenAI spans (``bench_otlp.build_requests``: replay calls as
  ``opentelemetry-instrumentation-openai-v2`` writes them, with guardrail and evaluation
  events), in ``otlp_proto``;
- every payload the existing mapping tests decode (``tests/unit/test_otlp_mapping.py``, its
  tests run here with ``decode_request`` recorded), sniffed and with the encoding named;
- 400 structure-aware OTLP requests of ``benchmarks/fuzz_decode.py`` and 400 raw byte
  mutations of them (bit flips, truncations, splices, invalid UTF-8, ...).

Mutations caught (checked by hand): a fast attribute reader that takes an empty string for
a missing value, or an ``int_value`` for a string, changes ``extra`` or a field; a changed
check order gives another rejection reason; reading ``extra`` in another order changes the
JSON bytes.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import random
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec

import driftline.schemas.otlp as new

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


old = _load("_otlp_before", ROOT / "benchmarks" / "_otlp_before.py")


def outcome(mod: Any, data: bytes, encoding: str | None) -> tuple[Any, ...]:
    """Everything observable of one decode, comparable across the two modules."""
    try:
        b = mod.decode_request(data, encoding)
    except Exception as exc:  # noqa: BLE001 - the exception is part of the outcome
        return ("raised", type(exc).__name__, str(exc))
    return ("ok", b.events, [msgspec.json.encode(e) for e in b.events],
            [(r.reason, r.span_name, r.trace_id, r.span_id) for r in b.rejected],
            b.skipped_non_genai, b.skipped_non_model, b.inherited_agents,
            b.attached_guardrails, b.detached_guardrails)


def assert_same(data: bytes, encoding: str | None) -> tuple[Any, ...]:
    got, want = outcome(new, data, encoding), outcome(old, data, encoding)
    assert got == want, (encoding, data[:200])
    return got


def test_benchmark_spans_decode_to_the_same_events() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        bench = _load("bench_otlp", ROOT / "benchmarks" / "bench_otlp.py")
        payloads, _ = bench.build_requests(4, 50, seed=11)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    n = 0
    for p in payloads:
        got = assert_same(p, "otlp_proto")
        assert got[0] == "ok" and got[3] == []
        n += len(got[1])
    assert n == 200


def _calls(fn: Callable[..., Any]) -> Iterator[dict[str, Any]]:
    """The keyword arguments of each parametrized case of a test function."""
    grids = []
    for mark in getattr(fn, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names, values = mark.args[0], mark.args[1]
        names = [s.strip() for s in names.split(",")] if isinstance(names, str) else list(names)
        rows = [tuple(getattr(v, "values", (v,) if len(names) == 1 else v)) for v in values]
        grids.append([dict(zip(names, row, strict=True)) for row in rows])
    for combo in itertools.product(*grids):
        kw: dict[str, Any] = {}
        for part in combo:
            kw.update(part)
        yield kw


def test_existing_test_vectors_decode_the_same() -> None:
    mod = _load("_diff_test_otlp_mapping", Path(__file__).with_name("test_otlp_mapping.py"))
    seen: list[tuple[bytes, str | None]] = []
    real = mod.decode_request

    def recording(data: bytes, encoding: str | None = None) -> Any:
        seen.append((bytes(data), encoding))
        return real(data, encoding)

    mod.decode_request = recording
    ran = 0
    try:
        for name, fn in vars(mod).items():
            if not name.startswith("test_") or not callable(fn):
                continue
            params = set(inspect.signature(fn).parameters)
            for kw in _calls(fn):
                if params != set(kw):
                    continue  # needs a fixture: not a pure decode test
                fn(**kw)
                ran += 1
    finally:
        mod.decode_request = real
    assert ran >= 10 and len(seen) >= 20, (ran, len(seen))
    for data, encoding in seen:
        assert_same(data, encoding)
        if encoding is None:  # the tests sniff; decode with the encoding named too
            assert_same(data, new.detect_encoding(data))


def test_fuzzed_requests_and_mutations_decode_the_same() -> None:
    fz = _load("fuzz_decode", ROOT / "benchmarks" / "fuzz_decode.py")
    r = random.Random(20)
    kinds: Counter[str] = Counter()
    for _ in range(400):
        data, ctype = fz.gen_otlp(r)
        kinds[assert_same(data, ctype.decode())[0]] += 1
        other, _ = fz.gen_otlp(r)
        m = fz.mutate(r, data, other)
        if m is not None:
            kinds[assert_same(m, ctype.decode())[0]] += 1
            kinds[assert_same(m, None)[0]] += 1
    assert kinds["ok"] > 300 and kinds["raised"] > 50, kinds


def test_every_attribute_value_shape_decodes_the_same() -> None:
    """Empty and zero values of each ``AnyValue`` kind, no value at all, arrays, kvlists,
    bytes and repeated keys, on the span, its events and the resource, kept in ``extra``."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.proto.common.v1.common_pb2 import (
        AnyValue,
        ArrayValue,
        KeyValue,
        KeyValueList,
    )
    from opentelemetry.proto.trace.v1.trace_pb2 import Span

    shapes = [
        KeyValue(key="s.empty", value=AnyValue(string_value="")),
        KeyValue(key="s.text", value=AnyValue(string_value="é ✓")),
        KeyValue(key="i.zero", value=AnyValue(int_value=0)),
        KeyValue(key="i.neg", value=AnyValue(int_value=-(2**63))),
        KeyValue(key="d.zero", value=AnyValue(double_value=0.0)),
        KeyValue(key="b.false", value=AnyValue(bool_value=False)),
        KeyValue(key="b.true", value=AnyValue(bool_value=True)),
        KeyValue(key="bytes", value=AnyValue(bytes_value=b"\x00\xff")),
        KeyValue(key="bytes.empty", value=AnyValue(bytes_value=b"")),
        KeyValue(key="arr.empty", value=AnyValue(array_value=ArrayValue())),
        KeyValue(key="arr", value=AnyValue(array_value=ArrayValue(values=[
            AnyValue(string_value=""), AnyValue(int_value=3), AnyValue(),
            AnyValue(array_value=ArrayValue(values=[AnyValue(bool_value=True)]))]))),
        KeyValue(key="kv", value=AnyValue(kvlist_value=KeyValueList(values=[
            KeyValue(key="x", value=AnyValue(string_value="")), KeyValue(key="y")]))),
        KeyValue(key="no.value"),
        KeyValue(key="empty.value", value=AnyValue()),
        KeyValue(key="s.text", value=AnyValue(string_value="again, last wins")),
        KeyValue(value=AnyValue(string_value="no key")),
    ]
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.extend([KeyValue(key="service.name", value=AnyValue(string_value="a")),
                                   *shapes])
    sp = rs.scope_spans.add().spans.add()
    sp.trace_id, sp.span_id, sp.name = b"\x01" * 16, b"\x02" * 8, "chat m"
    sp.start_time_unix_nano, sp.end_time_unix_nano = 10**18, 10**18 + 10**6
    sp.attributes.extend([KeyValue(key="gen_ai.request.model", value=AnyValue(string_value="m")),
                          *shapes])
    sp.events.append(Span.Event(name="gen_ai.evaluation.result", attributes=[
        KeyValue(key="gen_ai.evaluation.name", value=AnyValue(string_value="q")),
        KeyValue(key="gen_ai.evaluation.explanation", value=AnyValue(string_value="")),
        KeyValue(key="gen_ai.evaluation.score.label", value=AnyValue(string_value="")), *shapes]))
    data = req.SerializeToString()
    got = assert_same(data, "otlp_proto")
    assert got[0] == "ok" and len(got[1]) == 1, got
    extra = got[1][0].extra
    assert (extra["s.empty"], extra["i.zero"], extra["b.false"], extra["no.value"],
            extra["s.text"], extra[""]) == ("", 0, False, None, "again, last wins", "no key")
    assert_same(new._to_otlp_json(req), "otlp_json")


def _json_span(n: int, attrs: list[dict[str, Any]], events: list[dict[str, Any]] | None = None,
               ) -> dict[str, Any]:
    return {"traceId": "ab" * 16, "spanId": f"{n:016x}", "name": f"chat {n}",
            "startTimeUnixNano": str(10**18 + n), "endTimeUnixNano": str(10**18 + n + 10**6),
            "attributes": [{"key": "gen_ai.request.model", "value": {"stringValue": "m"}},
                           *attrs], "events": events or []}


def _nested(depth: int) -> dict[str, Any]:
    v: dict[str, Any] = {"stringValue": "x"}
    for _ in range(depth):
        v = {"arrayValue": {"values": [v]}}
    return v


def test_input_limit_edges_decode_the_same() -> None:
    """One span per input limit, just over it (each rejected with its reason) and just under
    (kept): label and id lengths, time to first chunk overflowing to inf in ms, finish
    reasons, guardrail names; deep arrays in ``extra`` (never past MAX_NESTING: the parsers
    stop at 100 message levels, and an array level is two)."""
    long_, ok = "x" * 257, "x" * 256

    def s(key: str, value: dict[str, Any]) -> dict[str, Any]:
        return {"key": key, "value": value}

    spans = [
        _json_span(1, [s("gen_ai.response.model", {"stringValue": long_})]),
        _json_span(2, [s("gen_ai.response.model", {"stringValue": ok})]),
        _json_span(3, [s("user.id", {"stringValue": "u" * 129})]),
        _json_span(4, [s("gen_ai.conversation.id", {"stringValue": "c" * 128})]),
        _json_span(5, [s("gen_ai.response.time_to_first_chunk", {"doubleValue": 1e306})]),
        _json_span(6, [s("gen_ai.response.finish_reasons",
                         {"arrayValue": {"values": [{"stringValue": long_}]}})]),
        _json_span(7, [], [{"name": "gen_ai.guardrail", "attributes": [
            s("gen_ai.guardrail.name", {"stringValue": long_}),
            s("gen_ai.guardrail.verdict", {"stringValue": "pass"})]}]),
        _json_span(8, [s("deep", _nested(30))]),
        _json_span(9, [s("deep", _nested(20))]),
        _json_span(10, [s("kv", {"kvlistValue": {"values": [s("a", _nested(3))]}})]),
        _json_span(11, [s("gen_ai.agent.name", {"stringValue": long_})]),
    ]
    resource = [s("service.name", {"stringValue": "svc"}), s("r.list", _nested(1))]
    doc = {"resourceSpans": [{"resource": {"attributes": resource},
                              "scopeSpans": [{"spans": spans}]}]}
    deep = {"resourceSpans": [{"resource": {"attributes": [*resource, s("r.deep", _nested(2))]},
                               "scopeSpans": [{"spans": spans}]}]}
    assert assert_same(msgspec.json.encode(deep), "otlp_json")[3] == assert_same(
        msgspec.json.encode(doc), "otlp_json")[3]
    got = assert_same(msgspec.json.encode(doc), "otlp_json")
    assert got[0] == "ok", got
    kept = [e.span_id for e in got[1]]
    reasons = [r[0] for r in got[3]]
    assert kept == [f"{n:016x}" for n in (2, 4, 8, 9, 10)], (kept, reasons)
    assert len(reasons) == 6, reasons
    assert_same(msgspec.json.encode(doc).replace(b'"arrayValue"', b'"array_value"'), None)
