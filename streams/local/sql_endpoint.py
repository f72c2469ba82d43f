"""A ClickHouse-HTTP-compatible endpoint served by the worker over its embedded chDB.

A chDB path can be opened by one process at a time, and the worker holds it.
So that ``driftline sql``, clickhouse-connect, ``curl`` and any other ClickHouse
HTTP client still reach the embedded store, the worker answers the ClickHouse
HTTP interface on its bind address (127.0.0.1 by default): ``GET /ping``, and
``GET``/``POST /`` with the query in ``?query=`` and/or the body,
``default_format``, ``database`` and ``param_*`` query parameters. Results are
chDB's own bytes in the requested format (Native, RowBinaryWithNamesAndTypes,
TabSeparated, JSON, ...); errors come back with ClickHouse's ``Code: N.
DB::Exception`` text and its HTTP status (401 authentication, 403 refused or
read-only, 400 syntax, 500 others).

It is closed by default (streams/auth.py): every request but ``/ping`` needs the
user ``driftline`` (or ``driftline_admin``) and its password, kept 0600 in
``<chdb path>/.driftline-credentials``; a ``GET`` must name this server in its
``Host`` header (DNS rebinding). Queries never touch the worker's own clients:
each request gets a fresh chDB connection of its own (a session that ends with
the request, so no ``SET``, ``USE`` or ``?database=`` outlives it), created
read-only (``readonly=1``: no DDL, no writes, no changed settings) with
``max_execution_time``, ``max_result_rows``/``max_result_bytes``
(``result_overflow_mode=throw``) and ``max_memory_usage``, on the endpoint's own
threads. ``readonly=1`` in one chDB connection leaves the others of the same
path untouched (measured: the sink's lanes keep writing).

Before a query runs, ClickHouse's own parser reads it (``formatQuery`` on the
text as a string, which refuses multi-statements without running anything,
then ``EXPLAIN AST``) and :class:`QueryPolicy` refuses (HTTP 403, ``Code: 497
ACCESS_DENIED``): statements other than SELECT / WITH / SHOW / DESCRIBE / EXISTS
/ EXPLAIN; ``INTO OUTFILE`` (chDB writes the file even under ``readonly=1``);
every table function but a small allowlist (the deny set is read from the
engine's ``system.table_functions`` at start, so a newer engine's functions are
refused by default), and the scalar functions that reach files or the network
(``file``, ``hasColumnInTable``, ``catboostEvaluate``, the engine's AI functions
such as ``aiGenerate``, and their aliases). ``INSERT`` is always
refused: events go through Kafka (``driftline emit``).

Writes, only with ``--sql-allow-writes``, only by ``driftline_admin`` and only
with POST: data maintenance (``ALTER TABLE … DELETE/UPDATE``, ``DELETE FROM``,
``OPTIMIZE``, ``TRUNCATE``, ``DROP``), with the same function checks, no
``SETTINGS``, still on connections of the endpoint's own: the statement is parsed
on a read-only one, and only a maintenance statement then runs on a writable one
(``mutations_sync=1``); no CREATE/ATTACH (engines and disks reach the file
system), no INSERT.

Other workers of the same machine, only with ``--sql-allow-workers``, only as
``driftline_writer`` and only with POST (``--clickhouse
http://driftline_writer@127.0.0.1:8123/driftline``): the writer role
(:meth:`QueryPolicy.check_writer`) inserts into the tables of the store's
database that ``schemas/tables.sql`` creates (data in the body, any format, as
clickhouse-connect sends it, or ``INSERT ... SELECT``), never ``INSERT INTO
FUNCTION`` nor another database; runs the schema statements of
``ClickHouseSink.ensure_schema`` and nothing else (the packaged ``CREATE ... IF
NOT EXISTS`` texts exactly, ``ALTER TABLE`` of those tables limited to ``MODIFY
SETTING non_replicated_deduplication_window``, ``ADD COLUMN IF NOT EXISTS``,
``MODIFY/REMOVE TTL`` and ``MODIFY COLUMN ... TTL``); reads as the read role
does. Statements are parsed on a read-only connection as above, a write then
runs on a writable connection of its own, the request's data (decoded from
its ``Content-Encoding``) through a private 0600 file (``FROM INFILE``); its reads run with ``readonly=2`` (nothing written, but
clickhouse-connect sees its insert settings as changeable). It may send only the
settings :data:`WRITER_SETTINGS` beyond unchanged ones, and no ``SETTINGS`` in
its statements.

The endpoint's address is written to ``<chdb path>/.driftline-endpoint`` so
that clients configured with the same ``chdb://`` DSN find it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from driftline.streams.auth import (
    ADMIN_USER,
    USER,
    USER_KEY,
    WRITER_USER,
    Credentials,
    HttpGuard,
    allowed_hosts,
    clickhouse_error,
)
from driftline.streams.sinks.clickhouse import ClickHouseSink, chdb_path, ddl_statements

log = logging.getLogger("driftline.chserver")

__all__ = ["ALLOWED_TABLE_FUNCTIONS", "ClickHouseEndpoint", "EndpointLimits", "EndpointOptions", "QueryPolicy", "READ_QUERY",
           "Refused", "WRITER_SETTINGS", "endpoint_file", "read_endpoint"]

ENDPOINT_FILE = ".driftline-endpoint"
_FORMAT_RE = re.compile(r"\bFORMAT\s+([A-Za-z0-9_]+)\s*;?\s*$", re.IGNORECASE)
#: a client-side guess whether a statement is a read (the endpoint decides with the parser)
READ_QUERY = re.compile(r"^\s*(\(|SELECT|WITH|SHOW|DESCRIBE|DESC|EXISTS|EXPLAIN)\b", re.IGNORECASE)
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_INTERNAL_PARAMS = frozenset({
    "query", "default_format", "database", "query_id", "session_id", "session_timeout",
    "session_check", "compress", "decompress", "user", "password", "quota_key",
    "enable_http_compression", "wait_end_of_query", "client_protocol_version", "role",
    "buffer_size", "send_progress_in_http_headers", "http_headers_progress_interval_ms",
})

#: table functions that compute rows and reach nothing outside the query
ALLOWED_TABLE_FUNCTIONS = frozenset({
    "numbers", "numbers_mt", "zeros", "zeros_mt", "values", "generate_series", "generateseries", "null",
})
#: scalar functions that read files or open connections (table functions come from the engine)
DENIED_SCALAR_FUNCTIONS = frozenset({"file", "hascolumnintable", "catboostevaluate"})
#: the engine's other names of the denied scalar functions, and its AI functions (aiGenerate,
#: aiEmbed, ... and their aliases AIGenerate, ...), which call an LLM provider over the network
DENIED_SCALARS_SQL = (
    "SELECT name FROM system.functions WHERE categories LIKE '%AI%' OR lower(alias_to) IN ("
    + ", ".join(f"'{f}'" for f in sorted(DENIED_SCALAR_FUNCTIONS))
    + ") OR alias_to IN (SELECT name FROM system.functions WHERE categories LIKE '%AI%')")
_READ_KINDS = re.compile(r"^(SelectWithUnionQuery|SelectIntersectExceptQuery|Show\w+|Describe\w*|Exists\w*|Explain)$")
_WRITE_KINDS = frozenset({"AlterQuery", "DeleteQuery", "OptimizeQuery", "DropQuery", "TruncateQuery"})
_ALTER_COMMANDS = frozenset({"DELETE", "UPDATE"})
_OUTFILE_RE = re.compile(r"\bINTO\s+OUTFILE\b", re.IGNORECASE)
#: settings the writer role may send with other values than the engine's: the insert
#: settings of ClickHouseSink and the input parsing and HTTP defaults clickhouse-connect adds
WRITER_SETTINGS = frozenset({"insert_deduplication_token", "optimize_on_insert", "date_time_input_format",
                             "cast_string_to_dynamic_use_inference", "cancel_http_readonly_queries_on_client_close"})
#: what a data INSERT looks like once formatQuery has normalised it
_INSERT_DATA_RE = re.compile(r"^INSERT INTO \S+(?P<cols> \([^()]*\))? FORMAT (?P<fmt>[A-Za-z0-9_]+)$")
_TTL_EXPR = r"[A-Za-z0-9_(). +`]+"
#: the ALTER forms of ClickHouseSink.ensure_schema (formatQuery's text of the one command)
_WRITER_ALTERS = tuple(re.compile(p) for p in (
    r"^MODIFY SETTING non_replicated_deduplication_window = \d+$",
    r"^ADD COLUMN IF NOT EXISTS `?[A-Za-z_][A-Za-z0-9_]*`? [A-Za-z0-9_]+ DEFAULT [A-Za-z0-9_.']+$",
    # the agent/tool columns of llm_events (clickhouse.py EVENT_COLUMNS_ADDED): empty strings
    r"^ADD COLUMN IF NOT EXISTS `?[A-Za-z_][A-Za-z0-9_]*`? (?:String|LowCardinality\(String\)) "
    r"AFTER `?[A-Za-z_][A-Za-z0-9_]*`?$",
    rf"^MODIFY TTL {_TTL_EXPR}$", r"^REMOVE TTL$",
    rf"^MODIFY COLUMN `?[A-Za-z_][A-Za-z0-9_]*`? TTL {_TTL_EXPR}$",
    r"^MODIFY COLUMN `?[A-Za-z_][A-Za-z0-9_]*`? REMOVE TTL$",
))
#: the largest body of one writer INSERT (the sink sends batches of a few MB)
MAX_INSERT_BYTES = 512 << 20


def endpoint_file(chdb_path: str | Path) -> Path:
    return Path(chdb_path) / ENDPOINT_FILE


def read_endpoint(chdb_path: str | Path) -> str | None:
    """The URL of the worker that holds ``chdb_path``, if one wrote it."""
    f = endpoint_file(chdb_path)
    try:
        return f.read_text().strip() or None
    except OSError:
        return None


class Refused(Exception):
    """A statement the endpoint does not run (HTTP 403, ``Code: 497 ACCESS_DENIED``)."""


@dataclass(frozen=True)
class EndpointLimits:
    """Settings every endpoint connection gets at creation (the read role cannot change them).

    Parameters
    ----------
    max_execution_time_s : float
        Longest query (ClickHouse ``max_execution_time``, whole seconds, at least 1).
    max_result_rows, max_result_bytes : int
        Largest result (``result_overflow_mode=throw``: a larger one is an error, not a
        silently cut answer).
    max_memory_usage : int
        Bytes one query may use (0: the engine's default).
    threads : int
        Queries run at the same time (each on a thread and connection of its own).
    """

    max_execution_time_s: float = 60.0
    max_result_rows: int = 10_000_000
    max_result_bytes: int = 1 << 30
    max_memory_usage: int = 4 << 30
    threads: int = 2

    def __post_init__(self) -> None:
        if not self.max_execution_time_s >= 1:
            raise ValueError("max_execution_time_s must be >= 1 (ClickHouse counts whole seconds)")
        if self.max_result_rows < 1 or self.max_result_bytes < 1:
            raise ValueError("max_result_rows and max_result_bytes must be >= 1")
        if self.max_memory_usage < 0:
            raise ValueError("max_memory_usage must be >= 0")
        if self.threads < 1:
            raise ValueError("threads must be >= 1")

    def settings(self) -> dict[str, str]:
        return {
            "max_execution_time": str(int(round(self.max_execution_time_s))),
            "max_result_rows": str(self.max_result_rows),
            "max_result_bytes": str(self.max_result_bytes),
            "result_overflow_mode": "'throw'",
            "max_memory_usage": str(self.max_memory_usage),
        }


@dataclass(frozen=True)
class EndpointOptions:
    """How the worker serves its SQL endpoint (``driftline worker --sql-*``).

    Parameters
    ----------
    host : str
        Bind address (loopback by default; any address is served with authentication only).
    password_file : Path, optional
        The ``driftline`` user's password, one line (else ``DRIFTLINE_SQL_PASSWORD``, else generated).
    allow_writes : bool
        Let ``driftline_admin`` run maintenance statements with POST.
    extra_hosts : tuple of str
        More ``Host`` names accepted for GET.
    limits : EndpointLimits
        Per-query limits.
    allow_workers : bool
        Let ``driftline_writer`` (other workers of this machine) insert into the store and
        run the worker's schema statements, with POST.
    """

    host: str = "127.0.0.1"
    password_file: Path | None = None
    allow_writes: bool = False
    extra_hosts: tuple[str, ...] = ()
    limits: EndpointLimits = field(default_factory=EndpointLimits)
    allow_workers: bool = False

    @property
    def users(self) -> tuple[str, ...]:
        """The users whose passwords the worker keeps (the writer only when it is on)."""
        return (USER, ADMIN_USER, *((WRITER_USER,) if self.allow_workers else ()))

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("the SQL endpoint needs a bind address")
        if self.password_file is not None and not self.password_file.is_file():
            raise ValueError(f"--sql-password-file {self.password_file}: no such file")


class QueryPolicy:
    """What the endpoint runs, decided on ClickHouse's own parse tree (``EXPLAIN AST``).

    Pure logic: :meth:`check` takes the ``EXPLAIN AST`` text and ``formatQuery``'s
    normalised text of one statement.

    Parameters
    ----------
    table_functions : iterable of str
        The engine's table functions (``system.table_functions``); all but
        :data:`ALLOWED_TABLE_FUNCTIONS` are refused, with :data:`DENIED_SCALAR_FUNCTIONS`.
    scalar_functions : iterable of str
        More scalar functions to refuse (the endpoint adds the engine's aliases of
        :data:`DENIED_SCALAR_FUNCTIONS` and its ``AI`` functions: :data:`DENIED_SCALARS_SQL`).
    """

    def __init__(self, table_functions: Iterable[str], scalar_functions: Iterable[str] = (), *,
                 database: str = "driftline", tables: Iterable[str] = (),
                 create_forms: Iterable[str] = ()) -> None:
        names = {t.lower() for t in table_functions}
        if not names:
            raise ValueError("QueryPolicy: the engine listed no table functions")
        self.denied = (frozenset(names - ALLOWED_TABLE_FUNCTIONS) | DENIED_SCALAR_FUNCTIONS
                       | {f.lower() for f in scalar_functions})
        #: the writer role: the store's database, its tables and the exact CREATE texts
        self.database = database
        self.tables = frozenset(tables)
        self.create_forms = frozenset(create_forms)

    def _check_functions(self, lines: list[str]) -> None:
        for ln in lines:
            m = re.match(r"\s*Function (\S+)", ln)
            if m and m.group(1).lower() in self.denied:
                raise Refused(f"function {m.group(1)} is not allowed: it reaches files, the network or "
                              "other servers")

    def _writer_target(self, lines: list[str], default_database: str, what: str) -> str:
        """``db.table`` of an INSERT/ALTER when it is one of the store's tables."""
        top = [ln for ln in lines[1:] if ln.startswith(" ") and not ln.startswith("  ")]
        if top and top[0].startswith(" Function"):
            raise Refused(f"{what} INTO FUNCTION is not allowed: the writer role writes only to the tables of "
                          f"database {self.database}")
        idents = [ln.split()[1] for ln in top if ln.startswith(" Identifier ")]
        if len(idents) == 1:
            idents = [default_database, idents[0]]
        if len(idents) != 2:
            raise Refused(f"{what}: no table named")
        db, table = idents
        if db != self.database:
            raise Refused(f"{what} on database {db} is not allowed: the writer role writes only to the tables "
                          f"of database {self.database}")
        if table not in self.tables:
            raise Refused(f"{what} on {db}.{table} is not allowed: not a table of driftline's schema")
        return f"`{db}`.`{table}`"

    def check_writer(self, ast: str, formatted: str, *,
                     default_database: str = "default") -> tuple[str, str | None]:
        """What the writer role (``driftline_writer``) runs; raises :class:`Refused` otherwise.

        Returns ``("insert_data", template)`` for an INSERT whose data is the request body
        (``template`` is the statement with ``{infile}`` where the data file goes),
        ``("write", None)`` for ``INSERT ... SELECT`` and the schema statements (the
        request's statement runs as it is), ``("read", None)`` for a read."""
        lines = [ln for ln in ast.splitlines() if ln.strip()]
        if not lines:
            raise Refused("empty parse tree")
        kind = lines[0].split()[0]
        if _READ_KINDS.match(kind) and kind != "ShowProcesslistQuery":
            self.check(ast, formatted)
            if any(re.match(r"\s*Set\b", ln) for ln in lines):
                raise Refused("SETTINGS are not accepted in the writer role's statements")
            return "read", None
        if sum(not ln.startswith(" ") for ln in lines) != 1:
            raise Refused("multi-statements are not allowed: send one statement per request")
        if kind == "InsertQuery":
            if any(re.match(r"\s*Set\b", ln) for ln in lines):
                raise Refused("SETTINGS are not accepted in the writer role's statements")
            target = self._writer_target(lines, default_database, "INSERT")
            self._check_functions(lines)
            if any(ln.startswith(" SelectWithUnionQuery") for ln in lines):
                return "write", None
            m = _INSERT_DATA_RE.match(formatted.strip())
            if m is None:
                raise Refused("the writer role's INSERT is INSERT INTO table [(columns)] FORMAT name, with the "
                              "data in the request body, or INSERT INTO table SELECT ...")
            return "insert_data", f"INSERT INTO {target}{m.group('cols') or ''} FROM INFILE {{infile}} FORMAT {m.group('fmt')}"
        if kind == "AlterQuery":
            self._writer_target(lines, default_database, "ALTER")
            self._check_functions(lines)
            commands = [ln.split()[1] for ln in lines if re.match(r"\s*AlterCommand ", ln)]
            body = re.match(r"^ALTER TABLE \S+\s+\((.*)\)$", formatted.strip(), re.DOTALL)
            if len(commands) != 1 or body is None or not any(p.match(body.group(1)) for p in _WRITER_ALTERS):
                raise Refused("this ALTER is not allowed: the writer role runs only the schema statements of the "
                              "worker (MODIFY SETTING non_replicated_deduplication_window, ADD COLUMN IF NOT "
                              "EXISTS, MODIFY/REMOVE TTL, MODIFY COLUMN ... TTL)")
            return "write", None
        if kind == "CreateQuery":
            if formatted.strip() not in self.create_forms:
                raise Refused("this CREATE is not allowed: the writer role runs only driftline's own CREATE ... "
                              "IF NOT EXISTS statements (schemas/tables.sql)")
            return "write", None
        raise Refused(f"{kind} is not allowed for the writer role: it inserts into driftline's tables and runs "
                      "the worker's schema statements only")

    def check(self, ast: str, formatted: str = "", *, write: bool = False) -> str:
        """The statement's kind when it may run; raises :class:`Refused` otherwise.

        ``write``: the caller holds the write role (maintenance statements allowed)."""
        lines = [ln for ln in ast.splitlines() if ln.strip()]
        if not lines:
            raise Refused("empty parse tree")
        if sum(not ln.startswith(" ") for ln in lines) != 1:
            raise Refused("multi-statements are not allowed: send one statement per request")
        kind = lines[0].split()[0]
        if kind == "ShowProcesslistQuery" or any(_PROCESSES_RE.match(ln) for ln in lines):
            # the running queries of other sessions: an admin's ALTER ... DELETE WHERE user_id = '...'
            raise Refused("system.processes is not readable here: it shows other sessions' query texts")
        read = _READ_KINDS.match(kind) is not None
        if kind == "InsertQuery":
            raise Refused("INSERT through the worker's endpoint is not supported: produce events to Kafka "
                          "(driftline emit)")
        if not read:
            if not (write and kind in _WRITE_KINDS):
                hint = ("" if write else "; maintenance statements need the write role "
                        "(--sql-allow-writes, user driftline_admin, POST)")
                raise Refused(f"{kind} is not allowed: the endpoint runs SELECT, WITH, SHOW, DESCRIBE, "
                              f"EXISTS and EXPLAIN{hint}")
            for ln in lines:
                m = re.match(r"\s*AlterCommand (\S+)", ln)
                if m and m.group(1) not in _ALTER_COMMANDS:
                    raise Refused(f"ALTER {m.group(1)} is not allowed: only ALTER TABLE ... DELETE / UPDATE")
                if re.match(r"\s*Set\b", ln):  # the write role runs with readonly=0: no settings of its own
                    raise Refused("SETTINGS are not accepted on the write role (mutations run synchronously "
                                  "already)")
        else:
            # INTO OUTFILE: a literal right under the statement (chDB writes the file even read-only)
            if any(ln.startswith(" Literal") for ln in lines[1:]) or _OUTFILE_RE.search(formatted):
                raise Refused("INTO OUTFILE is not allowed")
        self._check_functions(lines)
        return kind


_PROCESSES_RE = re.compile(r"\s*TableIdentifier (?:system\.)?processes\b", re.IGNORECASE)


def _tsv_escape(s: str) -> str:
    """A query parameter's value as ClickHouse reads it (escaped like TabSeparated)."""
    return (s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
            .replace("\0", "\\0"))


def _quote(v: str) -> str:
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


_STATUS = {516: 401, 164: 403, 497: 403, 62: 400, 159: 500, 396: 500}


class ClickHouseEndpoint:
    """The ClickHouse HTTP interface over the chDB store ``sink`` writes to.

    Parameters
    ----------
    sink : ClickHouseSink
        The worker's sink on a ``chdb://`` DSN (only its path is used: queries run on
        connections of the endpoint's own).
    host, port : str, int
        Where to listen (port 0: any free port).
    credentials : Credentials
        Who may query (required: the endpoint is never open).
    limits : EndpointLimits
        Per-query limits.
    allow_writes : bool
        Let ``driftline_admin`` run maintenance statements with POST.
    extra_hosts : iterable of str
        More ``Host`` names to accept for GET (e.g. a DNS name on a non-loopback bind).
    on_auth_failure : callable, optional
        Called with ``"auth"`` or ``"host"`` per refused request (a counter).
    allow_workers : bool
        Let ``driftline_writer`` write with POST (:meth:`QueryPolicy.check_writer`).
    """

    def __init__(self, sink: ClickHouseSink, host: str = "127.0.0.1", port: int = 8123, *,
                 credentials: Credentials, limits: EndpointLimits | None = None, allow_writes: bool = False,
                 extra_hosts: Iterable[str] = (),
                 on_auth_failure: Callable[[str], None] | None = None, allow_workers: bool = False) -> None:
        path = chdb_path(sink.dsn)
        if path is None:
            raise ValueError("the ClickHouse HTTP endpoint serves an embedded chDB store (chdb:///path) only")
        if not isinstance(credentials, Credentials):
            raise ValueError("the ClickHouse HTTP endpoint needs credentials")
        self.sink = sink
        self.path = path
        self._conn_str = os.path.realpath(path)  # clickhouse-connect opens the engine by its real path
        self.host = host
        self.port = port
        self.credentials = credentials
        self.limits = limits or EndpointLimits()
        self.allow_writes = allow_writes
        self.allow_workers = allow_workers
        self._spool: str | None = None  # private directory of the writer's data files
        self.extra_hosts = tuple(extra_hosts)
        self.guard = HttpGuard(credentials, on_failure=on_auth_failure)
        self.policy: QueryPolicy | None = None
        self.refused = 0
        self._pool = ThreadPoolExecutor(max_workers=self.limits.threads, thread_name_prefix="clickhouse-sql")
        self._runner: web.AppRunner | None = None
        self._written: Path | None = None

    @property
    def url(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{h}:{self.port}"

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20, middlewares=[self.guard.middleware])
        app.router.add_get("/ping", self._ping)
        app.router.add_get("/", self._query)
        app.router.add_post("/", self._query)
        return app

    # -- connections of the endpoint's own ---------------------------------------------
    def _connect(self, write: bool, readonly: int = 1, limited: bool = True) -> Any:
        """A chDB connection with the callers' limits (``limited``; the endpoint's own reads
        at start are not callers' queries: under load they took over the 1 s a test sets)."""
        import chdb

        conn = chdb.connect(self._conn_str)
        try:
            if limited:
                conn.query("SET " + ", ".join(f"{k} = {v}" for k, v in self.limits.settings().items()))
            if write:
                conn.query("SET mutations_sync = 1")  # ALTER ... DELETE/UPDATE answers when done
            else:  # last: from here on no setting changes (2: settings, but no writes)
                conn.query(f"SET readonly = {2 if readonly == 2 else 1}")
        except Exception:
            conn.close()
            raise
        return conn

    def _load_policy(self) -> QueryPolicy:
        conn = self._connect(write=False, limited=False)
        try:
            names = conn.query("SELECT name FROM system.table_functions", "TSVRaw").bytes().decode().split()
            scalars = conn.query(DENIED_SCALARS_SQL, "TSVRaw").bytes().decode().split()
            creates = [conn.query("SELECT formatQuery({q:String})", "TSVRaw", params={"q": _tsv_escape(d)}
                                  ).bytes().decode().strip()
                       for d in ddl_statements(self.sink.database)]
        finally:
            conn.close()
        tables = [m.group(1) for d in ddl_statements(self.sink.database)
                  if (m := re.search(r"CREATE TABLE IF NOT EXISTS \S+?\.`?([A-Za-z0-9_]+)", d))]
        return QueryPolicy(names, scalars, database=self.sink.database, tables=tables, create_forms=creates)

    def _run(self, q: str, fmt: str, params: dict[str, str], settings: dict[str, str],
             database: str | None, write: bool, writer: bool = False, data: tuple[str, str] | None = None) -> bytes:
        """One request on a fresh connection (its session ends with the request).

        ``writer``: the caller holds the writer role; ``data``: (path, compression) of the
        body of its INSERT."""
        assert self.policy is not None
        conn = self._connect(write=False)  # checked on a read-only connection, whoever asks
        own = {k: settings[k] for k in settings if writer and k in WRITER_SETTINGS}
        try:
            for k, v in settings.items():  # read role: refused by the engine unless unchanged
                if k not in own:
                    conn.query(f"SET {k} = {_quote(v)}")
            # the text as a string value: a multi-statement is refused here without running anything
            try:
                formatted = conn.query("SELECT formatQuery({q:String})", "TSVRaw",
                                       params={"q": _tsv_escape(q)}).bytes().decode("utf-8", "replace")
            except Exception as exc:
                if "Multi-statements" in str(exc):
                    raise Refused("multi-statements are not allowed: send one statement per request") from None
                raise
            ast = conn.query("EXPLAIN AST " + q, "TSVRaw", params=params).bytes().decode("utf-8", "replace")
            if writer:
                form, template = self.policy.check_writer(ast, formatted, default_database=database or "default")
                if data is not None and form != "insert_data":
                    raise Refused("only an INSERT ... FORMAT takes data in the request body")
                conn.close()
                conn = self._connect(write=form != "read", readonly=2)
                for k, v in own.items():
                    conn.query(f"SET {k} = {_quote(v)}")
                if database:
                    conn.query(f"USE `{database}`")
                if form == "insert_data":
                    assert template is not None
                    path, compression = data or ("", "")
                    if not path:
                        path = self._spool_file(b"")
                    stmt = template.format(infile=_quote(path) + (f" COMPRESSION {_quote(compression)}"
                                                                  if compression else ""))
                    conn.query(stmt)
                    return b""
                return bytes(conn.query(q, fmt, params=params).bytes() or b"")
            kind = self.policy.check(ast, formatted, write=write)
            if write and kind in _WRITE_KINDS:  # only a maintenance statement gets a writable connection
                conn.close()
                conn = self._connect(write=True)
            if database:
                conn.query(f"USE `{database}`")
            return bytes(conn.query(q, fmt, params=params).bytes() or b"")
        finally:
            conn.close()

    def _spool_file(self, first: bytes) -> str:
        """A new private file (0600, in a 0700 directory of the endpoint's) holding ``first``."""
        if self._spool is None:
            self._spool = tempfile.mkdtemp(prefix="driftline-insert-")
        fd, path = tempfile.mkstemp(dir=self._spool, suffix=".data")
        with os.fdopen(fd, "wb") as f:
            f.write(first)
        return path

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self, chdb_path: str | None = None) -> None:
        self.policy = await asyncio.get_running_loop().run_in_executor(self._pool, self._load_policy)
        self._runner = web.AppRunner(self.make_app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            server = getattr(site, "_server", None)
            if server is not None and server.sockets:
                self.port = int(server.sockets[0].getsockname()[1])
        self.guard.hosts = allowed_hosts(self.host, self.port, self.extra_hosts)
        if chdb_path:
            self._written = endpoint_file(chdb_path)
            self._written.parent.mkdir(parents=True, exist_ok=True)
            self._written.write_text(self.url + "\n")
        log.info("ClickHouse HTTP endpoint over the embedded store on %s (user driftline, password in %s%s)",
                 self.url, self.credentials.source, "; writes: driftline_admin with POST" if self.allow_writes else "")

    async def stop(self) -> None:
        if self._written is not None:
            try:
                self._written.unlink()
            except OSError:
                pass
            self._written = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None

    # -- handlers ----------------------------------------------------------------------
    async def _ping(self, request: web.Request) -> web.Response:
        return web.Response(text="Ok.\n")

    async def _query(self, request: web.Request) -> web.Response:
        params = request.query
        user = request.get(USER_KEY)
        writer = self.allow_workers and request.method == "POST" and user == WRITER_USER
        if user == WRITER_USER and not writer:
            return _error(403, "driftline: the writer role writes with POST, on a worker started with "
                               "--sql-allow-workers", code=497, name="ACCESS_DENIED")
        data: tuple[str, str] | None = None
        if writer:
            try:
                body, data = await self._writer_body(request)
            except _TooLarge:
                return _error(413, f"driftline: a statement is at most 1 MiB, an INSERT's data at most "
                                   f"{MAX_INSERT_BYTES} bytes", code=497, name="ACCESS_DENIED")
            except Refused as exc:
                return _error(403, f"driftline: {exc}", code=497, name="ACCESS_DENIED")
        else:
            body = await request.read() if request.method == "POST" else b""
        try:
            return await self._answer(request, params, body, writer, data)
        finally:
            if data is not None:
                try:
                    os.unlink(data[0])
                except OSError:
                    pass

    async def _writer_body(self, request: web.Request) -> tuple[bytes, tuple[str, str] | None]:
        """The writer's request body: a statement (returned), or an INSERT's data (spooled to a
        private file: its path and compression), as clickhouse-connect sends them (the
        statement in ``?query=`` and the data in the body, or an uncompressed body that
        starts with the statement's line)."""
        # aiohttp has decoded gzip, deflate, br and zstd already; lz4 is clickhouse-connect's default
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in ("", "identity", "lz4", "gzip", "deflate", "br", "zstd"):
            raise Refused(f"Content-Encoding {encoding[:20]!r} is not supported")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_chunked(1 << 20):
            size += len(chunk)
            if size > MAX_INSERT_BYTES:
                raise _TooLarge()
            chunks.append(chunk)
        raw = b"".join(chunks)
        loop = asyncio.get_running_loop()
        if encoding == "lz4" and raw:
            import lz4.frame

            raw = await loop.run_in_executor(None, lz4.frame.decompress, raw)
            if len(raw) > MAX_INSERT_BYTES:
                raise _TooLarge()
        q = request.query.get("query", "")
        if _INSERT_RE.match(q):
            return b"", (await loop.run_in_executor(None, self._spool_file, raw), "")
        if _INSERT_RE.match(raw[:64].decode("latin-1")):
            line, _, rest = raw.partition(b"\n")
            return line, (await loop.run_in_executor(None, self._spool_file, rest), "")
        if len(raw) > 1 << 20:  # a statement, not data: the other roles' limit
            raise _TooLarge()
        return raw, None

    async def _answer(self, request: web.Request, params: Any, body: bytes, writer: bool,
                      data: tuple[str, str] | None) -> web.Response:
        q = params.get("query", "")
        if body:
            text = body.decode("utf-8", "replace")
            q = f"{q}\n{text}" if q else text
        q = q.strip()
        if not q:
            return _error(400, "Empty query", code=62)
        write = (self.allow_writes and request.method == "POST"
                 and request.get(USER_KEY) == ADMIN_USER)
        m = None if _INSERT_RE.match(q) else _FORMAT_RE.search(q)  # an INSERT's FORMAT names its data
        if m:
            fmt = m.group(1)
            q = q[: m.start()].rstrip()
        else:
            fmt = params.get("default_format") or "TabSeparated"
        if not _NAME_RE.match(fmt):
            return _error(400, f"Unknown format {fmt[:50]!r}", code=73)
        q = q.rstrip().rstrip(";").rstrip()
        qparams = {k[6:]: v for k, v in params.items() if k.startswith("param_")}
        settings = {k: v for k, v in params.items() if k not in _INTERNAL_PARAMS and not k.startswith("param_")}
        bad = [k for k in settings if not _NAME_RE.match(k)]
        if bad:
            return _error(400, f"Unknown setting {bad[0][:50]!r}", code=115)
        if write and settings:
            return _error(403, "the write role takes no settings from the request", code=497)
        if writer and data is not None and not _INSERT_RE.match(q):
            return _error(403, "driftline: only an INSERT ... FORMAT takes data in the request body", code=497,
                          name="ACCESS_DENIED")
        database = params.get("database") or request.headers.get("X-ClickHouse-Database")
        if database == "default":
            database = None
        if database and not _NAME_RE.match(database):
            return _error(400, f"Database {database[:50]!r} does not exist", code=81)
        loop = asyncio.get_running_loop()
        try:
            out = await loop.run_in_executor(self._pool, self._run, q, fmt, qparams, settings, database, write,
                                             writer, data)
        except Refused as exc:
            self.refused += 1
            log.info("SQL endpoint refused a statement from %s: %s", request.get(USER_KEY), exc)
            return _error(403, f"driftline: {exc}", code=497, name="ACCESS_DENIED")
        except Exception as exc:  # noqa: BLE001 - errors go back to the client
            text = str(exc)
            mcode = re.search(r"Code: (\d+)", text)
            code = int(mcode.group(1)) if mcode else 1000
            return _error(_STATUS.get(code, 500), text, code=code)
        headers = {"X-ClickHouse-Server-Display-Name": "driftline-chdb", "X-ClickHouse-Timezone": "UTC",
                   "X-ClickHouse-Format": fmt}
        text_like = fmt.startswith(("Tab", "TSV", "CSV", "JSON", "Pretty", "Vertical", "Markdown"))
        return web.Response(body=out, headers=headers,
                            content_type="text/plain" if text_like else "application/octet-stream")


class _TooLarge(Exception):
    """An INSERT body over :data:`MAX_INSERT_BYTES`."""


_INSERT_RE = re.compile(r"^\s*INSERT\b", re.IGNORECASE)


def _error(status: int, message: str, code: int = 0, name: str | None = None) -> web.Response:
    if message.startswith("Code:"):
        return web.Response(status=status, text=message.rstrip() + "\n",
                            headers={"X-ClickHouse-Exception-Code": str(code)})
    if name is not None:
        return clickhouse_error(status, code, message, name)
    return web.Response(status=status, text=f"Code: {code}. DB::Exception: {message}\n",
                        headers={"X-ClickHouse-Exception-Code": str(code)})
