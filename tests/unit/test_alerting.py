"""AlertEvaluator state machine with an injected clock: exact transition times and values."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import yaml

from driftline.schemas.rules import (
    CostObservation,
    DriftObservation,
    RuleSet,
    fingerprint,
    parse_rules,
)
from driftline.schemas.window_stats import WindowStats
from driftline.streams.stages.rule_engine import (
    AlertEvaluator,
    default_rules_path,
    export_prometheus_rules,
)

MIN = 60_000


def rules(text: str) -> RuleSet:
    return parse_rules(textwrap.dedent(text))


def window(start_ms: int, *, app: str = "chat", model: str = "gpt-4o", pv: str = "", events: int = 100,
           p99: float = 500.0, errors: int = 0, cost: float = 0.0, tokens: int = 0,
           final: bool = True, length_ms: int = MIN) -> WindowStats:
    return WindowStats(
        window_start_ms=start_ms, window_end_ms=start_ms + length_ms, app=app, model=model,
        prompt_version=pv, events=events, errors=errors, late_events=0, latency_p50_ms=100.0,
        latency_p90_ms=200.0, latency_p95_ms=300.0, latency_p99_ms=p99, ttft_p50_ms=None,
        ttft_p95_ms=None, ttft_p99_ms=None, tpot_p50_ms=None, tpot_p95_ms=None,
        input_tokens=tokens, output_tokens=0, cache_read_input_tokens=0,
        cache_creation_input_tokens=0, reasoning_output_tokens=0, cost_usd=cost,
        unpriced_events=0, guardrail_checked_events=events, guardrail_hits=0, guardrail_blocked=0,
        feedback_events=0, negative_feedback=0, sketch_relative_accuracy=0.01, final=final)


LATENCY = """\
    rules:
      - name: Lat
        kind: threshold
        expr: "latency_ms.p99 > 2000"
        for: 2m
        resolve_below: 1500
        annotations: {summary: "p99 {value:.0f} > {threshold} on {app}/{model}"}
    """


def states(ts: list) -> list[tuple[int, str, float]]:
    return [(t.ts_ms, t.state, t.value) for t in ts]


def test_pending_for_duration_then_firing_then_hysteresis_resolve() -> None:
    ev = AlertEvaluator(rules(LATENCY))
    ev.observe_window(window(0, p99=2500))
    assert ev.evaluate(30_000) == []                     # pending since 30 s
    assert ev.pending_alerts() == [("Lat", {"app": "chat", "model": "gpt-4o"}, 30_000)]
    ev.observe_window(window(MIN, p99=2600, final=False))
    assert ev.evaluate(149_999) == []                    # 119.999 s < for
    fired = ev.evaluate(150_000)
    assert states(fired) == [(150_000, "firing", 2600.0)]
    t = fired[0]
    assert (t.starts_at_ms, t.ends_at_ms, t.severity) == (30_000, None, "warning")
    assert t.labels == {"app": "chat", "model": "gpt-4o"}
    assert t.fingerprint == fingerprint("Lat", {"app": "chat", "model": "gpt-4o"})
    assert t.annotations == {"summary": "p99 2600 > 2000 on chat/gpt-4o"}
    # A newer partial update of the same window replaces the older one: 1800 is in the
    # hysteresis band (below 2000, not below 1500) -> still firing.
    ev.observe_window(window(MIN, p99=1800, final=False))
    assert ev.evaluate(160_000) == []
    assert states(ev.active_alerts()) == [(160_000, "firing", 1800.0)]
    ev.observe_window(window(MIN, p99=1400, final=True))
    resolved = ev.evaluate(170_000)
    assert states(resolved) == [(170_000, "resolved", 1400.0)]
    assert (resolved[0].starts_at_ms, resolved[0].ends_at_ms) == (30_000, 170_000)
    assert ev.active_alerts() == []


def test_pending_that_recovers_never_fires() -> None:
    ev = AlertEvaluator(rules(LATENCY))
    ev.observe_window(window(0, p99=2500))
    assert ev.evaluate(10_000) == []
    ev.observe_window(window(0, p99=900))
    assert ev.evaluate(20_000) == []
    ev.observe_window(window(0, p99=2500))
    assert ev.evaluate(30_000) == []            # pending again from 30 s
    assert ev.evaluate(149_999) == []
    assert states(ev.evaluate(150_000)) == [(150_000, "firing", 2500.0)]


def test_resolve_after_and_stale_data() -> None:
    ev = AlertEvaluator(rules("""\
        rules:
          - name: Err
            kind: ratio
            expr: "errors.rate > 0.1"
            min_events: 10
            resolve_after: 1m
        """))
    ev.observe_window(window(0, errors=5, events=9))        # below min_events: ignored
    assert ev.evaluate(1_000) == []
    ev.observe_window(window(0, errors=5, events=20))
    assert states(ev.evaluate(2_000)) == [(2_000, "firing", 0.25)]
    ev.observe_window(window(0, errors=1, events=20))
    assert ev.evaluate(3_000) == []                         # resolving since 3 s
    assert ev.evaluate(62_999) == []
    assert states(ev.evaluate(63_000)) == [(63_000, "resolved", 0.05)]
    # Stale data: fires, then the window goes stale at end + 2 lengths = 180 s -> resolves.
    ev.observe_window(window(0, errors=10, events=20))
    assert states(ev.evaluate(100_000)) == [(100_000, "firing", 0.5)]
    assert ev.evaluate(179_999) == []
    assert ev.evaluate(180_000) == []                       # no data: resolving since 180 s
    assert states(ev.evaluate(240_000)) == [(240_000, "resolved", 0.5)]


def test_a_new_window_below_min_events_keeps_reading_the_previous_one() -> None:
    """No flapping at window boundaries: a breach that goes on stays firing, once."""
    ev = AlertEvaluator(rules("""\
        rules:
          - name: Lat
            kind: threshold
            expr: "latency_ms.p99 > 2000"
            min_events: 20
            resolve_below: 1500
        """))
    ev.observe_window(window(0, p99=3000, events=50, final=False))
    assert states(ev.evaluate(10_000)) == [(10_000, "firing", 3000.0)]
    ev.observe_window(window(MIN, p99=3100, events=3, final=False))    # just opened
    assert ev.evaluate(MIN + 1_000) == []
    assert states(ev.active_alerts()) == [(MIN + 1_000, "firing", 3000.0)]
    ev.observe_window(window(MIN, p99=3100, events=30, final=False))
    assert ev.evaluate(MIN + 5_000) == []
    assert states(ev.active_alerts()) == [(MIN + 5_000, "firing", 3100.0)]
    ev.observe_window(window(2 * MIN, p99=400, events=5, final=False))  # recovering, few events
    assert ev.evaluate(2 * MIN + 1_000) == []
    ev.observe_window(window(2 * MIN, p99=400, events=25, final=False))
    assert states(ev.evaluate(2 * MIN + 2_000)) == [(2 * MIN + 2_000, "resolved", 400.0)]
    # the previous window is read only while fresh: end + 2 lengths
    ev2 = AlertEvaluator(ev.rules)
    ev2.observe_window(window(0, p99=3000, events=50))
    ev2.observe_window(window(5 * MIN, p99=3000, events=2, final=False))
    assert ev2.evaluate(5 * MIN) == []


def test_out_of_order_window_updates_keep_the_newest() -> None:
    ev = AlertEvaluator(rules(LATENCY.replace("for: 2m", "for: 0s")))
    ev.observe_window(window(0, p99=2500, events=40, final=False))     # live read
    ev.observe_window(window(0, p99=900, events=30, final=False))      # older stored partial
    assert states(ev.evaluate(1_000)) == [(1_000, "firing", 2500.0)]
    ev.observe_window(window(0, p99=1000, events=45, final=True))      # the final row wins
    ev.observe_window(window(0, p99=2500, events=50, final=False))     # a partial after final: ignored
    assert states(ev.evaluate(2_000)) == [(2_000, "resolved", 1000.0)]


def test_absence_of_a_glob_app_and_of_a_literal_app_never_seen() -> None:
    ev = AlertEvaluator(rules("""\
        rules:
          - name: Silent
            kind: absence
            absent_for: 10m
            match: {app: "chat*"}
          - name: BillingSilent
            kind: absence
            absent_for: 5m
            match: {app: billing}
        """))
    ev.observe_event_seen("chat", "m1", 1_000)
    ev.observe_event_seen("chat", "m2", 50_000)
    ev.observe_event_seen("search", "m1", 0)               # not matched
    assert ev.evaluate(100_000) == []                       # BillingSilent expected from 100 s on
    assert states(ev.evaluate(400_000)) == [(400_000, "firing", 300.0)]  # billing: 300 s
    assert ev.evaluate(649_999) == []
    fired = ev.evaluate(650_000)
    assert [(t.rule, t.labels, t.value) for t in fired] == [("Silent", {"app": "chat"}, 600.0)]
    ev.observe_event_seen("chat", "m1", 655_000)
    ev.observe_event_seen("billing", "x", 655_000)
    out = ev.evaluate(660_000)
    assert sorted((t.rule, t.state, t.value) for t in out) == [
        ("BillingSilent", "resolved", 5.0), ("Silent", "resolved", 5.0)]


def test_budget_rolling_sum_exact() -> None:
    ev = AlertEvaluator(rules("""\
        rules:
          - name: Budget
            kind: budget
            expr: "cost_usd.sum > 10"
            window: 1h
            annotations: {summary: "{app} spent {value:.2f} (budget {threshold})"}
        """))
    ev.observe_window(window(0, cost=4.0))
    ev.observe_window(window(0, model="other", cost=1.5))
    ev.observe_window(window(30 * MIN, cost=3.0, final=False))
    ev.observe_window(window(30 * MIN, cost=4.0))           # replaces the partial 3.0
    assert ev.evaluate(59 * MIN) == []                      # 4 + 1.5 + 4 = 9.5
    ev.observe_window(window(59 * MIN, cost=0.75))
    fired = ev.evaluate(59 * MIN)
    assert states(fired) == [(59 * MIN, "firing", 10.25)]
    assert fired[0].labels == {"app": "chat"}
    assert fired[0].annotations == {"summary": "chat spent 10.25 (budget 10)"}
    # At exactly 60 min the windows starting at 0 leave (now - 1h, now].
    assert states(ev.evaluate(60 * MIN)) == [(60 * MIN, "resolved", 4.75)]


def test_budget_per_user_from_cost_observations() -> None:
    ev = AlertEvaluator(rules("""\
        rules:
          - name: UserBudget
            kind: budget
            expr: "cost_usd.sum >= 1"
            window: 24h
            group_by: [app, user_id]
            annotations: {summary: "{user_id} on {app}: {value}"}
        """))
    for i in range(8):
        ev.observe_cost(CostObservation(ts_ms=i * 1_000, app="chat", model="m", user_id="u1", cost_usd=0.125))
    ev.observe_cost(CostObservation(ts_ms=5_000, app="chat", model="m", user_id="u2", cost_usd=0.5))
    out = ev.evaluate(10_000)
    assert [(t.labels, t.value, t.annotations["summary"]) for t in out] == [
        ({"app": "chat", "user_id": "u1"}, 1.0, "u1 on chat: 1.0")]
    # Bucket [0, 60 s) leaves the 24 h window at exactly 24 h.
    assert states(ev.evaluate(24 * 60 * MIN)) == [(24 * 60 * MIN, "resolved", 1.0)]


def test_change_against_trailing_median() -> None:
    ev = AlertEvaluator(rules("""\
        rules:
          - name: Tokens
            kind: change
            metric: tokens.per_call
            increase_pct: 50
            baseline_windows: 3
            min_baseline_windows: 3
            annotations: {summary: "{value:.0f} vs median {baseline:.0f} (limit {threshold})"}
        """))
    # tokens.per_call = tokens / events (events=100)
    for i, per_call in enumerate([100, 900, 200, 300]):
        ev.observe_window(window(i * MIN, tokens=per_call * 100))
    ev.observe_window(window(4 * MIN, tokens=450 * 100, final=False))
    # baseline = median of the 3 newest final windows before 4 min: [900, 200, 300] -> 300
    assert ev.evaluate(4 * MIN + 1) == []                   # 450 is not > 450
    ev.observe_window(window(4 * MIN, tokens=451 * 100, final=False))
    out = ev.evaluate(4 * MIN + 2)
    assert states(out) == [(4 * MIN + 2, "firing", 451.0)]
    assert out[0].annotations == {"summary": "451 vs median 300 (limit 450)"}


def test_change_needs_min_baseline_windows() -> None:
    ev = AlertEvaluator(rules("""\
        rules:
          - name: Tokens
            kind: change
            metric: tokens.per_call
            increase_pct: 10
            baseline_windows: 5
            min_baseline_windows: 2
        """))
    ev.observe_window(window(0, tokens=100 * 100))
    ev.observe_window(window(MIN, tokens=1000 * 100, final=False))
    assert ev.evaluate(MIN + 1) == []                       # 1 baseline window < 2
    ev.observe_window(window(MIN, tokens=100 * 100))
    ev.observe_window(window(2 * MIN, tokens=111 * 100, final=False))
    assert states(ev.evaluate(2 * MIN + 1)) == [(2 * MIN + 1, "firing", 111.0)]


def test_drift_rule_reads_drift_observations() -> None:
    ev = AlertEvaluator(rules("""\
        rules:
          - name: PromptDrift
            kind: drift
            expr: "drift.p_value < 0.01"
            match: {field: prompt}
            resolve_above: 0.05
            annotations: {summary: "{field} drift {method} p={value} on {app}/{prompt_version}"}
          - name: AnyDrift
            kind: drift
            expr: "drift.drifted == true"
        """))

    def d(ts: int, p: float | None, drifted: bool, fld: str = "prompt") -> DriftObservation:
        return DriftObservation(ts, "chat", "m", "v2", fld, "mmd", 0.3, p, drifted)

    ev.observe_drift(d(1_000, 0.001, True))
    ev.observe_drift(d(1_000, 0.5, False, fld="response"))
    out = ev.evaluate(2_000)
    assert [(t.rule, t.value, t.labels) for t in out] == [
        ("PromptDrift", 0.001, {"app": "chat", "field": "prompt", "method": "mmd", "model": "m",
                                "prompt_version": "v2"}),
        ("AnyDrift", 1.0, {"app": "chat", "field": "prompt", "method": "mmd", "model": "m",
                           "prompt_version": "v2"}),
    ]
    assert out[0].annotations == {"summary": "prompt drift mmd p=0.001 on chat/v2"}
    ev.observe_drift(d(500, 0.9, False))                    # older result: ignored
    assert ev.evaluate(3_000) == []
    ev.observe_drift(d(4_000, 0.03, False))                 # in the band for PromptDrift
    assert states(ev.evaluate(5_000)) == [(5_000, "resolved", 0.0)]
    ev.observe_drift(d(6_000, 0.2, False))
    assert [(t.rule, t.state) for t in ev.evaluate(7_000)] == [("PromptDrift", "resolved")]


def test_static_labels_and_matching_on_environment() -> None:
    rs = rules("""\
        rules:
          - name: Lat
            kind: threshold
            expr: "latency_ms.p99 > 1000"
            match: {environment: prod, app: "chat"}
            labels: {team: llm}
        """)
    prod = AlertEvaluator(rs, static_labels={"environment": "prod"})
    dev = AlertEvaluator(rs, static_labels={"environment": "dev"})
    for ev in (prod, dev):
        ev.observe_window(window(0, p99=5000, pv="v1"))
    assert dev.evaluate(1) == []
    out = prod.evaluate(1)
    assert out[0].labels == {"app": "chat", "environment": "prod", "model": "gpt-4o",
                             "prompt_version": "v1", "team": "llm"}
    assert out[0].to_row()["app"] == "chat"


def test_state_round_trips_through_json() -> None:
    rs = rules(LATENCY)
    ev = AlertEvaluator(rs)
    ev.observe_window(window(0, p99=2500))
    ev.evaluate(0)
    ev.evaluate(120_000)                                   # firing
    ev2 = AlertEvaluator(rs)
    ev2.set_state(json.loads(json.dumps(ev.get_state())))
    assert [t.fingerprint for t in ev2.active_alerts()] == [t.fingerprint for t in ev.active_alerts()]
    ev2.observe_window(window(0, p99=1000))
    out = ev2.evaluate(130_000)
    assert states(out) == [(130_000, "resolved", 1000.0)]
    assert out[0].starts_at_ms == 0


def test_default_rules_exported_file_is_up_to_date() -> None:
    from driftline.schemas.rules import load_rules

    text, skipped = export_prometheus_rules(load_rules(default_rules_path()))
    path = Path(__file__).parents[2] / "deploy" / "prometheus" / "driftline-rules.yml"
    assert path.read_text() == text, (
        "regenerate: python -m driftline.streams.stages.rule_engine export-prometheus "
        "streams/stages/default_rules.yaml > deploy/prometheus/driftline-rules.yml")
    runaway = [r for r in load_rules(default_rules_path()) if r.kind == "runaway"]
    assert skipped == [f"{r.name}: stream-only (runaway rule): per {r.group_by[0]}, which is not a "
                       "Prometheus label" for r in runaway]
    doc = yaml.safe_load(text)
    names = [r["alert"] for r in doc["groups"][0]["rules"]]
    assert names == [r.name for r in load_rules(default_rules_path()) if r.kind != "runaway"]


def test_export_translates_kinds_and_lists_what_cannot_be_expressed() -> None:
    rs = rules("""\
        rules:
          - name: Guard
            kind: ratio
            expr: "guardrail.hit_rate > 0.2"
            match: {app: "chat-*", model: gpt-4o}
            annotations: {summary: "{value:.1%} {app} {threshold}"}
          - name: UserBudget
            kind: budget
            expr: "cost_usd.sum > 1"
            window: 1h
            group_by: [user_id]
          - name: PerVersion
            kind: threshold
            expr: "latency_ms.p99 > 1"
            match: {prompt_version: v2}
          - name: Tpot
            kind: threshold
            expr: "tpot_ms.p95 > 1"
        """)
    text, skipped = export_prometheus_rules(rs, rate_window="1m")
    assert skipped == [
        "UserBudget: per-user budget: user_id is not a Prometheus label",
        "PerVersion: matches prompt_version, which only drift metrics carry as a label",
        "Tpot: tpot_ms.p95 has no counterpart in the worker's /metrics",
    ]
    (rule,) = yaml.safe_load(text)["groups"][0]["rules"]
    assert rule == {
        "alert": "Guard",
        "expr": '(sum by (app, model) (rate(driftline_guardrail_hits_total{app=~"chat-.*", model="gpt-4o"}[1m])) '
                '/ sum by (app, model) (rate(driftline_events_total{app=~"chat-.*", model="gpt-4o"}[1m]))) > 0.2',
        "labels": {"severity": "warning"},
        "annotations": {"summary": "{{ $value | humanizePercentage }} {{ $labels.app }} 0.2"},
    }
