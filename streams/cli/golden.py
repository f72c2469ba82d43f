"""``driftline baseline load``: a curated golden set as the drift reference of keys.

The file is JSONL: one object per line with the text under ``"text"`` (or under the
field's own name, ``"prompt"`` / ``"response"``, as ``--field`` says). Blank lines are
skipped. Every line is checked before anything is sent; one bad line and nothing is
sent (:class:`GoldenFileError` lists the bad lines, by number). Caps:
:data:`MAX_TEXTS` texts, :data:`MAX_TEXT_CHARS` characters per text.

What goes on the control topic (``driftline.control``, every worker reads all of it):
the texts in **parts** of at most :data:`PART_BYTES` of JSON each (Kafka refuses a
record over ``max.message.bytes``, 1 MiB by default), then one **golden** command::

    {"cmd": "baseline", "action": "golden_part", "id": "<gid>.<i>", "golden_id": gid,
     "i": i, "n": n_parts, "texts": [...]}                               (n_parts of these)
    {"cmd": "baseline", "action": "golden", "id": gid, "golden_id": gid, "n_parts": n_parts,
     "n_texts": N, "sha256": <of the texts>, "app": ..., "model": ..., "prompt_version": ...,
     "field": ..., "note": ...}

All of them carry the key ``gid``, so they land on one partition in this order; each is
signed like any other command when a control secret is set. A worker keeps the parts
until the golden command comes, embeds the texts once with its own model, stores the
vectors in ``drift_golden`` and makes the golden set the reference of the matching keys
(streams/stages/semantic_drift.py). The golden id is the command's id: the CLI waits
for it in ``drift_control_log`` like for the other baseline commands.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from driftline.schemas.topics import CONTROL_TOPIC

if TYPE_CHECKING:
    from driftline.streams.ingest.kafka_security import KafkaSecurity

__all__ = ["MAX_TEXTS", "MAX_TEXT_CHARS", "PART_BYTES", "GoldenFileError", "parse_golden", "read_golden",
           "texts_digest", "golden_commands", "send_golden", "part_problem", "held_texts", "command_count"]

#: most texts in one golden set
MAX_TEXTS = 20_000
#: most characters in one text (the embedding model reads far less: MiniLM 256 tokens)
MAX_TEXT_CHARS = 8_000
#: most bytes of JSON texts in one part (a Kafka record must stay under 1 MiB)
PART_BYTES = 512 * 1024
#: bad lines listed in the error at most (all are counted)
_SHOWN = 20


class GoldenFileError(ValueError):
    """A golden file with bad lines: ``errors`` holds one message per bad line
    (``"line 3: not JSON (...)"``); ``str()`` lists the first 20 and the count."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        shown = self.errors[:_SHOWN]
        more = len(self.errors) - len(shown)
        tail = f"\n... and {more} more bad line(s)" if more > 0 else ""
        super().__init__("\n".join(shown) + tail)


def _line_text(raw: str | bytes, field: str) -> tuple[str | None, str | None]:
    """One line: ``(text, None)``, ``(None, None)`` for a blank line, or ``(None, why)``."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, f"not UTF-8 (byte {exc.start + 1})"
    if not raw.strip():
        return None, None
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        return None, f"not JSON ({getattr(exc, 'msg', str(exc))} at column {getattr(exc, 'colno', '?')})"
    except RecursionError:
        return None, "not JSON (nested too deep)"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    if "text" in obj and field in obj:
        return None, f'both "text" and "{field}"; keep one'
    name = "text" if "text" in obj else field
    if name not in obj:
        other = "response" if field == "prompt" else "prompt"
        hint = f' (it has "{other}": is --field {other} meant?)' if other in obj else ""
        return None, f'no "text" or "{field}"{hint}'
    text = obj[name]
    if not isinstance(text, str):
        return None, f'"{name}" is {type(text).__name__}, expected a string'
    if not text.strip():
        return None, f'"{name}" is empty'
    if len(text) > MAX_TEXT_CHARS:
        return None, f'"{name}" has {len(text):,} characters, over the cap of {MAX_TEXT_CHARS:,}'
    return text, None


def parse_golden(lines: Iterable[str | bytes], field: str) -> list[str]:
    """The texts of a JSONL golden file, in file order (duplicates kept: they weigh).

    ``field``: ``prompt`` or ``response``; a line's text is under ``"text"`` or under
    ``field``. Raises :class:`GoldenFileError` (every bad line, numbered from 1) when a
    line is not UTF-8 or not JSON, is not an object, has no text, has both ``"text"`` and
    ``field``, a text that is not a string, empty, or over :data:`MAX_TEXT_CHARS`
    characters, or when there are more than :data:`MAX_TEXTS` texts or none.
    """
    if field not in ("prompt", "response"):
        raise ValueError(f"field must be 'prompt' or 'response', got {field!r}")
    texts: list[str] = []
    errors: list[str] = []
    n_lines = 0
    for no, raw in enumerate(lines, 1):
        n_lines = no
        text, why = _line_text(raw, field)
        if why is not None:
            errors.append(f"line {no}: {why}")
        elif text is not None:
            if len(texts) >= MAX_TEXTS:
                errors.append(f"line {no}: more than {MAX_TEXTS:,} texts (the cap of a golden set)")
                break
            texts.append(text)
    if errors:
        raise GoldenFileError(errors)
    if not texts:
        raise GoldenFileError([f"no texts ({n_lines} line(s), all blank)" if n_lines else "no texts (empty file)"])
    return texts


def read_golden(path: str, field: str) -> list[str]:
    """:func:`parse_golden` of the file at ``path`` (``-``: stdin)."""
    import sys

    if path == "-":
        return parse_golden(sys.stdin.buffer, field)
    with open(path, "rb") as f:
        return parse_golden(f, field)


def texts_digest(texts: Sequence[str]) -> str:
    """SHA-256 of the texts (their JSON array): the worker checks the parts it put together."""
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode()).hexdigest()


def part_problem(cmd: dict[str, Any]) -> str | None:
    """Why a worker must not hold a ``golden_part`` command (None: it may). Parts obey the
    file's caps, so that the parts a worker holds stay bounded whoever sent them: at most
    :data:`MAX_TEXTS` parts (each has a text) and texts, each a string of at most
    :data:`MAX_TEXT_CHARS` characters."""
    gid, i, n, texts = cmd.get("golden_id"), cmd.get("i"), cmd.get("n"), cmd.get("texts")
    if not (isinstance(gid, str) and type(i) is int and type(n) is int and 0 <= i < n
            and isinstance(texts, list) and all(isinstance(t, str) for t in texts)):
        return "malformed"
    if n > MAX_TEXTS or len(texts) > MAX_TEXTS:
        return f"over the cap of {MAX_TEXTS:,} texts"
    if any(len(t) > MAX_TEXT_CHARS for t in texts):
        return f"a text over the cap of {MAX_TEXT_CHARS:,} characters"
    return None


def held_texts(parts: dict[int, list[str]]) -> int:
    """The texts held in a set's parts (a set over :data:`MAX_TEXTS` is dropped)."""
    return sum(map(len, parts.values()))


