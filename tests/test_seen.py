"""SeenSet: a set of 64-bit fingerprints that answers like a set and costs about 8 bytes a
fingerprint, exact after every update, with no update whose work grows with the set."""

from __future__ import annotations

import random
import tracemalloc
from array import array
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service import seen as seen_module
from service.seen import BUCKET_MAX, SeenLoader, SeenSet

fingerprints = st.integers(min_value=0, max_value=2**64 - 1)


@contextmanager
def _tiny(bucket_max: int, slice_: int = 4096, ratio: int = 8) -> Iterator[None]:
    """Tiny buckets (and slices): buckets are cut again and again, both ways of adding."""
    with (
        mock.patch.object(seen_module, "BUCKET_MAX", bucket_max),
        mock.patch.object(seen_module, "SLICE", slice_),
        mock.patch.object(seen_module, "REBUILD_RATIO", ratio),
    ):
        yield


def _inlined_lookup(seen: SeenSet, value: int) -> bool:
    """The lookup as ``step.collect`` inlines it (``buckets``, ``firsts``)."""
    if not seen.buckets:
        return False
    bucket = seen.buckets[bisect_right(seen.firsts, value) - 1]
    i = bisect_left(bucket, value)
    return i < len(bucket) and bucket[i] == value


def _grows_like_a_set(additions: list[list[int]], probes: list[int]) -> None:
    """Added to a batch at a time, the set answers exactly as a plain set does, after each
    batch, whether asked itself or the way ``step.collect`` asks it."""
    seen = SeenSet()
    buckets, firsts = seen.buckets, seen.firsts  # as step.collect holds them over a page
    model: set[int] = set()
    for batch in additions:
        new = set(batch) - model
        seen.update(new)
        model |= new
        assert len(seen) == len(model)
        _check_buckets(seen)
        assert seen.buckets is buckets and seen.firsts is firsts, "changed in place"
        for value in [*probes, *batch, 0, 2**64 - 1]:
            assert (value in seen) == (value in model) == _inlined_lookup(seen, value)
    assert all(value in seen for value in model)
    assert set(seen) == model
    assert seen == model


def _check_buckets(seen: SeenSet) -> None:
    """Each bucket sorted, within its range, and no fuller than BUCKET_MAX; nothing else
    held."""
    if not seen.buckets:
        assert seen.stored == 0 and not seen.firsts
        return
    assert seen.firsts[0] == 0 and seen.firsts == sorted(seen.firsts)
    bounds = [*seen.firsts[1:], 2**64]
    for bucket, low, high in zip(seen.buckets, seen.firsts, bounds, strict=True):
        values = bucket.tolist()
        assert values == sorted(values)
        assert len(values) <= seen_module.BUCKET_MAX
        assert all(low <= v < high for v in values)
    assert seen.stored == sum(len(b) for b in seen.buckets)


@given(st.lists(st.lists(fingerprints, max_size=600), max_size=12), st.lists(fingerprints))
def test_answers_like_a_set(additions: list[list[int]], probes: list[int]) -> None:
    _grows_like_a_set(additions, probes)


@given(
    st.lists(st.lists(fingerprints, max_size=60), max_size=30),
    st.lists(fingerprints),
    st.sampled_from([(4, 3, 8), (4, 4096, 1), (6, 5, 2), (8, 4096, 1000)]),
)
def test_answers_like_a_set_through_many_cuts(
    additions: list[list[int]], probes: list[int], tiny: tuple[int, int, int]
) -> None:
    # Tiny buckets: every few additions cut one. Both ways of adding: one at a time
    # (ratio 1: whenever the set holds as many as are added, or a bucket as many as it
    # is given) and a bucket rebuilt with those it is given (ratio 1000: always, but
    # for a set 1,000 times the size of the addition).
    with _tiny(*tiny):
        _grows_like_a_set(additions, probes)


