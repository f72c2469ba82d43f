"""False alarms per day of the worker's drift stage at its default settings, on real prompts.

``bench_drift.py`` measures the detectors on fixed windows; this runs the worker's own
drift engine (``streams.drift.DriftEngine`` with the default ``DriftConfig``: reference
of 300 samples, sliding window of 300, a test every 100 samples or every 60 s when new
samples arrived, family ``alpha`` 0.05 over keys x fields x methods, both fields
counted) and its default alert rules (``PromptDrift``: ``drift.p_value < 0.01`` for
3 minutes, resolved above 0.05) on long **no-drift** streams of real AlpacaEval prompt embeddings
(the bench_drift cache), one sample every ``1 / rate`` seconds of event time. Every
stream has its own reference (the first 300 samples), as a new key would.

It prints, per 1,000 test rounds and per day at the given sample rate:

* *drifted rounds*: rounds in which the stage marked any method ``drifted`` (its
  Bonferroni verdict, the ``drifted`` column of ``drift_scores``);
* *alert firings*: ``firing`` transitions of the default ``PromptDrift`` rule
  (``p < 0.01`` held for 3 minutes; each firing is one notification; the rule stays
  firing until p > 0.05); ``--rule-variants`` adds alternatives side by side;
* per method, the share of tests with ``p < 0.01``.

Only the prompt field has embeddings here; the response field's tests would add as
many again (the Bonferroni level already counts it).

    python benchmarks/drift/bench_stream_far.py                       # 30 streams x 4 h at 1 sample/s (~25 min)
    python benchmarks/drift/bench_stream_far.py --rate 5 --hours 2
    python benchmarks/drift/bench_stream_far.py --scenario moderate --streams 10 --hours 1 --rule-variants
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import cluster_bootstrap_ci, limit_threads  # noqa: E402

limit_threads(1)

import argparse  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import numpy as np  # noqa: E402
from embed_cache import DEFAULT_CACHE, load_pool  # noqa: E402
from scenarios import SOURCES, make_scenarios, make_stream  # noqa: E402

#: ``--rule-variants``: the default PromptDrift rule and alternatives, evaluated side by side
#: (P01_no_for was the default before; P001 can fire only through topic-mix: with 512
#: permutations the MMD and centroid p-values are never below 1/513)
VARIANTS = """
rules:
  - {name: PromptDrift, kind: drift, expr: "drift.p_value < 0.01", match: {field: prompt}, resolve_above: 0.05, for: 3m}
  - {name: P01_no_for, kind: drift, expr: "drift.p_value < 0.01", match: {field: prompt}, resolve_above: 0.05}
  - {name: P001, kind: drift, expr: "drift.p_value < 0.001", match: {field: prompt}, resolve_above: 0.05}
  - {name: Drifted, kind: drift, expr: "drift.drifted == true", match: {field: prompt}}
  - {name: Drifted_for3m, kind: drift, expr: "drift.drifted == true", match: {field: prompt}, for: 3m}
