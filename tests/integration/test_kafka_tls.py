"""Kafka over mutual TLS with the clients configured from one KafkaSecurity, and signed
control commands through a real worker's control path.

The local broker (Tansu 0.6.0) has no TLS of its own: its ``--cert`` and ``--key``
options exclude each other (one clap group) and the broker never uses the TLS acceptor
it builds (tansu-broker/src/broker.rs ``_acceptor``). So a TLS front made with Python's
``ssl`` module (a real TLS 1.2/1.3 server that requires a client certificate from the
test CA) listens on the port Tansu advertises and pipes the decrypted bytes to Tansu's
plain port: every client below does a real TLS handshake, verifies the server's
certificate and presents its own. Its SASL (``--authentication``) offers only SCRAM
and, with memory storage, no user can be created (creating one needs a login), so SASL
is covered by the exact client-configuration tests in tests/unit/test_kafka_security.py.

Certificates come from the ``openssl`` command line (EC keys, about 20 ms each).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError
from helpers_worker import wait_for

from driftline.streams.cli.baseline import send_command
from driftline.streams.ingest.bulk_producer import produce_records
from driftline.streams.ingest.control_auth import sign_command, verify_command
from driftline.streams.ingest.kafka_security import KafkaSecurity
from driftline.streams.local.broker import LocalBroker, ensure_topics, free_port

pytestmark = [pytest.mark.integration]

SECRET = b"tls-test-control-secret-0123456789"


def _pki(d: Path) -> dict[str, str]:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "rogue-ca"):
        run("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN={ca}")
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for who in ("server", "client"):
        run("req", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN=driftline-{who}")
        run("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{who}.pem", "-days", "2", "-extfile", f"{who}.ext")
    return {p.stem: str(p) for p in d.iterdir() if p.suffix == ".pem"} | {
        "server_key": str(d / "server.key"), "client_key": str(d / "client.key")}


class TlsFront:
    """A TLS server on ``port`` (server certificate from the test CA; client certificates
    required and checked against it) piping each connection to the broker's plain port."""

    def __init__(self, port: int, backend: int, pki: dict[str, str]) -> None:
        self.port, self.backend = port, backend
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki["ca"])
        self.ctx.load_cert_chain(pki["server"], pki["server_key"])
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.handshakes = 0
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="tls-front")
        self._server: asyncio.Server | None = None

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await r.read(1 << 16):
                w.write(data)
                await w.drain()
        with contextlib.suppress(Exception):
            w.close()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.handshakes += 1  # called only after a completed handshake with a valid client certificate
        br, bw = await asyncio.open_connection("127.0.0.1", self.backend)
        await asyncio.gather(self._pipe(r, bw), self._pipe(br, w))

    def __enter__(self) -> TlsFront:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", self.port, ssl=self.ctx), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def tls_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str], TlsFront]]:
    """(TLS bootstrap, PKI paths, the front): Tansu advertises the front's port."""
    pki = _pki(tmp_path_factory.mktemp("pki"))
    front_port = free_port()
    with LocalBroker.started(advertised_port=front_port,
                             log_path=tmp_path_factory.mktemp("tansu") / "tansu.log") as b:
        with TlsFront(front_port, b.port, pki) as front:
            yield f"127.0.0.1:{front_port}", pki, front


def _mtls(pki: dict[str, str], **kw: Any) -> KafkaSecurity:
    return KafkaSecurity("SSL", ssl_cafile=pki["ca"], ssl_certfile=pki["client"], ssl_keyfile=pki["client_key"],
                         **kw)


async def _read(bootstrap: str, topic: str, n: int, sec: KafkaSecurity, timeout: float = 15.0) -> list[Any]:
    c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                         enable_auto_commit=False, **sec.aiokafka_kwargs())
    await c.start()
    out: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < deadline:
            for recs in (await c.getmany(timeout_ms=300)).values():
                out.extend(recs)
        for recs in (await c.getmany(timeout_ms=300)).values():  # nothing beyond
            out.extend(recs)
    finally:
        await c.stop()
    return out


