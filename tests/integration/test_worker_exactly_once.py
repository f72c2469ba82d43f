"""Exactly once across the worker's worst moments: each fault is injected at the one
point where it would lose or duplicate data, on the real broker and real chDB.

- the topic behind the stored offsets is not the same topic any more (restarted
  in-memory broker, recreated topic): it is read from its beginning, not skipped into;
- a worker killed between the events insert and the window insert: the restarted
  worker stores no event twice and its window rows equal an exact recomputation;
- killed between the write step and the DLQ send, and between the send and the
  offset commit: every rejected record is in the DLQ exactly once;
- ClickHouse refusing one row for its data: the rest is stored, that record goes to
  the DLQ with ClickHouse's message;
- ClickHouse failing while partitions are assigned: they still become ready.
"""

from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest
from aiokafka import AIOKafkaConsumer
from helpers_worker import SESSION_MS, wait_for

from driftline.streams.devdata.replay import ReplayConfig, ReplayData, generate
from driftline.streams.ingest.bulk_producer import produce_records
from driftline.streams.local.broker import LocalBroker
from driftline.streams.sinks.clickhouse import ClickHouseSink
from driftline.streams.stages.windows import WindowConfig
from driftline.streams.worker import Worker, WorkerConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

# A worker in a subprocess with one function replaced by a crash (os._exit) at the
# moment under test. argv: kafka dsn topic group; PATCH is pasted in before it runs.
CRASHING_WORKER = """
import os, sys
from driftline.streams.app import run_worker
from driftline.streams.worker import WorkerConfig
from driftline.streams.stages.windows import WindowConfig
{patch}
kafka, dsn, topic, group = sys.argv[1:5]
run_worker(WorkerConfig(max_event_age_s=1e10, kafka=kafka, clickhouse=dsn, group_id=group, topics=(topic,),
                        dlq_topic=topic + ".dlq", max_batch=500, max_insert_rows=500, min_insert_rows=1,
                        emit_interval_s=0.2, window=WindowConfig(size_ms=10_000, allowed_lateness_ms=5_000),
                        consumer=os.environ.get("DRIFTLINE_CONSUMER", "aiokafka"),
                        session_timeout_ms={session_ms}),  # the next worker waits for it to expire
           web_port=0, sql_port=None)
"""


def _records(n: int, seed: int, malformed: float = 0.0, start_ms: int = 1_735_689_600_000) -> list[Any]:
    return list(generate(ReplayConfig(n_events=n, seed=seed, malformed_rate=malformed, late_rate=0.0,
                                      events_per_second=20.0, start_ms=start_ms), ReplayData.synthetic(seed)))


