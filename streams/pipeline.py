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
import pyarrow as pa
import pyarrow.compute as pc

from driftline.schemas.event import (
    EventError,
    Guardrail,
    LLMEvent,
    decode_event,
    parse_timestamp_ms,
)
from driftline.schemas.metrics import WindowKey
from driftline.streams.windows import EventBatchColumns

__all__ = [
    "Record", "Rejected", "DecodedBatch", "decode_batch", "EnrichedBatch",
    "enrich", "EVENT_COLUMNS", "EVENT_ARROW_SCHEMA", "to_columns", "to_arrow", "OTLP_TOPIC", "OTLP_TOPIC_PREFIX", "EVENTS_TOPIC",
    "DLQ_TOPIC",
]

EVENTS_TOPIC = "llm.events"
DLQ_TOPIC = "llm.events.dlq"
OTLP_TOPIC = "otlp_spans"
#: records of ``otlp_spans`` and of any ``otlp_spans.<suffix>`` topic (one per team or
#: tenant, say) are OTLP ExportTraceServiceRequests; every other topic carries JSON LLMEvents
OTLP_TOPIC_PREFIX = OTLP_TOPIC + "."


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


@dataclass(slots=True)
class DecodedBatch:
    """Valid events with where each came from (parallel lists), and the rejected records."""

    events: list[LLMEvent] = field(default_factory=list)
    topics: list[str] = field(default_factory=list)
    partitions: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    skipped_spans: int = 0

    def add(self, ev: LLMEvent, topic: str, partition: int, offset: int) -> None:
        self.events.append(ev)
        self.topics.append(topic)
        self.partitions.append(partition)
        self.offsets.append(offset)


def _header(rec: Record, name: str) -> bytes | None:
    for k, v in rec.headers or ():
        if k == name:
            return v
    return None


def decode_batch(records: Sequence[Record]) -> DecodedBatch:
    """Decode every record. Never raises on input: bad records become :class:`Rejected`."""
    out = DecodedBatch()
    events, topics, parts, offs = out.events, out.topics, out.partitions, out.offsets
    add_rej = out.rejected.append
    for rec in records:
        value = rec.value
        topic = rec.topic
        if topic == OTLP_TOPIC or topic.startswith(OTLP_TOPIC_PREFIX):
            _decode_otlp(rec, out)
            continue
        if value is None:
            add_rej(Rejected(topic, rec.partition, rec.offset, rec.key, b"", "empty record (tombstone)"))
            continue
        try:
            ev = decode_event(value)
        except EventError as exc:
            add_rej(Rejected(topic, rec.partition, rec.offset, rec.key, value, str(exc), exc.key))
            continue
        events.append(ev)
        topics.append(topic)
        parts.append(rec.partition)
        offs.append(rec.offset)
    return out


def _decode_otlp(rec: Record, out: DecodedBatch) -> None:
    """One OTLP ExportTraceServiceRequest -> one event per GenAI span.

    The encoding comes from the ``content-type`` header (``otlp_proto``/``otlp_json``,
    written by ``driftline otlp``) and is sniffed when there is none (the Collector's
    Kafka exporter sets no header). An undecodable record is dead-lettered whole; when
    some GenAI spans of a good request are invalid, the valid ones become events and
    the record is dead-lettered once, its original bytes with every span's reason.
    """
    value = rec.value or b""
    try:
        from driftline.schemas import otlp
    except ImportError:  # pragma: no cover - the OTLP decoder ships with the package
        out.rejected.append(Rejected(rec.topic, rec.partition, rec.offset, rec.key, value,
                                     "otlp: decoder unavailable"))
        return
    encoding = otlp.encoding_from_header(_header(rec, "content-type"))
    try:
        batch = otlp.decode_request(value, encoding)
    except otlp.OtlpDecodeError as exc:
        out.rejected.append(Rejected(rec.topic, rec.partition, rec.offset, rec.key, value,
                                     f"otlp: {exc}"))
        return
    for ev in batch.events:
        out.add(ev, rec.topic, rec.partition, rec.offset)
    if batch.rejected:
        n = len(batch.rejected)
        why = "; ".join(f"span {r.span_id} ({r.span_name}): {r.reason}" for r in batch.rejected)
        out.rejected.append(Rejected(
            rec.topic, rec.partition, rec.offset, rec.key, value,
            f"otlp: {n} of {n + len(batch.events)} GenAI spans rejected "
            f"({len(batch.events)} stored): {why}"))
    out.skipped_spans += batch.skipped_non_genai + batch.skipped_non_model


class Pricer(Protocol):
    version: str

    def cost_columns(self, models: Sequence[str], ts_ms: np.ndarray, tokens: np.ndarray,
                     has_tokens: np.ndarray, codes: np.ndarray | None = None) -> np.ndarray: ...


class Scanner(Protocol):
    def scan_event(self, ev: LLMEvent) -> list[Any]: ...


