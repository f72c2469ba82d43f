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


def units(x: int) -> int:
    return x


async def test_unit_cut_takes_items_while_the_batch_is_under_max_units() -> None:
    # The write step's _coalesce rule: take while the batch holds < max units, so the
    # last item may pass it; a batch of >= trigger units goes out at once.
    # Mutations caught: stopping before max is passed ([4, 4]), cutting at the item
    # count, a trigger that waits for the delay, shutdown not exporting the remainder.
    out: InMemoryExporter[int] = InMemoryExporter()
    bp = BatchProcessor(out, max_queue_size=4, schedule_delay_s=60, max_export_units=10,
                        export_trigger_units=6, size_of=units)
    for x in (4, 4, 4, 1):
        bp.add_nowait(x)
    await bp.start()
    await settle()
    assert out.batches == [[4, 4, 4]]  # 12 units: the third item passed max=10
    assert (bp.pending, len(bp), bp.exported) == (1, 0, 12)  # [1] is being formed, lingering
    for x in (2, 3):  # 1 + 2 + 3 = 6 >= trigger: out at once
        await bp.add(x)
    await settle()
    assert out.batches == [[4, 4, 4], [1, 2, 3]]
    await bp.add(5)
    await settle()
    assert out.batches == [[4, 4, 4], [1, 2, 3]]  # 5 < trigger 6: lingers
    await bp.shutdown()
    assert out.batches == [[4, 4, 4], [1, 2, 3], [5]]
    assert (bp.exported, bp.dropped, out.is_shut_down) == (23, 0, True)


async def test_unit_cut_items_being_formed_do_not_count_against_the_queue() -> None:
    # A lingering batch takes items off the queue as they come (as a writer pulling
    # from an asyncio.Queue): the fetch loop is not held back by a batch still forming,
    # only by max_queue_size items waiting behind an export in flight.
    # Mutations caught: counting the forming batch against max_queue_size (the adds
    # below block), not blocking while an export is in flight.
    gate = asyncio.Event()
    out: InMemoryExporter[int] = InMemoryExporter(gate=gate)
    bp = BatchProcessor(out, max_queue_size=2, schedule_delay_s=60, max_export_units=100,
                        export_trigger_units=10, size_of=units)
    await bp.start()
    for _ in range(6):  # 6 items through a queue of 2, none blocked for long
        await asyncio.wait_for(bp.add(1), 1.0)
    await settle()
    assert (out.calls, bp.pending, len(bp)) == (0, 6, 0)
    await bp.add(4)  # 10 units: out at once, the export hangs on the gate
    await settle()
    assert (out.calls, bp.pending) == (1, 7)
    bp.add_nowait(1)
    bp.add_nowait(1)
    with pytest.raises(asyncio.QueueFull):
        bp.add_nowait(1)
    blocked = asyncio.create_task(bp.add(2))
    await settle()
    assert not blocked.done()  # backpressure while the export is in flight
    gate.set()
    await asyncio.wait_for(blocked, 1.0)
    assert await bp.force_flush(1.0) is True
    assert out.batches == [[1, 1, 1, 1, 1, 1, 4], [1, 1, 2]]


async def test_unit_cut_delay_starts_when_the_first_item_is_taken() -> None:
    # _coalesce's deadline starts when the writer takes the first batch, not when it
    # was queued: an item that waited behind a slow export still lingers the full delay.
    # Mutations caught: timing the delay from the add (the item goes out at once when
    # the gate opens), ignoring the delay (waits forever below the trigger).
    gate = asyncio.Event()
    out: InMemoryExporter[int] = InMemoryExporter(gate=gate)
    bp = BatchProcessor(out, max_queue_size=4, schedule_delay_s=0.2, max_export_units=100,
                        export_trigger_units=10, size_of=units)
    await bp.start()
    await bp.add(10)
    await settle()
    await bp.add(1)
    await asyncio.sleep(0.3)  # the 1 has waited longer than the delay, behind the export
    loop = asyncio.get_running_loop()
    t1 = loop.time()
    gate.set()
    await settle()
    assert out.batches == [[10]]
    await until(lambda: len(out.batches) == 2)
    assert loop.time() - t1 >= 0.2
    assert out.batches == [[10], [1]]
    await bp.shutdown()


