"""daemon.logging: line shape, renderers, stdlib routing, quiet HTTP loggers, redaction, reconfiguration."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import threading
import uuid
import warnings

import httpx
import pytest
import structlog

from daemon import logging as dlog
from daemon.config import LoggingConfig


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def setup_logging():
    """Configure logging into a fresh stream; afterwards remove our handler and restore the levels we touched."""
    touched = ["", *dlog.QUIET_LOGGERS, *dlog.QUIET_UNLESS_DEBUG]
    saved = {name: logging.getLogger(name).level for name in touched}

    def configure(fmt: str = "auto", level: str = "info", *, tty: bool = False) -> io.StringIO:
        stream = TtyStream() if tty else io.StringIO()
        dlog.configure_logging(LoggingConfig(format=fmt, level=level), stream=stream)
        return stream

    yield configure
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == dlog._HANDLER_NAME]:
        root.removeHandler(handler)
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def secret() -> str:
    return "s3cr3t-" + uuid.uuid4().hex


# --- shape -----------------------------------------------------------------------------------------------------


def test_json_line_shape(setup_logging):
    stream = setup_logging()
    structlog.get_logger("daemon.test").info("job_submitted", attempt=2)
    [line] = lines(stream)
    assert line["event"] == "job_submitted"
    assert line["level"] == "info"
    assert line["logger"] == "daemon.test"
    assert line["attempt"] == 2
    assert line["timestamp"].endswith("Z")
    when = dt.datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
    assert abs((dt.datetime.now(dt.UTC) - when).total_seconds()) < 60
    assert list(line)[:3] == ["timestamp", "level", "event"]


def test_bound_job_context_on_structlog_and_stdlib_lines(setup_logging):
    stream = setup_logging()
    log = structlog.get_logger("daemon.scheduler")
    with dlog.bind_job("42", "michigan", None):
        log.info("submitting")
        structlog.contextvars.bind_contextvars(remote_id="job-20240101-1")
        log.info("job_submitted")
        logging.getLogger("sqlalchemy.pool").warning("connection invalidated")
    log.info("tick_done")
    first, second, stdlib_line, after = lines(stream)
    assert (first["job_id"], first["service"], first["remote_id"]) == ("42", "michigan", None)
    assert (second["job_id"], second["service"], second["remote_id"]) == ("42", "michigan", "job-20240101-1")
    assert stdlib_line["job_id"] == "42" and stdlib_line["logger"] == "sqlalchemy.pool"
    assert not {"job_id", "service", "remote_id"} & set(after)


def test_job_context_does_not_leak_between_threads(setup_logging):
    stream = setup_logging()
    log = structlog.get_logger("daemon.pool")
    inside, release = threading.Event(), threading.Event()

    def task():
        with dlog.bind_job("7", "topmed", "r-7"):
            inside.set()
            release.wait(5)
            log.info("in_task")

    worker = threading.Thread(target=task)
    worker.start()
    assert inside.wait(5)
    log.info("in_main")
    release.set()
    worker.join(5)
    by_event = {line["event"]: line for line in lines(stream)}
    assert by_event["in_task"]["job_id"] == "7"
    assert "job_id" not in by_event["in_main"]


def test_levels_are_lowercase_and_filtered(setup_logging):
    stream = setup_logging(level="warning")
    log = structlog.get_logger("daemon.test")
    log.info("hidden")
    log.warning("shown_warning", error_kind="token_expiring")
    try:
        _ = 1 / 0
    except ZeroDivisionError:
        log.exception("shown_exception", error_kind="bug")
    logging.getLogger("apscheduler.scheduler").critical("scheduler died")
    got = [(line["event"], line["level"]) for line in lines(stream)]
    assert got == [("shown_warning", "warning"), ("shown_exception", "error"), ("scheduler died", "critical")]
    assert lines(stream)[1]["error_kind"] == "bug"
    assert "ZeroDivisionError" in lines(stream)[1]["exception"]


# --- renderers -------------------------------------------------------------------------------------------------


def test_console_renderer_on_a_tty(setup_logging):
    stream = setup_logging(tty=True)
    with dlog.bind_job("42", "michigan", "job-1"):
        structlog.get_logger("daemon.test").info("job_submitted")
    text = stream.getvalue()
    assert "job_submitted" in text and "job_id" in text and "42" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])
    assert "\x1b[" in text  # colours on a terminal


@pytest.mark.parametrize(("fmt", "tty", "json_expected"), [("json", True, True), ("console", False, False)])
def test_format_overrides_the_tty_guess(setup_logging, fmt, tty, json_expected):
    stream = setup_logging(fmt=fmt, tty=tty)
    structlog.get_logger("daemon.test").info("hello", n=1)
    text = stream.getvalue()
    if json_expected:
        assert json.loads(text)["event"] == "hello"
    else:
        assert "hello" in text and "n=1" in text
        assert "\x1b[" not in text  # forced console into a pipe: no colour codes
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)


def test_bad_level_or_format_raises_and_keeps_the_old_setup(setup_logging):
    stream = setup_logging()
    with pytest.raises(ValueError, match="logging.level"):
        dlog.configure_logging(LoggingConfig(level="loud"), stream=io.StringIO())
    with pytest.raises(ValueError, match="logging.format"):
        dlog.configure_logging(LoggingConfig(format="xml"), stream=io.StringIO())  # type: ignore[arg-type]
    structlog.get_logger("daemon.test").info("still_here")
    assert lines(stream)[0]["event"] == "still_here"


# --- stdlib routing --------------------------------------------------------------------------------------------


def test_stdlib_loggers_and_warnings_go_through_the_same_processors(setup_logging):
    stream = setup_logging()
    logging.getLogger("apscheduler.scheduler").info('Added job "%s" to job store "%s"', "dispatch", "default")
    logging.getLogger("alembic.runtime.migration").info("Context impl SQLiteImpl.")  # set-up talk: quiet
    logging.getLogger("alembic.runtime.migration").warning("Revision 0001 is present more than once")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("SAWarning-like message", UserWarning, stacklevel=1)
    got = lines(stream)
    assert got[0] == {
        "timestamp": got[0]["timestamp"],
        "level": "info",
        "event": 'Added job "dispatch" to job store "default"',
        "logger": "apscheduler.scheduler",
    }
    assert got[1]["logger"] == "alembic.runtime.migration" and got[1]["level"] == "warning"
    assert got[2]["logger"] == "py.warnings" and got[2]["level"] == "warning"
    assert "SAWarning-like message" in got[2]["event"]


@pytest.mark.parametrize("level", ["info", "debug"])
def test_httpx_request_lines_never_appear(setup_logging, level):
    stream = setup_logging(level=level)
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={}))
    with httpx.Client(transport=transport, base_url="https://imputationserver.sph.umich.edu") as client:
        client.get("/share/results/0123456789abcdef/chr_1.zip", params={"x": "1"})
    assert "HTTP Request" not in stream.getvalue()
    assert "0123456789abcdef" not in stream.getvalue()
    logging.getLogger("httpx").warning("a real httpx warning")
    assert lines(stream)[-1]["event"] == "a real httpx warning"


def test_apscheduler_tick_lines_are_quiet_unless_debug(setup_logging):
    stream = setup_logging(level="info")
    executor_log = logging.getLogger("apscheduler.executors.default")
    executor_log.info('Running job "dispatch"')
    assert stream.getvalue() == ""
    stream = setup_logging(level="debug")
    executor_log.info('Running job "dispatch"')
    assert lines(stream)[0]["event"] == 'Running job "dispatch"'


# --- redaction -------------------------------------------------------------------------------------------------

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyIiwiZXhwIjoxfQ.c2lnbmF0dXJlLWJ5dGVz"


@pytest.mark.parametrize(
    ("text", "gone", "kept"),
    [
        ("sending X-Auth-Token: abcdef123456", "abcdef123456", "X-Auth-Token: [redacted]"),
        ("headers {'X-Auth-Token': 'abcdef123456', 'Accept': '*/*'}", "abcdef123456", "'Accept': '*/*'"),
        ("Authorization: Bearer abcdef.123456", "abcdef", "Authorization: [redacted]"),
        ("x_auth_token=abcdef123456", "abcdef123456", "x_auth_token"),
        ("Cookie: session=abcdef123456; other=1", "abcdef123456", "Cookie: [redacted]"),
        ("password=hunter2 and more", "hunter2", "and more"),
        ("{'password': 'hunter2', 'name': 'run1'}", "hunter2", "'name': 'run1'"),
        ('{"token": "abcdef123456", "count": 3}', "abcdef123456", '"count": 3'),
        ("GET https://h.example/jobs/1?token=abc&x=2 failed", "token=abc",
         "https://h.example/jobs/1?[redacted] failed"),
        ("GET /api/v2/jobs?page=2&apikey=zzz", "zzz", "/api/v2/jobs?[redacted]"),
        ("301 to https://bucket.s3.amazonaws.com/chr1.zip?X-Amz-Signature=abc", "abc", "chr1.zip?[redacted]"),
        (
            "GET https://imputationserver.sph.umich.edu/share/results/9f8e7d6c5b4a/chr_1.zip -> 400",
            "9f8e7d6c5b4a",
            "/share/results/[redacted]/chr_1.zip -> 400",
        ),
        (f"token was {JWT}.", JWT[10:], "token was [redacted]"),
        ("what? nothing secret here (really?)", "[redacted]", "what? nothing secret here (really?)"),
        ("token_expires_at=2024-01-01 next_token=5 sha256=ab12", "[redacted]", "sha256=ab12"),
    ],
)
def test_scrub_string_forms(text, gone, kept):
    out = dlog.scrub(text)
    assert gone not in out
    assert kept in out


HASH = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


@pytest.mark.parametrize(
    ("text", "out"),
    [
        (f"files {HASH} and {HASH}", "files [redacted] and [redacted]"),
        (f"Exported {HASH[:20]}…", "Exported [redacted]…"),  # cut where a shortened text ends
        (f"…{HASH[-30:]} done", "…[redacted] done"),  # cut where a text shortened from the front starts
        (f"a {HASH[:30]}…; b", "a [redacted]…; b"),  # pieces joined after each was cut
        ("Data…", "Data…"),  # a cut beside no secret: nothing to scrub
        (f"x {HASH[:3]}…", f"x {HASH[:3]}…"),  # three characters say nothing
        ("no secret here", "no secret here"),
    ],
)
def test_scrub_with_the_secrets_known_to_apply(text, out):
    assert dlog.scrub(text, [HASH, None, "short"]) == out


def test_secret_keys_are_blanked_at_any_depth(setup_logging):
    stream = setup_logging()
    structlog.get_logger("daemon.downloads").info(
        "output_listed",
        name="chr_1.zip",
        url="https://h/share/results/abc123/chr_1.zip",
        remote_hash="abc123",
        sha256="e3b0c442",
        token_file="michigan.token",
        base_url="https://imputationserver.sph.umich.edu/api/v2?debug=1",
        outputs=[{"name": "qc_report.txt", "hash": "def456", "download-url": "x"}],
        params={"job-name": "j1", "password": "hunter2-pw", "Job_Password": "pw2-secret"},
        headers={"X-Auth-Token": "tok-123456", "Authorization": "Bearer tok"},
        api_key="k",
        michigan_token="t",
    )
    [line] = lines(stream)
    assert line["url"] == line["remote_hash"] == line["api_key"] == line["michigan_token"] == "[redacted]"
    assert line["outputs"] == [{"name": "qc_report.txt", "hash": "[redacted]", "download-url": "[redacted]"}]
    assert line["params"] == {"job-name": "j1", "password": "[redacted]", "Job_Password": "[redacted]"}
    assert line["headers"] == {"X-Auth-Token": "[redacted]", "Authorization": "[redacted]"}
    assert (line["sha256"], line["token_file"], line["name"]) == ("e3b0c442", "michigan.token", "chr_1.zip")
    assert line["base_url"] == "https://imputationserver.sph.umich.edu/api/v2?[redacted]"
    for value in ("abc123", "def456", "hunter2-pw", "pw2-secret", "tok-123456"):
        assert value not in stream.getvalue()


def test_objects_are_scrubbed_as_the_renderer_would_show_them(setup_logging):
    stream = setup_logging()
    headers = httpx.Headers({"X-Auth-Token": "tok-abcdef-123"})
    structlog.get_logger("daemon.test").info("request", request_headers=headers)
    assert "tok-abcdef-123" not in stream.getvalue()


def test_registered_secrets_are_scrubbed_everywhere(setup_logging):
    stream = setup_logging()
    token, password = secret(), secret()
    dlog.register_secret(token)
    dlog.register_secret(password)
    dlog.register_secret("abc")  # too short: ignored, or every "abc" would vanish
    log = structlog.get_logger("daemon.test")
    log.info(f"event text carrying {token}", note=f"field carrying {password}", nested={"k": [token]})
    logging.getLogger("some.library").info("stdlib %s args %s", token, password)
    text = stream.getvalue()
    assert token not in text and password not in text
    assert text.count("[redacted]") == 5
    assert dlog.scrub("abc def") == "abc def"


def test_register_secret_is_thread_safe_and_bounded(monkeypatch):
    monkeypatch.setattr(dlog, "MAX_SECRETS", 50)
    values = [secret() for _ in range(400)]
    threads = [threading.Thread(target=lambda chunk=values[i::8]: [dlog.register_secret(v) for v in chunk])
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(dlog._secrets) == 50
    assert sum(len(found) for found in dlog._secrets_by_start.values()) == 50  # the snapshot scrub reads
    kept = next(iter(dlog._secrets))
    assert dlog.scrub(kept) == "[redacted]"
    dlog.register_secret(kept)  # re-registering keeps a secret fresh
    assert list(dlog._secrets)[-1] == kept


def test_tracebacks_are_scrubbed(setup_logging):
    stream = setup_logging()
    password = secret()
    dlog.register_secret(password)

    def fail():
        url = "https://h.example/share/results/feedc0ffee42/chr_2.zip?sig=topsecretsig"
        raise RuntimeError(f"download {url} with X-Auth-Token: {JWT} and zip password {password}")

    try:
        fail()
    except RuntimeError:
        structlog.get_logger("daemon.downloads").exception("download_failed", error_kind="http")
        logging.getLogger("apscheduler.executors.default").exception("Job raised an exception")
    text = stream.getvalue()
    for leaked in ("feedc0ffee42", "topsecretsig", JWT, password):
        assert leaked not in text
    structlog_line, stdlib_line = lines(stream)
    for line in (structlog_line, stdlib_line):
        assert "Traceback (most recent call last)" in line["exception"]
        assert "/share/results/[redacted]/chr_2.zip?[redacted]" in line["exception"]
        assert "X-Auth-Token: [redacted]" in line["exception"]


def test_console_output_is_redacted_too(setup_logging):
    stream = setup_logging(tty=True)
    try:
        raise ValueError("bad X-Auth-Token: zz-secret-zz")
    except ValueError:
        structlog.get_logger("daemon.test").exception("failed", password="hunter2", url="https://h/?a=b")
    text = stream.getvalue()
    assert "zz-secret-zz" not in text and "hunter2" not in text and "?a=b" not in text
    assert "ValueError" in text


def test_redact_is_pure():
    event = {"event": "x", "password": "p", "nested": {"token": "t"}}
    out = dlog.redact(None, "info", event)
    assert event == {"event": "x", "password": "p", "nested": {"token": "t"}}
    assert out == {"event": "x", "password": "[redacted]", "nested": {"token": "[redacted]"}}


# --- reconfiguration -------------------------------------------------------------------------------------------


def test_reconfigure_is_idempotent_and_switches_stream_level_and_format(setup_logging, caplog):
    first = setup_logging()
    second = setup_logging()
    ours = [h for h in logging.getLogger().handlers if h.get_name() == dlog._HANDLER_NAME]
    assert len(ours) == 1
    assert caplog.handler in logging.getLogger().handlers  # somebody else's handler is left alone
    log = structlog.get_logger("daemon.test")
    log.info("once")
    assert first.getvalue() == ""
    assert [line["event"] for line in lines(second)] == ["once"]

    third = setup_logging(fmt="console", level="warning")  # SIGHUP with a new level and format
    log.info("hidden")
    log.warning("shown")
    assert "hidden" not in third.getvalue() and "shown" in third.getvalue()
    assert [line["event"] for line in lines(second)] == ["once"]


def test_journald_stream_gets_syslog_priority_prefixes(setup_logging, monkeypatch, tmp_path):
    path = tmp_path / "journal-stream"
    with open(path, "w") as stream:
        info = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        dlog.configure_logging(LoggingConfig(), stream=stream)
        log = structlog.get_logger("daemon.test")
        log.info("started")
        log.error("failed", error_kind="x")
        logging.getLogger("httpx").warning("slow")
    got = path.read_text().splitlines()
    assert [line[:3] for line in got] == ["<6>", "<3>", "<4>"]
    assert json.loads(got[1][3:])["event"] == "failed"


def test_no_priority_prefix_on_other_streams(setup_logging, monkeypatch, tmp_path):
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    stream = setup_logging()
    structlog.get_logger("daemon.test").info("started")
    assert stream.getvalue().startswith("{")
