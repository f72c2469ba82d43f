"""ClickHouse cluster mode (streams/sinks/cluster.py) without a ClickHouse cluster.

No ClickHouse server runs here, so nothing below has run on a cluster. What is checked:
every cluster statement parses with ClickHouse's own parser (chDB's ``formatQuery`` and
``EXPLAIN AST``), the statements equal a golden file, every table of tables.sql has its
Replicated ``_local`` table and its Distributed table sharded by its dedup columns, the
sharding expressions evaluate on the real single-node tables (chDB), per-shard FINAL
(emulated: two databases split by the sharding key) equals FINAL on one node, the DSN /
CLI parsing, and the settings every insert carries. Each test names the mutation it catches.

Regenerate the golden file after a deliberate change (then review its diff):
``python -m driftline.streams.sinks.cluster --cluster c --database driftline > tests/golden/cluster_ddl.sql``
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from driftline.streams.sinks.clickhouse import (
    ClickHouseSink,
    Retention,
    ddl_statements,
    retention_statements,
)
from driftline.streams.sinks.cluster import (
    SHARD_BY,
    ClusterMode,
    cluster_ddl_statements,
    cluster_of_dsn,
    parse_table,
    with_cluster,
)

DB = "driftline"
GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "cluster_ddl.sql"
CHDB_REFUSED = ("ClickHouse cluster mode (cluster 'c') needs ClickHouse servers (an http(s):// DSN): chDB "
                "(chdb://) is one embedded node without Keeper, so it has no ON CLUSTER DDL, Replicated "
                "tables or shards")


def _generated() -> list[str]:
    stmts = cluster_ddl_statements(ddl_statements(DB), "c")
    return stmts + retention_statements(DB, {}, Retention(days=30, text_days=7), cluster="c")


def _tables() -> dict[str, Any]:
    return {s.table: s for s in (parse_table(x) for x in ddl_statements(DB) if x.startswith("CREATE TABLE"))}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chDB path of this module (one embedded engine per process: every test here shares it)."""
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def chdb(store: Path) -> Iterator[Any]:
    """One chDB session holding the single-node tables (they run for real here)."""
    from chdb import session

    s = session.Session(str(store))
    try:
        for stmt in ddl_statements(DB):
            s.query(stmt)
        yield s
    finally:
        s.close()


def _format(chdb: Any, q: str) -> str:
    """ClickHouse's ``formatQuery`` of ``q`` (sent as a query parameter, TSV-escaped)."""
    esc = q.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
    return str(chdb.query("SELECT formatQuery({q:String})", "TSVRaw", params={"q": esc}).bytes().decode()).rstrip("\n")


def test_generated_statements_equal_the_golden_file() -> None:
    """Mutation caught: any change of the generated DDL (a sharding key, the Keeper path,
    '{replica}', the version column, a dropped SETTINGS, ON CLUSTER on the retention
    ALTERs) that is not reviewed as a golden-file diff."""
    assert "\n;\n".join(_generated()) + "\n" == GOLDEN.read_text()


def test_every_cluster_statement_parses_with_clickhouses_parser(chdb: Any) -> None:
    """Each statement goes through chDB's ``formatQuery`` (the parser and formatter of
    ClickHouse 26.x) and ``EXPLAIN AST``; the AST names the engine we meant.
    Mutation caught: a generator typo that breaks the syntax (unbalanced parentheses when
    cutting the column list, a missing comma before the version column, ``ON CLUSTER``
    put after the column list)."""
    stmts = _generated()
    for stmt in stmts:
        formatted = _format(chdb, stmt)
        assert " ON CLUSTER c" in formatted, stmt
        assert _format(chdb, formatted) == formatted  # what the parser printed parses back the same
        ast = chdb.query("EXPLAIN AST " + stmt, "TSVRaw").bytes().decode()
        m = re.match(r"CREATE TABLE IF NOT EXISTS driftline\.(\w+) ", stmt)
        if m and m.group(1).endswith("_local"):
            engine = _tables()[m.group(1)[:-len("_local")]].engine
            assert f"Function Replicated{engine} " in ast
            assert f"Literal '/clickhouse/tables/{{shard}}/{{database}}/{m.group(1)}'" in ast
            assert "Literal '{replica}'" in ast
        elif m:
            assert "Function Distributed (children 1)" in ast and "Function cityHash64" in ast
    assert sum(s.startswith("ALTER TABLE") for s in stmts) == 7


