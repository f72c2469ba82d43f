"""The fault suite's long version: more SIGKILL cycles, 60 s outages of ClickHouse and Kafka.

Runs the harness of tests/integration/test_faults.py (a real Tansu broker, real
chDB, ``driftline worker`` subprocesses, the cutting TCP proxy of
tests/faultproxy.py) with larger settings and prints, per scenario: cycles
survived or seconds of outage survived, events and malformed records produced,
records lost and duplicated (both must be 0: the run fails otherwise), window
rows that differ from an exact recomputation, alerts recorded, peak worker RSS,
and how long the worker took to catch up.

    python benchmarks/bench_faults.py                      # 10 kills, 60 s cuts
    python benchmarks/bench_faults.py --cycles 20 --outage 120 --only crash
    python benchmarks/bench_faults.py --partitions 2 --only crash  # shows the watermark bug

``--partitions 2`` reports window rows off instead of failing: the stream's
watermark is global, so after a restart with a backlog one partition fetched
ahead of the other makes the other's events late (issue 13, "Event time that
one record cannot break").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "integration")]

import test_faults as tf  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cycles", type=int, default=10, help="SIGKILLs under load")
    ap.add_argument("--outage", type=float, default=60.0, help="seconds each link is cut")
    ap.add_argument("--rate", type=float, default=250.0, help="records/s produced")
    ap.add_argument("--partitions", type=int, default=1, help="partitions of llm.events (crash run)")
    ap.add_argument("--seed", type=int, default=1313)
    ap.add_argument("--only", choices=("crash", "clickhouse", "kafka"), action="append")
    args = ap.parse_args(argv)
    only = set(args.only or ("crash", "clickhouse", "kafka"))
    print(f"bench_faults: cycles={args.cycles} outage={args.outage:.0f}s rate={args.rate:.0f}/s "
          f"partitions={args.partitions} seed={args.seed}", flush=True)
    if True:
        tmp = Path(tempfile.mkdtemp(prefix="bench-faults-"))
        print(f"logs and stores under {tmp}", flush=True)
        if "crash" in only:
            # enough records that the load outlasts the kill cycles (~11 s a cycle here)
            n = int(args.rate * (12 * args.cycles + 10))
            sub = tmp / "crash"
            sub.mkdir()
            r = tf.run_crash(sub, cycles=args.cycles, n_events=n, rate=args.rate, seed=args.seed,
                             partitions=args.partitions)
            f = r.figures
            print(f"crash: {r.cycles} SIGKILL cycles survived; {f['events']} events and {f['dlq']} malformed "
                  f"records, lost 0, duplicated 0; DLQ exactly once; windows {f['windows']} "
                  f"(off: {f['windows_off']}); alerts {f['alerts']} (none twice); drained in "
                  f"{r.drain_s:.0f}s; total {r.seconds:.0f}s", flush=True)
        for link in ("clickhouse", "kafka"):
            if link not in only:
                continue
            n = int(args.rate * (args.outage + 40))
            sub = tmp / link
            sub.mkdir()
            t0 = time.monotonic()
            o = tf.run_outage(sub, link=link, outage_s=args.outage, n_events=n, rate=args.rate,
                              seed=args.seed + 1)
            f = o.figures
            print(f"{link} cut: {o.outage_s:.0f}s of outage survived; {f['events']} events and {f['dlq']} "
                  f"malformed records, lost 0, duplicated 0; DLQ exactly once; windows {f['windows']} "
                  f"(off: {f['windows_off']}); alerts {f['alerts']} (none twice); peak RSS "
                  f"{o.peak_rss_mb:.0f} MB (bound {tf.RSS_BOUND_MB} MB); caught up {o.caught_up_s:.0f}s after "
                  f"the link came back; total {time.monotonic() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
