"""``step.collect``: a page's records go on only if the batch has not published them.

The hot path looks fingerprints up in the seen set itself (``SeenSet.__contains__``
inlined): here against sets small enough for one bucket and large enough for many,
for each kind of fingerprint a batch may use.
A batch of this release keeps its authorizers too, and counts a new event of an
authorizer it had as a record listed again (``relisted``), not as a new record.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from service.records import (
    BalanceRecord,
    InvalidRecord,
    authorizer_fingerprint,
    balance_event_id,
    fingerprint,
    legacy_fingerprint,
    parse_record,
)
from service.state import BatchState
from service.step import Pending, collect

BATCH = "b-collect"


def _record(i: int, correction: int = 0) -> BalanceRecord:
    uid, ts, balance = f"auth-{i}", "2024-08-09T18:10:44Z", f"{i}.25{'1' * correction}"
    return BalanceRecord(uid, balance, 0, ts, balance_event_id(BATCH, uid, ts, balance, 0))


def _commit(state: BatchState, pending: Pending) -> None:
    """What Policy.commit keeps of a poll: its fingerprints and its counts."""
    state.remember(pending.digests)
    state.published += len(pending.records)
    state.dead_lettered += len(pending.invalid)
    state.relisted += pending.relisted


@pytest.mark.parametrize("published", [0, 7, 900, 12_000])
@pytest.mark.parametrize("seen_version", [4, 3, 1])
def test_only_what_was_not_published_goes_on(published: int, seen_version: int) -> None:
    records = [_record(i) for i in range(15_000)]
    state = BatchState(batch_id=BATCH, partition=0, seen_version=seen_version)
    # Published over many commits, as a batch grows, not in the order of the list.
    done = records[:published]
    for start in range(0, published, 500):
        pending = Pending()
        collect(state, list(reversed(done[start : start + 500])), [], pending)
        _commit(state, pending)
    assert state.published == published and state.relisted == 0
    if published > 2048:
        assert state.seen.buckets, "most fingerprints are in the sorted buckets"
    event_fp = legacy_fingerprint if seen_version == 1 else fingerprint
    assert all(event_fp(r.event_id) in state.seen for r in done)
    if seen_version == 4:  # the inlined fingerprint is records.authorizer_fingerprint
        assert all(authorizer_fingerprint(r.authorizer_unique_id) in state.seen for r in done)

    pending = Pending()
    # Pages of 100, the published ones among them, and a page read twice.
    pages = [records[i : i + 100] for i in range(0, len(records), 100)]
    for page in [*pages, pages[-1]]:
        collect(state, page, [], pending)
    assert pending.records == records[published:]
    assert pending.relisted == 0 and pending.new_records == len(records) - published


@pytest.mark.parametrize("published", [5, 3000])
@pytest.mark.parametrize("seen_version", [4, 3])
def test_a_correction_is_a_new_event_and_only_this_release_counts_it_as_no_new_record(
    published: int, seen_version: int
) -> None:
    state = BatchState(batch_id=BATCH, partition=0, seen_version=seen_version)
    pending = Pending()
    collect(state, [_record(i) for i in range(published)], [], pending)
    _commit(state, pending)
    # Read again: records corrected in place (some published, one read in this poll,
    # one corrected twice), the rest as they were, and one new record.
    page = [
        _record(0, 1),
        _record(1),
        _record(published - 1, 1),
        _record(published - 1, 2),
        _record(published),
        _record(published, 1),
    ]
    pending = Pending()
    collect(state, page, [], pending)
    collect(state, page, [], pending)  # the same page again: nothing more
    assert pending.records == [page[0], *page[2:]]
    tracked = seen_version == 4
    assert pending.relisted == (4 if tracked else 0)
    assert pending.new_records == (1 if tracked else 5)
    _commit(state, pending)
    assert state.records_seen == (published + 1 if tracked else published + 5)


def _dead_letter(item: Mapping[str, object]) -> InvalidRecord:
    bad = parse_record(BATCH, item)
    assert isinstance(bad, InvalidRecord)
    return bad


def test_a_dead_letter_is_a_record_and_its_correction_is_not_a_new_one() -> None:
    state = BatchState(batch_id=BATCH, partition=0)
    broken = {"authorizer_unique_id": "auth-7", "balance": "n/a", "timestamp": "x"}
    nameless = {"balance": 1, "timestamp": "2024-08-09T18:10:44Z", "balance_status_code": 0}
    pending = Pending()
    collect(state, [_record(1)], [_dead_letter(broken), _dead_letter(nameless)], pending)
    assert (pending.size, pending.new_records) == (3, 3)
    _commit(state, pending)
    # The broken record comes back valid, and record 1 comes back broken: two new events
    # (a balance event and a dead letter), no new record.
    pending = Pending()
    again = {"authorizer_unique_id": "auth-1", "balance": [], "timestamp": "x"}
    collect(state, [_record(7)], [_dead_letter(again), _dead_letter(nameless)], pending)
    assert pending.records == [_record(7)] and len(pending.invalid) == 1
    assert (pending.relisted, pending.new_records) == (2, 0)
    _commit(state, pending)
    assert state.records_seen == 3


def test_a_dead_letter_whose_authorizer_id_is_a_number_is_counted_by_it() -> None:
    """An authorizer ID sent as a JSON number (the schema's string, as digits, the vendor's
    own example) is refused, but names the authorizer: the record listed again with new
    content is a new dead letter and no new record. Counted as a new record each time, it
    would stand in for a record still behind the cursor."""
    state = BatchState(batch_id=BATCH, partition=0)
    first = {"authorizer_unique_id": 1286672, "timestamp": "2024-08-09T18:10:44Z"}
    changed = {**first, "balance": 10, "balance_status_code": 0}
    pending = Pending()
    collect(state, [], [_dead_letter(first)], pending)
    _commit(state, pending)
    pending = Pending()
    collect(state, [], [_dead_letter(changed)], pending)
    assert len(pending.invalid) == 1 and (pending.relisted, pending.new_records) == (1, 0)
    _commit(state, pending)
    # ... and so is the valid record that finally comes with the ID as a string
    pending = Pending()
    valid = parse_record(BATCH, {**changed, "authorizer_unique_id": "1286672"})
    assert isinstance(valid, BalanceRecord)
    collect(state, [valid], [], pending)
    assert (pending.relisted, pending.new_records) == (1, 0)
    _commit(state, pending)
    assert state.records_seen == 1


def test_a_dead_letter_is_the_same_while_its_records_fields_are() -> None:
    """A field outside the vendor's schema that changes with every response (a request id)
    on a record refused for its balance: the same dead letter at every poll, not a new one
    each time (which kept the batch from ever being idle, and flooded the dead-letter
    topic). Without a usable authorizer ID, records that differ only in such fields are
    still told apart: nothing else can tell two of them apart."""
    state = BatchState(batch_id=BATCH, partition=0)
    bad = {"authorizer_unique_id": "auth-3", "balance": "n/a", "timestamp": "x"}
    nameless = {"balance": "n/a", "timestamp": "x"}
    pending = Pending()
    invalid = [_dead_letter({**bad, "served_at": "1"}), _dead_letter({**nameless, "n": 1})]
    collect(state, [], invalid, pending)
    _commit(state, pending)
    pending = Pending()
    again = [_dead_letter({**bad, "served_at": "2"}), _dead_letter({**nameless, "n": 2})]
    collect(state, [], again, pending)
    assert [d.raw for d in pending.invalid] == [again[1].raw]
    assert pending.new_records == 1
    # ... and a change to one of its record's fields is a new dead letter (no new record)
    pending = Pending()
    collect(state, [], [_dead_letter({**bad, "balance": "none", "served_at": "3"})], pending)
    assert (len(pending.invalid), pending.relisted, pending.new_records) == (1, 1, 0)
