"""Start a real sapporo WES 1.1 server for tests: a subprocess on 127.0.0.1, its own run directory, no Docker.

    from support.wes.sapporo_server import running_sapporo      # tests/ is on sys.path under pytest

    with running_sapporo(tmp_path) as server:            # ready when this returns (polled, with a deadline)
        config = server.service_config()                 # a ServiceConfig(type="wes") for the test workflow
        adapter = WesAdapter(config, token=lambda: None)
        ...

or the module-scoped fixture, which any test names without an import (tests/conftest.py registers this module):

    def test_something(sapporo): ...

What is real and what is ours:

- The server is the installed `sapporo` package (FastAPI + uvicorn), started with its own CLI options:
  `--run-dir`, `--service-info`, `--run-sh`, `--url-prefix`, `--cancel-grace-seconds`, `--auth-config`.
- sapporo runs each run with `bash RUN_SH RUN_DIR`. The stock run.sh only knows Docker-based engines, so we
  write `engine.sh` (one engine, `shell`, which runs the workflow script with bash) in front of the installed
  sapporo's own run.sh: state changes, exit codes, cancel (SIGUSR1 -> process-group kill), and
  `sapporo-cli dump-outputs` (outputs.json, the RunLog `outputs`) stay sapporo's.
- `service_info.json` declares workflow type `SHELL` 1.0 and engine `shell` 1.0 (sapporo validates both on
  POST /runs). The workflow is `impute.sh`, given as an absolute `workflow_url` (the server is local).
- With `auth_password=...`, sapporo's own IdP is enabled (one user, argon2 hash, random secret key); take a
  JWT from `server.token()`, which calls POST /token.

Needs `bash`, `jq` (sapporo's run.sh reads run_request.json with it), `gzip` and `awk` on PATH; `sapporo-cli`
is found next to the running Python. `require_sapporo()` skips (fails under CI) a test when one is absent.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.config import ServiceConfig, WesConfig
from support.prerequisites import require_tool

HERE = Path(__file__).resolve().parent
WORKFLOW = HERE / "impute.sh"
ENGINE_SH = HERE / "engine.sh"
SERVICE_INFO = HERE / "service_info.json"

WORKFLOW_TYPE = "SHELL"
WORKFLOW_TYPE_VERSION = "1.0"
ENGINE = "shell"
ENGINE_VERSION = "1.0"
USERNAME = "imputationd"

#: The workflow_params template the test workflow understands (see impute.sh).
DEFAULT_PARAMS: dict[str, Any] = {"files": "{files}", "panel": "{panel}", "build": "{build}", "job_id": "{job_id}"}


def missing_tools() -> list[str]:
    """The programs the server's runs need that are not on PATH."""
    return [tool for tool in ("bash", "jq", "gzip", "zcat", "awk") if shutil.which(tool) is None]


