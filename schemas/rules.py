"""Alert rules: the YAML rule file, its validation, and the alert result types.

A rules file is a mapping with a ``rules:`` list (and optionally ``version: 1``)::

    rules:
      - name: HighLatencyP99            # [A-Za-z_][A-Za-z0-9_]* (also a Prometheus alert name)
        kind: threshold                 # threshold | ratio | budget | change | absence | drift | runaway | compare
        expr: "latency_ms.p99 > 2000"   # METRIC OP NUMBER
        match: {app: "chat-*", environment: prod}   # fnmatch globs on the alert labels
        severity: warning               # info | warning | critical
        for: 3m                         # condition must hold this long before firing
        resolve_below: 1500             # hysteresis (or resolve_above for < / <= rules)
        resolve_after: 2m               # resolve condition must hold this long
        annotations:
          summary: "p99 latency {value:.0f} ms > {threshold} ms on {app}/{model}"

Every metric a rule can read has a dotted name. Window metrics are
:data:`driftline.schemas.window_stats.METRIC_NAMES`; drift results are the metric
source ``drift.p_value`` / ``drift.statistic`` / ``drift.drifted`` (1.0 or 0.0)
with the extra labels ``field`` and ``method``; a budget reads
``cost_usd.sum`` as a rolling sum. So every kind is "a value per label set,
compared with a threshold", and the evaluator runs one state machine for all.

Kinds and their fields (besides name, kind, match, severity, for, labels,
annotations, resolve_*):

========== ==================================================================
threshold  ``expr`` on a window metric; ``min_events`` (skip small windows)
ratio      like threshold, the metric must be a rate in [0, 1] and so must
           the threshold (``errors.rate``, ``guardrail.hit_rate``, ...)
budget     ``expr: "cost_usd.sum > 50"``, ``window`` (rolling, e.g. 24h),
           ``group_by`` subset of app/model/user_id (default ``[app]``)
change     ``metric``, ``increase_pct`` or ``decrease_pct``,
           ``baseline_windows`` (trailing median over N final windows),
           ``min_baseline_windows``, ``min_events``
absence    ``absent_for`` duration, ``group_by`` subset of app/model
           (default ``[app]``)
drift      ``expr`` on ``drift.p_value`` / ``drift.statistic`` /
           ``drift.drifted`` (``drift.drifted == true``); match may name
           ``field`` and ``method``
runaway    agents and sessions: ``expr`` on a per-trace (conversation, user)
           figure of :data:`RUNAWAY_METRICS` over a rolling ``window``
           (event time), ``group_by`` exactly one of trace_id /
           conversation_id / user_id (default ``[trace_id]``); the alert's
           labels are that id and the app. ``calls.count``,
           ``llm_calls.count``, ``tool_calls.count``, ``errors.count``,
           ``tokens.sum``, ``cost_usd.sum``, ``prompt.repeats`` (the most
           calls with one normalised prompt: casefolded, digits as 0,
           whitespace collapsed, hashed); compares with > or >=
compare    A/B on live traffic, as ``driftline gate`` decides it: ``baseline``
           and ``candidate`` (``{label: value}`` on the labels of
           :data:`driftline.schemas.comparison.LABELS`), optional ``app``, the
           gate's criteria (``max_p95_increase: 10%``, ... of
           :data:`~driftline.schemas.comparison.GATE_CRITERIA`, at least one),
           ``min_samples`` (500), ``alpha`` (0.05), ``lookback`` (1h, back
           from each evaluation) or ``since`` (a fixed RFC 3339 start), and
           ``interval`` (60s). Fires while a criterion fails with confidence
           (the gate's exit 1); the value is the number failing; labels
           baseline, candidate (``label=value,...``) and app
========== ==================================================================

Errors are :class:`RuleError` values naming the rule, the field and the
1-based line of that field (the rule's own line when the field is missing).
:func:`check_rules` lists them all; :func:`load_rules` raises
:class:`RuleFileError` holding them all.
"""

from __future__ import annotations

import hashlib
import math
import re
import string
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import yaml

from driftline.schemas.comparison import (
    GATE_CRITERIA,
    LABELS,
    RATE_CRITERIA,
    CompareSpec,
    parse_fraction,
)
from driftline.schemas.window_stats import METRIC_NAMES

__all__ = [
    "rfc3339_ms",
    "AlertTransition",
    "Condition",
    "CostObservation",
    "DriftObservation",
    "DRIFT_METRICS",
    "KINDS",
    "RATE_METRICS",
    "RUNAWAY_GROUPS",
    "RUNAWAY_METRICS",
    "Rule",
    "RuleError",
    "RuleFileError",
    "RuleSet",
    "SEVERITIES",
    "check_rules",
    "check_rules_text",
    "fingerprint",
    "load_rules",
    "parse_duration",
    "parse_rules",
]

