"""The values that cross the adapter boundary: what we ask of a remote service and what it answers, in the
daemon's own terms. Both the adapters (`daemon.services`) and the store (`daemon.db`) speak them, so they live below
both and import neither."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

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


class ByteStream(Protocol):
    """The body of a result file as the server sends it, read once while its `with` block lasts
    (`ServiceAdapter.stream_output`). It is only handed out for an answer that delivers the file: every refusal was
    raised as a `daemon.services.errors` error before. Failures while reading are those errors too: `CutOff` when the
    connection ended before the body was complete, `Transient` for the rest (kind "timeout", "connection", or
    "bad_response" for a body that cannot be decoded or a garbled declared length)."""

    @property
    def length(self) -> int | None:
        """The length the server declared for the body as sent (before any content decoding); None when it
        declared none."""

    @property
    def received(self) -> int:
        """The bytes received of the body so far, as sent (comparable with `length`)."""

    def chunks(self, size: int | None = None) -> Iterator[bytes]:
        """The file's bytes, in pieces of `size` (None: as they arrive); the bytes as sent when they are not
        content-encoded, decoded otherwise."""


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
