"""The adapter interface every service type implements, and the values that cross it.

Adapters speak HTTP and nothing else: they never touch the database, the scheduler or the file system beyond
reading the input files they upload. Every failure they report is one of `daemon.services.errors`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx

from daemon.states import RemoteKind


@dataclass(frozen=True)
class SubmitRequest:
    """Everything needed to start one remote job for one of our jobs."""

    job_id: str  # ours; carried as Cloudgene `job-name` / WES `tags` so a lost answer can be found again
    files: Sequence[Path]
    panel: str  # the service's remote panel id (already mapped from our config name)
    build: str
    population: str | None = None
    phasing: str | None = None
    r2_filter: str | None = None
    mode: str | None = None
    password: str | None = None
    name: str | None = None
    aes_encryption: bool = False
    meta: bool = False


@dataclass
class SubmitProgress:
    """How far a submit got, to tell a refusal from an unknown outcome: whether its request went out, and the
    answer, if one came."""

    sent: bool = False
    answer: httpx.Response | None = None

    def may_have_created(self, error: BaseException, refused: Callable[[httpx.Response], bool]) -> bool:
        """False when nothing was sent (no connection could be made), or when the answer is a refusal by the
        adapter's rule `refused`; True otherwise. `error`: what the submit raised (its context, the httpx error)."""
        if not self.sent or isinstance(error.__context__, httpx.ConnectError | httpx.ConnectTimeout):
            return False
        return self.answer is None or not refused(self.answer)


@dataclass(frozen=True)
class RemoteOutput:
    """One result file the remote job offers.

    `url` and `remote_hash` are secrets (Cloudgene's hash is the download URL's capability token): store them,
    never log them. `repr` hides both.
    """

    name: str  # relative path as the server names it (may contain a subfolder)
    url: str = field(repr=False)
    remote_hash: str | None = field(default=None, repr=False)
    size_text: str | None = None  # Cloudgene's human, rounded-down size ("314 MB"); informative only
    downloads_left: int | None = None
    #: A content checksum published by the server, as (algorithm, hex digest); Cloudgene publishes none.
    checksum: tuple[str, str] | None = None


@dataclass(frozen=True)
class RemoteStatus:
    kind: RemoteKind
    raw_state: str  # exactly what the server said, stored beside our state
    queue_position: int | None = None
    progress: str | None = None  # latest step / log message, for humans
    message: str | None = None  # the failure reason when kind is FAILED
    outputs: tuple[RemoteOutput, ...] = ()


@dataclass(frozen=True)
class RemoteJob:
    """An entry of the remote job list, used to reconcile a submit whose answer was lost."""

    remote_id: str
    name: str | None
    raw_state: str


@dataclass(frozen=True)
class ServiceCheck:
    """What `imputationd services --check` and the token watch report."""

    reachable: bool
    token_valid: bool | None = None
    token_expires: dt.datetime | None = None
    user: str | None = None
    remote_panels: tuple[str, ...] = ()
    message: str | None = None


class ServiceAdapter(Protocol):
    """One remote service. Implementations are thread-safe: the scheduler's pool threads share one instance."""

    name: str

    def submit(self, request: SubmitRequest) -> str:
        """Start a remote job and return its remote id."""

    def find_submitted(self, job_id: str) -> str | None:
        """The remote id of a job we submitted earlier under our `job_id`, if the server has one."""

    def status(self, remote_id: str) -> RemoteStatus: ...

    def cancel(self, remote_id: str) -> None: ...

    def restart(self, remote_id: str) -> None:
        """Revive a job the server lost (Cloudgene DEAD). Raises `Permanent` where the service cannot."""

    def list_jobs(self, limit: int = 100) -> list[RemoteJob]: ...

    def stream_output(self, output: RemoteOutput) -> contextlib.AbstractContextManager[httpx.Response]:
        """Open a streaming GET for one result file; each call may spend one of the server's download counts."""

    def check(self) -> ServiceCheck:
        """Reachability, token validity and expiry, and the panels the server offers."""

    def close(self) -> None: ...

