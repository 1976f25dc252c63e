"""Engines, migrations and models on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import sqlalchemy as sa
from alembic import command as alembic_command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.orm import Session, sessionmaker
from support.e2e_support import LogCapture
from support.pg import free_port

from daemon.config import parse_config
from daemon.db import revision, schema
from daemon.db.engine import (
    DatabaseUnavailable,
    _use_wal,
    is_postgres,
    make_engine,
    make_session_factory,
    read_only,
    single_write,
)
from daemon.db.models import SCHEMA_REVISION, Base, Job, JobEvent, JobInput, JobOutput, OwnerStatus, ServiceStatus
from daemon.db.schema import SchemaNewer, SchemaOutdated
from daemon.scheduler import Daemon
from daemon.states import JobState, OutputState

HEAD = schema.head_revision()
T = TypeVar("T")


def test_the_models_name_the_migrations_head() -> None:
    """`revision.ensure_current` trusts `SCHEMA_REVISION` to be the head: a new migration must move it too."""
    assert SCHEMA_REVISION == HEAD


def test_a_database_at_head_is_checked_without_loading_alembic(tmp_path: Path) -> None:
    """The running daemon's start is the usual case: Alembic (6.3 MiB) stays out of its process."""
    url = f"sqlite:///{tmp_path / 'at-head.db'}"
    schema.upgrade_url(url)
    code = (
        "import sys\n"
        "from daemon.db.engine import make_engine\n"
        "from daemon.db.revision import ensure_current\n"
        "import daemon.scheduler, daemon.cli\n"
        f"print(ensure_current(make_engine({url!r})), 'alembic' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == [HEAD, "False"]


@pytest.fixture
def empty_engine(empty_db_url: str):
    engine = make_engine(empty_db_url)
    yield engine
    engine.dispose()


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def _stamp(engine: sa.Engine, revision: str) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = :r"), {"r": revision})


# -- migrations ---------------------------------------------------------------------------------------------------


def test_upgrade_from_empty_then_again_is_a_no_op(empty_engine: sa.Engine) -> None:
    assert schema.current_revision(empty_engine) is None

    assert schema.upgrade(empty_engine) == (None, HEAD)
    assert _tables(empty_engine) == {"alembic_version", *Base.metadata.tables}
    assert schema.current_revision(empty_engine) == HEAD

    assert schema.upgrade(empty_engine) == (HEAD, HEAD)
    assert revision.ensure_current(empty_engine) == HEAD


def _at_once(engines: list[sa.Engine], call: Callable[[sa.Engine], T]) -> list[T]:
    """`call(engine)` in one thread per engine, all started together; their results (in the order they finished).
    Raises what a thread raised, or AssertionError when one is still running a minute later."""
    barrier = threading.Barrier(len(engines))
    results: list[T] = []
    errors: list[BaseException] = []

    def run(engine: sa.Engine) -> None:
        barrier.wait(timeout=10)
        try:
            results.append(call(engine))
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread is still running"
    if errors:
        raise errors[0]
    return results


def test_concurrent_upgrades_apply_the_migrations_once(empty_db_url: str) -> None:
    engines = [make_engine(empty_db_url) for _ in range(3)]
    try:
        results = _at_once(engines, schema.upgrade)
    finally:
        for e in engines:
            e.dispose()
    assert sorted(results, key=str) == sorted([(None, HEAD), (HEAD, HEAD), (HEAD, HEAD)], key=str)


class _SwitchingToWal:
    """A driver connection whose journal-mode switch meets the errors given first (SQLite returns SQLITE_BUSY at once,
    without waiting, when two connections race to switch a new database)."""

    def __init__(self, *errors: int) -> None:
        self.errors = list(errors)
        self.calls = 0

    def execute(self, sql: str):
        assert sql == "PRAGMA journal_mode=WAL"
        self.calls += 1
        if self.errors:
            error = sqlite3.OperationalError("database is locked" if self.errors[0] == sqlite3.SQLITE_BUSY else "no")
            error.sqlite_errorcode = self.errors.pop(0)
            raise error
        return sqlite3.connect(":memory:").execute("SELECT 1")


def test_switching_to_wal_is_tried_again_while_another_connection_switches() -> None:
    connection = _SwitchingToWal(sqlite3.SQLITE_BUSY, sqlite3.SQLITE_BUSY)
    _use_wal(connection)
    assert connection.calls == 3


def test_switching_to_wal_fails_at_once_on_other_errors() -> None:
    connection = _SwitchingToWal(sqlite3.SQLITE_IOERR)
    with pytest.raises(sqlite3.OperationalError):
        _use_wal(connection)
    assert connection.calls == 1


def test_migrations_match_models(engine: sa.Engine) -> None:
    """Alembic's autogenerate finds nothing to do on a migrated database: the migrations create the models."""
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_the_comparison_sees_a_difference(engine: sa.Engine) -> None:
    metadata = sa.MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(metadata)
    sa.Table("services", metadata, sa.Column("extra", sa.Integer), extend_existing=True)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    assert [(d[0], d[2], d[3].name) for d in diff] == [("add_column", "services", "extra")]


def _snapshot(engine: sa.Engine) -> dict[str, dict[str, object]]:
    """What autogenerate does not compare, and more: every table's columns, keys, indexes and CHECK constraints."""
    inspector = sa.inspect(engine)
    snapshot: dict[str, dict[str, object]] = {}
    for table in sorted(set(inspector.get_table_names()) - {"alembic_version"}):
        snapshot[table] = {
            "columns": [
                (c["name"], c["type"].compile(dialect=engine.dialect), c["nullable"], c.get("default"))
                for c in inspector.get_columns(table)
            ],
            "pk": inspector.get_pk_constraint(table),
            "fks": sorted(
                (f["name"], tuple(f["constrained_columns"]), f["referred_table"], f["options"].get("ondelete"))
                for f in inspector.get_foreign_keys(table)
            ),
            "indexes": sorted((i["name"], tuple(i["column_names"]), i["unique"]) for i in inspector.get_indexes(table)),
            "uniques": sorted((u["name"], tuple(u["column_names"])) for u in inspector.get_unique_constraints(table)),
            "checks": sorted((c["name"], c["sqltext"]) for c in inspector.get_check_constraints(table)),
        }
    return snapshot


def test_migrated_schema_is_exactly_create_all(empty_db_url: str, request: pytest.FixtureRequest, tmp_path) -> None:
    """Column order, types, constraint names, ON DELETE CASCADE and CHECK constraints included."""
    if sa.make_url(empty_db_url).get_backend_name() == "sqlite":
        other_url = f"sqlite:///{tmp_path / 'create_all.db'}"
    else:
        other_url = request.getfixturevalue("postgres_cluster").create_database()
    migrated, created = make_engine(empty_db_url), make_engine(other_url)
    try:
        schema.upgrade(migrated)
        Base.metadata.create_all(created)
        expected = _snapshot(created)
        assert _snapshot(migrated) == expected
        fks = expected["job_inputs"]["fks"]
        assert fks == [("fk_job_inputs_job_id_jobs", ("job_id",), "jobs", "CASCADE")]
        assert [name for name, _ in expected["jobs"]["checks"]] == ["ck_jobs_job_state"]
        assert [name for name, _ in expected["job_outputs"]["checks"]] == ["ck_job_outputs_output_state"]
    finally:
        migrated.dispose()
        created.dispose()


# -- schema version checks ----------------------------------------------------------------------------------------


@pytest.mark.postgres
def test_ensure_current_on_an_empty_postgres_database(fresh_postgres_db: str) -> None:
    engine = make_engine(fresh_postgres_db)
    try:
        with pytest.raises(SchemaOutdated) as raised:
            revision.ensure_current(engine)
        assert not isinstance(raised.value, SchemaNewer)
        assert str(raised.value) == (
            f"database schema is at empty, this imputationd needs {HEAD}: run `imputationd db upgrade`"
        )
        assert _tables(engine) == set()
    finally:
        engine.dispose()


def test_ensure_current_migrates_a_new_sqlite_database_and_only_a_new_one(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'new.db'}")
    try:
        assert revision.ensure_current(engine) == HEAD
        assert _tables(engine) == {"alembic_version", *Base.metadata.tables}
    finally:
        engine.dispose()
    engine = make_engine(f"sqlite:///{tmp_path / 'theirs.db'}")
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE notes (text TEXT)")
        with pytest.raises(SchemaOutdated, match=r"^database schema is at empty, .*: run `imputationd db upgrade`$"):
            revision.ensure_current(engine)
        assert _tables(engine) == {"notes"}
    finally:
        engine.dispose()


def test_concurrent_first_use_of_a_new_sqlite_database_migrates_it_once(tmp_path: Path) -> None:
    engines = [make_engine(f"sqlite:///{tmp_path / 'new.db'}") for _ in range(3)]
    try:
        assert _at_once(engines, revision.ensure_current) == [HEAD] * 3
        assert schema.current_revision(engines[0]) == HEAD
    finally:
        for e in engines:
            e.dispose()


def test_ensure_current_on_a_current_database(engine: sa.Engine) -> None:
    assert revision.ensure_current(engine) == HEAD


def test_a_database_upgraded_by_a_newer_imputationd_is_refused_and_left_alone(engine: sa.Engine) -> None:
    _stamp(engine, "9999_from_the_future")

    with pytest.raises(SchemaNewer, match=r"^database schema is at 9999_from_the_future, .*newer imputationd"):
        revision.ensure_current(engine)
    with pytest.raises(SchemaNewer):
        schema.upgrade(engine)
    assert schema.current_revision(engine) == "9999_from_the_future"


NEXT_REVISION = '''
from alembic import op

revision = "{head}_next"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade():
    op.create_index("ix_services_updated_at", "services", ["updated_at"])


def downgrade():
    op.drop_index("ix_services_updated_at", "services")
'''


def test_an_old_database_is_refused_until_upgraded(
    engine: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A newer imputationd (here: our migrations plus one more) meets a database at our head."""
    migrations = tmp_path / "migrations"
    shutil.copytree(schema.MIGRATIONS_DIR, migrations, ignore=shutil.ignore_patterns("__pycache__"))
    (migrations / "versions" / "zz_next.py").write_text(NEXT_REVISION.format(head=HEAD))
    monkeypatch.setattr(schema, "MIGRATIONS_DIR", migrations)
    monkeypatch.setattr(revision, "SCHEMA_REVISION", f"{HEAD}_next")  # what the newer imputationd's models say

    with pytest.raises(SchemaOutdated) as raised:
        revision.ensure_current(engine)
    assert not isinstance(raised.value, SchemaNewer)
    assert str(raised.value) == (
        f"database schema is at {HEAD}, this imputationd needs {HEAD}_next: run `imputationd db upgrade`"
    )

    assert schema.upgrade(engine) == (HEAD, f"{HEAD}_next")
    assert revision.ensure_current(engine) == f"{HEAD}_next"
    assert "ix_services_updated_at" in {i["name"] for i in sa.inspect(engine).get_indexes("services")}


def _migrate(engine: sa.Engine, command: str, revision: str) -> None:

    with engine.connect() as connection, schema.migration_transaction(connection):
        getattr(alembic_command, command)(schema.alembic_config(connection=connection), revision)


def test_0003_keeps_every_row_and_stores_server_values_of_any_length(empty_engine: sa.Engine) -> None:
    """Revision 0003 on a database holding a job and its files: nothing is lost, old files count 0 bad downloads,
    and a 300-character job id, a 320-character hash and a 116-character state fit afterwards (PostgreSQL refused
    them before). A downgrade gives the old columns back, and refuses while a longer value is stored."""
    _migrate(empty_engine, "upgrade", "0002")
    job_id = uuid.uuid4()
    with empty_engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO jobs (id, group_id, service, panel, build, state, remote_id, remote_state, submit_attempts,"
            " restart_attempts, retries, failures, created_at, updated_at) VALUES (:id, :id, 'michigan', 'p',"
            " 'hg19', 'downloading', 'job-1', 'SUCCESS', 1, 0, 0, 0, :now, :now)"
        ), {"id": job_id.hex if empty_engine.dialect.name == "sqlite" else job_id, "now": dt.datetime.now(dt.UTC)})
        job_key = conn.execute(sa.text("SELECT id FROM jobs")).scalar_one()
        conn.execute(sa.text(
            "INSERT INTO job_outputs (job_id, name, url, remote_hash, size_text, state, attempts)"
            " VALUES (:job, 'chr_1.zip', 'http://x/share/results/h/chr_1.zip', 'h', '3 MB', 'pending', 2)"
        ), {"job": job_key})

    _migrate(empty_engine, "upgrade", "0003")
    assert schema.current_revision(empty_engine) == "0003"
    _migrate(empty_engine, "upgrade", "head")  # the models read every column of the head
    factory = make_session_factory(empty_engine)
    with factory.begin() as session:
        job = session.get(Job, job_id)
        assert (job.remote_id, job.remote_state, job.state) == ("job-1", "SUCCESS", JobState.DOWNLOADING)
        [output] = job.outputs
        assert (output.name, output.remote_hash, output.size_text, output.attempts, output.bad_downloads) == (
            "chr_1.zip", "h", "3 MB", 2, 0
        )
        job.remote_id, job.remote_state = "j" * 300, "S" * 116
        output.remote_hash, output.size_text, output.remote_checksum = "h" * 320, "9" * 100, "md5:" + "0" * 300
        session.add(JobOutput(job_id=job_id, name="qc_report.txt", url="u", remote_hash="k" * 320))
    with factory() as session:
        job = session.get(Job, job_id)
        assert (len(job.remote_id), len(job.remote_state)) == (300, 116)
        assert [(len(o.remote_hash or ""), o.bad_downloads) for o in job.outputs] == [(320, 0), (320, 0)]

    with pytest.raises(RuntimeError, match=r"jobs\.remote_state are longer than 64 characters"):
        _migrate(empty_engine, "downgrade", "0002")
    assert schema.current_revision(empty_engine) == HEAD  # the refused downgrade changed nothing: one transaction
    with empty_engine.begin() as conn:
        conn.execute(sa.text("UPDATE jobs SET remote_id = 'job-1', remote_state = 'SUCCESS'"))
        conn.execute(sa.text("UPDATE job_outputs SET remote_hash = 'h', size_text = NULL, remote_checksum = NULL"))
    _migrate(empty_engine, "downgrade", "0002")
    columns = {c["name"]: c for c in sa.inspect(empty_engine).get_columns("job_outputs")}
    assert "bad_downloads" not in columns and columns["remote_hash"]["type"].length == 200
    with empty_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM job_outputs")).scalar() == 2


def _insert_old_job(engine: sa.Engine, state: str) -> uuid.UUID:
    """A job row written with raw SQL, as a database at an older revision holds it (the models are the head's)."""
    job_id = uuid.uuid4()
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO jobs (id, group_id, service, panel, build, state, remote_id, submit_attempts,"
            " restart_attempts, retries, failures, created_at, updated_at) VALUES (:id, :id, 'michigan', 'p',"
            " 'hg19', :state, 'job-1', 1, 0, 0, 0, :now, :now)"
        ), {"id": job_id.hex if engine.dialect.name == "sqlite" else job_id, "state": state,
            "now": dt.datetime.now(dt.UTC)})
    return job_id


def test_0004_gives_jobs_a_cancel_sent_at_and_keeps_them(empty_engine: sa.Engine) -> None:
    """A job stored before 0004 keeps its row and has sent no cancel; a downgrade takes the column away again."""
    _migrate(empty_engine, "upgrade", "0003")
    _insert_old_job(empty_engine, "cancel_requested")
    _migrate(empty_engine, "upgrade", "0004")
    with empty_engine.connect() as conn:
        row = conn.execute(sa.text("SELECT state, remote_id, cancel_sent_at FROM jobs")).one()
    assert tuple(row) == ("cancel_requested", "job-1", None)
    _migrate(empty_engine, "downgrade", "0003")
    assert "cancel_sent_at" not in {c["name"] for c in sa.inspect(empty_engine).get_columns("jobs")}
    with empty_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar() == 1


def test_0005_gives_jobs_their_retirement_and_keeps_them(empty_engine: sa.Engine) -> None:
    """A job stored before 0005 keeps its row, with no retirement known or warned of; a downgrade takes both away."""
    _migrate(empty_engine, "upgrade", "0004")
    _insert_old_job(empty_engine, "downloading")
    _migrate(empty_engine, "upgrade", "0005")
    with empty_engine.connect() as conn:
        row = conn.execute(sa.text("SELECT state, retires_at, retirement_warned_at FROM jobs")).one()
    assert tuple(row) == ("downloading", None, None)
    _migrate(empty_engine, "downgrade", "0004")
    columns = {c["name"] for c in sa.inspect(empty_engine).get_columns("jobs")}
    assert not {"retires_at", "retirement_warned_at"} & columns and "cancel_sent_at" in columns


def test_0006_gives_jobs_a_qc_report_that_holds_json(empty_engine: sa.Engine) -> None:
    _migrate(empty_engine, "upgrade", "0006")
    _insert_old_job(empty_engine, "running")
    report = {"reference_overlap": 99.5, "warnings": ["12 duplicated sites"]}
    jobs = sa.table("jobs", sa.column("qc", sa.JSON))
    with empty_engine.begin() as conn:
        conn.execute(sa.update(jobs).values(qc=report))
    with empty_engine.connect() as conn:
        assert conn.execute(sa.select(jobs.c.qc)).scalar() == report
    _migrate(empty_engine, "downgrade", "0005")
    assert "qc" not in {c["name"] for c in sa.inspect(empty_engine).get_columns("jobs")}


def test_0007_gives_result_files_their_published_size_in_bytes(empty_engine: sa.Engine) -> None:
    """A result file recorded before 0007 keeps its row and has no published size; a size past 4 GiB fits (a
    multi-GB zip's); a downgrade takes the column away and keeps the rows."""
    _migrate(empty_engine, "upgrade", "0006")
    _insert_old_job(empty_engine, "downloading")
    with empty_engine.begin() as conn:
        job_key = conn.execute(sa.text("SELECT id FROM jobs")).scalar_one()
        conn.execute(sa.text(
            "INSERT INTO job_outputs (job_id, name, url, remote_checksum, state, attempts, bad_downloads)"
            " VALUES (:job, 'chr_1.vcf.gz', 'http://x/chr_1.vcf.gz', :sum, 'pending', 0, 0)"
        ), {"job": job_key, "sum": "sha1:" + "a" * 40})
    _migrate(empty_engine, "upgrade", "0007")
    # Plain SQL: the models are the newest revision's, and this database stops at 0007.
    with empty_engine.begin() as conn:
        assert conn.execute(sa.text("SELECT name, remote_checksum, remote_size FROM job_outputs")).one() == (
            "chr_1.vcf.gz", "sha1:" + "a" * 40, None)
        conn.execute(sa.text("UPDATE job_outputs SET remote_size = :size"), {"size": 5 << 30})
    with empty_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT remote_size FROM job_outputs")).scalar_one() == 5 << 30
    _migrate(empty_engine, "downgrade", "0006")
    assert "remote_size" not in {c["name"] for c in sa.inspect(empty_engine).get_columns("job_outputs")}
    with empty_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM job_outputs")).scalar() == 1


def test_0008_gives_old_jobs_and_their_services_status_to_the_operator(empty_engine: sa.Engine) -> None:
    """Jobs stored before owners existed are the operator's, and so is what was known against their service's token
    (a block, a lowered limit); the service keeps its pause. A downgrade gives the operator's status back."""
    _migrate(empty_engine, "upgrade", "0007")
    _insert_old_job(empty_engine, "blocked")
    now = dt.datetime.now(dt.UTC)
    with empty_engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO services (name, blocked_reason, blocked_at, paused_until, effective_limit, updated_at) "
            "VALUES ('michigan', 'HTTP 401', :now, :now, 2, :now)"), {"now": now})
    _migrate(empty_engine, "upgrade", "0008")
    with empty_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT owner, state FROM jobs")).one() == ("operator", "blocked")
        assert conn.execute(sa.text(
            "SELECT service, owner, blocked_reason, effective_limit FROM service_owners")).one() == (
            "michigan", "operator", "HTTP 401", 2)
        assert conn.execute(sa.text("SELECT paused_until IS NOT NULL FROM services")).scalar()
    _migrate(empty_engine, "downgrade", "0007")
    with empty_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT blocked_reason, effective_limit FROM services")).one() == ("HTTP 401", 2)
    assert "owner" not in {c["name"] for c in sa.inspect(empty_engine).get_columns("jobs")}


