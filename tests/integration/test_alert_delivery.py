"""Alert delivery to a real Alertmanager and to a local webhook receiver that fails first."""

from __future__ import annotations

import asyncio
import random
import textwrap
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers_alerting import Server, alertmanager  # noqa: F401 (fixture)
from prometheus_client import CollectorRegistry

from driftline.schemas.rules import AlertTransition, parse_rules
from driftline.schemas.window_stats import WindowStats
from driftline.streams.sinks.notifiers import (
    AlertDispatcher,
    AlertmanagerNotifier,
    InMemoryNotifier,
    WebhookNotifier,
    rfc3339,
)
from driftline.streams.stages.rule_engine import AlertEvaluator

pytestmark = pytest.mark.integration

RULES = parse_rules(textwrap.dedent("""\
    rules:
      - name: HighLatencyP99
        kind: threshold
        expr: "latency_ms.p99 > 2000"
        severity: critical
        annotations: {summary: "p99 {value:.0f} ms on {app}/{model}"}
    """))


def window(start_ms: int, p99: float) -> WindowStats:
    return WindowStats(
        window_start_ms=start_ms, window_end_ms=start_ms + 60_000, app="chat", model="gpt-4o",
        prompt_version="", events=50, errors=0, late_events=0, latency_p50_ms=100.0,
        latency_p90_ms=200.0, latency_p95_ms=300.0, latency_p99_ms=p99, ttft_p50_ms=None,
        ttft_p95_ms=None, ttft_p99_ms=None, tpot_p50_ms=None, tpot_p95_ms=None, input_tokens=0,
        output_tokens=0, cache_read_input_tokens=0, cache_creation_input_tokens=0,
        reasoning_output_tokens=0, cost_usd=0.0, unpriced_events=0, guardrail_checked_events=50,
        guardrail_hits=0, guardrail_blocked=0, feedback_events=0, negative_feedback=0,
        sketch_relative_accuracy=0.01, final=False)


def fire_and_resolve(now_ms: int) -> tuple[AlertTransition, AlertTransition]:
    ev = AlertEvaluator(RULES)
    ev.observe_window(window(now_ms - 30_000, 3000.0))
    (fired,) = ev.evaluate(now_ms - 20_000)
    ev.observe_window(window(now_ms - 30_000, 900.0))
    (resolved,) = ev.evaluate(now_ms - 10_000)
    return fired, resolved


