"""The semantic guard in the stream: scan what the drift stage embedded, store the verdicts,
test each key's attack share.

The drift stage (:mod:`.semantic_drift`) embeds the sampled prompts and responses; on its
drift thread, after numbering and testing them, it hands the same batch to
:meth:`GuardScan.process`: **one** :meth:`SemanticGuard.scan
<driftline.detectors.semantic_guard.SemanticGuard.scan>` per field (a matrix product against
every reference of that field), then

* one ``guard_results`` row per text and category of its field (prompt: ``jailbreak``,
  ``harmful_request``; response: ``toxic``), with the score, the similarity, the nearest known
  attack's *id* and the verdict, never the attack's text;
* ``driftline_semantic_guard_scanned_total`` / ``_flagged_total`` ``{app, model, field,
  category}`` (the drift stage's bounded app/model labels);
* per key ``(app, model, prompt_version)`` and category, the **flagged share** as a drift
  signal: the first ``ref_size`` scanned texts of the key-field are its reference share, the
  last ``window_size`` its current share; at the drift tests' positions (``pos >=
  min_current`` and every ``test_every`` after, ``pos`` counting the texts after the
  reference) a one-sided Fisher exact test (:func:`scipy.stats.fisher_exact`, ``alternative=
  "greater"``: is the current share larger?) gives a ``drift_scores`` row with method
  ``guard_<category>``, statistic = the current share, at the per-test level of the semantic
  tests (``alpha / (keys x fields x methods)``, :func:`per_test_alpha`). Its explanation
  names the category and the nearest known attacks of the window's flagged texts.

Rates are per-window estimates over the sampled texts (the sample is a hash of the event id,
so uniform within a window): unbiased for the share of all events, not a per-event block.

The share state is reloaded from the store when a key-field is first seen (start, after a
rebalance): the key-field's texts with a ``guard_results`` verdict of this scanner (its
version: verdicts of other references or thresholds are not comparable), in the drift stage's
numbering (``llm_embeddings.seq``): the first ``ref_size`` are the reference share, the last
``window_size`` after them the current window, their count the position of the next test. So
a restart neither re-baselines nor moves the tests; the state holds the similarity as stored
(float32), so a reloaded test's explanation equals the uninterrupted one's. A new scanner
version starts a new reference share.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from driftline.schemas.columns import GUARD_COLUMNS
from driftline.schemas.drift_result import DriftResult

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from driftline.detectors.semantic_guard import SemanticGuard
    from driftline.streams.stages.drift_references import Query
    from driftline.streams.stages.semantic_drift import DriftConfig, Sample

log = logging.getLogger("driftline.drift")

__all__ = ["GuardScan", "guard_method", "scanner_version", "load_guard", "label_attack_clusters"]

#: nearest known attacks named in an explanation (by how many flagged texts of the window had them)
_TOP_ATTACKS = 5
#: event ids of flagged texts named in an explanation (the latest)
_TOP_EVENTS = 10


def guard_method(category: str) -> str:
    """The ``drift_scores.method`` of a category's share test: ``guard_<category>``."""
    return f"guard_{category}"


def scanner_version(guard: SemanticGuard) -> str:
    """``semantic_guard:<12 hex>``: the sha256 of the guard's state (references, ids,
    thresholds, k), so a verdict names the calibrated set that made it."""
    st = json.dumps(guard.get_state(), sort_keys=True).encode()
    return f"semantic_guard:{hashlib.sha256(st).hexdigest()[:12]}"


@dataclass
class _Share:
    """One key-field's scans: the reference counts and the current window."""

    n: int = 0
    ref_n: int = 0
    ref_flagged: Counter[str] = field(default_factory=Counter)
    ref_ms: list[int] = field(default_factory=list)
    #: the current window: (event id, ts ms, {category: (flagged, nearest id, similarity)})
    cur: deque[tuple[str, int, dict[str, tuple[bool, str, float]]]] = field(default_factory=deque)


