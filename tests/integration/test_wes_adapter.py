"""The WES adapter against a mocked server (respx): request shapes, templates, tags, paging, states, outputs, errors.

The same adapter runs against a real sapporo in test_wes_sapporo.py; this module covers what one server cannot
show: other servers' output shapes, error answers, paging, and what must never appear in a message.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import gzip
import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from daemon.config import ServiceConfig, WesConfig
from daemon.remote import RemoteOutput, SubmitRequest
from daemon.services.errors import Blocked, Permanent, ServiceError, Transient
from daemon.services.scrubbing import ScrubbingAdapter
from daemon.services.wes import (
    STDERR_CHARS,
    TAG_JOB_ID,
    TemplateError,
    WesAdapter,
    attachment_name,
    jwt_expiry,
    parse_checksum,
    parse_outputs,
    render_params,
    split_base_url,
    template_problems,
)
from daemon.states import RemoteKind

ORIGIN = "https://wes.example.org"
API = f"{ORIGIN}/ga4gh/wes/v1"
TOKEN = "tok-5ecret-abc123"
RUN = "0f3c9a62-2a3e-4d1e-9bd6-5f2b9c1d7e10"

pytestmark = pytest.mark.timeout(30)


def make_config(base_url: str = API, **wes: Any) -> ServiceConfig:
    values: dict[str, Any] = {
        "workflow_url": "https://example.org/impute.cwl",
        "workflow_type": "CWL",
        "workflow_type_version": "v1.2",
        "workflow_params": {"vcfs": "{files}", "panel": "{panel}", "build": "{build}"},
    }
    values.update(wes)
    return ServiceConfig(name="wes1", type="wes", base_url=base_url, wes=WesConfig(**values), timeout=5.0)


@pytest.fixture
def adapter() -> Any:
    a = WesAdapter(make_config(), token=lambda: TOKEN)
    yield a
    a.close()


@pytest.fixture
def router() -> Any:
    with respx.mock(assert_all_mocked=True, assert_all_called=False) as mock:
        yield mock


@pytest.fixture
def vcfs(tmp_path: Path) -> list[Path]:
    paths = []
    for chrom in (20, 21):
        path = tmp_path / f"chr{chrom}.vcf.gz"
        path.write_bytes(gzip.compress(f"##fileformat=VCFv4.2\n{chrom}\t100\t.\tA\tG\n".encode()))
        paths.append(path)
    return paths


def form_parts(request: httpx.Request) -> list[tuple[str, str | None, bytes]]:
    """(field name, file name, content) of every part of a multipart/form-data request, in order."""
    content_type = request.headers["content-type"]
    assert content_type.startswith("multipart/form-data; boundary=")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + request.read()
    )
    parts = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        parts.append((name, part.get_filename(), part.get_payload(decode=True)))
    return parts


def form_fields(request: httpx.Request) -> dict[str, str]:
    return {name: content.decode() for name, filename, content in form_parts(request) if filename is None}


def submit_request(files: list[Path], **overrides: Any) -> SubmitRequest:
    values: dict[str, Any] = {"job_id": "42", "files": files, "panel": "hrc-r1.1", "build": "hg19"}
    values.update(overrides)
    return SubmitRequest(**values)


# ------------------------------------------------------------------------------------------ base URL


@pytest.mark.parametrize(
    ("base_url", "root", "fallback"),
    [
        ("https://h", "https://h/ga4gh/wes/v1", "https://h"),
        ("https://h:8443/", "https://h:8443/ga4gh/wes/v1", "https://h:8443"),
        ("https://h/ga4gh/wes/v1", "https://h/ga4gh/wes/v1", None),
        ("https://h/ga4gh/wes/v1/", "https://h/ga4gh/wes/v1", None),
        ("https://h/proxy/ga4gh/wes/v1", "https://h/proxy/ga4gh/wes/v1", None),
        ("https://h/wes", "https://h/wes", None),  # mounted at the root of a path the operator gives
    ],
)
def test_base_url_rule(base_url: str, root: str, fallback: str | None) -> None:
    assert split_base_url(base_url) == (root, fallback)


@pytest.mark.parametrize(
    "base_url", ["ftp://h/x", "h:1122", "https://h/?a=b", "https://h/#x", "https://user:pw@h/", "https://tok@h"]
)
def test_base_url_refused(base_url: str) -> None:
    with pytest.raises(ValueError, match="base_url"):
        split_base_url(base_url)


def test_bare_origin_uses_standard_prefix_when_it_answers(router: respx.MockRouter) -> None:
    router.get(f"{API}/service-info").respond(200, json={"workflow_type_versions": {}})
    status = router.get(f"{API}/runs/{RUN}/status").respond(200, json={"run_id": RUN, "state": "RUNNING"})
    adapter = WesAdapter(make_config(base_url=ORIGIN), token=lambda: None)
    assert adapter.status(RUN).kind is RemoteKind.RUNNING
    assert adapter.status(RUN).kind is RemoteKind.RUNNING
    assert status.call_count == 2
    assert router.calls.call_count == 3  # the probe ran once


def test_bare_origin_falls_back_to_a_root_mount(router: respx.MockRouter) -> None:
    router.get(f"{API}/service-info").respond(404, json={"msg": "Not Found", "status_code": 404})
    router.get(f"{ORIGIN}/service-info").respond(200, json={"workflow_type_versions": {}})
    status = router.get(f"{ORIGIN}/runs/{RUN}/status").respond(200, json={"run_id": RUN, "state": "QUEUED"})
    adapter = WesAdapter(make_config(base_url=ORIGIN), token=lambda: None)
    assert adapter.status(RUN).kind is RemoteKind.QUEUED
    assert status.called


def test_bare_origin_keeps_the_standard_prefix_when_nothing_answers(router: respx.MockRouter) -> None:
    router.get(f"{API}/service-info").respond(404)
    router.get(f"{ORIGIN}/service-info").respond(404)
    router.get(f"{API}/runs/{RUN}/status").respond(404, json={"msg": "Run not found", "status_code": 404})
    adapter = WesAdapter(make_config(base_url=ORIGIN), token=lambda: None)
    with pytest.raises(Permanent, match=f"GET /runs/{RUN}/status: HTTP 404: Run not found"):
        adapter.status(RUN)


def test_operator_path_is_used_as_given(router: respx.MockRouter) -> None:
    route = router.get(f"{ORIGIN}/wes/runs/{RUN}/status").respond(200, json={"run_id": RUN, "state": "COMPLETE"})
    router.get(f"{ORIGIN}/wes/runs/{RUN}").respond(200, json={"run_id": RUN, "state": "COMPLETE", "outputs": {}})
    adapter = WesAdapter(make_config(base_url=f"{ORIGIN}/wes"), token=lambda: None)
    assert adapter.status(RUN).kind is RemoteKind.SUCCEEDED
    assert route.called


def test_wes_section_is_required() -> None:
    with pytest.raises(ValueError, match="wes"):
        WesAdapter(ServiceConfig(name="x", type="wes", base_url=API), token=lambda: None)


# ------------------------------------------------------------------------------------------ templates


FIELDS = {
    "files": ["a.vcf.gz", "b.vcf.gz"],
    "panel": "hrc",
    "build": "hg38",
    "population": None,
    "phasing": "eagle",
    "r2_filter": "0.3",
    "mode": None,
    "job_id": "42",
    "name": "study 1",
}


def test_render_params_recursive() -> None:
    template = {
        "inputs": {"vcfs": "{files}", "meta": [{"panel": "{panel}"}, "{build}", 3, True, None]},
        "population": "{population}",
        "label": "job {job_id} ({name}) pop={population}",
        "phasing": ["{phasing}", "{r2_filter}"],
        "literal": "{unknown} stays",
        "number": 1.5,
    }
    assert render_params(template, FIELDS) == {
        "inputs": {"vcfs": ["a.vcf.gz", "b.vcf.gz"], "meta": [{"panel": "hrc"}, "hg38", 3, True, None]},
        "population": None,
        "label": "job 42 (study 1) pop=",
        "phasing": ["eagle", "0.3"],
        "literal": "{unknown} stays",
        "number": 1.5,
    }


def test_render_refuses_files_inside_a_longer_string() -> None:
    with pytest.raises(TemplateError, match="files"):
        render_params({"x": "--in {files}"}, FIELDS)


def test_template_problems_name_the_key_path() -> None:
    template = {"a": {"b": ["{files}", "x {files}"]}, "c": "{panle}", "d": "{build}"}
    assert template_problems(template) == [
        'workflow_params.a.b[1]: {files} is a list or an object and must be the whole value, as "{files}"',
        "workflow_params.c: unknown placeholder {panle} (known: files, cwl_files, cwl_file, panel, build, "
        "population, phasing, r2_filter, mode, job_id, name)",
    ]
    assert template_problems({"vcfs": "{files}", "panel": "{panel}"}) == []
    assert template_problems({"x": "file {cwl_file}"}) == [
        'workflow_params.x: {cwl_file} is a list or an object and must be the whole value, as "{cwl_file}"']


@pytest.mark.parametrize("inputs_as", ["attachment", "path"])
def test_cwl_inputs_are_sent_as_file_objects(router: respx.MockRouter, vcfs: list[Path], inputs_as: str) -> None:
    """A CWL workflow's File[] and File inputs take objects, not strings; WDL and Nextflow take `{files}`."""
    seen = {}

    def answer(request: httpx.Request) -> httpx.Response:
        seen.update(form_fields(request))
        return httpx.Response(200, json={"run_id": RUN})

    router.post(f"{API}/runs").mock(side_effect=answer)
    template = {"vcfs": "{cwl_files}", "plain": "{files}"}
    adapter = WesAdapter(make_config(workflow_params=template, inputs_as=inputs_as), token=lambda: None)
    adapter.submit(SubmitRequest(job_id="42", files=vcfs, panel="hrc", build="hg38"))
    params = json.loads(seen["workflow_params"])
    names = ["chr20.vcf.gz", "chr21.vcf.gz"] if inputs_as == "attachment" else [str(p) for p in vcfs]
    assert params == {"vcfs": [{"class": "File", "location": n} for n in names], "plain": names}

    one = WesAdapter(make_config(workflow_params={"vcf": "{cwl_file}"}), token=lambda: None)
    one.submit(SubmitRequest(job_id="43", files=vcfs[:1], panel="hrc", build="hg38"))
    assert json.loads(seen["workflow_params"]) == {"vcf": {"class": "File", "location": "chr20.vcf.gz"}}
    with pytest.raises(Permanent, match=r"takes one input file \({cwl_file} in workflow_params\) and the job has 2"):
        one.submit(SubmitRequest(job_id="44", files=vcfs, panel="hrc", build="hg38"))


