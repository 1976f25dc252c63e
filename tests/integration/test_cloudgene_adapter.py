"""CloudgeneAdapter against a mocked Cloudgene API (respx): request shapes, answers, and every error class."""

from __future__ import annotations

import contextlib
import datetime as dt
import email.parser
import email.policy
from pathlib import Path

import httpx
import pytest
import respx

from daemon.config import ServiceConfig
from daemon.remote import RemoteOutput, SubmitRequest
from daemon.services.cloudgene import CloudgeneAdapter
from daemon.services.errors import Blocked, JobLimitReached, Permanent, ServiceError, Transient
from daemon.services.scrubbing import ScrubbingAdapter
from daemon.states import RemoteKind

ROOT = "https://imputation.example.org"
API = ROOT + "/api/v2"
TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2VjcmV0LXNpZ25hdHVyZQ"
FILE_HASH = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
SUBMIT = f"{API}/jobs/submit/imputationserver2"
STATUS = f"{API}/jobs/job-1/status"
VERIFY = f"{API}/tokens/verify"
HTML_PAGE = "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1>nginx</body></html>"


def service(base_url: str = ROOT, **overrides) -> ServiceConfig:
    return ServiceConfig(name="mis", type="cloudgene", base_url=base_url, timeout=5.0, **overrides)


def make(token=TOKEN, base_url: str = ROOT, **kwargs) -> CloudgeneAdapter:
    return CloudgeneAdapter(service(base_url), token=token if callable(token) else (lambda: token), **kwargs)


@pytest.fixture
def mock():
    with respx.mock(assert_all_mocked=True, assert_all_called=False) as router:
        # The panel list a submit checks its panel against; a test that mocks the same URL replaces this route.
        for app in ("imputationserver2", "imputationserver2@2.0.7"):
            router.get(f"{API}/server/apps/{app}").respond(json=APP)
        yield router


@pytest.fixture
def adapter():
    a = make()
    yield a
    a.close()


@pytest.fixture
def bounded():
    """The adapter behind the boundary that scrubs secrets out of what the server says, as the daemon builds it."""
    a = ScrubbingAdapter(make(), token=lambda: TOKEN)
    yield a
    a.close()


def job(state: int = 2, **extra) -> dict:
    body = {
        "application": "Genotype Imputation (Minimac4) 2.0.0",
        "applicationId": "imputationserver2",
        "id": "job-1",
        "name": "ours-1",
        "state": state,
        "positionInQueue": -1,
        "submittedOn": 1704110400000,
        "startTime": 0,
        "endTime": 0,
        "currentTime": 1704110460000,
        "deletedOn": -1,
        "steps": [],
        "outputParams": [],
    }
    body.update(extra)
    return body


def output_file(name: str, file_hash: str = FILE_HASH, size: str = "314 MB", count: int = 10) -> dict:
    return {"name": name, "path": f"local/{name}", "hash": file_hash, "count": count, "size": size,
            "parameterId": 7}


def multipart(request: httpx.Request) -> list[tuple[str, str | None, bytes]]:
    """(field name, file name, payload) of every part, in order."""
    body = request.read()
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    assert message.is_multipart()
    return [
        (part.get_param("name", header="content-disposition"), part.get_filename(), part.get_payload(decode=True))
        for part in message.iter_parts()
    ]


def assert_no_secrets(exc: BaseException) -> None:
    text = str(exc) + repr(exc.args)
    for secret in (TOKEN, FILE_HASH):
        assert secret not in text


# -- construction ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base_url", [ROOT, ROOT + "/", ROOT + "/api/v2", ROOT + "/api/v2/", " " + ROOT + "//"]
)
def test_base_url_with_or_without_api_prefix(mock, base_url):
    route = mock.get(STATUS).respond(json=job(4, outputParams=[{"id": 1, "files": [output_file("chr_1.zip")]}]))
    with contextlib.closing(make(base_url=base_url)) as a:
        status = a.status("job-1")
    assert route.called
    assert status.outputs[0].url == f"{ROOT}/share/results/{FILE_HASH}/chr_1.zip"


def test_rejects_a_base_url_that_is_not_http():
    with pytest.raises(ValueError, match="base_url"):
        make(base_url="imputation.example.org")


def test_close_closes_only_its_own_client():
    own = make()
    own.close()
    assert own._client.is_closed
    client = httpx.Client()
    borrowed = make(client=client)
    borrowed.close()
    assert not client.is_closed
    client.close()


# -- submit ------------------------------------------------------------------------------------------------------


@pytest.fixture
def vcfs(tmp_path: Path) -> list[Path]:
    files = []
    for chrom in (1, 2):
        path = tmp_path / f"chr{chrom}.vcf.gz"
        path.write_bytes(f"fake bgzip data for chromosome {chrom}".encode() * 100)
        files.append(path)
    return files


@pytest.fixture
def opened(monkeypatch):
    """Every file object the adapter opens, to check they are closed afterwards."""
    import builtins

    import daemon.services.cloudgene as module

    handles = []
    real_open = builtins.open

    def spy(*args, **kwargs):
        handle = real_open(*args, **kwargs)
        handles.append(handle)
        return handle

    monkeypatch.setattr(module, "open", spy, raising=False)
    return handles


def submit_request(files, **overrides) -> SubmitRequest:
    values = dict(
        job_id="3f2a0c1e-attempt-0",
        files=files,
        panel="apps@1000g-phase-3-v5@2.0.0",
        build="hg19",
        population="eur",
        phasing="eagle",
        r2_filter="0.3",
        mode="imputation",
        password="correct-horse-battery",
    )
    values.update(overrides)
    return SubmitRequest(**values)


def test_submit_sends_the_documented_multipart_form(mock, adapter, vcfs, opened):
    seen = {}

    def answer(request: httpx.Request) -> httpx.Response:
        seen["headers"] = request.headers
        seen["parts"] = multipart(request)
        return httpx.Response(200, json={"success": True, "message": "Your job was successfully added to the job "
                                         "queue.", "id": "job-20240101-120000-123"})

    mock.post(SUBMIT).mock(side_effect=answer)
    remote_id = adapter.submit(submit_request(vcfs))

    assert remote_id == "job-20240101-120000-123"
    assert seen["headers"]["X-Auth-Token"] == TOKEN
    assert seen["headers"]["content-type"].startswith("multipart/form-data; boundary=")
    assert "content-length" in seen["headers"]  # streamed from files of known size, not chunked
    fields = {name: payload.decode() for name, filename, payload in seen["parts"] if filename is None}
    assert fields == {
        "refpanel": "apps@1000g-phase-3-v5@2.0.0",
        "build": "hg19",
        "r2Filter": "0.3",
        "phasing": "eagle",
        "population": "eur",
        "mode": "imputation",
        "password": "correct-horse-battery",
        "job-name": "3f2a0c1e-attempt-0",
    }
    uploads = [(name, filename, payload) for name, filename, payload in seen["parts"] if filename is not None]
    assert uploads == [("files", p.name, p.read_bytes()) for p in vcfs]
    # Checkboxes that are false are absent, not "false".
    assert not {"aesEncryption", "meta"} & {name for name, _, _ in seen["parts"]}
    assert len(opened) == 2 and all(handle.closed for handle in opened)


