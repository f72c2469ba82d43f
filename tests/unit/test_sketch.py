"""QuantileSketch against exact quantiles (ClickHouse quantileExact rank rule)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from driftline.detectors.sketch import QuantileSketch

QS = (0.5, 0.9, 0.95, 0.99)
ROUND = 1 + 1e-9  # float rounding at bucket boundaries


def exact(values: np.ndarray, q: float) -> float:
    s = np.sort(values)
    return float(s[min(math.floor(q * len(s)), len(s) - 1)])


def data(kind: str) -> np.ndarray:
    rng = np.random.default_rng(42)
    if kind == "lognormal":
        return rng.lognormal(mean=5.0, sigma=1.2, size=20_000)
    if kind == "exponential":
        return rng.exponential(scale=300.0, size=20_000)
    return np.concatenate([rng.normal(200, 20, 15_000).clip(0.5), rng.lognormal(9, 0.5, 5_000)])


@pytest.mark.parametrize("kind", ["lognormal", "exponential", "mixture"])
@pytest.mark.parametrize("acc", [0.01, 0.05])
def test_relative_error_against_exact(kind: str, acc: float) -> None:
    x = data(kind)
    s = QuantileSketch(relative_accuracy=acc)
    s.add_many(x)
    assert s.count == x.size and s.min == x.min() and s.max == x.max()
    assert abs(s.sum - float(x.sum())) <= 1e-9 * float(x.sum())
    for q in QS:
        e = exact(x, q)
        got = s.quantile(q)
        assert got is not None and abs(got - e) <= acc * e * ROUND, (q, got, e)
    assert s.quantile(0.0) == x.min() and s.quantile(1.0) == x.max()


def test_rank_rule_is_quantile_exact() -> None:
    s = QuantileSketch(0.001)
    s.add_many(np.array([10.0, 20.0, 30.0, 40.0]))
    # quantileExact(0.5) over 4 values is index floor(2) = 30, not the midpoint 25
    assert s.quantiles([0.25, 0.5, 0.74, 0.75]) == pytest.approx(
        [20.0, 30.0, 30.0, 40.0], rel=0.001
    )


def test_merge_equals_sketch_of_concatenation() -> None:
    rng = np.random.default_rng(7)
    a, b = rng.lognormal(2, 1, 5000), rng.lognormal(6, 2, 3000)
    sa, sb, sab = QuantileSketch(), QuantileSketch(), QuantileSketch()
    sa.add_many(a)
    sb.add_many(b)
    sab.add_many(np.concatenate([a, b]))
    sa.merge(sb)
    ga, gab = sa.get_state(), sab.get_state()
    assert ga.pop("sum") == pytest.approx(gab.pop("sum"), rel=1e-12)
    assert ga == gab
    assert sa.quantiles(list(QS)) == sab.quantiles(list(QS))
    with pytest.raises(ValueError, match="different settings"):
        sa.merge(QuantileSketch(0.02))


def test_state_round_trip_through_json() -> None:
    s = QuantileSketch(0.02)
    s.add_many(np.array([0.0, 0.0, 1.5, 3.0, 1e6]))
    s2 = QuantileSketch.from_state(json.loads(json.dumps(s.get_state())))
    assert s2.get_state() == s.get_state()
    assert s2.quantiles([0.1, 0.5, 0.9]) == s.quantiles([0.1, 0.5, 0.9])
    s3 = QuantileSketch()
    s3.set_state(s.get_state())
    assert s3.relative_accuracy == 0.02 and s3.count == 5


def test_zeros_empty_and_invalid() -> None:
    s = QuantileSketch()
    assert s.quantile(0.5) is None and s.min is None and s.count == 0
    s.add_many(np.zeros(7))
    s.add_many(np.array([5.0, 6.0, 7.0]))
    assert s.quantile(0.5) == 0.0  # index 5 of 10 is a zero
    assert s.quantile(0.7) == pytest.approx(5.0, rel=0.01)  # index 7 -> 5.0
    assert s.quantile(0.99) == 7.0
    with pytest.raises(ValueError, match=">= 0"):
        s.add_many(np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="finite"):
        s.add(float("nan"))
    with pytest.raises(ValueError):
        s.quantile(1.5)
    with pytest.raises(ValueError):
        QuantileSketch(0.0)
    assert s.count == 10  # failed adds changed nothing


def test_add_matches_add_many() -> None:
    x = np.random.default_rng(3).exponential(50, 1000)
    s1, s2 = QuantileSketch(), QuantileSketch()
    s1.add_many(x)
    for v in x:
        s2.add(float(v))
    assert s1.get_state()["keys"] == s2.get_state()["keys"]
    assert s1.get_state()["counts"] == s2.get_state()["counts"]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.floats(min_value=0.0, max_value=1e12, allow_nan=False), min_size=1, max_size=300),
    st.floats(min_value=0.0, max_value=1.0),
    st.sampled_from([0.005, 0.01, 0.05]),
)
def test_property_relative_error(values: list[float], q: float, acc: float) -> None:
    x = np.array(values)
    s = QuantileSketch(acc)
    s.add_many(x)
    e = exact(x, q)
    got = s.quantile(q)
    assert got is not None
    tol = acc * e * ROUND if e > s.min_positive else s.min_positive
    assert abs(got - e) <= tol
