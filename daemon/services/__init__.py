"""Service adapters: one per (configured service, owner), built from its config, all behind `ServiceAdapter`."""

from __future__ import annotations

import threading
from collections.abc import Callable

from daemon.config import Config, ServiceConfig
from daemon.credentials import TokenReader, token_reader
from daemon.owners import DEFAULT_OWNER
from daemon.services.base import ServiceAdapter
from daemon.services.cloudgene import CloudgeneAdapter
from daemon.services.scrubbing import ScrubbingAdapter
from daemon.services.wes import WesAdapter

AdapterFactory = Callable[..., ServiceAdapter]


def build_adapter(config: ServiceConfig, *, token: TokenReader, max_connections: int = 10) -> ScrubbingAdapter:
    """The adapter of one configured service sending `token`, behind the boundary that scrubs what its server says
    of secrets."""
    adapter: ServiceAdapter
    if config.type == "cloudgene":
        adapter = CloudgeneAdapter(config, token=token, max_connections=max_connections)
    elif config.type == "wes":
        adapter = WesAdapter(config, token=token, max_connections=max_connections)
    else:
        raise ValueError(f"services.{config.name}.type: unknown service type {config.type!r}")
    return ScrubbingAdapter(adapter, token=token)


def operator_adapter(config: Config, service: str, *, max_connections: int = 10) -> ScrubbingAdapter:
    """The adapter the operator's commands use (`services --check`, `adopt`): the service's own token."""
    return build_adapter(config.services[service], token=token_reader(config, service, DEFAULT_OWNER),
                         max_connections=max_connections)


class Adapters:
    """The daemon's adapters: one per (service, owner), made on first use, each sending that owner's token
    (`daemon.credentials`). Owners do not share an adapter, so nothing one owner's token did (a block, a cached
    lookup) is ever taken for another's."""

    def __init__(self, config: Config, *, factory: AdapterFactory = build_adapter, max_connections: int = 10) -> None:
        self._config = config
        self._factory = factory
        self._max_connections = max_connections
        self._lock = threading.Lock()
        self._adapters: dict[tuple[str, str], ServiceAdapter] = {}
        #: Adapters of a service whose settings a reload changed: in-flight steps may still use them.
        self._retired: list[ServiceAdapter] = []

    @property
    def services(self) -> list[str]:
        return list(self._config.services)

    def __contains__(self, service: object) -> bool:
        return service in self._config.services

    def get(self, service: str, owner: str = DEFAULT_OWNER) -> ServiceAdapter | None:
        """The adapter for `owner`'s jobs on `service`; None when the service is not configured."""
        if service not in self._config.services:
            return None
        with self._lock:
            adapter = self._adapters.get((service, owner))
            if adapter is None:
                adapter = self._factory(self._config.services[service], max_connections=self._max_connections,
                                        token=token_reader(self._config, service, owner))
                self._adapters[(service, owner)] = adapter
            return adapter

    def reconfigure(self, config: Config, *, max_connections: int) -> None:
        """Take a reloaded config: the adapters of a service whose settings changed, or that is gone, are retired
        (closed at stop) and made again on their next use."""
        with self._lock:
            for key in list(self._adapters):
                service = key[0]
                if config.services.get(service) != self._config.services.get(service):
                    self._retired.append(self._adapters.pop(key))
            self._config = config
            self._max_connections = max_connections

    def close(self) -> None:
        with self._lock:
            adapters = [*self._adapters.values(), *self._retired]
            self._adapters.clear()
            self._retired.clear()
        for adapter in adapters:
            adapter.close()

