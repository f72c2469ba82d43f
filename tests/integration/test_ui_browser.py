"""The page in a real browser (Debian's headless chromium over the DevTools Protocol) against a
real worker: real broker, real chDB, the alerting stage, a seeded replay of real prompts whose
category mix, jailbreak share and gpt-4o-mini latency shift half-way.

Drift rows are written with the drift stage's own row code (``DriftResult.to_row`` of the real
topic-mix detector, ``SCORE_COLUMNS``/``REFERENCE_COLUMNS`` through the worker's sink): the
vectors are one cluster per AlpacaEval category of each prompt (the real MiniLM on these CPUs
would make this test minutes long), the texts are the prompts, so the drift starts where the
replay's mix shifts.

One worker, several checks, each against SQL on the same store: the event count per key and
the p95 of the busiest window as the overview shows them, every chart canvas drawn (pixels
read back), the flagged tests and their p-values (none before the shift), the alert state
changes; no console error, no failed request; the API refuses a request without the password
with exactly 401. With ``DRIFTLINE_LONG=1`` a second run takes its drift rows from the worker's
real drift stage (MiniLM on CPU, about 2 minutes here) instead. Screenshots go to the test's tmp dir (``DRIFTLINE_UPDATE_SCREENSHOTS=1``
also copies the overview to docs/ui-overview.png for the README).
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import textwrap
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from helpers_browser import Tab, chromium_binary, chromium_tab
from helpers_worker import SESSION_MS, wait_for

from driftline.detectors.topic_mix import TopicMixDrift
from driftline.schemas.columns import REFERENCE_COLUMNS, SCORE_COLUMNS
from driftline.schemas.rules import parse_rules
from driftline.schemas.topics import EVENTS_TOPIC
from driftline.streams.app import serve_worker
from driftline.streams.auth import client_credentials, credentials_path, load_credentials
from driftline.streams.devdata.real_prompts import ensure_data
from driftline.streams.devdata.replay import AppSpec, ReplayConfig, ReplayData, generate
from driftline.streams.ingest.bulk_producer import produce_records
from driftline.streams.local.broker import ensure_topics, free_port
from driftline.streams.stages.alerting import AlertingStage
from driftline.streams.stages.windows import WindowConfig
from driftline.streams.ui.server import ClientRunner, serve_ui
from driftline.streams.worker import WorkerConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(chromium_binary() is None, reason="chromium: scripts/install_system_deps.sh")]

N_EVENTS = 900
RATE = 3.0  # events/s of event time: 300 s, five 1-minute windows per key
KEY = ("support-bot", "gpt-4o-mini-2024-07-18", "v4")
RULES = parse_rules(textwrap.dedent("""\
    rules:
      - name: GuardrailBurst
        kind: ratio
        expr: "guardrail.hit_rate > 0.15"
        min_events: 10
        severity: warning
        resolve_below: 0.05
        annotations: {summary: "guardrail hits {value:.0%} on {app}/{model}"}
      - name: ErrorsSeen
        kind: threshold
        expr: "errors.count > 0"
        min_events: 1
        severity: info
        annotations: {summary: "{value:.0f} errors on {app}/{model}"}
    """))
LATEST_WINDOWS = (
    "SELECT app, model, prompt_version, toUnixTimestamp64Milli(window_start) AS ws, argMax(events, updated_at),"
    " argMax(latency_p95_ms, updated_at), argMax(final, updated_at) FROM driftline.llm_window_metrics"
    " GROUP BY app, model, prompt_version, ws")


def _records() -> tuple[list[Any], int]:
    data = ReplayData.from_paths(ensure_data())
    span_ms = int(N_EVENTS / RATE * 1000)
    cfg = ReplayConfig(n_events=N_EVENTS, seed=11, events_per_second=RATE, malformed_rate=0.0, late_rate=0.0,
                       harmful_rate=0.0, start_ms=int(time.time() * 1000) - span_ms - 90_000,
                       apps=(AppSpec("support-bot", ("gpt-4o-mini", "claude-3-5-haiku-20241022"), ("v4",),
                                     model_weights=(0.7, 0.3)),), drift_at=0.5)
    recs = list(generate(cfg, data))
    shift = next(int(r.event["timestamp"]) for r in recs if r.drifted)
    return recs, shift


def _drift_rows(recs: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Tests of KEY's prompts as the drift stage makes them: a reference of the first 100
    samples, then every 50 samples a test of the last 100 (``DriftResult.to_row``)."""
    mine = [r.event for r in recs if r.event["app"] == KEY[0] and r.event.get("response_model") == KEY[1]]
    cats = sorted({r.category for r in recs})
    rng = np.random.default_rng(3)
    cat_of = {id(r.event): r.category for r in recs}
    vecs = np.stack([np.eye(len(cats))[cats.index(cat_of[id(e)])] * 4 + rng.normal(size=len(cats)) for e in mine])
    texts = [str(e.get("prompt", ""))[:200] for e in mine]

    def dt(ms: int) -> datetime:
        return datetime.fromtimestamp(ms / 1000, tz=UTC)

    det = TopicMixDrift(alpha=0.001, seed=0, n_clusters=len(cats), min_effect=0.1).fit(vecs[:100], texts[:100])
    ref = {"app": KEY[0], "model": KEY[1], "prompt_version": KEY[2], "field": "prompt", "version": 1,
           "mode": "first_n", "seq_from": 0, "seq_to": 99, "from_ts": dt(int(mine[0]["timestamp"])),
           "to_ts": dt(int(mine[99]["timestamp"])), "n": 100, "event_ids": [e["event_id"] for e in mine[:100]],
           "embed_model": "category one-hot (test)", "control_id": "",
           "created_at": dt(int(time.time() * 1000)),  # the wall clock, as the drift stage writes it
           "note": ""}
    rows = []
    for end in range(200, len(mine) + 1, 50):
        r = det.score(vecs[end - 100:end], texts[end - 100:end])
        row = r.to_row()
        row.update(ts=dt(int(mine[end - 1]["timestamp"])), app=KEY[0], model=KEY[1], prompt_version=KEY[2],
                   field="prompt")
        rows.append(row)
    return rows, [ref]


