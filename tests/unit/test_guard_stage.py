"""The semantic guard in the drift stage (streams/stages/guard_scan.py): every embedded text is
scanned on the drift thread, its verdicts go to ``guard_results`` and ``/metrics``, and each
key's flagged share is tested against its reference share (``drift_scores``, method
``guard_<category>``), which the default rule JailbreakAttemptsRising reads.

A deterministic stand-in encoder (texts named ``jb-*`` / ``harm-*`` / ``tox-*`` point at the
attack references, others at the benign one) and a 4-dimensional guard; the real model and
references are exercised by benchmarks/bench_semantic_guard.py and tests/unit/test_semantic_guard.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from driftline.detectors.semantic_guard import GuardState, ReferenceSet, SemanticGuard
from driftline.schemas.rules import DriftObservation, load_rules
from driftline.streams.sinks.write_step import StoredBatch
from driftline.streams.stages.embedding import EmbeddingConfig
from driftline.streams.stages.guard_scan import GuardScan, load_guard, scanner_version
from driftline.streams.stages.semantic_drift import DriftConfig, DriftStage, Sample

E = np.eye(4, dtype=np.float32)


def tiny_guard() -> SemanticGuard:
    """jailbreak near e0, harmful requests near e3, toxic near e2, benign (both fields) e1."""
    jb2 = (E[0] + E[3]) / np.sqrt(2)
    return SemanticGuard(GuardState(
        references=(ReferenceSet("jailbreak", np.stack([E[0], jb2]), ("jailbreak:3", "jailbreak:9")),
                    ReferenceSet("harmful_request", E[3:4], ("donotanswer:x:1",)),
                    ReferenceSet("toxic", E[2:3], ("rtp:t:2",))),
        benign={"prompt": ReferenceSet("benign", E[1:2], ("alpaca:0",)),
                "response": ReferenceSet("benign", E[1:2], ("alpaca_output:0",))},
        thresholds={"jailbreak": 0.5, "harmful_request": 0.5, "toxic": 0.5}))


def stand_in_vec(text: str) -> np.ndarray:
    """Unit vector: the attack direction of the text's prefix, tilted a little by its number."""
    base = {"jb": 0, "harm": 3, "tox": 2}.get(text.split("-")[0], 1)
    n = int(text.rsplit("-", 1)[-1]) if text.rsplit("-", 1)[-1].isdigit() else 0
    v = E[base] + 0.01 * (n % 5) * E[(base + 1) % 4]
    return (v / np.linalg.norm(v)).astype(np.float32)


class StandInEncoder:
    name, dim, max_chars = "stand-in", 4, 200

    def encode(self, texts: Any) -> np.ndarray:
        return np.stack([stand_in_vec(t) for t in texts])


def fisher_greater(k_cur: int, n_cur: int, k_ref: int, n_ref: int) -> float:
    """P(X >= k_cur), X hypergeometric: the one-sided Fisher exact p-value, by hand."""
    n, k = n_cur + n_ref, k_cur + k_ref
    return sum(math.comb(k, x) * math.comb(n - k, n_cur - x)
               for x in range(k_cur, min(k, n_cur) + 1)) / math.comb(n, n_cur)


CFG = DriftConfig(fields=("prompt", "response"), sample_rate=1.0, ref_size=10, window_size=10, test_every=5,
                  test_interval_s=None, alpha=0.05, methods=("centroid_cosine",), control_topic=None,
                  embedding=EmbeddingConfig(batch_size=512, max_delay_s=0.05))


def _texts(i: int, app: str) -> tuple[str, str]:
    """app A: 6 of events 10..19 are jailbreak-like prompts, event 12 answers toxically; B: benign."""
    if app == "A" and 10 <= i <= 15:
        return f"jb-{i}", ("tox-12" if i == 12 else f"ok-{i}")
    return f"benign-{app}-{i}", f"ok-{app}-{i}"


