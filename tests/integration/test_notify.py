"""Notifications through the job_events outbox: a real webhook receiver and a real (minimal) SMTP server, on SQLite
and PostgreSQL; exactly one delivery per state change, through failures, races between notifiers and restarts."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import http.server
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa
import structlog
from support.ops_support import (
    PANEL,
    SmtpServer,
    WebhookReceiver,
    daemon_config,
    running_daemon,
    sample_vcf,
    wait_until,
)

from daemon.config import EmailConfig, NotificationsConfig, WebhookConfig
from daemon.db.admin import NewInput, NewJob
from daemon.db.engine import make_engine
from daemon.db.models import JobEvent, utcnow
from daemon.db.store import JobStore
from daemon.logging import scrub
from daemon.notify import EVENT_HEADER, EmailSender, Notifier, NotifyFailed, WebhookSender, read_headers_file
from daemon.outcome import JobColumns, Outcome
from daemon.simulator import SimulatedCloudgene, Timings
from daemon.states import JobState
from daemon.submission import Submission, submit

FAST_BACKOFF = {"backoff_initial": 0.01, "backoff_max": 0.02}


def make_store(url: str) -> tuple[JobStore, sa.Engine]:
    engine = make_engine(url)
    return JobStore(engine), engine


@pytest.fixture
def store(db_url: str):
    store, engine = make_store(db_url)
    yield store
    engine.dispose()


def new_job(store: JobStore, name: str = "job") -> uuid.UUID:
    [job] = store.admin.create_group([NewJob(service="sim", panel="p", build="hg19", name=name,
                                             inputs=[NewInput(path="/x.vcf.gz", size=1, sha256="0" * 64)])])
    return job.id


def move(store: JobStore, job_id: uuid.UUID, *states: JobState, reason: str = "test") -> None:
    """Walk a job through `states` the way the pipeline writes outcomes (claim, then finish)."""
    for state in states:
        assert store.queue.claim_one(job_id, "tester", lease_seconds=30) is not None
        store.queue.finish(job_id, "tester",
                           Outcome(state=state, reason=reason, columns=JobColumns(result_dir="/results/x")))


def complete(store: JobStore, job_id: uuid.UUID) -> None:
    move(store, job_id, JobState.SUBMITTING, JobState.DOWNLOADING, JobState.COMPLETED)


def webhook_config(url: str, **extra) -> NotificationsConfig:
    return NotificationsConfig(webhook=WebhookConfig(url=url, timeout=5.0), **extra)


def drain(notifier: Notifier, until: callable, timeout: float = 10.0) -> None:
    """Tick until `until()` holds (bounded)."""
    wait_until(lambda: (notifier.tick(), until())[1], timeout, interval=0.01, message="notifications not done")


def outbox(store: JobStore) -> list[JobEvent]:
    with store._db.session() as session:  # a test looking at the raw rows
        return list(session.scalars(sa.select(JobEvent).where(JobEvent.notify_attempts.is_not(None))
                                    .order_by(JobEvent.id)))


# -------------------------------------------------------------------------------------------------- webhook


def test_one_webhook_per_state_change_with_its_fields(store: JobStore) -> None:
    done, failed, cancelled = new_job(store, "a"), new_job(store, "b"), new_job(store, "c")
    complete(store, done)
    move(store, failed, JobState.FAILED, reason="remote job failed: bad VCF")
    store.admin.request_cancel(cancelled)
    with WebhookReceiver() as hook:
        notifier = Notifier(store.outbox, webhook_config(hook.url), **FAST_BACKOFF)
        try:
            drain(notifier, lambda: len(hook.delivered()) == 3)
            for _ in range(3):
                notifier.tick()
        finally:
            notifier.close()
        requests = hook.all()
    assert len(requests) == 3
    by_job = {body["job_id"]: (headers, body) for _, headers, body in requests}
    headers, body = by_job[str(done)]
    assert body["state"] == "completed" and body["from_state"] == "downloading" and body["name"] == "a"
    assert body["service"] == "sim" and body["group_id"] == str(done) and body["result_dir"] == "/results/x"
    assert body["owner"] == "operator"
    assert body["finished_at"] is not None and body["reason"] == "test"
    assert headers[EVENT_HEADER.lower()] == str(body["event_id"])
    assert headers["content-type"] == "application/json"
    assert by_job[str(failed)][1]["reason"] == "remote job failed: bad VCF"
    assert by_job[str(cancelled)][1]["state"] == "cancelled"
    rows = outbox(store)
    assert {r.to_state for r in rows} == {"completed", "failed", "cancelled"}
    assert all(r.notify_next_at is None and r.notified_at is not None and r.notified_via == "webhook" for r in rows)


def test_a_webhook_failing_twice_is_delivered_once_on_the_third_try(store: JobStore) -> None:
    job = new_job(store)
    complete(store, job)
    with WebhookReceiver(fail_first=2) as hook:
        notifier = Notifier(store.outbox, webhook_config(hook.url), **FAST_BACKOFF)
        try:
            drain(notifier, lambda: hook.delivered())
            for _ in range(5):
                notifier.tick()
        finally:
            notifier.close()
        requests = hook.all()
    assert [status for status, _, _ in requests] == [500, 500, 204]
    assert len({headers[EVENT_HEADER.lower()] for _, headers, _ in requests}) == 1  # one idempotency key
    [row] = outbox(store)
    assert row.notify_attempts == 3 and row.notified_at is not None and row.notify_error is None


@pytest.mark.parametrize("notifiers", [2, 3])
def test_racing_notifiers_deliver_each_event_exactly_once(db_url: str, notifiers: int) -> None:
    """Several daemons' notify ticks on one database, in threads, against a slow receiver."""
    setup, setup_engine = make_store(db_url)
    jobs = [new_job(setup, f"j{i}") for i in range(24)]
    for i, job in enumerate(jobs):
        if i % 2:
            move(setup, job, JobState.FAILED)
        else:
            setup.admin.request_cancel(job)
    stores = [make_store(db_url) for _ in range(notifiers)]
    with WebhookReceiver(delay=0.01, fail_first=3) as hook:
        workers = [Notifier(s.outbox, webhook_config(hook.url), **FAST_BACKOFF) for s, _ in stores]
        start = threading.Barrier(notifiers)
        errors: list[BaseException] = []

        def loop(notifier: Notifier) -> None:
            try:
                start.wait()
                wait_until(lambda: (notifier.tick(), len(hook.delivered()) >= len(jobs))[1], 30, interval=0.005)
                for _ in range(3):
                    notifier.tick()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=loop, args=(n,)) for n in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for n in workers:
            n.close()
        delivered = Counter(body["event_id"] for body in hook.delivered())
    for _, engine in stores:
        engine.dispose()
    assert not errors, errors
    assert len(delivered) == len(jobs) and set(delivered.values()) == {1}, delivered
    rows = outbox(setup)
    setup_engine.dispose()
    assert len(rows) == len(jobs) and all(r.notify_next_at is None for r in rows)


