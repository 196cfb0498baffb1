"""A batch of 300,000 records, SIGKILLed halfway: published exactly once, state kept small.

The simulator generates the batch lazily and lists it in submission order, so that most
records finish behind the poller's cursor and are found by sweeps, before and after the
kill and in the first polls of the new process. The service
runs as its own process; it is killed once about half of the records are
published, started again, and must carry on from what it committed: every
record once (read_committed), one ``completed``, and no state record larger than
a fingerprint chunk, whatever the batch size.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer
from conftest import ServiceProcesses, SimServer, Topics, service_env, sim_event_id
from prometheus_client.parser import text_string_to_metric_families
from test_durability import track

from service.state import CHUNK_FPS, MAX_SUMMARY_BYTES, parse_key

pytestmark = [pytest.mark.kafka, pytest.mark.faults]

RECORDS = 300_000


async def published(port: int) -> float:
    """Balance events the service process has committed so far (0 if it does not answer)."""
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/metrics") as resp,
        ):
            text = await resp.text()
    except aiohttp.ClientError:
        return 0.0
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "rightfoot_poller_records_published_total"
    )


async def read_topic(
    kafka: str, topic: str, want: int | None, timeout: float, keep: Callable[[Any], Any]
) -> list[Any]:
    """``keep(message)`` of every committed message of a topic: ``want`` of them, or all
    once it is quiet. Only what ``keep`` returns is held, so that the test process stays
    small (its children inherit its peak RSS in their wait4() figures)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    out: list[Any] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        quiet = 0
        # With ``want``, wait for that many however long the gaps (a restart waits out the
        # killed member's session; records behind the cursor come with sweeps): only the
        # timeout ends it early. Without, stop once quiet for 3 s.
        while loop.time() < deadline and (len(out) < want if want is not None else quiet < 10):
            chunk = await consumer.getmany(timeout_ms=300, max_records=20_000)
            got = [keep(m) for msgs in chunk.values() for m in msgs]
            out.extend(got)
            quiet = 0 if got else quiet + 1
        # A little longer, to see a duplicate that would come after the expected count.
        extra = await consumer.getmany(timeout_ms=1500)
        out.extend(keep(m) for msgs in extra.values() for m in msgs)
        return out
    finally:
        await consumer.stop()


def event_id(message: Any) -> str:
    ce_id: bytes = dict(message.headers)["ce_id"]
    return ce_id.decode()


async def test_a_300k_batch_killed_halfway_is_published_exactly_once(
    kafka: str, topics: Topics, sim_server: SimServer, service_processes: ServiceProcesses
) -> None:
    sim = sim_server.sim
    batch = str(uuid.uuid4())
    sim.generate_batch(batch, RECORDS, spread_s=20.0, seed=300, lazy=True)
    env = service_env(topics, kafka, sim_server.url, RFP_INSTANCE_ID="big")
    service = service_processes(env, "big")
    service.start()
    await service.ready()
    await track(kafka, topics, batch, RECORDS)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120
    while (done := await published(service.port)) < RECORDS / 2:
        assert loop.time() < deadline, f"only {done} records published"
        await asyncio.sleep(0.1)
    service.kill()
    assert done < RECORDS  # killed mid-batch
    service.start()
    await service.ready()

    ids = Counter(await read_topic(kafka, topics.balances, RECORDS, 240, event_id))
    duplicates = sum(n - 1 for n in ids.values() if n > 1)
    expected = {sim_event_id(batch, r) for r in sim.iter_records(batch)}
    assert duplicates == 0
    assert len(ids) == RECORDS
    assert set(ids) == expected

    events = await read_topic(kafka, topics.events, None, 30, lambda m: json.loads(m.value))
    assert [e["event"] for e in events] == ["tracking_started", "completed"]
    assert events[-1]["records_published"] == RECORDS

    # The state topic: no record grows with the batch, and the finished batch's
    # fingerprint chunks are tombstoned (only its summary is left once compacted).
    state = await read_topic(kafka, topics.state, None, 30, lambda m: (m.key, m.value))
    largest = max(len(v or b"") for _, v in state)
    assert largest <= 2 + 8 * CHUNK_FPS
    assert all(len(v) <= MAX_SUMMARY_BYTES for k, v in state if parse_key(k)[1] is None)
    last = dict(state)
    assert [parse_key(k) for k, v in last.items() if v is not None] == [(batch, None)]
    written = sum(len(k) + len(v or b"") for k, v in state)
    assert written / RECORDS <= 32
