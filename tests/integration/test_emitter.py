"""``LLMEventEmitter`` against the real local broker: validated, keyed, decodable records."""

from __future__ import annotations

import time
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from driftline.schemas.event import EventError, LLMEvent, decode_event
from driftline.streams.ingest.emitter import LLMEventEmitter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_emitter_sends_validated_keyed_events(kafka_bootstrap: str, topic_name: str,
                                                     make_topics: Any) -> None:
    make_topics({topic_name: 2})
    base = {"app": "support-bot", "request_model": "gpt-4o-mini", "timestamp": 1_763_800_000_000,
            "latency_ms": 812.0, "input_tokens": 120, "output_tokens": 48,
            "prompt": "How do I reset my password?", "customer_tier": "gold"}
    async with LLMEventEmitter(kafka_bootstrap, topic=topic_name) as emitter:
        for i in range(20):
            await emitter.send({**base, "latency_ms": 800.0 + i})
        await emitter.send(LLMEvent(app="batch-job", response_model="claude-sonnet-4-20250514",
                                    timestamp=1_763_800_000_000, latency_ms=3.5))
        # a bad event raises here, at the call site, and nothing is sent for it
        with pytest.raises(EventError, match="latency_ms"):
            await emitter.send({**base, "latency_ms": -1})
        with pytest.raises(EventError, match="app"):
            await emitter.send({k: v for k, v in base.items() if k != "app"})
        await emitter.flush()
        assert emitter.sent == 21

    c = AIOKafkaConsumer(topic_name, bootstrap_servers=kafka_bootstrap, group_id=None,
                         auto_offset_reset="earliest", enable_auto_commit=False)
    await c.start()
    recs: list[Any] = []
    try:
        deadline = time.monotonic() + 20
        while len(recs) < 21 and time.monotonic() < deadline:
            for batch in (await c.getmany(timeout_ms=300)).values():
                recs.extend(batch)
        for _ in range(3):
            for batch in (await c.getmany(timeout_ms=300)).values():
                recs.extend(batch)
    finally:
        await c.stop()
    assert len(recs) == 21
    events = [decode_event(r.value) for r in recs]
    assert sorted(e.latency_ms for e in events if e.app == "support-bot") == \
        [800.0 + i for i in range(20)]
    keys = {r.key for r in recs}
    assert keys == {b"support-bot/gpt-4o-mini", b"batch-job/claude-sonnet-4-20250514"}
    # one key, one partition: an app+model's events stay in order for the windows
    assert len({r.partition for r in recs if r.key == b"support-bot/gpt-4o-mini"}) == 1
    sb = next(e for e in events if e.app == "support-bot")
    assert sb.extra == {"customer_tier": "gold"} and sb.event_id  # unknown keys kept, id set
