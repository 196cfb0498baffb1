"""The Rightfoot API client against the simulator: paging, retries, typed errors, metrics."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer

from rightfoot_simulator import Simulator, build_app
from service import __version__
from service.api import (
    MAX_ERROR_MESSAGE_CHARS,
    MAX_RETRY_AFTER_S,
    ApiKey,
    RightfootClient,
    error_from_response,
    parse_retry_after,
)
from service.config import PollingConfig, RightfootConfig, load_settings
from service.errors import (
    ApiBadRequest,
    ApiError,
    ApiMalformedResponse,
    ApiNotFound,
    ApiRateLimited,
    ApiServerError,
    ApiTransportError,
    ApiUnauthorized,
)
from service.metrics import Metrics
from service.pacing import RateLimiter
from service.policy import Policy
from service.state import BatchState

KEY = "rf_test_key_5f1d0c9e8b7a6d5c4b3a"
INSTANCE = "poller-test-0"
BATCH = "6a1d2c3b-4e5f-4a6b-8c7d-000000000250"


class Sleeps:
    """An injected sleep: records the delays asked for and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


class Harness:
    def __init__(self, sim: Simulator, url: str) -> None:
        self.sim = sim
        self.url = url
        self.metrics = Metrics()
        self.client_sleeps = Sleeps()
        self.limiter_sleeps = Sleeps()
        self.clients: list[RightfootClient] = []

    async def client(self, key: str | None = KEY, **cfg: Any) -> RightfootClient:
        return await self.client_with(ApiKey(key), **cfg)

    async def client_with(self, api_key: ApiKey, **cfg: Any) -> RightfootClient:
        settings: dict[str, Any] = {
            "base_url": self.url,
            "page_limit": 100,
            "max_attempts": 4,
            "backoff_base_s": 1.0,
            "backoff_max_s": 8.0,
            "timeout_s": 5.0,
        }
        settings.update(cfg)
        client = RightfootClient(
            RightfootConfig(**settings),
            instance_id=INSTANCE,
            metrics=self.metrics,
            api_key=api_key,
            limiter=RateLimiter(1000.0, sleep=self.limiter_sleeps),
            rng=random.Random(0),
            sleep=self.client_sleeps,
        )
        await client.start()
        self.clients.append(client)
        return client

    def requests(self) -> list[int]:
        return [e.status for e in self.sim.request_log]

    def count(self, code: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "rightfoot_poller_api_requests_total", {"endpoint": "balances", "code": code}
        )
        return value or 0.0


@pytest.fixture
async def api() -> AsyncIterator[Harness]:
    sim = Simulator(api_keys=[KEY], seed=11)
    sim.generate_batch(BATCH, 250, seed=5)
    server = TestServer(build_app(sim), host="127.0.0.1")
    await server.start_server()
    harness = Harness(sim, str(server.make_url("")).rstrip("/"))
    try:
        yield harness
    finally:
        for client in harness.clients:
            await client.close()
        await server.close()


async def test_pages_a_batch_following_tokens(api: Harness) -> None:
    client = await api.client()
    pages = []
    token = None
    while True:
        page = await client.fetch_page(BATCH, token)
        pages.append(page)
        if not page.has_more:
            break
        token = page.next_page_token
    assert [len(p.records) for p in pages] == [100, 100, 50]
    assert [p.has_more for p in pages] == [True, True, False]
    assert pages[-1].next_page_token is None
    got = [(r.authorizer_unique_id, r.balance) for p in pages for r in p.records]
    expected = [
        (r.authorizer_unique_id, None if r.balance is None else str(r.balance))
        for r in api.sim.all_records(BATCH)
    ]
    assert got == expected
    assert len({r.event_id for p in pages for r in p.records}) == 250

    log = api.sim.request_log
    assert [e.status for e in log] == [200, 200, 200]
    queries = [parse_qs(e.query) for e in log]
    assert all(q["batchId"] == [BATCH] and q["limit"] == ["100"] for q in queries)
    assert "nextPageToken" not in queries[0]
    assert queries[1]["nextPageToken"] == [pages[0].next_page_token]
    assert queries[2]["nextPageToken"] == [pages[1].next_page_token]
    for entry in log:
        assert entry.path == "/v1/balances"
        assert entry.user_agent == f"rightfoot-poller/{__version__} ({INSTANCE})"
        assert entry.instance == INSTANCE
    assert api.count("200") == 3


