"""The database schema's version: apply the Alembic migrations shipped in `daemon/db/migrations`, and refuse to run
on a schema this code does not match.

- `upgrade(engine)`: bring the schema to head; safe to repeat and to run from several daemons at once (one
  transaction, serialised by `BEGIN IMMEDIATE` on SQLite and an advisory lock on PostgreSQL).
- `ensure_current(engine)`: what the daemon and every command call at start; raises `SchemaOutdated` (or
  `SchemaNewer`) with a one-line message saying what to do. A new, empty SQLite database is migrated there and
  then: it is made by the first process to open it, with nothing to back up first. PostgreSQL databases (made by
  an administrator, shared) and older SQLite schemas are upgraded only by `imputationd db upgrade`.

Writing a new revision: change `models.py`, then, against a database at head,
`command.revision(alembic_config(url=URL), message="...", autogenerate=True)` (from `alembic import command`),
clean the result up, and keep `tests/test_db.py::test_migrations_match_models` green.
"""

from __future__ import annotations

import re
import threading
import types
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

from daemon.db.engine import DatabaseUnavailable, connect, is_postgres, is_sqlite, make_engine, read_only

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

# Alembic is imported when it is needed (`_alembic`): it is ~8 MiB of modules, and the running daemon only needs to
# know that the database is at head, which `ensure_current` finds out without it (see `_head_from_files`).
_ALEMBIC_IMPORT = threading.Lock()


def _alembic() -> types.SimpleNamespace:
    """Alembic's pieces, imported once under a lock: threads importing its interdependent modules at the same time
    could see one half-initialised."""
    with _ALEMBIC_IMPORT:
        from alembic import command
        from alembic.config import Config
        from alembic.migration import MigrationContext
        from alembic.script import ScriptDirectory
        from alembic.util import CommandError
    return types.SimpleNamespace(command=command, Config=Config, MigrationContext=MigrationContext,
                                 ScriptDirectory=ScriptDirectory, CommandError=CommandError)

__all__ = [
    "DatabaseUnavailable",
    "SchemaNewer",
    "SchemaOutdated",
    "alembic_config",
    "current_revision",
    "ensure_current",
    "head_revision",
    "migration_transaction",
    "upgrade",
]

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

#: Key of the PostgreSQL advisory lock held while migrating (any daemon sharing the database waits on it).
ADVISORY_LOCK_KEY = zlib.crc32(b"imputationd schema upgrade")

UPGRADE_HINT = "run `imputationd db upgrade`"


class SchemaOutdated(Exception):
    """The database schema is not the one this imputationd was written for. `reason` says how; the message is
    the reason and `hint` (what to do)."""

    def __init__(self, reason: str, hint: str | None = UPGRADE_HINT) -> None:
        self.reason = reason
        self.hint = hint
        super().__init__(f"{reason}: {hint}" if hint else reason)


class SchemaNewer(SchemaOutdated):
    """The database schema is at a revision this imputationd does not know: a newer imputationd upgraded it."""


def alembic_config(*, connection: sa.Connection | None = None, url: str | sa.URL | None = None) -> Config:
    """An Alembic configuration for our migrations, working on `connection` (preferred) or opening `url`."""
    cfg = _alembic().Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    if url is not None:
        rendered = sa.make_url(url).render_as_string(hide_password=False)
        cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _script() -> ScriptDirectory:
    return _alembic().ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The revision this code needs."""
    head = _script().get_current_head()
    assert head is not None, f"no migrations under {MIGRATIONS_DIR}"
    return head


def _revision_of(connection: sa.Connection) -> str | None:
    return _alembic().MigrationContext.configure(connection).get_current_revision()


def current_revision(engine: sa.Engine) -> str | None:
    """The database's revision; None for a database no migration has touched."""
    with connect(read_only(engine)) as connection:
        return _revision_of(connection)


def _is_known(revision: str) -> bool:
    try:
        return _script().get_revision(revision) is not None
    except _alembic().CommandError:
        return False


def _refuse_newer(current: str | None) -> None:
    if current is not None and not _is_known(current):
        raise SchemaNewer(
            f"database schema is at {current}, which this imputationd does not know: it was upgraded by a newer "
            f"imputationd; run that version (this one needs {head_revision()})",
            hint=None,
        )


_REVISION = re.compile(r"""^revision\b[^=\n]*=\s*["']([^"']+)["']""", re.MULTILINE)
_DOWN_REVISION = re.compile(r"^down_revision\b[^=\n]*=(.*)$", re.MULTILINE)


def _head_from_files() -> str | None:
    """The head revision read from the migration files' `revision` / `down_revision` lines (the one revision no
    other revision names as its parent); None when the files do not say it plainly (then Alembic decides)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (MIGRATIONS_DIR / "versions").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        revision, down = _REVISION.search(text), _DOWN_REVISION.search(text)
        if revision is None or down is None:
            return None
        revisions.add(revision.group(1))
        parents.update(re.findall(r"""["']([^"']+)["']""", down.group(1)))
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 and parents <= revisions else None


def _version_rows(engine: sa.Engine) -> list[str] | None:
    """The `alembic_version` rows; None when the table cannot be read (no table yet: Alembic decides)."""
    with connect(read_only(engine)) as connection:
        try:
            return list(connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalars())
        except sa.exc.DBAPIError:
            return None


def ensure_current(engine: sa.Engine) -> str:
    """Return the head revision when the database is at it, migrating a new SQLite database to it first; raise
    `SchemaOutdated` (behind, or an empty PostgreSQL database) or `SchemaNewer` (ahead) with a one-line message, or
    `DatabaseUnavailable`.

    The usual answer (at head) comes without importing Alembic; anything else goes through it."""
    head = _head_from_files()
    rows = _version_rows(engine)
    if head is not None and rows == [head]:
        return head
    if rows is None and _is_new_sqlite(engine):
        # Two processes meeting a new database at once migrate one after the other (`upgrade` takes the write
        # lock first); the second finds the work done.
        return upgrade(engine)[1]
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return head
    _refuse_newer(current)
    raise SchemaOutdated(f"database schema is at {current or 'empty'}, this imputationd needs {head}")


def _is_new_sqlite(engine: sa.Engine) -> bool:
    """A SQLite database with nothing in it (no table, index or view): opening a file that was not there made it."""
    if not is_sqlite(engine):
        return False
    with connect(read_only(engine)) as connection:
        return connection.exec_driver_sql("SELECT count(*) FROM sqlite_master").scalar_one() == 0


def _sqlite_foreign_keys(connection: sa.Connection, on: bool) -> None:
    # On the driver connection: anything run through SQLAlchemy would BEGIN first, and this pragma is a no-op
    # inside a transaction.
    connection.connection.driver_connection.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}").close()


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
        _alembic().command.upgrade(alembic_config(connection=connection), "head")
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
