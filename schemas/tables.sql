-- driftline ClickHouse schema. `{db}` is replaced by the configured database.
-- Every statement is idempotent (IF NOT EXISTS) and is run on worker start.
-- Statements are separated by a line holding only ';'.
-- Retention: no TTL here (default: kept forever). The worker's --retention-days-text and
-- --retention-days add column TTLs (llm_events.prompt/response/extra, dlq_outbox.value,
-- drift_scores.explanation) and row TTLs (llm_events, dlq_outbox) with ALTER … MODIFY
-- at start, and change or remove them when the settings change (streams/sinks/clickhouse.py Retention).

CREATE DATABASE IF NOT EXISTS {db}
;
-- One row per LLM call. ReplacingMergeTree on event_id: a re-delivered event
-- replaces its twin at merge time; query with FINAL for exact counts at any time.
-- source_topic/source_partition/source_offset let a restarted worker skip what is already stored.
CREATE TABLE IF NOT EXISTS {db}.llm_events
(
    event_id String,
    timestamp DateTime64(3, 'UTC'),
    app LowCardinality(String),
    environment LowCardinality(String),
    provider LowCardinality(String),
    operation LowCardinality(String),
    request_model LowCardinality(String),
    response_model LowCardinality(String),
    model LowCardinality(String),
    prompt_version LowCardinality(String),
    conversation_id String,
    user_id String,
    trace_id String,
    span_id String,
    agent_name LowCardinality(String),
    agent_id String,
    tool_name LowCardinality(String),
    input_tokens Nullable(UInt64),
    output_tokens Nullable(UInt64),
    cache_read_input_tokens Nullable(UInt64),
    cache_creation_input_tokens Nullable(UInt64),
    reasoning_output_tokens Nullable(UInt64),
    latency_ms Float64,
    ttft_ms Nullable(Float64),
    tpot_ms Nullable(Float64),
    status LowCardinality(String),
    error_type LowCardinality(String),
    finish_reasons Array(LowCardinality(String)),
    guardrail_names Array(String),
    guardrail_verdicts Array(LowCardinality(String)),
    guardrail_scores Array(Nullable(Float64)),
    guardrail_hit UInt8,
    feedback Nullable(Int8),
    prompt Nullable(String),
    response Nullable(String),
    cost_usd Nullable(Float64),
    price_version LowCardinality(String),
    extra String,
    source_topic LowCardinality(String),
    source_partition UInt32,
    source_offset UInt64,
    ingested_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (app, model, timestamp, event_id)
SETTINGS non_replicated_deduplication_window = 1000
;
-- One row per tumbling window and key. Windows are re-emitted while open
-- (final = 0) and once when closed (final = 1); updated_at is the version,
-- so FINAL shows the latest row of each window.
CREATE TABLE IF NOT EXISTS {db}.llm_window_metrics
(
    window_start DateTime64(3, 'UTC'),
    window_end DateTime64(3, 'UTC'),
    app LowCardinality(String),
    model LowCardinality(String),
    prompt_version LowCardinality(String),
    events UInt64,
    errors UInt64,
    late_events UInt64,
    latency_p50_ms Float64,
    latency_p90_ms Float64,
    latency_p95_ms Float64,
    latency_p99_ms Float64,
    ttft_p50_ms Nullable(Float64),
    ttft_p95_ms Nullable(Float64),
    ttft_p99_ms Nullable(Float64),
    tpot_p50_ms Nullable(Float64),
    tpot_p95_ms Nullable(Float64),
    input_tokens UInt64,
    output_tokens UInt64,
    cache_read_input_tokens UInt64,
    cache_creation_input_tokens UInt64,
    reasoning_output_tokens UInt64,
    cost_usd Float64,
    unpriced_events UInt64,
    guardrail_checked_events UInt64,
    guardrail_hits UInt64,
    guardrail_blocked UInt64,
    guardrail_hit_rate Float64,
    guardrail_blocked_rate Float64,
    feedback_events UInt64,
    negative_feedback UInt64,
    negative_feedback_rate Float64,
    sketch_relative_accuracy Float64,
    final UInt8,
    updated_at DateTime64(6, 'UTC')
)
ENGINE = ReplacingMergeTree(updated_at)
PARTITION BY toYYYYMM(window_start)
ORDER BY (app, model, prompt_version, window_start)
SETTINGS non_replicated_deduplication_window = 1000
;
-- One row per drift detector test.
CREATE TABLE IF NOT EXISTS {db}.drift_scores
(
    ts DateTime64(3, 'UTC'),
    app LowCardinality(String),
    model LowCardinality(String),
    prompt_version LowCardinality(String),
    field LowCardinality(String),
    method LowCardinality(String),
    statistic Float64,
    p_value Nullable(Float64),
    threshold Float64,
    drifted UInt8,
    n_ref UInt32,
    n_cur UInt32,
    explanation String
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (app, model, prompt_version, field, method, ts)
SETTINGS non_replicated_deduplication_window = 1000
;
-- One row per sampled text embedding (the drift stage samples per key; see README
-- "Semantic drift"). seq numbers the samples of one key and field in arrival order;
-- event_id is part of the key, so two workers that hand out the same seq for
-- different texts keep both rows (a re-sent sample of the same event still collapses).
-- Embeddings are L2-normalised float32: cosineDistance(embedding, …) works directly.
CREATE TABLE IF NOT EXISTS {db}.llm_embeddings
(
    event_id String,
    timestamp DateTime64(3, 'UTC'),
    app LowCardinality(String),
    model LowCardinality(String),
    prompt_version LowCardinality(String),
    field LowCardinality(String),
    seq UInt64,
    embed_model LowCardinality(String),
    text_hash UInt64,
    embedding Array(Float32)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (app, model, prompt_version, field, seq, event_id)
SETTINGS non_replicated_deduplication_window = 1000
;
-- Drift references, one row per version per key and field (history kept; the
-- highest version is in force). mode: first_n (automatic), rebase, pinned, reset
-- (no reference: the next samples from seq_from make a new one). control_id is the
-- baseline command that asked for it ('' for automatic references).
CREATE TABLE IF NOT EXISTS {db}.drift_references
(
    app LowCardinality(String),
    model LowCardinality(String),
    prompt_version LowCardinality(String),
    field LowCardinality(String),
    version UInt32,
    mode LowCardinality(String),
    seq_from UInt64,
    seq_to UInt64,
    from_ts DateTime64(3, 'UTC'),
    to_ts DateTime64(3, 'UTC'),
    n UInt32,
    event_ids Array(String),
    embed_model LowCardinality(String),
    control_id String,
    created_at DateTime64(3, 'UTC'),
    note String
)
ENGINE = MergeTree
ORDER BY (app, model, prompt_version, field, version)
SETTINGS non_replicated_deduplication_window = 1000
;
-- One row per baseline command a worker applied (driftline.control), also when it
-- matched no key: a restarted worker skips the commands logged here.
CREATE TABLE IF NOT EXISTS {db}.drift_control_log
(
    control_id String,
    applied_at DateTime64(3, 'UTC'),
    action LowCardinality(String),
    command String,
    n_references UInt32,
    topic String,
    partition Int32,
    offset Int64
)
ENGINE = MergeTree
ORDER BY (control_id, applied_at)
SETTINGS non_replicated_deduplication_window = 1000
;
-- Golden sets (driftline baseline load): the texts of one curated set and their vectors,
-- embedded once by the worker that applied it first (with its model); a key's golden
-- reference (drift_references, mode golden) names its set by control_id = golden_id.
-- text: as stored for other samples (redacted under --redact). A repeated write of a
-- set (two workers, a retry) is collapsed by the ReplacingMergeTree; the rows of two
-- embedding models are not (embed_model is in the key: each worker reads its own model's).
CREATE TABLE IF NOT EXISTS {db}.drift_golden
(
    golden_id String,
    idx UInt32,
    text String,
    embedding Array(Float32),
    embed_model LowCardinality(String),
    created_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (golden_id, embed_model, idx)
SETTINGS non_replicated_deduplication_window = 1000
;
-- Semantic guard verdicts (README "Semantic guardrails"): one row per text the drift stage
-- embedded and per category of its field (prompt: jailbreak, harmful_request; response: toxic).
-- nearest_id names the most similar known attack (never its text); scanner identifies the
-- calibrated reference set. Written with llm_embeddings (a rewrite after a retry collapses).
CREATE TABLE IF NOT EXISTS {db}.guard_results
(
    event_id String,
    ts DateTime64(3, 'UTC'),
    app LowCardinality(String),
    model LowCardinality(String),
    prompt_version LowCardinality(String),
    field LowCardinality(String),
    category LowCardinality(String),
    score Float32,
    similarity Float32,
    nearest_id String,
    flagged UInt8,
    scanner LowCardinality(String)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (app, model, prompt_version, field, category, event_id)
SETTINGS non_replicated_deduplication_window = 1000
;
-- The numeric drift stage's state per key and field (README "Numeric drift"): the
-- reference's values (ref_values, or ref_labels for finish_reason), the current window
-- (cur_*; while has_ref = 0 the reference being collected), the numbering (seq). The row
-- with the highest row_version (version << 40 | seq) is in force: read with FINAL.
CREATE TABLE IF NOT EXISTS {db}.numeric_drift_state
(
    app LowCardinality(String),
    model LowCardinality(String),
    prompt_version LowCardinality(String),
    field LowCardinality(String),
    version UInt32,
    mode LowCardinality(String),
    seq UInt64,
    collect_from UInt64,
    ref_seq_from UInt64,
    ref_seq_to UInt64,
    ref_from_ms Int64,
    ref_to_ms Int64,
    has_ref UInt8,
    ref_values Array(Float64),
    ref_labels Array(String),
    cur_values Array(Float64),
    cur_labels Array(String),
    cur_ts Array(Int64),
    control_id String,
    row_version UInt64,
    updated_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(row_version)
ORDER BY (app, model, prompt_version, field)
SETTINGS non_replicated_deduplication_window = 1000
;
-- One row per alert state change.
CREATE TABLE IF NOT EXISTS {db}.alerts
(
    ts DateTime64(3, 'UTC'),
    rule LowCardinality(String),
    state LowCardinality(String),
    severity LowCardinality(String),
    app LowCardinality(String),
    model LowCardinality(String),
    value Float64,
    labels Map(String, String),
    annotations Map(String, String),
    fingerprint String
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (rule, fingerprint, ts)
SETTINGS non_replicated_deduplication_window = 1000
;
-- The worker's write log: one row per source partition per write step, inserted
-- LAST in that step (after llm_events, dlq_outbox and llm_window_metrics), so a
-- row here means everything up to last_offset is safe. A restarted worker resumes
-- after last_offset of the highest epoch; last_timestamp/last_fingerprint identify
-- the Kafka record at last_offset, so a recreated topic (or a restarted in-memory
-- broker) is detected instead of skipped into; the epoch counts those re-creations.
-- dlq_start: the DLQ topic's end offsets before this step's DLQ sends (JSON), where
-- recovery starts reading the DLQ to find which outbox rows it already holds.
CREATE TABLE IF NOT EXISTS {db}.ingest_log
(
    source_topic String,
    source_partition UInt32,
    epoch UInt32,
    first_offset UInt64,
    last_offset UInt64,
    last_timestamp Int64,
    last_fingerprint UInt64,
    dlq_start String,
    written_at DateTime64(3, 'UTC'),
    -- the writing worker's stream watermark (epoch ms; 0 unknown): windows that closed
    -- below it are final and are not reopened when a restart rebuilds the open windows
    watermark_ms Int64 DEFAULT 0
)
ENGINE = ReplacingMergeTree
ORDER BY (source_topic, source_partition, epoch, last_offset)
SETTINGS non_replicated_deduplication_window = 1000
;
-- The OTLP re-keyer's log (streams/ingest/rekey.py): one row per OTLP source partition
-- per batch, written once the batch's events are in the events topic (keyed app/model)
-- and its rejected records in the DLQ. next_offset: where the partition resumes.
-- events_start / dlq_start (JSON, partition -> offset): every later send of this source
-- lands at or after these offsets, so a new owner reads the events topic and the DLQ
-- from there to find what a re-keyer that died before its next row already sent.
CREATE TABLE IF NOT EXISTS {db}.rekey_log
(
    source_topic String,
    source_partition UInt32,
    next_offset UInt64,
    events_start String,
    dlq_start String,
    written_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (source_topic, source_partition, next_offset)
SETTINGS non_replicated_deduplication_window = 1000
;
-- Rejected records (the DLQ outbox), written in the same step as the events and
-- before ingest_log; sent to llm.events.dlq after it. idx numbers the rejections
-- of one source record (an OTLP request can be rejected in part).
CREATE TABLE IF NOT EXISTS {db}.dlq_outbox
(
    source_topic String,
    source_partition UInt32,
    epoch UInt32,
    source_offset UInt64,
    idx UInt32,
    key Nullable(String),
    value String,
    reason String,
    field String,
    written_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (source_topic, source_partition, epoch, source_offset, idx)
SETTINGS non_replicated_deduplication_window = 1000
;
-- Agents and sessions (README "Agents and sessions"): one row per trace, computed at
-- query time from llm_events FINAL, so every figure is exact under the exactly-once
-- rules (a replayed or re-sent event collapses with its twin before it is counted; an
-- aggregating materialized view would count it twice). Calls: every row of the trace;
-- llm_calls: model calls (any operation but the agent/tool ones); tool_calls: operation
-- execute_tool; agent_spans: invoke_agent / invoke_workflow / create_agent. Tokens and
-- cost: sums over the trace's rows (OTLP agent spans carry no usage: it stays in extra,
-- so the model calls are not counted twice). wall_ms: first start to last end.
-- unpriced_llm_calls: model calls without a price (cost_usd NULL), not in cost_usd.
-- FINAL reads the whole table: filter llm_events by app and time for big stores
-- (the same SELECT with a WHERE, README).
CREATE OR REPLACE VIEW {db}.trace_summary AS
SELECT
    e.trace_id AS trace_id,
    anyIf(e.conversation_id, e.conversation_id != '') AS conversation_id,
    anyIf(e.user_id, e.user_id != '') AS user_id,
    arraySort(groupUniqArray(e.app)) AS apps,
    count() AS calls,
    countIf(e.operation NOT IN ('execute_tool', 'invoke_agent', 'create_agent', 'invoke_workflow')) AS llm_calls,
    countIf(e.operation = 'execute_tool') AS tool_calls,
    countIf(e.operation IN ('invoke_agent', 'create_agent', 'invoke_workflow')) AS agent_spans,
    countIf(e.status = 'error') AS errors,
    sum(ifNull(e.input_tokens, 0)) AS input_tokens,
    sum(ifNull(e.output_tokens, 0)) AS output_tokens,
    sum(ifNull(e.cost_usd, 0)) AS cost_usd,
    countIf(e.cost_usd IS NULL AND e.operation NOT IN ('execute_tool', 'invoke_agent', 'create_agent',
                                                     'invoke_workflow')) AS unpriced_llm_calls,
    min(e.timestamp) AS started_at,
    max(toUnixTimestamp64Milli(e.timestamp) + e.latency_ms) - toUnixTimestamp64Milli(min(e.timestamp)) AS wall_ms,
    arraySort(groupUniqArrayIf(e.agent_name, e.agent_name != '')) AS agents,
    arraySort(groupUniqArrayIf(e.tool_name, e.tool_name != '')) AS tools,
    arraySort(groupUniqArrayIf(e.model, e.model != '')) AS models
FROM {db}.llm_events AS e FINAL
WHERE e.trace_id != ''
GROUP BY e.trace_id
;
-- The same per conversation (gen_ai.conversation.id), with the number of its traces.
CREATE OR REPLACE VIEW {db}.conversation_summary AS
SELECT
    e.conversation_id AS conversation_id,
    anyIf(e.user_id, e.user_id != '') AS user_id,
    arraySort(groupUniqArray(e.app)) AS apps,
    uniqExactIf(e.trace_id, e.trace_id != '') AS traces,
    count() AS calls,
    countIf(e.operation NOT IN ('execute_tool', 'invoke_agent', 'create_agent', 'invoke_workflow')) AS llm_calls,
    countIf(e.operation = 'execute_tool') AS tool_calls,
    countIf(e.operation IN ('invoke_agent', 'create_agent', 'invoke_workflow')) AS agent_spans,
    countIf(e.status = 'error') AS errors,
    sum(ifNull(e.input_tokens, 0)) AS input_tokens,
    sum(ifNull(e.output_tokens, 0)) AS output_tokens,
    sum(ifNull(e.cost_usd, 0)) AS cost_usd,
    countIf(e.cost_usd IS NULL AND e.operation NOT IN ('execute_tool', 'invoke_agent', 'create_agent',
                                                     'invoke_workflow')) AS unpriced_llm_calls,
    min(e.timestamp) AS started_at,
    max(toUnixTimestamp64Milli(e.timestamp) + e.latency_ms) - toUnixTimestamp64Milli(min(e.timestamp)) AS wall_ms,
    arraySort(groupUniqArrayIf(e.agent_name, e.agent_name != '')) AS agents,
    arraySort(groupUniqArrayIf(e.tool_name, e.tool_name != '')) AS tools,
    arraySort(groupUniqArrayIf(e.model, e.model != '')) AS models
FROM {db}.llm_events AS e FINAL
WHERE e.conversation_id != ''
GROUP BY e.conversation_id
