"""Fixtures that start the real Prometheus / Alertmanager binaries (Debian packages).

Each fixture starts its own process on a free 127.0.0.1 port with a tmp dir for storage
and config, waits for ``/-/ready``, and stops it afterwards. When a binary is missing the
test is skipped with an install hint, unless ``CI`` is set: then it fails.

Use from a test module: ``from helpers_alerting import alertmanager, prometheus_factory``
(``tests/`` is on ``sys.path`` through the rootdir conftest).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

INSTALL_HINT = "install with scripts/install_system_deps.sh (apt-get install prometheus prometheus-alertmanager)"


def find_binary(*names: str) -> str:
    """Path of the first binary found; skip (or fail under CI) when none is installed."""
    for n in names:
        p = shutil.which(n)
        if p:
            return p
    msg = f"none of {', '.join(names)} is installed; {INSTALL_HINT}"
    if os.environ.get("CI"):
        pytest.fail(msg + " (CI is set: missing binaries fail)")
    pytest.skip(msg)
    raise AssertionError("unreachable")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout_s}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@dataclass(frozen=True)
class Server:
    url: str
    workdir: Path
    log: Path


ALERTMANAGER_CONFIG = """\
route:
  receiver: "null"
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: "null"
"""


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[Server]:
    """A real Alertmanager on a free port (clustering off), empty 'null' receiver."""
    binary = find_binary("alertmanager", "prometheus-alertmanager")
    work = tmp_path / "alertmanager"
    work.mkdir()
    cfg = work / "alertmanager.yml"
    cfg.write_text(ALERTMANAGER_CONFIG)
    port = free_port()
    log = work / "alertmanager.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={cfg}", f"--storage.path={work / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
            stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/-/ready", proc, log)
        yield Server(url, work, log)
    finally:
        stop(proc)


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[[str, dict[str, str]], Server]]:
    """``start(prometheus_yml, {file_name: text})`` -> a real Prometheus on a free port.

    The extra files (rule files) are written next to the config, so the config can name
    them relatively.
    """
    binary = find_binary("prometheus")
    procs: list[subprocess.Popen[bytes]] = []

    def start(config: str, files: dict[str, str]) -> Server:
        work = tmp_path / f"prometheus{len(procs)}"
        work.mkdir()
        for name, text in files.items():
            (work / name).write_text(text)
        cfg = work / "prometheus.yml"
        cfg.write_text(config)
        port = free_port()
        log = work / "prometheus.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [binary, f"--config.file={cfg}", f"--storage.tsdb.path={work / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdout=out, stderr=subprocess.STDOUT, cwd=work)
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}/-/ready", proc, log)
        return Server(url, work, log)

    try:
        yield start
    finally:
        for p in procs:
            stop(p)


@pytest.fixture
def promtool() -> str:
    return find_binary("promtool")