def test_every_table_has_a_local_and_a_distributed_table_sharded_by_its_dedup_columns() -> None:
    """Mutation caught: a table added to tables.sql without a cluster rule (it would be
    missing on the cluster), or a sharding key with a column outside the table's ORDER BY
    (rows of one ReplacingMergeTree dedup group on two shards: FINAL would keep both)."""
    tables = _tables()
    assert set(tables) == set(SHARD_BY)
    stmts = cluster_ddl_statements(ddl_statements(DB), "c")
    assert stmts[0] == "CREATE DATABASE IF NOT EXISTS driftline ON CLUSTER c"
    views = [s for s in ddl_statements(DB) if s.startswith("CREATE OR REPLACE VIEW")]
    assert len(views) == 2  # trace_summary, conversation_summary: ON CLUSTER over the Distributed tables
    assert len(stmts) == 1 + 2 * len(tables) + len(views)
    assert [s for s in stmts if s.startswith("CREATE OR REPLACE VIEW")] == [
        v.replace(" AS\n", " ON CLUSTER c AS\n", 1) for v in views]
    for name, spec in tables.items():
        local = [s for s in stmts if s.startswith(f"CREATE TABLE IF NOT EXISTS {DB}.{name}_local ON CLUSTER c\n")]
        dist = [s for s in stmts if s.startswith(f"CREATE TABLE IF NOT EXISTS {DB}.{name} ON CLUSTER c AS "
                                                 f"{DB}.{name}_local\n")]
        assert len(local) == 1 and len(dist) == 1, name
        assert f"ENGINE = Replicated{spec.engine}(" in local[0]
        key = re.search(rf"Distributed\('c', '{DB}', '{name}_local', cityHash64\(([^()]*)\)\)$", dist[0])
        assert key is not None, dist[0]
        cols = [c.strip() for c in key.group(1).split(",")]
        assert cols and set(cols) <= set(spec.order_by), (name, cols, spec.order_by)
        # everything but the engine and the single-node setting is tables.sql's text
        for line in spec.tail.splitlines():
            if not line.startswith("SETTINGS"):
                assert line in local[0].splitlines(), (name, line)
        assert spec.columns in local[0]


def test_a_table_without_a_rule_or_with_a_stray_sharding_column_is_refused(monkeypatch: pytest.MonkeyPatch
                                                                              ) -> None:
    """Mutation caught: the generator skipping a table it has no rule for (instead of
    failing), or not checking the rule's columns against ORDER BY."""
    new = ("CREATE TABLE IF NOT EXISTS driftline.new_table\n(\n    a String\n)\nENGINE = ReplacingMergeTree\n"
           "ORDER BY (a)")
    with pytest.raises(ValueError) as e:
        cluster_ddl_statements([new], "c")
    assert str(e.value) == ("table new_table has no sharding key for ClickHouse cluster mode: add it to "
                            "SHARD_BY in streams/sinks/cluster.py (ORDER BY columns only)")
    monkeypatch.setitem(SHARD_BY, "llm_events", ("source_partition",))
    with pytest.raises(ValueError) as e:
        cluster_ddl_statements(ddl_statements(DB), "c")
    assert str(e.value) == ("table llm_events: sharding columns ['source_partition'] are not in its ORDER BY "
                            "('app', 'model', 'timestamp', 'event_id'): rows of one dedup group could land "
                            "on different shards")
    with pytest.raises(ValueError) as e:
        cluster_ddl_statements(["CREATE VIEW driftline.v AS SELECT 1"], "c")
    assert str(e.value) == ("statement of tables.sql not understood by cluster mode (give it a rule in "
                            "streams/sinks/cluster.py): 'CREATE VIEW driftline.v AS SELECT 1'")


