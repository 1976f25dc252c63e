"""The GA4GH WES 1.1 adapter: any Workflow Execution Service server (sapporo, Toil, Cromwell's WES, …).

Where the API is (`base_url`)
    - ends with `/ga4gh/wes/v1`: that is the API root, used as given;
    - any other path (`https://host/wes`): the operator named the API root, used as given (a server mounted at
      the root of a proxy path);
    - no path (`https://host:1122`): the standard `/ga4gh/wes/v1` is appended. Some servers (sapporo by default)
      mount the API at the root of a bare origin instead: on its first call the adapter asks the standard place
      for `service-info` and, only if that is a 404 and the root answers `service-info` with a JSON object, uses
      the root from then on.

What a run gets (`POST /runs`, multipart): `workflow_url`, `workflow_type`, `workflow_type_version`,
`workflow_params` (the `wes.workflow_params` template rendered with the job, see `render_params`), `tags`
(`{"imputationd_job_id": <our job id>}` and the job name), the engine fields when configured, and, with
`inputs_as: attachment`, one streamed `workflow_attachment` part per input file (under its file name with
characters other than letters, digits, ".", "_" and "-" replaced by "_", the same name `{files}` gives). The
Cloudgene-only request fields (`password`, `aes_encryption`, `meta`) mean nothing to WES and are not sent.

Finding a lost submit (`find_submitted`): WES has no idempotency key. The adapter walks every page of `GET /runs`
(servers list in no fixed order, so no prefix of the list is enough) and compares our tag: from the list entry when
the server includes `tags` there (WES 1.1 `RunSummary`, sapporo), else from `GET /runs/{id}` `request.tags`, one run
at a time, remembering each run's tag so that the next lookup asks only about runs it has not seen. The list may
come under `workflows` (WES 0.3; the reference server `wes-service`) instead of `runs`; an answer with neither is a
bad response, never an empty server, or a lost submit would be sent again.

Outputs: the spec leaves `RunLog.outputs` free-form, so `parse_outputs` reads the shapes servers use (sapporo's
list of `{file_name, file_url}`, a mapping of output name to URL, to `{location|url|path}` or to CWL File and
Directory objects with `checksum: "sha1$…"`); scalar outputs are skipped, anything else is a `bad_response`.

The token (`Authorization: Bearer`) is read from the callable on every request and is sent only to the API's own
origin (httpx drops it on cross-origin redirects). Messages never name an output URL; what the server says is
quoted as it is, and the boundary every adapter sits behind (`daemon.services.scrubbing`) scrubs secrets out of it.
`check()` reports a JWT's `exp` (read, not verified) as `token_expires`.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import re
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlsplit

import httpx

from daemon.config import ServiceConfig, WesConfig
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
from daemon.services.errors import Blocked, Permanent, ServiceError, Transient
from daemon.services.http import (
    ClientPerThread,
    SubmitProgress,
    json_object,
    make_client,
    open_body,
    raise_for_status,
    range_headers,
    refused,
    send,
)
from daemon.states import wes_kind
from daemon.templates import PLACEHOLDERS, TemplateError, placeholders_used, render_params, template_problems
from daemon.text import printable, strip_ansi

API_PATH = "/ga4gh/wes/v1"
#: The tag that carries our job id on the server.
TAG_JOB_ID = "imputationd_job_id"
#: The tag that carries the job's human name, when it has one.
TAG_NAME = "imputationd_name"


#: A run id we accept from a server: it goes into URL paths, so no slashes, spaces or controls.
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~:@+=-]{0,199}")
#: Characters an attachment name keeps (servers sanitise others differently; sapporo turns " " into "_").
_ATTACHMENT_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

#: States after which the full RunLog (outputs, stderr) is fetched; others need only `/status`.
_DETAIL_STATES = frozenset({"COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR"})
#: How much of a failed run's stderr goes into the failure message.
STDERR_LINES = 15
STDERR_CHARS = 1500
#: Most bytes read from a stderr log the server publishes as a URL (only the tail is kept).
STDERR_FETCH_LIMIT = 4 * 1024 * 1024

_CHECKSUM_ALGORITHMS = {"md5": 32, "sha1": 40, "sha224": 56, "sha256": 64, "sha384": 96, "sha512": 128}
_LOCATION_KEYS = ("file_url", "location", "url", "uri", "href", "path")
_URL_KEYS = frozenset({"file_url", "url", "href"})
_NAME_KEYS = ("file_name", "basename", "name")
_MAX_OUTPUT_DEPTH = 8


# --------------------------------------------------------------------------------------------- pure helpers


def split_base_url(base_url: str) -> tuple[str, str | None]:
    """(API root, root-mount fallback) for a configured `base_url`; see the module docstring for the rule.

    The fallback is the bare origin, offered only when `base_url` has no path."""
    text = base_url.strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
    if parts.query or parts.fragment:
        raise ValueError("base_url must not have a query string or fragment")
    if parts.username is not None or parts.password is not None:
        raise ValueError("base_url must not contain credentials (the token comes from token_file or token_env)")
    origin = f"{parts.scheme}://{parts.netloc}"
    path = parts.path.rstrip("/")
    if not path:
        return origin + API_PATH, origin
    return origin + path, None


def attachment_name(path: Path) -> str:
    """The name an input file is attached under: its file name with characters servers rename replaced by `_`."""
    name = _ATTACHMENT_UNSAFE.sub("_", path.name)
    return "input" if name in ("", ".", "..") else name


def parse_checksum(value: Any) -> tuple[str, str] | None:
    """("sha1", hex) from CWL's "sha1$<hex>", "sha256:<hex>" or a DRS-style {"type", "checksum"}; else None."""
    if isinstance(value, Mapping):
        algorithm, digest = value.get("type"), value.get("checksum")
    elif isinstance(value, str):
        algorithm, sep, digest = value.replace(":", "$", 1).partition("$")
        if not sep:
            return None
    else:
        return None
    if not isinstance(algorithm, str) or not isinstance(digest, str):
        return None
    algorithm = algorithm.strip().lower().replace("-", "").replace("_", "")
    digest = digest.strip().lower()
    length = _CHECKSUM_ALGORITHMS.get(algorithm)
    if length is None or len(digest) != length or not all(c in "0123456789abcdef" for c in digest):
        return None
    return algorithm, digest


