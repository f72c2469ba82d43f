"""--redact (detectors/redact.py, streams/stages/privacy.py) on the stored rows, the DLQ copies and
drift explanations; --retention-days(-text) as TTLs on a real chDB store.

Each test names the mutation of the code it catches."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections import deque
from typing import Any

import numpy as np
import pytest

from driftline.detectors.redact import Redaction, redact_text
from driftline.streams.ingest.transforms import MemoryRecord, Rejected
from driftline.streams.stages.privacy import redact_events, redact_rejected

EMAIL = "jo.doe@example.com"
CARD = "4111 1111 1111 1111"
KEY = "sk-proj-abcdefghijklmnopqrstuvwxyz012345"
PROMPT = f"Hi, I am {EMAIL}, please charge {CARD}."
RESPONSE = f"Done. Use key {KEY} next time"
SHA = "sha256:" + hashlib.sha256(PROMPT.encode()).hexdigest()


@pytest.mark.parametrize(("mode", "prompt", "response"), [
    ("none", PROMPT, RESPONSE),
    ("pii", "Hi, I am <EMAIL>, please charge <CARD>.", "Done. Use key <SECRET> next time"),
    ("hash", SHA, "sha256:" + hashlib.sha256(RESPONSE.encode()).hexdigest()),
])
def test_redact_text_exact(mode: Any, prompt: str, response: str) -> None:
    # mutations: a scanner kind mapped to the wrong token; hash of something else than the text
    assert redact_text(PROMPT, mode) == prompt
    assert redact_text(RESPONSE, mode) == response
    assert redact_text(None, mode) is None and redact_text("", mode) == ""
    assert redact_text(prompt, mode) == prompt  # idempotent: a digest is not hashed again


def test_keyed_hash_and_private_key_block() -> None:
    # mutation: the key ignored (plain sha256 in hash mode with DRIFTLINE_REDACT_KEY)
    want = "hmac-sha256:" + hmac.new(b"k3y", PROMPT.encode(), hashlib.sha256).hexdigest()
    assert Redaction("hash", b"k3y").text(PROMPT) == want
    assert "k3y" not in repr(Redaction("hash", b"k3y"))
    # mutation: only the PEM header masked (the scanner matches just the BEGIN line)
    pem = "key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----\nbye"
    assert redact_text(pem, "pii") == "key:\n<SECRET>\nbye"
    with pytest.raises(ValueError, match="unknown redact mode 'mask'"):
        Redaction("mask")  # type: ignore[arg-type]


def _event(i: int, **kw: Any) -> bytes:
    ev = {"event_id": f"e{i}", "app": "chat", "request_model": "gpt-4o", "timestamp": 1_735_689_600_000 + i,
          "latency_ms": 100.0, "prompt": PROMPT, "response": RESPONSE}
    ev.update(kw)
    return json.dumps(ev).encode()


@pytest.mark.parametrize(("mode", "prompt", "response"), [
    ("none", PROMPT, RESPONSE),
    ("pii", "Hi, I am <EMAIL>, please charge <CARD>.", "Done. Use key <SECRET> next time"),
    ("hash", SHA, "sha256:" + hashlib.sha256(RESPONSE.encode()).hexdigest()),
])
@pytest.mark.parametrize("fast", [True, False])
def test_worker_rows_are_redacted_and_stages_get_the_original(mode: Any, prompt: str, response: str,
                                                               fast: bool) -> None:
    """The worker's batch table (both decode paths) redacted as the writer does before the
    insert (``redact_events``: exact texts per mode, the other columns untouched); the
    stages' columns (``event_cols``, what the drift stage embeds) keep the original texts.
    Mutations: a text column skipped; the batch's own table redacted in place (drift
    would embed digests in hash mode). The writer's call: tests/integration/test_secrets_worker.py."""
    from driftline.streams.worker import Worker, WorkerConfig

    w = Worker(WorkerConfig(kafka="127.0.0.1:1", clickhouse="chdb:///nonexistent", redaction=Redaction(mode),
                            max_event_age_s=1e10))
    n = 70 if fast else 3  # the columnar path takes batches of 64 and more
    recs = [MemoryRecord("llm.events", 0, i, None, _event(i)) for i in range(n)]
    w.scanner = None if fast else object()  # the exact path: decode_batch(fast=False)
    decoded = w._decode(recs)
    w.scanner = None
    assert (decoded.table is not None) is fast and len(decoded.events) == (0 if fast else n)
    work = w.process(recs, {}, decoded)
    stored = redact_events(work.arrow, w.cfg.redaction)
    assert stored.num_rows == n and stored.schema == work.arrow.schema
    assert stored.column("prompt").to_pylist() == [prompt] * n
    assert stored.column("response").to_pylist() == [response] * n
    assert stored.drop_columns(["prompt", "response"]).equals(work.arrow.drop_columns(["prompt", "response"]))
    assert work.event_cols is not None
    assert work.event_cols["prompt"] == [PROMPT] * n  # what the stages (drift) see
    assert work.arrow.column("response").to_pylist() == [RESPONSE] * n
    w._decode_pool.shutdown()


