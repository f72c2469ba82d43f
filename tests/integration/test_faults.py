"""The fault suite: SIGKILLed workers and cut links under load, real Tansu and real chDB.

Every test runs ``driftline worker`` as a subprocess (``--no-drift``, default alert
rules) against its own Tansu broker, feeds it a seeded replay (valid events and
1 % malformed records) from a producer thread while it injects faults, waits for
the worker to drain, and then checks the same exactly-once properties
(:func:`check_exactly_once`):

* ``llm_events`` holds each valid event exactly once, **without** ``FINAL``
  (the set of ``event_id`` equals the produced set, and ``count()`` equals it);
* the latest row of every ``llm_window_metrics`` window (argMax by
  ``updated_at``) equals an exact recomputation from the raw rows: events,
  errors, input/output tokens, and the p95 latency within the sketch's stated
  relative accuracy of the exact p95;
* ``llm.events.dlq`` holds each malformed record exactly once (by its
  ``driftline-source-partition``/``-offset`` headers) and nothing else;
* no alert was recorded twice (no duplicate ``(rule, labels, ts, state)``).

The long versions (more cycles, 60 s outages) are benchmarks/bench_faults.py;
they share this module's harness.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy

from driftline.streams.devdata.replay import ReplayConfig, ReplayData, generate
from driftline.streams.local.broker import ensure_topics, free_port, tansu_binary, wait_for_port

TOPIC = "llm.events"
DLQ = "llm.events.dlq"
WINDOW_S = 5
LATENESS_S = 2
#: the worker's resident memory must stay under this during an outage (measured
#: ~300-400 MB with --no-drift on this machine; the queue holds at most 4 batches)
RSS_BOUND_MB = 1_000
#: a rule that fires and resolves many times in this stream (per key, window by window),
#: so that "no alert recorded twice" is checked on real alert traffic
RULES = """\
version: 1
rules:
  - name: FaultSuiteLatencyP50
    kind: threshold
    expr: "latency_ms.p50 > 1500"
    min_events: 5
    severity: info
    for: 0s
    resolve_below: 1500
    annotations:
      summary: "p50 {value:.0f} ms on {app}/{model}"
