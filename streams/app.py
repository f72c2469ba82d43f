"""Hosting a worker in a faust-streaming ``App``: lifecycle, control topic, ``/metrics``.

The faust ``App`` owns the process: it starts and stops the services. The spine
(streams/worker.py) runs as a ``mode.Service`` of the app: records reach it through
its own batched consumer group (librdkafka or aiokafka), because faust's per-record dispatch
(``stream.take``) peaks near 5,000 records/s here while the spine must move 25,000.
Stages (alerting, drift) run inside the spine. ``driftline.control`` (JSON commands
such as ``{"cmd": "flush"}``, broadcast to every worker) is read by ONE consumer
without a group (streams/ingest/control.py), started once the stages are, that hands
each command to its subscribers (streams/wiring.py ``control_subscriptions``: flush to
the worker, baseline to the drift stage). Besides faust: an aiohttp server for
``/metrics`` and ``/healthz``, and, on an embedded chDB store, the ClickHouse-HTTP
endpoint for other processes.

Tansu, like Kafka, holds a new consumer group open for about half the session
timeout before it assigns partitions, so the spine's group uses a short session
timeout (``WorkerConfig.session_timeout_ms``); the control consumer has no group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import tempfile
import uuid
from typing import Any

import faust
import mode
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from driftline.schemas.topics import CONTROL_TOPIC
from driftline.streams.ingest.control import ControlConsumer, handle_control
from driftline.streams.ports import KafkaPort
from driftline.streams.sinks.clickhouse import chdb_path
from driftline.streams.sinks.prometheus import refused_counter
from driftline.streams.wiring import build_worker, control_subscriptions
from driftline.streams.worker import Worker, WorkerConfig

log = logging.getLogger("driftline.app")

__all__ = ["serve_worker", "run_worker", "handle_control"]


class SpineService(mode.Service):
    """The spine worker as a service of the faust app: started with it, drained on stop."""

    def __init__(self, worker: Worker, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.worker = worker
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def on_start(self) -> None:
        self._task = asyncio.create_task(self.worker.run(self._stop), name="driftline-spine")

    async def on_stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task  # in-flight data is written and committed first

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task


def make_app(worker: Worker) -> tuple[faust.App, SpineService]:
    """The faust app hosting ``worker``: the spine service (the control topic has its own
    consumer, streams/ingest/control.py)."""
    cfg = worker.cfg
    # faust keeps table state under ``datadir`` (``<app id>-data`` in the working
    # directory by default); the app has no tables and a fresh id per run,
    # so it gets a private temporary directory, removed when the worker stops.
    app = faust.App(
        f"{cfg.group_id}-control-{uuid.uuid4().hex[:8]}", broker=f"kafka://{cfg.kafka}",
        datadir=tempfile.mkdtemp(prefix="driftline-faust-"), web_enabled=False,
        topic_disable_leader=True, store="memory://",
        broker_session_timeout=6.0, broker_heartbeat_interval=1.0,
        consumer_auto_offset_reset="latest", topic_allow_declare=False,
        **cfg.kafka_security.faust_kwargs(),
    )
    return app, SpineService(worker)


async def _control_when_started(worker: Worker, control: ControlConsumer) -> None:
    """Start the control consumer once the worker's stages have started (the drift stage
    knows then which baseline commands it applied before)."""
    await worker.started.wait()
    await control.start()


def log_control_trust(cfg: WorkerConfig) -> None:
    """Say at start whether control commands are authenticated (never the secret)."""
    if cfg.control_secret is None:
        log.warning("control commands on %s are not authenticated: anyone who can write that topic "
                    "can flush the workers and rebase, pin or reset drift references (set "
                    "DRIFTLINE_CONTROL_SECRET or --control-secret-file to require signed commands)",
                    CONTROL_TOPIC)
    else:
        log.info("control commands on %s must be signed (HMAC-SHA256)", CONTROL_TOPIC)


async def _stop_control(starting: asyncio.Task[None], control: ControlConsumer) -> None:
    starting.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await starting
    await control.stop()


async def _serve_metrics(worker: Worker, registry: CollectorRegistry, web_host: str, web_port: int,
                         creds: Any, on_failure: Any, ui: bool = False) -> web.AppRunner:
    """``/metrics`` and ``/healthz`` on ``web_host:web_port`` (see :func:`serve_worker` for
    who must authenticate), and with ``ui`` the page (streams/ui/server.py, always behind
    ``creds``); returns the runner to clean up."""
    from driftline.streams.auth import allowed_hosts, guard_for_bind, is_loopback

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": worker.started.is_set(), "processed_records": worker.processed_records,
                                  "stored_events": worker.stored_events, "dead_lettered": worker.dead_lettered})

    guard = guard_for_bind(web_host, creds, on_failure=on_failure, always=("/ui",) if ui else ())
    webapp = web.Application(middlewares=[guard.middleware])
    webapp.router.add_get("/metrics", metrics)
    webapp.router.add_get("/healthz", healthz)
    if ui:  # the page's queries run on the sink's query lane, never the ingest lane
        from driftline.streams.ui.server import add_ui

        add_ui(webapp, worker.sink.acall, worker.sink.database)
    runner = web.AppRunner(webapp, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, web_host, web_port)
    await site.start()
    if is_loopback(web_host):  # loopback: no password, but only this server's own names as Host
        server = getattr(site, "_server", None)
        port = int(server.sockets[0].getsockname()[1]) if web_port == 0 and server and server.sockets else web_port
        guard.hosts = allowed_hosts(web_host, port)
    return runner


async def serve_worker(cfg: WorkerConfig, stop: asyncio.Event, *, web_host: str = "127.0.0.1",
                       web_port: int = 9464, sql_port: int | None = 8123,
                       on_ready: Any = None, stages: Any = (),
                       registry: CollectorRegistry | None = None, sql: Any = None, ui: bool = True) -> Worker:
    """Run a worker in its faust app, with its HTTP ports, until ``stop`` is set.

    ``stages`` are :class:`~driftline.streams.worker.Stage` objects, or callables
    ``(registry) -> Stage`` so a stage can register its own metrics on the worker's
    ``/metrics`` (``wiring.stage_factories`` makes those of ``driftline worker``); the
    worker and its stages are built and linked by ``wiring.build_worker``. ``sql``:
    :class:`~driftline.streams.local.sql_endpoint.EndpointOptions` of the SQL endpoint (served
    on an embedded chDB store when ``sql_port`` is set).

    The SQL endpoint always asks for credentials (streams/auth.py); the ``/metrics``
    port only on a non-loopback ``web_host`` (Prometheus scrapes loopback without
    credentials and sends ``basic_auth`` when the port is exposed; on loopback the
    ``Host`` header is checked instead, against DNS rebinding). ``/healthz`` stays open.
    ``ui``: the page ``/ui`` on the same port, which asks for the SQL endpoint's credentials
    on loopback too (streams/ui/server.py).
    """
    from driftline.streams.auth import credentials_path, is_loopback, load_credentials
    from driftline.streams.local.sql_endpoint import EndpointOptions

    sql = sql or EndpointOptions()
    path = chdb_path(cfg.clickhouse)
    serve_sql = path is not None and sql_port is not None
    creds = (load_credentials(credentials_path(path), users=sql.users, password_file=sql.password_file)
             if serve_sql or ui or not is_loopback(web_host) else None)
    registry = registry or CollectorRegistry()
    refused = refused_counter(registry)
    worker = build_worker(cfg, registry, stages)  # streams/wiring.py: the pipeline

    runner = await _serve_metrics(worker, registry, web_host, web_port, creds, refused("metrics"), ui=ui)
    endpoint = None
    app: faust.App | None = None
    control: ControlConsumer | None = None
    control_start: asyncio.Task[None] | None = None
    try:
        if serve_sql:
            from driftline.streams.local.sql_endpoint import ClickHouseEndpoint

            assert creds is not None and path is not None and sql_port is not None
            endpoint = ClickHouseEndpoint(worker.sink, host=sql.host, port=sql_port, credentials=creds,
                                          limits=sql.limits, allow_writes=sql.allow_writes,
                                          extra_hosts=sql.extra_hosts, on_auth_failure=refused("sql"),
                                          allow_workers=sql.allow_workers)
            await endpoint.start(path)
        if cfg.create_topics:
            from driftline.streams.local.broker import ensure_topics

            await asyncio.to_thread(ensure_topics, cfg.kafka, {CONTROL_TOPIC: 1}, security=cfg.kafka_security)
        log_control_trust(cfg)
        app, spine = make_app(worker)
        control = ControlConsumer(KafkaPort(cfg.kafka, cfg.kafka_security), control_subscriptions(worker))
        control_start = asyncio.create_task(_control_when_started(worker, control))
        await spine.start()  # the spine's group join overlaps the app's
        await app.start()
        if on_ready is not None:
            on_ready(worker)
        log.info("metrics on http://%s:%d/metrics", web_host, web_port)
        if ui:
            log.info("page on http://%s:%d/ui/ (user driftline, password in %s)", web_host, web_port,
                     getattr(creds, "source", "?"))
        stopped = asyncio.create_task(stop.wait())
        assert spine.task is not None
        await asyncio.wait({stopped, spine.task}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if spine.task.done():
            spine.task.result()  # a crash of the spine surfaces here
        await _stop_control(control_start, control)  # no command reaches a stopping stage
        await spine.stop()
    finally:
        if control_start is not None and control is not None:
            await _stop_control(control_start, control)
        if app is not None:
            with contextlib.suppress(Exception):
                await app.stop()
            shutil.rmtree(str(app.conf.datadir), ignore_errors=True)
        if endpoint is not None:
            await endpoint.stop()
        await runner.cleanup()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(worker.sink.close)
    return worker


def run_worker(cfg: WorkerConfig, *, web_host: str = "127.0.0.1", web_port: int = 9464,
               sql_port: int | None = 8123, loglevel: str = "info", stages: Any = (), sql: Any = None,
               ui: bool = True) -> None:
    """Run the worker in the foreground until SIGINT/SIGTERM; in-flight data is written first."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_worker(cfg, stop, web_host=web_host, web_port=web_port, sql_port=sql_port,
                           stages=stages, sql=sql, ui=ui)

    asyncio.run(main())
