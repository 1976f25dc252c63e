"""The Cloudgene API itself: routes, request checks and answers, independent of sockets.

Each route function takes the request (`Request`) and returns a `Response` or raises `ApiError`; `server.py` moves
bytes and applies faults around them. The order of checks follows Cloudgene 3: a submission is answered only after
its whole multipart body was read; then authentication, maintenance, the per-user limit, the application, the form.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote

from daemon.simulator.model import (
    APP_ID,
    APP_NAME,
    BUILDS,
    PHASING,
    POPULATIONS,
    R2_FILTERS,
    Account,
    ApiError,
    Panel,
    Simulation,
    escape_html,
)
from daemon.simulator.multipart import BodyReader, Form, MalformedBody, boundary_of, parse_multipart
from daemon.simulator.results import (
    JobParams,
    ResultFile,
    build_results,
    chromosome_number,
    generate_password,
    input_summary_text,
)
from daemon.simulator.vcf import CHROMOSOMES, MAX_SAMPLES, MIN_SAMPLES, VcfSummary, inspect_vcf

if TYPE_CHECKING:
    from daemon.simulator.faults import Faults

MAINTENANCE_MESSAGE = "This functionality is currently under maintenance."
#: The imputationserver2 inputs a form may name (besides `job-name` and `*-pattern`).
INPUTS = ("files", "refpanel", "build", "r2Filter", "phasing", "population", "mode", "aesEncryption", "meta",
          "password")
CHECKBOXES = ("aesEncryption", "meta")
#: What the workflow assumes for a value left out; population has no default (AfriGen's workflow fails without it).
DEFAULTS = {"build": "hg19", "r2Filter": "0", "phasing": "eagle", "mode": "imputation"}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any  # email.message.Message-like
    body: BodyReader
    #: Sends an answer at once, before the route has finished (a proxy in front that stops waiting); the route's
    #: own answer is then dropped.
    answer_early: Callable[[Response], None] | None = None
    #: A submit whose upload is being copied (`CloudgeneApi.copying`).
    copying: bool = False

    @property
    def token(self) -> str | None:
        token: str | None = self.headers.get("X-Auth-Token")
        return token


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)
    file: Path | None = None  #: streamed instead of `body`
    length: int = 0
    offset: int = 0  #: where in `file` the body begins (a Range answered with 206)
    download: Any = None  #: the model.Download being served
    close: bool = False

    def __post_init__(self) -> None:
        if self.file is None:
            self.length = len(self.body)

    @property
    def is_json(self) -> bool:
        return self.content_type.startswith("application/json")


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(obj).encode())


def text_response(text: str, status: int, content_type: str = "text/plain; charset=utf-8") -> Response:
    return Response(status, text.encode(), content_type=content_type)


NGINX_REASONS = {429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
                 503: "Service Temporarily Unavailable", 504: "Gateway Time-out"}


def proxy_error_response(status: int) -> Response:
    """The error page of the nginx in front of Cloudgene."""
    title = f"{status} {NGINX_REASONS.get(status, 'Error')}"
    page = (f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n"
            f"<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")
    return Response(status, page.encode(), content_type="text/html")


def error_response(exc: ApiError) -> Response:
    if exc.json_body:
        return json_response({"success": False, "message": exc.message}, exc.status)
    return text_response(exc.message, exc.status)


_CONTENT_TYPES = {".zip": "application/zip", ".txt": "text/plain", ".html": "text/html", ".gz": "application/gzip"}


class CloudgeneApi:
    """Routes of `{base}/api/v2` and `{base}/share/results`."""

    def __init__(
        self,
        sim: Simulation,
        faults: Faults,
        *,
        workdir: Path,
        strict: bool,
        max_upload_bytes: int,
        server_name: str,
        sleep: Callable[[float], None] = time.sleep,
        presigned: bool = False,
    ) -> None:
        self.sim = sim
        #: An S3-backed Cloudgene: a download (counted) is a redirect to a presigned URL, valid for an hour, that
        #: serves the file with Range and counts nothing. {token: (download, expiry)}.
        self.presigned = presigned
        self._presigned: dict[str, tuple[Any, float]] = {}
        self.faults = faults
        self.sleep = sleep
        #: Submits whose upload is being copied (`slow_submit`): each may still become a job.
        self.copying = 0
        self._copying_lock = threading.Lock()
        self.workdir = workdir
        self.strict = strict
        self.max_upload_bytes = max_upload_bytes
        self.server_name = server_name
        p = "/api/v2"
        self.routes: list[tuple[str, re.Pattern[str], str, Callable[..., Response]]] = []
        for method, pattern, handler in (
            ("POST", p + "/jobs/submit/{app}", self.submit),
            ("GET", p + "/jobs", self.list_jobs),
            ("GET", p + "/jobs/", self.list_jobs),
            ("GET", p + "/jobs/{id}", self.get_job),
            ("DELETE", p + "/jobs/{id}", self.delete_job),
            ("GET", p + "/jobs/{id}/status", self.get_job),
            ("GET", p + "/jobs/{id}/cancel", self.cancel_job),
            ("GET", p + "/jobs/{id}/restart", self.restart_job),
            ("POST", p + "/tokens/verify", self.verify_token),
            ("GET", p + "/server", self.server_info),
            ("GET", p + "/server/", self.server_info),
            ("GET", p + "/server/apps/{app}", self.app_info),
            ("GET", "/share/results/{hash}/{name+}", self.download),
            ("GET", "/presigned/{token}/{name+}", self.presigned_download),
        ):
            regex = re.escape(pattern).replace(r"\{name\+\}", "(?P<name>.+)")
            regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", regex)
            self.routes.append((method, re.compile(regex + "$"), f"{method} {pattern.replace('+', '')}", handler))

    def match(self, method: str, path: str) -> tuple[str, Callable[..., Response] | None, dict[str, str]]:
        """(route name for counting, handler or None, path parameters); None with a 404/405 route name."""
        allowed = False
        for m, regex, name, handler in self.routes:
            found = regex.match(path)
            if found:
                if m == method:
                    return name, handler, found.groupdict()
                allowed = True
        return (f"{method} <method not allowed>" if allowed else f"{method} <unknown>"), None, {}

    def not_routed(self, request: Request, name: str) -> Response:
        status, text = (405, "Method Not Allowed") if "not allowed" in name else (404, "Page Not Found")
        return json_response({"message": text, "_links": {"self": {"href": request.path, "templated": False}}},
                             status)

    # -------------------------------------------------------------------------------------------- helpers
    def _user(self, request: Request) -> Account:
        return self.sim.authenticate(request.token)

    def _not_in_maintenance(self) -> None:
        if self.sim.maintenance:
            raise ApiError(503, MAINTENANCE_MESSAGE)

    def _app_version(self, app: str) -> str | None:
        if app == APP_ID:
            return self.sim.app_version
        if app == f"{APP_ID}@{self.sim.app_version}":
            return self.sim.app_version
        return None

    # ---------------------------------------------------------------------------------------------- jobs
    def get_job(self, request: Request, id: str) -> Response:
        account = self._user(request)
        self._not_in_maintenance()
        job = self.sim.get_job(id, account)
        return json_response(self.sim.job_json(job))

    def cancel_job(self, request: Request, id: str) -> Response:
        account = self._user(request)
        self._not_in_maintenance()
        job = self.sim.get_job(id, account)
        self.sim.cancel(job)
        return json_response(self.sim.job_json(job))

    def restart_job(self, request: Request, id: str) -> Response:
        account = self._user(request)
        self._not_in_maintenance()
        job = self.sim.get_job(id, account)
        self.sim.restart(job)
        return json_response({"success": True, "message": "Your job was successfully added to the job queue."})

    def delete_job(self, request: Request, id: str) -> Response:
        self._user(request)
        # Cloudgene deletes only for a browser session (access token): an API token, however valid, gets a 401 that
        # says nothing about the token (reference: other calls).
        raise ApiError(401, "The request requires user authentication.")

    def list_jobs(self, request: Request) -> Response:
        account = self._user(request)
        self._not_in_maintenance()
        raw = request.query.get("page", [None])[0]
        try:
            page = int(raw) if raw not in (None, "") else None
        except ValueError:
            raise ApiError(400, f"Failed to convert argument [page] for value [{raw}]") from None
        return json_response(self.sim.job_page(account, page))

    def verify_token(self, request: Request) -> Response:
        ctype = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        raw = _read_small(request.body)
        if ctype != "application/x-www-form-urlencoded":
            raise ApiError(415, "Unsupported Media Type", json_body=False)
        token = parse_qs(raw.decode("utf-8", "replace")).get("token", [""])[0]
        if not token:
            raise ApiError(400, "Required argument [String token] not specified")
        return json_response(self.sim.verify_token(token))

    # ---------------------------------------------------------------------------------------------- server
    def server_info(self, request: Request) -> Response:
        account = self._user(request)
        data: dict[str, Any] = {
            "name": self.server_name,
            "background": "#343a40",
            "foreground": "#ffffff",
            "footer": "",
            "user": {"username": account.username, "mail": account.mail, "admin": False, "name": account.name},
            "apps": [{"id": APP_ID, "name": APP_NAME}],
            "deprecatedApps": [],
            "experimentalApps": [],
            "loggedIn": True,
            "navigation": [],
            # sic: Cloudgene spells it this way
            "maintenace": self.sim.maintenance,
        }
        if self.sim.maintenance:
            data["maintenaceMessage"] = MAINTENANCE_MESSAGE
        return json_response(data)

    def app_info(self, request: Request, app: str) -> Response:
        self._user(request)
        self._not_in_maintenance()
        version = self._app_version(app)
        if version is None:
            raise ApiError(404, f"Application {app} not found or the request requires user authentication.")

        def values(items: list[tuple[str, str]]) -> list[dict[str, str]]:
            return [{"key": k, "value": v} for k, v in items]

        panels = list(self.sim.panels.values())
        params = [
            {"id": "files", "description": "Input Files (VCF)", "type": "local_folder", "value": "",
             "visible": True, "required": True},
            {"id": "refpanel", "description": "Reference Panel", "type": "app_list",
             "value": panels[0].id if panels else "", "visible": True, "required": True,
             "values": [{"key": p.id, "value": p.label,
                         "populations": values([(pop, pop.upper() if pop != "AA" else "AA") for pop in p.populations])}
                        for p in panels]},
            {"id": "build", "description": "Array Build", "type": "list", "value": "hg19", "visible": True,
             "values": values([("hg19", "GRCh37/hg19"), ("hg38", "GRCh38/hg38")])},
            {"id": "r2Filter", "description": "rsq Filter", "type": "list", "value": "0", "visible": True,
             "values": values([(v, "off" if v == "0" else v) for v in R2_FILTERS])},
            {"id": "phasing", "description": "Phasing", "type": "list", "value": "eagle", "visible": True,
             "values": values([("eagle", "Eagle v2.4 (phased output)"), ("beagle", "Beagle 5.4 (phased output)"),
                               ("no_phasing", "No phasing")])},
            {"id": "population", "description": "Population", "type": "list", "value": "off", "visible": True,
             "values": values([(p, p) for p in POPULATIONS])},
            {"id": "mode", "description": "Mode", "type": "list", "value": "imputation", "visible": True,
             "values": values([("qc_only", "Quality Control Only"), ("imputation", "Quality Control & Imputation")])},
            {"id": "aesEncryption", "description": "AES 256 encryption", "type": "checkbox", "value": "no",
             "visible": True, "values": values([("true", "yes"), ("false", "no")])},
            {"id": "meta", "description": "Generate Meta-imputation file", "type": "checkbox", "value": "no",
             "visible": True, "values": values([("true", "yes"), ("false", "no")])},
            {"id": "password", "description": "Password", "type": "text", "value": "", "visible": False},
        ]
        return json_response({"id": f"{APP_ID}@{version}", "name": APP_NAME, "version": version,
                              "description": "Imputation of genotypes against a reference panel (simulated).",
                              "params": params, "s3Workspace": False})

    # ---------------------------------------------------------------------------------------------- download
    def download(self, request: Request, hash: str, name: str) -> Response:
        # Cloudgene looks the file up by its hash only; the name in the URL is decoration.
        d = self.sim.take_download(hash)
        path = d.file.path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ApiError(404, "File not found in workspace.") from None
        if self.presigned:
            token = secrets.token_hex(16)
            self._presigned[token] = d, self.sim.clock() + PRESIGNED_LIFETIME
            signature = hashlib.sha256(f"{token}{hash}".encode()).hexdigest()
            location = (f"/presigned/{token}/{quote(name)}?X-Amz-Expires={int(PRESIGNED_LIFETIME)}"
                        f"&X-Amz-Signature={signature}")
            return Response(302, b"", content_type="text/plain", headers=[("Location", location)])
        ctype = _CONTENT_TYPES.get(path.suffix, "application/octet-stream")
        # The local workspace ignores Range: the whole file, every time.
        return Response(200, content_type=ctype, file=path, length=size, download=d,
                        headers=[("Content-Disposition", f'attachment; filename="{path.name}"')])

    def presigned_download(self, request: Request, token: str, name: str) -> Response:
        """S3's side of an S3-backed Cloudgene: the presigned URL serves the file, with Range, counting nothing."""
        entry = self._presigned.get(token)
        if entry is None or self.sim.clock() > entry[1]:
            return text_response("<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
                                 403, content_type="application/xml")
        path = entry[0].file.path
        size = path.stat().st_size
        etag = '"' + entry[0].file.sha256[:32] + '"'
        ctype = _CONTENT_TYPES.get(path.suffix, "application/octet-stream")
        wanted = _RANGE.fullmatch((request.headers.get("Range") or "").strip())
        if_range = request.headers.get("If-Range")
        if wanted and (if_range is None or if_range == etag) and int(wanted.group(1)) < size:
            start = int(wanted.group(1))
            return Response(206, content_type=ctype, file=path, length=size - start, offset=start,
                            headers=[("Content-Range", f"bytes {start}-{size - 1}/{size}"), ("ETag", etag)])
        return Response(200, content_type=ctype, file=path, length=size, headers=[("ETag", etag)])

    # ---------------------------------------------------------------------------------------------- submit
    def submit(self, request: Request, app: str) -> Response:
        boundary = boundary_of(request.headers.get("Content-Type"))
        if boundary is None:
            request.body.drain(self.max_upload_bytes)
            raise ApiError(415, "Unsupported Media Type", json_body=False)
        if request.body.length is not None and request.body.length > self.max_upload_bytes:
            return _too_large()
        staging = self.workdir / "uploads" / uuid.uuid4().hex
        staging.mkdir(parents=True)
        keep = False
        raw_name: str | None = None
        try:
            try:
                form = parse_multipart(_Limited(request.body, self.max_upload_bytes), boundary, staging)
            except _TooLarge:
                return _too_large()
            except MalformedBody as exc:
                raise ApiError(400, f"java.io.IOException: {exc}", json_body=False) from None
            raw_name = next((v for k, v in form.fields if k.replace("input-", "") == "job-name"), None)
            try:
                account = self._user(request)
                self._not_in_maintenance()
                self.sim.check_limit(account.username)
                version = self._app_version(app)
                if version is None:
                    raise ApiError(404, f"Application '{app}' not found.")
                params, problems = self._parse_form(form)
            except ApiError:
                self.sim.note_rejected(raw_name)
                raise
            uploads = [(f.path, f.filename) for f in form.files]
            errors, warnings, summaries = self._validate(uploads, params, problems)
            results: list[ResultFile] = []
            qc = ""
            validation = ""
            if not errors:
                inputs = [(p, s) for (p, _), s in zip(uploads, summaries, strict=True)]
                results, qc = build_results(staging / "outputs", inputs, params)
                validation = input_summary_text(summaries, params)
            self._copy_to_workspace(request)
            job = self.sim.add_job(
                account=account, raw_name=raw_name, app_id=app, user_agent=request.headers.get("User-Agent") or "",
                params=params, workdir=staging, errors=errors, warnings=warnings, validation_text=validation,
                qc_text=qc, results=results, job_faults=self.faults.take_job_faults,
            )
            keep = True
            return json_response({"success": True, "message": "Your job was successfully added to the job queue.",
                                  "id": job.id})
        finally:
            if request.copying:
                with self._copying_lock:
                    self.copying -= 1
            if not keep:
                shutil.rmtree(staging, ignore_errors=True)

    def _copy_to_workspace(self, request: Request) -> None:
        """Cloudgene copies the upload into the job's workspace before the job exists: instant here, unless a
        `slow_submit` fault makes it take a while (and a proxy's error page maybe reach the client first)."""
        slow = self.faults.take_submit_fault()
        if slow is None:
            return
        with self._copying_lock:
            self.copying += 1
        request.copying = True  # until the job exists or the submit is refused (`submit`'s finally)
        if slow.proxy_status is not None and request.answer_early is not None:
            request.answer_early(proxy_error_response(slow.proxy_status))
        self.sleep(slow.seconds)

    def _parse_form(self, form: Form) -> tuple[JobParams, list[str]]:
        """Cloudgene's parseAndUpdateInputParams: unknown names are a 400, values are HTML-escaped, the first
        value of a name wins. Returns the params and the value problems a real server only finds in the job."""
        props: dict[str, str] = {}
        for name, value in form.fields:
            key = escape_html(name).replace("input-", "")
            if key != "job-name" and not key.endswith("-pattern") and key not in INPUTS:
                raise ApiError(400, f"Parameter '{key}' not found.")
            cleaned = escape_html(value)
            if key == "files" and cleaned.startswith(("sftp://", "http://", "https://", "ftp://", "s3://")):
                raise ApiError(400, "Parameter 'files': URL-based uploads are no longer supported. "
                                    "Please use direct file uploads instead.")
            props.setdefault(key, cleaned)
        for upload in form.files:
            key = upload.field.replace("-upload", "").replace("input-", "")
            if key != "files":
                raise ApiError(400, f"Parameter '{escape_html(key)}' not found.")

        problems: list[str] = []
        # Cloudgene checks list values only where the app's workflow does: the build is, while r2Filter, phasing,
        # population and mode reach the workflow as sent (imputationserver2's main.nf), and the panel is resolved
        # when the job runs. What the workflow refuses fails the job then (`_late_problems`).
        values = {k: props.get(k, DEFAULTS.get(k, "")) for k in ("build", "r2Filter", "phasing", "population", "mode")}
        if values["build"] not in BUILDS:
            problems.append(f"Parameter 'build' has an invalid value '{values['build']}'.")
        requested = props.get("refpanel", "")
        if not requested:
            problems.append("Parameter 'refpanel' is required.")
        if not form.files:
            problems.append("Parameter 'files' is required: upload at least one *.vcf.gz file.")
        if problems and self.strict:
            raise ApiError(400, problems[0])
        refpanel = self.sim.resolve_panel(requested) or requested
        problems += _late_problems(values, refpanel, self.sim.panels.get(refpanel))
        password = props.get("password", "")
        params = JobParams(
            refpanel=refpanel,
            build=values["build"],
            r2_filter=_number(values["r2Filter"]),
            phasing=values["phasing"],
            population=values["population"],
            # main.nf tests `mode == 'imputation'`: anything else (the app's `qc_only`, the docs' `qconly`) is QC.
            mode="imputation" if values["mode"] == "imputation" else "qc_only",
            aes="aesEncryption" in props,
            meta="meta" in props,
            password=password or generate_password(),
            password_generated=not password,
        )
        return params, problems

    def _validate(
        self, uploads: list[tuple[Path, str]], params: JobParams, problems: list[str]
    ) -> tuple[list[str], list[str], list[VcfSummary]]:
        """imputationserver's input validation, run before the job is queued; errors surface when it runs."""
        errors = list(problems)
        summaries = [inspect_vcf(path, name) for path, name in uploads]
        warnings = [w for s in summaries for w in s.warnings]
        errors += [e for s in summaries for e in s.errors]
        if errors:
            return errors, warnings, summaries
        seen: dict[str, str] = {}
        for s in summaries:
            if len(s.chromosomes) > 1:
                errors.append("The provided VCF file contains more than one chromosome. "
                              "Please split your input VCF file by chromosome.")
                continue
            chrom = s.chromosomes[0]
            number = chromosome_number(chrom)
            has_prefix = chrom.startswith("chr")
            if params.build == "hg19" and has_prefix:
                errors.append(f"Your upload data contains chromosome '{chrom}'. This is not a valid hg19 encoding. "
                              f"Please ensure that your input data is build hg19 and chromosome is encoded as "
                              f"'{number}'.")
            elif params.build == "hg38" and not has_prefix:
                errors.append(f"Your upload data contains chromosome '{chrom}'. This is not a valid hg38 encoding. "
                              f"Please ensure that your input data is build hg38 and chromosome is encoded as "
                              f"'chr{number}'.")
            elif number not in CHROMOSOMES:
                errors.append(f"Chromosome '{chrom}' is not supported by this reference panel.")
            if chrom in seen:
                errors.append(f"Chromosome {chrom} is present in more than one file ('{seen[chrom]}' and "
                              f"'{s.filename}').")
            seen[chrom] = s.filename
        if summaries and any(s.samples != summaries[0].samples for s in summaries[1:]):
            errors.append("The provided VCF files do not contain the same samples.")
        n = len(summaries[0].samples) if summaries else 0
        if summaries and n < MIN_SAMPLES:
            errors.append(f"At least {MIN_SAMPLES} samples must be uploaded (found {n}).")
        if n > MAX_SAMPLES:
            errors.append(f"At most {MAX_SAMPLES} samples can be imputed per job (found {n}).")
        panel = self.sim.panels.get(params.refpanel)
        if panel is not None and params.population not in panel.populations:
            errors.append(f"Population '{params.population}' is not supported by reference panel "
                          f"'{params.refpanel}'.")
        return errors, warnings, summaries


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


