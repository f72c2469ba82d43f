"""No secret in a whole worker run's logs, stderr or /metrics; --redact pii and retention
through the worker, against a ClickHouse *server* (HTTP) with a password.

ClickHouse is tests/faultproxy.py's chDB-over-HTTP server (a subprocess, as in the fault
suite) requiring the password, reached with ``http://default:S3cretPw@127.0.0.1:PORT/driftline``. Alerts go to a
Slack-compatible receiver at ``/services/T000/B000/SECRETTOKEN123`` that answers 500 once
(so the failure is logged) and 200 after. A latency rule fires on the first window.

Every log record at DEBUG (root logger, so driftline's, aiokafka's and clickhouse-connect's
too) is captured with no SecretFilter installed: the call sites themselves must not leak.
Mutations this catches: the worker's start line logging ``cfg.clickhouse`` raw; the
notifier's warning naming the URL raw; the retry warnings quoting a DSN; redaction of
stored rows or of the DLQ copies skipped in the worker; TTLs not set on a server store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiokafka import AIOKafkaProducer
from helpers_worker import read_topic, wait_for

from driftline.detectors.redact import Redaction
from driftline.streams.app import serve_worker
from driftline.streams.local.broker import free_port, wait_for_port
from driftline.streams.sinks.clickhouse import Retention
from driftline.streams.stages.alerting import alerting_stage
from driftline.streams.stages.windows import WindowConfig
from driftline.streams.worker import Worker, WorkerConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PASSWORD = "S3cretPw"
TOKEN = "SECRETTOKEN123"
EMAIL = "jo.doe@example.com"
PROMPT = f"Hi, I am {EMAIL}, please charge 4111 1111 1111 1111."
RESPONSE = "Done. Use key sk-proj-abcdefghijklmnopqrstuvwxyz012345 next time"
N = 30


class SlackReceiver:
    """Answers 500 to the first POST, 200 after; keeps (status, body) of each."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, Any]] = []

    async def handle(self, req: web.Request) -> web.Response:
        status = 500 if not self.calls else 200
        self.calls.append((status, await req.json()))
        return web.Response(status=status, text="upstream says no" if status == 500 else "ok")


def _event(i: int) -> bytes:
    return json.dumps({"event_id": f"e{i}", "app": "chat", "request_model": "gpt-4o",
                       "timestamp": int(time.time() * 1000), "latency_ms": 5000.0,
                       "prompt": PROMPT, "response": RESPONSE}).encode()


