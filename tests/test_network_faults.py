"""Network faults between the service and the API, made by a real TCP proxy (toxiproxy).

The simulator's own faults are HTTP answers (5xx, 429, hangs, broken bodies). What a
network does is below HTTP: an answer cut off in the middle of its body, a connection
reset, an answer slower than the timeout, a body arriving in small pieces. The service
talks to the simulator through toxiproxy (built by ``make tools``) and each of those
faults is applied in turn while three batches are being published: every cut or reset
is counted as a ``connection_error``, every late answer as a ``timeout``, a sliced body
is read whole, and every record served is published once and only once. Each kind of
failure is logged once as a warning, however many polls it fails (the rest at debug).

The same proxy then stands between the service and a broker of its own (which
advertises the proxy's port): the broker's answers cut off, its connections reset and
the broker out of reach for 3 s while the service publishes in small transactions (the
client retries what was cut; every record is still published once), and at the end the
service is stopped while the broker refuses connections: the stop completes, with no
exception escaping from a Kafka client that could not close cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import structlog
from conftest import (
    ROOT,
    ServiceFactory,
    SimServer,
    TopicReader,
    Topics,
    free_port,
    kafka_script,
    service_env,
    wait_for,
)
from test_durability import assert_exactly_once, served_ids, track, wait_completed

from service import kafka_logs
from service.app import PollerService
from service.config import load_settings

pytestmark = [pytest.mark.kafka, pytest.mark.faults]

TOXIPROXY = ROOT / ".cache" / "tools" / "toxiproxy" / "server"


class Toxiproxy:
    """toxiproxy's REST API: proxies, and the toxics on their downstream (answers)."""

    def __init__(self, url: str, http: aiohttp.ClientSession) -> None:
        self.url = url
        self.http = http

    async def _call(self, method: str, path: str, body: object = None) -> Any:
        async with self.http.request(method, self.url + path, json=body) as resp:
            text = await resp.text()
            assert resp.status < 300, f"toxiproxy {method} {path}: {resp.status} {text}"
            return None if resp.status == 204 else await resp.json()

    async def proxy(self, name: str, upstream: str) -> str:
        """A proxy to ``upstream`` (host:port); the host:port it listens on."""
        listen = f"127.0.0.1:{free_port()}"
        await self._call("POST", "/proxies", {"name": name, "listen": listen, "upstream": upstream})
        return listen

    async def add(self, proxy: str, name: str, kind: str, **attributes: int) -> None:
        toxic = {"name": name, "type": kind, "stream": "downstream", "attributes": attributes}
        await self._call("POST", f"/proxies/{proxy}/toxics", toxic)

    async def remove(self, proxy: str, name: str) -> None:
        await self._call("DELETE", f"/proxies/{proxy}/toxics/{name}")

    async def disable(self, proxy: str) -> None:
        """The proxy stops listening and drops its connections: connections are refused."""
        await self._call("POST", f"/proxies/{proxy}", {"enabled": False})

    async def enable(self, proxy: str) -> None:
        """The proxy listens again."""
        await self._call("POST", f"/proxies/{proxy}", {"enabled": True})


@pytest.fixture
async def toxiproxy() -> AsyncIterator[Toxiproxy]:
    if not TOXIPROXY.exists():
        pytest.fail(f"{TOXIPROXY} is missing: run `make tools` (scripts/install-tools.sh)")
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        str(TOXIPROXY),
        "-host",
        "127.0.0.1",
        "-port",
        str(port),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(url + "/version") as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("toxiproxy did not answer within 5 s")
            yield Toxiproxy(url, http)
    finally:
        process.terminate()
        await process.wait()


