"""Scale-out benchmark: 1, 2 and 3 ``driftline worker`` processes in one group on this machine.

    python benchmarks/bench_scaling.py [--events N] [--partitions P]   (N = 100,000: about 3 min here)

Starts a local (Tansu, in-memory) broker. Worker 1 holds a fresh chDB store and
serves its SQL endpoint with ``--sql-allow-workers``; workers 2 and 3 write to
it through that endpoint as ``driftline_writer`` (``--clickhouse
http://driftline_writer@127.0.0.1:PORT/driftline``), as on a machine where
several workers share one store. For each worker count k:

1. a fresh topic of P partitions and a fresh group and store; the k workers are
   started and waited for (each logged ``worker consuming``, then the group is
   given one session timeout to settle);
2. N events (real replay data, else the synthetic pool, said so; event times
   spread over the last minutes) are produced at once; the time from the start
   of production until all N are stored (``count()`` through worker 1's endpoint,
   polled every 0.25 s) gives events/s.

Beside it, the raw consume rate of the same topic (a bare ``AIOKafkaConsumer``,
no group, in this process), and the ratios. Then the rebalance pause: 2 workers
consume a steady stream (``--rate`` events/s), a third joins; the pause is the
time from its join (its ``worker consuming`` log line) until every partition has
had a record stored after it (the brief's figure), and, per partition, the
longest gap between consecutive stored records around the join (the pause the
partition actually saw). Prints the machine and the steal time over the run.

On a 2-core machine the workers, the broker and chDB share the same two cores:
this measures that scale-out is correct and what it costs, not a speed-up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _machine import machine
from _replay import replay_data

WINDOW_S = 60


def steal_s() -> float:
    """CPU seconds stolen by the hypervisor (``steal`` of ``/proc/stat``, all CPUs); nan if absent."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def records(n: int, seed: int, data: Any, *, start_ms: int, eps: float) -> list[tuple[bytes, bytes]]:
    from driftline.streams.devdata.replay import ReplayConfig, generate

    cfg = ReplayConfig(n_events=n, seed=seed, start_ms=start_ms, events_per_second=eps, malformed_rate=0.0,
                       late_rate=0.0, drift_at=None)
    return [(r.key, r.value) for r in generate(cfg, data)]


async def raw_consume(bootstrap: str, topic: str, n: int, timeout_s: float) -> float:
    """Seconds for a bare consumer to read ``n`` records (from its first fetch request, so a
    small topic read in one fetch is not timed as zero, to the last record)."""
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                         enable_auto_commit=False, max_partition_fetch_bytes=8 << 20, fetch_max_bytes=64 << 20)
    await c.start()
    got = 0
    deadline = time.monotonic() + timeout_s
    t0 = time.perf_counter()
    try:
        while got < n and time.monotonic() < deadline:
            for recs in (await c.getmany(timeout_ms=500, max_records=20_000)).values():
                got += len(recs)
        t1 = time.perf_counter()
    finally:
        await c.stop()
    if got < n:
        raise RuntimeError(f"raw consume read {got}/{n}")
    return t1 - t0