def test_attachment_names_are_safe() -> None:
    assert attachment_name(Path("/data/my study (1).vcf.gz")) == "my_study_1_.vcf.gz"
    assert attachment_name(Path("chr20.vcf.gz")) == "chr20.vcf.gz"
    assert attachment_name(Path("/x/ü.vcf")) == "_.vcf"
    assert attachment_name(Path("..")) == "input"


# ------------------------------------------------------------------------------------------ submit


def test_submit_request_shape(router: respx.MockRouter, vcfs: list[Path]) -> None:
    config = make_config(
        engine="cwltool",
        engine_version="3.1",
        engine_parameters={"--parallel": True},
        workflow_params={"vcfs": "{files}", "panel": "{panel}", "build": "{build}", "meta": {"job": "{job_id}"}},
    )
    adapter = WesAdapter(config, token=lambda: TOKEN)
    route = router.post(f"{API}/runs").respond(200, json={"run_id": RUN})

    assert adapter.submit(submit_request(vcfs, name="study 1")) == RUN

    request = route.calls.last.request
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["user-agent"].startswith("imputationd/")
    parts = form_parts(request)
    fields = form_fields(request)
    assert fields["workflow_url"] == "https://example.org/impute.cwl"
    assert fields["workflow_type"] == "CWL"
    assert fields["workflow_type_version"] == "v1.2"
    assert json.loads(fields["workflow_params"]) == {
        "vcfs": ["chr20.vcf.gz", "chr21.vcf.gz"],
        "panel": "hrc-r1.1",
        "build": "hg19",
        "meta": {"job": "42"},
    }
    assert json.loads(fields["tags"]) == {TAG_JOB_ID: "42", "imputationd_name": "study 1"}
    assert fields["workflow_engine"] == "cwltool"
    assert fields["workflow_engine_version"] == "3.1"
    assert json.loads(fields["workflow_engine_parameters"]) == {"--parallel": True}
    attachments = [(filename, content) for name, filename, content in parts if name == "workflow_attachment"]
    assert attachments == [(p.name, p.read_bytes()) for p in vcfs]


def test_submit_minimal_fields(router: respx.MockRouter, vcfs: list[Path]) -> None:
    route = router.post(f"{API}/runs").respond(200, json={"run_id": RUN})
    WesAdapter(make_config(), token=lambda: None).submit(submit_request(vcfs[:1]))
    request = route.calls.last.request
    assert "authorization" not in request.headers
    fields = form_fields(request)
    assert set(fields) == {"workflow_url", "workflow_type", "workflow_type_version", "workflow_params", "tags"}
    assert json.loads(fields["tags"]) == {TAG_JOB_ID: "42"}


def test_submit_inputs_as_path(router: respx.MockRouter, vcfs: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    route = router.post(f"{API}/runs").respond(200, json={"run_id": RUN})
    monkeypatch.chdir(vcfs[0].parent)
    adapter = WesAdapter(make_config(inputs_as="path"), token=lambda: None)
    adapter.submit(submit_request([Path("chr20.vcf.gz"), vcfs[1]]))
    parts = form_parts(route.calls.last.request)  # still multipart without a single file part
    assert not [p for p in parts if p[0] == "workflow_attachment"]
    params = json.loads(form_fields(route.calls.last.request)["workflow_params"])
    assert params["vcfs"] == [str(vcfs[0]), str(vcfs[1])]


def test_submit_renames_attachments_consistently(router: respx.MockRouter, tmp_path: Path) -> None:
    path = tmp_path / "my study.vcf.gz"
    path.write_bytes(b"x")
    route = router.post(f"{API}/runs").respond(200, json={"run_id": RUN})
    WesAdapter(make_config(), token=lambda: None).submit(submit_request([path]))
    parts = form_parts(route.calls.last.request)
    assert [p[1] for p in parts if p[0] == "workflow_attachment"] == ["my_study.vcf.gz"]
    assert json.loads(form_fields(route.calls.last.request)["workflow_params"])["vcfs"] == ["my_study.vcf.gz"]


def test_submit_refuses_attachments_with_one_name(router: respx.MockRouter, tmp_path: Path) -> None:
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "chr20.vcf.gz").write_bytes(b"x")
    route = router.post(f"{API}/runs")
    with pytest.raises(Permanent, match="same name: chr20.vcf.gz") as caught:
        WesAdapter(make_config(), token=lambda: None).submit(
            submit_request([tmp_path / "a" / "chr20.vcf.gz", tmp_path / "b" / "chr20.vcf.gz"])
        )
    assert caught.value.kind == "duplicate_input_name"
    assert not route.called


