"""``--redact`` applied to what the worker stores and sends (the texts themselves:
:mod:`driftline.detectors.redact`).

- :func:`redact_events` — the ``prompt`` / ``response`` columns of a batch's
  ``llm_events`` table and the strings in its ``extra`` column, right before the
  insert. The stages (drift) get the batch's original table: the drift stage
  embeds the original text, and redacts the example
  texts it puts in ``drift_scores.explanation`` itself.
- :func:`redact_rejected` — a rejected record's copy in ``dlq_outbox`` and in the
  DLQ topic. A JSON object with ``prompt`` or ``response``: those values are
  redacted per mode, and in ``pii`` mode every other string in it is masked too
  (``user_id``, ``extra`` …); the rest is kept so the record can still be read and
  replayed. Any other payload (not JSON, an OTLP request in protobuf or JSON):
  ``pii`` masks the raw text in place, each finding by as many bytes (its token
  padded with ``*``), so protobuf lengths stay valid (JSON with ``\\`` escapes, which
  can hide a finding from that scan: its parsed strings, re-serialised); ``hash`` replaces the payload
  by its digest and says so in the reason. The reason is ``pii``-masked in both
  modes (a decoder's message may quote the value).

Mode ``none`` never calls these (the worker checks :attr:`Redaction.active`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from driftline.detectors.redact import Redaction, fit_token, hash_text, mask_pii, pii_spans
from driftline.streams.ingest.transforms import Rejected

__all__ = ["TEXT_COLUMNS", "redact_events", "redact_rejected"]

TEXT_COLUMNS = ("prompt", "response")


def redact_events(table: Any, redaction: Redaction) -> Any:
    """The Arrow ``llm_events`` table with its text columns redacted (a new table), and
    its ``extra`` column: an event's unknown keys and an OTLP span's other attributes
    (``gen_ai.system_instructions``, tool call arguments and results, ``input.value`` …)
    carry prompt text too. ``pii``: every string in it masked; ``hash``: each top-level
    value that is not a number, boolean or null replaced by its digest (keys kept)."""
    import pyarrow as pa

    for name in TEXT_COLUMNS:
        i = table.schema.get_field_index(name)
        if i < 0:
            continue
        col = table.column(i)
        red = redaction.text
        table = table.set_column(i, table.schema.field(i), pa.array([red(t) for t in col.to_pylist()], col.type))
    i = table.schema.get_field_index("extra")
    if i >= 0:
        col = table.column(i)
        table = table.set_column(i, table.schema.field(i),
                                 pa.array([_redact_extra(x, redaction) for x in col.to_pylist()], col.type))
    return table


def _redact_extra(text: str | None, redaction: Redaction) -> str | None:
    if not text or text == "{}":
        return text
    if redaction.mode == "pii" and "\\" not in text and not pii_spans(text):
        return text  # no escapes: each string is a piece of the text, so nothing to mask (~4x faster)
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return redaction.text(text)
    if not isinstance(obj, dict):
        return redaction.text(text)
    return json.dumps({k: redaction.value(v) for k, v in obj.items()}, ensure_ascii=False,
                      separators=(",", ":"))


def _mask_bytes(value: bytes) -> bytes:
    """``value`` with each pii/secrets finding in its text overwritten by as many bytes
    (its token padded with ``*``: :func:`fit_token`)."""
    text = value.decode("utf-8", "surrogateescape")
    spans = pii_spans(text)
    if not spans:
        return value
    out: list[bytes] = []
    pos = 0
    for start, end, token in spans:
        out.append(text[pos:start].encode("utf-8", "surrogateescape"))
        n = len(text[start:end].encode("utf-8", "surrogateescape"))
        out.append(fit_token(token, n).encode())
        pos = end
    out.append(text[pos:].encode("utf-8", "surrogateescape"))
    return b"".join(out)


def redact_rejected(r: Rejected, redaction: Redaction) -> Rejected:
    """``r`` with its payload (``value``) and reason redacted per ``redaction``."""
    mode = redaction.mode
    reason = mask_pii(r.reason)
    value = r.value
    obj: Any = None
    if value:
        try:
            obj = json.loads(value)
        except (ValueError, RecursionError):
            obj = None
    if isinstance(obj, dict) and any(k in obj for k in TEXT_COLUMNS):
        if mode == "pii":
            obj = redaction.value(obj)
        else:
            for k in TEXT_COLUMNS:
                if k in obj:
                    obj[k] = redaction.value(obj[k])
        value = json.dumps(obj, ensure_ascii=False).encode()
    elif value:
        if mode == "pii" and obj is not None and b"\\" in value:
            # JSON with escapes: "jo\u0040example.com" hides from a scan of the raw text
            value = json.dumps(redaction.value(obj), ensure_ascii=False).encode()
        elif mode == "pii":
            value = _mask_bytes(value)
        else:
            digest = hash_text(value, redaction.key)
            reason = f"{reason} [payload of {len(r.value)} bytes replaced by its digest (--redact hash)]"
            value = digest.encode()
    return dataclasses.replace(r, value=value, reason=reason)
