"""The simulated Cloudgene server, exercised over real HTTP with httpx."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import socket
import struct
import threading
import time
import zipfile
import zlib
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import pyzipper
from support.prerequisites import require_tool

from daemon.simulator import SimulatedCloudgene, State, Timings, serve, write_sample_vcf, zipcrypto
from daemon.simulator.vcf import BGZF_EOF, bgzf_blocks, sample_records, write_vcf
from daemon.simulator.zipcrypto import write_zipcrypto

PANEL = "apps@1000g-phase-3-v5@2.0.0"
SUBMIT = "/jobs/submit/imputationserver2"


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


@pytest.fixture(scope="module")
def vcf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sample_vcf(tmp_path_factory.mktemp("vcf") / "chr20.vcf.gz")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sim(clock: FakeClock):
    with SimulatedCloudgene(
        {"tok": "alice", "tok-bob": "bob", "tok-soon": "carol"},
        timings=Timings(queue=1, run=1, export=1),
        token_expiry={"tok-soon": 3 * 86400},
        clock=clock,
    ) as s:
        yield s


@pytest.fixture
def client(sim: SimulatedCloudgene):
    with httpx.Client(base_url=sim.api_url, headers={"X-Auth-Token": "tok"}, timeout=10) as c:
        yield c


def submit(client: httpx.Client, files: list[Path] | None, app: str = "imputationserver2", **fields: str):
    data = {"refpanel": PANEL, "build": "hg19", "population": "off", "password": "pw", **fields}
    data = {key: value for key, value in data.items() if value is not None}  # None: the field left out
    parts = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in files or []]
    return client.post(f"/jobs/submit/{app}", data=data, files=parts or None)


def submit_ok(client: httpx.Client, files: list[Path], **fields: str) -> str:
    r = submit(client, files, **fields)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True
    assert body["message"] == "Your job was successfully added to the job queue."
    assert re.fullmatch(r"job-\d{8}-\d{6}-\d{3}", body["id"])
    return body["id"]


def status(client: httpx.Client, job_id: str) -> dict:
    r = client.get(f"/jobs/{job_id}/status")
    assert r.status_code == 200, r.text
    return r.json()


def finish(client: httpx.Client, clock: FakeClock, job_id: str) -> dict:
    clock.advance(10)
    return status(client, job_id)


def files_of(job: dict) -> dict[str, dict]:
    return {f["name"]: f for p in job["outputParams"] for f in p["files"]}


def download(sim: SimulatedCloudgene, file: dict, **kw) -> httpx.Response:
    return httpx.get(f"{sim.base_url}/share/results/{file['hash']}/{file['name']}", timeout=10, **kw)


# --------------------------------------------------------------------------------------------------- sample VCF


def test_sample_vcf_is_valid_bgzf(tmp_path: Path) -> None:
    path = write_sample_vcf(tmp_path / "s.vcf.gz", samples=25, variants=3000)
    raw = path.read_bytes()
    assert raw.endswith(BGZF_EOF)
    blocks = list(bgzf_blocks(path))
    assert len(blocks) >= 2 and sum(size for _, size in blocks) == len(raw)
    for offset, size in blocks:
        head = raw[offset : offset + 18]
        assert head[:4] == b"\x1f\x8b\x08\x04"  # gzip, deflate, FEXTRA
        assert head[12:14] == b"BC" and struct.unpack("<H", head[14:16])[0] == 2
        assert struct.unpack("<H", head[16:18])[0] + 1 == size
    lines = gzip.decompress(raw).decode().splitlines()
    header = next(line for line in lines if line.startswith("#CHROM"))
    assert len(header.split("\t")) == 9 + 25
    records = [line for line in lines if not line.startswith("#")]
    assert len(records) == 3000 and {r.split("\t")[0] for r in records} == {"20"}
    positions = [int(r.split("\t")[1]) for r in records]
    assert positions == sorted(positions)


def test_sample_vcf_hg38_uses_chr_prefix_and_is_deterministic(tmp_path: Path) -> None:
    a = write_sample_vcf(tmp_path / "a.vcf.gz", chromosome="1", build="hg38", seed=7)
    b = write_sample_vcf(tmp_path / "b.vcf.gz", chromosome="chr1", build="hg38", seed=7)
    assert a.read_bytes() == b.read_bytes()
    records = [x for x in gzip.decompress(a.read_bytes()).decode().splitlines() if not x.startswith("#")]
    assert {r.split("\t")[0] for r in records} == {"chr1"}


@pytest.mark.parametrize("writer", ["libarchive", "python"])
def test_zipcrypto_zip_of_either_writer_is_read_by_stdlib(tmp_path: Path, writer: str) -> None:
    if writer == "libarchive":
        require_tool(zipcrypto._libarchive_writes_zipcrypto(), "a libarchive that writes ZipCrypto",
                     "apt-get install libarchive13")
    (tmp_path / "a.bin").write_bytes(bytes(range(256)) * 300)
    (tmp_path / "b.txt").write_text("imputationd\n" * 1000)
    # The Python writer runs when the encryption headers are given.
    random_bytes = {"libarchive": os.urandom, "python": lambda n: bytes(n)}[writer]
    z = write_zipcrypto(tmp_path / "x.zip", [("a.bin", tmp_path / "a.bin"), ("d/b.txt", tmp_path / "b.txt")], "pw",
                        random_bytes=random_bytes)
    with zipfile.ZipFile(z) as zf:
        infos = zf.infolist()
        assert [i.filename for i in infos] == ["a.bin", "d/b.txt"]
        assert all(i.flag_bits & 1 and i.compress_type == zipfile.ZIP_DEFLATED for i in infos)
        # libarchive writes a data descriptor after each entry, the Python writer none.
        assert all(bool(i.flag_bits & 0x08) is (writer == "libarchive") for i in infos)
        zf.setpassword(b"pw")
        assert zf.testzip() is None
        assert zf.read("d/b.txt") == (tmp_path / "b.txt").read_bytes()
        zf.setpassword(b"wrong")
        # One wrong password in 256 passes the one-byte header check and fails on the CRC instead.
        with pytest.raises((RuntimeError, zipfile.BadZipFile), match="Bad password|Bad CRC-32"):
            zf.read("a.bin")


def test_zipcrypto_writer_is_read_by_stdlib(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(bytes(range(256)) * 300)
    (tmp_path / "empty").write_bytes(b"")
    z = write_zipcrypto(tmp_path / "x.zip", [("a.bin", tmp_path / "a.bin"), ("d/empty", tmp_path / "empty")], "sésame")
    with zipfile.ZipFile(z) as zf:
        assert all(info.flag_bits & 1 for info in zf.infolist())
        with pytest.raises(RuntimeError):
            zf.read("a.bin")  # encrypted: no password
        zf.setpassword("sésame".encode())
        assert zf.testzip() is None
        assert zf.read("a.bin") == (tmp_path / "a.bin").read_bytes()
        assert zf.read("d/empty") == b""
        zf.setpassword(b"wrong")
        with pytest.raises(RuntimeError, match="Bad password"):
            zf.read("a.bin")


# --------------------------------------------------------------------------------------------------- auth


def test_auth_failures_are_401_plain_text_and_revoked_is_403(sim: SimulatedCloudgene, client: httpx.Client) -> None:
    api = sim.api_url
    for headers in ({}, {"X-Auth-Token": "nope"}):
        r = httpx.get(f"{api}/jobs", headers=headers)
        assert r.status_code == 401
        assert r.headers["content-type"].startswith("text/plain")
        with pytest.raises(json.JSONDecodeError):
            json.loads(r.text)
    assert client.get("/jobs").status_code == 200
    sim.expire_token("tok")
    assert client.get("/jobs").status_code == 401
    sim.restore_token("tok")
    sim.revoke_token("tok")
    assert client.get("/jobs").status_code == 403
    sim.restore_token("tok")
    assert client.get("/jobs").status_code == 200


def test_token_expires_by_clock(sim: SimulatedCloudgene, clock: FakeClock) -> None:
    with httpx.Client(base_url=sim.api_url, headers={"X-Auth-Token": "tok-soon"}) as c:
        assert c.get("/jobs").status_code == 200
        clock.advance(3 * 86400 + 1)
        assert c.get("/jobs").status_code == 401


def test_token_verify(sim: SimulatedCloudgene, clock: FakeClock) -> None:
    r = httpx.post(f"{sim.api_url}/tokens/verify", data={"token": "tok-soon"})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"valid", "message", "username", "name", "mail", "expire"}
    assert body["valid"] is True and body["username"] == "carol" and body["mail"]
    expire = datetime.fromisoformat(body["expire"]).timestamp()
    assert expire == pytest.approx(clock() + 3 * 86400, abs=2)
    bad = httpx.post(f"{sim.api_url}/tokens/verify", data={"token": "nope"}).json()
    assert bad["valid"] is False and bad["message"] == "Invalid API Token."
    sim.revoke_token("tok")
    assert httpx.post(f"{sim.api_url}/tokens/verify", data={"token": "tok"}).json()["valid"] is False
    assert httpx.post(f"{sim.api_url}/tokens/verify", data={"token": ""}).status_code == 400


# --------------------------------------------------------------------------------------------------- submit


def test_submit_rejects_unknown_field(client: httpx.Client, vcf: Path) -> None:
    r = submit(client, [vcf], colour="blue")
    assert r.status_code == 400
    assert r.json() == {"success": False, "message": "Parameter 'colour' not found."}


def test_submit_accepts_input_prefix_and_checkboxes(client: httpx.Client, vcf: Path) -> None:
    job_id = submit_ok(client, [vcf], **{"input-population": "eur", "meta": "on", "job-name": "named"})
    assert status(client, job_id)["name"] == "named"


@pytest.mark.parametrize(("fields", "needle"), [({"build": "hg37"}, "'build'"), ({"refpanel": ""}, "'refpanel'")])
def test_submit_rejects_bad_values(client: httpx.Client, vcf: Path, fields: dict, needle: str) -> None:
    r = submit(client, [vcf], **fields)
    assert r.status_code == 400
    assert r.json()["success"] is False and needle in r.json()["message"]


@pytest.mark.parametrize(("fields", "needle"), [
    # Accepted, as imputationserver2 accepts them, and refused by its workflow once the job runs.
    ({"refpanel": "apps@nope@1.0.0"}, "Application 'apps@nope@1.0.0' not installed or wrong permissions."),
    ({"refpanel": "nope"}, "Application 'nope' not installed or wrong permissions."),
    ({"population": None}, "Expected parameter for option '--population'"),  # AfriGen
    ({"population": "martian"}, "Population 'martian' is not supported"),
    ({"r2Filter": "1.5"}, "Invalid r2Filter '1.5'"),
    ({"phasing": "shapeit"}, "Unknown phasing method 'shapeit'"),
    ({"refpanel": "apps@hapmap-2", "population": "eur", "phasing": "beagle"},
     "Phasing with beagle is not available for reference panel 'apps@hapmap-2@2.0.0'."),
])
def test_values_the_workflow_refuses_fail_the_job(client: httpx.Client, clock: FakeClock, vcf: Path, fields: dict,
                                                 needle: str) -> None:
    job = finish(client, clock, submit_ok(client, [vcf], **fields))
    assert job["state"] == State.FAILED
    errors = [m["message"] for s in job["steps"] for m in s["logMessages"] if m["type"] == 1]
    assert any(needle in e for e in errors), errors


@pytest.mark.parametrize(("fields", "imputed"), [
    ({"r2Filter": "0.8"}, True),  # TOPMed users' filter: not in the app's list, accepted and used
    ({"refpanel": "apps@1000g-phase-3-v5"}, True),  # no version: the newest installed
    ({"refpanel": "1000g-phase-3-v5"}, True),  # no apps@ either
    ({"phasing": "beagle"}, True),  # offered by the 1000 Genomes panel
    ({"mode": "qconly"}, False),  # the docs' spelling of QC only
    ({"mode": "qc_only"}, False),  # the app's
])
def test_values_the_workflow_takes(client: httpx.Client, clock: FakeClock, vcf: Path, fields: dict,
                                   imputed: bool) -> None:
    job = finish(client, clock, submit_ok(client, [vcf], **fields))
    assert job["state"] == State.SUCCESS, job["steps"]
    assert any(name.startswith("chr_") for name in files_of(job)) is imputed


def test_submit_needs_files(client: httpx.Client) -> None:
    r = client.post(SUBMIT, files=[("refpanel", (None, PANEL))])
    assert r.status_code == 400 and "'files'" in r.json()["message"]


def test_submit_unknown_app_and_versions(client: httpx.Client, vcf: Path) -> None:
    r = submit(client, [vcf], app="imputationserver3")
    assert r.status_code == 404
    assert r.json() == {"success": False, "message": "Application 'imputationserver3' not found."}
    assert submit(client, [vcf], app="imputationserver2@1.0.0").status_code == 404
    job_id = submit_ok_app(client, [vcf], "imputationserver2@2.0.7")
    job = status(client, job_id)
    assert job["applicationId"] == "imputationserver2@2.0.7"


def submit_ok_app(client: httpx.Client, files: list[Path], app: str) -> str:
    r = submit(client, files, app=app)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_submit_must_be_multipart(client: httpx.Client) -> None:
    assert client.post(SUBMIT, data={"refpanel": PANEL}).status_code == 415


def test_upload_limit(vcf: Path) -> None:
    with SimulatedCloudgene({"t": "u"}, max_upload_bytes=1000) as sim:
        with httpx.Client(base_url=sim.api_url, headers={"X-Auth-Token": "t"}) as c:
            r = submit(c, [vcf])
            assert r.status_code == 413 and r.headers["connection"] == "close"
            assert sim.stats()["jobs"] == {}


def test_submit_chunked_upload(sim: SimulatedCloudgene, client: httpx.Client, vcf: Path) -> None:
    boundary = "XyZ123"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"refpanel\"\r\n\r\n{PANEL}\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"population\"\r\n\r\noff\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"chr20.vcf.gz\"\r\n"
        f"Content-Type: application/gzip\r\n\r\n"
    ).encode() + vcf.read_bytes() + f"\r\n--{boundary}--\r\n".encode()

    def chunks():
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    r = client.post(SUBMIT, content=chunks(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 200, r.text
    assert sim.file_names(r.json()["id"])


def test_job_limit_is_answered_only_after_the_whole_upload(sim: SimulatedCloudgene, client: httpx.Client,
                                                           vcf: Path) -> None:
    for _ in range(3):
        submit_ok(client, [vcf])
    # a 4th submission over a raw socket: no answer while part of the body is still unsent
    boundary = "b0undary"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"refpanel\"\r\n\r\n{PANEL}\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"job-name\"\r\n\r\nfourth\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"chr20.vcf.gz\"\r\n\r\n"
    ).encode() + vcf.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    head = (
        f"POST /api/v2/jobs/submit/imputationserver2 HTTP/1.1\r\nHost: x\r\nX-Auth-Token: tok\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", sim.port), timeout=5) as s:
        s.sendall(head + body[: len(body) // 2])
        s.settimeout(0.3)
        with pytest.raises(TimeoutError):
            s.recv(1)
        s.settimeout(5)
        s.sendall(body[len(body) // 2 :])
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400")
    payload = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert payload == {"success": False, "message": "Only 3 jobs per user can be executed simultaneously."}
    assert sim.stats()["rejected_submissions"] == {"fourth": 1}
    # another user is not affected
    with httpx.Client(base_url=sim.api_url, headers={"X-Auth-Token": "tok-bob"}) as bob:
        submit_ok(bob, [vcf])


def test_client_killed_mid_upload_leaves_no_job(sim: SimulatedCloudgene, client: httpx.Client, vcf: Path) -> None:
    body = vcf.read_bytes()
    head = (
        "POST /api/v2/jobs/submit/imputationserver2 HTTP/1.1\r\nHost: x\r\nX-Auth-Token: tok\r\n"
        f"Content-Type: multipart/form-data; boundary=zz\r\nContent-Length: {len(body) + 500}\r\n\r\n"
        '--zz\r\nContent-Disposition: form-data; name="files"; filename="chr20.vcf.gz"\r\n\r\n'
    ).encode()
    with socket.create_connection(("127.0.0.1", sim.port), timeout=5) as s:
        s.sendall(head + body[:1000])
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, like a SIGKILL
    submit_ok(client, [vcf], **{"job-name": "after-crash"})
    assert [j["name"] for j in client.get("/jobs").json()["data"]] == ["after-crash"]
    assert list(sim.stats()["submissions"]) == ["after-crash"]


def test_job_limit_is_atomic_under_concurrent_submissions(sim: SimulatedCloudgene, vcf: Path) -> None:
    results: list[int] = []

    def one() -> None:
        with httpx.Client(base_url=sim.api_url, headers={"X-Auth-Token": "tok"}, timeout=20) as c:
            results.append(submit(c, [vcf]).status_code)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [200] * 3 + [400] * 3


def test_job_name_is_html_escaped_and_counted_raw(sim: SimulatedCloudgene, client: httpx.Client, vcf: Path) -> None:
    job_id = submit_ok(client, [vcf], **{"job-name": "<a&b>"})
    assert status(client, job_id)["name"] == "&lt;a&amp;b&gt;"
    assert sim.submissions("<a&b>") == 1
    unnamed = submit_ok(client, [vcf])
    assert status(client, unnamed)["name"] == unnamed


# --------------------------------------------------------------------------------------------------- progression


def test_job_progresses_by_clock(sim: SimulatedCloudgene, client: httpx.Client, clock: FakeClock, vcf: Path) -> None:
    job_id = submit_ok(client, [vcf], **{"job-name": "ours-1"})
    job = status(client, job_id)
    assert job["state"] == State.WAITING and job["positionInQueue"] == 0
    assert job["steps"] == [] and job["startTime"] == 0 and job["endTime"] == 0
    assert all(p["files"] == [] for p in job["outputParams"])
    second = submit_ok(client, [vcf])
    assert status(client, second)["positionInQueue"] == 1
    clock.advance(1.0)
    job = status(client, job_id)
    assert job["state"] == State.RUNNING and job["positionInQueue"] == -1 and job["startTime"] > 0
    clock.advance(1.0)
    job = status(client, job_id)
    assert job["state"] == State.EXPORTING and any(
        m["type"] == 3 for s in job["steps"] for m in s["logMessages"]
    )
    clock.advance(1.0)
    job = client.get(f"/jobs/{job_id}").json()  # the full call answers the same object
    assert job["state"] == State.SUCCESS
    assert set(job) >= {"application", "applicationId", "id", "name", "state", "positionInQueue", "submittedOn",
                        "startTime", "endTime", "currentTime", "deletedOn", "steps", "outputParams"}
    assert job["name"] == "ours-1" and job["applicationId"] == "imputationserver2"
    assert job["submittedOn"] <= job["startTime"] <= job["endTime"] <= job["currentTime"]
    assert job["deletedOn"] > job["endTime"]
    names = [s["name"] for s in job["steps"]]
    assert names[0] == "Input Validation" and "Data Compression and Encryption" in names
    assert all(m["type"] == 0 for s in job["steps"] for m in s["logMessages"])
    assert "Samples: 25" in job["steps"][0]["logMessages"][0]["message"]


def test_job_progresses_by_wall_clock(vcf: Path) -> None:
    with SimulatedCloudgene({"t": "u"}, timings=Timings(queue=0.05, run=0.05, export=0.05)) as sim:
        with httpx.Client(base_url=sim.api_url, headers={"X-Auth-Token": "t"}) as c:
            job_id = submit_ok(c, [vcf])
            seen = set()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                state = status(c, job_id)["state"]
                seen.add(state)
                if state == State.SUCCESS:
                    break
                time.sleep(0.01)
            assert State.SUCCESS in seen


def test_instant_timings_and_notified_state(tmp_path: Path) -> None:
    vcf = write_sample_vcf(tmp_path / "chr20.vcf.gz")
    with SimulatedCloudgene({"t": "u"}, timings=Timings.instant(notify=0)) as sim:
        with httpx.Client(base_url=sim.api_url, headers={"X-Auth-Token": "t"}) as c:
            job_id = submit_ok(c, [vcf])
            job = status(c, job_id)
            assert job["state"] == State.SUCCESS_NOTIFIED
            assert files_of(job)


def test_a_cancelled_job_is_moved_to_9_with_the_failed_ones(tmp_path: Path) -> None:
    """Reference: state 9 (FAILED_NOTIFIED) is also used for cancelled jobs; their log says they were cancelled."""
    vcf = write_sample_vcf(tmp_path / "chr20.vcf.gz")
    with SimulatedCloudgene({"t": "u"}, timings=Timings(queue=60, notify=0)) as sim:
        with httpx.Client(base_url=sim.api_url, headers={"X-Auth-Token": "t"}) as c:
            job_id = submit_ok(c, [vcf])
            assert c.get(f"/jobs/{job_id}/cancel").status_code == 200
            job = status(c, job_id)
            assert job["state"] == State.FAILED_NOTIFIED
            assert any("canceled" in m["message"] for s in job["steps"] for m in s["logMessages"])


# --------------------------------------------------------------------------------------------------- results


def test_outputs_shape(sim: SimulatedCloudgene, client: httpx.Client, clock: FakeClock, vcf: Path) -> None:
    job = finish(client, clock, submit_ok(client, [vcf]))
    files = files_of(job)
    assert {"chr_20.zip", "qc_report.txt", "quality-control.html", "statistics/summary.txt"} <= set(files)
    for name, f in files.items():
        assert set(f) >= {"name", "path", "hash", "count", "size", "parameterId"}
        assert re.fullmatch(r"[0-9a-f]{64}", f["hash"])
        assert f["hash"] != sim.file_sha256(job["id"], name)  # a URL secret, not a checksum
        assert f["count"] == 10
        assert re.fullmatch(r"\d+ (bytes|KB|MB|GB)", f["size"])
        assert f["path"].endswith(name)
    zip_size = len(sim.file_bytes(job["id"], "chr_20.zip"))
    assert files["chr_20.zip"]["size"] == f"{zip_size // 1024} KB"
    assert len({f["hash"] for f in files.values()}) == len(files)
    params = {p["name"]: p for p in job["outputParams"]}
    assert params["output"]["download"] is True and params["output"]["hash"]


def test_each_zip_has_its_md5_beside_it(sim: SimulatedCloudgene, client: httpx.Client, clock: FakeClock,
                                       vcf: Path) -> None:
    """imputationserver2 writes md5sum's line for each result zip beside it: listed with the zip, downloaded like
    any result file (its GET spends one of its own downloads, none of the zip's)."""
    job = finish(client, clock, submit_ok(client, [vcf]))
    files = files_of(job)
    assert files["chr_20.zip.md5"]["parameterId"] == files["chr_20.zip"]["parameterId"]
    r = download(sim, files["chr_20.zip.md5"])
    assert r.status_code == 200
    assert r.text == f"{hashlib.md5(sim.file_bytes(job['id'], 'chr_20.zip')).hexdigest()}  chr_20.zip\n"
    after = files_of(status(client, job["id"]))
    assert (after["chr_20.zip.md5"]["count"], after["chr_20.zip"]["count"]) == (9, 10)


@pytest.mark.parametrize("text", [None, "", "not a checksum\n"], ids=["wrong", "empty", "malformed"])
def test_the_wrong_md5_fault_spoils_the_md5_not_the_zip(sim: SimulatedCloudgene, client: httpx.Client,
                                                        clock: FakeClock, vcf: Path, text: str | None) -> None:
    sim.faults.wrong_md5(message=text)
    faulty, sound = submit_ok(client, [vcf]), submit_ok(client, [vcf])  # one job takes the fault
    clock.advance(10)
    published = download(sim, files_of(status(client, faulty))["chr_20.zip.md5"]).text
    assert published == (f"{'0' * 32}  chr_20.zip\n" if text is None else text)
    assert files_of(status(client, faulty))["chr_20.zip.md5"]["size"] == f"{len(published)} bytes"
    with zipfile.ZipFile(io.BytesIO(sim.file_bytes(faulty, "chr_20.zip"))) as zf:
        zf.setpassword(b"pw")
        assert zf.testzip() is None  # the zip itself is sound
    zip_md5 = hashlib.md5(sim.file_bytes(sound, "chr_20.zip")).hexdigest()
    assert download(sim, files_of(status(client, sound))["chr_20.zip.md5"]).text == f"{zip_md5}  chr_20.zip\n"


def test_qc_only_mode_has_no_imputation_zips(client: httpx.Client, clock: FakeClock, vcf: Path) -> None:
    job = finish(client, clock, submit_ok(client, [vcf], mode="qc_only"))
    assert job["state"] == State.SUCCESS
    assert "chr_20.zip" not in files_of(job) and "qc_report.txt" in files_of(job)


def test_download_decrements_and_is_exhausted(sim: SimulatedCloudgene, clock: FakeClock, vcf: Path) -> None:
    sim.sim.download_limit = 2
    with httpx.Client(base_url=sim.api_url, headers={"X-Auth-Token": "tok"}) as c:
        job = finish(c, clock, submit_ok(c, [vcf]))
        f = files_of(job)["statistics/summary.txt"]
        assert f["count"] == 2
        r = download(sim, f, headers={"Range": "bytes=0-3"})  # Range is ignored: the whole file, 200
        assert r.status_code == 200 and r.content == sim.file_bytes(job["id"], f["name"])
        assert int(r.headers["content-length"]) == len(r.content)
        assert files_of(status(c, job["id"]))[f["name"]]["count"] == 1
        assert download(sim, f).status_code == 200
        assert files_of(status(c, job["id"]))[f["name"]]["count"] == 0
        r = download(sim, f)
        assert r.status_code == 400 and r.json()["message"] == "number of max downloads exceeded."
        assert httpx.get(f"{sim.base_url}/share/results/{'0' * 64}/x.zip").status_code == 404


def test_result_zip_decrypts_with_zipcrypto(sim: SimulatedCloudgene, client: httpx.Client, clock: FakeClock,
                                            vcf: Path) -> None:
    job = finish(client, clock, submit_ok(client, [vcf], password="s3cret"))
    r = download(sim, files_of(job)["chr_20.zip"])
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        assert sorted(zf.namelist()) == ["chr20.dose.vcf.gz", "chr20.info.gz"]
        assert all(i.flag_bits & 1 and i.compress_type == zipfile.ZIP_DEFLATED for i in zf.infolist())
        zf.setpassword(b"s3cret")
        assert zf.testzip() is None
        dose = gzip.decompress(zf.read("chr20.dose.vcf.gz")).decode().splitlines()
        info = gzip.decompress(zf.read("chr20.info.gz")).decode().splitlines()
    header = next(x for x in dose if x.startswith("#CHROM")).split("\t")
    assert len(header) == 9 + 25
    records = [x for x in dose if not x.startswith("#")]
    assert len(records) > 200  # the 200 typed variants plus imputed ones
    assert sum("TYPED" in x for x in records) == 200
    assert info[0].startswith("SNP\tREF(0)\tALT(1)") and len(info) == len(records) + 1


def test_result_zip_aes(sim: SimulatedCloudgene, client: httpx.Client, clock: FakeClock, vcf: Path) -> None:
    job = finish(client, clock, submit_ok(client, [vcf], password="s3cret", aesEncryption="true", meta="true"))
    content = download(sim, files_of(job)["chr_20.zip"]).content
    with zipfile.ZipFile(io.BytesIO(content)) as zf, pytest.raises(NotImplementedError):
        zf.setpassword(b"s3cret")
        zf.read("chr20.info.gz")  # stdlib cannot read AES
    with pyzipper.AESZipFile(io.BytesIO(content)) as zf:
        zf.setpassword(b"s3cret")
        assert sorted(zf.namelist()) == ["chr20.dose.vcf.gz", "chr20.empiricalDose.vcf.gz", "chr20.info.gz"]
        assert zf.testzip() is None


def test_invented_password_and_escaped_password(sim: SimulatedCloudgene, client: httpx.Client, clock: FakeClock,
                                                vcf: Path) -> None:
    r = client.post(SUBMIT, data={"refpanel": PANEL, "population": "off"},
                    files=[("files", (vcf.name, vcf.read_bytes()))])
    job = finish(client, clock, r.json()["id"])
    password = sim.job_password(job["id"])
    assert len(password) >= 12
    assert "e-mail" in job["steps"][-1]["logMessages"][-1]["message"]
    with zipfile.ZipFile(io.BytesIO(download(sim, files_of(job)["chr_20.zip"]).content)) as zf:
        zf.setpassword(password.encode())
        assert zf.testzip() is None
    # Cloudgene HTML-escapes every form value, the password too
    job2 = finish(client, clock, submit_ok(client, [vcf], password="a<b"))
    with zipfile.ZipFile(io.BytesIO(download(sim, files_of(job2)["chr_20.zip"]).content)) as zf:
        zf.setpassword(b"a&lt;b")
        assert zf.testzip() is None


def test_r2_filter_removes_imputed_variants(sim: SimulatedCloudgene, client: httpx.Client, clock: FakeClock,
                                            vcf: Path) -> None:
    def imputed(**fields: str) -> int:
        job = finish(client, clock, submit_ok(client, [vcf], **fields))
        line = sim.file_bytes(job["id"], "statistics/summary.txt").decode().splitlines()[1]
        return int(line.split("\t")[3])

    assert imputed(r2Filter="0") > imputed(r2Filter="0.3") > 0


# --------------------------------------------------------------------------------------------------- validation


def _bad_vcf(tmp_path: Path, kind: str) -> tuple[Path, str, dict]:
    samples = [f"S{i}" for i in range(25)]
    path = tmp_path / "in.vcf.gz"
    if kind == "gzip":
        write_vcf(path, samples=samples, records=sample_records("20", samples=25, variants=20), compression="gzip")
        return path, "not BGZF", {}
    if kind == "plain":
        path = tmp_path / "in.vcf"
        write_vcf(path, samples=samples, records=sample_records("20", samples=25, variants=20), compression="none")
        return path, "*.vcf.gz", {}
    if kind == "mixed":
        records = [*sample_records("20", samples=25, variants=10), *sample_records("21", samples=25, variants=10)]
        write_vcf(path, samples=samples, records=records)
        return path, "more than one chromosome", {}
    if kind == "chr-on-hg19":
        write_vcf(path, samples=samples, records=sample_records("chr20", samples=25, variants=20))
        return path, "not a valid hg19 encoding", {}
    if kind == "bare-on-hg38":
        write_vcf(path, samples=samples, records=sample_records("20", samples=25, variants=20))
        return path, "not a valid hg38 encoding", {"build": "hg38"}
    if kind == "few-samples":
        write_vcf(path, samples=samples[:10], records=sample_records("20", samples=10, variants=20))
        return path, "At least 20 samples", {}
    if kind == "population":
        write_sample_vcf(path)
        return path, "not supported by reference panel", {"refpanel": "apps@hrc-r1.1@2.0.0", "population": "afr"}
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["gzip", "plain", "mixed", "chr-on-hg19", "bare-on-hg38", "few-samples",
                                  "population"])
