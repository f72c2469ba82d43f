"""Kafka TLS/SASL settings (streams/ingest/kafka_security.py) and signed control commands
(streams/ingest/control_auth.py, and the two subscribers of the control consumer that check
them: the host's ``handle_control`` and the drift stage's ``on_control_record``).

The client configurations are checked as exact dicts per security protocol, and each
one is handed to the real client library's constructor (confluent-kafka's librdkafka
rejects unknown properties and values; aiokafka checks protocol/mechanism
combinations), without a broker. The TLS round trip is tests/integration/test_kafka_tls.py.
"""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from driftline.streams.ingest import kafka_security as ks
from driftline.streams.ingest.control_auth import (
    MIN_SECRET_BYTES,
    admit,
    canonical,
    load_control_secret,
    sign_command,
    verify_command,
)
from driftline.streams.ingest.kafka_security import KafkaSecurity
from driftline.streams.sinks.prometheus import WorkerMetrics

PW = "pa$$-w0rd-never-shown"
SECRET = b"s" * 32


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA and a client certificate it signed (EC keys: fast), made with the openssl CLI."""
    d = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=driftline-test-ca")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=driftline-client")
    run("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "client.pem", "-days", "2")
    return {k: str(d / f) for k, f in (("ca", "ca.pem"), ("cert", "client.pem"), ("key", "client.key"))}


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"security_protocol": "TLS"}, "must be one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"),
    ({"security_protocol": "SASL_SSL", "username": "u"}, "SASL_SSL needs a password"),
    ({"security_protocol": "SASL_PLAINTEXT", "password": PW}, "SASL_PLAINTEXT needs a user"),
    ({"security_protocol": "SASL_PLAINTEXT"}, "needs a user and a password"),
    ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "GSSAPI", "username": "u", "password": PW},
     "SASL mechanism must be one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"),
    ({"security_protocol": "SSL", "sasl_mechanism": "SCRAM-SHA-256"},
     "a SASL mechanism (SCRAM-SHA-256) needs security protocol SASL_PLAINTEXT or SASL_SSL, not SSL"),
    ({"security_protocol": "PLAINTEXT", "username": "u", "password": PW},
     "Kafka credentials are only sent with SASL_PLAINTEXT or SASL_SSL, not PLAINTEXT"),
    ({"security_protocol": "SASL_PLAINTEXT", "username": "u", "password": PW, "ssl_cafile": "/x"},
     "CA file given but the security protocol SASL_PLAINTEXT does not use TLS"),
    ({"security_protocol": "SSL", "ssl_cafile": "/nonexistent/ca.pem"},
     "CA file '/nonexistent/ca.pem' is not readable: No such file or directory"),
    ({"security_protocol": "SSL", "ssl_keyfile": "/nonexistent/k.pem"},
     "a client key needs its client certificate"),
])
def test_invalid_settings_are_refused_with_the_reason(kwargs: dict[str, Any], message: str) -> None:
    # catches: a dropped check in KafkaSecurity.__post_init__ (the client would fail later, at
    # connect, with a less clear error, or silently connect without the asked-for security)
    with pytest.raises(ValueError) as exc:
        KafkaSecurity(**kwargs)
    assert message in str(exc.value)
    assert PW not in str(exc.value)


def test_tls_files_that_do_not_load_are_refused(tmp_path: Path, pki: dict[str, str]) -> None:
    # catches: TLS files only checked for existence (a wrong file would fail at the first connect)
    bad = tmp_path / "not-pem.pem"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="the Kafka TLS files do not load"):
        KafkaSecurity("SSL", ssl_cafile=str(bad))
    with pytest.raises(ValueError, match="the Kafka TLS files do not load"):  # key of another cert
        KafkaSecurity("SSL", ssl_cafile=pki["ca"], ssl_certfile=pki["ca"], ssl_keyfile=pki["key"])


def test_names_are_normalised_and_sasl_defaults_to_plain() -> None:
    s = KafkaSecurity("sasl_plaintext", username="u", password=PW)
    assert (s.security_protocol, s.sasl_mechanism) == ("SASL_PLAINTEXT", "PLAIN")
    assert KafkaSecurity("SASL_SSL", "scram-sha-512", "u", PW).sasl_mechanism == "SCRAM-SHA-512"


def test_the_password_is_never_in_repr_str_or_describe() -> None:
    # catches: the dataclass's generated __repr__ (it would print password='...')
    s = KafkaSecurity("SASL_PLAINTEXT", "SCRAM-SHA-256", "app", PW)
    for text in (repr(s), str(s), s.describe(), f"{s}", repr({"cfg": s})):
        assert PW not in text
    assert repr(s) == ("KafkaSecurity(security_protocol='SASL_PLAINTEXT', sasl_mechanism='SCRAM-SHA-256', "
                       "username='app', password=***)")
    assert s.describe() == "SASL_PLAINTEXT SCRAM-SHA-256 as app"


def test_worker_config_repr_hides_the_kafka_password_and_the_control_secret() -> None:
    from driftline.streams.worker import WorkerConfig

    cfg = WorkerConfig(kafka="k:9093", clickhouse="chdb:///x", control_secret=SECRET,
                       kafka_security=KafkaSecurity("SASL_PLAINTEXT", "PLAIN", "u", PW))
    assert PW not in repr(cfg) and SECRET.decode() not in repr(cfg)
    assert WorkerConfig(kafka="k", clickhouse="chdb:///x").kafka_security == KafkaSecurity()


# ---------------------------------------------------------------- from the command line
def test_from_options_reads_the_password_from_file_or_env(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text("from-file\n")
    env = {ks.PASSWORD_ENV: "from-env"}
    assert KafkaSecurity.from_options(username="u", env=env).password == "from-env"
    assert KafkaSecurity.from_options(username="u", password_file=f, env=env).password == "from-file"
    with pytest.raises(ValueError, match="SASL_PLAINTEXT needs a password"):
        KafkaSecurity.from_options(username="u", env={})
    with pytest.raises(ValueError, match="password file .* is not readable"):
        KafkaSecurity.from_options(username="u", password_file=tmp_path / "missing", env=env)


def test_from_options_infers_the_protocol(pki: dict[str, str]) -> None:
    env = {ks.PASSWORD_ENV: PW}
    assert KafkaSecurity.from_options(env=env).security_protocol == "PLAINTEXT"  # the password alone: unused
    assert KafkaSecurity.from_options(username="u", env=env).security_protocol == "SASL_PLAINTEXT"
    assert KafkaSecurity.from_options(ssl_cafile=pki["ca"], env=env).security_protocol == "SSL"
    assert KafkaSecurity.from_options(username="u", ssl_cafile=pki["ca"], env=env).security_protocol == "SASL_SSL"
    assert KafkaSecurity.from_options("SSL", env=env).ssl_cafile is None  # system trust store


def test_the_cli_refuses_sasl_without_password_before_connecting() -> None:
    # catches: the options block not wired into a command (the user would go unauthenticated)
    from typer.testing import CliRunner

    from driftline.streams.cli.main import app

    runner = CliRunner()
    for argv in (["emit", "-", "--kafka", "127.0.0.1:1", "--kafka-user", "u"],
                 ["baseline", "reset", "--kafka", "127.0.0.1:1", "--kafka-user", "u"],
                 ["otlp", "--kafka", "127.0.0.1:1", "--kafka-user", "u"],
                 ["worker", "--kafka", "127.0.0.1:1", "--kafka-user", "u"]):
        r = runner.invoke(app, argv, env={ks.PASSWORD_ENV: ""})
        assert r.exit_code == 2, (argv, r.output)
        assert "SASL_PLAINTEXT needs a password" in r.output, argv
    r = runner.invoke(app, ["emit", "-", "--kafka-security-protocol", "SSL"], env={"DRIFTLINE_KAFKA": ""})
    assert r.exit_code == 2 and "SSL needs --kafka / DRIFTLINE_KAFKA" in r.output  # not the plain local one
    r = runner.invoke(app, ["emit", "-", "--kafka-password", PW])
    assert r.exit_code == 2 and "No such option" in r.output  # never on argv


def test_cleartext_plain_password_to_a_remote_host_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    s = KafkaSecurity("SASL_PLAINTEXT", "PLAIN", "u", PW)
    caplog.set_level(logging.WARNING, "driftline.kafka")
    assert not s.warn_cleartext("127.0.0.1:9092,localhost:9093,[::1]:9094")
    assert s.warn_cleartext("kafka-1.internal:9092,127.0.0.1:9092")
    assert not s.warn_cleartext("kafka-1.internal:9092,127.0.0.1:9092")  # once
    assert not KafkaSecurity("SASL_PLAINTEXT", "SCRAM-SHA-512", "u", PW).warn_cleartext("remote-9:9092")
    assert [r.getMessage() for r in caplog.records] == [
        "Kafka SASL PLAIN over SASL_PLAINTEXT sends the password unencrypted to kafka-1.internal: use "
        "SASL_SSL, or SCRAM-SHA-256/512"]


# ---------------------------------------------------------------- client mappings
def test_plaintext_maps_to_the_libraries_defaults() -> None:
    s = KafkaSecurity()
    assert s.aiokafka_kwargs() == {"security_protocol": "PLAINTEXT"}
    assert s.kafka_python_kwargs() == {"security_protocol": "PLAINTEXT"}
    assert s.faust_kwargs() == {}
    assert s.confluent_config() == {"security.protocol": "plaintext"}


def test_sasl_plaintext_scram_maps_exactly() -> None:
    s = KafkaSecurity("SASL_PLAINTEXT", "SCRAM-SHA-256", "app", PW)
    assert s.aiokafka_kwargs() == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-256",
                                   "sasl_plain_username": "app", "sasl_plain_password": PW}
    assert s.kafka_python_kwargs() == s.aiokafka_kwargs()  # the same names in both libraries
    assert s.confluent_config() == {"security.protocol": "sasl_plaintext", "sasl.mechanisms": "SCRAM-SHA-256",
                                    "sasl.username": "app", "sasl.password": PW}


def test_ssl_with_client_certificate_maps_exactly(pki: dict[str, str]) -> None:
    s = KafkaSecurity("SSL", ssl_cafile=pki["ca"], ssl_certfile=pki["cert"], ssl_keyfile=pki["key"])
    a = s.aiokafka_kwargs()
    ctx = a.pop("ssl_context")
    assert a == {"security_protocol": "SSL"}
    assert isinstance(ctx, ssl.SSLContext) and ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "driftline-test-ca"),),)]
    assert s.kafka_python_kwargs() == {"security_protocol": "SSL", "ssl_check_hostname": True,
                                       "ssl_cafile": pki["ca"], "ssl_certfile": pki["cert"],
                                       "ssl_keyfile": pki["key"]}
    assert s.confluent_config() == {"security.protocol": "ssl", "ssl.endpoint.identification.algorithm": "https",
                                    "ssl.ca.location": pki["ca"], "ssl.certificate.location": pki["cert"],
                                    "ssl.key.location": pki["key"]}
    no_check = KafkaSecurity("SSL", ssl_cafile=pki["ca"], ssl_check_hostname=False)
    ctx = no_check.aiokafka_kwargs()["ssl_context"]
    assert not ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED  # the chain is still checked
    assert no_check.confluent_config()["ssl.endpoint.identification.algorithm"] == "none"
    assert no_check.kafka_python_kwargs()["ssl_check_hostname"] is False


def test_sasl_ssl_maps_exactly(pki: dict[str, str]) -> None:
    s = KafkaSecurity("SASL_SSL", "SCRAM-SHA-512", "app", PW, ssl_cafile=pki["ca"])
    a = s.aiokafka_kwargs()
    assert isinstance(a.pop("ssl_context"), ssl.SSLContext)
    assert a == {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                 "sasl_plain_username": "app", "sasl_plain_password": PW}
    assert s.kafka_python_kwargs() == {**a, "ssl_check_hostname": True, "ssl_cafile": pki["ca"]}
    assert s.confluent_config() == {
        "security.protocol": "sasl_ssl", "sasl.mechanisms": "SCRAM-SHA-512", "sasl.username": "app",
        "sasl.password": PW, "ssl.endpoint.identification.algorithm": "https", "ssl.ca.location": pki["ca"]}


def test_faust_credentials_become_the_same_aiokafka_settings(pki: dict[str, str]) -> None:
    # faust turns broker_credentials into aiokafka settings with its own function: what it
    # produces must equal our aiokafka mapping (catches: SSLCredentials for SASL_SSL, a lost mechanism)
    import faust
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    cases = [KafkaSecurity("SSL", ssl_cafile=pki["ca"]),
             KafkaSecurity("SASL_PLAINTEXT", "SCRAM-SHA-256", "app", PW),
             KafkaSecurity("SASL_SSL", "SCRAM-SHA-512", "app", PW, ssl_cafile=pki["ca"]),
             KafkaSecurity("SASL_SSL", "PLAIN", "app", PW, ssl_cafile=pki["ca"])]
    kinds = []
    for s in cases:
        creds = s.faust_kwargs()["broker_credentials"]
        kinds.append(type(creds))
        got = dict(credentials_to_aiokafka_auth(creds))
        want = s.aiokafka_kwargs()
        got_ctx, want_ctx = got.pop("ssl_context", None), want.pop("ssl_context", None)
        assert got == want, s
        assert (got_ctx is None) == (want_ctx is None), s
        assert PW not in repr(creds)
    assert kinds == [faust.SSLCredentials, faust.SASLCredentials, faust.SASLCredentials, faust.SASLCredentials]


def test_librdkafka_accepts_every_mapping(pki: dict[str, str]) -> None:
    # librdkafka validates property names and values when the client is built (no connection yet)
    ck = pytest.importorskip("confluent_kafka")
    for s in (KafkaSecurity(), KafkaSecurity("SASL_PLAINTEXT", "SCRAM-SHA-256", "u", PW),
              KafkaSecurity("SSL", ssl_cafile=pki["ca"], ssl_certfile=pki["cert"], ssl_keyfile=pki["key"]),
              KafkaSecurity("SASL_SSL", "PLAIN", "u", PW, ssl_cafile=pki["ca"], ssl_check_hostname=False)):
        p = ck.Producer({"bootstrap.servers": "127.0.0.1:1", **s.confluent_config()})
        p.flush(0)


async def test_aiokafka_and_kafka_python_accept_every_mapping(pki: dict[str, str]) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from kafka import KafkaProducer

    for s in (KafkaSecurity("SASL_PLAINTEXT", "SCRAM-SHA-512", "u", PW),
              KafkaSecurity("SASL_SSL", "SCRAM-SHA-256", "u", PW, ssl_cafile=pki["ca"]),
              KafkaSecurity("SSL", ssl_cafile=pki["ca"], ssl_certfile=pki["cert"], ssl_keyfile=pki["key"])):
        AIOKafkaProducer(bootstrap_servers="127.0.0.1:1", **s.aiokafka_kwargs())
        AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1", **s.aiokafka_kwargs())
        unknown = set(s.kafka_python_kwargs()) - set(KafkaProducer.DEFAULT_CONFIG)
        assert not unknown


# ---------------------------------------------------------------- signing
def test_a_signed_command_verifies_and_binds_every_field() -> None:
    cmd = sign_command({"cmd": "baseline", "action": "reset", "app": "chat"}, SECRET, now_ms=1_000)
    assert set(cmd) == {"cmd", "action", "app", "id", "sent_at_ms", "sig"}
    assert cmd["sig"].startswith("hmac-sha256:") and len(cmd["sig"]) == len("hmac-sha256:") + 64
    assert verify_command(cmd, SECRET) is None
    # the JSON round trip through Kafka (another key order) keeps it valid
    assert verify_command(json.loads(json.dumps(dict(reversed(list(cmd.items()))))), SECRET) is None
    # catches: a signature over a subset of the fields (any change must break it)
    for k, v in (("action", "rebase"), ("app", "search"), ("id", "other"), ("sent_at_ms", 1_001),
                 ("cmd", "flush")):
        assert verify_command({**cmd, k: v}, SECRET) == "bad_signature", k
    assert verify_command({**cmd, "model": "gpt-4o"}, SECRET) == "bad_signature"  # a filter added
    assert verify_command({k: v for k, v in cmd.items() if k != "app"}, SECRET) == "bad_signature"


def test_refusal_reasons() -> None:
    cmd = sign_command({"cmd": "flush"}, SECRET, now_ms=1_000_000)
    assert verify_command({"cmd": "flush"}, SECRET) == "unsigned"
    assert verify_command(cmd, b"t" * 32) == "bad_signature"  # catches: the secret not in the MAC
    assert verify_command({**cmd, "sig": cmd["sig"][:-1]}, SECRET) == "bad_signature"
    assert verify_command({**cmd, "sig": 1}, SECRET) == "malformed"
    assert verify_command({**cmd, "sent_at_ms": "1000000"}, SECRET) == "malformed"
    assert verify_command({k: v for k, v in cmd.items() if k != "id"}, SECRET) == "malformed"
    # replay of an old command, with a maximum age: refused; also one dated in the future
    assert verify_command(cmd, SECRET, now_ms=1_000_000 + 60_000, max_age_s=60) is None
    assert verify_command(cmd, SECRET, now_ms=1_000_000 + 60_001, max_age_s=60) == "too_old"
    assert verify_command(cmd, SECRET, now_ms=1_000_000 - 60_001, max_age_s=60) == "too_old"
    assert verify_command(cmd, SECRET, now_ms=10**12) is None  # no maximum age: any age


def test_canonical_form_is_fixed() -> None:
    # a second implementation (another language's sender) must be able to reproduce it
    assert canonical({"b": 1, "a": "é", "sig": "x", "c": None}) == b'{"a":"\\u00e9","b":1,"c":null}'


def test_load_control_secret(tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_bytes(b"0123456789abcdef0123\n")
    assert load_control_secret(None, env={}) is None
    assert load_control_secret(None, env={"DRIFTLINE_CONTROL_SECRET": "x" * MIN_SECRET_BYTES}) == b"x" * 16
    assert load_control_secret(f, env={"DRIFTLINE_CONTROL_SECRET": "y" * 20}) == b"0123456789abcdef0123"
    with pytest.raises(ValueError, match="at least 16 bytes") as exc:
        load_control_secret(None, env={"DRIFTLINE_CONTROL_SECRET": "short-secret"})
    assert "short-secret" not in str(exc.value)
    with pytest.raises(ValueError, match="not readable"):
        load_control_secret(tmp_path / "missing", env={})


def test_admit_logs_without_the_secret_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    refused: dict[str, float] = {}
    caplog.set_level(logging.WARNING, "driftline.control")
    forged = sign_command({"cmd": "baseline", "action": "reset", "note": "x"}, b"k" * 32)
    assert admit({"cmd": "flush"}, None, refused)  # no secret: as before
    assert not admit({"cmd": "flush"}, SECRET, refused)
    assert not admit(forged, SECRET, refused, where="drift")
    assert admit(sign_command({"cmd": "flush"}, SECRET), SECRET, refused)
    assert refused == {"unsigned": 1, "bad_signature": 1}
    text = caplog.text
    assert SECRET.decode() not in text and forged["sig"] not in text
    assert f"drift: refused baseline command (action reset, id {forged['id']}): its signature does not match" in text


# ---------------------------------------------------------------- the worker's two control paths
def _worker(secret: bytes | None) -> Any:
    """The ports both control paths are given (ControlAuth, the worker's metrics)."""
    from driftline.streams.ports import ControlAuth, StagePorts

    reg = CollectorRegistry()
    flushed: list[int] = []
    ports = StagePorts.detached(metrics=WorkerMetrics(reg), control=ControlAuth(secret))
    return ports, reg, flushed


def _handle(ports: Any, cmd: Any, flushed: list[int], hooks: Any = ()) -> None:
    """The host's subscription, as wiring.control_subscriptions makes it (a flush that records)."""
    from driftline.streams.app import handle_control

    handle_control(cmd, auth=ports.control, refused=ports.metrics.control_refused,
                   flush=lambda: flushed.append(1), hooks=hooks)


def test_handle_control_applies_signed_and_refuses_unsigned_commands() -> None:
    # the host's path (wiring.control_subscriptions -> handle_control); catches: handle_control
    # not calling the check, or a refused command still reaching request_flush / the stages
    w, reg, flushed = _worker(SECRET)
    seen: list[dict[str, Any]] = []
    hooks = [("s", seen.append)]
    _handle(w, {"cmd": "flush"}, flushed, hooks)
    _handle(w, sign_command({"cmd": "flush"}, b"x" * 32), flushed, hooks)
    assert flushed == [] and seen == []
    _handle(w, sign_command({"cmd": "flush"}, SECRET), flushed, hooks)
    assert flushed == [1] and [c["cmd"] for c in seen] == ["flush"]
    _handle(w, {"cmd": "baseline", "action": "reset"}, flushed, hooks)  # the drift stage's, not counted here
    get = reg.get_sample_value
    assert get("driftline_control_refused_total", {"reason": "unsigned"}) == 1
    assert get("driftline_control_refused_total", {"reason": "bad_signature"}) == 1
    w2, reg2, flushed2 = _worker(None)  # no secret: accepted as before
    _handle(w2, {"cmd": "flush"}, flushed2)
    assert flushed2 == [1] and reg2.get_sample_value("driftline_control_refused_total",
                                                     {"reason": "unsigned"}) is None


def test_drift_stage_queues_signed_and_refuses_unsigned_baseline_commands() -> None:
    # the drift stage's control path: the control consumer hands every baseline record of
    # driftline.control to on_command (on_control_record: a raw record decoded first), which queues admitted
    # commands in _controls for the drift loop to apply. Catches: the check skipped,
    # or a refused command queued anyway.
    from driftline.streams.stages.semantic_drift import DriftConfig, DriftStage

    st = DriftStage(DriftConfig())
    w, reg, _ = _worker(SECRET)
    st._ports, st._ids_loaded = w, True  # what start() sets (drift_control_log read)
    signed = sign_command({"cmd": "baseline", "action": "reset", "app": "chat"}, SECRET)
    unsigned = {"cmd": "baseline", "id": "u1", "action": "reset", "app": "chat", "sent_at_ms": 1}
    forged = {**signed, "app": "search"}
    assert not st.on_control_record(json.dumps(unsigned).encode(), "driftline.control", 0, 0, 0)
    assert not st.on_control_record(json.dumps(forged).encode(), "driftline.control", 0, 1, 0)
    assert not st.on_control_record(b"{not json", "driftline.control", 0, 2, 0)
    assert st.on_control_record(json.dumps(signed).encode(), "driftline.control", 0, 3, 0)
    assert not st.on_control_record(json.dumps(signed).encode(), "driftline.control", 0, 4, 0)  # once
    assert [(c[0]["app"], c[1], c[4]) for c in st._controls] == [("chat", signed["id"], 3)]
    assert reg.get_sample_value("driftline_control_refused_total", {"reason": "unsigned"}) == 1
    assert reg.get_sample_value("driftline_control_refused_total", {"reason": "bad_signature"}) == 1
    st2 = DriftStage(DriftConfig())
    st2._ports, st2._ids_loaded = _worker(None)[0], True
    assert st2.on_control_record(json.dumps(unsigned).encode(), "driftline.control", 0, 0, 0)


def test_the_worker_says_whether_control_commands_are_authenticated(caplog: pytest.LogCaptureFixture) -> None:
    # serve_worker calls this once at start; catches: the warning dropped for the unsigned default
    from driftline.streams.app import log_control_trust
    from driftline.streams.worker import WorkerConfig

    caplog.set_level(logging.INFO, "driftline.app")
    log_control_trust(WorkerConfig(kafka="k", clickhouse="chdb:///x"))
    log_control_trust(WorkerConfig(kafka="k", clickhouse="chdb:///x", control_secret=SECRET))
    (warn, info) = caplog.records
    assert warn.levelname == "WARNING" and warn.getMessage().startswith(
        "control commands on driftline.control are not authenticated: anyone who can write that topic")
    assert (info.levelname, info.getMessage()) == ("INFO", "control commands on driftline.control must be "
                                                           "signed (HMAC-SHA256)")
    assert SECRET.decode() not in caplog.text


def test_deeply_nested_control_records_are_refused_without_raising() -> None:
    # A record on driftline.control is read by anyone's producer, before any signature check.
    # Nesting near or beyond the interpreter's recursion limit used to raise RecursionError out
    # of on_control_record (json.loads), or out of admit (the canonical JSON of verify_command,
    # the repr in the refusal's log line): that ended the drift stage's control loop, and since the
    # topic is re-read from its start, every restart again: no baseline command applied anymore.
    # Catches: RecursionError dropped from the except in on_control_record (the deep records),
    # from verify_command's except or _short back to repr() (the ones just under the limit);
    # a signed command after them must still be queued.
    import sys

    from driftline.streams.stages.semantic_drift import DriftConfig, DriftStage

    st = DriftStage(DriftConfig())
    w, reg, flushed = _worker(SECRET)
    st._ports, st._ids_loaded = w, True  # what start() sets (drift_control_log read)
    lim = sys.getrecursionlimit()
    n = 0
    for d in [*range(lim - 150, lim + 5), 100_000]:
        for key in ("action", "id", "x"):
            head = {"cmd": "baseline", "id": "i", "sent_at_ms": 1, "sig": "hmac-sha256:00"}
            head.pop(key, None)
            text = json.dumps(head)[:-1] + f', "{key}": ' + "[" * d + "]" * d + "}"
            assert st.on_control_record(text.encode(), "driftline.control", 0, n, 0) is False
            n += 1
    assert st._controls == []
    deep: Any = []
    for d in range(1, lim + 60):  # the host's path gets the decoded object
        deep = [deep]
        if d > lim - 150 and d % 5 == 0:
            _handle(w, {"cmd": "flush", "id": "f", "sent_at_ms": 1, "sig": "x", "x": deep}, flushed)
            _handle(w, {"cmd": "flush", "id": "f", "sent_at_ms": 1, "sig": "x", "action": deep}, flushed)
    assert flushed == []
    signed = sign_command({"cmd": "baseline", "action": "reset", "app": "chat"}, SECRET)
    assert st.on_control_record(json.dumps(signed).encode(), "driftline.control", 0, n, 0)
    assert [c[1] for c in st._controls] == [signed["id"]]
