"""The runner's races, made deterministic: a page source and a committer held by the test.

Both fakes stand for what is outside the process (the vendor's API, the broker);
the integration suites run the same runner against the simulator and real Kafka.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence

import pytest
import structlog
from policy_harness import BATCH, Vendor, read_back, record

from service.config import Settings
from service.errors import ApiBadRequest, ApiError, ApiNotFound, UnknownStateVersion
from service.events import BalanceEvents, EventFactory, OutMessage, Publishable
from service.kafka import canonical_partition
from service.metrics import Metrics
from service.records import InvalidRecord, Page, parse_record
from service.requests import (
    FORWARDED_HEADER,
    MAX_REQUEST_BYTES,
    TrackingRequest,
    decode_request,
)
from service.state import BatchState, StateRestore, decode_state
from service.tracker import Tracker
from service.worker import PartitionWorker


class HeldSource:
    """Pages from a Vendor; each request waits until the test lets it through."""

    def __init__(self, vendor: Vendor) -> None:
        self.vendor = vendor
        self.asked: asyncio.Queue[str | None] = asyncio.Queue()
        self.gate: asyncio.Queue[None] = asyncio.Queue()
        self.held = True

    async def fetch_page(
        self,
        batch_id: str,
        token: str | None,
        limit: int | None = None,
        *,
        stop: Callable[[], bool] | None = None,
        content_ids: bool = True,
    ) -> Page:
        self.asked.put_nowait(token)
        if self.held:
            await self.gate.get()
        return self.vendor.page(token)

    def release(self) -> None:
        self.gate.put_nowait(None)


class HeldCommitter:
    """Keeps every unit in order; a unit commits when the test releases it (or at once)."""

    def __init__(self, hold: bool = False) -> None:
        self.units: list[tuple[list[Publishable], int | None]] = []
        self.hold = hold
        self.gates: list[asyncio.Event] = []
        self.queued = asyncio.Event()  # set whenever a unit is queued
        self.on_failure: Callable[[BaseException], None] | None = None

    async def publish(
        self, messages: Sequence[Publishable], request_offset: int | None = None
    ) -> None:
        self.units.append((list(messages), request_offset))
        self.queued.set()
        gate = asyncio.Event()
        self.gates.append(gate)
        if not self.hold:
            gate.set()
        await gate.wait()

    def release_all(self) -> None:
        self.hold = False
        for gate in self.gates:
            gate.set()

    async def close(self, timeout: float) -> None:
        self.release_all()

    def messages(self) -> list[Publishable]:
        return [m for unit, _ in self.units for m in unit]

    def summaries(self, batch_id: str = BATCH) -> list[BatchState]:
        return [
            decode_state(m.value, 0)
            for m in self.messages()
            if isinstance(m, OutMessage)
            and m.topic != "batch-events"
            and m.key == batch_id.encode()
            and m.value
        ]

    def events(self) -> list[str]:
        out: list[str] = []
        for m in self.messages():
            if isinstance(m, BalanceEvents):
                out += [f"record:{r.event_id}" for r in m.records]
            elif isinstance(m, OutMessage) and m.topic == "batch-events":
                out.append(json.loads(m.value or b"{}")["event"])
        return out


def runner(source: HeldSource | Vendors, **polling: float) -> Tracker:
    settings = Settings.model_validate(
        {
            "kafka": {"partitions": 1, "batch_events_topic": "batch-events"},
            "polling": {"interval_min_s": 30, "interval_max_s": 30, **polling},
        }
    )
    factory = EventFactory(balances_topic="balances", batch_events_topic="batch-events", source="s")
    return Tracker(settings, source=source, metrics=Metrics(), factory=factory)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def started(tracker: Tracker, worker: PartitionWorker, req: TrackingRequest) -> None:
    await tracker.handle_request(worker, req, 0)


async def test_a_stop_is_applied_at_once_and_a_running_poll_cannot_undo_it() -> None:
    source = HeldSource(Vendor([record(i) for i in range(6)]))
    tracker = runner(source, max_records_per_transaction=2)
    committer = HeldCommitter()
    worker = PartitionWorker(partition=0, publisher=committer)
    tracker.add_worker(worker)
    scheduler = asyncio.create_task(tracker.run())
    try:
        await started(tracker, worker, TrackingRequest(batch_id=BATCH))
        assert await source.asked.get() is None  # the poll asks for page 1 and waits
        source.release()
        assert await source.asked.get() == "t2"  # page 1 committed; page 2 asked
        # The stop is committed while the poll still waits for its page: it waits for nothing.
        stop = TrackingRequest(batch_id=BATCH, action="stop")
        await asyncio.wait_for(tracker.handle_request(worker, stop, 1), 1.0)
        source.held = False
        source.release()
        await settle()
        assert not worker.polls  # the poll ended on its next page, without committing it
    finally:
        tracker.stop()
        scheduler.cancel()
    events = committer.events()
    assert events[0] == "tracking_started" and events[-1] == "stopped"
    assert len([e for e in events if e.startswith("record:")]) == 2
    assert committer.summaries()[-1].status == "stopped"
    assert BATCH not in tracker.due  # not polled again
    assert worker.batches[BATCH].status == "stopped"


async def test_a_stop_does_not_wait_for_a_poll_nor_hold_up_requests_of_other_batches() -> None:
    source = HeldSource(Vendor([record(i) for i in range(2)]))
    tracker = runner(source)
    worker = PartitionWorker(partition=0, publisher=HeldCommitter())
    tracker.add_worker(worker)
    scheduler = asyncio.create_task(tracker.run())
    try:
        await started(tracker, worker, TrackingRequest(batch_id=BATCH))
        await source.asked.get()  # a poll is under way and will not end by itself
        stop = TrackingRequest(batch_id=BATCH, action="stop")
        other = TrackingRequest(batch_id="batch-2")
        done = asyncio.gather(
            tracker.handle_request(worker, stop, 1),
            tracker.handle_request(worker, other, 2),
        )
        await asyncio.wait_for(done, 1.0)
        assert worker.polls  # the poll is still waiting for its page
    finally:
        source.held = False
        source.release()
        tracker.stop()
        scheduler.cancel()


async def test_an_expected_count_during_a_poll_with_a_commit_in_flight_is_kept() -> None:
    source = HeldSource(Vendor([record(i) for i in range(6)]))
    source.held = False
    tracker = runner(source, max_records_per_transaction=2)
    committer = HeldCommitter()
    worker = PartitionWorker(partition=0, publisher=committer)
    tracker.add_worker(worker)
    await started(tracker, worker, TrackingRequest(batch_id=BATCH))
    committer.hold = True  # the poll's commits stay in flight
    scheduler = asyncio.create_task(tracker.run())
    try:
        while len(committer.units) < 2:  # the poll's first commit is queued, not committed
            committer.queued.clear()
            await committer.queued.wait()
        update = TrackingRequest(batch_id=BATCH, expected_count=6)
        pending = tracker.handle_request(worker, update, 1)
        await settle()
        committer.release_all()
        await asyncio.wait_for(pending, 1.0)
        for _ in range(100):  # until the completion is handed to the committer
            summaries = committer.summaries()
            if summaries and summaries[-1].status != "tracking":
                break
            await asyncio.sleep(0.01)
    finally:
        tracker.stop()
        scheduler.cancel()
    saved = committer.summaries()
    cursors = [int(s.cursor[1:]) if s.cursor else 0 for s in saved]
    assert cursors == sorted(cursors)  # no write moved the cursor back
    published = [s.published for s in saved]
    assert published == sorted(published)  # nor the count of what was published
    assert saved[-1].expected_count == 6 and saved[-1].status == "completed"


async def test_401_pauses_every_poll_until_the_key_is_accepted() -> None:
    from service.errors import ApiUnauthorized

    class Refusing(HeldSource):
        async def fetch_page(
            self, batch_id: str, token: str | None, *a: object, **k: object
        ) -> Page:
            self.asked.put_nowait(batch_id)
            raise ApiUnauthorized("bad key", status=401)

    source = Refusing(Vendor())
    tracker = runner(source, interval_min_s=0, interval_max_s=0)
    worker = PartitionWorker(partition=0, publisher=HeldCommitter())
    tracker.add_worker(worker)
    scheduler = asyncio.create_task(tracker.run())
    try:
        await started(tracker, worker, TrackingRequest(batch_id=BATCH))
        await asyncio.wait_for(source.asked.get(), 1.0)
        await asyncio.sleep(0.05)
        assert tracker.unauthorized and source.asked.empty()  # no poll while the key is refused
        assert worker.batches[BATCH].failures == 0
        tracker.set_authorized()
        await asyncio.wait_for(source.asked.get(), 1.0)  # polling resumes
    finally:
        tracker.stop()
        scheduler.cancel()


async def test_records_read_before_a_page_that_fails_are_committed_with_their_cursor() -> None:
    """A page that fails mid-poll (here for good: a 5xx on every try) ends the poll, but
    the pages read before it were read in order: their records are published and the
    cursor moves past them. Dropped, they would be read again and dropped again at every
    poll for as long as the failing page lasts, and never published."""
    from service.errors import ApiServerError

    class BrokenAfterFirst(HeldSource):
        async def fetch_page(
            self, batch_id: str, token: str | None, *a: object, **k: object
        ) -> Page:
            self.asked.put_nowait(token)
            if token is not None:
                raise ApiServerError("HTTP 503", status=503)
            return self.vendor.page(token)

    vendor = Vendor([record(i) for i in range(6)])
    source = BrokenAfterFirst(vendor)
    tracker = runner(source, interval_min_s=0, interval_max_s=0, max_records_per_transaction=1000)
    committer = HeldCommitter()
    worker = PartitionWorker(partition=0, publisher=committer)
    tracker.add_worker(worker)
    scheduler = asyncio.create_task(tracker.run())
    try:
        await started(tracker, worker, TrackingRequest(batch_id=BATCH))
        assert await asyncio.wait_for(source.asked.get(), 1.0) is None
        assert await asyncio.wait_for(source.asked.get(), 1.0) == "t2"
        # The next poll starts where the failed page is, not from the first page again.
        assert await asyncio.wait_for(source.asked.get(), 5.0) == "t2"
    finally:
        tracker.stop()
        scheduler.cancel()
    first_page = {f"record:{r.event_id}" for r in vendor.records[:2]}
    published = [e for e in committer.events() if e.startswith("record:")]
    assert sorted(published) == sorted(first_page)
    assert committer.summaries()[-1].cursor == "t2"
    assert worker.batches[BATCH].failures >= 1


def test_a_summary_of_an_unknown_newer_version_is_refused_with_a_clear_error() -> None:
    restore = StateRestore(0)
    newer = json.dumps({"v": 99, "batch_id": BATCH, "generation": 1, "status": "tracking"})
    restore.apply(BATCH.encode(), newer.encode())
    restore.apply(b"fine", _summary("fine"))
    errors: dict[str, ValueError] = {}

    def on_error(batch_id: str, exc: ValueError) -> None:
        errors[batch_id] = exc

    batches = restore.batches(on_error)
    assert list(batches) == ["fine"]
    assert isinstance(errors[BATCH], UnknownStateVersion)
    assert "state version 99 is newer" in str(errors[BATCH])


def _summary(batch_id: str) -> bytes:
    from service.state import state_records

    return state_records(BatchState(batch_id=batch_id, partition=0))[-1][1] or b""


async def test_requests_for_an_unreadable_batch_are_refused_and_its_state_left_alone() -> None:
    source = HeldSource(Vendor())
    tracker = runner(source)
    committer = HeldCommitter()
    worker = PartitionWorker(
        partition=0, publisher=committer, unreadable={BATCH: "state version 99 is newer"}
    )
    tracker.add_worker(worker)
    for offset, action in enumerate(("track", "stop")):
        req = TrackingRequest(batch_id=BATCH, action=action)
        await tracker.handle_request(worker, req, offset)
    assert committer.units == [([], 1), ([], 2)]  # offsets committed, nothing written
    sample = tracker.metrics.registry.get_sample_value
    assert sample("rightfoot_poller_batches_unreadable") == 1
    labels = {"action": "track", "result": "unreadable"}
    assert sample("rightfoot_poller_tracking_requests_total", labels) == 1


class Vendors:
    """Every batch's listing, each from its own Vendor; no request waits."""

    def __init__(self, vendors: dict[str, Vendor]) -> None:
        self.vendors = vendors

    async def fetch_page(self, batch_id: str, token: str | None, *a: object, **k: object) -> Page:
        await asyncio.sleep(0)
        return self.vendors[batch_id].page(token)


