"""Typed configuration, loaded from YAML and validated with every problem reported at its key path.

This module's types are the contract the rest of the daemon reads, and each one is also the schema of its YAML
section: a field's annotation says what a value may be, checked by msgspec or by the field's `Check`
(`daemon.validation`). `load_config` is the only way to build them from a file, and `check-config` and daemon
start-up both go through it.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import stat
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from daemon import yamlfile
from daemon.headers import HeadersFileError, parse_headers_file
from daemon.states import NOTIFIABLE, TERMINAL, JobState
from daemon.templates import template_problems
from daemon.text import printable
from daemon.validation import (
    SECRET_MESSAGE,
    Check,
    Context,
    Convert,
    Invalid,
    convert_mapping,
    got,
    integer,
    is_secret_key,
    join,
    matching,
    seconds,
    yaml_key,
)

DEFAULT_CONFIG_PATH = Path("/etc/imputationd/config.yaml")
CONFIG_ENV = "IMPUTATIOND_CONFIG"
#: Seconds an adapter waits for the answer to a submit: Cloudgene copies the whole upload into its workspace
#: (possibly S3) before it says a word, so a healthy submit of a few GB can take many minutes. It is also how long
#: a server may still be turning a submit into a job after we stopped waiting: the default `submit_settle`.
SUBMIT_ANSWER_TIMEOUT = 1800.0


def credentials_path(path: Path) -> Path | None:
    """Where a relative secret file (a token, the SMTP password, webhook headers) lives when systemd provides
    `$CREDENTIALS_DIRECTORY` (`LoadCredential=`); None for an absolute path, or when there is no such directory."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if path.is_absolute() or not directory:
        return None
    return Path(directory) / path


class ConfigError(Exception):
    """Every problem found in one configuration, each as "key.path: what is wrong"."""

    def __init__(self, problems: list[str], source: Path | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(problems))


# The annotations name checks defined further down: they are read when a file is first converted, not here.


@dataclass(frozen=True)
class DatabaseConfig:
    url: Annotated[str, Check(_database_url)]
    pool_size: Annotated[int, integer(1, 100)] = 5
    echo: bool = False


@dataclass(frozen=True)
class StorageConfig:
    state_dir: Annotated[Path, Check(_path)]
    results_dir: Annotated[Path, Check(_path)]
    temp_dir: Annotated[Path, Check(_path)]
    keep_days: Annotated[int, integer(1, 36500)] | None = None
    #: Unpack each verified chr_*.zip into the job's result directory after it completes.
    extract: bool = False
    #: Key that encrypts job passwords in the database; None means `state_dir/secret.key` (made when missing).
    secret_key_file: Annotated[Path, Check(_path)] | None = None
    #: The most one zip may unpack to, in GiB and in multiples of its own size: imputed results are compressed
    #: already (about 1x), a zip bomb expands a thousandfold.
    extract_max_gib: Annotated[int, integer(1, 1 << 20)] = 1024
    extract_max_ratio: Annotated[int, integer(1, 1 << 20)] = 100

    @property
    def secret_key_path(self) -> Path:
        return self.secret_key_file or self.state_dir / "secret.key"

    @property
    def uploads_dir(self) -> Path:
        """Where the API streams uploaded inputs, a folder per request; retention removes a folder with the last
        job whose inputs are in it."""
        return self.state_dir / "uploads"


@dataclass(frozen=True)
class SchedulerConfig:
    workers: Annotated[int, integer(1, 256)] = 8
    dispatch_interval: Annotated[float, seconds(3600)] = 5.0
    poll_tick_interval: Annotated[float, seconds(3600)] = 5.0
    download_interval: Annotated[float, seconds(3600)] = 5.0
    maintenance_interval: Annotated[float, seconds(86400)] = 60.0
    #: Default seconds between two polls of one job (a service may override it).
    poll_interval: Annotated[float, seconds(86400)] = 60.0
    lease_seconds: Annotated[float, seconds(86400)] = 120.0
    backoff_initial: Annotated[float, seconds(86400)] = 10.0
    backoff_max: Annotated[float, seconds(7 * 86400)] = 900.0
    #: Seconds SIGTERM leaves in-flight steps to finish before leases are released (below TimeoutStopSec).
    shutdown_timeout: Annotated[float, seconds(3600)] = 8.0
    #: Most jobs one tick hands to the pool.
    batch_size: Annotated[int, integer(1, 10000)] = 200
    #: A service blocked by its token (401/403) is probed (token verify) this long after it was blocked; each probe
    #: that finds it still unusable doubles the wait, up to `blocked_probe_max`. A changed token file is probed at once.
    blocked_probe_initial: Annotated[float, seconds(86400)] = 15.0
    blocked_probe_max: Annotated[float, seconds(86400)] = 300.0


@dataclass(frozen=True)
class LoggingConfig:
    format: Literal["auto", "json", "console"] = "auto"
    level: Annotated[str, Check(_log_level)] = "info"


@dataclass(frozen=True)
class MetricsConfig:
    listen: Annotated[str, Check(_listen)] | None = None  # "127.0.0.1:9478"; None disables the listener


