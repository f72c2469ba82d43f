"""The page's HTTP routes: ``/ui/`` (static HTML, JS, CSS and the vendored uPlot) and
``/ui/api/*`` (JSON, streams/ui/api.py).

Served two ways, behind the same authentication as the SQL endpoint (streams/auth.py:
user ``driftline`` and its password, on loopback too, since the page shows stored data):

- by the worker, on the port of ``/metrics`` (streams/app.py), its queries on the sink's
  query lane (``ClickHouseSink.acall``: ``max_execution_time``, never the ingest lane);
- by ``driftline ui`` (:func:`serve_ui`) against any ClickHouse DSN, its queries on one
  client of its own, on one thread (:class:`ClientRunner`).

Answers: the API's JSON (non-finite numbers as ``null``), 400 ``{"error": …}`` for a bad
range or filter, 502 ``{"error": …}`` when the query failed. Every answer carries a
Content-Security-Policy that allows only this origin's scripts (no inline script, no
CDN) and ``Cache-Control: no-store`` (the data is private).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

from aiohttp import web

from driftline.streams.ui import api

log = logging.getLogger("driftline.ui")

__all__ = ["ClientRunner", "STATIC_FILES", "add_ui", "serve_ui"]

#: ``run(fn)``: runs ``fn(client)`` where the client lives and returns its result
Runner = Callable[[Callable[[Any], Any]], Awaitable[Any]]

#: file -> content type; nothing else is served under /ui/static/
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
ENDPOINTS: dict[str, Callable[..., dict[str, Any]]] = {
    "overview": api.overview, "drift": api.drift, "alerts": api.alerts,
}


def _static(name: str) -> bytes:
    return resources.files("driftline.streams.ui").joinpath("static", name).read_bytes()


def _finite(x: Any) -> Any:
    """``x`` with NaN and infinities as None (JSON has neither)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(_finite(data), allow_nan=False, separators=(",", ":")), status=status,
                        content_type="application/json", headers=HEADERS)


def add_ui(app: web.Application, run: Runner, database: str, *,
           now_ms: Callable[[], int] = lambda: int(time.time() * 1000)) -> None:
    """Add ``/ui``, ``/ui/``, ``/ui/static/{file}`` and ``/ui/api/{extent,overview,drift,alerts}``
    to ``app`` (whose middleware must authenticate ``/ui``: streams/auth.py ``guard_for_bind``
    with ``always=("/ui",)``). ``run(fn)`` runs ``fn(client)`` on a ClickHouse client."""
    api._db(database)  # a bad name fails here, not on the first request
    cache = {name: _static(name) for name in STATIC_FILES}  # packaged files: read once

    async def index(request: web.Request) -> web.Response:
        if request.path == "/ui":
            raise web.HTTPFound("/ui/")
        return web.Response(body=cache["index.html"], content_type="text/html", charset="utf-8",
                            headers=HEADERS)

    async def static(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_FILES:
            raise web.HTTPNotFound()
        return web.Response(body=cache[name], headers={**HEADERS, "Content-Type": STATIC_FILES[name]})

    async def extent(request: web.Request) -> web.Response:
        try:
            return _json({**await run(lambda c: api.extent(c, database)), "now": now_ms()})
        except Exception as exc:  # noqa: BLE001 - said to the page, logged here
            return _failed("extent", exc)

    def endpoint(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        fn = ENDPOINTS[name]

        async def handle(request: web.Request) -> web.Response:
            try:
                sel = api.parse_selection(request.query, now_ms())
            except ValueError as exc:
                return _json({"error": str(exc)}, 400)
            try:
                return _json(await run(lambda c: fn(c, database, sel)))
            except Exception as exc:  # noqa: BLE001
                return _failed(name, exc)

        return handle

    app.router.add_get("/ui", index)
    app.router.add_get("/ui/", index)
    app.router.add_get("/ui/static/{name}", static)
    app.router.add_get("/ui/api/extent", extent)
    for name in ENDPOINTS:
        app.router.add_get(f"/ui/api/{name}", endpoint(name))


def _failed(what: str, exc: BaseException) -> web.Response:
    log.warning("ui: %s query failed: %s", what, exc)
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return _json({"error": f"{what}: query failed: {first[:300]}"}, 502)


class ClientRunner:
    """One clickhouse-connect client for ``dsn`` (made by streams/cli/sql.py ``client_for``,
    so a chDB store held by a worker is read through its SQL endpoint), used on one thread;
    a client whose query failed is replaced on the next call."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ui-clickhouse")
        self._client: Any = None

    def _call(self, fn: Callable[[Any], Any]) -> Any:
        from driftline.streams.cli.sql import client_for

        if self._client is None:
            self._client = client_for(self.dsn)
        try:
            return fn(self._client)
        except Exception:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
            raise

    async def __call__(self, fn: Callable[[Any], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._call, fn)

    def close(self) -> None:
        def _close() -> None:
            if self._client is not None:
                with contextlib.suppress(Exception):
                    self._client.close()
                self._client = None

        self._pool.submit(_close).result()
        self._pool.shutdown()


async def serve_ui(run: Runner, database: str, host: str, port: int, credentials: Any,
                   stop: asyncio.Event, on_ready: Callable[[str], None] | None = None,
                   on_failure: Callable[[str], None] | None = None) -> None:
    """Serve the page on ``host:port`` (0: a free port) until ``stop`` is set; ``on_ready``
    gets its address (``http://host:port/ui/``). Every request needs ``credentials``."""
    from driftline.streams.auth import allowed_hosts, guard_for_bind, is_loopback

    guard = guard_for_bind(host, credentials, on_failure=on_failure, always=("/ui",))
    webapp = web.Application(middlewares=[guard.middleware])
    add_ui(webapp, run, database)
    runner = web.AppRunner(webapp, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        server = getattr(site, "_server", None)
        bound = int(server.sockets[0].getsockname()[1]) if server and server.sockets else port
        if is_loopback(host):
            guard.hosts = allowed_hosts(host, bound)
        if on_ready is not None:
            shown = f"[{host}]" if ":" in host else host
            on_ready(f"http://{shown}:{bound}/ui/")
        await stop.wait()
    finally:
        await runner.cleanup()
