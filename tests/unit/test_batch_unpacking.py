"""Which fetch errors the worker treats as an undecodable record batch, and where that
batch ends: aiokafka's real record code (builder, MemoryRecords, PartitionRecords) on
hand-made batches, no broker. The end-to-end case is
tests/integration/test_undecodable_batch.py.

Mutations caught (checked): ``_unpacking`` matching only UnsupportedCodecError /
CorruptRecordException (cramjam's DecompressionError on corrupt snappy data with a
valid CRC is then re-raised: the worker dies); ``_failed_batch_end`` returning
``pos`` (the batch is then skipped one offset at a time: 5 DLQ records, not 1).
"""

from __future__ import annotations

import struct

import pytest
from aiokafka import TopicPartition
from aiokafka.consumer.fetcher import PartitionRecords
from aiokafka.errors import CorruptRecordException, KafkaConnectionError
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import calc_crc32c

from driftline.streams.ingest.kafka_host import failed_batch_end as _failed_batch_end
from driftline.streams.ingest.kafka_host import unpacking_error as _unpacking

cramjam = pytest.importorskip("cramjam")


def _batch(base: int, n: int, codec: int) -> bytearray:
    b = DefaultRecordBatchBuilder(magic=2, compression_type=codec, is_transactional=False, producer_id=-1,
                                  producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
    for i in range(n):
        b.append(i, timestamp=None, key=None, value=b"v%d" % i * 20, headers=[])
    buf = bytearray(b.build())
    struct.pack_into(">q", buf, 0, base)
    return buf


def _read(buf: bytes) -> tuple[list[int], BaseException]:
    pr = PartitionRecords(TopicPartition("t", 0), MemoryRecords(buf), [], 0, None, None, True, 0)
    got: list[int] = []
    with pytest.raises(Exception) as info:  # noqa: PT011 - the type is what is checked
        for r in pr:
            got.append(r.offset)
    return got, info.value


@pytest.mark.parametrize("fix_crc", [True, False], ids=["corrupt-data-valid-crc", "bad-crc"])
def test_corrupt_snappy_batch_is_recognised_with_its_offsets(fix_crc: bool) -> None:
    bad = _batch(3, 5, 2)  # snappy, offsets 3 to 7, after a plain batch at 0 to 2
    for i in range(65, len(bad)):  # the compressed records, past the 61-byte header
        bad[i] ^= 0x5A
    if fix_crc:
        struct.pack_into(">I", bad, 17, calc_crc32c(bytes(bad[21:])))
    got, err = _read(bytes(_batch(0, 3, 0) + bad))
    assert got == [0, 1, 2]
    assert isinstance(err, cramjam.DecompressionError if fix_crc else CorruptRecordException)
    assert _unpacking(err)
    assert _failed_batch_end(err, 3) == 7


def test_other_errors_are_not_undecodable_batches() -> None:
    try:
        raise KafkaConnectionError("broker gone")
    except KafkaConnectionError as err:
        assert not _unpacking(err)
        assert _failed_batch_end(err, 42) == 42  # no batch known: one offset
