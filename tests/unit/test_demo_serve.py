"""The end of ``driftline demo``: the page served on the demo's store (streams/cli/demo.py
``_serve_page``) over a real chDB store and real HTTP on 127.0.0.1, and when it serves."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import signal
import socket
from pathlib import Path

import aiohttp
from rich.console import Console

from driftline.streams.auth import CREDENTIALS_FILE, USER, load_credentials
from driftline.streams.cli import demo
from driftline.streams.sinks.clickhouse import ClickHouseSink


class _Tty(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_serves_by_default_only_from_a_terminal() -> None:
    """A script, a pipe or CI (no terminal on stdin or stdout) never waits for a Ctrl-C.
    Mutation caught: serving by default whatever the streams are."""
    assert demo.serve_default(None, _Tty(True), _Tty(True)) is True
    assert demo.serve_default(None, _Tty(False), _Tty(True)) is False
    assert demo.serve_default(None, _Tty(True), _Tty(False)) is False
    assert demo.serve_default(False, _Tty(True), _Tty(True)) is False
    assert demo.serve_default(True, _Tty(False), _Tty(False)) is True


async def test_the_page_is_served_until_ctrl_c(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The demo prints the page's address and where the password is (never the password),
    the page answers 401 without it and 200 with it, a taken port falls back to a free one,
    and SIGINT (Ctrl-C) stops it. Mutations caught: printing the password, serving without
    credentials, failing on a taken port, Ctrl-C not stopping the server."""
    dsn = f"chdb://{tmp_path / 'chdb'}"
    sink = ClickHouseSink(dsn)
    sink.ensure_schema()
    sink.close()
    password = load_credentials(tmp_path / "chdb" / CREDENTIALS_FILE, users=(USER,)).users[USER]
    out = io.StringIO()
    monkeypatch.setattr(demo, "console", Console(file=out, width=80, color_system=None))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        task = asyncio.create_task(demo._serve_page(dsn, busy))
        for _ in range(200):
            if "/ui/" in out.getvalue() or task.done():
                break
            await asyncio.sleep(0.05)
        if task.done():
            task.result()
    text = out.getvalue()
    url = re.search(r"http://127\.0\.0\.1:(\d+)/ui/", text)
    assert url is not None and int(url.group(1)) != busy, text
    assert f"port {busy} is not free" in text and "a free port instead" in text
    assert f"user {USER}, password in {tmp_path / 'chdb' / CREDENTIALS_FILE}" in text
    assert password not in text
    async with aiohttp.ClientSession() as s:
        async with s.get(url.group(0)) as r:
            assert r.status == 401
        auth = "Basic " + base64.b64encode(f"{USER}:{password}".encode()).decode()
        async with s.get(url.group(0), headers={"Authorization": auth}) as r:
            assert r.status == 200 and b"<html" in (await r.read()).lower()
        async with s.get(url.group(0).replace("/ui/", "/ui/api/extent"), headers={"Authorization": auth}) as r:
            assert r.status == 200
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
    await asyncio.wait_for(task, 10)
    assert "the page stopped" in out.getvalue()
    # the handler is gone with the page: Ctrl-C is Python's KeyboardInterrupt again
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
