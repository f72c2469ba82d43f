"""The real ``driftline worker`` CLI killed with SIGKILL mid-stream and started again.

Exactly-once rows: the restarted worker seeks past the offsets already stored in
llm_events, so nothing is inserted twice (checked without FINAL too), and
nothing is lost. A dedicated broker: the CLI consumes the fixed topic names. The
CLI runs through tests/session_cli.py, with a 3 s group session timeout instead of
10 s: the restarted worker waits that long for the killed one's partitions.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import clickhouse_connect
import pytest
from helpers_worker import SESSION_MS

from driftline.schemas.event import decode_event
from driftline.streams.auth import client_credentials
from driftline.streams.devdata.replay import ReplayConfig, ReplayData, generate
from driftline.streams.ingest.bulk_producer import produce_records
from driftline.streams.local.broker import LocalBroker, free_port
from driftline.streams.sinks.clickhouse import chdb_path

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SESSION_CLI = Path(__file__).resolve().parents[1] / "session_cli.py"
TOPICS = {"llm.events": 4, "llm.events.dlq": 1, "otlp_spans": 4, "driftline.control": 1}


def _records(n: int, seed: int, start_ms: int) -> list[tuple[bytes, bytes]]:
    recs = list(generate(ReplayConfig(n_events=n, seed=seed, malformed_rate=0.0, start_ms=start_ms),
                         ReplayData.synthetic(seed)))
    assert all(r.valid for r in recs) and len(recs) == n
    return [(r.key, r.value) for r in recs]


def _healthz(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
            return json.loads(r.read())
    except OSError:
        return None


def _sql(port: int, q: str, dsn: str) -> int | None:
    creds = client_credentials(chdb_path(dsn))  # the password the worker keeps next to the store
    if creds is None:
        return None
    try:
        c = clickhouse_connect.get_client(host="127.0.0.1", port=port, username=creds[0], password=creds[1],
                                          connect_timeout=2)
    except Exception:  # noqa: BLE001 - not listening yet
        return None
    try:
        return int(c.query(q).result_rows[0][0])
    except Exception:  # noqa: BLE001
        return None
    finally:
        c.close()


def test_sigkill_restart_no_loss_no_duplicates(tmp_path: Path, chdb_dsn: str) -> None:
    first = _records(20_000, seed=21, start_ms=1_735_689_600_000)
    second = _records(5_000, seed=22, start_ms=1_735_689_600_000 + 3_600_000)
    ids = {decode_event(v).event_id for _, v in first + second}
    assert len(ids) == 25_000, "the two replays' event ids are distinct"

    with LocalBroker.started(log_path=tmp_path / "tansu.log", topics=TOPICS) as broker:
        metrics_port, sql_port = free_port(), free_port()
        # the CLI with a 3 s group session timeout: the restarted worker waits for the killed
        # one's session to expire (about 15 s with the product's 10 s; tests/session_cli.py)
        cmd = [sys.executable, str(SESSION_CLI), str(SESSION_MS), "worker", "--kafka", broker.bootstrap,
               "--clickhouse", chdb_dsn, "--group", f"g-{uuid.uuid4().hex[:10]}",
               "--metrics-port", str(metrics_port), "--sql-port", str(sql_port),
               "--emit-interval", "0.5",
               "--no-drift",  # rows are the subject here; embedding only competes for the CPU
               # small batches, so that the kill lands in the middle of the stream
               "--max-batch", "1000",
               "--max-event-age", "1e10"]  # the replay's fixed 2025 timestamps
        logs = [open(tmp_path / f"worker{i}.log", "wb") for i in (1, 2)]  # noqa: SIM115
        procs: list[subprocess.Popen[bytes]] = []
        try:
            asyncio.run(produce_records(broker.bootstrap, "llm.events", first))
            p1 = subprocess.Popen(cmd, stdout=logs[0], stderr=subprocess.STDOUT)
            procs.append(p1)
            deadline = time.monotonic() + 60
            stored_at_kill = 0
            while True:
                h = _healthz(metrics_port)
                if h and h["stored_events"] > 3_000:
                    stored_at_kill = h["stored_events"]
                    break
                assert p1.poll() is None, f"worker exited: {(tmp_path / 'worker1.log').read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no progress: {h}"
                time.sleep(0.02)
            p1.send_signal(signal.SIGKILL)
            p1.wait(10)
            print(f"killed after {stored_at_kill} stored events (healthz)")

            p2 = subprocess.Popen(cmd, stdout=logs[1], stderr=subprocess.STDOUT)
            procs.append(p2)
            asyncio.run(produce_records(broker.bootstrap, "llm.events", second))

            q_final = "SELECT count() FROM driftline.llm_events FINAL"
            deadline = time.monotonic() + 90
            n = None
            while True:
                n = _sql(sql_port, q_final, chdb_dsn)
                if n == 25_000:
                    break
                assert p2.poll() is None, f"worker exited: {(tmp_path / 'worker2.log').read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"count FINAL = {n} after 90s"
                time.sleep(0.5)
            assert _sql(sql_port, "SELECT count() FROM driftline.llm_events", chdb_dsn) == 25_000
            assert _sql(sql_port, "SELECT uniqExact(event_id) FROM driftline.llm_events", chdb_dsn) == 25_000

            p2.send_signal(signal.SIGTERM)
            try:
                rc = p2.wait(20)
            except subprocess.TimeoutExpired:
                pytest.fail("the worker did not exit within 20 s of SIGTERM")
            assert rc == 0, (tmp_path / "worker2.log").read_text()[-3000:]
        finally:
            for p in procs:
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait(10)
            for f in logs:
                f.close()
