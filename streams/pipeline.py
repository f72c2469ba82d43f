"""The per-batch data flow of the worker, top to bottom, as plain functions.

    Kafka records
      -> decode_batch        JSON LLMEvents (llm.events) and OTLP requests (otlp_spans)
                             -> valid events + rejected records (for llm.events.dlq)
      -> enrich              cost from the price table, built-in guardrail scan
      -> to_columns          llm_events rows, column-oriented, and the window stage's numbers
      -> WindowAggregator    (streams/windows.py)

Nothing here touches Kafka or ClickHouse; ``streams/worker.py`` moves the data.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import numpy as np

from driftline.schemas.event import EventError, LLMEvent, decode_event
from driftline.schemas.metrics import WindowKey
from driftline.streams.windows import EventBatchColumns

__all__ = [
    "Record", "Rejected", "SourcedEvent", "DecodedBatch", "decode_batch", "EnrichedBatch",
    "enrich", "EVENT_COLUMNS", "to_columns", "OTLP_TOPIC", "EVENTS_TOPIC", "DLQ_TOPIC",
]

EVENTS_TOPIC = "llm.events"
DLQ_TOPIC = "llm.events.dlq"
OTLP_TOPIC = "otlp_spans"


class Record(Protocol):
    """What the worker needs of a Kafka record (aiokafka's ConsumerRecord fits)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record that could not become an event: goes to the dead-letter topic as it came."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    reason: str
    field: str | None = None

    def dlq_headers(self) -> list[tuple[str, bytes]]:
        h = [
            ("driftline-reason", self.reason.encode()[:4000]),
            ("driftline-source-topic", self.topic.encode()),
            ("driftline-source-partition", str(self.partition).encode()),
            ("driftline-source-offset", str(self.offset).encode()),
        ]
        if self.field:
            h.append(("driftline-field", self.field.encode()))
        return h

    @property
    def reason_class(self) -> str:
        """A bounded label for metrics: the key at fault, or the kind of failure."""
        if self.field:
            return f"invalid:{self.field}"[:64]
        r = self.reason
        if r.startswith("not valid JSON"):
            return "not_json"
        if r.startswith("event must be a JSON object"):
            return "not_object"
        if r.startswith("otlp"):
            return "otlp"
        return "invalid"


@dataclass(frozen=True, slots=True)
class SourcedEvent:
    event: LLMEvent
    topic: str
    partition: int
    offset: int


@dataclass(slots=True)
class DecodedBatch:
    events: list[SourcedEvent] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    skipped_spans: int = 0


def _header(rec: Record, name: str) -> bytes | None:
    for k, v in rec.headers or ():
        if k == name:
            return v
    return None


def decode_batch(records: Sequence[Record]) -> DecodedBatch:
    """Decode every record. Never raises on input: bad records become :class:`Rejected`."""
    out = DecodedBatch()
    add_event = out.events.append
    add_rej = out.rejected.append
    for rec in records:
        value = rec.value
        if rec.topic == OTLP_TOPIC:
            _decode_otlp(rec, out)
            continue
        if value is None:
            add_rej(Rejected(rec.topic, rec.partition, rec.offset, rec.key, b"", "empty record (tombstone)"))
            continue
        try:
            ev = decode_event(value)
        except EventError as exc:
            add_rej(Rejected(rec.topic, rec.partition, rec.offset, rec.key, value, str(exc), exc.key))
            continue
        add_event(SourcedEvent(ev, rec.topic, rec.partition, rec.offset))
    return out


def _decode_otlp(rec: Record, out: DecodedBatch) -> None:
    """One OTLP ExportTraceServiceRequest -> one event per GenAI span."""
    value = rec.value or b""
    try:
        from driftline.schemas import otlp
    except ImportError:  # pragma: no cover - the OTLP decoder ships with the package
        out.rejected.append(Rejected(rec.topic, rec.partition, rec.offset, rec.key, value,
                                     "otlp: decoder unavailable"))
        return
    ctype = _header(rec, "content-type")
    encoding = ctype.decode(errors="replace") if ctype else None
    try:
        batch = otlp.decode_request(value, encoding)
    except otlp.OtlpDecodeError as exc:
        out.rejected.append(Rejected(rec.topic, rec.partition, rec.offset, rec.key, value,
                                     f"otlp: {exc}"))
        return
    for ev in batch.events:
        out.events.append(SourcedEvent(ev, rec.topic, rec.partition, rec.offset))
    for r in batch.rejected:
        out.rejected.append(Rejected(rec.topic, rec.partition, rec.offset, rec.key, value,
                                     f"otlp span {getattr(r, 'span_id', '')}: {r.reason}"))
    out.skipped_spans += batch.skipped_non_genai


class Pricer(Protocol):
    version: str

    def cost_many(self, events: Sequence[LLMEvent]) -> list[float | None]: ...


class Scanner(Protocol):
    def scan_event(self, ev: LLMEvent) -> list[Any]: ...


@dataclass(slots=True)
class EnrichedBatch:
    events: list[SourcedEvent]
    costs: list[float | None]
    price_version: str
    #: per event: extra guardrail results from the built-in scan, (name, verdict, score)
    scan_hits: list[list[tuple[str, str, float | None]]] | None = None


def enrich(events: list[SourcedEvent], pricer: Pricer, scanner: Scanner | None = None) -> EnrichedBatch:
    """Cost per event from the price table; the built-in guardrail scan when enabled."""
    evs = [s.event for s in events]
    costs = pricer.cost_many(evs)
    hits = None
    if scanner is not None:
        from driftline.detectors.guardrails import hits_to_guardrails

        hits = []
        for e in evs:
            found = scanner.scan_event(e)
            hits.append([(g.name, g.verdict, g.score) for g in hits_to_guardrails(found)] if found else [])
    return EnrichedBatch(events, costs, pricer.version, hits)


#: llm_events columns written by the worker, in insert order
EVENT_COLUMNS: tuple[str, ...] = (
    "event_id", "timestamp", "app", "environment", "provider", "operation", "request_model",
    "response_model", "model", "prompt_version", "conversation_id", "user_id", "trace_id",
    "span_id", "input_tokens", "output_tokens", "cache_read_input_tokens",
    "cache_creation_input_tokens", "reasoning_output_tokens", "latency_ms", "ttft_ms", "tpot_ms",
    "status", "error_type", "finish_reasons", "guardrail_names", "guardrail_verdicts",
    "guardrail_scores", "guardrail_hit", "feedback", "prompt", "response", "cost_usd",
    "price_version", "extra", "source_topic", "source_partition", "source_offset", "ingested_at",
)

_json = msgspec.json.Encoder()
_HIT = frozenset(("flagged", "blocked"))


def to_columns(batch: EnrichedBatch, now_ms: int | None = None) -> tuple[dict[str, list[Any]], EventBatchColumns]:
    """Column-oriented ``llm_events`` rows and the window stage's numbers for one batch.

    Timestamps are written as ``datetime``-free epoch values: DateTime64(3) takes
    milliseconds as integers, which spares a datetime object per event.
    """
    n = len(batch.events)
    now = int(time.time() * 1000) if now_ms is None else now_ms
    cols: dict[str, list[Any]] = {c: [] for c in EVENT_COLUMNS}
    c = cols
    ts = np.empty(n, np.int64)
    lat = np.empty(n, np.float64)
    ttft = np.full(n, np.nan)
    tpot = np.full(n, np.nan)
    err = np.zeros(n, bool)
    tok = np.zeros((5, n), np.int64)
    cost = np.full(n, np.nan)
    g_checked = np.zeros(n, bool)
    g_hit = np.zeros(n, bool)
    g_blocked = np.zeros(n, bool)
    fb = np.full(n, np.nan)
    keys: list[WindowKey] = []
    key_cache: dict[tuple[str, str, str], WindowKey] = {}
    scan = batch.scan_hits
    pv = batch.price_version
    for i, se in enumerate(batch.events):
        e = se.event
        t = e.timestamp_ms
        model = e.response_model or e.request_model or ""
        pver = e.prompt_version or ""
        kk = (e.app, model, pver)
        wk = key_cache.get(kk)
        if wk is None:
            wk = key_cache[kk] = WindowKey(*kk)
        keys.append(wk)
        names: list[str] = []
        verdicts: list[str] = []
        scores: list[float | None] = []
        if e.guardrails:
            for g in e.guardrails:
                names.append(g.name)
                verdicts.append(g.verdict)
                scores.append(g.score)
        if scan is not None and scan[i]:
            for name, verdict, score in scan[i]:
                names.append(name)
                verdicts.append(verdict)
                scores.append(score)
        hit = any(v in _HIT for v in verdicts)
        cst = batch.costs[i]
        c["event_id"].append(e.event_id)
        c["timestamp"].append(t)
        c["app"].append(e.app)
        c["environment"].append(e.environment or "")
        c["provider"].append(e.provider or "")
        c["operation"].append(e.operation)
        c["request_model"].append(e.request_model or "")
        c["response_model"].append(e.response_model or "")
        c["model"].append(model)
        c["prompt_version"].append(pver)
        c["conversation_id"].append(e.conversation_id or "")
        c["user_id"].append(e.user_id or "")
        c["trace_id"].append(e.trace_id or "")
        c["span_id"].append(e.span_id or "")
        c["input_tokens"].append(e.input_tokens)
        c["output_tokens"].append(e.output_tokens)
        c["cache_read_input_tokens"].append(e.cache_read_input_tokens)
        c["cache_creation_input_tokens"].append(e.cache_creation_input_tokens)
        c["reasoning_output_tokens"].append(e.reasoning_output_tokens)
        c["latency_ms"].append(e.latency_ms)
        c["ttft_ms"].append(e.ttft_ms)
        c["tpot_ms"].append(e.tpot_ms)
        c["status"].append(e.status)
        c["error_type"].append(e.error_type or "")
        c["finish_reasons"].append(e.finish_reasons or [])
        c["guardrail_names"].append(names)
        c["guardrail_verdicts"].append(verdicts)
        c["guardrail_scores"].append(scores)
        c["guardrail_hit"].append(1 if hit else 0)
        c["feedback"].append(e.feedback)
        c["prompt"].append(e.prompt)
        c["response"].append(e.response)
        c["cost_usd"].append(cst)
        c["price_version"].append(pv)
        c["extra"].append(_json.encode(e.extra).decode() if e.extra else "{}")
        c["source_topic"].append(se.topic)
        c["source_partition"].append(se.partition)
        c["source_offset"].append(se.offset)
        c["ingested_at"].append(now)
        ts[i] = t
        lat[i] = e.latency_ms
        if e.ttft_ms is not None:
            ttft[i] = e.ttft_ms
        if e.tpot_ms is not None:
            tpot[i] = e.tpot_ms
        err[i] = e.status == "error"
        tok[0, i] = e.input_tokens or 0
        tok[1, i] = e.output_tokens or 0
        tok[2, i] = e.cache_read_input_tokens or 0
        tok[3, i] = e.cache_creation_input_tokens or 0
        tok[4, i] = e.reasoning_output_tokens or 0
        if cst is not None:
            cost[i] = cst
        g_checked[i] = bool(verdicts)
        g_hit[i] = hit
        g_blocked[i] = "blocked" in verdicts
        if e.feedback is not None:
            fb[i] = e.feedback
    wcols = EventBatchColumns(
        keys=keys, ts_ms=ts, latency_ms=lat, ttft_ms=ttft, tpot_ms=tpot, is_error=err,
        input_tokens=tok[0], output_tokens=tok[1], cache_read_input_tokens=tok[2],
        cache_creation_input_tokens=tok[3], reasoning_output_tokens=tok[4], cost_usd=cost,
        guardrail_checked=g_checked, guardrail_hit=g_hit, guardrail_blocked=g_blocked, feedback=fb,
    )
    return cols, wcols