def test_dlq_copies_are_redacted() -> None:
    """Mutations: JSON payloads passed through; raw bytes left unmasked (or masked with a
    change of length); JSON objects without prompt/response passed through (OTLP/JSON);
    the hash mode not saying in the reason that the payload was replaced."""
    obj = Rejected("t", 0, 7, b"k", json.dumps({"app": "chat", "prompt": PROMPT, "latency_ms": "x",
                                                 "response": [RESPONSE, 3]}).encode(),
                   f"invalid latency_ms for {EMAIL}", "latency_ms")
    got = redact_rejected(obj, Redaction("pii"))
    assert json.loads(got.value) == {"app": "chat", "prompt": "Hi, I am <EMAIL>, please charge <CARD>.",
                                     "latency_ms": "x", "response": ["Done. Use key <SECRET> next time", 3]}
    assert got.reason == "invalid latency_ms for <EMAIL>" and got.key == b"k" and got.field == "latency_ms"
    h = json.loads(redact_rejected(obj, Redaction("hash")).value)
    assert h["prompt"] == SHA and h["response"].startswith("sha256:") and h["app"] == "chat"
    raw = Rejected("t", 0, 8, None, f"not json {EMAIL} \xff".encode("latin-1"), "not valid JSON: x")
    # same length: a binary framing around the text (protobuf lengths) stays valid
    assert redact_rejected(raw, Redaction("pii")).value == b"not json <EMAIL>*********** \xff"
    # a JSON object without prompt/response (an OTLP/JSON request): masked as raw text
    otlp = Rejected("otlp_spans", 0, 9, None, json.dumps(
        {"resourceSpans": [{"v": f"ask {EMAIL}", "n": "\u00e9"}]}, ensure_ascii=False).encode(), "otlp: bad span")
    got_otlp = redact_rejected(otlp, Redaction("pii")).value
    assert json.loads(got_otlp) == {"resourceSpans": [{"v": "ask <EMAIL>***********", "n": "\u00e9"}]}
    assert len(got_otlp) == len(otlp.value)
    assert redact_rejected(otlp, Redaction("hash")).value.startswith(b"sha256:")
    hashed = redact_rejected(raw, Redaction("hash"))
    assert hashed.value == ("sha256:" + hashlib.sha256(raw.value).hexdigest()).encode()
    assert hashed.reason == "not valid JSON: x [payload of 29 bytes replaced by its digest (--redact hash)]"


def test_drift_explanation_examples_are_redacted() -> None:
    """topic_mix quotes example texts per cluster; with --redact pii they are masked
    (mutation: DriftEngine._shown not applied to the reference or the current texts)."""
    from driftline.streams.stages.drift_references import (
        DriftEngine,
        KeyField,
        Reference,
        SampleRow,
    )
    from driftline.streams.stages.semantic_drift import DriftConfig

    rng = np.random.default_rng(0)

    def vecs(n: int, c: int) -> np.ndarray:
        v = rng.normal(size=(n, 8)) * 0.05
        v[:, c] += 1
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    eng = DriftEngine(DriftConfig(methods=("topic_mix",), ref_size=10, window_size=10), lambda sql, params: [], "d", "m")
    eng.redaction = Redaction("pii")
    kf = KeyField(("a", "m", ""), "prompt")
    kf.ref = Reference(1, "first_n", 0, 20, [f"r{i}" for i in range(20)], np.concatenate([vecs(10, 0), vecs(10, 1)]),
                  [f"ref {i} {EMAIL}" for i in range(20)], 0, 1)
    cur = np.concatenate([vecs(5, 0), vecs(15, 2)])
    kf.cur = deque(SampleRow(20 + i, f"c{i}", 1000 + i, cur[i], f"cur {i} card {CARD}") for i in range(20))
    (r,) = eng._test(kf, 0.0)
    ex = [t for c in r.explanation["clusters"] for t in (*c["examples"], *c["cur_examples"])]
    assert len(ex) == 12
    assert all(t.endswith((" <EMAIL>", " <CARD>")) for t in ex), ex
    assert EMAIL not in json.dumps(r.explanation) and CARD not in json.dumps(r.explanation)


# -- retention -------------------------------------------------------------------------------------

def _create(sink: Any, table: str) -> str:
    return str(sink.query_rows("SELECT create_table_query FROM system.tables WHERE database = 'driftline' "
                               "AND name = %(t)s", {"t": table})[0][0])


