"""The floor under the worker's CPU per JSON event: what its libraries cost alone.

    python benchmarks/bench_ingest_floor.py [--events 100000] [--batch 10000] [--rounds 3]

``bench_throughput.py`` measures the worker end to end (about 30 CPU-µs per 1.4 KB
event into chDB, spread over the decode thread, the event loop, chDB's insert pool and
its merges). This benchmark measures, on the same replay events, in one process and one
run, what the pieces the worker cannot do without cost by themselves, so that a target
per event can be set against them:

1. the JSON parse alone: Arrow's ``read_json`` with the worker's explicit schema on the
   joined records (what ``decode_batch`` spends most of its time in), and the worker's
   whole ``decode_batch`` (parse, the value checks, source columns);
2. ``to_columns``: the ``llm_events`` table and the window columns from the decoded batch;
3. ClickHouse storing the rows: the same ``llm_events`` Arrow batches inserted into a
   fresh chDB store with the worker's DDL (``FROM INFILE … FORMAT ArrowStream``, as
   clickhouse-connect's chDB backend does), CPU of every thread of the process during
   the inserts and then during ``--settle`` seconds of background merges; beside it the
   same rows into an ``ENGINE = Null`` table (the parse of the Arrow stream and the
   conversion to ClickHouse columns, no storage).

CPU is read per thread from ``/proc`` (user + system), so merges on chDB's threads are
counted; the machine's steal time over the run is printed. Best of ``--rounds`` for the
Python steps; the insert figures are one pass over ``--events`` rows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _machine import machine
from _replay import replay_data
from bench_throughput import steal_s
from bench_throughput import thread_cpu_s as thread_cpu


def best_us(fn: Any, n_events: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best / n_events * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=10_000, help="events per decode and per insert")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--settle", type=float, default=15.0, help="seconds to let merges run after the inserts")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    import chdb
    import pyarrow as pa
    import pyarrow.json as pj

    from driftline.schemas.prices import PriceTable
    from driftline.schemas.topics import EVENTS_TOPIC
    from driftline.streams.devdata.replay import ReplayConfig, generate
    from driftline.streams.ingest import transforms as T
    from driftline.streams.sinks.clickhouse import ddl_statements

    print("machine:", "  ".join(f"{k}={v}" for k, v in machine().items()))
    steal0 = steal_s()
    data, kind = replay_data(args.seed)
    recs = [T.MemoryRecord(EVENTS_TOPIC, i % 4, i, r.key, r.value)
            for i, r in enumerate(generate(ReplayConfig(n_events=args.events, seed=args.seed, malformed_rate=0.0),
                                           data))]
    n = len(recs)
    print(f"data: {kind}; {n:,} events, mean {sum(len(r.value) for r in recs) / n:.0f} B/event")
    batches = [recs[i:i + args.batch] for i in range(0, n, args.batch)]
    prices = PriceTable.default()

    opts = pj.ParseOptions(explicit_schema=T._JSON_SCHEMAS[0], unexpected_field_behavior="error")
    joined = [b"\n".join([r.value for r in b]) for b in batches]  # type: ignore[misc]
    parse = best_us(lambda: [pj.read_json(pa.BufferReader(j), read_options=T._READ_OPTIONS, parse_options=opts)
                             for j in joined], n, args.rounds)
    decoded = [T.decode_batch(b) for b in batches]
    decode = best_us(lambda: [T.decode_batch(b) for b in batches], n, args.rounds)
    enriched = [T.enrich(d, prices) for d in decoded]
    tables = [T.to_columns(e)[0].table for e in enriched]
    cols = best_us(lambda: [T.to_columns(e) for e in enriched], n, args.rounds)

    tmp = Path(tempfile.mkdtemp(prefix="driftline-floor-"))
    files = []
    for i, t in enumerate(tables):
        p = tmp / f"b{i}.arrows"
        with pa.OSFile(str(p), "wb") as f, pa.ipc.new_stream(f, t.schema) as w:
            w.write_table(t)
        files.append(p)
    conn = chdb.connect(str(tmp / "store"))
    for stmt in ddl_statements("driftline"):
        conn.query(stmt)
    conn.query("CREATE TABLE driftline.llm_events_null AS driftline.llm_events ENGINE = Null")

    def insert_all(table: str) -> tuple[dict[str, float], float]:
        a = thread_cpu()
        w = time.perf_counter()
        for i, p in enumerate(files):
            conn.query(f"INSERT INTO driftline.{table} FROM INFILE '{p}' SETTINGS optimize_on_insert=0, "
                       f"insert_deduplication_token='floor-{table}-{i}' FORMAT ArrowStream")
        b = thread_cpu()
        return {k: b[k] - a.get(k, 0.0) for k in b if b[k] - a.get(k, 0.0) > 0}, time.perf_counter() - w

    null_cpu, _ = insert_all("llm_events_null")
    ins_cpu, ins_wall = insert_all("llm_events")
    before = thread_cpu()
    time.sleep(args.settle)
    after = thread_cpu()
    merge_cpu = {k: after[k] - before.get(k, 0.0) for k in after if after[k] - before.get(k, 0.0) > 0}
    parts = conn.query("SELECT count(), sum(rows) FROM system.parts WHERE database = 'driftline' "
                       "AND table = 'llm_events' AND active", "CSV").bytes().decode().strip()
    stored = int(conn.query("SELECT count() FROM driftline.llm_events", "CSV").bytes())
    conn.close()
    steal = steal_s() - steal0

    def us(d: dict[str, float]) -> float:
        return sum(d.values()) / n * 1e6

    def per_thread(d: dict[str, float]) -> str:
        return ", ".join(f"{k} {v / n * 1e6:.1f}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])
                         if v / n * 1e6 >= 0.1)

    if stored != n:
        print(f"!! stored {stored:,} rows of {n:,}")
        return 1
    print(f"\nCPU-µs per event (best of {args.rounds} for the Python steps; batches of {args.batch:,}):")
    print(f"  Arrow read_json alone (worker's schema, one thread)   {parse:6.2f}")
    print(f"  decode_batch (parse + checks + source columns)        {decode:6.2f}")
    print(f"  to_columns (llm_events table + window columns)        {cols:6.2f}")
    print(f"  chDB insert into ENGINE = Null (Arrow stream -> columns) {us(null_cpu):6.2f}  [{per_thread(null_cpu)}]")
    print(f"  chDB insert into llm_events (all threads during inserts) {us(ins_cpu):6.2f}  "
          f"[{per_thread(ins_cpu)}]; {n / ins_wall:,.0f} rows/s wall")
    print(f"  chDB merges in the {args.settle:.0f} s after              {us(merge_cpu):6.2f}  [{per_thread(merge_cpu)}]"
          f"; parts left (count, rows): {parts}")
    floor = decode + cols + us(ins_cpu) + us(merge_cpu)
    print(f"  floor: decode + columns + ClickHouse storing the rows  {floor:6.2f}  "
          "(before consuming from Kafka, windows, metrics and the write log)")
    print(f"steal over the run: {steal:.2f} s of CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
