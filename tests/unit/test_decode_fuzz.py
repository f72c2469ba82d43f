"""Fuzz the decode path in CI: structure-aware events and OTLP requests from hypothesis,
plus the raw byte mutations of ``benchmarks/fuzz_decode.py`` (which runs 10^5-10^6 of
them), through ``decode_batch`` on both paths and ``to_columns``.

Per batch (``fuzz_decode.check_batch``): nothing raises; every JSON record is one event
or one Rejected with a non-empty reason; an OTLP request gives at most one Rejected;
the columnar and exact paths give the same events and reasons.

Mutations caught (checked): without the ``le=MAX_TOKENS`` bound on token counts,
to_columns raises OverflowError on a count >= 2^63 (23 of 3,000 inputs); without the
depth limit, RecursionError; a path that drops or duplicates a record fails the
one-outcome assertion.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import driftline.streams.ingest.transforms as _pl

_spec = importlib.util.spec_from_file_location(
    "fuzz_decode", Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz_decode.py")
assert _spec is not None and _spec.loader is not None
fz = importlib.util.module_from_spec(_spec)
sys.modules["fuzz_decode"] = fz
_spec.loader.exec_module(fz)

ints = st.one_of(st.integers(-5, 5000), st.sampled_from(fz.HOSTILE_INTS), st.integers())
floats = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(fz.HOSTILE_FLOATS))
labels = st.one_of(st.sampled_from(["chat", "gpt-4o", "v1"]), st.text(max_size=300),
                   st.sampled_from(["x" * 257, "y" * 100_000]))
nested = st.recursive(st.one_of(st.none(), st.integers(), st.text(max_size=5)),
                      lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=3), c,
                                                                                     max_size=3)),
                      max_leaves=20)
event = st.fixed_dictionaries(
    {"app": labels, "timestamp": st.one_of(st.sampled_from(fz.TIMESTAMPS), ints),
     "latency_ms": st.one_of(floats, ints)},
    optional={"event_id": st.one_of(st.text(max_size=140), st.none()), "request_model": labels,
              "response_model": labels, "user_id": labels, "trace_id": labels, "prompt_version": labels,
              **{k: st.one_of(ints, st.none(), floats) for k in fz.TOKEN_KEYS},
              "ttft_ms": floats, "status": st.sampled_from(["ok", "error", "x"]),
              "feedback": st.sampled_from([-1, 0, 1, 2]),
              "finish_reasons": st.lists(labels, max_size=2),
              "guardrails": st.lists(st.fixed_dictionaries(
                  {"name": labels, "verdict": st.sampled_from(["pass", "flagged", "blocked", "no"])},
                  optional={"score": floats}), max_size=2),
              "team": nested, "extra": st.dictionaries(st.text(max_size=3), nested, max_size=2)})


def _json(d: dict[str, Any]) -> bytes:
    return json.dumps(d, separators=(",", ":")).encode()


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_pl, "_FAST_MIN", 1)  # the columnar path on every batch
    monkeypatch.setattr(_pl, "_CHUNK_MIN", 2)  # bisect down to the bad records


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.data_too_large])
@given(st.lists(event, min_size=1, max_size=12), st.integers(0, 2**32), st.integers(0, 2))
def test_structured_and_mutated_events_each_end_in_one_place(evs: list[dict[str, Any]], seed: int,
                                                             n_otlp: int) -> None:
    r = random.Random(seed)
    raws: list[bytes | None] = [_json(d) for d in evs]
    raws += [fz.mutate(r, _json(d), _json(evs[0])) for d in evs]  # one mutant of each
    recs = [_pl.MemoryRecord(fz.EVENTS, 0, i, None, v) for i, v in enumerate(raws)]
    for j in range(n_otlp):
        value, ctype = fz.gen_otlp(r)
        recs.append(_pl.MemoryRecord(fz.OTLP, 0, len(recs), None, value if j == 0 else fz.mutate(r, value, value),
                           (("content-type", ctype),)))
    fz.check_batch(recs)


def test_seeded_generator_batches() -> None:
    """3,000 inputs from the benchmark's seeded generator (a different seed from its
    default run), ~3 s."""
    res = fz.run(3000, seed=7, batch=96, chunk_min=2)
    assert res["crashes"] == 0, res["first"]
    assert res["inputs"] == 3000
