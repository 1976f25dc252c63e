"""sd_notify(3) in a few lines: tell systemd we are ready, what we are doing, that we are alive, that we stop.

No dependency: one datagram per call to the AF_UNIX socket named by `$NOTIFY_SOCKET` (a path, or `@name` for the
abstract namespace). Outside systemd the variable is unset and every call is a no-op. A failed send never
raises: the daemon must not die because systemd went away; the first failure is logged at debug.

The owner of the main loop calls `ready()` once serving, `status()` on state changes, `reloading()` then `ready()`
around a SIGHUP reload, `stopping()` on SIGTERM, and `watchdog()` every `watchdog_interval()` seconds from
something that proves the daemon still makes progress (a scheduler tick, not a free-running timer thread).
"""

from __future__ import annotations

import os
import socket
import time

import structlog

__all__ = ["notify", "ready", "reloading", "status", "stopping", "watchdog", "watchdog_interval"]

_failure_logged = False


def _address(name: str) -> str | None:
    if name.startswith("@"):
        return "\0" + name[1:]  # abstract namespace
    if name.startswith("/"):
        return name
    return None  # vsock: and other forms systemd may use for VMs: not ours to handle


def notify(*lines: str) -> bool:
    """Send `lines` ("READY=1", "STATUS=...") as one message; True if sent, False if unset or it failed."""
    global _failure_logged
    name = os.environ.get("NOTIFY_SOCKET")
    if not name or not lines:
        return False
    address = _address(name)
    try:
        if address is None:
            raise OSError(f"unsupported NOTIFY_SOCKET form {name!r}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode("utf-8", "replace"), address)
        return True
    except OSError as exc:
        if not _failure_logged:
            _failure_logged = True
            structlog.get_logger(__name__).debug("sd_notify_failed", error=str(exc), error_kind="sd_notify")
        return False


def _status_line(text: str) -> str:
    return "STATUS=" + " ".join(text.split())  # one line: a newline would start a new assignment


def ready(status: str | None = None) -> bool:
    return notify("READY=1", *([_status_line(status)] if status else []))


def status(text: str) -> bool:
    return notify(_status_line(text))


def reloading(status: str | None = None) -> bool:
    """Before applying a reload; send `ready()` when done. MONOTONIC_USEC lets newer systemd match the two."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *([_status_line(status)] if status else []))


def stopping(status: str | None = None) -> bool:
    return notify("STOPPING=1", *([_status_line(status)] if status else []))


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between two `watchdog()` pings: half of `WatchdogSec=`; None when the watchdog is off or meant for
    another process ($WATCHDOG_PID names a different pid) or the variables are garbled."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid is not None and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000 / 2
