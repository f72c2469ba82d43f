"""Cost of the runaway rules in the alerting stage: per stored call, and per evaluation.

    python benchmarks/bench_runaway.py [--calls 20000] [--traces 3000] [--loops 5]

Feeds ``--calls`` calls (random 40-word prompts, 0.001 USD each) spread over ``--traces``
traces, ``--traces // 6`` conversations and 100 users to an
:class:`~driftline.streams.stages.rule_engine.AlertEvaluator` running the shipped default
rules (four of them runaway rules), ``--loops`` of the traces looping (one prompt 60
times), then evaluates it 20 times. Prints the time per call fed (the alerting stage does
this for every stored call, on the worker's event loop) and per evaluation (every
``--alert-interval``, 1 s by default), with the number of groups held and alerts firing.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from _machine import machine

from driftline.schemas.rules import load_rules
from driftline.streams.stages.rule_engine import AlertEvaluator, default_rules_path

T0 = 1_800_000_000_000
WORDS = ["alpha", "beta", "gamma", "delta", "refund", "billing", "ticket", "order", "flight", "hotel",
         "summarise", "please", "when", "why", "price", "cancel"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=20_000)
    ap.add_argument("--traces", type=int, default=3_000)
    ap.add_argument("--loops", type=int, default=5)
    a = ap.parse_args()
    rnd = random.Random(7)
    prompts = [" ".join(rnd.choice(WORDS) for _ in range(40)) for _ in range(5_000)]
    calls = []
    for i in range(a.calls):
        t = i % a.traces
        calls.append((T0 + i * 5, f"t{t}", f"c{t // 6}", f"u{t % 100}", prompts[i % len(prompts)]))
    for k in range(a.loops):  # looping traces: one prompt, 60 times
        calls += [(T0 + a.calls * 5 + j * 10, f"loop{k}", f"lc{k}", "u0", "retry 1: find a flight")
                  for j in range(60)]
    ev = AlertEvaluator(load_rules(default_rules_path()))
    t0 = time.perf_counter()
    for ts, tr, cv, u, p in calls:
        ev.observe_call(ts, "app", "gpt-4o", {"trace_id": tr, "conversation_id": cv, "user_id": u},
                        tokens=100, cost_usd=0.001, prompt=p)
    feed_s = time.perf_counter() - t0
    now = calls[-1][0]
    t0 = time.perf_counter()
    for k in range(20):
        ev.evaluate(now + k)
    eval_s = (time.perf_counter() - t0) / 20
    assert ev.traces is not None
    print(json.dumps({
        "calls": len(calls), "groups": len(ev.traces), "firing": len(ev.active_alerts()),
        "us_per_call": round(feed_s / len(calls) * 1e6, 1), "ms_per_evaluation": round(eval_s * 1e3, 2),
        "machine": machine()}, indent=2))


if __name__ == "__main__":
    main()
