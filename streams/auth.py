"""Credentials and HTTP authentication for driftline's HTTP surfaces.

Who may talk to the worker's HTTP ports:

- the ClickHouse HTTP endpoint over embedded chDB (streams/local/sql_endpoint.py) always
  asks for a user and password, on loopback too: any local process or web page
  could otherwise read every stored prompt and response;
  there is no switch to turn this off (no ``--sql-auth none``, not even on
  loopback): every client in the project finds the password by itself, and an
  escape hatch would be the setting copied from a forum answer;
- the worker's ``/metrics`` port asks for them only when it is bound to a
  non-loopback address (Prometheus scrapes loopback targets without
  credentials, and supports ``basic_auth`` in its scrape config when the port is
  exposed); ``/healthz`` and ``/ping`` stay open (liveness probes carry no
  credentials and answer nothing private).

Users: ``driftline`` (read-only queries), ``driftline_admin`` (data
maintenance when the worker runs with ``--sql-allow-writes``) and
``driftline_writer`` (other workers of the same machine writing to this
worker's store through an ``http://`` DSN, when it runs with
``--sql-allow-workers``: INSERT into the driftline tables and the schema
statements of ``ClickHouseSink.ensure_schema``, nothing else). Passwords are
drawn with :func:`secrets.token_urlsafe` on first start and kept, one
``user:password`` line each, in a file created with mode 0600 (``O_CREAT |
O_EXCL``, so it is never readable by others even for a moment): next to the
store for chDB (``<chdb path>/.driftline-credentials``, beside
``.driftline-endpoint``), else ``$XDG_DATA_HOME/driftline/credentials``. The
environment (``DRIFTLINE_SQL_PASSWORD``, ``DRIFTLINE_SQL_ADMIN_PASSWORD``,
``DRIFTLINE_SQL_WRITER_PASSWORD``) or a
password file given on the command line wins over the file. ``grep ^driftline:
FILE | sed 's/.*/user = "&"/' | curl -K - URL`` reads it without putting the
password on curl's argv (where ``ps`` shows it).

The middleware accepts what ClickHouse HTTP clients send: ``Authorization:
Basic``, ``X-ClickHouse-User``/``X-ClickHouse-Key`` headers, ``?user=&password=``
parameters; passwords are compared in constant time (:func:`hmac.compare_digest`)
and a refusal is ClickHouse's own ``Code: 516 … AUTHENTICATION_FAILED`` with
HTTP 401 and ``WWW-Authenticate: Basic realm="driftline"``. Against DNS
rebinding (a web page whose host name is re-pointed at 127.0.0.1 reads the
answers as same-origin), a ``GET`` must carry a ``Host`` that names the bound
address (or 127.0.0.1, localhost, [::1], with the port); a request with an
``Origin`` header (only browsers send one) must come from such a host too.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from aiohttp import web

log = logging.getLogger("driftline.auth")

__all__ = [
    "ADMIN_USER", "CREDENTIALS_FILE", "WRITER_USER", "Credentials", "HttpGuard", "USER", "USER_KEY", "allowed_hosts",
    "client_credentials", "credentials_path", "guard_for_bind", "is_loopback", "load_credentials",
    "require_auth_for_bind",
]

USER = "driftline"
ADMIN_USER = "driftline_admin"
#: other workers writing to this worker's store (``--sql-allow-workers``)
WRITER_USER = "driftline_writer"
CREDENTIALS_FILE = ".driftline-credentials"
ENV_PASSWORD = "DRIFTLINE_SQL_PASSWORD"
ENV_ADMIN_PASSWORD = "DRIFTLINE_SQL_ADMIN_PASSWORD"
ENV_WRITER_PASSWORD = "DRIFTLINE_SQL_WRITER_PASSWORD"
_ENV = {USER: ENV_PASSWORD, ADMIN_USER: ENV_ADMIN_PASSWORD, WRITER_USER: ENV_WRITER_PASSWORD}
REALM = "driftline"
#: the authenticated user, in ``request[USER_KEY]``
USER_KEY = web.RequestKey("driftline_user", str)


def _data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "driftline"


def credentials_path(chdb_path: str | os.PathLike[str] | None = None) -> Path:
    """Where the credentials live: next to a chDB store, else under the data home."""
    if chdb_path:
        return Path(chdb_path) / CREDENTIALS_FILE
    return _data_home() / "credentials"


@dataclass(frozen=True)
class Credentials:
    """Users and their passwords (``repr`` never shows a password).

    Parameters
    ----------
    users : mapping
        user name -> password; names are letters, digits and ``_``, passwords
        are at least 16 characters and hold no ``:`` or line break.
    source : str
        Where they came from (a path or an environment variable's name), for messages.
    """

    users: Mapping[str, str] = field(repr=False)
    source: str = ""

    def __post_init__(self) -> None:
        if not self.users:
            raise ValueError("credentials: no user")
        for user, pw in self.users.items():
            if not user or not user.replace("_", "").isalnum():
                raise ValueError(f"credentials: user name {user!r}: letters, digits and _ only")
            if len(pw) < 16:
                raise ValueError(f"credentials for {user} ({self.source}): the password must have at least "
                                 "16 characters")
            if any(ch in pw for ch in ":\r\n"):
                raise ValueError(f"credentials for {user} ({self.source}): the password may not hold ':' or "
                                 "a line break")

    def check(self, user: str | None, password: str | None) -> str | None:
        """The user when ``password`` is theirs (constant-time), else None."""
        expected = self.users.get(user or "")
        # compare against something of the same kind when the user is unknown, so the
        # answer takes as long as for a known user with a wrong password
        ok = hmac.compare_digest((password or "").encode(), (expected or "\0" * 43).encode())
        return user if ok and expected is not None else None


def _parse_file(text: str) -> dict[str, str]:
    users: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, pw = line.partition(":")
        if sep:
            users[user.strip()] = pw.strip()
    return users


def _render(users: Mapping[str, str]) -> bytes:
    head = ("# driftline HTTP credentials (user:password), created by the worker; keep this file 0600.\n"
            "# grep ^driftline: THIS_FILE | sed 's/.*/user = \"&\"/' | curl -K - 'http://127.0.0.1:8123/?query=SELECT+1'\n")
    return (head + "".join(f"{u}:{p}\n" for u, p in users.items())).encode()


def _write_new(path: Path, users: Mapping[str, str]) -> None:
    """Create ``path`` with mode 0600 atomically: written under a private temporary
    name (O_EXCL, 0600 from the first byte), then linked into place without
    replacing an existing file (a concurrent first start keeps the winner's)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new chDB store dir: private (sinks.py)
    tmp = _private_tmp(path, users)
    try:
        os.link(tmp, path)  # fails if another process created it first
    finally:
        tmp.unlink()


def _replace(path: Path, users: Mapping[str, str]) -> None:
    """Rewrite an existing credentials file (a user added) atomically, still 0600."""
    os.replace(_private_tmp(path, users), path)


def _private_tmp(path: Path, users: Mapping[str, str]) -> Path:
    """``users`` written and synced to a new 0600 file beside ``path`` (O_EXCL)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, _render(users))
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def _read_private(path: Path) -> dict[str, str]:
    st = path.stat()
    if st.st_mode & 0o077:
        raise ValueError(f"credentials file {path} is readable or writable by others "
                         f"(mode {st.st_mode & 0o777:04o}): run chmod 600 {path}")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise ValueError(f"credentials file {path} belongs to another user (uid {st.st_uid})")
    return _parse_file(path.read_text())


def load_credentials(path: Path, *, users: Iterable[str] = (USER, ADMIN_USER),
                     password_file: Path | None = None,
                     environ: Mapping[str, str] | None = None) -> Credentials:
    """The server side: the credentials of ``users``, created on first start.

    ``DRIFTLINE_SQL_PASSWORD`` / ``DRIFTLINE_SQL_ADMIN_PASSWORD`` or
    ``password_file`` (the ``driftline`` password, one line) win; a user with
    neither gets a generated password kept in ``path`` (created 0600, reused on
    restart). Raises ValueError when ``path`` is readable by others.
    """
    env = os.environ if environ is None else environ
    wanted = list(dict.fromkeys(users))
    given: dict[str, str] = {}
    if password_file is not None:
        try:
            given[USER] = password_file.read_text().strip()
        except OSError as exc:
            raise ValueError(f"--sql-password-file {password_file}: {exc.strerror}") from None
    for user in wanted:
        if user not in given and env.get(_ENV.get(user, "")):
            given[user] = env[_ENV[user]].strip()
    stored: dict[str, str] = {}
    for attempt in range(20):
        try:
            stored = _read_private(path)
            break
        except FileNotFoundError:
            pass
        missing = {u: secrets.token_urlsafe(24) for u in wanted if u not in given}
        if not missing:
            break
        try:
            _write_new(path, missing)
            log.info("generated HTTP credentials for %s in %s (mode 0600)", ", ".join(missing), path)
            stored = missing
            break
        except FileExistsError:
            time.sleep(0.05 * (attempt + 1))  # a concurrent first start: read what it wrote
    lacking = {u: secrets.token_urlsafe(24) for u in wanted if u not in given and u not in stored}
    if lacking:  # a file from an older version or trimmed by hand
        stored = {**stored, **lacking}
        _replace(path, stored)
        log.info("added HTTP credentials for %s to %s", ", ".join(lacking), path)
    merged = {u: given.get(u) or stored[u] for u in wanted}
    return Credentials(merged, source=str(path))


def client_credentials(chdb_path: str | os.PathLike[str] | None, user: str = USER,
                       environ: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """The client side: ``(user, password)`` from the environment or the credentials
    file next to the store (None when neither has one). Never creates anything."""
    env = os.environ if environ is None else environ
    if env.get(_ENV.get(user, "")):
        return user, env[_ENV[user]].strip()
    path = credentials_path(chdb_path)
    try:  # the mode is the worker's to enforce; a client reads what it is allowed to (root, a group)
        pw = _parse_file(path.read_text()).get(user)
    except (OSError, UnicodeDecodeError):
        return None
    return (user, pw) if pw else None


# -- the bind address ---------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only accepts local connections."""
    h = host.strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def require_auth_for_bind(bind: str, credentials: Credentials | None, what: str) -> None:
    """Refuse to serve ``what`` without authentication on a non-loopback address
    (there is no way around this: anyone on the network could read it)."""
    if credentials is None and not is_loopback(bind):
        raise ValueError(f"{what}: binding {bind} (not a loopback address) needs authentication; "
                         "driftline never serves an unauthenticated port beyond this host")


def allowed_hosts(bind: str, port: int, extra: Iterable[str] = ()) -> frozenset[str]:
    """``Host`` header values a browser sends for this server: the bound address,
    127.0.0.1, localhost and [::1] with the port (and without it on port 80); on a
    wildcard bind also this machine's host names; plus ``extra`` (``name`` or
    ``name:port``)."""
    names = {"127.0.0.1", "localhost", "[::1]"}
    b = bind.strip("[]")
    if b in ("0.0.0.0", "::", ""):
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    elif ":" in b:
        names.add(f"[{b.lower()}]")
    else:
        names.add(b.lower())
    out: set[str] = set()
    for n in names:
        out.add(f"{n}:{port}")
        if port == 80:
            out.add(n)
    for e in extra:
        e = e.strip().lower()
        if e:
            out.add(e if (e.rsplit(":", 1)[-1].isdigit() and not e.endswith("]")) else f"{e}:{port}")
    return frozenset(out)


# -- the middleware -----------------------------------------------------------------

def _request_credentials(request: web.Request) -> tuple[str | None, str | None] | None:
    """(user, password) as a ClickHouse client sent them, or None when it sent none."""
    header = request.headers.get("Authorization", "")
    if header[:6].lower() == "basic ":
        try:
            user, _, pw = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None, None
        return user, pw
    if "X-ClickHouse-User" in request.headers or "X-ClickHouse-Key" in request.headers:
        return request.headers.get("X-ClickHouse-User") or "default", request.headers.get("X-ClickHouse-Key", "")
    if "user" in request.query or "password" in request.query:
        return request.query.get("user") or "default", request.query.get("password", "")
    return None


def clickhouse_error(status: int, code: int, message: str, name: str,
                     headers: Mapping[str, str] | None = None) -> web.Response:
    """A ClickHouse-style error answer: ``Code: N. DB::Exception: message. (NAME)``."""
    return web.Response(status=status, text=f"Code: {code}. DB::Exception: {message}. ({name})\n",
                        headers={"X-ClickHouse-Exception-Code": str(code), **(headers or {})})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class HttpGuard:
    """Authentication and Host/Origin checks for one aiohttp application.

    Parameters
    ----------
    credentials : Credentials or None
        Who may call; None only on a loopback bind (see :func:`require_auth_for_bind`).
    hosts : frozenset of str or None
        Allowed ``Host`` values for ``GET`` (and allowed ``Origin`` hosts); None: no check.
    protect : callable
        Which requests need credentials (default: all but ``/ping`` and ``/healthz``).
    on_failure : callable, optional
        Called once per refused request with the reason (``"auth"`` or ``"host"``), e.g. a
        Prometheus counter's ``inc``.
    """

    credentials: Credentials | None
    hosts: frozenset[str] | None = None
    protect: Callable[[web.Request], bool] = field(
        default=lambda r: r.path not in ("/ping", "/healthz"))
    on_failure: Callable[[str], None] | None = None
    failures: dict[str, int] = field(default_factory=lambda: {"auth": 0, "host": 0})

    def _fail(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1
        if self.on_failure is not None:
            self.on_failure(reason)

    def _host_ok(self, request: web.Request) -> web.Response | None:
        if self.hosts is None:
            return None
        origin = request.headers.get("Origin")
        if origin is not None:
            o = urlparse(origin)
            netloc = (o.netloc or origin).lower()
            if o.port is None and o.hostname:
                netloc = f"{netloc}:{443 if o.scheme == 'https' else 80}"
            if netloc not in self.hosts:
                self._fail("host")
                return clickhouse_error(403, 497, "requests from web pages of other origins are refused",
                                        "ACCESS_DENIED")
        if request.method in ("GET", "HEAD"):
            host = (request.headers.get("Host") or "").lower()
            if host not in self.hosts:
                self._fail("host")
                return clickhouse_error(
                    403, 497, f"Host {host[:100]!r} is not a name of this server (DNS rebinding protection); "
                              "connect to 127.0.0.1 or the bound address", "ACCESS_DENIED")
        return None

    def authenticate(self, request: web.Request) -> str | None:
        """The authenticated user of ``request``, or None."""
        if self.credentials is None:
            return None
        sent = _request_credentials(request)
        if sent is None:
            return None
        return self.credentials.check(*sent)

    @property
    def middleware(self) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
        @web.middleware
        async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
            refused = self._host_ok(request)
            if refused is not None:
                return refused
            if self.credentials is not None and self.protect(request):
                user = self.authenticate(request)
                if user is None:
                    self._fail("auth")
                    return clickhouse_error(
                        401, 516, f"{REALM}: Authentication failed: password is incorrect, or there is no "
                                  "user with such name", "AUTHENTICATION_FAILED",
                        headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'})
                request[USER_KEY] = user
            return await handler(request)

        return guard


def guard_for_bind(bind: str, credentials: Credentials | None,
                   on_failure: Callable[[str], None] | None = None, *,
                   always: Iterable[str] = ()) -> HttpGuard:
    """The guard of a port like the worker's ``/metrics``: on loopback no password but
    only this server's own names as ``Host`` (set :attr:`HttpGuard.hosts` with
    :func:`allowed_hosts` once the port is known); anywhere else ``credentials``,
    required (ValueError without them). ``always``: path prefixes that need the
    password on loopback too (a page showing stored data, e.g. ``/ui``)."""
    prefixes = tuple(always)
    if prefixes and credentials is None:
        raise ValueError(f"{', '.join(prefixes)}: served only with authentication")
    open_paths = ("/ping", "/healthz")
    if is_loopback(bind):
        return HttpGuard(credentials if prefixes else None, on_failure=on_failure,
                         protect=lambda r: r.path.startswith(prefixes) if prefixes else False)
    require_auth_for_bind(bind, credentials, f"the HTTP port on {bind}")
    return HttpGuard(credentials, on_failure=on_failure, protect=lambda r: r.path not in open_paths)