def test_invalid_input_fails_in_the_job(client: httpx.Client, clock: FakeClock, tmp_path: Path, kind: str) -> None:
    path, needle, fields = _bad_vcf(tmp_path, kind)
    job_id = submit_ok(client, [path], **fields)  # accepted: the server validates late
    assert status(client, job_id)["state"] == State.WAITING
    job = finish(client, clock, job_id)
    assert job["state"] == State.FAILED
    errors = [m["message"] for s in job["steps"] for m in s["logMessages"] if m["type"] == 1]
    assert any(needle in e for e in errors), errors
    assert files_of(job) == {}


def test_missing_bgzf_eof_is_a_warning(client: httpx.Client, clock: FakeClock, tmp_path: Path) -> None:
    path = write_sample_vcf(tmp_path / "chr20.vcf.gz")
    path.write_bytes(path.read_bytes()[: -len(BGZF_EOF)])
    job = finish(client, clock, submit_ok(client, [path]))
    assert job["state"] == State.SUCCESS
    warnings = [m["message"] for s in job["steps"] for m in s["logMessages"] if m["type"] == 2]
    assert any("end-of-file marker" in w for w in warnings)


def test_two_files_with_different_samples_fail(client: httpx.Client, clock: FakeClock, tmp_path: Path) -> None:
    a = write_sample_vcf(tmp_path / "a.vcf.gz", chromosome="20", samples=25)
    b = write_sample_vcf(tmp_path / "b.vcf.gz", chromosome="21", samples=30)
    job = finish(client, clock, submit_ok(client, [a, b]))
    assert job["state"] == State.FAILED
    c = write_sample_vcf(tmp_path / "c.vcf.gz", chromosome="21", samples=25)
    job = finish(client, clock, submit_ok(client, [a, c]))
    assert job["state"] == State.SUCCESS
    assert {"chr_20.zip", "chr_21.zip"} <= set(files_of(job))


