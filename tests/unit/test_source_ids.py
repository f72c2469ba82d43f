"""``dlq.source_ids`` (what a topic already holds: the DLQ's and the OTLP re-keyer's
recovery): a long read that keeps making progress is not cut off by its timeout.

The reader is a stand-in (pure logic: which records come back, and the clock); the
read against the real broker is tested in tests/integration/test_otlp_rekey.py.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition

from driftline.streams.ingest.rekey import source_headers
from driftline.streams.sinks import dlq


class SlowReader:
    """One record per fetch, each fetch taking one second of the (fake) clock."""

    def __init__(self, tp: TopicPartition, n: int, clock: list[float]) -> None:
        self.tp, self.n, self.clock, self.pos = tp, n, clock, 0

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.pos = offset

    async def getmany(self, *parts: Any, timeout_ms: int = 0) -> dict[TopicPartition, list[Any]]:
        self.clock[0] += 1.0
        if self.pos >= self.n:
            return {}
        rec = SimpleNamespace(offset=self.pos, headers=source_headers("otlp_spans", 0, self.pos, 0))
        self.pos += 1
        return {self.tp: [rec]}

    def highwater(self, tp: TopicPartition) -> int:
        return self.n

    async def position(self, tp: TopicPartition) -> int:
        return self.pos


def test_a_read_that_progresses_outlasts_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """30 fetches of 1 s each with a 5 s timeout: every source id comes back (cut off at
    5 s, the re-keyer's recovery retried it from the start forever: a stalled partition)."""
    clock = [0.0]
    monkeypatch.setattr(dlq.time, "monotonic", lambda: clock[0])
    tp = TopicPartition("llm.events", 0)
    held = asyncio.run(dlq.source_ids(SlowReader(tp, 30, clock), [tp], {}, timeout_s=5.0))  # type: ignore[arg-type]
    assert held == {("otlp_spans", 0, o, 0) for o in range(30)}


def test_a_read_without_progress_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kafka answers nothing while the high watermark says more is there: TimeoutError
    after the timeout (the caller retries, keeping its group membership)."""
    clock = [0.0]
    monkeypatch.setattr(dlq.time, "monotonic", lambda: clock[0])
    tp = TopicPartition("llm.events", 0)
    reader = SlowReader(tp, 30, clock)
    reader.highwater = lambda tp: 40  # type: ignore[method-assign]
    with pytest.raises(TimeoutError):
        asyncio.run(dlq.source_ids(reader, [tp], {}, timeout_s=5.0))  # type: ignore[arg-type]
    assert clock[0] <= 30 + 5 + 1
