"""The page's JSON API: what the views show, read from the driftline tables.

Every function takes a clickhouse-connect client (the worker's query lane, a client of
``driftline ui``, or chDB through clickhouse-connect's ``chdb://`` DSN), the database
name and a :class:`Selection` (an event-time range and key filters), and returns plain
dicts and lists of JSON types. The SQL is fixed text: the user's values (range, app,
model, prompt version) reach ClickHouse only as bound ``{name:Type}`` parameters, never
formatted into the query; the database name is configuration, checked to be an
identifier.

Window rows are re-emitted while a window is open and updated in place
(``ReplacingMergeTree(updated_at)``), so each window's newest row is read
(``argMax(…, updated_at)`` per window and key), as the worker's tests compare them.

Endpoints (streams/ui/server.py; all ``GET``, all authenticated, parameters ``from`` and
``to`` in epoch milliseconds, optional ``app``, ``model``, ``prompt_version``):

- ``/ui/api/extent``: first and last event time of the stored windows, drift tests and
  alerts (the page's default range ends at the newest data);
- ``/ui/api/overview``: per app/model/prompt_version, one entry per window (events/s,
  error rate, latency p50/p95/p99, TTFT p95, tokens, cost per hour, guardrail-hit rate)
  and totals over the range;
- ``/ui/api/drift``: per key, field and method the test series (p-value, threshold,
  flagged), the flagged tests with their explanation, and the references (the highest
  version is in force; earlier ones were rebased away);
- ``/ui/api/alerts``: the alert state changes in the range and the firing intervals per
  rule and fingerprint (an alert firing when the range starts opens at the range start).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = ["Selection", "alerts", "drift", "extent", "overview", "parse_selection"]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: the longest range one request may ask for (400 days)
MAX_SPAN_MS = 400 * 86_400_000
#: the longest app / model / prompt_version filter value
MAX_FILTER_LEN = 200
#: the most flagged tests returned (newest first)
MAX_FLAGGED = 100
#: clusters and example texts kept per flagged test's explanation
MAX_CLUSTERS = 6
MAX_EXAMPLES = 3
MAX_TEXT_CHARS = 400


@dataclass(frozen=True)
class Selection:
    """What a view shows: ``[from_ms, to_ms)`` of event time and key filters ('' = any).

    Raises ValueError when the range is empty or reversed, longer than 400 days, or a
    filter is longer than 200 characters.
    """

    from_ms: int
    to_ms: int
    app: str = ""
    model: str = ""
    prompt_version: str = ""

    def __post_init__(self) -> None:
        if self.to_ms <= self.from_ms:
            raise ValueError(f"range: to ({self.to_ms}) must be after from ({self.from_ms})")
        if self.to_ms - self.from_ms > MAX_SPAN_MS:
            raise ValueError("range: at most 400 days")
        if self.from_ms < 0:
            raise ValueError("range: from must be >= 0 (epoch milliseconds)")
        for name in ("app", "model", "prompt_version"):
            if len(getattr(self, name)) > MAX_FILTER_LEN:
                raise ValueError(f"{name}: at most {MAX_FILTER_LEN} characters")

    def params(self) -> dict[str, Any]:
        """The bound parameters of every query: ``f``, ``t``, ``app``, ``model``, ``pv``."""
        return {"f": self.from_ms, "t": self.to_ms, "app": self.app, "model": self.model,
                "pv": self.prompt_version}


def parse_selection(query: Any, now_ms: int, default_span_ms: int = 3_600_000) -> Selection:
    """A :class:`Selection` from request parameters (``from``, ``to`` epoch ms, default the
    hour before ``now_ms``; ``app``, ``model``, ``prompt_version``). ValueError when bad."""

    def ms(name: str, default: int) -> int:
        raw = query.get(name)
        if raw in (None, ""):
            return default
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{name}: expected epoch milliseconds, got {str(raw)[:40]!r}") from None

    to = ms("to", now_ms)
    return Selection(ms("from", to - default_span_ms), to, app=query.get("app", ""),
                     model=query.get("model", ""), prompt_version=query.get("prompt_version", ""))


def _db(database: str) -> str:
    if not _IDENT.match(database):
        raise ValueError(f"database name {database!r}: letters, digits and _ only")
    return database


def _ms(v: Any) -> int | None:
    """Epoch ms of a DateTime64 value clickhouse-connect returned (naive = UTC)."""
    if v is None:
        return None
    if isinstance(v, datetime):
        return int(round((v if v.tzinfo else v.replace(tzinfo=UTC)).timestamp() * 1000))
    return int(v)


def _num(v: Any) -> float | None:
    return None if v is None else float(v)


_KEYS = ("({app:String} = '' OR app = {app:String}) AND ({model:String} = '' OR model = {model:String})")
_KEYS_PV = _KEYS + " AND ({pv:String} = '' OR prompt_version = {pv:String})"
_RANGE = "fromUnixTimestamp64Milli({f:Int64}, 'UTC') AND {col} < fromUnixTimestamp64Milli({t:Int64}, 'UTC')"


def _in_range(col: str) -> str:
    return f"{col} >= " + _RANGE.replace("{col}", col)


def extent(client: Any, database: str) -> dict[str, Any]:
    """``{"from": ms | None, "to": ms | None}``: the earliest and latest event time of the
    window rows (start, end), drift tests and alerts."""
    db = _db(database)
    row = client.query(
        "SELECT min(lo), max(hi), count() FROM ("
        f"SELECT toUnixTimestamp64Milli(min(window_start)) AS lo, toUnixTimestamp64Milli(max(window_end)) AS hi,"
        f" count() AS n FROM {db}.llm_window_metrics"
        f" UNION ALL SELECT toUnixTimestamp64Milli(min(ts)), toUnixTimestamp64Milli(max(ts)), count()"
        f" FROM {db}.drift_scores"
        f" UNION ALL SELECT toUnixTimestamp64Milli(min(ts)), toUnixTimestamp64Milli(max(ts)), count()"
        f" FROM {db}.alerts) WHERE n > 0").result_rows[0]
    if not row[2]:  # no table holds a row
        return {"from": None, "to": None}
    return {"from": int(row[0]), "to": int(row[1])}


#: the columns of one window row in :func:`overview` (the newest row of each window)
WINDOW_COLUMNS = ("events", "errors", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "ttft_p95_ms",
                  "input_tokens", "output_tokens", "cost_usd", "guardrail_checked_events", "guardrail_hits",
                  "guardrail_hit_rate", "final")


def overview(client: Any, database: str, sel: Selection) -> dict[str, Any]:
    """Per app/model/prompt_version: the windows starting in the range, oldest first.

    Each key: ``series`` (lists of equal length: ``t`` window start in ms, ``window_s``,
    every column of :data:`WINDOW_COLUMNS`, and derived ``events_per_s``, ``error_rate``,
    ``cost_per_hour``) and ``totals`` over the range (events, errors, error_rate, tokens,
    cost_usd, guardrail_hit_rate = hits / checked events, windows, latency_p95_ms_max).
    """
    db = _db(database)
    cols = ", ".join(f"argMax({c}, updated_at) AS {c}" for c in WINDOW_COLUMNS)
    rows = client.query(
        "SELECT app, model, prompt_version, toUnixTimestamp64Milli(window_start) AS ws,"
        f" toUnixTimestamp64Milli(argMax(window_end, updated_at)) AS we, {cols}"
        f" FROM {db}.llm_window_metrics WHERE {_in_range('window_start')} AND {_KEYS_PV}"
        " GROUP BY app, model, prompt_version, ws ORDER BY app, model, prompt_version, ws",
        parameters=sel.params()).result_rows
    keys: dict[tuple[str, str, str], dict[str, list[Any]]] = {}
    for r in rows:
        s = keys.setdefault((str(r[0]), str(r[1]), str(r[2])), {
            "t": [], "window_s": [], **{c: [] for c in WINDOW_COLUMNS},
            "events_per_s": [], "error_rate": [], "cost_per_hour": []})
        ws, we = int(r[3]), int(r[4])
        vals = dict(zip(WINDOW_COLUMNS, r[5:], strict=True))
        span_s = max(we - ws, 1) / 1000
        s["t"].append(ws)
        s["window_s"].append(span_s)
        for c in WINDOW_COLUMNS:
            v = vals[c]
            s[c].append(int(v) if c in ("events", "errors", "input_tokens", "output_tokens", "final",
                                        "guardrail_checked_events", "guardrail_hits") else _num(v))
        events = int(vals["events"])
        s["events_per_s"].append(events / span_s)
        s["error_rate"].append(int(vals["errors"]) / events if events else None)
        s["cost_per_hour"].append(float(vals["cost_usd"]) * 3600 / span_s)
    out = []
    for (app, model, pv), s in keys.items():
        events, errors = sum(s["events"]), sum(s["errors"])
        checked, hits = sum(s["guardrail_checked_events"]), sum(s["guardrail_hits"])
        totals = {
            "events": events, "errors": errors, "error_rate": errors / events if events else None,
            "input_tokens": sum(s["input_tokens"]), "output_tokens": sum(s["output_tokens"]),
            "cost_usd": sum(x or 0.0 for x in s["cost_usd"]),
            "guardrail_hit_rate": hits / checked if checked else None, "windows": len(s["t"]),
            "latency_p95_ms_max": max((x for x in s["latency_p95_ms"] if x is not None), default=None),
        }
        out.append({"app": app, "model": model, "prompt_version": pv, "series": s, "totals": totals})
    return {"from": sel.from_ms, "to": sel.to_ms, "keys": out}


def _trim_explanation(raw: str) -> Any:
    """A flagged test's explanation (JSON) for the page: the clusters with the largest
    share change first, a few example texts each, long texts cut."""
    try:
        exp = json.loads(raw) if raw else {}
    except ValueError:
        return {"text": raw[:MAX_TEXT_CHARS]}
    if not isinstance(exp, dict):
        return exp
    clusters = exp.get("clusters")
    if isinstance(clusters, list):
        kept = []
        for c in clusters[:MAX_CLUSTERS]:
            if isinstance(c, dict):
                c = dict(c)
                for k in ("examples", "cur_examples"):
                    if isinstance(c.get(k), list):
                        c[k] = [str(t)[:MAX_TEXT_CHARS] for t in c[k][:MAX_EXAMPLES]]
            kept.append(c)
        exp = {**exp, "clusters": kept, "clusters_total": len(clusters)}
    return exp


def drift(client: Any, database: str, sel: Selection) -> dict[str, Any]:
    """Drift tests in the range: ``series`` per key, field and method (``t`` ms, ``p_value``,
    ``threshold``, ``statistic``, ``drifted``, ``n_ref``, ``n_cur``), the newest
    :data:`MAX_FLAGGED` ``flagged`` tests with their explanation, and ``references``: every
    reference version of the selected keys whose samples start before the range ends (event
    time: ``created_at`` is the wall clock, far from the events of a replay; ``in_force``: the
    highest such version of its key and field)."""
    db = _db(database)
    p = sel.params()
    rows = client.query(
        "SELECT app, model, prompt_version, field, method, toUnixTimestamp64Milli(ts), p_value, threshold,"
        f" statistic, drifted, n_ref, n_cur FROM {db}.drift_scores WHERE {_in_range('ts')} AND {_KEYS_PV}"
        " ORDER BY app, model, prompt_version, field, method, ts", parameters=p).result_rows
    series: dict[tuple[str, ...], dict[str, list[Any]]] = {}
    for r in rows:
        s = series.setdefault(tuple(str(x) for x in r[:5]), {
            "t": [], "p_value": [], "threshold": [], "statistic": [], "drifted": [], "n_ref": [], "n_cur": []})
        s["t"].append(int(r[5]))
        s["p_value"].append(_num(r[6]))
        s["threshold"].append(float(r[7]))
        s["statistic"].append(float(r[8]))
        s["drifted"].append(int(r[9]))
        s["n_ref"].append(int(r[10]))
        s["n_cur"].append(int(r[11]))
    flagged = client.query(
        "SELECT app, model, prompt_version, field, method, toUnixTimestamp64Milli(ts), p_value, threshold,"
        f" statistic, n_ref, n_cur, explanation FROM {db}.drift_scores"
        f" WHERE drifted = 1 AND {_in_range('ts')} AND {_KEYS_PV} ORDER BY ts DESC, field, method"
        f" LIMIT {MAX_FLAGGED}", parameters=p).result_rows
    refs = client.query(
        "SELECT app, model, prompt_version, field, version, mode, toUnixTimestamp64Milli(from_ts),"
        " toUnixTimestamp64Milli(to_ts), n, toUnixTimestamp64Milli(created_at), note, seq_from, seq_to,"
        " version = max(version) OVER (PARTITION BY app, model, prompt_version, field) AS in_force"
        f" FROM {db}.drift_references WHERE {_KEYS_PV}"
        " AND from_ts < fromUnixTimestamp64Milli({t:Int64}, 'UTC')"
        " ORDER BY app, model, prompt_version, field, version", parameters=p).result_rows
    return {
        "from": sel.from_ms, "to": sel.to_ms,
        "series": [{"app": k[0], "model": k[1], "prompt_version": k[2], "field": k[3], "method": k[4], **s}
                   for k, s in series.items()],
        "flagged": [{"app": r[0], "model": r[1], "prompt_version": r[2], "field": r[3], "method": r[4],
                     "t": int(r[5]), "p_value": _num(r[6]), "threshold": float(r[7]), "statistic": float(r[8]),
                     "n_ref": int(r[9]), "n_cur": int(r[10]), "explanation": _trim_explanation(str(r[11]))}
                    for r in flagged],
        "references": [{"app": r[0], "model": r[1], "prompt_version": r[2], "field": r[3], "version": int(r[4]),
                        "mode": r[5], "from": int(r[6]), "to": int(r[7]), "n": int(r[8]), "created": int(r[9]),
                        "note": r[10], "seq_from": int(r[11]), "seq_to": int(r[12]), "in_force": bool(r[13])}
                       for r in refs],
    }


def alerts(client: Any, database: str, sel: Selection) -> dict[str, Any]:
    """Alert state changes in the range (``events``, oldest first) and ``intervals``: per
    rule and fingerprint the firing spans clipped to the range (``end`` None: still firing
    at the range's end). ``prompt_version`` does not filter alerts (they carry app and model)."""
    db = _db(database)
    p = sel.params()
    cols = ("toUnixTimestamp64Milli(ts) AS t, rule, state, severity, app, model, value, labels, annotations,"
            " fingerprint")
    rows = client.query(
        f"SELECT {cols} FROM {db}.alerts WHERE {_in_range('ts')} AND {_KEYS} ORDER BY ts, rule, fingerprint",
        parameters=p).result_rows
    # the state each alert was in when the range starts (its newest change before it)
    before = client.query(
        "SELECT rule, fingerprint, argMax(state, ts), argMax(severity, ts), argMax(app, ts), argMax(model, ts),"
        f" argMax(labels, ts) FROM {db}.alerts WHERE ts < fromUnixTimestamp64Milli({{f:Int64}}, 'UTC')"
        f" AND {_KEYS} GROUP BY rule, fingerprint", parameters=p).result_rows
    events = [{"t": int(r[0]), "rule": r[1], "state": r[2], "severity": r[3], "app": r[4], "model": r[5],
               "value": float(r[6]), "labels": dict(r[7]), "annotations": dict(r[8]), "fingerprint": r[9]}
              for r in rows]
    open_: dict[tuple[str, str], dict[str, Any]] = {}
    intervals: list[dict[str, Any]] = []
    for r in before:
        if r[2] == "firing":
            open_[(r[0], r[1])] = {"rule": r[0], "fingerprint": r[1], "severity": r[3], "app": r[4],
                                   "model": r[5], "labels": dict(r[6]), "start": sel.from_ms, "end": None}
    for e in events:
        k = (e["rule"], e["fingerprint"])
        if e["state"] == "firing" and k not in open_:
            open_[k] = {"rule": e["rule"], "fingerprint": e["fingerprint"], "severity": e["severity"],
                        "app": e["app"], "model": e["model"], "labels": e["labels"], "start": e["t"], "end": None}
        elif e["state"] == "resolved" and k in open_:
            iv = open_.pop(k)
            iv["end"] = e["t"]
            intervals.append(iv)
    intervals.extend(open_.values())
    intervals.sort(key=lambda iv: (iv["rule"], iv["app"], iv["model"], iv["fingerprint"], iv["start"]))
    return {"from": sel.from_ms, "to": sel.to_ms, "events": events, "intervals": intervals}
