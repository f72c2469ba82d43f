"""Alert rules evaluated in the stream, and their export as Prometheus alerting rules.

:class:`AlertEvaluator` is pure logic: the worker feeds it window stats, per-call costs,
drift results and "event seen" marks, then calls :meth:`AlertEvaluator.evaluate` with a
clock value; it returns the state changes (:class:`AlertTransition`) to hand to the
notifiers (:mod:`driftline.streams.sinks.notifiers`) and the ClickHouse ``alerts`` sink
(:meth:`AlertTransition.to_row`). No threads, no wall clock, state saved and restored
with :meth:`get_state` / :meth:`set_state`.

Metric contract of the worker's ``/metrics`` (what :func:`export_prometheus_rules`
writes PromQL against; the worker must expose exactly these names and labels)::

    metric                                   type       labels                                   unit / meaning
    ---------------------------------------  ---------  ---------------------------------------  -------------------------------------------
    driftline_latency_ms                     histogram  app, model                               whole-call latency in ms (_bucket/_sum/_count)
    driftline_ttft_ms                        histogram  app, model                               time to first token in ms
    driftline_events_total                   counter    app, model                               calls seen (every accepted event)
    driftline_errors_total                   counter    app, model                               calls with status == "error"
    driftline_guardrail_hits_total           counter    app, model                               calls with >= 1 flagged/blocked verdict
    driftline_negative_feedback_total        counter    app, model                               calls with feedback == -1
    driftline_feedback_total                 counter    app, model                               calls with feedback not null
    driftline_cost_usd_total                 counter    app, model                               priced cost in USD
    driftline_input_tokens_total             counter    app, model                               input tokens
    driftline_output_tokens_total            counter    app, model                               output tokens
    driftline_dlq_total                      counter    reason                                   records sent to llm.events.dlq
    driftline_drift_p_value                  gauge      app, model, prompt_version, field, method latest p-value of each drift test
    driftline_drift_detected                 gauge      app, model, prompt_version, field, method 1 if the latest test drifted, else 0
    driftline_drift_statistic                gauge      app, model, prompt_version, field, method statistic of the latest drift test
    driftline_unpriced_events_total          counter    app, model                               calls without a price
    driftline_last_event_timestamp_seconds   gauge      app, model                               event time of the newest event (unix s)

    Suggested latency/TTFT buckets (ms): 50, 100, 250, 500, 1000, 2000, 4000, 8000, 16000, 32000, 64000.
    ``environment`` is not a worker label: add it as a target label in the scrape config.

Mapping of rule metrics to PromQL (``W`` is the export's ``rate_window``, default 5m):

    latency_ms.pNN / ttft_ms.pNN  histogram_quantile(0.NN, sum by (app, model, le) (rate(driftline_*_ms_bucket[W])))
    errors.rate                   rate(errors) / rate(events)
    guardrail.hit_rate            rate(guardrail_hits) / rate(events)
    feedback.negative_rate        rate(negative_feedback) / rate(feedback)
    events.count, errors.count, input_tokens.sum, output_tokens.sum, cost_usd.sum   increase(...[W])
    tokens.per_call, cost_usd.per_call   ratio of increases over W
    budget                        sum by (group_by) (increase(driftline_cost_usd_total[window])) > X
    change                        now > (1 + pct/100) * quantile_over_time(0.5, (now)[N*W:W] offset W)
                                  (median of N trailing W-steps: approximates the worker's N windows)
    absence                       time() - max by (group_by) (driftline_last_event_timestamp_seconds) > N
    drift                         driftline_drift_p_value < x, driftline_drift_statistic > x, driftline_drift_detected == 1
    resolve_after                 keep_firing_for (Prometheus >= 2.42)

Not expressible (listed by the export with the reason): per-user budgets (``user_id``
is not a label), runaway rules (per trace, conversation or user: no such label),
``prompt_version`` matches outside drift rules, and metrics without a
counterpart (tpot, late events, blocked rate).
Hysteresis (``resolve_below``/``resolve_above``) is exported as the plain threshold and
noted in the file header.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from driftline.schemas.comparison import describe
from driftline.schemas.rules import (
    AlertTransition,
    CostObservation,
    DriftObservation,
    Rule,
    RuleSet,
    check_rules,
    fingerprint,
    load_rules,
)
from driftline.schemas.window_stats import WindowKey, WindowStats
from driftline.streams.stages.compare_rule import CompareReading
from driftline.streams.stages.runaway import TraceTracker

__all__ = [
    "AlertEvaluator",
    "AlertTransition",
    "CostObservation",
    "DriftObservation",
    "default_rules_path",
    "export_prometheus_rules",
    "USER_COST_BUCKET_MS",
]

USER_COST_BUCKET_MS = 60_000
_STATE_VERSION = 1


def default_rules_path() -> Path:
    """The shipped default rules (``streams/stages/default_rules.yaml``)."""
    return Path(__file__).with_name("default_rules.yaml")


# ---------------------------------------------------------------------------------------------
# Evaluator
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Sample:
    """One rule's reading for one label set at evaluation time."""

    labels: dict[str, str]
    value: float
    threshold: float
    condition: bool
    extra: dict[str, float] = field(default_factory=dict)
    #: event time of the data read (window start, absence deadline, event seen); None: now
    at_ms: int | None = None
    #: annotations of the reading itself (compare rules: the failing criteria), under the
    #: rule's own; also placeholders of its templates
    notes: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class _Alert:
    rule: str
    labels: dict[str, str]
    fingerprint: str
    state: str  # "pending" | "firing"
    active_since_ms: int
    value: float
    annotations: dict[str, str]
    fired_at_ms: int | None = None
    resolve_since_ms: int | None = None