def test_guard_scan_counts_and_share_test_exact() -> None:
    """GuardScan alone: exact verdict counts and the share test at the drift tests' position.
    Mutations caught: a two-sided or reversed test (p of 6/10 vs 0/10 would double or be ~1),
    testing before min_current samples past the reference, the reference share counted from the
    window, the wrong alpha split, the attack text (not its id) in the explanation."""
    gs = GuardScan(tiny_guard(), CFG)
    key = ("A", "m", "v1")
    samples, vecs = [], []
    for i in range(20):
        p, r = _texts(i, "A")
        samples += [Sample(key, "prompt", f"e{i}", 1000 * i, p), Sample(key, "response", f"e{i}", 1000 * i, r)]
        vecs += [stand_in_vec(p), stand_in_vec(r)]
    cols, results, scanned, flagged = gs.process(samples[:38], np.stack(vecs[:38]), n_keys=3)
    assert results == []  # 9 texts after the reference: the first test needs 10
    assert len(cols["event_id"]) == 19 * 2 + 19  # prompts: 2 categories, responses: 1
    assert scanned[("A", "m", "prompt", "jailbreak")] == 19 and flagged[("A", "m", "prompt", "jailbreak")] == 6
    assert flagged[("A", "m", "response", "toxic")] == 1 and flagged[("A", "m", "prompt", "harmful_request")] == 0
    cols, results, _s, _f = gs.process(samples[38:], np.stack(vecs[38:]), n_keys=3)
    got = {(s.field, r.method): r for s, r in results}
    assert sorted(got) == [("prompt", "guard_harmful_request"), ("prompt", "guard_jailbreak"),
                           ("response", "guard_toxic")]
    jb = got[("prompt", "guard_jailbreak")]
    a_test = 0.05 / (3 * 2 * 1)
    assert (jb.statistic, jb.n_ref, jb.n_cur, jb.threshold) == (0.6, 10, 10, a_test)
    assert jb.p_value == pytest.approx(fisher_greater(6, 10, 0, 10), rel=1e-12)  # 0.00542
    assert jb.drifted is True
    e = jb.explanation
    assert e["category"] == "jailbreak" and (e["flagged"], e["reference_flagged"]) == (6, 0)
    assert e["nearest_attacks"] == [{"id": "jailbreak:3", "flagged": 6, "max_similarity": 1.0}]
    assert e["flagged_event_ids"] == [f"e{i}" for i in range(10, 16)]
    assert e["window"] == {"n": 10, "from_ms": 10_000, "to_ms": 19_000} and e["reference"]["n"] == 10
    tox = got[("response", "guard_toxic")]
    assert tox.p_value == pytest.approx(0.5) and tox.drifted is False and tox.statistic == 0.1
    assert got[("prompt", "guard_harmful_request")].p_value == 1.0
    assert "jb-" not in json.dumps([r.explanation for r in got.values()])


def test_a_guard_that_cannot_be_built_is_off_with_the_reason_never_a_crash(tmp_path: Path) -> None:
    """An examples file that turned non-UTF-8 after the CLI's check raised UnicodeDecodeError out
    of load_guard: under ``auto`` the drift stage's start (so the worker) failed. Now: no guard
    and why. Mutation caught: catching only ExampleError and OSError again."""
    from driftline.streams.devdata.real_prompts import ensure_data

    data = tmp_path / "data"
    data.mkdir()
    for f in ensure_data().root.iterdir():
        if f.is_file():
            shutil.copy(f, data / f.name)
    guard, _why = load_guard(StandInEncoder(), build=True, data_dir=data)
    assert guard is not None
    bad = tmp_path / "mine.jsonl"
    bad.write_bytes(b'{"id": "a", "category": "jailbreak", "text": "\xff\xfe"}\n')
    guard, why = load_guard(StandInEncoder(), data_dir=data, examples=bad)
    assert guard is None and why.startswith("its references could not be built: UnicodeDecodeError")


