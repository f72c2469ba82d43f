"""Stage state follows the partitions (the worker's on_revoked / on_assigned hooks).

Alerting against a real ``alerts`` / ``llm_events`` table in chDB: two stages play two
workers sharing one store, a third plays a worker restarted after a SIGKILL. Drift: the
stage's generation drops the samples of a revoked assignment and the key state, so the
next owner's numbering is the only one.
"""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from driftline.schemas.rules import fingerprint, parse_rules
from driftline.schemas.window_stats import WindowKey
from driftline.streams.ports import KafkaPort, StagePorts, TableWriter, WindowView
from driftline.streams.sinks.clickhouse import ClickHouseSink, ddl_statements
from driftline.streams.sinks.notifiers import InMemoryNotifier
from driftline.streams.sinks.prometheus import WorkerMetrics
from driftline.streams.stages.alerting import AlertingStage
from driftline.streams.stages.drift_references import ms_to_dt
from driftline.streams.stages.windows import EventBatchColumns, WindowAggregator, WindowConfig

RULES = parse_rules(textwrap.dedent("""\
    rules:
      - name: Lat
        kind: threshold
        expr: "latency_ms.p50 > 1000"
        min_events: 1
      - name: Silent
        kind: absence
        absent_for: 5m
        group_by: [app, model]
    """))
T0 = 1_800_000_000_000 - 1_800_000_000_000 % 60_000   # a window start
TOPIC = "llm.events"
WC = WindowConfig(size_ms=60_000)


def cols(app: str, ts: list[int], latency: float) -> EventBatchColumns:
    n = len(ts)
    z = np.zeros(n, np.int64)
    nan = np.full(n, np.nan)
    f = np.zeros(n, bool)
    return EventBatchColumns([WindowKey(app, "m")] * n, np.asarray(ts, np.int64), np.full(n, latency), nan,
                             nan, f, z, z, z, z, z, np.full(n, 0.01), f, f, f, nan)


@pytest.fixture
def sink(tmp_path: Path) -> Any:
    s = ClickHouseSink(f"chdb://{tmp_path / 'chdb'}")
    for stmt in ddl_statements("driftline"):
        s.call(lambda c, q=stmt: c.command(q))
    # the stored events: app k1 on partition 0, app k2 on partition 1 (keyed input)
    rows = [[f"{app}-{i}", T0 + i * 1000, app, "m", TOPIC, part, i]
            for app, part in (("k1", 0), ("k2", 1)) for i in range(3)]
    s.call(lambda c: c.insert("driftline.llm_events", [[r[0], ms_to_dt(r[1]), *r[2:]] for r in rows],
                              column_names=["event_id", "timestamp", "app", "model", "source_topic",
                                            "source_partition", "source_offset"]))
    yield s
    s.close()


def alert_rows(sink: Any) -> list[tuple[Any, ...]]:
    return sorted(sink.call(lambda c: c.query(
        "SELECT rule, app, state, toUnixTimestamp64Milli(ts) FROM driftline.alerts").result_rows))


class Resending(InMemoryNotifier):
    """What the stage asks of a re-sending notifier (AlertmanagerNotifier's restore/forget)."""

    def __init__(self) -> None:
        super().__init__(name="resending")
        self.active: set[str] = set()

    def restore(self, transitions: Any) -> None:
        self.active |= {t.labels["app"] for t in transitions if t.state == "firing"}

    def forget(self, fingerprints: Any) -> None:
        self.active -= {a for a in self.active if fingerprint("Lat", {"app": a, "model": "m"}) in set(fingerprints)}


async def stage(sink: Any, agg: WindowAggregator, now: dict[str, int]) -> AlertingStage:
    st = AlertingStage(RULES, registry=CollectorRegistry(), eval_interval_s=3600, restore_grace_s=0,
                       clock=lambda: now["ms"], notifiers=[Resending()])
    await st.start(StagePorts(tables=TableWriter(sink, ("alerts",)), metrics=WorkerMetrics(CollectorRegistry()),
                              windows=WindowView(lambda: agg, lambda: False), kafka=KafkaPort("")))
    return st


