"""The traffic replay on the small synthetic data: exact counts, decodability, drift ground truth.

Mix checks use a tolerance of 4 binomial standard deviations of the measured
share, ``4 * sqrt(p (1 - p) / n)``; with the fixed seeds the results are exact,
and the tolerance says how far any seed may be expected to stray.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from pathlib import Path

import pytest

from driftline.schemas.event import EventError, decode_event
from driftline.streams.devdata.real_prompts import ALPACA_DATASETS
from driftline.streams.devdata.replay import (
    MALFORMATIONS,
    AppSpec,
    DriftSpec,
    ModelUpdate,
    ReplayConfig,
    ReplayData,
    ReplayRecord,
    VersionEffect,
    generate,
    write_jsonl,
)

DATA = ReplayData.synthetic(0)
N = 2_000


def _records(**kw: object) -> list[ReplayRecord]:
    cfg = ReplayConfig(**{"n_events": N, "seed": 11, **kw})  # type: ignore[arg-type]
    return list(generate(cfg, DATA))


@pytest.fixture(scope="module")
def recs() -> list[ReplayRecord]:
    return _records()


def _tol(p: float, n: int) -> float:
    return 4 * math.sqrt(p * (1 - p) / n)


def test_synthetic_data_is_labelled() -> None:
    assert DATA.synthetic_data
    assert {it.generator for it in DATA.alpaca} == {"synthetic-handwritten"}
    assert {it.dataset for it in DATA.alpaca} == set(ALPACA_DATASETS)


def test_same_seed_same_stream_other_seed_other_stream(recs: list[ReplayRecord]) -> None:
    again = _records()
    assert [r.value for r in again] == [r.value for r in recs]
    assert again == recs
    other = _records(seed=12)
    assert sum(a.value == b.value for a, b in zip(recs, other, strict=True)) == 0


def test_exact_counts_of_valid_malformed_and_late(recs: list[ReplayRecord]) -> None:
    assert len(recs) == N
    assert sum(r.valid for r in recs) == 1_980
    assert sum(not r.valid for r in recs) == 20
    assert sum(r.late for r in recs) == 10
    kinds = Counter(r.malformation for r in recs if not r.valid)
    assert set(kinds) == set(MALFORMATIONS)  # every kind of bad bytes appears
    assert kinds.most_common()[0][1] - min(kinds.values()) <= 1  # in turn
    assert all(r.reason == MALFORMATIONS[r.malformation][0] for r in recs if r.malformation)


def test_valid_records_decode_and_malformed_ones_are_rejected(recs: list[ReplayRecord]) -> None:
    for r in recs:
        if r.valid:
            ev = decode_event(r.value)
            assert r.key == f"{ev.app}/{ev.model}".encode()
            assert r.event is not None and r.event["event_id"] == ev.event_id
            assert ev.environment == "prod" and ev.prompt and r.reason is None
        else:
            assert r.event is None
            with pytest.raises(EventError) as info:
                decode_event(r.value)
            assert r.malformation is not None
            assert info.value.key == MALFORMATIONS[r.malformation][1], r.malformation
            assert b"\n" not in r.value  # safe as one JSONL line


def test_event_ids_are_unique_version_8_uuids(recs: list[ReplayRecord]) -> None:
    ids = [r.event["event_id"] for r in recs if r.event]
    assert len(set(ids)) == len(ids) == 1_980
    pattern = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-8[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
    assert all(pattern.match(i) for i in ids)


def _mix(rs: list[ReplayRecord]) -> dict[str, float]:
    alpaca = [r.category for r in rs if r.source == "alpaca"]
    c = Counter(alpaca)
    return {d: c[d] / len(alpaca) for d in ALPACA_DATASETS}


def test_category_mix_before_and_after_drift(recs: list[ReplayRecord]) -> None:
    cfg = ReplayConfig(n_events=N, seed=11)
    assert cfg.drift_index == 1_000
    assert [r.drifted for r in recs] == [i >= 1_000 for i in range(N)]
    before = [r for r in recs if not r.drifted]
    after = [r for r in recs if r.drifted]
    n_before = sum(r.source == "alpaca" for r in before)
    n_after = sum(r.source == "alpaca" for r in after)
    for d, share in _mix(before).items():
        want = cfg.category_mix[d]  # uniform: 0.2 each
        assert abs(share - want) <= _tol(want, n_before), (d, share)
    for d, share in _mix(after).items():
        want = cfg.drift.category_mix[d]  # selfinstruct 0.8, the others 0.05
        assert abs(share - want) <= _tol(want, n_after), (d, share)
    assert _mix(after)["selfinstruct"] > 0.7 > _mix(before)["selfinstruct"]


def test_jailbreak_share_after_drift_and_guardrails_react(recs: list[ReplayRecord]) -> None:
    before = [r for r in recs if not r.drifted]
    after = [r for r in recs if r.drifted]
    assert not any(r.source in ("jailbreak", "toxic") for r in before)
    jb = sum(r.source == "jailbreak" for r in after) / len(after)
    assert abs(jb - 0.3) <= _tol(0.3, len(after)), jb
    tox = sum(r.source == "toxic" for r in after) / len(after)
    assert abs(tox - 0.05) <= _tol(0.05, len(after)), tox

    def hit_rate(rs: list[ReplayRecord], name: str) -> float:
        verdicts = [g["verdict"] for r in rs if r.event for g in r.event["guardrails"]
                    if g["name"] == name]
        return sum(v != "pass" for v in verdicts) / len(verdicts)

    jail = [r for r in after if r.source == "jailbreak"]
    benign = [r for r in recs if r.source == "alpaca"]
    assert hit_rate(jail, "prompt_injection") > 0.6  # configured 0.8
    assert hit_rate(benign, "prompt_injection") < 0.02  # configured 0.006
    assert hit_rate([r for r in after if r.source == "toxic"], "toxicity") > 0.5  # 0.8


def test_no_drift_without_drift_at() -> None:
    rs = _records(drift_at=None)
    assert not any(r.drifted for r in rs)
    assert {r.source for r in rs} <= {"alpaca", "donotanswer"}


def test_drift_limited_to_one_app() -> None:
    rs = _records(drift=DriftSpec(apps=("support-bot",)))
    for r in rs:
        app = r.key.split(b"/", 1)[0]
        assert r.drifted == (app == b"support-bot" and rs.index(r) >= 1_000)
    assert {r.source for r in rs if not r.key.startswith(b"support-bot/")} <= {"alpaca", "donotanswer"}


def test_timestamps_monotone_except_the_late_ones() -> None:
    rs = _records(late_rate=0.01, late_ms=(1_000, 30_000))
    high = -1
    late_seen = 0
    for r in rs:
        if r.event is None:
            continue
        ts = r.event["timestamp"]
        if r.late:
            late_seen += 1
            assert high - 30_000 - 1_000 <= ts < high  # behind, by at most late_ms (+ one gap)
        else:
            assert ts >= high
            high = ts
    assert late_seen == 20
    span_s = (high - ReplayConfig().start_ms) / 1000
    assert abs(span_s - N / 50) < 0.1 * N / 50  # 50 events per second of event time


def test_latency_is_ttft_plus_tokens_times_tpot(recs: list[ReplayRecord]) -> None:
    ok = [r.event for r in recs if r.event and r.event["status"] == "ok"]
    exact = 0
    for e in ok:
        visible = e["output_tokens"] - e.get("reasoning_output_tokens", 0)
        model = e["ttft_ms"] + visible * e["tpot_ms"]
        slack = 0.051  # latency_ms is rounded to 0.1 ms
        assert e["latency_ms"] >= model - slack  # the queueing tail only adds
        exact += abs(e["latency_ms"] - model) <= slack
        assert 0 < e["ttft_ms"] <= e["latency_ms"]
        assert e["input_tokens"] >= e.get("cache_read_input_tokens", 0)
    assert exact / len(ok) > 0.97  # 1% of calls get the 3-6x tail


def test_errors_and_reasoning_and_finish_reasons(recs: list[ReplayRecord]) -> None:
    evs = [r.event for r in recs if r.event]
    errors = [e for e in evs if e["status"] == "error"]
    assert abs(len(errors) / len(evs) - 0.015) <= _tol(0.015, len(evs))
    assert {e["error_type"] for e in errors} <= {"rate_limit", "timeout", "server_error"}
    assert all("response" not in e and e["output_tokens"] == 0 for e in errors)
    reasoning = [e for e in evs if e.get("reasoning_output_tokens")]
    assert reasoning and {e["request_model"] for e in reasoning} == {"o3-mini"}
    assert all(e["output_tokens"] > e["reasoning_output_tokens"] for e in reasoning)
    finish = Counter(e["finish_reasons"][0] for e in evs if e["status"] == "ok")
    assert {"stop", "end_turn", "STOP"} <= set(finish)


def test_drift_inflates_one_models_latency(recs: list[ReplayRecord]) -> None:
    def median_ttft(model: str, drifted: bool) -> float:
        return statistics.median(
            r.event["ttft_ms"] for r in recs
            if r.event and r.event["request_model"] == model and r.drifted == drifted
            and r.event["status"] == "ok"
        )

    slow = median_ttft("gpt-4o-mini", True) / median_ttft("gpt-4o-mini", False)
    same = median_ttft("gemini-1.5-flash", True) / median_ttft("gemini-1.5-flash", False)
    assert 1.5 < slow < 2.2  # configured 1.8
    assert 0.8 < same < 1.25


def test_write_jsonl(tmp_path: Path, recs: list[ReplayRecord]) -> None:
    path = tmp_path / "events.jsonl"
    assert write_jsonl(recs, path) == N
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and lines[:-1] == [r.value for r in recs]
    assert write_jsonl(recs, path, include_malformed=False) == 1_980


@pytest.mark.parametrize(
    "kw",
    [
        {"n_events": -1},
        {"malformed_rate": 1.5},
        {"category_mix": {"alpaca": 1.0}},
        {"drift_at": 1.5},
        {"events_per_second": 0},
        {"apps": (AppSpec("x", ("no-such-model",)),)},
        {"drift": DriftSpec(jailbreak_share=0.9, toxic_share=0.1)},  # + harmful_rate > 1
        {"drift": DriftSpec(apps=("no-such-app",))},
    ],
)
def test_bad_settings_raise_at_construction(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ReplayConfig(**kw)  # type: ignore[arg-type]


def test_app_spec_validates() -> None:
    with pytest.raises(ValueError):
        AppSpec("a", ("gpt-4o", "gpt-4o-mini", "o3-mini", "gemini-1.5-flash"))
    with pytest.raises(ValueError):
        AppSpec("a/b", ("gpt-4o",))


# --- a prompt version that behaves unlike the others (the demo's A/B candidate) ---

_EFFECT = VersionEffect("support-bot", "v4", output_factor=1.5, tpot_factor=1.25, negative_feedback=1.0)


def test_version_effect_changes_only_its_version_and_exactly_as_stated() -> None:
    data = ReplayData.synthetic()
    base = list(generate(ReplayConfig(n_events=6000, seed=11), data))
    cand = list(generate(ReplayConfig(n_events=6000, seed=11, version_effects=(_EFFECT,)), data))
    n_v4 = n_turned = 0
    for b, c in zip(base, cand, strict=True):
        if not (b.valid and c.valid):
            continue
        eb, ec = b.event, c.event
        if (eb["app"], eb["prompt_version"]) != ("support-bot", "v4"):
            assert b.value == c.value  # every other record is the same bytes
            continue
        n_v4 += 1
        if eb["status"] != "ok":
            assert ec == eb  # an error has no answer to lengthen
            continue
        visible = eb["output_tokens"] - eb.get("reasoning_output_tokens", 0)
        assert ec["output_tokens"] - ec.get("reasoning_output_tokens", 0) == round(visible * 1.5)
        assert ec["tpot_ms"] == pytest.approx(eb["tpot_ms"] * 1.25, abs=0.0113)  # both rounded to 0.01
        if eb.get("feedback") == 0:
            assert ec["feedback"] == -1
            n_turned += 1
        else:
            assert ec.get("feedback") == eb.get("feedback")
    assert n_v4 > 1000 and n_turned > 10


@pytest.mark.parametrize(("effects", "message"), [
    ((VersionEffect("support-bot", "v9"),), "support-bot/v9 is not a prompt version"),
    ((VersionEffect("no-app", "v1"),), "no-app/v1 is not a prompt version"),
    ((VersionEffect("support-bot", "v4"), VersionEffect("support-bot", "v4")), "given twice"),
])
def test_version_effects_are_checked(effects: tuple[VersionEffect, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ReplayConfig(version_effects=effects)


def test_version_effect_values_are_checked() -> None:
    with pytest.raises(ValueError, match="output_factor and tpot_factor must be > 0"):
        VersionEffect("a", "v1", output_factor=0)
    with pytest.raises(ValueError, match=r"negative_feedback must be in \[0, 1\]"):
        VersionEffect("a", "v1", negative_feedback=1.5)
    # NaN passed `min(...) <= 0` (and inf or 1e300 overflowed int64): records marked valid with
    # latency_ms -7.8e19 or null, which the ingest path refuses. Mutation caught: the finite cap.
    for bad in (math.nan, math.inf, 1e300, 101.0):
        with pytest.raises(ValueError, match=r"output_factor and tpot_factor must be > 0 and <= 100"):
            VersionEffect("a", "v1", output_factor=bad)
        with pytest.raises(ValueError, match=r"output_factor and tpot_factor must be > 0 and <= 100"):
            VersionEffect("a", "v1", tpot_factor=bad)
    with pytest.raises(ValueError, match=r"negative_feedback must be in \[0, 1\]"):
        VersionEffect("a", "v1", negative_feedback=math.nan)
    assert VersionEffect("a", "v1", output_factor=100.0, tpot_factor=0.01).output_factor == 100.0


def test_two_processes_build_the_real_data_cache_one_at_a_time(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite runs on two processes (pytest-xdist), and three test files read the shared
    cache (~/.cache/driftline/data): on a cold cache both processes downloaded and wrote it
    at once, one reading the other's half-copied archive (sha256 mismatch: DataError) or
    losing its fixed-name ``.tmp`` file to the other's os.replace. The build holds an
    exclusive lock on the cache folder and checks the cache again under it. Here the test
    holds the lock: the other caller waits, then finds the cache built and fetches nothing.
    Mutation caught: no lock (it fetches at once)."""
    import fcntl
    import threading

    from driftline.streams.devdata import real_prompts as rp

    built = threading.Event()
    fetched: list[str] = []
    monkeypatch.setattr(rp, "_cache_ok", lambda paths: built.is_set())
    monkeypatch.setattr(rp, "_fetch", lambda source, downloads, progress: fetched.append(source.spec))
    root = tmp_path / "data"
    root.mkdir()
    out: list[rp.DataPaths] = []
    with open(root / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        t = threading.Thread(target=lambda: out.append(rp.ensure_data(root)), daemon=True)
        t.start()
        t.join(0.5)
        assert t.is_alive() and fetched == []  # waiting for the lock
        built.set()  # "the other process" finished the cache
    t.join(10)
    assert not t.is_alive() and fetched == [] and out[0].root == root


def test_model_update_changes_one_model_from_its_index_on() -> None:
    """A silent model update: before ``at`` every record is the same bytes; after it, the
    updated model's answers are 1.3x as long, its TTFT doubled and 10 % of its answers cut at
    the limit, while every other model's records stay the same bytes."""
    data = ReplayData.synthetic()
    n, upd = 6000, ModelUpdate("gemini-1.5-flash", at=0.5, output_factor=1.3, ttft_factor=2.0,
                                length_share=0.1)
    base = list(generate(ReplayConfig(n_events=n, seed=5), data))
    cand = list(generate(ReplayConfig(n_events=n, seed=5, model_updates=(upd,)), data))
    n_after = n_len = 0
    for i, (b, c) in enumerate(zip(base, cand, strict=True)):
        if i < n // 2:
            assert b.value == c.value
            continue
        if not b.valid:  # a malformed record of the updated model carries its changed numbers
            continue
        if b.event["request_model"] != "gemini-1.5-flash":
            assert b.value == c.value
            continue
        eb, ec = b.event, c.event
        if eb["status"] != "ok":
            continue
        n_after += 1
        assert ec["output_tokens"] == round(eb["output_tokens"] * 1.3)  # no reasoning tokens
        assert ec["ttft_ms"] == pytest.approx(eb["ttft_ms"] * 2, abs=0.151)  # both rounded to 0.1
        if eb["finish_reasons"] == ["MAX_TOKENS"]:
            assert ec["finish_reasons"] == ["MAX_TOKENS"]  # the same draw, a higher cut
        n_len += ec["finish_reasons"] == ["MAX_TOKENS"]
    assert n_after > 300 and abs(n_len / n_after - 0.1) < 4 * math.sqrt(0.09 / n_after)


def test_model_updates_are_checked() -> None:
    with pytest.raises(ValueError, match="each model once, a model of the fleet"):
        ReplayConfig(model_updates=(ModelUpdate("gpt-9"),))
    with pytest.raises(ValueError, match="each model once"):
        ReplayConfig(model_updates=(ModelUpdate("gpt-4o"), ModelUpdate("gpt-4o")))
    with pytest.raises(ValueError, match=r"at must be in \[0, 1\]"):
        ModelUpdate("gpt-4o", at=2)
    with pytest.raises(ValueError, match=r"length_share must be in \[0, 0.5\]"):
        ModelUpdate("gpt-4o", length_share=0.9)