def test_share_state_is_capped_at_max_keys_between_batches_only() -> None:
    """Per-key share state is bounded by the drift engine's ``max_keys`` (it grew with every
    key-field ever seen): after each batch the least recently scanned are dropped (counted),
    never within a batch (a key dropped and seen again there would be reloaded without the
    batch's verdicts, written after it). Mutations caught: no cap (3 states held), evicting
    inside the batch (A and B restart their reference: 2 tests instead of 6), dropping the
    most recent instead of the least."""
    cfg = dataclasses.replace(CFG, fields=("prompt",), max_keys=2)
    keys = [("A", "m", "v1"), ("B", "m", "v1"), ("C", "m", "v1")]
    samples = [Sample(k, "prompt", f"{k[0]}{i}", 1000 * i, f"jb-{i}" if i >= 15 else f"benign-{i}")
               for i in range(20) for k in keys]
    vecs = np.stack([stand_in_vec(s.text) for s in samples])
    capped, whole = GuardScan(tiny_guard(), cfg), GuardScan(tiny_guard(), dataclasses.replace(cfg, max_keys=500))
    got = [(s.event_id, r.method, r.p_value) for s, r in capped.process(samples, vecs, n_keys=3)[1]]
    assert got == [(s.event_id, r.method, r.p_value) for s, r in whole.process(samples, vecs, n_keys=3)[1]]
    assert len(got) == 6  # 3 keys x 2 categories at position 10
    assert sorted(capped.state) == [(keys[1], "prompt"), (keys[2], "prompt")] and capped.evicted == 1
    more = [Sample(keys[0], "prompt", "A99", 99_000, "benign-99")]
    capped.process(more, np.stack([stand_in_vec("benign-99")]), n_keys=3)
    assert sorted(capped.state) == [(keys[0], "prompt"), (keys[2], "prompt")] and capped.evicted == 2
    assert capped.state[(keys[0], "prompt")].n == 1  # no store: a dropped key comes back empty


class _Tables:
    database = "driftline"

    def __init__(self) -> None:
        self.columns: dict[str, list[dict[str, list[Any]]]] = {}
        self.rows: dict[str, list[dict[str, Any]]] = {}

    def query(self, sql: str, params: Any = None) -> list[Any]:
        return []  # an empty store: every key is new

    async def aquery(self, sql: str, params: Any = None) -> list[Any]:
        return []

    async def insert_columns(self, table: str, columns: dict[str, list[Any]]) -> None:
        self.columns.setdefault(table, []).append(columns)

    async def insert_rows(self, table: str, rows: Any, columns: Any, **kw: Any) -> None:
        self.rows.setdefault(table, []).extend(rows)


