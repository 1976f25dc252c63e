"""The WES adapter against a REAL GA4GH WES 1.1 server: sapporo, started as a subprocess on 127.0.0.1 (no Docker).

How the server is set up is in tests/support/wes/sapporo_server.py: the installed sapporo with its own CLI, its own run
directory, a `service_info.json` declaring one workflow type (SHELL 1.0) and one engine (`shell`), and a run.sh
made of tests/support/wes/engine.sh in front of sapporo's stock run.sh. The "imputation" is
tests/support/wes/impute.sh: it
reads the attached .vcf.gz files and writes chrN.dose.vcf.gz, chrN.info.txt, stats.txt and "logs/impute log.txt";
`simulate: fail` makes it exit 3 after an error on stderr, `sleep: N` keeps it RUNNING for cancel.

Everything below goes through sapporo's real HTTP API, its real form parsing and validation, its real run
lifecycle (INITIALIZING → QUEUED → RUNNING → COMPLETE / EXECUTOR_ERROR / CANCELING → CANCELED) and its real
output listing and download endpoints. What this server cannot show, and where it is covered instead:

- Output shapes other than sapporo's list of {file_name, file_url}, and published checksums: sapporo publishes
  no checksum and has one shape (test_wes_adapter.py covers CWL File objects, mappings, "sha1$…").
- `run_log.stderr` as a URL (what the WES spec says): sapporo returns the text itself (covered with respx).
- Run lists without `tags`: sapporo's GET /runs includes each run's tags, so `find_submitted` never needs the
  per-run GET /runs/{id} fallback here (covered with respx, with paging).
- Transient failures (5xx, 429, timeouts) and paging across several pages with sapporo's signed page tokens are
  not provoked here; the paging here is one short page (covered with respx).
"""

from __future__ import annotations

import gzip
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.wes.sapporo_server import SapporoServer, require_sapporo, running_sapporo

from daemon import cli
from daemon.config import load_config
from daemon.db.schema import upgrade_url
from daemon.remote import RemoteStatus, SubmitRequest
from daemon.services.errors import Blocked, Permanent
from daemon.services.wes import TAG_JOB_ID, WesAdapter
from daemon.states import RemoteKind

pytestmark = pytest.mark.timeout(60)

FINISHED = {RemoteKind.SUCCEEDED, RemoteKind.FAILED, RemoteKind.CANCELLED}
HEADER = (
    "##fileformat=VCFv4.2\n"
    "##contig=<ID={chrom}>\n"
    "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\tS1\tS2\n"
)


def write_vcf(path: Path, chrom: str, positions: list[int]) -> Path:
    records = "".join(f"{chrom}\t{pos}\trs{pos}\tA\tG\t.\tPASS\tAC=1\tGT\t0|1\t1|1\n" for pos in positions)
    path.write_bytes(gzip.compress((HEADER.format(chrom=chrom) + records).encode(), mtime=0))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("inputs")
    return [
        write_vcf(folder / "study.chr20.vcf.gz", "20", [60_291, 61_098, 61_270]),
        write_vcf(folder / "study.chr21.vcf.gz", "chr21", [9_411_239, 9_411_245]),
    ]


@pytest.fixture
def make_adapter(sapporo: SapporoServer) -> Iterator[Any]:  # noqa: F811
    adapters: list[WesAdapter] = []

    def make(params: dict[str, Any] | None = None, *, token: str | None = None, **overrides: Any) -> WesAdapter:
        config = sapporo.service_config(wes=sapporo.wes_config(params, **overrides))
        adapter = WesAdapter(config, token=lambda: token)
        adapters.append(adapter)
        return adapter

    yield make
    for adapter in adapters:
        adapter.close()