async def test_network_faults_between_the_service_and_the_api_lose_and_repeat_nothing(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: ServiceFactory,
    toxiproxy: Toxiproxy,
) -> None:
    sim = sim_server.sim
    batches = [str(uuid.uuid4()) for _ in range(3)]
    for i, b in enumerate(batches):
        sim.generate_batch(b, 600, spread_s=12.0, seed=70 + i)
    listen = await toxiproxy.proxy("api", urlsplit(sim_server.url).netloc)
    service = await start_service(
        RFP_RIGHTFOOT__BASE_URL=f"http://{listen}",
        RFP_RIGHTFOOT__TIMEOUT_S="1",
        # Polls that commit more than once: a fault may come after a commit in the poll.
        RFP_POLLING__MAX_RECORDS_PER_TRANSACTION="150",
    )
    registry = service.metrics.registry

    def requests(code: str) -> float:
        """Requests to the balances endpoint with this outcome."""
        return (
            registry.get_sample_value(
                "rightfoot_poller_api_requests_total", {"endpoint": "balances", "code": code}
            )
            or 0
        )

    def failed_polls() -> float:
        """Polls that failed once their attempts were spent."""
        return registry.get_sample_value("rightfoot_poller_polls_total", {"result": "error"}) or 0

    for b in batches:
        await track(kafka, topics, b, 600)
    await wait_for(lambda: requests("200") >= 6, 20, "the first pages, through the proxy")
    with structlog.testing.capture_logs() as logs:
        await _faults(toxiproxy, requests, failed_polls)
    await wait_completed(reader, topics, batches, timeout=90)
    balances = await reader.read_all(topics.balances)
    assert_exactly_once(balances, served_ids(sim, batches))
    assert service.readiness()[0], "the service is ready again"

    # One cause, one line: two kinds of failure (cut or reset connections, timeouts),
    # each a warning once within the minute, every other failure at debug.
    failed = [e for e in logs if e["event"] == "poll_failed"]
    warned = [e for e in failed if e["log_level"] == "warning"]
    # _faults waits for 3 failed polls while answers are cut; the resets and timeouts may
    # all be absorbed by retries within a poll, so 3 is what is certain (a run had 3).
    assert len(failed) >= 3, failed
    assert len(warned) <= 2 and {e["suppressed"] for e in warned} == {0}, warned
    retried = [e for e in logs if e["event"] == "api_retry" and e["log_level"] == "info"]
    assert 1 <= len(retried) <= 2, retried


async def _faults(
    toxiproxy: Toxiproxy, requests: Callable[[str], float], failed_polls: Callable[[], float]
) -> None:
    """Each fault in turn, each until the service has met it a few times."""

    # Every answer cut off after 2,000 bytes: a page's body ends in its middle.
    cut = requests("connection_error")
    failed = failed_polls()
    await toxiproxy.add("api", "cut", "limit_data", bytes=2000)
    await wait_for(lambda: requests("connection_error") >= cut + 3, 20, "cut-off answers")
    # Polls that fail once their attempts are spent: the batches are retried later.
    await wait_for(lambda: failed_polls() >= failed + 3, 20, "failed polls")
    await toxiproxy.remove("api", "cut")

    # Connections reset by the peer.
    reset = requests("connection_error")
    await toxiproxy.add("api", "reset", "reset_peer", timeout=0)
    await wait_for(lambda: requests("connection_error") >= reset + 3, 20, "reset connections")
    await toxiproxy.remove("api", "reset")

    # Answers 1.5 s late, against a 1 s timeout.
    late = requests("timeout")
    await toxiproxy.add("api", "late", "latency", latency=1500)
    await wait_for(lambda: requests("timeout") >= late + 2, 20, "timed-out requests")
    await toxiproxy.remove("api", "late")

    # Bodies in slices of about 64 bytes, 0.2 ms apart: read whole, no error.
    ok, errors = requests("200"), requests("connection_error") + requests("timeout")
    await toxiproxy.add("api", "slices", "slicer", average_size=64, size_variation=32, delay=200)
    await wait_for(lambda: requests("200") >= ok + 5, 20, "pages read in slices")
    assert requests("connection_error") + requests("timeout") == errors
    await toxiproxy.remove("api", "slices")


@pytest.fixture
async def proxied_kafka(toxiproxy: Toxiproxy, tmp_path: Path) -> AsyncIterator[str]:
    """A broker of its own whose clients all reach it through the proxy "kafka"."""
    port, controller = free_port(), free_port()
    listen = await toxiproxy.proxy("kafka", f"127.0.0.1:{port}")
    env = {
        "KAFKA_PORT": str(port),
        "KAFKA_CONTROLLER_PORT": str(controller),
        "KAFKA_ADVERTISED_PORT": listen.rsplit(":", 1)[1],
        "KAFKA_DIR": str(tmp_path / "kafka"),
    }
    started = await asyncio.to_thread(kafka_script, "start", **env)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield listen
    finally:
        await asyncio.to_thread(kafka_script, "stop", **env)


