"""The alerting stage of the worker: rules evaluated in the stream, alerts delivered.

:class:`AlertingStage` is a worker :class:`~driftline.streams.worker.Stage`. It feeds an
:class:`~driftline.streams.stages.rule_engine.AlertEvaluator` and, on a task of its own, every
``eval_interval_s`` (1 s by default):

1. takes what the worker stored since the last tick (window rows, partial and final;
   per-call costs for per-user budgets; the newest event time per app/model for absence
   rules; every call, by trace, conversation and user, for runaway rules:
   streams/stages/runaway.py) and the drift results handed to
   :meth:`AlertingStage.observe_drift`;
2. reads the worker's *open* windows live (early evaluation): the worker writes partial
   window rows only every ``emit_interval_s`` (5 s), which alone would put the alert
   latency above 5 s; reading the open windows makes it about one tick;
3. evaluates the rules at the stage clock and hands the transitions (firing / resolved)
   to an :class:`~driftline.streams.sinks.notifiers.AlertDispatcher` (webhooks, Alertmanager,
   the log; retries, never blocks) and to a writer task that inserts them into the
   ClickHouse ``alerts`` table (retried; a slow ClickHouse delays the rows, never the
   stream or the notifications).

The stage clock is *event time that follows wall time while idle*: the worker's
watermark (per partition, the minimum over the partitions: see streams/stages/windows.py)
plus the wall time elapsed since it last moved, never going back. Live traffic keeps
it within a second of wall time; a replay of old data evaluates ``for`` durations and
windows in the data's own time. Nothing is evaluated before the first event (or the
first rebuilt window after a restart), so an absence rule counts from the first event
the worker sees.

Catch-up: each tick evaluates the rules at every window boundary the clock crossed
since the previous tick, in order, feeding each window before the first evaluation
after its start, and then at the clock. When the worker works off a lag (downtime, a
restart, a replay) event time jumps over many windows in one batch; the rules are
still evaluated at each of them, and transitions carry the event time of their data
(``AlertEvaluator(event_time_stamps=True)``), so the lag fires and resolves the same
alerts at the same timestamps as the live stream did. Transitions of a tick whose
clock moved by more than one window carry the annotation ``catch_up="true"``
(an annotation, not a label: the alert's identity is unchanged). At most
``max_catch_up_windows`` boundaries are evaluated per jump (the oldest beyond are
skipped and counted); a tick spends at most ``catch_up_budget_s`` on them and the
next tick goes on where it stopped (at once, not after ``eval_interval_s``), so a
long catch-up never holds the event loop, and the results do not depend on the
budget.

Ownership (several workers, rebalances, restarts): nothing is evaluated from the start
or a revocation (:meth:`AlertingStage.on_revoked`) until the worker's partitions are
assigned and their windows rebuilt (:meth:`AlertingStage.on_assigned`). Then a key
(app/model) belongs to the worker holding the partition of its newest stored event: the
state of keys owned elsewhere is dropped without transitions, and the alerts of owned keys
whose newest row in the ``alerts`` table is ``firing`` are restored as firing (no second
"firing" notification); every alert's last recorded transition is a floor below which
(and at which, except the resolution of a recorded "firing") nothing is recorded again,
so a replay of windows whose alerts fired and resolved before a crash records nothing.
After a restore, evaluation waits for the worker's first stored batch (at most
``restore_grace_s``), and an alert whose condition no longer holds then resolves, which
writes and sends the "resolved".

Compare rules (streams/stages/compare_rule.py) are owned per rule, not per key: the
worker holding partition ``crc32(name) mod N`` of the group's first JSON input topic runs
the rule's gate queries in a thread (at most once per its ``interval``) and feeds the
readings through the inbox; on an assignment the other workers drop its state and the
owner restores its alert from the ``alerts`` table, as for the other kinds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from driftline.schemas.columns import ALERT_COLUMNS
from driftline.schemas.rules import (
    AlertTransition,
    CostObservation,
    DriftObservation,
    RuleSet,
    load_rules,
)
from driftline.schemas.window_stats import WindowStats
from driftline.streams.sinks.batch import BatchProcessor, TableExporter
from driftline.streams.sinks.notifiers import (
    AlertDispatcher,
    AlertmanagerNotifier,
    AlertNotifier,
    LogNotifier,
    WebhookNotifier,
)
from driftline.streams.sinks.prometheus import AlertMetrics
from driftline.streams.stages.compare_rule import CompareReading, owner_partition, partition_count
from driftline.streams.stages.compare_rule import evaluate as evaluate_compare
from driftline.streams.stages.rule_engine import AlertEvaluator, default_rules_path

if TYPE_CHECKING:
    from driftline.streams.ports import StagePorts
    from driftline.streams.worker import StoredBatch

__all__ = ["ALERT_COLUMNS", "AlertingStage", "alerting_stage", "build_notifiers"]

log = logging.getLogger("driftline.alerts")


def build_notifiers(*, webhooks: Sequence[str] = (), slack_webhooks: Sequence[str] = (),
                    alertmanagers: Sequence[str] = (),
                    alertmanager_resend_s: float = 60.0) -> list[AlertNotifier]:
    """Notifiers for the CLI flags, with unique names (``webhook``, ``webhook-2``, ...)."""
    out: list[AlertNotifier] = []

    def name(base: str, i: int) -> str:
        return base if i == 0 else f"{base}-{i + 1}"

    for i, url in enumerate(webhooks):
        out.append(WebhookNotifier(url, name=name("webhook", i)))
    for i, url in enumerate(slack_webhooks):
        out.append(WebhookNotifier(url, slack_compatible=True, name=name("slack", i)))
    for i, url in enumerate(alertmanagers):
        out.append(AlertmanagerNotifier(url, name=name("alertmanager", i),
                                        resend_interval_s=alertmanager_resend_s))
    return out


def history_query(db: str) -> str:
    """The last recorded transition of every alert (rule and fingerprint) of the ``alerts``
    table: rule, fingerprint, state, labels, annotations, value, ts (epoch ms), app, model.

    A transition's event time can repeat: an alert fired and resolved within one
    millisecond of event time stores two rows with the same ``ts``. Ties go to
    ``resolved`` (``argMax`` over ``(ts, state = 'resolved')``): taking ``firing`` would
    restore a resolved alert and resolve (and notify) it a second time; a condition that
    still holds simply fires again on the next evaluation."""
    key = "(ts, state = 'resolved')"
    return (f"SELECT rule, fingerprint, argMax(state, {key}) AS st, argMax(labels, {key}), "
            f"argMax(annotations, {key}), argMax(value, {key}), toUnixTimestamp64Milli(max(ts)), "
            f"argMax(app, {key}), argMax(model, {key}) FROM {db}.alerts GROUP BY rule, fingerprint")


def restore_query(db: str) -> str:
    """:func:`history_query`, only the alerts firing at the end of the ``alerts`` table."""
    return history_query(db) + " HAVING st = 'firing'"


#: how far back (event time, from now) the owner of a key is looked for: llm_events is
#: sorted by (app, model, timestamp), so this bounds the read on every rebalance to a day
#: of the apps' rows instead of their whole history. A key with no event in the last day
#: has no owner: its state stays with the worker that holds it, and nobody restores it.
OWNERS_LOOKBACK_S = 86_400
#: per app/model: the partition of its newest stored event (the key's owner, see on_assigned)
OWNERS_SQL = ("SELECT app, model, argMax(tuple(source_topic, source_partition), (timestamp, source_partition)), "
              "toUnixTimestamp64Milli(max(timestamp)) FROM {db:Identifier}.llm_events "
              "WHERE app IN {apps:Array(String)} "
              f"AND timestamp >= now64(3) - INTERVAL {OWNERS_LOOKBACK_S} SECOND GROUP BY app, model")


class AlertingStage:
    """Evaluates alert rules in the worker; see the module docstring.

    ``notifiers`` get every transition; a :class:`LogNotifier` is always added (unless one
    named ``log`` is given). ``write_alerts`` writes transitions to the ``alerts`` table.
    ``clock`` (epoch ms) replaces the stage clock, for tests. ``live_windows`` turns the
    early read of the worker's open windows on or off.
    """

    name = "alerting"
    tables = ("alerts",)

    def __init__(self, rules: RuleSet, *, registry: CollectorRegistry | None = None,
                 notifiers: Sequence[AlertNotifier] = (), eval_interval_s: float = 1.0,
                 static_labels: Mapping[str, str] | None = None, live_windows: bool = True,
                 write_alerts: bool = True, restore: bool = True, max_pending_rows: int = 100_000,
                 clock: Callable[[], int] | None = None, history: int = 10_000,
                 restore_grace_s: float = 30.0,
                 dispatcher_options: Mapping[str, Any] | None = None,
                 window_ms: int | None = None, max_catch_up_windows: int = 10_080,
                 max_keys: int = 10_000, catch_up_budget_s: float | None = 0.2,
                 revoke_flush_s: float = 5.0, max_traces: int = 10_000,
                 compare_topic: str | None = None,
                 partition_counter: Callable[[str], int] | None = None) -> None:
        if eval_interval_s <= 0:
            raise ValueError("eval_interval_s must be > 0")
        if window_ms is not None and window_ms <= 0:
            raise ValueError("window_ms must be > 0")
        if max_catch_up_windows < 0:
            raise ValueError("max_catch_up_windows must be >= 0")
        self.rules = rules
        self.registry = registry if registry is not None else CollectorRegistry()
        self.evaluator = AlertEvaluator(rules, static_labels=static_labels, event_time_stamps=True,
                                        max_keys=max_keys, max_traces=max_traces)
        #: the window length (the catch-up step): the worker's when None
        self.window_ms = window_ms
        self.max_catch_up_windows = max_catch_up_windows
        self._eval_at: int | None = None
        #: windows not fed yet because a catch-up stopped at its time budget
        self._backlog: list[WindowStats] = []
        self._behind = False
        self.catch_up_budget_s = catch_up_budget_s
        self._evicted_seen: dict[str, int] = {}
        nots = list(notifiers)
        if not any(n.name == "log" for n in nots):
            nots.append(LogNotifier())
        self.notifiers = nots
        self.dispatcher = AlertDispatcher(nots, registry=self.registry, **dict(dispatcher_options or {}))
        self.eval_interval_s = eval_interval_s
        self.live_windows = live_windows
        self.write_alerts = write_alerts
        self.restore = restore
        self.max_pending_rows = max_pending_rows
        self._clock = clock
        self.transitions: deque[AlertTransition] = deque(maxlen=history)
        # what needs per-event work (only done when a rule reads it)
        self._need_user_cost = any("user_id" in r.group_by for r in rules.of_kind("budget"))
        self._need_seen = bool(rules.of_kind("absence"))
        # inputs, appended from the writer (and maybe other threads), drained by the tick
        self._inbox: deque[Any] = deque()
        self._tick_wake: asyncio.Event | None = None
        #: what start() is given (streams/ports.py); None before start
        self._ports: StagePorts | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._wm: int | None = None
        self._wm_mono = 0.0
        self._now = -(1 << 62)
        self._stopping = False
        # restored firing alerts must not resolve for "no data" before the worker has
        # rebuilt its windows and stored a first batch (or restore_grace_s has passed)
        self.restore_grace_s = restore_grace_s
        self._hold_until: float | None = None
        self._had_batch = False
        #: no evaluation from a revocation (or the start) until the assignment's keys are
        #: known: on_revoked / on_assigned, called by the worker on rebalances
        self._unassigned = False
        #: on revocation, wait this long at most for the alert rows to be written (the next
        #: owner of a key reads them when its partitions are assigned)
        self.revoke_flush_s = revoke_flush_s
        #: per (rule, fingerprint): the last transition (ts, state) the alerts table held at
        #: the last assignment; transitions at or before it are not recorded again
        self._recorded: dict[tuple[str, str], tuple[int, str]] = {}
        #: alerts whose replayed "firing" was not recorded (the table says resolved since):
        #: their next "resolved" is not recorded either
        self._muted: set[tuple[str, str]] = set()
        self.suppressed = 0
        self.evaluations = 0
        self.m = AlertMetrics(self.registry, [(rule.name, rule.severity) for rule in rules])
        # compare rules (streams/stages/compare_rule.py): run from ClickHouse by the owner of
        # one partition of ``compare_topic`` (default: the group's first input topic, JSON
        # before OTLP); ``partition_counter(topic)`` replaces the Kafka metadata read
        self._compare_rules = {r.name: r for r in rules.of_kind("compare")}
        self.compare_topic = compare_topic
        self._partition_counter = partition_counter
        #: the compare rules this worker runs (set at each assignment)
        self.compare_owned: set[str] = set()
        self._cmp_epoch = 0  # a reading of an older assignment is dropped
        self._cmp_next: dict[str, float] = {}  # rule -> monotonic time of its next run
        self._cmp_tasks: dict[str, asyncio.Task[None]] = {}
        self._compared: list[AlertTransition] = []  # this tick's transitions of compare rules
        for name in self._compare_rules:
            for outcome in ("ok", "failed"):
                self.m.compare_runs.labels(name, outcome)
        # the alerts table: written as soon as a row waits (all that wait in one insert,
        # retried inside the sink); it never blocks the stream, so a full queue drops its
        # oldest row, and rows the sink refuses for good are dropped too (both counted)
        self._row_exporter = TableExporter("alerts", ALERT_COLUMNS)
        dropped = self.m.rows.labels("dropped")
        self._rows: BatchProcessor[dict[str, Any]] = BatchProcessor(
            self._row_exporter, max_queue_size=max_pending_rows, max_export_batch_size=max_pending_rows,
            schedule_delay_s=0.0, on_full="drop_oldest", drops_counter=dropped, failures_counter=dropped,
            exported_counter=self.m.rows.labels("written"), name="alerting: alert rows",
            bound_in_flight=True)  # max_pending_rows bounds the rows held, written or waiting

    @classmethod
    def factory(cls, rules: RuleSet, **options: Any) -> Callable[[CollectorRegistry], AlertingStage]:
        """A ``(registry) -> AlertingStage`` for ``serve_worker(stages=[...])``."""
        return lambda registry: cls(rules, registry=registry, **options)

    # ------------------------------------------------------------------ Stage protocol
    async def start(self, ports: StagePorts) -> None:
        self._ports = ports
        self._row_exporter.tables = ports.tables
        self._tick_wake = asyncio.Event()
        # the alerts of the keys this worker owns are restored when its partitions are
        # assigned (on_assigned); nothing is evaluated before that
        self._unassigned = self.restore and self.write_alerts
        await self.dispatcher.start()
        self._tasks = [asyncio.create_task(self._ticker(), name="driftline-alert-eval")]
        if self.write_alerts:
            await self._rows.start()
        log.info("alerting: %d rules, evaluated every %.1fs, notifiers: %s", len(self.rules),
                 self.eval_interval_s, ", ".join(n.name for n in self.notifiers))

    def on_stored(self, batch: StoredBatch) -> None:
        """Cheap: queue the batch for the next tick."""
        self._inbox.append(batch)

    def observe_drift(self, obs: DriftObservation) -> None:
        """A drift test result (a ``drift_scores`` row); safe from any thread."""
        self._inbox.append(obs)

    async def stop(self) -> None:
        self._stopping = True
        tick = self._tasks[0] if self._tasks else None
        for t in [*([tick] if tick is not None else []), *self._cmp_tasks.values()]:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        with contextlib.suppress(Exception):
            self.tick()  # what the last batch brought
        await self.dispatcher.shutdown(timeout_s=5.0)
        if self._rows.started:
            await self._rows.shutdown(timeout_s=10.0)  # logs the rows not written in time
        self._tasks = []

    # ------------------------------------------------------------------ evaluation
    def now_ms(self) -> int | None:
        """The stage clock (see the module docstring); None before any event."""
        if self._clock is not None:
            return self._clock()
        wm = self._ports.windows.watermark_ms if self._ports is not None else None
        mono = time.monotonic()
        if wm is not None and (self._wm is None or wm > self._wm):
            self._wm, self._wm_mono = int(wm), mono
        if self._wm is None:
            return None
        if self._ports is not None and self._ports.windows.held():
            # cut off from Kafka (or held behind the writer): event time stands still, as the
            # worker's own windows do; extrapolation resumes from here when fetches answer
            # (else an outage resolves alerts for lack of data, and the backlog fires them
            # again at earlier event times)
            now = max(self._now, self._wm)
            self._wm_mono = mono - (now - self._wm) / 1000
            self._now = now
            return now
        now = self._wm + int((mono - self._wm_mono) * 1000)
        if now < self._now:
            now = self._now
        self._now = now
        return now

    def tick(self) -> list[AlertTransition]:
        """Ingest, evaluate, dispatch once. Returns the transitions."""
        t0 = time.perf_counter()
        self._compared = []
        wins = self._ingest()
        if self.live_windows:
            wins.extend(self._peek_windows())
        now = self.now_ms()
        out: list[AlertTransition] = self._compared  # compare rules: stepped by their readings
        if self._hold_until is not None and (self._had_batch or time.monotonic() >= self._hold_until):
            self._hold_until = None
        if self.compare_owned and not self._unassigned and not self._stopping:
            self._run_compare_rules()
        if now is not None and self._hold_until is None and not self._unassigned:
            out = out + self._evaluate_to(now, wins)
            self.evaluations += 1
            self.m.evaluations.inc()
        else:
            # held (restore, rebalance): kept for the next evaluation, which feeds each window
            # before the first boundary after its start (a catch-up from the oldest); beyond
            # the cap, the oldest are fed at once
            self._backlog.extend(wins)
            if len(self._backlog) > self.max_pending_rows:
                self._backlog.sort(key=lambda w: (w.window_start_ms, w.final, w.events))
                cut = len(self._backlog) - self.max_pending_rows
                for w in self._backlog[:cut]:
                    self.evaluator.observe_window(w)
                del self._backlog[:cut]
        if out and self._recorded:
            out = self._unrecorded(out)
        self._export_evictions()
        if out:
            self.dispatcher.submit(out)
            for t in out:
                self.transitions.append(t)
                self.m.transitions.labels(t.rule, t.state).inc()
                self.m.firing.labels(t.rule, t.severity).inc(1 if t.state == "firing" else -1)
                if self.write_alerts:
                    self._rows.add_nowait(t.to_row())
        self.m.eval_seconds.inc(time.perf_counter() - t0)
        return out

    def _step_ms(self, wins: Sequence[WindowStats]) -> int:
        if self.window_ms is None:
            size = self._ports.windows.size_ms if self._ports is not None else None
            if isinstance(size, int) and size > 0:
                self.window_ms = size
            elif wins:
                self.window_ms = max(1, wins[0].window_end_ms - wins[0].window_start_ms)
        return self.window_ms or 60_000

    def _evaluate_to(self, now: int, wins: list[WindowStats]) -> list[AlertTransition]:
        """Evaluate at every window boundary in ``(last evaluation, now)``, then at ``now``.

        Windows are fed in order of their start, each before the first evaluation after
        it, so an evaluation at a past boundary reads what was known at that time.
        """
        ev = self.evaluator
        step = self._step_ms(wins)
        if self._backlog:
            wins = self._backlog + wins
            self._backlog = []
        wins.sort(key=lambda w: (w.window_start_ms, w.final, w.events))
        last = self._eval_at
        if last is None and wins:  # the first data may already span many windows
            last = min(w.window_start_ms for w in wins)
        points: list[int] = []
        catch_up = (last is not None and now - last > step) or self._behind
        if last is not None and now > last:
            b = last - last % step + step
            n = (now - 1 - b) // step + 1 if b < now else 0
            if n > self.max_catch_up_windows:
                skip = n - self.max_catch_up_windows
                self.m.catch_up.labels("skipped").inc(skip)
                b += skip * step
            while b < now:
                points.append(b)
                b += step
        points.append(now)
        out: list[AlertTransition] = []
        i = 0
        budget = self.catch_up_budget_s
        t0 = time.perf_counter()
        for j, t in enumerate(points):
            last_point = t == now
            while i < len(wins) and (last_point or wins[i].window_start_ms < t):
                ev.observe_window(wins[i])
                i += 1
            out.extend(ev.evaluate(t))
            if catch_up and not last_point:
                self.m.catch_up.labels("evaluated").inc()
            if (not last_point and budget is not None and j + 1 < len(points)
                    and time.perf_counter() - t0 >= budget):
                # the rest on the next ticks: the loop (and the worker) is not held longer
                self._eval_at = t
                self._backlog = wins[i:]
                self._behind = True
                break
        else:
            self._behind = False
            if last is None or now > last:
                self._eval_at = now
        if catch_up:
            out = [replace(t, annotations={**t.annotations, "catch_up": "true"}) for t in out]
        return out

    def _export_evictions(self) -> None:
        for dim, n in self.evaluator.evicted.items():
            seen = self._evicted_seen.get(dim, 0)
            if n > seen:
                self.m.evicted.labels(dim).inc(n - seen)
                self._evicted_seen[dim] = n

    @property
    def catching_up(self) -> bool:
        """True while a catch-up stopped at its time budget has boundaries left."""
        return self._behind

    async def _ticker(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - alerting never takes the worker down
                log.exception("alerting: evaluation failed")
                if self._ports is not None:
                    self._ports.metrics.stage_errors[self.name] += 1
            # behind after a catch-up slice: go on at once (after the loop's other work)
            await asyncio.sleep(0 if self._behind else self.eval_interval_s)

    def _ingest(self) -> list[WindowStats]:
        """Feed what the batches and drift results brought; returns their windows (not yet fed)."""
        ev = self.evaluator
        inbox = self._inbox
        wins: list[WindowStats] = []
        while inbox:
            item = inbox.popleft()
            if isinstance(item, DriftObservation):
                ev.observe_drift(item)
                continue
            if isinstance(item, CompareReading):
                if item.rule in self.compare_owned:
                    self._compared.extend(ev.observe_compare(item))
                continue
            self._had_batch = True
            wins.extend(item.windows)
            cols = item.events
            if not cols:
                continue
            if self._need_seen:
                # the newest event per app/model and minute: a batch spanning a lag keeps
                # when each app was last seen at every past boundary (see _evaluate_to)
                seen: dict[tuple[str, str, int], int] = {}
                for a, m, ts in zip(cols["app"], cols["model"], cols["timestamp"], strict=True):
                    k = (a, m, int(ts) // 60_000)
                    if ts > seen.get(k, -(1 << 62)):
                        seen[k] = ts
                for (a, m, _b), ts in sorted(seen.items(), key=lambda kv: kv[1]):
                    ev.observe_event_seen(a, m, int(ts))
            if self._need_user_cost:
                self._ingest_user_cost(cols)
            if ev.traces is not None:
                self._ingest_calls(cols)
        return wins

    def _ingest_calls(self, cols: Mapping[str, Any]) -> None:
        """Every stored call, for the runaway rules (per trace, conversation, user)."""
        ev = self.evaluator
        tok_in, tok_out, costs = cols["input_tokens"], cols["output_tokens"], cols["cost_usd"]
        for i, (ts, a, m, tr, cv, u, op, st, p) in enumerate(zip(
                cols["timestamp"], cols["app"], cols["model"], cols["trace_id"], cols["conversation_id"],
                cols["user_id"], cols["operation"], cols["status"], cols["prompt"], strict=True)):
            c = costs[i]
            ev.observe_call(int(ts), a, m, {"trace_id": tr, "conversation_id": cv, "user_id": u},
                            operation=op or "chat", status=st or "ok",
                            tokens=int(tok_in[i] or 0) + int(tok_out[i] or 0),
                            cost_usd=None if c is None else float(c), prompt=p)

    def _ingest_user_cost(self, cols: Mapping[str, list[Any]]) -> None:
        bucket_ms = 60_000
        sums: dict[tuple[int, str, str, str], float] = {}
        for a, m, u, ts, c in zip(cols["app"], cols["model"], cols["user_id"], cols["timestamp"],
                                  cols["cost_usd"], strict=True):
            if c is None or c != c:
                continue
            k = (int(ts) - int(ts) % bucket_ms, a, m, u or "")
            sums[k] = sums.get(k, 0.0) + float(c)
        for (b, a, m, u), c in sums.items():
            self.evaluator.observe_cost(CostObservation(b, a, m, u, c))

    def _peek_windows(self) -> list[WindowStats]:
        """The worker's open windows that changed since the last tick, without side effects.

        ``WindowAggregator.partial()`` clears the "changed" marks the worker's own partial
        rows depend on, so it is not called here: the window view's ``peek`` keeps its
        own marks.
        """
        return self._ports.windows.peek() if self._ports is not None else []

    # ------------------------------------------------------------------ compare rules
    def compare_clock_ms(self) -> int:
        """The time compare rules run at: wall time (``clock`` in tests). They read the
        store as it is now, not the stream, so they need no event (an owner whose
        partitions are idle still runs them) and do not follow a replay's event time."""
        if self._clock is not None:
            return self._clock()
        return int((self._ports.clock() if self._ports is not None else time.time()) * 1000)

    def _run_compare_rules(self) -> None:
        """Start the owned compare rules that are due (each at most once per its interval,
        never twice at once), their queries in a thread; the readings come back through
        the inbox and step their alerts at the next tick."""
        mono = time.monotonic()
        now = self.compare_clock_ms()
        for name in sorted(self.compare_owned):
            if name in self._cmp_tasks or mono < self._cmp_next.get(name, 0.0):
                continue
            rule = self._compare_rules[name]
            assert rule.compare is not None
            self._cmp_next[name] = mono + rule.compare.interval_ms / 1000
            self._cmp_tasks[name] = asyncio.create_task(self._compare_once(name, now, self._cmp_epoch),
                                                        name=f"driftline-compare-{name}")

    async def _compare_once(self, name: str, now: int, epoch: int) -> None:
        try:
            assert self._ports is not None
            tables = self._ports.tables
            got = await asyncio.to_thread(evaluate_compare, self._compare_rules[name], tables.raw_query,
                                          tables.database, now)
        except Exception as exc:  # noqa: BLE001 - a failing query never takes the stage down
            log.warning("alerting: compare rule %s: the gate's queries failed (%s: %s); "
                        "its alert keeps its state", name, type(exc).__name__, exc)
            self.m.compare_runs.labels(name, "failed").inc()
            return
        finally:
            self._cmp_tasks.pop(name, None)
        self.m.compare_runs.labels(name, "ok").inc()
        if epoch == self._cmp_epoch:
            self._inbox.append(got)

    async def _compare_ownership(self, mine: set[tuple[str, int]]) -> set[str]:
        """The compare rules this worker runs with the partitions ``mine``: those whose
        :func:`owner_partition` of the compare topic it holds. An unreadable partition
        count is logged and counted, and then the worker runs none (never two owners)."""
        if not self._compare_rules or self._ports is None:
            return set()
        topics = self._ports.topics or tuple(sorted({t for t, _p in mine}))
        from driftline.schemas.topics import is_otlp_topic

        topic = self.compare_topic or next((t for t in topics if not is_otlp_topic(t)), topics[0] if topics else "")
        if not any(t == topic for t, _p in mine):
            return set()
        try:
            count = self._partition_counter or (lambda t: partition_count(self._ports.kafka, t))  # type: ignore[union-attr]
            n = await asyncio.to_thread(count, topic)
        except Exception as exc:  # noqa: BLE001 - logged and counted; the next assignment tries again
            log.warning("alerting: cannot read the partitions of %s (%s: %s): no compare rule runs here "
                        "until the next assignment", topic, type(exc).__name__, exc)
            self._ports.metrics.stage_errors[self.name] += 1
            return set()
        return {name for name in self._compare_rules if (topic, owner_partition(name, n)) in mine}

    # ------------------------------------------------------------------ alerts table
    @property
    def rows_written(self) -> int:
        """Rows written to the alerts table so far."""
        return self._rows.exported

    def _unrecorded(self, out: list[AlertTransition]) -> list[AlertTransition]:
        """``out`` without the transitions the alerts table already held at the assignment:
        those before the last recorded transition of their alert, and at its time unless it
        resolves a recorded "firing" (a replay after a crash, or of a partition taken over,
        evaluates windows whose transitions were recorded before)."""
        keep = []
        for t in out:
            k = (t.rule, t.fingerprint)
            rec = self._recorded.get(k)
            if k in self._muted and t.state == "resolved":
                self._muted.discard(k)
            elif rec is not None and (t.ts_ms < rec[0] or (t.ts_ms == rec[0] and not (
                    rec[1] == "firing" and t.state == "resolved"))):
                if t.state == "firing" and rec[1] == "resolved":
                    self._muted.add(k)
            else:
                keep.append(t)
                continue
            self.suppressed += 1
        return keep

    # ------------------------------------------------------------------ rebalances (worker hooks)
    async def on_revoked(self) -> None:
        """The worker's partitions go: evaluation stops until the next assignment, and the
        transitions recorded so far are written (bounded), so that the next owner of a key
        restores them instead of recording them again."""
        self._unassigned = True
        self._cmp_epoch += 1  # readings of queries still running are not this worker's to use
        self.compare_owned = set()
        # no re-sends of the alerts held (Alertmanager) until the keys' owners are known
        self._notifiers_call("forget", [a.fingerprint for a in self.evaluator.active_alerts()])
        if self._rows.started and not await self._rows.force_flush(self.revoke_flush_s):
            log.warning("alerting: alert rows still unwritten %.0f s after the revocation", self.revoke_flush_s)

    async def on_assigned(self, partitions: Sequence[Any]) -> None:
        """The worker's partitions (``TopicPartition``) after a rebalance, their windows rebuilt.

        A key (app/model) is owned by the worker that holds the partition of its newest
        stored event: with keyed input (``llm.events`` keyed ``app/model``; OTLP re-keyed the
        same way) that is the one partition all its events go to, so one worker evaluates
        it and a rebalance moves it whole. The state of keys owned elsewhere now is
        dropped without a transition (no "resolved for lack of data", no absence alert on
        the old owner); the alerts of owned keys that the table records as firing are
        restored as firing, and every alert's last recorded transition becomes a floor
        (:meth:`_unrecorded`). A key without stored events yet is kept (its data came from
        this worker's partitions). Unkeyed input (a key on several partitions): each key
        still has one owner at a time, the holder of its newest event, but the others
        also see part of its traffic and evaluate it on that part between rebalances;
        the floors keep them from recording a transition the table holds, not from
        recording transitions of their own: key the input for exact alerts.
        """
        if self._ports is None:
            return
        tables = self._ports.tables
        mine = {(tp.topic, int(tp.partition)) for tp in partitions}
        try:
            history = list(await tables.aquery(history_query(tables.database))) \
                if self.restore and self.write_alerts else []
            apps = self.evaluator.held_apps() | {r[7] for r in history if r[7]}
            owners = await tables.aquery(OWNERS_SQL, {"db": tables.database, "apps": sorted(apps)}) \
                if apps else []
        except Exception:  # noqa: BLE001 - logged and counted by the worker; evaluation goes on
            self._unassigned = False
            raise
        owner = _owner_of(owners)
        self.compare_owned = await self._compare_ownership(mine)
        self._cmp_epoch += 1

        def owned(app: str, model: str) -> bool:
            o = owner(app, model)
            return o is None or o in mine

        def owned_key(app: str, model: str) -> bool:  # the calls of runaway rules: their exact key
            o = owner(app, model, True)
            return o is None or o in mine

        gone = self.evaluator.retain(owned, owned_key) + \
            self.evaluator.retain_rules(lambda rule: rule in self.compare_owned)
        for rule, fp in gone:
            self._muted.discard((rule, fp))
            self.m.firing.labels(rule, self.rules.by_name(rule).severity).dec()
        self._notifiers_call("forget", [fp for _rule, fp in gone])
        self._recorded = {(r[0], r[1]): (int(r[6]), str(r[2])) for r in history}
        self._restore(history, lambda app, model: not app or owner(app, model) in mine)
        # the firing alerts of the keys kept and restored: re-sent (Alertmanager) from now on
        self._notifiers_call("restore", self.evaluator.active_alerts())
        self._unassigned = False

    def _notifiers_call(self, method: str, arg: Any) -> None:
        """``notifier.method(arg)`` on the notifiers that have it (forget / restore)."""
        for n in self.notifiers:
            fn = getattr(n, method, None)
            if callable(fn):
                fn(arg)

    def _restore(self, history: Sequence[Sequence[Any]], mine: Callable[[str, str], bool]) -> None:
        """Hold the alerts of ``history`` (:func:`history_query` rows) recorded as firing whose
        key is ``mine`` as firing (an alert without an app label is everyone's)."""
        restored: list[AlertTransition] = []
        for rule, fp, st, labels, annots, value, ts, app, model in history:
            if st != "firing" or not (rule in self.compare_owned if rule in self._compare_rules
                                      else mine(app, model)):
                continue
            if self.evaluator.restore_alert(rule, fp, labels, annots, value, ts):
                rr = self.rules.by_name(rule)
                restored.append(AlertTransition(int(ts), rule, "firing", rr.severity, dict(labels),
                                                dict(annots), float(value), fp, int(ts), None))
        if not restored:
            return
        # restored alerts must not resolve for lack of data before a first batch is stored
        self._hold_until = time.monotonic() + self.restore_grace_s
        self._had_batch = False
        for t in restored:
            self.m.firing.labels(t.rule, t.severity).inc()
        log.info("alerting: restored %d firing alert(s) from the alerts table", len(restored))


