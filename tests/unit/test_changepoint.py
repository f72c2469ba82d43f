"""Streaming change-point detectors: exact detection indices on seeded streams, state resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from driftline.detectors.changepoint import ADWIN, PageHinkley


def detections(det: PageHinkley | ADWIN, xs: np.ndarray) -> list[int]:
    out = []
    for i, x in enumerate(xs):
        det.update(float(x))
        if det.drift_detected:
            out.append(i)
    return out


def step_up() -> np.ndarray:
    rng = np.random.default_rng(7)
    return np.r_[rng.normal(100, 5, 400), rng.normal(120, 5, 200)]  # change at 400


def step_down() -> np.ndarray:
    rng = np.random.default_rng(8)
    return np.r_[rng.normal(100, 5, 400), rng.normal(85, 5, 200)]  # change at 400


def rate_jump() -> np.ndarray:
    rng = np.random.default_rng(9)
    return np.r_[rng.normal(0.02, 0.01, 500), rng.normal(0.06, 0.01, 300)]  # change at 500


@pytest.mark.parametrize(
    ("mode", "stream", "expected", "direction"),
    [
        ("up", step_up, [402], "up"),
        ("both", step_up, [402], "up"),
        ("down", step_up, [], None),
        ("down", step_down, [403], "down"),
        ("both", step_down, [403], "down"),
        ("up", step_down, [], None),
    ],
)
def test_page_hinkley_exact_indices(mode: str, stream, expected: list[int], direction) -> None:
    ph = PageHinkley(delta=2.5, threshold=50.0, mode=mode)
    idx = detections(ph, stream())
    assert idx == expected
    assert all(i >= 400 for i in idx)  # never on the stationary part
    assert ph.drift_direction == direction
    assert ph.n_seen == 600 and ph.n_detections == len(expected)


def test_adwin_exact_index_and_window_shrinks_to_the_new_regime() -> None:
    adwin = ADWIN()
    xs = rate_jump()
    seen_width = []
    for i, x in enumerate(xs):
        adwin.update(float(x))
        if adwin.drift_detected:
            seen_width.append((i, adwin.width))
    assert seen_width == [(519, 21)]
    assert seen_width[0][0] >= 500
    assert adwin.width == 800 - 499  # everything from the cut on: one detection per change
    assert adwin.estimation == pytest.approx(xs[499:].mean(), rel=1e-12)


def test_adwin_is_unit_free() -> None:
    xs = rate_jump()
    assert detections(ADWIN(), xs) == detections(ADWIN(), xs * 1000.0 + 5.0) == [519]


def test_no_detection_on_stationary_streams() -> None:
    rng = np.random.default_rng(10)
    xs = rng.normal(0.0, 1.0, 2000)
    assert detections(ADWIN(), xs) == []
    assert detections(PageHinkley(delta=0.5, threshold=25.0), xs) == []


def test_adwin_max_window_bounds_memory() -> None:
    adwin = ADWIN(max_window=50)
    detections(adwin, np.random.default_rng(11).normal(size=300))
    assert adwin.width == 50


@pytest.mark.parametrize(
    "make",
    [lambda: PageHinkley(delta=2.5, threshold=50.0), lambda: ADWIN(clock=3)],
    ids=["page_hinkley", "adwin"],
)
def test_state_resume_is_exact(make) -> None:
    xs = np.r_[step_up(), step_down()]
    whole = make()
    expected = detections(whole, xs)
    first = make()
    head = detections(first, xs[:401])
    state = json.loads(json.dumps(first.get_state()))
    resumed = type(first).from_state(state)
    tail = [i + 401 for i in detections(resumed, xs[401:])]
    assert head + tail == expected and len(expected) >= 2
    assert resumed.get_state() == whole.get_state()


@pytest.mark.parametrize(
    ("cls", "bad"),
    [
        (PageHinkley, {"min_instances": 0}),
        (PageHinkley, {"delta": -1.0}),
        (PageHinkley, {"threshold": 0.0}),
        (PageHinkley, {"fading": 0.0}),
        (PageHinkley, {"fading": 1.5}),
        (PageHinkley, {"mode": "sideways"}),
        (ADWIN, {"delta": 0.0}),
        (ADWIN, {"delta": 1.0}),
        (ADWIN, {"clock": 0}),
        (ADWIN, {"min_window_length": 0}),
        (ADWIN, {"grace_period": 1}),
        (ADWIN, {"max_window": 9}),
    ],
)
def test_bad_settings_raise(cls, bad) -> None:
    with pytest.raises(ValueError):
        cls(**bad)


def test_settings_are_read_only_and_named_like_the_constructor() -> None:
    ph = PageHinkley(min_instances=10, delta=1.0, threshold=20.0, fading=1.0, mode="down")
    assert ph.settings == {
        "min_instances": 10, "delta": 1.0, "threshold": 20.0, "fading": 1.0, "mode": "down",
    }
    assert ph.mode == "down"
    with pytest.raises(AttributeError):
        ph.mode = "up"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        ph.drift_detected = True  # type: ignore[misc]
    with pytest.raises(ValueError):
        ph.update(float("nan"))
    with pytest.raises(ValueError):
        ADWIN().set_state(PageHinkley().get_state())
    with pytest.raises(ValueError):
        PageHinkley(mode="up").set_state(PageHinkley(mode="down").get_state())