# --------------------------------------------------------------------------------------------------- other calls


def test_cancel(sim: SimulatedCloudgene, client: httpx.Client, clock: FakeClock, vcf: Path) -> None:
    job_id = submit_ok(client, [vcf])
    r = client.get(f"/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["state"] == State.CANCELED
    clock.advance(10)
    assert status(client, job_id)["state"] == State.CANCELED
    done = finish(client, clock, submit_ok(client, [vcf]))
    assert client.get(f"/jobs/{done['id']}/cancel").json()["state"] == State.SUCCESS  # nothing to cancel


def test_dead_job_restarts(sim: SimulatedCloudgene, client: httpx.Client, clock: FakeClock, vcf: Path) -> None:
    sim.faults.dead()
    job_id = submit_ok(client, [vcf])
    clock.advance(1)
    assert status(client, job_id)["state"] == State.DEAD
    other = submit_ok(client, [vcf])
    r = client.get(f"/jobs/{other}/restart")
    assert r.status_code == 400 and r.json()["message"] == f"Job {other} is not pending."
    r = client.get(f"/jobs/{job_id}/restart")
    assert r.status_code == 200 and r.json()["success"] is True
    assert status(client, job_id)["state"] == State.WAITING
    assert finish(client, clock, job_id)["state"] == State.SUCCESS


def test_control_api_kills_stalls_and_retires(sim: SimulatedCloudgene, client: httpx.Client, clock: FakeClock,
                                              vcf: Path) -> None:
    ctl = httpx.Client(base_url=sim.base_url)
    job_id = submit_ok(client, [vcf])
    assert ctl.post(f"/_sim/jobs/{job_id}", json={"action": "stall"}).status_code == 200
    clock.advance(100)
    assert status(client, job_id)["state"] == State.WAITING
    ctl.post(f"/_sim/jobs/{job_id}", json={"action": "release"})
    clock.advance(1.5)
    assert status(client, job_id)["state"] == State.RUNNING
    assert ctl.post(f"/_sim/jobs/{job_id}", json={"action": "kill"}).json()["state"] == State.DEAD
    client.get(f"/jobs/{job_id}/restart")
    job = finish(client, clock, job_id)
    f = files_of(job)["qc_report.txt"]
    assert ctl.post(f"/_sim/jobs/{job_id}", json={"action": "retire"}).json()["state"] == State.RETIRED
    assert download(sim, f).status_code == 404
    assert ctl.post(f"/_sim/jobs/{job_id}", json={"action": "explode"}).status_code == 400


def test_results_retire_after_retention(sim: SimulatedCloudgene, client: httpx.Client, clock: FakeClock,
                                        vcf: Path) -> None:
    job = finish(client, clock, submit_ok(client, [vcf]))
    clock.advance(7 * 86400)
    assert status(client, job["id"])["state"] == State.RETIRED


def test_unknown_and_foreign_jobs(sim: SimulatedCloudgene, client: httpx.Client, vcf: Path) -> None:
    r = client.get("/jobs/job-20200101-000000-000/status")
    assert r.status_code == 404
    assert r.json() == {"success": False, "message": "Job job-20200101-000000-000 not found."}
    job_id = submit_ok(client, [vcf])
    with httpx.Client(base_url=sim.api_url, headers={"X-Auth-Token": "tok-bob"}) as bob:
        for call in ("", "/status", "/cancel", "/restart"):
            r = bob.get(f"/jobs/{job_id}{call}")
            assert r.status_code == 403 and r.json()["message"] == "Access denied."
    refused = client.delete(f"/jobs/{job_id}")  # needs a browser session's access token, never an API token's
    assert refused.status_code == 401
    assert refused.json() == {"success": False, "message": "The request requires user authentication."}


def test_job_list_paging(clock: FakeClock, tmp_path: Path) -> None:
    vcf = write_sample_vcf(tmp_path / "chr20.vcf.gz", variants=20)
    with SimulatedCloudgene({"t": "u", "o": "other"}, max_jobs_per_user=100, clock=clock) as sim:
        with httpx.Client(base_url=sim.api_url, headers={"X-Auth-Token": "t"}) as c:
            empty = c.get("/jobs", params={"page": 1}).json()
            assert empty["count"] == 0 and empty["data"] == [] and empty["page"] == 0
            ids = []
            for i in range(17):
                ids.append(submit_ok(c, [vcf], mode="qc_only", **{"job-name": f"n{i}"}))
                clock.advance(0.01)
            page1 = c.get("/jobs", params={"page": 1}).json()
            assert (page1["count"], page1["page"], page1["pageSize"]) == (17, 1, 15)
            assert page1["prev"] is None and page1["next"] == 2 and page1["pages"] == [1, 2]
            assert [j["id"] for j in page1["data"]] == ids[::-1][:15]  # newest first
            page2 = c.get("/jobs", params={"page": 2}).json()
            assert page2["prev"] == 1 and page2["next"] is None
            assert [j["id"] for j in page2["data"]] == ids[::-1][15:]
            everything = c.get("/jobs").json()
            assert everything["pageSize"] == 17 and len(everything["data"]) == 17
        with httpx.Client(base_url=sim.api_url, headers={"X-Auth-Token": "o"}) as other:
            assert other.get("/jobs?page=1").json()["count"] == 0


def test_server_and_app_info(client: httpx.Client) -> None:
    server = client.get("/server").json()
    assert server["apps"] == [{"id": "imputationserver2", "name": "Genotype Imputation (Minimac4)"}]
    assert server["user"]["username"] == "alice" and server["maintenace"] is False
    app = client.get("/server/apps/imputationserver2").json()
    params = {p["id"]: p for p in app["params"]}
    panels = params["refpanel"]["values"]
    assert {"key": PANEL, "value": "1000 Genomes Phase 3 (Version 5)"}.items() <= next(
        p for p in panels if p["key"] == PANEL
    ).items()
    assert any(p["key"] == "apps@h3africa-v6hc-s@1.0.0" for p in panels)
    assert all(p["populations"] for p in panels)
    assert {v["key"] for v in params["build"]["values"]} == {"hg19", "hg38"}
    assert client.get("/server/apps/nope").status_code == 404


# --------------------------------------------------------------------------------------------------- faults


def test_maintenance_over_http(sim: SimulatedCloudgene, client: httpx.Client, vcf: Path) -> None:
    ctl = httpx.Client(base_url=sim.base_url)
    assert ctl.post("/_sim/maintenance", json={"enabled": True}).json() == {"maintenance": True}
    expected = {"success": False, "message": "This functionality is currently under maintenance."}
    r = submit(client, [vcf])
    assert r.status_code == 503 and r.json() == expected
    r = client.get("/jobs")
    assert r.status_code == 503 and r.json() == expected
    assert client.get("/server").json()["maintenace"] is True
    assert httpx.post(f"{sim.api_url}/tokens/verify", data={"token": "tok"}).json()["valid"] is True
    ctl.post("/_sim/maintenance", json={"enabled": False})
    submit_ok(client, [vcf])


def test_tokens_over_http(sim: SimulatedCloudgene, client: httpx.Client) -> None:
    ctl = httpx.Client(base_url=sim.base_url)
    ctl.post("/_sim/tokens", json={"action": "revoke", "token": "tok"})
    assert client.get("/jobs").status_code == 403
    ctl.post("/_sim/tokens", json={"action": "expire", "token": "tok"})
    assert client.get("/jobs").status_code == 401
    ctl.post("/_sim/tokens", json={"action": "restore", "token": "tok"})
    assert client.get("/jobs").status_code == 200
    ctl.post("/_sim/tokens", json={"action": "create", "token": "fresh", "username": "dave"})
    assert httpx.get(f"{sim.api_url}/jobs", headers={"X-Auth-Token": "fresh"}).status_code == 200


def test_error_burst_then_recovery(sim: SimulatedCloudgene, client: httpx.Client) -> None:
    sim.faults.error(502, times=2)
    for _ in range(2):
        r = client.get("/jobs")
        assert r.status_code == 502 and "<center>nginx</center>" in r.text
        assert r.headers["content-type"].startswith("text/html")
    assert client.get("/jobs").status_code == 200
    sim.faults.error(500)
    r = client.get("/jobs")
    assert r.status_code == 500 and r.json()["message"] == "Internal Server Error"


def test_faults_are_scoped(sim: SimulatedCloudgene, client: httpx.Client, vcf: Path) -> None:
    sim.faults.error(503, times=None, path="/api/v2/jobs/submit", method="POST")
    assert client.get("/jobs").status_code == 200
    assert submit(client, [vcf]).status_code == 503
    assert submit(client, [vcf]).status_code == 503
    sim.faults.clear()
    submit_ok(client, [vcf])


def test_error_after_the_job_was_created(sim: SimulatedCloudgene, client: httpx.Client, vcf: Path) -> None:
    sim.faults.error(502, when="after", path="/api/v2/jobs/submit")
    r = submit(client, [vcf], **{"job-name": "exactly-once"})
    assert r.status_code == 502
    assert sim.submissions("exactly-once") == 1  # the server did create it
    listed = client.get("/jobs").json()["data"]
    assert [j["name"] for j in listed] == ["exactly-once"]


def test_dropped_connections(sim: SimulatedCloudgene, client: httpx.Client, vcf: Path) -> None:
    sim.faults.drop()
    with pytest.raises(httpx.RemoteProtocolError):
        client.get("/jobs")
    assert client.get("/jobs").status_code == 200
    sim.faults.drop(when="after", path="/api/v2/jobs/submit")
    with pytest.raises(httpx.RemoteProtocolError):
        submit(client, [vcf], **{"job-name": "lost-answer"})
    assert sim.submissions("lost-answer") == 1


def test_slow_answers_and_latency(sim: SimulatedCloudgene, client: httpx.Client) -> None:
    sim.faults.slow(0.3)
    start = time.monotonic()
    assert client.get("/jobs").status_code == 200
    assert time.monotonic() - start >= 0.3
    start = time.monotonic()
    client.get("/jobs")
    assert time.monotonic() - start < 0.3
    rule = sim.faults.latency(0.05)
    start = time.monotonic()
    for _ in range(3):
        client.get("/jobs")
    assert time.monotonic() - start >= 0.15
    sim.faults.remove(rule.id)
    with pytest.raises(httpx.ReadTimeout):
        sim.faults.slow(1.0)
        client.get("/jobs", timeout=0.2)


def test_slow_submit_creates_the_job_after_the_client_gave_up(sim: SimulatedCloudgene, client: httpx.Client,
                                                               vcf: Path) -> None:
    """Cloudgene copies the upload before the job exists: a client that stops waiting (its timeout, a kill) does
    not stop it, and the job appears in the list later all the same."""
    sim.faults.slow_submit(1.0)
    with pytest.raises(httpx.ReadTimeout):
        client.post("/jobs/submit/imputationserver2", timeout=0.2, data={"refpanel": PANEL, "build": "hg19",
                    "job-name": "gave-up"}, files=[("files", (vcf.name, vcf.read_bytes(), "application/gzip"))])
    assert sim.submissions("gave-up") == 0 and sim.submits_being_copied() == 1
    assert client.get("/jobs").json()["data"] == []
    deadline = time.monotonic() + 10
    while (sim.submissions("gave-up") == 0 or sim.submits_being_copied()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [j["name"] for j in client.get("/jobs").json()["data"]] == ["gave-up"]
    assert sim.submits_being_copied() == 0
    submit_ok(client, [vcf])  # the fault fired once: the next submit is quick


def test_slow_submit_behind_a_proxy_answers_504_then_creates_the_job(sim: SimulatedCloudgene, client: httpx.Client,
                                                                     vcf: Path) -> None:
    sim.faults.slow_submit(1.0, proxy_status=504)
    start = time.monotonic()
    r = submit(client, [vcf], **{"job-name": "behind-proxy"})
    assert r.status_code == 504 and "504 Gateway Time-out" in r.text
    assert r.headers["content-type"].startswith("text/html")
    assert time.monotonic() - start < 1.0 and sim.submissions("behind-proxy") == 0
    deadline = time.monotonic() + 10
    while sim.submissions("behind-proxy") == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [j["name"] for j in client.get("/jobs").json()["data"]] == ["behind-proxy"]
    with pytest.raises(ValueError, match="proxy_status"):
        sim.faults.slow_submit(1.0, proxy_status=404)


def test_malformed_json_html_200_and_rate_limit(sim: SimulatedCloudgene, client: httpx.Client) -> None:
    sim.faults.malformed_json()
    r = client.get("/jobs")
    assert r.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        r.json()
    sim.faults.html_200()
    r = client.get("/jobs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    sim.faults.rate_limit(retry_after=7)
    r = client.get("/jobs")
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert client.get("/jobs").json()["count"] == 0


def test_truncated_and_corrupted_downloads(sim: SimulatedCloudgene, client: httpx.Client, clock: FakeClock,
                                           vcf: Path) -> None:
    job = finish(client, clock, submit_ok(client, [vcf]))
    f = files_of(job)["chr_20.zip"]
    original = sim.file_bytes(job["id"], "chr_20.zip")
    sim.faults.truncate(fraction=0.5)
    with pytest.raises(httpx.RemoteProtocolError):
        download(sim, f)
    sim.faults.corrupt(nbytes=8)
    r = download(sim, f)
    assert r.status_code == 200 and len(r.content) == len(original) and r.content != original
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        zf.setpassword(b"pw")
        with pytest.raises((zipfile.BadZipFile, zlib.error, RuntimeError)):
            for name in zf.namelist():
                zf.read(name)
    r = download(sim, f)
    assert r.content == original

    def download_log() -> list[dict]:
        return [d for d in sim.stats()["downloads"] if d["name"] == "chr_20.zip"]

    # The server records a download once its last byte is written, which can be just after the client has it all.
    deadline = time.monotonic() + 5
    while len(log := download_log()) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [d["fault"] for d in log] == ["truncate", "corrupt", None]
    assert [d["complete"] for d in log] == [False, False, True]
    assert log[0]["bytes_sent"] == len(original) // 2
    assert log[2]["sha256_sent"] == hashlib.sha256(original).hexdigest()
    assert files_of(status(client, job["id"]))["chr_20.zip"]["count"] == 7  # every GET counted


def test_a_reset_download_and_a_success_without_files(sim: SimulatedCloudgene, client: httpx.Client,
                                                      clock: FakeClock, vcf: Path) -> None:
    job = finish(client, clock, submit_ok(client, [vcf]))
    f = files_of(job)["chr_20.zip"]
    sim.faults.reset(fraction=0.5)
    with pytest.raises(httpx.ReadError):  # a TCP reset, not the clean close of `truncate`
        download(sim, f)
    deadline = time.monotonic() + 5  # the server records the download after it has reset the connection
    while not (log := [d for d in sim.stats()["downloads"] if d["name"] == "chr_20.zip"]) and \
            time.monotonic() < deadline:
        time.sleep(0.01)
    [served] = log
    assert served["fault"] == "reset" and served["status"] == 200 and not served["complete"]

    sim.faults.no_outputs(times=1)
    assert [p["files"] for p in status(client, job["id"])["outputParams"]] == [[]] * len(job["outputParams"])
    assert files_of(status(client, job["id"])) == files_of(job) | {"chr_20.zip": {**f, "count": 9}}


def test_job_faults(sim: SimulatedCloudgene, client: httpx.Client, clock: FakeClock, vcf: Path) -> None:
    sim.faults.fail_validation(message="Simulated: broken file.")
    sim.faults.stall()
    failing = submit_ok(client, [vcf])  # takes both job faults
    normal = submit_ok(client, [vcf])
    clock.advance(100)
    assert status(client, failing)["state"] == State.WAITING
    sim.release_job(failing)
    job = finish(client, clock, failing)
    assert job["state"] == State.FAILED
    assert [m["message"] for s in job["steps"] for m in s["logMessages"] if m["type"] == 1] == [
        "Simulated: broken file."
    ]
    assert status(client, normal)["state"] == State.SUCCESS


def test_faults_over_http(sim: SimulatedCloudgene, client: httpx.Client) -> None:
    ctl = httpx.Client(base_url=sim.base_url)
    r = ctl.post("/_sim/faults", json={"rules": [{"kind": "error", "status": 502, "times": 1},
                                                 {"kind": "rate_limit", "retry_after": 3}]})
    assert r.status_code == 200 and len(r.json()["added"]) == 2
    assert len(ctl.get("/_sim/faults").json()["rules"]) == 2
    assert client.get("/jobs").status_code == 502
    assert client.get("/jobs").status_code == 429
    assert client.get("/jobs").status_code == 200
    assert ctl.get("/_sim/faults").json()["fired"] == {"error": 1, "rate_limit": 1}
    rule = ctl.post("/_sim/faults", json={"kind": "delay", "seconds": 0.01, "times": None}).json()["added"][0]
    assert ctl.delete(f"/_sim/faults/{rule['id']}").json() == {"removed": True}
    ctl.post("/_sim/faults", json={"kind": "drop", "times": None})
    assert ctl.delete("/_sim/faults").status_code == 200
    assert client.get("/jobs").status_code == 200
    assert ctl.post("/_sim/faults", json={"kind": "meteor"}).status_code == 400
    assert ctl.post("/_sim/faults", json={"kind": "error", "colour": "red"}).status_code == 400
    assert ctl.post("/_sim/timings", json={"queue": 5}).json()["queue"] == 5


# --------------------------------------------------------------------------------------------------- stats


def test_stats(sim: SimulatedCloudgene, client: httpx.Client, clock: FakeClock, vcf: Path) -> None:
    job = finish(client, clock, submit_ok(client, [vcf], **{"job-name": "ours-42"}))
    f = files_of(job)["qc_report.txt"]
    body = download(sim, f).content
    stats = httpx.get(f"{sim.base_url}/_sim/stats").json()
    assert stats == json.loads(json.dumps(sim.stats()))
    assert stats["submissions"] == {"ours-42": 1}
    assert stats["requests"]["POST /api/v2/jobs/submit/{app}"] == 1
    assert stats["requests"]["GET /api/v2/jobs/{id}/status"] == 1
    assert stats["requests"]["GET /share/results/{hash}/{name}"] == 1
    entry = stats["jobs"][job["id"]]
    assert entry["name"] == "ours-42" and entry["state"] == State.SUCCESS
    assert entry["files"]["qc_report.txt"]["sha256"] == hashlib.sha256(body).hexdigest()
    assert entry["files"]["qc_report.txt"]["downloads_left"] == 9
    assert entry["files"]["qc_report.txt"]["served"] == 1
    assert stats["downloads"][0]["sha256_sent"] == hashlib.sha256(body).hexdigest()
    assert f["hash"] not in json.dumps(stats)  # download secrets stay out of stats
    assert "tok" not in json.dumps(stats)


# --------------------------------------------------------------------------------------------------- lifecycle


def test_stop_closes_kept_alive_connections(vcf: Path) -> None:
    sim = SimulatedCloudgene({"t": "u"}).start()
    c = httpx.Client(base_url=sim.api_url, headers={"X-Auth-Token": "t"}, timeout=2)
    assert c.get("/jobs").status_code == 200
    sim.stop()
    with pytest.raises(httpx.TransportError):
        c.get("/jobs")
    c.close()


def test_serve_prints_url_and_token() -> None:
    out = io.StringIO()
    stop = threading.Event()
    seen: dict[str, str] = {}

    def ready(sim: SimulatedCloudgene) -> None:
        seen["url"] = sim.base_url
        stop.set()

    thread = threading.Thread(target=serve, kwargs={"out": out, "stop": stop, "on_ready": ready})
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    text = out.getvalue()
    assert seen["url"] in text
    token = re.search(r"API token for user 'demo': (\S+)", text).group(1)
    assert len(token) >= 20


def test_simulator_in_another_process(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.simulator", "--token", "xtok", "--instant"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        first = proc.stdout.readline()
        base = re.search(r"(http://127\.0\.0\.1:\d+)", first).group(1)
        assert "xtok" in proc.stdout.readline()
        httpx.post(f"{base}/_sim/faults", json={"kind": "error", "status": 502}).raise_for_status()
        assert httpx.get(f"{base}/api/v2/jobs", headers={"X-Auth-Token": "xtok"}).status_code == 502
        assert httpx.get(f"{base}/api/v2/jobs", headers={"X-Auth-Token": "xtok"}).status_code == 200
        assert httpx.get(f"{base}/_sim/stats").json()["faults_fired"] == {"error": 1}
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_the_same_upload_gives_the_same_dosages_built_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The generator is seeded from the input, so a repeated upload reuses the dosage files (bench/throughput.py
    sends one file a thousand times); only the zip around them, with its own password, is made anew."""
    from daemon.simulator import results
    from daemon.simulator.vcf import inspect_vcf

    vcf = write_sample_vcf(tmp_path / "chr20.vcf.gz", chromosome="20", build="hg19", samples=20, variants=30)
    summary = inspect_vcf(vcf, "chr20.vcf.gz")
    params = results.JobParams(refpanel="apps@1000g-phase-3-v5@2.0.0", build="hg19", r2_filter=0.3,
                               phasing="eagle", population="eur", mode="imputation", aes=False, meta=False,
                               password="first-password", password_generated=False)
    built = []
    real = results._write_chromosome
    monkeypatch.setattr(results, "_write_chromosome", lambda *args: built.append(1) or real(*args))
    results._MEMBERS.clear()
    contents = []
    for out, password in (("a", "first-password"), ("b", "second-password")):
        job_params = params if password == params.password else results.JobParams(
            **{**params.__dict__, "password": password})
        results.build_results(tmp_path / out, [(vcf, summary)], job_params)
        with zipfile.ZipFile(tmp_path / out / "chr_20.zip") as zf:
            contents.append({name: zf.read(name, pwd=password.encode()) for name in zf.namelist()})
    assert built == [1]
    assert contents[0] == contents[1] and set(contents[0]) == {"chr20.dose.vcf.gz", "chr20.info.gz"}
