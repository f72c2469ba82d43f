"""``driftline baseline``: show drift references, and ask the workers to rebase, pin or reset them.

Why commands go through Kafka: a reference lives in the worker's memory (fitted
detectors, the current window) *and* in ClickHouse (``drift_references``). Only
the worker that owns a key can change both consistently, and the embedded chDB
store is held by the worker anyway. So ``rebase`` / ``pin`` / ``reset`` produce a
JSON command with a fresh ``id`` to the ``driftline.control`` topic; every
worker's drift stage consumes that topic (no consumer group: each sees every
command), applies it to the matching keys, and logs it in ``drift_control_log``
(``n_references`` = how many it made; the new ``drift_references`` rows carry the
``control_id``). A worker that is down when the command is sent applies it when
it starts. ``show`` is a plain query, through the worker's ClickHouse HTTP
endpoint when it holds chDB (like ``driftline sql``).

Command: ``{"cmd": "baseline", "id": …, "action": "rebase" | "pin" | "reset", "app": …,
"model": …, "prompt_version": …, "field": …, "from_ms": …, "to_ms": …, "note": …}``;
``None`` filters match everything. ``rebase`` without a range takes the latest
``ref_size`` samples ("what we see now is normal"); with ``from_ms``/``to_ms`` the
samples of that event-time range (evenly thinned to ``ref_size``). ``pin`` is a
rebase to a range that must be given. ``reset`` drops the reference: the next
``ref_size`` samples make a new one.

``load`` (a golden set as the reference) is streams/cli/golden.py.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from driftline.schemas.topics import CONTROL_TOPIC

if TYPE_CHECKING:
    from driftline.streams.ingest.kafka_security import KafkaSecurity

__all__ = ["send_command", "show_references", "wait_applied", "golden_keys", "golden_stored", "SHOW_SQL"]

SHOW_SQL = (
    "SELECT app, model, prompt_version, field, version, mode, n, "
    "formatDateTime(from_ts, '%Y-%m-%d %H:%i:%S') AS ref_from, formatDateTime(to_ts, '%Y-%m-%d %H:%i:%S') AS ref_to, "
    "control_id, formatDateTime(created_at, '%Y-%m-%d %H:%i:%S') AS created, note "
    "FROM {db}.drift_references "
    # GLOBAL IN: in ClickHouse cluster mode both tables are Distributed, and a plain IN of a
    # Distributed table inside a query on one is refused (distributed_product_mode = 'deny');
    # GLOBAL runs the subquery once on the initiator (on one node it is a plain IN)
    "WHERE (app, model, prompt_version, field, version) GLOBAL IN "
    "(SELECT app, model, prompt_version, field, max(version) FROM {db}.drift_references "
    "GROUP BY app, model, prompt_version, field) {where}"
    "ORDER BY app, model, prompt_version, field"
)


def send_command(kafka: str, cmd: dict[str, Any], topic: str = CONTROL_TOPIC, timeout: float = 30.0, *,
                 security: KafkaSecurity | None = None, secret: bytes | None = None) -> str:
    """Produce one baseline command; returns its id (the worker logs it when applied).

    ``security``: TLS / SASL of the producer; ``secret``: sign the command (HMAC-SHA256,
    see :mod:`driftline.streams.ingest.control_auth`): workers configured with the same secret
    refuse commands without a valid signature.
    """
    import uuid

    from kafka import KafkaProducer

    from driftline.streams.ingest.control_auth import sign_command

    body = {"cmd": "baseline", "id": uuid.uuid4().hex, "sent_at_ms": int(time.time() * 1000), **cmd}
    if secret is not None:
        body = sign_command(body, secret)
    p = KafkaProducer(bootstrap_servers=kafka, acks="all",
                      **(security.kafka_python_kwargs() if security is not None else {}))
    try:
        p.send(topic, json.dumps(body).encode()).get(timeout=timeout)
        p.flush(timeout)
        return str(body["id"])
    finally:
        p.close(timeout=5)


def _where(app: str | None, model: str | None, prompt_version: str | None,
           field: str | None) -> tuple[str, dict[str, str]]:
    """The key filter as ``{name:String}`` placeholders and their values."""
    conds, params = [], {}
    for col, v in (("app", app), ("model", model), ("prompt_version", prompt_version), ("field", field)):
        if v is not None:
            conds.append(f"{col} = {{{col}:String}}")
            params[col] = v
    return (("AND " + " AND ".join(conds) + " ") if conds else ""), params


def show_references(dsn: str, *, app: str | None = None, model: str | None = None,
                    prompt_version: str | None = None, field: str | None = None,
                    fmt: str = "PrettyCompactMonoBlock") -> bytes:
    """The reference in force per key and field, formatted by ClickHouse."""
    from driftline.streams.cli.sql import run_sql
    from driftline.streams.sinks.clickhouse import resolve_dsn

    _, db = resolve_dsn(dsn)
    where, params = _where(app, model, prompt_version, field)
    return run_sql(dsn, SHOW_SQL.format(db=db, where=where), fmt=fmt, parameters=params)


def wait_applied(dsn: str, control_id: str, timeout: float) -> int | None:
    """Wait until a worker logged the command ``control_id``; returns the references it made
    (0: it matched no key with samples; None: not applied before the timeout). Raises the
    last error when no read of the store succeeded before the timeout (a store it cannot
    reach is not "no worker applied it")."""
    from driftline.streams.cli.sql import run_sql
    from driftline.streams.sinks.clickhouse import resolve_dsn

    _, db = resolve_dsn(dsn)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            out = run_sql(dsn, f"SELECT max(n_references), count() FROM {db}.drift_control_log "
                               "WHERE control_id = {cid:String}", fmt="TabSeparated",
                          parameters={"cid": control_id})
            n, seen = (int(x) for x in out.split())
            last = None
            if seen:
                return n
        except Exception as exc:  # noqa: BLE001 - store busy or not there yet: retry until the deadline
            last = exc
        if time.monotonic() > deadline:
            if last is not None:
                raise RuntimeError(f"could not read drift_control_log: {last}") from last
            return None
        time.sleep(0.5)


def golden_keys(dsn: str, golden_id: str) -> list[tuple[str, str, str, str]]:
    """The (app, model, prompt_version, field) whose references are the golden set ``golden_id``."""
    from driftline.streams.cli.sql import run_sql
    from driftline.streams.sinks.clickhouse import resolve_dsn

    _, db = resolve_dsn(dsn)
    out = run_sql(dsn, f"SELECT DISTINCT app, model, prompt_version, field FROM {db}.drift_references "
                       "WHERE mode = 'golden' AND control_id = {gid:String} ORDER BY app, model, prompt_version, field",
                  fmt="TabSeparated", parameters={"gid": golden_id}).decode()
    return [tuple(line.split("\t")) for line in out.splitlines() if line]  # type: ignore[misc]


def golden_stored(dsn: str, golden_id: str) -> int:
    """The texts of the golden set ``golden_id`` stored in ``drift_golden`` (distinct indices,
    whatever the embedding model). A worker that could not put the set together (parts
    missing or altered) logs its command all the same, with 0 references: this tells the two
    apart."""
    from driftline.streams.cli.sql import run_sql
    from driftline.streams.sinks.clickhouse import resolve_dsn

    _, db = resolve_dsn(dsn)
    out = run_sql(dsn, f"SELECT uniqExact(idx) FROM {db}.drift_golden WHERE golden_id = {{gid:String}}",
                  fmt="TabSeparated", parameters={"gid": golden_id})
    return int(out.split()[0])
