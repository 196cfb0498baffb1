"""What the policy hands the runner: a ``Step``; and what a poll has read, not yet committed.

``collect`` is the hot path of the service: once per record read, it keeps the
records whose event was neither published (the batch's seen set) nor read
earlier in the same poll.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import Counter
from dataclasses import dataclass, field

from xxhash import xxh3_64_intdigest

from service.records import BalanceRecord, InvalidRecord, authorizer_fingerprint, fingerprint
from service.state import BatchState


@dataclass(frozen=True, slots=True)
class SweepReport:
    """How a read of a whole batch from its first page turned out."""

    outcome: str  # reconciled | partial | nothing
    found: int
    pages: int
    total_processed: int | None
    behind: int
    next_sweep_in_s: float | None


@dataclass(slots=True)
class Step:
    """What the policy decided: the batch after it, what to publish, when to poll next."""

    state: BatchState
    note: str  # what happened, for metrics and logs
    save: bool = False  # write the state to the state topic
    lifecycle: str | None = None  # a lifecycle event to publish (tracking_started, completed...)
    records: list[BalanceRecord] = field(default_factory=list)  # new: publish as events
    invalid: list[InvalidRecord] = field(default_factory=list)  # new: dead-letter
    relisted: int = 0  # of ``records`` and ``invalid``: those of an authorizer the batch had
    counts: Counter[str] = field(default_factory=Counter)  # new records per status name
    poll_in: float | None = None  # delay to the next poll, from this poll's due time
    sweep: SweepReport | None = None
    # The API's count went past the batch's expected_count with this step (logged once).
    above_expected: bool = False
    # The poll ended before the end of the list (policy.Poll): why, as its
    # ``invalid_input_total`` reason: ``empty_pages`` (a run of empty pages that said more
    # follow) or ``more_without_token`` (a page that said more follow without a token).
    cut_short: str | None = None

    @property
    def finished(self) -> bool:
        return self.lifecycle in ("completed", "expired", "failed", "stopped")

    @property
    def size(self) -> int:
        """The records it commits, valid or dead-lettered."""
        return len(self.records) + len(self.invalid)


class Pending:
    """What one poll has read and not yet committed."""

    __slots__ = ("digests", "invalid", "records", "relisted", "unkeyed")

    def __init__(self) -> None:
        self.records: list[BalanceRecord] = []
        self.invalid: list[InvalidRecord] = []
        # Fingerprints to remember: of the new events, and of their authorizers.
        self.digests: set[int] = set()
        self.relisted = 0  # of ``records`` and ``invalid``: those of an authorizer already had
        self.unkeyed = 0  # of ``invalid``: those without a usable authorizer (BatchState.unkeyed)

    @property
    def size(self) -> int:
        """New events: balance events and dead letters."""
        return len(self.records) + len(self.invalid)

    @property
    def new_records(self) -> int:
        """New records as the API counts them (authorizers): events less those relisted."""
        return self.size - self.relisted


def _first_sight(b: BatchState, pending: Pending, event_id: str) -> bool:
    """True, and remembered, if this event was neither published nor read earlier in this poll."""
    d = b.fingerprint(event_id)
    if d in b.seen or d in pending.digests:
        return False
    pending.digests.add(d)
    return True


def _collect_with_authorizers(
    b: BatchState, records: list[BalanceRecord], pending: Pending
) -> None:
    """``collect`` for a batch whose seen set holds the authorizers of its events too.

    The authorizer is looked up first: one the batch never had cannot have an event
    published either, so for a new record (the common case) that one lookup is all.
    One it had is looked up again by event: a known event is skipped, a new one is a
    record listed again with new content (``relisted``).
    """
    fresh, append = pending.digests, pending.records.append
    buckets, firsts = b.seen.buckets, b.seen.firsts
    relisted, xxh3 = 0, xxh3_64_intdigest
    for rec in records:
        eid = rec.event_id
        # records.authorizer_fingerprint and records.fingerprint, inlined
        a = xxh3(rec.authorizer_unique_id.encode()) >> 2
        d = int(eid[19:23] + eid[24:], 16)
        known = a in fresh
        if not known and buckets:  # SeenSet.__contains__, inlined
            bucket = buckets[bisect_right(firsts, a) - 1]
            i = bisect_left(bucket, a)
            known = i < len(bucket) and bucket[i] == a
        if known:
            if d in fresh:
                continue
            if buckets:
                bucket = buckets[bisect_right(firsts, d) - 1]
                i = bisect_left(bucket, d)
                if i < len(bucket) and bucket[i] == d:
                    continue
            relisted += 1
        else:
            fresh.add(a)
        fresh.add(d)
        append(rec)
    pending.relisted += relisted


def collect(
    b: BatchState, records: list[BalanceRecord], invalid: list[InvalidRecord], pending: Pending
) -> None:
    """Add to ``pending`` the records of a page that were neither published nor read before."""
    # Once per record: _first_sight inlined and lookups hoisted (the hot path).
    fresh, append = pending.digests, pending.records.append
    if b.fingerprint is not fingerprint:  # a batch resumed from an older state version
        for rec in records:
            if _first_sight(b, pending, rec.event_id):
                append(rec)
    elif b.tracks_authorizers:
        _collect_with_authorizers(b, records, pending)
    else:
        buckets, firsts = b.seen.buckets, b.seen.firsts
        for rec in records:
            eid = rec.event_id
            d = int(eid[19:23] + eid[24:], 16)  # records.fingerprint, inlined
            if d in fresh:
                continue
            if buckets:  # SeenSet.__contains__, inlined
                bucket = buckets[bisect_right(firsts, d) - 1]
                i = bisect_left(bucket, d)
                if i < len(bucket) and bucket[i] == d:
                    continue
            fresh.add(d)
            append(rec)
    tracks = b.tracks_authorizers
    for bad in invalid:
        if _first_sight(b, pending, bad.event_id):
            pending.invalid.append(bad)
            if bad.authorizer_unique_id is None:
                pending.unkeyed += 1
            elif tracks:
                a = authorizer_fingerprint(bad.authorizer_unique_id)
                if a in pending.digests or a in b.seen:
                    pending.relisted += 1
                else:
                    pending.digests.add(a)