def _late_problems(values: dict[str, str], refpanel: str, panel: Panel | None) -> list[str]:
    """What imputationserver2's workflow refuses of the submitted values once the job runs (the job fails)."""
    if panel is None:
        return [f"Application '{refpanel}' not installed or wrong permissions."]
    problems = []
    if not values["population"]:
        # AfriGen's workflow: a job submitted without population fails at its first step.
        problems.append("Expected parameter for option '--population'")
    r2 = values["r2Filter"]
    try:
        valid_r2 = 0 <= float(r2) < 1
    except ValueError:
        valid_r2 = False
    if not valid_r2:
        problems.append(f"Invalid r2Filter '{r2}': expected a number from 0 to below 1.")
    if values["phasing"] not in PHASING:
        problems.append(f"Unknown phasing method '{values['phasing']}'.")
    elif values["phasing"] == "beagle" and not panel.beagle:
        problems.append(f"Phasing with beagle is not available for reference panel '{refpanel}'.")
    return problems


#: How long a presigned URL is good for (S3's default in Cloudgene's deployments: an hour).
PRESIGNED_LIFETIME = 3600.0
_RANGE = re.compile(r"bytes=(\d+)-")


class _TooLarge(Exception):
    pass


class _Limited:
    """Refuses to read past the upload limit (chunked bodies carry no Content-Length to check up front)."""

    def __init__(self, body: BodyReader, limit: int) -> None:
        self._body = body
        self._limit = limit

    def read(self, n: int) -> bytes:
        data = self._body.read(n)
        if self._body.consumed > self._limit:
            raise _TooLarge
        return data

    def drain(self, limit: int | None = None) -> bool:
        return self._body.drain(limit)


def _too_large() -> Response:
    page = ("<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n"
            "<center><h1>413 Request Entity Too Large</h1></center>\r\n<hr><center>nginx</center>\r\n"
            "</body>\r\n</html>\r\n")
    return Response(413, page.encode(), content_type="text/html", close=True)


def _read_small(body: BodyReader, limit: int = 1 << 16) -> bytes:
    chunks, total = [], 0
    while not body.done:
        data = body.read(limit)
        chunks.append(data)
        total += len(data)
        if total > limit:
            raise ApiError(413, "Request Entity Too Large", json_body=False)
    return b"".join(chunks)