@dataclass(frozen=True)
class ApiConfig:
    """The HTTP API and dashboard (`daemon.api`), served by `run` and by `api` alone."""

    listen: Annotated[str, Check(_listen)] | None = None  # "127.0.0.1:8470"; None: `run` serves no API
    #: Threads answering requests; a request (an upload, a download) holds one while it lasts.
    threads: Annotated[int, integer(1, 256)] = 16
    #: The largest upload one request may carry, all its files together.
    max_upload_mb: Annotated[int, integer(1, 10_000_000)] = 20000
    #: The dashboard's login cookie is `Secure` (sent over HTTPS only): leave it on behind a TLS proxy.
    secure_cookie: bool = True
    #: Reverse proxies in front of the API that add X-Forwarded-For/-Proto/-Host: their values are believed for
    #: that many hops (werkzeug's ProxyFix), so logs name the client rather than the proxy. 0: none are believed
    #: (set it only when every request comes through the proxies: a client could otherwise forge them).
    proxy_hops: Annotated[int, integer(0, 10)] = 0


#: Job states a notification can be sent for (`notifications.on`).
NOTIFY_STATES = tuple(state.value for state in JobState if state in NOTIFIABLE)


@dataclass(frozen=True)
class WebhookConfig:
    url: Annotated[str, Check(_url)]  # may itself be a secret (chat webhooks): never logged
    timeout: Annotated[float, seconds(120)] = 10.0
    #: Extra request headers, one "Name: value" per line (e.g. Authorization); read again at every reload.
    headers_file: Annotated[Path, Check(_credential_file)] | None = None


@dataclass(frozen=True)
class EmailConfig:
    host: Annotated[str, Check(_text)]
    sender: Annotated[str, Check(_address)] = field(metadata=yaml_key("from"))
    to: Annotated[tuple[str, ...], Check(_addresses)]
    port: Annotated[int, integer(1, 65535)] = 25
    starttls: bool = True
    username: Annotated[str, Check(_text)] | None = None
    #: SMTP password: a file (relative: under $CREDENTIALS_DIRECTORY when systemd provides it) or an env variable.
    password_file: Annotated[Path, Check(_credential_file)] | None = None
    password_env: Annotated[str, Check(_env_name)] | None = None
    timeout: Annotated[float, seconds(600)] = 30.0

    def read_password(self) -> str | None:
        if self.password_file is not None:
            return self.password_file.read_text(encoding="utf-8").strip()
        if self.password_env is not None:
            return os.environ.get(self.password_env, "").strip() or None
        return None


@dataclass(frozen=True)
class NotificationsConfig:
    webhook: Annotated[WebhookConfig, Check(_webhook)] | None = None
    email: Annotated[EmailConfig, Check(_email)] | None = None
    on: Annotated[tuple[str, ...], Check(_subset(NOTIFY_STATES, non_empty=True))] = tuple(
        state.value for state in JobState if state in TERMINAL)
    #: A notification still failing this many seconds after its state change is given up (logged as an error).
    give_up_after: Annotated[float, seconds(30 * 86400)] = 86400.0

    @property
    def enabled(self) -> bool:
        return self.webhook is not None or self.email is not None


BUILDS = ("hg19", "hg38")
#: The remaining choices of a submission (`imputationd submit`); here rather than in `daemon.submission` so that the
#: CLI's parser gets them without importing the submission path (the VCF preflight).
PHASING = ("eagle", "beagle", "no_phasing")
#: Phasing a panel offers when its config does not say: beagle is offered by a few panels only (imputationserver2:
#: the HRC and 1000 Genomes ones), so a panel lists it to allow it.
DEFAULT_PANEL_PHASING = ("eagle", "no_phasing")
#: Cloudgene runs the QC only for any mode but `imputation`; the app's yaml spells it `qc_only`, the docs and
#: imputationbot `qconly`: either is sent as given.
MODES = ("imputation", "qconly", "qc_only")
#: The r² filters the app lists; the server checks none of them, and any number from 0 to below 1 is used as given
#: (TOPMed users send 0.8 and 0.9).
R2_FILTERS = ("0", "0.001", "0.1", "0.2", "0.3")
POPULATIONS = ("eur", "afr", "amr", "eas", "sas", "asn", "AA", "mixed", "all", "off")


def r2_filter_problem(text: str) -> str | None:
    """What is wrong with an r² filter (`submit --r2-filter`), or None: a plain decimal number in [0, 1)."""
    if not re.fullmatch(r"0|0?\.[0-9]+", text):
        examples = ", ".join(R2_FILTERS[1:])
        return f"must be a number from 0 to below 1 such as {examples} or 0.8, got '{printable(text, 40)}'"
    return None


@dataclass(frozen=True)
class PanelConfig:
    name: str = field(metadata=yaml_key(None))  # ours, used on the command line: its key in `panels`
    #: The service's id, e.g. "apps@1000g-phase-3-v5@2.0.0".
    remote_id: Annotated[str, Check(_text)] = field(metadata=yaml_key("id"))
    builds: Annotated[tuple[str, ...], Check(_subset(BUILDS, non_empty=True))] = ("hg19", "hg38")
    populations: Annotated[tuple[str, ...], Check(_subset(POPULATIONS, non_empty=False))] = ()
    phasing: Annotated[tuple[str, ...], Check(_subset(PHASING, non_empty=True))] = DEFAULT_PANEL_PHASING


@dataclass(frozen=True)
class WesConfig:
    workflow_url: Annotated[str, Check(_text)]
    workflow_type: Annotated[str, Check(_text)]
    workflow_type_version: Annotated[str, Check(_text)]
    engine: Annotated[str, Check(_text)] | None = None
    engine_version: Annotated[str, Check(_text)] | None = None
    engine_parameters: Annotated[dict[str, Any], Check(_json_object)] = field(default_factory=dict)
    #: `workflow_params` template; strings may use {files} {panel} {build} {population} {phasing} {r2_filter}
    #: {mode} {job_id} {name}.
    workflow_params: Annotated[dict[str, Any], Check(_json_object)] = field(default_factory=dict)
    inputs_as: Literal["attachment", "path"] = "attachment"
    #: "path": outputs published as paths on a file system shared with the server (`file://`) are copied from there,
    #: only from under `outputs_root`; "url": only HTTP URLs are downloaded.
    outputs_as: Literal["url", "path"] = "url"
    outputs_root: Annotated[Path, Check(_path)] | None = None
    page_size: Annotated[int, integer(1, 1000)] = 100


