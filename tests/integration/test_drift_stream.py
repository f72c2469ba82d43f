"""Semantic drift in the stream, end to end: real broker, real worker, real chDB, the real bundled
MiniLM model, real AlpacaEval prompts whose category mix shifts part-way.

Checked exactly: the sampled embeddings stored, the reference (the first ``ref_size`` samples),
the number of tests; then that nothing is flagged before the shift and drift is flagged soon after
it, that a restarted worker reloads the reference instead of building a new one, and that a
``baseline rebase`` command on the control topic makes a new reference.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from helpers_worker import SESSION_MS
from helpers_worker import wait_for as _wait_for

from driftline.streams.app import serve_worker
from driftline.streams.devdata.real_prompts import ensure_data
from driftline.streams.devdata.replay import AppSpec, DriftSpec, ReplayConfig, ReplayData, generate
from driftline.streams.ingest.bulk_producer import produce_records
from driftline.streams.local.broker import free_port
from driftline.streams.stages.embedding import EmbeddingConfig, load_encoder
from driftline.streams.stages.semantic_drift import DriftConfig, DriftStage, keep_event
from driftline.streams.stages.windows import WindowConfig
from driftline.streams.worker import Worker, WorkerConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_EVENTS = 960
DRIFT_AT = 0.5
PHASE1 = 440  # events before the restart
RATE = 0.75
REF = 150
WINDOW = 150
EVERY = 50
KEY = ("support-bot", "gpt-4o-mini-2024-07-18", "v1")




def _records() -> list[Any]:
    data = ReplayData.from_paths(ensure_data())
    cfg = ReplayConfig(
        n_events=N_EVENTS, seed=5, malformed_rate=0.0, late_rate=0.0, harmful_rate=0.0, error_rate=0.0,
        apps=(AppSpec("support-bot", ("gpt-4o-mini",), ("v1",)),), drift_at=DRIFT_AT,
        drift=DriftSpec(jailbreak_share=0.0, toxic_share=0.0, latency_model=None),  # mix shift only
    )
    recs = list(generate(cfg, data))
    assert all(r.valid for r in recs) and len(recs) == N_EVENTS
    return recs


async def _run_worker(cfg: WorkerConfig, dcfg: DriftConfig, encoder: Any, until: Callable[[Worker, DriftStage], bool],
                      timeout: float, then: Callable[[], Any] | None = None,
                      then_until: Callable[[DriftStage], bool] | None = None) -> tuple[Worker, DriftStage]:
    t0 = time.monotonic()
    stop = asyncio.Event()
    box: list[Worker] = []
    stages: list[DriftStage] = []

    def make(registry: Any) -> DriftStage:
        st = DriftStage(dcfg, registry, encoder=encoder)
        stages.append(st)
        return st

    task = asyncio.create_task(serve_worker(cfg, stop, web_port=free_port(), sql_port=None,
                                            on_ready=box.append, stages=[make]))
    try:
        await _wait_for(lambda: (bool(box) and box[0].started.is_set()) or task.done(), 60,
                        lambda: "worker never started")
        if task.done():
            task.result()
        w, st = box[0], stages[0]
        await _wait_for(lambda: until(w, st) or task.done(), timeout,
                        lambda: f"stored {w.stored_events}, embeddings {st.stored_embeddings}, "
                                f"queue {st.batcher.queue_depth if st.batcher else '-'}")
        assert not task.done()
        assert await st.drain(60)
        t1 = time.monotonic()
        if then is not None:
            await then()
            assert then_until is not None
            await _wait_for(lambda: then_until(st), 60, lambda: "the command was not applied")
            assert await st.drain(60)
    finally:
        stop.set()
        await asyncio.wait_for(task, 90)
    b = st.batcher
    print(f"\nworker: {t1 - t0:.1f}s to drain, {time.monotonic() - t1:.1f}s more to stop; "
          f"encoded {b.encoded if b else 0} in {b.encode_seconds if b else 0:.1f}s, {b.batches if b else 0} batches")
    return w, st


async def test_drift_stream_detects_shift_and_survives_restart(kafka_bootstrap: str, make_topics: Any,
                                                              chdb_dsn: str) -> None:
    t0 = time.monotonic()
    topic = f"d-{uuid.uuid4().hex[:10]}"
    control = f"{topic}.control"
    make_topics({topic: 1, f"{topic}.dlq": 1, control: 1})
    recs = _records()
    events = [r.event for r in recs]
    shift_ts = int(events[int(N_EVENTS * DRIFT_AT)]["timestamp"])
    assert all(r.drifted == (i >= int(N_EVENTS * DRIFT_AT)) for i, r in enumerate(recs))
    # ground truth: the samples, in stream order
    sampled = [e for e in events if keep_event(e["event_id"], RATE) and e.get("prompt")]
    sampled_p1 = [e for e in events[:PHASE1] if keep_event(e["event_id"], RATE) and e.get("prompt")]
    n_s, n_s1 = len(sampled), len(sampled_p1)
    assert REF + WINDOW < n_s1 < n_s

    def n_tests(n_samples: int) -> int:
        after = n_samples - REF
        return 0 if after < WINDOW else (after - WINDOW) // EVERY + 1

    wcfg = WorkerConfig(max_event_age_s=1e10, kafka=kafka_bootstrap, clickhouse=chdb_dsn, group_id=f"g-{uuid.uuid4().hex[:8]}",
                        topics=(topic,), dlq_topic=f"{topic}.dlq", window=WindowConfig(size_ms=60_000),
                        emit_interval_s=0.5, idle_close_s=1.0, session_timeout_ms=SESSION_MS)
    dcfg = DriftConfig(fields=("prompt",), sample_rate=RATE, ref_size=REF, window_size=WINDOW,
                       test_every=EVERY, test_interval_s=None, alpha=0.01, control_topic=control,
                       embedding=EmbeddingConfig(batch_size=32, max_delay_s=0.2, threads=2))

    # phase 1: reference + the first tests, all before the shift
    await produce_records(kafka_bootstrap, topic, [(r.key, r.value) for r in recs[:PHASE1]])
    # the real bundled model, loaded once for both workers (each worker gets a fresh stage and cache)
    encoder = await asyncio.to_thread(load_encoder, dcfg.embedding)
    w1, st1 = await _run_worker(wcfg, dcfg, encoder, lambda w, s: s.stored_embeddings >= n_s1, 120)
    assert w1.stored_events == PHASE1
    assert st1.stored_embeddings == n_s1
    assert st1.engine is not None and st1.engine.references_made == 1 and st1.engine.references_loaded == 0
    assert st1.stored_scores == 3 * n_tests(n_s1)
    assert st1.batcher is not None and st1.batcher.dropped == 0
    # identical prompts were embedded once
    assert st1.batcher.encoded == len({e["prompt"] for e in sampled_p1})

    # phase 2: a new worker on the same store reloads the reference and sees the shift
    await produce_records(kafka_bootstrap, topic, [(r.key, r.value) for r in recs[PHASE1:]])
    # then `driftline baseline rebase`: a command on the control topic that the running worker applies
    from driftline.streams.cli.baseline import send_command

    sent: list[str] = []

    async def rebase() -> None:
        sent.append(await asyncio.to_thread(send_command, kafka_bootstrap,
                                            {"action": "rebase", "app": KEY[0]}, control))

    w2, st2 = await _run_worker(wcfg, dcfg, encoder, lambda w, s: s.stored_embeddings >= n_s - n_s1, 120,
                                rebase, lambda s: s.controls_applied >= 1)
    assert w2.stored_events == N_EVENTS - PHASE1
    assert st2.engine is not None
    # reloaded, not rebuilt: the only reference it made is the rebase
    assert st2.engine.references_loaded == 1 and st2.engine.references_made == 1
    assert st2.stored_scores == 3 * (n_tests(n_s) - n_tests(n_s1))

    cid = sent[0]
    assert st2.controls_applied == 1

    import clickhouse_connect

    c = clickhouse_connect.get_client(dsn=chdb_dsn)
    try:
        emb = c.query("SELECT event_id, seq, length(embedding), round(L2Norm(embedding), 4) "
                      "FROM driftline.llm_embeddings FINAL ORDER BY seq").result_rows
        assert [r[0] for r in emb] == [e["event_id"] for e in sampled]
        assert [r[1] for r in emb] == list(range(n_s))
        assert {r[2] for r in emb} == {384} and {r[3] for r in emb} == {1.0}
        refs = c.query("SELECT version, mode, n, event_ids, seq_from, seq_to, control_id "
                       "FROM driftline.drift_references ORDER BY version").result_rows
        assert len(refs) == 2
        v1, v2 = refs
        assert v1[:3] == (1, "first_n", REF) and v1[3] == [e["event_id"] for e in sampled[:REF]]
        assert (v1[4], v1[5], v1[6]) == (0, REF, "")
        assert v2[:3] == (2, "rebase", REF) and v2[3] == [e["event_id"] for e in sampled[-REF:]]
        assert v2[6] == cid
        assert c.query("SELECT control_id, action, n_references FROM driftline.drift_control_log").result_rows \
            == [(cid, "rebase", 1)]
        scores = c.query(
            "SELECT toUnixTimestamp64Milli(ts), method, p_value, drifted, n_ref, n_cur, explanation "
            "FROM driftline.drift_scores ORDER BY ts, method").result_rows
        # a self-similarity query users can run
        near = c.query(
            "SELECT count() FROM driftline.llm_embeddings AS a, driftline.llm_embeddings AS b "
            "WHERE a.seq = 0 AND cosineDistance(a.embedding, b.embedding) < 1e-4").result_rows[0][0]
        assert near >= 1
    finally:
        c.close()
    assert len(scores) == 3 * n_tests(n_s)
    assert {(r[4], r[5]) for r in scores} == {(REF, WINDOW)}
    assert {r[1] for r in scores} == {"mmd", "topic_mix", "centroid_cosine"}
    before = [r for r in scores if r[0] < shift_ts]
    after = [r for r in scores if r[0] >= shift_ts]
    assert before and after
    assert not any(r[3] for r in before), [r[:4] for r in before if r[3]]
    # MMD flags every window made only of post-shift samples, and so at the latest
    # window_size + test_every samples after the shift
    first_post = next(i for i, e in enumerate(sampled) if e["timestamp"] >= shift_ts)
    full_post_ts = int(sampled[first_post + WINDOW - 1]["timestamp"])
    mmd_after = [r for r in after if r[1] == "mmd"]
    full = [r for r in mmd_after if r[0] >= full_post_ts]
    assert len(full) >= 2 and all(r[3] for r in full), [(r[0], r[2], r[3]) for r in mmd_after]
    first_flag = next(r for r in mmd_after if r[3])
    post = sum(1 for e in sampled if shift_ts <= e["timestamp"] <= first_flag[0])
    assert post <= WINDOW + EVERY, post
    delays = {}
    for m in ("mmd", "topic_mix", "centroid_cosine"):
        fl = [r for r in after if r[1] == m and r[3]]
        delays[m] = sum(1 for e in sampled if shift_ts <= e["timestamp"] <= fl[0][0]) if fl else None
    # the explanation of the last topic-mix test names the cluster that grew, with examples
    expl = json.loads([r for r in after if r[1] == "topic_mix"][-1][6])
    grown = next(c for c in expl["clusters"] if c["cluster"] == expl["grown"])
    assert grown["delta"] > 0.05 and grown["examples"] and grown["cur_examples"]
    assert expl["alpha_test"] == pytest.approx(0.01 / 3) and expl["reference"]["version"] == 1
    print("delays", delays, [(r[1], round(r[2], 5), r[3]) for r in after])
    print(f"\nsamples {n_s}, tests {len(scores)}, first MMD flag after {post} post-shift samples "
          f"(p={first_flag[2]:.4g}), total {time.monotonic() - t0:.1f}s")
