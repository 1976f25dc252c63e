"""The one place HTTP turns into our errors (`daemon.services.http`): statuses of a streamed answer, failures while
its body is read, its declared length, and the scrubbing boundary around the neutral `ByteStream`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx
import pytest
import respx

from daemon.remote import ByteStream, RemoteOutput
from daemon.services.deadlines import Budget
from daemon.services.errors import Blocked, CutOff, Permanent, ServiceError, Transient
from daemon.services.http import HttpBody, SubmitProgress, body_errors, open_body, raise_for_stream_status
from daemon.services.scrubbing import ScrubbingAdapter

CALL = "download of chr_1.zip"
URL = "https://files.example/share/results/a3f1c0ffee5ecret/chr_1.zip"


def answer(status: int, content: bytes = b"", headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, content=content, headers=headers, request=httpx.Request("GET", URL))


# --- statuses -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 206, 299])
def test_a_2xx_is_left_for_the_caller_to_read(status: int) -> None:
    raise_for_stream_status(answer(status, b"body"), CALL)


@pytest.mark.parametrize(
    ("status", "headers", "error", "kind"),
    [
        (401, {}, Blocked, "unauthorized"),
        (403, {}, Blocked, "forbidden"),
        (404, {}, Permanent, "http_404"),
        (408, {}, Transient, "timeout"),
        (429, {"Retry-After": "7"}, Transient, "rate_limited"),
        (500, {}, Transient, "server_error"),
        (503, {"Retry-After": "60"}, Transient, "unavailable"),
    ],
)
def test_an_error_status_is_mapped_with_the_servers_words(
    status: int, headers: dict[str, str], error: type[ServiceError], kind: str
) -> None:
    with pytest.raises(error) as caught:
        raise_for_stream_status(answer(status, b'{"message": "no such thing"}', headers), CALL)
    assert type(caught.value) is error and caught.value.kind == kind
    assert str(caught.value) == f"{CALL}: HTTP {status}: no such thing"
    if "Retry-After" in headers:
        assert isinstance(caught.value, Transient) and caught.value.retry_after == float(headers["Retry-After"])


@pytest.mark.parametrize("status", [101, 204 + 100, 304])
def test_a_leftover_1xx_or_3xx_is_a_bad_response(status: int) -> None:
    with pytest.raises(Transient) as caught:
        raise_for_stream_status(answer(status), CALL)
    assert caught.value.kind == "bad_response" and str(caught.value) == f"{CALL}: unexpected HTTP {status}"


def test_the_adapters_own_rule_sees_the_quoted_answer_first() -> None:
    seen: list[tuple[int, str]] = []

    def refusal(quoted: httpx.Response, call: str) -> None:
        seen.append((quoted.status_code, quoted.text))
        if quoted.status_code == 400:
            raise Permanent(f"{call}: exhausted", kind="downloads_exhausted")

    with pytest.raises(Permanent) as caught:
        raise_for_stream_status(answer(400, b"max downloads exceeded"), CALL, refusal)
    assert caught.value.kind == "downloads_exhausted"
    with pytest.raises(Transient) as other:  # the rule lets it pass: the common mapping applies
        raise_for_stream_status(answer(502, b"bad gateway"), CALL, refusal)
    assert other.value.kind == "server_error"
    assert seen == [(400, "max downloads exceeded"), (502, "bad gateway")]


def test_an_error_answer_is_read_only_up_to_the_cap() -> None:
    with pytest.raises(Transient) as caught:
        raise_for_stream_status(answer(500, b"x" * ((2 << 20) + 1)), CALL)
    assert caught.value.kind == "bad_response" and "larger than the 2 MiB" in str(caught.value)


# --- failures while a body is read ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "mapped", "kind"),
    [
        (httpx.RemoteProtocolError("peer closed connection"), CutOff, "connection"),
        (httpx.ReadError("connection reset"), Transient, "connection"),
        (httpx.ReadTimeout("stalled"), Transient, "timeout"),
        (httpx.DecodingError("bad gzip"), Transient, "bad_response"),
    ],
)
def test_body_failures_are_mapped(error: Exception, mapped: type[Transient], kind: str) -> None:
    with pytest.raises(Transient) as caught, body_errors(CALL):
        raise error
    assert type(caught.value) is mapped and caught.value.kind == kind
    assert str(caught.value).startswith(f"{CALL}: ")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_other_errors_pass_body_errors_unchanged() -> None:
    with pytest.raises(OSError, match="disk full"), body_errors(CALL):
        raise OSError("disk full")


class _Broken(httpx.SyncByteStream):
    def __iter__(self) -> Iterator[bytes]:
        yield b"first"
        raise httpx.RemoteProtocolError("peer closed connection")


def test_a_body_cut_off_is_cut_off_after_what_came() -> None:
    body = HttpBody(httpx.Response(200, headers={"Content-Length": "100"}, stream=_Broken()), CALL)
    got = []
    with pytest.raises(CutOff):
        for chunk in body.chunks():
            got.append(chunk)
    assert got == [b"first"] and body.length == 100


@pytest.mark.parametrize(
    ("value", "length"), [(None, None), ("0", 0), ("1234", 1234), ("12, 12", 12)],
)
def test_the_declared_length(value: str | None, length: int | None) -> None:
    headers = {} if value is None else {"Content-Length": value}
    assert HttpBody(httpx.Response(200, headers=headers, stream=_Broken()), CALL).length == length


@pytest.mark.parametrize("value", ["12, 13", "-1", "ten"])
def test_a_garbled_declared_length_is_a_bad_response(value: str) -> None:
    body = HttpBody(httpx.Response(200, headers={"Content-Length": value}, stream=_Broken()), CALL)
    with pytest.raises(Transient) as caught:
        _ = body.length
    assert caught.value.kind == "bad_response" and str(caught.value).startswith(f"{CALL}: ")


# --- one call through the boundary ----------------------------------------------------------------------------------


@respx.mock
def test_open_body_hands_out_a_2xx_body_and_raises_the_rest() -> None:
    route = respx.get(URL)
    route.mock(return_value=httpx.Response(200, content=b"PK\x03\x04"))
    with httpx.Client() as client:
        with open_body(client, URL, call=CALL, budget=Budget.transfer()) as body:
            assert b"".join(body.chunks()) == b"PK\x03\x04" and body.received == 4
        route.mock(return_value=httpx.Response(503, text="maintenance", headers={"Retry-After": "60"}))
        with pytest.raises(Transient) as caught, open_body(client, URL, call=CALL, budget=Budget.transfer()):
            pytest.fail("no body is handed out for a refusal")
        assert caught.value.kind == "unavailable" and caught.value.service_wide
        route.mock(side_effect=httpx.ConnectError("refused"))
        with pytest.raises(Transient) as refused, open_body(client, URL, call=CALL, budget=Budget.transfer()):
            pytest.fail("no body without an answer")
        assert refused.value.kind == "connection" and "a3f1c0ffee5ecret" not in str(refused.value)


# --- the scrubbing boundary wraps the stream ------------------------------------------------------------------------


class _Adapter:
    """An adapter whose body fails mid-way with a message echoing the download hash."""

    name = "fake"

    @contextlib.contextmanager
    def stream_output(self, output: RemoteOutput, *, resume: object = None) -> Iterator[ByteStream]:
        yield _EchoingBody(output.remote_hash or "")


class _EchoingBody:
    def __init__(self, secret: str) -> None:
        self._secret = secret

    @property
    def length(self) -> int | None:
        raise Transient(f"{CALL}: invalid Content-Length for {self._secret}", kind="bad_response")

    @property
    def received(self) -> int:
        return 5

    def chunks(self, size: int | None = None) -> Iterator[bytes]:
        yield b"first"
        raise CutOff(f"{CALL}: connection to /share/results/{self._secret}/ failed")


def test_errors_of_the_stream_are_scrubbed_as_they_are_raised() -> None:
    adapter = ScrubbingAdapter(_Adapter())  # type: ignore[arg-type]
    output = RemoteOutput(name="chr_1.zip", url=URL, remote_hash="a3f1c0ffee5ecret")
    handled: list[ServiceError] = []
    with adapter.stream_output(output) as body:
        for read in (lambda: body.length, lambda: list(body.chunks())):
            try:
                read()
            except ServiceError as exc:  # handled inside the block: it never passes the adapter's `with`
                handled.append(exc)
        assert body.received == 5
    assert [type(exc) for exc in handled] == [Transient, CutOff]
    assert all("a3f1c0ffee5ecret" not in str(exc) and "[redacted]" in str(exc) for exc in handled)


def test_submit_progress_tells_a_refusal_from_an_unknown_outcome() -> None:
    def refused(response: httpx.Response) -> bool:
        return response.status_code == 400

    def raised(context: BaseException | None) -> ServiceError:
        error = Transient("POST /jobs: failed")
        error.__context__ = context
        return error

    assert not SubmitProgress().may_have_created(raised(None), refused)  # nothing was sent
    sent = SubmitProgress(sent=True)
    assert not sent.may_have_created(raised(httpx.ConnectError("refused")), refused)
    assert sent.may_have_created(raised(httpx.ReadTimeout("no answer")), refused)
    assert not SubmitProgress(sent=True, answer=answer(400)).may_have_created(raised(None), refused)
    assert SubmitProgress(sent=True, answer=answer(502)).may_have_created(raised(None), refused)
