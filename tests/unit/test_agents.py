"""Agents and sessions: OTel GenAI agent/tool spans -> events, the runaway alert rules on
seeded call streams (exact firing index, the trace id label), and the trace and
conversation summaries (schemas/tables.sql views) on chDB against exact sums."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from driftline.schemas.event import (
    EventError,
    decode_event,
    encode_event,
    event_from_dict,
    event_to_dict,
    json_schema,
)
from driftline.schemas.otlp import _to_otlp_json, decode_request
from driftline.schemas.rules import RuleFileError, fingerprint, parse_rules
from driftline.streams.ingest.transforms import MemoryRecord, decode_batch
from driftline.streams.sinks.clickhouse import ClickHouseSink, ddl_statements
from driftline.streams.sinks.write_step import StoredBatch
from driftline.streams.stages.alerting import AlertingStage
from driftline.streams.stages.drift_references import ms_to_dt
from driftline.streams.stages.rule_engine import AlertEvaluator
from driftline.streams.stages.runaway import TraceTracker, prompt_key

T0 = 1_800_000_000_000  # ms
TRACE = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")


# ----------------------------------------------------------------------------- OTLP mapping
def _kv(k: str, v: Any) -> KeyValue:
    av = AnyValue(int_value=v) if isinstance(v, int) else AnyValue(string_value=v)
    return KeyValue(key=k, value=av)


def _span(n: int, parent: int | None, attrs: dict[str, Any], start_ms: int, dur_ms: int) -> Span:
    s = Span(trace_id=TRACE, span_id=n.to_bytes(8, "big"), name=f"span {n}",
             start_time_unix_nano=(T0 + start_ms) * 10**6, end_time_unix_nano=(T0 + start_ms + dur_ms) * 10**6,
             attributes=[_kv(k, v) for k, v in attrs.items()])
    if parent is not None:
        s.parent_span_id = parent.to_bytes(8, "big")
    return s


def _request(*spans: Span) -> ExportTraceServiceRequest:
    rs = ResourceSpans(scope_spans=[ScopeSpans(spans=list(spans))])
    rs.resource.attributes.extend([_kv("service.name", "travel-agent")])
    return ExportTraceServiceRequest(resource_spans=[rs])


def test_agent_and_tool_spans_become_events_with_the_agent_inherited() -> None:
    """An invoke_agent span (with the usage of its children), a chat span under it
    without agent attributes, an execute_tool span under a plain (non-GenAI) span under
    the chat span, and a chat span of another agent named on the span itself.
    Mutations caught: tool/agent spans skipped again (3 events), the agent not inherited
    (agent_name None on the chat and tool events), an agent span's usage mapped to tokens
    (priced twice with its children) or its model kept (its run time in the model's latency
    windows), gen_ai.tool.name not mapped."""
    req = _request(
        _span(1, None, {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "planner",
                        "gen_ai.agent.id": "asst_1", "gen_ai.request.model": "gpt-4o",
                        "gen_ai.usage.input_tokens": 300, "gen_ai.usage.output_tokens": 40}, 0, 5000),
        _span(2, 1, {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
                     "gen_ai.usage.input_tokens": 300, "gen_ai.usage.output_tokens": 40}, 10, 900),
        _span(3, 2, {"http.request.method": "GET"}, 950, 300),
        _span(4, 3, {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "flight_search",
                     "gen_ai.tool.call.id": "call_9"}, 960, 250),
        _span(5, None, {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o-mini",
                        "gen_ai.agent.name": "critic"}, 6000, 100),
    )
    pb = decode_request(req.SerializeToString())
    js = decode_request(_to_otlp_json(req))
    assert js.events == pb.events
    for e in pb.events:  # the re-keyer's JSON form decodes back to the same event
        assert decode_event(encode_event(e)) == e == event_from_dict(event_to_dict(e))
    got = [(e.span_id[-1], e.operation, e.model, e.agent_name, e.agent_id, e.tool_name, e.input_tokens)
           for e in pb.events]
    assert got == [
        ("1", "invoke_agent", "", "planner", "asst_1", None, None),
        ("2", "chat", "gpt-4o", "planner", "asst_1", None, 300),
        ("4", "execute_tool", "", "planner", "asst_1", "flight_search", None),
        ("5", "chat", "gpt-4o-mini", "critic", None, None, None),
    ]
    agent = pb.events[0]
    assert (agent.extra["gen_ai.usage.input_tokens"], agent.extra["gen_ai.usage.output_tokens"]) == (300, 40)
    assert (agent.request_model, agent.extra["gen_ai.request.model"]) == (None, "gpt-4o")
    assert pb.events[2].extra["gen_ai.tool.call.id"] == "call_9"
    assert (pb.inherited_agents, pb.skipped_non_genai, pb.skipped_non_model, pb.rejected) == (2, 1, 0, [])


def test_json_events_say_the_same_and_only_agent_and_tool_operations_go_without_a_model() -> None:
    """Both decode paths (typed and exact) and the columnar batch decode take a tool event
    without a model; a chat event without one is still refused. Mutation caught: the
    model check relaxed for every operation, or not relaxed on one of the three paths."""
    tool = {"event_id": "e1", "app": "a", "timestamp": T0, "latency_ms": 12.0, "operation": "execute_tool",
            "tool_name": "search", "agent_name": "planner", "agent_id": "asst_1", "trace_id": "t1"}
    ev = decode_event(encode_event(tool))
    assert (ev.operation, ev.model, ev.tool_name, ev.agent_name, ev.agent_id) == (
        "execute_tool", "", "search", "planner", "asst_1")
    assert event_from_dict({**tool, "team": "x"}).extra == {"team": "x"}  # the exact path
    with pytest.raises(EventError) as e:
        decode_event(encode_event({**tool, "operation": "chat"}))
    assert e.value.key == "request_model"
    # the published JSON Schema says the same (mutation caught: its anyOf left as before)
    v = jsonschema.Draft202012Validator(json_schema())
    assert [v.is_valid(d) for d in (tool, {**tool, "operation": "chat"}, {**tool, "operation": "chat",
                                                                            "request_model": "m"})] == [
        True, False, True]
    # the columnar path (64 records and more): 70 tool events and one chat event without a model
    docs = [{**tool, "event_id": f"e{i}"} for i in range(70)] + [{**tool, "event_id": "x", "operation": "chat"}]
    recs = [MemoryRecord("llm.events", 0, i, None, encode_event(d), []) for i, d in enumerate(docs)]
    b = decode_batch(recs, now_ms=T0)
    assert b.n_events == 70 and [r.offset for r in b.rejected] == [70] and b.events == []
    assert b.table is not None and b.table.column("tool_name").to_pylist() == ["search"] * 70


# ----------------------------------------------------------------------------- runaway rules
RUNAWAY = parse_rules(textwrap.dedent("""\
    rules:
      - name: Loop
        kind: runaway
        expr: "calls.count > 5"
        window: 1m
      - name: Repeat
        kind: runaway
        expr: "prompt.repeats > 2"
        window: 1m
        annotations: {summary: "{trace_id} of {app}: {value:.0f}"}
      - name: ConvCost
        kind: runaway
        expr: "cost_usd.sum > 1"
        group_by: [conversation_id]
        window: 10m
    """))


def _feed(ev: AlertEvaluator, calls: list[dict[str, Any]]) -> list[tuple[int, str, str, dict[str, str]]]:
    """Each call then an evaluation at its time: (call index, rule, state, labels) per transition."""
    out = []
    for i, c in enumerate(calls):
        ev.observe_call(c["ts"], c.get("app", "trip"), c.get("model", "gpt-4o"),
                        {"trace_id": c.get("trace"), "conversation_id": c.get("conv"), "user_id": c.get("user")},
                        operation=c.get("op", "chat"), cost_usd=c.get("cost"), prompt=c.get("prompt"))
        out += [(i, t.rule, t.state, t.labels) for t in ev.evaluate(c["ts"])]
    return out


def test_calls_per_trace_fire_at_the_exact_call_with_the_trace_id() -> None:
    """Trace A calls every second (model and tool calls, distinct prompts), trace B every
    2 s alongside: Loop fires on A's 6th call (index 8 of the stream), with A's id as a
    label, never for B. Mutations caught: counting across traces, ``>=`` for ``>``, the
    trace id missing from the labels, tool calls not counted."""
    calls = []
    for i in range(8):
        calls.append({"ts": T0 + i * 1000, "trace": "A", "op": "execute_tool" if i % 2 else "chat",
                      "prompt": f"step {chr(97 + i)}"})
        if i % 2 == 0:
            calls.append({"ts": T0 + i * 1000 + 1, "trace": "B", "prompt": f"other {chr(97 + i)}"})
    ev = AlertEvaluator(RUNAWAY, event_time_stamps=True)
    got = _feed(ev, calls)
    assert got == [(8, "Loop", "firing", {"app": "trip", "trace_id": "A"})]
    assert calls[8]["trace"] == "A" and calls[8]["ts"] == T0 + 5000


def test_a_repeated_prompt_fires_on_its_third_near_identical_send_and_resolves_after_the_window() -> None:
    """Retries differing only in a counter, case and spacing are one prompt: Repeat
    fires on the 3rd send; distinct prompts in between count for nothing; it resolves once
    the window has passed the sends. Mutations caught: no digit/case/space normalisation
    (never fires), counting every prompt of the trace as one (fires at index 2)."""
    assert prompt_key("Retry 1:  Fetch order 4411") == prompt_key("retry 2: fetch ORDER 4412 ")
    assert prompt_key("fetch order") != prompt_key("cancel order")
    calls = [{"ts": T0, "trace": "T", "prompt": "Retry 1:  Fetch order 4411"},
             {"ts": T0 + 1000, "trace": "T", "prompt": "summarise the itinerary"},
             {"ts": T0 + 2000, "trace": "T", "prompt": "book the hotel"},
             {"ts": T0 + 3000, "trace": "T", "prompt": "retry 2: fetch ORDER 4412 "},
             {"ts": T0 + 4000, "trace": "T", "op": "execute_tool"},
             {"ts": T0 + 5000, "trace": "T", "prompt": "RETRY 3: fetch order 4413"},
             {"ts": T0 + 70_000, "trace": "U", "prompt": "hello"}]
    ev = AlertEvaluator(parse_rules(textwrap.dedent("""\
        rules:
          - name: Repeat
            kind: runaway
            expr: "prompt.repeats > 2"
            window: 1m
            annotations: {summary: "{trace_id} of {app}: {value:.0f}"}
        """)), event_time_stamps=True)
    got = _feed(ev, calls)
    assert got == [(5, "Repeat", "firing", {"app": "trip", "trace_id": "T"}),
                   (6, "Repeat", "resolved", {"app": "trip", "trace_id": "T"})]
    assert [t.annotations["summary"] for t in ev.active_alerts()] == []


def test_cost_per_conversation_over_a_budget_fires_on_the_call_that_crosses_it() -> None:
    """0.25 USD a call (exact in binary) in one conversation over three traces: the sum is
    1.25 > 1 at the 5th call; unpriced calls add nothing. Mutation caught: grouping by
    trace (never over 1), an unpriced NaN summed (NaN never compares)."""
    calls = [{"ts": T0 + i * 1000, "trace": f"t{i // 2}", "conv": "c1", "cost": 0.25} for i in range(4)]
    calls.insert(2, {"ts": T0 + 1500, "trace": "t1", "conv": "c1", "cost": float("nan")})
    calls.append({"ts": T0 + 9000, "trace": "t9", "conv": "c1", "cost": 0.25})
    ev = AlertEvaluator(RUNAWAY, event_time_stamps=True)
    got = _feed(ev, calls)
    assert got == [(5, "ConvCost", "firing", {"app": "trip", "conversation_id": "c1"})]
    assert ev.active_alerts()[0].value == 1.25


def test_trace_state_is_bounded_evicts_the_oldest_and_follows_key_ownership() -> None:
    """At most max_traces per dimension, the least recently fed dropped and counted;
    retain() keeps only the calls of owned app/model keys (a trace over two models keeps
    the part of the owned one). Mutations caught: no cap, evicting the newest, retain
    dropping the whole trace or keeping the other model's calls."""
    ev = AlertEvaluator(RUNAWAY, max_traces=3)
    for i in range(5):
        ev.observe_call(T0 + i, "trip", "gpt-4o", {"trace_id": f"t{i}"})
    assert ev.traces is not None
    assert sorted(g for g, _ in ev.traces.groups("trace_id")) == ["t2", "t3", "t4"]
    assert ev.evicted["traces"] == 2
    for i in range(4):
        ev.observe_call(T0 + 10 + i, "trip", "gpt-4o" if i < 3 else "claude", {"trace_id": "t4"})
    assert ev.traces.value("trace_id", "t4", "calls.count", 60_000, T0 + 20) == (5.0, T0)
    ev.retain(lambda app, model: model == "claude")
    assert sorted(g for g, _ in ev.traces.groups("trace_id")) == ["t4"]
    assert ev.traces.value("trace_id", "t4", "calls.count", 60_000, T0 + 20) == (1.0, T0)
    state = ev.get_state()
    again = AlertEvaluator(RUNAWAY, max_traces=3)
    again.set_state(state)
    assert again.traces is not None and again.traces.get_state() == ev.traces.get_state()
    with pytest.raises(ValueError):
        TraceTracker(("trace_id",), 0)


