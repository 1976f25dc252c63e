"""Notification outbox on job_events: when each event's notification is due, how it went.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

Every column is nullable and no existing row gets a value: events written before this revision are never notified
(upgrading does not send a notification for every job that ever finished).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("notify_next_at", "notify_attempts", "notified_at", "notified_via", "notify_error")


def upgrade() -> None:
    op.add_column("job_events", sa.Column("notify_next_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("job_events", sa.Column("notify_attempts", sa.Integer(), nullable=True))
    op.add_column("job_events", sa.Column("notified_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("job_events", sa.Column("notified_via", sa.String(64), nullable=True))
    op.add_column("job_events", sa.Column("notify_error", sa.Text(), nullable=True))
    op.create_index(op.f("ix_job_events_notify_next_at"), "job_events", ["notify_next_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_job_events_notify_next_at"), table_name="job_events")
    with op.batch_alter_table("job_events") as batch:
        for column in reversed(COLUMNS):
            batch.drop_column(column)
