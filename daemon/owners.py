"""Owners: the platform users jobs are for. An owner's name is also a folder under the credentials directory (their
tokens, `daemon.credentials`), so it is checked before anything is stored under it."""

from __future__ import annotations

import re

#: Whose a job is when nobody said: the operator, who owns each service's own token.
DEFAULT_OWNER = "operator"

#: Letters, digits and `.`, `_`, `@`, `-` (a user name or an e-mail address), starting with a letter or digit: never
#: a path separator, never `.` or `..`, never a control character.
_OWNER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")


def owner_problem(name: str) -> str | None:
    """Why `name` cannot be an owner, or None when it can."""
    if not _OWNER.fullmatch(name):
        return (f"owner {name[:40]!r} is not a valid name: use 1 to 128 letters, digits, '.', '_', '@' and '-', "
                "starting with a letter or digit")
    return None