@dataclass(frozen=True)
class ServiceConfig:
    name: str = field(metadata=yaml_key(None))  # its key in `services`
    type: Literal["cloudgene", "wes"]
    base_url: Annotated[str, Check(_url)]
    app: Annotated[str, matching(r"[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._-]+)?",
                                 "a Cloudgene app id like imputationserver2")] = "imputationserver2"
    token_file: Annotated[Path, Check(_token_file)] | None = None
    token_env: Annotated[str, Check(_env_name)] | None = None
    #: "none": the server takes no token (some WES servers); no Authorization header is sent, and nobody calls a
    #: token valid that nobody checked.
    auth: Literal["token", "none"] = "token"
    max_concurrent_jobs: Annotated[int, integer(1, 1000)] = 3
    poll_interval: Annotated[float, seconds(86400)] = 60.0
    timeout: Annotated[float, seconds(3600)] = 30.0
    panels: Annotated[dict[str, PanelConfig], Check(_panels)] = field(default_factory=dict)
    max_upload_mb: Annotated[int, integer(1, 1_000_000)] = 5000
    min_samples: Annotated[int, integer(1, 10_000_000)] = 20
    max_samples: Annotated[int, integer(1, 10_000_000)] = 50000
    #: Required for services of type wes (`null` is reported as its missing keys, not taken as "none").
    wes: Annotated[WesConfig | None, Check(_wes)] = None
    #: Let `base_url` be plain http:// to another machine: the token and the uploads cross the network unencrypted.
    allow_plain_http: bool = False
    #: Owners without a token of their own (`<credentials>/<owner>/<service>.token`) use the service's token. Off,
    #: only the operator (the default owner) does: every other owner's jobs are sent under their own account.
    shared_token: bool = False
    #: Most jobs of one owner in flight on the service at once (the server's "Only N jobs per user" is per
    #: account); None: `max_concurrent_jobs`, the service-wide limit, which holds as well.
    jobs_per_owner: Annotated[int, integer(1, 1000)] | None = None
    #: Most of the pool's workers this service's steps may occupy at once; None: `default_worker_share`.
    max_workers: Annotated[int, integer(1, 256)] | None = None
    #: Seconds during which a submit whose outcome is unknown (answer lost, a proxy's 504, the daemon killed
    #: mid-request) may still become a remote job, counted from when we stopped waiting for it: until they pass, the
    #: job is looked up on the server and never sent again. None: `settle_seconds`' default.
    submit_settle: Annotated[float, seconds(7 * 86400)] | None = None
    #: Seconds a sent cancel may go unconfirmed (the remote job not yet reported cancelled) before the job says,
    #: once, that the server is ignoring it. The job stays `cancel_requested` and polled either way.
    cancel_timeout: Annotated[float, seconds(7 * 86400)] = 600.0
    #: Remote failures (reason or remote state, searched case-insensitively) that the daemon submits again, up to
    #: `resubmit_max` times per job; never a failure of the input's checks. Empty: never (the default).
    resubmit_on: Annotated[tuple[re.Pattern[str], ...], Check(_patterns)] = ()
    resubmit_max: Annotated[int, integer(1, 20)] = 2
    #: A job whose results the server deletes within this many seconds (Cloudgene `deletedOn`) and that are not
    #: downloaded yet is logged and notified loudly, once.
    retirement_warning: Annotated[float, seconds(30 * 86400)] = 86400.0

    @property
    def settle_seconds(self) -> float:
        """`submit_settle`, by default the longest the adapter waits for a submit's answer."""
        return self.submit_settle if self.submit_settle is not None else max(self.timeout, SUBMIT_ANSWER_TIMEOUT)

    def token_path(self) -> Path | None:
        """Where the token file is: a relative `token_file` is looked up under `$CREDENTIALS_DIRECTORY` (systemd
        `LoadCredential=`) when that is set. None when the token comes from the environment or nowhere."""
        if self.token_file is None:
            return None
        return credentials_path(self.token_file) or self.token_file

    def read_token(self) -> str | None:
        """The service's token from its file (`token_path`) or environment variable, stripped; None when neither
        is set."""
        path = self.token_path()
        if path is not None:
            return path.read_text(encoding="utf-8").strip()
        if self.token_env is not None:
            value = os.environ.get(self.token_env)
            return value.strip() if value else None
        return None


