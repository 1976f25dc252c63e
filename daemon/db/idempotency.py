"""The answers kept for `Idempotency-Key`: the first request with a key (per owner) claims it by inserting its row;
a retry finds the row and gets the first answer, status and body, once it is there. Concurrent retries wait for it,
so they make one job between them."""

from __future__ import annotations

import datetime as dt
import time
from typing import NamedTuple

import sqlalchemy as sa

from daemon.db import queries
from daemon.db.engine import Connections
from daemon.db.models import utcnow

#: A claim older than this with no answer was made by a process that died mid-request: it may be taken over.
STALE_CLAIM = dt.timedelta(hours=1)
#: Answers are kept this long.
KEPT = dt.timedelta(hours=24)


class Answer(NamedTuple):
    status: int
    body: str


class KeyInUse(Exception):
    """The first request with this key is still being answered."""


class IdempotencyKeys:
    def __init__(self, connections: Connections) -> None:
        self._db = connections

    def claim(self, owner: str, key: str, *, wait: float = 30.0) -> Answer | None:
        """None: the key is ours now, answer the request and `record` the answer. An Answer: the one a request
        with this key already got. Raises KeyInUse when the first request is still going after `wait` seconds."""
        deadline = time.monotonic() + wait
        while True:
            now = utcnow()
            try:
                with self._db.engine.begin() as conn:
                    conn.execute(queries.EXPIRED_IDEMPOTENCY_KEYS, {"b_before": now - KEPT})
                    conn.execute(queries.INSERT_IDEMPOTENCY_KEY, {"owner": owner, "key": key, "created_at": now})
                return None
            except sa.exc.IntegrityError:
                pass
            with self._db.reader.connect() as conn:
                row = conn.execute(queries.IDEMPOTENCY_KEY, {"b_owner": owner, "b_key": key}).one_or_none()
            if row is None:
                continue  # forgotten meanwhile (the first request failed): claim it again
            if row.status is not None:
                return Answer(row.status, row.body or "")
            if now - row.created_at > STALE_CLAIM:
                self.forget(owner, key)
                continue
            if time.monotonic() >= deadline:
                raise KeyInUse(key)
            time.sleep(0.2)

    def record(self, owner: str, key: str, answer: Answer) -> None:
        with self._db.engine.begin() as conn:
            conn.execute(queries.ANSWER_IDEMPOTENCY_KEY,
                         {"b_owner": owner, "b_key": key, "status": answer.status, "body": answer.body})

    def forget(self, owner: str, key: str) -> None:
        """The request failed without an answer worth repeating (a crash, the database): a retry starts afresh."""
        with self._db.engine.begin() as conn:
            conn.execute(queries.FORGET_IDEMPOTENCY_KEY, {"b_owner": owner, "b_key": key})
