"""Liveness of a running service: one of its loops ending before the service stops."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import structlog
from conftest import ServiceFactory, wait_for

from service.tracker import Tracker

pytestmark = pytest.mark.kafka


async def test_a_loop_that_ends_fails_healthz_with_one_error(
    start_service: ServiceFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault of this service ends one of its loops (here the one that forgets finished
    batches): the rest runs on and looked well, with that part dead for good. It is one
    ERROR, and /healthz fails so that the pod is restarted."""
    forget_loop = Tracker.forget_loop
    fault = asyncio.Event()

    async def failing(tracker: Tracker) -> None:
        await fault.wait()
        raise RuntimeError("a fault in the forget loop")

    monkeypatch.setattr(Tracker, "forget_loop", failing)
    with structlog.testing.capture_logs() as logs:
        service = await start_service()
        assert service.liveness()
        fault.set()
        await wait_for(lambda: not service.liveness(), 10, "liveness to fail")
    monkeypatch.setattr(Tracker, "forget_loop", forget_loop)
    ended = [e for e in logs if e["event"] == "task_ended"]
    assert [(e["log_level"], e["task"]) for e in ended] == [("error", "forget-finished")]
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{service.http_port}/healthz") as resp,
    ):
        assert resp.status == 503
