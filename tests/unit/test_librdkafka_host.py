"""The librdkafka host's pure parts (streams/ingest/librdkafka_host.py), without a broker:
messages to records and rejected offsets, the consumer thread's service while a rebalance
callback waits on the event loop, the batch dropped across a rebalance, cut-off from
librdkafka's statistics, and the worker's choice of host.

Mutations caught: ``group_messages`` dropping error messages (the ``bad`` entry is
missing) or keeping one without a partition; ``ConsumerThread.wait`` blocking on the
future instead of serving the queue (the commit-in-revoke test times out: deadlock);
``LibrdkafkaHost._refetch`` dropping the newer generation's batch (it is not kept) or
keeping a stale one; ``cut_off`` ignoring the leader's broker state, or taking a partition
without a leader (-1) for up because the logical GroupCoordinator broker (nodeid -1) is UP;
WorkerConfig taking any ``consumer`` name.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from typing import Any

import pytest
from aiokafka import TopicPartition
from confluent_kafka import KafkaError, Message

from driftline.streams.ingest.kafka_host import HostHooks, InFlight
from driftline.streams.ingest.librdkafka_host import ConsumerThread, LibrdkafkaHost, group_messages
from driftline.streams.worker import Worker, WorkerConfig


def _msg(p: int, off: int, value: bytes | None = b"v", **kw: Any) -> Any:
    return Message(topic="t", partition=p, offset=off, key=b"k%d" % off, value=value,
                   timestamp=(1, 1_000 + off), **kw)


def test_messages_become_records_per_partition_and_errors_rejected_offsets() -> None:
    msgs = [_msg(0, 5, headers=[("h", b"1")]), _msg(1, 9), _msg(0, 6, value=None),
            Message(topic="t", partition=1, offset=10, error=KafkaError(KafkaError._BAD_MSG, "bad crc")),
            Message(topic="t", partition=1, offset=12, error=KafkaError(KafkaError._BAD_MSG, "bad crc")),
            Message(topic="t", partition=0, offset=7, error=KafkaError(KafkaError._PARTITION_EOF, "eof")),
            Message(error=KafkaError(KafkaError._ALL_BROKERS_DOWN, "down"))]
    data, bad = group_messages(msgs)
    assert {tp: [(r.topic, r.partition, r.offset, r.timestamp, r.key, r.value, list(r.headers)) for r in recs]
            for tp, recs in data.items()} == {
        TopicPartition("t", 0): [("t", 0, 5, 1_005, b"k5", b"v", [("h", b"1")]), ("t", 0, 6, 1_006, b"k6", None, [])],
        TopicPartition("t", 1): [("t", 1, 9, 1_009, b"k9", b"v", [])]}
    assert bad == {TopicPartition("t", 1): (10, 12, "KafkaError _BAD_MSG: bad crc")}


def test_consumer_thread_serves_calls_while_a_callback_waits_on_the_loop() -> None:
    """A revocation's drain commits on the consumer thread while that thread runs the
    revocation callback: without the service in ``wait`` it would deadlock."""
    ct = ConsumerThread("test-consumer")
    seen: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def revoke() -> str:
            await ct.submit(seen.append, "commit")  # on the consumer thread, which is in the callback
            return "revoked"

        def callback() -> Any:  # as librdkafka calls on_revoke: on the consumer thread, inside consume
            return ct.wait(asyncio.run_coroutine_threadsafe(revoke(), loop))

        assert await asyncio.wait_for(ct.submit(callback), 5) == "revoked"
        assert not ct.in_callback

    try:
        asyncio.run(main())
    finally:
        ct.stop()
    assert seen == ["commit"]


def _host() -> LibrdkafkaHost:
    async def nothing(*a: Any) -> Any:
        return {}
    hooks = HostHooks(decode=lambda r: None, deliver=nothing, revoke=nothing, resume=nothing,
                      recreated=lambda tp, why: None, assigned=nothing)
    return LibrdkafkaHost(WorkerConfig(kafka="127.0.0.1:1", clickhouse="chdb:///nowhere"), hooks,
                          concurrent.futures.ThreadPoolExecutor(1))


def _batch(gen: int) -> InFlight:
    return InFlight([object()], {TopicPartition("t", 0): 5}, {TopicPartition("t", 0): 0}, {}, gen, None)


def test_a_stale_batch_is_dropped_and_the_next_kept_when_fetched_after_the_assignment() -> None:
    h = _host()
    stale, after = _batch(1), _batch(3)
    h.generation, h.pending = 3, after
    h._refetch(stale)
    assert h.pending is after  # fetched from the resumed offsets: delivered
    same = _batch(1)
    h.pending = same
    h._refetch(stale)
    assert h.pending is None  # fetched before the rebalance too: dropped, fetched again


def test_cut_off_follows_the_leaders_broker_state() -> None:
    h = _host()
    h.consumer = object()
    h.assigned = {TopicPartition("t", 0), TopicPartition("t", 1)}

    def stats(state: str) -> str:
        return json.dumps({"brokers": {"b1": {"nodeid": 1, "state": state}},
                           "topics": {"t": {"partitions": {"0": {"leader": 1}, "1": {"leader": 1},
                                                           "-1": {"leader": -1}}}}})
    assert h.cut_off()  # no statistics yet
    h._on_stats(stats("UP"))
    assert not h.cut_off()
    h._paused = True
    assert h.cut_off()
    h._paused = False
    h._on_stats(stats("TRY_CONNECT"))
    assert h.cut_off()
    h._on_stats(stats("UP"))
    h._stats_at = time.monotonic() - 3
    assert h.cut_off()  # statistics older than 2 s say nothing
    # a partition without a leader (-1) while the group coordinator's logical broker (nodeid -1,
    # as librdkafka 2.16 reports it) is UP: not reachable
    h._on_stats(json.dumps({"brokers": {"b1": {"nodeid": 1, "state": "UP"},
                                        "GroupCoordinator": {"nodeid": -1, "state": "UP"}},
                            "topics": {"t": {"partitions": {"0": {"leader": 1}, "1": {"leader": -1}}}}}))
    assert h._up == {("t", 0)} and h.cut_off()


def test_worker_config_names_the_host(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="consumer must be aiokafka or librdkafka"):
        WorkerConfig(kafka="k", clickhouse="c", consumer="kafka-python")
    w = Worker(WorkerConfig(kafka="127.0.0.1:1", clickhouse=f"chdb://{tmp_path}/c", consumer="librdkafka"))
    assert type(w.host) is LibrdkafkaHost
