"""The `imputationd` command.

Exit codes: 0 success; 1 the operation failed (a job not found, a demo that did not complete); 2 bad usage, config
or input; 3 the database is unreachable or its schema is not the one this version needs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from daemon import __version__, retention
from daemon.config import (
    BUILDS,
    MODES,
    PHASING,
    R2_FILTERS,
    Config,
    ConfigError,
    check_runtime,
    find_config_path,
    format_problems,
    load_config,
)
from daemon.crypto import PasswordCipher, SecretKeyError
from daemon.db.admin import group_state, job_detail, job_snapshot
from daemon.db.api_tokens import SCOPES
from daemon.db.engine import DatabaseUnavailable, describe_url, make_engine
from daemon.db.models import Job, OwnerStatus
from daemon.db.revision import UPGRADE_HINT, SchemaOutdated, ensure_current, upgrade_url
from daemon.db.store import JobStore
from daemon.db.transitions import JobNotFound
from daemon.logging import configure_logging
from daemon.owners import DEFAULT_OWNER, owner_problem
from daemon.pipeline import Pipeline
from daemon.scheduler import Daemon, make_owner
from daemon.services import Adapters, operator_adapter
from daemon.services.errors import ServiceError
from daemon.states import TERMINAL, JobState
from daemon.submission import Submission, SubmissionError, submit
from daemon.text import counted, json_default, printable, qc_summary

if TYPE_CHECKING:
    from daemon.api.server import ApiServer

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DATABASE = 3


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------- shared plumbing


def _load(args: argparse.Namespace, *, logs_to_stderr: bool = True) -> Config:
    """The config; and unless told otherwise, logging set up to write to stderr: stdout is for a command's result
    (and `--json`), whatever the work it does on the way (a remote cancel, a service check) logs."""
    path = find_config_path(getattr(args, "config", None))
    try:
        config = load_config(path)
    except ConfigError as exc:
        raise CliError(format_problems(exc), EXIT_USAGE) from None
    if logs_to_stderr:
        configure_logging(config.logging, stream=sys.stderr)
    return config


def _store(args: argparse.Namespace, config: Config) -> JobStore:
    try:
        engine = make_engine(config.database.url, pool_size=config.database.pool_size)
        ensure_current(engine)
    except DatabaseUnavailable as exc:
        raise CliError(str(exc), EXIT_DATABASE) from None
    except SchemaOutdated as exc:
        raise CliError(_schema_problem(args, exc), EXIT_DATABASE) from None
    # Passwords are sealed with the daemon's key (read, or created, only when a job is submitted).
    return JobStore(engine, sealer=PasswordCipher(config.storage.secret_key_path))


def _schema_problem(args: argparse.Namespace, exc: Exception) -> str:
    """`exc`'s message, its `db upgrade` hint with the `-c FILE` the user typed."""
    if isinstance(exc, SchemaOutdated) and exc.hint == UPGRADE_HINT:
        return f"{exc.reason}: run `{_command(args, 'db', 'upgrade')}`"
    return str(exc)


