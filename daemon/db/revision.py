"""Is the database at the schema this code needs? The question the daemon and every command ask at start, answered
without Alembic when the answer is the usual one.

Alembic and what it imports cost a running daemon 6.3 MiB of RSS (measured beside the rest of its imports: 8 % of
the 80 MB idle target, and what the ratio to the Celery stack it replaces cannot spare), and a daemon whose database
is at head never needs it: reading `alembic_version` and comparing it with `SCHEMA_REVISION`, the revision the models
describe, is enough. Anything else (a new SQLite file to migrate, an older or newer schema) goes to `schema`, which
is Alembic's side and is imported only then.
"""

from __future__ import annotations

import sqlalchemy as sa

from daemon.db.engine import connect, read_only
from daemon.db.models import SCHEMA_REVISION
from daemon.db.schema_errors import UPGRADE_HINT, SchemaNewer, SchemaOutdated

__all__ = ["UPGRADE_HINT", "SchemaNewer", "SchemaOutdated", "ensure_current", "upgrade_url"]

def ensure_current(engine: sa.Engine) -> str:
    """Return the schema revision when the database is at the one this code needs, migrating a new SQLite database
    to it first; raise `SchemaOutdated` (behind, or an empty PostgreSQL database) or `SchemaNewer` (ahead) with a
    one-line message saying what to do, or `DatabaseUnavailable`. A new, empty SQLite database is migrated there and
    then: the first process to open it made it, with nothing to back up first. PostgreSQL databases (made by an
    administrator, shared) and older SQLite schemas are upgraded only by `imputationd db upgrade`."""
    if _version_rows(engine) == [SCHEMA_REVISION]:
        return SCHEMA_REVISION
    from daemon.db import schema  # Alembic's side: see the module docstring for why only here

    return schema.check_current(engine)


def upgrade_url(url: str | sa.URL) -> tuple[str | None, str]:
    """`imputationd db upgrade`: migrate the database at `url` to head; (revision before, revision after)."""
    from daemon.db import schema  # Alembic's side: see the module docstring for why only here

    return schema.upgrade_url(url)


def _version_rows(engine: sa.Engine) -> list[str] | None:
    """The `alembic_version` rows; None when the table cannot be read (no table yet: Alembic decides)."""
    with connect(read_only(engine)) as connection:
        try:
            return list(connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalars())
        except sa.exc.DBAPIError:
            return None