@dataclass(slots=True)
class EnrichedBatch:
    batch: DecodedBatch
    pricer: Pricer
    #: per event: extra guardrail results from the built-in scan, (name, verdict, score)
    scan_hits: list[list[tuple[str, str, float | None]]] | None = None

    @property
    def events(self) -> list[LLMEvent]:
        return self.batch.events


def enrich(batch: DecodedBatch, pricer: Pricer, scanner: Scanner | None = None) -> EnrichedBatch:
    """The built-in guardrail scan when enabled; the cost is computed column-wise in
    :func:`to_columns` with ``pricer.cost_columns``."""
    hits = None
    if scanner is not None:
        from driftline.detectors.guardrails import hits_to_guardrails

        hits = []
        for e in batch.events:
            found = scanner.scan_event(e)
            hits.append([(g.name, g.verdict, g.score) for g in hits_to_guardrails(found)] if found else [])
    return EnrichedBatch(batch, pricer, hits)


#: llm_events columns written by the worker, in insert order, with their Arrow types.
#: Nulls in a non-Nullable ClickHouse column are stored as the column's default
#: ('' / []), which ClickHouse does on input (``input_format_null_as_default``).
EVENT_ARROW_SCHEMA = pa.schema([
    ("event_id", pa.string()), ("timestamp", pa.timestamp("ms", tz="UTC")), ("app", pa.string()),
    ("environment", pa.string()), ("provider", pa.string()), ("operation", pa.string()),
    ("request_model", pa.string()), ("response_model", pa.string()), ("model", pa.string()),
    ("prompt_version", pa.string()), ("conversation_id", pa.string()), ("user_id", pa.string()),
    ("trace_id", pa.string()), ("span_id", pa.string()), ("input_tokens", pa.uint64()),
    ("output_tokens", pa.uint64()), ("cache_read_input_tokens", pa.uint64()),
    ("cache_creation_input_tokens", pa.uint64()), ("reasoning_output_tokens", pa.uint64()),
    ("latency_ms", pa.float64()), ("ttft_ms", pa.float64()), ("tpot_ms", pa.float64()),
    ("status", pa.string()), ("error_type", pa.string()), ("finish_reasons", pa.list_(pa.string())),
    ("guardrail_names", pa.list_(pa.string())), ("guardrail_verdicts", pa.list_(pa.string())),
    ("guardrail_scores", pa.list_(pa.float64())), ("guardrail_hit", pa.uint8()),
    ("feedback", pa.int8()), ("prompt", pa.string()), ("response", pa.string()),
    ("cost_usd", pa.float64()), ("price_version", pa.string()), ("extra", pa.string()),
    ("source_topic", pa.string()), ("source_partition", pa.uint32()), ("source_offset", pa.uint64()),
    ("ingested_at", pa.timestamp("ms", tz="UTC")),
])
EVENT_COLUMNS: tuple[str, ...] = tuple(EVENT_ARROW_SCHEMA.names)

_json = msgspec.json.Encoder()
_HIT = frozenset(("flagged", "blocked"))
_FIELDS: tuple[str, ...] = LLMEvent.__struct_fields__
_VERDICTS = pa.array(["pass", "flagged", "blocked"])
_TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_read_input_tokens",
                 "cache_creation_input_tokens", "reasoning_output_tokens")
_astuple = msgspec.structs.astuple


