"""Embedding drift detectors: exact statistics, numpy/torch agreement, calibration, explanations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from driftline.detectors.calibration import (
    alpha_for_budget,
    bonferroni,
    expected_false_alarms_per_day,
    holm,
    prob_any_false_alarm_per_day,
)
from driftline.detectors.semantic import (
    CentroidDrift,
    ClassifierDrift,
    MMDDrift,
    TopicMixDrift,
    decode_array,
    default_n_clusters,
    encode_array,
    permutation_indicators,
)
from driftline.schemas.drift_result import DriftResult


def naive_unbiased_mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    def k(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.exp(-((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / bandwidth)

    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2 * kxy.mean()
    )


def test_mmd_statistic_matches_direct_formula_and_median_bandwidth() -> None:
    rng = np.random.default_rng(0)
    ref, cur = rng.normal(size=(40, 5)), rng.normal(size=(30, 5)) + 0.3
    det = MMDDrift(n_permutations=50).fit(ref)
    d2 = ((ref[:, None, :] - ref[None, :, :]) ** 2).sum(-1)
    assert det.bandwidth == pytest.approx(np.median(d2[np.triu_indices(40, 1)]), rel=1e-12)
    r = det.score(cur)
    # the kernel is computed in float32 (issue 20): ~1e-8 from the float64 formula here
    assert r.statistic == pytest.approx(naive_unbiased_mmd2(ref, cur, det.bandwidth), abs=1e-7)


def test_mmd_p_value_is_the_permutation_rank() -> None:
    rng = np.random.default_rng(1)
    ref, cur = rng.normal(size=(25, 3)), rng.normal(size=(20, 3))
    det = MMDDrift(n_permutations=99, seed=4).fit(ref)
    r = det.score(cur)
    # Recompute the same permutations one by one with the direct formula.
    s = permutation_indicators(np.random.default_rng([4, 0]), 100, 25, 45)
    pooled = np.vstack([ref, cur])
    null = [naive_unbiased_mmd2(pooled[row], pooled[~row], det.bandwidth) for row in s[1:]]
    expected = (1 + sum(v >= r.statistic - 1e-12 for v in null)) / 100
    assert r.p_value == pytest.approx(expected, abs=1e-15)


def test_permutation_indicators_rows_are_subsets_of_the_right_size() -> None:
    s = permutation_indicators(np.random.default_rng(0), 500, 7, 20)
    assert s.shape == (500, 20) and (s.sum(axis=1) == 7).all()
    # every position is picked with probability 7/20
    assert np.allclose(s.mean(axis=0), 7 / 20, atol=0.07)


def test_mmd_numpy_and_torch_give_identical_p_values() -> None:
    pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(150, 16))
    for shift in (0.0, 0.15, 0.5):
        cur = rng.normal(size=(100, 16)) + shift
        a = MMDDrift(n_permutations=300, seed=9).fit(ref).score(cur)
        b = MMDDrift(n_permutations=300, seed=9, device="cpu").fit(ref).score(cur)
        assert a.p_value == b.p_value
        assert a.drifted == b.drifted
        # numpy computes the kernel in float32, torch in float64
        assert a.statistic == pytest.approx(b.statistic, abs=1e-7)


def test_mmd_false_alarm_rate_is_calibrated() -> None:
    """200 seeded no-drift tests: false alarms <= alpha·200 + a 99.9% binomial margin."""
    alpha, n_tests = 0.05, 200
    rng = np.random.default_rng(2024)
    alarms = 0
    for t in range(n_tests):
        det = MMDDrift(alpha=alpha, n_permutations=100, seed=t).fit(rng.normal(size=(30, 4)))
        alarms += det.score(rng.normal(size=(20, 4))).drifted
    bound = stats.binom.ppf(0.999, n_tests, alpha)  # 21
    assert alarms <= bound
    assert alarms == 7  # the seeded figure (3.5%), so a change in the test is visible


def test_classifier_auc_and_examples() -> None:
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(600, 6))
    cur = rng.normal(size=(400, 6))
    cur[:120, 0] += 4.0  # 120 points (30%) from a new region
    texts = [f"new-{i}" for i in range(120)] + [f"old-{i}" for i in range(280)]
    r = ClassifierDrift(seed=1).fit(ref).score(cur, texts=texts)
    # held out: half of each sample (train_fraction 0.5), ~60 new points among 200 current
    assert r.explanation["n_test"] == [300, 200] and r.explanation["n_train"] == [300, 200]
    assert r.drifted and r.p_value is not None and r.p_value < 1e-3
    # the new points outscore the reference (AUC ~ 0.5 + 0.3 / 2 = 0.65; its SE here ~0.025)
    assert r.statistic == pytest.approx(0.65, abs=0.06)
    assert r.explanation["auc"] == r.statistic
    assert all(t.startswith("new-") for t in r.explanation["most_current_like"])


def test_classifier_p_value_is_the_held_out_mann_whitney() -> None:
    """The p-value and AUC are the one-sided Mann-Whitney U of one model's held-out scores."""
    rng = np.random.default_rng(31)
    ref, cur = rng.normal(size=(60, 4)), rng.normal(size=(40, 4)) + 0.3
    det = ClassifierDrift(seed=2, train_fraction=0.5).fit(ref)
    r = det.score(cur)
    # Recompute the split the detector draws from its test stream, then the model.
    split = np.random.default_rng([2, 0])
    pr, pc = split.permutation(60), split.permutation(40)
    w, _ = det._direction(ref[np.sort(pr[:30])], cur[np.sort(pc[:20])])
    s_ref, s_cur = ref[np.sort(pr[30:])] @ w, cur[np.sort(pc[20:])] @ w
    mw = stats.mannwhitneyu(s_cur, s_ref, alternative="greater")
    assert r.p_value == pytest.approx(mw.pvalue, rel=1e-12)
    assert r.statistic == pytest.approx(mw.statistic / (30 * 20), rel=1e-12)
    # shrinkage 1 is the (standardised) mean-difference direction
    one = ClassifierDrift(shrinkage=1.0)
    x0, x1 = rng.normal(size=(50, 3)), rng.normal(size=(30, 3)) + 1.0
    w1, lam = one._direction(x0, x1)
    z = np.vstack([x0 - x0.mean(0), x1 - x1.mean(0)])
    var = (z * z).mean(0)
    expected = (x1.mean(0) - x0.mean(0)) / var
    assert lam == 1.0
    assert np.allclose(w1 / np.linalg.norm(w1), expected / np.linalg.norm(expected))


