"""Both adapters against real loopback servers that misbehave: answers too large (plain, compressed, in a redirect)
and answers that drip. Every API answer is read with a size cap, and every call ends (`daemon.services.deadlines`).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import ssl
from pathlib import Path

import httpx
import pytest
from support.hostile_server import HostileServer, Pause, Request, drip, endless, json_answer, with_cloudgene_app
from support.tls_support import self_signed_certificate

from daemon.config import ServiceConfig, WesConfig
from daemon.remote import RemoteOutput, SubmitRequest
from daemon.services import deadlines
from daemon.services import http as http_module
from daemon.services.cloudgene import CloudgeneAdapter
from daemon.services.errors import Transient
from daemon.services.http import ANSWER_LIMIT
from daemon.services.wes import WesAdapter

TOKEN = "limits-token-" + "x" * 20
#: The per-read timeout of the services here: every drip below sends a byte well within it.
TIMEOUT = 0.5
DRIP = 0.02
STATUS = json.dumps({"id": "job-1", "state": 2, "steps": [], "outputParams": []}).encode()


def cloudgene(url: str, timeout: float = TIMEOUT) -> CloudgeneAdapter:
    config = ServiceConfig(name="cg", type="cloudgene", base_url=url, timeout=timeout)
    return CloudgeneAdapter(config, token=lambda: TOKEN)


def wes(url: str, timeout: float = TIMEOUT) -> WesAdapter:
    config = ServiceConfig(
        name="wes", type="wes", base_url=url + "/ga4gh/wes/v1", timeout=timeout,
        wes=WesConfig(workflow_url="https://example.org/x.cwl", workflow_type="CWL", workflow_type_version="v1.2"),
    )
    return WesAdapter(config, token=lambda: TOKEN)


def submit_request(tmp_path: Path) -> SubmitRequest:
    vcf = tmp_path / "chr1.vcf.gz"
    vcf.write_bytes(b"x" * 100_000)
    return SubmitRequest(job_id="job-ours", files=[vcf], panel="p", build="hg19")


# --- answers too large -------------------------------------------------------------------------------------------


def test_an_endless_status_answer_is_refused_at_the_cap():
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"x\": \""
    with HostileServer(lambda request: endless(head)) as server, contextlib.closing(cloudgene(server.url)) as a:
        with pytest.raises(Transient) as caught:
            a.status("job-1")
    assert caught.value.kind == "bad_response"
    assert str(caught.value) == (
        "GET /jobs/job-1/status: the answer is larger than the 2 MiB an answer may be; refusing it"
    )


@pytest.mark.parametrize("adapter", ["cloudgene", "wes"])
def test_a_large_answer_is_refused_by_both_adapters(adapter):
    body = b'{"state": "RUNNING", "pad": "' + b"x" * ANSWER_LIMIT + b'"}'
    with HostileServer(lambda request: [json_answer(body)]) as server:
        make = cloudgene if adapter == "cloudgene" else wes
        with contextlib.closing(make(server.url)) as a, pytest.raises(Transient) as caught:
            a.status("job-1")
    assert caught.value.kind == "bad_response"
    assert "larger than the 2 MiB" in str(caught.value)
    assert str(caught.value).startswith(("GET /jobs/job-1/status:", "GET /runs/job-1/status:"))


def test_an_answer_just_under_the_cap_is_read():
    pad = ANSWER_LIMIT - len(STATUS) - 20
    body = STATUS[:-1] + b', "pad": "' + b"x" * pad + b'"}'
    assert len(body) <= ANSWER_LIMIT
    with HostileServer(lambda request: [json_answer(body)]) as server, contextlib.closing(cloudgene(server.url)) as a:
        assert a.status("job-1").raw_state == "RUNNING"


def test_a_compressed_answer_is_capped_after_decompression():
    # 64 MiB of JSON in ~64 KiB of gzip: the cap counts what it becomes, not what came over the wire.
    bomb = gzip.compress(b'{"state": 2, "pad": "' + b" " * (64 << 20) + b'"}', 9)
    answer = json_answer(bomb, extra="Content-Encoding: gzip\r\n")
    with HostileServer(lambda request: [answer]) as server, contextlib.closing(cloudgene(server.url)) as a:
        with pytest.raises(Transient) as caught:
            a.status("job-1")
        assert server.requests[0].headers["accept-encoding"] == "identity"
    assert caught.value.kind == "bad_response" and "larger than the 2 MiB" in str(caught.value)


def test_a_compressed_answer_under_the_cap_is_decoded():
    answer = json_answer(gzip.compress(STATUS), extra="Content-Encoding: gzip\r\n")
    with HostileServer(lambda request: [answer]) as server, contextlib.closing(cloudgene(server.url)) as a:
        assert a.status("job-1").raw_state == "RUNNING"


def test_a_redirect_hop_is_read_with_the_cap_too():
    # WES calls follow redirects; httpx would read each hop's body whole before following it.
    def answer(request: Request):
        if request.path.endswith("/status"):
            return endless(b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\n\r\n")
        return [json_answer(b'{"state": "RUNNING"}')]

    with HostileServer(answer) as server, contextlib.closing(wes(server.url)) as a:
        with pytest.raises(Transient) as caught:
            a.status("run-1")
    assert caught.value.kind == "bad_response" and "larger than the 2 MiB" in str(caught.value)


def test_a_download_redirect_hop_is_read_with_the_cap():
    output_path = "/share/results/abc/chr1.zip"

    def answer(request: Request):
        if request.path == output_path:
            return endless(b"HTTP/1.1 302 Found\r\nLocation: /presigned/chr1.zip\r\n\r\n")
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nzip"]

    with HostileServer(answer) as server:
        output = RemoteOutput(name="chr1.zip", url=server.url + output_path, remote_hash="abc")
        with contextlib.closing(cloudgene(server.url)) as a, pytest.raises(Transient) as caught:
            with a.stream_output(output):
                pass
    assert caught.value.kind == "bad_response" and "larger than the 2 MiB" in str(caught.value)


def test_a_wes_download_error_answer_is_read_with_the_cap():
    with HostileServer(lambda request: endless(b"HTTP/1.1 500 Oops\r\nContent-Type: text/plain\r\n\r\n")) as server:
        output = RemoteOutput(name="out.vcf.gz", url=server.url + "/files/out.vcf.gz")
        with contextlib.closing(wes(server.url)) as a, pytest.raises(Transient) as caught:
            with a.stream_output(output):
                pass
    assert caught.value.kind == "bad_response" and "larger than the 2 MiB" in str(caught.value)


# --- answers that drip -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["head", "body"])
@pytest.mark.parametrize("adapter", ["cloudgene", "wes"])
def test_a_dripping_api_answer_ends_at_the_calls_deadline(adapter, where):
    # Each byte comes well within the read timeout; the whole answer would take 100 times the call's deadline.
    body = b'{"state": "RUNNING", "pad": "' + b"x" * 5000 + b'"}'
    answer = json_answer(body)
    split = answer.index(b"\r\n\r\n") + 4 if where == "body" else 0

    with HostileServer(lambda request: [answer[:split], *drip(answer[split:], DRIP)]) as server:
        make = cloudgene if adapter == "cloudgene" else wes
        with contextlib.closing(make(server.url)) as a, pytest.raises(Transient) as caught:
            a.status("job-1")
        assert server.finished == 0
    assert caught.value.kind == "timeout"
    assert str(caught.value).endswith(f"not complete within its deadline of {2 * TIMEOUT:g} s")


def test_a_dripping_download_ends_once_it_moves_too_slowly(monkeypatch):
    monkeypatch.setattr(deadlines, "TRANSFER_WINDOW", 0.3)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
    with HostileServer(lambda request: [head, *drip(b"z" * 100_000, DRIP)]) as server:
        output = RemoteOutput(name="chr1.zip", url=f"{server.url}/share/results/abc/chr1.zip", remote_hash="abc")
        with contextlib.closing(cloudgene(server.url)) as a, pytest.raises(Transient) as caught:
            with a.stream_output(output) as body:
                for _ in body.chunks():
                    pass
        assert server.finished == 0
    assert caught.value.kind == "timeout"
    assert "download of chr1.zip: slower than 1024 bytes/s" in str(caught.value)


def test_a_steady_download_outlasts_the_api_deadline(monkeypatch):
    # 2 MiB in 64 KiB pieces over ~3 API deadlines: a download has no fixed deadline, only a minimum rate.
    monkeypatch.setattr(deadlines, "TRANSFER_WINDOW", 0.3)
    piece = b"y" * 65536

    def answer(request: Request):
        yield b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (32 * len(piece))
        for _ in range(32):
            yield piece
            yield Pause(3 * 2 * TIMEOUT / 32)

    with HostileServer(answer) as server:
        output = RemoteOutput(name="chr1.zip", url=f"{server.url}/share/results/abc/chr1.zip", remote_hash="abc")
        with contextlib.closing(cloudgene(server.url)) as a, a.stream_output(output) as body:
            received = sum(len(chunk) for chunk in body.chunks())
    assert received == 32 * len(piece)


def test_a_submit_may_wait_long_for_its_answer_to_begin(tmp_path):
    # Cloudgene copies the upload before it says a word: silence past the API deadline is not a failure.
    answer = json_answer(b'{"success": true, "id": "job-9"}')
    with HostileServer(with_cloudgene_app(lambda request: [Pause(3 * 2 * TIMEOUT), answer])) as server:
        with contextlib.closing(cloudgene(server.url, timeout=TIMEOUT)) as a:
            a._submit_timeout = a._submit_timeout.__class__(TIMEOUT, read=10 * TIMEOUT)  # instead of 1,800 s
            assert a.submit(submit_request(tmp_path)) == "job-9"
        assert len(server.requests[-1].body) > 100_000


@pytest.mark.parametrize("adapter", ["cloudgene", "wes"])
def test_an_upload_may_outlast_the_api_deadline(tmp_path, adapter):
    # 64 MiB, the first 48 taken 4 MiB every 0.5 s: the upload lasts 1.5 times the API deadline (2 x 2 s), each
    # write well within the per-write timeout and far above the minimum rate.
    vcf = tmp_path / "chr1.vcf.gz"
    vcf.write_bytes(b"v" * (64 << 20))
    request = SubmitRequest(job_id="job-ours", files=[vcf], panel="p", build="hg19")
    answer = json_answer(b'{"success": true, "id": "job-9", "run_id": "run-9"}')
    with HostileServer(with_cloudgene_app(lambda request: [answer]), read_pace=(4 << 20, 0.5)) as server:
        make = cloudgene if adapter == "cloudgene" else wes
        with contextlib.closing(make(server.url, timeout=2.0)) as a:
            assert a.submit(request) in ("job-9", "run-9")
        assert len(server.requests[-1].body) > 64 << 20


def test_an_upload_over_tls_is_under_the_transfer_rule_until_its_end(tmp_path, monkeypatch):
    # The TLS handshake reads from the server before the request is sent: it must not count as the start of the
    # wait for the answer, or the upload would get only that wait (here 3 s) instead of the transfer rule.
    tls_files = self_signed_certificate(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(*tls_files)
    monkeypatch.setattr(http_module, "_tls_context", ssl.create_default_context(cafile=str(tls_files[0])))
    vcf = tmp_path / "chr1.vcf.gz"
    vcf.write_bytes(b"v" * (64 << 20))
    request = SubmitRequest(job_id="job-ours", files=[vcf], panel="p", build="hg19")
    answer = json_answer(b'{"success": true, "id": "job-9"}')
    with HostileServer(with_cloudgene_app(lambda request: [answer]), read_pace=(4 << 20, 0.5),
                       tls=server_context) as server:
        with contextlib.closing(cloudgene(server.url, timeout=2.0)) as a:
            a._submit_timeout = httpx.Timeout(2.0, read=3.0)  # the wait for the answer, instead of 1,800 s
            assert a.submit(request) == "job-9"


@pytest.mark.parametrize("adapter", ["cloudgene", "wes"])
def test_a_submit_whose_answer_drips_ends(tmp_path, adapter):
    answer = json_answer(b'{"success": true, "id": "job-9", "run_id": "run-1", "pad": "' + b"x" * 5000 + b'"}')
    with HostileServer(with_cloudgene_app(lambda request: drip(answer, DRIP))) as server:
        make = cloudgene if adapter == "cloudgene" else wes
        with contextlib.closing(make(server.url)) as a, pytest.raises(Transient) as caught:
            a.submit(submit_request(tmp_path))
        assert server.finished == (1 if adapter == "cloudgene" else 0)  # the app description, answered whole
    assert caught.value.kind == "timeout"
    assert str(caught.value).endswith(f"the answer did not arrive within {2 * TIMEOUT:g} s of its start")