def test_submit_streams_attachments(router: respx.MockRouter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """File parts are read in chunks while the body is sent, never whole."""
    big = tmp_path / "big.vcf.gz"
    big.write_bytes(b"v" * (3 * 1024 * 1024))
    reads: list[int] = []
    real_open = Path.open

    class Spy(io.BufferedReader):
        def read(self, size: int | None = -1) -> bytes:
            reads.append(-1 if size is None else size)
            return super().read(size)

    def spying_open(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if self == big and mode == "rb":
            return Spy(io.FileIO(self, "r"))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", spying_open)
    route = router.post(f"{API}/runs").respond(200, json={"run_id": RUN})
    WesAdapter(make_config(), token=lambda: None).submit(submit_request([big]))
    assert len(reads) >= 3 and all(0 < size <= 1024 * 1024 for size in reads)
    assert form_parts(route.calls.last.request)[-1][2] == big.read_bytes()


def test_submit_bad_template_blocks_the_service(router: respx.MockRouter, vcfs: list[Path]) -> None:
    adapter = WesAdapter(make_config(workflow_params={"args": "--vcf {files}"}), token=lambda: None)
    with pytest.raises(Blocked, match=r"services.wes1.wes.workflow_params: \{files\}") as caught:
        adapter.submit(submit_request(vcfs))
    assert caught.value.kind == "config"


def test_submit_missing_input_is_permanent(router: respx.MockRouter, tmp_path: Path) -> None:
    with pytest.raises(Permanent, match="cannot read input gone.vcf.gz") as caught:
        WesAdapter(make_config(), token=lambda: None).submit(submit_request([tmp_path / "gone.vcf.gz"]))
    assert caught.value.kind == "input_unreadable"


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, json={}),
        httpx.Response(200, json={"run_id": ""}),
        httpx.Response(200, json={"run_id": 17}),
        httpx.Response(200, json={"run_id": "../../etc"}),
        httpx.Response(200, json={"run_id": "a b"}),
        httpx.Response(200, json=["x"]),
        httpx.Response(200, text="<html>proxy</html>", headers={"content-type": "text/html"}),
    ],
)
def test_submit_garbled_answer_is_transient(router: respx.MockRouter, vcfs: list[Path], answer: httpx.Response) -> None:
    router.post(f"{API}/runs").mock(return_value=answer)
    with pytest.raises(Transient, match=r"^POST /runs: ") as caught:
        WesAdapter(make_config(), token=lambda: None).submit(submit_request(vcfs))
    assert caught.value.kind == "bad_response"


@pytest.mark.parametrize(
    ("answer", "may_have_created"),
    [
        # Refused in the server's own words (WES's error object) or by its authentication: no run was made.
        (httpx.Response(400, json={"msg": "Invalid workflow_type: XYZ", "status_code": 400}), False),
        (httpx.Response(422, text="workflow_url is required"), False),
        (httpx.Response(401), False),
        (httpx.Response(403, json={"msg": "Forbidden", "status_code": 403}), False),
        (httpx.Response(429, text="<html>429 Too Many Requests</html>", headers={"content-type": "text/html"}), False),
        (httpx.ConnectError("connection refused"), False),
        # Outcomes unknown: the run may exist, or appear later.
        (httpx.Response(500, json={"msg": "Internal Server Error", "status_code": 500}), True),
        (httpx.Response(504, text="<html>504 Gateway Time-out</html>", headers={"content-type": "text/html"}), True),
        (httpx.Response(413, text="<html>413 Request Entity Too Large</html>", headers={"content-type": "text/html"}),
         True),
        (httpx.Response(200, json={"run_id": ""}), True),
        (httpx.ReadTimeout("timed out"), True),
        (httpx.RemoteProtocolError("Server disconnected without sending a response."), True),
    ],
    ids=["400-msg", "422-text", "401", "403", "429", "connect-refused", "500", "proxy-504", "proxy-413", "no-run-id",
         "read-timeout", "disconnected"],
)
def test_submit_errors_say_whether_the_run_may_exist(
    router: respx.MockRouter, vcfs: list[Path], answer: Any, may_have_created: bool
) -> None:
    route = router.post(f"{API}/runs")
    route.mock(return_value=answer) if isinstance(answer, httpx.Response) else route.mock(side_effect=answer)
    with pytest.raises(ServiceError) as caught:
        WesAdapter(make_config(), token=lambda: TOKEN).submit(submit_request(vcfs))
    assert caught.value.may_have_created is may_have_created


def test_submit_errors_before_the_request_say_no_run_can_exist(router: respx.MockRouter, vcfs: list[Path],
                                                                tmp_path: Path) -> None:
    route = router.post(f"{API}/runs").respond(json={"run_id": RUN})
    bad_template = WesAdapter(make_config(workflow_params={"args": "--vcf {files}"}), token=lambda: None)
    for submit in (lambda: bad_template.submit(submit_request(vcfs)),
                   lambda: WesAdapter(make_config(), token=lambda: None).submit(
                       submit_request([tmp_path / "gone.vcf.gz"]))):
        with pytest.raises(ServiceError) as caught:
            submit()
        assert caught.value.may_have_created is False, caught.value
    assert not route.called


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("status", "error", "kind"),
    [
        (400, Permanent, "http_400"),
        (404, Permanent, "http_404"),
        (401, Blocked, "unauthorized"),
        (403, Blocked, "forbidden"),
        (500, Transient, "server_error"),
        (429, Transient, "rate_limited"),
        (503, Transient, "unavailable"),
    ],
)
def test_wes_error_bodies_are_surfaced(
    router: respx.MockRouter, vcfs: list[Path], status: int, error: type, kind: str
) -> None:
    router.post(f"{API}/runs").respond(
        status, json={"msg": "Invalid workflow_type: XYZ", "status_code": status}, headers={"Retry-After": "7"}
    )
    with pytest.raises(error) as caught:
        WesAdapter(make_config(), token=lambda: TOKEN).submit(submit_request(vcfs))
    assert str(caught.value) == f"POST /runs: HTTP {status}: Invalid workflow_type: XYZ"
    assert caught.value.kind == kind
    if status in (429, 503):
        assert caught.value.retry_after == 7
        assert caught.value.service_wide


@pytest.mark.parametrize(
    ("exception", "kind"), [(httpx.ConnectTimeout("x"), "timeout"), (httpx.ConnectError("refused"), "connection")]
)
def test_transport_errors_are_transient(router: respx.MockRouter, exception: Exception, kind: str) -> None:
    router.get(f"{API}/runs/{RUN}/status").mock(side_effect=exception)
    with pytest.raises(Transient) as caught:
        WesAdapter(make_config(), token=lambda: None).status(RUN)
    assert caught.value.kind == kind
    assert str(caught.value).startswith(f"GET /runs/{RUN}/status: ")


def test_token_never_appears_in_messages(router: respx.MockRouter, vcfs: list[Path]) -> None:
    router.post(f"{API}/runs").respond(400, json={"msg": f"bad header Bearer {TOKEN}", "status_code": 400})
    router.get(f"{API}/runs/{RUN}/status").respond(401, json={"msg": f"token {TOKEN} expired", "status_code": 401})
    adapter = ScrubbingAdapter(WesAdapter(make_config(), token=lambda: TOKEN), token=lambda: TOKEN)  # the boundary
    with pytest.raises(Permanent) as submit_error:
        adapter.submit(submit_request(vcfs))
    with pytest.raises(Blocked) as status_error:
        adapter.status(RUN)
    for error in (submit_error.value, status_error.value):
        assert TOKEN not in str(error) and TOKEN not in repr(error.args)
        assert "[redacted]" in str(error)


def test_token_is_read_per_request(router: respx.MockRouter) -> None:
    route = router.get(f"{API}/runs/{RUN}/status").respond(200, json={"run_id": RUN, "state": "RUNNING"})
    tokens = iter(["first", None, "second"])
    adapter = WesAdapter(make_config(), token=lambda: next(tokens))
    for _ in range(3):
        adapter.status(RUN)
    headers = [call.request.headers.get("authorization") for call in route.calls]
    assert headers == ["Bearer first", None, "Bearer second"]