# -- models -------------------------------------------------------------------------------------------------------


def _job(**overrides: object) -> Job:
    job_id = uuid.uuid4()
    fields: dict[str, object] = dict(
        id=job_id, group_id=job_id, service="michigan", panel="1000g-phase3", build="hg19", password="s3cret"
    )
    fields.update(overrides)
    return Job(**fields)


def test_a_job_with_everything_round_trips(session_factory: sessionmaker[Session]) -> None:
    poll_at = dt.datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    with session_factory.begin() as session:
        job = _job(state=JobState.QUEUED, next_poll_at=poll_at, remote_id="job-20300102")
        job.inputs = [JobInput(path="/data/chr20.vcf.gz", size=5 * 2**30, sha256="a" * 64)]
        job.events = [
            JobEvent(from_state=None, to_state="pending", reason="submitted"),
            JobEvent(from_state="pending", to_state="queued"),
        ]
        job.outputs = [JobOutput(name="chr_20.zip", url="https://example.org/d/abc?x=1", size_text="1 GB")]
        session.add(job)
        session.add(ServiceStatus(name="michigan", paused_until=poll_at))
        session.add(OwnerStatus(service="michigan", owner="alice", effective_limit=2))
        job_id = job.id

    with session_factory() as session:
        job = session.get_one(Job, job_id)
        assert job.state is JobState.QUEUED
        assert job.next_poll_at == poll_at
        for value in (job.next_poll_at, job.created_at, job.updated_at, job.events[0].at):
            assert value.tzinfo is not None and value.utcoffset() == dt.timedelta(0)
        assert (job.submit_attempts, job.retries, job.failures) == (0, 0, 0)
        assert [(i.path, i.size) for i in job.inputs] == [("/data/chr20.vcf.gz", 5 * 2**30)]
        assert [(e.from_state, e.to_state) for e in job.events] == [(None, "pending"), ("pending", "queued")]
        assert [(o.name, o.state) for o in job.outputs] == [("chr_20.zip", OutputState.PENDING)]
        service = session.get_one(ServiceStatus, "michigan")
        assert service.paused_until == poll_at and service.paused_until.tzinfo is not None

        # Timestamps compare correctly in SQL too (SQLite stores them as naive UTC text).
        due = session.scalars(sa.select(Job.id).where(Job.next_poll_at <= poll_at + dt.timedelta(microseconds=1)))
        assert list(due) == [job_id]


