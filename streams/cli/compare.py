"""``driftline compare`` and ``driftline gate``: two populations of live calls, compared
with confidence sequences that stay valid however often you look.

A population is a filter on the labels of ``llm_events`` (``prompt_version=v4``,
``model=gpt-4o,environment=prod``); the baseline and the candidate must not overlap.
One scan of ``llm_events FINAL`` (each ``event_id`` once) gives per arm the counts,
means and variances; a second query per arm gives the few order statistics that
bound its latency quantiles. Then :mod:`driftline.detectors.sequential` computes,
per metric, the difference and its anytime-valid interval:

- latency p50 / p95 and TTFT p95: the quantile sequences of Howard & Ramdas (2022)
  per arm at ``alpha / 2`` (non-asymptotic);
- mean latency, mean TTFT, tokens and cost per call: the asymptotic confidence
  sequence for a difference of means (Waudby-Smith et al. 2024);
- error, guardrail-hit and negative-feedback rates: the same for a difference of
  proportions; the gate's ``--max-guardrail-rate`` (one rate) uses the exact
  beta-binomial sequence (Howard et al. 2021).

The guarantee is over the *stream*: re-running ``compare`` / ``gate`` as calls arrive
(every minute, every CI build) keeps the chance that a false verdict is ever shown at
``alpha`` per metric, provided the looks share one start (``--since`` an absolute
time, e.g. the deployment; a relative ``--since 2h`` slides and each look is then a
new experiment).

Verdicts (lower is better for every metric but tokens, which say higher / lower):
``worse`` / ``better`` when the interval excludes 0; ``no difference`` when it lies
within ``± margin`` (relative to the baseline; rates: ``± rate margin`` percentage
points); else ``not enough data`` (also below ``min_samples`` calls per arm).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from driftline.detectors.sequential import (
    DEFAULT_T_OPT,
    Interval,
    MeanStats,
    mean_contrast_cs,
    proportion_contrast_cs,
    quantile_contrast,
    quantile_ranks,
    rate_cs,
)
from driftline.schemas.comparison import GATE_CRITERIA, LABELS, criterion_option, parse_fraction
from driftline.schemas.rules import rfc3339_ms

__all__ = ["LABELS", "Population", "CompareConfig", "ArmData", "MetricResult", "Criterion", "GateResult",
           "parse_population", "parse_since", "parse_fraction", "fetch", "compare", "render_table",
           "to_json", "gate", "render_gate", "gate_criteria", "evaluate_gate", "SemanticResult", "fetch_embeddings", "semantic_shift",
           "render_semantic"]


_DB_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


@dataclass(frozen=True)
class Population:
    """A conjunction of ``label = value`` filters."""

    labels: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        for k, _ in self.labels:
            if k not in LABELS:
                raise ValueError(f"unknown label {k!r}: use one of {', '.join(LABELS)}")
        if len({k for k, _ in self.labels}) != len(self.labels):
            raise ValueError(f"a label is given twice in {self.describe()!r}")

    def describe(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.labels) or "(all)"

    def sql(self, prefix: str) -> tuple[str, dict[str, str]]:
        """The filter as SQL with bound ``{prefix_i:String}`` placeholders (``1`` when empty)."""
        if not self.labels:
            return "1", {}
        conds, params = [], {}
        for i, (k, v) in enumerate(self.labels):
            conds.append(f"{k} = {{{prefix}{i}:String}}")
            params[f"{prefix}{i}"] = v
        return "(" + " AND ".join(conds) + ")", params


def parse_population(specs: Sequence[str], what: str) -> Population:
    """``["prompt_version=v4", "model=x,environment=prod"]`` as a :class:`Population`."""
    pairs: list[tuple[str, str]] = []
    for spec in specs:
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            k, sep, v = part.partition("=")
            if not sep or not k.strip():
                raise ValueError(f"{what}: expected LABEL=VALUE, got {part!r}")
            pairs.append((k.strip(), v.strip()))
    if not pairs:
        raise ValueError(f"{what}: give at least one LABEL=VALUE (labels: {', '.join(LABELS)})")
    return Population(tuple(pairs))


def parse_since(v: str | None, now_ms: int) -> int | None:
    """``2h`` / ``30m`` / ``7d`` before ``now_ms``, an RFC 3339 time, or epoch milliseconds."""
    if v is None or v == "":
        return None
    m = _DURATION_RE.match(v.strip())
    if m:
        return now_ms - int(float(m.group(1)) * _UNIT_S[m.group(2)] * 1000)
    if v.isdigit():
        return int(v)
    ms = rfc3339_ms(v)
    if ms is None:
        raise ValueError(f"expected a duration (2h, 30m, 7d), RFC 3339 time or epoch ms, got {v!r}")
    return ms


@dataclass(frozen=True)
class CompareConfig:
    """What to compare and how strictly. ``alpha``: per metric (the gate splits it over
    its criteria); ``margin``: the relative change counted as "no difference" for
    latencies, tokens and cost; ``rate_margin``: the same for rates, in absolute terms."""

    baseline: Population
    candidate: Population
    common: Population = field(default_factory=lambda: Population(()))
    since_ms: int | None = None
    until_ms: int | None = None
    alpha: float = 0.05
    min_samples: int = 100
    margin: float = 0.05
    rate_margin: float = 0.005
    t_opt: float = DEFAULT_T_OPT

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha!r}")
        if self.min_samples < 2:
            raise ValueError(f"min_samples must be >= 2, got {self.min_samples!r}")
        if self.margin < 0 or self.rate_margin < 0:
            raise ValueError("margins must be >= 0")
        if self.baseline == self.candidate:
            raise ValueError("the baseline and the candidate are the same filter")
        if self.since_ms is not None and self.until_ms is not None and self.until_ms <= self.since_ms:
            raise ValueError("--until must be after --since")


# -- data -----------------------------------------------------------------------------

def _finite(col: str) -> str:
    """``col`` with NaN and inf as NULL: the ingest path refuses them, but another writer may
    store them, and one NaN makes ClickHouse's avg NaN (JSON null), read as a mean of 0."""
    return f"if(isFinite({col}), {col}, NULL)"


