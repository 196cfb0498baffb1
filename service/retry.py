"""The one retry loop for a request to the API, used by the poller's client and the export.

Bounded attempts; exponential backoff with jitter (``pacing.backoff_delay``) on 5xx,
timeouts and connection errors; a 429, and a 503 that sends one, waits at least its
``Retry-After``, unless that is longer than the caller is willing to wait inline (which
ends the retries). Anything else propagates at once.

The decision is a plain function of plain values (:meth:`RetryPolicy.next_delay`);
:func:`retrying` is the thin loop around one attempt. Randomness and sleep are injected,
so both are tested without sleeping.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from service.config import RightfootConfig
from service.errors import ApiError, ApiRateLimited, ApiServerError, ApiTransportError
from service.pacing import Sleep, backoff_delay

T = TypeVar("T")

#: Failures worth another attempt: 5xx, 429, timeouts and connection errors.
RETRYABLE: tuple[type[ApiError], ...] = (ApiServerError, ApiTransportError, ApiRateLimited)

#: ``on_retry(error, failures, delay_s)``: called before each wait (logging, metrics).
OnRetry = Callable[[ApiError, int, float], None]
#: ``give_up(error, reason)``: the exception to raise instead of the last error.
OnGiveUp = Callable[[ApiError, str], BaseException]


def retry_after(exc: ApiError) -> float | None:
    """The Retry-After that ``exc`` asks to honour: a 429's, or a 503's (RFC 9110 gives
    Retry-After to both: a 503 saying how long it will be unavailable). Another 5xx's is
    not one (the backoff applies, as the contract says of 5xx)."""
    if isinstance(exc, ApiRateLimited) or (isinstance(exc, ApiServerError) and exc.status == 503):
        return exc.retry_after
    return None


def transient(exc: ApiError) -> bool:
    """The default classification: retry 5xx, 429, timeouts and connection errors."""
    return isinstance(exc, RETRYABLE)


@dataclass(frozen=True, slots=True)
class GiveUp:
    """No further attempt; ``reason`` says why, for the caller's message."""

    reason: str


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many attempts one request may make, and how long to wait between them."""

    max_attempts: int
    backoff_base_s: float
    backoff_max_s: float
    #: A 429 asking for a longer wait than this ends the retries.
    max_retry_after_s: float
    #: What sets ``max_retry_after_s``, named when a Retry-After is longer (a setting).
    max_retry_after_name: str | None = None

    @classmethod
    def from_config(
        cls,
        cfg: RightfootConfig,
        *,
        max_retry_after_s: float,
        max_retry_after_name: str | None = None,
    ) -> RetryPolicy:
        return cls(
            max_attempts=cfg.max_attempts,
            backoff_base_s=cfg.backoff_base_s,
            backoff_max_s=cfg.backoff_max_s,
            max_retry_after_s=max_retry_after_s,
            max_retry_after_name=max_retry_after_name,
        )

    def next_delay(self, failures: int, exc: ApiError, rng: random.Random) -> float | GiveUp:
        """The wait before the next attempt, after ``failures`` failed ones (the last: ``exc``).

        Backoff with jitter, at most ``backoff_max_s``; for a 429, or a 503 that sent a
        Retry-After, at least its Retry-After (a 429 without one: the backoff), which may be
        longer than ``backoff_max_s`` but not than ``max_retry_after_s``: a longer one ends
        the retries.
        """
        if failures >= self.max_attempts:
            return GiveUp(f"gave up after {failures} attempts")
        delay = backoff_delay(failures, self.backoff_base_s, self.backoff_max_s, rng)
        wait = retry_after(exc)
        if isinstance(exc, ApiRateLimited) and wait is None:
            wait = delay
        if wait is not None:
            if wait > self.max_retry_after_s:
                return GiveUp(self._too_long(wait))
            delay = max(delay, wait)
        return delay

    def _too_long(self, wait: float) -> str:
        limit = f"{self.max_retry_after_s:g} s"
        if self.max_retry_after_name is not None:
            limit = f"{self.max_retry_after_name}, {limit}"
        return f"Retry-After of {math.ceil(wait)} s is too long: over {limit}"


async def retrying(
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    rng: random.Random,
    sleep: Sleep = asyncio.sleep,
    retryable: Callable[[ApiError], bool] = transient,
    blocker: Callable[[], str | None] | None = None,
    on_retry: OnRetry | None = None,
    give_up: OnGiveUp | None = None,
) -> T:
    """``await attempt()`` until it returns, retrying as ``policy`` says.

    An ApiError that ``retryable`` refuses, and any other exception, propagates at once.
    After a retryable failure, ``blocker`` (if given) may name a reason why no new attempt
    can be made (an output that cannot be restarted). When retrying ends, the last error
    is raised as it is, or ``give_up(error, reason)`` is raised instead when given.
    """
    failures = 0
    while True:
        try:
            return await attempt()
        except ApiError as exc:
            if not retryable(exc):
                raise
            failures += 1
            step = policy.next_delay(failures, exc, rng)
            if not isinstance(step, GiveUp) and blocker is not None:
                reason = blocker()
                if reason is not None:
                    step = GiveUp(reason)
            if isinstance(step, GiveUp):
                if give_up is None:
                    raise
                raise give_up(exc, step.reason) from None
            if on_retry is not None:
                on_retry(exc, failures, step)
        await sleep(step)
