"""The ClickHouse sink on real chDB: a retried insert stores nothing twice, and a slow
query does not stall ingestion.

- A retry of an insert whose first attempt landed in part (one month partition of
  two: each is its own part) stores every row once. Catches: inserting without an
  ``insert_deduplication_token`` or without ``non_replicated_deduplication_window``
  on the table (the January rows would be stored twice).
- A query that runs past ``query_timeout_s`` is cancelled by ClickHouse
  (TIMEOUT_EXCEEDED), and an ingest-lane insert issued meanwhile finishes at once.
  Catches: one client/thread for both (the insert waits for the query).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

import pytest

from driftline.streams.sinks.clickhouse import ClickHouseSink
from driftline.streams.stages.semantic_drift import SCORE_COLUMNS

pytestmark = [pytest.mark.integration]

UTC = dt.UTC


def _score(ts: dt.datetime, i: int) -> dict[str, Any]:
    return {"ts": ts, "app": "a", "model": "m", "prompt_version": "v1", "field": "prompt", "method": "mmd",
            "statistic": float(i), "p_value": 0.5, "threshold": 0.05, "drifted": 0, "n_ref": 10, "n_cur": 10,
            "explanation": "{}"}


async def test_retry_after_a_partly_landed_insert_stores_each_row_once(chdb_dsn: str) -> None:
    sink = ClickHouseSink(chdb_dsn)
    try:
        sink.ensure_schema()
        jan = [_score(dt.datetime(2025, 1, 1, tzinfo=UTC) + dt.timedelta(minutes=i), i) for i in range(5)]
        feb = [_score(dt.datetime(2025, 2, 1, tzinfo=UTC) + dt.timedelta(minutes=i), i) for i in range(3)]
        # the first attempt's January part landed, its February part did not
        await sink.insert_rows("drift_scores", jan, SCORE_COLUMNS, token="step-1")
        await sink.insert_rows("drift_scores", jan + feb, SCORE_COLUMNS, token="step-1")  # the retry
        await sink.insert_rows("drift_scores", jan + feb, SCORE_COLUMNS, token="step-1")  # and once more
        rows = sink.query_rows("SELECT toMonth(ts), count() FROM driftline.drift_scores GROUP BY 1 ORDER BY 1")
        assert rows == [(1, 5), (2, 3)]
        # another step with the same rows is not a retry: stored again
        await sink.insert_rows("drift_scores", feb, SCORE_COLUMNS, token="step-2")
        assert sink.query_rows("SELECT count() FROM driftline.drift_scores") == [(11,)]
    finally:
        sink.close()


async def test_slow_query_is_cut_and_does_not_stall_ingestion(chdb_dsn: str) -> None:
    sink = ClickHouseSink(chdb_dsn, query_timeout_s=3.0)
    try:
        sink.ensure_schema()
        t0 = time.monotonic()
        slow = asyncio.create_task(sink.acall(lambda c: c.query(
            "SELECT count() FROM numbers(100000000000) WHERE sleepEachRow(0) = 0").result_rows))
        await asyncio.sleep(0.5)
        rows = [_score(dt.datetime(2025, 1, 1, tzinfo=UTC), 1)]
        t1 = time.monotonic()
        await sink.insert_rows("drift_scores", rows, SCORE_COLUMNS, ingest=True)
        insert_s = time.monotonic() - t1
        with pytest.raises(Exception, match="TIMEOUT_EXCEEDED"):
            await slow
        assert insert_s < 1.0, f"the insert waited {insert_s:.1f}s for the query"
        assert 2.5 < time.monotonic() - t0 < 20
    finally:
        sink.close()


async def test_a_store_from_before_the_write_log_is_logged_once(chdb_dsn: str) -> None:
    """A store whose llm_events predate ``ingest_log`` gets one write-log row per source
    partition at its highest stored offset (fingerprint (0, 0): nothing to check), so a
    worker resumes after it; a store that has the log is left alone. Catches: no
    migration (a worker would read those partitions again from their beginning, and only
    event_id would collapse the copies under FINAL) or a migration run on every start."""
    sink = ClickHouseSink(chdb_dsn)
    try:
        sink.ensure_schema()
        assert sink.query_rows("SELECT count() FROM driftline.ingest_log") == [(0,)]
        sink.call(lambda c: c.command(
            "INSERT INTO driftline.llm_events (event_id, timestamp, app, model, source_topic, source_partition, "
            "source_offset) SELECT toString(number), now64(3), 'a', 'm', 'llm.events', number % 2, number "
            "FROM numbers(11)"))
        sink.call(lambda c: c.command("DROP TABLE driftline.ingest_log"))
        sink.ensure_schema()
        rows = sink.query_rows("SELECT source_topic, source_partition, epoch, first_offset, last_offset, "
                               "last_timestamp, last_fingerprint, watermark_ms FROM driftline.ingest_log "
                               "ORDER BY source_partition")
        assert rows == [("llm.events", 0, 0, 10, 10, 0, 0, 0), ("llm.events", 1, 0, 9, 9, 0, 0, 0)]
        sink.ensure_schema()
        assert sink.query_rows("SELECT count() FROM driftline.ingest_log") == [(2,)]
        assert sink.ingest_marks("llm.events", [0, 1])[1][2] == 9
    finally:
        sink.close()