class Worker:
    """One ``driftline worker`` process (own process group), logging to a file."""

    def __init__(self, name: str, tmp: Path, args: list[str]) -> None:
        exe = Path(sys.executable).with_name("driftline")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "driftline.streams.cli.main"]
        self.log = tmp / f"{name}.log"
        self.started = time.time()
        self.proc = subprocess.Popen([*cmd, "worker", *args], stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def consuming_at(self, timeout: float = 120) -> float:
        """Wall time of its ``worker consuming`` line (waits for it)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log.read_text(errors="replace").splitlines():
                if "worker consuming" in line:
                    stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")  # local time
                    return stamp.timestamp()
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.log.name} did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


class Group:
    """k workers of one group on one topic and one chDB store (worker 1's)."""

    def __init__(self, tmp: Path, bootstrap: str, topic: str, name: str) -> None:
        from driftline.streams.local.broker import free_port

        self.tmp, self.store, self.port = tmp, tmp / f"chdb-{name}", free_port()
        self.common = ["--kafka", bootstrap, "--topic", topic, "--group", f"g-{name}-{uuid.uuid4().hex[:6]}",
                       "--no-drift", "--window", str(WINDOW_S), "--lateness", "900", "--metrics-port", "0",
                       "--log-level", "info"]
        self.workers: list[Worker] = []
        self.name = name
        self._client: Any = None

    def add(self) -> Worker:
        from driftline.streams.auth import WRITER_USER, client_credentials

        i = len(self.workers) + 1
        if i == 1:
            args = ["--clickhouse", f"chdb://{self.store}", "--sql-port", str(self.port), "--sql-allow-workers"]
        else:
            writer = client_credentials(self.store, WRITER_USER)
            assert writer is not None
            pw = self.tmp / f"writer-{self.name}"
            pw.touch(0o600)
            pw.write_text(writer[1] + "\n")
            args = ["--clickhouse", f"http://{WRITER_USER}@127.0.0.1:{self.port}/driftline",
                    "--clickhouse-password-file", str(pw), "--sql-port", "0"]
        w = Worker(f"{self.name}-w{i}", self.tmp, [*self.common, *args])
        self.workers.append(w)
        return w

    def query(self, sql: str) -> list[Any]:
        import clickhouse_connect

        from driftline.streams.auth import client_credentials

        if self._client is None:
            user, pw = client_credentials(self.store) or ("", "")
            self._client = clickhouse_connect.get_client(host="127.0.0.1", port=self.port, username=user,
                                                         password=pw)
        return list(self._client.query(sql).result_rows)

    def stored(self) -> int:
        return int(self.query("SELECT count() FROM driftline.llm_events")[0][0])

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
        for w in reversed(self.workers):
            w.stop()


def throughput(tmp: Path, bootstrap: str, k: int, recs: list[tuple[bytes, bytes]], partitions: int,
               timeout: float) -> tuple[str, float, float]:
    from driftline.streams.ingest.bulk_producer import produce_records
    from driftline.streams.local.broker import ensure_topics

    topic = f"scale-{k}-{uuid.uuid4().hex[:6]}"
    ensure_topics(bootstrap, {topic: partitions, f"{topic}.dlq": 1})
    g = Group(tmp, bootstrap, topic, f"k{k}")
    try:
        for _ in range(k):
            g.add().consuming_at()
        time.sleep(12)  # one session timeout (10 s) and more: the group's assignment settles
        t0 = time.perf_counter()
        asyncio.run(produce_records(bootstrap, topic, recs))
        produced = time.perf_counter() - t0
        n = len(recs)
        deadline = time.monotonic() + timeout
        while (s := g.stored()) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{k} workers: stored {s}/{n} after {timeout:.0f}s")
            time.sleep(0.25)
        wall = time.perf_counter() - t0
        exact = g.query("SELECT count(), uniqExact(event_id) FROM driftline.llm_events")[0]
        if tuple(exact) != (n, n):
            raise RuntimeError(f"{k} workers: stored {exact} for {n} events")
    finally:
        g.stop()
    return topic, n / wall, produced


def rebalance_pause(tmp: Path, bootstrap: str, data: Any, partitions: int, rate: float,
                    seconds: float) -> dict[str, float]:
    """2 workers on a steady stream, a third joins: the pause it causes."""
    from kafka import KafkaProducer

    from driftline.streams.local.broker import ensure_topics

    topic = f"rebal-{uuid.uuid4().hex[:6]}"
    ensure_topics(bootstrap, {topic: partitions, f"{topic}.dlq": 1})
    n = int(rate * seconds)
    recs = records(n, 5, data, start_ms=int(time.time() * 1000), eps=rate)
    stop = threading.Event()

    def produce() -> None:
        prod = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
        t = time.monotonic()
        for i in range(0, n, 50):
            if stop.is_set():
                break
            for key, value in recs[i:i + 50]:
                prod.send(topic, value, key=key)
            prod.flush()
            ahead = (i + 50) / rate - (time.monotonic() - t)
            if ahead > 0:
                time.sleep(ahead)
        prod.close()

    g = Group(tmp, bootstrap, topic, "rebal")
    th = threading.Thread(target=produce, daemon=True)
    try:
        for _ in range(2):
            g.add().consuming_at()
        time.sleep(12)
        th.start()
        time.sleep(seconds / 3)
        joining = g.add()
        t_join = joining.consuming_at()
        th.join(seconds * 2)
        time.sleep(5)
        rows = g.query(
            "SELECT source_partition, toUnixTimestamp64Milli(ingested_at) FROM driftline.llm_events "
            "ORDER BY source_partition, ingested_at")
    finally:
        stop.set()
        g.stop()
    by_p: dict[int, list[float]] = {}
    for p, ms in rows:
        by_p.setdefault(int(p), []).append(ms / 1000)
    first_after = [min((t for t in ts if t > t_join), default=float("inf")) - t_join for ts in by_p.values()]
    gaps = []
    for ts in by_p.values():
        near = [t for t in ts if t_join - 15 <= t <= t_join + 60]
        gaps.append(max((b - a for a, b in zip(near, near[1:], strict=False)), default=0.0))
    return {"partitions_seen": float(len(by_p)), "join_to_all_consuming_s": max(first_after),
            "longest_gap_s": max(gaps), "median_gap_s": sorted(gaps)[len(gaps) // 2]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--rate", type=float, default=500.0, help="events/s of the stream in the rebalance run")
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args()

    from driftline.streams.local.broker import LocalBroker

    m = machine()
    print(f"machine: {m['nproc']} CPUs, {m['cpu']}, Python {m['python']}, {m['platform']}")
    data, kind = replay_data(7)
    print(f"replay data: {kind}")
    now = int(time.time() * 1000)
    recs = records(args.events, 7, data, start_ms=now - 240_000, eps=args.events / 230)
    tmp = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    s0, w0 = steal_s(), time.monotonic()
    try:
        with LocalBroker.started() as broker:
            rates: dict[int, float] = {}
            first_topic = ""
            for k in (1, 2, 3):
                topic, rate, produced = throughput(tmp, broker.bootstrap, k, recs, args.partitions, args.timeout)
                rates[k] = rate
                first_topic = first_topic or topic
                print(f"{k} worker(s): {rate:,.0f} events/s ({args.events:,} events, {args.partitions} partitions; "
                      f"producing took {produced:.1f}s of it)", flush=True)
            raw = args.events / asyncio.run(raw_consume(broker.bootstrap, first_topic, args.events, args.timeout))
            print(f"raw consume of the same topic: {raw:,.0f} events/s")
            for k, r in rates.items():
                print(f"  {k} worker(s) / raw consume: {r / raw:.3f}; / 1 worker: {r / rates[1]:.2f}")
            pause = rebalance_pause(tmp, broker.bootstrap, data, args.partitions, args.rate, 30.0)
            print(f"rebalance (2 -> 3 workers, {args.rate:.0f} events/s stream, {args.partitions} partitions): "
                  f"join -> every partition stored again {pause['join_to_all_consuming_s']:.1f}s; longest gap "
                  f"between stored records of a partition {pause['longest_gap_s']:.1f}s (median over "
                  f"partitions {pause['median_gap_s']:.1f}s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.monotonic() - w0
    print(f"steal: {steal_s() - s0:.2f} CPU-s over {wall:.0f} s wall ({os.cpu_count()} CPUs); "
          f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    return 0


if __name__ == "__main__":
    sys.exit(main())
