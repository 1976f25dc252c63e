"""Our job state machine and how each remote service's states map onto it.

The state machine is data: every question of the form "may a job go from A to B", "is this job finished",
"which states count against a service's concurrency limit" is answered here and nowhere else.
"""

from __future__ import annotations

import enum


class JobState(enum.StrEnum):
    PENDING = "pending"
    SUBMITTING = "submitting"
    QUEUED = "queued"
    RUNNING = "running"
    DOWNLOADING = "downloading"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    CANCEL_REQUESTED = "cancel_requested"
    BLOCKED = "blocked"


#: The finished states: nothing more happens to a job in one of them (but `imputationd retry` of a failed job).
TERMINAL: frozenset[JobState] = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})

#: States whose entry is worth telling people about (`notifications.on` picks among them).
NOTIFIABLE: frozenset[JobState] = TERMINAL | {JobState.BLOCKED}

#: States in which a job occupies one of the remote server's per-user job slots (Cloudgene counts waiting and
#: running jobs). A job that is downloading has finished remotely and no longer counts.
IN_FLIGHT: frozenset[JobState] = frozenset(
    {JobState.SUBMITTING, JobState.QUEUED, JobState.RUNNING, JobState.CANCEL_REQUESTED}
)

#: States whose remote job exists and is polled for its status (the poll tick's claims).
POLLED: frozenset[JobState] = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.CANCEL_REQUESTED})

_S = JobState
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # CANCEL_REQUESTED: a job back in the queue whose earlier submit may still become a remote job.
    _S.PENDING: frozenset({_S.SUBMITTING, _S.CANCELLED, _S.CANCEL_REQUESTED, _S.BLOCKED, _S.FAILED}),
    _S.SUBMITTING: frozenset(
        {_S.QUEUED, _S.RUNNING, _S.DOWNLOADING, _S.PENDING, _S.FAILED, _S.BLOCKED, _S.CANCEL_REQUESTED, _S.CANCELLED}
    ),
    # PENDING from QUEUED/RUNNING: a remote failure the service's resubmit policy sends again.
    _S.QUEUED: frozenset(
        {_S.RUNNING, _S.DOWNLOADING, _S.FAILED, _S.CANCELLED, _S.CANCEL_REQUESTED, _S.BLOCKED, _S.PENDING}
    ),
    _S.RUNNING: frozenset(
        {_S.QUEUED, _S.DOWNLOADING, _S.FAILED, _S.CANCELLED, _S.CANCEL_REQUESTED, _S.BLOCKED, _S.PENDING}
    ),
    _S.DOWNLOADING: frozenset({_S.COMPLETED, _S.FAILED, _S.CANCELLED}),
    _S.CANCEL_REQUESTED: frozenset({_S.CANCELLED, _S.FAILED, _S.DOWNLOADING, _S.BLOCKED}),
    _S.BLOCKED: frozenset({_S.PENDING, _S.QUEUED, _S.RUNNING, _S.CANCELLED, _S.CANCEL_REQUESTED, _S.FAILED}),
    _S.FAILED: frozenset({_S.PENDING}),  # `imputationd retry`
    _S.COMPLETED: frozenset(),
    _S.CANCELLED: frozenset(),
}


class InvalidTransition(ValueError):
    pass


def check_transition(current: JobState, new: JobState) -> None:
    if new not in TRANSITIONS[current]:
        raise InvalidTransition(f"a job cannot go from {current} to {new}")


class RemoteKind(enum.StrEnum):
    """What a remote state means for us, whatever service type reported it."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    #: Results were deleted remotely before we downloaded them.
    EXPIRED = "expired"
    #: Cloudgene DEAD: the server restarted under the job; `restart` may revive it.
    DEAD = "dead"
    #: A state we do not know (or WES PREEMPTED/UNKNOWN): keep polling, warn once.
    UNKNOWN = "unknown"


#: Cloudgene job states (`GET /jobs/{id}/status` → `state`), see reference/cloudgene-api.md.
CLOUDGENE_STATES: dict[int, tuple[str, RemoteKind]] = {
    -1: ("DEAD", RemoteKind.DEAD),
    1: ("WAITING", RemoteKind.QUEUED),
    2: ("RUNNING", RemoteKind.RUNNING),
    3: ("EXPORTING", RemoteKind.RUNNING),  # still writing results: not done
    4: ("SUCCESS", RemoteKind.SUCCEEDED),
    5: ("FAILED", RemoteKind.FAILED),
    6: ("CANCELED", RemoteKind.CANCELLED),
    7: ("RETIRED", RemoteKind.EXPIRED),
    8: ("SUCCESS_NOTIFIED", RemoteKind.SUCCEEDED),
    9: ("FAILED_NOTIFIED", RemoteKind.FAILED),
    10: ("DELETED", RemoteKind.EXPIRED),
}


#: Remote states that mean "cancelled" for a job whose cancel we sent, though they say "failed" otherwise: Cloudgene
#: moves a job it cancelled to 9 (FAILED_NOTIFIED) as well as a failed one (reference/cloudgene-api.md).
CANCELLED_WHEN_ASKED = frozenset({"FAILED_NOTIFIED"})


def cloudgene_kind(state: int) -> tuple[str, RemoteKind]:
    """Name and meaning of a Cloudgene state number; unknown numbers are kept raw and polled again."""
    return CLOUDGENE_STATES.get(state, (str(state), RemoteKind.UNKNOWN))


#: GA4GH WES 1.1 run states, see reference/wes-api.md.
WES_STATES: dict[str, RemoteKind] = {
    "QUEUED": RemoteKind.QUEUED,
    "INITIALIZING": RemoteKind.QUEUED,
    "RUNNING": RemoteKind.RUNNING,
    "PAUSED": RemoteKind.RUNNING,
    "CANCELING": RemoteKind.RUNNING,
    "COMPLETE": RemoteKind.SUCCEEDED,
    "EXECUTOR_ERROR": RemoteKind.FAILED,
    "SYSTEM_ERROR": RemoteKind.FAILED,
    "CANCELED": RemoteKind.CANCELLED,
    "PREEMPTED": RemoteKind.UNKNOWN,
    "UNKNOWN": RemoteKind.UNKNOWN,
}


def wes_kind(state: str) -> RemoteKind:
    return WES_STATES.get(state, RemoteKind.UNKNOWN)


class OutputState(enum.StrEnum):
    PENDING = "pending"
    VERIFIED = "verified"
    FAILED = "failed"