@pytest.mark.parametrize(("body", "message"), [
    ('expr: "calls.count > 5"\n    window: 1m\n    group_by: [trace_id, user_id]',
     "a runaway rule groups by exactly one of trace_id, conversation_id, user_id, got ['trace_id', 'user_id']"),
    ('expr: "calls.count < 5"\n    window: 1m', "a runaway rule compares with > or >="),
    ('expr: "calls.count > 5"', "is required (the rolling window of event time, e.g. 10m)"),
    ('expr: "latency_ms.p99 > 5"\n    window: 1m', "unknown metric 'latency_ms.p99' for a runaway rule"),
])
def test_runaway_rules_are_validated(body: str, message: str) -> None:
    """Mutation caught: any of these checks dropped (a rule that cannot be evaluated loads)."""
    with pytest.raises(RuleFileError) as e:
        parse_rules(f"rules:\n  - name: R\n    kind: runaway\n    {body}\n")
    assert [message in err.message for err in e.value.errors] == [True]


def test_the_alerting_stage_feeds_stored_calls_to_the_runaway_rules() -> None:
    """A stored batch (the llm_events columns, as the write step hands them over) through
    the stage's tick: the loop alert with its trace id, its row for the alerts table.
    Mutation caught: the stage not feeding calls (no transition), the wrong column as the
    trace id."""
    n = 7
    cols: dict[str, Any] = {
        "timestamp": [T0 + i * 1000 for i in range(n)], "app": ["trip"] * n, "model": ["gpt-4o"] * n,
        "trace_id": ["loop-1"] * n, "conversation_id": ["conv-1"] * n, "user_id": [None] * n,
        "operation": ["chat"] * n, "status": ["ok"] * n, "prompt": [f"p{chr(97 + i)}" for i in range(n)],
        "input_tokens": [10] * n, "output_tokens": [None] * n, "cost_usd": [0.01] * n}
    now = [T0 + 6000]
    st = AlertingStage(RUNAWAY, clock=lambda: now[0], write_alerts=False, restore=False, live_windows=False)
    st.on_stored(StoredBatch(cols, [], []))
    out = st.tick()
    assert [(t.rule, t.state, t.labels, t.to_row()["app"]) for t in out] == [
        ("Loop", "firing", {"app": "trip", "trace_id": "loop-1"}, "trip")]
    assert out[0].fingerprint == fingerprint("Loop", {"app": "trip", "trace_id": "loop-1"})
    assert out[0].value == 7.0  # every call up to the clock