def test_retention_ttls_set_changed_removed_and_applied(tmp_path: Any) -> None:
    """TTLs in the DDL for given settings, none for 0, changed by a second ensure_schema;
    OPTIMIZE … FINAL blanks expired texts and drops expired rows (exact counts).
    Mutations: ensure_schema not altering an existing store; a column TTL on the wrong
    column; the write log given a TTL."""
    from driftline.streams.sinks.clickhouse import ClickHouseSink, Retention, ttl_days

    sink = ClickHouseSink(f"chdb://{tmp_path / 'chdb'}")
    sink.ensure_schema()
    for t in ("llm_events", "dlq_outbox", "drift_scores", "ingest_log"):
        assert " TTL " not in _create(sink, t)
    sink.retention = Retention(days=400, text_days=30)
    sink.ensure_schema()
    ev = _create(sink, "llm_events")
    assert "`prompt` Nullable(String) TTL toDateTime(timestamp) + toIntervalDay(30)" in ev
    assert "`response` Nullable(String) TTL toDateTime(timestamp) + toIntervalDay(30)" in ev
    # extra holds an OTLP span's system instructions, tool arguments ... (mutation: no TTL on it)
    assert "`extra` String TTL toDateTime(timestamp) + toIntervalDay(30)" in ev
    assert "ORDER BY (app, model, timestamp, event_id) TTL toDateTime(timestamp) + toIntervalDay(400)" in ev
    assert ttl_days(_create(sink, "dlq_outbox"), "value") == 30 and ttl_days(_create(sink, "dlq_outbox"), None) == 400
    assert "`explanation` String TTL toDateTime(ts) + toIntervalDay(30)" in _create(sink, "drift_scores")
    assert ttl_days(_create(sink, "drift_scores"), None) == 0
    for t in ("ingest_log", "llm_window_metrics", "alerts", "llm_embeddings", "drift_references"):
        assert " TTL " not in _create(sink, t), t
    # rows: 2 older than 400 days, 1 older than 30 (texts blanked), 1 fresh
    sink.call(lambda c: c.command(
        "INSERT INTO driftline.llm_events (event_id, timestamp, app, prompt, response, extra) VALUES "
        "('old1', now64(3) - INTERVAL 500 DAY, 'a', 'p', 'r', '{}'), "
        "('old2', now64(3) - INTERVAL 401 DAY, 'a', 'p', 'r', '{}'), "
        "('mid', now64(3) - INTERVAL 40 DAY, 'a', 'p', 'r', '{\"s\":\"x\"}'), "
        "('new', now64(3) - INTERVAL 1 DAY, 'a', 'p', 'r', '{\"s\":\"x\"}')"))
    sink.call(lambda c: c.command("OPTIMIZE TABLE driftline.llm_events FINAL"))
    rows = sink.query_rows("SELECT event_id, prompt, response, extra FROM driftline.llm_events ORDER BY event_id")
    assert rows == [("mid", None, None, ""), ("new", "p", "r", '{"s":"x"}')]
    # changed on the next start; 0 removes
    sink.retention = Retention(days=0, text_days=7)
    sink.ensure_schema()
    ev = _create(sink, "llm_events")
    assert ttl_days(ev, "prompt") == 7 and ttl_days(ev, None) == 0 and "toIntervalDay(400)" not in ev
    sink.retention = Retention()
    sink.ensure_schema()
    assert " TTL " not in _create(sink, "llm_events") and " TTL " not in _create(sink, "dlq_outbox")
    sink.close()
    with pytest.raises(ValueError, match="retention days must be a whole number of days >= 0"):
        Retention(days=-1)


