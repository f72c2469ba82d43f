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
