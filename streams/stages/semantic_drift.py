"""Semantic drift in the stream: sample -> embed -> reference -> sliding-window tests.

A :class:`DriftStage` is a worker :class:`~driftline.streams.worker.Stage`. After
every batch is safe in ClickHouse (``on_stored``) it

1. **samples** events per key, uniformly: an event is kept when a 32-bit hash of its
   ``event_id`` is below ``sample_rate * 2**32`` (:func:`keep_event`; CRC-32 finalised
   with murmur3's mixer). The decision
   depends on the event alone, so it is uniform within every window and key, the
   same on every worker and after restarts, and prompt and response of a kept
   event are both kept (each a separate *field*, each with its own drift);
2. hands the texts to the :class:`~driftline.streams.stages.embedding.EmbeddingBatcher`
   (bounded: a full queue drops and counts, never blocks the spine);
3. on the drift thread (off the event loop), per key ``(app, model, prompt_version)``
   and field: numbers the samples (``seq``), builds the **reference** from the
   first ``ref_size`` samples after first sight (a new ``prompt_version`` is a new
   key, so it starts a new reference by itself), keeps a sliding **current
   window** of the last ``window_size`` samples after the reference, and every
   ``test_every`` samples (or ``test_interval_s`` seconds) tests it against the
   reference with MMD² (permutation p-value), topic mix (G-test, with the
   explanation: which clusters grew or shrank, with example texts) and centroid
   cosine distance (permutation p-value);
4. writes the embeddings to ``llm_embeddings``, references to
   ``drift_references`` and results to ``drift_scores``, sets the
   ``driftline_drift_*`` gauges and hands each result to every stage with an
   ``observe_drift`` method (alert rules of kind ``drift``).

**Calibration.** ``alpha`` is a family-wise level per test round over all keys
and fields: each test runs at ``alpha / (K x F x M)`` (Bonferroni; ``K`` keys with
a reference, ``F`` fields, ``M`` methods, counted when the test runs). The number
of permutations grows so that the smallest attainable p-value stays below
that level (``ceil(3 / alpha_test)`` rounded up to a power of
two, 256 to 8192).

**Durability.** References are rows of ``drift_references`` (the event ids of the
samples, their ``seq`` range and how they were made); the embeddings stay in
``llm_embeddings``. A key seen for the first time since start is loaded from
there: its reference, its last ``seq`` and its current window, so a restarted
worker resumes the same tests. Tests fire at fixed positions after the reference
(``p >= min_current`` and ``(p - min_current) % test_every == 0``), so a restart
does not move them.

**Baseline commands.** ``driftline baseline rebase|pin|reset`` produce a JSON
command ``{"cmd": "baseline", ...}`` to the Kafka topic ``driftline.control``. The
drift stage reads that topic from the beginning with a consumer of its own (no
consumer group: every worker sees every command), applies each command it has
not applied before to the matching keys, and logs it in ``drift_control_log``
(with the number of references it made, n_references, also 0) under the command's ``id``, so a
worker that was down applies what it missed when it starts, and a recreated
topic (the memory broker restarted) cannot hide new commands behind old
offsets. With a control secret (``WorkerConfig.control_secret``), a command must carry
a valid HMAC signature (streams/ingest/control_auth.py); others are refused, logged and
counted in ``driftline_control_refused_total{reason}``. The app's control agent
(streams/app.py) ignores ``baseline`` commands.
``driftline baseline show`` is a query.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from dataclasses import field as dc_field
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client.registry import CollectorRegistry

from driftline.detectors.at_level import AtLevel, drifted_at
from driftline.detectors.calibration import bonferroni
from driftline.detectors.permutation import n_resamples
from driftline.detectors.redact import Redaction
from driftline.detectors.sampling import keep_event, sample_mask
from driftline.detectors.semantic import CentroidDrift, MMDDrift, TopicMixDrift
from driftline.schemas.columns import (
    CONTROL_LOG_COLUMNS,
    EMBEDDING_COLUMNS,
    REFERENCE_COLUMNS,
    SCORE_COLUMNS,
)
from driftline.schemas.drift_result import DriftResult
from driftline.schemas.topics import CONTROL_TOPIC
from driftline.streams.sinks.prometheus import DriftStageMetrics
from driftline.streams.stages.embedding import EmbeddingBatcher, EmbeddingConfig, load_encoder

if TYPE_CHECKING:
    from collections.abc import Callable

    from driftline.schemas.rules import DriftObservation
    from driftline.streams.ports import StagePorts

log = logging.getLogger("driftline.drift")

__all__ = [
    "DriftConfig",
    "DriftStage",
    "DriftEngine",
    "Sample",
    "keep_event",
    "sample_mask",
    "per_test_alpha",
    "n_resamples",
    "make_detector",
    "drifted_at",
    "CONTROL_TOPIC",
    "EMBEDDING_COLUMNS",
    "REFERENCE_COLUMNS",
    "SCORE_COLUMNS",
    "CONTROL_LOG_COLUMNS",
]

FIELDS = ("prompt", "response")
METHODS = ("mmd", "topic_mix", "centroid_cosine")

Key = tuple[str, str, str]  # app, model, prompt_version


# --------------------------------------------------------------------------- pure helpers


def per_test_alpha(alpha: float, n_keys: int, n_fields: int, n_methods: int) -> float:
    """Bonferroni per-test level for a family of ``n_keys x n_fields x n_methods`` tests."""
    return bonferroni(alpha, max(1, n_keys) * max(1, n_fields) * max(1, n_methods))


def make_detector(method: str, resamples: int, *, seed: int = 0, min_effect: float = 0.0) -> Any:
    """The detector the stage runs for ``method`` (one of :data:`METHODS`), with
    ``resamples`` permutations (from :func:`n_resamples`). Its own ``alpha`` is not
    used: the stage scores it through :class:`~driftline.detectors.at_level.AtLevel`,
    which decides at the Bonferroni level."""
    if method == "mmd":
        return MMDDrift(n_permutations=resamples, seed=seed)
    if method == "topic_mix":
        # its Monte-Carlo G-test (small expected counts) needs p-values below the
        # Bonferroni level too
        return TopicMixDrift(seed=seed, min_effect=min_effect, n_permutations=max(1999, resamples))
    if method == "centroid_cosine":
        return CentroidDrift(n_permutations=resamples, seed=seed)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _texts_at(events: Any, field: str, rows: list[int]) -> Any:
    """``field`` of the stored events, indexable by the sampled ``rows`` (None when the
    events have no such column). Over an Arrow table (``ArrowColumns``) only those rows
    are turned into Python strings."""
    table = getattr(events, "table", None)
    if table is None:
        return events.get(field)
    if field not in table.column_names:
        return None
    return dict(zip(rows, table.column(field).take(rows).to_pylist(), strict=True))


@dataclass(frozen=True)
class DriftConfig:
    """Settings of the drift stage (see the module docstring for what each does).

    ``sample_rate``: share of events whose texts are embedded (1.0 on GPU is fine;
    a 2-core CPU embeds ~60 short texts/s). ``ref_size``: samples in an automatic
    reference. ``window_size``: the sliding current window; ``min_current``
    (default ``window_size``) samples are needed before the first test.
    ``test_every``: samples between tests; ``test_interval_s``: also test when this
    many seconds passed since the last test and new samples arrived (``None``: off).
    """

    fields: tuple[str, ...] = FIELDS
    sample_rate: float = 0.2
    sample_salt: int = 0
    ref_size: int = 300
    window_size: int = 300
    min_current: int | None = None
    test_every: int = 100
    test_interval_s: float | None = 60.0
    alpha: float = 0.05
    methods: tuple[str, ...] = METHODS
    min_effect: float = 0.0
    seed: int = 0
    embedding: EmbeddingConfig = dc_field(default_factory=EmbeddingConfig)
    control_topic: str | None = CONTROL_TOPIC
    drain_timeout_s: float = 60.0
    #: key-fields held in memory (2-3 MB each); past it the least recently sampled one is
    #: dropped (counted) and reloaded from ClickHouse when it is sampled again
    max_keys: int = 500

    def __post_init__(self) -> None:
        if not self.fields or set(self.fields) - set(FIELDS):
            raise ValueError(f"fields must be a non-empty subset of {FIELDS}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError("sample_rate must be in (0, 1]")
        if self.ref_size < 10 or self.window_size < 10:
            raise ValueError("ref_size and window_size must be >= 10")
        if self.min_current is not None and not 2 <= self.min_current <= self.window_size:
            raise ValueError("min_current must be in [2, window_size]")
        if self.test_every < 1:
            raise ValueError("test_every must be >= 1")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError("alpha must be in (0, 1)")
        if not self.methods or set(self.methods) - set(METHODS):
            raise ValueError(f"methods must be a non-empty subset of {METHODS}")
        if self.max_keys < 1:
            raise ValueError("max_keys must be >= 1")

    @property
    def min_cur(self) -> int:
        return self.min_current if self.min_current is not None else self.window_size


@dataclass(slots=True)
class Sample:
    """One sampled text on its way through the embedder."""

    key: Key
    field: str
    event_id: str
    ts_ms: int
    text: str


@dataclass(slots=True)
class _Ref:
    version: int
    mode: str
    seq_from: int
    seq_to: int
    event_ids: list[str]
    emb: np.ndarray
    texts: list[str]
    from_ms: int
    to_ms: int


@dataclass(slots=True)
class _KeyField:
    key: Key
    field: str
    seq: int = 0
    ref: _Ref | None = None
    version: int = 0
    collect_from: int = 0
    collecting: list[tuple[int, str, int, np.ndarray, str]] = dc_field(default_factory=list)
    cur: deque[tuple[int, str, int, np.ndarray, str]] = dc_field(default_factory=deque)
    last_test_wall: float = 0.0
    since_test: int = 0
    detectors: dict[tuple[str, int], Any] = dc_field(default_factory=dict)


# --------------------------------------------------------------------------- engine (drift thread)


def _ms_to_dt(ms: int) -> Any:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000.0, tz=dt.UTC)


def _q(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


class DriftEngine:
    """Per key-field state, references and tests. Runs on one thread; talks to ClickHouse through
    ``query(sql) -> rows`` (synchronous). Returns the rows to write; writes nothing itself."""

    def __init__(self, cfg: DriftConfig, query: Any, database: str, embed_model: str) -> None:
        self.cfg = cfg
        self.query = query
        self.db = database
        self.embed_model = embed_model
        #: per key-field; dict order is the eviction order (least recently sampled first)
        self.state: dict[tuple[Key, str], _KeyField] = {}
        self.evicted = 0
        self.tests_run = 0
        self.references_made = 0
        self.references_loaded = 0
        #: --redact: the example texts the detectors put in explanations (the worker's mode)
        self.redaction = Redaction()

    # -- loading -------------------------------------------------------------------
    def _where(self, key: Key, fld: str) -> str:
        a, m, p = key
        return f"app = {_q(a)} AND model = {_q(m)} AND prompt_version = {_q(p)} AND field = {_q(fld)}"

    def _texts(self, key: Key, fld: str, ids: Sequence[str]) -> dict[str, str]:
        if not ids:
            return {}
        idl = ",".join(_q(i) for i in ids)
        rows = self.query(f"SELECT event_id, ifNull({fld}, '') FROM {self.db}.llm_events "
                          f"WHERE app = {_q(key[0])} AND model = {_q(key[1])} AND event_id IN ({idl})")
        return {r[0]: r[1] for r in rows}

    def _rows(self, key: Key, fld: str, cond: str, order: str = "seq", limit: int | None = None
              ) -> list[tuple[int, str, int, np.ndarray, str]]:
        lim = f" LIMIT {int(limit)}" if limit else ""
        rows = self.query(
            f"SELECT seq, event_id, toUnixTimestamp64Milli(timestamp), embedding FROM {self.db}.llm_embeddings "
            f"FINAL WHERE {self._where(key, fld)} AND ({cond}) ORDER BY {order}{lim}")
        texts = self._texts(key, fld, [r[1] for r in rows])
        out = [(int(s), e, int(t), np.asarray(v, dtype=np.float32), texts.get(e, "")) for s, e, t, v in rows]
        out.sort(key=lambda r: r[0])
        return out

    def _load(self, key: Key, fld: str) -> _KeyField:
        kf = _KeyField(key, fld)
        kf.cur = deque(maxlen=self.cfg.window_size)
        rows = self.query(f"SELECT max(seq), count() FROM {self.db}.llm_embeddings FINAL "
                          f"WHERE {self._where(key, fld)}")
        if rows and rows[0][1]:
            kf.seq = int(rows[0][0]) + 1
        refs = self.query(
            f"SELECT version, mode, seq_from, seq_to, event_ids, toUnixTimestamp64Milli(from_ts), "
            f"toUnixTimestamp64Milli(to_ts) FROM {self.db}.drift_references WHERE {self._where(key, fld)} "
            f"ORDER BY version DESC, created_at DESC LIMIT 1")
        if refs:
            version, mode, s_from, s_to, ids, f_ms, t_ms = refs[0]
            kf.version = int(version)
            if ids:
                emb = self._rows(key, fld, f"event_id IN ({','.join(_q(i) for i in ids)})")
                kf.ref = _Ref(int(version), mode, int(s_from), int(s_to), [r[1] for r in emb],
                              np.stack([r[3] for r in emb]), [r[4] for r in emb], int(f_ms), int(t_ms))
                kf.cur.extend(self._rows(key, fld, f"seq >= {int(s_to)}", "seq DESC", self.cfg.window_size))
                self.references_loaded += 1
                log.info("drift: reloaded reference v%d of %s/%s/%s %s (%d samples), current window %d",
                         version, *key, fld, len(emb), len(kf.cur))
            else:  # reset: collect a new reference from seq_from on
                kf.collect_from = int(s_from)
        if kf.ref is None and kf.seq > kf.collect_from:
            kf.collecting = self._rows(key, fld, f"seq >= {kf.collect_from}", "seq", self.cfg.ref_size)
        return kf

    def get(self, key: Key, fld: str) -> _KeyField:
        """The key-field's state (loaded from ClickHouse when not held), now the most recent."""
        kf = self.state.pop((key, fld), None)
        if kf is None:
            kf = self._load(key, fld)
        self.state[(key, fld)] = kf
        extra = len(self.state) - self.cfg.max_keys
        if extra > 0:
            for k in list(self.state)[:extra]:
                del self.state[k]  # its embeddings and reference are stored: reloaded when seen again
            self.evicted += extra
        return kf

    # -- references ----------------------------------------------------------------
    def _make_ref(self, kf: _KeyField, rows: list[tuple[int, str, int, np.ndarray, str]], mode: str,
                  seq_from: int, seq_to: int, control: str = "", note: str = "") -> dict[str, Any]:
        kf.version += 1
        ts = [r[2] for r in rows]
        kf.ref = _Ref(kf.version, mode, seq_from, seq_to, [r[1] for r in rows], np.stack([r[3] for r in rows]),
                      [r[4] for r in rows], min(ts), max(ts))
        kf.detectors = {}
        kf.cur = deque(maxlen=self.cfg.window_size)
        kf.collecting = []
        kf.since_test = 0
        self.references_made += 1
        log.info("drift: reference v%d (%s) of %s/%s/%s %s: %d samples", kf.version, mode, *kf.key, kf.field,
                 len(rows))
        return self._ref_row(kf, mode, seq_from, seq_to, [r[1] for r in rows], min(ts), max(ts), control, note)

    def _ref_row(self, kf: _KeyField, mode: str, seq_from: int, seq_to: int, ids: list[str], f_ms: int,
                 t_ms: int, control: str, note: str) -> dict[str, Any]:
        a, m, p = kf.key
        return {"app": a, "model": m, "prompt_version": p, "field": kf.field, "version": kf.version,
                "mode": mode, "seq_from": seq_from, "seq_to": seq_to, "from_ts": _ms_to_dt(f_ms),
                "to_ts": _ms_to_dt(t_ms), "n": len(ids), "event_ids": ids, "embed_model": self.embed_model,
                "control_id": control, "created_at": _ms_to_dt(int(time.time() * 1000)), "note": note}

    # -- the stream ---------------------------------------------------------------
    def process(self, samples: Sequence[Sample], hashes: Sequence[int], vecs: np.ndarray,
                now: float | None = None) -> tuple[dict[str, list[Any]], list[dict[str, Any]],
                                                   list[tuple[Sample, DriftResult]]]:
        """Number, store, reference and test one embedded batch. Returns (embedding columns,
        reference rows, [(sample at the window end, result)])."""
        now = time.monotonic() if now is None else now
        emb_cols: dict[str, list[Any]] = {c: [] for c in EMBEDDING_COLUMNS}
        ref_rows: list[dict[str, Any]] = []
        results: list[tuple[Sample, DriftResult]] = []
        touched: dict[tuple[Key, str], Sample] = {}
        # under --redact pii/hash the stored text_hash is 0: an unkeyed 64-bit hash of a short
        # prompt can be guessed back by hashing candidates (in memory it stays the cache key)
        keep_hash = not self.redaction.active
        for s, h, v in zip(samples, hashes, vecs, strict=True):
            h = h if keep_hash else 0
            kf = self.get(s.key, s.field)
            seq = kf.seq
            kf.seq += 1
            for c, val in zip(EMBEDDING_COLUMNS, (s.event_id, _ms_to_dt(s.ts_ms), s.key[0], s.key[1], s.key[2],
                                                  s.field, seq, self.embed_model, h, v.tolist()), strict=True):
                emb_cols[c].append(val)
            row = (seq, s.event_id, s.ts_ms, v, s.text)
            if kf.ref is None:
                if seq >= kf.collect_from:
                    kf.collecting.append(row)
                if len(kf.collecting) >= self.cfg.ref_size:
                    rows = kf.collecting[: self.cfg.ref_size]
                    ref_rows.append(self._make_ref(kf, rows, "first_n", rows[0][0], seq + 1))
                    kf.last_test_wall = now
                continue
            kf.cur.append(row)
            kf.since_test += 1
            pos = seq - kf.ref.seq_to + 1  # samples after the reference, this one included
            mc = self.cfg.min_cur
            if pos >= mc and (pos - mc) % self.cfg.test_every == 0:
                results.extend((s, r) for r in self._test(kf, now))
                touched.pop((s.key, s.field), None)
            elif pos >= mc:
                touched[(s.key, s.field)] = s
        if self.cfg.test_interval_s is not None:
            for (key, fld), s in touched.items():
                kf_ = self.state.get((key, fld))
                if kf_ is None:  # evicted meanwhile (more key-fields in the batch than max_keys)
                    continue
                kf = kf_
                if kf.since_test and now - kf.last_test_wall >= self.cfg.test_interval_s:
                    results.extend((s, r) for r in self._test(kf, now))
        return emb_cols, ref_rows, results

    def active_keys(self) -> int:
        return len({k for (k, _f), kf in self.state.items() if kf.ref is not None})

    def _detector(self, kf: _KeyField, method: str, b: int) -> Any:
        ck = (method, b)
        det = kf.detectors.get(ck)
        if det is None:
            assert kf.ref is not None
            det = AtLevel(make_detector(method, b, seed=self.cfg.seed, min_effect=self.cfg.min_effect),
                          level="alpha / (keys x fields x methods)")
            det.fit(kf.ref.emb.astype(np.float64), texts=self._shown(kf.ref.texts))
            kf.detectors[ck] = det
        return det

    def _shown(self, texts: list[str]) -> list[str]:
        """Texts as explanations may quote them: redacted per ``--redact`` (the
        embeddings were made from the originals)."""
        red = self.redaction
        return [red.text(t) or "" for t in texts] if red.active else texts

    def _test(self, kf: _KeyField, now: float) -> list[DriftResult]:
        assert kf.ref is not None
        cfg = self.cfg
        n_keys = self.active_keys()
        a_test = per_test_alpha(cfg.alpha, n_keys, len(cfg.fields), len(cfg.methods))
        b = n_resamples(a_test)
        cur = list(kf.cur)
        x = np.stack([r[3] for r in cur]).astype(np.float64)
        texts = self._shown([r[4] for r in cur])
        out = []
        for method in cfg.methods:
            det = self._detector(kf, method, b)
            r = det.score(x, texts=texts, alpha=a_test)  # the verdict is the detector's
            expl = dict(r.explanation)
            expl.update({
                "alpha_family": cfg.alpha, "alpha_test": a_test, "correction": "bonferroni",
                "family": {"keys": n_keys, "fields": len(cfg.fields), "methods": len(cfg.methods)},
                "resamples": b if method != "topic_mix" else None,
                "reference": {"version": kf.ref.version, "mode": kf.ref.mode, "n": len(kf.ref.event_ids),
                              "seq_from": kf.ref.seq_from, "seq_to": kf.ref.seq_to},
                "window": {"seq_from": cur[0][0], "seq_to": cur[-1][0] + 1,
                           "from_ms": min(rr[2] for rr in cur), "to_ms": max(rr[2] for rr in cur)},
            })
            out.append(replace(r, explanation=expl))
        kf.since_test = 0
        kf.last_test_wall = now
        self.tests_run += len(out)
        return out

    # -- baseline commands ------------------------------------------------------------
    def matching(self, cmd: dict[str, Any]) -> list[tuple[Key, str]]:
        conds = []
        for col in ("app", "model", "prompt_version", "field"):
            if cmd.get(col) is not None:
                conds.append(f"{col} = {_q(str(cmd[col]))}")
        where = " AND ".join(conds) or "1"
        rows = self.query(f"SELECT DISTINCT app, model, prompt_version, field FROM {self.db}.llm_embeddings "
                          f"WHERE {where}")
        keys = {((a, m, p), f) for a, m, p, f in rows if f in self.cfg.fields}
        keys |= {k for k in self.state if all(
            cmd.get(c) is None or str(cmd[c]) == v
            for c, v in zip(("app", "model", "prompt_version", "field"), (*k[0], k[1]), strict=True))}
        return sorted(keys)

    def apply(self, cmd: dict[str, Any], control_id: str) -> list[dict[str, Any]]:
        """Apply a baseline command to every matching key-field; returns the reference rows."""
        action = cmd.get("action")
        if action not in ("rebase", "pin", "reset"):
            log.warning("drift: unknown baseline command %r ignored", cmd)
            return []
        out = []
        for key, fld in self.matching(cmd):
            kf = self.get(key, fld)
            ctl = control_id
            note = str(cmd.get("note") or "")
            if action == "reset":
                kf.version += 1
                kf.ref = None
                kf.detectors = {}
                kf.cur = deque(maxlen=self.cfg.window_size)
                kf.collecting = []
                kf.collect_from = kf.seq
                out.append(self._ref_row(kf, "reset", kf.seq, kf.seq, [], 0, 0, ctl, note))
                continue
            f_ms, t_ms = cmd.get("from_ms"), cmd.get("to_ms")
            if f_ms is not None or t_ms is not None:
                cond = (f"timestamp >= fromUnixTimestamp64Milli({int(f_ms or 0)}) AND "
                        f"timestamp < fromUnixTimestamp64Milli({int(t_ms or 2**42)})")
                rows = self._rows(key, fld, cond)
                if len(rows) > self.cfg.ref_size:  # evenly spread over the range
                    pick = np.linspace(0, len(rows) - 1, self.cfg.ref_size).round().astype(int)
                    rows = [rows[i] for i in pick]
            else:  # the latest ref_size samples: "what we see now is normal"
                rows = self._rows(key, fld, "1", "seq DESC", self.cfg.ref_size)
            if len(rows) < 10:
                log.warning("drift: %s of %s/%s/%s %s skipped: %d samples in the range", action, *key, fld,
                            len(rows))
                continue
            mode = "pinned" if action == "pin" else "rebase"
            out.append(self._make_ref(kf, rows, mode, rows[0][0], kf.seq, ctl, note))
        return out


