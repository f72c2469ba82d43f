"""The SQL endpoint over embedded chDB is closed and read-only, and cannot hurt the writer.

Real components, no Kafka: a ClickHouseSink on a temporary chDB path (the
worker's writer, both lanes) and the ClickHouseEndpoint over it, served by
aiohttp on 127.0.0.1 from a thread of its own; requests are plain HTTP
(urllib), so every status, ``Code:`` and refusal reason is asserted exactly.
Each test says which mutation of the code it catches.
"""

from __future__ import annotations

import asyncio
import base64
import os
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from driftline.streams.auth import ADMIN_USER, USER, credentials_path, load_credentials
from driftline.streams.local.sql_endpoint import ClickHouseEndpoint, EndpointLimits
from driftline.streams.sinks.clickhouse import ClickHouseSink


@dataclass
class Served:
    sink: ClickHouseSink
    endpoints: dict[str, ClickHouseEndpoint]
    path: Path
    password: str
    admin_password: str
    loop: asyncio.AbstractEventLoop

    def url(self, which: str = "ro") -> str:
        return self.endpoints[which].url


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    path = tmp_path_factory.mktemp("sqlsec") / "chdb"
    sink = ClickHouseSink(f"chdb://{path}")
    sink.ensure_schema()
    sink.call(lambda c: c.command("CREATE TABLE driftline.probe (n UInt32) ENGINE = MergeTree ORDER BY n"))
    creds = load_credentials(credentials_path(path), environ={})
    limits = EndpointLimits(max_execution_time_s=1, max_result_rows=1000, max_result_bytes=1 << 20)
    ready = threading.Event()
    box: dict[str, Any] = {}

    def serve() -> None:
        async def main() -> None:
            eps = {"ro": ClickHouseEndpoint(sink, port=0, credentials=creds, limits=limits),
                   "rw": ClickHouseEndpoint(sink, port=0, credentials=creds, limits=limits, allow_writes=True)}
            await eps["ro"].start(str(path))
            await eps["rw"].start()
            box["eps"], box["loop"], box["stop"] = eps, asyncio.get_running_loop(), asyncio.Event()
            ready.set()
            await box["stop"].wait()
            for ep in eps.values():
                await ep.stop()

        asyncio.run(main())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert ready.wait(30)
    try:
        yield Served(sink, box["eps"], path, creds.users[USER], creds.users[ADMIN_USER], box["loop"])
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        t.join(30)
        sink.close()


def _basic(user: str, pw: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}


