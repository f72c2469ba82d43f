"""Anytime-valid comparisons of two populations: confidence sequences you may peek at.

People watch an A/B test (prompt v4 against v5, model X against Y) and stop when it
looks good. A fixed-sample confidence interval is then wrong: looked at after every
batch, a 95 % interval excludes the truth at *some* look far more often than 5 % of
the time (``benchmarks/bench_sequential.py`` measures it). A *confidence sequence*
``(C_t)`` covers the truth at every sample size at once,
``P(exists t: truth not in C_t) <= alpha``, so any stopping rule (peek after every
batch, stop when it looks good, run the gate in every CI build) keeps the error
at ``alpha``.

Three kinds, each a published method, implemented here in closed form:

- **Means and their contrasts** (latency, TTFT, tokens, cost per call):
  :func:`mean_contrast_cs` for ``mu_candidate - ratio * mu_baseline``. The
  Gaussian-mixture (Robbins) boundary with plug-in variance: the *asymptotic
  confidence sequence* of Waudby-Smith, Arnold, Wu, Ramdas and Howard (2024),
  "Time-uniform central limit theory and asymptotic confidence sequences",
  Ann. Statist. 52(6), Thm 2.2, which is also the confidence interval of the
  normal-mixture SPRT of Johari, Koomen, Pekelis and Walsh (2022), "Always valid
  inference: continuous monitoring of A/B tests", Oper. Res. 70(3) (the
  Optimizely method). Its validity is asymptotic (finite variance, a traffic
  split that does not drift); the seeded simulations in the tests and the
  benchmark check it on log-normal latencies with looks from 100 calls on
  (50/50 and 10 % canary splits: 0.018 and 0.038 at alpha 0.05).
- **Proportions** (error, guardrail-hit, negative-feedback rate):
  :func:`proportion_contrast_cs`, the same boundary with Bernoulli variances
  (smoothed, ``(x + 1) / (n + 2)``, so that an arm with no events yet does not
  get a zero-width interval); and :func:`rate_cs`, a *non-asymptotic* confidence
  sequence for one rate, the beta-binomial mixture martingale of Howard,
  Ramdas, McAuliffe and Sekhon (2021), "Time-uniform, nonparametric,
  nonasymptotic confidence sequences", Ann. Statist. 49(2), Prop. 7 (exact
  for Bernoulli data: by Ville's inequality).
- **Quantiles** (p50 / p95 latency): :func:`quantile_ranks`, the fixed-quantile
  confidence sequence of Howard and Ramdas (2022), "Sequential estimation of
  quantiles with applications to A/B-testing and best-arm identification",
  Bernoulli 28(3), Sec. 3: ``1{X_i <= q_p}`` is Bernoulli(``p``) at the true
  quantile, so the beta-binomial test of ``p`` on the count below ``q`` gives
  the order statistics that bound ``q_p`` at every ``n`` (non-asymptotic, any
  continuous distribution). Two arms are compared through both arms'
  sequences at ``alpha / 2`` each (:func:`quantile_contrast`).

Why not a library: ``confseq`` (Howard & Waudby-Smith's own) is an sdist-only C++
build that needs Boost headers (last release 2023) and covers bounded means, not
the unbounded two-sample contrasts used here; ``expectation`` needs Python >= 3.12;
``savvi`` pulls in cvxpy. The boundaries are a few lines of closed form each.

Every function takes sufficient statistics (counts, means, variances), so the same
code serves a ClickHouse query (``driftline compare`` / ``driftline gate``) and a
streaming update. The mixture's width is tuned to be smallest at ``t_opt`` events
(both arms together); the guarantee holds for any ``t_opt``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import betaln

from ._checks import _check_alpha

__all__ = [
    "DEFAULT_T_OPT",
    "Interval",
    "MeanStats",
    "mixture_rho2",
    "mixture_radius",
    "mean_contrast_cs",
    "proportion_contrast_cs",
    "rate_cs",
    "beta_binomial_log_martingale",
    "quantile_ranks",
    "quantile_contrast",
]

DEFAULT_T_OPT = 2000
"""Events (both arms) where the mixture boundaries are tightest by default."""


@dataclass(frozen=True)
class Interval:
    """A confidence-sequence value: ``estimate`` and the interval ``[low, high]``
    (``-inf`` / ``inf`` where the data cannot bound it yet)."""

    estimate: float
    low: float
    high: float

    def __post_init__(self) -> None:
        if math.isnan(self.low) or math.isnan(self.high) or self.low > self.high:
            raise ValueError(f"bad interval [{self.low}, {self.high}]")

    @property
    def bounded(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def above(self, v: float) -> bool:
        """The whole interval is above ``v`` (``v`` excluded, with confidence)."""
        return self.low > v

    def below(self, v: float) -> bool:
        return self.high < v


@dataclass(frozen=True)
class MeanStats:
    """One arm's sufficient statistics for a mean: ``n``, mean and sample variance (ddof 1)."""

    n: int
    mean: float
    var: float

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n!r}")
        if self.n and not math.isfinite(self.mean):
            raise ValueError(f"mean must be finite, got {self.mean!r}")
        if not (self.var >= 0.0) or not math.isfinite(self.var):
            raise ValueError(f"var must be finite and >= 0, got {self.var!r}")

    @classmethod
    def of(cls, values: np.ndarray | list[float]) -> MeanStats:
        x = np.asarray(values, dtype=np.float64)
        if x.size == 0:
            return cls(0, 0.0, 0.0)
        return cls(int(x.size), float(x.mean()), float(x.var(ddof=1)) if x.size > 1 else 0.0)


