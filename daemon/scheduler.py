"""The daemon: APScheduler ticks that select due work and hand each job to a thread pool.

Ticks (APScheduler `BackgroundScheduler`, in-memory job store, one instance of each at a time):

- dispatch: promote pending jobs into free per-service slots, then claim `submitting` jobs;
- poll: claim `queued`/`running`/`cancel_requested` jobs whose `next_poll_at` is due;
- download: claim `downloading` jobs;
- heartbeat: renew the leases of the jobs this daemon is working on;
- maintenance: expired leases, paused services, token expiry, the periodic summary line;
- probe: services blocked by their token, probed sooner at first, then backing off.

Each claimed job becomes one task on the worker pool; no job holds a thread while it waits remotely — between two
steps it is only a row with a `next_poll_at`. APScheduler keeps no job state: everything lives in the database.
"""

from __future__ import annotations

import collections
import concurrent.futures
import datetime as dt
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor as TickExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from daemon import retention, systemd
from daemon.config import Config, ConfigError, SchedulerConfig, load_config
from daemon.crypto import PasswordCipher
from daemon.db.engine import make_engine, unavailable
from daemon.db.models import Job, utcnow
from daemon.db.revision import ensure_current
from daemon.db.store import JobStore
from daemon.logging import configure_logging
from daemon.metrics import NO_METRICS, Metrics, health_report
from daemon.notify import Notifier
from daemon.owners import DEFAULT_OWNER
from daemon.pipeline import Pipeline
from daemon.probes import ServiceProbes
from daemon.services import AdapterFactory, Adapters, build_adapter
from daemon.states import POLLED, TERMINAL, JobState

if TYPE_CHECKING:
    from daemon.prometheus import MetricsServer, PrometheusMetrics

log = structlog.get_logger("daemon.scheduler")

#: Claimed jobs that may wait in the pool's queue per worker (leased; the heartbeat renews their leases too), so a
#: worker that finishes a step starts the next at once, and claims come in batches rather than one per free worker.
QUEUED_PER_WORKER = 1
#: Seconds between the ticks' first runs (and so between their runs when their intervals are equal). Ticks that
#: all fire at the same instant each need a thread of the tick executor and a pooled database connection at once,
#: kept for good afterwards: ~1.4 MiB of an idle daemon's RSS for nothing (bench/memory.py).
TICK_SPACING = 0.1
SUMMARY_INTERVAL = 300.0
#: How often the notify tick looks for state changes to notify (and is woken at once when a job finishes).
NOTIFY_INTERVAL = 5.0
#: How often maintenance deletes finished jobs past storage.keep_days.
RETENTION_INTERVAL = 3600.0


