"""streams/cli/compare.py without a store: population parsing (labels from an allow-list only),
time and percentage parsing, verdicts, and the gate's decision from given arm numbers."""

from __future__ import annotations

import math

import pytest

from driftline.detectors.sequential import MeanStats
from driftline.streams.cli.compare import (
    ArmData,
    CompareConfig,
    Criterion,
    Population,
    compare,
    gate,
    parse_fraction,
    parse_population,
    parse_since,
)

NOW = 1_800_000_000_000


def test_population_parsing_and_sql() -> None:
    p = parse_population(["prompt_version=v5", "model=gpt-4o, environment=prod"], "--candidate")
    assert p.labels == (("prompt_version", "v5"), ("model", "gpt-4o"), ("environment", "prod"))
    sql, params = p.sql("c")
    assert sql == "(prompt_version = {c0:String} AND model = {c1:String} AND environment = {c2:String})"
    assert params == {"c0": "v5", "c1": "gpt-4o", "c2": "prod"}
    for bad in (["user_id=1"], ["prompt_version"], [""], ["model=a,model=b"], ["x) OR 1=1 --=a"]):
        with pytest.raises(ValueError):
            parse_population(bad, "--baseline")


def test_since_and_fractions() -> None:
    assert parse_since("2h", NOW) == NOW - 7_200_000
    assert parse_since("30m", NOW) == NOW - 1_800_000
    assert parse_since("2026-11-01T00:00:00Z", NOW) == 1_793_491_200_000
    assert parse_since("2026-11-01T00:00:00", NOW) == 1_793_491_200_000  # naive: UTC
    assert parse_since("123", NOW) == 123
    assert parse_since(None, NOW) is None
    with pytest.raises(ValueError):
        parse_since("yesterday", NOW)
    assert parse_fraction("10%", "x") == pytest.approx(0.1)
    assert parse_fraction("0.05", "x") == 0.05
    for bad in ("-1%", "ten", "nan"):
        with pytest.raises(ValueError):
            parse_fraction(bad, "x")
    with pytest.raises(ValueError):
        CompareConfig(Population((("app", "a"),)), Population((("app", "a"),)))


