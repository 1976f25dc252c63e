"""The HTTP API's bearer tokens: made by `imputationd tokens create`, checked on every request.

A token is `imd_<id>_<secret>`: the id (public, listed and revoked by) finds its row, and the SHA-256 of the whole
token is compared with the stored one in constant time. A secret of 32 random bytes needs no slow hash: nothing
about it can be guessed from its digest. Neither the token nor its digest is ever logged or answered.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import threading
from dataclasses import dataclass

from daemon.db import queries
from daemon.db.engine import Connections
from daemon.db.models import ApiToken, utcnow

SCOPES = ("read", "submit", "admin")
_PREFIX = "imd"
#: A token's last use is written at most this often: a busy client must not make every request a write.
_LAST_USED_EVERY = dt.timedelta(minutes=1)


@dataclass(frozen=True)
class Caller:
    """Who a valid token speaks for."""

    token_id: str
    owner: str
    scope: str

    @property
    def admin(self) -> bool:
        return self.scope == "admin"

    @property
    def may_submit(self) -> bool:
        return self.scope in ("submit", "admin")


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class ApiTokens:
    def __init__(self, connections: Connections) -> None:
        self._db = connections
        self._used_lock = threading.Lock()
        self._last_written: dict[str, dt.datetime] = {}

    def create(self, owner: str, scope: str) -> tuple[ApiToken, str]:
        """A new token for `owner` with `scope`: its row, and the token itself (shown once, never stored)."""
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        token_id = secrets.token_hex(6)
        token = f"{_PREFIX}_{token_id}_{secrets.token_urlsafe(32)}"
        row = ApiToken(id=token_id, owner=owner, scope=scope, token_sha256=digest(token), created_at=utcnow())
        with self._db.session() as session, session.begin():
            session.add(row)
        return row, token

    def list(self) -> list[ApiToken]:
        with self._db.reading() as session:
            return list(session.scalars(queries.ALL_API_TOKENS).all())

    def revoke(self, token_id: str) -> bool:
        """True when the token was live and is revoked now."""
        with self._db.engine.begin() as conn:
            return queries.rowcount(conn.execute(queries.REVOKE_TOKEN, {"b_id": token_id, "b_at": utcnow()})) == 1

    def authenticate(self, token: str) -> Caller | None:
        """Who `token` speaks for; None for a malformed, unknown or revoked token."""
        prefix, _, rest = token.partition("_")
        token_id, _, secret = rest.partition("_")
        if prefix != _PREFIX or not token_id or not secret or len(token) > 200:
            return None
        with self._db.reader.connect() as conn:
            row = conn.execute(queries.TOKEN_BY_ID, {"b_id": token_id}).one_or_none()
        if row is None or not hmac.compare_digest(digest(token), row.token_sha256) or row.revoked_at is not None:
            return None
        self._note_use(token_id)
        return Caller(token_id=row.id, owner=row.owner, scope=row.scope)

    def _note_use(self, token_id: str) -> None:
        now = utcnow()
        with self._used_lock:
            last = self._last_written.get(token_id)
            if last is not None and now - last < _LAST_USED_EVERY:
                return
            self._last_written[token_id] = now
        with self._db.single.begin() as conn:
            conn.execute(queries.TOKEN_USED, {"b_id": token_id, "b_at": now})
