"""Golden sets (``driftline baseline load``): the file's parsing and checks, the commands it
becomes (parts under the Kafka record limit), and the drift engine's golden references on
seeded vectors. The real broker, worker and chDB run in tests/integration/test_golden_set.py.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from driftline.streams.cli.golden import (
    MAX_TEXT_CHARS,
    MAX_TEXTS,
    GoldenFileError,
    golden_commands,
    parse_golden,
    texts_digest,
)
from driftline.streams.stages.drift_references import GoldenSet, golden_subset
from driftline.streams.stages.semantic_drift import DriftConfig, DriftEngine, Sample

# --------------------------------------------------------------------------- the file


def test_parse_accepts_text_or_the_field_and_skips_blank_lines() -> None:
    lines = ['{"text": "how do I reset my password?"}\n', "\n", '{"prompt": "cancel my order", "id": 7}\n',
             b'{"text": "caf\xc3\xa9 hours"}\n', "   \n", '{"text": "how do I reset my password?"}']
    assert parse_golden(lines, "prompt") == ["how do I reset my password?", "cancel my order", "café hours",
                                             "how do I reset my password?"]  # duplicates kept: they weigh
    assert parse_golden(['{"response": "Sure, here it is."}'], "response") == ["Sure, here it is."]


def test_parse_reports_every_bad_line_by_number() -> None:
    """Each check has its exact message and the right line number; nothing is returned when
    one line is bad. Catches a check removed, a line number off by one (blank lines count)."""
    long = "x" * (MAX_TEXT_CHARS + 1)
    lines = [
        '{"text": "fine"}',                 # 1
        "not json",                         # 2
        "",                                 # 3 (blank: skipped, still counted)
        '["text"]',                         # 4
        '{"response": "wrong field"}',      # 5
        '{"text": 42}',                     # 6
        '{"prompt": "   "}',                # 7
        json.dumps({"text": long}),         # 8
        '{"text": "a", "prompt": "b"}',     # 9
        b'{"text": "\xff"}',                # 10
        '{"other": 1}',                     # 11
        "[" * 100_000,                      # 12
    ]
    with pytest.raises(GoldenFileError) as ei:
        parse_golden(lines, "prompt")
    assert ei.value.errors == [
        "line 2: not JSON (Expecting value at column 1)",
        "line 4: expected a JSON object, got list",
        'line 5: no "text" or "prompt" (it has "response": is --field response meant?)',
        'line 6: "text" is int, expected a string',
        'line 7: "prompt" is empty',
        f'line 8: "text" has {MAX_TEXT_CHARS + 1:,} characters, over the cap of {MAX_TEXT_CHARS:,}',
        'line 9: both "text" and "prompt"; keep one',
        "line 10: not UTF-8 (byte 11)",
        'line 11: no "text" or "prompt"',
        ei.value.errors[9],
    ]
    assert ei.value.errors[9].startswith("line 12: not JSON (")
    assert str(ei.value).splitlines()[0] == "line 2: not JSON (Expecting value at column 1)"


def test_parse_caps_the_count_and_lists_at_most_20_errors() -> None:
    ok = [json.dumps({"text": f"t{i}"}) for i in range(MAX_TEXTS)]
    assert len(parse_golden(ok, "prompt")) == MAX_TEXTS  # exactly at the cap: fine
    with pytest.raises(GoldenFileError) as ei:
        parse_golden([*ok, "", '{"text": "one too many"}'], "prompt")
    assert ei.value.errors == [f"line {MAX_TEXTS + 2}: more than {MAX_TEXTS:,} texts (the cap of a golden set)"]
    with pytest.raises(GoldenFileError) as ei:
        parse_golden(["nope"] * 25, "prompt")
    assert len(ei.value.errors) == 25
    shown = str(ei.value).splitlines()
    assert len(shown) == 21 and shown[19].startswith("line 20: ") and shown[20] == "... and 5 more bad line(s)"
    for empty, msg in (([], "no texts (empty file)"), (["", " \n"], "no texts (2 line(s), all blank)")):
        with pytest.raises(GoldenFileError) as ei:
            parse_golden(empty, "prompt")
        assert ei.value.errors == [msg]
    with pytest.raises(ValueError, match="field must be 'prompt' or 'response'"):
        parse_golden(['{"text": "x"}'], "tokens")


def test_commands_are_parts_under_the_limit_then_the_golden_command() -> None:
    """The texts cut into parts of at most ``part_bytes`` of JSON, in order, every text once;
    the golden command last, with the count, digest and filters (None filters left out).
    Catches: a part over the limit (Kafka refuses records over 1 MiB), a text lost or
    repeated at a part boundary, the golden command before its parts."""
    texts = [f"text number {i} " + "é" * (i % 50) for i in range(400)]
    cmds = golden_commands(texts, {"app": "chat", "model": None, "field": "prompt"}, golden_id="g1",
                           part_bytes=4096, sent_at_ms=5)
    parts, final = cmds[:-1], cmds[-1]
    assert len(parts) > 3
    assert all(len(json.dumps(p["texts"], ensure_ascii=False).encode()) <= 4096 for p in parts)
    assert [t for p in parts for t in p["texts"]] == texts
    assert [(p["action"], p["id"], p["golden_id"], p["i"], p["n"]) for p in parts] == [
        ("golden_part", f"g1.{i}", "g1", i, len(parts)) for i in range(len(parts))]
    assert final == {"cmd": "baseline", "action": "golden", "id": "g1", "sent_at_ms": 5, "golden_id": "g1",
                     "n_parts": len(parts), "n_texts": 400, "sha256": texts_digest(texts), "app": "chat",
                     "field": "prompt", "note": ""}
    # a text larger than a part goes alone into its own part (never split, never dropped)
    big = golden_commands(["a" * 5000, "b", "c"], {}, golden_id="g2", part_bytes=4096)
    assert [p["texts"] for p in big[:-1]] == [["a" * 5000], ["b", "c"]]
    # a full-size set at the default part size: every record well under 1 MiB
    full = golden_commands(["x" * MAX_TEXT_CHARS] * 200, {"field": "prompt"}, golden_id="g3")
    assert max(len(json.dumps(c).encode()) for c in full) < 600 * 1024


# --------------------------------------------------------------------------- the engine

KEY = ("app", "m", "v1")
CENTERS = np.eye(8) * 4


def _mix(rng: np.random.Generator, p: list[float], n: int) -> np.ndarray:
    lab = rng.choice(len(p), size=n, p=p)
    return (CENTERS[lab] + rng.normal(size=(n, 8))).astype(np.float32)


class _Store:
    """A ClickHouse stand-in for the engine's reads (pure logic under test): answers the
    control log and golden table queries from lists, everything else with no rows."""

    def __init__(self) -> None:
        self.control: list[tuple[str, str]] = []
        self.golden: dict[str, list[tuple[int, str, list[float]]]] = {}
        self.golden_reads = 0

    def __call__(self, sql: str, params: Any) -> list[tuple[Any, ...]]:
        if "drift_control_log" in sql:
            return list(self.control)
        if "drift_golden" in sql:
            self.golden_reads += 1
            return list(self.golden.get(params["gid"], []))
        return []


def _engine(store: Any, ref_size: int = 40) -> DriftEngine:
    cfg = DriftConfig(fields=("prompt",), sample_rate=1.0, ref_size=ref_size, window_size=30, test_every=10,
                      test_interval_s=None, alpha=0.05, control_topic=None)
    return DriftEngine(cfg, store, "driftline", "fake")


def _feed(eng: DriftEngine, vecs: np.ndarray, start: int, key: tuple[str, str, str] = KEY) -> tuple[Any, Any]:
    samples = [Sample(key, "prompt", f"e{start + i}", 1_000 * (start + i), f"cur {start + i}")
               for i in range(len(vecs))]
    _, refs, results = eng.process(samples, [0] * len(vecs), vecs)
    return refs, results


def test_engine_golden_reference_replaces_first_n_and_tests_against_it() -> None:
    """A key with an automatic reference gets the golden set (mode golden, n of the set, the
    control id = golden id, its tests counted from the next sample); windows like the set do
    not drift, shifted ones do, and the topic-mix explanation quotes golden texts as the
    reference side. Applying the same set again changes nothing (another worker, a retry).
    Catches: tests still against the first-n reference, positions not restarted at the
    golden load, a second reference row for the same set."""
    rng = np.random.default_rng(3)
    eng = _engine(_Store())
    refs, _ = _feed(eng, _mix(rng, [0.05, 0.05, 0.9], 45), 0)  # first_n reference of a different mix
    assert [r["mode"] for r in refs] == ["first_n"]
    gvec = _mix(rng, [0.5, 0.5], 40)
    gs = GoldenSet("g1", gvec, [f"golden {i}" for i in range(40)])
    cmd = {"action": "golden", "app": "app", "field": "prompt", "note": "approved set"}
    rows = eng.apply_golden(cmd, gs)
    assert len(rows) == 1
    r = rows[0]
    assert (r["mode"], r["version"], r["n"], r["control_id"], r["event_ids"], r["note"]) == (
        "golden", 2, 40, "g1", [], "approved set")
    assert (r["seq_from"], r["seq_to"]) == (45, 45)
    assert eng.apply_golden(cmd, gs) == []  # idempotent
    assert eng.apply_golden({**cmd, "app": "other"}, gs) == []  # filters: no other key
    _, same = _feed(eng, _mix(rng, [0.5, 0.5], 30), 45)
    assert [s.event_id for s, res in same if res.method == "mmd"] == ["e74"]  # 30 after the golden load
    assert not any(res.drifted for _, res in same)
    _, shifted = _feed(eng, _mix(rng, [0.05, 0.95], 30), 75)
    by = {res.method: res for _, res in shifted}
    assert by["mmd"].drifted and by["topic_mix"].drifted
    ref = by["topic_mix"].explanation["reference"]
    assert ref == {"version": 2, "mode": "golden", "n": 40, "golden_id": "g1", "n_tested": 40,
                   "seq_from": 45, "seq_to": 45}
    examples = [e for c in by["topic_mix"].explanation["clusters"] for e in c["examples"]]
    assert examples and all(e.startswith("golden ") for e in examples)
    # reset afterwards drops it like any reference: the next samples make a new one
    (reset,) = eng.apply({"action": "reset", "app": "app"}, "r1")
    assert (reset["mode"], reset["version"], reset["seq_from"]) == ("reset", 3, 105)
    assert eng.state[(KEY, "prompt")].ref is None
    refs, _ = _feed(eng, _mix(rng, [0.5, 0.5], 40), 105)
    assert [(r["mode"], r["version"], r["seq_from"]) for r in refs] == [("first_n", 4, 105)]


def test_engine_golden_set_larger_than_ref_size_is_tested_on_an_even_subset() -> None:
    assert golden_subset(10, 40).tolist() == list(range(10))
    assert golden_subset(100, 5).tolist() == [0, 25, 50, 74, 99]
    eng = _engine(_Store(), ref_size=40)
    _feed(eng, _mix(np.random.default_rng(0), [1.0], 3), 0)
    gs = GoldenSet("big", np.arange(1000 * 8, dtype=np.float32).reshape(1000, 8), [str(i) for i in range(1000)])
    (row,) = eng.apply_golden({"field": "prompt"}, gs)
    kf = eng.state[(KEY, "prompt")]
    assert row["n"] == 1000 and kf.ref is not None and kf.ref.emb.shape == (40, 8)
    assert kf.ref.texts == [str(i) for i in golden_subset(1000, 40)]


def test_engine_new_key_gets_the_golden_set_of_the_latest_matching_command() -> None:
    """A key first seen after a golden load whose filters match it gets the golden reference
    (read from drift_golden, not embedded) at seq 0 instead of collecting its first samples;
    a later reset matching it, or a non-matching filter, means no golden set.
    Catches: new keys ignoring golden loads, a reset after the load not honoured."""
    store = _Store()
    store.golden["g1"] = [(i, f"golden {i}", [float(i)] * 8) for i in range(12)]
    store.control = [("g1", json.dumps({"action": "golden", "app": "app", "field": "prompt", "sent_at_ms": 10})),
                     ("r0", json.dumps({"action": "reset", "app": "app", "sent_at_ms": 5}))]
    eng = _engine(store)
    refs, results = _feed(eng, np.ones((3, 8), np.float32), 0)
    assert [(r["mode"], r["version"], r["seq_from"], r["seq_to"], r["n"], r["control_id"]) for r in refs] == [
        ("golden", 1, 0, 0, 12, "g1")]
    assert not results and eng.goldens_read == 1 and store.golden_reads == 1
    refs, _ = _feed(eng, np.ones((1, 8), np.float32), 0, ("app", "m2", "v1"))
    assert [r["control_id"] for r in refs] == ["g1"] and store.golden_reads == 1  # the set is read once
    refs, _ = _feed(eng, np.ones((1, 8), np.float32), 0, ("other", "m", "v1"))
    assert refs == []  # the filter is app=app
    eng.apply({"action": "reset", "app": "app", "model": "none-yet", "sent_at_ms": 20}, "r1")  # another model
    refs, _ = _feed(eng, np.ones((1, 8), np.float32), 0, ("app", "m3", "v1"))
    assert [r["control_id"] for r in refs] == ["g1"]
    eng.apply({"action": "reset", "app": "app", "sent_at_ms": 30}, "r2")  # applied by this worker after the load
    refs, _ = _feed(eng, np.ones((1, 8), np.float32), 0, ("app", "m4", "v1"))
    assert refs == []  # reset after the golden load: new keys collect their own reference


# --------------------------------------------------------------------------- the command


def test_cli_load_sends_nothing_for_a_bad_file_and_the_parts_for_a_good_one(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``driftline baseline load``: a file with a bad line exits 2 listing it, before any Kafka
    client exists; a good one is sent as parts + golden command with the filters (--wait 0).
    Catches: sending before every line is checked, the filters or field not passed on."""
    from typer.testing import CliRunner

    import driftline.streams.cli.golden as golden_mod
    from driftline.streams.cli.main import app

    sent: list[Any] = []
    monkeypatch.setattr(golden_mod, "send_golden", lambda kafka, cmds, **kw: sent.append((kafka, cmds, kw)) or "gid")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": ""}\n')
    res = CliRunner().invoke(app, ["baseline", "load", "--field", "prompt", "--kafka", "127.0.0.1:1", str(bad)])
    assert res.exit_code == 2 and sent == []
    assert f'{bad}: 1 bad line(s), nothing sent:\nline 2: "text" is empty' in res.output
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(3)))
    res = CliRunner().invoke(app, ["baseline", "load", "--field", "prompt", "--app", "chat", "--note", "v1 set",
                                   "--kafka", "127.0.0.1:1", "--wait", "0", str(good)])
    assert res.exit_code == 0, res.output
    ((kafka, cmds, kw),) = sent
    assert kafka == "127.0.0.1:1" and kw["secret"] is None
    assert [t for c in cmds[:-1] for t in c["texts"]] == ["p0", "p1", "p2"]
    final = cmds[-1]
    assert (final["action"], final["app"], final["field"], final["n_texts"], final["note"]) == (
        "golden", "chat", "prompt", 3, "v1 set")
    assert "model" not in final and "prompt_version" not in final
    assert "sent golden set gid: 3 texts in 1 part(s)" in res.output