"""


# ---------------------------------------------------------------------------- broker


@dataclass
class Broker:
    """A Tansu broker (memory storage) listening on ``port``, advertising ``advertised``.

    With ``advertised`` set to a :class:`FaultProxy` port, every client (the worker,
    the load, the DLQ reader) reaches the broker through the proxy after bootstrap,
    so cutting the proxy is the broker being unreachable.
    """

    port: int
    advertised: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.advertised}"

    def start(self) -> Broker:
        args = [tansu_binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{self.port}",
                "--advertised-listener-url", f"tcp://127.0.0.1:{self.advertised}",
                "--storage-engine", "memory://tansu/"]
        env = {**os.environ, "RUST_LOG": "warn"}
        self.proc = subprocess.Popen(args, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        wait_for_port("127.0.0.1", self.port, 20)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@contextlib.contextmanager
def broker_behind(tmp: Path, proxied: bool, partitions: int = 1) -> Iterator[tuple[Broker, FaultProxy | None]]:
    port = free_port()
    proxy = FaultProxy("127.0.0.1", port).start() if proxied else None
    b = Broker(port, proxy.port if proxy else port, tmp / "tansu.log").start()
    try:
        ensure_topics(b.bootstrap, {TOPIC: partitions, DLQ: 1, "driftline.control": 1}, timeout=30)
        yield b, proxy
    finally:
        b.stop()
        if proxy is not None:
            proxy.stop()


# ---------------------------------------------------------------------------- load


@dataclass
class Load:
    """Produces a seeded replay to ``llm.events`` at ``rate`` records/s from a thread.

    ``gate`` cleared pauses it (while the broker is cut: a producer that retried a
    send across a cut could write a record twice, which is the producer's loss of
    exactly-once, not the worker's). Remembers the event ids of the valid records
    and the (partition, offset) of the malformed ones, from the broker's acks.
    """

    bootstrap: str
    n: int
    rate: float
    seed: int
    gate: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    held: threading.Event = field(default_factory=threading.Event)
    valid_ids: list[str] = field(default_factory=list)
    malformed: list[tuple[int, int]] = field(default_factory=list)
    sent: int = 0
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.gate.set()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the load did not finish"
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        from kafka import KafkaProducer

        try:
            # event time follows the wall clock at the production rate, as a live stream's does;
            # records held back while the broker is cut keep their times (a producer's buffer)
            start = int(time.time() * 1000)
            cfg = ReplayConfig(n_events=self.n, seed=self.seed, start_ms=start, events_per_second=self.rate,
                               malformed_rate=0.01, late_rate=0.0, drift_at=None)
            prod = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5,
                                 retries=0, max_in_flight_requests_per_connection=1)
            t0 = time.monotonic()
            chunk: list[Any] = []
            for i, r in enumerate(generate(cfg, ReplayData.synthetic(self.seed))):
                chunk.append(r)
                if len(chunk) < 50 and i < self.n - 1:
                    continue
                while not self.gate.wait(0.1):
                    self.held.set()  # nothing in flight: the broker may be cut now
                    if self.stop.is_set():
                        return
                self.held.clear()
                if self.stop.is_set():
                    return
                futs = [(r, prod.send(TOPIC, r.value, key=r.key)) for r in chunk]
                prod.flush(30)
                for r, f in futs:
                    md = f.get(0)
                    if r.valid:
                        self.valid_ids.append(r.event["event_id"])
                    else:
                        self.malformed.append((md.partition, md.offset))
                self.sent += len(chunk)
                chunk = []
                ahead = self.sent / self.rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
            prod.close(10)
        except BaseException as exc:  # noqa: BLE001 - surfaced by join()
            self.error = exc


# ---------------------------------------------------------------------------- worker


@dataclass
class WorkerProc:
    """``driftline worker`` in its own process group; logs to ``log``."""

    kafka: str
    clickhouse: str
    log: Path
    sql_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    peak_rss_mb: float = 0.0

    def spawn(self) -> WorkerProc:
        # the console script beside this interpreter (a venv not on PATH), else the module
        exe = Path(sys.executable).with_name("driftline")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "driftline.streams.cli.main"]
        args = [*cmd, "worker", "--kafka", self.kafka, "--clickhouse", self.clickhouse, "--topic", TOPIC,
                "--group", "faults", "--no-drift", "--window", str(WINDOW_S), "--lateness", str(LATENESS_S),
                "--emit-interval", "1", "--max-batch", "2000", "--metrics-port", "0",
                "--sql-port", str(self.sql_port), "--log-level", "info", "--rules", str(self._rules())]
        with self.log.open("ab") as f:
            f.write(f"\n===== spawn {time.strftime('%H:%M:%S')} =====\n".encode())
        self.proc = subprocess.Popen(args, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def _rules(self) -> Path:
        f = self.log.with_name("rules.yaml")
        if not f.exists():
            f.write_text(RULES)
        return f

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def wait_consuming(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        mark = self.log.read_text(errors="replace").rfind("===== spawn")
        while "worker consuming" not in self.log.read_text(errors="replace")[mark:]:
            assert self.alive, f"the worker exited at start:\n{self.tail()}"
            assert time.monotonic() < deadline, f"the worker did not start:\n{self.tail()}"
            time.sleep(0.1)

    def rss_mb(self) -> float:
        assert self.proc is not None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    mb = int(line.split()[1]) / 1024
                    self.peak_rss_mb = max(self.peak_rss_mb, mb)
                    return mb
        except OSError:
            pass
        return 0.0

    def kill(self) -> None:
        assert self.proc is not None
        assert self.alive, f"the worker had died by itself before the kill:\n{self.tail()}"
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def kill_quietly(self) -> None:
        if self.proc is not None and self.alive:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 60) -> None:
        if self.proc is None or not self.alive:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            raise AssertionError(f"the worker did not stop on SIGTERM within {timeout:.0f}s") from None


# ---------------------------------------------------------------------------- reading the store

QUERIES = {
    "events": "SELECT event_id FROM driftline.llm_events",
    "windows": (
        "SELECT app, model, prompt_version, toUnixTimestamp64Milli(window_start) AS ws, "
        "argMax(events, updated_at), argMax(errors, updated_at), argMax(input_tokens, updated_at), "
        "argMax(output_tokens, updated_at), argMax(latency_p95_ms, updated_at), "
        "argMax(sketch_relative_accuracy, updated_at), argMax(late_events, updated_at) "
        "FROM driftline.llm_window_metrics GROUP BY app, model, prompt_version, ws"),
    "raw": (
        f"SELECT app, model, prompt_version, intDiv(toUnixTimestamp64Milli(timestamp), {WINDOW_S * 1000})"
        f" * {WINDOW_S * 1000} AS ws, count(), countIf(status = 'error'), sum(ifNull(input_tokens, 0)), "
        "sum(ifNull(output_tokens, 0)), quantileExactLow(0.95)(latency_ms), quantileExactHigh(0.95)(latency_ms) "
        "FROM driftline.llm_events GROUP BY app, model, prompt_version, ws"),
    "alerts": ("SELECT rule, toString(labels), toString(ts), state, count() FROM driftline.alerts "
               "GROUP BY rule, toString(labels), toString(ts), state"),
}

_READER = textwrap.dedent("""
    import json, sys
    import clickhouse_connect
    c = clickhouse_connect.get_client(dsn=sys.argv[1])
    qs = json.loads(sys.argv[2])
    print(json.dumps({k: [list(r) for r in c.query(q).result_rows] for k, q in qs.items()}, default=str))
""")


def read_store(dsn: str) -> dict[str, list[list[Any]]]:
    """Run :data:`QUERIES` on ``dsn`` in a fresh process (a process can open one chDB path)."""
    out = subprocess.run([sys.executable, "-c", _READER, dsn, json.dumps(QUERIES)], capture_output=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def read_dlq(bootstrap: str) -> Counter[tuple[int, int]]:
    """(source partition, source offset) of every record in the DLQ topic, with multiplicity."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    try:
        tp = TopicPartition(DLQ, 0)
        c.assign([tp])
        end = c.end_offsets([tp])[tp]
        c.seek_to_beginning(tp)
        seen: Counter[tuple[int, int]] = Counter()
        deadline = time.monotonic() + 30
        while c.position(tp) < end:
            assert time.monotonic() < deadline, f"DLQ read stuck at {c.position(tp)} of {end}"
            for recs in c.poll(500).values():
                for r in recs:
                    h = dict(r.headers)
                    seen[(int(h["driftline-source-partition"]), int(h["driftline-source-offset"]))] += 1
        return seen
    finally:
        c.close()


def stored_count(dsn_http: str) -> int:
    import clickhouse_connect

    c = clickhouse_connect.get_client(dsn=dsn_http)
    try:
        return int(c.query("SELECT count() FROM driftline.llm_events").result_rows[0][0])
    finally:
        c.close()


def wait_drained(w: WorkerProc, dsn_http: str, load: Load, dlq_bootstrap: str, timeout: float) -> float:
    """Wait until the store holds as many events as the load produced valid ones, then
    (20 s at most: a lost one is reported by the checks) until the DLQ holds as many
    records as were malformed; then two emit intervals more. Returns seconds."""
    t0 = time.monotonic()
    n_valid, n_bad = len(load.valid_ids), len(load.malformed)
    got = -1
    while got < n_valid:
        assert w.alive, f"the worker died:\n{w.tail()}"
        w.rss_mb()
        with contextlib.suppress(Exception):
            got = stored_count(dsn_http)
        assert time.monotonic() - t0 < timeout, f"stored {got} of {n_valid} after {timeout:.0f}s:\n{w.tail()}"
        time.sleep(0.5)
    t1 = time.monotonic()
    while sum(read_dlq(dlq_bootstrap).values()) < n_bad and time.monotonic() - t1 < 20:
        time.sleep(0.5)
    time.sleep(2.5)  # the last partial window rows (emit interval 1 s)
    return time.monotonic() - t0


# ---------------------------------------------------------------------------- the properties


def check_exactly_once(store: dict[str, list[list[Any]]], dlq: Counter[tuple[int, int]], load: Load,
                       windows_exact: bool = True) -> dict[str, int]:
    """Assert the suite's properties; returns the figures for the report.

    ``windows_exact=False`` counts the windows that differ from the raw rows instead
    of failing (figure ``windows_off``): with more than one partition the global
    watermark drops events of a partition fetched behind another (a known bug).
    """
    ids = [r[0] for r in store["events"]]
    counts = Counter(ids)
    dup = {k: v for k, v in counts.items() if v > 1}
    produced = set(load.valid_ids)
    assert len(produced) == len(load.valid_ids)
    lost = produced - counts.keys()
    alien = counts.keys() - produced
    assert not dup and not lost and not alien, (
        f"llm_events without FINAL: {len(ids)} rows, {len(dup)} event ids stored more than once "
        f"(e.g. {list(dup.items())[:3]}), {len(lost)} lost, {len(alien)} not produced")
    assert len(ids) == len(load.valid_ids)

    raw = {tuple(r[:4]): r[4:] for r in store["raw"]}
    win = {tuple(r[:4]): r[4:] for r in store["windows"]}
    if windows_exact:
        assert raw.keys() == win.keys(), (f"windows without a row: {sorted(raw.keys() - win.keys())[:5]}; "
                                          f"rows without events: {sorted(win.keys() - raw.keys())[:5]}")
    bad = []
    for k, (ev, er, it, ot, lo, hi) in raw.items():
        if k not in win:
            bad.append((k, "no row", None, "exact", (ev, er, it, ot, lo, hi)))
            continue
        wev, wer, wit, wot, p95, acc, late = win[k]
        ok_p95 = float(lo) * (1 - acc) - 1e-6 <= float(p95) <= float(hi) * (1 + acc) + 1e-6
        if (int(wev), int(wer), int(wit), int(wot)) != (int(ev), int(er), int(it), int(ot)) or not ok_p95:
            bad.append((k, "row", (wev, wer, wit, wot, p95, late), "exact", (ev, er, it, ot, lo, hi)))
    if windows_exact:
        assert not bad, f"{len(bad)} of {len(raw)} windows differ from the raw rows, e.g. {bad[:4]}"

    want = Counter(load.malformed)
    assert dlq == want, (f"DLQ: {sum(dlq.values())} records for {len(want)} malformed; "
                         f"twice: {[k for k, v in dlq.items() if v > 1][:5]}, "
                         f"missing: {sorted(want.keys() - dlq.keys())[:5]}, "
                         f"not malformed: {sorted(dlq.keys() - want.keys())[:5]}")

    twice = [r for r in store["alerts"] if int(r[4]) > 1]
    assert not twice, f"alerts recorded more than once: {twice[:5]}"
    return {"events": len(ids), "windows": len(raw), "dlq": sum(dlq.values()),
            "alerts": sum(int(r[4]) for r in store["alerts"]), "windows_off": len(bad)}


# ---------------------------------------------------------------------------- scenarios


@dataclass
class CrashResult:
    cycles: int
    figures: dict[str, int]
    seconds: float
    drain_s: float


def run_crash(tmp: Path, *, cycles: int, n_events: int, rate: float, seed: int,
              max_after_start_s: float = 3.0, partitions: int = 1) -> CrashResult:
    """SIGKILL the worker ``cycles`` times under load, at seeded moments; check the store.

    Cycle 0 kills during start-up (before or while the group assigns the
    partitions); the others 0..``max_after_start_s`` s after the worker logs that it
    consumes (mid-batch, mid-insert, mid-commit, mid-DLQ-send: wherever it is).
    """
    rng = random.Random(seed)
    t0 = time.monotonic()
    db = tmp / "chdb"
    with broker_behind(tmp, proxied=False, partitions=partitions) as (broker, _):
        load = Load(broker.bootstrap, n_events, rate, seed).start()
        w = WorkerProc(broker.bootstrap, f"chdb://{db}", tmp / "worker.log")
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(w.kill_quietly)
            cleanup.callback(load.stop.set)
            figures = _crash_cycles(w, load, broker, db, cycles, rng, max_after_start_s, partitions == 1)
    return CrashResult(cycles, figures, time.monotonic() - t0, figures.pop("drain_s"))


def _crash_cycles(w: WorkerProc, load: Load, broker: Broker, db: Path, cycles: int, rng: random.Random,
                  max_after_start_s: float, windows_exact: bool) -> dict[str, int]:
    for cycle in range(cycles):
        w.spawn()
        if cycle == 0:
            time.sleep(rng.uniform(0.5, 3.0))
        else:
            w.wait_consuming()
            time.sleep(rng.uniform(0.0, max_after_start_s))
        w.kill()
    sql_port = free_port()
    w.sql_port = sql_port
    w.spawn()
    load.join(600)
    # the worker's SQL endpoint asks for the password it keeps next to the store (made on its first start)
    from driftline.streams.auth import client_credentials

    t0 = time.monotonic()
    while (creds := client_credentials(db)) is None:
        assert w.alive and time.monotonic() - t0 < 60, f"no credentials file next to the store:\n{w.tail()}"
        time.sleep(0.2)
    drain = wait_drained(w, f"http://{creds[0]}:{creds[1]}@127.0.0.1:{sql_port}/driftline", load,
                         broker.bootstrap, 180)
    w.terminate()
    figures = check_exactly_once(read_store(f"chdb://{db}"), read_dlq(broker.bootstrap), load,
                                 windows_exact=windows_exact)
    figures["drain_s"] = int(drain)
    return figures


@dataclass
class OutageResult:
    link: str
    outage_s: float
    figures: dict[str, int]
    peak_rss_mb: float
    caught_up_s: float


def run_outage(tmp: Path, *, link: str, outage_s: float, n_events: int, rate: float, seed: int,
               rss_bound_mb: float = RSS_BOUND_MB) -> OutageResult:
    """Cut the worker's link to ClickHouse (``link="clickhouse"``) or to the broker
    (``"kafka"``) for ``outage_s`` seconds mid-stream, under load; check the store,
    the worker's RSS (sampled every 0.5 s) and that it catches up by itself."""
    assert link in ("clickhouse", "kafka")
    db = tmp / "chdb"
    ch_port = free_port()
    ch = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parents[1] / "faultproxy.py"),
                           "chdb-http", str(db), str(ch_port)], stdout=(tmp / "ch.log").open("ab"),
                          stderr=subprocess.STDOUT, start_new_session=True)
    ch_proxy = FaultProxy("127.0.0.1", ch_port)
    stack = contextlib.ExitStack()
    try:
        wait_for_port("127.0.0.1", ch_port, 60)
        ch_proxy.start()
        with broker_behind(tmp, proxied=link == "kafka") as (broker, k_proxy):
            proxy = ch_proxy if link == "clickhouse" else k_proxy
            assert proxy is not None
            direct = f"http://127.0.0.1:{ch_port}/driftline"
            w = WorkerProc(broker.bootstrap, f"http://127.0.0.1:{ch_proxy.port}/driftline", tmp / "worker.log")
            w.spawn()
            stack.callback(w.kill_quietly)
            w.wait_consuming()
            load = Load(broker.bootstrap, n_events, rate, seed).start()
            stack.callback(load.stop.set)
            while load.sent < n_events // 4:  # mid-stream
                assert w.alive, w.tail()
                time.sleep(0.1)
            before = stored_count(direct)
            if link == "kafka":
                load.gate.clear()
                assert load.held.wait(60), "the load did not pause"
            proxy.cut()
            cut_at = time.monotonic()
            while time.monotonic() - cut_at < outage_s:
                assert w.alive, f"the worker died during the outage:\n{w.tail()}"
                w.rss_mb()
                time.sleep(0.5)
            during = stored_count(direct)
            proxy.restore()
            load.gate.set()
            restored = time.monotonic()
            load.join(600)
            wait_drained(w, direct, load, broker.bootstrap, 240)
            caught_up = time.monotonic() - restored
            w.terminate()
            figures = check_exactly_once(read_store(direct), read_dlq(broker.bootstrap), load)
            if link == "clickhouse":
                assert during == before or during <= before + 2_000, "ClickHouse was cut: nothing lands"
            assert w.peak_rss_mb < rss_bound_mb, f"worker RSS peaked at {w.peak_rss_mb:.0f} MB"
        return OutageResult(link, outage_s, figures, w.peak_rss_mb, caught_up)
    finally:
        stack.close()
        ch_proxy.stop()
        if ch.poll() is None:
            ch.terminate()
            ch.wait(20)


