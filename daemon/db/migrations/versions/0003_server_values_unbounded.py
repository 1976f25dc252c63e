"""Columns holding what a server sends are unbounded text; each result file counts its bad downloads.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04

A remote value longer than its column (a 300-character Cloudgene job id, a 320-character download hash, a
116-character WES state) made PostgreSQL refuse the whole step's write, again on every poll. These values are
stored as the server sent them, so their columns are TEXT now: `jobs.remote_state`, `jobs.remote_id`,
`job_outputs.remote_hash`, `job_outputs.size_text`, `job_outputs.remote_checksum`.

`job_outputs.bad_downloads` counts the downloads of a file that the server served (each spent one of its download
counts) and that came out unusable: cut off, short, long, or a corrupt zip. Files recorded before this revision
start at 0.

SQLite rebuilds both tables (batch mode: reflected, constraints and indexes included, and copied), twice for
job_outputs: the new column's default fills the rows present, then goes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: (table, column, its length before this revision)
WIDENED = (
    ("jobs", "remote_state", 64),
    ("jobs", "remote_id", 200),
    ("job_outputs", "remote_hash", 200),
    ("job_outputs", "size_text", 64),
    ("job_outputs", "remote_checksum", 200),
)


def upgrade() -> None:
    for table in ("jobs", "job_outputs"):
        with op.batch_alter_table(table) as batch:
            for widened_table, column, length in WIDENED:
                if widened_table == table:
                    batch.alter_column(column, type_=sa.Text(), existing_type=sa.String(length),
                                       existing_nullable=True)
            if table == "job_outputs":
                batch.add_column(sa.Column("bad_downloads", sa.Integer(), nullable=False, server_default="0"))
    # The default fills the existing rows; the models give every new row its value, as for the other counters.
    with op.batch_alter_table("job_outputs") as batch:
        batch.alter_column("bad_downloads", server_default=None, existing_type=sa.Integer(), existing_nullable=False)


def downgrade() -> None:
    bind = op.get_bind()
    for table, column, length in WIDENED:
        longer = bind.execute(
            sa.text(f"SELECT count(*) FROM {table} WHERE length({column}) > :length"), {"length": length}
        ).scalar()
        if longer:
            raise RuntimeError(
                f"cannot downgrade below 0003: {longer} rows of {table}.{column} are longer than {length} characters"
            )
    for table in ("jobs", "job_outputs"):
        with op.batch_alter_table(table) as batch:
            if table == "job_outputs":
                batch.drop_column("bad_downloads")
            for widened_table, column, length in WIDENED:
                if widened_table == table:
                    batch.alter_column(column, type_=sa.String(length), existing_type=sa.Text(),
                                       existing_nullable=True)
