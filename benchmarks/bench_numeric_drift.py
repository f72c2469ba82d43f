"""Numeric drift in the stream: detection delay, false alarms and CPU per event.

Seeded streams of one key's LLM calls (every field of streams/stages/numeric_drift.py;
all present on every call) go through :class:`NumericEngine` in batches of 100, with
the stage's defaults (reference 500, window 500, a test every 100 values, family-wise
alpha 0.05 over keys x 8 fields). Scenarios, from event ``--shift-at`` on:

- ``longer``: a model update makes responses 30% longer (output tokens x 1.3; latency
  and cost follow, as they do);
- ``ttft``:   time to first token doubles (latency follows);
- ``length``: finish reasons move to ``length`` (1% -> 9%);
- ``control``: nothing changes.

The synthetic call: output tokens lognormal(5.3, 0.6) (median 200), input tokens
lognormal(6.5, 0.8), reasoning tokens 0 on 70% of calls else lognormal(6, 1), TTFT
lognormal(5.5, 0.4) ms, TPOT lognormal(3.0, 0.3) ms, latency = TTFT + output x TPOT,
cost = $3/M input + $15/M output, finish reasons stop 97% / tool_calls 2% / length 1%.

Reported per scenario over ``--seeds`` streams: the share of streams flagged on the
shifted field after the shift within ``--max-delay`` events, the delay (events after
the shift until the first flag: median, p90, max), and on the control streams the
false alarms: the share of tests that flagged (to compare with the per-test level
alpha / 8), the share of rounds (the 8 fields' tests at one position) with any flag (to
compare with alpha, the family-wise level per round) and the share of streams with any
flag over all their rounds. Then the CPU
per event: the stage's hot path (``on_stored``, on the event loop) and its thread
(columns -> values -> tests) on an Arrow batch as the worker stores it.

    python benchmarks/bench_numeric_drift.py                 # 200 seeds per scenario
    python benchmarks/bench_numeric_drift.py --seeds 40      # quicker
    python benchmarks/bench_numeric_drift.py --scenarios control --alpha 0.005 --no-cpu
    python benchmarks/bench_numeric_drift.py --scenarios control --no-cpu --change-points

``--change-points`` also measures streams/stages/change_point.py: the location error of the
change on ``longer`` and ``ttft`` streams (shifted at ``--shift-at`` + 13, off the blocks'
grid) and the false alarms of its scan on control streams (README "Numeric drift").

tests/unit/test_numeric_stage.py runs the same functions on a few seeds.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np

from driftline.schemas.topics import EVENTS_TOPIC as TOPIC
from driftline.streams.stages.change_point import METHOD as CP_METHOD
from driftline.streams.stages.change_point import block_size, locate_change
from driftline.streams.stages.numeric_drift import (
    FIELDS,
    NUMERIC_FIELDS,
    NumericDriftConfig,
    NumericEngine,
)

#: the field each scenario shifts (and is expected to flag)
SHIFTED = {"longer": "output_tokens", "ttft": "ttft_ms", "length": "finish_reason", "control": ""}
KEY = ("app", "gpt-x", "v1")


def stream(seed: int, n: int, scenario: str, shift_at: int) -> dict[str, Any]:
    """One key's ``n`` calls (every field), shifted from ``shift_at`` on per ``scenario``."""
    if scenario not in SHIFTED:
        raise ValueError(f"scenario must be one of {sorted(SHIFTED)}")
    rng = np.random.default_rng(seed)
    after = np.arange(n) >= shift_at
    out_tok = rng.lognormal(5.3, 0.6, n)
    if scenario == "longer":
        out_tok = np.where(after, out_tok * 1.3, out_tok)
    out_tok = np.maximum(1, np.round(out_tok))
    in_tok = np.maximum(1, np.round(rng.lognormal(6.5, 0.8, n)))
    reasoning = np.where(rng.random(n) < 0.7, 0.0, np.round(rng.lognormal(6.0, 1.0, n)))
    ttft = rng.lognormal(5.5, 0.4, n)
    if scenario == "ttft":
        ttft = np.where(after, ttft * 2, ttft)
    tpot = rng.lognormal(3.0, 0.3, n)
    latency = ttft + out_tok * tpot
    cost = in_tok * 3e-6 + out_tok * 15e-6
    u = rng.random(n)
    p_len = np.where(after & (scenario == "length"), 0.09, 0.01)
    finish = np.where(u < p_len, "length", np.where(u < p_len + 0.02, "tool_calls", "stop"))
    return {"output_tokens": out_tok, "input_tokens": in_tok, "reasoning_output_tokens": reasoning,
            "latency_ms": latency, "ttft_ms": ttft, "tpot_ms": tpot, "cost_usd": cost,
            "finish_reason": finish.tolist()}


