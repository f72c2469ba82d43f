"""The copies of each contract fact agree with its one definition in schemas/.

schemas/columns.py (EVENT_FIELDS, the column tuples), schemas/event.py and
schemas/tables.sql say what a row is; the Arrow schemas and decode checks of
streams/ingest/transforms.py (derived from EVENT_FIELDS) and the window-rebuild query
of streams/worker.py must say the same. The tables are created from tables.sql in a throwaway chDB (about
0.2 s) and read back from ``system.columns``.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec.inspect as mi
import pyarrow as pa
import pytest
from aiokafka.structs import TopicPartition

from driftline.schemas import topics
from driftline.schemas.columns import EVENT_FIELDS, TABLE_COLUMNS
from driftline.schemas.event import MAX_ID_CHARS, MAX_LABEL_CHARS, MAX_TOKENS, Guardrail, LLMEvent
from driftline.streams.ingest.transforms import (
    _DEFAULTS,
    _DURATIONS,
    _GUARDRAIL_TYPE,
    _ID_COLS,
    _LABEL_COLS,
    _LABEL_LISTS,
    _LITERALS,
    _TOKEN_FIELDS,
    _VERDICTS,
    _WIRE_FIELDS,
    DECODED_SCHEMA,
    EVENT_ARROW_SCHEMA,
)
from driftline.streams.sinks.clickhouse import ddl_statements
from driftline.streams.stages.window_restore import recent_rows as _recent_rows
from driftline.streams.stages.windows import WindowConfig

DB = "contract"


class _Result:
    def __init__(self, t: pa.Table) -> None:
        self.result_columns = [c.to_pylist() for c in t.columns]
        self.result_rows = list(zip(*self.result_columns, strict=True))


class _Client:
    """The two calls of clickhouse-connect's client that ``_recent_rows`` makes, on chDB."""

    def __init__(self, session: Any) -> None:
        self.s = session

    def query(self, sql: str, column_oriented: bool = False) -> _Result:
        return _Result(self.s.query(sql, "ArrowTable"))


@pytest.fixture(scope="module")
def chdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from chdb import session

    s = session.Session(str(tmp_path_factory.mktemp("contract")))
    try:
        for stmt in ddl_statements(DB):
            s.query(stmt)
        yield s
    finally:
        s.close()


def _ddl(s: Any) -> dict[str, list[tuple[str, str]]]:
    rows = s.query(f"SELECT table, name, type FROM system.columns WHERE database = '{DB}' AND table NOT IN "
                   f"(SELECT name FROM system.tables WHERE database = '{DB}' AND engine = 'View') "
                   "ORDER BY table, position", "ArrowTable").to_pylist()
    out: dict[str, list[tuple[str, str]]] = {}
    for r in rows:
        out.setdefault(r["table"], []).append((r["name"], r["type"]))
    return out


def test_every_table_has_its_column_tuple(chdb: Any) -> None:
    """Each table of tables.sql has exactly the columns, in order, of its tuple in
    schemas/columns.py. Mutation caught: a column added to (or renamed in) tables.sql or a
    tuple alone, or a table created without a tuple."""
    ddl = _ddl(chdb)
    assert set(ddl) == set(TABLE_COLUMNS)
    for table, cols in TABLE_COLUMNS.items():
        assert [n for n, _ in ddl[table]] == list(cols), table


def test_the_event_fields_are_the_llm_events_ddl(chdb: Any) -> None:
    """The columns of EVENT_FIELDS are those of ``llm_events`` in tables.sql: names, order
    and ClickHouse types, exactly as ``system.columns`` reports them. Mutation caught: a
    column added to tables.sql alone (or to EVENT_FIELDS alone), two columns swapped, a
    type changed on one side only (say ``Nullable(UInt64)`` -> ``UInt64`` in tables.sql)."""
    assert _ddl(chdb)["llm_events"] == [(f.name, f.ch) for f in EVENT_FIELDS if f.ch]


def _arrow_type(ch: str) -> pa.DataType:
    ch = re.sub(r"^(LowCardinality|Nullable)\((.*)\)$", r"\2", ch)
    ch = re.sub(r"^(LowCardinality|Nullable)\((.*)\)$", r"\2", ch)  # Nullable(LowCardinality(..))
    if ch.startswith("Array("):
        return pa.list_(_arrow_type(ch[6:-1]))
    if ch.startswith("DateTime64(3"):
        return pa.timestamp("ms", tz="UTC")
    return {"String": pa.string(), "Float64": pa.float64(), "UInt64": pa.uint64(), "UInt32": pa.uint32(),
            "UInt8": pa.uint8(), "Int8": pa.int8()}[ch]


