"""Jobs keep what the server's quality control reported of their input.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05

`jobs.qc` holds the figures and warnings of the server's QC (reference overlap, allele switches, strand flips,
excluded SNPs and chunks, the failing step) as JSON, for `show`, `show --json` and the notifications. Jobs stored
before this revision have none until their next poll.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("qc", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("qc")
