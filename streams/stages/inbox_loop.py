"""The loop the drift stages share: a bounded inbox and control commands, one task.

:class:`~driftline.streams.stages.semantic_drift.DriftStage` (embedded samples) and
:class:`~driftline.streams.stages.numeric_drift.NumericDriftStage` (stored rows) queue work
from the event loop into ``_inbox`` (cheap, never blocking the stream) and control
commands into ``_controls``; one task (:meth:`InboxLoop._loop`) takes the whole inbox
(``_process_inbox``), then the controls in order (``_apply_next_control``), and waits
when both are empty. ``_idle`` is set while it waits: a flush awaits it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any


class InboxLoop:
    """Mixed into a stage that sets, in its ``__init__``: ``_inbox`` (a list), ``_inbox_units``
    (what the inbox holds, in the stage's unit: samples, rows), ``inbox_dropped``, ``_controls``
    (a list), ``_wake`` and ``_idle`` (``asyncio.Event``, ``_idle`` set), ``_ports``, ``name``;
    and defines ``_units(item)``, ``_process_inbox()`` (takes the whole inbox, with
    :meth:`_take_inbox`) and ``_apply_next_control()``."""

    _inbox: list[Any]
    _inbox_units: int
    inbox_dropped: int
    _controls: list[Any]
    _wake: asyncio.Event
    _idle: asyncio.Event
    _ports: Any
    name: str
    #: the stage's logger, and how its loop's failures are named ("drift", "numeric drift")
    _log = logging.getLogger("driftline.drift")
    _loop_label = "drift"

    def _units(self, item: Any) -> int:
        raise NotImplementedError

    async def _process_inbox(self) -> None:
        raise NotImplementedError

    async def _apply_next_control(self) -> None:
        raise NotImplementedError

    def _poke(self) -> None:
        """Work was queued: the loop is no longer idle."""
        self._idle.clear()
        self._wake.set()

    def _queue(self, item: Any, limit: int, warn: str | None = None) -> None:
        """Queue ``item`` and wake the loop. While the inbox holds more than ``limit`` units
        and more than one item (the loop is busy: a golden set, a slow store), the oldest
        items are dropped and their units counted in ``inbox_dropped``; ``warn`` is logged
        at the first drop."""
        self._inbox.append(item)
        self._inbox_units += self._units(item)
        while self._inbox_units > limit and len(self._inbox) > 1:
            old = self._units(self._inbox.pop(0))
            self._inbox_units -= old
            if warn and not self.inbox_dropped:
                self._log.warning(warn)
            self.inbox_dropped += old
        self._poke()

    def _take_inbox(self) -> list[Any]:
        """The queued items, oldest first; the inbox is empty after."""
        work, self._inbox, self._inbox_units = self._inbox, [], 0
        return work

    async def _loop(self) -> None:
        while True:
            if not self._inbox and not self._controls:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                if self._inbox:
                    await self._process_inbox()
                while self._controls:
                    await self._apply_next_control()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a failure here never stops the stream
                self._log.exception("%s: processing a batch failed", self._loop_label)
                if self._ports is not None:
                    self._ports.metrics.stage_errors[self.name] += 1
