"""AlertingStage without I/O: what it feeds the evaluator, its clock, its counters."""

from __future__ import annotations

import textwrap
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from driftline.schemas.rules import DriftObservation, parse_rules
from driftline.schemas.window_stats import WindowKey
from driftline.streams.ports import StagePorts
from driftline.streams.sinks.notifiers import InMemoryNotifier
from driftline.streams.stages.alerting import (
    ALERT_COLUMNS,
    AlertingStage,
    alerting_stage,
    build_notifiers,
)
from driftline.streams.stages.windows import EventBatchColumns, WindowAggregator, WindowConfig
from driftline.streams.worker import StoredBatch

RULES = parse_rules(textwrap.dedent("""\
    rules:
      - name: UserBudget
        kind: budget
        expr: "cost_usd.sum > 1.0"
        window: 1h
        group_by: [app, user_id]
      - name: Silent
        kind: absence
        absent_for: 30s
      - name: PromptDrift
        kind: drift
        expr: "drift.p_value < 0.01"
        match: {field: prompt}
      - name: Lat
        kind: threshold
        expr: "latency_ms.p99 > 2000"
    """))


def events(ts: list[int], users: list[str], costs: list[float | None], app: str = "chat") -> dict[str, list[Any]]:
    n = len(ts)
    return {"timestamp": ts, "app": [app] * n, "model": ["m"] * n, "user_id": users, "cost_usd": costs}


def test_stage_feeds_costs_event_times_and_drift_and_counts() -> None:
    now = {"ms": 100_000}
    reg = CollectorRegistry()
    mem = InMemoryNotifier()
    st = AlertingStage(RULES, registry=reg, notifiers=[mem], write_alerts=False,
                       clock=lambda: now["ms"])
    cols = events([90_000, 95_000, 99_000], ["u1", "u1", None], [0.6, 0.5, None])  # type: ignore[list-item]
    # as the worker hands them over: numpy timestamps, float64 costs with NaN = unpriced
    cols["timestamp"] = np.asarray(cols["timestamp"], np.int64)
    cols["cost_usd"] = np.asarray([0.6, 0.5, np.nan])
    st.on_stored(StoredBatch(cols, [], []))
    st.observe_drift(DriftObservation(99_000, "chat", "m", "v1", "prompt", "mmd", 0.4, 0.001, True))
    out = st.tick()
    assert [(t.rule, t.state, t.labels, t.value) for t in out] == [
        ("UserBudget", "firing", {"app": "chat", "user_id": "u1"}, 1.1),
        ("PromptDrift", "firing", {"app": "chat", "field": "prompt", "method": "mmd", "model": "m",
                                   "prompt_version": "v1"}, 0.001),
    ]
    now["ms"] = 99_000 + 30_000                        # chat silent for 30 s
    assert [(t.rule, t.labels, t.value) for t in st.tick()] == [("Silent", {"app": "chat"}, 30.0)]
    assert reg.get_sample_value("driftline_alert_transitions_total",
                                {"rule": "Silent", "state": "firing"}) == 1.0
    assert reg.get_sample_value("driftline_alerts_firing", {"rule": "UserBudget", "severity": "warning"}) == 1.0
    assert reg.get_sample_value("driftline_alerts_firing", {"rule": "Lat", "severity": "warning"}) == 0.0
    assert reg.get_sample_value("driftline_alert_evaluations_total") == 2.0
    assert [t.rule for t in st.transitions] == ["UserBudget", "PromptDrift", "Silent"]
    # the log notifier is always there, next to the given ones
    assert [n.name for n in st.notifiers] == ["memory", "log"]
    assert set(out[0].to_row()) == set(ALERT_COLUMNS)


def _cols(ts: list[int], latency: list[float]) -> EventBatchColumns:
    n = len(ts)
    k = WindowKey("chat", "m")
    z = np.zeros(n, np.int64)
    nan = np.full(n, np.nan)
    f = np.zeros(n, bool)
    return EventBatchColumns([k] * n, np.asarray(ts, np.int64), np.asarray(latency, float), nan, nan,
                             f, z, z, z, z, z, np.full(n, 0.01), f, f, f, nan)


def test_live_windows_are_read_without_touching_the_workers_partial_rows() -> None:
    agg = WindowAggregator(WindowConfig(size_ms=60_000))
    st = AlertingStage(RULES, write_alerts=False)
    st._ports = StagePorts.detached(windows=agg)  # what start() sets, without the tasks
    assert st.now_ms() is None and st.tick() == []      # nothing seen: no clock, no evaluation
    agg.add(_cols([1_000, 2_000], [100.0, 5_000.0]))
    out = st.tick()
    assert [t.rule for t in out] == ["Lat"]
    assert out[0].value == pytest.approx(5_000.0, rel=0.02)   # sketch accuracy 1%
    # the worker's own partial rows still see the window as changed
    assert [w.events for w in agg.partial()] == [2]
    # the clock is the watermark, then follows wall time, never back
    t1 = st.now_ms()
    assert t1 is not None and t1 >= 2_000
    agg.watermark_ms = 1_500
    assert st.now_ms() >= t1  # type: ignore[operator]


