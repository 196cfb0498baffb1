"""The requests consumer's loop (``PollerService._consume``) without a broker: a request
whose handling raises is counted, logged and left, and the loop goes on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
from aiokafka import TopicPartition
from conftest import free_port
from test_runner import HeldCommitter

from service.app import PollerService
from service.config import load_settings
from service.requests import TrackingRequest
from service.worker import PartitionWorker


@pytest.fixture
async def service() -> AsyncIterator[PollerService]:
    env = {
        "RFP_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "RFP_KAFKA__PARTITIONS": "1",
        "RFP_INSTANCE_ID": "requests",
    }
    built = PollerService(load_settings(None, env=env))
    yield built
    await built.client.close()


class RequestsConsumer:
    """Gives the test's messages of requests partition 0 once, then stops the service."""

    def __init__(self, service: PollerService, topic: str, values: list[bytes]) -> None:
        self.service = service
        self.tp = TopicPartition(topic, 0)
        self.messages = [
            SimpleNamespace(key=None, value=v, offset=n, headers=()) for n, v in enumerate(values)
        ]
        self.topic = topic

    def partitions_for_topic(self, _topic: str) -> set[int]:
        return {0}

    async def getmany(self, **_: Any) -> dict[Any, list[Any]]:
        if not self.messages:
            self.service._stopping.set()
            return {}
        messages, self.messages = self.messages, []
        return {self.tp: messages}

    def pause(self, *_: Any) -> None:
        pass

    def resume(self, *_: Any) -> None:
        pass


async def test_a_request_whose_handling_raises_does_not_end_the_requests_loop(
    service: PollerService, monkeypatch: pytest.MonkeyPatch
) -> None:
    committer = HeldCommitter()
    worker = PartitionWorker(partition=0, publisher=committer)
    service.tracker.add_worker(worker)
    service.view.loaded = True
    requests = [TrackingRequest(batch_id=b).encode() for b in ("boom", "fine")]
    consumer = RequestsConsumer(service, service.kcfg.requests_topic, requests)
    service.consumer = consumer
    route = service.tracker.route

    def broken_route(w: PartitionWorker, batch_id: str) -> int:
        if batch_id == "boom":
            raise RuntimeError("a fault of the service")
        return route(w, batch_id)

    monkeypatch.setattr(service.tracker, "route", broken_route)
    with structlog.testing.capture_logs() as logs:
        await asyncio.wait_for(service._consume(), 5)  # ends when the service stops
        for _ in range(20):
            await asyncio.sleep(0)
    assert "boom" not in worker.batches and worker.batches["fine"].active
    assert [offset for _, offset in committer.units] == [1, 2]
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [(e["event"], e["batch_id"]) for e in errors] == [("tracking_request_failed", "boom")]


async def test_a_message_whose_reading_raises_does_not_end_the_requests_loop(
    service: PollerService, monkeypatch: pytest.MonkeyPatch
) -> None:
    committer = HeldCommitter()
    worker = PartitionWorker(partition=0, publisher=committer)
    service.tracker.add_worker(worker)
    service.view.loaded = True
    requests = [b"first", TrackingRequest(batch_id="fine").encode()]
    consumer = RequestsConsumer(service, service.kcfg.requests_topic, requests)
    service.consumer = consumer
    read = service.tracker.read_request

    def broken_read(key: bytes | None, value: bytes | None, p: int, offset: int) -> Any:
        if value == b"first":
            raise RuntimeError("a fault of the service")
        return read(key, value, p, offset)

    monkeypatch.setattr(service.tracker, "read_request", broken_read)
    with structlog.testing.capture_logs() as logs:
        await asyncio.wait_for(service._consume(), 5)
        for _ in range(20):
            await asyncio.sleep(0)
    assert worker.batches["fine"].active
    assert [offset for _, offset in committer.units] == [1, 2]
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [(e["event"], e["batch_id"], e["offset"]) for e in errors] == [
        ("tracking_request_failed", None, 0)
    ]
