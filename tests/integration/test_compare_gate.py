"""``driftline compare`` / ``driftline gate`` on a chDB store filled through the worker's own
code path (decode_batch -> enrich -> to_columns -> the sink's Arrow insert), with two prompt
versions whose latency, tokens (so cost) and error rate differ by known amounts, and an A/A
pair. Some events are stored twice (a re-delivery): the numbers must count each once.

Expected values come from the generated events themselves (numpy) and from independent SQL
(dedup by GROUP BY event_id, not FINAL); the intervals from detectors/sequential.py applied
to those numpy arrays."""

from __future__ import annotations

import asyncio
import json
import math
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from driftline.detectors.sequential import (
    MeanStats,
    mean_contrast_cs,
    quantile_contrast,
    quantile_ranks,
)
from driftline.schemas.columns import EMBEDDING_COLUMNS
from driftline.schemas.prices import PriceTable
from driftline.streams.cli.compare import semantic_shift
from driftline.streams.cli.main import app
from driftline.streams.ingest.transforms import (
    MemoryRecord,
    decode_batch,
    enrich,
    to_arrow,
    to_columns,
)
from driftline.streams.sinks.clickhouse import ClickHouseSink

pytestmark = pytest.mark.integration

T0 = 1_793_491_200_000  # 2026-11-01T00:00Z
N = 1500  # calls per version
# version: (latency factor, error rate, output-token factor)
VERSIONS = {"v4": (1.0, 0.02, 1.0), "v5": (1.5, 0.08, 1.5), "a1": (1.0, 0.02, 1.0), "a2": (1.0, 0.02, 1.0)}


# response topics: v5 answers more of topic 2 (what the semantic comparison must find)
TOPIC_MIX = {"v4": [0.5, 0.3, 0.2], "v5": [0.2, 0.3, 0.5], "a1": [0.5, 0.3, 0.2], "a2": [0.5, 0.3, 0.2]}
TOPIC_TEXT = ["Your refund was approved.", "Tomorrow will be sunny.", "Use a LEFT JOIN here."]
N_EMB = 400  # the first calls of each version have a stored response embedding
CENTERS = np.eye(3, 8) * 4.0


def _embedding(topic: int, rng: np.random.Generator) -> list[float]:
    x = CENTERS[topic] + rng.normal(size=8)
    return [float(v) for v in (x / np.linalg.norm(x)).astype(np.float32)]


def _events() -> list[dict[str, Any]]:
    rng = np.random.default_rng(18)
    topics = np.random.default_rng(180)  # its own stream: the other columns keep their draws
    out: list[dict[str, Any]] = []
    for v, (lat, err, tok) in VERSIONS.items():
        for i in range(N):
            topic = int(topics.choice(3, p=TOPIC_MIX[v]))
            latency = float(np.round(rng.lognormal(math.log(800), 0.5) * lat, 3))
            e: dict[str, Any] = {
                "event_id": f"{v}-{i}", "timestamp": T0 + i * 1000 + len(out) % 4, "app": "chat",
                "environment": "prod", "request_model": "gpt-4o-mini", "prompt_version": v,
                "latency_ms": latency, "input_tokens": int(rng.integers(200, 600)),
                "output_tokens": int(rng.poisson(150) * tok),
                "status": "error" if rng.random() < err else "ok",
                "guardrails": [{"name": "pii", "verdict": "flagged" if rng.random() < 0.05 else "pass"}],
                "response": f"{TOPIC_TEXT[topic]} ({v} {i})",
            }
            if i < N_EMB:
                e["_embedding"] = _embedding(topic, topics)
            if rng.random() < 0.8:
                e["ttft_ms"] = float(np.round(latency * 0.3, 3))
            if rng.random() < 0.5:
                e["feedback"] = -1 if rng.random() < 0.1 else 1
            out.append(e)
    return out


