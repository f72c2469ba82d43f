"""``driftline sql``: one query against the configured ClickHouse.

For ``chdb:///path`` the store may be held by a running worker (a chDB path can
be opened by one process at a time): the worker then serves the ClickHouse HTTP
interface and wrote its address next to the store, so the query goes there.
Otherwise the store is opened directly.
"""

from __future__ import annotations

from urllib.parse import urlparse

from driftline.streams.chserver import READ_QUERY, read_endpoint
from driftline.streams.sinks import chdb_path

__all__ = ["run_sql", "client_for"]


def client_for(dsn: str):  # type: ignore[no-untyped-def]
    """A clickhouse-connect client for ``dsn``, going through a worker's endpoint when it holds chDB."""
    import clickhouse_connect

    path = chdb_path(dsn)
    if path is not None:
        url = read_endpoint(path)
        if url:
            u = urlparse(url)
            try:
                return clickhouse_connect.get_client(host=u.hostname, port=u.port, username="default",
                                                     password="", database="default", connect_timeout=2)
            except Exception:  # noqa: BLE001 - a stale endpoint file: open the store directly
                pass
        return clickhouse_connect.get_client(dsn=dsn)
    u = urlparse(dsn)
    return clickhouse_connect.get_client(
        host=u.hostname or "localhost", port=u.port or 8123, username=u.username or "default",
        password=u.password or "", database=u.path.strip("/") or "default",
        secure=u.scheme in ("https", "clickhouses"))


def run_sql(dsn: str, query: str, fmt: str = "PrettyCompactMonoBlock") -> bytes:
    c = client_for(dsn)
    try:
        if READ_QUERY.match(query):
            return bytes(c.raw_query(query, fmt=fmt))
        out = c.command(query)
        return b"" if out is None else f"{out}\n".encode()
    finally:
        c.close()