def test_sharding_keys_evaluate_on_the_real_tables_and_settings_exist(chdb: Any) -> None:
    """The sharding expressions run on the single-node tables of tables.sql (same columns
    as the _local tables) on chDB, and group rows by dedup key: two rows of one window
    (re-emitted, newer ``updated_at``) hash alike. Every SETTINGS name left on a
    Replicated table is a real MergeTree setting, and ``non_replicated_deduplication_window``
    (meaningless there) is gone. Mutation caught: a sharding column that cityHash64
    cannot hash or that does not exist; a setting name mangled by the SETTINGS rewrite."""
    for name, cols in SHARD_BY.items():
        chdb.query(f"SELECT cityHash64({', '.join(cols)}) FROM {DB}.{name} LIMIT 0")
    chdb.query(f"INSERT INTO {DB}.llm_window_metrics (window_start, app, model, prompt_version, events, "
               "updated_at) VALUES ('2026-01-01 00:00:00', 'a', 'm', 'v1', 3, '2026-01-01 00:00:05'), "
               "('2026-01-01 00:00:00', 'a', 'm', 'v1', 7, '2026-01-01 00:01:05'), "
               "('2026-01-01 00:01:00', 'a', 'm', 'v1', 1, '2026-01-01 00:01:05')")
    key = ", ".join(SHARD_BY["llm_window_metrics"])
    rows = chdb.query(f"SELECT uniqExact(cityHash64({key})) FROM {DB}.llm_window_metrics "
                      "GROUP BY window_start ORDER BY window_start", "CSV").bytes().decode().split()
    assert rows == ["1", "1"]
    known = set(chdb.query("SELECT name FROM system.merge_tree_settings", "TSVRaw").bytes().decode().split())
    for stmt in cluster_ddl_statements(ddl_statements(DB), "c"):
        assert "non_replicated_deduplication_window" not in stmt
        for m in re.finditer(r"^SETTINGS (.*)$", stmt, re.MULTILINE):
            for s in m.group(1).split(","):
                assert s.split("=")[0].strip() in known
    assert all("non_replicated_deduplication_window = 1000" in s for s in ddl_statements(DB)[1:]
               if s.startswith("CREATE TABLE"))


def test_final_per_shard_equals_final_on_one_node_with_these_sharding_keys(chdb: Any) -> None:
    """What a Distributed ``SELECT … FINAL`` computes, emulated on chDB: the rows of one
    node split over two "shards" (two databases) by ``cityHash64(<SHARD_BY columns>) % 2``,
    FINAL on each, results summed. With the chosen keys it equals FINAL on one node, for
    re-emitted window rows (newest ``updated_at`` wins) and re-delivered events. A key that
    is not a function of the dedup columns (``updated_at``, ``ingested_at``: what differs
    between two copies) is run as a control and gives a different answer, so the data do
    exercise the property. Mutation caught: a sharding rule that splits a dedup group."""
    for db in ("ref", "s0", "s1"):
        for stmt in ddl_statements(db):
            chdb.query(stmt)
    chdb.query("INSERT INTO ref.llm_window_metrics (window_start, app, model, prompt_version, events, updated_at) "
               "SELECT toDateTime64('2026-01-01 00:00:00', 3, 'UTC') + toIntervalMinute(number % 40), "
               "['a', 'b', 'c'][1 + number % 3], 'm', 'v1', number, "
               "toDateTime64('2026-01-01 00:00:00', 6, 'UTC') + toIntervalSecond(number) FROM numbers(600) "
               "SETTINGS optimize_on_insert = 0")  # as the worker inserts: every copy stored
    chdb.query("INSERT INTO ref.llm_events (event_id, timestamp, app, model, latency_ms, source_partition, "
               "source_offset, ingested_at) SELECT 'e' || toString(number % 250), "
               "toDateTime64('2026-01-01 00:00:00', 3, 'UTC') + toIntervalSecond(number % 250), 'a', 'm', "
               "number % 250, 0, number, now64(3) + toIntervalMillisecond(number) FROM numbers(1000) "
               "SETTINGS optimize_on_insert = 0")

    def split_final(table: str, key: str, value: str) -> list[str]:
        for i in (0, 1):
            chdb.query(f"TRUNCATE TABLE s{i}.{table}")
            chdb.query(f"INSERT INTO s{i}.{table} SELECT * FROM ref.{table} WHERE cityHash64({key}) % 2 = {i} "
                       "SETTINGS optimize_on_insert = 0")
        return chdb.query(f"SELECT sum(n), sum(v) FROM (SELECT count() n, sum({value}) v FROM s0.{table} FINAL "
                          f"UNION ALL SELECT count(), sum({value}) FROM s1.{table} FINAL)",
                          "CSV").bytes().decode().split()

    for table, value, control in (("llm_window_metrics", "events", "updated_at"),
                                  ("llm_events", "latency_ms", "ingested_at")):
        one_node = chdb.query(f"SELECT count(), sum({value}) FROM ref.{table} FINAL", "CSV").bytes().decode().split()
        assert one_node[0].split(",")[0] == {"llm_window_metrics": "120", "llm_events": "250"}[table]
        assert split_final(table, ", ".join(SHARD_BY[table]), value) == one_node, table
        assert split_final(table, control, value) != one_node, table


