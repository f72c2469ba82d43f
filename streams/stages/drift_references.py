"""The drift engine: per key-field state, references and tests (the drift stage's thread).

:class:`DriftEngine` holds, per key ``(app, model, prompt_version)`` and field, the
samples' numbering (``seq``), the **reference** (the first ``ref_size`` samples
after first sight, or one a baseline command made), the sliding **current window**
and the detectors fitted on the reference; it tests the window against the
reference at fixed positions (see streams/stages/semantic_drift.py for the whole
stage). It writes nothing itself: :meth:`DriftEngine.process` and
:meth:`DriftEngine.apply` return the rows to write.

It reads ClickHouse through ``query(sql, parameters) -> rows`` (synchronous, run off
the event loop): a key-field seen for the first time since start is loaded from
``drift_references`` and ``llm_embeddings``. Every value goes to ClickHouse as a
bound query parameter (``{name:Type}`` placeholders, server-side binding of
clickhouse-connect, chDB and HTTP alike); the SQL text holds only the engine's own
constants, so a key with quotes or backslashes is matched exactly.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from dataclasses import field as dc_field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from driftline.detectors.at_level import AtLevel
from driftline.detectors.calibration import bonferroni
from driftline.detectors.permutation import n_resamples
from driftline.detectors.redact import Redaction
from driftline.detectors.semantic import CentroidDrift, MMDDrift, TopicMixDrift
from driftline.schemas.columns import EMBEDDING_COLUMNS
from driftline.schemas.drift_result import DriftResult

if TYPE_CHECKING:
    from driftline.streams.stages.semantic_drift import DriftConfig, Sample

log = logging.getLogger("driftline.drift")

__all__ = ["FIELDS", "METHODS", "Key", "Query", "SampleRow", "Reference", "GoldenSet", "golden_subset", "KeyField",
           "DriftEngine",
           "per_test_alpha", "make_detector", "ms_to_dt"]

FIELDS = ("prompt", "response")
METHODS = ("mmd", "topic_mix", "centroid_cosine")

Key = tuple[str, str, str]  # app, model, prompt_version
#: ``query(sql, parameters) -> rows``: the engine's read of ClickHouse (the stage's TableWriter.query)
Query = Callable[[str, Mapping[str, Any]], Sequence[tuple[Any, ...]]]

#: one key-field's rows; ``{app:String}``... are bound from :func:`_key_params`
_KEY_WHERE = ("app = {app:String} AND model = {model:String} AND prompt_version = {pv:String} "
              "AND field = {field:String}")
#: the conditions :meth:`DriftEngine._rows` is called with (constants: values are parameters)
_BY_IDS = "event_id IN {ids:Array(String)}"
_FROM_SEQ = "seq >= {seq:UInt64}"
_IN_RANGE = ("timestamp >= fromUnixTimestamp64Milli({from_ms:Int64}) AND "
             "timestamp < fromUnixTimestamp64Milli({to_ms:Int64})")
_ALL = "1"
#: the filters a baseline command may set, each a column of ``llm_embeddings``
_COMMAND_FILTERS = ("app", "model", "prompt_version", "field")


def check_test_schedule(cfg: Any) -> None:
    """The settings a windowed test stage shares (``DriftConfig``, ``NumericDriftConfig``):
    sample rate, reference and window sizes, the first test and the test spacing, alpha and
    the key cap; ValueError naming the bad one."""
    if not 0.0 < cfg.sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {cfg.sample_rate}")
    if cfg.ref_size < 10 or cfg.window_size < 10:
        raise ValueError("ref_size and window_size must be >= 10")
    if cfg.min_current is not None and not 2 <= cfg.min_current <= cfg.window_size:
        raise ValueError("min_current must be in [2, window_size]")
    if cfg.test_every < 1:
        raise ValueError("test_every must be >= 1")
    if not 0.0 < cfg.alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {cfg.alpha}")
    if cfg.max_keys < 1:
        raise ValueError("max_keys must be >= 1")


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


def ms_to_dt(ms: int) -> dt.datetime:
    """Epoch milliseconds as an aware UTC datetime (a ``DateTime64(3, 'UTC')`` value)."""
    return dt.datetime.fromtimestamp(ms / 1000.0, tz=dt.UTC)


def _key_params(key: Key, fld: str) -> dict[str, Any]:
    return {"app": key[0], "model": key[1], "pv": key[2], "field": fld}


def _matches(cmd: Mapping[str, Any], key: Key, fld: str) -> bool:
    """Do a baseline command's filters (``None``: any) select this key-field?"""
    return all(cmd.get(c) is None or str(cmd[c]) == v
               for c, v in zip(_COMMAND_FILTERS, (*key, fld), strict=True))


