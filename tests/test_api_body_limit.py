"""A page whose body is over the size limit is a malformed page: refused unread, and counted
in ``invalid_input_total{source="api",reason="malformed_page"}`` as any other."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from service import api as api_module
from service.api import ApiKey, RightfootClient
from service.config import RightfootConfig
from service.errors import ApiMalformedResponse
from service.metrics import Metrics
from service.pacing import RateLimiter

BATCH = "6a1d2c3b-4e5f-4a6b-8c7d-000000000251"
STREAMED = "6a1d2c3b-4e5f-4a6b-8c7d-000000000252"
LIMIT = 4096


async def big_page(request: web.Request) -> web.StreamResponse:
    """A page over LIMIT: with a Content-Length, or streamed without one (chunked)."""
    body = b'{"records": [' + b'"x",' * LIMIT + b'"x"], "next_page_token": null}'
    if request.query.get("batchId") == BATCH:
        return web.Response(body=body, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    for i in range(0, len(body), 1024):
        await response.write(body[i : i + 1024])
    await response.write_eof()
    return response


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/v1/balances", big_page)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


async def no_sleep(_seconds: float) -> None:
    pass


@pytest.mark.parametrize("batch_id", [BATCH, STREAMED], ids=["content_length", "chunked"])
async def test_a_body_over_the_limit_is_a_malformed_page_and_counted(
    base_url: str, batch_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api_module, "MAX_BODY_BYTES", LIMIT)
    metrics = Metrics()
    client = RightfootClient(
        RightfootConfig(base_url=base_url, max_attempts=2),
        instance_id="poller-test",
        metrics=metrics,
        api_key=ApiKey("rf_test_key_0123456789abcdef"),
        limiter=RateLimiter(1000.0, sleep=no_sleep),
        rng=random.Random(0),
        sleep=no_sleep,
    )
    await client.start()
    try:
        with pytest.raises(ApiMalformedResponse, match="too large"):
            await client.fetch_page(batch_id, None)
    finally:
        await client.close()
    counted = metrics.registry.get_sample_value(
        "rightfoot_poller_invalid_input_total", {"source": "api", "reason": "malformed_page"}
    )
    assert counted == 1
