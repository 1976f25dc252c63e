"""What the daemon counts, as an interface, and its health report.

The pipeline and the scheduler call a tiny interface, `Metrics` — `submitted(service)`, `polled(service)`,
`error(service, kind)`, `downloaded(service, nbytes)`, `tick(name, seconds)`, `token_days_left(service, owner, days)`,
`notification(channel, outcome)` — whose default, `NO_METRICS`, does nothing, so no caller cares whether metrics are
on. When `metrics.listen` is set, `daemon.prometheus` records them and serves them, with `health_report`, over HTTP.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


class Metrics:
    """The instrumentation interface; this base class records nothing (`NO_METRICS`)."""

    def submitted(self, service: str) -> None:
        """A job was accepted by a service (a new remote job)."""

    def polled(self, service: str) -> None:
        """A job's remote status was read."""

    def error(self, service: str, kind: str) -> None:
        """A step met a service error of this `kind` (`ServiceError.kind`)."""

    def downloaded(self, service: str, nbytes: int) -> None:
        """A result file of `nbytes` was downloaded and verified."""

    def tick(self, name: str, seconds: float) -> None:
        """A scheduler tick ran for `seconds`."""

    def token_days_left(self, service: str, owner: str, days: float) -> None:
        """The owner's API token for the service expires in `days` (negative: expired)."""

    def notification(self, channel: str, outcome: str) -> None:
        """A notification attempt on `channel` ("webhook", "email") ended with `outcome` ("sent", "failed")."""


NO_METRICS = Metrics()


def health_report(
    ping: Callable[[], None],
    ticks_healthy: Callable[[], bool],
    *,
    stopping: Callable[[], bool] = lambda: False,
    describe_error: Callable[[BaseException], str] = lambda exc: type(exc).__name__,
    extra: Callable[[], Mapping[str, Any]] | None = None,
) -> tuple[bool, dict[str, Any]]:
    """(healthy, report). Unhealthy when `ping()` raises, `ticks_healthy()` is false, or the daemon is stopping.

    `describe_error` turns a database error into a line fit to show (no password); `extra()` adds informational
    entries (services) that never make the report unhealthy."""
    report: dict[str, Any] = {}
    healthy = True
    try:
        ping()
        report["database"] = "ok"
    except Exception as exc:
        healthy = False
        report["database"] = describe_error(exc)
    if stopping():
        healthy = False
        report["scheduler"] = "stopping"
    elif ticks_healthy():
        report["scheduler"] = "ok"
    else:
        healthy = False
        report["scheduler"] = "ticks have not run for too long"
    if extra is not None:
        try:
            report.update(extra())
        except Exception as exc:
            report["details"] = f"unavailable ({type(exc).__name__})"
    return healthy, {"status": "ok" if healthy else "unhealthy", **report}
