"""Switchable faults: one thread-safe list of rules, set from Python or over HTTP (`/_sim/faults`).

A rule has a `kind`, how many more times it fires (`times`, None = until removed), an optional scope (`path` prefix,
`method`) and the parameters its kind uses. Three families:

- response faults: at most one per request, the first matching rule wins.
  `error` (status 500/502/503/504/…: 5xx from the app or an nginx-style HTML page from the "proxy"),
  `drop` (close the connection without an answer), `rate_limit` (429 + Retry-After), `html_200` (an HTML page with
  status 200), `malformed_json` (the real answer cut in half), `truncate` (full Content-Length, fewer bytes, close),
  `reset` (like truncate, but the connection is reset: a TCP RST, as a crashed proxy sends), `corrupt` (flip bytes
  in the body; for downloads), `no_outputs` (a JSON answer's jobs list no result files, as a server that has not
  published them yet). `when="before"` answers instead of the application (nothing
  happened), `when="after"` lets the application act first (e.g. the job *was* created) and then spoils the answer.
- modifiers: `delay` (sleep `seconds` before or after the application acts; `times=None` gives a fixed per-call
  latency for benchmarks). Every matching delay applies.
- job faults, consumed when a job is created (scope ignored): `fail_validation` (the job fails input validation),
  `fail_imputation` (it fails in its imputation step, after validation and QC), `wrong_md5` (the `.md5` file beside
  each of its zips publishes a digest the zip does not have; with `message`, holds that text instead: a malformed
  one), `stall` (the job stays WAITING), `dead` (the job goes DEAD(-1) when it would start running), `echo_secrets`
  (the job repeats its secrets in what it says: the token and the job's password in every log message, so in its
  progress and its failure reasons; the hashes of its result files in its export message; and the first GET of each of
  its files answers 500 with a message quoting the file's hash and the token).
- submit faults, consumed by a submit that passed every check (scope ignored): `slow_submit` — Cloudgene copies
  the whole upload into its workspace before the job exists, here for `seconds`; a client that stops waiting
  meanwhile (timed out, killed) does not stop it: the job is created all the same, the answer goes nowhere. With
  `proxy_status` (e.g. 504) a proxy in front gives up first: the client gets its error page as soon as the upload
  is in, and the job appears `seconds` later.
"""

from __future__ import annotations

import fnmatch
import itertools
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

RESPONSE_KINDS = frozenset(
    {"error", "drop", "rate_limit", "html_200", "malformed_json", "truncate", "reset", "corrupt", "no_outputs"}
)
MODIFIER_KINDS = frozenset({"delay"})
JOB_KINDS = frozenset({"fail_validation", "fail_imputation", "wrong_md5", "stall", "dead", "echo_secrets"})
SUBMIT_KINDS = frozenset({"slow_submit"})
KINDS = RESPONSE_KINDS | MODIFIER_KINDS | JOB_KINDS | SUBMIT_KINDS

#: Kinds that only make sense once the application has answered.
_AFTER_ONLY = frozenset({"malformed_json", "truncate", "reset", "corrupt", "no_outputs"})
#: Default scopes: spoiling bodies is meant for downloads, garbling JSON for the API.
_DEFAULT_PATH = {"truncate": "/share/", "reset": "/share/", "corrupt": "/share/", "malformed_json": "/api/",
                 "no_outputs": "/api/"}

_ids = itertools.count(1)


@dataclass
class FaultRule:
    kind: str
    times: int | None = 1
    path: str | None = None
    method: str | None = None
    when: str = "before"
    status: int = 502
    seconds: float = 0.0
    retry_after: int = 1
    fraction: float = 0.5
    nbytes: int = 4
    message: str | None = None
    proxy_status: int | None = None
    id: int = field(default_factory=lambda: next(_ids))
    fired: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; known: {', '.join(sorted(KINDS))}")
        if self.times is not None and self.times < 1:
            raise ValueError("times must be >= 1 or None (unlimited)")
        if self.kind in _AFTER_ONLY:
            self.when = "after"
        if self.when not in ("before", "after"):
            raise ValueError("when must be 'before' or 'after'")
        if self.path is None:
            self.path = _DEFAULT_PATH.get(self.kind)
        if self.method is not None:
            self.method = self.method.upper()
        if self.kind == "error" and not 400 <= self.status <= 599:
            raise ValueError("an error fault needs an HTTP error status")
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError("fraction must be in [0, 1)")
        if self.proxy_status is not None and (self.kind != "slow_submit" or not 500 <= self.proxy_status <= 599):
            raise ValueError("proxy_status is a 5xx status, for slow_submit only")
        if self.seconds < 0 or self.retry_after < 0 or self.nbytes < 1:
            raise ValueError("seconds/retry_after must be >= 0 and nbytes >= 1")

    def matches(self, method: str, path: str) -> bool:
        """`path` is a prefix of the request's path, or a shell pattern when it holds a `*` ("/presigned/*.zip")."""
        if self.method is not None and self.method != method:
            return False
        if self.path is None:
            return True
        return fnmatch.fnmatchcase(path, self.path) if "*" in self.path else path.startswith(self.path)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    """What the faults do to one request."""

    delay_before: float = 0.0
    delay_after: float = 0.0
    action: FaultRule | None = None