async def test_stage_scans_every_embedded_text_and_writes_exact_rows() -> None:
    """The stage path: on_stored -> batcher (stand-in encoder) -> drift thread -> guard_results,
    drift_scores, /metrics counters and the observers (alerting). Key A's jailbreak share rises
    (6 of 10 after a clean reference), key B stays benign. Mutations caught: scanning only the
    prompts (no toxic rows), not writing guard_results, guard results not in drift_scores or not
    handed to observers, counters not incremented per category."""
    from driftline.streams.ports import StagePorts

    reg = CollectorRegistry()
    tables = _Tables()
    st = DriftStage(CFG, reg, encoder=StandInEncoder(), guard=tiny_guard())
    seen: list[DriftObservation] = []
    st.add_observer(seen.append)
    await st.start(dataclasses.replace(StagePorts.detached(), tables=tables))  # type: ignore[arg-type]
    try:
        assert st.guard is not None and st.guard.fields == ("prompt", "response")
        ev: dict[str, list[Any]] = {c: [] for c in ("event_id", "app", "model", "prompt_version", "timestamp",
                                                    "prompt", "response")}
        for app in ("A", "B"):
            for i in range(20):
                p, r = _texts(i, app)
                for c, v in zip(ev, (f"{app}{i}", app, "m", "v1", 1000 * i, p, r), strict=True):
                    ev[c].append(v)
        st.on_stored(StoredBatch(ev, [], []))
        assert await st.drain(30)
    finally:
        await st.stop()
    guard = {c: [v for part in tables.columns["guard_results"] for v in part[c]]
             for c in tables.columns["guard_results"][0]}
    assert len(guard["event_id"]) == 40 * 3 == st.stored_guard_results
    assert sorted(set(guard["event_id"])) == sorted(ev["event_id"])
    flagged = sorted((e, f, c, n) for e, f, c, n, fl in zip(guard["event_id"], guard["field"], guard["category"],
                                                            guard["nearest_id"], guard["flagged"], strict=True) if fl)
    assert flagged == sorted([(f"A{i}", "prompt", "jailbreak", "jailbreak:3") for i in range(10, 16)]
                             + [("A12", "response", "toxic", "rtp:t:2")])
    assert set(guard["scanner"]) == {scanner_version(tiny_guard())}
    scores = [r for r in tables.rows["drift_scores"] if r["method"].startswith("guard_")]
    rows = sorted((r["app"], r["field"], r["method"], r["statistic"], r["drifted"]) for r in scores)
    assert rows == [("A", "prompt", "guard_harmful_request", 0.0, 0), ("A", "prompt", "guard_jailbreak", 0.6, 1),
                    ("A", "response", "guard_toxic", 0.1, 0),
                    ("B", "prompt", "guard_harmful_request", 0.0, 0), ("B", "prompt", "guard_jailbreak", 0.0, 0),
                    ("B", "response", "guard_toxic", 0.0, 0)]
    jb = next(r for r in scores if r["app"] == "A" and r["method"] == "guard_jailbreak")
    assert jb["p_value"] == pytest.approx(fisher_greater(6, 10, 0, 10), rel=1e-12)
    assert json.loads(jb["explanation"])["family"] == {"keys": 2, "fields": 2, "methods": 1}
    assert jb["threshold"] == 0.05 / 4
    obs = [o for o in seen if o.method == "guard_jailbreak"]
    assert [(o.app, o.field, o.drifted) for o in sorted(obs, key=lambda o: o.app)] == [
        ("A", "prompt", True), ("B", "prompt", False)]

    def metric(name: str, app: str, field: str, cat: str) -> float | None:
        return reg.get_sample_value(f"driftline_semantic_guard_{name}_total",
                                    {"app": app, "model": "m", "field": field, "category": cat})

    assert metric("scanned", "A", "prompt", "jailbreak") == 20 and metric("flagged", "A", "prompt", "jailbreak") == 6
    assert metric("scanned", "B", "response", "toxic") == 20 and metric("flagged", "A", "response", "toxic") == 1
    assert metric("flagged", "B", "prompt", "jailbreak") is None  # nothing flagged: no series


def test_default_rule_reads_the_jailbreak_share_and_prompt_drift_does_not() -> None:
    """JailbreakAttemptsRising (default rules) matches method guard_jailbreak; PromptDrift and
    ResponseDrift keep to the semantic methods (else one jailbreak wave fires three alerts).
    Mutations caught: the rule missing or matching another method; PromptDrift's method glob
    dropped."""
    from driftline.streams.stages.rule_engine import default_rules_path

    rules = {r.name: r for r in load_rules(default_rules_path())}
    jb = rules["JailbreakAttemptsRising"]
    assert jb.kind == "drift"
    lab = {"app": "a", "model": "m", "prompt_version": "", "field": "prompt"}
    assert jb.matches({**lab, "method": "guard_jailbreak"})
    assert not jb.matches({**lab, "method": "guard_harmful_request"}) and not jb.matches({**lab, "method": "mmd"})
    for m in ("mmd", "topic_mix", "centroid_cosine"):
        assert rules["PromptDrift"].matches({**lab, "method": m})
    assert not rules["PromptDrift"].matches({**lab, "method": "guard_jailbreak"})
    assert not rules["ResponseDrift"].matches({**lab, "field": "response", "method": "guard_toxic"})


