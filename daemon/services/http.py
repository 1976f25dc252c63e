"""HTTP plumbing shared by the adapters: a service's clients, and remote answers turned into our errors.

Messages built here name the call ("GET /jobs/{id}/status") but never the full URL: Cloudgene download URLs carry
a secret, and query strings may carry anything.

Every call goes through `send` (an API answer, read whole) or `open_body` (a result file, read by the caller as a
`daemon.remote.ByteStream`), and every failure comes out as one of `daemon.services.errors` here, once: transport
failures by `transport_errors` (and, while a body is read, `body_errors`), HTTP statuses by `raise_for_status`. Two
limits hold for every adapter:

- an API answer is at most `ANSWER_LIMIT` (2 MiB), compressed or not (redirect hops included): a 200 MB status answer
  once took the daemon to 860 MB, an endless one until it was killed. Past it: `Transient(kind="bad_response")`.
- every call ends: each has a `deadlines.Budget` (a deadline, or for transfers a minimum rate), enforced at the
  socket for as long as the call runs.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import re
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from daemon import __version__
from daemon.remote import Resume
from daemon.services.deadlines import Budget, active, current, install
from daemon.services.errors import Blocked, CutOff, Permanent, ServiceError, Transient

USER_AGENT = f"imputationd/{__version__}"
#: How much of a non-JSON error body goes into a message (HTML error pages are long and say little).
BODY_EXCERPT = 200
#: The most bytes of one API answer (after decompression). Cloudgene's and WES's answers are a few KiB (a RunLog of a
#: large workflow some hundred), while a hostile one parses to up to 25 times its size (2 MiB of "[{},{},…]" is
#: ~50 MiB of objects), once per worker: the unit's MemoryHigh= counts on this.
ANSWER_LIMIT = 2 << 20
#: Redirects one call follows at most (httpx's default).
MAX_REDIRECTS = 20
#: Content codings an API answer may come in although we ask for none (`_decoder`).
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


_tls_lock = threading.Lock()
_tls_context: ssl.SSLContext | None = None


def tls_context() -> ssl.SSLContext:
    """The TLS context the service clients verify servers with: httpx's default one (certifi's CA bundle, or
    SSL_CERT_FILE / SSL_CERT_DIR when set), built once per process and shared by every client `make_client` makes.

    Each context holds its own parsed copy of the ~120 CA certificates (~0.8 MiB): without sharing, every configured
    service, and every service a reload rebuilds, carried one. A restart builds it anew (a changed CA bundle is read
    then)."""
    global _tls_context
    with _tls_lock:
        if _tls_context is None:
            _tls_context = httpx.create_ssl_context()
        return _tls_context


def make_client(
    base_url: str,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
    max_connections: int = 10,
    follow_redirects: bool = True,
    trust_env: bool = True,
) -> httpx.Client:
    """A client for one service (thread-safe; the adapters give each thread its own, see `ClientPerThread`), whose
    connections obey the budget of the call that uses them (`deadlines`)."""
    client = httpx.Client(
        base_url=base_url,
        verify=tls_context(),
        headers={"User-Agent": USER_AGENT, **(headers or {})},
        timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        follow_redirects=follow_redirects,
        trust_env=trust_env,
    )
    install([client._transport, *client._mounts.values()])  # noqa: SLF001 - httpx has no public way to choose
    return client


class ClientPerThread:
    """One `httpx.Client` per thread, made by `factory` on the thread's first call; `close()` closes them all.

    httpcore's pool looks at every idle connection of its client (a `poll` each) whenever it hands a connection out
    or takes one back, under a lock every thread shares: with 8 workers on one client that was ~15 system calls per
    request, each letting go of the GIL, and 3 % of a worker's time queued on the lock. Each pool thread makes its
    requests one after another, so its own client holds the one connection it uses. A thread that has ended has its
    client closed when the next one is made."""

    def __init__(self, factory: Callable[[], httpx.Client]) -> None:
        self._factory = factory
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: list[tuple[threading.Thread, httpx.Client]] = []
        self._closed = False

    def __call__(self) -> httpx.Client:
        """The calling thread's client."""
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is not None:
            return client
        with self._lock:
            if self._closed:
                raise RuntimeError("the service's HTTP clients have been closed")
            ended = [c for thread, c in self._clients if not thread.is_alive()]
            self._clients = [(thread, c) for thread, c in self._clients if thread.is_alive()]
            client = self._factory()
            self._clients.append((threading.current_thread(), client))
        for old in ended:
            old.close()
        self._local.client = client
        return client

    @property
    def is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._lock:
            self._closed = True
            clients, self._clients = self._clients, []
        for _thread, client in clients:
            client.close()


