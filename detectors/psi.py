"""The population stability index drift test (one detector: :class:`PSIDrift`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from driftline.schemas.drift_result import DriftResult

from ._checks import _check_int
from ._numeric import _as_vector, _NumericDetector, _summary
from .base import RULE_STAT, FloatArray

__all__ = ["PSIDrift", "psi"]


def psi(ref_share: FloatArray, cur_share: FloatArray, eps: float) -> float:
    """``Σ (cur - ref) · ln(cur / ref)`` with both shares floored at ``eps``."""
    r = np.maximum(ref_share, eps)
    c = np.maximum(cur_share, eps)
    return float(np.sum((c - r) * np.log(c / r)))


class PSIDrift(_NumericDetector):
    """Population stability index on reference-quantile bins.

    Bin rule: the inner edges are the ``1/n_bins, ..., (n_bins-1)/n_bins``
    empirical quantiles of the reference (``inverted_cdf``: always reference
    values), deduplicated (so a discrete field such as a retry count gets
    fewer, non-empty bins); bins are right-closed ``(e_{i-1}, e_i]`` and the
    outer bins are open
    (``(-inf, e1]``, ..., ``(e_last, inf)``), so a current value outside the
    reference range still lands in a bin. Shares are floored at ``eps``
    (default ``1e-4``) before the log so an empty bin gives a large but finite
    PSI. Rule: ``drifted = PSI > threshold``; 0.2 is the conventional level
    of a significant shift. Note the small-sample bias: with no drift the
    expected PSI is about ``(bins - 1) · (1/n_ref + 1/n_cur)``.

    Parameters
    ----------
    threshold
        PSI above which the field has drifted (> 0).
    n_bins
        Quantile bins (>= 2).
    eps
        Share floor (in ``(0, 0.01]``).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> det = PSIDrift().fit(rng.poisson(200, size=1000))      # output_tokens
    >>> for lam in (200, 230):
    ...     r = det.score(rng.poisson(lam, size=500))
    ...     print(f"lambda={lam}: drifted={r.drifted}")
    lambda=200: drifted=False
    lambda=230: drifted=True
    """

    method = "psi"

    def __init__(
        self,
        *,
        alpha: float = 0.05,
        seed: int = 0,
        threshold: float = 0.2,
        n_bins: int = 10,
        eps: float = 1e-4,
    ) -> None:
        super().__init__(alpha=alpha, seed=seed)
        if not threshold > 0.0:
            raise ValueError(f"threshold must be > 0, got {threshold!r}")
        _check_int("n_bins", n_bins, 2)
        if not 0.0 < eps <= 0.01:
            raise ValueError(f"eps must be in (0, 0.01], got {eps!r}")
        self._threshold = float(threshold)
        self._n_bins = n_bins
        self._eps = float(eps)
        self._edges: FloatArray = np.empty(0)

    @property
    def threshold(self) -> float:
        return self._threshold

    @property
    def n_bins(self) -> int:
        return self._n_bins

    @property
    def eps(self) -> float:
        return self._eps

    @property
    def edges(self) -> FloatArray:
        """Inner bin edges derived from the reference."""
        return self._edges.copy()

    def _settings(self) -> dict[str, Any]:
        return {"threshold": self._threshold, "n_bins": self._n_bins, "eps": self._eps}

    def _set_reference(self, ref: FloatArray) -> None:
        super()._set_reference(ref)
        qs = np.linspace(0.0, 1.0, self._n_bins + 1)[1:-1]
        self._edges = np.unique(np.quantile(ref, qs, method="inverted_cdf"))

    def _shares(self, x: FloatArray) -> FloatArray:
        idx = np.searchsorted(self._edges, x, side="left")
        counts = np.bincount(idx, minlength=self._edges.size + 1)
        out: FloatArray = counts / x.size
        return out

    def _score(
        self, current: npt.ArrayLike, texts: Sequence[str] | None, rng: np.random.Generator
    ) -> DriftResult:
        cur = _as_vector(current, "current")
        r, c = self._shares(self._ref), self._shares(cur)
        value = psi(r, c, self._eps)
        return DriftResult(
            method=self.method,
            statistic=value,
            p_value=None,
            threshold=self._threshold,
            drifted=value > self._threshold,
            n_ref=self._n_ref,
            n_cur=cur.size,
            explanation={
                "rule": RULE_STAT,
                "edges": [float(e) for e in self._edges],
                "ref_shares": [float(v) for v in r],
                "cur_shares": [float(v) for v in c],
                **_summary(self._ref, cur),
            },
        )
