"""The Kafka topics driftline reads and writes: their names and default partitions.

Every module takes the names from here; a topic named anywhere else is a bug.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

__all__ = ["is_otlp_topic", "EVENTS_TOPIC", "DLQ_TOPIC", "OTLP_TOPIC", "OTLP_TOPIC_PREFIX", "CONTROL_TOPIC", "DEFAULT_PARTITIONS"]

#: JSON LLMEvents (schemas/event.py), one per record
EVENTS_TOPIC: Final = "llm.events"
#: rejected records with their reason (the DLQ)
DLQ_TOPIC: Final = "llm.events.dlq"
#: whole OTLP ExportTraceServiceRequests (schemas/otlp.py)
OTLP_TOPIC: Final = "otlp_spans"
#: records of ``otlp_spans`` and of any ``otlp_spans.<suffix>`` topic (one per team or
#: tenant, say) are OTLP ExportTraceServiceRequests; every other topic carries JSON LLMEvents
OTLP_TOPIC_PREFIX: Final = OTLP_TOPIC + "."
#: drift baseline and flush commands (streams/ingest/control_auth.py signs them)
CONTROL_TOPIC: Final = "driftline.control"

#: topic -> partitions created by the demo and the worker when missing
DEFAULT_PARTITIONS: Final = MappingProxyType({EVENTS_TOPIC: 4, DLQ_TOPIC: 1, OTLP_TOPIC: 4, CONTROL_TOPIC: 1})


def is_otlp_topic(topic: str) -> bool:
    """Are the records of ``topic`` OTLP requests (``otlp_spans`` or ``otlp_spans.<suffix>``)?"""
    return topic == OTLP_TOPIC or topic.startswith(OTLP_TOPIC_PREFIX)
