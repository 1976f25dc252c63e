"""A throwaway PostgreSQL cluster for the test session: initdb into a temp dir, serve on 127.0.0.1 (free port) and a
unix socket in that dir, trust auth, fsync off; stopped and deleted at the end.

The server refuses to run as root, so when the tests run as root (CI) initdb and pg_ctl run as the `postgres` system
user (Debian's package creates it), else as `nobody`, and the temp dir belongs to that user.

    cluster = PostgresCluster.create()   # started
    url = cluster.create_database()      # "postgresql+psycopg://postgres@127.0.0.1:PORT/t_..."
    cluster.restart()                    # e.g. under a running daemon
    cluster.close()                      # stop and delete everything

The test fixtures in `conftest.py` wrap this; use those.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

import psycopg
from psycopg import sql

SUPERUSER = "postgres"
_BINARY_GLOB = "/usr/lib/postgresql/*/bin"


def find_bindir() -> Path | None:
    """The newest PostgreSQL server's bin directory (`/usr/lib/postgresql/N/bin`, or wherever `pg_ctl` is on PATH);
    None when there is none."""
    candidates = [p for p in Path("/").glob(_BINARY_GLOB.lstrip("/")) if (p / "initdb").is_file()]
    if candidates:
        return max(candidates, key=lambda p: _version_key(p.parent.name))
    on_path = shutil.which("pg_ctl")
    if on_path and (Path(on_path).parent / "initdb").is_file():
        return Path(on_path).parent
    return None


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ClusterError(RuntimeError):
    pass


class PostgresCluster:
    """One running PostgreSQL server in its own temp dir. Methods are safe to call from any thread."""

    def __init__(self, bindir: Path, basedir: Path, run_as: str | None) -> None:
        self.bindir = bindir
        self.basedir = basedir
        self.datadir = basedir / "data"
        self.socket_dir = basedir  # short path: unix socket paths are limited to ~107 bytes
        self.logfile = basedir / "server.log"
        self.run_as = run_as
        self.host = "127.0.0.1"
        self.port = free_port()
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, bindir: Path | None = None) -> PostgresCluster:
        """initdb and start a new cluster; raises `ClusterError` when there are no binaries or it will not start."""
        bindir = bindir or find_bindir()
        if bindir is None:
            raise ClusterError(f"no PostgreSQL server binaries (looked in {_BINARY_GLOB} and PATH)")
        run_as = None
        if os.geteuid() == 0:
            run_as = SUPERUSER if _user_exists(SUPERUSER) else "nobody"
        basedir = Path(tempfile.mkdtemp(prefix="imputationd-pg-"))
        cluster = cls(bindir, basedir, run_as)
        atexit.register(cluster.close)  # also when the session dies before fixture teardown
        try:
            if run_as is not None:
                user = pwd.getpwnam(run_as)
                os.chown(basedir, user.pw_uid, user.pw_gid)
            cluster._run(
                [
                    "initdb",
                    "--pgdata", str(cluster.datadir),
                    "--username", SUPERUSER,
                    "--auth", "trust",
                    "--encoding", "UTF8",
                    "--locale", "C",
                    "--no-sync",
                ]
            )  # fmt: skip
            (cluster.datadir / "postgresql.auto.conf").write_text(
                "\n".join(
                    [
                        "listen_addresses = '127.0.0.1'",
                        f"unix_socket_directories = '{cluster.socket_dir}'",
                        "fsync = off",
                        "synchronous_commit = off",
                        "full_page_writes = off",
                        "max_connections = 200",
                        "",
                    ]
                )
            )
            cluster._start_on_a_free_port()
        except BaseException:
            cluster.close()
            raise
        return cluster

    def _start_on_a_free_port(self, attempts: int = 3) -> None:
        # The port was free when picked; another process may have taken it since.
        for attempt in range(attempts):
            try:
                self.start()
                return
            except ClusterError:
                if attempt == attempts - 1:
                    raise
                self.port = free_port()

    def start(self) -> None:
        """Start the server (waits until it accepts connections). Port and data survive stop/start."""
        self._pg_ctl("start", "--wait", "--timeout", "60", "--log", str(self.logfile), "-o", f"-p {self.port}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast` (disconnect clients, clean shutdown) or `immediate` (like a crash)."""
        self._pg_ctl("stop", "--wait", "--timeout", "60", "--mode", mode)

    def restart(self, mode: str = "fast") -> None:
        """Stop and start again on the same port: every open connection is broken."""
        self.stop(mode)
        self.start()

    def is_running(self) -> bool:
        result = self._run(["pg_ctl", "status", "--pgdata", str(self.datadir)], check=False)
        return result.returncode == 0

    def ensure_running(self) -> None:
        if not self.is_running():
            self.start()

    def close(self) -> None:
        """Stop the server (immediately) and delete its directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ClusterError, OSError):
            if (self.datadir / "postmaster.pid").exists():
                self.stop("immediate")
        shutil.rmtree(self.basedir, ignore_errors=True)

    # -- databases -------------------------------------------------------------------------------------------------

    def url(self, dbname: str = "postgres", driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://{SUPERUSER}@{self.host}:{self.port}/{dbname}"

    def _admin(self) -> psycopg.Connection:
        return psycopg.connect(
            host=self.host, port=self.port, user=SUPERUSER, dbname="postgres", autocommit=True, connect_timeout=10
        )

    def create_database(self, name: str | None = None, *, template: str | None = None) -> str:
        """Create a database (a random `t_…` name by default, optionally copied from `template`); return its
        SQLAlchemy URL."""
        name = name or f"t_{uuid.uuid4().hex[:16]}"
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            query = sql.SQL("{} TEMPLATE {}").format(query, sql.Identifier(template))
        with self._admin() as conn:
            conn.execute(query)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting whoever is still on it."""
        with self._admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    # -- plumbing --------------------------------------------------------------------------------------------------

    def _pg_ctl(self, *args: str) -> None:
        self._run(["pg_ctl", "--pgdata", str(self.datadir), *args])

    def _run(self, argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bindir / argv[0]), *argv[1:]]
        if self.run_as is not None:
            argv = ["runuser", "-u", self.run_as, "--", *argv]
        result = subprocess.run(
            argv,
            cwd=self.basedir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and result.returncode != 0:
            log = self.logfile.read_text(errors="replace")[-2000:] if self.logfile.exists() else ""
            raise ClusterError(
                f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}\n{log}".rstrip()
            )
        return result


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
