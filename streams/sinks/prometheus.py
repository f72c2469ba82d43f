"""Every Prometheus metric of driftline, defined in one place, on the registry passed in.

The worker's own metrics are :class:`WorkerMetrics`; the stages' are
:class:`DriftStageMetrics`, :class:`AlertMetrics` and :class:`NotifierMetrics`; the HTTP
ports' refusals :func:`refused_counter`; the OTLP receiver's :class:`OtlpMetrics`.
Stages and servers create these with the one registry they are given and only update them.

A :class:`WorkerMetrics` keeps plain numbers updated once per *batch* (numpy
bucket counts, dict sums) and a ``Collector`` turns them into metric families at
scrape time, so the hot path never takes a per-event lock. Label cardinality is
bounded: past ``max_series`` distinct (app, model) pairs new pairs are folded
into ``app="other", model="other"`` (the pairs folded are not remembered: memory
stays bounded under a stream of random app names; each batch's folded pairs are
counted in ``driftline_evicted_keys_total{dimension="metric_series"}``). Drift
gauges keep at most ``8 * max_series`` tests (new ones past it are counted under
``dimension="drift_series"``). Other stages report their evictions (open window
keys, alert evaluator keys, drift engine keys) through :meth:`WorkerMetrics.observe_evicted`.

Metric contract (the exported Prometheus rules in deploy/prometheus use these):

| metric | type | labels |
|---|---|---|
| driftline_events_total | counter | app, model |
| driftline_errors_total | counter | app, model |
| driftline_guardrail_hits_total | counter | app, model |
| driftline_feedback_total, driftline_negative_feedback_total | counter | app, model |
| driftline_cost_usd_total | counter | app, model |
| driftline_unpriced_events_total | counter | app, model |
| driftline_input_tokens_total, driftline_output_tokens_total | counter | app, model |
| driftline_latency_ms, driftline_ttft_ms | histogram | app, model |
| driftline_last_event_timestamp_seconds | gauge | app, model |
| driftline_dlq_total | counter | reason |
| driftline_late_events_total | counter | app, model |
| driftline_evicted_keys_total | counter | dimension |
| driftline_sink_errors_total | counter | operation |
| driftline_stage_errors_total | counter | stage |
| driftline_control_refused_total | counter | reason (unsigned, bad_signature, malformed, too_old) |
| driftline_batches_total, driftline_records_total | counter | — |
| driftline_drift_p_value, driftline_drift_statistic, driftline_drift_detected | gauge | app, model, prompt_version, field, method |
| driftline_drift_events_seen | counter | app, model |
| driftline_drift_sampled | counter | app, model, field |
| driftline_semantic_guard_scanned, _flagged | counter | app, model, field, category |
| driftline_drift_tests, driftline_drift_evicted_keys, driftline_embed_* | counter | — |
| driftline_drift_sample_rate, driftline_drift_references, driftline_embed_queue_depth | gauge | — |
| driftline_alert_transitions | counter | rule, state |
| driftline_alerts_firing | gauge | rule, severity |
| driftline_alert_evaluations, driftline_alert_evaluation_seconds | counter | — |
| driftline_alert_catch_up_evaluations, driftline_alert_rows | counter | outcome |
| driftline_alert_evicted_keys | counter | dimension |
| driftline_alert_notifications | counter | notifier, outcome |
| driftline_alert_queue_batches | gauge | notifier |
| driftline_http_refused | counter | port (sql, metrics), reason (auth, host) |
| driftline_otlp_requests | counter | code |
| driftline_otlp_errors | counter | reason |
| driftline_otlp_spans_accepted, _rejected, _skipped | counter | — |
| driftline_otlp_inflight_requests, driftline_otlp_inflight_bytes | gauge | — |
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from driftline.schemas.window_stats import WindowKey
from driftline.streams.stages.windows import EventBatchColumns, group_indices

__all__ = ["WorkerMetrics", "LATENCY_BUCKETS_MS", "DriftStageMetrics", "AlertMetrics", "NotifierMetrics",
           "OtlpMetrics", "refused_counter"]

LATENCY_BUCKETS_MS: tuple[float, ...] = (
    25, 50, 100, 250, 500, 750, 1000, 1500, 2000, 3000, 5000, 7500, 10000, 20000, 30000, 60000,
)


#: the worker's labelled counters read from its dicts: (name, help, labels, attribute)
_LABELLED_COUNTERS: tuple[tuple[str, str, list[str], str], ...] = (
    ("driftline_dlq", "records sent to the dead-letter topic", ["reason"], "dlq"),
    ("driftline_sink_errors", "failed ClickHouse operations (retried)", ["operation"], "sink_errors"),
    ("driftline_stage_errors", "exceptions raised by a stream stage (logged, never propagated)", ["stage"],
     "stage_errors"),
    ("driftline_control_refused", "control commands refused: unsigned or badly signed while a control "
     "secret is set", ["reason"], "control_refused"),
    ("driftline_late_events", "events that arrived after their window closed", ["app", "model"],
     "late_by_key"),
    ("driftline_evicted_keys", "keys evicted (or folded into 'other') to keep per-key state bounded, "
     "by dimension", ["dimension"], "evicted"),
)

_PER_KEY = ("events", "errors", "guardrail_hits", "feedback", "negative_feedback", "cost_usd",
            "unpriced_events", "input_tokens", "output_tokens")


class WorkerMetrics(Collector):
    def __init__(self, registry: CollectorRegistry | None = None, max_series: int = 500) -> None:
        self.max_series = max_series
        self._keys: dict[tuple[str, str], tuple[str, str]] = {}
        self.per_key: dict[str, dict[tuple[str, str], float]] = {k: defaultdict(float) for k in _PER_KEY}
        nb = len(LATENCY_BUCKETS_MS) + 1
        self.hist: dict[str, dict[tuple[str, str], np.ndarray]] = {
            "latency_ms": defaultdict(lambda: np.zeros(nb, np.int64)),
            "ttft_ms": defaultdict(lambda: np.zeros(nb, np.int64)),
        }
        self.hist_sum: dict[str, dict[tuple[str, str], float]] = {
            "latency_ms": defaultdict(float), "ttft_ms": defaultdict(float)}
        self.last_event_s: dict[tuple[str, str], float] = {}
        self.dlq: dict[str, float] = defaultdict(float)
        self.sink_errors: dict[str, float] = defaultdict(float)
        self.stage_errors: dict[str, float] = defaultdict(float)
        #: control commands refused by signature check, by reason (streams/ingest/control_auth.py)
        self.control_refused: dict[str, float] = defaultdict(float)
        self.late_events = 0.0
        self.late_by_key: dict[tuple[str, str], float] = defaultdict(float)
        self.evicted: dict[str, float] = defaultdict(float)
        self.batches = 0.0
        self.records = 0.0
        self.skipped_spans = 0.0
        #: the OTLP re-keyer (streams/ingest/rekey.py): events re-produced keyed app/model,
        #: and sends skipped on recovery because the topic already held them
        self.rekeyed = 0.0
        self.rekey_already_held = 0.0
        self.drift: dict[tuple[str, str, str, str, str], tuple[float, float | None, bool]] = {}
        self._edges = np.asarray(LATENCY_BUCKETS_MS, float)
        if registry is not None:
            registry.register(self)

    def _label(self, app: str, model: str) -> tuple[str, str]:
        k = (app, model)
        lab = self._keys.get(k)
        if lab is None:
            if len(self._keys) >= self.max_series:
                self.evicted["metric_series"] += 1
                return ("other", "other")  # not remembered: the map stays at max_series
            lab = self._keys[k] = k
        return lab

    def observe_late(self, late_by_key: Mapping[WindowKey, int]) -> None:
        """Late events of one batch per window key (labels folded like every per-key metric)."""
        for k, n in late_by_key.items():
            self.late_by_key[self._label(k.app, k.model)] += n
            self.late_events += n

    def observe_evicted(self, dimension: str, n: int) -> None:
        """``n`` keys of ``dimension`` evicted (or folded) to keep state bounded."""
        if n:
            self.evicted[dimension] += n

    # -- updates, once per batch ---------------------------------------------------------
    def observe_batch(self, cols: EventBatchColumns) -> None:
        if len(cols) == 0:
            return
        codes, key_list = cols.key_index()
        labels: dict[tuple[str, str], int] = {}
        lab_of_key = np.fromiter((labels.setdefault(self._label(k.app, k.model), len(labels))
                                  for k in key_list), np.int64, len(key_list))
        lab_codes = lab_of_key[codes]
        names = list(labels)
        for code, idx in group_indices(lab_codes):
            lab = names[code]
            pk = self.per_key
            pk["events"][lab] += idx.size
            pk["errors"][lab] += float(cols.is_error[idx].sum())
            pk["guardrail_hits"][lab] += float(cols.guardrail_hit[idx].sum())
            fb = cols.feedback[idx]
            pk["feedback"][lab] += float((~np.isnan(fb)).sum())
            pk["negative_feedback"][lab] += float((fb == -1).sum())
            cost = cols.cost_usd[idx]
            priced = ~np.isnan(cost)
            pk["cost_usd"][lab] += float(cost[priced].sum())
            pk["unpriced_events"][lab] += float(idx.size - priced.sum())
            pk["input_tokens"][lab] += float(cols.input_tokens[idx].sum())
            pk["output_tokens"][lab] += float(cols.output_tokens[idx].sum())
            for name, arr in (("latency_ms", cols.latency_ms), ("ttft_ms", cols.ttft_ms)):
                v = arr[idx]
                v = v[~np.isnan(v)]
                if v.size:
                    b = np.searchsorted(self._edges, v, side="left")
                    self.hist[name][lab] += np.bincount(b, minlength=len(self._edges) + 1)
                    self.hist_sum[name][lab] += float(v.sum())
            t = float(cols.ts_ms[idx].max()) / 1000.0
            if t > self.last_event_s.get(lab, 0.0):
                self.last_event_s[lab] = t

    def observe_dlq(self, reason_class: str, n: int = 1) -> None:
        self.dlq[reason_class] += n

    def observe_drift(self, app: str, model: str, prompt_version: str, field: str, method: str,
                      statistic: float, p_value: float | None, drifted: bool) -> None:
        k = (app, model, prompt_version, field, method)
        if k in self.drift or len(self.drift) < self.max_series * 8:
            self.drift[k] = (statistic, p_value, drifted)
        else:
            self.evicted["drift_series"] += 1

    # -- scrape -------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        for name in _PER_KEY:
            fam = CounterMetricFamily(f"driftline_{name}", f"{name.replace('_', ' ')} by app and model",
                                      labels=["app", "model"])
            for (a, m), v in self.per_key[name].items():
                fam.add_metric([a, m], v)
            yield fam
        for name in ("latency_ms", "ttft_ms"):
            h = HistogramMetricFamily(f"driftline_{name}", f"{name} of LLM calls (milliseconds)",
                                      labels=["app", "model"])
            for lab, counts in self.hist[name].items():
                cum = np.cumsum(counts)
                buckets = [(repr(float(e)), float(c)) for e, c in zip(LATENCY_BUCKETS_MS, cum[:-1], strict=True)]
                buckets.append(("+Inf", float(cum[-1])))
                h.add_metric(list(lab), buckets, self.hist_sum[name][lab])
            yield h
        g = GaugeMetricFamily("driftline_last_event_timestamp_seconds",
                              "event time of the newest event by app and model", labels=["app", "model"])
        for lab, v in self.last_event_s.items():
            g.add_metric(list(lab), v)
        yield g
        for name, doc, labels, attr in _LABELLED_COUNTERS:
            c = CounterMetricFamily(name, doc, labels=labels)
            for lab, v in getattr(self, attr).items():
                c.add_metric(list(lab) if isinstance(lab, tuple) else [lab], v)
            yield c
        yield CounterMetricFamily("driftline_batches", "record batches processed", value=self.batches)
        yield CounterMetricFamily("driftline_records", "Kafka records processed", value=self.records)
        yield CounterMetricFamily("driftline_skipped_spans", "OTLP spans skipped (not a model call: non-GenAI, tool or agent spans)",
                                  value=self.skipped_spans)
        yield CounterMetricFamily("driftline_otlp_rekeyed_events",
                                  "OTLP events re-produced to the events topic keyed app/model", value=self.rekeyed)
        yield CounterMetricFamily("driftline_otlp_rekey_already_held",
                                  "re-keyed sends skipped on recovery: a previous owner had sent them",
                                  value=self.rekey_already_held)
        labels = ["app", "model", "prompt_version", "field", "method"]
        pv = GaugeMetricFamily("driftline_drift_p_value", "p-value of the latest drift test", labels=labels)
        st = GaugeMetricFamily("driftline_drift_statistic", "statistic of the latest drift test", labels=labels)
        dd = GaugeMetricFamily("driftline_drift_detected", "1 when the latest drift test flagged drift",
                               labels=labels)
        for k, (s, p, d) in self.drift.items():
            st.add_metric(list(k), s)
            dd.add_metric(list(k), 1.0 if d else 0.0)
            if p is not None:
                pv.add_metric(list(k), p)
        yield pv
        yield st
        yield dd


class DriftStageMetrics(Collector):
    """The drift stage's metrics, read from its sampler, batcher and engine at scrape time.

    ``stage`` is a :class:`~driftline.streams.stages.semantic_drift.DriftStage`; the stage updates
    :attr:`seen` and :attr:`sampled` once per batch.
    """

    def __init__(self, stage: Any, registry: CollectorRegistry | None = None, max_series: int = 500) -> None:
        self.stage = stage
        self.max_series = max_series
        self.seen: dict[tuple[str, str], float] = defaultdict(float)
        self.sampled: dict[tuple[str, str, str], float] = defaultdict(float)
        #: semantic guard: texts scanned / flagged per (app, model, field, category) (drift thread)
        self.guard_scanned: dict[tuple[str, str, str, str], float] = defaultdict(float)
        self.guard_flagged: dict[tuple[str, str, str, str], float] = defaultdict(float)
        if registry is not None:
            registry.register(self)

    def label(self, app: str, model: str) -> tuple[str, str]:
        if (app, model) in self.seen or len(self.seen) < self.max_series:
            return app, model
        return "other", "other"

    def collect(self) -> Iterator[Metric]:
        st = self.stage
        c = CounterMetricFamily("driftline_drift_events_seen", "events the drift sampler saw",
                                labels=["app", "model"])
        for k, v in self.seen.items():
            c.add_metric(list(k), v)
        yield c
        cs = CounterMetricFamily("driftline_drift_sampled", "texts sampled for embedding",
                                 labels=["app", "model", "field"])
        for k3, v in self.sampled.items():
            cs.add_metric(list(k3), v)
        yield cs
        for name, what, counts in (("scanned", "texts the semantic guard scanned", self.guard_scanned),
                                   ("flagged", "texts the semantic guard flagged", self.guard_flagged)):
            g = CounterMetricFamily(f"driftline_semantic_guard_{name}", f"{what}, per category of the "
                                    "text's field", labels=["app", "model", "field", "category"])
            for k4, v in list(counts.items()):  # written on the drift thread
                g.add_metric(list(k4), v)
            yield g
        yield GaugeMetricFamily("driftline_drift_sample_rate", "configured share of events embedded",
                                value=st.cfg.sample_rate)
        b = st.batcher
        yield CounterMetricFamily("driftline_embed_dropped", "texts dropped: embedding queue full",
                                  value=b.dropped if b else 0)
        yield CounterMetricFamily("driftline_embed_texts", "texts embedded (delivered)",
                                  value=b.delivered if b else 0)
        yield CounterMetricFamily("driftline_embed_model_texts", "texts that went through the model "
                                  "(cache misses)", value=b.encoded if b else 0)
        yield CounterMetricFamily("driftline_embed_cache_hits", "texts served from the content-hash cache",
                                  value=b.cache.hits if b else 0)
        yield GaugeMetricFamily("driftline_embed_queue_depth", "texts waiting to be embedded",
                                value=b.queue_depth if b else 0)
        e = st.engine
        yield CounterMetricFamily("driftline_drift_tests", "drift tests run", value=e.tests_run if e else 0)
        yield CounterMetricFamily("driftline_drift_evicted_keys", "key-fields dropped from memory to stay "
                                  "under max_keys (reloaded from ClickHouse when sampled again)",
                                  value=e.evicted if e else 0)
        yield GaugeMetricFamily("driftline_drift_references", "key-fields with a reference",
                                value=e.active_keys() if e else 0)


class AlertMetrics:
    """The alerting stage's metrics; ``rules`` are the ``(name, severity)`` pairs whose
    ``driftline_alerts_firing`` series start at 0."""

    def __init__(self, registry: CollectorRegistry, rules: Iterable[tuple[str, str]] = ()) -> None:
        r = registry
        self.transitions = Counter("driftline_alert_transitions", "Alert state changes by rule and state.",
                                   ["rule", "state"], registry=r)
        self.firing = Gauge("driftline_alerts_firing", "Alerts firing now, by rule and severity.",
                            ["rule", "severity"], registry=r)
        self.evaluations = Counter("driftline_alert_evaluations", "Rule evaluations (ticks).", registry=r)
        self.catch_up = Counter("driftline_alert_catch_up_evaluations",
                                "Rule evaluations at window boundaries crossed in one tick "
                                "(catch-up), by outcome (evaluated, skipped).", ["outcome"], registry=r)
        self.evicted = Counter("driftline_alert_evicted_keys", "Keys the alert evaluator dropped "
                               "to stay under max_keys, by dimension.", ["dimension"], registry=r)
        self.eval_seconds = Counter("driftline_alert_evaluation_seconds",
                                    "Time spent evaluating rules (ingest + evaluate).", registry=r)
        self.rows = Counter("driftline_alert_rows", "Rows for the ClickHouse alerts table by outcome "
                            "(written, dropped).", ["outcome"], registry=r)
        self.compare_runs = Counter("driftline_alert_compare_runs", "Runs of compare rules' gate queries "
                                    "by rule and outcome (ok, failed).", ["rule", "outcome"], registry=r)
        for name, severity in rules:
            self.firing.labels(name, severity).set(0)
        for outcome in ("written", "dropped"):
            self.rows.labels(outcome)
        for outcome in ("evaluated", "skipped"):
            self.catch_up.labels(outcome)


class NotifierMetrics:
    """The alert dispatcher's metrics, every series of ``notifiers`` (names) present from the start."""

    OUTCOMES = ("delivered", "retried", "failed", "dropped")

    def __init__(self, registry: CollectorRegistry, notifiers: Iterable[str] = ()) -> None:
        self.notifications = Counter(
            "driftline_alert_notifications", "Alert notifications by notifier and outcome "
            "(delivered, retried, failed, dropped), counted per alert.",
            ["notifier", "outcome"], registry=registry)
        self.queue_batches = Gauge(
            "driftline_alert_queue_batches", "Alert batches waiting per notifier.",
            ["notifier"], registry=registry)
        for name in notifiers:
            for outcome in self.OUTCOMES:
                self.notifications.labels(name, outcome)
            self.queue_batches.labels(name).set(0)


