"""The drift tests as they were before issue 20 (commit 9406375), kept to time them beside the
current ones in one run (``bench_drift.py --previous``, ``bench_drift_ms.py``) and to check the
current p-values against them (tests/unit/test_drift_fast.py).

Copies of ``detectors/mmd.py`` (``MMDDrift``: float64, fresh permutations per test, the whole
``(P, N) @ (N, N)`` product) and ``detectors/centroid.py`` (``CentroidDrift``: fresh
permutations per test, ``(P, N) @ (N, d)``) at that commit, with their classes renamed; the
state formats are the same as the current classes'.
"""
# ruff: noqa
# mypy: ignore-errors

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt

from driftline.schemas.drift_result import DriftResult

from driftline.detectors._checks import _check_int
from driftline.detectors.base import (
    RULE_P,
    Detector,
    FloatArray,
    _as_current,
    _as_matrix,
    _sq_dists,
    decode_array,
    encode_array,
)
from driftline.detectors.permutation import permutation_indicators, permutation_result, with_observed_split

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["PreviousMMDDrift", "PreviousCentroidDrift"]


def _mmd_from_quadratic(
    sks: FloatArray, sr: FloatArray, total: float, n: int, m: int
) -> FloatArray:
    """Unbiased MMD² from ``s'Ks`` and ``s'K1`` for 0/1 assignments ``s`` (RBF: diag(K) = 1).

    With ``t = 1 - s``: ``s'Kt = s'K1 - s'Ks`` and ``t'Kt = 1'K1 - 2 s'K1 + s'Ks``;
    the diagonal (``n`` resp. ``m`` ones) is removed for the unbiased estimate.
    """
    skt = sr - sks
    tkt = total - 2.0 * sr + sks
    out: FloatArray = (
        (sks - n) / (n * (n - 1)) + (tkt - m) / (m * (m - 1)) - 2.0 * skt / (n * m)
    )
    return out


