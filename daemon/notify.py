"""Notifications: a webhook POST and/or an e-mail when a job reaches a state listed in `notifications.on`.

Exactly one notification per state change, whatever the restarts and however many daemons share the database, by an
outbox on `job_events` (schema 0002):

- The store writes every event into a terminal state (completed, failed, cancelled) or `blocked` with
  `notify_next_at = at`, in the transaction that changes the job: a state change and its pending notification exist
  together or not at all. A warning (an event that changes no state: results about to be deleted before they are
  downloaded) is written the same way and sent whatever `notifications.on` lists.
- The `notify` tick claims due rows (`NotificationOutbox.claim_notifications`: `FOR UPDATE SKIP LOCKED` on
  PostgreSQL, the `BEGIN IMMEDIATE` write lock on SQLite), which pushes their `notify_next_at` a lease ahead and
  counts an attempt;
  sends; then records the outcome only if that claim is still the latest (`notify_attempts` is the fencing token).
  A failure is retried with backoff (`scheduler.backoff_initial` doubling up to `scheduler.backoff_max`); a channel
  that delivered is recorded at once (`notified_via`) and not sent again when another channel is retried.
- Each (event, channel) delivery stands alone: a channel that raises for one event's values (a bug) fails that one
  delivery, and a channel that fails (`NotifyFailed`: its receiver is down) is not tried again for the rest of the
  tick, while the other channels go on with the whole batch.
- What the outbox cannot rule out is a crash between a successful send and the write that records it: that one
  notification is sent again after the lease. The webhook carries the event id in `X-Imputationd-Event` (and the
  e-mail a Message-ID made from it) so the receiver can drop the duplicate.

No flood of old events: rows written before schema 0002 never enter the outbox; a daemon running without
notifications configured drops due rows at each tick ("not sent: notifications are not configured"), so turning
notifications on later sends nothing from the past; and a row older than `give_up_after` (default one day) is never
sent, only marked. Every daemon sharing one database should therefore carry the same `notifications` section.

`blocked` (optional in `on`) sends one notification per job parked, each naming the service and the reason.
"""

from __future__ import annotations

import datetime as dt
import json
import smtplib
import ssl
from collections.abc import Callable, Mapping, Sequence
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Any, Protocol

import structlog

from daemon import __version__
from daemon.backoff import backoff_delay
from daemon.config import EmailConfig, NotificationsConfig, WebhookConfig
from daemon.db.models import utcnow
from daemon.db.outbox import NotificationOutbox, PendingNotification
from daemon.headers import EVENT_HEADER, HeadersFileError, parse_headers_file
from daemon.logging import register_secret
from daemon.metrics import NO_METRICS, Metrics
from daemon.services.deadlines import Budget
from daemon.services.errors import Transient
from daemon.services.http import make_client, send
from daemon.text import printable, qc_summary

log = structlog.get_logger("daemon.notify")

#: Outbox rows one tick claims.
BATCH = 50
#: Seconds a claim outlives the sends it covers.
LEASE_MARGIN = 60.0
#: Most characters of a job's name in an e-mail subject.
SUBJECT_NAME_LIMIT = 100


class NotifyFailed(Exception):
    """One channel could not deliver one notification; the message never holds the URL or a credential."""


def read_headers_file(path: Path) -> dict[str, str]:
    """`daemon.headers.parse_headers_file`, each value registered with the log redaction: they are secrets
    (Authorization), never part of an error message."""
    headers = parse_headers_file(path)
    for value in headers.values():
        register_secret(value)
    return headers


def payload(item: PendingNotification) -> dict[str, Any]:
    """The notification as JSON-ready data: the webhook body, and the facts of the e-mail."""
    return {
        "event_id": item.event_id,
        # A warning changes no state (the job is still in `state`): results about to be deleted, say.
        "kind": "warning" if item.from_state == item.state else "state_change",
        "job_id": str(item.job_id),
        "group_id": str(item.group_id),
        "name": item.name,
        "service": item.service,
        "owner": item.owner,
        "state": item.state,
        "from_state": item.from_state,
        "reason": item.reason,
        "result_dir": item.result_dir,
        "finished_at": item.finished_at.isoformat() if item.finished_at else None,
        "at": item.at.isoformat(),
        "qc": item.qc,
    }