async def test_the_records_held_stay_within_max_records_in_flight_and_none_is_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 20 batches of 50 records, all listed at once; a poll would gather a whole batch
    # (max_records_per_transaction 1000) and the commits wait: without the bound the
    # replica would hold all 1,000 records. Within 60, the polls must commit early.
    batches = {f"batch-{n}": [record(i, f"batch-{n}") for i in range(50)] for n in range(20)}
    source = Vendors({b: Vendor(list(recs), page_size=10) for b, recs in batches.items()})
    settings = Settings.model_validate(
        {
            "kafka": {"partitions": 1, "batch_events_topic": "batch-events"},
            "rightfoot": {"page_limit": 10},
            "polling": {
                "interval_min_s": 30,
                "interval_max_s": 30,
                "max_records_per_transaction": 1000,
                "max_records_in_flight": 60,
            },
        }
    )
    factory = EventFactory(balances_topic="balances", batch_events_topic="batch-events", source="s")
    tracker = Tracker(settings, source=source, metrics=Metrics(), factory=factory)
    room = tracker.room
    peaks: list[int] = []
    add = room._add

    def spied(n: int) -> None:
        add(n)
        peaks.append(room.held)

    monkeypatch.setattr(room, "_add", spied)
    committer = HeldCommitter(hold=True)
    worker = PartitionWorker(partition=0, publisher=committer)
    tracker.add_worker(worker)

    async def commit_slowly() -> None:
        while True:
            await asyncio.sleep(0.002)
            for gate in list(committer.gates):
                gate.set()

    releaser = asyncio.create_task(commit_slowly())
    for offset, batch_id in enumerate(batches):  # all tracked before the first poll
        req = TrackingRequest(batch_id=batch_id, expected_count=50)
        await tracker.handle_request(worker, req, offset)
    scheduler = asyncio.create_task(tracker.run())
    try:
        for _ in range(500):
            if room.held == 0 and all(b.status == "completed" for b in worker.batches.values()):
                break
            await asyncio.sleep(0.01)
    finally:
        tracker.stop()
        scheduler.cancel()
        releaser.cancel()
    assert all(b.status == "completed" for b in worker.batches.values())
    published = committer.events()
    records = [e for e in published if e.startswith("record:")]
    expected = {f"record:{r.event_id}" for recs in batches.values() for r in recs}
    assert len(records) == len(set(records)) and set(records) == expected
    assert max(peaks) <= 60 and max(peaks) >= 50  # the bound, and it was reached
    assert room.held == 0  # every record's room given back once committed
    assert tracker.metrics.registry.get_sample_value("rightfoot_poller_records_held") == 0
    # Polls committed early (a commit per poll would have been 20 units with records).
    with_records = [u for u, _ in committer.units if any(isinstance(m, BalanceEvents) for m in u)]
    assert len(with_records) > 20


