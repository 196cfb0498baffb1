"""Partition ownership without a broker: the state partition read through a fake consumer.

The integration suites run the same code against real Kafka; here the records of the
state topic are the test's, so that what a restore does with records it does not
understand, and what a reset does when a restore fails, can be shown exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import MutableMapping
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
from aiokafka import TopicPartition
from aiokafka.errors import (
    NoBrokersAvailable,
    OffsetOutOfRangeError,
    TransactionalIdAuthorizationFailed,
)

from service import partitions
from service.config import Settings
from service.events import EventFactory
from service.metrics import Metrics
from service.partitions import PartitionOwner
from service.requests import TrackingRequest
from service.state import BatchState, encode_state, state_records
from service.tracker import Tracker

Records = list[tuple[bytes | None, bytes | None]]

DEEP = b'{"status":' + b"[" * 4000 + b"]" * 4000 + b"}"


class StateConsumer:
    """An AIOKafkaConsumer that holds one state partition's records (``records``), or
    fails to start (``down``: with an OSError, or that exception)."""

    records: Records = []
    down: bool | Exception = False

    def __init__(self, **_: Any) -> None:
        self.pos = 0

    async def start(self) -> None:
        if isinstance(self.down, Exception):
            raise self.down
        if self.down:
            raise OSError("broker unreachable")

    async def stop(self) -> None:
        pass

    def assign(self, _tps: list[TopicPartition]) -> None:
        pass

    async def seek_to_beginning(self, _tp: TopicPartition) -> None:
        self.pos = 0

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: len(self.records) for tp in tps}

    async def position(self, _tp: TopicPartition) -> int:
        return self.pos

    async def getmany(
        self, tp: TopicPartition, timeout_ms: int, max_records: int
    ) -> dict[TopicPartition, list[SimpleNamespace]]:
        batch = self.records[self.pos : self.pos + max_records]
        self.pos += len(batch)
        return {tp: [SimpleNamespace(key=k, value=v) for k, v in batch]}


@pytest.fixture
def state_topic(monkeypatch: pytest.MonkeyPatch) -> type[StateConsumer]:
    consumer = type("Consumer", (StateConsumer,), {"records": [], "down": False})
    monkeypatch.setattr(partitions, "AIOKafkaConsumer", consumer)
    return consumer


class RequestsConsumer:
    """The service's consumer of the requests topic as a reset uses it: its position in
    partition 0, and the offset committed there (None: none yet)."""

    def __init__(self, position: int, committed: int | None) -> None:
        self.pos = position
        self.committed_offset = committed
        self.paused = False

    def pause(self, *_tps: TopicPartition) -> None:
        self.paused = True

    def resume(self, *_tps: TopicPartition) -> None:
        self.paused = False

    async def committed(self, _tp: TopicPartition) -> int | None:
        return self.committed_offset

    def seek(self, _tp: TopicPartition, offset: int) -> None:
        self.pos = offset

    async def seek_to_beginning(self, *_tps: TopicPartition) -> bool:
        self.pos = 0
        return True

    async def seek_to_committed(self, *tps: TopicPartition) -> dict[TopicPartition, int | None]:
        """aiokafka's: only to a committed offset above 0; else the position stays."""
        if self.committed_offset and self.committed_offset > 0:
            self.pos = self.committed_offset
        return dict.fromkeys(tps, self.committed_offset)


def owner(consumer: object = None, **kafka: object) -> PartitionOwner:
    settings = Settings.model_validate(
        {
            "kafka": {"partitions": 1, "delivery": "at_least_once", **kafka},
            "instance_id": "t",
        }
    )
    metrics = Metrics()
    factory = EventFactory(balances_topic="balances", batch_events_topic="events", source="s")
    tracker = Tracker(settings, source=None, metrics=metrics, factory=factory)  # type: ignore[arg-type]
    return PartitionOwner(
        settings,
        metrics=metrics,
        tracker=tracker,
        consumer=lambda: consumer,
        producer=lambda: object(),
        stopping=asyncio.Event(),
    )


def batch(batch_id: str, status: str = "tracking", fps: int = 0) -> Records:
    state = BatchState(batch_id=batch_id, partition=0, status=status)  # type: ignore[arg-type]
    state.remember(list(range(1, fps + 1)))
    return list(state_records(state))


