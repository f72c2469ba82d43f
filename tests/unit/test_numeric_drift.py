"""Numeric-field drift: KS, PSI and Wasserstein against exact computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from driftline.detectors.numeric import (
    KSDrift,
    PSIDrift,
    WassersteinDrift,
    psi,
    wasserstein_batched,
)
from driftline.detectors.semantic import permutation_indicators


def test_ks_is_scipy_ks_2samp() -> None:
    rng = np.random.default_rng(0)
    ref, cur = rng.lognormal(6, 0.5, 300), rng.lognormal(6.2, 0.5, 200)
    r = KSDrift().fit(ref).score(cur)
    expected = stats.ks_2samp(ref, cur)
    assert (r.statistic, r.p_value) == (float(expected.statistic), float(expected.pvalue))
    assert r.drifted and r.explanation["sign"] == 1  # current is larger: its CDF lies below
    assert r.explanation["cur_p50"] == pytest.approx(float(np.median(cur)))


def test_psi_by_hand_on_quantile_bins() -> None:
    ref = np.arange(1, 101, dtype=float)  # 1..100: quartile edges 25, 50, 75
    det = PSIDrift(n_bins=4).fit(ref)
    assert det.edges.tolist() == [25.0, 50.0, 75.0]
    cur = np.r_[np.full(10, 10.0), np.full(10, 40.0), np.full(20, 60.0), np.full(60, 90.0)]
    r = det.score(cur)
    ref_s, cur_s = np.full(4, 0.25), np.array([0.1, 0.1, 0.2, 0.6])
    expected = float(np.sum((cur_s - ref_s) * np.log(cur_s / ref_s)))
    assert r.statistic == pytest.approx(expected, rel=1e-12)  # 0.4605...
    assert r.drifted and r.p_value is None and r.threshold == 0.2
    assert r.explanation["rule"] == "drifted = statistic > threshold"


def test_psi_empty_bin_uses_the_eps_floor_and_values_outside_the_range_are_binned() -> None:
    det = PSIDrift(n_bins=2, eps=1e-4).fit(np.arange(10.0))
    r = det.score(np.full(5, 1e6))  # all beyond the reference maximum: last bin
    assert r.explanation["cur_shares"] == [0.0, 1.0]
    assert r.statistic == pytest.approx(psi(np.array([0.5, 0.5]), np.array([0.0, 1.0]), 1e-4))
    assert r.statistic == pytest.approx((1e-4 - 0.5) * np.log(1e-4 / 0.5) + 0.5 * np.log(2))


def test_psi_discrete_field_dedupes_edges() -> None:
    ref = np.r_[np.zeros(80), np.ones(15), np.full(5, 2.0)]  # e.g. a retry count
    det = PSIDrift(n_bins=10).fit(ref)
    assert det.edges.tolist() == [0.0, 1.0]  # bins {0}, {1}, {2, ...}
    assert det.score(np.r_[np.zeros(50), np.ones(50)]).explanation["cur_shares"] == [0.5, 0.5, 0.0]
    assert not det.score(ref.copy()).drifted
    assert det.score(ref.copy()).statistic == 0.0


def test_wasserstein_batched_equals_scipy() -> None:
    rng = np.random.default_rng(1)
    x = np.r_[rng.normal(size=30), rng.integers(0, 3, 20).astype(float)]  # with ties
    s = permutation_indicators(rng, 25, 22, 50)
    w = wasserstein_batched(x, s)
    expected = [stats.wasserstein_distance(x[row], x[~row]) for row in s]
    assert np.allclose(w, expected, rtol=1e-12, atol=1e-14)


def test_wasserstein_statistic_is_scaled_by_reference_iqr() -> None:
    rng = np.random.default_rng(2)
    ref, cur = rng.gamma(2.0, 300.0, 400), rng.gamma(2.0, 300.0, 300) + 200.0
    det = WassersteinDrift(seed=0).fit(ref)
    q1, q3 = np.quantile(ref, [0.25, 0.75])
    r = det.score(cur)
    assert det.scale == pytest.approx(q3 - q1)
    assert r.statistic == pytest.approx(stats.wasserstein_distance(ref, cur) / (q3 - q1), rel=1e-9)
    assert r.drifted and r.p_value == pytest.approx(1 / 301)
    assert not WassersteinDrift(seed=0, min_effect=5.0).fit(ref).score(cur).drifted


def test_wasserstein_false_alarm_rate_is_calibrated() -> None:
    rng = np.random.default_rng(3)
    alarms = sum(
        WassersteinDrift(n_permutations=100, seed=t).fit(rng.normal(size=60))
        .score(rng.normal(size=40)).drifted
        for t in range(200)
    )
    assert alarms <= stats.binom.ppf(0.999, 200, 0.05)
    assert alarms == 7  # the seeded figure (3.5%)


def test_numeric_input_validation() -> None:
    with pytest.raises(ValueError):
        KSDrift().fit(np.ones((3, 3)))
    with pytest.raises(ValueError):
        KSDrift().fit([1.0])
    det = KSDrift().fit(np.arange(10.0))
    assert det.score(np.arange(10.0).reshape(-1, 1)).statistic == 0.0  # column vector accepted
