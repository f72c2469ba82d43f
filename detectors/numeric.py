"""Drift tests for numeric fields (latency, tokens, response length): KS, PSI, Wasserstein.

Same interface as the embedding detectors in :mod:`driftline.detectors.drift`:
``fit(reference)``, ``score(current) -> DriftResult``, ``get_state()`` /
``set_state()`` / ``from_state()``, settings under their constructor names,
``ValueError`` on bad settings. Inputs are 1-D arrays of finite numbers
(``texts`` is accepted for interface symmetry and ignored).

Decision rules (also in each result's ``explanation["rule"]``):

- :class:`KSDrift` — two-sample Kolmogorov-Smirnov (``scipy.stats.ks_2samp``),
  ``drifted = p_value < alpha``.
- :class:`PSIDrift` — population stability index on reference-quantile bins,
  ``drifted = PSI > threshold`` (0.2 by default, the conventional "significant
  shift" level; 0.1 is the usual "watch" level). No p-value.
- :class:`WassersteinDrift` — 1-D Wasserstein distance divided by the reference
  IQR (so it reads in "IQRs moved" and is comparable across fields), with a
  permutation p-value; ``drifted = p_value < alpha and statistic >= min_effect``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats

from driftline.schemas.drift import DriftResult

from ._checks import _check_int
from .drift import (
    RULE_P,
    RULE_STAT,
    Detector,
    FloatArray,
    _perm_p_value,
    decode_array,
    encode_array,
    permutation_indicators,
)

__all__ = ["KSDrift", "PSIDrift", "WassersteinDrift", "psi", "wasserstein_batched"]


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


class KSDrift(_NumericDetector):
    """Two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``, exact/asymptotic as scipy picks).

    Statistic: the largest gap between the two empirical CDFs; rule
    ``drifted = p_value < alpha``. The explanation gives where the gap is
    (``location``), its sign (``+1``: the reference CDF is above the current
    one there, i.e. current shifted to larger values; ``-1``: to smaller) and
    mean/median/p95 of both samples.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> det = KSDrift().fit(rng.lognormal(6.0, 0.5, size=500))   # latency_ms
    >>> for factor in (1.0, 1.3):
    ...     r = det.score(rng.lognormal(6.0, 0.5, size=300) * factor)
    ...     print(f"x{factor}: drifted={r.drifted}")
    x1.0: drifted=False
    x1.3: drifted=True
    """

    method = "ks"

    def _score(
        self, current: npt.ArrayLike, texts: Sequence[str] | None, rng: np.random.Generator
    ) -> DriftResult:
        cur = _as_vector(current, "current")
        res = stats.ks_2samp(self._ref, cur)
        p = float(res.pvalue)
        return DriftResult(
            method=self.method,
            statistic=float(res.statistic),
            p_value=min(max(p, 0.0), 1.0),
            threshold=self._alpha,
            drifted=p < self._alpha,
            n_ref=self._n_ref,
            n_cur=cur.size,
            explanation={
                "rule": RULE_P,
                "location": float(res.statistic_location),
                "sign": int(res.statistic_sign),
                **_summary(self._ref, cur),
            },
        )


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
        s = permutation_indicators(rng, self._n_permutations + 1, n, n + m)
        s[0, :] = False
        s[0, :n] = True
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
