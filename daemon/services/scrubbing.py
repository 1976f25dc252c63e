"""The adapters' boundary: no secret a server echoes back gets past it.

A server may put the token, a job's password or a download hash into anything it says: a failure reason, a progress
line, an error body, a WES stderr. Whatever passes here is stored (`jobs.error`, `jobs.progress`,
`job_events.reason`, `service_status`) and shown (`show`, `jobs`, webhooks, e-mails), so every text from the server
is scrubbed here, once, by `daemon.logging.scrub`: the messages of the `ServiceError`s raised, and the raw state,
progress and failure message of a status, and the message and user of a check.

The secrets that apply are known here, not guessed: the service's token (read through the adapter's own reader),
those of the call (a submit's password, a download's URL and hash, the download URLs and hashes a status lists) and
those of the job being worked on, which the pipeline gives with `for_job`; the registered secrets go too.

Identifiers are passed as they are: a remote job id and an output's name address things on the server and on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from daemon.logging import scrub
from daemon.remote import ByteStream, RemoteJob, RemoteOutput, RemoteStatus, Resume, ServiceCheck, SubmitRequest
from daemon.services.base import ServiceAdapter
from daemon.services.errors import ServiceError


class ScrubbingAdapter:
    """`inner` with every text it hands out scrubbed of `token()`, `secrets` and the call's own secrets."""

    def __init__(
        self,
        inner: ServiceAdapter,
        *,
        token: Callable[[], str | None] | None = None,
        secrets: Iterable[str | None] = (),
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self._token = token
        self._secrets = tuple(s for s in secrets if s)

    def for_job(self, secrets: Iterable[str | None]) -> ScrubbingAdapter:
        """This adapter, also scrubbing one job's `secrets` (its password in clear, its download URLs and hashes)."""
        return ScrubbingAdapter(self.inner, token=self._token, secrets=(*self._secrets, *secrets))

    def __getattr__(self, name: str) -> Any:
        # What is not part of the adapter interface (a service's config, a WES adapter's page size) is the inner
        # adapter's; everything that carries server text is wrapped below.
        return getattr(self.inner, name)

    # -- the adapter interface -----------------------------------------------------------------------------------

    def submit(self, request: SubmitRequest) -> str:
        with self._scrubbing(request.password):
            return self.inner.submit(request)

    def find_submitted(self, job_id: str) -> str | None:
        with self._scrubbing():
            return self.inner.find_submitted(job_id)

    def status(self, remote_id: str) -> RemoteStatus:
        with self._scrubbing():
            status = self.inner.status(remote_id)
        secrets = self._all(*_output_secrets(status.outputs))
        return dataclasses.replace(
            status,
            raw_state=scrub(status.raw_state, secrets),
            progress=None if status.progress is None else scrub(status.progress, secrets),
            message=None if status.message is None else scrub(status.message, secrets),
        )

    def cancel(self, remote_id: str) -> None:
        with self._scrubbing():
            self.inner.cancel(remote_id)

    def restart(self, remote_id: str) -> None:
        with self._scrubbing():
            self.inner.restart(remote_id)

    def list_jobs(self, limit: int = 100) -> list[RemoteJob]:
        with self._scrubbing():
            jobs = self.inner.list_jobs(limit)
        secrets = self._all()
        return [dataclasses.replace(job, raw_state=scrub(job.raw_state, secrets)) for job in jobs]

    @contextlib.contextmanager
    def stream_output(self, output: RemoteOutput, *, resume: Resume | None = None) -> Iterator[ByteStream]:
        # The body's own errors are scrubbed as it raises them (the caller may handle them inside its `with` block);
        # whatever else leaves the block comes through here too. A resume's source (a presigned URL) is a secret too.
        secrets = [*_output_secrets((output,)), resume.source if resume is not None else None]
        with self._scrubbing(*secrets), self.inner.stream_output(output, resume=resume) as body:
            yield _ScrubbedBody(body, lambda: self._scrubbing(*secrets))

    def check(self) -> ServiceCheck:
        with self._scrubbing():
            check = self.inner.check()
        secrets = self._all()
        return dataclasses.replace(
            check,
            message=None if check.message is None else scrub(check.message, secrets),
            user=None if check.user is None else scrub(check.user, secrets),
        )

    def close(self) -> None:
        self.inner.close()

    # -- plumbing ------------------------------------------------------------------------------------------------

    def _all(self, *extra: str | None) -> tuple[str | None, ...]:
        token = None
        if self._token is not None:
            # The reader is the adapter's own; one that fails here has failed the call already, or will.
            with contextlib.suppress(Exception):
                token = self._token()
        return (token, *self._secrets, *extra)

    @contextlib.contextmanager
    def _scrubbing(self, *extra: str | None) -> Iterator[None]:
        try:
            yield
        except ServiceError as exc:
            message = scrub(exc.message, self._all(*extra))
            if message != exc.message:
                exc.message = message
                exc.args = (message,)
            raise


class _ScrubbedBody:
    """A `ByteStream` whose errors are scrubbed as they are raised."""

    def __init__(self, inner: ByteStream, scrubbing: Callable[[], contextlib.AbstractContextManager[None]]) -> None:
        self._inner = inner
        self._scrubbing = scrubbing

    @property
    def length(self) -> int | None:
        with self._scrubbing():
            return self._inner.length

    @property
    def received(self) -> int:
        return self._inner.received

    @property
    def start(self) -> int:
        with self._scrubbing():
            return self._inner.start

    @property
    def source(self) -> str | None:
        return self._inner.source

    @property
    def validator(self) -> str | None:
        return self._inner.validator

    def chunks(self, size: int | None = None) -> Iterator[bytes]:
        with self._scrubbing():
            yield from self._inner.chunks(size)


def _output_secrets(outputs: Iterable[RemoteOutput]) -> list[str | None]:
    return [secret for output in outputs for secret in (output.url, output.remote_hash)]


def for_job(adapter: ServiceAdapter, secrets: Iterable[str | None]) -> ScrubbingAdapter:
    """`adapter` behind the boundary, also scrubbing one job's `secrets` (an adapter built elsewhere than
    `build_adapter`, a test's, gets the boundary here)."""
    if isinstance(adapter, ScrubbingAdapter):
        return adapter.for_job(secrets)
    return ScrubbingAdapter(adapter, secrets=secrets)


__all__ = ["ScrubbingAdapter", "for_job"]