async def test_stage_without_partition_0_waits_for_the_set_instead_of_embedding() -> None:
    """A worker that does not hold partition 0 does not embed a golden set: it reads
    drift_golden until the embedding worker stored all of it. Catches: every worker of a
    group embedding the set (the `_embeds_golden` gate skipped)."""
    from driftline.streams.ports import StagePorts
    from driftline.streams.stages.embedding import EmbeddingBatcher
    from driftline.streams.stages.semantic_drift import DriftStage

    class _Enc:
        name, dim, max_chars = "fake", 8, 100
        calls = 0

        def encode(self, texts: Any) -> np.ndarray:
            _Enc.calls += 1
            return np.zeros((len(texts), 8), np.float32)

    class _Later(_Store):  # the other worker's rows land after two looks
        def __call__(self, sql: str, params: Any) -> list[tuple[Any, ...]]:
            rows = super().__call__(sql, params)
            return rows if self.golden_reads >= 3 else []

    store = _Later()
    store.golden["g1"] = [(i, f"golden {i}", [1.0] * 8) for i in range(4)]
    st = DriftStage(DriftConfig(control_topic=None))
    st._ports = StagePorts.detached()
    st.engine = _engine(store)
    st.batcher = EmbeddingBatcher(_Enc(), lambda *a: None)
    st.golden_poll_s = 0.01
    st._golden_parts["g1"] = {0: [f"golden {i}" for i in range(4)]}
    await st.on_assigned([type("TP", (), {"topic": "ev", "partition": 1})()])
    cmd = {"action": "golden", "n_texts": 4, "n_parts": 1, "sha256": texts_digest([f"golden {i}" for i in range(4)])}
    gs = await st._golden_set(cmd, "g1")
    assert gs is not None and gs.texts == [f"golden {i}" for i in range(4)]
    assert store.golden_reads == 3 and st.golden_embedded == 0 and _Enc.calls == 0
    assert not st._embeds_golden()
    await st.on_assigned([type("TP", (), {"topic": "ev", "partition": p})() for p in (0, 1)])
    assert st._embeds_golden()