def test_submit_hands_the_body_to_the_socket_in_pieces_of_64_kib_or_more(tmp_path):
    # httpx renders each form field as four short pieces, and each piece was a write of its own (34 per submit).
    big = tmp_path / "chr1.vcf.gz"
    big.write_bytes(bytes(range(256)) * 1024)  # 256 KiB: read by httpx in 64 KiB chunks
    small = tmp_path / "chr2.vcf.gz"
    small.write_bytes(b"small")
    seen = {}

    class Recording(httpx.BaseTransport):
        """What the connection would be handed (respx and MockTransport read the whole body first)."""

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            if request.method == "GET":  # the panel check before the upload
                return httpx.Response(200, json=APP)
            seen["pieces"] = list(request.stream)
            seen["length"] = int(request.headers["content-length"])
            return httpx.Response(200, json={"success": True, "id": "job-1"})

    with httpx.Client(transport=Recording()) as client, contextlib.closing(make(client=client)) as adapter:
        adapter.submit(submit_request([big, small]))

    pieces = seen["pieces"]
    assert sum(map(len, pieces)) == seen["length"]
    assert all(len(piece) >= 64 << 10 for piece in pieces[:-1])
    # The fields and the first file chunk, three more chunks, the rest (the second file and the closing boundary).
    assert len(pieces) == 5
    assert big.read_bytes() in b"".join(pieces)


def test_coalesced_body_passes_big_pieces_through_uncopied():
    from daemon.services.http import SEND_PIECE, _Coalesced

    big = b"x" * SEND_PIECE
    stream = _Coalesced(httpx.ByteStream(big))
    assert [piece is big for piece in stream] == [True]
    assert list(_Coalesced(httpx.ByteStream(b""))) == [b""]


def test_submit_sends_true_checkboxes_population_off_and_omits_unset_optionals(mock, adapter, vcfs):
    """Population always goes (AfriGen fails a job without it; `off` skips the frequency check); phasing, r2Filter
    and mode left unset are the server's defaults."""
    seen = {}

    def answer(request):
        seen["parts"] = {name: payload for name, _, payload in multipart(request)}
        return httpx.Response(200, json={"success": True, "id": "job-2"})

    mock.post(SUBMIT).mock(side_effect=answer)
    request = SubmitRequest(job_id="j", files=vcfs[:1], panel="apps@hapmap-2@2.0.0", build="hg38",
                            aes_encryption=True, meta=True)
    assert adapter.submit(request) == "job-2"
    assert sorted(seen["parts"]) == sorted(["refpanel", "build", "population", "aesEncryption", "meta", "job-name",
                                            "files"])
    assert seen["parts"]["population"] == b"off"


def test_submit_uses_the_configured_app(mock, vcfs):
    route = mock.post(f"{API}/jobs/submit/imputationserver2@2.0.7").respond(json={"success": True, "id": "job-3"})
    a = CloudgeneAdapter(service(app="imputationserver2@2.0.7"), token=lambda: TOKEN)
    assert a.submit(submit_request(vcfs)) == "job-3"
    assert route.called
    a.close()


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(400, json={"success": False, "message": "Only 3 jobs per user can be executed simultaneously."}),
        httpx.Response(400, text="Only 3 jobs per user can be executed simultaneously."),
    ],
    ids=["json", "plain-text"],
)
def test_submit_job_limit_is_transient_with_the_limit(mock, adapter, vcfs, opened, response):
    mock.post(SUBMIT).mock(return_value=response)
    with pytest.raises(JobLimitReached) as caught:
        adapter.submit(submit_request(vcfs))
    assert isinstance(caught.value, Transient)
    assert caught.value.limit == 3
    assert caught.value.kind == "job_limit"
    assert "POST /jobs/submit/imputationserver2" in str(caught.value)
    assert all(handle.closed for handle in opened)


@pytest.mark.parametrize(
    ("response", "text"),
    [
        (httpx.Response(400, json={"success": False, "message": "Parameter 'X' not found."}),
         "Parameter 'X' not found."),
        (httpx.Response(404, json={"success": False, "message": "Application 'imputationserver2' not found."}),
         "Application 'imputationserver2' not found."),
        (httpx.Response(404, text="Application 'imputationserver2' not found."),
         "Application 'imputationserver2' not found."),
        (httpx.Response(400, text="java.lang.IllegalArgumentException: bad refpanel"), "bad refpanel"),
    ],
    ids=["unknown-parameter", "unknown-app", "unknown-app-text", "plain-text-400"],
)
def test_submit_refusals_are_permanent_with_the_server_message(mock, adapter, vcfs, response, text):
    mock.post(SUBMIT).mock(return_value=response)
    with pytest.raises(Permanent) as caught:
        adapter.submit(submit_request(vcfs))
    assert text in str(caught.value)
    assert str(caught.value).startswith("POST /jobs/submit/imputationserver2: HTTP")


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(404, html="<html><body>Not Found</body></html>"),
        httpx.Response(404),
        httpx.Response(404, json={"message": "Page Not Found", "_links": {"self": {"href": "/x"}}}),
    ],
    ids=["html", "empty", "micronaut-no-route"],
)
def test_submit_404_without_a_cloudgene_answer_is_a_wrong_base_url(mock, adapter, vcfs, response):
    mock.post(SUBMIT).mock(return_value=response)
    with pytest.raises(Blocked) as caught:
        adapter.submit(submit_request(vcfs))
    assert caught.value.kind == "endpoint_not_found"
    assert "base_url" in str(caught.value)


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, json={"success": False, "message": "Something odd."}),
        httpx.Response(200, json={"success": True, "message": "ok"}),
        httpx.Response(200, json={"success": True, "id": 12345}),
        httpx.Response(200, json={"success": True, "id": "  "}),
        httpx.Response(200, json=["job-1"]),
        httpx.Response(200, html=HTML_PAGE),
        httpx.Response(200, text='{"success": true, "id": "job-'),
    ],
    ids=["success-false", "missing-id", "id-not-string", "id-blank", "json-list", "html", "truncated-json"],
)
def test_submit_malformed_answers_are_bad_response(mock, adapter, vcfs, response):
    mock.post(SUBMIT).mock(return_value=response)
    with pytest.raises(Transient) as caught:
        adapter.submit(submit_request(vcfs))
    assert caught.value.kind == "bad_response"
    assert str(caught.value).startswith("POST /jobs/submit/imputationserver2: ")


def test_submit_missing_input_is_permanent_and_sends_nothing(mock, adapter, vcfs, tmp_path, opened):
    route = mock.post(SUBMIT).respond(json={"success": True, "id": "job-1"})
    with pytest.raises(Permanent, match="missing.vcf.gz") as caught:
        adapter.submit(submit_request([vcfs[0], tmp_path / "missing.vcf.gz"]))
    assert caught.value.kind == "input_missing"
    assert not route.called
    assert all(handle.closed for handle in opened)


@pytest.mark.parametrize("password", ["a&b-secret-pw", "<secret>-password", 'quo"ted-password', "pässwort-long", ""])
def test_submit_refuses_passwords_the_server_would_html_escape(mock, adapter, vcfs, password):
    route = mock.post(SUBMIT).respond(json={"success": True, "id": "job-1"})
    with pytest.raises(Permanent) as caught:
        adapter.submit(submit_request(vcfs, password=password))
    assert caught.value.kind == "bad_password"
    assert not route.called
    if password:
        assert password not in str(caught.value)