Kind = Literal["threshold", "ratio", "budget", "change", "absence", "drift", "runaway", "compare"]
Severity = Literal["info", "warning", "critical"]
KINDS: Final[tuple[str, ...]] = ("threshold", "ratio", "budget", "change", "absence", "drift", "runaway",
                                 "compare")
SEVERITIES: Final[tuple[str, ...]] = ("info", "warning", "critical")
RATE_METRICS: Final[tuple[str, ...]] = (
    "errors.rate", "guardrail.hit_rate", "guardrail.blocked_rate", "feedback.negative_rate",
)
DRIFT_METRICS: Final[tuple[str, ...]] = ("drift.p_value", "drift.statistic", "drift.drifted")
#: what a runaway rule reads per trace (conversation, user) over its window
RUNAWAY_METRICS: Final[tuple[str, ...]] = (
    "calls.count", "llm_calls.count", "tool_calls.count", "errors.count", "tokens.sum", "cost_usd.sum",
    "prompt.repeats",
)
#: what a runaway rule groups by (one of them)
RUNAWAY_GROUPS: Final[tuple[str, ...]] = ("trace_id", "conversation_id", "user_id")
OPERATORS: Final[tuple[str, ...]] = (">=", "<=", "==", ">", "<")
# Labels a rule may match on, per kind (environment comes from the evaluator's static labels).
_WINDOW_LABELS = ("app", "model", "prompt_version", "environment")
_MATCH_LABELS: Final[dict[str, tuple[str, ...]]] = {
    "threshold": _WINDOW_LABELS,
    "ratio": _WINDOW_LABELS,
    "change": _WINDOW_LABELS,
    "budget": ("app", "model", "user_id", "environment"),
    "absence": ("app", "model", "environment"),
    "drift": (*_WINDOW_LABELS, "field", "method"),
    "runaway": ("app", "environment"),
    "compare": ("app", "environment", "baseline", "candidate"),
}
_COMMON_FIELDS = (
    "name", "kind", "match", "severity", "for", "labels", "annotations",
    "resolve_below", "resolve_above", "resolve_after",
)
_KIND_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "threshold": ("expr", "min_events"),
    "ratio": ("expr", "min_events"),
    "budget": ("expr", "window", "group_by"),
    "change": ("metric", "increase_pct", "decrease_pct", "baseline_windows",
               "min_baseline_windows", "min_events"),
    "absence": ("absent_for", "group_by"),
    "drift": ("expr",),
    "runaway": ("expr", "window", "group_by"),
    "compare": ("baseline", "candidate", "app", *(k for k, _m, _kind in GATE_CRITERIA), "min_samples", "alpha",
                "lookback", "since", "interval"),
}
_GROUP_BY: Final[dict[str, tuple[str, ...]]] = {
    "budget": ("app", "model", "user_id"),
    "absence": ("app", "model"),
    "runaway": RUNAWAY_GROUPS,
}
_TEMPLATE_COMMON = ("value", "threshold", "rule", "severity", "metric")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DURATION_RE = re.compile(r"^(?:\d+(?:ms|s|m|h|d))+$")
_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_EXPR_RE = re.compile(
    r"^\s*(?P<metric>[A-Za-z_][A-Za-z0-9_.]*)\s*(?P<op>>=|<=|==|>|<)\s*(?P<num>\S+)\s*$"
)


# ---------------------------------------------------------------------------------------------
# Result and input types
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RuleError:
    """One problem in a rules file: rule name ('' at file level), field, 1-based line."""

    rule: str
    field: str
    line: int
    message: str

    def __str__(self) -> str:
        where = f"rule {self.rule!r}" if self.rule else "file"
        fld = f", field {self.field!r}" if self.field else ""
        return f"line {self.line}: {where}{fld}: {self.message}"


class RuleFileError(ValueError):
    """Raised by :func:`load_rules`; ``errors`` holds every problem found."""

    def __init__(self, source: str, errors: list[RuleError]) -> None:
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: {len(errors)} error(s)\n" + "\n".join(map(str, errors)))


@dataclass(frozen=True, slots=True)
class CostObservation:
    """The cost of one call, fed by the worker for per-user budgets."""

    ts_ms: int
    app: str
    model: str
    user_id: str
    cost_usd: float


@dataclass(frozen=True, slots=True)
class DriftObservation:
    """One drift detector result (a ``drift_scores`` row), fed by the worker."""

    ts_ms: int
    app: str
    model: str
    prompt_version: str
    field: str
    method: str
    statistic: float
    p_value: float | None
    drifted: bool

    def metrics(self) -> dict[str, float]:
        """The result under the dotted names drift rules use."""
        out = {"drift.statistic": float(self.statistic), "drift.drifted": 1.0 if self.drifted else 0.0}
        if self.p_value is not None:
            out["drift.p_value"] = float(self.p_value)
        return out


