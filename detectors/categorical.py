"""A drift test for a categorical field (finish reasons): the G-test of a 2 x k table.

:class:`CategoryMixDrift` compares the counts of each category in the current window
with those in the reference (a 2 x k contingency table: reference / current by
category) with the likelihood-ratio G-test of homogeneity
(``scipy.stats.chi2_contingency(..., lambda_="log-likelihood")``, no continuity
correction; computed by :func:`g_test` with scipy's operations, without its wrappers), ``drifted = p_value < alpha``. Categories seen in neither sample do not
count; with fewer than two categories in all the test has nothing to compare
(statistic 0, p-value 1). Its explanation gives each category's share in both and
the categories that moved most (by :func:`share_z`).

Inputs are sequences of strings (``""`` is a category like any other).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import special

from driftline.schemas.drift_result import DriftResult

from .base import RULE_P, Detector

__all__ = ["CategoryMixDrift", "g_test", "share_z"]


def g_test(table: npt.ArrayLike) -> tuple[float, float, int]:
    """``(G, p_value, dof)`` of the G-test of homogeneity of a 2 x k table of counts whose
    every column has a count: the operations of ``scipy.stats.chi2_contingency(table,
    correction=False, lambda_="log-likelihood")`` (expected counts from the margins,
    ``2 sum xlogy(o, o / e)``, the chi-square survival function), hence its floats to the
    bit, without its wrappers (about 30 times faster: the numeric drift stage runs it for
    every finish-reason test). Fewer than two columns: nothing to compare, ``(0.0, 1.0, 0)``.

    >>> g, p, dof = g_test([[10, 90, 0], [20, 70, 10]])
    >>> round(g, 6), round(p, 6), dof
    (19.767476, 5.1e-05, 2)
    """
    obs = np.asarray(table, dtype=np.float64)
    if obs.ndim != 2 or obs.shape[0] != 2:
        raise ValueError(f"table must be 2 x k, got shape {obs.shape}")
    k = obs.shape[1]
    if k < 2:
        return 0.0, 1.0, 0
    expected = obs.sum(axis=1, keepdims=True) * obs.sum(axis=0, keepdims=True) / obs.sum()
    g = float(np.sum(2.0 * special.xlogy(obs, obs / expected)))
    return g, float(special.chdtrc(k - 1, g)), k - 1


def share_z(r: float, c: float, n_r: int, n_c: int) -> float:
    """The two-proportion z of a share that went from ``r`` (of ``n_r``) to ``c`` (of ``n_c``):
    how far it moved for its size (a rare category growing 1% -> 5% ranks above a common
    one shrinking 98% -> 94%).

    >>> round(share_z(0.01, 0.05, 500, 500), 2), round(share_z(0.98, 0.94, 500, 500), 2)
    (3.71, -3.23)
    """
    p = (r * n_r + c * n_c) / (n_r + n_c)
    se = math.sqrt(max(p * (1 - p), 1e-12) * (1 / n_r + 1 / n_c))
    return (c - r) / se


def _labels(x: Any, name: str) -> list[str]:
    out = [str(v) for v in np.asarray(x, dtype=object).reshape(-1)]
    if len(out) < 2:
        raise ValueError(f"{name} needs at least 2 values, got {len(out)}")
    return out


class CategoryMixDrift(Detector):
    """G-test of homogeneity between the reference's and the current window's category counts.

    Examples
    --------
    >>> det = CategoryMixDrift().fit(["stop"] * 95 + ["length"] * 5)
    >>> det.score(["stop"] * 93 + ["length"] * 7).drifted
    False
    >>> r = det.score(["stop"] * 70 + ["length"] * 30)
    >>> r.drifted, r.explanation["shares"]["length"]
    (True, [0.05, 0.3])
    """

    method = "g_test"

    def __init__(self, *, alpha: float = 0.05, seed: int = 0) -> None:
        super().__init__(alpha=alpha, seed=seed)
        self._ref: Counter[str] = Counter()

    def _fit(self, reference: npt.ArrayLike, texts: Sequence[str] | None) -> None:
        self._ref = Counter(_labels(reference, "reference"))
        self._n_ref = sum(self._ref.values())

    def _score(self, current: npt.ArrayLike, texts: Sequence[str] | None,
               rng: np.random.Generator) -> DriftResult:
        cur = Counter(_labels(current, "current"))
        n_cur = sum(cur.values())
        cats = sorted(set(self._ref) | set(cur))
        table = np.array([[self._ref[c] for c in cats], [cur[c] for c in cats]], dtype=np.float64)
        g, p, dof = g_test(table)
        shares = {c: [round(self._ref[c] / self._n_ref, 6), round(cur[c] / n_cur, 6)] for c in cats}
        moved = sorted(cats, key=lambda c: (-abs(share_z(shares[c][0], shares[c][1], self._n_ref, n_cur)), c))
        return DriftResult(
            method=self.method, statistic=max(g, 0.0), p_value=min(max(p, 0.0), 1.0),
            threshold=self._alpha, drifted=p < self._alpha, n_ref=self._n_ref, n_cur=n_cur,
            explanation={"rule": RULE_P, "dof": dof, "shares": shares, "moved": moved[:3]})

    def _fitted_state(self) -> dict[str, Any]:
        return {"reference": dict(sorted(self._ref.items()))}

    def _load_fitted_state(self, data: dict[str, Any]) -> None:
        self._ref = Counter({str(k): int(v) for k, v in data["reference"].items()})
        self._n_ref = sum(self._ref.values())