_MEAN_COLUMNS = {  # metric -> SQL expression per call (NULL: the call does not count)
    "latency_ms": _finite("latency_ms"),
    "ttft_ms": _finite("ttft_ms"),
    "tokens": "if(input_tokens IS NULL AND output_tokens IS NULL, NULL, "
              "ifNull(input_tokens, 0) + ifNull(output_tokens, 0))",
    "cost_usd": _finite("cost_usd"),
}
_RATE_COLUMNS = {  # metric -> (events, out of)
    "errors": ("status = 'error'", "1"),
    "guardrail_hits": ("guardrail_hit = 1", "length(guardrail_names) > 0"),
    "negative_feedback": ("feedback = -1", "feedback IS NOT NULL"),
}
_QUANTILE_COLUMNS = ("latency_ms", "ttft_ms")


@dataclass
class ArmData:
    """One arm's numbers from the store: mean stats per column, (events, out of) per
    rate, and order statistics fetched by rank per quantile column."""

    n: int
    means: dict[str, MeanStats]
    rates: dict[str, tuple[int, int]]
    order_stats: dict[str, dict[int, float]] = field(default_factory=dict)
    quantile_n: dict[str, int] = field(default_factory=dict)  # values behind order_stats (else means' n)

    def qn(self, column: str) -> int:
        return self.quantile_n.get(column, self.means[column].n)

    def order_stat(self, column: str, rank: int) -> float:
        m = self.qn(column)
        if rank <= 0:
            return -math.inf
        if rank > m:
            return math.inf
        return self.order_stats[column][rank]


def _num(v: Any) -> float:
    if v is None:
        return 0.0
    x = float(v)
    return 0.0 if math.isnan(x) else x