def call(url: str, query: str | None = None, *, method: str = "GET", headers: dict[str, str] | None = None,
         params: dict[str, str] | None = None, timeout: float = 20, path: str = "/") -> tuple[int, str, dict[str, str]]:
    """(status, body, headers) of one request; GET carries the query in ?query=, POST in the body."""
    qs = dict(params or {})
    if method == "GET" and query is not None:
        qs["query"] = query
    full = url + path + (("?" + urllib.parse.urlencode(qs)) if qs else "")
    data = query.encode() if method == "POST" and query is not None else None
    req = urllib.request.Request(full, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def q_ro(s: Served, query: str, method: str = "GET", **kw: Any) -> tuple[int, str, dict[str, str]]:
    return call(s.url(), query, method=method, headers={**_basic(USER, s.password), **kw.pop("headers", {})}, **kw)


# -- authentication -------------------------------------------------------------------

def test_unauthenticated_and_wrong_password_refused(served: Served) -> None:
    # mutations caught: the auth middleware left out of the app (every call below answers 200 "1");
    # Credentials.check accepting any password; a client method (Basic / X-ClickHouse / params) not read
    before = served.endpoints["ro"].guard.failures["auth"]
    status, body, headers = call(served.url(), "SELECT 1")
    assert status == 401
    assert body.startswith("Code: 516. DB::Exception: driftline: Authentication failed")
    assert body.rstrip().endswith("(AUTHENTICATION_FAILED)")
    assert headers["WWW-Authenticate"].startswith('Basic realm="driftline"')
    wrong = "x" * len(served.password)
    refused = [
        call(served.url(), "SELECT 1", headers=_basic(USER, wrong)),
        call(served.url(), "SELECT 1", headers=_basic("default", served.password)),  # right password, other user
        call(served.url(), "SELECT 1", headers={"X-ClickHouse-User": USER, "X-ClickHouse-Key": wrong}),
        call(served.url(), "SELECT 1", params={"user": USER, "password": wrong}),
        call(served.url(), "SELECT 1", method="POST", headers=_basic(USER, served.password[:-1])),
    ]
    assert [r[0] for r in refused] == [401] * 5
    assert served.endpoints["ro"].guard.failures["auth"] == before + 6
    ok = [
        call(served.url(), "SELECT 1", headers=_basic(USER, served.password)),
        call(served.url(), "SELECT 1", headers={"X-ClickHouse-User": USER, "X-ClickHouse-Key": served.password}),
        call(served.url(), "SELECT 1", params={"user": USER, "password": served.password}),
        call(served.url(), "SELECT 1", method="POST", headers=_basic(USER, served.password)),
    ]
    assert [(r[0], r[1]) for r in ok] == [(200, "1\n")] * 4
    assert call(served.url(), path="/ping")[:2] == (200, "Ok.\n")  # liveness stays open, like ClickHouse's


def test_new_store_directory_is_private(served: Served, tmp_path: Path) -> None:
    # the fixture's store did not exist before its ClickHouseSink: created 0700, so other local
    # users cannot read the part files (the stored prompts) around the endpoint's password.
    # Catches: ClickHouseSink._connect leaving the creation to chDB (0755)
    assert served.path.stat().st_mode & 0o777 == 0o700
    # serve_worker writes the credentials first, into the store's directory: created 0700 too.
    # Catches: _write_new's mkdir with the default mode (the worker's store then was 0755)
    fresh = tmp_path / "a" / "chdb"
    load_credentials(credentials_path(fresh), environ={})
    assert fresh.stat().st_mode & 0o777 == 0o700


def test_credentials_file_is_private_and_reused(served: Served, tmp_path: Path) -> None:
    # mutations caught: the file created with the umask's mode (0644); a new password drawn on every
    # start (clients holding the old one would be locked out); a group-readable file accepted
    f = credentials_path(served.path)
    assert os.stat(f).st_mode & 0o777 == 0o600
    again = load_credentials(f, environ={})
    assert again.users == {USER: served.password, ADMIN_USER: served.admin_password}
    assert "password" not in repr(again) and served.password not in repr(again)
    # the environment wins over the file, without rewriting it
    env = load_credentials(f, environ={"DRIFTLINE_SQL_PASSWORD": "from-env-0123456789abcdef"})
    assert env.users[USER] == "from-env-0123456789abcdef"
    assert load_credentials(f, environ={}).users[USER] == served.password
    other = tmp_path / "creds"
    load_credentials(other, environ={})
    os.chmod(other, 0o640)
    with pytest.raises(ValueError, match="readable or writable by others"):
        load_credentials(other, environ={})


# -- what the read role may not do ------------------------------------------------------

OUTFILE = f"{tempfile.gettempdir()}/driftline-sqlsec-{os.getpid()}.txt"  # chDB writes it even read-only
REFUSED = [
    # (query, method, reason in the 403 text); mutation caught per line in the comment
    ("SELECT * FROM file('/etc/hostname', 'LineAsString')", "GET", "function file is not allowed"),  # deny set empty
    ("SELECT file('/etc/hostname')", "GET", "function file is not allowed"),  # DENIED_SCALAR_FUNCTIONS emptied
    ("SELECT FILE('/etc/hostname')", "GET", "function FILE is not allowed"),  # names compared case-sensitively
    ("SELECT * FROM url('http://127.0.0.1:9/', CSV, 'a String')", "GET", "function url is not allowed"),
    ("WITH t AS (SELECT * FROM (SELECT * FROM s3('http://127.0.0.1:9/b/k', CSV, 'a String'))) SELECT * FROM t",
     "POST", "function s3 is not allowed"),  # only top-level functions looked at
    ("SELECT * FROM view(SELECT 1)", "GET", "function view is not allowed"),  # allowlist widened to all
    ("SELECT catboostEvaluate('/etc/hostname', 1)", "GET", "function catboostEvaluate"),  # scalar deny set emptied
    ("/* x */ SELECT * FROM remote('127.0.0.1:9', system.one)", "POST", "function remote is not allowed"),
    ("DROP TABLE driftline.probe", "GET", "DropQuery is not allowed"),  # kind check left out (GET ran DROP)
    ("DROP TABLE driftline.probe", "POST", "DropQuery is not allowed"),
    ("INSERT INTO driftline.probe VALUES (7)", "POST", "INSERT through the worker's endpoint is not supported"),
    ("/* hi */ INSERT INTO driftline.probe VALUES (7)", "POST", "INSERT through the worker's endpoint"),
    ("-- hi\nINSERT INTO driftline.probe VALUES (7)", "POST", "INSERT through the worker's endpoint"),
    ("INSERT INTO FUNCTION file('probe.csv', 'CSV', 'a UInt8') SELECT 1", "POST", "INSERT through the worker's"),
    ("SET readonly = 1", "POST", "Set is not allowed"),
    ("USE system", "POST", "UseQuery is not allowed"),
    ("SELECT 1; DROP TABLE driftline.probe", "POST", "multi-statements are not allowed"),  # formatQuery step left out
    (f"SELECT 1 INTO OUTFILE '{OUTFILE}'", "POST", "INTO OUTFILE is not allowed"),  # outfile check left out
    (f"SELECT 1 UNION ALL SELECT 2 INTO OUTFILE '{OUTFILE}'", "POST", "INTO OUTFILE is not allowed"),
    ("SYSTEM SHUTDOWN", "POST", "SYSTEM is not allowed"),
    # the engine's AI functions call an LLM provider over the network (given a named collection),
    # AIEmbed is the engine's alias of aiEmbed. Catches: DENIED_SCALARS_SQL not loaded into the
    # policy (both ran, and answered 500 "requires credentials")
    ("SELECT aiGenerate(prompt) FROM driftline.llm_events", "POST", "function aiGenerate is not allowed"),
    ("SELECT AIEmbed('x', 'm')", "GET", "function AIEmbed is not allowed"),
    # other sessions' running query texts (an admin's DELETE WHERE user_id = ...). Catches: the
    # processes check left out (both answered 200)
    ("SHOW PROCESSLIST", "GET", "system.processes is not readable here"),
    ("SELECT query FROM system.`Processes`", "GET", "system.processes is not readable here"),
]


@pytest.mark.parametrize(("query", "method", "reason"), REFUSED, ids=[f"{m}:{q[:40]}" for q, m, _ in REFUSED])
def test_refused_statements(served: Served, query: str, method: str, reason: str) -> None:
    status, body, headers = q_ro(served, query, method)
    assert status == 403, body
    assert body.startswith("Code: 497. DB::Exception: driftline: ")
    assert reason in body
    assert headers["X-ClickHouse-Exception-Code"] == "497"


def test_refused_statements_left_no_trace(served: Served) -> None:
    # after the refusals above: the table is there and empty of forged rows, no file was written
    # (mutation caught: a check that answers 403 after running the statement)
    assert served.sink.query_rows("SELECT count() FROM driftline.probe WHERE n = 7") == [(0,)]
    assert served.sink.query_rows("EXISTS TABLE driftline.probe") == [(1,)]
    assert not Path(OUTFILE).exists()
    assert not (Path.cwd() / "probe.csv").exists()
    assert not (served.path / "user_files" / "probe.csv").exists()


def test_settings_and_database_do_not_stick(served: Served) -> None:
    # mutations caught: one long-lived endpoint connection (USE/?database= would stay "system" for the
    # next request); readonly left out of the connection (the changed setting would be accepted)
    assert q_ro(served, "SELECT currentDatabase()", params={"database": "system"})[:2] == (200, "system\n")
    assert q_ro(served, "SELECT currentDatabase()")[:2] == (200, "default\n")
    assert q_ro(served, "SELECT count() FROM one", params={"database": "system"})[:2] == (200, "1\n")
    status, body, _ = q_ro(served, "SELECT 1", params={"max_execution_time": "1000"})
    assert status == 403 and body.startswith("Code: 164.") and "readonly" in body.lower()
    status, body, _ = q_ro(served, "SELECT 1 SETTINGS readonly = 0")
    assert status == 403 and body.startswith("Code: 164.")
    assert q_ro(served, "SELECT getSetting('readonly'), getSetting('max_execution_time')")[:2] == (200, "1\t1\n")
    # the caller's unchanged settings pass (clickhouse-connect and others send some)
    assert q_ro(served, "SELECT 2", params={"readonly": "1"})[:2] == (200, "2\n")


def test_long_query_and_huge_result_are_bounded(served: Served) -> None:
    # mutations caught: max_execution_time / max_result_rows not set on the endpoint's connection
    t0 = time.monotonic()
    status, body, _ = q_ro(served, "SELECT sum(number) FROM numbers(1e12)", "POST")
    assert (status, body.split(".")[0]) == (500, "Code: 159")  # TIMEOUT_EXCEEDED after 1 s
    assert time.monotonic() - t0 < 10
    status, body, _ = q_ro(served, "SELECT number FROM numbers(1e7)", "POST")
    assert (status, body.split(".")[0]) == (500, "Code: 396")  # TOO_MANY_ROWS_OR_BYTES
    status, body, _ = q_ro(served, "SELECT number FROM numbers(1000) FORMAT CSV", "POST")
    assert status == 200 and body.count("\n") == 1000


def test_reads_still_work(served: Served) -> None:
    # the read role keeps what clients need: parameters, formats, SHOW/DESCRIBE/EXPLAIN, allowed table functions
    assert q_ro(served, "SELECT {x:UInt8} + 1", params={"param_x": "41"})[:2] == (200, "42\n")
    assert q_ro(served, "SELECT sum(number) FROM numbers(10)")[:2] == (200, "45\n")
    assert q_ro(served, "SELECT count() FROM generate_series(1, 5)")[:2] == (200, "5\n")
    status, body, headers = q_ro(served, "SELECT count() AS n FROM driftline.llm_events FORMAT JSONEachRow")
    assert (status, body, headers["X-ClickHouse-Format"]) == (200, '{"n":0}\n', "JSONEachRow")
    assert "probe" in q_ro(served, "SHOW TABLES FROM driftline")[1].split()
    assert q_ro(served, "DESCRIBE TABLE driftline.probe")[1].split("\t")[:2] == ["n", "UInt32"]
    assert q_ro(served, "EXPLAIN SYNTAX SELECT 1")[0] == 200
    assert q_ro(served, "SELECT 'a FORMAT JSON'")[:2] == (200, "a FORMAT JSON\n")
    # a parameter is substituted before the check: an Identifier cannot smuggle a table function in
    status, body, _ = q_ro(served, "SELECT * FROM {t:Identifier}", params={"param_t": "file('/etc/hostname')"})
    assert status != 200 and "hostname" not in body.replace("'/etc/hostname'", "")


# -- browsers -----------------------------------------------------------------------------

def test_foreign_host_and_origin_refused(served: Served) -> None:
    # mutations caught: the Host check left out (a DNS-rebound page reads answers as same-origin);
    # the Origin check left out (a page POSTs with credentials the browser cached)
    port = served.endpoints["ro"].port
    before = served.endpoints["ro"].guard.failures["host"]
    status, body, _ = q_ro(served, "SELECT 1", headers={"Host": f"rebind.example:{port}"})
    assert status == 403 and "DNS rebinding" in body and body.startswith("Code: 497.")
    status, body, _ = q_ro(served, "SELECT 1", "POST", headers={"Origin": "http://evil.example"})
    assert status == 403 and "other origins" in body
    assert served.endpoints["ro"].guard.failures["host"] == before + 2
    assert q_ro(served, "SELECT 1", headers={"Host": f"localhost:{port}"})[:2] == (200, "1\n")
    assert q_ro(served, "SELECT 1", "POST", headers={"Origin": f"http://127.0.0.1:{port}"})[:2] == (200, "1\n")


# -- the write role -----------------------------------------------------------------------

def test_write_role_only_with_opt_in_post_and_admin(served: Served) -> None:
    # mutations caught: writes allowed without --sql-allow-writes, over GET, or for user driftline;
    # the write role let through INSERT, CREATE with a File engine or ALTER ... FREEZE
    asyncio.run(asyncio.wait_for(served.sink.insert_rows("probe", [{"n": i} for i in range(100, 110)], ["n"]), 30))
    admin = _basic(ADMIN_USER, served.admin_password)
    delete = "ALTER TABLE driftline.probe DELETE WHERE n = 100"
    assert call(served.url("ro"), delete, method="POST", headers=admin)[0] == 403  # not opted in
    assert call(served.url("rw"), delete, method="GET", headers=admin)[0] == 403  # GET stays read-only
    assert call(served.url("rw"), delete, method="POST", headers=_basic(USER, served.password))[0] == 403
    for q, reason in [("INSERT INTO driftline.probe VALUES (7)", "INSERT"),
                      ("CREATE TABLE driftline.f (a UInt8) ENGINE = File(CSV)", "CreateQuery is not allowed"),
                      ("ALTER TABLE driftline.probe FREEZE", "ALTER FREEZE_ALL is not allowed"),
                      ("DELETE FROM driftline.probe WHERE n IN (SELECT * FROM file('/etc/hostname'))",
                       "function file"),
                      # parsed on a read-only connection first: the engine refuses the SETTINGS clause
                      (f"{delete} SETTINGS mutations_sync = 0", "Code: 164"),
                      # reads by the write role still run read-only (inline settings refused by the engine)
                      ("SELECT 1 SETTINGS format_template_row = '/etc/hostname' FORMAT Template", "Code: 164")]:
        status, body, _ = call(served.url("rw"), q, method="POST", headers=admin)
        assert status == 403 and reason in body, body
    assert call(served.url("rw"), "SELECT getSetting('readonly')", method="POST", headers=admin)[:2] == (200, "1\n")
    assert served.sink.query_rows("SELECT count() FROM driftline.probe WHERE n >= 100") == [(10,)]
    status, body, _ = call(served.url("rw"), delete, method="POST", headers=admin)
    assert status == 200, body
    status, body, _ = call(served.url("rw"), "DELETE FROM driftline.probe WHERE n = 101", method="POST",
                           headers=admin)
    assert status == 200, body
    assert served.sink.query_rows("SELECT count() FROM driftline.probe WHERE n >= 100") == [(8,)]
    asyncio.run(served.sink.acall(lambda c: c.command("TRUNCATE TABLE driftline.probe")))


# -- and the writer is untouched ----------------------------------------------------------

def test_writer_lanes_store_exactly_after_everything(served: Served) -> None:
    # runs last in this module (pytest keeps file order): after every attack above, the worker's own
    # write path stores exactly. Mutation caught: the endpoint running on the sink's query-lane client
    # (its readonly=1, limits and USE would then hold for the stages' inserts: they fail or go elsewhere)
    rows = [{"n": i} for i in range(1, 501)]

    async def write() -> None:
        await served.sink.insert_rows("probe", rows[:250], ["n"], ingest=True)
        await served.sink.insert_rows("probe", rows[250:], ["n"])  # the query lane: the stages' inserts

    asyncio.run(asyncio.wait_for(write(), 30))  # a refused write is retried forever: bound the wait
    assert served.sink.query_rows("SELECT count(), sum(n) FROM driftline.probe") == [(500, 125250)]

    def lane_state(c: Any) -> tuple[Any, ...]:
        return tuple(c.query("SELECT getSetting('readonly'), currentDatabase(), "
                             "getSetting('max_result_rows')").result_rows[0])

    assert served.sink.call(lane_state) == (0, "default", 0)
    assert asyncio.run(served.sink.acall(lane_state, ingest=True)) == (0, "default", 0)


def test_baseline_show_binds_keys_through_the_endpoint(served: Served) -> None:
    # `driftline baseline show` filters keys with {name:String} parameters, sent to the
    # worker's endpoint as param_*: a key holding quotes and backslashes matches exactly
    # itself, not its decoy one backslash apart. Catches: quoting by hand again (escaping
    # quotes but not backslashes is a syntax error or matches the decoy), or the endpoint
    # dropping param_* (the query then fails: unknown parameter).
    from driftline.streams.cli.baseline import SHOW_SQL, _where

    key, decoy = "a'b\\c", "a'b\\\\c"
    served.sink.call(lambda c: c.command(
        "INSERT INTO driftline.drift_references (app, model, prompt_version, field, version, mode, n) "
        "VALUES ({k:String}, 'm', 'v1', 'prompt', 1, 'auto', 7), ({d:String}, 'm', 'v1', 'prompt', 1, 'auto', 9)",
        parameters={"k": key, "d": decoy}))
    where, params = _where(key, None, None, "prompt")
    status, body, _ = q_ro(served, SHOW_SQL.format(db="driftline", where=where) + " FORMAT TSVRaw",
                           params={f"param_{k}": v for k, v in params.items()})
    assert status == 200, body
    assert [ln.split("\t")[:7] for ln in body.splitlines()] == [
        [key, "m", "v1", "prompt", "1", "auto", "7"]]
