"""Tumbling event-time windows per (app, model, prompt_version).

Windows are half-open ``[start, start + size)`` and are a pure function of the
event timestamp (``start = ts - ts % size``). The watermark is the largest event
time seen; a window closes when ``watermark >= end + allowed_lateness``. An event
whose window is still open updates it even when it arrives late; an event whose
window has already closed is *late*: it is still stored as a raw row, but it no
longer changes the closed window, and it is counted (``late_events`` of the
earliest open window of its key, and the worker's Prometheus counter).

Wall time never enters here: early (partial) rows are taken by the caller with
:meth:`WindowAggregator.partial`, closed ones with :meth:`WindowAggregator.advance`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from driftline.detectors.sketch import QuantileSketch
from driftline.schemas.metrics import WindowKey, WindowStats

__all__ = ["WindowConfig", "WindowAggregator", "EventBatchColumns"]


@dataclass(frozen=True, slots=True)
class WindowConfig:
    size_ms: int = 60_000
    allowed_lateness_ms: int = 30_000
    relative_accuracy: float = 0.01

    def __post_init__(self) -> None:
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

    def __len__(self) -> int:
        return len(self.keys)

    def key_index(self) -> tuple[np.ndarray, list[WindowKey]]:
        """(code per event, distinct keys): ``keys[i] == key_list[codes[i]]``."""
        if self.key_codes is None or self.key_list is None:
            seen: dict[WindowKey, int] = {}
            setdefault = seen.setdefault
            self.key_codes = np.fromiter((setdefault(k, len(seen)) for k in self.keys), np.int64,
                                         len(self.keys))
            self.key_list = list(seen)
        return self.key_codes, self.key_list


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
        self._open: dict[tuple[WindowKey, int], _Window] = {}
        self.watermark_ms: int | None = None
        self.late_total = 0

    # -- state changes ---------------------------------------------------
    def add(self, cols: EventBatchColumns) -> int:
        """Add a batch. Returns how many events were late (their window had already closed)."""
        n = len(cols)
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
        for gcode, sub in group_indices(codes[on_time] * span + (wnum - base)):
            k = key_list[gcode // span]
            st = (base + gcode % span) * size
            w = self._open.get((k, st))
            if w is None:
                w = self._new_window(k, st)
                self._open[(k, st)] = w
            self._apply(w, cols, on_time[sub])
        late = 0
        for k, c in late_by_key.items():
            late += c
            target = min((w for (kk, _), w in self._open.items() if kk == k),
                         key=lambda w: w.start_ms, default=None)
            if target is not None:
                target.late += c
                target.dirty = True
                target.peeked = False
        self.late_total += late
        mx = int(cols.ts_ms.max())
        if self.watermark_ms is None or mx > self.watermark_ms:
            self.watermark_ms = mx
        return late

    def advance(self, watermark_ms: int | None = None) -> list[WindowStats]:
        """Close every window whose end + allowed lateness is at or before the watermark.

        Returns the final stats of the closed windows (each exactly once).
        """
        if watermark_ms is not None and (self.watermark_ms is None or watermark_ms > self.watermark_ms):
            self.watermark_ms = watermark_ms
        bound = self.watermark_ms
        if bound is None:
            return []
        out: list[WindowStats] = []
        for wk in [wk for wk, w in self._open.items() if w.end_ms + self.config.allowed_lateness_ms <= bound]:
            w = self._open.pop(wk)
            out.append(w.stats(True, self.config.relative_accuracy))
        out.sort(key=lambda s: (s.window_start_ms, s.app, s.model, s.prompt_version))
        return out

    def partial(self) -> list[WindowStats]:
        """Stats of the open windows changed since the last call (final=False)."""
        out = []
        for w in self._open.values():
            if w.dirty:
                w.dirty = False
                out.append(w.stats(False, self.config.relative_accuracy))
        return out

    def peek(self) -> list[WindowStats]:
        """Stats of the open windows changed since the last ``peek`` (final=False).

        Independent of :meth:`partial`: a reader such as the alerting stage can look
        at the live windows without taking the partial rows the worker writes."""
        out = []
        for w in self._open.values():
            if not w.peeked:
                w.peeked = True
                out.append(w.stats(False, self.config.relative_accuracy))
        return out

    def flush_all(self) -> list[WindowStats]:
        """Close every open window (on shutdown of a finite replay)."""
        out = [w.stats(True, self.config.relative_accuracy) for w in self._open.values()]
        self._open.clear()
        return out

    @property
    def open_windows(self) -> int:
        return len(self._open)

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
