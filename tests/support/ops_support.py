"""Real local servers and an in-process daemon for the operator-facing tests (metrics, notifications, retention).

pytest puts tests/ on sys.path (its conftest.py is there), so a test module can `from support.ops_support import ...`.

- `WebhookReceiver`: a stdlib HTTP server on loopback recording every POST (headers, JSON body); it can answer 500
  to the first N requests and wait a little before answering (to make two notifiers overlap).
- `SmtpServer`: a minimal SMTP server (socketserver) speaking EHLO/HELO, AUTH PLAIN, MAIL, RCPT, DATA, RSET, NOOP,
  QUIT, keeping each message as an `email.message.Message`; it can refuse the first N messages with 451.
- `daemon_config(...)`: a config file for the simulated Cloudgene server plus extra sections, loaded as a Config.
- `running_daemon(config)`: `Daemon.start()` ... `stop()`, as `imputationd run` does.
- `wait_until(predicate, timeout)`: a bounded poll.
"""

from __future__ import annotations

import base64
import contextlib
import email
import email.message
import email.policy
import json
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import yaml

from daemon.config import Config, load_config

T = TypeVar("T")

PANEL = "1000g-phase3"
PANEL_ID = "apps@1000g-phase-3-v5@2.0.0"

FAST_SCHEDULER: dict[str, Any] = {
    "workers": 4,
    "dispatch_interval": 0.1,
    "poll_tick_interval": 0.1,
    "download_interval": 0.1,
    "maintenance_interval": 0.2,
    "lease_seconds": 10,
    "backoff_initial": 0.05,
    "backoff_max": 0.2,
    "shutdown_timeout": 3,
}


def wait_until(predicate: Callable[[], T], timeout: float, *, interval: float = 0.02,
               message: str | Callable[[], str] = "condition not met") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message() if callable(message) else message)
        time.sleep(interval)


# --------------------------------------------------------------------------------------------------- webhook


