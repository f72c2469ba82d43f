"""The worker's hot path against its slow, obvious definitions.

- ``decode_event``'s typed fast path gives the same event (or the same error) as the
  exact dict path, ``event_from_dict(json.loads(...))``;
- ``PriceTable.cost_columns`` gives the same floats as ``PriceTable.cost`` per event;
- ``to_columns`` + ``WindowAggregator.add`` give the per-(key, window) counts, sums
  and lateness that a plain loop over the events gives.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from driftline.schemas.event import EventError, decode_event, event_from_dict
from driftline.schemas.prices import PriceTable
from driftline.streams.ingest.transforms import (
    MemoryRecord,
    decode_batch,
    enrich,
    to_arrow,
    to_columns,
)
from driftline.streams.stages.windows import WindowAggregator, WindowConfig

MODELS = ["gpt-4o", "gpt-4o-mini", "o3", "claude-sonnet-4-20250514", "gemini-1.5-flash", "no-such-model"]

tokens = st.one_of(st.none(), st.integers(0, 50_000))
guardrail = st.fixed_dictionaries(
    {"name": st.sampled_from(["pii", "toxicity", "jailbreak"]),
     "verdict": st.sampled_from(["pass", "flagged", "blocked"])},
    optional={"score": st.one_of(st.none(), st.floats(0, 1))})
event_dict = st.fixed_dictionaries(
    {"app": st.sampled_from(["chat", "search", ""]),
     "timestamp": st.one_of(st.integers(1_700_000_000_000, 1_800_000_000_000),
                            st.sampled_from(["2025-01-01T00:00:02.5Z", "2025-06-01T10:00:00+02:00",
                                             "2025-01-01T00:00:00", "yesterday"])),
     "latency_ms": st.one_of(st.floats(0, 1e5), st.integers(-5, 10), st.none())},
    optional={
        "event_id": st.one_of(st.none(), st.text(min_size=1, max_size=8)),
        "request_model": st.one_of(st.none(), st.sampled_from(MODELS)),
        "response_model": st.sampled_from(MODELS),
        "prompt_version": st.one_of(st.none(), st.sampled_from(["v1", "v2"])),
        "input_tokens": tokens, "output_tokens": tokens, "cache_read_input_tokens": tokens,
        "cache_creation_input_tokens": tokens, "reasoning_output_tokens": tokens,
        "ttft_ms": st.one_of(st.none(), st.floats(0, 1e4)),
        "status": st.sampled_from(["ok", "error", "weird"]),
        "operation": st.one_of(st.none(), st.just("embeddings")),
        "guardrails": st.one_of(st.none(), st.lists(guardrail, max_size=3)),
        "feedback": st.one_of(st.none(), st.sampled_from([-1, 0, 1, 2])),
        "prompt": st.one_of(st.none(), st.text(max_size=20)),
        "team": st.text(max_size=5),
        "extra": st.one_of(st.none(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
    })


def _exact(raw: bytes) -> Any:
    try:
        return event_from_dict(json.loads(raw))
    except EventError as exc:
        return ("error", str(exc), exc.key)


def _fast(raw: bytes) -> Any:
    try:
        return decode_event(raw)
    except EventError as exc:
        return ("error", str(exc), exc.key)


@settings(max_examples=400, deadline=None)
@given(event_dict)
def test_fast_decode_equals_exact_path(d: dict[str, Any]) -> None:
    raw = json.dumps(d).encode()
    assert _fast(raw) == _exact(raw)


BASE = {"event_id": "e1", "app": "chat", "request_model": "gpt-4o", "timestamp": 1735689600000,
        "latency_ms": 12.5}
class _Delete:
    """Marks a key to remove; a fixed repr keeps the test ids stable across processes."""

    def __repr__(self) -> str:
        return "DELETE"


DELETE = _Delete()


@pytest.mark.parametrize("change", [
    {}, {"app": ""}, {"app": None}, {"app": 5}, {"app": DELETE}, {"request_model": DELETE},
    {"request_model": None}, {"request_model": None, "response_model": "gpt-4o"},
    {"event_id": DELETE}, {"event_id": None}, {"event_id": ""}, {"timestamp": "2025-01-01T00:00:00Z"},
    {"timestamp": "2025-01-01T00:00:00"}, {"timestamp": "soon"}, {"timestamp": -1},
    {"timestamp": 10**17}, {"timestamp": 1.5e12}, {"timestamp": True}, {"timestamp": None},
    {"latency_ms": -1}, {"latency_ms": "1"}, {"latency_ms": None}, {"operation": None},
    {"status": "weird"}, {"status": None}, {"feedback": 2}, {"feedback": None}, {"input_tokens": -3},
    {"input_tokens": 1.5}, {"team": "x"}, {"extra": {"a": 1}}, {"extra": None}, {"extra": 3},
    {"guardrails": [{"name": "pii", "verdict": "meh"}]}, {"guardrails": [{"name": "pii"}]},
    {"guardrails": [{"name": "pii", "verdict": "pass", "extra_key": 1}]}, {"finish_reasons": "stop"},
], ids=repr)
def test_fast_decode_equals_exact_path_on_each_edge(change: dict[str, Any]) -> None:
    d = dict(BASE)
    for k, v in change.items():
        if v is DELETE:
            d.pop(k, None)
        else:
            d[k] = v
    raw = json.dumps(d).encode()
    assert _fast(raw) == _exact(raw)


def test_fast_decode_keeps_unknown_keys_and_names_bad_keys() -> None:
    ev = decode_event(b'{"event_id":"a","app":"x","request_model":"m","timestamp":1,"latency_ms":1,"team":"t"}')
    assert ev.extra == {"team": "t"}
    with pytest.raises(EventError) as exc:
        decode_event(b'{"event_id":"a","app":"x","request_model":"m","timestamp":1,"latency_ms":-1}')
    assert exc.value.key == "latency_ms"
    with pytest.raises(EventError) as exc:
        decode_event(b'{"event_id":"a","app":"x","request_model":"m","timestamp":99999999999999999,'
                     b'"latency_ms":1}')
    assert exc.value.key == "timestamp"




def _valid_events(dicts: list[dict[str, Any]]) -> list[MemoryRecord]:
    recs = []
    for i, d in enumerate(dicts):
        raw = json.dumps(d).encode()
        if not isinstance(_fast(raw), tuple):
            recs.append(MemoryRecord("llm.events", 0, i, None, raw))
    return recs


@settings(max_examples=60, deadline=None)
@given(st.lists(event_dict, min_size=1, max_size=60))
def test_cost_columns_equal_scalar_cost(dicts: list[dict[str, Any]]) -> None:
    prices = PriceTable.default()
    decoded = decode_batch(_valid_events(dicts))
    cols, w = to_columns(enrich(decoded, prices))
    want = [prices.cost(e) for e in decoded.events]
    got = cols["cost_usd"]
    assert len(got) == len(want)
    for g, x in zip(got, want, strict=True):
        if x is None:
            assert np.isnan(g)
        else:
            assert g == x  # same arithmetic, same floats
    table = to_arrow(cols)
    assert table.column("cost_usd").null_count == sum(x is None for x in want)


def _naive_windows(events: list[Any], size: int, lateness: int, batches: list[list[int]]) -> tuple[
        dict[tuple[Any, int], Counter[str]], int]:
    """Per (key, window): events/errors/tokens/guardrail hits; and the late count, batch by batch."""
    out: dict[tuple[Any, int], Counter[str]] = defaultdict(Counter)
    wm: int | None = None
    late = 0
    for b in batches:
        for i in b:
            e = events[i]
            start = e.timestamp_ms - e.timestamp_ms % size
            if wm is not None and start + size + lateness <= wm:
                late += 1
                continue
            c = out[((e.app, e.model, e.prompt_version or ""), start)]
            c["events"] += 1
            c["errors"] += e.status == "error"
            c["input_tokens"] += e.input_tokens or 0
            c["hits"] += any(g.verdict in ("flagged", "blocked") for g in e.guardrails or [])
        mx = max(events[i].timestamp_ms for i in b)
        wm = mx if wm is None else max(wm, mx)
    return out, late


@settings(max_examples=60, deadline=None)
@given(st.lists(event_dict, min_size=1, max_size=80), st.integers(1, 4), st.data())
def test_windows_match_a_plain_loop(dicts: list[dict[str, Any]], n_batches: int, data: Any) -> None:
    size, lateness = 60_000, 30_000
    recs = _valid_events(dicts)
    if not recs:
        return
    events = decode_batch(recs).events
    cuts = sorted(data.draw(st.lists(st.integers(0, len(events)), min_size=n_batches - 1,
                                     max_size=n_batches - 1)))
    bounds = [0, *cuts, len(events)]
    batches = [list(range(a, b)) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    want, want_late = _naive_windows(events, size, lateness, batches)
    agg = WindowAggregator(WindowConfig(size_ms=size, allowed_lateness_ms=lateness))
    prices = PriceTable.default()
    late = 0
    for b in batches:
        late += agg.add(to_columns(enrich(decode_batch([recs[i] for i in b]), prices))[1])
    assert late == want_late
    got = {((s.app, s.model, s.prompt_version), s.window_start_ms): Counter(
        events=s.events, errors=s.errors, input_tokens=s.input_tokens, hits=s.guardrail_hits)
        for s in agg.flush_all()}
    assert {k: +v for k, v in got.items()} == {k: +v for k, v in want.items()}


def test_to_arrow_schema_roundtrip() -> None:
    recs = _valid_events([
        {"event_id": "a", "app": "x", "request_model": "gpt-4o", "timestamp": 1, "latency_ms": 1,
         "guardrails": [{"name": "pii", "verdict": "blocked"}], "extra": {"k": 1}},
        {"event_id": "b", "app": "x", "request_model": "nope", "timestamp": 2, "latency_ms": 2,
         "input_tokens": 3}])
    cols, _ = to_columns(enrich(decode_batch(recs), PriceTable.default()))
    t = to_arrow(cols)
    assert t.num_rows == 2
    assert t.column("guardrail_names").to_pylist() == [["pii"], []]
    assert t.column("guardrail_hit").to_pylist() == [1, 0]
    assert t.column("extra").to_pylist() == [msgspec.json.encode({"k": 1}).decode(), "{}"]
    assert t.column("cost_usd").to_pylist() == [None, None]  # no tokens / unknown model
    assert t.column("source_offset").to_pylist() == [0, 1]


# -- the columnar fast path (Arrow's JSON reader) against the record-by-record path ----------
from driftline.streams.ingest import transforms as _pl  # noqa: E402

ODD_RECORDS = [
    b'{"event_id":"m1","app":"a","request_model":"gpt-4o","timestamp":1,"latency_ms":1} '
    b'{"event_id":"m2","app":"a","request_model":"gpt-4o","timestamp":2,"latency_ms":2}',  # two objects
    b'{"event_id":"n1","app":"a",\n"request_model":"gpt-4o","timestamp":1,"latency_ms":1}',  # line break
    b' {"event_id":"w1","app":"a","request_model":"gpt-4o","timestamp":1,"latency_ms":1}',  # leading space
    b'{"event_id":"d1","app":"a","app":"b","request_model":"gpt-4o","timestamp":1,"latency_ms":1}',
    b'{"event_id":"u1","app":"a","request_model":"gpt-4o","timestamp":1,"latency_ms":1,"prompt":"\\ud800"}',
    b'{"event_id":"x1","app":"a","request_model":"gpt-4o","timestamp":1,"latency_ms":1,"prompt":"\xff"}',
    b'{"event_id":"f1","app":"a","request_model":"gpt-4o","timestamp":1,"latency_ms":1e400}',
    b'{"event_id":"i1","app":"a","request_model":"gpt-4o","timestamp":1,"latency_ms":1,"input_tokens":1e3}',
    b'{"event_id":"b1","app":"a","request_model":"gpt-4o","timestamp":1,"latency_ms":1,"feedback":1.0}',
    b'{"event_id":"g1","app":"a","request_model":"gpt-4o","timestamp":1,"latency_ms":1,"guardrails":[null]}',
    b'{"event_id":"r1","app":"a","request_model":"gpt-4o","timestamp":1,"latency_ms":1,"finish_reasons":["stop",null]}',
    b'{"event_id":"t1","app":"a","request_model":"gpt-4o","timestamp":18446744073709551615,"latency_ms":1}',
    b'[1, 2]', b'', b'{}', b'null', b'{"event_id":"z1"', b'{"app":"a"}\n',
]


def _both_paths(recs: list[MemoryRecord], monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    prices = PriceTable.default()
    out = []
    for fast in (True, False):
        decoded = decode_batch(recs, fast=fast)
        cols, w = to_columns(enrich(decoded, prices), now_ms=1)
        t = to_arrow(cols)
        order = np.argsort(np.asarray(t.column("source_offset").to_pylist(), np.int64), kind="stable")
        rows = t.take(order).to_pylist() if t.num_rows else []
        win = {k: np.asarray(getattr(w, k))[order].tolist() for k in (
            "ts_ms", "latency_ms", "ttft_ms", "tpot_ms", "is_error", "input_tokens", "output_tokens",
            "cache_read_input_tokens", "cache_creation_input_tokens", "reasoning_output_tokens",
            "cost_usd", "guardrail_checked", "guardrail_hit", "guardrail_blocked", "feedback")}
        win["keys"] = [w.keys[i] for i in order.tolist()]
        rej = sorted((r.offset, r.reason, r.field, r.value)
                     for r in decoded.rejected)
        out.append((rows, json.dumps(win, default=str, sort_keys=True), rej, decoded.table is not None))
    return out[0], out[1]


def _records(raws: list[bytes]) -> list[MemoryRecord]:
    return [MemoryRecord("llm.events", i % 3, i, None, r) for i, r in enumerate(raws)]


@settings(max_examples=80, deadline=None)
@given(st.lists(event_dict, min_size=1, max_size=120), st.lists(st.sampled_from(ODD_RECORDS), max_size=6),
       st.randoms(use_true_random=False))
def test_columnar_decode_equals_record_by_record(dicts: list[dict[str, Any]], odd: list[bytes],
                                                 rnd: Any) -> None:
    """Every record, valid or not, ends up as the same row or the same dead-letter
    reason whichever path decodes it; bisection is forced down to chunks of 4."""
    raws = [json.dumps(d, separators=(",", ":")).encode() for d in dicts] + odd
    rnd.shuffle(raws)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_pl, "_FAST_MIN", 1)
        mp.setattr(_pl, "_CHUNK_MIN", 4)
        fast, slow = _both_paths(_records(raws), mp)
    assert fast[0] == slow[0]  # the llm_events rows
    assert fast[1] == slow[1]  # the window stage's numbers
    assert fast[2] == slow[2]  # the dead-lettered records and reasons


def test_columnar_decode_takes_clean_batches_and_both_timestamp_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clean records are all decoded by Arrow (none left to the slow path), with epoch-ms
    or RFC 3339 timestamps, and a bad record in a big batch costs only its chunk."""
    base = dict(BASE, guardrails=[{"name": "pii", "verdict": "flagged", "score": 0.5}],
                finish_reasons=["stop"], feedback=-1, input_tokens=10, output_tokens=3)
    for ts in (1735689600000, "2025-01-01T00:00:00.250+01:00"):
        raws = [json.dumps(dict(base, event_id=f"e{i}", timestamp=ts)).encode() for i in range(300)]
        decoded = decode_batch(_records(raws))
        assert decoded.table is not None and decoded.table.num_rows == 300 and decoded.events == []
        assert decoded.table.column("timestamp").to_pylist()[0] == (
            ts if isinstance(ts, int) else 1735689600250 - 3_600_000)
    raws = [json.dumps(dict(base, event_id=f"e{i}")).encode() for i in range(4096)]
    raws[1000] = b'{"event_id":"bad","app":"a","request_model":"m","timestamp":1,"latency_ms":"x"}'
    monkeypatch.setattr(_pl, "_CHUNK_MIN", 256)
    decoded = decode_batch(_records(raws))
    assert decoded.table is not None
    assert decoded.table.num_rows == 4096 - 256  # the bad record's 256-record chunk went slow
    assert len(decoded.events) == 255 and [r.offset for r in decoded.rejected] == [1000]
    a, b = _both_paths(_records(raws), monkeypatch)
    assert a == (b[0], b[1], b[2], True)


