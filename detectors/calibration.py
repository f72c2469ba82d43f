"""False-alarm budgets for many drift tests: Bonferroni, Holm, expected alarms per day.

A worker runs one test per key (app x model x prompt version), per field
(prompt, response, latency, ...) and per window. With per-test level ``alpha``
and no drift anywhere, each test is a false alarm with probability at most
``alpha``, so the expected number of false alarms per day is

    E[false alarms / day] = alpha x (86 400 / cadence_s) x n_keys x n_fields

(by linearity of expectation; no independence needed). The probability of at
least one false alarm in a day is ``1 - (1 - alpha)^N`` for ``N`` independent
tests (at most ``N x alpha`` always). :func:`alpha_for_budget` inverts the first
formula: pick the number of false alarms per day you accept and get the
per-test ``alpha`` to construct the detectors with.

Within one window, :func:`bonferroni` / :func:`holm` control the chance of any
false alarm among ``m`` simultaneous tests (family-wise error rate ``<= alpha``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ._checks import _check_alpha

__all__ = [
    "bonferroni",
    "holm",
    "daily_test_count",
    "expected_false_alarms_per_day",
    "prob_any_false_alarm_per_day",
    "alpha_for_budget",
]

SECONDS_PER_DAY = 86_400.0


def bonferroni(alpha: float, m: int) -> float:
    """Per-test level ``alpha / m`` keeping the family-wise error rate of ``m`` tests <= ``alpha``.

    >>> bonferroni(0.05, 10)
    0.005
    """
    _check_alpha(alpha)
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m!r}")
    return alpha / m


def holm(p_values: Sequence[float | None], alpha: float) -> list[bool]:
    """Holm's step-down procedure: which of ``m`` tests reject at family-wise level ``alpha``.

    Sort the p-values ascending; reject the ``i``-th smallest (0-based) while
    ``p_(i) <= alpha / (m - i)``; stop at the first that fails. Uniformly more
    powerful than Bonferroni with the same guarantee. ``None`` p-values (tests
    without one) never reject and do not count in ``m``.

    >>> holm([0.01, 0.04, 0.03, 0.2], 0.05)
    [True, False, False, False]
    """
    _check_alpha(alpha)
    idx = [i for i, p in enumerate(p_values) if p is not None]
    m = len(idx)
    out = [False] * len(p_values)
    order = sorted(idx, key=lambda i: (p_values[i], i))
    for rank, i in enumerate(order):
        p = p_values[i]
        assert p is not None
        if p <= alpha / (m - rank):
            out[i] = True
        else:
            break
    return out


def daily_test_count(cadence_s: float, n_keys: int, n_fields: int) -> float:
    """Tests per day: one per key and field every ``cadence_s`` seconds."""
    if not cadence_s > 0:
        raise ValueError(f"cadence_s must be > 0, got {cadence_s!r}")
    if n_keys < 0 or n_fields < 0:
        raise ValueError("n_keys and n_fields must be >= 0")
    return SECONDS_PER_DAY / cadence_s * n_keys * n_fields


def expected_false_alarms_per_day(
    alpha: float, cadence_s: float, n_keys: int, n_fields: int
) -> float:
    """Expected false alarms per day with no drift: ``alpha x daily_test_count``.

    Example: 5-minute windows, 20 keys, 4 fields, alpha 0.01 -> 230 alarms a day
    (23 040 tests).

    >>> round(expected_false_alarms_per_day(0.01, 300, 20, 4), 2)
    230.4
    """
    _check_alpha(alpha)
    return alpha * daily_test_count(cadence_s, n_keys, n_fields)


def prob_any_false_alarm_per_day(
    alpha: float, cadence_s: float, n_keys: int, n_fields: int
) -> float:
    """Probability of at least one false alarm in a day, tests taken as independent.

    >>> round(prob_any_false_alarm_per_day(1e-5, 3600, 10, 2), 4)
    0.0048
    """
    _check_alpha(alpha)
    n = daily_test_count(cadence_s, n_keys, n_fields)
    return -math.expm1(n * math.log1p(-alpha))


def alpha_for_budget(
    false_alarms_per_day: float, cadence_s: float, n_keys: int, n_fields: int
) -> float:
    """Per-test ``alpha`` whose expected false alarms per day equal the budget.

    >>> alpha_for_budget(1.0, 300, 20, 4)   # one false alarm a day allowed
    4.340277777777778e-05
    """
    if not false_alarms_per_day > 0:
        raise ValueError(f"false_alarms_per_day must be > 0, got {false_alarms_per_day!r}")
    n = daily_test_count(cadence_s, n_keys, n_fields)
    if n <= 0:
        raise ValueError("no tests per day: n_keys and n_fields must be >= 1")
    alpha = false_alarms_per_day / n
    if not alpha < 1.0:
        raise ValueError(f"budget {false_alarms_per_day}/day allows alpha >= 1 ({alpha})")
    return alpha
