"""The API's WSGI server: cheroot (CherryPy's server, pure Python), a fixed pool of threads, no forking and no event
loop, in the daemon's process or alone (`imputationd api`). Its threads take requests from one listening socket; a
request (an upload, a download) holds its thread while it lasts, so `api.threads` bounds how many run at once."""

from __future__ import annotations

import threading

import structlog
from cheroot import wsgi
from flask import Flask

log = structlog.get_logger("daemon.api")


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class ApiServer:
    def __init__(self, listen: str, app: Flask, *, threads: int) -> None:
        self._server = wsgi.Server(split_listen(listen), app, numthreads=threads, server_name="imputationd",
                                   timeout=60, shutdown_timeout=5)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.bind_addr[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Bind now (an address in use fails here, in the caller), then serve on a thread of its own."""
        self._server.prepare()
        self._thread = threading.Thread(target=self._server.serve, name="imputationd-api", daemon=True)
        self._thread.start()
        host, port = self.address
        log.info("api_listening", address=f"{host}:{port}")

    def serve_forever(self) -> None:
        self._server.prepare()
        host, port = self.address
        log.info("api_listening", address=f"{host}:{port}")
        self._server.serve()

    def close(self) -> None:
        self._server.stop()
        if self._thread is not None:
            self._thread.join(10)