def job_id() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def wait_for(adapter: WesAdapter, run_id: str, kinds: set[RemoteKind], timeout: float = 30.0) -> RemoteStatus:
    """Poll until the run's kind is one of `kinds` (or it finished some other way), with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        status = adapter.status(run_id)
        if status.kind in kinds or status.kind in FINISHED:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} still {status.raw_state} after {timeout} s")
        time.sleep(0.1)


def download(adapter: WesAdapter, output: Any) -> bytes:
    with adapter.stream_output(output) as body:
        return b"".join(body.chunks())


def test_check(make_adapter: Any) -> None:
    check = make_adapter().check()
    assert check.reachable
    assert check.token_valid is None  # this server needs no token and none is configured
    assert check.message == "workflow types: SHELL 1.0; engines: shell 1.0"


def test_submit_poll_download(make_adapter: Any, sapporo: SapporoServer, inputs: list[Path]) -> None:  # noqa: F811
    adapter = make_adapter()
    ours = job_id()
    run_id = adapter.submit(SubmitRequest(job_id=ours, files=inputs, panel="hrc-r1.1", build="hg19", name="demo"))

    status = wait_for(adapter, run_id, {RemoteKind.SUCCEEDED})
    assert (status.kind, status.raw_state) == (RemoteKind.SUCCEEDED, "COMPLETE")

    # What sapporo received: the rendered template, the tags, the attachments.
    run_dir = sapporo.run_path(run_id)
    assert json.loads((run_dir / "exe" / "workflow_params.json").read_text()) == {
        "files": ["study.chr20.vcf.gz", "study.chr21.vcf.gz"],
        "panel": "hrc-r1.1",
        "build": "hg19",
        "job_id": ours,
    }
    request = json.loads((run_dir / "run_request.json").read_text())
    assert request["tags"] == {TAG_JOB_ID: ours, "imputationd_name": "demo"}
    assert (request["workflow_type"], request["workflow_engine"]) == ("SHELL", "shell")
    for path in inputs:
        assert (run_dir / "exe" / path.name).read_bytes() == path.read_bytes()

    names = sorted(output.name for output in status.outputs)
    assert names == [
        "chr20.dose.vcf.gz",
        "chr20.info.txt",
        "chr21.dose.vcf.gz",
        "chr21.info.txt",
        "logs/impute log.txt",
        "stats.txt",
    ]
    for output in status.outputs:
        assert output.checksum is None  # sapporo publishes none
        assert download(adapter, output) == (sapporo.outputs_dir(run_id) / output.name).read_bytes()

    by_name = {output.name: output for output in status.outputs}
    dose = gzip.decompress(download(adapter, by_name["chr20.dose.vcf.gz"])).decode()
    records = [line.split("\t") for line in dose.splitlines() if not line.startswith("#")]
    assert [(r[1], r[7]) for r in records] == [("60291", "AC=1;IMPUTED"), ("61098", "AC=1;IMPUTED"),
                                               ("61270", "AC=1;IMPUTED")]
    stats = download(adapter, by_name["stats.txt"]).decode()
    assert f"job_id: {ours}\npanel: hrc-r1.1\nbuild: hg19\n" in stats
    assert "study.chr21.vcf.gz: 2 variants on chr21" in stats


def test_inputs_as_path(make_adapter: Any, inputs: list[Path]) -> None:
    """The server shares our file system here, so absolute paths instead of attachments work too."""
    adapter = make_adapter(inputs_as="path")
    run_id = adapter.submit(SubmitRequest(job_id=job_id(), files=inputs[:1], panel="p", build="hg38"))
    status = wait_for(adapter, run_id, {RemoteKind.SUCCEEDED})
    assert status.kind is RemoteKind.SUCCEEDED, status.message
    assert "chr20.dose.vcf.gz" in {output.name for output in status.outputs}


def test_failure_reports_stderr(make_adapter: Any, inputs: list[Path]) -> None:
    adapter = make_adapter({"files": "{files}", "panel": "{panel}", "build": "{build}", "simulate": "fail"})
    run_id = adapter.submit(SubmitRequest(job_id=job_id(), files=inputs[:1], panel="hrc", build="hg19"))
    status = wait_for(adapter, run_id, {RemoteKind.FAILED})
    assert (status.kind, status.raw_state) == (RemoteKind.FAILED, "EXECUTOR_ERROR")
    assert status.message == (
        "EXECUTOR_ERROR (exit code 3): loading reference panel hrc\n"
        "ERROR: reference panel 'hrc' has no chromosome 20 for hg19"
    )
    assert status.outputs == ()


def test_cancel_a_running_run(make_adapter: Any, inputs: list[Path]) -> None:
    adapter = make_adapter({"files": "{files}", "sleep": "30"})
    run_id = adapter.submit(SubmitRequest(job_id=job_id(), files=inputs[:1], panel="p", build="hg19"))
    running = wait_for(adapter, run_id, {RemoteKind.RUNNING})
    assert running.raw_state == "RUNNING"

    started = time.monotonic()
    adapter.cancel(run_id)
    status = wait_for(adapter, run_id, {RemoteKind.CANCELLED}, timeout=20)
    assert (status.kind, status.raw_state) == (RemoteKind.CANCELLED, "CANCELED")
    assert time.monotonic() - started < 15  # the 30 s sleep was stopped, not waited out


def test_find_submitted_and_list_jobs(make_adapter: Any, inputs: list[Path]) -> None:
    adapter = make_adapter()
    ours = job_id()
    run_id = adapter.submit(SubmitRequest(job_id=ours, files=inputs[:1], panel="p", build="hg19"))

    assert adapter.find_submitted(ours) == run_id
    assert adapter.find_submitted(job_id()) is None
    listed = {job.remote_id: job for job in adapter.list_jobs()}
    assert listed[run_id].name == ours
    assert listed[run_id].raw_state in {"INITIALIZING", "QUEUED", "RUNNING", "COMPLETE"}
    wait_for(adapter, run_id, {RemoteKind.SUCCEEDED})


def test_server_error_bodies(make_adapter: Any, inputs: list[Path]) -> None:
    adapter = make_adapter(workflow_type="CWL")
    with pytest.raises(Permanent, match=r"^POST /runs: HTTP 400: Invalid workflow_type: CWL") as caught:
        adapter.submit(SubmitRequest(job_id=job_id(), files=inputs[:1], panel="p", build="hg19"))
    assert caught.value.kind == "http_400"

    unknown = str(uuid.uuid4())
    with pytest.raises(Permanent, match=rf"^GET /runs/{unknown}/status: HTTP 404: .*{unknown}"):
        adapter.status(unknown)
    assert "not offered" in (adapter.check().message or "")


# ------------------------------------------------------------------------------ with authentication, at the root


@pytest.fixture(scope="module")
def auth_sapporo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SapporoServer]:
    """sapporo with its own IdP enabled, mounted at the root of a bare origin (sapporo's default mount)."""
    require_sapporo()
    with running_sapporo(tmp_path_factory.mktemp("sapporo-auth"), url_prefix="", auth_password="pw-0123456789") as s:
        yield s


def test_bearer_token_against_a_root_mounted_server(auth_sapporo: SapporoServer, inputs: list[Path]) -> None:
    token = auth_sapporo.token()
    current: dict[str, str | None] = {"token": token}
    adapter = WesAdapter(auth_sapporo.service_config(), token=lambda: current["token"])
    try:
        check = adapter.check()
        assert check.reachable and check.token_valid is True
        assert check.token_expires is not None  # sapporo's tokens are JWTs with `exp`
        assert adapter._api_root() == auth_sapporo.origin  # found at the root, not under /ga4gh/wes/v1

        ours = job_id()
        run_id = adapter.submit(SubmitRequest(job_id=ours, files=inputs[1:], panel="p", build="hg38"))
        assert adapter.find_submitted(ours) == run_id
        status = wait_for(adapter, run_id, {RemoteKind.SUCCEEDED})
        assert status.kind is RemoteKind.SUCCEEDED, status.message
        for output in status.outputs:  # downloads need the token too
            assert download(adapter, output) == (auth_sapporo.outputs_dir(run_id) / output.name).read_bytes()

        current["token"] = "not-a-valid-token"
        check = adapter.check()
        assert check.reachable and check.token_valid is False
        with pytest.raises(Blocked) as caught:
            adapter.status(run_id)
        assert caught.value.kind == "unauthorized"
        assert "not-a-valid-token" not in str(caught.value)

        current["token"] = None
        with pytest.raises(Blocked, match=r"^GET /runs/.*: HTTP 401: "):
            adapter.status(run_id)
        assert token not in str(adapter.check())
    finally:
        adapter.close()


def test_services_check_of_a_server_without_auth_calls_no_token_valid(sapporo: SapporoServer, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`auth: none` (this sapporo takes no token): no token is configured or sent, and `services --check` says so
    instead of calling a token valid that nobody checked."""
    wes = sapporo.wes_config()
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({
        "storage": {"state_dir": str(tmp_path / "state")},
        "services": {"open-wes": {
            "type": "wes", "base_url": sapporo.origin, "auth": "none",
            "wes": {"workflow_url": wes.workflow_url, "workflow_type": wes.workflow_type,
                    "workflow_type_version": wes.workflow_type_version},
        }},
    }))
    upgrade_url(load_config(config).database.url)
    assert cli.main(["services", "-c", str(config), "--check"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert "TOKEN" in header and "none (auth: none)" in row and "valid" not in row
    assert cli.main(["services", "-c", str(config), "--check", "--json"]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert (entry["auth"], entry["token_valid"], entry["reachable"]) == ("none", None, True)
