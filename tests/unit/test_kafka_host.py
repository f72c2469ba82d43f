"""The consumer-group helpers (streams/ingest/kafka_host.py): pure logic over the consumer's
interface, so a small fake consumer stands in for aiokafka here; the real group runs in
tests/integration/test_worker_exactly_once.py and test_worker_rebalance.py."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from aiokafka import TopicPartition

from driftline.streams.ingest.kafka_host import commit_confirmed, cut_off, hold

A, B, C = (TopicPartition("llm.events", p) for p in range(3))


class FakeConsumer:
    def __init__(self, assigned: set[TopicPartition], fail: bool = False) -> None:
        self.assigned, self.fail = assigned, fail
        self._paused: set[TopicPartition] = set()
        self.commits: list[dict[TopicPartition, int]] = []
        self.polls: dict[TopicPartition, int] = {}

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def pause(self, *tps: TopicPartition) -> None:
        self._paused |= set(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self._paused -= set(tps)

    async def getmany(self, **kw: Any) -> dict[Any, Any]:
        return {}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.fail:
            raise RuntimeError("rebalance in progress")
        self.commits.append(dict(offsets))

    def last_poll_timestamp(self, tp: TopicPartition) -> int | None:
        return self.polls.get(tp)


def test_commit_confirmed_resumes_and_commits_only_assigned_partitions(caplog: pytest.LogCaptureFixture) -> None:
    # Catches: committing a partition revoked meanwhile (the new owner's offsets overwritten),
    # fetching left paused after a sink outage, or a failed commit raised into the writer.
    c = FakeConsumer({A, B})
    asyncio.run(hold(c))  # type: ignore[arg-type]
    assert c.paused() == {A, B}
    asyncio.run(commit_confirmed(c, {A: 10, C: 7}))  # type: ignore[arg-type]
    assert c.commits == [{A: 10}] and c.paused() == set()
    failing = FakeConsumer({A}, fail=True)
    with caplog.at_level(logging.WARNING, "driftline.worker"):
        asyncio.run(commit_confirmed(failing, {A: 3}))  # type: ignore[arg-type]
    assert "offset commit failed (the write log holds the offsets)" in caplog.text
    asyncio.run(commit_confirmed(None, {A: 1}))


def test_cut_off_when_paused_unassigned_or_a_partition_unanswered() -> None:
    # Catches: an empty fetch during a Kafka cut or a pause read as idle traffic (event time
    # would follow wall time and the held-back records would all be late).
    now = int(time.time() * 1000)
    c = FakeConsumer({A, B})
    c.polls = {A: now, B: now}
    assert cut_off(c) is False  # type: ignore[arg-type]
    c.polls[B] = now - 5_000
    assert cut_off(c) is True  # type: ignore[arg-type]
    c.polls[B] = now
    c.pause(A)
    assert cut_off(c) is True  # type: ignore[arg-type]
    assert cut_off(FakeConsumer(set())) is True  # type: ignore[arg-type]
    assert cut_off(None) is False


def _rec(offset: int, value: bytes = b'{"a":1}', ts: int = 1_700_000_000_000) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(offset=offset, timestamp=ts, key=b"k", value=value, headers=())


def test_probe_verdicts_on_the_logged_record() -> None:
    # Catches: a recreated topic taken for the logged one (another record at the logged
    # offset, offsets restarting below it, a topic ending before it): its offsets would be
    # skipped into and its first records never stored; or a topic still being read back
    # (no answer yet) decided too early.
    from driftline.streams.ingest.kafka_host import _probed, fingerprint

    r = _rec(5)
    assert _probed((5, r.timestamp, fingerprint(r)), [r], None) == ""
    assert _probed((4, 0, 1), [r], None) == ""  # retention deleted the logged record: same topic
    assert _probed((5, r.timestamp, fingerprint(r) ^ 1), [r], None) == "the record at stored offset 5 is another record"
    assert _probed((7, 0, 1), [r], None) == "its offsets restart at 5, below the stored 7"
    assert _probed((7, 0, 1), None, 7) == "it ends at offset 7, at or before the stored 7"
    assert _probed((7, 0, 1), None, 8) is None and _probed((7, 0, 1), None, None) is None


def test_a_fetch_keeps_only_ready_partitions_above_the_write_log() -> None:
    # Catches: records of a partition whose assignment is still being handled processed
    # (instead of dropped and rewound to), or records at or below the write log stored again.
    from driftline.streams.ingest.kafka_host import HostHooks, KafkaHost, fingerprint
    from driftline.streams.worker import WorkerConfig

    async def nothing(*a: Any) -> Any:
        return {}

    hooks = HostHooks(decode=lambda recs: None, deliver=nothing, revoke=nothing, resume=nothing,
                      recreated=lambda tp, why: None, assigned=nothing)
    host = KafkaHost(WorkerConfig(kafka="k", clickhouse="chdb:///x"), hooks, None)  # type: ignore[arg-type]
    host.ready = {A}
    host._skip_below[A] = 11
    b = host._batch({A: [_rec(10), _rec(11), _rec(12)], B: [_rec(40), _rec(41)], C: []})
    assert [r.offset for r in b.records] == [11, 12]
    assert b.offsets == {A: 13} and b.firsts == {A: 11}
    assert b.lasts == {A: (1_700_000_000_000, fingerprint(_rec(12)))}
    assert host._rewind == {B: 40} and b.generation == 0
