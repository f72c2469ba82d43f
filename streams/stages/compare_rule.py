"""The ``compare`` alert rule kind: ``driftline gate`` run by the worker, on a schedule.

A compare rule (schemas/rules.py) names two populations of calls (``baseline``,
``candidate``: label filters) and the gate's criteria. The populations span keys
(app/model) that different workers own, so the rule is not evaluated from the stream
but from ClickHouse, which holds every call: every ``interval`` (60 s by default) the
alerting stage runs :func:`evaluate` -- exactly :func:`driftline.streams.cli.compare.evaluate_gate`,
the code of ``driftline gate``, over the calls of ``lookback`` (or since ``since``) up
to now -- in a thread, its queries on the sink's query lane, and feeds the
:class:`CompareReading` to the evaluator (streams/stages/rule_engine.py), whose state
machine fires, holds and resolves the alert like any other kind's. "Now" is wall time,
not the stage's event-time clock: the rule reads the store, so it needs no event on
the owner (whose partitions may be idle) and a replay does not move it back.

- **fires** when a criterion fails with confidence (the gate's exit 1); the alert's
  labels are ``baseline`` and ``candidate`` (``label=value,...``) and ``app`` (when the
  rule has one); its value is the number of criteria failing, its annotations name them
  with their intervals (``failing``, ``metrics``, and a ``summary`` unless the rule gives
  its own);
- **resolves** when no criterion fails with confidence any more: the gate says pass (0)
  *or* cannot tell (2). A "worse with confidence" claim that the data no longer supports
  is withdrawn (with a sliding ``lookback`` old calls leave the range); use
  ``resolve_after`` to hold it through short doubts;
- "cannot tell yet" (too few calls, an interval across the limit, a ``since`` still
  ahead: then the store is not read) never fires.

A failed query is logged and counted (``driftline_alert_compare_runs_total{outcome=
"failed"}``); the rule keeps its state until a query succeeds. A rule runs at most once
per ``interval`` and never twice at once.

Ownership: exactly one worker of the group runs a rule, the one holding partition
``crc32(rule name) mod N`` of the worker's first input topic (N: its partition count,
read from Kafka at each assignment). With one worker that is the worker; a rebalance
moves it with the partition: the stage drops the rule's state on the old owner without
a transition and the new owner restores the alert from the ``alerts`` table (see
streams/stages/alerting.py), so each transition is recorded once.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from driftline.schemas.comparison import CompareSpec
    from driftline.schemas.rules import Rule
    from driftline.streams.cli.compare import CompareConfig, Criterion, GateResult
    from driftline.streams.ports import KafkaPort

__all__ = ["CompareReading", "compare_inputs", "reading", "evaluate", "owner_partition", "partition_count"]


@dataclass(frozen=True)
class CompareReading:
    """One run of a compare rule: the gate's exit code at ``at_ms`` (stage clock), the
    criteria that fail with confidence as (metric, why), and the calls per arm."""

    rule: str
    at_ms: int
    code: int
    failing: tuple[tuple[str, str], ...]
    n_baseline: int
    n_candidate: int


def compare_inputs(spec: CompareSpec, now_ms: int) -> tuple[CompareConfig, list[Criterion]]:
    """The gate's config and criteria for a run at ``now_ms``: calls in
    ``[spec.start_ms(now_ms), now_ms)``."""
    from driftline.streams.cli.compare import CompareConfig, Population, gate_criteria

    common = Population((("app", spec.app),) if spec.app else ())
    cfg = CompareConfig(Population(spec.baseline), Population(spec.candidate), common,
                        since_ms=spec.start_ms(now_ms), until_ms=now_ms, alpha=spec.alpha,
                        min_samples=spec.min_samples)
    return cfg, gate_criteria(dict(spec.limits))


def reading(rule: str, at_ms: int, code: int, results: list[GateResult], n_baseline: int,
            n_candidate: int) -> CompareReading:
    """A :class:`CompareReading` of :func:`driftline.streams.cli.compare.gate`'s output."""
    failing = tuple((r.criterion.metric, r.why) for r in results if r.state == "fails")
    return CompareReading(rule, at_ms, code, failing, n_baseline, n_candidate)


def evaluate(rule: Rule, run: Callable[[str, dict[str, Any]], bytes], database: str,
             now_ms: int) -> CompareReading:
    """Run ``rule``'s gate on the store (blocking: call it off the event loop); ``run(sql,
    params)`` returns ClickHouse's ``JSONEachRow`` bytes."""
    from driftline.streams.cli.compare import evaluate_gate

    assert rule.compare is not None, f"{rule.name} is not a compare rule"
    if rule.compare.start_ms(now_ms) >= now_ms:  # a fixed ``since`` still ahead (written before the rollout)
        return CompareReading(rule.name, now_ms, 2, (), 0, 0)  # cannot tell yet: no call in the range
    cfg, criteria = compare_inputs(rule.compare, now_ms)
    code, results, b, c = evaluate_gate(run, database, cfg, criteria)
    return reading(rule.name, now_ms, code, results, b.n, c.n)


def owner_partition(rule: str, partitions: int) -> int:
    """The partition whose holder runs ``rule`` (crc32: the same in every process)."""
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    return zlib.crc32(rule.encode()) % partitions


def partition_count(kafka: KafkaPort, topic: str, timeout_s: float = 10.0) -> int:
    """The partitions of ``topic`` (Kafka metadata; blocking)."""
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap, client_id="driftline-compare-rules",
                             request_timeout_ms=int(timeout_s * 1000), **kafka.security.kafka_python_kwargs())
    try:
        desc = admin.describe_topics([topic])
    finally:
        admin.close()
    parts = desc[0].get("partitions") if desc else None
    if not parts:
        raise RuntimeError(f"topic {topic!r} has no partitions in the broker's metadata")
    return len(parts)
