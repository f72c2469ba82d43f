"""The writer role of the SQL endpoint: other workers of the machine write to the store, and no more.

Real components, no Kafka: the ClickHouseEndpoint over a chDB store with
``allow_workers`` (``--sql-allow-workers``), served by aiohttp on 127.0.0.1
from a thread of its own; requests are plain HTTP (urllib), and a real
``ClickHouseSink`` on ``http://driftline_writer@127.0.0.1:PORT/driftline``
(clickhouse-connect: its schema statements, Native and ArrowStream inserts with
their insert_deduplication_token, lz4 bodies). Each test says which mutation of
the code it catches.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from driftline.streams.auth import ADMIN_USER, USER, WRITER_USER, credentials_path, load_credentials
from driftline.streams.local.sql_endpoint import ClickHouseEndpoint
from driftline.streams.sinks.clickhouse import ClickHouseSink


@dataclass
class Served:
    sink: ClickHouseSink
    endpoint: ClickHouseEndpoint
    off: ClickHouseEndpoint
    passwords: dict[str, str]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    path = tmp_path_factory.mktemp("sqlwriter") / "chdb"
    sink = ClickHouseSink(f"chdb://{path}")
    sink.ensure_schema()
    sink.call(lambda c: c.command("CREATE DATABASE IF NOT EXISTS other"))
    sink.call(lambda c: c.command("CREATE TABLE other.t (n UInt32) ENGINE = MergeTree ORDER BY n"))
    creds = load_credentials(credentials_path(path), users=(USER, ADMIN_USER, WRITER_USER), environ={})
    ready = threading.Event()
    box: dict[str, Any] = {}

    def serve() -> None:
        async def main() -> None:
            on = ClickHouseEndpoint(sink, port=0, credentials=creds, allow_workers=True)
            off = ClickHouseEndpoint(sink, port=0, credentials=creds)  # the writer role not enabled
            await on.start(str(path))
            await off.start()
            box["eps"], box["loop"], box["stop"] = (on, off), asyncio.get_running_loop(), asyncio.Event()
            ready.set()
            await box["stop"].wait()
            await on.stop()
            await off.stop()

        asyncio.run(main())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert ready.wait(30)
    try:
        yield Served(sink, box["eps"][0], box["eps"][1], dict(creds.users))
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        t.join(30)
        sink.close()


def post(served: Served, query: str, body: bytes = b"", *, user: str = WRITER_USER, password: str | None = None,
         endpoint: ClickHouseEndpoint | None = None, **params: str) -> tuple[int, str]:
    ep = endpoint or served.endpoint
    pw = served.passwords[user] if password is None else password
    url = ep.url + "/?" + urllib.parse.urlencode({"query": query, **params})
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def count(served: Served, sql: str) -> str:
    return served.sink.call(lambda c: str(c.query(sql).result_rows[0][0]))


def refused(msg: str) -> tuple[int, str]:
    return 403, f"Code: 497. DB::Exception: driftline: {msg}. (ACCESS_DENIED)\n"


ROWS = b"".join(b'{"event_id": "w-%d", "timestamp": "2026-01-01 00:00:00", "app": "a", "model": "m", '
                b'"latency_ms": 1.5, "source_topic": "t"}\n' % i for i in range(7))


def test_writer_insert_stored_exactly(served: Served) -> None:
    # mutation caught: the writer role refused like the read role (INSERT always refused), or
    # the body not stored / stored twice (data taken as statement text, or run twice)
    assert post(served, "INSERT INTO driftline.llm_events FORMAT JSONEachRow", ROWS) == (200, "")
    assert count(served, "SELECT count() FROM driftline.llm_events WHERE event_id LIKE 'w-%'") == "7"
    # the statement in the body's first line, data after it (clickhouse-connect's uncompressed form)
    st = post(served, "", b"INSERT INTO llm_events (event_id, app) FORMAT CSV\n\"w-x\",\"b\"\n", database="driftline")
    assert st == (200, "")
    assert count(served, "SELECT count() FROM driftline.llm_events WHERE event_id LIKE 'w-%'") == "8"


def test_real_sink_over_http_with_the_writer_password(served: Served) -> None:
    # mutation caught: a schema statement of ensure_schema refused (CREATE texts compared loosely
    # or not at all, an ALTER form missing), or the insert settings refused / dropped (the
    # writer's reads on readonly=1: clickhouse-connect then treats insert_deduplication_token as
    # readonly); the second insert with the same token must not add rows
    u = served.endpoint.url.removeprefix("http://")
    sink = ClickHouseSink(f"http://{WRITER_USER}:{served.passwords[WRITER_USER]}@{u}/driftline")
    try:
        sink.ensure_schema()
        rows = [{"event_id": f"s-{i}", "app": "a", "model": "m", "latency_ms": 2.0} for i in range(5)]

        async def go() -> None:
            await sink.insert_rows("llm_events", rows, ["event_id", "app", "model", "latency_ms"], token="tok-1")
            await sink.insert_rows("llm_events", rows, ["event_id", "app", "model", "latency_ms"], token="tok-1")

        asyncio.run(go())
    finally:
        sink.close()
    assert count(served, "SELECT count() FROM driftline.llm_events WHERE event_id LIKE 's-%'") == "5"


@pytest.mark.parametrize(("query", "reason"), [
    # mutation caught: the INSERT target read from the first Identifier only (a table function
    # is a Function node): files written anywhere the worker may write
    ("INSERT INTO FUNCTION file('/tmp/driftline-pwned.csv', 'CSV') SELECT 1",
     "INSERT INTO FUNCTION is not allowed: the writer role writes only to the tables of database driftline"),
    # mutation caught: the database of the target not compared with the store's
    ("INSERT INTO other.t SELECT 1",
     "INSERT on database other is not allowed: the writer role writes only to the tables of database driftline"),
    # mutation caught: any table of the database accepted (not only schemas/tables.sql's)
    ("INSERT INTO driftline.nope SELECT 1",
     "INSERT on driftline.nope is not allowed: not a table of driftline's schema"),
    # mutation caught: the writer allowed every statement kind the admin may run
    ("DROP TABLE driftline.llm_events",
     "DropQuery is not allowed for the writer role: it inserts into driftline's tables and runs the "
     "worker's schema statements only"),
    # mutation caught: ALTER commands not restricted to ensure_schema's forms
    ("ALTER TABLE driftline.llm_events DELETE WHERE 1",
     "this ALTER is not allowed: the writer role runs only the schema statements of the worker (MODIFY "
     "SETTING non_replicated_deduplication_window, ADD COLUMN IF NOT EXISTS, MODIFY/REMOVE TTL, MODIFY "
     "COLUMN ... TTL)"),
    # mutation caught: CREATE accepted without comparing with the packaged texts (an engine that
    # reaches the file system)
    ("CREATE TABLE IF NOT EXISTS driftline.x (n UInt8) ENGINE = File(CSV)",
     "this CREATE is not allowed: the writer role runs only driftline's own CREATE ... IF NOT EXISTS "
     "statements (schemas/tables.sql)"),
    # mutation caught: the function deny list skipped on the writer's INSERT ... SELECT
    ("INSERT INTO driftline.llm_events (event_id) SELECT * FROM url('http://127.0.0.1:1/x', 'CSV', 'a String')",
     "function url is not allowed: it reaches files, the network or other servers"),
])
def test_writer_refusals(served: Served, query: str, reason: str) -> None:
    assert post(served, query) == refused(reason)


def test_refusals_left_no_trace(served: Served) -> None:
    # mutation caught: a refused statement run anyway (checked after running)
    assert not Path("/tmp/driftline-pwned.csv").exists()
    assert count(served, "SELECT count() FROM system.tables WHERE database = 'driftline' AND name = 'x'") == "0"
    assert count(served, "SELECT count() FROM other.t") == "0"
    assert count(served, "SELECT count() FROM system.tables WHERE database = 'driftline' "
                         "AND name = 'llm_events'") == "1"


def test_read_user_insert_still_refused(served: Served) -> None:
    # mutation caught: the writer path taken for any user (the role not checked)
    assert post(served, "INSERT INTO driftline.llm_events FORMAT JSONEachRow", ROWS, user=USER) == refused(
        "INSERT through the worker's endpoint is not supported: produce events to Kafka (driftline emit)")


def test_writer_off_without_allow_workers_and_wrong_password(served: Served) -> None:
    # mutation caught: the writer role served without --sql-allow-workers
    assert post(served, "INSERT INTO driftline.llm_events FORMAT JSONEachRow", ROWS, endpoint=served.off) == (
        403, "Code: 497. DB::Exception: driftline: the writer role writes with POST, on a worker started with "
             "--sql-allow-workers. (ACCESS_DENIED)\n")
    # mutation caught: the writer's password not checked (a known user name enough)
    assert post(served, "INSERT INTO driftline.llm_events FORMAT JSONEachRow", ROWS, password="x" * 32) == (
        401, "Code: 516. DB::Exception: driftline: Authentication failed: password is incorrect, or there is no "
             "user with such name. (AUTHENTICATION_FAILED)\n")
    assert count(served, "SELECT count() FROM driftline.llm_events WHERE event_id LIKE 'w-%'") == "8"