class SampleRow(NamedTuple):
    """One embedded sample of a key-field, as the engine holds it."""

    seq: int
    event_id: str
    ts_ms: int
    vec: np.ndarray
    text: str


@dataclass(slots=True)
class Reference:
    """A key-field's reference: its samples and how it was made (a ``drift_references`` row)."""

    version: int
    mode: str
    seq_from: int
    seq_to: int
    event_ids: list[str]
    emb: np.ndarray
    texts: list[str]
    from_ms: int
    to_ms: int
    #: mode ``golden``: the golden set (``drift_golden``) the vectors come from
    golden_id: str = ""
    #: how many texts the reference stands for (a golden set larger than ``ref_size`` is
    #: tested on an even subset of it; ``n`` is the whole set)
    n: int | None = None


@dataclass(frozen=True, slots=True)
class GoldenSet:
    """A golden set's vectors and texts (``drift_golden``), in file order."""

    golden_id: str
    emb: np.ndarray
    texts: list[str]


def golden_subset(n: int, ref_size: int) -> np.ndarray:
    """The indices of a golden set of ``n`` the tests use: all when ``n <= ref_size``, else
    ``ref_size`` spread evenly over the set (the permutation tests' memory grows with the
    square of the reference; the same indices on every worker and after every restart)."""
    if n <= ref_size:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, ref_size).round().astype(int))


@dataclass(slots=True)
class KeyField:
    """The state of one key and field: numbering, reference, current window, detectors."""

    key: Key
    field: str
    seq: int = 0
    ref: Reference | None = None
    version: int = 0
    collect_from: int = 0
    collecting: list[SampleRow] = dc_field(default_factory=list)
    cur: deque[SampleRow] = dc_field(default_factory=deque)
    last_test_wall: float = 0.0
    since_test: int = 0
    detectors: dict[tuple[str, int], Any] = dc_field(default_factory=dict)


