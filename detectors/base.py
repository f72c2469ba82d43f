"""The base of every two-sample detector: settings, a seeded test stream, state round-trip.

Also the helpers every detector shares: input checks, the JSON array encoding and the
squared-distance matrix. Pure: no I/O, no clock, no globals.
"""

from __future__ import annotations

import base64
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt

from driftline.schemas.drift_result import DriftResult

from ._checks import _check_alpha

__all__ = ["Detector", "NotFittedError", "FloatArray", "RULE_P", "RULE_STAT", "encode_array",
           "decode_array"]

FloatArray = npt.NDArray[np.float64]

RULE_P = "drifted = p_value < threshold (threshold = alpha)"
RULE_STAT = "drifted = statistic > threshold"


def check_state_header(state: dict[str, Any], detector: str, settings: dict[str, Any]) -> None:
    """Refuse a saved state of another detector class or of other settings (ValueError)."""
    if state.get("detector") != detector:
        raise ValueError(f"state is for {state.get('detector')!r}, not {detector}")
    if state.get("settings") != settings:
        raise ValueError(
            f"state settings {state.get('settings')!r} differ from {settings!r}; "
            "use from_state() to build a detector with the saved settings"
        )


class NotFittedError(RuntimeError):
    """``score`` was called before ``fit`` (or ``set_state``)."""


# --------------------------------------------------------------------------- helpers


def encode_array(a: npt.ArrayLike) -> dict[str, Any]:
    """Encode an array as a JSON-safe dict (little-endian float64, base64)."""
    arr = np.ascontiguousarray(np.asarray(a, dtype="<f8"))
    return {"shape": list(arr.shape), "f8": base64.b64encode(arr.tobytes()).decode("ascii")}


def decode_array(d: dict[str, Any]) -> FloatArray:
    """Inverse of :func:`encode_array` (exact)."""
    raw = base64.b64decode(d["f8"])
    arr = np.frombuffer(raw, dtype="<f8").astype(np.float64).reshape(tuple(d["shape"]))
    return arr


def _as_current(current: npt.ArrayLike, ref_d: int) -> FloatArray:
    """The current sample as a matrix with the reference's dimension ``ref_d`` (ValueError)."""
    cur = _as_matrix(current, "current")
    if cur.shape[1] != ref_d:
        raise ValueError(f"current has d={cur.shape[1]}, reference d={ref_d}")
    return cur


def _as_matrix(x: npt.ArrayLike, name: str) -> FloatArray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n, d), got shape {arr.shape}")
    if arr.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 rows, got {arr.shape[0]}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _texts(texts: Sequence[str] | None, n: int, name: str) -> list[str] | None:
    if texts is None:
        return None
    out = [str(t) for t in texts]
    if len(out) != n:
        raise ValueError(f"{name} has {len(out)} texts for {n} rows")
    return out


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def _sq_dists(a: FloatArray, b: FloatArray) -> FloatArray:
    aa: FloatArray = np.einsum("ij,ij->i", a, a)
    bb: FloatArray = np.einsum("ij,ij->i", b, b)
    d: FloatArray = aa[:, None] + bb[None, :] - 2.0 * (a @ b.T)
    np.maximum(d, 0.0, out=d)
    return d


# --------------------------------------------------------------------------- base


class Detector(ABC):
    """Base of every two-sample detector: settings, seeded test stream, state round-trip.

    Subclasses set :attr:`method`, implement ``_fit``, ``_score`` and the
    ``_fitted_state`` / ``_load_fitted_state`` pair, and list their settings in
    ``_settings``.
    """

    method: ClassVar[str] = ""

    def __init__(self, *, alpha: float = 0.05, seed: int = 0) -> None:
        _check_alpha(alpha)
        _check_seed(seed)
        self._alpha = float(alpha)
        self._seed = seed
        self._tests = 0
        self._fitted = False
        self._n_ref = 0

    # -- settings (read-only, constructor names)
    @property
    def alpha(self) -> float:
        return self._alpha

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def tests(self) -> int:
        """How many tests ``score`` has run since ``fit`` (the RNG stream position)."""
        return self._tests

    @property
    def fitted(self) -> bool:
        return self._fitted

    @property
    def settings(self) -> dict[str, Any]:
        """The constructor settings under their constructor names."""
        return {"alpha": self._alpha, "seed": self._seed, **self._settings()}

    def _settings(self) -> dict[str, Any]:
        return {}

    # -- fit / score
    def fit(self, reference: npt.ArrayLike, texts: Sequence[str] | None = None) -> Self:
        """Store ``reference`` (and what derives from it); resets the test counter."""
        self._fit(reference, texts)
        self._fitted = True
        self._tests = 0
        return self

    def score(self, current: npt.ArrayLike, texts: Sequence[str] | None = None) -> DriftResult:
        """Test ``current`` against the reference; advances only the test counter."""
        if not self._fitted:
            raise NotFittedError(f"{type(self).__name__}.score called before fit")
        rng = np.random.default_rng([self._seed, self._tests])
        result = self._score(current, texts, rng)
        self._tests += 1
        return result

    @abstractmethod
    def _fit(self, reference: npt.ArrayLike, texts: Sequence[str] | None) -> None: ...

    @abstractmethod
    def _score(
        self, current: npt.ArrayLike, texts: Sequence[str] | None, rng: np.random.Generator
    ) -> DriftResult: ...

    # -- state
    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state: settings, test counter and (when fitted) the reference."""
        return {
            "detector": type(self).__name__,
            "settings": self.settings,
            "tests": self._tests,
            "fitted": self._fitted,
            "data": self._fitted_state() if self._fitted else None,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_state` output; the settings must equal this detector's."""
        check_state_header(state, type(self).__name__, self.settings)
        if state.get("fitted"):
            self._load_fitted_state(state["data"])
        self._fitted = bool(state.get("fitted"))
        self._tests = int(state["tests"])

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Self:
        """Build a detector with the saved settings and restore the saved state."""
        det = cls(**state["settings"])
        det.set_state(state)
        return det

    @abstractmethod
    def _fitted_state(self) -> dict[str, Any]: ...

    @abstractmethod
    def _load_fitted_state(self, data: dict[str, Any]) -> None: ...

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"{type(self).__name__}({args})"