async def test_alert_state_moves_with_the_partition_and_is_recorded_once(sink: Any) -> None:
    """Worker A fires Lat on k1 and k2; k2's partition moves to B. Then: A records nothing
    about k2 (no "resolved" for lack of data, no absence alert: its state was dropped on
    assignment); B restores k2 as firing (no second "firing") and records its resolution
    once; C (a worker restarted after a kill, replaying both of k2's windows) records
    neither again. Mutations caught: no ``retain`` on assignment (A: Lat resolved and
    Silent firing for k2), no restore (B: Lat firing again at T0), no floors in
    ``_unrecorded`` (C: firing and resolved again), no flush in ``on_revoked`` (B reads
    no firing row: fires again), evaluation before the assignment (A fires before any
    partition is known)."""
    tp0, tp1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)
    now = {"ms": T0 + 5_000}
    agg_a = WindowAggregator(WC)
    a = await stage(sink, agg_a, now)
    agg_a.add(cols("k1", [T0, T0 + 1_000], 5_000.0))
    agg_a.add(cols("k2", [T0, T0 + 1_000], 5_000.0))
    assert a.tick() == []                                    # no assignment yet: nothing evaluated
    await a.on_assigned([tp0, tp1])
    assert [(t.rule, t.labels["app"], t.state, t.ts_ms) for t in a.tick()] == [
        ("Lat", "k1", "firing", T0), ("Lat", "k2", "firing", T0)]
    # the rebalance: k2's partition goes to B
    await a.on_revoked()
    assert alert_rows(sink) == [("Lat", "k1", "firing", T0), ("Lat", "k2", "firing", T0)]
    await a.on_assigned([tp0])
    now["ms"] = T0 + 6 * 60_000                              # k2 silent on A for 6 minutes
    agg_a.add(cols("k1", [T0 + 3 * 60_000 + 1_000], 5_000.0))
    # evaluated (k1's own gap resolves and fires it again), nothing about k2
    assert {t.labels["app"] for t in a.tick()} == {"k1"}
    assert a.evaluator.held_apps() == {"k1"}
    assert a.notifiers[0].active == {"k1"}                  # k2 no longer re-sent by A (Alertmanager)

    now_b = {"ms": T0 + 5_000}
    agg_b = WindowAggregator(WC)
    agg_b.add(cols("k2", [T0, T0 + 1_000], 5_000.0))         # its windows, rebuilt from llm_events
    b = await stage(sink, agg_b, now_b)
    await b.on_assigned([tp1])
    assert [t.rule for t in b.evaluator.active_alerts()] == ["Lat"]
    assert b.tick() == []                                    # restored firing: not fired again
    assert b.notifiers[0].active == {"k2"}                  # ... and re-sent by B from now on
    agg_b.add(cols("k2", [T0 + 60_000, T0 + 61_000], 10.0))  # k2 recovers in the next window
    now_b["ms"] = T0 + 65_000
    assert [(t.rule, t.state, t.ts_ms) for t in b.tick()] == [("Lat", "resolved", T0 + 60_000)]
    await b.on_revoked()
    k2 = [r for r in alert_rows(sink) if r[1] == "k2"]
    assert k2 == [("Lat", "k2", "firing", T0), ("Lat", "k2", "resolved", T0 + 60_000)]

    # C: restarted after a kill, replays both of k2's windows (fired and resolved before)
    agg_c = WindowAggregator(WC)
    agg_c.add(cols("k2", [T0, T0 + 1_000], 5_000.0))
    agg_c.add(cols("k2", [T0 + 60_000, T0 + 61_000], 10.0))
    c = await stage(sink, agg_c, now_b)
    await c.on_assigned([tp1])
    assert c.evaluator.active_alerts() == []                 # resolved in the table: not restored
    out = c.tick()
    assert out == [] and c.suppressed == 2
    for st in (a, b, c):
        await st.stop()
    assert [r for r in alert_rows(sink) if r[1] == "k2"] == k2


