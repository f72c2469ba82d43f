"""Kafka TLS and SASL settings, one validated value mapped to every Kafka client driftline uses.

driftline talks to Kafka through four libraries: aiokafka (the worker's consumers and
DLQ producer, ``emit``, the OTLP receiver, :class:`~driftline.streams.ingest.emitter.LLMEventEmitter`),
kafka-python (topic creation, ``baseline`` commands), faust (the control agent) and, in
tests and benchmarks, confluent-kafka (librdkafka). Each spells the same settings
differently; :class:`KafkaSecurity` holds them once and maps them:

==================  ===========================  ===========================  ===============================
setting             aiokafka                     kafka-python                 librdkafka (confluent-kafka)
==================  ===========================  ===========================  ===============================
protocol            ``security_protocol``        ``security_protocol``        ``security.protocol``
SASL mechanism      ``sasl_mechanism``           ``sasl_mechanism``           ``sasl.mechanisms``
user / password     ``sasl_plain_username/...``  ``sasl_plain_username/...``  ``sasl.username/password``
CA / cert / key     ``ssl_context``              ``ssl_cafile/certfile/...``  ``ssl.ca/certificate/key.location``
==================  ===========================  ===========================  ===============================

faust takes ``broker_credentials`` (:class:`faust.SSLCredentials` or
:class:`faust.SASLCredentials`), which its aiokafka transport turns into the aiokafka
settings above (``faust/transport/drivers/aiokafka.py: credentials_to_aiokafka_auth``).

The password never appears in ``repr``, logs or errors; on the command line it comes
from ``DRIFTLINE_KAFKA_PASSWORD`` or ``--kafka-password-file``, never from argv.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["KafkaSecurity", "SECURITY_PROTOCOLS", "SASL_MECHANISMS", "PASSWORD_ENV"]

log = logging.getLogger("driftline.kafka")

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
#: environment variable the password is read from when no password file is given
PASSWORD_ENV = "DRIFTLINE_KAFKA_PASSWORD"

_warned_cleartext: set[str] = set()


def _readable(path: str, what: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ValueError(f"{what} {path!r} is not readable: {exc.strerror or exc}") from None


def _no_key_password() -> str:
    # without this, OpenSSL would prompt on the terminal for an encrypted key's passphrase
    raise ValueError("the client key is encrypted: give an unencrypted key file (keep it owner-only)")


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class KafkaSecurity:
    """How driftline's Kafka clients connect: plain TCP, TLS, SASL, or SASL over TLS.

    Parameters
    ----------
    security_protocol : ``PLAINTEXT`` (default), ``SSL``, ``SASL_PLAINTEXT`` or ``SASL_SSL``
    sasl_mechanism : ``PLAIN``, ``SCRAM-SHA-256`` or ``SCRAM-SHA-512``; only with a
        ``SASL_*`` protocol, where it defaults to ``PLAIN`` (as in the Kafka clients)
    username, password : the SASL credentials (required with ``SASL_*``, refused otherwise)
    ssl_cafile : PEM bundle of the CAs that sign the brokers' certificates (default: the
        system's trust store); only with ``SSL`` / ``SASL_SSL``
    ssl_certfile, ssl_keyfile : the client certificate and its key (mutual TLS); the key
        may also be inside ``ssl_certfile``
    ssl_check_hostname : check that the broker's certificate names the host connected to

    Raises
    ------
    ValueError
        On an unknown protocol or mechanism, a mechanism or credentials without SASL,
        SASL without a user or password, TLS files without TLS or that cannot be read.

    Examples
    --------
    >>> s = KafkaSecurity("SASL_PLAINTEXT", "SCRAM-SHA-512", username="app", password="pw")
    >>> s
    KafkaSecurity(security_protocol='SASL_PLAINTEXT', sasl_mechanism='SCRAM-SHA-512', username='app', password=***)
    >>> sorted(s.kafka_python_kwargs())
    ['sasl_mechanism', 'sasl_plain_password', 'sasl_plain_username', 'security_protocol']
    """

    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False, compare=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True

    def __post_init__(self) -> None:
        proto = (self.security_protocol or "").strip().upper()
        if proto not in SECURITY_PROTOCOLS:
            raise ValueError(f"Kafka security protocol must be one of {', '.join(SECURITY_PROTOCOLS)}, "
                             f"got {self.security_protocol!r}")
        object.__setattr__(self, "security_protocol", proto)
        mech = self.sasl_mechanism.strip().upper() if self.sasl_mechanism else None
        if self.sasl:
            mech = mech or "PLAIN"
            if mech not in SASL_MECHANISMS:
                raise ValueError(f"SASL mechanism must be one of {', '.join(SASL_MECHANISMS)}, got "
                                 f"{self.sasl_mechanism!r}")
            if not self.username or not self.password:
                missing = " and ".join(w for w, v in (("a user", self.username), ("a password", self.password))
                                       if not v)
                raise ValueError(f"{proto} needs {missing} (--kafka-user; the password from "
                                 f"{PASSWORD_ENV} or --kafka-password-file)")
        else:
            if mech is not None:
                raise ValueError(f"a SASL mechanism ({mech}) needs security protocol SASL_PLAINTEXT or "
                                 f"SASL_SSL, not {proto}")
            if self.username or self.password:
                raise ValueError(f"Kafka credentials are only sent with SASL_PLAINTEXT or SASL_SSL, "
                                 f"not {proto}")
        object.__setattr__(self, "sasl_mechanism", mech)
        files = (("CA file", self.ssl_cafile), ("client certificate", self.ssl_certfile),
                 ("client key", self.ssl_keyfile))
        if not self.tls:
            given = [w for w, v in files if v]
            if given:
                raise ValueError(f"{', '.join(given)} given but the security protocol {proto} does not use "
                                 "TLS (use SSL or SASL_SSL)")
        else:
            if self.ssl_keyfile and not self.ssl_certfile:
                raise ValueError("a client key needs its client certificate (--kafka-cert)")
            for what, path in files:
                if path:
                    _readable(path, what)
            try:  # a file that is not PEM, or a key that does not match its certificate
                self.ssl_context()
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(f"the Kafka TLS files do not load: {exc}") from None

    # ------------------------------------------------------------------ properties
    @property
    def sasl(self) -> bool:
        """True for ``SASL_PLAINTEXT`` and ``SASL_SSL``."""
        return self.security_protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        """True for ``SSL`` and ``SASL_SSL``."""
        return self.security_protocol in ("SSL", "SASL_SSL")

    def __repr__(self) -> str:
        parts = [f"security_protocol={self.security_protocol!r}"]
        if self.sasl:
            parts += [f"sasl_mechanism={self.sasl_mechanism!r}", f"username={self.username!r}", "password=***"]
        if self.tls:
            parts += [f"ssl_cafile={self.ssl_cafile!r}", f"ssl_certfile={self.ssl_certfile!r}",
                      f"ssl_keyfile={self.ssl_keyfile!r}", f"ssl_check_hostname={self.ssl_check_hostname!r}"]
        return f"KafkaSecurity({', '.join(parts)})"

    __str__ = __repr__

    def describe(self) -> str:
        """One line for logs, without secrets: ``SASL_SSL SCRAM-SHA-512 as app``."""
        out = self.security_protocol
        if self.sasl:
            out += f" {self.sasl_mechanism} as {self.username}"
        return out

    # ------------------------------------------------------------------ building
    @classmethod
    def from_options(cls, security_protocol: str | None = None, sasl_mechanism: str | None = None,
                     username: str | None = None, password_file: str | Path | None = None,
                     ssl_cafile: str | Path | None = None, ssl_certfile: str | Path | None = None,
                     ssl_keyfile: str | Path | None = None, *, ssl_check_hostname: bool = True,
                     env: Mapping[str, str] | None = None) -> KafkaSecurity:
        """From command-line options: the password from ``password_file`` (one line; the
        trailing newline is dropped) or else ``$DRIFTLINE_KAFKA_PASSWORD`` (used only with SASL). The protocol
        defaults to ``SASL_SSL`` when a user is given with TLS files, ``SASL_PLAINTEXT``
        with a user alone, ``SSL`` with TLS files alone, else ``PLAINTEXT``."""
        env = os.environ if env is None else env
        password: str | None = None
        if password_file:
            try:
                password = Path(password_file).read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise ValueError(f"Kafka password file {str(password_file)!r} is not readable: "
                                 f"{exc.strerror or exc}") from None
        elif env.get(PASSWORD_ENV):
            password = env[PASSWORD_ENV]
        files = (ssl_cafile, ssl_certfile, ssl_keyfile)
        if not security_protocol:
            tls = any(files)
            security_protocol = ("SASL_SSL" if tls else "SASL_PLAINTEXT") if username else (
                "SSL" if tls else "PLAINTEXT")
        if not password_file and not security_protocol.strip().upper().startswith("SASL_"):
            password = None  # a password in the environment is only used with SASL
        ca, cert, key = (str(f) if f else None for f in files)
        return cls(security_protocol, sasl_mechanism or None, username or None, password,
                   ssl_cafile=ca, ssl_certfile=cert, ssl_keyfile=key, ssl_check_hostname=ssl_check_hostname)

    def warn_cleartext(self, bootstrap: str) -> bool:
        """Log a warning (once per process and bootstrap) when SASL PLAIN would send the
        password unencrypted to a host that is not loopback. Returns True when it warned."""
        if not (self.security_protocol == "SASL_PLAINTEXT" and self.sasl_mechanism == "PLAIN"):
            return False
        hosts = [h.strip().rsplit(":", 1)[0] for h in bootstrap.split(",") if h.strip()]
        remote = [h for h in hosts if not _is_loopback(h)]
        if not remote or bootstrap in _warned_cleartext:
            return False
        _warned_cleartext.add(bootstrap)
        log.warning("Kafka SASL PLAIN over SASL_PLAINTEXT sends the password unencrypted to %s: use "
                    "SASL_SSL, or SCRAM-SHA-256/512", ",".join(remote))
        return True

    # ------------------------------------------------------------------ mappings
    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context (aiokafka's ``create_ssl_context``: TLS 1.2+, the CA
        file or the system trust store, the client certificate), or None without TLS."""
        if not self.tls:
            return None
        from aiokafka.helpers import create_ssl_context  # type: ignore[import-untyped,unused-ignore]

        ctx: ssl.SSLContext = create_ssl_context(cafile=self.ssl_cafile, certfile=self.ssl_certfile, keyfile=self.ssl_keyfile,
                                 password=_no_key_password)
        ctx.check_hostname = self.ssl_check_hostname  # the chain is verified either way
        return ctx

    def aiokafka_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``AIOKafkaProducer`` / ``AIOKafkaConsumer`` / aiokafka's admin."""
        out: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.sasl:
            out.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.username,
                       sasl_plain_password=self.password)
        if self.tls:
            out["ssl_context"] = self.ssl_context()
        return out

    def kafka_python_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for kafka-python's ``KafkaProducer`` / ``KafkaAdminClient``."""
        out: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.sasl:
            out.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.username,
                       sasl_plain_password=self.password)
        if self.tls:
            out.update(ssl_check_hostname=self.ssl_check_hostname)
            for k, v in (("ssl_cafile", self.ssl_cafile), ("ssl_certfile", self.ssl_certfile),
                         ("ssl_keyfile", self.ssl_keyfile)):
                if v:
                    out[k] = v
        return out

    def faust_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``faust.App``: ``broker_credentials`` (none for PLAINTEXT)."""
        if self.security_protocol == "PLAINTEXT":
            return {}
        import faust

        if not self.sasl:
            return {"broker_credentials": faust.SSLCredentials(self.ssl_context())}
        # SASLCredentials picks SASL_SSL itself when it is given an SSL context
        return {"broker_credentials": faust.SASLCredentials(
            username=self.username, password=self.password, mechanism=self.sasl_mechanism,
            ssl_context=self.ssl_context())}

    def confluent_config(self) -> dict[str, str]:
        """librdkafka configuration properties (confluent-kafka's ``Producer``/``Consumer`` dict)."""
        out = {"security.protocol": self.security_protocol.lower()}
        if self.sasl:
            assert self.username is not None and self.password is not None and self.sasl_mechanism
            out.update({"sasl.mechanisms": self.sasl_mechanism, "sasl.username": self.username,
                        "sasl.password": self.password})
        if self.tls:
            out["ssl.endpoint.identification.algorithm"] = "https" if self.ssl_check_hostname else "none"
            # a key inside the certificate file (allowed, as by aiokafka): librdkafka loads no key from
            # ssl.certificate.location, so the same file is its key (else mutual TLS is refused)
            for k, v in (("ssl.ca.location", self.ssl_cafile), ("ssl.certificate.location", self.ssl_certfile),
                         ("ssl.key.location", self.ssl_keyfile or self.ssl_certfile)):
                if v:
                    out[k] = v
        return out
