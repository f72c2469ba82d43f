"""The ClickHouse sink: one clickhouse-connect client for chDB (``chdb:///path``) and
ClickHouse servers (``http://user:pass@host:8123/db``) alike.

Every call runs on one dedicated thread: chDB is in-process and a path can be
opened by one process at a time, so the worker's writes and the queries it
serves for other processes (streams/local/sql_endpoint.py) go through the same client in
order. Writes retry with exponential backoff while the error can pass
(network, timeouts, too many parts, memory: :func:`retryable`); the caller awaits
them, so a failing ClickHouse stops consumption (backpressure) instead of losing
data or crashing the worker. A batch that ClickHouse refuses for its data (type
mismatch, value out of range, parse error, constraint) is split in halves until the
offending rows are found; those are handed to ``on_rejected`` with ClickHouse's
message, the rest is stored.

Every insert carries an ``insert_deduplication_token`` (the caller's, derived from
the batch's source offsets, or one drawn per call), and every table keeps
``non_replicated_deduplication_window`` blocks: a retried insert that had in fact
succeeded, in whole or in part (each month partition of an insert is its own part),
stores nothing twice, on chDB and on a ClickHouse server alike. The halves of a
split insert get tokens of their own (``token/lo-hi``).
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from driftline.schemas.columns import WINDOW_COLUMNS
from driftline.streams.redact_secrets import redact_url, redact_urls_in
from driftline.streams.sinks.cluster import cluster_ddl_statements, cluster_of_dsn, on_cluster

log = logging.getLogger("driftline.sink")

__all__ = ["ClickHouseSink", "Retention", "ddl_statements", "resolve_dsn", "retryable", "WINDOW_COLUMNS"]

#: ClickHouse error codes that a retry cannot pass: the data itself is refused
#: (parse errors, type mismatch, out of range values, NULL in a plain column, constraint)
#: (32 and 33, "read after EOF" / "cannot read all data", are left out: a connection cut
#: in the middle of an insert raises them too, and valid rows must not go to the DLQ)
DATA_ERROR_CODES = frozenset({
    6, 26, 27, 38, 41, 53, 69, 70, 72, 117, 131, 190, 321, 349, 407, 469, 691,
})
_CODE = re.compile(r"Code: (\d+)\.")


def retryable(exc: BaseException) -> bool:
    """Whether a failed insert can pass when retried (network, timeout, too many parts,
    memory, ClickHouse restarting …), as opposed to data ClickHouse refuses."""
    from clickhouse_connect.driver.exceptions import DataError, ProgrammingError

    if isinstance(exc, DataError | ProgrammingError | OverflowError | ValueError | TypeError):
        return False  # clickhouse-connect could not serialise a value for its column
    msg = str(exc)
    if "Too many partitions for single INSERT block" in msg:
        return False  # one block spans too many months: only splitting it helps
    m = _CODE.search(msg)
    return not (m and int(m.group(1)) in DATA_ERROR_CODES)


DEFAULT_DATABASE = "driftline"


#: ``llm_events`` columns added after the table's first release, as ``ADD COLUMN IF NOT EXISTS``
#: clauses for stores created before them (placed where tables.sql has them; '' by default)
EVENT_COLUMNS_ADDED: tuple[str, ...] = (
    "agent_name LowCardinality(String) AFTER span_id",
    "agent_id String AFTER agent_name",
    "tool_name LowCardinality(String) AFTER agent_id",
)


def ddl_statements(database: str = DEFAULT_DATABASE) -> list[str]:
    """The packaged CREATE statements (schemas/tables.sql) for ``database``."""
    if not database.replace("_", "").isalnum():
        raise ValueError(f"database name {database!r}: letters, digits and _ only")
    text = importlib.resources.files("driftline.schemas").joinpath("tables.sql").read_text()
    out = []
    for chunk in text.split("\n;\n"):
        body = "\n".join(ln for ln in chunk.splitlines() if not ln.strip().startswith("--")).strip()
        if body:
            out.append(body.replace("{db}", database))
    return out


@dataclass(frozen=True)
class Retention:
    """How long the raw tables keep what they hold (ClickHouse TTLs; 0 = forever).

    ``text_days``: column TTL blanking the texts (``llm_events.prompt``/``response``/``extra``
    by event time, ``dlq_outbox.value`` by write time, ``drift_scores.explanation`` with
    its example texts by test time); the rows and their numbers stay. ``days``: row
    TTL on the raw rows, ``llm_events`` (event time) and ``dlq_outbox`` (write time).
    Aggregates without text (``llm_window_metrics``, ``alerts``), the drift tables
    (``llm_embeddings``, ``drift_references``: a pinned reference needs its
    embeddings) and the write log ``ingest_log`` (a restarted worker resumes after its
    last row per partition: expiring it would replay a partition from its start) are
    kept. ClickHouse applies a TTL when it merges parts (``merge_with_ttl_timeout``,
    4 h by default), so expired data can outlive its TTL by that long.
    """

    days: int = 0
    text_days: int = 0

    def __post_init__(self) -> None:
        for name in ("days", "text_days"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"retention {name} must be a whole number of days >= 0 (0: keep forever), got {v!r}")


#: (table, column or None for the row TTL, time expression, which Retention field)
_TTLS: tuple[tuple[str, str | None, str, str], ...] = (
    ("llm_events", "prompt", "toDateTime(timestamp)", "text_days"),
    ("llm_events", "response", "toDateTime(timestamp)", "text_days"),
    ("llm_events", "extra", "toDateTime(timestamp)", "text_days"),  # system instructions, tool calls ...
    ("dlq_outbox", "value", "toDateTime(written_at)", "text_days"),
    ("drift_scores", "explanation", "toDateTime(ts)", "text_days"),
    ("llm_events", None, "toDateTime(timestamp)", "days"),
    ("dlq_outbox", None, "toDateTime(written_at)", "days"),
)
_ROW_TTL_DAYS = re.compile(r"\bENGINE\b.*?\bTTL\b[^S]*?toIntervalDay\((\d+)\)", re.DOTALL)


def ttl_days(create_query: str, column: str | None) -> int:
    """The days of a ``… + toIntervalDay(N)`` TTL in a ``CREATE TABLE`` text
    (``system.tables.create_table_query``, or ``SHOW CREATE TABLE``): of
    ``column``, or the row TTL for None; 0 when there is none."""
    if column is None:
        m = _ROW_TTL_DAYS.search(create_query)
    else:
        m = re.search(rf"`{column}` [^,\n]*?\bTTL\b[^,\n]*?toIntervalDay\((\d+)\)", create_query)
    return int(m.group(1)) if m else 0


def retention_statements(database: str, current: dict[str, str], retention: Retention, *,
                         cluster: str | None = None) -> list[str]:
    """The ALTERs that bring the TTLs of the tables (``current``: name -> their
    ``create_table_query``) to ``retention``: none when they already match (idempotent).

    In cluster mode (``cluster``) the TTLs live on the Replicated ``<table>_local``
    tables (the Distributed tables store nothing), so the ALTERs go there, ``ON CLUSTER``,
    and ``current`` is read by the ``_local`` names."""
    out = []
    for table, column, expr, which in _TTLS:
        want = int(getattr(retention, which))
        name = table if cluster is None else f"{table}_local"
        have = ttl_days(current.get(name, ""), column)
        if want == have:
            continue
        full = f"{database}.{name}" + ("" if cluster is None else f" ON CLUSTER {on_cluster(cluster)}")
        if column is None:
            out.append(f"ALTER TABLE {full} MODIFY TTL {expr} + INTERVAL {want} DAY" if want
                       else f"ALTER TABLE {full} REMOVE TTL")
        else:
            out.append(f"ALTER TABLE {full} MODIFY COLUMN {column} TTL {expr} + INTERVAL {want} DAY" if want
                       else f"ALTER TABLE {full} MODIFY COLUMN {column} REMOVE TTL")
    return out


def resolve_dsn(dsn: str) -> tuple[str, str]:
    """(dsn for clickhouse-connect, database). ``chdb:///path`` or ``http(s)://…/db``."""
    u = urlparse(dsn)
    if u.scheme == "chdb":
        return dsn, DEFAULT_DATABASE
    if u.scheme in ("http", "https", "clickhouse", "clickhouses"):
        db = u.path.strip("/") or DEFAULT_DATABASE
        return dsn, db
    raise ValueError(f"ClickHouse DSN {redact_url(dsn)!r}: expected chdb:///path or http://user:pass@host:8123/db")


