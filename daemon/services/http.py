"""HTTP plumbing shared by the adapters: a service's clients, and remote answers turned into our errors.

Messages built here name the call ("GET /jobs/{id}/status") but never the full URL: Cloudgene download URLs carry
a secret, and query strings may carry anything.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from daemon import __version__
from daemon.services.errors import Blocked, Permanent, ServiceError, Transient

USER_AGENT = f"imputationd/{__version__}"
#: How much of a non-JSON error body goes into a message (HTML error pages are long and say little).
BODY_EXCERPT = 200


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
) -> httpx.Client:
    """A client for one service (thread-safe; the adapters give each thread its own, see `ClientPerThread`)."""
    return httpx.Client(
        base_url=base_url,
        verify=tls_context(),
        headers={"User-Agent": USER_AGENT, **(headers or {})},
        timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        follow_redirects=True,
    )


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


def send(client: httpx.Client, method: str, url: str | httpx.URL, *,
         follow_redirects: bool | Any = httpx.USE_CLIENT_DEFAULT, **kwargs: Any) -> httpx.Response:
    """`client.request(...)`, with a multipart body (`files=`) sent in pieces of at least 64 KiB (`_Coalesced`)."""
    request = client.build_request(method, url, **kwargs)
    if kwargs.get("files"):
        request.stream = _Coalesced(request.stream)  # type: ignore[arg-type]
    return client.send(request, follow_redirects=follow_redirects)


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
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@contextlib.contextmanager
def transport_errors(call: str) -> Iterator[None]:
    """Turn httpx's transport failures (timeouts, refused or reset connections, broken framing) into `Transient`."""
    try:
        yield
    except httpx.TimeoutException as exc:
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


def error_message(response: httpx.Response) -> str:
    """The server's own words: `message` (Cloudgene) or `msg` (WES) from a JSON body, else a short text excerpt."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict):
        for key in ("message", "msg", "error"):
            if isinstance(body.get(key), str) and body[key].strip():
                return body[key].strip()
    text = " ".join(response.text.split())
    if response.headers.get("content-type", "").startswith("text/html") or text.lower().startswith("<"):
        return f"HTTP {response.status_code} (HTML error page)"
    return text[:BODY_EXCERPT] or f"HTTP {response.status_code}"


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
    "ClientPerThread",
    "ServiceError",
    "error_message",
    "json_object",
    "make_client",
    "parse_retry_after",
    "raise_for_status",
    "send",
    "tls_context",
    "transport_errors",
]