def test_deleting_a_job_cascades_in_the_database(session_factory: sessionmaker[Session]) -> None:
    with session_factory.begin() as session:
        job = _job()
        job.inputs = [JobInput(path="/a.vcf.gz", size=1, sha256="b" * 64)]
        job.events = [JobEvent(to_state="pending")]
        job.outputs = [JobOutput(name="x.zip", url="https://example.org/x")]
        session.add(job)
    with session_factory.begin() as session:
        session.execute(sa.delete(Job))  # Core DELETE: only the foreign keys' ON DELETE CASCADE removes children
    with session_factory() as session:
        for model in (JobInput, JobEvent, JobOutput):
            assert session.scalar(sa.select(sa.func.count()).select_from(model)) == 0


def test_a_state_outside_the_enum_is_rejected_by_the_database(session_factory: sessionmaker[Session]) -> None:
    with session_factory.begin() as session:
        job = _job()
        job.outputs = [JobOutput(name="x.zip", url="https://example.org/x")]
        session.add(job)
    for table in ("jobs", "job_outputs"):
        with session_factory() as session, pytest.raises(sa.exc.IntegrityError, match="(?i)check"):
            session.execute(sa.text(f"UPDATE {table} SET state = 'bogus'"))
            session.commit()


def test_a_naive_datetime_is_refused(session_factory: sessionmaker[Session]) -> None:
    with session_factory() as session, pytest.raises(sa.exc.StatementError, match="naive datetime"):
        session.add(_job(next_poll_at=dt.datetime(2030, 1, 1)))
        session.flush()