_warned_stores: set[str] = set()


def private_store(path: str | None) -> None:
    """Create an embedded store's directory owner-only (0700: it holds every prompt and
    response, and local users could otherwise read its files, whatever the SQL endpoint
    allows); an existing one open to group or others is left as it is, with one warning."""
    if not path:
        return
    p = Path(path).expanduser()
    if not p.exists():
        p.mkdir(parents=True, mode=0o700, exist_ok=True)
        p.chmod(0o700)  # mkdir's mode passes through the umask; parents keep the default
        return
    mode = p.stat().st_mode & 0o777
    if mode & 0o077 and str(p) not in _warned_stores:
        _warned_stores.add(str(p))
        log.warning("the embedded store %s is open to other local users (mode %o): it holds every stored "
                    "prompt and response; chmod 700 it", p, mode)


def chdb_path(dsn: str) -> str | None:
    u = urlparse(dsn)
    return (u.netloc + u.path) if u.scheme == "chdb" else None


class ClickHouseSink:
    """Writes events, window rows, drift scores and alerts; serves queries.

    Two lanes, each one thread with its own client (chDB serves two clients of one
    path in one process, concurrently): the *ingest* lane runs only the worker's
    write steps (``ingest=True``); everything else (stages' inserts, reads, the
    rebuild, ad-hoc SQL through ``call``/``acall``) runs on the *query* lane, whose
    client sets ``max_execution_time`` (``query_timeout_s``), so a slow query never
    stalls ingestion.

    Cluster mode (``?cluster=NAME`` on the DSN, :mod:`driftline.streams.sinks.cluster`):
    :meth:`ensure_schema` creates Replicated ``<t>_local`` and Distributed ``<t>`` tables
    ``ON CLUSTER``; every insert goes to the Distributed table with
    ``insert_distributed_sync=1`` (and ``insert_quorum`` when set); reads keep the plain
    names and so read every shard.
    """

    def __init__(self, dsn: str, database: str | None = None, *,
                 on_error: Callable[[str, BaseException], None] | None = None,
                 max_backoff_s: float = 15.0, query_timeout_s: float = 60.0,
                 retention: Retention | None = None) -> None:
        if query_timeout_s <= 0:
            raise ValueError("query_timeout_s must be > 0")
        self.dsn, db = resolve_dsn(dsn)
        self.database = database or db
        self.embedded = urlparse(dsn).scheme == "chdb"
        self.cluster = cluster_of_dsn(dsn)  # refuses a cluster on chdb://
        self._insert_settings: dict[str, Any] = dict(self.cluster.insert_settings()) if self.cluster else {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")
        self._ingest_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse-ingest")
        self._client: Any = None
        self._ingest_client: Any = None
        self._on_error = on_error
        self._max_backoff = max_backoff_s
        self.query_timeout_s = query_timeout_s
        self.retention = retention or Retention()

    # -- thread-confined primitives ---------------------------------------------------
    def _connect(self, settings: dict[str, Any]) -> Any:
        import clickhouse_connect

        if self.embedded:
            private_store(chdb_path(self.dsn))
            return clickhouse_connect.get_client(dsn=self.dsn, settings=settings)
        # connect without a database first: it may not exist yet
        u = urlparse(self.dsn)
        return clickhouse_connect.get_client(
            host=u.hostname or "localhost", port=u.port or (8443 if u.scheme.endswith("s") else 8123),
            username=unquote(u.username or "default"), password=unquote(u.password or ""),
            secure=u.scheme in ("https", "clickhouses"), database="default", settings=settings,
        )

    def _get(self) -> Any:
        if self._client is None:
            self._client = self._connect({"max_execution_time": int(max(1, round(self.query_timeout_s)))})
        return self._client

    def _get_ingest(self) -> Any:
        if self._ingest_client is None:
            self._ingest_client = self._connect({})
        return self._ingest_client

    def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(client)`` on the query lane and wait (synchronous callers)."""
        return self._pool.submit(lambda: fn(self._get())).result()

    async def acall(self, fn: Callable[[Any], Any], *, ingest: bool = False) -> Any:
        """Run ``fn(client)`` on the query lane (or the ingest lane) and await it."""
        loop = asyncio.get_running_loop()
        if ingest:
            return await loop.run_in_executor(self._ingest_pool, lambda: fn(self._get_ingest()))
        return await loop.run_in_executor(self._pool, lambda: fn(self._get()))

    # -- schema -------------------------------------------------------------------
    def ensure_schema(self) -> None:
        """Create the database and tables if missing, and set the TTLs of
        :attr:`retention` (idempotent: a TTL is altered only when it differs)."""
        stmts = ddl_statements(self.database)
        db = self.database
        if self.cluster is not None:
            self.call(lambda c: self._ensure_cluster_schema(c, stmts))
            return

        def run(c: Any) -> None:
            had_log = int(c.query(f"SELECT count() FROM system.tables WHERE database = '{db}' "
                                  "AND name = 'ingest_log'").result_rows[0][0]) > 0
            views = [s for s in stmts if s.startswith("CREATE OR REPLACE VIEW")]
            for s in stmts:
                if s not in views:
                    c.command(s)
            # columns added to llm_events later (agents and tools): before the views that read them
            for col in EVENT_COLUMNS_ADDED:
                c.command(f"ALTER TABLE {db}.llm_events ADD COLUMN IF NOT EXISTS {col}")
            for s in views:
                c.command(s)
            if not had_log:
                # a store written before the write log: log its highest stored offset per
                # partition once (no record to check: fingerprint (0, 0)), so a worker
                # resumes after it; with no log a partition is read from its beginning
                c.command(f"INSERT INTO {db}.ingest_log (source_topic, source_partition, epoch, first_offset, "
                          "last_offset, last_timestamp, last_fingerprint, dlq_start, written_at, watermark_ms) "
                          "SELECT source_topic, source_partition, 0, max(source_offset), max(source_offset), "
                          f"0, 0, '', now64(3), 0 FROM {db}.llm_events GROUP BY source_topic, source_partition")
            # tables created by an older version: turn on insert deduplication there too
            for t in c.query(f"SELECT name FROM system.tables WHERE database = '{db}' AND engine LIKE "
                             "'%MergeTree' AND create_table_query NOT LIKE '%non_replicated_deduplication%'"
                             ).result_rows:
                c.command(f"ALTER TABLE {db}.`{t[0]}` MODIFY SETTING non_replicated_deduplication_window = 1000")
            # a write log created before it carried the watermark
            c.command(f"ALTER TABLE {db}.ingest_log ADD COLUMN IF NOT EXISTS watermark_ms Int64 DEFAULT 0")
            current = {str(t): str(q) for t, q in c.query(
                f"SELECT name, create_table_query FROM system.tables WHERE database = '{db}'").result_rows}
            for stmt in retention_statements(db, current, self.retention):
                log.info("retention: %s", stmt)
                c.command(stmt)

        self.call(run)

    def _ensure_cluster_schema(self, c: Any, single_node: list[str]) -> None:
        """Cluster mode: the ``ON CLUSTER`` DDL and the TTLs on the ``_local`` tables. The
        upgrades of single-node stores (write log backfill, settings and columns added
        later) are not needed: cluster tables are created by this version, complete."""
        assert self.cluster is not None
        db, name = self.database, self.cluster.name
        for s in cluster_ddl_statements(single_node, name):
            c.command(s)
        current = {str(t): str(q) for t, q in c.query(
            f"SELECT name, create_table_query FROM system.tables WHERE database = '{db}'").result_rows}
        for stmt in retention_statements(db, current, self.retention, cluster=name):
            log.info("retention: %s", stmt)
            c.command(stmt)

    # -- writes with retry (backpressure) ----------------------------------------
    async def _retrying(self, what: str, fn: Callable[[Any], Any],
                        keepalive: Callable[[], Awaitable[None]] | None = None, ingest: bool = False) -> Any:
        delay = 0.2
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self.acall(fn, ingest=ingest)
            except Exception as exc:  # noqa: BLE001 - any sink failure that can pass is retried
                if self._on_error:
                    self._on_error(what, exc)
                if not retryable(exc):
                    raise
                log.warning("ClickHouse %s failed (attempt %d), retrying in %.1fs: %s",
                            what, attempt, delay, redact_urls_in(str(exc)))
                end = time.monotonic() + delay
                while time.monotonic() < end:
                    if keepalive is not None:
                        await keepalive()
                    await asyncio.sleep(min(0.5, max(0.0, end - time.monotonic())))
                delay = min(self._max_backoff, delay * 2) * (0.8 + 0.4 * random.random())

    async def insert_columns(self, table: str, columns: dict[str, list[Any]],
                             keepalive: Callable[[], Awaitable[None]] | None = None, *,
                             token: str | None = None, ingest: bool = False,
                             on_rejected: Callable[[list[int], str], None] | None = None) -> None:
        """Insert ``columns`` (equal-length lists) as one idempotent write.

        Rows ClickHouse refuses for their data are passed to ``on_rejected`` (their
        indices and ClickHouse's message) and left out; without ``on_rejected`` they are
        logged and dropped. Errors that can pass are retried until they do.
        """
        names = list(columns)
        data = [columns[n] for n in names]
        if not data or not data[0]:
            return
        full = f"{self.database}.{table}"

        def insert(c: Any, lo: int, hi: int, tok: str) -> None:
            c.insert(full, [d[lo:hi] for d in data], column_names=names, column_oriented=True,
                     settings={**self._insert_settings, "insert_deduplication_token": tok})

        await self._bisecting(table, len(data[0]), insert, keepalive, token, on_rejected, ingest)

    async def insert_arrow(self, table: str, build: Callable[[], Any],
                           keepalive: Callable[[], Awaitable[None]] | None = None, *,
                           token: str | None = None, ingest: bool = False,
                           on_rejected: Callable[[list[int], str], None] | None = None) -> None:
        """Insert the Arrow table that ``build()`` returns, as one ``ArrowStream`` block.

        ``build`` runs on the ClickHouse thread, so turning Python columns into
        Arrow overlaps with the stream's next batch; the bytes go through
        clickhouse-connect's ``raw_insert`` (chDB and HTTP servers alike), which
        spares its per-value Native encoding in Python (measured 75 µs/event
        against 10 µs to build Arrow and 12–20 µs for ClickHouse to store it).
        ``optimize_on_insert=0``: the ReplacingMergeTree still collapses
        re-delivered events at merge time and under ``FINAL``; collapsing them in
        every insert block as well doubled the insert time. Refused rows: as
        :meth:`insert_columns`.
        """
        import pyarrow as pa

        full = f"{self.database}.{table}"
        built: list[Any] = []
        cache: dict[tuple[int, int], bytes] = {}

        def insert(c: Any, lo: int, hi: int, tok: str) -> None:
            blob = cache.get((lo, hi))
            if blob is None:  # serialised once, even when the insert is retried
                tbl = built[0].slice(lo, hi - lo)
                sinkbuf = pa.BufferOutputStream()
                with pa.ipc.new_stream(sinkbuf, tbl.schema) as w:
                    w.write_table(tbl)
                blob = cache[(lo, hi)] = sinkbuf.getvalue().to_pybytes()
            c.raw_insert(full, None, insert_block=blob, fmt="ArrowStream",
                         settings={**self._insert_settings, "optimize_on_insert": 0,
                                   "insert_deduplication_token": tok})

        def n_rows(c: Any) -> int:
            if not built:
                built.append(build())
            return int(built[0].num_rows)

        # the first call on a lane connects: a ClickHouse that is down is waited for here too
        n = await self._retrying(f"insert into {table}", n_rows, keepalive, ingest)
        if n:
            await self._bisecting(table, n, insert, keepalive, token, on_rejected, ingest)

    async def _bisecting(self, table: str, n: int, insert: Callable[[Any, int, int, str], None],
                         keepalive: Callable[[], Awaitable[None]] | None, token: str | None,
                         on_rejected: Callable[[list[int], str], None] | None, ingest: bool = False) -> None:
        """Insert rows ``[0, n)`` with ``insert(client, lo, hi, token)``, retried while the
        errors can pass; a range refused for its data is split in halves down to the rows
        at fault. A retry starts over: the ranges that landed are dropped by their tokens."""
        tok = token or uuid.uuid4().hex
        refused: list[tuple[list[int], str]] = []

        def run(c: Any) -> None:
            refused.clear()
            stack = [(0, n)]
            while stack:
                lo, hi = stack.pop()
                try:
                    insert(c, lo, hi, tok if (lo, hi) == (0, n) else f"{tok}/{lo}-{hi}")
                except Exception as exc:  # noqa: BLE001 - sorted below
                    if retryable(exc):
                        raise
                    if hi - lo == 1:
                        refused.append(([lo], str(exc)[:2000]))
                    else:
                        mid = (lo + hi) // 2
                        stack += [(mid, hi), (lo, mid)]

        await self._retrying(f"insert into {table}", run, keepalive, ingest)
        for rows, msg in refused:
            if self._on_error:
                self._on_error(f"refused {table}", RuntimeError(msg))
            log.warning("ClickHouse refused %d row(s) of %s: %s", len(rows), table, msg)
            if on_rejected is not None:
                on_rejected(rows, msg)

    async def insert_rows(self, table: str, rows: Sequence[dict[str, Any]], columns: Sequence[str],
                          keepalive: Callable[[], Awaitable[None]] | None = None, *,
                          token: str | None = None, ingest: bool = False,
                          on_rejected: Callable[[list[int], str], None] | None = None) -> None:
        if not rows:
            return
        cols = {c: [r[c] for r in rows] for c in columns}
        await self.insert_columns(table, cols, keepalive, token=token, ingest=ingest, on_rejected=on_rejected)

    # -- reads --------------------------------------------------------------------
    def _last_per_partition(self, table: str, columns: str, order: str, topic: str,
                            partitions: Iterable[int]) -> dict[int, tuple[Any, ...]]:
        """Per partition of ``topic`` in ``table`` (a write log keyed by source topic and
        partition): ``columns`` (a tuple expression) of the row with the highest ``order``."""
        parts = sorted(set(partitions))
        if not parts:
            return {}
        sql = (f"SELECT source_partition, argMax(tuple({columns}), {order}) FROM {self.database}.{table} "
               f"WHERE source_topic = %(t)s AND source_partition IN %(p)s GROUP BY source_partition")
        rows = self.call(lambda c: c.query(sql, parameters={"t": topic, "p": parts}).result_rows)
        return {int(p): tuple(m) for p, m in rows}

    def ingest_marks(self, topic: str, partitions: Iterable[int]) -> dict[int, tuple[Any, ...]]:
        """The last ``ingest_log`` row per partition of ``topic`` (highest epoch, then offset):
        ``(epoch, first_offset, last_offset, last_timestamp, last_fingerprint, dlq_start,
        watermark_ms)``."""
        return self._last_per_partition(
            "ingest_log", "epoch, first_offset, last_offset, last_timestamp, last_fingerprint, dlq_start, watermark_ms",
            "(epoch, last_offset)", topic, partitions)

    def rekey_marks(self, topic: str, partitions: Iterable[int]) -> dict[int, tuple[int, str, str]]:
        """The last ``rekey_log`` row per partition of the OTLP ``topic`` (highest
        ``next_offset``): ``(next_offset, events_start, dlq_start)``."""
        rows = self._last_per_partition("rekey_log", "next_offset, events_start, dlq_start", "next_offset",
                                        topic, partitions)
        return {p: (int(m[0]), str(m[1]), str(m[2])) for p, m in rows.items()}

    def stored_after(self, topic: str, partition: int, offset: int) -> set[tuple[int, str]]:
        """``(source_offset, event_id)`` of the events stored past ``offset`` (a write step
        that did not finish: its ``ingest_log`` row never landed). Only rows ingested
        since the logged rows (less 10 minutes of clock skew between hosts): the rows of
        a recreated topic's old incarnation above ``offset`` are not read."""
        db = self.database
        sql = (f"SELECT source_offset, event_id FROM {db}.llm_events WHERE source_topic = %(t)s "
               f"AND source_partition = %(p)s AND source_offset > %(o)s AND ingested_at >= "
               f"(SELECT max(ingested_at) - INTERVAL 10 MINUTE FROM {db}.llm_events WHERE source_topic = %(t)s "
               f"AND source_partition = %(p)s AND source_offset <= %(o)s)")
        rows = self.call(lambda c: c.query(sql, parameters={"t": topic, "p": partition, "o": offset}
                                           ).result_rows)
        return {(int(o), str(e)) for o, e in rows}

    def outbox(self, topic: str, partition: int, epoch: int, lo: int, hi: int) -> list[tuple[Any, ...]]:
        """Outbox rows of one source partition with ``lo <= source_offset <= hi``:
        ``(source_offset, idx, key, value, reason, field)``, in order."""
        sql = (f"SELECT source_offset, idx, key, value, reason, field FROM {self.database}.dlq_outbox FINAL "
               f"WHERE source_topic = %(t)s AND source_partition = %(p)s AND epoch = %(e)s "
               f"AND source_offset BETWEEN %(lo)s AND %(hi)s ORDER BY source_offset, idx")
        return list(self.call(lambda c: c.query(
            sql, parameters={"t": topic, "p": partition, "e": epoch, "lo": lo, "hi": hi},
            query_formats={"String": "bytes"}).result_rows))

    def query_rows(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        return list(self.call(lambda c: c.query(sql, parameters=parameters).result_rows))

    def close(self) -> None:
        def _close(c: Any) -> None:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass

        if self._client is not None:
            self.call(_close)
            self._client = None
        if self._ingest_client is not None:
            self._ingest_pool.submit(_close, self._ingest_client).result()
            self._ingest_client = None
        self._pool.shutdown(wait=True)
        self._ingest_pool.shutdown(wait=True)
