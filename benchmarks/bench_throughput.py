"""Throughput benchmark: one driftline Worker vs. raw consumption of the same topic.

    python benchmarks/bench_throughput.py [--events N] [--consumer aiokafka --consumer librdkafka]

Starts a local (Tansu, in-memory) broker, produces N realistic events (real
AlpacaEval prompts/responses via ``ReplayData.load()``; falls back to the
handwritten synthetic pool, and says so) into a fresh 4-partition topic, then:

1. baselines, in the order aiokafka, librdkafka, librdkafka, aiokafka (so neither
   gains from going first; each rate is the mean of its two reads): raw
   ``AIOKafkaConsumer`` (group_id=None, earliest, getmany(20000)) and raw
   confluent-kafka ``Consumer`` (librdkafka; a fresh group, earliest, no auto commit,
   consume(20000) in a loop) reading the whole topic, touching each value's length,
   no other processing; with the CPU of this process and of the broker per record;
2. driftline: one in-process ``Worker`` (no embeddings, no guardrail scan)
   consuming the same topic with a fresh group into a fresh chDB path, timed from
   the first processed record until ``stored_events == N``; once per ``--consumer``
   (the worker's Kafka client: aiokafka, librdkafka), one after the other.

It prints events/s for all, the worker's ratio to the faster raw consumer (and to
raw aiokafka), the CPU used by the worker's event-loop
thread, its other threads and the broker, and a breakdown of the worker's time
(decode on the decode thread; enrich / to_columns / windows+metrics in
``Worker.process``; time blocked on the writer; the ClickHouse inserts), measured
by wrapping the functions in-process. ``--record-by-record`` decodes with msgspec
only (the path before the columnar decode), for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from _machine import machine
from _replay import replay_data


def load_records(n: int, seed: int) -> tuple[list[tuple[bytes, bytes]], str, float]:
    from driftline.streams.devdata.replay import ReplayConfig, generate

    t = time.perf_counter()
    data, kind = replay_data(seed)
    recs = [(r.key, r.value) for r in generate(ReplayConfig(n_events=n, seed=seed, malformed_rate=0.0),
                                               data)]
    return recs, kind, time.perf_counter() - t


async def raw_consume(bootstrap: str, topic: str, n: int, timeout_s: float) -> tuple[float, int, int]:
    """Seconds to read ``n`` records with a bare consumer (first fetch to last record)."""
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                         enable_auto_commit=False, max_partition_fetch_bytes=8 << 20,
                         fetch_max_bytes=64 << 20, max_poll_records=20_000)
    await c.start()
    got = nbytes = 0
    t0: float | None = None
    deadline = time.monotonic() + timeout_s
    try:
        while got < n and time.monotonic() < deadline:
            data = await c.getmany(timeout_ms=500, max_records=20_000)
            for recs in data.values():
                if recs and t0 is None:
                    t0 = time.perf_counter()
                got += len(recs)
                nbytes += sum(len(r.value) for r in recs)
        t1 = time.perf_counter()
    finally:
        await c.stop()
    return (t1 - (t0 or t1)), got, nbytes


def raw_consume_librdkafka(bootstrap: str, topic: str, n: int, timeout_s: float) -> tuple[float, int, int]:
    """Seconds to read ``n`` records with a bare confluent-kafka consumer (first record
    to last). Blocking: librdkafka fetches on its own threads, ``consume`` hands over up
    to 20,000 messages per call. A fresh group (the broker holds its first assignment
    for about half the session timeout: before the first record, so not timed)."""
    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-raw-{uuid.uuid4().hex[:8]}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False,
                  "max.partition.fetch.bytes": 8 << 20, "fetch.max.bytes": 64 << 20,
                  "session.timeout.ms": 6_000, "heartbeat.interval.ms": 1_000})
    c.subscribe([topic])
    got = nbytes = 0
    t0: float | None = None
    deadline = time.monotonic() + timeout_s
    try:
        while got < n and time.monotonic() < deadline:
            msgs = c.consume(num_messages=20_000, timeout=0.5)
            if msgs and t0 is None:
                t0 = time.perf_counter()
            for m in msgs:
                if m.error() is None:
                    got += 1
                    nbytes += len(m.value())
        t1 = time.perf_counter()
    finally:
        c.close()
    return (t1 - (t0 or t1)), got, nbytes


async def raw_rates(bootstrap: str, topic: str, n: int, timeout_s: float, broker_pid: int
                    ) -> dict[str, dict[str, float]]:
    """Both raw consumers, read twice each in the order aiokafka, librdkafka, librdkafka,
    aiokafka; per consumer the mean rate and the CPU-us per record of this process and
    of the broker (each read timed from its first record)."""
    out: dict[str, dict[str, list[float]]] = {"aiokafka": defaultdict(list), "librdkafka": defaultdict(list)}
    for name in ("aiokafka", "librdkafka", "librdkafka", "aiokafka"):
        cpu0, b0 = time.process_time(), proc_cpu_s(broker_pid)
        if name == "aiokafka":
            secs, got, nbytes = await raw_consume(bootstrap, topic, n, timeout_s)
        else:
            secs, got, nbytes = await asyncio.to_thread(raw_consume_librdkafka, bootstrap, topic, n, timeout_s)
        cpu, bcpu = time.process_time() - cpu0, proc_cpu_s(broker_pid) - b0
        rate = got / secs if secs > 0 else float("nan")
        print(f"  raw {name:<10} {got:,} records in {secs:.2f}s = {rate:,.0f}/s ({nbytes / max(secs, 1e-9) / 1e6:.0f} MB/s); "
              f"CPU per record over the whole read (start-up and group join included): "
              f"consumer {1e6 * cpu / max(1, got):.1f} us, broker {1e6 * bcpu / max(1, got):.1f} us", flush=True)
        if got < n:
            print(f"!! raw {name} read only {got:,} of {n:,}", file=sys.stderr)
        out[name]["rate"].append(rate)
        out[name]["cpu_us"].append(1e6 * cpu / max(1, got))
        out[name]["broker_us"].append(1e6 * bcpu / max(1, got))
    return {name: {k: sum(v) / len(v) for k, v in d.items()} for name, d in out.items()}


def _stat_cpu_s(stat: str) -> float:
    """User + system CPU seconds from the text of a ``/proc/<pid>[/task/<tid>]/stat``."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc."""
    try:
        return _stat_cpu_s(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, IndexError, ValueError):
        return float("nan")


