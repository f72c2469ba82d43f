"""Alerts that catch up: a lag fires and resolves the same alerts, at the same event times,
as the live stream; and the evaluator's per-key state stays bounded. Pure logic: the
window stage and the alerting stage are driven directly, the clock is the watermark."""

from __future__ import annotations

import textwrap

import numpy as np
from prometheus_client import CollectorRegistry

from driftline.schemas.rules import AlertTransition, parse_rules
from driftline.schemas.window_stats import WindowKey
from driftline.streams.ports import StagePorts
from driftline.streams.stages.alerting import AlertingStage
from driftline.streams.stages.rule_engine import AlertEvaluator
from driftline.streams.stages.windows import EventBatchColumns, WindowAggregator, WindowConfig
from driftline.streams.worker import StoredBatch

MIN = 60_000
T0 = 1_767_225_600_000  # 2026-01-01 00:00 UTC

RULES = parse_rules(textwrap.dedent("""\
    rules:
      - name: HighLatencyP99
        kind: threshold
        expr: "latency_ms.p99 > 2000"
        min_events: 20
        for: 2m
        resolve_below: 1500
      - name: GuardrailBlocked
        kind: ratio
        expr: "guardrail.blocked_rate > 0.2"
        min_events: 20
        for: 1m
        resolve_below: 0.05
      - name: AppSilent
        kind: absence
        absent_for: 5m
        group_by: [app]
    """))


def traffic(seed: int = 13) -> EventBatchColumns:
    """25 minutes, 1 call/s from each of chat, search and batch; chat's calls take 25 s in
    minutes [8, 12); every search call is blocked by a guardrail in minutes [15, 19); batch
    sends nothing in minutes [3, 15)."""
    rng = np.random.default_rng(seed)
    secs = np.arange(25 * 60)
    ts = np.repeat(T0 + secs * 1_000, 3)
    apps = np.tile(np.array(["chat", "search", "batch"]), secs.size)
    minute = (ts - T0) // MIN
    keep = ~((apps == "batch") & (minute >= 3) & (minute < 15))
    ts, apps, minute = ts[keep], apps[keep], minute[keep]
    lat = rng.uniform(80.0, 400.0, ts.size)
    lat[(apps == "chat") & (minute >= 8) & (minute < 12)] = 25_000.0 + rng.uniform(0, 500, 240)
    blocked = (apps == "search") & (minute >= 15) & (minute < 19)
    keys = [WindowKey(a, "gpt-4o") for a in apps.tolist()]
    n = ts.size
    z = np.zeros(n, np.int64)
    nan = np.full(n, np.nan)
    return EventBatchColumns(keys, ts.astype(np.int64), lat, nan, nan, np.zeros(n, bool), z, z, z, z, z,
                             np.full(n, 0.001), np.ones(n, bool), blocked, blocked, nan)


def take(c: EventBatchColumns, idx: np.ndarray) -> EventBatchColumns:
    return EventBatchColumns([c.keys[i] for i in idx.tolist()], *(getattr(c, f)[idx] for f in (
        "ts_ms", "latency_ms", "ttft_ms", "tpot_ms", "is_error", "input_tokens", "output_tokens",
        "cache_read_input_tokens", "cache_creation_input_tokens", "reasoning_output_tokens",
        "cost_usd", "guardrail_checked", "guardrail_hit", "guardrail_blocked", "feedback")))


def run(batches: list[EventBatchColumns], budget_s: float | None = None) -> list[AlertTransition]:
    """What the worker does per batch (window, close, hand over) and one alert tick after each
    (more while a catch-up stopped at its time budget)."""
    agg = WindowAggregator(WindowConfig(size_ms=MIN, allowed_lateness_ms=30_000))
    st = AlertingStage(RULES, write_alerts=False, clock=lambda: agg.watermark_ms,  # type: ignore[arg-type,return-value]
                       catch_up_budget_s=budget_s)
    st._ports = StagePorts.detached(windows=agg)  # what start() sets
    out: list[AlertTransition] = []
    for b in batches:
        agg.add(b)
        seen = {"app": [k.app for k in b.keys], "model": [k.model for k in b.keys], "timestamp": b.ts_ms}
        st.on_stored(StoredBatch(seen, agg.advance(), []))
        out += st.tick()
        while st.catching_up:
            out += st.tick()
    return out


