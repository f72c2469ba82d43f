"""How fast the page and its JSON API answer on a filled store, against a plain count().

    python benchmarks/bench_ui.py [--keys 12] [--hours 24] [--rounds 10] [--store chdb:///path]

The store: by default a fresh chDB filled as a worker fills it over ``--hours`` of
1-minute windows for ``--keys`` app/model/prompt_version keys: each window written three
times (two early rows and the final one, as the worker re-emits open windows), a drift
test per key, field (prompt, response) and method (mmd, topic_mix, centroid) every
5 minutes (5% flagged, with a topic-mix explanation of 12 clusters and 3 texts each),
and 40 alert state changes per key. ``--store`` reads an existing store instead (e.g.
the demo's kept store).

Served as ``driftline ui`` serves it (``serve_ui`` + ``ClientRunner``: one clickhouse-
connect client, HTTP Basic). Measured, median of ``--rounds``:

- baseline: ``SELECT count() FROM driftline.llm_window_metrics`` on the same client;
- each API endpoint over HTTP for the last hour (the page's default range) and for
  the whole store (all data);
- the page in headless chromium (when installed): navigation start until the first
  render is done (``performance.now()`` at the end of the page's refresh: HTML, JS,
  uPlot, four API calls, the charts drawn), default range; then with ``all data``.

Prints the machine, the times and each one's ratio to the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _machine import machine  # noqa: E402

MIN = 60_000
PASSWORD = "bench-password-0123456789"


def fill(dsn: str, keys: int, hours: int) -> int:
    """Write the synthetic store; returns the newest event time (ms)."""
    import numpy as np

    from driftline.schemas.columns import ALERT_COLUMNS, SCORE_COLUMNS, WINDOW_COLUMNS
    from driftline.streams.sinks.clickhouse import ClickHouseSink

    rng = np.random.default_rng(0)
    end = (int(time.time() * 1000) // MIN) * MIN
    start = end - hours * 3_600_000
    n_win = hours * 60

    def dt(ms: int) -> datetime:
        return datetime.fromtimestamp(ms / 1000, tz=UTC)

    sink = ClickHouseSink(dsn)
    sink.ensure_schema()
    key_names = [(f"app-{k % 4}", f"model-{k}", f"v{k % 3}") for k in range(keys)]
    for a, m, p in key_names:
        # one insert per version: rows of one window in one insert would be collapsed on insert
        # (ReplacingMergeTree), while the worker writes each re-emission in a later step
        for version in range(3):
            cols: dict[str, list[Any]] = {c: [] for c in WINDOW_COLUMNS}
            for i in range(n_win):
                ws = start + i * MIN
                ev = int(rng.integers(20, 200))
                lat = float(rng.lognormal(7, 0.3))
                row = {c: 0 for c in WINDOW_COLUMNS}
                row.update(window_start=dt(ws), window_end=dt(ws + MIN), app=a, model=m, prompt_version=p,
                           events=ev, errors=ev // 50, latency_p50_ms=lat / 2, latency_p90_ms=lat * 0.9,
                           latency_p95_ms=lat, latency_p99_ms=lat * 1.4, ttft_p50_ms=lat / 8, ttft_p95_ms=lat / 5,
                           ttft_p99_ms=lat / 4, tpot_p50_ms=20.0, tpot_p95_ms=40.0, input_tokens=ev * 900,
                           output_tokens=ev * 200, cost_usd=ev * 0.0004, guardrail_checked_events=ev,
                           guardrail_hits=ev // 20, guardrail_hit_rate=(ev // 20) / ev, sketch_relative_accuracy=0.01,
                           final=int(version == 2), updated_at=dt(ws + MIN + version * 5000))
                for c in WINDOW_COLUMNS:
                    cols[c].append(row[c])
            sink.call(lambda c, cols=cols: c.insert("driftline.llm_window_metrics",
                                                      list(zip(*cols.values(), strict=True)),
                                                      column_names=list(WINDOW_COLUMNS)))
        explanation = json.dumps({"test": "G-test", "clusters": [
            {"cluster": j, "ref_share": 1 / 12, "cur_share": 1 / 12 + (0.05 if j == 0 else -0.004),
             "delta": 0.05 if j == 0 else -0.004, "examples": [f"reference prompt {j}.{t} " * 8 for t in range(3)],
             "cur_examples": [f"current prompt {j}.{t} " * 8 for t in range(3)]} for j in range(12)]})
        scores = []
        for i in range(0, n_win, 5):
            for field in ("prompt", "response"):
                for method in ("mmd", "topic_mix", "centroid"):
                    flagged = rng.random() < 0.05
                    scores.append([dt(start + i * MIN), a, m, p, field, method, float(rng.random()),
                                   float(rng.random() * 1e-4 if flagged else rng.random()), 0.001, int(flagged),
                                   300, 300, explanation if flagged else "{}"])
        sink.call(lambda c, scores=scores: c.insert("driftline.drift_scores", scores, column_names=list(SCORE_COLUMNS)))
        alerts = [[dt(start + int(rng.integers(0, n_win)) * MIN), f"Rule{j % 4}", "firing" if j % 2 == 0 else "resolved",
                   "warning", a, m, 1.0, {"app": a}, {"summary": "s"}, f"{a}{m}{j % 4}"] for j in range(40)]
        alerts.sort(key=lambda r: r[0])
        sink.call(lambda c, alerts=alerts: c.insert("driftline.alerts", alerts, column_names=list(ALERT_COLUMNS)))
    sink.close()
    return end


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


async def run(args: argparse.Namespace) -> None:
    import aiohttp

    from driftline.streams.auth import Credentials
    from driftline.streams.local.broker import free_port
    from driftline.streams.ui.server import ClientRunner, serve_ui

    print("machine:", json.dumps(machine()))
    tmp = Path(tempfile.mkdtemp(prefix="bench-ui-"))
    dsn = args.store or f"chdb://{tmp / 'chdb'}"
    if not args.store:
        t0 = time.perf_counter()
        fill(dsn, args.keys, args.hours)
        print(f"filled {dsn}: {args.keys} keys x {args.hours} h of 1-min windows (3 rows each), drift tests every "
              f"5 min x 2 fields x 3 methods, 40 alert changes per key, in {time.perf_counter() - t0:.1f} s")
    runner = ClientRunner(dsn)
    stop = asyncio.Event()
    urls: list[str] = []
    port = free_port()
    task = asyncio.create_task(serve_ui(runner, "driftline", "127.0.0.1", port, Credentials({"driftline": PASSWORD}),
                                        stop, on_ready=urls.append))
    while not urls:
        await asyncio.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    out: dict[str, float] = {}
    try:
        count = await runner(lambda c: c.query("SELECT count() FROM driftline.llm_window_metrics").result_rows[0][0])
        print(f"window rows in the store: {count:,}")
        base_s = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            await runner(lambda c: c.query("SELECT count() FROM driftline.llm_window_metrics").result_rows)
            base_s.append(time.perf_counter() - t0)
        out["baseline count()"] = median_ms(base_s)
        token = base64.b64encode(f"driftline:{PASSWORD}".encode()).decode()
        async with aiohttp.ClientSession(headers={"Authorization": f"Basic {token}"}) as s:
            async with s.get(base + "/ui/api/extent") as r:
                ext = await r.json()
            ranges = {"last hour": (ext["to"] + 1 - 3_600_000, ext["to"] + 1), "all data": (ext["from"], ext["to"] + 1)}
            for label, (f, t) in ranges.items():
                for name in ("overview", "drift", "alerts"):
                    samples, size = [], 0
                    for _ in range(args.rounds):
                        t0 = time.perf_counter()
                        async with s.get(f"{base}/ui/api/{name}?from={f}&to={t}") as r:
                            body = await r.read()
                            assert r.status == 200, body[:200]
                        samples.append(time.perf_counter() - t0)
                        size = len(body)
                    out[f"/ui/api/{name} ({label}, {size / 1024:.0f} KiB)"] = median_ms(samples)
        from helpers_browser import chromium_binary, chromium_tab

        if chromium_binary():
            async with chromium_tab(tmp / "profile") as tab:
                await tab.call("Network.setExtraHTTPHeaders", headers={"Authorization": f"Basic {token}"})
                await tab.call("Network.setCacheDisabled", cacheDisabled=True)
                for label, all_data in (("page, last hour (default)", False), ("page, all data", True)):
                    samples = []
                    for _ in range(args.rounds):
                        await tab.call("Page.navigate", url="about:blank")  # a new document each round
                        await tab.wait_js("location.href === 'about:blank' && !window.driftline")
                        await tab.call("Page.navigate", url=f"{base}/ui/")
                        await tab.wait_js("!!(window.driftline && window.driftline.renders >= 1)")
                        if all_data:
                            await tab.wait_js("document.getElementById('live').checked = false; !driftline.busy")
                            t0 = await tab.eval("document.getElementById('range').value = 'all'; performance.now()")
                            await tab.eval("void driftline.refresh()")
                            await tab.wait_js("driftline.renders >= 2")
                            samples.append((await tab.eval("driftline.renderedAt") - t0) / 1000)
                        else:
                            samples.append(await tab.eval("driftline.renderedAt") / 1000)
                    out[label] = median_ms(samples)
                assert tab.errors == [], tab.errors
        else:
            print("chromium not installed: page load not measured (scripts/install_system_deps.sh)")
    finally:
        stop.set()
        await task
        runner.close()
    b = out["baseline count()"]
    print(f"\n{'what':<58} {'median ms':>10} {'x count()':>10}")
    for k, v in out.items():
        print(f"{k:<58} {v:>10.1f} {v / b:>10.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=12)
    ap.add_argument("--hours", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--store", help="an existing store's DSN instead of a synthetic one")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
