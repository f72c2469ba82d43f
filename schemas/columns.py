"""The fields of an LLM event and the column lists of the ClickHouse tables, in DDL
order (schemas/tables.sql).

Every writer inserts by these names; ``tests/unit/test_contract.py`` checks each
tuple against the columns of the tables that tables.sql creates, and
:data:`EVENT_FIELDS` against those types and against the wire schema
(schemas/event.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

__all__ = [
    "EventField", "EVENT_FIELDS", "EVENT_COLUMNS", "WINDOW_COLUMNS", "SCORE_COLUMNS", "EMBEDDING_COLUMNS", "REFERENCE_COLUMNS",
    "CONTROL_LOG_COLUMNS", "NUMERIC_STATE_COLUMNS", "ALERT_COLUMNS", "LOG_COLUMNS", "OUTBOX_COLUMNS", "REKEY_LOG_COLUMNS", "GOLDEN_COLUMNS",
    "GUARD_COLUMNS",
    "TABLE_COLUMNS",
]

Source = Literal["wire", "record", "derived"]
Check = Literal["", "label", "ident", "count", "duration"]


@dataclass(frozen=True, slots=True)
class EventField:
    """One field of an LLM event: a key of the JSON wire format (schemas/event.py), a
    column of ``llm_events`` (tables.sql), or both.

    Arrow types are written as ``string``, ``int8``/``int64``, ``uint8``/``uint32``/``uint64``,
    ``float64``, ``timestamp[ms, tz=UTC]``, ``list<T>`` and ``struct<name: T, ...>``
    (streams/ingest/transforms.py turns them into pyarrow types; schemas/ does not
    depend on pyarrow).

    Attributes
    ----------
    name
        The wire key and/or the column name.
    ch
        The ClickHouse type of the ``llm_events`` column; ``""``: a wire key that is no
        column (``guardrails``, stored as the three ``guardrail_*`` lists).
    arrow
        The Arrow type of the column as the worker inserts it (``""`` when no column).
    source
        ``wire``: a key of the JSON event; ``record``: added by the decode step from the
        Kafka record (its topic, partition, offset; the unknown keys as ``extra``);
        ``derived``: computed by ``to_columns`` from the other fields.
    decoded
        The Arrow type in the decoded batch (wire keys as Arrow's JSON reader reads them,
        the timestamp as epoch ms); ``""`` for derived fields.
    check
        The bound on a wire key's values, as :class:`~driftline.schemas.event.LLMEvent`'s
        annotation says: ``label`` (at most ``MAX_LABEL_CHARS`` characters; of each item
        for a list), ``ident`` (``MAX_ID_CHARS``), ``count`` (0 to ``MAX_TOKENS``),
        ``duration`` (finite, >= 0).
    values
        The literal values allowed (for ``guardrails``: the verdicts).
    default
        The value given to an absent key.
    required
        The key must be present (and not null) on the wire.
    """

    name: str
    ch: str
    arrow: str
    source: Source
    decoded: str = ""
    check: Check = ""
    values: tuple[str | int, ...] = ()
    default: str | None = None
    required: bool = False

    @property
    def nullable(self) -> bool:
        """The column stores NULL (else a missing value is stored as the type's default)."""
        return self.ch.startswith("Nullable(")


_TS = "timestamp[ms, tz=UTC]"
_LC = "LowCardinality(String)"


def _wire(name: str, ch: str, arrow: str, decoded: str, check: Check = "", **kw: Any) -> EventField:
    return EventField(name, ch, arrow, "wire", decoded, check, **kw)


#: Every field of an LLM event, in ``llm_events`` column order (wire-only keys where they
#: are stored). The Arrow schemas and value checks of the decode, the columns the worker
#: inserts and :data:`EVENT_COLUMNS` are derived from this table; ``tests/unit/test_contract.py``
#: checks it against LLMEvent's annotations and against the DDL of tables.sql.
EVENT_FIELDS: Final[tuple[EventField, ...]] = (
    _wire("event_id", "String", "string", "string", "ident"),
    _wire("timestamp", "DateTime64(3, 'UTC')", _TS, "int64", required=True),
    _wire("app", _LC, "string", "string", "label", required=True),
    _wire("environment", _LC, "string", "string", "label"),
    _wire("provider", _LC, "string", "string", "label"),
    _wire("operation", _LC, "string", "string", "label", default="chat"),
    _wire("request_model", _LC, "string", "string", "label"),
    _wire("response_model", _LC, "string", "string", "label"),
    EventField("model", _LC, "string", "derived"),  # response_model, else request_model
    _wire("prompt_version", _LC, "string", "string", "label"),
    _wire("conversation_id", "String", "string", "string", "ident"),
    _wire("user_id", "String", "string", "string", "ident"),
    _wire("trace_id", "String", "string", "string", "ident"),
    _wire("span_id", "String", "string", "string", "ident"),
    _wire("agent_name", _LC, "string", "string", "label"),  # gen_ai.agent.name
    _wire("agent_id", "String", "string", "string", "ident"),  # gen_ai.agent.id
    _wire("tool_name", _LC, "string", "string", "label"),  # gen_ai.tool.name
    _wire("input_tokens", "Nullable(UInt64)", "uint64", "int64", "count"),
    _wire("output_tokens", "Nullable(UInt64)", "uint64", "int64", "count"),
    _wire("cache_read_input_tokens", "Nullable(UInt64)", "uint64", "int64", "count"),
    _wire("cache_creation_input_tokens", "Nullable(UInt64)", "uint64", "int64", "count"),
    _wire("reasoning_output_tokens", "Nullable(UInt64)", "uint64", "int64", "count"),
    _wire("latency_ms", "Float64", "float64", "float64", "duration", required=True),
    _wire("ttft_ms", "Nullable(Float64)", "float64", "float64", "duration"),
    _wire("tpot_ms", "Nullable(Float64)", "float64", "float64", "duration"),
    _wire("status", _LC, "string", "string", values=("ok", "error"), default="ok"),
    _wire("error_type", _LC, "string", "string", "label"),
    _wire("finish_reasons", f"Array({_LC})", "list<string>", "list<string>", "label"),
    _wire("guardrails", "", "", "list<struct<name: string, verdict: string, score: float64>>",
          values=("pass", "flagged", "blocked")),
    EventField("guardrail_names", "Array(String)", "list<string>", "derived"),
    EventField("guardrail_verdicts", f"Array({_LC})", "list<string>", "derived"),
    EventField("guardrail_scores", "Array(Nullable(Float64))", "list<float64>", "derived"),
    EventField("guardrail_hit", "UInt8", "uint8", "derived"),  # a verdict flagged or blocked
    _wire("feedback", "Nullable(Int8)", "int8", "int64", values=(-1, 0, 1)),
    _wire("prompt", "Nullable(String)", "string", "string"),
    _wire("response", "Nullable(String)", "string", "string"),
    EventField("cost_usd", "Nullable(Float64)", "float64", "derived"),  # NULL: unpriced
    EventField("price_version", _LC, "string", "derived"),
    EventField("extra", "String", "string", "record", "string"),  # the unknown keys, as JSON
    EventField("source_topic", _LC, "string", "record", "string"),
    EventField("source_partition", "UInt32", "uint32", "record", "int64"),
    EventField("source_offset", "UInt64", "uint64", "record", "int64"),
    EventField("ingested_at", "DateTime64(3, 'UTC')", _TS, "derived"),
)
#: ``llm_events``: one row per LLM call (the columns of :data:`EVENT_FIELDS`)
EVENT_COLUMNS: Final[tuple[str, ...]] = tuple(f.name for f in EVENT_FIELDS if f.ch)
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
#: ``numeric_drift_state``: the state of one key and numeric field (its latest row in force)
NUMERIC_STATE_COLUMNS: Final[tuple[str, ...]] = (
    "app", "model", "prompt_version", "field", "version", "mode", "seq", "collect_from", "ref_seq_from",
    "ref_seq_to", "ref_from_ms", "ref_to_ms", "has_ref", "ref_values", "ref_labels", "cur_values", "cur_labels",
    "cur_ts", "control_id", "row_version", "updated_at",
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

#: ``rekey_log``: the OTLP re-keyer's progress, one row per OTLP source partition per batch
REKEY_LOG_COLUMNS: Final[tuple[str, ...]] = (
    "source_topic", "source_partition", "next_offset", "events_start", "dlq_start", "written_at",
)

#: ``drift_golden``: one row per text of a golden set (``driftline baseline load``)
GOLDEN_COLUMNS: Final[tuple[str, ...]] = ("golden_id", "idx", "text", "embedding", "embed_model", "created_at")

#: ``guard_results``: one row per scanned text and semantic-guard category (never the matched attack text)
GUARD_COLUMNS: Final[tuple[str, ...]] = (
    "event_id", "ts", "app", "model", "prompt_version", "field", "category", "score", "similarity",
    "nearest_id", "flagged", "scanner",
)

#: table -> its columns, every table of tables.sql
TABLE_COLUMNS: Final[dict[str, tuple[str, ...]]] = {
    "llm_events": EVENT_COLUMNS, "llm_window_metrics": WINDOW_COLUMNS, "drift_scores": SCORE_COLUMNS,
    "llm_embeddings": EMBEDDING_COLUMNS, "drift_references": REFERENCE_COLUMNS,
    "drift_control_log": CONTROL_LOG_COLUMNS, "alerts": ALERT_COLUMNS, "ingest_log": LOG_COLUMNS,
    "dlq_outbox": OUTBOX_COLUMNS, "rekey_log": REKEY_LOG_COLUMNS,
    "drift_golden": GOLDEN_COLUMNS, "guard_results": GUARD_COLUMNS,
    "numeric_drift_state": NUMERIC_STATE_COLUMNS,
}
