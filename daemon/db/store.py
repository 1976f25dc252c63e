"""The store: one database seen in parts, each given to its caller alone, so that no caller sees (or can call)
another's queries.

| Part | Caller | Module |
|---|---|---|
| `queue` | the scheduler and the pipeline: promote, claim, a step's outcome, files, blocked services | `queue.py` |
| `admin` | the CLI: submitted jobs, `jobs`/`show`, cancel, retry | `admin.py` |
| `services` | the scheduler, the pipeline and the probes: pauses, lowered limits, token checks | `service_status.py` |
| `outbox` | the notifier | `outbox.py` |
| `expired` | the retention | `expired.py` |
| `api_tokens`, `idempotency` | the HTTP API and `imputationd tokens` | `api_tokens.py`, `idempotency.py` |

Every statement they run is in `queries.py`; a state change and its event row, which the queue and the operator's
actions both make, in `transitions.py`.
"""

from __future__ import annotations

import sqlalchemy as sa

from daemon.db.admin import JobAdmin, PasswordSealer
from daemon.db.api_tokens import ApiTokens
from daemon.db.engine import Connections
from daemon.db.expired import ExpiredJobs
from daemon.db.idempotency import IdempotencyKeys
from daemon.db.outbox import NotificationOutbox
from daemon.db.queue import JobQueue
from daemon.db.service_status import ServiceStatuses


class JobStore:
    def __init__(self, engine: sa.Engine, *, sealer: PasswordSealer | None = None) -> None:
        connections = Connections.of(engine)
        self._db = connections
        self.queue = JobQueue(connections)
        self.admin = JobAdmin(connections, sealer=sealer)
        self.services = ServiceStatuses(connections)
        self.outbox = NotificationOutbox(connections)
        self.expired = ExpiredJobs(connections)
        self.api_tokens = ApiTokens(connections)
        self.idempotency = IdempotencyKeys(connections)

    def ping(self) -> None:
        """A trivial query: raises when the database does not answer."""
        with self._db.reader.connect() as conn:
            conn.execute(sa.select(1)).one()
