"""Time per drift test, the current detectors beside the previous MMD and centroid tests
(issue 20), on real prompt embeddings, in one run.

Windows as in ``bench_drift.py``'s timing phase: a seeded uniform stream over the
AlpacaEval + jailbreak pool (``embed_cache.py``, all-MiniLM-L6-v2, d = 384), the
reference its first ``n_ref`` events, then current windows of ``n_cur`` events every
``k`` events. Each detector is fitted once and scores ``--tests`` windows; the first
score (which builds the per-reference caches) is timed apart as ``first_ms``. Rounds
interleave the methods so a busy neighbour hits all of them alike; per round and method
the median wall time per test, and the process CPU time; the machine's steal time
(``/proc/stat``) per round. BLAS on one thread, as in ``bench_drift.py`` (``--threads``).

    python benchmarks/drift/bench_drift_ms.py                 # 5 rounds x 20 tests
    python benchmarks/drift/bench_drift_ms.py --rounds 3 --json out.json
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import limit_threads  # noqa: E402

THREADS = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 1
limit_threads(THREADS)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from _machine import machine  # noqa: E402
from embed_cache import DEFAULT_CACHE, load_pool  # noqa: E402
from previous import PreviousCentroidDrift, PreviousMMDDrift  # noqa: E402


def steal_s() -> float:
    """CPU seconds the hypervisor gave to others (``steal`` of ``/proc/stat``, all CPUs)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def methods(seed: int) -> dict[str, Callable[[], Any]]:
    from driftline.detectors.semantic import CentroidDrift, ClassifierDrift, MMDDrift, TopicMixDrift

    return {
        "mmd": lambda: MMDDrift(seed=seed),
        "previous mmd": lambda: PreviousMMDDrift(seed=seed),
        "centroid": lambda: CentroidDrift(seed=seed),
        "previous centroid": lambda: PreviousCentroidDrift(seed=seed),
        "classifier": lambda: ClassifierDrift(seed=seed),
        "topic-mix": lambda: TopicMixDrift(seed=seed),
    }


def time_method(make: Callable[[], Any], ref: np.ndarray, windows: list[np.ndarray]) -> dict[str, Any]:
    det = make().fit(ref)
    t = time.perf_counter()
    first = det.score(windows[0])
    first_s = time.perf_counter() - t
    wall, cpu, pvals = [], [], [first.p_value]
    for w in windows[1:]:
        t, c = time.perf_counter(), time.process_time()
        r = det.score(w)
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - t)
        pvals.append(r.p_value)
    return {"median_ms": 1000 * float(np.median(wall)), "min_ms": 1000 * float(np.min(wall)),
            "cpu_median_ms": 1000 * float(np.median(cpu)), "first_ms": 1000 * first_s, "p_values": pvals}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="rounds; each times every method once")
    ap.add_argument("--tests", type=int, default=20, help="windows scored per method and round (+1 first)")
    ap.add_argument("--n-ref", type=int, default=1000)
    ap.add_argument("--n-cur", type=int, default=500)
    ap.add_argument("--k", type=int, default=100, help="events between windows")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS threads (1, as bench_drift.py; its figures before issue 20 ran on 2)")
    ap.add_argument("--only", default="", help="comma-separated substrings of method names")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    a = ap.parse_args(argv)
    pool = load_pool(a.cache, log=lambda m: print(m, flush=True))
    rng = np.random.default_rng(a.seed)
    stream = rng.integers(0, pool.emb.shape[0], a.n_ref + a.n_cur + a.k * (a.tests + 1))
    emb = pool.emb.astype(np.float64)
    ref = emb[stream[: a.n_ref]]
    windows = [emb[stream[e - a.n_cur: e]] for e in range(a.n_ref + a.n_cur, len(stream) + 1, a.k)][: a.tests + 1]
    only = [o for o in a.only.split(",") if o]
    ms = {k: v for k, v in methods(a.seed).items() if not only or any(o in k for o in only)}
    print(f"machine: {machine()}  numpy {np.__version__}, BLAS threads {THREADS}")
    print(f"n_ref {a.n_ref}, n_cur {a.n_cur}, d {ref.shape[1]}, {len(windows) - 1} timed windows per method and round")
    rounds: list[dict[str, Any]] = []
    for i in range(a.rounds):
        st0, t0 = steal_s(), time.perf_counter()
        res = {name: time_method(make, ref, windows) for name, make in ms.items()}
        steal, el = steal_s() - st0, time.perf_counter() - t0
        rounds.append({"results": res, "steal_s": steal, "elapsed_s": el})
        cells = ", ".join(f"{n} {r['median_ms']:.1f}" for n, r in res.items())
        print(f"round {i + 1}: {cells} ms/test (median); steal {steal:.2f} s of {el:.1f} s", flush=True)
    print("\n| method | ms/test, median of round medians | min | CPU ms/test | first test ms |")
    print("|---|---:|---:|---:|---:|")
    summary: dict[str, Any] = {}
    for name in ms:
        med = float(np.median([r["results"][name]["median_ms"] for r in rounds]))
        summary[name] = {
            "median_ms": med,
            "min_ms": float(np.min([r["results"][name]["min_ms"] for r in rounds])),
            "cpu_ms": float(np.median([r["results"][name]["cpu_median_ms"] for r in rounds])),
            "first_ms": float(np.median([r["results"][name]["first_ms"] for r in rounds])),
        }
        s = summary[name]
        print(f"| {name} | {s['median_ms']:.1f} | {s['min_ms']:.1f} | {s['cpu_ms']:.1f} | {s['first_ms']:.1f} |")
    for new in ("mmd", "centroid"):
        old = f"previous {new}"
        if new in summary and old in summary:
            ratio = summary[old]["median_ms"] / summary[new]["median_ms"]
            same = [r["results"][new]["p_values"][0] == r["results"][old]["p_values"][0] for r in rounds]
            print(f"{new}: previous / current = {ratio:.1f}x; first test's p-value equal to the previous: {all(same)}")
    steal = [r["steal_s"] for r in rounds]
    print(f"steal per round: {', '.join(f'{s:.2f}' for s in steal)} s")
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "machine": machine(),
                                      "summary": summary, "rounds": rounds}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
