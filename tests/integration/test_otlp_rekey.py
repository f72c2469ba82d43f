"""The OTLP re-keyer (streams/ingest/rekey.py) against the real broker and chDB.

(1) Unkeyed OTLP requests on 3 partitions, spans of 6 app/model keys: every span is
re-produced once to the events topic under its key's partition (the partitioner's
choice for ``app/model``), stored once by the worker with the events topic as its
source; bad requests are in the DLQ once with their reason and source headers; the
rekey log says where each OTLP partition resumes.
(2) A previous owner that died after sending part of a batch and before logging it:
the new owner sends only the rest (each span once in the events topic, counted in
``already_held``), and the worker stores each once; also when the new owner fetches
that batch in smaller pieces than the dead owner did (another assignment, another
``max_batch``): every piece up to the last source the previous owner sent is checked.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from helpers_otlp import genai_request
from helpers_worker import read_topic

from driftline.schemas.columns import REKEY_LOG_COLUMNS
from driftline.schemas.event import encode_event
from driftline.streams.ingest.rekey import event_key, source_headers
from driftline.streams.ingest.transforms import MemoryRecord, decode_batch
from driftline.streams.sinks.clickhouse import ClickHouseSink
from driftline.streams.sinks.dlq import _source_id
from driftline.streams.stages.windows import WindowConfig
from driftline.streams.worker import Worker, WorkerConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

APPS = ("support", "search", "agent")
MODELS = ("gpt-4o-mini", "claude-3-5-haiku-20241022")


def request(n: int, seq: int, now_ms: int) -> bytes:
    """An OTLP request of ``n`` GenAI spans over the 6 keys (service = app), trace ``seq``."""
    return genai_request([(APPS[(seq + i) % 3], MODELS[(seq + i) % 2], now_ms - 5_000 + i, 120, 10 + i, 3)
                          for i in range(n)], seq)


async def produce(bootstrap: str, topic: str, values: list[tuple[int, bytes]]) -> None:
    """(partition, value) records, unkeyed, in order."""
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=16 << 20)
    await p.start()
    try:
        for part, v in values:
            await p.send_and_wait(topic, v, partition=part)
    finally:
        await p.stop()


async def run_until(cfg: WorkerConfig, done: Any, timeout: float = 90, max_rekey_batch: int = 0) -> Worker:
    """Run a Worker until ``done(worker)``; then stop it (and release chDB). ``max_rekey_batch``:
    OTLP requests per re-keyer fetch (0: the default)."""
    w = Worker(cfg)
    if max_rekey_batch and w.rekeyer is not None:
        import dataclasses

        w.rekeyer.cfg = dataclasses.replace(w.rekeyer.cfg, max_batch=max_rekey_batch)
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    try:
        deadline = time.monotonic() + timeout
        while not done(w):
            assert not task.done(), task.exception() if task.done() else ""
            assert time.monotonic() < deadline, f"stored {w.stored_events}, dead {w.dead_lettered}, " \
                                                f"rekeyed {w.rekeyer.rekeyed if w.rekeyer else None}"
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # anything beyond the expected would land now
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await asyncio.to_thread(w.sink.close)  # chDB holds one path per process
    return w


def config(bootstrap: str, dsn: str, events: str, otlp: str, dlq: str) -> WorkerConfig:
    return WorkerConfig(kafka=bootstrap, clickhouse=dsn, group_id=f"g-{uuid.uuid4().hex[:8]}",
                        topics=(events, otlp), dlq_topic=dlq, otlp_rekey=True, max_event_age_s=1e9,
                        window=WindowConfig(size_ms=60_000), emit_interval_s=0.5, session_timeout_ms=6_000)


def query(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    c = clickhouse_connect.get_client(dsn=dsn)
    try:
        return list(c.query(sql).result_rows)
    finally:
        c.close()


async def test_rekeyed_once_under_each_keys_partition(kafka_bootstrap: str, make_topics: Any,
                                                      chdb_dsn: str) -> None:
    tid = uuid.uuid4().hex[:8]
    events, otlp, dlq = f"ev-{tid}", f"otlp_spans.{tid}", f"dlq-{tid}"
    make_topics({events: 4, otlp: 3, dlq: 1})
    now = int(time.time() * 1000)
    good = [(seq % 3, request(5, seq, now)) for seq in range(12)]  # 60 spans, 4 requests a partition
    bad = [(1, b"\x0a\xff\xff garbage"), (2, b'{"hello": "world"}')]
    await produce(kafka_bootstrap, otlp, good[:6] + bad + good[6:])
    cfg = config(kafka_bootstrap, chdb_dsn, events, otlp, dlq)
    assert cfg.host_topics == (events,) and cfg.rekey_sources == (otlp,) and cfg.rekey_target == events
    w = await run_until(cfg, lambda w: w.stored_events >= 60 and w.dead_lettered >= 2)
    assert (w.stored_events, w.dead_lettered) == (60, 2)
    assert w.rekeyer is not None and (w.rekeyer.rekeyed, w.rekeyer.already_held) == (60, 0)

    # the events topic: each span once, under its key's partition, with its source in headers
    recs = await read_topic(kafka_bootstrap, events, 60)
    assert len(recs) == 60
    srcs = Counter(_source_id(r.headers) for r in recs)
    assert len(srcs) == 60 and max(srcs.values()) == 1 and None not in srcs
    part = DefaultPartitioner()
    for r in recs:
        assert r.partition == part(r.key, [0, 1, 2, 3], [0, 1, 2, 3]), r.key
    # the stored rows: once each, from the events topic, every key on one partition
    assert query(chdb_dsn, "SELECT count(), uniqExact(event_id), uniqExact(source_topic), any(source_topic) "
                           "FROM driftline.llm_events") == [(60, 60, 1, events)]
    split = query(chdb_dsn, "SELECT app, model FROM driftline.llm_events GROUP BY app, model "
                            "HAVING uniqExact(source_partition) > 1")
    assert split == []
    assert query(chdb_dsn, "SELECT uniqExact(app, model), sum(input_tokens) FROM driftline.llm_events") == [
        (6, sum(10 + i for i in range(5)) * 12)]
    # the DLQ: the two bad requests, once, with their source and reason
    dead = await read_topic(kafka_bootstrap, dlq, 2)
    got = sorted((_source_id(r.headers), dict(r.headers)["driftline-reason"].decode()[:5]) for r in dead)
    assert got == [((otlp, 1, 2, 0), "otlp:"), ((otlp, 2, 2, 0), "otlp:")]
    # the rekey log: each partition resumes past its last record (4, 5 and 5 records)
    assert marks(chdb_dsn, otlp, [0, 1, 2]) == {0: 4, 1: 5, 2: 5}


def marks(dsn: str, topic: str, parts: list[int]) -> dict[int, int]:
    """Where the rekey log resumes each partition."""
    sink = ClickHouseSink(dsn)
    try:
        return {p: m[0] for p, m in sink.rekey_marks(topic, parts).items()}
    finally:
        sink.close()


async def test_new_owner_skips_what_a_dead_owner_sent(kafka_bootstrap: str, make_topics: Any,
                                                      chdb_dsn: str, tmp_path: Path) -> None:
    tid = uuid.uuid4().hex[:8]
    events, otlp, dlq = f"ev-{tid}", f"otlp_spans.{tid}", f"dlq-{tid}"
    make_topics({events: 2, otlp: 1, dlq: 1})
    now = int(time.time() * 1000)
    values = [request(4, seq, now) for seq in range(5)]  # 20 spans at offsets 0-4
    await produce(kafka_bootstrap, otlp, [(0, v) for v in values])
    # The dead owner: it logged offset 0 with the topics' ends at the time (empty), then
    # sent the spans of requests 0-2 and two of request 3 (one batch of 4 requests) and
    # died before its next log row. The new owner fetches 2 requests at a time.
    sink = ClickHouseSink(chdb_dsn)
    sink.ensure_schema()
    import datetime as dt

    sink.call(lambda c: c.insert("driftline.rekey_log", [[otlp, 0, 0, '{"0": 0, "1": 0}', "", dt.datetime.now(dt.UTC)]],
                                 column_names=list(REKEY_LOG_COLUMNS)))
    sink.close()
    decoded = decode_batch([MemoryRecord(otlp, 0, o, None, v) for o, v in enumerate(values[:4])], fast=False)
    pre = []
    idx: dict[int, int] = {}
    for ev, off in zip(decoded.events, decoded.offsets, strict=True):
        i = idx[off] = idx.get(off, -1) + 1
        pre.append((event_key(ev.app, ev.model), encode_event(ev), source_headers(otlp, 0, off, i)))
    pre = pre[:14]
    p = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await p.start()
    try:
        for key, value, headers in pre:
            await p.send_and_wait(events, value, key=key, headers=headers)
    finally:
        await p.stop()

    cfg = config(kafka_bootstrap, chdb_dsn, events, otlp, dlq)
    w = await run_until(cfg, lambda w: w.stored_events >= 20, max_rekey_batch=2)
    assert w.rekeyer is not None
    assert (w.stored_events, w.rekeyer.rekeyed, w.rekeyer.already_held) == (20, 6, 14)
    recs = await read_topic(kafka_bootstrap, events, 20)
    srcs = Counter(_source_id(r.headers) for r in recs)
    assert len(recs) == 20 and len(srcs) == 20, "a span sent twice"
    assert query(chdb_dsn, "SELECT count(), uniqExact(event_id) FROM driftline.llm_events") == [(20, 20)]
    assert marks(chdb_dsn, otlp, [0]) == {0: 5}


async def test_sigkill_while_rekeying_sends_each_span_once(kafka_bootstrap: str, make_topics: Any,
                                                           tmp_path: Path) -> None:
    """A real ``driftline worker`` SIGKILLed as soon as its re-keyer's first sends land
    (mid-batch), then a second one on the same store: each of the 6,000 spans is once in
    the events topic and once in ``llm_events``."""
    import os
    import signal
    import subprocess
    import sys

    from driftline.streams.local.broker import free_port

    tid = uuid.uuid4().hex[:8]
    events, otlp, dlq = f"ev-{tid}", f"otlp_spans.{tid}", f"dlq-{tid}"
    make_topics({events: 2, otlp: 2, dlq: 1, "driftline.control": 1})
    now = int(time.time() * 1000)
    await produce(kafka_bootstrap, otlp, [(seq % 2, request(50, seq, now)) for seq in range(120)])
    cli = Path(__file__).resolve().parents[1] / "session_cli.py"
    args = ["worker", "--kafka", kafka_bootstrap, "--clickhouse", f"chdb://{tmp_path / 'store'}", "--topic", events,
            "--topic", otlp, "--group", f"g-{tid}", "--no-drift", "--no-alerts",
            "--log-level", "info"]

    def start(name: str, more: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        logf = tmp_path / f"{name}.log"
        proc = subprocess.Popen([sys.executable, str(cli), "3000", *args, *more, "--metrics-port", str(free_port())],
                                stdout=logf.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        return proc, logf

    reader = AIOKafkaConsumer(events, bootstrap_servers=kafka_bootstrap, group_id=None,
                              auto_offset_reset="earliest", enable_auto_commit=False)
    await reader.start()
    a, a_log = start("a", ["--sql-port", "0"])
    try:
        deadline = time.monotonic() + 60
        landed = 0
        while landed == 0:  # the first re-keyed sends are in the events topic: kill now
            assert a.poll() is None and time.monotonic() < deadline, a_log.read_text()[-2000:]
            landed = sum(len(r) for r in (await reader.getmany(timeout_ms=20)).values())
        os.killpg(a.pid, signal.SIGKILL)
        a.wait(10)
    finally:
        await reader.stop()
    port = free_port()
    b, b_log = start("b", ["--sql-port", str(port)])
    try:
        deadline = time.monotonic() + 90
        while stored_via(tmp_path / "store", port) < 6_000:
            assert b.poll() is None and time.monotonic() < deadline, b_log.read_text()[-3000:]
            await asyncio.sleep(0.5)
    finally:
        os.killpg(b.pid, signal.SIGTERM)
        b.wait(60)
    recs = await read_topic(kafka_bootstrap, events, 6_000)
    srcs = Counter(_source_id(r.headers) for r in recs)
    assert (len(recs), len(srcs)) == (6_000, 6_000), "a span sent twice or lost"
    dsn = f"chdb://{tmp_path / 'store'}"
    assert query(dsn, "SELECT count(), uniqExact(event_id) FROM driftline.llm_events") == [(6_000, 6_000)]
    assert marks(dsn, otlp, [0, 1]) == {0: 60, 1: 60}
    held = [ln for ln in b_log.read_text().splitlines() if "already sent by the previous owner" in ln]
    print(f"killed after {landed} sends landed; the new owner skipped: {held}")


def stored_via(store: Path, port: int) -> int:
    """``count()`` of llm_events through a running worker's SQL endpoint (0 while it starts)."""
    from driftline.streams.auth import client_credentials

    creds = client_credentials(store)
    if creds is None:
        return 0
    try:
        c = clickhouse_connect.get_client(host="127.0.0.1", port=port, username=creds[0], password=creds[1])
    except Exception:  # noqa: BLE001 - not serving yet
        return 0
    try:
        return int(c.query("SELECT count() FROM driftline.llm_events").result_rows[0][0])
    except Exception:  # noqa: BLE001 - the schema not created yet
        return 0
    finally:
        c.close()


