"""A vendor model and a synchronous driver for the batch policy (no broker, no clock).

``Vendor`` lists a batch the way the API's page allows: in an order it does not
document, with records that may appear anywhere in the list later (behind a
reader's cursor), page tokens that are offsets, and a count (``total_processed``)
that may be given or not. ``Driver`` applies the policy's steps the way the
runner does: a step's state becomes the batch's state at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from service.config import PollingConfig
from service.policy import Policy, Poll
from service.records import BalanceRecord, InvalidRecord, Page, balance_event_id
from service.requests import TrackingRequest
from service.state import BatchState, StateRestore, state_records
from service.step import Step

BATCH = "batch-1"


def record(n: int, batch_id: str = BATCH) -> BalanceRecord:
    uid = f"auth-{n:06d}"
    ts = "2026-11-28T10:00:00Z"
    balance, code = f"{n}.01", n % 3
    return BalanceRecord(uid, balance, code, ts, balance_event_id(batch_id, uid, ts, balance, code))


def read_back(
    records: Iterable[tuple[bytes | None, bytes | None]], batch_id: str, partition: int = 0
) -> BatchState | None:
    """One batch read back whole from state-topic records (key, value), as
    ``PartitionOwner.load_batch`` reads it; ValueError if they are not understood."""
    restore = StateRestore(partition, only=[batch_id])
    for key, value in records:
        restore.apply(key, value)
    errors: list[ValueError] = []
    batches = restore.batches(lambda _batch_id, exc: errors.append(exc))
    if errors:
        raise errors[0]
    return batches.get(batch_id)


@dataclass
class Vendor:
    """One batch's listing. Tokens are offsets into the list as it is when asked."""

    # Dead letters (InvalidRecord) stand in the list as the records they were parsed from.
    records: list[BalanceRecord | InvalidRecord] = field(default_factory=list)
    page_size: int = 2
    counts: bool = True  # whether pages carry total_processed
    unlisted: int = 0  # records the count includes that the list does not show yet

    def insert(self, position: int, rec: BalanceRecord) -> None:
        self.records.insert(min(position, len(self.records)), rec)

    def amend(self, position: int) -> None:
        """The record at ``position`` corrected in place: same authorizer, new content."""
        listed = self.records[position]
        assert isinstance(listed, BalanceRecord)
        uid, balance, code, ts, _ = listed
        balance = f"{balance}1"
        event_id = balance_event_id(BATCH, uid, ts, balance, code)
        self.records[position] = BalanceRecord(uid, balance, code, ts, event_id)

    def page(self, token: str | None) -> Page:
        start = 0 if token is None else int(token[1:])
        end = start + self.page_size
        more = end < len(self.records)
        return Page(
            batch_id=BATCH,
            total_processed=len(self.records) + self.unlisted if self.counts else None,
            has_more=more,
            next_page_token=f"t{end}" if more else None,
            records=[r for r in self.records[start:end] if isinstance(r, BalanceRecord)],
            invalid=[r for r in self.records[start:end] if isinstance(r, InvalidRecord)],
        )


def config(**changes: float) -> PollingConfig:
    base: dict[str, float] = {
        "interval_min_s": 30.0,
        "interval_max_s": 60.0,
        "not_found_grace_s": 300.0,
        "complete_after_idle_s": 900.0,
        "max_age_s": 86400.0,
        "max_records_per_transaction": 1000,
        "sweep_interval_s": 600.0,
        "sweep_backoff_max_s": 3600.0,
    }
    base.update(changes)
    return PollingConfig(**base)


@dataclass
class Driver:
    """Applies steps as the runner does, and keeps what was published and saved."""

    policy: Policy
    vendor: Vendor
    now: float = 1_000_000.0
    state: BatchState | None = None
    emitted: list[str] = field(default_factory=list)  # event ids of balance events
    lifecycle: list[str] = field(default_factory=list)
    saved: list[BatchState] = field(default_factory=list)  # every state written
    listed_at_completion: list[str] | None = None  # the vendor's event ids when it completed
    authorizers: set[str] = field(default_factory=set)  # of the balance events
    authorizers_at_completion: set[str] | None = None  # the vendor's, when it completed

    # The state topic's records, as the runner's commits write them.
    state_log: list[tuple[bytes, bytes | None]] = field(default_factory=list)

    def apply(self, step: Step | None) -> Step | None:
        if step is None:
            return None
        self.state = step.state
        if step.save:
            self.state_log += state_records(step.state)
        self.emitted += [r.event_id for r in step.records]
        self.authorizers.update(r.authorizer_unique_id for r in step.records)
        if step.lifecycle:
            self.lifecycle.append(step.lifecycle)
        if step.lifecycle == "completed":
            self.listed_at_completion = [r.event_id for r in self.vendor.records]
            self.authorizers_at_completion = {
                r.authorizer_unique_id
                for r in self.vendor.records
                if r.authorizer_unique_id is not None
            }
        if step.save:
            self.saved.append(step.state)
        return step

    def track(self, expected_count: int | None = None) -> Step:
        req = TrackingRequest(batch_id=BATCH, expected_count=expected_count)
        step = self.policy.track(self.state, req, 0, self.now)
        self.apply(step)
        return step

    def stop(self) -> Step | None:
        return self.apply(self.policy.stop(self.state, self.now))

    def begin(self) -> Poll | None:
        assert self.state is not None
        if not self.state.seen_loaded:  # tracked again: read back, as the runner does
            stored = read_back(self.state_log, BATCH)
            assert stored is not None and stored.generation == self.state.generation
            self.state.seen, self.state.seen_loaded = stored.seen, True
        begun = self.policy.begin(self.state, self.now)
        if isinstance(begun, Step):
            self.apply(begun)
            return None
        return begun

    def page(self, poll: Poll) -> Step | None:
        return self.apply(poll.page(self.state, self.vendor.page(poll.token), self.now))

    def poll(self) -> Step | None:
        """One whole poll; its last step (None if it committed nothing)."""
        poll = self.begin()
        if poll is None:
            return None
        last = None
        while not poll.done:
            last = self.page(poll) or last
        return last