def test_submit_read_error_mid_upload_is_transient(mock, adapter, vcfs, monkeypatch):
    import io

    import daemon.services.cloudgene as module

    class FailingFile(io.FileIO):
        def read(self, size=-1):
            raise OSError(5, "Input/output error")

    handles = []
    monkeypatch.setattr(module, "open", lambda path, mode: handles.append(FailingFile(path)) or handles[-1],
                        raising=False)
    mock.post(SUBMIT).mock(side_effect=lambda request: httpx.Response(200, json={"ok": request.read() == b""}))
    with pytest.raises(Transient) as caught:
        adapter.submit(submit_request(vcfs))
    assert caught.value.kind == "input_read"
    assert all(handle.closed for handle in handles)


def test_submit_timeout_is_transient_and_closes_files(mock, adapter, vcfs, opened):
    mock.post(SUBMIT).mock(side_effect=httpx.ReadTimeout("timed out"))
    with pytest.raises(Transient) as caught:
        adapter.submit(submit_request(vcfs))
    assert caught.value.kind == "timeout"
    assert all(handle.closed for handle in opened)


GATEWAY_TIMEOUT_PAGE = "<html><head><title>504 Gateway Time-out</title></head><body>nginx</body></html>"
JOB_LIMIT = "Only 3 jobs per user can be executed simultaneously."


@pytest.mark.parametrize(
    ("answer", "may_have_created"),
    [
        # Refusals in the server's own words: no job was made, nothing to look up.
        (httpx.Response(400, json={"success": False, "message": JOB_LIMIT}), False),
        (httpx.Response(400, text=JOB_LIMIT), False),
        (httpx.Response(400, json={"success": False, "message": "Parameter 'X' not found."}), False),
        (httpx.Response(400, text="java.lang.IllegalArgumentException: bad refpanel"), False),
        (httpx.Response(404, json={"success": False, "message": "Application 'imputationserver2' not found."}), False),
        (httpx.Response(401, text="The request requires user authentication."), False),
        (httpx.Response(401), False),
        (httpx.Response(403, json={"success": False, "message": "Access denied."}), False),
        (httpx.Response(503, json={"success": False, "message": "This functionality is currently under maintenance."}),
         False),
        (httpx.Response(301, headers={"location": "https://elsewhere.example.org/"}), False),
        (httpx.Response(429, html="<html><body>429 Too Many Requests</body></html>", headers={"Retry-After": "5"}),
         False),
        (httpx.ConnectError("connection refused"), False),
        (httpx.ConnectTimeout("connect timed out"), False),
        # Outcomes unknown: the upload may be, or become, a job.
        (httpx.Response(504, html=GATEWAY_TIMEOUT_PAGE), True),
        (httpx.Response(502, html=HTML_PAGE), True),
        (httpx.Response(503, html="<html><body>503 Service Temporarily Unavailable</body></html>"), True),
        (httpx.Response(500, json={"message": "Internal Server Error"}), True),
        (httpx.Response(500, json={"success": False, "message": "java.lang.NullPointerException"}), True),
        (httpx.Response(413, html="<html><body>413 Request Entity Too Large</body></html>"), True),
        (httpx.Response(200, json={"success": True, "message": "Your job was successfully added to the job queue."}),
         True),
        (httpx.Response(200, text='{"success": true, "id": "job-'), True),
        (httpx.ReadTimeout("timed out"), True),
        (httpx.RemoteProtocolError("Server disconnected without sending a response."), True),
        (httpx.ReadError("connection reset by peer"), True),
    ],
    ids=[
        "job-limit", "job-limit-text", "unknown-parameter", "plain-text-400", "unknown-app", "401-text", "401-empty",
        "403", "maintenance", "redirect", "rate-limited", "connect-refused", "connect-timeout",
        "proxy-504", "proxy-502", "proxy-503", "500", "500-success-false", "proxy-413", "success-without-id",
        "cut-off-answer",
        "read-timeout", "disconnected", "reset",
    ],
)
def test_submit_errors_say_whether_the_job_may_exist(mock, adapter, vcfs, answer, may_have_created):
    if isinstance(answer, httpx.Response):
        mock.post(SUBMIT).mock(return_value=answer)
    else:
        mock.post(SUBMIT).mock(side_effect=answer)
    with pytest.raises(ServiceError) as caught:
        adapter.submit(submit_request(vcfs))
    assert caught.value.may_have_created is may_have_created


def test_submit_errors_before_the_upload_say_no_job_can_exist(mock, vcfs, tmp_path):
    route = mock.post(SUBMIT).respond(json={"success": True, "id": "job-1"})
    for a, request in [
        (make(token=None), submit_request(vcfs)),
        (make(), submit_request([tmp_path / "missing.vcf.gz"])),
        (make(), submit_request(vcfs, password="a&b-secret-pw")),
    ]:
        with pytest.raises(ServiceError) as caught:
            a.submit(request)
        assert caught.value.may_have_created is False, caught.value
    assert not route.called


# -- token ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "", "   \n"])
def test_missing_token_blocks_without_a_request(mock, vcfs, token):
    route = mock.route().respond(200, json={})
    a = make(token=token)
    for call in (lambda: a.submit(submit_request(vcfs)), lambda: a.status("job-1"), lambda: a.list_jobs()):
        with pytest.raises(Blocked, match="no token configured") as caught:
            call()
        assert caught.value.kind == "no_token"
    assert not route.called


def test_unreadable_token_file_blocks(mock, tmp_path):
    config = service(token_file=tmp_path / "absent-token")
    a = CloudgeneAdapter(config, token=config.read_token)
    with pytest.raises(Blocked, match="cannot read the token") as caught:
        a.status("job-1")
    assert caught.value.kind == "no_token"


def test_token_with_inner_whitespace_blocks(mock):
    with pytest.raises(Blocked, match="header") as caught:
        make(token="abc def ghi jkl").status("job-1")
    assert "abc def" not in str(caught.value)