async def test_fingerprints_held_count_what_the_replica_keeps_in_memory() -> None:
    """Two fingerprints a record (its event, its authorizer) while a batch may still see
    records; none once it completed, nor once it stopped (they stay on the state topic,
    should it be tracked again)."""
    names = ("done", "open", "stopped")
    source = Vendors({b: Vendor([record(i, b) for i in range(30)], page_size=10) for b in names})
    tracker = runner(source)
    registry = tracker.metrics.registry
    worker = PartitionWorker(partition=0, publisher=HeldCommitter())
    tracker.add_worker(worker)

    def held() -> float | None:
        return registry.get_sample_value("rightfoot_poller_fingerprints_held")

    assert held() == 0
    for offset, (batch_id, count) in enumerate((("done", 30), ("open", 40), ("stopped", 40))):
        req = TrackingRequest(batch_id=batch_id, expected_count=count)
        await tracker.handle_request(worker, req, offset)
    scheduler = asyncio.create_task(tracker.run())
    try:
        for _ in range(200):
            seen = {b: len(worker.batches[b].seen) for b in names}
            done = worker.batches["done"].status == "completed"  # and its fingerprints let go
            if done and seen == {"done": 0, "open": 60, "stopped": 60}:
                break
            await asyncio.sleep(0.01)
        stop = TrackingRequest(batch_id="stopped", action="stop")
        await tracker.handle_request(worker, stop, 3)
        await settle()
    finally:
        tracker.stop()
        scheduler.cancel()
    statuses = {b: worker.batches[b].status for b in names}
    assert statuses == {"done": "completed", "open": "tracking", "stopped": "stopped"}
    assert len(worker.batches["open"].seen) == 60
    assert len(worker.batches["stopped"].seen) == 0 and not worker.batches["stopped"].seen_loaded
    assert held() == 60


class Trace:
    """What reached the vendor and the state topic, in order."""

    def __init__(self) -> None:
        self.steps: list[str] = []


class TracedVendors(Vendors):
    def __init__(self, vendors: dict[str, Vendor], trace: Trace) -> None:
        super().__init__(vendors)
        self.trace = trace

    async def fetch_page(self, batch_id: str, token: str | None, *a: object, **k: object) -> Page:
        self.trace.steps.append(f"page:{token}")
        return await super().fetch_page(batch_id, token)


def state_reader(
    tracker: Tracker, committer: HeldCommitter, trace: Trace, faults: list[str]
) -> Callable[[int, str], Awaitable[BatchState | None]]:
    """PartitionOwner.load_batch over what the committer committed. ``faults`` are
    the next reads' faults, in order: "down" (Kafka unreachable) or "behind" (the last
    commit not yet visible to the read)."""

    async def load(partition: int, batch_id: str) -> BatchState | None:
        fault = faults.pop(0) if faults else None
        trace.steps.append(f"load:{fault or 'ok'}")
        if fault == "down":
            raise ConnectionError("broker unreachable")
        units = [
            u for (u, _), g in zip(committer.units, committer.gates, strict=True) if g.is_set()
        ]
        if fault == "behind":
            units = units[:-1]
        topic = tracker.settings.kafka.state_topic
        records = [
            (m.key, m.value)
            for unit in units
            for m in unit
            if isinstance(m, OutMessage) and m.topic == topic
        ]
        return read_back(records, batch_id, partition)

    return load


async def test_a_batch_tracked_again_reads_its_fingerprints_back_before_any_page() -> None:
    """Stopped after 30 records, tracked again once 10 more are listed: its first poll
    reads its fingerprints from the state topic before it asks the API for anything;
    a read that fails, or that does not yet show the commit that tracked it again, is
    tried again; every record is published once."""
    vendor = Vendor([record(i) for i in range(30)], page_size=10)
    trace = Trace()
    tracker = runner(
        TracedVendors({BATCH: vendor}, trace), interval_min_s=0.02, interval_max_s=0.02
    )
    committer = HeldCommitter()
    worker = PartitionWorker(partition=0, publisher=committer)
    tracker.add_worker(worker)
    faults: list[str] = []
    tracker.load_batch = state_reader(tracker, committer, trace, faults)
    registry = tracker.metrics.registry
    scheduler = asyncio.create_task(tracker.run())
    try:
        await started(tracker, worker, TrackingRequest(batch_id=BATCH))
        for _ in range(200):
            if worker.batches[BATCH].published == 30:
                break
            await asyncio.sleep(0.01)
        stop = TrackingRequest(batch_id=BATCH, action="stop")
        await tracker.handle_request(worker, stop, 1)
        assert len(worker.batches[BATCH].seen) == 0
        vendor.records += [record(i) for i in range(30, 40)]
        faults += ["down", "behind"]
        mark = len(trace.steps)
        again = TrackingRequest(batch_id=BATCH, expected_count=40)
        await tracker.handle_request(worker, again, 2)
        for _ in range(500):
            # The batch's state is completed when its last step is queued; what that step
            # publishes reaches the committer a turn of the event loop later.
            if "completed" in committer.events():
                break
            await asyncio.sleep(0.01)
    finally:
        tracker.stop()
        scheduler.cancel()
    assert worker.batches[BATCH].status == "completed"
    after = trace.steps[mark:]
    assert after[:3] == ["load:down", "load:behind", "load:ok"], after
    assert all(step.startswith("page:") for step in after[3:])
    records = [e for e in committer.events() if e.startswith("record:")]
    assert sorted(records) == sorted(f"record:{record(i).event_id}" for i in range(40))
    loads = {
        o: registry.get_sample_value("rightfoot_poller_fingerprint_loads_total", {"outcome": o})
        for o in ("loaded", "not_visible", "failed")
    }
    assert loads == {"loaded": 1, "not_visible": 1, "failed": 1}
    assert len(worker.batches[BATCH].seen) == 0  # completed: let go


