"""A small helper for apps to emit LLMEvents to Kafka (topic ``llm.events``).

Events are validated with :func:`driftline.schemas.event.event_from_dict` before
they leave the app (a bad event raises :class:`~driftline.schemas.event.EventError`
at the call site instead of landing in the dead-letter topic), encoded as the
LLMEvent JSON wire format, and keyed ``app/model`` so that one app+model stays on
one partition. aiokafka batches records (``linger_ms``) and sends in the
background; :meth:`LLMEventEmitter.flush` waits until everything sent so far is
acknowledged.

>>> async with LLMEventEmitter("127.0.0.1:9092") as emitter:       # doctest: +SKIP
...     await emitter.send({"app": "support-bot", "request_model": "gpt-4o-mini",
...                         "timestamp": 1700000000000, "latency_ms": 812.0,
...                         "input_tokens": 120, "output_tokens": 48})
...     await emitter.flush()
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaProducer

from driftline.schemas.event import LLMEvent, encode_event, event_from_dict
from driftline.schemas.topics import EVENTS_TOPIC
from driftline.streams.ingest.kafka_security import KafkaSecurity

__all__ = ["LLMEventEmitter"]


class LLMEventEmitter:
    """Validating, batching LLMEvent producer.

    Parameters
    ----------
    bootstrap : Kafka bootstrap servers
    topic : target topic, ``llm.events`` by default
    linger_ms : how long aiokafka waits to fill a batch
    producer_options : further :class:`aiokafka.AIOKafkaProducer` options
    security : TLS / SASL settings (:class:`~driftline.streams.ingest.kafka_security.KafkaSecurity`)
    """

    def __init__(self, bootstrap: str, topic: str = EVENTS_TOPIC, *, linger_ms: int = 20,
                 producer_options: dict[str, Any] | None = None,
                 security: KafkaSecurity | None = None) -> None:
        if linger_ms < 0:
            raise ValueError(f"linger_ms must be >= 0, got {linger_ms}")
        self.bootstrap, self.topic = bootstrap, topic
        self._opts: dict[str, Any] = {"linger_ms": linger_ms, "acks": "all"}
        if security is not None:
            self._opts.update(security.aiokafka_kwargs())
        self._opts.update(producer_options or {})
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        self.sent = 0

    async def start(self) -> None:
        """Connect (also done by the first :meth:`send`)."""
        async with self._lock:
            if self._producer is None:
                p = AIOKafkaProducer(bootstrap_servers=self.bootstrap, **self._opts)
                await p.start()
                self._producer = p

    async def send(self, event: LLMEvent | dict[str, Any]) -> None:
        """Validate and queue one event; returns once it is in the producer's batch."""
        ev = event if isinstance(event, LLMEvent) else event_from_dict(event)
        if self._producer is None:
            await self.start()
        assert self._producer is not None
        key = f"{ev.app}/{ev.model}".encode()
        await self._producer.send(self.topic, encode_event(ev), key=key)
        self.sent += 1

    async def flush(self) -> None:
        """Wait until every queued event is acknowledged by Kafka."""
        if self._producer is not None:
            await self._producer.flush()

    async def close(self) -> None:
        """Flush and disconnect."""
        p, self._producer = self._producer, None
        if p is not None:
            await p.stop()

    async def __aenter__(self) -> LLMEventEmitter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