def test_unreadable_token_blocks(router: respx.MockRouter) -> None:
    def broken() -> str:
        raise PermissionError(13, "Permission denied", "/secret/path/token")

    with pytest.raises(Blocked, match=r"token could not be read \(PermissionError\)") as caught:
        WesAdapter(make_config(), token=broken).status(RUN)
    assert "/secret/path" not in str(caught.value)


# ------------------------------------------------------------------------------------------ find_submitted


def runs_page(entries: list[dict[str, Any]], next_token: str | None = None) -> httpx.Response:
    return httpx.Response(200, json={"runs": entries, "next_page_token": next_token})


def run_id(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def test_find_submitted_pages_through_summaries_with_tags(router: respx.MockRouter) -> None:
    route = router.get(f"{API}/runs").mock(
        side_effect=[
            runs_page([{"run_id": run_id(1), "state": "RUNNING", "tags": {TAG_JOB_ID: "41"}}], "p2"),
            runs_page([{"run_id": run_id(2), "state": "QUEUED", "tags": {TAG_JOB_ID: "42"}}], "p3"),
        ]
    )
    adapter = WesAdapter(make_config(page_size=1), token=lambda: TOKEN)
    assert adapter.find_submitted("42") == run_id(2)
    params = [dict(call.request.url.params) for call in route.calls]
    assert params == [{"page_size": "1"}, {"page_size": "1", "page_token": "p2"}]
    assert all(call.request.headers["authorization"] == f"Bearer {TOKEN}" for call in route.calls)


def test_find_submitted_fetches_run_logs_when_the_list_has_no_tags(router: respx.MockRouter) -> None:
    router.get(f"{API}/runs").mock(
        side_effect=[
            runs_page([{"run_id": run_id(1), "state": "RUNNING"}, {"run_id": run_id(2), "state": "COMPLETE"}], "n"),
            runs_page([{"run_id": run_id(3), "state": "COMPLETE"}]),
        ]
    )
    router.get(f"{API}/runs/{run_id(1)}").respond(200, json={"run_id": run_id(1), "request": {"tags": {}}})
    router.get(f"{API}/runs/{run_id(2)}").respond(404, json={"msg": "gone", "status_code": 404})
    third = router.get(f"{API}/runs/{run_id(3)}").respond(
        200, json={"run_id": run_id(3), "request": {"tags": json.dumps({TAG_JOB_ID: "42"})}}
    )
    assert WesAdapter(make_config(), token=lambda: None).find_submitted("42") == run_id(3)
    assert third.called


def test_find_submitted_reads_every_page_whatever_the_order(router: respx.MockRouter) -> None:
    """Servers list runs in no fixed order: ours may be the last of 250, so no prefix of the list is enough."""
    ids = [run_id(n) for n in range(250)]
    pages = [runs_page([{"run_id": i} for i in ids[p * 100:(p + 1) * 100]], f"t{p + 1}" if p < 2 else "")
             for p in range(3)]
    listing = router.get(f"{API}/runs").mock(side_effect=pages)
    details = router.get(url__regex=rf"^{API}/runs/[0-9a-f-]+$").mock(
        side_effect=lambda request: httpx.Response(200, json={"request": {"tags": {
            TAG_JOB_ID: "42" if request.url.path.endswith(ids[-1]) else "other"}}}))
    adapter = WesAdapter(make_config(page_size=100), token=lambda: None)
    assert adapter.find_submitted("42") == ids[-1]
    assert listing.call_count == 3 and details.call_count == 250


def test_find_submitted_reads_past_an_empty_page_that_names_a_next_one(router: respx.MockRouter) -> None:
    router.get(f"{API}/runs").mock(side_effect=[
        runs_page([], "t1"),
        runs_page([{"run_id": run_id(1), "tags": {TAG_JOB_ID: "42"}}]),
    ])
    assert WesAdapter(make_config(), token=lambda: None).find_submitted("42") == run_id(1)


def test_find_submitted_asks_about_each_run_once(router: respx.MockRouter) -> None:
    """A run's tags never change: a second lookup reads the list again but no run log it has read before."""
    listing = router.get(f"{API}/runs").respond(200, json={"workflows": [{"run_id": run_id(1)},
                                                                         {"run_id": run_id(2)}]})
    details = router.get(url__regex=rf"^{API}/runs/[0-9a-f-]+$").respond(200, json={"request": {"tags": {}}})
    adapter = WesAdapter(make_config(), token=lambda: None)
    assert adapter.find_submitted("42") is None
    assert adapter.find_submitted("43") is None
    assert listing.call_count == 2 and details.call_count == 2


def test_find_submitted_reads_a_wes03_list_of_workflows(router: respx.MockRouter) -> None:
    """The GA4GH reference server `wes-service` lists under `workflows`, unpaged, with neither tags nor a token."""
    router.get(f"{API}/runs").respond(200, json={"workflows": [
        {"run_id": run_id(2), "state": "COMPLETE"}, {"run_id": run_id(1), "state": "RUNNING"}]})
    router.get(f"{API}/runs/{run_id(2)}").respond(200, json={"request": {"tags": {TAG_JOB_ID: "7"}}})
    router.get(f"{API}/runs/{run_id(1)}").respond(200, json={"request": {"tags": json.dumps({TAG_JOB_ID: "42"})}})
    assert WesAdapter(make_config(), token=lambda: None).find_submitted("42") == run_id(1)


@pytest.mark.parametrize("body", [{}, {"next_page_token": ""}, {"items": []}])
def test_a_run_list_without_runs_is_a_bad_response_not_an_empty_server(router: respx.MockRouter,
                                                                       body: dict[str, Any]) -> None:
    """Read as "no runs", a lost submit would be sent again: a second run of the same job."""
    router.get(f"{API}/runs").respond(200, json=body)
    with pytest.raises(Transient, match="^GET /runs: the answer lists no runs") as caught:
        WesAdapter(make_config(), token=lambda: None).find_submitted("42")
    assert caught.value.kind == "bad_response"


def test_a_run_list_that_pages_for_ever_is_a_bad_response(router: respx.MockRouter) -> None:
    counter = iter(range(10**6))
    router.get(f"{API}/runs").mock(
        side_effect=lambda request: runs_page([{"run_id": run_id(1), "tags": {}}], f"t{next(counter)}"))
    adapter = WesAdapter(make_config(), token=lambda: None)
    adapter.max_list_pages = 5
    with pytest.raises(Transient, match="goes on past 5 pages"):
        adapter.find_submitted("42")


def test_find_submitted_stops_on_a_repeated_page_token(router: respx.MockRouter) -> None:
    route = router.get(f"{API}/runs").mock(
        side_effect=[
            runs_page([{"run_id": run_id(1), "tags": {}}], "same"),
            runs_page([{"run_id": run_id(2), "tags": {}}], "same"),
            runs_page([{"run_id": run_id(3), "tags": {}}], "same"),
        ]
    )
    assert WesAdapter(make_config(), token=lambda: None).find_submitted("42") is None
    assert route.call_count == 2


@pytest.mark.parametrize(
    "body",
    [{"runs": "x"}, {"runs": [17]}, {"runs": [{"state": "RUNNING"}]}, {"runs": [{"run_id": "a/b"}]},
     {"workflows": {"run_id": "x"}}],
)
def test_find_submitted_garbled_list_is_transient(router: respx.MockRouter, body: dict[str, Any]) -> None:
    router.get(f"{API}/runs").respond(200, json=body)
    with pytest.raises(Transient, match="^GET /runs: ") as caught:
        WesAdapter(make_config(), token=lambda: None).find_submitted("42")
    assert caught.value.kind == "bad_response"


def test_find_submitted_empty_server(router: respx.MockRouter) -> None:
    router.get(f"{API}/runs").respond(200, json={"runs": [], "next_page_token": ""})
    assert WesAdapter(make_config(), token=lambda: None).find_submitted("42") is None


def test_list_jobs(router: respx.MockRouter) -> None:
    router.get(f"{API}/runs").mock(
        side_effect=[
            runs_page(
                [
                    {"run_id": run_id(1), "state": "RUNNING", "tags": {TAG_JOB_ID: "7"}},
                    {"run_id": run_id(2), "state": "COMPLETE"},
                ],
                "n",
            ),
            runs_page([{"run_id": run_id(3), "state": "CANCELED", "tags": {"other": "x"}}], "m"),
        ]
    )
    jobs = WesAdapter(make_config(), token=lambda: None).list_jobs(limit=3)
    assert [(j.remote_id, j.name, j.raw_state) for j in jobs] == [
        (run_id(1), "7", "RUNNING"),
        (run_id(2), None, "COMPLETE"),
        (run_id(3), None, "CANCELED"),
    ]


# ------------------------------------------------------------------------------------------ status


@pytest.mark.parametrize(
    ("state", "kind"),
    [
        ("QUEUED", RemoteKind.QUEUED),
        ("INITIALIZING", RemoteKind.QUEUED),
        ("RUNNING", RemoteKind.RUNNING),
        ("PAUSED", RemoteKind.RUNNING),
        ("CANCELING", RemoteKind.RUNNING),
        ("CANCELED", RemoteKind.CANCELLED),
        ("PREEMPTED", RemoteKind.UNKNOWN),
        ("UNKNOWN", RemoteKind.UNKNOWN),
        ("SOMETHING_NEW", RemoteKind.UNKNOWN),
    ],
)
def test_status_states_from_status_endpoint(
    router: respx.MockRouter, adapter: WesAdapter, state: str, kind: RemoteKind
) -> None:
    router.get(f"{API}/runs/{RUN}/status").respond(200, json={"run_id": RUN, "state": state})
    log = router.get(f"{API}/runs/{RUN}")
    status = adapter.status(RUN)
    assert (status.kind, status.raw_state, status.outputs, status.message) == (kind, state, (), None)
    assert not log.called  # only finished runs need the full RunLog


def sapporo_log(state: str, **extra: Any) -> dict[str, Any]:
    return {
        "run_id": RUN,
        "state": state,
        "request": {"tags": {TAG_JOB_ID: "42"}},
        "run_log": {"stdout": "started\n", "stderr": "", "exit_code": 0, **extra.pop("run_log", {})},
        **extra,
    }


def test_status_complete_with_sapporo_outputs(router: respx.MockRouter, adapter: WesAdapter) -> None:
    outputs = [
        {"file_name": "chr20.dose.vcf.gz", "file_url": f"{API}/runs/{RUN}/outputs/chr20.dose.vcf.gz"},
        {"file_name": "logs/impute log.txt", "file_url": f"{API}/runs/{RUN}/outputs/logs/impute%20log.txt"},
    ]
    router.get(f"{API}/runs/{RUN}/status").respond(200, json={"run_id": RUN, "state": "COMPLETE"})
    router.get(f"{API}/runs/{RUN}").respond(200, json=sapporo_log("COMPLETE", outputs=outputs))
    status = adapter.status(RUN)
    assert status.kind is RemoteKind.SUCCEEDED and status.raw_state == "COMPLETE"
    assert [(o.name, o.url, o.checksum) for o in status.outputs] == [
        ("chr20.dose.vcf.gz", outputs[0]["file_url"], None),
        ("logs/impute log.txt", outputs[1]["file_url"], None),
    ]


def test_status_complete_carries_a_cwl_files_checksum_and_size(router: respx.MockRouter, adapter: WesAdapter) -> None:
    """What the server publishes about each output reaches the pipeline, which checks the file against it: a
    `checksum` in any of the spellings servers use and a `size` in bytes; a negative size (-1, "unknown" to some
    servers) or one that is not a number publishes none."""
    sha1, md5 = "0123456789abcdef0123456789abcdef01234567", "0123456789abcdef0123456789abcdef"
    outputs = {
        "dose": {"class": "File", "location": f"{API}/runs/{RUN}/outputs/chr20.dose.vcf.gz",
                 "checksum": f"sha1${sha1}", "size": 1024},
        "info": {"class": "File", "location": f"{API}/runs/{RUN}/outputs/chr20.info.gz", "checksum": f"md5${md5}",
                 "size": 0},
        "log": {"class": "File", "location": f"{API}/runs/{RUN}/outputs/run.log", "size": -1},
        "qc": {"class": "File", "location": f"{API}/runs/{RUN}/outputs/qc.html", "size": "1024"},
        "flag": {"class": "File", "location": f"{API}/runs/{RUN}/outputs/flag.txt", "size": True},
    }
    router.get(f"{API}/runs/{RUN}/status").respond(200, json={"run_id": RUN, "state": "COMPLETE"})
    router.get(f"{API}/runs/{RUN}").respond(200, json=sapporo_log("COMPLETE", outputs=outputs))
    status = adapter.status(RUN)
    assert [(o.name, o.checksum, o.size, o.size_text) for o in status.outputs] == [
        ("chr20.dose.vcf.gz", ("sha1", sha1), 1024, "1024 bytes"),
        ("chr20.info.gz", ("md5", md5), 0, "0 bytes"),
        ("run.log", None, None, None),
        ("qc.html", None, None, None),
        ("flag.txt", None, None, None),
    ]


def test_status_executor_error_message(router: respx.MockRouter, adapter: WesAdapter) -> None:
    stderr = "\n".join(f"line {n}" for n in range(100)) + "\nERROR: panel hrc has no chr20\n\n"
    router.get(f"{API}/runs/{RUN}/status").respond(200, json={"run_id": RUN, "state": "EXECUTOR_ERROR"})
    router.get(f"{API}/runs/{RUN}").respond(
        200, json=sapporo_log("EXECUTOR_ERROR", run_log={"stderr": stderr, "exit_code": 3})
    )
    status = adapter.status(RUN)
    assert status.kind is RemoteKind.FAILED and status.raw_state == "EXECUTOR_ERROR"
    assert status.message is not None
    assert status.message.startswith("EXECUTOR_ERROR (exit code 3): ")
    assert status.message.endswith("ERROR: panel hrc has no chr20")
    assert "line 86" in status.message and "line 85" not in status.message  # the last 15 lines only


def test_status_stderr_echoing_secrets_is_scrubbed_at_the_boundary(router: respx.MockRouter) -> None:
    """A workflow that prints the token and the job's password: the failure message (stored as the job's error and
    sent in notifications) holds neither, also where the stderr excerpt starts in the middle of one."""
    password = "job-pass-0123456789"
    first, last = f"{TOKEN} tail", f"auth Bearer {TOKEN} for zip password {password}"
    # The excerpt keeps the last STDERR_CHARS characters: it starts 5 characters into the token of the first line.
    stderr = "\n".join([first, "x" * (STDERR_CHARS - (len(first) - 5) - 2 - len(last)), last])
    router.get(f"{API}/runs/{RUN}/status").respond(200, json={"run_id": RUN, "state": "EXECUTOR_ERROR"})
    router.get(f"{API}/runs/{RUN}").respond(
        200, json=sapporo_log("EXECUTOR_ERROR", run_log={"stderr": stderr, "exit_code": 2}))
    inner = WesAdapter(make_config(), token=lambda: TOKEN)
    message = ScrubbingAdapter(inner, token=lambda: TOKEN).for_job([password]).status(RUN).message
    assert message is not None and message.startswith("EXECUTOR_ERROR (exit code 2): …[redacted] tail")
    assert TOKEN[5:] not in message and password not in message
    assert message.endswith("auth Bearer [redacted] for zip password [redacted]")


def test_status_stderr_is_stored_without_terminal_escapes(router: respx.MockRouter, adapter: WesAdapter) -> None:
    """cwltool and nextflow colour their logs: the message (the job's error, `show`, notifications) holds the words,
    not the escape sequences that would repaint an operator's terminal."""
    stderr = ("\x1b[1;30mINFO\x1b[0m starting\n"
              "\x1b]0;cwltool\x07\x1b[31mERROR\x1b[0m panel \x1b[1mhrc\x1b[0m missing\x1bc")
    router.get(f"{API}/runs/{RUN}/status").respond(200, json={"run_id": RUN, "state": "EXECUTOR_ERROR"})
    router.get(f"{API}/runs/{RUN}").respond(
        200, json=sapporo_log("EXECUTOR_ERROR", run_log={"stderr": stderr, "exit_code": 1}))
    assert adapter.status(RUN).message == "EXECUTOR_ERROR (exit code 1): INFO starting\nERROR panel hrc missing"


def test_a_failed_run_names_its_failing_task(router: respx.MockRouter, adapter: WesAdapter) -> None:
    """WES task logs: the first task that exited non-zero is the failing step (in the message, `show`, the QC)."""
    log = sapporo_log("EXECUTOR_ERROR", run_log={"stderr": "phasing died", "exit_code": 1})
    log["task_logs"] = [{"name": "qc", "exit_code": 0}, {"name": "phase chr20", "exit_code": 137},
                        {"name": "impute chr20", "exit_code": 1}]
    router.get(f"{API}/runs/{RUN}/status").respond(200, json={"run_id": RUN, "state": "EXECUTOR_ERROR"})
    router.get(f"{API}/runs/{RUN}").respond(200, json=log)
    status = adapter.status(RUN)
    assert status.failed_step == "phase chr20" and status.qc is not None and status.qc.failed_step == "phase chr20"
    assert status.message == "task phase chr20: EXECUTOR_ERROR (exit code 1): phasing died"


def test_status_error_message_is_bounded(router: respx.MockRouter, adapter: WesAdapter) -> None:
    router.get(f"{API}/runs/{RUN}/status").respond(200, json={"run_id": RUN, "state": "EXECUTOR_ERROR"})
    router.get(f"{API}/runs/{RUN}").respond(
        200, json=sapporo_log("EXECUTOR_ERROR", run_log={"stderr": "x" * 100_000 + "\nthe end", "exit_code": 1})
    )
    message = adapter.status(RUN).message
    assert message is not None and len(message) < 1600 and message.endswith("the end")


def test_status_system_error_uses_system_logs(router: respx.MockRouter, adapter: WesAdapter) -> None:
    router.get(f"{API}/runs/{RUN}/status").respond(200, json={"run_id": RUN, "state": "SYSTEM_ERROR"})
    router.get(f"{API}/runs/{RUN}").respond(
        200,
        json=sapporo_log(
            "SYSTEM_ERROR",
            run_log={"stderr": None, "exit_code": None, "system_logs": ["Traceback…\nException: download failed"]},
        ),
    )
    status = adapter.status(RUN)
    assert status.kind is RemoteKind.FAILED
    assert status.message == "SYSTEM_ERROR: Traceback…\nException: download failed"


def test_status_error_without_logs(router: respx.MockRouter, adapter: WesAdapter) -> None:
    router.get(f"{API}/runs/{RUN}/status").respond(200, json={"run_id": RUN, "state": "SYSTEM_ERROR"})
    router.get(f"{API}/runs/{RUN}").respond(200, json={"run_id": RUN, "state": "SYSTEM_ERROR"})
    assert adapter.status(RUN).message == "SYSTEM_ERROR"


def test_status_stderr_published_as_url(router: respx.MockRouter, adapter: WesAdapter) -> None:
    """WES 1.1 says run_log.stderr is a URL; its tail is fetched with the same credentials."""
    router.get(f"{API}/runs/{RUN}/status").respond(200, json={"run_id": RUN, "state": "EXECUTOR_ERROR"})
    router.get(f"{API}/runs/{RUN}").respond(
        200, json=sapporo_log("EXECUTOR_ERROR", run_log={"stderr": f"{API}/runs/{RUN}/stderr", "exit_code": 2})
    )
    log = router.get(f"{API}/runs/{RUN}/stderr").respond(200, text="warming up\nKilled: out of memory\n")
    assert adapter.status(RUN).message == "EXECUTOR_ERROR (exit code 2): warming up\nKilled: out of memory"
    assert log.calls.last.request.headers["authorization"] == f"Bearer {TOKEN}"


def test_status_stderr_url_that_fails_still_reports_the_failure(router: respx.MockRouter, adapter: WesAdapter) -> None:
    router.get(f"{API}/runs/{RUN}/status").respond(200, json={"run_id": RUN, "state": "EXECUTOR_ERROR"})
    router.get(f"{API}/runs/{RUN}").respond(
        200, json=sapporo_log("EXECUTOR_ERROR", run_log={"stderr": f"{API}/logs/e?sig=S3CRET", "exit_code": 2})
    )
    router.get(f"{API}/logs/e").respond(500)
    status = adapter.status(RUN)
    assert status.kind is RemoteKind.FAILED
    assert status.message == "EXECUTOR_ERROR (exit code 2): (the stderr log could not be read: server_error)"


def test_status_trusts_the_run_log_state(router: respx.MockRouter, adapter: WesAdapter) -> None:
    router.get(f"{API}/runs/{RUN}/status").respond(200, json={"run_id": RUN, "state": "COMPLETE"})
    router.get(f"{API}/runs/{RUN}").respond(200, json={"run_id": RUN, "state": "SYSTEM_ERROR"})
    assert adapter.status(RUN).kind is RemoteKind.FAILED


@pytest.mark.parametrize("body", [{}, {"state": None}, {"state": 4}, {"state": ""}])
def test_status_without_state_is_transient(router: respx.MockRouter, adapter: WesAdapter, body: dict) -> None:
    router.get(f"{API}/runs/{RUN}/status").respond(200, json=body)
    with pytest.raises(Transient, match=f"^GET /runs/{RUN}/status: the answer has no state") as caught:
        adapter.status(RUN)
    assert caught.value.kind == "bad_response"


def test_status_quotes_the_remote_id(router: respx.MockRouter, adapter: WesAdapter) -> None:
    route = router.get(f"{API}/runs/a%2Fb/status").respond(200, json={"state": "RUNNING"})
    adapter.status("a/b")
    assert route.called


# ------------------------------------------------------------------------------------------ outputs


def outputs_of(value: Any) -> list[tuple[str, str, tuple[str, str] | None, str | None]]:
    return [(o.name, o.url, o.checksum, o.size_text) for o in parse_outputs(value, api_root=API, call="GET /runs/x")]


def test_outputs_mapping_of_urls_and_objects() -> None:
    sha = "a" * 40
    assert outputs_of(
        {
            "dose": "https://files.example.org/run/chr20.dose.vcf.gz",
            "info": {"location": "https://files.example.org/run/chr20.info.gz", "size": 12},
            "stats": {"url": f"{API}/runs/x/outputs/stats.txt"},
            "report": {"path": "/scratch/run/report.html"},
            "count": 17,
            "note": "not a file",
            "flag": True,
            "missing": None,
            "sum": {"class": "File", "location": "https://f.example.org/sum.txt", "checksum": f"sha1${sha}"},
        }
    ) == [
        ("chr20.dose.vcf.gz", "https://files.example.org/run/chr20.dose.vcf.gz", None, None),
        ("chr20.info.gz", "https://files.example.org/run/chr20.info.gz", None, "12 bytes"),
        ("stats.txt", f"{API}/runs/x/outputs/stats.txt", None, None),
        ("report.html", "file:///scratch/run/report.html", None, None),
        ("sum.txt", "https://f.example.org/sum.txt", ("sha1", sha), None),
    ]


def test_outputs_cwl_objects() -> None:
    sha = "0123456789abcdef0123456789abcdef01234567"
    cwl = {
        "imputed": [
            {
                "class": "File",
                "location": "https://f.example.org/o/chr20.dose.vcf.gz",
                "basename": "chr20.dose.vcf.gz",
                "checksum": f"sha1${sha}",
                "size": 1024,
                "secondaryFiles": [{"class": "File", "location": "https://f.example.org/o/chr20.dose.vcf.gz.tbi"}],
            },
            {"class": "File", "location": "https://f.example.org/o/chr21.dose.vcf.gz", "basename": "chr21.dose.vcf.gz"},
        ],
        "qc": {
            "class": "Directory",
            "basename": "qc",
            "location": "https://f.example.org/o/qc",
            "listing": [
                {"class": "File", "location": "https://f.example.org/o/qc/report.html", "basename": "report.html"},
                {
                    "class": "Directory",
                    "basename": "plots",
                    "listing": [{"class": "File", "location": "https://f.example.org/o/qc/plots/a.png"}],
                },
            ],
        },
        "record": {"summary": {"class": "File", "location": "https://f.example.org/o/summary.txt"}},
    }
    assert outputs_of(cwl) == [
        ("chr20.dose.vcf.gz", "https://f.example.org/o/chr20.dose.vcf.gz", ("sha1", sha), "1024 bytes"),
        ("chr20.dose.vcf.gz.tbi", "https://f.example.org/o/chr20.dose.vcf.gz.tbi", None, None),
        ("chr21.dose.vcf.gz", "https://f.example.org/o/chr21.dose.vcf.gz", None, None),
        ("qc/report.html", "https://f.example.org/o/qc/report.html", None, None),
        ("qc/plots/a.png", "https://f.example.org/o/qc/plots/a.png", None, None),
        ("summary.txt", "https://f.example.org/o/summary.txt", None, None),
    ]


def test_outputs_relative_urls_names_and_duplicates() -> None:
    assert outputs_of(
        [
            {"file_name": "../../etc/passwd", "file_url": "runs/x/outputs/passwd"},
            {"file_name": "a.txt", "file_url": "/other/a.txt"},
            {"file_name": "a.txt", "file_url": "https://h.example.org/2/a.txt"},
            "https://h.example.org/list/b.txt",
        ]
    ) == [
        ("etc/passwd", f"{API}/runs/x/outputs/passwd", None, None),
        ("a.txt", f"{ORIGIN}/other/a.txt", None, None),
        ("2/a.txt", "https://h.example.org/2/a.txt", None, None),
        ("b.txt", "https://h.example.org/list/b.txt", None, None),
    ]
    assert outputs_of({"first": "https://h/x/out.txt", "second": "https://h/y/out.txt"})[1][0] == "second/out.txt"


def test_outputs_drs_style_checksums() -> None:
    digest = "b" * 64
    outputs = outputs_of(
        {"x": {"url": "https://h/x.vcf.gz", "checksums": [{"type": "crc32c", "checksum": "00"},
                                                          {"type": "sha-256", "checksum": digest.upper()}]}}
    )
    assert outputs == [("x.vcf.gz", "https://h/x.vcf.gz", ("sha256", digest), None)]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("sha1$" + "a" * 40, ("sha1", "a" * 40)),
        ("SHA256:" + "F" * 64, ("sha256", "f" * 64)),
        ("md5$" + "0" * 32, ("md5", "0" * 32)),
        ("sha1$abc", None),
        ("crc32$deadbeef", None),
        ("a" * 40, None),
        (None, None),
        ({"type": "sha1", "checksum": "a" * 40}, ("sha1", "a" * 40)),
    ],
)
def test_parse_checksum(value: Any, expected: tuple[str, str] | None) -> None:
    assert parse_checksum(value) == expected


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("oops", "outputs has an unexpected shape"),
        (17, "outputs has an unexpected shape"),
        ({"x": {"class": "File", "basename": "x.txt"}}, "output x is a File without a location"),
    ],
)
def test_outputs_unexpected_shapes(value: Any, match: str) -> None:
    with pytest.raises(Transient, match=f"^GET /runs/x: {match}") as caught:
        outputs_of(value)
    assert caught.value.kind == "bad_response"


