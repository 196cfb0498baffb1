"""What a batch has published, remembered compactly: 64-bit fingerprints (of its events,
and of their authorizers in batches that keep those: ``state.FP_VERSION``).

A batch may have millions of records, and every replica may hold thousands of
batches, so a plain ``set`` of ints (about 60 bytes a fingerprint) is too dear. A
``SeenSet`` keeps its fingerprints in sorted buckets, each an ``array('Q')`` (8 bytes
a fingerprint) of at most ``BUCKET_MAX`` values covering one range of them. A
fingerprint added goes at once into its place in its bucket (a bucket given many at
a time is rebuilt with them, in one pass), and a bucket that grows past
``BUCKET_MAX`` is cut into parts of about half that. So memory stays near 8.5 bytes
a fingerprint, and the work of an update is bounded by how many fingerprints it adds
(at most about ``BUCKET_MAX`` values moved for each), whatever the set holds: no
step merges, sorts or copies the whole set, so none keeps the event loop longer as a
batch grows, and nothing holds more than ``SLICE`` plus a bucket's worth of Python
ints at once. Beyond the fingerprints, the one thing moved is the list of buckets,
when one is cut (a pointer per bucket, one per 1,000 to 2,000 fingerprints). Every
lookup is exact at every moment: no fingerprint waits on the side.

A set read back whole (a restore) is built by a ``SeenLoader`` instead: several times
faster than adding its fingerprints one by one, in steps as bounded.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Generator, Iterable, Iterator

# The most fingerprints in one bucket: a fuller one is cut into parts of at least half
# this, and at most three quarters.
BUCKET_MAX = 2048
# Values added are sorted and put in place this many at a time.
SLICE = 4096
# A bucket given fewer than one in REBUILD_RATIO of its size takes them one by one
# (each an insertion into the array); more, it is rebuilt with them in one pass.
REBUILD_RATIO = 8
# A ``SeenLoader`` part of more than PART_RATIO buckets' worth is put into the set a
# slice at a time rather than sorted at once.
PART_RATIO = 4


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
        given, not by how many the set holds (a caller that must not block for long
        gives a few at a time). A slice with a value that is no 64-bit fingerprint is
        refused whole (OverflowError). A value given twice is stored twice, which costs
        its 8 bytes and nothing else.
        """
        if isinstance(values, set | frozenset) and len(values) <= SLICE:
            self._add(sorted(values))  # the common case: a commit's new fingerprints
            return
        if not isinstance(values, list | array | tuple):
            values = list(values)
        for start in range(0, len(values), SLICE):
            self._add(sorted(values[start : start + SLICE]))

    def _add(self, new: list[int]) -> None:
        """Put sorted values into their buckets: each bucket they fall in is changed (and
        cut if too full), no other."""
        if not new:
            return
        if new[0] < 0 or new[-1] >= 2**64:  # refused before any is put in
            raise OverflowError(f"not a 64-bit fingerprint: {new[0]!r} or {new[-1]!r}")
        buckets, firsts = self.buckets, self.firsts
        if not buckets:
            buckets.append(array("Q"))
            firsts.append(0)
        if len(new) * REBUILD_RATIO <= self.stored:
            # Few for the set's size (a commit's, most often), so few to any one bucket:
            # each goes into its place.
            j = 0
            for value in new:
                j = bisect_right(firsts, value, j) - 1
                bucket = buckets[j]
                bucket.insert(bisect_left(bucket, value), value)
                if len(bucket) > BUCKET_MAX:
                    self._cut(j)
            self.stored += len(new)
            return
        # Many: a bucket given many of them is rebuilt with them, in one pass.
        lo, n, j = 0, len(new), 0
        while lo < n:
            j = bisect_right(firsts, new[lo], j) - 1
            # new[lo:hi]: the values of bucket j.
            hi = n if j + 1 == len(firsts) else bisect_left(new, firsts[j + 1], lo + 1)
            bucket = buckets[j]
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
                buckets[j] = array("Q", merged)
            if len(buckets[j]) > BUCKET_MAX:
                self._cut(j)
            lo = hi
        self.stored += n

    def _cut(self, j: int) -> None:
        """Cut bucket j, too full, into parts of at least ``BUCKET_MAX // 2``."""
        bucket = self.buckets[j]
        size = len(bucket)
        parts = size // (BUCKET_MAX // 2)
        cut = [bucket[p * size // parts : (p + 1) * size // parts] for p in range(parts)]
        self.buckets[j : j + 1] = cut
        self.firsts[j + 1 : j + 1] = [part[0] for part in cut[1:]]


class SeenLoader:
    """Builds a ``SeenSet`` from many fingerprints known at once (a batch's chunks, as a
    restore reads them back), a bounded step at a time, several times faster than adding
    them one by one to the set (whose lookups are not needed meanwhile).

    ``add`` sorts values into parts by their top bits (as many parts as make about half a
    bucket each, for ``expected`` values spread evenly), each an ``array('Q')``; ``build``
    then sorts each part and makes buckets of it. The values, its given ones and those
    in the parts, are each held once, 8 bytes apiece. A part that values crowded into,
    as fingerprints never are, is put into the set ``SLICE`` at a time instead, so that
    no step grows with the batch even then.
    """

    __slots__ = ("_parts", "_shift", "seen")

    def __init__(self, expected: int) -> None:
        bits = max(0, expected // (BUCKET_MAX // 2)).bit_length()
        self._shift = 64 - bits
        self._parts: list[array[int] | None] = [None] * (1 << bits)
        self.seen = SeenSet()  # as built so far: whole once ``build`` has returned

    def add(self, values: Iterable[int]) -> None:
        """Take fingerprints (the work is bounded by how many they are)."""
        if not (isinstance(values, array) and values.typecode == "Q"):
            values = array("Q", values)  # OverflowError for one that is no fingerprint
        parts, shift = self._parts, self._shift
        for value in values:
            part = parts[value >> shift]
            if part is None:
                part = parts[value >> shift] = array("Q")
            part.append(value)

    def build(self) -> Generator[int, None, SeenSet]:
        """The set of every fingerprint taken, built a part at a time: yields how many
        fingerprints (and parts) each step took; returns the set."""
        seen = self.seen
        buckets, firsts = seen.buckets, seen.firsts
        parts, self._parts = self._parts, []
        skipped = 0
        for key, part in enumerate(parts):
            if part is None:
                skipped += 1
                continue
            parts[key] = None
            size = len(part)
            # Every value of a part is above those of the parts before it.
            if size > PART_RATIO * BUCKET_MAX:  # crowded: see above
                for start in range(0, size, SLICE):
                    seen.update(part[start : start + SLICE])
                    yield min(SLICE, size - start)
                continue
            values = part.tolist()
            del part
            values.sort()
            pieces = -(-size // BUCKET_MAX)
            for p in range(pieces):
                bucket = array("Q", values[p * size // pieces : (p + 1) * size // pieces])
                firsts.append(bucket[0] if firsts else 0)
                buckets.append(bucket)
            seen.stored += size
            yield size + skipped
            skipped = 0
        return seen