def to_columns(batch: EnrichedBatch, now_ms: int | None = None) -> tuple[dict[str, Sequence[Any]], EventBatchColumns]:
    """Column-oriented ``llm_events`` rows and the window stage's numbers for one batch.

    The events are transposed in C (``zip(*astuple(e) …)``) rather than appended
    value by value; optional strings stay ``None`` (stored as ``''``), timestamps
    are epoch milliseconds.
    """
    evs = batch.events
    n = len(evs)
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if n == 0:
        empty: dict[str, Sequence[Any]] = {c: [] for c in EVENT_COLUMNS}
        return empty, EventBatchColumns([], *(np.empty(0) for _ in range(15)))
    col = dict(zip(_FIELDS, zip(*map(_astuple, evs), strict=False), strict=True))
    raw_ts = col["timestamp"]
    ts_list = [t if type(t) is int else parse_timestamp_ms(t) for t in raw_ts]
    req, resp = col["request_model"], col["response_model"]
    model = [r or q or "" for r, q in zip(resp, req, strict=True)]
    pver = [p or "" for p in col["prompt_version"]]
    apps = col["app"]
    key_code: dict[tuple[str, str, str], int] = {}
    setdefault = key_code.setdefault
    codes = np.fromiter((setdefault(kk, len(key_code)) for kk in zip(apps, model, pver, strict=True)),
                        np.int64, n)
    key_list = [WindowKey(*kk) for kk in key_code]
    keys = [key_list[c] for c in codes.tolist()]
    # guardrails: reported ones, then the built-in scan's; flattened so that Arrow
    # builds the list columns from one flat array and offsets
    scan = batch.scan_hits
    per_event = col["guardrails"]
    if scan is not None:
        per_event = tuple([*(gs or ()), *(Guardrail(nm, vd, sc) for nm, vd, sc in hits)]
                          for gs, hits in zip(per_event, scan, strict=True))
    flat: list[Any] = [g for gs in per_event if gs for g in gs]
    lens = np.array([len(gs) if gs else 0 for gs in per_event], np.int64)
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(lens, out=offsets[1:])
    pa_off = pa.array(offsets, pa.int32())
    verdicts = pa.array([g.verdict for g in flat], pa.string())
    g_names = pa.ListArray.from_arrays(pa_off, pa.array([g.name for g in flat], pa.string()))
    g_verdicts = pa.ListArray.from_arrays(pa_off, verdicts)
    g_scores = pa.ListArray.from_arrays(pa_off, pa.array([g.score for g in flat], pa.float64()))
    g_checked = lens > 0
    g_hit = np.zeros(n, bool)
    g_blocked = np.zeros(n, bool)
    if len(flat):
        vcode = pc.index_in(verdicts, _VERDICTS).to_numpy(zero_copy_only=False)  # pass 0, flagged 1, blocked 2
        worst = np.maximum.reduceat(vcode, offsets[:-1][g_checked])
        g_hit[g_checked] = worst >= 1
        g_blocked[g_checked] = worst == 2
    ts_arr = np.asarray(ts_list, np.int64)
    tok_f = np.array([col[f] for f in _TOKEN_FIELDS], np.float64)  # None -> NaN
    has_tok = ~np.isnan(tok_f).all(axis=0)
    tok = np.nan_to_num(tok_f, nan=0.0).astype(np.int64)
    model_names: dict[str, int] = {}
    key_model = np.array([model_names.setdefault(k.model, len(model_names)) for k in key_list], np.int64)
    costs = batch.pricer.cost_columns(list(model_names), ts_arr, tok, has_tok, codes=key_model[codes])
    extra = ["{}" if not x else _json.encode(x).decode() for x in col["extra"]]
    b = batch.batch
    cols: dict[str, Sequence[Any]] = {
        "event_id": col["event_id"], "timestamp": ts_list, "app": apps,
        "environment": col["environment"], "provider": col["provider"], "operation": col["operation"],
        "request_model": req, "response_model": resp, "model": model, "prompt_version": pver,
        "conversation_id": col["conversation_id"], "user_id": col["user_id"],
        "trace_id": col["trace_id"], "span_id": col["span_id"],
        "input_tokens": col["input_tokens"], "output_tokens": col["output_tokens"],
        "cache_read_input_tokens": col["cache_read_input_tokens"],
        "cache_creation_input_tokens": col["cache_creation_input_tokens"],
        "reasoning_output_tokens": col["reasoning_output_tokens"],
        "latency_ms": col["latency_ms"], "ttft_ms": col["ttft_ms"], "tpot_ms": col["tpot_ms"],
        "status": col["status"], "error_type": col["error_type"],
        "finish_reasons": col["finish_reasons"], "guardrail_names": g_names,
        "guardrail_verdicts": g_verdicts, "guardrail_scores": g_scores,
        "guardrail_hit": g_hit.view(np.uint8), "feedback": col["feedback"],
        "prompt": col["prompt"], "response": col["response"], "cost_usd": costs,
        "price_version": [batch.pricer.version] * n, "extra": extra,
        "source_topic": b.topics, "source_partition": b.partitions, "source_offset": b.offsets,
        "ingested_at": [now] * n,
    }
    status = col["status"]
    wcols = EventBatchColumns(
        keys=keys, ts_ms=ts_arr,
        latency_ms=np.asarray(col["latency_ms"], np.float64),
        ttft_ms=np.asarray(col["ttft_ms"], np.float64),  # None -> NaN
        tpot_ms=np.asarray(col["tpot_ms"], np.float64),
        is_error=np.array([s == "error" for s in status], bool),
        input_tokens=tok[0], output_tokens=tok[1], cache_read_input_tokens=tok[2],
        cache_creation_input_tokens=tok[3], reasoning_output_tokens=tok[4], cost_usd=costs,
        guardrail_checked=g_checked, guardrail_hit=g_hit, guardrail_blocked=g_blocked,
        feedback=np.asarray(col["feedback"], np.float64), key_codes=codes, key_list=key_list,
    )
    return cols, wcols


def to_arrow(cols: dict[str, Sequence[Any]]) -> pa.Table:
    """The ``llm_events`` columns as an Arrow table with :data:`EVENT_ARROW_SCHEMA`."""
    arrays = []
    for f in EVENT_ARROW_SCHEMA:
        v = cols[f.name]
        if isinstance(v, pa.Array):
            arrays.append(v)
        elif isinstance(v, np.ndarray):  # NaN = NULL (cost_usd of unpriced events)
            arrays.append(pa.array(v, f.type, from_pandas=True))
        else:
            arrays.append(pa.array(v, f.type))
    return pa.Table.from_arrays(arrays, schema=EVENT_ARROW_SCHEMA)