@dataclass(frozen=True)
class Config:
    database: Annotated[DatabaseConfig, _SECTION]
    storage: Annotated[StorageConfig, _SECTION]
    scheduler: Annotated[SchedulerConfig, _SECTION] = field(default_factory=SchedulerConfig)
    logging: Annotated[LoggingConfig, _SECTION] = field(default_factory=LoggingConfig)
    metrics: Annotated[MetricsConfig, _SECTION] = field(default_factory=MetricsConfig)
    services: Annotated[dict[str, ServiceConfig], _SECTION] = field(default_factory=dict)
    source: Path | None = field(default=None, metadata=yaml_key(None))  # the file it was read from
    notifications: Annotated[NotificationsConfig, _SECTION] = field(default_factory=NotificationsConfig)
    api: Annotated[ApiConfig, _SECTION] = field(default_factory=ApiConfig)
    #: Where owners' tokens are (`<credentials_dir>/<owner>/<service>.token`) when systemd provides no
    #: `$CREDENTIALS_DIRECTORY`.
    credentials_dir: Annotated[Path, Check(_path)] | None = None

    def worker_share(self, service: str) -> int:
        """How many of the pool's workers `service`'s steps may occupy at once: its `max_workers`, else all but one
        when other services share the pool, so that a service whose server hangs or drips can never hold every
        worker and starve the rest. A service configured alone may use them all: there is nobody to starve."""
        workers = self.scheduler.workers
        configured = self.services.get(service)
        if configured is not None and configured.max_workers is not None:
            return min(configured.max_workers, workers)
        return workers if len(self.services) <= 1 else max(1, workers - 1)


def find_config_path(cli_path: str | Path | None) -> Path:
    """`-c FILE`, else `$IMPUTATIOND_CONFIG`, else /etc/imputationd/config.yaml."""
    if cli_path:
        return Path(cli_path)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    return DEFAULT_CONFIG_PATH


def load_config(path: Path) -> Config:
    """Read, parse and validate one YAML file.

    Raises ConfigError carrying every problem found, each as "key.path: what is wrong"."""
    path = Path(path)
    try:
        data = yamlfile.read(path)
    except yamlfile.UnreadableFile as exc:
        # The problem names the file itself, so the error carries no separate source to prefix it with again.
        raise ConfigError([str(exc)]) from None
    except yamlfile.InvalidYaml as exc:
        raise ConfigError([str(exc)], path) from None
    # The file's directory as named, not its symlink target: operators think in terms of the path they typed.
    return parse_config(data, base_dir=path.absolute().parent, source=path)


def parse_config(data: Any, *, base_dir: Path, source: Path | None = None) -> Config:
    """Validate already-parsed YAML (`None` counts as empty); relative paths resolve against `base_dir`."""
    ctx = Context(base_dir=Path(base_dir))
    sections = convert_mapping({} if data is None else data, "", Config, ctx, what="a mapping of sections") or {}
    storage = _storage(sections.get("storage"), ctx)
    database = _database(sections.get("database"), storage.state_dir, ctx)
    scheduler = _scheduler(sections.get("scheduler"), ctx)
    logging_ = LoggingConfig(**(convert_mapping(sections.get("logging"), "logging", LoggingConfig, ctx) or {}))
    metrics = MetricsConfig(**(convert_mapping(sections.get("metrics"), "metrics", MetricsConfig, ctx) or {}))
    services = _services(sections.get("services", _ABSENT), scheduler.poll_interval, ctx)
    for name, service in services.items():
        if service.max_workers is not None and service.max_workers > scheduler.workers:
            ctx.report(f"services.{name}.max_workers",
                       f"must not exceed scheduler.workers ({scheduler.workers}), got {service.max_workers}")
    notifications = _notifications(sections.get("notifications"), ctx)
    api = ApiConfig(**(convert_mapping(sections.get("api"), "api", ApiConfig, ctx) or {}))
    if api.listen is not None and api.listen == metrics.listen:
        ctx.report("api.listen", f"must differ from metrics.listen ({metrics.listen})")
    credentials_dir = sections.get("credentials_dir")
    if ctx.problems:
        raise ConfigError(ctx.problems, source)
    return Config(database, storage, scheduler, logging_, metrics, services, source, notifications, api,
                  credentials_dir)


def format_problems(error: ConfigError) -> str:
    """One line per problem, each prefixed by the file it was found in (for `check-config`)."""
    prefix = f"{error.source}: " if error.source else ""
    return "\n".join(prefix + problem for problem in error.problems)


def check_runtime(config: Config) -> list[str]:
    """Problems only visible on this machine, as this user: credentials and storage directories.

    A valid file can still fail here when run as another user or outside systemd. Messages name paths and key
    paths, never a token's content or the name held in `token_env` (an operator may have pasted the token there)."""
    problems: list[str] = []
    for name, service in config.services.items():
        problem = _check_credential(f"services.{name}", service)
        if problem:
            problems.append(problem)
    problems.extend(_check_storage(config.storage))
    problems.extend(_check_notifications(config.notifications))
    return problems


# --- checks of values that no type describes ------------------------------------------------------------------------


def _text(value: Any, path: str, ctx: Context) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        # YAML turns `1.10` into the float 1.1: make the operator quote it rather than guess.
        raise Invalid(f"must be text, got the number {value!r} (quote it so YAML keeps it as written)")
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"must be non-empty text, got {got(value)}")
    return value.strip()


def _subset(options: tuple[str, ...], *, non_empty: bool) -> Convert:
    """A list of distinct values drawn from `options` (panel builds, populations)."""

    def subset(value: Any, path: str, ctx: Context) -> tuple[str, ...]:
        expected = ", ".join(options)
        if not isinstance(value, list):
            raise Invalid(f"must be a list drawn from {expected}, got {got(value)}")
        if non_empty and not value:
            raise Invalid(f"must list at least one of {expected}")
        if any(isinstance(item, bool) for item in value):
            raise Invalid("""quote 'off' as "off": YAML reads a bare off (or on, yes, no) as a boolean""")
        unknown = [item for item in value if item not in options]
        if unknown:
            raise Invalid(f"unknown {', '.join(got(item) for item in unknown)} (expected values from {expected})")
        repeated = sorted({item for item in value if value.count(item) > 1})
        if repeated:
            raise Invalid(f"lists {', '.join(repeated)} more than once")
        return tuple(value)

    return subset