def fingerprint(rule: str, labels: Mapping[str, str]) -> str:
    """Stable alert identity: sha256 over the rule name and the sorted labels, hex[:16].

    The digest input is ``rule`` then, per label in sorted order, ``"\\x00" + name + "=" +
    value``; it does not depend on label order, the process, or the Python version.
    """
    h = hashlib.sha256(rule.encode())
    for k in sorted(labels):
        h.update(b"\x00" + k.encode() + b"=" + str(labels[k]).encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class AlertTransition:
    """A state change of one alert (rule + label set): it started firing or it resolved."""

    ts_ms: int
    rule: str
    state: Literal["firing", "resolved"]
    severity: str
    labels: dict[str, str]
    annotations: dict[str, str]
    value: float
    fingerprint: str
    starts_at_ms: int
    ends_at_ms: int | None

    def to_row(self) -> dict[str, Any]:
        """The ClickHouse ``alerts`` row: exactly the table's columns (``ts`` in epoch ms)."""
        return {
            "ts": self.ts_ms,
            "rule": self.rule,
            "state": self.state,
            "severity": self.severity,
            "app": self.labels.get("app", ""),
            "model": self.labels.get("model", ""),
            "value": float(self.value),
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "fingerprint": self.fingerprint,
        }

    def group_key(self, by: tuple[str, ...] = ("alertname", "app")) -> str:
        """Key notifiers batch on: ``alertname`` is the rule, others are labels."""
        parts = []
        for name in by:
            value = self.rule if name == "alertname" else self.labels.get(name, "")
            parts.append(f"{name}={value}")
        return "{" + ",".join(parts) + "}"

    def to_json(self) -> dict[str, Any]:
        return {
            "ts_ms": self.ts_ms, "rule": self.rule, "state": self.state,
            "severity": self.severity, "labels": dict(self.labels),
            "annotations": dict(self.annotations), "value": self.value,
            "fingerprint": self.fingerprint, "starts_at_ms": self.starts_at_ms,
            "ends_at_ms": self.ends_at_ms,
        }


# ---------------------------------------------------------------------------------------------
# Rule model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Condition:
    """``metric op threshold``."""

    metric: str
    op: str
    threshold: float

    def holds(self, value: float) -> bool:
        return _compare(value, self.op, self.threshold)

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {_fmt_num(self.threshold)}"


def _compare(value: float, op: str, threshold: float) -> bool:
    if math.isnan(value):
        return False
    if op == ">":
        return value > threshold
    if op == ">=":
        return value >= threshold
    if op == "<":
        return value < threshold
    if op == "<=":
        return value <= threshold
    return value == threshold


def _fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@dataclass(frozen=True, slots=True)
class Rule:
    """One validated rule. Durations are in milliseconds."""

    name: str
    kind: Kind
    severity: Severity
    match: dict[str, str]
    labels: dict[str, str]
    annotations: dict[str, str]
    for_ms: int
    condition: Condition | None = None
    resolve_below: float | None = None
    resolve_above: float | None = None
    resolve_after_ms: int = 0
    min_events: int = 0
    window_ms: int = 0
    group_by: tuple[str, ...] = ()
    metric: str = ""
    increase_pct: float | None = None
    decrease_pct: float | None = None
    baseline_windows: int = 0
    min_baseline_windows: int = 0
    absent_for_ms: int = 0
    line: int = 0
    #: a compare rule's comparison (None for the other kinds)
    compare: CompareSpec | None = None

    @property
    def metric_name(self) -> str:
        """The dotted metric the rule reads (``events.absent_s`` for absence)."""
        if self.condition is not None:
            return self.condition.metric
        return self.metric or "events.absent_s"

    def matches(self, labels: Mapping[str, str]) -> bool:
        """True when every ``match`` glob matches the label (missing labels read as '')."""
        return all(_glob_match(labels.get(k, ""), pat) for k, pat in self.match.items())

    def resolved_by(self, value: float, firing_condition: bool) -> bool:
        """The resolve condition (hysteresis) for a firing alert at ``value``."""
        if self.resolve_below is not None:
            return not math.isnan(value) and value < self.resolve_below
        if self.resolve_above is not None:
            return not math.isnan(value) and value > self.resolve_above
        return not firing_condition


def _glob_match(value: str, pattern: str) -> bool:
    # fnmatchcase: case-sensitive on every OS, like label matching in Prometheus.
    from fnmatch import fnmatchcase

    return fnmatchcase(value, pattern)


@dataclass(frozen=True, slots=True)
class RuleSet:
    """The validated rules of one file, in file order."""

    rules: tuple[Rule, ...]
    source: str = "<string>"

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def by_name(self, name: str) -> Rule:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(name)

    def of_kind(self, *kinds: str) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.kind in kinds)


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


