"""The one backoff policy and the replica-wide request-rate ceiling.

Time and randomness are injected, so both are tested without sleeping.
"""

from __future__ import annotations

import asyncio
import math
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
    """At most ``rate`` acquisitions in any one second, and no bursts.

    A token bucket, served in order (a FIFO lock): it holds at most ``depth`` tokens,
    2% of a second's worth (at least one), and refills at ``rate + 1 - depth`` per
    second, so that any window of ``w`` seconds lets at most ``depth + refill * w``
    callers go: ``rate + 1`` in one second, and never more than ``depth`` at once.
    At low rates (depth 1) callers are simply spaced one interval apart. The few
    tokens of depth absorb the event loop waking a caller late, which would
    otherwise be lost for good: without them a busy loop's timer lateness (about
    a millisecond) costs a quarter of a 300/s ceiling. Idle time banks no more
    than ``depth``. ``pause_until`` holds every caller back until then (a 429's
    Retry-After applies to the whole API key, not to one batch), after which they
    go one interval apart.
    """

    def __init__(self, rate: float, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.interval = 1.0 / rate
        self.depth = max(1.0, float(math.floor(rate * 0.02)))
        self._refill = rate + 1.0 - self.depth
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.depth  # in the bucket at time self._at
        self._at = -math.inf
        self._turn = asyncio.Lock()

    def pause_until(self, when: float) -> None:
        if when > self._at:
            self._at, self._tokens = when, 1.0

    def _level(self, now: float) -> float:
        if self._at == -math.inf:
            return self._tokens
        return min(self.depth, self._tokens + max(0.0, now - self._at) * self._refill)

    async def acquire(self) -> None:
        async with self._turn:
            now = self._clock()
            while True:
                level = self._level(now)
                if now >= self._at and level >= 1.0 - 1e-9:  # float rounding of the refill
                    self._tokens, self._at = max(0.0, level - 1.0), now
                    return
                # not before the bucket's own time (a pause), then until a token is in
                ready = max(now, self._at) + max(0.0, 1.0 - level) / self._refill
                await self._sleep(ready - now)
                now = max(self._clock(), ready)  # a sleep may end early, never count it so
