"""Jobs record when the server deletes their results, and when the daemon warned that it might be too late.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05

Cloudgene schedules the deletion of a finished job's results (`deletedOn`; about a week, a reminder 48 h before):
`jobs.retires_at` keeps it, so that downloads go soonest-retiring first, and `jobs.retirement_warned_at` says that
the warning about results retiring before they are downloaded was given (it is given once). Jobs stored before this
revision have neither: the next poll reads `deletedOn` again.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("retires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("retirement_warned_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("retirement_warned_at")
        batch.drop_column("retires_at")