def make_owner() -> str:
    """Who holds a lease: host, pid and a random part (a pid is reused after a restart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _owner_is_dead_local(owner: str) -> bool:
    """True for a lease owner that ran on this host in a process that no longer exists."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return not owner.startswith(f"{host}:{pid}:")  # a previous process that had our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        owner: str | None = None,
        adapter_factory: AdapterFactory = build_adapter,
    ) -> None:
        self.config = config
        self.owner = owner or make_owner()
        self._adapter_factory = adapter_factory
        self._stop = threading.Event()
        self._reload_requested = threading.Event()
        self._lock = threading.Lock()
        self._in_flight: dict[uuid.UUID, concurrent.futures.Future[None]] = {}
        #: Steps handed to the pool per service (queued there or running), and claimed steps that wait for their
        #: service's share of the pool (`Config.worker_share`): one service never occupies more workers than that.
        self._pooled: collections.Counter[str] = collections.Counter()
        self._held: dict[str, collections.deque[Job]] = collections.defaultdict(collections.deque)
        #: Ticks woken while they may be running (APScheduler drops a run while one is going): run again at once.
        self._woken: set[str] = set()
        #: Ticks whose last claim filled every free worker: there is probably more due work, so a worker that
        #: finishes wakes them instead of idling until their next interval.
        self._backlog: set[str] = set()
        #: Services whose pending jobs wait for a free slot (last dispatch): a job of theirs that ends wakes the
        #: dispatch. Waking it for every job that ends would run it after every step of a busy daemon.
        self._slot_wanted: set[str] = set()
        self._last_tick: dict[str, float] = {}
        #: Owners blocked on a service as the last dispatch or poll tick saw them: (service, owner) -> when the
        #: block began.
        self._blocked: dict[tuple[str, str], dt.datetime] = {}
        self._last_summary = 0.0
        #: A tick still running when the stop budget ran out (stuck on a slow server): the process must not wait.
        self._tick_outlived_stop = False
        self.engine = make_engine(config.database.url, echo=config.database.echo,
                                  pool_size=max(config.database.pool_size, config.scheduler.workers + 4))
        ensure_current(self.engine)
        #: Seals job passwords at rest (key read or created on first use).
        self.passwords = PasswordCipher(config.storage.secret_key_path)
        self.store = JobStore(self.engine, sealer=self.passwords)
        self.metrics: Metrics = NO_METRICS
        self._prometheus: PrometheusMetrics | None = None
        if config.metrics.listen:
            # Imported only when metrics are served: prometheus_client is 0.6 MiB that a daemon without a listener
            # never uses (bench/memory.py), like the API's Flask (`cli._api_server`).
            from daemon.prometheus import PrometheusMetrics

            self.metrics = self._prometheus = PrometheusMetrics(self.store.admin.counts_by_service)
        self.metrics_server: MetricsServer | None = None
        self.notifier = self._build_notifier(config)
        self.probes = ServiceProbes(self.store.queue, self.store.services, self.metrics, on_unblocked=self._unblocked)
        self._retired_notifiers: list[Notifier] = []
        self._last_retention = -RETENTION_INTERVAL
        self.adapters = Adapters(config, factory=adapter_factory, max_connections=config.scheduler.workers + 2)
        self.pipeline = Pipeline(self.store.queue, self.store.services, self.adapters, config, owner=self.owner,
                                 stopping=self._stop.is_set, metrics=self.metrics, passwords=self.passwords)
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=config.scheduler.workers, thread_name_prefix="imputationd-worker"
        )
        # Ticks are idempotent and coalesced: a tick skipped because the previous run is still going, or woken
        # early while it runs, is normal operation, not something to warn an operator about.
        logging.getLogger("apscheduler").setLevel(logging.ERROR)
        self.scheduler = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1},
            timezone=dt.UTC,
        )

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        self.store.services.ensure_services(self.config.services)
        released = self.store.queue.release_owners(_owner_is_dead_local)
        if released:
            log.info("released_dead_leases", owners=len(released))
        self._start_metrics_server()
        self._add_ticks()
        self.scheduler.start()
        log.info("daemon_started", owner=self.owner, services=sorted(self.config.services),
                 workers=self.config.scheduler.workers)

    def _add_ticks(self) -> None:
        now = dt.datetime.now(dt.UTC)
        # A thread per tick: a tick that runs long (a slow database, a notifier waiting on SMTP) delays no other.
        self.scheduler.add_executor(TickExecutor(len(TICKS)), "default")
        for index, tick in enumerate(TICKS):
            seconds = tick.interval(self.config.scheduler)
            start = now + dt.timedelta(seconds=TICK_SPACING * index)
            self.scheduler.add_job(
                self._tick(tick), "interval", seconds=seconds, start_date=start, id=tick.name, name=tick.name,
                next_run_time=start, misfire_grace_time=max(1, int(seconds)), replace_existing=True,
            )

    def _tick(self, tick: Tick) -> Callable[[], None]:
        name = tick.name

        def run() -> None:
            # A wake that arrives while this tick runs would be dropped by APScheduler (max_instances=1), and the
            # work it announced would wait a whole interval: run again as long as wakes keep coming.
            while True:
                with self._lock:
                    self._woken.discard(name)
                once()
                with self._lock:
                    if name not in self._woken or self._stop.is_set():
                        return

        def once() -> None:
            started = time.monotonic()
            try:
                if not self._stop.is_set():
                    tick.run(self)
            except Exception as exc:
                if self._stop.is_set():
                    # A tick that outlives the stop's budget has the clients and the engine closed under it: what
                    # it meets then is the stop, not a fault of its own.
                    log.warning("tick_cut_short", tick=name, reason=type(exc).__name__)
                else:
                    # A failing tick (database away, a bug) is logged and tried again next time; it never stops.
                    log.exception("tick_failed", tick=name, error_kind="tick")
            finally:
                self._last_tick[name] = time.monotonic()
                elapsed = self._last_tick[name] - started
                self.metrics.tick(name, elapsed)
                if elapsed > 5:
                    log.warning("slow_tick", tick=name, seconds=round(elapsed, 2))

        return run

    def wake(self, tick: str) -> None:
        """Run a tick now instead of at its next interval (a step left work that is due at once)."""
        if self._stop.is_set():
            return
        with self._lock:
            self._woken.add(tick)
        try:
            self.scheduler.modify_job(tick, next_run_time=dt.datetime.now(dt.UTC))
        except Exception:  # the scheduler is shutting down
            pass

    def run_forever(self) -> int:
        """The main thread: wait for signals, reload on SIGHUP, feed systemd's watchdog while the ticks run."""
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        signal.signal(signal.SIGHUP, lambda *_: self._reload_requested.set())
        # Ready only now: systemd may send SIGTERM or SIGHUP (reload) the moment it reads READY=1, and before the
        # handlers above exist either signal's default action kills the process.
        systemd.ready("imputationd running")
        watchdog = systemd.watchdog_interval()
        wait = min(1.0, watchdog) if watchdog else 1.0
        while not self._stop.wait(wait):
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                self.reload()
            if watchdog and self.ticks_healthy():
                systemd.watchdog()
        return self.stop()

    def request_stop(self) -> None:
        self._stop.set()

    def ticks_healthy(self) -> bool:
        """Every tick ran recently: a hung scheduler stops the watchdog pings and systemd restarts us."""
        now = time.monotonic()
        return all(now - self._last_tick.get(tick.name, now) < 3 * tick.interval(self.config.scheduler) + 30
                   for tick in TICKS if tick.watched)

    def stop(self) -> int:
        """Stop claiming, let in-flight steps finish within the budget, release what is left. Returns exit code."""
        self._stop.set()
        systemd.stopping()
        with self._lock:
            waiting = list(self._in_flight.values())
        log.info("daemon_stopping", in_flight=len(waiting))
        # A running tick (the token check waits up to the service timeout, 30 s by default, on a server that
        # sits on the request) gets the same budget as the steps, not an unbounded wait: systemd SIGKILLs us at
        # TimeoutStopSec, before the leases below are released.
        budget_ends = time.monotonic() + self.config.scheduler.shutdown_timeout
        ticks = threading.Thread(target=self.scheduler.shutdown, name="imputationd-stop-ticks", daemon=True)
        ticks.start()
        _, unfinished = concurrent.futures.wait(waiting, timeout=self.config.scheduler.shutdown_timeout)
        ticks.join(max(0.0, budget_ends - time.monotonic()))
        self._tick_outlived_stop = ticks.is_alive()
        with self._lock:
            leftover = [job_id for job_id, future in self._in_flight.items() if future in unfinished]
            held = [job.id for jobs in self._held.values() for job in jobs]
            self._held.clear()
        for job_id in held:  # never started: given back untouched
            self.store.queue.release(job_id, self.owner)
        for job_id in leftover:
            # Released, not finished: the next daemon (or this one after a restart) picks the job up again; a
            # submit in flight is looked up on the server before any resubmission.
            self.store.queue.release(job_id, self.owner)
        if leftover:
            log.warning("released_unfinished_steps", jobs=len(leftover))
        self.pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:  # steps that never started (queued, leases released above) are not unfinished threads
            for job_id in [j for j, future in self._in_flight.items() if future.cancelled()]:
                del self._in_flight[job_id]
        self.adapters.close()
        for notifier in [self.notifier, *self._retired_notifiers]:
            notifier.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.engine.dispose()
        log.info("daemon_stopped")
        return 0

    @property
    def unfinished_threads(self) -> bool:
        with self._lock:
            return bool(self._in_flight) or self._tick_outlived_stop

    # ------------------------------------------------------------------ handing work to the pool

    def _usable_services(self) -> list[str]:
        """The services not paused. An owner blocked on one is left out by the claims themselves."""
        usable = []
        now = utcnow()
        self._blocked = {  # for the probe tick, which so needs no query of its own
            key: status.blocked_at or now for key, status in self.store.services.owner_statuses().items()
            if status.blocked_reason is not None and key[0] in self.adapters
        }
        for name, status in self.store.services.service_statuses().items():
            if name not in self.adapters:
                continue
            if status.paused_until is not None and status.paused_until > now:
                continue
            # An expired pause is not cleared here: the pipeline clears it (and says so) when a call works again,
            # so a maintenance window retried with backoff stays one outage in the logs, not one per retry.
            usable.append(name)
        return usable

    def _free_workers(self) -> int:
        """How many more jobs to claim: enough to keep every worker busy and one more step queued for each.

        Steps held back for their service's share do not count: they wait for that service alone, and counting them
        would let a service whose steps hang fill the claims of every other."""
        workers = self.config.scheduler.workers
        with self._lock:
            busy = len(self._in_flight)
        return min(self.config.scheduler.batch_size, workers * (1 + QUEUED_PER_WORKER) - busy)

    def _with_room(self, services: list[str]) -> list[str]:
        """The services that may have more steps claimed: fewer than their share of the pool, and one more step
        queued for each of those workers, in hand (handed to the pool or held back)."""
        with self._lock:
            return [name for name in services
                    if self._pooled[name] + len(self._held.get(name, ())) <
                    self.config.worker_share(name) * (1 + QUEUED_PER_WORKER)]

    def _claim_and_run(self, tick: str, states: Collection[JobState], services: list[str], *,
                       unblocked_only: bool = True) -> int:
        free = self._free_workers()
        services = self._with_room(services)
        if not services:
            return 0
        if free <= 0:
            with self._lock:
                self._backlog.add(tick)
            return 0
        jobs = self.store.queue.claim_due(
            self.owner, states=states, services=services, limit=free,
            lease_seconds=self.config.scheduler.lease_seconds, unblocked_only=unblocked_only,
        )
        with self._lock:
            if len(jobs) >= free:
                self._backlog.add(tick)
            else:
                self._backlog.discard(tick)
        for job in jobs:
            self._run_on_pool(job)
        return len(jobs)

    def _run_on_pool(self, job: Job) -> None:
        with self._lock:
            if self._stop.is_set():
                self.store.queue.release(job.id, self.owner)
                return
            if self._pooled[job.service] >= self.config.worker_share(job.service):
                self._held[job.service].append(job)  # handed on when one of its service's steps ends
                return
            self._pool_locked(job)

    def _pool_locked(self, job: Job) -> None:
        """Hand a step to the pool (the caller holds `_lock`)."""
        self._pooled[job.service] += 1
        self._in_flight[job.id] = self.pool.submit(self._work, job)

    def _step_ended_locked(self, job: Job) -> None:
        """Book a step's end, and hand its service's next held step to the pool (the caller holds `_lock`)."""
        self._in_flight.pop(job.id, None)
        self._pooled[job.service] -= 1
        if self._pooled[job.service] <= 0:
            del self._pooled[job.service]
        held = self._held.get(job.service)
        if held and not self._stop.is_set() and self._pooled[job.service] < self.config.worker_share(job.service):
            self._pool_locked(held.popleft())
        if held is not None and not held:
            del self._held[job.service]

    def _work(self, job: Job) -> None:
        if self._stop.is_set():  # queued behind other steps when the daemon began to stop: give it back untouched
            self.store.queue.release(job.id, self.owner)
            with self._lock:
                self._step_ended_locked(job)
            return
        try:
            finished = self.pipeline.run(job)
        finally:
            with self._lock:
                self._step_ended_locked(job)
                # The queue of claimed steps has run dry and due work was left behind: claim the next batch.
                drained = len(self._in_flight) <= self.config.scheduler.workers
                backlog = list(self._backlog) if drained else []
            for tick in backlog:
                self.wake(tick)
        if finished is None:
            return
        ended = finished.state in TERMINAL
        if finished.state is JobState.PENDING or ended and finished.service in self._slot_wanted:
            self.wake("dispatch")  # its slot is free and a pending job waits for one
        if ended and self.notifier.sends:
            self.wake("notify")
        due_now = finished.next_poll_at is not None and finished.next_poll_at <= utcnow()
        if due_now:
            if finished.state is JobState.DOWNLOADING:
                self.wake("download")
            elif finished.state in POLLED:
                self.wake("poll")
            elif finished.state is JobState.SUBMITTING:
                self.wake("dispatch")

    # ------------------------------------------------------------------ ticks

    def dispatch_tick(self) -> None:
        services = self._usable_services()
        for name in services:
            service = self.config.services[name]
            promotion = self.store.queue.promote_pending(name, service.max_concurrent_jobs,
                                                         per_owner=service.jobs_per_owner)
            with self._lock:
                (self._slot_wanted.add if promotion.waiting else self._slot_wanted.discard)(name)
        self._claim_and_run("dispatch", {JobState.SUBMITTING}, services)

    def poll_tick(self) -> None:
        self._claim_and_run("poll", POLLED, self._usable_services())

    def download_tick(self) -> None:
        # Downloads do not use the API token: a blocked owner's finished jobs still download.
        self._claim_and_run("download", {JobState.DOWNLOADING}, self.adapters.services, unblocked_only=False)

    def heartbeat_tick(self) -> None:
        with self._lock:
            ids = [*self._in_flight, *(job.id for jobs in self._held.values() for job in jobs)]
        if ids:
            self.store.queue.renew_leases(self.owner, ids, lease_seconds=self.config.scheduler.lease_seconds)

    def maintenance_tick(self) -> None:
        released = self.store.queue.release_owners(_owner_is_dead_local)
        if released:
            log.info("released_dead_leases", owners=len(released))
        expired = self.store.queue.clear_expired_leases()
        if expired:
            log.info("expired_leases_returned", jobs=expired)
        statuses = self.store.services.owner_statuses()
        # The operator's token (the service's own) is checked whether or not it has jobs; every other owner's while
        # they have unfinished jobs on the service.
        owners = {(name, DEFAULT_OWNER) for name in self.adapters.services}
        owners.update(key for key in self.store.queue.active_owners() if key[0] in self.adapters)
        for service, owner in sorted(owners):
            if self._stop.is_set():  # each check may wait a service's timeout: none starts once stopping
                return
            status = statuses.get((service, owner))
            adapter = self.adapters.get(service, owner)
            # A blocked one is the probe tick's.
            if adapter is not None and (status is None or status.blocked_reason is None):
                self.probes.check_token(self.config, service, owner, adapter)
        self._retention()
        self._summary()

    def probe_tick(self) -> None:
        for (service, owner), since in list(self._blocked.items()):
            adapter = self.adapters.get(service, owner)
            if adapter is not None and self.probes.probe_blocked(self.config, service, owner, adapter, since):
                self._blocked.pop((service, owner), None)

    def _unblocked(self, service: str, owner: str) -> None:
        self.wake("dispatch")
        self.wake("poll")

    def _summary(self) -> None:
        now = time.monotonic()
        if now - self._last_summary < SUMMARY_INTERVAL and self._last_summary:
            return
        self._last_summary = now
        counts = self.store.admin.counts_by_service()
        active = sum(n for by_state in counts.values() for s, n in by_state.items()
                     if JobState(s) not in TERMINAL)
        log.info("jobs_summary", jobs=counts, active=active)
        systemd.status(f"{active} active jobs")

    # ------------------------------------------------------------------ configuration

    def reload(self, path: Path | None = None) -> bool:
        """SIGHUP: validate the file first; a bad file keeps the running configuration."""
        path = path or self.config.source
        if path is None:
            log.warning("config_reload_skipped", reason="the configuration was not loaded from a file")
            return False
        try:
            new = load_config(path)
        except ConfigError as exc:
            log.error("config_reload_failed", path=str(path), problems=exc.problems, error_kind="config",
                      reason="keeping the running configuration")
            return False
        if new.database.url != self.config.database.url:
            log.warning("config_reload_partial", reason="database.url changes need a restart")
        if new.scheduler.workers != self.config.scheduler.workers:
            log.warning("config_reload_partial", reason="scheduler.workers changes need a restart")
        if new.metrics.listen != self.config.metrics.listen:
            log.warning("config_reload_partial", reason="metrics.listen changes need a restart")
        if new.api != self.config.api:
            log.warning("config_reload_partial", reason="api changes need a restart")
        configure_logging(new.logging)
        for name in set(self.config.services) - set(new.services):
            log.warning("service_removed", service=name, reason="its jobs wait until it is configured again")
        self.adapters.reconfigure(new, max_connections=new.scheduler.workers + 2)
        self.store.services.ensure_services(new.services)
        self.config = new
        self.pipeline.config = new
        self._retired_notifiers.append(self.notifier)  # the notify tick may be sending with it right now
        self.notifier = self._build_notifier(new)
        self._reschedule(new)
        self.probes.forget()  # verify tokens again: the reload may have been for a new token
        log.info("config_reloaded", path=str(path), services=sorted(new.services))
        return True

    # ------------------------------------------------------------------ notifications, retention, health

    def _build_notifier(self, config: Config) -> Notifier:
        return Notifier(self.store.outbox, config.notifications, backoff_initial=config.scheduler.backoff_initial,
                        backoff_max=config.scheduler.backoff_max, metrics=self.metrics)

    def notify_tick(self) -> None:
        self.notifier.tick()

    def _retention(self) -> None:
        if time.monotonic() - self._last_retention < RETENTION_INTERVAL:
            return
        self._last_retention = time.monotonic()
        retention.remove_abandoned_uploads(self.store.expired, self.config.storage)
        keep_days = self.config.storage.keep_days
        if keep_days is None:
            return
        report = retention.cleanup(self.store.expired, self.config.storage, keep_days)
        if report.deleted or report.skipped:
            log.info("retention_done", jobs_deleted=len(report.deleted), bytes_freed=report.bytes,
                     jobs_skipped=len(report.skipped), keep_days=keep_days)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """`/healthz`: the database answers and the ticks run; blocked or paused services are told, not failed."""

        def services() -> dict[str, Any]:
            statuses = self.store.services.service_statuses()
            blocked: dict[str, list[str]] = {}
            for (service, owner), of_owner in self.store.services.owner_statuses().items():
                if of_owner.blocked_reason is not None:
                    blocked.setdefault(service, []).append(f"{owner}: {of_owner.blocked_reason}")
            now = utcnow()
            report: dict[str, str] = {}
            for name in sorted(self.adapters.services):
                status = statuses.get(name)
                if status is not None and status.paused_until is not None and status.paused_until > now:
                    report[name] = f"paused until {status.paused_until.isoformat()}: {status.pause_reason}"
                elif name in blocked:
                    report[name] = "blocked for " + "; ".join(sorted(blocked[name]))
                else:
                    report[name] = "ok"
            return {"services": report}

        return health_report(
            self.store.ping, self.ticks_healthy, stopping=self._stop.is_set,
            describe_error=lambda exc: str(unavailable(self.engine.url, exc)), extra=services,
        )

    def _start_metrics_server(self) -> None:
        listen = self.config.metrics.listen
        if not listen or self._prometheus is None:
            return
        from daemon.prometheus import MetricsServer  # loaded with PrometheusMetrics

        server = MetricsServer(listen, self._prometheus, self.health)
        try:
            server.start()
        except OSError as exc:
            # Metrics are optional: say so loudly, keep imputing.
            log.error("metrics_listen_failed", listen=listen, reason=exc.strerror or str(exc), error_kind="metrics")
            return
        self.metrics_server = server
        host, port = server.address
        log.info("metrics_listening", address=f"{host}:{port}")

    def _reschedule(self, new: Config) -> None:
        now = dt.datetime.now(dt.UTC)
        for index, tick in enumerate(TICKS):
            start = now + dt.timedelta(seconds=TICK_SPACING * index)
            self.scheduler.reschedule_job(tick.name, trigger="interval", seconds=tick.interval(new.scheduler),
                                          start_date=start)


