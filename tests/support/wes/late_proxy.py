"""A reverse proxy for tests in front of a real WES server (sapporo) that loses the answer to the first
`POST …/runs`, and can list runs the way other WES servers do.

`lost="before"`: the first run submission is answered at once with the proxy's 504 page, and reaches the server
only `delay` seconds later (a proxy whose upstream is slow to accept the upload; the run then appears on the
server long after the client was told it failed). `lost="after"`: the first submission reaches the server at once
and the server's answer is held `delay` seconds before it is relayed (a server slow to answer: the client gives up
waiting while the run already exists).

`lost=None`: every submission is relayed as it is.

`ignore_cancel=True`: `POST …/runs/{id}/cancel` is acknowledged (200, `{"run_id": id}`) and never reaches the server:
the run goes on, as on servers that accept a cancel and ignore it.

`publish_checksums="right"` (or `"wrong"`): a run log's outputs (sapporo's `{file_name, file_url}` entries) are
published as CWL `File` objects, each with its `size` and a `sha1$…` checksum, the file's own (or one it does not
have), as servers on a CWL engine publish them. `"wrong_size"`: the right checksum and a size one byte too many.

`local_outputs=f`: a run log's outputs are published as `file://` paths, `f(run_id, file_name)`, as a server on a
shared file system publishes them; with `publish_checksums` too, as CWL `File` objects whose `location` is that path.

`wes03_listing=True`: `GET …/runs` answers as the GA4GH reference server `wes-service` does: every run under
`workflows` (the WES 0.3 name), unpaged, in no fixed order, each entry only `run_id` and `state` (no tags).

Every other request is relayed as it is.

    with LateProxy(sapporo.origin, delay=15) as proxy:
        config = sapporo.service_config(base_url=proxy.origin)
        ...
        proxy.wait_for_late_submit(30)  # the held-back submission has reached the server
        proxy.forwarded_submits  # how many POST …/runs reached the server
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal
from urllib.parse import urljoin, urlsplit

import httpx

GATEWAY_TIMEOUT = (b"<html><head><title>504 Gateway Time-out</title></head><body><center><h1>504 Gateway Time-out"
                   b"</h1></center><hr><center>nginx</center></body></html>")
#: Hop-by-hop and length headers the proxy sets itself.
_NOT_RELAYED = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host",
                          "content-encoding"})


class LateProxy:
    def __init__(self, upstream: str, *, delay: float = 0.0, lost: Literal["before", "after"] | None = "before",
                 wes03_listing: bool = False, ignore_cancel: bool = False,
                 publish_checksums: Literal["right", "wrong", "wrong_size"] | None = None,
                 local_outputs: Callable[[str, str], Path] | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.delay = delay
        self.lost = lost
        self.wes03_listing = wes03_listing
        self.ignore_cancel = ignore_cancel
        self.publish_checksums = publish_checksums
        self.local_outputs = local_outputs
        #: Run ids whose cancel the proxy acknowledged without relaying it.
        self.ignored_cancels: list[str] = []
        self.forwarded_submits = 0
        self._held_back = False
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._late: list[threading.Thread] = []
        self._late_done = threading.Event()
        self._client = httpx.Client(timeout=60)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def do_GET(self) -> None:
                proxy._handle(self)

            def do_POST(self) -> None:
                proxy._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> LateProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        for late in self._late:
            late.join(timeout=30)
        self._server.shutdown()
        self._server.server_close()
        self._client.close()

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _NOT_RELAYED}
        request = (handler.command, self.upstream + handler.path, headers, body)
        runs = urlsplit(handler.path).path.rstrip("/").endswith("/runs")
        submit = handler.command == "POST" and runs
        parts = urlsplit(handler.path).path.rstrip("/").split("/")
        if self.ignore_cancel and handler.command == "POST" and parts[-1] == "cancel" and len(parts) >= 3:
            self.ignored_cancels.append(parts[-2])
            body = json.dumps({"run_id": parts[-2]}).encode()
            self._answer(handler, 200, [("Content-Type", "application/json")], body)
            return
        with self._lock:
            hold = submit and self.lost is not None and not self._held_back
            self._held_back = self._held_back or hold
            if submit and (not hold or self.lost == "after"):
                self.forwarded_submits += 1
        if handler.command == "GET" and runs and self.wes03_listing:
            self._list_as_wes03(handler, headers)
            return
        if hold and self.lost == "after":
            method, url, headers, body = request
            answer = self._client.request(method, url, headers=headers, content=body)
            self._late_done.set()
            self._stopping.wait(self.delay)
            relayed = [(k, v) for k, v in answer.headers.items() if k.lower() not in _NOT_RELAYED]
            self._answer(handler, answer.status_code, relayed, answer.content)
            return
        if hold:
            late = threading.Thread(target=self._forward_late, args=(request,), daemon=True)
            self._late.append(late)
            late.start()
            self._answer(handler, 504, [("Content-Type", "text/html")], GATEWAY_TIMEOUT)
            return
        method, url, headers, body = request
        answer = self._client.request(method, url, headers=headers, content=body)
        relayed = [(k, v) for k, v in answer.headers.items() if k.lower() not in _NOT_RELAYED]
        content = answer.content
        run_log = handler.command == "GET" and answer.status_code == 200 and len(parts) >= 2 and parts[-2] == "runs"
        if run_log and self.publish_checksums:
            content = self._with_checksums(answer.json(), headers, run_id=parts[-1])
        elif run_log and self.local_outputs is not None:
            log = answer.json()
            log["outputs"] = [{"file_name": entry["file_name"],
                               "file_url": self.local_outputs(parts[-1], entry["file_name"]).as_uri()}
                              for entry in log.get("outputs") or []]
            content = json.dumps(log).encode()
        self._answer(handler, answer.status_code, relayed, content)

    def _with_checksums(self, run_log: dict, headers: dict[str, str], run_id: str) -> bytes:
        files = []
        for entry in run_log.get("outputs") or []:
            data = self._client.get(urljoin(self.upstream + "/", entry["file_url"]), headers=headers).content
            digest = "0" * 40 if self.publish_checksums == "wrong" else hashlib.sha1(data).hexdigest()
            size = len(data) + (self.publish_checksums == "wrong_size")
            location = (self.local_outputs(run_id, entry["file_name"]).as_uri() if self.local_outputs is not None
                        else entry["file_url"])
            files.append({"class": "File", "basename": entry["file_name"], "location": location,
                          "size": size, "checksum": f"sha1${digest}"})
        run_log["outputs"] = {f"out{index}": file for index, file in enumerate(files)}
        return json.dumps(run_log).encode()

    def _list_as_wes03(self, handler: BaseHTTPRequestHandler, headers: dict[str, str]) -> None:
        path = urlsplit(handler.path).path
        entries: list[dict[str, str]] = []
        params = {"page_size": 1000}
        while True:  # every page of the upstream's list, relayed as one
            answer = self._client.get(self.upstream + path, params=params, headers=headers)
            if answer.status_code != 200:
                self._answer(handler, answer.status_code, [("Content-Type", "application/json")], answer.content)
                return
            page = answer.json()
            entries += [{"run_id": run["run_id"], "state": run["state"]} for run in page["runs"]]
            if not page.get("next_page_token"):
                break
            params = {"page_size": 1000, "page_token": page["next_page_token"]}
        random.shuffle(entries)
        body = json.dumps({"workflows": entries}).encode()
        self._answer(handler, 200, [("Content-Type", "application/json")], body)

    def wait_for_late_submit(self, timeout: float) -> None:
        """Until the held-back submission has been answered by the server (AssertionError after `timeout`)."""
        assert self._late_done.wait(timeout), f"the held-back submit did not reach the server in {timeout:g} s"

    def _forward_late(self, request: tuple[str, str, dict[str, str], bytes]) -> None:
        if self._stopping.wait(self.delay):
            return
        method, url, headers, body = request
        with self._lock:
            self.forwarded_submits += 1
        try:
            self._client.request(method, url, headers=headers, content=body)
        finally:
            self._late_done.set()

    @staticmethod
    def _answer(handler: BaseHTTPRequestHandler, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        handler.send_response(status)
        for key, value in headers:
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