def test_outputs_empty() -> None:
    assert outputs_of(None) == [] and outputs_of([]) == [] and outputs_of({}) == []


def test_status_complete_with_garbled_outputs_is_transient(router: respx.MockRouter, adapter: WesAdapter) -> None:
    router.get(f"{API}/runs/{RUN}/status").respond(200, json={"run_id": RUN, "state": "COMPLETE"})
    router.get(f"{API}/runs/{RUN}").respond(200, json=sapporo_log("COMPLETE", outputs="s3://bucket/x"))
    with pytest.raises(Transient, match=f"^GET /runs/{RUN}: outputs has an unexpected shape"):
        adapter.status(RUN)


# ------------------------------------------------------------------------------------------ cancel, restart


def test_cancel(router: respx.MockRouter, adapter: WesAdapter) -> None:
    route = router.post(f"{API}/runs/{RUN}/cancel").respond(200, json={"run_id": RUN})
    adapter.cancel(RUN)
    assert route.calls.last.request.headers["authorization"] == f"Bearer {TOKEN}"


def test_cancel_unknown_run_is_permanent(router: respx.MockRouter, adapter: WesAdapter) -> None:
    router.post(f"{API}/runs/{RUN}/cancel").respond(404, json={"msg": f"Run ID {RUN} not found", "status_code": 404})
    with pytest.raises(Permanent, match=f"POST /runs/{RUN}/cancel: HTTP 404: Run ID {RUN} not found"):
        adapter.cancel(RUN)


