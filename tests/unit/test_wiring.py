"""The wiring (streams/wiring.py) and the stage ports (streams/ports.py), without I/O."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from driftline.schemas.window_stats import WindowKey
from driftline.streams.ports import StagePorts, TableWriter, WindowView
from driftline.streams.stages.windows import EventBatchColumns, WindowAggregator, WindowConfig
from driftline.streams.wiring import AlertingOptions, build_worker, link_stages, stage_factories
from driftline.streams.worker import WorkerConfig


def _worker(**stages: Any) -> Any:
    cfg = WorkerConfig(kafka="127.0.0.1:9092", clickhouse="chdb:///tmp/pt-wiring-unused")
    return build_worker(cfg, CollectorRegistry(), stage_factories(**stages))


def test_worker_stages_are_built_in_order_and_drift_feeds_alerting_once() -> None:
    # Catches: the drift -> alerting link dropped (drift rules would never see a result),
    # or made twice when serve_worker's callers pass both stages (each result observed twice).
    from driftline.streams.stages.semantic_drift import DriftConfig

    w = _worker(alerting=AlertingOptions(eval_interval_s=0.5), drift=DriftConfig())
    alerting, drift = w.stages
    assert (alerting.name, drift.name) == ("alerting", "drift")
    assert alerting.eval_interval_s == 0.5 and len(alerting.rules) == 15  # the shipped default rules
    assert drift.observers == [alerting.observe_drift]
    link_stages(w.stages)
    assert drift.observers == [alerting.observe_drift]
    assert [s.name for s in _worker(alerting=None, drift=None).stages] == []


def test_each_stage_gets_a_writer_for_its_own_tables_only() -> None:
    # Catches: ports_for handing a stage the whole sink (the alerting stage could write
    # llm_events), or TableWriter not checking the table (it would reach the sink).
    from driftline.streams.stages.semantic_drift import DriftConfig

    w = _worker(alerting=AlertingOptions(), drift=DriftConfig())
    alerting, drift = (w.ports_for(st) for st in w.stages)
    assert alerting.tables.tables == {"alerts"}
    assert drift.tables.tables == {"llm_embeddings", "drift_references", "drift_scores", "drift_control_log",
                                   "drift_golden", "guard_results"}
    assert alerting.kafka.bootstrap == "127.0.0.1:9092" and alerting.redaction == w.cfg.redaction
    with pytest.raises(ValueError, match="does not write 'llm_events'"):
        asyncio.run(TableWriter(None, ("alerts",)).insert_rows("llm_events", [{"a": 1}], ["a"]))


def test_window_view_follows_the_aggregator_a_rebalance_replaces() -> None:
    # Catches: the view holding the aggregator it was built with (after a rebalance the
    # alerting clock and live windows would read a dead aggregator).
    holder = {"agg": WindowAggregator(WindowConfig(size_ms=60_000))}
    view = WindowView(lambda: holder["agg"])
    assert view.watermark_ms is None and view.peek() == [] and view.size_ms == 60_000
    n = 2
    z = np.zeros(n, np.int64)
    nan = np.full(n, np.nan)
    f = np.zeros(n, bool)
    cols = EventBatchColumns([WindowKey("a", "m", "v")] * n, np.asarray([1_000, 2_000], np.int64),
                             np.asarray([1.0, 2.0]), nan, nan, f, z, z, z, z, z, np.full(n, 0.01), f, f, f, nan)
    fresh = WindowAggregator(WindowConfig(size_ms=30_000))
    fresh.add(cols)
    holder["agg"] = fresh
    assert view.size_ms == 30_000 and view.watermark_ms == fresh.watermark_ms
    assert [w.events for w in view.peek()] == [2] and view.peek() == []
    assert StagePorts.detached().windows.peek() == []
