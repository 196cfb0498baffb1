"""What the performance benchmarks share: processes, their CPU and memory, Kafka and statistics.

Every benchmark runs each party in its own process, so that none of them steals
another's CPU inside one interpreter: the simulator (``python -m service simulate``),
the service (``python -m service run``, or ``bench/probe.py`` which is the same
service plus exact sampling) and the ceiling script (``bench/ceiling.py``). The
orchestrating process only creates batches, sends tracking requests and reads a few
messages. CPU time and memory of a child are read from ``/proc/<pid>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "bench-api-key-0123456789"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any RFP_*/RIGHTFOOT_* setting of the caller, plus ``extra``."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("RFP_", "RIGHTFOOT_", "POD_NAME"))
    }
    env.update(extra)
    return env


def log(message: str) -> None:
    """Progress, on stderr: stdout carries only the figures."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (fields 14 and 15 of /proc/PID/stat)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of a process, in MiB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) / 1024
    return out


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text as {sample name: [(labels, value), ...]}."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


# --------------------------------------------------------------------------- simulator


@dataclass
class SimulatorProcess:
    """``python -m service simulate`` in its own process, driven by its control API."""

    port: int
    process: asyncio.subprocess.Process
    http: aiohttp.ClientSession

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def control(self, path: str, body: object | None = None) -> Any:
        method = "GET" if body is None else "POST"
        async with self.http.request(method, self.base_url + path, json=body) as resp:
            resp.raise_for_status()
            return await resp.json(content_type=None)

    async def create_batches(
        self,
        count: int,
        records: int,
        *,
        spread_s: float = 0.0,
        order: str = "completion",
        concurrency: int = 8,
    ) -> list[str]:
        """``count`` batches of ``records`` synthetic records each; returns their IDs.

        ``order`` is the simulator's listing order. The benchmarks keep ``"completion"``
        (records append as they appear), as all their figures so far were measured; with
        every record visible at once (``spread_s`` 0) both orders list the same records.
        ``bench/big_batch.py`` measures records that finish behind the cursor.
        """
        ids = [str(uuid.uuid4()) for _ in range(count)]
        queue: asyncio.Queue[str] = asyncio.Queue()
        for batch_id in ids:
            queue.put_nowait(batch_id)

        async def worker() -> None:
            while not queue.empty():
                batch_id = queue.get_nowait()
                body = {
                    "batch_id": batch_id,
                    "count": records,
                    "spread_s": spread_s,
                    "order": order,
                }
                await self.control("/_sim/batches", body)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return ids

    async def request_log(self) -> list[dict[str, Any]]:
        body = await self.control("/_sim/requests")
        entries: list[dict[str, Any]] = body["requests"]
        return entries

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid)


