"""The replica's room for uncommitted records: the bound, who goes first, stalls, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

import pytest

from service.budget import RecordBudget


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


T = TypeVar("T")


def task(coro: Awaitable[T]) -> asyncio.Task[T]:
    return asyncio.ensure_future(coro)


async def test_a_page_waits_for_room_and_gets_it_when_a_commit_gives_some_back() -> None:
    room = RecordBudget(100)
    assert await room.reserve(60)
    room.settle(60, 60)  # the page brought 60 new records
    room.to_commit(60)  # ... which go to a commit
    waiting = task(room.reserve(50))
    await settle()
    assert not waiting.done() and room.held == 60 and room.committing == 60
    room.committed(60)
    await settle()
    assert waiting.done() and waiting.result() is True
    assert room.held == 50 and room.fetching == 50 and room.committing == 0
    room.settle(50, 0)  # nothing new on that page
    assert room.held == 0 and room.fetching == 0


async def test_the_poll_that_gathered_most_goes_first_then_the_order_of_asking() -> None:
    room = RecordBudget(100)
    assert await room.reserve(100)
    granted: list[str] = []

    async def ask(name: str, holding: int) -> None:
        assert await room.reserve(10, holding)
        granted.append(name)

    tasks = [task(ask("a", 0)), task(ask("b", 30)), task(ask("c", 0)), task(ask("d", 30))]
    await settle()
    assert granted == []
    room.settle(100, 0)
    await asyncio.gather(*tasks)
    assert granted == ["b", "d", "a", "c"]


async def test_one_reservation_alone_always_fits_even_above_the_limit() -> None:
    room = RecordBudget(10)
    assert await asyncio.wait_for(room.reserve(100), 1)  # a page larger than the whole room
    room.settle(100, 100)
    assert room.held == 100
    room.drop(100)
    assert room.held == 0


async def test_a_stall_tells_the_waiting_polls_that_hold_records_to_commit_them() -> None:
    room = RecordBudget(100)
    for _ in range(2):  # two polls each read a page of 50 new records
        assert await room.reserve(50)
        room.settle(50, 50)
    assert room.held == 100 and not room.fetching and not room.committing
    fresh = task(room.reserve(50, holding=0))
    first = task(room.reserve(50, holding=50))
    await settle()
    # Nothing under way gives room back: the poll holding records is told to commit them;
    # the one holding nothing waits.
    assert first.done() and first.result() is False and not fresh.done()
    room.to_commit(50)
    second = task(room.reserve(50, holding=50))  # the other poll: commits are under way
    await settle()
    assert not second.done() and not fresh.done()
    room.committed(50)
    await settle()
    assert second.result() is True and not fresh.done()  # the one holding most first
    room.settle(50, 0)
    room.drop(50)  # the second poll ends without committing
    await settle()
    assert fresh.result() is True and room.held == 50


async def test_a_cancelled_waiter_holds_nothing_and_does_not_block_the_ones_behind() -> None:
    room = RecordBudget(100)
    assert await room.reserve(90)
    blocked = task(room.reserve(50, holding=5))
    await settle()
    behind = task(room.reserve(10))
    await settle()
    assert not behind.done()  # behind the waiter in front
    blocked.cancel()
    await settle()
    assert behind.done() and room.held == 100 and room.fetching == 100
    with contextlib.suppress(asyncio.CancelledError):
        await blocked


async def test_a_waiter_cancelled_as_it_is_granted_gives_its_room_back() -> None:
    room = RecordBudget(100)
    assert await room.reserve(100)
    waiter = task(room.reserve(50))
    await settle()
    room.settle(100, 0)  # grants the waiter: its future is done, the task not yet resumed
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert room.held == 0 and room.fetching == 0


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        RecordBudget(0)
