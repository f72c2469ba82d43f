"""streams/auth.py: bind rules, Host names, credentials and the guard of the worker's /metrics port.

The guard runs in a real aiohttp test server on 127.0.0.1; the bind address it was
built for is what changes its behaviour (nothing binds beyond loopback here).
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from driftline.streams.auth import (
    ADMIN_USER,
    USER,
    Credentials,
    allowed_hosts,
    client_credentials,
    credentials_path,
    guard_for_bind,
    is_loopback,
    load_credentials,
    require_auth_for_bind,
)
from driftline.streams.local.sql_endpoint import EndpointLimits, EndpointOptions

CREDS = Credentials({USER: "p" * 32}, source="test")


@pytest.mark.parametrize(("host", "loop"), [
    ("127.0.0.1", True), ("127.0.0.53", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("example.org", False), ("", False),
])
def test_is_loopback(host: str, loop: bool) -> None:
    assert is_loopback(host) is loop


def test_non_loopback_bind_without_auth_is_refused() -> None:
    # mutation caught: require_auth_for_bind letting any bind pass (an open port on the network)
    for bind in ("0.0.0.0", "::", "192.168.1.5", "worker.example"):
        with pytest.raises(ValueError, match="needs authentication"):
            require_auth_for_bind(bind, None, "the SQL endpoint")
        with pytest.raises(ValueError, match="needs authentication"):
            guard_for_bind(bind, None)
        assert guard_for_bind(bind, CREDS).credentials is CREDS
    require_auth_for_bind("127.0.0.1", None, "the SQL endpoint")
    assert guard_for_bind("127.0.0.1", CREDS).credentials is None  # loopback /metrics: Prometheus, no password


def _app(guard_bind: str) -> tuple[web.Application, dict[str, int]]:
    guard = guard_for_bind(guard_bind, CREDS)

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(middlewares=[guard.middleware])
    app.router.add_get("/metrics", ok)
    app.router.add_get("/healthz", ok)
    return app, guard.failures


async def test_metrics_guard_asks_for_a_password_only_off_loopback() -> None:
    # mutations caught: /metrics served without a password on an exposed bind; /healthz locked
    # (probes carry no credentials); a Basic password not read
    app, failures = _app("0.0.0.0")
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        r = await client.get("/metrics")
        assert r.status == 401 and r.headers["WWW-Authenticate"].startswith('Basic realm="driftline"')
        assert (await client.get("/healthz")).status == 200
        good = "Basic " + base64.b64encode(f"{USER}:{'p' * 32}".encode()).decode()
        assert (await client.get("/metrics", headers={"Authorization": good})).status == 200
        bad = "Basic " + base64.b64encode(f"{USER}:{'q' * 32}".encode()).decode()
        assert (await client.get("/metrics", headers={"Authorization": bad})).status == 401
        assert (await client.get("/metrics", headers={"Authorization": "Basic !!notbase64"})).status == 401
    assert failures["auth"] == 3
    app, failures = _app("127.0.0.1")
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        assert (await client.get("/metrics")).status == 200


async def test_pages_with_data_need_the_password_on_loopback_too() -> None:
    # the reuse for /ui: mutation caught: `always` ignored on loopback (the page open to any local process)
    guard = guard_for_bind("127.0.0.1", CREDS, always=["/ui"])

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(middlewares=[guard.middleware])
    for route in ("/metrics", "/ui", "/ui/data"):
        app.router.add_get(route, ok)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        assert [(await client.get(p)).status for p in ("/metrics", "/ui", "/ui/data")] == [200, 401, 401]
        good = "Basic " + base64.b64encode(f"{USER}:{'p' * 32}".encode()).decode()
        assert (await client.get("/ui", headers={"Authorization": good})).status == 200
    with pytest.raises(ValueError, match="only with authentication"):
        guard_for_bind("127.0.0.1", None, always=["/ui"])


def test_allowed_hosts() -> None:
    h = allowed_hosts("127.0.0.1", 8123, ["sql.example", "other.example:443"])
    assert {"127.0.0.1:8123", "localhost:8123", "[::1]:8123", "sql.example:8123", "other.example:443"} <= h
    assert "127.0.0.1" not in h and "evil.example:8123" not in h
    assert "[::1]:9" in allowed_hosts("::1", 9)
    assert "localhost" in allowed_hosts("127.0.0.1", 80)


def test_credentials_validation_and_check() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        Credentials({USER: "short"})
    with pytest.raises(ValueError, match="may not hold"):
        Credentials({USER: "a" * 20 + ":b"})
    with pytest.raises(ValueError, match="letters, digits"):
        Credentials({"bad user": "a" * 20})
    assert CREDS.check(USER, "p" * 32) == USER
    assert CREDS.check(USER, "p" * 31) is None
    assert CREDS.check("nobody", "p" * 32) is None
    assert CREDS.check(None, None) is None
    assert "p" * 32 not in repr(CREDS)


def test_credentials_file_created_0600_and_found_by_clients(tmp_path: Path) -> None:
    # mutations caught: a world-readable file; clients not finding the password the worker made;
    # a second start drawing new passwords
    old_umask = os.umask(0o022)  # the usual umask: a plain open() would make the file 0644
    try:
        store = tmp_path / "chdb"
        f = credentials_path(store)
        assert f == store / ".driftline-credentials"
        made = load_credentials(f, environ={})
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert set(made.users) == {USER, ADMIN_USER} and len(set(made.users.values())) == 2
    assert load_credentials(f, environ={}).users == made.users
    assert client_credentials(store, environ={}) == (USER, made.users[USER])
    assert client_credentials(store, ADMIN_USER, environ={}) == (ADMIN_USER, made.users[ADMIN_USER])
    assert client_credentials(store, environ={"DRIFTLINE_SQL_PASSWORD": "e" * 20}) == (USER, "e" * 20)
    assert client_credentials(tmp_path / "elsewhere", environ={}) is None
    # a password file wins for user driftline; the admin keeps the generated one
    pw = tmp_path / "pw"
    pw.write_text("from-a-file-0123456789\n")
    given = load_credentials(f, password_file=pw, environ={})
    assert given.users == {USER: "from-a-file-0123456789", ADMIN_USER: made.users[ADMIN_USER]}
    # a file from before the admin user: the user is added, the file stays 0600
    g = tmp_path / "old" / "credentials"
    g.parent.mkdir()
    fd = os.open(g, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, f"{USER}:{'o' * 30}\n".encode())
    os.close(fd)
    upgraded = load_credentials(g, environ={})
    assert upgraded.users[USER] == "o" * 30 and len(upgraded.users[ADMIN_USER]) >= 16
    assert stat.S_IMODE(g.stat().st_mode) == 0o600


def test_endpoint_options_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_execution_time_s"):
        EndpointLimits(max_execution_time_s=0.5)
    with pytest.raises(ValueError, match="threads"):
        EndpointLimits(threads=0)
    with pytest.raises(ValueError, match="no such file"):
        EndpointOptions(password_file=tmp_path / "missing")
    assert EndpointLimits(max_execution_time_s=2).settings()["max_execution_time"] == "2"
    assert EndpointOptions().host == "127.0.0.1"
