"""The OTLP receiver's security (issue 14): bearer tokens, HTTPS, caps on work in flight.

Real aiohttp servers on 127.0.0.1 and real HTTP clients (aiohttp, raw sockets, the
OpenTelemetry SDK's OTLP/HTTP exporter); the local broker only where a forwarded record
is checked. The caps are driven deterministically: the Kafka send is replaced by a
forwarder that waits on an Event, so N requests are held in flight exactly as long as
the test wants. Each test names the mutation of streams/ingest/otlp_receiver.py it catches.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from google.rpc.status_pb2 import Status
from helpers_worker import read_topic, wait_for
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from driftline.streams.ingest.otlp_receiver import (
    Admission,
    OtlpAuth,
    OtlpConfigError,
    OtlpReceiver,
    OtlpTls,
    Overloaded,
    is_loopback_host,
)
from driftline.streams.local.broker import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TOKEN_A = "tokA-" + "a" * 27   # 32 characters, token_urlsafe alphabet
TOKEN_B = "tokB-" + "b" * 27
PROTO = {"Content-Type": "application/x-protobuf"}
KIB = 1024
SHORT = aiohttp.ClientTimeout(total=5)  # a request a mutation leaves hanging fails, not hangs


def otlp_body(name: str, pad: int = 0) -> bytes:
    """A valid ExportTraceServiceRequest with one span named ``name`` (``pad`` bytes more)."""
    span = Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name=name,
                start_time_unix_nano=1_700_000_000_000_000_000,
                end_time_unix_nano=1_700_000_000_500_000_000,
                attributes=[KeyValue(key="pad", value=AnyValue(string_value="x" * pad))])
    return ExportTraceServiceRequest(resource_spans=[
        ResourceSpans(scope_spans=[ScopeSpans(spans=[span])])]).SerializeToString()


def bearer(token: str) -> dict[str, str]:
    return {**PROTO, "Authorization": f"Bearer {token}"}


def errors(r: OtlpReceiver, reason: str) -> float | None:
    return r.registry.get_sample_value("driftline_otlp_errors_total", {"reason": reason})


@pytest.fixture
async def held_receiver(monkeypatch: pytest.MonkeyPatch
                        ) -> AsyncIterator[Callable[..., Awaitable[tuple[OtlpReceiver, asyncio.Event]]]]:
    """A receiver whose Kafka send is replaced: bodies containing b"HOLD" wait on the
    returned Event, the others are acknowledged at once. No broker is needed."""
    started: list[tuple[OtlpReceiver, asyncio.Event]] = []

    async def make(**kw: Any) -> tuple[OtlpReceiver, asyncio.Event]:
        r = OtlpReceiver(f"127.0.0.1:{free_port()}", port=0, registry=CollectorRegistry(),
                         send_timeout=1.0, **kw)
        gate = asyncio.Event()

        async def forward(body: bytes, encoding: str) -> None:
            if b"HOLD" in body:
                await gate.wait()

        monkeypatch.setattr(r, "_forward", forward)
        await r.start()
        started.append((r, gate))
        return r, gate

    yield make
    for r, gate in started:
        gate.set()  # a failed test must not leave stop() waiting on held requests
        await r.stop()


# --------------------------------------------------------------------------- unit: settings


def test_token_check_and_loading(tmp_path: Path) -> None:
    """Catches: a check that passes any Bearer value, or only looks at the first token;
    tokens from comment lines; a repr that shows the tokens."""
    auth = OtlpAuth((TOKEN_A, TOKEN_B))
    assert [auth.check(h) for h in (f"Bearer {TOKEN_A}", f"bearer  {TOKEN_B} ", None, "",
                                     TOKEN_A, f"Basic {TOKEN_A}", "Bearer ",
                                     f"Bearer {TOKEN_A}x", f"Bearer {TOKEN_A[:-1]}")] == \
        [None, None, "missing", "missing", "malformed", "malformed", "malformed",
         "invalid", "invalid"]
    assert OtlpAuth().check(None) is None and not OtlpAuth().enabled
    assert TOKEN_A not in repr(auth) and TOKEN_B not in repr(auth)
    f = tmp_path / "tokens"
    f.write_text(f"# rotated 2026-11\n\n  {TOKEN_A}  \n#{TOKEN_B}\n{TOKEN_B}\n")
    assert OtlpAuth.load(None, f).tokens == (TOKEN_A, TOKEN_B)
    assert OtlpAuth.load(TOKEN_B, f).tokens == (TOKEN_B, TOKEN_A)  # env first, no duplicates
    assert OtlpAuth.load("  ", None).tokens == ()
    f.write_text("# nothing\n\n")
    with pytest.raises(OtlpConfigError, match="holds no token"):
        OtlpAuth.load(None, f)
    with pytest.raises(OtlpConfigError, match="cannot read the OTLP token file"):
        OtlpAuth.load(None, tmp_path / "missing")
    with pytest.raises(OtlpConfigError, match="at least 16"):
        OtlpAuth(("short",))
    with pytest.raises(OtlpConfigError, match="characters outside") as exc:
        OtlpAuth(("has a space in it, 32 characters",))
    assert "space" not in str(exc.value)  # the token itself is never echoed


def test_non_loopback_bind_needs_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches: dropping check_bind (a 0.0.0.0 receiver open to the network), or a
    loopback test that takes 0.0.0.0, :: or a host name for loopback."""
    assert [is_loopback_host(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost",
                                          "0.0.0.0", "::", "", None, "10.0.0.5", "otlp.internal")] \
        == [True, True, True, True, True, False, False, False, False, False, False]
    for host in ("0.0.0.0", "::", "10.0.0.5", "otlp.internal"):
        with pytest.raises(OtlpConfigError, match="without authentication"):
            OtlpReceiver("127.0.0.1:9", host=host)
    OtlpReceiver("127.0.0.1:9", host="0.0.0.0", auth=OtlpAuth((TOKEN_A,)))  # allowed
    OtlpReceiver("127.0.0.1:9", host="127.0.0.1")                          # allowed
    with pytest.raises(OtlpConfigError, match="at least twice max_body"):
        OtlpReceiver("127.0.0.1:9", max_body=10 * KIB, max_inflight=19 * KIB)
    # the command: exit 2 with the reason, before any Kafka lookup
    from driftline.streams.cli.main import app
    monkeypatch.delenv("DRIFTLINE_OTLP_TOKEN", raising=False)
    monkeypatch.delenv("DRIFTLINE_OTLP_TOKEN_FILE", raising=False)
    res = CliRunner().invoke(app, ["otlp", "--host", "0.0.0.0", "--kafka", "127.0.0.1:9"])
    assert res.exit_code == 2
    assert "refusing to listen on 0.0.0.0 without authentication" in res.output
    res = CliRunner().invoke(app, ["otlp", "--tls-cert", "/nonexistent.pem"])
    assert res.exit_code == 2 and "give both or neither" in res.output


