"""The column lists of the ClickHouse tables, in DDL order (schemas/tables.sql).

Every writer inserts by these names; ``tests/unit/test_contract.py`` checks each
tuple against the columns of the tables that tables.sql creates.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "EVENT_COLUMNS", "WINDOW_COLUMNS", "SCORE_COLUMNS", "EMBEDDING_COLUMNS", "REFERENCE_COLUMNS",
    "CONTROL_LOG_COLUMNS", "ALERT_COLUMNS", "LOG_COLUMNS", "OUTBOX_COLUMNS", "TABLE_COLUMNS",
]

#: ``llm_events``: one row per LLM call (the Arrow schema in streams/ingest/transforms.py has these fields)
EVENT_COLUMNS: Final[tuple[str, ...]] = (
    "event_id", "timestamp", "app", "environment", "provider", "operation", "request_model",
    "response_model", "model", "prompt_version", "conversation_id", "user_id", "trace_id", "span_id",
    "input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens",
    "reasoning_output_tokens", "latency_ms", "ttft_ms", "tpot_ms", "status", "error_type",
    "finish_reasons", "guardrail_names", "guardrail_verdicts", "guardrail_scores", "guardrail_hit",
    "feedback", "prompt", "response", "cost_usd", "price_version", "extra", "source_topic",
    "source_partition", "source_offset", "ingested_at",
)
#: ``llm_window_metrics``: one row per window and key (schemas/window_stats.py WindowStats)
WINDOW_COLUMNS: Final[tuple[str, ...]] = (
    "window_start", "window_end", "app", "model", "prompt_version", "events", "errors",
    "late_events", "latency_p50_ms", "latency_p90_ms", "latency_p95_ms", "latency_p99_ms",
    "ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p95_ms", "input_tokens",
    "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens",
    "reasoning_output_tokens", "cost_usd", "unpriced_events", "guardrail_checked_events",
    "guardrail_hits", "guardrail_blocked", "guardrail_hit_rate", "guardrail_blocked_rate",
    "feedback_events", "negative_feedback", "negative_feedback_rate", "sketch_relative_accuracy",
    "final", "updated_at",
)
#: ``drift_scores``: one row per drift test
SCORE_COLUMNS: Final[tuple[str, ...]] = (
    "ts", "app", "model", "prompt_version", "field", "method", "statistic", "p_value", "threshold",
    "drifted", "n_ref", "n_cur", "explanation",
)
#: ``llm_embeddings``: one row per sampled text
EMBEDDING_COLUMNS: Final[tuple[str, ...]] = (
    "event_id", "timestamp", "app", "model", "prompt_version", "field", "seq", "embed_model",
    "text_hash", "embedding",
)
#: ``drift_references``: one row per reference version per key and field
REFERENCE_COLUMNS: Final[tuple[str, ...]] = (
    "app", "model", "prompt_version", "field", "version", "mode", "seq_from", "seq_to", "from_ts",
    "to_ts", "n", "event_ids", "embed_model", "control_id", "created_at", "note",
)
#: ``drift_control_log``: one row per baseline command applied
CONTROL_LOG_COLUMNS: Final[tuple[str, ...]] = (
    "control_id", "applied_at", "action", "command", "n_references", "topic", "partition", "offset",
)
#: ``alerts``: one row per alert state change
ALERT_COLUMNS: Final[tuple[str, ...]] = (
    "ts", "rule", "state", "severity", "app", "model", "value", "labels", "annotations", "fingerprint",
)
#: ``ingest_log``: the worker's write log, one row per source partition per write step
LOG_COLUMNS: Final[tuple[str, ...]] = (
    "source_topic", "source_partition", "epoch", "first_offset", "last_offset", "last_timestamp",
    "last_fingerprint", "dlq_start", "written_at", "watermark_ms",
)
#: ``dlq_outbox``: rejected records, written before ``ingest_log`` and sent to the DLQ after it
OUTBOX_COLUMNS: Final[tuple[str, ...]] = (
    "source_topic", "source_partition", "epoch", "source_offset", "idx", "key", "value", "reason",
    "field", "written_at",
)

#: table -> its columns, every table of tables.sql
TABLE_COLUMNS: Final[dict[str, tuple[str, ...]]] = {
    "llm_events": EVENT_COLUMNS, "llm_window_metrics": WINDOW_COLUMNS, "drift_scores": SCORE_COLUMNS,
    "llm_embeddings": EMBEDDING_COLUMNS, "drift_references": REFERENCE_COLUMNS,
    "drift_control_log": CONTROL_LOG_COLUMNS, "alerts": ALERT_COLUMNS, "ingest_log": LOG_COLUMNS,
    "dlq_outbox": OUTBOX_COLUMNS,
}