def _owner_of(owners: Sequence[Sequence[Any]]) -> Callable[..., tuple[str, int] | None]:
    """``owner(app, model, exact=False)``: the (topic, partition) of the newest stored event
    of the key (of the app, when ``model`` is empty and not ``exact``: an alert without a
    model label; with ``exact``, the key ``app/`` of tool and agent rows), None when none is
    stored; from OWNERS_SQL rows."""
    by_key: dict[tuple[str, str], tuple[tuple[str, int], int]] = {}
    by_app: dict[str, tuple[tuple[str, int], int]] = {}
    for app, model, (topic, part), ts in owners:
        o = ((str(topic), int(part)), int(ts))
        by_key[(app, model)] = o
        if app not in by_app or o[1] >= by_app[app][1]:
            by_app[app] = o

    def owner(app: str, model: str, exact: bool = False) -> tuple[str, int] | None:
        o = by_key.get((app, model)) if model or exact else by_app.get(app)
        return o[0] if o is not None else None

    return owner


def alerting_stage(rules_file: str | Path | None = None, *, webhooks: Sequence[str] = (),
                   slack_webhooks: Sequence[str] = (), alertmanagers: Sequence[str] = (),
                   **options: Any) -> Callable[[CollectorRegistry], AlertingStage]:
    """A stage factory from a rules file (the shipped default rules when None) and URLs."""
    rules = load_rules(rules_file if rules_file is not None else default_rules_path())
    notifiers = build_notifiers(webhooks=webhooks, slack_webhooks=slack_webhooks,
                                alertmanagers=alertmanagers)
    return AlertingStage.factory(rules, notifiers=notifiers, **options)