def test_without_a_guard_the_stage_runs_and_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No data: load_guard says where it looked; data without the reference cache: it does not
    embed 2,000 texts at start (only with build=True) and names the flag. Mutations caught: a
    download attempt, or an implicit build, at start."""
    from driftline.streams.devdata.real_prompts import ensure_data

    guard, why = load_guard(StandInEncoder(), data_dir=tmp_path / "none")
    assert guard is None and "no real data at" in why and "never downloads" in why
    src = ensure_data().root
    data = tmp_path / "data"
    data.mkdir()
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, data / f.name)

    class Counting(StandInEncoder):
        calls = 0

        def encode(self, texts: Any) -> np.ndarray:
            Counting.calls += 1
            return super().encode(texts)

    guard, why = load_guard(Counting(), data_dir=data)
    assert guard is None and "--semantic-guard build" in why and Counting.calls == 0
    assert not (data / "guard").exists()
    # a stage with a stand-in encoder and no guard: off, logged
    st = DriftStage(CFG, None, encoder=StandInEncoder())
    with caplog.at_level("INFO", logger="driftline.drift"):
        asyncio.run(st._start_guard())
    assert st.guard is None and "given an encoder but no guard" in caplog.text
    with pytest.raises(ValueError, match="semantic_guard must be auto, build or off"):
        DriftConfig(semantic_guard="on")


def test_worker_refuses_a_bad_attack_examples_file_before_starting(tmp_path: Path) -> None:
    """``driftline worker --guard-examples``: a file with a bad line exits 2 naming the line
    (nothing started: the Kafka address is a closed port); a file of comments only, too.
    Catches: a worker that starts and silently ignores the user's examples."""
    from typer.testing import CliRunner

    from driftline.streams.cli.main import app

    bad = tmp_path / "mine.jsonl"
    bad.write_text('{"id": "a", "category": "jailbreak", "text": "pretend"}\n'
                   '{"id": "b", "category": "spam", "text": "x"}\n')
    res = CliRunner().invoke(app, ["worker", "--kafka", "127.0.0.1:1", "--guard-examples", str(bad)])
    assert res.exit_code == 2, res.output
    assert f"{bad}:2: unknown category 'spam'" in res.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("# nothing yet\n")
    res = CliRunner().invoke(app, ["worker", "--kafka", "127.0.0.1:1", "--guard-examples", str(empty)])
    assert res.exit_code == 2 and "holds no example" in res.output


def test_share_state_is_reloaded_exactly_from_guard_results_after_a_restart(tmp_path: Path) -> None:
    """A worker scans key A's first 17 prompts (reference 10, 7 past it: no test yet), stores
    llm_embeddings and guard_results in chDB, and stops; a new GuardScan (the restart) reads the
    key's share state back and scans the rest. Its share tests equal, result for result
    (position, statistic, p-value, explanation), those of a scan that never stopped. Mutations
    caught: no reload (a new reference from the next 10 texts: no test at all in 13 more), the
    reference taken from the last texts instead of the first, the window not restored (n_cur,
    share), ordering by anything but the drift stage's numbering, verdicts of another scanner
    version counted."""
    from datetime import UTC, datetime

    from driftline.schemas.columns import EMBEDDING_COLUMNS, GUARD_COLUMNS
    from driftline.streams.sinks.clickhouse import ClickHouseSink
    from driftline.streams.stages.drift_references import DriftEngine

    cfg = dataclasses.replace(CFG, fields=("prompt",))
    key = ("A", "m", "v1")
    # reference clean except one, then a rising share: 0..9 ref (jb at 4), 10..29 mixed
    texts = [f"jb-{i}" if i == 4 or (i >= 10 and i % 3 == 0) or i in (11, 22, 28) else f"benign-{i}"
             for i in range(30)]
    samples = [Sample(key, "prompt", f"e{i:02d}", 1000 * i, t) for i, t in enumerate(texts)]
    vecs = np.stack([stand_in_vec(t) for t in texts])

    def key_of(rs: list[tuple[Sample, Any]]) -> list[tuple[str, str, float, float, int, int, str]]:
        return [(s.event_id, r.method, r.statistic, r.p_value, r.n_ref, r.n_cur,
                 json.dumps(r.explanation, sort_keys=True)) for s, r in rs]

    whole = GuardScan(tiny_guard(), cfg)
    want = key_of(whole.process(samples, vecs, n_keys=1)[1])
    assert [w[0] for w in want] == ["e19", "e19", "e24", "e24", "e29", "e29"]
    sink = ClickHouseSink(f"chdb://{tmp_path / 'chdb'}")
    try:
        sink.ensure_schema()
        # an earlier event with a verdict of another scanner version: not comparable, not counted
        sink.call(lambda c: c.insert("driftline.llm_embeddings", [
            ["old", datetime(1970, 1, 1, tzinfo=UTC), "A", "m", "v1", "prompt", 0, "stand-in", 0,
             stand_in_vec("jb-0").tolist()]], column_names=list(EMBEDDING_COLUMNS)))
        sink.call(lambda c: c.insert("driftline.guard_results", [
            ["old", datetime(1970, 1, 1, tzinfo=UTC), "A", "m", "v1", "prompt", "jailbreak", 1.0, 1.0,
             "jailbreak:3", 1, "semantic_guard:000000000000"]], column_names=list(GUARD_COLUMNS)))

        def run(gs: GuardScan, eng: DriftEngine, part: slice) -> list[tuple[Sample, Any]]:
            emb, _refs, _res = eng.process(samples[part], [0] * len(samples[part]), vecs[part])
            cols, res, _s, _f = gs.process(samples[part], vecs[part], n_keys=1)
            asyncio.run(sink.insert_columns("llm_embeddings", emb))
            asyncio.run(sink.insert_columns("guard_results", cols))
            return res

        eng = DriftEngine(cfg, sink.query_rows, "driftline", "stand-in")
        first = GuardScan(tiny_guard(), cfg, sink.query_rows, "driftline")
        assert run(first, eng, slice(0, 17)) == [] and first.reloaded == 0  # nothing stored yet
        eng2 = DriftEngine(cfg, sink.query_rows, "driftline", "stand-in")  # the restart: both reload
        again = GuardScan(tiny_guard(), cfg, sink.query_rows, "driftline")
        got = key_of(run(again, eng2, slice(17, 30)))
        assert again.reloaded == 1
        assert got == want
        # without the store: the restart re-baselines (the mutation this test is for)
        fresh = GuardScan(tiny_guard(), cfg)
        assert fresh.process(samples[17:], vecs[17:], n_keys=1)[1] == []
    finally:
        sink.close()