def run(values: dict[str, Any], cfg: NumericDriftConfig, batch: int = 100,
        change_points: bool = False) -> list[tuple[int, str, bool, Any]]:
    """The stream through a fresh engine: ``(event index of the window end, field, drifted,
    result)`` of every test, in order (the ``change_point`` rows only with ``change_points``)."""
    eng = NumericEngine(cfg)
    n = len(values["latency_ms"])
    keys = [KEY] * n
    ts = list(range(1_800_000_000_000, 1_800_000_000_000 + n))
    out = []
    for s in range(0, n, batch):
        _, res = eng.process(keys[s:s + batch], ts[s:s + batch],
                             {f: list(v[s:s + batch]) for f, v in values.items() if f in cfg.fields})
        out.extend((int(r.explanation["window"]["seq_to"]) - 1, kf.field, r.drifted, r) for kf, r in res
                   if change_points or r.method != CP_METHOD)
    return out


def first_flag(tests: list[tuple[int, str, bool, Any]], field: str, after: int) -> int | None:
    """The event index of ``field``'s first flag at or after ``after`` (None: never)."""
    return next((i for i, f, d, _ in tests if f == field and d and i >= after), None)


def scenario_stats(scenario: str, seeds: range, *, n: int, shift_at: int, max_delay: int,
                   cfg: NumericDriftConfig) -> dict[str, Any]:
    """Detection (shifted scenarios) or false alarms (control) over ``seeds``."""
    fld = SHIFTED[scenario]
    delays, tests, flags, flagged_streams, rounds, flagged_rounds = [], 0, 0, 0, 0, 0
    for seed in seeds:
        t = run(stream(seed, n, scenario, shift_at), cfg)
        if scenario == "control":
            tests += len(t)
            k = sum(1 for x in t if x[2])
            flags += k
            flagged_streams += k > 0
            at = {i for i, _, _, _ in t}
            rounds += len(at)
            flagged_rounds += len({i for i, _, d, _ in t if d})
        else:
            i = first_flag(t, fld, shift_at)
            delays.append(None if i is None else i - shift_at)
    if scenario == "control":
        return {"streams": len(seeds), "tests": tests, "per_test_rate": flags / max(tests, 1),
                "per_test_level": cfg.alpha / len(cfg.fields),
                # a round: the tests of every field at one position; the family-wise level is per round
                "rounds": rounds, "per_round_rate": flagged_rounds / max(rounds, 1), "per_round_level": cfg.alpha,
                "streams_with_a_flag": flagged_streams / len(seeds)}
    hit = sorted(d for d in delays if d is not None and d <= max_delay)
    return {"streams": len(seeds), "detected": len(hit) / len(seeds),
            "delay_median": float(np.median(hit)) if hit else None,
            "delay_p90": float(np.quantile(hit, 0.9)) if hit else None, "delay_max": max(hit) if hit else None}


def first_change_point(tests: list[tuple[int, str, bool, Any]], field: str, after: int) -> Any:
    """The first ``change_point`` result of ``field`` whose window ends at or after ``after``."""
    return next((r for i, f, _, r in tests if f == field and r.method == CP_METHOD and i >= after), None)


