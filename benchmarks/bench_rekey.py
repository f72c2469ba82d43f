"""What re-keying OTLP costs: spans/s stored with the re-keyer, decoding in place, and as JSON.

    python benchmarks/bench_rekey.py [--spans N] [--per-request K]   (N = 60,000: about 1 min here)

Starts a local (Tansu, in-memory) broker and one in-process worker per mode, each on
fresh topics and its own database of one chDB store:

- ``rekey``  (``driftline worker``'s default): OTLP requests on ``otlp_spans.<id>`` (3
  partitions, unkeyed, as the Collector writes them) -> the re-keyer (decode, one JSON
  event per span keyed app/model to the events topic, rekey_log) -> the worker's group;
- ``direct`` (``--otlp-direct``, the baseline): the same requests decoded by the worker
  that reads them;
- ``json``: the same spans as JSON events keyed app/model on the events topic (what a
  keyed producer costs; no OTLP decode).

For each mode the worker is started and waited for, then the records are produced at
once; the time from the start of production until all N events are stored gives
spans/s. Prints the ratios to ``direct`` (measured in the same run), the machine and
the steal time over the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _machine import machine
from bench_scaling import steal_s

APPS = ("support-bot", "search", "agent", "summarizer")
MODELS = ("gpt-4o-mini", "claude-3-5-haiku-20241022", "gpt-4o")


def otlp_requests(n: int, per: int, now_ms: int) -> list[bytes]:
    """``n`` spans in requests of ``per`` GenAI client spans with prompt and response texts."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

    def kv(k: str, v: str | int) -> KeyValue:
        return KeyValue(key=k, value=AnyValue(int_value=v) if isinstance(v, int) else AnyValue(string_value=v))

    out = []
    for q in range(0, n, per):
        by_app: dict[str, list[Any]] = {}
        for i in range(q, min(n, q + per)):
            app, model = APPS[i % len(APPS)], MODELS[(i // len(APPS)) % len(MODELS)]
            start = (now_ms - 60_000 + i % 60_000) * 1_000_000
            prompt = json.dumps([{"role": "user", "parts": [{"type": "text", "content": f"question {i}: how do I "
                                                                                         "reset my password?"}]}])
            answer = json.dumps([{"role": "assistant", "parts": [{"type": "text", "content": "Open Settings, "
                                                                  f"then Security ({i})."}], "finish_reason": "stop"}])
            by_app.setdefault(app, []).append(Span(
                trace_id=(q + 1).to_bytes(16, "big"), span_id=(i + 1).to_bytes(8, "big"), name=f"chat {model}",
                kind=Span.SPAN_KIND_CLIENT, start_time_unix_nano=start,
                end_time_unix_nano=start + (300 + i % 700) * 1_000_000,
                attributes=[kv("gen_ai.operation.name", "chat"), kv("gen_ai.provider.name", "openai"),
                            kv("gen_ai.request.model", model), kv("gen_ai.response.model", model),
                            kv("gen_ai.usage.input_tokens", 20 + i % 50), kv("gen_ai.usage.output_tokens", 8),
                            kv("gen_ai.input.messages", prompt), kv("gen_ai.output.messages", answer)]))
        req = ExportTraceServiceRequest()
        for app, spans in by_app.items():
            rs = ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])
            rs.resource.attributes.append(kv("service.name", app))
            req.resource_spans.append(rs)
        out.append(req.SerializeToString())
    return out


async def run_mode(mode: str, bootstrap: str, store: Path, reqs: list[bytes], n: int) -> float:
    """Seconds from the start of production until the worker stored all ``n`` events."""
    from driftline.schemas.event import encode_event
    from driftline.streams.ingest.bulk_producer import produce_records
    from driftline.streams.ingest.rekey import event_key
    from driftline.streams.ingest.transforms import MemoryRecord, decode_batch
    from driftline.streams.local.broker import ensure_topics
    from driftline.streams.stages.windows import WindowConfig
    from driftline.streams.worker import Worker, WorkerConfig

    tid = uuid.uuid4().hex[:8]
    events, otlp, dlq = f"ev-{tid}", f"otlp_spans.{tid}", f"dlq-{tid}"
    await asyncio.to_thread(ensure_topics, bootstrap, {events: 3, otlp: 3, dlq: 1, "driftline.control": 1})
    cfg = WorkerConfig(kafka=bootstrap, clickhouse=f"chdb://{store}", database=f"bench_{mode}",
                       group_id=f"g-{tid}", topics=(events, otlp), dlq_topic=dlq, otlp_rekey=mode == "rekey",
                       window=WindowConfig(size_ms=60_000), max_event_age_s=1e9, session_timeout_ms=6_000)
    if mode == "json":
        decoded = decode_batch([MemoryRecord(otlp, 0, q, None, v) for q, v in enumerate(reqs)], fast=False)
        records = [(event_key(ev.app, ev.model), encode_event(ev)) for ev in decoded.events]
        topic = events
    else:
        records = [(None, v) for v in reqs]
        topic = otlp
    w = Worker(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    try:
        while not w.started.is_set() or not w.host.ready:
            assert not task.done(), task.exception()
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        t0 = time.perf_counter()
        await produce_records(bootstrap, topic, records)
        while w.stored_events < n:
            assert not task.done(), task.exception()
            await asyncio.sleep(0.02)
        took = time.perf_counter() - t0
        assert w.stored_events == n and w.dead_lettered == 0, (w.stored_events, w.dead_lettered)
    finally:
        stop.set()
        await asyncio.wait_for(task, 120)
    return took


async def main(args: argparse.Namespace) -> None:
    from driftline.streams.local.broker import LocalBroker

    now = int(time.time() * 1000)
    reqs = otlp_requests(args.spans, args.per_request, now)
    print(machine())
    print(f"{args.spans:,} spans in {len(reqs):,} OTLP requests of {args.per_request} "
          f"({sum(map(len, reqs)) / len(reqs) / 1024:.0f} KiB each)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-rekey-"))
    st0 = steal_s()
    try:
        with LocalBroker.started() as broker:
            res = {}
            for mode in ("direct", "rekey", "json"):
                took = await run_mode(mode, broker.bootstrap, tmp / "store", reqs, args.spans)
                res[mode] = args.spans / took
                print(f"{mode:>7}: {args.spans:,} stored in {took:.2f} s = {res[mode]:,.0f} spans/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"ratio rekey/direct {res['rekey'] / res['direct']:.2f}, json/direct {res['json'] / res['direct']:.2f}")
    print(f"steal {steal_s() - st0:.2f} s over the run")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spans", type=int, default=60_000, help="spans (events) per mode")
    ap.add_argument("--per-request", type=int, default=50, help="GenAI spans per OTLP request")
    sys.exit(asyncio.run(main(ap.parse_args())))