def test_token_file_reload_rotates_and_keeps_old_tokens_on_a_bad_file(tmp_path: Path) -> None:
    """SIGHUP's reload: the file's new token replaces the old; an emptied file is refused on a
    0.0.0.0 bind and the tokens in use stay. Catches: a reload that keeps the old tokens, or
    one that leaves a non-loopback receiver open after a bad edit."""
    f = tmp_path / "tokens"
    f.write_text(TOKEN_A + "\n")
    r = OtlpReceiver("127.0.0.1:9", host="0.0.0.0", auth=OtlpAuth.load(None, f))
    f.write_text(TOKEN_B + "\n")
    assert r.reload_auth(lambda: OtlpAuth.load(None, f)) is True
    assert (r.auth.check(f"Bearer {TOKEN_A}"), r.auth.check(f"Bearer {TOKEN_B}")) == ("invalid", None)
    assert r.reload_auth(lambda: OtlpAuth()) is False  # no token at all on 0.0.0.0
    f.write_text("# emptied by mistake\n")
    assert r.reload_auth(lambda: OtlpAuth.load(None, f)) is False
    assert r.auth.check(f"Bearer {TOKEN_B}") is None


def test_admission_bookkeeping() -> None:
    """Catches: a cap compared with > instead of >=; a resize that grows past the cap;
    a release that frees twice."""
    a = Admission(max_requests=2, max_bytes=100)
    r1, r2 = a.admit(40), a.admit(50)
    with pytest.raises(Overloaded) as exc:
        a.admit(0)
    assert exc.value.reason == "requests"
    r2.release()
    r2.release()  # idempotent
    assert (a.requests, a.bytes) == (1, 40)
    with pytest.raises(Overloaded) as exc:
        a.admit(61)
    assert exc.value.reason == "bytes" and (a.requests, a.bytes) == (1, 40)
    r3 = a.admit(60)  # exactly at the cap
    with pytest.raises(Overloaded):
        r3.resize(61)
    r3.resize(10)  # shrinking always works
    r1.resize(90)
    assert (a.requests, a.bytes) == (2, 100)
    r1.release()
    r3.release()
    assert (a.requests, a.bytes) == (0, 0)


