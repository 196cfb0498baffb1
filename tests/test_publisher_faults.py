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
from aiokafka.errors import KafkaTimeoutError
from aiokafka.producer.transaction_manager import TransactionManager

from service.config import Settings
from service.errors import PublishFailed
from service.events import OutMessage
from service.kafka import PartitionPublisher
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