def change_point_stats(seeds: range, *, n: int, shift_at: int, cfg: NumericDriftConfig) -> dict[str, Any]:
    """The change points: on ``longer`` and ``ttft`` streams shifted at ``shift_at``, the share
    located (the first ``change_point`` row of the shifted field after the shift, drifted) and
    the location error (its ``seq`` - ``shift_at``: median and p90 of the absolute, max); on
    control streams the false alarms of the scan itself, run at every test position of every
    numeric field whether or not KS flags (the share of scans with p < the per-test level, to
    compare with that level), and of the stage's output (drifted ``change_point`` rows per test)."""
    out: dict[str, Any] = {}
    for sc in ("longer", "ttft"):
        errs, located = [], 0
        for seed in seeds:
            r = first_change_point(run(stream(seed, n, sc, shift_at), cfg, change_points=True), SHIFTED[sc], shift_at)
            if r is not None and r.drifted:
                located += 1
                errs.append(int(r.explanation["change"]["seq"]) - shift_at)
        a = np.abs(errs)
        out[sc] = {"located": located / len(seeds), "abs_error_median": float(np.median(a)) if errs else None,
                   "abs_error_p90": float(np.quantile(a, 0.9)) if errs else None,
                   "abs_error_max": int(a.max()) if errs else None,
                   "error_mean": float(np.mean(errs)) if errs else None}
    level = cfg.alpha / len(cfg.fields)
    b, mc, w = block_size(cfg.window_size), cfg.min_cur, cfg.window_size
    scans = scan_flags = tests = rows = 0
    for seed in seeds:
        v = stream(seed, n, "control", shift_at)
        for f in NUMERIC_FIELDS:
            if f not in cfg.fields:
                continue
            x = np.asarray(v[f], dtype=np.float64)
            ref = x[:cfg.ref_size]
            for end in range(cfg.ref_size + mc, n + 1, cfg.test_every):
                c = locate_change(ref, x[max(cfg.ref_size, end - w):end], b)
                scans += 1
                scan_flags += c is not None and c["p_value"] < level
        t = run(v, cfg, change_points=True)
        tests += sum(1 for x in t if x[3].method != CP_METHOD and x[1] in NUMERIC_FIELDS)
        rows += sum(1 for x in t if x[3].method == CP_METHOD and x[2])
    out["control"] = {"scans": scans, "scan_rate": scan_flags / max(scans, 1), "per_test_level": level,
                      "tests": tests, "drifted_change_point_rows_per_test": rows / max(tests, 1)}
    return out