def test_factories_build_named_notifiers() -> None:
    ns = build_notifiers(webhooks=["http://a/h", "http://b/h"], slack_webhooks=["http://s/h"],
                         alertmanagers=["http://am:9093/"])
    assert [n.name for n in ns] == ["webhook", "webhook-2", "slack", "alertmanager"]
    reg = CollectorRegistry()
    st = alerting_stage(None, webhooks=["http://a/h"], eval_interval_s=0.5)(reg)
    assert len(st.rules) == 15 and st.eval_interval_s == 0.5        # the shipped default rules
    assert [n.name for n in st.notifiers] == ["webhook", "log"]


def test_restore_query_prefers_resolved_on_a_tie(tmp_path: Any) -> None:
    """Rows of the real alerts DDL in chDB: an alert fired and resolved at the same event-time
    millisecond is not restored as firing; one firing at its latest ts is. Mutation caught:
    ``argMax(state, ts)`` (the tie went to 'firing' in a SIGKILL fault run, and the restarted
    worker resolved and notified the alert a second time)."""
    import datetime as dt

    from driftline.streams.sinks.clickhouse import ClickHouseSink, ddl_statements
    from driftline.streams.stages.alerting import restore_query

    sink = ClickHouseSink(f"chdb://{tmp_path / 'chdb'}")
    try:
        for stmt in ddl_statements("driftline"):
            sink.call(lambda c, s=stmt: c.command(s))
        t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        t1 = t0 + dt.timedelta(seconds=5)
        cols = ["ts", "rule", "state", "severity", "app", "model", "value", "labels", "annotations", "fingerprint"]

        def row(ts: dt.datetime, state: str, fp: str) -> list[Any]:
            return [ts, "R", state, "warning", "a", "m", 1.0, {}, {}, fp]

        # the tie written firing-then-resolved and resolved-then-firing, in separate inserts
        for rows in ([row(t0, "firing", "tie1"), row(t1, "firing", "tie1")], [row(t1, "resolved", "tie1")],
                     [row(t1, "resolved", "tie2")], [row(t1, "firing", "tie2")],
                     [row(t0, "firing", "open"), row(t0, "resolved", "open"), row(t1, "firing", "open")]):
            sink.call(lambda c, rs=rows: c.insert("driftline.alerts", rs, column_names=cols))
        got = sink.call(lambda c: c.query(restore_query("driftline")).result_rows)
        assert [(r[0], r[1], r[2], r[6]) for r in got] == [("R", "open", "firing", int(t1.timestamp() * 1000))]
    finally:
        sink.close()


def test_stage_clock_stands_still_while_the_worker_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage clock follows the watermark plus the wall time since it last moved, except
    while the worker is cut off from Kafka (or held behind the writer): then it stands still,
    and afterwards goes on from where it stood. Mutation caught: extrapolating while held (a
    Kafka cut then resolved alerts for lack of data and the backlog fired them again at
    earlier event times: a transition recorded twice in the Kafka-cut fault test)."""
    from types import SimpleNamespace

    from driftline.streams.ports import StagePorts
    from driftline.streams.stages import alerting as mod

    wall = {"t": 100.0}
    held = {"v": False}
    monkeypatch.setattr(mod.time, "monotonic", lambda: wall["t"])

    class Agg:  # the two things the window view reads
        watermark_ms = 1_000_000
        config = SimpleNamespace(size_ms=60_000)

    st = AlertingStage(RULES, write_alerts=False)
    st._ports = StagePorts.detached(windows=Agg(), held=lambda: held["v"])  # type: ignore[arg-type]
    assert st.now_ms() == 1_000_000
    wall["t"] += 5
    assert st.now_ms() == 1_005_000              # 5 s of wall time with Kafka answering
    held["v"] = True
    wall["t"] += 60
    assert st.now_ms() == 1_005_000              # a minute cut off: event time stands still
    held["v"] = False
    wall["t"] += 2
    assert st.now_ms() == 1_007_000              # and goes on from there, not from +67 s


def test_a_full_alert_row_queue_drops_the_oldest_row_and_counts_it() -> None:
    """Rows for the alerts table wait in the stage's BatchProcessor (drop_oldest): with room
    for 2, the third transition drops the first row. Mutations caught: dropping the newest
    row, a drop not counted in ``driftline_alert_rows_total{outcome="dropped"}``."""
    now = {"ms": 100_000}
    reg = CollectorRegistry()
    st = AlertingStage(RULES, registry=reg, notifiers=[InMemoryNotifier()], max_pending_rows=2,
                       clock=lambda: now["ms"])
    st.on_stored(StoredBatch(events([90_000, 95_000], ["u1", "u1"], [0.6, 0.5]), [], []))
    st.observe_drift(DriftObservation(99_000, "chat", "m", "v1", "prompt", "mmd", 0.4, 0.001, True))
    assert len(st.tick()) == 2
    now["ms"] = 95_000 + 30_000
    assert [t.rule for t in st.tick()] == ["Silent"]
    assert [r["rule"] for r in st._rows.queued()] == ["PromptDrift", "Silent"]
    assert reg.get_sample_value("driftline_alert_rows_total", {"outcome": "dropped"}) == 1.0
    assert reg.get_sample_value("driftline_alert_rows_total", {"outcome": "written"}) == 0.0
    assert st.rows_written == 0
