"""Hosting a worker: lifecycle, signals, ``/metrics`` + ``/healthz``, and the SQL endpoint.

Records reach the worker through its own batched aiokafka consumer group (see
streams/worker.py for the measurement behind that choice). The worker is
hosted by plain asyncio: a faust ``App`` shell was tried, but faust starts app
tasks only after its own consumer group has joined, which stalled the start
(see the README's "Known gaps").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from driftline.streams.metrics import WorkerMetrics
from driftline.streams.sinks import chdb_path
from driftline.streams.worker import Stage, Worker, WorkerConfig

log = logging.getLogger("driftline.app")

__all__ = ["serve_worker", "run_worker"]


async def serve_worker(cfg: WorkerConfig, stop: asyncio.Event, *, web_host: str = "127.0.0.1",
                       web_port: int = 9464, sql_port: int | None = 8123,
                       on_ready: Any = None, stages: Any = (),
                       registry: CollectorRegistry | None = None) -> Worker:
    """Run a worker with its HTTP ports until ``stop`` is set.

    ``stages`` are :class:`~driftline.streams.worker.Stage` objects, or callables
    ``(registry) -> Stage`` so a stage can register its own metrics on the worker's
    ``/metrics``.
    """
    registry = registry or CollectorRegistry()
    built: list[Stage] = [s if isinstance(s, Stage) else s(registry) for s in stages]
    worker = Worker(cfg, WorkerMetrics(registry), stages=built)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": worker.started.is_set(), "processed_records": worker.processed_records,
                                  "stored_events": worker.stored_events, "dead_lettered": worker.dead_lettered})

    webapp = web.Application()
    webapp.router.add_get("/metrics", metrics)
    webapp.router.add_get("/healthz", healthz)
    runner = web.AppRunner(webapp, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, web_host, web_port).start()
    endpoint = None
    path = chdb_path(cfg.clickhouse)
    try:
        if path is not None and sql_port is not None:
            from driftline.streams.chserver import ClickHouseEndpoint

            endpoint = ClickHouseEndpoint(worker.sink, port=sql_port)
            await endpoint.start(path)
        if on_ready is not None:
            on_ready(worker)
        log.info("metrics on http://%s:%d/metrics", web_host, web_port)
        await worker.run(stop)
    finally:
        if endpoint is not None:
            await endpoint.stop()
        await runner.cleanup()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(worker.sink.close)
    return worker


def run_worker(cfg: WorkerConfig, *, web_host: str = "127.0.0.1", web_port: int = 9464,
               sql_port: int | None = 8123, loglevel: str = "info", stages: Any = ()) -> None:
    """Run the worker in the foreground until SIGINT/SIGTERM; in-flight data is written first."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_worker(cfg, stop, web_host=web_host, web_port=web_port, sql_port=sql_port,
                           stages=stages)

    asyncio.run(main())
