"""Redaction of prompt and response text before it is stored or sent (``--redact``).

Three modes:

``none``
    The text as it came (the default; no work per event).
``pii``
    What the built-in scanners (:mod:`driftline.detectors.guardrails`, the ``pii``
    and ``secrets`` groups) find is replaced by a token naming its kind:
    ``<EMAIL>``, ``<CARD>`` (Luhn-valid card numbers), ``<SSN>``, ``<PHONE>``,
    ``<IBAN>``, and ``<SECRET>`` for API keys and tokens (OpenAI, Anthropic, AWS,
    GitHub, Slack, Google, Stripe) and private keys (the whole PEM block, up to its
    ``-----END … PRIVATE KEY-----`` line or the end of the text). The rest of the
    text is kept. These are heuristics: what the scanners miss (names, addresses,
    free-form identifiers) is kept too.
``hash``
    Only a digest of the text is kept: ``sha256:<64 hex>``, or, with a key
    (``DRIFTLINE_REDACT_KEY``), ``hmac-sha256:<64 hex>``. Without a key a short or
    guessable text (``"yes"``, a customer id) can be found again by hashing
    candidates; with a key it cannot, unless the key leaks. Equal texts still get
    equal digests (counting repeats, joining tables works).

Empty and missing texts stay as they are. Redacting an already-redacted text
changes nothing (a digest is not hashed again; tokens contain nothing to mask).

Examples
--------
>>> redact_text("mail jo@example.com, card 4111 1111 1111 1111", "pii")
'mail <EMAIL>, card <CARD>'
>>> redact_text("hello", "hash")
'sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824'
>>> Redaction("hash", key=b"k").text("hello")[:12]
'hmac-sha256:'
"""

from __future__ import annotations

import hashlib
import hmac
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .guardrails import GuardrailScanner

__all__ = ["REDACT_MODES", "RedactMode", "Redaction", "TOKENS", "fit_token", "hash_text", "mask_pii",
           "pii_spans", "redact_text", "redact_value"]

RedactMode = Literal["none", "pii", "hash"]
REDACT_MODES: tuple[RedactMode, ...] = get_args(RedactMode)

#: the token that replaces each kind of finding in ``pii`` mode (every ``secrets`` kind: ``<SECRET>``)
TOKENS: dict[str, str] = {
    "email": "<EMAIL>",
    "credit_card": "<CARD>",
    "ssn": "<SSN>",
    "phone": "<PHONE>",
    "iban": "<IBAN>",
}
SECRET_TOKEN = "<SECRET>"

_SCANNER = GuardrailScanner(enabled=("pii", "secrets"), max_chars=sys.maxsize)
_PEM = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----.*?"
                  r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)", re.DOTALL)
_DIGEST = re.compile(r"(?:sha256|hmac-sha256):[0-9a-f]{64}")


def pii_spans(text: str) -> list[tuple[int, int, str]]:
    """``(start, end, token)`` of every ``pii`` and ``secrets`` scanner finding in
    ``text``, in order, overlapping findings merged (the first one's kind names the
    merged span); a private key's span runs to its ``END`` line or the end of the text."""
    spans: list[tuple[int, int, str]] = []
    for h in _SCANNER.scan(text, "text"):
        start, end = h.start, h.end
        if h.kind == "private_key":
            m = _PEM.match(text, start)
            if m is not None:
                end = m.end()
        token = TOKENS.get(h.kind, SECRET_TOKEN) if h.scanner == "pii" else SECRET_TOKEN
        if spans and start < spans[-1][1]:
            s0, e0, t0 = spans[-1]
            spans[-1] = (s0, max(e0, end), t0)
        else:
            spans.append((start, end, token))
    return spans


def fit_token(token: str, n: int) -> str:
    """``token`` padded with ``*`` to ``n`` characters, or ``n`` stars when it is longer."""
    return token + "*" * (n - len(token)) if n >= len(token) else "*" * n


def mask_pii(text: str) -> str:
    """``text`` with every :func:`pii_spans` finding replaced by its token."""
    spans = pii_spans(text)
    if not spans:
        return text
    out: list[str] = []
    pos = 0
    for start, end, token in spans:
        out.append(text[pos:start])
        out.append(token)
        pos = end
    out.append(text[pos:])
    return "".join(out)


def hash_text(text: str | bytes, key: bytes | None = None) -> str:
    """``sha256:<hex>`` of the UTF-8 text (or of the bytes), or ``hmac-sha256:<hex>`` with ``key``."""
    data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    if key:
        return "hmac-sha256:" + hmac.new(key, data, hashlib.sha256).hexdigest()
    return "sha256:" + hashlib.sha256(data).hexdigest()


def redact_text(text: str | None, mode: RedactMode, key: bytes | None = None) -> str | None:
    """``text`` redacted per ``mode`` (see the module docstring); None and '' unchanged."""
    if not text or mode == "none":
        return text
    if mode == "pii":
        return mask_pii(text)
    if mode == "hash":
        return text if _DIGEST.fullmatch(text) else hash_text(text, key)
    raise ValueError(f"unknown redact mode {mode!r}; choose from {list(REDACT_MODES)}")


def redact_value(value: Any, mode: RedactMode, key: bytes | None = None) -> Any:
    """A JSON value redacted per ``mode``: a string as :func:`redact_text`; in ``pii``
    mode every string inside lists and objects is masked, in ``hash`` mode a list or
    object becomes the digest of its JSON text; numbers, booleans and null unchanged."""
    if isinstance(value, str):
        return redact_text(value, mode, key)
    if mode == "none" or value is None or isinstance(value, bool | int | float):
        return value
    if mode == "pii":
        if isinstance(value, list):
            return [redact_value(v, mode, key) for v in value]
        if isinstance(value, dict):
            return {k: redact_value(v, mode, key) for k, v in value.items()}
        return value
    import json

    return hash_text(json.dumps(value, sort_keys=True, ensure_ascii=False, default=str), key)


@dataclass(frozen=True)
class Redaction:
    """The redaction in force: ``mode`` and, for ``hash``, an optional HMAC ``key``
    (kept out of ``repr``).

    Raises
    ------
    ValueError
        An unknown mode, or a key given with a mode other than ``hash``.
    """

    mode: RedactMode = "none"
    key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in REDACT_MODES:
            raise ValueError(f"unknown redact mode {self.mode!r}; choose from {list(REDACT_MODES)}")
        if self.key is not None and not isinstance(self.key, bytes):
            raise ValueError("the redaction key must be bytes")

    @property
    def active(self) -> bool:
        """False for ``none``: callers skip all per-event work."""
        return self.mode != "none"

    def text(self, text: str | None) -> str | None:
        """:func:`redact_text` with this mode and key."""
        return redact_text(text, self.mode, self.key)

    def value(self, value: Any) -> Any:
        """:func:`redact_value` with this mode and key."""
        return redact_value(value, self.mode, self.key)
