"""`/api/v1`: jobs (create, list, one, its events, its files, cancel, retry) and services, as DESIGN.md fixes them."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
import uuid
from pathlib import Path
from typing import Any

import structlog
from flask import Blueprint, Response, current_app, request, send_file
from werkzeug.exceptions import RequestEntityTooLarge

from daemon.api.auth import owner_filter, require, sees, store
from daemon.api.openapi import document
from daemon.api.problems import Problem, from_http_exception
from daemon.api.uploads import UPLOAD_DIR, discard, new_upload_dir, uploaded_paths
from daemon.config import Config
from daemon.crypto import SecretKeyError
from daemon.db.admin import event_snapshot, group_state, job_detail
from daemon.db.api_tokens import Caller
from daemon.db.idempotency import Answer, KeyInUse
from daemon.db.models import Job
from daemon.db.transitions import JobNotFound
from daemon.owners import owner_problem
from daemon.states import TERMINAL, JobState, OutputState
from daemon.submission import Submission, SubmissionError, submit
from daemon.text import json_default

log = structlog.get_logger("daemon.api")
api = Blueprint("api", __name__, url_prefix="/api/v1")

MAX_LIMIT = 500
_OPTIONAL_FIELDS = ("population", "phasing", "r2_filter", "mode", "name", "password")


def config() -> Config:
    result: Config = current_app.extensions["imputationd.config"]
    return result


def as_json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data, default=json_default), status=status, mimetype="application/json")


# ------------------------------------------------------------------ creating jobs


@api.post("/jobs")
def create_job() -> Response:
    caller = require("submit")
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 1 <= len(key) <= 255:
        raise Problem(422, "Idempotency-Key must be 1 to 255 characters")
    if key is None:
        return _create(caller)
    try:
        kept = store().idempotency.claim(caller.owner, key)
    except KeyInUse:
        raise Problem(409, "a request with this Idempotency-Key is still being answered; retry later") from None
    if kept is not None:
        return Response(kept.body, status=kept.status, mimetype=_mimetype(kept.status))
    try:
        response = _create(caller)
    except Problem as problem:
        if problem.code is not None and problem.code < 500 and problem.code != 413:
            response = from_http_exception(problem)
        else:
            store().idempotency.forget(caller.owner, key)
            raise
    except Exception:
        store().idempotency.forget(caller.owner, key)
        raise
    store().idempotency.record(caller.owner, key, Answer(response.status_code, response.get_data(as_text=True)))
    return response


def _create(caller: Caller) -> Response:
    cfg = config()
    folder = new_upload_dir(cfg.storage.uploads_dir)
    request.environ[UPLOAD_DIR] = str(folder)
    try:
        try:
            form, files = request.form, uploaded_paths(request)
        except RequestEntityTooLarge:
            raise Problem(413, f"the upload is larger than api.max_upload_mb ({cfg.api.max_upload_mb} MB)") from None
        owner = form.get("owner") or caller.owner
        if owner != caller.owner and not caller.admin:
            raise Problem(403, "only an admin token submits for another owner")
        problem = owner_problem(owner)
        if problem is not None:
            raise Problem(422, f"owner: {problem}")
        if not files:
            raise Problem(422, "file: send at least one *.vcf.gz file as a `file` part")
        missing = [f for f in ("panel", "build") if not form.get(f)]
        if missing or not form.getlist("service"):
            raise Problem(422, "missing fields: " + ", ".join(["service", *missing] if not form.getlist("service")
                                                              else missing))
        submission = Submission(
            services=form.getlist("service"), panel=form["panel"], build=form["build"], files=files, owner=owner,
            **{name: form.get(name) or None for name in _OPTIONAL_FIELDS},
        )
        try:
            jobs = submit(cfg, store(), submission)
        except SubmissionError as exc:
            problems = [_field_names(p) for p in exc.problems]
            raise Problem(422, "; ".join(problems), title="The submission was refused", errors=problems) from None
        except SecretKeyError as exc:
            raise Problem(500, f"the key that seals job passwords cannot be read: {exc}") from None
    except BaseException:
        discard(folder)
        raise
    log.info("api_job_created", owner=owner, group_id=str(jobs[0].group_id), services=[j.service for j in jobs],
             files=len(files))
    return as_json(_detail_of(jobs[0].group_id, caller), status=201)


def _detail_of(group_id: uuid.UUID, caller: Caller) -> dict[str, Any]:
    """One job, or a group with its jobs, as `show --json` prints it."""
    jobs = store().admin.group(group_id)
    if len(jobs) == 1:
        return job_detail(jobs[0])
    return {"group_id": group_id, "state": group_state([j.state.value for j in jobs]),
            "jobs": [job_detail(j) for j in jobs if sees(caller, j)]}


def _field_names(problem: str) -> str:
    """The submission's problems name CLI arguments (`--r2-filter`); the API's fields are `r2_filter`."""
    problem = re.sub(r"--([a-z0-9-]+)", lambda m: m[1].replace("-", "_"), problem)
    return re.sub(r"^FILE\b", "file", problem)


def _mimetype(status: int) -> str:
    return "application/json" if status < 400 else "application/problem+json"


# ------------------------------------------------------------------ reading jobs


@api.get("/jobs")
def list_jobs() -> Response:
    caller = require("read")
    args = request.args
    owner = owner_filter(caller, args.get("owner"))
    states = None
    if args.get("state"):
        try:
            states = [JobState(s) for s in args["state"].split(",")]
        except ValueError:
            raise Problem(422, f"state: must be among {', '.join(s.value for s in JobState)}") from None
    try:
        limit = int(args.get("limit", 100))
    except ValueError:
        raise Problem(422, "limit: must be a whole number") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise Problem(422, f"limit: must be from 1 to {MAX_LIMIT}")
    group = _uuid_or_422(args["group"], "group") if args.get("group") else None
    before = decode_cursor(args["cursor"]) if args.get("cursor") else None
    jobs = store().admin.jobs_page(states=states, service=args.get("service") or None, owner=owner, group=group,
                                   before=before, limit=limit + 1)
    page, more = jobs[:limit], len(jobs) > limit
    return as_json({"jobs": page, "next_cursor": encode_cursor(page[-1]) if more else None})


@api.get("/jobs/<job_id>")
def get_job(job_id: str) -> Response:
    caller = require("read")
    return as_json(job_detail(_visible_job(caller, job_id, with_events=True)))


@api.get("/jobs/<job_id>/events")
def job_events(job_id: str) -> Response:
    caller = require("read")
    job = _visible_job(caller, job_id)
    after = request.args.get("after") or "0"
    if not after.isdigit():
        raise Problem(422, "after: must be a cursor from an earlier answer")
    events = store().admin.events_after(job.id, int(after), limit=MAX_LIMIT)
    return as_json({"events": [event_snapshot(e) for e in events],
                    "next_cursor": str(events[-1].id) if events else after})


@api.get("/jobs/<job_id>/files/<path:name>")
def job_file(job_id: str, name: str) -> Response:
    caller = require("read")
    job = _visible_job(caller, job_id)
    output = next((o for o in job.outputs if o.name == name and o.state is OutputState.VERIFIED), None)
    path = _inside_result_dir(job, output.local_path if output else None)
    if output is None or path is None:
        raise Problem(404, f"job {job.id} has no downloaded file {name!r}")
    return send_file(path, conditional=True, etag=output.sha256 or False, download_name=Path(name).name,
                     max_age=0)


def _inside_result_dir(job: Job, local_path: str | None) -> Path | None:
    """The file at `local_path` if it is a regular file inside the job's result folder once every symlink and `..`
    is resolved; None otherwise, whatever the database says."""
    if local_path is None or job.result_dir is None:
        return None
    root = Path(job.result_dir).resolve()
    path = Path(local_path).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path


# ------------------------------------------------------------------ acting on jobs


@api.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str) -> Response:
    caller = require("submit")
    job = _visible_job(caller, job_id)
    if job.state in TERMINAL:
        raise Problem(409, f"the job is {job.state.value}; only an unfinished job can be cancelled")
    state = store().admin.request_cancel(job.id, reason=f"cancelled through the API ({caller.owner})")
    if state in (JobState.COMPLETED, JobState.FAILED):
        raise Problem(409, f"the job is {state.value}; only an unfinished job can be cancelled")
    log.info("api_job_cancel", job_id=str(job.id), owner=caller.owner, state=state.value)
    return as_json(job_detail(store().admin.get(job.id, with_events=True)), status=202)


@api.post("/jobs/<job_id>/retry")
def retry_job(job_id: str) -> Response:
    caller = require("submit")
    job = _visible_job(caller, job_id)
    try:
        store().admin.retry(job.id)
    except ValueError as exc:
        raise Problem(409, str(exc)) from None
    log.info("api_job_retry", job_id=str(job.id), owner=caller.owner)
    return as_json(job_detail(store().admin.get(job.id, with_events=True)))


# ------------------------------------------------------------------ services and the document


@api.get("/services")
def services() -> Response:
    caller = require("read")
    owner = owner_filter(caller, request.args.get("owner")) or caller.owner
    return as_json({"services": service_health(config(), owner)})


def service_health(cfg: Config, owner: str) -> list[dict[str, Any]]:
    """Each configured service as `owner` sees it: paused (everyone), blocked (this owner), their token's expiry
    and their jobs by state."""
    statuses = store().services.service_statuses()
    of_owner = store().services.owner_statuses()
    counts = store().admin.counts_by_owner()
    now = dt.datetime.now(dt.UTC)
    result = []
    for name, service in sorted(cfg.services.items()):
        status, mine = statuses.get(name), of_owner.get((name, owner))
        paused = status is not None and status.paused_until is not None and status.paused_until > now
        blocked = mine.blocked_reason if mine else None
        result.append({
            "name": name, "type": service.type, "owner": owner,
            "health": "paused" if paused else "blocked" if blocked else "ok",
            "paused_until": status.paused_until if paused and status else None,
            "pause_reason": status.pause_reason if paused and status else None,
            "blocked": blocked, "token_expires": mine.token_expires_at if mine else None,
            "jobs": counts.get((name, owner), {}),
        })
    return result


@api.get("/openapi.json")
def openapi() -> Response:
    return as_json(document())


# ------------------------------------------------------------------ helpers


def _visible_job(caller: Caller, job_id: str, *, with_events: bool = False) -> Job:
    """The job if the caller may see it; 404 alike for no such job and another owner's."""
    try:
        job = store().admin.get(uuid.UUID(job_id), with_events=with_events)
    except (ValueError, JobNotFound):
        job = None
    if job is None or not sees(caller, job):
        raise Problem(404, f"no job {job_id}")
    return job


def _uuid_or_422(text: str, field: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise Problem(422, f"{field}: not an id") from None


def encode_cursor(job: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(f"{job['created_at'].isoformat()}|{job['id']}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, uuid.UUID]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, _, job_id = text.partition("|")
        when = dt.datetime.fromisoformat(at)
        if when.tzinfo is None:
            raise ValueError("naive")
        return when, uuid.UUID(job_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise Problem(422, "cursor: not a cursor from an earlier answer") from None