@pytest.mark.parametrize("mode", ["pii", "hash"])
def test_extra_column_is_redacted_too(mode: Any) -> None:
    """``llm_events.extra`` keeps an event's unknown keys and an OTLP span's other
    attributes: system instructions, tool arguments, OpenInference's ``input.value``.
    They used to be stored in clear under --redact pii/hash (only prompt/response were
    redacted). Exact stored ``extra`` per mode, for a JSON event (columnar and exact
    decode) and an OTLP span. Mutations: redact_events without the extra column; hash
    mode applied only to strings (a nested list kept in clear)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

    from driftline.streams.worker import Worker, WorkerConfig

    red = Redaction(mode)
    w = Worker(WorkerConfig(kafka="127.0.0.1:1", clickhouse="chdb:///nonexistent", redaction=red,
                            max_event_age_s=1e10))

    def h(v: str) -> str:
        return "sha256:" + hashlib.sha256(v.encode()).hexdigest()

    for fast in (True, False):
        n = 70 if fast else 2
        recs = [MemoryRecord("llm.events", 0, i, None,
                             _event(i, system_prompt=f"Reply to {EMAIL}", n_turns=3,
                                    messages=[{"role": "user", "content": f"card {CARD}"}]))
                for i in range(n)]
        w.scanner = None if fast else object()
        decoded = w._decode(recs)
        w.scanner = None
        stored = redact_events(w.process(recs, {}, decoded).arrow, red)
        extras = [json.loads(x) for x in stored.column("extra").to_pylist()]
        if mode == "pii":
            want = {"system_prompt": "Reply to <EMAIL>", "n_turns": 3,
                    "messages": [{"role": "user", "content": "card <CARD>"}]}
        else:
            msgs = [{"role": "user", "content": f"card {CARD}"}]
            want = {"system_prompt": h(f"Reply to {EMAIL}"), "n_turns": 3,
                    "messages": h(json.dumps(msgs, sort_keys=True, ensure_ascii=False))}
        assert extras == [want] * n, (fast, extras[0])

    attrs = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
             "gen_ai.system_instructions": f"The user is {EMAIL}", "input.value": f"pay with {CARD}"}
    span = Span(trace_id=b"\1" * 16, span_id=b"\1" * 8, name="chat", start_time_unix_nano=1_735_689_600 * 10**9,
                end_time_unix_nano=1_735_689_601 * 10**9,
                attributes=[KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in attrs.items()])
    req = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[span])])])
    recs = [MemoryRecord("otlp_spans", 0, 0, None, req.SerializeToString())]
    stored = redact_events(w.process(recs, {}, w._decode(recs)).arrow, red)
    (extra,) = [json.loads(x) for x in stored.column("extra").to_pylist()]
    text = json.dumps(extra)
    assert EMAIL not in text and CARD not in text, extra
    if mode == "pii":
        assert extra["gen_ai.system_instructions"] == "The user is <EMAIL>"
        assert extra["input.value"] == "pay with <CARD>"
    else:
        assert extra["gen_ai.system_instructions"] == h(f"The user is {EMAIL}")
        assert extra["input.value"] == h(f"pay with {CARD}")
    w._decode_pool.shutdown()


def test_dlq_copy_of_json_with_escapes_is_masked() -> None:
    """A JSON payload that is not one event (an OTLP/JSON request, an array of events) is
    masked as raw text; a JSON escape (``\\u0040`` for ``@``, ``\\u0020`` in a card number)
    hid the finding from that scan, and the copy kept the e-mail and card in clear.
    Mutation: the parsed-JSON branch of redact_rejected removed (raw masking only)."""
    raw = (b'{"resourceSpans":[{"attributes":[{"key":"gen_ai.prompt","value":{"stringValue":'
           b'"mail jo.doe\\u0040example.com, card 4111\\u00201111 1111 1111"}}]}]}')
    got = redact_rejected(Rejected("otlp_spans", 0, 3, None, raw, "bad span"), Redaction("pii"))
    assert json.loads(got.value) == {"resourceSpans": [{"attributes": [
        {"key": "gen_ai.prompt", "value": {"stringValue": "mail <EMAIL>, card <CARD>"}}]}]}
    arr = b'[{"prompt": "hi jo.doe\\u0040example.com"}]'
    got = redact_rejected(Rejected("llm.events", 0, 4, None, arr, "not an object"), Redaction("pii"))
    assert json.loads(got.value) == [{"prompt": "hi <EMAIL>"}]


def test_embedded_store_is_created_owner_only(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A new chDB store directory is 0700 (its files hold every prompt, whatever the SQL
    endpoint allows); an existing one open to others is left alone with one warning.
    Mutation caught: opening the store without private_store() leaves it 0755 (umask 022)."""
    import os
    import stat

    from driftline.streams.sinks.clickhouse import ClickHouseSink

    old = os.umask(0o022)
    try:
        new = tmp_path / "new" / "chdb"
        sink = ClickHouseSink(f"chdb://{new}")
        assert sink.call(lambda c: c.command("SELECT 1")) == 1
        sink.close()
        assert stat.S_IMODE(new.stat().st_mode) == 0o700
        shared = tmp_path / "shared"
        shared.mkdir(mode=0o755)
        shared.chmod(0o755)
        with caplog.at_level(logging.WARNING, logger="driftline.sink"):
            for _ in range(2):
                sink = ClickHouseSink(f"chdb://{shared}")
                sink.call(lambda c: c.command("SELECT 1"))
                sink.close()
        assert stat.S_IMODE(shared.stat().st_mode) == 0o755
        warned = [r.getMessage() for r in caplog.records if "open to other local users" in r.getMessage()]
        assert len(warned) == 1 and "mode 755" in warned[0]
    finally:
        os.umask(old)
