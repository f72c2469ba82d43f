"""The ports a worker stage is given: exactly what it uses, never the whole worker.

A stage (alerting, drift: see :class:`~driftline.streams.worker.Stage`) gets one
:class:`StagePorts` in ``start``:

- ``tables``    writes to the stage's own tables and reads on the sink's *query*
                lane (the write step of the spine has its own ingest lane);
- ``metrics``   the worker's metrics (``stage_errors``, ``control_refused``,
                ``observe_drift``), on the registry the stage's own metrics share;
- ``windows``   a read-only view of the worker's open windows (watermark, window
                size, the windows changed since the last look);
- ``kafka``     the bootstrap servers and TLS/SASL settings, for a stage that
                reads a topic of its own;
- ``control``   the secret and age limit control commands are checked with;
- ``redaction`` what the stage must do to texts it writes or shows;
- ``clock``     wall time in seconds (``time.time``), replaceable in tests;
- ``topics``    the input topics of the worker's consumer group (the same in every
                worker of the group: what a stage may pick a partition of).

The worker builds the ports (``Worker.ports_for``); the links between stages are
explicit and made in the wiring (streams/wiring.py), not looked up by name.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from driftline.detectors.redact import Redaction
from driftline.streams.ingest.kafka_security import KafkaSecurity

if TYPE_CHECKING:
    from driftline.schemas.window_stats import WindowStats
    from driftline.streams.sinks.clickhouse import ClickHouseSink
    from driftline.streams.sinks.prometheus import WorkerMetrics
    from driftline.streams.stages.windows import WindowAggregator

__all__ = ["StagePorts", "TableWriter", "WindowView", "KafkaPort", "ControlAuth"]


class TableWriter:
    """A stage's writer: inserts only into ``tables``, reads on the sink's query lane.

    Inserts are retried inside the sink until ClickHouse takes them (sinks.py); an
    insert into a table the stage was not given raises ``ValueError``.
    """

    def __init__(self, sink: ClickHouseSink | None, tables: Sequence[str]) -> None:
        self._sink_or_none = sink
        self.tables = frozenset(tables)

    @property
    def _sink(self) -> ClickHouseSink:
        if self._sink_or_none is None:
            raise RuntimeError("these ports have no ClickHouse (StagePorts.detached)")
        return self._sink_or_none

    @property
    def database(self) -> str:
        """The database the tables live in (for the stage's own reads)."""
        return self._sink.database

    def _check(self, table: str) -> None:
        if table not in self.tables:
            raise ValueError(f"this stage does not write {table!r} (its tables: {sorted(self.tables)})")

    async def insert_rows(self, table: str, rows: Sequence[dict[str, Any]], columns: Sequence[str], *,
                          token: str | None = None) -> None:
        """Insert ``rows`` (dicts) into one of the stage's tables. ``token``: the insert's
        deduplication token (another insert with the same token is dropped by ClickHouse)."""
        self._check(table)
        await self._sink.insert_rows(table, rows, columns, token=token)

    async def insert_columns(self, table: str, columns: dict[str, list[Any]]) -> None:
        """Insert equal-length ``columns`` into one of the stage's tables."""
        self._check(table)
        await self._sink.insert_columns(table, columns)

    def query(self, sql: str, parameters: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """The rows of ``sql``, run on the query lane (blocks: call it off the event loop).

        Values go in ``parameters``, named by ``{name:Type}`` placeholders in ``sql``
        (``{db:Identifier}`` for a name): ClickHouse binds them on the server (chDB and
        HTTP alike), so the SQL text never holds a quoted value."""
        params = dict(parameters) if parameters else None
        rows: list[tuple[Any, ...]] = self._sink.call(lambda c: c.query(sql, parameters=params).result_rows)
        return rows

    def raw_query(self, sql: str, parameters: Mapping[str, Any] | None = None, fmt: str = "JSONEachRow") -> bytes:
        """The result of ``sql`` as ClickHouse formats it (``fmt``), on the query lane
        (blocks: call it off the event loop); values bound as in :meth:`query`."""
        params = dict(parameters) if parameters else None
        return bytes(self._sink.call(lambda c: c.raw_query(sql, parameters=params, fmt=fmt)))

    async def aquery(self, sql: str, parameters: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """The rows of ``sql`` with ``parameters`` (as :meth:`query`), run on the query lane and awaited."""
        params = dict(parameters) if parameters else None
        rows: list[tuple[Any, ...]] = await self._sink.acall(
            lambda c: c.query(sql, parameters=params).result_rows)
        return rows


class WindowView:
    """A read-only view of the worker's open windows.

    ``current`` returns the worker's aggregator *now* (a rebalance replaces it), so the
    view follows it. ``peek`` uses the aggregator's own change marks for peeking, which
    leave the worker's partial rows untouched.
    """

    def __init__(self, current: Callable[[], WindowAggregator | None],
                 held: Callable[[], bool] = lambda: False) -> None:
        self._current = current
        self._held = held

    def held(self) -> bool:
        """True while the worker is cut off from its input (fetches unanswered, nothing
        assigned, or paused behind the writer): no data then says nothing about traffic."""
        return bool(self._held())

    @property
    def size_ms(self) -> int | None:
        """The window length in ms (None without an aggregator)."""
        agg = self._current()
        return agg.config.size_ms if agg is not None else None

    @property
    def watermark_ms(self) -> int | None:
        """The stream's event-time watermark (None before any event)."""
        agg = self._current()
        return agg.watermark_ms if agg is not None else None

    def peek(self) -> list[WindowStats]:
        """The open windows changed since the last ``peek`` (partial stats)."""
        agg = self._current()
        return list(agg.peek()) if agg is not None else []


@dataclass(frozen=True)
class KafkaPort:
    """Where a stage's own consumer connects, with the worker's TLS/SASL settings."""

    bootstrap: str
    security: KafkaSecurity = field(default_factory=KafkaSecurity)


@dataclass(frozen=True)
class ControlAuth:
    """How control commands are checked (streams/ingest/control_auth.py): HMAC secret, age limit."""

    secret: bytes | None = field(default=None, repr=False)
    max_age_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_age_s is not None and not self.max_age_s > 0:
            raise ValueError("max_age_s must be > 0 (or None: any age)")


@dataclass(frozen=True)
class StagePorts:
    """Everything a stage may use; see the module docstring."""

    tables: TableWriter
    metrics: WorkerMetrics
    windows: WindowView
    kafka: KafkaPort
    control: ControlAuth = field(default_factory=ControlAuth)
    redaction: Redaction = field(default_factory=Redaction)
    clock: Callable[[], float] = time.time
    topics: tuple[str, ...] = ()

    @classmethod
    def detached(cls, *, windows: WindowAggregator | None = None, metrics: WorkerMetrics | None = None,
                 control: ControlAuth | None = None, held: Callable[[], bool] = lambda: False) -> StagePorts:
        """Ports without ClickHouse or Kafka, for unit tests: ``windows`` is the
        aggregator the view reads (none: no open windows); writes and reads raise."""
        from prometheus_client import CollectorRegistry

        from driftline.streams.sinks.prometheus import WorkerMetrics

        return cls(tables=TableWriter(None, ()),
                   metrics=metrics if metrics is not None else WorkerMetrics(CollectorRegistry()),
                   windows=WindowView(lambda: windows, held), kafka=KafkaPort(""),
                   control=control if control is not None else ControlAuth())
