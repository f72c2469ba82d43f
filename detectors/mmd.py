"""The MMD² permutation drift test (one detector: :class:`MMDDrift`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt

from driftline.schemas.drift_result import DriftResult

from ._checks import _check_int
from .base import (
    RULE_P,
    Detector,
    FloatArray,
    _as_current,
    _as_matrix,
    _sq_dists,
    decode_array,
    encode_array,
)
from .permutation import permutation_result, with_observed_split

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["MMDDrift"]


#: Subtracted from every kernel value before the float32 sums: the unbiased MMD² does not
#: change when a constant is added to the kernel (it cancels between the three terms), and
#: ``exp(-1)``, the kernel at the median distance, centres the entries so the sums of
#: ~10⁶ of them stay small and lose little to float32 round-off.
_SHIFT = math.exp(-1.0)


def _mmd_from_quadratic(
    sks: FloatArray, sr: FloatArray, total: float, n: int, m: int, diag: float = 1.0
) -> FloatArray:
    """Unbiased MMD² from ``s'Ks`` and ``s'K1`` for 0/1 assignments ``s``; ``diag`` is the
    kernel's value on the diagonal (1 for the RBF kernel, ``1 - _SHIFT`` shifted).

    With ``t = 1 - s``: ``s'Kt = s'K1 - s'Ks`` and ``t'Kt = 1'K1 - 2 s'K1 + s'Ks``;
    the diagonal (``n`` resp. ``m`` times ``diag``) is removed for the unbiased estimate.
    """
    skt = sr - sks
    tkt = total - 2.0 * sr + sks
    out: FloatArray = (
        (sks - n * diag) / (n * (n - 1))
        + (tkt - m * diag) / (m * (m - 1))
        - 2.0 * skt / (n * m)
    )
    return out


@dataclass(frozen=True)
class _Points:
    """Points prepared for :func:`_centred_kernel` at one bandwidth ``h`` (float32):
    ``x`` itself, ``x * 2 / h`` and ``-||x||² / h``."""

    x: npt.NDArray[np.float32]
    x2h: npt.NDArray[np.float32]
    neg_sq_h: npt.NDArray[np.float32]

    @classmethod
    def of(cls, x: FloatArray, bandwidth: float) -> _Points:
        x32 = np.ascontiguousarray(x, dtype=np.float32)
        sq = np.einsum("ij,ij->i", x, x)  # float64 norms, rounded once
        return cls(
            x=x32,
            x2h=np.ascontiguousarray(x * (2.0 / bandwidth), dtype=np.float32),
            neg_sq_h=(-sq / bandwidth).astype(np.float32),
        )


def _centred_kernel(a: _Points, b: _Points) -> npt.NDArray[np.float32]:
    """``exp(-||a_i - b_j||² / h) - _SHIFT`` in float32: one GEMM, then four passes in place
    (``-||a - b||²/h = 2a·b/h - ||a||²/h - ||b||²/h``, clipped at 0 against round-off)."""
    k = a.x2h @ b.x.T
    k += a.neg_sq_h[:, None]
    k += b.neg_sq_h[None, :]
    np.minimum(k, np.float32(0.0), out=k)
    np.exp(k, out=k)
    k -= np.float32(_SHIFT)
    return k


def _row_dots(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> FloatArray:
    """``sum_j a[p, j] * b[p, j]`` per row, accumulated in float64."""
    out: FloatArray = np.einsum("pj,pj->p", a, b, dtype=np.float64)
    return out


#: Keep the permutation matrices unpacked (float32 and bool) when they take at most this many
#: bytes; larger sets (thousands of permutations) are kept as bits and unpacked per test. The
#: last window's products are kept for the next (slid) window under the same bound.
_UNPACKED_BYTES = 8 << 20

#: Rows of the previous window equal to the new window's first row that are tried as the
#: start of the overlap (a window of one repeated text would otherwise try them all).
_MAX_OVERLAP_TRIES = 8


@dataclass(frozen=True)
class _Perms:
    """A permutation set as the products need it: ``s`` (bool, row 0 the observed split),
    ``w_r = 2 s_r`` and ``s_c`` (float32), for ``n`` reference points."""

    s: npt.NDArray[np.bool_]
    w_r: npt.NDArray[np.float32]
    s_c: npt.NDArray[np.float32]

    @classmethod
    def of(cls, s: npt.NDArray[np.bool_], n: int) -> _Perms:
        w_r = s[:, :n].astype(np.float32)
        w_r *= np.float32(2.0)
        return cls(s=s, w_r=w_r, s_c=s[:, n:].astype(np.float32))


@dataclass(frozen=True)
class _PermCache:
    """The fixed permutation set for windows of ``m`` points and the reference block's share
    of each ``s'Ks``; derived from the reference and the seed, not state."""

    m: int
    packed: npt.NDArray[np.uint8]  # np.packbits(s, axis=1)
    unpacked: _Perms | None  # kept when small (_UNPACKED_BYTES)
    sks_rr: FloatArray  # s_r' K_rr s_r per row (shifted kernel)
    sr_rr: FloatArray  # s_r' K_rr 1 per row
    total_rr: float  # 1' K_rr 1

    def perms(self, n: int) -> _Perms:
        if self.unpacked is not None:
            return self.unpacked
        s = np.unpackbits(self.packed, axis=1, count=n + self.m).astype(bool)
        return _Perms.of(s, n)


