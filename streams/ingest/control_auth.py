"""Signed control commands: HMAC-SHA256 over the command, with a secret the senders and workers share.

Anyone who can write the Kafka topic ``driftline.control`` can flush the workers and
rebase, pin or reset drift references (for example to hide a drift). With a secret
configured (``DRIFTLINE_CONTROL_SECRET`` or ``--control-secret-file``), ``driftline
baseline rebase|pin|reset`` signs each command, and every worker refuses commands that
are unsigned or whose signature does not match, logs them (never with the secret) and
counts them in ``driftline_control_refused_total{reason}``. Without a secret, commands
are accepted as before and the worker says so once at start.

The signature covers the canonical JSON of the whole command (keys sorted, no spaces,
ASCII) except the ``sig`` field itself, so it binds the action, its filters and range,
its ``id`` and its ``sent_at_ms``. A command copied off the topic and sent again keeps
its ``id``, which the drift stage applies once (``drift_control_log``); an optional
maximum age refuses old copies outright (off by default, because a worker that was down
applies the commands it missed when it starts).

>>> secret = b"0123456789abcdef0123456789abcdef"
>>> cmd = sign_command({"cmd": "baseline", "action": "reset"}, secret, now_ms=1_000)
>>> verify_command(cmd, secret, now_ms=2_000) is None
True
>>> verify_command({**cmd, "action": "rebase"}, secret, now_ms=2_000)
'bad_signature'
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import reprlib
import time
import uuid
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any, Literal

__all__ = ["sign_command", "verify_command", "load_control_secret", "canonical", "SECRET_ENV",
           "MIN_SECRET_BYTES", "RefusedReason", "admit"]

log = logging.getLogger("driftline.control")

SECRET_ENV = "DRIFTLINE_CONTROL_SECRET"
SIG_FIELD = "sig"
SIG_PREFIX = "hmac-sha256:"
MIN_SECRET_BYTES = 16

#: why a command was refused (the ``reason`` label of ``driftline_control_refused_total``)
RefusedReason = Literal["unsigned", "bad_signature", "malformed", "too_old"]


def load_control_secret(secret_file: str | Path | None = None,
                        env: Mapping[str, str] | None = None) -> bytes | None:
    """The shared secret from ``secret_file`` (trailing newline dropped) or else
    ``$DRIFTLINE_CONTROL_SECRET``; None when neither is set.

    Raises
    ------
    ValueError
        When the file cannot be read or the secret is shorter than 16 bytes.
    """
    env = os.environ if env is None else env
    if secret_file:
        try:
            raw = Path(secret_file).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise ValueError(f"control secret file {str(secret_file)!r} is not readable: "
                             f"{exc.strerror or exc}") from None
    elif env.get(SECRET_ENV):
        raw = env[SECRET_ENV].encode()
    else:
        return None
    if len(raw) < MIN_SECRET_BYTES:
        raise ValueError(f"the control secret must be at least {MIN_SECRET_BYTES} bytes (make one with "
                         "`python -c 'import secrets; print(secrets.token_hex(32))'`)")
    return raw


def canonical(cmd: Mapping[str, Any]) -> bytes:
    """The bytes that are signed: the command without ``sig``, as sorted, compact, ASCII JSON."""
    body = {k: v for k, v in cmd.items() if k != SIG_FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def _mac(cmd: Mapping[str, Any], secret: bytes) -> str:
    return SIG_PREFIX + hmac.new(secret, canonical(cmd), hashlib.sha256).hexdigest()


def sign_command(cmd: Mapping[str, Any], secret: bytes, *, now_ms: int | None = None) -> dict[str, Any]:
    """A copy of ``cmd`` with an ``id`` and ``sent_at_ms`` (kept when present) and its ``sig``."""
    out = {k: v for k, v in cmd.items() if k != SIG_FIELD}
    out.setdefault("id", uuid.uuid4().hex)
    out.setdefault("sent_at_ms", int(time.time() * 1000) if now_ms is None else now_ms)
    out[SIG_FIELD] = _mac(out, secret)
    return out


def verify_command(cmd: Mapping[str, Any], secret: bytes, *, now_ms: int | None = None,
                   max_age_s: float | None = None) -> RefusedReason | None:
    """None when ``cmd`` carries a valid signature by ``secret``; else why it is refused.

    ``max_age_s``: also refuse commands sent more than this long before ``now_ms``
    (or more than that far in the future: a skewed or forged clock).
    """
    sig = cmd.get(SIG_FIELD)
    if sig is None:
        return "unsigned"
    if not isinstance(sig, str) or not isinstance(cmd.get("id"), str) or not isinstance(
            cmd.get("sent_at_ms"), int):
        return "malformed"
    try:
        want = _mac(cmd, secret)
    except (TypeError, ValueError, RecursionError):  # not JSON-serialisable (NaN …, nested too deep)
        return "malformed"
    if not hmac.compare_digest(sig.encode("utf-8", "replace"), want.encode()):
        return "bad_signature"
    if max_age_s is not None:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        if abs(now - int(cmd["sent_at_ms"])) > max_age_s * 1000:
            return "too_old"
    return None


def admit(cmd: Mapping[str, Any], secret: bytes | None, refused: MutableMapping[str, float], *,
          max_age_s: float | None = None, where: str = "control") -> bool:
    """The workers' gate: True when ``cmd`` may be applied (always without a secret);
    else counts ``refused[reason]`` and logs the refusal (command name, action and id
    only: never the secret, and no field of the command that could carry one)."""
    if secret is None:
        return True
    reason = verify_command(cmd, secret, max_age_s=max_age_s)
    if reason is None:
        return True
    refused[reason] = refused.get(reason, 0.0) + 1
    log.warning("%s: refused %s command (action %s, id %s): %s", where, _short(cmd.get("cmd")),
                _short(cmd.get("action")), _short(cmd.get("id")), _WHY[reason])
    return False


_WHY: dict[str, str] = {
    "unsigned": "unsigned, and a control secret is configured",
    "bad_signature": "its signature does not match (another secret, or the command was altered)",
    "malformed": "its signature, id or sent_at_ms has the wrong type",
    "too_old": "sent too long ago (or in the future)",
}


def _short(v: Any) -> str:
    s = v if isinstance(v, str) else reprlib.repr(v)  # bounded depth: a nested field cannot recurse
    return s[:64].encode("ascii", "backslashreplace").decode()
