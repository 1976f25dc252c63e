"""Logging: structlog for our code, the same processors for stdlib loggers, and redaction of every secret.

One line per event. JSON lines when the output is not a terminal (journald), `ConsoleRenderer` on a terminal;
`logging.format: json|console` overrides the guess. When stdout is systemd's journal stream ($JOURNAL_STREAM),
each line starts with a syslog "<N>" prefix that journald turns into the entry's PRIORITY and strips. Every line
has `timestamp` (ISO 8601, UTC), `level` (lower case), `logger` and `event`; lines logged inside `bind_job(...)`
also carry `job_id`, `service` and `remote_id`.

Field conventions the rest of the daemon follows (operators filter on them with `jq`):

- `event` is a short, stable snake_case name (`job_submitted`, `jobs_summary`), not a sentence; details go in
  fields.
- Every warning or error about something that went wrong carries `error_kind`: a stable snake_case word callers
  pass explicitly, never derived from message text. For service errors it is the exception's `kind`
  (`timeout`, `connection`, `job_limit`, `transient`, `blocked`, `permanent`, ...); elsewhere name the failure
  (`download_size_mismatch`, `zip_crc`, `config_invalid`, `lease_lost`, ...). A message may change between
  releases; an `error_kind` may not.
- Log a service's address as `base_url`. Keys named like secrets (see `SECRET_KEYS`) are blanked whatever their
  value; `url` and `remote_hash` are among them because a Cloudgene output's URL and hash are download secrets.

Redaction is one pure processor, `redact`, run last before rendering for structlog and stdlib records alike, so
nothing (event text, exception tracebacks, third-party messages) reaches the output unscrubbed. It blanks values
of secret-named keys, and inside every string it scrubs header values (`X-Auth-Token: ...`, `Authorization:
Bearer ...`), `key=value` and quoted `"key": "value"` secrets, URL query strings, Cloudgene
`/share/results/<hash>/` paths, JWT-looking strings, and every value given to `register_secret`.

`scrub` is the one function that scrubs text, here and wherever text from a server is kept or shown (the service
adapters' boundary, `daemon.services.scrubbing`): there, the secrets known to apply to the call (the service's token,
the job's password, its download hashes and URLs) are passed in as well, and a piece of one of those cut off by a
shortened message (next to its "…") goes too.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

import structlog
from structlog.contextvars import bound_contextvars
from structlog.typing import EventDict, Processor, WrappedLogger

from daemon.config import LoggingConfig

__all__ = [
    "FORMATS",
    "LEVELS",
    "REDACTED",
    "SECRET_KEYS",
    "bind_job",
    "configure_logging",
    "redact",
    "register_secret",
    "scrub",
]

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
FORMATS = ("auto", "json", "console")
REDACTED = "[redacted]"

#: Keys whose values are never shown, compared lower-case with "-" read as "_". `hash`/`remote_hash` and `url`
#: are Cloudgene download capabilities; our own content checksum is logged as `sha256` and stays visible.
SECRET_KEYS = frozenset(
    {
        "token", "access_token", "refresh_token", "id_token", "api_token", "auth_token", "x_auth_token",
        "password", "passwd", "secret", "client_secret", "api_key", "apikey",
        "authorization", "proxy_authorization", "cookie", "set_cookie",
        "hash", "remote_hash", "url", "download_url", "signed_url", "presigned_url",
    }
)  # fmt: skip
#: ... and keys ending like these (`job_password`, `michigan_token`); `token_file`, `token_expires_at` stay.
SECRET_KEY_SUFFIXES = ("_token", "_password", "_passwd", "_secret", "_api_key")

#: Registered secrets shorter than this are ignored: replacing "abc" everywhere would shred ordinary text.
MIN_SECRET_LENGTH = 6
#: The mark a shortened text carries where it was cut (the adapters' messages, `daemon.text.printable`).
CUT_MARK = "…"
#: The shortest piece of a known secret, cut off beside a `CUT_MARK`, that is scrubbed: shorter ones say nothing.
MIN_CUT_PIECE = 4
#: Most registered secrets kept; the least recently registered go first (the daemon re-registers what it reads).
MAX_SECRETS = 4096

#: Loggers that say too much at INFO: httpx/httpcore log every request with its full URL (download hashes,
#: query strings); Alembic its set-up (plugins, "Context impl") whenever a new database is migrated;
#: APScheduler's executor logs every tick twice. Their warnings and errors still show.
QUIET_LOGGERS = ("httpx", "httpcore", "alembic")
QUIET_UNLESS_DEBUG = ("apscheduler.executors.default",)
#: Safe in the daemon: the structlog chain never changes between calls (level, format and stream live in the
#: handler). The test suite turns it off: a logger cached in one test would bypass `structlog.testing.capture_logs`
#: in every later one.
CACHE_LOGGERS = True

_HANDLER_NAME = "imputationd"

# --- redaction -------------------------------------------------------------------------------------------------

_KV_NAMES = r"(?:password|passwd|secret|token|access_token|refresh_token|api_key|apikey|remote_hash|hash)"
_SCRUBBERS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Header values, plain ("X-Auth-Token: abc") or from a dict repr ("'Authorization': 'Bearer abc'").
    (
        re.compile(
            r"(?i)\b(x[-_]auth[-_]token|(?:proxy-)?authorization)(['\"]?\s*[:=]\s*['\"]?)"
            r"(?:(?:bearer|basic|digest|token)\s+)?[^\s'\",;]+"
        ),
        rf"\1\2{REDACTED}",
    ),
    (re.compile(r"(?i)\b((?:set-)?cookie)(['\"]?\s*[:=]\s*['\"]?)[^\r\n'\"]+"), rf"\1\2{REDACTED}"),
    # password=..., token=... in messages and command lines.
    (re.compile(rf"(?i)(?<![\w-])({_KV_NAMES})=[^\s&,;'\")\]}}]+"), rf"\1={REDACTED}"),
    # 'password': '...' / "token": "..." in reprs and JSON bodies.
    (re.compile(rf"(?i)(['\"]{_KV_NAMES}['\"]\s*:\s*)(['\"])(?:(?!\2).)*\2"), rf"\1\2{REDACTED}\2"),
    # JWTs (Cloudgene API tokens are JWTs): header.payload.signature, header always base64 of '{"'.
    (re.compile(r"\beyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*"), REDACTED),
    # Cloudgene's download capability: /share/results/<hash>/<file name>.
    (re.compile(r"(/share/results/)[^/\s'\"?#]+"), rf"\1{REDACTED}"),
    # Query strings: anything after "?" in a URL, and any "?key=value..." elsewhere.
    (re.compile(r"(https?://[^\s?#'\"<>]*)\?[^\s#'\"<>]+"), rf"\1?{REDACTED}"),
    (re.compile(r"\?[\w.~%+\[\]-]+=[^\s#'\"<>]*"), f"?{REDACTED}"),
)

#: Something at least one of the `_SCRUBBERS` needs in order to match (a superset of them, case-insensitive): a
#: string without any of these is left alone after one search instead of eight substitutions. Every value of every
#: log line goes through `scrub`, and nearly all of them are ids, states and numbers.
_MIGHT_NEED_SCRUBBING = re.compile(
    r"(?i)x[-_]auth|authorization|cookie|passw(?:or)?d|secret|token|api_?key|hash|eyJ|/share/results/|\?"
)

_secrets_lock = threading.Lock()
_secrets: dict[str, None] = {}  # insertion-ordered: oldest first
#: The registered secrets by their first MIN_SECRET_LENGTH characters, each list longest first: an immutable
#: snapshot read without the lock. A text is looked up by its own windows of that length, one set lookup each,
#: instead of searched for each of up to MAX_SECRETS secrets (140 µs for a progress line with 4096 registered).
_secrets_by_start: dict[str, tuple[str, ...]] = {}


def register_secret(value: str | None) -> None:
    """Scrub `value` from every log line from now on (a service token, a job password). Thread-safe.

    Values shorter than `MIN_SECRET_LENGTH` are ignored. Registering a known value again keeps it fresh, so the
    `MAX_SECRETS` bound only ever drops secrets the daemon has not read for a long time."""
    global _secrets_by_start
    if not isinstance(value, str) or len(value) < MIN_SECRET_LENGTH:
        return
    with _secrets_lock:
        if value in _secrets:
            del _secrets[value]
            _secrets[value] = None
            return
        _secrets[value] = None
        while len(_secrets) > MAX_SECRETS:
            del _secrets[next(iter(_secrets))]
        by_start: dict[str, list[str]] = {}
        for secret in sorted(_secrets, key=len, reverse=True):
            by_start.setdefault(secret[:MIN_SECRET_LENGTH], []).append(secret)
        _secrets_by_start = {start: tuple(found) for start, found in by_start.items()}


def scrub(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with `secrets`, the registered secrets and every secret-looking fragment replaced by `[redacted]`.

    `secrets` are the ones known to apply (a job's password, its download hashes): of these, a piece cut off where a
    shortened text ends or starts (the beginning of a secret just before a "…", its end just after one) goes too."""
    known = sorted({s for s in secrets if isinstance(s, str) and len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, REDACTED)
    if known and CUT_MARK in text:
        text = _scrub_cut_pieces(text, known)
    by_start = _secrets_by_start
    if by_start and len(text) >= MIN_SECRET_LENGTH:
        windows = {text[i:i + MIN_SECRET_LENGTH] for i in range(len(text) - MIN_SECRET_LENGTH + 1)}
        found = [secret for start in windows if start in by_start for secret in by_start[start]]
        for secret in sorted(found, key=len, reverse=True):
            if secret in text:
                text = text.replace(secret, REDACTED)
    if _MIGHT_NEED_SCRUBBING.search(text) is None:
        return text
    for pattern, replacement in _SCRUBBERS:
        text = pattern.sub(replacement, text)
    return text


def _scrub_cut_pieces(text: str, secrets: list[str]) -> str:
    parts = text.split(CUT_MARK)
    for i in range(len(parts) - 1):
        before, after = parts[i], parts[i + 1]
        for secret in secrets:
            longest = min(len(secret) - 1, len(before))
            cut = next((n for n in range(longest, MIN_CUT_PIECE - 1, -1) if before.endswith(secret[:n])), 0)
            if cut:
                before = before[:-cut] + REDACTED
            longest = min(len(secret) - 1, len(after))
            cut = next((n for n in range(longest, MIN_CUT_PIECE - 1, -1) if after.startswith(secret[-n:])), 0)
            if cut:
                after = REDACTED + after[cut:]
        parts[i], parts[i + 1] = before, after
    return CUT_MARK.join(parts)


def is_secret_key(key: object) -> bool:
    name = str(key).lower().replace("-", "_")
    return name in SECRET_KEYS or name.endswith(SECRET_KEY_SUFFIXES)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {k: REDACTED if is_secret_key(k) else _redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_redact_value(v) for v in value]
    # Renderers would show repr() of anything else (a Path, an httpx.Headers, an exception): scrub that.
    return scrub(repr(value))


def redact(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Processor: a copy of `event_dict` with every secret blanked or scrubbed. Must run after exception
    formatting (so tracebacks are strings) and right before the renderer."""
    return {k: REDACTED if is_secret_key(k) else _redact_value(v) for k, v in event_dict.items()}


# --- processors and configuration ------------------------------------------------------------------------------


def _lead_keys(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Processor: timestamp, level, event first, so `journalctl -o cat` reads well without jq."""
    lead = {k: event_dict[k] for k in ("timestamp", "level", "event") if k in event_dict}
    return {**lead, **event_dict}


#: Run for every line, structlog or stdlib, before it is handed to the handler's formatter.
_PRE_CHAIN: tuple[Processor, ...] = (
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.add_log_level,  # lower case; "exception" -> "error", "warn" -> "warning"
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.StackInfoRenderer(),
)


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _is_journal_stream(stream: TextIO) -> bool:
    """True when `stream` is the journald connection systemd gave us ($JOURNAL_STREAM is its "device:inode")."""
    try:
        device, inode = (int(part) for part in os.environ.get("JOURNAL_STREAM", "").split(":"))
        info = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError, io.UnsupportedOperation):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


def _with_syslog_priority(renderer: Processor) -> Processor:
    """Prefix each line with "<N>": journald strips it and records PRIORITY=N, so `journalctl -p err` works."""

    def render(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> str:
        priority = _SYSLOG_PRIORITY.get(event_dict.get("level", ""), 6)
        line = renderer(logger, method_name, event_dict)
        return f"<{priority}>{line.decode() if isinstance(line, bytes) else line}"

    return render


_SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def _renderer(fmt: str, stream: TextIO) -> Processor:
    tty = _is_tty(stream)
    if fmt == "console" or (fmt == "auto" and tty):
        # Exceptions arrive already formatted (and scrubbed) in `exception`, never as exc_info: a rich traceback
        # with local variables would print passwords.
        renderer: Processor = structlog.dev.ConsoleRenderer(colors=tty)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=json.dumps)
    return _with_syslog_priority(renderer) if _is_journal_stream(stream) else renderer


def configure_logging(config: LoggingConfig, *, stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging to `stream` (default: stdout) at `config.level` in `config.format`.

    Idempotent: call it again (SIGHUP reload) to change level, format or stream; it replaces only the handler it
    installed, so other handlers on the root logger (pytest's) are left alone. Raises ValueError for an unknown
    level or format before changing anything."""
    level = LEVELS.get(str(config.level).lower())
    if level is None:
        raise ValueError(f"logging.level: {config.level!r} is not one of {', '.join(LEVELS)}")
    if config.format not in FORMATS:
        raise ValueError(f"logging.format: {config.format!r} is not one of {', '.join(FORMATS)}")
    stream = sys.stdout if stream is None else stream

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=list(_PRE_CHAIN),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _lead_keys,
            redact,  # last before rendering: sees the formatted traceback too
            _renderer(config.format, stream),
        ],
    )
    handler = logging.StreamHandler(stream)  # flushes after every line: journald sees lines as they happen
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()  # a StreamHandler never closes its stream
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    for name in QUIET_UNLESS_DEBUG:
        logging.getLogger(name).setLevel(logging.NOTSET if level <= logging.DEBUG else logging.WARNING)
    # warnings.warn (SQLAlchemy's among them) -> logger "py.warnings". Off then on: captureWarnings(True) does
    # nothing if it thinks it is on, even after a warnings.catch_warnings() block has restored the old hook.
    logging.captureWarnings(False)
    logging.captureWarnings(True)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_PRE_CHAIN,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=CACHE_LOGGERS,
    )


def bind_job(job_id: object, service: str | None, remote_id: str | None = None, **extra: Any) -> Any:
    """Context manager: every line logged inside carries `job_id`, `service`, `remote_id` (and `extra`).

    Use it at the start of each pool task. When the remote id becomes known inside the block, call
    `structlog.contextvars.bind_contextvars(remote_id=...)`; it is unbound with the rest when the block ends."""
    return bound_contextvars(job_id=job_id, service=service, remote_id=remote_id, **extra)