def command_count(cmd: dict[str, Any]) -> int | None:
    """The ``n_texts`` of a ``golden`` command when it is an int in 1..:data:`MAX_TEXTS` (the
    file's caps), else None: a worker waits for a set in proportion to its size, so a count
    nobody could have sent must not make it wait."""
    n = cmd.get("n_texts")
    return n if type(n) is int and 1 <= n <= MAX_TEXTS else None


def golden_commands(texts: Sequence[str], filters: dict[str, Any], *, golden_id: str | None = None,
                    note: str = "", part_bytes: int = PART_BYTES,
                    sent_at_ms: int | None = None) -> list[dict[str, Any]]:
    """The commands of one golden load: the parts (texts cut at ``part_bytes`` of JSON), then
    the golden command with ``filters`` (``app``, ``model``, ``prompt_version``, ``field``;
    ``None`` values left out). Unsigned; :func:`send_golden` signs them."""
    gid = golden_id or uuid.uuid4().hex
    at = int(time.time() * 1000) if sent_at_ms is None else sent_at_ms
    chunks: list[list[str]] = [[]]
    size = 2  # the JSON array's brackets
    for t in texts:
        b = len(json.dumps(t, ensure_ascii=False).encode()) + 2  # its ", " separator
        if chunks[-1] and size + b > part_bytes:
            chunks.append([])
            size = 2
        chunks[-1].append(t)
        size += b
    n = len(chunks)
    parts = [{"cmd": "baseline", "action": "golden_part", "id": f"{gid}.{i}", "sent_at_ms": at,
              "golden_id": gid, "i": i, "n": n, "texts": c} for i, c in enumerate(chunks)]
    final = {"cmd": "baseline", "action": "golden", "id": gid, "sent_at_ms": at, "golden_id": gid,
             "n_parts": n, "n_texts": len(texts), "sha256": texts_digest(texts),
             **{k: v for k, v in filters.items() if v is not None}, "note": note}
    return [*parts, final]


def send_golden(kafka: str, commands: Sequence[dict[str, Any]], topic: str = CONTROL_TOPIC,
                timeout: float = 60.0, *, security: KafkaSecurity | None = None,
                secret: bytes | None = None) -> str:
    """Produce the commands of :func:`golden_commands` in order, keyed by the golden id (one
    partition, so the parts come before the golden command); each signed with ``secret`` when
    given. Returns the golden id."""
    from kafka import KafkaProducer

    from driftline.streams.ingest.control_auth import sign_command

    gid = str(commands[-1]["golden_id"])
    p = KafkaProducer(bootstrap_servers=kafka, acks="all", max_in_flight_requests_per_connection=1,
                      **(security.kafka_python_kwargs() if security is not None else {}))
    try:
        for cmd in commands:
            body = sign_command(dict(cmd), secret) if secret is not None else dict(cmd)
            p.send(topic, json.dumps(body, ensure_ascii=False).encode(), key=gid.encode()).get(timeout=timeout)
        p.flush(timeout)
        return gid
    finally:
        p.close(timeout=5)