class PreviousMMDDrift(Detector):
    """Maximum mean discrepancy (MMD²) permutation test with an RBF kernel.

    Kernel ``k(x, y) = exp(-||x - y||² / bandwidth)``, the bandwidth fixed at
    ``fit`` by the median heuristic: the median squared distance between
    reference points (on at most ``max_bandwidth_points`` of them, a seeded
    subsample). The statistic is the unbiased MMD². The p-value is
    ``(1 + #{MMD²_perm >= MMD²_obs}) / (1 + n_permutations)``.

    The permutations are not a Python loop: the pooled kernel matrix ``K``
    (``N = n_ref + n_cur``; the reference block is computed once at ``fit``) and
    a ``(P, N)`` 0/1 matrix ``S`` of group assignments give ``s'Ks`` for all
    ``P`` permutations from one matrix product ``(S @ K) * S`` and ``s'K1``
    from ``S @ (K 1)``. Memory is ``O(N² + P·N)``.

    ``device="numpy"`` (default) computes with numpy; ``"cpu"`` / ``"cuda"``
    with torch on that device; ``"auto"`` uses torch on CUDA when it is
    available and numpy otherwise. All paths draw the permutations from the same
    seeded numpy Generator and compute in float64, so they give the same
    p-value for the same seed (only float round-off, ~1e-15 relative, could
    decide an exact tie between a permuted and the observed statistic).

    The first ``score`` after ``fit`` also builds the reference kernel block.
    Time per ``score``: ``benchmarks/RESULTS.md``, "Module speed notes".

    Parameters
    ----------
    alpha
        Significance level of one test.
    n_permutations
        Number of permutations ``P`` (>= 10).
    seed
        Seed of the permutation stream.
    device
        ``"numpy"``, ``"cpu"``, ``"cuda"`` or ``"auto"``.
    max_bandwidth_points
        Reference points used for the median heuristic (>= 2).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> det = MMDDrift(n_permutations=200, seed=1).fit(rng.normal(size=(200, 8)))
    >>> for shift in (0.0, 0.5):
    ...     r = det.score(rng.normal(size=(100, 8)) + shift)
    ...     print(f"shift={shift}: drifted={r.drifted}")
    shift=0.0: drifted=False
    shift=0.5: drifted=True
    """

    method = "mmd"
    _DEVICES: ClassVar[tuple[str, ...]] = ("numpy", "cpu", "cuda", "auto")

    def __init__(
        self,
        *,
        alpha: float = 0.05,
        n_permutations: int = 300,
        seed: int = 0,
        device: str = "numpy",
        max_bandwidth_points: int = 2000,
    ) -> None:
        super().__init__(alpha=alpha, seed=seed)
        _check_int("n_permutations", n_permutations, 10)
        _check_int("max_bandwidth_points", max_bandwidth_points, 2)
        if device not in self._DEVICES:
            raise ValueError(f"device must be one of {self._DEVICES}, got {device!r}")
        self._n_permutations = n_permutations
        self._device = device
        self._max_bandwidth_points = max_bandwidth_points
        self._ref: FloatArray = np.empty((0, 0))
        self._bandwidth = 1.0
        self._k_rr: FloatArray | None = None  # derived cache, not state
        self._torch_cache: tuple[str, Any, Any] | None = None

    @property
    def n_permutations(self) -> int:
        return self._n_permutations

    @property
    def device(self) -> str:
        return self._device

    @property
    def max_bandwidth_points(self) -> int:
        return self._max_bandwidth_points

    @property
    def bandwidth(self) -> float:
        """The fixed kernel bandwidth (median squared reference distance)."""
        return self._bandwidth

    def _settings(self) -> dict[str, Any]:
        return {
            "n_permutations": self._n_permutations,
            "device": self._device,
            "max_bandwidth_points": self._max_bandwidth_points,
        }

    def _fit(self, reference: npt.ArrayLike, texts: Sequence[str] | None) -> None:
        ref = _as_matrix(reference, "reference")
        n = ref.shape[0]
        if n > self._max_bandwidth_points:
            pick = np.random.default_rng([self._seed, 0xBA5E]).choice(
                n, self._max_bandwidth_points, replace=False
            )
            sub = ref[np.sort(pick)]
        else:
            sub = ref
        d = _sq_dists(sub, sub)
        med = float(np.median(d[np.triu_indices(sub.shape[0], k=1)]))
        self._set_reference(ref, med if med > 0.0 else 1.0)

    def _set_reference(self, ref: FloatArray, bandwidth: float) -> None:
        self._ref = ref
        self._n_ref = ref.shape[0]
        self._bandwidth = bandwidth
        self._k_rr = None
        self._torch_cache = None

    def _fitted_state(self) -> dict[str, Any]:
        return {"reference": encode_array(self._ref), "bandwidth": self._bandwidth}

    def _load_fitted_state(self, data: dict[str, Any]) -> None:
        self._set_reference(decode_array(data["reference"]), float(data["bandwidth"]))

    def _resolved_device(self) -> str:
        if self._device != "auto":
            return self._device
        try:
            import torch
        except ImportError:
            return "numpy"
        return "cuda" if torch.cuda.is_available() else "numpy"

    def _score(
        self, current: npt.ArrayLike, texts: Sequence[str] | None, rng: np.random.Generator
    ) -> DriftResult:
        cur = _as_current(current, self._ref.shape[1])
        n, m = self._n_ref, cur.shape[0]
        s = with_observed_split(rng, self._n_permutations, n, n + m)
        device = self._resolved_device()
        if device == "numpy":
            stats_all = self._stats_numpy(cur, s)
        else:
            stats_all = self._stats_torch(cur, s, device)
        observed = float(stats_all[0])
        null = stats_all[1:]
        return permutation_result(self.method, observed, null, self._alpha, n, m, {
            "rule": RULE_P,
            "kernel": "rbf exp(-|x-y|^2/bandwidth)",
            "bandwidth": self._bandwidth,
            "n_permutations": self._n_permutations,
            "null_mean": float(null.mean()),
            "null_q95": float(np.quantile(null, 0.95)),
            "device": device,
        })

    def _stats_numpy(self, cur: FloatArray, s: npt.NDArray[np.bool_]) -> FloatArray:
        n, m = self._n_ref, cur.shape[0]
        if self._k_rr is None:
            self._k_rr = np.exp(-_sq_dists(self._ref, self._ref) / self._bandwidth)
        k = np.empty((n + m, n + m))
        k[:n, :n] = self._k_rr
        k_rc = np.exp(-_sq_dists(self._ref, cur) / self._bandwidth)
        k[:n, n:] = k_rc
        k[n:, :n] = k_rc.T
        k[n:, n:] = np.exp(-_sq_dists(cur, cur) / self._bandwidth)
        r = k.sum(axis=1)
        total = float(r.sum())
        sf = s.astype(np.float64)
        sks = np.einsum("pj,pj->p", sf @ k, sf)
        return _mmd_from_quadratic(sks, sf @ r, total, n, m)

    def _stats_torch(self, cur: FloatArray, s: npt.NDArray[np.bool_], device: str) -> FloatArray:
        try:
            import torch
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"MMDDrift(device={self._device!r}) needs torch: pip install torch"
            ) from e
        n, m = self._n_ref, cur.shape[0]
        if self._torch_cache is None or self._torch_cache[0] != device:
            ref_t = torch.from_numpy(self._ref).to(device)
            k_rr_t = torch.exp(-self._sq_dists_t(ref_t, ref_t) / self._bandwidth)
            self._torch_cache = (device, ref_t, k_rr_t)
        _, ref_t, k_rr_t = self._torch_cache
        cur_t = torch.from_numpy(cur).to(device)
        k_rc = torch.exp(-self._sq_dists_t(ref_t, cur_t) / self._bandwidth)
        k_cc = torch.exp(-self._sq_dists_t(cur_t, cur_t) / self._bandwidth)
        k = torch.cat([torch.cat([k_rr_t, k_rc], 1), torch.cat([k_rc.T, k_cc], 1)], 0)
        r = k.sum(dim=1)
        total = float(r.sum().item())
        sf = torch.from_numpy(s).to(device=device, dtype=torch.float64)
        sks = ((sf @ k) * sf).sum(dim=1)
        sr = sf @ r
        sks_np: FloatArray = np.asarray(sks.cpu().numpy(), dtype=np.float64)
        sr_np: FloatArray = np.asarray(sr.cpu().numpy(), dtype=np.float64)
        return _mmd_from_quadratic(sks_np, sr_np, total, n, m)

    @staticmethod
    def _sq_dists_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
        return d.clamp_min(0.0)
