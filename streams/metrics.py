"""Every Prometheus metric of the worker, defined in one place.

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
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping

import numpy as np
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from driftline.schemas.metrics import WindowKey
from driftline.streams.windows import EventBatchColumns, group_indices

__all__ = ["WorkerMetrics", "LATENCY_BUCKETS_MS"]

LATENCY_BUCKETS_MS: tuple[float, ...] = (
    25, 50, 100, 250, 500, 750, 1000, 1500, 2000, 3000, 5000, 7500, 10000, 20000, 30000, 60000,
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
        #: control commands refused by signature check, by reason (streams/control_auth.py)
        self.control_refused: dict[str, float] = defaultdict(float)
        self.late_events = 0.0
        self.late_by_key: dict[tuple[str, str], float] = defaultdict(float)
        self.evicted: dict[str, float] = defaultdict(float)
        self.batches = 0.0
        self.records = 0.0
        self.skipped_spans = 0.0
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
        c = CounterMetricFamily("driftline_dlq", "records sent to the dead-letter topic", labels=["reason"])
        for r, v in self.dlq.items():
            c.add_metric([r], v)
        yield c
        c = CounterMetricFamily("driftline_sink_errors", "failed ClickHouse operations (retried)",
                                labels=["operation"])
        for r, v in self.sink_errors.items():
            c.add_metric([r], v)
        yield c
        c = CounterMetricFamily("driftline_stage_errors", "exceptions raised by a stream stage (logged, "
                                "never propagated)", labels=["stage"])
        for r, v in self.stage_errors.items():
            c.add_metric([r], v)
        yield c
        c = CounterMetricFamily("driftline_control_refused", "control commands refused: unsigned or badly "
                                "signed while a control secret is set", labels=["reason"])
        for r, v in self.control_refused.items():
            c.add_metric([r], v)
        yield c
        c = CounterMetricFamily("driftline_late_events", "events that arrived after their window closed",
                                labels=["app", "model"])
        for (a, m_), v in self.late_by_key.items():
            c.add_metric([a, m_], v)
        yield c
        c = CounterMetricFamily("driftline_evicted_keys", "keys evicted (or folded into 'other') to keep "
                                "per-key state bounded, by dimension", labels=["dimension"])
        for r, v in self.evicted.items():
            c.add_metric([r], v)
        yield c
        yield CounterMetricFamily("driftline_batches", "record batches processed", value=self.batches)
        yield CounterMetricFamily("driftline_records", "Kafka records processed", value=self.records)
        yield CounterMetricFamily("driftline_skipped_spans", "OTLP spans skipped (not a model call: non-GenAI, tool or agent spans)",
                                  value=self.skipped_spans)
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