# --------------------------------------------------------------------------- tokens, end to end


async def test_token_required_refused_requests_never_reach_kafka(
        kafka_bootstrap: str, topic_name: str, make_topics: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """No token, a wrong one or a malformed header: 401 and no record; either token of a
    two-line token file, and the real OTel SDK exporter configured the documented way
    (OTEL_EXPORTER_OTLP_TRACES_HEADERS=Authorization=Bearer%20<token>): 200 and exactly
    one record each. Catches: auth skipped or checked after forwarding (records from
    refused requests), only the first token of the file accepted, /metrics left open."""
    make_topics({topic_name: 1})
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN_A}\n# next key\n{TOKEN_B}\n")
    tokens.chmod(0o600)
    caplog.set_level(logging.DEBUG)
    r = OtlpReceiver(kafka_bootstrap, port=0, topic=topic_name, registry=CollectorRegistry(),
                     auth=OtlpAuth.load(None, tokens))
    await r.start()
    try:
        async with aiohttp.ClientSession(timeout=SHORT) as http:
            async with http.post(r.url, data=otlp_body("refused-none"), headers=PROTO) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"] == 'Bearer realm="driftline-otlp"'
                assert resp.headers["Content-Type"] == "application/x-protobuf"
                assert Status.FromString(await resp.read()).code == 16  # UNAUTHENTICATED
            # JSON request: the Status comes back as JSON
            async with http.post(r.url, data=b'{"resourceSpans": []}',
                                 headers={"Content-Type": "application/json",
                                          "Authorization": "Bearer wrong-token-0123456789"}
                                 ) as resp:
                assert resp.status == 401 and "invalid_token" in resp.headers["WWW-Authenticate"]
                assert (await resp.json())["code"] == 16
            async with http.post(r.url, data=otlp_body("refused-basic"),
                                 headers={**PROTO, "Authorization": f"Basic {TOKEN_A}"}) as resp:
                assert resp.status == 401
            async with http.post(r.url, data=otlp_body("accepted-a"), headers=bearer(TOKEN_A)) as resp:
                assert resp.status == 200
            async with http.post(r.url, data=otlp_body("accepted-b"), headers=bearer(TOKEN_B)) as resp:
                assert resp.status == 200
            base = f"http://127.0.0.1:{r.port}"
            async with http.get(f"{base}/healthz") as resp:
                assert resp.status == 200
            async with http.get(f"{base}/metrics") as resp:
                assert resp.status == 401
            async with http.get(f"{base}/metrics", headers=bearer(TOKEN_B)) as resp:
                assert resp.status == 200 and "driftline_otlp_requests_total" in await resp.text()
        sdk_ok, sdk_bad = await asyncio.to_thread(_sdk_exports, r.url, monkeypatch)
        assert (sdk_ok, sdk_bad) == ("SUCCESS", "FAILURE")
    finally:
        await r.stop()
    records = await read_topic(kafka_bootstrap, topic_name, 3, timeout=15)
    names = sorted(ExportTraceServiceRequest.FromString(m.value)
                   .resource_spans[0].scope_spans[0].spans[0].name for m in records)
    assert names == ["accepted-a", "accepted-b", "sdk-span"]
    reg = r.registry
    assert reg.get_sample_value("driftline_otlp_requests_total", {"code": "401"}) == 4
    assert reg.get_sample_value("driftline_otlp_requests_total", {"code": "200"}) == 3
    assert (errors(r, "auth_missing"), errors(r, "auth_invalid"), errors(r, "auth_malformed")) == \
        (2.0, 2.0, 1.0)  # missing: the POST and /metrics; invalid: wrong token, SDK's wrong one
    assert TOKEN_A not in caplog.text and TOKEN_B not in caplog.text