class DriftEngine:
    """Per key-field state, references and tests. Runs on one thread; reads ClickHouse through
    ``query(sql, parameters) -> rows`` (synchronous). Returns the rows to write; writes nothing itself."""

    def __init__(self, cfg: DriftConfig, query: Query, database: str, embed_model: str) -> None:
        self.cfg = cfg
        self.query = query
        self.db = database
        self.embed_model = embed_model
        #: per key-field; dict order is the eviction order (least recently sampled first)
        self.state: dict[tuple[Key, str], KeyField] = {}
        self.evicted = 0
        #: per-test levels already warned about: below the smallest p-value permutations reach
        self.unattainable: set[float] = set()
        self.tests_run = 0
        self.references_made = 0
        self.references_loaded = 0
        #: --redact: the example texts the detectors put in explanations (the worker's mode)
        self.redaction = Redaction()
        #: golden sets read or made, by golden id (one copy shared by every key that uses it)
        self.goldens: dict[str, GoldenSet] = {}
        #: golden sets read from ``drift_golden`` (a restart: never embedded again)
        self.goldens_read = 0
        #: golden references a key got when first seen (no reference row yet): written by process()
        self.pending_refs: list[dict[str, Any]] = []
        #: names the attack clusters of a topic-mix explanation (the semantic guard's
        #: ``label_clusters(field, window vectors, their clusters, explanation)``); None: not named
        self.cluster_labeler: Callable[[str, np.ndarray, np.ndarray, dict[str, Any]], None] | None = None
        #: the baseline commands applied (:meth:`_baseline_commands`); None until first needed
        self._commands: list[tuple[str, dict[str, Any]]] | None = None

    # -- loading -------------------------------------------------------------------
    def _texts(self, key: Key, fld: str, ids: Sequence[str]) -> dict[str, str]:
        if not ids:
            return {}
        rows = self.query(
            "SELECT event_id, ifNull({col:Identifier}, '') FROM {db:Identifier}.llm_events "
            "WHERE app = {app:String} AND model = {model:String} AND event_id IN {ids:Array(String)}",
            {"col": fld, "db": self.db, "app": key[0], "model": key[1], "ids": list(ids)})
        return {r[0]: r[1] for r in rows}

    def _rows(self, key: Key, fld: str, cond: str, params: Mapping[str, Any], order: str = "seq",
              limit: int | None = None) -> list[SampleRow]:
        """The stored samples of a key-field where ``cond`` (one of the ``_BY_IDS``... constants,
        its values in ``params``), the first ``limit`` in ``order``, returned in ``seq`` order."""
        sql = ("SELECT seq, event_id, toUnixTimestamp64Milli(timestamp), embedding "
               "FROM {db:Identifier}.llm_embeddings FINAL WHERE " + _KEY_WHERE + " AND (" + cond + ") "
               "ORDER BY " + order + (" LIMIT {limit:UInt64}" if limit else ""))
        rows = self.query(sql, {**params, **_key_params(key, fld), "db": self.db,
                                **({"limit": int(limit)} if limit else {})})
        texts = self._texts(key, fld, [r[1] for r in rows])
        out = [SampleRow(int(s), e, int(t), np.asarray(v, dtype=np.float32), texts.get(e, ""))
               for s, e, t, v in rows]
        out.sort(key=lambda r: r.seq)
        return out

    def _load(self, key: Key, fld: str) -> KeyField:
        kf = KeyField(key, fld)
        kf.cur = deque(maxlen=self.cfg.window_size)
        at = {**_key_params(key, fld), "db": self.db}
        rows = self.query("SELECT max(seq), count() FROM {db:Identifier}.llm_embeddings FINAL WHERE "
                          + _KEY_WHERE, at)
        if rows and rows[0][1]:
            kf.seq = int(rows[0][0]) + 1
        refs = self.query(
            "SELECT version, mode, seq_from, seq_to, event_ids, toUnixTimestamp64Milli(from_ts), "
            "toUnixTimestamp64Milli(to_ts) FROM {db:Identifier}.drift_references WHERE " + _KEY_WHERE
            + " ORDER BY version DESC, created_at DESC LIMIT 1", at)
        if refs:
            version, mode, s_from, s_to, ids, f_ms, t_ms = refs[0]
            kf.version = int(version)
            if mode == "golden":
                self._load_golden(kf, int(version), int(s_from), int(s_to))
            elif ids:
                emb = self._rows(key, fld, _BY_IDS, {"ids": list(ids)})
                kf.ref = Reference(int(version), mode, int(s_from), int(s_to), [r.event_id for r in emb],
                                   np.stack([r.vec for r in emb]), [r.text for r in emb], int(f_ms), int(t_ms))
                kf.cur.extend(self._rows(key, fld, _FROM_SEQ, {"seq": int(s_to)}, "seq DESC",
                                         self.cfg.window_size))
                self.references_loaded += 1
                log.info("drift: reloaded reference v%d of %s/%s/%s %s (%d samples), current window %d",
                         version, *key, fld, len(emb), len(kf.cur))
            else:  # reset: collect a new reference from seq_from on
                kf.collect_from = int(s_from)
        else:  # never had a reference: a golden load whose filters match the key gives it one
            gid = self._golden_for(key, fld)
            gs = self.golden_set(gid) if gid else None
            if gs is not None:
                self.pending_refs.append(self._golden_ref(kf, gs, ""))
        if kf.ref is None and kf.seq > kf.collect_from:
            kf.collecting = self._rows(key, fld, _FROM_SEQ, {"seq": kf.collect_from}, "seq", self.cfg.ref_size)
        return kf

    # -- golden sets -----------------------------------------------------------------
    def golden_set(self, golden_id: str, n: int | None = None) -> GoldenSet | None:
        """The golden set ``golden_id``: held, else read from ``drift_golden`` (None when not
        stored with this worker's embedding model, or, with ``n``, not all ``n`` of its rows are)."""
        gs = self.goldens.get(golden_id)
        if gs is not None:
            return gs
        rows = self.query("SELECT idx, text, embedding FROM {db:Identifier}.drift_golden FINAL "
                          "WHERE golden_id = {gid:String} AND embed_model = {model:String} ORDER BY idx",
                          {"db": self.db, "gid": golden_id, "model": self.embed_model})
        if not rows or (n is not None and len(rows) != n) or [int(r[0]) for r in rows] != list(range(len(rows))):
            return None
        gs = GoldenSet(golden_id, np.asarray([r[2] for r in rows], dtype=np.float32), [r[1] for r in rows])
        self.goldens[golden_id] = gs
        self.goldens_read += 1
        return gs

    def _load_golden(self, kf: KeyField, version: int, seq_from: int, seq_to: int) -> None:
        """A stored golden reference: its set's vectors from ``drift_golden`` (not embedded again)."""
        gid = self.query("SELECT control_id FROM {db:Identifier}.drift_references WHERE " + _KEY_WHERE
                         + " AND version = {v:UInt32} AND mode = 'golden' LIMIT 1",
                         {**_key_params(kf.key, kf.field), "db": self.db, "v": version})
        gs = self.golden_set(str(gid[0][0])) if gid else None
        if gs is None:  # its vectors are gone, or of another model: collect a new reference
            log.warning("drift: golden reference v%d of %s/%s/%s %s: its set is not in drift_golden with "
                        "the model %s; collecting a new reference (load the set again)", version, *kf.key,
                        kf.field, self.embed_model)
            kf.collect_from = seq_to
            return
        kf.ref = self._golden_reference(gs, version, seq_from, seq_to)
        kf.cur.extend(self._rows(kf.key, kf.field, _FROM_SEQ, {"seq": seq_to}, "seq DESC", self.cfg.window_size))
        self.references_loaded += 1
        log.info("drift: reloaded golden reference v%d of %s/%s/%s %s (set %s, %d texts), current window %d",
                 version, *kf.key, kf.field, gs.golden_id, len(gs.texts), len(kf.cur))

    def _golden_reference(self, gs: GoldenSet, version: int, seq_from: int, seq_to: int) -> Reference:
        pick = golden_subset(len(gs.texts), self.cfg.ref_size)
        return Reference(version, "golden", seq_from, seq_to, [], gs.emb[pick], [gs.texts[i] for i in pick],
                         0, 0, golden_id=gs.golden_id, n=len(gs.texts))

    def _golden_for(self, key: Key, fld: str) -> str | None:
        """The golden set a key-field seen for the first time gets: that of the latest baseline
        command whose filters match it, when that command is a golden load (a later reset,
        rebase or pin matching the key means: no golden set for new keys)."""
        best: tuple[int, str, str] | None = None
        for cid, cmd in self._baseline_commands():
            if not _matches(cmd, key, fld):
                continue
            at = (int(cmd.get("sent_at_ms") or 0), cid, str(cmd.get("action")))
            if best is None or at[:2] > best[:2]:
                best = at
        return best[1] if best is not None and best[2] == "golden" else None

    def _baseline_commands(self) -> list[tuple[str, dict[str, Any]]]:
        """(id, command) of every baseline command applied: read from ``drift_control_log`` once,
        then kept current by :meth:`apply` / :meth:`apply_golden` (every worker applies every
        command it gets; those applied before it started are in the log)."""
        if self._commands is None:
            rows = self.query("SELECT control_id, any(command) FROM {db:Identifier}.drift_control_log "
                              "WHERE action IN ('golden', 'rebase', 'pin', 'reset') GROUP BY control_id",
                              {"db": self.db})
            self._commands = []
            for cid, text in rows:
                try:
                    cmd = json.loads(text)
                except ValueError:
                    continue
                if isinstance(cmd, dict):
                    self._commands.append((str(cid), cmd))
        return self._commands

    def _golden_ref(self, kf: KeyField, gs: GoldenSet, note: str) -> dict[str, Any]:
        """Make ``gs`` the key-field's reference from its next sample on; the reference row."""
        kf.version += 1
        kf.ref = self._golden_reference(gs, kf.version, kf.seq, kf.seq)
        kf.detectors = {}
        kf.cur = deque(maxlen=self.cfg.window_size)
        kf.collecting = []
        kf.since_test = 0
        self.references_made += 1
        log.info("drift: golden reference v%d of %s/%s/%s %s: set %s, %d texts", kf.version, *kf.key, kf.field,
                 gs.golden_id, len(gs.texts))
        row = self._ref_row(kf, "golden", kf.seq, kf.seq, [], 0, 0, gs.golden_id, note)
        row["n"] = len(gs.texts)
        return row

    def apply_golden(self, cmd: dict[str, Any], gs: GoldenSet) -> list[dict[str, Any]]:
        """Make the golden set ``gs`` the reference of every matching key-field (its filters as
        :meth:`matching`); a key-field whose reference is already this set is left as it is
        (another worker or an earlier try applied it). Returns the reference rows."""
        self.goldens[gs.golden_id] = gs
        self._baseline_commands().append((gs.golden_id, cmd))
        note = str(cmd.get("note") or "")
        out = []
        for key, fld in self.matching(cmd):
            kf = self.get(key, fld)
            if kf.ref is not None and kf.ref.golden_id == gs.golden_id:
                continue
            out.append(self._golden_ref(kf, gs, note))
        return self._take_pending() + out

    def _take_pending(self) -> list[dict[str, Any]]:
        out, self.pending_refs = self.pending_refs, []
        return out

    def get(self, key: Key, fld: str) -> KeyField:
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
    def _make_ref(self, kf: KeyField, rows: list[SampleRow], mode: str, seq_from: int, seq_to: int,
                  control: str = "", note: str = "") -> dict[str, Any]:
        kf.version += 1
        ts = [r.ts_ms for r in rows]
        ids = [r.event_id for r in rows]
        kf.ref = Reference(kf.version, mode, seq_from, seq_to, ids, np.stack([r.vec for r in rows]),
                           [r.text for r in rows], min(ts), max(ts))
        kf.detectors = {}
        kf.cur = deque(maxlen=self.cfg.window_size)
        kf.collecting = []
        kf.since_test = 0
        self.references_made += 1
        log.info("drift: reference v%d (%s) of %s/%s/%s %s: %d samples", kf.version, mode, *kf.key, kf.field,
                 len(rows))
        return self._ref_row(kf, mode, seq_from, seq_to, ids, min(ts), max(ts), control, note)

    def _ref_row(self, kf: KeyField, mode: str, seq_from: int, seq_to: int, ids: list[str], f_ms: int,
                 t_ms: int, control: str, note: str) -> dict[str, Any]:
        a, m, p = kf.key
        return {"app": a, "model": m, "prompt_version": p, "field": kf.field, "version": kf.version,
                "mode": mode, "seq_from": seq_from, "seq_to": seq_to, "from_ts": ms_to_dt(f_ms),
                "to_ts": ms_to_dt(t_ms), "n": len(ids), "event_ids": ids, "embed_model": self.embed_model,
                "control_id": control, "created_at": ms_to_dt(int(time.time() * 1000)), "note": note}

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
            kf = self.get(s.key, s.field)
            if self.pending_refs:  # a golden reference the key got when first seen
                ref_rows.extend(self._take_pending())
            row = SampleRow(kf.seq, s.event_id, s.ts_ms, v, s.text)
            kf.seq += 1
            for c, val in zip(EMBEDDING_COLUMNS, (s.event_id, ms_to_dt(s.ts_ms), *s.key, s.field, row.seq,
                                                  self.embed_model, h if keep_hash else 0, v.tolist()),
                              strict=True):
                emb_cols[c].append(val)
            if kf.ref is None:
                ref = self._collect(kf, row, now)
                if ref is not None:
                    ref_rows.append(ref)
                continue
            kf.cur.append(row)
            kf.since_test += 1
            pos = row.seq - kf.ref.seq_to + 1  # samples after the reference, this one included
            mc = self.cfg.min_cur
            if pos >= mc and (pos - mc) % self.cfg.test_every == 0:
                results.extend((s, r) for r in self._test(kf, now))
                touched.pop((s.key, s.field), None)
            elif pos >= mc:
                touched[(s.key, s.field)] = s
        results.extend(self._test_due(touched, now))
        return emb_cols, ref_rows, results

    def _collect(self, kf: KeyField, row: SampleRow, now: float) -> dict[str, Any] | None:
        """A sample of a key-field without a reference: collected; the reference row once
        ``ref_size`` are."""
        if row.seq >= kf.collect_from:
            kf.collecting.append(row)
        if len(kf.collecting) < self.cfg.ref_size:
            return None
        rows = kf.collecting[: self.cfg.ref_size]
        kf.last_test_wall = now
        return self._make_ref(kf, rows, "first_n", rows[0].seq, row.seq + 1)

    def _test_due(self, touched: dict[tuple[Key, str], Sample],
                  now: float) -> list[tuple[Sample, DriftResult]]:
        """``test_interval_s``: the key-fields sampled past a test position whose last test is that old."""
        out: list[tuple[Sample, DriftResult]] = []
        if self.cfg.test_interval_s is None:
            return out
        for (key, fld), s in touched.items():
            kf = self.state.get((key, fld))
            if kf is None:  # evicted meanwhile (more key-fields in the batch than max_keys)
                continue
            if kf.since_test and now - kf.last_test_wall >= self.cfg.test_interval_s:
                out.extend((s, r) for r in self._test(kf, now))
        return out

    def active_keys(self) -> int:
        return len({k for (k, _f), kf in self.state.items() if kf.ref is not None})

    def _detector(self, kf: KeyField, method: str, b: int) -> Any:
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

    def _test(self, kf: KeyField, now: float) -> list[DriftResult]:
        """Test the current window against the reference with every method. The verdict
        (``drifted``) is the detector's, taken at the Bonferroni level by AtLevel; the
        stage only adds to the explanation."""
        assert kf.ref is not None
        cfg = self.cfg
        n_keys = self.active_keys()
        a_test = per_test_alpha(cfg.alpha, n_keys, len(cfg.fields), len(cfg.methods))
        b = n_resamples(a_test)
        p_floor = 1.0 / (b + 1)  # the smallest p-value of b permutations
        if p_floor >= a_test and a_test not in self.unattainable:
            self.unattainable.add(a_test)
            log.warning("drift: %d keys x %d fields x %d methods put the per-test level at %.3g, at or below the "
                        "smallest p-value of %d permutations (%.3g): MMD and centroid tests cannot flag; test "
                        "fewer fields or methods, or raise --drift-alpha", n_keys, len(cfg.fields), len(cfg.methods),
                        a_test, b, p_floor)
        cur = list(kf.cur)
        x = np.stack([r.vec for r in cur]).astype(np.float64)
        texts = self._shown([r.text for r in cur])
        out = []
        for method in cfg.methods:
            det = self._detector(kf, method, b)
            r = det.score(x, texts=texts, alpha=a_test)
            expl = dict(r.explanation)
            if method == "topic_mix" and self.cluster_labeler is not None:
                self.cluster_labeler(kf.field, x, det.detector.assign(x), expl)
            expl.update({
                "alpha_family": cfg.alpha, "alpha_test": a_test, "correction": "bonferroni",
                "family": {"keys": n_keys, "fields": len(cfg.fields), "methods": len(cfg.methods)},
                "resamples": b if method != "topic_mix" else None,
                "p_floor": p_floor if method != "topic_mix" else None,
                "reference": {"version": kf.ref.version, "mode": kf.ref.mode,
                              "n": kf.ref.n if kf.ref.n is not None else len(kf.ref.event_ids),
                              **({"golden_id": kf.ref.golden_id, "n_tested": len(kf.ref.texts)}
                                 if kf.ref.golden_id else {}),
                              "seq_from": kf.ref.seq_from, "seq_to": kf.ref.seq_to},
                "window": {"seq_from": cur[0].seq, "seq_to": cur[-1].seq + 1,
                           "from_ms": min(rr.ts_ms for rr in cur), "to_ms": max(rr.ts_ms for rr in cur)},
            })
            out.append(replace(r, explanation=expl))
        kf.since_test = 0
        kf.last_test_wall = now
        self.tests_run += len(out)
        return out

    # -- baseline commands ------------------------------------------------------------
    def matching(self, cmd: dict[str, Any]) -> list[tuple[Key, str]]:
        """The key-fields a baseline command's filters (app, model, prompt_version, field) select:
        those stored in ``llm_embeddings`` and those held."""
        given = {c: str(cmd[c]) for c in _COMMAND_FILTERS if cmd.get(c) is not None}
        where = " AND ".join(f"{c} = {{{c}:String}}" for c in given) or _ALL
        rows = self.query("SELECT DISTINCT app, model, prompt_version, field FROM {db:Identifier}.llm_embeddings "
                          "WHERE " + where, {**given, "db": self.db})
        keys = {((a, m, p), f) for a, m, p, f in rows if f in self.cfg.fields}
        keys |= {k for k in self.state if all(
            given.get(c, v) == v for c, v in zip(_COMMAND_FILTERS, (*k[0], k[1]), strict=True))}
        return sorted(keys)

    def apply(self, cmd: dict[str, Any], control_id: str) -> list[dict[str, Any]]:
        """Apply a baseline command to every matching key-field; returns the reference rows."""
        action = cmd.get("action")
        if action not in ("rebase", "pin", "reset"):
            log.warning("drift: unknown baseline command %r ignored", cmd)
            return []
        self._baseline_commands().append((control_id, cmd))
        note = str(cmd.get("note") or "")
        out = []
        for key, fld in self.matching(cmd):
            kf = self.get(key, fld)
            if action == "reset":
                out.append(self._reset(kf, control_id, note))
                continue
            rows = self._command_rows(kf, cmd.get("from_ms"), cmd.get("to_ms"))
            if len(rows) < 10:
                log.warning("drift: %s of %s/%s/%s %s skipped: %d samples in the range", action, *key, fld,
                            len(rows))
                continue
            mode = "pinned" if action == "pin" else "rebase"
            out.append(self._make_ref(kf, rows, mode, rows[0].seq, kf.seq, control_id, note))
        return self._take_pending() + out

    def _reset(self, kf: KeyField, control_id: str, note: str) -> dict[str, Any]:
        """Drop the reference: a new one is collected from the next sample on."""
        kf.version += 1
        kf.ref = None
        kf.detectors = {}
        kf.cur = deque(maxlen=self.cfg.window_size)
        kf.collecting = []
        kf.collect_from = kf.seq
        return self._ref_row(kf, "reset", kf.seq, kf.seq, [], 0, 0, control_id, note)

    def _command_rows(self, kf: KeyField, f_ms: Any, t_ms: Any) -> list[SampleRow]:
        """The samples a rebase or pin makes its reference of: ``ref_size`` evenly spread over
        ``[f_ms, t_ms)`` when a range is given, else the latest ``ref_size``."""
        if f_ms is None and t_ms is None:  # "what we see now is normal"
            return self._rows(kf.key, kf.field, _ALL, {}, "seq DESC", self.cfg.ref_size)
        rows = self._rows(kf.key, kf.field, _IN_RANGE, {"from_ms": int(f_ms or 0), "to_ms": int(t_ms or 2**42)})
        if len(rows) > self.cfg.ref_size:  # evenly spread over the range
            pick = np.linspace(0, len(rows) - 1, self.cfg.ref_size).round().astype(int)
            rows = [rows[i] for i in pick]
        return rows
