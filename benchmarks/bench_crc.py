"""aiokafka's per-record CPU on the event-loop thread with and without CRC checks.

    python benchmarks/bench_crc.py [--events N] [--rounds R]

Produces N records (~1.4 KB, like the worker's events) into a fresh 4-partition topic
on the local broker, then reads the whole topic with a bare ``AIOKafkaConsumer``
(group_id=None, earliest, getmany(20000), each value's length touched) R times with
``check_crcs=True`` (aiokafka's default) and R times with ``check_crcs=False``
(librdkafka's default is ``check.crcs=false``), alternating. Prints per read the
CPU-us per record of the event-loop thread (``time.thread_time``) and of the whole
process, and the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid


async def read_all(bootstrap: str, topic: str, n: int, check_crcs: bool) -> tuple[int, float, float, float]:
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                         enable_auto_commit=False, max_partition_fetch_bytes=8 << 20,
                         fetch_max_bytes=64 << 20, max_poll_records=20_000, check_crcs=check_crcs)
    await c.start()
    got = 0
    t0 = time.perf_counter()
    th0, pr0 = time.thread_time(), time.process_time()
    try:
        while got < n and time.perf_counter() - t0 < 120:
            for recs in (await c.getmany(timeout_ms=500, max_records=20_000)).values():
                got += len(recs)
                for r in recs:
                    len(r.value)
    finally:
        th, pr, wall = time.thread_time() - th0, time.process_time() - pr0, time.perf_counter() - t0
        await c.stop()
    return got, th, pr, wall


async def main_async(args: argparse.Namespace) -> int:
    from driftline.streams.ingest.bulk_producer import produce_records
    from driftline.streams.local.broker import LocalBroker

    topic = f"bench.crc.{uuid.uuid4().hex[:8]}"
    value = (b'{"text": "' + b"x" * 1380 + b'"}')
    with LocalBroker.started(topics={topic: 4}) as broker:
        sent = await produce_records(broker.bootstrap, topic, [(str(i).encode(), value) for i in range(args.events)])
        print(f"produced {sent:,} records of {len(value)} B")
        res: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for _ in range(args.rounds):
            for crc in (True, False):
                got, th, pr, wall = await read_all(broker.bootstrap, topic, sent, crc)
                res[crc].append((1e6 * th / got, 1e6 * pr / got))
                print(f"  check_crcs={crc!s:<5} {got:,} records in {wall:.2f}s: event-loop thread "
                      f"{1e6 * th / got:.2f} CPU-us/record, process {1e6 * pr / got:.2f}", flush=True)
    for crc in (True, False):
        print(f"median check_crcs={crc}: event-loop thread {statistics.median(a for a, _ in res[crc]):.2f} "
              f"CPU-us/record, process {statistics.median(b for _, b in res[crc]):.2f}")
    print(f"saved by check_crcs=False on the event-loop thread: "
          f"{statistics.median(a for a, _ in res[True]) - statistics.median(a for a, _ in res[False]):.2f} CPU-us/record")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000, help="records to produce (default 100,000)")
    ap.add_argument("--rounds", type=int, default=3, help="reads per setting (default 3)")
    return asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