def test_invalid_utf8_is_an_event_error_not_a_crash() -> None:
    with pytest.raises(EventError, match="UTF-8"):
        decode_event(b'{"event_id":"a","app":"x","request_model":"m","timestamp":1,"latency_ms":1,"prompt":"\xff"}')
    decoded = decode_batch(_records([b'{"app":"\xff"}'] * 100))
    assert decoded.n_events == 0 and len(decoded.rejected) == 100


def test_record_larger_than_the_reader_block_is_decoded_whole() -> None:
    """A record bigger than the JSON reader's 4 MiB block is decoded whole, with its
    neighbours, and the rows equal the exact path's."""
    big = "x" * ((4 << 20) + 1000)
    raws = [json.dumps(dict(BASE, event_id=f"e{i}")).encode() for i in range(300)]
    raws[150] = json.dumps(dict(BASE, event_id="big", prompt=big)).encode()
    decoded = decode_batch(_records(raws))
    assert decoded.n_events == 300 and decoded.rejected == []
    prompts = {e.event_id: e.prompt for e in decoded.events}
    if decoded.table is not None:
        t = decoded.table
        prompts.update(zip(t.column("event_id").to_pylist(), t.column("prompt").to_pylist(), strict=True))
    assert len(prompts) == 300 and prompts["big"] == big and prompts["e0"] is None
    exact = decode_batch(_records(raws), fast=False)
    assert {e.event_id: e.prompt for e in exact.events} == prompts
