"""Typed configuration, loaded from YAML and validated with every problem reported at its key path.

This module's types are the contract the rest of the daemon reads; `load_config` is the only way to build them
from a file, and `check-config` and daemon start-up both go through it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DEFAULT_CONFIG_PATH = Path("/etc/imputationd/config.yaml")
CONFIG_ENV = "IMPUTATIOND_CONFIG"


class ConfigError(Exception):
    """Every problem found in one configuration, each as "key.path: what is wrong"."""

    def __init__(self, problems: list[str], source: Path | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(problems))


@dataclass(frozen=True)
class DatabaseConfig:
    url: str
    pool_size: int = 5
    echo: bool = False


@dataclass(frozen=True)
class StorageConfig:
    state_dir: Path
    results_dir: Path
    temp_dir: Path
    keep_days: int | None = None


@dataclass(frozen=True)
class SchedulerConfig:
    workers: int = 8
    dispatch_interval: float = 5.0
    poll_tick_interval: float = 5.0
    download_interval: float = 5.0
    maintenance_interval: float = 60.0
    #: Default seconds between two polls of one job (a service may override it).
    poll_interval: float = 60.0
    lease_seconds: float = 120.0
    backoff_initial: float = 10.0
    backoff_max: float = 900.0
    #: Seconds SIGTERM leaves in-flight steps to finish before leases are released (below TimeoutStopSec).
    shutdown_timeout: float = 8.0
    #: Most jobs one tick hands to the pool.
    batch_size: int = 200


@dataclass(frozen=True)
class LoggingConfig:
    format: Literal["auto", "json", "console"] = "auto"
    level: str = "info"


@dataclass(frozen=True)
class MetricsConfig:
    listen: str | None = None  # "127.0.0.1:9478"; None disables the listener


@dataclass(frozen=True)
class PanelConfig:
    name: str  # ours, used on the command line
    remote_id: str  # the service's id, e.g. "apps@1000g-phase-3-v5@2.0.0"
    builds: tuple[str, ...] = ("hg19", "hg38")
    populations: tuple[str, ...] = ()


@dataclass(frozen=True)
class WesConfig:
    workflow_url: str
    workflow_type: str
    workflow_type_version: str
    engine: str | None = None
    engine_version: str | None = None
    engine_parameters: dict[str, Any] = field(default_factory=dict)
    #: `workflow_params` template; strings may use {files} {panel} {build} {population} {phasing} {r2_filter}
    #: {mode} {job_id} {name}.
    workflow_params: dict[str, Any] = field(default_factory=dict)
    inputs_as: Literal["attachment", "path"] = "attachment"
    page_size: int = 100


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    type: Literal["cloudgene", "wes"]
    base_url: str
    app: str = "imputationserver2"
    token_file: Path | None = None
    token_env: str | None = None
    max_concurrent_jobs: int = 3
    poll_interval: float = 60.0
    timeout: float = 30.0
    panels: dict[str, PanelConfig] = field(default_factory=dict)
    max_upload_mb: int = 5000
    min_samples: int = 20
    max_samples: int = 50000
    wes: WesConfig | None = None

    def read_token(self) -> str | None:
        """The service's token from its file or environment variable, stripped; None when neither is set.

        A relative `token_file` is looked up under `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`)."""
        if self.token_file is not None:
            path = self.token_file
            if not path.is_absolute() and os.environ.get("CREDENTIALS_DIRECTORY"):
                path = Path(os.environ["CREDENTIALS_DIRECTORY"]) / path
            return path.read_text(encoding="utf-8").strip()
        if self.token_env is not None:
            value = os.environ.get(self.token_env)
            return value.strip() if value else None
        return None


@dataclass(frozen=True)
class Config:
    database: DatabaseConfig
    storage: StorageConfig
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    services: dict[str, ServiceConfig] = field(default_factory=dict)
    source: Path | None = None


def find_config_path(cli_path: str | Path | None) -> Path:
    """`-c FILE`, else `$IMPUTATIOND_CONFIG`, else /etc/imputationd/config.yaml."""
    if cli_path:
        return Path(cli_path)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    return DEFAULT_CONFIG_PATH


def load_config(path: Path) -> Config:
    raise NotImplementedError("being written")
