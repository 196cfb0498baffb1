"""At most one poll of a batch runs at a time, whatever its generations do meanwhile.

A poll stands for the generation of the batch it began with. Stopped and tracked
again while it ran, the batch is a new generation: the old poll's end must not
reschedule it by the old poll's delay (nor a retry of its fingerprints, a failure,
a crash), and the new generation's first poll waits for the old poll's end. Two
polls at once read the same pages and publish the same records twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from policy_harness import BATCH, Vendor, read_back, record
from test_runner import HeldCommitter, HeldSource, run_until, runner, settle, state_log

from service.errors import ApiServerError
from service.records import Page
from service.requests import TrackingRequest
from service.state import BatchState
from service.tracker import Tracker
from service.worker import PartitionWorker


class Watch:
    """The most polls of the batch seen running at once (checked every loop turn)."""

    def __init__(self, worker: PartitionWorker) -> None:
        self.worker = worker
        self.most = 0
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            running = sum(t.get_name() == f"poll-{BATCH}" for t in self.worker.polls)
            self.most = max(self.most, running)
            await asyncio.sleep(0)

    def stop(self) -> None:
        self._task.cancel()


def requests(tracker: Tracker, worker: PartitionWorker) -> Callable[..., asyncio.Future[None]]:
    offsets = iter(range(1000))

    def req(**fields: object) -> asyncio.Future[None]:
        request = TrackingRequest(batch_id=BATCH, **fields)
        return tracker.handle_request(worker, request, next(offsets))

    return req


def loader(
    tracker: Tracker, committer: HeldCommitter
) -> tuple[list[asyncio.Future[object]], Callable[[int, str], Awaitable[BatchState | None]]]:
    """``load_batch`` whose reads the test settles one by one: each read waits for its
    future, and raises what it is set to, or reads the committed state back."""
    loads: list[asyncio.Future[object]] = []

    async def load_batch(_partition: int, batch_id: str) -> BatchState | None:
        gate: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        loads.append(gate)
        outcome = await gate
        if isinstance(outcome, Exception):
            raise outcome
        return read_back(state_log(tracker, committer), batch_id)

    return loads, load_batch


def published(committer: HeldCommitter) -> list[str]:
    return [e for e in committer.events() if e.startswith("record:")]


async def test_a_poll_that_ends_after_its_batch_was_tracked_again_does_not_start_another() -> None:
    """The poll read to the end and waits for its last commit; meanwhile the batch is
    stopped and tracked again. That poll used to reschedule the batch by its own delay
    (the new generation's poll started at once), and the commit that tracked it again
    scheduled it once more (``_resumed``: not in ``due``, popped by that poll): two polls
    read the fingerprints back and the same pages. Now the new generation gets one poll,
    once its commit is done."""
    vendor = Vendor([record(i) for i in range(4)], page_size=2)
    source = HeldSource(vendor)
    tracker = runner(source, interval_min_s=0.05, interval_max_s=0.05)
    committer = HeldCommitter()
    worker = PartitionWorker(partition=0, publisher=committer)
    tracker.add_worker(worker)
    loads, tracker.load_batch = loader(tracker, committer)
    req = requests(tracker, worker)
    scheduler = asyncio.create_task(tracker.run())
    watch = Watch(worker)
    try:
        async with asyncio.timeout(10):
            await req()
            await source.asked.get()
            source.release()  # page 1
            await source.asked.get()
            committer.hold = True  # commits take a while
            source.release()  # the last page: its commit in flight
            await settle()
            assert len(worker.polls) == 1 and len(committer.units) == 2
            await asyncio.sleep(0.1)  # the poll runs past its window
            req(action="stop")
            vendor.records += [record(i) for i in range(4, 8)]
            req()  # tracked again: generation 2, its commit held
            await settle()
            committer.gates[1].set()  # the old poll's last commit lands: it ends
            await asyncio.sleep(0.1)
            assert not worker.polls and not loads  # the new generation waits for its commit
            assert BATCH not in tracker.due
            committer.release_all()  # the stop and the new tracking commit
            await run_until(lambda: len(loads) == 1, "polled again")
            assert len(worker.polls) == 1
            for gate in loads:
                gate.set_result(None)
            source.held = False
            source.release()
            await run_until(lambda: len(set(published(committer))) == 8, "published all")
            await asyncio.sleep(0.2)  # (a second poll, were there one, would publish now)
    finally:
        watch.stop()
        tracker.stop()
        scheduler.cancel()
    events = published(committer)
    assert len(events) == len(set(events)) == 8
    assert watch.most == 1 and len(loads) == 1
    b = worker.batches[BATCH]
    assert (b.generation, b.published) == (2, 8)


async def test_a_failed_fingerprint_read_of_an_old_generation_hands_over_to_the_new() -> None:
    """The poll of generation 2 reads its fingerprints back; the batch is stopped and
    tracked again (generation 3), and that read fails. Its retry delay used to
    reschedule the batch beside generation 3's own poll (started by ``_resumed``), both
    reading pages: records published twice. Now generation 3's poll waits for the old
    one, which returns no delay, and starts when it ends: never left unscheduled."""
    vendor = Vendor([record(i) for i in range(4)], page_size=2)
    source = HeldSource(vendor)
    source.held = False
    tracker = runner(source, interval_min_s=0.02, interval_max_s=0.02)
    committer = HeldCommitter()
    worker = PartitionWorker(partition=0, publisher=committer)
    tracker.add_worker(worker)
    loads, tracker.load_batch = loader(tracker, committer)
    req = requests(tracker, worker)
    scheduler = asyncio.create_task(tracker.run())
    watch = Watch(worker)
    try:
        async with asyncio.timeout(10):
            await req()
            await run_until(lambda: worker.batches[BATCH].published == 4, "published 4")
            await req(action="stop")
            vendor.records += [record(i) for i in range(4, 8)]
            source.held = True
            await req()  # generation 2
            await run_until(lambda: len(loads) == 1, "read its fingerprints")
            await req(action="stop")
            await req()  # generation 3: committed, while generation 2's poll reads
            await asyncio.sleep(0.1)
            assert len(loads) == 1 and len(worker.polls) == 1  # no second poll
            loads[0].set_result(RuntimeError("state partition read failed"))
            await run_until(lambda: len(loads) == 2, "generation 3 polled")
            assert len(worker.polls) == 1
            loads[1].set_result(None)
            source.held = False
            source.release()
            await run_until(lambda: len(set(published(committer))) == 8, "published all")
            await asyncio.sleep(0.2)
    finally:
        watch.stop()
        tracker.stop()
        scheduler.cancel()
    events = published(committer)
    assert len(events) == len(set(events)) == 8
    assert watch.most == 1
    b = worker.batches[BATCH]
    assert (b.generation, b.published, b.status) == (3, 8, "tracking")


class FailingSource(HeldSource):
    """The first page fails (its last retry) once let through; the rest are listed."""

    def __init__(self, vendor: Vendor) -> None:
        super().__init__(vendor)
        self.failures = 1

    async def fetch_page(
        self, batch_id: str, token: str | None, *args: object, **kwargs: object
    ) -> Page:
        self.asked.put_nowait(token)
        if self.held:
            await self.gate.get()
        if self.failures:
            self.failures -= 1
            raise ApiServerError("503 after the last retry", status=503)
        return self.vendor.page(token)


@pytest.mark.parametrize("retracked_during", ["failure_commit", "page"])
async def test_a_failed_poll_of_an_old_generation_does_not_reschedule_the_new(
    retracked_during: str,
) -> None:
    """A poll that fails while (or before its failure is committed) the batch is
    stopped and tracked again: its backoff is not the new generation's, which gets its
    own first poll once the old one has ended, and publishes each record once."""
    vendor = Vendor([record(i) for i in range(4)], page_size=2)
    source = FailingSource(vendor)
    tracker = runner(source, interval_min_s=30, interval_max_s=30)
    committer = HeldCommitter()
    worker = PartitionWorker(partition=0, publisher=committer)
    tracker.add_worker(worker)
    loads, tracker.load_batch = loader(tracker, committer)
    req = requests(tracker, worker)
    scheduler = asyncio.create_task(tracker.run())
    watch = Watch(worker)
    try:
        async with asyncio.timeout(10):
            await req()
            await source.asked.get()  # the first poll's page, held
            if retracked_during == "failure_commit":
                committer.hold = True
                source.release()  # the page fails: its failure's commit is held
                await run_until(lambda: len(committer.units) == 2, "failure queued")
                req(action="stop")
                req()  # generation 2
                await settle()
                committer.release_all()
            else:
                await req(action="stop")
                await req()  # generation 2, committed: its poll waits for the old one
                await asyncio.sleep(0.05)
                assert not loads
                source.release()  # the old poll's page fails
            await run_until(lambda: len(loads) == 1, "generation 2 polled")
            head = tracker.due.head()
            assert head is None  # not rescheduled by the old poll's 30 s backoff
            loads[0].set_result(None)
            source.held = False
            source.release()
            await run_until(lambda: len(set(published(committer))) == 4, "published all")
            await asyncio.sleep(0.1)
    finally:
        watch.stop()
        tracker.stop()
        scheduler.cancel()
    events = published(committer)
    assert len(events) == len(set(events)) == 4
    assert watch.most == 1 and len(loads) == 1
    b = worker.batches[BATCH]
    assert (b.generation, b.failures, b.published) == (2, 0, 4)


async def test_a_batch_due_while_its_poll_runs_is_not_polled_twice() -> None:
    """Whatever put the batch in ``due`` while its poll runs, the scheduler starts no
    second poll of it; the running one schedules the batch when it ends."""
    source = HeldSource(Vendor([record(i) for i in range(4)], page_size=2))
    tracker = runner(source)
    committer = HeldCommitter()
    worker = PartitionWorker(partition=0, publisher=committer)
    tracker.add_worker(worker)
    req = requests(tracker, worker)
    scheduler = asyncio.create_task(tracker.run())
    try:
        async with asyncio.timeout(10):
            await req()
            assert await source.asked.get() is None  # the poll waits for its first page
            tracker._schedule(worker, BATCH, tracker.clock())
            await asyncio.sleep(0.05)
            assert len(worker.polls) == 1 and source.asked.empty()
            assert BATCH not in tracker.due and BATCH in worker.running
            source.held = False
            source.release()
            await run_until(lambda: not worker.polls, "the poll ended")
    finally:
        tracker.stop()
        scheduler.cancel()
    assert len(published(committer)) == 4 and not worker.running
    head = tracker.due.head()
    assert head is not None and head[0] >= tracker.clock() + 29  # its next window