def state_log(tracker: Tracker, committer: HeldCommitter) -> list[tuple[bytes, bytes | None]]:
    """The state-topic records the committer committed, in order."""
    topic = tracker.settings.kafka.state_topic
    return [
        (m.key or b"", m.value)
        for m in committer.messages()
        if isinstance(m, OutMessage) and m.topic == topic
    ]


def restored(records: list[tuple[bytes, bytes | None]]) -> dict[str, BatchState]:
    """The batches a restore of the partition would give from ``records``."""
    restore = StateRestore(0)
    for key, value in records:
        restore.apply(key, value)
    return restore.batches(lambda batch_id, exc: pytest.fail(f"{batch_id}: {exc}"))


async def run_until(cond: Callable[[], bool], what: str) -> None:
    """Until ``cond`` holds, then a few turns of the event loop: a batch's state changes
    when its step is queued, and what the step publishes reaches the committer a turn
    later."""
    for _ in range(500):
        if cond():
            await settle()
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"never {what}")


def forgetting(
    source: Vendors, **polling: float
) -> tuple[Tracker, list[float], HeldCommitter, PartitionWorker]:
    """A runner with a retention of 100 s, its wall clock in the test's hands (``wall[0]``),
    and one partition."""
    tracker = runner(
        source, interval_min_s=0.01, interval_max_s=0.01, finished_retention_s=100, **polling
    )
    wall = [1_000_000.0]
    tracker.wall = lambda: wall[0]
    committer = HeldCommitter()
    worker = PartitionWorker(partition=0, publisher=committer)
    tracker.add_worker(worker)
    return tracker, wall, committer, worker


