"""The window stage on the wall clock (WindowClock): the idle close of a quiet stream,
the stand-still while the source is cut off, the partial rows every emit interval.
No clock is read: ``now`` and ``wall_ms`` are passed in."""

from __future__ import annotations

from driftline.streams.stages.windows import WindowClock
from tests.unit.test_watermarks import MIN, P0, cols, config

T0 = 1_700_000_000_000 - 1_700_000_000_000 % MIN


def _clock() -> WindowClock:
    c = WindowClock(config(), idle_close_s=10.0, emit_interval_s=5.0, now=100.0)
    c.add(cols([T0 + 1_000, T0 + 2_000], [P0, P0]), wall_ms=T0 + 3_000, now=100.0)
    return c


def test_a_quiet_stream_closes_its_windows_after_idle_close_s() -> None:
    """Mutation caught: no idle close (the last window never written final)."""
    c = _clock()
    c.last_emit = 1e9  # no partial rows
    assert c.advance(now=101.0, wall_ms=T0 + 4_000, records=False, cut_off=lambda: False) == []
    closed = c.advance(now=170.5, wall_ms=T0 + 73_500, records=False, cut_off=lambda: False)
    assert [(w.final, w.events) for w in closed] == [(True, 2)]
    assert c.windows.watermark_ms == T0 + 2_000 + 70_500


def test_a_cut_off_source_is_not_idle() -> None:
    """Mutation caught: cut_off ignored (event time follows wall time through a Kafka or
    ClickHouse outage: the records held back would all be late)."""
    c = _clock()
    c.last_emit = 1e9  # no partial rows
    assert c.advance(now=170.5, wall_ms=T0 + 73_500, records=False, cut_off=lambda: True) == []
    assert c.windows.watermark_ms == T0 + 2_000 and c.wall_at_watermark == 170.5


def test_partial_rows_every_emit_interval_and_on_request() -> None:
    """Mutation caught: request_flush not resetting the emit clock (no partial rows until
    the interval passes)."""
    c = _clock()
    rows = c.advance(now=101.0, wall_ms=T0 + 4_000, records=True, cut_off=lambda: False)
    assert [(w.final, w.events) for w in rows] == [(False, 2)]
    c.add(cols([T0 + 3_000], [P0]), wall_ms=T0 + 4_000, now=102.0)
    assert c.advance(now=102.0, wall_ms=T0 + 4_000, records=True, cut_off=lambda: False) == []
    c.request_flush()
    assert [(w.final, w.events) for w in c.advance(now=102.5, wall_ms=T0 + 4_500, records=True,
                                                 cut_off=lambda: False)] == [(False, 3)]
    assert [(w.final, w.events) for w in c.reset()] == []
    assert c.windows.open_windows == 0