def test_baseline_show_query_reads_distributed_tables_and_still_runs_on_one_node(chdb: Any) -> None:
    """``driftline baseline show`` filters ``drift_references`` by an IN subquery over
    ``drift_references``: on a cluster both are Distributed, and a plain IN is refused
    there (``distributed_product_mode = 'deny'``, "Double-distributed IN/JOIN subqueries
    is denied"), so it is a GLOBAL IN; on chDB it must still return the newest reference.
    Mutation caught: GLOBAL dropped (fails on a cluster only, so the text is checked), or
    the query broken for one node."""
    from driftline.streams.cli.baseline import SHOW_SQL

    q = SHOW_SQL.format(db=DB, where="")
    assert ") GLOBAL IN (SELECT app, model, prompt_version, field, max(version) FROM driftline.drift_references" in q
    chdb.query(f"INSERT INTO {DB}.drift_references (app, model, prompt_version, field, version, mode, n) "
               "VALUES ('a', 'm', 'v1', 'prompt', 1, 'first_n', 300), ('a', 'm', 'v1', 'prompt', 2, 'rebase', 50)")
    rows = chdb.query(q, "CSV").bytes().decode().splitlines()
    assert len(rows) == 1 and rows[0].split(",")[4:7] == ["2", '"rebase"', "50"]


def test_retention_in_cluster_mode_alters_the_local_tables_on_cluster() -> None:
    """Mutation caught: TTL ALTERs sent to the Distributed tables (which store nothing),
    without ON CLUSTER (one node only), or read from the plain names' create queries
    (then every start would re-alter)."""
    have = "CREATE TABLE x (`prompt` Nullable(String) TTL toDateTime(timestamp) + toIntervalDay(7)) ENGINE = X"
    every = retention_statements(DB, {}, Retention(text_days=7), cluster="c")
    assert len(every) == 5 and all(re.match(r"ALTER TABLE driftline\.\w+_local ON CLUSTER c MODIFY COLUMN ", s)
                                   for s in every)
    prompt = ("ALTER TABLE driftline.llm_events_local ON CLUSTER c MODIFY COLUMN prompt TTL toDateTime(timestamp) "
              "+ INTERVAL 7 DAY")
    assert prompt in every
    done = retention_statements(DB, {"llm_events_local": have}, Retention(text_days=7), cluster="c")
    assert done == [s for s in every if s != prompt]  # the TTL already on the _local table is kept
    assert retention_statements(DB, {"llm_events": have}, Retention(text_days=7), cluster="c") == every
    assert retention_statements(DB, {}, Retention(days=3), cluster="my-cluster") == [
        "ALTER TABLE driftline.llm_events_local ON CLUSTER `my-cluster` MODIFY TTL toDateTime(timestamp) "
        "+ INTERVAL 3 DAY",
        "ALTER TABLE driftline.dlq_outbox_local ON CLUSTER `my-cluster` MODIFY TTL toDateTime(written_at) "
        "+ INTERVAL 3 DAY",
    ]


def test_dsn_and_option_parsing() -> None:
    """Mutation caught: ``?cluster=`` ignored, ``insert_quorum`` accepted without a
    cluster or as 1 (ClickHouse's own off value, misread as on), a cluster name that
    could inject SQL into the DDL, ``--cluster`` silently overriding a DSN's other cluster."""
    assert cluster_of_dsn("http://u:p@h:8123/db") is None
    assert cluster_of_dsn("https://h/db?cluster=prod_1") == ClusterMode("prod_1")
    assert cluster_of_dsn("http://h/db?cluster=c&insert_quorum=auto") == ClusterMode("c", "auto")
    assert cluster_of_dsn("http://h/db?cluster=c&insert_quorum=2") == ClusterMode("c", 2)
    bad = {
        "http://h/db?insert_quorum=2": "insert_quorum is a setting of ClickHouse cluster mode: give a cluster "
                                       "too (--cluster NAME or ?cluster=NAME)",
        "http://h/db?cluster=c&insert_quorum=1": "insert_quorum 1: 0 (off), 2 or more replicas, or auto "
                                                 "(a majority)",
        "http://h/db?cluster=c&insert_quorum=most": "insert_quorum 'most': 0 (off), 2 or more replicas, or "
                                                    "auto (a majority)",
        "http://h/db?cluster=c%3B%20DROP%20TABLE%20x": "ClickHouse cluster name 'c; DROP TABLE x': a letter or "
                                                       "_ first, then letters, digits, _ or -",
        "chdb:///tmp/store?cluster=c": CHDB_REFUSED,
    }
    for dsn, msg in bad.items():
        with pytest.raises(ValueError) as e:
            cluster_of_dsn(dsn)
        assert str(e.value) == msg, dsn
    assert with_cluster("http://h:8123/db", "c", "auto") == "http://h:8123/db?cluster=c&insert_quorum=auto"
    assert with_cluster("http://h:8123/db?cluster=c", "c") == "http://h:8123/db?cluster=c"
    assert with_cluster("http://h:8123/db", None) == "http://h:8123/db"
    with pytest.raises(ValueError) as e:
        with_cluster("http://h:8123/db?cluster=a", "b")
    assert str(e.value) == "--cluster 'b' and the DSN's cluster='a' differ"
    with pytest.raises(ValueError) as e:
        with_cluster("chdb:///tmp/store", "c")
    assert str(e.value) == CHDB_REFUSED


