"""A partition's transactional publisher without a broker: a producer the test controls.

The producer keeps aiokafka's own transaction manager, so that an abort the manager
refuses (a transaction being committed, a producer in FATAL_ERROR) is refused here as
it is there. tests/test_publisher.py runs the publisher against the broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import structlog
from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError, ProducerFenced
from aiokafka.producer.transaction_manager import TransactionManager

from service import kafka
from service.config import Settings
from service.errors import PartitionLost, PublishFailed
from service.events import OutMessage
from service.kafka import PartitionPublisher
from service.kafka_clients import stop_client
from service.metrics import Metrics


class Producer:
    """A transactional AIOKafkaProducer whose records are delivered at once, and whose
    ``commit_transaction`` does what ``commit`` does once the manager is committing."""

    def __init__(self, commit: Callable[[], Any] | None = None) -> None:
        self.txn = TransactionManager("t.requests.0", 60000)
        self.txn.set_pid_and_epoch(1, 0)
        self.commit = commit
        self.aborts = 0

    async def begin_transaction(self) -> None:
        self.txn.begin_transaction()

    async def send(self, *_: Any, **__: Any) -> asyncio.Future[None]:
        delivered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        delivered.set_result(None)
        return delivered

    async def send_offsets_to_transaction(
        self, _offsets: dict[TopicPartition, int], _group_id: str
    ) -> None:
        pass

    async def commit_transaction(self) -> None:
        self.txn.committing_transaction()
        if self.commit is not None:
            await self.commit()
        self.txn.complete_transaction()

    async def abort_transaction(self) -> None:
        self.aborts += 1
        self.txn.aborting_transaction()  # AssertionError unless it can be aborted
        self.txn.complete_transaction()

    async def stop(self) -> None:
        pass


def publisher(producer: Producer, **kafka: Any) -> PartitionPublisher:
    cfg = Settings.model_validate({"kafka": {"partitions": 1, **kafka}}).kafka

    async def no_offsets(_offsets: object) -> None:
        raise AssertionError("exactly_once commits its offsets in the transaction")

    pub = PartitionPublisher(
        partition=0,
        cfg=cfg,
        metrics=Metrics(),
        producer=producer,
        transactional=True,
        commit_offsets=no_offsets,
        owns_producer=True,
    )
    pub.start()
    return pub


def errors(pub: PartitionPublisher) -> dict[str, float]:
    """``publish_errors_total`` by kind, those counted."""
    return {
        s.labels["kind"]: s.value
        for metric in pub.metrics.registry.collect()
        if metric.name == "rightfoot_poller_publish_errors"
        for s in metric.samples
        if s.name.endswith("_total") and s.value
    }


MESSAGE = OutMessage("events", b"b-1", b"{}", [])


async def test_a_commit_that_fails_is_reported_as_itself_when_it_cannot_be_aborted() -> None:
    """aiokafka refuses with an AssertionError to abort a transaction it is committing:
    that hid the failure of the commit (``publish_failed`` and ``publish_errors_total``
    said AssertionError)."""

    async def times_out() -> None:
        raise KafkaTimeoutError("no answer to EndTxn")

    producer = Producer(commit=times_out)
    pub = publisher(producer)
    try:
        with (
            structlog.testing.capture_logs() as logs,
            pytest.raises(PublishFailed, match="KafkaTimeoutError: no answer to EndTxn"),
        ):
            await pub.publish([MESSAGE], request_offset=7)
        assert producer.aborts == 1  # tried, and refused
        assert errors(pub) == {"KafkaTimeoutError": 1}
        failed = [e for e in logs if e["event"] == "publish_failed"]
        assert len(failed) == 1 and "KafkaTimeoutError" in failed[0]["error"]
        assert "AssertionError" not in failed[0]["error"]
    finally:
        await pub.close(1.0)


async def test_a_commit_that_fails_in_the_transaction_is_aborted() -> None:
    """The abort still happens when it can: a send that fails before the commit."""
    producer = Producer()

    async def refused(*_: Any, **__: Any) -> asyncio.Future[None]:
        raise KafkaTimeoutError("no metadata")

    producer.send = refused  # type: ignore[method-assign]
    pub = publisher(producer)
    try:
        with pytest.raises(PublishFailed, match="KafkaTimeoutError"):
            await pub.publish([MESSAGE], request_offset=7)
        assert producer.aborts == 1 and producer.txn.state.name == "READY"
        assert errors(pub) == {"KafkaTimeoutError": 1}
    finally:
        await pub.close(1.0)


async def test_a_commit_that_outlasts_its_share_of_the_transaction_timeout_is_given_up() -> None:
    """A partition that takes no records (min ISR not met, a broker restarting): the
    idempotent producer retries it for ever, and at ``transaction_timeout_ms`` the broker
    aborts the transaction and bumps the epoch, so that the next request is refused as
    fenced (here: the records fail with ProducerFenced then). Taken for a partition lost
    to another replica, it was never polled again. Given up before that, the commit
    fails as any other does: the partition is restored from Kafka."""
    producer = Producer()
    loop = asyncio.get_running_loop()

    async def unwritable(*_: Any, **__: Any) -> asyncio.Future[None]:
        delivered: asyncio.Future[None] = loop.create_future()
        loop.call_later(0.5, delivered.set_exception, ProducerFenced())
        return delivered

    producer.send = unwritable  # type: ignore[method-assign]
    pub = publisher(producer, transaction_timeout_ms=1000)
    assert pub.commit_timeout_s == 0.75
    pub.commit_timeout_s = 0.05
    failures: list[BaseException] = []
    pub.on_failure = failures.append
    try:
        with pytest.raises(PublishFailed, match=r"TimeoutError: not committed within 0\.05 s"):
            await pub.publish([MESSAGE], request_offset=7)
        assert producer.aborts == 1 and producer.txn.state.name == "READY"
        assert len(failures) == 1 and not isinstance(failures[0], PartitionLost)
        assert errors(pub) == {"TimeoutError": 1}
    finally:
        await pub.close(1.0)


async def test_an_abort_that_gets_no_answer_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiokafka flushes the transaction's records before it aborts it: with a partition
    that takes none, the abort waits as long as the commit did."""
    monkeypatch.setattr(kafka, "ABORT_TIMEOUT_S", 0.05)
    producer = Producer()

    async def never(*_: Any, **__: Any) -> asyncio.Future[None]:
        return asyncio.get_running_loop().create_future()

    async def stuck() -> None:
        producer.aborts += 1
        await asyncio.Event().wait()

    producer.send = never  # type: ignore[method-assign]
    producer.abort_transaction = stuck  # type: ignore[method-assign]
    pub = publisher(producer)
    pub.commit_timeout_s = 0.05
    try:
        async with asyncio.timeout(5):
            with pytest.raises(PublishFailed, match="TimeoutError: not committed within"):
                await pub.publish([MESSAGE], request_offset=7)
        assert producer.aborts == 1
    finally:
        await pub.close(1.0)