@pytest.mark.timeout(120)
async def test_worker_run_leaks_no_secret_and_stores_redacted_texts(
        kafka_bootstrap: str, make_topics: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    topic = f"s-{uuid.uuid4().hex[:10]}"
    make_topics({topic: 1, f"{topic}.dlq": 1})
    ch_port = free_port()
    ch = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parents[1] / "faultproxy.py"),
                           "chdb-http", str(tmp_path / "chdb"), str(ch_port)],
                          stdout=(tmp_path / "ch.log").open("ab"), stderr=subprocess.STDOUT,
                          start_new_session=True, env={**os.environ, "FAULTPROXY_CH_PASSWORD": PASSWORD})
    slack = SlackReceiver()
    app = web.Application()
    app.router.add_post(f"/services/T000/B000/{TOKEN}", slack.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    slack_url = f"http://127.0.0.1:{runner.addresses[0][1]}/services/T000/B000/{TOKEN}"
    rules = tmp_path / "rules.yaml"
    rules.write_text(textwrap.dedent("""\
        rules:
          - name: LatencySpike
            kind: threshold
            expr: "latency_ms.p99 > 2000"
            min_events: 5
            severity: critical
        """))
    stop = asyncio.Event()
    task: asyncio.Task[Any] | None = None
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
    try:
        await asyncio.to_thread(wait_for_port, "127.0.0.1", ch_port, 60)
        dsn = f"http://default:{PASSWORD}@127.0.0.1:{ch_port}/driftline"
        cfg = WorkerConfig(kafka=kafka_bootstrap, clickhouse=dsn, group_id=f"g-{uuid.uuid4().hex[:8]}",
                           topics=(topic,), dlq_topic=f"{topic}.dlq", max_event_age_s=1e10,
                           window=WindowConfig(size_ms=2_000, allowed_lateness_ms=500),
                           redaction=Redaction("pii"), retention=Retention(days=3650, text_days=365))
        box: list[Worker] = []
        web_port = free_port()
        task = asyncio.create_task(serve_worker(
            cfg, stop, web_port=web_port, sql_port=None, on_ready=box.append,
            stages=[alerting_stage(rules, slack_webhooks=[slack_url], eval_interval_s=0.2)]))
        await wait_for(lambda: bool(box) or task.done(), 60, lambda: "the worker never became ready")
        if task.done():
            task.result()
        worker = box[0]
        await producer.start()
        for i in range(N):
            await producer.send(topic, _event(i), key=b"chat/gpt-4o")
        # two rejected records carrying PII: a JSON object with a bad field, and bytes that are not JSON
        bad = json.loads(_event(N))
        bad["latency_ms"] = "slow"
        await producer.send(topic, json.dumps(bad).encode(), key=b"chat/gpt-4o")
        await producer.send(topic, f"oops {EMAIL} {{".encode(), key=b"chat/gpt-4o")
        await producer.flush()
        await wait_for(lambda: worker.stored_events == N and worker.dead_lettered == 2, 60,
                       lambda: f"stored {worker.stored_events}, dead-lettered {worker.dead_lettered}")
        # the alert: refused once (500, logged), delivered on the retry
        await wait_for(lambda: any(s == 200 for s, _ in slack.calls), 30, lambda: f"slack calls {slack.calls}")
        assert [s for s, _ in slack.calls] == [500, 200]
        assert slack.calls[1][1]["text"].startswith(":rotating_light: [FIRING] LatencySpike (critical) app=chat")

        rows = await asyncio.to_thread(worker.sink.query_rows, "SELECT count(), groupUniqArray(prompt), "
                                       "groupUniqArray(response) FROM driftline.llm_events FINAL", None)
        assert rows == [(N, ["Hi, I am <EMAIL>, please charge <CARD>."], ["Done. Use key <SECRET> next time"])]
        outbox = await asyncio.to_thread(worker.sink.query_rows, "SELECT value FROM driftline.dlq_outbox "
                                         "FINAL ORDER BY source_offset", None)
        dlq = await read_topic(kafka_bootstrap, f"{topic}.dlq", 2)
        assert [r.value for r in dlq] == [v.encode() for (v,) in outbox]
        assert json.loads(dlq[0].value)["prompt"] == "Hi, I am <EMAIL>, please charge <CARD>."
        assert dlq[1].value == b"oops <EMAIL>*********** {"
        ttl = await asyncio.to_thread(worker.sink.query_rows, "SELECT create_table_query FROM system.tables "
                                      "WHERE database = 'driftline' AND name = 'llm_events'", None)
        assert "`prompt` Nullable(String) TTL toDateTime(timestamp) + toIntervalDay(365)" in ttl[0][0]
        assert "TTL toDateTime(timestamp) + toIntervalDay(3650)" in ttl[0][0]

        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{web_port}/metrics") as r:
            assert r.status == 200
            metrics = await r.text()
        assert "driftline_" in metrics

        # `driftline sql` takes the password from the environment (off argv), and a refused one
        # is not echoed. Mutations caught: sql ignoring DRIFTLINE_CLICKHOUSE_PASSWORD (516);
        # the error line printing the DSN or the password unmasked.
        from typer.testing import CliRunner

        from driftline.streams.cli.main import app as cli_app

        user_dsn = f"http://default@127.0.0.1:{ch_port}/driftline"
        q = "SELECT count() FROM driftline.llm_events FINAL"
        ok = await asyncio.to_thread(CliRunner().invoke, cli_app, ["sql", "--clickhouse", user_dsn, "-f", "TSV", q],
                                     env={"DRIFTLINE_CLICKHOUSE_PASSWORD": PASSWORD})
        assert (ok.exit_code, ok.stdout.strip()) == (0, str(N)), ok.output
        wrong = "Wr0ngPassw0rd"
        bad_run = await asyncio.to_thread(CliRunner().invoke, cli_app, ["sql", "--clickhouse", user_dsn, q],
                                          env={"DRIFTLINE_CLICKHOUSE_PASSWORD": wrong})
        assert bad_run.exit_code == 1 and "516" in bad_run.output, bad_run.output
        assert wrong not in bad_run.output and PASSWORD not in bad_run.output
    finally:
        stop.set()
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)
        await producer.stop()
        await runner.cleanup()
        ch.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            ch.wait(15)
        if ch.poll() is None:
            ch.kill()
    err = capfd.readouterr().err
    lines = [r.getMessage() for r in caplog.records] + [caplog.text, err]
    for secret in (PASSWORD, TOKEN):
        leaks = [ln for ln in lines if secret in ln]
        assert leaks == [], (secret, leaks[:3])
        assert secret not in metrics
    assert EMAIL not in metrics
    # and the lines that name them are there, masked (the capture did see them)
    masked = [ln for ln in lines if "***" in ln]
    assert any("worker consuming" in ln and f"http://default:***@127.0.0.1:{ch_port}/driftline" in ln
               for ln in masked), "the start line names the masked DSN"
    assert any("POST http://127.0.0.1:" in ln and "/services/*** -> HTTP 500" in ln for ln in masked)
