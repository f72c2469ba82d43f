"""The 1-D Wasserstein drift test (one detector: :class:`WassersteinDrift`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from driftline.schemas.drift_result import DriftResult

from ._checks import _check_int
from ._numeric import _as_vector, _NumericDetector, _summary
from .base import RULE_P, FloatArray
from .permutation import _perm_p_value, with_observed_split

__all__ = ["WassersteinDrift", "wasserstein_batched"]


def wasserstein_batched(pooled: FloatArray, first: npt.NDArray[np.bool_]) -> FloatArray:
    """1-D Wasserstein-1 distance between the two groups of ``pooled`` for each row of ``first``.

    ``first`` is ``(P, N)`` boolean with the same number of ``True`` per row.
    ``W = Σ_k |F_1(z_k) - F_2(z_k)| (z_{k+1} - z_k)`` over the sorted pooled
    values, computed for all rows at once with a cumulative sum.
    """
    order = np.argsort(pooled, kind="stable")
    z = pooled[order]
    gaps = np.diff(z)
    s = first[:, order]
    n1 = int(s[0].sum())
    n2 = z.size - n1
    c1 = np.cumsum(s, axis=1, dtype=np.float64)[:, :-1]
    k = np.arange(1, z.size, dtype=np.float64)
    diff = np.abs(c1 / n1 - (k - c1) / n2)
    out: FloatArray = diff @ gaps
    return out


class WassersteinDrift(_NumericDetector):
    """1-D Wasserstein distance in units of the reference IQR, with a permutation p-value.

    Statistic: ``W1(ref, cur) / scale`` where ``scale`` is the reference
    interquartile range (the standard deviation if the IQR is 0, and 1 if both
    are 0). P-value: ``n_permutations`` random splits of the pooled sample
    (all at once, :func:`wasserstein_batched`),
    ``(1 + #{W_perm >= W_obs}) / (1 + P)``. Rule:
    ``drifted = p_value < alpha and statistic >= min_effect`` (``min_effect``
    in IQRs, default 0: significance only).

    Parameters
    ----------
    alpha, seed
        Level of one test; seed of the permutations.
    n_permutations
        Permutations (>= 10).
    min_effect
        Smallest scaled distance that counts as drift (>= 0).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(1)
    >>> det = WassersteinDrift(seed=1).fit(rng.gamma(2.0, 300.0, size=500))   # latency_ms
    >>> for extra in (0.0, 150.0):
    ...     r = det.score(rng.gamma(2.0, 300.0, size=300) + extra)
    ...     print(f"+{extra:.0f} ms: drifted={r.drifted}")
    +0 ms: drifted=False
    +150 ms: drifted=True
    """

    method = "wasserstein"

    def __init__(
        self,
        *,
        alpha: float = 0.05,
        seed: int = 0,
        n_permutations: int = 300,
        min_effect: float = 0.0,
    ) -> None:
        super().__init__(alpha=alpha, seed=seed)
        _check_int("n_permutations", n_permutations, 10)
        if not min_effect >= 0.0:
            raise ValueError(f"min_effect must be >= 0, got {min_effect!r}")
        self._n_permutations = n_permutations
        self._min_effect = float(min_effect)
        self._scale = 1.0

    @property
    def n_permutations(self) -> int:
        return self._n_permutations

    @property
    def min_effect(self) -> float:
        return self._min_effect

    @property
    def scale(self) -> float:
        """Reference IQR (or its fallback) the distance is divided by."""
        return self._scale

    def _settings(self) -> dict[str, Any]:
        return {"n_permutations": self._n_permutations, "min_effect": self._min_effect}

    def _set_reference(self, ref: FloatArray) -> None:
        super()._set_reference(ref)
        q1, q3 = np.quantile(ref, [0.25, 0.75])
        iqr = float(q3 - q1)
        sd = float(ref.std())
        self._scale = iqr if iqr > 0 else (sd if sd > 0 else 1.0)

    def _score(
        self, current: npt.ArrayLike, texts: Sequence[str] | None, rng: np.random.Generator
    ) -> DriftResult:
        cur = _as_vector(current, "current")
        n, m = self._n_ref, cur.size
        s = with_observed_split(rng, self._n_permutations, n, n + m)
        w = wasserstein_batched(np.concatenate([self._ref, cur]), s) / self._scale
        observed = float(w[0])
        p = _perm_p_value(observed, w[1:])
        return DriftResult(
            method=self.method,
            statistic=observed,
            p_value=p,
            threshold=self._alpha,
            drifted=p < self._alpha and observed >= self._min_effect,
            n_ref=n,
            n_cur=m,
            explanation={
                "rule": f"{RULE_P} and statistic >= {self._min_effect}",
                "scale": self._scale,
                "scale_from": "reference IQR",
                "wasserstein_raw": observed * self._scale,
                "n_permutations": self._n_permutations,
                **_summary(self._ref, cur),
            },
        )
