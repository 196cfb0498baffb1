"""aiokafka's lines during a broker loss: a few readable WARNINGs, real problems still ERROR."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from service import kafka_logs
from service.kafka_logs import QUIET_S, SUMMARY_EVERY_S, BrokerLog
from service.logs import configure_logging


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# The log stream, and the clock of the broker-log summaries.
Output = tuple[io.StringIO, Clock]


@pytest.fixture
def output(monkeypatch: pytest.MonkeyPatch) -> Iterator[Output]:
    clock = Clock()
    monkeypatch.setattr(kafka_logs, "BROKERS", BrokerLog(clock))
    stream = io.StringIO()
    configure_logging(level="INFO", fmt="json", stream=stream)
    yield stream, clock
    configure_logging(level="INFO", fmt="json")


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def lost(node: int, n: int = 1) -> None:
    client = logging.getLogger("aiokafka.client")
    fetcher = logging.getLogger("aiokafka.consumer.fetcher")
    for _ in range(n):
        client.error("Unable connect to node with id %s: %s", node, "Connect call failed")
        fetcher.error("Failed fetch messages from %s: %s", node, "NodeNotReadyError")


def test_a_lost_broker_is_one_warning_not_thousands_of_errors(output: Output) -> None:
    stream, clock = output
    lost(2, 1000)
    clock.now += 10
    lost(2, 1000)
    out = lines(stream)
    assert [(d["level"], d["event"], d["broker"]) for d in out] == [
        ("warning", "kafka_broker_unreachable", "2")
    ]
    assert "Connect call failed" in out[0]["error"]


def test_a_broker_that_stays_down_gets_one_summary_a_minute(output: Output) -> None:
    stream, clock = output
    lost(3)
    for _ in range(3):
        clock.now += SUMMARY_EVERY_S / 2
        lost(3, 50)
    summaries = [d for d in lines(stream) if d["event"] == "kafka_broker_still_unreachable"]
    assert len(summaries) == 1
    assert summaries[0]["lines_held"] == 1 + 100 + 1  # what it stood for until then
    assert summaries[0]["down_for_s"] == SUMMARY_EVERY_S


def test_each_broker_is_reported_on_its_own_and_recovery_is_said_once(output: Output) -> None:
    stream, clock = output

    class Conn:
        def connected(self) -> bool:
            return True

    class Client:
        _conns = {(1, 0): Conn()}
        cluster = None

    watched = Client()
    kafka_logs.BROKERS.watch(watched)
    lost(1, 5)
    lost(2, 5)
    clock.now += 1
    state = kafka_logs.BROKERS.refresh()  # the client is connected to 1 again, not to 2
    assert state == {"1": True, "2": False}
    clock.now += QUIET_S  # nothing about 2 failed for a while: back too
    assert kafka_logs.BROKERS.refresh() == {"1": True, "2": True}
    lost(1)  # lost again: said again
    events = [(d["event"], d.get("broker")) for d in lines(stream)]
    assert events == [
        ("kafka_broker_unreachable", "1"),
        ("kafka_broker_unreachable", "2"),
        ("kafka_broker_reachable", "1"),
        ("kafka_broker_reachable", "2"),
        ("kafka_broker_unreachable", "1"),
    ]


def test_real_problems_stay_errors(output: Output) -> None:
    stream, _clock = output
    sender = logging.getLogger("aiokafka.producer.sender")
    for _ in range(3):
        sender.error("Could not end transaction due to unexpected error: %s", "InvalidTxnState")
    logging.getLogger("aiokafka.cluster").error("Topic %s not found in cluster metadata", "t")
    out = lines(stream)
    assert [d["level"] for d in out] == ["error"] * 4
    assert "InvalidTxnState" in out[0]["event"]


def test_other_aiokafka_warnings_pass_once_a_minute_with_a_count(output: Output) -> None:
    stream, clock = output
    coordinator = logging.getLogger("aiokafka.consumer.group_coordinator")
    for _ in range(40):
        coordinator.warning("Heartbeat failed for group %s because it is rebalancing", "g")
    clock.now += SUMMARY_EVERY_S
    coordinator.warning("Heartbeat failed for group %s because it is rebalancing", "g")
    out = lines(stream)
    assert [d["event"] for d in out] == [
        "Heartbeat failed for group g because it is rebalancing",
        "kafka_client_warnings_held",
        "Heartbeat failed for group g because it is rebalancing",
    ]
    assert out[1]["lines_held"] == 39


def test_the_service_own_lines_are_untouched(output: Output) -> None:
    stream, _clock = output
    for _ in range(3):
        logging.getLogger("service.app").error("unable connect to node with id %s: %s", 1, "x")
    assert len(lines(stream)) == 3