# ----------------------------------------------------------------------------- summaries on chDB
_COLS = ["event_id", "timestamp", "app", "operation", "model", "trace_id", "conversation_id", "user_id",
         "agent_name", "tool_name", "status", "input_tokens", "output_tokens", "latency_ms", "cost_usd"]


def _rows() -> list[list[Any]]:
    """Trace A: agent span, 3 model calls (one error, one unpriced), 2 tool calls; trace B:
    one call in the same conversation; trace C: another conversation. Costs are binary
    fractions, so their sums are exact in float64."""
    def r(eid: str, t: int, op: str, model: str, trace: str, conv: str, agent: str = "", tool: str = "",
          status: str = "ok", tin: int | None = None, tout: int | None = None, lat: float = 100.0,
          cost: float | None = None) -> list[Any]:
        return [eid, ms_to_dt(T0 + t), "trip", op, model, trace, conv, "u1", agent, tool, status, tin, tout,
                lat, cost]
    return [
        r("a0", 0, "invoke_agent", "", "A", "c1", agent="planner", lat=9000.0),
        r("a1", 10, "chat", "gpt-4o", "A", "c1", agent="planner", tin=100, tout=20, lat=800.0, cost=0.125),
        r("a2", 900, "execute_tool", "", "A", "c1", agent="planner", tool="flight_search", lat=300.0),
        r("a3", 1300, "chat", "gpt-4o", "A", "c1", agent="planner", status="error", lat=50.0),
        r("a4", 1400, "execute_tool", "", "A", "c1", agent="booker", tool="book", lat=200.0),
        r("a5", 1700, "chat", "gpt-4o-mini", "A", "c1", agent="booker", tin=400, tout=80, lat=2000.0,
          cost=0.0625),
        r("b1", 60_000, "chat", "gpt-4o", "B", "c1", tin=10, tout=5, lat=500.0, cost=0.5),
        r("c1", 0, "chat", "gpt-4o", "C", "c2", tin=1, tout=1, lat=10.0, cost=0.25),
    ]