def steal_s() -> float:
    """CPU seconds the hypervisor gave to others while this VM wanted them (all CPUs,
    ``steal`` of ``/proc/stat``); nan where the kernel does not report it."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds per thread of this process, from /proc: Python threads by their
    Python name (``py:MainThread``, ``py:driftline-decode``), the others by ``comm``
    (chDB names its threads; Arrow's pool threads show as ``python``)."""
    import re
    import threading

    out: dict[str, float] = defaultdict(float)
    py = {t.native_id: t.name for t in threading.enumerate()}
    for task in Path("/proc/self/task").iterdir():
        try:
            raw = (task / "stat").read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1: raw.rindex(")")]
        pyname = py.get(int(task.name))
        if pyname is not None:
            name = "py:" + pyname
        out[re.sub(r"[\d_-]+$", "", name) or name] += _stat_cpu_s(raw)
    return out


class Timers:
    def __init__(self) -> None:
        self.s: dict[str, float] = defaultdict(float)
        self.n: dict[str, int] = defaultdict(int)

    def wrap_sync(self, name: str, fn: Any) -> Any:
        def w(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.s[name] += time.perf_counter() - t
                self.n[name] += 1
        return w

    def wrap_async(self, name: str, fn: Any) -> Any:
        async def w(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return await fn(*a, **k)
            finally:
                self.s[name] += time.perf_counter() - t
                self.n[name] += 1
        return w


async def run_worker(bootstrap: str, topic: str, n: int, timeout_s: float, timers: Timers,
                     ch_path: str, broker_pid: int, record_by_record: bool = False,
                     tuning: dict[str, Any] | None = None, consumer: str = "aiokafka") -> dict[str, Any]:
    import functools

    import driftline.streams.worker as wmod
    from driftline.streams.worker import Worker, WorkerConfig

    # stage timers: the worker module looks these names up at call time (restored after the run)
    originals = {name: getattr(wmod, name) for name in ("decode_batch", "enrich", "to_columns")}
    for name in ("decode_batch", "enrich", "to_columns"):
        fn = getattr(wmod, name)
        if name == "decode_batch" and record_by_record:
            # the worker passes fast= itself: force it off over whatever it passes
            fn = functools.partial(lambda f, *a, **k: f(*a, **{**k, "fast": False}), fn)
        setattr(wmod, name, timers.wrap_sync(name, fn))

    cfg = WorkerConfig(max_event_age_s=1e10, kafka=bootstrap, clickhouse=f"chdb://{ch_path}", topics=(topic,),
                       dlq_topic=f"{topic}.dlq", group_id=f"bench-{uuid.uuid4().hex[:8]}", consumer=consumer,
                       **(tuning or {}))
    worker = Worker(cfg)
    worker.process = timers.wrap_sync("process", worker.process)  # type: ignore[method-assign]
    sink = worker.sink

    def timed(orig: Any) -> Any:
        async def ins(table: str, *a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return await orig(table, *a, **k)
            finally:
                timers.s[f"insert {table}"] += time.perf_counter() - t
                timers.n[f"insert {table}"] += 1
        return ins
    # the fetch loop blocked on a full writer queue: backpressure from ClickHouse
    worker.write_step.batches.add = timers.wrap_async("wait for writer", worker.write_step.batches.add)  # type: ignore[method-assign]
    sink.insert_columns = timed(sink.insert_columns)  # type: ignore[method-assign]
    sink.insert_arrow = timed(sink.insert_arrow)  # type: ignore[method-assign]

    stop = asyncio.Event()
    t_launch = time.perf_counter()
    task = asyncio.create_task(worker.run(stop))
    res: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + timeout_s
        while worker.processed_records == 0:
            if task.done():
                task.result()
                raise RuntimeError("worker exited before processing anything")
            if time.monotonic() > deadline:
                raise TimeoutError("worker processed nothing")
            await asyncio.sleep(0.001)
        t0 = time.perf_counter()
        cpu0 = (time.thread_time(), time.process_time(), proc_cpu_s(broker_pid), steal_s())
        threads0 = thread_cpu_s()
        # the first batch's process() already ran; reset the stage timers at t0 would lose it,
        # so they cover the whole run (start-up batches are empty and cheap)
        progress: list[tuple[float, int]] = []  # (seconds since t0, stored) at each change
        while worker.stored_events < n:
            if not progress or progress[-1][1] != worker.stored_events:
                progress.append((time.perf_counter() - t0, worker.stored_events))
            if task.done():
                task.result()
                raise RuntimeError("worker exited early")
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.002)
        t1 = time.perf_counter()
        cpu1 = (time.thread_time(), time.process_time(), proc_cpu_s(broker_pid), steal_s())
        threads1 = thread_cpu_s()
        res = {"cpu": [b - a for a, b in zip(cpu0, cpu1, strict=True)], "seconds": t1 - t0,
               "threads": {k: v - threads0.get(k, 0.0) for k, v in threads1.items()}, "startup_s": t0 - t_launch, "stored": worker.stored_events,
               "processed": worker.processed_records, "dlq": worker.dead_lettered,
               "progress": progress + [(t1 - t0, worker.stored_events)],
               "batches": worker.metrics.batches}
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 60)
        except Exception as exc:  # noqa: BLE001
            print(f"worker stop: {type(exc).__name__}: {exc}", file=sys.stderr)
        await asyncio.to_thread(sink.close)
        for name, fn in originals.items():
            setattr(wmod, name, fn)
    return res


async def main_async(args: argparse.Namespace) -> int:
    from driftline.streams.ingest.bulk_producer import produce_records
    from driftline.streams.local.broker import LocalBroker

    m = machine()
    print(f"machine: nproc={m['nproc']}  cpu={m['cpu']}  python={m['python']}  ({m['platform']})")
    print(f"generating {args.events:,} events ...", flush=True)
    recs, kind, gen_s = load_records(args.events, args.seed)
    total_bytes = sum(len(v) for _, v in recs)
    print(f"data: {kind}; {len(recs):,} events, {total_bytes / 1e6:.1f} MB, "
          f"mean {total_bytes / max(1, len(recs)):.0f} B/event, generated in {gen_s:.1f}s")

    topic = f"bench.events.{uuid.uuid4().hex[:8]}"
    tmp = Path(tempfile.mkdtemp(prefix="driftline-bench-"))
    try:
        with LocalBroker.started(topics={topic: 4, f"{topic}.dlq": 1}) as broker:
            t = time.perf_counter()
            sent = await produce_records(broker.bootstrap, topic, recs)
            prod_s = time.perf_counter() - t
            del recs
            print(f"produced {sent:,} events to {topic} (4 partitions) in {prod_s:.1f}s "
                  f"({sent / prod_s:,.0f}/s)", flush=True)

            assert broker.process is not None
            print("baselines (raw consumption of the same topic, each read twice):", flush=True)
            raws = await raw_rates(broker.bootstrap, topic, sent, args.timeout, broker.process.pid)
            for name, r in raws.items():
                print(f"baseline raw {name} consume: mean {r['rate']:,.0f} events/s; CPU-us/record: "
                      f"consumer {r['cpu_us']:.1f}, broker {r['broker_us']:.1f}", flush=True)
            fastest = max(raws, key=lambda k: raws[k]["rate"])
            raw_rate = raws[fastest]["rate"]
            print(f"librdkafka / aiokafka raw rate: {raws['librdkafka']['rate'] / raws['aiokafka']['rate']:.2f}")

            results = []
            for i, consumer in enumerate(args.consumer):
                timers = Timers()
                res = await run_worker(broker.bootstrap, topic, sent, args.timeout, timers,
                                       str(tmp / f"chdb{i}"), broker.process.pid, args.record_by_record,
                                       {k: v for k, v in (("min_insert_rows", args.min_insert_rows),
                                                          ("insert_linger_s", args.insert_linger_s))
                                        if v is not None}, consumer)
                results.append((consumer, timers, res))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rc = 0
    for consumer, timers, res in results:
        print(f"==== driftline worker consuming through {consumer}")
        rc |= report(res, timers, sent, raws, fastest, raw_rate, m)
    if len(results) > 1:
        print("summary: " + "; ".join(
            f"{c}: {r['stored'] / r['seconds']:,.0f} events/s, ratio to the faster raw {r['stored'] / r['seconds'] / raw_rate:.3f}, "
            f"event-loop thread {1e6 * r['threads'].get('py:MainThread', 0.0) / max(1, sent):.1f} CPU-us/event"
            for c, _, r in results))
    return rc


def report(res: dict[str, Any], timers: Timers, sent: int, raws: dict[str, dict[str, float]], fastest: str,
           raw_rate: float, m: dict[str, Any]) -> int:
    """Print one worker run's figures; 1 when it did not store every event."""
    rate = res["stored"] / res["seconds"] if res.get("seconds") else float("nan")
    print(f"driftline worker: {res['stored']:,}/{sent:,} stored in {res['seconds']:.2f}s = "
          f"{rate:,.0f} events/s  (start-up before first record {res['startup_s']:.2f}s; "
          f"{res['batches']} batches)")
    print(f"ratio driftline / faster raw consume ({fastest}): {rate / raw_rate:.3f}   "
          f"(to raw aiokafka: {rate / raws['aiokafka']['rate']:.3f}; "
          f"to raw librdkafka: {rate / raws['librdkafka']['rate']:.3f})")
    prog = [(t, k) for t, k in res["progress"] if k > 0]
    if len(prog) >= 2:
        (ta, ka), (tb, kb) = prog[0], prog[-1]
        print("  inserts landed at (s, events stored): " + ", ".join(f"{t:.2f}/{k:,}" for t, k in prog))
        print(f"  first insert after {ta:.2f}s; from the first to the last insert {(kb - ka) / (tb - ta):,.0f} events/s "
              "(the pipeline full: no start-up fill, no final flush)")
    wall = res["seconds"]
    main_cpu, proc_cpu, broker_cpu, steal = res["cpu"]
    print(f"CPU over the timed run ({wall:.2f}s wall, {m['nproc']} cores): event-loop thread "
          f"{main_cpu:.2f}s ({100 * main_cpu / wall:.0f}% busy), other threads of the worker "
          f"process (ClickHouse/chDB, Kafka I/O) {proc_cpu - main_cpu:.2f}s, broker process "
          f"{broker_cpu:.2f}s; total {(proc_cpu + broker_cpu) / wall:.2f} cores, "
          f"{1e6 * (proc_cpu + broker_cpu) / max(1, sent):.0f} CPU-us/event")
    print(f"  CPU stolen by the hypervisor over the run: {steal:.2f}s ({100 * steal / (wall * (os.cpu_count() or 1)):.0f}% "
          "of the cores; a shared host slows every figure above)")
    busiest = sorted(res["threads"].items(), key=lambda kv: -kv[1])[:8]
    print("  CPU by thread name: " + ", ".join(
        f"{k} {1e6 * v / max(1, sent):.1f} us/event" for k, v in busiest if v > 0))
    print("breakdown (cumulative seconds over the run; decode_batch runs on the decode thread, "
          "insert on the ClickHouse thread, both overlapping the event loop's work):")
    for name in ("process", "decode_batch", "enrich", "to_columns", "wait for writer", "insert llm_events",
                 "insert llm_window_metrics"):
        if name in timers.s:
            print(f"  {name:<26} {timers.s[name]:7.2f}s  {100 * timers.s[name] / wall:5.1f}% of wall  "
                  f"({timers.n[name]} calls, {1e6 * timers.s[name] / max(1, sent):.1f} us/event)")
    # decode_batch runs on the worker's decode thread (overlapping the next fetch), not in process
    other = timers.s["process"] - timers.s["enrich"] - timers.s["to_columns"]
    print(f"  {'windows+metrics (rest)':<26} {other:7.2f}s  {100 * other / wall:5.1f}% of wall")
    if res["stored"] < sent:
        print(f"!! timed out: only {res['stored']:,} of {sent:,} stored", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000, help="events to produce (default 200,000)")
    ap.add_argument("--seed", type=int, default=7, help="replay seed (default 7)")
    ap.add_argument("--record-by-record", action="store_true",
                    help="decode every JSON event with msgspec, one by one (the path before the "
                         "columnar Arrow decode), for comparison")
    ap.add_argument("--min-insert-rows", type=int, default=None,
                    help="WorkerConfig.min_insert_rows (default: the worker's)")
    ap.add_argument("--insert-linger-s", type=float, default=None,
                    help="WorkerConfig.insert_linger_s (default: the worker's)")
    ap.add_argument("--consumer", action="append", choices=("aiokafka", "librdkafka"),
                    help="the worker's Kafka client (WorkerConfig.consumer); repeat it to run the worker "
                         "once with each, in that order, on the same topic (default: aiokafka, the worker's)")
    ap.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds per phase")
    args = ap.parse_args()
    args.consumer = args.consumer or ["aiokafka"]
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
