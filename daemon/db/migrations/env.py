"""Alembic environment of imputationd, configured from code: no alembic.ini.

The supported entry point is `daemon.db.schema` (`imputationd db upgrade`), which hands over a connection already in
its migration transaction as `config.attributes["connection"]`. Otherwise (alembic's command API with
`schema.alembic_config(url=...)`, e.g. to autogenerate a new revision) the URL in `sqlalchemy.url` is opened with
the daemon's own engine settings and migrated inside the same kind of transaction.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from daemon.db.engine import make_engine
from daemon.db.models import Base
from daemon.db.schema import migration_transaction

config = context.config
target_metadata = Base.metadata


def _render_as_batch(dialect_name: str) -> bool:
    # SQLite cannot ALTER most things: batch mode rebuilds the table instead (migration_transaction turns foreign
    # keys off around it, so dropping the old table cascades nothing).
    return dialect_name == "sqlite"


def _configured_url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("alembic: neither a connection nor sqlalchemy.url given (see daemon.db.schema)")
    return url


def run_migrations_offline() -> None:
    url = sa.make_url(_configured_url())
    context.configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=_render_as_batch(url.get_backend_name()),
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_on(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=_render_as_batch(connection.dialect.name),
    )
    # A no-op when the connection is already in a transaction, as migration_transaction leaves it.
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    engine = make_engine(_configured_url())
    try:
        with engine.connect() as connection, migration_transaction(connection):
            _run_on(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
