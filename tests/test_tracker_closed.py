"""A partition released while a poll reads: what the poll commits after is consistent.

Once ``remove_worker`` closes the partition, its polls still finish the page they
were reading, and their steps are committed by the publisher's close. A poll whose
page fails then commits what it read (its flush), then its failure: both made from
the batch as it stands, each summary on top of the one before it.
"""

from __future__ import annotations

import asyncio

from policy_harness import BATCH, Vendor, record
from test_runner import HeldCommitter, HeldSource, restored, runner, settle, state_log

from service.errors import ApiServerError
from service.events import BalanceEvents
from service.records import Page
from service.requests import TrackingRequest
from service.worker import PartitionWorker


class FailAt(HeldSource):
    """A held source whose page at ``fail_token`` fails (its last retry)."""

    def __init__(self, vendor: Vendor, fail_token: str) -> None:
        super().__init__(vendor)
        self.fail_token = fail_token

    async def fetch_page(
        self, batch_id: str, token: str | None, *args: object, **kwargs: object
    ) -> Page:
        self.asked.put_nowait(token)
        if self.held:
            await self.gate.get()
        if token == self.fail_token:
            raise ApiServerError("503 after the last retry", status=503)
        return self.vendor.page(token)


async def test_a_poll_failing_after_its_partition_was_released_commits_in_order() -> None:
    """The page in flight fails after the partition was released: the poll flushes what
    it read (cursor t4, 4 published), then records its failure. The failure's summary was
    made from the batch before the flush (the closed worker's memory was no longer kept):
    cursor and counts went back to nothing, the fingerprints of the 4 records stayed, and
    the next owner never counted them; a batch with expected_count never completed."""
    vendor = Vendor([record(i) for i in range(6)])  # 3 pages of 2
    source = FailAt(vendor, "t4")
    tracker = runner(source, max_records_per_transaction=100)
    committer = HeldCommitter()
    worker = PartitionWorker(partition=0, publisher=committer)
    tracker.add_worker(worker)
    scheduler = asyncio.create_task(tracker.run())
    try:
        async with asyncio.timeout(10):
            request = TrackingRequest(batch_id=BATCH, expected_count=6)
            await tracker.handle_request(worker, request, 0)
            assert await source.asked.get() is None
            source.release()
            assert await source.asked.get() == "t2"
            source.release()
            assert await source.asked.get() == "t4"  # page 3 in flight
            removing = asyncio.create_task(tracker.remove_worker(0, timeout=10.0))
            await settle()
            assert worker.closed
            source.release()  # ... and it fails
            await removing
    finally:
        tracker.stop()
        scheduler.cancel()
    summaries = [(s.cursor, s.published, s.failures) for s in committer.summaries()]
    assert summaries == [(None, 0, 0), ("t4", 4, 0), ("t4", 4, 1)]
    b = restored(state_log(tracker, committer))[BATCH]
    assert (b.cursor, b.published, b.records_seen, b.expected_count) == ("t4", 4, 4, 6)
    # The next owner polls the batch to its end: 2 new records, and it completes.
    source2 = HeldSource(vendor)
    source2.held = False
    tracker2 = runner(source2, max_records_per_transaction=100)
    committer2 = HeldCommitter()
    worker2 = PartitionWorker(partition=0, publisher=committer2, batches={BATCH: b})
    tracker2.add_worker(worker2)
    head = tracker2.due.pop()
    assert head is not None
    await tracker2._poll(worker2, BATCH, head[0])
    await settle()
    after = worker2.batches[BATCH]
    assert (after.status, after.published) == ("completed", 6)
    new = [e for e in committer2.events() if e.startswith("record:")]
    assert len(new) == 2


class StuckCommitter(HeldCommitter):
    """A broker that takes no commit: the close leaves them in flight (the publisher's
    own close ends them at its timeout; the next owner's producer fences them)."""

    async def close(self, timeout: float) -> None:
        pass


async def test_a_release_is_bounded_by_its_timeout_with_commits_in_flight() -> None:
    """The polls still running at half the timeout are cancelled: they waited for their
    commits under way all the same (shielded), up to the commit deadline (45 s by
    default), and the release with them. The commits, once they land, are counted and
    give their room back."""
    source = HeldSource(Vendor([record(i) for i in range(6)]))
    source.held = False
    tracker = runner(source, max_records_per_transaction=2)
    committer = StuckCommitter()
    worker = PartitionWorker(partition=0, publisher=committer)
    tracker.add_worker(worker)
    await tracker.handle_request(worker, TrackingRequest(batch_id=BATCH), 0)
    committer.hold = True  # the poll's commits stay in flight
    scheduler = asyncio.create_task(tracker.run())
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(10):
            while len(committer.units) < 3:  # two of the poll's commits in flight
                committer.queued.clear()
                await committer.queued.wait()
            await settle()
            assert len(worker.polls) == 1
            began = loop.time()
            await asyncio.wait_for(tracker.remove_worker(0, timeout=0.4), 2.0)
            assert loop.time() - began < 0.6
            assert not worker.polls and not worker.running
            assert tracker.room.held > 0  # the commits in flight keep their records' room
            committer.release_all()  # they land
            await settle()
    finally:
        tracker.stop()
        scheduler.cancel()
    assert tracker.room.held == 0 and tracker.room.committing == 0
    published = sum(len(m.records) for m in committer.messages() if isinstance(m, BalanceEvents))
    counted = sum(
        sample.value
        for metric in tracker.metrics.registry.collect()
        if metric.name == "rightfoot_poller_records_published"
        for sample in metric.samples
        if sample.name.endswith("_total")
    )
    assert published == counted == 4