EVENTS = _events()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    dsn = f"chdb://{tmp_path_factory.mktemp('compare') / 'chdb'}"
    sink = ClickHouseSink(dsn)
    sink.ensure_schema()
    prices = PriceTable.default()

    def table(events: list[dict[str, Any]], first_offset: int) -> Any:
        recs = [MemoryRecord("llm.events", 0, first_offset + i, None,
                             json.dumps({k: x for k, x in e.items() if k != "_embedding"}).encode())
                for i, e in enumerate(events)]
        batch = decode_batch(recs)
        assert batch.n_events == len(events) and not batch.rejected
        return to_arrow(to_columns(enrich(batch, prices))[0])

    async def fill() -> None:
        for lo in range(0, len(EVENTS), 2000):
            t = table(EVENTS[lo:lo + 2000], lo)
            await sink.insert_arrow("llm_events", lambda t=t: t)
        dup = table(EVENTS[:300] + EVENTS[N:N + 300], 10_000)  # re-delivered: v4 and v5 events again
        await sink.insert_arrow("llm_events", lambda: dup)

    asyncio.run(fill())
    # the drift stage's samples (llm_embeddings), as it stores them
    emb = [[e["event_id"], datetime.fromtimestamp(e["timestamp"] / 1000, tz=UTC), "chat", "gpt-4o-mini",
            e["prompt_version"], "response", i, "all-MiniLM-L6-v2", 0, e["_embedding"]]
           for i, e in enumerate(EVENTS) if "_embedding" in e]
    sink.call(lambda c: c.insert("driftline.llm_embeddings", emb, column_names=list(EMBEDDING_COLUMNS)))
    rows = sink.query_rows("SELECT count() FROM driftline.llm_events")
    assert rows[0][0] == len(EVENTS) + 600  # the duplicates are stored (not merged yet)
    sink.close()
    return dsn


def _cli(dsn: str, *args: str) -> Any:
    return CliRunner().invoke(app, [*args, "--clickhouse", dsn], catch_exceptions=False)


def _arr(v: str, key: str) -> np.ndarray:
    return np.array([e[key] for e in EVENTS if e["prompt_version"] == v and key in e], dtype=np.float64)


def _sql(dsn: str, q: str) -> list[list[Any]]:
    from driftline.streams.cli.sql import run_sql

    return [json.loads(line) for line in run_sql(dsn, q, fmt="JSONCompactEachRow").decode().splitlines()]


def _p(values: np.ndarray, q: float, alpha: float) -> tuple[float, float, float]:
    s = np.sort(values)
    lo, est, hi = quantile_ranks(s.size, q, alpha)
    return (-math.inf if lo < 1 else float(s[lo - 1]), float(s[est - 1]),
            math.inf if hi > s.size else float(s[hi - 1]))


def test_compare_json_equals_independent_numbers(store: str) -> None:
    r = _cli(store, "compare", "--baseline", "prompt_version=v4", "--candidate", "prompt_version=v5",
             "--app", "chat", "--since", "2026-11-01T00:00:00Z", "--json", "--semantic-samples", "0")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    m = {x["metric"]: x for x in out["metrics"]}
    assert (out["baseline"]["n"], out["candidate"]["n"]) == (N, N)  # each event once despite the re-delivery
    b, c = _arr("v4", "latency_ms"), _arr("v5", "latency_ms")
    lat = m["latency_mean_ms"]
    assert (lat["n_baseline"], lat["n_candidate"]) == (N, N)
    assert lat["baseline"] == pytest.approx(b.mean(), rel=1e-12)
    assert lat["candidate"] == pytest.approx(c.mean(), rel=1e-12)
    iv = mean_contrast_cs(MeanStats.of(b), MeanStats.of(c), 0.05)
    assert (lat["low"], lat["high"]) == pytest.approx((iv.low, iv.high), rel=1e-9)
    p95 = m["latency_p95_ms"]
    qb, qc = _p(b, 0.95, 0.025), _p(c, 0.95, 0.025)
    assert (p95["baseline"], p95["candidate"]) == (qb[1], qc[1])
    want = quantile_contrast(qb, qc)
    assert (p95["low"], p95["high"]) == pytest.approx((want.low, want.high), rel=1e-12)
    tt = m["ttft_p95_ms"]
    assert (tt["n_baseline"], tt["n_candidate"]) == (_arr("v4", "ttft_ms").size, _arr("v5", "ttft_ms").size)
    assert tt["baseline"] == _p(_arr("v4", "ttft_ms"), 0.95, 0.025)[1]
    errs = [sum(e["status"] == "error" for e in EVENTS if e["prompt_version"] == v) for v in ("v4", "v5")]
    assert (m["error_rate"]["baseline"], m["error_rate"]["candidate"]) == (errs[0] / N, errs[1] / N)
    neg = [[e.get("feedback") for e in EVENTS if e["prompt_version"] == v and "feedback" in e] for v in ("v4", "v5")]
    assert m["negative_feedback_rate"]["n_baseline"] == len(neg[0])
    assert m["negative_feedback_rate"]["candidate"] == neg[1].count(-1) / len(neg[1])
    # cost per call: the pipeline's own price computation, read back by independent SQL
    (cb, nb), (cc, nc) = _sql(store, "SELECT avg(c), count() FROM (SELECT event_id, any(cost_usd) AS c FROM "
                                     "driftline.llm_events WHERE prompt_version IN ('v4', 'v5') GROUP BY event_id) "
                                     "GROUP BY substring(event_id, 1, 2) ORDER BY substring(event_id, 1, 2)")
    assert (int(nb), int(nc)) == (N, N)
    cost = m["cost_per_call_usd"]
    assert (cost["baseline"], cost["candidate"]) == (pytest.approx(cb, rel=1e-12), pytest.approx(cc, rel=1e-12))
    tokens_b = np.array([e["input_tokens"] + e["output_tokens"] for e in EVENTS if e["prompt_version"] == "v4"])
    assert cost["baseline"] == pytest.approx(float(np.mean(
        [(e["input_tokens"] * 0.15 + e["output_tokens"] * 0.60) / 1e6 for e in EVENTS if e["prompt_version"] == "v4"])),
        rel=1e-9)
    assert m["tokens_per_call"]["baseline"] == pytest.approx(tokens_b.mean(), rel=1e-12)
    # the known differences are found; the unchanged guardrail rate is not
    verdicts = {k: v["verdict"] for k, v in m.items()}
    assert verdicts["latency_p95_ms"] == verdicts["latency_mean_ms"] == verdicts["error_rate"] == "worse"
    assert verdicts["cost_per_call_usd"] == "worse" and verdicts["tokens_per_call"] == "higher"
    assert verdicts["guardrail_hit_rate"] in ("no difference", "not enough data")