class Sender(Protocol):
    name: str

    def send(self, message: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class WebhookSender:
    """POST the payload as JSON; any 2xx is delivered, anything else (redirects included) a failure to retry."""
    name = "webhook"

    def __init__(self, config: WebhookConfig) -> None:
        self._url = config.url
        self._headers_file = config.headers_file
        register_secret(config.url)  # chat webhooks put their credential in the path
        self._timeout = config.timeout
        # The answer is capped and the whole call has a deadline, as every API call's: a receiver that drips or
        # never ends would otherwise hold the notify tick past the claim, and the event would be sent again.
        self._client = make_client("", timeout=config.timeout, max_connections=1, follow_redirects=False,
                                   trust_env=False)

    def send(self, message: Mapping[str, Any]) -> None:
        extra: dict[str, str] = {}
        if self._headers_file is not None:
            # Read at every send: a fixed or rotated file works without a reload; a broken one fails the channel.
            try:
                extra = read_headers_file(self._headers_file)
            except HeadersFileError as exc:
                raise NotifyFailed(f"headers_file: {exc}") from None
        headers = {
            **extra,
            "Content-Type": "application/json",
            "User-Agent": f"imputationd/{__version__}",
            EVENT_HEADER: str(message["event_id"]),
        }
        body = json.dumps(message).encode("utf-8")
        try:
            response = send(self._client, "POST", self._url, call="webhook POST", budget=Budget.api(self._timeout),
                            content=body, headers=headers)
        except Transient as exc:
            raise NotifyFailed(str(exc)) from None
        if not 200 <= response.status_code < 300:
            raise NotifyFailed(f"HTTP {response.status_code}")

    def close(self) -> None:
        self._client.close()


class EmailSender:
    """One message per notification over SMTP (STARTTLS and login as configured)."""
    name = "email"

    def __init__(self, config: EmailConfig) -> None:
        self._config = config

    def send(self, message: Mapping[str, Any]) -> None:
        config = self._config
        password = None
        if config.username is not None:
            try:
                password = config.read_password()
            except OSError as exc:
                raise NotifyFailed(f"cannot read the SMTP password file: {exc.strerror or exc}") from None
            if not password:
                raise NotifyFailed("the SMTP password is empty or not set")
            register_secret(password)
        mail = _email_message(config, message)
        try:
            with smtplib.SMTP(config.host, config.port, timeout=config.timeout) as smtp:
                smtp.ehlo()
                if config.starttls:
                    smtp.starttls(context=ssl.create_default_context())
                    smtp.ehlo()
                if config.username is not None and password is not None:
                    smtp.login(config.username, password)
                smtp.send_message(mail)
        except smtplib.SMTPException as exc:
            raise NotifyFailed(f"SMTP: {type(exc).__name__}: {exc}") from None
        except (OSError, ssl.SSLError) as exc:
            raise NotifyFailed(f"SMTP {config.host}:{config.port}: {exc.strerror or exc}") from None

    def close(self) -> None:
        pass


def _email_message(config: EmailConfig, message: Mapping[str, Any]) -> EmailMessage:
    """The e-mail of one notification. The job's name and the reason come from users and servers: they are shown
    with every line break and control character escaped (`printable`), so no value can end a header, add one, or
    reach a reader's terminal as an escape sequence; the `email` package folds and encodes what is left."""
    name = printable(message["name"], limit=None) if message["name"] else None
    reason = printable(message["reason"], limit=None) if message["reason"] else None
    label = printable(message["name"], limit=SUBJECT_NAME_LIMIT) if message["name"] else message["job_id"][:8]
    mail = EmailMessage()
    warning = message.get("kind") == "warning"
    what = f"WARNING, still {message['state']}" if warning else message["state"]
    mail["Subject"] = f"[imputationd] {label}: {what} on {message['service']}"
    mail["From"] = config.sender
    mail["To"] = ", ".join(config.to)
    mail["Date"] = formatdate(localtime=False)
    domain = config.sender.rpartition("@")[2] or "imputationd"
    # Derived from the event, so a notification sent twice (crash window) is recognisably the same message.
    mail["Message-ID"] = f"<imputationd.event-{message['event_id']}.{message['job_id']}@{domain}>"
    mail[EVENT_HEADER] = str(message["event_id"])
    lines = [
        f"Job {message['job_id']} ({name or 'no name'}) on {message['service']} needs attention (it is "
        f"{message['state']})." if warning else
        f"Job {message['job_id']} ({name or 'no name'}) on {message['service']} is now {message['state']}"
        + (f" (was {message['from_state']})." if message["from_state"] else "."),
        "",
        f"reason:      {reason or '-'}",
        f"group:       {message['group_id']}",
        f"result dir:  {message['result_dir'] or '-'}",
        f"finished at: {message['finished_at'] or '-'}",
        f"qc:          {printable(qc_summary(message.get('qc')), limit=None)}",
        f"event:       {message['event_id']} at {message['at']}",
        "",
        f"imputationd show {message['job_id']}",
    ]
    mail.set_content("\n".join(lines) + "\n")
    return mail


def build_senders(config: NotificationsConfig) -> list[Sender]:
    senders: list[Sender] = []
    if config.webhook is not None:
        senders.append(WebhookSender(config.webhook))
    if config.email is not None:
        senders.append(EmailSender(config.email))
    return senders


class Notifier:
    """The notify tick: drain what is not wanted, claim what is due, send, record."""
    def __init__(
        self,
        outbox: NotificationOutbox,
        config: NotificationsConfig,
        *,
        backoff_initial: float = 10.0,
        backoff_max: float = 900.0,
        metrics: Metrics = NO_METRICS,
        senders: Sequence[Sender] | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.outbox = outbox
        self.config = config
        self.metrics = metrics
        self._backoff = (backoff_initial, backoff_max)
        self._senders = list(senders) if senders is not None else build_senders(config)
        self._clock = clock
        timeouts = (config.webhook.timeout if config.webhook else 0) + (config.email.timeout if config.email else 0)
        self._lease = timeouts + LEASE_MARGIN
        self._said_dropped = False

    def close(self) -> None:
        for sender in self._senders:
            sender.close()

    @property
    def sends(self) -> bool:
        """Whether notifications go out at all (when not, the tick only clears the outbox, which can wait)."""
        return self.config.enabled and bool(self._senders)

    def tick(self) -> int:
        """One pass; returns how many notifications were completed (every channel delivered)."""
        if not self.sends:
            dropped = self.outbox.drop_notifications("not sent: notifications are not configured")
            if dropped:
                # Once at info: with notifications off every job's end is dropped, a line per job says nothing new.
                say = log.debug if self._said_dropped else log.info
                say("notifications_dropped", events=dropped, reason="notifications are not configured")
                self._said_dropped = True
            return 0
        self.outbox.drop_notifications("not sent: state not in notifications.on", keep_states=self.config.on)
        batch = self.outbox.claim_notifications(states=self.config.on, limit=BATCH, lease_seconds=self._lease)
        failing: dict[str, str] = {}
        return sum(self._deliver(item, failing) for item in batch)

    def _deliver(self, item: PendingNotification, failing: dict[str, str]) -> bool:
        """Send one claimed notification on every channel that has not delivered it yet; True when all have.

        `failing` maps the channels that failed earlier in this tick to why: they are not tried again until the next
        tick (instead of waiting out their timeout once per event), and a channel that fails here is added."""
        now = self._clock()
        context = {"event_id": item.event_id, "job_id": str(item.job_id), "service": item.service,
                   "state": item.state}
        if now - item.at > dt.timedelta(seconds=self.config.give_up_after):
            # Never tried (written while no daemon ran), or its retries outlived the limit: either way, too late.
            self.outbox.finish_notification(item.event_id, item.attempt, delivered=item.notified_via, done=True,
                                           error="not sent: older than notifications.give_up_after")
            log.warning("notification_skipped", reason="event older than notifications.give_up_after",
                        attempt=item.attempt, error_kind="notification", **context)
            return True
        message = payload(item)
        delivered = set(item.notified_via)
        errors = []
        tried = False  # a channel failed on this event (back off); else some only went untried (due again now)
        for sender in self._senders:
            if sender.name in delivered:
                continue
            if sender.name in failing:
                errors.append(f"{sender.name}: {failing[sender.name]}")
                continue
            try:
                sender.send(message)
            except NotifyFailed as exc:
                tried = True
                failing[sender.name] = str(exc)
                errors.append(f"{sender.name}: {exc}")
                self.metrics.notification(sender.name, "failed")
                continue
            except Exception as exc:
                # A bug that this event's values trigger: it fails this one delivery, never the tick or the batch.
                tried = True
                log.exception("notification_crashed", channel=sender.name, attempt=item.attempt,
                              error_kind="internal", **context)
                errors.append(f"{sender.name}: {type(exc).__name__} (a bug in imputationd; see the log)")
                self.metrics.notification(sender.name, "failed")
                continue
            delivered.add(sender.name)
            self.outbox.note_notification_delivered(item.event_id, item.attempt, delivered)
            self.metrics.notification(sender.name, "sent")
            log.info("notification_sent", channel=sender.name, attempt=item.attempt, **context)
        if not errors:
            self.outbox.finish_notification(item.event_id, item.attempt, delivered=delivered, done=True)
            return True
        error = "; ".join(errors)
        if now - item.at >= dt.timedelta(seconds=self.config.give_up_after):
            self.outbox.finish_notification(item.event_id, item.attempt, delivered=delivered, done=True,
                                           error=f"gave up after {item.attempt} attempts: {error}")
            log.error("notification_given_up", reason=error, attempts=item.attempt, error_kind="notification",
                      **context)
            return False
        initial, maximum = self._backoff
        delay = backoff_delay(item.attempt, initial=initial, maximum=maximum) if tried else 0.0
        self.outbox.finish_notification(item.event_id, item.attempt, delivered=delivered, done=False, error=error,
                                       retry_at=now + dt.timedelta(seconds=delay))
        if tried:
            level = log.warning if item.attempt == 1 else log.debug
            level("notification_failed_will_retry", reason=error, attempt=item.attempt, retry_in=round(delay, 1),
                  error_kind="notification", **context)
        return False


__all__ = [
    "EVENT_HEADER",
    "EmailSender",
    "HeadersFileError",
    "NotifyFailed",
    "Notifier",
    "WebhookSender",
    "build_senders",
    "payload",
    "read_headers_file",
]