# -- engines ------------------------------------------------------------------------------------------------------


def test_sqlite_connections_get_their_pragmas(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            pragma = lambda name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()  # noqa: E731
            assert pragma("journal_mode") == "wal"
            assert pragma("foreign_keys") == 1
            assert pragma("busy_timeout") == 30000
            assert pragma("synchronous") == 1  # NORMAL
        assert not is_postgres(engine)
        assert isinstance(engine.pool, sa.pool.QueuePool)
    finally:
        engine.dispose()


def test_upgrade_leaves_foreign_keys_on_for_pooled_connections(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'imputationd.db'}")
    try:
        schema.upgrade(engine)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()


def _set_busy_timeout(conn: sa.Connection, ms: int) -> None:
    # On the driver connection: anything through SQLAlchemy would BEGIN (and wait for the lock) first.
    conn.connection.driver_connection.execute(f"PRAGMA busy_timeout={ms}").close()


def test_sqlite_write_transactions_begin_immediate(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as writer, engine.connect() as impatient, read_only(engine).connect() as reader:
            writer.begin()  # takes the write lock now, before any statement
            _set_busy_timeout(impatient, 50)
            with pytest.raises(sa.exc.OperationalError, match="database is locked"):
                impatient.begin()
            # A reader is not held up by the writer.
            with reader.begin():
                assert reader.exec_driver_sql("SELECT count(*) FROM jobs").scalar() == 0

            # A second writer with the normal busy timeout waits for the first one to commit.
            began, done = threading.Event(), threading.Event()

            def second_writer() -> None:
                with engine.connect() as conn:
                    began.set()
                    with conn.begin():
                        done.set()

            thread = threading.Thread(target=second_writer)
            thread.start()
            assert began.wait(10)
            assert not done.wait(0.3)
            writer.commit()
            assert done.wait(10)
            thread.join(10)
    finally:
        engine.dispose()


def test_sqlite_single_write_takes_its_turn_and_commits_by_itself(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    one = single_write(engine)
    insert = sa.insert(ServiceStatus.__table__)
    try:
        with engine.connect() as writer, read_only(engine).connect() as reader:
            writer.begin()  # another thread's transaction holds the engine's write turn
            done = threading.Event()

            def single() -> None:
                with one.begin() as conn:
                    conn.execute(insert, {"name": "waited", "updated_at": dt.datetime.now(dt.UTC)})
                done.set()

            thread = threading.Thread(target=single)
            thread.start()
            assert not done.wait(0.3)  # queued behind the transaction, not failing with "database is locked"
            writer.commit()
            assert done.wait(10)
            thread.join(10)

            with one.connect() as conn:
                conn.begin()
                conn.execute(insert, {"name": "alone", "updated_at": dt.datetime.now(dt.UTC)})
                # No transaction around it: the row is committed before the block ends...
                names = reader.exec_driver_sql("SELECT name FROM services ORDER BY name").scalars().all()
                assert names == ["alone", "waited"]
                reader.rollback()
                conn.rollback()  # ...so there is nothing to roll back
            with pytest.raises(sa.exc.IntegrityError), one.begin() as conn:
                conn.execute(insert, {"name": "alone", "updated_at": dt.datetime.now(dt.UTC)})
            with engine.begin() as conn:  # a failed single write gave its turn back
                assert conn.exec_driver_sql("SELECT count(*) FROM services").scalar() == 2
    finally:
        engine.dispose()


def test_sqlite_in_memory_works_across_threads() -> None:
    engine = make_engine("sqlite://")
    try:
        schema.upgrade(engine)
        revision.ensure_current(engine)
        factory = make_session_factory(engine)
        with factory.begin() as session:
            session.add(_job())
        errors: list[BaseException] = []

        def insert() -> None:
            try:
                with factory.begin() as session:
                    session.add(_job())
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=insert)
        thread.start()
        thread.join(10)
        assert not errors
        with factory() as session:
            assert session.scalar(sa.select(sa.func.count()).select_from(Job)) == 2
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_postgres_engine_settings(fresh_postgres_db: str) -> None:
    engine = make_engine(fresh_postgres_db, pool_size=3)
    try:
        assert is_postgres(engine)
        assert engine.pool.size() == 3 and engine.pool._pre_ping
        with read_only(engine).connect() as conn:
            assert conn.exec_driver_sql("SHOW application_name").scalar() == "imputationd"
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_postgres_engine_survives_a_server_restart(postgres_cluster, fresh_postgres_db: str) -> None:
    engine = make_engine(fresh_postgres_db)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        postgres_cluster.restart()
        with engine.connect() as conn:  # the pooled connection is dead; pre-ping replaces it
            assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        engine.dispose()


# -- unavailable databases ----------------------------------------------------------------------------------------


def test_unreachable_postgres_names_the_host_and_hides_the_password() -> None:
    port = free_port()
    engine = make_engine(f"postgresql+psycopg://daemon:Hunter2secret@127.0.0.1:{port}/imputationd")
    try:
        for check in (revision.ensure_current, schema.upgrade, schema.current_revision):
            with pytest.raises(DatabaseUnavailable) as raised:
                check(engine)
            message = str(raised.value)
            assert "Hunter2secret" not in message
            assert f"postgresql+psycopg://daemon:***@127.0.0.1:{port}/imputationd" in message
            assert "\n" not in message
    finally:
        engine.dispose()


def test_echo_logs_each_statement_once_through_our_log_without_its_parameters(sqlite_url: str, capsys) -> None:
    log = LogCapture(level="warning")  # echo is asked for explicitly: it shows whatever logging.level says
    engine = make_engine(sqlite_url, echo=True)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT :hash AS remote_hash"), {"hash": "download-hash-5b1e7d"})
    finally:
        engine.dispose()
        log.close()
    statements = [line for line in log.lines() if line["logger"] == "sqlalchemy.engine.Engine"]
    assert [line["event"] for line in statements if "SELECT" in line["event"]] == ["SELECT ? AS remote_hash"]
    assert all(line["level"] == "info" for line in statements)
    assert "download-hash-5b1e7d" not in log.stream.getvalue()
    assert capsys.readouterr().out == ""  # SQLAlchemy's own handler would print every statement again on stdout


@pytest.mark.parametrize("echo", [True, False])
def test_the_daemon_engine_follows_database_echo(tmp_path: Path, sqlite_url: str, echo: bool) -> None:
    config = parse_config({
        "database": {"url": sqlite_url, "echo": echo},
        "storage": {"state_dir": str(tmp_path / "state")},
        "services": {"m": {"type": "cloudgene", "base_url": "https://x.org", "token_env": "M_TOKEN"}},
    }, base_dir=tmp_path)
    log = LogCapture()  # Daemon() sets logger levels process-wide: put them back afterwards
    daemon = Daemon(config)
    try:
        assert daemon.engine.echo is echo
    finally:
        daemon.pool.shutdown()
        daemon.adapters.close()
        daemon.engine.dispose()
        log.close()


@pytest.mark.parametrize("umask", [0o022, 0o000, 0o277], ids=["umask-022", "umask-000", "umask-277"])
def test_a_new_sqlite_database_and_its_wal_and_shm_are_private_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "state" / "imputationd.db"
    old = os.umask(umask)
    try:
        engine = make_engine(f"sqlite:///{path}")
        try:
            schema.upgrade(engine)
            with engine.connect() as conn:  # the -wal and -shm files exist while a connection is open
                conn.exec_driver_sql("SELECT 1").close()
                modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.parent.iterdir()}
        finally:
            engine.dispose()
    finally:
        os.umask(old)
    assert modes == {"imputationd.db": 0o600, "imputationd.db-wal": 0o600, "imputationd.db-shm": 0o600}


def test_an_existing_sqlite_database_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "imputationd.db"
    path.touch(mode=0o640)
    path.chmod(0o640)  # an operator's choice (a backup user's group): not ours to change
    engine = make_engine(f"sqlite:///{path}")
    try:
        schema.upgrade(engine)
    finally:
        engine.dispose()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_unopenable_sqlite_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("")
    with pytest.raises(DatabaseUnavailable, match=r"not-a-dir/sub/imputationd\.db"):
        make_engine(f"sqlite:///{tmp_path}/not-a-dir/sub/imputationd.db")

    (tmp_path / "a-dir.db").mkdir()
    engine = make_engine(f"sqlite:///{tmp_path}/a-dir.db")
    try:
        with pytest.raises(DatabaseUnavailable, match=r"a-dir\.db: .*unable to open database file"):
            revision.ensure_current(engine)
    finally:
        engine.dispose()


def test_0009_adds_api_tokens_and_idempotency_keys_and_takes_them_away(empty_engine: sa.Engine) -> None:
    _migrate(empty_engine, "upgrade", "0008")
    _insert_old_job(empty_engine, "pending")
    _migrate(empty_engine, "upgrade", "0009")
    assert {"api_tokens", "idempotency_keys"} <= set(sa.inspect(empty_engine).get_table_names())
    _migrate(empty_engine, "downgrade", "0008")
    assert not {"api_tokens", "idempotency_keys"} & set(sa.inspect(empty_engine).get_table_names())
    with empty_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar() == 1