def _cos_dist_rows(a: FloatArray, b: FloatArray) -> FloatArray:
    na = np.linalg.norm(a, axis=-1)
    nb = np.linalg.norm(b, axis=-1)
    denom = np.maximum(na * nb, 1e-300)
    out: FloatArray = 1.0 - np.sum(a * b, axis=-1) / denom
    return out


class PreviousCentroidDrift(Detector):
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
    division by the group sizes). Cost per test: one ``(P, N) @ (N, d)``
    product and drawing the permutations (time: ``benchmarks/RESULTS.md``,
    "Module speed notes"). The explanation gives the null's ``1 -
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

    def _fitted_state(self) -> dict[str, Any]:
        return {"reference": encode_array(self._ref)}

    def _load_fitted_state(self, data: dict[str, Any]) -> None:
        self._set_reference(decode_array(data["reference"]))

    def _score(
        self, current: npt.ArrayLike, texts: Sequence[str] | None, rng: np.random.Generator
    ) -> DriftResult:
        cur = _as_current(current, self._ref.shape[1])
        n, m = self._n_ref, cur.shape[0]
        s = permutation_indicators(rng, self._n_permutations, n, n + m)
        cur_sum = cur.sum(axis=0)
        observed = float(_cos_dist_rows(self._ref_sum, cur_sum))
        pooled = np.vstack([self._ref, cur])
        sum_r = s.astype(np.float64) @ pooled
        null = _cos_dist_rows(sum_r, (self._ref_sum + cur_sum)[None, :] - sum_r)
        return permutation_result(self.method, observed, null, self._alpha, n, m, {
            "rule": RULE_P,
            "n_permutations": self._n_permutations,
            "null_mean": float(null.mean()),
            "statistic_threshold": float(np.quantile(null, 1.0 - self._alpha, method="higher")),
        })