def _sdk_exports(url: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """One span through the SDK's OTLP/HTTP exporter with the token from the env var
    (percent-encoded space, as the OTel spec's W3C-baggage format says), then with a
    wrong token: 401 must end the export at once (not retried)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    mem = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(mem))
    tp.get_tracer("t").start_span("sdk-span").end()
    spans = mem.get_finished_spans()
    results = []
    for token in (TOKEN_B, "wrong-token-0123456789"):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", f"Authorization=Bearer%20{token}")
        exporter = OTLPSpanExporter(endpoint=url, timeout=5)
        results.append(exporter.export(spans).name)
        exporter.shutdown()
    return results[0], results[1]


async def test_token_is_checked_before_the_body_is_read_or_reserved() -> None:
    """Headers announcing 1 MB and no body: 401 at once, nothing reserved. Then with a
    token, a body that never completes: 408 after read_timeout and the slot is freed.
    Catches: auth after _read_body (no answer until the body came), a missing read
    timeout (a slow client holds a slot for ever), a reservation not released on 408."""
    r = OtlpReceiver(f"127.0.0.1:{free_port()}", port=0, registry=CollectorRegistry(),
                     auth=OtlpAuth((TOKEN_A,)), read_timeout=0.5, send_timeout=1.0)
    await r.start()
    try:
        async def status_line(auth: str, body: bytes) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
            writer.write(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/x-protobuf\r\n"
                         b"Content-Length: 1000000\r\n" + auth.encode() + b"\r\n" + body)
            await writer.drain()
            try:
                return await asyncio.wait_for(reader.readline(), 3)
            finally:
                writer.close()
                await writer.wait_closed()  # else the server lingers on it for 10 s at stop

        line = await status_line("", b"")
        assert line.startswith(b"HTTP/1.1 401"), line
        assert (r.admission.requests, r.admission.bytes) == (0, 0)
        line = await status_line(f"Authorization: Bearer {TOKEN_A}\r\n", b"\x0a\x00")
        assert line.startswith(b"HTTP/1.1 408"), line
        assert (r.admission.requests, r.admission.bytes) == (0, 0)
        assert errors(r, "read_timeout") == 1
    finally:
        await r.stop()


async def test_client_gone_mid_body_is_counted_not_logged_as_an_error(
        caplog: pytest.LogCaptureFixture) -> None:
    """A client that sends half a body and closes: the slot and bytes are released, the
    request is counted (reason client_disconnected) and nothing is logged at ERROR.
    Catches: ConnectionResetError left to aiohttp (one ERROR traceback per request)."""
    r = OtlpReceiver(f"127.0.0.1:{free_port()}", port=0, registry=CollectorRegistry(),
                     auth=OtlpAuth((TOKEN_A,)), read_timeout=5.0, send_timeout=1.0)
    await r.start()
    try:
        with caplog.at_level(logging.DEBUG):
            for _ in range(3):
                _, writer = await asyncio.open_connection("127.0.0.1", r.port)
                writer.write(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
                             b"Content-Length: 100000\r\nAuthorization: Bearer " + TOKEN_A.encode()
                             + b"\r\n\r\n" + b"\x0a" * 5000)
                await writer.drain()
                writer.close()
                await writer.wait_closed()
            deadline = asyncio.get_running_loop().time() + 5
            while errors(r, "client_disconnected") < 3 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
        assert errors(r, "client_disconnected") == 3
        assert (r.admission.requests, r.admission.bytes) == (0, 0)
        assert [rec.getMessage() for rec in caplog.records
                if rec.levelno >= logging.ERROR and not rec.name.startswith("aiokafka")] == []  # Kafka is down here
    finally:
        await r.stop()


# --------------------------------------------------------------------------- TLS


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    return cert, key


async def test_tls_round_trip(kafka_bootstrap: str, topic_name: str, make_topics: Any,
                              tmp_path: Path) -> None:
    """HTTPS with a client that trusts the test CA: 200 and one record; plain HTTP to the
    same port: no answer. Catches: ssl_context not passed to the site (plain HTTP works,
    HTTPS fails), url still saying http, TLS minimum below 1.2."""
    make_topics({topic_name: 1})
    cert, key = _self_signed(tmp_path)
    with pytest.raises(OtlpConfigError, match="give both or neither"):
        OtlpTls.from_paths(cert, None)
    with pytest.raises(OtlpConfigError, match="does not exist"):
        OtlpTls.from_paths(cert, tmp_path / "nokey.pem")
    tls = OtlpTls.from_paths(cert, key)
    assert tls is not None and tls.context().minimum_version == ssl.TLSVersion.TLSv1_2
    r = OtlpReceiver(kafka_bootstrap, port=0, topic=topic_name, registry=CollectorRegistry(),
                     auth=OtlpAuth((TOKEN_A,)), tls=tls)
    await r.start()
    try:
        assert r.url == f"https://127.0.0.1:{r.port}/v1/traces"
        client = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession(timeout=SHORT,
                                         connector=aiohttp.TCPConnector(ssl=client)) as http:
            async with http.post(r.url, data=otlp_body("over-tls"), headers=bearer(TOKEN_A)) as resp:
                assert resp.status == 200
            with pytest.raises(aiohttp.ClientError):
                async with http.post(f"http://127.0.0.1:{r.port}/v1/traces",
                                     data=otlp_body("plain"), headers=bearer(TOKEN_A)) as resp:
                    pytest.fail(f"plain HTTP answered {resp.status}")
        async with aiohttp.ClientSession(timeout=SHORT) as http:  # default trust: refused
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await http.get(f"https://127.0.0.1:{r.port}/healthz")
    finally:
        await r.stop()
    records = await read_topic(kafka_bootstrap, topic_name, 1, timeout=15)
    assert len(records) == 1 and records[0].value == otlp_body("over-tls")


# --------------------------------------------------------------------------- caps


async def test_concurrency_cap_answers_429_and_recovers(held_receiver: Any) -> None:
    """Two requests held in flight with max_concurrent=2: the third gets 429 with
    Retry-After at once (not queued); once they are answered, requests pass again.
    Catches: no concurrency check (the third hangs on the gate: client timeout), a slot
    not released when answered (the last request gets 429), no Retry-After."""
    r, gate = await held_receiver(max_concurrent=2)
    async with aiohttp.ClientSession(timeout=SHORT) as http:
        async def post(name: str) -> int:
            async with http.post(r.url, data=otlp_body(name), headers=PROTO) as resp:
                return resp.status

        held = [asyncio.create_task(post(f"HOLD-{i}")) for i in range(2)]
        await wait_for(lambda: r.admission.requests == 2, 5, lambda: str(r.admission.requests))
        assert r.registry.get_sample_value("driftline_otlp_inflight_requests") == 2
        async with http.post(r.url, data=otlp_body("third"), headers=PROTO) as resp:
            assert resp.status == 429 and resp.headers["Retry-After"] == "1"
            st = Status.FromString(await resp.read())
            assert st.code == 8 and "2 requests in flight" in st.message
        gate.set()
        assert await asyncio.gather(*held) == [200, 200]
        assert await post("fourth") == 200
    assert (r.admission.requests, r.admission.bytes) == (0, 0)
    assert errors(r, "busy_requests") == 1
    assert r.registry.get_sample_value("driftline_otlp_requests_total", {"code": "429"}) == 1


async def test_bytes_cap_counts_declared_chunked_and_gunzipped_bytes(held_receiver: Any) -> None:
    """max_body 64 KiB, max_inflight 128 KiB, two ~40 KiB requests held (about 80 KiB):
    a small request with a Content-Length fits; a small chunked one reserves max_body and
    does not; a small gzip body that inflates to 60 KiB does not. After release both pass.
    Catches: chunked bodies reserving nothing, gunzipped bytes not counted, reservations
    not released."""
    r, gate = await held_receiver(max_body=64 * KIB, max_inflight=128 * KIB)
    big = [otlp_body(f"HOLD-{i}", pad=40 * KIB) for i in range(2)]
    inflating = gzip.compress(otlp_body("inflates", pad=60 * KIB))
    assert len(inflating) < 2 * KIB

    async with aiohttp.ClientSession(timeout=SHORT) as http:
        async def post(data: Any, headers: dict[str, str] = PROTO) -> tuple[int, str]:
            async with http.post(r.url, data=data, headers=headers) as resp:
                return resp.status, resp.headers.get("Retry-After", "")

        async def chunked() -> AsyncIterator[bytes]:
            yield otlp_body("chunked")

        held = [asyncio.create_task(post(b)) for b in big]
        await wait_for(lambda: r.admission.requests == 2, 5, lambda: str(r.admission.requests))
        assert r.admission.bytes == sum(map(len, big))
        assert await post(otlp_body("small")) == (200, "")
        assert await post(chunked()) == (429, "1")
        assert await post(inflating, {**PROTO, "Content-Encoding": "gzip"}) == (429, "1")
        assert r.admission.bytes == sum(map(len, big))  # the refused ones hold nothing
        gate.set()
        assert [s for s, _ in await asyncio.gather(*held)] == [200, 200]
        assert await post(chunked()) == (200, "")
        assert await post(inflating, {**PROTO, "Content-Encoding": "gzip"}) == (200, "")
    assert (r.admission.requests, r.admission.bytes) == (0, 0)
    assert errors(r, "busy_bytes") == 2
