"""A step whose state cannot be written: memory stays as Kafka has it, and the requests go on.

A restore no longer takes a summary that the writer could not write again
(``StateSummary``): these batches are put in memory as they are, to stand for any
fault that makes a commit's messages fail to be made.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from policy_harness import BATCH, Vendor, record
from test_runner import HeldCommitter, Vendors, runner, settle

from service.errors import PublishFailed
from service.events import BalanceEvents
from service.requests import TrackingRequest
from service.state import MAX_SUMMARY_BYTES, BatchState
from service.worker import PartitionWorker


def unwritable(**fields: object) -> BatchState:
    state = BatchState(batch_id=BATCH, partition=0, tracked_at=time.time(), **fields)  # type: ignore[arg-type]
    state.remember([1, 2, 3])
    return state


async def test_a_request_whose_state_cannot_be_written_is_counted_logged_and_left() -> None:
    """The stop raises in ``_apply``: the batch stays as it was in memory (as Kafka has
    it), nothing but the request's offset is committed, and the next request is taken."""
    tracker = runner(Vendors({}))
    committer = HeldCommitter()
    before = unwritable(cursor="x" * (MAX_SUMMARY_BYTES + 1))
    worker = PartitionWorker(partition=0, publisher=committer, batches={BATCH: before})
    tracker.add_worker(worker)
    with structlog.testing.capture_logs() as logs:
        await tracker.handle_request(worker, TrackingRequest(batch_id=BATCH, action="stop"), 7)
        await tracker.handle_request(worker, TrackingRequest(batch_id="other"), 8)
    assert worker.batches[BATCH] is before and before.active
    assert list(before.chunks.unsaved) == [1, 2, 3]
    assert committer.units[0] == ([], 8)
    assert committer.units[1][1] == 9 and worker.batches["other"].active
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [(e["event"], e["batch_id"], e["offset"]) for e in errors] == [
        ("tracking_request_failed", BATCH, 7)
    ]
    sample = tracker.metrics.registry.get_sample_value(
        "rightfoot_poller_tracking_requests_total", {"action": "stop", "result": "unreadable"}
    )
    assert sample == 1


async def test_a_request_that_fails_while_it_waits_is_left_too() -> None:
    """A request held back behind another (``handle_request``'s wait) fails the same way."""
    tracker = runner(Vendors({}))
    committer = HeldCommitter()
    worker = PartitionWorker(
        partition=0, publisher=committer, batches={BATCH: unwritable(cursor="x" * 70_000)}
    )
    tracker.add_worker(worker)
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    worker.deferred = gate
    with structlog.testing.capture_logs() as logs:
        waiting = tracker.handle_request(worker, TrackingRequest(batch_id=BATCH, action="stop"), 3)
        gate.set_result(None)
        await waiting
    assert worker.batches[BATCH].active
    assert committer.units == [([], 4)]
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["tracking_request_failed"]


async def test_a_poll_whose_commit_cannot_be_made_restores_the_partition() -> None:
    """The poll's step put its fingerprints into the seen set it shares with the batch in
    memory: the partition is restored from Kafka (as after a failed commit), the room of
    its records given back, nothing published."""
    state = BatchState(
        batch_id=BATCH,
        partition=0,
        tracked_at=time.time(),
        counts={f"S{i}": 0 for i in range(9000)},
    )
    tracker = runner(Vendors({BATCH: Vendor(records=[record(i) for i in range(6)])}))
    committer = HeldCommitter()
    worker = PartitionWorker(partition=0, publisher=committer, batches={BATCH: state})
    failures: list[tuple[int, BaseException]] = []
    tracker.on_publish_failure = lambda p, exc: failures.append((p, exc))
    tracker.add_worker(worker)
    with structlog.testing.capture_logs() as logs:
        scheduler = asyncio.create_task(tracker.run())
        try:
            for _ in range(20):
                await settle()
                if failures:
                    break
        finally:
            tracker.stop()
            scheduler.cancel()
            await asyncio.gather(scheduler, return_exceptions=True)
        await settle()
    assert [(p, type(exc)) for p, exc in failures] == [(0, PublishFailed)]
    assert not any(isinstance(m, BalanceEvents) for m in committer.messages())
    assert tracker.room.held == 0 and tracker.room.committing == 0
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["commit_not_made"]
    polls = tracker.metrics.registry.get_sample_value(
        "rightfoot_poller_polls_total", {"result": "publish_failed"}
    )
    assert polls == 1