def _patterns(value: Any, path: str, ctx: Context) -> tuple[re.Pattern[str], ...]:
    """A list of regular expressions, searched case-insensitively (a plain phrase is one)."""
    if not isinstance(value, list) or not all(isinstance(item, str) and item.strip() for item in value):
        raise Invalid(f"must be a list of texts or regular expressions, got {got(value)}")
    compiled = []
    for item in value:
        try:
            compiled.append(re.compile(item, re.IGNORECASE))
        except re.error as exc:
            raise Invalid(f"{item!r} is not a regular expression: {exc}") from None
    return tuple(compiled)


def _path(value: Any, path: str, ctx: Context) -> Path:
    text = _text(value, path, ctx)
    resolved = Path(text).expanduser()
    if not resolved.is_absolute():
        resolved = ctx.base_dir / resolved
    return Path(os.path.normpath(resolved))


def _token_file(value: Any, path: str, ctx: Context) -> Path:
    """A relative token file lives under `$CREDENTIALS_DIRECTORY` when systemd provides one (`LoadCredential=`),
    else beside the config file like every other relative path."""
    # The value is not echoed: someone may have pasted the token itself here.
    if not isinstance(value, str) or not value.strip():
        raise Invalid("must be the path of a file that holds only the token")
    if _JWT.search(value):
        raise Invalid("holds a token, not a file name; put the token in a file and name that file here")
    return credentials_path(Path(value.strip()).expanduser()) or _path(value, path, ctx)


def _env_name(value: Any, path: str, ctx: Context) -> str:
    # The value is not echoed: someone may have pasted the token itself here.
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
        raise Invalid(
            "must be the name of an environment variable (letters, digits and '_', not starting with a digit); "
            "the token itself goes into that variable"
        )
    return value