def test_a_redirect_or_an_unreachable_receiver_is_a_failure_to_retry(store: JobStore, tmp_path: Path) -> None:
    job = new_job(store)
    store.admin.request_cancel(job)
    with WebhookReceiver(status=302) as hook:
        notifier = Notifier(store.outbox, webhook_config(hook.url), backoff_initial=60, backoff_max=60)
        try:
            assert notifier.tick() == 0
        finally:
            notifier.close()
    [row] = outbox(store)
    assert row.notified_at is None and row.notify_error == "webhook: HTTP 302"
    assert row.notify_next_at > utcnow() + dt.timedelta(seconds=20)  # backing off
    sender = WebhookSender(WebhookConfig(url=hook.url, timeout=1))
    try:
        with pytest.raises(NotifyFailed, match="ConnectError"):
            sender.send({"event_id": 1})  # nobody listens any more
    finally:
        sender.close()


class _HostileReceiver(http.server.BaseHTTPRequestHandler):
    """Answers every POST 200 and then either never ends its body or drips it a byte a second."""

    mode = "endless"

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(300):
                if self.mode == "endless":
                    self.wfile.write(b"x" * 65536)
                else:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(1)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("mode", "said"), [("endless", "larger than"), ("drip", "webhook POST")])
def test_a_receiver_that_never_ends_its_answer_fails_the_send(mode: str, said: str) -> None:
    """The answer is capped and the call has a deadline: the notify tick is never held past its claim."""
    handler = type("Receiver", (_HostileReceiver,), {"mode": mode})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sender = WebhookSender(WebhookConfig(url=f"http://127.0.0.1:{server.server_address[1]}/hook", timeout=1))
    try:
        with pytest.raises(NotifyFailed, match=said):
            sender.send({"event_id": 1})
    finally:
        sender.close()
        server.shutdown()
        server.server_close()


