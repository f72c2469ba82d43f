"""Pure logic of the drift stage: sampler, content-hash cache, embedding batcher, engine positions.

The batcher tests use a tiny deterministic fake encoder (the logic under test is the queue,
batching, dedup and ordering, not the model); the real model runs in
tests/integration/test_drift_stream.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from driftline.schemas.drift_result import DriftResult
from driftline.streams.stages.embedding import (
    EmbeddingBatcher,
    EmbeddingConfig,
    TextCache,
    text_hash,
)
from driftline.streams.stages.semantic_drift import (
    DriftConfig,
    DriftEngine,
    Sample,
    drifted_at,
    keep_event,
    make_detector,
    n_resamples,
    per_test_alpha,
    sample_mask,
)


class FakeEncoder:
    name = "fake"
    dim = 4
    max_chars = 20

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[list[str]] = []
        self.delay = delay

    def encode(self, texts: Any) -> np.ndarray:
        import time

        self.calls.append(list(texts))
        if self.delay:
            time.sleep(self.delay)
        return np.array([[len(t), t.count("a"), hash(t) % 7, 1.0] for t in texts], dtype=np.float32)


# --------------------------------------------------------------------------- sampler


def test_keep_event_rate_and_determinism() -> None:
    ids = [str(uuid.UUID(int=int(i) * 2654435761 + 12345)) for i in range(40_000)]
    kept = [keep_event(i, 0.25) for i in ids]
    share = sum(kept) / len(ids)
    assert abs(share - 0.25) < 4 * np.sqrt(0.25 * 0.75 / len(ids))  # 4 sigma
    assert kept == [keep_event(i, 0.25) for i in ids]  # same decision every time, every worker
    assert sample_mask(ids, 0.25).tolist() == kept  # the vectorised form used by the stage
    assert sample_mask(ids[:50], 0.25, salt=3).tolist() == [keep_event(i, 0.25, salt=3) for i in ids[:50]]
    assert all(keep_event(i, 1.0) for i in ids[:100])
    # uniform within each key: split the ids into 8 "keys"; each keeps ~25%
    for k in range(8):
        sub = kept[k::8]
        assert abs(sum(sub) / len(sub) - 0.25) < 4 * np.sqrt(0.25 * 0.75 / len(sub))
    # a salt gives an independent sample
    other = [keep_event(i, 0.25, salt=1) for i in ids]
    both = sum(a and b for a, b in zip(kept, other, strict=True)) / len(ids)
    assert abs(both - 0.0625) < 0.01


def test_alpha_and_resamples() -> None:
    assert per_test_alpha(0.05, 10, 2, 3) == pytest.approx(0.05 / 60)
    assert per_test_alpha(0.05, 0, 2, 3) == pytest.approx(0.05 / 6)
    assert n_resamples(0.05) == 256
    a = 0.01 / 3
    b = n_resamples(a)
    assert b == 1024 and 1 / (b + 1) < a / 3
    assert n_resamples(1e-6) == 8192


def test_stage_detectors_and_verdict_rule() -> None:
    dets = [make_detector(m, 512, seed=4, min_effect=0.2) for m in ("mmd", "topic_mix", "centroid_cosine")]
    assert [d.method for d in dets] == ["mmd", "topic_mix", "centroid_cosine"]
    assert dets[0].n_permutations == 512 and dets[2].n_permutations == 512
    assert dets[1].n_permutations == 1999 and dets[1].min_effect == 0.2  # Monte-Carlo G-test floor
    with pytest.raises(ValueError, match="method must be one of"):
        make_detector("classifier", 512)
    r = DriftResult("mmd", 0.1, 0.009, 0.05, False, 10, 10, {})
    assert drifted_at(r, 0.01) and not drifted_at(r, 0.009)  # strictly below the level
    assert not drifted_at(replace(r, p_value=None), 0.5)  # no p-value never alarms
    tm = replace(r, method="topic_mix", explanation={"total_variation": 0.15})
    assert drifted_at(tm, 0.01, min_effect=0.1) and not drifted_at(tm, 0.01, min_effect=0.2)


# --------------------------------------------------------------------------- cache


def test_text_cache_lru() -> None:
    c = TextCache(2)
    v = np.zeros(3, np.float32)
    c.put(1, v)
    c.put(2, v + 1)
    assert c.get(1) is not None  # 1 is now the most recent
    c.put(3, v + 3)  # evicts 2
    assert c.get(2) is None and c.get(3) is not None and len(c) == 2
    assert (c.hits, c.misses) == (2, 1)
    assert text_hash("abc") == text_hash("abc") != text_hash("abd")
    assert 0 <= text_hash("x") < 2**64


# --------------------------------------------------------------------------- batcher


async def test_batcher_batches_dedups_and_keeps_order() -> None:
    enc = FakeEncoder()
    got: list[tuple[list[int], np.ndarray]] = []
    b: EmbeddingBatcher[int] = EmbeddingBatcher(enc, lambda p, h, v: got.append((p, v)), batch_size=8,
                                                max_delay_s=10.0, max_queue=100)
    await b.start()
    texts = [f"text {i % 5}" for i in range(24)]  # 5 distinct texts, 24 items
    assert b.submit([(t, i) for i, t in enumerate(texts)]) == 24
    assert await b.drain(5)
    await b.stop()
    assert [len(p) for p, _ in got] == [8, 8, 8]  # flushed on size, long before the 10 s delay
    assert [i for p, _ in got for i in p] == list(range(24))  # submission order
    assert b.encoded == 5 and sum(len(c) for c in enc.calls) == 5  # each distinct text once
    vecs = np.concatenate([v for _, v in got])
    for i, t in enumerate(texts):
        assert vecs[i][0] == len(t)
    # batch 1 holds 5 distinct texts + 3 repeats (deduplicated in the batch); batches 2-3 are cache hits
    assert b.cache.hits == 16 and b.delivered == 24 and b.dropped == 0


async def test_batcher_flushes_on_delay() -> None:
    got: list[list[str]] = []
    b: EmbeddingBatcher[str] = EmbeddingBatcher(FakeEncoder(), lambda p, h, v: got.append(p), batch_size=64,
                                                max_delay_s=0.05, max_queue=128)
    await b.start()
    b.submit([("a", "x"), ("b", "y")])
    await asyncio.sleep(0.5)
    assert got == [["x", "y"]]
    await b.stop()


async def test_batcher_bounded_queue_drops_and_never_blocks() -> None:
    enc = FakeEncoder(delay=0.2)
    got: list[int] = []
    b: EmbeddingBatcher[int] = EmbeddingBatcher(enc, lambda p, h, v: got.extend(p), batch_size=8,
                                                max_delay_s=0.0, max_queue=16)
    await b.start()
    loop = asyncio.get_running_loop()
    t = loop.time()
    accepted = b.submit([(f"t{i}", i) for i in range(40)])
    assert loop.time() - t < 0.05  # returns at once
    assert accepted == 16 and b.dropped == 24 and b.queue_depth == 16
    assert await b.drain(5)
    await b.stop()
    assert got == list(range(16))


async def test_batcher_truncates_to_model_limit() -> None:
    enc = FakeEncoder()
    b: EmbeddingBatcher[int] = EmbeddingBatcher(enc, lambda p, h, v: None, batch_size=2, max_delay_s=0.0)
    await b.start()
    b.submit([("x" * 100, 0), ("x" * 20 + "tail", 1)])
    assert await b.drain(5)
    await b.stop()
    assert enc.calls == [["x" * 20]]  # both cut to max_chars: identical, embedded once


def test_embedding_config_validates() -> None:
    with pytest.raises(ValueError):
        EmbeddingConfig(batch_size=0)
    with pytest.raises(ValueError):
        EmbeddingConfig(batch_size=64, max_queue=10)
    with pytest.raises(ValueError):
        DriftConfig(sample_rate=0.0)
    with pytest.raises(ValueError):
        DriftConfig(fields=("tokens",))


# --------------------------------------------------------------------------- engine


def _engine(**kw: Any) -> DriftEngine:
    cfg = DriftConfig(fields=("prompt",), sample_rate=1.0, ref_size=40, window_size=30, test_every=10,
                      test_interval_s=None, alpha=0.05, control_topic=None, **kw)
    return DriftEngine(cfg, lambda sql, params: [], "driftline", "fake")  # an empty store: every key is new


def _feed(eng: DriftEngine, vecs: np.ndarray, start: int = 0) -> tuple[int, list[Any], list[Any]]:
    key = ("app", "m", "v1")
    samples = [Sample(key, "prompt", f"e{start + i}", 1_000 * (start + i), f"t{start + i}")
               for i in range(len(vecs))]
    emb, refs, results = eng.process(samples, [0] * len(vecs), vecs.astype(np.float32))
    assert emb["seq"] == list(range(start, start + len(vecs)))
    return len(emb["event_id"]), refs, results


def test_engine_reference_and_test_positions() -> None:
    rng = np.random.default_rng(0)
    eng = _engine()
    n, refs, results = _feed(eng, rng.normal(size=(39, 8)))
    assert n == 39 and not refs and not results
    n, refs, results = _feed(eng, rng.normal(size=(31, 8)), 39)
    assert len(refs) == 1 and refs[0]["n"] == 40 and refs[0]["mode"] == "first_n"
    assert (refs[0]["seq_from"], refs[0]["seq_to"]) == (0, 40)
    assert refs[0]["event_ids"] == [f"e{i}" for i in range(40)]
    # 30 samples after the reference: the window has just filled at seq 69, the first test
    assert [(s.event_id, r.method) for s, r in results] == [
        ("e69", "mmd"), ("e69", "topic_mix"), ("e69", "centroid_cosine")]
    n, refs, results = _feed(eng, rng.normal(size=(1, 8)), 70)
    # position 31 is not a test position (30, 40, 50, ...): nothing
    assert not results
    _, _, results = _feed(eng, rng.normal(size=(40, 8)), 71)
    # positions 40, 50, 60, 70 -> 4 tests x 3 methods
    assert len(results) == 12
    assert {r.method for _, r in results} == {"mmd", "topic_mix", "centroid_cosine"}
    assert all(r.n_ref == 40 and r.n_cur == 30 for _, r in results)
    assert all(r.threshold == pytest.approx(0.05 / 3) for _, r in results)
    assert [s.event_id for s, r in results if r.method == "mmd"] == ["e79", "e89", "e99", "e109"]


def test_engine_flags_a_shift_and_explains_it() -> None:
    rng = np.random.default_rng(1)
    centers = np.eye(8) * 4

    def mix(p: list[float], n: int) -> np.ndarray:
        lab = rng.choice(len(p), size=n, p=p)
        return centers[lab] + rng.normal(size=(n, 8))

    eng = _engine()
    _feed(eng, mix([0.5, 0.5], 40))
    _, _, same = _feed(eng, mix([0.5, 0.5], 30), 40)
    _, _, shifted = _feed(eng, mix([0.05, 0.95], 30), 70)
    assert same and shifted
    assert not any(r.drifted for _, r in same)
    by = {r.method: r for _, r in shifted}
    assert by["mmd"].drifted and by["topic_mix"].drifted
    expl = by["topic_mix"].explanation
    assert expl["alpha_test"] == pytest.approx(0.05 / 3) and expl["reference"]["version"] == 1
    grown = next(c for c in expl["clusters"] if c["cluster"] == expl["grown"])
    assert grown["delta"] > 0.2 and grown["examples"] and grown["cur_examples"]
    assert Counter(r.method for _, r in shifted)["mmd"] == 3  # positions 40, 50, 60


@pytest.mark.parametrize(("mode", "stored"), [("none", [11, 22]), ("pii", [0, 0]), ("hash", [0, 0])])
def test_text_hash_is_not_stored_under_redaction(mode: str, stored: list[int]) -> None:
    """Under --redact pii/hash the llm_embeddings.text_hash column is 0: an unkeyed 64-bit hash
    of a short prompt could be guessed back. Mutation caught: storing ``h`` whatever the mode."""
    from driftline.detectors.redact import Redaction

    eng = _engine()
    eng.redaction = Redaction(mode)  # type: ignore[arg-type]
    key = ("app", "m", "v1")
    samples = [Sample(key, "prompt", f"e{i}", 1_000 * i, f"t{i}") for i in range(2)]
    emb, _, _ = eng.process(samples, [11, 22], np.ones((2, 4), np.float32))
    assert emb["text_hash"] == stored
