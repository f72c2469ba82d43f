"""Secrets kept out of logs and errors (streams/redact_secrets.py, notifiers, sinks).

Each test names the mutation of the code it catches."""

from __future__ import annotations

import logging

import pytest

from driftline.streams.redact_secrets import (
    SecretFilter,
    merge_password,
    read_password,
    read_urls,
    redact_url,
    redact_urls_in,
    secrets_of_url,
)
from driftline.streams.sinks.clickhouse import resolve_dsn


@pytest.mark.parametrize(("url", "want"), [
    # password in userinfo (mutation: userinfo passed through unchanged)
    ("http://default:S3cretPw@127.0.0.1:8123/driftline", "http://default:***@127.0.0.1:8123/driftline"),
    ("https://u:p%40ss@ch.example.com/db?x=1", "https://u:***@ch.example.com/db?x=1"),
    # a user without a password is kept as is
    ("http://reader@ch:8123/db", "http://reader@ch:8123/db"),
    # Slack: the path after /services/ is the token (mutation: webhook paths not reduced)
    ("https://hooks.slack.com/services/T000/B000/XXXXSECRET", "https://hooks.slack.com/services/***"),
    ("https://discord.com/api/webhooks/123/abcTOKEN", "https://discord.com/api/webhooks/***"),
    # any host with a Slack-compatible /services/ or Mattermost /hooks/ path
    ("http://127.0.0.1:8080/services/T000/B000/SECRETTOKEN123", "http://127.0.0.1:8080/services/***"),
    ("https://mm.example.com/hooks/abcdef123456", "https://mm.example.com/hooks/***"),
    # credential-like query parameters (mutation: query not looked at)
    ("http://am:9093/api?token=abc123&team=ops", "http://am:9093/api?token=***&team=ops"),
    ("http://x/y?api_key=1&X-Amz-Signature=zz&page=2", "http://x/y?api_key=***&X-Amz-Signature=***&page=2"),
    ("http://x/y?password=a%20b", "http://x/y?password=***"),
    # nothing secret: unchanged, byte for byte
    ("http://alertmanager:9093", "http://alertmanager:9093"),
    ("http://127.0.0.1:9000/hook", "http://127.0.0.1:9000/hook"),
    ("chdb:///var/lib/driftline/chdb", "chdb:///var/lib/driftline/chdb"),
    ("127.0.0.1:9092", "127.0.0.1:9092"),
])
def test_redact_url_exact(url: str, want: str) -> None:
    assert redact_url(url) == want


def test_redact_urls_in_text_and_secrets_of_url() -> None:
    msg = "Cannot connect to http://default:pw12345@ch:8123/db?query=SELECT (x)"
    assert redact_urls_in(msg) == "Cannot connect to http://default:***@ch:8123/db?query=SELECT (x)"
    s = secrets_of_url("http://127.0.0.1:1/services/T000/B000/SECRETTOKEN123")
    assert "SECRETTOKEN123" in s and "http://127.0.0.1:1/services/T000/B000/SECRETTOKEN123" in s
    assert secrets_of_url("http://default:S3cretPw@h:1/db")[-1] == "S3cretPw"
    assert secrets_of_url("http://alertmanager:9093") == []
    # a password URL-quoted in the DSN: the SecretFilter also masks it as the sink sends it
    # (mutation: only the quoted form, as urlsplit returns it, given to the filter)
    assert "p@ss/w0rd!" in secrets_of_url("http://u:p%40ss%2Fw0rd%21@h:1/db")


def test_resolve_dsn_error_hides_the_password() -> None:
    # mutation: the DSN echoed raw in resolve_dsn's ValueError
    with pytest.raises(ValueError) as e:
        resolve_dsn("mysql://root:hunter22@db:3306/x")
    assert "hunter22" not in str(e.value) and "mysql://root:***@db:3306/x" in str(e.value)


def test_secret_filter_masks_message_args_and_traceback(caplog: pytest.LogCaptureFixture) -> None:
    # mutation: the filter only looks at record.msg (not the args) or not at exc_text
    flt = SecretFilter(["S3cretPw", "abc"])  # "abc": too short to mask, ignored
    logger = logging.getLogger("driftline.test.filter")
    caplog.handler.addFilter(flt)
    try:
        with caplog.at_level(logging.DEBUG, logger="driftline.test.filter"):
            logger.warning("dsn %s", "http://u:S3cretPw@h/db")
            try:
                raise RuntimeError("auth failed for S3cretPw")
            except RuntimeError:
                logger.exception("boom abc")
    finally:
        caplog.handler.removeFilter(flt)
    assert caplog.records[0].getMessage() == "dsn http://u:***@h/db"
    assert "S3cretPw" not in caplog.text and "auth failed for ***" in caplog.text
    assert caplog.records[1].getMessage() == "boom abc"