async def test_kafka_connections_cut_inside_transactions_lose_and_repeat_nothing(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    toxiproxy: Toxiproxy,
    proxied_kafka: str,
) -> None:
    sim = sim_server.sim
    batches = [str(uuid.uuid4()) for _ in range(3)]
    for i, b in enumerate(batches):
        sim.generate_batch(b, 900, spread_s=10.0, seed=80 + i)
    env = service_env(
        topics,
        proxied_kafka,
        sim_server.url,
        RFP_INSTANCE_ID="netfault",
        # Many small transactions: a cut finds one open.
        RFP_POLLING__MAX_RECORDS_PER_TRANSACTION="100",
    )
    service = PollerService(load_settings(None, env=env))
    await service.start()
    stopped = False
    try:
        await wait_for(lambda: service.readiness()[0], 30, "service ready")
        await _kafka_faults(service, toxiproxy, proxied_kafka, topics, batches)
        reader = TopicReader(proxied_kafka)
        await wait_completed(reader, topics, batches, timeout=120)
        balances = await reader.read_all(topics.balances)
        assert_exactly_once(balances, served_ids(sim, batches))
        assert service.readiness()[0], "the service is ready again"

        # The broker out of reach for good: /readyz's kafka check turns false (it means
        # "connected to Kafka"), and true again once the broker is back.
        with kafka_lines_read():
            await toxiproxy.disable("kafka")
            await wait_for(
                lambda: not service.readiness()[1]["checks"]["kafka"], 40, "kafka not ready"
            )
            assert service.readiness()[1]["kafka_error"]["reason"] == "unreachable"
            await toxiproxy.enable("kafka")
            await wait_for(lambda: service.readiness()[0], 40, "the service ready again")

        # Stopped (SIGTERM) while the broker is out of reach: the stop ends, and it ends
        # by itself, not with an exception out of a client that could not say goodbye.
        await toxiproxy.disable("kafka")
        await asyncio.sleep(1.0)  # the clients find the broker gone, and back off
        stopped = True
        await asyncio.wait_for(service.stop(), 60)
    finally:
        if not stopped:
            await service.stop()


@contextlib.contextmanager
def kafka_lines_read() -> Iterator[None]:
    """The service's BrokerLog reads aiokafka's lines, as it does on the handler
    configure_logging installs (which the tests leave out)."""

    class Discard(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            pass

    handler = Discard()
    handler.addFilter(kafka_logs.BROKERS)
    aiokafka = logging.getLogger("aiokafka")
    aiokafka.addHandler(handler)
    try:
        yield
    finally:
        aiokafka.removeHandler(handler)


async def _kafka_faults(
    service: PollerService,
    toxiproxy: Toxiproxy,
    bootstrap: str,
    topics: Topics,
    batches: list[str],
) -> None:
    registry = service.metrics.registry

    def published() -> float:
        return sum(
            sample.value
            for metric in registry.collect()
            if metric.name == "rightfoot_poller_records_published"
            for sample in metric.samples
            if sample.name.endswith("_total")
        )

    for b in batches:
        await track(bootstrap, topics, b, 900)
    await wait_for(lambda: published() >= 200, 30, "the first commits, through the proxy")
    # The broker's answers cut off after 64 kB on each connection: produce, offset and
    # end-transaction answers lost while their requests were carried out.
    await toxiproxy.add("kafka", "cut", "limit_data", bytes=65536)
    await asyncio.sleep(3.0)
    await toxiproxy.remove("kafka", "cut")
    # Connections reset.
    await toxiproxy.add("kafka", "reset", "reset_peer", timeout=0)
    await asyncio.sleep(1.0)
    await toxiproxy.remove("kafka", "reset")
    # Nothing gets through for 3 s (within the test's 6 s session timeout).
    await toxiproxy.add("kafka", "hole", "timeout", timeout=0)
    await asyncio.sleep(3.0)
    await toxiproxy.remove("kafka", "hole")
