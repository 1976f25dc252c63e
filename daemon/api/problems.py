"""Errors as `application/problem+json` (RFC 9457): `type`, `title`, `status`, `detail`, and what else helps the
client (`errors`: each problem of a refused submission)."""

from __future__ import annotations

import json
from typing import Any

from flask import Response
from werkzeug.exceptions import HTTPException

PROBLEM_JSON = "application/problem+json"


class Problem(HTTPException):
    """Raised by a handler; answered as problem+json."""

    def __init__(self, status: int, detail: str, *, title: str | None = None, **extra: Any) -> None:
        super().__init__(description=detail)
        self.code = status
        self.title = title
        self.extra = extra


def problem_response(status: int, title: str, detail: str, **extra: Any) -> Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    response = Response(json.dumps(body), status=status, mimetype=PROBLEM_JSON)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="imputationd"'
    return response


def from_http_exception(exc: HTTPException) -> Response:
    status = exc.code or 500
    title = getattr(exc, "title", None) or exc.name
    extra = getattr(exc, "extra", {})
    response = problem_response(status, title, exc.description or title, **extra)
    for name, value in exc.get_headers():  # e.g. Allow on a 405
        if name.lower() not in ("content-type", "content-length"):
            response.headers[name] = value
    return response
