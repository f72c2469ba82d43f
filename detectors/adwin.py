"""ADWIN, adaptive windowing (one detector: :class:`ADWIN`)."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np

from ._checks import _check_int
from ._stream import _finite, _StreamDetector

__all__ = ["ADWIN"]


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