# --------------------------------------------------------------------------- the stage


class DriftStage:
    """The worker stage (``name = "drift"``). ``DriftStage.factory(cfg)`` for ``serve_worker(stages=…)``."""

    name = "drift"
    tables = ("llm_embeddings", "drift_references", "drift_scores", "drift_control_log")

    def __init__(self, cfg: DriftConfig | None = None, registry: CollectorRegistry | None = None,
                 encoder: Any = None) -> None:
        self.cfg = cfg or DriftConfig()
        self._encoder = encoder
        self.metrics = DriftStageMetrics(self, registry)
        self.batcher: EmbeddingBatcher[Sample] | None = None
        self.engine: DriftEngine | None = None
        #: what start() is given (streams/ports.py); None before start
        self._ports: StagePorts | None = None
        #: called with every drift test result (a ``drift_scores`` row), e.g. the alerting
        #: stage's ``observe_drift``: linked by the wiring (streams/wiring.py)
        self.observers: list[Callable[[DriftObservation], None]] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drift")
        self._inbox: list[tuple[list[Sample], list[int], np.ndarray]] = []
        self._controls: list[tuple[dict[str, Any], str, str, int, int]] = []
        self._wake = asyncio.Event()
        self._busy = False
        self._task: asyncio.Task[None] | None = None
        self._control_task: asyncio.Task[None] | None = None
        self.stored_embeddings = 0
        self.stored_scores = 0
        self.controls_applied = 0
        self._applied_ids: set[str] = set()

    @classmethod
    def factory(cls, cfg: DriftConfig | None = None, encoder: Any = None) -> Any:
        return lambda registry: cls(cfg, registry, encoder)

    # -- lifecycle ---------------------------------------------------------------
    def add_observer(self, fn: Callable[[DriftObservation], None]) -> None:
        """Hand every drift test result to ``fn`` too (safe to call from the drift loop)."""
        self.observers.append(fn)

    async def start(self, ports: StagePorts) -> None:
        self._ports = ports
        ecfg = self.cfg.embedding
        enc = self._encoder if self._encoder is not None else (lambda: load_encoder(ecfg))
        self.batcher = EmbeddingBatcher(enc, self._on_embedded, batch_size=ecfg.batch_size,
                                        max_delay_s=ecfg.max_delay_s, max_queue=ecfg.max_queue,
                                        cache_size=ecfg.cache_size)
        await self.batcher.start()
        assert self.batcher.encoder is not None
        self.engine = DriftEngine(self.cfg, ports.tables.query, ports.tables.database,
                                  getattr(self.batcher.encoder, "name", "encoder"))
        self.engine.redaction = ports.redaction
        self._task = asyncio.create_task(self._loop(), name="driftline-drift")
        if self.cfg.control_topic:
            self._control_task = asyncio.create_task(self._control_loop(), name="driftline-drift-control")
        log.info("drift stage: %s on %s, sample rate %.3g, fields %s, reference %d, window %d, every %d",
                 self.batcher.encoder.name, getattr(self.batcher.encoder, "device", "?"),
                 self.cfg.sample_rate, ",".join(self.cfg.fields), self.cfg.ref_size, self.cfg.window_size,
                 self.cfg.test_every)

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every accepted sample is embedded, tested and written."""
        async def _all() -> None:
            assert self.batcher is not None
            await self.batcher.drain()
            while self._inbox or self._controls or self._busy:
                await asyncio.sleep(0.02)
        try:
            await asyncio.wait_for(_all(), timeout)
            return True
        except TimeoutError:
            return False

    async def stop(self) -> None:
        if self._control_task is not None:
            self._control_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._control_task
        if self.batcher is not None:
            if not await self.drain(self.cfg.drain_timeout_s):
                log.warning("drift: stopped before every sample was embedded")
            await self.batcher.stop(0)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._pool.shutdown(wait=True)

    # -- input (event loop, cheap) ---------------------------------------------------
    def on_stored(self, batch: Any) -> None:
        ev = batch.events
        if not ev or self.batcher is None:
            return
        ids, apps, models, pvs, tss = (ev["event_id"], ev["app"], ev["model"], ev["prompt_version"],
                                       ev["timestamp"])
        items: list[tuple[str, Sample]] = []
        m = self.metrics
        for (a, mo), c in Counter(zip(apps, models, strict=True)).items():
            m.seen[m.label(a, mo)] += c
        picked = np.flatnonzero(sample_mask(ids, self.cfg.sample_rate, self.cfg.sample_salt)).tolist()
        cols = [(f, _texts_at(ev, f, picked)) for f in self.cfg.fields]
        for i in picked:
            key = (apps[i], models[i], pvs[i] or "")
            lab = m.label(apps[i], models[i])
            for f, col in cols:
                text = col[i] if col is not None else None
                if text:
                    items.append((text, Sample(key, f, ids[i], int(tss[i]), text)))
                    m.sampled[(*lab, f)] += 1
        if items:
            self.batcher.submit(items)

    def _on_embedded(self, samples: list[Sample], hashes: list[int], vecs: np.ndarray) -> None:
        self._inbox.append((samples, hashes, vecs))
        self._wake.set()

    # -- the drift loop -------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        eng = self.engine
        assert eng is not None
        while True:
            if not self._inbox and not self._controls:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._busy = True
            try:
                if self._inbox:
                    work, self._inbox = self._inbox, []
                    samples = [s for w in work for s in w[0]]
                    hashes = [h for w in work for h in w[1]]
                    vecs = np.concatenate([w[2] for w in work])
                    emb, refs, results = await loop.run_in_executor(self._pool, eng.process, samples, hashes, vecs)
                    await self._write(emb, refs, results)
                while self._controls:
                    cmd, cid, topic, part, off = self._controls.pop(0)
                    refs = await loop.run_in_executor(self._pool, eng.apply, cmd, cid)
                    await self._write({}, refs, [])
                    assert self._ports is not None
                    log_row = {"control_id": cid, "applied_at": _ms_to_dt(int(self._ports.clock() * 1000)),
                               "action": str(cmd.get("action")), "command": json.dumps(cmd, sort_keys=True),
                               "n_references": len(refs), "topic": topic, "partition": part, "offset": off}
                    await self._ports.tables.insert_rows("drift_control_log", [log_row], CONTROL_LOG_COLUMNS)
                    self._applied_ids.add(cid)
                    self.controls_applied += 1
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a failure here never stops the stream
                log.exception("drift: processing a batch failed")
                if self._ports is not None:
                    self._ports.metrics.stage_errors[self.name] += 1
            finally:
                self._busy = False

    async def _write(self, emb: dict[str, list[Any]], refs: list[dict[str, Any]],
                     results: list[tuple[Sample, DriftResult]]) -> None:
        assert self._ports is not None
        sink = self._ports.tables
        if emb and emb["event_id"]:
            await sink.insert_columns("llm_embeddings", emb)
            self.stored_embeddings += len(emb["event_id"])
        if refs:
            await sink.insert_rows("drift_references", refs, REFERENCE_COLUMNS)
        if not results:
            return
        rows = []
        for s, r in results:
            row = r.to_row()
            row.update(ts=_ms_to_dt(r.explanation["window"]["to_ms"]), app=s.key[0], model=s.key[1],
                       prompt_version=s.key[2], field=s.field)
            rows.append(row)
        await sink.insert_rows("drift_scores", rows, SCORE_COLUMNS)
        self.stored_scores += len(rows)
        self._publish(results)

    def _publish(self, results: list[tuple[Sample, DriftResult]]) -> None:
        from driftline.schemas.rules import DriftObservation

        assert self._ports is not None
        metrics, observers = self._ports.metrics, self.observers
        for s, r in results:
            a, m, p = s.key
            metrics.observe_drift(a, m, p, s.field, r.method, r.statistic, r.p_value, r.drifted)
            if observers:
                obs = DriftObservation(ts_ms=int(r.explanation["window"]["to_ms"]), app=a, model=m,
                                       prompt_version=p, field=s.field, method=r.method,
                                       statistic=float(r.statistic), p_value=r.p_value, drifted=r.drifted)
                for f in observers:
                    try:
                        f(obs)
                    except Exception:  # noqa: BLE001
                        log.exception("drift: observe_drift of a stage failed")

    # -- control topic -------------------------------------------------------------
    async def _control_loop(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        topic = self.cfg.control_topic
        assert topic and self.engine is not None
        db = self.engine.db
        assert self._ports is not None
        done = await self._ports.tables.aquery(f"SELECT DISTINCT control_id FROM {db}.drift_control_log")
        self._applied_ids = {r[0] for r in done}
        kafka = self._ports.kafka
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest",
                                    **kafka.security.aiokafka_kwargs())
        await consumer.start()
        try:
            parts = None
            for _ in range(50):
                parts = consumer.partitions_for_topic(topic)
                if parts:
                    break
                await consumer.force_metadata_update()
                await asyncio.sleep(0.2)
            if not parts:
                log.warning("drift: control topic %s not found; baseline commands are off", topic)
                return
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)  # commands are rare; the log says which were applied
            while True:
                data = await consumer.getmany(timeout_ms=500)
                for tp, recs in data.items():
                    for rec in recs:
                        try:  # one bad record must not end this loop (it is re-read at every start)
                            self.on_control_record(rec.value, tp.topic, tp.partition, rec.offset, rec.timestamp)
                        except Exception:  # noqa: BLE001
                            log.exception("drift: control record %s[%d]@%d skipped", tp.topic, tp.partition,
                                          rec.offset)
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()

    def on_control_record(self, value: bytes | None, topic: str, partition: int, offset: int,
                          timestamp: int) -> bool:
        """One record of the control topic (the consumer loop above calls this): a
        ``baseline`` command that passes the signature check (when the worker has a
        control secret) and was not applied before is queued for the drift loop, which
        applies it and logs it in ``drift_control_log``. Returns True when queued."""
        from driftline.streams.ingest.control_auth import admit

        try:
            cmd = json.loads(value)  # type: ignore[arg-type]
        except (ValueError, TypeError, RecursionError):  # deep nesting: refused, never ends the loop
            log.warning("drift: control record %s[%d]@%d is not JSON", topic, partition, offset)
            return False
        if not (isinstance(cmd, dict) and cmd.get("cmd") == "baseline"):
            return False
        cid = str(cmd.get("id") or f"{topic}:{partition}:{offset}:{timestamp}")
        if cid in self._applied_ids:  # applied before (the topic is read from its start each time)
            return False
        assert self._ports is not None
        auth = self._ports.control
        if not admit(cmd, auth.secret, self._ports.metrics.control_refused,
                     max_age_s=auth.max_age_s, where="drift"):
            return False
        log.info("drift: baseline command %s", {k: v for k, v in cmd.items() if k != "sig"})
        self._applied_ids.add(cid)
        self._controls.append((cmd, cid, topic, partition, offset))
        self._wake.set()
        return True
