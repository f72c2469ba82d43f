"""FROZEN REFERENCE: the numeric drift stage as it was before issue 20 (commit 9406375).

Kept only so that benchmarks/bench_numeric_drift.py can time the previous code beside the
current one in the same run, and tests/unit/test_numeric_equivalence.py can check that the
current stage writes exactly the rows this one writes. Do not use it in the worker and do
not "fix" it: it is the baseline. Self-contained apart from modules whose code issue 20 did
not change: the KS test (old ``ks_sorted``) and the G-test (old ``CategoryMixDrift``
scoring through ``scipy.stats.chi2_contingency``) are copied below.
"""
# ruff: noqa
# mypy: ignore-errors


from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import TYPE_CHECKING, Any

import numpy as np

from driftline.detectors.base import RULE_P
from driftline.detectors.categorical import share_z
from driftline.detectors.sampling import sample_mask
from driftline.schemas.columns import CONTROL_LOG_COLUMNS, NUMERIC_STATE_COLUMNS, SCORE_COLUMNS
from driftline.schemas.drift_result import DriftResult
from driftline.schemas.topics import CONTROL_TOPIC
from driftline.streams.stages.change_point import change_point_result
from driftline.streams.stages.drift_references import check_test_schedule, ms_to_dt, per_test_alpha

if TYPE_CHECKING:
    from driftline.schemas.rules import DriftObservation
    from driftline.streams.ingest.control import ControlRecord
    from driftline.streams.ports import StagePorts

log = logging.getLogger("driftline.numeric_drift")

__all__ = ["NUMERIC_FIELDS", "CATEGORICAL_FIELDS", "FIELDS", "NumericDriftConfig", "NumericEngine",
           "NumericDriftStage", "KeyField", "describe_shift"]

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


@dataclass(slots=True)
class KeyField:
    """One key and field: numbering, reference, current window, detector."""

    key: Key
    field: str
    seq: int = 0
    version: int = 0
    mode: str = ""
    #: the reference's values (floats, or labels for a categorical field); None: collecting
    ref: list[Any] | None = None
    ref_seq: tuple[int, int] = (0, 0)
    ref_ms: tuple[int, int] = (0, 0)
    control_id: str = ""
    collect_from: int = 0
    #: (value, ts_ms) from seq - len(cur) to seq - 1: the current window, or the reference
    #: being collected while ``ref`` is None
    cur: deque[tuple[Any, int]] = dc_field(default_factory=deque)
    detector: Any = None
    dirty: bool = False


from typing import NamedTuple
import numpy.typing as npt
from scipy import special



class KSResult(NamedTuple):
    statistic: float
    p_value: float
    #: the value where the gap is largest
    location: float
    #: +1: the reference CDF lies above the current one there (current shifted up); -1 down
    sign: int


def ks_sorted(ref_sorted: npt.NDArray[np.float64], cur: npt.ArrayLike) -> KSResult:
    """Two-sample KS of ``cur`` against the sorted reference (see the module docstring).

    >>> import numpy as np
    >>> r = ks_sorted(np.arange(100.0), np.arange(20.0, 120.0))
    >>> round(r.statistic, 6), r.sign, round(r.p_value, 6)
    (0.2, 1, 0.036631)
    """
    a = np.asarray(ref_sorted, dtype=np.float64)
    b = np.sort(np.asarray(cur, dtype=np.float64))
    n, m = a.size, b.size
    if n < 1 or m < 1:
        raise ValueError("both samples need at least one value")
    pooled = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, pooled, side="right") / n
    cdf_b = np.searchsorted(b, pooled, side="right") / m
    diff = cdf_a - cdf_b
    i = int(np.argmax(np.abs(diff)))
    d = float(abs(diff[i]))
    en = n * m / (n + m)
    sq = math.sqrt(en)
    p = float(special.kolmogorov(sq * d)) if d > 0 else 1.0
    return KSResult(d, min(max(p, 0.0), 1.0), float(pooled[i]), 1 if diff[i] > 0 else -1)