async def test_embedding_worker_checks_the_parts_embeds_the_originals_and_stores_them_redacted() -> None:
    """The worker with partition 0: parts whose count or digest differ from the golden command
    are refused (nothing embedded or stored); good parts are embedded once from the original
    texts and stored (drift_golden) with the texts redacted per --redact, like the events'.
    Catches: storing raw texts under --redact, embedding redacted texts, parts not checked."""
    import dataclasses

    from driftline.detectors.redact import Redaction
    from driftline.streams.ports import StagePorts
    from driftline.streams.stages.embedding import EmbeddingBatcher
    from driftline.streams.stages.semantic_drift import DriftStage

    seen: list[str] = []

    class _Enc:
        name, dim, max_chars = "fake", 8, 100

        def encode(self, texts: Any) -> np.ndarray:
            seen.extend(texts)
            return np.array([[len(t)] * 8 for t in texts], np.float32)

    class _Tables:
        database = "driftline"

        def __init__(self) -> None:
            self.inserts: list[tuple[str, dict[str, list[Any]]]] = []

        async def insert_columns(self, table: str, columns: dict[str, list[Any]]) -> None:
            self.inserts.append((table, columns))

    tables = _Tables()
    st = DriftStage(DriftConfig(control_topic=None))
    st._ports = dataclasses.replace(StagePorts.detached(), tables=tables, redaction=Redaction("pii"))  # type: ignore[arg-type]
    st.engine = _engine(_Store())
    st.batcher = EmbeddingBatcher(_Enc(), lambda *a: None)
    await st.on_assigned([type("TP", (), {"topic": "ev", "partition": 0})()])
    texts = ["mail me at jane.doe@example.com", "plain text"]
    st._golden_parts["g1"] = {0: texts[:1], 1: texts[1:]}
    good = {"action": "golden", "n_texts": 2, "n_parts": 2, "sha256": texts_digest(texts)}
    assert await st._golden_set({**good, "sha256": texts_digest(["x", "y"])}, "g1") is None
    assert await st._golden_set({**good, "n_parts": 3}, "g1") is None
    assert seen == [] and tables.inserts == []
    gs = await st._golden_set(good, "g1")
    assert gs is not None and seen == texts and st.golden_embedded == 2  # the originals, once
    ((table, cols),) = tables.inserts
    assert table == "drift_golden" and cols["golden_id"] == ["g1", "g1"] and cols["idx"] == [0, 1]
    assert cols["text"] == [Redaction("pii").text(texts[0]), "plain text"] and "jane.doe" not in cols["text"][0]
    assert cols["embedding"] == [[float(len(t))] * 8 for t in texts] and cols["embed_model"] == ["fake"] * 2
    assert gs.texts == cols["text"]