def test_token_is_read_for_every_request(mock, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("first-token-aaaaaaaa\n")
    config = service(token_file=token_file)
    a = CloudgeneAdapter(config, token=config.read_token)
    route = mock.get(STATUS).respond(json=job())
    a.status("job-1")
    token_file.write_text("second-token-bbbbbbb\n")
    a.status("job-1")
    assert [call.request.headers["X-Auth-Token"] for call in route.calls] == [
        "first-token-aaaaaaaa",
        "second-token-bbbbbbb",
    ]
    a.close()


# -- find_submitted / list_jobs -----------------------------------------------------------------------------------


def page(n: int, entries: list[dict], pages: int) -> dict:
    return {"count": pages * 15, "page": n, "pageSize": 15, "prev": n - 1 if n > 1 else None,
            "next": n + 1 if n < pages else None, "pages": pages, "data": entries}


def entries(prefix: str, count: int = 15, state: int = 4) -> list[dict]:
    return [{"id": f"job-{prefix}-{i}", "name": f"{prefix}-{i}", "state": state} for i in range(count)]


def test_find_submitted_scans_pages_newest_first(mock, adapter):
    route = mock.get(f"{API}/jobs").mock(
        side_effect=lambda request: httpx.Response(200, json={
            "1": page(1, entries("a"), 3),
            "2": page(2, entries("b")[:7] + [{"id": "job-ours", "name": "ours-7", "state": 1}] + entries("c", 7), 3),
            "3": page(3, [{"id": "job-older", "name": "ours-7", "state": 4}], 3),
        }[request.url.params["page"]])
    )
    assert adapter.find_submitted("ours-7") == "job-ours"
    assert [call.request.url.params["page"] for call in route.calls] == ["1", "2"]
    assert all(call.request.headers["X-Auth-Token"] == TOKEN for call in route.calls)


def test_find_submitted_returns_none_after_the_last_page(mock, adapter):
    route = mock.get(f"{API}/jobs").mock(
        side_effect=lambda request: httpx.Response(200, json=page(int(request.url.params["page"]), entries("x"), 2))
    )
    assert adapter.find_submitted("ours-1") is None
    assert route.call_count == 2


def test_find_submitted_stops_at_an_empty_page(mock, adapter):
    route = mock.get(f"{API}/jobs").respond(json={"data": []})
    assert adapter.find_submitted("ours-1") is None
    assert route.call_count == 1


def test_find_submitted_is_bounded(mock, adapter):
    route = mock.get(f"{API}/jobs").mock(
        side_effect=lambda request: httpx.Response(200, json=page(int(request.url.params["page"]), entries("x"), 500))
    )
    assert adapter.find_submitted("ours-1", max_pages=4) is None
    assert route.call_count == 4
    route.reset()
    assert adapter.find_submitted("ours-1") is None
    assert route.call_count == 20


def test_find_submitted_matches_the_html_escaped_name(mock, adapter):
    mock.get(f"{API}/jobs").respond(json=page(1, [{"id": "job-9", "name": "a&amp;b &lt;1&gt;", "state": 2}], 1))
    assert adapter.find_submitted("a&b <1>") == "job-9"


@pytest.mark.parametrize(
    "body",
    [{"data": "nope"}, {"count": 3}, {"data": [["job-1"]]}, {"data": [{"name": "x", "state": 1}]}, [1, 2]],
    ids=["data-string", "no-data", "entry-list", "entry-without-id", "json-list"],
)
def test_job_list_malformed(mock, adapter, body):
    mock.get(f"{API}/jobs").respond(json=body)
    with pytest.raises(Transient) as caught:
        adapter.find_submitted("ours-1")
    assert caught.value.kind == "bad_response"
    assert str(caught.value).startswith("GET /jobs?page=1: ")


def test_list_jobs_pages_up_to_the_limit(mock, adapter):
    route = mock.get(f"{API}/jobs").mock(
        side_effect=lambda request: httpx.Response(
            200, json=page(int(request.url.params["page"]), entries(request.url.params["page"], state=8), 5)
        )
    )
    jobs = adapter.list_jobs(limit=20)
    assert len(jobs) == 20
    assert route.call_count == 2
    assert jobs[0].remote_id == "job-1-0" and jobs[0].name == "1-0" and jobs[0].raw_state == "SUCCESS_NOTIFIED"
    assert jobs[-1].remote_id == "job-2-4"


def test_list_jobs_unknown_state_kept_raw(mock, adapter):
    mock.get(f"{API}/jobs").respond(json=page(1, [{"id": "job-1", "name": None, "state": 42}], 1))
    [entry] = adapter.list_jobs()
    assert entry.raw_state == "42" and entry.name is None


# -- status --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "raw", "kind"),
    [
        (-1, "DEAD", RemoteKind.DEAD),
        (1, "WAITING", RemoteKind.QUEUED),
        (2, "RUNNING", RemoteKind.RUNNING),
        (3, "EXPORTING", RemoteKind.RUNNING),
        (4, "SUCCESS", RemoteKind.SUCCEEDED),
        (5, "FAILED", RemoteKind.FAILED),
        (6, "CANCELED", RemoteKind.CANCELLED),
        (7, "RETIRED", RemoteKind.EXPIRED),
        (8, "SUCCESS_NOTIFIED", RemoteKind.SUCCEEDED),
        (9, "FAILED_NOTIFIED", RemoteKind.FAILED),
        (10, "DELETED", RemoteKind.EXPIRED),
        (0, "0", RemoteKind.UNKNOWN),
        (42, "42", RemoteKind.UNKNOWN),
    ],
)
def test_status_maps_every_state(mock, adapter, state, raw, kind):
    route = mock.get(STATUS).respond(json=job(state))
    status = adapter.status("job-1")
    assert (status.raw_state, status.kind) == (raw, kind)
    assert route.calls.last.request.headers["X-Auth-Token"] == TOKEN
    assert (status.message is not None) == (kind is RemoteKind.FAILED)


QC_STATISTICS = """Uploaded data is hg19 and reference is hg19.

Statistics:
Alternative allele frequency > 0.5 sites: 185,012
Reference Overlap: 99.95 %
Match: 7,654,321
Allele switch: 123,456
Strand flip: 12
Strand flip and allele switch: 3
A/T, C/G genotypes: 1,234
Filtered sites:
Filter flag set: 0
Excluded sites in total: 1,234
Remaining sites in total: 7,653,087
Chunks excluded: 2"""


def test_status_reads_the_quality_controls_figures_and_warnings(mock, adapter):
    steps = [
        {"id": 1, "name": "Input Validation", "logMessages": [
            {"message": "2 valid VCF file(s) found.", "type": 0},
            {"message": "<b>Warning:</b> 12 duplicated sites removed", "type": 2}]},
        {"id": 2, "name": "Quality Control", "logMessages": [{"message": QC_STATISTICS, "type": 0}]},
    ]
    mock.get(f"{API}/jobs/job-1/status").respond(json=job(2, steps=steps))
    qc = adapter.status("job-1").qc
    assert qc is not None and qc.as_dict() == {
        "reference_overlap": 99.95, "matched": 7654321, "allele_switches": 123456, "strand_flips": 12,
        "strand_flips_and_allele_switches": 3, "snps_excluded": 1234, "snps_remaining": 7653087,
        "chunks_excluded": 2, "warnings": ["Warning: 12 duplicated sites removed"],
    }


def test_a_qc_failure_says_in_one_line_where_and_why(mock, adapter):
    steps = [
        {"id": 1, "name": "Input Validation", "logMessages": [{"message": "2 valid VCF file(s) found.", "type": 0}]},
        {"id": 2, "name": "Quality Control", "logMessages": [
            {"message": "Alert! More than 100 obvious strand flips have been detected.\nPlease check strand.",
             "type": 1}]},
    ]
    mock.get(f"{API}/jobs/job-1/status").respond(json=job(5, steps=steps))
    status = adapter.status("job-1")
    assert status.kind is RemoteKind.FAILED and status.qc_failed and status.failed_step == "Quality Control"
    assert status.message == ("Quality Control failed: Alert! More than 100 obvious strand flips have been detected. "
                              "Please check strand.")
    assert status.qc is not None and status.qc.failed_step == "Quality Control"


def test_status_reads_when_the_results_retire(mock, adapter):
    mock.get(f"{API}/jobs/job-1/status").respond(json=job(8, deletedOn=1704715200000))
    assert adapter.status("job-1").retires_at == dt.datetime(2024, 1, 8, 12, 0, tzinfo=dt.UTC)
    mock.get(f"{API}/jobs/job-1/status").respond(json=job(4, deletedOn=0))
    assert adapter.status("job-1").retires_at is None


