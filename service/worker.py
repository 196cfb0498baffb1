"""The runner's two interfaces, and what it holds of one owned requests partition."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from service.events import Publishable
from service.records import Page
from service.state import BatchState


class PageSource(Protocol):
    async def fetch_page(
        self,
        batch_id: str,
        token: str | None,
        limit: int | None = None,
        *,
        stop: Callable[[], bool] | None = None,
        content_ids: bool = True,
    ) -> Page: ...


class Committer(Protocol):
    on_failure: Callable[[BaseException], None] | None

    async def publish(
        self, messages: Sequence[Publishable], request_offset: int | None = None
    ) -> None: ...

    async def close(self, timeout: float) -> None: ...


@dataclass(slots=True)
class PartitionWorker:
    """The batches of one owned requests partition and the committer that commits them."""

    partition: int
    publisher: Committer
    batches: dict[str, BatchState] = field(default_factory=dict)
    # Batches whose stored state this version cannot read: left as they are, not polled.
    unreadable: dict[str, str] = field(default_factory=dict)
    polls: set[asyncio.Task[None]] = field(default_factory=set)
    # The batches whose poll is running (at most one each: Tracker.run starts none for a
    # batch in it), and the batches tracked again whose commit is under way, by that
    # commit's future (their first poll waits for it: Tracker._resumed).
    running: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    resuming: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    epoch: int = 0
    closed: bool = False
    # The last request held back until a batch being forgotten is gone (Tracker.
    # handle_request): the partition's later requests wait for it, in order.
    deferred: asyncio.Future[None] | None = None
    # The commit of the last round of tombstones (Tracker.forget_finished): the next round
    # waits for it, so that rounds never queue up ahead of their commits.
    clearing: asyncio.Future[None] | None = None


def _retrieve(commit: asyncio.Future[None]) -> None:
    """Mark a commit's outcome retrieved: nobody waits for it any longer."""
    if not commit.cancelled():
        commit.exception()


async def committed(commit: asyncio.Future[None]) -> None:
    """Wait for a commit; cancelled meanwhile (the partition released, a stop), the waiter
    alone is: the commit goes on, and is counted as what it turns out to be."""
    try:
        await asyncio.shield(commit)
    except asyncio.CancelledError:
        commit.add_done_callback(_retrieve)
        raise


async def settled(commits: deque[asyncio.Future[None]]) -> None:
    """Wait for each commit in order; the first failure is raised (the later ones fail too)."""
    try:
        while commits:
            commit = commits.popleft()
            if not commit.cancelled():
                await committed(commit)
    finally:
        abandon(commits)


def abandon(commits: deque[asyncio.Future[None]]) -> None:
    """Wait for none of the commits any longer (a poll cancelled: its partition released
    past its timeout). Each goes on, and lands or fails (the publisher's close ends it,
    or the partition's next producer fences it); its callbacks count it and give its
    records' room back either way."""
    for commit in commits:
        commit.add_done_callback(_retrieve)
    commits.clear()


def done() -> asyncio.Future[None]:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    fut.set_result(None)
    return fut