def test_the_drift_inbox_is_bounded_while_the_loop_is_busy() -> None:
    """While the drift loop is busy (a golden set embedded or awaited), embedded samples wait
    in the inbox: past ``max_inbox_samples`` the oldest batches are dropped and counted, the
    newest kept. Mutation caught: no bound (the inbox holds all 10 batches)."""
    from driftline.streams.stages.semantic_drift import DriftStage

    st = DriftStage(DriftConfig(control_topic=None))
    st.max_inbox_samples = 7
    key = ("app", "m", "")
    for b in range(10):  # the loop is not running: nothing is taken out
        st._on_embedded([Sample(key, "prompt", f"e{b}-{i}", b, "t") for i in range(3)], [0, 1, 2],
                        np.ones((3, 4), np.float32))
    held = [s.event_id for batch in st._inbox for s in batch[0]]
    assert held == [f"e{b}-{i}" for b in (8, 9) for i in range(3)]
    assert st.inbox_dropped == 24 and st._inbox_units == 6


# --------------------------------------------------------------------------- review: bounds

def test_held_parts_are_capped_per_set_like_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parts a worker holds until their golden command obey the file's caps: a part with
    a text over MAX_TEXT_CHARS or a part count over MAX_TEXTS is ignored, and a set whose
    parts add up to more than MAX_TEXTS texts is dropped (an unsigned or buggy producer
    could otherwise fill one golden id's parts without bound: only the number of *sets*
    was capped). Mutation caught: no per-part / per-set check (the parts stay held)."""
    import driftline.streams.cli.golden as golden
    from driftline.streams.stages.semantic_drift import DriftStage

    monkeypatch.setattr(golden, "MAX_TEXTS", 5)
    st = DriftStage(DriftConfig(control_topic=None))

    def part(gid: str, i: int, n: int, texts: list[str]) -> None:
        st._golden_part({"cmd": "baseline", "action": "golden_part", "id": f"{gid}.{i}", "golden_id": gid,
                         "i": i, "n": n, "texts": texts})

    part("long", 0, 1, ["x" * (MAX_TEXT_CHARS + 1)])
    part("many", 0, 6, ["a"])  # 6 parts of at least one text each: over 5 texts
    assert st._golden_parts == {}
    part("big", 0, 3, ["a", "b"])
    part("big", 1, 3, ["c", "d"])
    assert sorted(st._golden_parts["big"]) == [0, 1]
    part("big", 2, 3, ["e", "f"])  # 6 texts
    assert "big" not in st._golden_parts
    part("ok", 0, 2, ["a", "b", "c"])
    part("ok", 1, 2, ["d", "e"])
    part("ok", 1, 2, ["d", "e"])  # a re-delivered part replaces itself
    assert st._golden_parts == {"ok": {0: ["a", "b", "c"], 1: ["d", "e"]}}


async def test_a_golden_command_that_cannot_be_made_does_not_stall_a_waiting_worker() -> None:
    """A worker without partition 0 waits for the embedding worker's rows up to
    max(60 s, n_texts / 10): a golden command with n_texts 10**9 (unsigned, or malformed)
    held its drift loop for about three years, and n_texts "4" raised in the loop (the
    command then never reached drift_control_log). A count outside 1..MAX_TEXTS (or not an
    int) is refused at once, without reading the store. Mutation caught: no check of
    n_texts (the call times out here)."""
    import asyncio

    from driftline.streams.ports import StagePorts
    from driftline.streams.stages.semantic_drift import DriftStage

    store = _Store()
    st = DriftStage(DriftConfig(control_topic=None))
    st._ports = StagePorts.detached()
    st.engine = _engine(store)
    st.batcher = object()  # type: ignore[assignment]  # never used: nothing is embedded here
    st.golden_poll_s = 0.01
    await st.on_assigned([type("TP", (), {"topic": "ev", "partition": 1})()])
    st._golden_parts["g1"] = {0: ["a"]}
    for bad in (10**9, MAX_TEXTS + 1, 0, "4", None):
        cmd = {"action": "golden", "n_texts": bad, "n_parts": 1, "sha256": texts_digest(["a"])}
        assert await asyncio.wait_for(st._golden_set(cmd, "g1"), 2.0) is None
    assert store.golden_reads == 0


def test_cli_load_says_a_refused_set_was_not_applied(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that cannot put a set together (parts missing: more than 4 loads at once, a
    start during a store outage; or altered) still logs the golden command in
    drift_control_log (with 0 references), so ``baseline load`` printed "applied: ... is the
    reference of 0 key(s); keys that appear later and match get it" and exited 0, though no
    key ever gets it. On a chDB store: logged but not in drift_golden -> exit 1 saying so;
    once its rows are stored -> exit 0, "applied". Mutation caught: the drift_golden check
    removed (exit 0 and "applied" for the refused set)."""
    from datetime import UTC, datetime

    from typer.testing import CliRunner

    import driftline.streams.cli.golden as golden_mod
    from driftline.schemas.columns import CONTROL_LOG_COLUMNS, GOLDEN_COLUMNS
    from driftline.streams.cli.main import app
    from driftline.streams.sinks.clickhouse import ClickHouseSink

    dsn = f"chdb://{tmp_path / 'chdb'}"
    at = datetime(2026, 11, 29, tzinfo=UTC)
    sink = ClickHouseSink(dsn)
    sink.ensure_schema()
    sink.call(lambda c: c.insert("driftline.drift_control_log", [["gid", at, "golden", "{}", 0, "c", 0, 1]],
                                 column_names=list(CONTROL_LOG_COLUMNS)))
    sink.close()
    monkeypatch.setattr(golden_mod, "send_golden", lambda kafka, cmds, **kw: "gid")
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"p{i}"}) + "\n" for i in range(3)))
    args = ["baseline", "load", "--field", "prompt", "--kafka", "127.0.0.1:1", "--clickhouse", dsn,
            "--wait", "5", str(good)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output
    assert "golden set gid was not applied: 0 of its 3 texts are in drift_golden" in res.output
    assert "applied: golden set" not in res.output
    sink = ClickHouseSink(dsn)
    sink.call(lambda c: c.insert("driftline.drift_golden", [["gid", i, f"p{i}", [0.0] * 4, "fake", at]
                                                            for i in range(3)], column_names=list(GOLDEN_COLUMNS)))
    sink.close()
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "applied: golden set gid (3 texts) is the prompt reference of 0 key(s)" in res.output


async def test_parts_read_before_the_control_log_do_not_crowd_out_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    """Until drift_control_log is read (a store outage at start), commands wait in a list
    capped at 10,000 records. Golden parts (up to 512 KiB each; a 20,000-text set of long
    texts is ~320 of them) waited there too: a topic holding a few old loads filled it
    (gigabytes) and every later command -- a reset, a new load -- was dropped for good.
    Parts are held as parts instead (bounded per set and in sets), those of sets the log
    says were applied dropped once it is read. Mutation caught: parts kept in the early
    list (the reset is dropped; the old set's parts are held)."""
    import dataclasses

    import driftline.streams.stages.semantic_drift as sd
    from driftline.streams.ingest.control import ControlRecord
    from driftline.streams.ports import StagePorts

    class _Tables:
        database = "driftline"

        async def aquery(self, sql: str, parameters: Any = None) -> Any:
            return [("old",)]

    monkeypatch.setattr(sd, "_MAX_EARLY_COMMANDS", 5)
    st = sd.DriftStage(DriftConfig())
    st._ports = dataclasses.replace(StagePorts.detached(), tables=_Tables())  # type: ignore[arg-type]
    assert not st._ids_loaded
    off = iter(range(100))

    def send(cmd: dict[str, Any]) -> None:
        st.on_command(ControlRecord({"cmd": "baseline", **cmd}, "driftline.control", 0, next(off), 0))

    old = [f"o{i}" for i in range(6)]
    for i, t in enumerate(old):
        send({"action": "golden_part", "id": f"old.{i}", "golden_id": "old", "i": i, "n": 6, "texts": [t]})
    send({"action": "golden", "id": "old", "golden_id": "old", "n_parts": 6, "n_texts": 6,
          "sha256": texts_digest(old), "app": "chat", "field": "prompt"})
    send({"action": "golden_part", "id": "new.0", "golden_id": "new", "i": 0, "n": 1, "texts": ["n0"]})
    send({"action": "reset", "id": "r1", "app": "chat"})
    assert await st._read_applied_ids()
    assert [c.control_id for c in st._controls] == ["r1"]  # "old" was applied before
    assert st._golden_parts == {"new": {0: ["n0"]}} and st._early == []


def test_one_set_embedded_with_two_models_keeps_both(tmp_path: Any) -> None:
    """drift_golden was a ReplacingMergeTree ordered by (golden_id, idx): the rows of one set
    embedded by workers of two embedding models (a rolling --embed-model change; each
    worker uses only its own model's vectors) replaced each other, already at read time
    under FINAL, so one model's workers never found the set, embedded it again and
    replaced the other's rows in turn, and after a restart collected a new reference.
    On a chDB store: both models' rows are read back by their engines. Mutation caught:
    embed_model left out of the sorting key (model A reads no set)."""
    from datetime import UTC, datetime

    from driftline.schemas.columns import GOLDEN_COLUMNS
    from driftline.streams.sinks.clickhouse import ClickHouseSink

    sink = ClickHouseSink(f"chdb://{tmp_path / 'chdb'}")
    try:
        sink.ensure_schema()
        at = datetime(2026, 11, 29, tzinfo=UTC)
        for m, x in (("model-a", 1.0), ("model-b", 2.0)):
            sink.call(lambda c, m=m, x=x: c.insert("driftline.drift_golden", [
                ["g", i, f"t{i}", [x] * 4, m, at] for i in range(3)], column_names=list(GOLDEN_COLUMNS)))
        got = {}
        for m in ("model-a", "model-b"):
            eng = DriftEngine(DriftConfig(fields=("prompt",), control_topic=None), sink.query_rows, "driftline", m)
            gs = eng.golden_set("g", 3)
            assert gs is not None, m
            got[m] = (gs.texts, gs.emb[:, 0].tolist())
        assert got == {"model-a": (["t0", "t1", "t2"], [1.0] * 3), "model-b": (["t0", "t1", "t2"], [2.0] * 3)}
    finally:
        sink.close()


def test_cli_wait_reports_a_store_it_cannot_read_not_a_missing_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """``baseline load`` / ``reset`` wait for the command in drift_control_log; every failed
    read was swallowed, so a store the CLI cannot reach (wrong --clickhouse, a refused
    password) waited the whole --wait and then said "no worker applied it (is a worker with
    --drift running?)". When no read succeeded, the last error is reported (exit 1, the
    password masked). A real closed port on 127.0.0.1. Mutation caught: errors swallowed
    (the "no worker" message)."""
    from typer.testing import CliRunner

    import driftline.streams.cli.baseline as baseline_mod
    import driftline.streams.cli.golden as golden_mod
    from driftline.streams.cli.main import app
    from driftline.streams.local.broker import free_port

    monkeypatch.setattr(baseline_mod, "send_command", lambda kafka, cmd, **kw: "cid")
    monkeypatch.setattr(golden_mod, "send_golden", lambda kafka, cmds, **kw: "gid")
    monkeypatch.delenv("DRIFTLINE_CLICKHOUSE_PASSWORD", raising=False)
    monkeypatch.delenv("DRIFTLINE_CLICKHOUSE_PASSWORD_FILE", raising=False)
    dsn = f"http://default:s3cret-pw-42@127.0.0.1:{free_port()}/driftline"
    res = CliRunner().invoke(app, ["baseline", "reset", "--app", "chat", "--kafka", "127.0.0.1:1",
                                   "--clickhouse", dsn, "--wait", "1"])
    assert res.exit_code == 1, res.output
    assert "no worker applied it" not in res.output and "s3cret-pw-42" not in res.output
    assert "could not read drift_control_log" in res.output


async def test_a_refused_set_is_logged_as_refused_and_does_not_shadow_an_earlier_load() -> None:
    """A golden command whose set could not be put together was logged in drift_control_log
    as action "golden": after a restart the engine, which reads the golden/rebase/pin/reset
    rows there, took it for the latest load matching new keys, so they got no set at all,
    where before the restart they got the earlier set (the refused one never reached
    apply_golden). It is logged as "golden_refused" (never re-applied: its id is logged).
    Mutation caught: the refused set logged as "golden"."""
    import dataclasses

    from driftline.streams.ports import StagePorts
    from driftline.streams.stages.embedding import EmbeddingBatcher
    from driftline.streams.stages.semantic_drift import DriftStage, _Control

    class _Enc:
        name, dim, max_chars = "fake", 8, 100

        def encode(self, texts: Any) -> np.ndarray:
            return np.ones((len(texts), 8), np.float32)

    class _Tables:
        database = "driftline"

        def __init__(self) -> None:
            self.log: list[dict[str, Any]] = []

        async def insert_columns(self, table: str, columns: dict[str, list[Any]], **kw: Any) -> None:
            pass

        async def insert_rows(self, table: str, rows: list[dict[str, Any]], columns: Any, **kw: Any) -> None:
            if table == "drift_control_log":
                self.log.extend(rows)

    tables = _Tables()
    st = DriftStage(DriftConfig(control_topic=None))
    st._ports = dataclasses.replace(StagePorts.detached(), tables=tables)  # type: ignore[arg-type]
    st.engine = _engine(_Store())
    st.batcher = EmbeddingBatcher(_Enc(), lambda *a: None)
    await st.on_assigned([type("TP", (), {"topic": "ev", "partition": 0})()])
    texts = ["a", "b"]
    st._golden_parts["ok"] = {0: texts}
    for gid in ("ok", "bad"):  # "bad": its parts never came
        cmd = {"cmd": "baseline", "action": "golden", "id": gid, "golden_id": gid, "n_parts": 1, "n_texts": 2,
               "sha256": texts_digest(texts), "app": "chat", "field": "prompt"}
        await st._apply_control(_Control(cmd, gid, "driftline.control", 0, 0))
    assert [(r["control_id"], r["action"], r["n_references"]) for r in tables.log] == [
        ("ok", "golden", 0), ("bad", "golden_refused", 0)]