def test_a_lag_fires_and_resolves_the_same_alerts_at_the_same_event_times_as_live() -> None:
    # Mutations caught: evaluating only at the clock (no boundary steps) makes the lag fire
    # nothing (all three incidents are over by the one evaluation at 25 min); reading the
    # newest event seen instead of the one seen by each boundary (_seen_at returning
    # _last_seen) hides batch's silence from the lag; stamping with the
    # evaluation time (event_time_stamps=False) moves every live timestamp off the
    # catch-up's by seconds; feeding all windows before the boundary evaluations makes the
    # catch-up read the future (the latency alert would resolve at once at 9 min).
    c = traffic()
    sec = (c.ts_ms - T0) // 5_000
    live = run([take(c, np.flatnonzero(sec == s)) for s in range(int(sec.max()) + 1)])  # 5 s batches
    lag = run([c])                                                                     # all at once

    def key(ts: list[AlertTransition]) -> list[tuple[str, str, str, int, int, float]]:
        # in event-time order (a catch-up evaluating at 16 min sends the 15 min resolve
        # after the 16 min firing: rule order within one evaluation)
        return sorted(((t.rule, t.state, t.labels["app"], t.ts_ms - T0, t.starts_at_ms - T0,
                        round(t.value, 6)) for t in ts), key=lambda k: (k[3], k[0]))

    expected = [
        ("AppSilent", "firing", "batch", 7 * MIN + 59_000, 7 * MIN + 59_000),  # last call 2:59 + 5m
        ("HighLatencyP99", "firing", "chat", 10 * MIN, 8 * MIN),     # pending from 8 min, for 2m
        ("HighLatencyP99", "resolved", "chat", 12 * MIN, 8 * MIN),
        ("AppSilent", "resolved", "batch", 15 * MIN, 7 * MIN + 59_000),        # its first call back
        ("GuardrailBlocked", "firing", "search", 16 * MIN, 15 * MIN),
        ("GuardrailBlocked", "resolved", "search", 19 * MIN, 15 * MIN),
    ]
    assert [k[:5] for k in key(live)] == expected
    assert [k[:5] for k in key(lag)] == expected
    # firing values of window rules too (both read the same window at the same boundary); a
    # live resolve reads the first 20 calls of the recovered window, the catch-up the whole
    # window; an absence value is the silence at the evaluation (300 s live, 301 s at 8 min)
    def fired(ks: list[tuple[str, str, str, int, int, float]]) -> list[float]:
        return [k[5] for k in ks if k[1] == "firing" and k[0] != "AppSilent"]

    assert fired(key(lag)) == fired(key(live))
    assert all(t.annotations.get("catch_up") == "true" for t in lag)
    assert not any("catch_up" in t.annotations for t in live)
    # a zero time budget: one boundary per tick, the rest on the next ticks; the same alerts.
    # Mutation caught: dropping the backlog (windows not yet fed) loses the later incidents.
    sliced = run([c], budget_s=0.0)
    assert key(sliced) == key(lag)
    assert all(t.annotations.get("catch_up") == "true" for t in sliced)


def test_catch_up_steps_are_counted_and_bounded() -> None:
    # A first tick at 1 s, then the rest at once: boundaries 1..24 min are crossed, 20 are
    # evaluated (the cap), the 4 oldest skipped. Mutation caught: without the cap
    # (n > max_catch_up_windows never true) 24 are evaluated and 0 skipped.
    c = traffic()
    agg = WindowAggregator(WindowConfig(size_ms=MIN, allowed_lateness_ms=30_000))
    reg = CollectorRegistry()
    st = AlertingStage(RULES, registry=reg, write_alerts=False, clock=lambda: agg.watermark_ms,  # type: ignore[arg-type,return-value]
                       max_catch_up_windows=20)
    st._ports = StagePorts.detached(windows=agg)
    first = np.flatnonzero(c.ts_ms < T0 + 2_000)
    agg.add(take(c, first))
    st.tick()                                               # clock at 1 s
    agg.add(take(c, np.flatnonzero(c.ts_ms >= T0 + 2_000)))
    st.on_stored(StoredBatch(None, agg.advance(), []))
    st.tick()                                               # clock at 24:59: 24 boundaries crossed
    assert reg.get_sample_value("driftline_alert_catch_up_evaluations_total", {"outcome": "evaluated"}) == 20
    assert reg.get_sample_value("driftline_alert_catch_up_evaluations_total", {"outcome": "skipped"}) == 4


ABSENCE = parse_rules(textwrap.dedent("""\
    rules:
      - name: AppSilent
        kind: absence
        absent_for: 10m
        group_by: [app]
    """))


def test_random_app_names_keep_the_evaluator_bounded_and_their_silence_alerts_resolve() -> None:
    # 50 app names seen once each, cap 10: exactly 10 kept, 40 evicted; 10 AppSilent fire;
    # 10 new names evict those 10, whose alerts resolve (no data) instead of firing for
    # ever. Mutation caught: without _cap the evaluator keeps 50 keys and fires 50 alerts.
    ev = AlertEvaluator(ABSENCE, event_time_stamps=True, max_keys=10)
    for i in range(50):
        ev.observe_event_seen(f"rnd-{i:02d}", "m", T0 + i)
    assert len(ev._last_seen) == 10 and ev.evicted == {"last_seen": 40}
    fired = ev.evaluate(T0 + 11 * MIN)
    assert sorted(t.labels["app"] for t in fired) == [f"rnd-{i:02d}" for i in range(40, 50)]
    assert {t.ts_ms - T0 for t in fired} == {10 * MIN + i for i in range(40, 50)}  # deadline, event time
    for i in range(10):
        ev.observe_event_seen(f"new-{i}", "m", T0 + 11 * MIN)
    out = ev.evaluate(T0 + 12 * MIN)
    assert sorted((t.state, t.labels["app"]) for t in out) == [("resolved", f"rnd-{i:02d}") for i in range(40, 50)]
    assert ev.evicted == {"last_seen": 50}
    assert ev.active_alerts() == [] and len(ev._alerts) == 0


def test_window_keys_of_the_evaluator_are_capped() -> None:
    from tests.unit.test_alerting import window  # the shared WindowStats builder

    ev = AlertEvaluator(RULES, max_keys=3)
    for i in range(7):
        ev.observe_window(window(0, app=f"a{i}"))
    assert sorted(k.app for k in ev._windows) == ["a4", "a5", "a6"]
    assert ev.evicted == {"windows": 4, "last_seen": 4}
