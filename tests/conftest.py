"""Shared fixtures: databases for every test module.

The tests come in layers, each in a folder of its own; what they share is in `support/`:

- `unit/`: pure functions and single calls (the pipeline's decision table, the HTTP error mapping, log
  rendering): no server, no database, no process; milliseconds.
- `integration/`: one part of the daemon against the real thing: the simulated Cloudgene server and sapporo on
  loopback, SQLite and a throwaway PostgreSQL, the file system, systemd's analysers.
- `e2e/`: the daemon as a whole: `imputationd` processes, the Daemon in-process with its ticks, crashes and
  restarts, the CLI, the benchmarks' smoke runs.
- `repository/`: the repository itself: ruff, mypy, the import layers, the CI script, the package.

Database fixtures (all function-scoped unless said otherwise; every database is new and private to the test):

- `db_url` -> str: URL of a fresh database MIGRATED to head, parametrized over ["sqlite", "postgres"], so a test
  that uses it (or `engine` / `session_factory`) runs once per dialect; ids `[sqlite]` / `[postgres]`.
- `engine` -> sqlalchemy.Engine on `db_url`, made by `daemon.db.engine.make_engine` (disposed afterwards).
- `session_factory` -> sessionmaker[Session] on `engine` (`expire_on_commit=False`).
- `empty_db_url` -> str: like `db_url` but EMPTY (no tables, no alembic_version): for migration tests.
- `sqlite_url` -> str: a migrated SQLite file database only (for tests that are about SQLite or don't need both).
- `postgres_cluster` (session) -> pg.PostgresCluster (tests/support/pg.py; `from support.pg import ...` works in
  any test module):
  the throwaway server. `.restart()`, `.stop(mode)`, `.start()` to break connections under a running daemon;
  `.create_database()` for more databases; `.url(name)`.
- `fresh_postgres_db` -> str: URL of a new EMPTY database on that server, dropped afterwards.
- `postgres_url` (session) -> str: one MIGRATED database shared by the whole session (state leaks between tests:
  prefer `db_url` or `fresh_postgres_db`).

Only tests that ask for PostgreSQL start the server (once per session). Without PostgreSQL server binaries those
tests are skipped, except when $CI is set: then they fail (`prerequisites.require_tool`, like every test that needs
something from the machine). Select either side with `-m postgres` / `-m "not postgres"`; `-k sqlite` /
`-k postgres` pick one side of `db_url`. Under pytest-xdist (`-n 2`, the README's command) each worker starts its
own server.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker
from support.pg import ClusterError, PostgresCluster, find_bindir  # tests/ is on sys.path: this file is there
from support.prerequisites import require_tool

import daemon.logging
from daemon.db.engine import make_engine, make_session_factory
from daemon.db.schema import upgrade_url

# In-process daemons and CLI commands configure logging; cached loggers would keep their chain for the rest of the
# session and hide their lines from `structlog.testing.capture_logs` in later tests.
daemon.logging.CACHE_LOGGERS = False

# Fixtures that live beside their helpers: registered here, so a test module names them without importing them.
pytest_plugins = ["support.e2e_support", "support.wes.sapporo_server", "support.api_support"]

DIALECTS = [pytest.param("sqlite", id="sqlite"), pytest.param("postgres", id="postgres", marks=pytest.mark.postgres)]


def migrate(url: str) -> str:
    """Bring the database at `url` to head; return `url`."""
    upgrade_url(url)
    return url


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "postgres_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)


# -- PostgreSQL ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """The session's throwaway PostgreSQL server (started on first use, stopped and deleted at session end)."""
    require_tool(find_bindir() is not None, "PostgreSQL server binaries (/usr/lib/postgresql/*/bin)",
                 "apt-get install postgresql")
    try:
        cluster = PostgresCluster.create()
    except ClusterError as e:
        pytest.fail(f"could not start the throwaway PostgreSQL cluster: {e}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def _postgres_template(postgres_cluster: PostgresCluster) -> str:
    """Name of a migrated database that `db_url` copies (CREATE DATABASE … TEMPLATE): cheaper than migrating."""
    name = "imputationd_template"
    migrate(postgres_cluster.create_database(name))
    return name


def _private_postgres_db(cluster: PostgresCluster, template: str | None = None) -> Iterator[str]:
    cluster.ensure_running()  # a test that stopped the server must not take the next one down with it
    url = cluster.create_database(template=template)
    yield url
    cluster.ensure_running()
    cluster.drop_database(sa.make_url(url).database)


@pytest.fixture
def fresh_postgres_db(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """URL (`postgresql+psycopg://postgres@127.0.0.1:PORT/t_…`) of a new, empty database; dropped afterwards."""
    yield from _private_postgres_db(postgres_cluster)


@pytest.fixture(scope="session")
def postgres_url(postgres_cluster: PostgresCluster, _postgres_template: str) -> str:
    """One migrated database for the whole session; shared, so tests see each other's rows."""
    return postgres_cluster.create_database("imputationd_session", template=_postgres_template)


# -- SQLite -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file that `sqlite_url` copies (its WAL checkpointed away when the engine closed)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "imputationd.db"
    migrate(f"sqlite:///{path}")
    return path


@pytest.fixture
def sqlite_url(tmp_path: Path, _sqlite_template: Path) -> str:
    """URL of a migrated SQLite file database in `tmp_path`."""
    path = tmp_path / "imputationd.db"
    shutil.copyfile(_sqlite_template, path)
    return f"sqlite:///{path}"


# -- both ---------------------------------------------------------------------------------------------------------


@pytest.fixture(params=DIALECTS)
def db_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """URL of a fresh migrated database, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield request.getfixturevalue("sqlite_url")
    else:
        yield from _private_postgres_db(
            request.getfixturevalue("postgres_cluster"), request.getfixturevalue("_postgres_template")
        )


@pytest.fixture(params=DIALECTS)
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of a fresh EMPTY database (nothing migrated), once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    return request.getfixturevalue("fresh_postgres_db")


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    """`make_engine(db_url)`; disposed after the test."""
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session_factory(engine: sa.Engine) -> sessionmaker[Session]:
    """Sessions on `engine` (`make_session_factory`)."""
    return make_session_factory(engine)


# -- logging ------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """Logging is process-wide: every `imputationd` command run in-process (`daemon.cli.main`) points the log handler
    at stderr, pytest's captured one in a test, and a daemon quiets APScheduler's loggers. After each test take that
    handler away again (before its stream is closed) and put every logger's level back, so that no test sees what
    an earlier one configured."""
    levels = {name: lg.level for name, lg in logging.Logger.manager.loggerDict.items()
              if isinstance(lg, logging.Logger)}
    root_level = logging.getLogger().level
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == "imputationd"]:
        root.removeHandler(handler)
    root.setLevel(root_level)
    for name, lg in logging.Logger.manager.loggerDict.items():
        if isinstance(lg, logging.Logger):
            lg.setLevel(levels.get(name, logging.NOTSET))

