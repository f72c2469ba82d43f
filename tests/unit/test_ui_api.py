"""The page's JSON API (streams/ui/api.py) on a real chDB store, against independent SQL.

Window rows are written twice per window (an early row, then a later one with other
values), so a reader that does not take the newest row per window gets other numbers;
the expected values come from ``FINAL`` (ReplacingMergeTree(updated_at) keeps the newest
row), not from the API's own ``argMax``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from driftline.schemas.columns import (
    ALERT_COLUMNS,
    REFERENCE_COLUMNS,
    SCORE_COLUMNS,
    WINDOW_COLUMNS,
)
from driftline.streams.sinks.clickhouse import ClickHouseSink
from driftline.streams.ui import api
from driftline.streams.ui.api import Selection, parse_selection

T0 = 1_767_225_600_000  # 2026-01-01T00:00Z
MIN = 60_000
A = ("chat", "gpt-4o-mini", "v1")
B = ("search", "claude-3-5-haiku", "v2")


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _window(key: tuple[str, str, str], start: int, version: int, events: int, p95: float) -> dict[str, Any]:
    row: dict[str, Any] = {c: 0 for c in WINDOW_COLUMNS}
    row.update(
        window_start=_dt(start), window_end=_dt(start + MIN), app=key[0], model=key[1], prompt_version=key[2],
        events=events, errors=events // 10, latency_p50_ms=p95 / 3, latency_p90_ms=p95 * 0.9, latency_p95_ms=p95,
        latency_p99_ms=p95 * 1.5, ttft_p50_ms=None, ttft_p95_ms=p95 / 4 if version else None, ttft_p99_ms=None,
        tpot_p50_ms=None, tpot_p95_ms=None, input_tokens=events * 100, output_tokens=events * 20,
        cost_usd=events * 0.001, guardrail_checked_events=events, guardrail_hits=events // 5,
        guardrail_hit_rate=(events // 5) / events, final=version, sketch_relative_accuracy=0.01,
        updated_at=_dt(start + MIN + version * 1000),
    )
    return row


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Any:
    dsn = f"chdb://{tmp_path_factory.mktemp('ui') / 'chdb'}"
    sink = ClickHouseSink(dsn)
    sink.ensure_schema()
    # two inserts (two parts), the newer row of a window in the first for some windows and in
    # the second for others: neither any() nor anyLast() nor the part order finds the newest row
    wins: list[dict[str, Any]] = []
    later: list[dict[str, Any]] = []
    for i, (ev0, ev1) in enumerate([(10, 40), (20, 50), (5, 60)]):
        old, new = _window(A, T0 + i * MIN, 0, ev0, 100.0 + i), _window(A, T0 + i * MIN, 1, ev1, 200.0 + 10 * i)
        wins.append(new if i % 2 == 0 else old)
        later.append(old if i % 2 == 0 else new)
    wins += [_window(B, T0 + MIN, 1, 7, 999.0), _window(A, T0 - MIN, 1, 1000, 5.0)]  # the last: before the range

    def cols(rows: list[dict[str, Any]], names: tuple[str, ...]) -> list[list[Any]]:
        return [[r[c] for c in names] for r in rows]

    exp = {"clusters": [{"cluster": c, "delta": 0.1 - c / 100, "examples": [f"ref {c} {j} " + "x" * 900
                                                                             for j in range(5)],
                         "cur_examples": [f"cur {c} {j}" for j in range(5)]} for c in range(10)],
           "total_variation": 0.3}
    scores = []
    for i, (method, p) in enumerate([("mmd", 0.5), ("mmd", 0.0001), ("topic_mix", 0.2), ("topic_mix", 0.00002)]):
        ts = T0 + MIN * (1 + i % 2)
        scores.append({"ts": _dt(ts), "app": A[0], "model": A[1], "prompt_version": A[2], "field": "prompt",
                       "method": method, "statistic": 1.0 + i, "p_value": p, "threshold": 0.001,
                       "drifted": int(p < 0.001), "n_ref": 150, "n_cur": 100,
                       "explanation": json.dumps(exp) if p < 0.001 else "{}"})
    scores.append({**scores[0], "ts": _dt(T0 + 10 * MIN), "p_value": None})  # after the range
    refs = [{"app": A[0], "model": A[1], "prompt_version": A[2], "field": "prompt", "version": v, "mode": mode,
             "seq_from": v * 100, "seq_to": v * 100 + 99, "from_ts": _dt(first), "to_ts": _dt(first + MIN), "n": 100,
             "event_ids": ["e"], "embed_model": "m", "control_id": "", "created_at": _dt(created),
             "note": note} for v, mode, first, created, note in
            # created_at is the wall clock (a replay of past events is made much later)
            [(1, "first_n", T0, T0 + 99 * MIN, ""), (2, "rebase", T0 + 2 * MIN, T0 + 99 * MIN, "new prompt"),
             (3, "rebase", T0 + 9 * MIN, T0 + 99 * MIN, "")]]

    def alert(ts: int, rule: str, fp: str, state: str, app: str = A[0]) -> list[Any]:
        return [_dt(ts), rule, state, "warning", app, A[1], 2.5, {"app": app}, {"summary": f"{rule} {state}"}, fp]

    alerts = [alert(T0 - 2 * MIN, "Old", "f4", "firing"), alert(T0 - MIN - 1, "Old", "f4", "resolved"),
              alert(T0 - 30_000, "Latency", "f1", "firing"), alert(T0 + 30_000, "Latency", "f1", "resolved"),
              alert(T0 + MIN, "Guard", "f2", "firing"), alert(T0 + 2 * MIN, "Guard", "f2", "resolved"),
              alert(T0 + 150_000, "Cost", "f3", "firing", app=B[0])]

    def load(c: Any) -> None:
        for part in (wins, later):
            c.insert("driftline.llm_window_metrics", cols(part, WINDOW_COLUMNS), column_names=list(WINDOW_COLUMNS))
        c.insert("driftline.drift_scores", cols(scores, SCORE_COLUMNS), column_names=list(SCORE_COLUMNS))
        c.insert("driftline.drift_references", cols(refs, REFERENCE_COLUMNS), column_names=list(REFERENCE_COLUMNS))
        c.insert("driftline.alerts", alerts, column_names=list(ALERT_COLUMNS))

    sink.call(load)
    yield sink
    sink.close()


def _q(sink: ClickHouseSink, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    return sink.query_rows(sql, params)


def _api(sink: ClickHouseSink, fn: Any, sel: Selection) -> Any:
    return sink.call(lambda c: fn(c, "driftline", sel))


SEL = Selection(T0, T0 + 5 * MIN)


def test_window_columns_exist() -> None:
    assert set(api.WINDOW_COLUMNS) <= set(WINDOW_COLUMNS)


def test_overview_is_the_newest_row_of_each_window(store: ClickHouseSink) -> None:
    out = _api(store, api.overview, SEL)
    assert [(k["app"], k["model"], k["prompt_version"]) for k in out["keys"]] == [A, B]
    sql = ("SELECT toUnixTimestamp64Milli(window_start), events, errors, latency_p95_ms, ttft_p95_ms, cost_usd,"
           " guardrail_hit_rate FROM driftline.llm_window_metrics FINAL WHERE app = {a:String}"
           " AND window_start >= fromUnixTimestamp64Milli({f:Int64}) ORDER BY window_start")
    for k, key in zip(out["keys"], (A, B), strict=True):
        want = _q(store, sql, a=key[0], f=T0)
        s = k["series"]
        got = list(zip(s["t"], s["events"], s["errors"], s["latency_p95_ms"], s["ttft_p95_ms"], s["cost_usd"],
                       s["guardrail_hit_rate"], strict=True))
        assert got == [tuple(r) for r in want]
        assert s["events_per_s"] == [r[1] / 60 for r in want]
        assert s["cost_per_hour"] == [r[5] * 3600 / 60 for r in want]
    a = out["keys"][0]
    assert a["series"]["events"] == [40, 50, 60]  # the early rows (10, 20, 5) are replaced
    tot = _q(store, "SELECT sum(events), sum(errors), sum(input_tokens), sum(guardrail_hits) / sum("
                    "guardrail_checked_events), max(latency_p95_ms) FROM driftline.llm_window_metrics FINAL"
                    " WHERE app = 'chat' AND window_start >= fromUnixTimestamp64Milli({f:Int64})", f=T0)[0]
    t = a["totals"]
    assert (t["events"], t["errors"], t["input_tokens"], t["guardrail_hit_rate"], t["latency_p95_ms_max"]) == tot
    assert t["windows"] == 3 and t["error_rate"] == tot[1] / tot[0]


def test_overview_filters_are_bound_not_formatted(store: ClickHouseSink) -> None:
    only_b = _api(store, api.overview, Selection(T0, T0 + 5 * MIN, app="search"))
    assert [k["app"] for k in only_b["keys"]] == ["search"]
    assert _api(store, api.overview, Selection(T0, T0 + 5 * MIN, model="gpt-4o-mini", prompt_version="v2"))[
        "keys"] == []
    for evil in ("x' OR 1=1 --", "'; DROP TABLE driftline.alerts; --", "{app:String}"):
        assert _api(store, api.overview, Selection(T0, T0 + 5 * MIN, app=evil))["keys"] == []
    assert _q(store, "SELECT count() FROM driftline.alerts")[0][0] == 7
    # the range is half-open: the window starting at T0 - 1 min and those from the end on are out
    assert _api(store, api.overview, Selection(T0 + MIN, T0 + 2 * MIN))["keys"][0]["series"]["t"] == [T0 + MIN]


def test_drift_series_flagged_and_references(store: ClickHouseSink) -> None:
    out = _api(store, api.drift, SEL)
    assert [(s["method"], s["t"], s["p_value"], s["drifted"]) for s in out["series"]] == [
        ("mmd", [T0 + MIN, T0 + 2 * MIN], [0.5, 0.0001], [0, 1]),
        ("topic_mix", [T0 + MIN, T0 + 2 * MIN], [0.2, 0.00002], [0, 1])]
    want = _q(store, "SELECT method, toUnixTimestamp64Milli(ts), p_value FROM driftline.drift_scores WHERE drifted"
                     " AND ts < fromUnixTimestamp64Milli({t:Int64}) ORDER BY ts DESC, field, method", t=T0 + 5 * MIN)
    assert [(f["method"], f["t"], f["p_value"]) for f in out["flagged"]] == [tuple(r) for r in want]
    exp = out["flagged"][0]["explanation"]
    assert exp["clusters_total"] == 10 and len(exp["clusters"]) == api.MAX_CLUSTERS
    assert [len(c["examples"]) for c in exp["clusters"]] == [api.MAX_EXAMPLES] * api.MAX_CLUSTERS
    assert len(exp["clusters"][0]["examples"][0]) == api.MAX_TEXT_CHARS
    assert exp["clusters"][0]["cur_examples"] == ["cur 0 0", "cur 0 1", "cur 0 2"]
    # version 3's samples start after the range: not shown; of 1 and 2 the highest is in force
    assert [(r["version"], r["mode"], r["in_force"], r["note"]) for r in out["references"]] == [
        (1, "first_n", False, ""), (2, "rebase", True, "new prompt")]
    later = _api(store, api.drift, Selection(T0, T0 + 20 * MIN))
    assert [(r["version"], r["in_force"]) for r in later["references"]] == [(1, False), (2, False), (3, True)]
    assert later["series"][0]["p_value"][-1] is None  # a test without a p-value stays null


def test_alert_intervals(store: ClickHouseSink) -> None:
    out = _api(store, api.alerts, SEL)
    want = _q(store, "SELECT toUnixTimestamp64Milli(ts), rule, state FROM driftline.alerts WHERE ts >="
                     " fromUnixTimestamp64Milli({f:Int64}) ORDER BY ts", f=T0)
    assert [(e["t"], e["rule"], e["state"]) for e in out["events"]] == [tuple(r) for r in want]
    assert [(i["rule"], i["start"], i["end"]) for i in out["intervals"]] == [
        ("Cost", T0 + 150_000, None),  # still firing at the range's end
        ("Guard", T0 + MIN, T0 + 2 * MIN),
        ("Latency", T0, T0 + 30_000),  # firing when the range starts: opens at the range start
    ]  # "Old" fired and resolved before the range: no interval
    assert out["events"][0]["annotations"] == {"summary": "Latency resolved"}
    chat = _api(store, api.alerts, Selection(T0, T0 + 5 * MIN, app="chat"))
    assert {i["rule"] for i in chat["intervals"]} == {"Guard", "Latency"}


def test_extent(store: ClickHouseSink) -> None:
    lo, hi = _q(store, "SELECT least(min(toUnixTimestamp64Milli(ts)), {w:Int64}),"
                       " greatest(max(toUnixTimestamp64Milli(ts)), {e:Int64}) FROM driftline.alerts",
                w=T0 - MIN, e=T0 + 10 * MIN)[0]
    assert store.call(lambda c: api.extent(c, "driftline")) == {"from": lo, "to": hi}
    assert (lo, hi) == (T0 - 2 * MIN, T0 + 10 * MIN)


def test_selection_validation() -> None:
    assert parse_selection({}, now_ms=T0) == Selection(T0 - 3_600_000, T0)
    assert parse_selection({"from": str(T0), "to": str(T0 + 5), "app": "a"}, now_ms=0) == Selection(T0, T0 + 5, "a")
    with pytest.raises(ValueError, match="must be after"):
        parse_selection({"from": str(T0), "to": str(T0)}, now_ms=0)
    with pytest.raises(ValueError, match="epoch milliseconds"):
        parse_selection({"from": "yesterday"}, now_ms=T0)
    with pytest.raises(ValueError, match="400 days"):
        Selection(0, 401 * 86_400_000)
    with pytest.raises(ValueError, match="at most 200"):
        Selection(0, 1, model="m" * 201)
    with pytest.raises(ValueError, match="letters, digits"):
        api.overview(None, "driftline; DROP", SEL)