class GuardScan:
    """The drift stage's guard: scans embedded batches, keeps each key-field's share state.

    Called on the drift thread only (:meth:`process`, :meth:`clear`).
    """

    def __init__(self, guard: SemanticGuard, cfg: DriftConfig, query: Query | None = None,
                 database: str = "driftline") -> None:
        self.guard = guard
        self.cfg = cfg
        #: reads the store (synchronous, on the drift thread: the drift engine's); None: no reload
        self.query = query
        self.db = database
        #: key-fields whose share state was reloaded from ``guard_results``
        self.reloaded = 0
        self.version = scanner_version(guard)
        self.fields = tuple(f for f in cfg.fields if guard.state.categories(f))
        self.state: dict[tuple[tuple[str, str, str], str], _Share] = {}
        #: texts scanned and flagged (all categories) since start
        self.scanned = 0
        self.flagged = 0
        self.tests_run = 0
        #: key-fields dropped past ``cfg.max_keys`` (least recently scanned; reloaded when seen again)
        self.evicted = 0

    def label_clusters(self, fld: str, x: np.ndarray, labels: np.ndarray, explanation: dict[str, Any]) -> None:
        """:func:`label_attack_clusters` with this guard (the drift engine's topic-mix hook)."""
        label_attack_clusters(self.guard, fld, x, labels, explanation)

    def clear(self) -> None:
        """Drop every key's share state (the worker's partitions were revoked)."""
        self.state.clear()

    def process(self, samples: Sequence[Sample], vecs: np.ndarray, n_keys: int
                ) -> tuple[dict[str, list[Any]], list[tuple[Sample, DriftResult]],
                           Counter[tuple[str, str, str, str]], Counter[tuple[str, str, str, str]]]:
        """Scan one embedded batch (in the drift engine's order). Returns the ``guard_results``
        columns, the share tests due ``[(sample at the window end, result)]``, and the scanned
        and flagged counts per ``(app, model, field, category)``."""
        from driftline.streams.stages.drift_references import ms_to_dt

        cols: dict[str, list[Any]] = {c: [] for c in GUARD_COLUMNS}
        scanned: Counter[tuple[str, str, str, str]] = Counter()
        flagged: Counter[tuple[str, str, str, str]] = Counter()
        verdicts: list[dict[str, tuple[bool, str, float]] | None] = [None] * len(samples)
        for f in self.fields:
            idx = [i for i, s in enumerate(samples) if s.field == f]
            if not idx:
                continue
            hits = self.guard.scan(np.asarray(vecs[idx], dtype=np.float32), f)  # one product per field
            for i, row in zip(idx, hits, strict=True):
                s = samples[i]
                # the similarity as guard_results stores it (Float32): a reloaded state is the same
                verdicts[i] = {h.category: (h.flagged, h.nearest_id, float(np.float32(h.similarity))) for h in row}
                for h in row:
                    for c, v in zip(GUARD_COLUMNS, (s.event_id, ms_to_dt(s.ts_ms), *s.key, f, h.category,
                                                    h.score, h.similarity, h.nearest_id, int(h.flagged),
                                                    self.version), strict=True):
                        cols[c].append(v)
                    scanned[(s.key[0], s.key[1], f, h.category)] += 1
                    if h.flagged:
                        flagged[(s.key[0], s.key[1], f, h.category)] += 1
        self.scanned += sum(1 for v in verdicts if v is not None)
        self.flagged += sum(1 for v in verdicts if v is not None and any(x[0] for x in v.values()))
        results: list[tuple[Sample, DriftResult]] = []
        for s, v in zip(samples, verdicts, strict=True):  # in order: a key's windows as the engine's
            if v is not None:
                results.extend((s, r) for r in self._add(s, v, n_keys))
        self._evict()
        return cols, results, scanned, flagged

    def _evict(self) -> None:
        """Hold at most ``cfg.max_keys`` key-fields (the drift engine's cap), dropping the least
        recently scanned. Only between batches: a key-field dropped and seen again within one
        batch would be reloaded without this batch's verdicts (written after it)."""
        extra = len(self.state) - self.cfg.max_keys
        if extra > 0:
            for k in list(self.state)[:extra]:
                del self.state[k]
            self.evicted += extra

    def _add(self, s: Sample, v: dict[str, tuple[bool, str, float]], n_keys: int) -> list[DriftResult]:
        cfg = self.cfg
        sh = self.state.pop((s.key, s.field), None)  # re-inserted below: now the most recent
        if sh is None:
            sh = self._load(s.key, s.field)
        self.state[(s.key, s.field)] = sh
        sh.n += 1
        if sh.ref_n < cfg.ref_size:
            sh.ref_n += 1
            sh.ref_flagged.update(c for c, x in v.items() if x[0])
            sh.ref_ms = [min(sh.ref_ms[0], s.ts_ms), max(sh.ref_ms[1], s.ts_ms)] if sh.ref_ms else [s.ts_ms] * 2
            return []
        sh.cur.append((s.event_id, s.ts_ms, v))
        while len(sh.cur) > cfg.window_size:
            sh.cur.popleft()
        pos = sh.n - cfg.ref_size
        mc = cfg.min_cur
        if pos < mc or (pos - mc) % cfg.test_every:
            return []
        return [self._test(sh, c, n_keys) for c in v]

    def _load(self, key: tuple[str, str, str], fld: str) -> _Share:
        """A key-field's share state from ``guard_results`` (this scanner's verdicts) in the
        drift stage's numbering; empty for a new key-field or without a store."""
        from driftline.streams.stages.drift_references import _KEY_WHERE, _key_params

        sh = _Share()
        if self.query is None:
            return sh
        cfg = self.cfg
        at = {**_key_params(key, fld), "db": self.db, "scanner": self.version}
        texts = ("SELECT seq, event_id FROM {db:Identifier}.llm_embeddings FINAL WHERE " + _KEY_WHERE
                 + " AND event_id IN (SELECT event_id FROM {db:Identifier}.guard_results WHERE " + _KEY_WHERE
                 + " AND scanner = {scanner:String})")
        rows = self.query("SELECT count() FROM (" + texts + ")", at)
        n = int(rows[0][0]) if rows else 0
        if not n:
            return sh
        ref = [r[1] for r in self.query(texts + " ORDER BY seq LIMIT {lim:UInt64}", {**at, "lim": cfg.ref_size})]
        n_cur = min(cfg.window_size, n - len(ref))
        cur = [r[1] for r in self.query(texts + " ORDER BY seq DESC LIMIT {lim:UInt64}", {**at, "lim": n_cur})
               ][::-1] if n_cur > 0 else []
        got: dict[str, tuple[int, dict[str, tuple[bool, str, float]]]] = {}
        for eid, ts, cat, fl, nid, sim in self.query(
                "SELECT event_id, toUnixTimestamp64Milli(ts), category, flagged, nearest_id, similarity "
                "FROM {db:Identifier}.guard_results FINAL WHERE " + _KEY_WHERE + " AND scanner = {scanner:String} "
                "AND event_id IN {ids:Array(String)}", {**at, "ids": ref + cur}):
            got.setdefault(eid, (int(ts), {}))[1][cat] = (bool(fl), str(nid), float(sim))
        sh.n, sh.ref_n = n, len(ref)
        sh.ref_flagged.update(c for e in ref for c, x in got[e][1].items() if x[0])
        sh.ref_ms = [min(got[e][0] for e in ref), max(got[e][0] for e in ref)]
        sh.cur.extend((e, *got[e]) for e in cur)
        self.reloaded += 1
        log.info("semantic guard: reloaded the share state of %s/%s/%s %s: %d texts scanned, reference %d "
                 "(%s flagged), current window %d", *key, fld, n, sh.ref_n, dict(sh.ref_flagged) or "none",
                 len(sh.cur))
        return sh

    def _test(self, sh: _Share, category: str, n_keys: int) -> DriftResult:
        from scipy.stats import fisher_exact

        from driftline.streams.stages.drift_references import per_test_alpha

        cfg = self.cfg
        a_test = per_test_alpha(cfg.alpha, n_keys, len(cfg.fields), len(cfg.methods))
        n_cur, n_ref = len(sh.cur), sh.ref_n
        fl = [(eid, x[1], x[2]) for eid, _ts, vv in sh.cur if (x := vv[category])[0]]
        k_cur, k_ref = len(fl), sh.ref_flagged[category]
        p = float(fisher_exact([[k_cur, n_cur - k_cur], [k_ref, n_ref - k_ref]], alternative="greater").pvalue)
        near: dict[str, list[float]] = {}
        for _eid, nid, sim in fl:
            near.setdefault(nid, []).append(sim)
        top = sorted(near.items(), key=lambda kv: (-len(kv[1]), -max(kv[1]), kv[0]))[:_TOP_ATTACKS]
        share, ref_share = k_cur / n_cur, k_ref / n_ref
        expl = {
            "rule": "p_value < threshold",
            "test": "Fisher exact, one-sided: current flagged share > reference flagged share",
            "category": category, "share": share, "reference_share": ref_share,
            "flagged": k_cur, "reference_flagged": k_ref,
            "nearest_attacks": [{"id": nid, "flagged": len(sims), "max_similarity": round(max(sims), 4)}
                                for nid, sims in top],
            "flagged_event_ids": [eid for eid, _n, _s in fl[-_TOP_EVENTS:]],
            "scanner": self.version, "alpha_family": cfg.alpha, "alpha_test": a_test,
            "correction": "bonferroni",
            "family": {"keys": n_keys, "fields": len(cfg.fields), "methods": len(cfg.methods)},
            "reference": {"n": n_ref, "from_ms": sh.ref_ms[0], "to_ms": sh.ref_ms[1]},
            "window": {"n": n_cur, "from_ms": min(t for _e, t, _v in sh.cur),
                       "to_ms": max(t for _e, t, _v in sh.cur)},
        }
        self.tests_run += 1
        return DriftResult(guard_method(category), share, p, a_test, p < a_test, n_ref, n_cur, expl)