#: `send` hands a multipart body to the socket in pieces of at least this size.
SEND_PIECE = 64 << 10


class _Coalesced(httpx.SyncByteStream):
    """A request body whose small pieces are joined up to `SEND_PIECE` before they are handed on.

    httpx renders a multipart form as a few short pieces per field (boundary, headers, value, CRLF), and httpcore
    sends each piece with its own system calls: a Cloudgene submit was 34 writes of 2–318 bytes, each costing
    three system calls and a turn at the GIL. A piece already that large (a file's 64 KiB reads) passes
    through as it is, uncopied, so a big upload still streams without being held in memory."""

    def __init__(self, stream: httpx.SyncByteStream) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        pieces: list[bytes] = []
        held = 0
        for piece in self._stream:
            pieces.append(piece)
            held += len(piece)
            if held >= SEND_PIECE:
                yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
                pieces, held = [], 0
        if pieces:
            yield b"".join(pieces)

    def close(self) -> None:
        self._stream.close()


def send(client: httpx.Client, method: str, url: str | httpx.URL, *, call: str, budget: Budget,
         follow_redirects: bool | None = None, **kwargs: Any) -> httpx.Response:
    """`client.request(...)` within `budget`, its answer read whole but at most `ANSWER_LIMIT` bytes; a multipart
    body (`files=`) is sent in pieces of at least 64 KiB (`_Coalesced`). Transport failures, a call out of time
    and an answer too large come out as `Transient`.

    The answer is a copy holding the body as read (decompressed, so without Content-Encoding). Redirects are
    followed here, not by httpx, so that no hop's body is read without the limit."""
    follow = client.follow_redirects if follow_redirects is None else follow_redirects
    headers = {"Accept-Encoding": "identity", **kwargs.pop("headers", {})}
    request = client.build_request(method, url, headers=headers, **kwargs)
    if kwargs.get("files"):
        request.stream = _Coalesced(request.stream)  # type: ignore[arg-type]
    with active(budget), transport_errors(call, budget):
        for _hop in range(MAX_REDIRECTS + 1):
            response = client.send(request, follow_redirects=False, stream=True)
            try:
                body = read_limited(response, call)
            finally:
                response.close()
            if not (follow and response.next_request is not None):
                return _with_body(response, body)
            request = response.next_request
    raise Transient(f"{call}: more than {MAX_REDIRECTS} redirects", kind="bad_response")


@contextlib.contextmanager
def open_stream(client: httpx.Client, method: str, url: str | httpx.URL, *, call: str, budget: Budget,
                follow_redirects: bool | None = None, **kwargs: Any) -> Iterator[httpx.Response]:
    """A streaming `client.stream(...)` for a result file, whose body the caller reads inside the `with` block.

    The budget holds, and transport failures become `Transient`, until the block ends (also for what the caller
    does while it reads). Redirect hops are followed here, each hop's body read only up to `ANSWER_LIMIT`."""
    follow = client.follow_redirects if follow_redirects is None else follow_redirects
    request = client.build_request(method, url, **kwargs)
    with active(budget), transport_errors(call, budget):
        for _hop in range(MAX_REDIRECTS + 1):
            response = client.send(request, follow_redirects=False, stream=True)
            if not (follow and response.next_request is not None):
                break
            try:
                read_limited(response, call)
            finally:
                response.close()
            request = response.next_request
        else:
            raise Transient(f"{call}: more than {MAX_REDIRECTS} redirects", kind="bad_response")
        try:
            yield response
        finally:
            response.close()


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)


def range_headers(resume: Resume | None) -> dict[str, str]:
    """The headers that ask for the rest of a file from `resume.offset` on (none for a whole file)."""
    if resume is None or resume.offset <= 0:
        return {}
    headers = {"Range": f"bytes={resume.offset}-"}
    if resume.validator:
        headers["If-Range"] = resume.validator
    return headers


