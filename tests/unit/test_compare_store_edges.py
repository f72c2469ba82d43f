"""``driftline gate`` / the ``compare`` rule kind on a real (chDB) store at its edges: values
the ingest path refuses but a store can still hold (NaN, inf written by another writer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from driftline.streams.cli.compare import CompareConfig, Population, evaluate_gate, gate_criteria
from driftline.streams.sinks.clickhouse import ClickHouseSink


@pytest.fixture()
def sink(tmp_path: Path) -> Any:
    s = ClickHouseSink(f"chdb://{tmp_path / 'chdb'}")
    s.ensure_schema()
    yield s
    s.close()


def test_non_finite_values_in_the_store_are_left_out_not_read_as_zero(sink: Any) -> None:
    """40 baseline calls at $0.001, 40 candidate calls at $0.002 (twice the cost), one of
    which has cost NaN and another latency inf. ClickHouse's avg over a column with a NaN
    is NaN (JSON null), which the gate read as a mean of 0: the candidate then "held"
    ``--max-cost-increase 5%`` and the gate passed (exit 0) a candidate costing twice as
    much. Non-finite values are left out like NULLs: the arm's counts and means equal SQL's
    over the finite values, and the gate fails (exit 1). Mutation caught: the isFinite
    filter removed from the mean columns (exit 0, candidate mean 0) or from the quantile
    arrays (latency order statistics over 40 values, the inf among them)."""
    sink.call(lambda c: c.command(
        "INSERT INTO driftline.llm_events (event_id, timestamp, app, model, prompt_version, latency_ms, "
        "cost_usd, status) SELECT toString(number), fromUnixTimestamp64Milli(toInt64(1800000000000 + number), "
        "'UTC'), 'chat', 'm', if(number < 40, 'v4', 'v5'), if(number = 79, inf, 100 + number % 7), "
        "if(number = 78, nan, if(number < 40, 0.001, 0.002) * (1 + (number % 5) / 100)), 'ok' FROM numbers(80)"))

    def run(sql: str, params: dict[str, Any]) -> bytes:
        return bytes(sink.call(lambda c: c.raw_query(sql, parameters=params, fmt="JSONEachRow")))

    cfg = CompareConfig(Population((("prompt_version", "v4"),)), Population((("prompt_version", "v5"),)),
                        min_samples=10)
    code, results, b, c = evaluate_gate(run, "driftline", cfg, gate_criteria({"max_cost_increase": "5%"}))
    want = sink.query_rows(
        "SELECT prompt_version, countIf(isFinite(cost_usd)), avgIf(cost_usd, isFinite(cost_usd)), "
        "countIf(isFinite(latency_ms)) FROM driftline.llm_events GROUP BY prompt_version ORDER BY prompt_version")
    assert [(r[0], r[1], r[3]) for r in want] == [("v4", 40, 40), ("v5", 39, 39)]
    assert (b.means["cost_usd"].n, c.means["cost_usd"].n) == (40, 39)
    assert b.means["cost_usd"].mean == pytest.approx(want[0][2], rel=1e-12)
    assert c.means["cost_usd"].mean == pytest.approx(want[1][2], rel=1e-12)
    assert (code, [r.state for r in results]) == (1, ["fails"])
    code, results, b, c = evaluate_gate(run, "driftline", cfg, gate_criteria({"max_p95_increase": "5%"}))
    assert (b.qn("latency_ms"), c.qn("latency_ms")) == (40, 39)
    assert all(v < 1000 for v in c.order_stats["latency_ms"].values())  # no inf among the order statistics
