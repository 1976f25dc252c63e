"""What the daemon asks of its services apart from jobs: the daily check of each owner's token on each service
(validity, expiry) and the probes of an owner blocked on a service by their token.

A blocked owner is probed `blocked_probe_initial` after the block began, then at doubling waits up to
`blocked_probe_max`: a token rejected for a moment, or a server that was briefly wrong, is back in seconds; one that
stays bad is not asked every few seconds. A token file that changes is probed at once.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable

import structlog

from daemon.config import Config
from daemon.credentials import fingerprint
from daemon.db.models import utcnow
from daemon.db.queue import JobQueue
from daemon.db.service_status import ServiceStatuses
from daemon.metrics import Metrics
from daemon.services.base import ServiceAdapter

log = structlog.get_logger("daemon.probes")

TOKEN_CHECK_INTERVAL = 24 * 3600.0
TOKEN_WARN_DAYS = 7


Key = tuple[str, str]  # (service, owner)


class ServiceProbes:
    """Token checks and probes of blocked owners, with what they remember between ticks. Called from the scheduler's
    maintenance and probe ticks (one thread each; a (service, owner) is checked by only one of them at a time, since
    a blocked one is the probe tick's and an unblocked one the maintenance tick's)."""

    def __init__(self, queue: JobQueue, services: ServiceStatuses, metrics: Metrics, *,
                 on_unblocked: Callable[[str, str], None]) -> None:
        self.queue = queue
        self.services = services
        self.metrics = metrics
        self._on_unblocked = on_unblocked
        self._checked: dict[Key, float] = {}
        #: Per blocked (service, owner): (when its block began, the wait before the next probe) once it was probed.
        self._probe_wait: dict[Key, tuple[dt.datetime, float]] = {}
        self._fingerprints: dict[Key, str | None] = {}

    def forget(self) -> None:
        """Check every token again soon: a reload may have been for a new token."""
        self._checked.clear()
        self._probe_wait.clear()

    def probe_blocked(self, config: Config, service: str, owner: str, adapter: ServiceAdapter,
                      since: dt.datetime) -> bool:
        """Verify a blocked owner's token on a service when a probe is due. True when the owner was unblocked."""
        s = config.scheduler
        name = (service, owner)
        now_fingerprint = fingerprint(config, service, owner)
        changed = now_fingerprint != self._fingerprints.get(name)
        probed = self._probe_wait.get(name)
        if probed is None or probed[0] != since:  # not probed since this block began
            wait = None
            due = utcnow() >= since + dt.timedelta(seconds=s.blocked_probe_initial)
        else:
            wait = probed[1]
            due = time.monotonic() - self._checked.get(name, 0.0) >= wait
        if not (changed or due):
            return False
        self._fingerprints[name] = now_fingerprint
        self._checked[name] = time.monotonic()
        check = adapter.check()
        if check.reachable and check.token_valid is not False:
            returned = self.queue.unblock_owner(service, owner, "service usable again")
            self._probe_wait.pop(name, None)
            log.info("service_unblocked", service=service, owner=owner, jobs_returned=returned,
                     why="token changed" if changed else "token verified")
            self._on_unblocked(service, owner)
            return True
        self._probe_wait[name] = (since, min(s.blocked_probe_max, 2 * (wait or s.blocked_probe_initial)))
        return False

    def check_token(self, config: Config, service: str, owner: str, adapter: ServiceAdapter) -> None:
        """Once a day: is the service reachable, is the owner's token valid, when does it expire (warned a week
        ahead, to that owner's name)."""
        name = (service, owner)
        if time.monotonic() - self._checked.get(name, -TOKEN_CHECK_INTERVAL) < TOKEN_CHECK_INTERVAL:
            return
        self._checked[name] = time.monotonic()
        self._fingerprints[name] = fingerprint(config, service, owner)
        check = adapter.check()
        if not check.reachable:
            log.warning("service_unreachable", service=service, owner=owner, reason=check.message)
            self._checked[name] -= TOKEN_CHECK_INTERVAL - config.scheduler.blocked_probe_max  # sooner
            return
        self.services.record_token(service, owner, expires=check.token_expires)
        if check.token_valid is False:
            # Every call with this token would answer 401: block the owner now, as a 401 from a job would, and say
            # so once whichever of the two notices first.
            reason = f"token rejected by the server's token check: {check.message or 'invalid'}"
            newly, parked = self.queue.block_owner(service, owner, reason)
            if newly:
                log.error("service_blocked", service=service, owner=owner, reason=reason, error_kind="unauthorized",
                          jobs_waiting=parked)
        elif check.token_expires is not None:
            days = (check.token_expires - utcnow()).total_seconds() / 86400
            self.metrics.token_days_left(service, owner, days)
            if days <= 0:
                log.error("token_expired", service=service, owner=owner, expired=check.token_expires.isoformat(),
                          error_kind="token_expired")
            elif days <= TOKEN_WARN_DAYS:
                log.warning("token_expires_soon", service=service, owner=owner, days_left=round(days, 1),
                            expires=check.token_expires.isoformat())
