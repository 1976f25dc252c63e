"""The database schema through Alembic: apply the migrations shipped in `daemon/db/migrations`, and say how a
schema this code does not match differs.

- `upgrade(engine)`: bring the schema to head; safe to repeat and to run from several daemons at once (one
  transaction, serialised by `BEGIN IMMEDIATE` on SQLite and an advisory lock on PostgreSQL).
- `check_current(engine)`: `daemon.db.revision.ensure_current` when the database is not simply at head (the
  daemon and every command start there, and import this module only then).

Writing a new revision: change `models.py`, then, against a database at head,
`command.revision(alembic_config(url=URL), message="...", autogenerate=True)` (from `alembic import command`),
clean the result up, set `models.SCHEMA_REVISION` to it, and keep `tests/integration/test_db.py` green.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from daemon.db.engine import DatabaseUnavailable, connect, is_postgres, is_sqlite, make_engine, read_only
from daemon.db.schema_errors import SchemaNewer, SchemaOutdated

__all__ = [
    "DatabaseUnavailable",
    "SchemaNewer",
    "SchemaOutdated",
    "alembic_config",
    "current_revision",
    "check_current",
    "head_revision",
    "migration_transaction",
    "upgrade",
]

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

#: Key of the PostgreSQL advisory lock held while migrating (any daemon sharing the database waits on it).
ADVISORY_LOCK_KEY = zlib.crc32(b"imputationd schema upgrade")

def alembic_config(*, connection: sa.Connection | None = None, url: str | sa.URL | None = None) -> Config:
    """An Alembic configuration for our migrations, working on `connection` (preferred) or opening `url`."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    if url is not None:
        rendered = sa.make_url(url).render_as_string(hide_password=False)
        cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _script() -> ScriptDirectory:
    return _scripts_in(MIGRATIONS_DIR)


@functools.cache
def _scripts_in(directory: Path) -> ScriptDirectory:
    """The migrations in `directory`, read once: they cannot change under a running process."""
    return ScriptDirectory(str(directory))


def head_revision() -> str:
    """The revision this code needs."""
    head = _script().get_current_head()
    assert head is not None, f"no migrations under {MIGRATIONS_DIR}"
    return head


def _revision_of(connection: sa.Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def current_revision(engine: sa.Engine) -> str | None:
    """The database's revision; None for a database no migration has touched."""
    with connect(read_only(engine)) as connection:
        return _revision_of(connection)


def _is_known(revision: str) -> bool:
    try:
        return _script().get_revision(revision) is not None
    except CommandError:
        return False


def _refuse_newer(current: str | None) -> None:
    if current is not None and not _is_known(current):
        raise SchemaNewer(
            f"database schema is at {current}, which this imputationd does not know: it was upgraded by a newer "
            f"imputationd; run that version (this one needs {head_revision()})",
            hint=None,
        )


def check_current(engine: sa.Engine) -> str:
    """`daemon.db.revision.ensure_current` when the database is not simply at head, through Alembic: return the head
    revision when the database is at it, migrating a new SQLite database to it first; raise `SchemaOutdated`
    (behind, or an empty PostgreSQL database) or `SchemaNewer` (ahead) with a one-line message, or
    `DatabaseUnavailable`."""
    head = head_revision()
    current = current_revision(engine)
    if current == head:
        return head
    if current is None and _is_new_sqlite(engine):
        # Two processes meeting a new database at once migrate one after the other (`upgrade` takes the write
        # lock first); the second finds the work done.
        return upgrade(engine)[1]
    _refuse_newer(current)
    raise SchemaOutdated(f"database schema is at {current or 'empty'}, this imputationd needs {head}")


def _is_new_sqlite(engine: sa.Engine) -> bool:
    """A SQLite database with nothing in it (no table, index or view): opening a file that was not there made it."""
    if not is_sqlite(engine):
        return False
    with connect(read_only(engine)) as connection:
        objects: int = connection.exec_driver_sql("SELECT count(*) FROM sqlite_master").scalar_one()
        return objects == 0


def _sqlite_foreign_keys(connection: sa.Connection, on: bool) -> None:
    # On the driver connection: anything run through SQLAlchemy would BEGIN first, and this pragma is a no-op
    # inside a transaction.
    driver = connection.connection.driver_connection
    assert driver is not None, "a checked-out connection has its driver connection"
    driver.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}").close()


@contextmanager
def migration_transaction(connection: sa.Connection) -> Iterator[None]:
    """One transaction to migrate in, committed when the block ends without error.

    SQLite: `BEGIN IMMEDIATE` (one migrator at a time) with foreign keys off for the duration, because a batch
    migration rebuilds a table by dropping the old one, and with foreign keys on that drop would delete every row
    referring to it (`ON DELETE CASCADE`); `PRAGMA foreign_key_check` must come back clean before the commit.
    PostgreSQL: transactional DDL, plus an advisory lock so concurrent daemons migrate one after the other."""
    if connection.in_transaction():
        raise RuntimeError("migration_transaction needs a connection outside any transaction")
    sqlite = is_sqlite(connection)
    if sqlite:
        _sqlite_foreign_keys(connection, on=False)
    try:
        with connection.begin():
            if is_postgres(connection):
                connection.execute(sa.select(sa.func.pg_advisory_xact_lock(ADVISORY_LOCK_KEY)))
            yield
            if sqlite:
                dangling = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
                if dangling:
                    raise RuntimeError(f"migration left rows whose foreign keys point nowhere: {dangling[:5]}")
    finally:
        if sqlite:
            try:
                _sqlite_foreign_keys(connection, on=True)
            except Exception:
                connection.invalidate()  # never hand a connection without foreign keys back to the pool
                raise


def upgrade(engine: sa.Engine) -> tuple[str | None, str]:
    """Migrate the database to head; return (revision before, revision after). Running it again is a no-op that
    returns (head, head). Raises `SchemaNewer` (changing nothing) when a newer imputationd has been here, and
    `DatabaseUnavailable` when the database cannot be reached."""
    with connect(engine) as connection, migration_transaction(connection):
        before = _revision_of(connection)
        _refuse_newer(before)
        command.upgrade(alembic_config(connection=connection), "head")
        after = _revision_of(connection)
    assert after is not None
    return before, after


def upgrade_url(url: str | sa.URL) -> tuple[str | None, str]:
    """`upgrade` the database at `url` through an engine of its own, disposed afterwards."""
    engine = make_engine(url)
    try:
        return upgrade(engine)
    finally:
        engine.dispose()
