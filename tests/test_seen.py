"""SeenSet: a set of 64-bit fingerprints that answers like a set and costs 8-16 bytes a record,
with no step that copies the whole set, however large it grows."""

from __future__ import annotations

import random
import tracemalloc
from unittest import mock

from hypothesis import given
from hypothesis import strategies as st

from service import seen as seen_module
from service.seen import BUCKET_MAX, MERGE_MIN, SeenSet

fingerprints = st.integers(min_value=0, max_value=2**64 - 1)


def _grows_like_a_set(additions: list[list[int]], probes: list[int]) -> None:
    """Added to a batch at a time, the set answers as a plain set does, after each batch."""
    seen = SeenSet()
    model: set[int] = set()
    for batch in additions:
        new = set(batch) - model
        seen.update(new)
        model |= new
        assert len(seen) == len(model)
        if seen.buckets:
            _check_buckets(seen)
    for value in [*probes, *model, 0, 2**64 - 1]:
        assert (value in seen) == (value in model)
    assert set(seen) == model
    assert seen == model


@given(st.lists(st.lists(fingerprints, max_size=600), max_size=12), st.lists(fingerprints))
def test_answers_like_a_set(additions: list[list[int]], probes: list[int]) -> None:
    _grows_like_a_set(additions, probes)


def _check_buckets(seen: SeenSet) -> None:
    """Each bucket sorted, within its range, and no fuller than BUCKET_MAX."""
    assert seen.firsts[0] == 0 and seen.firsts == sorted(seen.firsts)
    bounds = [*seen.firsts[1:], 2**64]
    for bucket, low, high in zip(seen.buckets, seen.firsts, bounds, strict=True):
        values = bucket.tolist()
        assert values == sorted(values)
        assert len(values) <= seen_module.BUCKET_MAX
        assert all(low <= v < high for v in values)
    assert seen.stored == sum(len(b) for b in seen.buckets)


@given(st.lists(st.lists(fingerprints, max_size=60), max_size=30), st.lists(fingerprints))
def test_answers_like_a_set_through_many_merges_and_splits(
    additions: list[list[int]], probes: list[int]
) -> None:
    # Tiny buckets and merges: every addition merges, and buckets are cut again and again.
    with (
        mock.patch.object(seen_module, "MERGE_MIN", 2),
        mock.patch.object(seen_module, "BUCKET_MAX", 4),
    ):
        _grows_like_a_set(additions, probes)


def test_starts_from_any_values_and_keeps_growing() -> None:
    rng = random.Random(3)
    start = [rng.getrandbits(64) for _ in range(50_000)]
    seen = SeenSet(start)
    assert len(seen.buckets) > 1 and len(seen.recent) <= MERGE_MIN + seen.stored // 8
    _check_buckets(seen)
    later = {rng.getrandbits(64) for _ in range(30_000)} - set(start)
    seen.update(later)
    _check_buckets(seen)
    assert len(seen) == 80_000 - (30_000 - len(later))
    assert all(v in seen for v in start) and all(v in seen for v in later)
    assert 2**64 - 1 not in seen and "x" not in seen and -1 not in seen


def test_many_fingerprints_cost_at_most_16_bytes_each_and_never_twice_that() -> None:
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
    assert current / len(seen) <= 16
    # A merge works a bucket at a time: the set never holds a Python int per stored
    # fingerprint (about 40 bytes each), even for a moment.
    assert peak / len(seen) <= 24
    assert len(seen.recent) <= MERGE_MIN + seen.stored // 8
    assert max(len(b) for b in seen.buckets) <= BUCKET_MAX
