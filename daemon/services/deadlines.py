"""How long one HTTP call may take in all, enforced at the socket.

httpx's timeouts bound each read and write, not a call: a server that sends one byte a second never trips a 30 s
read timeout and held a pool worker for as long as it liked. A `Budget` says when a call must be over; while it is
active (`active(budget)`, a context variable of the calling thread) every socket operation of the service clients
(`install`) is given at most the time left, and one that starts after the budget ran out fails at once as a
timeout, which `http.transport_errors` turns into `Transient(kind="timeout")` naming the rule that ended the call.

The rules (see `Budget`'s constructors):

- An API call (JSON answers of a few KiB): a fixed deadline, `API_DEADLINE_FACTOR` times the service's `timeout`
  (one timeout to wait for the answer to begin, one more for the rest of it).
- A download: no fixed deadline, since a 30 GB result file on a slow link legitimately takes hours and its size is
  rarely known up front (Cloudgene gives only a rounded human size). Instead it must keep moving: every
  `TRANSFER_WINDOW` seconds at least `MIN_TRANSFER_RATE` bytes a second on average. A 1 B/s drip ends within one
  window; any transfer a person would wait for passes with a factor of hundreds to spare; and silence is already
  ended by the per-read timeout.
- An upload whose server answers only when it has processed it (Cloudgene's submit): the body goes under the
  transfer rule; once it is sent, the answer must begin within `answer_wait` and, once begun, arrive within
  `answer_time` — a server that copies the upload for 20 minutes in silence is normal, one that drips its answer
  is not.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterable, Iterator
from typing import Any

import httpcore
import httpx

#: An API call may take this many times the service's `timeout` in all.
API_DEADLINE_FACTOR = 2.0
#: A transfer (download, upload body) must move MIN_TRANSFER_RATE bytes/s on average over every TRANSFER_WINDOW s.
MIN_TRANSFER_RATE = 1024
TRANSFER_WINDOW = 60.0

_current: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("imputationd_http_budget", default=None)


class Budget:
    """The time one call has left; fresh for every call (it counts what the call has moved)."""

    def __init__(
        self,
        *,
        seconds: float | None = None,
        min_rate: float | None = None,
        answer_wait: float | None = None,
        answer_time: float | None = None,
    ) -> None:
        now = time.monotonic()
        self._ends = None if seconds is None else now + seconds
        self._seconds = seconds
        self._min_rate = min_rate
        self._window_start = now
        self._window_bytes = 0
        self._answer_wait = answer_wait
        self._answer_time = answer_time
        #: Phases of an upload: sending the body, waiting for the answer, receiving it.
        self._phase = "sending" if answer_wait is not None else None
        #: Why the budget ended the call, once it has.
        self.reason: str | None = None

    @classmethod
    def api(cls, timeout: float) -> Budget:
        """An API call of a service whose per-read `timeout` is this."""
        return cls(seconds=API_DEADLINE_FACTOR * timeout)

    @classmethod
    def transfer(cls) -> Budget:
        """A download: no deadline, a minimum rate."""
        return cls(min_rate=MIN_TRANSFER_RATE)

    @classmethod
    def upload(cls, *, answer_wait: float, answer_time: float) -> Budget:
        """A request body under the transfer rule, then an answer that may be slow to begin but not to arrive."""
        return cls(min_rate=MIN_TRANSFER_RATE, answer_wait=answer_wait, answer_time=answer_time)

    def before(self, timeout: float | None, *, reading: bool) -> float | None:
        """The timeout for the next socket operation; raises the timeout that ends the call when nothing is left."""
        now = time.monotonic()
        if reading and self._phase == "sending":  # httpcore reads only once the whole request is sent
            self._phase, self._min_rate = "waiting", None
            assert self._answer_wait is not None
            self._ends, self._seconds = now + self._answer_wait, self._answer_wait
        if self._ends is not None:
            left = self._ends - now
            if left <= 0:
                self._end(self._deadline_reason(), reading)
            timeout = left if timeout is None else min(timeout, left)
        if self._min_rate is not None and now - self._window_start >= TRANSFER_WINDOW:
            if self._window_bytes < self._min_rate * TRANSFER_WINDOW:
                self._end(
                    f"slower than {self._min_rate:g} bytes/s ({self._window_bytes} bytes in the last "
                    f"{TRANSFER_WINDOW:g} s)",
                    reading,
                )
            self._window_start, self._window_bytes = now, 0
        return timeout

    def after(self, moved: int, *, reading: bool) -> None:
        """Count what one operation moved."""
        self._window_bytes += moved
        if reading and moved and self._phase == "waiting":
            self._phase = "answering"
            assert self._answer_time is not None and self._ends is not None
            self._ends = min(self._ends, time.monotonic() + self._answer_time)
            self._seconds = self._answer_time

    def timed_out(self) -> None:
        """A socket operation timed out: note it if that was because the budget ran out."""
        if self._ends is not None and time.monotonic() >= self._ends and self.reason is None:
            self.reason = self._deadline_reason()

    def _deadline_reason(self) -> str:
        if self._phase == "waiting":
            return f"no answer began within {self._seconds:g} s of the upload's end"
        if self._phase == "answering":
            return f"the answer did not arrive within {self._seconds:g} s of its start"
        return f"not complete within its deadline of {self._seconds:g} s"

    def _end(self, reason: str, reading: bool) -> None:
        self.reason = reason
        raise (httpcore.ReadTimeout if reading else httpcore.WriteTimeout)(reason)


def current() -> Budget | None:
    """The budget of the call the calling thread is making, if any."""
    return _current.get()


@contextlib.contextmanager
def active(budget: Budget) -> Iterator[Budget]:
    """Apply `budget` to every socket operation the calling thread makes inside the block."""
    token = _current.set(budget)
    try:
        yield budget
    finally:
        _current.reset(token)


class _Stream(httpcore.NetworkStream):
    """A connection whose reads and writes obey the calling thread's budget (none: as they are)."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        budget = _current.get()
        if budget is None:
            return self._inner.read(max_bytes, timeout)
        try:
            data = self._inner.read(max_bytes, budget.before(timeout, reading=True))
        except httpcore.TimeoutException:
            budget.timed_out()
            raise
        budget.after(len(data), reading=True)
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        budget = _current.get()
        if budget is None:
            self._inner.write(buffer, timeout)
            return
        try:
            self._inner.write(buffer, budget.before(timeout, reading=False))
        except httpcore.TimeoutException:
            budget.timed_out()
            raise
        budget.after(len(buffer), reading=False)

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        budget = _current.get()
        if budget is not None:
            # Part of connecting, before the request is sent: not the read that starts an upload's answer.
            timeout = budget.before(timeout, reading=False)
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    """httpcore's network backend, handing out `_Stream`s."""

    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        budget = _current.get()
        if budget is not None:
            timeout = budget.before(timeout, reading=False)
        return _Stream(self._inner.connect_tcp(host, port, timeout, local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _Stream(self._inner.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def install(transports: Iterable[Any]) -> None:
    """Make the connection pools of these httpx transports (a client's own and its proxies') obey budgets.

    httpx does not let a caller choose httpcore's network backend, so this sets the pool's; a transport without
    the attribute (httpx changed) is an error here rather than a silently unbounded client."""
    for transport in transports:
        if not isinstance(transport, httpx.HTTPTransport):
            continue  # a mock transport in tests: nothing reaches a socket
        pool = transport._pool  # noqa: SLF001 - see the docstring
        backend = pool._network_backend  # noqa: SLF001
        if not isinstance(backend, _Backend):
            pool._network_backend = _Backend(backend)  # noqa: SLF001


__all__ = ["API_DEADLINE_FACTOR", "MIN_TRANSFER_RATE", "TRANSFER_WINDOW", "Budget", "active", "current", "install"]