def parse_outputs(outputs: Any, *, api_root: str, call: str) -> tuple[RemoteOutput, ...]:
    """The downloadable files of a RunLog's `outputs`, whatever shape the server chose (module docstring)."""
    found: list[tuple[str | None, str, str, tuple[str, str] | None, int | None]] = []

    def location_of(value: str, key: str | None = None) -> str | None:
        """A URL (absolute, or relative to the API root) or a server path (file://) from a string output."""
        value = value.strip()
        if "://" in value:
            return value
        if key in _URL_KEYS and value:
            return value  # a URL relative to the API (a leading "/" is a path on the API's host)
        if value.startswith("/"):
            return "file://" + value  # a path on the server's file system: listed, but not downloadable
        return None

    def add(key: str | None, name: str | None, location: str, obj: Mapping[str, Any] | None, prefix: str) -> None:
        parts = urlsplit(location)
        if not parts.scheme:
            location = urljoin(api_root + "/", location)
            parts = urlsplit(location)
        if not name:
            name = unquote(PurePosixPath(parts.path).name) or key or "output"
        checksum = None
        size = None
        if obj is not None:
            checksum = parse_checksum(obj.get("checksum"))
            if checksum is None and isinstance(obj.get("checksums"), list):
                checksum = next((c for c in map(parse_checksum, obj["checksums"]) if c), None)
            # A negative size (-1: "unknown" to some servers) publishes nothing to check the file against.
            if isinstance(obj.get("size"), int) and not isinstance(obj.get("size"), bool) and obj["size"] >= 0:
                size = obj["size"]
        found.append((key, prefix + name, location, checksum, size))

    def walk(value: Any, key: str | None, prefix: str, depth: int) -> None:
        if depth > _MAX_OUTPUT_DEPTH:
            raise Transient(f"{call}: outputs are nested too deeply", kind="bad_response")
        if isinstance(value, str):
            location = location_of(value)
            if location is not None:
                add(key, None, location, None, prefix)
        elif isinstance(value, list):
            for item in value:
                walk(item, key, prefix, depth + 1)
        elif isinstance(value, Mapping):
            walk_object(value, key, prefix, depth)
        # numbers, booleans and null are scalar outputs: nothing to download

    def walk_object(obj: Mapping[str, Any], key: str | None, prefix: str, depth: int) -> None:
        kind = obj.get("class")
        name = next((obj[k] for k in _NAME_KEYS if isinstance(obj.get(k), str) and obj[k].strip()), None)
        if kind == "Directory":
            listing = obj.get("listing")
            if isinstance(listing, list):
                sub = prefix + (f"{name}/" if name else "")
                for item in listing:
                    walk(item, key, sub, depth + 1)
            return
        location = None
        for location_key in _LOCATION_KEYS:
            if isinstance(obj.get(location_key), str):
                location = location_of(obj[location_key], location_key)
                if location is not None:
                    break
        if location is not None:
            add(key, name, location, obj, prefix)
            for secondary in obj.get("secondaryFiles") or []:
                walk(secondary, key, prefix, depth + 1)
            return
        if kind == "File":
            raise Transient(f"{call}: output {key or name or '?'} is a File without a location", kind="bad_response")
        for sub_key, sub_value in obj.items():  # a record: look inside
            walk(sub_value, key if key is not None else str(sub_key), prefix, depth + 1)

    if outputs is None:
        return ()
    if isinstance(outputs, list):
        walk(outputs, None, "", 0)
    elif isinstance(outputs, Mapping):
        if "class" in outputs or any(k in outputs for k in _LOCATION_KEYS):
            walk_object(outputs, None, "", 0)
        else:
            for key, value in outputs.items():
                walk(value, str(key), "", 1)
    else:
        raise Transient(f"{call}: outputs has an unexpected shape ({type(outputs).__name__})", kind="bad_response")

    result: list[RemoteOutput] = []
    used: set[str] = set()
    for key, raw_name, location, checksum, size in found:
        name = _safe_name(raw_name) or _safe_name(key or "") or "output"
        if name in used:
            candidates = [f"{_safe_name(key)}/{name}"] if key and _safe_name(key) else []
            candidates += [f"{n}/{name}" for n in range(2, len(found) + 2)]
            name = next(c for c in candidates if c not in used)
        used.add(name)
        result.append(
            RemoteOutput(
                name=name,
                url=location,
                checksum=checksum,
                size=size,
                size_text=f"{size} bytes" if size is not None else None,
            )
        )
    return tuple(result)


