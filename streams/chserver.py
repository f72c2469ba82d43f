"""A ClickHouse-HTTP-compatible endpoint served by the worker over its embedded chDB.

A chDB path can be opened by one process at a time, and the worker holds it.
So that ``driftline sql``, clickhouse-connect, ``curl`` and any other ClickHouse
HTTP client still reach the embedded store, the worker answers the ClickHouse
HTTP interface on 127.0.0.1: ``GET /ping``, and ``GET``/``POST /`` with the query
in ``?query=`` and/or the body, ``default_format``, ``database`` and
``param_*`` query parameters. Results are chDB's own bytes in the requested
format (Native, RowBinaryWithNamesAndTypes, TabSeparated, JSON, ...), errors come
back as HTTP 500 with ClickHouse's ``Code: N. DB::Exception`` text. Writes go
through Kafka; the endpoint refuses ``INSERT`` with a data body.

The endpoint's address is written to ``<chdb path>/.driftline-endpoint`` so
that clients configured with the same ``chdb://`` DSN find it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from aiohttp import web

from driftline.streams.sinks import ClickHouseSink

log = logging.getLogger("driftline.chserver")

__all__ = ["ClickHouseEndpoint", "READ_QUERY", "endpoint_file", "read_endpoint"]

ENDPOINT_FILE = ".driftline-endpoint"
_FORMAT_RE = re.compile(r"\bFORMAT\s+([A-Za-z0-9_]+)\s*;?\s*$", re.IGNORECASE)
READ_QUERY = re.compile(r"^\s*(\(|SELECT|WITH|SHOW|DESCRIBE|DESC|EXISTS|EXPLAIN)\b", re.IGNORECASE)
_INSERT_RE = re.compile(r"^\s*INSERT\b", re.IGNORECASE)
_INTERNAL_PARAMS = frozenset({
    "query", "default_format", "database", "query_id", "session_id", "session_timeout",
    "session_check", "compress", "decompress", "user", "password", "quota_key",
    "enable_http_compression", "wait_end_of_query", "client_protocol_version",
})


def endpoint_file(chdb_path: str | Path) -> Path:
    return Path(chdb_path) / ENDPOINT_FILE


def read_endpoint(chdb_path: str | Path) -> str | None:
    """The URL of the worker that holds ``chdb_path``, if one wrote it."""
    f = endpoint_file(chdb_path)
    try:
        return f.read_text().strip() or None
    except OSError:
        return None


class ClickHouseEndpoint:
    def __init__(self, sink: ClickHouseSink, host: str = "127.0.0.1", port: int = 8123) -> None:
        self.sink = sink
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None
        self._written: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get("/ping", self._ping)
        app.router.add_get("/", self._query)
        app.router.add_post("/", self._query)
        return app

    async def start(self, chdb_path: str | None = None) -> None:
        self._runner = web.AppRunner(self.make_app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            server = getattr(site, "_server", None)
            if server is not None and server.sockets:
                self.port = int(server.sockets[0].getsockname()[1])
        if chdb_path:
            self._written = endpoint_file(chdb_path)
            self._written.parent.mkdir(parents=True, exist_ok=True)
            self._written.write_text(self.url + "\n")
        log.info("ClickHouse HTTP endpoint over the embedded store on %s", self.url)

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

    async def _ping(self, request: web.Request) -> web.Response:
        return web.Response(text="Ok.\n")

    async def _query(self, request: web.Request) -> web.Response:
        params = request.query
        body = await request.read() if request.method == "POST" else b""
        q = params.get("query", "")
        if body:
            if q and _INSERT_RE.match(q):
                return _error(501, "INSERT through the worker's endpoint is not supported: "
                                   "produce events to Kafka (driftline emit)")
            q = f"{q}\n{body.decode('utf-8', 'replace')}" if q else body.decode("utf-8", "replace")
        q = q.strip()
        if not q:
            return _error(400, "Empty query", code=62)
        if _INSERT_RE.match(q):
            return _error(501, "INSERT through the worker's endpoint is not supported: "
                               "produce events to Kafka (driftline emit)")
        fmt = None
        m = _FORMAT_RE.search(q)
        if m:
            fmt = m.group(1)
            q = q[: m.start()].rstrip()
        elif READ_QUERY.match(q):
            fmt = params.get("default_format") or "TabSeparated"
        qparams: dict[str, Any] = {k[6:]: v for k, v in params.items() if k.startswith("param_")}
        settings = {k: v for k, v in params.items()
                    if k not in _INTERNAL_PARAMS and not k.startswith("param_")}
        database = params.get("database") or request.headers.get("X-ClickHouse-Database")
        q = q.rstrip(";")

        def run(c: Any) -> bytes:
            sql = q
            if qparams:
                # ClickHouse server-side parameters {name:Type}: pass them as query settings
                for k, v in qparams.items():
                    settings[f"param_{k}"] = v
            if database and database != "default" and re.fullmatch(r"[A-Za-z0-9_]+", database):
                c.command(f"USE {database}")  # the worker's own statements are all qualified
            if fmt is None:
                out = c.command(sql, settings=settings or None)
                return b"" if out is None else (str(out) + "\n").encode() if not isinstance(out, bytes) else out
            return bytes(c.raw_query(sql, settings=settings or None, fmt=fmt))

        try:
            data = await self.sink.acall(run)
        except Exception as exc:  # noqa: BLE001 - errors go back to the client
            text = str(exc)
            mcode = re.search(r"Code: (\d+)", text)
            return _error(500, text, code=int(mcode.group(1)) if mcode else 1000)
        headers = {"X-ClickHouse-Server-Display-Name": "driftline-chdb",
                   "X-ClickHouse-Timezone": "UTC"}
        if fmt:
            headers["X-ClickHouse-Format"] = fmt
        return web.Response(body=data, headers=headers,
                            content_type="text/plain" if not fmt or fmt.startswith(("Tab", "CSV", "JSON", "Pretty", "Vertical", "Markdown")) else "application/octet-stream")


def _error(status: int, message: str, code: int = 0) -> web.Response:
    text = message if message.startswith("Code:") else f"Code: {code}. DB::Exception: {message}"
    return web.Response(status=status, text=text + "\n",
                        headers={"X-ClickHouse-Exception-Code": str(code)})
