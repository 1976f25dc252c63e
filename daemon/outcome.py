"""What a step writes about a job and its files, as typed values: the pipeline decides them, the store writes them.

A column a step leaves alone is `KEEP`, not None: None is a value the step may write (clearing `error`, forgetting a
`remote_id`), so "unchanged" needs a marker of its own.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Self

from daemon.remote import RemoteOutput
from daemon.states import JobState, OutputState


class Keep(enum.Enum):
    KEEP = "keep"


#: The column keeps its stored value.
KEEP: Final = Keep.KEEP


@dataclass(frozen=True, kw_only=True)
class _Columns:
    """Columns that may each be KEEP: what is to be written, and the merge of two sets."""

    def values(self) -> dict[str, Any]:
        """The columns to write, by name."""
        return {f.name: value for f in dataclasses.fields(self) if (value := getattr(self, f.name)) is not KEEP}

    def __or__(self, later: Self) -> Self:
        """These columns with what `later` sets written over them."""
        return dataclasses.replace(self, **later.values())


@dataclass(frozen=True, kw_only=True)
class JobColumns(_Columns):
    """The job columns a step may set besides its state and next poll."""

    remote_id: str | None | Keep = KEEP
    submitted_at: dt.datetime | None | Keep = KEEP
    submit_attempts: int | Keep = KEEP
    cancel_sent_at: dt.datetime | None | Keep = KEEP
    retires_at: dt.datetime | None | Keep = KEEP
    retirement_warned_at: dt.datetime | None | Keep = KEEP
    qc: dict[str, Any] | None | Keep = KEEP
    restart_attempts: int | Keep = KEEP
    #: Fresh remote submissions of the job (an operator's retry, a resubmit policy's).
    retries: int | Keep = KEEP
    remote_state: str | None | Keep = KEEP
    queue_position: int | None | Keep = KEEP
    progress: str | None | Keep = KEEP
    #: Failed attempts of the current step in a row: what the backoff grows with.
    failures: int | Keep = KEEP
    error: str | None | Keep = KEEP
    error_kind: str | None | Keep = KEEP
    result_dir: str | None | Keep = KEEP


@dataclass(frozen=True, kw_only=True)
class OutputColumns(_Columns):
    """What became of one result file: the columns a download writes to its row."""

    state: OutputState | Keep = KEEP
    size: int | None | Keep = KEEP
    sha256: str | None | Keep = KEEP
    local_path: str | None | Keep = KEEP
    verified_at: dt.datetime | None | Keep = KEEP
    error: str | None | Keep = KEEP
    attempts: int | Keep = KEEP
    #: Served downloads that came out unusable (each spent one of the server's counts).
    bad_downloads: int | Keep = KEEP


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What one step decided about a job; `JobQueue.finish()` writes it in one transaction."""

    state: JobState | None = None  # None: unchanged
    reason: str | None = None  # for the event row when the state changes
    next_poll_in: float | None = None  # seconds; None leaves next_poll_at unchanged
    columns: JobColumns = field(default_factory=JobColumns)
    outputs: Sequence[RemoteOutput] = ()  # files a finished remote job offers, recorded as `record_outputs` does
    #: A warning for the job's history that is notified like a state change, though the state stays.
    warning: str | None = None

    def setting(self, columns: JobColumns) -> Outcome:
        """This outcome, also writing `columns` (over its own)."""
        return dataclasses.replace(self, columns=self.columns | columns)
