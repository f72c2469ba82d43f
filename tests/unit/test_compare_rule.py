"""The ``compare`` alert rule kind without a store: its validation (exact messages), the
fire / resolve / never-on-"cannot tell" logic on seeded arms through the gate's own code
(streams/cli/compare.py) and the evaluator's state machine, which worker runs a rule,
and the stage's schedule (once per interval, a failed query counted, the state kept)."""

from __future__ import annotations

import asyncio
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from driftline.detectors.sequential import MeanStats
from driftline.schemas.comparison import CompareSpec
from driftline.schemas.rules import check_rules_text, fingerprint, parse_rules
from driftline.streams.cli.compare import ArmData, gate
from driftline.streams.ports import KafkaPort, StagePorts, TableWriter, WindowView
from driftline.streams.sinks.clickhouse import ClickHouseSink, ddl_statements
from driftline.streams.sinks.prometheus import WorkerMetrics
from driftline.streams.stages.alerting import AlertingStage
from driftline.streams.stages.compare_rule import compare_inputs, owner_partition, reading
from driftline.streams.stages.drift_references import ms_to_dt
from driftline.streams.stages.rule_engine import AlertEvaluator

NOW = 1_800_000_000_000
RULES = parse_rules(textwrap.dedent("""\
    rules:
      - name: V5Worse
        kind: compare
        baseline: {prompt_version: v4}
        candidate: {prompt_version: v5}
        app: chat
        max_p95_increase: 10%
        max_error_rate_increase: 0.02
        min_samples: 200
        lookback: 2h
        interval: 30s
    """))
RULE = RULES.rules[0]
LABELS = {"app": "chat", "baseline": "prompt_version=v4", "candidate": "prompt_version=v5"}


def test_a_valid_rule_and_its_gate_inputs() -> None:
    assert RULE.compare == CompareSpec((("prompt_version", "v4"),), (("prompt_version", "v5"),),
                                       (("max_p95_increase", 0.1), ("max_error_rate_increase", 0.02)),
                                       app="chat", min_samples=200, alpha=0.05, lookback_ms=7_200_000,
                                       since_ms=None, interval_ms=30_000)
    cfg, criteria = compare_inputs(RULE.compare, NOW)
    assert (cfg.since_ms, cfg.until_ms, cfg.alpha, cfg.min_samples) == (NOW - 7_200_000, NOW, 0.05, 200)
    assert cfg.common.labels == (("app", "chat"),)
    # the same criteria `driftline gate --max-p95-increase 10% --max-error-rate-increase 0.02` builds
    assert [(c.option, c.metric, c.kind, c.limit) for c in criteria] == [
        ("--max-p95-increase", "latency_p95_ms", "relative", 0.1),
        ("--max-error-rate-increase", "error_rate", "increase", 0.02)]
    fixed = parse_rules("rules:\n  - {name: F, kind: compare, baseline: {model: a}, candidate: {model: b},\n"
                        "     max_cost_increase: 5%, since: 2026-11-01T00:00:00Z}\n").rules[0].compare
    assert fixed is not None and (fixed.since_ms, fixed.lookback_ms, fixed.min_samples, fixed.interval_ms) == (
        1_793_491_200_000, None, 500, 60_000)
    assert fixed.start_ms(NOW) == 1_793_491_200_000


def test_validation_messages() -> None:
    text = textwrap.dedent("""\
        rules:
          - name: Bad
            kind: compare
            baseline: {prompt_versio: v4}
            candidate: {prompt_version: v5}
            max_p95_increase: ten%
            max_guardrail_rate: 150%
            alpha: 1
            since: 2026-11-29T10:00:00Z
            lookback: 1h
            interval: 500ms
            resolve_below: 1
          - name: Same
            kind: compare
            baseline: {model: a, app: x}
            candidate: {app: x, model: a}
          - name: Missing
            kind: compare
            candidate: []
            max_cost_increase: -5%
            since: yesterday
            labels: {baseline: x}
            annotations: {summary: "{failing} {n_candidate:.0f} {nope}"}
        """)
    assert [str(e) for e in check_rules_text(text)] == [
        "line 4: rule 'Bad', field 'baseline': unknown label 'prompt_versio' (labels: prompt_version, model, "
        "environment, app, provider, request_model, response_model, operation)",
        "line 6: rule 'Bad', field 'max_p95_increase': expected a percentage like 10% (or a fraction like 0.1), "
        "got 'ten%'",
        "line 7: rule 'Bad', field 'max_guardrail_rate': a rate limit must be at most 100%, got '150%'",
        "line 8: rule 'Bad', field 'alpha': must be in (0, 1), got 1",
        "line 9: rule 'Bad', field 'since': give lookback (sliding) or since (a fixed start), not both",
        "line 11: rule 'Bad', field 'interval': must be at least 1s, got '500ms'",
        "line 12: rule 'Bad', field 'resolve_below': a compare rule has no fixed threshold; use resolve_after",
        "line 14: rule 'Same', field 'kind': a compare rule needs at least one criterion (max_p95_increase, "
        "max_p50_increase, max_latency_increase, max_ttft_increase, max_cost_increase, max_tokens_increase, "
        "max_error_rate_increase, max_negative_feedback_increase, max_guardrail_rate)",
        "line 16: rule 'Same', field 'candidate': is the same filter as baseline: the two populations must differ",
        "line 17: rule 'Missing', field 'baseline': is required (a mapping of label: value, e.g. "
        "{prompt_version: v4})",
        "line 19: rule 'Missing', field 'candidate': must be a non-empty mapping of label: value, got []",
        "line 20: rule 'Missing', field 'max_cost_increase': must be >= 0, got '-5%'",
        "line 21: rule 'Missing', field 'since': must be an RFC 3339 time like 2026-11-29T10:00:00Z, "
        "got 'yesterday'",
        "line 22: rule 'Missing', field 'labels': label 'baseline' is reserved or not a valid label name",
        "line 23: rule 'Missing', field 'annotations': summary: unknown placeholder {nope} (known: value, "
        "threshold, rule, severity, metric, app, environment, baseline, candidate, failing, n_baseline, "
        "n_candidate)",
    ]


