"""kafka.value_format json_sr end to end: the service, real Kafka, a real schema registry,
and the events read back by confluent-kafka's registry-aware consumer (read_committed)."""

from __future__ import annotations

import asyncio
import json
import uuid
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from confluent_kafka import Consumer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.json_schema import JSONDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext
from conftest import ServiceFactory, SimServer, Topics, produce, service_env, wait_for

from rightfoot_simulator import SimRecord
from service.app import PollerService
from service.config import KafkaConfig, SchemaRegistryConfig, load_settings
from service.records import STATUS_NAMES, balance_event_id
from service.registry import RegistryClient, event_schemas, registry_schema, subject_for

pytestmark = [pytest.mark.kafka, pytest.mark.registry]

EXACT = Decimal("12345678901234567890.123456789")
TS = "2026-11-28T10:00:00Z"
CODES = (0, 3001, 3200)


def consume_all(bootstrap: str, topic: str, registry: str, expect: int) -> list[dict[str, Any]]:
    """Every committed event of ``topic``, decoded by confluent-kafka's JSONDeserializer."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"sr-reader-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    out: list[dict[str, Any]] = []
    # confluent-kafka's client waits forever by default; once, a request of its (the
    # one after a 404 for Apicurio's missing "associations" endpoint) never got an answer
    # and the test hung for its whole timeout. A read timeout makes it a retried request.
    with SchemaRegistryClient({"url": registry, "timeout": 10}) as client:
        deserializer = JSONDeserializer(None, schema_registry_client=client)
        consumer.subscribe([topic])
        try:
            idle = 0
            while idle < 10 and (len(out) < expect or idle < 3):
                msg = consumer.poll(0.5)
                if msg is None:
                    idle += 1
                    continue
                assert msg.error() is None, msg.error()
                idle = 0
                ctx = SerializationContext(topic, MessageField.VALUE)
                out.append(deserializer(msg.value(), ctx))
        finally:
            consumer.close()
    return out


async def test_json_sr_events_are_read_by_a_registry_aware_consumer_exactly_once(
    kafka: str, topics: Topics, sim_server: SimServer, start_service: ServiceFactory, registry: str
) -> None:
    sim = sim_server.sim
    batch = str(uuid.uuid4())
    records = [
        SimRecord(f"auth-{i}", EXACT + i, CODES[i % 3], TS, visible_at=0.0) for i in range(40)
    ]
    records.append(SimRecord("auth-none", None, 3200, TS, visible_at=0.0))
    sim.add_batch(batch, records)
    await start_service(RFP_KAFKA__VALUE_FORMAT="json_sr", RFP_SCHEMA_REGISTRY__URL=registry)
    await produce(
        kafka,
        topics.requests,
        batch.encode(),
        json.dumps({"batch_id": batch, "expected_count": len(records)}).encode(),
    )
    events = await asyncio.to_thread(consume_all, kafka, topics.events, registry, 2)
    for _ in range(30):
        if [e["event"] for e in events] == ["tracking_started", "completed"]:
            break
        await asyncio.sleep(1)
        events = await asyncio.to_thread(consume_all, kafka, topics.events, registry, 2)
    assert [e["event"] for e in events] == ["tracking_started", "completed"]
    balances = await asyncio.to_thread(consume_all, kafka, topics.balances, registry, len(records))
    by_uid = {b["authorizer_unique_id"]: b for b in balances}
    assert len(balances) == len(by_uid) == len(records)  # exactly once
    for i in range(40):
        event = by_uid[f"auth-{i}"]
        assert event == {
            "event_id": balance_event_id(batch, f"auth-{i}", TS, str(EXACT + i), CODES[i % 3]),
            "batch_id": batch,
            "authorizer_unique_id": f"auth-{i}",
            "balance": str(EXACT + i),  # every digit, as a string
            "balance_status_code": CODES[i % 3],
            "balance_status": STATUS_NAMES[CODES[i % 3]],
            "timestamp": TS,
        }
    assert by_uid["auth-none"]["balance"] is None


async def test_a_schema_the_registry_refuses_is_reported_naming_the_subject(
    kafka: str, topics: Topics, sim_server: SimServer, start_service: ServiceFactory, registry: str
) -> None:
    # The balances subject already holds a schema the service's cannot follow under BACKWARD.
    (balances, *_rest) = [s for s in event_schemas_for(topics) if s.topic == topics.balances]
    other = json.loads(balances.schema)
    other["properties"]["balance"] = {"type": "number"}
    other["required"] = [*other.get("required", []), "extra"]
    other["properties"]["extra"] = {"type": "string"}
    async with RegistryClient(SchemaRegistryConfig(url=registry)) as client:
        await client.register(balances.subject, registry_schema(json.dumps(other)))
        await client.set_compatibility(balances.subject, "BACKWARD")
    env = service_env(
        topics,
        kafka,
        sim_server.url,
        RFP_KAFKA__VALUE_FORMAT="json_sr",
        RFP_SCHEMA_REGISTRY__URL=registry,
        RFP_SCHEMA_REGISTRY__BACKOFF_MAX_S="1",
    )
    service = PollerService(load_settings(None, env=env))
    starting = asyncio.create_task(service.start())
    try:
        await wait_for(lambda: service.http_port is not None, 20, "the HTTP server")
        await wait_for(
            lambda: (
                "schema_registry_error" in service.readiness()[1]
                and service.readiness()[1]["schema_registry_error"]["reason"]
                == "SchemaIncompatible"
            ),
            30,
            "the refusal on /readyz",
        )
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{service.http_port}/readyz") as resp,
        ):
            body = await resp.json()
        assert resp.status == 503
        assert body["checks"]["schema_registry"] is False
        assert subject_for(topics.balances) in body["schema_registry_error"]["error"]
    finally:
        await service.stop()
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)


def event_schemas_for(topics: Topics) -> list[Any]:
    return event_schemas(
        KafkaConfig(
            balances_topic=topics.balances,
            batch_events_topic=topics.events,
            requests_topic=topics.requests,
            state_topic=topics.state,
        )
    )