async def _show(tab: Tab, view: str) -> None:
    n = int(await tab.eval("Number(document.body.dataset.renders || 0)"))
    await tab.eval(f"driftline.switchView({view!r})")
    await tab.wait_js(f"Number(document.body.dataset.renders || 0) > {n} && document.body.dataset.view === {view!r}")
    err = await tab.eval("document.getElementById('error').hidden ? '' : document.getElementById('error').textContent")
    assert err == "", err


#: per chart canvas of a view, the pixels in the first series' colour (#1f77b4; axes and grid are grey)
CANVAS_INK = """[...document.querySelectorAll('#view-%s canvas')].map(c => {
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
  for (let i = 0; i < d.length; i += 4)
    if (d[i + 3] > 128 && Math.abs(d[i] - 31) < 40 && Math.abs(d[i + 1] - 119) < 40 && Math.abs(d[i + 2] - 180) < 40) n++;
  return n; })"""


def _drift_stage(box: list[Any]) -> Any:
    """The real drift stage (bundled MiniLM on CPU), every prompt of the replay sampled."""
    from driftline.streams.stages.embedding import EmbeddingConfig, load_encoder
    from driftline.streams.stages.semantic_drift import DriftConfig, DriftStage

    dcfg = DriftConfig(fields=("prompt",), sample_rate=1.0, ref_size=100, window_size=100, test_every=50,
                       test_interval_s=None, alpha=0.05, drain_timeout_s=5.0,
                       embedding=EmbeddingConfig(batch_size=64, max_delay_s=0.5, threads=2, max_seq_length=128))
    encoder = load_encoder(dcfg.embedding)

    def make(registry: Any) -> Any:
        box.append(DriftStage(dcfg, registry, encoder=encoder))
        return box[-1]

    return make


@pytest.mark.parametrize("real_drift", [
    False, pytest.param(True, marks=pytest.mark.skipif(not os.environ.get("DRIFTLINE_LONG"),
                                                       reason="DRIFTLINE_LONG=1: the real drift stage (minutes)"))])
