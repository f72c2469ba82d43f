"""One bounded batch processor for every sink, shaped like OpenTelemetry's.

A sink is an *exporter* with the OpenTelemetry SDK's three methods, async because our
sinks do I/O on the event loop::

    await exporter.export(items) -> ExportResult | bool | None   # FAILURE / False: failed
    await exporter.force_flush(timeout_s) -> bool
    await exporter.shutdown()

(a raised exception is a failure too). :class:`BatchProcessor` sits between the stream
and an exporter, as ``opentelemetry.sdk._shared_internal.BatchProcessor`` does for spans
and logs: a bounded queue; a batch goes out when ``max_export_batch_size`` items wait or
when the oldest item has waited ``schedule_delay_s``; ``force_flush`` exports what is
queued now; ``shutdown`` exports what is queued, then stops and shuts the exporter down.

Where OpenTelemetry always drops (telemetry may be lost), a sink here says what it
requires with ``on_full``:

``"block"``
    the sink must not lose data: :meth:`BatchProcessor.add` waits while the queue is full
    (backpressure up the stream), and a failed export is retried with exponential backoff
    until it succeeds (or ``shutdown``'s time runs out, logged with the count lost).
``"drop_oldest"``
    the stream must never wait on the sink: a full queue drops its oldest item, and a
    failed export is given up after ``max_attempts`` (default 1); both are counted
    (``dropped``, ``failed`` and the optional Prometheus counters) and logged, never
    raised into the stream.

Counts are in *units*: ``size_of(item)``, 1 per item unless given (a notifier's queue
holds batches of alerts and counts alerts).

Batches cut by units (``max_export_units``, for the worker's write step, whose items are
fetched batches of very different sizes): the export task takes waiting items into the
batch it forms as soon as it is free, as a writer pulling from an ``asyncio.Queue``
would, so they no longer count against ``max_queue_size``; it keeps taking while the
batch holds fewer than ``max_export_units`` units (the last item taken may pass it). A
batch of at least ``export_trigger_units`` goes out at once; a smaller one waits for
more until ``schedule_delay_s`` after its *first item was taken* (not added: while an
export runs, the next batch's items wait in the queue, and their delay starts after it).

``raise_on_exception`` (``block`` only): an exception raised by ``export`` is taken for a
bug, not a sink failure (a sink that retries inside, as the ClickHouse sink does,
never raises): it ends the export task instead of being retried, and :meth:`add` and
:meth:`raise_if_failed` raise it (not ``add_nowait``: a callback that only offers an
item, as the worker's revocation does, is not where a writer bug is handled). A
``FAILURE`` result is still retried.

Why not the OpenTelemetry SDK class itself: it runs a worker *thread* per processor
and its exporters are synchronous, while ours do their I/O on the worker's event loop
(aiohttp, the ClickHouse sink's async lanes); it only drops, never applies
backpressure; and it lives in a private module (``_shared_internal``) typed for spans
and log records. This is the same algorithm in ~200 lines of asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar, runtime_checkable

__all__ = [
    "BatchConfig",
    "BatchProcessor",
    "Exporter",
    "ExportResult",
    "InMemoryExporter",
    "TableExporter",
    "export_failed",
]

log = logging.getLogger("driftline.sinks.batch")

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)

OnFull = Literal["block", "drop_oldest"]


class ExportResult(enum.Enum):
    """What an export returns (OpenTelemetry's ``SpanExportResult``); ``True``/``None`` also mean success."""

    SUCCESS = "success"
    FAILURE = "failure"


def export_failed(result: object) -> bool:
    """True when an exporter's return value means failure (``ExportResult.FAILURE`` or ``False``)."""
    return result is False or result is ExportResult.FAILURE


@runtime_checkable
class Exporter(Protocol[T_contra]):
    """What :class:`BatchProcessor` drives (the OpenTelemetry exporter shape, async)."""

    async def export(self, items: Sequence[T_contra]) -> ExportResult | bool | None: ...

    async def force_flush(self, timeout_s: float = 30.0) -> bool: ...

    async def shutdown(self) -> None: ...


class _Inc(Protocol):
    """A Prometheus counter child (anything with ``inc(amount)``)."""

    def inc(self, amount: float = 1) -> None: ...


class InMemoryExporter(Generic[T]):
    """Keeps every batch it is given, for tests.

    ``fail_next`` exports fail first (returning ``ExportResult.FAILURE``); while ``gate`` is
    given and not set, ``export`` waits for it (a sink that hangs).
    """

    def __init__(self, *, fail_next: int = 0, gate: asyncio.Event | None = None) -> None:
        self.fail_next = fail_next
        self.gate = gate
        self.batches: list[list[T]] = []
        self.calls = 0
        self.is_shut_down = False

    @property
    def exported(self) -> list[T]:
        """Every item exported, in order."""
        return [x for b in self.batches for x in b]

    async def export(self, items: Sequence[T]) -> ExportResult:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next > 0:
            self.fail_next -= 1
            return ExportResult.FAILURE
        self.batches.append(list(items))
        return ExportResult.SUCCESS

    async def force_flush(self, timeout_s: float = 30.0) -> bool:
        return True

    async def shutdown(self) -> None:
        self.is_shut_down = True


class _RowSink(Protocol):
    """A stage's :class:`~driftline.streams.ports.TableWriter` (what TableExporter writes with)."""

    async def insert_rows(self, table: str, rows: Sequence[dict[str, Any]],
                          columns: Sequence[str]) -> None: ...


class TableExporter:
    """Exports rows (dicts) into one ClickHouse table through a stage's ``TableWriter``.

    The writer retries inside the sink until ClickHouse takes the rows; ``tables`` may be
    given after construction (a stage gets its ports in ``start``). Shutting down leaves
    the sink alone: the worker owns it.
    """

    def __init__(self, table: str, columns: Sequence[str], tables: _RowSink | None = None) -> None:
        self.table = table
        self.columns = tuple(columns)
        self.tables = tables

    async def export(self, items: Sequence[dict[str, Any]]) -> ExportResult:
        if self.tables is None:
            raise RuntimeError(f"TableExporter({self.table!r}) has no table writer yet")
        await self.tables.insert_rows(self.table, items, self.columns)
        return ExportResult.SUCCESS

    async def force_flush(self, timeout_s: float = 30.0) -> bool:
        return True

    async def shutdown(self) -> None:
        return None


@dataclass(frozen=True)
class BatchConfig:
    """A :class:`BatchProcessor`'s settings (OpenTelemetry's names, seconds not millis).

    Parameters
    ----------
    max_queue_size
        Items waiting at most (the batch being exported is not counted).
    max_export_batch_size
        Items in one export at most; a batch goes out as soon as this many wait.
    schedule_delay_s
        A batch goes out when its oldest item has waited this long (0: at once).
    on_full
        ``"block"`` (backpressure, retry failed exports until they succeed) or
        ``"drop_oldest"`` (drop and count; failed exports counted, not retried).
    backoff_initial_s, backoff_max_s, jitter
        Retry delay after failed attempt ``k``: ``min(backoff_max_s, backoff_initial_s * 2**(k-1))``
        scaled by a uniform factor in ``[1 - jitter, 1]``.
    max_attempts
        ``drop_oldest`` only: attempts per batch before it is given up (None: 1). ``block``
        never gives up a batch.
    export_timeout_s
        An export that takes longer is a failed attempt (None: no limit).
    max_export_units
        Cut batches by units instead of items (see the module docstring): items are taken
        into a batch while it holds fewer units; ``max_export_batch_size`` is then unused.
    export_trigger_units
        With ``max_export_units``: a batch of at least this many units goes out at once
        (None: ``max_export_units``); a smaller one after ``schedule_delay_s``.
    raise_on_exception
        ``block`` only: an exception from ``export`` ends the export task and is raised
        to the stream (a bug), instead of being retried.
    """

    max_queue_size: int = 2048
    max_export_batch_size: int = 512
    schedule_delay_s: float = 5.0
    on_full: OnFull = "block"
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 10.0
    jitter: float = 0.0
    max_attempts: int | None = None
    export_timeout_s: float | None = None
    max_export_units: int | None = None
    export_trigger_units: int | None = None
    raise_on_exception: bool = False

    def __post_init__(self) -> None:
        if self.max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {self.max_queue_size}")
        if self.max_export_units is None and not 1 <= self.max_export_batch_size <= self.max_queue_size:
            raise ValueError(f"max_export_batch_size must be in [1, max_queue_size={self.max_queue_size}], "
                             f"got {self.max_export_batch_size}")
        if not self.schedule_delay_s >= 0:
            raise ValueError(f"schedule_delay_s must be >= 0, got {self.schedule_delay_s}")
        if self.on_full not in ("block", "drop_oldest"):
            raise ValueError(f"on_full must be 'block' or 'drop_oldest', got {self.on_full!r}")
        if not 0 <= self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError("need 0 <= backoff_initial_s <= backoff_max_s, got "
                             f"{self.backoff_initial_s} and {self.backoff_max_s}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")
        if self.max_attempts is not None:
            if self.on_full == "block":
                raise ValueError("max_attempts is for on_full='drop_oldest'; 'block' retries until the export succeeds")
            if self.max_attempts < 1:
                raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.export_timeout_s is not None and not self.export_timeout_s > 0:
            raise ValueError(f"export_timeout_s must be > 0 or None, got {self.export_timeout_s}")
        self._check_units()

    def _check_units(self) -> None:
        if self.max_export_units is not None and self.max_export_units < 1:
            raise ValueError(f"max_export_units must be >= 1 or None, got {self.max_export_units}")
        if self.export_trigger_units is not None:
            if self.max_export_units is None:
                raise ValueError("export_trigger_units needs max_export_units")
            if not 0 <= self.export_trigger_units <= self.max_export_units:
                raise ValueError(f"export_trigger_units must be in [0, max_export_units={self.max_export_units}], "
                                 f"got {self.export_trigger_units}")
        if self.raise_on_exception and self.on_full != "block":
            raise ValueError("raise_on_exception is for on_full='block' ('drop_oldest' counts failures)")

    @property
    def trigger_units(self) -> int:
        """Units that send a forming batch at once (unit-cut batches only)."""
        if self.export_trigger_units is not None:
            return self.export_trigger_units
        return self.max_export_units or 0

    def backoff_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay before retry number ``attempt`` (1-based); ``rng`` draws the jitter."""
        base = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (attempt - 1))
        if self.jitter and rng is not None:
            base *= 1 - self.jitter * rng.random()
        return float(base)


class BatchProcessor(Generic[T]):
    """Batches items into an exporter on the running event loop; see the module docstring.

    Not thread-safe: call :meth:`add` / :meth:`add_nowait` on the loop (from another
    thread, via ``loop.call_soon_threadsafe``). Items may be added before :meth:`start`;
    they go out once it runs.

    Parameters
    ----------
    exporter
        The sink.
    max_queue_size, max_export_batch_size, schedule_delay_s, on_full, backoff_initial_s, \
    backoff_max_s, jitter, max_attempts, export_timeout_s, max_export_units, \
    export_trigger_units, raise_on_exception
        See :class:`BatchConfig` (validated there: ``ValueError`` on a bad value).
    drops_counter
        Incremented by the units dropped (queue full, or added after shutdown).
    failures_counter, retries_counter, exported_counter
        Incremented by the units of a batch given up (``drop_oldest`` only) / of a failed
        attempt that will be retried / of an exported batch.
    size_of
        Units of one item (default 1).
    name
        For logs and the task name.
    rng
        Draws the backoff jitter.
    sleep
        ``asyncio.sleep``, replaceable in tests (the retry backoff).

    Examples
    --------
    >>> async def demo() -> list[list[int]]:
    ...     out: InMemoryExporter[int] = InMemoryExporter()
    ...     bp = BatchProcessor(out, max_queue_size=8, max_export_batch_size=2, schedule_delay_s=60)
    ...     await bp.start()
    ...     for i in range(5):
    ...         await bp.add(i)
    ...     await bp.shutdown()
    ...     return out.batches
    >>> asyncio.run(demo())
    [[0, 1], [2, 3], [4]]
    """

    def __init__(self, exporter: Exporter[T], *, max_queue_size: int = 2048,
                 max_export_batch_size: int = 512, schedule_delay_s: float = 5.0,
                 on_full: OnFull = "block", drops_counter: _Inc | None = None,
                 failures_counter: _Inc | None = None, retries_counter: _Inc | None = None,
                 exported_counter: _Inc | None = None,
                 size_of: Callable[[T], int] | None = None, name: str = "batch",
                 backoff_initial_s: float = 0.1, backoff_max_s: float = 10.0, jitter: float = 0.0,
                 max_attempts: int | None = None, export_timeout_s: float | None = None,
                 max_export_units: int | None = None, export_trigger_units: int | None = None,
                 raise_on_exception: bool = False, bound_in_flight: bool = False,
                 rng: random.Random | None = None,
                 sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        #: ``max_queue_size`` bounds the items waiting *and* those being exported (a memory
        #: bound): under ``drop_oldest`` a full processor with nothing waiting drops the new item
        self.bound_in_flight = bound_in_flight
        self.config = BatchConfig(max_queue_size, max_export_batch_size, schedule_delay_s, on_full,
                                  backoff_initial_s, backoff_max_s, jitter, max_attempts, export_timeout_s,
                                  max_export_units, export_trigger_units, raise_on_exception)
        self.exporter = exporter
        self.name = name
        self._drops_counter = drops_counter
        self._failures_counter = failures_counter
        self._retries_counter = retries_counter
        self._rng = rng or random.Random()
        self._exported_counter = exported_counter
        self._size_of = size_of
        self._sleep = sleep
        #: (loop time added, item), oldest first
        self._queue: deque[tuple[float, T]] = deque()
        self._in_flight = 0
        #: adds waiting for room (backpressure): :meth:`drain` waits for their items too
        self._waiting_adds = 0
        #: unit-cut batches: the batch being formed (taken off the queue, not yet exported)
        self._forming: list[T] = []
        self._forming_units = 0
        self._forming_since = 0.0
        self._error: BaseException | None = None
        self._wake = asyncio.Event()
        self._not_full = asyncio.Event()
        self._progress = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._abandon = False
        self._is_shut_down = False
        # items ever queued / taken off the queue (exported or dropped) / settled (done with)
        self._added = 0
        self._taken = 0
        self._settled = 0
        self._flush_to = 0
        #: units exported, dropped (queue full or after shutdown), failed (given up), retried
        self.exported = 0
        self.dropped = 0
        self.failed = 0
        self.retries = 0

    # ------------------------------------------------------------------ queue
    def __len__(self) -> int:
        """Items waiting (not counting the batch being exported)."""
        return len(self._queue)

    def queued(self) -> list[T]:
        """The items waiting, oldest first (for tests and inspection)."""
        return [item for _, item in self._queue]

    @property
    def pending(self) -> int:
        """Items not yet exported: waiting plus in flight (or being formed)."""
        return len(self._queue) + self._in_flight + len(self._forming)

    def _units(self, item: T) -> int:
        return 1 if self._size_of is None else int(self._size_of(item))

    def _put(self, item: T) -> None:
        loop_time = asyncio.get_running_loop().time() if _has_loop() else 0.0
        self._queue.append((loop_time, item))
        self._added += 1
        n = len(self._queue)
        if self._task is not None and (n == 1 or n >= self.config.max_export_batch_size
                                       or self.config.max_export_units is not None):
            self._wake.set()  # a delay starts, or a batch is full

    def _drop(self, item: T, why: str) -> None:
        n = self._units(item)
        self.dropped += n
        if self._drops_counter is not None:
            self._drops_counter.inc(n)
        log.warning("%s: %s, dropped %d", self.name, why, n)

    def add_nowait(self, item: T) -> None:
        """Queue ``item`` without waiting.

        Under ``drop_oldest`` a full queue drops (and counts) its oldest item; under
        ``block`` a full queue raises :class:`asyncio.QueueFull`. After shutdown the item
        is dropped and counted.
        """
        if self._closing:
            self._drop(item, "added after shutdown")
            return
        held = len(self._queue) + (self._in_flight + len(self._forming) if self.bound_in_flight else 0)
        if held >= self.config.max_queue_size:
            if self.config.on_full == "block":
                raise asyncio.QueueFull
            if not self._queue:  # all held rows are being exported: the new one goes
                self._drop(item, "full while exporting, the new item")
                return
            _, oldest = self._queue.popleft()
            self._taken += 1
            self._settle(1)
            self._drop(oldest, "queue full, the oldest item")
        self._put(item)

    async def add(self, item: T) -> None:
        """Queue ``item``; under ``block`` wait while the queue is full (backpressure).

        Raises the export task's exception once it ended on one (``raise_on_exception``):
        a stream waiting on a dead export task would wait forever.
        """
        if self.config.on_full == "block":
            self._waiting_adds += 1
            try:
                while (len(self._queue) >= self.config.max_queue_size and not self._closing
                       and self._error is None):
                    self._not_full.clear()
                    await self._not_full.wait()
            finally:
                self._waiting_adds -= 1
        self.raise_if_failed()
        self.add_nowait(item)

    async def drain(self, timeout_s: float) -> bool:
        """Export everything queued *and* every item an :meth:`add` is waiting to queue
        (backpressure), then flush the exporter; False when that did not finish within
        ``timeout_s``. Unlike :meth:`force_flush`, the items of the adds blocked now count:
        a stream held back by a full queue has already processed them (like
        ``asyncio.Queue.join``, which also waits for the puts that land meanwhile)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if not self.pending and not self._waiting_adds:
                return True
            if not await self.force_flush(max(0.0, deadline - loop.time())):
                return False
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0)  # let the unblocked adds queue their items

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the export task on the running loop (idempotent)."""
        if self._task is None and not self._is_shut_down:
            # items queued before the loop ran carry time 0: they are due at once
            self._task = asyncio.create_task(self._main(), name=f"driftline-batch-{self.name}")
            self._wake.set()

    @property
    def started(self) -> bool:
        return self._task is not None

    def raise_if_failed(self) -> None:
        """Raise the exception that ended the export task (``raise_on_exception``), if any."""
        if self._error is not None:
            raise RuntimeError(f"{self.name}: the export task ended on an exception") from self._error

    def _settle(self, n: int) -> None:
        self._settled += n
        self._progress.set()

    async def _wait_settled(self, target: int, timeout_s: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._settled < target:
            left = deadline - loop.time()
            if left <= 0 or self._task is None or self._task.done():
                return False
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), left)
        return True

    async def force_flush(self, timeout_s: float = 30.0) -> bool:
        """Export everything queued now (not waiting for the delay), then flush the exporter.

        False when that did not finish within ``timeout_s``, or after shutdown.
        """
        if self._is_shut_down or self._closing or self._error is not None:
            return False
        if self._task is None:
            await self.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        target = self._added
        self._flush_to = max(self._flush_to, target)
        self._wake.set()
        if not await self._wait_settled(target, timeout_s):
            return False
        return bool(await self.exporter.force_flush(max(0.0, deadline - loop.time())))

    async def shutdown(self, timeout_s: float | None = 30.0) -> None:
        """Export what is queued (within ``timeout_s``; None: as long as it takes), stop,
        and shut the exporter down.

        Items still queued when the time runs out are logged as lost; items added
        afterwards are dropped and counted.
        """
        if self._is_shut_down:
            return
        self._closing = True
        if self._task is None and self._queue:
            self._task = asyncio.create_task(self._main(), name=f"driftline-batch-{self.name}")
        self._wake.set()
        self._not_full.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except (TimeoutError, Exception):  # noqa: BLE001 - logged below, never raised
                self._abandon = True
                if self.pending:
                    log.warning("%s: %d item(s) not exported at shutdown", self.name, self.pending)
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._task
        self._is_shut_down = True
        try:
            await self.exporter.shutdown()
        except Exception:  # noqa: BLE001 - a sink failure is logged, never raised
            log.exception("%s: exporter shutdown failed", self.name)

    # ------------------------------------------------------------------ the export task
    def _due(self, now: float) -> float | None:
        """Seconds until the next batch is due (0: now), None when nothing waits."""
        if not self._queue:
            return None
        if (len(self._queue) >= self.config.max_export_batch_size or self._closing
                or self._taken < self._flush_to):
            return 0.0
        return max(0.0, self._queue[0][0] + self.config.schedule_delay_s - now)

    async def _main(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._error = e  # raise_on_exception: add / raise_if_failed raise it
            self._not_full.set()
            self._progress.set()
            raise

    async def _run(self) -> None:
        """The export task: wait until a batch is due, cut it, export it; count-cut
        batches (:meth:`_due`, :meth:`_cut`) or unit-cut ones (:meth:`_units_due`,
        :meth:`_cut_units`, see the module docstring)."""
        loop = asyncio.get_running_loop()
        units = self.config.max_export_units is not None
        while True:
            now = loop.time()
            if units:
                self._take_units(now)
            due = self._units_due(now) if units else self._due(now)
            if due is None and self._closing:
                return
            if due is None or due > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), due)
                continue
            batch = self._cut_units() if units else self._cut()
            self._in_flight = len(batch)
            await self._export(batch)  # raised (raise_on_exception): not exported, never settled
            self._in_flight = 0
            self._settle(len(batch))

    def _cut(self) -> list[T]:
        """Take the next count-cut batch off the queue (it frees room for waiting adds)."""
        n = min(self.config.max_export_batch_size, len(self._queue))
        batch = [self._queue.popleft()[1] for _ in range(n)]
        self._taken += n
        self._not_full.set()
        return batch

    def _take_units(self, now: float) -> None:
        """Move waiting items into the forming batch while it holds fewer than
        ``max_export_units`` units (its first item always)."""
        limit = self.config.max_export_units or 0
        while self._queue and (not self._forming or self._forming_units < limit):
            if not self._forming:
                self._forming_since = now
            item = self._queue.popleft()[1]
            self._forming.append(item)
            self._forming_units += self._units(item)
            self._taken += 1
            self._not_full.set()

    def _units_due(self, now: float) -> float | None:
        """Seconds until the forming batch goes out (0: now), None when it is empty."""
        if not self._forming:
            return None
        if (self._forming_units >= self.config.trigger_units or self._closing
                or self._settled < self._flush_to):
            return 0.0
        return max(0.0, self._forming_since + self.config.schedule_delay_s - now)

    def _cut_units(self) -> list[T]:
        """The forming batch, handed over whole (a new one starts empty)."""
        batch = self._forming
        self._forming, self._forming_units = [], 0
        return batch

    async def _export(self, batch: list[T]) -> None:
        cfg = self.config
        units = sum(self._units(x) for x in batch)
        limit = (cfg.max_attempts or 1) if cfg.on_full == "drop_oldest" else None
        attempt = 0
        while True:
            attempt += 1
            try:
                if cfg.export_timeout_s is None:
                    result = await self.exporter.export(batch)
                else:
                    result = await asyncio.wait_for(self.exporter.export(batch), cfg.export_timeout_s)
                failed = export_failed(result)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a sink failure never kills the stream
                if cfg.raise_on_exception:
                    log.exception("%s: export of %d item(s) raised: a bug, the export task ends",
                                  self.name, len(batch))
                    raise
                log.exception("%s: export of %d item(s) raised", self.name, len(batch))
                failed = True
            if not failed:
                self.exported += units
                if self._exported_counter is not None:
                    self._exported_counter.inc(units)
                return
            if limit is not None and attempt >= limit:
                self.failed += units
                if self._failures_counter is not None:
                    self._failures_counter.inc(units)
                log.error("%s: giving up on %d item(s) after %d attempt(s)", self.name, len(batch), attempt)
                return
            if self._abandon:
                return
            self.retries += units
            if self._retries_counter is not None:
                self._retries_counter.inc(units)
            delay = cfg.backoff_s(attempt, self._rng)
            log.warning("%s: export of %d item(s) failed (attempt %d), retrying in %.2fs",
                        self.name, len(batch), attempt, delay)
            await self._sleep(delay)


def _has_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
