"""The one exception tree every service adapter raises; the scheduler handles it in one place.

- `Transient`: try again later (timeouts, connection errors, 5xx, 429, maintenance, "Only N jobs"). Never fails a job.
- `Blocked`: the service is unusable until an operator acts (bad, expired or revoked token).
- `Permanent`: a definite answer that fails the job (or, for downloads, that one file) with this reason.

Every error carries a stable `kind` for logs and metrics, and a message that never contains a token, password,
download hash or query string.
"""

from __future__ import annotations


class ServiceError(Exception):
    kind: str = "service_error"

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


class JobLimitReached(Transient):
    """Cloudgene's "Only N jobs per user can be executed simultaneously": wait for a slot."""

    kind = "job_limit"

    def __init__(self, message: str, *, limit: int | None = None) -> None:
        super().__init__(message)
        self.limit = limit


class Blocked(ServiceError):
    kind = "blocked"


class Permanent(ServiceError):
    kind = "permanent"
