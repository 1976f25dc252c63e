"""The adapter interface every service type implements (the values that cross it are in `daemon.remote`).

Adapters speak HTTP and nothing else: they never touch the database, the scheduler or the file system beyond
reading the input files they upload. Every failure they report is one of `daemon.services.errors`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import httpx

from daemon.remote import RemoteJob, RemoteOutput, RemoteStatus, ServiceCheck, SubmitRequest


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

