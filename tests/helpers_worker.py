"""Shared by the worker integration tests: waiting on a condition of a running worker,
reading a topic (the DLQ) whole."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


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
