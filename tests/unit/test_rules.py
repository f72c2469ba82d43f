"""Rule file parsing and validation: exact rule, field and line of every error."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest

from driftline.schemas.rules import (
    AlertTransition,
    Condition,
    RuleError,
    RuleFileError,
    check_rules,
    check_rules_text,
    fingerprint,
    load_rules,
    parse_duration,
    parse_rules,
)
from driftline.streams.stages.rule_engine import default_rules_path


def errs(text: str) -> list[tuple[str, str, int]]:
    return [(e.rule, e.field, e.line) for e in check_rules_text(textwrap.dedent(text))]


def test_valid_file_parses_every_kind() -> None:
    rs = parse_rules(textwrap.dedent("""\
        version: 1
        rules:
          - name: Lat
            kind: threshold
            expr: "latency_ms.p99 > 2000"
            match: {app: "chat-*"}
            for: 1m30s
            resolve_below: 1500
            resolve_after: 30s
            annotations: {summary: "p99 {value:.0f} > {threshold} on {app}/{model}"}
          - name: Budget
            kind: budget
            expr: "cost_usd.sum > 5.5"
            window: 1h
            group_by: [app, user_id]
          - name: Drifted
            kind: drift
            expr: "drift.drifted == true"
            match: {field: response, method: "mmd*"}
        """))
    assert [r.name for r in rs] == ["Lat", "Budget", "Drifted"]
    lat = rs.by_name("Lat")
    assert lat.condition == Condition("latency_ms.p99", ">", 2000.0)
    assert (lat.for_ms, lat.resolve_after_ms, lat.resolve_below, lat.line) == (90_000, 30_000, 1500.0, 3)
    assert lat.severity == "warning"
    b = rs.by_name("Budget")
    assert (b.window_ms, b.group_by, b.condition) == (3_600_000, ("app", "user_id"),
                                                       Condition("cost_usd.sum", ">", 5.5))
    d = rs.by_name("Drifted")
    assert d.condition == Condition("drift.drifted", "==", 1.0)
    assert d.matches({"field": "response", "method": "mmd_rbf"})
    assert not d.matches({"field": "prompt", "method": "mmd_rbf"})


def test_every_error_is_listed_with_rule_field_and_line() -> None:
    text = """\
        rules:
          - name: BadMetric
            kind: threshold
            expr: "latency_ms.p999 > 2000"
            for: 3 minutes
          - name: BadRate
            kind: ratio
            expr: "errors.rate > 5"
            severity: page
          - name: BadTemplate
            kind: threshold
            expr: "errors.count > 3"
            annotations:
              summary: "{value:.2f} on {user_id}"
              description: "{value:zz}"
          - name: BadResolve
            kind: threshold
            expr: "latency_ms.p50 < 100"
            resolve_below: 50
            bogus: 1
          - kind: absence
          - name: BadResolve
            kind: nope
        """
    assert errs(text) == [
        ("BadMetric", "expr", 4),
        ("BadMetric", "for", 5),
        ("BadRate", "expr", 8),
        ("BadRate", "severity", 9),
        ("BadTemplate", "annotations", 13),
        ("BadTemplate", "annotations", 13),
        ("BadResolve", "resolve_below", 19),
        ("BadResolve", "bogus", 20),
        ("#5", "name", 21),
        ("#5", "absent_for", 21),
        ("BadResolve", "name", 22),
        ("BadResolve", "kind", 23),
    ]
    messages = [e.message for e in check_rules_text(textwrap.dedent(text))]
    assert "unknown metric 'latency_ms.p999'" in messages[0]
    assert "invalid duration '3 minutes'" in messages[1]
    assert "threshold 5 is outside" in messages[2]
    assert "unknown placeholder {user_id}" in messages[4]
    assert "bad format spec {value:zz}" in messages[5]
    assert "duplicate rule name (first defined on line 16)" in messages[10]


def test_kind_specific_errors() -> None:
    text = """\
        rules:
          - name: NoWindow
            kind: budget
            expr: "cost_usd.sum < 10"
            group_by: [tenant]
          - name: Chg
            kind: change
            metric: tokens.per_call
            increase_pct: 50
            decrease_pct: 10
            baseline_windows: 3
            min_baseline_windows: 5
          - name: Drift
            kind: drift
            expr: "drift.p_value < 2"
            match: {user_id: "u1"}
        """
    assert errs(text) == [
        ("NoWindow", "window", 2),
        ("NoWindow", "expr", 4),
        ("NoWindow", "group_by", 5),
        ("Chg", "increase_pct", 9),
        ("Chg", "min_baseline_windows", 12),
        ("Drift", "expr", 15),
        ("Drift", "match", 16),
    ]


def test_yaml_syntax_and_top_level_errors() -> None:
    assert errs("rules:\n  - name: A\n    kind: [threshold\n") == [("", "", 4)]
    assert errs("") == [("", "rules", 1)]
    assert errs("rule: []\n") == [("", "rule", 1), ("", "rules", 1)]
    assert errs("version: 2\nrules:\n  - 3\n") == [("", "version", 1), ("#1", "", 2)]


def test_check_rules_and_load_rules_on_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - name: X\n    kind: threshold\n    expr: 'nope > 1'\n")
    assert check_rules(bad) == [RuleError("X", "expr", 4, check_rules(bad)[0].message)]
    with pytest.raises(RuleFileError) as ei:
        load_rules(bad)
    assert len(ei.value.errors) == 1
    assert "line 4: rule 'X', field 'expr'" in str(ei.value)
    assert check_rules(tmp_path / "missing.yaml")[0].message.startswith("cannot read")


def test_default_rules_are_valid_and_cover_every_worker_metric() -> None:
    assert check_rules(default_rules_path()) == []
    rs = load_rules(default_rules_path())
    metrics = {r.metric_name for r in rs}
    assert {"latency_ms.p99", "ttft_ms.p95", "errors.rate", "guardrail.hit_rate",
            "feedback.negative_rate", "cost_usd.sum", "tokens.per_call",
            "drift.p_value", "events.absent_s"} <= metrics
    assert {r.kind for r in rs} == {"threshold", "ratio", "budget", "change", "absence", "drift", "runaway"}
    assert {("prompt.repeats", "trace_id"), ("calls.count", "trace_id"), ("cost_usd.sum", "trace_id"),
            ("cost_usd.sum", "conversation_id")} <= {(r.metric_name, r.group_by[0]) for r in rs.of_kind("runaway")}


@pytest.mark.parametrize(("text", "ms"), [("30s", 30_000), ("3m", 180_000), ("1h30m", 5_400_000),
                                          ("250ms", 250), ("1d", 86_400_000)])
def test_parse_duration(text: str, ms: int) -> None:
    assert parse_duration(text) == ms


@pytest.mark.parametrize("text", ["3", "3 m", "-1m", "1.5h", ""])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_fingerprint_is_fixed_and_label_order_free() -> None:
    a = fingerprint("HighLatencyP99", {"app": "chat", "model": "gpt-4o"})
    b = fingerprint("HighLatencyP99", {"model": "gpt-4o", "app": "chat"})
    assert a == b == "ae10b51458dc99cf"
    assert a == hashlib.sha256(b"HighLatencyP99\x00app=chat\x00model=gpt-4o").hexdigest()[:16]
    assert fingerprint("HighLatencyP99", {"app": "chat"}) != a
    assert fingerprint("Other", {"app": "chat", "model": "gpt-4o"}) != a


def test_transition_row_has_exactly_the_alerts_columns() -> None:
    t = AlertTransition(ts_ms=1_000, rule="R", state="firing", severity="critical",
                        labels={"app": "chat", "model": "m", "environment": "prod"},
                        annotations={"summary": "s"}, value=2.5, fingerprint="f" * 16,
                        starts_at_ms=500, ends_at_ms=None)
    sql = (Path(__file__).parents[2] / "schemas" / "tables.sql").read_text()
    block = sql.split("CREATE TABLE IF NOT EXISTS {db}.alerts")[1].split("ENGINE")[0]
    columns = [ln.split()[0] for ln in block.strip().strip("()").strip().splitlines() if ln.strip()]
    row = t.to_row()
    assert list(row) == columns
    assert row == {"ts": 1_000, "rule": "R", "state": "firing", "severity": "critical",
                   "app": "chat", "model": "m", "value": 2.5,
                   "labels": {"app": "chat", "model": "m", "environment": "prod"},
                   "annotations": {"summary": "s"}, "fingerprint": "f" * 16}
