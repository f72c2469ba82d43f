"""The base of the streaming change-point detectors (River's ``update`` / ``drift_detected``)."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Self

from .base import check_state_header


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
        check_state_header(state, type(self).__name__, self.settings)
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
