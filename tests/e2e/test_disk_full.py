"""Disk full while downloading: the file is retried later, the job is never failed, no partial file is taken for
a result, and once space is freed the job completes with files byte-identical to what the server served.

How the disk fills: the results directory is a small tmpfs (`mount -t tmpfs -o size=6m,nr_inodes=64`), mounted for
the test and unmounted after. That needs root with CAP_SYS_ADMIN (CI runs the suite as root in its container); where
mounting is not permitted the test is skipped with the reason (and fails under CI). (RLIMIT_FSIZE was the other
candidate: it caps every file the daemon writes — its SQLite database and log included — and gives EFBIG, not
ENOSPC, so it tests something else; a loop-mounted image needs the same privilege as tmpfs.)

Three ways a disk is full, one job each, on the real daemon process:

1. not enough room for the file (a filler leaves 64 KB; the result zip is about 420 KB) — and the disk stays full
   for longer than the server's download counter (set to 4) would allow if each retry spent a download;
2. the disk fills up while a 1.3 MB zip streams in (the simulator paces it; the test fills the disk as soon as the
   temp file has bytes) — ENOSPC in the middle of a write;
3. no inodes left: the job's result folder cannot even be created.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.chaos_support import check_end_state, partial_files, report, submit_jobs
from support.daemon_harness import DaemonConfig, DaemonProcess, JobDB, simulator, wait_until
from support.prerequisites import require_tool

from daemon.simulator import server as sim_server
from daemon.simulator.vcf import write_sample_vcf
from daemon.states import JobState

DOWNLOAD_LIMIT = 4  # each GET spends one; a retry loop that spends them fails the job


@contextlib.contextmanager
def tmpfs(path: Path, *, size: str, inodes: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},nr_inodes={inodes},mode=0750", "tmpfs",
                           str(path)], capture_output=True, text=True)
    require_tool(done.returncode == 0, f"permission to mount a tmpfs to fill up ({done.stderr.strip()})",
                 "needs root with CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path, name: str, *, leave: int = 0) -> Path:
    """A filler file taking all the free space of `directory`'s file system but `leave` bytes (0: until ENOSPC)."""
    path = directory / name
    block = b"\0" * 65536
    with open(path, "ab") as fh:
        while True:
            free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
            if free <= leave:
                break
            try:
                fh.write(block[: max(4096, min(len(block), free - leave))])
                fh.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    return path


def use_up_inodes(directory: Path) -> list[Path]:
    made = []
    while True:
        path = directory / f"inode-{len(made)}"
        try:
            path.touch()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            return made
        made.append(path)


