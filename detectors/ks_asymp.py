"""The two-sample Kolmogorov-Smirnov test in microseconds, for tests run many times a second.

:func:`ks_sorted` takes the reference already sorted (a stream tests one reference
against many windows) and returns the statistic ``D`` (the largest gap between the two
empirical CDFs, ties handled as ``scipy.stats.ks_2samp`` does: both CDFs evaluated at
every pooled value) and the asymptotic p-value ``Q_KS(sqrt(n_e) * D)``,
``n_e = n m / (n + m)``, with ``Q_KS`` the Kolmogorov survival function
(``scipy.special.kolmogorov``). It is conservative: at 500 x 500, for exact p-values
below 0.01 it was 1.00 to 1.25 times scipy's exact p-value (300 seeded pairs; Stephens'
corrected form was 0.81 to 0.92 times, i.e. anti-conservative, so it is not used; checked
in tests/unit/test_numeric_stage.py). ``scipy.stats.ks_2samp`` spends ~2 ms per call at
500 x 500 through its generic wrappers, about 10 times this.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
from scipy import special

__all__ = ["KSResult", "ks_sorted", "ref_cdf", "sorted_quantiles"]


class KSResult(NamedTuple):
    statistic: float
    p_value: float
    #: the value where the gap is largest
    location: float
    #: +1: the reference CDF lies above the current one there (current shifted up); -1 down
    sign: int


def ks_sorted(ref_sorted: npt.NDArray[np.float64], cur: npt.ArrayLike, *, cur_sorted: bool = False,
              ref_cdf: npt.NDArray[np.float64] | None = None) -> KSResult:
    """Two-sample KS of ``cur`` against the sorted reference (see the module docstring).

    ``cur_sorted``: ``cur`` is already a sorted float64 array (a caller that sorts the window
    once for its quantiles too). ``ref_cdf``: :func:`ref_cdf` of the reference, kept by a
    caller that tests one reference many times. Neither changes the result, to the bit.

    >>> import numpy as np
    >>> r = ks_sorted(np.arange(100.0), np.arange(20.0, 120.0))
    >>> round(r.statistic, 6), r.sign, round(r.p_value, 6)
    (0.2, 1, 0.036631)
    """
    a = np.asarray(ref_sorted, dtype=np.float64)
    b = np.asarray(cur, dtype=np.float64) if cur_sorted else np.sort(np.asarray(cur, dtype=np.float64))
    n, m = a.size, b.size
    if n < 1 or m < 1:
        raise ValueError("both samples need at least one value")
    # the gap of the two CDFs at every pooled value, the reference's values first, then the
    # current's (scipy's order: the first largest gap in it gives the location)
    gap_a = (ref_cdf if ref_cdf is not None else np.searchsorted(a, a, side="right") / n) \
        - np.searchsorted(b, a, side="right") / m
    gap_b = np.searchsorted(a, b, side="right") / n - np.searchsorted(b, b, side="right") / m
    abs_a, abs_b = np.abs(gap_a), np.abs(gap_b)
    ia, ib = int(abs_a.argmax()), int(abs_b.argmax())
    if abs_a[ia] >= abs_b[ib]:
        d, loc, g = float(abs_a[ia]), float(a[ia]), gap_a[ia]
    else:
        d, loc, g = float(abs_b[ib]), float(b[ib]), gap_b[ib]
    en = n * m / (n + m)
    sq = math.sqrt(en)
    p = float(special.kolmogorov(sq * d)) if d > 0 else 1.0
    return KSResult(d, min(max(p, 0.0), 1.0), loc, 1 if g > 0 else -1)


def ref_cdf(ref_sorted: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The sorted reference's empirical CDF at its own values (``side="right"``: ties counted)."""
    a = np.asarray(ref_sorted, dtype=np.float64)
    out: npt.NDArray[np.float64] = np.searchsorted(a, a, side="right") / a.size
    return out


def sorted_quantiles(s: npt.NDArray[np.float64], qs: tuple[float, ...]) -> list[float]:
    """Quantiles of the sorted ``s`` by linear interpolation (``np.quantile``'s default), without its overhead."""
    n = s.size
    out = []
    for q in qs:
        x = q * (n - 1)
        lo = int(math.floor(x))
        hi = min(lo + 1, n - 1)
        out.append(float(s[lo] + (s[hi] - s[lo]) * (x - lo)))
    return out
