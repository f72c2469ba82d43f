"""What the security defaults cost: --redact per event, and the SQL endpoint per query.

    python benchmarks/bench_security.py [--events 20000] [--queries 200] [--rounds 3]

1. ``--redact``: the worker's own decode + process of replayed events (real AlpacaEval
   prompts/responses via ``ReplayData.load()``, 2% of them carrying an e-mail and a card
   number), then ``redact_events`` on the batch table as the writer does before its
   insert. CPU time (``time.process_time``) per event of the redaction alone for ``pii``
   and ``hash``; the baseline, measured in the same run, is the decode + process of the
   same batch (what every event costs before it is written), and the ratio says how much
   each mode adds to it. ``none`` does no per-event work (checked: same table back).
2. SQL endpoint: ``SELECT count() FROM driftline.llm_events`` through the worker's
   authenticated, read-only endpoint (a fresh connection, the parser checks and the
   query per request) vs the same query on an open chDB client in this process
   (the baseline); wall-clock median and p95 per query, and the ratio of medians.

Prints the machine and the steal time over the run (``/proc/stat``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine  # noqa: E402
from _replay import replay_data  # noqa: E402


def steal_s() -> float:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _records(n: int, seed: int) -> list[Any]:
    from driftline.schemas.topics import EVENTS_TOPIC
    from driftline.streams.devdata.replay import ReplayConfig, generate
    from driftline.streams.ingest.transforms import MemoryRecord

    data, label = replay_data(seed)
    print(f"replay data: {label}")
    rng = random.Random(seed)
    out = []
    for i, r in enumerate(generate(ReplayConfig(n_events=n, seed=seed, malformed_rate=0.0), data)):
        value = r.value
        if rng.random() < 0.02:
            ev = json.loads(value)
            ev["prompt"] = f"{ev.get('prompt') or ''} (reach me at jo.doe@example.com, card 4111 1111 1111 1111)"
            value = json.dumps(ev).encode()
        out.append(MemoryRecord(EVENTS_TOPIC, 0, i, r.key, value))
    return out


def bench_redact(n: int, rounds: int) -> dict[str, float]:
    from driftline.detectors.redact import Redaction
    from driftline.streams.stages.privacy import redact_events
    from driftline.streams.worker import Worker, WorkerConfig

    recs = _records(n, 7)
    w = Worker(WorkerConfig(kafka="127.0.0.1:1", clickhouse="chdb:///nonexistent", max_event_age_s=1e10))
    base = []
    table = None
    for _ in range(rounds):
        t0 = time.process_time()
        work = w.process(recs, {}, w._decode(recs))
        base.append(time.process_time() - t0)
        table = work.arrow
    assert table is not None and table.num_rows == n, "every replayed event decodes"
    res = {"baseline_us": min(base) / n * 1e6}
    assert redact_events(table, Redaction("none")) is table or redact_events(table, Redaction("none")).equals(table)
    for mode in ("pii", "hash"):
        red = Redaction(mode)  # type: ignore[arg-type]
        times = []
        for _ in range(rounds):
            t0 = time.process_time()
            redact_events(table, red)
            times.append(time.process_time() - t0)
        res[f"{mode}_us"] = min(times) / n * 1e6
    w._decode_pool.shutdown()
    return res


async def bench_endpoint(queries: int) -> dict[str, float]:
    import aiohttp

    from driftline.streams.auth import client_credentials, credentials_path, load_credentials
    from driftline.streams.local.broker import free_port
    from driftline.streams.local.sql_endpoint import ClickHouseEndpoint
    from driftline.streams.sinks.clickhouse import ClickHouseSink

    path = Path(tempfile.mkdtemp(prefix="bench-sec-")) / "chdb"
    sink = ClickHouseSink(f"chdb://{path}")
    await asyncio.to_thread(sink.ensure_schema)
    port = free_port()
    ep = ClickHouseEndpoint(sink, port=port, credentials=load_credentials(credentials_path(str(path))))
    await ep.start(str(path))
    creds = client_credentials(str(path))
    assert creds is not None
    user, password = creds
    q = "SELECT count() FROM driftline.llm_events"
    direct, served = [], []
    try:
        for _ in range(queries):
            t0 = time.perf_counter()
            await sink.acall(lambda c: c.command(q))
            direct.append(time.perf_counter() - t0)
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        async with aiohttp.ClientSession(headers={"Authorization": f"Basic {basic}"}) as s:
            for _ in range(queries):
                t0 = time.perf_counter()
                async with s.get(f"http://127.0.0.1:{port}/", params={"query": q}) as r:
                    assert r.status == 200, await r.text()
                    await r.read()
                served.append(time.perf_counter() - t0)
    finally:
        await ep.stop()
        sink.close()

    def pct(xs: list[float], p: float) -> float:
        return sorted(xs)[min(len(xs) - 1, int(p * len(xs)))] * 1e3

    return {"direct_p50_ms": statistics.median(direct) * 1e3, "direct_p95_ms": pct(direct, 0.95),
            "endpoint_p50_ms": statistics.median(served) * 1e3, "endpoint_p95_ms": pct(served, 0.95)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    print("machine:", machine())
    s0, t0 = steal_s(), time.monotonic()
    r = bench_redact(a.events, a.rounds)
    print(f"--redact, {a.events} events, best of {a.rounds} (CPU µs per event):")
    print(f"  baseline decode + process: {r['baseline_us']:.1f}")
    for mode in ("pii", "hash"):
        print(f"  {mode:4}: +{r[mode + '_us']:.1f} µs/event = {r[mode + '_us'] / r['baseline_us']:.2f} "
              "of the baseline")
    e = asyncio.run(bench_endpoint(a.queries))
    print(f"SQL endpoint, {a.queries} queries: direct chDB p50 {e['direct_p50_ms']:.2f} ms "
          f"(p95 {e['direct_p95_ms']:.2f}); endpoint p50 {e['endpoint_p50_ms']:.2f} ms "
          f"(p95 {e['endpoint_p95_ms']:.2f}); ratio of medians {e['endpoint_p50_ms'] / e['direct_p50_ms']:.1f}")
    wall = time.monotonic() - t0
    print(f"steal: {steal_s() - s0:.2f} CPU-s over {wall:.0f} s wall ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