def test_headers_file_is_sent_and_its_values_are_redacted(store: JobStore, tmp_path: Path) -> None:
    headers = tmp_path / "hook.headers"
    headers.write_text("# for the receiver\nAuthorization: Bearer s3cr3t-hook-token\n\nX-Team: genomics\n")
    assert read_headers_file(headers) == {"Authorization": "Bearer s3cr3t-hook-token", "X-Team": "genomics"}
    assert "s3cr3t-hook-token" not in scrub("sent Bearer s3cr3t-hook-token")
    job = new_job(store)
    store.admin.request_cancel(job)
    with WebhookReceiver() as hook:
        config = NotificationsConfig(webhook=WebhookConfig(url=hook.url, headers_file=headers))
        notifier = Notifier(store.outbox, config, **FAST_BACKOFF)
        try:
            drain(notifier, lambda: hook.delivered())
        finally:
            notifier.close()
        [(_, got, _)] = hook.all()
    assert got["authorization"] == "Bearer s3cr3t-hook-token" and got["x-team"] == "genomics"


def test_a_broken_headers_file_fails_the_channel_until_fixed(store: JobStore, tmp_path: Path) -> None:
    headers = tmp_path / "hook.headers"
    headers.write_text("not a header line\n")
    job = new_job(store)
    store.admin.request_cancel(job)
    with WebhookReceiver() as hook:
        config = NotificationsConfig(webhook=WebhookConfig(url=hook.url, headers_file=headers))
        notifier = Notifier(store.outbox, config, **FAST_BACKOFF)
        try:
            assert notifier.tick() == 0
            [row] = outbox(store)
            assert "headers_file" in row.notify_error and "line 1" in row.notify_error
            headers.write_text("X-Fixed: yes\n")
            drain(notifier, lambda: hook.delivered())
        finally:
            notifier.close()


# ------------------------------------------------------------------------------------------- what is not sent


def test_without_notifications_due_events_are_dropped_so_turning_them_on_sends_no_backlog(store: JobStore) -> None:
    old = new_job(store)
    store.admin.request_cancel(old)
    Notifier(store.outbox, NotificationsConfig()).tick()  # a daemon running without notifications
    later = new_job(store)
    store.admin.request_cancel(later)
    with WebhookReceiver() as hook:
        notifier = Notifier(store.outbox, webhook_config(hook.url), **FAST_BACKOFF)
        try:
            drain(notifier, lambda: hook.delivered())
            notifier.tick()
        finally:
            notifier.close()
        assert [body["job_id"] for body in hook.delivered()] == [str(later)]
    with store._db.session() as session:
        dropped = session.scalars(sa.select(JobEvent).where(JobEvent.job_id == old,
                                                             JobEvent.to_state == "cancelled")).one()
    assert dropped.notify_next_at is None and dropped.notified_at is None
    assert dropped.notify_error == "not sent: notifications are not configured"


def test_without_notifications_the_drop_is_said_once_at_info(store: JobStore) -> None:
    notifier = Notifier(store.outbox, NotificationsConfig())
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            store.admin.request_cancel(new_job(store))
            notifier.tick()
    said = [(line["log_level"], line["events"]) for line in logs if line["event"] == "notifications_dropped"]
    assert said == [("info", 1), ("debug", 1), ("debug", 1)]


def test_states_not_listed_in_on_are_not_sent(store: JobStore) -> None:
    cancelled = new_job(store)
    store.admin.request_cancel(cancelled)
    blocked = new_job(store)
    store.queue.block_owner("sim", "operator", "token rejected")  # parks the pending job: a `blocked` event
    assert store.admin.get(blocked).state is JobState.BLOCKED
    with WebhookReceiver() as hook:
        notifier = Notifier(store.outbox, webhook_config(hook.url, on=("blocked",)), **FAST_BACKOFF)
        try:
            drain(notifier, lambda: hook.delivered())
            notifier.tick()
        finally:
            notifier.close()
        [body] = hook.delivered()
    assert body["state"] == "blocked" and body["job_id"] == str(blocked) and body["reason"] == "token rejected"


