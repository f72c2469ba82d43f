"""Fault injection for the fault suite: a TCP proxy that can cut a link, and chDB over HTTP.

:class:`FaultProxy` forwards TCP connections from a local port to a target on its
own asyncio loop (one daemon thread). ``cut()`` closes the listening socket (new
connections are refused: ``ECONNREFUSED``) and aborts every open connection on
both sides (the peer sees a reset); ``restore()`` listens again on the same
port. Nothing is delayed or reordered: while the link is up, bytes pass as is.

``python tests/faultproxy.py chdb-http PATH PORT`` serves the chDB store at PATH
over the ClickHouse HTTP interface on 127.0.0.1:PORT, *including* inserts and DDL
(the worker's own endpoint, streams/local/sql_endpoint.py, refuses them): the fault suite runs
a worker against ``http://127.0.0.1:<proxy>/driftline`` with this process behind
the proxy, so that "ClickHouse is unreachable" is a real broken TCP link on the
worker's HTTP insert path.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field

__all__ = ["FaultProxy", "serve_chdb_http"]


@dataclass
class _Stats:
    accepted: int = 0
    refused_while_cut: int = 0
    aborted: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    cuts: int = 0


@dataclass
class FaultProxy:
    """Forward 127.0.0.1:``port`` to ``target_host``:``target_port``; cut and restore on command.

    >>> with FaultProxy("127.0.0.1", 9092) as p:      # doctest: +SKIP
    ...     p.cut(); p.restore()
    """

    target_host: str
    target_port: int
    port: int = 0
    stats: _Stats = field(default_factory=_Stats)

    def __post_init__(self) -> None:
        if not 0 < self.target_port < 65536:
            raise ValueError(f"target_port must be a TCP port, got {self.target_port}")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._links: set[asyncio.Transport] = set()
        self._up = False

    # -- control (any thread) ------------------------------------------------------
    def start(self) -> FaultProxy:
        self._thread.start()
        self._run(self._listen())
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._run(self._cut())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def cut(self) -> None:
        """Refuse new connections and reset every open one, until :meth:`restore`."""
        self._run(self._cut())
        self.stats.cuts += 1

    def restore(self) -> None:
        self._run(self._listen())

    @property
    def up(self) -> bool:
        return self._up

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    # -- on the proxy's loop ---------------------------------------------------------
    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._up = True

    async def _cut(self) -> None:
        self._up = False
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for t in list(self._links):
            t.abort()
            self.stats.aborted += 1
        self._links.clear()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        if not self._up:
            self.stats.refused_while_cut += 1
            cw.transport.abort()
            return
        try:
            ur, uw = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            cw.transport.abort()
            return
        if not self._up:  # cut while connecting
            cw.transport.abort()
            uw.transport.abort()
            return
        self.stats.accepted += 1
        pair = (cw.transport, uw.transport)
        self._links.update(pair)  # type: ignore[arg-type]
        try:
            await asyncio.gather(self._pipe(cr, uw, up=True), self._pipe(ur, cw, up=False))
        finally:
            for t in pair:
                self._links.discard(t)  # type: ignore[arg-type]
                t.close()

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, *, up: bool) -> None:
        try:
            while data := await r.read(1 << 16):
                if up:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
                w.write(data)
                await w.drain()
            if w.can_write_eof():
                w.write_eof()
        except (OSError, asyncio.IncompleteReadError, RuntimeError):
            w.transport.abort()


# --------------------------------------------------------------------------------------
# chDB over the ClickHouse HTTP interface, inserts included


def serve_chdb_http(path: str, port: int) -> None:
    """Serve the chDB store at ``path`` on 127.0.0.1:``port`` until SIGTERM (blocks).

    A stand-in for a ClickHouse *server* (the worker writes through it: DDL, inserts,
    reads), so it is open, like a ClickHouse server's ``default`` user without a
    password (unless ``FAULTPROXY_CH_PASSWORD`` is set: then every request must carry
    it); test-only, on loopback. (The worker's own endpoint, streams/local/sql_endpoint.py,
    is authenticated and read-only and so cannot play this part.) Queries run on a
    ClickHouseSink's query lane; ``INSERT … FORMAT X`` with a body (clickhouse-connect's
    insert: the statement in ``?query=`` or on the body's first line, the body possibly
    an lz4 frame) is written to a temporary file and run as ``INSERT … FROM INFILE …
    FORMAT X`` on chDB, so an insert is all-or-nothing exactly as in chDB itself.
    """
    import os
    import re
    import signal
    import tempfile
    from typing import Any

    from aiohttp import web

    from driftline.streams.sinks.clickhouse import ClickHouseSink

    insert_re = re.compile(r"^\s*(INSERT\s+INTO\s+.+?)\s+(FORMAT\s+\w+)\s*$", re.IGNORECASE | re.DOTALL)
    format_re = re.compile(r"\bFORMAT\s+([A-Za-z0-9_]+)\s*;?\s*$", re.IGNORECASE)
    read_re = re.compile(r"^\s*(\(|SELECT|WITH|SHOW|DESCRIBE|DESC|EXISTS|EXPLAIN)\b", re.IGNORECASE)
    internal = {"query", "default_format", "database", "compress", "decompress", "query_id", "session_id",
                "session_timeout", "session_check", "user", "password", "quota_key", "enable_http_compression",
                "wait_end_of_query", "client_protocol_version"}
    sink = ClickHouseSink(f"chdb://{path}")

    def error(exc: BaseException) -> web.Response:
        code = re.search(r"Code: (\d+)", str(exc))
        text = str(exc) if str(exc).startswith("Code:") else \
            f"Code: {code.group(1) if code else 1000}. DB::Exception: {exc}"
        return web.Response(status=500, text=text + "\n",
                            headers={"X-ClickHouse-Exception-Code": code.group(1) if code else "1000"})

    import base64
    import hmac

    # FAULTPROXY_CH_PASSWORD set: every request must carry it (HTTP basic auth, as
    # clickhouse-connect sends it, or X-ClickHouse-Key), else ClickHouse's code 516
    password = os.environ.get("FAULTPROXY_CH_PASSWORD")

    def _authorized(request: web.Request) -> bool:
        got = request.headers.get("X-ClickHouse-Key", "")
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            with contextlib.suppress(ValueError):
                got = base64.b64decode(auth[6:]).decode().partition(":")[2]
        return hmac.compare_digest(got.encode(), (password or "").encode())

    async def query(request: web.Request) -> web.Response:
        if password is not None and not _authorized(request):
            return web.Response(status=401, text="Code: 516. DB::Exception: default: Authentication failed\n",
                                headers={"X-ClickHouse-Exception-Code": "516"})
        body = await request.read() if request.method == "POST" else b""  # gzip/deflate/br undone
        if body[:4] == b"\x04\x22\x4d\x18":  # clickhouse-connect's lz4 frame (no header says so)
            import lz4.frame

            body = lz4.frame.decompress(body)
        q = request.query.get("query", "")
        if not q and body[:6].upper() == b"INSERT":
            head, _, body = body.partition(b"\n")  # clickhouse-connect: statement + data
            q = head.decode()
        settings: dict[str, Any] = {k: v for k, v in request.query.items()
                                    if k not in internal and not k.startswith("param_")}
        m = insert_re.match(q)
        if m is not None:
            with tempfile.NamedTemporaryFile(dir=path, suffix=".ins", delete=False) as f:
                f.write(body)
                fname = f.name
            sql = f"{m.group(1)} FROM INFILE '{fname}' {m.group(2)}"
            try:
                await sink.acall(lambda c: c.command(sql, settings=settings or None))
            except Exception as exc:  # noqa: BLE001 - errors go back to the client
                return error(exc)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(fname)
            return web.Response(text="", headers={"X-ClickHouse-Summary": "{}"})
        if body:
            q = f"{q}\n{body.decode('utf-8', 'replace')}" if q else body.decode("utf-8", "replace")
        q = q.strip()
        fm = format_re.search(q)
        fmt = fm.group(1) if fm else (request.query.get("default_format") or "TabSeparated"
                                      if read_re.match(q) else None)
        if fm:
            q = q[: fm.start()].rstrip()
        q = q.rstrip(";")
        for k, v in request.query.items():
            if k.startswith("param_"):
                settings[k] = v

        def run(c: Any) -> bytes:
            if fmt is None:
                out = c.command(q, settings=settings or None)
                return b"" if out is None else out if isinstance(out, bytes) else (str(out) + "\n").encode()
            return bytes(c.raw_query(q, settings=settings or None, fmt=fmt))

        try:
            data = await sink.acall(run)
        except Exception as exc:  # noqa: BLE001 - errors go back to the client
            return error(exc)
        headers = {"X-ClickHouse-Server-Display-Name": "driftline-chdb", "X-ClickHouse-Timezone": "UTC"}
        if fmt:
            headers["X-ClickHouse-Format"] = fmt
        text_like = not fmt or fmt.startswith(("Tab", "CSV", "JSON", "Pretty", "Vertical", "Markdown"))
        return web.Response(body=data, headers=headers,
                            content_type="text/plain" if text_like else "application/octet-stream")

    async def ping(request: web.Request) -> web.Response:
        return web.Response(text="Ok.\n")

    async def main() -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get("/ping", ping)
        app.router.add_get("/", query)
        app.router.add_post("/", query)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"serving {path} on http://127.0.0.1:{port}", flush=True)
        await stop.wait()
        await runner.cleanup()
        sink.close()

    asyncio.run(main())


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 4 and sys.argv[1] == "chdb-http":
        serve_chdb_http(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit("usage: python tests/faultproxy.py chdb-http PATH PORT")
