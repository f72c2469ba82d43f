"""One contract suite over every two-sample drift detector (embedding and numeric).

Each case: seeded no-drift data must not drift, a seeded clear shift must drift,
the same seed gives the identical result, a JSON round-trip of the state gives
identical scores, and bad settings raise ValueError at construction.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from driftline.detectors.numeric import KSDrift, PSIDrift, WassersteinDrift
from driftline.detectors.semantic import (
    CentroidDrift,
    ClassifierDrift,
    Detector,
    MMDDrift,
    NotFittedError,
    TopicMixDrift,
)
from driftline.schemas.drift_result import DriftResult

D = 8
CENTERS = np.vstack([np.eye(D)[i] * 4.0 + 1.0 for i in range(3)])


def embeddings(rng: np.random.Generator, n: int, mix: tuple[float, float, float]) -> np.ndarray:
    """A 3-topic mixture in 8-D with a common offset (like real embeddings, mean != 0)."""
    lab = rng.choice(3, size=n, p=mix)
    return CENTERS[lab] + rng.normal(size=(n, D))


REF_MIX = (0.5, 0.3, 0.2)
SHIFT_MIX = (0.2, 0.3, 0.5)


def emb_same(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return embeddings(rng, 300, REF_MIX), embeddings(rng, 200, REF_MIX)


def emb_shift(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return embeddings(rng, 300, REF_MIX), embeddings(rng, 200, SHIFT_MIX)


def num_same(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return rng.lognormal(6.0, 0.5, 400), rng.lognormal(6.0, 0.5, 300)


def num_shift(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return rng.lognormal(6.0, 0.5, 400), rng.lognormal(6.0, 0.5, 300) * 1.5


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[..., Detector]
    same: Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]]
    shift: Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]]
    bad_settings: tuple[dict[str, Any], ...]


CASES = [
    Case("mmd", lambda **kw: MMDDrift(**{"n_permutations": 200, **kw}), emb_same, emb_shift,
         ({"alpha": 0.0}, {"alpha": 1.5}, {"n_permutations": 5}, {"device": "tpu"},
          {"seed": -1}, {"max_bandwidth_points": 1})),
    Case("classifier", lambda **kw: ClassifierDrift(**kw), emb_same, emb_shift,
         ({"train_fraction": 0.0}, {"train_fraction": 1.0}, {"train_fraction": float("nan")},
          {"shrinkage": 1.5}, {"shrinkage": -0.1}, {"alpha": -0.1})),
    Case("topic_mix", lambda **kw: TopicMixDrift(**{"n_clusters": 3, **kw}), emb_same, emb_shift,
         ({"n_clusters": 1}, {"min_effect": 1.5}, {"seed": 1.5}, {"n_permutations": 5})),
    Case("centroid", lambda **kw: CentroidDrift(**kw), emb_same, emb_shift,
         ({"n_permutations": 5}, {"alpha": 1.0})),
    Case("ks", lambda **kw: KSDrift(**kw), num_same, num_shift, ({"alpha": 2.0},)),
    Case("psi", lambda **kw: PSIDrift(**kw), num_same, num_shift,
         ({"threshold": 0.0}, {"n_bins": 1}, {"eps": 0.0}, {"eps": 0.5})),
    Case("wasserstein", lambda **kw: WassersteinDrift(**{"n_permutations": 200, **kw}), num_same,
         num_shift, ({"n_permutations": 3}, {"min_effect": -1.0})),
]
IDS = [c.name for c in CASES]


def _bare_cls(case: Case) -> type[Detector]:
    return type(case.make())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_no_drift_on_same_distribution(case: Case) -> None:
    ref, cur = case.same(np.random.default_rng(11))
    r = case.make(seed=3).fit(ref).score(cur)
    assert isinstance(r, DriftResult)
    assert not r.drifted, r
    assert (r.n_ref, r.n_cur) == (len(ref), len(cur))
    row = r.to_row()
    assert row["drifted"] == 0 and json.loads(row["explanation"])["rule"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_drift_on_clear_shift(case: Case) -> None:
    ref, cur = case.shift(np.random.default_rng(12))
    r = case.make(seed=3).fit(ref).score(cur)
    assert r.drifted, r
    assert r.to_row()["drifted"] == 1
    if r.p_value is not None:
        assert r.p_value < 0.01


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_same_seed_same_result(case: Case) -> None:
    ref, cur = case.same(np.random.default_rng(13))
    a = case.make(seed=7).fit(ref)
    b = case.make(seed=7).fit(ref)
    ra = [a.score(cur) for _ in range(2)]
    rb = [b.score(cur) for _ in range(2)]
    assert ra == rb


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_round_trip_gives_identical_scores(case: Case) -> None:
    ref, cur = case.shift(np.random.default_rng(14))
    det = case.make(seed=5).fit(ref)
    det.score(cur)  # advance the test counter
    state = json.loads(json.dumps(det.get_state()))
    restored = _bare_cls(case).from_state(state)
    fresh = case.make(seed=5)
    fresh.set_state(state)
    expected = det.score(cur)
    assert restored.score(cur) == expected
    assert fresh.score(cur) == expected
    assert restored.settings == det.settings


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_scoring_does_not_touch_reference(case: Case) -> None:
    ref, cur = case.shift(np.random.default_rng(15))
    det = case.make(seed=5).fit(ref)
    before = det.get_state()
    det.score(cur)
    after = det.get_state()
    assert after["data"] == before["data"]
    assert after["tests"] == before["tests"] + 1


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bad_settings_raise(case: Case) -> None:
    for bad in case.bad_settings:
        with pytest.raises(ValueError):
            case.make(**bad)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_misuse_raises(case: Case) -> None:
    ref, cur = case.same(np.random.default_rng(16))
    det = case.make(seed=1)
    with pytest.raises(NotFittedError):
        det.score(cur)
    det.fit(ref)
    with pytest.raises(ValueError):
        det.score(np.full_like(cur, np.nan))
    other = case.make(seed=2)
    with pytest.raises(ValueError):
        other.set_state(det.get_state())  # settings differ (seed)
