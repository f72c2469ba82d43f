"""The Grafana dashboards' queries on a store a real worker filled (no Grafana here).

One worker run (module fixture): the real broker, a seeded replay of two apps over about
five minutes of event time with a topic-mix drift from the middle, the drift stage with the
bundled MiniLM model and the alerting stage, into chDB. Then every query of
deploy/grafana/dashboards (panels, template variables, annotations) is expanded for a real
range with deploy/grafana/generate.py's ``expand`` (the plugin's macros) and run on that
store: it must return the declared columns with the declared kinds, and one value per view
must equal what independent SQL on the same store says.
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import sys
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_worker import SESSION_MS
from helpers_worker import wait_for as _wait_for

from driftline.streams.local.broker import LocalBroker, ensure_topics, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
N_EVENTS = 600
WINDOW_MS = 60_000


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("driftline_grafana_generate", ROOT / "deploy/grafana/generate.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


gen = _generator()
DASHBOARDS = {d.uid: d for d in (f() for f in gen.DASHBOARDS)}


async def _fill(bootstrap: str, dsn: str) -> str:
    """Run the worker over the replay until everything is stored, embedded and tested;
    returns the text of its /metrics scraped before it stops."""
    from driftline.schemas.rules import parse_rules
    from driftline.streams.app import serve_worker
    from driftline.streams.devdata.real_prompts import ensure_data
    from driftline.streams.devdata.replay import (
        AppSpec,
        DriftSpec,
        ReplayConfig,
        ReplayData,
        generate,
    )
    from driftline.streams.ingest.bulk_producer import produce_records
    from driftline.streams.sinks.notifiers import LogNotifier
    from driftline.streams.stages.alerting import AlertingStage
    from driftline.streams.stages.embedding import EmbeddingConfig
    from driftline.streams.stages.semantic_drift import DriftConfig, DriftStage
    from driftline.streams.stages.windows import WindowConfig
    from driftline.streams.worker import WorkerConfig

    cfg = ReplayConfig(n_events=N_EVENTS, seed=3, events_per_second=2.0, malformed_rate=0.0, late_rate=0.0,
                       apps=(AppSpec("support-bot", ("gpt-4o-mini",), ("v1",)),
                             AppSpec("code-assistant", ("gpt-4o",), ("v2",))),
                       drift_at=0.5, drift=DriftSpec(jailbreak_share=0.0, toxic_share=0.0, latency_model=None))
    recs = list(generate(cfg, ReplayData.from_paths(ensure_data())))
    assert len(recs) == N_EVENTS and all(r.valid for r in recs)
    topic = f"g-{uuid.uuid4().hex[:10]}"
    ensure_topics(bootstrap, {topic: 1, f"{topic}.dlq": 1})
    await produce_records(bootstrap, topic, [(r.key, r.value) for r in recs])
    rules = parse_rules(textwrap.dedent("""\
        rules:
          - name: SlowCalls
            kind: threshold
            expr: "latency_ms.p50 > 1"
            min_events: 5
            severity: warning
            annotations: {summary: "p50 {value:.0f} ms on {app}/{model}"}
          - name: PromptDrift
            kind: drift
            expr: "drift.p_value < 0.01"
            severity: warning
            resolve_above: 0.05
        """))
    wcfg = WorkerConfig(max_event_age_s=1e10, kafka=bootstrap, clickhouse=dsn, group_id=f"g-{uuid.uuid4().hex[:8]}",
                        topics=(topic,), dlq_topic=f"{topic}.dlq", window=WindowConfig(size_ms=WINDOW_MS),
                        emit_interval_s=0.5, idle_close_s=1.0, session_timeout_ms=SESSION_MS)
    dcfg = DriftConfig(fields=("prompt",), sample_rate=1.0, ref_size=80, window_size=80, test_every=40,
                       test_interval_s=None, alpha=0.01,
                       embedding=EmbeddingConfig(batch_size=32, max_delay_s=0.2, threads=2, max_seq_length=64))
    stop = asyncio.Event()
    box: list[Any] = []
    port = free_port()
    task = asyncio.create_task(serve_worker(
        wcfg, stop, web_port=port, sql_port=None, on_ready=box.append,
        stages=[AlertingStage.factory(rules, notifiers=[LogNotifier()]), DriftStage.factory(dcfg)]))
    try:
        await _wait_for(lambda: (bool(box) and box[0].stored_events >= N_EVENTS) or task.done(), 180,
                        lambda: f"stored {box[0].stored_events if box else '-'} of {N_EVENTS}")
        if task.done():
            task.result()
        st = next(s for s in box[0].stages if getattr(s, "name", "") == "drift")
        deadline = time.monotonic() + 180
        while not await st.drain(0.5):
            assert time.monotonic() < deadline, "the drift stage did not drain"
        await asyncio.sleep(3.0)  # the windows close (idle_close_s) and their last rows are written
        metrics = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode())
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    return str(metrics)


class Store:
    def __init__(self, dsn: str, metrics: str) -> None:
        import clickhouse_connect

        self.client = clickhouse_connect.get_client(dsn=dsn)
        self.metrics = metrics
        lo, hi = self.one("SELECT toUnixTimestamp(min(timestamp)), toUnixTimestamp(max(timestamp)) "
                          "FROM driftline.llm_events")
        # a range covering the event time and the references' created_at (wall clock)
        self.start_s, self.end_s = int(lo) - 60, max(int(hi), int(time.time())) + 60
        self.all = {
            "database": ["driftline"],
            "app": self.col("SELECT DISTINCT app FROM driftline.llm_events"),
            "model": self.col("SELECT DISTINCT model FROM driftline.llm_events"),
            "prompt_version": self.col("SELECT DISTINCT prompt_version FROM driftline.llm_events"),
            "field": self.col("SELECT DISTINCT field FROM driftline.drift_scores"),
            "rule": self.col("SELECT DISTINCT rule FROM driftline.alerts"),
        }

    def one(self, sql: str) -> tuple[Any, ...]:
        return tuple(self.client.query(sql).result_rows[0])

    def col(self, sql: str) -> list[Any]:
        return sorted(r[0] for r in self.client.query(sql).result_rows)

    def run(self, sql: str, **variables: list[str]) -> tuple[list[str], list[str], list[tuple[Any, ...]]]:
        """(column names, type names, rows) of a dashboard query expanded for the store's range."""
        q = self.client.query(gen.expand(sql, start_s=self.start_s, end_s=self.end_s, interval_s=60,
                                         variables={**self.all, **variables}))
        return list(q.column_names), [t.name for t in q.column_types], [tuple(r) for r in q.result_rows]

    def panel(self, uid: str, title: str, **variables: list[str]) -> list[dict[str, Any]]:
        p = next(p for p in DASHBOARDS[uid].panels if p.title == title)
        names, _types, rows = self.run(p.sql, **variables)
        return [dict(zip(names, r, strict=True)) for r in rows]