class _Lined(dict[str, Any]):
    """A YAML mapping that remembers its own line and the line of each key (1-based)."""

    line: int
    key_lines: dict[str, int]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings are :class:`_Lined` (records the line of each rule mapping)."""


def _construct_lined(loader: yaml.SafeLoader, node: yaml.MappingNode) -> _Lined:
    loader.flatten_mapping(node)
    out = _Lined()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        out[str(key)] = loader.construct_object(value_node, deep=True)
        out.key_lines[str(key)] = key_node.start_mark.line + 1
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_lined)


def parse_duration(text: str) -> int:
    """``"90s"``, ``"3m"``, ``"1h30m"``, ``"250ms"`` -> milliseconds. Raises ValueError."""
    s = str(text).strip()
    if not _DURATION_RE.match(s):
        raise ValueError(f"invalid duration {text!r} (use e.g. 30s, 3m, 1h30m, 24h)")
    return sum(int(n) * _UNIT_MS[u] for n, u in _DURATION_PART.findall(s))


class _Checker:
    """Validates one rule mapping, collecting every error instead of stopping at the first."""

    def __init__(self, raw: _Lined, name: str, errors: list[RuleError]) -> None:
        self.raw = raw
        self.name = name
        self.errors = errors
        self._n_before = len(errors)

    def clean(self) -> bool:
        """No error found in this rule so far."""
        return len(self.errors) == self._n_before

    def line_of(self, fld: str) -> int:
        return self.raw.key_lines.get(fld, self.raw.line)

    def err(self, fld: str, message: str) -> None:
        self.errors.append(RuleError(self.name, fld, self.line_of(fld), message))

    def duration(self, fld: str, default: int = 0) -> int:
        if fld not in self.raw:
            return default
        try:
            return parse_duration(self.raw[fld])
        except ValueError as e:
            self.err(fld, str(e))
            return default

    def number(self, fld: str, *, lo: float | None = None, hi: float | None = None,
               integer: bool = False) -> float | None:
        if fld not in self.raw:
            return None
        v = self.raw[fld]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            self.err(fld, f"must be {'an integer' if integer else 'a number'}, got {v!r}")
            return None
        if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f"[{'' if lo is None else _fmt_num(lo)}, {'' if hi is None else _fmt_num(hi)}]"
            self.err(fld, f"must be in {rng}, got {v!r}")
            return None
        return float(v)

    def str_map(self, fld: str) -> dict[str, str]:
        v = self.raw.get(fld, {})
        if v is None:
            return {}
        if not isinstance(v, dict):
            self.err(fld, f"must be a mapping, got {type(v).__name__}")
            return {}
        out: dict[str, str] = {}
        for k, x in v.items():
            if isinstance(x, (dict, list)) or x is None:
                self.err(fld, f"value of {k!r} must be a string")
                continue
            out[str(k)] = str(x).lower() if isinstance(x, bool) else str(x)
        return out

    def expr(self, allowed: tuple[str, ...], what: str) -> Condition | None:
        if "expr" not in self.raw:
            self.err("expr", "is required")
            return None
        text = self.raw["expr"]
        m = _EXPR_RE.match(str(text))
        if not isinstance(text, str) or m is None:
            self.err("expr", f"must be 'METRIC OP NUMBER' with OP one of > >= < <= ==, got {text!r}")
            return None
        metric, op, num = m["metric"], m["op"], m["num"]
        ok = True
        if metric not in allowed:
            self.err("expr", f"unknown metric {metric!r} for a {what} rule (known: {', '.join(allowed)})")
            ok = False
        if num.lower() in ("true", "false"):
            if metric != "drift.drifted" or op != "==":
                self.err("expr", "true/false only compare with '==' on drift.drifted")
                return None
            value = 1.0 if num.lower() == "true" else 0.0
        else:
            try:
                value = float(num)
            except ValueError:
                self.err("expr", f"threshold {num!r} is not a number")
                return None
            if not math.isfinite(value):
                self.err("expr", f"threshold {num!r} must be finite")
                return None
        if op == "==" and metric != "drift.drifted":
            self.err("expr", "'==' is only allowed on drift.drifted (floats are compared with > >= < <=)")
            ok = False
        return Condition(metric, op, value) if ok else None


def _template_fields(text: str) -> list[tuple[str, str]]:
    """``[(field_name, format_spec)]`` of a str.format template; raises ValueError."""
    out = []
    for _lit, fname, spec, conv in string.Formatter().parse(text):
        if fname is None:
            continue
        if conv is not None:
            raise ValueError(f"conversion '!{conv}' is not supported")
        if not fname or not _LABEL_NAME_RE.match(fname):
            raise ValueError(f"placeholder {{{fname}}} must be a plain name like {{value}}")
        out.append((fname, spec or ""))
    return out


def template_names(rule_kind: str, group_by: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Placeholders an annotation template of this kind may use."""
    labels: tuple[str, ...]
    if rule_kind in ("budget", "absence"):
        labels = (*group_by, "environment")
    elif rule_kind == "runaway":
        labels = (*group_by, "app", "environment")
    else:
        labels = _MATCH_LABELS[rule_kind]
    extra: tuple[str, ...] = ("baseline",) if rule_kind == "change" else ()
    if rule_kind == "compare":
        extra = ("failing", "n_baseline", "n_candidate")
    return (*_TEMPLATE_COMMON, *labels, *extra)


