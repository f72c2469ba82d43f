"""What the 1-D (numeric-field) detectors share: input checks, a summary, the reference."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .base import Detector, FloatArray, decode_array, encode_array


def _as_vector(x: npt.ArrayLike, name: str) -> FloatArray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    if arr.size < 2:
        raise ValueError(f"{name} needs at least 2 values, got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _summary(ref: FloatArray, cur: FloatArray) -> dict[str, float]:
    q_ref = np.quantile(ref, [0.5, 0.95])
    q_cur = np.quantile(cur, [0.5, 0.95])
    return {
        "ref_mean": float(ref.mean()),
        "cur_mean": float(cur.mean()),
        "ref_p50": float(q_ref[0]),
        "cur_p50": float(q_cur[0]),
        "ref_p95": float(q_ref[1]),
        "cur_p95": float(q_cur[1]),
    }


class _NumericDetector(Detector):
    """Shared reference handling of the 1-D detectors."""

    def __init__(self, *, alpha: float = 0.05, seed: int = 0) -> None:
        super().__init__(alpha=alpha, seed=seed)
        self._ref: FloatArray = np.empty(0)

    def _fit(self, reference: npt.ArrayLike, texts: Sequence[str] | None) -> None:
        self._set_reference(_as_vector(reference, "reference"))

    def _set_reference(self, ref: FloatArray) -> None:
        self._ref = ref
        self._n_ref = ref.size

    def _fitted_state(self) -> dict[str, Any]:
        return {"reference": encode_array(self._ref)}

    def _load_fitted_state(self, data: dict[str, Any]) -> None:
        self._set_reference(decode_array(data["reference"]))