def require_sapporo() -> None:
    """Skip (fail under CI) unless the sapporo package is installed and every program its runs need is on PATH."""
    require_tool(importlib.util.find_spec("sapporo") is not None, "the sapporo package (a test extra)",
                 "pip install -e '.[test]'")
    missing = missing_tools()
    require_tool(not missing, f"{', '.join(missing)} on PATH, which sapporo's runs need",
                 "apt-get install jq gzip mawk")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class SapporoServer:
    origin: str  # http://127.0.0.1:PORT
    url_prefix: str  # where the WES API is mounted ("" = root)
    workdir: Path
    run_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    password: str | None = field(default=None, repr=False)

    @property
    def api_root(self) -> str:
        return self.origin + self.url_prefix

    def run_path(self, run_id: str) -> Path:
        """The run's directory on disk (sapporo shards run directories by the first two characters)."""
        return self.run_dir / run_id[:2] / run_id

    def outputs_dir(self, run_id: str) -> Path:
        return self.run_path(run_id) / "outputs"

    def token(self) -> str:
        """A fresh JWT from sapporo's own IdP (POST /token); only with `auth_password`."""
        if self.password is None:
            raise RuntimeError("this sapporo runs without authentication")
        answer = httpx.post(
            f"{self.api_root}/token", data={"username": USERNAME, "password": self.password}, timeout=10
        )
        answer.raise_for_status()
        return str(answer.json()["access_token"])

    def wes_config(self, params: dict[str, Any] | None = None, **overrides: Any) -> WesConfig:
        """A WesConfig for the test workflow; `params` replace the default workflow_params template."""
        values: dict[str, Any] = {
            "workflow_url": str(WORKFLOW),
            "workflow_type": WORKFLOW_TYPE,
            "workflow_type_version": WORKFLOW_TYPE_VERSION,
            "engine": ENGINE,
            "engine_version": ENGINE_VERSION,
            "workflow_params": dict(DEFAULT_PARAMS if params is None else params),
        }
        values.update(overrides)
        return WesConfig(**values)

    def service_config(
        self, name: str = "sapporo", *, base_url: str | None = None, wes: WesConfig | None = None, **overrides: Any
    ) -> ServiceConfig:
        """A ServiceConfig pointing at this server (by default at its origin: the adapter appends the prefix)."""
        return ServiceConfig(
            name=name,
            type="wes",
            base_url=base_url if base_url is not None else self.origin,
            wes=wes if wes is not None else self.wes_config(),
            timeout=10.0,
            **overrides,
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the server's process group (uvicorn and the run.sh processes it started), then wait until the
        whole group is gone; SIGKILL what is left after `timeout`.

        run.sh traps SIGTERM and stops its workflow's own process group itself (`--cancel-grace-seconds`), so
        waiting for the group, not just for the server, is what leaves no workflow behind."""
        group = self.process.pid  # start_new_session: the server leads its own group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None and not _group_alive(group):
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        self.process.wait(timeout=5)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_run_sh(workdir: Path) -> Path:
    """engine.sh followed by the installed sapporo's own run.sh (which must stay last: it starts the run)."""
    import sapporo  # the installed package; its run.sh is the run contract we test against

    stock = Path(sapporo.__file__).resolve().parent / "run.sh"
    run_sh = workdir / "run.sh"
    run_sh.write_text(
        "#!/usr/bin/env bash\n"
        f"# Generated by {Path(__file__).name}: tests/support/wes/engine.sh + {stock}\n\n"
        + ENGINE_SH.read_text(encoding="utf-8")
        + "\n# ---- sapporo's run.sh ----\n"
        + stock.read_text(encoding="utf-8"),
        encoding="utf-8",
    )
    run_sh.chmod(0o755)
    return run_sh


def _write_auth_config(workdir: Path, password: str | None) -> Path:
    from argon2 import PasswordHasher  # a dependency of sapporo

    users = [{"username": USERNAME, "password_hash": PasswordHasher().hash(password)}] if password else []
    config = {
        "auth_enabled": password is not None,
        "idp_provider": "sapporo",
        "sapporo_auth_config": {"secret_key": secrets.token_urlsafe(48), "expires_delta_hours": 1, "users": users},
        "external_config": {
            "idp_url": "http://127.0.0.1:9/unused",
            "jwt_audience": "account",
            "client_mode": "public",
            "client_id": None,
            "client_secret": None,
        },
    }
    path = workdir / "auth_config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def start_sapporo(
    workdir: Path,
    *,
    url_prefix: str = "/ga4gh/wes/v1",
    auth_password: str | None = None,
    cancel_grace_seconds: int = 2,
    ready_timeout: float = 30.0,
    attempts: int = 3,
) -> SapporoServer:
    """Start sapporo and return once GET {api_root}/service-info answers 200; raise with its log if it cannot."""
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = workdir / "runs"
    run_dir.mkdir(exist_ok=True)
    run_sh = _write_run_sh(workdir)
    auth_config = _write_auth_config(workdir, auth_password)
    # An empty list means "any workflow may run".
    executable = workdir / "executable_workflows.json"
    executable.write_text('{"workflows": []}', encoding="utf-8")

    env = {key: value for key, value in os.environ.items() if not key.startswith("SAPPORO_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "/usr/bin:/bin")])
    env["PYTHONUNBUFFERED"] = "1"

    last_error = "not started"
    for attempt in range(attempts):
        port = free_port()
        log_path = workdir / f"sapporo-{attempt}.log"
        command = [
            sys.executable,
            "-c",
            "from sapporo.app import main; main()",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--run-dir", str(run_dir),
            "--service-info", str(SERVICE_INFO),
            "--executable-workflows", str(executable),
            "--run-sh", str(run_sh),
            "--auth-config", str(auth_config),
            "--url-prefix", url_prefix,
            "--cancel-grace-seconds", str(cancel_grace_seconds),
        ]  # fmt: skip
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        server = SapporoServer(
            origin=f"http://127.0.0.1:{port}",
            url_prefix=url_prefix,
            workdir=workdir,
            run_dir=run_dir,
            log_path=log_path,
            process=process,
            password=auth_password,
        )
        if _wait_ready(server, ready_timeout):
            return server
        server.stop()
        last_error = server.log_tail()
        if "address already in use" not in last_error.lower():
            break
    raise RuntimeError(f"sapporo did not start; its log ends with:\n{last_error}")


def _wait_ready(server: SapporoServer, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                return False
            with contextlib.suppress(httpx.TransportError):
                if client.get(f"{server.api_root}/service-info").status_code == 200:
                    return True
            time.sleep(0.05)
    return False


@contextlib.contextmanager
def running_sapporo(workdir: Path, **options: Any) -> Iterator[SapporoServer]:
    """`start_sapporo` as a context manager that always stops the server (and the runs it started)."""
    server = start_sapporo(workdir, **options)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def sapporo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SapporoServer]:
    """A sapporo server for the module (API under /ga4gh/wes/v1, no authentication); `require_sapporo()` first."""
    require_sapporo()
    with running_sapporo(tmp_path_factory.mktemp("sapporo")) as server:
        yield server
