"""Service adapters: one per configured service, built from its config, all behind `ServiceAdapter`."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from daemon.config import ServiceConfig
from daemon.logging import register_secret
from daemon.services.base import ServiceAdapter

log = structlog.get_logger("daemon.services")


def token_reader(config: ServiceConfig) -> Callable[[], str | None]:
    """Read the service's token on every call, so an operator who replaces the token file fixes a blocked service
    without a restart. Each token read is registered with the log redaction before anyone can log it."""

    def read() -> str | None:
        try:
            token = config.read_token()
        except OSError as exc:
            log.debug("token_unreadable", service=config.name, reason=exc.strerror or type(exc).__name__)
            return None
        if token:
            register_secret(token)
        return token or None

    return read


def build_adapter(config: ServiceConfig, *, max_connections: int = 10) -> ServiceAdapter:
    if config.type == "cloudgene":
        from daemon.services.cloudgene import CloudgeneAdapter

        return CloudgeneAdapter(config, token=token_reader(config), max_connections=max_connections)
    if config.type == "wes":
        from daemon.services.wes import WesAdapter

        return WesAdapter(config, token=token_reader(config), max_connections=max_connections)
    raise ValueError(f"services.{config.name}.type: unknown service type {config.type!r}")