def test_trace_and_conversation_summaries_are_exact_under_replays(tmp_path: Path) -> None:
    """The views over llm_events FINAL on chDB, after a replay of trace A's calls (a
    second insert of the same rows): every figure equals the sum over the distinct calls,
    and the per-trace cost equals SQL's own sum of its calls. Mutations caught: a view
    without FINAL (calls 12 not 6, cost doubled), tool or agent spans counted as model
    calls, wall time from the last start instead of the last end, the NULL cost of an
    unpriced call making the sum NULL."""
    s = ClickHouseSink(f"chdb://{tmp_path / 'chdb'}")
    try:
        s.ensure_schema()
        rows = _rows()
        s.call(lambda c: c.insert("driftline.llm_events", rows, column_names=_COLS))
        s.call(lambda c: c.insert("driftline.llm_events", rows[:6], column_names=_COLS))  # the replay
        q = ("SELECT trace_id, conversation_id, calls, llm_calls, tool_calls, agent_spans, errors, input_tokens, "
             "output_tokens, cost_usd, unpriced_llm_calls, wall_ms, agents, tools, models "
             "FROM driftline.trace_summary ORDER BY trace_id")
        got = [tuple(r) for r in s.call(lambda c: c.query(q).result_rows)]
        assert got == [
            ("A", "c1", 6, 3, 2, 1, 1, 500, 100, 0.1875, 1, 9000.0, ["booker", "planner"],
             ["book", "flight_search"], ["gpt-4o", "gpt-4o-mini"]),
            ("B", "c1", 1, 1, 0, 0, 0, 10, 5, 0.5, 0, 500.0, [], [], ["gpt-4o"]),
            ("C", "c2", 1, 1, 0, 0, 0, 1, 1, 0.25, 0, 10.0, [], [], ["gpt-4o"]),
        ]
        by_sql = s.call(lambda c: c.query(
            "SELECT trace_id, sum(cost_usd) FROM driftline.llm_events FINAL GROUP BY trace_id ORDER BY trace_id"
        ).result_rows)
        assert [(t, c) for t, *_, c in [(g[0], g[9]) for g in got]] == [tuple(r) for r in by_sql]
        conv = s.call(lambda c: c.query(
            "SELECT conversation_id, traces, calls, llm_calls, tool_calls, cost_usd, wall_ms, agents "
            "FROM driftline.conversation_summary ORDER BY conversation_id").result_rows)
        assert [tuple(r) for r in conv] == [("c1", 2, 7, 4, 2, 0.6875, 60_500.0, ["booker", "planner"]),
                                            ("c2", 1, 1, 1, 0, 0.25, 10.0, [])]
    finally:
        s.close()