def sorted_quantiles(s: npt.NDArray[np.float64], qs: tuple[float, ...]) -> list[float]:
    """Quantiles of the sorted ``s`` by linear interpolation (``np.quantile``'s default), without its overhead."""
    n = s.size
    out = []
    for q in qs:
        x = q * (n - 1)
        lo = int(math.floor(x))
        hi = min(lo + 1, n - 1)
        out.append(float(s[lo] + (s[hi] - s[lo]) * (x - lo)))
    return out


class CategoryMixDrift:
    """The old scoring of detectors/categorical.py (scipy's chi2_contingency, log-likelihood)."""

    method = "g_test"

    def fit(self, reference):
        self._ref = Counter(str(v) for v in np.asarray(reference, dtype=object).reshape(-1))
        self._n_ref = sum(self._ref.values())
        return self

    def score(self, current):
        from scipy import stats

        cur = Counter(str(v) for v in np.asarray(current, dtype=object).reshape(-1))
        n_cur = sum(cur.values())
        cats = sorted(set(self._ref) | set(cur))
        table = np.array([[self._ref[c] for c in cats], [cur[c] for c in cats]], dtype=np.float64)
        if len(cats) < 2:
            g, p, dof = 0.0, 1.0, 0
        else:
            res = stats.chi2_contingency(table, correction=False, lambda_="log-likelihood")
            g, p, dof = float(res.statistic), float(res.pvalue), int(res.dof)
        shares = {c: [round(self._ref[c] / self._n_ref, 6), round(cur[c] / n_cur, 6)] for c in cats}
        moved = sorted(cats, key=lambda c: (-abs(share_z(shares[c][0], shares[c][1], self._n_ref, n_cur)), c))
        return DriftResult(
            method=self.method, statistic=max(g, 0.0), p_value=min(max(p, 0.0), 1.0),
            threshold=0.05, drifted=p < 0.05, n_ref=self._n_ref, n_cur=n_cur,
            explanation={"rule": RULE_P, "dof": dof, "shares": shares, "moved": moved[:3]})


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
        rc, cc = Counter(ref), Counter(cur)
        r_n, c_n = max(len(ref), 1), max(len(cur), 1)
        shares = {c: [rc[c] / r_n, cc[c] / c_n] for c in sorted(set(rc) | set(cc))}
        moved = sorted(shares, key=lambda c: (-abs(share_z(shares[c][0], shares[c][1], r_n, c_n)), c))[:2]
        parts = [f"{c or '(none)'} {_pct(shares[c][0])} -> {_pct(shares[c][1])}" for c in moved]
        return {"shares": {c: [round(a, 6), round(b, 6)] for c, (a, b) in shares.items()},
                "summary": f"{field}=" + ", ".join(parts)}
    rs = np.sort(np.asarray(ref, dtype=np.float64))
    cs = np.sort(np.asarray(cur, dtype=np.float64))
    return _describe_sorted(field, rs, cs)


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


