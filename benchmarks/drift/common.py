"""Shared by bench_drift.py (driftline env) and peers.py (peer venv): numpy + stdlib only.

A *job* is a folder with ``emb.npy`` (the pool embeddings, float32) and
``runs.json`` (per run: the stream of pool indices, the test positions, t0,
the full-window test, whether to stop early). Both sides execute exactly the
same tests on exactly the same windows with :func:`execute_run`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# fit(ref) -> score(cur) -> (statistic, p_value or None, drifted)
ScoreFn = Callable[[np.ndarray], tuple[float, float | None, bool]]
FitFn = Callable[[np.ndarray], ScoreFn]


def limit_threads(n: int = 1) -> None:
    """Pin BLAS/OpenMP pools: the environment for libraries loaded later, and through
    threadpoolctl the pools already loaded (this module imports numpy, so numpy's BLAS is
    loaded before any caller can set the environment: until issue 20 the figures of
    ``bench_drift.py`` ran with numpy's BLAS on every core, not on one thread)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[var] = str(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the peer venv may lack it; then only the environment applies
        return
    threadpool_limits(n)


def cluster_bootstrap_ci(events: Any, trials: Any, n_boot: int = 4000,
                         seed: int = 0) -> tuple[float, float]:
    """95% interval of ``sum(events) / sum(trials)`` that resamples whole clusters (a control
    run's reference, a stream): the trials of one cluster share it and are not independent."""
    a, n = np.asarray(events, float), np.asarray(trials, float)
    if a.size == 0 or n.sum() == 0:
        return (float("nan"), float("nan"))
    idx = np.random.default_rng(seed).integers(0, a.size, (n_boot, a.size))
    lo, hi = np.percentile(a[idx].sum(axis=1) / n[idx].sum(axis=1), [2.5, 97.5])
    return (float(lo), float(hi))


def write_job(folder: Path, emb: np.ndarray, runs: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "emb.npy", np.ascontiguousarray(emb, dtype=np.float32))
    (folder / "runs.json").write_text(json.dumps({"settings": settings, "runs": runs}))


def read_job(folder: Path) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, Any]]:
    emb = np.load(folder / "emb.npy")
    job = json.loads((folder / "runs.json").read_text())
    return emb, job["runs"], job["settings"]


def execute_runs(fit: FitFn, emb: np.ndarray, runs: list[dict[str, Any]], n_ref: int, n_cur: int,
                 dtype: Any = np.float64, control_budget: int | None = None) -> list[dict[str, Any] | None]:
    """:func:`execute_run` over ``runs``; only the first ``control_budget`` control runs
    are executed (``None`` in their place after that) - for the slow methods."""
    out: list[dict[str, Any] | None] = []
    seen_control = 0
    for r in runs:
        if r["scenario"] == "control":
            seen_control += 1
            if control_budget is not None and seen_control > control_budget:
                out.append(None)
                continue
        out.append(execute_run(fit, emb, r, n_ref, n_cur, dtype))
    return out


def execute_run(fit: FitFn, emb: np.ndarray, run: dict[str, Any], n_ref: int, n_cur: int,
                dtype: Any = np.float64) -> dict[str, Any]:
    """Fit on the first ``n_ref`` events, then test the windows of ``run['tests']`` in order.

    Early-stopping runs stop at the first drifted test, but the full-window test
    (``run['full_test']``) is always executed, so power there is known for every run.
    """
    stream = np.asarray(run["stream"], dtype=np.int64)
    ref = emb[stream[:n_ref]].astype(dtype)
    t = time.perf_counter()
    score = fit(ref)
    fit_s = time.perf_counter() - t
    out: list[dict[str, Any]] = []
    stopped = False
    for e in run["tests"]:
        if stopped and e != run.get("full_test"):
            continue
        cur = emb[stream[e - n_cur:e]].astype(dtype)
        t = time.perf_counter()
        stat, p, drifted = score(cur)
        dt = time.perf_counter() - t
        out.append({"e": int(e), "stat": float(stat), "p": None if p is None else float(p),
                    "drifted": bool(drifted), "s": dt})
        if drifted and run["early_stop"]:
            stopped = True
        if stopped and run.get("full_test") is not None and e >= run["full_test"]:
            break
    return {"fit_s": fit_s, "tests": out}
