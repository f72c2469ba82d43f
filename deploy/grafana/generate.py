"""driftline's Grafana dashboards, generated from this one file.

    python deploy/grafana/generate.py           # (re)write deploy/grafana/dashboards/*.json
    python deploy/grafana/generate.py --check   # exit 1 when a checked-in file differs

Three dashboards for the grafana-clickhouse-datasource plugin (4.x) and Prometheus:

- ``driftline-overview``: per app/model/prompt_version, from ``llm_window_metrics`` (the
  newest row of each window: ``FINAL``; every row of one window is on one shard in cluster
  mode, streams/sinks/cluster.py), plus a row of the worker's Prometheus metrics;
- ``driftline-drift``: p-value per method against its threshold from ``drift_scores``, the
  flagged tests (also as annotations) and the reference in force from ``drift_references``;
- ``driftline-alerts``: the firing/resolved timeline per rule and key from ``alerts``.

Every panel is a :class:`Panel` below; the SQL uses only the macros of :data:`MACROS` and
the template variables of each dashboard, which :func:`expand` substitutes the way the
plugin and Grafana do (tests/unit/test_grafana_dashboards.py, and
tests/integration/test_grafana_panels_on_chdb.py runs every query on chDB against a store a
worker filled). Data sources are the variables ``ds_clickhouse`` / ``ds_prometheus``
whose default is the uid of deploy/grafana/provisioning/datasources/driftline.yaml, so
the same files work provisioned and imported into another Grafana.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "dashboards"

CH_TYPE = "grafana-clickhouse-datasource"
CH_UID = "driftline-clickhouse"  # provisioning/datasources/driftline.yaml
PROM_UID = "driftline-prometheus"
PLUGIN_VERSION = "4.20.0"  # the plugin release whose macros and query JSON these follow (compose pins it)
CH = {"type": CH_TYPE, "uid": "${ds_clickhouse}"}
PROM = {"type": "prometheus", "uid": "${ds_prometheus}"}

#: The plugin's macros the dashboards use, as the plugin expands them (pkg/macros/macros.go):
#: S/E are the range's start and end in unix seconds, N the interval in seconds (at least 1).
MACROS = {
    "$__timeFilter(col)": "col >= toDateTime(S) AND col <= toDateTime(E)",
    "$__fromTime": "toDateTime(S)",
    "$__toTime": "toDateTime(E)",
    "$__interval_s": "N",
}

# ------------------------------------------------------------------ substitution


def _quote(value: str) -> str:
    # Grafana's :singlequote format: each value in single quotes, quotes escaped with \
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def expand(sql: str, *, start_s: int, end_s: int, interval_s: int,
           variables: Mapping[str, Sequence[str]]) -> str:
    """``sql`` as the plugin sends it to ClickHouse for the range [start_s, end_s].

    Supported: the macros of :data:`MACROS`, and template variables written
    ``${name:singlequote}`` (a multi-value list: ``'a','b'``) or ``${name}`` (the values
    joined by ``,``). Raises ValueError on anything else left with a ``$`` (an unknown
    macro, a variable not in ``variables``), so a typo cannot pass unnoticed.
    """
    if end_s < start_s:
        raise ValueError(f"the range ends ({end_s}) before it starts ({start_s})")
    s, e, n = f"toDateTime({int(start_s)})", f"toDateTime({int(end_s)})", str(max(1, int(interval_s)))
    out = re.sub(r"\$__timeFilter\(\s*([^()]+?)\s*\)", lambda m: f"{m[1]} >= {s} AND {m[1]} <= {e}", sql)
    out = re.sub(r"\$__fromTime\b", s, out)
    out = re.sub(r"\$__toTime\b", e, out)
    out = re.sub(r"\$__interval_s\b", n, out)

    def var(m: re.Match[str]) -> str:
        name, fmt = m[1], m[2]
        if name not in variables:
            raise ValueError(f"template variable ${{{name}}} has no value")
        values = list(variables[name])
        if fmt == "singlequote":
            return ",".join(_quote(v) for v in values)
        if fmt is None:
            return ",".join(values)
        raise ValueError(f"unsupported variable format ${{{name}:{fmt}}}")

    out = re.sub(r"\$\{(\w+)(?::(\w+))?\}", var, out)
    left = re.findall(r"\$\S*", out)
    if left:
        raise ValueError(f"not substituted: {left}")
    return out


def expand_promql(expr: str, variables: Mapping[str, Sequence[str]]) -> str:
    """A PromQL ``expr`` as Grafana's Prometheus data source sends it: ``$__rate_interval``
    -> 1m, and a multi-value ``$name`` -> ``(a|b)`` with regex characters escaped by two
    backslashes (its prometheusSpecialRegexEscape; Grafana's generic ``${name:regex}``
    escapes with one, which PromQL strings refuse, so the dashboards write ``$name``).
    Raises ValueError on anything else left with a ``$``."""
    out = expr.replace("$__rate_interval", "1m")

    def var(m: re.Match[str]) -> str:
        if m[1] not in variables:
            raise ValueError(f"template variable ${m[1]} has no value")
        return "(" + "|".join(re.sub(r"([\\$^*{}\[\]'+?.()|])", r"\\\\\1", v) for v in variables[m[1]]) + ")"

    out = re.sub(r"\$(\w+)\b", var, out)
    if "$" in out:
        raise ValueError(f"not substituted in {out!r}")
    return out


# ------------------------------------------------------------------ panels


@dataclass(frozen=True)
class Panel:
    """One panel. ``sql`` (ClickHouse) or ``expr`` (Prometheus, one per legend); ``columns``
    are the result's (name, kind) with kind time | string | number: what the panel needs
    (a time series: one time column, string labels, number values), checked on chDB."""

    title: str
    kind: str  # timeseries | table | stat | state-timeline | row
    sql: str = ""
    columns: tuple[tuple[str, str], ...] = ()
    exprs: tuple[tuple[str, str], ...] = ()  # (PromQL, legend)
    unit: str = ""
    width: int = 12
    height: int = 8
    description: str = ""
    display: str = ""  # the field display name (for long-to-wide series: ${__field.labels.key})
    options: Mapping[str, Any] = field(default_factory=dict)
    field_config: Mapping[str, Any] = field(default_factory=dict)
    overrides: tuple[Mapping[str, Any], ...] = ()
    links: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("timeseries", "table", "stat", "state-timeline", "row"):
            raise ValueError(f"{self.title}: unknown panel kind {self.kind!r}")
        if self.kind != "row" and bool(self.sql) == bool(self.exprs):
            raise ValueError(f"{self.title}: give either sql or exprs")
        if self.sql and not self.columns:
            raise ValueError(f"{self.title}: a SQL panel declares its result columns")
        if any(k not in ("time", "string", "number") for _, k in self.columns):
            raise ValueError(f"{self.title}: column kinds are time, string or number")
        if self.kind in ("timeseries", "state-timeline") and self.sql and [
                k for _, k in self.columns][:1] != ["time"]:
            raise ValueError(f"{self.title}: a time series starts with its time column")


@dataclass(frozen=True)
class Variable:
    name: str
    label: str
    sql: str  # the ClickHouse query of its values

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z_]+", self.name):
            raise ValueError(f"variable name {self.name!r}: lowercase letters and _ only")


@dataclass(frozen=True)
class Annotation:
    name: str
    sql: str  # columns time, timeEnd (optional), text, tags
    columns: tuple[tuple[str, str], ...]
    color: str = "red"


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    variables: tuple[Variable, ...]
    panels: tuple[Panel, ...]
    annotations: tuple[Annotation, ...] = ()
    prometheus: bool = False

    def sql_queries(self) -> list[tuple[str, str, tuple[tuple[str, str], ...]]]:
        """(what, sql, expected columns) of every ClickHouse query: panels, variables, annotations."""
        out = [(f"panel {p.title!r}", p.sql, p.columns) for p in self.panels if p.sql]
        out += [(f"variable {v.name}", v.sql, ((v.name, "string"),)) for v in self.variables]
        out += [(f"annotation {a.name!r}", a.sql, a.columns) for a in self.annotations]
        return out


KEY = "concat(app, '/', model, '/', prompt_version)"
KEY_FILTER = ("app IN (${app:singlequote}) AND model IN (${model:singlequote}) "
              "AND prompt_version IN (${prompt_version:singlequote})")
#: the newest row of each window of the range (rows are re-emitted while a window is open;
#: updated_at is the ReplacingMergeTree version, so FINAL keeps the newest)
WINDOWS = ("(SELECT * FROM ${database}.llm_window_metrics FINAL "
           "WHERE $__timeFilter(window_start) AND " + KEY_FILTER + ") AS w")
WINDOW_S = "(toUnixTimestamp64Milli(window_end) - toUnixTimestamp64Milli(window_start)) / 1000"


def _key_variables(table: str, ts: str, *, prompt_version: bool = True) -> tuple[Variable, ...]:
    src = f"FROM ${{database}}.{table} WHERE $__timeFilter({ts})"
    out = [Variable("app", "app", f"SELECT DISTINCT app {src} ORDER BY app"),
           Variable("model", "model", f"SELECT DISTINCT model {src} AND app IN (${{app:singlequote}}) ORDER BY model")]
    if prompt_version:
        out.append(Variable("prompt_version", "prompt_version",
                            f"SELECT DISTINCT prompt_version {src} AND app IN (${{app:singlequote}}) "
                            "AND model IN (${model:singlequote}) ORDER BY prompt_version"))
    return tuple(out)


def _series(title: str, value_sql: str, unit: str, description: str, *, values: Sequence[str] = ("value",),
            display: str = "${__field.labels.key}", **kw: Any) -> Panel:
    """A per-key time series over the window rows: columns time, key, then ``values``."""
    sql = (f"SELECT window_start AS time, {KEY} AS key, {value_sql} FROM {WINDOWS} "
           "ORDER BY time, key")
    cols = (("time", "time"), ("key", "string"), *((v, "number") for v in values))
    return Panel(title, "timeseries", sql=sql, columns=cols, unit=unit, description=description,
                 display=display, **kw)


def overview() -> Dashboard:
    # w.column: the window row's column, not the alias of the same name
    totals = ("SELECT sum(w.events) AS events, sum(w.errors) / greatest(sum(w.events), 1) AS error_rate, "
              "sum(w.cost_usd) AS cost_usd, sum(w.input_tokens + w.output_tokens) AS tokens, "
              f"sum(w.guardrail_hits) / greatest(sum(w.events), 1) AS guardrail_hit_rate FROM {WINDOWS}")
    per_key = (f"SELECT app, model, prompt_version, sum(w.events) AS events, sum(w.errors) AS errors, "
               "sum(w.errors) / greatest(sum(w.events), 1) AS error_rate, "
               "max(w.latency_p95_ms) AS max_latency_p95_ms, max(w.ttft_p95_ms) AS max_ttft_p95_ms, "
               "sum(w.input_tokens) AS input_tokens, sum(w.output_tokens) AS output_tokens, "
               f"sum(w.cost_usd) AS cost_usd, sum(w.guardrail_hits) AS guardrail_hits FROM {WINDOWS} "
               "GROUP BY app, model, prompt_version ORDER BY events DESC")
    num = "number"
    panels = (
        Panel("Totals over the range", "stat", sql=totals, width=24, height=4,
              columns=(("events", num), ("error_rate", num), ("cost_usd", num), ("tokens", num),
                       ("guardrail_hit_rate", num)),
              description="Sums over the windows that start in the range (the newest row of each window).",
              options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                       "textMode": "value_and_name", "colorMode": "none"},
              overrides=(_unit("error_rate", "percentunit"), _unit("guardrail_hit_rate", "percentunit"),
                         _unit("cost_usd", "currencyUSD"), _unit("events", "short"), _unit("tokens", "short"))),
        _series("Events per second", f"events / ({WINDOW_S}) AS events_per_s", "reqps",
                "Events of each window divided by the window's length (an open window is still filling).",
                values=("events_per_s",)),
        _series("Error rate", "errors / greatest(events, 1) AS error_rate", "percentunit",
                "Share of events with status=error.", values=("error_rate",)),
        _series("Latency p50 / p95 / p99", "latency_p50_ms AS p50, latency_p95_ms AS p95, latency_p99_ms AS p99",
                "ms", "Whole-call latency percentiles of each window (DDSketch, see sketch_relative_accuracy).",
                values=("p50", "p95", "p99"), display="${__field.name} ${__field.labels.key}"),
        _series("Time to first token p95", "ttft_p95_ms", "ms",
                "p95 of the time to the first streamed token (empty for keys without streaming).",
                values=("ttft_p95_ms",)),
        _series("Tokens per window", "input_tokens, output_tokens", "short", "Input and output tokens per window.",
                values=("input_tokens", "output_tokens"), display="${__field.name} ${__field.labels.key}"),
        _series("Cost per hour", f"cost_usd * 3600 / ({WINDOW_S}) AS usd_per_hour", "currencyUSD",
                "Cost of each window scaled to an hour (events without a price are not counted: unpriced_events).",
                values=("usd_per_hour",)),
        _series("Guardrail-hit rate", "guardrail_hit_rate", "percentunit",
                "Share of events with at least one flagged or blocked guardrail verdict.",
                values=("guardrail_hit_rate",)),
        Panel("Per app / model / prompt_version", "table", sql=per_key, width=12,
              columns=(("app", "string"), ("model", "string"), ("prompt_version", "string"), ("events", num),
                       ("errors", num), ("error_rate", num), ("max_latency_p95_ms", num), ("max_ttft_p95_ms", num),
                       ("input_tokens", num), ("output_tokens", num), ("cost_usd", num), ("guardrail_hits", num)),
              description="Totals per key over the range; max_* are the worst window's percentiles.",
              overrides=(_unit("error_rate", "percentunit"), _unit("cost_usd", "currencyUSD"))),
        Panel("Worker (Prometheus)", "row"),
    ) + PROMETHEUS_PANELS
    return Dashboard("driftline-overview", "driftline / Overview",
                     "LLM calls per app, model and prompt version from driftline's window rows, and the "
                     "worker's own metrics.", (*_key_variables("llm_window_metrics", "window_start"),),
                     panels, prometheus=True)


_APP_MODEL = '{app=~"$app", model=~"$model"}'
PROMETHEUS_PANELS: tuple[Panel, ...] = (
    Panel("Events per second (worker)", "timeseries", unit="reqps",
          exprs=((f"sum by (app, model) (rate(driftline_events_total{_APP_MODEL}[$__rate_interval]))",
                  "{{app}}/{{model}}"),)),
    Panel("Latency p95 (worker histogram)", "timeseries", unit="ms",
          exprs=(("histogram_quantile(0.95, sum by (app, model, le) "
                  f"(rate(driftline_latency_ms_bucket{_APP_MODEL}[$__rate_interval])))", "{{app}}/{{model}}"),)),
    Panel("Error rate (worker)", "timeseries", unit="percentunit",
          exprs=((f"sum by (app, model) (rate(driftline_errors_total{_APP_MODEL}[$__rate_interval])) / "
                  f"sum by (app, model) (rate(driftline_events_total{_APP_MODEL}[$__rate_interval]))",
                  "{{app}}/{{model}}"),)),
    Panel("Cost per hour (worker)", "timeseries", unit="currencyUSD",
          exprs=((f"3600 * sum by (app) (rate(driftline_cost_usd_total{_APP_MODEL}[$__rate_interval]))",
                  "{{app}}"),)),
    Panel("Records, dead letters and sink errors", "timeseries", unit="ops",
          exprs=(("sum(rate(driftline_records_total[$__rate_interval]))", "records"),
                 ("sum by (reason) (rate(driftline_dlq_total[$__rate_interval]))", "dlq {{reason}}"),
                 ("sum by (operation) (rate(driftline_sink_errors_total[$__rate_interval]))",
                  "sink errors {{operation}}"),
                 ("sum by (stage) (rate(driftline_stage_errors_total[$__rate_interval]))",
                  "stage errors {{stage}}"))),
    Panel("Alerts firing (worker)", "timeseries", unit="short",
          exprs=(("sum by (rule, severity) (driftline_alerts_firing)", "{{rule}} ({{severity}})"),)),
    Panel("Drift p-value (latest test)", "timeseries", unit="none",
          exprs=((f"driftline_drift_p_value{_APP_MODEL}",
                  "{{method}} {{app}}/{{model}}/{{prompt_version}} {{field}}"),),
          field_config={"custom": {"scaleDistribution": {"type": "log", "log": 10}}}),
    Panel("Embedding queue and event lag", "timeseries", unit="short",
          exprs=(("sum(driftline_embed_queue_depth)", "texts waiting to be embedded"),
                 (f"time() - max by (app) (driftline_last_event_timestamp_seconds{_APP_MODEL})",
                  "seconds since the newest event of {{app}}"))),
)


def drift() -> Dashboard:
    src = ("FROM ${database}.drift_scores WHERE $__timeFilter(ts) AND " + KEY_FILTER
           + " AND field IN (${field:singlequote})")
    flagged_cols = (("time", "time"), ("app", "string"), ("model", "string"), ("prompt_version", "string"),
                    ("field", "string"), ("method", "string"), ("p_value", "number"), ("threshold", "number"),
                    ("statistic", "number"), ("n_ref", "number"), ("n_cur", "number"),
                    ("total_variation", "number"), ("novel_share", "number"))
    refs_src = "FROM ${database}.drift_references AS r WHERE " + KEY_FILTER + " AND field IN (${field:singlequote})"
    panels = (
        Panel("p-value per method (lines) against its threshold (dashed)", "timeseries", width=24, height=10,
              sql=(f"SELECT ts AS time, concat(method, ' ', {KEY}, ' ', field) AS key, "
                   f"p_value, threshold {src} ORDER BY time, key"),
              columns=(("time", "time"), ("key", "string"), ("p_value", "number"), ("threshold", "number")),
              unit="none", display="${__field.name} ${__field.labels.key}",
              description="Each drift test's p-value (log scale); a test is flagged when p_value < threshold "
                          "(the flagged tests are the red annotations).",
              field_config={"custom": {"scaleDistribution": {"type": "log", "log": 10}, "showPoints": "always"}},
              overrides=({"matcher": {"id": "byRegexp", "options": "^threshold.*"},
                          "properties": [{"id": "custom.lineStyle", "value": {"dash": [10, 10], "fill": "dash"}},
                                         {"id": "custom.showPoints", "value": "never"}]},)),
        Panel("Flagged tests", "table", width=24,
              sql=(f"SELECT ts AS time, app, model, prompt_version, field, method, p_value, threshold, statistic, "
                   "n_ref, n_cur, JSONExtractFloat(explanation, 'total_variation') AS total_variation, "
                   f"JSONExtractFloat(explanation, 'novel_share') AS novel_share {src} AND drifted = 1 "
                   "ORDER BY time DESC LIMIT 500"),
              columns=flagged_cols,
              description="Tests with p_value < threshold. topic_mix tests explain themselves: total "
                          "variation of the topic shares and the share of the window far from every reference "
                          "topic (drift_scores.explanation holds the clusters and example texts)."),
        Panel("Tests per key and method", "table", width=12,
              sql=(f"SELECT app, model, prompt_version, field, method, count() AS tests, "
                   f"countIf(drifted = 1) AS flagged, min(p_value) AS min_p_value, "
                   f"argMax(p_value, ts) AS latest_p_value, max(ts) AS latest {src} "
                   "GROUP BY app, model, prompt_version, field, method ORDER BY app, model, prompt_version, "
                   "field, method"),
              columns=(("app", "string"), ("model", "string"), ("prompt_version", "string"), ("field", "string"),
                       ("method", "string"), ("tests", "number"), ("flagged", "number"),
                       ("min_p_value", "number"), ("latest_p_value", "number"), ("latest", "time"))),
        Panel("Reference in force", "table", width=12,
              sql=("SELECT app, model, prompt_version, field, max(r.version) AS version, "
                   "argMax(r.mode, r.version) AS mode, argMax(r.n, r.version) AS n, "
                   "argMax(r.from_ts, r.version) AS from_ts, argMax(r.to_ts, r.version) AS to_ts, "
                   "argMax(r.created_at, r.version) AS created_at, argMax(r.control_id, r.version) AS control_id "
                   f"{refs_src} GROUP BY app, model, prompt_version, field ORDER BY app, model, prompt_version, field"),
              columns=(("app", "string"), ("model", "string"), ("prompt_version", "string"), ("field", "string"),
                       ("version", "number"), ("mode", "string"), ("n", "number"), ("from_ts", "time"),
                       ("to_ts", "time"), ("created_at", "time"), ("control_id", "string")),
              description="The highest version per key and field (mode first_n, rebase, pinned or reset: a reset "
                          "has no reference until the next samples make one)."),
        Panel("Reference history (rebases) in the range", "table", width=24, height=6,
              sql=("SELECT created_at AS time, app, model, prompt_version, field, version, mode, n, from_ts, "
                   f"to_ts, control_id, note {refs_src} AND $__timeFilter(created_at) ORDER BY time DESC"),
              columns=(("time", "time"), ("app", "string"), ("model", "string"), ("prompt_version", "string"),
                       ("field", "string"), ("version", "number"), ("mode", "string"), ("n", "number"),
                       ("from_ts", "time"), ("to_ts", "time"), ("control_id", "string"), ("note", "string"))),
    )
    variables = (*_key_variables("drift_scores", "ts"),
                 Variable("field", "field", "SELECT DISTINCT field FROM ${database}.drift_scores "
                                            "WHERE $__timeFilter(ts) ORDER BY field"))
    flagged = Annotation("Flagged drift tests",
                         f"SELECT ts AS time, concat(method, ' flagged ', {KEY}, ' ', field, ': p=', "
                         f"toString(p_value), ' < ', toString(threshold)) AS text, "
                         f"concat(method, ',', field) AS tags {src} AND drifted = 1 ORDER BY time",
                         (("time", "time"), ("text", "string"), ("tags", "string")))
    rebased = Annotation("Reference changes",
                         f"SELECT created_at AS time, concat('reference v', toString(version), ' (', mode, ') ', "
                         f"{KEY}, ' ', field) AS text, concat(mode, ',', field) AS tags {refs_src} "
                         "AND $__timeFilter(created_at) ORDER BY time",
                         (("time", "time"), ("text", "string"), ("tags", "string")), color="blue")
    return Dashboard("driftline-drift", "driftline / Drift",
                     "Semantic drift tests per key, field and method, the flagged tests and the references.",
                     variables, panels, (flagged, rebased))


def alerts() -> Dashboard:
    src = ("FROM ${database}.alerts AS a WHERE $__timeFilter(ts) AND app IN (${app:singlequote}) "
           "AND model IN (${model:singlequote}) AND rule IN (${rule:singlequote})")
    series_key = "concat(rule, ' ', app, '/', model, if(labels['prompt_version'] = '', '', concat('/', labels['prompt_version'])))"
    link = {"title": "the metric on the overview",
            "url": "/d/driftline-overview?${__url_time_range}&var-app=${__data.fields.app}"
                   "&var-model=${__data.fields.model}"}
    panels = (
        Panel("Firing now (latest state per rule and key)", "stat", width=24, height=4,
              sql=("SELECT countIf(state = 'firing') AS firing, countIf(state = 'resolved') AS resolved FROM "
                   f"(SELECT fingerprint, argMax(a.state, a.ts) AS state {src} GROUP BY fingerprint)"),
              columns=(("firing", "number"), ("resolved", "number")),
              description="Alerts whose latest change in the range is firing / resolved.",
              options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                       "textMode": "value_and_name", "colorMode": "value"}),
        Panel("Firing / resolved timeline per rule and key", "state-timeline", width=24, height=10,
              sql=(f"SELECT ts AS time, {series_key} AS key, if(state = 'firing', 1, 0) AS firing {src} "
                   "ORDER BY time, key"),
              columns=(("time", "time"), ("key", "string"), ("firing", "number")),
              display="${__field.labels.key}",
              description="Each alert state change of the alerts table: red while firing, green once resolved.",
              field_config={"mappings": [{"type": "value", "options": {
                  "1": {"text": "firing", "color": "red", "index": 0},
                  "0": {"text": "resolved", "color": "green", "index": 1}}}],
                  "color": {"mode": "thresholds"},
                  "thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None},
                                                               {"color": "red", "value": 1}]}},
              options={"mergeValues": True, "showValue": "never", "rowHeight": 0.8}),
        Panel("State changes", "table", width=24, height=10,
              sql=("SELECT ts AS time, rule, state, severity, app, model, labels['prompt_version'] AS prompt_version, "
                   f"value, annotations['summary'] AS summary, fingerprint {src} ORDER BY time DESC LIMIT 1000"),
              columns=(("time", "time"), ("rule", "string"), ("state", "string"), ("severity", "string"),
                       ("app", "string"), ("model", "string"), ("prompt_version", "string"), ("value", "number"),
                       ("summary", "string"), ("fingerprint", "string")),
              description="Every firing and resolved change; the rule links to its key on the overview.",
              overrides=({"matcher": {"id": "byName", "options": "rule"},
                          "properties": [{"id": "links", "value": [link]}]},)),
    )
    variables = (*_key_variables("alerts", "ts", prompt_version=False),
                 Variable("rule", "rule", "SELECT DISTINCT rule FROM ${database}.alerts WHERE $__timeFilter(ts) "
                                          "ORDER BY rule"))
    return Dashboard("driftline-alerts", "driftline / Alerts",
                     "Alert state changes written by the worker's alerting stage.", variables, panels)


DASHBOARDS = (overview, drift, alerts)


# ------------------------------------------------------------------ JSON


def _unit(name: str, unit: str) -> dict[str, Any]:
    return {"matcher": {"id": "byName", "options": name}, "properties": [{"id": "unit", "value": unit}]}


def _target(p: Panel) -> list[dict[str, Any]]:
    if p.sql:
        table = p.kind in ("table", "stat")
        return [{"datasource": CH, "editorType": "sql", "format": 1 if table else 0,
                 "queryType": "table" if table else "timeseries", "pluginVersion": PLUGIN_VERSION,
                 "rawSql": p.sql, "refId": "A"}]
    return [{"datasource": PROM, "expr": expr, "legendFormat": legend, "range": True,
             "refId": chr(ord("A") + i)} for i, (expr, legend) in enumerate(p.exprs)]


def _panel_json(p: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    pos = {"h": 1 if p.kind == "row" else p.height, "w": 24 if p.kind == "row" else p.width, "x": x, "y": y}
    if p.kind == "row":
        return {"id": pid, "type": "row", "title": p.title, "collapsed": False, "gridPos": pos, "panels": []}
    defaults: dict[str, Any] = {**p.field_config}
    if p.unit:
        defaults["unit"] = p.unit
    if p.display:
        defaults["displayName"] = p.display
    if p.links:
        defaults["links"] = list(p.links)
    out: dict[str, Any] = {
        "id": pid, "type": p.kind, "title": p.title, "gridPos": pos,
        "datasource": CH if p.sql else PROM,
        "fieldConfig": {"defaults": defaults, "overrides": list(p.overrides)},
        "options": dict(p.options), "targets": _target(p)}
    if p.description:
        out["description"] = p.description
    return out


def _variable_json(v: Variable) -> dict[str, Any]:
    return {"type": "query", "name": v.name, "label": v.label, "datasource": CH,
            "query": v.sql, "definition": v.sql, "multi": True, "includeAll": True,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "refresh": 2, "sort": 1, "regex": "", "options": [], "hide": 0}


def _datasource_var(name: str, label: str, plugin: str, uid: str, text: str) -> dict[str, Any]:
    return {"type": "datasource", "name": name, "label": label, "query": plugin, "regex": "", "refresh": 1,
            "current": {"selected": False, "text": text, "value": uid}, "options": [], "hide": 0}


def build(d: Dashboard) -> dict[str, Any]:
    """The dashboard's JSON model (schemaVersion 41, Grafana 12)."""
    panels: list[dict[str, Any]] = []
    x = y = row_h = 0
    for i, p in enumerate(d.panels, start=1):
        w = 24 if p.kind == "row" else p.width
        if x + w > 24 or p.kind == "row":
            x, y, row_h = 0, y + row_h, 0
        panels.append(_panel_json(p, i, x, y))
        h = 1 if p.kind == "row" else p.height
        x, row_h = x + w, max(row_h, h)
    templating = [_datasource_var("ds_clickhouse", "ClickHouse", CH_TYPE, CH_UID, "ClickHouse")]
    if d.prometheus:
        templating.append(_datasource_var("ds_prometheus", "Prometheus", "prometheus", PROM_UID, "Prometheus"))
    templating.append({"type": "textbox", "name": "database", "label": "database", "query": "driftline",
                       "current": {"text": "driftline", "value": "driftline"}, "options": [], "hide": 0})
    templating += [_variable_json(v) for v in d.variables]
    annotations: list[dict[str, Any]] = [{
        "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
        "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard"}]
    annotations += [{"name": a.name, "enable": True, "hide": False, "iconColor": a.color, "datasource": CH,
                     "target": {"datasource": CH, "editorType": "sql", "format": 1, "queryType": "table",
                                "pluginVersion": PLUGIN_VERSION, "rawSql": a.sql, "refId": "Anno"}}
                    for a in d.annotations]
    requires = [{"type": "grafana", "id": "grafana", "name": "Grafana", "version": "12.2.1"},
                {"type": "datasource", "id": CH_TYPE, "name": "ClickHouse", "version": PLUGIN_VERSION}]
    if d.prometheus:
        requires.append({"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"})
    return {
        "__requires": requires,
        "uid": d.uid, "title": d.title, "description": d.description, "tags": ["driftline"],
        "editable": True, "graphTooltip": 1, "timezone": "utc", "schemaVersion": 41, "version": 1,
        "time": {"from": "now-6h", "to": "now"}, "refresh": "30s",
        "links": [{"title": "driftline", "type": "dashboards", "tags": ["driftline"], "asDropdown": False,
                   "includeVars": True, "keepTime": True}],
        "annotations": {"list": annotations},
        "templating": {"list": templating},
        "panels": panels,
    }


def render_all() -> dict[str, str]:
    """file name -> its text, for every dashboard."""
    return {f"{d.uid}.json": json.dumps(build(d), indent=2, ensure_ascii=False) + "\n"
            for d in (f() for f in DASHBOARDS)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 when a file in dashboards/ differs from the generator's output "
                         "(or is missing, or is not generated)")
    args = ap.parse_args(argv)
    files = render_all()
    if args.check:
        present = {p.name for p in OUT_DIR.glob("*.json")}
        bad = sorted(n for n, t in files.items() if not (OUT_DIR / n).is_file() or (OUT_DIR / n).read_text() != t)
        bad += sorted(present - set(files))
        for n in bad:
            print(f"out of date: deploy/grafana/dashboards/{n} (run python deploy/grafana/generate.py)",
                  file=sys.stderr)
        return 1 if bad else 0
    OUT_DIR.mkdir(exist_ok=True)
    for n, t in files.items():
        (OUT_DIR / n).write_text(t)
    print(f"wrote {len(files)} dashboards to {OUT_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
