"""Jobs have an owner; a bad token, a lowered job limit and a token's expiry are each owner's on a service.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05

Many platform users share one daemon, each with their own account on each server (`<credentials>/<owner>/<service>
.token`). A token the server rejects blocks that owner's jobs on that service, not everyone's; the server's "Only N
jobs per user" is per account; a token expires per account. So those columns move from `services` (what stays
there is the whole server's: a pause for maintenance or a rate limit) to `service_owners`, keyed by (service,
owner). Jobs stored before this revision belong to `operator`, the owner of the service's own token, and so does
the status their service had.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MOVED = ["blocked_reason", "blocked_at", "effective_limit", "token_expires_at", "token_checked_at"]


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("owner", sa.String(200), nullable=False, server_default="operator"))
        batch.create_index("ix_jobs_owner_created_at", ["owner", "created_at"])
    op.create_table(
        "service_owners",
        sa.Column("service", sa.String(64), nullable=False),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("blocked_reason", sa.Text(), nullable=True),
        sa.Column("blocked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("effective_limit", sa.Integer(), nullable=True),
        sa.Column("token_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("token_checked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("service", "owner", name="pk_service_owners"),
    )
    columns = ", ".join(MOVED)
    op.execute(
        f"INSERT INTO service_owners (service, owner, {columns}, updated_at) "
        f"SELECT name, 'operator', {columns}, updated_at FROM services "
        "WHERE blocked_reason IS NOT NULL OR effective_limit IS NOT NULL OR token_checked_at IS NOT NULL"
    )
    with op.batch_alter_table("services") as batch:
        for column in MOVED:
            batch.drop_column(column)


def downgrade() -> None:
    with op.batch_alter_table("services") as batch:
        batch.add_column(sa.Column("blocked_reason", sa.Text(), nullable=True))
        batch.add_column(sa.Column("blocked_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("effective_limit", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("token_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("token_checked_at", sa.DateTime(timezone=True), nullable=True))
    # The operator's status is the service's again; other owners' is dropped with their table.
    for column in MOVED:
        op.execute(
            f"UPDATE services SET {column} = (SELECT {column} FROM service_owners "
            f"WHERE service_owners.service = services.name AND service_owners.owner = 'operator')"
        )
    op.drop_table("service_owners")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_owner_created_at")
        batch.drop_column("owner")