@pytest.mark.parametrize(("message", "kind"), [
    ("Job was canceled by user.", RemoteKind.CANCELLED),
    ("Job cancelled.", RemoteKind.CANCELLED),
    ("Imputation failed: chr20 has no variants", RemoteKind.FAILED),
])
def test_state_9_is_cancelled_when_its_log_says_so(mock, adapter, message, kind):
    """Cloudgene moves cancelled jobs to 9 (FAILED_NOTIFIED) with the failed ones: its log tells them apart."""
    steps = [{"id": 1, "name": "Canceled", "logMessages": [{"message": message, "type": 1, "time": 0}]}]
    mock.get(f"{API}/jobs/job-1/status").respond(json=job(9, steps=steps))
    status = adapter.status("job-1")
    assert (status.kind, status.raw_state) == (kind, "FAILED_NOTIFIED")


def test_submit_refuses_a_panel_the_server_does_not_offer_before_uploading(mock, adapter, vcfs):
    """Cloudgene accepts any refpanel and fails the job only once it ran, after the upload and the queue."""
    submit = mock.post(SUBMIT).respond(json={"success": True, "id": "job-9"})
    with pytest.raises(Permanent, match=r"^panel 'apps@topmed-r3' is not offered by imputationserver2 on this "
                                        r"server \(it offers: apps@1000g-phase-3-v5@2.0.0, apps@hapmap-2@2.0.0\)"
                       ) as refused:
        adapter.submit(submit_request(vcfs, panel="apps@topmed-r3"))
    assert refused.value.kind == "unknown_panel" and refused.value.may_have_created is False
    assert not submit.called
    for panel in ("apps@1000g-phase-3-v5", "1000g-phase-3-v5", "apps@hapmap-2@2.0.0"):  # no version: the newest
        assert adapter.submit(submit_request(vcfs, panel=panel)) == "job-9"
    assert mock.routes[0].call_count == 1  # the panel list is read once and kept


def test_status_queue_position(mock, adapter):
    mock.get(STATUS).mock(side_effect=[httpx.Response(200, json=job(1, positionInQueue=4)),
                                       httpx.Response(200, json=job(1, positionInQueue=0)),
                                       httpx.Response(200, json=job(2, positionInQueue=-1)),
                                       httpx.Response(200, json=job(2, positionInQueue="3"))])
    assert [adapter.status("job-1").queue_position for _ in range(4)] == [4, 0, None, None]


def test_status_progress_is_latest_step_and_message(mock, adapter):
    steps = [
        {"id": 1, "name": "Input Validation", "logMessages": [
            {"message": "<b>22</b> valid VCF file(s) found.<br>Samples: 51", "type": 0, "time": 1}]},
        {"id": 2, "name": "Imputation", "logMessages": [
            {"message": "Chunk 1 of 10", "type": 3, "time": 2},
            {"message": "Chunk 3 of 10", "type": 3, "time": 3}]},
    ]
    mock.get(STATUS).respond(json=job(2, steps=steps))
    assert adapter.status("job-1").progress == "Imputation: Chunk 3 of 10"


def test_status_progress_shortened(mock, adapter):
    steps = [{"name": "Imputation", "logMessages": [{"message": "x" * 5000, "type": 3}]}]
    mock.get(STATUS).respond(json=job(2, steps=steps))
    assert len(adapter.status("job-1").progress) <= 200


def test_status_without_steps(mock, adapter):
    mock.get(STATUS).respond(json=job(1, steps=[{"name": "Queued"}]))
    assert adapter.status("job-1").progress == "Queued"
    mock.get(STATUS).respond(json={"state": 1})
    status = adapter.status("job-1")
    assert status.progress is None and status.outputs == ()


def test_failure_message_from_error_logs(mock, adapter):
    steps = [
        {"name": "Input Validation", "logMessages": [
            {"message": "Files uploaded.", "type": 0},
            {"message": "<b>Error:</b> No chr prefix detected.&nbsp;Build hg38 needs it.", "type": 1},
            {"message": "Low sample count", "type": 2}]},
        {"name": "Quality Control", "logMessages": [{"message": "Only 5 samples (minimum 20).", "type": 1}]},
    ]
    mock.get(STATUS).respond(json=job(5, steps=steps))
    status = adapter.status("job-1")
    assert status.kind is RemoteKind.FAILED
    assert status.message == ("Input Validation failed: Error: No chr prefix detected. Build hg38 needs it.; Only 5 "
                              "samples (minimum 20).")


def test_failure_without_error_logs_still_says_why(mock, adapter):
    mock.get(STATUS).respond(json=job(9, steps=[{"name": "x", "logMessages": [{"message": "ok", "type": 0}]}]))
    assert "FAILED_NOTIFIED" in adapter.status("job-1").message


def test_outputs_every_file_with_share_urls(mock, adapter):
    params = [
        {"id": 1, "name": "Imputation Results", "download": True, "hash": "param-hash",
         "files": [output_file("chr_1.zip"), output_file("chr_20.zip", file_hash="b" * 64, size="1 GB", count=9)]},
        {"id": 2, "name": "Statistics", "download": True,
         "files": [output_file("statistics/snps excluded #1.txt", file_hash="c" * 64, size="2 KB", count=-1)]},
        {"id": 3, "name": "Logs", "files": []},
        {"id": 4, "name": "Pending"},
    ]
    mock.get(STATUS).respond(json=job(4, outputParams=params))
    outputs = adapter.status("job-1").outputs
    assert [o.name for o in outputs] == ["chr_1.zip", "chr_20.zip", "statistics/snps excluded #1.txt"]
    first, second, third = outputs
    assert first.url == f"{ROOT}/share/results/{FILE_HASH}/chr_1.zip"
    assert first.remote_hash == FILE_HASH and first.size_text == "314 MB" and first.downloads_left == 10
    assert second.downloads_left == 9 and second.size_text == "1 GB"
    assert third.url == f"{ROOT}/share/results/{'c' * 64}/statistics/snps%20excluded%20%231.txt"
    assert third.downloads_left is None  # -1: no limit
    assert first.checksum is None
    assert FILE_HASH not in repr(first)


@pytest.mark.parametrize("name", ["../etc/passwd", "/abs/chr1.zip", "a//b.zip", "a\\b.zip", "stats/./x.txt"])
def test_unsafe_output_names_are_refused(mock, adapter, name):
    mock.get(STATUS).respond(json=job(4, outputParams=[{"id": 1, "files": [output_file(name)]}]))
    with pytest.raises(Permanent) as caught:
        adapter.status("job-1")
    assert caught.value.kind == "bad_output_name"


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, json={"id": "job-1"}),
        httpx.Response(200, json=job(state="4")),
        httpx.Response(200, json=job(state=True)),
        httpx.Response(200, json=job(state=None)),
        httpx.Response(200, json=job(4, outputParams={"files": []})),
        httpx.Response(200, json=job(4, outputParams=["x"])),
        httpx.Response(200, json=job(4, outputParams=[{"files": "chr_1.zip"}])),
        httpx.Response(200, json=job(4, outputParams=[{"files": [["chr_1.zip"]]}])),
        httpx.Response(200, json=job(4, outputParams=[{"files": [{"name": "chr_1.zip"}]}])),
        httpx.Response(200, json=job(4, outputParams=[{"files": [{"hash": FILE_HASH}]}])),
        httpx.Response(200, json=job(4, outputParams=[{"files": [{"name": 3, "hash": FILE_HASH}]}])),
        httpx.Response(200, json=[job(4)]),
        httpx.Response(200, json="job-1"),
        httpx.Response(200, html=HTML_PAGE),
        httpx.Response(200, text='{"state": 4, "steps": ['),
        httpx.Response(200, content=b"\xff\xfe\x00garbage"),
    ],
    ids=["no-state", "state-string", "state-bool", "state-null", "outputs-object", "output-string",
         "files-string", "file-list", "file-no-hash", "file-no-name", "file-name-number", "json-list",
         "json-string", "html", "truncated", "binary"],
)
def test_status_malformed_answers_name_the_call(mock, adapter, response):
    mock.get(STATUS).mock(return_value=response)
    with pytest.raises(Transient) as caught:
        adapter.status("job-1")
    assert caught.value.kind == "bad_response"
    assert str(caught.value).startswith("GET /jobs/job-1/status: ")


