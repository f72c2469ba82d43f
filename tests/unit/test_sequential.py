"""detectors/sequential.py: the confidence sequences' formulas against hand-computed values,
and seeded peeking simulations (benchmarks/bench_sequential.py's functions, fewer runs):
under A/A the sequential tests keep the false-positive rate under continuous peeking at
alpha where the naive repeated test does not; with a known difference they detect it, at
an exact stopping index on a fixed seed."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from driftline.detectors.sequential import (
    Interval,
    MeanStats,
    beta_binomial_log_martingale,
    mean_contrast_cs,
    mixture_radius,
    mixture_rho2,
    proportion_contrast_cs,
    quantile_contrast,
    quantile_ranks,
    rate_cs,
)

_spec = importlib.util.spec_from_file_location(
    "bench_sequential", Path(__file__).resolve().parents[2] / "benchmarks" / "bench_sequential.py")
assert _spec is not None and _spec.loader is not None
bench: Any = importlib.util.module_from_spec(_spec)
sys.modules["bench_sequential"] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)


# -- formulas, by hand ------------------------------------------------------------------

def test_rho2_and_radius_by_hand() -> None:
    # -a^2 - 2 ln a + ln(1 - 2 ln a - a^2), a = 0.05: -0.0025 + 5.991465 + ln(6.988965)
    assert mixture_rho2(200, 0.05) == pytest.approx(7.933298 / 200, rel=1e-6)
    # sqrt(v (1 + t r) / (t r) ln((1 + t r) / a^2)), v = 0.01, t = 100, r = 0.01
    assert mixture_radius(0.01, 100, 0.05, 0.01) == pytest.approx(math.sqrt(0.01 * 2 * math.log(2 / 0.0025)))


def test_mean_contrast_by_hand() -> None:
    b, c = MeanStats(100, 10.0, 4.0), MeanStats(100, 12.0, 4.0)
    iv = mean_contrast_cs(b, c, 0.05, t_opt=200)
    # v = 4/100 + 4/100; t rho^2 = 7.933298: sqrt(0.08 * 8.933298/7.933298 * ln(8.933298/0.0025))
    r = math.sqrt(0.08 * 8.933298 / 7.933298 * math.log(8.933298 / 0.0025))
    assert r == pytest.approx(0.858487, abs=1e-6)
    assert (iv.estimate, iv.low, iv.high) == pytest.approx((2.0, 2.0 - r, 2.0 + r), abs=1e-6)
    # "at most 5 % more": mu_c - 1.05 mu_b; variance 4/100 + 1.05^2 * 4/100
    iv = mean_contrast_cs(b, c, 0.05, ratio=1.05, t_opt=200)
    r = math.sqrt(0.0841 * 8.933298 / 7.933298 * math.log(8.933298 / 0.0025))
    assert (iv.estimate, iv.low, iv.high) == pytest.approx((1.5, 1.5 - r, 1.5 + r), abs=1e-6)
    # fewer than two values in an arm: unbounded
    assert not mean_contrast_cs(MeanStats(1, 5.0, 0.0), c).bounded


def test_mean_stats_of() -> None:
    s = MeanStats.of([1.0, 2.0, 4.0])
    assert (s.n, s.mean, s.var) == (3, pytest.approx(7 / 3), pytest.approx(((4 / 3) ** 2 + (1 / 3) ** 2 + (5 / 3) ** 2) / 2))


def test_proportion_contrast_by_hand() -> None:
    iv = proportion_contrast_cs(20, 1000, 45, 1000, 0.05, t_opt=2000)
    pb, pc = 21 / 1002, 46 / 1002  # smoothed (x + 1) / (n + 2)
    v = pb * (1 - pb) / 1000 + pc * (1 - pc) / 1000
    tr = 2000 * 7.933298 / 2000
    r = math.sqrt(v * (1 + tr) / tr * math.log((1 + tr) / 0.0025))
    assert (iv.estimate, iv.low, iv.high) == pytest.approx((0.025, 0.025 - r, 0.025 + r), abs=1e-7)
    # a small arm without events: the pooled variance of both arms is the floor
    iv = proportion_contrast_cs(40, 2000, 0, 100, 0.05, t_opt=2000)
    pp = 41 / 2102
    v = pp * (1 - pp) * (1 / 2000 + 1 / 100)  # > 41/2002 (1 - 41/2002) / 2000 + 1/102 (1 - 1/102) / 100
    r = math.sqrt(v * (1 + 2100 * tr / 2000) / (2100 * tr / 2000) * math.log((1 + 2100 * tr / 2000) / 0.0025))
    assert (iv.estimate, iv.low, iv.high) == pytest.approx((-0.02, -0.02 - r, -0.02 + r), abs=1e-7)
    # no events in either arm yet: still a nonzero width
    assert proportion_contrast_cs(0, 50, 0, 50).high > 0.05


def test_beta_binomial_martingale_by_hand_and_mean_one() -> None:
    # k=1 of t=2 at p=1/2 with Beta(1, 1): B(2, 2) / B(1, 1) / (1/2)^2 = (1/6) * 4
    assert float(beta_binomial_log_martingale(1, 2, 0.5, 2.0)) == pytest.approx(math.log(2 / 3))
    # a martingale of mean 1 under Bernoulli(p): sum_k C(t, k) p^k (1-p)^(t-k) M(k) = 1
    t, p = 12, 0.3
    k = np.arange(t + 1)
    w = np.array([math.comb(t, int(i)) * p ** i * (1 - p) ** (t - i) for i in k])
    assert float((w * np.exp(beta_binomial_log_martingale(k, t, p, 7.5))).sum()) == pytest.approx(1.0, abs=1e-12)


def test_quantile_ranks_are_the_kept_counts() -> None:
    n, q, alpha, size = 300, 0.9, 0.05, 1 / mixture_rho2(2000, 0.05) - 1
    lo, est, hi = quantile_ranks(n, q, alpha)
    logm = [math.lgamma(q * size + k) + math.lgamma((1 - q) * size + n - k) - math.lgamma(size + n)
            - (math.lgamma(q * size) + math.lgamma((1 - q) * size) - math.lgamma(size))
            - k * math.log(q) - (n - k) * math.log(1 - q) for k in range(n + 1)]
    kept = [k for k in range(n + 1) if logm[k] < math.log(1 / alpha)]
    assert kept == list(range(kept[0], kept[-1] + 1))  # an interval (convex in k)
    assert (lo, est, hi) == (kept[0], 270, kept[-1] + 1)
    assert lo < est < hi
    assert quantile_ranks(5, 0.95) == (quantile_ranks(5, 0.95)[0], 5, 6)  # too few: no upper bound yet


def test_quantile_contrast_and_rate_cs() -> None:
    iv = quantile_contrast((90.0, 100.0, 110.0), (120.0, 130.0, 150.0), ratio=1.1)
    assert (iv.estimate, iv.low, iv.high) == pytest.approx((20.0, 120 - 121.0, 150 - 99.0))
    iv = rate_cs(10, 1000)
    size = 1 / mixture_rho2(2000, 0.05) - 1
    assert iv.low < 0.01 < iv.high
    # just outside the interval the martingale has crossed 1/alpha; just inside it has not
    for p, crossed in ((iv.low * 0.99, True), (iv.low * 1.02, False), (iv.high * 1.01, True), (iv.high * 0.98, False)):
        assert (float(beta_binomial_log_martingale(10, 1000, p, size)) >= math.log(20)) is crossed


@pytest.mark.parametrize("call", [
    lambda: mean_contrast_cs(MeanStats(5, 1, 1), MeanStats(5, 1, 1), 0.0),
    lambda: mean_contrast_cs(MeanStats(5, 1, 1), MeanStats(5, 1, 1), ratio=0.0),
    lambda: MeanStats(3, 1.0, -1.0),
    lambda: proportion_contrast_cs(3, 2, 0, 5),
    lambda: quantile_ranks(10, 1.0),
    lambda: rate_cs(1, 10, t_opt=0),
    lambda: Interval(0.0, 1.0, -1.0),
])
def test_bad_arguments_raise(call: Any) -> None:
    with pytest.raises(ValueError):
        call()


# -- seeded peeking simulations ----------------------------------------------------------

ALPHA = 0.05
MC = 2 * math.sqrt(ALPHA * (1 - ALPHA) / 400)  # two standard errors over 400 runs: 0.022


def test_aa_mean_latency_with_peeking() -> None:
    r = bench.simulate_means(400, 50, 100, seed=11)
    print(f"A/A mean latency, 400 runs x 50 looks: sequential {r.sequential:.3f}, naive {r.naive:.3f}")
    assert r.sequential <= ALPHA + MC
    assert r.naive > 0.2  # the repeated fixed-sample test: several times alpha


def test_aa_error_rate_with_peeking() -> None:
    r = bench.simulate_rates(400, 50, 200, seed=12)
    print(f"A/A 2 % error rate, 400 runs x 50 looks: sequential {r.sequential:.3f}, naive {r.naive:.3f}")
    assert r.sequential <= ALPHA + MC
    assert r.naive > 0.2


def test_aa_p95_with_peeking() -> None:
    r = bench.simulate_quantiles(100, 20, 200, seed=13)
    print(f"A/A p95 latency, 100 runs x 20 looks: sequential {r.sequential:.3f}, naive {r.naive:.3f}")
    assert r.sequential <= ALPHA + 2 * math.sqrt(ALPHA * (1 - ALPHA) / 100)
    assert r.naive > 0.1


def test_detection_times_on_fixed_seeds() -> None:
    # +15 % latency: detected in every run; the first run's stopping point is exact
    r = bench.simulate_means(50, 50, 100, seed=21, effect=0.15)
    assert r.sequential == 1.0
    assert int(r.stop_at[0]) == STOP_MEAN
    # error rate 2 % -> 4 % (+2 pp)
    r = bench.simulate_rates(50, 50, 200, seed=22, diff=0.02)
    assert r.sequential >= 0.9
    assert int(r.stop_at[0]) == STOP_RATE
    # +30 % p95
    r = bench.simulate_quantiles(5, 25, 200, seed=23, effect=0.3)
    assert int(r.stop_at[0]) == STOP_P95


STOP_MEAN = 500  # calls, both arms
STOP_RATE = 3800
STOP_P95 = 1600
