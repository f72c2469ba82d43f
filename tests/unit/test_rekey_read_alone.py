"""The OTLP re-keyer's read of each partition alone (a fetched record batch cannot be
unpacked) when the group revokes a partition meanwhile: the rebalance callback runs
while the read awaits Kafka, so the next partition of the loop may no longer be
assigned. The consumer is a stand-in raising what aiokafka 0.14 raises then
(``IllegalStateError`` from ``seek``/``getmany``/``position``); the re-keyer must go
on with the partitions it still holds, never end (it would take the worker down)."""

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
