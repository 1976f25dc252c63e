"""The one claim pattern the queue (job leases) and the outbox (notification attempts) share.

A claim is one statement: `UPDATE … SET <the claim> WHERE id IN (<due candidates> FOR UPDATE SKIP LOCKED)
RETURNING id`. On PostgreSQL the candidates another claimer has locked are skipped, so several daemons share one
database without waiting on each other; on SQLite every write transaction is `BEGIN IMMEDIATE` (see `engine.py`),
which serialises claimers, and the same statement runs.
"""

from __future__ import annotations

from typing import Any, cast

import sqlalchemy as sa


def claim(table: sa.Table, candidates: sa.Select[Any], **values: Any) -> sa.Update:
    """The claim of `table`'s rows whose ids `candidates` selects (ordered and limited as the caller wants):
    `values` set on each, their ids returned."""
    locked = candidates.with_for_update(skip_locked=True).scalar_subquery()
    return sa.update(table).where(table.c.id.in_(locked)).values(**values).returning(table.c.id)


def rowcount(result: sa.Result[Any]) -> int:
    """The rows an UPDATE or DELETE matched (its result is a CursorResult; `Session.execute` is typed for any)."""
    return cast(sa.CursorResult[Any], result).rowcount