async def test_page_in_a_browser(broker: Any, tmp_path: Path, real_drift: bool) -> None:
    """``real_drift``: the drift rows come from the worker's own drift stage (MiniLM on CPU)."""
    recs, shift_ms = _records()
    drift_box: list[Any] = []
    stages: list[Any] = [AlertingStage.factory(RULES)]
    if real_drift:
        stages.append(await asyncio.to_thread(_drift_stage, drift_box))
    topic = f"{EVENTS_TOPIC}.{uuid.uuid4().hex[:6]}"
    ensure_topics(broker.bootstrap, {topic: 2})
    store = tmp_path / "chdb"
    cfg = WorkerConfig(kafka=broker.bootstrap, clickhouse=f"chdb://{store}", group_id=f"ui-{uuid.uuid4().hex[:6]}",
                       topics=(topic,), window=WindowConfig(size_ms=60_000, allowed_lateness_ms=5_000),
                       emit_interval_s=0.5, idle_close_s=1.0, scan_guardrails=True, session_timeout_ms=SESSION_MS)
    port = free_port()
    stop = asyncio.Event()
    box: list[Any] = []
    task = asyncio.create_task(serve_worker(cfg, stop, web_port=port, sql_port=free_port(), on_ready=box.append,
                                            stages=stages))
    try:
        await wait_for(lambda: bool(box) or task.done(), 60, lambda: "worker never became ready")
        if task.done():
            task.result()
        w = box[0]
        await produce_records(broker.bootstrap, topic, ((r.key, r.value) for r in recs))
        await wait_for(lambda: w.stored_events >= N_EVENTS or task.done(), 90,
                       lambda: f"stored {w.stored_events} of {N_EVENTS}")

        def q(sql: str) -> list[tuple[Any, ...]]:
            return w.sink.query_rows(sql)

        # every window closed (idle_close_s) and the alerts written: nothing changes any more.
        # When the stream is idle, event time follows wall time from the last event on, so the
        # last window closes up to a window (60 s) plus the lateness (5 s) later: the wait
        # depends on where in its window the last event fell (20-65 s here), hence 100 s
        deadline = time.monotonic() + 100
        while any(r[6] == 0 for r in q(LATEST_WINDOWS)) or not q("SELECT count() FROM driftline.alerts")[0][0]:
            assert time.monotonic() < deadline, "windows still open or no alert after 100 s"
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.5)  # one more evaluation tick: its transitions are written too
        if real_drift:
            assert await drift_box[0].drain(600)
        else:
            scores, refs = _drift_rows(recs)
            await w.sink.insert_rows("drift_references", refs, REFERENCE_COLUMNS)
            await w.sink.insert_rows("drift_scores", scores, SCORE_COLUMNS)

        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as s:
            for path in ("/ui/", "/ui/api/overview", "/ui/api/alerts"):
                async with s.get(base + path) as r:
                    assert r.status == 401, path
            async with s.get(base + "/metrics") as r:
                assert r.status == 200  # /metrics on loopback stays as it was: open

        user, password = client_credentials(str(store)) or ("", "")
        assert user == "driftline"
        async with chromium_tab(tmp_path / "profile") as tab:
            auth = base64.b64encode(f"{user}:{password}".encode()).decode()
            await tab.call("Network.setExtraHTTPHeaders", headers={"Authorization": f"Basic {auth}"})
            await tab.call("Page.navigate", url=f"{base}/ui/")
            await tab.wait_js("Number(document.body && document.body.dataset.renders || 0) >= 1")
            await tab.eval("document.getElementById('live').checked = false;"
                           "document.getElementById('range').value = 'all'")
            await _show(tab, "overview")

            # -- overview: events per key, the busiest window's p95, charts drawn
            shown = await tab.eval("[...document.querySelectorAll('#ov-keys tbody tr')].map(r => "
                                   "[r.dataset.key, r.querySelector('[data-col=events]').textContent])")
            raw = q("SELECT app, model, prompt_version, count() FROM driftline.llm_events FINAL"
                    " GROUP BY app, model, prompt_version ORDER BY app, model, prompt_version")
            assert shown == [[f"{a} / {m} / {p}", str(n)] for a, m, p, n in raw]
            assert sum(n for *_, n in raw) == N_EVENTS
            wins = sorted(q(LATEST_WINDOWS), key=lambda r: (-r[4], r[3]))
            a, m, p, ws, events, p95, _ = wins[0]
            cell = await tab.eval(f"(() => {{ const r = document.querySelector('#ov-windows tr[data-t=\"{ws}\"]"
                                  f"[data-key=\"{a} / {m} / {p}\"]'); return r && [r.querySelector("
                                  "'[data-col=events]').textContent, r.querySelector('[data-col=p95]').textContent]; })()")
            assert cell is not None and cell[0] == str(events)
            assert abs(float(cell[1]) - p95) <= 0.05 + 1e-9, (cell, p95)
            ink = await tab.eval(CANVAS_INK % "overview")
            assert len(ink) == 7 and min(ink) > 100, ink  # seven charts, each with a line drawn
            await tab.screenshot(tmp_path / "ui-overview.png")

            # -- drift: flagged tests as SQL has them, none before the shift
            await _show(tab, "drift")
            flagged = q("SELECT toUnixTimestamp64Milli(ts), method, p_value FROM driftline.drift_scores"
                        " WHERE drifted = 1 ORDER BY ts DESC")
            assert flagged, "no test flagged the injected drift"
            assert q("SELECT count() FROM driftline.drift_scores WHERE ts < fromUnixTimestamp64Milli("
                     f"{shift_ms})")[0][0] > 0  # there were tests before the shift
            early = [f for f in flagged if f[0] < shift_ms]
            if real_drift:  # the detectors' own false alarms are the drift stage's concern, not the page's
                print(f"real drift stage: {len(flagged)} flagged, {len(early)} before the shift")
            else:
                assert early == [], (early, shift_ms)
            page_flags = await tab.eval("[...document.querySelectorAll('#dr-flagged .flag')].map(f => "
                                        "[Number(f.dataset.t), f.dataset.method, f.querySelector('[data-col=p]')"
                                        ".textContent])")
            assert [(t, mth) for t, mth, _ in page_flags] == [(t, mth) for t, mth, _ in flagged]
            js_exp = {"e-0": "e-", "e+0": "e+"}  # JS toExponential writes 5.00e-4, Python 5.00e-04
            assert [pv for *_, pv in page_flags] == [
                (f"{pv:.2e}".replace("e-0", js_exp["e-0"]).replace("e+0", js_exp["e+0"])) if pv < 0.001
                else f"{pv:.4f}" for *_, pv in flagged]
            if any(mth == "topic_mix" for _, mth, _ in flagged):  # its explanation: the topics that grew
                grown = await tab.eval("document.querySelector('#dr-flagged .flag[data-method=topic_mix] .grown')"
                                       ".textContent")
                assert grown.startswith("topic ") and " grew: " in grown
            else:
                assert real_drift, "the synthetic drift is a topic-mix shift"
            refs_sql = q("SELECT app, model, prompt_version, field, version FROM driftline.drift_references"
                         " ORDER BY app, model, prompt_version, field, version")
            refs_page = await tab.eval("[...document.querySelectorAll('#dr-refs tbody tr')].map(r => "
                                       "[...r.cells].slice(0, 3).map(c => c.textContent))")
            assert refs_sql and refs_page == [[f"{a} / {m} / {p}", f, str(v)] for a, m, p, f, v in refs_sql]
            ink = await tab.eval(CANVAS_INK % "drift")
            n_charts = q("SELECT uniqExact(app, model, prompt_version, field) FROM driftline.drift_scores")[0][0]
            assert len(ink) == n_charts and min(ink) > 100, ink
            await tab.screenshot(tmp_path / "ui-drift.png")

            # -- alerts: every state change, newest first; one timeline row per rule and key
            await _show(tab, "alerts")
            al = q("SELECT toUnixTimestamp64Milli(ts), rule, state FROM driftline.alerts"
                   " ORDER BY ts DESC, rule DESC, fingerprint DESC")
            rows = await tab.eval("[...document.querySelectorAll('#al-events tbody tr')].map(r => "
                                  "[Number(r.dataset.t), r.dataset.rule, r.cells[2].textContent])")
            assert sorted(map(tuple, rows)) == sorted(al) and rows[0][0] == al[0][0]
            n_fired = q("SELECT uniqExact(rule, fingerprint) FROM driftline.alerts WHERE state = 'firing'")[0][0]
            assert await tab.eval("document.querySelectorAll('#al-timeline .row').length") == n_fired
            await tab.screenshot(tmp_path / "ui-alerts.png")
            assert tab.errors == []
        # `driftline ui` on the store the worker holds reads it through the worker's SQL endpoint
        # (streams/cli/sql.py client_for) and answers the same JSON as the worker's own page
        ui_stop, urls = asyncio.Event(), []
        runner = ClientRunner(f"chdb://{store}")
        ui_task = asyncio.create_task(serve_ui(runner, "driftline", "127.0.0.1", 0,
                                               load_credentials(credentials_path(str(store)), users=("driftline",)),
                                               ui_stop, on_ready=urls.append))
        try:
            await wait_for(lambda: bool(urls) or ui_task.done(), 10, lambda: "driftline ui did not start")
            lo, hi = q("SELECT toUnixTimestamp64Milli(min(window_start)), toUnixTimestamp64Milli(max(window_end))"
                       " FROM driftline.llm_window_metrics")[0]
            bodies = []
            async with aiohttp.ClientSession(headers={"Authorization": f"Basic {auth}"}) as s:
                for url in (f"{base}/ui/", urls[0]):
                    for name in ("overview", "drift", "alerts"):
                        async with s.get(f"{url}api/{name}?from={lo}&to={hi}") as r:
                            assert r.status == 200
                            bodies.append(await r.read())
            assert bodies[:3] == bodies[3:] and b'"events":[' in bodies[0]
            assert type(runner._client).__name__ == "HttpClient"  # the endpoint, not chDB in this process
        finally:
            ui_stop.set()
            await ui_task
            runner.close()
        if os.environ.get("DRIFTLINE_UPDATE_SCREENSHOTS") and not real_drift:
            shutil.copy(tmp_path / "ui-overview.png", Path(__file__).parents[2] / "docs" / "ui-overview.png")
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
