"""Per-partition watermarks, the wall-clock bound, idle partitions, late events per key and the
key cap of the window stage, with exact numbers. No clock is read: wall time is passed in."""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from driftline.schemas.window_stats import WindowKey
from driftline.streams.sinks.prometheus import WorkerMetrics
from driftline.streams.stages.windows import EventBatchColumns, WindowAggregator, WindowConfig

MIN = 60_000
K = WindowKey("chat", "m")
P0: Hashable = ("llm.events", 0)
P1: Hashable = ("llm.events", 1)
YEAR_9999_MS = 253_402_300_799_000


def cols(ts: list[int], src: list[Hashable] | None = None, keys: list[WindowKey] | None = None,
         latency: float = 100.0) -> EventBatchColumns:
    n = len(ts)
    z = np.zeros(n, np.int64)
    nan = np.full(n, np.nan)
    f = np.zeros(n, bool)
    codes = None
    srcs: list[Hashable] | None = None
    if src is not None:
        srcs = list(dict.fromkeys(src))
        codes = np.asarray([srcs.index(s) for s in src], np.int64)
    return EventBatchColumns(keys if keys is not None else [K] * n, np.asarray(ts, np.int64),
                             np.full(n, latency), nan, nan, f, z, z, z, z, z, np.full(n, 0.01),
                             f, f, f, nan, source_codes=codes, source_list=srcs)


def config(**kw: int | None) -> WindowConfig:
    return WindowConfig(size_ms=MIN, allowed_lateness_ms=0, **kw)  # type: ignore[arg-type]


def test_one_far_future_event_does_not_make_later_events_late() -> None:
    # Mutation caught: dropping the wall-clock bound (cap = None in _observe_sources and
    # _recompute) moves the watermark to year 9999 and makes all 30 later events late.
    agg = WindowAggregator(config(watermark_max_ahead_ms=10_000))
    wall = 20 * MIN + 30_000
    assert agg.add(cols([20 * MIN + 1_000, YEAR_9999_MS], [P0, P0]), wall_ms=wall) == 0
    assert agg.ahead_events == 1
    assert agg.watermark_ms == wall + 10_000          # bounded: wall clock + allowed skew
    later = [20 * MIN + 2_000 + i * 1_000 for i in range(30)]  # still inside [20 min, 21 min)
    assert agg.add(cols(later, [P0] * 30), wall_ms=wall + 1_000) == 0
    assert agg.late_total == 0
    # the window closes when event time passes its end, with all 31 events (not the 9999 one)
    agg.add(cols([21 * MIN + 5_000], [P0]), wall_ms=21 * MIN + 6_000)
    closed = agg.advance(wall_ms=21 * MIN + 6_000)
    assert [(s.window_start_ms, s.events) for s in closed] == [(20 * MIN, 31)]


def test_far_future_event_without_a_wall_clock_is_the_old_behaviour() -> None:
    # documents why the worker passes wall_ms: without it nothing bounds the watermark
    agg = WindowAggregator(config())
    agg.add(cols([1_000, YEAR_9999_MS]))
    assert agg.add(cols([2_000, 3_000])) == 2


def test_a_skewed_partition_does_not_drop_events() -> None:
    # Partition 0 runs 5 minutes ahead of partition 1. Mutation caught: a global watermark
    # (max over all events, the code before) makes all 60 events of partition 1's second
    # batch late, and its windows [5, 6) min and [6, 7) min lose them.
    agg = WindowAggregator(config())
    p0 = [10 * MIN + i * 1_000 for i in range(10)]
    p1 = [5 * MIN + i * 1_000 for i in range(10)]
    assert agg.add(cols(p0 + p1, [P0] * 10 + [P1] * 10)) == 0
    assert agg.watermark_ms == 5 * MIN + 9_000        # the minimum over the partitions
    assert agg.source_watermarks() == {P0: 10 * MIN + 9_000, P1: 5 * MIN + 9_000}
    p1_more = [5 * MIN + 10_000 + i * 1_000 for i in range(60)]  # 5:10 .. 6:09
    assert agg.add(cols(p1_more, [P1] * 60)) == 0
    assert agg.watermark_ms == 6 * MIN + 9_000
    closed = agg.advance()
    assert [(s.window_start_ms, s.events) for s in closed] == [(5 * MIN, 60)]
    assert sorted((s.window_start_ms, s.events) for s in agg.flush_all()) == [(6 * MIN, 10), (10 * MIN, 10)]


