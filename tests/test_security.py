"""Security: authenticated and encrypted Kafka, TLS to the API, secrets that never leak.

A broker of its own (``scripts/kafka.sh`` on free ports) with SASL_SSL, SASL_PLAINTEXT
and mutual-TLS SSL listeners, SCRAM users created at format time and certificates made
here (tests/certs.py). The shared test broker stays PLAINTEXT.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaTimeoutError
from certs import CertificateAuthority, Issued
from conftest import (
    ADMIN_TOKEN,
    API_KEY,
    ROOT,
    ServiceProcess,
    ServiceProcesses,
    SimServer,
    Topics,
    run_cli,
    service_env,
    wait_for,
)
from prometheus_client import generate_latest
from pydantic import SecretStr

from rightfoot_simulator import Simulator, build_app
from service.api import ApiKey, RightfootClient
from service.app import PollerService
from service.config import KafkaConfig, load_settings
from service.errors import ApiTransportError, ConfigError, KafkaConnectionProblem
from service.http_api import HttpApi, MalformedRequestLogFilter
from service.kafka_clients import client_args, probe_brokers
from service.metrics import Metrics
from service.pacing import RateLimiter

SASL_USERS = {"alice": "alice-Scram-0a9b8c7d6e", "bob": "bob-Plain-5f4e3d2c1b"}
WRONG_PASSWORD = "not-the-password-3141592653"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class SecureBroker:
    ca: CertificateAuthority
    rogue_ca: CertificateAuthority
    client: Issued
    plaintext: str
    sasl_ssl: str
    sasl_plaintext: str
    ssl: str

    def config(self, protocol: str, **extra: Any) -> KafkaConfig:
        bootstrap = {
            "SASL_SSL": self.sasl_ssl,
            "SASL_PLAINTEXT": self.sasl_plaintext,
            "SSL": self.ssl,
            "PLAINTEXT": self.plaintext,
        }[protocol]
        args: dict[str, Any] = {"bootstrap_servers": bootstrap, "security_protocol": protocol}
        if "SSL" in protocol:
            args["ssl_cafile"] = self.ca.cert
        if protocol.startswith("SASL"):
            args |= {
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_username": "alice",
                "sasl_password": SecretStr(SASL_USERS["alice"]),
            }
        return KafkaConfig(**(args | extra))


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    """A broker with SASL_SSL, SASL_PLAINTEXT and SSL (client certificates) listeners."""
    base = tmp_path_factory.mktemp("secure-kafka")
    ca = CertificateAuthority(base / "tls")
    broker_cert = ca.issue("broker")
    client = ca.issue("client", server=False)
    rogue = CertificateAuthority(base / "tls", name="rogue-ca")
    users = base / "sasl-users"
    users.write_text("".join(f"{name} {pw}\n" for name, pw in SASL_USERS.items()))
    plain, controller, sasl_ssl, sasl_plain, tls = free_ports(5)
    env = {
        **os.environ,
        "KAFKA_PORT": str(plain),
        "KAFKA_CONTROLLER_PORT": str(controller),
        "KAFKA_DIR": str(base / "kafka"),
        "KAFKA_SASL_SSL_PORT": str(sasl_ssl),
        "KAFKA_SASL_PLAINTEXT_PORT": str(sasl_plain),
        "KAFKA_SSL_PORT": str(tls),
        "KAFKA_SSL_CERT": str(broker_cert.cert),
        "KAFKA_SSL_KEY": str(broker_cert.key),
        "KAFKA_SSL_CA": str(ca.cert),
        "KAFKA_SASL_USERS_FILE": str(users),
    }
    script = str(ROOT / "scripts" / "kafka.sh")

    def kafka_sh(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [script, command], env=env, capture_output=True, text=True, timeout=300, check=False
        )

    started = kafka_sh("start")
    if started.returncode != 0:
        kafka_sh("stop")
        pytest.fail(f"cannot start the secured broker:\n{started.stdout}\n{started.stderr}")
    try:
        # The passwords are not readable by others on disk.
        props = base / "kafka" / "server.properties"
        assert props.stat().st_mode & 0o077 == 0
        assert (base / "kafka" / "broker-keystore.pem").stat().st_mode & 0o077 == 0
        yield SecureBroker(
            ca=ca,
            rogue_ca=rogue,
            client=client,
            plaintext=f"127.0.0.1:{plain}",
            sasl_ssl=f"127.0.0.1:{sasl_ssl}",
            sasl_plaintext=f"127.0.0.1:{sasl_plain}",
            ssl=f"127.0.0.1:{tls}",
        )
    finally:
        kafka_sh("stop")


async def create_topic(bootstrap: str, name: str, partitions: int = 1) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


async def read_topic(cfg: KafkaConfig, topic: str, want: int, timeout: float = 30) -> list[Any]:
    """Committed messages of a topic, read over the configured security protocol."""
    consumer = AIOKafkaConsumer(
        topic,
        **client_args(cfg, "security-test-reader"),
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    out: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while len(out) < want and time.monotonic() < deadline:
            chunk = await consumer.getmany(timeout_ms=300)
            out.extend(m for msgs in chunk.values() for m in msgs)
        # Anything beyond what was expected (a duplicate) would show up now.
        chunk = await consumer.getmany(timeout_ms=500)
        out.extend(m for msgs in chunk.values() for m in msgs)
        return out
    finally:
        await consumer.stop()


# --------------------------------------------------------------------------- the broker


@pytest.mark.kafka
@pytest.mark.parametrize(
    ("protocol", "mechanism", "user"),
    [
        ("SASL_SSL", "PLAIN", "bob"),
        ("SASL_SSL", "SCRAM-SHA-256", "alice"),
        ("SASL_SSL", "SCRAM-SHA-512", "bob"),
        ("SASL_PLAINTEXT", "SCRAM-SHA-256", "bob"),
        ("SSL", None, None),
    ],
)
async def test_produce_and_consume_over_each_protocol(
    secure_kafka: SecureBroker, protocol: str, mechanism: str | None, user: str | None
) -> None:
    extra: dict[str, Any] = {}
    if mechanism is not None and user is not None:
        extra = {
            "sasl_mechanism": mechanism,
            "sasl_username": user,
            "sasl_password": SecretStr(SASL_USERS[user]),
        }
    if protocol == "SSL":  # mutual TLS: the listener requires a client certificate
        extra = {"ssl_certfile": secure_kafka.client.cert, "ssl_keyfile": secure_kafka.client.key}
    cfg = secure_kafka.config(protocol, **extra)
    topic = f"sec-{uuid.uuid4().hex[:8]}"
    await create_topic(secure_kafka.plaintext, topic)
    producer = AIOKafkaProducer(**client_args(cfg, "security-test"), enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"hello " + protocol.encode(), key=b"k")
    finally:
        await producer.stop()
    got = await read_topic(cfg, topic, want=1)
    assert [m.value for m in got] == [b"hello " + protocol.encode()]


@pytest.mark.kafka
async def test_probe_names_the_cause(secure_kafka: SecureBroker, tmp_path: Path) -> None:
    async def reason(cfg: KafkaConfig) -> tuple[str, str]:
        with pytest.raises(KafkaConnectionProblem) as caught:
            await probe_brokers(cfg, "probe-test", timeout_s=5)
        return caught.value.reason, str(caught.value)

    await probe_brokers(secure_kafka.config("SASL_SSL"), "probe-test")
    why, text = await reason(
        secure_kafka.config("SASL_SSL", sasl_password=SecretStr(WRONG_PASSWORD))
    )
    assert why == "authentication"
    assert "authentication failed" in text.lower() and "'alice'" in text
    assert WRONG_PASSWORD not in text
    why, text = await reason(secure_kafka.config("SASL_SSL", ssl_cafile=secure_kafka.rogue_ca.cert))
    assert why == "tls"
    assert "certificate verify failed" in text and "ssl_cafile" in text
    why, text = await reason(secure_kafka.config("SSL"))  # no client certificate
    assert why == "tls"
    missing = tmp_path / "missing-ca.pem"
    why, text = await reason(secure_kafka.config("SSL", ssl_cafile=missing))
    assert why == "tls" and "cannot load the TLS files" in text
    closed = free_ports(1)[0]
    why, _ = await reason(secure_kafka.config("SASL_SSL", bootstrap_servers=f"127.0.0.1:{closed}"))
    assert why == "unreachable"


# --------------------------------------------------------------------------- the service


async def post_batch(port: int, body: dict[str, Any]) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"http://127.0.0.1:{port}/v1/batches",
            json=body,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as resp,
    ):
        return resp.status


@pytest.mark.kafka
async def test_service_end_to_end_over_sasl_ssl(
    secure_kafka: SecureBroker, topics: Topics, sim_server: SimServer, tmp_path: Path
) -> None:
    """SCRAM-SHA-512 over TLS, the password from a mounted file: a batch, every record."""
    password_file = tmp_path / "sasl-password"
    password_file.write_text(SASL_USERS["alice"] + "\n")
    env = service_env(
        topics,
        secure_kafka.sasl_ssl,
        sim_server.url,
        RFP_INSTANCE_ID="sasl-ssl-0",
        RFP_KAFKA__SECURITY_PROTOCOL="SASL_SSL",
        RFP_KAFKA__SASL_MECHANISM="SCRAM-SHA-512",
        RFP_KAFKA__SASL_USERNAME="alice",
        RFP_KAFKA__SASL_PASSWORD_FILE=str(password_file),
        RFP_KAFKA__SSL_CAFILE=str(secure_kafka.ca.cert),
    )
    settings = load_settings(None, env=env)
    assert settings.kafka.sasl_password is not None
    assert settings.kafka.sasl_password.get_secret_value() == SASL_USERS["alice"]
    batch = str(uuid.uuid4())
    records = sim_server.sim.generate_batch(batch, 240, spread_s=1.0, seed=11)

    service = PollerService(settings)
    try:
        await service.start()
        await wait_for(lambda: service.readiness()[0], 30, "ready over SASL_SSL")
        assert service.http_port is not None
        assert (
            await post_batch(service.http_port, {"batch_id": batch, "expected_count": 240}) == 202
        )

        def completed() -> bool:
            found = service.view.get(batch)
            return found is not None and found["status"] == "completed"

        await wait_for(completed, 40, "batch completed")
    finally:
        await service.stop()

    reader_cfg = secure_kafka.config("SASL_SSL")  # read back over SASL_SSL, read_committed
    balances = await read_topic(reader_cfg, topics.balances, want=len(records))
    keys = sorted(m.key.decode() for m in balances)
    assert keys == sorted(r.authorizer_unique_id for r in records)
    assert len({json.loads(m.value)["event_id"] for m in balances}) == len(records)
    events = await read_topic(reader_cfg, topics.events, want=2)
    assert [json.loads(m.value)["event"] for m in events] == ["tracking_started", "completed"]


async def http_get(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        return resp.status, await resp.text()


def metric_value(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    assert match, f"{name}{{{labels}}} not in /metrics"
    return float(match.group(1))


def log_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        doc = json.loads(line)  # every line is one JSON object
        assert isinstance(doc, dict)
        out.append(doc)
    return out


async def refused_service(
    service: ServiceProcess, *, reason: str, observe_s: float, secrets: list[str]
) -> dict[str, Any]:
    """Watch a service that Kafka refuses: up, not ready, few error lines, no secret."""
    service.start()
    started = time.monotonic()
    readyz: dict[str, Any] = {}
    while time.monotonic() - started < observe_s:
        assert service.proc is not None and service.proc.poll() is None, service.tail()
        try:
            status, body = await http_get(service.port, "/readyz")
        except aiohttp.ClientError:
            await asyncio.sleep(0.2)
            continue
        assert status == 503, body
        readyz = json.loads(body)
        assert (await http_get(service.port, "/healthz"))[0] == 200
        await asyncio.sleep(0.5)
    assert readyz["checks"]["kafka"] is False
    assert readyz["kafka_error"]["reason"] == reason, readyz
    _, metrics = await http_get(service.port, "/metrics")
    counted = metric_value(
        metrics, "rightfoot_poller_kafka_connection_errors_total", f'reason="{reason}"'
    )
    assert counted >= 2
    lines = log_lines(service.log_path)
    errors = [d for d in lines if d.get("level") == "error"]
    # One clear line per attempt, attempts backing off 1, 2, 4, 8 s: no flood.
    assert 2 <= len(errors) <= 5, errors
    assert {d["event"] for d in errors} == {"kafka_unavailable"}, errors
    assert all(d["reason"] == reason for d in errors)
    for secret in secrets:
        assert secret not in service.log_path.read_text(errors="replace")
        assert secret not in json.dumps(readyz)
        assert secret not in metrics
    return {"readyz": readyz, "errors": errors}


@pytest.mark.kafka
async def test_wrong_password_is_one_clear_error_and_recovers(
    secure_kafka: SecureBroker,
    topics: Topics,
    sim_server: SimServer,
    tmp_path: Path,
    service_processes: ServiceProcesses,
) -> None:
    password_file = tmp_path / "sasl-password"
    password_file.write_text(WRONG_PASSWORD)
    env = service_env(
        topics,
        secure_kafka.sasl_ssl,
        sim_server.url,
        RFP_INSTANCE_ID="wrong-password",
        RFP_KAFKA__SECURITY_PROTOCOL="SASL_SSL",
        RFP_KAFKA__SASL_MECHANISM="SCRAM-SHA-256",
        RFP_KAFKA__SASL_USERNAME="alice",
        RFP_KAFKA__SASL_PASSWORD_FILE=str(password_file),
        RFP_KAFKA__SSL_CAFILE=str(secure_kafka.ca.cert),
    )
    service: ServiceProcess = service_processes(env, "wrong-password")
    seen = await refused_service(
        service,
        reason="authentication",
        observe_s=10,
        secrets=[WRONG_PASSWORD, SASL_USERS["alice"], API_KEY, ADMIN_TOKEN],
    )
    message = seen["readyz"]["kafka_error"]["error"]
    assert "Kafka authentication failed" in message and "SCRAM-SHA-256" in message
    assert "RFP_KAFKA__SASL_PASSWORD_FILE" in message
    delays = [d["retry_in_s"] for d in seen["errors"]]
    assert delays == sorted(delays) and delays[:2] == [1.0, 2.0]

    # The Secret is rotated (the mounted file changes): the next attempt gets in.
    password_file.write_text(SASL_USERS["alice"])
    await service.ready(timeout=30)
    status, body = await http_get(service.port, "/readyz")
    assert status == 200 and "kafka_error" not in json.loads(body)
    service.signal(signal.SIGTERM)
    assert await service.wait(30) == 0
    text = service.log_path.read_text(errors="replace")
    assert SASL_USERS["alice"] not in text and WRONG_PASSWORD not in text


@pytest.mark.kafka
async def test_untrusted_broker_certificate_is_one_clear_error(
    secure_kafka: SecureBroker,
    topics: Topics,
    sim_server: SimServer,
    tmp_path: Path,
    service_processes: ServiceProcesses,
) -> None:
    env = service_env(
        topics,
        secure_kafka.sasl_ssl,
        sim_server.url,
        RFP_INSTANCE_ID="untrusted-cert",
        RFP_KAFKA__SECURITY_PROTOCOL="SASL_SSL",
        RFP_KAFKA__SASL_MECHANISM="PLAIN",
        RFP_KAFKA__SASL_USERNAME="bob",
        RFP_KAFKA__SASL_PASSWORD=SASL_USERS["bob"],
        RFP_KAFKA__SSL_CAFILE=str(secure_kafka.rogue_ca.cert),  # not the broker's CA
    )
    service: ServiceProcess = service_processes(env, "untrusted-cert")
    seen = await refused_service(
        service, reason="tls", observe_s=5, secrets=[SASL_USERS["bob"], API_KEY, ADMIN_TOKEN]
    )
    assert "certificate verify failed" in seen["readyz"]["kafka_error"]["error"]
    service.signal(signal.SIGTERM)
    assert await service.wait(30) == 0


# --------------------------------------------------------------------------- the API


@pytest.fixture
async def https_simulator(tmp_path: Path) -> AsyncIterator[tuple[str, CertificateAuthority, str]]:
    """The simulator over HTTPS with a certificate from a private CA: (url, ca, batch id)."""
    ca = CertificateAuthority(tmp_path / "api-tls", name="api-ca")
    server_cert = ca.issue("api-server")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(server_cert.cert, server_cert.key)
    sim = Simulator(api_keys=[API_KEY], seed=3)
    batch = str(uuid.uuid4())
    sim.generate_batch(batch, 5)
    runner = web.AppRunner(build_app(sim), access_log=None)
    await runner.setup()
    port = free_ports(1)[0]
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx)
    await site.start()
    try:
        yield f"https://127.0.0.1:{port}", ca, batch
    finally:
        await runner.cleanup()


async def fetch_first_page(env: dict[str, str], batch: str) -> int:
    settings = load_settings(None, env=env)
    assert settings.rightfoot.api_key is not None
    client = RightfootClient(
        settings.rightfoot,
        instance_id="tls-test",
        metrics=Metrics(),
        api_key=ApiKey(settings.rightfoot.api_key.get_secret_value()),
        limiter=RateLimiter(100),
    )
    await client.start()
    try:
        page = await client.fetch_page(batch, None)
        return len(page.records)
    finally:
        await client.close()


async def test_api_tls_is_verified_and_takes_an_extra_ca_bundle(
    https_simulator: tuple[str, CertificateAuthority, str],
) -> None:
    url, ca, batch = https_simulator
    env = {
        "RIGHTFOOT_API_KEY": API_KEY,
        "RFP_RIGHTFOOT__BASE_URL": url,
        "RFP_RIGHTFOOT__MAX_ATTEMPTS": "1",
    }
    # A certificate from a CA the system does not trust is refused...
    with pytest.raises(ApiTransportError) as refused:
        await fetch_first_page(env, batch)
    assert refused.value.code == "connection_error"
    assert "Certificate" in str(refused.value)
    assert API_KEY not in str(refused.value)
    # ...and accepted once its CA is given as the extra bundle.
    assert await fetch_first_page({**env, "RFP_RIGHTFOOT__CA_BUNDLE": str(ca.cert)}, batch) == 5
    # Verification cannot be switched off: there is no such key.
    for key in ("RFP_RIGHTFOOT__VERIFY_SSL", "RFP_RIGHTFOOT__TLS_VERIFY", "RFP_RIGHTFOOT__VERIFY"):
        with pytest.raises(ConfigError, match="unknown key"):
            load_settings(None, env={**env, key: "false"})


@pytest.mark.kafka
async def test_api_key_from_file_never_leaks(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    tmp_path: Path,
    service_processes: ServiceProcesses,
) -> None:
    """RIGHTFOOT_API_KEY_FILE: used, re-read after a 401, and nowhere in what the service says."""
    sim = sim_server.sim
    first_key = "rf_file_key_" + uuid.uuid4().hex
    second_key = "rf_file_key_" + uuid.uuid4().hex
    sim.set_api_keys([first_key])
    key_file = tmp_path / "api-key"
    key_file.write_text(first_key + "\n")
    env = service_env(
        topics,
        kafka,
        sim_server.url,
        RFP_INSTANCE_ID="key-file",
        RIGHTFOOT_API_KEY_FILE=str(key_file),
        RFP_LOGGING__LEVEL="DEBUG",
    )
    env.pop("RIGHTFOOT_API_KEY")
    secrets = [first_key, second_key, ADMIN_TOKEN]

    # check-config shows the key is set, not what it is.
    shown = run_cli("check-config", env={**env, "RIGHTFOOT_API_KEY": ""})
    assert shown.returncode == 0, shown.stderr
    assert "api_key: '********'" in shown.stdout
    for secret in secrets:
        assert secret not in shown.stdout + shown.stderr

    batch = str(uuid.uuid4())
    sim.generate_batch(batch, 30, spread_s=0.5, seed=5)
    service: ServiceProcess = service_processes({**env, "RIGHTFOOT_API_KEY": ""}, "key-file")
    service.start()
    await service.ready(timeout=60)
    # More records expected than exist: the batch stays tracked through the rotation.
    assert await post_batch(service.port, {"batch_id": batch, "expected_count": 60}) == 202

    async def published() -> float:
        _, text = await http_get(service.port, "/metrics")
        return sum(
            float(v)
            for v in re.findall(
                r"^rightfoot_poller_records_published_total\{.*\} (\S+)$", text, re.M
            )
        )

    deadline = time.monotonic() + 30
    while await published() < 30:
        assert time.monotonic() < deadline, service.tail()
        await asyncio.sleep(0.3)

    # The key is revoked: 401, /readyz red; the new key is written to the file: recovered.
    sim.set_api_keys([second_key])
    deadline = time.monotonic() + 30
    while (await http_get(service.port, "/readyz"))[0] != 503:
        assert time.monotonic() < deadline, service.tail()
        await asyncio.sleep(0.2)
    _, body = await http_get(service.port, "/readyz")
    assert json.loads(body)["checks"]["api_key_accepted"] is False
    key_file.write_text(second_key)
    await service.ready(timeout=30)

    said = [body]
    for path in ("/metrics", "/readyz", "/healthz", "/v1/batches", f"/v1/batches/{batch}"):
        said.append((await http_get(service.port, path))[1])
    service.signal(signal.SIGTERM)
    assert await service.wait(30) == 0
    said.append(service.log_path.read_text(errors="replace"))
    # Lifecycle and balance events carry no key either.
    reader = AIOKafkaConsumer(
        topics.balances,
        topics.events,
        bootstrap_servers=kafka,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await reader.start()
    try:
        chunk = await reader.getmany(timeout_ms=2000)
        said += [repr(m) for msgs in chunk.values() for m in msgs]
    finally:
        await reader.stop()
    events = [d["event"] for d in log_lines(service.log_path)]
    assert "api_key_rejected" in events and "api_key_accepted" in events
    everything = "\n".join(said)
    for secret in secrets:
        assert secret not in everything


# --------------------------------------------------------------------------- the admin API


class _Boundary:
    loaded = True  # the state view, read whole

    def __init__(self, fail_with: BaseException | None = None) -> None:
        self.fail_with = fail_with
        self.submitted: list[Any] = []

    async def submit(self, req: Any) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.submitted.append(req)

    def get(self, batch_id: str) -> dict[str, Any] | None:
        return None

    def list(
        self,
        *,
        statuses: frozenset[str] | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> tuple[list[dict[str, Any]], bool]:
        return [], False


@pytest.fixture
async def admin_api() -> AsyncIterator[tuple[str, Metrics, _Boundary]]:
    metrics, boundary = Metrics(), _Boundary()
    api = HttpApi(
        metrics=metrics,
        readiness=lambda: (True, {}),
        submit=boundary.submit,
        view=boundary,
        admin_token=ADMIN_TOKEN,
        max_body_bytes=1024,
    )
    server = TestServer(api.app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), metrics, boundary
    finally:
        await server.close()


async def raw_request(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    answer = await reader.read(4096)
    writer.close()
    await writer.wait_closed()
    return answer


async def test_admin_api_errors_are_json_and_never_5xx(
    admin_api: tuple[str, Metrics, _Boundary],
) -> None:
    url, _, boundary = admin_api
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession() as http:

        async def call(method: str, path: str, **kw: Any) -> tuple[int, Any, Any]:
            async with http.request(method, url + path, **kw) as resp:
                return resp.status, await resp.json(), resp.headers

        # A method a path does not have: 405, JSON, with Allow.
        status, body, headers = await call("PATCH", "/v1/batches", headers=auth)
        assert status == 405 and "error" in body and "POST" in headers["Allow"]
        # An unknown path: 404, JSON.
        status, body, _ = await call("GET", "/v1/nothing-here")
        assert status == 404 and "error" in body
        # JSON only, and bounded.
        status, body, _ = await call("POST", "/v1/batches", headers=auth, data="batch_id=x")
        assert status == 415 and "application/json" in body["error"]
        big = json.dumps({"batch_id": "b", "pad": "x" * 5000})
        headers_json = {**auth, "Content-Type": "application/json"}
        status, body, _ = await call("POST", "/v1/batches", headers=headers_json, data=big)
        assert status == 413 and "1024" in body["error"]
        # A token that is not even UTF-8 is a wrong token, not a crash.
        status, body, _ = await call(
            "POST", "/v1/batches", headers={"Authorization": "Bearer é\u2603"}, json={}
        )
        assert status == 401
        # Kafka cannot take the request: 503 with Retry-After, not a 500.
        boundary.fail_with = KafkaTimeoutError()
        status, body, headers = await call(
            "POST", "/v1/batches", headers=auth, json={"batch_id": "b-1"}
        )
        assert status == 503 and headers["Retry-After"] == "5" and "Kafka" in body["error"]
        boundary.fail_with = None
        status, body, _ = await call("POST", "/v1/batches", headers=auth, json={"batch_id": "b-1"})
        assert status == 202 and body == {"batch_id": "b-1", "status": "accepted"}
        # A Unicode batch ID is refused with a reason, not tracked.
        status, body, _ = await call("DELETE", "/v1/batches/b%C3%A9", headers=auth)
        assert status == 400 and "batch_id" in body["error"]
    assert [r.batch_id for r in boundary.submitted] == ["b-1"]


async def test_malformed_http_is_one_warning_not_an_error_flood(
    admin_api: tuple[str, Metrics, _Boundary], caplog: pytest.LogCaptureFixture
) -> None:
    url, metrics, _ = admin_api
    caplog.set_level("DEBUG", logger="aiohttp.server")
    for installed in logging.getLogger("aiohttp.server").filters:
        if isinstance(installed, MalformedRequestLogFilter):
            installed.reset()  # a fresh budget of warning lines for this test
    for _ in range(12):
        answer = await raw_request(
            url, b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \x00\xff\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0]
    server_records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert server_records, "the first malformed requests are logged"
    assert len(server_records) <= 5
    assert all(r.levelname == "WARNING" and r.exc_info is None for r in server_records)
    counted = metric_value(
        generate_latest(metrics.registry).decode(),
        "rightfoot_poller_invalid_input_total",
        'reason="malformed_http",source="http"',
    )
    assert counted == 12
