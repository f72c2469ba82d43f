"""The control consumer and a control topic created after the worker started (found in the issue-15 review)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from helpers_worker import wait_for

from driftline.streams.ingest.bulk_producer import produce_records
from driftline.streams.ingest.control import ControlConsumer, Subscription
from driftline.streams.ports import KafkaPort


async def test_a_control_topic_created_after_start_still_gets_flush(kafka_bootstrap: str,
                                                                     make_topics: Any) -> None:
    """streams/ingest/control.py ControlConsumer._assign: a topic not found within
    find_timeout_s (10 s) is left out for the life of the process ("its commands are off
    until the next start"). The faust agent it replaced declared its topic and kept its
    subscription, so a flush sent once the topic exists reached the worker. Now a worker
    started before the control topic exists (create_topics off; the topic made later by
    an operator, or by the broker's auto-create on the first `driftline baseline`) never
    sees flush, with a single warning at start."""
    topic = f"ctl-late-{uuid.uuid4().hex[:8]}"
    got: list[str] = []
    c = ControlConsumer(KafkaPort(kafka_bootstrap), [Subscription(topic, lambda r: got.append(r.name))],
                        find_timeout_s=0.5)
    await c.start()
    try:
        await wait_for(lambda: c.ready.is_set(), 30, lambda: "never ready")
        make_topics({topic: 1})
        await asyncio.sleep(1.0)
        await produce_records(kafka_bootstrap, topic, [(None, json.dumps({"cmd": "flush"}).encode())])
        await wait_for(lambda: got == ["flush"], 15, lambda: f"flush never dispatched: {got}")
    finally:
        await c.stop()