class Part:
    """A part of an aiokafka client that ``stop()`` closes: the sender, the client."""

    def __init__(self) -> None:
        self.closed = False

    async def close(self) -> None:
        self.closed = True


class StuckProducer:
    """A producer whose ``stop()`` waits for records a partition never takes."""

    def __init__(self, stuck: bool) -> None:
        self.stuck = stuck
        self._sender = Part()
        self.client = Part()

    async def stop(self) -> None:
        if self.stuck:
            await asyncio.Event().wait()


@pytest.mark.parametrize("stuck", [True, False])
async def test_a_producer_whose_stop_does_not_end_is_closed_all_the_same(stuck: bool) -> None:
    """Given up after a commit that took too long, a producer still holds records for a
    partition that takes none, and its ``stop()`` waits for them: it was left with its
    sender, connections and metadata task, one more at each reset."""
    producer = StuckProducer(stuck)
    async with asyncio.timeout(5):
        await stop_client(producer, timeout_s=0.05)
    assert (producer._sender.closed, producer.client.closed) == (stuck, stuck)


async def test_close_does_not_swallow_its_callers_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``close()`` bounded by its caller (``wait_for(service.stop(), grace)``) while a
    commit is stuck and its abort too: the caller's cancellation was suppressed with the
    publisher task's, and close() (and the rest of stop()) ran on past the grace."""
    monkeypatch.setattr(kafka, "ABORT_TIMEOUT_S", 30.0)
    producer = Producer()

    async def never(*_: Any, **__: Any) -> asyncio.Future[None]:
        return asyncio.get_running_loop().create_future()

    async def stuck() -> None:
        producer.aborts += 1
        await asyncio.Event().wait()

    producer.send = never  # type: ignore[method-assign]
    producer.abort_transaction = stuck  # type: ignore[method-assign]
    pub = publisher(producer)
    publishing = asyncio.ensure_future(pub.publish([MESSAGE], request_offset=7))
    queued = asyncio.ensure_future(pub.publish([MESSAGE], request_offset=8))
    await asyncio.sleep(0.01)
    after: list[str] = []

    async def stop_like() -> None:
        await pub.close(0.05)
        after.append("went on after close")
        await asyncio.sleep(5)

    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(stop_like(), 0.3)
    assert loop.time() - began < 1.0
    assert after == []
    # What was queued behind the stuck commit fails at once; the stuck one with its task.
    with pytest.raises(PublishFailed):
        await asyncio.wait_for(queued, 1.0)
    assert pub._task is not None and pub._task.cancelling()
    pub._task.cancel()
    publishing.cancel()
    await asyncio.gather(pub._task, publishing, return_exceptions=True)


async def test_close_goes_on_when_only_the_publisher_task_is_cancelled() -> None:
    """The publisher task's own cancellation (close() cancels it) is not the caller's."""
    producer = Producer()
    pub = publisher(producer)
    await pub.publish([MESSAGE], request_offset=7)
    await pub.close(0.05)
    assert pub._task is not None and pub._task.cancelled()