async def test_limit_is_sent_as_configured(api: Harness) -> None:
    client = await api.client(page_limit=30)
    page = await client.fetch_page(BATCH, None)
    assert len(page.records) == 30
    assert parse_qs(api.sim.request_log[-1].query)["limit"] == ["30"]
    page = await client.fetch_page(BATCH, None, limit=7)
    assert len(page.records) == 7


async def test_5xx_burst_shorter_than_max_attempts_is_retried(api: Harness) -> None:
    api.sim.faults.error_5xx_next = 3
    client = await api.client()
    page = await client.fetch_page(BATCH, None)
    assert len(page.records) == 100
    assert api.requests() == [500, 502, 503, 200]
    delays = api.client_sleeps.delays
    assert len(delays) == 3
    for failures, delay in enumerate(delays, start=1):
        ceiling = min(8.0, 2 ** (failures - 1))
        assert ceiling / 2 <= delay <= ceiling
    assert [api.count(c) for c in ("500", "502", "503", "200")] == [1, 1, 1, 1]


async def test_5xx_longer_than_max_attempts_raises_after_exactly_max_attempts(
    api: Harness,
) -> None:
    api.sim.faults.error_5xx_next = 50
    client = await api.client(max_attempts=3)
    with pytest.raises(ApiServerError) as info:
        await client.fetch_page(BATCH, None)
    assert len(api.sim.request_log) == 3
    assert info.value.status in (500, 502, 503)
    assert len(api.client_sleeps.delays) == 2
    assert api.count("200") == 0
    assert api.count("500") + api.count("502") + api.count("503") == 3


async def test_429_waits_at_least_retry_after_then_succeeds(api: Harness) -> None:
    api.sim.faults.rate_limit_next = 1
    api.sim.faults.retry_after_s = 3
    client = await api.client(backoff_base_s=0.01, backoff_max_s=0.02)
    page = await client.fetch_page(BATCH, None)
    assert len(page.records) == 100
    assert api.requests() == [429, 200]
    assert len(api.client_sleeps.delays) == 1
    assert api.client_sleeps.delays[0] >= 3.0
    # Retry-After holds back the whole replica's limiter too, not just this request.
    assert max(api.limiter_sleeps.delays) > 2.0
    assert (api.count("429"), api.count("200")) == (1, 1)


async def test_429_with_a_long_retry_after_is_not_waited_inline(api: Harness) -> None:
    api.sim.faults.rate_limit_next = 1
    api.sim.faults.retry_after_s = 120
    client = await api.client()
    with pytest.raises(ApiRateLimited) as info:
        await client.fetch_page(BATCH, None)
    assert info.value.retry_after == 120
    assert api.requests() == [429]
    assert api.client_sleeps.delays == []


async def test_429_with_retry_after_as_an_http_date_is_honoured(api: Harness) -> None:
    api.sim.faults.rate_limit_next = 1
    api.sim.faults.retry_after_s = 120
    api.sim.faults.retry_after_date = True
    client = await api.client()
    with pytest.raises(ApiRateLimited) as info:
        await client.fetch_page(BATCH, None)
    assert info.value.retry_after is not None and 115 <= info.value.retry_after <= 121


