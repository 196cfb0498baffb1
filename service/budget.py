"""The replica's room for records read from the API and not yet committed to Kafka.

Every poll under way holds the records it has read until their transaction
commits: up to ``polling.max_records_per_transaction`` gathering, and as many
again in each commit in flight. Hundreds of polls run at once, so without a
bound the records held grow with the number of batches that have a backlog, past
any memory limit. A poll reserves room for a page before it asks for it, keeps
room for the new records the page brought, and gives it back when they are
committed (or dropped). While there is no room it waits, first in line, after
committing what it holds (``Poll.flush``): so it never waits holding room that
others need, and the wait always ends, as commits do.
"""

from __future__ import annotations

import asyncio
from collections import deque

from prometheus_client import Gauge


class RecordBudget:
    """At most ``limit`` records reserved at once, except one reservation alone."""

    def __init__(self, limit: int, gauge: Gauge | None = None) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.held = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._gauge = gauge

    def fits(self, n: int) -> bool:
        """Whether ``n`` more records may be reserved now, without waiting."""
        return not self._waiters and self._room(n)

    def _room(self, n: int) -> bool:
        # One reservation alone always fits, so a limit below a page still makes progress.
        return self.held == 0 or self.held + n <= self.limit

    async def reserve(self, n: int) -> None:
        """Wait until ``n`` records fit, in the order asked; then hold them."""
        if self.fits(n):
            self._add(n)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(n)  # granted as it was cancelled: give it back
            else:
                self._waiters.remove(entry)
                self._grant()  # it may have stood in front of smaller ones
            raise

    def hold(self, n: int) -> None:
        """Hold ``n`` more records at once (a page that brought more than its room)."""
        self._add(n)

    def release(self, n: int) -> None:
        """Give back ``n`` records."""
        self._add(-n)
        self._grant()

    def _add(self, n: int) -> None:
        self.held += n
        if self._gauge is not None:
            self._gauge.set(self.held)

    def _grant(self) -> None:
        while self._waiters and self._room(self._waiters[0][0]):
            n, fut = self._waiters.popleft()
            self._add(n)
            fut.set_result(None)
