"""The one retry loop (service/retry.py), with a fake sleep and a fake attempt: no network."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from service.errors import (
    ApiBadRequest,
    ApiError,
    ApiNotFound,
    ApiRateLimited,
    ApiServerError,
    ApiTransportError,
    ApiUnauthorized,
    RequestAborted,
)
from service.retry import GiveUp, RetryPolicy, retrying


class Sleeps:
    """An injected sleep: records the delays asked for and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


class Ceiling(random.Random):
    """Jitter always at its top, so each backoff is exactly its ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Script:
    """An attempt that raises the given errors in turn, then returns ``"ok"``."""

    def __init__(self, errors: Sequence[ApiError]) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def policy(
    attempts: int = 10, base: float = 1.0, cap: float = 8.0, max_retry_after: float = 30.0
) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=attempts,
        backoff_base_s=base,
        backoff_max_s=cap,
        max_retry_after_s=max_retry_after,
    )


def server_error(n: int = 0) -> ApiServerError:
    return ApiServerError(f"boom {n}", status=500)


async def test_backoff_grows_then_is_capped() -> None:
    sleeps = Sleeps()
    attempt = Script([server_error(i) for i in range(6)])
    assert await retrying(attempt, policy(), rng=Ceiling(), sleep=sleeps) == "ok"
    assert attempt.calls == 7
    assert sleeps.delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


async def test_backoff_is_jittered_between_half_and_the_ceiling() -> None:
    sleeps = Sleeps()
    attempt = Script([server_error(i) for i in range(6)])
    await retrying(attempt, policy(), rng=random.Random(3), sleep=sleeps)
    ceilings = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert all(c / 2 <= d <= c for d, c in zip(sleeps.delays, ceilings, strict=True))
    assert len(set(sleeps.delays[3:])) == 3  # jittered, not the same capped value


async def test_transport_errors_and_429_are_retried_too() -> None:
    sleeps = Sleeps()
    errors = [
        ApiTransportError("slow", code="timeout"),
        ApiTransportError("refused", code="connection_error"),
        ApiRateLimited("slow down", status=429, retry_after=None),
    ]
    attempt = Script(errors)
    assert await retrying(attempt, policy(), rng=Ceiling(), sleep=sleeps) == "ok"
    # a 429 without Retry-After waits the backoff
    assert sleeps.delays == [1.0, 2.0, 4.0]


async def test_retry_after_longer_than_the_backoff_wins() -> None:
    sleeps = Sleeps()
    attempt = Script([ApiRateLimited("slow down", status=429, retry_after=20.0)])
    await retrying(attempt, policy(cap=8.0, max_retry_after=30.0), rng=Ceiling(), sleep=sleeps)
    assert sleeps.delays == [20.0]  # longer than backoff_max_s, within max_retry_after_s


async def test_retry_after_shorter_than_the_backoff_waits_the_backoff() -> None:
    sleeps = Sleeps()
    attempt = Script([server_error(), server_error(), ApiRateLimited("x", retry_after=0.5)])
    await retrying(attempt, policy(), rng=Ceiling(), sleep=sleeps)
    assert sleeps.delays == [1.0, 2.0, 4.0]


async def test_retry_after_beyond_the_cap_ends_the_retries_at_once() -> None:
    sleeps = Sleeps()
    too_long = ApiRateLimited("slow down", status=429, retry_after=31.0)
    attempt = Script([too_long])
    with pytest.raises(ApiRateLimited) as caught:
        await retrying(attempt, policy(max_retry_after=30.0), rng=Ceiling(), sleep=sleeps)
    assert caught.value is too_long
    assert attempt.calls == 1
    assert sleeps.delays == []


async def test_a_503s_retry_after_is_a_lower_bound_of_the_backoff() -> None:
    sleeps = Sleeps()
    attempt = Script(
        [
            ApiServerError("maintenance", status=503, retry_after=20.0),
            ApiServerError("maintenance", status=503, retry_after=0.5),
            ApiServerError("maintenance", status=503),
            ApiServerError("bad gateway", status=502, retry_after=20.0),
        ]
    )
    await retrying(attempt, policy(cap=8.0, max_retry_after=30.0), rng=Ceiling(), sleep=sleeps)
    # Retry-After over the backoff; the backoff over a shorter one, or none; a 502's is not
    # a Retry-After to honour (the backoff, as for any 5xx).
    assert sleeps.delays == [20.0, 2.0, 4.0, 8.0]


async def test_a_503s_retry_after_beyond_the_cap_ends_the_retries_at_once() -> None:
    sleeps = Sleeps()
    too_long = ApiServerError("maintenance", status=503, retry_after=31.0)
    attempt = Script([too_long])
    with pytest.raises(ApiServerError) as caught:
        await retrying(attempt, policy(max_retry_after=30.0), rng=Ceiling(), sleep=sleeps)
    assert caught.value is too_long
    assert attempt.calls == 1 and sleeps.delays == []


@pytest.mark.parametrize(
    "error",
    [
        ApiUnauthorized("no", status=401),
        ApiNotFound("gone", status=404),
        ApiBadRequest("bad token", status=400),
        ApiError("teapot", status=418),
        RequestAborted("stopped before sending the request"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_non_retryable_errors_propagate_at_once(error: ApiError) -> None:
    sleeps = Sleeps()
    attempt = Script([error])
    with pytest.raises(type(error)) as caught:
        await retrying(attempt, policy(), rng=Ceiling(), sleep=sleeps)
    assert caught.value is error
    assert attempt.calls == 1
    assert sleeps.delays == []


async def test_other_exceptions_propagate_at_once() -> None:
    calls = 0

    async def attempt() -> str:
        nonlocal calls
        calls += 1
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        await retrying(attempt, policy(), rng=Ceiling(), sleep=Sleeps())
    assert calls == 1


async def test_the_caller_may_classify_what_is_retryable() -> None:
    attempt = Script([ApiNotFound("not yet", status=404)])
    result = await retrying(
        attempt,
        policy(),
        rng=Ceiling(),
        sleep=Sleeps(),
        retryable=lambda exc: isinstance(exc, ApiNotFound),
    )
    assert result == "ok"
    attempt = Script([server_error()])
    with pytest.raises(ApiServerError):
        await retrying(
            attempt, policy(), rng=Ceiling(), sleep=Sleeps(), retryable=lambda exc: False
        )
    assert attempt.calls == 1


async def test_attempts_exhausted_raise_the_last_error() -> None:
    sleeps = Sleeps()
    errors = [server_error(1), ApiTransportError("refused"), server_error(3), server_error(4)]
    attempt = Script(errors[:])
    with pytest.raises(ApiServerError) as caught:
        await retrying(attempt, policy(attempts=3), rng=Ceiling(), sleep=sleeps)
    assert caught.value is errors[2]
    assert attempt.calls == 3
    assert sleeps.delays == [1.0, 2.0]


async def test_a_single_attempt_is_never_retried() -> None:
    attempt = Script([server_error()])
    with pytest.raises(ApiServerError):
        await retrying(attempt, policy(attempts=1), rng=Ceiling(), sleep=Sleeps())
    assert attempt.calls == 1


async def test_give_up_replaces_the_last_error_with_the_reason() -> None:
    seen: list[tuple[ApiError, str]] = []

    def give_up(exc: ApiError, reason: str) -> BaseException:
        seen.append((exc, reason))
        return RuntimeError(reason)

    last = server_error(2)
    attempt = Script([server_error(1), last])
    with pytest.raises(RuntimeError, match=r"^gave up after 2 attempts$") as caught:
        await retrying(attempt, policy(attempts=2), rng=Ceiling(), sleep=Sleeps(), give_up=give_up)
    assert seen == [(last, "gave up after 2 attempts")]
    assert caught.value.__cause__ is None and caught.value.__suppress_context__

    attempt = Script([ApiRateLimited("slow down", retry_after=45.0)])
    with pytest.raises(RuntimeError, match=r"^Retry-After of 45 s is too long: over 30 s$"):
        await retrying(attempt, policy(), rng=Ceiling(), sleep=Sleeps(), give_up=give_up)


async def test_a_blocker_stops_the_retries_with_its_reason() -> None:
    sleeps = Sleeps()
    written = False

    async def attempt() -> str:
        nonlocal written
        written = True
        raise server_error()

    def blocker() -> str | None:
        return "the output on stdout is incomplete" if written else None

    with pytest.raises(RuntimeError, match="stdout is incomplete"):
        await retrying(
            attempt,
            policy(),
            rng=Ceiling(),
            sleep=sleeps,
            blocker=blocker,
            give_up=lambda exc, reason: RuntimeError(reason),
        )
    assert sleeps.delays == []


async def test_on_retry_hears_each_failure_before_its_wait() -> None:
    heard: list[tuple[str, int, float]] = []
    sleeps = Sleeps()

    def on_retry(exc: ApiError, failures: int, delay: float) -> None:
        assert len(sleeps.delays) == failures - 1  # before the wait
        heard.append((str(exc.args[0]), failures, delay))

    attempt = Script([server_error(1), ApiRateLimited("slow", retry_after=5.0)])
    await retrying(attempt, policy(), rng=Ceiling(), sleep=sleeps, on_retry=on_retry)
    assert heard == [("boom 1", 1, 1.0), ("slow", 2, 5.0)]


def test_next_delay_is_a_plain_function() -> None:
    p = policy(attempts=4, base=0.5, cap=3.0, max_retry_after=10.0)
    rng = Ceiling()
    assert [p.next_delay(n, server_error(), rng) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert p.next_delay(4, server_error(), rng) == GiveUp("gave up after 4 attempts")
    assert p.next_delay(1, ApiRateLimited("x", retry_after=10.0), rng) == 10.0
    assert p.next_delay(1, ApiRateLimited("x", retry_after=10.5), rng) == GiveUp(
        "Retry-After of 11 s is too long: over 10 s"
    )
    named = RetryPolicy(4, 0.5, 3.0, 3600.0, max_retry_after_name="rightfoot.export_max_wait_s")
    assert named.next_delay(1, ApiRateLimited("x", retry_after=7200), rng) == GiveUp(
        "Retry-After of 7200 s is too long: over rightfoot.export_max_wait_s, 3600 s"
    )
