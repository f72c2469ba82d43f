"""The OTLP re-keyer's handling of what Kafka returns, with a stand-in client (the
broker cases it stands for cannot be made on the local Tansu broker: no DeleteRecords, no
transactions, no max.message.bytes, and a rebalance cannot be timed into one await).

(1) A gap in a partition's offsets (deleted by retention while nobody re-keyed it; a
compacted topic; transaction markers): after one seek back, the re-keyer goes on past the
gap instead of seeking back forever (a stalled partition).

(2) The read of each partition alone (a fetched record batch cannot be
unpacked) when the group revokes a partition meanwhile: the rebalance callback runs
while the read awaits Kafka, so the next partition of the loop may no longer be
assigned. The consumer is a stand-in raising what aiokafka 0.14 raises then
(``IllegalStateError`` from ``seek``/``getmany``/``position``); the re-keyer must go
on with the partitions it still holds, never end (it would take the worker down).

(3) A record batch the events topic refuses for its size (max.message.bytes below the
client's batch size): its records are sent one by one, not all dead-lettered as too large."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import IllegalStateError
from prometheus_client import CollectorRegistry

from driftline.streams.ingest.rekey import RekeyConfig, Rekeyer
from driftline.streams.sinks.prometheus import WorkerMetrics

A, B = TopicPartition("otlp_spans", 0), TopicPartition("otlp_spans", 1)


class Consumer:
    """Holds ``assigned``; A's read revokes B (as the group's callback would, meanwhile)."""

    def __init__(self, rk: Rekeyer) -> None:
        self.rk, self.assigned, self.pos = rk, {A, B}, {A: 3, B: 7}

    def _check(self, tp: TopicPartition) -> None:
        if tp not in self.assigned:
            raise IllegalStateError(f"Partition {tp} is not assigned")

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._check(tp)
        self.pos[tp] = offset

    async def getmany(self, *parts: TopicPartition, timeout_ms: int = 0, max_records: int = 1
                      ) -> dict[TopicPartition, list[Any]]:
        for tp in parts:
            self._check(tp)
        tp = parts[0]
        if tp == A and B in self.assigned:  # the rebalance: B goes while A is read
            await self.rk._on_revoked([B])
            self.assigned.discard(B)
        if tp == A and self.pos[A] < 5:
            self.pos[A] += 1
            return {A: [SimpleNamespace(offset=self.pos[A] - 1)]}
        return {}

    async def position(self, tp: TopicPartition) -> int:
        self._check(tp)
        return self.pos[tp]


def test_a_partition_revoked_during_the_read_alone_is_left_out() -> None:
    cfg = RekeyConfig(kafka="127.0.0.1:1", sources=("otlp_spans",), target="llm.events", dlq_topic="dlq",
                      group_id="g.otlp-rekey", max_batch=10)

    async def go() -> tuple[dict[TopicPartition, list[Any]], dict[Any, Any]]:
        rk = Rekeyer(cfg, None, WorkerMetrics(CollectorRegistry()), None)  # type: ignore[arg-type]
        rk._pos = {A: 3, B: 7}
        return await rk._read_alone(Consumer(rk), ValueError("bad batch"))  # type: ignore[arg-type]

    data, bad = asyncio.run(go())
    assert {tp: [r.offset for r in recs] for tp, recs in data.items()} == {A: [3, 4]}
    assert bad == {}


class Seeks:
    def __init__(self) -> None:
        self.sought: list[tuple[TopicPartition, int]] = []

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.sought.append((tp, offset))


def test_a_gap_in_the_offsets_is_passed_after_one_seek_back() -> None:
    cfg = RekeyConfig(kafka="127.0.0.1:1", sources=("otlp_spans",), target="llm.events", dlq_topic="dlq",
                      group_id="g.otlp-rekey")
    rk = Rekeyer(cfg, None, WorkerMetrics(CollectorRegistry()), None)  # type: ignore[arg-type]
    consumer = rk.consumer = Seeks()  # type: ignore[assignment]
    rk._pos = {A: 10}

    def recs(*offsets: int) -> list[Any]:
        return [SimpleNamespace(offset=o) for o in offsets]

    # records before the position (a fetch from a stale commit): dropped
    assert rk._in_order(A, recs(8, 9)) == [] and consumer.sought == []
    # records past the position: sought back once
    assert rk._in_order(A, recs(15, 16)) == [] and consumer.sought == [(A, 10)]
    # the same after the seek: offsets 10-14 are gone; go on at 15
    assert [r.offset for r in rk._in_order(A, recs(15, 16))] == [15, 16] and consumer.sought == [(A, 10)]
    # the next gap is sought back once again
    rk._pos[A] = 17
    assert rk._in_order(A, recs(19)) == [] and consumer.sought == [(A, 10), (A, 17)]
    assert [r.offset for r in rk._in_order(A, recs(17, 18))] == [17, 18]


class Batch:
    def __init__(self) -> None:
        self.n = 0

    def append(self, *, key: bytes, value: bytes, timestamp: Any, headers: Any) -> object | None:
        if self.n >= 3:  # the client's batch size: 3 records
            return None
        self.n += 1
        return object()

    def close(self) -> None:
        pass


class SmallTopicProducer:
    """A topic whose max.message.bytes takes one record per batch but not three: the broker
    refuses a record batch larger than that with MessageSizeTooLargeError (the local Tansu
    broker does not enforce max.message.bytes)."""

    def __init__(self) -> None:
        self.stored: list[int] = []

    def create_batch(self) -> Batch:
        return Batch()

    async def send_batch(self, batch: Batch, topic: str, *, partition: int) -> Any:
        from aiokafka.errors import MessageSizeTooLargeError

        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if batch.n > 1:
            fut.set_exception(MessageSizeTooLargeError())
        else:
            self.stored.append(partition)
            fut.set_result(SimpleNamespace(partition=partition, offset=len(self.stored) - 1))
        return fut


def test_a_batch_refused_for_its_size_is_sent_record_by_record() -> None:
    """Six events that fit the topic one by one: all six are stored, none dead-lettered as
    refused (before: every member of a refused batch went to the DLQ as 'too large')."""
    from driftline.streams.ingest.rekey import _Send

    cfg = RekeyConfig(kafka="127.0.0.1:1", sources=("otlp_spans",), target="llm.events", dlq_topic="dlq",
                      group_id="g.otlp-rekey")
    rk = Rekeyer(cfg, None, WorkerMetrics(CollectorRegistry()), None)  # type: ignore[arg-type]
    producer = rk.producer = SmallTopicProducer()  # type: ignore[assignment]
    rk._parts = [TopicPartition("llm.events", 0)]
    sends = [_Send(("otlp_spans", 0, 7, i), b"app/model", b"{}") for i in range(6)]
    refused = asyncio.run(rk._send_events(sends))
    assert (refused, len(producer.stored), rk.rekeyed) == ([], 6, 6)