async def test_raise_on_exception_ends_the_export_task_and_raises_to_the_stream(
        caplog: pytest.LogCaptureFixture) -> None:
    # A bug in export (an exception, not a FAILURE result) is not retried forever:
    # add / raise_if_failed raise it, force_flush says False, shutdown does not hang.
    # Mutations caught: retrying the exception (no raise, retries > 0), add blocking
    # forever on a dead task, add_nowait raising it, shutdown re-raising the bug.
    class Buggy(InMemoryExporter[int]):
        async def export(self, items: object) -> ExportResult:
            self.calls += 1
            raise KeyError("bug")

    out = Buggy()
    rec = Recorder()
    bp = BatchProcessor(out, max_queue_size=1, schedule_delay_s=0, max_export_units=1,
                        raise_on_exception=True, size_of=units, sleep=rec)
    await bp.start()
    with caplog.at_level(logging.ERROR, "driftline.sinks.batch"):
        await bp.add(1)
        await settle()
    assert (out.calls, bp.retries, rec.delays) == (1, 0, [])
    assert "a bug, the export task ends" in caplog.text
    with pytest.raises(RuntimeError, match="the export task ended on an exception") as e:
        bp.raise_if_failed()
    assert isinstance(e.value.__cause__, KeyError)
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(bp.add(2), 1.0)
    assert (await bp.force_flush(1.0), bp.pending, bp.exported) == (False, 1, 0)
    bp.add_nowait(3)  # offered only (the worker's revocation): queued, the bug not raised here
    with caplog.at_level(logging.WARNING, "driftline.sinks.batch"):
        await asyncio.wait_for(bp.shutdown(timeout_s=None), 1.0)
    assert out.is_shut_down
    assert "batch: 2 item(s) not exported at shutdown" in caplog.text


async def test_raise_on_exception_still_retries_a_failure_result() -> None:
    # Mutation caught: raise_on_exception giving up on FAILURE results (a sink failure).
    out: InMemoryExporter[int] = InMemoryExporter(fail_next=2)
    rec = Recorder()
    bp = BatchProcessor(out, max_queue_size=4, schedule_delay_s=0, max_export_units=5,
                        raise_on_exception=True, size_of=units, sleep=rec)
    await bp.start()
    await bp.add(5)
    await until(lambda: bool(out.batches))
    assert (out.batches, out.calls, bp.retries, rec.delays) == ([[5]], 3, 10, [0.1, 0.2])
    bp.raise_if_failed()
    await bp.shutdown()


async def test_shutdown_without_a_time_limit_waits_for_a_slow_export() -> None:
    # Mutation caught: timeout_s=None taken as 0 (the batch abandoned at shutdown).
    gate = asyncio.Event()
    out: InMemoryExporter[int] = InMemoryExporter(gate=gate)
    bp = BatchProcessor(out, max_queue_size=4, schedule_delay_s=60, max_export_units=100, size_of=units)
    await bp.start()
    await bp.add(3)
    stopping = asyncio.create_task(bp.shutdown(timeout_s=None))
    await asyncio.sleep(0.1)
    assert not stopping.done()
    gate.set()
    await asyncio.wait_for(stopping, 1.0)
    assert (out.batches, bp.exported, out.is_shut_down) == ([[3]], 3, True)


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
    ({"max_export_units": 0}, "max_export_units must be >= 1 or None"),
    ({"export_trigger_units": 5}, "export_trigger_units needs max_export_units"),
    ({"max_export_units": 4, "export_trigger_units": 5}, r"export_trigger_units must be in \[0, max_export_units=4\]"),
    ({"on_full": "drop_oldest", "raise_on_exception": True}, "raise_on_exception is for on_full='block'"),
])
def test_bad_config_is_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchProcessor(InMemoryExporter(), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        BatchConfig(**kwargs)  # type: ignore[arg-type]
