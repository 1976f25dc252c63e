"""storage.extract: unpacking verified chr_*.zip files (ZipCrypto and AES), alone and in a running daemon."""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path

import pytest
import pyzipper
from support.ops_support import PANEL, daemon_config, running_daemon, sample_vcf, wait_until

from daemon import results
from daemon.config import StorageConfig
from daemon.db.models import JobOutput
from daemon.simulator import SimulatedCloudgene, Timings
from daemon.simulator.zipcrypto import write_zipcrypto
from daemon.states import JobState, OutputState
from daemon.submission import Submission, submit
from daemon.unpack import unpack_outputs, zips_to_unpack

PASSWORD = "zip-pass-4711"


def output(path: Path, name: str | None = None, state: OutputState = OutputState.VERIFIED) -> JobOutput:
    return JobOutput(name=name or path.name, url="-", state=state, local_path=str(path))


def zipcrypto(path: Path, members: dict[str, bytes], password: str = PASSWORD) -> Path:
    # A fixed encryption header: ZipCrypto checks a password against one byte of it, so with a random one a wrong
    # password passes that check 1 time in 256 and the entry then fails as corrupt data, not as a wrong password.
    sources = path.parent / f".{path.stem}-src"
    sources.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, data in members.items():
        (sources / name).write_bytes(data)
        entries.append((name, sources / name))
    return write_zipcrypto(path, entries, password, random_bytes=lambda n: bytes(n))


def aes(path: Path, members: dict[str, bytes], password: str = PASSWORD) -> Path:
    with pyzipper.AESZipFile(path, "w", compression=pyzipper.ZIP_DEFLATED, encryption=pyzipper.WZ_AES) as zf:
        zf.setpassword(password.encode())
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("make", [zipcrypto, aes], ids=["zipcrypto", "aes"])
def test_chr_zips_are_extracted_with_safe_modes(tmp_path: Path, make) -> None:
    result_dir = tmp_path / "results"
    result_dir.mkdir()
    one = make(result_dir / "chr_1.zip", {"chr1.dose.vcf.gz": b"dose-1" * 1000, "chr1.info.gz": b"info-1"})
    two = make(result_dir / "chr_2.zip", {"chr2.dose.vcf.gz": b"dose-2", "chr2.info.gz": b"info-2"})
    other = make(result_dir / "qc_report.zip", {"report.txt": b"not unpacked"})
    pending = make(result_dir / "chr_3.zip", {"chr3.dose.vcf.gz": b"not verified yet"})
    outputs = [output(one), output(two), output(other), output(pending, state=OutputState.PENDING)]
    assert [o.name for o in zips_to_unpack(outputs)] == ["chr_1.zip", "chr_2.zip"]

    report = unpack_outputs(outputs, result_dir, PASSWORD)
    assert report.problems == [] and report.zips == 2
    assert sorted(p.name for p in report.files) == ["chr1.dose.vcf.gz", "chr1.info.gz", "chr2.dose.vcf.gz",
                                                    "chr2.info.gz"]
    assert (result_dir / "chr1.dose.vcf.gz").read_bytes() == b"dose-1" * 1000
    assert (result_dir / "chr2.info.gz").read_bytes() == b"info-2"
    assert all(mode(p) == 0o640 for p in report.files)
    assert not (result_dir / "report.txt").exists() and not (result_dir / "chr3.dose.vcf.gz").exists()
    assert report.summary() == "extracted 4 files from 2 zips"

    again = unpack_outputs(outputs, result_dir, PASSWORD)  # an interrupted step runs again: same files
    assert again.problems == [] and again.zips == 2


def test_subfolders_are_0750(tmp_path: Path) -> None:
    archive = aes(tmp_path / "chr_1.zip", {"stats/chr1.txt": b"x"})
    report = unpack_outputs([output(archive)], tmp_path / "out", PASSWORD)
    assert report.problems == []
    assert mode(tmp_path / "out" / "stats") == 0o750 and mode(tmp_path / "out" / "stats" / "chr1.txt") == 0o640


@pytest.mark.parametrize("make", [zipcrypto, aes], ids=["zipcrypto", "aes"])
def test_a_wrong_password_is_reported_not_raised(tmp_path: Path, make) -> None:
    good = make(tmp_path / "chr_1.zip", {"chr1.dose.vcf.gz": b"a"})
    bad = make(tmp_path / "chr_2.zip", {"chr2.dose.vcf.gz": b"b"}, password="another-password")
    report = unpack_outputs([output(good), output(bad)], tmp_path / "out", PASSWORD)
    assert report.zips == 1 and len(report.problems) == 1 and "chr_2.zip" in report.problems[0]
    assert "password" in report.problems[0]
    assert not (tmp_path / "out" / "chr2.dose.vcf.gz").exists()
    assert report.summary().startswith("extracted 1 file from 1 zip; extraction failed for 1: chr_2.zip")


def test_a_missing_zip_is_reported(tmp_path: Path) -> None:
    report = unpack_outputs([output(tmp_path / "chr_1.zip")], tmp_path / "out", PASSWORD)
    assert report.zips == 0 and "chr_1.zip" in report.problems[0]


