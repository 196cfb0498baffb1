"""What a replica says while it cannot start yet, or cannot start at all: no broker and no
schema registry are needed (the addresses refuse connections)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from aiokafka.errors import InvalidReplicationFactorError, KafkaConnectionError
from conftest import free_port, run_cli, wait_for

from service import app as app_module
from service.app import PollerService, kafka_problem_is_transient
from service.config import load_settings
from service.errors import KafkaConnectionProblem
from service.kafka_clients import classify_connection_error
from service.logs import Throttle
from service.wire import frames_when_available

# --- the admin HTTP server cannot listen ------------------------------------------------


@pytest.fixture
def port_in_use() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_port_in_use_is_one_line_and_exit_1(port_in_use: int) -> None:
    """It was a traceback out of aiohttp's bind."""
    env = {
        "RFP_HTTP__HOST": "127.0.0.1",
        "RFP_HTTP__PORT": str(port_in_use),
        "RFP_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "RIGHTFOOT_API_KEY": "startup-checks-key",
    }
    done = run_cli("run", env=env, timeout=30)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if not line.startswith("{")]
    assert errors == [
        f"rightfoot-poller: http.host / http.port: cannot listen on 127.0.0.1:{port_in_use}: "
        f"error while attempting to bind on address ('127.0.0.1', {port_in_use}): "
        "address already in use"
    ]
    assert "Traceback" not in done.stderr + done.stdout


def test_a_host_that_is_no_address_is_one_line_and_exit_1() -> None:
    env = {
        "RFP_HTTP__HOST": "256.0.0.1",
        "RFP_HTTP__PORT": "0",
        "RFP_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "RIGHTFOOT_API_KEY": "startup-checks-key",
    }
    done = run_cli("run", env=env, timeout=30)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if not line.startswith("{")]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("rightfoot-poller: http.host / http.port: cannot listen on ")
    assert "256.0.0.1:0: " in errors[0]
    assert "Traceback" not in done.stderr + done.stdout


# --- Kafka not reachable yet ------------------------------------------------------------


def unreachable_service(**env: str) -> PollerService:
    return PollerService(
        load_settings(
            None,
            env={
                "RFP_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
                "RFP_INSTANCE_ID": "startup-checks",
                **env,
            },
        )
    )


def attempts(service: PollerService, reason: str) -> float:
    value = service.metrics.registry.get_sample_value(
        "rightfoot_poller_kafka_connection_errors_total", {"reason": reason}
    )
    return value or 0.0


async def connecting(
    service: PollerService, reason: str, count: int
) -> list[structlog.typing.EventDict]:
    """The lines of ``service`` trying to connect, until ``count`` attempts have failed."""
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(service._connect_kafka())
        try:
            await wait_for(lambda: attempts(service, reason) >= count, 20, f"{count} attempts")
        finally:
            service._stopping.set()
            await task
    return [e for e in logs if e["event"] == "kafka_unavailable"]


async def test_a_broker_not_reachable_yet_is_a_warning_not_an_error_per_attempt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No broker listens: expected while a broker starts, and it passes. It was one ERROR
    line per attempt, forever; it is one WARNING, then at most one a minute."""
    service = unreachable_service()
    caplog.set_level(logging.DEBUG)
    lines = await connecting(service, "unreachable", 3)
    assert [e["log_level"] for e in lines] == ["warning", "debug", "debug"][: len(lines)]
    assert len(lines) >= 3
    assert lines[0]["reason"] == "unreachable" and lines[0]["attempts_held"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not service.readiness()[1]["checks"]["kafka"]
    assert service.readiness()[1]["kafka_error"]["reason"] == "unreachable"


async def test_while_no_broker_answers_a_warning_a_minute_says_how_many_attempts_it_stood_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [0.0]
    service = unreachable_service()
    service._kafka_waits = Throttle(every_s=60.0, clock=lambda: now[0])
    real_wait_for = asyncio.wait_for

    async def sleep_less(fut: Any, timeout: float | None) -> Any:
        now[0] += timeout or 0.0  # the backoff, 1, 2, 4 ... s, passes on the clock at once
        return await real_wait_for(fut, 0.0)

    # The service's backoff is asyncio.wait_for(stopping.wait(), delay).
    monkeypatch.setattr(asyncio, "wait_for", sleep_less)
    lines = await connecting(service, "unreachable", 8)
    # Attempts at 0, 1, 3, 7, 15, 31, 63, 127 s: the first, then the one a minute after.
    said = [(e["log_level"], e.get("attempts_held")) for e in lines if e["log_level"] != "debug"]
    assert said[:2] == [("warning", 0), ("warning", 5)]
    assert all(level == "warning" for level, _ in said)


async def test_what_no_retry_fixes_stays_an_error_per_attempt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def refused(*_: object, **__: object) -> None:
        raise KafkaConnectionProblem("tls", "TLS to the Kafka broker failed: certificate")

    monkeypatch.setattr(app_module, "probe_brokers", refused)
    service = unreachable_service()
    lines = await connecting(service, "tls", 2)
    assert [e["log_level"] for e in lines][:2] == ["error", "error"]


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (KafkaConnectionProblem("unreachable", "cannot connect"), True),
        (KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 1)]"), True),
        (ConnectionRefusedError(111, "Connect call failed"), True),
        (KafkaConnectionProblem("authentication", "Kafka authentication failed"), False),
        (KafkaConnectionProblem("tls", "TLS to the Kafka broker failed"), False),
        (KafkaConnectionProblem("authorization", "not allowed"), False),
        # Classified "unreachable" (no better reason), but a broker's refusal: not transient.
        (InvalidReplicationFactorError(), False),
    ],
    ids=repr,
)
def test_which_kafka_problems_fix_themselves(exc: Exception, transient: bool) -> None:
    assert kafka_problem_is_transient(exc, classify_connection_error(exc)) is transient


# --- the schema registry not reachable yet --------------------------------------------


async def test_a_registry_not_reachable_yet_is_one_warning_not_an_error_per_attempt() -> None:
    settings = load_settings(
        None,
        env={
            "RFP_KAFKA__VALUE_FORMAT": "json_sr",
            "RFP_SCHEMA_REGISTRY__URL": f"http://127.0.0.1:{free_port()}",
            "RFP_SCHEMA_REGISTRY__BACKOFF_BASE_S": "0.01",
            "RFP_SCHEMA_REGISTRY__BACKOFF_MAX_S": "0.02",
        },
    )
    problems: list[dict[str, str] | None] = []
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(
            frames_when_available(settings, stopping=asyncio.Event(), on_problem=problems.append)
        )
        try:
            await wait_for(lambda: len(problems) >= 5, 20, "5 attempts")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    lines = [e for e in logs if e["event"] == "schema_registry_unavailable"]
    assert len(lines) >= 5
    assert [e["log_level"] for e in lines[:5]] == ["warning", "debug", "debug", "debug", "debug"]
    assert problems[0] is not None and problems[0]["reason"] == "unreachable"
