"""Numeric drift in the stream: lengths, latency, cost and the finish-reason mix per key.

A provider's silent model update shows first in the numbers: responses get longer, TTFT
doubles, finish reasons move from ``stop`` to ``length``. A :class:`NumericDriftStage`
is a worker :class:`~driftline.streams.worker.Stage` that, per key
``(app, model, prompt_version)`` and per field of :data:`NUMERIC_FIELDS` (output, input
and reasoning tokens, latency, TTFT, TPOT, cost per call) and :data:`CATEGORICAL_FIELDS`
(the finish reason: the first of an event's ``finish_reasons``, ``""`` when none):

1. **takes** the stored batches (``on_stored``, on the event loop: it only queues the
   batch's columns, with the same deterministic ``event_id`` mask as the semantic
   stage when ``sample_rate < 1``);
2. on its own thread, numbers each key-field's values (``seq``, events without the value
   skipped) in Kafka order, builds the **reference** from the first ``ref_size`` values
   after first sight (the semantic references' lifecycle: a new ``prompt_version`` is a
   new key), keeps the last ``window_size`` values after it as the **current window** and,
   at fixed positions (``p >= min_current`` and ``(p - min_current) % test_every == 0``,
   ``p`` the values after the reference), tests the window against the reference:
   two-sample Kolmogorov-Smirnov for a numeric field (:func:`~driftline.detectors.ks_asymp.ks_sorted`:
   the asymptotic p-value, conservative, ~10x cheaper than scipy's exact one),
   the G-test of the 2 x k category table for the finish reason
   (:class:`~driftline.detectors.categorical.CategoryMixDrift`);
3. writes each result to ``drift_scores`` (``field`` = the field's column name, method
   ``ks`` or ``g_test``) with an explanation saying which quantiles moved and by how much
   (``"output_tokens p50 212 -> 298, p95 640 -> 1,020"``, ``"finish_reason=length 1% -> 9%"``),
   and hands it to every ``observe_drift`` linked in the wiring (alert rules of kind ``drift``).

**Calibration.** ``alpha`` is the family-wise level of one test round: each test runs at
``alpha / (K x F x 1)`` (Bonferroni; ``K`` keys with a reference, ``F`` fields, one method
per field), the semantic stage's split (:func:`per_test_alpha`), as its own family.

**Durability.** A key-field's state is one row of ``numeric_drift_state`` (a
ReplacingMergeTree, the latest row per key-field in force): the reference's *values* (not
their event ids: re-reading them from ``llm_events`` would depend on its TTL and on
``--redact``; 500 floats are 4 KB), the current window's values and times, ``seq`` and the
reference's version. It is written when a reference is made or a command applied, at the
first test and then once per ``window_size`` values, and for every changed key-field when
the stage stops or its partitions are revoked; a key-field seen for the first time since
start is loaded from it, so a restarted worker resumes the same reference, window and
test positions (a crash loses at most the values since the key-field's last row: fewer
than ``window_size``, as samples are at most once).

**Baseline commands.** ``driftline baseline rebase|pin|reset`` (the ``baseline`` commands
of ``driftline.control``) apply to the numeric fields too: ``field`` unset or one of
:data:`FIELDS` selects them. A rebase or pin re-reads the reference from ``llm_events``
(the latest ``ref_size`` values, or ``ref_size`` spread evenly over ``[from_ms, to_ms)``);
a reset collects a new one from the next value on. Each applied command is logged in
``drift_control_log`` under ``numeric:<id>`` (action ``numeric_<action>``), so a restarted
worker skips it and the semantic stage's log stays its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field as dc_field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

from driftline.detectors.base import RULE_P
from driftline.detectors.categorical import g_test, share_z
from driftline.detectors.ks_asymp import ks_sorted, ref_cdf, sorted_quantiles
from driftline.detectors.sampling import sample_mask
from driftline.schemas.columns import CONTROL_LOG_COLUMNS, NUMERIC_STATE_COLUMNS, SCORE_COLUMNS
from driftline.schemas.drift_result import DriftResult
from driftline.schemas.topics import CONTROL_TOPIC
from driftline.streams.stages.change_point import change_point_of
from driftline.streams.stages.drift_references import check_test_schedule, ms_to_dt, per_test_alpha
from driftline.streams.stages.inbox_loop import InboxLoop

if TYPE_CHECKING:
    from driftline.schemas.rules import DriftObservation
    from driftline.streams.ingest.control import ControlRecord
    from driftline.streams.ports import StagePorts

log = logging.getLogger("driftline.numeric_drift")

__all__ = ["NUMERIC_FIELDS", "CATEGORICAL_FIELDS", "FIELDS", "NumericDriftConfig", "NumericEngine",
           "NumericDriftStage", "KeyField", "Window", "describe_shift", "batch_columns"]

#: the numeric fields, by their ``llm_events`` column
NUMERIC_FIELDS = ("output_tokens", "input_tokens", "reasoning_output_tokens", "latency_ms", "ttft_ms",
                  "tpot_ms", "cost_usd")
#: the categorical fields: the finish reason (``finish_reasons[1]`` of ``llm_events``)
CATEGORICAL_FIELDS = ("finish_reason",)
FIELDS = NUMERIC_FIELDS + CATEGORICAL_FIELDS
#: the SQL of a field's value in ``llm_events`` (constants only; values are bound parameters)
_SQL_VALUE = {**{f: f"toFloat64({f})" for f in NUMERIC_FIELDS},
              "finish_reason": "if(empty(finish_reasons), '', toString(finish_reasons[1]))"}
_SQL_PRESENT = {**{f: f"{f} IS NOT NULL" for f in NUMERIC_FIELDS}, "finish_reason": "1"}
_COMMAND_FILTERS = ("app", "model", "prompt_version", "field")
#: batches' rows held for the thread at most (their key, time, position and value columns
#: only, ~100 B a row); past it the oldest batch is dropped (counted in inbox_dropped)
_MAX_INBOX_ROWS = 500_000

Key = tuple[str, str, str]
Query = Callable[[str, Mapping[str, Any]], Sequence[tuple[Any, ...]]]


def method_of(field: str) -> str:
    return "g_test" if field in CATEGORICAL_FIELDS else "ks"


@dataclass(frozen=True)
class NumericDriftConfig:
    """Settings of the numeric drift stage (the module docstring says what each does).

    ``fields``: a non-empty subset of :data:`FIELDS`. ``sample_rate``: share of events
    taken (by ``event_id``, as the semantic stage; 1.0: all, the values are cheap).
    ``ref_size``: values in an automatic reference. ``window_size``: the sliding current
    window; ``min_current`` (default ``window_size``) values after the reference before the
    first test; ``test_every``: values between tests. ``alpha``: family-wise level per round.
    ``max_keys``: key-fields held in memory (past it the least recently seen is dropped and
    reloaded from ``numeric_drift_state`` when seen again).
    """

    fields: tuple[str, ...] = FIELDS
    sample_rate: float = 1.0
    sample_salt: int = 0
    ref_size: int = 500
    window_size: int = 500
    min_current: int | None = None
    test_every: int = 100
    alpha: float = 0.05
    max_keys: int = 5_000
    control_topic: str | None = CONTROL_TOPIC
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.fields or set(self.fields) - set(FIELDS):
            raise ValueError(f"fields must be a non-empty subset of {FIELDS}, got {self.fields}")
        check_test_schedule(self)

    @property
    def min_cur(self) -> int:
        return self.min_current if self.min_current is not None else self.window_size


class Window:
    """The last ``maxlen`` values of a key-field and their times (epoch ms), oldest first,
    in two numpy buffers: a sliding window without a Python object per value.

    The buffers hold ``maxlen`` plus a quarter more; appending past their end moves the
    window's values to the front (a copy of ``maxlen`` values every ``maxlen / 4`` appended),
    so :attr:`values` and :attr:`ts` are contiguous views. Iterating gives ``(value, ts_ms)``
    pairs, as the deque it replaces did.

    >>> w = Window(3, np.float64)
    >>> w.extend(np.array([1.0, 2.0, 3.0, 4.0]), np.array([10, 20, 30, 40]))
    >>> w.values.tolist(), w.ts.tolist(), len(w)
    ([2.0, 3.0, 4.0], [20, 30, 40], 3)
    """

    __slots__ = ("maxlen", "_v", "_t", "_lo", "_hi")

    def __init__(self, maxlen: int, dtype: Any) -> None:
        if maxlen < 1:
            raise ValueError(f"maxlen must be >= 1, got {maxlen}")
        self.maxlen = maxlen
        cap = maxlen + max(maxlen // 4, 16)
        self._v: np.ndarray = np.empty(cap, dtype=dtype)
        self._t: np.ndarray = np.empty(cap, dtype=np.int64)
        self._lo = self._hi = 0

    def __len__(self) -> int:
        return self._hi - self._lo

    def __iter__(self) -> Any:
        return zip(self.values.tolist(), self.ts.tolist(), strict=True)

    @property
    def values(self) -> np.ndarray:
        """The window's values, oldest first (a view: copy it to keep it)."""
        return self._v[self._lo:self._hi]

    @property
    def ts(self) -> np.ndarray:
        """The window's times (epoch ms, int64), oldest first (a view)."""
        return self._t[self._lo:self._hi]

    def extend(self, values: np.ndarray, ts: np.ndarray) -> None:
        """Append values and their times (equal lengths); the oldest past ``maxlen`` go."""
        k, m = len(values), self.maxlen
        if k != len(ts):
            raise ValueError(f"{k} values but {len(ts)} times")
        if k >= m:
            self._v[:m] = values[k - m:]
            self._t[:m] = ts[k - m:]
            self._lo, self._hi = 0, m
            return
        if self._hi + k > len(self._v):  # move the part that stays to the front
            keep = min(self._hi - self._lo, m - k)
            self._v[:keep] = self._v[self._hi - keep:self._hi]
            self._t[:keep] = self._t[self._hi - keep:self._hi]
            self._lo, self._hi = 0, keep
        self._v[self._hi:self._hi + k] = values
        self._t[self._hi:self._hi + k] = ts
        self._hi += k
        if self._hi - self._lo > m:
            self._lo = self._hi - m