def test_compare_table_and_aa(store: str) -> None:
    r = _cli(store, "compare", "--baseline", "prompt_version=a1", "--candidate", "prompt_version=a2",
             "--semantic-samples", "0")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert len(lines) == 14
    assert max(len(x) for x in lines) <= 80
    assert lines[0] == f"baseline  prompt_version=a1: {N} calls"
    rows = {x[:15].strip(): x for x in lines[4:14]}
    assert len(rows) == 10
    assert not any(x.endswith(("worse", "better", "higher", "lower")) for x in rows.values())  # A/A: nothing declared


def test_gate_exit_codes(store: str) -> None:
    ab = ["--baseline", "prompt_version=v4", "--candidate", "prompt_version=v5"]
    aa = ["--baseline", "prompt_version=a1", "--candidate", "prompt_version=a2"]
    r = _cli(store, "gate", *ab, "--max-p95-increase", "10%", "--max-guardrail-rate", "20%")
    assert r.exit_code == 1, r.output  # p95 x1.5: fails with confidence (the guardrail rate holds)
    assert "FAIL" in r.output and "latency_p95_ms: candidate <= 1.1 x baseline: FAILS" in r.output
    # a failing criterion decides even while another cannot tell yet
    r = _cli(store, "gate", *ab, "--max-error-rate-increase", "5%", "--max-cost-increase", "5%")
    assert r.exit_code == 1, r.output
    assert "  undecided error_rate" in r.output and "  fails     cost_per_call_usd" in r.output
    r = _cli(store, "gate", *ab, "--max-error-rate-increase", "5%", "--max-cost-increase", "5%", "--json")
    out = json.loads(r.output)
    assert (r.exit_code, out["exit"], [c["state"] for c in out["criteria"]]) == (1, 1, ["fails", "undecided"])
    assert out["criteria"][0]["metric"] == "cost_per_call_usd" and out["criteria"][0]["low"] > 0  # cost_c - 1.05 cost_b: above 0 with confidence
    r = _cli(store, "gate", *aa, "--max-p95-increase", "50%", "--max-cost-increase", "50%",
             "--max-guardrail-rate", "20%", "--max-error-rate-increase", "5%", "--min-samples", "500")
    assert r.exit_code == 0, r.output
    assert r.output.count("  holds ") == 4
    r = _cli(store, "gate", *aa, "--max-p95-increase", "50%", "--min-samples", "5000")  # too few calls
    assert r.exit_code == 2, r.output
    assert "< --min-samples 5000" in r.output
    r = _cli(store, "gate", *aa, "--max-cost-increase", "0%")  # the interval straddles the limit
    assert r.exit_code == 2, r.output
    assert "cannot tell yet" in r.output


def test_bad_inputs_exit_3_and_values_are_bound(store: str) -> None:
    r = _cli(store, "gate", "--baseline", "app=chat", "--candidate", "prompt_version=v5", "--max-p95-increase", "5%")
    assert r.exit_code == 3 and "overlap" in r.output
    r = _cli(store, "compare", "--baseline", "user_id=1", "--candidate", "prompt_version=v5")
    assert r.exit_code == 3 and "unknown label 'user_id'" in r.output
    r = _cli(store, "gate", "--baseline", "prompt_version=v4", "--candidate", "prompt_version=v5",
             "--max-p95-increase", "ten")
    assert r.exit_code == 3
    # a value that would break out of a quoted literal matches nothing (bound, not formatted)
    r = _cli(store, "compare", "--baseline", "prompt_version=v4", "--candidate", "prompt_version=x' OR '1'='1",
             "--json", "--semantic-samples", "0")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["candidate"]["n"] == 0