_NUMERIC_PLACEHOLDERS = ("value", "threshold", "baseline", "n_baseline", "n_candidate")


@dataclass
class _KindParts:
    """The kind-specific fields of a rule being checked (defaults: not used by this kind)."""

    condition: Condition | None = None
    group_by: tuple[str, ...] = ()
    window_ms: int = 0
    absent_for_ms: int = 0
    baseline_windows: int = 0
    min_baseline_windows: int = 0
    min_events: int = 0
    metric: str = ""
    increase_pct: float | None = None
    decrease_pct: float | None = None
    compare: CompareSpec | None = None


def _check_rule(raw: Any, index: int, seen: dict[str, int], errors: list[RuleError],
                list_line: int) -> Rule | None:
    """One rule mapping checked field by field; every error is appended to ``errors``.

    The checks run in a fixed order, which is the order of same-line errors in
    the report. Returns the rule, or ``None`` when it had any error.
    """
    if not isinstance(raw, _Lined):
        errors.append(RuleError(f"#{index + 1}", "", list_line, "each rule must be a mapping"))
        return None
    name_v = raw.get("name")
    name = name_v if isinstance(name_v, str) and name_v else f"#{index + 1}"
    c = _Checker(raw, name, errors)
    _check_name(c, name_v, seen)
    kind = raw.get("kind")
    if kind not in KINDS:
        c.err("kind", "is required" if "kind" not in raw
              else f"must be one of {', '.join(KINDS)}, got {kind!r}")
        # Without a kind the other fields cannot be checked meaningfully.
        return None
    allowed_fields = (*_COMMON_FIELDS, *_KIND_FIELDS[kind])
    for k in raw:
        if k not in allowed_fields:
            c.err(k, f"unknown field for a {kind} rule (allowed: {', '.join(allowed_fields)})")
    severity = raw.get("severity", "warning")
    if severity not in SEVERITIES:
        c.err("severity", f"must be one of {', '.join(SEVERITIES)}, got {severity!r}")
    match, labels = _check_match_and_labels(c, kind)
    for_ms = c.duration("for")
    resolve_after_ms = c.duration("resolve_after")
    parts = _KindParts()
    _KIND_CHECKS[kind](c, kind, parts)
    if kind in ("threshold", "ratio", "change"):
        me = c.number("min_events", lo=0, integer=True)
        parts.min_events = int(me or 0)
    if kind in _GROUP_BY:
        parts.group_by = _check_group_by(c, kind, match)
    rb, ra = _check_hysteresis(c, kind, parts.condition)
    annotations = _check_annotations(c, kind, parts.group_by)
    if not c.clean():
        return None
    return Rule(
        name=name, kind=kind, severity=severity, match=match, labels=labels,
        annotations=annotations, for_ms=for_ms, condition=parts.condition,
        resolve_below=rb, resolve_above=ra, resolve_after_ms=resolve_after_ms,
        min_events=parts.min_events, window_ms=parts.window_ms, group_by=parts.group_by,
        metric=parts.metric, increase_pct=parts.increase_pct, decrease_pct=parts.decrease_pct,
        baseline_windows=parts.baseline_windows, min_baseline_windows=parts.min_baseline_windows,
        absent_for_ms=parts.absent_for_ms, line=raw.line, compare=parts.compare,
    )


def _check_name(c: _Checker, name_v: Any, seen: dict[str, int]) -> None:
    """A Prometheus alert name, unique in the file (``seen``: name -> first line)."""
    if "name" not in c.raw:
        c.err("name", "is required")
    elif not (isinstance(name_v, str) and _NAME_RE.match(name_v)):
        c.err("name", f"must match [A-Za-z_][A-Za-z0-9_]* (a Prometheus alert name), got {name_v!r}")
    elif name_v in seen:
        c.err("name", f"duplicate rule name (first defined on line {seen[name_v]})")
    else:
        seen[name_v] = c.raw.line


def _check_match_and_labels(c: _Checker, kind: str) -> tuple[dict[str, str], dict[str, str]]:
    """``match`` on the labels this kind has, and extra ``labels`` that shadow none of them."""
    match = c.str_map("match")
    for k in match:
        if k not in _MATCH_LABELS[kind]:
            c.err("match", f"cannot match on {k!r} in a {kind} rule (allowed: {', '.join(_MATCH_LABELS[kind])})")
    labels = c.str_map("labels")
    for k in labels:
        if not _LABEL_NAME_RE.match(k) or k in ("alertname", "severity", *_MATCH_LABELS[kind], *RUNAWAY_GROUPS):
            c.err("labels", f"label {k!r} is reserved or not a valid label name")
    return match, labels


