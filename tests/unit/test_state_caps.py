"""The drift engine's per key-field state is capped (2-3 MB each in production): exact counts."""

from __future__ import annotations

import numpy as np
import pytest

from driftline.streams.stages.semantic_drift import DriftConfig, DriftEngine, Sample


def test_drift_engine_keeps_max_keys_key_fields_and_reloads_an_evicted_one() -> None:
    # 7 keys in, cap 3: exactly 3 held (the most recently sampled), 4 evicted and counted; an
    # evicted key sampled again is reloaded from the store (2 queries: its seq, its reference;
    # plus, once, the baseline commands applied, for a golden set new keys get).
    # Mutation caught: without the eviction loop in DriftEngine.get the engine holds 7.
    queries: list[str] = []

    def query(sql: str, params: object) -> list[tuple[object, ...]]:
        queries.append(sql)
        return []

    cfg = DriftConfig(fields=("prompt",), sample_rate=1.0, ref_size=40, window_size=30, test_every=10,
                      test_interval_s=None, control_topic=None, max_keys=3)
    eng = DriftEngine(cfg, query, "driftline", "fake")
    keys = [(f"rnd-{i}", "m", "") for i in range(7)]
    samples = [Sample(k, "prompt", f"e{i}", 1_000 * i, "t") for i, k in enumerate(keys)]
    eng.process(samples, [0] * 7, np.zeros((7, 8), np.float32))
    assert [k for k, _f in eng.state] == keys[4:]
    assert eng.evicted == 4 and len(queries) == 15
    eng.process([Sample(keys[0], "prompt", "e7", 7_000, "t")], [0], np.zeros((1, 8), np.float32))
    assert [k for k, _f in eng.state] == [keys[5], keys[6], keys[0]]
    assert eng.evicted == 5 and len(queries) == 17


def test_drift_max_keys_is_validated() -> None:
    with pytest.raises(ValueError, match="max_keys"):
        DriftConfig(max_keys=0)