def test_since_limits_the_rows(store: str) -> None:
    r = _cli(store, "compare", "--baseline", "prompt_version=v4", "--candidate", "prompt_version=v5", "--json",
             "--since", str(T0 + 1000 * 1000), "--semantic-samples", "0")
    out = json.loads(r.output)
    want = [sum(1 for e in EVENTS if e["prompt_version"] == v and e["timestamp"] >= T0 + 1_000_000)
            for v in ("v4", "v5")]
    assert (out["baseline"]["n"], out["candidate"]["n"]) == tuple(want)


def test_semantic_shift_of_the_responses(store: str) -> None:
    r = _cli(store, "compare", "--baseline", "prompt_version=v4", "--candidate", "prompt_version=v5", "--json")
    sem = json.loads(r.output)["semantic"]
    assert (sem["n_baseline"], sem["n_candidate"]) == (N_EMB, N_EMB)
    arms = [[(e["_embedding"], e["response"]) for e in EVENTS if e["prompt_version"] == v and "_embedding" in e]
            for v in ("v4", "v5")]
    want = semantic_shift(arms[0], arms[1], 0.05)  # the same samples, in event-time order
    assert sem["p_value"] == want.p_value and sem["shifted"] is True
    grown = max(sem["clusters"], key=lambda c: c["delta"])
    assert grown["cur_examples"][0].startswith(TOPIC_TEXT[2])  # the topic v5 answers more
    assert "responses: topic mix SHIFTED" in _cli(store, "compare", "--baseline", "prompt_version=v4",
                                                   "--candidate", "prompt_version=v5").output
    # --semantic-samples takes the latest N per arm; an A/A pair's p-value is the same test's
    # (a one-look test at 5 % fires on 5 % of A/A pairs, so the verdict itself is not asserted)
    r = _cli(store, "compare", "--baseline", "prompt_version=a1", "--candidate", "prompt_version=a2",
             "--semantic-samples", "300", "--json")
    sem = json.loads(r.output)["semantic"]
    arms = [[(e["_embedding"], e["response"]) for e in EVENTS if e["prompt_version"] == v and "_embedding" in e]
            for v in ("a1", "a2")]
    assert (sem["n_baseline"], sem["p_value"]) == (300, semantic_shift(arms[0][-300:], arms[1][-300:], 0.05).p_value)


def test_compare_through_a_workers_sql_endpoint(store: str) -> None:
    """While a worker holds the embedded store, compare reads it through the worker's
    authenticated SQL endpoint (as `driftline sql` does): its parameters, functions and
    formats must pass the endpoint's query policy, with the same answer as a direct read."""
    import threading

    from driftline.streams.auth import credentials_path, load_credentials
    from driftline.streams.local.sql_endpoint import ClickHouseEndpoint, read_endpoint

    args = ["compare", "--baseline", "prompt_version=v4", "--candidate", "prompt_version=v5", "--json"]
    direct = _cli(store, *args)
    assert direct.exit_code == 0, direct.output
    path = store.removeprefix("chdb://")
    sink = ClickHouseSink(store)
    creds = load_credentials(credentials_path(path), environ={})
    ready, box = threading.Event(), {}

    def serve() -> None:
        async def main() -> None:
            ep = ClickHouseEndpoint(sink, port=0, credentials=creds)
            await ep.start(path)
            box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
            ready.set()
            await box["stop"].wait()
            await ep.stop()

        asyncio.run(main())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert ready.wait(30)
    try:
        assert read_endpoint(path)  # the CLI finds the endpoint and goes through it
        served = _cli(store, *args)
        gated = _cli(store, "gate", "--baseline", "prompt_version=v4", "--candidate", "prompt_version=v5",
                     "--max-p95-increase", "10%")
        # proof that it went through the endpoint: a wrong password is refused there
        refused = CliRunner().invoke(app, [*args, "--clickhouse", store],
                                     env={"DRIFTLINE_SQL_PASSWORD": "not-the-password"})
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        t.join(30)
        sink.close()
    assert served.exit_code == 0, served.output
    assert json.loads(served.output) == json.loads(direct.output)
    assert gated.exit_code == 1, gated.output
    assert refused.exit_code == 3 and "AUTHENTICATION_FAILED" in refused.output, refused.output
    assert "not-the-password" not in refused.output