def _check_t_opt(t_opt: float) -> None:
    if not (t_opt >= 1.0) or not math.isfinite(t_opt):
        raise ValueError(f"t_opt must be a finite number >= 1, got {t_opt!r}")


def mixture_rho2(t_opt: float, alpha: float) -> float:
    """The mixing precision ``rho^2`` that makes the two-sided Gaussian-mixture boundary
    (about) narrowest at ``t = t_opt`` (Waudby-Smith et al. 2024's closed-form approximation;
    ``confseq.conjmix_bounded.rho2_opt``):
    ``(-alpha^2 - 2 log alpha + log(1 - 2 log alpha - alpha^2)) / t_opt``.

    >>> round(mixture_rho2(1000, 0.05), 6)
    0.007933
    """
    _check_alpha(alpha)
    _check_t_opt(t_opt)
    la = math.log(alpha)
    return (-alpha * alpha - 2.0 * la + math.log(-2.0 * la + 1.0 - alpha * alpha)) / t_opt


def mixture_radius(var_of_estimate: float, t: float, alpha: float, rho2: float) -> float:
    """Half-width of the two-sided Gaussian-mixture confidence sequence.

    With ``s2 = t * var_of_estimate`` (the per-event variance), the mixture over
    effects ``N(0, s2 * rho2)`` of the Gaussian likelihood ratio crosses ``1/alpha``
    exactly when the estimate is further than

    ``sqrt(var_of_estimate * (1 + t rho2) / (t rho2) * log((1 + t rho2) / alpha^2))``

    from the truth (Robbins' normal mixture; Howard et al. 2021, eq. (14);
    Waudby-Smith et al. 2024, Thm 2.2 for one mean, ``var_of_estimate = s2 / t``).

    >>> round(mixture_radius(1.0 / 100, 100, 0.05, 0.01), 4)
    0.3656
    """
    if t <= 0 or var_of_estimate < 0:
        raise ValueError("t must be > 0 and var_of_estimate >= 0")
    trho = t * rho2
    return math.sqrt(var_of_estimate * (1.0 + trho) / trho * math.log((1.0 + trho) / (alpha * alpha)))