def _failed_task(log: Mapping[str, Any]) -> str | None:
    """The first task of the run whose exit code says it failed (WES `task_logs`, or the older `tasks`)."""
    tasks = log.get("task_logs", log.get("tasks"))
    if not isinstance(tasks, list):
        return None
    for task in tasks:
        if isinstance(task, Mapping) and isinstance(task.get("exit_code"), int) and task["exit_code"] != 0:
            name = task.get("name")
            return printable(name, 120) if isinstance(name, str) and name.strip() else "(unnamed)"
    return None


class LocalFile:
    """A `ByteStream` over a file on the shared file system (`outputs_as: path`)."""

    def __init__(self, fh: Any, length: int, call: str, *, start: int = 0) -> None:
        self._fh = fh
        self._length = length
        self._call = call
        self._received = 0
        self._start = start

    @property
    def length(self) -> int:
        return self._length

    @property
    def received(self) -> int:
        return self._received

    @property
    def start(self) -> int:
        return self._start

    @property
    def source(self) -> None:
        return None

    @property
    def validator(self) -> None:
        return None

    def chunks(self, size: int | None = None) -> Iterator[bytes]:
        while True:
            try:
                chunk = self._fh.read(size or COPY_CHUNK)
            except OSError as exc:
                raise Transient(f"{self._call}: {exc.strerror or exc}", kind="local_io") from None
            if not chunk:
                return
            self._received += len(chunk)
            yield chunk


#: Bytes read at a time from a file on the shared file system.
COPY_CHUNK = 1 << 20


def _safe_name(name: str) -> str:
    """A relative path without empty, "." or ".." parts (a name the downloader may join under a directory)."""
    parts = [part for part in PurePosixPath(name.replace("\\", "/")).parts if part not in ("", ".", "..", "/")]
    return "/".join(parts)


def jwt_expiry(token: str) -> dt.datetime | None:
    """The `exp` of a JWT (read, not verified: only to warn before it runs out); None for other tokens."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, UnicodeDecodeError):
        return None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    if not isinstance(exp, (int, float)) or isinstance(exp, bool):
        return None
    try:
        return dt.datetime.fromtimestamp(exp, tz=dt.UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _excerpt(text: str) -> str:
    """The last lines of a run's log, without the terminal escapes a workflow engine colours them with."""
    lines = [line.rstrip() for line in strip_ansi(text).strip().splitlines() if line.strip()]
    tail = "\n".join(lines[-STDERR_LINES:])
    if len(tail) > STDERR_CHARS:
        tail = "…" + tail[-STDERR_CHARS:]
    return tail


