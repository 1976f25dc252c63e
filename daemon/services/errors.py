"""The one exception tree every service adapter raises; the scheduler handles it in one place.

- `Transient`: try again later (timeouts, connection errors, 5xx, 429, maintenance, "Only N jobs"). Never fails a job.
- `Blocked`: the service is unusable until an operator acts (bad, expired or revoked token).
- `Permanent`: a definite answer that fails the job (or, for downloads, that one file) with this reason.

Every error carries a stable `kind` for logs and metrics, and a message that never contains a token, password,
download hash or query string. An error from a submit also says whether the remote job may exist
(`may_have_created`): exactly-once submission rests on it.
"""

from __future__ import annotations


class ServiceError(Exception):
    kind: str = "service_error"
    #: For a request that creates a remote job (a submit): False only when nothing can have been made — the request
    #: never left, or the server refused it in its own words ("Only N jobs…", a 4xx with its message, a 401).
    #: True, the safe side, whenever the server may have acted or may still be acting on it: a timeout, a lost
    #: connection, a 5xx, a proxy's page, a garbled answer. Only the submitting adapter sets it.
    may_have_created: bool = True

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if kind is not None:
            self.kind = kind

    def __str__(self) -> str:
        return self.message


class Transient(ServiceError):
    kind = "transient"

    def __init__(
        self,
        message: str,
        *,
        kind: str | None = None,
        retry_after: float | None = None,
        service_wide: bool = False,
    ) -> None:
        super().__init__(message, kind=kind)
        #: Seconds the server asked us to wait (Retry-After), if it said.
        self.retry_after = retry_after
        #: True when the whole service is unavailable (maintenance, rate limit), not just this call.
        self.service_wide = service_wide


class CutOff(Transient):
    """The connection ended before the body the server had begun to send was complete."""

    kind = "connection"


class JobLimitReached(Transient):
    """Cloudgene's "Only N jobs per user can be executed simultaneously": wait for a slot."""

    kind = "job_limit"
    may_have_created = False

    def __init__(self, message: str, *, limit: int | None = None) -> None:
        super().__init__(message)
        self.limit = limit


class Blocked(ServiceError):
    kind = "blocked"


class Permanent(ServiceError):
    kind = "permanent"


#: The kinds of `Permanent` that say the server does not know the remote job (any more): Cloudgene's 404 "Job X not
#: found", any other service's HTTP 404.
NOT_FOUND_KINDS = frozenset({"remote_not_found", "http_404"})
