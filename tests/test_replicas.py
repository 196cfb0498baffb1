"""Scale out: replicas share the batches through the consumer group and take over a dead one's.

Three replicas as separate processes, thirty batches with records appearing over
time; one replica is SIGKILLed mid-run, a fourth joins later, and a fifth joins and
leaves again, so that partitions go to it and back to where they were (A to B to
A). Every page takes the API 0.2-0.5 s, so polls are in flight across the
rebalances. Every record arrives exactly once, every batch completes exactly once,
and the simulator's request log shows no batch requested by two instances in
overlapping periods.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import uuid
from collections import Counter, defaultdict
from typing import Any

import pytest
from conftest import ServiceProcesses, SimServer, TopicReader, Topics, produce, service_env
from eventschema import validate_message
from test_durability import assert_exactly_once, served_ids, wait_completed

from rightfoot_simulator import PageRequest

pytestmark = pytest.mark.kafka


def overlapping_requests(log: list[Any]) -> list[tuple[Any, Any]]:
    """Pairs of requests for the same batch, from different instances, that overlap in time."""
    by_batch: dict[str, list[Any]] = defaultdict(list)
    for entry in log:
        if entry.path == "/v1/balances" and entry.batch_id:
            by_batch[entry.batch_id].append(entry)
    clashes = []
    for entries in by_batch.values():
        entries.sort(key=lambda e: e.started)
        latest_end: dict[str, float] = {}
        for e in entries:
            for instance, ended in latest_end.items():
                if instance != e.instance and ended > e.started:
                    clashes.append((instance, e))
            latest_end[e.instance] = max(latest_end.get(e.instance, 0.0), e.ended)
    return clashes


def handed_back(log: list[Any]) -> dict[str, list[str | None]]:
    """Batches polled by one instance, then another, then the first again (A, B, A).

    Each batch's page requests in time order, as the runs of one instance after another.
    """
    runs: dict[str, list[str | None]] = defaultdict(list)
    for entry in sorted(log, key=lambda e: e.started):
        if entry.path == "/v1/balances" and entry.batch_id:
            owners = runs[entry.batch_id]
            if not owners or owners[-1] != entry.instance:
                owners.append(entry.instance)
    return {
        b: owners
        for b, owners in runs.items()
        if any(owners[i] == owners[i + 2] for i in range(len(owners) - 2))
    }


async def test_replicas_share_batches_and_take_over_a_dead_one(
    kafka: str,
    sim_server: SimServer,
    reader: TopicReader,
    service_processes: ServiceProcesses,
) -> None:
    topics = Topics(prefix=f"t{uuid.uuid4().hex[:10]}", partitions=12)
    sim = sim_server.sim
    batches = [str(uuid.uuid4()) for _ in range(30)]
    for i, b in enumerate(batches):
        sim.generate_batch(b, 60 + 7 * i, spread_s=50.0, seed=100 + i)

    def replica(name: str) -> Any:
        env = service_env(topics, kafka, sim_server.url, RFP_INSTANCE_ID=name)
        return service_processes(env, name)

    replicas = [replica(f"replica-{n}") for n in range(3)]
    for r in replicas:
        r.start()
    await asyncio.gather(*(r.ready() for r in replicas))
    for b in batches:
        body = {"batch_id": b, "expected_count": len(sim.all_records(b))}
        await produce(kafka, topics.requests, b.encode(), json.dumps(body).encode())

    latency = random.Random(5)

    async def slow_page(_req: PageRequest) -> None:
        await asyncio.sleep(latency.uniform(0.2, 0.5))

    sim.on_page_request = slow_page
    await asyncio.sleep(8)
    replicas[1].signal(signal.SIGKILL)  # mid-run, no goodbye
    await asyncio.sleep(6)
    fourth = replica("replica-3")
    fourth.start()
    await fourth.ready()
    await asyncio.sleep(4)
    passing = replica("replica-4")  # takes partitions over, then hands them back
    passing.start()
    await passing.ready()

    def passing_polled() -> bool:
        return any(e.instance == "replica-4" and e.path == "/v1/balances" for e in sim.request_log)

    # Until it polls what it took over (the rebalance that gives it partitions may end
    # after it reports ready with none, later on a loaded machine), then a little more.
    for _ in range(300):
        if passing_polled():
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(2)
    passing.signal(signal.SIGTERM)
    assert await passing.wait(timeout=15) == 0, passing.tail()

    events = await wait_completed(reader, topics, batches, timeout=120)
    for b in batches:
        assert Counter(events[b]) == {"tracking_started": 1, "completed": 1}, (b, events[b])

    balances = await reader.read_all(topics.balances)
    for msg in balances[:200]:
        validate_message("balance", msg.key, msg.value, msg.headers)
    assert_exactly_once(balances, served_ids(sim, batches))

    instances = Counter(e.instance for e in sim.request_log if e.path == "/v1/balances")
    assert {f"replica-{n}" for n in range(5)} <= set(instances), instances
    back = handed_back(sim.request_log)
    print(f"{len(back)} batches handed over and back, e.g. {next(iter(back.values()), None)}")
    assert back, "no batch went from one replica to another and back"
    clashes = overlapping_requests(sim.request_log)
    assert not clashes, f"{len(clashes)} overlapping requests, e.g. {clashes[:3]}"
