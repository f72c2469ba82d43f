"""Alert notifiers (webhook, Alertmanager, log, in-memory) and the dispatcher that runs them.

A notifier has the OpenTelemetry exporter shape, async because delivery is HTTP::

    await notifier.export(transitions) -> ExportResult
    await notifier.force_flush(timeout_s) -> bool
    await notifier.shutdown()

:class:`AlertDispatcher` sits between the evaluator and the notifiers: the stream calls
``dispatcher.submit(transitions)`` (never blocks, never raises); one lane per notifier, a
:class:`~driftline.streams.sinks.batch.BatchProcessor` (streams/sinks/batch.py), drains a
bounded queue (full: the oldest batch is dropped and counted); the dispatcher retries
failures with exponential backoff and jitter, and counts every alert in
``driftline_alert_notifications_total{notifier, outcome}`` with outcome one of
``delivered``, ``retried`` (one failed attempt that will be retried), ``failed`` (gave up)
and ``dropped`` (queue full), on the registry passed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote

import aiohttp
from prometheus_client import CollectorRegistry

from driftline.schemas.rules import AlertTransition
from driftline.streams.redact_secrets import MASK, redact_url, redact_urls_in, secrets_of_url
from driftline.streams.sinks.batch import BatchProcessor, ExportResult
from driftline.streams.sinks.prometheus import NotifierMetrics

__all__ = [
    "AlertDispatcher",
    "AlertNotifier",
    "AlertmanagerNotifier",
    "ExportResult",
    "InMemoryNotifier",
    "LogNotifier",
    "WebhookNotifier",
    "rfc3339",
]

log = logging.getLogger("driftline.alerts")


@runtime_checkable
class AlertNotifier(Protocol):
    """What :class:`AlertDispatcher` drives."""

    name: str

    async def export(self, transitions: Sequence[AlertTransition]) -> ExportResult: ...

    async def force_flush(self, timeout_s: float = 30.0) -> bool: ...

    async def shutdown(self) -> None: ...


def rfc3339(ts_ms: int) -> str:
    """Epoch milliseconds as RFC 3339 UTC with milliseconds: ``2024-05-01T12:00:00.000Z``."""
    dt = datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------------
# Notifiers
# ---------------------------------------------------------------------------------------------


class _HttpNotifier:
    """Shared aiohttp session handling: created lazily on the running loop, closed on shutdown."""

    name: str

    def __init__(self, url: str, *, timeout_s: float, headers: Mapping[str, str] | None) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.headers = dict(headers or {})
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s), headers=self.headers)
        return self._session

    async def _post_json(self, url: str, body: Any) -> ExportResult:
        try:
            async with self._client().post(url, json=body) as resp:
                if 200 <= resp.status < 300:
                    return ExportResult.SUCCESS
                text = (await resp.text())[:300]
                log.warning("%s: POST %s -> HTTP %d: %s", self.name, redact_url(url), resp.status,
                            self._hide(text, url))
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            # aiohttp's errors can quote the URL (InvalidURL, a redirect's Location)
            log.warning("%s: POST %s failed: %s", self.name, redact_url(url), self._hide(repr(e), url))
        return ExportResult.FAILURE

    @staticmethod
    def _hide(text: str, url: str) -> str:
        """``text`` (an error, a response body) with ``url`` and its secrets masked."""
        for secret in secrets_of_url(url):
            text = text.replace(secret, MASK)
        return redact_urls_in(text)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact_url(self.url)!r}, name={self.name!r})"

    async def force_flush(self, timeout_s: float = 30.0) -> bool:
        return True

    async def shutdown(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None


def _alert_json(t: AlertTransition) -> dict[str, Any]:
    return {
        "status": t.state,
        "labels": {"alertname": t.rule, "severity": t.severity, **t.labels},
        "annotations": dict(t.annotations),
        "startsAt": rfc3339(t.starts_at_ms),
        "endsAt": rfc3339(t.ends_at_ms) if t.ends_at_ms is not None else None,
        "fingerprint": t.fingerprint,
        "value": t.value,
    }


def _slack_line(t: AlertTransition) -> str:
    icon = ":rotating_light:" if t.state == "firing" else ":white_check_mark:"
    where = " ".join(f"{k}={v}" for k, v in t.labels.items())
    summary = t.annotations.get("summary", "")
    return f"{icon} [{t.state.upper()}] {t.rule} ({t.severity}) {where}" + (
        f" - {summary}" if summary else "")


class WebhookNotifier(_HttpNotifier):
    """POSTs one JSON document per group of alerts (``AlertTransition.group_key``).

    Body (``slack_compatible=False``), modelled on Alertmanager's webhook payload::

        {"version": "1", "receiver": "driftline", "status": "firing"|"resolved",
         "groupKey": "{alertname=...,app=...}",
         "alerts": [{"status", "labels" (alertname, severity, ...), "annotations",
                     "startsAt", "endsAt", "fingerprint", "value"}]}

    With ``slack_compatible=True`` the body is ``{"text": "..."}``, one line per alert,
    which Slack / Mattermost / Rocket.Chat incoming webhooks accept.
    """

    def __init__(self, url: str, slack_compatible: bool = False, *, name: str = "webhook",
                 timeout_s: float = 10.0, headers: Mapping[str, str] | None = None,
                 group_by: tuple[str, ...] = ("alertname", "app")) -> None:
        super().__init__(url, timeout_s=timeout_s, headers=headers)
        self.name = name
        self.slack_compatible = slack_compatible
        self.group_by = group_by

    def payloads(self, transitions: Sequence[AlertTransition]) -> list[dict[str, Any]]:
        """The request bodies ``export`` would send, in first-seen group order."""
        groups: dict[str, list[AlertTransition]] = {}
        for t in transitions:
            groups.setdefault(t.group_key(self.group_by), []).append(t)
        out: list[dict[str, Any]] = []
        for key, ts in groups.items():
            if self.slack_compatible:
                out.append({"text": "\n".join(_slack_line(t) for t in ts)})
            else:
                status = "firing" if any(t.state == "firing" for t in ts) else "resolved"
                out.append({"version": "1", "receiver": "driftline", "status": status,
                            "groupKey": key, "alerts": [_alert_json(t) for t in ts]})
        return out

    async def export(self, transitions: Sequence[AlertTransition]) -> ExportResult:
        result = ExportResult.SUCCESS
        for body in self.payloads(transitions):
            if await self._post_json(self.url, body) is ExportResult.FAILURE:
                result = ExportResult.FAILURE
        return result


class AlertmanagerNotifier(_HttpNotifier):
    """Posts to Alertmanager's ``POST {url}/api/v2/alerts`` as Prometheus does.

    Labels are the alert labels plus ``alertname`` (the rule) and ``severity``; firing
    alerts carry ``endsAt = now + 4 * resend_interval`` so Alertmanager resolves them by
    itself if driftline stops, and every firing alert is re-sent each ``resend_interval_s``
    (:meth:`due_resend`, driven by :class:`AlertDispatcher`). Resolved alerts carry their
    resolution time as ``endsAt``.
    """

    def __init__(self, url: str, *, name: str = "alertmanager", resend_interval_s: float = 60.0,
                 generator_url_base: str = "http://localhost/driftline/rules/",
                 timeout_s: float = 10.0, headers: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(url.rstrip("/"), timeout_s=timeout_s, headers=headers)
        if resend_interval_s <= 0:
            raise ValueError("resend_interval_s must be > 0")
        self.name = name
        self.resend_interval_s = resend_interval_s
        self.generator_url_base = generator_url_base
        self.clock = clock
        self._active: dict[str, AlertTransition] = {}
        self._last_resend_s = clock()

    def payload(self, transitions: Sequence[AlertTransition]) -> list[dict[str, Any]]:
        """The ``postableAlerts`` body for ``transitions``."""
        now_ms = int(self.clock() * 1000)
        out = []
        for t in transitions:
            ends = t.ends_at_ms if t.state == "resolved" and t.ends_at_ms is not None else (
                now_ms + int(4 * self.resend_interval_s * 1000))
            out.append({
                "labels": {"alertname": t.rule, "severity": t.severity, **t.labels},
                "annotations": dict(t.annotations),
                "startsAt": rfc3339(t.starts_at_ms),
                "endsAt": rfc3339(ends),
                "generatorURL": self.generator_url_base + quote(t.rule),
            })
        return out

    def active(self) -> list[AlertTransition]:
        return list(self._active.values())

    def restore(self, transitions: Sequence[AlertTransition]) -> None:
        """Take over firing alerts of an earlier run (re-sent from now on, not sent again)."""
        for t in transitions:
            if t.state == "firing":
                self._active[t.fingerprint] = t

    def forget(self, fingerprints: Iterable[str]) -> None:
        """Stop re-sending these alerts (another worker owns them now, and re-sends them)."""
        for fp in fingerprints:
            self._active.pop(fp, None)

    def due_resend(self) -> list[AlertTransition]:
        """The firing alerts to re-send, when ``resend_interval_s`` has passed since the last."""
        now = self.clock()
        if now - self._last_resend_s < self.resend_interval_s:
            return []
        self._last_resend_s = now
        return self.active()

    async def export(self, transitions: Sequence[AlertTransition]) -> ExportResult:
        for t in transitions:
            if t.state == "firing":
                self._active[t.fingerprint] = t
            else:
                self._active.pop(t.fingerprint, None)
        if not transitions:
            return ExportResult.SUCCESS
        return await self._post_json(f"{self.url}/api/v2/alerts", self.payload(transitions))


class LogNotifier:
    """Logs one line per transition on ``logger`` (default ``driftline.alerts``)."""

    def __init__(self, logger: logging.Logger | None = None, *, level: int = logging.WARNING,
                 name: str = "log") -> None:
        self.logger = logger or log
        self.level = level
        self.name = name

    async def export(self, transitions: Sequence[AlertTransition]) -> ExportResult:
        for t in transitions:
            self.logger.log(self.level, "%s", _slack_line(t).split(" ", 1)[1])
        return ExportResult.SUCCESS

    async def force_flush(self, timeout_s: float = 30.0) -> bool:
        return True

    async def shutdown(self) -> None:
        return None


class InMemoryNotifier:
    """Keeps what it is given (for tests); ``fail_next`` failures are returned first."""

    def __init__(self, *, name: str = "memory", fail_next: int = 0) -> None:
        self.name = name
        self.fail_next = fail_next
        self.exported: list[AlertTransition] = []
        self.calls = 0

    async def export(self, transitions: Sequence[AlertTransition]) -> ExportResult:
        self.calls += 1
        if self.fail_next > 0:
            self.fail_next -= 1
            return ExportResult.FAILURE
        self.exported.extend(transitions)
        return ExportResult.SUCCESS

    async def force_flush(self, timeout_s: float = 30.0) -> bool:
        return True

    async def shutdown(self) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------------------------


class _LaneExporter:
    """One notifier behind its lane's :class:`BatchProcessor`, whose items are the
    submitted batches of transitions (one per export)."""

    def __init__(self, notifier: AlertNotifier) -> None:
        self.notifier = notifier

    async def export(self, items: Sequence[list[AlertTransition]]) -> ExportResult:
        (batch,) = items   # max_export_batch_size=1
        return await self.notifier.export(batch)

    async def force_flush(self, timeout_s: float = 30.0) -> bool:
        return await self.notifier.force_flush(timeout_s)

    async def shutdown(self) -> None:
        await self.notifier.shutdown()


@dataclass
class _Lane:
    notifier: AlertNotifier
    batches: BatchProcessor[list[AlertTransition]]
    resend: asyncio.Task[None] | None = None


class AlertDispatcher:
    """Runs notifiers off the stream: bounded queues, retries with backoff, counters.

    Each notifier has its own lane, a :class:`~driftline.streams.sinks.batch.BatchProcessor`
    (``on_full="drop_oldest"``, one submitted batch per export, no delay, ``max_attempts``
    per batch, counted per alert), so a slow notifier delays only itself. ``submit`` may
    be called from the event loop or from another thread; before :meth:`start` it only
    queues. ``max_queue`` bounds each notifier's queue in batches; the retry delay after
    attempt ``k`` is
    ``min(backoff_max_s, backoff_initial_s * 2**(k-1))`` scaled by a uniform factor in
    ``[1 - jitter, 1]``.
    """

    def __init__(self, notifiers: Sequence[AlertNotifier], *, registry: CollectorRegistry,
                 max_queue: int = 1000, max_attempts: int = 5, backoff_initial_s: float = 0.5,
                 backoff_max_s: float = 30.0, jitter: float = 0.5, export_timeout_s: float = 30.0,
                 rng: random.Random | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if max_queue < 1 or max_attempts < 1 or not 0 <= jitter <= 1:
            raise ValueError("need max_queue >= 1, max_attempts >= 1 and 0 <= jitter <= 1")
        names = [n.name for n in notifiers]
        if len(set(names)) != len(names):
            raise ValueError(f"notifier names must be unique, got {names}")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        m = NotifierMetrics(registry, names)
        self.notifications, self.queue_batches = m.notifications, m.queue_batches
        rng = rng or random.Random()
        self._lanes = []
        for n in notifiers:
            count = self.notifications.labels
            batches: BatchProcessor[list[AlertTransition]] = BatchProcessor(
                _LaneExporter(n), max_queue_size=max_queue, max_export_batch_size=1,
                schedule_delay_s=0.0, on_full="drop_oldest", max_attempts=max_attempts,
                backoff_initial_s=backoff_initial_s, backoff_max_s=backoff_max_s, jitter=jitter,
                export_timeout_s=export_timeout_s, rng=rng, sleep=sleep, size_of=len,
                exported_counter=count(n.name, "delivered"), retries_counter=count(n.name, "retried"),
                failures_counter=count(n.name, "failed"), drops_counter=count(n.name, "dropped"),
                name=f"{n.name}: alerts")
            self.queue_batches.labels(n.name).set_function(batches.__len__)
            self._lanes.append(_Lane(n, batches))

    async def start(self) -> None:
        """Start every lane (and the Alertmanager re-send timers) on the running loop."""
        self._loop = asyncio.get_running_loop()
        for lane in self._lanes:
            await lane.batches.start()
            resend = getattr(lane.notifier, "due_resend", None)
            interval = getattr(lane.notifier, "resend_interval_s", None)
            if callable(resend) and interval is not None:
                lane.resend = asyncio.create_task(self._resend(lane, resend, float(interval)),
                                                  name=f"alerts-{lane.notifier.name}-resend")

    def submit(self, transitions: Sequence[AlertTransition]) -> None:
        """Queue transitions for every notifier. Never blocks, never raises."""
        if not transitions or self._closed:
            return
        try:
            batch = list(transitions)
            loop = self._loop
            if loop is None or not loop.is_running():
                self._enqueue(batch)
                return
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                self._enqueue(batch)
            else:
                loop.call_soon_threadsafe(self._enqueue, batch)
        except Exception:  # never into the stream
            log.exception("alert dispatcher: submit failed")

    def _enqueue(self, batch: list[AlertTransition]) -> None:
        for lane in self._lanes:
            lane.batches.add_nowait(batch)   # full: the oldest batch is dropped and counted

    async def _resend(self, lane: _Lane, due: Callable[[], Sequence[AlertTransition]],
                      interval_s: float) -> None:
        """Queue the notifier's due re-sends (Alertmanager's firing alerts) every interval."""
        while True:
            await asyncio.sleep(interval_s)
            again = due()
            if again:
                lane.batches.add_nowait(list(again))

    async def force_flush(self, timeout_s: float = 30.0) -> bool:
        """Deliver everything queued now (each lane at once) and flush the notifiers; False on timeout."""
        oks = await asyncio.gather(*(lane.batches.force_flush(timeout_s) for lane in self._lanes))
        return all(oks)

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Flush (bounded by ``timeout_s``), stop the lanes and shut the notifiers down."""
        try:
            await self.force_flush(timeout_s)
        finally:
            self._closed = True
            for lane in self._lanes:
                if lane.resend is not None:
                    lane.resend.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await lane.resend
                # what the flush did not deliver in time is given up (logged) at once
                await lane.batches.shutdown(timeout_s=0.0)
