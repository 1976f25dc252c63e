"""A loopback HTTP server that misbehaves on purpose: answers that drip a byte at a time or never end.

    with HostileServer(lambda request: drip(b"HTTP/1.1 200 OK\r\n...", interval=0.05)) as server:
        adapter = CloudgeneAdapter(ServiceConfig(..., base_url=server.url))
        ...
        assert server.unfinished  # the client hung up before the server had sent everything

`answer(request)` returns an iterable of byte strings, sent in order (each `Pause` is a wait instead). The server
reads each request's head and body (Content-Length) before answering, counts connections (also how many were open
at once), and stops every answer when the `with` block ends. Nothing here sleeps for a thread: the pauses are the
server's own pacing, bounded by `stop`.

Import it as `from support.hostile_server import ...`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

#: The last bytes of a paced body are read at full speed: more than loopback's socket buffers hold (~10 MB), so the
#: client's last write is soon followed by the answer, whatever the pace.
UNPACED_TAIL = 16 << 20


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Pause:
    seconds: float


def drip(data: bytes, interval: float) -> Iterable[bytes | Pause]:
    """`data` one byte at a time, `interval` seconds apart."""
    for index in range(len(data)):
        yield data[index : index + 1]
        yield Pause(interval)


def endless(head: bytes, piece: bytes = b" " * 65536, most: int = 64 << 20) -> Iterable[bytes]:
    """`head`, then `piece` again and again for as long as the client reads, up to `most` bytes (16 times the answer
    cap: a client without the cap gets to the end, so that its test fails rather than hangs)."""
    yield head
    for _ in range(most // len(piece)):
        yield piece


def json_answer(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}"
            "\r\n").encode() + body


#: Cloudgene's app description (`GET /server/apps/{app}`), offering the panels the tests submit with.
CLOUDGENE_APP = json.dumps({"id": "imputationserver2", "params": [{"id": "refpanel", "type": "app_list", "values": [
    {"key": "p", "value": "test panel"}, {"key": "apps@1000g-phase-3-v5@2.0.0", "value": "1000 Genomes"}]}]}).encode()


def with_cloudgene_app(answer: Callable[[Request], Iterable[bytes | Pause]]
                       ) -> Callable[[Request], Iterable[bytes | Pause]]:
    """`answer`, except that the app description a Cloudgene submit checks its panel against is answered at once:
    the misbehaviour under test is the submit's (or the status's), not that of the panel list."""
    def answering(request: Request) -> Iterable[bytes | Pause]:
        if request.method == "GET" and "/server/apps/" in request.path:
            # Said, so that the client opens a new connection for the call under test: this server answers one
            # request per connection.
            return [json_answer(CLOUDGENE_APP, extra="Connection: close\r\n")]
        return answer(request)
    return answering


class HostileServer:
    def __init__(self, answer: Callable[[Request], Iterable[bytes | Pause]], *,
                 read_pace: tuple[int, float] | None = None, tls: ssl.SSLContext | None = None) -> None:
        """`read_pace` = (bytes, seconds): read request bodies that many bytes at a time, pausing between reads.
        `tls`: a server context to speak HTTPS with."""
        self._answer = answer
        self._read_pace = read_pace
        self._tls = tls
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.requests: list[Request] = []
        self.open_now = 0
        self.most_open = 0
        #: "METHOD /path" -> answers to it in progress now, and the most there ever were at once.
        self.answering: collections.Counter[str] = collections.Counter()
        self.most_answering: collections.Counter[str] = collections.Counter()
        #: Answers the client stopped reading before the server had sent them whole.
        self.unfinished = 0
        self.finished = 0

    @property
    def url(self) -> str:
        host, port = self._listener.getsockname()[:2]
        return f"{'https' if self._tls else 'http'}://{host}:{port}"

    def __enter__(self) -> HostileServer:
        thread = threading.Thread(target=self._accept, name="hostile-accept", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=10)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), name="hostile-conn", daemon=True)
            thread.start()
            with self._lock:
                self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self.open_now += 1
            self.most_open = max(self.most_open, self.open_now)
        try:
            if self._tls is not None:
                conn.settimeout(30)
                conn = self._tls.wrap_socket(conn, server_side=True)
            with conn:
                conn.settimeout(30)
                request = _read_request(conn, self._read_pace, self._stop)
                if request is None:
                    return
                key = f"{request.method} {request.path.split('?')[0]}"
                with self._lock:
                    self.requests.append(request)
                    self.answering[key] += 1
                    self.most_answering[key] = max(self.most_answering[key], self.answering[key])
                try:
                    for item in self._answer(request):
                        if isinstance(item, Pause):
                            if self._stop.wait(item.seconds):
                                return
                            continue
                        conn.sendall(item)
                finally:
                    with self._lock:
                        self.answering[key] -= 1
                with self._lock:
                    self.finished += 1
        except OSError:  # the client hung up
            with self._lock:
                self.unfinished += 1
        finally:
            with self._lock:
                self.open_now -= 1


def _read_request(conn: socket.socket, pace: tuple[int, float] | None, stop: threading.Event) -> Request | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    parts, got = [body], len(body)
    while got < length:
        if pace is not None and length - got > UNPACED_TAIL:
            wanted, pieces = min(pace[0], length - got), []
            while wanted > 0 and (piece := conn.recv(min(wanted, 1 << 20))):
                pieces.append(piece)
                wanted -= len(piece)
            chunk = b"".join(pieces)
            if stop.wait(pace[1]):
                return None
        else:
            chunk = conn.recv(65536)
        if not chunk:
            return None
        parts.append(chunk)
        got += len(chunk)
    body = b"".join(parts)
    return Request(method, path, headers, body)
