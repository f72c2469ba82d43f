"""A golden set as the drift reference, end to end: real broker, real worker, real chDB.

The embedding model is a deterministic stand-in (a text ``t<K> ...`` becomes topic ``K``'s
centre plus noise seeded by the text): what is under test is the golden set's path (signed
parts on the control topic, embedded once by the worker, stored, made the reference of an
existing key and of a key that appears later, reloaded after a restart without embedding
again), not the sentence model; the real model runs in test_drift_stream.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import zlib
from typing import Any

import numpy as np
import pytest
from helpers_worker import SESSION_MS, wait_for

from driftline.streams.app import serve_worker
from driftline.streams.cli.golden import golden_commands, send_golden
from driftline.streams.ingest.emitter import LLMEventEmitter
from driftline.streams.local.broker import free_port
from driftline.streams.stages.embedding import EmbeddingConfig
from driftline.streams.stages.semantic_drift import DriftConfig, DriftStage
from driftline.streams.stages.windows import WindowConfig
from driftline.streams.worker import WorkerConfig

pytestmark = [pytest.mark.integration]

SECRET = b"golden-test-control-secret-0123456789"
N_GOLDEN = 50
WINDOW = 30
SAME, SHIFTED = "gpt-4o", "gpt-4o-mini"  # two keys of app "chat": the golden set's topic mix, a shifted one
DIM = 16


class _TopicEncoder:
    """Text ``t<K> ...`` -> ``4 e_K`` + Gaussian noise (sd 0.5) seeded by the text (so the same text
    always has the same vector); records every text it encodes."""

    name, dim, max_chars, device = "topics", DIM, 1000, "cpu"

    def __init__(self) -> None:
        self.texts: list[str] = []

    def encode(self, texts: Any) -> np.ndarray:
        self.texts.extend(texts)
        out = []
        for t in texts:
            k = int(t.split()[0][1:])
            out.append(np.eye(DIM)[k] * 4 + np.random.default_rng(zlib.crc32(t.encode())).normal(scale=0.5, size=DIM))
        return np.asarray(out, np.float32)


async def _emit(bootstrap: str, topic: str, model: str, texts: list[str]) -> None:
    async with LLMEventEmitter(bootstrap, topic) as em:
        for t in texts:
            await em.send({"app": "chat", "request_model": model, "timestamp": int(time.time() * 1000),
                           "latency_ms": 100.0, "prompt": t})


@pytest.mark.timeout(120)
async def test_golden_set_is_the_reference_once_embedded_and_reloaded(kafka_bootstrap: str, make_topics: Any,
                                                                      chdb_dsn: str) -> None:
    """Loaded while key SAME has 5 samples and SHIFTED none: the worker embeds the 50 texts
    once, stores exactly 50 vector rows, SAME's reference becomes the set (mode golden, n 50)
    and SHIFTED gets it when it appears (not its first samples); a window like the set does
    not drift, a shifted one drifts by every method; a restarted worker reloads both
    references from ClickHouse and embeds no golden text again, and its tests agree.
    Catches: the set embedded per key or per restart, parts lost (nothing applied), new keys
    collecting their own reference, tests against the wrong reference after the restart."""
    t0 = time.monotonic()
    u = uuid.uuid4().hex[:8]
    topic, control = f"gs-{u}", f"gs-{u}.control"
    make_topics({topic: 1, f"{topic}.dlq": 1, control: 1})
    cfg = WorkerConfig(kafka=kafka_bootstrap, clickhouse=chdb_dsn, group_id=f"g-{u}", topics=(topic,),
                       dlq_topic=f"{topic}.dlq", window=WindowConfig(size_ms=60_000), max_event_age_s=1e10,
                       emit_interval_s=0.5, idle_close_s=1.0, session_timeout_ms=SESSION_MS, control_secret=SECRET)
    dcfg = DriftConfig(fields=("prompt",), sample_rate=1.0, ref_size=60, window_size=WINDOW, test_every=WINDOW,
                       test_interval_s=None, alpha=0.05, control_topic=control,
                       embedding=EmbeddingConfig(batch_size=64, max_delay_s=0.1))
    golden = [f"t{i % 2} golden text {i}" for i in range(N_GOLDEN)]

    def like(n: int, tag: str) -> list[str]:  # the golden set's topic mix, 50/50
        return [f"t{i % 2} {tag} {i}" for i in range(n)]

    def shifted(n: int, tag: str) -> list[str]:  # one of the two topics only
        return [f"t0 shifted {tag} {i}" for i in range(n)]

    async def run(encoder: _TopicEncoder, body: Any) -> DriftStage:
        stop, box, stages = asyncio.Event(), [], []

        def make(registry: Any) -> DriftStage:
            stages.append(DriftStage(dcfg, registry, encoder=encoder))
            return stages[0]

        task = asyncio.create_task(serve_worker(cfg, stop, web_port=free_port(), sql_port=None,
                                                on_ready=box.append, stages=[make]))
        try:
            await wait_for(lambda: bool(box) or task.done(), 45, lambda: "the worker never became ready")
            if task.done():
                task.result()
            await body(stages[0])
            assert await stages[0].drain(30)
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
        return stages[0]

    gid = ""

    async def first(st: DriftStage) -> None:
        nonlocal gid
        await _emit(kafka_bootstrap, topic, SAME, like(5, "early"))
        await wait_for(lambda: st.stored_embeddings >= 5, 20, lambda: f"embeddings {st.stored_embeddings}")
        cmds = golden_commands(golden, {"app": "chat", "field": "prompt"}, part_bytes=512, note="approved")
        assert len(cmds) >= 4  # several parts
        gid = await asyncio.to_thread(send_golden, kafka_bootstrap, cmds, control, secret=SECRET)
        await wait_for(lambda: st.controls_applied >= 1, 20, lambda: "the golden set was not applied")
        await _emit(kafka_bootstrap, topic, SAME, like(WINDOW, "a"))
        await _emit(kafka_bootstrap, topic, SHIFTED, shifted(WINDOW, "a"))
        await wait_for(lambda: st.stored_scores >= 6, 20, lambda: f"scores {st.stored_scores}")

    enc1 = _TopicEncoder()
    st1 = await run(enc1, first)
    assert st1.golden_embedded == N_GOLDEN and sum(t in golden for t in enc1.texts) == N_GOLDEN
    assert st1.engine is not None and st1.engine.references_made == 2 and st1.stored_scores == 6

    async def second(st: DriftStage) -> None:
        await _emit(kafka_bootstrap, topic, SAME, like(WINDOW, "b"))
        await _emit(kafka_bootstrap, topic, SHIFTED, shifted(WINDOW, "b"))
        await wait_for(lambda: st.stored_scores >= 6, 20, lambda: f"scores {st.stored_scores}")

    enc2 = _TopicEncoder()
    st2 = await run(enc2, second)
    assert st2.golden_embedded == 0 and not any("golden" in t for t in enc2.texts)  # never embedded again
    assert st2.engine is not None and st2.engine.goldens_read == 1  # one read of the set for both keys
    assert (st2.engine.references_loaded, st2.engine.references_made, st2.stored_scores) == (2, 0, 6)

    import clickhouse_connect

    from driftline.streams.cli.baseline import golden_keys, show_references, wait_applied

    c = clickhouse_connect.get_client(dsn=chdb_dsn)
    try:
        refs = c.query("SELECT model, version, mode, n, seq_from, seq_to, control_id, note, length(event_ids) "
                       "FROM driftline.drift_references ORDER BY model").result_rows
        vecs = c.query("SELECT idx, text, embedding FROM driftline.drift_golden FINAL "
                       "WHERE golden_id = {g:String} ORDER BY idx", parameters={"g": gid}).result_rows
        n_rows = c.query("SELECT count() FROM driftline.drift_golden").result_rows[0][0]
        log = c.query("SELECT action, n_references FROM driftline.drift_control_log "
                      "WHERE control_id = {g:String}", parameters={"g": gid}).result_rows
        scores = c.query("SELECT model, method, drifted, n_ref, n_cur, JSONExtractString(explanation, "
                         "'reference', 'mode') FROM driftline.drift_scores ORDER BY ts, model, method").result_rows
    finally:
        c.close()
    assert refs == [(SAME, 1, "golden", N_GOLDEN, 5, 5, gid, "approved", 0),
                    (SHIFTED, 1, "golden", N_GOLDEN, 0, 0, gid, "", 0)]
    assert n_rows == N_GOLDEN and [(r[0], r[1]) for r in vecs] == list(enumerate(golden))
    np.testing.assert_array_equal(np.asarray([r[2] for r in vecs], np.float32), _TopicEncoder().encode(golden))
    assert log == [("golden", 1)]  # applied once, to the one key that had samples then
    assert len(scores) == 12 and {s[3:] for s in scores} == {(N_GOLDEN, WINDOW, "golden")}
    for model, drifted in ((SAME, False), (SHIFTED, True)):
        assert [s[2] for s in scores if s[0] == model] == [drifted] * 6, (model, scores)
    shown = show_references(chdb_dsn, fmt="TabSeparated").decode().splitlines()
    assert [line.split("\t")[5:7] for line in shown] == [["golden", str(N_GOLDEN)]] * 2
    # what `driftline baseline load` waits for and prints
    assert wait_applied(chdb_dsn, gid, 5) == 1
    assert golden_keys(chdb_dsn, gid) == [("chat", SAME, "", "prompt"), ("chat", SHIFTED, "", "prompt")]
    print(f"\ngolden set test: {time.monotonic() - t0:.1f}s")
