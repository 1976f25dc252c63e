"""The Cloudgene 3 adapter (Michigan, TOPMed, H3Africa/AfriGen imputation servers).

Follows /reference/cloudgene-api.md. Decisions worth knowing before changing anything here:

- The token is read through a callable on every request, so an operator fixing the token file unblocks the service
  without a restart. It travels only in the `X-Auth-Token` header of API calls (and in the form of
  `POST /tokens/verify`); downloads never carry it (the file hash in the URL is the capability).
- API calls never follow redirects: httpx keeps custom headers on a cross-origin redirect, so following one would
  hand the token to whatever host the redirect names. A redirect is a misconfigured `base_url` -> `Blocked`.
  Downloads do follow redirects (some deployments answer 301 to a presigned URL) since they carry no token.
- Messages name the call ("GET /jobs/job-1/status") or the file ("download of chr_1.zip"), never a full download
  URL. What the server says is quoted as it is: the boundary every adapter sits behind (`daemon.services.scrubbing`)
  scrubs the token, the job's password and the download hashes out of it.
- A malformed answer (HTML where JSON was due, a list instead of an object, a missing or mistyped key) is
  `Transient(kind="bad_response")` naming the call: proxies garble answers and the next try usually gets a real one.
- A 404 on an API call counts as Cloudgene's answer ("Job X not found.", "Application 'X' not found.") only when it
  carries a message; an empty or HTML 404, or Micronaut's generic "no such route" object, means the endpoint is not
  there (wrong `base_url`) and blocks the service instead of failing every job that happens to be polled.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import html
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeGuard
from urllib.parse import quote, urlsplit

import httpx

from daemon.config import SUBMIT_ANSWER_TIMEOUT, ServiceConfig
from daemon.remote import (
    ByteStream,
    QcReport,
    RemoteJob,
    RemoteOutput,
    RemoteStatus,
    Resume,
    ServiceCheck,
    SubmitRequest,
)
from daemon.services.deadlines import API_DEADLINE_FACTOR, Budget
from daemon.services.errors import Blocked, JobLimitReached, Permanent, ServiceError, Transient
from daemon.services.http import (
    ClientPerThread,
    SubmitProgress,
    error_message,
    in_own_words,
    json_object,
    make_client,
    open_body,
    raise_for_status,
    range_headers,
    refused,
    send,
)
from daemon.states import RemoteKind, cloudgene_kind

TOKEN_HEADER = "X-Auth-Token"
#: Cloudgene's fixed page size for `GET /jobs?page=N`.
PAGE_SIZE = 15
#: Read timeout for the submit answer (see `SUBMIT_ANSWER_TIMEOUT`): the configured per-call timeout would cut off a
#: healthy submit of a few GB.
SUBMIT_READ_TIMEOUT = SUBMIT_ANSWER_TIMEOUT
#: Most characters of a progress line and of a failure reason.
PROGRESS_LIMIT = 200
MESSAGE_LIMIT = 2000

LOG_ERROR = 1  # logMessages[].type: 0 OK, 1 ERROR, 2 WARNING, 3 RUNNING
#: Cloudgene's state 9 (FAILED_NOTIFIED) is also where it moves a cancelled job: its log then says so.
FAILED_NOTIFIED = 9
_CANCELLED_WORDS = re.compile(r"\bcancell?ed\b", re.IGNORECASE)
#: imputationserver2's steps that check the input: a failure there is the input's (another submit fails the same).
QC_STEPS = frozenset({"Input Validation", "Quality Control"})
LOG_WARNING = 2
#: The lines of imputationserver2's "Quality Control" statistics that a QcReport holds, by their label.
_QC_FIGURES = {
    "reference overlap": "reference_overlap",
    "match": "matched",
    "allele switch": "allele_switches",
    "strand flip": "strand_flips",
    "strand flip and allele switch": "strand_flips_and_allele_switches",
    "excluded sites in total": "snps_excluded",
    "remaining sites in total": "snps_remaining",
    "chunks excluded": "chunks_excluded",
    "excluded chunks": "chunks_excluded",
}
_QC_LINE = re.compile(r"^\s*([A-Za-z][A-Za-z ,/<>%0-9]*?)\s*:\s*([0-9][0-9,]*(?:\.[0-9]+)?)\s*%?\s*$")
#: Most warnings a QC report keeps.
QC_WARNINGS = 20
#: How long a presigned URL that served part of a result is used to resume it (they are valid for an hour).
PRESIGNED_TRUST = 50 * 60.0
#: How long the app's panel list (`GET /server/apps/{app}`) is trusted before a submit asks again.
PANELS_TTL = 3600.0

_JOB_LIMIT = re.compile(r"Only\s+(\d+)\s+jobs?\s+per\s+user", re.IGNORECASE)
_DOWNLOADS_EXHAUSTED = re.compile(r"max(imum)?\s+downloads?\s+exceeded", re.IGNORECASE)
_TAG = re.compile(r"<[^>]*>")
#: What may go into an HTTP header value unchanged (a JWT is base64url with dots).
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")
#: Characters Cloudgene's `StringEscapeUtils.escapeHtml` rewrites in form values: a password containing one would
#: become, e.g., "&amp;" inside the server's zip, and our copy of the password would no longer open it.
_HTML_ESCAPED = re.compile(r'[&<>"]|[^\x20-\x7e]')
#: `_api`'s default: read the token from the callable.
_READ = object()


def password_problem(password: str) -> str | None:
    """Why `password` cannot be a Cloudgene job's result password (never quoting it), or None when it can. `submit`
    checks it up front too, so a job is refused before it is stored rather than failed after its upload."""
    if password and not _HTML_ESCAPED.search(password):
        return None
    return ("the result password must be non-empty printable ASCII without & < > \" (Cloudgene HTML-escapes those, "
            "and the zip would not open with our copy)")


class CloudgeneAdapter:
    """One Cloudgene server. Thread-safe: an `httpx.Client` per thread (`ClientPerThread`), no other mutable state."""

    def __init__(
        self,
        config: ServiceConfig,
        *,
        token: Callable[[], str | None],
        max_connections: int = 10,
        client: httpx.Client | None = None,
    ) -> None:
        self.name = config.name
        self.config = config
        self._token = token
        self.root, self.api = _normalise_base_url(config.base_url)
        #: The calling thread's client (`ClientPerThread`), or the one given.
        self._client: Callable[[], httpx.Client] = (lambda: client) if client is not None else ClientPerThread(
            lambda: make_client(self.api + "/", timeout=config.timeout, max_connections=max_connections)
        )
        self._submit_timeout = httpx.Timeout(
            config.timeout, connect=min(config.timeout, 10.0), read=max(config.timeout, SUBMIT_READ_TIMEOUT)
        )
        #: The app's panel ids and when they were read (`time.monotonic`), for the check before an upload.
        self._panels: tuple[tuple[str, ...], float] | None = None

    # -- the adapter interface -------------------------------------------------------------------------------

    def submit(self, request: SubmitRequest) -> str:
        """Upload the files and start a job named after `request.job_id`; return Cloudgene's job id.

        An error's `may_have_created` says whether the job may exist on the server (a timeout waiting for the
        answer, a proxy's 504, a garbled answer): then look it up with `find_submitted` before submitting again.
        """
        progress = SubmitProgress()
        try:
            return self._submit(request, progress)
        except ServiceError as exc:
            exc.may_have_created = exc.may_have_created and progress.may_have_created(exc, _refused)
            raise

    def _submit(self, request: SubmitRequest, progress: SubmitProgress) -> str:
        call = f"POST /jobs/submit/{self.config.app}"
        if not request.files:
            raise Permanent(f"{call}: no input files to upload", kind="bad_request")
        problem = None if request.password is None else password_problem(request.password)
        if problem is not None:
            raise Permanent(f"{call}: {problem}", kind="bad_password")
        self._check_panel(request.panel)
        # Population always goes: `off` skips the frequency check, and AfriGen's workflow fails a job without it.
        data = {"refpanel": request.panel, "build": request.build, "population": request.population or "off"}
        optional = {
            "r2Filter": request.r2_filter,
            "phasing": request.phasing,
            "mode": request.mode,
            "password": request.password,
        }
        data.update({key: value for key, value in optional.items() if value is not None})
        # Checkboxes: Cloudgene reads the presence of the field as true, whatever its value; false means absent.
        if request.aes_encryption:
            data["aesEncryption"] = "true"
        if request.meta:
            data["meta"] = "true"
        data["job-name"] = request.job_id

        token = self._require_token()
        with contextlib.ExitStack() as stack:
            files = []
            for path in map(Path, request.files):
                try:
                    handle = stack.enter_context(open(path, "rb"))  # noqa: SIM115 - closed by the ExitStack
                except OSError as exc:
                    raise Permanent(
                        f"{call}: cannot open input file {path.name}: {exc.strerror or type(exc).__name__}",
                        kind="input_missing",
                    ) from None
                # httpx streams a file object in 64 KiB chunks and sends its length from fstat: never whole in memory.
                files.append(("files", (path.name, handle, "application/octet-stream")))
            url = self._path("jobs", "submit", self.config.app)
            progress.sent = True
            try:
                response = progress.answer = self._send(
                    "POST", url, call, token=token, data=data, files=files, timeout=self._submit_timeout,
                    budget=Budget.upload(answer_wait=self._submit_timeout.read or SUBMIT_READ_TIMEOUT,
                                         answer_time=API_DEADLINE_FACTOR * self.config.timeout),
                )
            except OSError as exc:  # reading an input file failed mid-upload
                raise Transient(
                    f"{call}: reading an input file failed during the upload ({exc.strerror or type(exc).__name__})",
                    kind="input_read",
                ) from None
            if response.status_code == 400:
                _raise_job_limit(call, error_message(response))
            body = self._answer(response, call, token=token)
            if body.get("success") is not True:
                message = body.get("message")
                if isinstance(message, str):
                    _raise_job_limit(call, message)
                raise Transient(
                    f"{call}: the server did not confirm the submit"
                    + (f" ({_clean(message, PROGRESS_LIMIT)})" if isinstance(message, str) and message else ""),
                    kind="bad_response",
                )
            remote_id = body.get("id")
            if not isinstance(remote_id, str) or not remote_id.strip():
                raise Transient(f"{call}: expected a job id (string 'id') in the answer", kind="bad_response")
            return remote_id.strip()

    def find_submitted(self, job_id: str, max_pages: int = 20) -> str | None:
        """The newest remote job whose name is `job_id`, looking at most `max_pages` pages (15 jobs each)."""
        for entry in self._iter_jobs(max_pages):
            # Cloudgene stores `job-name` HTML-escaped.
            if entry.name == job_id:
                return entry.remote_id
        return None

    def status(self, remote_id: str) -> RemoteStatus:
        call = f"GET /jobs/{remote_id}/status"
        body = self._api("GET", self._path("jobs", remote_id, "status"), call, job=True)
        return _parse_status(body, call, self.root)

    def cancel(self, remote_id: str) -> None:
        """Ask the server to cancel (states 1-3 become CANCELED). A 404 is `Permanent(kind="remote_not_found")`."""
        call = f"GET /jobs/{remote_id}/cancel"
        self._api("GET", self._path("jobs", remote_id, "cancel"), call, job=True)

    def restart(self, remote_id: str) -> None:
        """Revive a DEAD job. Cloudgene refuses jobs in other states with a 400 -> `Permanent`."""
        call = f"GET /jobs/{remote_id}/restart"
        body = self._api("GET", self._path("jobs", remote_id, "restart"), call, job=True)
        if body.get("success") is False:
            message = body.get("message")
            raise Permanent(
                f"{call}: restart refused"
                + (f": {_clean(message, PROGRESS_LIMIT)}" if isinstance(message, str) and message else ""),
                kind="restart_refused",
            )

    def list_jobs(self, limit: int = 100) -> list[RemoteJob]:
        """The newest `limit` jobs of the token's user, newest first."""
        if limit <= 0:
            return []
        jobs: list[RemoteJob] = []
        for entry in self._iter_jobs(max_pages=-(-limit // PAGE_SIZE) + 1):
            jobs.append(entry)
            if len(jobs) >= limit:
                break
        return jobs

    @contextlib.contextmanager
    def stream_output(self, output: RemoteOutput, *, resume: Resume | None = None) -> Iterator[ByteStream]:
        """One result file's body, fetched without the token; every GET of the share URL spends one of the file's
        downloads. A resume goes back to where the broken download's body came from when that was a redirect (an
        S3-backed server's presigned URL, which spends no count) had less than an hour ago; else to the share URL
        (the local workspace answers a Range with the whole file)."""
        call = f"download of {output.name}"
        # Identity encoding: the bytes we count are the bytes Content-Length announced.
        headers = {"Accept-Encoding": "identity", **range_headers(resume)}
        url = output.url
        if resume is not None and resume.source and resume.source != output.url and (
                time.time() - resume.source_at < PRESIGNED_TRUST):
            url = resume.source
        with open_body(self._client(), url, call=call, budget=Budget.transfer(), refusal=_download_refused,
                       headers=headers, follow_redirects=True) as body:
            yield body

    def check(self) -> ServiceCheck:
        """Token validity and expiry (`POST /tokens/verify`) and the server's panels; never raises a ServiceError."""
        notes: list[str] = []
        reachable = False
        token_valid: bool | None = None
        expires: dt.datetime | None = None
        user: str | None = None
        panels: tuple[str, ...] = ()
        try:
            token: str | None = self._require_token()
        except Blocked as exc:
            token, token_valid = None, False
            notes.append(exc.message)

        if token is not None:
            try:
                answer = self._verify(token)
            except Transient as exc:
                notes.append(exc.message)
                reachable = exc.kind not in ("timeout", "connection")
            except ServiceError as exc:
                reachable = True
                notes.append(exc.message)
            else:
                reachable = True
                token_valid = answer["valid"]
                user = answer["user"]
                expires = answer["expires"]
                if not token_valid:
                    notes.append(f"token rejected: {answer['message'] or 'invalid token'}")

        call = f"GET /server/apps/{self.config.app}"
        try:
            body = self._api(
                "GET", self._path("server", "apps", self.config.app), call,
                token=token if token_valid is not False else None,
            )
            reachable = True
            panels = _parse_panels(body, call)
        except Transient as exc:
            reachable = reachable or exc.kind not in ("timeout", "connection")
            notes.append(exc.message)
        except ServiceError as exc:
            reachable = True
            notes.append(exc.message)
        message = "; ".join(notes) or None
        return ServiceCheck(
            reachable=reachable,
            token_valid=token_valid,
            token_expires=expires,
            user=user,
            remote_panels=panels,
            message=message,
        )

    def _check_panel(self, panel: str) -> None:
        """Refuse, before anything is uploaded, a panel the app does not offer: Cloudgene accepts any refpanel
        and fails the job only once it runs ("Application … not installed"), after the upload and the queue."""
        now = time.monotonic()
        if self._panels is None or now - self._panels[1] > PANELS_TTL:
            call = f"GET /server/apps/{self.config.app}"
            body = self._api("GET", self._path("server", "apps", self.config.app), call)
            self._panels = _parse_panels(body, call), now
        offered = self._panels[0]
        if not offered_panel(panel, offered):
            raise Permanent(
                f"panel '{panel}' is not offered by {self.config.app} on this server (it offers: "
                f"{', '.join(offered) or 'none'}); nothing was uploaded", kind="unknown_panel",
            )

    def close(self) -> None:
        """Close the client this adapter made (a client passed in belongs to the caller)."""
        if isinstance(self._client, ClientPerThread):
            self._client.close()

    # -- plumbing ----------------------------------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return self.api + "/" + "/".join(quote(part, safe="@") for part in parts)

    def _require_token(self) -> str:
        try:
            token = self._token()
        except OSError as exc:
            where = f" {exc.filename}" if exc.filename else ""
            raise Blocked(
                f"{self.name}: cannot read the token{where}: {exc.strerror or type(exc).__name__}", kind="no_token"
            ) from None
        except ValueError as exc:  # e.g. a token file that is not UTF-8; its message could quote the bytes
            raise Blocked(f"{self.name}: cannot read the token ({type(exc).__name__})", kind="no_token") from None
        if token is None or not token.strip():
            raise Blocked(f"{self.name}: no token configured (set token_file or token_env)", kind="no_token")
        token = token.strip()
        if not _HEADER_SAFE.fullmatch(token):
            raise Blocked(
                f"{self.name}: the token contains spaces or characters an HTTP header cannot carry", kind="bad_token"
            )
        return token

    def _send(
        self, method: str, url: str, call: str, *, token: str | None, budget: Budget | None = None, **kwargs: Any
    ) -> httpx.Response:
        """One API request with the token header, within `budget` (an API call's by default); transport failures,
        answers too large and redirects become our errors."""
        headers = {"Accept": "application/json"}
        if token is not None:
            headers[TOKEN_HEADER] = token
        response = send(self._client(), method, url, call=call, budget=budget or Budget.api(self.config.timeout),
                        headers=headers, follow_redirects=False, **kwargs)
        if response.is_redirect:
            target = urlsplit(response.headers.get("location", ""))
            where = f" to {target.scheme}://{target.netloc}{target.path}" if target.netloc else ""
            turned_away = Blocked(
                f"{call}: HTTP {response.status_code} redirect{where}; the token is not sent after a redirect, "
                "set base_url to the address the server answers on",
                kind="redirect",
            )
            turned_away.may_have_created = False  # what answered with a redirect did nothing else with the request
            raise turned_away
        return response

    def _api(
        self, method: str, url: str, call: str, *, job: bool = False, token: str | None | object = _READ,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """A JSON-object API call; by default it reads the token, a string is used as is, None sends none."""
        token = self._require_token() if token is _READ else token
        if token is not None and not isinstance(token, str):
            raise TypeError("token must be a string or None")
        response = self._send(method, url, call, token=token, **kwargs)
        return self._answer(response, call, token=token, job=job)

    def _answer(
        self, response: httpx.Response, call: str, *, token: str | None, job: bool = False
    ) -> dict[str, Any]:
        status = response.status_code
        if status == 404:
            if _is_error_page(response):
                raise Blocked(
                    f"{call}: HTTP 404: {error_message(response)}; no such endpoint, check base_url",
                    kind="endpoint_not_found",
                )
            if job:
                raise Permanent(f"{call}: HTTP 404: {error_message(response)}", kind="remote_not_found")
        if status == 403 and job and token is not None:
            self._raise_forbidden(response, call, token)
        raise_for_status(response, call)
        return json_object(response, call)

    def _raise_forbidden(self, response: httpx.Response, call: str, token: str) -> None:
        """A 403 on one job: a revoked token, or a job of another account. Ask the server which.

        Cloudgene answers 403 both when a (revoked) token no longer matches its user and, with "Access denied.",
        when the job belongs to another account. The two need opposite handling: a token problem must never fail
        a job (it blocks the service until an operator fixes the token), but a job we cannot see with a working
        token must not block the service either, or one stray row (a remote id from another account after the
        token was swapped, a copied database) would stop every other job. So we ask `POST /tokens/verify`: only
        when the server confirms the token is valid is the 403 about this job (`Permanent`, kind
        "access_denied"); when the token is invalid, or the check itself fails, it is `Blocked` — the safe side,
        since a block is undone by fixing the token and a failed job is not.
        """
        message = error_message(response)
        try:
            answer = self._verify(token)
        except ServiceError:
            answer = None
        if answer is not None and answer["valid"]:
            raise Permanent(
                f"{call}: HTTP 403: {message} The token is valid, so the job belongs to another account"
                + (f" than {answer['user']}" if answer["user"] else ""),
                kind="access_denied",
            )
        raise Blocked(f"{call}: HTTP 403: {message} (token revoked or not accepted)", kind="forbidden")

    def _verify(self, token: str) -> dict[str, Any]:
        """`POST /tokens/verify` → {"valid", "message", "user", "expires"}; errors as ServiceError."""
        call = "POST /tokens/verify"
        # The token goes in the form; no header, so a revoked token cannot make the check itself fail.
        response = self._send("POST", self._path("tokens", "verify"), call, token=None, data={"token": token})
        raise_for_status(response, call)
        body = json_object(response, call)
        valid = body.get("valid")
        if not isinstance(valid, bool):
            raise Transient(f"{call}: expected a boolean 'valid' in the answer", kind="bad_response")
        message = body.get("message")
        user = body.get("username") or body.get("mail")
        return {
            "valid": valid,
            "message": _clean(message, PROGRESS_LIMIT) if isinstance(message, str) else None,
            "user": user if isinstance(user, str) and valid else None,
            "expires": _parse_time(body.get("expire")) if valid else None,
        }

    def _iter_jobs(self, max_pages: int) -> Iterator[RemoteJob]:
        for page in range(1, max_pages + 1):
            call = f"GET /jobs?page={page}"
            body = self._api("GET", self._path("jobs"), call, params={"page": page})
            data = body.get("data")
            if not isinstance(data, list):
                raise Transient(f"{call}: expected a list 'data' in the answer", kind="bad_response")
            for entry in data:
                yield _parse_job_entry(entry, call)
            pages = body.get("pages")
            if not data or (isinstance(pages, int) and not isinstance(pages, bool) and page >= pages):
                return


# -- parsing ---------------------------------------------------------------------------------------------------


def _normalise_base_url(base_url: str) -> tuple[str, str]:
    """(server root, API base) from a base URL given with or without `/api/v2` and trailing slashes."""
    root = base_url.strip().rstrip("/")
    if root.endswith("/api/v2"):
        root = root[: -len("/api/v2")].rstrip("/")
    parts = urlsplit(root)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"base_url must be an http(s) URL without query or fragment, got {base_url!r}")
    return root, root + "/api/v2"


def _bad(call: str, what: str) -> Transient:
    return Transient(f"{call}: {what}", kind="bad_response")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def offered_panel(panel: str, offered: tuple[str, ...]) -> bool:
    """Whether a refpanel (`X`, `apps@X` or `apps@X@version`) names one of the app's panels: without a version, any
    version of it (the server takes the newest)."""
    name, _, version = panel.removeprefix("apps@").partition("@")
    for key in offered:
        offered_name, _, offered_version = key.removeprefix("apps@").partition("@")
        if offered_name == name and (not version or version == offered_version):
            return True
    return False


def _parse_status(body: dict[str, Any], call: str, root: str) -> RemoteStatus:
    state = body.get("state")
    if not _is_int(state):
        raise _bad(call, "expected a number 'state' in the job")
    raw_state, kind = cloudgene_kind(state)
    position = body.get("positionInQueue")
    steps = body.get("steps")
    steps = [step for step in steps if isinstance(step, dict)] if isinstance(steps, list) else []
    if state == FAILED_NOTIFIED and any(
        isinstance(log.get("message"), str) and _CANCELLED_WORDS.search(log["message"])
        for step in steps for log in _logs(step)
    ):
        kind = RemoteKind.CANCELLED  # cancelled (by us or in the web UI), then moved to 9 with the failed jobs
    message = failed_step = None
    if kind is RemoteKind.FAILED:
        failed_step = next((step["name"] for step in steps if isinstance(step.get("name"), str) and any(
            log.get("type") in (LOG_ERROR, str(LOG_ERROR)) for log in _logs(step))), None)
        errors = [
            _clean(log["message"], MESSAGE_LIMIT)
            for step in steps
            for log in _logs(step)
            if log.get("type") in (LOG_ERROR, str(LOG_ERROR)) and isinstance(log.get("message"), str)
        ]
        errors = [error for error in errors if error]
        message = _clean("; ".join(errors), MESSAGE_LIMIT) if errors else (
            f"the remote job failed ({raw_state}) without an error message in its log"
        )
        if failed_step in QC_STEPS:  # the input's fault: one line that says where, and why
            message = _clean(f"{failed_step} failed: {message}", MESSAGE_LIMIT)
    qc = _qc_report(steps, failed_step)
    return RemoteStatus(
        kind=kind,
        raw_state=raw_state,
        queue_position=position if _is_int(position) and position >= 0 else None,
        progress=_progress(steps),
        message=message,
        outputs=_parse_outputs(body.get("outputParams"), call, root),
        retires_at=_retirement(body.get("deletedOn")),
        failed_step=_clean(failed_step, PROGRESS_LIMIT) if failed_step else None,
        qc_failed=failed_step in QC_STEPS,
        qc=qc,
    )


def _qc_report(steps: list[dict[str, Any]], failed_step: str | None) -> QcReport | None:
    """The figures of the "Quality Control" step's statistics and the warnings of every step, as imputationserver2
    logs them ("Strand flip: 12", "Reference Overlap: 99.95 %"); None when the job has reported none yet."""
    figures: dict[str, int | float] = {}
    warnings: list[str] = []
    for step in steps:
        for log in _logs(step):
            text = log.get("message")
            if not isinstance(text, str):
                continue
            if log.get("type") in (LOG_WARNING, str(LOG_WARNING)):
                cleaned = _clean(text, PROGRESS_LIMIT)
                if cleaned and len(warnings) < QC_WARNINGS:
                    warnings.append(cleaned)
            if step.get("name") != "Quality Control":
                continue
            for line in _unescape(_TAG.sub("\n", text)).splitlines():
                match = _QC_LINE.match(line)
                field = _QC_FIGURES.get(match.group(1).strip().lower()) if match else None
                if match is None or field is None:
                    continue
                number = match.group(2).replace(",", "")
                figures[field] = float(number) if field == "reference_overlap" else int(float(number))
    if not figures and not warnings and failed_step is None:
        return None
    return QcReport(**figures, warnings=tuple(warnings),  # type: ignore[arg-type]
                    failed_step=_clean(failed_step, PROGRESS_LIMIT) if failed_step else None)


def _retirement(deleted_on: object) -> dt.datetime | None:
    """`deletedOn`: epoch milliseconds once the deletion of the results is scheduled, 0 or -1 before."""
    if not _is_int(deleted_on) or deleted_on <= 0:
        return None
    return _parse_time(deleted_on)


def _logs(step: dict[str, Any]) -> list[dict[str, Any]]:
    logs = step.get("logMessages")
    return [log for log in logs if isinstance(log, dict)] if isinstance(logs, list) else []


def _progress(steps: list[dict[str, Any]]) -> str | None:
    if not steps:
        return None
    step = steps[-1]
    name = _clean(step["name"], PROGRESS_LIMIT) if isinstance(step.get("name"), str) else ""
    texts = [_clean(log["message"], PROGRESS_LIMIT) for log in _logs(step) if isinstance(log.get("message"), str)]
    texts = [text for text in texts if text]
    latest = texts[-1] if texts else ""
    line = f"{name}: {latest}" if name and latest else name or latest
    return _clean(line, PROGRESS_LIMIT) or None


def _parse_outputs(params: object, call: str, root: str) -> tuple[RemoteOutput, ...]:
    if params is None:
        return ()
    if not isinstance(params, list):
        raise _bad(call, "expected a list 'outputParams'")
    outputs = []
    for param in params:
        if not isinstance(param, dict):
            raise _bad(call, "expected objects in 'outputParams'")
        if param.get("download") is False:  # Cloudgene lists only downloadable outputs; be sure
            continue
        files = param.get("files")
        if files is None:
            continue
        if not isinstance(files, list):
            raise _bad(call, "expected a list 'files' in an output")
        for entry in files:
            if not isinstance(entry, dict):
                raise _bad(call, "expected objects in an output's 'files'")
            name, file_hash = entry.get("name"), entry.get("hash")
            if not isinstance(name, str) or not name:
                raise _bad(call, "an output file has no 'name'")
            if not isinstance(file_hash, str) or not file_hash:
                raise _bad(call, f"output file {name} has no 'hash'")
            if not _safe_relative_path(name):
                raise Permanent(
                    f"{call}: output file name {name!r} is not a safe relative path; refusing it",
                    kind="bad_output_name",
                )
            size, count = entry.get("size"), entry.get("count")
            outputs.append(
                RemoteOutput(
                    name=name,
                    url=f"{root}/share/results/{quote(file_hash, safe='')}/{quote(name, safe='/')}",
                    remote_hash=file_hash,
                    size_text=size if isinstance(size, str) else (str(size) if _is_int(size) else None),
                    # Cloudgene's -1 means "no limit": we report that as unknown (None), never as "none left".
                    downloads_left=count if _is_int(count) and count >= 0 else None,
                )
            )
    return tuple(outputs)


def _safe_relative_path(name: str) -> bool:
    if name.startswith("/") or "\\" in name or "\x00" in name:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def _parse_job_entry(entry: object, call: str) -> RemoteJob:
    if not isinstance(entry, dict):
        raise _bad(call, "expected job objects in 'data'")
    remote_id = entry.get("id")
    if not isinstance(remote_id, str) or not remote_id:
        raise _bad(call, "a job in 'data' has no 'id'")
    name = entry.get("name")
    state = entry.get("state")
    return RemoteJob(
        remote_id=remote_id,
        name=_unescape(name) if isinstance(name, str) else None,
        raw_state=cloudgene_kind(state)[0] if _is_int(state) else "?",
    )


def _parse_panels(body: dict[str, Any], call: str) -> tuple[str, ...]:
    params = body.get("params")
    if not isinstance(params, list):
        raise _bad(call, "expected a list 'params' in the app")
    for param in params:
        if isinstance(param, dict) and param.get("id") == "refpanel":
            values = param.get("values")
            if not isinstance(values, list):
                raise _bad(call, "expected a list 'values' in the refpanel parameter")
            return tuple(
                value["key"] for value in values if isinstance(value, dict) and isinstance(value.get("key"), str)
            )
    raise _bad(call, "the app has no 'refpanel' parameter")


def _parse_time(value: object) -> dt.datetime | None:
    """Token expiry: ISO-8601 (documented) or epoch milliseconds (Jackson's default for a Date); naive means UTC."""
    when: dt.datetime | None = None
    if isinstance(value, str) and value.strip():
        try:
            when = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    elif _is_int(value) or isinstance(value, float):
        seconds = value / 1000 if value > 10**11 else value
        try:
            when = dt.datetime.fromtimestamp(seconds, dt.UTC)
        except (OverflowError, OSError, ValueError):
            return None
    if when is not None and when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when


def _unescape(text: str) -> str:
    """`html.unescape`; a text without "&" (most) is returned as it is without a look at each character."""
    if "&" not in text:
        return text
    return html.unescape(text)


def _clean(text: str, limit: int) -> str:
    """A log line for humans: tags dropped, entities decoded, whitespace collapsed, cut to `limit`."""
    text = " ".join(_unescape(_TAG.sub(" ", text)).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_error_page(response: httpx.Response) -> bool:
    """True when a 404 comes from something other than Cloudgene's job and app code: an HTML page or an empty body
    (a proxy, a wrong path), or Micronaut's generic error object (`_links`/`_embedded`: no such route)."""
    text = response.text.strip()
    if not text or text.startswith("<") or response.headers.get("content-type", "").startswith("text/html"):
        return True
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(body, dict) and ("_links" in body or "_embedded" in body)


def _refused(response: httpx.Response) -> bool:
    """True when the answer to a submit proves Cloudgene made no job of it: `http.refused` ("Only N jobs…",
    "Parameter 'X' not found.", 401/403/429), or `"success": false` with a message on a 2xx or on maintenance's
    503. Any other 5xx, a proxy's page or a timeout proves nothing: the upload may still become a job (a 500 can
    come from a handler that failed after it made one)."""
    status = response.status_code
    if refused(response):
        return True
    if not (200 <= status < 300 or status == 503) or not in_own_words(response):
        return False
    try:
        return response.json().get("success") is False
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def _raise_job_limit(call: str, message: str) -> None:
    match = _JOB_LIMIT.search(message)
    if match:
        raise JobLimitReached(f"{call}: {_clean(message, PROGRESS_LIMIT)}", limit=int(match.group(1)))


def _download_refused(quoted: httpx.Response, call: str) -> None:
    """Cloudgene's own answers to a download (an error answer, its body read): its download counter, a file it does
    not know, a link that no longer opens; the rest is `raise_for_status`'s."""
    status = quoted.status_code
    message = error_message(quoted)
    if status == 400 and _DOWNLOADS_EXHAUSTED.search(message):
        raise Permanent(f"{call}: the server allows no more downloads of this file ({message})",
                        kind="downloads_exhausted")
    if status == 404:
        raise Permanent(f"{call}: HTTP 404: the server does not know this file ({message})",
                        kind="download_not_found")
    if status in (401, 403):
        # Downloads carry no token: a refusal here is about the file (an expired presigned link), not our
        # credentials, so it must not block the service.
        raise Permanent(f"{call}: HTTP {status}: {message}", kind="download_forbidden")
