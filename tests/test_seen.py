"""SeenSet: a set of 64-bit fingerprints that answers like a set and costs 8-16 bytes a record."""

from __future__ import annotations

import random
import tracemalloc

from hypothesis import given
from hypothesis import strategies as st

from service.seen import MERGE_MIN, SeenSet

fingerprints = st.integers(min_value=0, max_value=2**64 - 1)


@given(st.lists(st.lists(fingerprints, max_size=600), max_size=12), st.lists(fingerprints))
def test_answers_like_a_set(additions: list[list[int]], probes: list[int]) -> None:
    seen = SeenSet()
    model: set[int] = set()
    for batch in additions:
        new = set(batch) - model
        seen.update(new)
        model |= new
        assert len(seen) == len(model)
    for value in [*probes, *model]:
        assert (value in seen) == (value in model)
    assert set(seen) == model
    assert seen == model


def test_starts_from_any_values_and_keeps_growing() -> None:
    rng = random.Random(3)
    start = [rng.getrandbits(64) for _ in range(5000)]
    seen = SeenSet(start)
    assert len(seen.sorted) == 5000 and not seen.recent  # a big start goes to the array
    later = {rng.getrandbits(64) for _ in range(3000)} - set(start)
    seen.update(later)
    assert all(v in seen for v in start) and all(v in seen for v in later)
    assert 2**64 - 1 not in seen and "x" not in seen


def test_many_fingerprints_cost_at_most_16_bytes_each() -> None:
    rng = random.Random(5)
    tracemalloc.start()
    try:
        seen = SeenSet()
        for _ in range(300):  # as a batch grows: commits of 1,000 records
            seen.update({rng.getrandbits(64) for _ in range(1000)})
        current, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(seen) >= 299_000
    assert current / len(seen) <= 16
    assert len(seen.recent) <= MERGE_MIN + len(seen.sorted) // 8
