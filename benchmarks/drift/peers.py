"""Peer drift detectors on a benchmark job, run inside benchmarks/drift/.venv (numpy<2).

    benchmarks/drift/.venv/bin/python benchmarks/drift/peers.py JOB_DIR [--only a,b]

Reads ``JOB_DIR/emb.npy`` + ``runs.json`` (written by bench_drift.py), runs every
peer on exactly the same reference / current windows with the same early-stop
rule (``common.execute_run``), and writes ``JOB_DIR/peers.json``:
``{"info": {method: settings/versions}, "results": {method: [per-run results]}}``.

Peers and the settings used (library defaults unless said):

* alibi-detect 0.13.0 ``MMDDrift(x_ref, backend="pytorch", p_val=alpha, device="cpu")``:
  defaults ``n_permutations=100``, ``configure_kernel_from_x_ref=True`` (GaussianRBF
  bandwidth from the reference by the median heuristic), no preprocessing. Fitted
  (constructed) once per run; ``predict(x)`` per test. float32 inputs (its usual dtype).
  Licence: Business Source License 1.1 (not open source for production use).
* Evidently 0.7.23 embedding drift methods (``evidently.legacy.metrics.data_drift.
  embedding_drift_methods``, the ones ``EmbeddingsDrift``/``EmbeddingsDriftMetric``
  calls) applied to ``(current_df, reference_df)`` directly - the computation of the
  metric without the Report wrapper:
  - ``model()``: SGDClassifier domain classifier on a 50/50 split, drift = ROC AUC > 0.55
    (the metric's default at n_ref >= 1000);
  - ``model(bootstrap=True)``: drift = AUC > 95th percentile of 100 random-score AUCs;
  - ``mmd()``: drift = MMD² > 0.015 (fixed threshold);
  - ``mmd(bootstrap=True)``: default ``quantile_probability=0.05`` (drift = MMD² > the 5th
    percentile of a bootstrap null) - reported as is;
  - ``ratio()``: per-component Wasserstein (normed) > 0.1, drift = share > 0.2;
  - ``distance()``: euclidean distance of means > 0.2;
  - ``distance(bootstrap=True)``: > 95th percentile of a bootstrap null.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import execute_run, execute_runs, limit_threads, read_job  # noqa: E402

limit_threads(1)

import argparse  # noqa: E402
import importlib.metadata as md  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402


def alibi_fit(alpha: float):
    import torch
    from alibi_detect.cd import MMDDrift

    torch.set_num_threads(1)

    def fit(ref: np.ndarray):
        det = MMDDrift(ref, backend="pytorch", p_val=alpha, device="cpu")

        def score(cur: np.ndarray):
            out = det.predict(cur, return_p_val=True, return_distance=True)["data"]
            return float(out["distance"]), float(out["p_val"]), bool(out["is_drift"])

        return score

    return fit


def evidently_fit(make):
    import pandas as pd

    def fit(ref: np.ndarray):
        def score(cur: np.ndarray):
            method = make()
            # fresh frames each call: ModelDriftMethod adds a 'target' column in place
            stat, drifted, _ = method(pd.DataFrame(cur), pd.DataFrame(ref))
            return float(stat), None, bool(drifted)

        return score

    return fit


def peer_methods(alpha: float) -> dict[str, tuple]:
    from evidently.legacy.metrics.data_drift import embedding_drift_methods as edm

    ev = f"evidently {md.version('evidently')}"
    al = f"alibi-detect {md.version('alibi-detect')} (torch {md.version('torch')}, BSL 1.1 licence)"
    return {
        "alibi MMDDrift (torch)": (alibi_fit(alpha), np.float32, "slow",
                                   f"{al}: MMDDrift(backend='pytorch', p_val={alpha}, n_permutations=100 [default], "
                                   "configure_kernel_from_x_ref=True [default], device='cpu')"),
        "evidently model (default)": (evidently_fit(lambda: edm.model()), np.float64, "mid",
                                      f"{ev}: model() - SGD domain classifier, 50/50 split, AUC > 0.55"),
        "evidently model bootstrap": (evidently_fit(lambda: edm.model(bootstrap=True)), np.float64, "slow",
                                      f"{ev}: model(bootstrap=True) - AUC > q95 of random-score AUCs"),
        "evidently mmd (default)": (evidently_fit(lambda: edm.mmd()), np.float64, "mid",
                                    f"{ev}: mmd() - MMD^2 > 0.015"),
        "evidently mmd bootstrap (default q=0.05)": (evidently_fit(lambda: edm.mmd(bootstrap=True)), np.float64, "slow",
                                                     f"{ev}: mmd(bootstrap=True) - quantile_probability=0.05 [default]"),
        "evidently ratio (default)": (evidently_fit(lambda: edm.ratio()), np.float64, "mid",
                                      f"{ev}: ratio() - wasserstein per component > 0.1, share > 0.2"),
        "evidently distance (default)": (evidently_fit(lambda: edm.distance()), np.float64, "fast",
                                         f"{ev}: distance() - euclidean between means > 0.2"),
        "evidently distance bootstrap": (evidently_fit(lambda: edm.distance(bootstrap=True)), np.float64, "mid",
                                         f"{ev}: distance(bootstrap=True) - > q95 of bootstrap null"),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("job", type=Path)
    ap.add_argument("--only", default="")
    ap.add_argument("--timing", action="store_true", help="only the timing run -> peers-timing.json")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    emb, runs, settings = read_job(a.job)
    only = [o for o in a.only.split(",") if o]
    n_ref, n_cur, alpha = settings["n_ref"], settings["n_cur"], settings["alpha"]
    budgets = {"fast": None, "mid": settings["mid_control_runs"], "slow": settings["slow_control_runs"]}
    info, results, tiers = {}, {}, {}
    for name, (fit, dtype, tier, desc) in peer_methods(alpha).items():
        if only and not any(o in name for o in only):
            continue
        t = time.perf_counter()
        info[name] = desc
        tiers[name] = tier
        if a.timing:
            results[name] = execute_run(fit, emb, settings["timing_run"], n_ref, n_cur, dtype)
            n = len(results[name]["tests"])
        else:
            results[name] = execute_runs(fit, emb, runs, n_ref, n_cur, dtype, budgets[tier])
            n = sum(len(x["tests"]) for x in results[name] if x)
        print(f"  {name}: {n} tests in {time.perf_counter() - t:.1f} s", flush=True)
    info["_versions"] = {p: md.version(p) for p in
                         ("alibi-detect", "evidently", "torch", "numpy", "pandas", "scikit-learn", "scipy")}
    out = a.job / ("peers-timing.json" if a.timing else "peers.json")
    out.write_text(json.dumps({"info": info, "tiers": tiers, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