@pytest.mark.parametrize("as_date", [False, True], ids=["seconds", "http-date"])
async def test_a_retry_after_of_two_hours_is_waited_in_full(api: Harness, as_date: bool) -> None:
    """The contract: a 429 waits at least Retry-After. Every request of the replica is held
    back that long, and the batch's next poll is no sooner."""
    api.sim.faults.rate_limit_next = 1
    api.sim.faults.retry_after_s = 7200
    api.sim.faults.retry_after_date = as_date
    client = await api.client()
    with structlog.testing.capture_logs() as logs, pytest.raises(ApiRateLimited) as info:
        await client.fetch_page(BATCH, None)
    exc = info.value
    assert exc.retry_after is not None and exc.retry_after >= 7200 - (1.0 if as_date else 0.0)
    assert api.client_sleeps.delays == []  # not waited inline: the batch is rescheduled
    labels = {"source": "api", "reason": "retry_after"}
    assert not api.metrics.registry.get_sample_value("rightfoot_poller_invalid_input_total", labels)
    (warned,) = [e for e in logs if e["event"].startswith("retry_after")]
    assert (warned["event"], warned["log_level"]) == ("retry_after_long", "warning")
    assert warned["retry_after_s"] >= 7199
    # The batch's next poll: no sooner than the Retry-After.
    polling = Policy(PollingConfig(), 8.0, random.Random(0))
    step = polling.failed(BatchState(batch_id=BATCH, partition=0), exc, time.time())
    assert step.poll_in is not None and step.poll_in >= exc.retry_after
    # The next request waits out the two hours (the limiter's recorded sleep), then goes on.
    assert len((await client.fetch_page(BATCH, None)).records) == 100
    assert 7190.0 < max(api.limiter_sleeps.delays) <= 7200.0


async def test_a_retry_after_of_years_holds_requests_back_seven_days_at_most(
    api: Harness,
) -> None:
    """A date decades ahead would stop every request of the replica, and every poll, for
    good: no wait that long is plausible."""
    api.sim.faults.rate_limit_next = 1
    api.sim.faults.retry_after_s = 80 * 365 * 86400
    api.sim.faults.retry_after_date = True
    client = await api.client()
    with structlog.testing.capture_logs() as logs, pytest.raises(ApiRateLimited) as info:
        await client.fetch_page(BATCH, None)
    assert info.value.retry_after == MAX_RETRY_AFTER_S == 7 * 86400.0
    labels = {"source": "api", "reason": "retry_after"}
    assert api.metrics.registry.get_sample_value("rightfoot_poller_invalid_input_total", labels)
    (warned,) = [e for e in logs if e["event"] == "retry_after_capped"]
    assert warned["log_level"] == "warning" and warned["retry_after_s"] > 79 * 365 * 86400
    # The next request waits out the 7 days (the limiter's recorded sleep), then goes on.
    assert len((await client.fetch_page(BATCH, None)).records) == 100
    assert 7 * 86400.0 - 100 < max(api.limiter_sleeps.delays) <= 7 * 86400.0


@pytest.fixture
async def unavailable() -> AsyncIterator[tuple[Harness, list[str]]]:
    """An API that answers 503 with the Retry-After values queued in the list it gives
    (``""``: none), then a page."""
    queue: list[str] = []
    seen: list[int] = []

    async def page(request: web.Request) -> web.Response:
        if queue:
            seen.append(503)
            value = queue.pop(0)
            headers = {"Retry-After": value} if value else {}
            body = {"status": "error", "error": {"code": "UNAVAILABLE", "message": "maintenance"}}
            return web.json_response(body, status=503, headers=headers)
        seen.append(200)
        return web.json_response({"batch_id": BATCH, "balances": [], "has_more": False})

    app = web.Application()
    app.router.add_get("/v1/balances", page)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    harness = Harness(Simulator(api_keys=[KEY]), str(server.make_url("")).rstrip("/"))
    harness.requests = lambda: list(seen)  # type: ignore[method-assign]
    try:
        yield harness, queue
    finally:
        for client in harness.clients:
            await client.close()
        await server.close()


async def test_a_503_waits_at_least_its_retry_after(
    unavailable: tuple[Harness, list[str]],
) -> None:
    """The contract: 5xx backs off exponentially; a 503's Retry-After (how long the vendor
    says it is unavailable) is a lower bound of that backoff, waited inline up to 30 s."""
    api, queue = unavailable
    queue.extend(["20", "", "0"])
    client = await api.client(backoff_base_s=1.0, backoff_max_s=8.0)
    page = await client.fetch_page(BATCH, None)
    assert page.records == []
    assert api.requests() == [503, 503, 503, 200]
    first, second, third = api.client_sleeps.delays
    assert first == 20.0  # the Retry-After, over the backoff's 0.5-1 s
    assert 1.0 <= second <= 2.0 and 2.0 <= third <= 4.0  # the backoff, none or a shorter one
    assert api.limiter_sleeps.delays == []  # a 503 does not hold the replica back as a 429


