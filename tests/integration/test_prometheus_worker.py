"""A real Prometheus scraping the real worker's /metrics and evaluating the exported rules.

Events go through the real broker into a worker (with the alerting stage) and chDB.
Prometheus evaluates the export of one guardrail rule (and loads the exported default
rules); the worker evaluates the same rule in the stream. Both must fire for exactly the
same label set (app ``chat``), neither for the healthy app ``search``.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer
from helpers_alerting import Server, prometheus_factory  # noqa: F401 (fixture)

from driftline.schemas.rules import parse_rules
from driftline.streams.app import serve_worker
from driftline.streams.local.broker import free_port
from driftline.streams.stages.alerting import AlertingStage
from driftline.streams.stages.rule_engine import export_prometheus_rules
from driftline.streams.stages.windows import WindowConfig
from driftline.streams.worker import Worker, WorkerConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DEPLOY = Path(__file__).parents[2] / "deploy" / "prometheus"

RULES = parse_rules(textwrap.dedent("""\
    rules:
      - name: GuardrailFast
        kind: ratio
        expr: "guardrail.hit_rate > 0.1"
        match: {app: "chat*"}
        severity: critical
        annotations: {summary: "hit rate {value:.2f} on {app}"}
    """))


def event(app: str, hit: bool) -> bytes:
    return json.dumps({
        "app": app, "request_model": "gpt-4o", "timestamp": int(time.time() * 1000),
        "latency_ms": 300.0, "guardrails": [{"name": "pii", "verdict": "flagged" if hit else "pass"}],
    }).encode()


@pytest.mark.timeout(90)
async def test_prometheus_scrapes_the_worker_and_agrees_with_the_stream(
        kafka_bootstrap: str, make_topics: Any, chdb_dsn: str,
        prometheus_factory: Callable[[str, dict[str, str]], Server]) -> None:  # noqa: F811
    topic = f"p-{uuid.uuid4().hex[:10]}"
    make_topics({topic: 1, f"{topic}.dlq": 1})
    cfg = WorkerConfig(max_event_age_s=1e10, kafka=kafka_bootstrap, clickhouse=chdb_dsn, group_id=f"g-{uuid.uuid4().hex[:8]}",
                       topics=(topic,), dlq_topic=f"{topic}.dlq", window=WindowConfig(size_ms=10_000))
    stages: list[AlertingStage] = []

    def make(registry: Any) -> AlertingStage:
        stages.append(AlertingStage(RULES, registry=registry))
        return stages[0]

    stop = asyncio.Event()
    box: list[Worker] = []
    web_port = free_port()
    task = asyncio.create_task(serve_worker(cfg, stop, web_port=web_port, sql_port=None,
                                            on_ready=box.append, stages=[make]))
    fast, skipped = export_prometheus_rules(RULES, rate_window="10s", group_name="test")
    assert skipped == []
    config = textwrap.dedent(f"""\
        global:
          scrape_interval: 1s
          evaluation_interval: 1s
        rule_files: [driftline-rules.yml, test-rules.yml]
        scrape_configs:
          - job_name: driftline-worker
            static_configs:
              - targets: ["127.0.0.1:{web_port}"]
        """)
    prom = await asyncio.to_thread(prometheus_factory, config, {
        "driftline-rules.yml": (DEPLOY / "driftline-rules.yml").read_text(), "test-rules.yml": fast})
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
    await producer.start()
    firing: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 30
        while not (box and box[0].started.is_set()):
            assert time.monotonic() < deadline and not task.done(), "worker did not start"
            await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 40
            i = 0
            while time.monotonic() < deadline:
                for _ in range(10):                    # 100 events/s per app, chat: half hit
                    i += 1
                    await producer.send(topic, event("chat", i % 2 == 0), key=b"chat/gpt-4o")
                    await producer.send(topic, event("search", False), key=b"search/gpt-4o")
                await producer.flush()
                async with s.get(f"{prom.url}/api/v1/alerts") as r:
                    body = await r.json()
                firing = [a for a in body["data"]["alerts"] if a["state"] == "firing"]
                if firing:
                    break
                await asyncio.sleep(0.1)
            async with s.get(f"{prom.url}/api/v1/rules") as r:
                groups = (await r.json())["data"]["groups"]
            async with s.get(f"{prom.url}/api/v1/targets") as r:
                targets = (await r.json())["data"]["activeTargets"]
            # loopback /metrics: Prometheus scrapes it without a password, a DNS-rebound page cannot
            # (mutation caught: the Host list not set on the metrics guard in serve_worker)
            async with s.get(f"http://127.0.0.1:{web_port}/metrics",
                             headers={"Host": f"rebind.example:{web_port}"}) as r:
                rebound = r.status
            # the stage's counter reaches Prometheus at its next scrape after the transition,
            # which can come after Prometheus's own rule fired (seen under load): poll a while
            deadline = time.monotonic() + 15
            while True:
                async with s.get(f"{prom.url}/api/v1/query", params={
                        "query": 'driftline_alert_transitions_total{rule="GuardrailFast"}'}) as r:
                    scraped = (await r.json())["data"]["result"]
                if scraped or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
    finally:
        await producer.stop()
        stop.set()
        await asyncio.wait_for(task, 30)
    assert [t["health"] for t in targets] == ["up"]
    assert rebound == 403
    assert len(firing) == 1, firing
    alert = firing[0]
    assert alert["labels"] == {"alertname": "GuardrailFast", "app": "chat", "model": "gpt-4o",
                               "severity": "critical"}
    assert float(str(alert["value"])) == pytest.approx(0.5, abs=0.05)
    # the stream fired the same rule for the same label set, once, and long before
    stage = stages[0]
    fired = [t for t in stage.transitions if t.state == "firing"]
    assert [(t.rule, {"alertname": t.rule, "severity": t.severity, **t.labels}) for t in fired] == [
        ("GuardrailFast", alert["labels"])]
    assert fired[0].value == pytest.approx(0.5, abs=0.05)
    # Prometheus scraped the stage's own counters from the worker
    assert [(r["metric"]["state"], r["value"][1]) for r in scraped] == [("firing", "1")]
    # every exported default rule loaded and evaluates against the real worker's metrics
    by_group = {g["name"]: g["rules"] for g in groups}
    assert len(by_group["driftline"]) == 11
    assert {r["health"] for g in by_group.values() for r in g} == {"ok"}
