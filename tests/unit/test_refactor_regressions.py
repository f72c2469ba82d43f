"""Regressions of the issue-15 refactor found in review (each test fails on the code it names)."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from aiokafka import TopicPartition

from driftline.streams.ingest.transforms import MemoryRecord

TP = TopicPartition("llm.events", 0)


def _event(i: int) -> bytes:
    return json.dumps({"event_id": f"e{i}", "app": "chat", "request_model": "gpt-4o",
                       "timestamp": 1_735_689_600_000 + i, "latency_ms": 100.0}).encode()


class _GatedSink:
    """Stands in for the ClickHouse sink: ``call`` (the window rebuild's read) blocks until
    ``gate`` is set and finds no stored row."""

    database = "driftline"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()

    def call(self, fn: Any) -> Any:
        self.entered.set()
        self.gate.wait(10)
        return None


def _windowed(w: Any) -> int:
    """Events in the worker's open windows (read without taking any partial/peek marks)."""
    agg = w.windows
    return sum(x.stats(False, agg.config.relative_accuracy).events for x in agg._windows())


def test_events_windowed_while_the_rebuild_reads_clickhouse_are_kept() -> None:
    """streams/worker.py Worker._rebuild_windows: the host made the partitions ready
    (KafkaHost._on_assigned: ``self.ready |= ...`` then ``await hooks.assigned``), so the
    fetch loop delivers batches while the rebuild's ClickHouse read is awaited. The old
    worker added the rebuilt rows to the aggregator those batches went into; the new one
    replaces it with window_restore.rebuild's fresh aggregator, dropping their events
    from the windows (the final window rows miss them)."""
    from driftline.streams.worker import Worker, WorkerConfig

    async def main() -> tuple[int, int]:
        sink = _GatedSink()
        w = Worker(WorkerConfig(kafka="127.0.0.1:1", clickhouse="chdb:///nonexistent", max_event_age_s=1e10),
                   sink=sink)  # type: ignore[arg-type]
        try:
            rebuild = asyncio.create_task(w._rebuild_windows([TP]))
            while not sink.entered.is_set():
                await asyncio.sleep(0.01)
            recs = [MemoryRecord(TP.topic, TP.partition, i, None, _event(i)) for i in range(5)]
            w.process(recs, {TP: 5})  # the fetch loop's delivery of a batch of the new generation
            before = _windowed(w)
            sink.gate.set()
            await rebuild
            after = _windowed(w)
            return before, after
        finally:
            sink.gate.set()
            w._decode_pool.shutdown()

    before, after = asyncio.run(main())
    assert before == 5
    assert after == 5, f"the 5 events windowed during the rebuild's read were dropped (now {after})"


def test_an_undecodable_record_batch_does_not_end_the_control_consumer(monkeypatch: Any) -> None:
    """streams/ingest/control.py ControlConsumer._run: getmany is not guarded, so a record
    batch aiokafka cannot unpack (UnsupportedCodecError: a snappy batch where cramjam is
    missing, as tests/integration/test_undecodable_batch.py shows getmany raises on the real
    broker; or a bad CRC) ends the consumer task: every later flush and baseline command
    is silently ignored until a restart, and the replayed topic (read from its start)
    hits the same batch again at every start. The module docstring promises junk
    "never ends the consumer"; KafkaHost.fetch skips such a batch (unpacking_error)."""
    import aiokafka
    from aiokafka.errors import UnsupportedCodecError

    from driftline.streams.ingest.control import ControlConsumer, Subscription
    from driftline.streams.ports import KafkaPort

    class Rec:
        def __init__(self, offset: int, value: bytes) -> None:
            self.offset, self.value, self.timestamp = offset, value, 0

    class FakeCluster:
        def partitions_for_topic(self, topic: str) -> set[int]:
            return {0}

    class FakeClient:
        async def fetch_all_metadata(self) -> FakeCluster:
            return FakeCluster()

    class FakeConsumer:
        def __init__(self, **kw: Any) -> None:
            self.calls = 0
            self._client = FakeClient()

        async def start(self) -> None: ...

        async def stop(self) -> None: ...

        def partitions_for_topic(self, topic: str) -> set[int]:
            return {0}

        async def force_metadata_update(self) -> None: ...

        def assign(self, tps: Any) -> None: ...

        async def end_offsets(self, tps: Any) -> dict[Any, int]:
            return {tp: 0 for tp in tps}

        def seek(self, tp: Any, off: int) -> None: ...

        async def seek_to_beginning(self, *tps: Any) -> None: ...

        async def position(self, tp: Any) -> int:
            return 0

        async def getmany(self, *tps: Any, **kw: Any) -> dict[Any, Any]:
            self.calls += 1
            await asyncio.sleep(0.01)
            if self.calls == 1:
                raise UnsupportedCodecError("Libraries for snappy compression codec not found")
            if self.calls == 2:
                return {TopicPartition("driftline.control", 0): [Rec(1, b'{"cmd": "flush"}')]}
            return {}

    monkeypatch.setattr(aiokafka, "AIOKafkaConsumer", FakeConsumer)
    got: list[str] = []

    async def main() -> None:
        c = ControlConsumer(KafkaPort("127.0.0.1:1"),
                            [Subscription("driftline.control", lambda r: got.append(r.name))])
        await c.start()
        for _ in range(100):
            if got or (c._task is not None and c._task.done()):
                break
            await asyncio.sleep(0.01)
        died = c._task is not None and c._task.done()
        await c.stop()
        assert not died, "the control consumer task ended on an undecodable record batch"

    asyncio.run(main())
    assert got == ["flush"]


def test_alert_rows_held_never_exceed_max_pending_rows() -> None:
    """streams/stages/alerting.py AlertingStage._rows: max_queue_size=max_export_batch_size=
    max_pending_rows, and BatchProcessor takes the batch being exported off its queue, so
    while an insert hangs (ClickHouse slow: the sink retries inside) the stage holds up to
    twice max_pending_rows rows. The old row writer kept in-flight rows in its deque, so
    the stage never held more than max_pending_rows (its memory bound)."""
    import textwrap

    from driftline.schemas.rules import parse_rules
    from driftline.streams.stages.alerting import AlertingStage

    rules = parse_rules(textwrap.dedent("""\
        rules:
          - name: Lat
            kind: threshold
            expr: "latency_ms.p99 > 2000"
        """))

    class Hanging:
        def __init__(self) -> None:
            self.gate = asyncio.Event()

        async def insert_rows(self, table: str, rows: Any, columns: Any) -> None:
            await self.gate.wait()

    async def main() -> int:
        st = AlertingStage(rules, max_pending_rows=2)
        sink = Hanging()
        st._row_exporter.tables = sink
        await st._rows.start()
        for i in range(2):
            st._rows.add_nowait({"rule": f"r{i}"})
        await asyncio.sleep(0.05)  # the export of r0, r1 hangs
        for i in range(2, 4):
            st._rows.add_nowait({"rule": f"r{i}"})
        held = st._rows.pending
        sink.gate.set()
        await st._rows.shutdown(timeout_s=1.0)
        return held

    held = asyncio.run(main())
    assert held <= 2, f"the stage held {held} alert rows with max_pending_rows=2"


def test_a_failed_control_log_read_at_start_does_not_fail_the_drift_stage() -> None:
    """streams/stages/semantic_drift.py DriftStage.start: the read of drift_control_log
    (``ports.tables.aquery``, no retry) moved from the drift stage's control task into
    ``start``: a ClickHouse error there now raises out of ``Worker.run``'s stage start
    (the worker stops) instead of only turning baseline commands off. Before, start
    returned and the failure stayed in the control task."""
    import numpy as np

    from driftline.streams.ports import StagePorts
    from driftline.streams.stages.semantic_drift import DriftConfig, DriftStage

    class Enc:
        name, dim, max_chars = "fake", 4, 20

        def encode(self, texts: Any) -> Any:
            return np.ones((len(texts), 4), dtype=np.float32)

    class Tables:
        database = "driftline"

        def query(self, sql: str, parameters: Any = None) -> Any:
            raise ConnectionError("ClickHouse unreachable")

        async def aquery(self, sql: str, parameters: Any = None) -> Any:
            raise ConnectionError("ClickHouse unreachable")

    async def main() -> None:
        base = StagePorts.detached()
        ports = StagePorts(tables=Tables(), metrics=base.metrics, windows=base.windows,  # type: ignore[arg-type]
                           kafka=base.kafka)
        st = DriftStage(DriftConfig(), None, Enc())
        try:
            await st.start(ports)
        finally:
            await st.stop()

    asyncio.run(main())


def test_revoke_drain_includes_the_batch_the_fetch_loop_was_blocked_adding() -> None:
    """streams/sinks/write_step.py WriteStep.drain -> BatchProcessor.force_flush waits only
    for the items added *before* it was called (``target = self._added``). Under load the
    fetch loop sits in ``batches.add`` (queue full) with a processed batch of the revoked
    generation; the old ``queue.join()`` also waited for that put (it lands as soon as the
    writer takes the queue, before the count of unfinished items can reach 0), so the
    revocation returned only once it was stored and committed. Now the revocation returns
    first: the next owner reads a write log without it, and this worker writes (and
    dead-letters) it afterwards: its records are stored twice and its rejected records
    reach the DLQ twice."""
    from driftline.streams.sinks.write_step import Work, WriteStep

    async def main() -> tuple[bool, list[int]]:
        written: list[int] = []
        gate = asyncio.Event()

        async def on_safe(offsets: Any) -> None: ...

        step = WriteStep(None, None, None, None, on_safe=on_safe,  # type: ignore[arg-type]
                         min_insert_rows=1, max_insert_rows=1, insert_linger_s=0.0)

        async def write(batch: list[Work]) -> None:
            await gate.wait()
            await asyncio.sleep(0.01)  # the inserts are I/O
            written.extend(next(iter(w.offsets.values())) for w in batch)

        step.write = write  # type: ignore[method-assign]
        await step.start()

        def work(i: int) -> Work:
            return Work(None, [], [], {TP: i})

        await step.batches.add(work(0))
        await asyncio.sleep(0.01)  # the writer took batch 0: its write hangs (ClickHouse slow)
        for i in range(1, 5):
            await step.batches.add(work(i))  # the queue is full (4)
        blocked = asyncio.create_task(step.batches.add(work(5)))  # the fetch loop, held back
        await asyncio.sleep(0.01)
        assert not blocked.done()
        drain = asyncio.create_task(step.drain(5.0))  # a revocation
        await asyncio.sleep(0.01)
        gate.set()
        ok = await drain
        seen = list(written)
        await step.shutdown()
        return ok, seen

    ok, seen = asyncio.run(main())
    assert ok
    assert seen == [0, 1, 2, 3, 4, 5], f"the revocation returned with only {seen} written"


def test_baseline_commands_wait_for_the_control_log_and_are_applied_once_it_answers() -> None:
    """The other half of the fix above: a baseline command that arrives while
    drift_control_log cannot be read is held, then queued (or skipped when the log says it
    was applied) once the read succeeds. Catches: held commands never replayed, or
    applied before the log was read (a command applied before would run twice)."""
    import numpy as np

    from driftline.streams.ingest.control import ControlRecord
    from driftline.streams.ports import StagePorts
    from driftline.streams.stages.semantic_drift import DriftConfig, DriftStage

    class Enc:
        name, dim, max_chars = "fake", 4, 20

        def encode(self, texts: Any) -> Any:
            return np.ones((len(texts), 4), dtype=np.float32)

    class Tables:
        database = "driftline"
        calls = 0

        def query(self, sql: str, parameters: Any = None) -> Any:
            return []

        async def aquery(self, sql: str, parameters: Any = None) -> Any:
            Tables.calls += 1
            if Tables.calls == 1:
                raise ConnectionError("ClickHouse unreachable")
            return [("done-before",)]

    def rec(cid: str, offset: int) -> Any:
        return ControlRecord({"cmd": "baseline", "id": cid, "action": "reset", "app": "chat"},
                             "driftline.control", 0, offset, 0)

    async def main() -> tuple[bool, list[str], list[str]]:
        base = StagePorts.detached()
        ports = StagePorts(tables=Tables(), metrics=base.metrics, windows=base.windows,  # type: ignore[arg-type]
                           kafka=base.kafka)
        st = DriftStage(DriftConfig(), None, Enc())

        class Seen(list):  # type: ignore[type-arg]
            def append(self, c: Any) -> None:
                queued.append(c.control_id)
                super().append(c)

        queued: list[str] = []
        st._controls = Seen()
        await st.start(ports)
        try:
            queued_early = st.on_command(rec("done-before", 0)) or st.on_command(rec("new", 1))
            for _ in range(100):  # the retry waits 0.5 s
                if st._ids_loaded:
                    break
                await asyncio.sleep(0.05)
            return queued_early, queued, sorted(st._applied_ids)
        finally:
            await st.stop()

    queued_early, queued, applied = asyncio.run(main())
    assert not queued_early
    assert queued == ["new"]  # the command the log says was applied is not queued again
    assert applied == ["done-before", "new"]


def test_the_control_consumer_keeps_the_commands_fetched_with_an_undecodable_batch() -> None:
    """After a fetch hit an undecodable batch, each partition is read one record at a time
    (kafka_host.read_alone, as the worker's host does): the two commands before the bad
    batch are dispatched and the consumer seeks past the batch only. Catches: reading the
    partition in one getmany (the bad batch then takes the good records of the same fetch
    with it, and the seek from the old position skips them)."""
    from aiokafka.errors import UnsupportedCodecError

    from driftline.streams.ingest.control import ControlConsumer, Subscription
    from driftline.streams.ports import KafkaPort

    tp = TopicPartition("driftline.control", 0)

    class Rec:
        def __init__(self, offset: int) -> None:
            self.offset, self.value, self.timestamp = offset, b'{"cmd": "flush"}', 0

    class Consumer:
        def __init__(self) -> None:
            self.pos, self.seeks = 0, []  # type: ignore[var-annotated]

        async def position(self, tp_: Any) -> int:
            return self.pos

        def seek(self, tp_: Any, off: int) -> None:
            self.seeks.append(off)

        async def getmany(self, *tps: Any, max_records: int | None = None, **kw: Any) -> dict[Any, Any]:
            if max_records != 1 or self.pos >= 2:  # a whole fetch, or the bad batch at offset 2
                raise UnsupportedCodecError("Libraries for snappy compression codec not found")
            self.pos += 1
            return {tp: [Rec(self.pos - 1)]}

    got: list[int] = []

    async def main() -> list[int]:
        c = ControlConsumer(KafkaPort("127.0.0.1:1"),
                            [Subscription("driftline.control", lambda r: got.append(r.offset))])
        c._assigned = [tp]
        c._live_from = {("driftline.control", 0): 0}
        consumer = Consumer()
        data = await c._after_fetch_error(consumer, UnsupportedCodecError("snappy"))
        c._dispatch(data)
        return consumer.seeks

    seeks = asyncio.run(main())
    assert got == [0, 1]
    assert seeks == [3]  # past the failing batch (its end unknown here: the one offset at 2)
