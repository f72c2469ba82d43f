"""The numeric drift stage after issue 20 (numpy windows, cached reference statistics, the
G-test without scipy's wrappers, columns taken over Arrow) writes exactly the rows of the
stage before it, kept frozen as benchmarks/numeric_drift_v0.py (the CPU benchmark's
baseline): the same ``drift_scores`` rows (statistic, p-value, threshold, verdict, sizes and
the explanation's JSON, compared as strings), the same ``numeric_drift_state`` rows, across
eviction, a baseline command, and a restart from the OLD stage's state rows (the rows a
worker before issue 20 left in ``numeric_drift_state`` stay readable, no migration).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from driftline.schemas.columns import NUMERIC_STATE_COLUMNS
from driftline.streams.stages.numeric_drift import (
    FIELDS,
    NumericDriftConfig,
    NumericDriftStage,
    NumericEngine,
    Window,
)

_spec = importlib.util.spec_from_file_location(
    "bench_numeric_drift", Path(__file__).resolve().parents[2] / "benchmarks" / "bench_numeric_drift.py")
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench_numeric_drift", bench)
_spec.loader.exec_module(bench)
v0 = bench._load_v0()

KEYS = [("app", "gpt-x", "v1"), ("app", "gpt-x", ""), ("other", "claude", "v2")]
T0 = 1_800_000_000_000


def _events(seed: int, n: int, scenario: str) -> tuple[list[Any], list[int], dict[str, list[Any]]]:
    """``n`` calls of 3 interleaved keys, shifted at n/2 per ``scenario``; TTFT missing (NaN) on
    a fifth of the calls, reasoning tokens on a third, so fields are numbered apart."""
    v = bench.stream(seed, n, scenario, n // 2)
    rng = np.random.default_rng(seed + 100)
    keys = [KEYS[i] for i in rng.integers(0, 3, n)]
    ts = (T0 + np.cumsum(rng.integers(0, 50, n))).tolist()
    vals: dict[str, list[Any]] = {f: np.asarray(v[f], dtype=np.float64).tolist() for f in FIELDS
                                  if f != "finish_reason"}
    vals["ttft_ms"] = [x if rng.random() > 0.2 else float("nan") for x in vals["ttft_ms"]]
    vals["reasoning_output_tokens"] = [x if rng.random() > 0.33 else float("nan")
                                       for x in vals["reasoning_output_tokens"]]
    vals["finish_reason"] = list(v["finish_reason"])
    return keys, ts, vals


def _scores(results: list[Any]) -> list[tuple[Any, ...]]:
    """What a result writes to ``drift_scores`` (explanation as its JSON string)."""
    return [(kf.key, kf.field, r.to_row()) for kf, r in results]


def _state(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{c: r[c] for c in NUMERIC_STATE_COLUMNS if c != "updated_at"} for r in rows]


class _Store:
    """``numeric_drift_state`` in memory: the latest row per key-field (as FINAL reads it)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, str, str], dict[str, Any]] = {}

    def save(self, rows: list[dict[str, Any]]) -> None:
        for r in rows:
            self.rows[(r["app"], r["model"], r["prompt_version"], r["field"])] = r

    def query(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        if "DISTINCT" in sql:
            return [k for k in self.rows if all(params.get(c, k[i]) == k[i] for i, c in
                                                enumerate(("app", "model", "prompt_version", "field")))]
        row = self.rows.get((params["app"], params["model"], params["pv"], params["field"]))
        return [] if row is None else [tuple(row[c] for c in NUMERIC_STATE_COLUMNS)]


def _feed(eng: Any, keys: list[Any], ts: list[int], vals: dict[str, list[Any]], lo: int, hi: int,
          batch: int, store: _Store | None = None) -> tuple[list[Any], list[Any]]:
    rows: list[Any] = []
    res: list[Any] = []
    for s in range(lo, hi, batch):
        e = min(hi, s + batch)
        r, x = eng.process(keys[s:e], ts[s:e], {f: v[s:e] for f, v in vals.items()})
        if store is not None:
            store.save(r)
        rows += r
        res += x
    return rows, res


@pytest.mark.parametrize(("scenario", "seed"), [("control", 0), ("longer", 1), ("length", 3)])
def test_the_engine_writes_the_previous_engines_rows(scenario: str, seed: int) -> None:
    # Catches: any change of a p-value or statistic (even in the last bit: compared as the
    # JSON the row holds), of the Bonferroni K (keys counted at another moment), of the
    # explanation's quantiles, means, shares, order of keys or windows' times, of change
    # point rows, of the state rows (values, window, seq, version); and eviction (max_keys 10
    # of 24 key-fields: rows of evicted key-fields and their reload) behaving otherwise.
    keys, ts, vals = _events(seed, 4500, scenario)
    for cfg_kw in ({}, {"max_keys": 10, "ref_size": 300, "window_size": 200, "test_every": 50}):
        o_store, n_store = _Store(), _Store()
        old = v0.NumericEngine(v0.NumericDriftConfig(**cfg_kw), o_store.query)
        new = NumericEngine(NumericDriftConfig(**cfg_kw), n_store.query)
        o_rows, o_res = _feed(old, keys, ts, vals, 0, 4500, 250, o_store)
        n_rows, n_res = _feed(new, keys, ts, vals, 0, 4500, 250, n_store)
        assert len(o_res) > 100 and (scenario == "control" or any(r.drifted for _, r in o_res))
        assert not cfg_kw or (old.evicted > 300 and old.loaded > 200)
        assert _scores(n_res) == _scores(o_res)
        assert _state(n_rows) == _state(o_rows) and _state(new.dirty_rows(1)) == _state(old.dirty_rows(1))
        assert (new.tests_run, new.references_made, new.evicted) == (old.tests_run, old.references_made, old.evicted)


def test_a_restart_from_the_previous_stages_state_rows_gives_the_same_rows() -> None:
    # The state the old stage left (its rows at a stop, mid-stream) read by the new engine:
    # same later rows as the old engine restarted from them, and as the old engine never
    # stopped. A baseline reset and rebase (no store: from the held window) on the way.
    # Catches: a changed row layout (ref/window read wrongly: other statistics), a window
    # restored without its times or longer than its maxlen, seq or version lost.
    keys, ts, vals = _events(5, 6000, "longer")
    old = v0.NumericEngine(v0.NumericDriftConfig())
    _feed(old, keys, ts, vals, 0, 2170, 100)
    old.apply({"action": "reset", "app": "other"}, "c1")
    _feed(old, keys, ts, vals, 2170, 2630, 100)
    saved = _Store()
    saved.save(old.dirty_rows(1))
    assert len(saved.rows) == 24

    restarted_old = v0.NumericEngine(v0.NumericDriftConfig(), saved.query)
    restarted_new = NumericEngine(NumericDriftConfig(), saved.query)
    outs = []
    for eng in (old, restarted_old, restarted_new):
        rows, res = _feed(eng, keys, ts, vals, 2630, 3900, 100)
        no_store = eng.query
        eng.query = None  # the rebase takes the held window's latest values
        rows += eng.apply({"action": "rebase", "field": "latency_ms", "model": "gpt-x"}, "c2")
        eng.query = no_store
        r2, res2 = _feed(eng, keys, ts, vals, 3900, 6000, 100)
        outs.append((_scores(res + res2), _state(rows + r2 + eng.dirty_rows(1))))
    assert restarted_new.loaded == restarted_old.loaded == 24
    assert len(outs[0][0]) > 100 and any(json.loads(r["explanation"])["reference"]["mode"] == "rebase"
                                         for _, _, r in outs[0][0])
    assert outs[2][0] == outs[1][0] == outs[0][0]
    assert outs[2][1] == outs[1][1]


def test_the_stage_on_arrow_batches_writes_the_previous_stages_rows() -> None:
    # The worker's path: stored Arrow batches (keys dictionary-encoded, times and values taken
    # as columns, finish reasons from their lists) in the thread's _work. Catches: keys grouped
    # in another order than their first event (K and eviction order differ), a row of one key
    # put in another, times or values taken from other rows, "" and null prompt versions apart.
    batches = bench.arrow_batches(12_000, keys=12, batch=1000, seed=4, scenario="ttft", shift_at=7000, mixed=True)
    outs = []
    for stage_cls, cfg_cls, eng_cls in ((v0.NumericDriftStage, v0.NumericDriftConfig, v0.NumericEngine),
                                        (NumericDriftStage, NumericDriftConfig, NumericEngine)):
        st = stage_cls(cfg_cls())
        st.engine = eng_cls(st.cfg)
        rows, res = [], []
        for ev in batches:
            st.on_stored(bench._Batch(ev))
            work, st._inbox = st._inbox, []
            st._inbox_rows = st._inbox_units = 0  # the previous stage's count and this one's
            r, x = st._work(work)
            rows += r
            res += x
        outs.append((_scores(res), _state(rows)))
        st._pool.shutdown()
    assert len(outs[0][0]) > 50 and any(r["drifted"] for _, _, r in outs[0][0])
    assert len({k for k, _, _ in outs[0][0]}) == 6  # 12 keys of the batch, null and "" versions one
    assert outs[1] == outs[0]


def test_arrow_times_are_exact_milliseconds() -> None:
    # The previous stage read an aware timestamp as int(datetime.timestamp() * 1000), 1 ms
    # low for ~0.5% of times (a float rounding); the stage now casts the column. Catches: a
    # return to the float path (window times and state times 1 ms off).
    batches = bench.arrow_batches(3000, keys=1, batch=1000, tz="UTC")
    st = NumericDriftStage(NumericDriftConfig(fields=("latency_ms",), ref_size=500, window_size=500))
    st.engine = NumericEngine(st.cfg)
    for ev in batches:
        st.on_stored(bench._Batch(ev))
    work, st._inbox = st._inbox, []
    rows, _ = st._work(work)
    st._pool.shutdown()
    exact = (T0 + np.arange(3000) * 37).tolist()
    assert rows[-1]["cur_ts"] == exact[-500:] and rows[-1]["ref_from_ms"] == exact[0]


def test_the_window_slides_like_a_bounded_deque() -> None:
    # Catches: values lost or duplicated when the buffer wraps (moves to its front), a window
    # longer than maxlen, times apart from their values.
    from collections import deque

    rng = np.random.default_rng(0)
    w, d = Window(37, np.float64), deque(maxlen=37)
    for _ in range(400):
        k = int(rng.integers(0, 60))
        v = rng.random(k)
        t = rng.integers(0, 10**12, k)
        w.extend(v, t)
        d.extend(zip(v.tolist(), t.tolist(), strict=True))
        assert list(w) == list(d) and len(w) == len(d)


def test_ks_and_g_test_equal_the_previous_ones_to_the_bit() -> None:
    # Catches: a tie (equal largest gaps in the reference's and the current's part) resolved
    # to the other location or sign, a cached reference CDF of other values, the G-test's
    # expected counts or survival function computed otherwise than scipy's (last bits).
    from scipy import stats

    from driftline.detectors.categorical import g_test
    from driftline.detectors.ks_asymp import ks_sorted, ref_cdf

    rng = np.random.default_rng(11)
    for i in range(300):
        n, m = int(rng.integers(1, 400)), int(rng.integers(1, 400))
        if i % 2:  # few distinct values: ties everywhere
            a, b = rng.integers(0, 5, n).astype(float), rng.integers(0, 6, m).astype(float)
        else:
            a, b = np.round(rng.lognormal(3, 1, n)), np.round(rng.lognormal(3, 1, m) * rng.uniform(0.8, 1.3))
        a = np.sort(a)
        assert tuple(ks_sorted(a, np.sort(b), cur_sorted=True, ref_cdf=ref_cdf(a))) == tuple(v0.ks_sorted(a, b))
        t = rng.integers(0, 40, (2, int(rng.integers(2, 6)))).astype(float)
        t[:, 0] += 1
        t[1, 1] += 1
        r = stats.chi2_contingency(t, correction=False, lambda_="log-likelihood")
        assert g_test(t) == (float(r.statistic), float(r.pvalue), int(r.dof))