@dataclass(slots=True)
class KeyField:
    """One key and field: numbering, reference, current window and what the tests reuse."""

    key: Key
    field: str
    seq: int = 0
    version: int = 0
    mode: str = ""
    #: the reference's values in their order (a float64 array, or a list of labels for a
    #: categorical field); None: collecting
    ref: Any = None
    ref_seq: tuple[int, int] = (0, 0)
    ref_ms: tuple[int, int] = (0, 0)
    control_id: str = ""
    collect_from: int = 0
    #: values and times from seq - len(cur) to seq - 1: the current window, or the reference
    #: being collected while ``ref`` is None
    cur: Window = dc_field(default_factory=lambda: Window(1, np.float64))
    #: what the tests reuse of the reference while it holds (built at its first test):
    #: numeric ``(sorted values, their CDF, [p50, p95, p99], mean)``, categorical a Counter
    detector: Any = None
    dirty: bool = False


# --------------------------------------------------------------------------- explanations


def _num(v: float) -> str:
    """A value as explanations show it: ``1,020``, ``212``, ``0.35``, ``0.00123``."""
    if not math.isfinite(v):
        return str(v)
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _pct(s: float) -> str:
    return f"{100 * s:.0f}%" if s >= 0.1 or s == 0 else f"{100 * s:.1g}%"


def describe_shift(field: str, ref: Sequence[Any], cur: Sequence[Any]) -> dict[str, Any]:
    """Which quantiles (or category shares) moved and by how much: the explanation's
    ``quantiles`` (p50, p95, p99: [reference, current]) and ``mean``, or ``shares`` for a
    categorical field (the summary names the two that moved most by their two-proportion z),
    and its one-line ``summary``."""
    if field in CATEGORICAL_FIELDS:
        return _describe_counts(field, Counter(ref), Counter(cur), len(ref), len(cur))
    rs = np.sort(np.asarray(ref, dtype=np.float64))
    cs = np.sort(np.asarray(cur, dtype=np.float64))
    return _describe_sorted(field, rs, cs)


def _describe_counts(field: str, rc: Counter[Any], cc: Counter[Any], n_r: int, n_c: int) -> dict[str, Any]:
    """:func:`describe_shift` of a categorical field from the two samples' counts and sizes."""
    r_n, c_n = max(n_r, 1), max(n_c, 1)
    shares = {c: [rc[c] / r_n, cc[c] / c_n] for c in sorted(set(rc) | set(cc))}
    moved = sorted(shares, key=lambda c: (-abs(share_z(shares[c][0], shares[c][1], r_n, c_n)), c))[:2]
    parts = [f"{c or '(none)'} {_pct(shares[c][0])} -> {_pct(shares[c][1])}" for c in moved]
    return {"shares": {c: [round(a, 6), round(b, 6)] for c, (a, b) in shares.items()},
            "summary": f"{field}=" + ", ".join(parts)}


_QS = (0.5, 0.95, 0.99)


