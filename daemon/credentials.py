"""Which token an owner's jobs on a service are sent with, read afresh whenever its file changes.

Each owner has their own account on each server: their token is `<credentials>/<owner>/<service>.token`, where
`<credentials>` is `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`/`LoadCredentialEncrypted=`), else the config's
`credentials_dir`. systemd cannot make folders there: `LoadCredential=alice:/etc/imputationd/owners/alice` loads
that folder's files as `alice_<file>`, so `<credentials>/<owner>_<service>.token` is looked for too.

Without a token of their own, an owner's jobs use the service's own token (`token_file`/`token_env`) only when the
service says `shared_token: true`; the service's own token is the operator's (the default owner) in any case. An
owner with no token at all gets a job that cannot be sent, and the error that blocks that owner on the service says
where the token is expected.

The choice is made on every read, not once: a token file an operator adds, replaces or removes takes effect with the
next call, without a restart.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import structlog

from daemon.config import Config
from daemon.logging import register_secret
from daemon.owners import DEFAULT_OWNER

log = structlog.get_logger("daemon.credentials")

#: A token file changed less than this long ago is read again on every call, however its stat looks: a second
#: write within the file system's timestamp granularity can leave size and times as they were ("racy git").
_SETTLED_NS = 2_000_000_000

TokenReader = Callable[[], str | None]


class TokenSource(NamedTuple):
    """Where one (service, owner)'s token comes from: a file or an environment variable; neither for auth: none."""

    path: Path | None
    env: str | None
    #: "owner" (their own file) or "service" (the service's token_file/token_env).
    whose: str


def credentials_dir(config: Config) -> Path | None:
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    return Path(directory) if directory else config.credentials_dir


def owner_token_path(config: Config, service: str, owner: str) -> Path | None:
    """Where `owner`'s own token for `service` is kept (the folder form unless only the flat one exists); None when
    no credentials directory is known."""
    directory = credentials_dir(config)
    if directory is None:
        return None
    path = directory / owner / f"{service}.token"
    flat = directory / f"{owner}_{service}.token"
    return flat if not path.exists() and flat.exists() else path


def token_source(config: Config, service: str, owner: str) -> TokenSource | None:
    """Where the token of `owner`'s jobs on `service` comes from right now; None when the owner has none."""
    configured = config.services[service]
    if configured.auth == "none":
        return TokenSource(None, None, "service")
    own = owner_token_path(config, service, owner)
    if own is not None and own.exists():
        return TokenSource(own, None, "owner")
    if owner == DEFAULT_OWNER or configured.shared_token:
        return TokenSource(configured.token_path(), configured.token_env, "service")
    return None


def missing_token(config: Config, service: str, owner: str) -> OSError:
    """The error a read raises for an owner without a token: it blocks the owner on the service and says why."""
    own = owner_token_path(config, service, owner)
    where = f"put it in {own}" if own is not None else "set credentials_dir (or $CREDENTIALS_DIRECTORY)"
    return FileNotFoundError(errno.ENOENT, f"owner {owner} has no token for {service}: {where}")


def token_reader(config: Config, service: str, owner: str) -> TokenReader:
    """The token `owner`'s jobs on `service` are sent with, chosen and read afresh on every call (see the module).

    Raises OSError when the owner has none, or its file cannot be read."""
    read_file = _file_reader()

    def read() -> str | None:
        source = token_source(config, service, owner)
        if source is None:
            raise missing_token(config, service, owner)
        if source.path is not None:
            return _checked(read_file(source.path), service)
        return _checked(_environment(source.env), service)

    return read


def fingerprint(config: Config, service: str, owner: str) -> str | None:
    """Something that changes when the (service, owner)'s token changes, without keeping the token itself around."""
    if service not in config.services:
        return None
    source = token_source(config, service, owner)
    if source is None:
        return "none"
    if source.path is not None:
        try:
            st = source.path.stat()
        except OSError:
            return None
        return f"{source.path}:{st.st_mtime_ns}:{st.st_size}:{st.st_ino}"
    return str(hash(_environment(source.env)))


def _file_reader() -> Callable[[Path], str | None]:
    """Read a token file once and then only stat() it (one system call instead of five), again when its path,
    inode, size or times differ or it was written in the last two seconds. Every API call asks for the token."""
    cached: tuple[tuple[object, ...], str | None] | None = None

    def read(path: Path) -> str | None:
        nonlocal cached
        info = os.stat(path)
        key = (path, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        last = cached
        if last is not None and last[0] == key:
            return last[1]
        token = path.read_text(encoding="utf-8").strip()
        if time.time_ns() - info.st_mtime_ns > _SETTLED_NS:
            cached = (key, token)
        return token

    return read


def _environment(name: str | None) -> str | None:
    value = os.environ.get(name) if name else None
    return value.strip() if value else None


def _checked(token: str | None, service: str) -> str | None:
    """Every token read is registered with the log redaction before anyone can log it."""
    if token:
        register_secret(token)
    return token or None
