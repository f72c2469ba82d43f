"""Keeping secrets out of logs, errors and metrics, and reading them from env or files.

- :func:`redact_url` masks what a URL carries that grants access: the password of
  its userinfo, query parameters named like a credential (``password``, ``token``,
  ``key``, ``secret``, ``sig`` …), and the path of known webhook hosts (Slack,
  Discord, Mattermost, Teams), whose path *is* the token. Every log line, error
  and metric label that names a ClickHouse DSN or a webhook URL goes through it.
- :class:`SecretFilter` is the backstop: a ``logging.Filter`` that the CLI puts on
  the root handlers, replacing any configured secret value (the DSN password,
  whole webhook URLs, tokens) that still reaches a log message or its arguments.
- :func:`read_urls` / :func:`merge_password` let the worker take DSN passwords and
  webhook URLs from the environment or from files instead of argv (where ``ps``
  and shell history would show them).

Examples
--------
>>> redact_url("http://default:S3cret@ch.local:8123/driftline")
'http://default:***@ch.local:8123/driftline'
>>> redact_url("https://hooks.slack.com/services/T000/B000/XXXX")
'https://hooks.slack.com/services/***'
>>> redact_url("http://am:9093/api?token=abc&x=1")
'http://am:9093/api?token=***&x=1'
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

__all__ = ["MASK", "SecretFilter", "install_secret_filter", "merge_password", "read_urls",
           "redact_url", "redact_urls_in", "secrets_of_url"]

MASK = "***"

#: query parameter names (lower-cased, compared by substring) whose values are credentials
_SECRET_PARAMS = ("password", "passwd", "pwd", "token", "key", "secret", "sig", "signature",
                  "auth", "credential", "session")

#: hosts (suffixes) whose webhook URL path is itself the credential: only the first path
#: segment(s) named here are kept
_WEBHOOK_HOSTS: dict[str, str] = {
    "hooks.slack.com": "/services/",
    "hooks.slack-gov.com": "/services/",
    "discord.com": "/api/webhooks/",
    "discordapp.com": "/api/webhooks/",
    "webhook.office.com": "/",
    "outlook.office.com": "/webhook/",
}

#: a Mattermost/Slack-compatible incoming-webhook path on any host: ``/hooks/<id>``,
#: ``/services/<T>/<B>/<token>``
_HOOK_PATH = re.compile(r"^(/(?:hooks|services)/)[^?#]+")

_URL_IN_TEXT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]{1,15}://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """``url`` with its credentials masked (never raises; a string that does not parse
    as a URL with a scheme is returned masked whole when it has userinfo).

    Masked: the password in ``user:password@``; the values of query parameters whose
    name contains ``password``, ``token``, ``key``, ``secret``, ``sig``, ``auth`` …;
    the path of Slack/Discord/Teams webhooks after their fixed prefix, and any
    ``/hooks/…`` or ``/services/…`` path (Mattermost and Slack-compatible
    receivers), since that path is the token.
    """
    try:
        u = urlsplit(url)
    except ValueError:
        return MASK
    if not u.scheme or not u.netloc:
        return url if "@" not in url else MASK
    netloc = u.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, sep, _pw = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hostport}" if sep else f"{user}@{hostport}"
    host = (u.hostname or "").lower()
    path = u.path
    for suffix, prefix in _WEBHOOK_HOSTS.items():
        if (host == suffix or host.endswith("." + suffix)) and path.startswith(prefix):
            path = prefix + MASK if len(path) > len(prefix) else path
            break
    else:
        m = _HOOK_PATH.match(path)
        if m is not None:
            path = m.group(1) + MASK
    query = u.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_secret_param(k) for k, _ in pairs):
            query = urlencode([(k, MASK if _secret_param(k) else v) for k, v in pairs], safe="*")
    fragment = MASK if u.fragment and "=" in u.fragment else u.fragment
    return urlunsplit((u.scheme, netloc, path, query, fragment))


def _secret_param(name: str) -> bool:
    n = name.lower()
    return any(s in n for s in _SECRET_PARAMS)


def redact_urls_in(text: str) -> str:
    """``text`` with every URL in it passed through :func:`redact_url` (for exception
    messages that quote a URL)."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def secrets_of_url(url: str) -> list[str]:
    """The secret values ``url`` carries (what :func:`redact_url` masks), longest first,
    for :class:`SecretFilter`; the whole URL too when anything in it is secret."""
    out: set[str] = set()
    try:
        u = urlsplit(url)
    except ValueError:
        return [url] if url else []
    if u.password:
        out.add(u.password)
        out.add(quote(u.password, safe=""))
        out.add(unquote(u.password))  # what the client sends (the sink unquotes it)
    for k, v in parse_qsl(u.query, keep_blank_values=True):
        if v and _secret_param(k):
            out.add(v)
    masked = redact_url(url)
    if masked != url:
        out.add(url)
        kept = set(urlsplit(masked).path.split("/"))
        # the webhook path (the token): its masked segments, wherever they appear
        out.update(seg for seg in u.path.split("/") if len(seg) >= 8 and seg not in kept)
    return sorted((s for s in out if len(s) >= 4), key=len, reverse=True)


