"""The topics the service creates, and what it says of a state topic made by hand."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from conftest import Topics

from service.config import KafkaConfig
from service.errors import PollerError
from service.kafka_clients import STATE_TOPIC_CONFIGS, ensure_topics, topic_configs

pytestmark = pytest.mark.kafka


@pytest.fixture
async def admin(kafka: str) -> AsyncIterator[AIOKafkaAdminClient]:
    client = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await client.start()
    yield client
    await client.close()


def config(kafka: str, topics: Topics) -> KafkaConfig:
    return KafkaConfig(
        bootstrap_servers=kafka,
        balances_topic=topics.balances,
        batch_events_topic=topics.events,
        requests_topic=topics.requests,
        state_topic=topics.state,
        partitions=topics.partitions,
    )


async def test_the_state_topic_is_created_compacted_with_segments_the_cleaner_can_close(
    kafka: str, topics: Topics, admin: AIOKafkaAdminClient
) -> None:
    with structlog.testing.capture_logs() as logs:
        assert await ensure_topics(config(kafka, topics), "test-topics") == topics.partitions
    configs = await topic_configs(admin, topics.state)
    assert {k: configs[k] for k in STATE_TOPIC_CONFIGS} == STATE_TOPIC_CONFIGS
    assert int(configs["segment.ms"]) <= 3_600_000
    assert not [line for line in logs if line["event"] == "state_topic_not_compacted"]
    assert (await topic_configs(admin, topics.balances))["cleanup.policy"] == "delete"


async def test_a_state_topic_made_by_hand_without_compaction_is_warned_about(
    kafka: str, topics: Topics, admin: AIOKafkaAdminClient
) -> None:
    await admin.create_topics(
        [
            NewTopic(topics.requests, topics.partitions, 1),
            NewTopic(topics.state, topics.partitions, 1),  # the broker's default: delete
        ]
    )
    with structlog.testing.capture_logs() as logs:
        await ensure_topics(config(kafka, topics), "test-topics")
    warned = [line for line in logs if line["event"] == "state_topic_not_compacted"]
    assert len(warned) == 1 and warned[0]["log_level"] == "warning"
    assert warned[0]["topic"] == topics.state and warned[0]["cleanup_policy"] == "delete"


async def test_a_state_topic_not_partitioned_like_the_requests_topic_is_refused(
    kafka: str, topics: Topics, admin: AIOKafkaAdminClient
) -> None:
    await admin.create_topics(
        [
            NewTopic(topics.requests, topics.partitions, 1),
            NewTopic(topics.state, topics.partitions + 1, 1, topic_configs=STATE_TOPIC_CONFIGS),
        ]
    )
    with pytest.raises(PollerError, match="they must match"):
        await ensure_topics(config(kafka, topics), "test-topics")
