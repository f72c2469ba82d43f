"""The per-batch data flow of the worker, top to bottom, as plain functions.

    Kafka records
      -> decode_batch        JSON LLMEvents (llm.events) and OTLP requests (otlp_spans)
                             -> valid events + rejected records (for llm.events.dlq)
      -> enrich              the built-in guardrail scan (when enabled)
      -> to_columns          llm_events rows as one Arrow table (cost from the price
                             table, column-wise) and the window stage's numbers
      -> WindowAggregator    (streams/stages/windows.py)

JSON events take one of two paths, with the same result (tests/unit/test_pipeline.py
checks row for row and reason for reason). The columnar path hands the whole
batch to Arrow's JSON reader (C++, without the GIL) against the known keys and
checks the values column-wise; it takes the clean records, which are nearly
all of them. The rest (unknown keys kept in ``extra``, an ``event_id`` to
derive, every error) is decoded one record at a time by msgspec
(``decode_event``), which has the exact rules and error messages. The columnar
path leaves no per-event Python objects for the garbage collector to walk or free
(its cost per event: benchmarks/RESULTS.md).

Nothing here touches Kafka or ClickHouse; ``streams/worker.py`` moves the data.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from driftline.schemas.columns import EVENT_COLUMNS, EVENT_FIELDS
from driftline.schemas.event import (
    MAX_ID_CHARS,
    MAX_LABEL_CHARS,
    MAX_TOKENS,
    MODEL_OPTIONAL_OPERATIONS,
    NESTED_TOO_DEEP,
    EventError,
    Guardrail,
    LLMEvent,
    decode_event,
    parse_timestamp_ms,
    timestamp_text,
)
from driftline.schemas.topics import DLQ_TOPIC, EVENTS_TOPIC, OTLP_TOPIC, OTLP_TOPIC_PREFIX
from driftline.schemas.window_stats import WindowKey
from driftline.streams.stages.windows import EventBatchColumns, source_index

__all__ = [
    "Record", "MemoryRecord", "Rejected", "DecodedBatch", "decode_batch", "EnrichedBatch",
    "enrich", "EVENT_COLUMNS", "EVENT_ARROW_SCHEMA", "DECODED_SCHEMA", "ArrowColumns", "to_columns",
    "to_arrow", "OTLP_TOPIC", "OTLP_TOPIC_PREFIX", "EVENTS_TOPIC",
    "DLQ_TOPIC", "DEFAULT_MAX_EVENT_AGE_S", "DEFAULT_MAX_CLOCK_SKEW_S", "time_bound_reason",
]


#: Event-time bounds around the wall clock (``decode_batch(now_ms=...)``; the worker's
#: ``--max-event-age`` / ``--max-clock-skew``). 30 days accepts backfills and replays of
#: the last month, yet one batch can span at most 2-3 monthly partitions of the tables
#: (ClickHouse refuses an insert touching more than 100: max_partitions_per_insert_block),
#: and an event from 1970 or 9999 can neither do that nor move the windows' event time.
DEFAULT_MAX_EVENT_AGE_S = 30 * 86400.0
#: 5 minutes: more than the skew of NTP-synced clocks, far less than a window of alerts
DEFAULT_MAX_CLOCK_SKEW_S = 300.0


def _secs(s: float) -> str:
    return f"{s:.0f}" if s == int(s) else f"{s:g}"


def time_bound_reason(ts_ms: int, now_ms: int, max_event_age_s: float,
                      max_clock_skew_s: float) -> str | None:
    """Why event time ``ts_ms`` is outside ``[now - max_event_age, now + max_clock_skew]``,
    or None when it is inside."""
    if ts_ms > now_ms + round(max_clock_skew_s * 1000):
        return (f"timestamp: {timestamp_text(ts_ms)} is more than {_secs(max_clock_skew_s)} s "
                f"in the future (max_clock_skew_s)")
    if ts_ms < now_ms - round(max_event_age_s * 1000):
        return (f"timestamp: {timestamp_text(ts_ms)} is more than {_secs(max_event_age_s)} s "
                f"in the past (max_event_age_s)")
    return None


class Record(Protocol):
    """What the worker needs of a Kafka record (aiokafka's ConsumerRecord fits)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class MemoryRecord:
    """A :class:`Record` held in memory: for tests, fuzzing and benchmarks of the decode
    stages without a broker (as OpenTelemetry ships in-memory exporters)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


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
        if r.startswith("undecodable record batch"):
            return "undecodable_batch"
        return "invalid"


@dataclass(slots=True)
class DecodedBatch:
    """Valid events and the rejected records of one batch.

    Valid events are in two parts: ``events`` (decoded one by one, with where each
    came from in the parallel lists) and ``table``, the records the columnar fast
    path decoded, as an Arrow table with :data:`DECODED_SCHEMA` (source columns
    included). Either part may be empty; together they are every valid event.
    """

    events: list[LLMEvent] = field(default_factory=list)
    topics: list[str] = field(default_factory=list)
    partitions: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    skipped_spans: int = 0
    table: pa.Table | None = None

    @property
    def n_events(self) -> int:
        return len(self.events) + (self.table.num_rows if self.table is not None else 0)

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


def decode_batch(records: Sequence[Record], *, fast: bool = True, now_ms: int | None = None,
                 max_event_age_s: float = DEFAULT_MAX_EVENT_AGE_S,
                 max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S) -> DecodedBatch:
    """Decode every record. Never raises on input: bad records become :class:`Rejected`.

    Every record ends in exactly one place: an event (in ``events`` or ``table``) or one
    :class:`Rejected` with a non-empty reason (an OTLP request: its events, plus one
    Rejected when any of its spans was refused). Any exception while decoding one
    record (or one OTLP request) rejects that record alone, with the exception named.

    With ``fast`` (the default), JSON events are parsed column-wise by Arrow's JSON
    reader (:func:`_decode_columnar`); whatever it does not take is decoded one
    record at a time by :func:`~driftline.schemas.event.decode_event`, so the result
    (events, rows, errors) is the same either way.

    With ``now_ms`` (the worker passes the wall clock; nothing here reads a clock),
    events dated more than ``max_event_age_s`` before it or ``max_clock_skew_s`` after
    it are rejected (:func:`time_bound_reason`); without it, only the absolute range
    (1970 to 9999) is checked.
    """
    out = DecodedBatch()
    events, topics, parts, offs = out.events, out.topics, out.partitions, out.offsets
    add_rej = out.rejected.append
    bounds = None if now_ms is None else (now_ms, max_event_age_s, max_clock_skew_s)
    todo: list[Record] = []
    for rec in records:
        topic = rec.topic
        if topic == OTLP_TOPIC or topic.startswith(OTLP_TOPIC_PREFIX):
            _decode_otlp(rec, out, bounds)
        else:
            todo.append(rec)
    if fast and len(todo) >= _FAST_MIN:
        if bounds is None:
            lo, hi = 0, _MAX_TS_MS
        else:
            lo = max(0, now_ms - round(max_event_age_s * 1000))  # type: ignore[operator]
            hi = min(_MAX_TS_MS, now_ms + round(max_clock_skew_s * 1000))  # type: ignore[operator]
        try:
            out.table, todo = _decode_columnar(todo, lo, hi)
        except Exception:  # noqa: BLE001 - never expected; the exact path takes them all
            out.table = None
    for rec in todo:
        value = rec.value
        if value is None:
            add_rej(Rejected(rec.topic, rec.partition, rec.offset, rec.key, b"", "empty record (tombstone)"))
            continue
        key: str | None = None
        try:
            ev = decode_event(value)
            why = None if bounds is None else time_bound_reason(ev.timestamp_ms, *bounds)
            if why is not None:
                key = "timestamp"
        except EventError as exc:
            why, key = str(exc), exc.key
        except RecursionError:
            why = NESTED_TOO_DEEP
        except Exception as exc:  # noqa: BLE001 - one record never stops the batch
            why = f"internal error while decoding: {type(exc).__name__}: {exc}"
        if why is not None:
            add_rej(Rejected(rec.topic, rec.partition, rec.offset, rec.key, value, why or "rejected", key))
            continue
        events.append(ev)
        topics.append(rec.topic)
        parts.append(rec.partition)
        offs.append(rec.offset)
    return out


# -- the event's schemas and checks, from schemas/columns.py EVENT_FIELDS ----------------
_ARROW_NAMES: dict[str, pa.DataType] = {
    "string": pa.string(), "int8": pa.int8(), "int64": pa.int64(), "uint8": pa.uint8(),
    "uint32": pa.uint32(), "uint64": pa.uint64(), "float64": pa.float64(),
    "timestamp[ms, tz=UTC]": pa.timestamp("ms", tz="UTC"),
}


def arrow_type(spec: str) -> pa.DataType:
    """The pyarrow type of an Arrow type as :class:`~driftline.schemas.columns.EventField`
    writes it (``uint64``, ``list<string>``, ``struct<name: string, score: float64>``)."""
    if spec.startswith("list<") and spec.endswith(">"):
        return pa.list_(arrow_type(spec[5:-1]))
    if spec.startswith("struct<") and spec.endswith(">"):
        return pa.struct([(n, arrow_type(t)) for n, t in (f.split(": ", 1) for f in spec[7:-1].split(", "))])
    return _ARROW_NAMES[spec]


_WIRE = [f for f in EVENT_FIELDS if f.source == "wire"]
#: the wire keys with their types as decoded (``timestamp`` in epoch ms)
_WIRE_FIELDS: list[tuple[str, pa.DataType]] = [(f.name, arrow_type(f.decoded)) for f in _WIRE]
_GUARDRAIL_TYPE = dict(_WIRE_FIELDS)["guardrails"].value_type
#: Valid events as columns, before enrichment: the wire keys with their types
#: (``timestamp`` in epoch ms, defaults filled, ``extra`` as JSON text) and where
#: each record came from.
DECODED_SCHEMA = pa.schema([(f.name, arrow_type(f.decoded)) for f in EVENT_FIELDS if f.decoded])
#: llm_events columns written by the worker, in insert order, with their Arrow types.
#: Nulls in a non-Nullable ClickHouse column are stored as the column's default
#: ('' / []), which ClickHouse does on input (``input_format_null_as_default``).
EVENT_ARROW_SCHEMA = pa.schema([(f.name, arrow_type(f.arrow)) for f in EVENT_FIELDS if f.ch])
#: the value checks of the columnar decode (``_valid_rows``): the bounds of LLMEvent's annotations
_LABEL_COLS = tuple(f.name for f in _WIRE if f.check == "label" and f.decoded == "string")
_LABEL_LISTS = tuple(f.name for f in _WIRE if f.check == "label" and f.decoded.startswith("list<"))
_ID_COLS = tuple(f.name for f in _WIRE if f.check == "ident")
_TOKEN_FIELDS = tuple(f.name for f in _WIRE if f.check == "count")
_DURATIONS = tuple((f.name, f.required) for f in _WIRE if f.check == "duration")
_LITERALS = tuple((f.name, pa.array(f.values, arrow_type(f.decoded))) for f in _WIRE
                  if f.values and f.name != "guardrails")
#: operations that need no model (agent and tool spans): schemas/event.py
_MODEL_OPTIONAL = pa.array(sorted(MODEL_OPTIONAL_OPERATIONS), pa.string())
_VERDICTS = pa.array(next(f.values for f in _WIRE if f.name == "guardrails"), pa.string())
_DEFAULTS = tuple((f.name, f.default) for f in _WIRE if f.default is not None)

# -- the columnar fast path ------------------------------------------------------------
#: what Arrow's JSON reader is told to expect: every known key and nothing else
#: (an unknown key fails the parse), the timestamp as epoch ms or as text
_JSON_SCHEMAS = (pa.schema(_WIRE_FIELDS),
                 pa.schema([(n, pa.string() if n == "timestamp" else t) for n, t in _WIRE_FIELDS]))
#: below this many records a batch is decoded record by record
_FAST_MIN = 64
_CHUNK_MIN = 256  # a failed parse is bisected down to chunks of this many records
#: a record with more '[' and '{' bytes than this is not given to Arrow's JSON reader:
#: defence in depth. Without a schema the reader crashed the process (SIGSEGV) on an
#: object nested 3*10^4 deep here; with our explicit schema it stopped with an error on
#: every 10^6-deep case tried, but the guard (two memchr-speed counts) keeps such input
#: away from C++ whatever the schema. A real event with 1,000 brackets is rare.
_ARROW_MAX_BRACKETS = 1000
_MAX_TS_MS = 253402300799999
#: One thread, blocks of 4 MiB: Arrow's threaded JSON reader spends more CPU per event
#: on the same batches (benchmarks/RESULTS.md), and the worker is CPU-bound; the decode
#: already runs on its own thread, off the GIL.
_READ_OPTIONS = pj.ReadOptions(use_threads=False, block_size=4 << 20)
_schema_first = [0]  # which of _JSON_SCHEMAS parsed last: tried first next time


def _decode_columnar(records: list[Record], ts_lo: int = 0,
                     ts_hi: int = 253402300799999) -> tuple[pa.Table | None, list[Record]]:
    """Parse the JSON events of ``records`` with Arrow's JSON reader (C++, off the GIL).

    Returns the rows it took (:data:`DECODED_SCHEMA`) and the records left for the
    record-by-record path. A record is taken only when the reader parsed it as
    one object of known keys with the right JSON types, and the checks that
    :class:`~driftline.schemas.event.LLMEvent` makes on values (required keys,
    non-negative numbers, literals, timestamp range, guardrail verdicts) pass
    here, vectorised; everything else (unknown keys kept in ``extra``, a derived
    ``event_id``, any error) is left to ``decode_event``, which has the exact
    rules and error messages. A parse that fails is bisected, so one bad record
    costs its neighbours little. Records holding a line break (Arrow reads one
    object per line), not starting with ``{``, or holding more than
    :data:`_ARROW_MAX_BRACKETS` ``[``/``{`` bytes (the count bounds the nesting depth;
    schemaless, Arrow's reader crashed on JSON nested 3*10^4 deep) are left whole. Only events
    dated in ``[ts_lo, ts_hi]`` are taken.
    """
    take: list[Record] = []
    rest: list[Record] = []
    for rec in records:
        v = rec.value
        if (v and v[:1] == b"{" and b"\n" not in v and b"\r" not in v
                and v.count(b"[") + v.count(b"{") <= _ARROW_MAX_BRACKETS):
            take.append(rec)
        else:
            rest.append(rec)
    parts: list[pa.Table] = []
    stack = [take] if take else []
    while stack:
        chunk = stack.pop()
        t = _parse_chunk(chunk)
        if t is None:
            if len(chunk) <= _CHUNK_MIN:
                rest.extend(chunk)
            else:
                h = len(chunk) // 2
                stack += [chunk[h:], chunk[:h]]
            continue
        ok = _valid_rows(t, ts_lo, ts_hi)
        if not ok.all():
            rest.extend(r for r, good in zip(chunk, ok.tolist(), strict=True) if not good)
            keep = np.flatnonzero(ok)
            t = t.take(keep)
            chunk = [chunk[i] for i in keep.tolist()]
        if t.num_rows:
            parts.append(_with_source(t, chunk))
    if not parts:
        return None, rest
    table = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
    return table, rest


def _parse_chunk(chunk: list[Record]) -> pa.Table | None:
    """The chunk's records as wire columns (timestamp in epoch ms), or None when
    Arrow could not parse them all, one row per record, with one schema."""
    data = b"\n".join([r.value for r in chunk])  # type: ignore[misc]
    first = _schema_first[0]
    for i in (first, 1 - first):
        try:
            t = pj.read_json(pa.BufferReader(data), read_options=_READ_OPTIONS, parse_options=pj.ParseOptions(
                explicit_schema=_JSON_SCHEMAS[i], unexpected_field_behavior="error"))
            t.validate(full=True)  # the reader does not check UTF-8; msgspec does
        except Exception:  # noqa: BLE001 - any parse problem: the exact path decides
            continue
        if t.num_rows != len(chunk):  # two objects in one record
            return None
        _schema_first[0] = i
        if i == 1:
            t = _text_timestamps(t)
        return t.select(_JSON_SCHEMAS[0].names)
    return None


def _text_timestamps(t: pa.Table) -> pa.Table:
    """RFC 3339 timestamps -> epoch ms with the scalar parser (null where it fails:
    such a row is then left to the exact path, which raises the same error)."""
    out: list[int | None] = []
    for v in t.column("timestamp").to_pylist():
        try:
            out.append(None if v is None else parse_timestamp_ms(v))
        except EventError:
            out.append(None)
    return t.set_column(t.schema.get_field_index("timestamp"), "timestamp", pa.array(out, pa.int64()))


def _np(col: Any, dtype: Any, fill: Any = None) -> np.ndarray:
    if fill is not None:
        col = pc.fill_null(col, fill)
    return np.asarray(col.to_numpy(zero_copy_only=False) if isinstance(col, pa.Array)
                      else col.to_numpy(), dtype)


def _np_bool(a: Any) -> np.ndarray:
    """A boolean Arrow array as numpy, null = False."""
    return _np(a, bool, False)


def _valid_rows(t: pa.Table, ts_lo: int = 0, ts_hi: int = 253402300799999) -> np.ndarray:
    """Per row: would ``decode_event`` take it as it stands (the typed path), with its
    timestamp in ``[ts_lo, ts_hi]``?"""
    c = t.column
    ok = _np_bool(pc.and_(pc.is_valid(c("event_id")), pc.not_equal(c("app"), "")))
    ok &= _np_bool(pc.or_(pc.or_(pc.is_valid(c("request_model")), pc.is_valid(c("response_model"))),
                          pc.is_in(c("operation"), _MODEL_OPTIONAL)))
    ts = c("timestamp")
    ok &= _np_bool(pc.and_(pc.greater_equal(ts, ts_lo), pc.less_equal(ts, ts_hi)))
    for name in _TOKEN_FIELDS:
        col = c(name)
        if col.null_count < len(col):
            ok &= ~_np_bool(pc.or_(pc.less(col, 0), pc.greater(col, MAX_TOKENS)))
    for name, required in _DURATIONS:  # finite, >= 0
        col = c(name)
        if required:
            ok &= _np_bool(pc.and_(pc.greater_equal(col, 0.0), pc.is_finite(col)))
        elif col.null_count < len(col):
            ok &= ~_np_bool(pc.or_(pc.less(col, 0.0), pc.invert(pc.is_finite(col))))
    for names, most in ((_LABEL_COLS, MAX_LABEL_CHARS), (_ID_COLS, MAX_ID_CHARS)):
        for name in names:
            col = c(name)
            if col.null_count < len(col):
                ok &= ~_np_bool(pc.greater(pc.utf8_length(col), most))
    for name, allowed in _LITERALS:
        col = c(name)
        if col.null_count < len(col):
            ok &= ~_np_bool(pc.and_(pc.is_valid(col), pc.invert(pc.is_in(col, allowed))))
    _valid_list_items(t, ok)
    return ok


def _valid_list_items(t: pa.Table, ok: np.ndarray) -> None:
    """Clear ``ok`` for the rows with an invalid list item: a null or too long label of a
    label list (``finish_reasons``), a guardrail without a name, with a name too long,
    a verdict not known or a score not finite."""
    for name in _LABEL_LISTS:
        fr = t.column(name).combine_chunks()
        flat = fr.flatten()
        if len(flat):
            bad_fr = pc.or_(flat.is_null(),
                            pc.fill_null(pc.greater(pc.utf8_length(flat), MAX_LABEL_CHARS), False))
            if pc.any(bad_fr).as_py():
                ok[pc.filter(pc.list_parent_indices(fr), bad_fr).to_numpy()] = False
    gr = t.column("guardrails").combine_chunks()
    gflat = gr.flatten()
    if len(gflat):
        score = gflat.field("score")
        bad = pc.or_(pc.or_(gflat.is_null(), pc.is_null(gflat.field("name"))),
                     pc.invert(pc.fill_null(pc.is_in(gflat.field("verdict"), _VERDICTS), False)))
        bad = pc.or_(bad, pc.fill_null(pc.greater(pc.utf8_length(gflat.field("name")), MAX_LABEL_CHARS),
                                       False))
        bad = pc.or_(bad, pc.fill_null(pc.invert(pc.is_finite(score)), False))
        if pc.any(bad).as_py():
            ok[pc.filter(pc.list_parent_indices(gr), bad).to_numpy()] = False


def _with_source(t: pa.Table, chunk: list[Record]) -> pa.Table:
    """Wire columns + defaults + ``extra`` + source columns: a :data:`DECODED_SCHEMA` table."""
    n = t.num_rows
    for name, default in _DEFAULTS:
        t = t.set_column(t.schema.get_field_index(name), name, pc.fill_null(t.column(name), default))
    return t.append_column("extra", pa.array(["{}"] * n, pa.string())) \
            .append_column("source_topic", pa.array([r.topic for r in chunk], pa.string())) \
            .append_column("source_partition", pa.array([r.partition for r in chunk], pa.int64())) \
            .append_column("source_offset", pa.array([r.offset for r in chunk], pa.int64()))


def _decode_otlp(rec: Record, out: DecodedBatch,
                 bounds: tuple[int, float, float] | None = None) -> None:
    """One OTLP ExportTraceServiceRequest -> one event per GenAI span.

    The encoding comes from the ``content-type`` header (``otlp_proto``/``otlp_json``,
    written by ``driftline otlp``) and is sniffed when there is none (the Collector's
    Kafka exporter sets no header). An undecodable record is dead-lettered whole; when
    some GenAI spans of a good request are invalid (or dated outside ``bounds``:
    ``(now_ms, max_event_age_s, max_clock_skew_s)``), the valid ones become events and
    the record is dead-lettered once, its original bytes with every span's reason. Any
    exception while decoding the request dead-letters it whole, never the batch.
    """
    if rec.value is None:
        out.rejected.append(Rejected(rec.topic, rec.partition, rec.offset, rec.key, b"",
                                     "empty record (tombstone)"))
        return
    value = rec.value
    try:
        from driftline.schemas import otlp
    except ImportError:  # pragma: no cover - the OTLP decoder ships with the package
        out.rejected.append(Rejected(rec.topic, rec.partition, rec.offset, rec.key, value,
                                     "otlp: decoder unavailable"))
        return
    try:
        encoding = otlp.encoding_from_header(_header(rec, "content-type"))
        batch = otlp.decode_request(value, encoding)
        events = batch.events
        why = [f"span {r.span_id} ({r.span_name}): {r.reason}" for r in batch.rejected]
        if bounds is not None:
            keep = []
            for ev in events:
                tb = time_bound_reason(ev.timestamp_ms, *bounds)
                if tb is None:
                    keep.append(ev)
                else:
                    why.append(f"span {ev.span_id} ({ev.extra.get('otel.span.name', '')}): {tb}")
            events = keep
    except otlp.OtlpDecodeError as exc:
        reason = f"otlp: {exc}"
    except RecursionError:
        reason = f"otlp: {NESTED_TOO_DEEP}"
    except Exception as exc:  # noqa: BLE001 - one request never stops the batch
        reason = f"otlp: internal error while decoding: {type(exc).__name__}: {exc}"
    else:
        reason = ""
    if reason:
        out.rejected.append(Rejected(rec.topic, rec.partition, rec.offset, rec.key, value, reason))
        return
    for ev in events:
        out.add(ev, rec.topic, rec.partition, rec.offset)
    if why:
        n = len(why)
        out.rejected.append(Rejected(
            rec.topic, rec.partition, rec.offset, rec.key, value,
            f"otlp: {n} of {n + len(events)} GenAI spans rejected "
            f"({len(events)} stored): {'; '.join(why)}"))
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


_json = msgspec.json.Encoder()
_FIELDS: tuple[str, ...] = LLMEvent.__struct_fields__
_astuple = msgspec.structs.astuple


class ArrowColumns(Mapping[str, Any]):
    """The ``llm_events`` columns of a batch, over its Arrow table.

    A column is turned into Python values the first time it is read, and kept:
    ``timestamp`` and ``ingested_at`` as epoch-ms ints, ``cost_usd`` as a float64
    numpy array (NaN = unpriced), the ``guardrail_*`` list columns as pyarrow
    ``ListArray``s, everything else as a list (``None`` for a missing optional).
    """

    __slots__ = ("table", "_cache")

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self._cache: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        try:
            return self._cache[name]
        except KeyError:
            pass
        col = self.table.column(name)  # KeyError for an unknown name
        if name in ("timestamp", "ingested_at"):
            v: Any = pc.cast(col, pa.int64()).to_numpy().tolist()
        elif name == "cost_usd":
            v = col.to_numpy()
        elif name.startswith("guardrail_") and name != "guardrail_hit":
            v = col.combine_chunks()
        else:
            v = col.to_pylist()
        self._cache[name] = v
        return v

    def __iter__(self) -> Any:
        return iter(self.table.column_names)

    def __len__(self) -> int:
        return self.table.num_columns

    @property
    def num_rows(self) -> int:
        return self.table.num_rows


def _events_table(batch: EnrichedBatch) -> pa.Table:
    """The record-by-record events (with the built-in scan's guardrails) as a
    :data:`DECODED_SCHEMA` table; the events are transposed in C (``zip(*astuple(e) …)``)."""
    b = batch.batch
    evs = b.events
    n = len(evs)
    col = dict(zip(_FIELDS, zip(*map(_astuple, evs), strict=False), strict=True))
    ts_list = [t if type(t) is int else parse_timestamp_ms(t) for t in col["timestamp"]]
    scan = batch.scan_hits
    per_event = col["guardrails"]
    if scan is not None:
        per_event = tuple([*(gs or ()), *(Guardrail(nm, vd, sc) for nm, vd, sc in hits)]
                          for gs, hits in zip(per_event, scan, strict=True))
    flat: list[Any] = [g for gs in per_event if gs for g in gs]
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum([len(gs) if gs else 0 for gs in per_event], out=offsets[1:])
    structs = pa.StructArray.from_arrays(
        [pa.array([g.name for g in flat], pa.string()), pa.array([g.verdict for g in flat], pa.string()),
         pa.array([g.score for g in flat], pa.float64())], fields=list(_GUARDRAIL_TYPE))
    arrays: list[Any] = []
    for f in DECODED_SCHEMA:
        name = f.name
        if name == "timestamp":
            arrays.append(pa.array(ts_list, pa.int64()))
        elif name == "guardrails":
            arrays.append(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), structs))
        elif name == "extra":
            arrays.append(pa.array(["{}" if not x else _json.encode(x).decode() for x in col["extra"]],
                                   pa.string()))
        elif name == "source_topic":
            arrays.append(pa.array(b.topics, pa.string()))
        elif name == "source_partition":
            arrays.append(pa.array(b.partitions, pa.int64()))
        elif name == "source_offset":
            arrays.append(pa.array(b.offsets, pa.int64()))
        else:
            arrays.append(pa.array(col[name], f.type))
    return pa.Table.from_arrays(arrays, schema=DECODED_SCHEMA)


def _window_keys(app: pa.Array, model: pa.Array, pver: pa.Array) -> tuple[np.ndarray, list[WindowKey]]:
    """Per row the code of its window key (app, model, prompt_version), and the keys by
    code, numbered in first-seen order."""
    enc = [pc.dictionary_encode(x) for x in (app, model, pver)]
    idx = [np.asarray(e.indices.to_numpy(), np.int64) for e in enc]
    sizes = [len(e.dictionary) for e in enc]
    combined = (idx[0] * sizes[1] + idx[1]) * sizes[2] + idx[2]
    uniq, first, codes = np.unique(combined, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    dicts = [e.dictionary.to_pylist() for e in enc]
    key_list = [WindowKey(dicts[0][idx[0][i]], dicts[1][idx[1][i]], dicts[2][idx[2][i]])
                for i in first[order].tolist()]
    return rank[codes.ravel()], key_list


def _guardrail_columns(gr: pa.Array, n: int) -> tuple[dict[str, pa.Array], np.ndarray, np.ndarray, np.ndarray]:
    """The wire ``guardrails`` (a list of structs per row) as the three ``guardrail_*``
    list columns, and per row: checked (any guardrail), hit (worst verdict flagged or
    blocked), blocked."""
    lens = _np(pc.list_value_length(gr), np.int64, 0)
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(lens, out=offsets[1:])
    pa_off = pa.array(offsets, pa.int32())
    gflat = gr.flatten()
    verdicts = gflat.field("verdict")
    lists = {"guardrail_names": pa.ListArray.from_arrays(pa_off, gflat.field("name")),
             "guardrail_verdicts": pa.ListArray.from_arrays(pa_off, verdicts),
             "guardrail_scores": pa.ListArray.from_arrays(pa_off, gflat.field("score"))}
    checked = lens > 0
    hit = np.zeros(n, bool)
    blocked = np.zeros(n, bool)
    if len(gflat):
        vcode = pc.index_in(verdicts, _VERDICTS).to_numpy(zero_copy_only=False)  # pass 0, flagged 1, blocked 2
        worst = np.maximum.reduceat(vcode, offsets[:-1][checked])
        hit[checked] = worst >= 1
        blocked[checked] = worst == 2
    return lists, checked, hit, blocked


def to_columns(batch: EnrichedBatch, now_ms: int | None = None) -> tuple[ArrowColumns, EventBatchColumns]:
    """The batch's ``llm_events`` rows (as :class:`ArrowColumns`) and the window
    stage's numbers, computed column-wise over both parts of the batch."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    b = batch.batch
    parts = [t for t in (b.table, _events_table(batch) if b.events else None) if t is not None]
    if not parts:
        return ArrowColumns(EVENT_ARROW_SCHEMA.empty_table()), EventBatchColumns(
            [], *(np.empty(0) for _ in range(15)))
    d = (parts[0] if len(parts) == 1 else pa.concat_tables(parts)).combine_chunks()
    n = d.num_rows
    arrs = {name: d.column(name).chunk(0) for name in d.column_names}  # one chunk each
    c = arrs.__getitem__
    req, resp = c("request_model"), c("response_model")
    has_resp = pc.fill_null(pc.not_equal(resp, ""), False)
    has_req = pc.fill_null(pc.not_equal(req, ""), False)
    model = pc.if_else(has_resp, resp, pc.if_else(has_req, req, ""))
    pver = pc.fill_null(c("prompt_version"), "")
    codes, key_list = _window_keys(c("app"), model, pver)
    keys = [key_list[k] for k in codes.tolist()]
    g_lists, g_checked, g_hit, g_blocked = _guardrail_columns(c("guardrails"), n)
    ts_arr = _np(c("timestamp"), np.int64)
    tok_f = np.array([_np(c(f), np.float64) for f in _TOKEN_FIELDS])  # null -> NaN
    has_tok = ~np.isnan(tok_f).all(axis=0)
    tok = np.nan_to_num(tok_f, nan=0.0).astype(np.int64)
    model_names: dict[str, int] = {}
    key_model = np.array([model_names.setdefault(k.model, len(model_names)) for k in key_list], np.int64)
    costs = batch.pricer.cost_columns(list(model_names), ts_arr, tok, has_tok, codes=key_model[codes])
    ts_type = EVENT_ARROW_SCHEMA.field("timestamp").type
    # the derived columns of EVENT_FIELDS, and the wire columns stored changed; the others
    # are the decoded columns, cast to their column type
    out: dict[str, Any] = {
        "timestamp": pa.array(ts_arr, pa.int64()).cast(ts_type), "model": model, "prompt_version": pver,
        **g_lists, "guardrail_hit": pa.array(g_hit.view(np.uint8), pa.uint8()),
        "cost_usd": pa.array(costs, pa.float64(), from_pandas=True),
        "price_version": pa.array([batch.pricer.version] * n, pa.string()),
        "ingested_at": pa.array(np.full(n, now, np.int64), pa.int64()).cast(ts_type),
    }
    arrays = []
    for f in EVENT_ARROW_SCHEMA:
        v = out.get(f.name)
        if v is None:
            v = c(f.name)
            if v.type != f.type:
                v = v.cast(f.type)
        arrays.append(v)
    table = pa.Table.from_arrays(arrays, schema=EVENT_ARROW_SCHEMA)
    src = pc.dictionary_encode(pc.fill_null(c("source_topic"), ""))  # per-partition watermarks
    src_codes, src_list = source_index(_np(src.indices, np.int64), src.dictionary.to_pylist(),
                                       _np(c("source_partition"), np.int64, 0))
    wcols = EventBatchColumns(
        keys=keys, ts_ms=ts_arr,
        latency_ms=_np(c("latency_ms"), np.float64),
        ttft_ms=_np(c("ttft_ms"), np.float64),  # null -> NaN
        tpot_ms=_np(c("tpot_ms"), np.float64),
        is_error=_np(pc.equal(c("status"), "error"), bool),
        **dict(zip(_TOKEN_FIELDS, tok, strict=True)), cost_usd=costs,
        guardrail_checked=g_checked, guardrail_hit=g_hit, guardrail_blocked=g_blocked,
        feedback=_np(c("feedback"), np.float64), key_codes=codes, key_list=key_list,
        source_codes=src_codes, source_list=src_list,
    )
    return ArrowColumns(table), wcols


def to_arrow(cols: Mapping[str, Any]) -> pa.Table:
    """The ``llm_events`` columns as an Arrow table with :data:`EVENT_ARROW_SCHEMA`."""
    if isinstance(cols, ArrowColumns):
        return cols.table
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