"""


def run_stream(idx: np.ndarray, emb: np.ndarray, rate: float, seed: int, ref_size: int = 300,
               variants: bool = False) -> dict:
    from driftline.schemas.rules import DriftObservation, load_rules, parse_rules
    from driftline.streams.stages.rule_engine import AlertEvaluator, default_rules_path
    from driftline.streams.stages.semantic_drift import DriftConfig, DriftEngine, Sample

    cfg = DriftConfig(sample_rate=1.0, control_topic=None, seed=seed, ref_size=ref_size)  # defaults otherwise
    eng = DriftEngine(cfg, lambda sql, params: [], "driftline", "bench")  # an empty store: a new key
    ev = AlertEvaluator(parse_rules(VARIANTS) if variants else load_rules(default_rules_path()))
    key = ("bench-app", "bench-model", "v1")
    rounds: dict[int, list] = {}
    firings: Counter = Counter()
    first_fire: dict[str, int] = {}
    first_drift: int | None = None
    step = max(1, round(rate))  # one engine call per second of event time, as batches arrive
    for start in range(0, idx.size, step):
        stop = min(idx.size, start + step)
        samples = [Sample(key, "prompt", f"e{i}", int(i * 1000 / rate), f"t{i}") for i in range(start, stop)]
        _, _, results = eng.process(samples, [0] * len(samples), emb[idx[start:stop]], now=stop / rate)
        for s, r in results:
            rounds.setdefault(int(r.explanation["window"]["seq_to"]), []).append(r)  # one round per position
            if r.drifted and first_drift is None:
                first_drift = s.ts_ms
            ev.observe_drift(DriftObservation(ts_ms=s.ts_ms, app=key[0], model=key[1], prompt_version=key[2],
                                              field="prompt", method=r.method, statistic=float(r.statistic),
                                              p_value=r.p_value, drifted=r.drifted))
        # every second of event time, as the worker's alerting stage does (a "for" can
        # complete between two tests: the newest result per key stands until the next)
        for t in ev.evaluate(samples[-1].ts_ms):
            if t.state == "firing":
                firings[t.rule] += 1
                first_fire.setdefault(t.rule, t.ts_ms)
    per = list(rounds.values())
    return {
        "rounds": len(per),
        "drifted_rounds": sum(any(r.drifted for r in rs) for rs in per),
        "firings": firings["PromptDrift"],
        "by_rule": firings,
        "p01": Counter(r.method for rs in per for r in rs if r.p_value is not None and r.p_value < 0.01),
        "tests": Counter(r.method for rs in per for r in rs),
        "alpha_test": per[0][0].explanation["alpha_test"] if per else None,
        "first_fire_ms": first_fire,
        "first_drift_ms": first_drift,
    }


def delays(a: argparse.Namespace, pool, by_source: list[np.ndarray]) -> int:
    """Delay from the shift to the first drifted verdict and to each rule's first firing."""
    scn = make_scenarios(300)[a.scenario]
    n = int(a.hours * 3600 * a.rate)
    print(f"{a.streams} '{a.scenario}' streams ({scn.description}) x {n:,} samples at {a.rate:g} samples/s; "
          f"shift after reference {a.ref_size} + window 300", flush=True)
    t_start = time.perf_counter()
    first: dict[str, list[float | None]] = {}
    for i in range(a.streams):
        idx, t0 = make_stream(scn, a.seed * 1000 + 500 + i, i % 5, by_source, a.ref_size, 300,
                              max(0, n - a.ref_size - 300))
        r = run_stream(idx[:n], pool.emb, a.rate, seed=i, ref_size=a.ref_size, variants=a.rule_variants)
        t0_ms = t0 * 1000 / a.rate
        marks = {"drifted verdict": r["first_drift_ms"], **r["first_fire_ms"]}
        for name in ("drifted verdict", "PromptDrift", *(("P01_no_for", "Drifted_for3m") if a.rule_variants else ())):
            ts = marks.get(name)
            first.setdefault(name, []).append(None if ts is None else (ts - t0_ms) / 1000)
        print(f"  stream {i + 1}/{a.streams}: " + ", ".join(
            f"{k} {'-' if v[-1] is None else f'{v[-1]:+.0f} s'}" for k, v in first.items())
            + f"  ({time.perf_counter() - t_start:.0f} s)", flush=True)
    print()
    for name, vals in first.items():
        got = sorted(v for v in vals if v is not None)
        print(f"{name}: {len(got)}/{len(vals)} streams, median {np.median(got):.0f} s after the shift "
              f"(range {got[0]:.0f} to {got[-1]:.0f} s); before the shift: {sum(v < 0 for v in got)}" if got
              else f"{name}: 0/{len(vals)} streams")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=30, help="independent no-drift streams (own reference each)")
    ap.add_argument("--hours", type=float, default=4.0, help="event time per stream")
    ap.add_argument("--rate", type=float, default=1.0, help="prompt samples per second per key (after sampling)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--ref-size", type=int, default=300, help="the worker's --ref-size (default 300)")
    ap.add_argument("--rule-variants", action="store_true",
                    help="also count firings of alternative drift rules (a higher bar, a 'for', the verdict)")
    ap.add_argument("--scenario", default="control", choices=("control", "abrupt", "gradual", "moderate", "adversarial"),
                    help="a shifted scenario of bench_drift instead of the no-drift control: reports the delay "
                         "from the shift to the first drifted verdict and to each rule's first notification")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    a = ap.parse_args(argv)

    pool = load_pool(a.cache, log=lambda m: print(m, flush=True))
    by_source = [np.flatnonzero(pool.sources == s) for s in SOURCES]
    if a.scenario != "control":
        return delays(a, pool, by_source)
    control = make_scenarios(300)["control"]
    n = int(a.hours * 3600 * a.rate)
    print(f"{a.streams} no-drift streams x {n:,} samples ({a.hours:g} h at {a.rate:g} samples/s), "
          f"worker defaults but reference {a.ref_size}: window 300, test every 100 samples or 60 s, family alpha 0.05 "
          "(2 fields x 3 methods), default alert rules", flush=True)
    t0 = time.perf_counter()
    tot = Counter()
    p01, tests = Counter(), Counter()
    per_stream: list[tuple[int, int, int]] = []
    by_rule: Counter = Counter()
    alpha_test = None
    for i in range(a.streams):
        idx, _ = make_stream(control, a.seed * 1000 + i, 0, by_source, a.ref_size, 300, max(0, n - a.ref_size - 300))
        r = run_stream(idx[:n], pool.emb, a.rate, seed=i, ref_size=a.ref_size, variants=a.rule_variants)
        by_rule.update(r["by_rule"])
        tot.update({k: r[k] for k in ("rounds", "drifted_rounds", "firings")})
        p01.update(r["p01"])
        tests.update(r["tests"])
        per_stream.append((r["rounds"], r["drifted_rounds"], r["firings"]))
        alpha_test = r["alpha_test"]
        print(f"  stream {i + 1}/{a.streams}: {r['rounds']} rounds, {r['drifted_rounds']} drifted, "
              f"{r['firings']} alert firings  ({time.perf_counter() - t0:.0f} s)", flush=True)
    rounds = tot["rounds"]
    hours = a.streams * a.hours
    per_day = 24 / a.hours
    # streams, not rounds, are independent: 95% intervals that resample whole streams
    n_rounds, n_drifted, n_fired = zip(*per_stream, strict=True)
    lo, hi = cluster_bootstrap_ci(n_drifted, n_rounds)
    flo, fhi = cluster_bootstrap_ci(n_fired, n_rounds)
    print()
    print(f"test rounds: {rounds:,} over {hours:g} stream-hours ({rounds / hours:.1f} per hour per key-field); "
          f"per-test alpha {alpha_test:.5f}")
    print(f"drifted rounds (the stage's Bonferroni verdict): {tot['drifted_rounds']} = "
          f"{1000 * tot['drifted_rounds'] / rounds:.1f} per 1,000 rounds (95% interval resampling streams "
          f"{1000 * lo:.1f}-{1000 * hi:.1f}) "
          f"= {tot['drifted_rounds'] / a.streams * per_day:.2f} per key-field-day at {a.rate:g} samples/s")
    print(f"PromptDrift alert firings (default rule: p < 0.01 for 3m, resolved above 0.05): {tot['firings']} = "
          f"{1000 * tot['firings'] / rounds:.1f} per 1,000 rounds ({1000 * flo:.1f}-{1000 * fhi:.1f}) = "
          f"{tot['firings'] / a.streams * per_day:.2f} "
          f"per key-field-day; streams with any: {sum(f > 0 for f in n_fired)}/{a.streams}")
    if a.rule_variants:
        for name in ("PromptDrift", "P01_no_for", "P001", "Drifted", "Drifted_for3m"):
            print(f"  rule {name}: {by_rule[name]} firings = {by_rule[name] / a.streams * per_day:.2f} per key-field-day")
    for m in sorted(tests):
        print(f"  {m}: p < 0.01 in {p01[m]}/{tests[m]} tests ({p01[m] / tests[m]:.4f})")
    print(f"elapsed {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
