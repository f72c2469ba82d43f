"""Peeking at an A/B test: the anytime-valid sequences of detectors/sequential.py against a
fixed-sample test repeated at every look.

Each run is one seeded stream of calls split at random between a baseline and a
candidate arm (50/50); after every ``per_look`` calls someone looks and stops at the
first look where the test says "different". Under an A/A stream (no difference) the
share of runs that ever say so is the false-positive rate under continuous
peeking: the target is ``alpha``. With a real difference, the same loop measures
power and the detection time (calls until the first "different").

Metrics simulated: mean latency (log-normal, sigma 0.6, heavy right tail), a 2 %
error rate, and p95 latency. The naive test: a two-sided z-test at ``alpha`` (pooled
for rates; for p95, the normal-approximation rank interval of each arm at
83.4 %, whose non-overlap is the usual stand-in for a 5 % two-sample test)
applied at every look as if it were the only one.

    python benchmarks/bench_sequential.py            # 2000 runs x 50 looks per metric
    python benchmarks/bench_sequential.py --runs 400 # quicker

The tests (tests/unit/test_sequential.py) run the same functions with fewer runs.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass

import numpy as np

from driftline.detectors.sequential import (
    MeanStats,
    mean_contrast_cs,
    proportion_contrast_cs,
    quantile_contrast,
    quantile_ranks,
)

Z_975 = 1.959963984540054  # two-sided 5 %
Z_917 = 1.3859  # two-sided 16.6 %: two such intervals that do not overlap ~ a 5 % two-sample test


@dataclass(frozen=True)
class PeekResult:
    """Share of runs that ever declared a difference (sequential, naive), and the calls
    (both arms) at the sequential test's first detection per run (``-1``: never)."""

    sequential: float
    naive: float
    stop_at: np.ndarray

    @property
    def median_stop(self) -> float:
        hit = self.stop_at[self.stop_at >= 0]
        return float(np.median(hit)) if hit.size else math.nan


def _split(rng: np.random.Generator, runs: int, n: int, share: float = 0.5) -> np.ndarray:
    return rng.random((runs, n)) < share  # True: candidate


def _first(hits: np.ndarray, per_look: int) -> np.ndarray:
    any_ = hits.any(axis=1)
    return np.where(any_, (hits.argmax(axis=1) + 1) * per_look, -1)


def simulate_means(runs: int, looks: int, per_look: int, seed: int, effect: float = 0.0,
                   alpha: float = 0.05, share: float = 0.5, min_n: int = 0) -> PeekResult:
    """Mean latency, log-normal(log 800 ms, 0.6); the candidate's values times ``1 + effect``;
    ``share``: the candidate's share of the traffic (a canary gets 5-10 %); ``min_n``: no
    verdict before both arms have this many calls (``compare --min-samples``)."""
    rng = np.random.default_rng(seed)
    n = looks * per_look
    x = rng.lognormal(math.log(800.0), 0.6, (runs, n))
    cand = _split(rng, runs, n, share)
    x = np.where(cand, x * (1.0 + effect), x)
    seq = np.zeros((runs, looks), bool)
    naive = np.zeros((runs, looks), bool)
    at = np.arange(1, looks + 1) * per_look
    for arm_is_c, name in ((False, "b"), (True, "c")):
        m = cand == arm_is_c
        cn = np.cumsum(m, axis=1)[:, at - 1]
        s1 = np.cumsum(np.where(m, x, 0.0), axis=1)[:, at - 1]
        s2 = np.cumsum(np.where(m, x * x, 0.0), axis=1)[:, at - 1]
        mean = s1 / np.maximum(cn, 1)
        var = (s2 - cn * mean * mean) / np.maximum(cn - 1, 1)
        if name == "b":
            nb, mb, vb = cn, mean, var
        else:
            nc, mc, vc = cn, mean, var
    for r in range(runs):
        for j in range(looks):
            iv = mean_contrast_cs(MeanStats(int(nb[r, j]), float(mb[r, j]), float(max(vb[r, j], 0.0))),
                                  MeanStats(int(nc[r, j]), float(mc[r, j]), float(max(vc[r, j], 0.0))), alpha)
            seq[r, j] = (iv.low > 0 or iv.high < 0) and min(nb[r, j], nc[r, j]) >= min_n
    se = np.sqrt(vb / np.maximum(nb, 1) + vc / np.maximum(nc, 1))
    naive = (np.abs(mc - mb) > Z_975 * se) & (np.minimum(nb, nc) >= max(min_n, 2))
    return PeekResult(float(seq.any(axis=1).mean()), float(naive.any(axis=1).mean()), _first(seq, per_look))


