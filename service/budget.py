"""The replica's room for records read from the API and not yet committed to Kafka.

Every poll under way holds the records it has read until their transaction
commits: up to ``polling.max_records_per_transaction`` gathering, and as many
again in each commit in flight. Hundreds of polls run at once, so without a
bound the records held would grow with the number of batches that have a
backlog, past any memory limit. A poll reserves room for a page before it asks
for it, keeps room for the new records the page brought, and gives it back when
they are committed (or dropped).

Room goes first to the polls that have gathered the most, so that a few polls
fill whole transactions rather than every poll a sliver of one: commits stay as
large as ``max_records_per_transaction`` allows. When the room is full of what
waiting polls gathered, and no page being read or commit under way will give any
back, the replica is stalled: the waiting polls that hold records are told to
commit them (``Poll.flush``) and ask again. So every wait ends.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

from prometheus_client import Gauge


class RecordBudget:
    """At most ``limit`` records held at once, except one reservation alone."""

    def __init__(self, limit: int, gauge: Gauge | None = None) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.held = 0  # reserved for pages, gathered, and in commits
        self.fetching = 0  # reserved for pages being read
        self.committing = 0  # in commits under way
        # (-records the waiting poll holds, order of asking, room asked, its answer)
        self._waiters: list[tuple[int, int, int, asyncio.Future[bool]]] = []
        self._order = itertools.count()
        self._gauge = gauge

    def _room(self, n: int) -> bool:
        # One reservation alone always fits, so a limit below a page still makes progress.
        return self.held == 0 or self.held + n <= self.limit

    async def reserve(self, n: int, holding: int = 0) -> bool:
        """Room for a page of ``n`` records, for a poll that holds ``holding`` uncommitted.

        True once it is reserved. False when the replica is stalled and the poll holds
        records: it should commit them, then ask again.
        """
        if not self._waiters and self._room(n):  # nobody waits: no order to keep
            self._add(n)
            self.fetching += n
            return True
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        entry = (-holding, next(self._order), n, fut)
        heapq.heappush(self._waiters, entry)
        self._check()
        try:
            return await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                if fut.result():  # granted as it was cancelled: give it back
                    self.settle(n, 0)
            elif entry in self._waiters:
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
                self._check()  # it may have stood in front of others
            raise

    def settle(self, reserved: int, kept: int) -> None:
        """A page read with ``reserved`` room brought ``kept`` new records, held until committed."""
        self.fetching -= reserved
        self._add(kept - reserved)
        self._check()

    def to_commit(self, n: int) -> None:
        """``n`` of the records held go to a commit."""
        self.committing += n

    def committed(self, n: int) -> None:
        """A commit of ``n`` records is over (done or failed): their room is free."""
        self.committing -= n
        self._add(-n)
        self._check()

    def drop(self, n: int) -> None:
        """``n`` records held will not be committed (their poll ended): their room is free."""
        if n:
            self._add(-n)
            self._check()

    def _add(self, n: int) -> None:
        self.held += n
        if self._gauge is not None:
            self._gauge.set(self.held)

    def _check(self) -> None:
        waiters = self._waiters
        while waiters and (waiters[0][3].done() or self._room(waiters[0][2])):
            _, _, n, fut = heapq.heappop(waiters)
            if not fut.done():  # (a cancelled waiter is only dropped)
                self._add(n)
                self.fetching += n
                fut.set_result(True)
        if waiters and not self.fetching and not self.committing:
            # Stalled: what holds the room is what waiting polls gathered, and nothing
            # under way will give any back. Those polls commit it, then ask again.
            for holding, _, _, fut in waiters:
                if holding < 0 and not fut.done():
                    fut.set_result(False)
            self._waiters = [e for e in waiters if e[0] == 0]
            heapq.heapify(self._waiters)