class HttpBody:
    """A streamed answer's body as a `daemon.remote.ByteStream`; httpx's failures while it is read come out as ours
    (`body_errors`)."""

    def __init__(self, response: httpx.Response, call: str) -> None:
        self._response = response
        self._call = call

    @property
    def length(self) -> int | None:
        """Content-Length; a garbled one is `Transient(kind="bad_response")`."""
        value = self._response.headers.get("content-length")
        if value is None:
            return None
        values = {v.strip() for v in value.split(",")}  # a repeated header arrives joined with commas
        if len(values) != 1:
            raise Transient(f"{self._call}: conflicting Content-Length headers", kind="bad_response")
        (text,) = values
        if not text.isdigit():
            raise Transient(f"{self._call}: invalid Content-Length {text[:40]!r}", kind="bad_response")
        return int(text)

    @property
    def received(self) -> int:
        return self._response.num_bytes_downloaded

    @property
    def start(self) -> int:
        """0 for a whole body; for a 206, the first byte's offset from its Content-Range ("bytes START-END/TOTAL")."""
        if self._response.status_code != 206:
            return 0
        match = _CONTENT_RANGE.fullmatch(self._response.headers.get("content-range", "").strip())
        if match is None:
            raise Transient(f"{self._call}: a partial answer without a usable Content-Range", kind="bad_response")
        return int(match.group(1))

    @property
    def source(self) -> str:
        return str(self._response.url)

    @property
    def validator(self) -> str | None:
        headers = self._response.headers
        value = headers.get("etag") or headers.get("last-modified")
        return str(value) if value else None

    def chunks(self, size: int | None = None) -> Iterator[bytes]:
        coding = self._response.headers.get("content-encoding", "identity").strip().lower()
        identity = coding in ("", "identity")
        pieces = self._response.iter_raw(size) if identity else self._response.iter_bytes(size)
        with body_errors(self._call):
            yield from pieces


@contextlib.contextmanager
def open_body(client: httpx.Client, url: str | httpx.URL, *, call: str, budget: Budget,
              refusal: Callable[[httpx.Response, str], None] | None = None, follow_redirects: bool | None = None,
              **kwargs: Any) -> Iterator[HttpBody]:
    """A streaming GET of a result file (`open_stream`) whose body is handed out only for a 2xx answer; any other
    is raised as our error by `raise_for_stream_status` (with the adapter's own `refusal` rule first)."""
    with open_stream(client, "GET", url, call=call, budget=budget, follow_redirects=follow_redirects,
                     **kwargs) as response:
        raise_for_stream_status(response, call, refusal)
        yield HttpBody(response, call)


def raise_for_stream_status(response: httpx.Response, call: str,
                            refusal: Callable[[httpx.Response, str], None] | None = None) -> None:
    """Return quietly on a 2xx answer whose body is still to be read; else raise our error for it. An error answer's
    body is read (at most `ANSWER_LIMIT`) to quote the server, and given to `refusal` (an adapter's own rules, e.g.
    Cloudgene's "max downloads exceeded") before `raise_for_status`; a 1xx or 3xx left over is a bad response."""
    status = response.status_code
    if 200 <= status < 300:
        return
    if status >= 400:
        quoted = _with_body(response, read_limited(response, call))
        if refusal is not None:
            refusal(quoted, call)
        raise_for_status(quoted, call)
    raise Transient(f"{call}: unexpected HTTP {status}", kind="bad_response")


@contextlib.contextmanager
def body_errors(call: str) -> Iterator[None]:
    """`transport_errors` for reading a body: a connection that ends before the body is complete is `CutOff`, a
    body that cannot be decoded (a broken compressed stream) `Transient(kind="bad_response")`."""
    with transport_errors(call):
        try:
            yield
        except httpx.RemoteProtocolError:
            raise CutOff(f"{call}: connection failed (RemoteProtocolError)") from None
        except httpx.DecodingError:
            raise Transient(f"{call}: the body could not be decoded", kind="bad_response") from None


