"""Shared by the worker integration tests: waiting on a condition of a running worker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def wait_for(cond: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    """Poll ``cond`` every 0.1 s; fail with ``what()`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s: {what()}")
        await asyncio.sleep(0.1)