def test_a_store_from_before_the_agent_columns_is_upgraded_in_place(tmp_path: Path) -> None:
    """llm_events created without agent_name/agent_id/tool_name (the previous DDL):
    ensure_schema adds them where tables.sql has them, keeps the rows, and creates the
    views. Mutation caught: no ADD COLUMN (the view's CREATE fails), or the views created
    before the columns."""
    old = [st for st in ddl_statements("driftline")
           if not st.startswith("CREATE OR REPLACE VIEW")]
    for col in ("    agent_name LowCardinality(String),\n", "    agent_id String,\n",
                "    tool_name LowCardinality(String),\n"):
        old = [st.replace(col, "") for st in old]
    s = ClickHouseSink(f"chdb://{tmp_path / 'chdb'}")
    try:
        for st in old:
            s.call(lambda c, q=st: c.command(q))
        s.call(lambda c: c.insert("driftline.llm_events", [["x", ms_to_dt(T0), "trip", "t9"]],
                                  column_names=["event_id", "timestamp", "app", "trace_id"]))
        t0 = time.perf_counter()
        s.ensure_schema()
        s.ensure_schema()  # idempotent
        assert time.perf_counter() - t0 < 60
        names = [r[0] for r in s.call(lambda c: c.query(
            "SELECT name FROM system.columns WHERE database = 'driftline' AND table = 'llm_events' "
            "ORDER BY position").result_rows)]
        assert names[names.index("span_id"):names.index("span_id") + 4] == [
            "span_id", "agent_name", "agent_id", "tool_name"]
        assert s.call(lambda c: c.query("SELECT trace_id, calls, agents FROM driftline.trace_summary"
                                        ).result_rows) == [("t9", 1, [])]
    finally:
        s.close()