@pytest.mark.timeout(60)
async def test_every_client_library_round_trips_over_mutual_tls(tls_kafka: tuple[str, dict[str, str], TlsFront]) -> None:
    """kafka-python (topic creation, ``baseline`` commands), aiokafka (``emit``'s producer,
    the worker's consumers) and librdkafka each connect with their mapping of one
    KafkaSecurity; the records read back are exactly those sent. Catches: a mapping that
    drops the CA or the client certificate (the handshake fails), or a client built
    without the security kwargs (it speaks plain Kafka to a TLS port and fails)."""
    bootstrap, pki, front = tls_kafka
    sec = _mtls(pki)
    topic = f"tls-{uuid.uuid4().hex[:8]}"
    before = front.handshakes
    assert await asyncio.to_thread(ensure_topics, bootstrap, {topic: 2}, security=sec) == [topic]
    values = [json.dumps({"i": i}).encode() for i in range(50)]
    assert await produce_records(bootstrap, topic, ((b"k%d" % (i % 5), v) for i, v in enumerate(values)),
                                 security=sec) == 50
    ck = pytest.importorskip("confluent_kafka")
    p = ck.Producer({"bootstrap.servers": bootstrap, **sec.confluent_config()})
    p.produce(topic, b"from-librdkafka", key=b"k0")
    assert p.flush(10) == 0
    # the client key inside the certificate file (KafkaSecurity allows it): librdkafka reads
    # no key from ssl.certificate.location, so the mapping must name the file as the key too
    both = Path(pki["client"]).with_name("client-and-key.pem")
    both.write_text(Path(pki["client"]).read_text() + Path(pki["client_key"]).read_text())
    combined = KafkaSecurity("SSL", ssl_cafile=pki["ca"], ssl_certfile=str(both))
    sent: list[Any] = []
    p = ck.Producer({"bootstrap.servers": bootstrap, "message.timeout.ms": 8_000, **combined.confluent_config()})
    p.produce(topic, b"from-librdkafka-combined-pem", key=b"k0", on_delivery=lambda err, m: sent.append(err))
    p.flush(10)
    assert [str(e) for e in sent] == ["None"]  # not Local: Message timed out (no client key: mTLS refused)
    cid = await asyncio.to_thread(send_command, bootstrap, {"action": "reset", "app": "chat"}, topic,
                                  security=sec, secret=SECRET)
    got = await _read(bootstrap, topic, 53, sec)
    vals = [r.value for r in got]
    assert len(vals) == 53
    assert sorted(v for v in vals if v.startswith(b'{"i"')) == sorted(values)
    assert vals.count(b"from-librdkafka") == 1 and vals.count(b"from-librdkafka-combined-pem") == 1
    cmd = json.loads(next(v for v in vals if b'"cmd"' in v))
    assert cmd["id"] == cid and verify_command(cmd, SECRET) is None
    assert front.handshakes > before


@pytest.mark.timeout(60)
async def test_tls_port_refuses_plain_unknown_ca_and_certless_clients(
        tls_kafka: tuple[str, dict[str, str], TlsFront]) -> None:
    """A plain client, a client that does not trust the server's CA, and one without a
    client certificate: none gets a connection through (no handshake reaches the front's
    handler). Catches: ``ssl_cafile`` ignored (the system store would not trust the test CA:
    so this also shows the verification is on), or a fallback to PLAINTEXT."""
    bootstrap, pki, front = tls_kafka
    before = front.handshakes
    bad = [KafkaSecurity(),
           KafkaSecurity("SSL", ssl_cafile=pki["rogue-ca"], ssl_certfile=pki["client"],
                         ssl_keyfile=pki["client_key"]),
           KafkaSecurity("SSL", ssl_cafile=pki["ca"])]
    for sec in bad:
        p = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=3000, **sec.aiokafka_kwargs())
        t0 = time.monotonic()
        with pytest.raises(KafkaConnectionError):
            await p.start()
        await p.stop()
        assert time.monotonic() - t0 < 10, sec
    assert front.handshakes == before


class _ZeroEncoder:
    """Stands in for the sentence model (no embedding is asserted here): fixed vectors."""

    name, dim, max_chars, device = "zeros", 8, 1000, "cpu"

    def encode(self, texts: Any) -> np.ndarray:
        return np.ones((len(texts), self.dim), np.float32)