@contextlib.asynccontextmanager
async def simulator(log_path: Path | None = None) -> AsyncIterator[SimulatorProcess]:
    """The simulator on a free loopback port, without demo batches; SIGTERM at the end."""
    port = free_port()
    command = [sys.executable, "-m", "service", "simulate", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--no-demo", "--api-key", API_KEY, "--log-level", "WARNING"]
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(log_path.open("wb")) if log_path else subprocess.DEVNULL
        process = await asyncio.create_subprocess_exec(
            *command, cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL, stderr=sink
        )
        timeout = aiohttp.ClientTimeout(total=300)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http:
                sim = SimulatorProcess(port, process, http)
                await _wait_until(lambda: _answers(sim), process, "the simulator", 30)
                yield sim
        finally:
            await terminate(process)


async def _answers(sim: SimulatorProcess) -> bool:
    try:
        await sim.control("/_sim/faults")
        return True
    except aiohttp.ClientError:
        return False


async def _wait_until(
    probe: Any, process: asyncio.subprocess.Process, what: str, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.returncode is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        if await probe():
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{what} did not get ready in {timeout_s} s")


async def terminate(process: asyncio.subprocess.Process, timeout_s: float = 30.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout_s``; the exit code."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(process.wait(), timeout_s)
        except TimeoutError:
            process.kill()
    return await process.wait()


# --------------------------------------------------------------------------- the service


@dataclass
class Topics:
    """A fresh set of the service's topics for one run (production partition count)."""

    prefix: str = field(default_factory=lambda: f"bench-{uuid.uuid4().hex[:10]}")
    partitions: int = 12

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

    def env(self, bootstrap: str) -> dict[str, str]:
        return {
            "RFP_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "RFP_KAFKA__BALANCES_TOPIC": self.balances,
            "RFP_KAFKA__BATCH_EVENTS_TOPIC": self.events,
            "RFP_KAFKA__REQUESTS_TOPIC": self.requests,
            "RFP_KAFKA__STATE_TOPIC": self.state,
            "RFP_KAFKA__GROUP_ID": f"{self.prefix}-group",
            "RFP_KAFKA__PARTITIONS": str(self.partitions),
        }


def service_env(topics: Topics, bootstrap: str, api_url: str, **overrides: str) -> dict[str, str]:
    """Configuration of a benchmarked service, by environment only (RFP_* keys)."""
    env = {
        "RIGHTFOOT_API_KEY": API_KEY,
        "RFP_INSTANCE_ID": f"bench-{topics.prefix[-6:]}",
        "RFP_HTTP__HOST": "127.0.0.1",
        "RFP_RIGHTFOOT__BASE_URL": api_url,
        "RFP_LOGGING__LEVEL": "WARNING",
        "RFP_SHUTDOWN_GRACE_S": "20",
        **topics.env(bootstrap),
    }
    env.update(overrides)
    return env


@dataclass
class ServiceProcess:
    """The service in its own process; its readiness, metrics, CPU and memory."""

    process: asyncio.subprocess.Process
    port: int
    http: aiohttp.ClientSession

    @property
    def pid(self) -> int:
        return self.process.pid

    async def ready(self) -> bool:
        try:
            async with self.http.get(f"http://127.0.0.1:{self.port}/readyz") as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    async def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        async with self.http.get(f"http://127.0.0.1:{self.port}/metrics") as resp:
            return parse_metrics(await resp.text())

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def memory_mb(self) -> dict[str, float]:
        return memory_mb(self.pid)


@contextlib.asynccontextmanager
async def service(
    env: dict[str, str],
    *,
    command: Sequence[str] = ("-m", "service", "run"),
    log_path: Path | None = None,
    ready_timeout_s: float = 120.0,
) -> AsyncIterator[ServiceProcess]:
    """Start ``python <command>`` with ``env``, wait for /readyz, SIGTERM at the end."""
    port = free_port()
    full_env = clean_env(**env, RFP_HTTP__PORT=str(port))
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(log_path.open("ab")) if log_path else subprocess.DEVNULL
        process = await asyncio.create_subprocess_exec(
            sys.executable, *command, cwd=ROOT, env=full_env, stdout=sink, stderr=sink
        )
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                svc = ServiceProcess(process, port, http)
                await _wait_until(svc.ready, process, "the service", ready_timeout_s)
                yield svc
        finally:
            code = await terminate(process)
            if code not in (0, -signal.SIGTERM):
                log(f"the service exited with {code}")


# --------------------------------------------------------------------------- Kafka


async def send_tracking_requests(
    bootstrap: str,
    topic: str,
    batches: Iterable[tuple[str, int | None]],
    *,
    per_second: float | None = None,
) -> None:
    """One tracking request per (batch ID, expected count), optionally paced."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, linger_ms=5)
    await producer.start()
    try:
        started = time.monotonic()
        futures = []
        for i, (batch_id, expected) in enumerate(batches):
            if per_second:
                delay = started + i / per_second - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            body: dict[str, Any] = {"batch_id": batch_id}
            if expected is not None:
                body["expected_count"] = expected
            futures.append(
                await producer.send(topic, json.dumps(body).encode(), key=batch_id.encode())
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def create_topic(bootstrap: str, topic: str, partitions: int = 12) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def end_offsets_total(bootstrap: str, topic: str) -> int:
    """Sum of a topic's end offsets: its message count when nothing was transactional."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in partitions]
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()


async def count_committed(bootstrap: str, topic: str, timeout_s: float = 300.0) -> tuple[int, int]:
    """Messages a read_committed consumer reads from the whole topic, up to its end
    offsets, and the bytes of their values."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)  # read_committed: the last stable offsets
        deadline = time.monotonic() + timeout_s
        count = size = 0
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: {count} messages read in {timeout_s} s")
            batches = await consumer.getmany(timeout_ms=500, max_records=50_000)
            for messages in batches.values():
                count += len(messages)
                size += sum(len(m.value or b"") for m in messages)
        return count, size
    finally:
        await consumer.stop()


def committed_consumer(bootstrap: str, topic: str, **kwargs: Any) -> AIOKafkaConsumer:
    """A read_committed consumer of a whole topic from its beginning, as downstream reads it."""
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **kwargs,
    )


async def wait_lifecycle(
    bootstrap: str, topic: str, batch_ids: set[str], event: str, timeout_s: float
) -> tuple[float, list[dict[str, Any]]]:
    """Read lifecycle events until every batch has ``event``; (monotonic time of the last, them)."""
    consumer = committed_consumer(bootstrap, topic)
    await consumer.start()
    seen: dict[str, dict[str, Any]] = {}
    last = time.monotonic()
    try:
        deadline = time.monotonic() + timeout_s
        while len(seen) < len(batch_ids):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(seen)} of {len(batch_ids)} batches {event} in time")
            chunk = await consumer.getmany(timeout_ms=200)
            for messages in chunk.values():
                for msg in messages:
                    raw = msg.value or b""
                    value = json.loads(raw[5:] if raw[:1] == b"\x00" else raw)  # json_sr: framed
                    if value["event"] == event and value["batch_id"] in batch_ids:
                        seen[value["batch_id"]] = value
                        last = time.monotonic()
    finally:
        await consumer.stop()
    return last, list(seen.values())


def rounded(value: float, digits: int = 3) -> float | None:
    """A JSON-friendly figure (None for nan)."""
    return None if math.isnan(value) else round(value, digits)
