"""The job store's queue queries on SQLite and PostgreSQL: claims, leases, slots, outcomes, operator actions."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from daemon.db.admin import NewInput, NewJob
from daemon.db.engine import make_engine
from daemon.db.models import Job, JobEvent, utcnow
from daemon.db.queue import LeaseLost
from daemon.db.store import JobStore
from daemon.db.transitions import JobNotFound
from daemon.outcome import JobColumns, Outcome, OutputColumns
from daemon.remote import RemoteOutput
from daemon.states import InvalidTransition, JobState, OutputState

WORKABLE_POLL = {JobState.QUEUED, JobState.RUNNING}


def make_store(url: str) -> JobStore:
    engine = make_engine(url, pool_size=10)
    return JobStore(engine)


def run_threads(target: Callable[..., None], args_per_thread: list[tuple], timeout: float = 60) -> None:
    """`target(*args)` in a thread of its own for each args, all at once; fails the test with the first exception
    one of them raised, or when one has not finished within `timeout` seconds."""
    errors: list[BaseException] = []

    def guarded(*args: object) -> None:
        try:
            target(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=args, daemon=True) for args in args_per_thread]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if errors:
        raise errors[0]
    assert not [t for t in threads if t.is_alive()], f"threads still running after {timeout} s"


@pytest.fixture
def store(db_url: str) -> JobStore:
    return make_store(db_url)


def new_job(service: str = "mis", **overrides) -> NewJob:
    return NewJob(
        service=service,
        panel="1000g",
        build="hg19",
        inputs=[NewInput(path="/data/chr20.vcf.gz", size=123, sha256="ab" * 32)],
        **overrides,
    )


def add_jobs(store: JobStore, n: int, service: str = "mis") -> list[uuid.UUID]:
    return [store.admin.create_group([new_job(service)])[0].id for _ in range(n)]


def force(store: JobStore, job_ids, **values) -> None:
    """Put rows into a state directly (test setup only)."""
    with store._db.session() as session, session.begin():
        session.execute(sa.update(Job).where(Job.id.in_(list(job_ids))).values(**values))


def events(store: JobStore, job_id: uuid.UUID) -> list[tuple[str | None, str]]:
    with store._db.session() as session:
        rows = session.execute(
            sa.select(JobEvent.from_state, JobEvent.to_state).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        ).all()
    return [tuple(r) for r in rows]


def test_group_submission_shares_group_and_records_first_event(store: JobStore) -> None:
    jobs = store.admin.create_group([new_job("mis"), new_job("topmed")])
    assert {j.group_id for j in jobs} == {jobs[0].id}
    assert [j.service for j in store.admin.group(jobs[0].id)] == ["mis", "topmed"]
    assert events(store, jobs[1].id) == [(None, "pending")]
    assert store.admin.get(jobs[1].id).inputs[0].sha256 == "ab" * 32


def test_promote_fills_only_free_slots_in_submission_order(store: JobStore) -> None:
    store.services.ensure_services(["mis"])
    ids = add_jobs(store, 5)
    assert store.queue.promote_pending("mis", 3) == (3, True)  # every slot used: more may be waiting
    assert [store.admin.get(i).state for i in ids] == [JobState.SUBMITTING] * 3 + [JobState.PENDING] * 2
    assert store.queue.promote_pending("mis", 3) == (0, True)  # all three slots taken, two jobs waiting
    force(store, ids[:1], state=JobState.COMPLETED)
    assert store.queue.promote_pending("mis", 3) == (1, True)
    assert store.admin.get(ids[3]).state is JobState.SUBMITTING
    force(store, ids[1:2], state=JobState.COMPLETED)
    assert store.queue.promote_pending("mis", 3) == (1, False)  # the last one: nobody waits for a slot
    assert store.queue.promote_pending("mis", 3) == (0, False)
    force(store, ids[2:3], state=JobState.COMPLETED)
    assert store.queue.promote_pending("mis", 3) == (0, False)  # a free slot and nothing to put in it
    assert events(store, ids[0])[1] == ("pending", "submitting")


def test_promote_with_nothing_pending_does_not_wait_for_writers(sqlite_url: str) -> None:
    store = make_store(sqlite_url)
    store.services.ensure_services(["mis"])
    [job_id] = add_jobs(store, 1)
    force(store, [job_id], state=JobState.QUEUED)
    with store._db.engine.begin():  # a writer holds the write turn for as long as this block runs
        done = threading.Event()
        thread = threading.Thread(target=lambda: (store.queue.promote_pending("mis", 3), done.set()))
        thread.start()
        assert done.wait(5)  # nothing to promote: answered without a turn at the write lock
        thread.join(5)
    store._db.engine.dispose()


def test_lowered_limit_applies_until_a_job_finishes(store: JobStore) -> None:
    store.services.ensure_services(["mis"])
    ids = add_jobs(store, 3)
    store.services.lower_limit("mis", "operator", 1)
    assert store.queue.promote_pending("mis", 3).promoted == 1
    claimed = store.queue.claim_due("me", states={JobState.SUBMITTING}, services=["mis"], limit=5, lease_seconds=60)
    store.queue.finish(claimed[0].id, "me", Outcome(state=JobState.FAILED, reason="x"))
    assert store.services.owner_statuses()[("mis", "operator")].effective_limit is None
    assert store.queue.promote_pending("mis", 3).promoted == 2
    assert {store.admin.get(i).state for i in ids[1:]} == {JobState.SUBMITTING}


def test_claim_respects_due_time_lease_and_service(store: JobStore) -> None:
    now = utcnow()
    due, later, leased, other = add_jobs(store, 3) + add_jobs(store, 1, service="topmed")
    force(store, [due, later, leased, other], state=JobState.QUEUED, next_poll_at=now - dt.timedelta(seconds=1))
    force(store, [later], next_poll_at=now + dt.timedelta(hours=1))
    force(store, [leased], lease_owner="other", lease_expires_at=now + dt.timedelta(minutes=5))
    claimed = store.queue.claim_due("me", states=WORKABLE_POLL, services=["mis"], limit=10, lease_seconds=60)
    assert [j.id for j in claimed] == [due]
    assert claimed[0].lease_owner == "me"
    with pytest.raises(sa.exc.InvalidRequestError):  # a poll reads no inputs: not loaded, and reading them says so
        _ = claimed[0].inputs


def test_claim_loads_what_the_step_reads(store: JobStore) -> None:
    submit, download = add_jobs(store, 2)
    force(store, [submit], state=JobState.SUBMITTING, next_poll_at=utcnow())
    force(store, [download], state=JobState.DOWNLOADING, next_poll_at=utcnow())
    store.queue.record_outputs(download, [RemoteOutput(name="a.txt", url="http://x/a", remote_hash="h",
                                                       size_text="1 KB", downloads_left=10)])
    [claimed] = store.queue.claim_due("me", states={JobState.SUBMITTING}, services=["mis"], limit=5,
                                      lease_seconds=60)
    assert [i.path for i in claimed.inputs] == ["/data/chr20.vcf.gz"]  # usable detached
    [claimed] = store.queue.claim_due("me", states={JobState.DOWNLOADING}, services=["mis"], limit=5, lease_seconds=60)
    assert [o.name for o in claimed.outputs] == ["a.txt"]


def test_expired_lease_is_taken_over_and_old_owner_cannot_write(store: JobStore) -> None:
    [job_id] = add_jobs(store, 1)
    force(store, [job_id], state=JobState.RUNNING, next_poll_at=utcnow())
    [first] = store.queue.claim_due("dead", states=WORKABLE_POLL, services=["mis"], limit=1, lease_seconds=60)
    assert store.queue.claim_due("me", states=WORKABLE_POLL, services=["mis"], limit=1, lease_seconds=60) == []
    force(store, [job_id], lease_expires_at=utcnow() - dt.timedelta(seconds=1))
    [again] = store.queue.claim_due("me", states=WORKABLE_POLL, services=["mis"], limit=1, lease_seconds=60)
    assert again.id == first.id
    files = [RemoteOutput(name="chr_20.zip", url="http://x/share/results/h1/chr_20.zip", remote_hash="h1")]
    with pytest.raises(LeaseLost):
        store.queue.finish(job_id, "dead", Outcome(state=JobState.DOWNLOADING, reason="stale", outputs=files))
    assert store.queue.outputs(job_id) == []  # nothing of the stale outcome lands, its files neither
    done = store.queue.finish(job_id, "me", Outcome(state=JobState.DOWNLOADING, reason="done", next_poll_in=0,
                                                    outputs=files))
    assert done.state is JobState.DOWNLOADING and done.lease_owner is None
    assert [(o.name, o.state) for o in store.queue.outputs(job_id)] == [("chr_20.zip", OutputState.PENDING)]


def test_finish_writes_an_event_only_when_the_state_changes(store: JobStore) -> None:
    [job_id] = add_jobs(store, 1)
    force(store, [job_id], state=JobState.QUEUED, next_poll_at=utcnow())
    for _ in range(3):
        [job] = store.queue.claim_due("me", states=WORKABLE_POLL, services=["mis"], limit=1, lease_seconds=60)
        store.queue.finish(job.id, "me",
                           Outcome(state=JobState.QUEUED, next_poll_in=0, columns=JobColumns(queue_position=4)))
    [job] = store.queue.claim_due("me", states=WORKABLE_POLL, services=["mis"], limit=1, lease_seconds=60)
    store.queue.finish(job.id, "me", Outcome(state=JobState.RUNNING, reason="remote RUNNING", next_poll_in=0))
    assert events(store, job_id) == [(None, "pending"), ("queued", "running")]
    with pytest.raises(InvalidTransition):
        [job] = store.queue.claim_due("me", states=WORKABLE_POLL, services=["mis"], limit=1, lease_seconds=60)
        store.queue.finish(job.id, "me", Outcome(state=JobState.SUBMITTING))


@pytest.mark.parametrize("expected", [None, JobState.QUEUED])
def test_finish_with_the_expected_state_or_without(store: JobStore, expected: JobState | None) -> None:
    ours, cancelled, lost = add_jobs(store, 3)
    force(store, [ours, cancelled, lost], state=JobState.QUEUED, next_poll_at=utcnow())
    store.queue.claim_due("me", states=WORKABLE_POLL, services=["mis"], limit=3, lease_seconds=60)
    finished = Outcome(state=JobState.DOWNLOADING, reason="remote done", next_poll_in=0)
    row = store.queue.finish(ours, "me", finished, expected=expected)
    assert (row.state, row.lease_owner) == (JobState.DOWNLOADING, None)
    assert events(store, ours)[-1] == ("queued", "downloading")
    # An operator's cancel while the step ran: the event starts from the state the job is in now.
    assert store.admin.request_cancel(cancelled) is JobState.CANCEL_REQUESTED
    assert store.queue.finish(cancelled, "me", finished, expected=expected).state is JobState.DOWNLOADING
    assert events(store, cancelled)[-2:] == [("queued", "cancel_requested"), ("cancel_requested", "downloading")]
    force(store, [lost], lease_owner="other")
    with pytest.raises(LeaseLost):
        store.queue.finish(lost, "me", finished, expected=expected)
    assert store.admin.get(lost).state is JobState.QUEUED and events(store, lost) == [(None, "pending")]


def test_renew_extends_only_our_leases(store: JobStore) -> None:
    a, b = add_jobs(store, 2)
    soon = utcnow() + dt.timedelta(seconds=5)
    force(store, [a], lease_owner="me", lease_expires_at=soon)
    force(store, [b], lease_owner="other", lease_expires_at=soon)
    assert store.queue.renew_leases("me", [a, b], lease_seconds=600) == 1
    assert store.admin.get(a).lease_expires_at > soon + dt.timedelta(seconds=500)
    assert store.admin.get(b).lease_expires_at == soon


def test_block_parks_waiting_jobs_and_unblock_returns_them(store: JobStore) -> None:
    store.services.ensure_services(["mis"])
    pending, remote = add_jobs(store, 2)
    force(store, [remote], state=JobState.RUNNING, remote_id="job-1")
    newly, parked = store.queue.block_owner("mis", "operator", "HTTP 401: token expired")
    assert (newly, parked) == (True, 2)
    assert store.queue.block_owner("mis", "operator", "HTTP 401 again") == (False, 0)
    assert store.queue.unblock_owner("mis", "operator", "token replaced") == 2
    assert store.admin.get(pending).state is JobState.PENDING
    assert store.admin.get(remote).state is JobState.QUEUED
    assert store.services.owner_statuses()[("mis", "operator")].blocked_reason is None


def test_outputs_keep_verified_state_when_recorded_again(store: JobStore) -> None:
    [job_id] = add_jobs(store, 1)
    outputs = [RemoteOutput(name="chr_20.zip", url="http://x/share/results/h1/chr_20.zip", remote_hash="h1")]
    store.queue.record_outputs(job_id, outputs)
    [row] = store.queue.outputs(job_id)
    store.queue.update_output(row.id, OutputColumns(state=OutputState.VERIFIED, sha256="cd" * 32, size=10))
    store.queue.record_outputs(job_id, [RemoteOutput(name="chr_20.zip", url="http://x/new", remote_hash="h2")])
    [row] = store.queue.outputs(job_id)
    assert row.state is OutputState.VERIFIED and row.url.endswith("/h1/chr_20.zip")


def test_cancel_and_retry(store: JobStore) -> None:
    pending, running, failed = add_jobs(store, 3)
    force(store, [running], state=JobState.RUNNING, remote_id="job-2")
    force(store, [failed], state=JobState.FAILED, remote_id="job-3", submit_attempts=1, error="boom")
    assert store.admin.request_cancel(pending) is JobState.CANCELLED
    assert store.admin.request_cancel(running) is JobState.CANCEL_REQUESTED
    job = store.admin.retry(failed)
    assert (job.state, job.remote_id, job.submit_attempts, job.retries, job.error) == (
        JobState.PENDING, None, 0, 1, None)
    with pytest.raises(ValueError, match="only failed jobs"):
        store.admin.retry(pending)


def test_cancel_of_a_blocked_job_whose_submit_may_exist_remotely_is_left_to_the_daemon(store: JobStore) -> None:
    refused, lost = add_jobs(store, 2)
    force(store, [refused], state=JobState.BLOCKED, submit_attempts=0)
    force(store, [lost], state=JobState.BLOCKED, submit_attempts=1)
    assert store.admin.request_cancel(refused) is JobState.CANCELLED
    assert store.admin.request_cancel(lost) is JobState.CANCEL_REQUESTED


def test_cancel_of_an_unblocked_job_whose_submit_may_exist_remotely_is_left_to_the_daemon(store: JobStore) -> None:
    """Blocked while its lost submit was being looked up, then unblocked back to pending: the submit may still
    become a remote job, so the cancel waits for it (the daemon cancels it there) instead of forgetting it."""
    refused, lost = add_jobs(store, 2)
    force(store, [refused], state=JobState.BLOCKED, submit_attempts=0)
    force(store, [lost], state=JobState.BLOCKED, submit_attempts=1)
    store.queue.unblock_owner("mis", "operator", "token works again")
    assert [store.admin.get(j).state for j in (refused, lost)] == [JobState.PENDING, JobState.PENDING]
    assert store.admin.request_cancel(refused) is JobState.CANCELLED
    assert store.admin.request_cancel(lost) is JobState.CANCEL_REQUESTED


def test_resolve_id_accepts_unique_prefixes(store: JobStore) -> None:
    [job_id] = add_jobs(store, 1)
    assert store.admin.resolve_id(str(job_id)[:8]) == job_id
    assert store.admin.resolve_id(str(job_id).upper()) == job_id
    with pytest.raises(JobNotFound):
        store.admin.resolve_id("zzzz")
    with pytest.raises(JobNotFound):
        store.admin.resolve_id("0000000")


def test_concurrent_claimers_never_share_a_job(db_url: str) -> None:
    store = make_store(db_url)
    ids = add_jobs(store, 120)
    force(store, ids, state=JobState.QUEUED, next_poll_at=utcnow() - dt.timedelta(seconds=1))
    claimed: list[list[uuid.UUID]] = [[] for _ in range(6)]
    start = threading.Barrier(6, timeout=30)  # a claimer that died before it would break it, not hang the rest

    def claimer(index: int) -> None:
        mine = make_store(db_url)
        start.wait()
        while True:
            jobs = mine.queue.claim_due(f"w{index}", states=WORKABLE_POLL, services=["mis"], limit=7,
                                        lease_seconds=600)
            if not jobs:
                return
            claimed[index].extend(j.id for j in jobs)

    run_threads(claimer, [(i,) for i in range(6)])
    everything = [i for part in claimed for i in part]
    assert sorted(everything) == sorted(ids), "every job claimed exactly once"


def _claim_in_process(url: str, owner: str, queue) -> None:
    store = make_store(url)
    got = []
    while True:
        jobs = store.queue.claim_due(owner, states={JobState.QUEUED}, services=["mis"], limit=5, lease_seconds=600)
        if not jobs:
            break
        got.extend(str(j.id) for j in jobs)
    queue.put(got)


def test_claimers_in_separate_processes_never_share_a_job(db_url: str) -> None:
    store = make_store(db_url)
    ids = add_jobs(store, 90)
    force(store, ids, state=JobState.QUEUED, next_poll_at=utcnow() - dt.timedelta(seconds=1))
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claim_in_process, args=(db_url, f"p{i}", queue)) for i in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    everything = [i for part in results for i in part]
    assert len(everything) == len(set(everything)) == 90


def test_concurrent_promotion_never_overfills_a_service(db_url: str) -> None:
    store = make_store(db_url)
    store.services.ensure_services(["mis"])
    add_jobs(store, 40)
    start = threading.Barrier(5, timeout=30)

    def promoter() -> None:
        mine = make_store(db_url)
        start.wait()
        for _ in range(10):
            mine.queue.promote_pending("mis", 3)

    run_threads(promoter, [() for _ in range(5)])
    assert store.queue.in_flight_count("mis") == 3


def test_a_remote_job_is_adopted_once_even_by_racing_adopters(db_url: str) -> None:
    """Two `imputationd adopt` of one remote job at once (each its own store, as two processes): one job."""
    stores = [make_store(db_url) for _ in range(4)]
    stores[0].services.ensure_services(["mis"])
    start = threading.Barrier(len(stores))
    results: list[tuple[uuid.UUID, bool]] = []

    def adopt(store: JobStore) -> None:
        start.wait()
        job, adopted = store.admin.adopt("mis", "job-20260101-000000-007", password="pw", remote_state="WAITING")
        results.append((job.id, adopted))

    threads = [threading.Thread(target=adopt, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len({job_id for job_id, _ in results}) == 1 and sum(adopted for _, adopted in results) == 1
    job = stores[0].admin.get(results[0][0], with_events=True)
    assert (job.state, job.remote_id, job.remote_state, job.inputs) == (JobState.QUEUED, "job-20260101-000000-007",
                                                                        "WAITING", [])
    assert [e.reason for e in job.events] == ["adopted from the server as job-20260101-000000-007"]


def test_an_adopted_job_that_failed_cannot_be_retried(store: JobStore) -> None:
    """Retrying submits the inputs again: an adopted job has none."""
    job, _ = store.admin.adopt("mis", "job-1")
    assert store.queue.claim_one(job.id, "me", lease_seconds=30) is not None
    store.queue.finish(job.id, "me", Outcome(state=JobState.FAILED, reason="remote job failed"))
    with pytest.raises(ValueError, match="was adopted from the server: there are no input files to submit again"):
        store.admin.retry(job.id)


def test_downloads_are_claimed_soonest_retiring_first(store: JobStore) -> None:
    """Results the server deletes soonest go first (Cloudgene `deletedOn`); those without a date after them."""
    ids = add_jobs(store, 4)
    now = utcnow()
    retiring = {ids[0]: None, ids[1]: now + dt.timedelta(days=3), ids[2]: now + dt.timedelta(hours=2),
                ids[3]: now + dt.timedelta(days=6)}
    for job_id, retires_at in retiring.items():
        force(store, [job_id], state=JobState.DOWNLOADING, next_poll_at=now, retires_at=retires_at)
    claimed = store.queue.claim_due("me", states={JobState.DOWNLOADING}, services=["mis"], limit=3, lease_seconds=60)
    assert [job.id for job in claimed] == [ids[2], ids[1], ids[3]]


def test_an_owners_status_row_made_by_two_daemons_at_once_is_made_once(store: JobStore) -> None:
    # Daemon A has inserted the missing row and not committed yet when daemon B finds it missing too: B waits for
    # A's row and uses it instead of failing on the primary key (it did, on PostgreSQL, in a three-daemon run).
    from daemon.db.service_status import owner_row

    inserted, b_done = threading.Event(), threading.Event()

    def daemon(name: str) -> None:
        if name == "a":
            with store._db.session() as session, session.begin():
                owner_row(session, "mis", "alice").effective_limit = 2
                inserted.set()
                time.sleep(0.5)
        else:
            assert inserted.wait(10)
            store.services.record_token("mis", "alice", expires=None)
            b_done.set()

    run_threads(daemon, [("a",), ("b",)])
    assert b_done.is_set()
    [status] = [s for key, s in store.services.owner_statuses().items() if key == ("mis", "alice")]
    assert status.effective_limit == 2 and status.token_checked_at is not None