@given(
    st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=40),
    st.integers(min_value=0, max_value=2**32),
)
def test_clustered_values_answer_like_a_set(sizes: list[int], seed: int) -> None:
    """Values close together (all in one bucket, then in its parts) and far apart."""
    rng = random.Random(seed)
    base = rng.randrange(2**64 - 2**12)
    additions = [
        [base + rng.randrange(2**12) for _ in range(size)] + [rng.getrandbits(64)] for size in sizes
    ]
    with _tiny(8, 5, 4):
        _grows_like_a_set(additions, [base, base + 1, base + 2**12])


@given(st.lists(fingerprints, min_size=1, max_size=50), st.integers(), st.booleans())
def test_a_value_that_is_no_64_bit_fingerprint_changes_nothing(
    values: list[int], wrong: int, many: bool
) -> None:
    seen = SeenSet(range(0, 2**64, 2**54) if many else [])
    before = set(seen)
    bad = wrong + 2**64 if wrong >= 0 else wrong
    with pytest.raises(OverflowError):
        seen.update({*values, bad})
    assert seen == before and len(seen) == len(before)
    _check_buckets(seen)


def _load(chunks: list[list[int]], expected: int) -> tuple[SeenSet, list[int]]:
    """A set built by a SeenLoader from these chunks; and what each step of its build
    put into the set."""
    loader = SeenLoader(expected)
    for chunk in chunks:
        loader.add(array("Q", chunk) if len(chunk) % 2 else chunk)
    steps, grew, before = loader.build(), [], 0
    while True:
        try:
            next(steps)
        except StopIteration as end:
            assert end.value is loader.seen
            grew.append(len(loader.seen) - before)
            return loader.seen, grew
        grew.append(len(loader.seen) - before)
        before = len(loader.seen)


@given(
    st.lists(st.lists(fingerprints, max_size=40), max_size=20),
    st.lists(fingerprints),
    st.integers(min_value=0, max_value=2000),
    st.sampled_from([(4, 3, 2), (8, 5, 1), (2048, 4096, 4)]),
    st.lists(fingerprints, max_size=40),
)
def test_a_loaded_set_answers_like_a_set_and_keeps_growing(
    chunks: list[list[int]],
    probes: list[int],
    expected: int,
    tiny: tuple[int, int, int],
    later: list[int],
) -> None:
    """Whatever it was told to expect, however crowded the values; and once built, it
    takes more as any set does."""
    bucket_max, slice_, part_ratio = tiny
    model: set[int] = set()
    unique = []
    for chunk in chunks:
        unique.append([v for v in dict.fromkeys(chunk) if v not in model])
        model.update(chunk)
    with _tiny(bucket_max, slice_), mock.patch.object(seen_module, "PART_RATIO", part_ratio):
        seen, grew = _load(unique, expected)
        assert len(seen) == len(model) and seen == model
        _check_buckets(seen)
        assert max(grew) <= max(part_ratio * bucket_max, slice_)
        for value in [*probes, *model, 0, 2**64 - 1]:
            assert (value in seen) == (value in model) == _inlined_lookup(seen, value)
        seen.update(set(later) - model)
        model |= set(later)
        _check_buckets(seen)
        assert seen == model


def test_a_set_loaded_from_a_batch_is_built_a_part_at_a_time() -> None:
    """300,000 fingerprints of both kinds (top bits 10 and 00), as a restore reads them:
    no step of the build puts more than a few buckets' worth into the set; values
    crowded into one part go in a slice at a time."""
    rng = random.Random(19)
    values = [rng.getrandbits(62) | (rng.getrandbits(1) << 63) for _ in range(300_000)]
    chunks = [values[start : start + 2048] for start in range(0, len(values), 2048)]
    seen, grew = _load(chunks, len(values))
    assert len(seen) == len(values) and all(v in seen for v in values[::101])
    _check_buckets(seen)
    assert len(grew) > 100 and max(grew) <= seen_module.PART_RATIO * BUCKET_MAX
    crowded = list(range(2**40, 2**40 + 50_000))  # all in one part
    seen, grew = _load([crowded[::-1]], 50_000)
    assert seen == set(crowded)
    _check_buckets(seen)
    assert len(grew) > 10 and max(grew) <= seen_module.SLICE


