"""The page's HTTP server (streams/ui/server.py) on 127.0.0.1 over a real chDB store:
authentication (exact 401 without or with a wrong password, on loopback too), the Host
check, the static files (the vendored uPlot byte for byte as the README pins it), the
security headers, a bad range (400) and the JSON of an empty store."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from driftline.streams.auth import Credentials
from driftline.streams.local.broker import free_port
from driftline.streams.sinks.clickhouse import ClickHouseSink
from driftline.streams.ui import server
from driftline.streams.ui.server import ClientRunner, serve_ui

STATIC = Path(server.__file__).parent / "static"
PASSWORD = "p" * 24


@pytest.fixture
async def page(tmp_path: Path) -> AsyncIterator[str]:
    dsn = f"chdb://{tmp_path / 'chdb'}"
    sink = ClickHouseSink(dsn)
    sink.ensure_schema()
    sink.close()
    runner = ClientRunner(dsn)
    stop = asyncio.Event()
    urls: list[str] = []
    creds = Credentials({"driftline": PASSWORD}, source="test")
    task = asyncio.create_task(serve_ui(runner, "driftline", "127.0.0.1", free_port(), creds, stop,
                                        on_ready=urls.append))
    for _ in range(100):
        if urls or task.done():
            break
        await asyncio.sleep(0.05)
    if task.done():
        task.result()
    yield urls[0].removesuffix("/ui/")
    stop.set()
    await task
    runner.close()


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


AUTH = _basic("driftline", PASSWORD)


async def _get(url: str, auth: str | None = AUTH, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    h = {**({"Authorization": auth} if auth else {}), **(headers or {})}
    async with aiohttp.ClientSession() as s, s.get(url, headers=h, allow_redirects=False) as r:
        return r.status, r.headers, await r.read()


async def test_nothing_without_the_password(page: str) -> None:
    for path in ("/ui", "/ui/", "/ui/static/app.js", "/ui/api/extent", "/ui/api/overview", "/ui/api/drift",
                 "/ui/api/alerts"):
        for auth in (None, _basic("driftline", "wrong-password-123456"), _basic("admin", PASSWORD)):
            status, headers, body = await _get(page + path, auth=auth)
            assert status == 401, (path, auth)
            assert headers["WWW-Authenticate"] == 'Basic realm="driftline", charset="UTF-8"'
            assert b"AUTHENTICATION_FAILED" in body and b"{" not in body  # no data, not even JSON
    port = page.rsplit(":", 1)[1]
    status, _, _ = await _get(page + "/ui/api/overview", headers={"Host": f"attacker.example:{port}"})
    assert status == 403  # DNS rebinding: only this server's own names


async def test_page_and_static_files(page: str) -> None:
    status, headers, _ = await _get(page + "/ui")
    assert (status, headers["Location"]) == (302, "/ui/")
    status, headers, body = await _get(page + "/ui/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert body == (STATIC / "index.html").read_bytes()
    assert "script-src 'self';" in headers["Content-Security-Policy"] and headers["Cache-Control"] == "no-store"
    readme = (STATIC / "README.md").read_text()
    for name, ctype in server.STATIC_FILES.items():
        status, headers, body = await _get(f"{page}/ui/static/{name}")
        assert (status, headers["Content-Type"]) == (200, ctype)
        assert body == (STATIC / name).read_bytes()
        if name.startswith("uPlot"):  # the vendored files are the ones the README pins
            assert re.search(rf"{re.escape(name)} \| `{hashlib.sha256(body).hexdigest()}`", readme), name
    for bad in ("README.md", "uPlot.LICENSE", "..%2fapi.py", "%2e%2e%2f%2e%2e%2fauth.py"):
        status, _, _ = await _get(f"{page}/ui/static/{bad}")
        assert status == 404, bad
    assert "1.6.32" in readme and (STATIC / "uPlot.LICENSE").read_text().startswith("The MIT License")


async def test_api_answers(page: str) -> None:
    status, _, body = await _get(page + "/ui/api/overview?from=1000&to=2000&app=x'--")
    assert (status, body) == (200, b'{"from":1000,"to":2000,"keys":[]}')
    status, _, body = await _get(page + "/ui/api/alerts?from=2000&to=1000")
    assert (status, body) == (400, b'{"error":"range: to (1000) must be after from (2000)"}')
    status, _, body = await _get(page + "/ui/api/drift?from=1000&to=2000")
    assert (status, body) == (200, b'{"from":1000,"to":2000,"series":[],"flagged":[],"references":[]}')
    status, _, body = await _get(page + "/ui/api/extent")
    assert status == 200 and body.startswith(b'{"from":null,"to":null,"now":')


def test_non_finite_numbers_become_null() -> None:
    assert server._finite({"a": [1.0, float("nan"), float("inf")], "b": (2, -float("inf"))}) == {
        "a": [1.0, None, None], "b": [2, None]}


def test_driftline_ui_command(tmp_path: Path) -> None:
    """``driftline ui`` prints its address (not the password), serves the page behind the
    password, and stops on Ctrl-C with exit status 0."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    store = tmp_path / "chdb"
    sink = ClickHouseSink(f"chdb://{store}")
    sink.ensure_schema()
    sink.close()
    port = free_port()
    env = {**os.environ, "DRIFTLINE_SQL_PASSWORD": PASSWORD}
    proc = subprocess.Popen([sys.executable, "-m", "driftline.streams.cli.main", "ui", "--clickhouse",
                             f"chdb://{store}", "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith(f"driftline ui: http://127.0.0.1:{port}/ui/ (user driftline, password in ")
        assert PASSWORD not in line
        url = f"http://127.0.0.1:{port}/ui/api/extent"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        assert refused.value.code == 401
        req = urllib.request.Request(url, headers={"Authorization": AUTH})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200 and r.read().startswith(b'{"from":null,"to":null,"now":')
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