def test_the_arrow_event_schema_is_the_llm_events_table(chdb: Any) -> None:
    """The Arrow table the worker inserts has the columns of ``llm_events`` in order, each
    with the Arrow type of its ClickHouse type. Mutation caught: a column type changed in
    tables.sql (say UInt64 -> Int64) or in EVENT_ARROW_SCHEMA alone."""
    ddl = _ddl(chdb)["llm_events"]
    assert EVENT_ARROW_SCHEMA.names == [n for n, _ in ddl]
    for (name, ch), f in zip(ddl, EVENT_ARROW_SCHEMA, strict=True):
        assert f.type == _arrow_type(ch), name


def test_the_decode_schema_is_the_wire_schema() -> None:
    """The columnar decode path reads exactly the keys of :class:`LLMEvent` (``extra``
    apart: it holds the unknown keys), guardrails with the fields of :class:`Guardrail`,
    and every column it hands on is an ``llm_events`` column or the wire-only
    ``guardrails``. Mutation caught: a field added to LLMEvent but not to _WIRE_FIELDS
    (the fast path would then reject every record carrying it)."""
    wire = [n for n, _ in _WIRE_FIELDS]
    assert len(wire) == len(set(wire))
    assert {*wire, "extra"} == set(LLMEvent.__struct_fields__)
    assert [f.name for f in _GUARDRAIL_TYPE] == list(Guardrail.__struct_fields__)
    assert set(DECODED_SCHEMA.names) - set(TABLE_COLUMNS["llm_events"]) == {"guardrails"}


def _wire_arrow(t: mi.Type) -> pa.DataType:
    """The Arrow type that Arrow's JSON reader is to give a value of msgspec type ``t``."""
    t = _scalar(t)
    if isinstance(t, mi.LiteralType):
        return pa.string() if isinstance(t.values[0], str) else pa.int64()
    if isinstance(t, mi.ListType):
        return pa.list_(_wire_arrow(t.item_type))
    if isinstance(t, mi.StructType):
        return pa.struct([(f.name, _wire_arrow(f.type)) for f in t.fields])
    return {mi.StrType: pa.string(), mi.IntType: pa.int64(), mi.FloatType: pa.float64()}[type(t)]


def test_the_decoded_types_are_the_wire_types() -> None:
    """Each wire key is decoded with the Arrow type of its LLMEvent annotation (the
    timestamp, a string or a number on the wire, as epoch ms), and the requirements and
    defaults of EVENT_FIELDS are LLMEvent's. Mutation caught: a wire type changed in
    LLMEvent alone (say ``latency_ms`` to int: Arrow would then refuse every fractional
    latency), or a default changed in EVENT_FIELDS alone (``operation`` "chat" -> "")."""
    info = mi.type_info(LLMEvent)
    assert isinstance(info, mi.StructType)
    fields = {f.name: f for f in info.fields}
    decoded = dict(_WIRE_FIELDS)
    for f in EVENT_FIELDS:
        if f.source != "wire":
            continue
        want = pa.int64() if f.name == "timestamp" else _wire_arrow(fields[f.name].type)
        assert decoded[f.name] == want, f.name
        assert f.required == fields[f.name].required, f.name
    assert dict(_DEFAULTS) == {n: fl.default for n, fl in fields.items()
                               if fl.default not in (None, mi.NODEFAULT) and n != "extra"}


def _scalar(t: mi.Type) -> mi.Type:
    return next(u for u in t.types if not isinstance(u, mi.NoneType)) if isinstance(t, mi.UnionType) else t


