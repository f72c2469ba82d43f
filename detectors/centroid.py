"""The centroid cosine-distance drift test (one detector: :class:`CentroidDrift`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from driftline.schemas.drift_result import DriftResult

from ._checks import _check_int
from .base import RULE_P, Detector, FloatArray, _as_current, _as_matrix, decode_array, encode_array
from .permutation import permutation_indicators, permutation_result

__all__ = ["CentroidDrift"]

#: Keep the fixed permutation set's reference share when it takes at most this many bytes
#: (thousands of permutations on a wide reference are recomputed per test instead).
_KEEP_BYTES = 8 << 20


def _cos_dist_rows(a: FloatArray, b: FloatArray) -> FloatArray:
    na = np.linalg.norm(a, axis=-1)
    nb = np.linalg.norm(b, axis=-1)
    denom = np.maximum(na * nb, 1e-300)
    out: FloatArray = 1.0 - np.sum(a * b, axis=-1) / denom
    return out


class CentroidDrift(Detector):
    """Cosine distance between the mean reference and mean current embedding (cheap, always on).

    The statistic is ``1 - cos(mean(reference), mean(current))``. Its p-value
    comes from a permutation test on the pooled points, like :class:`MMDDrift`:
    ``n_permutations`` random splits of the ``n_ref + n_cur`` points into groups
    of the same sizes give the distribution of the distance when both samples
    come from one distribution, and ``p = (1 + #{null >= observed}) / (1 +
    n_permutations)``. Rule: ``drifted = p_value < alpha``. The test is exact
    (its false-alarm rate is at most ``alpha`` whatever the distribution of the
    embeddings) because the statistic has no setting fitted on one of the two
    samples. An earlier version took its threshold from bootstrap resamples of
    the reference alone; that null was slightly too narrow, and on real
    prompts it gave 0.057 false alarms at alpha 0.05 over 3,000 tests.

    The permutations are not a Python loop: with ``S`` the ``(P, N)`` 0/1
    matrix of group assignments and ``Z`` the pooled points, ``S @ Z`` gives the
    reference-group sums of all ``P`` permutations in one product, and the
    current-group sums are the pooled total minus those (the cosine needs no
    division by the group sizes). The permutation set is fixed per reference
    and window size (the first test's stream, ``default_rng([seed, 0])``, as
    :class:`MMDDrift` does since issue 20), so the reference rows' share
    ``S_r @ Z_r`` is computed once (kept while it takes at most 8 MiB) and a test
    costs one ``(P, n_cur) @ (n_cur, d)`` product (time: ``benchmarks/RESULTS.md``,
    "Drift tests in milliseconds (issue 20)"). Before, every test drew fresh
    permutations and multiplied the whole ``(P, N) @ (N, d)``; the first test
    after ``fit`` gives the same p-value as then. The explanation gives the null's ``1 -
    alpha`` quantile as ``statistic_threshold``: the distance that would
    have been drifted.

    Parameters
    ----------
    alpha, seed
        Level of one test; seed of the permutation stream.
    n_permutations
        Number of permutations ``P`` (>= 10).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> base = np.ones(8)
    >>> det = CentroidDrift(seed=1).fit(base + rng.normal(size=(300, 8)))
    >>> for shift in (0.0, 1.0):
    ...     cur = base + rng.normal(size=(200, 8))
    ...     cur[:, 0] += shift
    ...     print(f"shift={shift}: drifted={det.score(cur).drifted}")
    shift=0.0: drifted=False
    shift=1.0: drifted=True
    """

    method = "centroid_cosine"

    def __init__(self, *, alpha: float = 0.05, seed: int = 0, n_permutations: int = 300) -> None:
        super().__init__(alpha=alpha, seed=seed)
        _check_int("n_permutations", n_permutations, 10)
        self._n_permutations = n_permutations
        self._ref: FloatArray = np.empty((0, 0))
        self._ref_sum: FloatArray = np.empty(0)
        # derived (not state): (n_cur, S_r @ Z_r, S_c) of the fixed permutation set
        self._perm: tuple[int, FloatArray, FloatArray] | None = None

    @property
    def n_permutations(self) -> int:
        return self._n_permutations

    def _settings(self) -> dict[str, Any]:
        return {"n_permutations": self._n_permutations}

    def _fit(self, reference: npt.ArrayLike, texts: Sequence[str] | None) -> None:
        self._set_reference(_as_matrix(reference, "reference"))

    def _set_reference(self, ref: FloatArray) -> None:
        self._ref = ref
        self._n_ref = ref.shape[0]
        self._ref_sum = ref.sum(axis=0)
        self._perm = None

    def _fitted_state(self) -> dict[str, Any]:
        return {"reference": encode_array(self._ref)}

    def _load_fitted_state(self, data: dict[str, Any]) -> None:
        self._set_reference(decode_array(data["reference"]))

    def _score(
        self, current: npt.ArrayLike, texts: Sequence[str] | None, rng: np.random.Generator
    ) -> DriftResult:
        cur = _as_current(current, self._ref.shape[1])
        n, m = self._n_ref, cur.shape[0]
        sum_rr, s_c = self._perm_parts(m)
        cur_sum = cur.sum(axis=0)
        observed = float(_cos_dist_rows(self._ref_sum, cur_sum))
        sum_r = sum_rr + s_c @ cur
        null = _cos_dist_rows(sum_r, (self._ref_sum + cur_sum)[None, :] - sum_r)
        return permutation_result(self.method, observed, null, self._alpha, n, m, {
            "rule": RULE_P,
            "n_permutations": self._n_permutations,
            "null_mean": float(null.mean()),
            "statistic_threshold": float(np.quantile(null, 1.0 - self._alpha, method="higher")),
        })

    def _perm_parts(self, m: int) -> tuple[FloatArray, FloatArray]:
        """``(S_r @ Z_r, S_c)`` of the fixed permutation set for windows of ``m`` points."""
        if self._perm is not None and self._perm[0] == m:
            return self._perm[1], self._perm[2]
        n = self._n_ref
        s = permutation_indicators(
            np.random.default_rng([self._seed, 0]), self._n_permutations, n, n + m
        )
        sum_rr: FloatArray = s[:, :n].astype(np.float64) @ self._ref
        s_c: FloatArray = s[:, n:].astype(np.float64)
        keep = sum_rr.nbytes + s_c.nbytes <= _KEEP_BYTES
        self._perm = (m, sum_rr, s_c) if keep else None
        return sum_rr, s_c