class _FormatVars(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return ""


def _render(rule: Rule, s: _Sample) -> dict[str, str]:
    thr: float | int = int(s.threshold) if float(s.threshold).is_integer() else s.threshold
    vars_ = _FormatVars(
        value=s.value, threshold=thr, rule=rule.name, severity=rule.severity,
        metric=rule.metric_name, **s.labels, **s.extra, **s.notes,
    )
    out = dict(s.notes)
    for k, tmpl in rule.annotations.items():
        try:
            out[k] = tmpl.format_map(vars_)
        except (ValueError, TypeError, KeyError, IndexError):
            out[k] = tmpl
    return out


def _clean(labels: Mapping[str, str]) -> dict[str, str]:
    """Alert labels: empty values dropped (as in Prometheus), keys sorted."""
    return {k: labels[k] for k in sorted(labels) if labels[k] != ""}


def _prune_older(store: dict[Any, dict[int, float]], lo: int) -> None:
    """Drop contributions at or before ``lo`` and keys left empty."""
    for k in list(store):
        per = store[k]
        for ts in [ts for ts in per if ts <= lo]:
            del per[ts]
        if not per:
            del store[k]


def _app_model(k: Any) -> tuple[str, str]:
    """(app, model) of a state key: a WindowKey or a tuple starting with app, model."""
    return (k.app, k.model) if isinstance(k, WindowKey) else (k[0], k[1])


def _trim_history(hist: dict[int, list[int]], lo: int) -> None:
    """Drop the minutes whose newest event is before ``lo``, except the newest of them."""
    old = sorted(b for b, mm in hist.items() if mm[1] < lo)
    for b in old[:-1]:
        del hist[b]


class AlertEvaluator:
    """Evaluates a :class:`RuleSet` over the metrics the worker feeds in.

    Per rule and label set an alert goes inactive -> pending -> firing -> resolved:

    - pending when the condition first holds at an :meth:`evaluate` call (``starts_at``);
    - firing at the first evaluation with ``now - starts_at >= for`` (a ``for`` of 0 fires at once);
      a pending alert whose condition fails is dropped silently;
    - resolved at the first evaluation where the resolve condition (``resolve_below`` /
      ``resolve_above``, else "condition false", or no data) has held for ``resolve_after``.

    Values read per kind: threshold/ratio/change from the newest window of each
    (app, model, prompt_version) key that holds at least ``min_events`` events (partial windows
    count; a newer update of the same window replaces the older; while a just-opened window
    has fewer events, the previous window is read); budget from the rolling sum of contributions whose time is in
    ``(now - window, now]`` (window start for window costs; 1-minute buckets of
    :class:`CostObservation` for per-user budgets); change against the median of the
    ``baseline_windows`` newest *final* windows before the current one; absence from the
    newest event seen per group; drift from the newest result per test.
    Window data is stale (no data) once ``now >= window_end + stale_windows * window length``.

    ``static_labels`` (e.g. ``{"environment": "prod"}``) are added to every alert and can be
    matched by rules.

    Data from after ``now_ms`` is not read (windows starting after it, drift results,
    costs and events seen stamped after it); a caller evaluating past times in order (a
    catch-up over a lag) feeds each window before the first evaluation after its start.

    ``event_time_stamps``: transitions are stamped with the event time of the data rather
    than the evaluation time: an alert is pending from the start of the window (or the
    absence deadline) where its condition first held, fires at that time plus ``for``,
    and resolves at the start of the first window that resolves it plus
    ``resolve_after`` (no data: the evaluation time). Evaluations at different moments of
    the same windows (each tick live, each window boundary in a catch-up) then give the
    same timestamps.

    Bounded state: at most ``max_keys`` keys per dimension (window keys, cost keys,
    per-user cost keys, drift tests, app/model pairs seen); past it the least recently
    updated key is dropped and counted in :attr:`evicted` (per dimension). An alert
    whose key was dropped gets no more data: it resolves ("no data") or, if pending, is
    dropped, so a stream of random app names can neither grow the state nor leave
    absence alerts firing for ever.
    """

    def __init__(self, rules: RuleSet, *, static_labels: Mapping[str, str] | None = None,
                 stale_windows: int = 2, event_time_stamps: bool = False,
                 max_keys: int = 10_000, catch_up_ms: int = 86_400_000,
                 max_traces: int = 10_000) -> None:
        if stale_windows < 1:
            raise ValueError("stale_windows must be >= 1")
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.event_time_stamps = event_time_stamps
        self.max_keys = max_keys
        #: keys dropped per dimension to stay under ``max_keys``
        self.evicted: dict[str, int] = {}
        self.rules = rules
        self.static_labels = dict(static_labels or {})
        self.stale_windows = stale_windows
        change = [r.baseline_windows for r in rules.of_kind("change")]
        self._keep_windows = max([2, *(n + 1 for n in change)])
        budgets = [r.window_ms for r in rules.of_kind("budget")]
        self._keep_cost_ms = max([0, *budgets])
        self._windows: dict[WindowKey, dict[int, WindowStats]] = {}
        self._window_cost: dict[WindowKey, dict[int, float]] = {}
        self._user_cost: dict[tuple[str, str, str], dict[int, float]] = {}
        self._drift: dict[tuple[str, str, str, str, str], DriftObservation] = {}
        self._last_seen: dict[tuple[str, str], int] = {}
        # per app/model: the newest event time per minute over the longest absence span (and
        # the newest older one), so an evaluation at a past time (a catch-up) reads the last
        # event seen by then, not a later one
        absent = [r.absent_for_ms for r in rules.of_kind("absence")]
        self._keep_seen_ms = max([0, *absent]) + 2 * USER_COST_BUCKET_MS
        self._need_seen_hist = bool(absent)
        #: how far back an evaluation may still go (a catch-up): seen history kept beyond
        #: the longest absence span until evaluations pass it
        self.catch_up_ms = catch_up_ms
        self._seen_hist: dict[tuple[str, str], dict[int, list[int]]] = {}
        self._mcache: dict[int, tuple[WindowStats, Mapping[str, float | None]]] = {}
        self._alerts: dict[tuple[str, str], _Alert] = {}
        self._first_eval_ms: int | None = None
        self._last_eval_ms: int | None = None
        #: runaway rules: per trace (conversation, user) figures; None without such rules.
        #: At most ``max_traces`` groups per dimension (evictions in ``evicted["traces"]``);
        #: time resolution 1 s, or the longest runaway window / 3600 when that is more (at
        #: most 3600 buckets per group and key)
        runaway = rules.of_kind("runaway")
        self.traces: TraceTracker | None = None
        if runaway:
            keep = max(r.window_ms for r in runaway)
            self.traces = TraceTracker(tuple(dict.fromkeys(r.group_by[0] for r in runaway)), keep,
                                       bucket_ms=max(1000, keep // 3600 // 1000 * 1000),
                                       max_groups=max_traces)
        #: compare rules: the newest reading per rule (fed by whoever runs its queries)
        self._compare: dict[str, CompareReading] = {}
        self._compare_rules = {r.name for r in rules.of_kind("compare")}

    # -- inputs ---------------------------------------------------------------------------

    def observe_window(self, stats: WindowStats) -> None:
        """A window result (partial or final); the newest update of a window replaces older ones.

        Updates can arrive out of order (live reads of the open windows and the rows the
        worker stored a moment before): a partial update with fewer events than the one
        held, or a partial update of a window already final, is ignored.
        """
        per = self._touch(self._windows, stats.key, "windows")
        old = per.get(stats.window_start_ms)
        if old is not None and not stats.final and (old.final or stats.events < old.events):
            return
        per[stats.window_start_ms] = stats
        if len(per) > self._keep_windows:
            for start in sorted(per)[: len(per) - self._keep_windows]:
                del per[start]
        if self._keep_cost_ms:
            self._touch(self._window_cost, stats.key, "window_cost")[stats.window_start_ms] = \
                float(stats.cost_usd)
        if stats.events > 0:
            self._seen(stats.app, stats.model, stats.window_start_ms)

    def observe_cost(self, obs: CostObservation) -> None:
        """One call's cost, for per-user budgets (kept in 1-minute buckets)."""
        if not self._keep_cost_ms or not math.isfinite(obs.cost_usd):
            return
        bucket = obs.ts_ms - obs.ts_ms % USER_COST_BUCKET_MS
        per = self._touch(self._user_cost, (obs.app, obs.model, obs.user_id), "user_cost")
        per[bucket] = per.get(bucket, 0.0) + float(obs.cost_usd)

    def observe_drift(self, obs: DriftObservation) -> None:
        """A drift test result; the newest (by ts) per app/model/prompt_version/field/method counts."""
        k = (obs.app, obs.model, obs.prompt_version, obs.field, obs.method)
        old = self._drift.pop(k, None)
        self._drift[k] = obs if old is None or obs.ts_ms >= old.ts_ms else old
        self._cap(self._drift, "drift")

    def observe_call(self, ts_ms: int, app: str, model: str, ids: dict[str, str | None], *,
                     operation: str = "chat", status: str = "ok", tokens: int = 0,
                     cost_usd: float | None = None, prompt: str | None = None) -> None:
        """One stored call, for runaway rules (``ids``: its trace_id, conversation_id, user_id);
        a no-op without runaway rules."""
        if self.traces is None:
            return
        self.traces.observe(ts_ms, app, model, ids, operation=operation, status=status, tokens=tokens,
                            cost_usd=cost_usd, prompt=prompt)
        if self.traces.evicted:
            self.evicted["traces"] = sum(self.traces.evicted.values())

    def observe_compare(self, reading: CompareReading) -> list[AlertTransition]:
        """A compare rule's gate verdict (streams/stages/compare_rule.py): steps the rule's
        alert at the reading's time and returns the transition, if any. Compare rules are
        stepped only here, not by :meth:`evaluate`: until a reading comes, an alert (a
        restored one too) keeps its state, since no reading is not "no data" but "not run
        yet" (a query still running, or one that failed). A reading older than the last
        one is ignored."""
        old = self._compare.get(reading.rule)
        if reading.rule not in self._compare_rules or (old is not None and reading.at_ms < old.at_ms):
            return []
        self._compare[reading.rule] = reading
        rule = self.rules.by_name(reading.rule)
        samples = self._compare_samples(rule)
        by_fp = {fingerprint(rule.name, s.labels): s for s in samples}
        mine = {fp for (name, fp) in self._alerts if name == rule.name}
        out = []
        for fp in sorted(mine | set(by_fp)):
            t = self._step(rule, fp, by_fp.get(fp), reading.at_ms)
            if t is not None:
                out.append(t)
        return out

    def observe_event_seen(self, app: str, model: str, ts_ms: int) -> None:
        """An event of app/model with event time ``ts_ms`` (for absence rules)."""
        self._seen(app, model, ts_ms)

    # -- bounded state --------------------------------------------------------------------

    def _touch(self, store: dict[Any, Any], key: Any, dimension: str) -> Any:
        """``store[key]`` (a new dict when absent), moved to the back of the eviction order."""
        per = store.pop(key, None)
        store[key] = per if per is not None else {}
        self._cap(store, dimension)
        return store[key]

    def _cap(self, store: dict[Any, Any], dimension: str) -> bool:
        extra = len(store) - self.max_keys
        if extra > 0:
            for k in list(store)[:extra]:
                del store[k]
            self.evicted[dimension] = self.evicted.get(dimension, 0) + extra
        return extra > 0

    def _seen(self, app: str, model: str, ts_ms: int) -> None:
        k = (app, model)
        old = self._last_seen.pop(k, ts_ms)
        newest = self._last_seen[k] = max(old, ts_ms)
        if self._cap(self._last_seen, "last_seen"):
            for gone in [g for g in self._seen_hist if g not in self._last_seen]:
                del self._seen_hist[gone]
        hist = self._seen_hist.setdefault(k, {})
        b = ts_ms - ts_ms % USER_COST_BUCKET_MS
        mm = hist.get(b)
        if mm is None:
            hist[b] = [ts_ms, ts_ms]
        else:
            mm[0], mm[1] = min(mm[0], ts_ms), max(mm[1], ts_ms)
        if self._need_seen_hist:
            _trim_history(hist, newest - self._keep_seen_ms - self.catch_up_ms)
        else:
            _trim_history(hist, newest)

    def _seen_at(self, k: tuple[str, str], now: int) -> int | None:
        """The newest event time of ``k`` at or before ``now`` (None: none known)."""
        newest = self._last_seen[k]
        if newest <= now:
            return newest
        hist = self._seen_hist.get(k)
        return max((mm[1] for mm in hist.values() if mm[1] <= now), default=None) if hist else None

    def _active_since(self, k: tuple[str, str], now: int, gap_ms: int) -> int | None:
        """The first event of ``k``'s current run of activity at ``now``: after the last
        silence of at least ``gap_ms`` (minute resolution of the history; None: unknown)."""
        hist = self._seen_hist.get(k)
        if not hist:
            return None
        runs = sorted(mm for mm in hist.values() if mm[1] <= now)
        if not runs:
            return None
        start = runs[-1][0]
        for prev, cur in zip(reversed(runs[:-1]), reversed(runs[1:]), strict=True):
            if cur[0] - prev[1] >= gap_ms:
                break
            start = prev[0]
        return start

    # -- evaluation -----------------------------------------------------------------------

    def evaluate(self, now_ms: int) -> list[AlertTransition]:
        """Advance every alert to ``now_ms``; returns the transitions (firing/resolved) in rule order."""
        if self._first_eval_ms is None:
            self._first_eval_ms = now_ms
        self._last_eval_ms = now_ms
        self._prune(now_ms)
        out: list[AlertTransition] = []
        for rule in self.rules:
            if rule.kind == "compare":  # stepped by their readings (observe_compare)
                continue
            samples = self._samples(rule, now_ms)
            by_fp = {fingerprint(rule.name, s.labels): s for s in samples}
            mine = {fp for (name, fp) in self._alerts if name == rule.name}
            for fp in sorted(mine | set(by_fp)):
                t = self._step(rule, fp, by_fp.get(fp), now_ms)
                if t is not None:
                    out.append(t)
        return out

    def _step(self, rule: Rule, fp: str, s: _Sample | None, now: int) -> AlertTransition | None:
        key = (rule.name, fp)
        et = self.event_time_stamps
        at = s.at_ms if et and s is not None and s.at_ms is not None else now
        a = self._alerts.get(key)
        if a is None:
            if s is None or not s.condition:
                return None
            a = _Alert(rule.name, s.labels, fp, "pending", min(at, now), s.value, _render(rule, s))
            self._alerts[key] = a
        elif s is not None:
            a.value = s.value
            a.annotations = _render(rule, s)
        if a.state == "pending":
            if s is None or not s.condition:
                del self._alerts[key]
                return None
            if now - a.active_since_ms >= rule.for_ms:
                ts = a.active_since_ms + rule.for_ms if et else now
                a.state = "firing"
                a.fired_at_ms = ts
                return self._transition(rule, a, "firing", ts)
            return None
        # firing
        resolving = s is None or rule.resolved_by(s.value, s.condition)
        if not resolving:
            a.resolve_since_ms = None
            return None
        if a.resolve_since_ms is None:
            a.resolve_since_ms = min(at, now)
        if now - a.resolve_since_ms >= rule.resolve_after_ms:
            ts = now
            if et:
                ts = max(a.resolve_since_ms + rule.resolve_after_ms, a.fired_at_ms or a.active_since_ms)
            del self._alerts[key]
            return self._transition(rule, a, "resolved", ts)
        return None

    def _transition(self, rule: Rule, a: _Alert, state: str, now: int) -> AlertTransition:
        return AlertTransition(
            ts_ms=now, rule=rule.name, state="firing" if state == "firing" else "resolved",
            severity=rule.severity, labels=dict(a.labels), annotations=dict(a.annotations),
            value=a.value, fingerprint=a.fingerprint, starts_at_ms=a.active_since_ms,
            ends_at_ms=None if state == "firing" else now,
        )

    def active_alerts(self) -> list[AlertTransition]:
        """Every firing alert with its current value (for re-sending to Alertmanager)."""
        out = []
        for (name, _fp), a in sorted(self._alerts.items()):
            if a.state == "firing":
                rule = self.rules.by_name(name)
                ts = self._last_eval_ms if self._last_eval_ms is not None else a.active_since_ms
                out.append(self._transition(rule, a, "firing", ts))
        return out

    def pending_alerts(self) -> list[tuple[str, dict[str, str], int]]:
        """(rule, labels, pending since) of alerts waiting out their ``for``."""
        return [(a.rule, dict(a.labels), a.active_since_ms)
                for _k, a in sorted(self._alerts.items()) if a.state == "pending"]

    # -- per-kind readings ----------------------------------------------------------------

    def _labels(self, rule: Rule, base: Mapping[str, str]) -> dict[str, str] | None:
        full = {**self.static_labels, **base}
        if not rule.matches(full):
            return None
        return _clean({**full, **rule.labels})

    def _samples(self, rule: Rule, now: int) -> list[_Sample]:
        if rule.kind in ("threshold", "ratio", "change"):
            return self._window_samples(rule, now)
        if rule.kind == "budget":
            return self._budget_samples(rule, now)
        if rule.kind == "absence":
            return self._absence_samples(rule, now)
        if rule.kind == "runaway":
            return self._runaway_samples(rule, now)
        return self._drift_samples(rule, now)

    def _compare_samples(self, rule: Rule) -> list[_Sample]:
        """A compare rule's one alert (baseline, candidate, app): its value is the number of
        criteria that fail with confidence; it holds while one does. An undecided criterion
        ("cannot tell yet", too few calls) never makes it hold."""
        r, spec = self._compare.get(rule.name), rule.compare
        assert r is not None and spec is not None
        base, cand = describe(spec.baseline), describe(spec.candidate)
        labels = self._labels(rule, {"baseline": base, "candidate": cand, "app": spec.app or ""})
        if labels is None:
            return []
        n = len(r.failing)
        where = f" on {spec.app}" if spec.app else ""
        failing = "; ".join(why for _m, why in r.failing)
        summary = (f"{cand} worse than {base}{where}: {failing}" if n else
                   f"{cand} vs {base}{where}: no criterion fails with confidence (gate exit {r.code})")
        notes = {"summary": summary, "failing": failing, "metrics": ",".join(m for m, _why in r.failing)}
        return [_Sample(labels, float(n), 0.0, n > 0, extra={"n_baseline": float(r.n_baseline),
                                                             "n_candidate": float(r.n_candidate)},
                        at_ms=r.at_ms, notes=notes)]

    def _runaway_samples(self, rule: Rule, now: int) -> list[_Sample]:
        """Per group (trace, conversation, user) of the rule: its figure over the window; the
        labels are the group's id and its app. Stamped with the newest call read."""
        assert rule.condition is not None and self.traces is not None
        dim = rule.group_by[0]
        cond = rule.condition
        slack = 1e-9 * max(1.0, abs(cond.threshold))  # cost sums: bound and value add in other orders
        alerted = {a.labels.get(dim) for (name, _fp), a in self._alerts.items() if name == rule.name}
        out = []
        for gid, app in self.traces.groups(dim):
            # most groups are far under the threshold: skipped on an upper bound, no scan, no sample
            # (a sample whose condition fails changes nothing unless the group has an alert)
            if gid not in alerted and not cond.holds(self.traces.bound(dim, gid, cond.metric) + slack):
                continue
            labels = self._labels(rule, {"app": app, dim: gid})
            if labels is None:
                continue
            got = self.traces.value(dim, gid, rule.condition.metric, rule.window_ms, now)
            if got is None:
                continue
            value, at = got
            out.append(_Sample(labels, value, rule.condition.threshold, rule.condition.holds(value),
                               at_ms=at))
        return out

    def _window_samples(self, rule: Rule, now: int) -> list[_Sample]:
        out = []
        for key, per in self._windows.items():
            labels = self._labels(rule, {"app": key.app, "model": key.model,
                                         "prompt_version": key.prompt_version})
            if labels is None or not per:
                continue
            cur = self._current(per, rule.min_events, now)
            if cur is None:
                continue
            value = self._metrics(cur).get(rule.metric_name)
            if value is None:
                continue
            if rule.kind == "change":
                base = [self._metrics(w).get(rule.metric) for s, w in sorted(per.items())
                        if s < cur.window_start_ms and w.final]
                vals = [v for v in base if v is not None][-rule.baseline_windows:]
                if len(vals) < rule.min_baseline_windows:
                    continue
                median = float(statistics.median(vals))
                if rule.increase_pct is not None:
                    thr = median * (1 + rule.increase_pct / 100)
                    cond = value > thr
                else:
                    thr = median * (1 - (rule.decrease_pct or 0.0) / 100)
                    cond = value < thr
                out.append(_Sample(labels, value, thr, cond, {"baseline": median},
                                   at_ms=cur.window_start_ms))
            else:
                assert rule.condition is not None
                out.append(_Sample(labels, value, rule.condition.threshold,
                                   rule.condition.holds(value), at_ms=cur.window_start_ms))
        return out

    def _metrics(self, w: WindowStats) -> Mapping[str, float | None]:
        """``w.metrics()``, memoised: every evaluation reads the same windows again (a catch-up
        evaluates once per window boundary). Bounded: cleared past 20,000 windows."""
        hit = self._mcache.get(id(w))
        if hit is not None and hit[0] is w:
            return hit[1]
        m = w.metrics()
        if len(self._mcache) >= 20_000:
            self._mcache.clear()
        self._mcache[id(w)] = (w, m)
        return m

    def _current(self, per: Mapping[int, WindowStats], min_events: int, now: int) -> WindowStats | None:
        """The window a rule reads: the newest fresh one with at least ``min_events`` events.

        A window that just opened holds a few events only; falling back to the previous
        window keeps an ongoing breach firing across the window boundary instead of
        resolving it (and firing it again) every time a new window starts.
        """
        for start in sorted(per, reverse=True):
            if start > now:  # not begun at ``now``: a catch-up evaluating the past
                continue
            w = per[start]
            length = max(1, w.window_end_ms - w.window_start_ms)
            if now >= w.window_end_ms + self.stale_windows * length:
                return None
            if w.events >= min_events:
                return w
        return None

    def _budget_samples(self, rule: Rule, now: int) -> list[_Sample]:
        assert rule.condition is not None
        lo = now - rule.window_ms
        sums: dict[tuple[str, ...], float] = {}
        group_labels: dict[tuple[str, ...], dict[str, str]] = {}
        rows: Iterable[tuple[dict[str, str], dict[int, float]]]
        if "user_id" in rule.group_by:
            rows = (({"app": a, "model": m, "user_id": u}, per)
                    for (a, m, u), per in self._user_cost.items())
        else:
            rows = (({"app": k.app, "model": k.model}, per) for k, per in self._window_cost.items())
        for base, per in rows:
            if self._labels(rule, base) is None:
                continue
            total = sum(c for ts, c in per.items() if lo < ts <= now)
            if not any(lo < ts <= now for ts in per):
                continue
            g = tuple(base[k] for k in rule.group_by)
            sums[g] = sums.get(g, 0.0) + total
            group_labels[g] = {k: base[k] for k in rule.group_by}
        out = []
        for g, total in sums.items():
            labels = _clean({**self.static_labels, **group_labels[g], **rule.labels})
            out.append(_Sample(labels, total, rule.condition.threshold, rule.condition.holds(total)))
        return out

    def _absence_samples(self, rule: Rule, now: int) -> list[_Sample]:
        last: dict[tuple[str, ...], int] = {}
        back: dict[tuple[str, ...], int] = {}
        for (app, model) in self._last_seen:
            seen = self._seen_at((app, model), now)
            if seen is None:
                continue
            ts = seen
            base = {"app": app, "model": model}
            if self._labels(rule, base) is None:
                continue
            g = tuple(base[k] for k in rule.group_by)
            last[g] = max(last.get(g, ts), ts)
            if now - ts < rule.absent_for_ms:  # active: since when (the event that ended a silence)
                run = self._active_since((app, model), now, rule.absent_for_ms)
                if run is not None:
                    back[g] = min(back.get(g, run), run)
        # A group named literally in match is expected from the first evaluation on.
        literal = [rule.match.get(k) for k in rule.group_by]
        if all(v is not None and not any(ch in v for ch in "*?[") for v in literal):
            g = tuple(v for v in literal if v is not None)
            if g not in last and self._first_eval_ms is not None:
                last[g] = self._first_eval_ms
        out = []
        thr_s = rule.absent_for_ms / 1000
        for g, ts in last.items():
            labels = _clean({**self.static_labels, **dict(zip(rule.group_by, g, strict=True)),
                             **rule.labels})
            silent_ms = now - ts
            silent = silent_ms >= rule.absent_for_ms
            out.append(_Sample(labels, silent_ms / 1000, thr_s, silent,
                               at_ms=ts + rule.absent_for_ms if silent else back.get(g, ts)))
        return out

    def _drift_samples(self, rule: Rule, now: int) -> list[_Sample]:
        assert rule.condition is not None
        out = []
        for (app, model, pv, fld, method), obs in self._drift.items():
            if obs.ts_ms > now:
                continue
            labels = self._labels(rule, {"app": app, "model": model, "prompt_version": pv,
                                         "field": fld, "method": method})
            if labels is None:
                continue
            value = obs.metrics().get(rule.condition.metric)
            if value is None:
                continue
            out.append(_Sample(labels, value, rule.condition.threshold, rule.condition.holds(value)))
        return out

    def _prune(self, now: int) -> None:
        if self.traces is not None:
            self.traces.prune(now)
        if self._need_seen_hist:
            lo = now - self._keep_seen_ms
            for hist in self._seen_hist.values():
                _trim_history(hist, lo)
        if not self._keep_cost_ms:
            return
        lo = now - self._keep_cost_ms
        _prune_older(self._window_cost, lo)
        _prune_older(self._user_cost, lo)

    # -- ownership (rebalances) -------------------------------------------------------------

    def retain(self, owned: Callable[[str, str], bool],
               owned_key: Callable[[str, str], bool] | None = None) -> list[tuple[str, str]]:
        """Keep only the state of the keys with ``owned(app, model)`` (an alert without a
        ``model`` label: ``owned(app, "")``; one without an ``app`` label is kept): the others
        moved to another worker, which evaluates them from now on. Dropped without a
        transition. The calls of runaway rules are kept per their exact key with
        ``owned_key`` (``owned`` when None): tool and agent rows have model ``""``, which
        ``owned`` reads as "any model of the app". Returns the (rule, fingerprint) of the
        *firing* alerts dropped."""
        def keep(k: Any) -> bool:
            return owned(*_app_model(k))

        self._windows = {k: v for k, v in self._windows.items() if keep(k)}
        self._window_cost = {k: v for k, v in self._window_cost.items() if keep(k)}
        self._user_cost = {k: v for k, v in self._user_cost.items() if keep(k)}
        self._drift = {k: v for k, v in self._drift.items() if keep(k)}
        self._last_seen = {k: v for k, v in self._last_seen.items() if keep(k)}
        self._seen_hist = {k: v for k, v in self._seen_hist.items() if keep(k)}
        if self.traces is not None:
            self.traces.retain(owned_key or owned)
        self._mcache.clear()
        gone = [k for k, a in self._alerts.items() if k[0] not in self._compare_rules  # retain_rules
                and "app" in a.labels and not owned(a.labels["app"], a.labels.get("model", ""))]
        firing = [k for k in gone if self._alerts[k].state == "firing"]
        for k in gone:
            del self._alerts[k]
        return firing

    def retain_rules(self, owned: Callable[[str], bool]) -> list[tuple[str, str]]:
        """Compare rules are owned per rule, not per key (streams/stages/compare_rule.py):
        drop the readings and alerts of those not ``owned(rule)`` without a transition.
        Returns the (rule, fingerprint) of the *firing* alerts dropped."""
        self._compare = {k: v for k, v in self._compare.items() if owned(k)}
        gone = [k for k in self._alerts if k[0] in self._compare_rules and not owned(k[0])]
        firing = [k for k in gone if self._alerts[k].state == "firing"]
        for k in gone:
            del self._alerts[k]
        return firing

    def held_apps(self) -> set[str]:
        """The apps this evaluator holds any state of."""
        keys = [*self._windows, *self._window_cost, *self._user_cost, *self._drift, *self._last_seen]
        traced = self.traces.apps() if self.traces is not None else set()
        return ({_app_model(k)[0] for k in keys} | traced
                | {a.labels["app"] for a in self._alerts.values() if "app" in a.labels})

    def restore_alert(self, rule: str, fp: str, labels: Mapping[str, str], annotations: Mapping[str, str],
                      value: float, ts_ms: int) -> bool:
        """An alert recorded as firing since ``ts_ms`` (the ``alerts`` table), held as firing
        (no new "firing" transition). False when the rule is gone or the alert is held already."""
        if (rule, fp) in self._alerts or rule not in {r.name for r in self.rules}:
            return False
        self._alerts[(rule, fp)] = _Alert(rule, dict(labels), fp, "firing", int(ts_ms), float(value),
                                          dict(annotations), int(ts_ms), None)
        return True

    # -- checkpoint -----------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """Everything needed to resume after a restart, as plain JSON-serialisable data."""
        return {
            "version": _STATE_VERSION,
            "windows": [asdict(w) for per in self._windows.values() for w in per.values()],
            "window_cost": [[k.app, k.model, k.prompt_version, ts, c]
                            for k, per in self._window_cost.items() for ts, c in per.items()],
            "user_cost": [[a, m, u, ts, c] for (a, m, u), per in self._user_cost.items()
                          for ts, c in per.items()],
            "drift": [asdict(o) for o in self._drift.values()],
            "last_seen": [[a, m, ts] for (a, m), ts in self._last_seen.items()],
            "alerts": [asdict(a) for a in self._alerts.values()],
            "first_eval_ms": self._first_eval_ms,
            "last_eval_ms": self._last_eval_ms,
            "traces": self.traces.get_state() if self.traces is not None else [],
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`get_state` output; alerts of rules no longer present are dropped."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported alert evaluator state version {state.get('version')!r}")
        self._windows = {}
        for w in state["windows"]:
            ws = WindowStats(**w)
            self._windows.setdefault(ws.key, {})[ws.window_start_ms] = ws
        self._window_cost = {}
        for a, m, pv, ts, c in state["window_cost"]:
            self._window_cost.setdefault(WindowKey(a, m, pv), {})[int(ts)] = float(c)
        self._user_cost = {}
        for a, m, u, ts, c in state["user_cost"]:
            self._user_cost.setdefault((a, m, u), {})[int(ts)] = float(c)
        self._drift = {}
        for d in state["drift"]:
            self.observe_drift(DriftObservation(**d))
        self._last_seen = {(a, m): int(ts) for a, m, ts in state["last_seen"]}
        self._seen_hist = {}
        names = {r.name for r in self.rules}
        self._alerts = {}
        for d in state["alerts"]:
            a = _Alert(**d)
            if a.rule in names:
                self._alerts[(a.rule, a.fingerprint)] = a
        self._first_eval_ms = state.get("first_eval_ms")
        self._last_eval_ms = state.get("last_eval_ms")
        if self.traces is not None:
            self.traces.set_state(list(state.get("traces", [])))


# ---------------------------------------------------------------------------------------------
# Prometheus export
# ---------------------------------------------------------------------------------------------

_HIST = {"latency_ms": "driftline_latency_ms", "ttft_ms": "driftline_ttft_ms"}
_RATES = {
    "errors.rate": ("driftline_errors_total", "driftline_events_total"),
    "guardrail.hit_rate": ("driftline_guardrail_hits_total", "driftline_events_total"),
    "feedback.negative_rate": ("driftline_negative_feedback_total", "driftline_feedback_total"),
}
_SUMS = {
    "events.count": "driftline_events_total",
    "errors.count": "driftline_errors_total",
    "input_tokens.sum": "driftline_input_tokens_total",
    "output_tokens.sum": "driftline_output_tokens_total",
    "cost_usd.sum": "driftline_cost_usd_total",
    "unpriced.count": "driftline_unpriced_events_total",
}
_GLOB_CHARS = "*?["
_RE2_SPECIAL = set(".^$*+?()[]{}|\\")


def _fmt_duration(ms: int) -> str:
    if ms == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        if ms >= size:
            parts.append(f"{ms // size}{unit}")
            ms %= size
    return "".join(parts)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _glob_to_re2(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = i + 1
            if j < len(pattern) and pattern[j] in "!^":
                j += 1
            if j < len(pattern) and pattern[j] == "]":
                j += 1
            j = pattern.find("]", j)
            if j < 0:
                out.append("\\[")
            else:
                body = pattern[i + 1:j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body + "]")
                i = j
        else:
            out.append("\\" + c if c in _RE2_SPECIAL else c)
        i += 1
    return "".join(out)


def _promql_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _selector(match: Mapping[str, str], labels: Sequence[str]) -> str:
    parts = []
    for k in labels:
        pat = match.get(k)
        if pat is None or pat == "*":
            continue
        if any(ch in pat for ch in _GLOB_CHARS):
            parts.append(f"{k}=~{_promql_str(_glob_to_re2(pat))}")
        else:
            parts.append(f"{k}={_promql_str(pat)}")
    return "{" + ", ".join(parts) + "}" if parts else ""


def _metric_expr(metric: str, sel: str, w: str) -> str | None:
    by = "sum by (app, model)"
    base, _, stat = metric.partition(".")
    if base in _HIST and stat.startswith("p") and stat[1:].isdigit():
        q = int(stat[1:]) / 100
        return (f"histogram_quantile({q}, sum by (app, model, le) "
                f"(rate({_HIST[base]}_bucket{sel}[{w}])))")
    if metric in _RATES:
        num, den = _RATES[metric]
        return f"{by} (rate({num}{sel}[{w}])) / {by} (rate({den}{sel}[{w}]))"
    if metric in _SUMS:
        return f"{by} (increase({_SUMS[metric]}{sel}[{w}]))"
    events = f"{by} (increase(driftline_events_total{sel}[{w}]))"
    if metric == "tokens.per_call":
        return (f"({by} (increase(driftline_input_tokens_total{sel}[{w}])) + "
                f"{by} (increase(driftline_output_tokens_total{sel}[{w}]))) / {events}")
    if metric == "cost_usd.per_call":
        return f"{by} (increase(driftline_cost_usd_total{sel}[{w}])) / {events}"
    return None


def _go_value(spec: str) -> str:
    """A Python format spec for {value} as a Prometheus (Go) template expression."""
    if not spec:
        return "{{ $value }}"
    if spec.endswith("%"):
        return "{{ $value | humanizePercentage }}"
    if spec[-1] in "fFeEgG":
        return f'{{{{ printf "%{spec}" $value }}}}'
    if spec[-1] == "d":
        return '{{ printf "%.0f" $value }}'
    return "{{ $value }}"


def _prom_annotation(text: str, rule: Rule, threshold: float | None) -> str:
    import string

    out = []
    for lit, fname, spec, _conv in string.Formatter().parse(text):
        out.append(lit)
        if fname is None:
            continue
        if fname == "value":
            out.append(_go_value(spec or ""))
        elif fname == "threshold":
            out.append(format(threshold, spec) if spec and threshold is not None
                       else _num(threshold) if threshold is not None else "")
        elif fname == "rule":
            out.append(rule.name)
        elif fname == "severity":
            out.append(rule.severity)
        elif fname == "metric":
            out.append(rule.metric_name)
        elif fname == "baseline":
            out.append("n/a")
        else:
            out.append(f"{{{{ $labels.{fname} }}}}")
    return "".join(out)


#: why a runaway rule is not exported (listed on stderr, not in the file's header: these rules
#: are per trace by design and have no PromQL form to miss)
_STREAM_ONLY = "stream-only (runaway rule)"
_STREAM_ONLY_COMPARE = "stream-only (compare rule)"


def _export_rule(rule: Rule, w: str) -> tuple[dict[str, Any] | None, str, list[str]]:
    """(Prometheus rule, reason when not expressible, approximation notes)."""
    notes: list[str] = []
    if rule.kind == "runaway":
        return None, f"{_STREAM_ONLY}: per {rule.group_by[0]}, which is not a Prometheus label", notes
    if rule.kind == "compare":  # listed as stream-only too: the worker evaluates it from ClickHouse
        return None, f"{_STREAM_ONLY_COMPARE}: confidence sequences over two populations of stored " \
                     "calls, which PromQL has no form for", notes
    if "user_id" in rule.match or "user_id" in rule.group_by:
        return None, "per-user budget: user_id is not a Prometheus label", notes
    pv = rule.match.get("prompt_version", "*")
    if rule.kind != "drift" and pv != "*":
        return None, "matches prompt_version, which only drift metrics carry as a label", notes
    threshold: float | None = rule.condition.threshold if rule.condition else None
    if rule.kind in ("threshold", "ratio"):
        expr, reason = _window_expr(rule, w)
    elif rule.kind == "budget":
        expr, reason = _budget_expr(rule), ""
    elif rule.kind == "change":
        expr, reason = _change_expr(rule, w, notes)
        threshold = None
    elif rule.kind == "absence":
        threshold = rule.absent_for_ms / 1000
        expr, reason = _absence_expr(rule, threshold), ""
    else:
        expr, reason = _drift_expr(rule), ""
    if expr is None:
        return None, reason, notes
    if rule.resolve_below is not None or rule.resolve_above is not None:
        notes.append(f"{rule.name}: hysteresis (resolve_below/resolve_above) not expressible; "
                     "resolves when the condition is false")
    out: dict[str, Any] = {"alert": rule.name, "expr": expr}
    if rule.for_ms:
        out["for"] = _fmt_duration(rule.for_ms)
    if rule.resolve_after_ms:
        out["keep_firing_for"] = _fmt_duration(rule.resolve_after_ms)
    out["labels"] = {"severity": rule.severity, **rule.labels}
    if rule.annotations:
        out["annotations"] = {k: _prom_annotation(v, rule, threshold)
                              for k, v in rule.annotations.items()}
    return out, "", notes


_EXPORT_LABELS = ("app", "model", "environment")


def _window_expr(rule: Rule, w: str) -> tuple[str | None, str]:
    """threshold / ratio: the metric's PromQL compared, gated on ``min_events`` in the range."""
    assert rule.condition is not None
    sel = _selector(rule.match, _EXPORT_LABELS)
    e = _metric_expr(rule.condition.metric, sel, w)
    if e is None:
        return None, f"{rule.condition.metric} has no counterpart in the worker's /metrics"
    expr = f"({e}) {rule.condition.op} {_num(rule.condition.threshold)}"
    if rule.min_events:
        expr = (f"{expr} and on (app, model) sum by (app, model) "
                f"(increase(driftline_events_total{sel}[{w}])) >= {rule.min_events}")
    return expr, ""


def _budget_expr(rule: Rule) -> str:
    """budget: the cost counter's increase over the rule's window, summed per group."""
    assert rule.condition is not None
    sel = _selector(rule.match, _EXPORT_LABELS)
    by = ", ".join(rule.group_by)
    return (f"sum by ({by}) (increase(driftline_cost_usd_total{sel}"
            f"[{_fmt_duration(rule.window_ms)}])) {rule.condition.op} {_num(rule.condition.threshold)}")


def _change_expr(rule: Rule, w: str, notes: list[str]) -> tuple[str | None, str]:
    """change: the metric against the median of its trailing ``w`` steps (noted as approximate)."""
    sel = _selector(rule.match, _EXPORT_LABELS)
    e = _metric_expr(rule.metric, sel, w)
    if e is None:
        return None, f"{rule.metric} has no counterpart in the worker's /metrics"
    span = _fmt_duration(rule.baseline_windows * _parse_ms(w))
    base = f"quantile_over_time(0.5, ({e})[{span}:{w}] offset {w})"
    if rule.increase_pct is not None:
        expr = f"({e}) > {_num(1 + rule.increase_pct / 100)} * {base}"
    else:
        expr = f"({e}) < {_num(1 - (rule.decrease_pct or 0.0) / 100)} * {base}"
    notes.append(f"{rule.name}: baseline is the median of {rule.baseline_windows} trailing "
                 f"{w} steps, not of the worker's windows")
    return expr, ""


def _absence_expr(rule: Rule, threshold: float) -> str:
    """absence: seconds since the last event per group, over ``absent_for``."""
    sel = _selector(rule.match, _EXPORT_LABELS)
    by = ", ".join(rule.group_by)
    return (f"time() - max by ({by}) (driftline_last_event_timestamp_seconds{sel}) "
            f"> {_num(threshold)}")


def _drift_expr(rule: Rule) -> str:
    """drift: the drift gauge of the condition's metric, compared."""
    assert rule.condition is not None
    sel = _selector(rule.match, ("app", "model", "prompt_version", "field", "method", "environment"))
    c = rule.condition
    if c.metric == "drift.p_value":
        return f"driftline_drift_p_value{sel} {c.op} {_num(c.threshold)}"
    if c.metric == "drift.drifted":
        return f"driftline_drift_detected{sel} {c.op} {_num(c.threshold)}"
    return f"driftline_drift_statistic{sel} {c.op} {_num(c.threshold)}"


def _parse_ms(d: str) -> int:
    from driftline.schemas.rules import parse_duration

    return parse_duration(d)


def export_prometheus_rules(ruleset: RuleSet, *, rate_window: str = "5m",
                            group_name: str = "driftline") -> tuple[str, list[str]]:
    """Prometheus alerting rules (YAML text) for ``ruleset`` over the worker's ``/metrics``.

    Returns the file text and the rules that cannot be expressed, as ``"NAME: why"``; the
    runaway rules among them (per trace, evaluated by the worker only) are not listed in
    the file's header.
    The text is deterministic (the same rules give the same bytes).
    """
    _parse_ms(rate_window)
    exported: list[dict[str, Any]] = []
    skipped: list[str] = []
    notes: list[str] = []
    for rule in ruleset:
        r, why, n = _export_rule(rule, rate_window)
        notes.extend(n)
        if r is None:
            skipped.append(f"{rule.name}: {why}")
        else:
            exported.append(r)
    header = [
        f"# Generated by `driftline rules export --prometheus` from {Path(ruleset.source).name}.",
        "# Do not edit: regenerate with",
        "#   python -m driftline.streams.stages.rule_engine export-prometheus streams/stages/default_rules.yaml"
        " > deploy/prometheus/driftline-rules.yml",
        f"# Rate window: {rate_window}. Metric contract: driftline.streams.stages.rule_engine docstring.",
    ]
    missing = [s for s in skipped if _STREAM_ONLY not in s and _STREAM_ONLY_COMPARE not in s]
    if missing:
        header.append("# Not exported (cannot be expressed in PromQL over /metrics):")
        header.extend(f"#   - {s}" for s in missing)
    if notes:
        header.append("# Approximations:")
        header.extend(f"#   - {n}" for n in notes)
    body = yaml.safe_dump({"groups": [{"name": group_name, "rules": exported}]},
                          sort_keys=False, width=4096, allow_unicode=True)
    return "\n".join(header) + "\n" + body, skipped


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m driftline.streams.stages.rule_engine check FILE | export-prometheus [FILE]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) >= 2 and args[0] == "check":
        errors = check_rules(args[1])
        for e in errors:
            print(f"{args[1]}: {e}", file=sys.stderr)
        return 1 if errors else 0
    if args and args[0] == "export-prometheus":
        path = args[1] if len(args) > 1 else str(default_rules_path())
        text, skipped = export_prometheus_rules(load_rules(path))
        sys.stdout.write(text)
        for s in skipped:
            print(f"not exported: {s}", file=sys.stderr)
        return 0
    print("usage: python -m driftline.streams.stages.rule_engine check FILE | export-prometheus [FILE]",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
