"""The simulated server's state: accounts, jobs moving through Cloudgene states by wall clock, downloads, counters.

Jobs advance lazily: every read first moves each job through whatever transitions are due at `clock()`, so there is
no background thread and a job's history does not depend on how often anyone looks. All state sits behind one lock;
slow work (reading uploads, writing result zips) happens outside it, before a job is added.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import html
import html.entities
import math
import re
import secrets
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.simulator.results import OUTPUT_PARAMS, JobParams, ResultFile

APP_ID = "imputationserver2"
APP_NAME = "Genotype Imputation (Minimac4)"
DEFAULT_APP_VERSION = "2.0.7"
PAGE_SIZE = 15
TOKEN_LIFETIME = 30 * 86400.0

BUILDS = ("hg19", "hg38")
R2_FILTERS = ("0", "0.001", "0.1", "0.2", "0.3")
PHASING = ("eagle", "beagle", "no_phasing")
POPULATIONS = ("eur", "afr", "amr", "eas", "sas", "asn", "AA", "mixed", "all", "off")


class State(enum.IntEnum):
    DEAD = -1
    WAITING = 1
    RUNNING = 2
    EXPORTING = 3
    SUCCESS = 4
    FAILED = 5
    CANCELED = 6
    RETIRED = 7
    SUCCESS_NOTIFIED = 8
    FAILED_NOTIFIED = 9
    DELETED = 10


#: States the per-user limit counts (Cloudgene: jobs still in the workflow engine).
ACTIVE_STATES = frozenset({State.WAITING, State.RUNNING, State.EXPORTING})
#: States whose results can be downloaded.
DOWNLOADABLE_STATES = frozenset({State.SUCCESS, State.SUCCESS_NOTIFIED})


class MessageType(enum.IntEnum):
    OK = 0
    ERROR = 1
    WARNING = 2
    RUNNING = 3


@dataclass(frozen=True)
class Timings:
    """Seconds a job spends in each phase; `notify` moves finished jobs to *_NOTIFIED (None: never),
    `retention` is how long results stay before the job is RETIRED (deletedOn)."""

    queue: float = 0.3
    run: float = 0.3
    export: float = 0.3
    notify: float | None = None
    retention: float = 7 * 86400.0

    @classmethod
    def instant(cls, **overrides: Any) -> Timings:
        """No waiting at all: a job is finished by the time anyone asks (benchmarks)."""
        return cls(**{"queue": 0.0, "run": 0.0, "export": 0.0, **overrides})


@dataclass(frozen=True)
class Panel:
    id: str  #: the full refpanel value, "apps@<panel>@<version>"
    label: str
    populations: tuple[str, ...]
    #: Beagle phasing is offered (imputationserver2: the HRC and 1000 Genomes panels only).
    beagle: bool = False

    @property
    def name(self) -> str:
        """The id without `apps@` and without the version: what an unversioned refpanel names."""
        return self.id.removeprefix("apps@").split("@", 1)[0]

    @property
    def version(self) -> tuple[int, ...]:
        text = self.id.removeprefix("apps@").partition("@")[2]
        return tuple(int(part) for part in re.findall(r"\d+", text))


DEFAULT_PANELS: tuple[Panel, ...] = (
    Panel("apps@hapmap-2@2.0.0", "HapMap 2", ("eur", "afr", "asn", "mixed", "off")),
    Panel("apps@1000g-phase-3-v5@2.0.0", "1000 Genomes Phase 3 (Version 5)",
          ("afr", "amr", "eur", "eas", "sas", "all", "mixed", "off"), beagle=True),
    Panel("apps@hrc-r1.1@2.0.0", "HRC r1.1 2016", ("eur", "mixed", "off"), beagle=True),
    Panel("apps@caapa@2.0.0", "CAAPA - African American Panel", ("AA", "off")),
    Panel("apps@topmed-r3@1.0.0", "TOPMed (Version R3 on GRCh38)", ("all", "mixed", "off")),
    Panel("apps@h3africa-v6hc-s@1.0.0", "H3Africa Reference Panel (v6)", ("afr", "mixed", "all", "off")),
)


@dataclass
class Account:
    token: str
    username: str
    expires: float  #: epoch seconds
    name: str = ""
    mail: str = ""
    revoked: bool = False


@dataclass
class Download:
    job_id: str
    param_id: int
    file: ResultFile
    hash: str
    count: int  #: downloads left; -1 = unlimited
    served: int = 0
    #: The job echoes its secrets and this file's hash was not yet quoted in a 500 (`echo_secrets` fault).
    echo_pending: bool = False


@dataclass
class Step:
    id: int
    name: str
    messages: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Job:
    id: str
    username: str
    name: str  #: HTML-escaped job-name, or the id
    raw_name: str | None  #: job-name as sent
    app_id: str
    app_version: str
    user_agent: str
    params: JobParams
    workdir: Path
    submitted: float
    state: State = State.WAITING
    since: float = 0.0  #: when the current state was entered
    start: float = 0.0
    end: float = 0.0
    deleted_on: float = 0.0
    steps: list[Step] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  #: input validation errors (the job will fail)
    warnings: list[str] = field(default_factory=list)
    validation_text: str = ""
    qc_text: str = ""
    results: list[ResultFile] = field(default_factory=list)
    downloads: list[Download] = field(default_factory=list)
    param_hashes: dict[str, str] = field(default_factory=dict)
    stalled: bool = False
    dies: bool = False
    #: The imputation step fails with this message (the `fail_imputation` fault).
    pipeline_error: str | None = None
    #: The token the job was submitted with, repeated in what the job says (`echo_secrets` fault); "" = it does not.
    echoed_token: str = ""
    #: Nothing can happen to the job by itself before this time (`Simulation.advance`); 0: look at it now.
    wake: float = 0.0


class ApiError(Exception):
    """An answer other than 200: status, message, and whether the body is the JSON error shape."""

    def __init__(self, status: int, message: str, *, json_body: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.json_body = json_body


def escape_html(value: str) -> str:
    """commons-lang `StringEscapeUtils.escapeHtml`, which Cloudgene applies to form values."""
    out = []
    for ch in value:
        o = ord(ch)
        if ch == "&":
            out.append("&amp;")
        elif ch == "<":
            out.append("&lt;")
        elif ch == ">":
            out.append("&gt;")
        elif ch == '"':
            out.append("&quot;")
        elif o > 0x7F:
            name = html.entities.codepoint2name.get(o)
            out.append(f"&{name};" if name else f"&#{o};")
        else:
            out.append(ch)
    return "".join(out)


def human_size(size: int) -> str:
    """commons-io `FileUtils.byteCountToDisplaySize`: whole units, rounded down."""
    for unit, factor in (("EB", 1 << 60), ("PB", 1 << 50), ("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20),
                         ("KB", 1 << 10)):
        if size // factor > 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


def _echo(job: Job) -> str:
    """What a job with the `echo_secrets` fault adds to each of its messages."""
    return f" (token {job.echoed_token}, password {job.params.password})" if job.echoed_token else ""


def _ms(t: float) -> int:
    return int(t * 1000) if t else 0


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds")


class Simulation:
    """Thread-safe state of one simulated server."""

    def __init__(
        self,
        *,
        accounts: Mapping[str, Account],
        timings: Timings,
        max_jobs_per_user: int,
        download_limit: int,
        panels: tuple[Panel, ...],
        app_version: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.lock = threading.RLock()
        self.accounts: dict[str, Account] = dict(accounts)
        self.timings = timings
        self.max_jobs_per_user = max_jobs_per_user
        self.download_limit = download_limit
        self.panels = {p.id: p for p in panels}
        self.app_version = app_version
        self.clock = clock
        self.maintenance = False
        self.jobs: dict[str, Job] = {}
        self._by_hash: dict[str, Download] = {}
        self._step_ids = 0
        self._param_ids: dict[str, int] = {}
        self.requests: Counter[str] = Counter()
        self.submissions: Counter[str] = Counter()
        self.rejected_submissions: Counter[str] = Counter()
        self.download_log: list[dict[str, Any]] = []

    # ---------------------------------------------------------------------------------------------- accounts
    def authenticate(self, token: str | None) -> Account:
        """The account behind an X-Auth-Token: 401 when missing/unknown/expired, 403 when revoked."""
        with self.lock:
            account = self.accounts.get(token) if token else None
            if account is None or account.expires <= self.clock():
                raise ApiError(401, "Unauthorized", json_body=False)
            if account.revoked:
                raise ApiError(403, "Forbidden", json_body=False)
            return account

    def verify_token(self, token: str) -> dict[str, Any]:
        with self.lock:
            account = self.accounts.get(token)
            now = self.clock()
            if account is None or account.revoked or account.expires <= now:
                return {"valid": False, "message": "Invalid API Token.", "username": None, "name": None,
                        "mail": None, "expire": _iso(now)}
            return {"valid": True, "message": f"API Token was created by {account.username} and is valid.",
                    "username": account.username, "name": account.name, "mail": account.mail,
                    "expire": _iso(account.expires)}

    def add_token(self, token: str, username: str, *, expires_in: float = TOKEN_LIFETIME) -> Account:
        with self.lock:
            account = Account(token, username, self.clock() + expires_in, name=username.title(),
                              mail=f"{username}@example.org")
            self.accounts[token] = account
            return account

    def expire_token(self, token: str) -> None:
        with self.lock:
            self._account(token).expires = self.clock() - 1.0

    def revoke_token(self, token: str) -> None:
        with self.lock:
            self._account(token).revoked = True

    def restore_token(self, token: str, *, expires_in: float = TOKEN_LIFETIME) -> None:
        with self.lock:
            account = self._account(token)
            account.revoked = False
            account.expires = self.clock() + expires_in

    def _account(self, token: str) -> Account:
        try:
            return self.accounts[token]
        except KeyError:
            raise KeyError("no such token") from None

    # ----------------------------------------------------------------------------------------------- jobs
    def active_jobs(self, username: str) -> int:
        with self.lock:
            self.advance()
            return sum(1 for j in self.jobs.values() if j.username == username and j.state in ACTIVE_STATES)

    def check_limit(self, username: str) -> None:
        if self.active_jobs(username) >= self.max_jobs_per_user:
            raise ApiError(400, f"Only {self.max_jobs_per_user} jobs per user can be executed simultaneously.")

    def _new_id(self, now: float) -> str:
        ms = int(now * 1000)
        while True:
            t = time.localtime(ms / 1000)
            job_id = f"job-{time.strftime('%Y%m%d-%H%M%S', t)}-{ms % 1000:03d}"
            if job_id not in self.jobs:
                return job_id
            ms += 1

    def add_job(
        self,
        *,
        account: Account,
        raw_name: str | None,
        app_id: str,
        user_agent: str,
        params: JobParams,
        workdir: Path,
        errors: list[str],
        warnings: list[str],
        validation_text: str,
        qc_text: str,
        results: list[ResultFile],
        job_faults: Callable[[], dict[str, str | None]],
    ) -> Job:
        """Create a job (re-checking the per-user limit atomically); `job_faults` is asked once it is certain."""
        with self.lock:
            try:
                self.check_limit(account.username)
            except ApiError:
                self.rejected_submissions[raw_name or ""] += 1
                raise
            faults = job_faults()
            if "wrong_md5" in faults:
                results = [_wrong_md5(f, faults["wrong_md5"]) if f.name.endswith(".md5") else f for f in results]
            errors = list(errors)
            if "fail_validation" in faults and not errors:
                errors.append(faults["fail_validation"] or
                              "The provided VCF file is malformed (simulated input validation failure).")
            now = self.clock()
            job_id = self._new_id(now)
            name = escape_html(raw_name) if raw_name and raw_name.strip() else job_id
            job = Job(
                id=job_id, username=account.username, name=name, raw_name=raw_name, app_id=app_id,
                app_version=self.app_version, user_agent=user_agent, params=params, workdir=workdir,
                submitted=now, since=now, errors=errors, warnings=warnings, validation_text=validation_text,
                qc_text=qc_text, results=results, stalled="stall" in faults, dies="dead" in faults,
                pipeline_error=(faults["fail_imputation"] or "Pipeline execution failed.")
                if "fail_imputation" in faults else None,
                echoed_token=account.token if "echo_secrets" in faults else "",
            )
            self.jobs[job_id] = job
            self.submissions[raw_name or ""] += 1
            return job

    def note_rejected(self, raw_name: str | None) -> None:
        with self.lock:
            self.rejected_submissions[raw_name or ""] += 1

    def get_job(self, job_id: str, account: Account) -> Job:
        with self.lock:
            self.advance()
            job = self.jobs.get(job_id)
            if job is None or job.state == State.DELETED:
                raise ApiError(404, f"Job {job_id} not found.")
            if job.username != account.username:
                raise ApiError(403, "Access denied.")
            return job

    def _step(self, job: Job, name: str, messages: list[tuple[str, MessageType]], t: float) -> None:
        self._step_ids += 1
        job.steps.append(Step(self._step_ids, name, [
            {"success": True, "message": text + _echo(job), "type": int(kind), "time": _ms(t)}
            for text, kind in messages
        ]))

    def advance(self) -> None:
        """Move every job through the transitions that are due now.

        Every request runs this, so a job is looked at only once its next transition may be due (`Job.wake`):
        walking a thousand finished jobs on every call made the simulator's CPU per request grow with its history
        (quadratic over a benchmark's run). Whatever changes a job from outside (cancel, restart, the control API,
        new timings) sets its `wake` back to 0."""
        with self.lock:
            now = self.clock()
            for job in self.jobs.values():
                if now >= job.wake:
                    job.wake = self._advance(job, now)

    def _advance(self, job: Job, now: float) -> float:
        """Apply the transitions due by `now`; return when the next one may be due (`math.inf`: none by itself)."""
        t = self.timings
        while True:
            s = job.state
            if s == State.WAITING:
                due = job.since + t.queue
                if job.stalled:
                    return math.inf
                if now < due:
                    return due
                if job.dies:
                    job.dies = False
                    job.state, job.since = State.DEAD, due
                    return math.inf
                job.state, job.since, job.start = State.RUNNING, due, due
                if job.errors:
                    self._step(job, "Input Validation",
                               [(e, MessageType.ERROR) for e in job.errors]
                               + [(w, MessageType.WARNING) for w in job.warnings], due)
                else:
                    self._step(job, "Input Validation",
                               [(job.validation_text, MessageType.OK)]
                               + [(w, MessageType.WARNING) for w in job.warnings], due)
                    self._step(job, "Quality Control", [(job.qc_text, MessageType.OK)], due)
                    if job.params.mode != "qc_only":
                        self._step(job, "Pre-phasing and Imputation",
                                   [("Imputation running...", MessageType.RUNNING)], due)
            elif s == State.RUNNING:
                due = job.since + t.run
                if now < due:
                    return due
                if job.errors:
                    job.state, job.since, job.end = State.FAILED, due, due
                    continue
                if job.pipeline_error is not None:
                    for step in job.steps:
                        for m in step.messages:
                            if m["type"] == MessageType.RUNNING:
                                m["type"], m["message"] = int(MessageType.ERROR), job.pipeline_error
                    job.state, job.since, job.end = State.FAILED, due, due
                    continue
                for step in job.steps:
                    for m in step.messages:
                        if m["type"] == MessageType.RUNNING:
                            m["type"], m["message"] = int(MessageType.OK), "Imputation finished." + _echo(job)
                self._step(job, "Data Compression and Encryption",
                           [("Exporting data...", MessageType.RUNNING)], due)
                job.state, job.since = State.EXPORTING, due
            elif s == State.EXPORTING:
                due = job.since + t.export
                if now < due:
                    return due
                text = "Data have been exported successfully."
                if job.params.password_generated:
                    text += " We have sent a notification email with the password to your e-mail address."
                job.state, job.since, job.end = State.SUCCESS, due, due
                job.deleted_on = due + t.retention
                self._publish(job)
                if job.echoed_token:
                    text = f"Exported {' '.join(d.hash for d in job.downloads)}. {text}{_echo(job)}"
                job.steps[-1].messages[-1].update(type=int(MessageType.OK), message=text)
            elif s in (State.SUCCESS, State.SUCCESS_NOTIFIED):
                if now >= job.deleted_on:
                    self._retire(job)
                    return math.inf
                if s == State.SUCCESS and t.notify is not None:
                    if now >= job.since + t.notify:
                        job.state = State.SUCCESS_NOTIFIED
                        continue
                    return min(job.deleted_on, job.since + t.notify)
                return job.deleted_on
            elif s in (State.FAILED, State.CANCELED):  # Cloudgene's 9 holds cancelled jobs too
                if t.notify is not None:
                    if now >= job.since + t.notify:
                        job.state = State.FAILED_NOTIFIED
                        return math.inf
                    return job.since + t.notify
                return math.inf
            else:
                return math.inf

    def _publish(self, job: Job) -> None:
        for file in job.results:
            if file.param not in job.param_hashes:
                job.param_hashes[file.param] = secrets.token_hex(32)
            # Cloudgene: SHA-256 of name + size + a random number. A URL secret, not a checksum.
            secret = hashlib.sha256(f"{file.name}{file.size}{secrets.randbelow(10**18)}".encode()).hexdigest()
            download = Download(job.id, self._param_id(job, file.param), file, secret, self.download_limit,
                                echo_pending=bool(job.echoed_token))
            job.downloads.append(download)
            self._by_hash[secret] = download

    def _param_id(self, job: Job, param: str) -> int:
        key = f"{job.id}/{param}"
        if key not in self._param_ids:
            self._param_ids[key] = len(self._param_ids) + 1
        return self._param_ids[key]

    def _retire(self, job: Job) -> None:
        job.state = State.RETIRED
        for d in job.downloads:
            self._by_hash.pop(d.hash, None)
        shutil.rmtree(job.workdir, ignore_errors=True)

    def resolve_panel(self, refpanel: str) -> str | None:
        """The installed panel a submitted refpanel names (`X`, `apps@X` or `apps@X@version`; without a version,
        the newest installed), as its full id; None when none is installed."""
        if refpanel in self.panels:
            return refpanel
        name, _, version = refpanel.removeprefix("apps@").partition("@")
        matching = [p for p in self.panels.values() if p.name == name]
        if version:
            matching = [p for p in matching if p.id.removeprefix("apps@").partition("@")[2] == version]
        return max(matching, key=lambda p: p.version).id if matching else None

    def cancel(self, job: Job) -> None:
        with self.lock:
            self.advance()
            job.wake = 0.0
            if job.state in ACTIVE_STATES:
                now = self.clock()
                job.state, job.since, job.end = State.CANCELED, now, now
                if not job.start:
                    job.start = now
                self._step(job, "Canceled", [("Job was canceled by user.", MessageType.ERROR)], now)

    def restart(self, job: Job) -> None:
        with self.lock:
            self.advance()
            if job.state != State.DEAD:
                raise ApiError(400, f"Job {job.id} is not pending.")
            job.state, job.since, job.wake = State.WAITING, self.clock(), 0.0
            job.start = 0.0
            job.steps.clear()

    # admin-side actions (the simulator's control API)
    def kill_job(self, job_id: str) -> None:
        """The server restarted under the job: DEAD(-1) whatever it was doing."""
        with self.lock:
            self.advance()
            job = self._job(job_id)
            job.wake = 0.0
            if job.state in ACTIVE_STATES:
                job.state, job.since = State.DEAD, self.clock()

    def stall_job(self, job_id: str, stalled: bool = True) -> None:
        with self.lock:
            self.advance()
            job = self._job(job_id)
            job.stalled, job.wake = stalled, 0.0
            if not stalled and job.state == State.WAITING:
                job.since = self.clock()

    def retire_job(self, job_id: str) -> None:
        with self.lock:
            self.advance()
            job = self._job(job_id)
            job.wake = 0.0
            if job.state in DOWNLOADABLE_STATES:
                job.deleted_on = self.clock()
                self._retire(job)

    def _job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise KeyError(f"no job {job_id}")
        return job

    # ------------------------------------------------------------------------------------------ rendering
    def position_in_queue(self, job: Job) -> int:
        if job.state != State.WAITING:
            return -1
        waiting = sorted((j for j in self.jobs.values() if j.state == State.WAITING), key=lambda j: j.submitted)
        return next(i for i, j in enumerate(waiting) if j is job)

    def job_json(self, job: Job) -> dict[str, Any]:
        with self.lock:
            outputs = []
            for param, label in OUTPUT_PARAMS:
                if param == "output" and job.params.mode == "qc_only":
                    continue
                files = [d for d in job.downloads if d.file.param == param]
                outputs.append({
                    "id": self._param_id(job, param),
                    "name": param,
                    "description": label,
                    "value": f"{job.id}/{param}",
                    "type": "local_folder",
                    "download": True,
                    "tree": [],
                    "job": None,
                    "jobId": job.id,
                    "autoExport": False,
                    "hash": job.param_hashes.get(param, ""),
                    "files": [{
                        "name": d.file.name,
                        "path": f"{job.id}/{param}/{d.file.name}",
                        "hash": d.hash,
                        "count": d.count,
                        "size": human_size(d.file.size),
                        "parameterId": d.param_id,
                        "user": job.username,
                    } for d in files],
                })
            return {
                "application": f"{APP_NAME} {job.app_version}",
                "applicationId": job.app_id,
                "deletedOn": _ms(job.deleted_on) if job.state in (*DOWNLOADABLE_STATES, State.RETIRED) else 0,
                "endTime": _ms(job.end),
                "id": job.id,
                "name": job.name,
                "logs": "",
                "state": int(job.state),
                "positionInQueue": self.position_in_queue(job),
                "userAgent": job.user_agent,
                "startTime": _ms(job.start),
                "submittedOn": _ms(job.submitted),
                "username": job.username,
                "currentTime": _ms(self.clock()),
                "steps": [{"id": s.id, "name": s.name, "logMessages": [dict(m) for m in s.messages]}
                          for s in job.steps],
                "outputParams": outputs,
            }

    def job_page(self, account: Account, page: int | None) -> dict[str, Any]:
        """GET /jobs: newest first; without `page` every job on one page (as Cloudgene does)."""
        with self.lock:
            self.advance()
            mine = sorted((j for j in self.jobs.values() if j.username == account.username
                           and j.state != State.DELETED), key=lambda j: (j.submitted, j.id), reverse=True)
            count = len(mine)
            if page is None:
                page, size, data = 1, count, mine
            else:
                page = max(page, 1)
                size = PAGE_SIZE
                data = mine[(page - 1) * size: page * size]
            result: dict[str, Any] = {"count": count, "page": page, "pageSize": size, "prev": None, "next": None,
                                      "pages": [], "data": [self.job_json(j) for j in data]}
            if count == 0:
                result["page"] = 0
                return result
            pages = (count + size - 1) // size if size else 1
            if page > 1:
                result["prev"] = page - 1
            if page < pages:
                result["next"] = page + 1
            result["pages"] = ([p for p in range(page - 3, page) if p > 0] + [page]
                               + [p for p in range(page + 1, page + 4) if p <= pages])
            return result

    # ------------------------------------------------------------------------------------------ downloads
    def take_download(self, secret: str) -> Download:
        """Count one download: 404 for an unknown hash, 400 once the counter is used up."""
        with self.lock:
            self.advance()
            download = self._by_hash.get(secret)
            if download is None:
                raise ApiError(404, "download not found.")
            if download.echo_pending:
                download.echo_pending = False
                token = self.jobs[download.job_id].echoed_token
                raise ApiError(500, f"Could not read file {secret} of the user with token {token}.")
            if download.count == 0:
                raise ApiError(400, "number of max downloads exceeded.")
            if download.count != -1:
                download.count -= 1
            download.served += 1
            return download

    def log_download(self, download: Download, *, status: int, sent: int, sha256: str, fault: str | None) -> None:
        with self.lock:
            self.download_log.append({
                "job": download.job_id, "name": download.file.name, "status": status, "bytes_sent": sent,
                "complete": sent == download.file.size and sha256 == download.file.sha256,
                "sha256_sent": sha256, "fault": fault,
            })

    # ------------------------------------------------------------------------------------------ introspection
    def count_request(self, route: str) -> None:
        with self.lock:
            self.requests[route] += 1

    def stats(self) -> dict[str, Any]:
        with self.lock:
            self.advance()
            jobs = {}
            for job in self.jobs.values():
                published = {d.file.name: d for d in job.downloads}
                jobs[job.id] = {
                    "user": job.username,
                    "name": job.raw_name,
                    "state": int(job.state),
                    "state_name": job.state.name,
                    "submitted": job.submitted,
                    "files": {
                        f.name: {
                            "size": f.size,
                            "sha256": f.sha256,
                            "published": f.name in published,
                            "downloads_left": published[f.name].count if f.name in published else None,
                            "served": published[f.name].served if f.name in published else 0,
                        } for f in job.results
                    },
                }
            return {
                "requests": dict(self.requests),
                "submissions": dict(self.submissions),
                "rejected_submissions": dict(self.rejected_submissions),
                "jobs": jobs,
                "downloads": [dict(d) for d in self.download_log],
                "maintenance": self.maintenance,
            }


def replace_timings(sim: Simulation, **changes: Any) -> None:
    with sim.lock:
        sim.advance()
        sim.timings = dataclasses.replace(sim.timings, **changes)
        for job in sim.jobs.values():
            job.wake = 0.0  # due times follow from the timings


def _wrong_md5(file: ResultFile, text: str | None) -> ResultFile:
    """The `wrong_md5` fault: the `.md5` file publishes a digest its zip does not have, or holds `text` instead."""
    file.path.write_text(f"{'0' * 32}  {file.name.removesuffix('.md5')}\n" if text is None else text)
    data = file.path.read_bytes()
    return dataclasses.replace(file, size=len(data), sha256=hashlib.sha256(data).hexdigest())
