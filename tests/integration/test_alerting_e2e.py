"""Alerting in the stream, end to end: real broker, real worker, real chDB, real Alertmanager.

A live event stream (timestamps = wall time) for two apps goes through the Tansu broker
into a worker running the alerting stage. App ``chat`` gets a latency spike, recovers,
then gets a guardrail-hit burst and recovers; app ``search`` stays healthy. Each alert must
fire exactly once with the right labels and resolve after the recovery: checked at a
local webhook receiver, in Alertmanager's API (what it held while firing, and nothing
active at the end), and in the ClickHouse ``alerts`` table.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiokafka import AIOKafkaProducer
from helpers_alerting import Server, alertmanager  # noqa: F401 (fixture)
from helpers_worker import SESSION_MS

from driftline.schemas.rules import fingerprint, parse_rules
from driftline.streams.app import serve_worker
from driftline.streams.local.broker import free_port
from driftline.streams.stages.alerting import AlertingStage, build_notifiers
from driftline.streams.stages.windows import WindowConfig
from driftline.streams.worker import Worker, WorkerConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RULES = parse_rules(textwrap.dedent("""\
    rules:
      - name: LatencySpike
        kind: threshold
        expr: "latency_ms.p99 > 2000"
        min_events: 20
        severity: critical
        resolve_below: 1500
        annotations: {summary: "p99 {value:.0f} ms > {threshold} ms on {app}/{model}"}
      - name: GuardrailBurst
        kind: ratio
        expr: "guardrail.hit_rate > 0.2"
        min_events: 20
        severity: warning
        resolve_below: 0.05
        annotations: {summary: "guardrail hits {value:.0%} on {app}/{model}"}
    """))


class Receiver:
    """A local webhook receiver keeping every JSON body with its arrival time."""

    def __init__(self) -> None:
        self.bodies: list[tuple[float, Any]] = []
        self.url = ""

    async def handle(self, req: web.Request) -> web.Response:
        self.bodies.append((time.time(), await req.json()))
        return web.Response(status=200)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    rec.url = f"http://{host}:{port}/hook"
    yield rec
    await runner.cleanup()


def event(app: str, *, latency_ms: float, hit: bool, i: int) -> bytes:
    return json.dumps({
        "app": app, "request_model": "gpt-4o", "timestamp": int(time.time() * 1000),
        "latency_ms": latency_ms, "input_tokens": 100, "output_tokens": 50, "user_id": f"u{i % 7}",
        "guardrails": [{"name": "jailbreak", "verdict": "flagged" if hit else "pass"}],
    }).encode()


async def stream(producer: AIOKafkaProducer, topic: str, seconds: float, *, spike: bool = False,
                 burst: bool = False, rate: int = 100) -> int:
    """``rate`` events/s per app for ``seconds``; chat's latency/guardrails per phase."""
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        tick = time.monotonic()
        for j in range(rate // 10):
            n += 1
            slow = spike and j % 2 == 0       # half the calls take 5 s: p99 far above 2 s
            hit = burst and j % 2 == 0        # half the calls trip a guardrail
            await producer.send(topic, event("chat", latency_ms=5000.0 if slow else 300.0 + j,
                                             hit=hit, i=n), key=b"chat/gpt-4o")
            await producer.send(topic, event("search", latency_ms=250.0 + j, hit=False, i=n),
                                key=b"search/gpt-4o")
        await producer.flush()
        await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))
    return n


async def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)


