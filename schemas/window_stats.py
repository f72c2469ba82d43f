"""Result types of the window stage: one :class:`WindowStats` per window and key.

The field names are the columns of ``llm_window_metrics``. :meth:`WindowStats.metrics`
exposes the same numbers under the dotted names alert rules use
(``latency_ms.p99``, ``guardrail.hit_rate``, ``errors.rate``, ...), so a rule,
a Prometheus export and a SQL query all speak of the same quantity.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["WindowKey", "WindowStats", "METRIC_NAMES"]


@dataclass(frozen=True, slots=True, order=True)
class WindowKey:
    """The grouping key of a window: app, grouping model, prompt version ('' when absent)."""

    app: str
    model: str
    prompt_version: str = ""


@dataclass(frozen=True, slots=True)
class WindowStats:
    """Everything measured over one half-open window ``[window_start_ms, window_end_ms)``."""

    window_start_ms: int
    window_end_ms: int
    app: str
    model: str
    prompt_version: str
    events: int
    errors: int
    late_events: int
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    ttft_p99_ms: float | None
    tpot_p50_ms: float | None
    tpot_p95_ms: float | None
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int
    cache_creation_input_tokens: int
    reasoning_output_tokens: int
    cost_usd: float
    unpriced_events: int
    guardrail_checked_events: int
    guardrail_hits: int
    guardrail_blocked: int
    feedback_events: int
    negative_feedback: int
    sketch_relative_accuracy: float
    final: bool

    @property
    def key(self) -> WindowKey:
        return WindowKey(self.app, self.model, self.prompt_version)

    @property
    def guardrail_hit_rate(self) -> float:
        """Share of events with at least one flagged or blocked guardrail verdict."""
        return self.guardrail_hits / self.events if self.events else 0.0

    @property
    def guardrail_blocked_rate(self) -> float:
        return self.guardrail_blocked / self.events if self.events else 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.events if self.events else 0.0

    @property
    def negative_feedback_rate(self) -> float:
        """Share of events with feedback that gave -1 (0.0 when none gave feedback)."""
        return self.negative_feedback / self.feedback_events if self.feedback_events else 0.0

    def metrics(self) -> dict[str, float]:
        """The window's numbers under the dotted names alert rules use (see METRIC_NAMES)."""
        out: dict[str, float | None] = {
            "events.count": float(self.events),
            "errors.count": float(self.errors),
            "errors.rate": self.error_rate,
            "late_events.count": float(self.late_events),
            "latency_ms.p50": self.latency_p50_ms,
            "latency_ms.p90": self.latency_p90_ms,
            "latency_ms.p95": self.latency_p95_ms,
            "latency_ms.p99": self.latency_p99_ms,
            "ttft_ms.p50": self.ttft_p50_ms,
            "ttft_ms.p95": self.ttft_p95_ms,
            "ttft_ms.p99": self.ttft_p99_ms,
            "tpot_ms.p50": self.tpot_p50_ms,
            "tpot_ms.p95": self.tpot_p95_ms,
            "input_tokens.sum": float(self.input_tokens),
            "output_tokens.sum": float(self.output_tokens),
            "tokens.per_call": (self.input_tokens + self.output_tokens) / self.events if self.events else None,
            "cost_usd.sum": self.cost_usd,
            "cost_usd.per_call": self.cost_usd / self.events if self.events else None,
            "unpriced.count": float(self.unpriced_events),
            "guardrail.hit_rate": self.guardrail_hit_rate,
            "guardrail.blocked_rate": self.guardrail_blocked_rate,
            "feedback.negative_rate": self.negative_feedback_rate,
        }
        return {k: v for k, v in out.items() if v is not None}

    def row(self) -> dict[str, Any]:
        """The ``llm_window_metrics`` row (without ``updated_at``, which the sink stamps)."""
        d = asdict(self)
        d["window_start"] = d.pop("window_start_ms")
        d["window_end"] = d.pop("window_end_ms")
        d["guardrail_hit_rate"] = self.guardrail_hit_rate
        d["guardrail_blocked_rate"] = self.guardrail_blocked_rate
        d["negative_feedback_rate"] = self.negative_feedback_rate
        d["final"] = int(self.final)
        return d


METRIC_NAMES: tuple[str, ...] = (
    "events.count", "errors.count", "errors.rate", "late_events.count",
    "latency_ms.p50", "latency_ms.p90", "latency_ms.p95", "latency_ms.p99",
    "ttft_ms.p50", "ttft_ms.p95", "ttft_ms.p99", "tpot_ms.p50", "tpot_ms.p95",
    "input_tokens.sum", "output_tokens.sum", "tokens.per_call",
    "cost_usd.sum", "cost_usd.per_call", "unpriced.count",
    "guardrail.hit_rate", "guardrail.blocked_rate", "feedback.negative_rate",
)