def invalid_state(o: PartitionOwner, reason: str = "invalid_state") -> float | None:
    return o.metrics.registry.get_sample_value(
        "rightfoot_poller_invalid_input_total",
        {"source": "state_topic", "reason": reason},
    )


async def test_a_deeply_nested_summary_is_unreadable_and_the_partition_restored(
    state_topic: type[StateConsumer],
) -> None:
    state_topic.records = [*batch("fine"), (b"deep", DEEP), *batch("gone", "stopped")]
    o = owner()
    try:
        with structlog.testing.capture_logs() as logs:
            await o.acquire([0])
        assert o.all_restored and o.owned == [0]
        worker = o.tracker.workers[0]
        assert sorted(worker.batches) == ["fine", "gone"]
        assert list(worker.unreadable) == ["deep"]
        assert invalid_state(o) == 1
        errors = [(e["event"], e.get("batch_id")) for e in logs if e["log_level"] == "error"]
        assert errors == [("state_unreadable", "deep")]
    finally:
        await o.release_all(1.0)


async def test_records_whose_key_is_not_a_state_key_are_one_error_and_one_sum_a_restore(
    state_topic: type[StateConsumer],
) -> None:
    """Thousands of them give two ERROR lines, the first and the count, not thousands;
    every one is counted. A batch not understood keeps its own line."""
    bad: Records = [(b"x/fp/007", b"v"), (None, b"v"), (b"\xff", b"v")]
    bad += [(f"b-{i}/fp/-1".encode(), b"v") for i in range(1000)]
    state_topic.records = [*batch("fine"), *bad, (b"deep", DEEP)]
    o = owner()
    try:
        with structlog.testing.capture_logs() as logs:
            await o.acquire([0])
        assert o.owned == [0] and sorted(o.tracker.workers[0].batches) == ["fine"]
        assert invalid_state(o) == 1002 + 1 and invalid_state(o, "no_key") == 1
        errors = [e for e in logs if e["log_level"] == "error"]
        assert [(e["event"], e.get("batch_id")) for e in errors] == [
            ("state_unreadable", None),
            ("state_keys_unreadable", None),
            ("state_unreadable", "deep"),
        ]
        first, total, _ = errors
        assert first["partition"] == 0 and first["error"] == "not a state key: 'x/fp/007'"
        assert (total["partition"], total["count"]) == (0, 1003)
        assert total["first"] == first["error"]
        held = [e for e in logs if e["log_level"] == "debug" and e["event"] == "state_unreadable"]
        assert len(held) == 1002
    finally:
        await o.release_all(1.0)


async def test_one_record_whose_key_is_not_a_state_key_is_one_error(
    state_topic: type[StateConsumer],
) -> None:
    state_topic.records = [(None, b"v"), *batch("fine")]
    o = owner()
    try:
        with structlog.testing.capture_logs() as logs:
            await o.acquire([0])
        errors = [(e["event"], e["reason"]) for e in logs if e["log_level"] == "error"]
        assert errors == [("state_unreadable", "no_key")]
        assert invalid_state(o, "no_key") == 1
    finally:
        await o.release_all(1.0)


async def restored_after_two_failures(
    monkeypatch: pytest.MonkeyPatch, error: Exception
) -> list[MutableMapping[str, Any]]:
    """Partition 0's restore raising ``error`` twice, then succeeding: the log lines."""
    monkeypatch.setattr(partitions, "RESET_RETRY_MIN_S", 0.01)
    o = owner()
    o.assigned = {0}
    attempts: list[int] = []
    restore = o._restore

    async def failing_twice(p: int, *, seek: bool = False) -> None:
        attempts.append(p)
        if len(attempts) <= 2:
            raise error
        await restore(p, seek=seek)

    monkeypatch.setattr(o, "_restore", failing_twice)
    try:
        with structlog.testing.capture_logs() as logs:
            o._schedule_reset(0)
            for _ in range(300):
                if o.all_restored:
                    break
                await asyncio.sleep(0.01)
        assert o.owned == [0] and attempts == [0, 0, 0]
        return logs
    finally:
        await o.release_all(1.0)