def mean_contrast_cs(baseline: MeanStats, candidate: MeanStats, alpha: float = 0.05, *,
                     ratio: float = 1.0, t_opt: float = DEFAULT_T_OPT) -> Interval:
    """Confidence sequence for ``mu_candidate - ratio * mu_baseline``.

    ``ratio = 1``: the difference of means; ``ratio = 1.05``: "the candidate costs at
    most 5 % more" holds with confidence when the interval lies below 0. The
    estimate's variance is ``var_c / n_c + ratio^2 var_b / n_b`` and ``t = n_b + n_c``
    (Waudby-Smith et al. 2024, Sec. 3, two-sample form). Fewer than 2 values in an
    arm: the whole line.

    >>> b, c = MeanStats(100, 10.0, 4.0), MeanStats(100, 12.0, 4.0)
    >>> iv = mean_contrast_cs(b, c, 0.05, t_opt=200)
    >>> print(f"{iv.estimate:.2f} [{iv.low:.3f}, {iv.high:.3f}]")
    2.00 [1.142, 2.858]
    """
    _check_alpha(alpha)
    _check_t_opt(t_opt)
    if not (ratio > 0) or not math.isfinite(ratio):
        raise ValueError(f"ratio must be a finite number > 0, got {ratio!r}")
    if baseline.n < 2 or candidate.n < 2:
        est = candidate.mean - ratio * baseline.mean if baseline.n and candidate.n else math.nan
        return Interval(0.0 if math.isnan(est) else est, -math.inf, math.inf)
    est = candidate.mean - ratio * baseline.mean
    v = candidate.var / candidate.n + ratio * ratio * baseline.var / baseline.n
    r = mixture_radius(v, baseline.n + candidate.n, alpha, mixture_rho2(t_opt, alpha))
    return Interval(est, est - r, est + r)


def proportion_contrast_cs(x_baseline: int, n_baseline: int, x_candidate: int, n_candidate: int,
                           alpha: float = 0.05, *, t_opt: float = DEFAULT_T_OPT) -> Interval:
    """Confidence sequence for ``p_candidate - p_baseline`` (``x`` events of ``n``).

    The Gaussian-mixture boundary of :func:`mean_contrast_cs` with Bernoulli
    variances taken at ``(x + 1) / (n + 2)``, so a rare event not seen yet in an arm
    still has a variance (a plug-in ``0`` would give a zero-width interval), and at
    least the pooled variance ``p(1-p)(1/n_b + 1/n_c)`` of both arms together: a small
    arm (a 10 % canary) with a 2 % rate otherwise gets its variance from a handful of
    events, and its A/A false-positive rate under peeking was 0.056 at alpha 0.05;
    with the pooled floor 0.002, at the same power (benchmarks/bench_sequential.py).

    >>> iv = proportion_contrast_cs(20, 1000, 45, 1000, t_opt=2000)
    >>> print(f"{iv.estimate:.3f} [{iv.low:.4f}, {iv.high:.4f}]")
    0.025 [0.0007, 0.0493]
    """
    _check_alpha(alpha)
    _check_t_opt(t_opt)
    for x, n in ((x_baseline, n_baseline), (x_candidate, n_candidate)):
        if n < 0 or x < 0 or x > n:
            raise ValueError(f"need 0 <= x <= n, got x={x!r}, n={n!r}")
    if n_baseline < 1 or n_candidate < 1:
        return Interval(0.0, -1.0, 1.0)
    est = x_candidate / n_candidate - x_baseline / n_baseline
    pb, pc = (x_baseline + 1) / (n_baseline + 2), (x_candidate + 1) / (n_candidate + 2)
    pp = (x_baseline + x_candidate + 1) / (n_baseline + n_candidate + 2)
    v = max(pb * (1 - pb) / n_baseline + pc * (1 - pc) / n_candidate,
            pp * (1 - pp) * (1 / n_baseline + 1 / n_candidate))
    r = mixture_radius(v, n_baseline + n_candidate, alpha, mixture_rho2(t_opt, alpha))
    return Interval(est, max(-1.0, est - r), min(1.0, est + r))


def _prior_size(t_opt: float, alpha: float) -> float:
    """The beta prior's size ``a + b`` matching the Gaussian mixture's ``rho^2``: the
    prior variance of the rate, ``p(1-p)/(a+b+1)``, equals ``p(1-p) rho^2``."""
    return max(1.0 / mixture_rho2(t_opt, alpha) - 1.0, 1e-3)


def beta_binomial_log_martingale(k: np.ndarray | int, t: int, p: np.ndarray | float,
                                 size: float) -> np.ndarray:
    """``log M_t``: the beta-binomial mixture of likelihood ratios against ``Bernoulli(p)``
    after ``k`` successes in ``t`` trials, prior ``Beta(p size, (1-p) size)``:

    ``log B(a + k, b + t - k) - log B(a, b) - k log p - (t - k) log(1 - p)``.

    A nonnegative martingale of mean 1 when the data are Bernoulli(``p``), so by
    Ville's inequality it ever reaches ``1/alpha`` with probability at most ``alpha``
    (Howard et al. 2021, Prop. 7).
    """
    kk = np.asarray(k, dtype=np.float64)
    pp = np.asarray(p, dtype=np.float64)
    a, b = pp * size, (1.0 - pp) * size
    out: np.ndarray = (betaln(a + kk, b + t - kk) - betaln(a, b)
                       - kk * np.log(pp) - (t - kk) * np.log1p(-pp))
    return out