async def am_active(url: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/api/v2/alerts?active=true") as r:
        assert r.status == 200
        return [a for a in await r.json() if a["status"]["state"] == "active"]


@pytest.mark.timeout(90)
async def test_latency_spike_and_guardrail_burst_fire_once_and_resolve(
        kafka_bootstrap: str, make_topics: Any, chdb_dsn: str, alertmanager: Server,  # noqa: F811
        receiver: Receiver) -> None:
    topic = f"a-{uuid.uuid4().hex[:10]}"
    make_topics({topic: 1, f"{topic}.dlq": 1})
    cfg = WorkerConfig(max_event_age_s=1e10, kafka=kafka_bootstrap, clickhouse=chdb_dsn, group_id=f"g-{uuid.uuid4().hex[:8]}",
                       topics=(topic,), dlq_topic=f"{topic}.dlq", session_timeout_ms=SESSION_MS,
                       window=WindowConfig(size_ms=2_000, allowed_lateness_ms=500))
    notifiers = build_notifiers(webhooks=[receiver.url], alertmanagers=[alertmanager.url],
                                alertmanager_resend_s=1.0)
    stages: list[AlertingStage] = []

    def make(registry: Any) -> AlertingStage:
        st = AlertingStage(RULES, registry=registry, notifiers=notifiers)
        stages.append(st)
        return st

    stop = asyncio.Event()
    box: list[Worker] = []
    web_port = free_port()
    task = asyncio.create_task(serve_worker(cfg, stop, web_port=web_port, sql_port=None,
                                            on_ready=box.append, stages=[make]))
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
    await producer.start()
    seen_in_am: dict[str, dict[str, Any]] = {}

    async def watch_am() -> None:
        while True:
            for a in await am_active(alertmanager.url):
                seen_in_am.setdefault(a["labels"]["alertname"], a)
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch_am())
    try:
        await wait_for(lambda: bool(box) and box[0].started.is_set(), 30, "the worker to start")
        stage = stages[0]
        states = lambda: [(t.rule, t.state) for t in stage.transitions]  # noqa: E731
        await stream(producer, topic, 3)                                  # healthy
        assert states() == []
        await stream(producer, topic, 3, spike=True)                      # latency spike
        await wait_for(lambda: ("LatencySpike", "firing") in states(), 5, "LatencySpike firing")
        await stream(producer, topic, 5)                                  # recovered
        await wait_for(lambda: ("LatencySpike", "resolved") in states(), 6, "LatencySpike resolved")
        await stream(producer, topic, 3, burst=True)                      # guardrail burst
        await wait_for(lambda: ("GuardrailBurst", "firing") in states(), 5, "GuardrailBurst firing")
        await stream(producer, topic, 5)                                  # recovered
        await wait_for(lambda: ("GuardrailBurst", "resolved") in states(), 6, "GuardrailBurst resolved")
        await stream(producer, topic, 2)                                  # and it stays quiet
        assert states() == [("LatencySpike", "firing"), ("LatencySpike", "resolved"),
                            ("GuardrailBurst", "firing"), ("GuardrailBurst", "resolved")]
        labels = {"app": "chat", "model": "gpt-4o"}
        assert all(t.labels == labels for t in stage.transitions)
        spike_fire, spike_res, burst_fire, burst_res = stage.transitions
        assert spike_fire.value > 2000 and spike_res.value < 1500
        assert burst_fire.value > 0.2 and burst_res.value < 0.05
        assert spike_fire.fingerprint == spike_res.fingerprint == fingerprint("LatencySpike", labels)

        # the webhook got exactly these four, once each
        assert await stage.dispatcher.force_flush(10)
        got = [(a["labels"]["alertname"], a["status"], a["labels"]["app"], a["labels"]["severity"])
               for _, body in receiver.bodies for a in body["alerts"]]
        assert got == [("LatencySpike", "firing", "chat", "critical"),
                       ("LatencySpike", "resolved", "chat", "critical"),
                       ("GuardrailBurst", "firing", "chat", "warning"),
                       ("GuardrailBurst", "resolved", "chat", "warning")]
        summary = receiver.bodies[0][1]["alerts"][0]["annotations"]["summary"]
        assert summary.startswith("p99 ") and summary.endswith(" ms > 2000 ms on chat/gpt-4o")

        # Alertmanager held both alerts while they fired, with exactly these labels; none now
        assert set(seen_in_am) == {"LatencySpike", "GuardrailBurst"}
        assert seen_in_am["LatencySpike"]["labels"] == {"alertname": "LatencySpike",
                                                        "severity": "critical", **labels}
        assert seen_in_am["GuardrailBurst"]["labels"] == {"alertname": "GuardrailBurst",
                                                          "severity": "warning", **labels}
        assert await am_active(alertmanager.url) == []

        # the alerts table: one row per state change
        worker = box[0]
        await wait_for(lambda: stage.rows_written == 4, 10, "4 alert rows written")
        db = worker.sink.database
        rows = await asyncio.to_thread(
            worker.sink.query_rows,
            f"SELECT rule, state, severity, app, model, labels, fingerprint, value FROM {db}.alerts "
            "ORDER BY ts, state = 'resolved'", None)
        assert [r[:5] for r in rows] == [
            ("LatencySpike", "firing", "critical", "chat", "gpt-4o"),
            ("LatencySpike", "resolved", "critical", "chat", "gpt-4o"),
            ("GuardrailBurst", "firing", "warning", "chat", "gpt-4o"),
            ("GuardrailBurst", "resolved", "warning", "chat", "gpt-4o")]
        assert all(r[5] == labels for r in rows)
        assert [r[6] for r in rows] == [t.fingerprint for t in stage.transitions]
        assert [r[7] for r in rows] == pytest.approx([t.value for t in stage.transitions])

        # the stage's own metrics on the worker's /metrics
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{web_port}/metrics") as r:
            text = await r.text()
        for line in ('driftline_alert_transitions_total{rule="LatencySpike",state="firing"} 1.0',
                     'driftline_alert_transitions_total{rule="GuardrailBurst",state="resolved"} 1.0',
                     'driftline_alerts_firing{rule="LatencySpike",severity="critical"} 0.0',
                     'driftline_alert_rows_total{outcome="written"} 4.0',
                     'driftline_alert_notifications_total{notifier="webhook",outcome="delivered"} 4.0',
                     'driftline_alert_notifications_total{notifier="webhook",outcome="failed"} 0.0'):
            assert line in text, line
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher
        await producer.stop()
        stop.set()
        await asyncio.wait_for(task, 30)