class WebhookReceiver:
    """`with WebhookReceiver(fail_first=2) as hook: hook.url ... hook.delivered()`."""

    def __init__(self, *, fail_first: int = 0, delay: float = 0.0, status: int = 204) -> None:
        self.fail_first = fail_first
        self.delay = delay
        self.status = status
        self.lock = threading.Lock()
        self.requests: list[tuple[int, dict[str, str], dict[str, Any]]] = []  # (answered status, headers, body)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"null")
                if receiver.delay:
                    time.sleep(receiver.delay)
                with receiver.lock:
                    failing = receiver.fail_first > 0
                    receiver.fail_first -= failing
                    status = 500 if failing else receiver.status
                    receiver.requests.append((status, {k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def all(self) -> list[tuple[int, dict[str, str], dict[str, Any]]]:
        with self.lock:
            return list(self.requests)

    def delivered(self) -> list[dict[str, Any]]:
        """Bodies of the requests answered with success."""
        return [body for status, _, body in self.all() if 200 <= status < 300]


# ------------------------------------------------------------------------------------------------------ SMTP


class SmtpServer:
    """A minimal SMTP server: enough of RFC 5321 for smtplib, with AUTH PLAIN when `credentials` are given."""

    def __init__(self, *, credentials: tuple[str, str] | None = None, refuse_first: int = 0) -> None:
        self.credentials = credentials
        self.refuse_first = refuse_first
        self.lock = threading.Lock()
        self.messages: list[email.message.Message] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.logins: list[str] = []
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def reply(self, line: str) -> None:
                self.wfile.write(line.encode("ascii") + b"\r\n")
                self.wfile.flush()

            def handle(self) -> None:
                self.reply("220 localhost test SMTP")
                sender, recipients, authed = None, [], outer.credentials is None
                while True:
                    raw = self.rfile.readline()
                    if not raw:
                        return
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    verb, _, rest = line.partition(" ")
                    verb = verb.upper()
                    if verb == "EHLO":
                        self.reply("250-localhost")
                        if outer.credentials is not None:
                            self.reply("250-AUTH PLAIN")
                        self.reply("250 8BITMIME")
                    elif verb == "HELO":
                        self.reply("250 localhost")
                    elif verb == "AUTH":
                        mechanism, _, initial = rest.partition(" ")
                        if mechanism.upper() != "PLAIN":
                            self.reply("504 unsupported")
                            continue
                        if not initial:
                            self.reply("334 ")
                            initial = self.rfile.readline().decode().strip()
                        _, user, password = base64.b64decode(initial).decode().split("\0")
                        if (user, password) == outer.credentials:
                            authed = True
                            with outer.lock:
                                outer.logins.append(user)
                            self.reply("235 ok")
                        else:
                            self.reply("535 bad credentials")
                    elif verb == "MAIL":
                        if not authed:
                            self.reply("530 authentication required")
                            continue
                        sender, recipients = rest.partition(":")[2].strip().strip("<>"), []
                        self.reply("250 ok")
                    elif verb == "RCPT":
                        recipients.append(rest.partition(":")[2].strip().strip("<>"))
                        self.reply("250 ok")
                    elif verb == "DATA":
                        self.reply("354 go on")
                        data = bytearray()
                        while True:
                            chunk = self.rfile.readline()
                            if chunk in (b".\r\n", b".\n", b""):
                                break
                            data += chunk[1:] if chunk.startswith(b"..") else chunk
                        with outer.lock:
                            refuse = outer.refuse_first > 0
                            outer.refuse_first -= refuse
                            if not refuse:
                                outer.messages.append(email.message_from_bytes(bytes(data),
                                                                               policy=email.policy.default))
                                outer.envelopes.append((sender or "", recipients))
                        self.reply("451 try again later" if refuse else "250 queued")
                    elif verb in ("RSET", "NOOP"):
                        self.reply("250 ok")
                    elif verb == "QUIT":
                        self.reply("221 bye")
                        return
                    else:
                        self.reply("502 not implemented")

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def __enter__(self) -> SmtpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def received(self) -> list[email.message.Message]:
        with self.lock:
            return list(self.messages)


# ---------------------------------------------------------------------------------------------------- daemon


def daemon_config(root: Path, db_url: str, *, base_url: str, token: str, **sections: Any) -> Config:
    """A config for one Cloudgene service `sim` at `base_url` with fast ticks; `sections` are merged in at the top
    level (one level deep: `storage={...}` adds keys to storage)."""
    root.mkdir(parents=True, exist_ok=True)
    token_file = root / "sim.token"
    token_file.write_text(token + "\n", encoding="utf-8")
    token_file.chmod(0o600)
    data: dict[str, Any] = {
        "storage": {"state_dir": str(root / "state")},
        "database": {"url": db_url},
        "logging": {"format": "json", "level": "info"},
        "scheduler": dict(FAST_SCHEDULER),
        "services": {
            "sim": {
                "type": "cloudgene",
                "base_url": base_url,
                "token_file": str(token_file),
                "poll_interval": 0.1,
                "timeout": 5,
                "panels": {PANEL: {"id": PANEL_ID, "builds": ["hg19", "hg38"], "populations": ["eur", "all"]}},
            }
        },
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return load_config(path)


def sample_vcf(root: Path, chromosome: str = "20") -> Path:
    from daemon.simulator import write_sample_vcf

    path = root / "inputs" / f"chr{chromosome}.vcf.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_sample_vcf(path, chromosome=chromosome, build="hg19", samples=25, variants=120)


@contextlib.contextmanager
def running_daemon(config: Config) -> Iterator[Any]:
    from daemon.scheduler import Daemon

    daemon = Daemon(config)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.request_stop()
        daemon.stop()


__all__ = ["PANEL", "SmtpServer", "WebhookReceiver", "daemon_config", "running_daemon", "sample_vcf", "wait_until"]