def parse_ts(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


async def am_alerts(url: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/api/v2/alerts") as r:
        assert r.status == 200
        data: list[dict[str, Any]] = await r.json()
        return data


@pytest.mark.timeout(60)
async def test_alertmanager_receives_firing_then_resolved(alertmanager: Server) -> None:  # noqa: F811
    now_ms = int(datetime.now().timestamp() * 1000)
    fired, resolved = fire_and_resolve(now_ms)
    registry = CollectorRegistry()
    am = AlertmanagerNotifier(alertmanager.url, resend_interval_s=0.3)
    disp = AlertDispatcher([am], registry=registry, backoff_initial_s=0.05)
    await disp.start()
    try:
        disp.submit([fired])
        assert await disp.force_flush(10)
        alerts = await am_alerts(alertmanager.url)
        assert len(alerts) == 1
        a = alerts[0]
        assert a["labels"] == {"alertname": "HighLatencyP99", "severity": "critical",
                               "app": "chat", "model": "gpt-4o"}
        assert a["annotations"] == {"summary": "p99 3000 ms on chat/gpt-4o"}
        assert a["status"]["state"] == "active"
        assert parse_ts(a["startsAt"]) == parse_ts(rfc3339(fired.starts_at_ms))
        assert a["generatorURL"] == "http://localhost/driftline/rules/HighLatencyP99"
        # Active alerts are re-sent every resend_interval (0.3 s here), as Alertmanager expects.
        await asyncio.sleep(1.0)
        delivered = registry.get_sample_value(
            "driftline_alert_notifications_total", {"notifier": "alertmanager", "outcome": "delivered"})
        assert delivered is not None and delivered >= 3

        disp.submit([resolved])
        assert await disp.force_flush(10)
        assert am.active() == []
        assert await am_alerts(alertmanager.url) == []   # resolved alerts leave the active list
    finally:
        await disp.shutdown()
    assert registry.get_sample_value(
        "driftline_alert_notifications_total", {"notifier": "alertmanager", "outcome": "failed"}) == 0


class FlakyReceiver:
    """Answers 500 to the first ``failures`` requests, then 200; keeps every body."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.bodies: list[Any] = []
        self.requests = 0
        self.url = ""

    async def handle(self, req: web.Request) -> web.Response:
        self.requests += 1
        if self.requests <= self.failures:
            return web.Response(status=500, text="boom")
        self.bodies.append(await req.json())
        return web.Response(status=200)


@pytest.fixture
async def receiver_factory() -> AsyncIterator[Any]:
    runners: list[web.AppRunner] = []

    async def start(failures: int) -> FlakyReceiver:
        rec = FlakyReceiver(failures)
        app = web.Application()
        app.router.add_post("/hook", rec.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        rec.url = f"http://{host}:{port}/hook"
        return rec

    yield start
    for r in runners:
        await r.cleanup()


def count(registry: CollectorRegistry, notifier: str, outcome: str) -> float | None:
    return registry.get_sample_value("driftline_alert_notifications_total",
                                     {"notifier": notifier, "outcome": outcome})


@pytest.mark.timeout(30)
async def test_webhook_retries_through_500s_and_counts(receiver_factory: Any) -> None:
    rec = await receiver_factory(failures=2)
    registry = CollectorRegistry()
    hook = WebhookNotifier(rec.url)
    disp = AlertDispatcher([hook], registry=registry, backoff_initial_s=0.05, max_attempts=4,
                           rng=random.Random(0))
    fired, _ = fire_and_resolve(1_700_000_000_000)
    await disp.start()
    disp.submit([fired])
    assert await disp.force_flush(10)
    await disp.shutdown()
    assert rec.requests == 3
    assert rec.bodies == [{
        "version": "1", "receiver": "driftline", "status": "firing",
        "groupKey": "{alertname=HighLatencyP99,app=chat}",
        "alerts": [{
            "status": "firing",
            "labels": {"alertname": "HighLatencyP99", "severity": "critical", "app": "chat",
                       "model": "gpt-4o"},
            "annotations": {"summary": "p99 3000 ms on chat/gpt-4o"},
            "startsAt": "2023-11-14T22:13:00.000Z", "endsAt": None,
            "fingerprint": fired.fingerprint, "value": 3000.0,
        }],
    }]
    assert (count(registry, "webhook", "retried"), count(registry, "webhook", "delivered"),
            count(registry, "webhook", "failed")) == (2.0, 1.0, 0.0)


@pytest.mark.timeout(30)
async def test_webhook_gives_up_and_slack_format(receiver_factory: Any) -> None:
    dead = await receiver_factory(failures=10**6)
    slack = await receiver_factory(failures=0)
    registry = CollectorRegistry()
    disp = AlertDispatcher([WebhookNotifier(dead.url, name="dead"),
                            WebhookNotifier(slack.url, slack_compatible=True, name="slack")],
                           registry=registry, backoff_initial_s=0.01, max_attempts=3)
    fired, resolved = fire_and_resolve(1_700_000_000_000)
    await disp.start()
    disp.submit([fired, resolved])
    assert await disp.force_flush(10)
    await disp.shutdown()
    assert dead.requests == 3
    assert (count(registry, "dead", "retried"), count(registry, "dead", "failed"),
            count(registry, "dead", "delivered")) == (4.0, 2.0, 0.0)   # per alert: 2 alerts
    assert slack.bodies == [{"text": (
        ":rotating_light: [FIRING] HighLatencyP99 (critical) app=chat model=gpt-4o - p99 3000 ms on chat/gpt-4o\n"
        ":white_check_mark: [RESOLVED] HighLatencyP99 (critical) app=chat model=gpt-4o - p99 900 ms on chat/gpt-4o")}]
    assert count(registry, "slack", "delivered") == 2.0


async def test_full_queue_drops_oldest_and_submit_never_raises() -> None:
    registry = CollectorRegistry()
    mem = InMemoryNotifier(fail_next=1)
    disp = AlertDispatcher([mem], registry=registry, max_queue=2, backoff_initial_s=0.0)
    fired, resolved = fire_and_resolve(1_700_000_000_000)
    disp.submit([fired])          # dropped: queue holds 2 batches and this is the oldest
    disp.submit([resolved])
    disp.submit([fired, resolved])
    disp.submit([])               # nothing
    assert count(registry, "memory", "dropped") == 1.0
    await disp.start()
    assert await disp.force_flush(5)
    await disp.shutdown()
    assert [t.state for t in mem.exported] == ["resolved", "firing", "resolved"]
    assert (count(registry, "memory", "retried"), count(registry, "memory", "delivered")) == (1.0, 3.0)
    disp.submit([fired])          # after shutdown: ignored, no exception
