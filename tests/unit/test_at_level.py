"""AtLevel: an embedding detector judged at a level set per test (detectors/at_level.py).

The drift stage reports exactly what this combining detector says; these tests pin its verdict
on seeded streams with exact p-values.
"""

from __future__ import annotations

import numpy as np
import pytest

from driftline.detectors.at_level import AtLevel
from driftline.detectors.centroid import CentroidDrift
from driftline.detectors.psi import PSIDrift
from driftline.detectors.topic_mix import TopicMixDrift


def test_verdict_is_taken_at_the_level_passed_not_the_detectors_own() -> None:
    # Mutation caught: AtLevel.score returning the wrapped detector's verdict (p < its own
    # alpha 0.05) gives drifted=True at level 0.01 here.
    rng = np.random.default_rng(0)
    det = AtLevel(CentroidDrift(n_permutations=999, seed=1), level="alpha / 3")
    det.fit(np.ones(8) + rng.normal(size=(300, 8)))
    cur = np.ones(8) + rng.normal(size=(200, 8))
    cur[:, 0] += 0.4
    r = det.score(cur, alpha=0.01)
    assert r.p_value == 0.017 and r.threshold == 0.01 and not r.drifted
    assert det.detector.alpha == 0.05 and det.detector.tests == 1  # one test, on the seeded stream
    assert r.explanation["rule"] == "drifted = p_value < threshold (threshold = alpha / 3)"
    assert r.explanation["detector_rule"] == "drifted = p_value < threshold (threshold = alpha)"
    with pytest.raises(ValueError, match="alpha must be in"):
        det.score(cur, alpha=0.0)


def test_topic_mix_keeps_its_effect_size_at_the_level() -> None:
    # Mutation caught: dropping the total-variation condition (drifted = p < level alone)
    # flags the first window, whose p is 1.6e-06 but whose total variation 0.187 < 0.2.
    centers = np.eye(3) * 10
    rng = np.random.default_rng(0)

    def sample(mix: list[float], n: int) -> np.ndarray:
        return centers[rng.choice(3, size=n, p=mix)] + rng.normal(size=(n, 3))

    det = AtLevel(TopicMixDrift(n_clusters=3, min_effect=0.2)).fit(sample([0.5, 0.3, 0.2], 600))
    small = det.score(sample([0.3, 0.3, 0.4], 300), alpha=0.001)
    assert small.p_value < 1e-5 and small.explanation["total_variation"] == pytest.approx(0.18666666666666668)
    assert not small.drifted
    rng = np.random.default_rng(0)
    det = AtLevel(TopicMixDrift(n_clusters=3, min_effect=0.2)).fit(sample([0.5, 0.3, 0.2], 600))
    big = det.score(sample([0.25, 0.3, 0.45], 300), alpha=0.001)
    assert big.drifted and big.explanation["total_variation"] == pytest.approx(0.2166666666666667)


def test_a_detector_with_another_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="AtLevel judges the p-value detectors"):
        AtLevel(PSIDrift())
