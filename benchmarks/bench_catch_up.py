"""Alert catch-up cost: how long the alerting stage takes to evaluate a lag window by window.

    python benchmarks/bench_catch_up.py [--keys 100] [--hours 24] [--budget 0.2]

Feeds ``--keys`` app keys with one final window per minute over ``--hours`` of event time
to an :class:`~driftline.streams.stages.alerting.AlertingStage` running the shipped default
rules, all at once (as after a restart or a replay), and ticks it until it has caught up.
Prints the total evaluation time, the number of ticks (each at most ``--budget`` seconds
on past boundaries, then the next one) and the longest tick: the time the worker's event
loop is held at most.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from driftline.schemas.rules import load_rules
from driftline.schemas.window_stats import WindowStats
from driftline.streams.ports import StagePorts
from driftline.streams.stages.alerting import AlertingStage
from driftline.streams.stages.rule_engine import default_rules_path
from driftline.streams.stages.windows import WindowAggregator, WindowConfig
from driftline.streams.worker import StoredBatch

T0 = 1_767_225_600_000
MIN = 60_000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=100)
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--budget", type=float, default=0.2)
    a = ap.parse_args()
    minutes = int(a.hours * 60)
    wins = [WindowStats(T0 + m * MIN, T0 + (m + 1) * MIN, f"a{k}", "m", "", 60, 0, 0, 100.0, 200.0,
                        300.0, 400.0, None, None, None, None, None, 10, 10, 0, 0, 0, 0.01, 0, 60, 0,
                        0, 0, 0, 0.01, True)
            for k in range(a.keys) for m in range(minutes)]
    clock = {"ms": T0}
    st = AlertingStage(load_rules(default_rules_path()), write_alerts=False, live_windows=False,
                       clock=lambda: clock["ms"], catch_up_budget_s=a.budget)
    st._ports = StagePorts.detached(windows=WindowAggregator(WindowConfig(size_ms=MIN)))  # what start() sets
    st.tick()
    clock["ms"] = T0 + minutes * MIN
    apps = [f"a{k}" for k in range(a.keys)]
    st.on_stored(StoredBatch({"app": apps, "model": ["m"] * a.keys,
                              "timestamp": np.full(a.keys, clock["ms"] - 1)}, wins, []))
    t0 = time.perf_counter()
    ticks, worst, transitions = 0, 0.0, 0
    while True:
        s = time.perf_counter()
        transitions += len(st.tick())
        worst = max(worst, time.perf_counter() - s)
        ticks += 1
        if not st.catching_up:
            break
    total = time.perf_counter() - t0
    print(f"{a.keys} keys x {minutes} boundaries, default rules: {total:.1f} s in {ticks} ticks, "
          f"longest tick {worst:.2f} s, {total / minutes * 1000:.1f} ms per boundary, "
          f"{transitions} transitions")


if __name__ == "__main__":
    main()