class OtlpMetrics:
    """The OTLP receiver's metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("driftline_otlp_requests", "OTLP/HTTP requests by response code",
                                ["code"], registry=registry)
        self.spans_accepted = Counter("driftline_otlp_spans_accepted",
                                      "GenAI spans mapped to LLMEvents and forwarded",
                                      registry=registry)
        self.spans_rejected = Counter("driftline_otlp_spans_rejected",
                                      "GenAI spans rejected for bad attributes", registry=registry)
        self.spans_skipped = Counter("driftline_otlp_spans_skipped",
                                     "spans that are not GenAI model calls", registry=registry)
        self.errors = Counter("driftline_otlp_errors", "failed requests by reason", ["reason"],
                              registry=registry)
        self.inflight_requests = Gauge("driftline_otlp_inflight_requests",
                                       "requests admitted and not yet answered", registry=registry)
        self.inflight_bytes = Gauge("driftline_otlp_inflight_bytes",
                                    "body bytes reserved by the requests in flight",
                                    registry=registry)


def refused_counter(registry: CollectorRegistry) -> Callable[[str], Callable[[str], None]]:
    """``driftline_http_refused_total{port, reason}`` on ``registry``; returns
    ``port -> on_failure`` callbacks for :class:`~driftline.streams.auth.HttpGuard`."""
    c = Counter("driftline_http_refused", "HTTP requests refused: reason auth (no or wrong credentials) "
                "or host (foreign Host/Origin header)", ["port", "reason"], registry=registry)
    for port in ("sql", "metrics"):
        for reason in ("auth", "host"):
            c.labels(port, reason)
    return lambda port: (lambda reason: c.labels(port, reason).inc())