async def test_a_503_with_a_long_retry_after_is_not_waited_inline(
    unavailable: tuple[Harness, list[str]],
) -> None:
    api, queue = unavailable
    queue.append("600")
    client = await api.client()
    with pytest.raises(ApiServerError) as info:
        await client.fetch_page(BATCH, None)
    assert info.value.status == 503 and info.value.retry_after == 600
    assert api.requests() == [503]  # the poll ends; the batch is polled again later
    assert api.client_sleeps.delays == []


@pytest.mark.parametrize(
    "header",
    [
        "Sun, 06 Nov 1994 08:49:37 GMT",
        "Sun, 06 Nov 1994 08:49:37 -0000",
        "Sun Nov  6 08:49:37 1994",
    ],
)
def test_an_http_date_is_read_in_gmt_whatever_the_local_time_zone(
    header: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 9110: HTTP dates are GMT. "-0000" and asctime dates parse without a zone, and
    would otherwise be read in the pod's local time."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert parse_retry_after(header, now=784111777.0 - 30) == 30.0
    finally:
        monkeypatch.undo()
        time.tzset()


async def test_a_compressed_page_is_read_whole(api: Harness) -> None:
    api.sim.faults.compress_pages = True
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        headers = {"Authorization": f"Bearer {KEY}", "Accept-Encoding": "gzip"}
        url = f"{api.url}/v1/balances?batchId={BATCH}"
        async with raw.get(url, headers=headers) as resp:
            assert resp.headers["Content-Encoding"] == "gzip"
    client = await api.client()
    page = await client.fetch_page(BATCH, None)
    assert len(page.records) == 100 and page.has_more


def test_an_error_bodys_message_is_kept_short_in_the_error() -> None:
    """It goes into log lines and into the batch's state: one answer must not flood them."""
    body = json.dumps({"error": {"code": "X" * 5000, "message": "overloaded " * 2000}}).encode()
    exc = error_from_response(503, body, None)
    assert str(exc).startswith("HTTP 503 XXX") and "overloaded overloaded" in str(exc)
    assert len(str(exc)) < 650


@pytest.mark.parametrize("key", ["wrong-key-0000000000", None])
async def test_401_raises_without_retry(api: Harness, key: str | None) -> None:
    client = await api.client(key=key)
    with pytest.raises(ApiUnauthorized) as info:
        await client.fetch_page(BATCH, None)
    assert info.value.status == 401
    assert info.value.code == "UNAUTHORIZED"
    assert api.requests() == [401]
    assert api.client_sleeps.delays == []
    assert api.count("401") == 1


async def test_rotated_key_file_is_picked_up(api: Harness, tmp_path: Path) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text("revoked-key-0000000000\n")
    api_key = ApiKey("revoked-key-0000000000", key_file)
    client = await api.client_with(api_key)
    with pytest.raises(ApiUnauthorized):
        await client.fetch_page(BATCH, None)
    key_file.write_text(KEY + "\n")
    api_key.refresh()
    assert len((await client.fetch_page(BATCH, None)).records) == 100
    assert api.requests() == [401, 200]


@pytest.mark.parametrize("variable", ["RIGHTFOOT_API_KEY", "RFP_RIGHTFOOT__API_KEY"])
def test_a_key_from_a_variable_is_not_replaced_by_the_key_file_after_a_401(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """The variable wins over the file (README, config): at start, and after a 401 too."""
    key_file = tmp_path / "api-key"
    key_file.write_text("file-key-0000000000\n")
    env = {variable: " variable-key-000000 ", "RIGHTFOOT_API_KEY_FILE": str(key_file)}
    for name in ("RIGHTFOOT_API_KEY", "RFP_RIGHTFOOT__API_KEY", "RIGHTFOOT_API_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(None, env=env)
    assert settings.rightfoot.api_key is not None
    value = settings.rightfoot.api_key.get_secret_value()
    assert value == "variable-key-000000"
    for api_key in (ApiKey.from_env(value, env), ApiKey.from_env(value)):  # given, os.environ
        key_file.write_text("rotated-file-key-0000\n")
        api_key.refresh()
        assert api_key.get() == "variable-key-000000"


def test_a_key_from_the_file_is_read_again_after_a_401(tmp_path: Path) -> None:
    """An empty variable counts as unset (config.SecretSource): the key came from the file."""
    key_file = tmp_path / "api-key"
    key_file.write_text("file-key-0000000000\n")
    env = {"RIGHTFOOT_API_KEY": " ", "RIGHTFOOT_API_KEY_FILE": str(key_file)}
    settings = load_settings(None, env=env)
    assert settings.rightfoot.api_key is not None
    api_key = ApiKey.from_env(settings.rightfoot.api_key.get_secret_value(), env)
    assert api_key.get() == "file-key-0000000000"
    key_file.write_text("rotated-file-key-0000\n")
    api_key.refresh()
    assert api_key.get() == "rotated-file-key-0000"


@pytest.mark.parametrize(
    "content", [b"\xff\xfenot utf-8", b"two words", b"tab\tinside", b"bell\x07"]
)
def test_a_rotated_key_file_that_no_header_can_carry_keeps_the_key(
    tmp_path: Path, content: bytes
) -> None:
    """Sent as it is, every request would fail in aiohttp (a ValueError, not a 401)."""
    key_file = tmp_path / "api-key"
    key_file.write_bytes(content)
    api_key = ApiKey("good-key", key_file)
    with structlog.testing.capture_logs() as logs:
        api_key.refresh()
    assert api_key.get() == "good-key"
    (warned,) = [e for e in logs if e["event"] == "api_key_file_unreadable"]
    assert content.decode("latin-1") not in str(warned)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"k" * (64 * 1024 + 1), "the secret file is larger than 64 KiB"),
        # /dev/zero would never end; a pipe nobody writes to would stop the event loop
        ("/dev/zero", "not a regular file (a pipe, a device or a directory)"),
        ("fifo", "not a regular file (a pipe, a device or a directory)"),
    ],
)
def test_a_rotated_key_file_over_64_kib_or_not_a_file_keeps_the_key(
    tmp_path: Path, content: bytes | str, error: str
) -> None:
    key_file = tmp_path / "api-key"
    if content == "fifo":
        os.mkfifo(key_file)
    elif isinstance(content, str):
        key_file = Path(content)
    else:
        key_file.write_bytes(content)
    api_key = ApiKey("good-key", key_file)
    with structlog.testing.capture_logs() as logs:
        api_key.refresh()
    assert api_key.get() == "good-key"
    assert [(e["event"], e["log_level"], e["error"]) for e in logs] == [
        ("api_key_file_unreadable", "warning", error)
    ]
    key_file = tmp_path / "api-key-2"
    key_file.write_bytes(b"k" * (64 * 1024))  # the largest accepted
    accepted = ApiKey("good-key", key_file)
    accepted.refresh()
    assert accepted.get() == "k" * (64 * 1024)