def read_limited(response: httpx.Response, call: str, limit: int = ANSWER_LIMIT) -> bytes:
    """The body of a streamed answer, decompressed, refused (`Transient`, "bad_response") past `limit` bytes."""
    if response.is_stream_consumed:  # a transport that returns answers already read (tests' mock transports)
        if len(response.content) > limit:
            raise _too_large(call, limit)
        return response.content
    coding = response.headers.get("content-encoding", "identity").strip().lower()
    if coding not in ("", "identity") and coding not in _DECODERS:
        raise Transient(f"{call}: the answer is in an encoding we did not ask for ({coding[:40]})",
                        kind="bad_response")
    decoder = zlib.decompressobj(_DECODERS[coding]) if coding in _DECODERS else None
    chunks: list[bytes] = []
    size = 0

    def add(piece: bytes) -> None:
        nonlocal size
        size += len(piece)
        if size > limit:
            raise _too_large(call, limit)
        chunks.append(piece)

    try:
        for data in response.iter_raw():
            if decoder is None:
                add(data)
                continue
            # A bounded piece at a time: a few KiB of zeros must not become gigabytes in one call.
            while data:
                add(decoder.decompress(data, limit + 1 - size))
                data = decoder.unconsumed_tail
        if decoder is not None:
            add(decoder.flush())
    except zlib.error:
        raise Transient(f"{call}: the compressed answer is corrupt", kind="bad_response") from None
    return b"".join(chunks)


def _too_large(call: str, limit: int) -> Transient:
    size = f"{limit >> 20} MiB" if limit % (1 << 20) == 0 else f"{limit} bytes"
    return Transient(f"{call}: the answer is larger than the {size} an answer may be; refusing it", kind="bad_response")


def _with_body(response: httpx.Response, body: bytes) -> httpx.Response:
    """A closed streamed answer again as a plain response holding `body` (already decompressed)."""
    dropped = ("content-encoding", "content-length", "transfer-encoding")
    headers = [(key, value) for key, value in response.headers.multi_items() if key.lower() not in dropped]
    return httpx.Response(response.status_code, headers=headers, content=body, request=response.request)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None when absent or garbled."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@contextlib.contextmanager
def transport_errors(call: str, budget: Budget | None = None) -> Iterator[None]:
    """Turn httpx's transport failures (timeouts, refused or reset connections, broken framing) into `Transient`;
    a timeout that `budget` (by default the calling thread's, see `open_stream`) caused says which of its rules
    ended the call."""
    try:
        yield
    except httpx.TimeoutException as exc:
        budget = budget or current()
        if budget is not None and budget.reason:
            raise Transient(f"{call}: {budget.reason}", kind="timeout") from None
        raise Transient(f"{call}: timed out ({type(exc).__name__})", kind="timeout") from None
    except httpx.TransportError as exc:
        tls = _tls_failure(exc)
        if tls is not None:  # still kind "connection": nothing reached the server, as for a refused connection
            raise Transient(f"{call}: {tls}", kind="connection") from None
        raise Transient(f"{call}: connection failed ({type(exc).__name__})", kind="connection") from None


def _tls_failure(exc: httpx.TransportError) -> str | None:
    """What went wrong with TLS, when that is why `exc` happened: httpx says only "ConnectError", and an operator
    facing a server with an expired or self-signed certificate, or a proxy that intercepts TLS, must see that it is
    the certificate, not the network. Only for connecting: a TLS error later is a connection cut off."""
    if not isinstance(exc, httpx.ConnectError):
        return None
    try:
        host = exc.request.url.host
    except RuntimeError:  # raised outside a request
        host = "the server"
    cause: BaseException | None = exc
    for _ in range(10):  # httpx wraps httpcore's error, which wraps the ssl one
        if cause is None:
            break
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS certificate verification failed for {host}: {cause.verify_message or cause.reason}"
        if isinstance(cause, ssl.SSLError):
            return f"TLS handshake with {host} failed: {cause.reason or type(cause).__name__}"
        cause = cause.__cause__ or cause.__context__
    return None