# ---------------------------------------------------------------------------- the CI tests

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]


def test_sigkill_under_load_every_record_exactly_once(tmp_path: Path) -> None:
    # Catches (checked by mutating the code): not rebuilding the open windows from the
    # stored rows on assignment (Worker._rebuild_windows) -> 26 of 117 windows short of the
    # raw counts. Random kills only sometimes land in a narrow gap: ignoring the stored
    # offsets on assignment (duplicates when a kill lands between insert and commit) was
    # not caught in the one run tried (test_worker_crash.py kills there on purpose); a
    # 10-cycle run of the code before the DLQ outbox lost 2 of 325 DLQ records (a kill
    # between the events insert and the DLQ send; benchmarks/RESULTS.md).
    r = run_crash(tmp_path, cycles=5, n_events=8_000, rate=200.0, seed=13)
    assert r.figures["events"] > 7_000 and r.figures["dlq"] == 80


def test_clickhouse_cut_mid_stream_pauses_and_catches_up(tmp_path: Path) -> None:
    # The HTTP insert path is reset mid-request and refused for 12 s. Catches (checked):
    # event time following wall time while the writer is held up (the worker's idle
    # close): every event held in Kafka during the cut was late and its window had no
    # row. Also fails on: the writer giving up (lost events, or a dead worker), a
    # retried insert stored twice, unbounded buffering while ClickHouse is down (RSS).
    r = run_outage(tmp_path, link="clickhouse", outage_s=12, n_events=5_000, rate=250.0, seed=14)
    assert r.figures["events"] == 5_000 - 50


def test_kafka_cut_mid_stream_pauses_and_catches_up(tmp_path: Path) -> None:
    # Every connection to the broker is reset and refused for 12 s (longer than the
    # group's 10 s session timeout). Catches (checked): treating "no fetch answered" as
    # idle traffic (KafkaHost.cut_off returning False) -> 13 of 65 windows short of the raw
    # counts. Also fails on: the DLQ send or the commit raising out of the writer (dead
    # worker), re-storing what was stored before the rejoin (duplicates).
    r = run_outage(tmp_path, link="kafka", outage_s=12, n_events=5_000, rate=250.0, seed=15)
    assert r.figures["events"] == 5_000 - 50
