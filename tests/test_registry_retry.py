"""A schema registry that asks to be left alone (429, 503 with Retry-After): waited for, as an
unavailable registry is, for as long as it asks (up to ``schema_registry.backoff_max_s``),
with a WARNING a minute, not an ERROR per attempt. No Kafka, no real registry: a small
aiohttp server answers."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import free_port

from service.config import KafkaConfig, SchemaRegistryConfig, load_settings
from service.errors import RegistryUnavailable
from service.registry import (
    RegistryClient,
    RegistryThrottled,
    event_schemas,
    schema_ids_when_available,
)
from service.wire import frame, frames_when_available

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Answer = tuple[int, dict[str, str]]  # status, headers


class Serve(Protocol):
    def __call__(self, handler: Handler) -> Awaitable[str]: ...


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Serves one handler for every path; returns the base URL of a ccompat API."""
    servers: list[TestServer] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        server = TestServer(app, host="127.0.0.1", port=free_port())
        await server.start_server()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}/apis/ccompat/v7"

    yield start
    for server in servers:
        await server.close()


def answers(first: list[Answer], then_id: int = 7) -> tuple[Handler, list[int]]:
    """A handler that gives the ``first`` answers in turn, then ``{"id": then_id}``; and the
    statuses it answered."""
    queue = list(first)
    sent: list[int] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        if queue:
            status, headers = queue.pop(0)
            sent.append(status)
            body = {"error_code": status, "message": "slow down"}
            return web.json_response(body, status=status, headers=headers)
        sent.append(200)
        return web.json_response({"id": then_id})

    return handler, sent


class Retries:
    def __init__(self) -> None:
        self.slept: list[float] = []
        self.seen: list[tuple[str, int, float]] = []

    async def sleep(self, delay: float) -> None:
        self.slept.append(delay)

    def on_retry(self, exc: RegistryUnavailable, failures: int, delay: float) -> None:
        self.seen.append((exc.reason, failures, delay))


async def ids_after(url: str, retries: Retries, **cfg: float) -> dict[str, int]:
    schemas = event_schemas(
        KafkaConfig(balances_topic="t.balances", batch_events_topic="t.batch-events")
    )
    config = SchemaRegistryConfig(url=url, **{"backoff_base_s": 1, "backoff_max_s": 60, **cfg})
    async with RegistryClient(config) as client:
        return await schema_ids_when_available(
            client, schemas, rng=random.Random(3), sleep=retries.sleep, on_retry=retries.on_retry
        )


async def test_a_429_is_throttling_waited_for_its_retry_after(serve: Serve) -> None:
    handler, sent = answers([(429, {"Retry-After": "7"})])
    retries = Retries()
    ids = await ids_after(await serve(handler), retries)
    assert set(ids.values()) == {7}
    assert sent[:2] == [429, 200]
    assert retries.seen == [("throttled", 1, 7.0)]
    assert retries.slept == [7.0]  # the backoff alone would be 0.5 to 1 s


async def test_a_503s_retry_after_is_waited_too(serve: Serve) -> None:
    handler, sent = answers([(503, {"Retry-After": "5"}), (503, {})])
    retries = Retries()
    await ids_after(await serve(handler), retries)
    assert sent[:3] == [503, 503, 200]
    assert [(reason, n) for reason, n, _ in retries.seen] == [
        ("server_error", 1),
        ("server_error", 2),
    ]
    assert retries.slept[0] == 5.0
    assert 1 <= retries.slept[1] <= 2  # no Retry-After: the backoff


async def test_a_retry_after_longer_than_backoff_max_is_cut_to_it(serve: Serve) -> None:
    handler, _ = answers([(429, {"Retry-After": "3600"}), (429, {"Retry-After": "soon"})])
    retries = Retries()
    await ids_after(await serve(handler), retries, backoff_max_s=30)
    assert retries.slept[0] == 30.0
    assert 1 <= retries.slept[1] <= 2  # a Retry-After that is no number or date: the backoff


async def test_a_429_is_a_throttled_error_with_its_retry_after(serve: Serve) -> None:
    handler, _ = answers([(429, {"Retry-After": "12"})])
    url = await serve(handler)
    async with RegistryClient(SchemaRegistryConfig(url=url)) as client:
        with pytest.raises(RegistryThrottled) as info:
            await client.register("s-value", "{}")
    assert info.value.status == 429
    assert info.value.retry_after_s == 12.0
    assert "HTTP 429" in str(info.value) and "slow down" in str(info.value)


async def test_start_up_throttled_by_the_registry_warns_and_goes_on(serve: Serve) -> None:
    """It was one ERROR, schema_registry_refused, then a wait of backoff_max_s whatever
    the registry asked."""
    handler, sent = answers([(429, {"Retry-After": "1"})])
    settings = load_settings(
        None,
        env={
            "RFP_KAFKA__VALUE_FORMAT": "json_sr",
            "RFP_SCHEMA_REGISTRY__URL": await serve(handler),
            "RFP_SCHEMA_REGISTRY__BACKOFF_BASE_S": "0.01",
            "RFP_SCHEMA_REGISTRY__BACKOFF_MAX_S": "30",
        },
    )
    problems: list[dict[str, str] | None] = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    with structlog.testing.capture_logs() as logs:
        frames = await asyncio.wait_for(
            frames_when_available(settings, stopping=asyncio.Event(), on_problem=problems.append),
            20,
        )
    waited = loop.time() - started
    assert frames is not None and set(frames.values()) == {frame(7)}
    assert sent[0] == 429
    assert 0.9 <= waited < 10  # the Retry-After, not the backoff (0.01 s) nor backoff_max_s
    assert [e["event"] for e in logs if e["log_level"] in ("error", "warning")] == [
        "schema_registry_unavailable"
    ]
    (warned,) = [e for e in logs if e["event"] == "schema_registry_unavailable"]
    assert warned["log_level"] == "warning"
    assert warned["reason"] == "throttled"
    assert warned["retry_in_s"] == 1.0
    assert problems[0] is not None and problems[0]["reason"] == "throttled"
    assert problems[-1] is None