def label_attack_clusters(guard: SemanticGuard, fld: str, x: np.ndarray, labels: np.ndarray,
                          explanation: dict[str, Any]) -> None:
    """Name the attack clusters of a topic-mix explanation (in place): a cluster whose share
    grew and more than half of whose current texts the guard flags for one category gets
    ``label`` (``"jailbreak-like: 18 of 20 flagged"``) and ``guard_flagged`` (its flagged
    count per category); ``attack_clusters`` lists the labelled ones, largest growth first,
    and ``grown_label`` names the most grown cluster when it is one. ``x``: the window's
    vectors (in its order), ``labels``: their clusters (the detector's assignment). The
    window is scanned here (one matrix product), so each verdict is the guard's on that very
    vector. No text and no attack text is added."""
    cats = guard.state.categories(fld)
    clusters = explanation.get("clusters")
    if not cats or not isinstance(clusters, list) or not len(x):
        return
    hits = guard.scan(np.asarray(x, dtype=np.float32), fld)
    flags = np.array([[h.flagged for h in row] for row in hits], dtype=bool)  # (n, categories)
    named = []
    for entry in clusters:
        c, n = int(entry["cluster"]), int(entry["cur_count"])
        if entry["delta"] <= 0 or n == 0:
            continue
        k = flags[labels == c].sum(axis=0)
        entry["guard_flagged"] = {cat: int(v) for cat, v in zip(cats, k, strict=True)}
        j = int(np.argmax(k))
        if 2 * int(k[j]) > n:
            entry["label"] = f"{cats[j]}-like: {int(k[j])} of {n} flagged"
            named.append({"cluster": c, "label": entry["label"], "delta": entry["delta"]})
    explanation["attack_clusters"] = sorted(named, key=lambda e: -e["delta"])
    grown = next((e for e in named if e["cluster"] == explanation.get("grown")), None)
    if grown is not None:
        explanation["grown_label"] = grown["label"]


