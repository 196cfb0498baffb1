"""``step.collect``: a page's records go on only if the batch has not published them.

The hot path looks a fingerprint up in the seen set itself (``SeenSet.__contains__``
inlined): here against sets small enough to be all recent additions and large
enough to be mostly in sorted buckets, for both kinds of fingerprint a batch may use.
"""

from __future__ import annotations

import pytest

from service.records import BalanceRecord, balance_event_id, fingerprint, legacy_fingerprint
from service.state import BatchState
from service.step import Pending, collect

BATCH = "b-collect"


def _records(n: int) -> list[BalanceRecord]:
    out = []
    for i in range(n):
        uid, ts, balance = f"auth-{i}", "2024-08-09T18:10:44Z", f"{i}.25"
        event_id = balance_event_id(BATCH, uid, ts, balance, 0)
        out.append(BalanceRecord(uid, balance, 0, ts, event_id))
    return out


@pytest.mark.parametrize("published", [0, 7, 900, 12_000])
@pytest.mark.parametrize("seen_version", [3, 1])
def test_only_what_was_not_published_goes_on(published: int, seen_version: int) -> None:
    records = _records(15_000)
    state = BatchState(batch_id=BATCH, partition=0, seen_version=seen_version)
    fp = fingerprint if seen_version == 3 else legacy_fingerprint
    # Published over many commits, as a batch grows, but not in the order of the list.
    done = records[:published]
    for start in range(0, published, 500):
        state.remember(fp(r.event_id) for r in reversed(done[start : start + 500]))
    if published > 2048:
        assert state.seen.buckets, "most fingerprints are in the sorted buckets"

    pending = Pending()
    # Pages of 100, the published ones among them, and a page read twice.
    pages = [records[i : i + 100] for i in range(0, len(records), 100)]
    for page in [*pages, pages[-1]]:
        collect(state, page, [], pending)
    assert pending.records == records[published:]
