"""Seeded event streams over the real prompt pool, with a shift at a known index.

A stream is an array of pool row indices (one per event). Each event draws a
source from the mix in force at that event, then a prompt uniformly from that
source (with replacement). Layout of every stream::

    [0, n_ref)            reference: the first n_ref events (pre-shift mix)
    [n_ref, t0)           n_cur more pre-shift events, so no test window overlaps the reference
    [t0, t0 + horizon)    the shifted regime (the control has no shift)

Tests run every ``k`` events on the sliding window ``[e - n_cur, e)``; the
scenario's tests are at ``e = t0 + k, t0 + 2k, ...``. The target source of the
mix shifts rotates over the five AlpacaEval sources with the seed.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

ALPACA = ("helpful_base", "koala", "oasst", "selfinstruct", "vicuna")
JAILBREAK = "jailbreak"

MixFn = Callable[[np.ndarray], np.ndarray]  # event offsets from t0 -> (n, n_sources) probs


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    # mix(offset_from_t0 array, target) -> probabilities over SOURCES for each event
    mix: Callable[[np.ndarray, int], np.ndarray]
    full_offset: int  # events after t0 at which the window is fully in the final regime
    shifted: bool = True


SOURCES = (*ALPACA, JAILBREAK)


def _vec(alpaca: dict[int, float] | None = None, jail: float = 0.0, rest: float | None = None) -> np.ndarray:
    p = np.zeros(len(SOURCES))
    alpaca = alpaca or {}
    free = [i for i in range(len(ALPACA)) if i not in alpaca]
    left = 1.0 - jail - sum(alpaca.values())
    for i, v in alpaca.items():
        p[i] = v
    for i in free:
        p[i] = left / len(free) if rest is None else rest
    p[len(ALPACA)] = jail
    return p / p.sum()


def _const(before: Callable[[int], np.ndarray], after: Callable[[int], np.ndarray]):
    def mix(off: np.ndarray, target: int) -> np.ndarray:
        b, a = before(target), after(target)
        return np.where((off >= 0)[:, None], a[None, :], b[None, :])
    return mix


def _ramp(before: Callable[[int], np.ndarray], after: Callable[[int], np.ndarray], length: int):
    def mix(off: np.ndarray, target: int) -> np.ndarray:
        w = np.clip((off + 1) / length, 0.0, 1.0)[:, None]
        return (1 - w) * before(target)[None, :] + w * after(target)[None, :]
    return mix


def uniform(_t: int) -> np.ndarray:
    return _vec()


def make_scenarios(n_cur: int, ramp: int = 1000) -> dict[str, Scenario]:
    u = uniform
    eighty = lambda t: _vec({t: 0.80})  # noqa: E731
    forty = lambda t: _vec({t: 0.40})  # noqa: E731
    jail5 = lambda t: _vec(jail=0.05)  # noqa: E731
    jail30 = lambda t: _vec(jail=0.30)  # noqa: E731
    return {
        "control": Scenario("control", "no drift: uniform AlpacaEval mix throughout", _const(u, u), 0, shifted=False),
        "abrupt": Scenario("abrupt", "uniform -> 80% one source at t0", _const(u, eighty), n_cur),
        "gradual": Scenario("gradual", f"uniform -> 80% one source, linear over {ramp} events", _ramp(u, eighty, ramp), ramp + n_cur),
        "moderate": Scenario("moderate", "one source 20% -> 40% (others 15%) at t0", _const(u, forty), n_cur),
        "adversarial": Scenario("adversarial", "jailbreak share 5% -> 30% (rest uniform AlpacaEval) at t0", _const(jail5, jail30), n_cur),
    }


@dataclass
class Run:
    scenario: str
    seed: int
    target: str
    stream: np.ndarray  # int64 pool indices
    t0: int
    tests: list[int]  # window end indices e (window = stream[e - n_cur : e])
    full_test: int | None  # e of the first fully shifted window (power there)
    early_stop: bool
    meta: dict = field(default_factory=dict)


def make_stream(scn: Scenario, seed: int, target: int, by_source: list[np.ndarray],
                n_ref: int, n_cur: int, horizon: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng([seed, 0x5EED, zlib.crc32(scn.name.encode())])
    t0 = n_ref + n_cur
    total = t0 + horizon
    off = np.arange(total) - t0
    probs = scn.mix(off, target)
    cum = np.cumsum(probs, axis=1)
    u = rng.random(total)[:, None]
    src = np.minimum((u > cum).sum(axis=1), len(SOURCES) - 1)
    stream = np.empty(total, dtype=np.int64)
    for s in range(len(SOURCES)):
        where = np.flatnonzero(src == s)
        if where.size:
            stream[where] = by_source[s][rng.integers(0, by_source[s].size, where.size)]
    return stream, t0


def build_runs(pool_sources: np.ndarray, *, n_ref: int, n_cur: int, k: int, horizon: int,
               seeds: int, control_seeds: int, control_tests: int, base_seed: int,
               scenarios: list[str]) -> list[Run]:
    by_source = [np.flatnonzero(pool_sources == s) for s in SOURCES]
    scns = make_scenarios(n_cur)
    runs: list[Run] = []
    for name in scenarios:
        scn = scns[name]
        if not scn.shifted:
            for i in range(control_seeds):
                seed = base_seed * 1000 + i
                stream, t0 = make_stream(scn, seed, 0, by_source, n_ref, n_cur, control_tests * k)
                tests = [t0 + k * j for j in range(1, control_tests + 1)]
                runs.append(Run(name, seed, "-", stream, t0, tests, None, False))
            continue
        for i in range(seeds):
            seed = base_seed * 1000 + 100 + i
            target = i % len(ALPACA)
            h = max(horizon, scn.full_offset)
            stream, t0 = make_stream(scn, seed, target, by_source, n_ref, n_cur, h)
            tests = [t0 + k * j for j in range(1, h // k + 1)]
            full = t0 + scn.full_offset
            if full not in tests:
                tests = sorted({*tests, full})
            tgt = JAILBREAK if name == "adversarial" else ALPACA[target]
            runs.append(Run(name, seed, tgt, stream, t0, tests, full, True))
    return runs