def test_an_event_older_than_give_up_after_is_not_sent(store: JobStore) -> None:
    job = new_job(store)
    store.admin.request_cancel(job)
    later = utcnow() + dt.timedelta(hours=2)
    with WebhookReceiver() as hook:
        notifier = Notifier(store.outbox, webhook_config(hook.url, give_up_after=3600), clock=lambda: later)
        try:
            notifier.tick()
        finally:
            notifier.close()
        assert hook.all() == []
    [row] = outbox(store)
    assert row.notify_next_at is None and row.notify_error == "not sent: older than notifications.give_up_after"


def test_an_outcome_from_a_claim_that_was_taken_over_does_not_land(store: JobStore) -> None:
    job = new_job(store)
    store.admin.request_cancel(job)
    now = utcnow()
    [first] = store.outbox.claim_notifications(states=["cancelled"], limit=10, lease_seconds=1, now=now)
    later = now + dt.timedelta(seconds=2)  # the first claim's lease ran out; another notifier claims again
    [second] = store.outbox.claim_notifications(states=["cancelled"], limit=10, lease_seconds=30, now=later)
    assert second.event_id == first.event_id and second.attempt == first.attempt + 1
    assert not store.outbox.finish_notification(first.event_id, first.attempt, delivered={"webhook"}, done=True)
    assert store.outbox.finish_notification(second.event_id, second.attempt, delivered={"webhook"}, done=True)


# ------------------------------------------------------------------------------------------------------ e-mail


def test_email_is_sent_over_smtp_with_login(store: JobStore, tmp_path: Path) -> None:
    password_file = tmp_path / "smtp.password"
    password_file.write_text("smtp-pass-123\n")
    job = new_job(store, "my cohort")
    move(store, job, JobState.FAILED, reason="remote job failed: QC")
    with SmtpServer(credentials=("imputation", "smtp-pass-123")) as smtp:
        config = NotificationsConfig(email=EmailConfig(
            host="127.0.0.1", port=smtp.port, starttls=False, sender="imputationd@example.org",
            to=("lab@example.org", "pi@example.org"), username="imputation", password_file=password_file))
        notifier = Notifier(store.outbox, config, **FAST_BACKOFF)
        drain(notifier, lambda: smtp.received())
        notifier.tick()
        [message] = smtp.received()
        assert smtp.logins == ["imputation"]
        assert smtp.envelopes == [("imputationd@example.org", ["lab@example.org", "pi@example.org"])]
    assert message["Subject"] == "[imputationd] my cohort: failed on sim"
    [row] = outbox(store)
    assert message[EVENT_HEADER] == str(row.id)
    assert message["Message-ID"].strip() == f"<imputationd.event-{row.id}.{job}@example.org>"  # may be folded
    body = message.get_content()
    assert "remote job failed: QC" in body and f"imputationd show {job}" in body
    assert row.notified_via == "email"


def test_a_channel_that_delivered_is_not_sent_again_when_another_is_retried(store: JobStore) -> None:
    job = new_job(store)
    complete(store, job)
    with WebhookReceiver() as hook, SmtpServer(refuse_first=2) as smtp:
        config = NotificationsConfig(
            webhook=WebhookConfig(url=hook.url),
            email=EmailConfig(host="127.0.0.1", port=smtp.port, starttls=False, sender="d@example.org",
                              to=("lab@example.org",)))
        notifier = Notifier(store.outbox, config, **FAST_BACKOFF)
        try:
            drain(notifier, lambda: smtp.received())
            notifier.tick()
        finally:
            notifier.close()
        assert len(hook.all()) == 1 and len(smtp.received()) == 1
    [row] = outbox(store)
    assert row.notify_attempts == 3 and row.notified_via == "email,webhook"


def test_smtp_errors_become_notify_failed(tmp_path: Path) -> None:
    sender = EmailSender(EmailConfig(host="127.0.0.1", port=1, starttls=False, sender="a@b.c", to=("d@e.f",),
                                     timeout=2))
    with pytest.raises(NotifyFailed, match="SMTP 127.0.0.1:1"):
        sender.send({"event_id": 1, "job_id": str(uuid.uuid4()), "group_id": "g", "name": None, "service": "s",
                     "state": "failed", "from_state": None, "reason": None, "result_dir": None,
                     "finished_at": None, "at": "now"})


# ------------------------------------------------------------------------------------------ the whole daemon