@pytest.fixture(scope="module")
def store(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    dsn = f"chdb://{tmp_path_factory.mktemp('grafana') / 'chdb'}"
    metrics = asyncio.run(_fill(broker.bootstrap, dsn))
    s = Store(dsn, metrics)
    yield s
    s.client.close()


def kind(type_name: str) -> str:
    t = re.sub(r"^(Nullable|LowCardinality)\((.*)\)$", r"\2", type_name)
    t = re.sub(r"^(Nullable|LowCardinality)\((.*)\)$", r"\2", t)
    if t.startswith("DateTime"):
        return "time"
    if t == "String":
        return "string"
    if re.fullmatch(r"U?Int\d+|Float\d+|Decimal.*", t):
        return "number"
    return f"? {type_name}"


def test_every_query_returns_its_columns(store: Store) -> None:
    # Every panel, variable and annotation query of the three dashboards, with the macros and
    # "All" substituted, runs on the worker's store, returns rows, and its columns have the
    # names and kinds the panel needs (catches: a renamed table column, a typo in SQL, a
    # panel whose time column is a string, a query that reads nothing on a filled store).
    n = 0
    for d in DASHBOARDS.values():
        for what, sql, cols in d.sql_queries():
            names, types, rows = store.run(sql)
            assert list(zip(names, [kind(t) for t in types], strict=True)) == list(cols), (d.uid, what, types)
            assert rows, f"{d.uid} {what}: no rows on a filled store"
            n += 1
    assert n == 29


def test_template_variables_list_the_keys_in_the_store(store: Store) -> None:
    # Catches: a variable query reading the wrong table or column, or not cascading (model
    # restricted by app).
    by = {(uid, v.name): v.sql for uid, d in DASHBOARDS.items() for v in d.variables}
    assert sorted(r[0] for r in store.run(by[("driftline-overview", "app")])[2]) == store.all["app"]
    assert sorted(r[0] for r in store.run(by[("driftline-overview", "model")])[2]) == store.all["model"]
    app = store.all["app"][0]
    models = store.col(f"SELECT DISTINCT model FROM driftline.llm_events WHERE app = '{app}'")
    assert sorted(r[0] for r in store.run(by[("driftline-overview", "model")], app=[app])[2]) == models
    assert len(models) < len(store.all["model"])
    assert sorted(r[0] for r in store.run(by[("driftline-drift", "field")])[2]) == ["prompt"]
    assert sorted(r[0] for r in store.run(by[("driftline-alerts", "rule")])[2]) == store.all["rule"]


def test_overview_values_equal_sql_on_the_events(store: Store) -> None:
    # The window rows are rewritten while a window is open: the panels must read the newest
    # row of each window (FINAL). Checked against the raw events, not the window table
    # (catches: a window counted once per re-emission, events/s or cost/h scaled by the wrong
    # window length, a key filter that is not applied).
    raw = {(r[0], r[1], r[2], int(r[3])): r[4] for r in store.client.query(
        f"SELECT app, model, prompt_version, intDiv(toUnixTimestamp64Milli(timestamp), {WINDOW_MS}) * {WINDOW_MS}, "
        "count() FROM driftline.llm_events FINAL GROUP BY ALL").result_rows}
    assert len(raw) >= 8  # several windows per key
    eps = store.panel("driftline-overview", "Events per second")
    got = {(*r["key"].split("/", 2), int(r["time"].timestamp() * 1000)): r["events_per_s"] for r in eps}
    assert got.keys() == raw.keys()
    assert {k: round(v * WINDOW_MS / 1000, 9) for k, v in got.items()} == raw
    total, errors, cost = store.one("SELECT count(), countIf(status = 'error'), sum(cost_usd) "
                                    "FROM driftline.llm_events FINAL")
    [totals] = store.panel("driftline-overview", "Totals over the range")
    assert totals["events"] == total == N_EVENTS
    assert totals["error_rate"] == pytest.approx(errors / total, abs=1e-12)
    assert totals["cost_usd"] == pytest.approx(cost, rel=1e-9) and cost > 0
    per_hour = store.panel("driftline-overview", "Cost per hour")
    assert sum(r["usd_per_hour"] for r in per_hour) * WINDOW_MS / 3_600_000 == pytest.approx(cost, rel=1e-9)
    # the key filter: one app
    app = store.all["app"][0]
    rows = store.panel("driftline-overview", "Per app / model / prompt_version", app=[app])
    assert {r["app"] for r in rows} == {app}
    assert sum(r["events"] for r in rows) == store.one(
        f"SELECT count() FROM driftline.llm_events FINAL WHERE app = '{app}'")[0]
    # a window's p95 is the stored one of its newest row
    lat = store.panel("driftline-overview", "Latency p50 / p95 / p99")
    first = min(lat, key=lambda r: (r["time"], r["key"]))
    a, m, pv = first["key"].split("/", 2)
    assert first["p95"] == store.one(
        "SELECT argMax(latency_p95_ms, updated_at) FROM driftline.llm_window_metrics "
        f"WHERE app = '{a}' AND model = '{m}' AND prompt_version = '{pv}' "
        f"AND window_start = fromUnixTimestamp64Milli({int(first['time'].timestamp() * 1000)})")[0]


def test_drift_values_equal_sql_on_the_scores(store: Store) -> None:
    # Catches: the p-value series missing tests or mixing methods, the flagged table or the
    # annotations not selecting drifted tests, the reference in force not the highest version.
    n_scores, n_flagged = store.one("SELECT count(), countIf(drifted = 1) FROM driftline.drift_scores")
    assert n_flagged > 0 and n_scores > n_flagged
    series = store.panel("driftline-drift", "p-value per method (lines) against its threshold (dashed)")
    assert len(series) == n_scores
    assert {r["key"].split(" ")[0] for r in series} == {"mmd", "topic_mix", "centroid_cosine"}
    flagged = store.panel("driftline-drift", "Flagged tests")
    assert len(flagged) == n_flagged
    assert all(r["p_value"] < r["threshold"] for r in flagged)
    anno = next(a for a in DASHBOARDS["driftline-drift"].annotations if a.name == "Flagged drift tests")
    assert len(store.run(anno.sql)[2]) == n_flagged
    refs = store.panel("driftline-drift", "Reference in force")
    assert {(r["app"], r["model"], r["prompt_version"], r["field"]): (r["version"], r["mode"], r["n"])
            for r in refs} == {tuple(r[:4]): (r[4], r[5], r[6]) for r in store.client.query(
                "SELECT app, model, prompt_version, field, version, mode, n FROM driftline.drift_references "
                "ORDER BY version").result_rows}
    assert {r["mode"] for r in refs} == {"first_n"} and len(refs) == 2


def test_alerts_values_equal_sql_on_the_alerts(store: Store) -> None:
    # Catches: the timeline missing state changes, the "firing now" count taking any change
    # instead of each alert's latest.
    rows = store.client.query("SELECT fingerprint, ts, state FROM driftline.alerts ORDER BY ts").result_rows
    assert rows
    latest: dict[str, str] = {}
    for fp, _ts, state in rows:
        latest[fp] = state
    timeline = store.panel("driftline-alerts", "Firing / resolved timeline per rule and key")
    assert len(timeline) == len(rows)
    assert sum(r["firing"] for r in timeline) == sum(1 for r in rows if r[2] == "firing")
    assert {r["rule"] for r in store.panel("driftline-alerts", "State changes")} == set(store.all["rule"])
    [now] = store.panel("driftline-alerts", "Firing now (latest state per rule and key)")
    assert (now["firing"], now["resolved"]) == (sum(s == "firing" for s in latest.values()),
                                                sum(s == "resolved" for s in latest.values()))
    # one alert resolves a second after its last change (the row the worker writes then): it
    # leaves "firing now" (catches: counting firing rows instead of each alert's latest state)
    fp = next(f for f, s in latest.items() if s == "firing")
    store.client.command(
        "INSERT INTO driftline.alerts SELECT * REPLACE ('resolved' AS state, ts + INTERVAL 1 SECOND AS ts) "
        f"FROM driftline.alerts WHERE fingerprint = '{fp}' ORDER BY ts DESC LIMIT 1")
    [after] = store.panel("driftline-alerts", "Firing now (latest state per rule and key)")
    assert (after["firing"], after["resolved"]) == (now["firing"] - 1, now["resolved"] + 1)


def test_prometheus_panels_query_metrics_the_worker_exposes(store: Store) -> None:
    # Every metric name in the Prometheus row is in a real worker's /metrics (with the drift
    # and alerting stages): catches a renamed metric (e.g. driftline_events without _total).
    exposed = {line.split("{")[0].split(" ")[0] for line in store.metrics.splitlines() if line and line[0] != "#"}
    exposed |= {line.split(" ")[2] for line in store.metrics.splitlines() if line.startswith("# TYPE ")}
    used = {m for p in DASHBOARDS["driftline-overview"].panels for e, _ in p.exprs
            for m in re.findall(r"\bdriftline_\w+", e)}
    assert len(used) >= 10
    assert used <= exposed, used - exposed


def test_overview_reads_the_newest_row_of_each_window(store: Store) -> None:
    # The worker re-emits a window while it is open (final = 0, an older updated_at) and
    # merges collapse the copies only later. An older emission of one window is added, with
    # merges stopped so it stays: the panels must still show the newest row (catches: the
    # FINAL of the window subquery dropped, which counts that window twice). Last in the
    # module: it adds a row to the shared store.
    store.client.command("SYSTEM STOP MERGES driftline.llm_window_metrics")
    ws, app, events = store.one("SELECT window_start, app, events FROM driftline.llm_window_metrics FINAL "
                                "ORDER BY window_start, app LIMIT 1")
    before = store.one("SELECT count() FROM driftline.llm_window_metrics")[0]
    store.client.command(
        "INSERT INTO driftline.llm_window_metrics SELECT * REPLACE (events - 1 AS events, 0 AS final, "
        "updated_at - INTERVAL 1 SECOND AS updated_at) FROM driftline.llm_window_metrics FINAL "
        f"WHERE app = '{app}' AND window_start = (SELECT min(window_start) FROM driftline.llm_window_metrics)")
    rows, windows = store.one("SELECT count(), (SELECT count() FROM driftline.llm_window_metrics FINAL) "
                              "FROM driftline.llm_window_metrics")
    assert rows == before + 1 and rows > windows
    [totals] = store.panel("driftline-overview", "Totals over the range")
    assert totals["events"] == N_EVENTS
    eps = [r for r in store.panel("driftline-overview", "Events per second", app=[app]) if r["time"] == ws]
    assert len(eps) == 1 and round(eps[0]["events_per_s"] * WINDOW_MS / 1000, 9) == events


def test_prometheus_panels_use_labels_the_metrics_have(store: Store) -> None:
    # The labels an expression groups or filters by, and its legend shows, are labels of the
    # metrics it reads, for every metric the worker exposed samples of (catches: `by (app)`
    # on an unlabelled counter, a legend {{key}} that no series has: an empty legend).
    from prometheus_client.parser import text_string_to_metric_families

    labels: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(store.metrics):
        for smp in fam.samples:
            labels.setdefault(smp.name, set()).update(set(smp.labels) - {"le"})
    checked = 0
    for p in DASHBOARDS["driftline-overview"].panels:
        for expr, legend in p.exprs:
            names = set(re.findall(r"\bdriftline_\w+", expr))
            if not names <= labels.keys():
                continue  # a metric with no sample in this run (e.g. no DLQ record)
            have = set().union(*(labels[n] for n in names))
            used = {x.strip() for g in re.findall(r"by \(([^)]*)\)", expr) for x in g.split(",")}
            used |= {m for g in re.findall(r"\{([^}]*)\}", expr) for m in re.findall(r"(\w+)=~", g)}
            used |= set(re.findall(r"\{\{(\w+)\}\}", legend))
            assert used - {"le"} <= have, (expr, used - have)
            checked += 1
    assert checked >= 8


def test_every_query_runs_on_an_empty_store(store: Store) -> None:
    # A new user's Grafana before the first event: every variable lists nothing (Grafana's
    # "All" of no values makes `IN ()`), and every query must still run, return the declared
    # columns and no rows where it reads rows (catches: SQL that only works on data, e.g. an
    # aggregate over an empty set turned into an error). The empty schema is a second
    # database of the same store, made by the worker's own DDL.
    from driftline.streams.sinks.clickhouse import ddl_statements

    for stmt in ddl_statements("driftline_empty"):
        store.client.command(stmt)
    empty = {k: [] for k in store.all} | {"database": ["driftline_empty"]}
    for d in DASHBOARDS.values():
        for what, sql, cols in d.sql_queries():
            _names, _types, rows = store.run(sql, **empty)
            described = store.run(f"DESCRIBE TABLE ({sql})", **empty)[2]  # an empty result has no columns
            assert [(r[0], kind(r[1])) for r in described] == list(cols), (d.uid, what, described)
            # the stat panels aggregate without GROUP BY: one row of zeros
            stat = what in ("panel 'Totals over the range'", "panel 'Firing now (latest state per rule and key)'")
            assert rows == ([tuple(0 for _ in cols)] if stat else []), (d.uid, what, rows)