class Faults:
    """The fault rules of one simulator. All methods are thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self.fired: dict[str, int] = {}

    # -- managing rules
    def add(self, kind: str, **params: Any) -> FaultRule:
        allowed = set(FaultRule.__dataclass_fields__) - {"id", "fired", "kind"}
        unknown = set(params) - allowed
        if unknown:
            raise ValueError(f"unknown fault parameter(s): {', '.join(sorted(unknown))}")
        rule = FaultRule(kind, **params)
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove(self, rule_id: int) -> bool:
        with self._lock:
            before = len(self._rules)
            self._rules = [r for r in self._rules if r.id != rule_id]
            return len(self._rules) != before

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def rules(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.to_dict() for r in self._rules]

    def pending(self) -> int:
        with self._lock:
            return len(self._rules)

    # -- convenience spellings of add()
    def error(self, status: int = 502, times: int | None = 1, **scope: Any) -> FaultRule:
        return self.add("error", status=status, times=times, **scope)

    def drop(self, times: int | None = 1, **scope: Any) -> FaultRule:
        return self.add("drop", times=times, **scope)

    def slow(self, seconds: float, times: int | None = 1, **scope: Any) -> FaultRule:
        return self.add("delay", seconds=seconds, times=times, **scope)

    def latency(self, seconds: float, **scope: Any) -> FaultRule:
        return self.add("delay", seconds=seconds, times=None, **scope)

    def rate_limit(self, retry_after: int = 1, times: int | None = 1, **scope: Any) -> FaultRule:
        return self.add("rate_limit", retry_after=retry_after, times=times, **scope)

    def html_200(self, times: int | None = 1, **scope: Any) -> FaultRule:
        return self.add("html_200", times=times, **scope)

    def malformed_json(self, times: int | None = 1, **scope: Any) -> FaultRule:
        return self.add("malformed_json", times=times, **scope)

    def truncate(self, times: int | None = 1, fraction: float = 0.5, **scope: Any) -> FaultRule:
        return self.add("truncate", times=times, fraction=fraction, **scope)

    def reset(self, times: int | None = 1, fraction: float = 0.5, **scope: Any) -> FaultRule:
        return self.add("reset", times=times, fraction=fraction, **scope)

    def no_outputs(self, times: int | None = 1, **scope: Any) -> FaultRule:
        return self.add("no_outputs", times=times, **scope)

    def corrupt(self, times: int | None = 1, nbytes: int = 4, **scope: Any) -> FaultRule:
        return self.add("corrupt", times=times, nbytes=nbytes, **scope)

    def fail_validation(self, times: int | None = 1, message: str | None = None) -> FaultRule:
        return self.add("fail_validation", times=times, message=message)

    def fail_imputation(self, times: int | None = 1, message: str | None = None) -> FaultRule:
        """The job passes validation and QC, then fails in its imputation step: a failure of the server's, not of
        the input (what a resubmit may cure)."""
        return self.add("fail_imputation", times=times, message=message)

    def wrong_md5(self, times: int | None = 1, message: str | None = None) -> FaultRule:
        """The job's `.md5` files publish a digest that none of its zips has (the zips themselves are sound); with
        `message`, each holds that text instead (a malformed `.md5`, say "" or "not a checksum")."""
        return self.add("wrong_md5", times=times, message=message)

    def stall(self, times: int | None = 1) -> FaultRule:
        return self.add("stall", times=times)

    def dead(self, times: int | None = 1) -> FaultRule:
        return self.add("dead", times=times)

    def echo_secrets(self, times: int | None = 1) -> FaultRule:
        return self.add("echo_secrets", times=times)

    def slow_submit(self, seconds: float, times: int | None = 1, proxy_status: int | None = None) -> FaultRule:
        return self.add("slow_submit", seconds=seconds, times=times, proxy_status=proxy_status)

    # -- consulting the rules
    def _fire(self, rule: FaultRule) -> None:
        rule.fired += 1
        self.fired[rule.kind] = self.fired.get(rule.kind, 0) + 1
        if rule.times is not None:
            rule.times -= 1
            if rule.times == 0:
                self._rules.remove(rule)

    def plan(self, method: str, path: str) -> Plan:
        """Decide (and count) what happens to a request; called once per request."""
        plan = Plan()
        with self._lock:
            for rule in list(self._rules):
                if rule.kind in JOB_KINDS | SUBMIT_KINDS or not rule.matches(method, path):
                    continue
                if rule.kind == "delay":
                    if rule.when == "before":
                        plan.delay_before += rule.seconds
                    else:
                        plan.delay_after += rule.seconds
                    self._fire(rule)
                elif plan.action is None:
                    plan.action = rule
                    self._fire(rule)
        return plan

    def take_job_faults(self) -> dict[str, str | None]:
        """The job faults a newly created job gets, as {kind: message}; each kind fires at most once per job."""
        taken: dict[str, str | None] = {}
        with self._lock:
            for rule in list(self._rules):
                if rule.kind in JOB_KINDS and rule.kind not in taken:
                    taken[rule.kind] = rule.message
                    self._fire(rule)
        return taken

    def take_submit_fault(self) -> FaultRule | None:
        """The `slow_submit` rule a submit that passed every check gets, if any (it fires once per submit)."""
        with self._lock:
            for rule in list(self._rules):
                if rule.kind in SUBMIT_KINDS:
                    self._fire(rule)
                    return rule
        return None

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.fired)