def _url(value: Any, path: str, ctx: Context) -> str:
    # Values are not echoed: a URL may carry credentials.
    if not isinstance(value, str) or not value.strip() or any(ch.isspace() for ch in value.strip()):
        raise Invalid("not a URL (expected http:// or https://)")
    parts = urlsplit(value.strip())
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise Invalid("has an invalid port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Invalid("not a URL (expected http:// or https://)")
    if parts.username or parts.password:
        raise Invalid(f"must not contain credentials; {SECRET_MESSAGE}")
    if parts.query or parts.fragment:
        raise Invalid("must not have a query string or fragment")
    return value.strip().rstrip("/")


def _database_url(value: Any, path: str, ctx: Context) -> str:
    # Only the scheme is ever echoed: a PostgreSQL URL may hold a password.
    if not isinstance(value, str) or not value.strip():
        raise Invalid("must be sqlite:///PATH or postgresql+psycopg://USER@HOST/DB")
    url = value.strip()
    scheme = url.split("://", 1)[0] if "://" in url else None
    if url.startswith("sqlite:///"):
        return _sqlite_url(url, ctx)
    if url.startswith("postgresql+psycopg://"):
        if len(url) == len("postgresql+psycopg://"):
            raise Invalid("needs a host and database after postgresql+psycopg://")
        return url
    if scheme in ("postgresql", "postgres", "postgresql+psycopg2"):
        raise Invalid(f"use postgresql+psycopg:// instead of {scheme}:// (the daemon uses the psycopg 3 driver)")
    shown = f"{scheme}://" if scheme else "no scheme"
    raise Invalid(f"must start with sqlite:/// or postgresql+psycopg://, got {shown}")


def _sqlite_url(url: str, ctx: Context) -> str:
    file_part, question, query = url[len("sqlite:///") :].partition("?")
    if file_part in ("", ":memory:"):
        # Each pooled connection would get its own empty database, and everything is lost at exit.
        raise Invalid("needs a database file path (an in-memory database is neither shared nor kept)")
    if file_part.startswith("/") or file_part.startswith("file:"):
        return url
    return f"sqlite:///{_path(file_part, '', ctx)}{question}{query}"


def _listen(value: Any, path: str, ctx: Context) -> str:
    expected = 'must be "host:port" with a port from 1 to 65535, e.g. "127.0.0.1:9478" or "[::1]:9478"'
    if not isinstance(value, str):
        raise Invalid(f"{expected}, got {got(value)}")
    host, colon, port = value.strip().rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if not colon or not port.isdigit() or not 1 <= int(port) <= 65535 or any(ch.isspace() for ch in host):
        raise Invalid(f"{expected}, got {got(value)}")
    if not host:
        raise Invalid(f'needs a host, e.g. "127.0.0.1:{port}" (or "0.0.0.0:{port}" for every interface)')
    if ":" in host and not bracketed:
        raise Invalid(f'needs brackets around an IPv6 address, e.g. "[::1]:{port}", got {got(value)}')
    return value.strip()


def _json_object(value: Any, path: str, ctx: Context) -> dict[str, Any]:
    """A free-form mapping sent to the server as JSON (WES parameters)."""
    if not isinstance(value, dict):
        raise Invalid(f"must be a mapping, got {got(value)}")
    _refuse_nested_secrets(value, path, ctx)
    if not _is_json(value):
        raise Invalid("must hold only text keys and JSON values (quote dates and times; no .nan or .inf)")
    return value


def _refuse_nested_secrets(value: Any, path: str, ctx: Context) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if is_secret_key(key):
                ctx.report(join(path, key), SECRET_MESSAGE)
            else:
                _refuse_nested_secrets(item, join(path, key), ctx)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_nested_secrets(item, f"{path}[{index}]", ctx)


def _is_json(value: Any) -> bool:
    if value is None or isinstance(value, str | bool | int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_is_json(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _is_json(item) for key, item in value.items())
    return False


# --- sections --------------------------------------------------------------------------------------------------------

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+\.")  # Cloudgene's API tokens are JWTs
_SERVICE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_PANEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

#: A top-level section, converted by `parse_config` in the order their defaults need: the database file lives in
#: storage's state_dir, and a service's poll_interval defaults to the scheduler's.
_SECTION = Check(lambda value, path, ctx: value)

#: A section left out of the file, where that differs from one written with nothing under it.
_ABSENT = object()


def _given_and_valid(raw: Any, values: dict[str, Any] | None, *keys: str) -> bool:
    """True when none of `keys` was given with a bad value, so cross-field checks (which fall back to defaults for
    absent keys) do not pile a second, confusing problem on top of one already reported."""
    if values is None:
        return False
    given = raw if isinstance(raw, dict) else {}
    return all(key in values or key not in given for key in keys)


#: Intervals at which the scheduler's ticks run; a lease must outlast the longest of them.
_TICKS = ("dispatch_interval", "poll_tick_interval", "download_interval")

_WES_REQUIRED = ("workflow_url", "workflow_type", "workflow_type_version")


def _log_level(value: Any, path: str, ctx: Context) -> str:
    levels = ("debug", "info", "warning", "error")
    if not isinstance(value, str) or value.lower() not in levels:
        raise Invalid(f"must be one of {', '.join(levels)}, got {got(value)}")
    return value.lower()


def _storage(raw: Any, ctx: Context) -> StorageConfig:
    values = convert_mapping(raw, "storage", StorageConfig, ctx) or {}
    # systemd's StateDirectory=/CacheDirectory= export these (colon-separated when several are configured).
    state_dir = values.get("state_dir") or _systemd_dir("STATE_DIRECTORY") or Path("/var/lib/imputationd")
    results_dir = values.get("results_dir") or state_dir / "results"
    temp_dir = values.get("temp_dir") or _systemd_dir("CACHE_DIRECTORY") or state_dir / "tmp"
    if results_dir == temp_dir:
        ctx.report("storage.temp_dir", "must differ from results_dir (scratch files would sit among the results)")
    limits = {key: values[key] for key in ("extract_max_gib", "extract_max_ratio") if key in values}
    return StorageConfig(state_dir, results_dir, temp_dir, values.get("keep_days"), values.get("extract", False),
                         values.get("secret_key_file"), **limits)


def _systemd_dir(variable: str) -> Path | None:
    value = os.environ.get(variable, "").split(":")[0]
    return Path(value) if value else None


def _database(raw: Any, state_dir: Path, ctx: Context) -> DatabaseConfig:
    values = convert_mapping(raw, "database", DatabaseConfig, ctx) or {}
    values.setdefault("url", f"sqlite:///{state_dir}/imputationd.db")
    return DatabaseConfig(**values)


def _scheduler(raw: Any, ctx: Context) -> SchedulerConfig:
    values = convert_mapping(raw, "scheduler", SchedulerConfig, ctx)
    config = SchedulerConfig(**(values or {}))
    if _given_and_valid(raw, values, "lease_seconds", *_TICKS):
        # A lease that can expire between two ticks hands live work to a second worker: it would run twice.
        longest = max(_TICKS, key=lambda name: getattr(config, name))
        if config.lease_seconds <= getattr(config, longest):
            ctx.report(
                "scheduler.lease_seconds",
                f"must be longer than every tick interval ({longest} is {getattr(config, longest):g}), "
                f"got {config.lease_seconds:g}",
            )
    if (_given_and_valid(raw, values, "blocked_probe_initial", "blocked_probe_max")
            and config.blocked_probe_max < config.blocked_probe_initial):
        ctx.report("scheduler.blocked_probe_max", f"must be at least blocked_probe_initial "
                   f"({config.blocked_probe_initial:g}), got {config.blocked_probe_max:g}")
    if _given_and_valid(raw, values, "backoff_initial", "backoff_max") and config.backoff_max < config.backoff_initial:
        ctx.report(
            "scheduler.backoff_max",
            f"must be at least backoff_initial ({config.backoff_initial:g}), got {config.backoff_max:g}",
        )
    return config


def _services(raw: Any, default_poll_interval: float, ctx: Context) -> dict[str, ServiceConfig]:
    if raw is _ABSENT:
        return {}
    if raw is not None and not isinstance(raw, dict):
        ctx.report("services", f"must be a mapping of service name to its settings, got {got(raw)}")
        return {}
    if not raw:
        # Written out but empty (`services: {}`, or every service under it commented out): a daemon started on it
        # would never run a job, and nothing would say why. Left out, it is fine: `db upgrade` and `jobs` need none.
        ctx.report("services", "no service configured; add one (type, base_url, token_file or token_env; see "
                               "config/imputationd.example.yaml)")
        return {}
    services = {}
    for name, body in raw.items():
        where = join("services", name)
        if not isinstance(name, str) or not _SERVICE_NAME.fullmatch(name):
            ctx.report(where, "service names must be lower-case letters, digits, '_' and '-' (e.g. michigan)")
        service = _service(str(name), body, where, default_poll_interval, ctx)
        if service is not None:
            services[str(name)] = service
    return services


def _service(name: str, raw: Any, where: str, default_poll_interval: float, ctx: Context) -> ServiceConfig | None:
    values = convert_mapping(raw, where, ServiceConfig, ctx, required=("type", "base_url"), refuse_secrets=True)
    if values is None:
        return None
    raw = raw or {}  # `michigan:` with nothing under it
    _check_service_type(raw, values, where, ctx)
    _check_credential_keys(raw, where, ctx)
    _check_plain_http(values, where, ctx)
    if _given_and_valid(raw, values, "min_samples", "max_samples"):
        low = values.get("min_samples", _SERVICE_DEFAULTS["min_samples"])
        high = values.get("max_samples", _SERVICE_DEFAULTS["max_samples"])
        if low > high:
            ctx.report(f"{where}.min_samples", f"must not exceed max_samples ({high}), got {low}")
    if "submit_settle" in values and _given_and_valid(raw, values, "timeout"):
        timeout = values.get("timeout", _SERVICE_DEFAULTS["timeout"])
        if values["submit_settle"] < timeout:
            ctx.report(f"{where}.submit_settle", f"must be at least the service's timeout ({timeout:g} s): the "
                       f"server may still be answering the first submit, got {values['submit_settle']:g}")
    if "type" not in values or "base_url" not in values:
        return None
    values.setdefault("poll_interval", default_poll_interval)
    return ServiceConfig(name=name, **values)


def _check_service_type(raw: dict[str, Any], values: dict[str, Any], where: str, ctx: Context) -> None:
    kind = values.get("type")
    if kind == "wes":
        if "wes" not in raw:
            ctx.report(f"{where}.wes", f"required for services of type wes ({', '.join(_WES_REQUIRED)})")
        if "app" in raw:
            ctx.report(f"{where}.app", "only used by cloudgene services; remove it")
    elif kind == "cloudgene":
        if "wes" in raw:
            ctx.report(f"{where}.wes", "only for services of type wes; remove it")


def _check_plain_http(values: dict[str, Any], where: str, ctx: Context) -> None:
    url = values.get("base_url")
    if url is None or urlsplit(url).scheme != "http" or values.get("allow_plain_http"):
        return
    host = urlsplit(url).hostname or ""
    if not is_loopback(host):
        ctx.report(
            f"{where}.base_url",
            f"plain http:// to {host} would send the token and the genotype files unencrypted; use https://, or "
            "set allow_plain_http: true if the network to it is trusted",
        )


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, without brackets or port) is this machine."""
    if host == "localhost" or host.endswith(".localhost"):  # RFC 6761: always this machine
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_credential_keys(raw: dict[str, Any], where: str, ctx: Context) -> None:
    given = [key for key in ("token_file", "token_env") if raw.get(key) is not None]
    if raw.get("auth") == "none":
        for key in given:
            ctx.report(f"{where}.{key}", "not used with auth: none (the server takes no token); remove it")
        if raw.get("type") == "cloudgene":
            ctx.report(f"{where}.auth", "a Cloudgene server always takes a token (auth: none is for WES servers)")
    elif not given:
        ctx.report(where, "needs token_file or token_env (secrets are never stored in the YAML)")
    elif len(given) > 1:
        ctx.report(where, "give exactly one of token_file or token_env, not both")


def _panels(value: Any, path: str, ctx: Context) -> dict[str, PanelConfig]:
    if not isinstance(value, dict):
        raise Invalid(f"must be a mapping of panel name to its settings, got {got(value)}")
    panels = {}
    for name, raw in value.items():
        where = join(path, name)
        if not isinstance(name, str) or not _PANEL_NAME.fullmatch(name):
            ctx.report(where, "panel names must be letters, digits, '.', '_' and '-' (e.g. 1000g-phase-3-v5)")
        values = convert_mapping(raw, where, PanelConfig, ctx, required=("id",), refuse_secrets=True)
        if values and "remote_id" in values:
            panels[str(name)] = PanelConfig(name=str(name), **values)
    return panels


def _wes(value: Any, path: str, ctx: Context) -> WesConfig | None:
    values = convert_mapping(value, path, WesConfig, ctx, required=_WES_REQUIRED, refuse_secrets=True)
    if values is None:
        return None
    if "workflow_params" in values:
        ctx.problems.extend(template_problems(values["workflow_params"], f"{path}.workflow_params"))
    if values.get("outputs_as") == "path" and values.get("outputs_root") is None:
        ctx.report(f"{path}.outputs_root", "required with outputs_as: path (the only folder outputs are copied from)")
    if any(key not in values for key in _WES_REQUIRED):
        return None
    return WesConfig(**values)


_SERVICE_DEFAULTS = {f.name: f.default for f in fields(ServiceConfig)}

_EMAIL_ADDRESS = re.compile(r"[^@\s<>]+@[^@\s<>]+")
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


def _credential_file(value: Any, path: str, ctx: Context) -> Path:
    """Like `_token_file`: relative paths live under `$CREDENTIALS_DIRECTORY` when systemd provides one."""
    if not isinstance(value, str) or not value.strip():
        raise Invalid("must be the path of a file that holds only the secret")
    return credentials_path(Path(value.strip()).expanduser()) or _path(value, path, ctx)


def _address(value: Any, path: str, ctx: Context) -> str:
    if not isinstance(value, str) or not _EMAIL_ADDRESS.fullmatch(value.strip()):
        raise Invalid(f"must be an e-mail address like imputation@example.org, got {got(value)}")
    return value.strip()


def _addresses(value: Any, path: str, ctx: Context) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise Invalid(f"must be an e-mail address or a non-empty list of them, got {got(value)}")
    bad = [item for item in items if not isinstance(item, str) or not _EMAIL_ADDRESS.fullmatch(item.strip())]
    if bad:
        raise Invalid(f"not e-mail addresses: {', '.join(got(item) for item in bad)}")
    return tuple(item.strip() for item in items)


def _notifications(raw: Any, ctx: Context) -> NotificationsConfig:
    if raw is None:
        return NotificationsConfig()
    values = convert_mapping(raw, "notifications", NotificationsConfig, ctx)
    if values is None:
        return NotificationsConfig()
    if "webhook" not in raw and "email" not in raw:
        ctx.report("notifications", "needs webhook or email (or leave the section out)")
    return NotificationsConfig(**values)


def _webhook(raw: Any, where: str, ctx: Context) -> WebhookConfig | None:
    values = convert_mapping(raw, where, WebhookConfig, ctx, required=("url",), refuse_secrets=True)
    return WebhookConfig(**values) if values and "url" in values else None


def _email(raw: Any, where: str, ctx: Context) -> EmailConfig | None:
    values = convert_mapping(raw, where, EmailConfig, ctx, required=("host", "from", "to"), refuse_secrets=True)
    if values is None:
        return None
    raw = raw or {}
    credentials = [key for key in ("password_file", "password_env") if raw.get(key) is not None]
    if len(credentials) > 1:
        ctx.report(where, "give exactly one of password_file or password_env, not both")
    if credentials and raw.get("username") is None:
        ctx.report(f"{where}.username", f"required with {credentials[0]}")
    if raw.get("username") is not None and not credentials:
        ctx.report(where, "username needs password_file or password_env (secrets are never stored in the YAML)")
    starttls = values.get("starttls", True)
    host = values.get("host")
    if credentials and not starttls and host is not None and host.lower() not in _LOOPBACK_HOSTS:
        ctx.report(f"{where}.starttls", f"must be true when logging in to {host} (the password would travel in clear)")
    if any(key not in values for key in ("host", "sender", "to")):
        return None
    return EmailConfig(**values)


# --- runtime checks --------------------------------------------------------------------------------------------------


def _check_credential(where: str, service: ServiceConfig) -> str | None:
    if service.auth == "none":
        return None
    path = service.token_path()
    if path is not None:
        return _check_token_file(f"{where}.token_file", path)
    if service.token_env is not None:
        value = os.environ.get(service.token_env)
        if value is None:
            return f"{where}.token_env: the environment variable it names is not set"
        if not value.strip():
            return f"{where}.token_env: the environment variable it names is empty"
        return None
    return f"{where}: no token_file or token_env"


def _check_token_file(where: str, path: Path) -> str | None:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return f"{where}: {path} does not exist"
    except IsADirectoryError:
        return f"{where}: {path} is a directory, not a file"
    except PermissionError:
        return f"{where}: {path} cannot be read by this user (permission denied)"
    except OSError as exc:
        return f"{where}: cannot read {path}: {exc.strerror or type(exc).__name__}"
    except UnicodeDecodeError:
        return f"{where}: {path} is not UTF-8 text"
    if not token:
        return f"{where}: {path} is empty"
    if any(ch.isspace() for ch in token):
        # It would be sent as one header value with the line break in it; the server would answer 401.
        return f"{where}: {path} holds more than the token (several lines or words)"
    return _check_private(where, path)


def _check_private(where: str, path: Path) -> str | None:
    """A secret's file that every user of the machine may read (or replace, pointing our jobs at their account).

    Reported by `check-config` and logged as an error when the daemon starts, which still uses the secret: it is
    exposed already, and refusing it would stop a daemon that works; systemd's credentials are always private."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None  # reading it worked a moment ago; whatever changed is reported when it is next read
    can = " and ".join(word for bit, word in ((stat.S_IROTH, "read"), (stat.S_IWOTH, "changed")) if mode & bit)
    if can:
        return f"{where}: {path} can be {can} by every user of this machine (mode {mode:04o}); chmod o-rwx it"
    return None


def _check_notifications(notifications: NotificationsConfig) -> list[str]:
    problems = []
    if notifications.webhook is not None and notifications.webhook.headers_file is not None:
        try:
            parse_headers_file(notifications.webhook.headers_file)
        except HeadersFileError as exc:
            problems.append(f"notifications.webhook.headers_file: {exc}")
        else:
            problem = _check_private("notifications.webhook.headers_file", notifications.webhook.headers_file)
            if problem:
                problems.append(problem)
    email = notifications.email
    if email is not None and email.password_file is not None:
        problem = _check_token_file("notifications.email.password_file", email.password_file)
        if problem:
            problems.append(problem.replace("the token", "the password"))
    elif email is not None and email.password_env is not None and not os.environ.get(email.password_env, "").strip():
        problems.append("notifications.email.password_env: the environment variable it names is not set or empty")
    return problems


def _check_storage(storage: StorageConfig) -> list[str]:
    problems = []
    for key in ("state_dir", "results_dir", "temp_dir"):
        problem = _check_directory(f"storage.{key}", getattr(storage, key))
        if problem:
            problems.append(problem)
    return problems


def _check_directory(where: str, path: Path) -> str | None:
    """Only what is certainly wrong: a directory that does not exist yet is fine (systemd's StateDirectory= or the
    daemon creates it), and one this user cannot even see may belong to the service's own user."""
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        return f"{where}: {ancestor} exists and is not a directory"
    if ancestor == path and not os.access(path, os.W_OK | os.X_OK):
        return f"{where}: {path} is not writable by this user"
    return None


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or "/")