# ------------------------------------------------------------------------------------------- limits


def test_a_zip_bomb_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """20 MiB of zeros deflate to about 20 KB: a thousandfold expansion, refused at the default ratio (100)."""
    bomb = aes(tmp_path / "chr_1.zip", {"chr1.dose.vcf.gz": bytes(20 << 20), "chr1.info.gz": b"info"})
    out = tmp_path / "out"
    report = unpack_outputs([output(bomb)], out, PASSWORD, max_bytes=StorageConfig.extract_max_gib << 30,
                            max_ratio=StorageConfig.extract_max_ratio)
    assert report.zips == 0 and len(report.problems) == 1
    assert "would expand to 20971524" in report.problems[0] and "storage.extract_max_ratio" in report.problems[0]
    assert sorted(p.name for p in out.iterdir()) == []


def test_a_zip_bigger_than_allowed_or_than_the_free_space_is_refused(tmp_path: Path, monkeypatch) -> None:
    archive = zipcrypto(tmp_path / "chr_1.zip", {"chr1.dose.vcf.gz": b"d" * 600, "chr1.info.gz": b"i" * 600})
    report = unpack_outputs([output(archive)], tmp_path / "out", PASSWORD, max_bytes=1000)
    assert "its entries add up to 1200 bytes, more than the 1000 allowed (storage.extract_max_gib)" in \
        report.problems[0]

    real = results.shutil.disk_usage
    monkeypatch.setattr(results.shutil, "disk_usage", lambda p: real(p)._replace(free=1100))
    report = unpack_outputs([output(archive)], tmp_path / "out", PASSWORD)
    assert "its entries need 1200 bytes and only 1100 are free" in report.problems[0]
    assert list((tmp_path / "out").iterdir()) == []


def test_no_entry_replaces_a_downloaded_result_file(tmp_path: Path) -> None:
    result_dir = tmp_path / "results"
    result_dir.mkdir()
    (result_dir / "qc_report.txt").write_bytes(b"the verified download")
    archive = zipcrypto(result_dir / "chr_1.zip", {"chr1.info.gz": b"info", "qc_report.txt": b"from the zip"})
    outputs = [output(result_dir / "qc_report.txt"), output(archive)]
    report = unpack_outputs(outputs, result_dir, PASSWORD)
    assert report.problems == [
        "chr_1.zip: refusing to extract: entry 'qc_report.txt' would replace the downloaded result file of that name"
    ]
    assert (result_dir / "qc_report.txt").read_bytes() == b"the verified download"
    assert not (result_dir / "chr1.info.gz").exists()


def test_symlink_entries_are_not_written(tmp_path: Path) -> None:
    archive = tmp_path / "chr_1.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        link = zipfile.ZipInfo("passwd")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
        zf.writestr("chr1.info.gz", b"info")
    out = tmp_path / "out"
    report = unpack_outputs([output(archive)], out, None)
    assert report.problems == [] and [p.name for p in report.files] == ["chr1.info.gz"]
    assert sorted(p.name for p in out.iterdir()) == ["chr1.info.gz"]


# ------------------------------------------------------------------------------------------- in the daemon


def test_the_daemon_extracts_after_completion_and_a_failure_leaves_the_job_completed(sqlite_url: str,
                                                                                     tmp_path: Path) -> None:
    token = "extract-token-" + "x" * 20
    with SimulatedCloudgene({token: "alice"}, timings=Timings(queue=0.1, run=0.1, export=0.1)) as sim:
        config = daemon_config(tmp_path, sqlite_url, base_url=sim.base_url, token=token,
                               storage={"extract": True})
        with running_daemon(config) as daemon:
            request = Submission(services=["sim"], panel=PANEL, build="hg19", files=[sample_vcf(tmp_path)])
            [good] = submit(config, daemon.store, request)
            [blocked] = submit(config, daemon.store, request)
            # Something in the way of one extracted file: a directory with its name.
            (config.storage.results_dir / str(blocked.id) / "chr20.dose.vcf.gz").mkdir(parents=True)
            for job_id in (good.id, blocked.id):
                wait_until(lambda job_id=job_id: daemon.store.admin.get(job_id).state in (JobState.COMPLETED,
                                                                                   JobState.FAILED), 60)
            good, blocked = (daemon.store.admin.get(j.id, with_events=True) for j in (good, blocked))

    assert good.state is JobState.COMPLETED
    result_dir = Path(good.result_dir)
    assert (result_dir / "chr20.dose.vcf.gz").is_file() and (result_dir / "chr20.info.gz").is_file()
    assert mode(result_dir / "chr20.dose.vcf.gz") == 0o640
    assert "extracted" in good.events[-1].reason and "failed" not in good.events[-1].reason

    assert blocked.state is JobState.COMPLETED  # never failed by its extraction
    reason = blocked.events[-1].reason
    assert blocked.events[-1].to_state == "completed" and "extraction failed for 1: chr_20.zip" in reason