def _mean(s: np.ndarray) -> float:
    """The mean, also of values near the float maximum (valid in an event) whose sum overflows:
    then computed on the values scaled by their largest magnitude (an inf mean made the
    explanation invalid JSON and the batch's results were lost)."""
    with np.errstate(over="ignore"):
        m = float(s.mean())
    if math.isfinite(m) or not s.size:
        return m
    scale = float(np.abs(s).max())
    return scale * float((s / scale).mean())


def _mean_sorted(s: np.ndarray) -> float:
    """:func:`_mean` of a sorted array, to the bit (``np.mean`` is this sum over the size),
    without its overflow guard where no partial sum can overflow (the largest magnitude times
    the size below the float maximum)."""
    n = s.size
    if n and max(-float(s[0]), float(s[-1])) * n < 1e307:
        return float(np.add.reduce(s)) / n
    return _mean(s)


def _describe_sorted(field: str, rs: np.ndarray, cs: np.ndarray) -> dict[str, Any]:
    return _describe_stats(field, sorted_quantiles(rs, _QS), _mean_sorted(rs), cs)


def _describe_stats(field: str, r: list[float], rm: float, cs: np.ndarray) -> dict[str, Any]:
    """:func:`_describe_sorted` with the reference's quantiles ``r`` and mean ``rm`` given
    (computed once per reference) and the current window sorted (``cs``)."""
    c = sorted_quantiles(cs, _QS)
    quant = {f"p{round(q * 100)}": [a, b] for q, a, b in zip(_QS, r, c, strict=True)}
    cm = _mean_sorted(cs)
    summary = (f"{field} p50 {_num(r[0])} -> {_num(c[0])}, p95 {_num(r[1])} -> {_num(c[1])}, "
               f"mean {_num(rm)} -> {_num(cm)}")
    return {"quantiles": quant, "mean": [rm, cm], "summary": summary}


# --------------------------------------------------------------------------- the engine


def _key_params(key: Key, fld: str) -> dict[str, Any]:
    return {"app": key[0], "model": key[1], "pv": key[2], "field": fld}


_KEY_WHERE = ("app = {app:String} AND model = {model:String} AND prompt_version = {pv:String} "
              "AND field = {field:String}")