def test_status_tolerates_odd_cosmetic_fields(mock, adapter):
    mock.get(STATUS).respond(json=job(2, steps="nope", positionInQueue=None))
    status = adapter.status("job-1")
    assert status.kind is RemoteKind.RUNNING and status.progress is None
    mock.get(STATUS).respond(json=job(5, steps=[1, {"logMessages": "x"}, {"logMessages": [3, {"type": 1}]}]))
    assert adapter.status("job-1").message


# -- errors shared by every API call -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "error", "kind"),
    [
        (httpx.ReadTimeout("read timed out"), Transient, "timeout"),
        (httpx.ConnectTimeout("connect timed out"), Transient, "timeout"),
        (httpx.ConnectError("[Errno 111] Connection refused"), Transient, "connection"),
        (httpx.RemoteProtocolError("peer closed connection"), Transient, "connection"),
        (httpx.Response(500, json={"success": False, "message": "NullPointerException"}), Transient, "server_error"),
        (httpx.Response(502, html=HTML_PAGE), Transient, "server_error"),
        (httpx.Response(504, text=""), Transient, "server_error"),
        (httpx.Response(429, text="slow down"), Transient, "rate_limited"),
        (httpx.Response(401, text="Unauthorized"), Blocked, "unauthorized"),
        (httpx.Response(401, json={"message": "Unauthorized", "_links": {}}), Blocked, "unauthorized"),
        (httpx.Response(404, json={"success": False, "message": "Job job-1 not found."}), Permanent,
         "remote_not_found"),
        (httpx.Response(404, html="<html><body>404</body></html>"), Blocked, "endpoint_not_found"),
        (httpx.Response(400, json={"success": False, "message": "Job job-1 is not pending."}), Permanent, "http_400"),
    ],
    ids=["read-timeout", "connect-timeout", "connect-error", "protocol-error", "500", "502-html", "504-empty",
         "429", "401-text", "401-json", "404-job", "404-html", "400"],
)
def test_status_error_classes(mock, adapter, answer, error, kind):
    if isinstance(answer, Exception):
        mock.get(STATUS).mock(side_effect=answer)
    else:
        mock.get(STATUS).mock(return_value=answer)
    with pytest.raises(error) as caught:
        adapter.status("job-1")
    assert type(caught.value) is error
    assert caught.value.kind == kind
    assert str(caught.value).startswith("GET /jobs/job-1/status: ")
    assert "Traceback" not in str(caught.value)
    assert_no_secrets(caught.value)


def test_502_html_page_is_summarised(mock, adapter):
    mock.get(STATUS).respond(502, html=HTML_PAGE)
    with pytest.raises(Transient) as caught:
        adapter.status("job-1")
    assert str(caught.value) == "GET /jobs/job-1/status: HTTP 502: HTTP 502 (HTML error page)"
    assert not caught.value.service_wide


def test_maintenance_pauses_the_whole_service_with_retry_after(mock, adapter):
    mock.get(STATUS).respond(
        503, json={"success": False, "message": "This functionality is currently under maintenance."},
        headers={"Retry-After": "120"},
    )
    with pytest.raises(Transient) as caught:
        adapter.status("job-1")
    assert caught.value.service_wide and caught.value.retry_after == 120.0
    assert caught.value.kind == "unavailable"
    assert "under maintenance" in str(caught.value)


def test_rate_limit_is_service_wide(mock, adapter):
    mock.get(STATUS).respond(429, headers={"Retry-After": "7"})
    with pytest.raises(Transient) as caught:
        adapter.status("job-1")
    assert caught.value.service_wide and caught.value.retry_after == 7.0


def test_redirect_of_an_api_call_is_not_followed(mock, adapter):
    elsewhere = mock.get("https://evil.example.net/api/v2/jobs/job-1/status").respond(json=job())
    mock.get(STATUS).respond(301, headers={"Location": "https://evil.example.net/api/v2/jobs/job-1/status?x=1"})
    with pytest.raises(Blocked) as caught:
        adapter.status("job-1")
    assert caught.value.kind == "redirect"
    assert not elsewhere.called
    assert "https://evil.example.net/api/v2/jobs/job-1/status" in str(caught.value)
    assert "x=1" not in str(caught.value)


def test_job_id_is_quoted_in_the_path(mock, adapter):
    route = mock.get(f"{API}/jobs/job%2F1%3F/status").respond(json=job())
    adapter.status("job/1?")
    assert route.called


def test_403_with_a_valid_token_is_another_accounts_job(mock, adapter):
    mock.get(STATUS).respond(403, json={"success": False, "message": "Access denied."})
    verify = mock.post(VERIFY).respond(json={"valid": True, "message": "API Token was created by alice and is valid.",
                                             "username": "alice", "expire": "2030-01-01T00:00:00Z"})
    with pytest.raises(Permanent) as caught:
        adapter.status("job-1")
    assert caught.value.kind == "access_denied"
    assert "Access denied." in str(caught.value) and "alice" in str(caught.value)
    assert verify.calls.last.request.content == f"token={TOKEN}".encode()
    assert "X-Auth-Token" not in verify.calls.last.request.headers
    assert_no_secrets(caught.value)


@pytest.mark.parametrize(
    "verify_answer",
    [
        httpx.Response(200, json={"valid": False, "message": "Invalid API Token."}),
        httpx.Response(503, json={"success": False, "message": "under maintenance"}),
        httpx.Response(200, html=HTML_PAGE),
        httpx.ConnectError("refused"),
    ],
    ids=["invalid", "maintenance", "garbled", "unreachable"],
)
def test_403_without_a_confirmed_valid_token_blocks(mock, adapter, verify_answer):
    mock.get(STATUS).respond(403, json={"success": False, "message": "Access denied."})
    if isinstance(verify_answer, Exception):
        mock.post(VERIFY).mock(side_effect=verify_answer)
    else:
        mock.post(VERIFY).mock(return_value=verify_answer)
    with pytest.raises(Blocked) as caught:
        adapter.status("job-1")
    assert caught.value.kind == "forbidden"
    assert_no_secrets(caught.value)


def test_403_outside_a_job_blocks_without_asking(mock, adapter):
    verify = mock.post(VERIFY).respond(json={"valid": True})
    mock.get(f"{API}/jobs").respond(403, json={"message": "Forbidden"})
    with pytest.raises(Blocked):
        adapter.list_jobs()
    assert not verify.called


# -- cancel / restart ----------------------------------------------------------------------------------------------


