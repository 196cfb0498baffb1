"""The replica's room for uncommitted records: the bound, the order of waiters, cancellation."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from service.budget import RecordBudget


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_reservations_wait_in_order_and_never_exceed_the_limit() -> None:
    room = RecordBudget(100)
    await room.reserve(60)
    granted: list[str] = []

    async def take(name: str, n: int) -> None:
        await room.reserve(n)
        granted.append(name)

    big = asyncio.create_task(take("big", 80))
    await settle()
    small = asyncio.create_task(take("small", 10))  # would fit, but waits behind "big"
    await settle()
    assert granted == [] and room.held == 60 and not room.fits(10)
    room.release(60)
    await settle()
    assert granted == ["big", "small"] and room.held == 90
    await asyncio.gather(big, small)


async def test_one_reservation_alone_always_fits_even_above_the_limit() -> None:
    room = RecordBudget(10)
    await asyncio.wait_for(room.reserve(100), 1)  # a page larger than the whole room
    assert room.held == 100
    room.release(100)
    assert room.held == 0


async def test_a_cancelled_waiter_holds_nothing_and_does_not_block_the_ones_behind() -> None:
    room = RecordBudget(100)
    await room.reserve(90)
    blocked = asyncio.create_task(room.reserve(50))
    await settle()
    behind = asyncio.create_task(room.reserve(10))
    await settle()
    assert not behind.done()  # behind the waiter in front
    blocked.cancel()
    await settle()
    assert behind.done() and room.held == 100
    with contextlib.suppress(asyncio.CancelledError):
        await blocked


async def test_a_waiter_cancelled_as_it_is_granted_gives_its_room_back() -> None:
    room = RecordBudget(100)
    await room.reserve(100)
    waiter = asyncio.create_task(room.reserve(50))
    await settle()
    room.release(100)  # grants the waiter: its future is done, the task not yet resumed
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert room.held == 0


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        RecordBudget(0)
