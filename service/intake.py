"""Sending tracking requests to the requests topic (the CLI's door)."""

from __future__ import annotations

from collections.abc import Sequence

from service.config import Settings
from service.kafka_clients import ensure_topics, make_producer
from service.requests import TrackingRequest


async def send_requests(settings: Settings, reqs: Sequence[TrackingRequest]) -> None:
    """Produce each request keyed by batch ID; return once the broker has them all."""
    cfg = settings.kafka
    client_id = f"rightfoot-poller-cli-{settings.instance_id}"
    if cfg.create_topics:
        await ensure_topics(cfg, client_id)
    producer = make_producer(cfg, client_id)
    await producer.start()
    try:
        for req in reqs:
            await producer.send_and_wait(
                cfg.requests_topic, req.encode(), key=req.batch_id.encode()
            )
    finally:
        await producer.stop()