class _NotCached(Exception):
    """A reference source would have to be embedded (its cache is missing or stale)."""


class _CacheOnly:
    """The encoder for the cache check: its identity (name, weights) for the hash, no encoding."""

    def __init__(self, encoder: Any) -> None:
        self._enc = encoder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._enc, name)

    def encode(self, texts: Any) -> Any:
        raise _NotCached


def load_guard(encoder: Any, *, build: bool = False, data_dir: Path | None = None,
               examples: Path | None = None) -> tuple[SemanticGuard | None, str]:
    """The calibrated guard from the data step's files (scripts/setup.sh runs that step; the
    worker never downloads) and the reference embeddings cached next to them
    (:func:`~driftline.streams.devdata.guard_refs.build_guard`; its cache key holds the model's
    weights). With ``build`` a missing or stale cache is built with ``encoder`` (~2,000 texts,
    ~170 s on 2 CPU cores); without, that is a ``None``. Returns ``(guard, what happened)`` or
    ``(None, why not)``. ``examples``: the user's attack examples (JSONL, see
    :func:`~driftline.detectors.semantic_guard.parse_examples`) join the references; they
    are embedded (and cached) with ``encoder`` even without ``build``: a few texts."""
    from driftline.detectors.semantic_guard import ExampleError, SemanticGuard
    from driftline.streams.devdata import real_prompts
    from driftline.streams.devdata.guard_refs import build_guard

    paths = real_prompts.DataPaths(data_dir if data_dir is not None else real_prompts.default_cache_dir())
    if not real_prompts._cache_ok(paths):  # noqa: SLF001 - the manifest check, without fetching
        return None, (f"no real data at {paths.root} (the data step, `python -m "
                      "driftline.streams.devdata.real_prompts`, fetches it once; the worker never downloads)")
    try:
        gd = build_guard(encoder if build else _CacheOnly(encoder), paths=paths, examples=examples,
                         examples_encoder=encoder)
    except _NotCached:
        return None, (f"its reference embeddings are not cached for this model in {paths.root / 'guard'}: "
                      "start a worker once with --semantic-guard build (it embeds ~2,000 texts in the "
                      "background, ~170 s on 2 CPU cores, seconds on a GPU) or run "
                      "python -m driftline.streams.devdata.real_prompts --guard")
    except (ExampleError, OSError) as exc:  # the CLI checks the file first; it changed since
        return None, f"the attack examples {examples}: {exc}"
    except ValueError as exc:  # not UTF-8 (changed since the check), or references that do not validate
        return None, f"its references could not be built: {type(exc).__name__}: {str(exc)[:200]}"
    how = (f"{gd.embedded_texts} reference texts embedded in {gd.embed_seconds:.0f} s (cached for the next start)"
           if gd.embedded_texts else "reference embeddings from the cache")
    if examples is not None:
        how += f", your attack examples from {examples}"
    return SemanticGuard(gd.state), f"{how}, data {paths.root}"
