"""Shared by the worker integration tests: starting a worker in this process, waiting on
a condition of it, reading a topic (the DLQ) whole."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

#: ``WorkerConfig.session_timeout_ms`` for test workers. The broker holds a new group's
#: first assignment for about half the session timeout, and a member that was killed
#: keeps its partitions until its session expires, so every worker start (and every
#: restart after a kill) waits on it: 3 s instead of the product's 10 s saves several
#: seconds per start. The heartbeat (a quarter of it, 750 ms) still leaves a loaded
#: machine 3 s of slack before a live member is dropped.
SESSION_MS = 3_000


async def wait_for(cond: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    """Poll ``cond`` every 0.1 s; fail with ``what()`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s: {what()}")
        await asyncio.sleep(0.1)


async def read_topic(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list[Any]:
    """Every record of ``topic`` from its beginning: until ``expected`` are read (or
    ``timeout``), then three more short fetches, so records beyond those expected show."""
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                         enable_auto_commit=False)
    await c.start()
    out: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while len(out) < expected and time.monotonic() < deadline:
            for recs in (await c.getmany(timeout_ms=500)).values():
                out.extend(recs)
        for _ in range(3):  # anything beyond the expected records would show up now
            for recs in (await c.getmany(timeout_ms=300)).values():
                out.extend(recs)
    finally:
        await c.stop()
    return out


async def start_worker(cfg: Any, sql_port: int | None = None) -> tuple[asyncio.Event, asyncio.Task[Any], Any]:
    """Serve a worker for ``cfg`` (web on a free port) until the returned event is set:
    (stop event, its task, the Worker once it is ready)."""
    from driftline.streams.app import serve_worker
    from driftline.streams.local.broker import free_port

    stop = asyncio.Event()
    box: list[Any] = []
    task = asyncio.create_task(serve_worker(cfg, stop, web_port=free_port(), sql_port=sql_port,
                                            on_ready=box.append))
    await wait_for(lambda: bool(box) or task.done(), 30, lambda: "worker never became ready")
    if task.done():
        task.result()
    return stop, task, box[0]
