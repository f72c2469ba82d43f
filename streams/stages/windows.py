"""Tumbling event-time windows per (app, model, prompt_version).

Windows are half-open ``[start, start + size)`` and are a pure function of the
event timestamp (``start = ts - ts % size``). A window closes when
``watermark >= end + allowed_lateness``. An event whose window is still open
updates it even when it arrives late; an event whose window has already closed
is *late*: it is still stored as a raw row, but it no longer changes the closed
window, and it is counted (``late_events`` of the earliest open window of its
key, :attr:`WindowAggregator.last_late` per key, the worker's Prometheus counter).

Watermark: one per *source* (Kafka topic and partition, ``EventBatchColumns.source_codes``),
the largest event time seen from it; the stream's watermark is the minimum over
the sources, so a partition that runs ahead (skew, a faster producer) does not make
a slower one's events late. A source that delivered nothing for
``idle_partition_ms`` of wall time stops holding the watermark back (when every
source is idle the watermark stays: the caller closes windows of a quiet stream). An event time beyond the wall clock plus
``watermark_max_ahead_ms`` moves its source only to that bound: one record dated
9999 cannot make every later event late. The watermark never goes back. A source
that has not delivered an event yet does not hold the watermark (after a restart
the rebuild seeds every partition that has stored rows).

Bounded state: at most ``max_keys`` keys hold open windows; past it, the key
touched least recently is evicted: its open windows are closed early (returned
as final rows by the next :meth:`WindowAggregator.advance`, so nothing is lost)
and counted in ``evicted_keys`` / ``evicted_windows``.

Wall time is never read here: the caller passes it in (``wall_ms``) for idleness
and the upper bound; without it neither applies. Early (partial) rows are taken
by the caller with :meth:`WindowAggregator.partial`, closed ones with
:meth:`WindowAggregator.advance`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import numpy as np

from driftline.detectors.sketch import QuantileSketch
from driftline.schemas.window_stats import WindowKey, WindowStats

__all__ = ["WindowConfig", "WindowAggregator", "WindowClock", "EventBatchColumns", "source_index"]


@dataclass(frozen=True, slots=True)
class WindowConfig:
    size_ms: int = 60_000
    allowed_lateness_ms: int = 30_000
    relative_accuracy: float = 0.01
    #: a source (partition) silent for this long (wall time) stops holding the watermark
    idle_partition_ms: int = 30_000
    #: the watermark never runs more than this ahead of the wall clock passed in
    #: (None: no bound); a later event time moves its source only this far
    watermark_max_ahead_ms: int | None = 10_000
    #: at most this many keys hold open windows; past it the least recently touched is
    #: evicted (its windows closed early, counted)
    max_keys: int = 10_000

    def __post_init__(self) -> None:
        if self.idle_partition_ms <= 0:
            raise ValueError(f"idle_partition_ms must be > 0, got {self.idle_partition_ms}")
        if self.watermark_max_ahead_ms is not None and self.watermark_max_ahead_ms < 0:
            raise ValueError(f"watermark_max_ahead_ms must be >= 0 or None, got {self.watermark_max_ahead_ms}")
        if self.max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {self.max_keys}")
        if self.size_ms <= 0:
            raise ValueError(f"size_ms must be > 0, got {self.size_ms}")
        if self.allowed_lateness_ms < 0:
            raise ValueError(f"allowed_lateness_ms must be >= 0, got {self.allowed_lateness_ms}")
        if not 0 < self.relative_accuracy < 1:
            raise ValueError(f"relative_accuracy must be in (0, 1), got {self.relative_accuracy}")


@dataclass(slots=True)
class EventBatchColumns:
    """The numbers the window stage needs from a batch of valid events, column-wise.

    Missing optional values are NaN (floats) or 0 (token counts). ``cost`` is NaN
    when the event could not be priced.
    """

    keys: list[WindowKey]
    ts_ms: np.ndarray  # int64
    latency_ms: np.ndarray
    ttft_ms: np.ndarray
    tpot_ms: np.ndarray
    is_error: np.ndarray  # bool
    input_tokens: np.ndarray  # int64
    output_tokens: np.ndarray
    cache_read_input_tokens: np.ndarray
    cache_creation_input_tokens: np.ndarray
    reasoning_output_tokens: np.ndarray
    cost_usd: np.ndarray  # float, NaN = unpriced
    guardrail_checked: np.ndarray  # bool
    guardrail_hit: np.ndarray  # bool
    guardrail_blocked: np.ndarray  # bool
    feedback: np.ndarray  # float: -1/0/1, NaN = none
    #: optional: ``keys`` as codes into ``key_list`` (to_columns fills them; else derived)
    key_codes: np.ndarray | None = None
    key_list: list[WindowKey] | None = None
    #: optional: the source (e.g. ``(topic, partition)``) of each event as codes into
    #: ``source_list``; None: one source for the whole stream
    source_codes: np.ndarray | None = None
    source_list: list[Hashable] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, idx: np.ndarray) -> EventBatchColumns:
        """The events at positions ``idx``, in that order (codes keep their lists)."""
        arrays = {f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)
                  if isinstance(getattr(self, f.name), np.ndarray)}
        keys = [self.keys[i] for i in idx.tolist()]
        return dataclasses.replace(self, keys=keys, **arrays)

    def key_index(self) -> tuple[np.ndarray, list[WindowKey]]:
        """(code per event, distinct keys): ``keys[i] == key_list[codes[i]]``."""
        if self.key_codes is None or self.key_list is None:
            seen: dict[WindowKey, int] = {}
            setdefault = seen.setdefault
            self.key_codes = np.fromiter((setdefault(k, len(seen)) for k in self.keys), np.int64,
                                         len(self.keys))
            self.key_list = list(seen)
        return self.key_codes, self.key_list


def source_index(topic_codes: np.ndarray, topics: list[str],
                 partitions: np.ndarray) -> tuple[np.ndarray, list[Hashable]]:
    """(code per event, distinct ``(topic, partition)``) from topic codes into ``topics``.

    >>> source_index(np.array([0, 1, 0]), ["a", "b"], np.array([2, 0, 2]))
    (array([0, 1, 0]), [('a', 2), ('b', 0)])
    """
    parts = np.maximum(np.asarray(partitions, np.int64), 0)
    width = int(parts.max()) + 1 if parts.size else 1
    comb = np.asarray(topic_codes, np.int64) * width + parts
    uniq, inv = np.unique(comb, return_inverse=True)
    return (np.asarray(inv, np.int64).ravel(),
            [(topics[int(u) // width], int(u) % width) for u in uniq.tolist()])


def group_indices(codes: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """[(code, indices of the events with that code)], codes ascending, indices ascending."""
    order = np.argsort(codes, kind="stable")
    sc = codes[order]
    cut = np.flatnonzero(np.diff(sc)) + 1
    return [(int(sc[g[0]]), order[g]) for g in np.split(np.arange(sc.size), cut)] if sc.size else []


_SUM_FIELDS = (
    "input_tokens", "output_tokens", "cache_read_input_tokens",
    "cache_creation_input_tokens", "reasoning_output_tokens",
)


@dataclass(slots=True)
class _Window:
    key: WindowKey
    start_ms: int
    end_ms: int
    latency: QuantileSketch
    ttft: QuantileSketch
    tpot: QuantileSketch
    events: int = 0
    errors: int = 0
    late: int = 0
    sums: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_SUM_FIELDS, 0))
    cost_usd: float = 0.0
    unpriced: int = 0
    guardrail_checked: int = 0
    guardrail_hits: int = 0
    guardrail_blocked: int = 0
    feedback_events: int = 0
    negative_feedback: int = 0
    dirty: bool = True
    peeked: bool = False

    def stats(self, final: bool, accuracy: float) -> WindowStats:
        def q(s: QuantileSketch, p: float) -> float | None:
            return s.quantile(p) if s.count else None

        return WindowStats(
            window_start_ms=self.start_ms, window_end_ms=self.end_ms,
            app=self.key.app, model=self.key.model, prompt_version=self.key.prompt_version,
            events=self.events, errors=self.errors, late_events=self.late,
            latency_p50_ms=q(self.latency, 0.5) or 0.0,
            latency_p90_ms=q(self.latency, 0.9) or 0.0,
            latency_p95_ms=q(self.latency, 0.95) or 0.0,
            latency_p99_ms=q(self.latency, 0.99) or 0.0,
            ttft_p50_ms=q(self.ttft, 0.5), ttft_p95_ms=q(self.ttft, 0.95), ttft_p99_ms=q(self.ttft, 0.99),
            tpot_p50_ms=q(self.tpot, 0.5), tpot_p95_ms=q(self.tpot, 0.95),
            input_tokens=self.sums["input_tokens"], output_tokens=self.sums["output_tokens"],
            cache_read_input_tokens=self.sums["cache_read_input_tokens"],
            cache_creation_input_tokens=self.sums["cache_creation_input_tokens"],
            reasoning_output_tokens=self.sums["reasoning_output_tokens"],
            cost_usd=self.cost_usd, unpriced_events=self.unpriced,
            guardrail_checked_events=self.guardrail_checked, guardrail_hits=self.guardrail_hits,
            guardrail_blocked=self.guardrail_blocked, feedback_events=self.feedback_events,
            negative_feedback=self.negative_feedback, sketch_relative_accuracy=accuracy, final=final,
        )


class WindowAggregator:
    """Tumbling event-time windows with allowed lateness. State in, stats out.

    >>> import numpy as np
    >>> agg = WindowAggregator(WindowConfig(size_ms=1000, allowed_lateness_ms=0))
    >>> k = WindowKey("app", "m")
    >>> cols = EventBatchColumns([k, k, k], np.array([10, 20, 1500]), np.array([1., 2., 3.]),
    ...     *([np.full(3, np.nan)] * 2), np.zeros(3, bool), *([np.zeros(3, np.int64)] * 5),
    ...     np.full(3, 0.5), *([np.zeros(3, bool)] * 3), np.full(3, np.nan))
    >>> agg.add(cols)
    0
    >>> [(s.window_start_ms, s.events, s.final) for s in agg.advance()]
    [(0, 2, True)]
    """

    def __init__(self, config: WindowConfig | None = None) -> None:
        self.config = config or WindowConfig()
        #: open windows per key; dict order is the eviction order (least recently touched first)
        self._open: dict[WindowKey, dict[int, _Window]] = {}
        #: per source: [largest event time (bounded), wall time of its last event or None]
        self._sources: dict[Hashable, list[int | None]] = {}
        self.watermark_ms: int | None = None
        self.late_total = 0
        #: late events of the last :meth:`add`, per key
        self.last_late: dict[WindowKey, int] = {}
        #: events whose time was beyond wall clock + ``watermark_max_ahead_ms``
        self.ahead_events = 0
        self.evicted_keys = 0
        self.evicted_windows = 0
        self._evicted_out: list[WindowStats] = []
        self._evicted_reported = 0

    # -- state changes ---------------------------------------------------
    def add(self, cols: EventBatchColumns, wall_ms: int | None = None) -> int:
        """Add a batch. Returns how many events were late (their window had already closed).

        ``wall_ms`` (epoch ms) is the caller's wall clock: it marks the batch's sources
        as active and bounds how far their watermark moves.
        """
        n = len(cols)
        self.last_late = {}
        if n == 0:
            return 0
        size = self.config.size_ms
        starts = cols.ts_ms - cols.ts_ms % size
        codes, key_list = cols.key_index()
        # The watermark of *previous* batches decides lateness: a batch is applied as one step.
        closed_before = self.watermark_ms
        late_by_key: dict[WindowKey, int] = {}
        if closed_before is not None:
            is_late = starts + size + self.config.allowed_lateness_ms <= closed_before
            if is_late.any():
                for code, idx in group_indices(codes[is_late]):
                    late_by_key[key_list[code]] = int(idx.size)
        else:
            is_late = np.zeros(n, bool)
        on_time = np.flatnonzero(~is_late)
        # one group per (key, window): code * span + window number within the batch
        wnum = starts[on_time] // size
        base = int(wnum.min()) if wnum.size else 0
        span = int(wnum.max()) - base + 1 if wnum.size else 1
        opened = self._open
        for gcode, sub in group_indices(codes[on_time] * span + (wnum - base)):
            k = key_list[gcode // span]
            st = (base + gcode % span) * size
            per = opened.pop(k, None)  # re-inserted last: most recently touched
            if per is None:
                per = {}
            opened[k] = per
            w = per.get(st)
            if w is None:
                w = per[st] = self._new_window(k, st)
            self._apply(w, cols, on_time[sub])
        late = 0
        for k, c in late_by_key.items():
            late += c
            per = opened.get(k)
            if per:
                target = per[min(per)]
                target.late += c
                target.dirty = True
                target.peeked = False
        self.late_total += late
        self.last_late = late_by_key
        self._evict()
        self._observe_sources(cols, wall_ms)
        self._recompute(wall_ms)
        return late

    def advance(self, watermark_ms: int | None = None, wall_ms: int | None = None) -> list[WindowStats]:
        """Close every window whose end + allowed lateness is at or before the watermark.

        ``watermark_ms`` raises the watermark to at least that (the caller's idle close);
        ``wall_ms`` lets idle sources stop holding it back. Returns the final stats of the
        closed windows (each exactly once), with the windows evicted since the last call.
        """
        if wall_ms is not None:
            self._recompute(wall_ms)
        if watermark_ms is not None and (self.watermark_ms is None or watermark_ms > self.watermark_ms):
            self.watermark_ms = watermark_ms
        out, self._evicted_out = self._evicted_out, []
        bound = self.watermark_ms
        if bound is None:
            return out
        edge = bound - self.config.allowed_lateness_ms
        acc = self.config.relative_accuracy
        for k in list(self._open):
            per = self._open[k]
            for st in [st for st, w in per.items() if w.end_ms <= edge]:
                out.append(per.pop(st).stats(True, acc))
            if not per:
                del self._open[k]
        out.sort(key=lambda s: (s.window_start_ms, s.app, s.model, s.prompt_version))
        return out

    def partial(self) -> list[WindowStats]:
        """Stats of the open windows changed since the last call (final=False)."""
        out = []
        for w in self._windows():
            if w.dirty:
                w.dirty = False
                out.append(w.stats(False, self.config.relative_accuracy))
        return out

    def peek(self) -> list[WindowStats]:
        """Stats of the open windows changed since the last ``peek`` (final=False).

        Independent of :meth:`partial`: a reader such as the alerting stage can look
        at the live windows without taking the partial rows the worker writes."""
        out = []
        for w in self._windows():
            if not w.peeked:
                w.peeked = True
                out.append(w.stats(False, self.config.relative_accuracy))
        return out

    def flush_all(self) -> list[WindowStats]:
        """Close every open window (on shutdown of a finite replay)."""
        out, self._evicted_out = self._evicted_out, []
        out += [w.stats(True, self.config.relative_accuracy) for w in self._windows()]
        self._open.clear()
        return out

    @property
    def open_windows(self) -> int:
        return sum(len(per) for per in self._open.values())

    @property
    def open_keys(self) -> int:
        """Keys holding at least one open window (at most ``config.max_keys``)."""
        return len(self._open)

    def source_watermarks(self) -> dict[Hashable, int]:
        """The (bounded) largest event time per source."""
        return {s: int(v[0]) for s, v in self._sources.items() if v[0] is not None}

    # -- watermark ---------------------------------------------------------
    def _observe_sources(self, cols: EventBatchColumns, wall_ms: int | None) -> None:
        ts = cols.ts_ms
        if cols.source_codes is None or cols.source_list is None:
            groups: list[tuple[Hashable, np.ndarray]] = [(None, ts)]
        else:
            src = cols.source_list
            groups = [(src[c], ts[idx]) for c, idx in group_indices(np.asarray(cols.source_codes, np.int64))]
        ahead = self.config.watermark_max_ahead_ms
        cap = wall_ms + ahead if wall_ms is not None and ahead is not None else None
        for src_key, t in groups:
            mx = int(t.max())
            if cap is not None and mx > cap:
                self.ahead_events += int((t > cap).sum())
                mx = cap
            cur = self._sources.get(src_key)
            if cur is None:
                self._sources[src_key] = [mx, wall_ms]
            else:
                if cur[0] is None or mx > cur[0]:
                    cur[0] = mx
                if wall_ms is not None:
                    cur[1] = wall_ms

    def _recompute(self, wall_ms: int | None) -> None:
        idle_ms = self.config.idle_partition_ms
        holding: list[int] = []
        for mx, seen in self._sources.values():
            if mx is None:
                continue
            if wall_ms is None or seen is None or wall_ms - seen <= idle_ms:
                holding.append(mx)
        # every source idle: nothing moves the watermark (a quiet stream is the caller's
        # idle close; an outage must not let it jump past a partition's backlog)
        wm = min(holding) if holding else None
        ahead = self.config.watermark_max_ahead_ms
        if wm is not None and wall_ms is not None and ahead is not None:
            wm = min(wm, wall_ms + ahead)
        if wm is not None and (self.watermark_ms is None or wm > self.watermark_ms):
            self.watermark_ms = wm

    # -- bounded state -----------------------------------------------------
    def _evict(self) -> None:
        extra = len(self._open) - self.config.max_keys
        if extra <= 0:
            return
        acc = self.config.relative_accuracy
        for k in list(self._open)[:extra]:
            per = self._open.pop(k)
            self.evicted_keys += 1
            self.evicted_windows += len(per)
            self._evicted_out.extend(w.stats(True, acc) for w in per.values())

    def pop_evicted(self) -> int:
        """Keys evicted since the last call (for a counter)."""
        n, self._evicted_reported = self.evicted_keys - self._evicted_reported, self.evicted_keys
        return n

    def _windows(self) -> list[_Window]:
        return [w for per in self._open.values() for w in per.values()]

    # -- internals ---------------------------------------------------------
    def _new_window(self, k: WindowKey, start: int) -> _Window:
        a = self.config.relative_accuracy
        return _Window(k, start, start + self.config.size_ms,
                       QuantileSketch(a), QuantileSketch(a), QuantileSketch(a))

    @staticmethod
    def _apply(w: _Window, c: EventBatchColumns, idx: np.ndarray) -> None:
        w.events += int(idx.size)
        w.errors += int(c.is_error[idx].sum())
        w.latency.add_many(c.latency_ms[idx])
        for sk, arr in ((w.ttft, c.ttft_ms), (w.tpot, c.tpot_ms)):
            v = arr[idx]
            v = v[~np.isnan(v)]
            if v.size:
                sk.add_many(v)
        for f in _SUM_FIELDS:
            w.sums[f] += int(getattr(c, f)[idx].sum())
        cost = c.cost_usd[idx]
        priced = ~np.isnan(cost)
        w.cost_usd += float(cost[priced].sum())
        w.unpriced += int(idx.size - priced.sum())
        w.guardrail_checked += int(c.guardrail_checked[idx].sum())
        w.guardrail_hits += int(c.guardrail_hit[idx].sum())
        w.guardrail_blocked += int(c.guardrail_blocked[idx].sum())
        fb = c.feedback[idx]
        w.feedback_events += int((~np.isnan(fb)).sum())
        w.negative_feedback += int((fb == -1).sum())
        w.dirty = True
        w.peeked = False


class WindowClock:
    """The windows of a stream on the wall clock: when a quiet stream's windows close,
    and when the open ones are emitted as partial rows.

    Holds the :class:`WindowAggregator` (``windows``; replaced on a rebalance). The
    clock is passed in, never read: ``now`` on a monotonic clock (seconds), ``wall_ms``
    epoch milliseconds. With no records for ``idle_close_s`` (and the source not cut
    off), event time follows wall time so the last windows close; every
    ``emit_interval_s`` the open windows changed since are added as partial rows.
    """

    def __init__(self, config: WindowConfig, *, idle_close_s: float, emit_interval_s: float,
                 now: float) -> None:
        if not emit_interval_s > 0:
            raise ValueError("emit_interval_s must be > 0")
        self.config = config
        self.idle_close_s = idle_close_s
        self.emit_interval_s = emit_interval_s
        self.windows = WindowAggregator(config)
        #: when event time last moved, or the stream was last known not to be idle
        self.wall_at_watermark = now
        self.last_emit = 0.0

    def reset(self) -> list[WindowStats]:
        """A fresh aggregator (partitions revoked); returns the partial rows of the old one."""
        partial = self.windows.partial()
        self.windows = WindowAggregator(self.config)
        return partial

    def add(self, cols: EventBatchColumns, *, wall_ms: int, now: float) -> None:
        """Add a batch's events; event time moved."""
        self.windows.add(cols, wall_ms=wall_ms)
        self.wall_at_watermark = now

    def not_idle(self, now: float) -> None:
        """The stream was held up (by the writer, or cut off): that is not idleness."""
        self.wall_at_watermark = now

    def request_flush(self) -> None:
        """Emit the open windows as partial rows at the next :meth:`advance`."""
        self.last_emit = 0.0

    def advance(self, *, now: float, wall_ms: int, records: bool,
                cut_off: Callable[[], bool]) -> list[WindowStats]:
        """The window rows after one fetch: closed windows, those closed by the idle
        rule, and (every ``emit_interval_s``) the partial rows of the open ones.

        ``records``: whether the fetch returned records (idleness of one partition is
        judged only while records flow: an empty fetch says nothing about one
        partition's backlog). ``cut_off()`` (asked only after an empty fetch): the
        source is paused or not answering, which is not idle traffic, and event time
        must not follow wall time through it (the records held back would all be late).
        """
        windows = self.windows.advance(wall_ms=wall_ms if records else None)
        wm = self.windows.watermark_ms
        if not records and cut_off():
            self.wall_at_watermark = now
        if not records and wm is not None and now - self.wall_at_watermark > self.idle_close_s:
            # no traffic: let event time follow wall time so the last windows close
            windows += self.windows.advance(wm + int((now - self.wall_at_watermark) * 1000))
            self.wall_at_watermark = now
        if now - self.last_emit >= self.emit_interval_s:
            self.last_emit = now
            closed = {(w.key, w.window_start_ms) for w in windows}
            windows += [w for w in self.windows.partial() if (w.key, w.window_start_ms) not in closed]
        return windows
