"""``driftline otlp``: an OTLP/HTTP trace receiver that forwards export requests to Kafka.

Apps (or an OpenTelemetry Collector) export traces with the standard OTLP/HTTP
exporter to ``http://HOST:4318/v1/traces``. Each request is checked with the
driftline decoder (:func:`driftline.schemas.otlp.decode_request`) and then written
**unchanged** (after gzip is undone) as one record to the ``otlp_spans`` topic,
with the record header ``content-type`` = ``otlp_proto`` or ``otlp_json``, which
is what the worker (and the Collector Kafka exporter) uses.

Answers follow the OTLP/HTTP specification:

=====  ===================================================================
200    ``ExportTraceServiceResponse`` in the request's encoding; when GenAI
       spans were invalid, ``partial_success`` carries ``rejected_spans`` and
       the reasons
400    undecodable payload or bad gzip; ``google.rpc.Status`` body
401    tokens are configured and the ``Authorization: Bearer <token>`` header is
       missing, malformed or matches none of them (checked before the body is
       read; ``WWW-Authenticate: Bearer``; not retried by OTLP clients)
408    the body did not arrive within ``read_timeout``
413    body (or its gunzipped form) above ``max_body``; checked against
       ``Content-Length`` before anything is read
415    ``Content-Type`` other than ``application/x-protobuf`` /
       ``application/json``, or a ``Content-Encoding`` other than gzip
429    over ``max_concurrent`` requests or ``max_inflight`` body bytes in flight,
       with ``Retry-After``; nothing is queued, the client retries
503    Kafka unavailable (connect or send failed or timed out), with
       ``Retry-After``; the client retries
=====  ===================================================================

``GET /healthz`` answers ``{"status": "ok", "kafka": "connected"|"disconnected"}``
(always open) and ``GET /metrics`` the Prometheus text of the registry passed in
(open when no token is configured, which is allowed on a loopback bind only;
otherwise it needs a token like ``/v1/traces``).

Security: :class:`OtlpAuth` (bearer tokens, required on a non-loopback bind),
:class:`OtlpTls` (HTTPS, TLS 1.2 minimum) and :class:`Admission` (caps on requests
and body bytes in flight: memory stays bounded by ``max_inflight`` plus one step
of work per request).

>>> receiver = OtlpReceiver("127.0.0.1:9092", port=0)   # doctest: +SKIP
>>> await receiver.start(); print(receiver.url)          # doctest: +SKIP
http://127.0.0.1:41234/v1/traces
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import signal
import ssl
import stat
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from google.protobuf import json_format
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from driftline.schemas.otlp import OtlpBatch, OtlpDecodeError, decode_request
from driftline.schemas.topics import OTLP_TOPIC
from driftline.streams.sinks.prometheus import OtlpMetrics

__all__ = ["DEFAULT_MAX_BODY", "DEFAULT_MAX_CONCURRENT", "DEFAULT_MAX_INFLIGHT", "TOKEN_ENV",
           "Admission", "OtlpAuth", "OtlpConfigError", "OtlpMetrics", "OtlpReceiver", "OtlpTls",
           "Overloaded", "check_bind", "is_loopback_host", "run_otlp"]

log = logging.getLogger("driftline.otlp")

DEFAULT_MAX_BODY = 16 * 1024 * 1024
DEFAULT_MAX_CONCURRENT = 64
DEFAULT_MAX_INFLIGHT = 256 * 1024 * 1024
TOKEN_ENV = "DRIFTLINE_OTLP_TOKEN"
MIN_TOKEN_LEN = 16
_CONTENT_TYPES = {"application/x-protobuf": "otlp_proto", "application/json": "otlp_json"}
_HTTP_CT = {"otlp_proto": "application/x-protobuf", "otlp_json": "application/json"}
_INLINE_DECODE = 256 * 1024  # larger payloads are decoded in a worker thread
_READ_CHUNK = 64 * 1024
_INFLATE_STEP = 1024 * 1024  # gunzipped bytes produced (and reserved) per step
# google.rpc.Code values used in Status bodies
_INVALID_ARGUMENT, _DEADLINE_EXCEEDED, _RESOURCE_EXHAUSTED = 3, 4, 8
_UNAVAILABLE, _UNAUTHENTICATED = 14, 16
# RFC 6750 b64token (token68): what a bearer token may contain
_TOKEN_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


class _HttpError(Exception):
    def __init__(self, status: int, grpc_code: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.status, self.grpc_code, self.message, self.reason = status, grpc_code, message, reason


class OtlpConfigError(ValueError):
    """A receiver setting is invalid (bad token, missing certificate, unsafe bind...)."""


# --------------------------------------------------------------------------- authentication


def is_loopback_host(host: str | None) -> bool:
    """Whether binding ``host`` listens on loopback only (``127.0.0.0/8``, ``::1``,
    ``localhost``). Any other name, and ``0.0.0.0`` / ``::`` / empty, is not."""
    if not host:
        return False
    h = host.strip().strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


@dataclass(frozen=True)
class OtlpAuth:
    """Bearer tokens accepted in ``Authorization: Bearer <token>``; any one of them passes.

    Several tokens are allowed at once so that a key can be rotated: add the new one,
    move the clients over, then remove the old one. Tokens are compared in constant time
    (SHA-256 of each, :func:`hmac.compare_digest` against every token, no early exit).
    The dataclass ``repr`` never shows them.

    Parameters
    ----------
    tokens : the accepted tokens; empty means no authentication (loopback binds only).
        Each must be at least 16 characters of RFC 6750's token alphabet
        (``A-Z a-z 0-9 - . _ ~ + /`` and trailing ``=``), for example
        ``python -c "import secrets; print(secrets.token_urlsafe(32))"``.
    """

    tokens: tuple[str, ...] = field(default=(), repr=False)
    _digests: tuple[bytes, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for i, tok in enumerate(self.tokens, 1):
            if len(tok) < MIN_TOKEN_LEN:
                raise OtlpConfigError(
                    f"OTLP token {i} is {len(tok)} characters long; use at least {MIN_TOKEN_LEN}, "
                    "e.g. python -c \"import secrets; print(secrets.token_urlsafe(32))\"")
            if not _TOKEN_RE.fullmatch(tok):
                raise OtlpConfigError(
                    f"OTLP token {i} has characters outside A-Z a-z 0-9 - . _ ~ + / (and "
                    "trailing =), which a bearer token may not contain")
        object.__setattr__(self, "_digests",
                           tuple(hashlib.sha256(t.encode()).digest() for t in self.tokens))

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    @classmethod
    def load(cls, token: str | None = None, token_file: str | os.PathLike[str] | None = None
             ) -> OtlpAuth:
        """Tokens from ``token`` (normally env ``DRIFTLINE_OTLP_TOKEN``) and from
        ``token_file`` (one per line; blank lines and ``#`` comments ignored)."""
        tokens: list[str] = []
        if token and token.strip():
            tokens.append(token.strip())
        if token_file is not None:
            path = Path(token_file)
            try:
                text = path.read_text(encoding="utf-8")
                mode = path.stat().st_mode
            except (OSError, UnicodeDecodeError) as exc:
                raise OtlpConfigError(f"cannot read the OTLP token file {path}: "
                                      f"{exc.__class__.__name__}") from None
            found = [ln.strip() for ln in text.splitlines()
                     if ln.strip() and not ln.strip().startswith("#")]
            if not found:
                raise OtlpConfigError(f"the OTLP token file {path} holds no token")
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning("driftline otlp: the token file %s is readable by group or others; "
                            "chmod 600 it", path)
            tokens.extend(found)
        return cls(tuple(dict.fromkeys(tokens)))

    def check(self, header: str | None) -> str | None:
        """``None`` when a request with this ``Authorization`` header may pass, else why
        not: ``missing``, ``malformed`` (not ``Bearer <token>``) or ``invalid``."""
        if not self._digests:
            return None
        if header is None or not header.strip():
            return "missing"
        scheme, _, credentials = header.strip().partition(" ")
        credentials = credentials.strip()
        if scheme.lower() != "bearer" or not credentials:
            return "malformed"
        given = hashlib.sha256(credentials.encode("utf-8", "replace")).digest()
        ok = False
        for digest in self._digests:  # every token, no early exit
            ok |= hmac.compare_digest(given, digest)
        return None if ok else "invalid"


def check_bind(host: str | None, auth: OtlpAuth) -> None:
    """Refuse (:class:`OtlpConfigError`) to listen beyond loopback without a token."""
    if not auth.enabled and not is_loopback_host(host):
        raise OtlpConfigError(
            f"refusing to listen on {host or 'all interfaces'} without authentication: set "
            f"{TOKEN_ENV} or --token-file (DRIFTLINE_OTLP_TOKEN_FILE), or bind 127.0.0.1")


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class OtlpTls:
    """HTTPS for the receiver: a PEM certificate (chain) and its unencrypted PEM key.

    :meth:`context` builds a server context with TLS 1.2 as the minimum version.
    """

    cert: Path
    key: Path

    def __post_init__(self) -> None:
        for what, p in (("certificate", self.cert), ("key", self.key)):
            if not Path(p).is_file():
                raise OtlpConfigError(f"the TLS {what} file {p} does not exist")

    @classmethod
    def from_paths(cls, cert: str | os.PathLike[str] | None,
                   key: str | os.PathLike[str] | None) -> OtlpTls | None:
        """Both paths, or neither (``None``: plain HTTP)."""
        if cert is None and key is None:
            return None
        if cert is None or key is None:
            raise OtlpConfigError("--tls-cert and --tls-key go together: give both or neither")
        return cls(Path(cert), Path(key))

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2

        def no_password() -> bytes:  # an encrypted key must not prompt on a terminal
            raise OtlpConfigError(f"the TLS key {self.key} is encrypted; give an unencrypted key")

        try:
            ctx.load_cert_chain(self.cert, self.key, password=no_password)
        except ssl.SSLError as exc:
            raise OtlpConfigError(f"cannot load the TLS certificate {self.cert} with key "
                                  f"{self.key}: {exc.reason or exc}") from None
        return ctx


# --------------------------------------------------------------------------- admission


class Overloaded(Exception):
    """A request over a cap; ``reason`` is ``requests`` or ``bytes``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Admission:
    """Counts requests and body bytes in flight and refuses, never queues, above the caps.

    Pure bookkeeping (no I/O, no clock, one event loop): :meth:`admit` reserves a slot
    and ``nbytes``; the returned :class:`Reservation` grows or shrinks as the body is read
    and gunzipped, and is released when the request is answered.

    >>> a = Admission(max_requests=1, max_bytes=100)
    >>> r = a.admit(60); a.requests, a.bytes
    (1, 60)
    >>> a.admit(10)
    Traceback (most recent call last):
    ...
    driftline.streams.ingest.otlp_receiver.Overloaded: 1 requests in flight, the most allowed
    >>> r.release(); a.requests, a.bytes
    (0, 0)
    """

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        if max_requests <= 0:
            raise OtlpConfigError(f"max_concurrent must be > 0, got {max_requests}")
        if max_bytes <= 0:
            raise OtlpConfigError(f"max_inflight must be > 0, got {max_bytes}")
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.requests = 0
        self.bytes = 0

    def admit(self, nbytes: int) -> Reservation:
        if self.requests >= self.max_requests:
            raise Overloaded("requests", f"{self.requests} requests in flight, the most allowed")
        self._check_bytes(nbytes)
        self.requests += 1
        self.bytes += nbytes
        return Reservation(self, nbytes)

    def _check_bytes(self, more: int) -> None:
        if more > 0 and self.bytes + more > self.max_bytes:
            raise Overloaded("bytes", f"{self.bytes} body bytes in flight; {more} more would pass "
                                      f"the cap of {self.max_bytes}")


class Reservation:
    """One admitted request's slot and bytes (see :class:`Admission`)."""

    def __init__(self, admission: Admission, nbytes: int) -> None:
        self._admission, self.held, self._open = admission, nbytes, True

    def resize(self, nbytes: int) -> None:
        """Hold ``nbytes`` from now on; :class:`Overloaded` when growing would pass the cap."""
        if not self._open:
            return
        self._admission._check_bytes(nbytes - self.held)
        self._admission.bytes += nbytes - self.held
        self.held = nbytes

    def release(self) -> None:
        if self._open:
            self._open = False
            self._admission.requests -= 1
            self._admission.bytes -= self.held
            self.held = 0


class OtlpReceiver:
    """OTLP/HTTP ``/v1/traces`` receiver writing the requests to a Kafka topic.

    Parameters
    ----------
    kafka : bootstrap servers (``host:port[,host:port]``)
    host, port : where to listen; ``port=0`` picks a free port (see :attr:`port`)
    topic : Kafka topic, ``otlp_spans`` by default
    max_body : largest accepted body in bytes, compressed and uncompressed (16 MiB)
    registry : Prometheus registry for the counters (a fresh one when ``None``)
    send_timeout : seconds to wait for Kafka to acknowledge a record before answering 503
    retry_after : seconds put in ``Retry-After`` on 503 answers
    producer_options : extra ``AIOKafkaProducer`` settings (e.g. Kafka TLS/SASL)
    auth : accepted bearer tokens (:class:`OtlpAuth`); required when ``host`` is not a
        loopback address
    tls : certificate and key for HTTPS (:class:`OtlpTls`); plain HTTP when ``None``
    max_concurrent : requests admitted at once; more are answered 429
    max_inflight : body bytes reserved at once (``Content-Length``, or ``max_body`` for a
        chunked body, then the gunzipped size); more are answered 429. At least
        ``2 * max_body``, so that a lone request always fits
    busy_retry_after : seconds put in ``Retry-After`` on 429 answers
    read_timeout : seconds an admitted request may take to send its body (else 408), so a
        stalled client cannot hold a slot; 60 s lets 16 MiB through at about 2.3 Mbit/s
    """

    def __init__(self, kafka: str, host: str = "127.0.0.1", port: int = 4318, *,
                 topic: str = OTLP_TOPIC, max_body: int = DEFAULT_MAX_BODY,
                 registry: CollectorRegistry | None = None, send_timeout: float = 10.0,
                 retry_after: int = 5, producer_options: dict[str, Any] | None = None,
                 auth: OtlpAuth | None = None, tls: OtlpTls | None = None,
                 max_concurrent: int = DEFAULT_MAX_CONCURRENT,
                 max_inflight: int = DEFAULT_MAX_INFLIGHT, busy_retry_after: int = 1,
                 read_timeout: float = 60.0) -> None:
        if max_body <= 0:
            raise OtlpConfigError(f"max_body must be > 0, got {max_body}")
        if send_timeout <= 0:
            raise OtlpConfigError(f"send_timeout must be > 0, got {send_timeout}")
        if read_timeout <= 0:
            raise OtlpConfigError(f"read_timeout must be > 0, got {read_timeout}")
        if max_inflight < 2 * max_body:
            raise OtlpConfigError(
                f"max_inflight ({max_inflight} bytes) must be at least twice max_body "
                f"({max_body} bytes): a gzipped request holds its body and the gunzipped copy")
        self.auth = auth if auth is not None else OtlpAuth()
        check_bind(host, self.auth)
        self.tls = tls
        self._ssl = tls.context() if tls is not None else None
        self._admission = Admission(max_concurrent, max_inflight)
        self.busy_retry_after, self.read_timeout = busy_retry_after, read_timeout
        self.kafka, self.host, self.topic = kafka, host, topic
        self.max_body, self.send_timeout, self.retry_after = max_body, send_timeout, retry_after
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = OtlpMetrics(self.registry)
        self.metrics.inflight_requests.set_function(lambda: self._admission.requests)
        self.metrics.inflight_bytes.set_function(lambda: self._admission.bytes)
        self._port = port
        self._producer_options = dict(producer_options or {})
        self._producer: AIOKafkaProducer | None = None
        self._producer_lock = asyncio.Lock()
        self._next_connect = 0.0
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        """The bound port (the real one once started with ``port=0``)."""
        return self._port

    @property
    def url(self) -> str:
        scheme = "https" if self._ssl is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self._port}/v1/traces"

    def set_auth(self, auth: OtlpAuth) -> None:
        """Replace the accepted tokens (a rotation); refused like at start when the new set
        would leave a non-loopback bind without a token."""
        check_bind(self.host, auth)
        self.auth = auth

    def reload_auth(self, load: Callable[[], OtlpAuth]) -> bool:
        """:meth:`set_auth` with ``load()``; on a bad token file the tokens in use are kept
        and the reason logged (without any token). Returns whether they were replaced."""
        try:
            self.set_auth(load())
        except OtlpConfigError as exc:
            log.warning("driftline otlp: tokens not reloaded, the old ones stay: %s", exc)
            return False
        log.info("driftline otlp: reloaded %d token(s)", len(self.auth.tokens))
        return True

    @property
    def admission(self) -> Admission:
        """The caps' bookkeeping (requests and bytes in flight now)."""
        return self._admission

    async def start(self) -> None:
        """Listen for HTTP; connect to Kafka (a failed connect is retried on each request)."""
        app = web.Application(client_max_size=self.max_body + 1)
        app.router.add_post("/v1/traces", self._handle_traces)
        app.router.add_get("/healthz", self._handle_health)
        app.router.add_get("/metrics", self._handle_metrics)
        # gzip is undone here, with the size limit applied to the gunzipped bytes
        self._runner = web.AppRunner(app, auto_decompress=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._port, ssl_context=self._ssl)
        await site.start()
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self._port = int(server.sockets[0].getsockname()[1])
        await self._get_producer()
        log.info("driftline otlp: listening on %s (%s), forwarding to %s topic %s (kafka %s)",
                 self.url, "bearer token required" if self.auth.enabled else "no authentication",
                 self.kafka, self.topic, "connected" if self._producer else "not reachable yet")
        if self._ssl is None and not is_loopback_host(self.host):
            log.warning("driftline otlp: %s is not loopback and TLS is off: tokens and traces "
                        "cross the network in clear; give --tls-cert/--tls-key or put a TLS "
                        "proxy in front", self.host)

    async def stop(self) -> None:
        """Stop listening, then flush and close the Kafka producer."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        p, self._producer = self._producer, None
        if p is not None:
            with contextlib.suppress(Exception):
                await p.stop()

    async def __aenter__(self) -> OtlpReceiver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _get_producer(self) -> AIOKafkaProducer | None:
        if self._producer is not None:
            return self._producer
        async with self._producer_lock:
            if self._producer is not None:
                return self._producer
            if time.monotonic() < self._next_connect:
                return None
            opts: dict[str, Any] = {
                "linger_ms": 5,
                "request_timeout_ms": int(self.send_timeout * 1000),
                "max_request_size": self.max_body + 64 * 1024,
                "acks": "all",
            }
            opts.update(self._producer_options)
            p = AIOKafkaProducer(bootstrap_servers=self.kafka, **opts)
            try:
                await asyncio.wait_for(p.start(), timeout=self.send_timeout)
            except (TimeoutError, KafkaError, OSError) as exc:
                log.warning("driftline otlp: Kafka %s not reachable: %s", self.kafka, exc)
                with contextlib.suppress(Exception):
                    await p.stop()
                self._next_connect = time.monotonic() + 1.0
                return None
            self._producer = p
            return p

    # ------------------------------------------------------------------ handlers

    async def _handle_health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"status": "ok", "kafka": "connected" if self._producer else "disconnected"})

    async def _handle_metrics(self, request: web.Request) -> web.Response:
        refused = self.auth.check(request.headers.get("Authorization"))
        if refused is not None:
            self.metrics.errors.labels(f"auth_{refused}").inc()
            return web.Response(status=401, text="a bearer token is required\n",
                                headers={"WWW-Authenticate": _www_authenticate(refused)})
        resp = web.Response(body=generate_latest(self.registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def _handle_traces(self, request: web.Request) -> web.Response:
        encoding = _CONTENT_TYPES.get(request.content_type)
        held: Reservation | None = None
        try:
            # the token is checked before anything of the body is read or reserved
            refused = self.auth.check(request.headers.get("Authorization"))
            if refused is not None:
                raise _HttpError(401, _UNAUTHENTICATED,
                                 "a valid bearer token is required (Authorization: Bearer <token>)",
                                 f"auth_{refused}")
            if encoding is None:
                raise _HttpError(415, _INVALID_ARGUMENT,
                                 f"unsupported Content-Type {request.content_type!r}; use "
                                 "application/x-protobuf or application/json", "content_type")
            coding = self._check_headers(request)
            try:  # reserve the declared length (chunked: max_body) before reading
                held = self._admission.admit(
                    request.content_length if request.content_length is not None
                    else self.max_body)
            except Overloaded as exc:
                raise _busy(exc) from None
            body = await self._read_body(request, coding, held)
            batch = await self._decode(body, encoding)
            await self._forward(body, encoding)
        except _HttpError as err:
            self.metrics.errors.labels(err.reason).inc()
            self.metrics.requests.labels(str(err.status)).inc()
            return self._status_response(err, encoding or "otlp_json")
        finally:
            if held is not None:
                held.release()
        self.metrics.requests.labels("200").inc()
        self.metrics.spans_accepted.inc(len(batch.events))
        self.metrics.spans_rejected.inc(len(batch.rejected))
        self.metrics.spans_skipped.inc(batch.skipped_non_genai + batch.skipped_non_model)
        return self._success_response(batch, encoding)

    def _check_headers(self, request: web.Request) -> str:
        """413 on a declared length above ``max_body``, 415 on an unknown encoding."""
        if request.content_length is not None and request.content_length > self.max_body:
            raise _too_large(self.max_body, "request body")
        coding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if coding not in ("identity", "", "gzip"):
            raise _HttpError(415, _INVALID_ARGUMENT,
                             f"unsupported Content-Encoding {coding!r}; use gzip or none",
                             "content_encoding")
        return coding

    async def _read_body(self, request: web.Request, coding: str, held: Reservation) -> bytes:
        limit = self.max_body
        buf = bytearray()
        try:
            async with asyncio.timeout(self.read_timeout):
                async for chunk in request.content.iter_chunked(_READ_CHUNK):
                    buf += chunk
                    if len(buf) > limit:
                        raise _too_large(limit, "request body")
        except TimeoutError:
            raise _HttpError(408, _DEADLINE_EXCEEDED,
                             f"the body did not arrive within {self.read_timeout:g} s",
                             "read_timeout") from None
        except ConnectionResetError:
            # the client went away mid-body: counted, never a traceback at ERROR per request
            # (aiohttp logs one for an exception out of the handler; a token holder could fill the log)
            raise _HttpError(400, _INVALID_ARGUMENT, "the client closed the connection mid-body",
                             "client_disconnected") from None
        held.resize(len(buf))  # a chunked body reserved max_body: keep what it is
        if coding != "gzip":
            return bytes(buf)
        # gunzip step by step, reserving each step's output before taking the next
        d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        out = bytearray()
        try:
            pending: bytes | memoryview = memoryview(buf)
            while pending and not d.eof:
                out += d.decompress(pending, _INFLATE_STEP)
                pending = d.unconsumed_tail
                if len(out) > limit:
                    raise _too_large(limit, "gunzipped request body")
                try:
                    held.resize(len(buf) + len(out))
                except Overloaded as exc:
                    raise _busy(exc) from None
            if not d.eof:
                raise _HttpError(400, _INVALID_ARGUMENT, "gzip body is truncated", "gzip")
        except zlib.error as exc:
            raise _HttpError(400, _INVALID_ARGUMENT, f"bad gzip body: {exc}", "gzip") from None
        del buf, pending
        held.resize(len(out))
        return bytes(out)

    async def _decode(self, body: bytes, encoding: str) -> OtlpBatch:
        try:
            if len(body) > _INLINE_DECODE:
                return await asyncio.to_thread(decode_request, body, encoding)
            return decode_request(body, encoding)
        except OtlpDecodeError as exc:
            raise _HttpError(400, _INVALID_ARGUMENT, exc.reason, "decode") from None

    async def _forward(self, body: bytes, encoding: str) -> None:
        unavailable = _HttpError(503, _UNAVAILABLE, f"Kafka {self.kafka} is unavailable",
                                 "kafka_unavailable")
        producer = await self._get_producer()
        if producer is None:
            raise unavailable
        try:
            await asyncio.wait_for(
                producer.send_and_wait(self.topic, body,
                                       headers=[("content-type", encoding.encode())]),
                timeout=self.send_timeout)
        except MessageSizeTooLargeError as exc:
            raise _HttpError(413, _RESOURCE_EXHAUSTED, f"Kafka refused the record size: {exc}",
                             "too_large") from None
        except (TimeoutError, KafkaError, OSError) as exc:
            log.warning("driftline otlp: send to %s failed: %r", self.topic, exc)
            raise unavailable from None

    # ------------------------------------------------------------------ responses

    def _success_response(self, batch: OtlpBatch, encoding: str) -> web.Response:
        msg = ExportTraceServiceResponse()
        if batch.rejected:
            reasons = "; ".join(f"{r.span_name or r.span_id}: {r.reason}" for r in batch.rejected[:3])
            more = f" (and {len(batch.rejected) - 3} more)" if len(batch.rejected) > 3 else ""
            msg.partial_success.rejected_spans = len(batch.rejected)
            msg.partial_success.error_message = (
                f"{len(batch.rejected)} GenAI span(s) rejected: {reasons}{more}")
        return _encoded(msg, encoding, 200)

    def _status_response(self, err: _HttpError, encoding: str) -> web.Response:
        resp = _encoded(Status(code=err.grpc_code, message=err.message), encoding, err.status)
        if err.status == 503:
            resp.headers["Retry-After"] = str(self.retry_after)
        elif err.status == 429:
            resp.headers["Retry-After"] = str(self.busy_retry_after)
        elif err.status == 401:
            resp.headers["WWW-Authenticate"] = _www_authenticate(err.reason.removeprefix("auth_"))
        return resp


def _too_large(limit: int, what: str) -> _HttpError:
    return _HttpError(413, _RESOURCE_EXHAUSTED, f"{what} is larger than {limit} bytes", "too_large")


def _busy(exc: Overloaded) -> _HttpError:
    return _HttpError(429, _RESOURCE_EXHAUSTED, f"the receiver is busy: {exc}; retry later",
                      f"busy_{exc.reason}")


def _www_authenticate(reason: str) -> str:
    # RFC 6750 section 3: no error code when no credentials were sent
    if reason == "missing":
        return 'Bearer realm="driftline-otlp"'
    return 'Bearer realm="driftline-otlp", error="invalid_token"'


def _encoded(msg: Any, encoding: str, status: int) -> web.Response:
    if encoding == "otlp_json":
        body = json_format.MessageToJson(msg, indent=None).encode()
    else:
        body = msg.SerializeToString()
    resp = web.Response(body=body, status=status)
    resp.headers["Content-Type"] = _HTTP_CT[encoding]
    return resp


def run_otlp(kafka: str, host: str = "127.0.0.1", port: int = 4318, topic: str = OTLP_TOPIC,
             max_body: int = DEFAULT_MAX_BODY, registry: CollectorRegistry | None = None, *,
             auth: OtlpAuth | None = None, tls: OtlpTls | None = None,
             max_concurrent: int = DEFAULT_MAX_CONCURRENT,
             max_inflight: int = DEFAULT_MAX_INFLIGHT,
             load_auth: Callable[[], OtlpAuth] | None = None, read_timeout: float = 60.0,
             producer_options: dict[str, Any] | None = None) -> None:
    """Run the receiver until SIGINT/SIGTERM (blocking; for ``driftline otlp``).

    Bad settings (an unsafe bind, a bad token, a missing certificate) raise
    :class:`OtlpConfigError` before anything listens. With ``load_auth``, SIGHUP reloads
    the tokens from it (see :meth:`OtlpReceiver.reload_auth`). ``producer_options``: extra
    aiokafka producer options (the CLI passes Kafka TLS / SASL here).
    """
    receiver = OtlpReceiver(kafka, host, port, topic=topic, max_body=max_body,
                            registry=registry, auth=auth, tls=tls,
                            max_concurrent=max_concurrent, max_inflight=max_inflight,
                            read_timeout=read_timeout, producer_options=producer_options)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        if load_auth is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGHUP, receiver.reload_auth, load_auth)
        await receiver.start()
        try:
            await stop.wait()
        finally:
            await receiver.stop()

    asyncio.run(main())