async def test_finished_batches_are_forgotten_once_kept_for_the_retention(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A completed and a stopped batch are kept ``finished_retention_s``, then dropped from
    memory and tombstoned (the stopped one's chunks first, its summary last); a batch still
    tracking is left alone, a restore from the log finds neither, and a new tracking request
    for the completed one starts it anew."""
    monkeypatch.setattr("service.state.CHUNK_FPS", 16)  # the stopped batch: several chunks
    names = ("done", "open", "stopped")
    source = Vendors({b: Vendor([record(i, b) for i in range(30)], page_size=10) for b in names})
    tracker, wall, committer, worker = forgetting(source)
    registry = tracker.metrics.registry

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    for offset, (batch_id, count) in enumerate((("done", 30), ("open", 40), ("stopped", 40))):
        req = TrackingRequest(batch_id=batch_id, expected_count=count)
        await tracker.handle_request(worker, req, offset)
    scheduler = asyncio.create_task(tracker.run())
    try:
        await run_until(
            lambda: (
                worker.batches["done"].status == "completed"
                and all(worker.batches[b].published == 30 for b in names)
            ),
            "all published",
        )
        stop = TrackingRequest(batch_id="stopped", action="stop")
        await tracker.handle_request(worker, stop, 3)
        stopped_chunks = list(worker.batches["stopped"].chunks.written())
        assert len(stopped_chunks) >= 4
        assert sample("rightfoot_poller_finished_batches") == 2

        wall[0] += 99.0  # not yet
        assert not tracker.forget_finished()
        await settle()
        assert set(worker.batches) == set(names)

        wall[0] += 1.0
        mark = len(committer.units)
        assert not tracker.forget_finished()
        await settle()
        assert set(worker.batches) == {"open"}
        assert len(committer.units) == mark + 1  # one commit for the partition
        (unit, request_offset) = committer.units[mark]
        assert request_offset is None
        tombstones = [(m.key, m.value) for m in unit if isinstance(m, OutMessage)]
        assert all(value is None for _, value in tombstones)
        keys = [key for key, _ in tombstones]
        stopped_keys = [f"stopped/fp/{n}".encode() for n in stopped_chunks] + [b"stopped"]
        assert [k for k in keys if k.startswith(b"stopped")] == stopped_keys
        assert b"done" in keys and not any(k.startswith(b"open") for k in keys)
        assert sample("rightfoot_poller_batches_forgotten_total", outcome="completed") == 1
        assert sample("rightfoot_poller_batches_forgotten_total", outcome="stopped") == 1
        assert sample("rightfoot_poller_finished_batches") == 0
        assert set(restored(state_log(tracker, committer))) == {"open"}

        again = TrackingRequest(batch_id="done", expected_count=30)
        await tracker.handle_request(worker, again, 4)
        await run_until(lambda: worker.batches["done"].status == "completed", "done again")
    finally:
        tracker.stop()
        scheduler.cancel()
    events = committer.events()
    assert events.count("tracking_started") == 4 and events.count("completed") == 2
    done_records = [f"record:{record(i, 'done').event_id}" for i in range(30)]
    assert all(events.count(r) == 2 for r in done_records)  # anew: the same event ids


async def test_a_batch_tracked_again_while_its_forgetting_commits_starts_anew_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The window between forgetting a stopped batch and its tombstones' commit: a tracking
    request for it then is a new batch, whose state is queued after the tombstones, and a
    restore from that log gives the new batch, not the stopped one waiting for its
    fingerprints to be read back."""
    monkeypatch.setattr("service.state.CHUNK_FPS", 16)
    source = Vendors({BATCH: Vendor([record(i) for i in range(30)], page_size=10)})
    tracker, wall, committer, worker = forgetting(source)
    scheduler = asyncio.create_task(tracker.run())
    try:
        await started(tracker, worker, TrackingRequest(batch_id=BATCH))
        await run_until(lambda: worker.batches[BATCH].published == 30, "published")
        stop = TrackingRequest(batch_id=BATCH, action="stop")
        await tracker.handle_request(worker, stop, 1)
        wall[0] += 100.0
        committer.hold = True  # the forgetting's commit waits
        tracker.forget_finished()
        again = TrackingRequest(batch_id=BATCH, action="track")
        pending = tracker.handle_request(worker, again, 2)
        fresh = worker.batches[BATCH]
        assert fresh.active and fresh.generation == 1 and fresh.published == 0
        assert fresh.seen_loaded  # nothing to read back: a new batch
        committer.release_all()
        await pending
    finally:
        tracker.stop()
        scheduler.cancel()
    log = state_log(tracker, committer)
    tombstone = log.index((BATCH.encode(), None))
    chunks = {k for k, v in log[:tombstone] if k.startswith(f"{BATCH}/fp/".encode())}
    assert len(chunks) >= 4 and chunks <= {k for k, v in log[:tombstone] if v is None}
    after = [k for k, v in log[tombstone + 1 :] if v is not None]
    assert after and after[0] in (BATCH.encode(), f"{BATCH}/fp/0".encode())
    back = restored(log)[BATCH]
    assert back.active and back.seen_loaded and back.generation == 1
    # Both trackings are generation 1; their lifecycle events must not share ids, or a
    # consumer deduplicating on event_id (as docs/consuming.md advises) drops the second's.
    events = [
        json.loads(m.value)
        for m in committer.messages()
        if isinstance(m, OutMessage) and m.topic == "batch-events" and m.value
    ]
    started_ids = [e["event_id"] for e in events if e["event"] == "tracking_started"]
    assert len(started_ids) == 2 and len(set(started_ids)) == 2
    assert len({e["event_id"] for e in events}) == len(events)


async def test_a_big_batch_that_completes_clears_its_chunks_in_bounded_commits_soon_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The completing commit tombstones CLEAR_CHUNKS_AT_FINISH chunks; the forget loop is
    woken for the rest and takes MAX_FORGET_MESSAGES a commit, the last chunks first,
    without waiting for its round; the batch itself is kept for the retention, then
    forgotten, and a restore at every step finds what is left."""
    monkeypatch.setattr("service.state.CHUNK_FPS", 16)
    monkeypatch.setattr("service.state.CLEAR_CHUNKS_AT_FINISH", 2)
    monkeypatch.setattr("service.tracker.MAX_FORGET_MESSAGES", 3)
    source = Vendors({BATCH: Vendor([record(i) for i in range(60)], page_size=10)})
    tracker, wall, committer, worker = forgetting(source, max_records_per_transaction=10)
    tasks = [asyncio.create_task(tracker.run()), asyncio.create_task(tracker.forget_loop())]
    try:
        await started(tracker, worker, TrackingRequest(batch_id=BATCH, expected_count=60))
        await run_until(lambda: worker.batches[BATCH].status == "completed", "completed")
        chunks = {k for k, v in state_log(tracker, committer) if b"/fp/" in k and v}
        assert len(chunks) >= 7
        await run_until(lambda: not worker.batches[BATCH].chunks.written(), "all cleared")
        assert BATCH in worker.batches  # kept for the retention
        log = state_log(tracker, committer)
        assert {k for k, v in log if b"/fp/" in k and v is None} == chunks
        done = max(i for i, (k, v) in enumerate(log) if k == BATCH.encode() and v)
        tombstones_by_commit = [
            sum(1 for m in unit if isinstance(m, OutMessage) and m.value is None)
            for unit, _ in committer.units
        ]
        assert max(tombstones_by_commit) <= 3
        assert all(v is None for _, v in log[done + 1 :])  # after it, tombstones only
        back = restored(log)[BATCH]
        assert back.status == "completed" and not back.chunks.written()
        wall[0] += 101.0
        assert not tracker.forget_finished()
        await settle()
        assert BATCH not in worker.batches and BATCH not in restored(state_log(tracker, committer))
    finally:
        tracker.stop()
        for task in tasks:
            task.cancel()


async def test_chunks_left_to_clear_at_a_restore_are_cleared_soon_after_it() -> None:
    """A replica that restores a batch completed while its chunks were being cleared (the
    previous owner stopped meanwhile) goes on clearing them without waiting for a round."""
    tracker, _wall, committer, _ = forgetting(Vendors({}))
    worker = PartitionWorker(partition=1, publisher=committer)
    b = BatchState(batch_id="big", partition=1, status="completed", last_poll_at=1_000_000.0)
    b.seen_loaded, b.chunks.open_seq = False, 4
    worker.batches["big"] = b
    loop = asyncio.create_task(tracker.forget_loop())
    try:
        tracker.add_worker(worker)
        await run_until(lambda: not b.chunks.written(), "cleared")
    finally:
        loop.cancel()
    log = state_log(tracker, committer)
    assert log == [(f"big/fp/{n}".encode(), None) for n in range(4)]
    assert "big" in worker.batches  # forgotten only after the retention


async def test_a_big_stopped_batch_is_forgotten_over_bounded_commits_and_requests_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stopped batch with more chunks than a commit takes is forgotten over several
    rounds, its last chunks first and its summary with the last; it stays until then, and
    a tracking request for it waits until it is gone (then starts it anew, after the
    tombstones), and so does the partition's next request, in order; at every step a
    restore of the log finds the batch stopped with the chunks left, never fewer."""
    monkeypatch.setattr("service.state.CHUNK_FPS", 16)
    monkeypatch.setattr("service.tracker.MAX_FORGET_MESSAGES", 3)
    source = Vendors(
        {b: Vendor([record(i, b) for i in range(60)], page_size=10) for b in (BATCH, "next")}
    )
    tracker, wall, committer, worker = forgetting(source, max_records_per_transaction=10)
    scheduler = asyncio.create_task(tracker.run())
    try:
        await started(tracker, worker, TrackingRequest(batch_id=BATCH))
        await run_until(lambda: worker.batches[BATCH].published == 60, "published")
        await tracker.handle_request(worker, TrackingRequest(batch_id=BATCH, action="stop"), 1)
        chunks = list(worker.batches[BATCH].chunks.written())
        assert len(chunks) >= 7
        wall[0] += 101.0
        mark = len(committer.units)
        assert tracker.forget_finished()  # more left
        await settle()
        assert BATCH in worker.batches
        again = tracker.handle_request(worker, TrackingRequest(batch_id=BATCH), 2)
        after = tracker.handle_request(worker, TrackingRequest(batch_id="next"), 3)
        await settle()
        assert not again.done() and not after.done() and "next" not in worker.batches
        rounds = 1
        while BATCH in worker.batches and worker.batches[BATCH].status == "stopped":
            back = restored(state_log(tracker, committer))[BATCH]
            left = list(worker.batches[BATCH].chunks.written())
            assert back.status == "stopped" and list(back.chunks.written()) == left
            tracker.forget_finished()
            rounds += 1
            await settle()
        await asyncio.wait_for(asyncio.gather(again, after), 5)
        assert rounds == -(-(len(chunks) + 1) // 3)  # 3 tombstones a commit, summary included
    finally:
        tracker.stop()
        scheduler.cancel()
    units = committer.units[mark:]
    tombstone_units = [
        u for u, _ in units if u and all(isinstance(m, OutMessage) and m.value is None for m in u)
    ]
    assert len(tombstone_units) == rounds and all(len(u) <= 3 for u in tombstone_units)
    log = state_log(tracker, committer)
    gone = log.index((BATCH.encode(), None))
    assert {k for k, v in log[:gone] if v is None and b"/fp/" in k} >= {
        f"{BATCH}/fp/{n}".encode() for n in chunks
    }
    offsets = [offset for _, offset in units if offset is not None]
    assert offsets == sorted(offsets) and offsets[-2:] == [3, 4]  # in order, after it
    fresh = worker.batches[BATCH]
    assert fresh.active and fresh.generation == 1 and fresh.seen_loaded
    assert "next" in worker.batches


async def test_a_round_of_forgetting_commits_a_bounded_number_of_tombstones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """However many batches are due (a first upgrade to a version that forgets, say), one
    commit takes no more batches once it holds MAX_FORGET_MESSAGES tombstones; the round
    says more are left, and the next ones take the rest."""
    monkeypatch.setattr("service.tracker.MAX_FORGET_MESSAGES", 3)
    tracker = runner(Vendors({}), finished_retention_s=10)
    tracker.wall = lambda: 1_000.0
    committer = HeldCommitter()
    worker = PartitionWorker(partition=0, publisher=committer)
    for n in range(7):
        b = BatchState(batch_id=f"old-{n}", partition=0, status="completed", last_poll_at=0.0)
        worker.batches[b.batch_id] = b
    tracker.add_worker(worker)
    rounds = []
    while True:
        more = tracker.forget_finished()
        await settle()
        rounds.append(len(committer.units[-1][0]))
        if not more:
            break
    assert rounds == [3, 3, 1] and not worker.batches
    assert (
        tracker.metrics.registry.get_sample_value(
            "rightfoot_poller_batches_forgotten_total", {"outcome": "completed"}
        )
        == 7
    )


def runner_of(partitions: int) -> Tracker:
    settings = Settings.model_validate(
        {"kafka": {"partitions": partitions, "batch_events_topic": "batch-events"}}
    )
    factory = EventFactory(balances_topic="balances", batch_events_topic="batch-events", source="s")
    return Tracker(settings, source=Vendors({}), metrics=Metrics(), factory=factory)


def invalid_input(tracker: Tracker, source: str, reason: str) -> float | None:
    return tracker.metrics.registry.get_sample_value(
        "rightfoot_poller_invalid_input_total", {"source": source, "reason": reason}
    )


async def test_a_request_is_forwarded_to_its_partition_in_its_own_encoding() -> None:
    tracker = runner_of(2)
    committer = HeldCommitter()
    worker = PartitionWorker(partition=0, publisher=committer)
    tracker.add_worker(worker)
    batch_id = next(f"b-{n}" for n in range(100) if canonical_partition(f"b-{n}", 2) == 1)
    # As large as a request may be: whitespace, escapes and all.
    raw = f'{{"batch_id":"{batch_id}",   "expected_count":  7}}'.encode()
    raw = raw[:-1] + b" " * (MAX_REQUEST_BYTES - len(raw)) + b"}"
    req = tracker.read_request(batch_id.encode(), raw, 0, 5)
    assert req is not None
    await tracker.handle_request(worker, req, 5)
    [([forward], offset)] = committer.units
    assert offset == 6
    assert isinstance(forward, OutMessage) and forward.partition == 1
    assert forward.key == batch_id.encode()
    expected = {"batch_id": batch_id, "expected_count": 7, "action": "track"}
    assert forward.value == req.encode() == json.dumps(expected, separators=(",", ":")).encode()
    assert decode_request(forward.value, forward.key) == req


async def test_a_request_goes_where_the_state_holds_its_batch_and_a_forward_stays_put() -> None:
    """Partitions added to the topics: a batch's hash names a partition its state is not
    on. Its requests follow the state (this partition's, or the view's word for another);
    a forwarded request is taken where it lands, so that two views cannot bounce it."""
    tracker = runner_of(3)
    homes: dict[str, int] = {}
    tracker.home_of = homes.get
    committer = HeldCommitter()
    worker = PartitionWorker(partition=0, publisher=committer)
    tracker.add_worker(worker)
    names = (f"b-{n}" for n in range(1000))
    here, there, new = (next(b for b in names if canonical_partition(b, 3) == 1) for _ in "abc")
    worker.batches[here] = BatchState(
        batch_id=here, partition=0, status="stopped", tracked_at=tracker.wall()
    )
    homes[there] = 2  # (the view may not show yet what this partition holds)

    await tracker.handle_request(worker, TrackingRequest(batch_id=here, action="stop"), 0)
    await tracker.handle_request(worker, TrackingRequest(batch_id=there), 1)
    await tracker.handle_request(worker, TrackingRequest(batch_id=new), 2)
    await tracker.handle_request(worker, TrackingRequest(batch_id=new), 3, forwarded=True)
    assert [u[1] for u in committer.units] == [1, 2, 3, 4]
    assert committer.units[0][0] == []  # already stopped here: nothing to forward
    forwards = [m for unit, _ in committer.units[1:3] for m in unit]
    assert [(m.key, m.partition) for m in forwards if isinstance(m, OutMessage)] == [
        (there.encode(), 2),  # the view's partition
        (new.encode(), 1),  # no state anywhere: its hash's
    ]
    assert all(FORWARDED_HEADER in m.headers for m in forwards if isinstance(m, OutMessage))
    assert worker.batches[new].status == "tracking"  # the forwarded one, taken here


async def test_a_request_too_large_is_refused_and_its_offset_committed() -> None:
    tracker = runner_of(2)
    committer = HeldCommitter()
    worker = PartitionWorker(partition=0, publisher=committer)
    tracker.add_worker(worker)
    huge = b'{"batch_id":"abc"' + b" " * 5_000_000 + b"}"
    req = tracker.read_request(b"abc", huge, 0, 9)
    assert req is None
    await tracker.handle_request(worker, req, 9)
    assert committer.units == [([], 10)]  # skipped: nothing forwarded, the offset moves on
    assert invalid_input(tracker, "requests_topic", "too_large") == 1


async def test_a_request_keyed_by_another_batch_is_refused() -> None:
    tracker = runner_of(1)
    value = b'{"batch_id":"b-1"}'
    with structlog.testing.capture_logs() as logs:
        assert tracker.read_request(b"b-2", value, 0, 3) is None
        assert tracker.read_request(None, value, 0, 4) == TrackingRequest(batch_id="b-1")
        assert tracker.read_request(b"b-1", value, 0, 5) == TrackingRequest(batch_id="b-1")
    assert invalid_input(tracker, "requests_topic", "invalid_field") == 1
    [line] = logs
    assert line["event"] == "tracking_request_rejected" and line["log_level"] == "warning"
    assert line["reason"] == "batch_id: must equal the message key, which is 'b-2'"
    assert (line["partition"], line["offset"]) == (0, 3)


def test_refused_requests_are_logged_once_a_kind_a_minute_and_all_counted() -> None:
    tracker = runner_of(1)
    now = [1000.0]
    tracker.clock = lambda: now[0]
    with structlog.testing.capture_logs() as logs:
        for offset in range(100):
            assert tracker.read_request(None, b"{not json", 0, offset) is None
        assert tracker.read_request(None, b"{}", 0, 100) is None  # another kind
        now[0] += 61.0
        assert tracker.read_request(None, b"{not json", 0, 101) is None
    warned = [(e["offset"], e["suppressed"]) for e in logs if e["log_level"] == "warning"]
    assert warned == [(0, 0), (100, 0), (101, 99)]
    debug = [e for e in logs if e["log_level"] == "debug"]
    assert len(debug) == 99 and {e["event"] for e in debug} == {"tracking_request_rejected"}
    assert invalid_input(tracker, "requests_topic", "invalid_json") == 101
    assert invalid_input(tracker, "requests_topic", "invalid_field") == 1


async def test_a_corrupt_chunk_read_back_leaves_the_batch_unreadable_once() -> None:
    """Stopped with its fingerprints on the topic, one chunk of them corrupt; tracked again,
    the read-back that finds it leaves the batch as a restore would leave an active batch
    with a corrupt chunk: unreadable, counted and logged once, not read again nor polled."""
    vendor = Vendor([record(i) for i in range(30)], page_size=10)
    trace = Trace()
    tracker = runner(
        TracedVendors({BATCH: vendor}, trace), interval_min_s=0.01, interval_max_s=0.01
    )
    committer = HeldCommitter()
    worker = PartitionWorker(partition=0, publisher=committer)
    tracker.add_worker(worker)
    loads: list[str] = []

    async def load(partition: int, batch_id: str) -> BatchState | None:
        loads.append(batch_id)
        corrupt = [
            (key, b"XX" + value[2:] if key == f"{BATCH}/fp/0".encode() and value else value)
            for key, value in state_log(tracker, committer)
        ]
        return read_back(corrupt, batch_id, partition)

    tracker.load_batch = load
    registry = tracker.metrics.registry
    scheduler = asyncio.create_task(tracker.run())
    try:
        await started(tracker, worker, TrackingRequest(batch_id=BATCH))
        await run_until(lambda: worker.batches[BATCH].published == 30, "published")
        stop = TrackingRequest(batch_id=BATCH, action="stop")
        await tracker.handle_request(worker, stop, 1)
        mark = len(trace.steps)
        with structlog.testing.capture_logs() as logs:
            again = TrackingRequest(batch_id=BATCH, expected_count=40)
            await tracker.handle_request(worker, again, 2)
            await run_until(lambda: BATCH in worker.unreadable, "unreadable")
            await asyncio.sleep(0.1)  # polls every 0.01 s, were it still polled
            await tracker.handle_request(worker, again, 3)
    finally:
        tracker.stop()
        scheduler.cancel()
    assert loads == [BATCH]
    assert trace.steps[mark:] == []
    assert BATCH not in worker.batches
    assert "not a fingerprint chunk" in worker.unreadable[BATCH]
    assert invalid_input(tracker, "state_topic", "invalid_state") == 1
    assert registry.get_sample_value("rightfoot_poller_batches_unreadable") == 1
    assert registry.get_sample_value("rightfoot_poller_tracked_batches") == 0
    labels = {"outcome": "failed"}
    assert registry.get_sample_value("rightfoot_poller_fingerprint_loads_total", labels) == 1
    lines = [(e["event"], e["log_level"]) for e in logs if e["log_level"] != "debug"]
    assert lines == [
        ("tracking_started", "info"),
        ("state_unreadable", "error"),
        ("request_for_unreadable_batch", "warning"),
    ]


async def test_a_failed_poll_backs_off_from_when_it_failed_not_from_when_it_was_due() -> None:
    """A poll that fails after running long (here 100 s of timeouts): its backoff counts
    from its end. Counted from when it was due, the next poll would start at once."""
    from service.errors import ApiTransportError

    now = [1000.0]

    class Slow(HeldSource):
        async def fetch_page(
            self, batch_id: str, token: str | None, *a: object, **k: object
        ) -> Page:
            now[0] += 100.0
            raise ApiTransportError("timed out", code="timeout")

    settings = Settings.model_validate(
        {
            "kafka": {"partitions": 1, "batch_events_topic": "batch-events"},
            "polling": {"interval_min_s": 30, "interval_max_s": 30},
        }
    )
    factory = EventFactory(balances_topic="balances", batch_events_topic="batch-events", source="s")
    tracker = Tracker(
        settings, source=Slow(Vendor()), metrics=Metrics(), factory=factory, clock=lambda: now[0]
    )
    worker = PartitionWorker(partition=0, publisher=HeldCommitter())
    tracker.add_worker(worker)
    await started(tracker, worker, TrackingRequest(batch_id=BATCH))
    head = tracker.due.head()
    assert head is not None and head[0] == 1000.0
    tracker.due.pop()
    await tracker._poll(worker, BATCH, head[0])
    assert worker.batches[BATCH].failures == 1
    head = tracker.due.head()
    assert head is not None and head[0] == 1100.0 + 30.0  # the first backoff step: a window


async def test_a_commit_whose_poll_is_cancelled_is_counted_once_it_lands() -> None:
    """A partition released (or the service stopping) cancels the polls still running
    after half its timeout, not their commits: those are committed by the publisher's
    close. Counted from the cancelled waiter, such a commit went uncounted
    (records_published_total short) and gave its room back before it had landed."""
    source = HeldSource(Vendor([record(i) for i in range(6)]))
    source.held = False
    tracker = runner(source, max_records_per_transaction=2)
    committer = HeldCommitter()
    worker = PartitionWorker(partition=0, publisher=committer)
    tracker.add_worker(worker)
    await started(tracker, worker, TrackingRequest(batch_id=BATCH))
    committer.hold = True  # the poll's commits stay in flight
    scheduler = asyncio.create_task(tracker.run())
    try:
        async with asyncio.timeout(5):
            while not any(isinstance(m, BalanceEvents) for m in committer.messages()):
                committer.queued.clear()
                await committer.queued.wait()
        await settle()
        (poll,) = worker.polls
        poll.cancel()
        await settle()
        assert tracker.room.held > 0  # the records of the commits in flight keep their room
        committer.release_all()
        async with asyncio.timeout(5):
            await asyncio.gather(poll, return_exceptions=True)
        await settle()
    finally:
        tracker.stop()
        scheduler.cancel()
    sent = [m for m in committer.messages() if isinstance(m, BalanceEvents)]
    records = sum(len(m.records) for m in sent)
    counted = sum(
        sample.value
        for metric in tracker.metrics.registry.collect()
        if metric.name == "rightfoot_poller_records_published"
        for sample in metric.samples
        if sample.name.endswith("_total")
    )
    assert records > 0 and counted == records
    assert tracker.room.held == 0


async def test_a_poll_stopped_while_it_reads_gives_back_the_room_of_what_it_gathered() -> None:
    """A poll that has gathered records (below max_records_per_transaction, nothing
    committed) when its batch is stopped drops them, and gives their room back. Kept, that
    room would be lost to every poll of the replica (polling.max_records_in_flight), a bit
    more with every such stop, until the replica stalls."""
    source = HeldSource(Vendor([record(i) for i in range(6)]))
    tracker = runner(source, max_records_per_transaction=1000)
    committer = HeldCommitter()
    worker = PartitionWorker(partition=0, publisher=committer)
    tracker.add_worker(worker)
    scheduler = asyncio.create_task(tracker.run())
    try:
        await started(tracker, worker, TrackingRequest(batch_id=BATCH))
        assert await asyncio.wait_for(source.asked.get(), 1.0) is None
        (poll,) = worker.polls
        source.release()
        assert await asyncio.wait_for(source.asked.get(), 1.0) == "t2"
        # Page 1's two records gathered, and room reserved for page 2 while it is read.
        assert tracker.room.held == 2 + tracker.settings.rightfoot.page_limit
        stop = TrackingRequest(batch_id=BATCH, action="stop")
        await asyncio.wait_for(tracker.handle_request(worker, stop, 1), 1.0)
        source.release()
        await asyncio.wait_for(poll, 1.0)
    finally:
        tracker.stop()
        scheduler.cancel()
    assert not any(isinstance(m, BalanceEvents) for m in committer.messages())
    assert worker.batches[BATCH].status == "stopped"
    assert tracker.room.held == 0
    assert tracker.metrics.registry.get_sample_value("rightfoot_poller_records_held") == 0


def dead_letter(n: int) -> InvalidRecord:
    """A record without its authorizer, as a page of the API brings it: dead-lettered."""
    bad = parse_record(BATCH, {"balance": f"{n}.00", "timestamp": "2026-11-28T10:00:00Z"})
    assert isinstance(bad, InvalidRecord)
    return bad


async def polled_once(vendor: Vendor) -> tuple[Tracker, HeldCommitter, PartitionWorker]:
    """A batch tracked and polled once, its poll's commits done."""
    tracker = runner(Vendors({BATCH: vendor}))
    committer = HeldCommitter()
    worker = PartitionWorker(partition=0, publisher=committer)
    tracker.add_worker(worker)
    await started(tracker, worker, TrackingRequest(batch_id=BATCH))
    head = tracker.due.head()
    assert head is not None
    tracker.due.pop()
    await tracker._poll(worker, BATCH, head[0])
    await settle()
    return tracker, committer, worker


async def test_a_page_with_a_dead_letter_publishes_its_valid_records_as_well() -> None:
    """Good and bad records on one page: the commit holds the dead letter, a balance event
    for every valid record, and the state, in that order. Without the events, the valid
    records would be lost for good: their fingerprints are in the state, so they are never
    published again."""
    bad = dead_letter(9)
    good = [record(i) for i in range(3)]
    tracker, committer, _worker = await polled_once(
        Vendor([good[0], bad, good[1], good[2]], page_size=10)
    )
    [_started, (unit, offset)] = committer.units
    assert offset is None
    dlq = [m for m in unit if isinstance(m, OutMessage) and m.topic == "balances.dlq"]
    assert [json.loads(m.value or b"{}")["event_id"] for m in dlq] == [bad.event_id]
    sent = [out for m in unit if isinstance(m, BalanceEvents) for out in m]
    assert sorted(json.loads(out.value or b"{}")["event_id"] for out in sent) == sorted(
        r.event_id for r in good
    )
    assert all(out.topic == "balances" for out in sent)
    state_topic = tracker.settings.kafka.state_topic
    last = unit[-1]
    assert isinstance(last, OutMessage) and last.topic == state_topic
    assert last.key == BATCH.encode() and last.value is not None
    saved = decode_state(last.value, 0)
    assert (saved.published, saved.dead_lettered) == (3, 1)
    kinds = [
        "dlq" if m in dlq else "events" if isinstance(m, BalanceEvents) else "state" for m in unit
    ]
    assert kinds == ["dlq", "events"] + ["state"] * (len(unit) - 2)


async def test_records_published_total_counts_every_record_a_commit_publishes() -> None:
    """One commit of seven records of two statuses (and a dead letter, which is not a
    published record): records_published_total goes up by seven, each status by its own
    count, not by one a commit."""
    good = [record(i) for i in range(7)]
    by_status: dict[str, int] = {}
    for r in good:
        by_status[r.balance_status] = by_status.get(r.balance_status, 0) + 1
    assert sorted(by_status.values()) == [3, 4]
    tracker, committer, _worker = await polled_once(
        Vendor([*good[:4], dead_letter(9), *good[4:]], page_size=10)
    )
    assert sum(len(m) for m in committer.messages() if isinstance(m, BalanceEvents)) == 7

    def published(status: str) -> float:
        name = "rightfoot_poller_records_published_total"
        value = tracker.metrics.registry.get_sample_value(name, {"balance_status": status})
        return value or 0.0

    assert {status: published(status) for status in by_status} == by_status


class RefusedFirstPage(HeldSource):
    """Every request refused with the same error, page token or not."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(Vendor())
        self.error = error

    async def fetch_page(self, batch_id: str, token: str | None, *a: object, **k: object) -> Page:
        self.asked.put_nowait(token)
        raise self.error


def refused_first_page(error: ApiError) -> tuple[Tracker, HeldCommitter, PartitionWorker]:
    tracker = runner(RefusedFirstPage(error))
    committer = HeldCommitter()
    worker = PartitionWorker(partition=0, publisher=committer)
    tracker.add_worker(worker)
    return tracker, committer, worker


async def poll_now(tracker: Tracker, worker: PartitionWorker) -> None:
    head = tracker.due.head()
    assert head is not None
    tracker.due.pop()
    await tracker._poll(worker, BATCH, head[0])
    await settle()


async def test_a_404_on_the_first_page_is_the_batch_s_and_waits_out_the_grace() -> None:
    """A 404 for the first page is the batch not found (yet): polled on for
    not_found_grace_s, then failed. Not a page token refused: there is no token, and
    taken as one the batch would be backed off as a failing poll, never failed."""
    tracker, committer, worker = refused_first_page(ApiNotFound("no such batch", status=404))
    wall = [1_000_000.0]
    tracker.wall = lambda: wall[0]
    await started(tracker, worker, TrackingRequest(batch_id=BATCH))
    grace = tracker.settings.polling.not_found_grace_s
    await poll_now(tracker, worker)
    b = worker.batches[BATCH]
    assert (b.status, b.not_found_since, b.failures) == ("tracking", wall[0], 0)
    wall[0] += grace - 1
    await poll_now(tracker, worker)
    assert worker.batches[BATCH].status == "tracking"
    wall[0] += 1
    await poll_now(tracker, worker)
    b = worker.batches[BATCH]
    assert b.status == "failed" and (b.reason or "").startswith("api_not_found: ")
    assert committer.events()[-1] == "failed"
    assert not invalid_input(tracker, "api", "page_token_rejected")


async def test_a_400_on_the_first_page_fails_the_batch_at_once() -> None:
    """A 400 for the first page is the batch refused: failed at once (api_400), as the
    README says. Not a page token refused (there is none), which would back it off and
    poll it again for ever."""
    tracker, committer, worker = refused_first_page(ApiBadRequest("bad batch id", status=400))
    await started(tracker, worker, TrackingRequest(batch_id=BATCH))
    await poll_now(tracker, worker)
    b = worker.batches[BATCH]
    assert b.status == "failed" and (b.reason or "").startswith("api_400: ")
    assert committer.events()[-1] == "failed"
    assert BATCH not in tracker.due
    assert not invalid_input(tracker, "api", "page_token_rejected")
