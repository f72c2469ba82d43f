"""Fuzz the worker's decode path: generated and mutated records through ``decode_batch``.

    python benchmarks/fuzz_decode.py [--n 100000] [--seed 1] [--batch 96]

Inputs (seeded, reproducible):

- structure-aware LLMEvent JSON: a random subset of the wire keys, each value drawn from
  valid values and hostile ones (ints at 2^53, 2^63-1, 2^64, 10^30, negatives, floats
  that overflow, timestamps in 1970 and 9999 and as odd strings, labels of 257 and
  100,000 characters, nulls, wrong types, deep nesting, unknown keys);
- structure-aware OTLP ``ExportTraceServiceRequest``s (protobuf and OTLP/JSON) with GenAI
  spans whose attributes take the same hostile values (int64 strings past 2^64, ...);
- raw byte mutations of either: bit flips, truncation, splices of two inputs, bytes
  inserted or deleted, deep nesting wrapped in, digits widened into huge ints, invalid
  UTF-8, tombstones (no value).

Each batch goes through ``decode_batch`` on the columnar fast path and on the exact
path (with an injected wall clock), and then through ``enrich`` + ``to_columns`` (where
an overflowing count used to raise). :func:`check_batch` asserts, per batch: nothing
raised; every JSON record is exactly one event or one ``Rejected`` with a non-empty
reason; every OTLP request gives at most one ``Rejected`` (its events aside); both paths
give the same events and the same reasons. Prints inputs tried, crashes (0), time.
The CI test (tests/unit/test_decode_fuzz.py) runs a few thousand of these.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import re
import sys
import time
import traceback
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

import driftline.streams.ingest.transforms as pl
from driftline.schemas.otlp import _to_otlp_json
from driftline.schemas.prices import PriceTable
from driftline.schemas.topics import EVENTS_TOPIC, OTLP_TOPIC

NOW = 1_790_000_000_000  # the injected wall clock (2026-09-21)
EVENTS, OTLP = EVENTS_TOPIC, OTLP_TOPIC




HOSTILE_INTS = [0, 1, -1, 2**31, 2**53, 10**12, 10**12 + 1, 2**63 - 1, 2**63, 2**64, 2**64 + 1,
                10**30, -(2**63)]
HOSTILE_FLOATS = [0.0, 1.5, -0.5, 1e308, 1e-320]
TIMESTAMPS: list[Any] = [NOW, NOW - 1000, NOW - 30 * 86_400_000, NOW - 30 * 86_400_000 - 1, NOW + 300_000,
                         NOW + 300_001, 0, -1, 253402300799999, 253402300800000, 2**63, 1.79e12,
                         "2026-09-21T14:00:00Z", "2026-09-21T14:00:00+02:00", "9999-12-31T23:59:59Z",
                         "1970-01-01T00:00:00Z", "2026-09-21T14:00:00", "yesterday", "", None, True, []]
LABEL_KEYS = ["app", "environment", "provider", "operation", "request_model", "response_model",
              "prompt_version", "error_type"]
ID_KEYS = ["event_id", "conversation_id", "user_id", "trace_id", "span_id"]
TOKEN_KEYS = ["input_tokens", "output_tokens", "cache_read_input_tokens",
              "cache_creation_input_tokens", "reasoning_output_tokens"]


def _deep(r: random.Random) -> Any:
    """A nested value: a marker that :func:`_expand` turns into arrays/objects nested
    that deep once encoded (the json module itself cannot encode 6,000 levels)."""
    d = r.choice([2, 30, 63, 64, 65, 200, 2000, 6000])
    return f"@@DEEP{d}{r.choice('ao')}@@"


_DEEP = re.compile(rb'"@@DEEP(\d+)([ao])@@"')


def _expand(data: bytes) -> bytes:
    def nest(m: re.Match[bytes]) -> bytes:
        d = int(m.group(1))
        return b"[" * d + b"1" + b"]" * d if m.group(2) == b"a" else b'{"k":' * d + b"1" + b"}" * d
    return _DEEP.sub(nest, data)


def _label(r: random.Random) -> Any:
    c = r.random()
    if c < 0.7:
        return r.choice(["chat", "gpt-4o", "v1", "prod", "openai", "é", "模型", "a b"])
    if c < 0.8:
        return "x" * r.choice([127, 128, 129, 255, 256, 257, 100_000])
    return r.choice([None, 1, 1.5, [], {}, True, "", "\ufffd\u0000"])


def _value(r: random.Random, key: str) -> Any:
    if key == "timestamp":
        return r.choice(TIMESTAMPS)
    if key in TOKEN_KEYS:
        return r.choice(HOSTILE_INTS) if r.random() < 0.4 else r.randint(0, 5000)
    if key in ("latency_ms", "ttft_ms", "tpot_ms"):
        return r.choice(HOSTILE_FLOATS + HOSTILE_INTS[:4]) if r.random() < 0.4 else r.random() * 5000
    if key in LABEL_KEYS or key in ID_KEYS:
        return _label(r)
    if key == "status":
        return r.choice(["ok", "error", "weird", None])
    if key == "feedback":
        return r.choice([-1, 0, 1, 2, None, 1.0])
    if key == "finish_reasons":
        return [_label(r) for _ in range(r.randint(0, 3))]
    if key == "guardrails":
        return [{"name": _label(r), "verdict": r.choice(["pass", "flagged", "blocked", "x"]),
                 **({"score": r.choice(HOSTILE_FLOATS)} if r.random() < 0.5 else {})}
                for _ in range(r.randint(0, 3))]
    if key in ("prompt", "response"):
        return r.choice(["hi", "x" * 5000, "{[(", None])
    if key == "extra":
        return {"k": _deep(r)} if r.random() < 0.5 else {"team": "a"}
    return _deep(r) if r.random() < 0.3 else r.choice([1, "v", 10**40, None])  # unknown key


def gen_event(r: random.Random) -> bytes:
    """One structure-aware LLMEvent JSON record: valid more often than not."""
    d: dict[str, Any] = {"event_id": f"e{r.getrandbits(40):x}", "app": "chat", "request_model": "gpt-4o",
                         "timestamp": NOW - r.randint(0, 3_600_000), "latency_ms": 12.0,
                         "input_tokens": 10}
    for _ in range(r.choice([0, 0, 1, 1, 2, 4])):
        key = r.choice(LABEL_KEYS + ID_KEYS + TOKEN_KEYS + [
            "timestamp", "latency_ms", "ttft_ms", "tpot_ms", "status", "feedback", "finish_reasons",
            "guardrails", "prompt", "response", "extra", "team"])
        d[key] = _value(r, key)
    if r.random() < 0.05:
        d.pop(r.choice(["app", "timestamp", "latency_ms", "request_model", "event_id"]), None)
    return _expand(json.dumps(d, separators=(",", ":"), ensure_ascii=r.random() < 0.5).encode())


def _any(r: random.Random, v: Any) -> AnyValue:
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int) and -(2**63) <= v < 2**63:
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    return AnyValue(string_value=str(v)[:200_000])


def gen_otlp(r: random.Random) -> tuple[bytes, bytes]:
    """One structure-aware OTLP request (protobuf or OTLP/JSON) and its content-type."""
    spans = []
    for i in range(r.randint(0, 4)):
        attrs: dict[str, Any] = {"gen_ai.operation.name": r.choice(["chat", "execute_tool", "apply_guardrail"]),
                                 "gen_ai.request.model": _label(r) if r.random() < 0.2 else "gpt-4o"}
        for k in r.sample(["gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens",
                           "gen_ai.response.time_to_first_chunk", "gen_ai.conversation.id", "user.id",
                           "error.type", "gen_ai.response.finish_reasons", "gen_ai.input.messages"],
                          r.randint(0, 3)):
            c = r.random()
            attrs[k] = (r.choice(HOSTILE_INTS) if c < 0.3 else str(r.choice(HOSTILE_INTS)) if c < 0.5
                        else r.choice(HOSTILE_FLOATS) if c < 0.6 else _label(r))
        start = r.choice([NOW - 5000, NOW + 10**9, 1, 0, 2**63 // 10**6]) * 1_000_000
        end = start + r.choice([5_000_000, 0, -1_000_000])
        spans.append(Span(trace_id=r.randbytes(16), span_id=r.randbytes(8), name=f"chat {i}",
                          start_time_unix_nano=max(0, min(start, 2**64 - 1)),
                          end_time_unix_nano=max(0, min(end, 2**64 - 1)),
                          attributes=[KeyValue(key=k, value=_any(r, v)) for k, v in attrs.items()]))
    req = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])])
    svc = _label(r) if r.random() < 0.2 else "svc"
    req.resource_spans[0].resource.attributes.append(KeyValue(key="service.name", value=_any(r, svc)))
    if r.random() < 0.5:
        return req.SerializeToString(), b"otlp_proto"
    return _to_otlp_json(req), b"otlp_json"


def mutate(r: random.Random, data: bytes, other: bytes) -> bytes | None:
    """One raw byte mutation of ``data`` (``other``: a second input for splices)."""
    b = bytearray(data)
    op = r.randrange(10)
    if op == 0 and b:  # bit flips
        for _ in range(r.randint(1, 8)):
            i = r.randrange(len(b))
            b[i] ^= 1 << r.randrange(8)
    elif op == 1:  # truncation
        del b[r.randrange(len(b) + 1):]
    elif op == 2:  # splice
        return bytes(b[:r.randrange(len(b) + 1)]) + other[r.randrange(len(other) + 1):]
    elif op == 3:  # insert random bytes
        i = r.randrange(len(b) + 1)
        b[i:i] = r.randbytes(r.randint(1, 16))
    elif op == 4 and b:  # delete a range
        i = r.randrange(len(b))
        del b[i:i + r.randint(1, 32)]
    elif op == 5:  # deep nesting wrapped in
        n = r.choice([64, 65, 1000, 5000, 50_000])
        return b"[" * n + data + b"]" * n if r.random() < 0.5 else \
            b'{"app":"a","request_model":"m","timestamp":1,"latency_ms":1,"x":' + b"[" * n + b"]" * n + b"}"
    elif op == 6:  # widen a digit run into a huge integer
        i = data.find(b":1")
        if i >= 0:
            return data[:i + 1] + b"9" * r.choice([19, 20, 30, 400, 5000]) + data[i + 2:]
    elif op == 7:  # invalid UTF-8
        i = r.randrange(len(b) + 1)
        b[i:i] = r.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x00"])
    elif op == 8:
        return None  # tombstone
    else:  # duplicate a slice
        i = r.randrange(len(b) + 1)
        b[i:i] = b[i:i + r.randint(1, 64)]
    return bytes(b)


def make_batch(r: random.Random, size: int, start_offset: int = 0) -> list[pl.MemoryRecord]:
    """A batch of JSON and OTLP records, about a third of them mutated."""
    recs: list[pl.MemoryRecord] = []
    for i in range(size):
        off = start_offset + i
        if r.random() < 0.15:
            value, ctype = gen_otlp(r)
            if r.random() < 0.35:
                ctype = r.choice([ctype, b""])
                value = mutate(r, value, gen_otlp(r)[0])  # type: ignore[assignment]
            recs.append(pl.MemoryRecord(OTLP, 0, off, None, value, (("content-type", ctype),) if ctype else ()))
        else:
            value = gen_event(r)
            if r.random() < 0.35:
                value = mutate(r, value, gen_event(r))  # type: ignore[assignment]
            recs.append(pl.MemoryRecord(EVENTS, 0, off, None, value))
    return recs


_PRICES = PriceTable.default()


def _outcome(out: pl.DecodedBatch) -> tuple[list[Any], list[Any]]:
    evs = [(o, e.event_id, e.timestamp_ms, e.input_tokens, e.output_tokens)
           for e, o in zip(out.events, out.offsets, strict=True)]
    if out.table is not None:
        t = out.table
        evs += list(zip(t.column("source_offset").to_pylist(), t.column("event_id").to_pylist(),
                        t.column("timestamp").to_pylist(), t.column("input_tokens").to_pylist(),
                        t.column("output_tokens").to_pylist(), strict=True))
    return sorted(evs, key=repr), sorted(((r.offset, r.reason, r.field) for r in out.rejected), key=repr)


def check_batch(recs: list[pl.MemoryRecord], now_ms: int = NOW) -> None:
    """Both decode paths on ``recs``: the invariants of the module docstring. Raises
    AssertionError (or whatever the code under test raised) on a violation."""
    results = []
    for fast in (True, False):
        out = pl.decode_batch(recs, fast=fast, now_ms=now_ms)
        cols, _ = pl.to_columns(pl.enrich(out, _PRICES), now_ms=now_ms)
        assert cols.num_rows == out.n_events
        evs, rej = _outcome(out)
        assert all(reason for _, reason, _ in rej), "a rejection without a reason"
        json_offs = {r.offset for r in recs if r.topic == EVENTS}
        ev_offs = [o for o, *_ in evs if o in json_offs]
        rej_offs = [o for o, *_ in rej]
        assert len(rej_offs) == len(set(rej_offs)), "a record rejected twice"
        j_rej = [o for o in rej_offs if o in json_offs]
        assert len(ev_offs) == len(set(ev_offs)), "a JSON record gave two events"
        assert sorted(ev_offs + j_rej) == sorted(json_offs), "a JSON record with no outcome or two"
        results.append((evs, rej))
    assert results[0] == results[1], "fast and exact paths differ"


def run(n: int, seed: int, batch: int, chunk_min: int = 4) -> dict[str, Any]:
    """Fuzz ``n`` inputs in batches; returns counts. Bisection goes down to ``chunk_min``
    records, so the columnar path keeps most records of a batch with poison in it."""
    r = random.Random(seed)
    pl._CHUNK_MIN = chunk_min
    tried = crashes = 0
    first: str | None = None
    t0 = time.perf_counter()
    while tried < n:
        recs = make_batch(r, min(batch, n - tried), tried)
        try:
            check_batch(recs)
        except Exception:  # noqa: BLE001 - counted and shown
            crashes += 1
            if first is None:
                first = traceback.format_exc()
                with open("fuzz_decode_crash.json", "w") as f:
                    json.dump([[x.topic, base64.b64encode(x.value).decode() if x.value is not None
                                else None] for x in recs], f)
        tried += len(recs)
    return {"inputs": tried, "crashes": crashes, "seconds": time.perf_counter() - t0, "first": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="inputs to try")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch", type=int, default=96, help="records per decode_batch call")
    a = ap.parse_args()
    res = run(a.n, a.seed, a.batch)
    print(f"inputs tried: {res['inputs']:,}  crashes: {res['crashes']}  time: {res['seconds']:.1f} s "
          f"({res['inputs'] / res['seconds']:,.0f} inputs/s, both decode paths + to_columns each)")
    if res["first"]:
        print("first failure (batch saved to fuzz_decode_crash.json):\n" + res["first"])
        sys.exit(1)


if __name__ == "__main__":
    main()