def _resolve(store: JobStore, text: str) -> uuid.UUID:
    try:
        return store.admin.resolve_id(text)
    except JobNotFound as exc:
        raise CliError(str(exc)) from None


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=json_default, sort_keys=False))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    # Cells hold server text and names given by whoever submitted: never a raw terminal escape or line break.
    cells = [[("" if v is None else printable(str(v), None)) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _when(value: dt.datetime | None) -> str:
    """A time for people: in UTC, and saying so (a daemon's host and its operator's terminal rarely share a zone)."""
    return "" if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _command(args: argparse.Namespace, *words: str) -> str:
    """An `imputationd` command line to suggest, with the `-c FILE` the user typed (if any)."""
    config = getattr(args, "config", None)
    return shlex.join(["imputationd", *words, *(["-c", config] if config else [])])


def _short(value: uuid.UUID | None) -> str:
    return "" if value is None else str(value)[:8]


# ---------------------------------------------------------------------- commands


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    problems = check_runtime(config)
    if problems:
        raise CliError("\n".join(f"{config.source}: {p}" for p in problems), EXIT_USAGE)
    print(f"{config.source}: OK ({counted(len(config.services), 'service')}: "
          f"{', '.join(sorted(config.services)) or 'none'})")
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    config = _load(args)
    try:
        before, after = upgrade_url(config.database.url)
    except DatabaseUnavailable as exc:
        raise CliError(str(exc), EXIT_DATABASE) from None
    where = describe_url(config.database.url)
    if before == after:
        print(f"{where}: schema already at {after}")
    else:
        print(f"{where}: schema upgraded from {before or 'empty'} to {after}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args, logs_to_stderr=False)
    configure_logging(config.logging)  # stdout: journald
    log = structlog.get_logger("daemon")
    for problem in check_runtime(config):
        # A missing token blocks its service (jobs wait) rather than keeping the whole daemon down.
        log.error("config_runtime_problem", problem=problem, error_kind="config")
    try:
        daemon = Daemon(config)
    except (DatabaseUnavailable, SchemaOutdated) as exc:
        problem = _schema_problem(args, exc)
        log.error("cannot_start", reason=problem, error_kind="database")
        raise CliError(problem, EXIT_DATABASE) from None
    # Before the ticks start claiming work: a stop asked for while starting (systemd stopping a unit that is still
    # activating) must be a clean stop, not the default action of SIGTERM killing the process with jobs leased.
    signal.signal(signal.SIGTERM, lambda *_: daemon.request_stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.request_stop())
    api_server = _api_server(args, config) if config.api.listen else None
    daemon.start()
    if api_server is not None:
        api_server.start()
    try:
        code = daemon.run_forever()
    finally:
        if api_server is not None:
            api_server.close()
    if daemon.unfinished_threads:
        # A step still stuck in I/O after the stop budget: its lease is released and its work will be redone;
        # do not let the interpreter wait for the thread past systemd's TimeoutStopSec.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _api_server(args: argparse.Namespace, config: Config) -> ApiServer:
    """The API's server on its own engine (its threads must not wait for the workers' connections), not started."""
    # Imported only when the API is configured: Flask, Jinja2 and cheroot are 3.8 MiB that a daemon without a
    # listener never uses (bench/memory.py), and the ratio to the Celery stack has 1.2 MiB of room.
    from daemon.api import create_app
    from daemon.api.server import ApiServer

    assert config.api.listen is not None
    return ApiServer(config.api.listen, create_app(config, _store(args, config)), threads=config.api.threads)


def cmd_api(args: argparse.Namespace) -> int:
    """The API and dashboard alone, e.g. on a front-end host that shares the daemons' PostgreSQL database."""
    config = _load(args, logs_to_stderr=False)
    configure_logging(config.logging)
    if not config.api.listen:
        raise CliError(f"{config.source}: api.listen is not set; name the address to serve on", EXIT_USAGE)
    server = _api_server(args, config)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.close).start())
    signal.signal(signal.SIGINT, lambda *_: threading.Thread(target=server.close).start())
    try:
        server.serve_forever()
    except OSError as exc:
        raise CliError(f"api.listen {config.api.listen}: {exc.strerror or exc}", EXIT_FAILED) from None
    return 0


def cmd_tokens_create(args: argparse.Namespace) -> int:
    problem = owner_problem(args.owner)
    if problem is not None:
        raise CliError(f"--owner: {problem}", EXIT_USAGE)
    store = _store(args, _load(args))
    row, token = store.api_tokens.create(args.owner, args.scope)
    print(f"token {row.id} for {row.owner} ({row.scope}); it is shown only now:", file=sys.stderr)
    print(token)
    return 0


def cmd_tokens_list(args: argparse.Namespace) -> int:
    store = _store(args, _load(args))
    rows = store.api_tokens.list()
    if args.json:
        _print_json([{"id": r.id, "owner": r.owner, "scope": r.scope, "created_at": r.created_at,
                      "last_used_at": r.last_used_at, "revoked_at": r.revoked_at} for r in rows])
        return 0
    for r in rows:
        state = f"revoked {_when(r.revoked_at)}" if r.revoked_at else "live"
        used = _when(r.last_used_at) if r.last_used_at else "never"
        print(f"{r.id}  {printable(r.owner)}  {r.scope}  created {_when(r.created_at)}  last used {used}  {state}")
    return 0


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    store = _store(args, _load(args))
    if not store.api_tokens.revoke(args.id):
        raise CliError(f"{args.id}: no live token with this id (`tokens list` shows them)")
    print(f"{args.id}: revoked")
    return 0


def _password_argument(args: argparse.Namespace) -> str | None:
    """`--password`, or the content of `--password-file`."""
    if not args.password_file:
        return str(args.password) if args.password is not None else None
    try:
        return Path(args.password_file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise CliError(f"--password-file {args.password_file}: {exc.strerror}", EXIT_USAGE) from None


def cmd_submit(args: argparse.Namespace) -> int:
    config = _load(args)
    password = _password_argument(args)
    request = Submission(
        services=args.service,
        panel=args.panel,
        build=args.build,
        files=[Path(f) for f in args.files],
        population=args.population,
        phasing=args.phasing,
        r2_filter=args.r2_filter,
        mode=args.mode,
        name=args.name,
        password=password,
        owner=args.owner,
    )
    store = _store(args, config)
    try:
        jobs = submit(config, store, request)
    except SubmissionError as exc:
        raise CliError("\n".join(exc.problems), EXIT_USAGE) from None
    except SecretKeyError as exc:
        raise CliError(f"storage.secret_key_file: {exc} (submit as the daemon's user)", EXIT_FAILED) from None
    if args.json:
        _print_json({"group_id": jobs[0].group_id, "jobs": [{"id": j.id, "service": j.service} for j in jobs]})
    else:
        print(jobs[0].group_id)
    return 0


def cmd_adopt(args: argparse.Namespace) -> int:
    """Track jobs submitted elsewhere: each remote id is looked up on the server first, so that a typo or another
    user's job is refused rather than polled for ever."""
    config = _load(args)
    service = config.services.get(args.service)
    if service is None:
        known = ", ".join(sorted(config.services)) or "none configured"
        raise CliError(f"--service {args.service}: not a configured service (configured: {known})", EXIT_USAGE)
    problem = owner_problem(args.owner)
    if problem is not None:
        raise CliError(f"--owner: {problem}", EXIT_USAGE)
    password = _password_argument(args)
    store = _store(args, config)
    adapters = Adapters(config, max_connections=2)
    adapter = adapters.get(service.name, args.owner)
    assert adapter is not None  # the service is configured
    failed = 0
    try:
        for remote_id in args.remote_ids:
            shown = printable(remote_id, 200)
            try:
                status = adapter.status(remote_id)
            except ServiceError as exc:
                print(f"imputationd: {shown}: not adopted: {exc}", file=sys.stderr)
                failed += 1
                continue
            try:
                job, adopted = store.admin.adopt(service.name, remote_id, password=password, name=args.name,
                                                 remote_state=status.raw_state, owner=args.owner)
            except SecretKeyError as exc:
                raise CliError(f"storage.secret_key_file: {exc} (adopt as the daemon's user)", EXIT_FAILED) from None
            if adopted:
                print(f"{job.id}: adopted {shown} ({status.raw_state})")
            else:
                print(f"{job.id}: already tracks {shown} ({job.state.value})")
    finally:
        adapters.close()
    return EXIT_FAILED if failed else 0


def cmd_jobs(args: argparse.Namespace) -> int:
    config = _load(args)
    store = _store(args, config)
    states = None
    if args.status:
        try:
            states = [JobState(s) for s in args.status.split(",")]
        except ValueError:
            raise CliError(f"--status {args.status}: states are {', '.join(s.value for s in JobState)}",
                           EXIT_USAGE) from None
    # A service taken out of the config may still have jobs in the database: those can be listed too.
    if args.service and args.service not in config.services and args.service not in store.admin.counts_by_service():
        known = ", ".join(sorted(config.services)) or "none configured"
        raise CliError(f"--service {args.service}: not a configured service (configured: {known})", EXIT_USAGE)
    jobs = store.admin.list_jobs(states=states, service=args.service, owner=args.owner, limit=args.limit)
    if args.json:
        _print_json([job_snapshot(j) for j in jobs])
        return 0
    rows = [
        (_short(j.id), _short(j.group_id) if j.group_id != j.id else "", j.service, j.owner, j.state.value,
         j.remote_state or "", printable(j.progress or j.error or "", 60), _when(j.created_at), j.name or "")
        for j in jobs
    ]
    print(_table(("ID", "GROUP", "SERVICE", "OWNER", "STATE", "REMOTE", "PROGRESS", "CREATED", "NAME"), rows))
    return 0


#: The history's record of `show --password`.
PASSWORD_SHOWN = "result password shown (imputationd show --password)"


def _show_passwords(config: Config, store: JobStore, jobs: Sequence[Job]) -> int:
    """Print the result password of `jobs` (one job, or a group's children): alone on its line when they share it,
    else one `ID SERVICE: PASSWORD` line each. Each reveal is written into the job's history before it is shown."""
    locked = [j for j in jobs if j.password is not None]
    if not locked:
        raise CliError(f"{jobs[0].id}: the job has no password; its results are not encrypted")
    cipher = PasswordCipher(config.storage.secret_key_path)
    try:
        passwords = [cipher.reveal(j.password) for j in locked]
    except SecretKeyError as exc:
        raise CliError(f"storage.secret_key_file: {exc}") from None
    for job in locked:
        store.admin.note(job.id, PASSWORD_SHOWN)
    if len(set(passwords)) == 1:
        print(passwords[0])
    else:
        for job, password in zip(locked, passwords, strict=True):
            print(f"{job.id} {job.service}: {password}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    config = _load(args)
    store = _store(args, config)
    job_id = _resolve(store, args.id)
    jobs = store.admin.group(job_id)
    if len(jobs) <= 1 or all(j.id != job_id for j in jobs):
        jobs = [store.admin.get(job_id, with_events=True)]
    if args.password:
        return _show_passwords(config, store, jobs)
    details = [job_detail(j) for j in jobs]
    if args.json:
        _print_json(details[0] if len(details) == 1 else {
            "group_id": jobs[0].group_id, "state": group_state([j.state.value for j in jobs]), "jobs": details})
        return 0
    if len(jobs) > 1:
        print(f"group {jobs[0].group_id}: {group_state([j.state.value for j in jobs])}")
        print(_table(("ID", "SERVICE", "STATE"), [(_short(j.id), j.service, j.state.value) for j in jobs]))
        print()
    for job, data in zip(jobs, details, strict=True):
        fields = [("id", job.id), ("group", job.group_id), ("service", job.service), ("owner", job.owner),
                  ("state", job.state.value),
                  ("remote id", job.remote_id), ("remote state", job.remote_state), ("panel", job.panel),
                  ("build", job.build), ("population", job.population), ("phasing", job.phasing),
                  ("r2 filter", job.r2_filter), ("mode", job.mode), ("name", job.name),
                  ("progress", job.progress), ("queue position", job.queue_position), ("error", job.error),
                  ("qc", qc_summary(job.qc) if job.qc else None),
                  ("result dir", job.result_dir), ("created", _when(job.created_at)),
                  ("finished", _when(job.finished_at))]
        width = max(len(k) for k, _ in fields)
        print("\n".join(f"{k.ljust(width)}  {printable(str(v), None)}" for k, v in fields if v not in (None, "")))
        print("\ninputs")
        print(_table(("PATH", "SIZE", "SHA256"), [(i["path"], i["size"], i["sha256"]) for i in data["inputs"]]))
        if data["outputs"] or job.password is not None:
            print("\noutputs")
        if data["outputs"]:
            print(_table(("NAME", "STATE", "SIZE", "SHA256", "ERROR"),
                         [(o["name"], o["state"], o["size"], o["sha256"], o["error"]) for o in data["outputs"]]))
        if job.password is not None:
            print(f"results are encrypted; `{_command(args, 'show', str(job.id), '--password')}` prints the password")
        if job.qc and job.qc.get("warnings"):
            print("\nqc warnings")
            print("\n".join(f"  {printable(warning, None)}" for warning in job.qc["warnings"]))
        print("\nhistory")
        print(_table(("AT", "FROM", "TO", "REASON"),
                     [(_when(e["at"]), e["from"] or "", e["to"], e["reason"] or "") for e in data["events"]]))
        print()
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    config = _load(args)
    store = _store(args, config)
    job_id = _resolve(store, args.id)
    before = store.admin.get(job_id).state
    state = store.admin.request_cancel(job_id)
    if state in (JobState.COMPLETED, JobState.FAILED):  # finished before the request (or while it was made)
        raise CliError(f"{job_id}: the job is {state.value}; only an unfinished job can be cancelled")
    if before is JobState.CANCELLED:
        print(f"{job_id}: already cancelled")
        return 0
    if state is JobState.CANCEL_REQUESTED:
        # Cancel on the server now if no daemon is working on the job; otherwise the daemon's next poll does it.
        owner = f"cli-{make_owner()}"
        job = store.queue.claim_one(job_id, owner, lease_seconds=60)
        if job is not None and job.service in config.services:
            adapters = Adapters(config, max_connections=2)
            try:
                finished = Pipeline(store.queue, store.services, adapters, config, owner=owner).run(job)
            finally:
                adapters.close()
            state = finished.state if finished is not None else store.admin.get(job_id).state
        elif job is not None:
            store.queue.release(job_id, owner)
    if state is JobState.CANCEL_REQUESTED and store.admin.get(job_id).cancel_sent_at is not None:
        print(f"{job_id}: cancel sent; the daemon polls the server until it confirms the remote job is cancelled")
    elif state is JobState.CANCEL_REQUESTED:
        print(f"{job_id}: cancel requested; the daemon will cancel the remote job")
    else:
        print(f"{job_id}: {state.value}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    config = _load(args)
    store = _store(args, config)
    job_id = _resolve(store, args.id)
    try:
        job = store.admin.retry(job_id)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(f"{job.id}: {job.state.value}")
    return 0


def cmd_services(args: argparse.Namespace) -> int:
    config = _load(args)
    store = _store(args, config)
    statuses = store.services.service_statuses()
    owner_statuses = store.services.owner_statuses()
    counts = store.admin.counts_by_service()
    owner_counts = store.admin.counts_by_owner()
    result = []
    for name, service in sorted(config.services.items()):
        status = statuses.get(name)
        owners = sorted({o for s, o in (*owner_statuses, *owner_counts) if s == name} | {DEFAULT_OWNER})
        of_owner = [_owner_entry(owner, owner_statuses.get((name, owner)), owner_counts.get((name, owner), {}))
                    for owner in owners]
        operator = next(o for o in of_owner if o["owner"] == DEFAULT_OWNER)
        entry: dict[str, Any] = {
            "name": name, "type": service.type, "base_url": service.base_url, "auth": service.auth,
            "max_concurrent_jobs": service.max_concurrent_jobs, "jobs_per_owner": service.jobs_per_owner,
            "shared_token": service.shared_token, "panels": sorted(service.panels),
            # The service's own token is the operator's: its status is the service's.
            "blocked": operator["blocked"],
            "paused_until": status.paused_until if status else None,
            "token_expires": operator["token_expires"],
            "jobs": counts.get(name, {}),
            "owners": of_owner,
        }
        if args.check:
            adapter = operator_adapter(config, name, max_connections=2)
            try:
                check = adapter.check()
            finally:
                adapter.close()
            configured = {p.remote_id for p in service.panels.values()}
            entry.update(
                reachable=check.reachable, token_valid=check.token_valid, token_expires=check.token_expires,
                user=check.user, remote_panels=list(check.remote_panels), message=check.message,
                missing_panels=sorted(configured - set(check.remote_panels)) if check.remote_panels else [],
            )
        result.append(entry)
    # The same answer for the table and --json: a script must not have to parse the JSON to see a failed check.
    code = EXIT_FAILED if args.check and any(_check_failed(e) for e in result) else 0
    if args.json:
        _print_json(result)
        return code
    headers = ["SERVICE", "TYPE", "STATUS", "ACTIVE", "TOKEN EXPIRES"]
    if args.check:
        headers += ["REACHABLE", "TOKEN", "MISSING PANELS"]
    rows = []
    for e in result:
        active = sum(n for s, n in e["jobs"].items() if JobState(s) not in TERMINAL)
        blocked = [("blocked: " if o["owner"] == DEFAULT_OWNER else f"blocked for {o['owner']}: ") + o["blocked"]
                   for o in e["owners"] if o["blocked"]]
        problems = blocked + (_check_problems(e) if args.check else [])
        state = printable("; ".join(problems), 160) if problems else "ok"
        row = [e["name"], e["type"], state, active, _when(e["token_expires"])]
        if args.check:
            token = "none (auth: none)" if e["auth"] == "none" else {True: "valid", False: "INVALID", None: "?"}[
                e["token_valid"]]
            row += ["yes" if e["reachable"] else "NO", token, ", ".join(e["missing_panels"]) or "-"]
        rows.append(row)
    print(_table(headers, rows))
    return code


def _owner_entry(owner: str, status: OwnerStatus | None, jobs: dict[str, int]) -> dict[str, Any]:
    return {"owner": owner, "blocked": status.blocked_reason if status else None,
            "token_expires": status.token_expires_at if status else None,
            "lowered_limit": status.effective_limit if status else None, "jobs": jobs}


def _check_failed(entry: dict[str, Any]) -> bool:
    return not entry["reachable"] or entry["token_valid"] is False or bool(entry["missing_panels"])


def _check_problems(entry: dict[str, Any]) -> list[str]:
    """What a failed `services --check` found, in words; empty when the check passed."""
    if not _check_failed(entry):
        return []
    found = [entry["message"]] if entry["message"] else []
    if not entry["reachable"] and not found:
        found.append("unreachable")
    if entry["missing_panels"]:
        found.append(f"panels not on the server: {', '.join(entry['missing_panels'])}")
    return found


def cmd_cleanup(args: argparse.Namespace) -> int:
    config = _load(args)
    keep_days = args.keep_days if args.keep_days is not None else config.storage.keep_days
    if keep_days is None:
        raise CliError("storage.keep_days is not set, so nothing is ever deleted; give --keep-days N to clean up "
                       "once", EXIT_USAGE)
    if keep_days < 1:
        raise CliError("--keep-days: must be at least 1", EXIT_USAGE)
    store = _store(args, config)
    everything = 1_000_000
    if args.dry_run:
        candidates = retention.plan(store.expired, config.storage, keep_days, limit=everything)
        doomed = [c for c in candidates if c.problem is None]
        left = [c for c in candidates if c.problem is not None]
    else:
        report = retention.cleanup(store.expired, config.storage, keep_days, limit=everything)
        doomed, left = report.deleted, report.skipped
    if args.json:
        def item(c: Any) -> dict[str, Any]:
            return {"id": c.job.id, "service": c.job.service, "state": c.job.state.value, "name": c.job.name,
                    "finished_at": c.job.finished_at, "path": c.path, "bytes": c.size, "problem": c.problem}
        _print_json({"dry_run": args.dry_run, "keep_days": keep_days, "deleted": [item(c) for c in doomed],
                     "left": [item(c) for c in left]})
        return 0 if not left else EXIT_FAILED
    rows = [(_short(c.job.id), c.job.service, c.job.state.value, _when(c.job.finished_at), c.size, c.path or "-")
            for c in doomed]
    if rows:
        print(_table(("ID", "SERVICE", "STATE", "FINISHED", "BYTES", "RESULT DIR"), rows))
    verb = "would delete" if args.dry_run else "deleted"
    total = sum(c.size for c in doomed)
    print(f"{verb} {counted(len(doomed), 'job')} finished more than {counted(keep_days, 'day')} ago "
          f"({counted(total, 'byte')} of results)")
    for c in left:
        print(f"left alone: {c.job.id}: {c.problem}", file=sys.stderr)
    return 0 if not left else EXIT_FAILED


# The simulated server (the demo's and simulate-server's) is imported by those commands alone: 1.8 MiB of RSS
# that `imputationd run` never uses (bench/memory.py), with the ratio to the Celery stack at its 5x target.
def cmd_demo(args: argparse.Namespace) -> int:
    from daemon.demo import run_demo

    return run_demo(keep=args.keep, timeout=args.timeout)


def cmd_simulate_server(args: argparse.Namespace) -> int:
    from daemon.simulator import serve

    serve(host=args.host, port=args.port, token=args.token)
    return 0


# ---------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    # `-c FILE` before the command or after it: on the main parser and on each command's, with no default on
    # either, so the command's parser does not overwrite one given before it with its own None.
    config_option = argparse.ArgumentParser(add_help=False)
    config_option.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                               help="config file (default: $IMPUTATIOND_CONFIG, then /etc/imputationd/config.yaml)")
    parser = argparse.ArgumentParser(
        prog="imputationd", description="Drive genotype-imputation jobs through remote imputation servers.",
        parents=[config_option],
    )
    parser.add_argument("--version", action="version", version=f"imputationd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str, *,
                config: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, parents=[config_option] if config else [])
        sub.set_defaults(func=func)
        return sub

    demo = command("demo", cmd_demo, "run the whole pipeline against the built-in simulated server", config=False)
    demo.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    demo.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds (default 60)")

    command("run", cmd_run, "run the daemon in the foreground (systemd Type=notify)")
    command("api", cmd_api, "serve the HTTP API and dashboard alone (api.listen), without running jobs")
    command("check-config", cmd_check_config, "validate the configuration; exit 2 with every problem")

    db = commands.add_parser("db", help="database schema", description="database schema", parents=[config_option])
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    upgrade = db_commands.add_parser("upgrade", help="apply the schema migrations", parents=[config_option])
    upgrade.set_defaults(func=cmd_db_upgrade)

    submit = command("submit", cmd_submit, "validate input files and store a pending job per service")
    submit.add_argument("--service", action="append", required=True, metavar="S",
                        help="a configured service; repeat for several (one child job each)")
    submit.add_argument("--panel", required=True, metavar="P", help="reference panel (our name, from the config)")
    submit.add_argument("--build", required=True, choices=BUILDS, help="genome build of the input files")
    submit.add_argument("--population", metavar="POP",
                        help="population for the allele-frequency check (one the panel offers in the config)")
    submit.add_argument("--phasing", choices=PHASING, help="phasing engine (default: the server's)")
    submit.add_argument("--r2-filter", metavar="R2",
                        help="drop imputed variants with an r² below this: a number from 0 to below 1, such as "
                             f"{', '.join(R2_FILTERS[1:])} or 0.8 (default: the server's)")
    submit.add_argument("--mode", choices=MODES, help="impute, or only check the input (default: the server's)")
    submit.add_argument("--name", help="a name for humans")
    submit.add_argument("--owner", default=DEFAULT_OWNER, metavar="NAME",
                        help=f"the platform user the job is for, submitted with their token (default {DEFAULT_OWNER})")
    secret = submit.add_mutually_exclusive_group()
    secret.add_argument("--password", help="password for the result zips (visible to `ps`: prefer --password-file; "
                                           "without either one is made up, and `show ID --password` prints it)")
    secret.add_argument("--password-file", metavar="FILE", help="read the result zip password from FILE")
    submit.add_argument("--json", action="store_true", help="print the group id and its jobs as JSON")
    submit.add_argument("files", nargs="+", metavar="FILE", help="bgzip-compressed VCF (*.vcf.gz)")

    jobs = command("jobs", cmd_jobs, "list jobs, newest first")
    jobs.add_argument("--status", metavar="S[,S…]", help="only jobs in these states")
    jobs.add_argument("--service", metavar="S", help="only jobs of this service")
    jobs.add_argument("--owner", metavar="NAME", help="only jobs of this owner")
    jobs.add_argument("--limit", type=int, default=100, metavar="N", help="at most N jobs (default 100)")
    jobs.add_argument("--json", action="store_true", help="print the jobs as JSON")

    show = command("show", cmd_show, "one job (or group) with its files and history")
    show.add_argument("id", metavar="ID", help="job or group id (a unique prefix is enough)")
    shown = show.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="print the job (or group) as JSON")
    shown.add_argument("--password", action="store_true",
                       help="print the password of the job's result zips (the job's history records that it was shown)")

    adopt = command("adopt", cmd_adopt, "track jobs submitted elsewhere (the web UI, another tool) by their remote ids")
    adopt.add_argument("--service", required=True, metavar="S", help="the configured service the jobs run on")
    adopt.add_argument("--name", help="a name for humans")
    adopt.add_argument("--owner", default=DEFAULT_OWNER, metavar="NAME",
                       help=f"whose jobs they are, looked up with their token (default {DEFAULT_OWNER})")
    adopted = adopt.add_mutually_exclusive_group()
    adopted.add_argument("--password", help="the password of the jobs' result zips, to check them (visible to `ps`: "
                                            "prefer --password-file; without it encrypted zips are checked for "
                                            "structure only)")
    adopted.add_argument("--password-file", metavar="FILE", help="read the result zip password from FILE")
    adopt.add_argument("remote_ids", nargs="+", metavar="REMOTE_ID", help="the server's job or run id")

    cancel = command("cancel", cmd_cancel, "cancel a job (remotely too, if it was submitted)")
    cancel.add_argument("id", metavar="ID", help="job id (a unique prefix is enough)")
    retry = command("retry", cmd_retry, "put a failed job back to pending")
    retry.add_argument("id", metavar="ID", help="job id (a unique prefix is enough)")

    services = command("services", cmd_services, "configured services and their status")
    services.add_argument("--check", action="store_true", help="contact each service: token, panels")
    services.add_argument("--json", action="store_true", help="print the services as JSON")

    cleanup = command("cleanup", cmd_cleanup,
                      "delete finished jobs (result folders and rows) older than storage.keep_days")
    cleanup.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    cleanup.add_argument("--keep-days", type=int, metavar="N", help="override storage.keep_days for this run")
    cleanup.add_argument("--json", action="store_true", help="print what was (or would be) deleted as JSON")

    tokens = commands.add_parser("tokens", help="the HTTP API's tokens", description="the HTTP API's tokens",
                                 parents=[config_option])
    token_commands = tokens.add_subparsers(dest="tokens_command", required=True, metavar="COMMAND")
    create = token_commands.add_parser("create", help="make a token; printed once, alone on the last line",
                                       parents=[config_option])
    create.add_argument("--owner", required=True, metavar="NAME", help="whose jobs the token sees and submits")
    create.add_argument("--scope", required=True, choices=SCOPES,
                        help="read: see the owner's jobs; submit: also create, cancel, retry; admin: every owner's")
    create.set_defaults(func=cmd_tokens_create)
    listed = token_commands.add_parser("list", help="one line per token, starting with its id",
                                       parents=[config_option])
    listed.add_argument("--json", action="store_true", help="print the tokens as JSON")
    listed.set_defaults(func=cmd_tokens_list)
    revoke = token_commands.add_parser("revoke", help="revoke a token at once", parents=[config_option])
    revoke.add_argument("id", metavar="ID", help="the token's id (`tokens list`)")
    revoke.set_defaults(func=cmd_tokens_revoke)

    sim = command("simulate-server", cmd_simulate_server, "run the simulated Cloudgene server", config=False)
    sim.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sim.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    sim.add_argument("--token", help="API token to accept (default: a generated one, printed)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except CliError as exc:
        for line in str(exc).splitlines():
            print(f"imputationd: {line}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