def _check_window_kind(c: _Checker, kind: str, parts: _KindParts) -> None:
    """threshold and ratio: ``expr`` on a window metric (a ratio's on a rate in [0, 1])."""
    allowed = RATE_METRICS if kind == "ratio" else METRIC_NAMES
    condition = c.expr(allowed, kind)
    if condition is not None and condition.metric in RATE_METRICS and not 0 <= condition.threshold <= 1:
        c.err("expr", f"{condition.metric} is a rate in [0, 1]; threshold {_fmt_num(condition.threshold)} is outside")
        condition = None
    parts.condition = condition


def _check_drift_kind(c: _Checker, kind: str, parts: _KindParts) -> None:
    """drift: ``expr`` on a drift result (a p-value threshold is a probability)."""
    condition = c.expr(DRIFT_METRICS, "drift")
    if condition is not None and condition.metric == "drift.p_value" and not 0 <= condition.threshold <= 1:
        c.err("expr", "drift.p_value is a probability; the threshold must be in [0, 1]")
        condition = None
    parts.condition = condition


def _check_budget_kind(c: _Checker, kind: str, parts: _KindParts) -> None:
    """budget: ``cost_usd.sum >`` (or ``>=``) a limit over a required positive rolling window."""
    condition = c.expr(("cost_usd.sum",), "budget")
    if condition is not None and condition.op not in (">", ">="):
        c.err("expr", "a budget compares with > or >=")
        condition = None
    parts.condition = condition
    if "window" not in c.raw:
        c.err("window", "is required (the rolling window, e.g. 1h or 24h)")
    parts.window_ms = c.duration("window")
    if "window" in c.raw and parts.window_ms <= 0 and c.clean():
        c.err("window", "must be positive")


def _check_change_kind(c: _Checker, kind: str, parts: _KindParts) -> None:
    """change: a metric, exactly one of increase_pct / decrease_pct, the baseline's windows."""
    raw = c.raw
    mv = raw.get("metric")
    if "metric" not in raw:
        c.err("metric", "is required")
    elif mv not in METRIC_NAMES:
        c.err("metric", f"unknown metric {mv!r} (known: {', '.join(METRIC_NAMES)})")
    else:
        parts.metric = str(mv)
    parts.increase_pct = c.number("increase_pct", lo=0)
    parts.decrease_pct = c.number("decrease_pct", lo=0, hi=100)
    if ("increase_pct" in raw) == ("decrease_pct" in raw):
        c.err("increase_pct", "give exactly one of increase_pct or decrease_pct")
    bw = c.number("baseline_windows", lo=1, integer=True)
    if "baseline_windows" not in raw:
        c.err("baseline_windows", "is required (number of trailing windows in the median)")
    parts.baseline_windows = int(bw or 0)
    mb = c.number("min_baseline_windows", lo=1, integer=True)
    parts.min_baseline_windows = int(mb) if mb is not None else min(5, parts.baseline_windows)
    if parts.baseline_windows and parts.min_baseline_windows > parts.baseline_windows:
        c.err("min_baseline_windows", "must not exceed baseline_windows")


def _check_absence_kind(c: _Checker, kind: str, parts: _KindParts) -> None:
    """absence: a required positive ``absent_for``."""
    if "absent_for" not in c.raw:
        c.err("absent_for", "is required (e.g. 10m)")
    parts.absent_for_ms = c.duration("absent_for")
    if "absent_for" in c.raw and parts.absent_for_ms <= 0 and c.clean():
        c.err("absent_for", "must be positive")


def _check_runaway_kind(c: _Checker, kind: str, parts: _KindParts) -> None:
    """runaway: ``METRIC >`` (or ``>=``) a limit over a required positive rolling window."""
    condition = c.expr(RUNAWAY_METRICS, "runaway")
    if condition is not None and condition.op not in (">", ">="):
        c.err("expr", "a runaway rule compares with > or >=")
        condition = None
    parts.condition = condition
    if "window" not in c.raw:
        c.err("window", "is required (the rolling window of event time, e.g. 10m)")
    parts.window_ms = c.duration("window")
    if "window" in c.raw and parts.window_ms <= 0 and c.clean():
        c.err("window", "must be positive")


def _check_population(c: _Checker, fld: str) -> tuple[tuple[str, str], ...]:
    """A compare rule's ``baseline`` / ``candidate``: a non-empty ``{label: value}`` mapping."""
    if fld not in c.raw:
        c.err(fld, "is required (a mapping of label: value, e.g. {prompt_version: v4})")
        return ()
    if not isinstance(c.raw[fld], dict) or not c.raw[fld]:
        c.err(fld, f"must be a non-empty mapping of label: value, got {c.raw[fld]!r}")
        return ()
    pop = c.str_map(fld)
    for k in pop:
        if k not in LABELS:
            c.err(fld, f"unknown label {k!r} (labels: {', '.join(LABELS)})")
    return tuple(sorted(pop.items()))


