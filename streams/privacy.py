"""``--redact`` applied to what the worker stores and sends (the texts themselves:
:mod:`driftline.detectors.redact`).

- :func:`redact_events` — the ``prompt`` / ``response`` columns of a batch's
  ``llm_events`` table, right before the insert. The stages (drift) get the batch's
  original table: the drift stage embeds the original text, and redacts the example
  texts it puts in ``drift_scores.explanation`` itself.
- :func:`redact_rejected` — a rejected record's copy in ``dlq_outbox`` and in the
  DLQ topic. A JSON object: its ``prompt`` and ``response`` values (only these two
  keys; the other fields are kept so the record can be replayed); bytes
  that are not a JSON object: ``pii`` masks the raw text (decoded as UTF-8 with
  surrogate escapes, so the other bytes come back unchanged), ``hash`` replaces the
  payload by its digest and says so in the reason. The reason is ``pii``-masked in
  both modes (a decoder's message may quote the value).

Mode ``none`` never calls these (the worker checks :attr:`Redaction.active`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from driftline.detectors.redact import Redaction, hash_text, mask_pii
from driftline.streams.pipeline import Rejected

__all__ = ["TEXT_COLUMNS", "redact_events", "redact_rejected"]

TEXT_COLUMNS = ("prompt", "response")


def redact_events(table: Any, redaction: Redaction) -> Any:
    """The Arrow ``llm_events`` table with its text columns redacted (a new table)."""
    import pyarrow as pa

    for name in TEXT_COLUMNS:
        i = table.schema.get_field_index(name)
        if i < 0:
            continue
        col = table.column(i)
        red = redaction.text
        table = table.set_column(i, table.schema.field(i), pa.array([red(t) for t in col.to_pylist()], col.type))
    return table


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
    if isinstance(obj, dict):
        if any(k in obj for k in TEXT_COLUMNS):
            for k in TEXT_COLUMNS:
                if k in obj:
                    obj[k] = redaction.value(obj[k])
            value = json.dumps(obj, ensure_ascii=False).encode()
    elif value:
        if mode == "pii":
            text = value.decode("utf-8", "surrogateescape")
            masked = mask_pii(text)
            if masked != text:
                value = masked.encode("utf-8", "surrogateescape")
        else:
            digest = hash_text(value, redaction.key)
            reason = f"{reason} [payload of {len(r.value)} bytes replaced by its digest (--redact hash)]"
            value = digest.encode()
    return dataclasses.replace(r, value=value, reason=reason)
