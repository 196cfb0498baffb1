"""Backoff bounds and the replica-wide request-rate ceiling, with injected time."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest

from service.pacing import RateLimiter, backoff_delay


@pytest.mark.parametrize("failures", [0, -1])
def test_no_failure_no_delay(failures: int) -> None:
    assert backoff_delay(failures, 1.0, 300.0, random.Random(1)) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_backoff_between_half_and_the_exponential_ceiling(seed: int) -> None:
    rng = random.Random(seed)
    for failures in range(1, 40):
        ceiling = min(300.0, 1.0 * 2 ** (failures - 1))
        for _ in range(20):
            d = backoff_delay(failures, 1.0, 300.0, rng)
            assert ceiling / 2 <= d <= ceiling, (failures, d)


def test_backoff_grows_then_is_capped() -> None:
    rng = random.Random(42)
    assert backoff_delay(1, 0.5, 10.0, rng) <= 0.5
    assert backoff_delay(4, 0.5, 10.0, rng) >= 2.0  # ceiling 4.0
    for failures in (6, 10, 100, 10_000):
        assert 5.0 <= backoff_delay(failures, 0.5, 10.0, rng) <= 10.0


def test_backoff_is_jittered_and_reproducible() -> None:
    a = [backoff_delay(5, 1.0, 300.0, random.Random(7)) for _ in range(3)]
    assert len(set(a)) == 1
    rng = random.Random(7)
    spread = {backoff_delay(5, 1.0, 300.0, rng) for _ in range(50)}
    assert len(spread) > 40
    assert max(spread) - min(spread) > 2.0  # ceiling 16: jitter over 8 .. 16


class FakeTime:
    """A clock whose sleep advances it, and a log of the sleeps asked for."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_rate_must_be_positive() -> None:
    with pytest.raises(ValueError):
        RateLimiter(0)
    with pytest.raises(ValueError):
        RateLimiter(-1)


async def test_acquisitions_are_spaced_without_burst() -> None:
    t = FakeTime()
    limiter = RateLimiter(10.0, clock=t.clock, sleep=t.sleep)
    times = []
    for _ in range(25):
        await limiter.acquire()
        times.append(t.now)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert times[0] == 1000.0  # the first one does not wait
    assert all(gap == pytest.approx(0.1) for gap in gaps), gaps
    assert times[-1] - times[0] == pytest.approx(2.4)


async def test_concurrent_callers_each_get_their_own_slot() -> None:
    t = FakeTime()
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)  # the clock stands still: everyone asked at the same instant

    limiter = RateLimiter(4.0, clock=t.clock, sleep=record)
    await asyncio.gather(*(limiter.acquire() for _ in range(8)))
    assert sorted(waits) == pytest.approx([0.25 * i for i in range(1, 8)])


async def test_idle_time_does_not_bank_a_burst() -> None:
    t = FakeTime()
    limiter = RateLimiter(5.0, clock=t.clock, sleep=t.sleep)
    await limiter.acquire()
    t.now += 60.0  # a long quiet spell
    times = []
    for _ in range(5):
        await limiter.acquire()
        times.append(t.now)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap == pytest.approx(0.2) for gap in gaps), gaps


async def test_pause_until_delays_everyone() -> None:
    t = FakeTime()
    limiter = RateLimiter(100.0, clock=t.clock, sleep=t.sleep)
    await limiter.acquire()
    limiter.pause_until(t.now + 5.0)
    starts = []
    for _ in range(3):
        await limiter.acquire()
        starts.append(t.now)
    assert starts[0] == pytest.approx(1005.0)
    assert starts[1] == pytest.approx(1005.01)
    assert starts[2] == pytest.approx(1005.02)


async def test_a_late_wake_up_releases_no_burst() -> None:
    t = FakeTime()
    late = [0.35]  # the first wait overruns (a busy event loop), the others do not

    async def oversleep(seconds: float) -> None:
        t.now += seconds + (late.pop() if late else 0.0)

    limiter = RateLimiter(10.0, clock=t.clock, sleep=oversleep)
    released: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        released.append(t.now)

    await asyncio.gather(*(one() for _ in range(8)))
    gaps = [b - a for a, b in itertools.pairwise(released)]
    assert all(gap >= 0.1 - 1e-9 for gap in gaps), gaps
    assert released[1] == pytest.approx(1000.45)  # its slot was 1000.1: it went late


async def test_pause_during_a_wait_is_honoured() -> None:
    t = FakeTime()
    gate = asyncio.Event()

    async def sleep(seconds: float) -> None:
        await gate.wait()
        t.now += seconds

    limiter = RateLimiter(1.0, clock=t.clock, sleep=sleep)
    await limiter.acquire()
    second = asyncio.ensure_future(limiter.acquire())
    await asyncio.sleep(0)  # it now waits for its slot at 1001
    limiter.pause_until(1010.0)
    gate.set()
    await second
    assert t.now == pytest.approx(1010.0)


async def test_pause_in_the_past_changes_nothing() -> None:
    t = FakeTime()
    limiter = RateLimiter(2.0, clock=t.clock, sleep=t.sleep)
    await limiter.acquire()
    limiter.pause_until(t.now - 100.0)
    await limiter.acquire()
    assert t.now == pytest.approx(1000.5)


def _most_in_window(times: list[float], width: float) -> int:
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= width - 1e-9:
            start += 1
        best = max(best, end - start + 1)
    return best


@pytest.mark.parametrize("seed", range(3))
async def test_ceiling_holds_and_late_wake_ups_cost_no_capacity(seed: int) -> None:
    rng = random.Random(seed)
    t = FakeTime()

    async def late_sleep(seconds: float) -> None:
        t.now += seconds + rng.uniform(0.0, 0.002)  # a busy loop wakes callers late

    limiter = RateLimiter(300.0, clock=t.clock, sleep=late_sleep)
    assert limiter.depth == 6
    released: list[float] = []
    for _ in range(3000):  # always someone waiting: the ceiling is the only limit
        await limiter.acquire()
        released.append(t.now)
        if rng.random() < 0.01:
            t.now += rng.uniform(0.0, 0.05)  # now and then nobody asks for a while
    assert _most_in_window(released, 1.0) <= 301
    assert _most_in_window(released, 0.1) <= 6 + 30
    assert released[-1] - released[0] <= 3000 / 295 + 0.02 * 30 + 0.5