@pytest.mark.timeout(90)
async def test_a_firing_alert_survives_a_restart_without_firing_twice(
        kafka_bootstrap: str, make_topics: Any, chdb_dsn: str, receiver: Receiver) -> None:
    topic = f"r-{uuid.uuid4().hex[:10]}"
    make_topics({topic: 1, f"{topic}.dlq": 1})
    cfg = WorkerConfig(max_event_age_s=1e10, kafka=kafka_bootstrap, clickhouse=chdb_dsn, group_id=f"g-{uuid.uuid4().hex[:8]}",
                       topics=(topic,), dlq_topic=f"{topic}.dlq", session_timeout_ms=SESSION_MS,
                       window=WindowConfig(size_ms=2_000, allowed_lateness_ms=500))
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
    await producer.start()

    async def run_worker(phase: Callable[[AlertingStage], Any]) -> AlertingStage:
        # A fresh consumer group each time: the broker keeps the old member until its session
        # times out (30 s); the worker seeks past the offsets already stored in chDB anyway.
        wcfg = dataclasses.replace(cfg, group_id=f"g-{uuid.uuid4().hex[:8]}")
        stages: list[AlertingStage] = []

        def make(registry: Any) -> AlertingStage:
            stages.append(AlertingStage(RULES, registry=registry,
                                        notifiers=build_notifiers(webhooks=[receiver.url])))
            return stages[0]

        stop = asyncio.Event()
        box: list[Worker] = []
        task = asyncio.create_task(serve_worker(wcfg, stop, web_port=free_port(), sql_port=None,
                                                on_ready=box.append, stages=[make]))
        try:
            await wait_for(lambda: bool(box) and box[0].started.is_set(), 30, "the worker to start")
            await phase(stages[0])
            await wait_for(lambda: stages[0].rows_written == len(stages[0].transitions), 10, "rows")
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
        return stages[0]

    async def breach(st: AlertingStage) -> None:
        await stream(producer, topic, 3, spike=True)
        await wait_for(lambda: len(st.transitions) == 1, 5, "LatencySpike firing")

    async def recover(st: AlertingStage) -> None:
        # restored as firing once the worker's partition is assigned (AlertingStage.on_assigned)
        await wait_for(lambda: [a.rule for a in st.evaluator.active_alerts()] == ["LatencySpike"], 15, "restore")
        await stream(producer, topic, 5)
        await wait_for(lambda: len(st.transitions) == 1, 6, "LatencySpike resolved")

    try:
        first = await run_worker(breach)
        second = await run_worker(recover)
    finally:
        await producer.stop()
    assert [(t.rule, t.state) for t in first.transitions] == [("LatencySpike", "firing")]
    assert [(t.rule, t.state) for t in second.transitions] == [("LatencySpike", "resolved")]
    assert second.transitions[0].fingerprint == first.transitions[0].fingerprint
    got = [(a["labels"]["alertname"], a["status"]) for _, body in receiver.bodies for a in body["alerts"]]
    assert got == [("LatencySpike", "firing"), ("LatencySpike", "resolved")]
