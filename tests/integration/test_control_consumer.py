"""The one control-topic consumer (streams/ingest/control.py) on the real local broker.

No worker: the consumer, two topics and recording subscribers. What it must keep from
the two consumers it replaced (the faust agent for flush, the drift stage's own for
baseline): baseline gets every record from the topic's start (a worker that was down
applies what it missed), flush only what is sent while it runs, each command reaches
only its subscribers, and junk never ends the consumer.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from helpers_worker import wait_for

from driftline.streams.ingest.bulk_producer import produce_records
from driftline.streams.ingest.control import ControlConsumer, ControlRecord, Subscription
from driftline.streams.ports import KafkaPort


def _rec(cmd: dict[str, Any]) -> tuple[None, bytes]:
    return None, json.dumps(cmd).encode()


async def test_baseline_replays_from_the_start_and_flush_is_live_only(kafka_bootstrap: str,
                                                                     make_topics: Any) -> None:
    # Mutations caught: seeking every topic to its start (the history flush reaches the host:
    # host == [f1, f2, x]), seeking replayed topics to their end (baseline misses b1), routing
    # without the cmd filter (the host gets baselines, drift gets flushes), a decode error or a
    # failing handler ending the consumer (b2 and x never arrive), a group id (a second consumer
    # would share the partitions instead of both reading every record).
    u = uuid.uuid4().hex[:8]
    ctl, other = f"ctl-{u}", f"ctl2-{u}"
    make_topics({ctl: 2, other: 1})
    await produce_records(kafka_bootstrap, ctl, [
        _rec({"cmd": "baseline", "id": "b1"}), _rec({"cmd": "flush", "id": "f1"}), (None, b"{not json"),
        _rec({"cmd": "baseline", "id": "boom"})])
    await produce_records(kafka_bootstrap, other, [_rec({"cmd": "baseline", "id": "o1"})])

    def consumer() -> tuple[ControlConsumer, dict[str, list[str]]]:
        got: dict[str, list[str]] = {"drift": [], "host": [], "other": []}

        def drift(rec: ControlRecord) -> None:
            if rec.cmd["id"] == "boom":
                raise RuntimeError("a failing handler")
            got["drift"].append(rec.cmd["id"])

        subs = [Subscription(ctl, drift, frozenset({"baseline"}), replay=True),
                Subscription(ctl, lambda rec: got["host"].append(rec.cmd["id"])),
                Subscription(other, lambda rec: got["other"].append(rec.cmd["id"]), frozenset({"baseline"}),
                             replay=True)]
        return ControlConsumer(KafkaPort(kafka_bootstrap), subs), got

    (c1, got1), (c2, got2) = consumer(), consumer()
    await c1.start()
    await c2.start()
    try:
        await wait_for(lambda: c1.ready.is_set() and c2.ready.is_set(), 30, lambda: "never assigned")
        await wait_for(lambda: got1["drift"] == ["b1"] and got2["other"] == ["o1"], 30, lambda: f"{got1} {got2}")
        await produce_records(kafka_bootstrap, ctl, [
            _rec({"cmd": "flush", "id": "f2"}), _rec({"cmd": "baseline", "id": "b2"}),
            _rec({"cmd": "x", "id": "x"}), (None, b"[1, 2]")])
        for got in (got1, got2):
            await wait_for(lambda g=got: len(g["host"]) == 2 and len(g["drift"]) == 2, 30, lambda g=got: str(g))
            got["host"].sort()  # two partitions: no order between them
            assert got == {"drift": ["b1", "b2"], "host": ["f2", "x"], "other": ["o1"]}
    finally:
        await c1.stop()
        await c2.stop()