@dataclass
class SubmitProgress:
    """How far a submit got, to tell a refusal from an unknown outcome: whether its request went out, and the
    answer, if one came."""

    sent: bool = False
    answer: httpx.Response | None = None

    def may_have_created(self, error: BaseException, refused: Callable[[httpx.Response], bool]) -> bool:
        """False when nothing was sent (no connection could be made), or when the answer is a refusal by the
        adapter's rule `refused`; True otherwise. `error`: what the submit raised (its context, the httpx error)."""
        if not self.sent or isinstance(error.__context__, httpx.ConnectError | httpx.ConnectTimeout):
            return False
        return self.answer is None or not refused(self.answer)


def error_message(response: httpx.Response) -> str:
    """The server's own words: `message` (Cloudgene) or `msg` (WES) from a JSON body, else a short text excerpt."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict):
        for key in ("message", "msg", "error"):
            value = body.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
    text = " ".join(response.text.split())
    if response.headers.get("content-type", "").startswith("text/html") or text.lower().startswith("<"):
        return f"HTTP {response.status_code} (HTML error page)"
    return text[:BODY_EXCERPT] or f"HTTP {response.status_code}"


def in_own_words(response: httpx.Response) -> bool:
    """True when an answer's body is the server's own words: a JSON object with a message (`message`, `msg`,
    `error`), or plain text. False for an empty body, an HTML page (a proxy's, most likely) or other JSON."""
    text = response.text.strip()
    if not text or text.startswith("<") or response.headers.get("content-type", "").startswith("text/html"):
        return False
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return True
    return isinstance(body, dict) and any(
        isinstance(body.get(key), str) and body[key].strip() for key in ("message", "msg", "error")
    )


def refused(response: httpx.Response) -> bool:
    """True when an answer proves the request made nothing on the server: it was turned away before any handler
    ran (401/403), by a rate limiter (429: it answers instead of passing the request on), or refused in the
    server's own words (a 4xx with its message). A 5xx, a proxy's page or a timeout proves nothing."""
    status = response.status_code
    return status in (401, 403, 429) or (400 <= status < 500 and in_own_words(response))


def raise_for_status(response: httpx.Response, call: str) -> None:
    """Raise the error our rules give a non-2xx answer; return quietly on success.

    401/403 block the service (a bad token never fails a job); 429 and 503 pause the whole service; other 5xx are
    transient; the remaining 4xx are permanent with the server's message. Adapters check the service-specific
    answers (Cloudgene's "Only N jobs" 400, download counters) before calling this.
    """
    status = response.status_code
    if status < 400:
        return
    message = error_message(response)
    if status in (401, 403):
        kind = "unauthorized" if status == 401 else "forbidden"
        raise Blocked(f"{call}: HTTP {status}: {message}", kind=kind)
    if status in (429, 503):
        raise Transient(
            f"{call}: HTTP {status}: {message}",
            kind="rate_limited" if status == 429 else "unavailable",
            retry_after=parse_retry_after(response.headers.get("retry-after")),
            service_wide=True,
        )
    if status >= 500:
        raise Transient(
            f"{call}: HTTP {status}: {message}",
            kind="server_error",
            retry_after=parse_retry_after(response.headers.get("retry-after")),
        )
    if status == 408:
        raise Transient(f"{call}: HTTP 408: {message}", kind="timeout")
    raise Permanent(f"{call}: HTTP {status}: {message}", kind=f"http_{status}")


def json_object(response: httpx.Response, call: str) -> dict[str, Any]:
    """The JSON object a successful call returned; a garbled answer (a proxy's HTML page, cut-off JSON) is
    transient: the next try usually gets a real one."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Transient(f"{call}: answer is not JSON ({error_message(response)})", kind="bad_response") from None
    if not isinstance(body, dict):
        raise Transient(f"{call}: expected a JSON object, got {type(body).__name__}", kind="bad_response")
    return body


__all__ = [
    "ANSWER_LIMIT",
    "Budget",
    "ClientPerThread",
    "HttpBody",
    "ServiceError",
    "SubmitProgress",
    "body_errors",
    "error_message",
    "in_own_words",
    "json_object",
    "make_client",
    "open_body",
    "open_stream",
    "parse_retry_after",
    "read_limited",
    "raise_for_status",
    "raise_for_stream_status",
    "send",
    "tls_context",
    "transport_errors",
]
