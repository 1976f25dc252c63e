"""The values that cross the adapter boundary: what we ask of a remote service and what it answers, in the
daemon's own terms. Both the adapters (`daemon.services`) and the store (`daemon.db`) speak them, so they live below
both and import neither."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from daemon.states import RemoteKind


@dataclass(frozen=True, kw_only=True)
class JobParameters:
    """What a user chooses for an imputation job: the one list of them. A submission (`daemon.submission`), a job
    to store (`daemon.db.store.NewJob`) and a submit request are each these plus what they add; a stored job's row
    has a column of the same name for each."""

    panel: str  # our config's panel name; in a SubmitRequest, the service's remote panel id
    build: str
    population: str | None = None
    phasing: str | None = None
    r2_filter: str | None = None
    mode: str | None = None
    name: str | None = None
    #: The result zips' password: chosen by the user, sealed at rest, revealed only to submit and to open zips.
    password: str | None = field(default=None, repr=False)


PARAMETER_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(JobParameters))


def parameters_of(source: object, **overrides: Any) -> dict[str, Any]:
    """The job parameters that `source` (a Submission, a stored job) carries, by name, with `overrides` applied."""
    return {name: overrides[name] if name in overrides else getattr(source, name) for name in PARAMETER_NAMES}


@dataclass(frozen=True, kw_only=True)
class SubmitRequest(JobParameters):
    """Everything needed to start one remote job for one of our jobs (`panel`: the service's remote panel id)."""

    job_id: str  # ours; carried as Cloudgene `job-name` / WES `tags` so a lost answer can be found again
    files: Sequence[Path]
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
    #: A content checksum published by the server, as (algorithm, hex digest); Cloudgene's API publishes none (its
    #: zips come with `.md5` files instead).
    checksum: tuple[str, str] | None = None
    #: The size in bytes the server published (a WES `File`'s `size`); None when it published none.
    size: int | None = None


@dataclass(frozen=True)
class Resume:
    """Where a broken download of a file goes on from: its first `offset` bytes are stored already. `source` is the
    URL the body came from (after redirects: an S3-backed Cloudgene's presigned URL, good for an hour, whose GET
    spends no download count) and `source_at` when it was had; `validator` the answer's ETag or Last-Modified, sent
    as If-Range so that a file changed meanwhile comes whole."""

    offset: int
    source: str | None = field(default=None, repr=False)
    source_at: float = 0.0
    validator: str | None = None


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

    @property
    def start(self) -> int:
        """Where in the file the body begins: 0 for the whole file, the asked offset when a Range was honoured
        (206); `length` is then the length of the rest."""

    @property
    def source(self) -> str | None:
        """The URL the body came from, after redirects (for a `Resume`); None when it is not an HTTP body."""

    @property
    def validator(self) -> str | None:
        """The answer's ETag, else its Last-Modified (for a `Resume`'s If-Range)."""

    def chunks(self, size: int | None = None) -> Iterator[bytes]:
        """The file's bytes, in pieces of `size` (None: as they arrive); the bytes as sent when they are not
        content-encoded, decoded otherwise."""


@dataclass(frozen=True)
class QcReport:
    """What the server's quality control said of the input, as figures (None: not reported)."""

    #: Share of the input's variants that the reference panel holds, in percent.
    reference_overlap: float | None = None
    matched: int | None = None
    allele_switches: int | None = None
    strand_flips: int | None = None
    strand_flips_and_allele_switches: int | None = None
    snps_excluded: int | None = None
    snps_remaining: int | None = None
    chunks_excluded: int | None = None
    #: The server's warnings about the input, one line each.
    warnings: tuple[str, ...] = ()
    #: The step that failed, when the job failed.
    failed_step: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The figures reported, JSON-ready (what `show --json`, notifications and the database carry)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["warnings"] = list(self.warnings)
        return {key: value for key, value in data.items() if value not in (None, [])}


@dataclass(frozen=True)
class RemoteStatus:
    kind: RemoteKind
    raw_state: str  # exactly what the server said, stored beside our state
    queue_position: int | None = None
    progress: str | None = None  # latest step / log message, for humans
    message: str | None = None  # the failure reason when kind is FAILED
    outputs: tuple[RemoteOutput, ...] = ()
    #: When the server will delete the results (Cloudgene `deletedOn`, set once the deletion is scheduled).
    retires_at: dt.datetime | None = None
    #: When kind is FAILED: the step that failed, as the server names it, and whether it is the check of the input
    #: (validation, quality control), which another submit of the same files would fail again.
    failed_step: str | None = None
    qc_failed: bool = False
    #: The quality control's figures and warnings, once the server reported any.
    qc: QcReport | None = None


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
