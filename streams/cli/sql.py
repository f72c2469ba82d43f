"""``driftline sql``: one query against the configured ClickHouse.

For ``chdb:///path`` the store may be held by a running worker (a chDB path can
be opened by one process at a time): the worker then serves the ClickHouse HTTP
interface and wrote its address next to the store, so the query goes there,
as the user ``driftline`` with the password from ``DRIFTLINE_SQL_PASSWORD`` or
the worker's credentials file next to the store (streams/auth.py); a statement
that is not a read goes as ``driftline_admin`` when that user's password is
there (the worker runs it only with ``--sql-allow-writes``). Otherwise the store
is opened directly.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlparse

from driftline.streams.auth import ADMIN_USER, USER, client_credentials, credentials_path
from driftline.streams.local.sql_endpoint import READ_QUERY, read_endpoint
from driftline.streams.sinks.clickhouse import chdb_path

__all__ = ["run_sql", "client_for"]


def client_for(dsn: str, *, write: bool = False):  # type: ignore[no-untyped-def]
    """A clickhouse-connect client for ``dsn``, going through a worker's endpoint when it holds chDB
    (``write``: as the write role when its password is known)."""
    import clickhouse_connect
    from clickhouse_connect.driver.exceptions import DatabaseError

    path = chdb_path(dsn)
    if path is not None:
        url = read_endpoint(path)
        if url:
            u = urlparse(url)
            creds = (write and client_credentials(path, ADMIN_USER)) or client_credentials(path, USER)
            if creds is None:
                try:  # a stale endpoint file: the store may be free
                    return clickhouse_connect.get_client(dsn=dsn)
                except Exception:  # noqa: BLE001 - held by the worker: say what is missing
                    raise PermissionError(
                        f"a worker holds {path} and serves it on {url}, but no password was found: set "
                        f"DRIFTLINE_SQL_PASSWORD or make {credentials_path(path)} readable by this user") from None
            try:
                return clickhouse_connect.get_client(host=u.hostname, port=u.port, username=creds[0],
                                                     password=creds[1], database="default", connect_timeout=2)
            except DatabaseError:
                raise  # the worker answered (e.g. the password was refused): say so
            except Exception:  # noqa: BLE001 - a stale endpoint file: open the store directly
                pass
        return clickhouse_connect.get_client(dsn=dsn)
    u = urlparse(dsn)
    return clickhouse_connect.get_client(
        host=u.hostname or "localhost", port=u.port or 8123, username=unquote(u.username or "default"),
        password=unquote(u.password or ""), database=u.path.strip("/") or "default",
        secure=u.scheme in ("https", "clickhouses"))


def run_sql(dsn: str, query: str, fmt: str = "PrettyCompactMonoBlock",
            parameters: dict[str, Any] | None = None) -> bytes:
    """``query``'s result formatted by ClickHouse; ``parameters`` fill its
    ``{name:Type}`` placeholders (bound by the server, never quoted by us)."""
    c = client_for(dsn, write=not READ_QUERY.match(query))
    try:
        if READ_QUERY.match(query):
            return bytes(c.raw_query(query, parameters=parameters, fmt=fmt))
        out = c.command(query)
        return b"" if out is None else f"{out}\n".encode()
    finally:
        c.close()