def _check_limits(c: _Checker) -> list[tuple[str, float]]:
    """A compare rule's criteria: the gate's limits, ``10%`` or a fraction (rates <= 100%)."""
    raw = c.raw
    limits: list[tuple[str, float]] = []
    for key, _metric, _kind in GATE_CRITERIA:
        if key not in raw:
            continue
        v = raw[key]
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            c.err(key, f"must be a percentage like 10% (or a fraction like 0.1), got {v!r}")
            continue
        try:
            x = parse_fraction(str(v), key)
        except ValueError as e:
            c.err(key, str(e).removeprefix(f"{key}: "))
            continue
        if key in RATE_CRITERIA and x > 1.0:
            c.err(key, f"a rate limit must be at most 100%, got {v!r}")
            continue
        limits.append((key, x))
    if not any(key in raw for key, _m, _k in GATE_CRITERIA):
        c.err("kind", "a compare rule needs at least one criterion ("
              + ", ".join(k for k, _m, _k2 in GATE_CRITERIA) + ")")
    return limits


def _check_compare_kind(c: _Checker, kind: str, parts: _KindParts) -> None:
    """compare: two populations, the gate's criteria, how many calls and how often."""
    raw = c.raw
    n0 = len(c.errors)
    base, cand = _check_population(c, "baseline"), _check_population(c, "candidate")
    if base and cand and base == cand:
        c.err("candidate", "is the same filter as baseline: the two populations must differ")
    app = raw.get("app")
    if "app" in raw and (not isinstance(app, str) or not app):
        c.err("app", f"must be an app name, got {app!r}")
    limits = _check_limits(c)
    alpha = c.number("alpha")
    if alpha is not None and not 0.0 < alpha < 1.0:
        c.err("alpha", f"must be in (0, 1), got {raw['alpha']!r}")
    ms = c.number("min_samples", lo=2, integer=True)
    lookback_ms: int | None = c.duration("lookback", 3_600_000)
    if "lookback" in raw and lookback_ms is not None and lookback_ms <= 0 and c.clean():
        c.err("lookback", "must be positive")
    since_ms: int | None = None
    if "since" in raw:
        if "lookback" in raw:
            c.err("since", "give lookback (sliding) or since (a fixed start), not both")
        since = raw["since"]
        since_ms = rfc3339_ms(since.strip() if isinstance(since, str) else since)
        if since_ms is None:
            c.err("since", f"must be an RFC 3339 time like 2026-11-29T10:00:00Z, got {raw['since']!r}")
        lookback_ms = None
    interval_ms = c.duration("interval", 60_000)
    if "interval" in raw and interval_ms < 1000:
        c.err("interval", f"must be at least 1s, got {raw['interval']!r}")
    parts.metric = "gate.failing"
    if len(c.errors) == n0:
        parts.compare = CompareSpec(
            base, cand, tuple(limits), app=app, min_samples=int(ms) if ms is not None else 500,
            alpha=alpha if alpha is not None else 0.05, lookback_ms=lookback_ms, since_ms=since_ms,
            interval_ms=interval_ms)


def rfc3339_ms(v: Any) -> int | None:
    """An RFC 3339 time (a string, or the datetime YAML makes of an unquoted one) as epoch
    ms (UTC when it names no zone); None when it is not one. Shared by the rule files and
    the CLI's time options."""
    import datetime as dt

    if isinstance(v, str):
        try:
            v = dt.datetime.fromisoformat(v)
        except ValueError:
            return None
    if not isinstance(v, dt.datetime):
        return None
    if v.tzinfo is None:
        v = v.replace(tzinfo=dt.UTC)
    return int(v.timestamp() * 1000)


_KIND_CHECKS: Final[dict[str, Callable[[_Checker, str, _KindParts], None]]] = {
    "threshold": _check_window_kind,
    "ratio": _check_window_kind,
    "drift": _check_drift_kind,
    "budget": _check_budget_kind,
    "change": _check_change_kind,
    "absence": _check_absence_kind,
    "runaway": _check_runaway_kind,
    "compare": _check_compare_kind,
}


def _check_group_by(c: _Checker, kind: str, match: dict[str, str]) -> tuple[str, ...]:
    """A non-empty list of this kind's group labels (default ``[app]``, ``[trace_id]`` for
    runaway, which takes exactly one); a bad one reads as the default."""
    default = ["trace_id"] if kind == "runaway" else ["app"]
    gb = c.raw.get("group_by", default)
    if isinstance(gb, str):
        gb = [gb]
    if not isinstance(gb, list) or not gb or any(g not in _GROUP_BY[kind] for g in gb):
        c.err("group_by", f"must be a non-empty list of {', '.join(_GROUP_BY[kind])}, got {gb!r}")
        gb = default
    elif kind == "runaway" and len(gb) != 1:
        c.err("group_by", f"a runaway rule groups by exactly one of {', '.join(RUNAWAY_GROUPS)}, got {gb!r}")
        gb = default
    group_by = tuple(dict.fromkeys(str(g) for g in gb))
    if "user_id" in match and "user_id" not in group_by:
        c.err("match", "matching on 'user_id' needs user_id in group_by")
    return group_by


