"""The scheduler's ticks, in process: what a failing tick logs."""

from __future__ import annotations

from pathlib import Path

from structlog.testing import capture_logs
from support.ops_support import daemon_config

from daemon.scheduler import Daemon, Tick


def test_a_tick_cut_short_by_the_stop_is_not_logged_as_a_failure(tmp_path: Path, sqlite_url: str) -> None:
    # The service is never reached: nothing listens on port 9.
    daemon = Daemon(daemon_config(tmp_path, sqlite_url, base_url="http://127.0.0.1:9", token="t0ken"))

    def closed_under_it(d: Daemon, *, stopping: bool) -> None:
        if stopping:  # the stop closes the clients while this tick waits on one of them
            d.request_stop()
        raise RuntimeError("Cannot send a request, as the client has been closed.")

    try:
        with capture_logs() as logs:
            daemon._tick(Tick("maintenance", lambda s: 60.0, lambda d: closed_under_it(d, stopping=False)))()
            daemon._tick(Tick("maintenance", lambda s: 60.0, lambda d: closed_under_it(d, stopping=True)))()
    finally:
        daemon.pool.shutdown()
        daemon.engine.dispose()
    events = [(line["event"], line["log_level"]) for line in logs if line["event"].startswith("tick_")]
    assert events == [("tick_failed", "error"), ("tick_cut_short", "warning")]
