"""Fast batched producing of JSONL events to Kafka (``driftline emit``, the demo, benchmarks).

aiokafka's batch API packs thousands of records per request instead of one call per
record (the figures: ``benchmarks/RESULTS.md``, "Module speed notes").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import msgspec
from aiokafka import AIOKafkaProducer

from driftline.schemas.event import NESTED_TOO_DEEP, EventError, event_from_dict
from driftline.streams.ingest.kafka_security import KafkaSecurity

__all__ = ["produce_records", "emit_lines", "key_of", "check_line"]

_dec = msgspec.json.Decoder()


def key_of(value: bytes) -> bytes:
    """``app/model`` of a JSON event, for partitioning; b"" when it cannot be read
    (never raises: not JSON, bad UTF-8, nested too deep for the decoder, ...)."""
    return check_line(value)[0]


def check_line(value: bytes) -> tuple[bytes, str | None]:
    """``(key, reason)`` for one JSONL line: its ``app/model`` key (b"" when it cannot be
    read) and why the worker would reject it (None when it is a valid event; the event
    time bounds of the worker are not checked here). Never raises."""
    try:
        d = _dec.decode(value)
    except msgspec.DecodeError as exc:
        return b"", f"not valid JSON: {exc}"
    except UnicodeDecodeError as exc:
        return b"", f"not valid UTF-8: {exc}"
    except RecursionError:
        return b"", NESTED_TOO_DEEP
    if not isinstance(d, dict):
        return b"", f"event must be a JSON object, got {type(d).__name__}"
    model = d.get("response_model") or d.get("request_model") or ""
    key = f"{d.get('app', '')}/{model}".encode("utf-8", "replace")
    try:
        event_from_dict(d)
    except EventError as exc:
        return key, str(exc)
    except Exception as exc:  # noqa: BLE001 - a line never stops the emitter
        return key, f"{type(exc).__name__}: {exc}"
    return key, None


async def produce_records(bootstrap: str, topic: str, records: Iterable[tuple[bytes | None, bytes]],
                          *, progress: Any = None, headers: list[tuple[str, bytes]] | None = None,
                          security: KafkaSecurity | None = None) -> int:
    """Produce (key, value) pairs in batches, partitioned by key hash. Returns the count sent.
    ``security``: TLS / SASL of the producer (default plain)."""
    from aiokafka.partitioner import DefaultPartitioner

    p = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks="all",
                         max_batch_size=1 << 20, max_request_size=16 << 20, enable_idempotence=False,
                         **(security.aiokafka_kwargs() if security is not None else {}))
    await p.start()
    try:
        parts = sorted(await p.partitions_for(topic))
        part = DefaultPartitioner()
        batches: dict[int, Any] = {}
        futs = []
        n = 0
        for key, value in records:
            pi = part(key, parts, parts) if key else parts[n % len(parts)]
            b = batches.get(pi)
            if b is None:
                b = batches[pi] = p.create_batch()
            if b.append(key=key, value=value, timestamp=None, headers=headers or []) is None:
                b.close()
                futs.append(await p.send_batch(b, topic, partition=pi))
                b = batches[pi] = p.create_batch()
                if b.append(key=key, value=value, timestamp=None, headers=headers or []) is None:
                    # one record larger than a batch: send it alone
                    futs.append(await p.send(topic, value, key=key, partition=pi, headers=headers))
            n += 1
            if progress is not None and n % 5000 == 0:
                progress(n)
        for pi, b in batches.items():
            if b.record_count():
                b.close()
                futs.append(await p.send_batch(b, topic, partition=pi))
        await asyncio.gather(*futs)
        if progress is not None:
            progress(n)
        return n
    finally:
        await p.stop()


async def emit_lines(bootstrap: str, topic: str, path: Path | None, stream: BinaryIO | None,
                     progress: bool = False, *, skip_invalid: bool = False,
                     report: Any = None, max_reported: int = 20,
                     security: KafkaSecurity | None = None) -> dict[str, Any]:
    """Send every non-blank line of a JSONL file/stream; never stops on a bad line.

    Each line is checked as the worker would (:func:`check_line`); an invalid line is
    counted in ``invalid``, the first ``max_reported`` are passed to ``report`` as
    ``(line_number, reason)`` and listed in ``bad_lines``, and the line is still sent
    (the worker dead-letters it with the reason: one place of record) unless
    ``skip_invalid``, where it is counted in ``skipped`` and not sent.
    """
    src: BinaryIO = stream if stream is not None else open(path, "rb")  # type: ignore[arg-type]  # noqa: SIM115
    stats: dict[str, Any] = {"sent": 0, "invalid": 0, "skipped": 0, "topic": topic, "bad_lines": []}
    t0 = time.monotonic()

    def lines() -> Iterable[tuple[bytes | None, bytes]]:
        for lineno, raw in enumerate(src, 1):
            line = raw.strip()
            if not line:
                continue
            k, why = check_line(line)
            if why is not None:
                stats["invalid"] += 1
                if len(stats["bad_lines"]) < max_reported:
                    stats["bad_lines"].append({"line": lineno, "reason": why[:300]})
                    if report is not None:
                        report(lineno, why)
                if skip_invalid:
                    stats["skipped"] += 1
                    continue
            yield (k or None), line

    def show(n: int) -> None:
        if progress:
            import sys

            sys.stderr.write(f"\rsent {n} events ({n / max(1e-9, time.monotonic() - t0):,.0f}/s)")
            sys.stderr.flush()

    try:
        stats["sent"] = await produce_records(bootstrap, topic, lines(), progress=show, security=security)
    finally:
        if stream is None:
            src.close()
        if progress:
            import sys

            sys.stderr.write("\n")
    stats["seconds"] = round(time.monotonic() - t0, 3)
    return stats
