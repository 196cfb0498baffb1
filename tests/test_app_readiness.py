"""/readyz's kafka check, decided without a broker: a service built but not started, the
brokers' state in a BrokerLog of the test's own."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import free_port

from service.app import PollerService, any_broker_reachable
from service.config import load_settings
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