@pytest.mark.timeout(90)
async def test_worker_over_mutual_tls_applies_only_signed_control_commands(
        tls_kafka: tuple[str, dict[str, str], TlsFront], chdb_dsn: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """A whole worker (spine consumer group, DLQ reader and producer, topic admin, the faust
    app, the control-topic consumer) on the TLS port only, with a control
    secret. 30 events emitted over TLS are stored exactly; of three baseline commands on
    the control topic (signed, unsigned, signed with another secret) the drift stage
    applies exactly the signed one (one ``drift_control_log`` row, by id) and counts
    the others by reason. Catches: any client of the worker built without the security
    kwargs (it cannot reach the broker: the worker never starts or stores), and a control
    path that skips the signature check."""
    from driftline.streams.app import serve_worker
    from driftline.streams.ingest.emitter import LLMEventEmitter
    from driftline.streams.sinks.clickhouse import ClickHouseSink
    from driftline.streams.stages.semantic_drift import DriftConfig, DriftStage
    from driftline.streams.stages.windows import WindowConfig
    from driftline.streams.worker import WorkerConfig

    bootstrap, pki, _ = tls_kafka
    caplog.set_level(logging.INFO, "driftline")
    sec = _mtls(pki)
    u = uuid.uuid4().hex[:8]
    topic, control = f"ev-{u}", f"ctl-{u}"
    await asyncio.to_thread(ensure_topics, bootstrap, {topic: 1, f"{topic}.dlq": 1, control: 1}, security=sec)
    signed = sign_command({"cmd": "baseline", "action": "reset", "app": "chat"}, SECRET)
    unsigned = {"cmd": "baseline", "id": f"u-{u}", "sent_at_ms": int(time.time() * 1000), "action": "reset"}
    forged = sign_command({"cmd": "baseline", "action": "reset"}, b"x" * 32)
    await produce_records(bootstrap, control, [(None, json.dumps(c).encode()) for c in (unsigned, signed, forged)],
                          security=sec)
    cfg = WorkerConfig(kafka=bootstrap, clickhouse=chdb_dsn, group_id=f"g-{u}", topics=(topic,),
                       dlq_topic=f"{topic}.dlq", window=WindowConfig(size_ms=60_000), max_event_age_s=1e10,
                       kafka_security=sec, control_secret=SECRET)
    stages: list[DriftStage] = []

    def make(registry: Any) -> DriftStage:
        stages.append(DriftStage(DriftConfig(control_topic=control, sample_rate=1.0), registry,
                                 encoder=_ZeroEncoder()))
        return stages[0]

    stop, box = asyncio.Event(), []
    t0 = time.monotonic()
    task = asyncio.create_task(serve_worker(cfg, stop, web_port=free_port(), sql_port=None,
                                            on_ready=box.append, stages=[make]))
    try:
        await wait_for(lambda: bool(box) or task.done(), 45, lambda: "the worker never became ready")
        if task.done():
            task.result()
        w, st = box[0], stages[0]
        started = time.monotonic() - t0
        async with LLMEventEmitter(bootstrap, topic, security=sec) as em:
            for i in range(30):
                await em.send({"app": "chat", "request_model": "gpt-4o", "timestamp": int(time.time() * 1000),
                               "latency_ms": 100.0 + i, "prompt": f"hello {i}"})
        await wait_for(lambda: w.stored_events >= 30 and st.controls_applied >= 1, 30,
                       lambda: f"stored {w.stored_events}, controls applied {st.controls_applied}")
        await wait_for(lambda: sum(w.metrics.control_refused.values()) >= 2, 10,
                       lambda: f"refused {dict(w.metrics.control_refused)}")
        assert w.stored_events == 30 and st.controls_applied == 1
        assert dict(w.metrics.control_refused) == {"unsigned": 1, "bad_signature": 1}
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    sink = ClickHouseSink(chdb_dsn)
    try:
        n = sink.call(lambda c: c.query(f"SELECT count() FROM {sink.database}.llm_events FINAL").result_rows)
        log = sink.call(lambda c: c.query(f"SELECT control_id FROM {sink.database}.drift_control_log").result_rows)
    finally:
        sink.close()
    assert n == [(30,)]
    assert log == [(signed["id"],)]
    msgs = [r.getMessage() for r in caplog.records]
    assert "control commands on driftline.control must be signed (HMAC-SHA256)" in msgs
    assert "Kafka security: SSL" in msgs
    assert sum("drift: refused baseline command" in m for m in msgs) == 2
    assert SECRET.decode() not in caplog.text and signed["sig"] not in caplog.text
    print(f"\nworker over mTLS: ready in {started:.1f}s, whole test {time.monotonic() - t0:.1f}s")


@pytest.mark.timeout(60)
def test_cli_emit_and_baseline_over_mutual_tls(tls_kafka: tuple[str, dict[str, str], TlsFront],
                                               tmp_path: Path) -> None:
    """``driftline emit`` and ``driftline baseline reset`` with the --kafka-* options (and the
    password-free TLS env), the latter signing with DRIFTLINE_CONTROL_SECRET. Catches: a
    command whose options block is parsed but not passed on to its client (it would fail
    against the TLS port), and a baseline command sent unsigned while a secret is set."""
    from typer.testing import CliRunner

    from driftline.streams.cli.main import app

    bootstrap, pki, _ = tls_kafka
    u = uuid.uuid4().hex[:8]
    topic, control = f"cli-{u}", f"ctl-{u}"
    sec = _mtls(pki)
    ensure_topics(bootstrap, {topic: 1}, security=sec)
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps({"app": "chat", "request_model": "gpt-4o", "timestamp": 1_700_000_000_000,
                                          "latency_ms": 10.0 + i}) + "\n" for i in range(5)))
    tls = ["--kafka", bootstrap, "--kafka-ca", pki["ca"], "--kafka-cert", pki["client"],
           "--kafka-key", pki["client_key"]]
    runner = CliRunner()
    r = runner.invoke(app, ["emit", str(events), "--topic", topic, *tls])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["sent"] == 5
    assert len(asyncio.run(_read(bootstrap, topic, 5, sec))) == 5
    # baseline commands go to driftline.control; here the default topic is used by the CLI,
    # so read it back from there and pick ours by its note
    ensure_topics(bootstrap, {"driftline.control": 1}, security=sec)
    r = runner.invoke(app, ["baseline", "reset", "--app", "chat", "--note", control, "--wait", "0", *tls],
                      env={"DRIFTLINE_CONTROL_SECRET": SECRET.decode()})
    assert r.exit_code == 0, r.output
    cmds = [json.loads(x.value) for x in asyncio.run(_read(bootstrap, "driftline.control", 10**6, sec, 1.5))]
    ours = [c for c in cmds if c.get("note") == control]
    assert len(ours) == 1 and verify_command(ours[0], SECRET) is None
    assert f"(id {ours[0]['id']})" in r.output