def test_restart_is_unsupported(adapter: WesAdapter) -> None:
    with pytest.raises(Permanent, match="cannot be restarted") as caught:
        adapter.restart(RUN)
    assert caught.value.kind == "unsupported"


# ------------------------------------------------------------------------------------------ downloads


def test_stream_output_sends_the_token_to_the_api_origin_only(router: respx.MockRouter, adapter: WesAdapter) -> None:
    same = router.get(f"{API}/runs/{RUN}/outputs/a.txt").respond(200, content=b"A" * 10)
    other = router.get("https://bucket.example.net/a.txt").respond(200, content=b"B")
    with adapter.stream_output(RemoteOutput(name="a.txt", url=f"{API}/runs/{RUN}/outputs/a.txt")) as body:
        assert b"".join(body.chunks()) == b"A" * 10
    with adapter.stream_output(RemoteOutput(name="a.txt", url="https://bucket.example.net/a.txt?X-Sig=1")) as r:
        assert b"".join(r.chunks()) == b"B"
    assert same.calls.last.request.headers["authorization"] == f"Bearer {TOKEN}"
    assert "authorization" not in other.calls.last.request.headers


def test_stream_output_drops_the_token_on_a_redirect(router: respx.MockRouter, adapter: WesAdapter) -> None:
    router.get(f"{API}/runs/{RUN}/outputs/a.txt").respond(302, headers={"location": "https://cdn.example.net/a"})
    cdn = router.get("https://cdn.example.net/a").respond(200, content=b"A")
    with adapter.stream_output(RemoteOutput(name="a.txt", url=f"{API}/runs/{RUN}/outputs/a.txt")) as body:
        assert b"".join(body.chunks()) == b"A"
    assert "authorization" not in cdn.calls.last.request.headers


