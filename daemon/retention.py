"""`storage.keep_days`: delete finished jobs — their result directories and their rows — some days after they finished.

A job qualifies when it is completed, failed or cancelled and finished more than `keep_days` ago. For each one, in a
transaction that holds its row (so an operator's `retry` at that moment either wins or waits), the result directory
is removed, then the row with its inputs, outputs, events; an upload folder of the API's goes with the last job
whose inputs are in it. Only directories inside `storage.results_dir` are ever removed: a job whose result
directory lies elsewhere (results_dir changed since) is left alone, row and files, and listed as such. The
maintenance tick runs this at most once an hour; `imputationd cleanup [--dry-run]` runs it now.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from daemon.config import StorageConfig
from daemon.db.expired import ExpiredJob, ExpiredJobs
from daemon.db.models import Job, utcnow

log = structlog.get_logger("daemon.retention")

#: Most jobs one pass deletes; the next pass takes the rest.
BATCH = 500
#: An upload folder that no job has an input in is abandoned once nothing was written to it for this long: its
#: request died before its job was stored (the daemon stopped, the connection lost). A live upload keeps writing.
ABANDONED_UPLOAD_SECONDS = 86400.0


class OutsideResults(Exception):
    """The job's result directory is not inside storage.results_dir: not ours to delete."""


@dataclass(frozen=True)
class Candidate:
    job: ExpiredJob
    path: Path | None  # the result directory that would go (None: nothing on disk)
    size: int  # bytes under it
    problem: str | None = None  # why it is left alone


@dataclass
class Report:
    deleted: list[Candidate] = field(default_factory=list)
    skipped: list[Candidate] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(c.size for c in self.deleted)


def cutoff(keep_days: int, now: dt.datetime | None = None) -> dt.datetime:
    return (now or utcnow()) - dt.timedelta(days=keep_days)


def result_path(storage: StorageConfig, job_id: object, result_dir: str | None) -> Path:
    return Path(result_dir) if result_dir else storage.results_dir / str(job_id)


def _inside(path: Path, root: Path) -> bool:
    real, base = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    return real != base and real.is_relative_to(base)


def _size(path: Path) -> int:
    total = 0
    for top, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(top, name)).st_size
            except OSError:
                pass
    return total


def _candidate(storage: StorageConfig, job: ExpiredJob) -> Candidate:
    path = result_path(storage, job.id, job.result_dir)
    if not os.path.lexists(path):
        return Candidate(job, None, 0)
    if not _inside(path, storage.results_dir):
        return Candidate(job, path, 0, f"{path} is outside storage.results_dir ({storage.results_dir}); left alone")
    return Candidate(job, path, _size(path))


def plan(expired: ExpiredJobs, storage: StorageConfig, keep_days: int, *, now: dt.datetime | None = None,
         limit: int = BATCH) -> list[Candidate]:
    """What a cleanup would do now (`cleanup --dry-run`)."""
    return [_candidate(storage, job) for job in expired.finished_before(cutoff(keep_days, now), limit=limit)]


def cleanup(expired: ExpiredJobs, storage: StorageConfig, keep_days: int, *, now: dt.datetime | None = None,
            limit: int = BATCH) -> Report:
    """Delete what `plan` lists, job by job; a job that changed meanwhile (retried, taken) is skipped."""
    limit_at = cutoff(keep_days, now)
    report = Report()
    # Upload folders of the deleted jobs, each with the job that held it: removed at the end if no job still does.
    uploads: dict[Path, str] = {}
    for candidate in plan(expired, storage, keep_days, now=now, limit=limit):
        if candidate.problem is not None:
            report.skipped.append(candidate)
            log.warning("retention_skipped", job_id=str(candidate.job.id), reason=candidate.problem,
                        error_kind="retention")
            continue

        def remove_files(job: Job, candidate: Candidate = candidate) -> None:
            uploads.update(dict.fromkeys(_upload_folders(job, storage), str(job.id)))
            if candidate.path is not None:
                # Check again under the row lock: the path is what the row says now.
                path = result_path(storage, job.id, job.result_dir)
                if not _inside(path, storage.results_dir):
                    raise OutsideResults(f"{path} is outside storage.results_dir")
                try:
                    shutil.rmtree(path)
                except FileNotFoundError:  # gone already (another daemon, an operator)
                    pass

        try:
            deleted = expired.delete(candidate.job.id, limit_at, before_delete=remove_files)
        except (OSError, OutsideResults) as exc:
            problem = f"could not delete {candidate.path}: {getattr(exc, 'strerror', None) or exc}"
            report.skipped.append(Candidate(candidate.job, candidate.path, candidate.size, problem))
            log.error("retention_failed", job_id=str(candidate.job.id), reason=problem, error_kind="retention")
            continue
        if deleted:
            report.deleted.append(candidate)
            log.info("job_deleted", job_id=str(candidate.job.id), service=candidate.job.service,
                     state=candidate.job.state.value, finished_at=candidate.job.finished_at.isoformat(),
                     bytes=candidate.size, reason=f"finished more than {keep_days} days ago")
    # One upload sent to several services is several jobs: a folder goes with the last of them. A job whose deletion
    # failed still holds its inputs, so its folder stays.
    for folder in _unused_uploads(expired, storage, uploads):
        shutil.rmtree(folder, ignore_errors=True)
        log.info("upload_deleted", job_id=uploads[folder], folder=str(folder))
    return report


def remove_abandoned_uploads(expired: ExpiredJobs, storage: StorageConfig, *, now: float | None = None) -> list[Path]:
    """Remove the upload folders that no job has inputs in and that nothing was written to for
    `ABANDONED_UPLOAD_SECONDS`; returns them. Runs whether or not `keep_days` is set: they are nobody's results."""
    now = time.time() if now is None else now
    root = storage.uploads_dir.resolve()  # inputs are stored resolved
    try:
        folders = [path for path in root.iterdir() if path.is_dir() and not path.is_symlink()]
    except FileNotFoundError:
        return []
    stale = [folder for folder in folders if now - _last_written(folder) >= ABANDONED_UPLOAD_SECONDS]
    removed = _unused_uploads(expired, storage, stale)
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
        log.info("upload_abandoned_deleted", folder=str(folder), reason="no job has inputs in it")
    return removed


def _last_written(folder: Path) -> float:
    """The newest modification time of `folder` and of everything under it."""
    newest = folder.lstat().st_mtime
    for parent, _, files in os.walk(folder):
        for name in files:
            try:
                newest = max(newest, os.lstat(os.path.join(parent, name)).st_mtime)
            except FileNotFoundError:
                pass
    return newest


def _upload_folders(job: Job, storage: StorageConfig) -> set[Path]:
    """The API's upload folders (`storage.uploads_dir/<id>/`) that hold the job's inputs; inputs named on the
    command line are the user's files, never deleted."""
    root = storage.uploads_dir.resolve()  # inputs are stored resolved
    return {Path(item.path).parent for item in job.inputs if Path(item.path).parent.parent == root}


def _unused_uploads(expired: ExpiredJobs, storage: StorageConfig, folders: Iterable[Path]) -> list[Path]:
    """Those of `folders` (upload folders, resolved) that no job has an input in."""
    folders = set(folders)
    if not folders:
        return []
    return sorted(folders - expired.input_folders(storage.uploads_dir.resolve()))


__all__ = ["Candidate", "Report", "cleanup", "cutoff", "plan", "remove_abandoned_uploads", "result_path"]
