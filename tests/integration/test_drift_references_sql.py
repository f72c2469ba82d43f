"""The drift engine's SQL on real chDB: keys with quotes and backslashes round-trip exactly.

Every value the engine sends (key, field, event ids, seq, time range, limit) is a bound
``{name:Type}`` parameter (streams/stages/drift_references.py), never quoted by hand.
No worker, no Kafka: the engine, the stage's TableWriter and an embedded ClickHouse.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np

from driftline.streams.ports import TableWriter
from driftline.streams.sinks.clickhouse import ClickHouseSink
from driftline.streams.stages.drift_references import DriftEngine
from driftline.streams.stages.semantic_drift import (
    REFERENCE_COLUMNS,
    DriftConfig,
    DriftStage,
    Sample,
)

#: a key made to break hand-rolled quoting: quote, backslash, both in a row, a double quote
KEY = ("a'b\\c", 'gpt"4\\\'', "v\\'1")
#: differs from KEY only where a quoting bug would confuse them (one backslash more)
DECOY = ("a'b\\\\c", 'gpt"4\\\'', "v\\'1")
N, REF, WINDOW = 25, 10, 10


def _samples(key: tuple[str, str, str], tag: str) -> list[Sample]:
    return [Sample(key, "prompt", f"{tag}'{i}\\", 1_700_000_000_000 + 1_000 * i, f"text {tag} {i} '\\")
            for i in range(N)]


async def _store(w: TableWriter, eng: DriftEngine, samples: list[Sample]) -> None:
    """What the drift stage writes for ``samples``: their events (with the texts), embeddings, references."""
    vecs = np.random.default_rng(len(samples[0].key[0])).normal(size=(len(samples), 8)).astype(np.float32)
    emb, refs, _ = eng.process(samples, [0] * len(samples), vecs)
    await w.insert_columns("llm_events", {
        "event_id": [s.event_id for s in samples], "app": [s.key[0] for s in samples],
        "model": [s.key[1] for s in samples], "prompt_version": [s.key[2] for s in samples],
        "timestamp": [dt.datetime.fromtimestamp(s.ts_ms / 1000, tz=dt.UTC) for s in samples],
        "prompt": [s.text for s in samples]})
    await w.insert_columns("llm_embeddings", emb)
    await w.insert_rows("drift_references", refs, REFERENCE_COLUMNS)


async def test_a_key_with_quotes_and_backslashes_round_trips(chdb_dsn: str) -> None:
    # Mutations caught: the key's WHERE built by string formatting (f"app = '{a}'": a syntax
    # error, or no rows), or quoting that drops the backslash escape (the DECOY's rows then
    # match KEY, or KEY's none): the reloaded reference, seq, window and the matching keys below
    # are exact.
    sink = ClickHouseSink(chdb_dsn)
    try:
        sink.ensure_schema()
        w = TableWriter(sink, (*DriftStage.tables, "llm_events"))
        cfg = DriftConfig(fields=("prompt",), sample_rate=1.0, ref_size=REF, window_size=WINDOW, test_every=5,
                          test_interval_s=None, control_topic=None)
        first = DriftEngine(cfg, w.query, sink.database, "fake")
        key_samples, decoy_samples = _samples(KEY, "k"), _samples(DECOY, "d")
        await _store(w, first, key_samples)
        await _store(w, first, decoy_samples[:REF + 3])  # a reference and 3 samples after it

        # a restarted worker: a fresh engine loads the key from the store
        eng = DriftEngine(cfg, w.query, sink.database, "fake")
        kf = eng.get(KEY, "prompt")
        assert eng.references_loaded == 1 and kf.ref is not None
        assert kf.ref.event_ids == [s.event_id for s in key_samples[:REF]]
        assert kf.ref.texts == [s.text for s in key_samples[:REF]]  # the texts, read from llm_events
        assert (kf.ref.version, kf.ref.mode, kf.ref.seq_from, kf.ref.seq_to) == (1, "first_n", 0, REF)
        assert kf.seq == N
        assert [r.event_id for r in kf.cur] == [s.event_id for s in key_samples[N - WINDOW:]]
        assert [r.seq for r in kf.cur] == list(range(N - WINDOW, N))
        decoy = eng.get(DECOY, "prompt")
        assert decoy.seq == REF + 3 and len(decoy.cur) == 3

        # a baseline command for exactly this app: the key, not the decoy; a range of 12 samples
        assert eng.matching({"app": KEY[0]}) == [(KEY, "prompt")]
        assert eng.matching({"app": KEY[0], "model": KEY[1], "prompt_version": KEY[2]}) == [(KEY, "prompt")]
        lo, hi = key_samples[5].ts_ms, key_samples[17].ts_ms
        (pin,) = eng.apply({"action": "pin", "app": KEY[0], "from_ms": lo, "to_ms": hi}, "c'1\\")
        assert (pin["n"], pin["mode"], pin["version"], pin["control_id"]) == (REF, "pinned", 2, "c'1\\")
        assert pin["event_ids"] == [key_samples[i].event_id for i in np.linspace(5, 16, REF).round().astype(int)]
        rows: list[Any] = await w.aquery(
            "SELECT app, model, prompt_version, count() FROM {db:Identifier}.llm_embeddings FINAL "
            "WHERE app = {app:String} GROUP BY app, model, prompt_version", {"db": sink.database, "app": KEY[0]})
        assert rows == [(*KEY, N)]
    finally:
        sink.close()