@pytest.mark.parametrize(
    ("status", "error", "kind"),
    [(404, Permanent, "http_404"), (401, Blocked, "unauthorized"), (502, Transient, "server_error")],
)
def test_stream_output_errors(
    router: respx.MockRouter, adapter: WesAdapter, status: int, error: type, kind: str
) -> None:
    router.get("https://bucket.example.net/a.txt").respond(status, json={"msg": "no such file", "status_code": status})
    output = RemoteOutput(name="out/a.txt", url="https://bucket.example.net/a.txt?X-Signature=S3CRET")
    with pytest.raises(error) as caught, adapter.stream_output(output):
        pass
    assert str(caught.value) == f"GET output out/a.txt: HTTP {status}: no such file"
    assert caught.value.kind == kind
    assert "S3CRET" not in str(caught.value) and "bucket" not in str(caught.value)


def test_stream_output_transport_errors_while_reading(router: respx.MockRouter, adapter: WesAdapter) -> None:
    router.get(f"{API}/o").mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(Transient) as caught, adapter.stream_output(RemoteOutput(name="o", url=f"{API}/o")):
        pass
    assert caught.value.kind == "timeout" and str(caught.value).startswith("GET output o: timed out")


@pytest.mark.parametrize("url", ["file:///scratch/run/x.vcf.gz", "s3://bucket/x", "gs://bucket/x"])
def test_stream_output_refuses_what_http_cannot_fetch(adapter: WesAdapter, url: str) -> None:
    with pytest.raises(Permanent, match="not an HTTP URL") as caught, adapter.stream_output(
        RemoteOutput(name="x", url=url)
    ):
        pass
    assert caught.value.kind == "not_downloadable"
    assert "bucket" not in str(caught.value) and "scratch" not in str(caught.value)


