"""Issue 20: the fast MMD and centroid tests (fixed permutation set per reference, float32
GEMMs) against direct formulas and against the implementations they replaced
(benchmarks/drift/previous.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from driftline.detectors import mmd as mmd_mod
from driftline.detectors.permutation import with_observed_split
from driftline.detectors.semantic import CentroidDrift, ClassifierDrift, MMDDrift

_PREV = Path(__file__).resolve().parents[2] / "benchmarks" / "drift" / "previous.py"
_spec = importlib.util.spec_from_file_location("drift_previous", _PREV)
assert _spec is not None and _spec.loader is not None
previous = importlib.util.module_from_spec(_spec)
sys.modules["drift_previous"] = previous
_spec.loader.exec_module(previous)


def direct_mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    def k(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.exp(-((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / bandwidth)

    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - n) / (n * (n - 1)) + (kyy.sum() - m) / (m * (m - 1)) - 2 * kxy.mean())


def _unit_rows(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_every_permuted_mmd_equals_the_direct_formula() -> None:
    """All P + 1 statistics of the fast path (observed and permuted, two window sizes, the
    unpacked and the bit-packed permutation store) equal the O(n²) formula to 1e-6."""
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(40, 6))
    det = MMDDrift(n_permutations=30, seed=11).fit(ref)
    for m, shift in ((25, 0.4), (18, 0.0)):
        cur = rng.normal(size=(m, 6)) + shift
        pc = det._perm_cache(m)
        got = det._stats_numpy(cur, pc)
        s = with_observed_split(np.random.default_rng([11, 0]), 30, 40, 40 + m)
        pooled = np.vstack([ref, cur])
        want = np.array([direct_mmd2(pooled[row], pooled[~row], det.bandwidth) for row in s])
        assert np.array_equal(pc.perms(40).s, s)
        assert np.abs(got - want).max() < 1e-6
        assert got[0] == pytest.approx(direct_mmd2(ref, cur, det.bandwidth), abs=1e-6)
        packed = mmd_mod._PermCache(**{**pc.__dict__, "unpacked": None})
        det._window = None  # compute every product again, from the unpacked bits
        assert np.array_equal(det._stats_numpy(cur, packed), got)


def test_mmd_later_tests_use_the_fixed_set_and_state_restores_it() -> None:
    rng = np.random.default_rng(6)
    ref, cur = rng.normal(size=(30, 4)), rng.normal(size=(20, 4)) + 0.2
    det = MMDDrift(n_permutations=60, seed=2).fit(ref)
    first = det.score(cur)
    again = det.score(cur)  # test 1: the same permutations as test 0, so the same result
    assert again == first
    restored = MMDDrift.from_state(json.loads(json.dumps(det.get_state())))
    assert restored.tests == 2 and restored.score(cur) == first


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_first_mmd_and_centroid_p_values_equal_the_previous_implementation(seed: int) -> None:
    """The first test after fit draws the permutations the previous code drew for it: the
    same p-values on seeded inputs (no drift, weak and clear drift), the same verdicts."""
    rng = np.random.default_rng(100 + seed)
    ref = _unit_rows(rng.normal(size=(120, 16)) + 1.0)
    for shift in (0.0, 0.1, 0.3):
        cur = rng.normal(size=(60, 16)) + 1.0
        cur[:, 0] += shift
        cur = _unit_rows(cur)
        new, old = MMDDrift(n_permutations=200, seed=seed), previous.PreviousMMDDrift(n_permutations=200, seed=seed)
        a, b = new.fit(ref).score(cur), old.fit(ref).score(cur)
        assert (a.p_value, a.drifted) == (b.p_value, b.drifted)
        assert a.statistic == pytest.approx(b.statistic, abs=1e-7)
        c_new = CentroidDrift(n_permutations=200, seed=seed).fit(ref).score(cur)
        c_old = previous.PreviousCentroidDrift(n_permutations=200, seed=seed).fit(ref).score(cur)
        assert c_new.p_value == c_old.p_value and c_new.drifted == c_old.drifted
        assert c_new.statistic == pytest.approx(c_old.statistic, rel=1e-12)


def test_centroid_cached_share_is_rebuilt_for_a_new_window_size_and_kept_small() -> None:
    rng = np.random.default_rng(9)
    ref = rng.normal(size=(50, 5)) + 1.0
    det = CentroidDrift(n_permutations=40, seed=4).fit(ref)
    for m in (20, 30):
        cur = rng.normal(size=(m, 5)) + 1.0
        r = det.score(cur)
        fresh = previous.PreviousCentroidDrift(n_permutations=40, seed=4).fit(ref).score(cur)
        assert r.p_value == fresh.p_value  # test 1 at m=30 still uses the [seed, 0] set
        assert det._perm is not None and det._perm[0] == m


def test_classifier_ledoit_wolf_beta_is_the_d_by_d_formula() -> None:
    rng = np.random.default_rng(12)
    mix = rng.normal(size=(12, 12))  # correlated features: the intensity lies inside (0, 1)
    x0, x1 = rng.normal(size=(80, 12)) @ mix, rng.normal(size=(70, 12)) @ mix
    det = ClassifierDrift(seed=0)
    _, lam = det._direction(x0, x1)
    z = np.vstack([x0 - x0.mean(0), x1 - x1.mean(0)])
    z = z / np.sqrt((z * z).sum(0) / len(z))
    s = z.T @ z / len(z)
    z2 = z * z
    beta = ((z2.T @ z2) / len(z) - s * s).sum() / len(z)
    delta = ((s - np.trace(s) / 12 * np.eye(12)) ** 2).sum()
    assert 0.0 < lam < 1.0
    assert lam == pytest.approx(beta / delta, rel=1e-10)


def test_slid_windows_reuse_the_kept_rows_and_match_the_direct_formula() -> None:
    """Windows that slide over a stream (as the worker's do) reuse the products of the rows
    they keep: every statistic still equals the O(n²) formula, the results equal a detector
    restored from state (no reuse) in p-value and to float32 round-off in the statistic, and a window that
    does not overlap is computed afresh. Repeated rows (a frequent prompt) are in the stream."""
    rng = np.random.default_rng(8)
    pool = rng.normal(size=(30, 5))
    stream = rng.integers(0, 30, 200)
    ref = pool[stream[:40]]
    det = MMDDrift(n_permutations=25, seed=6).fit(ref)
    s = with_observed_split(np.random.default_rng([6, 0]), 25, 40, 60)
    for e, expect_overlap in ((60, 0), (65, 15), (72, 13), (72, 20), (120, 0), (121, 19)):
        cur = pool[stream[e - 20:e]]
        prev = det._window
        assert (mmd_mod._overlap(prev.cur, cur) if prev is not None else 0) == expect_overlap
        state = det.get_state()
        got = det._stats_numpy(cur, det._perm_cache(20))
        pooled = np.vstack([ref, cur])
        want = np.array([direct_mmd2(pooled[row], pooled[~row], det.bandwidth) for row in s])
        assert np.abs(got - want).max() < 1e-6
        det._window = prev  # score the same window through the public path too
        r, fresh = det.score(cur), MMDDrift.from_state(state).score(cur)
        assert (r.p_value, r.drifted) == (fresh.p_value, fresh.drifted)
        assert r.statistic == pytest.approx(fresh.statistic, abs=1e-7)


def test_mmd_of_embeddings_far_from_the_origin_keeps_the_previous_p_value() -> None:
    """Review (issue 20): embeddings clustered far from the origin (a large common component,
    spread 1e-5 of its norm). The float32 kernel expanded as ``2a.b/h - |a|²/h - |b|²/h`` lost
    the distances to round-off there (|a|²/h ~ 1e7): a real shift (p 0.005 before) scored
    p ~0.7 (missed), and every statistic was off by far more than 1e-6. Catches: the points
    not centred on the reference's mean before the float32 products."""
    rng = np.random.default_rng(0)
    d = 16
    c = np.full(d, 100.0 / np.sqrt(d))
    ref = c + rng.normal(scale=1e-3, size=(200, d))
    for shift in (0.0, 3e-4):
        cur = c + rng.normal(scale=1e-3, size=(100, d)) + shift
        new = MMDDrift(n_permutations=200, seed=1).fit(ref)
        old = previous.PreviousMMDDrift(n_permutations=200, seed=1).fit(ref)
        a, b = new.score(cur), old.score(cur)
        assert a.p_value == b.p_value
        assert abs(a.statistic - b.statistic) < 1e-6
        assert abs(a.statistic - direct_mmd2(ref, cur, new.bandwidth)) < 1e-6


def test_mmd_keeps_at_most_8_mib_between_tests_at_many_permutations() -> None:
    """Review (issue 20): the stage asks for 8,192 permutations once it tests a dozen keys
    (``n_resamples`` of the Bonferroni level), and every MMD detector then kept its last
    window's ``2 s_r'K_rc`` ((P + 1) x n_cur float32: 9.8 MB at n_cur 300) between tests, on
    top of the permutation set: ~13 MB per key-field where the stage's max_keys assumes
    2-3 MB (500 key-fields: +6.5 GB). Catches: the window's products kept whatever their
    size. The p-values stay those of a detector that keeps them (a restored one)."""
    import tracemalloc

    rng = np.random.default_rng(2)
    ref, x = rng.normal(size=(50, 16)), rng.normal(size=(340, 16)) + 0.2
    det = MMDDrift(n_permutations=8191, seed=3).fit(ref)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        r1, r2 = det.score(x[:300]), det.score(x[40:340])
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert held <= 8 << 20, held
    fresh = MMDDrift(n_permutations=8191, seed=3).fit(ref)
    fresh.score(x[:300])
    assert (r1.p_value, r2.p_value) == (fresh.score(x[:300]).p_value, fresh.score(x[40:340]).p_value)


def test_mmd_of_one_text_embedded_with_jitter_keeps_the_previous_p_value() -> None:
    """Review (issue 20), the same defect at its most likely: one templated text embedded with
    run-to-run jitter (1e-6, as batched GPU encoders give) puts the bandwidth near 1e-10 and
    |x|²/h near 1e10. Uncentred float32 products scored a real shift p 0.75 (previous: 0.005)."""
    rng = np.random.default_rng(3)
    base = rng.normal(size=(1, 384))
    base /= np.linalg.norm(base)
    ref = base + rng.normal(scale=1e-6, size=(200, 384))
    for shift in (0.0, 2e-7):
        cur = base + rng.normal(scale=1e-6, size=(100, 384)) + shift
        a = MMDDrift(n_permutations=200, seed=1).fit(ref).score(cur)
        b = previous.PreviousMMDDrift(n_permutations=200, seed=1).fit(ref).score(cur)
        assert (a.p_value, a.drifted) == (b.p_value, b.drifted)
        assert abs(a.statistic - b.statistic) < 1e-6
