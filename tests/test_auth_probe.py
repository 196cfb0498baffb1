"""The key probe of a replica whose API key was rejected (``PollerService._auth_probe``),
against the simulator: no broker, the service built but not started."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import structlog
from conftest import API_KEY, SimServer, wait_for

from service.app import AUTH_PROBE_BATCH_ID, PollerService
from service.config import load_settings
from service.errors import ApiUnauthorized


@pytest.fixture
async def service(sim_server: SimServer) -> AsyncIterator[PollerService]:
    env = {
        "RIGHTFOOT_API_KEY": API_KEY,
        "RFP_RIGHTFOOT__BASE_URL": sim_server.url,
        "RFP_RIGHTFOOT__UNAUTHORIZED_RETRY_S": "0.2",
    }
    built = PollerService(load_settings(None, env=env))
    await built.client.start()
    try:
        yield built
    finally:
        await built.client.close()


def unauthorized(service: PollerService) -> float | None:
    return service.metrics.registry.get_sample_value("rightfoot_poller_api_unauthorized")


async def test_a_replica_with_no_batch_left_finds_its_key_accepted_again(
    service: PollerService, sim_server: SimServer
) -> None:
    """Rejected once, then its batches stopped or moved to another replica: with no batch
    of its own to ask for, the probe asks for one that cannot exist, and a 404 says the
    key is good. Without it the replica stayed not ready, its gauge at 1, until a new
    batch landed on its partitions."""
    sim = sim_server.sim
    good = sim.api_keys
    sim.set_api_keys(["a-key-the-service-does-not-have"])
    service.tracker._set_unauthorized(ApiUnauthorized("rejected", status=401), "gone")
    assert service.tracker.any_tracked_batch() is None
    probe = asyncio.create_task(service._auth_probe())
    try:
        with structlog.testing.capture_logs() as logs:
            await wait_for(
                lambda: any(e["event"] == "api_key_still_rejected" for e in logs),
                5,
                "a probe with the wrong key",
            )
        assert service.tracker.unauthorized and unauthorized(service) == 1
        assert not service.readiness()[1]["checks"]["api_key_accepted"]
        sim.set_api_keys(good)
        await wait_for(lambda: not service.tracker.unauthorized, 5, "the key accepted again")
        assert unauthorized(service) == 0
        assert service.readiness()[1]["checks"]["api_key_accepted"]
        assert {r.batch_id for r in sim.request_log} == {AUTH_PROBE_BATCH_ID}
    finally:
        probe.cancel()
        await asyncio.gather(probe, return_exceptions=True)