def test_an_evicted_key_comes_back_from_guard_results_with_the_same_tests(tmp_path: Path) -> None:
    """max_keys 1 and two keys alternating batch by batch on chDB: each batch evicts the other
    key, which is read back from guard_results when it comes again; the share tests equal,
    result for result, those of a scan that held both keys. Mutations caught: an eviction whose
    reload re-baselines or loses the window (e.g. no store to read: no test at all), the cap
    not applied (len(state) 2)."""
    from driftline.streams.sinks.clickhouse import ClickHouseSink
    from driftline.streams.stages.drift_references import DriftEngine

    cfg = dataclasses.replace(CFG, fields=("prompt",), max_keys=1)
    keys = [("A", "m", "v1"), ("B", "m", "v1")]
    texts = [f"jb-{i}" if i >= 14 and i % 2 else f"benign-{i}" for i in range(30)]
    batches = [[Sample(k, "prompt", f"{k[0]}{i:02d}", 1000 * i, texts[i]) for i in range(j, j + 6)]
               for j in range(0, 30, 6) for k in keys]

    def key_of(rs: list[tuple[Sample, Any]]) -> list[tuple[str, str, float, float, int, int]]:
        return [(s.event_id, r.method, r.statistic, r.p_value, r.n_ref, r.n_cur) for s, r in rs]

    whole = GuardScan(tiny_guard(), dataclasses.replace(cfg, max_keys=500))
    want = [x for b in batches for x in key_of(whole.process(b, np.stack([stand_in_vec(s.text) for s in b]),
                                                             n_keys=2)[1])]
    assert len(want) == 2 * 2 * 3  # 2 keys x 2 categories x the tests at positions 10, 15, 20
    sink = ClickHouseSink(f"chdb://{tmp_path / 'chdb'}")
    try:
        sink.ensure_schema()
        eng = DriftEngine(dataclasses.replace(cfg, max_keys=500), sink.query_rows, "driftline", "stand-in")
        gs = GuardScan(tiny_guard(), cfg, sink.query_rows, "driftline")
        got = []
        for b in batches:
            vecs = np.stack([stand_in_vec(s.text) for s in b])
            emb, _refs, _res = eng.process(b, [0] * len(b), vecs)
            cols, res, _s, _f = gs.process(b, vecs, n_keys=2)
            asyncio.run(sink.insert_columns("llm_embeddings", emb))
            asyncio.run(sink.insert_columns("guard_results", cols))
            got += key_of(res)
            assert len(gs.state) == 1
        assert got == want and gs.evicted == len(batches) - 1 and gs.reloaded == len(batches) - 2
    finally:
        sink.close()


