"""ClickHouse cluster mode: ``ON CLUSTER`` DDL, sharding rules and insert settings.

Turned on with ``driftline worker --cluster NAME`` (env ``DRIFTLINE_CLICKHOUSE_CLUSTER``)
or ``?cluster=NAME`` on an ``http(s)://`` DSN; ``?insert_quorum=N|auto`` (or
``--insert-quorum``) adds quorum writes. chDB (``chdb://``) is one embedded node without
Keeper and is refused with a cluster (:func:`cluster_of_dsn`).

The DDL is generated from ``schemas/tables.sql`` (:func:`cluster_ddl_statements`), the
single source of truth for columns, ORDER BY, PARTITION BY and TTLs. For every table
``t`` it makes

* ``CREATE TABLE IF NOT EXISTS db.t_local ON CLUSTER c (…) ENGINE =
  Replicated<Engine>('/clickhouse/tables/{shard}/{database}/t_local', '{replica}'[, version])``:
  the same columns, keys and settings, except ``non_replicated_deduplication_window``:
  Replicated engines deduplicate inserts by default (``insert_deduplicate=1``, the last
  ``replicated_deduplication_window`` blocks, kept in Keeper per shard: the path carries
  ``{shard}``), so the worker's ``insert_deduplication_token`` works as on one node;
* ``CREATE TABLE IF NOT EXISTS db.t ON CLUSTER c AS db.t_local ENGINE =
  Distributed('c', 'db', 't_local', cityHash64(<columns>))``: the plain name, so every
  query of the worker, the stages and the CLI reads all shards unchanged, and every
  insert is routed by the sharding key.

Sharding keys. ``ReplacingMergeTree`` (and ``FINAL``) collapses rows only within one
part set, i.e. one shard; a Distributed ``SELECT … FINAL`` runs ``FINAL`` on each shard
and unions the results. It is exact only when all rows of one dedup group (equal
ORDER BY key) are on one shard, which holds when the sharding key is a function of
ORDER BY columns only (rows with equal ORDER BY keys hash alike). It is also
deterministic (no ``rand()``): a retried insert must send each row to the same shard
as the first try, or the shard's insert-token dedup cannot see the retry.

==================  ==============================================  ===========================================  ==========================================================
table               ORDER BY (the dedup key)                        sharding key                                 why
==================  ==============================================  ===========================================  ==========================================================
llm_events          app, model, timestamp, event_id                 cityHash64(event_id)                         a re-delivered event (same event_id) meets its twin; spreads
                                                                                                                 a hot app over all shards (as SigNoz shards by span/log id)
llm_window_metrics  app, model, prompt_version, window_start        cityHash64(app, model, prompt_version,       every re-emission of one window (open rows, the final row)
                                                                    window_start)                                on one shard, so FINAL keeps the newest ``updated_at``
llm_embeddings      app, model, prompt_version, field, seq,         cityHash64(app, model, prompt_version,       a key's samples together: the drift stage reads them per
                    event_id                                        field)                                       key and field (``max(seq)``, ``ORDER BY seq``)
drift_scores        app, model, prompt_version, field, method, ts  cityHash64(app, model, prompt_version)       plain MergeTree (no row dedup); a key's results together
drift_references    app, model, prompt_version, field, version      cityHash64(app, model, prompt_version,       plain MergeTree; a key's reference history together
                                                                    field)
drift_control_log   control_id, applied_at                          cityHash64(control_id)                       plain MergeTree; one command's rows together
alerts              rule, fingerprint, ts                           cityHash64(rule, fingerprint)                plain MergeTree; one alert's transitions together
ingest_log          source_topic, source_partition, epoch,          cityHash64(source_topic, source_partition)   one Kafka partition's write log on one shard
                    last_offset
dlq_outbox          source_topic, source_partition, epoch,          cityHash64(source_topic, source_partition)   one partition's outbox on one shard (read with FINAL per
                    source_offset, idx                                                                           partition on recovery)
rekey_log           source_topic, source_partition, next_offset     cityHash64(source_topic, source_partition)   one OTLP partition's re-keyer log on one shard
drift_golden        golden_id, embed_model, idx                     cityHash64(golden_id)                        one golden set on one shard (read with FINAL)
guard_results       app, model, prompt_version, field, category,    cityHash64(app, model, prompt_version,       a rewritten verdict meets its twin (same key, field and
                    event_id                                        field)                                       event), next to the key's llm_embeddings rows
numeric_drift_state app, model, prompt_version, field              cityHash64(app, model, prompt_version,       one key-field's state rows on one shard (read with FINAL)
                                                                    field)
==================  ==============================================  ===========================================  ==========================================================

What was taken from others (their clustered migrations, read for this module):

* **PostHog** (``posthog/clickhouse``): one table definition whose engine class
  renders either a plain or a ``Replicated…('/clickhouse/tables/{shard}/…', '{replica}')``
  engine, a ``sharded_<t>`` local table behind a ``Distributed`` table with a hash
  sharding key (``sipHash64(distinct_id)`` for events). We take the single definition
  (tables.sql, rewritten here) and the ``{shard}`` path; we keep the plain name for the
  Distributed table (so no query changes) and name the local one ``<t>_local``.
* **Langfuse** (``packages/shared/clickhouse/migrations/clustered``): a second copy of
  every migration with ``ON CLUSTER`` and ``Replicated…`` engines; two copies drift
  apart, which is why this module generates the cluster DDL instead, with a test that a
  new table without a sharding rule fails.
* **SigNoz** (``signoz-otel-collector`` migrations): ``CREATE TABLE IF NOT EXISTS
  distributed_<t> ON CLUSTER c AS <t> ENGINE = Distributed(c, db, <t>,
  cityHash64(id))``: idempotent ``IF NOT EXISTS`` DDL run on every start, ``AS`` to copy
  the columns, ``cityHash64`` of the row's id. SigNoz uses ``rand()`` for some tables;
  we do not (see above: retried inserts must land on the same shard).

Inserts (:meth:`ClusterMode.insert_settings`):

* ``insert_distributed_sync = 1`` (an alias of ``distributed_foreground_insert`` since
  ClickHouse 23.x, accepted by older servers too): the INSERT into the Distributed
  table returns only when every shard has stored its rows. Without it the Distributed
  table queues the block on the receiving node's disk and answers at once, so the
  worker would commit Kafka offsets for rows that are on no shard yet (and lost with
  that node's disk), and the recovery queries could not see them.
* ``insert_quorum`` (default off): the insert returns only when that many replicas of
  each shard hold the part (``auto``: a majority). Without it a shard's part is on the
  one replica that took the insert until the others fetch it; losing that replica's
  disk before then loses rows whose offsets were committed, and a restarted worker
  reading the write log from a lagging replica replays from an older offset (stored
  events then collapse under ``FINAL``, but the window rebuild may read a lagging
  replica of another shard). A quorum equal to the replicas per shard makes every
  acknowledged write readable on every replica, at the price of inserts that wait
  (backpressure) while a replica is down. ``insert_quorum_parallel`` stays on (its
  default): several workers insert into one table at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = [
    "SHARD_BY", "ClusterMode", "TableSpec", "cluster_ddl_statements", "cluster_of_dsn", "on_cluster", "parse_table",
    "with_cluster",
]

#: table -> the ORDER BY columns its Distributed table hashes (cityHash64) to pick a shard.
#: Every table of tables.sql needs a rule here; the columns must be ORDER BY columns.
SHARD_BY: dict[str, tuple[str, ...]] = {
    "llm_events": ("event_id",),
    "llm_window_metrics": ("app", "model", "prompt_version", "window_start"),
    "llm_embeddings": ("app", "model", "prompt_version", "field"),
    "drift_scores": ("app", "model", "prompt_version"),
    "drift_references": ("app", "model", "prompt_version", "field"),
    "drift_control_log": ("control_id",),
    "alerts": ("rule", "fingerprint"),
    "ingest_log": ("source_topic", "source_partition"),
    "dlq_outbox": ("source_topic", "source_partition"),
    "rekey_log": ("source_topic", "source_partition"),
    "drift_golden": ("golden_id",),
    "guard_results": ("app", "model", "prompt_version", "field"),
    "numeric_drift_state": ("app", "model", "prompt_version", "field"),
}

#: MergeTree settings of tables.sql that have no meaning on a Replicated engine
_SINGLE_NODE_SETTINGS = frozenset({"non_replicated_deduplication_window"})
_CLUSTER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,127}")
_CREATE_TABLE = re.compile(r"CREATE TABLE IF NOT EXISTS (\w+)\.(\w+)\n(\(.*\))\nENGINE = (\w*MergeTree)"
                           r"(?:\(([^()]*)\))?\n(.*)", re.DOTALL)
_ORDER_BY = re.compile(r"^ORDER BY \(([^()]*)\)$", re.MULTILINE)
_SETTINGS = re.compile(r"^SETTINGS (.*)$", re.MULTILINE)


def on_cluster(name: str) -> str:
    return name if re.fullmatch(r"\w+", name) else f"`{name}`"


@dataclass(frozen=True)
class ClusterMode:
    """A ClickHouse cluster (``<remote_servers>`` name) to create and write the tables on.

    ``insert_quorum``: 0 (off), 2 or more replicas per shard, or ``"auto"`` (a majority).
    """

    name: str
    insert_quorum: int | Literal["auto"] = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _CLUSTER_NAME.fullmatch(self.name):
            raise ValueError(f"ClickHouse cluster name {self.name!r}: a letter or _ first, then letters, "
                             "digits, _ or -")
        q = self.insert_quorum
        if q != "auto" and (not isinstance(q, int) or isinstance(q, bool) or q < 0 or q == 1):
            raise ValueError(f"insert_quorum {q!r}: 0 (off), 2 or more replicas, or auto (a majority)")

    def insert_settings(self) -> dict[str, int | str]:
        """The settings every insert carries in cluster mode (see the module docstring)."""
        out: dict[str, int | str] = {"insert_distributed_sync": 1}
        if self.insert_quorum:
            out["insert_quorum"] = self.insert_quorum
        return out


def _quorum(value: str) -> int | Literal["auto"]:
    if value == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"insert_quorum {value!r}: 0 (off), 2 or more replicas, or auto (a majority)") from None


def cluster_of_dsn(dsn: str) -> ClusterMode | None:
    """The cluster mode a DSN asks for (``?cluster=NAME[&insert_quorum=N|auto]``), or None.

    Raises ValueError for a cluster on a ``chdb://`` DSN, or ``insert_quorum`` without a cluster.
    """
    u = urlsplit(dsn)
    params = dict(parse_qsl(u.query, keep_blank_values=True))
    name = params.get("cluster")
    quorum = params.get("insert_quorum")
    if name is None:
        if quorum is not None:
            raise ValueError("insert_quorum is a setting of ClickHouse cluster mode: give a cluster too "
                             "(--cluster NAME or ?cluster=NAME)")
        return None
    if u.scheme == "chdb":
        raise ValueError(f"ClickHouse cluster mode (cluster {name!r}) needs ClickHouse servers "
                         "(an http(s):// DSN): chDB (chdb://) is one embedded node without Keeper, "
                         "so it has no ON CLUSTER DDL, Replicated tables or shards")
    return ClusterMode(name, _quorum(quorum) if quorum is not None else 0)


def with_cluster(dsn: str, cluster: str | None, insert_quorum: str | None = None) -> str:
    """``dsn`` with ``cluster`` (and ``insert_quorum``) put in its query string, as the
    worker's ``--cluster``/``--insert-quorum`` do; a DSN that already names another
    cluster is refused. The result is checked with :func:`cluster_of_dsn`."""
    if cluster is None and insert_quorum is None:
        cluster_of_dsn(dsn)
        return dsn
    u = urlsplit(dsn)
    params = dict(parse_qsl(u.query, keep_blank_values=True))
    for key, value in (("cluster", cluster), ("insert_quorum", insert_quorum)):
        if value is None:
            continue
        if key in params and params[key] != value:
            raise ValueError(f"--{key.replace('_', '-')} {value!r} and the DSN's {key}={params[key]!r} differ")
        params[key] = value
    out = urlunsplit((u.scheme, u.netloc, u.path, urlencode(params), u.fragment))
    cluster_of_dsn(out)
    return out


@dataclass(frozen=True)
class TableSpec:
    """One ``CREATE TABLE`` of tables.sql, cut into the parts cluster mode rewrites."""

    database: str
    table: str
    columns: str  # "(\n    name Type,\n …)"
    engine: str  # "ReplacingMergeTree"
    engine_args: str  # "updated_at" or ""
    tail: str  # PARTITION BY / ORDER BY / SETTINGS lines
    order_by: tuple[str, ...]


def parse_table(stmt: str) -> TableSpec:
    """Cut one ``CREATE TABLE IF NOT EXISTS db.t (…) ENGINE = …MergeTree …`` statement."""
    m = _CREATE_TABLE.fullmatch(stmt)
    if m is None:
        raise ValueError(f"statement of tables.sql not understood by cluster mode (give it a rule in "
                         f"streams/sinks/cluster.py): {stmt.splitlines()[0]!r}")
    db, table, columns, engine, args, tail = m.groups()
    o = _ORDER_BY.search(tail)
    if o is None:
        raise ValueError(f"table {table}: cluster mode needs ORDER BY (col, …) to choose its sharding key")
    order_by = tuple(c.strip() for c in o.group(1).split(","))
    return TableSpec(db, table, columns, engine, args or "", tail, order_by)


def _replicated_tail(tail: str) -> str:
    """``tail`` without the single-node settings (and without SETTINGS when none is left)."""
    def settings(m: re.Match[str]) -> str:
        kept = [s.strip() for s in m.group(1).split(",")
                if s.split("=")[0].strip() not in _SINGLE_NODE_SETTINGS]
        return f"SETTINGS {', '.join(kept)}" if kept else ""

    return "\n".join(ln for ln in _SETTINGS.sub(settings, tail).splitlines() if ln.strip())


def sharding_key(spec: TableSpec) -> str:
    """``cityHash64(<columns>)`` of the table's :data:`SHARD_BY` rule, checked to use ORDER BY columns only."""
    cols = SHARD_BY.get(spec.table)
    if cols is None:
        raise ValueError(f"table {spec.table} has no sharding key for ClickHouse cluster mode: add it to "
                         "SHARD_BY in streams/sinks/cluster.py (ORDER BY columns only)")
    stray = [c for c in cols if c not in spec.order_by]
    if stray:
        raise ValueError(f"table {spec.table}: sharding columns {stray} are not in its ORDER BY "
                         f"{spec.order_by}: rows of one dedup group could land on different shards")
    return f"cityHash64({', '.join(cols)})"


