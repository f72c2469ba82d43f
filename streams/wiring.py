"""The pipeline, top to bottom: where every row comes from.

Read this file first. It names every source, transform and sink of
``driftline worker`` (like a Vector pipeline config: each part says what feeds
it), builds the stages from their configs, links them, and hands them to the
worker. ``driftline worker`` (streams/cli/main.py) and ``serve_worker``
(streams/app.py) build their worker here.

SOURCES (the worker's consumer group: streams/ingest/kafka_host.py's KafkaHost, which
delivers batches and commits what the write step confirmed)
  kafka ``llm.events``            JSON events, one per record (schemas/event.py)
  kafka ``otlp_spans[.<suffix>]`` OTLP trace requests, read as OTLP by the topic's name
                                  (``WorkerConfig.topics``; both by default). With
                                  ``otlp_rekey`` (``driftline worker``'s default) they are
                                  read by the RE-KEYER instead (streams/ingest/rekey.py,
                                  group ``<group>.otlp-rekey``): decode -> one JSON event per
                                  GenAI span -> ``llm.events`` keyed app/model (rejected ->
                                  the DLQ; progress -> clickhouse ``rekey_log``), so that a
                                  key's state lives in one worker; the group reads them there
  kafka ``driftline.control``     commands, through ONE broadcast consumer (no group:
                                  every worker sees every command;
                                  streams/ingest/control.py, run by app.py), dispatched
                                  by ``cmd`` (:func:`control_subscriptions`):
                                  ``flush``    -> worker.request_flush (sent while running)
                                  ``baseline`` -> each drift stage's on_command (from the
                                  topic's start; drift_control_log says what was applied)

TRANSFORMS of the spine (Worker.process in streams/worker.py, in the order a batch goes
through them; the windows on the wall clock: stages/windows.WindowClock)
  decode    ingest/transforms.decode_batch  inputs: SOURCES  invalid -> the DLQ, with the reason
  enrich    ingest/transforms.enrich        inputs: decode   cost (schemas/prices.toml + --prices),
                                                            guardrails (--scan-guardrails)
  columns   ingest/transforms.to_columns    inputs: enrich   the ``llm_events`` columns
  windows   stages/windows.WindowAggregator  inputs: columns  event-time windows per
                                              (app, model, prompt_version): final and partial rows

SINKS of the spine: one write step (streams/sinks/write_step.py's WriteStep), in this order
(README "What the worker does")
  clickhouse ``llm_events``         inputs: columns  (texts redacted here, --redact; the
                                                       stages get the original texts)
  clickhouse ``dlq_outbox``         inputs: decode (rejected), llm_events (refused rows)
  clickhouse ``llm_window_metrics`` inputs: windows
  clickhouse ``ingest_log``         the step's source offsets: written last
  kafka      ``llm.events.dlq``     inputs: dlq_outbox (streams/sinks/dlq.py's DeadLetters);
                                  then the offsets are committed
  (after a rebalance the open windows are rebuilt from llm_events: stages/window_restore.py)

STAGES: fed each write step once it is safe (``Stage.on_stored``), given their ports
(streams/ports.py), built by :func:`stage_factories` and linked by :func:`link_stages`
  alerting  stages/alerting.AlertingStage   inputs: stored batches, the open windows (peek),
                                        drift results  -> ``alerts`` table, notifiers
                                        (webhook, Slack, Alertmanager, log)
  drift     stages/semantic_drift.DriftStage  inputs: stored events (sampled by event_id),
                                        ``baseline`` commands
                                        -> ``llm_embeddings``, ``drift_references``,
                                        ``drift_scores``, ``drift_control_log``;
                                        every test result -> alerting (drift rules);
                                        the semantic guard scans each embedded text
                                        (stages/guard_scan.py, --semantic-guard)
                                        -> ``guard_results``, share tests -> ``drift_scores``
                                        (method ``guard_<category>``) and alerting
  numeric_drift stages/numeric_drift.NumericDriftStage  inputs: stored events (columns), ``baseline``
                                        commands -> ``numeric_drift_state``, ``drift_scores``
                                        (field = the numeric field), ``drift_control_log``;
                                        every test result -> alerting (drift rules)

PROMETHEUS: one registry for the worker's metrics and every stage's, served at
``/metrics`` (app.py ``serve_worker``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from driftline.schemas.topics import CONTROL_TOPIC
from driftline.streams.ingest.control import Subscription, handle_control
from driftline.streams.ports import ControlAuth
from driftline.streams.sinks.prometheus import WorkerMetrics
from driftline.streams.worker import (
    Stage,
    Worker,
    WorkerConfig,
    clickhouse_sink,
    load_prices,
    load_scanner,
)

if TYPE_CHECKING:
    from driftline.streams.stages.numeric_drift import NumericDriftConfig
    from driftline.streams.stages.semantic_drift import DriftConfig

__all__ = ["AlertingOptions", "StageFactory", "stage_factories", "link_stages", "build_worker",
           "control_subscriptions"]

#: a stage, or ``(registry) -> stage`` so that it registers its metrics on the worker's registry
StageFactory = Callable[[CollectorRegistry], Stage]


@dataclass(frozen=True)
class AlertingOptions:
    """The alerting stage: its rules file (None: the shipped default rules), where
    alerts go besides the ``alerts`` table and the log, and how often rules run."""

    rules_file: Path | None = None
    webhooks: tuple[str, ...] = ()
    slack_webhooks: tuple[str, ...] = ()
    alertmanagers: tuple[str, ...] = ()
    eval_interval_s: float = 1.0
    #: runaway rules: the most traces (conversations, users) tracked per kind
    max_traces: int = 10_000

    def __post_init__(self) -> None:
        if not self.eval_interval_s > 0:
            raise ValueError("eval_interval_s must be > 0")
        if self.max_traces < 1:
            raise ValueError(f"max_traces must be >= 1, got {self.max_traces}")


# ----------------------------------------------------------------------------- the worker
def build_worker(cfg: WorkerConfig, registry: CollectorRegistry,
                 stages: Sequence[Stage | StageFactory | Any] = ()) -> Worker:
    """The worker: the spine of ``cfg`` (sources, transforms, sinks above) with its
    metrics on ``registry``, and ``stages`` built on that registry and linked."""
    # PROMETHEUS: the spine's metrics; the stages add theirs to the same registry
    metrics = WorkerMetrics(registry)
    # SOURCES: cfg.topics through the consumer group (streams/ingest/kafka_host.py)
    # TRANSFORMS: decode -> enrich (prices, guardrail scanner) -> columns -> windows
    prices, scanner = load_prices(cfg), load_scanner(cfg)
    # SINKS: ClickHouse (the write step on its ingest lane, the stages on its query
    # lane), the DLQ topic cfg.dlq_topic
    sink = clickhouse_sink(cfg, metrics)
    # STAGES, fed after each write step, and their links
    built: list[Stage] = [s if isinstance(s, Stage) else s(registry) for s in stages]
    link_stages(built)
    return Worker(cfg, metrics, sink, built, prices=prices, scanner=scanner)


# ----------------------------------------------------------------------------- stages
def stage_factories(*, alerting: AlertingOptions | None = None,
                    drift: DriftConfig | None = None,
                    numeric: NumericDriftConfig | None = None) -> list[StageFactory]:
    """The stages of ``driftline worker``, in the order they are fed (and stopped in
    reverse): alerting, then drift. None leaves a stage out. The stage modules are
    imported only when used (drift loads the embedding stack)."""
    out: list[StageFactory] = []
    if alerting is not None:
        from driftline.streams.stages.alerting import alerting_stage

        out.append(alerting_stage(alerting.rules_file, webhooks=alerting.webhooks,
                                  slack_webhooks=alerting.slack_webhooks,
                                  alertmanagers=alerting.alertmanagers,
                                  eval_interval_s=alerting.eval_interval_s,
                                  max_traces=alerting.max_traces))
    if drift is not None:
        from driftline.streams.stages.semantic_drift import DriftStage

        out.append(DriftStage.factory(drift))
    if numeric is not None:  # numeric drift (lengths, latency, cost, finish reasons)
        from driftline.streams.stages.numeric_drift import NumericDriftStage

        out.append(NumericDriftStage.factory(numeric))
    return out


def link_stages(stages: Sequence[Stage]) -> None:
    """The links between stages: every drift test result of a drift stage also goes
    to each alerting stage's ``observe_drift`` (drift rules).

    A stage class exists only once its module is imported: the modules are looked up,
    not imported, so a worker without drift does not load the embedding stack.
    """
    drift_mod = sys.modules.get("driftline.streams.stages.semantic_drift")
    numeric_mod = sys.modules.get("driftline.streams.stages.numeric_drift")
    alert_mod = sys.modules.get("driftline.streams.stages.alerting")
    if (drift_mod is None and numeric_mod is None) or alert_mod is None:
        return
    alerting = [st for st in stages if isinstance(st, alert_mod.AlertingStage)]
    kinds = tuple(m.DriftStage if m is drift_mod else m.NumericDriftStage
                  for m in (drift_mod, numeric_mod) if m is not None)
    for st in stages:
        if isinstance(st, kinds):
            for al in alerting:
                if al.observe_drift not in st.observers:
                    st.add_observer(al.observe_drift)


# ----------------------------------------------------------------------------- control topic
def control_subscriptions(worker: Worker) -> list[Subscription]:
    """Who gets which command of the control topic (SOURCES above): ``flush`` and any
    other command but ``baseline`` -> the worker (checked against its control secret),
    only those sent while it runs; ``baseline`` -> each drift stage with a control topic,
    every record from the topic's start."""
    cfg = worker.cfg
    auth = ControlAuth(cfg.control_secret, cfg.control_max_age_s)
    refused = worker.metrics.control_refused
    subs = [Subscription(CONTROL_TOPIC, lambda rec: handle_control(rec.cmd, auth=auth, refused=refused,
                                                                   flush=worker.request_flush))]
    drift_mod = sys.modules.get("driftline.streams.stages.semantic_drift")
    if drift_mod is not None:
        for st in worker.stages:
            if isinstance(st, drift_mod.DriftStage) and st.cfg.control_topic:
                subs.append(Subscription(st.cfg.control_topic, st.on_command, frozenset({"baseline"}),
                                         replay=True))
    numeric_mod = sys.modules.get("driftline.streams.stages.numeric_drift")
    if numeric_mod is not None:
        for st in worker.stages:
            if isinstance(st, numeric_mod.NumericDriftStage) and st.cfg.control_topic:
                subs.append(Subscription(st.cfg.control_topic, st.on_command, frozenset({"baseline"}),
                                         replay=True))
    return subs
