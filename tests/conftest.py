"""Shared fixtures: the real Kafka broker, the API simulator, and the service under test.

The broker is the one ``scripts/kafka.sh`` runs (port ``KAFKA_TEST_PORT``,
default 19092). A test session that started it stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from rightfoot_simulator import Simulator, build_app
from service.app import PollerService
from service.config import Settings, load_settings
from service.records import balance_event_id

ROOT = Path(__file__).resolve().parent.parent
KAFKA_PORT = int(os.environ.get("KAFKA_TEST_PORT", "19092"))
BOOTSTRAP = f"127.0.0.1:{KAFKA_PORT}"
API_KEY = "sim-key-for-tests-0123456789"
ADMIN_TOKEN = "admin-token-for-tests-9876543210"


def kafka_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "KAFKA_PORT": str(KAFKA_PORT), **extra}


def kafka_script(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "scripts" / "kafka.sh"), *args],
        env=kafka_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The benchmark smoke tests last: they need Benthos, whose build scripts/test-suite.sh
    starts at the same time as the tests (minutes on a fresh machine)."""
    items.sort(key=lambda item: item.path.name == "test_bench_smoke.py")


@pytest.fixture(scope="session")
def kafka() -> Iterator[str]:
    """A running, ready broker; started (and later stopped) here if none was running."""
    started = kafka_script("status").returncode != 0
    if started:
        result = kafka_script("start")
        if result.returncode != 0:
            pytest.fail(f"cannot start Kafka:\n{result.stdout}\n{result.stderr}")
    yield BOOTSTRAP
    if started:
        kafka_script("stop")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Topics:
    prefix: str
    partitions: int = 4

    @property
    def balances(self) -> str:
        return f"{self.prefix}.balances"

    @property
    def events(self) -> str:
        return f"{self.prefix}.batch-events"

    @property
    def requests(self) -> str:
        return f"{self.prefix}.batch-requests"

    @property
    def state(self) -> str:
        return f"{self.prefix}.batch-state"

    @property
    def dlq(self) -> str:
        return f"{self.balances}.dlq"

    @property
    def group(self) -> str:
        return f"{self.prefix}-group"

    def env(self, bootstrap: str) -> dict[str, str]:
        return {
            "RFP_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "RFP_KAFKA__BALANCES_TOPIC": self.balances,
            "RFP_KAFKA__BATCH_EVENTS_TOPIC": self.events,
            "RFP_KAFKA__REQUESTS_TOPIC": self.requests,
            "RFP_KAFKA__STATE_TOPIC": self.state,
            "RFP_KAFKA__GROUP_ID": self.group,
            "RFP_KAFKA__PARTITIONS": str(self.partitions),
        }


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """os.environ without any variable the configuration reads."""
    for name in list(os.environ):
        if name.startswith(("RFP_", "RIGHTFOOT_")) or name == "POD_NAME":
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def topics() -> Topics:
    return Topics(prefix=f"t{uuid.uuid4().hex[:10]}")


@dataclass
class SimServer:
    sim: Simulator
    server: TestServer

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


def sim_event_id(batch_id: str, rec: Any) -> str:
    """The event id the service gives a simulator record (``records.balance_event_id``)."""
    balance = None if rec.balance is None else format(rec.balance, "f")
    return balance_event_id(
        batch_id, rec.authorizer_unique_id, rec.timestamp, balance, rec.balance_status_code
    )


@pytest.fixture
async def sim_server() -> AsyncIterator[SimServer]:
    sim = Simulator(api_keys=[API_KEY], seed=7)
    server = TestServer(build_app(sim), host="127.0.0.1", port=free_port())
    await server.start_server()
    try:
        yield SimServer(sim, server)
    finally:
        await server.close()


def service_env(topics: Topics, bootstrap: str, api_url: str, **overrides: str) -> dict[str, str]:
    """The environment of a test service: fast polling windows, by configuration only."""
    env = {
        "RIGHTFOOT_API_KEY": API_KEY,
        "RFP_HTTP__ADMIN_TOKEN": ADMIN_TOKEN,
        "RFP_HTTP__HOST": "127.0.0.1",
        "RFP_HTTP__PORT": "0",
        "RFP_RIGHTFOOT__BASE_URL": api_url,
        "RFP_RIGHTFOOT__BACKOFF_BASE_S": "0.05",
        "RFP_RIGHTFOOT__BACKOFF_MAX_S": "1",
        "RFP_RIGHTFOOT__TIMEOUT_S": "2",
        "RFP_RIGHTFOOT__MAX_REQUESTS_PER_S": "500",
        "RFP_RIGHTFOOT__UNAUTHORIZED_RETRY_S": "0.5",
        "RFP_POLLING__INTERVAL_MIN_S": "0.2",
        "RFP_POLLING__INTERVAL_MAX_S": "0.4",
        "RFP_POLLING__NOT_FOUND_GRACE_S": "1.5",
        "RFP_POLLING__COMPLETE_AFTER_IDLE_S": "2",
        "RFP_SHUTDOWN_GRACE_S": "10",
        "RFP_KAFKA__SESSION_TIMEOUT_MS": "6000",
        **topics.env(bootstrap),
    }
    env.update(overrides)
    return env