def test_starts_from_any_values_and_keeps_growing() -> None:
    rng = random.Random(3)
    start = [rng.getrandbits(64) for _ in range(50_000)]
    seen = SeenSet(start)
    assert len(seen.buckets) > 1
    _check_buckets(seen)
    later = {rng.getrandbits(64) for _ in range(30_000)} - set(start)
    seen.update(later)
    _check_buckets(seen)
    assert len(seen) == 80_000 - (30_000 - len(later))
    assert all(v in seen for v in start) and all(v in seen for v in later)
    assert 2**64 - 1 not in seen and "x" not in seen and -1 not in seen


def _written(before: Counter[bytes], seen: SeenSet) -> int:
    """Fingerprints now in buckets that were not there, as they are, before: those that
    an update wrote or moved."""
    left = before.copy()
    written = 0
    for bucket in seen.buckets:
        raw = bucket.tobytes()
        if left[raw]:
            left[raw] -= 1
        else:
            written += len(bucket)
    return written


def _every_update_writes_at_most(bucket_max: int, sizes: list[int], seed: int) -> int:
    """Grow a set by updates of these sizes, checking that each writes at most
    ``bucket_max + 1`` fingerprints per fingerprint added, however large the set."""
    rng = random.Random(seed)
    seen = SeenSet()
    most = 0
    for k in sizes:
        before = Counter(bucket.tobytes() for bucket in seen.buckets)
        seen.update({rng.getrandbits(64) for _ in range(k)})
        written = _written(before, seen)
        assert written <= k * (bucket_max + 1), (written, k, len(seen))
        most = max(most, written)
    return most


def test_no_update_writes_more_than_its_own_buckets() -> None:
    """The work of an update is bounded by its own size, not the set's: every update, up
    to a set 500 times as large as a bucket, writes at most a bucket's worth of
    fingerprints for each it adds. (Merging into every bucket at once, as this set once
    did at every eighth of its size, writes them all: tens of thousands here.)"""
    rng = random.Random(11)
    sizes = [rng.randint(1, 12) for _ in range(5000)]
    with mock.patch.object(seen_module, "BUCKET_MAX", 64):
        most = _every_update_writes_at_most(64, sizes, 12)
    assert sum(sizes) > 500 * 64
    assert most <= 12 * 65


def test_a_large_set_takes_a_commit_without_touching_the_rest() -> None:
    """At its real bucket size: a set of 400,000 fingerprints, given a commit of 50
    (two fingerprints a record for 25 records), writes only the buckets they fall in."""
    rng = random.Random(13)
    seen = SeenSet(array("Q", (rng.getrandbits(64) for _ in range(400_000))))
    for _ in range(20):
        before = Counter(bucket.tobytes() for bucket in seen.buckets)
        new = {rng.getrandbits(64) for _ in range(50)}
        seen.update(new)
        # Buckets hold 1,024 to 2,048: 50 values fall in at most 50 of about 280.
        assert _written(before, seen) <= len(new) * (BUCKET_MAX + 1) < len(seen) / 3
    _check_buckets(seen)


def test_many_fingerprints_cost_about_8_bytes_each_and_never_much_more() -> None:
    rng = random.Random(5)
    tracemalloc.start()
    try:
        seen = SeenSet()
        for _ in range(300):  # as a batch grows: commits of 1,000 records
            seen.update({rng.getrandbits(64) for _ in range(1000)})
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(seen) >= 299_000
    assert current / len(seen) <= 10
    # An update works a bucket at a time: the set never holds a Python int per stored
    # fingerprint (about 40 bytes each), even for a moment.
    assert peak / len(seen) <= 11
    assert max(len(b) for b in seen.buckets) <= BUCKET_MAX