def test_a_replayed_transition_at_the_recorded_time_is_skipped_but_a_resolution_is_not() -> None:
    """``_unrecorded``: at the recorded ts only a "resolved" after a recorded "firing" is new;
    before it nothing is; a "firing" skipped because the table says resolved mutes that
    alert's next "resolved". Mutation caught: ``<=`` for every state (the resolution of a
    restored alert within its firing millisecond would never be recorded)."""
    from driftline.schemas.rules import AlertTransition

    st = AlertingStage(RULES, write_alerts=False)

    def t(fp: str, state: str, ts: int) -> AlertTransition:
        return AlertTransition(ts, "Lat", state, "warning", {"app": fp}, {}, 1.0, fp, ts, None)

    st._recorded = {("Lat", "f"): (100, "firing"), ("Lat", "r"): (100, "resolved")}
    out = st._unrecorded([t("f", "firing", 100), t("f", "resolved", 100), t("r", "firing", 90),
                          t("r", "resolved", 100), t("r", "firing", 101), t("new", "firing", 5)])
    assert [(x.fingerprint, x.state, x.ts_ms) for x in out] == [
        ("f", "resolved", 100), ("r", "firing", 101), ("new", "firing", 5)]
    assert st.suppressed == 3
    st._muted.add(("Lat", "m"))
    assert st._unrecorded([t("m", "resolved", 500)]) == [] and not st._muted


async def test_drift_samples_of_a_revoked_assignment_are_dropped_with_the_key_state(tmp_path: Path) -> None:
    """DriftStage.on_revoked: the samples in flight are tested and written first (the drain);
    then the key state is dropped, so the next owner reloads it from ClickHouse; a sample
    stored before the revocation that reaches the drift loop after it is dropped, never
    numbered beside the next owner's. Mutations caught: no state clear (the key keeps its
    old ``seq`` here), no generation check (the stale sample is numbered and written)."""
    from driftline.streams.stages.semantic_drift import DriftConfig, DriftStage, Sample

    class Enc:
        name, dim, max_chars, device = "fake", 4, 50, "cpu"

        def encode(self, texts: Any) -> Any:
            return np.ones((len(texts), 4), np.float32)

    s = ClickHouseSink(f"chdb://{tmp_path / 'chdb'}")
    try:
        for stmt in ddl_statements("driftline"):
            s.call(lambda c, q=stmt: c.command(q))
        st = DriftStage(DriftConfig(sample_rate=1.0, ref_size=10, window_size=10, control_topic=None),
                        CollectorRegistry(), Enc())
        tables = ("llm_embeddings", "drift_references", "drift_scores", "drift_control_log")
        await st.start(StagePorts(tables=TableWriter(s, tables), metrics=WorkerMetrics(CollectorRegistry()),
                                  windows=WindowView(lambda: None, lambda: False), kafka=KafkaPort("")))
        key = ("app", "m", "")
        st._on_embedded([Sample(key, "prompt", f"e{i}", T0 + i, f"t{i}") for i in range(3)], [0, 1, 2],
                        np.ones((3, 4), np.float32))
        stale = Sample(key, "prompt", "late", T0 + 9, "late text")     # stored before the revocation
        await st.on_revoked()
        assert st.engine is not None and st.engine.state == {}
        assert st.stored_embeddings == 3
        st._on_embedded([stale], [9], np.ones((1, 4), np.float32))
        st._on_embedded([Sample(key, "prompt", "new", T0 + 10, "new text", st._gen)], [10],
                        np.ones((1, 4), np.float32))
        assert await st.drain(10)
        assert st.revoked_samples == 1
        got = s.call(lambda c: c.query("SELECT event_id, seq FROM driftline.llm_embeddings FINAL ORDER BY seq")
                     .result_rows)
        assert got == [("e0", 0), ("e1", 1), ("e2", 2), ("new", 3)]   # reloaded: numbering continues
        await st.stop()
    finally:
        s.close()
    await asyncio.sleep(0)


async def test_the_worker_calls_optional_hooks_and_contains_their_failures() -> None:
    """Worker._stage_hook: a stage without the hook is skipped, a failing hook is logged and
    counted in ``stage_errors`` and the next stage's hook still runs. Mutation caught: a
    propagated exception (the rebalance callback, and so the consumer, would fail)."""
    from types import SimpleNamespace

    from driftline.streams.worker import Worker

    calls: list[str] = []

    class Fails:
        name = "fails"

        async def on_revoked(self) -> None:
            raise RuntimeError("boom")

    class Records:
        name = "records"

        async def on_revoked(self) -> None:
            calls.append("revoked")

    metrics = WorkerMetrics(CollectorRegistry())
    fake = SimpleNamespace(_hooked=[SimpleNamespace(name="plain"), Fails(), Records()], metrics=metrics)
    await Worker._stage_hook(fake, "on_revoked")  # type: ignore[arg-type]
    assert calls == ["revoked"]
    assert dict(metrics.stage_errors) == {"fails": 1}