def echoing_app() -> web.Application:
    """An API that answers the status named by ``batchId``, its error text spread over
    lines with control characters, and echoing back the API key it was sent."""

    async def answer(request: web.Request) -> web.Response:
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        message = (
            f"batch refused\nfor key {key}\r\n\x1b[31mred\x1b[0m\u2028\u202eevil\ttab "
            + "long " * 100
        )
        error = {"code": f"REFUSED\n{key}", "message": message}
        return web.json_response({"error": error}, status=int(request.query["batchId"]))

    app = web.Application()
    app.router.add_get("/v1/balances", answer)
    return app


@pytest.mark.parametrize("status", [400, 403, 404])
async def test_the_apis_error_text_is_one_short_line_without_the_key(
    api: Harness, status: int
) -> None:
    """It goes into log lines, the failed event's reason, the state topic, GET /v1/batches
    and the export's error line: the vendor echoing the key back must not put it there,
    nor a newline (a forged log line) or a terminal escape."""
    server = TestServer(echoing_app(), host="127.0.0.1")
    await server.start_server()
    try:
        api.url = str(server.make_url("")).rstrip("/")
        client = await api.client()
        exc = await error_of(client.fetch_page(str(status), None))
    finally:
        await server.close()
    assert exc.status == status
    text = str(exc)
    assert KEY not in text and KEY not in repr(exc.args) and KEY not in str(exc.code)
    assert text.isprintable(), text  # no newline, tab, escape, line separator or override
    assert "refused for key [redacted] [31mred [0m evil tab long" in text
    assert exc.code == "REFUSED [redacted]"
    assert len(exc.args[0]) == MAX_ERROR_MESSAGE_CHARS and exc.args[0].endswith("…")
    # The reason of the batch that fails for it (lifecycle event, state, GET /v1/batches).
    polling = Policy(PollingConfig(not_found_grace_s=0), 8.0, random.Random(0))
    step = polling.failed(BatchState(batch_id=str(status), partition=0), exc, time.time())
    assert step.lifecycle == "failed" and step.state.reason is not None
    assert KEY not in step.state.reason and step.state.reason.isprintable()


