"""Headless Chromium (Debian's ``chromium``) driven over the Chrome DevTools Protocol.

No browser download and no new dependency: chromium is started with
``--remote-debugging-port=0``, the port is read from ``DevToolsActivePort`` in its
profile directory, a tab is opened with ``PUT /json/new`` and driven over its
websocket with aiohttp's client. Console messages, uncaught exceptions and failed
loads are collected so a test can require that there were none.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Tab:
    """One tab: ``call`` a CDP method, ``eval`` JavaScript, ``screenshot``; ``errors`` lists
    console errors, uncaught exceptions and failed requests seen so far."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
                continue
            self.events.append(data)
            method, p = data.get("method"), data.get("params", {})
            if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                self.errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif method == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                self.errors.append("exception: " + str(d.get("exception", {}).get("description", d.get("text"))))
            elif method == "Log.entryAdded" and p["entry"].get("level") == "error":
                self.errors.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif method == "Network.loadingFailed" and not p.get("canceled"):
                self.errors.append(f"network: {p.get('errorText')}")

    async def call(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        i = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[i] = fut
        await self.ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
        out = await asyncio.wait_for(fut, timeout)
        if "error" in out:
            raise RuntimeError(f"{method}: {out['error']}")
        return dict(out.get("result", {}))

    async def eval(self, expression: str, timeout: float = 30) -> Any:
        """The value of ``expression`` (awaited if a promise), raising on a JS exception."""
        r = await self.call("Runtime.evaluate", timeout=timeout, expression=expression, returnByValue=True,
                            awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"JS: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def wait_js(self, expression: str, timeout: float = 30) -> Any:
        """Poll ``expression`` until truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            v = await self.eval(expression)
            if v:
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expression}")
            await asyncio.sleep(0.1)

    async def screenshot(self, path: Path) -> None:
        r = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(r["data"]))


@contextlib.asynccontextmanager
async def chromium_tab(profile: Path, width: int = 1400, height: int = 1000) -> AsyncIterator[Tab]:
    """A headless chromium with one blank tab, console/network events on; stopped on exit."""
    binary = chromium_binary()
    assert binary, "chromium not installed: scripts/install_system_deps.sh"
    profile.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--metrics-recording-only", "--mute-audio",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
         f"--window-size={width},{height}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"chromium did not start (exit {proc.poll()})")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as session:
            async with session.put(f"http://127.0.0.1:{port}/json/new?about:blank") as r:
                target = await r.json()
            async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                tab = Tab(ws)
                for domain in ("Page", "Runtime", "Log", "Network"):
                    await tab.call(f"{domain}.enable")
                await tab.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                               deviceScaleFactor=1, mobile=False)
                try:
                    yield tab
                finally:
                    tab._reader.cancel()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
