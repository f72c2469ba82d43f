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
from driftline.detectors.drift import (
    CentroidDrift,
    ClassifierDrift,
    MMDDrift,
    TopicMixDrift,
    decode_array,
    default_n_clusters,
    encode_array,
    permutation_indicators,
)
from driftline.schemas.drift import DriftResult


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
    assert r.statistic == pytest.approx(naive_unbiased_mmd2(ref, cur, det.bandwidth), rel=1e-9)


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
        assert a.statistic == pytest.approx(b.statistic, rel=1e-9, abs=1e-15)


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
    ref = rng.normal(size=(200, 6))
    cur = rng.normal(size=(150, 6))
    cur[:30, 0] += 4.0  # 30 points from a new region
    texts = [f"old-{i}" for i in range(120)] + [f"other-{i}" for i in range(30)]
    texts = [f"new-{i}" for i in range(30)] + texts[:120]
    r = ClassifierDrift(seed=1).fit(ref).score(cur, texts=texts)
    assert r.drifted and 0.5 < r.statistic <= 1.0
    assert r.explanation["auc"] == r.statistic
    assert all(t.startswith("new-") for t in r.explanation["most_current_like"])


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
    # an unchanged mix is not drift: 40 draws, alarms within the 99.9% binomial bound of 5%
    alarms = sum(det.score(sample([0.6, 0.3, 0.1], 400)[0]).drifted for _ in range(40))
    assert alarms <= stats.binom.ppf(0.999, 40, 0.05)  # 7


def test_topic_mix_small_counts_are_pooled() -> None:
    rng = np.random.default_rng(5)
    centers = np.eye(4) * 10
    lab = np.r_[np.zeros(100, int), np.ones(100, int), np.full(4, 2), np.full(3, 3)]
    ref = centers[lab] + rng.normal(size=(lab.size, 4))
    det = TopicMixDrift(n_clusters=4, seed=0).fit(ref)
    cur = centers[np.r_[np.zeros(20, int), np.ones(20, int)]] + rng.normal(size=(40, 4))
    r = det.score(cur)
    assert sorted(r.explanation["pooled_clusters"]) == sorted(
        [c["cluster"] for c in r.explanation["clusters"] if c["ref_count"] < 10]
    )
    assert not r.drifted


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


def test_centroid_threshold_is_the_bootstrap_quantile() -> None:
    rng = np.random.default_rng(7)
    ref = 1.0 + rng.normal(size=(200, 5))
    det = CentroidDrift(alpha=0.1, n_bootstrap=100, seed=3).fit(ref)
    cur = 1.0 + rng.normal(size=(50, 5))
    r = det.score(cur)
    null = det.null_distribution(50)
    assert r.threshold == float(np.quantile(null, 0.9, method="higher"))
    mu_r, mu_c = ref.mean(0), cur.mean(0)
    cos = mu_r @ mu_c / np.linalg.norm(mu_r) / np.linalg.norm(mu_c)
    assert r.statistic == pytest.approx(1 - cos, rel=1e-9)
    # the null depends only on seed and size: a restored detector has the same one
    again = CentroidDrift.from_state(json.loads(json.dumps(det.get_state())))
    assert np.array_equal(again.null_distribution(50), null)


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