def test_a_key_the_api_echoes_is_redacted_before_the_text_is_cut() -> None:
    """Cut first, a key across the cut would leave its first part in the error."""
    key = "k" * 40
    body = json.dumps({"error": {"message": "x" * 180 + key}}).encode()
    exc = error_from_response(403, body, None, [key])
    assert "k" not in str(exc) and str(exc).endswith("[redacted]")


async def test_404_raises_not_found(api: Harness) -> None:
    client = await api.client()
    with pytest.raises(ApiNotFound) as info:
        await client.fetch_page("no-such-batch", None)
    assert info.value.status == 404
    assert info.value.code == "NOT_FOUND"
    assert api.requests() == [404]
    assert api.count("404") == 1


async def test_400_on_an_invalidated_token(api: Harness) -> None:
    client = await api.client()
    first = await client.fetch_page(BATCH, None)
    api.sim.invalidate_page_tokens()
    with pytest.raises(ApiBadRequest) as info:
        await client.fetch_page(BATCH, first.next_page_token)
    assert info.value.status == 400
    assert info.value.code == "INVALID_PAGE_TOKEN"
    assert api.requests() == [200, 400]
    # Starting over from the first page works.
    again = await client.fetch_page(BATCH, None)
    assert [r.event_id for r in again.records] == [r.event_id for r in first.records]


async def test_a_hang_beyond_the_timeout_is_retried(api: Harness) -> None:
    api.sim.faults.hang_next = 1
    api.sim.faults.hang_s = 5
    client = await api.client(timeout_s=0.3)
    started = time.monotonic()
    page = await client.fetch_page(BATCH, None)
    elapsed = time.monotonic() - started
    assert len(page.records) == 100
    assert elapsed < 3.0
    assert api.count("timeout") == 1
    assert api.count("200") == 1
    assert len(api.client_sleeps.delays) == 1


async def test_timeouts_exhausting_attempts_raise_transport_error(api: Harness) -> None:
    api.sim.faults.hang_next = 2
    api.sim.faults.hang_s = 5
    client = await api.client(timeout_s=0.2, max_attempts=2)
    with pytest.raises(ApiTransportError) as info:
        await client.fetch_page(BATCH, None)
    assert info.value.code == "timeout"
    assert api.count("timeout") == 2


async def test_connection_refused_is_retried_then_raises(api: Harness) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api.url = f"http://127.0.0.1:{port}"
    client = await api.client(max_attempts=3)
    with pytest.raises(ApiTransportError) as info:
        await client.fetch_page(BATCH, None)
    assert info.value.code == "connection_error"
    assert api.count("connection_error") == 3
    assert len(api.client_sleeps.delays) == 2


async def test_malformed_bodies_raise(api: Harness) -> None:
    api.sim.faults.malformed_next = 4  # one of each kind the simulator serves
    client = await api.client()
    for _ in range(4):
        with pytest.raises(ApiMalformedResponse):
            await client.fetch_page(BATCH, None)
    assert api.requests() == [200, 200, 200, 200]
    assert api.count("200") == 4
    invalid = api.metrics.registry.get_sample_value(
        "rightfoot_poller_invalid_input_total", {"source": "api", "reason": "malformed_page"}
    )
    assert invalid == 4
    assert len((await client.fetch_page(BATCH, None)).records) == 100