@dataclass(frozen=True)
class Tick:
    """One of the daemon's periodic runs: its name (the APScheduler job id, and what `wake` takes), how often it
    runs under a scheduler configuration, and what it runs."""

    name: str
    interval: Callable[[SchedulerConfig], float]
    run: Callable[[Daemon], None]
    #: A watched tick that stops running makes the daemon unhealthy (no more watchdog pings, /healthz fails).
    #: The notify and probe ticks are not: they do nothing most of the time, and a slow SMTP server is no hang.
    watched: bool = True


def _heartbeat_interval(s: SchedulerConfig) -> float:
    return max(1.0, s.lease_seconds / 3)


TICKS: tuple[Tick, ...] = (
    Tick("dispatch", lambda s: s.dispatch_interval, Daemon.dispatch_tick),
    Tick("poll", lambda s: s.poll_tick_interval, Daemon.poll_tick),
    Tick("download", lambda s: s.download_interval, Daemon.download_tick),
    Tick("heartbeat", _heartbeat_interval, Daemon.heartbeat_tick),
    Tick("maintenance", lambda s: s.maintenance_interval, Daemon.maintenance_tick),
    Tick("notify", lambda s: NOTIFY_INTERVAL, Daemon.notify_tick, watched=False),
    Tick("probe", lambda s: min(s.dispatch_interval, s.blocked_probe_initial), Daemon.probe_tick, watched=False),
)
