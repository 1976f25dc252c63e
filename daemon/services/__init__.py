"""Service adapters: one per configured service, built from its config, all behind `ServiceAdapter`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from daemon.config import ServiceConfig
from daemon.logging import register_secret
from daemon.services.base import ServiceAdapter
from daemon.services.cloudgene import CloudgeneAdapter
from daemon.services.scrubbing import ScrubbingAdapter
from daemon.services.wes import WesAdapter

log = structlog.get_logger("daemon.services")


#: A token file changed less than this long ago is read again on every call, however its stat looks: a second
#: write within the file system's timestamp granularity can leave size and times as they were ("racy git").
_SETTLED_NS = 2_000_000_000


def token_reader(config: ServiceConfig) -> Callable[[], str | None]:
    """Read the service's token again whenever its file changes, so an operator who replaces the token file fixes a
    blocked service without a restart. Each token read is registered with the log redaction before anyone can log
    it.

    Every API call asks for the token: the file is read once and then only stat()ed (one system call instead of
    five), and read again when its inode, size or times differ or it was written in the last two seconds."""
    cached: tuple[tuple[int, ...], str | None] | None = None

    def read_file(path: Path) -> str | None:
        nonlocal cached
        info = os.stat(path)
        key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        last = cached
        if last is not None and last[0] == key:
            return last[1]
        token = config.read_token()
        if time.time_ns() - info.st_mtime_ns > _SETTLED_NS:
            cached = (key, token)
        return token

    def read() -> str | None:
        try:
            path = config.token_path()
            token = read_file(path) if path is not None else config.read_token()
        except OSError as exc:
            log.debug("token_unreadable", service=config.name, reason=exc.strerror or type(exc).__name__)
            return None
        if token:
            register_secret(token)
        return token or None

    return read


def build_adapter(config: ServiceConfig, *, max_connections: int = 10) -> ScrubbingAdapter:
    """The adapter of one configured service, behind the boundary that scrubs what its server says of secrets."""
    token = token_reader(config)
    adapter: ServiceAdapter
    if config.type == "cloudgene":
        adapter = CloudgeneAdapter(config, token=token, max_connections=max_connections)
    elif config.type == "wes":
        adapter = WesAdapter(config, token=token, max_connections=max_connections)
    else:
        raise ValueError(f"services.{config.name}.type: unknown service type {config.type!r}")
    return ScrubbingAdapter(adapter, token=token)
