"""The one backoff policy and the replica-wide request-rate ceiling.

Time and randomness are injected, so both are tested without sleeping.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


def backoff_delay(failures: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: between half and all of min(cap, base * 2**(failures-1))."""
    if failures <= 0:
        return 0.0
    ceiling = min(cap, base * float(2 ** min(failures - 1, 30)))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


class RateLimiter:
    """At most ``rate`` acquisitions per second, evenly spaced: no bursts.

    Each caller reserves the next free slot, so waiting callers are served in
    order and the ceiling holds however many batches are due at once.
    ``pause_until`` holds every caller back (a 429's Retry-After applies to
    the whole API key, not to one batch).
    """

    def __init__(self, rate: float, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.interval = 1.0 / rate
        self._clock = clock
        self._sleep = sleep
        self._next = 0.0

    def pause_until(self, when: float) -> None:
        self._next = max(self._next, when)

    async def acquire(self) -> None:
        now = self._clock()
        slot = max(now, self._next)
        self._next = slot + self.interval
        if slot > now:
            await self._sleep(slot - now)