def _arm(latency: np.ndarray, errors: int) -> ArmData:
    """An arm's numbers as the store's queries give them: mean stats, rates, and every order
    statistic of the latencies (TTFT absent)."""
    n = latency.size
    s = np.sort(latency)
    means = {"latency_ms": MeanStats(n, float(latency.mean()), float(latency.var(ddof=1))),
             "ttft_ms": MeanStats(0, 0.0, 0.0), "tokens": MeanStats(0, 0.0, 0.0), "cost_usd": MeanStats(0, 0.0, 0.0)}
    return ArmData(n, means, {"errors": (errors, n), "guardrail_hits": (0, 0), "negative_feedback": (0, 0)},
                   {"latency_ms": {k: float(s[k - 1]) for k in range(1, n + 1)}, "ttft_ms": {}})


def _reading(seed: int, n_base: int, n_cand: int, factor: float, at_ms: int) -> tuple[int, object]:
    """A seeded A/B: log-normal latencies (the candidate's times ``factor``), 2% errors each;
    the gate's verdict on them as a reading of the rule."""
    rng = np.random.default_rng(seed)
    b = rng.lognormal(np.log(800), 0.5, n_base)
    c = rng.lognormal(np.log(800), 0.5, n_cand) * factor
    assert RULE.compare is not None
    cfg, criteria = compare_inputs(RULE.compare, at_ms)
    code, results = gate(_arm(b, n_base // 50), _arm(c, n_cand // 50), criteria, cfg)
    return code, reading(RULE.name, at_ms, code, results, n_base, n_cand)


def test_fires_on_a_worse_candidate_resolves_when_no_criterion_fails_never_on_cannot_tell() -> None:
    ev = AlertEvaluator(RULES, event_time_stamps=True, static_labels={"environment": "prod"})
    labels = {**LABELS, "environment": "prod"}
    assert ev.evaluate(NOW) == []  # compare rules are not stepped by the stream's evaluation
    # A/A (seeded): the gate cannot tell or holds -> never fires
    code, r = _reading(1, 3000, 3000, 1.0, NOW)
    assert code != 1
    assert ev.observe_compare(r) == []  # type: ignore[arg-type]
    # too few calls of a much slower candidate: "cannot tell yet" -> still nothing
    code, r = _reading(2, 3000, 150, 2.0, NOW + 10)
    assert code == 2
    assert ev.observe_compare(r) == []  # type: ignore[arg-type]
    # the candidate 50% slower with enough calls: p95 fails with confidence, errors do not
    code, r = _reading(3, 3000, 3000, 1.5, NOW + 20)
    assert code == 1
    (t,) = ev.observe_compare(r)  # type: ignore[arg-type]
    assert (t.state, t.rule, t.labels, t.value, t.ts_ms) == ("firing", "V5Worse", labels, 1.0, NOW + 20)
    assert t.fingerprint == fingerprint("V5Worse", labels)
    assert t.annotations["metrics"] == "latency_p95_ms"
    assert t.annotations["summary"].startswith(
        "prompt_version=v5 worse than prompt_version=v4 on chat: latency_p95_ms: candidate <= 1.1 x baseline: "
        "FAILS (interval [")
    assert ev.evaluate(NOW + 22) == []  # held: one firing per alert
    assert ev.observe_compare(_reading(3, 3000, 3000, 1.5, NOW + 21)[1]) == []  # type: ignore[arg-type]
    # an older reading (a slow query finishing late) changes nothing
    assert ev.observe_compare(_reading(1, 3000, 3000, 1.0, NOW + 5)[1]) == []  # type: ignore[arg-type]
    # later the candidate's calls in the range say "cannot tell": resolved (nothing fails any more)
    code, r = _reading(4, 3000, 150, 1.5, NOW + 30)
    assert code == 2
    (t,) = ev.observe_compare(r)  # type: ignore[arg-type]
    assert (t.state, t.ts_ms, t.annotations["failing"]) == ("resolved", NOW + 30, "")


def test_a_restored_alert_keeps_its_state_until_a_reading() -> None:
    ev = AlertEvaluator(RULES, event_time_stamps=True)
    fp = fingerprint("V5Worse", LABELS)
    assert ev.restore_alert("V5Worse", fp, LABELS, {}, 1.0, NOW)
    assert ev.evaluate(NOW + 60_000) == []  # no reading (query running or failed): not "no data"
    assert ev.observe_compare(_reading(3, 3000, 3000, 1.5, NOW + 90_000)[1]) == []  # type: ignore[arg-type]
    (t,) = ev.observe_compare(_reading(1, 3000, 3000, 1.0, NOW + 120_000)[1])  # type: ignore[arg-type]
    assert (t.state, t.fingerprint) == ("resolved", fp)
    # ownership moves: state dropped without a transition
    ev.restore_alert("V5Worse", fp, LABELS, {}, 1.0, NOW)
    assert ev.retain_rules(lambda rule: False) == [("V5Worse", fp)]
    assert ev.evaluate(NOW + 130_000) == []


def test_exactly_one_worker_runs_each_rule() -> None:
    names = [f"Rule{i}" for i in range(12)]
    assert [owner_partition(n, 1) for n in names] == [0] * 12
    # crc32 of the name: the same in every process and Python version (workers must agree)
    assert [owner_partition(n, 3) for n in names] == [1, 0, 0, 0, 1, 1, 0, 0, 2, 0, 0, 1]
    rules = parse_rules("rules:\n" + "".join(
        f"  - {{name: {n}, kind: compare, baseline: {{model: a}}, candidate: {{model: b}}, max_p95_increase: 5%}}\n"
        for n in names))

    async def owned(parts: set[int], topics: tuple[str, ...] = ("llm.events", "otlp_spans")) -> set[str]:
        st = AlertingStage(rules, restore=False, partition_counter=lambda topic: {"llm.events": 3}[topic])
        st._ports = replace(StagePorts.detached(), topics=topics)
        return await st._compare_ownership({("llm.events", p) for p in parts} | {("otlp_spans", 0)})

    async def main() -> None:
        workers = [await owned({0}), await owned({1}), await owned({2})]
        assert [len(w) for w in workers] == [7, 4, 1]
        assert set().union(*workers) == set(names) and sum(map(len, workers)) == 12
        assert await owned({0, 1, 2}) == set(names)  # one worker: all of them
        assert await owned(set()) == set()  # only OTLP partitions: none

    asyncio.run(main())


def test_the_stage_runs_a_rule_once_per_interval_and_counts_a_failed_query() -> None:
    async def main() -> None:
        reg = CollectorRegistry()
        st = AlertingStage(RULES, registry=reg, restore=False, write_alerts=False, clock=lambda: NOW)
        await st.start(StagePorts.detached())  # no ClickHouse: every query raises
        try:
            fp = fingerprint("V5Worse", LABELS)
            st.evaluator.restore_alert("V5Worse", fp, LABELS, {}, 1.0, NOW)
            st.compare_owned = {"V5Worse"}
            for _ in range(5):
                st.tick()
                await asyncio.sleep(0.05)
            get = lambda o: reg.get_sample_value("driftline_alert_compare_runs_total",  # noqa: E731
                                                 {"rule": "V5Worse", "outcome": o})
            assert (get("failed"), get("ok")) == (1.0, 0.0)  # 5 ticks within the 30 s interval: one run
            assert [a.fingerprint for a in st.evaluator.active_alerts()] == [fp]  # still firing
            assert list(st.transitions) == []
        finally:
            await st.stop()

    asyncio.run(main())


def test_prometheus_export_leaves_it_out() -> None:
    from driftline.streams.stages.rule_engine import export_prometheus_rules

    out = export_prometheus_rules(RULES)
    assert "V5Worse" not in out


def test_a_compare_alert_is_recorded_once_across_a_rebalance_and_a_restart(tmp_path: Path) -> None:
    """Against a real chDB store: worker A (partitions 0 and 1 of 2) runs V5Worse (its owner
    partition is 1) on stored calls where v5 is twice as slow, and records "firing". The
    rule's partition moves to B: A drops the alert without a transition, B restores it as
    firing from the ``alerts`` table and, running the rule on the same calls, records
    nothing; C (B restarted) does the same. Mutation caught: restoring compare alerts by
    their app's key owner (the chat calls are on partition 0, which stays with A) instead
    of the rule's owner: B fires a second time."""
    rule = parse_rules(textwrap.dedent("""\
        rules:
          - name: V5Worse
            kind: compare
            baseline: {prompt_version: v4}
            candidate: {prompt_version: v5}
            app: chat
            max_latency_increase: 10%
            min_samples: 30
            lookback: 1h
            interval: 1s
        """))
    assert owner_partition("V5Worse", 2) == 1
    sink = ClickHouseSink(f"chdb://{tmp_path / 'chdb'}")
    for stmt in ddl_statements("driftline"):
        sink.call(lambda c, q=stmt: c.command(q))
    rng = np.random.default_rng(5)
    rows = [[f"{v}-{i}", ms_to_dt(NOW - 600_000 + i * 1000), "chat", "m", v,
             float(rng.uniform(100, 200)) * (2 if v == "v5" else 1), "llm.events", 0, j * 40 + i]
            for j, v in enumerate(("v4", "v5")) for i in range(40)]
    sink.call(lambda c: c.insert("driftline.llm_events", rows, column_names=[
        "event_id", "timestamp", "app", "model", "prompt_version", "latency_ms", "source_topic",
        "source_partition", "source_offset"]))
    tp0, tp1 = TopicPartition("llm.events", 0), TopicPartition("llm.events", 1)

    async def worker(parts: list[TopicPartition]) -> AlertingStage:
        st = AlertingStage(rule, registry=CollectorRegistry(), restore_grace_s=0, clock=lambda: NOW,
                           partition_counter=lambda topic: 2)
        await st.start(StagePorts(tables=TableWriter(sink, ("alerts",)), metrics=WorkerMetrics(CollectorRegistry()),
                                  windows=WindowView(lambda: None), kafka=KafkaPort(""), topics=("llm.events",)))
        await st.on_assigned(parts)
        return st

    async def run(st: AlertingStage) -> list[tuple[str, str]]:
        """Tick until the rule ran once more (its reading evaluated)."""
        before = st.m.compare_runs.labels("V5Worse", "ok")._value.get()
        st._cmp_next.clear()
        out = st.tick()
        for _ in range(200):
            await asyncio.sleep(0.02)
            if st.m.compare_runs.labels("V5Worse", "ok")._value.get() > before and not st._inbox:
                break
            out += st.tick()
        out += st.tick()
        return [(t.rule, t.state) for t in out]

    def alert_rows() -> list[tuple[str, str]]:
        return [tuple(r) for r in sink.call(lambda c: c.query(  # type: ignore[misc]
            "SELECT rule, state FROM driftline.alerts ORDER BY ts").result_rows)]

    async def main() -> None:
        a = await worker([tp0, tp1])
        assert a.compare_owned == {"V5Worse"}
        assert await run(a) == [("V5Worse", "firing")]
        await a.on_revoked()
        await a.on_assigned([tp0])              # partition 1 moved to B
        assert a.compare_owned == set() and a.evaluator.active_alerts() == []
        assert a.tick() == []
        b = await worker([tp1])
        assert b.compare_owned == {"V5Worse"}
        assert [t.rule for t in b.evaluator.active_alerts()] == ["V5Worse"]  # restored
        assert await run(b) == []                # still failing: not fired again
        await b.stop()
        c = await worker([tp1])                  # B restarted
        assert await run(c) == []
        for st in (a, c):
            await st.stop()
        assert alert_rows() == [("V5Worse", "firing")]

    try:
        asyncio.run(main())
    finally:
        sink.close()


def test_a_rule_whose_since_is_still_ahead_waits_without_a_query() -> None:
    """A rule written before the rollout (``since`` later than now) made CompareConfig raise
    "--until must be after --since" at every run: a warning "the gate's queries failed" and
    a failed run counted every interval until the rollout. It reads "cannot tell yet" (exit
    2, no calls) without querying the store. Mutation caught: no check (ValueError)."""
    from driftline.streams.stages.compare_rule import evaluate

    ahead = parse_rules("rules:\n  - {name: F, kind: compare, baseline: {model: a}, candidate: {model: b},\n"
                        "     max_cost_increase: 5%, since: 2027-02-01T00:00:00Z}\n").rules[0]
    asked: list[str] = []

    def run(sql: str, params: dict[str, object]) -> bytes:
        asked.append(sql)
        return b""

    assert ahead.compare is not None and ahead.compare.since_ms is not None and ahead.compare.since_ms > NOW
    for now in (NOW, ahead.compare.since_ms):
        got = evaluate(ahead, run, "driftline", now)
        assert (got.rule, got.at_ms, got.code, got.failing, got.n_baseline, got.n_candidate) == ("F", now, 2, (), 0, 0)
    assert asked == []
