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
413    body (or its gunzipped form) above ``max_body``; checked against
       ``Content-Length`` before anything is read
415    ``Content-Type`` other than ``application/x-protobuf`` /
       ``application/json``, or a ``Content-Encoding`` other than gzip
503    Kafka unavailable (connect or send failed or timed out), with
       ``Retry-After``; the client retries
=====  ===================================================================

``GET /healthz`` answers ``{"status": "ok", "kafka": "connected"|"disconnected"}``
and ``GET /metrics`` the Prometheus text of the registry passed in.

>>> receiver = OtlpReceiver("127.0.0.1:9092", port=0)   # doctest: +SKIP
>>> await receiver.start(); print(receiver.url)          # doctest: +SKIP
http://127.0.0.1:41234/v1/traces
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import zlib
from typing import Any

from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from google.protobuf import json_format
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from driftline.schemas.otlp import OtlpBatch, OtlpDecodeError, decode_request

__all__ = ["DEFAULT_MAX_BODY", "OtlpMetrics", "OtlpReceiver", "run_otlp"]

log = logging.getLogger("driftline.otlp")

DEFAULT_MAX_BODY = 16 * 1024 * 1024
_CONTENT_TYPES = {"application/x-protobuf": "otlp_proto", "application/json": "otlp_json"}
_HTTP_CT = {"otlp_proto": "application/x-protobuf", "otlp_json": "application/json"}
_INLINE_DECODE = 256 * 1024  # larger payloads are decoded in a worker thread
_READ_CHUNK = 64 * 1024
# google.rpc.Code values used in Status bodies
_INVALID_ARGUMENT, _RESOURCE_EXHAUSTED, _UNAVAILABLE = 3, 8, 14


class OtlpMetrics:
    """The receiver's counters, all defined here on the registry passed in."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("driftline_otlp_requests", "OTLP/HTTP requests by response code",
                                ["code"], registry=registry)
        self.spans_accepted = Counter("driftline_otlp_spans_accepted",
                                      "GenAI spans mapped to LLMEvents and forwarded",
                                      registry=registry)
        self.spans_rejected = Counter("driftline_otlp_spans_rejected",
                                      "GenAI spans rejected for bad attributes", registry=registry)
        self.spans_skipped = Counter("driftline_otlp_spans_skipped",
                                     "spans that are not GenAI model calls", registry=registry)
        self.errors = Counter("driftline_otlp_errors", "failed requests by reason", ["reason"],
                              registry=registry)


class _HttpError(Exception):
    def __init__(self, status: int, grpc_code: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.status, self.grpc_code, self.message, self.reason = status, grpc_code, message, reason


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
    """

    def __init__(self, kafka: str, host: str = "127.0.0.1", port: int = 4318, *,
                 topic: str = "otlp_spans", max_body: int = DEFAULT_MAX_BODY,
                 registry: CollectorRegistry | None = None, send_timeout: float = 10.0,
                 retry_after: int = 5, producer_options: dict[str, Any] | None = None) -> None:
        if max_body <= 0:
            raise ValueError(f"max_body must be > 0, got {max_body}")
        if send_timeout <= 0:
            raise ValueError(f"send_timeout must be > 0, got {send_timeout}")
        self.kafka, self.host, self.topic = kafka, host, topic
        self.max_body, self.send_timeout, self.retry_after = max_body, send_timeout, retry_after
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = OtlpMetrics(self.registry)
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
        return f"http://{self.host}:{self._port}/v1/traces"

    async def start(self) -> None:
        """Listen for HTTP; connect to Kafka (a failed connect is retried on each request)."""
        app = web.Application(client_max_size=self.max_body + 1)
        app.router.add_post("/v1/traces", self._handle_traces)
        app.router.add_get("/healthz", self._handle_health)
        app.router.add_get("/metrics", self._handle_metrics)
        # gzip is undone here, with the size limit applied to the gunzipped bytes
        self._runner = web.AppRunner(app, auto_decompress=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._port)
        await site.start()
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self._port = int(server.sockets[0].getsockname()[1])
        await self._get_producer()
        log.info("driftline otlp: listening on %s, forwarding to %s topic %s (kafka %s)",
                 self.url, self.kafka, self.topic,
                 "connected" if self._producer else "not reachable yet")

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
        resp = web.Response(body=generate_latest(self.registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def _handle_traces(self, request: web.Request) -> web.Response:
        encoding = _CONTENT_TYPES.get(request.content_type)
        try:
            if encoding is None:
                raise _HttpError(415, _INVALID_ARGUMENT,
                                 f"unsupported Content-Type {request.content_type!r}; use "
                                 "application/x-protobuf or application/json", "content_type")
            body = await self._read_body(request)
            batch = await self._decode(body, encoding)
            await self._forward(body, encoding)
        except _HttpError as err:
            self.metrics.errors.labels(err.reason).inc()
            self.metrics.requests.labels(str(err.status)).inc()
            return self._status_response(err, encoding or "otlp_json")
        self.metrics.requests.labels("200").inc()
        self.metrics.spans_accepted.inc(len(batch.events))
        self.metrics.spans_rejected.inc(len(batch.rejected))
        self.metrics.spans_skipped.inc(batch.skipped_non_genai + batch.skipped_non_model)
        return self._success_response(batch, encoding)

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.max_body
        too_large = _HttpError(413, _RESOURCE_EXHAUSTED,
                               f"request body is larger than {limit} bytes", "too_large")
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        coding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if coding not in ("identity", "", "gzip"):
            raise _HttpError(415, _INVALID_ARGUMENT,
                             f"unsupported Content-Encoding {coding!r}; use gzip or none",
                             "content_encoding")
        buf = bytearray()
        async for chunk in request.content.iter_chunked(_READ_CHUNK):
            buf += chunk
            if len(buf) > limit:
                raise too_large
        if coding != "gzip":
            return bytes(buf)
        d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            out = d.decompress(bytes(buf), limit + 1)
            if len(out) > limit or d.unconsumed_tail:
                raise _HttpError(413, _RESOURCE_EXHAUSTED,
                                 f"gunzipped request body is larger than {limit} bytes",
                                 "too_large")
            if not d.eof:
                raise _HttpError(400, _INVALID_ARGUMENT, "gzip body is truncated", "gzip")
        except zlib.error as exc:
            raise _HttpError(400, _INVALID_ARGUMENT, f"bad gzip body: {exc}", "gzip") from None
        return out

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
        return resp


def _encoded(msg: Any, encoding: str, status: int) -> web.Response:
    if encoding == "otlp_json":
        body = json_format.MessageToJson(msg, indent=None).encode()
    else:
        body = msg.SerializeToString()
    resp = web.Response(body=body, status=status)
    resp.headers["Content-Type"] = _HTTP_CT[encoding]
    return resp


def run_otlp(kafka: str, host: str = "127.0.0.1", port: int = 4318, topic: str = "otlp_spans",
             max_body: int = DEFAULT_MAX_BODY, registry: CollectorRegistry | None = None,
             producer_options: dict[str, Any] | None = None) -> None:
    """Run the receiver until SIGINT/SIGTERM (blocking; for ``driftline otlp``).
    ``producer_options``: extra aiokafka producer options (the CLI passes TLS / SASL here)."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        receiver = OtlpReceiver(kafka, host, port, topic=topic, max_body=max_body,
                                registry=registry, producer_options=producer_options)
        await receiver.start()
        try:
            await stop.wait()
        finally:
            await receiver.stop()

    asyncio.run(main())