def test_cancel(mock, adapter):
    route = mock.get(f"{API}/jobs/job-1/cancel").respond(json=job(6))
    assert adapter.cancel("job-1") is None
    assert route.calls.last.request.headers["X-Auth-Token"] == TOKEN


def test_cancel_of_an_unknown_job(mock, adapter):
    mock.get(f"{API}/jobs/job-1/cancel").respond(404, json={"success": False, "message": "Job job-1 not found."})
    with pytest.raises(Permanent) as caught:
        adapter.cancel("job-1")
    assert caught.value.kind == "remote_not_found"
    assert str(caught.value) == "GET /jobs/job-1/cancel: HTTP 404: Job job-1 not found."


def test_cancel_garbled_answer(mock, adapter):
    mock.get(f"{API}/jobs/job-1/cancel").respond(200, html=HTML_PAGE)
    with pytest.raises(Transient, match="^GET /jobs/job-1/cancel: answer is not JSON"):
        adapter.cancel("job-1")


def test_restart(mock, adapter):
    route = mock.get(f"{API}/jobs/job-1/restart").respond(
        json={"success": True, "message": "Your job was successfully added to the job queue."})
    adapter.restart("job-1")
    assert route.calls.last.request.headers["X-Auth-Token"] == TOKEN


def test_restart_refused(mock, adapter):
    mock.get(f"{API}/jobs/job-1/restart").respond(400, json={"success": False, "message": "Job job-1 is not pending."})
    with pytest.raises(Permanent, match="is not pending"):
        adapter.restart("job-1")
    mock.get(f"{API}/jobs/job-1/restart").respond(json={"success": False, "message": "nope"})
    with pytest.raises(Permanent) as caught:
        adapter.restart("job-1")
    assert caught.value.kind == "restart_refused"


# -- downloads -----------------------------------------------------------------------------------------------------


def remote_output(name: str = "chr_1.zip") -> RemoteOutput:
    return RemoteOutput(name=name, url=f"{ROOT}/share/results/{FILE_HASH}/{name}", remote_hash=FILE_HASH,
                        size_text="1 KB", downloads_left=10)


def test_download_streams_without_the_token(mock, adapter):
    payload = bytes(range(256)) * 64
    route = mock.get(f"{ROOT}/share/results/{FILE_HASH}/chr_1.zip").respond(
        200, content=payload, headers={"Content-Type": "application/zip"})
    with adapter.stream_output(remote_output()) as body:
        assert body.length == len(payload)  # handed out only for a 2xx answer
        received = b"".join(body.chunks(4096))
    assert received == payload
    request = route.calls.last.request
    assert "X-Auth-Token" not in request.headers
    assert request.headers["Accept-Encoding"] == "identity"


def test_download_follows_a_redirect_to_a_presigned_url(mock, adapter):
    mock.get(f"{ROOT}/share/results/{FILE_HASH}/chr_1.zip").respond(
        301, headers={"Location": "https://bucket.s3.example.com/chr_1.zip?X-Amz-Signature=abc"})
    presigned = mock.get("https://bucket.s3.example.com/chr_1.zip").respond(200, content=b"PK\x03\x04")
    with adapter.stream_output(remote_output()) as body:
        assert b"".join(body.chunks()) == b"PK\x03\x04"
    assert "X-Auth-Token" not in presigned.calls.last.request.headers


@pytest.mark.parametrize(
    ("answer", "error", "kind"),
    [
        (httpx.Response(400, json={"success": False, "message": "number of max downloads exceeded."}), Permanent,
         "downloads_exhausted"),
        (httpx.Response(400, text="number of max downloads exceeded."), Permanent, "downloads_exhausted"),
        (httpx.Response(404, json={"success": False, "message": "download not found."}), Permanent,
         "download_not_found"),
        (httpx.Response(404, html="<html>gone</html>"), Permanent, "download_not_found"),
        (httpx.Response(403, text="<Error><Code>AccessDenied</Code></Error>"), Permanent, "download_forbidden"),
        (httpx.Response(500, text="oops"), Transient, "server_error"),
        (httpx.Response(502, html=HTML_PAGE), Transient, "server_error"),
        (httpx.Response(503, text="maintenance", headers={"Retry-After": "60"}), Transient, "unavailable"),
        (httpx.ReadTimeout("timed out"), Transient, "timeout"),
        (httpx.ConnectError("refused"), Transient, "connection"),
    ],
    ids=["exhausted-json", "exhausted-text", "404-json", "404-html", "403", "500", "502", "503", "timeout",
         "connect"],
)
def test_download_errors(mock, adapter, answer, error, kind):
    route = mock.get(f"{ROOT}/share/results/{FILE_HASH}/chr_1.zip")
    if isinstance(answer, Exception):
        route.mock(side_effect=answer)
    else:
        route.mock(return_value=answer)
    with pytest.raises(error) as caught:
        with adapter.stream_output(remote_output()):
            pytest.fail("the body must not be handed out")
    assert type(caught.value) is error
    assert caught.value.kind == kind
    assert "chr_1.zip" in str(caught.value)
    assert "/share/results" not in str(caught.value)
    assert_no_secrets(caught.value)


def test_download_exhausted_message_names_the_file(mock, adapter):
    mock.get(f"{ROOT}/share/results/{FILE_HASH}/statistics/qc%20report.txt").respond(
        400, json={"success": False, "message": "number of max downloads exceeded."})
    with pytest.raises(Permanent) as caught, adapter.stream_output(remote_output("statistics/qc report.txt")):
        pass
    assert str(caught.value) == ("download of statistics/qc report.txt: the server allows no more downloads of this "
                                 "file (number of max downloads exceeded.)")


class BrokenStream(httpx.SyncByteStream):
    def __init__(self, error: Exception) -> None:
        self.error = error

    def __iter__(self):
        yield b"PK\x03\x04 first bytes"
        raise self.error


@pytest.mark.parametrize(
    ("error", "kind"),
    [(httpx.ReadError("connection reset by peer"), "connection"), (httpx.ReadTimeout("stalled"), "timeout"),
     (httpx.RemoteProtocolError("incomplete chunked read"), "connection")],
)
def test_download_errors_mid_stream_are_transient(mock, adapter, error, kind):
    mock.get(f"{ROOT}/share/results/{FILE_HASH}/chr_1.zip").mock(
        return_value=httpx.Response(200, headers={"Content-Length": "1000"}, stream=BrokenStream(error)))
    received = []
    with pytest.raises(Transient) as caught:
        with adapter.stream_output(remote_output()) as body:
            for chunk in body.chunks():
                received.append(chunk)
    assert received == [b"PK\x03\x04 first bytes"]
    assert caught.value.kind == kind
    assert str(caught.value).startswith("download of chr_1.zip: ")


def test_download_leaves_the_callers_own_errors_alone(mock, adapter):
    mock.get(f"{ROOT}/share/results/{FILE_HASH}/chr_1.zip").respond(200, content=b"data")
    with pytest.raises(OSError, match="disk full"):
        with adapter.stream_output(remote_output()):
            raise OSError("disk full")


def test_download_error_body_echoing_the_hash_is_redacted(mock, bounded):
    mock.get(f"{ROOT}/share/results/{FILE_HASH}/chr_1.zip").respond(
        500, text=f"Download {FILE_HASH} failed for {ROOT}/share/results/{FILE_HASH}/chr_1.zip")
    with pytest.raises(Transient) as caught, bounded.stream_output(remote_output()):
        pass
    assert_no_secrets(caught.value)
    assert "[redacted]" in str(caught.value)