def _rows(run: Callable[[str, dict[str, Any]], bytes], sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    out = run(sql, params)
    return [json.loads(line) for line in out.decode().splitlines() if line.strip()]


def _scope(cfg: CompareConfig) -> tuple[str, dict[str, Any]]:
    conds: list[str] = []
    params: dict[str, Any] = {}
    common, p = cfg.common.sql("f")
    conds.append(common)
    params.update(p)
    if cfg.since_ms is not None:
        conds.append("timestamp >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')")
        params["since"] = cfg.since_ms
    if cfg.until_ms is not None:
        conds.append("timestamp < fromUnixTimestamp64Milli({until:Int64}, 'UTC')")
        params["until"] = cfg.until_ms
    return " AND ".join(conds), params


def fetch(run: Callable[[str, dict[str, Any]], bytes], database: str, cfg: CompareConfig,
          quantile_needs: Callable[[str, int], set[int]]) -> tuple[ArmData, ArmData]:
    """Both arms' numbers; ``run(sql, params)`` returns ClickHouse's ``JSONEachRow`` bytes.
    ``quantile_needs(column, n)``: the ranks of ``column`` to fetch for an arm of ``n`` values.
    Raises ValueError when the arms overlap."""
    if not _DB_RE.match(database):
        raise ValueError(f"bad database name {database!r}")
    a, pa = cfg.baseline.sql("b")
    b, pb = cfg.candidate.sql("c")
    scope, ps = _scope(cfg)
    params = {**pa, **pb, **ps}
    aggs = ["count() AS n"]
    for name, expr in _MEAN_COLUMNS.items():
        aggs += [f"count({expr}) AS {name}_n", f"avg({expr}) AS {name}_mean", f"varSampStable({expr}) AS {name}_var"]
    for name, (ev, of) in _RATE_COLUMNS.items():
        aggs += [f"countIf(({ev}) AND ({of})) AS {name}_x", f"countIf({of}) AS {name}_of"]
    sql = (f"SELECT multiIf({a} AND {b}, 'both', {a}, 'baseline', 'candidate') AS arm, {', '.join(aggs)} "
           f"FROM {database}.llm_events FINAL WHERE ({a} OR {b}) AND {scope} GROUP BY arm")
    by_arm = {r["arm"]: r for r in _rows(run, sql, params)}
    if "both" in by_arm:
        raise ValueError(f"the baseline ({cfg.baseline.describe()}) and the candidate ({cfg.candidate.describe()}) "
                         f"overlap: {int(by_arm['both']['n'])} calls match both; make the filters exclusive")
    arms = []
    for arm, (cond, cp) in (("baseline", (a, pa)), ("candidate", (b, pb))):
        r = by_arm.get(arm, {})
        means = {name: MeanStats(int(r.get(f"{name}_n", 0)), _num(r.get(f"{name}_mean")),
                                 max(_num(r.get(f"{name}_var")), 0.0)) for name in _MEAN_COLUMNS}
        rates = {name: (int(r.get(f"{name}_x", 0)), int(r.get(f"{name}_of", 0))) for name in _RATE_COLUMNS}
        data = ArmData(int(r.get("n", 0)), means, rates)
        _fetch_order_stats(run, database, data, f"{cond} AND {scope}", {**cp, **ps}, quantile_needs)
        arms.append(data)
    return arms[0], arms[1]


def _fetch_order_stats(run: Callable[[str, dict[str, Any]], bytes], database: str, data: ArmData, where: str,
                       params: dict[str, Any], quantile_needs: Callable[[str, int], set[int]]) -> None:
    """The order statistics of the quantile columns that the ranks for their ``n`` need.
    Calls stored between the counting query and this one change ``n`` and so the ranks:
    the query returns its own counts, and is repeated with the ranks for those (3 tries)."""
    ns = {col: data.means[col].n for col in _QUANTILE_COLUMNS}
    for _ in range(3):
        sel, qp = [f"length(s_{c}) AS n_{c}" for c in _QUANTILE_COLUMNS], dict(params)
        wanted: dict[str, list[int]] = {}
        for col in _QUANTILE_COLUMNS:
            wanted[col] = sorted(k for k in quantile_needs(col, ns[col]) if 1 <= k <= ns[col])
            for j, k in enumerate(wanted[col]):
                qp[f"{col}_{j}"] = k
            sel.append(f"[{', '.join(f's_{col}[{{{col}_{j}:UInt64}}]' for j in range(len(wanted[col])))}] AS {col}")
        if not any(wanted.values()):
            return
        inner = ", ".join(f"arraySort(groupArray({_MEAN_COLUMNS[c]})) AS s_{c}" for c in _QUANTILE_COLUMNS)
        row = _rows(run, f"SELECT {', '.join(sel)} FROM (SELECT {inner} FROM {database}.llm_events FINAL "
                         f"WHERE {where})", qp)[0]
        got = {col: int(row[f"n_{col}"]) for col in _QUANTILE_COLUMNS}
        if got == ns:
            for col in _QUANTILE_COLUMNS:
                data.order_stats[col] = dict(zip(wanted[col], (float(x) for x in row[col]), strict=True))
                data.quantile_n[col] = ns[col]
            return
        ns = got
    raise RuntimeError("calls kept arriving between the queries of the quantiles: try again, or give --until")


# -- compare ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Metric:
    name: str
    label: str  # table label, with the unit
    kind: str  # "quantile" | "mean" | "rate"
    column: str
    q: float = 0.0
    scale: float = 1.0  # table units per stored unit
    lower_is_better: bool | None = True


METRICS = (
    Metric("latency_p50_ms", "latency p50 ms", "quantile", "latency_ms", q=0.5),
    Metric("latency_p95_ms", "latency p95 ms", "quantile", "latency_ms", q=0.95),
    Metric("latency_mean_ms", "latency avg ms", "mean", "latency_ms"),
    Metric("ttft_p95_ms", "TTFT p95 ms", "quantile", "ttft_ms", q=0.95),
    Metric("ttft_mean_ms", "TTFT avg ms", "mean", "ttft_ms"),
    Metric("tokens_per_call", "tokens/call", "mean", "tokens", lower_is_better=None),
    Metric("cost_per_call_usd", "$ per 1k calls", "mean", "cost_usd", scale=1000.0),
    Metric("error_rate", "error rate %", "rate", "errors", scale=100.0),
    Metric("guardrail_hit_rate", "guardrail hit %", "rate", "guardrail_hits", scale=100.0),
    Metric("negative_feedback_rate", "neg. feedback %", "rate", "negative_feedback", scale=100.0),
)


@dataclass(frozen=True)
class MetricResult:
    """One metric: both arms' values, the difference (candidate - baseline) with its
    interval, the per-arm counts it rests on, and the verdict."""

    metric: Metric
    n_baseline: int
    n_candidate: int
    baseline: float | None
    candidate: float | None
    difference: Interval
    verdict: str


def _quantile_arm(d: ArmData, col: str, q: float, alpha: float, t_opt: float) -> tuple[float, float, float]:
    lo, est, hi = quantile_ranks(d.qn(col), q, alpha, t_opt=t_opt)
    return d.order_stat(col, lo), d.order_stat(col, est), d.order_stat(col, hi)


def quantile_ranks_needed(alphas: Sequence[float], qs: Mapping[str, Sequence[float]], t_opt: float
                          ) -> Callable[[str, int], set[int]]:
    def needs(col: str, n: int) -> set[int]:
        out: set[int] = set()
        for q in qs.get(col, ()):
            for a in alphas:
                out.update(quantile_ranks(n, q, a, t_opt=t_opt))
        return out
    return needs


def _verdict(m: Metric, iv: Interval, base: float | None, n_b: int, n_c: int, cfg: CompareConfig) -> str:
    if min(n_b, n_c) < cfg.min_samples or not iv.bounded:
        return "not enough data"
    if iv.low > 0 or iv.high < 0:
        up = iv.low > 0
        if m.lower_is_better is None:
            return "higher" if up else "lower"
        return "worse" if up == m.lower_is_better else "better"
    tol = cfg.rate_margin if m.kind == "rate" else cfg.margin * abs(base or 0.0)
    if -tol <= iv.low and iv.high <= tol:
        return "no difference"
    return "not enough data"


def compare(b: ArmData, c: ArmData, cfg: CompareConfig) -> list[MetricResult]:
    """Every metric of :data:`METRICS` for the two arms, each at level ``cfg.alpha``."""
    out = []
    for m in METRICS:
        if m.kind == "quantile":
            nb, nc = b.qn(m.column), c.qn(m.column)
            qb = _quantile_arm(b, m.column, m.q, cfg.alpha / 2, cfg.t_opt)
            qc = _quantile_arm(c, m.column, m.q, cfg.alpha / 2, cfg.t_opt)
            iv = quantile_contrast(qb, qc) if nb and nc else Interval(0.0, -math.inf, math.inf)
            vb, vc = (qb[1] if nb else None), (qc[1] if nc else None)
        elif m.kind == "mean":
            sb, sc = b.means[m.column], c.means[m.column]
            nb, nc = sb.n, sc.n
            iv = mean_contrast_cs(sb, sc, cfg.alpha, t_opt=cfg.t_opt)
            vb, vc = (sb.mean if nb else None), (sc.mean if nc else None)
        else:
            (xb, nb), (xc, nc) = b.rates[m.column], c.rates[m.column]
            iv = proportion_contrast_cs(xb, nb, xc, nc, cfg.alpha, t_opt=cfg.t_opt)
            vb, vc = (xb / nb if nb else None), (xc / nc if nc else None)
        out.append(MetricResult(m, nb, nc, vb, vc, iv, _verdict(m, iv, vb, nb, nc, cfg)))
    return out


def _g(x: float | None, signed: bool = False) -> str:
    """Compact: 3 significant digits below 1000, whole numbers to 9999, then thousands as k."""
    if x is None:
        return "-"
    if math.isinf(x):
        return ("+" if x > 0 and signed else "-" if x < 0 else "") + "inf"
    if abs(x) >= 10_000:
        s = f"{x / 1000:.3g}k"
    elif abs(x) >= 1000:
        s = f"{x:.0f}"
    else:
        s = f"{x:.3g}"
    return ("+" + s) if signed and x > 0 else s


def _gn(n: int) -> str:
    return f"{n / 1000:.3g}k" if n >= 10_000 else str(n)


def render_table(results: Sequence[MetricResult], cfg: CompareConfig, n_b: int, n_c: int) -> str:
    """The comparison as a table of at most 80 columns (the difference is cand - base)."""
    pct = f"{(1 - cfg.alpha) * 100:g}%"
    lines = [f"baseline  {cfg.baseline.describe()}: {n_b} calls",
             f"candidate {cfg.candidate.describe()}: {n_c} calls",
             f"interval: of candidate - baseline, {pct} anytime-valid (holds at every look)",
             f"{'metric':<15} {'base':>6} {'cand':>6}  {'interval':<17} {'n base/cand':>11}  verdict"]
    for r in results:
        s, iv = r.metric.scale, r.difference
        diff = f"[{_g(iv.low * s, True)}, {_g(iv.high * s, True)}]"
        if r.baseline is None or r.candidate is None:
            diff = "-"
        ns = f"{_gn(r.n_baseline)}/{_gn(r.n_candidate)}"
        lines.append(f"{r.metric.label:<15} {_g(None if r.baseline is None else r.baseline * s):>6} "
                     f"{_g(None if r.candidate is None else r.candidate * s):>6}  {diff:<17} {ns:>11}  {r.verdict}")
    return "\n".join(lines) + "\n"


def _jf(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def to_json(results: Sequence[MetricResult], cfg: CompareConfig, n_b: int, n_c: int) -> dict[str, Any]:
    """Machine-readable comparison (values in stored units: ms, tokens, USD per call, rates
    as fractions; an unbounded interval end is null)."""
    return {
        "baseline": {"filter": dict(cfg.baseline.labels), "n": n_b},
        "candidate": {"filter": dict(cfg.candidate.labels), "n": n_c},
        "filter": dict(cfg.common.labels), "since_ms": cfg.since_ms, "until_ms": cfg.until_ms,
        "alpha": cfg.alpha, "method": "anytime-valid confidence sequences (detectors/sequential.py)",
        "metrics": [{"metric": r.metric.name, "kind": r.metric.kind, "n_baseline": r.n_baseline,
                     "n_candidate": r.n_candidate, "baseline": _jf(r.baseline), "candidate": _jf(r.candidate),
                     "difference": _jf(r.difference.estimate) if r.baseline is not None and r.candidate is not None
                     else None,
                     "low": _jf(r.difference.low), "high": _jf(r.difference.high), "verdict": r.verdict}
                    for r in results],
    }


# -- gate -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Criterion:
    """One gate criterion. ``kind``: ``relative`` (candidate <= (1 + limit) x baseline, for
    a quantile or mean metric), ``increase`` (rate difference <= limit) or ``rate``
    (candidate's rate <= limit)."""

    option: str
    metric: str
    kind: str
    limit: float

    def __post_init__(self) -> None:
        if self.kind not in ("relative", "increase", "rate"):
            raise ValueError(f"bad criterion kind {self.kind!r}")
        if not (self.limit >= 0) or not math.isfinite(self.limit):
            raise ValueError(f"{self.option}: the limit must be >= 0")
        if self.metric not in {m.name for m in METRICS}:
            raise ValueError(f"unknown metric {self.metric!r}")


@dataclass(frozen=True)
class GateResult:
    criterion: Criterion
    state: str  # "holds" | "fails" | "undecided"
    interval: Interval  # of candidate - (1 + limit) baseline, of the rate increase, or of the rate
    why: str


def _metric(name: str) -> Metric:
    return next(m for m in METRICS if m.name == name)


def gate(b: ArmData, c: ArmData, criteria: Sequence[Criterion], cfg: CompareConfig) -> tuple[int, list[GateResult]]:
    """Exit code (0: every criterion holds with confidence; 1: one fails with confidence;
    2: cannot tell yet) and each criterion's state. The criteria share ``cfg.alpha``
    (Bonferroni: ``alpha / k`` each), so a wrong pass or fail has probability at most
    ``alpha`` at any look."""
    if not criteria:
        raise ValueError("give at least one criterion")
    a = cfg.alpha / len(criteria)
    results = []
    for cr in criteria:
        m = _metric(cr.metric)
        if m.kind == "quantile":
            nb, nc = b.qn(m.column), c.qn(m.column)
            iv = quantile_contrast(_quantile_arm(b, m.column, m.q, a / 2, cfg.t_opt),
                                   _quantile_arm(c, m.column, m.q, a / 2, cfg.t_opt), ratio=1 + cr.limit)
            bound = 0.0
        elif m.kind == "mean":
            nb, nc = b.means[m.column].n, c.means[m.column].n
            iv = mean_contrast_cs(b.means[m.column], c.means[m.column], a, ratio=1 + cr.limit, t_opt=cfg.t_opt)
            bound = 0.0
        elif cr.kind == "increase":
            (xb, nb), (xc, nc) = b.rates[m.column], c.rates[m.column]
            iv = proportion_contrast_cs(xb, nb, xc, nc, a, t_opt=cfg.t_opt)
            bound = cr.limit
        else:
            (xb, nb), (xc, nc) = b.rates[m.column], c.rates[m.column]
            nb = max(nb, cfg.min_samples)  # the baseline does not enter a one-rate criterion
            iv = rate_cs(xc, nc, a, t_opt=cfg.t_opt)
            bound = cr.limit
        few = min(nb, nc) < cfg.min_samples
        what = {"relative": f"{m.name}: candidate <= {1 + cr.limit:g} x baseline",
                "increase": f"{m.name}: candidate - baseline <= {cr.limit:g}",
                "rate": f"{m.name} of the candidate <= {cr.limit:g}"}[cr.kind]
        if few:
            state, why = "undecided", f"{what}: n {min(nb, nc)} < --min-samples {cfg.min_samples}"
        elif iv.high <= bound:
            state, why = "holds", f"{what}: holds (interval {_rng(iv, bound)})"
        elif iv.low > bound:
            state, why = "fails", f"{what}: FAILS (interval {_rng(iv, bound)})"
        else:
            state, why = "undecided", f"{what}: cannot tell yet (interval {_rng(iv, bound)})"
        results.append(GateResult(cr, state, iv, why))
    states = {r.state for r in results}
    code = 1 if "fails" in states else 0 if states == {"holds"} else 2
    return code, results


def gate_criteria(limits: Mapping[str, str | float | None]) -> list[Criterion]:
    """The criteria of :data:`~driftline.schemas.comparison.GATE_CRITERIA` given in ``limits``
    (``{"max_p95_increase": "10%", ...}``; None or absent: not a criterion), in the table's
    order; a limit is ``10%`` or a fraction. Raises ValueError naming the CLI option."""
    out = []
    for key, metric, kind in GATE_CRITERIA:
        v = limits.get(key)
        if v is None or v == "":
            continue
        opt = criterion_option(key)
        out.append(Criterion(opt, metric, kind, parse_fraction(str(v), opt)))
    return out


def quantile_needs_for(alphas: Sequence[float], t_opt: float) -> Callable[[str, int], set[int]]:
    """The order statistics :func:`compare` / :func:`gate` read at these per-arm levels."""
    qs: dict[str, list[float]] = {}
    for m in METRICS:
        if m.kind == "quantile":
            qs.setdefault(m.column, []).append(m.q)
    return quantile_ranks_needed(alphas, qs, t_opt)


def evaluate_gate(run: Callable[[str, dict[str, Any]], bytes], database: str, cfg: CompareConfig,
                  criteria: Sequence[Criterion]) -> tuple[int, list[GateResult], ArmData, ArmData]:
    """``driftline gate`` from the store: :func:`fetch` both arms (the quantiles at the
    level each criterion gets), then :func:`gate`. Returns (exit code, results, baseline,
    candidate). The ``compare`` alert rule kind runs exactly this."""
    if not criteria:
        raise ValueError("give at least one criterion")
    b, c = fetch(run, database, cfg, quantile_needs_for([cfg.alpha / len(criteria) / 2], cfg.t_opt))
    code, results = gate(b, c, criteria, cfg)
    return code, results, b, c


def _rng(iv: Interval, bound: float) -> str:
    lo = "-inf" if math.isinf(iv.low) else f"{iv.low:.4g}"
    hi = "inf" if math.isinf(iv.high) else f"{iv.high:.4g}"
    side = "<= 0" if bound == 0.0 else f"vs {bound:g}"
    return f"[{lo}, {hi}] {side}"


def render_gate(code: int, results: Sequence[GateResult], cfg: CompareConfig, n_b: int, n_c: int) -> str:
    head = {0: "PASS: every criterion holds with confidence", 1: "FAIL: a criterion fails with confidence",
            2: "WAIT: cannot tell yet"}[code]
    lines = [f"{head} (baseline {cfg.baseline.describe()}: {n_b} calls, candidate "
             f"{cfg.candidate.describe()}: {n_c} calls; alpha {cfg.alpha:g} over {len(results)} criteria)"]
    lines += [f"  {r.state:<9} {r.why}" for r in results]
    return "\n".join(lines) + "\n"


# -- semantic shift of the responses (a fixed-sample test) -------------------------------

@dataclass(frozen=True)
class SemanticResult:
    """Topic-mix drift of the candidate's response embeddings against the baseline's
    (``detectors.topic_mix.TopicMixDrift`` on the samples the drift stage stored in
    ``llm_embeddings``). A fixed-sample test of the latest ``n`` samples per arm, not a
    confidence sequence: its p-value holds for one look."""

    n_baseline: int
    n_candidate: int
    p_value: float | None
    shifted: bool | None  # None: too few samples
    total_variation: float
    clusters: list[dict[str, Any]]


def fetch_embeddings(run: Callable[[str, dict[str, Any]], bytes], database: str, cfg: CompareConfig,
                     limit: int, field_name: str = "response") -> tuple[list[tuple[list[float], str]], ...]:
    """Per arm the latest ``limit`` stored embeddings of ``field_name`` with their texts
    (one embedding model: the one most of the baseline's samples use)."""
    if not _DB_RE.match(database):
        raise ValueError(f"bad database name {database!r}")
    scope, ps = _scope(cfg)
    out: list[list[tuple[list[float], str, str]]] = []
    for pop, prefix in ((cfg.baseline, "b"), (cfg.candidate, "c")):
        cond, cp = pop.sql(prefix)
        ids = f"SELECT event_id FROM {database}.llm_events WHERE {cond} AND {scope}"
        # GLOBAL IN: in cluster mode both tables are Distributed (see cli/baseline.py)
        sql = (f"SELECT x.embedding AS embedding, x.embed_model AS embed_model, r.text AS text FROM "
               f"(SELECT event_id, embedding, embed_model, timestamp FROM {database}.llm_embeddings FINAL "
               f"WHERE field = {{field:String}} AND event_id GLOBAL IN ({ids}) "
               f"ORDER BY timestamp DESC, event_id LIMIT {{limit:UInt64}}) AS x "
               f"LEFT JOIN (SELECT event_id, any(ifNull({field_name}, '')) AS text FROM {database}.llm_events "
               f"WHERE {cond} AND {scope} GROUP BY event_id) AS r ON x.event_id = r.event_id "
               f"ORDER BY x.timestamp, x.event_id")
        rows = _rows(run, sql, {**cp, **ps, "field": field_name, "limit": limit})
        out.append([(r["embedding"], r["embed_model"], r["text"] or "") for r in rows])
    models = [m for _, m, _ in out[0]]
    model = max(set(models), key=models.count) if models else ""
    return tuple([(e, t) for e, m, t in arm if m == model] for arm in out)


def semantic_shift(baseline: Sequence[tuple[list[float], str]], candidate: Sequence[tuple[list[float], str]],
                   alpha: float, min_samples: int = 50, seed: int = 0) -> SemanticResult:
    """Topic-mix drift (G-test on the KMeans cluster shares, explained by cluster)."""
    nb, nc = len(baseline), len(candidate)
    if min(nb, nc) < min_samples:
        return SemanticResult(nb, nc, None, None, 0.0, [])
    import numpy as np

    from driftline.detectors.topic_mix import TopicMixDrift

    det = TopicMixDrift(alpha=alpha, seed=seed).fit(np.array([e for e, _ in baseline], dtype=np.float64),
                                                    [t for _, t in baseline])
    r = det.score(np.array([e for e, _ in candidate], dtype=np.float64), [t for _, t in candidate])
    ex = r.explanation
    return SemanticResult(nb, nc, r.p_value, bool(r.drifted), float(ex.get("total_variation", 0.0)),
                          list(ex.get("clusters", [])))


def render_semantic(s: SemanticResult, alpha: float, width: int = 80) -> str:
    """One line (and the clusters that moved most, when shifted), at most ``width`` wide."""
    tail = f"(1-look test, n {s.n_baseline}/{s.n_candidate})"
    if s.shifted is None and s.n_baseline == s.n_candidate == 0:
        return ("responses: no response embeddings stored for these calls (the worker embeds "
                "the fields of --drift-fields, sampled)\n")
    if s.shifted is None:
        return f"responses: not enough embedding samples {tail}\n"
    if not s.shifted:
        return f"responses: no topic shift shown at {alpha:g}, p {s.p_value:.2g} {tail}\n"
    lines = [f"responses: topic mix SHIFTED, p {s.p_value:.2g}, TV {s.total_variation:.2f} {tail}"]
    for c in s.clusters[:3]:
        texts = (c.get("cur_examples") if c["delta"] > 0 else c.get("examples")) or [""]
        text = " ".join(str(texts[0]).split())
        lines.append(f"  {c['delta'] * 100:+.0f} pts: {text}"[:width])
    return "\n".join(lines) + "\n"