async def test_logged_starts_follow_the_topics_ends(kafka_bootstrap: str, make_topics: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Records other producers write to the events topic (a partition no OTLP key hashes
    to) and to the DLQ after the re-keyer started: the starts its log rows record move up
    to them, so a new owner's recovery does not read them all again (every rebalance)."""
    import json

    from aiokafka import TopicPartition
    from prometheus_client import CollectorRegistry

    from driftline.streams.ingest import rekey
    from driftline.streams.sinks.prometheus import WorkerMetrics

    tid = uuid.uuid4().hex[:8]
    events, otlp, dlq = f"ev-{tid}", f"otlp_spans.{tid}", f"dlq-{tid}"
    make_topics({events: 2, otlp: 1, dlq: 1})
    monkeypatch.setattr(rekey, "ENDS_REFRESH_S", 0.0)
    cfg = rekey.RekeyConfig(kafka=kafka_bootstrap, sources=(otlp,), target=events, dlq_topic=dlq,
                            group_id=f"g-{tid}.otlp-rekey", session_timeout_ms=6_000)
    async def nothing_logged(what: str, fn: Any, *args: Any) -> dict[int, Any]:
        return {}  # no rekey_log / ingest_log rows: the partition starts at the group's position

    rk = rekey.Rekeyer(cfg, None, WorkerMetrics(CollectorRegistry()), nothing_logged)  # type: ignore[arg-type]
    await rk.start()
    try:
        tp = TopicPartition(otlp, 0)
        assert (json.loads(rk._log_row(tp, 0)["events_start"]), rk._log_row(tp, 0)["dlq_start"]) == (
            {"0": 0, "1": 0}, '{"0": 0}')
        await produce(kafka_bootstrap, events, [(1, b'{"json": "from elsewhere"}')] * 3)
        await produce(kafka_bootstrap, dlq, [(0, b"dead")] * 2)
        stop = asyncio.Event()
        task = asyncio.create_task(rk.run(stop))
        deadline = time.monotonic() + 30
        while rk._hw.get(1) != 3 or rk.dlq.ends() != '{"0": 2}':
            assert not task.done() and time.monotonic() < deadline, (rk._hw, rk.dlq.ends())
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait_for(task, 30)
        assert (json.loads(rk._log_row(tp, 0)["events_start"]), rk._log_row(tp, 0)["dlq_start"]) == (
            {"0": 0, "1": 3}, '{"0": 2}')
    finally:
        await rk.stop()
