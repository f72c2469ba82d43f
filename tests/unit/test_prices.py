"""Cost semantics of the price table, checked against hand-computed figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from driftline.schemas.event import LLMEvent
from driftline.schemas.prices import PriceTable, PriceTableError

JUL_2025 = "2025-07-01T00:00:00Z"


def ev(model: str, ts: str | int = JUL_2025, **tokens: int) -> LLMEvent:
    return LLMEvent(app="a", timestamp=ts, latency_ms=1.0, request_model=model, **tokens)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return PriceTable.default()


CASES = [
    # plain: gpt-4o 2.50 in / 10.00 out
    (
        "plain",
        ev("gpt-4o", input_tokens=1000, output_tokens=500),
        (1000 * 2.50 + 500 * 10.00) / 1e6,
    ),
    # cache read is part of input: 600 uncached + 400 at 1.25
    (
        "cache read",
        ev("gpt-4o", input_tokens=1000, cache_read_input_tokens=400, output_tokens=200),
        (600 * 2.50 + 400 * 1.25 + 200 * 10.00) / 1e6,
    ),
    # anthropic cache write 3.75, read 0.30
    (
        "cache write",
        ev(
            "claude-sonnet-4-20250514",
            input_tokens=10_000,
            cache_creation_input_tokens=8000,
            cache_read_input_tokens=1000,
            output_tokens=300,
        ),
        (1000 * 3.00 + 8000 * 3.75 + 1000 * 0.30 + 300 * 15.00) / 1e6,
    ),
    # OpenAI has no cache_write rate: billed at input
    (
        "cache write fallback",
        ev("gpt-4.1", input_tokens=100, cache_creation_input_tokens=100, output_tokens=0),
        (100 * 2.00) / 1e6,
    ),
    # no cache_read rate (mistral) -> input rate
    (
        "cache read fallback",
        ev("mistral-large-latest", input_tokens=100, cache_read_input_tokens=50),
        (100 * 2.00) / 1e6,
    ),
    # reasoning without its own rate: part of output, at output rate, not counted twice
    (
        "reasoning at output rate",
        ev("o3", input_tokens=1000, output_tokens=3000, reasoning_output_tokens=2500),
        (1000 * 2.00 + 3000 * 8.00) / 1e6,
    ),
    # reasoning with its own rate (gemini 2.5 flash preview: 0.60 output, 3.50 thinking)
    (
        "reasoning rate",
        ev(
            "gemini-2.5-flash-preview-04-17",
            input_tokens=1000,
            output_tokens=3000,
            reasoning_output_tokens=2500,
        ),
        (1000 * 0.15 + 500 * 0.60 + 2500 * 3.50) / 1e6,
    ),
    # alias / dated snapshot / provider prefixes / bedrock
    ("dated snapshot", ev("gpt-4o-mini-2024-07-18", input_tokens=1_000_000), 0.15),
    ("provider prefix", ev("openai/gpt-4o-mini", output_tokens=1_000_000), 0.60),
    (
        "bedrock id",
        ev("us.anthropic.claude-3-7-sonnet-20250219-v1:0", input_tokens=1_000_000),
        3.00,
    ),
    ("vertex id", ev("claude-3-5-sonnet-v2@20241022", output_tokens=1_000_000), 15.00),
    ("explicit old snapshot", ev("gpt-4o-2024-05-13", input_tokens=1_000_000), 5.00),
    # price change by effective date: o3 cut on 2025-06-10
    ("before price cut", ev("o3", ts="2025-06-09T23:59:59.999Z", input_tokens=1_000_000), 10.00),
    ("after price cut", ev("o3", ts="2025-06-10T00:00:00Z", input_tokens=1_000_000), 2.00),
    ("before first entry uses first", ev("o3", ts=0, input_tokens=1_000_000), 10.00),
    # clamping: cache tokens above input_tokens -> input taken as cache sum, uncached 0
    (
        "clamped cache",
        ev("claude-3-5-haiku", input_tokens=50, cache_read_input_tokens=1000, output_tokens=10),
        (1000 * 0.08 + 10 * 4.00) / 1e6,
    ),
    (
        "clamped reasoning",
        ev("o4-mini", output_tokens=10, reasoning_output_tokens=100),
        (100 * 4.40) / 1e6,
    ),
    (
        "hosted llama",
        ev("meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo", input_tokens=500, output_tokens=500),
        1000 * 0.18 / 1e6,
    ),
    (
        "groq llama",
        ev("groq/llama-3.3-70b-versatile", input_tokens=1_000_000, output_tokens=1_000_000),
        0.59 + 0.79,
    ),
]


@pytest.mark.parametrize(("name", "event", "expected"), CASES, ids=[c[0] for c in CASES])
def test_cost_table(table: PriceTable, name: str, event: LLMEvent, expected: float) -> None:
    got = table.cost(event)
    assert got is not None
    assert abs(got - expected) <= 1e-12


def test_unknown_model_and_no_tokens_are_none(table: PriceTable) -> None:
    assert table.cost(ev("my-private-finetune", input_tokens=10)) is None
    assert table.cost(ev("chatgpt-4o-latest", input_tokens=10)) is None  # not gpt-4o
    assert table.cost(ev("gpt-4o")) is None
    assert table.cost(ev("gpt-4o", input_tokens=0, output_tokens=0)) == 0.0


def test_breakdown_flags_clamping(table: PriceTable) -> None:
    b = table.breakdown(ev("claude-3-5-haiku", input_tokens=50, cache_read_input_tokens=1000))
    assert (
        b is not None and b.clamped and b.uncached_input_tokens == 0 and b.cache_read_tokens == 1000
    )
    ok = table.breakdown(
        ev("gpt-4o", input_tokens=1000, cache_read_input_tokens=400, output_tokens=200)
    )
    assert ok is not None and not ok.clamped
    assert (ok.uncached_input_tokens, ok.plain_output_tokens) == (600, 200)
    assert abs(ok.total_usd - 0.004) <= 1e-12


def test_lookup_and_version(table: PriceTable) -> None:
    assert len(table.version) == 10 and table.version[4] == "-"
    p = table.lookup("gemini-1.5-pro-002", 1_727_740_800_000)  # 2024-10-01 00:00 UTC
    assert p is not None and (p.model, p.input, p.output, p.effective_from) == (
        "gemini-1.5-pro",
        1.25,
        5.00,
        "2024-10-01",
    )
    p0 = table.lookup("gemini-1.5-pro", 1_727_740_799_999)
    assert p0 is not None and p0.input == 3.50 and p0.until_ms == 1_727_740_800_000
    assert table.lookup("nope", 0) is None


def test_cost_many_matches_cost(table: PriceTable) -> None:
    events = [c[1] for c in CASES] + [
        ev("nope", input_tokens=1),
        ev("o3", ts="2025-05-01T00:00:00Z", input_tokens=7),
    ]
    assert table.cost_many(events) == [table.cost(e) for e in events]
    # period cache must not leak across periods: interleave o3 before/after the cut
    seq = [
        ev("o3", ts=t, input_tokens=1_000_000)
        for t in ("2025-05-01T00:00:00Z", "2025-07-01T00:00:00Z") * 3
    ]
    assert [round(c or 0, 9) for c in table.cost_many(seq)] == [10.0, 2.0] * 3


def test_user_override_file(tmp_path: Path) -> None:
    f = tmp_path / "mine.toml"
    f.write_text(
        'version = "2030-01-01"\n'
        '[models."gpt-4o"]\nprovider = "azure"\naliases = ["my-4o-deployment"]\n'
        "prices = [{ effective_from = 2024-01-01, input = 1.0, output = 2.0, cache_read = 0.5 }]\n"
        '[models."acme-llm"]\nprovider = "acme"\n'
        'prices = [{ effective_from = "2025-01-01", input = 0.3, output = 0.6, reasoning = 1.2 }]\n'
    )
    t = PriceTable.load(f)
    assert t.version == "2030-01-01"
    assert (
        abs(
            (t.cost(ev("my-4o-deployment", input_tokens=1000, cache_read_input_tokens=1000)) or 0)
            - 0.0005
        )
        <= 1e-12
    )
    assert abs((t.cost(ev("gpt-4o-2024-08-06", output_tokens=1_000_000)) or 0) - 2.0) <= 1e-12
    assert (
        abs(
            (t.cost(ev("acme-llm", output_tokens=1000, reasoning_output_tokens=400)) or 0)
            - (600 * 0.6 + 400 * 1.2) / 1e6
        )
        <= 1e-12
    )
    assert t.lookup("gpt-4o-mini", None) is not None  # the rest of the packaged table is kept


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (
            '[models."x"]\nprovider = "p"\nprices = [{ effective_from = 2025-01-01, input = -1, output = 1 }]',
            "models.'x'.prices[0].input",
        ),
        (
            '[models."x"]\nprovider = "p"\nprices = [{ effective_from = 2025-01-01, output = 1 }]',
            "models.'x'.prices[0].input: required",
        ),
        (
            '[models."x"]\nprovider = "p"\nprices = [{ effective_from = 2025-01-01, input = 1, output = 1, cache_reads = 1 }]',
            "unknown field(s) ['cache_reads']",
        ),
        (
            '[models."x"]\nprices = [{ effective_from = 2025-01-01, input = 1, output = 1 }]',
            "models.'x'.provider",
        ),
        (
            '[models."x"]\nprovider = "p"\nprices = [{ effective_from = "Jan 1", input = 1, output = 1 }]',
            "effective_from: 'Jan 1' is not a YYYY-MM-DD date",
        ),
        ("version = ", "not valid TOML"),
    ],
)
def test_validation_errors_name_file_model_field(tmp_path: Path, body: str, needle: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(body)
    with pytest.raises(PriceTableError) as e:
        PriceTable.load(f)
    assert str(f) in str(e.value) and needle in str(e.value)
