"""Poison records through a running worker (real Tansu broker, real chDB, the worker in
process, its default event-time bounds): each poison class among valid events is
dead-lettered exactly once with its exact reason, every valid event is stored exactly
once, and the worker keeps running and storing what comes after.

Mutations caught (each checked by hand): removing the depth limit (the worker task dies
with RecursionError: ``task.done()``; nothing stored), removing the ``le=MAX_TOKENS``
bound (OverflowError in to_columns kills the worker on 2^64; 2^63-1 is stored and the
stored count is 501), not passing ``now_ms`` to decode_batch (years 9999 and 1970 are
stored), removing the label length limit (the 100,000-character app is stored).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from helpers_worker import read_topic, start_worker, wait_for

from driftline.schemas.event import NESTED_TOO_DEEP
from driftline.streams.ingest.bulk_producer import emit_lines, produce_records
from driftline.streams.worker import WorkerConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _events(n: int, start: int, now_ms: int) -> list[bytes]:
    return [json.dumps({"event_id": f"v{start + i}", "app": "chat", "request_model": "gpt-4o",
                        "timestamp": now_ms - 600_000 + i, "latency_ms": 12.5, "input_tokens": 7,
                        "output_tokens": 3}).encode() for i in range(n)]


def _poison(now_ms: int) -> list[tuple[bytes | None, str]]:
    ev = {"event_id": "p", "app": "chat", "request_model": "gpt-4o", "timestamp": now_ms - 1000,
          "latency_ms": 1.0}

    def j(**kw: Any) -> bytes:
        return json.dumps({**ev, **kw}).encode()

    return [
        (b'{"event_id":"d","app":"chat","request_model":"m","timestamp":1,"latency_ms":1,"x":'
         + b"[" * 5000 + b"]" * 5000 + b"}", NESTED_TOO_DEEP),
        (j(input_tokens=2**64), "input_tokens: Expected `int` <= 1000000000000 - at `$.input_tokens`"),
        (j(output_tokens=2**63 - 5), "output_tokens: Expected `int` <= 1000000000000 - at `$.output_tokens`"),
        (j(timestamp=253402214400000),
         "timestamp: 9999-12-31T00:00:00.000Z is more than 300 s in the future (max_clock_skew_s)"),
        (j(timestamp=0),
         "timestamp: 1970-01-01T00:00:00.000Z is more than 2592000 s in the past (max_event_age_s)"),
        (j(app="a" * 100_000), "app: Expected `str` of length <= 256 - at `$.app`"),
        (j(prompt="x").replace(b'"x"', b'"\xff\xfe"'),
         "not valid UTF-8: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
        (b"GET / HTTP/1.1", "not valid JSON: JSON is malformed: invalid character (byte 0)"),
        (None, "empty record (tombstone)"),
    ]






async def test_each_poison_class_dead_lettered_once_valid_events_stored(
        kafka_bootstrap: str, make_topics: Any, chdb_dsn: str) -> None:
    topic = f"p-{uuid.uuid4().hex[:10]}"
    make_topics({topic: 1, f"{topic}.dlq": 1})
    now_ms = int(time.time() * 1000)
    valid = _events(500, 0, now_ms)
    poison = _poison(now_ms)
    # poison spread among the valid events: one after every 50
    records: list[tuple[bytes | None, bytes | None]] = []
    for i, v in enumerate(valid):
        records.append((None, v))
        if i % 50 == 49 and i // 50 < len(poison):
            records.append((None, poison[i // 50][0]))
    await produce_records(kafka_bootstrap, topic, records)  # type: ignore[arg-type]
    cfg = WorkerConfig(kafka=kafka_bootstrap, clickhouse=chdb_dsn, group_id=f"g-{uuid.uuid4().hex[:8]}",
                       topics=(topic,), dlq_topic=f"{topic}.dlq", emit_interval_s=0.5, idle_close_s=1.0)
    stop, task, worker = await start_worker(cfg)
    try:
        await wait_for(lambda: (worker.stored_events >= 500 and worker.dead_lettered >= len(poison))
                       or task.done(), 60,
                       lambda: f"stored {worker.stored_events}/500, dlq {worker.dead_lettered}/{len(poison)}")
        assert not task.done(), "the worker died"
        assert worker.stored_events == 500 and worker.dead_lettered == len(poison)
        db = worker.sink.database
        rows = await asyncio.to_thread(worker.sink.query_rows,
                                       f"SELECT count(), uniqExact(event_id), sum(input_tokens) "
                                       f"FROM {db}.llm_events", None)
        assert tuple(rows[0]) == (500, 500, 3500)

        dlq = await read_topic(kafka_bootstrap, cfg.dlq_topic, len(poison))
        assert len(dlq) == len(poison), "each poison record dead-lettered exactly once"
        got = sorted((m.value or b"", dict(m.headers)["driftline-reason"].decode()) for m in dlq)
        want = sorted((p or b"", reason) for p, reason in poison)
        assert got == want

        # still running: what comes after the poison is stored too
        await produce_records(kafka_bootstrap, topic, [(None, v) for v in _events(100, 1000, now_ms)])
        await wait_for(lambda: worker.stored_events >= 600 or task.done(), 30,
                       lambda: f"stored {worker.stored_events}/600")
        assert not task.done() and worker.stored_events == 600
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def test_emit_reports_bad_lines_and_sends_the_rest(kafka_bootstrap: str, make_topics: Any,
                                                         tmp_path: Path) -> None:
    """``driftline emit`` on a file with a 5,000-deep line and a non-JSON line: it used to
    die on the deep line (RecursionError in key_of) and send nothing; now every line is
    sent (the worker dead-letters the bad ones), the bad ones are reported with their
    line numbers, and with skip_invalid they are not sent. Catches removing the
    RecursionError catch in check_line (the call raises)."""
    topic = f"e-{uuid.uuid4().hex[:10]}"
    make_topics({topic: 1})
    now_ms = int(time.time() * 1000)
    lines = _events(10, 0, now_ms)
    lines.insert(3, b'{"app":' + b"[" * 5000 + b"]" * 5000 + b"}")
    lines.insert(7, b"not json")
    f = tmp_path / "events.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    reported: list[tuple[int, str]] = []
    stats = await emit_lines(kafka_bootstrap, topic, f, None, report=lambda n, w: reported.append((n, w)))
    assert stats["sent"] == 12 and stats["invalid"] == 2 and stats["skipped"] == 0
    assert reported == [(4, NESTED_TOO_DEEP), (8, "not valid JSON: JSON is malformed: invalid character (byte 4)")]
    stats = await emit_lines(kafka_bootstrap, topic, f, None, skip_invalid=True)
    assert stats["sent"] == 10 and stats["skipped"] == 2
    assert len(await read_topic(kafka_bootstrap, topic, 22)) == 22


def _fuzz_module() -> Any:
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(
        "fuzz_decode", Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz_decode.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_decode"] = mod
    spec.loader.exec_module(mod)
    return mod


async def test_fuzzed_records_through_the_worker(kafka_bootstrap: str, make_topics: Any, chdb_dsn: str) -> None:
    """2,000 generated and mutated records (JSON events and OTLP requests, from
    benchmarks/fuzz_decode.py) through a running worker: it keeps running, stores exactly
    the events decode_batch finds valid, and dead-letters every other record once with
    a reason. Catches any per-record exception that escapes into the worker (the task
    dies; checked: without the token bound the worker dies on a count >= 2^63) and any
    record that ends in no place or two (the counts differ)."""
    import random

    from aiokafka import AIOKafkaProducer

    from driftline.streams.ingest.transforms import decode_batch

    fz = _fuzz_module()
    topic = f"f-{uuid.uuid4().hex[:10]}"
    otlp_topic = f"otlp_spans.{topic}"
    make_topics({topic: 1, otlp_topic: 1, f"{topic}.dlq": 1})
    recs = fz.make_batch(random.Random(11), 2000)
    wide = {"max_event_age_s": 1e10, "max_clock_skew_s": 1e10}  # the generator's fixed clock
    expected = decode_batch(recs, fast=False, now_ms=int(time.time() * 1000), **wide)
    assert 200 < expected.n_events < 1800 and len(expected.rejected) > 200
    p = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=16 << 20, linger_ms=20)
    await p.start()
    try:
        futs = [await p.send(otlp_topic if r.topic == fz.OTLP else topic, r.value, partition=0,
                             key=b"tombstone" if r.value is None else None,  # aiokafka needs one
                             headers=list(r.headers)) for r in recs]
        await asyncio.gather(*futs)
    finally:
        await p.stop()
    cfg = WorkerConfig(kafka=kafka_bootstrap, clickhouse=chdb_dsn, group_id=f"g-{uuid.uuid4().hex[:8]}",
                       topics=(topic, otlp_topic), dlq_topic=f"{topic}.dlq", emit_interval_s=0.5,
                       idle_close_s=1.0, **wide)
    stop, task, worker = await start_worker(cfg)
    try:
        n_ev, n_rej = expected.n_events, len(expected.rejected)
        await wait_for(lambda: (worker.stored_events >= n_ev and worker.dead_lettered >= n_rej)
                       or task.done(), 60,
                       lambda: f"stored {worker.stored_events}/{n_ev}, dlq {worker.dead_lettered}/{n_rej}")
        assert not task.done(), "the worker died"
        assert (worker.stored_events, worker.dead_lettered) == (n_ev, n_rej)
        rows = await asyncio.to_thread(worker.sink.query_rows,
                                       f"SELECT count() FROM {worker.sink.database}.llm_events", None)
        assert rows[0][0] == n_ev
        dlq = await read_topic(kafka_bootstrap, cfg.dlq_topic, n_rej)
        assert len(dlq) == n_rej and all(dict(m.headers).get("driftline-reason") for m in dlq)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