def _check_hysteresis(c: _Checker, kind: str,
                      condition: Condition | None) -> tuple[float | None, float | None]:
    """``resolve_below`` / ``resolve_above``: one of them, on the resolving side of the threshold."""
    rb = c.number("resolve_below")
    ra = c.number("resolve_above")
    if rb is not None and ra is not None:
        c.err("resolve_above", "give resolve_below or resolve_above, not both")
    if condition is not None:
        op, thr = condition.op, condition.threshold
        if rb is not None:
            if op not in (">", ">="):
                c.err("resolve_below", f"only for '>'/'>=' rules (this rule uses {op!r}; use resolve_above)")
            elif rb > thr:
                c.err("resolve_below", f"must be <= the threshold {_fmt_num(thr)}, got {_fmt_num(rb)}")
        if ra is not None:
            if op not in ("<", "<="):
                c.err("resolve_above", f"only for '<'/'<=' rules (this rule uses {op!r}; use resolve_below)")
            elif ra < thr:
                c.err("resolve_above", f"must be >= the threshold {_fmt_num(thr)}, got {_fmt_num(ra)}")
    elif kind in ("change", "absence", "compare") and (rb is not None or ra is not None):
        c.err("resolve_below" if rb is not None else "resolve_above",
              f"a {kind} rule has no fixed threshold; use resolve_after")
    return rb, ra


def _check_annotations(c: _Checker, kind: str, group_by: tuple[str, ...]) -> dict[str, str]:
    """Annotation templates: known placeholders only, and they must format."""
    annotations = c.str_map("annotations")
    names = template_names(kind, group_by)
    for key, text in annotations.items():
        try:
            fields = _template_fields(text)
        except ValueError as e:
            c.err("annotations", f"{key}: bad template: {e}")
            continue
        for fname, spec in fields:
            if fname not in names:
                c.err("annotations", f"{key}: unknown placeholder {{{fname}}} (known: {', '.join(names)})")
                continue
            sample: object = 1.5 if fname in _NUMERIC_PLACEHOLDERS else "x"
            try:
                format(sample, spec)
            except (ValueError, TypeError) as e:
                c.err("annotations", f"{key}: bad format spec {{{fname}:{spec}}}: {e}")
    return annotations


def _parse(text: str) -> tuple[tuple[Rule, ...], list[RuleError]]:
    errors: list[RuleError] = []
    try:
        doc = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else 1
        return (), [RuleError("", "", line, f"YAML syntax error: {e.problem or e}")]
    except yaml.YAMLError as e:
        return (), [RuleError("", "", 1, f"YAML error: {e}")]
    if doc is None:
        return (), [RuleError("", "rules", 1, "empty file: expected a mapping with a 'rules:' list")]
    if not isinstance(doc, _Lined):
        return (), [RuleError("", "", 1, "expected a mapping with a 'rules:' list")]
    for k in doc:
        if k not in ("rules", "version"):
            errors.append(RuleError("", k, doc.key_lines[k], "unknown top-level field (allowed: version, rules)"))
    if "version" in doc and doc["version"] != 1:
        errors.append(RuleError("", "version", doc.key_lines["version"], f"unsupported version {doc['version']!r} (expected 1)"))
    rules_raw = doc.get("rules")
    if not isinstance(rules_raw, list):
        errors.append(RuleError("", "rules", doc.key_lines.get("rules", doc.line),
                                "is required and must be a list of rules"))
        return (), errors
    seen: dict[str, int] = {}
    rules: list[Rule] = []
    list_line = doc.key_lines["rules"]
    for i, raw in enumerate(rules_raw):
        r = _check_rule(raw, i, seen, errors, list_line)
        if r is not None:
            rules.append(r)
    errors.sort(key=lambda e: e.line)  # stable: same-line errors keep the order found
    return tuple(rules), errors


def check_rules_text(text: str) -> list[RuleError]:
    """Every error in a rules document (empty when valid)."""
    return _parse(text)[1]


def parse_rules(text: str, source: str = "<string>") -> RuleSet:
    """Parse and validate a rules document; raises :class:`RuleFileError` listing all errors."""
    rules, errors = _parse(text)
    if errors:
        raise RuleFileError(source, errors)
    return RuleSet(rules, source)


def check_rules(path: str | Path) -> list[RuleError]:
    """Every error in a rules file, for ``driftline rules check FILE`` (empty when valid)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        return [RuleError("", "", 0, f"cannot read {path}: {e}")]
    return check_rules_text(text)


def load_rules(path: str | Path) -> RuleSet:
    """Load and validate a rules file; raises :class:`RuleFileError` listing all errors."""
    p = Path(path)
    return parse_rules(p.read_text(encoding="utf-8"), str(p))