def test_an_idle_partition_stops_holding_the_watermark_after_the_timeout() -> None:
    # Mutation caught: without the idle rule (every source holds) the watermark stays at
    # partition 1's 60_000 and window [1, 2) min never closes.
    agg = WindowAggregator(config(idle_partition_ms=30_000, watermark_max_ahead_ms=None))
    wall = 1_000_000
    agg.add(cols([MIN + 1_000, MIN], [P0, P1]), wall_ms=wall)
    assert agg.watermark_ms == MIN
    agg.add(cols([2 * MIN + 5_000], [P0]), wall_ms=wall + 10_000)
    assert agg.watermark_ms == MIN                     # partition 1 silent for 10 s: holds
    assert agg.advance(wall_ms=wall + 30_000) == []    # exactly the timeout: still holds
    assert agg.watermark_ms == MIN
    closed = agg.advance(wall_ms=wall + 30_001)        # 1 ms past it: partition 0 alone counts
    assert agg.watermark_ms == 2 * MIN + 5_000
    assert [(s.window_start_ms, s.events) for s in closed] == [(MIN, 2)]
    # partition 1 comes back with old data: the watermark never goes back, its event is late
    assert agg.add(cols([MIN + 500], [P1]), wall_ms=wall + 40_000) == 1
    assert agg.watermark_ms == 2 * MIN + 5_000


def test_when_every_partition_is_idle_the_watermark_stays() -> None:
    # An outage (or a quiet stream) idles every partition: the watermark must not jump to
    # the one furthest ahead, past the other's backlog. Mutation caught: taking the largest
    # when all are idle moves it to 10 min and makes partition 1's 5 events late.
    agg = WindowAggregator(config(idle_partition_ms=30_000, watermark_max_ahead_ms=None))
    wall = 1_000_000
    agg.add(cols([10 * MIN, 2 * MIN], [P0, P1]), wall_ms=wall)
    assert agg.advance(wall_ms=wall + 60_000) == []
    assert agg.watermark_ms == 2 * MIN
    assert agg.add(cols([2 * MIN + i * 1_000 for i in range(5)], [P1] * 5), wall_ms=wall + 61_000) == 0


def test_late_events_are_counted_per_key_and_exported_with_bounded_labels() -> None:
    a, b = WindowKey("a", "m"), WindowKey("b", "m")
    agg = WindowAggregator(config())
    agg.add(cols([3 * MIN], keys=[a]))
    assert agg.add(cols([1_000, 2_000, 3_000, 3 * MIN + 1], keys=[a, b, b, b])) == 3
    assert agg.last_late == {a: 1, b: 2}
    reg = CollectorRegistry()
    m = WorkerMetrics(reg, max_series=1)
    m.observe_late(agg.last_late)
    assert reg.get_sample_value("driftline_late_events_total", {"app": "a", "model": "m"}) == 1.0
    # past max_series the label set folds into other/other
    assert reg.get_sample_value("driftline_late_events_total", {"app": "other", "model": "other"}) == 2.0


def test_key_cap_keeps_exactly_max_keys_and_closes_the_evicted_windows() -> None:
    # 25 keys in, cap 10: exactly 10 kept, 15 evicted (the least recently touched), their
    # windows returned once as final rows with every event. Mutation caught: without
    # _evict the aggregator holds 25 keys; dropping _evicted_out loses 15 rows.
    agg = WindowAggregator(config(max_keys=10))
    keys = [WindowKey(f"app-{i:02d}", "m") for i in range(25)]
    for i, k in enumerate(keys):
        agg.add(cols([1_000 + i, 1_000 + i], keys=[k, k]))
    assert (agg.open_keys, agg.evicted_keys, agg.evicted_windows) == (10, 15, 15)
    assert agg.pop_evicted() == 15 and agg.pop_evicted() == 0
    out = agg.advance()
    assert [(s.app, s.events, s.final) for s in out] == [(f"app-{i:02d}", 2, True) for i in range(15)]
    assert agg.advance() == []
    assert sorted(s.app for s in agg.flush_all()) == [f"app-{i:02d}" for i in range(15, 25)]
    # a touched key moves to the back of the eviction order
    agg = WindowAggregator(config(max_keys=2))
    agg.add(cols([1], keys=[keys[0]]))
    agg.add(cols([2], keys=[keys[1]]))
    agg.add(cols([3], keys=[keys[0]]))
    agg.add(cols([4], keys=[keys[2]]))
    assert [s.app for s in agg.advance()] == ["app-01"]


def test_metric_label_sets_stay_bounded_under_random_app_names() -> None:
    # Mutation caught: remembering folded pairs (the code before) grows _keys to 5,000.
    reg = CollectorRegistry()
    m = WorkerMetrics(reg, max_series=100)
    rng = np.random.default_rng(3)
    names = [f"app-{x}" for x in rng.integers(0, 1 << 60, 5_000)]
    m.observe_batch(cols([1_000] * 5_000, keys=[WindowKey(a, "m") for a in names]))
    assert len(m._keys) == 100
    assert len(m.per_key["events"]) == 101                       # 100 pairs + other/other
    assert reg.get_sample_value("driftline_events_total", {"app": "other", "model": "other"}) == 4_900
    assert reg.get_sample_value("driftline_evicted_keys_total", {"dimension": "metric_series"}) == 4_900


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="max_keys"):
        WindowConfig(max_keys=0)
    with pytest.raises(ValueError, match="idle_partition_ms"):
        WindowConfig(idle_partition_ms=0)
    with pytest.raises(ValueError, match="watermark_max_ahead_ms"):
        WindowConfig(watermark_max_ahead_ms=-1)