def test_the_daemon_notifies_a_completed_job_once_across_a_restart(db_url: str, tmp_path: Path) -> None:
    token = "notify-token-" + "x" * 20
    with SimulatedCloudgene({token: "alice"}, timings=Timings(queue=0.1, run=0.1, export=0.1)) as sim, \
            WebhookReceiver(fail_first=1) as hook:
        config = daemon_config(tmp_path, db_url, base_url=sim.base_url, token=token,
                               notifications={"webhook": {"url": hook.url, "timeout": 5}})
        with running_daemon(config) as daemon:
            [job] = submit(config, daemon.store, Submission(services=["sim"], panel=PANEL, build="hg19",
                                                            files=[sample_vcf(tmp_path)], name="cohort"))
            wait_until(lambda: hook.delivered(), 60, message=lambda: f"no webhook; got {hook.all()}")
            assert daemon.store.admin.get(job.id).state is JobState.COMPLETED
        with running_daemon(config) as daemon:  # a restart: the outbox says the event is done
            started = time.monotonic()
            wait_until(lambda: daemon._last_tick.get("notify", 0.0) > started, 10)
        [body] = hook.delivered()
        assert body["job_id"] == str(job.id) and body["state"] == "completed" and body["name"] == "cohort"
        assert body["result_dir"] and body["finished_at"]
        assert body["qc"]["reference_overlap"] == 100.0 and body["qc"]["matched"] > 0  # the server's QC figures
        assert [status for status, _, _ in hook.all()] == [500, 204]  # one failure, one delivery, nothing after


def test_results_retiring_before_their_download_are_warned_of_once_whatever_notifications_on_says(
        db_url: str, tmp_path: Path) -> None:
    """Cloudgene deletes a finished job's results at `deletedOn` (7 days here). With a retirement_warning longer
    than that, the job is warned of, once: a history line, a webhook of kind "warning" (only failures are listed in
    `on`), and it still completes."""
    token = "notify-token-" + "x" * 20
    with SimulatedCloudgene({token: "alice"}, timings=Timings(queue=0.1, run=0.1, export=0.1)) as sim, \
            WebhookReceiver() as hook:
        config = daemon_config(tmp_path, db_url, base_url=sim.base_url, token=token,
                               notifications={"webhook": {"url": hook.url, "timeout": 5}, "on": ["failed"]})
        service = dataclasses.replace(config.services["sim"], retirement_warning=8 * 86400.0)
        config = dataclasses.replace(config, services={"sim": service})
        with running_daemon(config) as daemon:
            [job] = submit(config, daemon.store, Submission(services=["sim"], panel=PANEL, build="hg19",
                                                            files=[sample_vcf(tmp_path)], name="cohort"))
            wait_until(lambda: hook.delivered(), 60, message=lambda: f"no webhook; got {hook.all()}")
            wait_until(lambda: daemon.store.admin.get(job.id).state is JobState.COMPLETED, 60)
            job = daemon.store.admin.get(job.id, with_events=True)
        [body] = hook.delivered()
    assert body["kind"] == "warning" and body["job_id"] == str(job.id)
    assert body["reason"].startswith("the server deletes this job's results at ")
    assert body["reason"].endswith(" and they are not downloaded yet")
    warnings = [e for e in job.events if e.from_state == e.to_state]
    assert [e.reason for e in warnings] == [body["reason"]]
    assert job.retires_at is not None and job.retirement_warned_at is not None


# ------------------------------------------------------------------------------------------ hostile values


def both_channels(hook: WebhookReceiver, smtp: SmtpServer) -> NotificationsConfig:
    return NotificationsConfig(webhook=WebhookConfig(url=hook.url, timeout=5.0),
                               email=EmailConfig(host="127.0.0.1", port=smtp.port, starttls=False,
                                                 sender="d@example.org", to=("lab@example.org",), timeout=5.0))


