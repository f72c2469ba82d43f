"""Pure logic of the worker's write step: which ClickHouse errors are retried, the
deduplication token of a step, the filter of events a cut-short step stored, the
outbox indices. (The faults themselves run in tests/integration/test_worker_exactly_once.py.)"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest
from aiokafka import TopicPartition
from clickhouse_connect.driver.exceptions import DatabaseError, DataError, OperationalError

from driftline.streams.ingest.transforms import Rejected
from driftline.streams.sinks.clickhouse import retryable
from driftline.streams.sinks.dlq import outbox_rows as _outbox_rows
from driftline.streams.sinks.write_step import Work as _Work
from driftline.streams.sinks.write_step import batch_token as _batch_token
from driftline.streams.sinks.write_step import drop_stored as _drop_stored
from driftline.streams.sinks.write_step import merge_marks as _merge_marks
from driftline.streams.worker import WorkerConfig


@pytest.mark.parametrize(("exc", "expected"), [
    (OperationalError("Error HTTPConnectionPool: connection refused"), True),
    (DatabaseError("Code: 252. DB::Exception: Too many parts (300). Merges are processing slower"), True),
    (DatabaseError("Code: 241. DB::Exception: Memory limit (total) exceeded"), True),
    (DatabaseError("Code: 159. DB::Exception: Timeout exceeded"), True),
    (ConnectionResetError(104, "reset"), True),
    (DatabaseError("Code: 53. DB::Exception: Type mismatch"), False),
    (DatabaseError("Code: 321. DB::Exception: Value is out of range of data type"), False),
    # a connection cut mid-insert: the server read a truncated body (not the rows' fault)
    (DatabaseError("Code: 33. DB::Exception: Cannot read all data. Bytes read: 12. Bytes expected: 40"), True),
    (DatabaseError("Code: 27. DB::Exception: Cannot parse input"), False),
    (DatabaseError("Code: 469. DB::Exception: Constraint `c` for table x is violated"), False),
    (DatabaseError("Code: 252. DB::Exception: Too many partitions for single INSERT block (more than 100)"), False),
    (DataError("Unable to create native array for column `x`"), False),
    (OverflowError("int too big to convert"), False),
])
def test_only_errors_that_can_pass_are_retried(exc: BaseException, expected: bool) -> None:
    assert retryable(exc) is expected


def _work(tp: TopicPartition, first: int, nxt: int, last: tuple[int, int]) -> _Work:
    return _Work(None, [], [], {tp: nxt}, firsts={tp: first}, lasts={tp: last})


def test_marks_and_token_follow_the_source_offsets() -> None:
    a, b = TopicPartition("t", 0), TopicPartition("t", 1)
    batch = [_work(a, 10, 20, (1, 11)), _work(a, 20, 35, (2, 22)), _work(b, 5, 6, (3, 33))]
    marks = _merge_marks(batch)
    assert marks == {a: (10, 34, 2, 22), b: (5, 5, 3, 33)}
    tok = _batch_token(marks, {})
    assert tok == _batch_token(dict(reversed(list(marks.items()))), {})  # order-free
    assert tok != _batch_token(marks, {a: 1})  # a recreated topic's offsets are another step
    assert tok != _batch_token({a: (10, 35, 2, 22), b: marks[b]}, {})


def test_events_a_cut_short_step_stored_are_dropped_once() -> None:
    t = pa.table({"event_id": ["x", "y", "z", "w"], "source_topic": ["t"] * 4,
                  "source_partition": pa.array([0, 0, 0, 1], pa.uint32()),
                  "source_offset": pa.array([7, 7, 8, 7], pa.uint64())})
    out = _drop_stored(t, {TopicPartition("t", 0): {(7, "x"), (8, "q")}})
    assert out.column("event_id").to_pylist() == ["y", "z", "w"]  # same offset, other event kept


def test_outbox_indices_number_the_rejections_of_one_record() -> None:
    rej = [Rejected("t", 0, 5, None, b"a", "r1"), Rejected("t", 0, 5, None, b"a", "r2"),
           Rejected("t", 0, 6, b"k", b"b", "r3", "app")]
    rows: list[dict[str, Any]] = _outbox_rows(rej, {TopicPartition("t", 0): 2})
    assert [(r["source_offset"], r["idx"], r["epoch"], r["field"]) for r in rows] == [
        (5, 0, 2, ""), (5, 1, 2, ""), (6, 0, 2, "app")]


def test_rebalance_timeout_must_exceed_the_drain() -> None:
    with pytest.raises(ValueError, match="rebalance_timeout_ms"):
        WorkerConfig(kafka="k", clickhouse="chdb:///x", revoke_drain_s=60.0, rebalance_timeout_ms=60_000)


class _Sent:
    def __init__(self, partition: int, offset: int) -> None:
        self.partition, self.offset = partition, offset


class _FakeProducer:
    """Stands for the DLQ producer (pure logic of the send loop): refuses values over
    ``limit`` bytes as Kafka does (MessageSizeTooLargeError), fails the first send of
    ``flaky`` offsets with a retriable error, and records what it delivered."""

    def __init__(self, limit: int, flaky: set[int]) -> None:
        self.limit, self.flaky = limit, set(flaky)
        self.delivered: list[tuple[int, bytes, str]] = []

    async def send(self, topic: str, value: bytes, key: Any = None, headers: Any = None) -> Any:
        import asyncio

        from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError

        h = dict(headers)
        off = int(h["driftline-source-offset"])
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if len(value) > self.limit:
            fut.set_exception(MessageSizeTooLargeError())
        elif off in self.flaky:
            self.flaky.discard(off)
            fut.set_exception(KafkaConnectionError("broker gone"))
        else:
            self.delivered.append((off, value, h["driftline-reason"].decode()))
            fut.set_result(_Sent(0, len(self.delivered) - 1))
        return fut


async def test_dlq_send_retries_only_failures_and_stubs_refused_records() -> None:
    """Mutations caught: resending the whole batch after one failure (offset 1 delivered
    twice); retrying a refused record as it is (the loop never ends: the test times out)."""
    import asyncio
    import hashlib

    from driftline.streams.sinks.dlq import DeadLetters
    from driftline.streams.sinks.prometheus import WorkerMetrics

    w = DeadLetters("127.0.0.1:1", "llm.events.dlq", WorkerMetrics())  # keepalive: a no-op
    fake = _FakeProducer(limit=100, flaky={2})
    w.producer = fake  # type: ignore[assignment]
    big = b"x" * 5000
    rows = [{"source_topic": "t", "source_partition": 0, "source_offset": i, "idx": 0, "key": b"k",
             "value": big if i == 3 else b"{bad", "reason": "not valid JSON", "field": ""} for i in range(5)]
    await asyncio.wait_for(w.send(rows), 20)
    offs = [o for o, _, _ in fake.delivered]
    assert sorted(offs) == [0, 1, 2, 3, 4] and len(offs) == 5
    stub = next(d for d in fake.delivered if d[0] == 3)
    assert stub[1] == b""
    assert stub[2] == ("not valid JSON [value of 5000 bytes left out: the DLQ refused it; sha256 "
                       f"{hashlib.sha256(big).hexdigest()}]")
    assert w.dead_lettered == 5


def test_a_skipped_batch_logged_without_fingerprint_is_not_a_recreated_topic() -> None:
    """Mutation caught: comparing (0, 0) like any fingerprint (a batch that decodes after
    a restart would be taken for another record: the partition read again from 0)."""
    from types import SimpleNamespace

    from driftline.streams.ingest.kafka_host import fingerprint as _fingerprint
    from driftline.streams.ingest.kafka_host import same_record as _same_record

    rec = SimpleNamespace(timestamp=1_700_000_000_000, key=b"k", value=b'{"a":1}', headers=())
    assert _same_record(rec, 0, 0)
    assert _same_record(rec, 1_700_000_000_000, _fingerprint(rec))
    assert not _same_record(rec, 1_700_000_000_000, _fingerprint(rec) ^ 1)
    assert not _same_record(rec, 1_700_000_000_001, _fingerprint(rec))
