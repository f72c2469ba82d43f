#!/bin/bash
# Creates driftline's topics (names: schemas/topics.py) once; idempotent (--if-not-exists).
set -euo pipefail
KT=/opt/kafka/bin/kafka-topics.sh
create() {  # name partitions
  "$KT" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic "$1" \
    --partitions "$2" --replication-factor 1
}
create llm.events "${EVENTS_PARTITIONS:-12}"
create otlp_spans "${EVENTS_PARTITIONS:-12}"
create llm.events.dlq 1
create driftline.control 1
"$KT" --bootstrap-server "$BOOTSTRAP" --list