def simulate_rates(runs: int, looks: int, per_look: int, seed: int, p: float = 0.02, diff: float = 0.0,
                   alpha: float = 0.05, share: float = 0.5, min_n: int = 0) -> PeekResult:
    """Error rate ``p`` in the baseline, ``p + diff`` in the candidate (``share``, ``min_n``:
    as :func:`simulate_means`)."""
    rng = np.random.default_rng(seed)
    n = looks * per_look
    cand = _split(rng, runs, n, share)
    err = rng.random((runs, n)) < np.where(cand, p + diff, p)
    at = np.arange(1, looks + 1) * per_look
    nc = np.cumsum(cand, axis=1)[:, at - 1]
    nb = at[None, :] - nc
    xc = np.cumsum(err & cand, axis=1)[:, at - 1]
    xb = np.cumsum(err & ~cand, axis=1)[:, at - 1]
    seq = np.zeros((runs, looks), bool)
    for r in range(runs):
        for j in range(looks):
            iv = proportion_contrast_cs(int(xb[r, j]), int(nb[r, j]), int(xc[r, j]), int(nc[r, j]), alpha)
            seq[r, j] = (iv.low > 0 or iv.high < 0) and min(nb[r, j], nc[r, j]) >= min_n
    pooled = (xb + xc) / (nb + nc)
    se = np.sqrt(pooled * (1 - pooled) * (1 / np.maximum(nb, 1) + 1 / np.maximum(nc, 1)))
    naive = ((se > 0) & (np.abs(xc / np.maximum(nc, 1) - xb / np.maximum(nb, 1)) > Z_975 * se)
             & (np.minimum(nb, nc) >= min_n))
    return PeekResult(float(seq.any(axis=1).mean()), float(naive.any(axis=1).mean()), _first(seq, per_look))


def _order_stat(sorted_x: np.ndarray, rank: int) -> float:
    """``X_(rank)`` (1-based); rank 0 is -inf, rank n + 1 is +inf."""
    if rank <= 0:
        return -math.inf
    if rank > sorted_x.size:
        return math.inf
    return float(sorted_x[rank - 1])


def simulate_quantiles(runs: int, looks: int, per_look: int, seed: int, q: float = 0.95,
                       effect: float = 0.0, alpha: float = 0.05) -> PeekResult:
    """p``q`` latency (log-normal as :func:`simulate_means`); each arm's sequence at ``alpha / 2``."""
    rng = np.random.default_rng(seed)
    n = looks * per_look
    x = rng.lognormal(math.log(800.0), 0.6, (runs, n))
    cand = _split(rng, runs, n)
    x = np.where(cand, x * (1.0 + effect), x)
    seq = np.zeros((runs, looks), bool)
    naive = np.zeros((runs, looks), bool)
    ranks: dict[int, tuple[int, int, int]] = {}
    for r in range(runs):
        for j in range(looks):
            end = (j + 1) * per_look
            arms = []
            naive_arms = []
            for c in (False, True):
                s = np.sort(x[r, :end][cand[r, :end] == c])
                m = s.size
                if m not in ranks:
                    ranks[m] = quantile_ranks(m, q, alpha / 2)
                lo, est, hi = ranks[m]
                arms.append((_order_stat(s, lo), _order_stat(s, est), _order_stat(s, hi)))
                half = Z_917 * math.sqrt(m * q * (1 - q))
                naive_arms.append((_order_stat(s, math.floor(m * q - half)), _order_stat(s, math.ceil(m * q + half))))
            iv = quantile_contrast(arms[0], arms[1])
            seq[r, j] = iv.low > 0 or iv.high < 0
            (bl, bh), (cl, ch) = naive_arms
            naive[r, j] = cl > bh or ch < bl
    return PeekResult(float(seq.any(axis=1).mean()), float(naive.any(axis=1).mean()), _first(seq, per_look))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--looks", type=int, default=50)
    ap.add_argument("--per-look", type=int, default=200, help="calls (both arms) between two looks")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    runs, looks, per = a.runs, a.looks, a.per_look
    mc = 2 * math.sqrt(0.05 * 0.95 / runs)
    print(f"{runs} seeded runs x {looks} looks, a look every {per} calls (both arms, 50/50 split); "
          f"alpha 0.05; Monte-Carlo 2 s.e. at 5 %: {mc:.3f}")
    print(f"{'metric':<34} {'sequential':>10} {'naive':>8} {'median stop':>12} {'s':>6}")
    rows = [
        ("A/A mean latency", lambda: simulate_means(runs, looks, per, a.seed)),
        ("A/A error rate 2 %", lambda: simulate_rates(runs, looks, per, a.seed)),
        ("A/A error rate 0.5 %", lambda: simulate_rates(runs, looks, per, a.seed, p=0.005)),
        ("A/A mean latency, 10 % canary", lambda: simulate_means(runs, looks, per, a.seed, share=0.1)),
        ("  same, verdicts from 100 calls/arm", lambda: simulate_means(runs, looks, per, a.seed, share=0.1,
                                                                       min_n=100)),
        ("A/A error rate 2 %, 10 % canary", lambda: simulate_rates(runs, looks, per, a.seed, share=0.1)),
        ("A/A p95 latency", lambda: simulate_quantiles(min(runs, 500), looks, per, a.seed)),
        ("+15 % mean latency", lambda: simulate_means(runs, looks, per, a.seed + 1, effect=0.15)),
        ("error rate 2 % -> 4 %", lambda: simulate_rates(runs, looks, per, a.seed + 1, diff=0.02)),
        ("+15 % p95 latency", lambda: simulate_quantiles(min(runs, 500), looks, per, a.seed + 1, effect=0.15)),
    ]
    for name, fn in rows:
        t0 = time.perf_counter()
        r = fn()
        print(f"{name:<34} {r.sequential:>10.3f} {r.naive:>8.3f} {r.median_stop:>12.0f} "
              f"{time.perf_counter() - t0:>6.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
