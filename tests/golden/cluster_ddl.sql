CREATE DATABASE IF NOT EXISTS driftline ON CLUSTER c
;
CREATE TABLE IF NOT EXISTS driftline.llm_events_local ON CLUSTER c
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
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/llm_events_local', '{replica}')
PARTITION BY toYYYYMM(timestamp)
ORDER BY (app, model, timestamp, event_id)
;
CREATE TABLE IF NOT EXISTS driftline.llm_events ON CLUSTER c AS driftline.llm_events_local
ENGINE = Distributed('c', 'driftline', 'llm_events_local', cityHash64(event_id))
;
CREATE TABLE IF NOT EXISTS driftline.llm_window_metrics_local ON CLUSTER c
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
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/llm_window_metrics_local', '{replica}', updated_at)
PARTITION BY toYYYYMM(window_start)
ORDER BY (app, model, prompt_version, window_start)
;
CREATE TABLE IF NOT EXISTS driftline.llm_window_metrics ON CLUSTER c AS driftline.llm_window_metrics_local
ENGINE = Distributed('c', 'driftline', 'llm_window_metrics_local', cityHash64(app, model, prompt_version, window_start))
;
CREATE TABLE IF NOT EXISTS driftline.drift_scores_local ON CLUSTER c
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
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/drift_scores_local', '{replica}')
PARTITION BY toYYYYMM(ts)
ORDER BY (app, model, prompt_version, field, method, ts)
;
CREATE TABLE IF NOT EXISTS driftline.drift_scores ON CLUSTER c AS driftline.drift_scores_local
ENGINE = Distributed('c', 'driftline', 'drift_scores_local', cityHash64(app, model, prompt_version))
;
CREATE TABLE IF NOT EXISTS driftline.llm_embeddings_local ON CLUSTER c
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
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/llm_embeddings_local', '{replica}')
PARTITION BY toYYYYMM(timestamp)
ORDER BY (app, model, prompt_version, field, seq, event_id)
;
CREATE TABLE IF NOT EXISTS driftline.llm_embeddings ON CLUSTER c AS driftline.llm_embeddings_local
ENGINE = Distributed('c', 'driftline', 'llm_embeddings_local', cityHash64(app, model, prompt_version, field))
;
CREATE TABLE IF NOT EXISTS driftline.drift_references_local ON CLUSTER c
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
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/drift_references_local', '{replica}')
ORDER BY (app, model, prompt_version, field, version)
;
CREATE TABLE IF NOT EXISTS driftline.drift_references ON CLUSTER c AS driftline.drift_references_local
ENGINE = Distributed('c', 'driftline', 'drift_references_local', cityHash64(app, model, prompt_version, field))
;
CREATE TABLE IF NOT EXISTS driftline.drift_control_log_local ON CLUSTER c
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
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/drift_control_log_local', '{replica}')
ORDER BY (control_id, applied_at)
;
CREATE TABLE IF NOT EXISTS driftline.drift_control_log ON CLUSTER c AS driftline.drift_control_log_local
ENGINE = Distributed('c', 'driftline', 'drift_control_log_local', cityHash64(control_id))
;
CREATE TABLE IF NOT EXISTS driftline.drift_golden_local ON CLUSTER c
(
    golden_id String,
    idx UInt32,
    text String,
    embedding Array(Float32),
    embed_model LowCardinality(String),
    created_at DateTime64(3, 'UTC')
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/drift_golden_local', '{replica}')
ORDER BY (golden_id, embed_model, idx)
;
CREATE TABLE IF NOT EXISTS driftline.drift_golden ON CLUSTER c AS driftline.drift_golden_local
ENGINE = Distributed('c', 'driftline', 'drift_golden_local', cityHash64(golden_id))
;
CREATE TABLE IF NOT EXISTS driftline.guard_results_local ON CLUSTER c
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
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/guard_results_local', '{replica}')
PARTITION BY toYYYYMM(ts)
ORDER BY (app, model, prompt_version, field, category, event_id)
;
CREATE TABLE IF NOT EXISTS driftline.guard_results ON CLUSTER c AS driftline.guard_results_local
ENGINE = Distributed('c', 'driftline', 'guard_results_local', cityHash64(app, model, prompt_version, field))
;
CREATE TABLE IF NOT EXISTS driftline.numeric_drift_state_local ON CLUSTER c
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
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/numeric_drift_state_local', '{replica}', row_version)
ORDER BY (app, model, prompt_version, field)
;
CREATE TABLE IF NOT EXISTS driftline.numeric_drift_state ON CLUSTER c AS driftline.numeric_drift_state_local
ENGINE = Distributed('c', 'driftline', 'numeric_drift_state_local', cityHash64(app, model, prompt_version, field))
;
CREATE TABLE IF NOT EXISTS driftline.alerts_local ON CLUSTER c
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
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/alerts_local', '{replica}')
PARTITION BY toYYYYMM(ts)
ORDER BY (rule, fingerprint, ts)
;
CREATE TABLE IF NOT EXISTS driftline.alerts ON CLUSTER c AS driftline.alerts_local
ENGINE = Distributed('c', 'driftline', 'alerts_local', cityHash64(rule, fingerprint))
;
CREATE TABLE IF NOT EXISTS driftline.ingest_log_local ON CLUSTER c
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
    watermark_ms Int64 DEFAULT 0
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/ingest_log_local', '{replica}')
ORDER BY (source_topic, source_partition, epoch, last_offset)
;
CREATE TABLE IF NOT EXISTS driftline.ingest_log ON CLUSTER c AS driftline.ingest_log_local
ENGINE = Distributed('c', 'driftline', 'ingest_log_local', cityHash64(source_topic, source_partition))
;
CREATE TABLE IF NOT EXISTS driftline.rekey_log_local ON CLUSTER c
(
    source_topic String,
    source_partition UInt32,
    next_offset UInt64,
    events_start String,
    dlq_start String,
    written_at DateTime64(3, 'UTC')
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/rekey_log_local', '{replica}')
ORDER BY (source_topic, source_partition, next_offset)
;
CREATE TABLE IF NOT EXISTS driftline.rekey_log ON CLUSTER c AS driftline.rekey_log_local
ENGINE = Distributed('c', 'driftline', 'rekey_log_local', cityHash64(source_topic, source_partition))
;
CREATE TABLE IF NOT EXISTS driftline.dlq_outbox_local ON CLUSTER c
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
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/dlq_outbox_local', '{replica}')
ORDER BY (source_topic, source_partition, epoch, source_offset, idx)
;
CREATE TABLE IF NOT EXISTS driftline.dlq_outbox ON CLUSTER c AS driftline.dlq_outbox_local
ENGINE = Distributed('c', 'driftline', 'dlq_outbox_local', cityHash64(source_topic, source_partition))
;
CREATE OR REPLACE VIEW driftline.trace_summary ON CLUSTER c AS
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
FROM driftline.llm_events AS e FINAL
WHERE e.trace_id != ''
GROUP BY e.trace_id
;
CREATE OR REPLACE VIEW driftline.conversation_summary ON CLUSTER c AS
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
FROM driftline.llm_events AS e FINAL
WHERE e.conversation_id != ''
GROUP BY e.conversation_id
;
ALTER TABLE driftline.llm_events_local ON CLUSTER c MODIFY COLUMN prompt TTL toDateTime(timestamp) + INTERVAL 7 DAY
;
ALTER TABLE driftline.llm_events_local ON CLUSTER c MODIFY COLUMN response TTL toDateTime(timestamp) + INTERVAL 7 DAY
;
ALTER TABLE driftline.llm_events_local ON CLUSTER c MODIFY COLUMN extra TTL toDateTime(timestamp) + INTERVAL 7 DAY
;
ALTER TABLE driftline.dlq_outbox_local ON CLUSTER c MODIFY COLUMN value TTL toDateTime(written_at) + INTERVAL 7 DAY
;
ALTER TABLE driftline.drift_scores_local ON CLUSTER c MODIFY COLUMN explanation TTL toDateTime(ts) + INTERVAL 7 DAY
;
ALTER TABLE driftline.llm_events_local ON CLUSTER c MODIFY TTL toDateTime(timestamp) + INTERVAL 30 DAY
;
ALTER TABLE driftline.dlq_outbox_local ON CLUSTER c MODIFY TTL toDateTime(written_at) + INTERVAL 30 DAY
