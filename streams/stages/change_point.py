"""When did it start: the change point of a numeric field's flagged window.

When the KS test of a numeric field flags (:mod:`driftline.streams.stages.numeric_drift`),
this module locates the change in the tested window and reports its event time and size
as a second ``drift_scores`` row (method ``change_point``):

1. the window's values (the last ``m x b`` of them, ``b`` = :func:`block_size`) are cut into
   ``m`` blocks of ``b`` consecutive values; each value is scored by its mid-rank in the
   reference (``u`` in [0, 1], ties counted half: robust to the heavy tails of latencies and
   to the ties of token counts, e.g. 70% zero reasoning tokens, where block medians are
   far from normal), and a block's statistic is its mean score minus 1/2;
2. its **null** variance is the variance of the reference's own scores (``v``), so the tail
   sum from block ``k`` on (``L`` values) has variance ``L v (1 + (L + 1) / n_ref)`` under no
   change, the second term the reference's own sampling error (the Mann-Whitney variance;
   without it the scan flagged 2-4x its level on control streams);
3. a two-sided CUSUM scan for one change from the reference level: ``T_k`` = that tail sum
   over its standard deviation (~N(0, 1) under no change); the change is at
   ``k* = argmax |T_k|``; its p-value is Bonferroni over the ``m`` starts,
   ``min(1, m x 2 (1 - Phi(|T_k*|)))``, decided at the KS test's per-test level;
4. the explanation gives the change's position (``seq`` and event time of the first value
   of block ``k*``; ``at_or_before_window_start`` when ``k* = 0``: the change may be older
   than the window) and size: p50 and mean **before** (the reference and the window's
   values before ``k*``) ``->`` **after** (the window from ``k*``).

Nothing here has state of its own: it reads the reference and the window that
``numeric_drift_state`` already saves and restores, so a restarted worker locates the
same change. The false-alarm rate and the location error are measured by
``benchmarks/bench_numeric_drift.py --change-points`` (README "Numeric drift").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from statistics import NormalDist
from typing import Any

import numpy as np

from driftline.schemas.drift_result import DriftResult

__all__ = ["METHOD", "block_size", "locate_change", "change_point_result", "change_point_of"]

METHOD = "change_point"
_PHI = NormalDist()


def block_size(window_size: int) -> int:
    """Values per block: a 20th of the window, at least 10 (500 -> 25: 20 blocks)."""
    return max(10, window_size // 20)


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def midranks(ref_sorted: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Each value's mid-rank in the sorted reference, in [0, 1] (ties count half)."""
    lo = np.searchsorted(ref_sorted, x, side="left")
    hi = np.searchsorted(ref_sorted, x, side="right")
    return (lo + hi) / (2.0 * len(ref_sorted))


def locate_change(ref: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray, b: int) -> dict[str, Any] | None:
    """The change in ``values`` (a window, oldest first) from the level of ``ref``: ``k`` (the
    index in ``values`` of the first value after the change), ``statistic`` (``|T_k|``),
    ``p_value``, ``blocks`` and ``before`` / ``after`` p50 and mean. None when the window has
    fewer than 2 blocks or the reference is constant."""
    r = np.sort(np.asarray(ref, dtype=np.float64))
    n_r = len(r)
    m = len(values) // b
    if m < 2 or n_r < 2:
        return None
    u_ref = midranks(r, r)  # mean exactly 1/2 (mid-ranks)
    v = float(u_ref.var())
    if not v > 0:
        return None
    off = len(values) - m * b
    x = np.asarray(values, dtype=np.float64)
    blocks = midranks(r, x[off:]).reshape(m, b).mean(axis=1) - 0.5  # block score, null mean 0
    tail_n = (m - np.arange(m)) * b  # values from block k on
    # Var(sum of the tail's scores) under no change: tail_n v (1 + (tail_n + 1) / n_r), the
    # second term the reference's own sampling error (the Mann-Whitney variance)
    t = np.cumsum(blocks[::-1])[::-1] * b / np.sqrt(tail_n * v * (1.0 + (tail_n + 1) / n_r))
    k = int(np.argmax(np.abs(t)))
    stat = float(abs(t[k]))
    p = min(1.0, m * 2.0 * (1.0 - _PHI.cdf(stat)))
    i = off + k * b
    before = np.concatenate([r, x[:i]])
    after = x[i:]
    return {"k": i, "block": k, "blocks": m, "block_size": b, "statistic": stat, "p_value": p,
            "null_var": v,
            "before": {"p50": float(np.median(before)), "mean": float(before.mean())},
            "after": {"p50": float(np.median(after)), "mean": float(after.mean())}}


def change_point_result(field: str, ref: Sequence[float] | np.ndarray, window: Sequence[tuple[Any, int]],
                        ks: DriftResult, window_size: int) -> DriftResult | None:
    """The ``change_point`` result of a flagged KS test ``ks`` of ``field`` (its window:
    ``(value, ts_ms)`` pairs, oldest first), at the KS test's level. None: not located."""
    pairs = list(window)
    return change_point_of(field, ref, np.asarray([float(v) for v, _ in pairs], dtype=np.float64),
                           np.asarray([int(t) for _, t in pairs], dtype=np.int64), ks, window_size)


def change_point_of(field: str, ref: Sequence[float] | np.ndarray, values: np.ndarray, ts_ms: np.ndarray,
                    ks: DriftResult, window_size: int) -> DriftResult | None:
    """:func:`change_point_result` of a window given as its values and times (epoch ms),
    oldest first (the numeric stage's numpy window)."""
    vals = np.asarray(values, dtype=np.float64)
    c = locate_change(ref, vals, block_size(window_size))
    if c is None:
        return None
    w = ks.explanation["window"]
    seq = int(w["seq_from"]) + c["k"]
    at_ms = int(ts_ms[c["k"]])
    at_start = c["block"] == 0
    when = datetime.fromtimestamp(at_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"
    bf, af = c["before"], c["after"]
    summary = (f"{field} changed {'at or before' if at_start else 'at'} {when} (value #{seq}): "
               f"p50 {_fmt(bf['p50'])} -> {_fmt(af['p50'])}, mean {_fmt(bf['mean'])} -> {_fmt(af['mean'])}")
    expl = {
        "change": {"seq": seq, "ts_ms": at_ms, "at_or_before_window_start": at_start},
        "before": bf, "after": af, "summary": summary,
        "scan": {"blocks": c["blocks"], "block_size": c["block_size"], "block": c["block"],
                 "score": "block mean of the values' mid-rank in the reference", "null_var": c["null_var"]},
        "rule": ("drifted = p_value < threshold; p_value = blocks x 2(1 - Phi(|T|)), T the CUSUM of the "
                 "block scores standardised by their null variance on the reference (the KS test's threshold)"),
        "window": dict(w), "reference": dict(ks.explanation["reference"]),
    }
    return DriftResult(method=METHOD, statistic=c["statistic"], p_value=c["p_value"], threshold=ks.threshold,
                       drifted=bool(c["p_value"] < ks.threshold), n_ref=ks.n_ref, n_cur=len(vals), explanation=expl)
