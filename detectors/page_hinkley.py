"""The Page-Hinkley change-point test (one detector: :class:`PageHinkley`)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

from ._checks import _check_int
from ._stream import _finite, _StreamDetector

__all__ = ["PageHinkley"]


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