class SecretFilter(logging.Filter):
    """Masks configured secret values in every record that passes (a backstop behind
    :func:`redact_url` at the call sites): the message, its arguments and the
    formatted exception. Never drops a record."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Mask these values too (values shorter than 4 characters are ignored: masking
        them would garble ordinary text)."""
        got = set(self._secrets) | {s for s in secrets if s and len(s) >= 4}
        self._secrets = sorted(got, key=len, reverse=True)

    def _mask(self, s: str) -> str:
        for v in self._secrets:
            if v in s:
                s = s.replace(v, MASK)
        return s

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: leave it to logging
            return True
        masked = self._mask(msg)
        if masked != msg:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._mask(record.exc_text)
        return True


def install_secret_filter(secrets: Iterable[str]) -> SecretFilter:
    """Put one :class:`SecretFilter` on every handler of the root logger (the CLI calls
    this after ``logging.basicConfig``); a second call adds to the same filter."""
    root = logging.getLogger()
    found: SecretFilter | None = None
    for h in root.handlers:
        for f in h.filters:
            if isinstance(f, SecretFilter):
                found = f
    flt = found or SecretFilter()
    flt.add(secrets)
    for h in root.handlers:
        if flt not in h.filters:
            h.addFilter(flt)
    return flt


def read_urls(values: Sequence[str] | None, env: str) -> list[str]:
    """URLs from a repeatable flag, each ``URL`` or ``@/path/file`` (one URL per line;
    blank lines and ``#`` comments skipped), else from the environment variable
    ``env`` (space-separated; ``@/path`` entries read the same way).

    Raises
    ------
    ValueError
        A file that cannot be read (the message names the file, never its contents).
    """
    items = list(values) if values else os.environ.get(env, "").split()
    out: list[str] = []
    for item in items:
        if item.startswith("@"):
            p = Path(item[1:]).expanduser()
            try:
                text = p.read_text()
            except OSError as exc:
                raise ValueError(f"cannot read URLs from {p}: {exc.strerror or exc}") from None
            out += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        elif item.strip():
            out.append(item.strip())
    return out


def merge_password(dsn: str, password: str | None) -> str:
    """``dsn`` (``http(s)://[user[:pw]@]host…``) with ``password`` put in its userinfo
    (URL-quoted; a password already there is replaced). ``chdb://`` DSNs and a None or
    empty password are returned unchanged. In memory only: the result is never logged
    (log :func:`redact_url` of it)."""
    if not password:
        return dsn
    u = urlsplit(dsn)
    if u.scheme == "chdb" or not u.netloc:
        return dsn
    hostport = u.netloc.rpartition("@")[2]
    user = u.username or "default"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{hostport}"
    return urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment))


def read_password(file: Path | None, env: str) -> str | None:
    """A password from ``file`` (its first line, trailing newline stripped), else from
    the environment variable ``env``; None when neither is set."""
    if file is not None:
        try:
            lines = file.expanduser().read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read the password file {file}: {exc.strerror or exc}") from None
        return lines[0] if lines else ""
    return os.environ.get(env) or None
