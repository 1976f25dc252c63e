"""Who is calling: a bearer token (the API) or the dashboard's login cookie holding one, checked against the stored
digests. A failed attempt is logged with where it came from and what it asked for, never with the token."""

from __future__ import annotations

import structlog
from flask import current_app, g, request

from daemon.api.problems import Problem
from daemon.db.api_tokens import Caller
from daemon.db.models import Job
from daemon.db.store import JobStore

log = structlog.get_logger("daemon.api")

#: The dashboard's login cookie: the token itself, HttpOnly, SameSite=Strict, Secure unless configured otherwise.
COOKIE = "imputationd_token"


def store() -> JobStore:
    result: JobStore = current_app.extensions["imputationd.store"]
    return result


def caller_from(token: str | None, *, via: str) -> Caller | None:
    """The caller a token speaks for; None (logged) when there is a token and it is no good."""
    if not token:
        return None
    caller = store().api_tokens.authenticate(token)
    if caller is None:
        log.warning("api_auth_failed", via=via, remote=request.remote_addr, method=request.method, path=request.path)
    return caller


def require(scope: str = "read") -> Caller:
    """The API caller, with at least `scope`: 401 without a valid token, 403 without the scope."""
    caller: Caller | None = g.get("caller")
    if caller is None:
        header = request.headers.get("Authorization", "")
        kind, _, token = header.partition(" ")
        if not header and request.method in ("GET", "HEAD") and request.cookies.get(COOKIE):
            # The dashboard's links (a result file) carry its login cookie; it never changes anything (SameSite
            # keeps other sites from sending it, and nothing but GET accepts it).
            kind, token = "bearer", request.cookies[COOKIE]
        elif not header:
            raise Problem(401, "this request needs a token: send Authorization: Bearer <token>")
        if kind.lower() != "bearer" or not token.strip():
            raise Problem(401, "the Authorization header must be: Bearer <token>")
        caller = caller_from(token.strip(), via="bearer")
        if caller is None:
            raise Problem(401, "the token is not valid (unknown, malformed or revoked)")
        g.caller = caller
    if scope == "submit" and not caller.may_submit:
        raise Problem(403, f"a {caller.scope} token cannot do this; it needs the submit or admin scope")
    if scope == "admin" and not caller.admin:
        raise Problem(403, f"a {caller.scope} token cannot do this; it needs the admin scope")
    return caller


def sees(caller: Caller, job: Job) -> bool:
    """Whether the caller may know that `job` exists: theirs, or any with the admin scope."""
    return caller.admin or job.owner == caller.owner


def owner_filter(caller: Caller, asked: str | None) -> str | None:
    """The owner a listing is limited to: the caller's own, or (admin) whichever was asked for, or none."""
    if caller.admin:
        return asked or None
    if asked and asked != caller.owner:
        raise Problem(403, "a token sees only its own owner's jobs; the admin scope sees every owner's")
    return caller.owner
