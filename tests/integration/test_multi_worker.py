"""Several workers on one machine, for real: one group, one chDB store behind worker A's endpoint.

``driftline worker`` processes (tests/session_cli.py, short session timeout) on the
shared Tansu broker: A holds the chDB store and serves its SQL endpoint with
``--sql-allow-workers``; B and C write through it as ``driftline_writer``
(``--clickhouse http://driftline_writer@127.0.0.1:PORT/driftline`` and a password
file). All three in one consumer group on a JSON topic of 5 partitions (not a
multiple of 3) and an OTLP topic of 3 partitions written without keys, as the
Collector writes it (re-keyed by default: streams/ingest/rekey.py); B and C join
mid-stream and B leaves (SIGTERM) mid-stream. Then: every key's events on one
partition (the JSON records and the re-keyed spans alike), every event stored
exactly once (``count()`` and ``uniqExact(event_id)`` with and without ``FINAL``),
every window row equal to a recomputation from ``llm_events`` (count, errors,
token sums exactly; p95 within the sketch's stated accuracy of the exact
quantile), and a rule that fires on every key at its first window fires on
all 12 keys (their JSON events and spans in the same windows), each transition
recorded once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest
from helpers_otlp import genai_request

from driftline.streams.auth import USER, WRITER_USER, client_credentials
from driftline.streams.devdata.replay import AppSpec, ReplayConfig, ReplayData, generate
from driftline.streams.ingest.bulk_producer import produce_records
from driftline.streams.ingest.transforms import MemoryRecord, decode_batch
from driftline.streams.local.broker import ensure_topics, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SESSION_MS = 3_000
WINDOW_S = 10
PARTITIONS = 5
OTLP_PARTITIONS = 3
RULES = """\
version: 1
rules:
  - name: MultiWorkerAnyTraffic
    kind: threshold
    expr: "latency_ms.p50 > 0"
    min_events: 5
    severity: info
    for: 0s