# ------------------------------------------------------------------------------------------ check


SERVICE_INFO = {
    "workflow_type_versions": {
        "CWL": {"workflow_type_version": ["v1.0", "v1.2"]},
        "WDL": {"workflow_type_version": ["1.0"]},
    },
    "workflow_engine_versions": {"cwltool": {"workflow_engine_version": ["3.1"]}},
    "supported_wes_versions": ["1.1.0"],
}


def jwt(payload: dict[str, Any]) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256'})}.{part(payload)}.c2ln"


def test_check_healthy(router: respx.MockRouter) -> None:
    token = jwt({"sub": "u", "exp": 1_900_000_000})
    info = router.get(f"{API}/service-info").respond(200, json=SERVICE_INFO)
    runs = router.get(f"{API}/runs").respond(200, json={"runs": []})
    check = WesAdapter(make_config(), token=lambda: token).check()
    assert check.reachable and check.token_valid is True
    assert check.remote_panels == ()
    assert check.token_expires is not None and int(check.token_expires.timestamp()) == 1_900_000_000
    assert check.message == "workflow types: CWL v1.0/v1.2, WDL 1.0; engines: cwltool 3.1"
    assert dict(runs.calls.last.request.url.params) == {"page_size": "1"}
    assert info.calls.last.request.headers["authorization"] == f"Bearer {token}"
    assert token not in repr(check)


def test_check_reports_what_the_server_does_not_offer(router: respx.MockRouter) -> None:
    router.get(f"{API}/service-info").respond(200, json=SERVICE_INFO)
    router.get(f"{API}/runs").respond(200, json={"runs": []})
    check = WesAdapter(make_config(workflow_type="NFL", engine="nextflow"), token=lambda: None).check()
    assert check.token_valid is None  # no token configured, none needed
    assert "the configured workflow_type NFL is not offered" in (check.message or "")
    assert "the configured engine nextflow is not offered" in (check.message or "")
    check = WesAdapter(make_config(workflow_type_version="v1.1"), token=lambda: None).check()
    assert "the configured workflow_type_version CWL v1.1 is not offered" in (check.message or "")


def test_check_rejected_token(router: respx.MockRouter) -> None:
    router.get(f"{API}/service-info").respond(200, json=SERVICE_INFO)
    router.get(f"{API}/runs").respond(401, json={"msg": "Invalid token", "status_code": 401})
    check = WesAdapter(make_config(), token=lambda: TOKEN).check()
    assert check.reachable and check.token_valid is False
    assert "GET /runs: HTTP 401: Invalid token" in (check.message or "")
    assert TOKEN not in (check.message or "")


def test_check_rejected_on_service_info(router: respx.MockRouter) -> None:
    router.get(f"{API}/service-info").respond(403, json={"msg": "Forbidden", "status_code": 403})
    check = WesAdapter(make_config(), token=lambda: None).check()
    assert check.reachable and check.token_valid is False
    assert check.message == "GET /service-info: HTTP 403: Forbidden (no token is configured)"


def test_check_unreachable(router: respx.MockRouter) -> None:
    router.get(f"{API}/service-info").mock(side_effect=httpx.ConnectError("refused"))
    check = WesAdapter(make_config(), token=lambda: None).check()
    assert not check.reachable and check.message == "GET /service-info: connection failed (ConnectError)"


def test_check_wrong_path_hints_at_base_url(router: respx.MockRouter) -> None:
    router.get(f"{ORIGIN}/wrong/service-info").respond(404, text="Not Found")
    check = WesAdapter(make_config(base_url=f"{ORIGIN}/wrong"), token=lambda: None).check()
    assert not check.reachable
    assert check.message is not None and "is https://wes.example.org/wrong the WES API root?" in check.message


def test_jwt_expiry() -> None:
    assert jwt_expiry(jwt({"exp": 1_800_000_000})).timestamp() == 1_800_000_000  # type: ignore[union-attr]
    assert jwt_expiry("opaque-token") is None
    assert jwt_expiry(jwt({"sub": "no exp"})) is None
    assert jwt_expiry("a.!!!.c") is None


# ------------------------------------------------------------------------------------------ outputs as paths


def read_output(adapter: WesAdapter, path: Path) -> bytes:
    output = RemoteOutput(name=path.name, url=path.as_uri())
    with adapter.stream_output(output) as body:
        assert body.length == path.stat().st_size
        return b"".join(body.chunks())


def test_outputs_as_paths_are_read_only_from_under_the_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "runs", tmp_path / "secrets"
    (root / "run-1").mkdir(parents=True)
    outside.mkdir()
    (root / "run-1" / "chr20.dose.vcf.gz").write_bytes(b"imputed" * 1000)
    (outside / "key").write_bytes(b"not yours")
    (root / "run-1" / "sneaky").symlink_to(outside / "key")
    (root / "run-1" / "dir.vcf.gz").mkdir()
    adapter = WesAdapter(make_config(outputs_as="path", outputs_root=root), token=lambda: None)

    assert read_output(adapter, root / "run-1" / "chr20.dose.vcf.gz") == b"imputed" * 1000
    for escape in (outside / "key", root / "run-1" / "sneaky", root / "run-1" / ".." / ".." / "secrets" / "key"):
        with pytest.raises(Permanent, match=f"is not under wes.outputs_root \\({root}\\)") as caught:
            read_output(adapter, escape)
        assert caught.value.kind == "outside_root"
    with pytest.raises(Permanent, match="does not exist on this machine"):
        read_output(adapter, root / "run-1" / "gone.vcf.gz")
    with pytest.raises(Permanent, match="is not a regular file"):
        read_output(adapter, root / "run-1" / "dir.vcf.gz")


def test_a_path_output_without_outputs_as_path_says_what_to_set(tmp_path: Path) -> None:
    output = RemoteOutput(name="x.vcf.gz", url=(tmp_path / "x.vcf.gz").as_uri())
    adapter = WesAdapter(make_config(), token=lambda: None)
    with pytest.raises(Permanent, match="a path on the server, not an HTTP URL we can download; on a file system "
                                        "shared with it, set wes.outputs_as: path"):
        with adapter.stream_output(output):
            pass