def _bad(call: str, what: str) -> Transient:
    return Transient(f"{call}: {what}", kind="bad_response")


# --------------------------------------------------------------------------------------------- the adapter


class WesAdapter:
    """One GA4GH WES 1.1 server. Thread-safe: pool threads share one instance (and its httpx client)."""

    #: Pages of `GET /runs` one walk reads at most: far more than a server's runs fill, and an end to a server
    #: that hands out fresh page tokens for ever. Reaching it is a bad response (the lookup is retried later), not
    #: "not found", which would submit the job again.
    max_list_pages: int = 10_000
    #: Runs whose tag `find_submitted` has read remembered at most (a run's tags never change).
    max_known_tags: int = 100_000

    def __init__(
        self,
        config: ServiceConfig,
        *,
        token: Callable[[], str | None],
        max_connections: int = 10,
        client: httpx.Client | None = None,
    ) -> None:
        if config.wes is None:
            raise ValueError(f"services.{config.name}.wes: a WES service needs its workflow settings")
        self.name = config.name
        self.config = config
        self._wes: WesConfig = config.wes
        self._token = token
        self._standard_root, self._origin_fallback = split_base_url(config.base_url)
        self._root: str | None = None if self._origin_fallback else self._standard_root
        self._root_lock = threading.Lock()
        self._origin = self._origin_key(self._standard_root)
        #: run id → our job id tag (None: not one of ours), read from run logs by `find_submitted`.
        self._known_tags: dict[str, str | None] = {}
        #: The calling thread's client (`ClientPerThread`), or the one given.
        self._client: Callable[[], httpx.Client] = (lambda: client) if client is not None else ClientPerThread(
            lambda: make_client(self._standard_root, timeout=config.timeout, max_connections=max_connections)
        )

    # ------------------------------------------------------------------ the interface

    def submit(self, request: SubmitRequest) -> str:
        """POST /runs; return the run id. An error's `may_have_created` says whether the run may exist (a timeout,
        a 5xx, a garbled answer): then look it up with `find_submitted` before submitting again."""
        progress = SubmitProgress()
        try:
            return self._submit(request, progress)
        except ServiceError as exc:
            exc.may_have_created = progress.may_have_created(exc, refused)
            raise

    def _submit(self, request: SubmitRequest, progress: SubmitProgress) -> str:
        call = "POST /runs"
        wes = self._wes
        paths = [Path(p) for p in request.files]
        if wes.inputs_as == "attachment":
            names = [attachment_name(p) for p in paths]
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise Permanent(
                    f"{call}: input files would be attached under the same name: {', '.join(duplicates)}",
                    kind="duplicate_input_name",
                )
        else:
            names = [os.path.abspath(p) for p in paths]
        if "cwl_file" in placeholders_used(wes.workflow_params) and len(names) != 1:
            raise Permanent(f"{call}: the workflow takes one input file ({{cwl_file}} in workflow_params) and the job "
                            f"has {len(names)}", kind="bad_request")
        cwl_files = [{"class": "File", "location": name} for name in names]
        fields = {
            "files": names,
            "cwl_files": cwl_files,
            "cwl_file": cwl_files[0] if len(cwl_files) == 1 else None,
            "panel": request.panel,
            "build": request.build,
            "population": request.population,
            "phasing": request.phasing,
            "r2_filter": request.r2_filter,
            "mode": request.mode,
            "job_id": request.job_id,
            "name": request.name,
        }
        try:
            params = render_params(wes.workflow_params, fields)
        except TemplateError as exc:
            # An operator's mistake that no job can get past: block the service, do not fail jobs one by one.
            raise Blocked(f"services.{self.name}.wes.workflow_params: {exc}", kind="config") from None
        tags = {TAG_JOB_ID: request.job_id}
        if request.name:
            tags[TAG_NAME] = request.name
        form: list[tuple[str, Any]] = [
            ("workflow_url", wes.workflow_url),
            ("workflow_type", wes.workflow_type),
            ("workflow_type_version", wes.workflow_type_version),
            ("workflow_params", json.dumps(params)),
            ("tags", json.dumps(tags)),
        ]
        if wes.engine:
            form.append(("workflow_engine", wes.engine))
        if wes.engine_version:
            form.append(("workflow_engine_version", wes.engine_version))
        if wes.engine_parameters:
            form.append(("workflow_engine_parameters", json.dumps(wes.engine_parameters)))
        # Every field as a multipart part (filename None = a plain form field), so that the body is multipart even
        # without attachments; file parts are file objects that httpx reads in chunks while sending.
        parts: list[tuple[str, tuple[str | None, Any, str | None]]] = [(k, (None, v, None)) for k, v in form]
        with contextlib.ExitStack() as files:
            if wes.inputs_as == "attachment":
                for path, name in zip(paths, names, strict=True):
                    try:
                        handle = files.enter_context(path.open("rb"))
                    except OSError as exc:
                        raise Permanent(
                            f"{call}: cannot read input {path.name}: {exc.strerror or type(exc).__name__}",
                            kind="input_unreadable",
                        ) from None
                    parts.append(("workflow_attachment", (name, handle, "application/octet-stream")))
            # The attachments go under the transfer rule; the server then answers within the usual timeouts.
            url = self._url("runs")
            progress.sent = True
            response = self._send("POST", url, call, progress=progress, files=parts, budget=Budget.upload(
                answer_wait=self.config.timeout, answer_time=API_DEADLINE_FACTOR * self.config.timeout))
        body = json_object(response, call)
        return self._run_id(body.get("run_id"), call)

    def find_submitted(self, job_id: str) -> str | None:
        """The run tagged with our `job_id` among every run the server lists, if any."""
        for entry in self._iter_runs():
            run_id: str = entry["run_id"]
            tags = entry.get("tags")
            if isinstance(tags, Mapping):
                tag = tags.get(TAG_JOB_ID)
            elif run_id in self._known_tags:
                tag = self._known_tags[run_id]
            else:
                try:
                    log = self._run_log(run_id)
                except Permanent as exc:
                    if exc.kind == "http_404":  # deleted between the list and now
                        continue
                    raise
                request = log.get("request")
                tag = (_tags(request.get("tags")) if isinstance(request, Mapping) else {}).get(TAG_JOB_ID)
                if len(self._known_tags) >= self.max_known_tags:
                    self._known_tags.clear()
                self._known_tags[run_id] = tag if isinstance(tag, str) else None
            if tag == job_id:
                return run_id
        return None

    def status(self, remote_id: str) -> RemoteStatus:
        call = f"GET /runs/{remote_id}/status"
        body = json_object(self._send("GET", self._url("runs", remote_id, "status"), call), call)
        state = body.get("state")
        if not isinstance(state, str) or not state:
            raise _bad(call, "the answer has no state")
        if state not in _DETAIL_STATES:
            return RemoteStatus(kind=wes_kind(state), raw_state=state)
        log = self._run_log(remote_id)
        call = f"GET /runs/{remote_id}"
        logged = log.get("state")
        state = logged if isinstance(logged, str) and logged else state
        kind = wes_kind(state)
        if state == "COMPLETE":
            outputs = parse_outputs(log.get("outputs"), api_root=self._api_root(), call=call)
            return RemoteStatus(kind=kind, raw_state=state, outputs=outputs)
        if state in ("EXECUTOR_ERROR", "SYSTEM_ERROR"):
            failed_task = _failed_task(log)
            message = self._failure_message(state, log, remote_id)
            return RemoteStatus(kind=kind, raw_state=state, message=f"task {failed_task}: {message}" if failed_task
                                else message, failed_step=failed_task,
                                qc=QcReport(failed_step=failed_task) if failed_task else None)
        return RemoteStatus(kind=kind, raw_state=state)

    def cancel(self, remote_id: str) -> None:
        call = f"POST /runs/{remote_id}/cancel"
        self._send("POST", self._url("runs", remote_id, "cancel"), call)

    def restart(self, remote_id: str) -> None:
        raise Permanent(
            f"{self.name}: a WES run cannot be restarted (run {remote_id}); submit the job again", kind="unsupported"
        )

    def list_jobs(self, limit: int = 100) -> list[RemoteJob]:
        jobs = []
        for entry in self._iter_runs(limit):
            tags = entry.get("tags")
            name = tags.get(TAG_JOB_ID) if isinstance(tags, Mapping) else None
            state = entry.get("state")
            jobs.append(
                RemoteJob(
                    remote_id=entry["run_id"],
                    name=name if isinstance(name, str) else None,
                    raw_state=state if isinstance(state, str) else "UNKNOWN",
                )
            )
        return jobs

    def stream_output(self, output: RemoteOutput, *, resume: Resume | None = None
                      ) -> contextlib.AbstractContextManager[ByteStream]:
        if self._wes.outputs_as == "path" and urlsplit(output.url).scheme == "file":
            return self._copy(output, resume.offset if resume is not None else 0)
        return self._stream(output.url, f"GET output {output.name}", headers=range_headers(resume))

    @contextlib.contextmanager
    def _copy(self, output: RemoteOutput, offset: int = 0) -> Iterator[ByteStream]:
        """A result the server published as a path on the shared file system, read from there: only from under
        `wes.outputs_root`, wherever its path or a symlink on the way points."""
        call = f"copy of output {output.name}"
        root = self._wes.outputs_root
        assert root is not None  # the config requires it with outputs_as: path
        published = Path(unquote(urlsplit(output.url).path))
        try:
            resolved = published.resolve(strict=True)
            inside = resolved.is_relative_to(root.resolve(strict=True))
        except FileNotFoundError:
            raise Permanent(f"{call}: {published} does not exist on this machine", kind="not_downloadable") from None
        except OSError as exc:
            raise Transient(f"{call}: {published}: {exc.strerror or exc}", kind="local_io") from None
        if not inside:
            raise Permanent(f"{call}: {published} is not under wes.outputs_root ({root})", kind="outside_root")
        try:
            # No symlink may have been put in place since it was resolved.
            fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise Transient(f"{call}: {published}: {exc.strerror or exc}", kind="local_io") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise Permanent(f"{call}: {published} is not a regular file", kind="not_downloadable")
        with os.fdopen(fd, "rb") as fh:
            start = offset if 0 < offset <= info.st_size else 0
            fh.seek(start)
            yield LocalFile(fh, info.st_size - start, call, start=start)

    def check(self) -> ServiceCheck:
        """GET /service-info (reachable, what it runs) and GET /runs?page_size=1 (whether the token is accepted).

        WES has no panels; the message lists the workflow types and engines the server offers instead."""
        call = "GET /service-info"
        try:
            token = self._read_token()
        except Blocked as exc:
            return ServiceCheck(reachable=False, token_valid=False, message=str(exc))
        expires = jwt_expiry(token) if token else None
        try:
            info = json_object(self._send("GET", self._url("service-info"), call), call)
        except Blocked as exc:
            note = "" if token else " (no token is configured)"
            return ServiceCheck(reachable=True, token_valid=False, token_expires=expires, message=f"{exc}{note}")
        except ServiceError as exc:
            hint = ""
            if exc.kind == "http_404":
                hint = f" (is {self._api_root()} the WES API root? base_url may end in {API_PATH} or name the path)"
            return ServiceCheck(reachable=False, token_expires=expires, message=f"{exc}{hint}")
        notes = [self._describe(info)]
        token_valid: bool | None = None
        try:
            self._send("GET", self._url("runs"), "GET /runs", params={"page_size": 1})
            token_valid = True if token else None
        except Blocked as exc:
            token_valid = False
            notes.append(str(exc) if token else f"{exc} (no token is configured)")
        except ServiceError as exc:
            notes.append(str(exc))
        return ServiceCheck(reachable=True, token_valid=token_valid, token_expires=expires, message="; ".join(notes))

    def close(self) -> None:
        if isinstance(self._client, ClientPerThread):
            self._client.close()

    # ------------------------------------------------------------------ HTTP

    def _read_token(self) -> str | None:
        try:
            token = self._token()
        except Exception as exc:  # the callable is the operator's token file; its failure blocks, never leaks
            raise Blocked(f"{self.name}: the token could not be read ({type(exc).__name__})", kind="token") from None
        return token.strip() if token and token.strip() else None

    def _auth(self, token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token else {}

    @staticmethod
    def _origin_key(url: str | httpx.URL) -> tuple[str, str, int | None]:
        parsed = httpx.URL(url) if isinstance(url, str) else url
        default = {"http": 80, "https": 443}.get(parsed.scheme)
        return parsed.scheme, parsed.host.lower(), parsed.port or default

    def _api_root(self) -> str:
        """The API root; for a bare-origin base_url, decided once (standard prefix, or root if only it answers)."""
        if self._root is not None:
            return self._root
        with self._root_lock:
            if self._root is None:
                self._root = self._probe_root()
            return self._root

    def _probe_root(self) -> str:
        assert self._origin_fallback is not None
        headers = self._auth(self._read_token())
        call = "GET /service-info"
        standard = send(self._client(), "GET", f"{self._standard_root}/service-info", call=call,
                        budget=Budget.api(self.config.timeout), headers=headers)
        if standard.status_code != 404:
            return self._standard_root
        root = send(self._client(), "GET", f"{self._origin_fallback}/service-info", call=call,
                    budget=Budget.api(self.config.timeout), headers=headers)
        if root.status_code == 200:
            with contextlib.suppress(Transient):
                json_object(root, call)
                return self._origin_fallback
        return self._standard_root

    def _url(self, *segments: str) -> str:
        return "/".join([self._api_root(), *(quote(s, safe="") for s in segments)])

    def _send(
        self, method: str, url: str, call: str, *, budget: Budget | None = None,
        progress: SubmitProgress | None = None, **kwargs: Any
    ) -> httpx.Response:
        """One API call within `budget` (an API call's by default): bearer token when there is one; transport
        errors, answers too large and HTTP errors turned into ours. A submit's answer is kept in `progress`, to tell
        a refusal from an unknown outcome."""
        token = self._read_token()
        response = send(self._client(), method, url, call=call, budget=budget or Budget.api(self.config.timeout),
                        headers=self._auth(token), **kwargs)
        if progress is not None:
            progress.answer = response
        raise_for_status(response, call)
        return response

    @contextlib.contextmanager
    def _stream(self, url: str, call: str, budget: Budget | None = None, headers: dict[str, str] | None = None
                ) -> Iterator[ByteStream]:
        """A streaming GET within `budget` (a transfer's by default); the bearer token goes only to the API's
        origin. Errors while the caller reads are ours."""
        try:
            target = httpx.URL(url)
        except (httpx.InvalidURL, TypeError):
            raise Permanent(f"{call}: the server gave no usable URL", kind="not_downloadable") from None
        if target.scheme not in ("http", "https"):
            where = "a path on the server" if target.scheme == "file" else f"a {target.scheme or 'relative'} location"
            hint = "; on a file system shared with it, set wes.outputs_as: path" if target.scheme == "file" else ""
            raise Permanent(
                f"{call}: the server publishes this output as {where}, not an HTTP URL we can download{hint}",
                kind="not_downloadable",
            )
        token = self._read_token() if self._origin_key(target) == self._origin else None
        with open_body(self._client(), target, call=call, budget=budget or Budget.transfer(),
                       headers={**self._auth(token), **(headers or {})}) as body:
            yield body

    # ------------------------------------------------------------------ WES answers

    def _run_id(self, value: Any, call: str) -> str:
        if not isinstance(value, str) or not _RUN_ID.fullmatch(value):
            shown = repr(value)[:60] if isinstance(value, str) else type(value).__name__
            raise _bad(call, f"the answer has no usable run_id ({shown})")
        return value

    def _run_log(self, run_id: str) -> dict[str, Any]:
        call = f"GET /runs/{run_id}"
        return json_object(self._send("GET", self._url("runs", run_id), call), call)

    def _iter_runs(self, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Entries of GET /runs (each with a valid run_id), page by page until the last page, or until `limit` of
        them."""
        call = "GET /runs"
        yielded = 0
        page_token: str | None = None
        seen_tokens: set[str] = set()
        for _ in range(self.max_list_pages):
            wanted = self._wes.page_size if limit is None else min(self._wes.page_size, limit - yielded)
            params: dict[str, Any] = {"page_size": max(1, wanted)}
            if page_token:
                params["page_token"] = page_token
            body = json_object(self._send("GET", self._url("runs"), call, params=params), call)
            key = "runs" if "runs" in body else "workflows"  # WES 0.3 servers (wes-service) say `workflows`
            runs = body.get(key)
            if runs is None:
                raise _bad(call, "the answer lists no runs (neither runs nor workflows)")
            if not isinstance(runs, list):
                raise _bad(call, f"{key} is a {type(runs).__name__}, not a list")
            for entry in runs:
                if not isinstance(entry, Mapping):
                    raise _bad(call, f"a runs entry is a {type(entry).__name__}, not an object")
                entry = dict(entry)
                entry["run_id"] = self._run_id(entry.get("run_id"), call)
                yield entry
                yielded += 1
                if limit is not None and yielded >= limit:
                    return
            next_token = body.get("next_page_token")
            # The token, not the length of the page, says whether more follow: an empty page with a new token is
            # read past.
            if not isinstance(next_token, str) or not next_token or next_token in seen_tokens:
                return
            seen_tokens.add(next_token)
            page_token = next_token
        raise _bad(call, f"the run list goes on past {self.max_list_pages} pages")

    def _failure_message(self, state: str, log: Mapping[str, Any], run_id: str) -> str:
        logged = log.get("run_log")
        run_log: Mapping[str, Any] = logged if isinstance(logged, Mapping) else {}
        exit_code = run_log.get("exit_code")
        head = state + (f" (exit code {exit_code})" if isinstance(exit_code, int) else "")
        excerpt = self._stderr_excerpt(run_log.get("stderr"), run_id)
        if not excerpt:
            system_logs = run_log.get("system_logs")  # sapporo: why a run failed before its workflow started
            if isinstance(system_logs, list) and system_logs and isinstance(system_logs[-1], str):
                excerpt = _excerpt(system_logs[-1])
        return f"{head}: {excerpt}" if excerpt else head

    def _stderr_excerpt(self, stderr: Any, run_id: str) -> str:
        """The last lines of stderr: the text itself (sapporo), or read from the URL the spec says it may be."""
        if not isinstance(stderr, str) or not stderr.strip():
            return ""
        text = stderr.strip()
        if not re.fullmatch(r"https?://\S+", text):
            return _excerpt(text)
        tail: deque[bytes] = deque()
        kept = 0
        read = 0
        try:
            with self._stream(text, f"GET stderr of run {run_id}", Budget.api(self.config.timeout)) as body:
                for chunk in body.chunks():
                    read += len(chunk)
                    tail.append(chunk)
                    kept += len(chunk)
                    while kept - len(tail[0]) > 64 * 1024:
                        kept -= len(tail.popleft())
                    if read >= STDERR_FETCH_LIMIT:
                        break
        except ServiceError as exc:
            return f"(the stderr log could not be read: {exc.kind})"
        return _excerpt(b"".join(tail).decode("utf-8", errors="replace"))

    def _describe(self, info: Mapping[str, Any]) -> str:
        """What the server runs, and whether it offers what we are configured to send."""
        wes = self._wes
        types = _versions(info.get("workflow_type_versions"), "workflow_type_version")
        engines = _versions(info.get("workflow_engine_versions"), "workflow_engine_version")
        notes = ["workflow types: " + (_listing(types) or "none listed")]
        if engines:
            notes.append("engines: " + _listing(engines))
        if types and wes.workflow_type not in types:
            notes.append(f"the configured workflow_type {wes.workflow_type} is not offered")
        elif types.get(wes.workflow_type) and wes.workflow_type_version not in types[wes.workflow_type]:
            notes.append(
                f"the configured workflow_type_version {wes.workflow_type} {wes.workflow_type_version} is not offered"
            )
        if wes.engine and engines and wes.engine not in engines:
            notes.append(f"the configured engine {wes.engine} is not offered")
        return "; ".join(notes)


def _tags(value: Any) -> dict[str, Any]:
    """`request.tags` as a mapping; some servers echo the form field back as JSON text."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = json.loads(value)
    return dict(value) if isinstance(value, Mapping) else {}


def _versions(value: Any, inner: str) -> dict[str, list[str]]:
    """{"CWL": ["v1.0", …]} from service-info's `{"CWL": {"workflow_type_version": [...]}}` (or a bare list)."""
    if not isinstance(value, Mapping):
        return {}
    result: dict[str, list[str]] = {}
    for name, entry in value.items():
        versions = entry.get(inner) if isinstance(entry, Mapping) else entry
        result[str(name)] = [str(v) for v in versions] if isinstance(versions, list) else []
    return result


def _listing(versions: Mapping[str, list[str]]) -> str:
    return ", ".join(f"{name} {'/'.join(v)}".strip() for name, v in versions.items())


__all__ = [
    "API_PATH",
    "PLACEHOLDERS",
    "TAG_JOB_ID",
    "TemplateError",
    "WesAdapter",
    "attachment_name",
    "jwt_expiry",
    "parse_checksum",
    "parse_outputs",
    "render_params",
    "split_base_url",
    "template_problems",
]
