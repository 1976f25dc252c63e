"""How long to wait before trying a failed step again."""

from __future__ import annotations

import random


def backoff_delay(
    failures: int,
    *,
    initial: float,
    maximum: float,
    retry_after: float | None = None,
    rand: random.Random | None = None,
) -> float:
    """Exponential backoff with "equal jitter": between half and all of `initial * 2**(failures-1)`, capped.

    The jitter keeps jobs that failed together (a 502 burst hits every poll) from retrying together. A server's
    Retry-After is a floor, never shortened by the jitter, and is itself capped at `maximum`."""
    uniform = rand.uniform if rand is not None else random.uniform
    step = min(maximum, initial * (2.0 ** max(0, failures - 1)))
    delay = step / 2 + uniform(0, step / 2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, maximum))
    return delay


def jittered(interval: float, spread: float = 0.1, rand: random.Random | None = None) -> float:
    """`interval` ± `spread`, so that polls of jobs submitted together drift apart."""
    uniform = rand.uniform if rand is not None else random.uniform
    return interval * (1 + uniform(-spread, spread))