"""
WINDOWS_SQL = (
    "SELECT app, model, prompt_version, toUnixTimestamp64Milli(window_start) AS ws, "
    "argMax(events, updated_at), argMax(errors, updated_at), argMax(input_tokens, updated_at), "
    "argMax(output_tokens, updated_at), argMax(latency_p95_ms, updated_at), "
    "argMax(sketch_relative_accuracy, updated_at) "
    "FROM driftline.llm_window_metrics GROUP BY app, model, prompt_version, ws")
RAW_SQL = (
    f"SELECT app, model, prompt_version, intDiv(toUnixTimestamp64Milli(timestamp), {WINDOW_S * 1000})"
    f" * {WINDOW_S * 1000} AS ws, count(), countIf(status = 'error'), sum(ifNull(input_tokens, 0)), "
    "sum(ifNull(output_tokens, 0)), quantileExactLow(0.95)(latency_ms), quantileExactHigh(0.95)(latency_ms) "
    "FROM driftline.llm_events FINAL GROUP BY app, model, prompt_version, ws")


def window_mismatches(raw: list[Any], win: list[Any]) -> list[Any]:
    """Windows whose latest row differs from the recomputation (or that lack a row / events)."""
    r = {tuple(x[:4]): x[4:] for x in raw}
    w = {tuple(x[:4]): x[4:] for x in win}
    bad: list[Any] = [(k, "no row") for k in r.keys() - w.keys()] + [(k, "no events") for k in w.keys() - r.keys()]
    for k in r.keys() & w.keys():
        ev, er, it, ot, lo, hi = r[k]
        wev, wer, wit, wot, p95, acc = w[k]
        ok = float(lo) * (1 - acc) - 1e-6 <= float(p95) <= float(hi) * (1 + acc) + 1e-6
        if (int(wev), int(wer), int(wit), int(wot)) != (int(ev), int(er), int(it), int(ot)) or not ok:
            bad.append((k, (wev, wer, wit, wot, p95), (ev, er, it, ot, lo, hi)))
    return bad


class Proc:
    """One ``driftline worker`` in its own process group, logging to ``log``."""

    def __init__(self, name: str, tmp: Path, args: list[str]) -> None:
        self.log = tmp / f"{name}.log"
        cli = Path(__file__).resolve().parents[1] / "session_cli.py"
        self.proc = subprocess.Popen([sys.executable, str(cli), str(SESSION_MS), "worker", *args],
                                     stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def wait_log(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text(errors="replace"):
            assert self.proc.poll() is None, f"{self.log.name} exited:\n{self.tail()}"
            assert time.monotonic() < deadline, f"{self.log.name}: no {text!r}:\n{self.tail()}"
            time.sleep(0.1)

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            raise AssertionError(f"{self.log.name} did not stop on SIGTERM:\n{self.tail()}") from None


def test_three_workers_one_store_exactly_once(kafka_bootstrap: str, tmp_path: Path) -> None:
    topic = f"mw-{uuid.uuid4().hex[:10]}"
    otlp = f"otlp_spans.{topic}"
    ensure_topics(kafka_bootstrap, {topic: PARTITIONS, otlp: OTLP_PARTITIONS, f"{topic}.dlq": 1,
                                    "driftline.control": 1})
    group = f"g-{uuid.uuid4().hex[:8]}"
    store = tmp_path / "chdb"
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    port = free_port()
    # drift on half of the prompts, small windows: a key's samples are numbered by its owner only
    drift = ["--sample-rate", "0.5", "--drift-fields", "prompt", "--ref-size", "20", "--drift-window", "20",
             "--test-every", "20", "--test-interval", "0", "--embed-threads", "1"]
    common = ["--kafka", kafka_bootstrap, "--topic", topic, "--topic", otlp, "--group", group, *drift,
              "--window", str(WINDOW_S), "--lateness", "600", "--emit-interval", "0.5", "--max-batch", "500",
              "--metrics-port", "0", "--rules", str(rules), "--log-level", "info"]
    # 2,400 events over 80 s of event time ending now, 3 phases of 800; lateness 600 s: none late
    n = 2_400
    # 12 app/model keys (records are keyed app/model): they land on all 5 partitions
    apps = tuple(AppSpec(f"app{i}", ("gpt-4o-mini", "claude-3-5-haiku-20241022")) for i in range(6))
    cfg = ReplayConfig(n_events=n, seed=11, start_ms=int(time.time() * 1000) - 80_000, events_per_second=30,
                       apps=apps, malformed_rate=0.0, late_rate=0.0, drift_at=None)
    records = list(generate(cfg, ReplayData.synthetic(11)))
    ids = {r.event["event_id"] for r in records}
    assert len(ids) == n and all(r.valid for r in records)
    phases = [records[i * 800:(i + 1) * 800] for i in range(3)]
    # OTLP: 3 phases of 4 unkeyed requests of 25 spans of the same 12 keys, in the same 80 s
    keys = sorted({(r.event["app"], r.event["response_model"]) for r in records})
    assert len(keys) == 12
    # each phase's spans in the window of that phase's last JSON events, with their prompt
    # version: the same (app, model, v1) windows, built by one worker from both inputs
    def span_ms(q: int, i: int) -> int:
        phase_end = cfg.start_ms + (q // 4 + 1) * 80_000 // 3
        return (phase_end - 1) // (WINDOW_S * 1000) * (WINDOW_S * 1000) + 100 + ((q % 4) * 25 + i) * 20

    reqs = [genai_request([(*keys[(q + i) % 12], span_ms(q, i), 40 + i, 5 + i, 2) for i in range(25)], 1 + q,
                          prompts=True, prompt_version="v1") for q in range(12)]
    spans = decode_batch([MemoryRecord(otlp, 0, q, None, v) for q, v in enumerate(reqs)], fast=False)
    assert spans.n_events == 300 and not spans.rejected
    ids |= {ev.event_id for ev in spans.events}
    n += 300
    assert len(ids) == n

    def produce(batch: list[Any], phase: int) -> None:
        asyncio.run(produce_records(kafka_bootstrap, topic, [(r.key, r.value) for r in batch]))
        asyncio.run(produce_records(kafka_bootstrap, otlp, [(None, v) for v in reqs[phase * 4:(phase + 1) * 4]]))

    def read_client() -> Any:
        creds = client_credentials(store)
        assert creds is not None and creds[0] == USER
        return clickhouse_connect.get_client(host="127.0.0.1", port=port, username=creds[0], password=creds[1])

    def stored() -> int:
        c = read_client()
        try:
            return int(c.query("SELECT count() FROM driftline.llm_events FINAL").result_rows[0][0])
        finally:
            c.close()

    def wait_stored(k: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (s := stored()) < k:
            assert time.monotonic() < deadline, f"stored {s}/{k}"
            time.sleep(0.3)

    a = Proc("a", tmp_path, [*common, "--clickhouse", f"chdb://{store}", "--sql-port", str(port),
                            "--sql-allow-workers"])
    procs = [a]
    try:
        a.wait_log("worker consuming")
        writer = client_credentials(store, WRITER_USER)
        assert writer is not None
        pw = tmp_path / "writer-password"
        pw.touch(0o600)
        pw.write_text(writer[1] + "\n")
        via_a = ["--clickhouse", f"http://{WRITER_USER}@127.0.0.1:{port}/driftline",
                 "--clickhouse-password-file", str(pw), "--sql-port", "0"]
        produce(phases[0], 0)
        b = Proc("b", tmp_path, [*common, *via_a])  # joins while A consumes phase 1
        procs.append(b)
        b.wait_log("worker consuming")
        produce(phases[1], 1)
        c = Proc("c", tmp_path, [*common, *via_a])  # joins during phase 2
        procs.append(c)
        c.wait_log("worker consuming")
        wait_stored(1_100, 60)
        b.stop()  # leaves mid-stream: its partitions move to A and C
        assert b.proc.returncode == 0, b.tail()
        produce(phases[2], 2)
        wait_stored(n, 60)
        cl = read_client()
        try:
            deadline = time.monotonic() + 20
            while True:  # window rows follow the events every emit interval
                bad = window_mismatches(cl.query(RAW_SQL).result_rows, cl.query(WINDOWS_SQL).result_rows)
                if not bad or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert not bad, f"{len(bad)} windows differ from the raw rows, e.g. {bad[:4]}"
            q = cl.query("SELECT count(), uniqExact(event_id) FROM driftline.llm_events FINAL").result_rows[0]
            assert tuple(q) == (n, n)
            q = cl.query("SELECT count(), uniqExact(event_id) FROM driftline.llm_events").result_rows[0]
            assert tuple(q) == (n, n), "an event stored twice (before merges)"
            got = {r[0] for r in cl.query("SELECT event_id FROM driftline.llm_events").result_rows}
            assert got == ids
            parts = cl.query("SELECT uniqExact(source_partition), uniqExact(source_topic) "
                             "FROM driftline.llm_events").result_rows[0]
            assert tuple(parts) == (PARTITIONS, 1), "the OTLP spans were stored from the OTLP topic"
            split = cl.query("SELECT app, model, groupUniqArray(source_partition) FROM driftline.llm_events "
                             "GROUP BY app, model HAVING uniqExact(source_partition) > 1").result_rows
            assert split == [], f"a key's events on several partitions (several workers): {split}"
            fired = cl.query("SELECT uniqExact(labels) FROM driftline.alerts WHERE state = 'firing'"
                             ).result_rows[0][0]
            # the spans share the JSON events' keys (app, model, v1) and windows
            assert fired == 12, "the rule fires on every key"
            # drift state of a key in one worker at a time: each sample number of a key is one
            # event (two workers sampling one key would both number from the same seq), each
            # sampled event has one number, and every sampled event was embedded
            clash = cl.query("SELECT app, model, prompt_version, field, seq FROM driftline.llm_embeddings "
                             "GROUP BY ALL HAVING uniqExact(event_id) > 1 LIMIT 5").result_rows
            assert clash == [], f"one sample number, several events (two workers on one key): {clash}"
            emb = cl.query("SELECT count(), uniqExact(event_id) FROM driftline.llm_embeddings FINAL").result_rows[0]
            assert emb[0] == emb[1] > 0, f"an event sampled twice: {emb}"
            n_scores = cl.query("SELECT count() FROM driftline.drift_scores").result_rows[0][0]
            assert n_scores > 0, "no drift test ran"
            twice = cl.query("SELECT rule, toString(labels), toString(ts), state, count() AS k "
                             "FROM driftline.alerts GROUP BY 1, 2, 3, 4 HAVING k > 1").result_rows
        finally:
            cl.close()
        for w in (c, a):
            w.stop()
            assert w.proc.returncode == 0, w.tail()
        assert not twice, f"alert transitions recorded twice after a rebalance: {twice[:2]}"
    finally:
        for p in procs:
            if p.proc.poll() is None:
                os.killpg(p.proc.pid, signal.SIGKILL)
                p.proc.wait(10)
