"""Jobs record when the cancel of their remote job was sent.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05

A server may acknowledge a cancel and go on running (WES servers do): a job is cancelled only once the server says
so, and until then it stays `cancel_requested`, polled. `jobs.cancel_sent_at` says that the cancel went out, and
since when the server has not confirmed it. Jobs stored before this revision have none: one still waiting for its
cancel sends it again, which a server answers the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("cancel_sent_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("cancel_sent_at")