def test_topic_mix_names_the_grown_attack_cluster() -> None:
    """The drift engine's topic-mix explanation names a grown cluster whose current texts the
    guard mostly flags ("jailbreak-like: 7 of 7 flagged"), and only such a cluster: on a key
    whose window turns to jailbreak-like prompts (7 of 10, against 2 of 10 in the reference)
    the grown cluster is the jailbreak one; a grown cluster with 2 of 5 flagged and a shrunk
    one with all flagged stay unnamed (hand-made explanation). Mutations caught: the hook not
    called, labelling any grown cluster, counting the reference instead of the window, a
    minority counted as "mostly", naming shrunk clusters."""
    from driftline.streams.stages.drift_references import DriftEngine
    from driftline.streams.stages.guard_scan import label_attack_clusters

    cfg = dataclasses.replace(CFG, fields=("prompt",), methods=("topic_mix",))
    key = ("A", "m", "v1")
    texts = [f"jb-{i}" if i in (3, 7) else f"benign-{i}" for i in range(10)]
    texts += [f"jb-{i}" if i % 10 < 7 else f"benign-{i}" for i in range(10, 20)]
    samples = [Sample(key, "prompt", f"e{i:02d}", 1000 * i, t) for i, t in enumerate(texts)]
    vecs = np.stack([stand_in_vec(t) for t in texts])
    for hooked in (True, False):
        eng = DriftEngine(cfg, lambda sql, params: [], "driftline", "stand-in")
        if hooked:
            eng.cluster_labeler = GuardScan(tiny_guard(), cfg).label_clusters
        _emb, _refs, results = eng.process(samples, [0] * 20, vecs)
        (s, r), = results
        e = r.explanation
        if not hooked:
            assert "attack_clusters" not in e and "grown_label" not in e
            continue
        (det,) = eng.state[(key, "prompt")].detectors.values()  # the key's fitted topic-mix detector
        jb_cluster = {int(c) for c in det.detector.assign(vecs[10:17])}
        assert len(jb_cluster) == 1 and e["grown"] in jb_cluster  # the 7 jailbreaks form the grown cluster
        grown = next(c for c in e["clusters"] if c["cluster"] == e["grown"])
        assert (grown["cur_count"], grown["guard_flagged"]) == (7, {"jailbreak": 7, "harmful_request": 0})
        assert e["grown_label"] == grown["label"] == "jailbreak-like: 7 of 7 flagged"
        assert e["attack_clusters"] == [{"cluster": e["grown"], "label": "jailbreak-like: 7 of 7 flagged",
                                         "delta": grown["delta"]}]
        assert all("label" not in c for c in e["clusters"] if c["cluster"] != e["grown"])
    # by hand: cluster 0 grew with 2 of 5 flagged (not mostly), cluster 1 shrank with 2 of 2 flagged
    x = np.stack([stand_in_vec(t) for t in ("jb-1", "jb-2", "ok-1", "ok-2", "ok-3", "jb-3", "jb-4")])
    expl: dict[str, Any] = {"grown": 0, "clusters": [
        {"cluster": 0, "delta": 0.3, "cur_count": 5}, {"cluster": 1, "delta": -0.3, "cur_count": 2}]}
    label_attack_clusters(tiny_guard(), "prompt", x, np.array([0, 0, 0, 0, 0, 1, 1]), expl)
    assert expl["attack_clusters"] == [] and "grown_label" not in expl
    assert expl["clusters"][0]["guard_flagged"] == {"jailbreak": 2, "harmful_request": 0}
    assert "label" not in expl["clusters"][0] and "guard_flagged" not in expl["clusters"][1]