def _describe_sorted(field: str, rs: np.ndarray, cs: np.ndarray) -> dict[str, Any]:
    r, c = sorted_quantiles(rs, _QS), sorted_quantiles(cs, _QS)
    quant = {f"p{round(q * 100)}": [a, b] for q, a, b in zip(_QS, r, c, strict=True)}
    rm, cm = _mean(rs), _mean(cs)
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
        ref = kf.ref or []
        vals = [v for v, _ in kf.cur]
        return {"app": kf.key[0], "model": kf.key[1], "prompt_version": kf.key[2], "field": kf.field,
                "version": kf.version, "mode": kf.mode, "seq": kf.seq, "collect_from": kf.collect_from,
                "ref_seq_from": kf.ref_seq[0], "ref_seq_to": kf.ref_seq[1],
                "ref_from_ms": kf.ref_ms[0], "ref_to_ms": kf.ref_ms[1], "has_ref": int(kf.ref is not None),
                "ref_values": [] if cat else [float(v) for v in ref],
                "ref_labels": [str(v) for v in ref] if cat else [],
                "cur_values": [] if cat else [float(v) for v in vals],
                "cur_labels": [str(v) for v in vals] if cat else [],
                "cur_ts": [int(t) for _, t in kf.cur], "control_id": kf.control_id,
                "row_version": (kf.version << 40) + kf.seq, "updated_at": ms_to_dt(now_ms)}

    def from_row(self, key: Key, fld: str, row: Mapping[str, Any]) -> KeyField:
        """The key-field a :meth:`state_row` describes."""
        cat = fld in CATEGORICAL_FIELDS
        kf = KeyField(key, fld, seq=int(row["seq"]), version=int(row["version"]), mode=str(row["mode"]),
                      collect_from=int(row["collect_from"]), control_id=str(row["control_id"]))
        if row["has_ref"]:
            kf.ref = list(row["ref_labels"] if cat else row["ref_values"])
            kf.ref_seq = (int(row["ref_seq_from"]), int(row["ref_seq_to"]))
            kf.ref_ms = (int(row["ref_from_ms"]), int(row["ref_to_ms"]))
            self._ref_keys[key] = self._ref_keys.get(key, 0) + 1
        vals = list(row["cur_labels"] if cat else row["cur_values"])
        kf.cur = deque(zip(vals, (int(t) for t in row["cur_ts"]), strict=True), maxlen=self._maxlen(kf))
        return kf

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
        kf = KeyField(key, fld)
        kf.cur = deque(maxlen=self.cfg.ref_size)
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
    def add(self, kf: KeyField, values: Sequence[Any], ts_ms: Sequence[int],
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
                kf.cur.extend(zip(values[i:i + k], ts_ms[i:i + k], strict=True))
                kf.seq += k
                i += k
                if len(kf.cur) >= cfg.ref_size:
                    self._make_ref(kf, list(kf.cur), "first_n", kf.seq - len(kf.cur), kf.seq, "")
                    changed = True
                continue
            # values after the reference: the next test is at position p (1-based) with
            # p >= min_cur and (p - min_cur) % test_every == 0
            pos = kf.seq - kf.ref_seq[1]  # values after the reference so far
            mc, te = cfg.min_cur, cfg.test_every
            nxt = mc if pos < mc else pos + (te - (pos - mc) % te if (pos - mc) % te else te)
            k = min(n - i, nxt - pos)
            kf.cur.extend(zip(values[i:i + k], ts_ms[i:i + k], strict=True))
            kf.seq += k
            i += k
            if kf.seq - kf.ref_seq[1] == nxt:
                res = self._test(kf)
                out.append((kf, res))
                if res.drifted and kf.field in NUMERIC_FIELDS:  # when did it start (change_point.py)
                    cp = change_point_result(kf.field, kf.detector, kf.cur, res, cfg.window_size)
                    if cp is not None:
                        out.append((kf, cp))
                # the state row: once per window_size values (each ~8 KB; the stop and a
                # revocation write every changed one)
                changed = changed or (nxt - mc) % cfg.window_size == 0
        if n:
            kf.dirty = True
        return changed

    def process(self, keys: Sequence[Key], ts_ms: Sequence[int],
                values: Mapping[str, Sequence[Any]]) -> tuple[list[dict[str, Any]],
                                                              list[tuple[KeyField, DriftResult]]]:
        """One batch in Kafka order: ``keys[i]`` and ``ts_ms[i]`` of event ``i``, ``values[field][i]``
        its value (NaN or None: none). Returns (state rows to write, [(key-field, result)])."""
        results: list[tuple[KeyField, DriftResult]] = []
        touched: list[KeyField] = []
        by_key: dict[Key, list[int]] = {}
        for i, k in enumerate(keys):
            by_key.setdefault(k, []).append(i)
        ts = np.asarray(ts_ms, dtype=np.int64)
        for fld in self.cfg.fields:
            col = values.get(fld)
            if col is None:
                continue
            cat = fld in CATEGORICAL_FIELDS
            arr = np.asarray(col, dtype=object if cat else np.float64)
            for key, idx in by_key.items():
                sel = np.asarray(idx)
                v = arr[sel]
                ok = (v != None) if cat else np.isfinite(v)  # noqa: E711 - element-wise
                if not ok.all():
                    sel, v = sel[ok], v[ok]
                if not len(v):
                    continue
                try:  # one key-field's failure (a corrupt stored state) costs only its values
                    kf = self.get(key, fld)
                    if self.add(kf, v.tolist(), ts[sel].tolist(), results):
                        touched.append(kf)
                except Exception:  # noqa: BLE001 - logged and counted; the other keys go on
                    self.key_errors += 1
                    log.exception("numeric drift: %s/%s/%s field %s failed; its values of this batch "
                                  "are skipped and a new reference is collected", *key, fld)
                    fresh = KeyField(key, fld)
                    fresh.cur = deque(maxlen=self.cfg.ref_size)
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


    def _make_ref(self, kf: KeyField, pairs: list[tuple[Any, int]], mode: str, seq_from: int, seq_to: int,
                  control_id: str) -> None:
        if kf.ref is None:
            self._ref_keys[kf.key] = self._ref_keys.get(kf.key, 0) + 1
        kf.version += 1
        kf.mode = mode
        kf.ref = [v for v, _ in pairs]
        kf.ref_seq = (seq_from, seq_to)
        ts = [t for _, t in pairs]
        kf.ref_ms = (min(ts), max(ts)) if ts else (0, 0)
        kf.control_id = control_id
        kf.cur = deque(maxlen=self.cfg.window_size)
        kf.detector = None
        kf.dirty = True
        self.references_made += 1
        log.info("numeric drift: reference v%d (%s) of %s/%s/%s %s: %d values", kf.version, mode, *kf.key,
                 kf.field, len(kf.ref))

    def _test(self, kf: KeyField) -> DriftResult:
        """The window against the reference: KS (numeric) or the G-test (finish reason), decided
        at ``alpha / (keys x fields x 1)``, with the quantiles or shares that moved."""
        assert kf.ref is not None
        cfg = self.cfg
        n_keys = len(self._ref_keys)
        a_test = per_test_alpha(cfg.alpha, n_keys, len(cfg.fields), 1)
        cur_t, ts = zip(*kf.cur, strict=True)  # the values and times of the window
        cur = list(cur_t)
        if kf.field in CATEGORICAL_FIELDS:
            if kf.detector is None:
                kf.detector = CategoryMixDrift().fit(kf.ref)
            r = kf.detector.score(cur)
            expl = dict(r.explanation)
            expl.update(describe_shift(kf.field, kf.ref, cur))
            stat, p, method, n_ref = r.statistic, r.p_value if r.p_value is not None else 1.0, r.method, r.n_ref
        else:
            if kf.detector is None:  # the sorted reference
                kf.detector = np.sort(np.asarray(kf.ref, dtype=np.float64))
            cs = np.sort(np.asarray(cur, dtype=np.float64))
            ks = ks_sorted(kf.detector, cs)
            stat, p, method, n_ref = ks.statistic, ks.p_value, "ks", len(kf.ref)
            expl = {"location": ks.location, "sign": ks.sign, "p_value_method": "asymptotic (Kolmogorov)",
                    **_describe_sorted(kf.field, kf.detector, cs)}
        expl.update({
            "rule": "drifted = p_value < threshold (threshold = alpha / (keys x fields x methods))",
            "alpha_family": cfg.alpha, "alpha_test": a_test, "correction": "bonferroni",
            "family": {"keys": n_keys, "fields": len(cfg.fields), "methods": 1},
            "reference": {"version": kf.version, "mode": kf.mode, "n": len(kf.ref), "seq_from": kf.ref_seq[0],
                          "seq_to": kf.ref_seq[1], "from_ms": kf.ref_ms[0], "to_ms": kf.ref_ms[1]},
            "window": {"seq_from": kf.seq - len(cur), "seq_to": kf.seq, "from_ms": min(ts), "to_ms": max(ts)},
        })
        self.tests_run += 1
        return DriftResult(method=method, statistic=float(stat), p_value=float(p), threshold=a_test,
                           drifted=bool(p < a_test), n_ref=n_ref, n_cur=len(cur), explanation=expl)


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

    def _command_values(self, kf: KeyField, f_ms: Any, t_ms: Any) -> list[tuple[Any, int]]:
        """The values a rebase or pin makes its reference of, from ``llm_events``: the latest
        ``ref_size``, or ``ref_size`` evenly spread over ``[f_ms, t_ms)`` (in Kafka order)."""
        if self.query is None:
            return list(kf.cur)[-self.cfg.ref_size:] if kf.ref is not None or f_ms is None else []
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
        return [(r[0] if fld in CATEGORICAL_FIELDS else float(r[0]), int(r[1])) for r in rows]

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
                kf.cur = deque(maxlen=self.cfg.ref_size)
            else:
                pairs = self._command_values(kf, cmd.get("from_ms"), cmd.get("to_ms"))
                if len(pairs) < 10:
                    log.warning("numeric drift: %s of %s/%s/%s %s skipped: %d values in the range", action, *key,
                                fld, len(pairs))
                    continue
                self._make_ref(kf, pairs, "pinned" if action == "pin" else "rebase", kf.seq, kf.seq, control_id)
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


def batch_values(events: Any, rows: np.ndarray, fields: Sequence[str]) -> tuple[
        list[Key], list[int], dict[str, Sequence[Any]]]:
    """The keys, times and per-field values of a stored batch's ``rows`` (in that order)."""
    apps, models, pvs = (_take(events, c, rows) or [] for c in ("app", "model", "prompt_version"))
    keys = [(a, m, p or "") for a, m, p in zip(apps, models, pvs, strict=True)]
    ts = _take(events, "timestamp", rows) or []
    ts_ms = [int(t.timestamp() * 1000) if hasattr(t, "timestamp") else int(t) for t in ts]
    vals: dict[str, Sequence[Any]] = {}
    for f in fields:
        if f in CATEGORICAL_FIELDS:
            fr = _take(events, "finish_reasons", rows)
            if fr is not None:
                vals[f] = [str(x[0]) if x else "" for x in fr]
        else:
            col = _floats(events, f, rows)
            if col is not None:
                vals[f] = col.tolist()
    return keys, ts_ms, vals


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


class NumericDriftStage:
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
        self._inbox_rows = 0
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
            self._inbox.append((_slim(ev, self._columns), rows))
            self._inbox_rows += len(rows)
            while self._inbox_rows > _MAX_INBOX_ROWS and len(self._inbox) > 1:
                _, old = self._inbox.pop(0)
                self._inbox_rows -= len(old)
                self.inbox_dropped += len(old)
            self._idle.clear()
            self._wake.set()
        self.hot_cpu_s += time.thread_time() - t0

    # -- the loop -------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            if not self._inbox and not self._controls:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                if self._inbox:
                    await self._process_inbox()
                while self._controls:
                    await self._apply_control(*self._controls.pop(0))
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a failure here never stops the stream
                log.exception("numeric drift: processing a batch failed")
                if self._ports is not None:
                    self._ports.metrics.stage_errors[self.name] += 1

    def _work(self, work: list[tuple[Any, np.ndarray]]) -> tuple[list[dict[str, Any]],
                                                                 list[tuple[KeyField, DriftResult]]]:
        from driftline.streams.stages.semantic_drift import kafka_order

        assert self.engine is not None
        rows_out: list[dict[str, Any]] = []
        results: list[tuple[KeyField, DriftResult]] = []
        for ev, rows in work:
            keys, ts, vals = batch_values(ev, kafka_order(ev, rows), self.cfg.fields)
            r, res = self.engine.process(keys, ts, vals)
            rows_out.extend(r)
            results.extend(res)
        return rows_out, results

    async def _process_inbox(self) -> None:
        work, self._inbox, self._inbox_rows = self._inbox, [], 0
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
        self._idle.clear()
        self._wake.set()
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
