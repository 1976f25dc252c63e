"""Turning a user's request (CLI `submit`, the demo, any app) into validated pending jobs.

Everything a server would reject late — after the upload and hours in its queue — is checked here first: the
service and panel exist in the config, the build and population fit the panel, the password is one the service can
take, and the files pass the VCF preflight. A job name must fit its column and be one line of printable characters:
it is shown on terminals, in e-mail subjects and in webhook bodies.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from daemon.config import BUILDS, MODES, PHASING, Config, r2_filter_problem
from daemon.crypto import MAX_PASSWORD_LENGTH
from daemon.db.admin import NewInput, NewJob
from daemon.db.models import Job
from daemon.db.store import JobStore
from daemon.owners import DEFAULT_OWNER, owner_problem
from daemon.preflight import PreflightError, preflight
from daemon.remote import JobParameters, parameters_of
from daemon.services.cloudgene import password_problem
from daemon.text import printable


class SubmissionError(ValueError):
    """Every problem with a submission, each naming the argument or file it is about."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True, kw_only=True)
class Submission(JobParameters):
    """One `imputationd submit`: the same job for each of `services`."""

    services: Sequence[str]
    files: Sequence[Path]
    owner: str = DEFAULT_OWNER


def validate(config: Config, request: Submission) -> list[str]:
    """Problems with the request against the configured services (the files are checked by `preflight`)."""
    problems: list[str] = []
    owner_problem_ = owner_problem(request.owner)
    if owner_problem_ is not None:
        problems.append(f"--owner: {owner_problem_}")
    if not request.services:
        problems.append("--service: name at least one service")
    if len(set(request.services)) != len(request.services):
        problems.append("--service: a service is named twice")
    if request.build not in BUILDS:
        problems.append(f"--build: must be one of {', '.join(BUILDS)}, got '{request.build}'")
    if request.phasing is not None and request.phasing not in PHASING:
        problems.append(f"--phasing: must be one of {', '.join(PHASING)}, got '{request.phasing}'")
    r2_problem = None if request.r2_filter is None else r2_filter_problem(request.r2_filter)
    if r2_problem is not None:
        problems.append(f"--r2-filter: {r2_problem}")
    if request.mode is not None and request.mode not in MODES:
        problems.append(f"--mode: must be one of {', '.join(MODES)}, got '{request.mode}'")
    if request.password is not None and len(request.password) > MAX_PASSWORD_LENGTH:
        # Never echoed: it is a secret.
        problems.append(f"--password: at most {MAX_PASSWORD_LENGTH} characters (it is stored encrypted)")
    if request.password is not None and any(
        config.services[name].type == "cloudgene" for name in request.services if name in config.services
    ):
        problem = password_problem(request.password)
        if problem is not None:
            problems.append(f"--password: {problem}")
    if request.name is not None:
        problems += _name_problems(request.name)
    for name in request.services:
        service = config.services.get(name)
        if service is None:
            known = ", ".join(sorted(config.services)) or "none configured"
            problems.append(f"--service {name}: not a configured service (configured: {known})")
            continue
        panel = service.panels.get(request.panel)
        if panel is None:
            known = ", ".join(sorted(service.panels)) or "none configured"
            problems.append(f"--panel {request.panel}: service '{name}' has no such panel (panels: {known})")
            continue
        if request.build not in panel.builds:
            problems.append(f"--build {request.build}: panel '{request.panel}' on '{name}' offers "
                            f"{', '.join(panel.builds)}")
        if request.phasing is not None and request.phasing in PHASING and request.phasing not in panel.phasing:
            problems.append(f"--phasing {request.phasing}: panel '{request.panel}' on '{name}' offers "
                            f"{', '.join(panel.phasing)} (a panel lists beagle in its phasing to offer it)")
        if request.population and panel.populations and request.population not in panel.populations:
            problems.append(f"--population {request.population}: panel '{request.panel}' on '{name}' offers "
                            f"{', '.join(panel.populations)}")
    if not request.files:
        problems.append("FILE: give at least one *.vcf.gz file")
    return problems


def _name_problems(name: str) -> list[str]:
    problems = []
    longest: int = Job.__table__.c.name.type.length  # type: ignore[attr-defined]  # a String column's length
    if len(name) > longest:
        problems.append(f"--name: at most {longest} characters, got {len(name)}")
    bad = next((ch for ch in name if not ch.isprintable()), None)
    if bad is not None:
        what = "a line break" if bad in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029" else \
            "a terminal escape" if bad == "\x1b" else "a control character"
        problems.append(f"--name: must be one line of printable characters; it holds {what} ({printable(bad)})")
    return problems


def submit(config: Config, store: JobStore, request: Submission) -> list[Job]:
    """Validate, preflight and store one pending job per service; raises `SubmissionError` with every problem."""
    problems = validate(config, request)
    if problems:
        raise SubmissionError(problems)
    services = [config.services[name] for name in request.services]
    try:
        inputs = preflight(
            [Path(f).resolve() for f in request.files],
            build=request.build,
            # One set of files goes to every service: it must fit the strictest of them.
            min_samples=max(s.min_samples for s in services),
            max_samples=min(s.max_samples for s in services),
            max_upload_bytes=min(s.max_upload_mb for s in services) * 1024 * 1024,
        )
    except PreflightError as exc:
        raise SubmissionError(exc.problems) from None
    # Without a password the server invents one and only e-mails it: we could neither check nor open the zips.
    password = request.password or secrets.token_urlsafe(18)
    new_inputs = [NewInput(path=str(i.path), size=i.size, sha256=i.sha256) for i in inputs]
    return store.admin.create_group(
        [
            NewJob(service=name, owner=request.owner, inputs=new_inputs, **parameters_of(request, password=password))
            for name in request.services
        ]
    )
