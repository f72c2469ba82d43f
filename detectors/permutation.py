"""Permutation tests: random group assignments, the permutation p-value, and how many
permutations a level needs."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from driftline.schemas.drift_result import DriftResult

from .base import FloatArray

__all__ = ["n_resamples", "permutation_indicators", "permutation_result", "with_observed_split"]


def permutation_indicators(
    rng: np.random.Generator, n_permutations: int, n_first: int, n_total: int
) -> npt.NDArray[np.bool_]:
    """Random group assignments as a ``(P, N)`` boolean matrix with ``n_first`` ``True`` per row.

    Row ``p`` marks which pooled points go to the first group ("reference") in
    permutation ``p``; each row is a uniformly random ``n_first``-subset
    (the ``n_first`` smallest of ``N`` i.i.d. uniforms).
    """
    u = rng.random((n_permutations, n_total))
    idx = np.argpartition(u, n_first - 1, axis=1)[:, :n_first]
    s = np.zeros((n_permutations, n_total), dtype=bool)
    np.put_along_axis(s, idx, True, axis=1)
    return s


def with_observed_split(
    rng: np.random.Generator, n_permutations: int, n_first: int, n_total: int
) -> npt.NDArray[np.bool_]:
    """:func:`permutation_indicators` with one more row in front: row 0 is the observed
    split (the first ``n_first`` pooled points are the reference), rows 1.. the permutations."""
    s = permutation_indicators(rng, n_permutations + 1, n_first, n_total)
    s[0, :] = False
    s[0, :n_first] = True
    return s


def permutation_result(
    method: str,
    observed: float,
    null: FloatArray,
    alpha: float,
    n_ref: int,
    n_cur: int,
    explanation: dict[str, Any],
) -> DriftResult:
    """The verdict of a permutation test: p from the ``null`` statistics, drifted when
    ``p < alpha`` (``explanation["rule"]`` is :data:`~.base.RULE_P`)."""
    p = _perm_p_value(observed, null)
    return DriftResult(
        method=method,
        statistic=observed,
        p_value=p,
        threshold=alpha,
        drifted=p < alpha,
        n_ref=n_ref,
        n_cur=n_cur,
        explanation=explanation,
    )


def _perm_p_value(observed: float, null: FloatArray) -> float:
    """``(1 + #{null >= observed}) / (1 + P)``: a valid (slightly conservative) p-value."""
    # A relative tolerance keeps float round-off from deciding exact ties.
    tol = 1e-12 * max(1.0, abs(observed))
    return float((1 + int(np.count_nonzero(null >= observed - tol))) / (1 + null.size))


def n_resamples(alpha_test: float, low: int = 256, high: int = 8192) -> int:
    """Permutations so the smallest p-value ``1/(B+1)`` is below ``alpha_test / 3``."""
    need = math.ceil(3.0 / alpha_test)
    return int(min(high, max(low, 1 << max(0, need - 1).bit_length())))