def test_disk_full_retries_later_and_completes(tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    pace = {"on": False}
    original_chunks = sim_server._Handler._chunks

    def paced_chunks(response):  # type: ignore[no-untyped-def]
        for offset, chunk in original_chunks(response):
            if pace["on"] and response.file is not None and response.file.suffix == ".zip":
                time.sleep(0.05)  # the server's pace, not a wait in the test: a slow link
            yield offset, chunk

    monkeypatch.setattr(sim_server._Handler, "_chunks", staticmethod(paced_chunks))
    started = time.monotonic()
    figures: dict[str, object] = {"how the disk fills": "tmpfs size=6m nr_inodes=64 mounted on the results dir"}
    with simulator(download_limit=DOWNLOAD_LIMIT) as sim:
        cfg = DaemonConfig(tmp_path, sqlite_url, sim, poll_interval=0.2,
                           scheduler={"backoff_initial": 0.2, "backoff_max": 0.5})
        config_path = cfg.write()
        (tmp_path / "inputs").mkdir()
        vcf = write_sample_vcf(tmp_path / "inputs" / "chr21.vcf.gz", chromosome="21", samples=30, variants=3000)
        # Over 1 MiB of zip: the daemon writes what it receives in 1 MiB pieces, so the disk can fill between two.
        big = write_sample_vcf(tmp_path / "inputs" / "chr22.vcf.gz", chromosome="22", samples=40, variants=8000)
        with tmpfs(cfg.results_dir, size="6m", inodes=64) as results, \
                DaemonProcess(config_path, name="diskfull") as daemon:
            db = JobDB(sqlite_url)
            try:
                def zip_row(job_id: uuid.UUID):  # type: ignore[no-untyped-def]
                    return next((o for o in db.outputs(job_id) if o.name.endswith(".zip")), None)

                def zip_gets(job_id: uuid.UUID) -> int:
                    remote = db.jobs([job_id])[0].remote_id
                    return sum(1 for d in sim.stats()["downloads"] if d["job"] == remote and d["name"].endswith(".zip"))

                def wait_disk_full(job_id: uuid.UUID, attempts: int) -> None:
                    def seen() -> bool:
                        daemon.require_alive()
                        row = zip_row(job_id)
                        assert db.states([job_id])[job_id] != "failed", db.jobs([job_id])[0].error
                        return row is not None and row.attempts >= attempts and "no space" in (row.error or "") \
                            and row.state.value == "pending"
                    def show() -> str:
                        outputs = [(o.name, o.state.value, o.attempts, o.error) for o in db.outputs(job_id)]
                        return f"no disk-full retries: {outputs}\n{daemon.tail()}"
                    wait_until(seen, 60, interval=0.05, message=show)

                # 1. Not enough room for the zip, for longer than the download counter would last.
                filler = fill(results, "filler-1", leave=64 * 1024)
                [job1] = submit_jobs(config_path, [{"files": [vcf], "population": "eur"}])
                wait_disk_full(job1, attempts=DOWNLOAD_LIMIT + 2)
                row = zip_row(job1)
                assert not (Path(db.jobs([job1])[0].result_dir or "/nonexistent") / row.name).exists()
                figures["1. no room: retries while full / GETs spent"] = f"{row.attempts} / {zip_gets(job1)}"
                figures["1. error stored"] = row.error
                filler.unlink()
                db.wait_states([job1], {"completed"}, timeout=60, also=daemon.require_alive)

                # 2. The disk fills up while the zip streams in.
                pace["on"] = True
                [job2] = submit_jobs(config_path, [{"files": [big], "population": "eur"}])
                # The zip's first 1 MiB is on disk (the small files never get that big): fill the rest.
                wait_until(lambda: any(p.is_file() and p.stat().st_size >= 1 << 20 for p in partial_files(results)),
                           60, interval=0.005, message="the zip never started streaming")
                filler = fill(results, "filler-2")
                wait_disk_full(job2, attempts=2)
                row = zip_row(job2)
                figures["2. filled mid-stream: retries while full / GETs spent"] = f"{row.attempts} / {zip_gets(job2)}"
                figures["2. error stored"] = row.error
                pace["on"] = False
                filler.unlink()
                db.wait_states([job2], {"completed"}, timeout=60, also=daemon.require_alive)

                # 3. No inodes left: the job's folder cannot be created.
                spent = use_up_inodes(results)
                [job3] = submit_jobs(config_path, [{"files": [vcf], "population": "eur"}])
                wait_until(lambda: db.states([job3])[job3] == "downloading" and any(
                    o.attempts >= 2 for o in db.outputs(job3)), 60, interval=0.05,
                    message=lambda: f"no retries without inodes: {db.outputs(job3)}")
                first = db.outputs(job3)[0]
                figures["3. no inodes: retries / error stored"] = f"{first.attempts} / {first.error}"
                for path in spent:
                    path.unlink()
                db.wait_states([job3], {"completed"}, timeout=60, also=daemon.require_alive)

                assert daemon.terminate() == 0
                ids = [job1, job2, job3]
                end = check_end_state(db, sim.stats(), results, expected={i: JobState.COMPLETED for i in ids})
                states_seen = {e[3] for e in db.events(ids)}
            finally:
                db.close()
            problems = daemon.problems()
            midstream = [line["reason"] for line in daemon.events("step_failed_will_retry", error_kind="disk_full")
                         if "chr_22.zip" in line["reason"] and "No space left on device) after" in line["reason"]]
    figures["2. the write that failed"] = midstream[0] if midstream else "none: the disk did not fill mid-stream"
    figures.update(end.figures)
    figures["states the jobs went through"] = sorted(states_seen)
    figures["time (s)"] = round(time.monotonic() - started, 1)
    text = report("disk full while downloading", figures, capsys)
    assert not end.problems, text + "\n" + "\n".join(end.problems)
    assert "failed" not in states_seen, text
    assert midstream, text
    assert not problems, text + "\nlog problems:\n" + "\n".join(problems[:10])
