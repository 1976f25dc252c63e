"""The read-only dashboard: a login form that takes an API token and keeps it in a Secure, HttpOnly, SameSite=Strict
cookie; then the jobs (filters, counts by state, refreshing by itself), one job's timeline (history, files, QC) and
the services with their health for the owner. Server-rendered (Jinja2, autoescaped), no script, no build step."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any
from urllib.parse import urlencode, urlsplit

from flask import Blueprint, Response, current_app, g, redirect, render_template, request, url_for
from werkzeug.exceptions import NotFound
from werkzeug.wrappers import Response as BaseResponse

from daemon.api.auth import COOKIE, caller_from, sees, store
from daemon.api.jobs import config, decode_cursor, encode_cursor, service_health
from daemon.api.problems import Problem
from daemon.config import is_loopback
from daemon.db.api_tokens import Caller
from daemon.db.transitions import JobNotFound
from daemon.states import TERMINAL, JobState
from daemon.text import qc_summary

dashboard = Blueprint("dashboard", __name__)

#: Seconds between two reloads of the jobs page.
REFRESH_SECONDS = 10
#: Jobs on one page of the jobs list; older ones are a link away.
PAGE = 200


def _caller() -> Caller | None:
    if "caller" not in g:
        g.caller = caller_from(request.cookies.get(COOKIE), via="cookie")
    caller: Caller | None = g.caller
    return caller


def _login_first() -> BaseResponse:
    # The query string goes along: a link to the failed jobs (`/?state=failed`) lands on them once logged in.
    return redirect(url_for("dashboard.login", next=request.full_path if request.query_string else request.path))


@dashboard.get("/login")
def login() -> str:
    return render_template("login.html", error=None)


@dashboard.post("/login")
def login_submit() -> BaseResponse | tuple[str, int]:
    token = (request.form.get("token") or "").strip()
    if caller_from(token, via="login") is None:
        return render_template("login.html", error="That token is not valid."), 401
    if config().api.secure_cookie and not _secure_context():
        # The browser would keep a Secure cookie and never send it back over this plain http: the login would
        # bounce back here without a word.
        return render_template("login.html", error=(
            "This dashboard's login cookie is sent over HTTPS only (api.secure_cookie): open it through https://, "
            "or have the operator set api.secure_cookie: false on a trusted network.")), 400
    target = request.args.get("next") or "/"
    if not target.startswith("/") or target.startswith("//"):  # never off to another site
        target = "/"
    response = redirect(target)
    response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/",
                        secure=config().api.secure_cookie)
    return response


@dashboard.post("/logout")
def logout() -> BaseResponse:
    response = redirect(url_for("dashboard.login"))
    response.delete_cookie(COOKIE, path="/")
    # Chrome keeps even no-store pages in its back/forward cache unless told otherwise: Back after logging out must
    # not show the owner's pages to whoever uses the browser next. (Not "cookies": that clears the whole site's.)
    response.headers["Clear-Site-Data"] = '"cache"'
    return response


@dashboard.get("/")
def jobs() -> BaseResponse | str:
    caller = _caller()
    if caller is None:
        return _login_first()
    args = request.args
    owner = (args.get("owner") or None) if caller.admin else caller.owner
    state = args.get("state") or None
    states = [JobState(state)] if state in {s.value for s in JobState} else None
    service = args.get("service") or None
    try:
        before = decode_cursor(args["cursor"]) if args.get("cursor") else None
    except Problem:
        before = None  # a mangled link still shows the newest jobs
    shown = store().admin.jobs_page(states=states, service=service, owner=owner, before=before, limit=PAGE + 1)
    counts: Counter[str] = Counter()
    for (svc, who), by_state in store().admin.counts_by_owner().items():
        if (owner is None or who == owner) and (service is None or svc == service):
            counts.update(by_state)
    filters = {"state": state or "", "service": service or "", "owner": owner or ""}
    kept = {key: value for key, value in filters.items() if value}
    older = urlencode({**kept, "cursor": encode_cursor(shown[PAGE - 1])}) if len(shown) > PAGE else None
    return render_template(
        "jobs.html", caller=caller, jobs=shown[:PAGE], counts=counts, states=[s.value for s in JobState],
        services=sorted(config().services), filters=filters, refresh=REFRESH_SECONDS,
        active=sum(n for s, n in counts.items() if JobState(s) not in TERMINAL),
        matching=counts[state] if state else sum(counts.values()), older=older,
        newest=urlencode(kept) if before is not None else None)


def _secure_context() -> bool:
    """Whether a browser sends a Secure cookie back to this page: over https (here, or at a TLS proxy that says so;
    used only to choose a message, never to decide who is logged in), or from a loopback host, which browsers
    treat as secure."""
    if request.scheme == "https" or request.headers.get("X-Forwarded-Proto", "").lower() == "https":
        return True
    return is_loopback(urlsplit(f"//{request.host}").hostname or "")


@dashboard.get("/jobs/<job_id>")
def job(job_id: str) -> BaseResponse | str:
    caller = _caller()
    if caller is None:
        return _login_first()
    try:
        found = store().admin.get(uuid.UUID(job_id), with_events=True)
    except (ValueError, JobNotFound):
        raise NotFound(f"no job {job_id}") from None
    if not sees(caller, found):
        raise NotFound(f"no job {job_id}")
    # A finished job changes no more: its page stops reloading itself.
    return render_template("job.html", caller=caller, job=found, qc=qc_summary(found.qc) if found.qc else None,
                           refresh=None if found.state in TERMINAL else REFRESH_SECONDS)


@dashboard.get("/services")
def services() -> BaseResponse | str:
    caller = _caller()
    if caller is None:
        return _login_first()
    owner = (request.args.get("owner") or caller.owner) if caller.admin else caller.owner
    # An admin may look at any owner's health: the owners who have jobs are offered.
    owners = sorted({who for _, who in store().admin.counts_by_owner()} | {owner, caller.owner}) if caller.admin else []
    return render_template("services.html", caller=caller, owner=owner, owners=owners,
                           services=service_health(config(), owner))


def template_globals() -> dict[str, Any]:
    return {"version": current_app.extensions.get("imputationd.version", "")}


def not_found(error: NotFound) -> tuple[str, int] | Response:
    return render_template("not_found.html", message=error.description, caller=g.get("caller")), 404