# -- check ---------------------------------------------------------------------------------------------------------


APP = {
    "id": "imputationserver2",
    "name": "Genotype Imputation (Minimac4)",
    "params": [
        {"id": "files", "type": "local_folder"},
        {"id": "refpanel", "type": "app_list", "values": [
            {"key": "apps@1000g-phase-3-v5@2.0.0", "value": "1000 Genomes Phase 3 (Version 5)"},
            {"key": "apps@hapmap-2@2.0.0", "value": "HapMap 2"}]},
        {"id": "build", "type": "list", "values": [{"key": "hg19", "value": "GRCh37/hg19"}]},
    ],
}


def test_check_success(mock, adapter):
    verify = mock.post(VERIFY).respond(json={
        "valid": True, "message": "API Token was created by alice and is valid.", "username": "alice",
        "name": "Alice", "mail": "alice@example.org", "expire": "2030-01-31T10:00:00.000+00:00"})
    apps = mock.get(f"{API}/server/apps/imputationserver2").respond(json=APP)
    result = adapter.check()
    assert result.reachable and result.token_valid is True and result.user == "alice"
    assert result.token_expires == dt.datetime(2030, 1, 31, 10, 0, tzinfo=dt.UTC)
    assert result.remote_panels == ("apps@1000g-phase-3-v5@2.0.0", "apps@hapmap-2@2.0.0")
    assert result.message is None
    assert verify.calls.last.request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert verify.calls.last.request.content == f"token={TOKEN}".encode()
    assert apps.calls.last.request.headers["X-Auth-Token"] == TOKEN


@pytest.mark.parametrize(
    ("expire", "expected"),
    [
        ("2030-01-31T10:00:00Z", dt.datetime(2030, 1, 31, 10, tzinfo=dt.UTC)),
        ("2030-01-31T10:00:00", dt.datetime(2030, 1, 31, 10, tzinfo=dt.UTC)),
        (1896084000000, dt.datetime(2030, 1, 31, 10, tzinfo=dt.UTC)),
        ("next tuesday", None),
        (None, None),
    ],
)
def test_check_expiry_formats(mock, adapter, expire, expected):
    mock.post(VERIFY).respond(json={"valid": True, "username": "alice", "expire": expire})
    mock.get(f"{API}/server/apps/imputationserver2").respond(json=APP)
    assert adapter.check().token_expires == expected


def test_check_invalid_token(mock, adapter):
    mock.post(VERIFY).respond(json={"valid": False, "message": "Invalid API Token."})
    apps = mock.get(f"{API}/server/apps/imputationserver2").respond(json=APP)
    result = adapter.check()
    assert result.reachable and result.token_valid is False and result.user is None
    assert "Invalid API Token." in result.message
    assert result.remote_panels == ("apps@1000g-phase-3-v5@2.0.0", "apps@hapmap-2@2.0.0")
    assert "X-Auth-Token" not in apps.calls.last.request.headers  # a rejected token is not sent again
    assert TOKEN not in result.message


@pytest.mark.parametrize("failure", [httpx.ConnectError("refused"), httpx.ConnectTimeout("slow")])
def test_check_unreachable(mock, adapter, failure):
    mock.post(VERIFY).mock(side_effect=failure)
    mock.get(f"{API}/server/apps/imputationserver2").mock(side_effect=failure)
    result = adapter.check()
    assert result.reachable is False and result.token_valid is None
    assert "POST /tokens/verify" in result.message


def test_check_maintenance_is_reachable(mock, adapter):
    body = {"success": False, "message": "This functionality is currently under maintenance."}
    mock.post(VERIFY).respond(503, json=body)
    mock.get(f"{API}/server/apps/imputationserver2").respond(503, json=body)
    result = adapter.check()
    assert result.reachable is True and result.token_valid is None
    assert "maintenance" in result.message


def test_check_without_token(mock):
    verify = mock.post(VERIFY).respond(json={"valid": True})
    mock.get(f"{API}/server/apps/imputationserver2").respond(json=APP)
    result = make(token=None).check()
    assert result.token_valid is False and result.reachable is True
    assert "no token configured" in result.message
    assert not verify.called


@pytest.mark.parametrize(
    "app", [{"params": "x"}, {"params": [{"id": "build"}]}, {"params": [{"id": "refpanel", "values": "x"}]}],
    ids=["params-string", "no-refpanel", "values-string"],
)
def test_check_reports_an_odd_app(mock, adapter, app):
    mock.post(VERIFY).respond(json={"valid": True, "username": "alice"})
    mock.get(f"{API}/server/apps/imputationserver2").respond(json=app)
    result = adapter.check()
    assert result.token_valid is True and result.remote_panels == ()
    assert result.message.startswith("GET /server/apps/imputationserver2: ")


def test_check_never_reveals_the_token(mock, bounded):
    mock.post(VERIFY).respond(json={"valid": False, "message": f"Token {TOKEN} is not valid."})
    mock.get(f"{API}/server/apps/imputationserver2").respond(500, text=f"error for token {TOKEN}")
    result = bounded.check()
    assert TOKEN not in result.message and TOKEN not in repr(result)


# -- secrets -------------------------------------------------------------------------------------------------------


def test_server_echoing_the_token_is_redacted(mock, bounded, vcfs):
    mock.post(SUBMIT).respond(400, json={"success": False, "message": f"Parameter '{TOKEN}' not found."})
    mock.get(STATUS).respond(500, text=f"boom {TOKEN}")
    errors: list[ServiceError] = []
    for call in (lambda: bounded.submit(submit_request(vcfs)), lambda: bounded.status("job-1")):
        with pytest.raises(ServiceError) as caught:
            call()
        errors.append(caught.value)
    for error in errors:
        assert_no_secrets(error)
        assert "[redacted]" in str(error)


def test_password_is_never_in_a_message(mock, bounded, vcfs):
    mock.post(SUBMIT).respond(400, text="bad password correct-horse-battery")
    with pytest.raises(Permanent) as caught:
        bounded.submit(submit_request(vcfs))
    assert "correct-horse-battery" not in str(caught.value)


def test_each_thread_gets_a_client_of_its_own_and_close_closes_them_all():
    # One client for all pool threads made httpcore poll every idle connection, under one lock, for each request.
    import threading

    from daemon.services.http import ClientPerThread

    made: list[httpx.Client] = []

    def factory() -> httpx.Client:
        made.append(httpx.Client())
        return made[-1]

    clients = ClientPerThread(factory)
    mine = clients()
    assert clients() is mine
    theirs: list[httpx.Client] = []
    thread = threading.Thread(target=lambda: theirs.append(clients()))
    thread.start()
    thread.join()
    assert theirs[0] is not mine and made == [mine, theirs[0]]

    # The ended thread's client is closed when the next one is made.
    later = threading.Thread(target=clients)
    later.start()
    later.join()
    assert theirs[0].is_closed and not mine.is_closed and len(made) == 3

    clients.close()
    assert clients.is_closed and all(client.is_closed for client in made)
    errors: list[BaseException] = []

    def after_close() -> None:
        try:
            clients()
        except RuntimeError as exc:
            errors.append(exc)

    late = threading.Thread(target=after_close)
    late.start()
    late.join()
    assert len(errors) == 1 and "closed" in str(errors[0]) and len(made) == 3