def _sibling(name: str) -> Any:
    """A module of benchmarks/ by its file name (benchmarks/ is not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    if name in sys.modules:
        return sys.modules[name]
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    sys.path.insert(0, str(Path(__file__).parent)) if str(Path(__file__).parent) not in sys.path else None
    spec.loader.exec_module(mod)
    return mod


def _load_v0() -> Any:
    """The frozen pre-issue-20 stage (benchmarks/numeric_drift_v0.py), the CPU baseline."""
    return _sibling("numeric_drift_v0")


def arrow_batches(n: int = 200_000, keys: int = 20, batch: int = 2000, seed: int = 0,
                  scenario: str = "control", shift_at: int | None = None, tz: str | None = None,
                  mixed: bool = False) -> list[Any]:
    """``n`` calls of ``keys`` interleaved keys (every field) as the worker stores them: Arrow
    batches of ``batch`` rows (``ArrowColumns``), the ``scenario`` shifting every key from
    ``shift_at`` (default: never). ``mixed``: key ``j`` is app ``j % 2``, model ``(j // 2) % 3``
    and a null prompt version for ``j < 6``, ``""`` from 6 on (the same key: a stage reads a
    null one as ``""``), so key order by first event differs from any column's order."""
    import pyarrow as pa

    from driftline.streams.ingest.transforms import ArrowColumns

    v = stream(seed, n, scenario, n if shift_at is None else shift_at)
    rng = np.random.default_rng(seed + 1)
    k = rng.integers(0, keys, n)
    table = pa.table({
        "event_id": [f"e{i}" for i in range(n)],
        "app": [f"app{j % 2}" for j in k] if mixed else [f"app{j}" for j in k],
        "model": [f"m{(j // 2) % 3}" for j in k] if mixed else ["m"] * n,
        "prompt_version": pa.array([None if j < 6 else "" for j in k] if mixed else ["v1"] * n, pa.string()),
        "timestamp": pa.array(1_800_000_000_000 + np.arange(n, dtype=np.int64) * 37, pa.timestamp("ms", tz=tz)),
        "source_topic": [TOPIC] * n, "source_partition": pa.array(k % 4, pa.int32()),
        "source_offset": pa.array(np.arange(n), pa.int64()),
        **{f: pa.array(v[f].astype(np.int64) if "tokens" in f else v[f]) for f in FIELDS if f != "finish_reason"},
        "finish_reasons": [[x] for x in v["finish_reason"]],
    })
    return [ArrowColumns(table.slice(s, batch)) for s in range(0, n, batch)]


class _Batch:
    def __init__(self, events: Any) -> None:
        self.events = events


def cpu_per_event(batches: list[Any], stage_cls: Any, config_cls: Any, engine_cls: Any) -> dict[str, float]:
    """CPU seconds per event of a stage class: ``on_stored`` (event loop) and its thread's work
    (``_work``: columns -> values -> tests), over ``batches`` (:func:`arrow_batches`)."""
    st = stage_cls(config_cls())
    st.engine = engine_cls(st.cfg)
    hot = thread = 0.0
    n = 0
    for ev in batches:
        b = _Batch(ev)
        n += ev.num_rows
        t0 = time.thread_time()
        st.on_stored(b)
        hot += time.thread_time() - t0
        work, st._inbox, st._inbox_rows = st._inbox, [], 0
        t0 = time.thread_time()
        st._work(work)
        thread += time.thread_time() - t0
    return {"events": n, "hot_path_us_per_event": hot / n * 1e6, "thread_us_per_event": thread / n * 1e6,
            "tests_run": st.engine.tests_run}


def cpu_compare(runs: int = 5, n: int = 200_000, keys: int = 20) -> list[dict[str, Any]]:
    """The previous stage (numeric_drift_v0.py) and the current one on the same batches, run
    alternately ``runs`` times each (fresh stage each run), with the machine's steal time over
    each run (/proc/stat; a VM's CPU taken by its host) and the load average."""
    import os

    steal_s = _sibling("bench_throughput").steal_s
    from driftline.streams.stages.numeric_drift import NumericDriftStage

    v0 = _load_v0()
    batches = arrow_batches(n, keys)
    out = []
    for r in range(runs):
        for name, cls, cfg, eng in (("previous", v0.NumericDriftStage, v0.NumericDriftConfig, v0.NumericEngine),
                                    ("current", NumericDriftStage, NumericDriftConfig, NumericEngine)):
            s0, w0 = steal_s(), time.perf_counter()
            res = cpu_per_event(batches, cls, cfg, eng)
            res.update(run=r, stage=name, steal_s=round(steal_s() - s0, 3), wall_s=round(time.perf_counter() - w0, 2),
                       load1=os.getloadavg()[0])
            out.append(res)
            print(f"    run {r} {name:8s} thread {res['thread_us_per_event']:6.2f} us/event, on_stored "
                  f"{res['hot_path_us_per_event']:.2f} us/event, {res['tests_run']} tests, steal {res['steal_s']} s "
                  f"over {res['wall_s']} s, load {res['load1']:.1f}", flush=True)
    for name in ("previous", "current"):
        t = sorted(x["thread_us_per_event"] for x in out if x["stage"] == name)
        print(f"  {name:8s} thread CPU-us/event: median {np.median(t):.2f}, min {t[0]:.2f}, max {t[-1]:.2f}")
    prev = np.median([x["thread_us_per_event"] for x in out if x["stage"] == "previous"])
    cur = np.median([x["thread_us_per_event"] for x in out if x["stage"] == "current"])
    print(f"  current / previous (medians): {cur / prev:.3f}")
    return out


def memory_per_key_field(engine_cls: Any, config_cls: Any, keys: int = 40) -> float:
    """Bytes held per key-field (``tracemalloc``) by an engine after ``keys`` keys x 8 fields
    each got 1,050 values: a full reference and window, tested (what the tests keep built)."""
    import gc
    import tracemalloc

    v = stream(0, 1050, "control", 1050)
    vals = {f: list(x) for f, x in v.items()}
    ts = list(range(1_800_000_000_000, 1_800_000_000_000 + 1050))
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    eng = engine_cls(config_cls())
    for k in range(keys):
        eng.process([(f"app{k}", "m", "v1")] * 1050, ts, vals)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert len(eng.state) == keys * len(FIELDS)
    return held / len(eng.state)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=200, help="streams per scenario")
    ap.add_argument("--events", type=int, default=4000, help="calls per stream")
    ap.add_argument("--shift-at", type=int, default=2000, help="the call the shift starts at")
    ap.add_argument("--max-delay", type=int, default=1000, help="calls after the shift a detection may take")
    ap.add_argument("--alpha", type=float, default=0.05, help="family-wise level per test round")
    ap.add_argument("--scenarios", default="longer,ttft,length,control", help="comma-separated, of "
                    + ", ".join(SHIFTED))
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU measurement")
    ap.add_argument("--cpu-only", action="store_true", help="only the CPU measurement (no detection scenarios)")
    ap.add_argument("--cpu-runs", type=int, default=5, help="runs of each stage (previous, current) in the CPU "
                    "measurement, alternated")
    ap.add_argument("--cpu-events", type=int, default=200_000, help="events per CPU run (20 keys, batches of 2,000)")
    ap.add_argument("--change-points", action="store_true", help="also measure the change points: location "
                    "error on longer/ttft streams shifted at --shift-at + 13 (off the block grid), false alarms "
                    "of the scan on the control streams")
    a = ap.parse_args(argv)
    cfg = NumericDriftConfig(alpha=a.alpha)
    print(f"numeric drift: {a.seeds} streams x {a.events} calls per scenario, shift at {a.shift_at}, "
          f"reference {cfg.ref_size}, window {cfg.window_size}, test every {cfg.test_every}, alpha {cfg.alpha} "
          f"over 1 key x {len(cfg.fields)} fields (per test {cfg.alpha / len(cfg.fields):.4g})")
    t0 = time.perf_counter()
    for sc in ([] if a.cpu_only else a.scenarios.split(",")):
        st = scenario_stats(sc, range(a.seeds), n=a.events, shift_at=a.shift_at, max_delay=a.max_delay, cfg=cfg)
        print(f"  {sc:8s} {st}")
    if a.change_points and not a.cpu_only:
        cp = change_point_stats(range(a.seeds), n=a.events, shift_at=a.shift_at + 13, cfg=cfg)
        for k, st in cp.items():
            print(f"  change points {k:8s} {st}")
    print(f"  ({time.perf_counter() - t0:.1f} s)")
    if not a.no_cpu:
        print(f"  cpu per event on the stage's thread, previous (benchmarks/numeric_drift_v0.py) and current "
              f"stage alternated, {a.cpu_runs} runs each of {a.cpu_events:,} events:")
        cpu_compare(a.cpu_runs, a.cpu_events)
        v0 = _load_v0()
        print("  memory per key-field held (reference and window full, tested): previous "
              f"{memory_per_key_field(v0.NumericEngine, v0.NumericDriftConfig) / 1024:.1f} KiB, current "
              f"{memory_per_key_field(NumericEngine, NumericDriftConfig) / 1024:.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