def test_a_name_with_line_breaks_reaches_no_header_raw_and_stops_nothing(store: JobStore) -> None:
    """A name stored by another inserter (the CLI refuses it): each channel sends each event once, and the line
    break can neither add a header nor end the headers."""
    hostile = "cohort\r\nBcc: victim@example.org\n\nfake body\x1b[31m\u2028end"
    first, bad, last = new_job(store, "before"), new_job(store, hostile), new_job(store, "after")
    for job in (first, bad, last):
        store.admin.request_cancel(job)
    with WebhookReceiver() as hook, SmtpServer() as smtp:
        notifier = Notifier(store.outbox, both_channels(hook, smtp), **FAST_BACKOFF)
        try:
            drain(notifier, lambda: len(smtp.received()) == 3 and len(hook.delivered()) == 3)
            for _ in range(3):
                notifier.tick()
        finally:
            notifier.close()
        bodies = hook.delivered()
        mails = smtp.received()
    assert Counter(body["job_id"] for body in bodies) == Counter(map(str, (first, bad, last)))
    assert next(body for body in bodies if body["job_id"] == str(bad))["name"] == hostile  # JSON escapes it
    assert len(mails) == 3 and all(mail["Bcc"] is None for mail in mails)
    [mail] = [m for m in mails if str(bad) in m.get_content()]
    subject = str(mail["Subject"])
    assert "\n" not in subject and "\r" not in subject and "\x1b" not in subject
    assert "cohort\\x0d\\x0aBcc: victim@example.org" in subject  # shown, escaped
    assert "\x1b" not in mail.get_content() and "\u2028" not in mail.get_content()
    assert "fake body" in mail.get_content()
    rows = outbox(store)
    assert all(r.notify_next_at is None and r.notify_error is None for r in rows)
    assert {r.notified_via for r in rows} == {"email,webhook"}


class ExplodingSender:
    """A channel with a bug that only one event's values trigger (something that is not a NotifyFailed)."""

    name = "exploding"

    def __init__(self, store: JobStore, victim: str) -> None:
        self.store, self.victim = store, victim
        self.sent: list[str] = []
        self.seen_delivered: list[str | None] = []

    def send(self, message) -> None:
        if message["name"] == self.victim:
            # What the outbox holds while this channel runs: the webhook's delivery is recorded already.
            [row] = [r for r in outbox(self.store) if r.id == message["event_id"]]
            self.seen_delivered.append(row.notified_via)
            raise KeyError("a bug in a channel")
        self.sent.append(message["name"])

    def close(self) -> None:
        pass


def test_a_channel_raising_for_one_event_stops_no_other_and_sends_nothing_twice(store: JobStore) -> None:
    jobs = [new_job(store, name) for name in ("a", "victim", "c", "d")]
    for job in jobs:
        store.admin.request_cancel(job)
    with WebhookReceiver() as hook:
        webhook = WebhookSender(WebhookConfig(url=hook.url, timeout=5.0))
        exploding = ExplodingSender(store, "victim")
        notifier = Notifier(store.outbox, webhook_config(hook.url), senders=[webhook, exploding], **FAST_BACKOFF)
        try:
            drain(notifier, lambda: len(exploding.seen_delivered) >= 3 and len(exploding.sent) == 3)
        finally:
            notifier.close()
        bodies = hook.delivered()
    assert sorted(body["name"] for body in bodies) == ["a", "c", "d", "victim"]  # once each, over every retry
    assert sorted(exploding.sent) == ["a", "c", "d"]
    assert set(exploding.seen_delivered) == {"webhook"}
    victim = next(r for r in outbox(store) if r.job_id == jobs[1])
    assert victim.notified_via == "webhook" and victim.notify_next_at is not None  # retried later, with backoff
    assert victim.notify_error == "exploding: KeyError (a bug in imputationd; see the log)"
    others = [r for r in outbox(store) if r.job_id != jobs[1]]
    assert all(r.notify_next_at is None and r.notified_via == "exploding,webhook" for r in others)


def test_a_failing_channel_is_tried_once_per_tick_while_the_other_serves_the_whole_batch(store: JobStore) -> None:
    jobs = [new_job(store, f"j{i}") for i in range(4)]
    for job in jobs:
        store.admin.request_cancel(job)
    with WebhookReceiver(status=503) as hook, SmtpServer() as smtp:
        notifier = Notifier(store.outbox, both_channels(hook, smtp), backoff_initial=60, backoff_max=60)
        try:
            assert notifier.tick() == 0
        finally:
            notifier.close()
        assert len(hook.all()) == 1  # not once per event: its timeout would be waited out each time
        assert len(smtp.received()) == 4
    rows = outbox(store)
    assert all(r.notified_via == "email" and r.notify_error == "webhook: HTTP 503" for r in rows)
    *untried, tried = sorted(rows, key=lambda r: r.notify_next_at)
    assert all(r.notify_next_at <= tried.notify_next_at - dt.timedelta(seconds=20) for r in untried)  # due again