def _query(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    c = clickhouse_connect.get_client(dsn=dsn)
    try:
        return list(c.query(sql).result_rows)
    finally:
        c.close()


async def _crash(tmp_path: Path, patch: str, kafka: str, dsn: str, topic: str, group: str) -> None:
    script = tmp_path / f"crash_{uuid.uuid4().hex[:6]}.py"
    script.write_text(CRASHING_WORKER.format(patch=textwrap.dedent(patch), session_ms=SESSION_MS))
    proc = await asyncio.to_thread(subprocess.run, [sys.executable, str(script), kafka, dsn, topic, group],
                                   capture_output=True, timeout=180)
    assert proc.returncode == 17, proc.stderr.decode()[-3000:]


def _cfg(kafka: str, dsn: str, topic: str, group: str) -> WorkerConfig:
    # the records replay fixed 2025 timestamps: accept them whatever today is
    return WorkerConfig(max_event_age_s=1e10, kafka=kafka, clickhouse=dsn, group_id=group, topics=(topic,), dlq_topic=f"{topic}.dlq",
                        max_batch=500, emit_interval_s=0.2, idle_close_s=1.0, session_timeout_ms=SESSION_MS,
                        window=WindowConfig(size_ms=10_000, allowed_lateness_ms=5_000))


async def _run_until(cfg: WorkerConfig, cond: Any, what: str, sink: ClickHouseSink | None = None,
                     timeout: float = 90) -> Worker:
    """Run a worker in this process until ``cond(worker)``; stop it (open windows are
    written as partial rows) and return it."""
    w = Worker(cfg, sink=sink)
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    try:
        await wait_for(lambda: task.done() or cond(w), timeout, lambda: f"{what}: stored {w.stored_events}, "
                       f"dead-lettered {w.dead_lettered}")
        assert not task.done(), task.exception()
        await asyncio.sleep(1.0)  # anything written twice would land now
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        if sink is None:
            await asyncio.to_thread(w.sink.close)
    return w


async def _dlq_sources(kafka: str, topic: str) -> collections.Counter[tuple[int, int]]:
    """(source offset, index) of every record in ``topic``, counted."""
    c = AIOKafkaConsumer(topic, bootstrap_servers=kafka, group_id=None, auto_offset_reset="earliest",
                         enable_auto_commit=False)
    await c.start()
    out: collections.Counter[tuple[int, int]] = collections.Counter()
    try:
        empty = 0
        while empty < 3:
            data = await c.getmany(timeout_ms=500)
            empty = 0 if any(data.values()) else empty + 1
            for recs in data.values():
                for r in recs:
                    h = dict(r.headers)
                    out[(int(h["driftline-source-offset"]), int(h.get("driftline-source-index", b"0")))] += 1
    finally:
        await c.stop()
    return out


# ------------------------------------------------------------------ topic identity
@pytest.mark.parametrize("second", [200, 500], ids=["fewer-records", "more-records"])
async def test_restarted_memory_broker_is_read_from_its_beginning(tmp_path: Path, chdb_dsn: str,
                                                                  second: int) -> None:
    """The default set-up restarts an empty in-memory broker beside a persistent chDB.

    Catches: skipping by stored offsets without checking the record at them
    (``_same_topic`` returning True) — the first 300 records of the new broker's
    topic would be skipped: 200 stored instead of 500 (``more-records``), 0 instead
    of 200 (``fewer-records``, whose offsets restart below the stored one).
    """
    topic, group = "events", f"g-{uuid.uuid4().hex[:8]}"
    first = _records(300, seed=41)
    then = _records(second, seed=42, start_ms=1_735_689_600_000 + 86_400_000)
    for recs, n_before in ((first, 0), (then, 300)):
        with LocalBroker.started(log_path=tmp_path / f"tansu{n_before}.log",
                                 topics={topic: 1, f"{topic}.dlq": 1}) as broker:
            await produce_records(broker.bootstrap, topic, [(r.key, r.value) for r in recs])
            cfg = _cfg(broker.bootstrap, chdb_dsn, topic, group)
            n = len(recs)
            w = await _run_until(cfg, lambda w, n=n: w.stored_events >= n, "new broker's records")
            assert w.stored_events == n
    assert _query(chdb_dsn, "SELECT count(), uniqExact(event_id) FROM driftline.llm_events") == [
        (300 + second, 300 + second)]
    assert _query(chdb_dsn, "SELECT max(epoch) FROM driftline.ingest_log") == [(1,)]


async def test_recreated_topic_is_read_from_its_beginning(kafka_bootstrap: str, make_topics: Any,
                                                           chdb_dsn: str) -> None:
    """The topic is deleted and created again on the same broker (the group's committed
    offset may survive it); 500 new records follow 300 stored ones.

    Catches: trusting the stored (or committed) offsets without checking the record
    at them (``_probe`` and ``_same_topic`` both passing everything): the new
    topic's first 300 records would be skipped (500 stored in all, not 800).
    """
    from kafka.admin import KafkaAdminClient

    topic, group = f"r-{uuid.uuid4().hex[:10]}", f"g-{uuid.uuid4().hex[:8]}"
    make_topics({topic: 1, f"{topic}.dlq": 1})
    cfg = _cfg(kafka_bootstrap, chdb_dsn, topic, group)
    old, new = _records(300, seed=47), _records(500, seed=48, start_ms=1_735_689_600_000 + 86_400_000)
    await produce_records(kafka_bootstrap, topic, [(r.key, r.value) for r in old])
    await _run_until(cfg, lambda w: w.stored_events >= 300, "the old topic")
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.delete_topics([topic])
    finally:
        admin.close()
    make_topics({topic: 1})
    await produce_records(kafka_bootstrap, topic, [(r.key, r.value) for r in new])
    w = await _run_until(cfg, lambda w: w.stored_events >= 500, "the recreated topic")
    assert w.stored_events == 500
    assert _query(chdb_dsn, "SELECT count(), uniqExact(event_id) FROM driftline.llm_events") == [(800, 800)]
    assert _query(chdb_dsn, "SELECT max(epoch) FROM driftline.ingest_log") == [(1,)]


# ------------------------------------------------------------------ torn write step
async def test_kill_between_events_and_window_insert_recomputes_the_windows(
        kafka_bootstrap: str, make_topics: Any, chdb_dsn: str, tmp_path: Path) -> None:
    """Killed after a write step stored its events and before its window rows.

    Catches: rebuilding the windows from every stored row (no ``source_offset``
    bound in ``window_restore.recent_rows``): the cut-short step's events would be counted twice
    in their windows; and inserting the re-processed events again (no
    ``_drop_stored``): llm_events would hold duplicates without FINAL.
    """
    topic, group = f"w-{uuid.uuid4().hex[:10]}", f"g-{uuid.uuid4().hex[:8]}"
    make_topics({topic: 1, f"{topic}.dlq": 1})
    recs = _records(3_000, seed=43)
    await produce_records(kafka_bootstrap, topic, [(r.key, r.value) for r in recs])
    await _crash(tmp_path, """
        from driftline.streams.sinks.clickhouse import ClickHouseSink
        orig = ClickHouseSink.insert_rows
        calls = [0]
        async def insert_rows(self, table, *a, **k):
            if table == "llm_window_metrics":
                calls[0] += 1
                if calls[0] == 3:
                    os._exit(17)  # the events of this step are stored; its windows and write log are not
            return await orig(self, table, *a, **k)
        ClickHouseSink.insert_rows = insert_rows
    """, kafka_bootstrap, chdb_dsn, topic, group)
    (stored_before,), = _query(chdb_dsn, "SELECT count() FROM driftline.llm_events")
    (logged,), = _query(chdb_dsn, "SELECT max(last_offset) + 1 FROM driftline.ingest_log")
    assert logged < stored_before < 3_000, "the kill must leave events past the write log"

    await _run_until(_cfg(kafka_bootstrap, chdb_dsn, topic, group), lambda w: w.stored_events >= 3_000 - stored_before,
                     "the rest of the topic")
    assert _query(chdb_dsn, "SELECT count(), uniqExact(event_id) FROM driftline.llm_events") == [(3_000, 3_000)]
    # every window row (the latest version of each) equals the count over the raw rows
    windows = dict(_query(chdb_dsn, """
        SELECT (app, model, prompt_version, toUnixTimestamp64Milli(window_start)), (events, input_tokens)
        FROM driftline.llm_window_metrics FINAL"""))
    raw = dict(_query(chdb_dsn, """
        SELECT (app, model, prompt_version, intDiv(toUnixTimestamp64Milli(timestamp), 10000) * 10000),
               (count(), sum(ifNull(input_tokens, 0)))
        FROM driftline.llm_events GROUP BY 1"""))
    assert len(raw) > 20
    assert windows == raw


# ------------------------------------------------------------------ DLQ exactly once
@pytest.mark.parametrize("where", ["before-send", "after-send"])
async def test_kill_around_the_dlq_send_dead_letters_each_record_once(
        kafka_bootstrap: str, make_topics: Any, chdb_dsn: str, tmp_path: Path, where: str) -> None:
    """Killed after the write step (outbox and write log stored) and before the DLQ
    send, or after the send and before the offset commit.

    Catches: no outbox recovery on assignment (``DeadLetters.recover`` a no-op) — the
    rejected records of the last step are lost (before-send); recovery that re-sends
    without reading what the DLQ holds (``DeadLetters.held`` returning an empty set) — they
    are sent twice (after-send).
    """
    topic, group = f"d-{uuid.uuid4().hex[:10]}", f"g-{uuid.uuid4().hex[:8]}"
    make_topics({topic: 1, f"{topic}.dlq": 1})
    recs = _records(4_000, seed=44, malformed=0.05)
    bad = {i for i, r in enumerate(recs) if not r.valid}
    n_valid = len(recs) - len(bad)
    await produce_records(kafka_bootstrap, topic, [(r.key, r.value) for r in recs])
    patch = """
        from driftline.streams.sinks.dlq import DeadLetters
        orig = DeadLetters.send
        calls = [0]
        async def dead_letter(self, rows):
            calls[0] += 1
            if calls[0] == 3:
                os._exit(17)
            return await orig(self, rows)
        DeadLetters.send = dead_letter
    """ if where == "before-send" else """
        import aiokafka
        orig = aiokafka.AIOKafkaConsumer.commit
        calls = [0]
        async def commit(self, *a, **k):
            calls[0] += 1
            if calls[0] == 3:
                os._exit(17)  # the DLQ send of this step is done; the commit is not
            return await orig(self, *a, **k)
        aiokafka.AIOKafkaConsumer.commit = commit
        from driftline.streams.ingest import librdkafka_host  # DRIFTLINE_CONSUMER=librdkafka
        orig_now = librdkafka_host.LibrdkafkaHost._commit_now
        def commit_now(self, offsets):
            if offsets:
                calls[0] += 1
                if calls[0] == 3:
                    os._exit(17)
            return orig_now(self, offsets)
        librdkafka_host.LibrdkafkaHost._commit_now = commit_now
    """
    await _crash(tmp_path, patch, kafka_bootstrap, chdb_dsn, topic, group)
    (stored_before,), = _query(chdb_dsn, "SELECT count() FROM driftline.llm_events")
    assert 0 < stored_before < n_valid
    await _run_until(_cfg(kafka_bootstrap, chdb_dsn, topic, group),
                     lambda w: w.stored_events >= n_valid - stored_before, "the rest of the topic")
    await asyncio.sleep(1.0)
    held = await _dlq_sources(kafka_bootstrap, f"{topic}.dlq")
    assert held == collections.Counter({(i, 0): 1 for i in bad})
    assert _query(chdb_dsn, "SELECT count() FROM driftline.llm_events") == [(n_valid,)]


# ------------------------------------------------------------------ poison row
async def test_row_clickhouse_refuses_goes_to_the_dlq_rest_is_stored(
        kafka_bootstrap: str, make_topics: Any, chdb_dsn: str) -> None:
    """ClickHouse refuses one event for its data (a CHECK constraint: code 469).

    Catches: retrying every error (``retryable`` always True) — the batch is retried
    forever and nothing is stored; no bisection (refusing the whole batch) — 999
    valid events would go missing or to the DLQ.
    """
    topic, group = f"p-{uuid.uuid4().hex[:10]}", f"g-{uuid.uuid4().hex[:8]}"
    make_topics({topic: 1, f"{topic}.dlq": 1})
    sink = ClickHouseSink(chdb_dsn)
    sink.ensure_schema()
    sink.call(lambda c: c.command("ALTER TABLE driftline.llm_events ADD CONSTRAINT no_poison "
                                  "CHECK app != 'poison-app'"))
    recs = _records(1_000, seed=45)
    values = [r.value for r in recs]
    poison_at = 617
    values[poison_at] = values[poison_at].replace(f'"app":"{recs[poison_at].event["app"]}"'.encode(),
                                                  b'"app":"poison-app"')
    assert b"poison-app" in values[poison_at]
    await produce_records(kafka_bootstrap, topic, [(None, v) for v in values])
    try:
        w = await _run_until(_cfg(kafka_bootstrap, chdb_dsn, topic, group),
                             lambda w: w.stored_events >= 999 and w.dead_lettered >= 1, "999 stored, 1 refused",
                             sink=sink)
        assert (w.stored_events, w.dead_lettered) == (999, 1)
    finally:
        sink.close()
    assert _query(chdb_dsn, "SELECT count(), countIf(app = 'poison-app') FROM driftline.llm_events") == [(999, 0)]
    c = AIOKafkaConsumer(f"{topic}.dlq", bootstrap_servers=kafka_bootstrap, group_id=None,
                         auto_offset_reset="earliest")
    await c.start()
    try:
        data = await c.getmany(timeout_ms=3_000)
    finally:
        await c.stop()
    got = [r for recs_ in data.values() for r in recs_]
    assert len(got) == 1
    h = dict(got[0].headers)
    assert int(h["driftline-source-offset"]) == poison_at
    assert got[0].value == values[poison_at]
    assert b"VIOLATED_CONSTRAINT" in h["driftline-reason"]


# ------------------------------------------------------------------ ClickHouse down at assignment
class _FlakyReads(ClickHouseSink):
    """The real sink whose write-log read fails the first ``fails`` times, as when
    ClickHouse is unreachable while partitions are assigned."""

    fails = 3

    def ingest_marks(self, topic: str, partitions: Any) -> dict[int, tuple[Any, ...]]:
        if self.fails > 0:
            self.fails -= 1
            raise ConnectionError("ClickHouse unreachable (injected)")
        return super().ingest_marks(topic, partitions)


async def test_write_log_read_failing_during_assignment_partition_still_ready(
        kafka_bootstrap: str, make_topics: Any, chdb_dsn: str) -> None:
    """Catches: reading the write log without a retry in the rebalance callback —
    aiokafka logs and swallows the error, the partition never becomes ready and
    nothing is stored."""
    topic, group = f"a-{uuid.uuid4().hex[:10]}", f"g-{uuid.uuid4().hex[:8]}"
    make_topics({topic: 2, f"{topic}.dlq": 1})
    recs = _records(1_000, seed=46)
    await produce_records(kafka_bootstrap, topic, [(r.key, r.value) for r in recs])
    sink = _FlakyReads(chdb_dsn)
    try:
        w = await _run_until(_cfg(kafka_bootstrap, chdb_dsn, topic, group), lambda w: w.stored_events >= 1_000,
                             "1000 stored", sink=sink)
        assert w.stored_events == 1_000 and sink.fails == 0
        assert len(w._ready) == 2
    finally:
        sink.close()
    assert _query(chdb_dsn, "SELECT count() FROM driftline.llm_events") == [(1_000,)]
