"""BatchProcessor (streams/sinks/batch.py): exact batches, drops, backpressure, retries, shutdown.

Pure logic against InMemoryExporter on a real event loop; the retry backoff takes a
recording ``sleep`` so no test waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry, Counter

from driftline.streams.sinks.batch import (
    BatchConfig,
    BatchProcessor,
    ExportResult,
    InMemoryExporter,
    export_failed,
)


async def settle(n: int = 20) -> None:
    """Let the export task run (no wall time passes that a delay could expire in)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not cond():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.005)


class Recorder:
    """A fake ``sleep`` that records the delays asked for."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, s: float) -> None:
        self.delays.append(s)
        await asyncio.sleep(0)


async def test_size_trigger_exports_full_batches_and_shutdown_the_rest() -> None:
    # Mutations caught: exporting on every add (batches of 1), a batch one larger or
    # smaller than max_export_batch_size, shutdown not exporting the remainder.
    out: InMemoryExporter[int] = InMemoryExporter()
    bp = BatchProcessor(out, max_queue_size=10, max_export_batch_size=3, schedule_delay_s=60)
    await bp.start()
    for i in range(7):
        await bp.add(i)
    await settle()
    assert out.batches == [[0, 1, 2], [3, 4, 5]]
    assert (len(bp), bp.exported) == (1, 6)
    await bp.shutdown()
    assert out.batches == [[0, 1, 2], [3, 4, 5], [6]]
    assert (bp.exported, bp.dropped, bp.failed, out.is_shut_down) == (7, 0, 0, True)


async def test_delay_trigger_exports_a_short_batch_after_the_delay() -> None:
    # Mutations caught: ignoring schedule_delay_s (items wait for a full batch forever),
    # exporting before the delay.
    out: InMemoryExporter[str] = InMemoryExporter()
    bp = BatchProcessor(out, max_queue_size=100, max_export_batch_size=100, schedule_delay_s=0.2)
    await bp.start()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for x in "abc":
        await bp.add(x)
    await settle()
    assert out.batches == []
    await until(lambda: bool(out.batches))
    assert loop.time() - t0 >= 0.2
    assert out.batches == [["a", "b", "c"]]
    await bp.shutdown()
    assert out.batches == [["a", "b", "c"]]


async def test_zero_delay_exports_what_waits_at_once() -> None:
    out: InMemoryExporter[int] = InMemoryExporter()
    bp = BatchProcessor(out, max_queue_size=10, max_export_batch_size=10, schedule_delay_s=0)
    await bp.start()
    bp.add_nowait(1)
    bp.add_nowait(2)
    await settle()
    assert out.batches == [[1, 2]]
    await bp.shutdown()


async def test_force_flush_exports_before_the_delay() -> None:
    # Mutation caught: force_flush waiting for the schedule delay (it returns False here).
    out: InMemoryExporter[int] = InMemoryExporter()
    bp = BatchProcessor(out, max_queue_size=10, max_export_batch_size=4, schedule_delay_s=60)
    await bp.start()
    for i in range(6):
        await bp.add(i)
    assert await bp.force_flush(1.0) is True
    assert out.batches == [[0, 1, 2, 3], [4, 5]]
    await bp.shutdown()
    assert await bp.force_flush(1.0) is False   # after shutdown


async def test_drop_oldest_counts_exact_drops() -> None:
    # Mutations caught: dropping the newest instead of the oldest, not counting a drop,
    # counting items instead of units.
    reg = CollectorRegistry()
    drops = Counter("t_dropped", "d", registry=reg)
    out: InMemoryExporter[list[int]] = InMemoryExporter()
    bp: BatchProcessor[list[int]] = BatchProcessor(
        out, max_queue_size=4, max_export_batch_size=4, schedule_delay_s=60, on_full="drop_oldest",
        drops_counter=drops, size_of=len, name="t")
    for i in range(10):          # before start: only queued
        bp.add_nowait([i] * (i % 3 + 1))
    assert len(bp) == 4
    # dropped: items 0..5 with sizes 1,2,3,1,2,3
    assert bp.dropped == 12
    assert reg.get_sample_value("t_dropped_total") == 12.0
    await bp.start()
    assert await bp.force_flush(1.0)
    assert out.batches == [[[6], [7, 7], [8, 8, 8], [9]]]
    assert bp.exported == 7
    await bp.shutdown()


async def test_block_applies_backpressure_on_a_full_queue() -> None:
    # Mutations caught: add() returning while the queue is full (drop or overfill under
    # "block"), add() never woken when an export frees room.
    gate = asyncio.Event()
    out: InMemoryExporter[int] = InMemoryExporter(gate=gate)
    bp = BatchProcessor(out, max_queue_size=2, max_export_batch_size=1, schedule_delay_s=0)
    await bp.start()
    await bp.add(0)
    await settle()
    assert (bp.pending, len(bp)) == (1, 0)   # 0 is in flight, held at the gate
    await bp.add(1)
    await bp.add(2)                          # the queue is full now
    with pytest.raises(asyncio.QueueFull):
        bp.add_nowait(9)
    blocked = asyncio.create_task(bp.add(3))
    await settle()
    assert not blocked.done() and len(bp) == 2
    gate.set()
    await asyncio.wait_for(blocked, 2.0)
    assert await bp.force_flush(1.0)
    assert out.exported == [0, 1, 2, 3]
    assert (bp.dropped, bp.failed) == (0, 0)
    await bp.shutdown()


async def test_block_retries_failed_exports_with_backoff() -> None:
    # Mutations caught: giving up on a failed export under "block" (data lost), a flat or
    # unbounded backoff, counting a failed attempt as exported.
    sleep = Recorder()
    out: InMemoryExporter[int] = InMemoryExporter(fail_next=4)
    bp = BatchProcessor(out, max_queue_size=10, max_export_batch_size=10, schedule_delay_s=0,
                        backoff_initial_s=0.1, backoff_max_s=0.3, sleep=sleep)
    await bp.start()
    for i in range(3):
        bp.add_nowait(i)
    assert await bp.force_flush(2.0)
    assert out.batches == [[0, 1, 2]]
    assert out.calls == 5
    assert sleep.delays == [0.1, 0.2, 0.3, 0.3]
    assert (bp.retries, bp.exported, bp.failed, bp.dropped) == (12, 3, 0, 0)   # in units: 4 x 3
    await bp.shutdown()


async def test_drop_oldest_retries_up_to_max_attempts_with_jitter() -> None:
    # Mutations caught: one attempt too many or too few, jitter outside [1 - jitter, 1],
    # a retry or a give-up not counted in units.
    reg = CollectorRegistry()
    retried, failed = Counter("t_retried", "r", registry=reg), Counter("t_failed", "f", registry=reg)
    sleep = Recorder()
    out: InMemoryExporter[list[str]] = InMemoryExporter(fail_next=4)
    bp: BatchProcessor[list[str]] = BatchProcessor(
        out, max_queue_size=4, max_export_batch_size=1, schedule_delay_s=0, on_full="drop_oldest",
        max_attempts=3, backoff_initial_s=1.0, backoff_max_s=8.0, jitter=0.5, rng=random.Random(7),
        retries_counter=retried, failures_counter=failed, size_of=len, sleep=sleep)
    await bp.start()
    bp.add_nowait(["a", "b"])    # fails 3 times: given up
    bp.add_nowait(["c"])         # fails once, then exported
    assert await bp.force_flush(1.0)
    assert out.calls == 5 and out.batches == [[["c"]]]
    rng = random.Random(7)
    assert sleep.delays == [1.0 * (1 - 0.5 * rng.random()), 2.0 * (1 - 0.5 * rng.random()),
                            1.0 * (1 - 0.5 * rng.random())]
    assert (bp.failed, bp.retries, bp.exported) == (2, 5, 1)   # retried: 2 + 2 + 1 alerts
    assert (reg.get_sample_value("t_retried_total"), reg.get_sample_value("t_failed_total")) == (5.0, 2.0)
    await bp.shutdown()


async def test_export_timeout_is_a_failed_attempt() -> None:
    # Mutation caught: export_timeout_s ignored (the lane hangs behind one export).
    out: InMemoryExporter[int] = InMemoryExporter(gate=asyncio.Event())
    bp = BatchProcessor(out, max_queue_size=4, max_export_batch_size=4, schedule_delay_s=0,
                        on_full="drop_oldest", export_timeout_s=0.05)
    await bp.start()
    bp.add_nowait(1)
    assert await bp.force_flush(2.0)
    assert (out.calls, bp.failed, bp.exported) == (1, 1, 0)
    await bp.shutdown()


class Raising(InMemoryExporter[int]):
    async def export(self, items: object) -> ExportResult:
        self.calls += 1
        raise RuntimeError("sink down")


async def test_drop_oldest_counts_failed_exports_and_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    # Mutations caught: retrying under "drop_oldest" (the next batch waits), a raising
    # exporter killing the export task, a failure not counted.
    reg = CollectorRegistry()
    failures = Counter("t_failed", "f", registry=reg)
    out: InMemoryExporter[int] = InMemoryExporter(fail_next=1)
    bp = BatchProcessor(out, max_queue_size=10, max_export_batch_size=2, schedule_delay_s=60,
                        on_full="drop_oldest", failures_counter=failures)
    await bp.start()
    for i in range(5):
        bp.add_nowait(i)
    assert await bp.force_flush(1.0)
    assert out.batches == [[2, 3], [4]]
    assert (bp.failed, bp.exported, bp.retries) == (2, 3, 0)
    assert reg.get_sample_value("t_failed_total") == 2.0
    await bp.shutdown()

    bad = Raising()
    bp2 = BatchProcessor(bad, max_queue_size=4, max_export_batch_size=1, schedule_delay_s=0,
                         on_full="drop_oldest")
    await bp2.start()
    with caplog.at_level(logging.ERROR, "driftline.sinks.batch"):
        bp2.add_nowait(1)
        bp2.add_nowait(2)
        assert await bp2.force_flush(1.0)
    assert (bad.calls, bp2.failed, bp2.exported) == (2, 2, 0)
    assert "export of 1 item(s) raised" in caplog.text
    await bp2.shutdown()


async def test_shutdown_flushes_everything_then_drops_late_items() -> None:
    # Mutations caught: shutdown dropping what is queued, an add after shutdown queued
    # (never exported) instead of counted.
    out: InMemoryExporter[int] = InMemoryExporter()
    bp = BatchProcessor(out, max_queue_size=100, max_export_batch_size=2, schedule_delay_s=60,
                        on_full="block")
    for i in range(5):
        bp.add_nowait(i)        # never started: shutdown still exports them
    await bp.shutdown()
    assert out.batches == [[0, 1], [2, 3], [4]]
    assert out.is_shut_down
    await bp.add(5)
    assert (bp.dropped, bp.exported, out.exported) == (1, 5, [0, 1, 2, 3, 4])
    await bp.shutdown()        # idempotent


async def test_shutdown_gives_up_on_a_hung_sink_after_its_timeout(caplog: pytest.LogCaptureFixture) -> None:
    # Mutation caught: shutdown waiting forever on an export that never returns.
    out: InMemoryExporter[int] = InMemoryExporter(gate=asyncio.Event())
    bp = BatchProcessor(out, max_queue_size=10, max_export_batch_size=1, schedule_delay_s=0, name="hung")
    await bp.start()
    for i in range(3):
        bp.add_nowait(i)
    with caplog.at_level(logging.WARNING, "driftline.sinks.batch"):
        await asyncio.wait_for(bp.shutdown(timeout_s=0.1), 2.0)
    assert out.batches == [] and out.is_shut_down
    assert "hung: 3 item(s) not exported at shutdown" in caplog.text


def test_export_failed() -> None:
    assert [export_failed(r) for r in (ExportResult.FAILURE, False, ExportResult.SUCCESS, True, None)] \
        == [True, True, False, False, False]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_queue_size": 0}, "max_queue_size must be >= 1"),
    ({"max_queue_size": 4, "max_export_batch_size": 5}, r"max_export_batch_size must be in \[1, max_queue_size=4\]"),
    ({"max_export_batch_size": 0}, "max_export_batch_size must be in"),
    ({"schedule_delay_s": -1.0}, "schedule_delay_s must be >= 0"),
    ({"schedule_delay_s": float("nan")}, "schedule_delay_s must be >= 0"),
    ({"on_full": "drop_newest"}, "on_full must be 'block' or 'drop_oldest'"),
    ({"backoff_initial_s": 2.0, "backoff_max_s": 1.0}, "backoff_initial_s <= backoff_max_s"),
    ({"jitter": 1.5}, r"jitter must be in \[0, 1\]"),
    ({"max_attempts": 3}, "max_attempts is for on_full='drop_oldest'"),
    ({"on_full": "drop_oldest", "max_attempts": 0}, "max_attempts must be >= 1"),
    ({"export_timeout_s": 0.0}, "export_timeout_s must be > 0 or None"),
])
def test_bad_config_is_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchProcessor(InMemoryExporter(), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        BatchConfig(**kwargs)  # type: ignore[arg-type]
