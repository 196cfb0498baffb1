"""When each batch is next due: a heap of due times with lazy deletion.

A batch has at most one due time. Rescheduling or dropping it leaves the old
heap entry behind; entries that no longer match are skipped when they reach
the top. Each entry names the owner's epoch (one per partition acquisition),
so entries of a partition that was released die with it.
"""

from __future__ import annotations

import heapq
import itertools


class DueQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, str]] = []
        self._due: dict[str, tuple[float, int]] = {}
        self._seq = itertools.count()
        self.live_epochs: set[int] = set()

    def __contains__(self, batch_id: str) -> bool:
        return batch_id in self._due

    def put(self, batch_id: str, due: float, epoch: int) -> None:
        """Set the batch's due time, replacing any earlier one."""
        self._due[batch_id] = (due, epoch)
        heapq.heappush(self._heap, (due, next(self._seq), epoch, batch_id))

    def drop(self, batch_id: str) -> None:
        self._due.pop(batch_id, None)

    def head(self) -> tuple[float, int, str] | None:
        """The earliest live entry (due, epoch, batch_id), left in place."""
        heap = self._heap
        while heap:
            due, _, epoch, batch_id = heap[0]
            if self._due.get(batch_id) == (due, epoch) and epoch in self.live_epochs:
                return due, epoch, batch_id
            heapq.heappop(heap)
        return None

    def pop(self) -> tuple[float, int, str] | None:
        """Take the earliest live entry."""
        head = self.head()
        if head is not None:
            heapq.heappop(self._heap)
            del self._due[head[2]]
        return head
