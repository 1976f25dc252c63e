"""How a database schema can be wrong for this code: the errors both `revision` (the quick check) and `schema`
(Alembic's side) raise."""

from __future__ import annotations

UPGRADE_HINT = "run `imputationd db upgrade`"


class SchemaOutdated(Exception):
    """The database schema is not the one this imputationd was written for. `reason` says how; the message is
    the reason and `hint` (what to do)."""

    def __init__(self, reason: str, hint: str | None = UPGRADE_HINT) -> None:
        self.reason = reason
        self.hint = hint
        super().__init__(f"{reason}: {hint}" if hint else reason)


class SchemaNewer(SchemaOutdated):
    """The database schema is at a revision this imputationd does not know: a newer imputationd upgraded it."""
