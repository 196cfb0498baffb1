"""What a batch has published, remembered compactly: 64-bit fingerprints (of its events,
and of their authorizers in batches that keep those: ``state.FP_VERSION``).

A batch may have millions of records, and every replica may hold thousands of
batches, so a plain ``set`` of ints (about 60 bytes a fingerprint) is too dear. A
``SeenSet`` keeps its fingerprints in sorted buckets, each an ``array('Q')`` (8 bytes
a fingerprint) of at most ``BUCKET_MAX`` values covering one range, and a small set of
recent additions. The recent ones are merged into the buckets once they pass an
eighth of what is stored, a bucket at a time, and a bucket that grows too large is
cut in two: memory stays near 8 to 16 bytes a fingerprint, the merges cost O(1)
amortised per fingerprint added, and no step ever copies the whole set (neither a merge nor a
rebuild from the state topic), so nothing holds more than one bucket's worth of
Python ints at once, whatever the size of the batch.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator

# Recent additions kept in the set before the first merge, whatever is stored.
MERGE_MIN = 1024
# The most fingerprints in one bucket: a fuller one is cut into halves of this size.
BUCKET_MAX = 4096


class SeenSet:
    """A set of 64-bit fingerprints that only grows.

    ``buckets[j]`` holds, sorted, the stored values from ``firsts[j]`` up to (not
    including) ``firsts[j + 1]``; ``firsts[0]`` is 0.
    """

    __slots__ = ("buckets", "firsts", "recent", "stored")

    def __init__(self, values: Iterable[int] = ()) -> None:
        self.buckets: list[array[int]] = []
        self.firsts: list[int] = []
        self.recent: set[int] = set()
        self.stored = 0
        self.update(values)

    def __contains__(self, value: object) -> bool:
        if value in self.recent:
            return True
        if not self.buckets or type(value) is not int:
            return False
        bucket = self.buckets[bisect_right(self.firsts, value) - 1]
        i = bisect_left(bucket, value)
        return i < len(bucket) and bucket[i] == value

    def __len__(self) -> int:
        return self.stored + len(self.recent)

    def __iter__(self) -> Iterator[int]:
        for bucket in self.buckets:
            yield from bucket
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
        """Add fingerprints that are not yet in the set (the caller checked each one).

        ``values`` may be large (a batch's chunks, read back from the state topic): a
        sequence is taken in slices, merged as they come; a set (a commit's new
        fingerprints) at once. A value given twice is stored twice, which costs its 8
        bytes and nothing else.
        """
        recent = self.recent
        if isinstance(values, set | frozenset):
            # The common case, a commit's new fingerprints (a bounded number): all at once.
            recent.update(values)
            if len(recent) > self._limit():
                self._merge()
            return
        if not isinstance(values, list | array | tuple):
            values = list(values)
        start = 0
        while start < len(values):
            room = self._limit() + 1 - len(recent)
            # Through a set: a set grows its table by half the room a value at a time does.
            recent.update(set(values[start : start + room]))
            start += room
            if len(recent) > self._limit():
                self._merge()
                recent = self.recent

    def _limit(self) -> int:
        """The most recent additions kept before they are merged into the buckets."""
        return MERGE_MIN + self.stored // 8

    def _merge(self) -> None:
        new = sorted(self.recent)
        self.recent = set()
        if not self.buckets:
            self.buckets, self.firsts = [array("Q")], [0]
        buckets, firsts = self.buckets, self.firsts
        out_buckets: list[array[int]] = []
        out_firsts: list[int] = []
        lo = 0
        last = len(buckets) - 1
        for j, bucket in enumerate(buckets):
            hi = len(new) if j == last else bisect_left(new, firsts[j + 1], lo)
            if hi == lo:
                out_buckets.append(bucket)
                out_firsts.append(firsts[j])
                continue
            # Two sorted runs: timsort merges them in one linear pass.
            merged = bucket.tolist()
            merged.extend(new[lo:hi])
            merged.sort()
            lo = hi
            if len(merged) <= BUCKET_MAX:
                out_buckets.append(array("Q", merged))
                out_firsts.append(firsts[j])
                continue
            half = BUCKET_MAX // 2
            for start in range(0, len(merged), half):
                out_buckets.append(array("Q", merged[start : start + half]))
                out_firsts.append(firsts[j] if start == 0 else merged[start])
        self.buckets, self.firsts = out_buckets, out_firsts
        self.stored += len(new)