class NumericEngine:
    """Per key-field state, references and tests (pure but for ``query``, run on one
    thread). :meth:`process` and :meth:`apply` return the rows to write; it writes nothing."""

    def __init__(self, cfg: NumericDriftConfig, query: Query | None = None, database: str = "driftline") -> None:
        self.cfg = cfg
        self.query = query
        self.db = database
        #: per key-field; dict order is the eviction order (least recently seen first)
        self.state: dict[tuple[Key, str], KeyField] = {}
        self.tests_run = 0
        self.references_made = 0
        self.loaded = 0
        self.evicted = 0
        #: key-fields whose stored state could not be read or whose batch failed (logged; a new
        #: reference is collected for them, the other keys go on)
        self.key_errors = 0
        #: state rows of dirty key-fields evicted (written with the next process/apply rows)
        self.pending_rows: list[dict[str, Any]] = []
        #: keys with a reference on some field (the K of the calibration)
        self._ref_keys: dict[Key, int] = {}

    # -- state rows -------------------------------------------------------------------
    def state_row(self, kf: KeyField, now_ms: int) -> dict[str, Any]:
        """The ``numeric_drift_state`` row of ``kf`` (its whole state)."""
        cat = kf.field in CATEGORICAL_FIELDS
        ref = kf.ref if kf.ref is not None else []
        vals = kf.cur.values
        return {"app": kf.key[0], "model": kf.key[1], "prompt_version": kf.key[2], "field": kf.field,
                "version": kf.version, "mode": kf.mode, "seq": kf.seq, "collect_from": kf.collect_from,
                "ref_seq_from": kf.ref_seq[0], "ref_seq_to": kf.ref_seq[1],
                "ref_from_ms": kf.ref_ms[0], "ref_to_ms": kf.ref_ms[1], "has_ref": int(kf.ref is not None),
                "ref_values": [] if cat else np.asarray(ref, dtype=np.float64).tolist(),
                "ref_labels": [str(v) for v in ref] if cat else [],
                "cur_values": [] if cat else vals.tolist(),
                "cur_labels": [str(v) for v in vals.tolist()] if cat else [],
                "cur_ts": kf.cur.ts.tolist(), "control_id": kf.control_id,
                "row_version": (kf.version << 40) + kf.seq, "updated_at": ms_to_dt(now_ms)}

    def from_row(self, key: Key, fld: str, row: Mapping[str, Any]) -> KeyField:
        """The key-field a :meth:`state_row` describes."""
        cat = fld in CATEGORICAL_FIELDS
        kf = KeyField(key, fld, seq=int(row["seq"]), version=int(row["version"]), mode=str(row["mode"]),
                      collect_from=int(row["collect_from"]), control_id=str(row["control_id"]))
        vals = list(row["cur_labels"] if cat else row["cur_values"])
        ts = [int(t) for t in row["cur_ts"]]
        if len(vals) != len(ts):
            raise ValueError(f"the stored window has {len(vals)} values but {len(ts)} times")
        if row["has_ref"]:
            ref = list(row["ref_labels"] if cat else row["ref_values"])
            kf.ref = [str(v) for v in ref] if cat else np.asarray(ref, dtype=np.float64)
            kf.ref_seq = (int(row["ref_seq_from"]), int(row["ref_seq_to"]))
            kf.ref_ms = (int(row["ref_from_ms"]), int(row["ref_to_ms"]))
        kf.cur = self._window(kf)
        if vals:
            kf.cur.extend(np.asarray(vals, dtype=object if cat else np.float64), np.asarray(ts, dtype=np.int64))
        if kf.ref is not None:
            self._ref_keys[key] = self._ref_keys.get(key, 0) + 1
        return kf

    def _window(self, kf: KeyField) -> Window:
        """An empty window for ``kf``: the reference being collected, or the current window."""
        return Window(self._maxlen(kf), object if kf.field in CATEGORICAL_FIELDS else np.float64)

    def _maxlen(self, kf: KeyField) -> int:
        return self.cfg.window_size if kf.ref is not None else self.cfg.ref_size

    def _load(self, key: Key, fld: str) -> KeyField:
        if self.query is not None:
            cols = ", ".join(NUMERIC_STATE_COLUMNS)
            rows = self.query("SELECT " + cols + " FROM {db:Identifier}.numeric_drift_state FINAL WHERE "
                              + _KEY_WHERE + " LIMIT 1", {**_key_params(key, fld), "db": self.db})
            try:
                kf = self.from_row(key, fld, dict(zip(NUMERIC_STATE_COLUMNS, rows[0], strict=True))) \
                    if rows else None
            except Exception:  # noqa: BLE001 - an unreadable stored state: a new reference, said once
                self.key_errors += 1
                log.exception("numeric drift: the stored state of %s/%s/%s %s is unreadable; a new "
                              "reference is collected", *key, fld)
                kf = None
            if kf is not None:
                self.loaded += 1
                log.info("numeric drift: reloaded %s/%s/%s %s: reference v%d %s, %d values in the window",
                         *key, fld, kf.version, "held" if kf.ref is not None else "collecting", len(kf.cur))
                return kf
        return self._fresh(key, fld)

    def _fresh(self, key: Key, fld: str) -> KeyField:
        """A key-field seen for the first time: collecting its reference."""
        kf = KeyField(key, fld)
        kf.cur = self._window(kf)
        return kf

    def get(self, key: Key, fld: str) -> KeyField:
        """The key-field's state (loaded when not held), now the most recent."""
        kf = self.state.pop((key, fld), None)
        if kf is None:  # evicted in this round (its row not written yet), else stored, else new
            row = next((r for r in reversed(self.pending_rows) if (r["app"], r["model"], r["prompt_version"],
                                                                   r["field"]) == (*key, fld)), None)
            kf = self.from_row(key, fld, row) if row is not None else self._load(key, fld)
            kf.dirty = kf.dirty or row is not None
        self.state[(key, fld)] = kf
        extra = len(self.state) - self.cfg.max_keys
        if extra > 0:
            for k in list(self.state)[:extra]:
                old = self.state.pop(k)
                if old.dirty:  # its state is written before it goes: reloaded when seen again
                    self.pending_rows.append(self.state_row(old, int(time.time() * 1000)))
                self._forget(old)
            self.evicted += extra
        return kf

    def _forget(self, kf: KeyField) -> None:
        if kf.ref is not None:
            n = self._ref_keys.get(kf.key, 0) - 1
            if n > 0:
                self._ref_keys[kf.key] = n
            else:
                self._ref_keys.pop(kf.key, None)

    def clear(self) -> None:
        """Drop every key-field (a revocation: the next owner loads them)."""
        self.state.clear()
        self._ref_keys.clear()

    def dirty_rows(self, now_ms: int) -> list[dict[str, Any]]:
        """The state rows of the key-fields changed since their last row (then clean)."""
        out = []
        for kf in self.state.values():
            if kf.dirty:
                out.append(self.state_row(kf, now_ms))
                kf.dirty = False
        return out

    # -- the stream -------------------------------------------------------------------
    def add(self, kf: KeyField, values: np.ndarray, ts_ms: np.ndarray,
            out: list[tuple[KeyField, DriftResult]]) -> bool:
        """A key-field's next values, in order: numbered; collected into a reference, or put in
        the window and tested at each test position they reach. True when a reference was
        made or a test ran (the state row is then written)."""
        n = len(values)
        i = 0
        changed = False
        cfg = self.cfg
        while i < n:
            if kf.ref is None:
                if kf.seq < kf.collect_from:  # values before a reset's point (a reloaded state)
                    k = min(n - i, kf.collect_from - kf.seq)
                    kf.seq += k
                    i += k
                    continue
                k = min(n - i, cfg.ref_size - len(kf.cur))
                kf.cur.extend(values[i:i + k], ts_ms[i:i + k])
                kf.seq += k
                i += k
                if len(kf.cur) >= cfg.ref_size:
                    self._make_ref(kf, kf.cur.values.copy(), kf.cur.ts.copy(), "first_n", kf.seq - len(kf.cur),
                                   kf.seq, "")
                    changed = True
                continue
            # values after the reference: the next test is at position p (1-based) with
            # p >= min_cur and (p - min_cur) % test_every == 0
            pos = kf.seq - kf.ref_seq[1]  # values after the reference so far
            mc, te = cfg.min_cur, cfg.test_every
            nxt = mc if pos < mc else pos + (te - (pos - mc) % te if (pos - mc) % te else te)
            k = min(n - i, nxt - pos)
            kf.cur.extend(values[i:i + k], ts_ms[i:i + k])
            kf.seq += k
            i += k
            if kf.seq - kf.ref_seq[1] == nxt:
                res = self._test(kf)
                out.append((kf, res))
                if res.drifted and kf.field in NUMERIC_FIELDS:  # when did it start (change_point.py)
                    cp = change_point_of(kf.field, kf.detector[0], kf.cur.values, kf.cur.ts, res,
                                         cfg.window_size)
                    if cp is not None:
                        out.append((kf, cp))
                # the state row: once per window_size values (each ~8 KB; the stop and a
                # revocation write every changed one)
                changed = changed or (nxt - mc) % cfg.window_size == 0
        if n:
            kf.dirty = True
        return changed

    def process(self, keys: Sequence[Key] | None, ts_ms: Sequence[int] | np.ndarray,
                values: Mapping[str, Sequence[Any] | np.ndarray],
                groups: Sequence[tuple[Key, np.ndarray]] | None = None) -> tuple[
                    list[dict[str, Any]], list[tuple[KeyField, DriftResult]]]:
        """One batch in Kafka order: ``keys[i]`` and ``ts_ms[i]`` of event ``i``, ``values[field][i]``
        its value (NaN or None: none). ``groups`` instead of ``keys``: each key with the
        (increasing) positions of its events, keys in the order of their first event (as
        :func:`batch_columns` gives them). Returns (state rows to write, [(key-field, result)])."""
        results: list[tuple[KeyField, DriftResult]] = []
        touched: list[KeyField] = []
        if groups is None:
            groups = _group(keys or ())
        ts = np.asarray(ts_ms, dtype=np.int64)
        for fld in self.cfg.fields:
            col = values.get(fld)
            if col is None:
                continue
            cat = fld in CATEGORICAL_FIELDS
            arr = np.asarray(col, dtype=object if cat else np.float64)
            for key, sel in groups:
                v = arr[sel]
                ok = (v != None) if cat else np.isfinite(v)  # noqa: E711 - element-wise
                if not ok.all():
                    sel, v = sel[ok], v[ok]
                if not len(v):
                    continue
                try:  # one key-field's failure (a corrupt stored state) costs only its values
                    kf = self.get(key, fld)
                    if self.add(kf, v, ts[sel], results):
                        touched.append(kf)
                except Exception:  # noqa: BLE001 - logged and counted; the other keys go on
                    self.key_errors += 1
                    log.exception("numeric drift: %s/%s/%s field %s failed; its values of this batch "
                                  "are skipped and a new reference is collected", *key, fld)
                    fresh = self._fresh(key, fld)
                    old_kf = self.state.pop((key, fld), None)
                    if old_kf is not None:
                        self._forget(old_kf)
                    self.state[(key, fld)] = fresh
        now_ms = int(time.time() * 1000)
        seen: set[int] = set()
        rows, self.pending_rows = self.pending_rows, []
        for kf in touched:
            if id(kf) not in seen:
                seen.add(id(kf))
                rows.append(self.state_row(kf, now_ms))
                kf.dirty = False
        return rows, results


    def _make_ref(self, kf: KeyField, values: np.ndarray, ts: np.ndarray, mode: str, seq_from: int, seq_to: int,
                  control_id: str) -> None:
        if kf.ref is None:
            self._ref_keys[kf.key] = self._ref_keys.get(kf.key, 0) + 1
        kf.version += 1
        kf.mode = mode
        kf.ref = [str(v) for v in values.tolist()] if kf.field in CATEGORICAL_FIELDS \
            else np.asarray(values, dtype=np.float64)
        kf.ref_seq = (seq_from, seq_to)
        kf.ref_ms = (int(ts.min()), int(ts.max())) if len(ts) else (0, 0)
        kf.control_id = control_id
        kf.cur = self._window(kf)  # the current window (kf.ref is set)
        kf.detector = None
        kf.dirty = True
        self.references_made += 1
        log.info("numeric drift: reference v%d (%s) of %s/%s/%s %s: %d values", kf.version, mode, *kf.key,
                 kf.field, len(kf.ref))

    def _test(self, kf: KeyField) -> DriftResult:
        """The window against the reference: KS (numeric) or the G-test (finish reason), decided
        at ``alpha / (keys x fields x 1)``, with the quantiles or shares that moved. What
        depends on the reference alone (sorted values, quantiles, mean; category counts) is
        computed at its first test and kept until it changes."""
        assert kf.ref is not None
        cfg = self.cfg
        n_keys = len(self._ref_keys)
        a_test = per_test_alpha(cfg.alpha, n_keys, len(cfg.fields), 1)
        cur, ts = kf.cur.values, kf.cur.ts  # the window (views)
        n_cur = len(cur)
        n_ref = len(kf.ref)
        expl: dict[str, Any]
        if kf.field in CATEGORICAL_FIELDS:
            if kf.detector is None:
                if n_ref < 2:
                    raise ValueError(f"reference needs at least 2 values, got {n_ref}")
                kf.detector = Counter(kf.ref)
            rc = kf.detector
            if n_cur < 2:
                raise ValueError(f"current needs at least 2 values, got {n_cur}")
            cc = Counter(cur.tolist())
            cats = sorted(set(rc) | set(cc))
            g, p, dof = g_test(np.array([[rc[c] for c in cats], [cc[c] for c in cats]], dtype=np.float64))
            stat, p, method = max(g, 0.0), min(max(p, 0.0), 1.0), "g_test"
            shares = {c: [round(rc[c] / n_ref, 6), round(cc[c] / n_cur, 6)] for c in cats}
            moved = sorted(cats, key=lambda c: (-abs(share_z(shares[c][0], shares[c][1], n_ref, n_cur)), c))
            expl = {"rule": RULE_P, "dof": dof, "shares": shares, "moved": moved[:3]}
            expl.update(_describe_counts(kf.field, rc, cc, n_ref, n_cur))
        else:
            if kf.detector is None:  # the sorted reference, its CDF, quantiles and mean
                rs = np.sort(np.asarray(kf.ref, dtype=np.float64))
                kf.detector = (rs, ref_cdf(rs), sorted_quantiles(rs, _QS), _mean_sorted(rs))
            rs, r_cdf, r_q, r_mean = kf.detector
            cs = np.sort(cur)
            ks = ks_sorted(rs, cs, cur_sorted=True, ref_cdf=r_cdf)
            stat, p, method = ks.statistic, ks.p_value, "ks"
            expl = {"location": ks.location, "sign": ks.sign, "p_value_method": "asymptotic (Kolmogorov)",
                    **_describe_stats(kf.field, r_q, r_mean, cs)}
        expl.update({
            "rule": "drifted = p_value < threshold (threshold = alpha / (keys x fields x methods))",
            "alpha_family": cfg.alpha, "alpha_test": a_test, "correction": "bonferroni",
            "family": {"keys": n_keys, "fields": len(cfg.fields), "methods": 1},
            "reference": {"version": kf.version, "mode": kf.mode, "n": n_ref, "seq_from": kf.ref_seq[0],
                          "seq_to": kf.ref_seq[1], "from_ms": kf.ref_ms[0], "to_ms": kf.ref_ms[1]},
            "window": {"seq_from": kf.seq - n_cur, "seq_to": kf.seq, "from_ms": int(ts.min()),
                       "to_ms": int(ts.max())},
        })
        self.tests_run += 1
        return DriftResult(method=method, statistic=float(stat), p_value=float(p), threshold=a_test,
                           drifted=bool(p < a_test), n_ref=n_ref, n_cur=n_cur, explanation=expl)

    # -- baseline commands --------------------------------------------------------------
    def matching(self, cmd: Mapping[str, Any]) -> list[tuple[Key, str]]:
        """The key-fields a command's filters select: held ones and those in ``numeric_drift_state``."""
        given = {c: str(cmd[c]) for c in _COMMAND_FILTERS if cmd.get(c) is not None}
        keys: set[tuple[Key, str]] = {k for k in self.state if all(
            given.get(c, v) == v for c, v in zip(_COMMAND_FILTERS, (*k[0], k[1]), strict=True))}
        if self.query is not None:
            where = " AND ".join(f"{c} = {{{c}:String}}" for c in given) or "1"
            rows = self.query("SELECT DISTINCT app, model, prompt_version, field FROM "
                              "{db:Identifier}.numeric_drift_state WHERE " + where, {**given, "db": self.db})
            keys |= {((a, m, p), f) for a, m, p, f in rows}
        return sorted(k for k in keys if k[1] in self.cfg.fields)

    def _command_values(self, kf: KeyField, f_ms: Any, t_ms: Any) -> tuple[np.ndarray, np.ndarray]:
        """The values (and times) a rebase or pin makes its reference of, from ``llm_events``:
        the latest ``ref_size``, or ``ref_size`` evenly spread over ``[f_ms, t_ms)`` (in Kafka order)."""
        if self.query is None:
            if kf.ref is not None or f_ms is None:
                return kf.cur.values[-self.cfg.ref_size:].copy(), kf.cur.ts[-self.cfg.ref_size:].copy()
            return np.empty(0), np.empty(0, dtype=np.int64)
        fld = kf.field
        sql = ("SELECT " + _SQL_VALUE[fld] + ", toUnixTimestamp64Milli(timestamp) FROM {db:Identifier}.llm_events "
               "FINAL WHERE app = {app:String} AND model = {model:String} AND prompt_version = {pv:String} AND "
               + _SQL_PRESENT[fld])
        params: dict[str, Any] = {**_key_params(kf.key, fld), "db": self.db}
        if f_ms is None and t_ms is None:
            rows = self.query(sql + " ORDER BY timestamp DESC, source_partition DESC, source_offset DESC "
                              "LIMIT {n:UInt64}", {**params, "n": self.cfg.ref_size})
            rows = list(reversed(rows))
        else:
            rows = self.query(sql + " AND timestamp >= fromUnixTimestamp64Milli({f:Int64}) AND timestamp < "
                              "fromUnixTimestamp64Milli({t:Int64}) ORDER BY timestamp, source_partition, "
                              "source_offset", {**params, "f": int(f_ms or 0), "t": int(t_ms or 2**42)})
            if len(rows) > self.cfg.ref_size:
                pick = np.linspace(0, len(rows) - 1, self.cfg.ref_size).round().astype(int)
                rows = [rows[i] for i in pick]
        cat = fld in CATEGORICAL_FIELDS
        return (np.asarray([r[0] if cat else float(r[0]) for r in rows], dtype=object if cat else np.float64),
                np.asarray([int(r[1]) for r in rows], dtype=np.int64))

    def apply(self, cmd: Mapping[str, Any], control_id: str) -> list[dict[str, Any]]:
        """Apply a ``baseline`` rebase / pin / reset to every matching key-field; returns
        the state rows to write."""
        action = cmd.get("action")
        if action not in ("rebase", "pin", "reset"):
            return []
        now_ms = int(time.time() * 1000)
        out = []
        for key, fld in self.matching(cmd):
            kf = self.get(key, fld)
            if action == "reset":
                if kf.ref is not None:
                    self._forget(kf)
                kf.version += 1
                kf.mode, kf.ref, kf.detector, kf.control_id = "reset", None, None, control_id
                kf.collect_from = kf.seq
                kf.cur = self._window(kf)
            else:
                vals, ts = self._command_values(kf, cmd.get("from_ms"), cmd.get("to_ms"))
                if len(vals) < 10:
                    log.warning("numeric drift: %s of %s/%s/%s %s skipped: %d values in the range", action, *key,
                                fld, len(vals))
                    continue
                self._make_ref(kf, vals, ts, "pinned" if action == "pin" else "rebase", kf.seq, kf.seq,
                               control_id)
            out.append(self.state_row(kf, now_ms))
            kf.dirty = False
        out, self.pending_rows = self.pending_rows + out, []
        return out


