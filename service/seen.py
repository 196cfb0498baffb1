"""What a batch has published, remembered compactly: 64-bit fingerprints (of its events,
and of their authorizers in batches that keep those: ``state.FP_VERSION``).

A batch may have millions of records, and every replica may hold thousands of
batches, so a plain ``set`` of ints (about 60 bytes a fingerprint) is too dear. A
``SeenSet`` keeps its fingerprints in sorted buckets, each an ``array('Q')`` (8 bytes
a fingerprint) of at most ``BUCKET_MAX`` values covering one range of them. A
fingerprint added goes at once into its place in its bucket (a bucket given many at
a time is rebuilt with them, in one pass), and a bucket that grows past
``BUCKET_MAX`` is cut into parts of about half that. So memory stays near 8 to 9
bytes a fingerprint, and the work of adding some is bounded by how many they are
(at most about ``BUCKET_MAX`` values moved for each), whatever the set holds: no
step merges, sorts or copies the whole set, so none blocks the event loop for longer
as a batch grows, and nothing holds more than ``SLICE`` plus one bucket's worth of
Python ints at once. Beyond the fingerprints, the one thing moved on adding is the
list of buckets, when one is cut (a pointer per bucket, about one per thousand
fingerprints). Every lookup is exact at every moment: there is nothing on the side.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator

# The most fingerprints in one bucket: a fuller one is cut into parts of at least half
# this, and at most three quarters.
BUCKET_MAX = 2048
# Values added are sorted and put in place this many at a time.
SLICE = 4096
# A bucket given fewer than one in REBUILD_RATIO of its size takes them one by one
# (each an insertion into the array); more, it is rebuilt with them in one pass.
REBUILD_RATIO = 8

_NOTHING: frozenset[int] = frozenset()


class SeenSet:
    """A set of 64-bit fingerprints that only grows.

    ``buckets[j]`` holds, sorted, the values from ``firsts[j]`` up to (not including)
    ``firsts[j + 1]``; ``firsts[0]`` is 0. Both lists are changed in place, never
    replaced, so a reference to them stays current (``step.collect`` looks values up
    in them itself).
    """

    __slots__ = ("buckets", "firsts", "stored")

    def __init__(self, values: Iterable[int] = ()) -> None:
        self.buckets: list[array[int]] = []
        self.firsts: list[int] = []
        self.stored = 0
        self.update(values)

    @property
    def recent(self) -> frozenset[int]:
        """Fingerprints held outside the buckets: none any longer. (``step.collect``, which
        looks values up as ``__contains__`` does, still reads it.)"""
        return _NOTHING

    def __contains__(self, value: object) -> bool:
        if not self.buckets or type(value) is not int:
            return False
        bucket = self.buckets[bisect_right(self.firsts, value) - 1]
        i = bisect_left(bucket, value)
        return i < len(bucket) and bucket[i] == value

    def __len__(self) -> int:
        return self.stored

    def __iter__(self) -> Iterator[int]:
        for bucket in self.buckets:
            yield from bucket

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

        They are put in place ``SLICE`` at a time: the work is bounded by how many are
        given, not by how many the set holds, so a caller that must not block for long
        gives them a slice at a time (``state.StateRestore.rebuild`` gives a chunk). A
        value given twice is stored twice, which costs its 8 bytes and nothing else.
        """
        if not isinstance(values, list | array | tuple):
            values = list(values)
        for start in range(0, len(values), SLICE):
            self._add(sorted(values[start : start + SLICE]))

    def _add(self, new: list[int]) -> None:
        """Put sorted values into their buckets: each bucket they fall in is changed (and
        cut if too full), no other."""
        buckets, firsts = self.buckets, self.firsts
        if not buckets:
            buckets.append(array("Q"))
            firsts.append(0)
        lo, n, j = 0, len(new), 0
        while lo < n:
            value = new[lo]
            j = bisect_right(firsts, value, j) - 1
            # new[lo:hi]: the values of bucket j (most often one: the next is elsewhere).
            if j + 1 == len(firsts):
                hi = n
            else:
                bound = firsts[j + 1]
                hi = lo + 1
                if hi < n and new[hi] < bound:
                    hi = bisect_left(new, bound, hi + 1)
            self._put(j, new, lo, hi)
            self.stored += hi - lo
            lo = hi

    def _put(self, j: int, new: list[int], lo: int, hi: int) -> None:
        """Put the sorted values ``new[lo:hi]``, all within bucket j's range, into it."""
        bucket = self.buckets[j]
        if (hi - lo) * REBUILD_RATIO <= len(bucket):
            at = 0
            for k in range(lo, hi):
                value = new[k]
                at = bisect_left(bucket, value, at)
                bucket.insert(at, value)
        else:
            # Two sorted runs: timsort merges them in one linear pass.
            merged = bucket.tolist()
            merged.extend(new[lo:hi])
            merged.sort()
            bucket = self.buckets[j] = array("Q", merged)
        size = len(bucket)
        if size > BUCKET_MAX:
            parts = size // (BUCKET_MAX // 2)
            cut = [bucket[p * size // parts : (p + 1) * size // parts] for p in range(parts)]
            self.buckets[j : j + 1] = cut
            self.firsts[j + 1 : j + 1] = [part[0] for part in cut[1:]]