async def test_request_duration_is_observed(api: Harness) -> None:
    client = await api.client()
    await client.fetch_page(BATCH, None)
    await client.fetch_page(BATCH, None)
    count = api.metrics.registry.get_sample_value(
        "rightfoot_poller_api_request_duration_seconds_count", {"endpoint": "balances"}
    )
    assert count == 2


async def error_of(call: Awaitable[Any]) -> ApiError:
    with pytest.raises(ApiError) as info:
        await call
    return info.value


async def test_the_api_key_never_appears_in_errors(api: Harness) -> None:
    client = await api.client()
    faults = api.sim.faults
    errors = [await error_of(client.fetch_page("missing", None))]
    faults.error_5xx_next = 10
    errors.append(await error_of(client.fetch_page(BATCH, None)))
    faults.error_5xx_next, faults.malformed_next = 0, 1
    errors.append(await error_of(client.fetch_page(BATCH, None)))
    faults.malformed_next = 0
    errors.append(await error_of(client.fetch_page(BATCH, "forged-token")))
    faults.rate_limit_next, faults.retry_after_s = 1, 99
    errors.append(await error_of(client.fetch_page(BATCH, None)))
    api.sim.set_api_keys(["another-key-000000"])
    errors.append(await error_of(client.fetch_page(BATCH, None)))
    assert [type(e) for e in errors] == [
        ApiNotFound,
        ApiServerError,
        ApiMalformedResponse,
        ApiBadRequest,
        ApiRateLimited,
        ApiUnauthorized,
    ]
    for exc in errors:
        text = " ".join(
            [str(exc), repr(exc), repr(exc.args), repr(exc.__cause__), repr(exc.__context__)]
        )
        assert KEY not in text


async def test_after_a_slow_spell_the_api_still_sees_requests_spaced_by_the_rate(
    api: Harness,
) -> None:
    """Requests waiting for one of the concurrency slots do not use the rate meanwhile.

    Both slots are held by requests the API answers only after 0.6 s, while ten more
    wait. Were their allowance taken during the wait, all ten would reach the API within
    a few milliseconds once it answers; in their turn they reach it 1/rate apart.
    """
    api.sim.faults.hang_next = 2
    api.sim.faults.hang_s = 0.6
    client = RightfootClient(
        RightfootConfig(base_url=api.url, page_limit=10, max_concurrent_requests=2),
        instance_id=INSTANCE,
        metrics=api.metrics,
        api_key=ApiKey(KEY),
        limiter=RateLimiter(20.0),  # the real clock: a token every 50 ms, one banked
    )
    await client.start()
    api.clients.append(client)
    await asyncio.gather(*(client.fetch_page(BATCH, None) for _ in range(12)))
    seen = sorted(e.started for e in api.sim.request_log)
    assert len(seen) == 12
    busiest = max(sum(1 for t in seen if start <= t < start + 0.1) for start in seen)
    assert busiest <= 3, f"{busiest} requests reached the API within 100 ms at a 20/s ceiling"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_is_not_followed(api: Harness, status: int) -> None:
    """A vendor (or a proxy before it) answering a redirect, here to plain HTTP: the request
    fails, naming where it led without its credentials or query, and the key never goes
    there. Followed, the page would come from a place rightfoot.base_url does not name."""
    hops: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        hops.append(request.path)
        target = f"http://user:secret@{request.host}/elsewhere?batchId={BATCH}&sig=x#f"
        return web.Response(status=status, headers={"Location": target})

    async def elsewhere(request: web.Request) -> web.Response:
        hops.append(request.path)
        return web.json_response({"batch_id": BATCH, "balances": [], "has_more": False})

    app = web.Application()
    app.router.add_get("/v1/balances", redirect)
    app.router.add_get("/elsewhere", elsewhere)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        api.url = str(server.make_url("")).rstrip("/")
        client = await api.client(max_attempts=1)
        with pytest.raises(ApiError) as info:
            await client.fetch_page(BATCH, None)
        where = f"{server.host}:{server.port}/elsewhere;"
    finally:
        await server.close()
    assert info.value.status == status and hops == ["/v1/balances"]
    message = str(info.value)
    assert "redirects are not followed (check rightfoot.base_url)" in message
    assert where in message
    assert "secret" not in message and "sig=" not in message