def test_classifier_false_alarm_rate_is_calibrated() -> None:
    """300 independent no-drift tests (fresh data each): alarms within the 99.9% binomial bound."""
    alpha, n_tests = 0.05, 300
    rng = np.random.default_rng(2025)
    alarms = 0
    for t in range(n_tests):
        det = ClassifierDrift(alpha=alpha, seed=t).fit(rng.normal(size=(60, 5)))
        alarms += det.score(rng.normal(size=(40, 5))).drifted
    # Held-out scores of one model are i.i.d. under no drift, so each test alarms
    # with probability alpha and the count is Binomial(300, 0.05): mean 15.
    assert alarms <= stats.binom.ppf(0.999, n_tests, alpha)  # 28
    assert alarms >= stats.binom.ppf(0.001, n_tests, alpha)  # 5: not vacuously conservative


def test_topic_mix_explanation_names_the_grown_cluster() -> None:
    rng = np.random.default_rng(4)
    centers = np.array([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    names = ["billing", "coding", "jailbreak"]

    def sample(mix: list[float], n: int) -> tuple[np.ndarray, list[str]]:
        lab = rng.choice(3, size=n, p=mix)
        x = centers[lab] + rng.normal(size=(n, 3))
        return x, [f"{names[c]} #{i}" for i, c in enumerate(lab)]

    ref, ref_texts = sample([0.6, 0.3, 0.1], 600)
    det = TopicMixDrift(n_clusters=3, seed=0).fit(ref, texts=ref_texts)
    cur, cur_texts = sample([0.3, 0.3, 0.4], 400)
    r = det.score(cur, texts=cur_texts)
    assert r.drifted and r.p_value is not None and r.p_value < 1e-10
    ex = r.explanation
    top = ex["clusters"][0]
    assert top["cluster"] == ex["grown"]
    # the grown cluster is the jailbreak topic, +30 points of share (within sampling error)
    assert all(t.startswith("jailbreak") for t in top["examples"] + top["cur_examples"])
    assert len(top["examples"]) == 3
    assert top["delta"] == pytest.approx(0.3, abs=0.06)
    assert top["delta"] == pytest.approx(top["cur_share"] - top["ref_share"], abs=1e-12)
    by_name = {c["examples"][0].split()[0]: c for c in ex["clusters"]}
    assert by_name["billing"]["delta"] == pytest.approx(-0.3, abs=0.06)
    assert abs(by_name["coding"]["delta"]) < 0.06
    assert ex["shrunk"] == by_name["billing"]["cluster"]
    assert sum(c["delta"] for c in ex["clusters"]) == pytest.approx(0.0, abs=1e-12)
    assert ex["total_variation"] == pytest.approx(0.5 * sum(abs(c["delta"]) for c in ex["clusters"]))
    json.loads(r.to_row()["explanation"])
    # reference shares are counted on the half of the reference KMeans was not fitted to
    assert ex["n_ref_counted"] == 300
    assert sum(c["ref_count"] for c in ex["clusters"]) == 300


def test_topic_mix_false_alarm_rate_is_calibrated() -> None:
    """40 independent no-drift tests, each with its own reference: alarms <= the binomial bound.

    Each draw fits a fresh detector on a fresh reference. Repeated draws against
    one reference are not independent trials (how typical that one reference is
    moves every test's chance of an alarm together), so a binomial bound on
    them would not be principled; with a fresh reference per draw the alarms
    are Binomial(40, p) with p <= alpha when the test is calibrated.
    """
    rng = np.random.default_rng(41)
    centers = np.array([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])

    def sample(n: int) -> np.ndarray:
        return centers[rng.choice(3, size=n, p=[0.6, 0.3, 0.1])] + rng.normal(size=(n, 3))

    alpha, n_tests = 0.05, 40
    alarms = 0
    for t in range(n_tests):
        det = TopicMixDrift(alpha=alpha, n_clusters=3, seed=t).fit(sample(600))
        alarms += det.score(sample(400)).drifted
    assert alarms <= stats.binom.ppf(0.999, n_tests, alpha)  # 7


def test_topic_mix_small_counts_use_a_monte_carlo_p_value() -> None:
    rng = np.random.default_rng(5)
    centers = np.eye(4) * 10
    # Two small clusters (12 and 10 points): after the fit/count split about half
    # of each is counted, and against a current window without them their
    # expected counts are < 5, so the chi-square approximation is not used.
    lab = np.r_[np.zeros(200, int), np.ones(200, int), np.full(12, 2), np.full(10, 3)]
    ref = centers[lab] + rng.normal(size=(lab.size, 4))
    det = TopicMixDrift(n_clusters=4, seed=0, n_permutations=499).fit(ref)
    # KMeans found the four true clusters (one centroid near each center)
    owner = np.argmin(((det.centroids[:, None, :] - centers[None]) ** 2).sum(-1), axis=0)
    assert sorted(owner) == [0, 1, 2, 3]
    cur = centers[np.r_[np.zeros(20, int), np.ones(20, int)]] + rng.normal(size=(40, 4))
    r = det.score(cur)
    ex = r.explanation
    assert ex["n_ref_counted"] == lab.size - lab.size // 2
    assert ex["p_value_method"].startswith("Monte-Carlo")
    assert sorted(ex["small_expected_clusters"]) == sorted(owner[[2, 3]].tolist())
    # Recompute independently: the same 499 tables (margins fixed) from the test's
    # stream, each G from scipy, and the rank p-value.
    by_id = {c["cluster"]: (c["ref_count"], c["cur_count"]) for c in ex["clusters"]}
    table = np.array([by_id[c] for c in range(4)]).T
    g = stats.chi2_contingency(table, correction=False, lambda_="log-likelihood").statistic
    assert r.statistic == pytest.approx(g, rel=1e-12)
    sims = np.random.default_rng([0, 0]).multivariate_hypergeometric(table.sum(0), 40, size=499)
    null = [stats.chi2_contingency(np.stack([table.sum(0) - c, c]), correction=False,
                                   lambda_="log-likelihood").statistic for c in sims]
    assert r.p_value == pytest.approx((1 + sum(x >= g - 1e-9 for x in null)) / 500, abs=1e-12)
    assert not r.drifted


def test_topic_mix_keeps_power_at_a_tiny_reference() -> None:
    """40 reference rows (20 counted), 2 topics: a 50/50 -> 5/95 shift is still seen."""
    rng = np.random.default_rng(53)
    centers = np.eye(8)[:2] * 4

    def mix(p: list[float], n: int) -> np.ndarray:
        return centers[rng.choice(2, size=n, p=p)] + rng.normal(size=(n, 8))

    det = TopicMixDrift(seed=0).fit(mix([0.5, 0.5], 40))  # default k: 2
    same, shifted = det.score(mix([0.5, 0.5], 30)), det.score(mix([0.05, 0.95], 30))
    assert shifted.explanation["p_value_method"].startswith("Monte-Carlo")
    assert shifted.p_value is not None and shifted.p_value < 0.01 and shifted.drifted
    assert same.p_value is not None and same.p_value > 0.05 and not same.drifted


def test_topic_mix_small_cluster_ids_are_cluster_ids_when_a_cluster_is_empty() -> None:
    rng = np.random.default_rng(51)
    centers = np.eye(4) * 10
    det = TopicMixDrift(n_clusters=4, seed=0).fit(centers[np.repeat(np.arange(4), 50)]
                                                  + rng.normal(size=(200, 4)))
    owner = np.argmin(((det.centroids[:, None, :] - centers[None]) ** 2).sum(-1), axis=0)
    state = det.get_state()
    counts = np.zeros(4, int)
    counts[owner] = [60, 0, 3, 60]  # true cluster 1: empty in the reference, 2: tiny
    state["data"]["ref_counts"] = counts.tolist()
    det.set_state(state)
    cur = centers[np.r_[np.zeros(30, int), np.full(30, 3)]] + rng.normal(size=(60, 4))
    r = det.score(cur)
    # the cluster empty in both is dropped; the tiny one is reported by its own id
    assert r.explanation["small_expected_clusters"] == [int(owner[2])]
    assert r.explanation["p_value_method"].startswith("Monte-Carlo")


def test_topic_mix_tiny_reference_is_not_split() -> None:
    """Below 2 x n_clusters rows the reference is fitted and counted whole; above, split in half."""
    rng = np.random.default_rng(52)
    tiny = np.eye(3)[[0, 0, 1, 1, 2]] * 10 + rng.normal(size=(5, 3))
    det = TopicMixDrift(n_clusters=3).fit(tiny)  # 5 // 2 = 2 < 3 clusters: no split
    assert sum(det.get_state()["data"]["ref_counts"]) == 5
    assert det.score(tiny).explanation["n_ref_counted"] == 5
    six = np.eye(3)[[0, 0, 1, 1, 2, 2]] * 10 + rng.normal(size=(6, 3))
    det = TopicMixDrift(n_clusters=3).fit(six)  # 6 // 2 = 3: fitted on 3 rows, counted on 3
    assert sum(det.get_state()["data"]["ref_counts"]) == 3


def test_topic_mix_default_k_rule() -> None:
    assert [default_n_clusters(n) for n in (10, 80, 500, 1000, 2880, 10**6)] == [2, 2, 5, 7, 12, 12]


def test_topic_mix_novel_share_sees_a_new_topic() -> None:
    rng = np.random.default_rng(6)
    ref = np.eye(3)[rng.choice(2, 400)] * 10 + rng.normal(size=(400, 3))
    det = TopicMixDrift(n_clusters=2).fit(ref)
    cur = np.vstack([np.eye(3)[rng.choice(2, 150)] * 10, np.eye(3)[[2] * 50] * 10])
    cur = cur + rng.normal(size=cur.shape)
    r = det.score(cur)
    assert r.explanation["novel_share"] == pytest.approx(0.25, abs=0.03)


def test_centroid_permutation_null_is_exact() -> None:
    rng = np.random.default_rng(7)
    ref = 1.0 + rng.normal(size=(200, 5))
    cur = 1.0 + rng.normal(size=(50, 5))
    det = CentroidDrift(alpha=0.1, n_permutations=100, seed=3).fit(ref)
    r = det.score(cur)
    mu_r, mu_c = ref.mean(0), cur.mean(0)
    cos = mu_r @ mu_c / np.linalg.norm(mu_r) / np.linalg.norm(mu_c)
    assert r.statistic == pytest.approx(1 - cos, rel=1e-9)
    # the null, recomputed by hand from the same permutation stream (test 0)
    s = permutation_indicators(np.random.default_rng([3, 0]), 100, 200, 250)
    pooled = np.vstack([ref, cur])
    null = []
    for row in s:
        a, b = pooled[row].mean(0), pooled[~row].mean(0)
        null.append(1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    null = np.array(null)
    assert r.p_value == pytest.approx((1 + np.sum(null >= r.statistic - 1e-12)) / 101, abs=1e-12)
    assert r.explanation["statistic_threshold"] == pytest.approx(np.quantile(null, 0.9, method="higher"))
    assert r.drifted == (r.p_value < 0.1)
    # a restored detector draws the same permutations
    again = CentroidDrift.from_state(json.loads(json.dumps(det.get_state())))
    det2 = CentroidDrift(alpha=0.1, n_permutations=100, seed=3).fit(ref)
    det2.score(cur)
    assert again.score(cur) == det2.score(cur)


def test_centroid_false_alarms_stay_within_the_binomial_range_of_alpha() -> None:
    # exact by construction: under no drift the permutation p-value is
    # super-uniform, so over 400 seeded null datasets the alarms at alpha 0.1
    # stay within the binomial(400, 0.1) range
    rng = np.random.default_rng(21)
    alarms = 0
    for i in range(400):
        ref = rng.normal(size=(60, 4)) + 0.5
        cur = rng.normal(size=(30, 4)) + 0.5
        alarms += CentroidDrift(alpha=0.1, n_permutations=99, seed=i).fit(ref).score(cur).drifted
    assert 25 <= alarms <= 55, alarms


def test_array_codec_is_exact() -> None:
    a = np.random.default_rng(8).normal(size=(7, 3))
    assert np.array_equal(decode_array(json.loads(json.dumps(encode_array(a)))), a)


def test_drift_result_validation_and_row() -> None:
    r = DriftResult("psi", 0.31, None, 0.2, True, 10, 20, {"a": [1, 2.5, "x"]})
    assert r.to_row() == {
        "method": "psi", "statistic": 0.31, "p_value": None, "threshold": 0.2,
        "drifted": 1, "n_ref": 10, "n_cur": 20, "explanation": '{"a": [1, 2.5, "x"]}',
    }
    with pytest.raises(TypeError):
        DriftResult("x", 0.0, 0.5, 0.05, False, 1, 1, {"bad": np.int64(3)})
    with pytest.raises(ValueError):
        DriftResult("x", 0.0, 1.5, 0.05, False, 1, 1, {})
    with pytest.raises(ValueError):
        DriftResult("x", math.nan, 0.5, 0.05, False, 1, 1, {})


def test_multiple_testing_and_false_alarm_budget() -> None:
    assert bonferroni(0.05, 10) == pytest.approx(0.005)
    # Holm: 0.01 <= 0.05/4; next 0.03 > 0.05/3 stops
    assert holm([0.01, 0.04, 0.03, 0.2], 0.05) == [True, False, False, False]
    assert holm([0.001, 0.012, None, 0.04], 0.05) == [True, True, False, True]
    # 5-minute windows, 20 keys x 4 fields = 23 040 tests a day
    assert expected_false_alarms_per_day(0.01, 300, 20, 4) == pytest.approx(230.4)
    assert alpha_for_budget(1.0, 300, 20, 4) == pytest.approx(1 / 23040)
    p = prob_any_false_alarm_per_day(1 / 23040, 300, 20, 4)
    assert p == pytest.approx(1 - (1 - 1 / 23040) ** 23040) and 0.63 < p < 0.64
    with pytest.raises(ValueError):
        bonferroni(0.05, 0)
    with pytest.raises(ValueError):
        alpha_for_budget(1e6, 300, 1, 1)
