"""Rebuilding the open windows after a rebalance or a restart, from the stored rows.

A worker that takes a partition over has no window state for it: the windows
that may still be open are recomputed from the ``llm_events`` rows of finished
write steps (:func:`recent_rows`, one query per assignment on the sink's query
lane), without those of windows the write log says were already written final
(:func:`open_at`), and added to a fresh aggregator (:func:`rebuild`).

The SQL runs on whatever ``client`` is passed in (clickhouse-connect's client,
or anything with its ``query(sql, column_oriented=...)``): the query port.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from aiokafka import TopicPartition

from driftline.schemas.window_stats import WindowKey
from driftline.streams.stages.windows import (
    EventBatchColumns,
    WindowAggregator,
    WindowConfig,
    source_index,
)

__all__ = ["recent_rows", "open_at", "rebuild"]


def open_at(cols: EventBatchColumns, wc: WindowConfig, watermark_ms: int) -> EventBatchColumns:
    """The rows of ``cols`` whose window was still open at ``watermark_ms`` (its end plus
    the allowed lateness after it): a rebuild must not reopen a window already written
    final, or its partial rows would replace the final one with a recount of fewer rows."""
    starts = cols.ts_ms - cols.ts_ms % wc.size_ms
    keep = np.flatnonzero(starts + wc.size_ms + wc.allowed_lateness_ms > watermark_ms)
    return cols if keep.size == len(cols) else cols.take(keep)


def rebuild(windows: WindowAggregator, cols: EventBatchColumns | None, closed_below: int | None,
            wall_ms: int) -> int:
    """Add the open windows of ``cols`` (the stored rows of :func:`recent_rows`) to
    ``windows``, its watermark raised to at least ``closed_below`` (the highest one the
    write log recorded: windows closed below it are not reopened). Returns the number of
    stored rows added (0: nothing to rebuild).

    ``windows`` is the aggregator the worker installed when the partitions were
    assigned: the fetch loop may already have added the first batches of the new
    assignment to it while the stored rows were read, and those stay."""
    wc = windows.config
    if closed_below is not None:
        if windows.watermark_ms is None or windows.watermark_ms < closed_below:
            windows.watermark_ms = closed_below
        if cols is not None:
            cols = open_at(cols, wc, closed_below)
    if cols is None or not len(cols):
        return 0
    windows.add(cols, wall_ms=wall_ms)
    windows.advance(wall_ms=wall_ms)  # what closed meanwhile was written final already
    return len(cols)


def _source_cond(tps: list[TopicPartition], logged: Mapping[TopicPartition, int]) -> str:
    """SQL: the rows of ``tps``, each up to its logged offset where it has one."""
    return " OR ".join(f"(source_topic = '{tp.topic}' AND source_partition = {int(tp.partition)}"
                       f"{_bound(logged, tp.topic, tp.partition)})" for tp in tps)


def _bound(logged: Mapping[TopicPartition, int], topic: str, partition: int) -> str:
    tp = TopicPartition(topic, int(partition))
    return f" AND source_offset <= {int(logged[tp])}" if tp in logged else ""


_COLUMNS = ("SELECT app, model, prompt_version, toUnixTimestamp64Milli(timestamp), latency_ms, "
            "ifNull(ttft_ms, nan), ifNull(tpot_ms, nan), status = 'error', ifNull(input_tokens, 0), "
            "ifNull(output_tokens, 0), ifNull(cache_read_input_tokens, 0), "
            "ifNull(cache_creation_input_tokens, 0), ifNull(reasoning_output_tokens, 0), "
            "ifNull(cost_usd, nan), length(guardrail_verdicts) > 0, guardrail_hit, "
            "has(guardrail_verdicts, 'blocked'), ifNull(toFloat64(feedback), nan), source_topic, "
            "source_partition")


def recent_rows(client: Any, db: str, tps: list[TopicPartition], wc: WindowConfig,
                wall_ms: int | None = None,
                logged: Mapping[TopicPartition, int] | None = None) -> EventBatchColumns | None:
    """The stored events of the windows that may still be open, as window-stage columns.

    Per partition: its newest stored event time (ignoring rows beyond the wall clock plus
    ``watermark_max_ahead_ms``, so one far-future row poisons nothing) minus two window
    spans; the rows carry their partition, so each partition's watermark is rebuilt.
    Only rows of finished write steps (``source_offset`` up to the write log, where
    ``logged`` has one): the records of a step cut short are processed again, so
    their windows are recomputed, and closed, from every one of their events.
    """
    tps = [tp for tp in tps if "'" not in tp.topic]
    if not tps:
        return None
    logged = logged or {}
    ahead = wc.watermark_max_ahead_ms
    cap = f" AND timestamp <= fromUnixTimestamp64Milli({int(wall_ms + ahead)})" \
        if wall_ms is not None and ahead is not None else ""
    mx = client.query(f"SELECT source_topic, source_partition, toUnixTimestamp64Milli(max(timestamp)) "
                      f"FROM {db}.llm_events WHERE ({_source_cond(tps, logged)}){cap} "
                      "GROUP BY source_topic, source_partition").result_rows
    if not mx:
        return None
    span = 2 * (wc.size_ms + wc.allowed_lateness_ms)
    cond = " OR ".join(f"(source_topic = '{t}' AND source_partition = {int(p)}{_bound(logged, t, p)} AND "
                       f"timestamp >= fromUnixTimestamp64Milli({int(m) - span}))" for t, p, m in mx)
    res = client.query(f"{_COLUMNS} FROM {db}.llm_events FINAL WHERE ({cond}){cap} ORDER BY timestamp",
                       column_oriented=True)
    return _columns(res.result_columns)


def _columns(c: Any) -> EventBatchColumns | None:
    """The window-stage columns of the result columns of the rebuild query (None if empty)."""
    if not c or not len(c[0]):
        return None
    keys = [WindowKey(a, m, p) for a, m, p in zip(c[0], c[1], c[2], strict=True)]

    def f(i: int) -> np.ndarray:
        return np.asarray(c[i], dtype=float)

    def n(i: int) -> np.ndarray:
        return np.asarray(c[i], dtype=np.int64)

    def b(i: int) -> np.ndarray:
        return np.asarray(c[i], dtype=bool)

    topics = sorted(set(c[18]))
    tcode = {t: i for i, t in enumerate(topics)}
    src_codes, src_list = source_index(np.fromiter((tcode[t] for t in c[18]), np.int64, len(c[18])),
                                       topics, n(19))
    return EventBatchColumns(
        keys=keys, ts_ms=n(3), latency_ms=f(4), ttft_ms=f(5), tpot_ms=f(6), is_error=b(7),
        input_tokens=n(8), output_tokens=n(9), cache_read_input_tokens=n(10),
        cache_creation_input_tokens=n(11), reasoning_output_tokens=n(12), cost_usd=f(13),
        guardrail_checked=b(14), guardrail_hit=b(15), guardrail_blocked=b(16), feedback=f(17),
        source_codes=src_codes, source_list=src_list)
