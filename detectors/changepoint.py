"""Streaming change-point detectors on per-window scalars: Page-Hinkley and ADWIN.

River-style: ``update(x)`` is the only method that changes state; the verdict is
read from the read-only property ``drift_detected``, which is ``True`` exactly
on the update at which a change was detected (the next ``update`` starts a new
run). Settings keep the constructor's names; bad settings raise ``ValueError``
at construction. ``get_state()`` returns a JSON-serialisable dict and
``set_state()`` restores it exactly, so a restarted worker resumes where it
stopped (``from_state()`` builds a detector from the saved settings).

No clock, no I/O: the caller feeds one scalar per window (p95 latency, a drift
score, a guardrail hit rate, ...).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, ClassVar, Self

import numpy as np

from ._checks import _check_int

__all__ = ["PageHinkley", "ADWIN"]


def _finite(x: float) -> float:
    v = float(x)
    if not math.isfinite(v):
        raise ValueError(f"update() needs a finite number, got {x!r}")
    return v


class _StreamDetector:
    _state_keys: ClassVar[tuple[str, ...]] = ()
    _drift_detected: bool
    _n_seen: int
    _n_detections: int

    @property
    def drift_detected(self) -> bool:
        """``True`` on the update at which a change was detected (ADWIN: the window was cut)."""
        return self._drift_detected

    @property
    def n_seen(self) -> int:
        """Values seen in total (the index of the next value)."""
        return self._n_seen

    @property
    def n_detections(self) -> int:
        return self._n_detections

    @property
    def settings(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _load(self, data: dict[str, Any]) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable settings and running state."""
        return {"detector": type(self).__name__, "settings": self.settings, "state": self._state()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_state` output; the settings must equal this detector's."""
        if state.get("detector") != type(self).__name__:
            raise ValueError(f"state is for {state.get('detector')!r}, not {type(self).__name__}")
        if state.get("settings") != self.settings:
            raise ValueError(
                f"state settings {state.get('settings')!r} differ from {self.settings!r}; "
                "use from_state() to build a detector with the saved settings"
            )
        self._load(state["state"])

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Self:
        """Build a detector with the saved settings and restore the saved state."""
        det = cls(**state["settings"])
        det.set_state(state)
        return det

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"{type(self).__name__}({args})"


class PageHinkley(_StreamDetector):
    """Page-Hinkley test for a change in the mean of a stream.

    With ``x̄_t`` the running mean since the last detection,
    ``U_t = fading·U_{t-1} + (x_t - x̄_t - delta)`` (increase) and
    ``L_t = fading·L_{t-1} + (x_t - x̄_t + delta)`` (decrease), both starting at 0.
    An increase fires when ``U_t - min_{s<=t} U_s > threshold``, a decrease when
    ``max_{s<=t} L_s - L_t > threshold`` (minimum/maximum including the start 0),
    checked once at least ``min_instances`` values were seen since the last
    detection. After a detection the next ``update`` restarts from scratch.

    Parameters
    ----------
    min_instances
        Values seen before a detection is allowed (>= 1).
    delta
        Magnitude of changes tolerated (>= 0), in the units of ``x``.
    threshold
        Detection threshold ``lambda`` (> 0), in the units of ``x``.
    fading
        Forgetting factor of the cumulative sums, in ``(0, 1]`` (1: none).
    mode
        ``"up"`` (increases only), ``"down"`` or ``"both"``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(42)
    >>> stream = np.r_[rng.normal(100, 5, 300), rng.normal(115, 5, 200)]   # p95 latency
    >>> ph = PageHinkley(delta=2.5, threshold=50.0, mode="up")
    >>> for i, x in enumerate(stream):
    ...     ph.update(x)
    ...     if ph.drift_detected:
    ...         print(f"change detected at index {i} ({ph.drift_direction})")
    change detected at index 303 (up)
    """

    MODES: ClassVar[tuple[str, ...]] = ("up", "down", "both")

    def __init__(
        self,
        min_instances: int = 30,
        delta: float = 0.005,
        threshold: float = 50.0,
        fading: float = 0.9999,
        mode: str = "both",
    ) -> None:
        _check_int("min_instances", min_instances, 1)
        if not (math.isfinite(delta) and delta >= 0):
            raise ValueError(f"delta must be >= 0, got {delta!r}")
        if not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"threshold must be > 0, got {threshold!r}")
        if not 0.0 < fading <= 1.0:
            raise ValueError(f"fading must be in (0, 1], got {fading!r}")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self._min_instances = min_instances
        self._delta = float(delta)
        self._threshold = float(threshold)
        self._fading = float(fading)
        self._mode = mode
        self._n_seen = 0
        self._n_detections = 0
        self._drift_detected = False
        self._direction: str | None = None
        self._reset()

    def _reset(self) -> None:
        self._n = 0
        self._mean = 0.0
        self._sum_up = 0.0
        self._min_up = 0.0
        self._sum_down = 0.0
        self._max_down = 0.0

    # -- settings (read-only)
    @property
    def min_instances(self) -> int:
        return self._min_instances

    @property
    def delta(self) -> float:
        return self._delta

    @property
    def threshold(self) -> float:
        return self._threshold

    @property
    def fading(self) -> float:
        return self._fading

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "min_instances": self._min_instances,
            "delta": self._delta,
            "threshold": self._threshold,
            "fading": self._fading,
            "mode": self._mode,
        }

    # -- verdict (read-only; drift_detected, n_seen, n_detections on the base class)
    @property
    def drift_direction(self) -> str | None:
        """``"up"`` or ``"down"`` for the last detection (``None`` before any)."""
        return self._direction

    def update(self, x: float) -> None:
        """Feed one value; sets :attr:`drift_detected` for this step."""
        v = _finite(x)
        if self._drift_detected:
            self._reset()
        self._drift_detected = False
        self._n_seen += 1
        self._n += 1
        self._mean += (v - self._mean) / self._n
        dev = v - self._mean
        self._sum_up = self._fading * self._sum_up + dev - self._delta
        self._sum_down = self._fading * self._sum_down + dev + self._delta
        self._min_up = min(self._min_up, self._sum_up)
        self._max_down = max(self._max_down, self._sum_down)
        if self._n < self._min_instances:
            return
        up = self._mode != "down" and self._sum_up - self._min_up > self._threshold
        down = self._mode != "up" and self._max_down - self._sum_down > self._threshold
        if up or down:
            self._drift_detected = True
            self._direction = "up" if up else "down"
            self._n_detections += 1

    def _state(self) -> dict[str, Any]:
        return {
            "n_seen": self._n_seen,
            "n_detections": self._n_detections,
            "drift_detected": self._drift_detected,
            "direction": self._direction,
            "n": self._n,
            "mean": self._mean,
            "sum_up": self._sum_up,
            "min_up": self._min_up,
            "sum_down": self._sum_down,
            "max_down": self._max_down,
        }

    def _load(self, data: dict[str, Any]) -> None:
        self._n_seen = int(data["n_seen"])
        self._n_detections = int(data["n_detections"])
        self._drift_detected = bool(data["drift_detected"])
        self._direction = None if data["direction"] is None else str(data["direction"])
        self._n = int(data["n"])
        self._mean = float(data["mean"])
        self._sum_up = float(data["sum_up"])
        self._min_up = float(data["min_up"])
        self._sum_down = float(data["sum_down"])
        self._max_down = float(data["max_down"])


class ADWIN(_StreamDetector):
    """ADaptive WINdowing (Bifet & Gavaldà, 2007): a window that shrinks when its mean changes.

    Keeps the recent values (at most ``max_window``, oldest dropped first). Every
    ``clock`` updates (once the window holds ``grace_period`` values) every split
    of the window into an older part ``W0`` (``n0`` values) and a newer part
    ``W1`` (``n1``), both at least ``min_window_length`` long, is tested:
    the split cuts when ``|mean(W0) - mean(W1)| > eps`` with the Bernstein
    bound ``eps = sqrt(2·σ²·L·(1/n0 + 1/n1)) + (2/3)·R·L·(1/n0 + 1/n1)``,
    ``L = ln(2·ln(n) / delta)``, ``σ²`` the window variance, ``R`` its range
    (max - min; the published ADWIN assumes values in ``[0, 1]``, i.e. ``R = 1``,
    scaling by ``R`` makes the detector unit-free) and ``n`` its length. While
    some split cuts, the older sub-window of the split with the largest excess
    ``|mean(W0) - mean(W1)| - eps`` is dropped (all splits checked with one
    vectorised cumulative sum over the exact window); a detection is reported
    on that update, once per change. Memory ``O(max_window)``; time per check
    ``O(width)``.

    Parameters
    ----------
    delta
        Confidence of a cut, in ``(0, 1)``; smaller = fewer false alarms.
    clock
        Check every ``clock`` updates (>= 1).
    min_window_length
        Shortest sub-window of a split (>= 1).
    grace_period
        Values needed before the first check (>= 2).
    max_window
        Longest window kept (>= ``2 * min_window_length``).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(42)
    >>> stream = np.r_[rng.normal(0.02, 0.01, 300), rng.normal(0.05, 0.01, 200)]  # hit rate
    >>> adwin = ADWIN()
    >>> for i, x in enumerate(stream):
    ...     adwin.update(x)
    ...     if adwin.drift_detected:
    ...         print(f"change detected at index {i}, window now {adwin.width}")
    change detected at index 320, window now 21
    """

    def __init__(
        self,
        delta: float = 0.002,
        clock: int = 1,
        min_window_length: int = 5,
        grace_period: int = 10,
        max_window: int = 10_000,
    ) -> None:
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        _check_int("clock", clock, 1)
        _check_int("min_window_length", min_window_length, 1)
        _check_int("grace_period", grace_period, 2)
        _check_int("max_window", max_window, 2 * min_window_length)
        self._delta = float(delta)
        self._clock = clock
        self._min_window_length = min_window_length
        self._grace_period = grace_period
        self._max_window = max_window
        self._window: deque[float] = deque()
        self._n_seen = 0
        self._n_detections = 0
        self._drift_detected = False

    # -- settings (read-only)
    @property
    def delta(self) -> float:
        return self._delta

    @property
    def clock(self) -> int:
        return self._clock

    @property
    def min_window_length(self) -> int:
        return self._min_window_length

    @property
    def grace_period(self) -> int:
        return self._grace_period

    @property
    def max_window(self) -> int:
        return self._max_window

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "delta": self._delta,
            "clock": self._clock,
            "min_window_length": self._min_window_length,
            "grace_period": self._grace_period,
            "max_window": self._max_window,
        }

    # -- verdict (read-only; drift_detected, n_seen, n_detections on the base class)
    @property
    def width(self) -> int:
        """Current window length."""
        return len(self._window)

    @property
    def estimation(self) -> float:
        """Mean of the current window (0.0 when empty)."""
        return float(np.mean(self._window)) if self._window else 0.0

    def update(self, x: float) -> None:
        """Feed one value; sets :attr:`drift_detected` for this step."""
        v = _finite(x)
        self._drift_detected = False
        self._window.append(v)
        if len(self._window) > self._max_window:
            self._window.popleft()
        self._n_seen += 1
        if self._n_seen % self._clock != 0 or len(self._window) < self._grace_period:
            return
        while (drop := self._cut()) > 0:
            for _ in range(drop):
                self._window.popleft()
            self._drift_detected = True
        if self._drift_detected:
            self._n_detections += 1

    def _cut(self) -> int:
        """Length of the older sub-window to drop (0: no split cuts)."""
        w = np.fromiter(self._window, dtype=np.float64, count=len(self._window))
        n = w.size
        lo = self._min_window_length
        if n < 2 * lo or n < 3:
            return 0
        cs = np.cumsum(w)
        n0 = np.arange(lo, n - lo + 1, dtype=np.float64)
        n1 = n - n0
        head = cs[lo - 1 : n - lo]
        mean0 = head / n0
        mean1 = (cs[-1] - head) / n1
        harmonic = 1.0 / n0 + 1.0 / n1
        big_l = math.log(2.0 * math.log(n) / self._delta)
        value_range = float(w.max() - w.min())
        eps = (
            np.sqrt(2.0 * float(w.var()) * big_l * harmonic)
            + (2.0 / 3.0) * value_range * big_l * harmonic
        )
        excess = np.abs(mean0 - mean1) - eps
        best = int(np.argmax(excess))
        return int(n0[best]) if excess[best] > 0.0 else 0

    def _state(self) -> dict[str, Any]:
        return {
            "window": list(self._window),
            "n_seen": self._n_seen,
            "n_detections": self._n_detections,
            "drift_detected": self._drift_detected,
        }

    def _load(self, data: dict[str, Any]) -> None:
        self._window = deque(float(v) for v in data["window"])
        self._n_seen = int(data["n_seen"])
        self._n_detections = int(data["n_detections"])
        self._drift_detected = bool(data["drift_detected"])
