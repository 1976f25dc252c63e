"""The adapter interface every service type implements (the values that cross it are in `daemon.remote`).

Adapters speak HTTP and nothing else: they never touch the database, the scheduler or the file system beyond
reading the input files they upload. None of it shows in this interface: a result file comes as a
`daemon.remote.ByteStream`, and every failure they report is one of `daemon.services.errors`.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

from daemon.remote import ByteStream, RemoteJob, RemoteOutput, RemoteStatus, Resume, ServiceCheck, SubmitRequest


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

    def stream_output(self, output: RemoteOutput, *, resume: Resume | None = None
                      ) -> contextlib.AbstractContextManager[ByteStream]:
        """Open one result file's body, to read inside the `with` block; each call may spend one of the server's
        download counts. A refusal is raised on entering, before any body is handed out. With `resume`, the rest of
        the file from `resume.offset` is asked for (HTTP Range); the body's `start` says whether it came."""

    def check(self) -> ServiceCheck:
        """Reachability, token validity and expiry, and the panels the server offers."""

    def close(self) -> None: ...