def _arm(n: int, lat: float, cost: float, errors: int) -> ArmData:
    means = {"latency_ms": MeanStats(n, lat, (lat / 2) ** 2), "ttft_ms": MeanStats(0, 0.0, 0.0),
             "tokens": MeanStats(n, 500.0, 100.0 ** 2), "cost_usd": MeanStats(n, cost, (cost / 4) ** 2)}
    rates = {"errors": (errors, n), "guardrail_hits": (n // 100, n), "negative_feedback": (0, 0)}
    # order statistics of a uniform(0, 2 lat) sample, evenly spaced
    return ArmData(n, means, rates, {"latency_ms": {k: 2 * lat * k / (n + 1) for k in range(1, n + 1)},
                                     "ttft_ms": {}})


CFG = CompareConfig(Population((("prompt_version", "v4"),)), Population((("prompt_version", "v5"),)),
                    min_samples=500)


def test_verdicts() -> None:
    b, c = _arm(5000, 800.0, 0.001, 100), _arm(5000, 1000.0, 0.001, 100)
    res = {r.metric.name: r for r in compare(b, c, CFG)}
    assert res["latency_mean_ms"].verdict == "worse"
    p95 = res["latency_p95_ms"]  # X_(ceil(0.95 n)) of each arm
    assert (p95.baseline, p95.candidate, p95.verdict) == (1600 * 4750 / 5001, 2000 * 4750 / 5001, "worse")
    assert res["cost_per_call_usd"].verdict == "no difference"  # equal, and the interval is inside +-5 %
    assert res["tokens_per_call"].verdict == "no difference"
    assert res["ttft_mean_ms"].verdict == "not enough data"  # no TTFT at all
    assert res["ttft_mean_ms"].baseline is None
    assert res["negative_feedback_rate"].verdict == "not enough data"
    better = {r.metric.name: r.verdict for r in compare(c, b, CFG)}
    assert better["latency_mean_ms"] == "better"
    few = {r.metric.name: r.verdict for r in compare(_arm(400, 800.0, 0.001, 8), _arm(400, 2000.0, 0.001, 8), CFG)}
    assert few["latency_mean_ms"] == "not enough data"  # below min_samples, however clear


def test_gate_decisions_and_bonferroni() -> None:
    b = _arm(5000, 800.0, 0.001, 100)
    lat = Criterion("--max-latency-increase", "latency_mean_ms", "relative", 0.10)
    cost = Criterion("--max-cost-increase", "cost_per_call_usd", "relative", 0.05)
    guard = Criterion("--max-guardrail-rate", "guardrail_hit_rate", "rate", 0.02)
    code, rs = gate(b, _arm(5000, 800.0, 0.001, 100), [lat, cost, guard], CFG)
    assert code == 0 and [r.state for r in rs] == ["holds"] * 3
    code, rs = gate(b, _arm(5000, 1000.0, 0.001, 100), [lat, cost], CFG)
    assert code == 1 and [r.state for r in rs] == ["fails", "holds"]
    code, rs = gate(b, _arm(5000, 880.0, 0.001, 100), [lat], CFG)  # exactly at the limit: cannot tell
    assert code == 2 and rs[0].state == "undecided"
    code, _ = gate(b, _arm(400, 800.0, 0.001, 8), [lat], CFG)
    assert code == 2
    # the criteria share alpha: each interval is at alpha / k, wider than alone
    _, one = gate(b, _arm(5000, 800.0, 0.001, 100), [lat], CFG)
    _, three = gate(b, _arm(5000, 800.0, 0.001, 100), [lat, cost, guard], CFG)
    w1 = one[0].interval.high - one[0].interval.low
    w3 = three[0].interval.high - three[0].interval.low
    assert w3 > w1 and math.isfinite(w3)


def test_order_statistics_are_refetched_when_calls_arrive_between_the_queries() -> None:
    """The counting query saw 200 latencies; 10 more calls are stored before the quantile query,
    which must then ask again with the ranks for 210 (else it reads ranks computed for 200)."""
    import json

    from driftline.streams.cli.compare import fetch, quantile_ranks_needed

    values = {"baseline": [float(i) for i in range(1, 211)], "candidate": [float(i) for i in range(1, 201)]}
    asked: list[tuple[str, dict[str, int]]] = []

    def run(sql: str, params: dict[str, object]) -> bytes:
        if sql.startswith("SELECT multiIf("):
            rows = [{"arm": arm, "n": 200, "latency_ms_n": 200, "latency_ms_mean": 100.5, "latency_ms_var": 3350.0}
                    for arm in ("baseline", "candidate")]
            return "\n".join(json.dumps(r) for r in rows).encode()
        arm = "baseline" if "b0" in params else "candidate"
        ranks = [int(v) for k, v in sorted(params.items(), key=lambda kv: kv[0])
                 if k.startswith("latency_ms_") and isinstance(v, int)]
        asked.append((arm, {"n": len(ranks)}))
        x = values[arm]
        return json.dumps({"n_latency_ms": len(x), "n_ttft_ms": 0, "latency_ms": [x[k - 1] for k in ranks],
                           "ttft_ms": []}).encode()

    cfg = CompareConfig(Population((("prompt_version", "v4"),)), Population((("prompt_version", "v5"),)))
    b, c = fetch(run, "driftline", cfg, quantile_ranks_needed([0.025], {"latency_ms": [0.5, 0.95]}, 2000))
    assert [a for a, _ in asked] == ["baseline", "baseline", "candidate"]  # the baseline asked twice
    assert (b.qn("latency_ms"), c.qn("latency_ms")) == (210, 200)
    from driftline.detectors.sequential import quantile_ranks

    lo, est, hi = quantile_ranks(210, 0.95, 0.025)
    assert (b.order_stat("latency_ms", lo), b.order_stat("latency_ms", est)) == (float(lo), float(est))
    assert b.order_stat("latency_ms", hi) == (math.inf if hi > 210 else float(hi))


def test_render_semantic_lines() -> None:
    from driftline.streams.cli.compare import SemanticResult, render_semantic

    assert render_semantic(SemanticResult(10, 700, None, None, 0.0, []), 0.05) == \
        "responses: not enough embedding samples (1-look test, n 10/700)\n"
    assert render_semantic(SemanticResult(0, 0, None, None, 0.0, []), 0.05) == (
        "responses: no response embeddings stored for these calls (the worker embeds the fields "
        "of --drift-fields, sampled)\n")
    assert render_semantic(SemanticResult(500, 500, 0.31, False, 0.02, []), 0.05) == \
        "responses: no topic shift shown at 0.05, p 0.31 (1-look test, n 500/500)\n"
    clusters = [{"delta": 0.2, "cur_examples": ["new  topic\ntext " + "x" * 100], "examples": ["old"]},
                {"delta": -0.15, "cur_examples": ["c"], "examples": ["an old topic"]}]
    lines = render_semantic(SemanticResult(500, 500, 1e-6, True, 0.2, clusters), 0.05).splitlines()
    assert lines[0] == "responses: topic mix SHIFTED, p 1e-06, TV 0.20 (1-look test, n 500/500)"
    assert lines[1].startswith("  +20 pts: new topic text xx") and len(lines[1]) == 80  # grown: a current text
    assert lines[2] == "  -15 pts: an old topic"  # shrunk: a baseline text
