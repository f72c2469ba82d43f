"""The two-sample Kolmogorov-Smirnov drift test (one detector: :class:`KSDrift`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from scipy import stats

from driftline.schemas.drift_result import DriftResult

from ._numeric import _as_vector, _NumericDetector, _summary
from .base import RULE_P

__all__ = ["KSDrift"]


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