def test_the_columnar_checks_are_the_event_types() -> None:
    """The columnar decode path's range checks (``_valid_rows``) cover exactly the fields
    that LLMEvent's annotations bound: labels at MAX_LABEL_CHARS, identifiers at
    MAX_ID_CHARS, token counts at MAX_TOKENS, and the literals of status, feedback and
    guardrail verdict, all as EVENT_FIELDS says. Mutation caught: a Label/Ident/token/
    duration/literal field added to LLMEvent but not checked in EVENT_FIELDS, or a bound
    changed on one side only (the fast path would store what the exact path rejects)."""
    info = mi.type_info(LLMEvent)
    assert isinstance(info, mi.StructType)
    types = {f.name: _scalar(f.type) for f in info.fields}

    def str_max(n: int) -> set[str]:
        return {k for k, t in types.items() if isinstance(t, mi.StrType) and t.max_length == n}

    assert set(_LABEL_COLS) == str_max(MAX_LABEL_CHARS)
    assert set(_ID_COLS) == str_max(MAX_ID_CHARS)
    assert set(_TOKEN_FIELDS) == {k for k, t in types.items() if isinstance(t, mi.IntType) and t.le == MAX_TOKENS}
    assert set(_LABEL_LISTS) == {k for k, t in types.items() if isinstance(t, mi.ListType)
                                 and isinstance(t.item_type, mi.StrType) and t.item_type.max_length == MAX_LABEL_CHARS}
    assert {n for n, _ in _DURATIONS} == {k for k, t in types.items() if isinstance(t, mi.FloatType) and t.ge == 0}
    assert {n for n, _ in _LITERALS} == {k for k, t in types.items() if isinstance(t, mi.LiteralType)}
    for name, allowed in _LITERALS:
        lit = types[name]
        assert isinstance(lit, mi.LiteralType) and set(lit.values) == set(allowed.to_pylist()), name
    g = mi.type_info(Guardrail)
    assert isinstance(g, mi.StructType)
    verdict = next(f.type for f in g.fields if f.name == "verdict")
    assert isinstance(verdict, mi.LiteralType) and set(verdict.values) == set(_VERDICTS.to_pylist())


def test_the_window_rebuild_query_runs_on_the_ddl(chdb: Any) -> None:
    """The hand-written query that rebuilds open windows after a restart names the
    ``llm_events`` columns as tables.sql defines them, and reads back what was stored.
    Mutation caught: a column renamed in tables.sql (or in the query) alone."""
    chdb.query(f"INSERT INTO {DB}.llm_events (event_id, timestamp, app, model, prompt_version, latency_ms, "
               "ttft_ms, status, input_tokens, guardrail_verdicts, guardrail_hit, feedback, cost_usd, "
               "source_topic, source_partition, source_offset) VALUES ('e1', "
               "fromUnixTimestamp64Milli(1700000000000), 'chat', 'gpt-4o', 'v1', 120.5, 30.0, 'error', 7, "
               "['blocked'], 1, -1, 0.25, 'llm.events', 2, 9)")
    cols = _recent_rows(_Client(chdb), DB, [TopicPartition("llm.events", 2)], WindowConfig())
    assert cols is not None and len(cols) == 1
    assert (cols.keys[0].app, cols.keys[0].model, cols.keys[0].prompt_version) == ("chat", "gpt-4o", "v1")
    assert int(cols.ts_ms[0]) == 1700000000000 and float(cols.latency_ms[0]) == 120.5
    assert float(cols.ttft_ms[0]) == 30.0 and bool(cols.is_error[0]) and int(cols.input_tokens[0]) == 7
    assert float(cols.cost_usd[0]) == 0.25 and bool(cols.guardrail_hit[0]) and float(cols.feedback[0]) == -1



def _topic_literals(root: Path) -> list[str]:
    """``file:line`` of every string constant that is a topic name, in the code of
    ``root`` outside schemas/topics.py, the tests and the docs (a logger named like a
    topic apart)."""
    names = {v for k, v in vars(topics).items() if k.endswith("_TOPIC")}
    found = []
    for d in ("streams", "schemas", "detectors", "benchmarks", "scripts"):
        for path in sorted((root / d).rglob("*.py")):
            if path == root / "schemas" / "topics.py":
                continue
            tree = ast.parse(path.read_text(), str(path))
            loggers = {id(a) for n in ast.walk(tree) if isinstance(n, ast.Call)
                       and isinstance(n.func, ast.Attribute) and n.func.attr == "getLogger" for a in n.args}
            found += [f"{path.relative_to(root)}:{n.lineno}" for n in ast.walk(tree)
                      if isinstance(n, ast.Constant) and n.value in names and id(n) not in loggers]
    return found


def test_topic_names_come_from_schemas_topics() -> None:
    """No module names a topic by a string literal: every use goes through
    schemas/topics.py. Mutation caught: ``producer.send("llm.events", ...)`` (or a
    ``default="otlp_spans"``) written anywhere in streams/, schemas/, detectors/,
    benchmarks/ or scripts/, which would go on sending to the old name after a rename."""
    assert _topic_literals(Path(__file__).resolve().parents[2]) == []