def test_the_sink_refuses_chdb_with_a_cluster_and_sends_the_insert_settings() -> None:
    """The sink (not only the CLI) refuses a cluster on chDB, and every insert (columns,
    Arrow) carries ``insert_distributed_sync=1`` and the quorum beside its dedup token,
    on the Distributed table's plain name. The client is a recorder (pure logic: which
    settings are passed; no server here). Mutation caught: the sink dropping the cluster
    settings on one of its two insert paths, or writing to ``_local`` tables directly
    (the sharding key would be bypassed)."""
    import asyncio

    import pyarrow as pa

    with pytest.raises(ValueError) as e:
        ClickHouseSink("chdb:///tmp/pt-cluster-never-created?cluster=c")
    assert str(e.value) == CHDB_REFUSED

    calls: list[tuple[str, dict[str, Any]]] = []

    class Recorder:
        def insert(self, table: str, data: Any, **kw: Any) -> None:
            calls.append((table, kw["settings"]))

        def raw_insert(self, table: str, cols: Any, **kw: Any) -> None:
            calls.append((table, kw["settings"]))

        def close(self) -> None:
            pass

    sink = ClickHouseSink("http://u:p@h:8123/db?cluster=c&insert_quorum=auto")
    assert sink.database == "db" and sink.cluster == ClusterMode("c", "auto")
    sink._client = Recorder()
    try:
        asyncio.run(sink.insert_columns("alerts", {"rule": ["r"]}, token="t1"))
        asyncio.run(sink.insert_arrow("llm_events", lambda: pa.table({"event_id": ["e"]}), token="t2"))
    finally:
        sink.close()
    assert calls == [
        ("db.alerts", {"insert_distributed_sync": 1, "insert_quorum": "auto", "insert_deduplication_token": "t1"}),
        ("db.llm_events", {"insert_distributed_sync": 1, "insert_quorum": "auto", "optimize_on_insert": 0,
                           "insert_deduplication_token": "t2"}),
    ]
    plain = ClickHouseSink("http://u:p@h:8123/db")
    assert plain.cluster is None and plain._insert_settings == {}
    plain.close()


def test_the_cluster_insert_settings_pass_the_client_and_clickhouse(chdb: Any, store: Path) -> None:
    """The settings names and values (``insert_distributed_sync``, ``insert_quorum =
    'auto'``) pass clickhouse-connect's check and ClickHouse's (chDB here, where a plain
    MergeTree ignores them), and the row is stored once. Mutation caught: a misspelt
    setting name or a value of the wrong type, which every insert on a cluster would fail on."""
    import asyncio

    sink = ClickHouseSink(f"chdb://{store}")
    try:
        sink.ensure_schema()
        sink._insert_settings = ClusterMode("c", "auto").insert_settings()
        # bounded: the sink retries what ClickHouse refuses for other reasons than data (an
        # unknown setting is code 115, retried) until it passes
        asyncio.run(asyncio.wait_for(sink.insert_rows("alerts", [{"rule": "r", "fingerprint": "f"}],
                                                      ["rule", "fingerprint"], token="tok"), 20))
        assert sink.query_rows("SELECT rule, fingerprint FROM driftline.alerts") == [("r", "f")]
    finally:
        sink.close()


def test_worker_cli_refuses_a_cluster_on_chdb(tmp_path: Path) -> None:
    """``driftline worker --cluster`` (and env DRIFTLINE_CLICKHOUSE_CLUSTER) on the embedded
    store exits 2 with the sink's message before anything starts. Mutation caught: the
    option not wired into the DSN (the worker would start single-node and say nothing)."""
    from typer.testing import CliRunner

    from driftline.streams.cli.main import app

    base = ["worker", "--kafka", "127.0.0.1:9", "--clickhouse", f"chdb://{tmp_path / 'store'}"]
    for args, env in ((["--cluster", "c"], {}), ([], {"DRIFTLINE_CLICKHOUSE_CLUSTER": "c"})):
        r = CliRunner().invoke(app, base + args, env=env)
        assert r.exit_code == 2, r.output
        assert f"error: {CHDB_REFUSED}" in " ".join(r.output.split())
    assert not (tmp_path / "store").exists()