async def test_a_restore_that_fails_unexpectedly_is_tried_again_with_backoff(
    state_topic: type[StateConsumer], monkeypatch: pytest.MonkeyPatch
) -> None:
    logs = await restored_after_two_failures(
        monkeypatch, RecursionError("maximum recursion depth exceeded")
    )
    failed = [e for e in logs if e["event"] == "partition_reset_failed"]
    # One ERROR with its traceback a kind of fault a minute, the next round's at DEBUG.
    assert [e["log_level"] for e in failed] == ["error", "debug"]
    assert failed[0]["exc_info"] and failed[0]["suppressed"] == 0
    backoff = [e["delay_s"] for e in logs if e["event"] == "partition_reset_backoff"]
    assert backoff == [0.01, 0.02]


async def test_kafka_failing_a_restore_is_one_warning_a_round_not_an_error(
    state_topic: type[StateConsumer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker unreachable is a transient condition: one WARNING a minute with when it
    is tried again (every partition's reset fails alike), the other rounds and the wait
    itself at DEBUG."""
    logs = await restored_after_two_failures(monkeypatch, NoBrokersAvailable("the broker is down"))
    lines = [e for e in logs if e["event"] == "partition_reset_failed"]
    assert [(e["log_level"], e["retry_in_s"]) for e in lines] == [
        ("warning", 0.01),
        ("debug", 0.02),
    ]
    assert [e for e in logs if e["log_level"] == "error"] == []


async def test_a_reset_that_dies_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    o = owner()
    o.assigned = {0}

    async def broken(p: int, fenced: bool) -> None:
        raise RuntimeError("a fault")

    monkeypatch.setattr(o, "_reset", broken)
    with structlog.testing.capture_logs() as logs:
        o._schedule_reset(0)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    assert [(e["event"], e["log_level"]) for e in logs] == [("partition_reset_crashed", "error")]


async def test_a_batch_read_back_whole_tells_corrupt_records_from_a_failed_read(
    state_topic: type[StateConsumer],
) -> None:
    """load_batch: ValueError for records that are not understood (the batch is then left
    unreadable by the tracker), anything else for a read that failed (tried again)."""
    stopped = batch("b-1", "stopped", fps=3000)
    assert [k for k, _ in stopped] == [b"b-1/fp/0", b"b-1/fp/1", b"b-1"]
    o = owner()
    state_topic.records = stopped
    loaded = await o.load_batch(0, "b-1")
    assert loaded is not None and len(loaded.seen) == 3000
    state_topic.records = [stopped[0], (b"b-1/fp/1", b"F1" + b"\x00" * 7), stopped[2]]
    with pytest.raises(ValueError, match="bytes length not a multiple of item size"):
        await o.load_batch(0, "b-1")
    state_topic.records = [stopped[0], (b"b-1/fp/1", b"XX"), (b"b-1", DEEP)]
    with pytest.raises(ValueError, match="recursion"):
        await o.load_batch(0, "b-1")
    state_topic.down = True
    with pytest.raises(OSError, match="broker unreachable"):
        await o.load_batch(0, "b-1")
    # A read that fails with a ValueError of its own is not taken for corrupt records.
    state_topic.down = ValueError("a client's own fault")
    with pytest.raises(RuntimeError, match="reading state partition 0") as info:
        await o.load_batch(0, "b-1")
    assert not isinstance(info.value, ValueError)


@pytest.mark.parametrize("fenced", [True, False])
async def test_a_partition_dropped_for_a_reset_is_no_longer_counted_as_owned(
    state_topic: type[StateConsumer], monkeypatch: pytest.MonkeyPatch, fenced: bool
) -> None:
    """``owned_partitions`` while a partition is being restored again after a failed
    commit (Kafka unreachable: the restore fails too), or after another replica fenced
    it: the dashboard showed it owned all along."""
    monkeypatch.setattr(partitions, "RESET_RETRY_MIN_S", 0.01)
    o = owner()

    def owned() -> float | None:
        return o.metrics.registry.get_sample_value("rightfoot_poller_owned_partitions")

    try:
        await o.acquire([0])
        assert owned() == 1 and o.owned == [0]
        state_topic.down = True
        o._schedule_reset(0, fenced=fenced)
        for _ in range(100):
            if not o.owned:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # a few failed rounds of the restore, unless fenced
        assert o.owned == [] and owned() == 0
        state_topic.down = False
        if not fenced:
            for _ in range(300):
                if o.owned:
                    break
                await asyncio.sleep(0.01)
            assert o.owned == [0] and owned() == 1
    finally:
        await o.release_all(1.0)
    assert owned() == 0


@pytest.mark.parametrize(("committed", "position"), [(None, 0), (0, 0), (3, 3)])
async def test_a_reset_reads_the_requests_again_from_the_committed_offset_or_the_beginning(
    state_topic: type[StateConsumer], committed: int | None, position: int
) -> None:
    """A reset of a requests partition that has no committed offset yet (a new deployment,
    a partition added) reads it again from its beginning, as the consumer does: aiokafka's
    ``seek_to_committed`` left it where it was, past the request whose commit failed, which
    was lost though its HTTP request was answered 202."""
    consumer = RequestsConsumer(position=5, committed=committed)
    o = owner(consumer)
    try:
        await o.acquire([0])
        o._schedule_reset(0)
        await asyncio.gather(*o._reset_tasks)
        assert o.owned == [0] and not consumer.paused
        assert consumer.pos == position
    finally:
        await o.release_all(1.0)


class StartingProducer:
    """A transactional producer whose ``start`` raises ``error``, or never ends (None)."""

    made: list[StartingProducer] = []
    error: Exception | None = None

    def __init__(self, **_: Any) -> None:
        self.stopped = False
        self.made.append(self)

    async def start(self) -> None:
        if self.error is None:
            await asyncio.Event().wait()
        else:
            raise self.error

    async def stop(self) -> None:
        self.stopped = True


@pytest.mark.parametrize(
    "error", [TransactionalIdAuthorizationFailed("rightfoot.requests.0"), None]
)
async def test_a_producer_that_does_not_start_is_stopped(
    state_topic: type[StateConsumer], monkeypatch: pytest.MonkeyPatch, error: Exception | None
) -> None:
    """Its client was started all the same (connections, a metadata task): left so, a
    restore tried again every 30 s at most leaked one more each time. A start that never
    ends (it holds the lock a rebalance waits for) fails after a while."""
    producer: type[StartingProducer] = type(
        "Producer", (StartingProducer,), {"made": [], "error": error}
    )
    monkeypatch.setattr(partitions, "make_producer", lambda *_, **__: producer())
    monkeypatch.setattr(partitions, "RESTORE_CALL_TIMEOUT_S", 0.05)
    o = owner(delivery="exactly_once")
    for _ in range(2):
        with pytest.raises(TimeoutError if error is None else TransactionalIdAuthorizationFailed):
            await o._restore(0)
    assert [p.stopped for p in producer.made] == [True, True]
    assert o.owned == [] and not o.tracker.workers


async def test_a_partition_fenced_that_no_rebalance_takes_away_is_restored(
    state_topic: type[StateConsumer],
) -> None:
    """Fenced by the broker (it aborted a transaction open past transaction_timeout_ms and
    bumped the epoch) rather than by another replica: no rebalance comes. It waited for
    one, paused, until the pod restarted; now it is restored once the group has had the
    time to take it away (a session timeout and two heartbeats)."""
    consumer = RequestsConsumer(position=5, committed=3)
    o = owner(consumer, session_timeout_ms=1000)
    assert o.fence_settle_s == 2.0
    o.fence_settle_s = 0.1
    try:
        await o.acquire([0])
        with structlog.testing.capture_logs() as logs:
            o._schedule_reset(0, fenced=True)
            await asyncio.sleep(0.05)
            assert o.owned == [] and consumer.paused
            async with asyncio.timeout(2):
                await asyncio.gather(*o._reset_tasks)
        assert o.owned == [0] and not consumer.paused and consumer.pos == 3
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
            "partition_fenced_still_assigned"
        ]
    finally:
        await o.release_all(1.0)


async def test_a_partition_fenced_and_then_revoked_is_left_to_its_new_owner(
    state_topic: type[StateConsumer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another replica took it over: the rebalance revokes it here within the wait, and
    it is not restored (which would fence its owner)."""
    consumer = RequestsConsumer(position=5, committed=3)
    o = owner(consumer)
    o.fence_settle_s = 0.1
    try:
        await o.acquire([0])
        restores: list[int] = []

        async def restore(p: int, *, seek: bool = False) -> None:
            restores.append(p)

        monkeypatch.setattr(o, "_restore", restore)
        o._schedule_reset(0, fenced=True)
        await asyncio.sleep(0.05)
        await o.release([0])
        async with asyncio.timeout(2):
            await asyncio.gather(*o._reset_tasks)
        assert restores == [] and o.owned == [] and consumer.paused
    finally:
        await o.release_all(1.0)


async def test_a_restore_lets_the_event_loop_run_while_it_rebuilds_the_batches() -> None:
    """The restore of a partition puts its fingerprints into seen sets a step at a time,
    letting the rest run in between (the consumer's heartbeats, the other partitions'
    polls, /healthz): at once, millions of them held the loop for seconds."""
    from test_state import _busy_partition, _restore_of

    from service.partitions import _rebuilt

    log, _ = _busy_partition()
    whole = _restore_of(log).batches(lambda b, e: pytest.fail(f"{b}: {e}"))
    ticks = 0

    async def other() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(other())
    await asyncio.sleep(0)
    try:
        out = await _rebuilt(_restore_of(log), lambda b, e: pytest.fail(f"{b}: {e}"))
    finally:
        task.cancel()
    assert ticks > 10
    assert {b: sorted(s.seen) for b, s in out.items()} == {
        b: sorted(s.seen) for b, s in whole.items()
    }


def _summary_with(batch_id: str, **fields: object) -> bytes:
    state = BatchState(batch_id=batch_id, partition=0, tracked_at=1.0)
    doc = json.loads(encode_state(state))
    doc.update(fields)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "summary",
    [
        _summary_with("odd", cursor="x" * 70_000),
        _summary_with("odd", counts={f"S{i}": 0 for i in range(9000)}),
    ],
    ids=["cursor_70k", "counts_9000_keys"],
)
async def test_a_summary_the_writer_would_not_write_again_leaves_its_batch_unreadable(
    state_topic: type[StateConsumer], summary: bytes
) -> None:
    """Restored, its next commit would raise (a stop request, a poll): it is refused as
    any summary not understood is, and a request for it is answered as for one."""
    state_topic.records = [*batch("fine"), (b"odd", summary)]
    o = owner()
    try:
        with structlog.testing.capture_logs() as logs:
            await o.acquire([0])
        worker = o.tracker.workers[0]
        assert sorted(worker.batches) == ["fine"] and list(worker.unreadable) == ["odd"]
        assert invalid_state(o) == 1
        errors = [(e["event"], e.get("batch_id")) for e in logs if e["log_level"] == "error"]
        assert errors == [("state_unreadable", "odd")]
        stop = TrackingRequest(batch_id="odd", action="stop")
        commit = o.tracker.handle_request(worker, stop, 0)
        with contextlib.suppress(Exception):  # (the test's producer commits nothing)
            await commit
        unreadable = o.metrics.registry.get_sample_value(
            "rightfoot_poller_tracking_requests_total", {"action": "stop", "result": "unreadable"}
        )
        assert unreadable == 1 and "odd" not in worker.batches
    finally:
        await o.release_all(1.0)


async def test_a_summary_under_another_batchs_key_leaves_that_key_unreadable(
    state_topic: type[StateConsumer],
) -> None:
    other = state_records(BatchState(batch_id="A", partition=0, tracked_at=1.0))[-1][1]
    state_topic.records = [*batch("fine"), (b"B", other)]
    o = owner()
    try:
        with structlog.testing.capture_logs() as logs:
            await o.acquire([0])
        worker = o.tracker.workers[0]
        assert sorted(worker.batches) == ["fine"] and list(worker.unreadable) == ["B"]
        assert invalid_state(o) == 1
        errors = [(e["event"], e.get("batch_id")) for e in logs if e["log_level"] == "error"]
        assert errors == [("state_unreadable", "B")]
    finally:
        await o.release_all(1.0)


class MovingStart(StateConsumer):
    """A state partition whose log start moves past the reader's position after its first
    record (DeleteRecords, or a topic cleaned up by deletion): record 1 is gone. What the
    fetcher then does is its ``auto_offset_reset``'s, as aiokafka's does."""

    log_start = 0
    moved = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.reset = kwargs.get("auto_offset_reset", "latest")

    async def seek_to_beginning(self, _tp: TopicPartition) -> None:
        self.pos = type(self).log_start

    async def getmany(
        self, tp: TopicPartition, timeout_ms: int, max_records: int
    ) -> dict[TopicPartition, list[SimpleNamespace]]:
        cls = type(self)
        if not cls.moved and self.pos > 0:
            cls.moved, cls.log_start = True, 2
        if self.pos < cls.log_start:
            if self.reset == "none":
                raise OffsetOutOfRangeError({tp: self.pos})
            self.pos = len(self.records) if self.reset == "latest" else cls.log_start
            return {tp: []}
        return await super().getmany(tp, timeout_ms, 1)


async def test_a_restore_whose_log_start_moves_past_it_fails_and_is_read_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not a restore of the records read before the move alone, silently (aiokafka's
    default reset, "latest", ended the read at the end): the read fails, one WARNING, and
    the reset reads the partition again from its new start."""
    records = [*batch("a"), *batch("b"), *batch("c"), *batch("d")]
    consumer = type("Consumer", (MovingStart,), {"records": records})
    monkeypatch.setattr(partitions, "AIOKafkaConsumer", consumer)
    monkeypatch.setattr(partitions, "RESET_RETRY_MIN_S", 0.01)
    o = owner()
    try:
        with structlog.testing.capture_logs() as logs:
            await o.acquire([0])
            for _ in range(300):
                if o.all_restored:
                    break
                await asyncio.sleep(0.01)
        assert o.owned == [0] and sorted(o.tracker.workers[0].batches) == ["c", "d"]
        lines = [(e["event"], e["log_level"]) for e in logs if e["log_level"] != "info"]
        assert lines == [("restore_failed", "warning")]
    finally:
        await o.release_all(1.0)


class Stalled(StateConsumer):
    """A state partition whose leader goes offline after its first record, for the first
    reader only: no record comes, the position stays (``hang``: nor does position answer)."""

    readers = 0
    hang = False

    def __init__(self, **_: Any) -> None:
        super().__init__()
        cls = type(self)
        cls.readers += 1
        self.stalls = cls.readers == 1

    async def position(self, _tp: TopicPartition) -> int:
        if self.stalls and self.pos > 0 and self.hang:
            await asyncio.Event().wait()
        return self.pos

    async def getmany(
        self, tp: TopicPartition, timeout_ms: int, max_records: int
    ) -> dict[TopicPartition, list[SimpleNamespace]]:
        if self.stalls and self.pos > 0:
            await asyncio.sleep(0.01)  # (timeout_ms of nothing)
            return {}
        return await super().getmany(tp, timeout_ms, 1)


@pytest.mark.parametrize("hang", [False, True], ids=["no_records", "position_hangs"])
async def test_a_restore_that_gets_no_further_fails_and_is_tried_again(
    monkeypatch: pytest.MonkeyPatch, hang: bool
) -> None:
    """It holds the lock that a revocation and the resets wait for: past RESTORE_STALL_S
    without a record it fails (one WARNING), the lock is let go, the reset tries again."""
    records = [*batch("a"), *batch("b")]
    consumer = type("Consumer", (Stalled,), {"records": records, "readers": 0, "hang": hang})
    monkeypatch.setattr(partitions, "AIOKafkaConsumer", consumer)
    monkeypatch.setattr(partitions, "RESTORE_STALL_S", 0.1)
    monkeypatch.setattr(partitions, "RESET_RETRY_MIN_S", 0.01)
    o = owner()
    try:
        with structlog.testing.capture_logs() as logs:
            await asyncio.wait_for(o.acquire([0]), 5)
            for _ in range(300):
                if o.all_restored:
                    break
                await asyncio.sleep(0.01)
        assert o.owned == [0] and sorted(o.tracker.workers[0].batches) == ["a", "b"]
        lines = [(e["event"], e["log_level"]) for e in logs if e["log_level"] != "info"]
        assert lines == [("restore_failed", "warning")]
    finally:
        await o.release_all(1.0)
