"""A partition's publisher against the broker: what a round that fails is counted as."""

from __future__ import annotations

import pytest
from conftest import Topics

from service.config import load_settings
from service.errors import PublishFailed
from service.events import OutMessage
from service.kafka import PartitionPublisher
from service.kafka_clients import ensure_topics, make_producer
from service.metrics import Metrics
from service.state import MAX_MESSAGE_BYTES

pytestmark = pytest.mark.kafka


async def no_offsets(_offsets: object) -> None:
    raise AssertionError("no offsets are committed here")


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
async def test_a_round_that_fails_is_counted_as_an_abort_in_either_delivery(
    kafka: str, topics: Topics, delivery: str
) -> None:
    """``transactions_total{result="abort"}``, which the alert on publish failures reads: a
    round of at_least_once that fails is one too (it counted nothing, and a failure whose
    kind was seen for the first time raised no alert: its counter series began at 1)."""
    cfg = load_settings(None, env={**topics.env(kafka), "RFP_KAFKA__DELIVERY": delivery}).kafka
    await ensure_topics(cfg, "test-publisher")
    transactional = delivery == "exactly_once"
    producer = make_producer(
        cfg, "test-publisher", transactional_id=f"{topics.prefix}-p0" if transactional else None
    )
    await producer.start()
    metrics = Metrics()
    publisher = PartitionPublisher(
        partition=0,
        cfg=cfg,
        metrics=metrics,
        producer=producer,
        transactional=transactional,
        commit_offsets=no_offsets,
        owns_producer=True,
    )
    publisher.start()

    def rounds(result: str) -> float | None:
        return metrics.registry.get_sample_value(
            "rightfoot_poller_transactions_total", {"result": result}
        )

    try:
        await publisher.publish([OutMessage(topics.events, b"b-1", b"{}", [])])
        assert (rounds("commit"), rounds("abort")) == (1, 0)
        too_large = OutMessage(topics.events, b"b-1", b"x" * (2 * MAX_MESSAGE_BYTES), [])
        with pytest.raises(PublishFailed):
            await publisher.publish([too_large])
        assert (rounds("commit"), rounds("abort")) == (1, 1)
    finally:
        await publisher.close(5.0)