@dataclass(frozen=True)
class _Window:
    """The last window tested and its products, for the next window that overlaps it:
    every entry is a function of the rows it pairs (and of the fixed ``s_r``), not of
    their position, so a slid window reuses those of the rows it keeps."""

    cur: FloatArray  # (m, d), a copy of the window as given
    pts: _Points
    k_cc: npt.NDArray[np.float32]  # (m, m) shifted kernel, window x window
    a: npt.NDArray[np.float32]  # (P + 1, m): 2 s_r' K_rc, column j for window row j
    colsum_rc: FloatArray  # (m,): 1' K_rc


def _overlap(prev: FloatArray, cur: FloatArray) -> int:
    """The largest ``o`` with ``cur[:o] == prev[-o:]`` (the window slid by ``m - o`` rows),
    trying the first :data:`_MAX_OVERLAP_TRIES` rows of ``prev`` equal to ``cur[0]``; 0 if none."""
    if prev.shape != cur.shape:
        return 0
    m = cur.shape[0]
    for k in np.flatnonzero((prev == cur[0]).all(axis=1))[:_MAX_OVERLAP_TRIES]:
        o = int(m) - int(k)
        if np.array_equal(prev[int(k):], cur[:o]):
            return o
    return 0


class MMDDrift(Detector):
    """Maximum mean discrepancy (MMD²) permutation test with an RBF kernel.

    Kernel ``k(x, y) = exp(-||x - y||² / bandwidth)``, the bandwidth fixed at
    ``fit`` by the median heuristic: the median squared distance between
    reference points (on at most ``max_bandwidth_points`` of them, a seeded
    subsample). The statistic is the unbiased MMD². The p-value is
    ``(1 + #{MMD²_perm >= MMD²_obs}) / (1 + n_permutations)``.

    The permutations are not a Python loop, and what can be computed once is.
    The permutation set is fixed per reference and window size: the
    ``n_permutations`` random splits drawn from ``numpy.random.default_rng([seed,
    0])`` (the first test's stream; row 0 the observed split), as a ``(P + 1, N)``
    0/1 matrix ``S`` (``N = n_ref + n_cur``). With ``S`` fixed:

    - ``s_r'K_rr s_r`` and ``s_r'K_rr 1`` of every permutation are computed at the
      first test (``K_rr`` the reference-reference kernel, then dropped);
    - ``2 s_r'K_rc`` (one column per current row), ``1'K_rc`` and ``K_cc`` are
      functions of the rows they pair, not of their positions, so when a window is
      the previous one slid on (the stream's sliding window: its first rows equal
      the previous window's last ones) only the new rows' columns are computed
      (``(n_ref + n_cur) x k x d`` and ``(P + 1) x n_ref x k`` for ``k`` new rows);
    - per test the one full product left is ``s_c @ K_cc`` (``(P + 1) x n_cur²``).

    Kernel and products are float32 with float64 sums; ``exp(-1)`` is subtracted
    from every kernel value first (the unbiased MMD² does not change) so the sums
    stay small: the statistic is within ~1e-8 of the float64 formula. Each
    test's p-value is exact for its permutation set (drawn independently of the
    data); the tests of one reference share that set. A detector restored from
    its state (no previous window kept) gives the same p-values and the
    statistic to float32 round-off (the GEMMs round an element differently with
    the shape of the product). Before issue 20 every test drew fresh
    permutations from ``default_rng([seed, test])`` and multiplied the whole
    ``(P, N) @ (N, N)`` in float64 (~9x slower at n_ref 1,000 / n_cur 500 / d 384,
    one thread); the first test after ``fit`` gives the same p-value as then.
    Memory: the permutation matrices (unpacked up to 8 MiB, else as bits unpacked
    per test), the last window and its products (``O(P·n_cur + n_cur² + n_cur·d)``,
    kept up to 8 MiB: past it each test computes them all).

    ``device="numpy"`` (default) computes as above; ``"cpu"`` / ``"cuda"`` in
    float64 with torch on that device (the full ``S @ K`` product, same
    permutation set); ``"auto"`` uses torch on CUDA when it is available and
    numpy otherwise. The paths give the same p-value for the same seed up to
    float32 round-off deciding a near-tie between a permuted and the observed
    statistic.

    Time per ``score``: ``benchmarks/RESULTS.md``, "Drift tests in milliseconds
    (issue 20)".

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
        # derived caches (not state): rebuilt from the reference and the seed
        self._perm: _PermCache | None = None
        self._ref_p: _Points | None = None
        self._centre: FloatArray = np.zeros(0)
        self._window: _Window | None = None
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
        self._perm = None
        self._ref_p = None
        self._window = None
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
        pc = self._perm_cache(m)
        device = self._resolved_device()
        if device == "numpy":
            stats_all = self._stats_numpy(cur, pc)
        else:
            stats_all = self._stats_torch(cur, pc.perms(n).s, device)
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

    def _perm_cache(self, m: int) -> _PermCache:
        """The fixed permutation set for current windows of ``m`` points and what the
        reference block contributes to each of its quadratic forms (built once per reference
        and window size)."""
        pc = self._perm
        if pc is not None and pc.m == m:
            return pc
        n = self._n_ref
        self._perm = self._window = None  # one window size at a time: free the old set first
        s = with_observed_split(
            np.random.default_rng([self._seed, 0]), self._n_permutations, n, n + m
        )
        ref_p = self._ref_points()
        k_rr = _centred_kernel(ref_p, ref_p)
        s_r = s[:, :n].astype(np.float32)
        sks_rr = _row_dots(s_r @ k_rr, s_r)
        del s_r
        small = s.size * 9 <= _UNPACKED_BYTES  # bool + two float32 parts
        rowsum_rr = k_rr.sum(axis=1, dtype=np.float64)
        pc = _PermCache(
            m=m,
            packed=np.packbits(s, axis=1),
            unpacked=_Perms.of(s, n) if small else None,
            sks_rr=sks_rr,
            sr_rr=s[:, :n] @ rowsum_rr,
            total_rr=float(rowsum_rr.sum()),
        )
        self._perm = pc
        return pc

    def _ref_points(self) -> _Points:
        """The reference's points, centred on its mean (also every window's, by
        :meth:`_cur_points`): the kernel depends on differences only, and the float32
        expansion ``2a.b/h - |a|²/h - |b|²/h`` loses them to round-off when ``|a|²/h`` is
        large (embeddings clustered far from the origin)."""
        if self._ref_p is None:
            self._centre = self._ref.mean(axis=0)
            self._ref_p = _Points.of(self._ref - self._centre, self._bandwidth)
        return self._ref_p

    def _cur_points(self, cur: FloatArray) -> _Points:
        """``cur``'s points, centred as the reference's (call :meth:`_ref_points` first)."""
        return _Points.of(cur - self._centre, self._bandwidth)

    def _window_products(self, cur: FloatArray, pm: _Perms) -> _Window:
        """``K_cc``, ``2 s_r' K_rc`` and ``1' K_rc`` of ``cur``: computed for the rows new since
        the last window when ``cur`` is that window slid on (the stream's sliding window),
        all of them otherwise. Each entry is the same GEMM element either way."""
        ref_p = self._ref_points()
        prev = self._window
        o = _overlap(prev.cur, cur) if prev is not None else 0
        if prev is None or o == 0:
            pts = self._cur_points(cur)
            k_rc = _centred_kernel(ref_p, pts)
            k_cc = _centred_kernel(pts, pts)
            a = pm.w_r @ k_rc
            colsum_rc = k_rc.sum(axis=0, dtype=np.float64)
        else:
            m, k = cur.shape[0], cur.shape[0] - o
            new = self._cur_points(cur[o:])
            pts = _Points(
                x=np.concatenate([prev.pts.x[k:], new.x]),
                x2h=np.concatenate([prev.pts.x2h[k:], new.x2h]),
                neg_sq_h=np.concatenate([prev.pts.neg_sq_h[k:], new.neg_sq_h]),
            )
            k_rc_new = _centred_kernel(ref_p, new)
            k_cc = np.empty((m, m), dtype=np.float32)
            k_cc[:o, :o] = prev.k_cc[k:, k:]
            k_cc[:, o:] = _centred_kernel(pts, new)
            k_cc[o:, :o] = k_cc[:o, o:].T  # the kernel is symmetric (up to float32 round-off)
            a = np.concatenate([prev.a[:, k:], pm.w_r @ k_rc_new], axis=1)
            colsum_rc = np.concatenate(
                [prev.colsum_rc[k:], k_rc_new.sum(axis=0, dtype=np.float64)]
            )
        win = _Window(cur=cur.copy(), pts=pts, k_cc=k_cc, a=a, colsum_rc=colsum_rc)
        kept = (win.cur.nbytes + pts.x.nbytes + pts.x2h.nbytes + pts.neg_sq_h.nbytes + k_cc.nbytes
                + a.nbytes + colsum_rc.nbytes)
        # kept for the next test only when small: at thousands of permutations ``a`` alone is
        # (P + 1) x n_cur floats per detector, for every key-field the stage holds
        self._window = win if kept <= _UNPACKED_BYTES else None
        return win

    def _stats_numpy(self, cur: FloatArray, pc: _PermCache) -> FloatArray:
        """All ``P + 1`` statistics from the window's products (:meth:`_window_products`)
        and one GEMM ``s_c @ K_cc``: ``s'Ks = s_r'K_rr s_r`` (cached) ``+ (2 s_r'K_rc +
        s_c'K_cc) s_c`` and ``s'K1 = s_r'K_rr 1`` (cached) ``+ s_r'K_rc 1 + s_c'(K_cr 1 +
        K_cc 1)``."""
        n, m = self._n_ref, cur.shape[0]
        pm = pc.perms(n)
        win = self._window_products(cur, pm)
        sks = pc.sks_rr + _row_dots(win.a, pm.s_c) + _row_dots(pm.s_c @ win.k_cc, pm.s_c)
        rowsum_cc = win.k_cc.sum(axis=1, dtype=np.float64)
        sr = pc.sr_rr + 0.5 * win.a.sum(axis=1, dtype=np.float64) + pm.s[:, n:] @ (
            win.colsum_rc + rowsum_cc
        )
        total = pc.total_rr + 2.0 * float(win.colsum_rc.sum()) + float(rowsum_cc.sum())
        return _mmd_from_quadratic(sks, sr, total, n, m, 1.0 - _SHIFT)

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
