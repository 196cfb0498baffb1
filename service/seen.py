"""What a batch has published, remembered compactly: one 64-bit fingerprint per event.

A batch may have a million records, and every replica may hold thousands of
batches, so a plain ``set`` of ints (about 60 bytes a record) is too dear. A
``SeenSet`` keeps a sorted ``array('Q')`` (8 bytes a record) and a small set of
recent additions; the recent ones are merged into the array once they pass an
eighth of it, so memory stays near 8 to 16 bytes a record and the merges cost
O(n) amortised per record added.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator

# Recent additions kept in the set before the first merge, whatever the array's size.
MERGE_MIN = 1024


class SeenSet:
    """A set of 64-bit fingerprints that only grows."""

    __slots__ = ("recent", "sorted")

    def __init__(self, values: Iterable[int] = ()) -> None:
        ordered = sorted(values)
        if len(ordered) > MERGE_MIN:
            # A value stored twice (a restore that read it from two chunks) is harmless.
            self.sorted: array[int] = array("Q", ordered)
            self.recent: set[int] = set()
        else:
            self.sorted = array("Q")
            self.recent = set(ordered)

    def __contains__(self, value: object) -> bool:
        if value in self.recent:
            return True
        a = self.sorted
        if not a or not isinstance(value, int):
            return False
        i = bisect_left(a, value)
        return i < len(a) and a[i] == value

    def __len__(self) -> int:
        return len(self.sorted) + len(self.recent)

    def __iter__(self) -> Iterator[int]:
        yield from self.sorted
        yield from self.recent

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SeenSet):
            return len(self) == len(other) and set(self) == set(other)
        if isinstance(other, set | frozenset):
            return len(self) == len(other) and set(self) == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SeenSet({len(self)} fingerprints)"

    def update(self, values: Iterable[int]) -> None:
        """Add fingerprints that are not yet in the set (the caller checked each one)."""
        self.recent.update(values)
        if len(self.recent) > MERGE_MIN + len(self.sorted) // 8:
            self._merge()

    def _merge(self) -> None:
        # Two sorted runs: timsort merges them in one linear pass.
        merged = self.sorted.tolist()
        merged.extend(sorted(self.recent))
        merged.sort()
        self.sorted = array("Q", merged)
        self.recent = set()
