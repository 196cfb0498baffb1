"""/readyz's kafka and api_key_accepted checks, decided without a broker or an API: a
service built but not started, the brokers' state in a BrokerLog of the test's own, the
API's answers from a fake ``fetch_page``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog
from conftest import free_port, wait_for

from service.app import PollerService, any_broker_reachable, key_probe_outcome
from service.config import load_settings
from service.errors import (
    ApiBadRequest,
    ApiError,
    ApiForbidden,
    ApiMalformedResponse,
    ApiNotFound,
    ApiRateLimited,
    ApiServerError,
    ApiTransportError,
    ApiUnauthorized,
    PageTokenRejected,
)
from service.kafka_logs import QUIET_S, BrokerLog


@pytest.fixture
async def service() -> AsyncIterator[PollerService]:
    env = {
        "RFP_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "RFP_RIGHTFOOT__UNAUTHORIZED_RETRY_S": "0.05",
        "RFP_INSTANCE_ID": "readiness",
    }
    built = PollerService(load_settings(None, env=env))
    yield built
    await built.client.close()


# --- kafka: connected, and some broker answers ----------------------------------------


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


class Cluster:
    """Three brokers in the watched client's metadata; none connected."""

    class Broker:
        def __init__(self, node: int) -> None:
            self.nodeId = node

    def brokers(self) -> list[Broker]:
        return [self.Broker(n) for n in (1, 2, 3)]


class Client:
    _conns: dict[Any, Any] = {}
    cluster = Cluster()


def lost(brokers: BrokerLog, *nodes: int) -> None:
    """aiokafka's line for a broker it cannot connect to, through the filter."""
    for node in nodes:
        record = logging.LogRecord(
            "aiokafka.client",
            logging.ERROR,
            __file__,
            0,
            "Unable connect to node with id %s: %s",
            (node, "Connect call failed"),
            None,
        )
        assert not brokers.filter(record)


def kafka_check(service: PollerService) -> tuple[bool, dict[str, Any]]:
    _, detail = service.readiness()
    return detail["checks"]["kafka"], detail


@pytest.fixture
def brokers(service: PollerService) -> tuple[BrokerLog, Clock]:
    clock = Clock()
    log = BrokerLog(clock)
    log.watch(watched := Client())
    log._watched_in_test = watched  # type: ignore[attr-defined]  # kept alive (a WeakSet)
    service.brokers = log
    service._kafka_ok = True  # connected once, as _connect_kafka leaves it
    return log, clock


def test_no_broker_reachable_makes_kafka_not_ready(
    service: PollerService, brokers: tuple[BrokerLog, Clock]
) -> None:
    """/readyz means "connected to Kafka": it stayed green for good once connected."""
    log, clock = brokers
    service._check_brokers()
    assert kafka_check(service)[0]
    lost(log, 1, 2, 3)
    service._check_brokers()
    ready, detail = kafka_check(service)
    assert not ready and not service.readiness()[0]
    assert detail["kafka_error"]["reason"] == "unreachable"
    assert "no Kafka broker is reachable" in detail["kafka_error"]["error"]
    # The brokers answer again (nothing failed for a while): ready again.
    clock.now += QUIET_S
    service._check_brokers()
    ready, detail = kafka_check(service)
    assert ready and "kafka_error" not in detail


def test_one_broker_of_three_lost_leaves_kafka_ready(
    service: PollerService, brokers: tuple[BrokerLog, Clock]
) -> None:
    log, _ = brokers
    lost(log, 2)
    service._check_brokers()
    assert kafka_check(service)[0]
    lost(log, 3)
    service._check_brokers()
    assert kafka_check(service)[0]  # one of three answers
    assert (
        service.metrics.registry.get_sample_value(
            "rightfoot_poller_kafka_broker_reachable", {"broker": "2"}
        )
        == 0
    )


@pytest.mark.parametrize(
    ("state", "reachable"),
    [
        ({}, True),
        ({"1": True}, True),
        ({"1": False}, False),
        ({"1": False, "2": False, "3": False}, False),
        ({"1": False, "2": True, "3": False}, True),
        ({"1": True, "2": False, "3": True}, True),
    ],
)
def test_the_rule(state: dict[str, bool], reachable: bool) -> None:
    assert any_broker_reachable(state) is reachable


# --- api_key_accepted: only an answer from past the API's authentication ---------------


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (None, "accepted"),  # a page
        (ApiNotFound("no such batch", status=404), "accepted"),
        (ApiBadRequest("bad request", status=400), "accepted"),
        (ApiMalformedResponse("not the documented shape", status=200), "accepted"),
        (ApiUnauthorized("rejected", status=401), "rejected"),
        (ApiForbidden("not allowed", status=403), "rejected"),
        (ApiServerError("unavailable", status=503), "inconclusive"),
        (ApiTransportError("timed out", code="timeout"), "inconclusive"),
        (ApiTransportError("connection reset"), "inconclusive"),
        (ApiRateLimited("slow down", status=429, retry_after=5.0), "inconclusive"),
        (PageTokenRejected("token refused"), "inconclusive"),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, str) else v,
)
def test_what_a_probe_answer_says_about_the_key(error: ApiError | None, outcome: str) -> None:
    assert key_probe_outcome(error) == outcome


async def test_an_answer_that_says_nothing_about_the_key_keeps_it_rejected(
    service: PollerService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 5xx, a timeout or a 429 turned /readyz green without the API having accepted
    anything, and it flipped back at the next poll."""
    answers: list[ApiError | None] = [
        ApiServerError("unavailable", status=503),
        ApiTransportError("timed out", code="timeout"),
        ApiRateLimited("slow down", status=429),
        ApiForbidden("not allowed", status=403),
        ApiNotFound("no such batch", status=404),
    ]
    asked: list[str] = []
    seen: list[bool] = []  # api_key_accepted when each probe is sent: after the answers before

    async def fetch_page(batch_id: str, token: str | None, limit: int | None = None) -> Any:
        asked.append(batch_id)
        seen.append(service.readiness()[1]["checks"]["api_key_accepted"])
        answer = answers[len(asked) - 1] if len(asked) <= len(answers) else None
        if answer is not None:
            raise answer
        return None

    monkeypatch.setattr(service.client, "fetch_page", fetch_page)
    service.tracker._set_unauthorized(ApiUnauthorized("rejected", status=401), "gone")
    with structlog.testing.capture_logs() as logs:
        probe = asyncio.create_task(service._auth_probe())
        try:
            await wait_for(lambda: not service.tracker.unauthorized, 5, "the key accepted")
        finally:
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
    assert len(asked) == len(answers)  # accepted at the 404, not before
    assert seen == [False] * len(answers)
    probes = [(e["event"], e["log_level"]) for e in logs if e["event"].startswith("api_key")]
    assert probes == [
        ("api_key_probe_inconclusive", "warning"),
        ("api_key_probe_inconclusive", "warning"),
        ("api_key_probe_inconclusive", "warning"),
        ("api_key_still_rejected", "warning"),
        ("api_key_accepted", "info"),
    ]
    assert service.readiness()[1]["checks"]["api_key_accepted"]
