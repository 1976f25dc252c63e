"""Result files keep the size in bytes that the server published for them.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05

A WES `File` output publishes its `size` (and a `checksum`, kept since 0001 in `remote_checksum`): both are checked
after the download, and a file that differs is not verified. Files recorded before this revision have none.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job_outputs") as batch:
        batch.add_column(sa.Column("remote_size", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_outputs") as batch:
        batch.drop_column("remote_size")
