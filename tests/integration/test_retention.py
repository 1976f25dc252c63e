"""storage.keep_days: `imputationd cleanup --dry-run` lists, `cleanup` and the daemon's maintenance delete, on SQLite
and PostgreSQL; only finished jobs past the limit, only result folders inside storage.results_dir."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from daemon import retention
from daemon.cli import main
from daemon.config import Config, load_config
from daemon.db.admin import NewInput, NewJob
from daemon.db.engine import make_engine
from daemon.db.models import Job, JobEvent, JobInput, JobOutput, utcnow
from daemon.db.store import JobStore
from daemon.db.transitions import JobNotFound
from daemon.outcome import JobColumns, Outcome
from daemon.states import JobState


def write_config(tmp_path: Path, db_url: str, keep_days: int | None = 30) -> tuple[Path, Config]:
    path = tmp_path / "config.yaml"
    storage = {"state_dir": str(tmp_path / "state"), "results_dir": str(tmp_path / "results")}
    if keep_days is not None:
        storage["keep_days"] = keep_days
    path.write_text(yaml.safe_dump({"database": {"url": db_url}, "storage": storage}))
    return path, load_config(path)


class World:
    """Jobs in every situation that matters, finished at chosen times, with result folders."""

    def __init__(self, db_url: str, config: Config, outside: Path) -> None:
        self.engine = make_engine(db_url)
        self.store = JobStore(self.engine)
        self.config = config
        now = utcnow()
        self.old_completed = self.job(JobState.COMPLETED, now - dt.timedelta(days=40), files=True)
        self.old_failed = self.job(JobState.FAILED, now - dt.timedelta(days=31), files=False)
        self.recent = self.job(JobState.COMPLETED, now - dt.timedelta(days=2), files=True)
        self.old_pending = self.job(None, None, files=False, created=now - dt.timedelta(days=90))
        self.outside = self.job(JobState.CANCELLED, now - dt.timedelta(days=50), files=True, result_dir=outside)

    def job(self, state: JobState | None, finished: dt.datetime | None, *, files: bool,
            result_dir: Path | None = None, created: dt.datetime | None = None,
            inputs: tuple[Path, ...] = (Path("/in.vcf.gz"),)) -> uuid.UUID:
        new_inputs = [NewInput(path=str(path), size=1, sha256="0" * 64) for path in inputs]
        [job] = self.store.admin.create_group([NewJob(service="sim", panel="p", build="hg19", inputs=new_inputs)])
        folder = result_dir or self.config.storage.results_dir / str(job.id)
        if files:
            (folder / "statistics").mkdir(parents=True)
            (folder / "chr_20.zip").write_bytes(b"z" * 1000)
            (folder / "statistics" / "summary.txt").write_bytes(b"s" * 24)
        if state is not None:
            self.store.queue.claim_one(job.id, "t", lease_seconds=30)
            first = state if state in (JobState.FAILED, JobState.CANCELLED) else JobState.SUBMITTING
            self.store.queue.finish(job.id, "t", Outcome(state=first, columns=JobColumns(result_dir=str(folder))))
            if state is JobState.COMPLETED:
                for step in (JobState.DOWNLOADING, JobState.COMPLETED):
                    self.store.queue.claim_one(job.id, "t", lease_seconds=30)
                    self.store.queue.finish(job.id, "t", Outcome(state=step))
        with self.engine.begin() as conn:
            values = {}
            if finished is not None:
                values["finished_at"] = finished
            if created is not None:
                values["created_at"] = created
            if values:
                conn.execute(sa.update(Job).where(Job.id == job.id).values(**values))
        return job.id

    def exists(self, job_id: uuid.UUID) -> bool:
        try:
            self.store.admin.get(job_id)
        except JobNotFound:
            return False
        return True

    def folder(self, job_id: uuid.UUID) -> Path:
        return self.config.storage.results_dir / str(job_id)

    def rows(self, model, job_id: uuid.UUID) -> int:
        with self.engine.connect() as conn:
            return conn.scalar(sa.select(sa.func.count()).select_from(model).where(model.job_id == job_id))


@pytest.fixture
def world(db_url: str, tmp_path: Path):
    path, config = write_config(tmp_path, db_url)
    made = World(db_url, config, tmp_path / "elsewhere" / "results-of-old")
    made.config_path = path
    yield made
    made.engine.dispose()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_dry_run_lists_and_changes_nothing(world: World, capsys) -> None:
    code, out, err = run(capsys, "cleanup", "--dry-run", "-c", str(world.config_path))
    assert code == 1  # something is left alone: the operator should look
    assert str(world.old_completed)[:8] in out and str(world.old_failed)[:8] in out
    assert str(world.recent)[:8] not in out and str(world.old_pending)[:8] not in out
    assert "would delete 2 jobs finished more than 30 days ago (1024 bytes of results)" in out
    assert f"left alone: {world.outside}" in err and "outside storage.results_dir" in err
    assert all(world.exists(j) for j in (world.old_completed, world.old_failed, world.recent, world.outside))
    assert world.folder(world.old_completed).is_dir()

    code, out, _ = run(capsys, "cleanup", "--dry-run", "--json", "-c", str(world.config_path))
    listed = json.loads(out)
    assert listed["dry_run"] is True and listed["keep_days"] == 30
    assert {d["id"] for d in listed["deleted"]} == {str(world.old_completed), str(world.old_failed)}
    assert [d["bytes"] for d in listed["deleted"] if d["id"] == str(world.old_completed)] == [1024]
    assert [d["id"] for d in listed["left"]] == [str(world.outside)]


def test_cleanup_deletes_folders_and_rows(world: World, capsys) -> None:
    code, out, _ = run(capsys, "cleanup", "-c", str(world.config_path))
    assert code == 1 and "deleted 2 jobs" in out
    for gone in (world.old_completed, world.old_failed):
        assert not world.exists(gone)
        assert world.rows(JobEvent, gone) == world.rows(JobInput, gone) == world.rows(JobOutput, gone) == 0
    assert not world.folder(world.old_completed).exists()
    assert world.config.storage.results_dir.is_dir()  # only the job's own folder goes
    for kept in (world.recent, world.old_pending, world.outside):
        assert world.exists(kept)
    assert world.folder(world.recent).is_dir()
    outside = Path(world.store.admin.get(world.outside).result_dir)
    assert (outside / "chr_20.zip").is_file()

    code, out, _ = run(capsys, "cleanup", "--keep-days", "1", "--json", "-c", str(world.config_path))
    assert [d["id"] for d in json.loads(out)["deleted"]] == [str(world.recent)]


def test_an_upload_folder_goes_with_the_last_job_whose_inputs_are_in_it(world: World, tmp_path: Path) -> None:
    uploads = world.config.storage.uploads_dir
    shared, own, neighbour = (uploads / name for name in ("ab12", "cd34", "ab123"))
    users_file = tmp_path / "users" / "mine.vcf.gz"  # named on the command line: the user's, never ours to delete
    for path in (shared / "a.vcf.gz", own / "b.vcf.gz", neighbour / "c.vcf.gz", users_file):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"vcf")
    now = utcnow()
    # One upload sent to two services is two jobs; they finish at different times.
    first = world.job(JobState.COMPLETED, now - dt.timedelta(days=45), files=False, inputs=(shared / "a.vcf.gz",))
    second = world.job(JobState.FAILED, now - dt.timedelta(days=5), files=False, inputs=(shared / "a.vcf.gz",))
    world.job(JobState.FAILED, now - dt.timedelta(days=45), files=False, inputs=(own / "b.vcf.gz", users_file))
    world.job(JobState.COMPLETED, now - dt.timedelta(days=1), files=False, inputs=(neighbour / "c.vcf.gz",))

    retention.cleanup(world.store.expired, world.config.storage, 30)
    assert not world.exists(first) and world.exists(second)
    assert (shared / "a.vcf.gz").is_file()  # the second job may still be retried: its inputs stay
    assert not own.exists()
    assert users_file.is_file()
    assert (neighbour / "c.vcf.gz").is_file()  # "ab123" only begins like "ab12"

    retention.cleanup(world.store.expired, world.config.storage, 3)
    assert not world.exists(second) and not shared.exists()
    assert (neighbour / "c.vcf.gz").is_file() and uploads.is_dir()


def test_a_job_retried_meanwhile_is_not_deleted(world: World) -> None:
    world.store.admin.retry(world.old_failed)  # failed -> pending between the listing and the deletion
    report = retention.cleanup(world.store.expired, world.config.storage, 30)
    assert [c.job.id for c in report.deleted] == [world.old_completed]
    assert world.exists(world.old_failed)


def test_without_keep_days_cleanup_refuses(tmp_path: Path, sqlite_url: str, capsys) -> None:
    path, _ = write_config(tmp_path, sqlite_url, keep_days=None)
    code, _, err = run(capsys, "cleanup", "--dry-run", "-c", str(path))
    assert code == 2 and "storage.keep_days is not set" in err


def test_the_daemon_maintenance_applies_keep_days(world: World) -> None:
    from daemon.scheduler import Daemon

    daemon = Daemon(world.config)
    try:
        daemon.maintenance_tick()
        assert not world.exists(world.old_completed) and world.exists(world.recent)
        assert not world.folder(world.old_completed).exists()
    finally:
        daemon.pool.shutdown()
        daemon.engine.dispose()


def test_an_upload_folder_no_job_has_inputs_in_is_removed_a_day_after_its_last_write(tmp_path: Path,
                                                                                      sqlite_url: str) -> None:
    from daemon.scheduler import Daemon

    _, config = write_config(tmp_path, sqlite_url, keep_days=None)  # not results: removed whether or not it is set
    uploads = config.storage.uploads_dir
    abandoned, recent, used, slow = (uploads / name for name in ("dead", "fresh", "used", "slow"))
    day_ago = time.time() - retention.ABANDONED_UPLOAD_SECONDS - 60
    for folder in (abandoned, recent, used, slow):
        (folder / "part.vcf.gz").parent.mkdir(parents=True)
        (folder / "part.vcf.gz").write_bytes(b"vcf")
        if folder is not recent:
            os.utime(folder, (day_ago, day_ago))
            os.utime(folder / "part.vcf.gz", (day_ago, day_ago))
    os.utime(slow / "part.vcf.gz")  # an upload still being written: its file changes, its folder does not
    daemon = Daemon(config)
    try:
        daemon.store.admin.create_group([NewJob(service="sim", panel="p", build="hg19", inputs=[
            NewInput(path=str((used / "part.vcf.gz").resolve()), size=3, sha256="0" * 64)])])
        daemon.maintenance_tick()
    finally:
        daemon.pool.shutdown()
        daemon.engine.dispose()
    assert not abandoned.exists()
    assert (recent / "part.vcf.gz").is_file() and (used / "part.vcf.gz").is_file() and (slow / "part.vcf.gz").is_file()