def rate_cs(x: int, n: int, alpha: float = 0.05, *, t_opt: float = DEFAULT_T_OPT) -> Interval:
    """Non-asymptotic confidence sequence for one rate (``x`` events in ``n``): the
    rates ``p`` whose beta-binomial martingale stays below ``1/alpha``, on a grid of
    4000 rates (the interval is the grid's hull, widened by one grid step).

    >>> iv = rate_cs(10, 1000)
    >>> print(f"{iv.estimate:.3f} [{iv.low:.4f}, {iv.high:.4f}]")
    0.010 [0.0030, 0.0230]
    """
    _check_alpha(alpha)
    _check_t_opt(t_opt)
    if n < 0 or x < 0 or x > n:
        raise ValueError(f"need 0 <= x <= n, got x={x!r}, n={n!r}")
    if n == 0:
        return Interval(0.0, 0.0, 1.0)
    grid = np.unique(np.concatenate([np.geomspace(1e-7, 0.5, 2000), 1.0 - np.geomspace(1e-7, 0.5, 2000)]))
    ok = beta_binomial_log_martingale(x, n, grid, _prior_size(t_opt, alpha)) < math.log(1.0 / alpha)
    idx = np.flatnonzero(ok)
    est = x / n
    if idx.size == 0:  # cannot happen for the true rate; keep the estimate
        return Interval(est, est, est)
    lo = 0.0 if idx[0] == 0 else float(grid[idx[0] - 1])
    hi = 1.0 if idx[-1] == grid.size - 1 else float(grid[idx[-1] + 1])
    return Interval(est, min(lo, est), max(hi, est))


def quantile_ranks(n: int, q: float, alpha: float = 0.05, *,
                   t_opt: float = DEFAULT_T_OPT) -> tuple[int, int, int]:
    """1-based ranks ``(lo, est, hi)`` of the order statistics that bound the ``q``-quantile.

    After ``n`` values ``X_(1) <= ... <= X_(n)``, the confidence sequence for the
    true ``q``-quantile is ``[X_(lo), X_(hi)]`` (Howard & Ramdas 2022, Sec. 3): the
    counts ``k`` of values below a candidate quantile that the beta-binomial test
    of ``q`` keeps are an interval ``[k_lo, k_hi]`` (``log M`` is convex in ``k``),
    so ``lo = k_lo`` and ``hi = k_hi + 1``. ``lo = 0`` means ``-inf`` and
    ``hi = n + 1`` means ``+inf`` (too few values yet). ``est = ceil(q n)`` is the
    point estimate (the empirical quantile, ``quantileExactLow``'s definition).

    >>> quantile_ranks(1000, 0.95)
    (928, 950, 970)
    >>> quantile_ranks(20, 0.95)
    (9, 19, 21)
    """
    _check_alpha(alpha)
    _check_t_opt(t_opt)
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n!r}")
    if n == 0:
        return 0, 0, 1
    k = np.arange(n + 1)
    keep = np.flatnonzero(beta_binomial_log_martingale(k, n, q, _prior_size(t_opt, alpha))
                          < math.log(1.0 / alpha))
    est = max(1, math.ceil(q * n))
    return int(keep[0]), est, int(keep[-1]) + 1


def quantile_contrast(baseline: tuple[float, float, float], candidate: tuple[float, float, float],
                      *, ratio: float = 1.0) -> Interval:
    """``q_candidate - ratio * q_baseline`` from each arm's ``(low, estimate, high)``
    (each arm's sequence at ``alpha / 2``: both hold together with probability
    ``>= 1 - alpha``). Quantiles are taken as nonnegative (latencies)."""
    bl, be, bh = baseline
    cl, ce, ch = candidate
    return Interval(ce - ratio * be, cl - ratio * bh, ch - ratio * bl)