def test_urls_and_passwords_from_env_and_files(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "hooks"
    f.write_text("# slack\nhttp://a/services/T/B/X1\n\nhttp://b/hook\n")
    assert read_urls([f"@{f}", "http://c"], "NOPE") == ["http://a/services/T/B/X1", "http://b/hook", "http://c"]
    monkeypatch.setenv("DRIFTLINE_SLACK_WEBHOOK", "http://x/1 http://y/2")
    assert read_urls(None, "DRIFTLINE_SLACK_WEBHOOK") == ["http://x/1", "http://y/2"]
    assert read_urls([], "DRIFTLINE_SLACK_WEBHOOK") == ["http://x/1", "http://y/2"]
    with pytest.raises(ValueError, match="cannot read URLs from"):
        read_urls([f"@{tmp_path / 'missing'}"], "NOPE")
    pw = tmp_path / "pw"
    pw.write_text("p@ss:w/rd\n")
    monkeypatch.setenv("DRIFTLINE_CLICKHOUSE_PASSWORD", "fromenv")
    assert read_password(pw, "DRIFTLINE_CLICKHOUSE_PASSWORD") == "p@ss:w/rd"
    assert read_password(None, "DRIFTLINE_CLICKHOUSE_PASSWORD") == "fromenv"
    dsn = merge_password("http://reader@ch:8123/db", "p@ss:w/rd")
    assert dsn == "http://reader:p%40ss%3Aw%2Frd@ch:8123/db"
    assert merge_password("http://ch:8123/db", "x") == "http://default:x@ch:8123/db"
    assert merge_password("chdb:///tmp/x", "x") == "chdb:///tmp/x"


def test_sink_unquotes_the_merged_password() -> None:
    # mutation: sinks._connect passes u.password raw (a quoted "%40" would reach ClickHouse)
    from urllib.parse import unquote, urlparse

    u = urlparse(merge_password("http://ch:8123/db", "p@ss:w/rd"))
    assert unquote(u.password or "") == "p@ss:w/rd"


async def test_notifier_failure_logs_no_token(caplog: pytest.LogCaptureFixture) -> None:
    """A webhook that answers 500, and one that cannot be reached: the warnings name the
    masked URL only (mutation: _post_json logs ``url`` raw)."""
    from aiohttp import web

    from driftline.streams.sinks.notifiers import WebhookNotifier

    async def h(req: web.Request) -> web.Response:
        return web.Response(status=500, text=f"bad token in {req.path}")

    app = web.Application()
    app.router.add_post("/services/T000/B000/SECRETTOKEN123", h)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        n = WebhookNotifier(f"http://127.0.0.1:{port}/services/T000/B000/SECRETTOKEN123", slack_compatible=True)
        dead = WebhookNotifier("http://127.0.0.1:1/services/T000/B000/SECRETTOKEN123", slack_compatible=True)
        with caplog.at_level(logging.DEBUG):
            assert (await n._post_json(n.url, {"text": "x"})).name == "FAILURE"
            assert (await dead._post_json(dead.url, {"text": "x"})).name == "FAILURE"
        await n.shutdown()
        await dead.shutdown()
    finally:
        await runner.cleanup()
    lines = [r.getMessage() for r in caplog.records if r.name == "driftline.alerts"]
    assert len(lines) == 2, lines
    assert lines[0] == (f"webhook: POST http://127.0.0.1:{port}/services/*** -> HTTP 500: "
                        "bad token in /services/T000/B000/***")
    assert lines[1].startswith("webhook: POST http://127.0.0.1:1/services/*** failed: ")
    assert "SECRETTOKEN123" not in caplog.text and "SECRETTOKEN123" not in repr(n)


def test_worker_cli_reads_secrets_from_env_and_files(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``driftline worker`` parsing only (run_worker replaced by a recorder): the password
    file is merged into the DSN, webhook URLs come from @file and env, a SecretFilter on the
    root handlers masks them, --redact/--retention reach WorkerConfig. Mutations: the
    password file or env ignored; the filter not installed; options not passed on."""
    from typer.testing import CliRunner

    import driftline.streams.app as app_mod
    from driftline.streams.cli.main import app

    got: dict[str, object] = {}
    monkeypatch.setattr(app_mod, "run_worker", lambda cfg, **kw: got.update(cfg=cfg, **kw))
    pw = tmp_path / "pw"
    pw.write_text("S3cretPw\n")
    hooks = tmp_path / "hooks"
    hooks.write_text("http://127.0.0.1:9/services/T000/B000/SECRETTOKEN123\n")
    monkeypatch.setenv("DRIFTLINE_WEBHOOK", "http://127.0.0.1:9/hook?token=TOKENVALUE9")
    monkeypatch.setenv("DRIFTLINE_REDACT_KEY", "redact-key-1")
    root = logging.getLogger()
    before = list(root.handlers)
    res = CliRunner().invoke(app, [
        "worker", "--kafka", "127.0.0.1:1", "--clickhouse", "http://reader@127.0.0.1:1/db", "--no-drift",
        "--slack-webhook", f"@{hooks}", "--clickhouse-password-file", str(pw), "--redact", "hash",
        "--retention-days", "90", "--retention-days-text", "30"])
    try:
        assert res.exit_code == 0, res.output
        cfg = got["cfg"]
        assert cfg.clickhouse == "http://reader:S3cretPw@127.0.0.1:1/db"  # type: ignore[attr-defined]
        assert "S3cretPw" not in repr(cfg) and "redact-key-1" not in repr(cfg)
        assert cfg.redaction.mode == "hash" and cfg.redaction.key == b"redact-key-1"  # type: ignore[attr-defined]
        assert (cfg.retention.days, cfg.retention.text_days) == (90, 30)  # type: ignore[attr-defined]
        flts = [f for h in root.handlers for f in h.filters if isinstance(f, SecretFilter)]
        assert flts, "no SecretFilter on the root handlers"
        rec = logging.LogRecord("x", logging.INFO, __file__, 1, "%s %s %s %s", (
            "S3cretPw", "http://127.0.0.1:9/services/T000/B000/SECRETTOKEN123", "TOKENVALUE9", "redact-key-1"),
            None)
        flts[0].filter(rec)
        assert rec.getMessage() == "*** *** *** ***"
    finally:
        for h in root.handlers:
            for f in [f for f in h.filters if isinstance(f, SecretFilter)]:
                h.removeFilter(f)
        for h in [h for h in root.handlers if h not in before]:
            root.removeHandler(h)