def cluster_ddl_statements(single_node: list[str], cluster: str) -> list[str]:
    """The cluster-mode DDL for ``single_node`` (the statements of
    :func:`driftline.streams.sinks.clickhouse.ddl_statements`): the database and, per
    table, its Replicated ``<t>_local`` table and its Distributed ``<t>`` (module docstring);
    views (``trace_summary``) ``ON CLUSTER``, reading the Distributed tables: ``FINAL`` runs per
    shard, exact since llm_events is sharded by ``event_id`` (a row and its twin meet)."""
    ClusterMode(cluster)  # validates the name
    on = on_cluster(cluster)
    out: list[str] = []
    for stmt in single_node:
        db = re.fullmatch(r"CREATE DATABASE IF NOT EXISTS (\w+)", stmt)
        if db is not None:
            out.append(f"CREATE DATABASE IF NOT EXISTS {db.group(1)} ON CLUSTER {on}")
            continue
        view = re.fullmatch(r"CREATE OR REPLACE VIEW (\w+)\.(\w+) AS\n(.*)", stmt, re.DOTALL)
        if view is not None:  # a view over the Distributed tables (trace_summary): on every node
            out.append(f"CREATE OR REPLACE VIEW {view.group(1)}.{view.group(2)} ON CLUSTER {on} AS\n"
                       f"{view.group(3)}")
            continue
        spec = parse_table(stmt)
        local = f"{spec.table}_local"
        path = "/clickhouse/tables/{shard}/{database}/" + local
        args = f"'{path}', '{{replica}}'" + (f", {spec.engine_args}" if spec.engine_args else "")
        out.append(f"CREATE TABLE IF NOT EXISTS {spec.database}.{local} ON CLUSTER {on}\n{spec.columns}\n"
                   f"ENGINE = Replicated{spec.engine}({args})\n{_replicated_tail(spec.tail)}")
        out.append(f"CREATE TABLE IF NOT EXISTS {spec.database}.{spec.table} ON CLUSTER {on} "
                   f"AS {spec.database}.{local}\nENGINE = Distributed('{cluster}', '{spec.database}', "
                   f"'{local}', {sharding_key(spec)})")
    return out


def main(argv: list[str] | None = None) -> None:
    """Print the cluster DDL (and the retention ALTERs of 30/7 days on new tables):
    ``python -m driftline.streams.sinks.cluster --cluster c --database driftline``
    regenerates tests/golden/cluster_ddl.sql."""
    import argparse

    from driftline.streams.sinks.clickhouse import Retention, ddl_statements, retention_statements

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--cluster", required=True)
    p.add_argument("--database", default="driftline")
    a = p.parse_args(argv)
    stmts = cluster_ddl_statements(ddl_statements(a.database), a.cluster)
    stmts += retention_statements(a.database, {}, Retention(days=30, text_days=7), cluster=a.cluster)
    print("\n;\n".join(stmts))


if __name__ == "__main__":
    main()
