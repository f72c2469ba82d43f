"""The exported rules in real Prometheus tooling: promtool, and a real Prometheus server
scraping a stand-in of the worker's /metrics (same metric names, via prometheus_client)."""

from __future__ import annotations

import asyncio
import subprocess
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from helpers_alerting import Server, prometheus_factory, promtool  # noqa: F401 (fixtures)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from driftline.schemas.rules import load_rules, parse_rules
from driftline.streams.stages.rule_engine import default_rules_path, export_prometheus_rules

pytestmark = pytest.mark.integration
DEPLOY = Path(__file__).parents[2] / "deploy" / "prometheus"


def test_promtool_checks_and_unit_tests_the_exported_default_rules(promtool: str) -> None:  # noqa: F811
    text, _ = export_prometheus_rules(load_rules(default_rules_path()))
    assert (DEPLOY / "driftline-rules.yml").read_text() == text
    check = subprocess.run([promtool, "check", "rules", str(DEPLOY / "driftline-rules.yml")],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 11 rules found" in check.stdout + check.stderr
    unit = subprocess.run([promtool, "test", "rules", str(DEPLOY / "driftline-rules.test.yml")],
                          capture_output=True, text=True, timeout=30)
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert "SUCCESS" in unit.stdout + unit.stderr
    cfg = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")],
                         capture_output=True, text=True, timeout=30)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr


class WorkerStandIn:
    """The worker's metric contract on a fresh registry, served by aiohttp on 127.0.0.1."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["app", "model"]
        buckets = (50, 100, 250, 500, 1000, 2000, 4000, 8000, 16000, 32000, 64000)
        self.latency = Histogram("driftline_latency_ms", "latency", labels, buckets=buckets,
                                 registry=self.registry)
        self.ttft = Histogram("driftline_ttft_ms", "ttft", labels, buckets=buckets, registry=self.registry)
        self.c = {n: Counter(f"driftline_{n}", n, labels, registry=self.registry) for n in (
            "events", "errors", "guardrail_hits", "negative_feedback", "feedback", "cost_usd",
            "input_tokens", "output_tokens")}
        Counter("driftline_dlq", "dlq", ["reason"], registry=self.registry)
        self.last_event = Gauge("driftline_last_event_timestamp_seconds", "last", labels,
                                registry=self.registry)
        dl = ["app", "model", "prompt_version", "field", "method"]
        Gauge("driftline_drift_p_value", "p", dl, registry=self.registry)
        Gauge("driftline_drift_detected", "d", dl, registry=self.registry)
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def metrics(self, _req: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), content_type="text/plain")

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"{host}:{port}"
        return self.url

    async def traffic(self) -> None:
        """10 calls per tick for chat/gpt-4o: half hit a guardrail, all take 300 ms."""
        while True:
            for _ in range(10):
                self.latency.labels("chat", "gpt-4o").observe(300)
            self.c["events"].labels("chat", "gpt-4o").inc(10)
            self.c["guardrail_hits"].labels("chat", "gpt-4o").inc(5)
            # A second app stays clean: it must not fire.
            self.c["events"].labels("search", "gpt-4o").inc(10)
            self.c["guardrail_hits"].labels("search", "gpt-4o").inc(0)
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def worker_standin() -> AsyncIterator[WorkerStandIn]:
    w = WorkerStandIn()
    await w.start()
    task = asyncio.create_task(w.traffic())
    try:
        yield w
    finally:
        task.cancel()
        await w.stop()


TEST_RULES = """\
rules:
  - name: GuardrailFast
    kind: ratio
    expr: "guardrail.hit_rate > 0.1"
    match: {app: "chat*"}
    severity: critical
    annotations: {summary: "hit rate {value:.2f} on {app}"}
"""


@pytest.mark.timeout(60)
async def test_real_prometheus_scrapes_and_fires_the_exported_guardrail_rule(
    prometheus_factory: Callable[[str, dict[str, str]], Server],  # noqa: F811
    worker_standin: WorkerStandIn,
) -> None:
    fast, skipped = export_prometheus_rules(parse_rules(TEST_RULES), rate_window="10s",
                                            group_name="test")
    assert skipped == []
    defaults = (DEPLOY / "driftline-rules.yml").read_text()
    config = textwrap.dedent(f"""\
        global:
          scrape_interval: 1s
          evaluation_interval: 1s
        rule_files: [driftline-rules.yml, test-rules.yml]
        scrape_configs:
          - job_name: driftline-worker
            static_configs:
              - targets: ["{worker_standin.url}"]
        """)
    prom = await asyncio.to_thread(prometheus_factory, config,
                                   {"driftline-rules.yml": defaults, "test-rules.yml": fast})
    firing: list[dict[str, object]] = []
    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            async with s.get(f"{prom.url}/api/v1/alerts") as r:
                body = await r.json()
            firing = [a for a in body["data"]["alerts"] if a["state"] == "firing"]
            if firing:
                break
            await asyncio.sleep(0.2)
        async with s.get(f"{prom.url}/api/v1/rules") as r:
            rules = (await r.json())["data"]["groups"]
        async with s.get(f"{prom.url}/api/v1/targets") as r:
            targets = (await r.json())["data"]["activeTargets"]
    assert [t["health"] for t in targets] == ["up"]
    assert len(firing) == 1, firing
    alert = firing[0]
    assert alert["labels"] == {"alertname": "GuardrailFast", "app": "chat", "model": "gpt-4o",
                               "severity": "critical"}
    assert float(str(alert["value"])) == pytest.approx(0.5)
    assert alert["annotations"] == {"summary": "hit rate 0.50 on chat"}
    # Every default rule loaded and evaluates without error against the contract's metrics.
    by_group = {g["name"]: g["rules"] for g in rules}
    assert len(by_group["driftline"]) == 11
    assert {r["health"] for g in by_group.values() for r in g} == {"ok"}
