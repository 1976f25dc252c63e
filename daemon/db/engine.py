"""Engines and sessions for SQLite (the default) and PostgreSQL (production).

SQLite is set up for a threaded daemon that writes from many threads:

- WAL journal (readers never block the writer), `foreign_keys=ON` (the `ON DELETE CASCADE`s mean something),
  `synchronous=NORMAL` (durable across a crash of the process; a power cut may lose the last commits, never corrupt),
  a busy timeout so a writer waits for another instead of failing at once.
- pysqlite's own transaction handling is switched off and we emit BEGIN ourselves (SQLAlchemy's documented recipe),
  so every transaction really is one, DDL included, and a write transaction starts with `BEGIN IMMEDIATE`: it takes
  the write lock up front, waiting for it under the busy timeout, instead of failing with "database is locked" when a
  read transaction later tries to upgrade to a write. Transactions that only read use `read_only(engine)`
  (`BEGIN DEFERRED`), which never waits for a writer.
- SQLite has one writer at a time. The daemon's own threads queue for it on a lock of the engine's
  (`_QueuedWriters`), released the moment COMMIT or ROLLBACK has run, so the next one starts at once; the busy
  timeout only arbitrates between processes (a CLI command, a second daemon). Left to SQLite, a thread that found
  the database locked slept in its busy handler with growing delays (1, 2, 5, … 100 ms), however soon the lock was
  free: about 1,900 sleeps of 5 ms on average in 8 s of bench/throughput.py, with 8 workers.

PostgreSQL: psycopg 3, `pool_pre_ping` (a restarted server costs one failed ping, not a failed tick), a connect timeout
and `application_name=imputationd` so operators can find our sessions in `pg_stat_activity`.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool, StaticPool

from daemon.logging import scrub

#: Engine/connection execution option naming the SQLite BEGIN mode; `IMMEDIATE` unless set.
SQLITE_BEGIN_OPTION = "sqlite_begin"
#: `SINGLE_WRITE` (see `single_write`) begins no transaction: the one statement runs in SQLite's autocommit mode.
_SQLITE_BEGIN_MODES = frozenset({"DEFERRED", "IMMEDIATE", "EXCLUSIVE", "SINGLE_WRITE"})

SQLITE_BUSY_TIMEOUT_MS = 30_000
PG_CONNECT_TIMEOUT_S = 10
APPLICATION_NAME = "imputationd"


class DatabaseUnavailable(Exception):
    """The database cannot be reached or opened. The message is one line, names the host or path and never a
    password."""


def describe_url(url: str | URL) -> str:
    """The URL as it may be shown to an operator: the password replaced by `***`."""
    return make_url(url).render_as_string(hide_password=True)


def unavailable(url: str | URL, error: BaseException) -> DatabaseUnavailable:
    """A `DatabaseUnavailable` for `url` saying why (`error`'s first line), with the URL's password scrubbed as
    every secret is (`daemon.logging.scrub`)."""
    url = make_url(url)
    cause = getattr(error, "orig", None) or error
    reason = " ".join(str(cause).split()) or type(cause).__name__
    reason = scrub(reason, [url.password])
    return DatabaseUnavailable(f"cannot open database {describe_url(url)}: {reason}")


@contextmanager
def connect(engine: Engine) -> Iterator[sa.Connection]:
    """`engine.connect()`, with a failure to connect raised as `DatabaseUnavailable`."""
    try:
        connection = engine.connect()
    except sa.exc.DBAPIError as e:
        raise unavailable(engine.url, e) from e
    with connection:
        yield connection


def _is_memory_sqlite(url: URL) -> bool:
    database = url.database or ""
    return database in ("", ":memory:") or "mode=memory" in database or url.query.get("mode") == "memory"


def _sqlite_path(url: URL) -> Path | None:
    """The file path of a file SQLite database, None for memory or `file:` URI databases."""
    database = url.database or ""
    if _is_memory_sqlite(url) or database.startswith("file:"):
        return None
    return Path(database)


def make_engine(url: str | URL, *, pool_size: int = 5, echo: bool = False) -> Engine:
    """An engine for `url` set up for the daemon's threads (see the module doc).

    `echo` logs every statement (never its parameters: they hold job passwords and download URLs) through the
    daemon's logging, as logger `sqlalchemy.engine.Engine` at INFO, whatever `logging.level` says.
    `sqlite://` (in memory) gets a single connection shared by every thread (`StaticPool`): for unit tests only.
    Raises `DatabaseUnavailable` when a new SQLite file or its directory cannot be created."""
    url = make_url(url)
    if echo:
        _keep_statement_log_ours()
    if url.get_backend_name() == "sqlite":
        return _make_sqlite_engine(url, pool_size=pool_size, echo=echo)
    if url.get_backend_name() == "postgresql":
        return _make_postgres_engine(url, pool_size=pool_size, echo=echo)
    raise ValueError(f"unsupported database URL {describe_url(url)}: use sqlite:/// or postgresql+psycopg://")


def _keep_statement_log_ours() -> None:
    """SQLAlchemy gives an echoing engine's logger a handler of its own, printing to stdout, when it has none: its
    lines would bypass our format and redaction, and show twice. A NullHandler leaves them to ours."""
    statements = logging.getLogger("sqlalchemy.engine.Engine")
    if not statements.handlers:
        statements.addHandler(logging.NullHandler())


def _make_sqlite_engine(url: URL, *, pool_size: int, echo: bool) -> Engine:
    path = _sqlite_path(url)
    kwargs: dict[str, Any] = {}
    if path is None:
        kwargs["poolclass"] = StaticPool
    else:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _create_private(path)
        except OSError as e:
            raise unavailable(url, e) from e
        kwargs.update(poolclass=QueuePool, pool_size=pool_size)
    connect_args: dict[str, Any] = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
    if path is not None:
        # One lock per engine, shared by its connections (a memory database has a single connection anyway).
        connect_args["factory"] = type("QueuedWriters", (_QueuedWriters,), {"_writer": threading.Lock()})
    engine = sa.create_engine(
        url,
        echo=echo,
        hide_parameters=True,  # statement parameters hold job passwords and download URLs
        connect_args=connect_args,
        **kwargs,
    )
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _create_private(path: Path) -> None:
    """Create the database file empty (SQLite's start for a new database), readable and writable by its owner only
    whatever the umask: it holds download URLs, which are secrets. SQLite would make it 0644 less the umask, and it
    gives the -wal and -shm files it makes later the mode of the database file. An existing file is left as it is."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)  # the umask may have taken the owner's bits too
    finally:
        os.close(fd)


def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # No implicit BEGIN/COMMIT from pysqlite: `_sqlite_on_begin` starts every transaction.
    dbapi_connection.isolation_level = None
    _use_wal(dbapi_connection)
    for pragma in (
        "foreign_keys=ON",
        f"busy_timeout={SQLITE_BUSY_TIMEOUT_MS}",
        "synchronous=NORMAL",
    ):
        dbapi_connection.execute(f"PRAGMA {pragma}").close()


def _use_wal(dbapi_connection: sqlite3.Connection) -> None:
    """Switch the database to WAL (a no-op once it is). Switching a new database takes an exclusive lock, and when
    two connections race to do it SQLite answers "database is locked" at once rather than wait out the busy timeout
    (each holds the shared lock the other needs gone): tried again until that timeout has passed."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            dbapi_connection.execute("PRAGMA journal_mode=WAL").close()
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def _sqlite_on_begin(conn: sa.Connection) -> None:
    mode = conn.get_execution_options().get(SQLITE_BEGIN_OPTION, "IMMEDIATE")
    if mode not in _SQLITE_BEGIN_MODES:
        raise ValueError(f"{SQLITE_BEGIN_OPTION}={mode!r}: expected one of {sorted(_SQLITE_BEGIN_MODES)}")
    dbapi_connection: object = conn.connection.dbapi_connection
    queued = dbapi_connection if mode != "DEFERRED" and isinstance(dbapi_connection, _QueuedWriters) else None
    if queued is not None:
        queued.wait_for_writer_lock()
    if mode == "SINGLE_WRITE":
        return  # released by the COMMIT or ROLLBACK that ends the block, each a no-op outside a transaction
    try:
        conn.exec_driver_sql(f"BEGIN {mode}")
    except BaseException:
        if queued is not None:
            queued.release_writer_lock()
        raise


class _QueuedWriters(sqlite3.Connection):
    """A pysqlite connection whose write transactions take turns on the engine's `_writer` lock (see the module
    doc): taken before `BEGIN IMMEDIATE`, released once COMMIT or ROLLBACK has run, or when the connection closes
    (an invalidated connection). A plain lock, not a reentrant one: the pool may roll back or close a connection
    from another thread than the one that began its transaction."""

    _writer: threading.Lock  # set per engine, in `_make_sqlite_engine`
    _holds_writer = False

    def wait_for_writer_lock(self) -> None:
        """Wait for the lock as long as SQLite's busy timeout would have; past that, go on without it and let
        BEGIN meet SQLite's own lock: a thread that never ends its transaction makes the others fail with the usual
        "database is locked" instead of hanging them."""
        if not self._writer.acquire(blocking=False):
            (timeout_ms,) = self.execute("PRAGMA busy_timeout").fetchone()  # only when there is a queue
            if not self._writer.acquire(timeout=timeout_ms / 1000):
                return
        self._holds_writer = True

    def release_writer_lock(self) -> None:
        if self._holds_writer:
            self._holds_writer = False
            self._writer.release()

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self.release_writer_lock()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self.release_writer_lock()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.release_writer_lock()


def _make_postgres_engine(url: URL, *, pool_size: int, echo: bool) -> Engine:
    # The URL's own query parameters win over our defaults.
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
    if "application_name" not in url.query:
        connect_args["application_name"] = APPLICATION_NAME
    return sa.create_engine(
        url,
        echo=echo,
        hide_parameters=True,  # statement parameters hold job passwords and download URLs
        pool_size=pool_size,
        pool_pre_ping=True,
        connect_args=connect_args,
    )


def read_only(engine: Engine) -> Engine:
    """The same engine (same pool) whose transactions are for reading: `BEGIN DEFERRED` on SQLite, which takes no
    write lock and never waits for a writer. A write inside such a transaction may fail with "database is locked"
    instead of waiting, so write through `engine` itself. On PostgreSQL this is `engine` unchanged in effect."""
    return engine.execution_options(**{SQLITE_BEGIN_OPTION: "DEFERRED"})


def single_write(engine: Engine) -> Engine:
    """The same engine for a block that runs exactly one writing statement: on SQLite it takes its turn at the write
    lock (`_QueuedWriters`) but begins no transaction, so the statement commits by itself. BEGIN and COMMIT were two
    of its three calls into SQLite, and each call lets go of the GIL, which the writer then waits to get back while
    every other writer waits for it. More than one statement in such a block would not be atomic: use `engine`."""
    return engine.execution_options(**{SQLITE_BEGIN_OPTION: "SINGLE_WRITE"})


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions on `engine`; objects stay readable after commit (`expire_on_commit=False`)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def is_postgres(engine: Engine | sa.Connection) -> bool:
    return engine.dialect.name == "postgresql"


def is_sqlite(engine: Engine | sa.Connection) -> bool:
    return engine.dialect.name == "sqlite"


@dataclass(frozen=True)
class Connections:
    """The ways a part of the store reaches one database, built once and shared by the parts."""

    #: Transactions that write (on SQLite: `BEGIN IMMEDIATE`).
    engine: Engine
    #: ORM sessions for what reads or writes whole jobs; the statements every step runs use `engine` directly.
    session: sessionmaker[Session]
    #: Connections and sessions that only read: on SQLite they neither take nor wait for the write lock, which the
    #: daemon's steps take turns on (a read that queued behind them was a good part of a busy daemon's wait for it).
    reader: Engine
    reading: sessionmaker[Session]
    #: For blocks of one writing statement (`single_write`).
    single: Engine
    postgres: bool

    @classmethod
    def of(cls, engine: Engine) -> Connections:
        reader = read_only(engine)
        return cls(engine=engine, session=make_session_factory(engine), reader=reader,
                   reading=make_session_factory(reader), single=single_write(engine), postgres=is_postgres(engine))