# --------------------------------------------------------------------------- column access


def _take(events: Any, name: str, rows: np.ndarray) -> list[Any] | None:
    """Column ``name`` of a stored batch at ``rows`` as Python values (None: no such column)."""
    table = getattr(events, "table", None)
    if table is not None:
        if name not in table.column_names:
            return None
        out: list[Any] = table.column(name).take(rows).to_pylist()
        return out
    col = events.get(name)
    if col is None:
        return None
    return [col[i] for i in rows.tolist()]


def _floats(events: Any, name: str, rows: np.ndarray) -> np.ndarray | None:
    """A numeric column at ``rows`` as float64 (NaN where null)."""
    table = getattr(events, "table", None)
    if table is not None:
        if name not in table.column_names:
            return None
        import pyarrow as pa
        import pyarrow.compute as pc

        arr = pc.cast(table.column(name).take(rows), pa.float64()).to_numpy(zero_copy_only=False)
        return np.asarray(arr, dtype=np.float64)
    col = events.get(name)
    if col is None:
        return None
    arr = np.asarray(col, dtype=object)[rows] if len(rows) else np.empty(0, dtype=object)
    return np.asarray([math.nan if v is None else float(v) for v in arr], dtype=np.float64)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def _epoch_ms(t: Any) -> int:
    """An event time as epoch ms: an int as is; an aware datetime exactly (``t.timestamp() *
    1000`` was 1 ms low for ~0.5% of them, a float rounding); a naive one as local time."""
    if not hasattr(t, "timestamp"):
        return int(t)
    if t.tzinfo is None:
        return int(t.timestamp() * 1000)
    return int((t - _EPOCH) // _MS)


def _group(keys: Sequence[Key]) -> list[tuple[Key, np.ndarray]]:
    """Each key with the positions of its events, keys in the order of their first event."""
    by_key: dict[Key, list[int]] = {}
    for i, k in enumerate(keys):
        by_key.setdefault(k, []).append(i)
    return [(k, np.asarray(v, dtype=np.intp)) for k, v in by_key.items()]


def _arrow_codes(col: Any, none_is_empty: bool) -> tuple[np.ndarray, list[Any]]:
    """A string column's dictionary codes and dictionary (null: its own entry, or ``""``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if none_is_empty:
        col = pc.fill_null(col, "")
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    enc = pc.dictionary_encode(col, null_encoding="encode")
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), enc.dictionary.to_pylist()


def _arrow_groups(table: Any, rows: np.ndarray) -> list[tuple[Key, np.ndarray]]:
    """:func:`_group` of the ``(app, model, prompt_version or "")`` keys of ``rows``, in C."""
    ia, da = _arrow_codes(table.column("app").take(rows), False)
    im, dm = _arrow_codes(table.column("model").take(rows), False)
    ip, dp = _arrow_codes(table.column("prompt_version").take(rows), True)
    code = (ia * len(dm) + im) * len(dp) + ip
    uniq, first, inv = np.unique(code, return_index=True, return_inverse=True)
    inv = inv.reshape(-1)
    parts = np.split(np.argsort(inv, kind="stable"), np.cumsum(np.bincount(inv, minlength=len(uniq)))[:-1])
    out = []
    for g in np.argsort(first, kind="stable").tolist():
        u = int(uniq[g])
        out.append(((da[u // (len(dm) * len(dp))], dm[(u // len(dp)) % len(dm)], dp[u % len(dp)]), parts[g]))
    return out


def _arrow_ms(table: Any, rows: np.ndarray) -> np.ndarray:
    """The ``timestamp`` column at ``rows`` as epoch ms (int64), exactly."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = table.column("timestamp").take(rows)
    if pa.types.is_timestamp(col.type) and col.type.unit != "ms":
        col = pc.cast(col, pa.timestamp("ms", tz=col.type.tz), safe=False)
    return np.asarray(pc.cast(col, pa.int64()).to_numpy(), dtype=np.int64)


def _arrow_first_reason(table: Any, rows: np.ndarray) -> np.ndarray:
    """The first of each row's ``finish_reasons`` as a str (``""`` when none; a null one ``"None"``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = table.column("finish_reasons").take(rows)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    has = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False) > 0
    out = np.full(len(col), "", dtype=object)
    if has.any():
        first = pc.fill_null(pc.cast(pc.list_element(col.filter(pa.array(has)), 0), pa.string()), "None")
        enc = pc.dictionary_encode(first)  # one str object per distinct reason, shared by the windows
        out[has] = np.asarray(enc.dictionary.to_pylist(), dtype=object)[enc.indices.to_numpy(zero_copy_only=False)]
    return out


def batch_columns(events: Any, rows: np.ndarray, fields: Sequence[str]) -> tuple[
        list[tuple[Key, np.ndarray]], np.ndarray, dict[str, np.ndarray]]:
    """The key groups (:meth:`NumericEngine.process`'s ``groups``), times (epoch ms) and per-field
    values (float64 with NaN for a missing number; the finish reason as str) of a stored batch's
    ``rows``, in that order. Over Arrow no Python object is made per event but the finish
    reasons' strings."""
    table = getattr(events, "table", None)
    vals: dict[str, np.ndarray] = {}
    if table is not None and all(c in table.column_names for c in ("app", "model", "prompt_version",
                                                                   "timestamp")):
        groups, ts = _arrow_groups(table, rows), _arrow_ms(table, rows)
        for f in fields:
            if f in CATEGORICAL_FIELDS:
                if "finish_reasons" in table.column_names:
                    vals[f] = _arrow_first_reason(table, rows)
            else:
                col = _floats(events, f, rows)
                if col is not None:
                    vals[f] = col
        return groups, ts, vals
    apps, models, pvs = (_take(events, c, rows) or [] for c in ("app", "model", "prompt_version"))
    keys = [(a, m, p or "") for a, m, p in zip(apps, models, pvs, strict=True)]
    ts = np.asarray([_epoch_ms(t) for t in _take(events, "timestamp", rows) or []], dtype=np.int64)
    for f in fields:
        if f in CATEGORICAL_FIELDS:
            fr = _take(events, "finish_reasons", rows)
            if fr is not None:
                vals[f] = np.asarray([str(x[0]) if x else "" for x in fr], dtype=object)
        else:
            col = _floats(events, f, rows)
            if col is not None:
                vals[f] = col
    return _group(keys), ts, vals


#: the columns the stage reads besides its fields' (the key, the time, the Kafka position)
_BASE_COLUMNS = ("app", "model", "prompt_version", "timestamp", "source_topic", "source_partition",
                 "source_offset")


def _slim(events: Any, columns: Sequence[str]) -> Any:
    """Only ``columns`` of a stored batch, for the inbox: over Arrow a zero-copy selection, so
    the texts of the batch (most of its memory) are not held while it waits for the thread."""
    table = getattr(events, "table", None)
    if table is not None:
        from driftline.streams.ingest.transforms import ArrowColumns

        return ArrowColumns(table.select([c for c in columns if c in table.column_names]))
    return {c: events[c] for c in columns if c in events}


# --------------------------------------------------------------------------- the stage


class NumericDriftStage(InboxLoop):
    """The worker stage (``name = "numeric_drift"``); ``NumericDriftStage.factory(cfg)`` for the wiring."""

    name = "numeric_drift"
    tables = ("drift_scores", "numeric_drift_state", "drift_control_log")

    def __init__(self, cfg: NumericDriftConfig | None = None, registry: Any = None) -> None:
        self.cfg = cfg or NumericDriftConfig()
        self.engine: NumericEngine | None = None
        self._ports: StagePorts | None = None
        #: called with every test result (alert rules of kind ``drift``): linked by the wiring
        self.observers: list[Callable[[DriftObservation], None]] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="numeric-drift")
        self._inbox: list[tuple[Any, np.ndarray]] = []
        self._inbox_units = 0
        self._controls: list[tuple[dict[str, Any], str, ControlRecord]] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._applied_ids: set[str] = set()
        self._ids_loaded = False
        self._early: list[ControlRecord] = []
        self._gen = 0
        self.stored_scores = 0
        self.controls_applied = 0
        #: rows dropped because the inbox was full while the thread was busy
        self.inbox_dropped = 0
        #: CPU seconds spent in on_stored (the hot path), for the benchmark
        self.hot_cpu_s = 0.0
        self._columns = (*_BASE_COLUMNS, *(("finish_reasons",) if CATEGORICAL_FIELDS[0] in self.cfg.fields else ()),
                         *(f for f in self.cfg.fields if f in NUMERIC_FIELDS))

    @classmethod
    def factory(cls, cfg: NumericDriftConfig | None = None) -> Any:
        return lambda registry: cls(cfg, registry)

    def add_observer(self, fn: Callable[[DriftObservation], None]) -> None:
        self.observers.append(fn)

    async def start(self, ports: StagePorts) -> None:
        self._ports = ports
        tables = ports.tables
        self.engine = NumericEngine(self.cfg, tables.query, tables.database)
        if self.cfg.control_topic:
            try:
                done = await tables.aquery("SELECT DISTINCT control_id FROM {db:Identifier}.drift_control_log "
                                           "WHERE startsWith(control_id, 'numeric:')", {"db": tables.database})
                self._applied_ids = {str(r[0])[len("numeric:"):] for r in done}
            except Exception as exc:  # noqa: BLE001 - commands then wait until the next start
                log.warning("numeric drift: reading drift_control_log failed (%s); baseline commands ignored "
                            "until the next start", exc)
            else:
                self._ids_loaded = True
        self._task = asyncio.create_task(self._loop(), name="driftline-numeric-drift")
        log.info("numeric drift stage: fields %s, reference %d, window %d, every %d, alpha %.3g",
                 ",".join(self.cfg.fields), self.cfg.ref_size, self.cfg.window_size, self.cfg.test_every,
                 self.cfg.alpha)
        early, self._early = self._early, []
        for rec in early:
            self.on_command(rec)

    # -- input (event loop, cheap) -------------------------------------------------------
    def on_stored(self, batch: Any) -> None:
        """Queue the stored batch's rows (sampled by ``event_id`` below rate 1) for the thread."""
        t0 = time.thread_time()
        ev = batch.events
        if not ev or self.engine is None:
            return
        n = getattr(ev, "num_rows", None)
        if n is None:
            n = len(ev["event_id"])
        if self.cfg.sample_rate < 1.0:
            rows = np.flatnonzero(sample_mask(ev["event_id"], self.cfg.sample_rate, self.cfg.sample_salt))
        else:
            rows = np.arange(n)
        if len(rows):
            self._queue((_slim(ev, self._columns), rows), _MAX_INBOX_ROWS)
        self.hot_cpu_s += time.thread_time() - t0

    # -- the loop (streams/stages/inbox_loop.py) --------------------------------------------
    _log = log
    _loop_label = "numeric drift"

    def _units(self, item: tuple[Any, np.ndarray]) -> int:
        return len(item[1])

    async def _apply_next_control(self) -> None:
        await self._apply_control(*self._controls.pop(0))

    def _work(self, work: list[tuple[Any, np.ndarray]]) -> tuple[list[dict[str, Any]],
                                                                 list[tuple[KeyField, DriftResult]]]:
        from driftline.streams.stages.semantic_drift import kafka_order

        assert self.engine is not None
        rows_out: list[dict[str, Any]] = []
        results: list[tuple[KeyField, DriftResult]] = []
        for ev, rows in work:
            groups, ts, vals = batch_columns(ev, kafka_order(ev, rows), self.cfg.fields)
            r, res = self.engine.process(None, ts, vals, groups)
            rows_out.extend(r)
            results.extend(res)
        return rows_out, results

    async def _process_inbox(self) -> None:
        work = self._take_inbox()
        gen = self._gen
        rows, results = await asyncio.get_running_loop().run_in_executor(self._pool, self._work, work)
        if gen != self._gen:
            return
        await self._write(rows, results)

    async def _write(self, state_rows: list[dict[str, Any]], results: list[tuple[KeyField, DriftResult]]) -> None:
        assert self._ports is not None
        sink = self._ports.tables
        if results:
            out = []
            for kf, r in results:
                row = r.to_row()
                row.update(ts=ms_to_dt(r.explanation["window"]["to_ms"]), app=kf.key[0], model=kf.key[1],
                           prompt_version=kf.key[2], field=kf.field)
                out.append(row)
            await sink.insert_rows("drift_scores", out, SCORE_COLUMNS)
            self.stored_scores += len(out)
        if state_rows:
            await sink.insert_rows("numeric_drift_state", state_rows, NUMERIC_STATE_COLUMNS)
        if results:
            self._publish(results)

    def _publish(self, results: list[tuple[KeyField, DriftResult]]) -> None:
        from driftline.schemas.rules import DriftObservation

        assert self._ports is not None
        metrics = self._ports.metrics
        for kf, r in results:
            a, m, p = kf.key
            metrics.observe_drift(a, m, p, kf.field, r.method, r.statistic, r.p_value, r.drifted)
            if r.method == "change_point":  # explains a flagged KS result, which the rules already got
                continue
            obs = DriftObservation(ts_ms=int(r.explanation["window"]["to_ms"]), app=a, model=m, prompt_version=p,
                                   field=kf.field, method=r.method, statistic=float(r.statistic),
                                   p_value=r.p_value, drifted=r.drifted)
            for f in self.observers:
                try:
                    f(obs)
                except Exception:  # noqa: BLE001
                    log.exception("numeric drift: observe_drift of a stage failed")

    # -- commands ---------------------------------------------------------------------------
    def on_command(self, rec: ControlRecord) -> bool:
        """A ``baseline`` command (the control consumer calls this for every one, from the
        topic's start): one that passes the signature check and was not applied before is
        queued for the loop. Returns True when queued."""
        from driftline.streams.ingest.control_auth import admit

        cmd = rec.cmd
        if cmd.get("cmd") != "baseline" or cmd.get("action") not in ("rebase", "pin", "reset"):
            return False
        if cmd.get("field") is not None and cmd.get("field") not in self.cfg.fields:
            return False
        if not self._ids_loaded:
            if self._ports is None and len(self._early) < 10_000:
                self._early.append(rec)
            return False
        cid = str(cmd.get("id") or f"{rec.topic}:{rec.partition}:{rec.offset}:{rec.timestamp}")
        if cid in self._applied_ids:
            return False
        assert self._ports is not None
        auth = self._ports.control
        if not admit(cmd, auth.secret, self._ports.metrics.control_refused, max_age_s=auth.max_age_s,
                     where="numeric_drift"):
            return False
        self._applied_ids.add(cid)
        self._controls.append((dict(cmd), cid, rec))
        self._poke()
        return True

    async def _apply_control(self, cmd: dict[str, Any], cid: str, rec: ControlRecord) -> None:
        assert self.engine is not None and self._ports is not None
        rows = await asyncio.get_running_loop().run_in_executor(self._pool, self.engine.apply, cmd, cid)
        await self._write(rows, [])
        log_row = {"control_id": f"numeric:{cid}", "applied_at": ms_to_dt(int(self._ports.clock() * 1000)),
                   "action": f"numeric_{cmd.get('action')}", "command": json.dumps(cmd, sort_keys=True),
                   "n_references": len(rows), "topic": rec.topic, "partition": rec.partition,
                   "offset": rec.offset}
        await self._ports.tables.insert_rows("drift_control_log", [log_row], CONTROL_LOG_COLUMNS)
        self.controls_applied += 1

    # -- lifecycle ----------------------------------------------------------------------------
    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued batch is tested and written and every queued command applied."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def _flush_state(self) -> None:
        """Write the state of every key-field changed since its last row."""
        if self.engine is None or self._ports is None:
            return
        engine = self.engine
        rows = await asyncio.get_running_loop().run_in_executor(
            self._pool, lambda: engine.dirty_rows(int(time.time() * 1000)))
        await self._write(rows, [])

    async def on_revoked(self) -> None:
        """The partitions go: drain, write the changed state, drop the keys (the next owner loads them)."""
        if self.engine is None:
            return
        await self.drain(self.cfg.drain_timeout_s)
        await self._flush_state()
        self._gen += 1
        await asyncio.get_running_loop().run_in_executor(self._pool, self.engine.clear)

    async def stop(self) -> None:
        if self.engine is not None:
            if not await self.drain(self.cfg.drain_timeout_s):
                log.warning("numeric drift: stopped before every batch was tested")
            with contextlib.suppress(Exception):
                await self._flush_state()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._pool.shutdown(wait=True)