def test_tool_rows_follow_their_own_key_on_a_rebalance() -> None:
    """Tool and agent rows are keyed ``app/`` (model ''): after a rebalance their calls stay
    with the owner of that key, not with the owner of the app's newest event (what an alert
    without a model label follows). Mutations caught: the runaway state retained with the
    alerts' ``owned`` (model '' read as any model of the app), or ``exact`` ignored."""
    from driftline.streams.stages.alerting import _owner_of

    owner = _owner_of([("trip", "gpt-4o", ("llm.events", 0), T0 + 5), ("trip", "", ("llm.events", 1), T0 + 1)])
    assert (owner("trip", ""), owner("trip", "", True), owner("trip", "gpt-4o", True)) == (
        ("llm.events", 0), ("llm.events", 1), ("llm.events", 0))
    ev = AlertEvaluator(RUNAWAY)
    ev.observe_call(T0, "trip", "gpt-4o", {"trace_id": "t"})
    ev.observe_call(T0 + 1, "trip", "", {"trace_id": "t"}, operation="execute_tool")
    # this worker holds partition 1 only: the tool row's key, not the app's newest event
    ev.retain(lambda app, model: owner(app, model) == ("llm.events", 1),
              lambda app, model: owner(app, model, True) == ("llm.events", 1))
    assert ev.traces is not None
    assert ev.traces.value("trace_id", "t", "tool_calls.count", 60_000, T0 + 5) == (1.0, T0)
    assert ev.traces.value("trace_id", "t", "calls.count", 60_000, T0 + 5) == (1.0, T0)


def test_the_worker_option_caps_the_traces_tracked() -> None:
    """``driftline worker --alert-max-traces`` -> AlertingOptions -> the stage's tracker.
    Mutation caught: the option not passed on (the default 10,000 kept), no validation."""
    from prometheus_client import CollectorRegistry

    from driftline.streams.wiring import AlertingOptions, stage_factories

    st = stage_factories(alerting=AlertingOptions(max_traces=7))[0](CollectorRegistry())
    assert isinstance(st, AlertingStage) and st.evaluator.traces is not None
    assert st.evaluator.traces.max_groups == 7
    with pytest.raises(ValueError, match="max_traces must be >= 1, got 0"):
        AlertingOptions(max_traces=0)