class ServiceFactory(Protocol):
    """The ``start_service`` fixture: starts a service with these settings (``RFP_...``)."""

    def __call__(self, **overrides: str) -> Awaitable[PollerService]: ...


@pytest.fixture
async def start_service(
    kafka: str, topics: Topics, sim_server: SimServer
) -> AsyncIterator[ServiceFactory]:
    """Start in-process services against the simulator; all are stopped at teardown."""
    started: list[PollerService] = []

    async def start(**overrides: str) -> PollerService:
        env = service_env(topics, kafka, sim_server.url, **overrides)
        env.setdefault("RFP_INSTANCE_ID", f"test-{len(started)}")
        settings: Settings = load_settings(None, env=env)
        service = PollerService(settings)
        started.append(service)
        await service.start()
        await wait_for(lambda: service.readiness()[0], 30, "service ready")
        return service

    yield start
    for service in reversed(started):
        await service.stop()


async def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class TopicReader:
    """Reads topics from the beginning with read_committed, as a consumer team would."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.consumers: list[AIOKafkaConsumer] = []

    async def read_all(
        self,
        topic: str,
        *,
        idle_s: float = 1.5,
        timeout: float = 30,
        isolation_level: str = "read_committed",
    ) -> list[Any]:
        """Every committed message of a topic, once the topic is quiet for idle_s.

        ``isolation_level="read_uncommitted"``: every message, those of aborted
        transactions included.
        """
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=self.bootstrap,
            isolation_level=isolation_level,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            out: list[Any] = []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            quiet_since = loop.time()
            while loop.time() < deadline and loop.time() - quiet_since < idle_s:
                chunk = await consumer.getmany(timeout_ms=200)
                got = [m for msgs in chunk.values() for m in msgs]
                if got:
                    out.extend(got)
                    quiet_since = loop.time()
            return out
        finally:
            await consumer.stop()

    async def close(self) -> None:
        for c in self.consumers:
            with contextlib.suppress(Exception):
                await c.stop()


@pytest.fixture
async def reader(kafka: str) -> AsyncIterator[TopicReader]:
    r = TopicReader(kafka)
    yield r
    await r.close()


async def produce(
    bootstrap: str,
    topic: str,
    key: bytes | None,
    value: bytes | None,
    partition: int | None = None,
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key, partition=partition)
    finally:
        await producer.stop()


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )


class ServiceProcess:
    """The service as a separate process (`python -m service run`), for kills and signals."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = free_port()

    def start(self) -> None:
        env = {**os.environ, **self.env, "RFP_HTTP__PORT": str(self.port)}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "run"], env=env, stdout=log, stderr=log, cwd=ROOT
        )
        log.close()

    async def ready(self, timeout: float = 60) -> None:
        async def probe() -> bool:
            try:
                async with (
                    aiohttp.ClientSession() as http,
                    http.get(f"http://127.0.0.1:{self.port}/readyz") as resp,
                ):
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"service exited with {self.proc.returncode}: {self.tail()}")
            if await probe():
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"service not ready after {timeout}s: {self.tail()}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.proc.poll() is None:
            if loop.time() > deadline:
                raise AssertionError(f"service still running after {timeout}s")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


# The ``service_processes`` fixture: a service process (not started) with this env and name.
ServiceProcesses = Callable[[dict[str, str], str], ServiceProcess]


@pytest.fixture
def service_processes(tmp_path: Path) -> Iterator[ServiceProcesses]:
    made: list[ServiceProcess] = []

    def make(env: dict[str, str], name: str) -> ServiceProcess:
        proc = ServiceProcess(env, tmp_path / f"{name}.log")
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.kill()


# --------------------------------------------------------------------------- schema registry

REGISTRY_PORT = int(os.environ.get("REGISTRY_TEST_PORT", "18481"))
REGISTRY_URL = f"http://127.0.0.1:{REGISTRY_PORT}/apis/ccompat/v7"


def registry_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "scripts" / "registry.sh"), *args],
        env={**os.environ, "REGISTRY_PORT": str(REGISTRY_PORT)},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


@pytest.fixture(scope="session")
def registry() -> Iterator[str]:
    """The URL of a running Apicurio Registry's Confluent-compatible API.

    Started (and later stopped) here with scripts/registry.sh on REGISTRY_TEST_PORT
    (default 18481, management port +1000) if none was running; in-memory, so each
    test uses subjects of its own.
    """
    started = registry_script("status").returncode != 0
    if started:
        result = registry_script("start")
        if result.returncode != 0:
            pytest.fail(f"cannot start the schema registry:\n{result.stdout}\n{result.stderr}")
    yield REGISTRY_URL
    if started:
        registry_script("stop")
