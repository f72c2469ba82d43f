"""What a comparison of two populations of calls is made of, shared by ``driftline
compare`` / ``driftline gate`` (streams/cli/compare.py) and the ``compare`` alert rule
kind (schemas/rules.py, streams/stages/compare_rule.py): the label columns a population
may filter on, the gate's criteria (one table: the CLI options and the rule fields are
both named from it) and how a limit is written. Pure data, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

__all__ = ["LABELS", "GATE_CRITERIA", "RATE_CRITERIA", "CompareSpec", "criterion_option", "describe", "parse_fraction"]

LABELS: Final[tuple[str, ...]] = ("prompt_version", "model", "environment", "app", "provider", "request_model",
                                  "response_model", "operation")
"""Label columns of ``llm_events`` a population may filter on (the only names that reach SQL text)."""

GATE_CRITERIA: Final[tuple[tuple[str, str, str], ...]] = (
    # (rule field = option without "--", dashes as underscores; metric; criterion kind)
    ("max_p95_increase", "latency_p95_ms", "relative"),
    ("max_p50_increase", "latency_p50_ms", "relative"),
    ("max_latency_increase", "latency_mean_ms", "relative"),
    ("max_ttft_increase", "ttft_p95_ms", "relative"),
    ("max_cost_increase", "cost_per_call_usd", "relative"),
    ("max_tokens_increase", "tokens_per_call", "relative"),
    ("max_error_rate_increase", "error_rate", "increase"),
    ("max_negative_feedback_increase", "negative_feedback_rate", "increase"),
    ("max_guardrail_rate", "guardrail_hit_rate", "rate"),
)
"""The gate's criteria: ``relative`` (candidate <= (1 + limit) x baseline), ``increase``
(rate difference <= limit, in absolute terms) or ``rate`` (the candidate's rate <= limit)."""

RATE_CRITERIA: Final[frozenset[str]] = frozenset(k for k, _m, kind in GATE_CRITERIA if kind != "relative")
"""The criteria whose limit is a rate (at most 100%)."""


def criterion_option(key: str) -> str:
    """The CLI option of a criterion: ``max_p95_increase`` -> ``--max-p95-increase``."""
    return "--" + key.replace("_", "-")


def parse_fraction(v: str, what: str) -> float:
    """``10%`` or ``0.1`` as 0.1 (must be >= 0)."""
    s = v.strip()
    try:
        x = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
    except ValueError:
        raise ValueError(f"{what}: expected a percentage like 10% (or a fraction like 0.1), got {v!r}") from None
    if not (x >= 0.0) or not math.isfinite(x):
        raise ValueError(f"{what}: must be >= 0, got {v!r}")
    return x


def describe(labels: tuple[tuple[str, str], ...]) -> str:
    """``prompt_version=v4,model=x``: a population as one label value."""
    return ",".join(f"{k}={v}" for k, v in labels)


@dataclass(frozen=True)
class CompareSpec:
    """The comparison a ``compare`` alert rule runs (see schemas/rules.py): ``baseline`` and
    ``candidate`` label filters, an optional ``app`` both share, the gate's ``limits``
    (criterion key of :data:`GATE_CRITERIA`, fraction), ``min_samples`` and ``alpha`` as
    ``driftline gate`` takes them, the calls read (``lookback_ms`` back from the evaluation,
    or from the fixed ``since_ms``) and how often it runs (``interval_ms``)."""

    baseline: tuple[tuple[str, str], ...]
    candidate: tuple[tuple[str, str], ...]
    limits: tuple[tuple[str, float], ...]
    app: str | None = None
    min_samples: int = 500
    alpha: float = 0.05
    lookback_ms: int | None = 3_600_000
    since_ms: int | None = None
    interval_ms: int = 60_000

    def __post_init__(self) -> None:
        for what, pop in (("baseline", self.baseline), ("candidate", self.candidate)):
            if not pop:
                raise ValueError(f"{what}: give at least one label")
            for k, _v in pop:
                if k not in LABELS:
                    raise ValueError(f"{what}: unknown label {k!r} (labels: {', '.join(LABELS)})")
        if dict(self.baseline) == dict(self.candidate):
            raise ValueError("the baseline and the candidate are the same filter")
        keys = {k for k, _m, _kind in GATE_CRITERIA}
        if not self.limits or any(k not in keys or not (v >= 0) or not math.isfinite(v) for k, v in self.limits):
            raise ValueError(f"limits: give at least one of {', '.join(sorted(keys))}, each >= 0")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha!r}")
        if self.min_samples < 2:
            raise ValueError(f"min_samples must be >= 2, got {self.min_samples!r}")
        if (self.lookback_ms is None) == (self.since_ms is None):
            raise ValueError("give exactly one of lookback_ms or since_ms")
        if self.lookback_ms is not None and self.lookback_ms <= 0:
            raise ValueError("lookback_ms must be > 0")
        if self.interval_ms < 1000:
            raise ValueError("interval_ms must be >= 1000")

    def start_ms(self, now_ms: int) -> int:
        """The first event time read at an evaluation at ``now_ms``."""
        return self.since_ms if self.since_ms is not None else now_ms - int(self.lookback_ms or 0)
