"""The Flask application: the API blueprint, the dashboard blueprint, problem+json for every error under /api/."""

from __future__ import annotations

import time
from pathlib import Path

import structlog
from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException, InternalServerError, NotFound
from werkzeug.middleware.proxy_fix import ProxyFix

from daemon import __version__
from daemon.api.dashboard import dashboard, not_found, template_globals
from daemon.api.jobs import api
from daemon.api.problems import from_http_exception
from daemon.api.uploads import UploadingRequest
from daemon.config import Config
from daemon.db.store import JobStore

log = structlog.get_logger("daemon.api")


def create_app(config: Config, store: JobStore) -> Flask:
    app = Flask("daemon.api", template_folder=str(Path(__file__).with_name("templates")), static_folder=None)
    app.request_class = UploadingRequest
    app.config.update(
        MAX_CONTENT_LENGTH=config.api.max_upload_mb * 1024 * 1024,
        # Fields other than files (service, panel, ...) are small: a form that holds more is not ours. It also bounds
        # the multipart decoder's buffer, which holds a read chunk (64 KiB) of a file part as it is streamed to disk.
        MAX_FORM_MEMORY_SIZE=1024 * 1024,
        MAX_FORM_PARTS=200,
    )
    app.extensions["imputationd.config"] = config
    app.extensions["imputationd.store"] = store
    app.extensions["imputationd.version"] = __version__
    app.register_blueprint(api)
    app.register_blueprint(dashboard)
    app.context_processor(template_globals)
    if config.api.proxy_hops:
        hops = config.api.proxy_hops
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)  # type: ignore[method-assign]

    @app.before_request
    def started() -> None:
        g.started = time.monotonic()

    @app.after_request
    def logged(response: Response) -> Response:
        # The path only: a query string may carry what a client should not have put there.
        log.debug("api_request", method=request.method, path=request.path, status=response.status_code,
                  owner=g.caller.owner if g.get("caller") else None,
                  ms=round((time.monotonic() - g.get("started", time.monotonic())) * 1000, 1))
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if request.path.startswith("/api/") is False:
            response.headers.setdefault("Content-Security-Policy", "default-src 'self'; style-src 'unsafe-inline'")
            response.headers.setdefault("X-Frame-Options", "DENY")
            # A dashboard page shows an owner's jobs: kept in no cache, so that Back after logging out asks the
            # server again (and lands on the login form) rather than showing the owner's pages from the cache.
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response | tuple[str, int]:
        if request.path.startswith("/api/"):
            return from_http_exception(exc)
        if isinstance(exc, NotFound):
            return not_found(exc)
        return exc.get_response()  # type: ignore[return-value]

    @app.errorhandler(Exception)
    def crashed(exc: Exception) -> Response | tuple[str, int]:
        log.exception("api_request_failed", method=request.method, path=request.path, error_kind="internal")
        return http_error(InternalServerError("the request failed; the daemon's log says why"))

    return app
