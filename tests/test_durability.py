"""Fault injection: the service killed, the broker restarted, the API misbehaving.

Every case reads the balances topic with read_committed and checks that the
records published equal the records served, with no duplicate (exactly_once),
or with duplicates that carry their original event_id (at_least_once).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import signal
import subprocess
import time
import uuid
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import murmur2
from conftest import (
    ROOT,
    ServiceFactory,
    ServiceProcess,
    ServiceProcesses,
    SimServer,
    TopicReader,
    Topics,
    free_port,
    produce,
    service_env,
    sim_event_id,
    wait_for,
)
from eventschema import validate_message

from rightfoot_simulator import PageRequest, Simulator
from service.app import PollerService
from service.kafka import canonical_partition
from service.records import legacy_fingerprint, status_name, timestamp_event_id
from service.state import BatchState, StateRestore, encode_state

pytestmark = [pytest.mark.kafka, pytest.mark.faults]


def served_ids(sim: Simulator, batch_ids: list[str]) -> set[str]:
    return {sim_event_id(b, r) for b in batch_ids for r in sim.all_records(b)}


async def track(kafka: str, topics: Topics, batch_id: str, count: int | None = None) -> None:
    body: dict[str, Any] = {"batch_id": batch_id}
    if count is not None:
        body["expected_count"] = count
    await produce(kafka, topics.requests, batch_id.encode(), json.dumps(body).encode())


async def lifecycle_by_batch(reader: TopicReader, topics: Topics) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for msg in await reader.read_all(topics.events, idle_s=1.0):
        value = validate_message("batch", msg.key, msg.value, msg.headers)
        out.setdefault(value["batch_id"], []).append(value["event"])
    return out


async def wait_completed(
    reader: TopicReader, topics: Topics, batch_ids: list[str], timeout: float
) -> dict[str, list[str]]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        events = await lifecycle_by_batch(reader, topics)
        if all("completed" in events.get(b, []) for b in batch_ids):
            return events
        if loop.time() > deadline:
            raise AssertionError(f"not all batches completed: {events}")
        await asyncio.sleep(1.0)


def assert_exactly_once(balances: list[Any], expected: set[str], note: str = "") -> None:
    """Every served record published once; every event as the schema says.

    ``note`` (a fault seed, say) heads the assertion messages.
    """
    ids = Counter(
        validate_message("balance", m.key, m.value, m.headers)["event_id"] for m in balances
    )
    duplicates = {k: n for k, n in ids.items() if n > 1}
    assert not duplicates, f"{note}{len(duplicates)} duplicated events"
    assert set(ids) == expected, (
        f"{note}missing {len(expected - set(ids))}, unexpected {len(set(ids) - expected)}"
    )


async def test_sigkill_at_random_moments_loses_and_repeats_nothing(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    service_processes: ServiceProcesses,
) -> None:
    """SIGKILLed again and again while the batches' records arrive, then left to finish.

    The moments are random, from a seed that is printed and named in the assertion
    messages; FAULT_SEED=<seed> runs them again. Each life is killed a random 0-3 s
    after it is ready, or (40%) a random 0.2-6 s after it starts, ready or not: while
    it joins the group, restores, or polls for the first time. The first life is
    killed 1-3 s after it is ready, while it polls. No kill is made in the last 2 s of
    the records' arrival: the kills fall over the whole of it, none after. The replica's
    room for uncommitted records is two pages, so its polls also wait for room and
    commit what they hold early.
    """
    seed = int(os.environ.get("FAULT_SEED") or random.randrange(2**32))
    print(f"fault seed {seed}")
    note = f"fault seed {seed}: "
    rng = random.Random(seed)
    sim = sim_server.sim
    spread = 40.0
    batches = [str(uuid.uuid4()) for _ in range(4)]
    for i, b in enumerate(batches):
        # Half in submission order: records appear behind the cursor, found by sweeps,
        # which the kills interrupt too (the first poll after a restart may be one).
        order = "submission" if i % 2 else "completion"
        sim.generate_batch(
            b, 400 + 150 * i, spread_s=spread, seed=rng.randrange(2**32), order=order
        )
    arrival_end = sim.clock() + spread
    total = sum(sim.record_count(b) for b in batches)
    # Room for two pages: the four polls wait for room and commit early (Poll.flush) too.
    env = service_env(
        topics,
        kafka,
        sim_server.url,
        RFP_INSTANCE_ID="killed-0",
        RFP_POLLING__MAX_RECORDS_IN_FLIGHT="200",
    )
    service = service_processes(env, "killed")
    service.start()
    await service.ready()
    for b in batches:
        await track(kafka, topics, b, sim.record_count(b))
    # per kill: (seconds before the last record arrives, records yet to arrive, whether
    # that life had polled)
    kills: list[tuple[float, int, bool]] = []
    while True:
        if not kills:
            delay = rng.uniform(1.0, 3.0)
        elif rng.random() < 0.6:
            await service.ready()
            delay = rng.uniform(0.0, 3.0)
        else:
            delay = rng.uniform(0.2, 6.0)
        if sim.clock() + delay > arrival_end - 2.0:
            break
        await asyncio.sleep(delay)
        instance = service.env["RFP_INSTANCE_ID"]
        kills.append(
            (
                round(arrival_end - sim.clock(), 1),
                total - sum(sim.visible_count(b) for b in batches),
                any(r.instance == instance for r in sim.request_log),
            )
        )
        service.kill()
        service.env["RFP_INSTANCE_ID"] = f"killed-{len(kills)}"
        service.start()
    print(f"kills (s before the last record arrives, records yet to arrive, polled): {kills}")
    assert len(kills) >= 3, f"{note}{kills}"
    assert any(left > 0 and polled for _s, left, polled in kills), f"{note}{kills}"
    half = spread / 2
    assert any(s > half for s, *_ in kills) and any(s < half for s, *_ in kills), (
        f"{note}the kills do not span the records' arrival: {kills}"
    )
    events = await wait_completed(reader, topics, batches, timeout=120)
    balances = await reader.read_all(topics.balances)
    assert_exactly_once(balances, served_ids(sim, batches), note)
    for b in batches:
        assert Counter(events[b]) == {"tracking_started": 1, "completed": 1}, (
            f"{note}{b}: {events[b]}"
        )


@dataclass
class OwnBroker:
    """A broker of a test's own (free ports, data under the test's tmp_path): restarting it
    disturbs no other test on the shared one."""

    bootstrap: str
    env: dict[str, str]

    def sh(self, command: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(ROOT / "scripts" / "kafka.sh"), command],
            env={**self.env, **extra},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[OwnBroker]:
    """Started here, stopped at teardown."""
    plain = free_port()
    env = {
        **os.environ,
        "KAFKA_PORT": str(plain),
        "KAFKA_CONTROLLER_PORT": str(free_port()),
        "KAFKA_DIR": str(tmp_path / "kafka"),
    }
    broker = OwnBroker(f"127.0.0.1:{plain}", env)
    try:
        started = broker.sh("start")
        assert started.returncode == 0, started.stdout + started.stderr
        yield broker
    finally:
        broker.sh("stop")


async def test_broker_restart_mid_run(
    own_broker: OwnBroker,
    topics: Topics,
    sim_server: SimServer,
    service_processes: ServiceProcesses,
) -> None:
    kafka = own_broker.bootstrap
    sim = sim_server.sim
    batches = [str(uuid.uuid4()) for _ in range(3)]
    for i, b in enumerate(batches):
        sim.generate_batch(b, 500, spread_s=25.0, seed=10 + i)
    env = service_env(topics, kafka, sim_server.url, RFP_INSTANCE_ID="broker-restart")
    service = service_processes(env, "broker-restart")
    service.start()
    await service.ready()
    for b in batches:
        await track(kafka, topics, b, 500)
    await asyncio.sleep(5)
    stopped = own_broker.sh("stop")
    assert stopped.returncode == 0, stopped.stderr
    await asyncio.sleep(3)
    restarted = own_broker.sh("start", KAFKA_KEEP_DATA="1")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    reader = TopicReader(kafka)
    await wait_completed(reader, topics, batches, timeout=150)
    balances = await reader.read_all(topics.balances)
    assert_exactly_once(balances, served_ids(sim, batches))
    assert service.proc is not None and service.proc.poll() is None, "the service kept running"


async def test_api_faults_sustained_5xx_429_timeouts_malformed_and_token_400(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: ServiceFactory,
) -> None:
    sim = sim_server.sim
    batches = [str(uuid.uuid4()) for _ in range(3)]
    for i, b in enumerate(batches):
        sim.generate_batch(b, 450, spread_s=12.0, seed=20 + i)
    service = await start_service(RFP_RIGHTFOOT__TIMEOUT_S="0.5")
    for b in batches:
        await track(kafka, topics, b, 450)
    await wait_for(lambda: len(sim.request_log) > 10, 20, "first polls")
    sim.faults.update({"error_5xx_until": sim.clock() + 3.0})  # sustained 5xx
    await asyncio.sleep(3.5)
    sim.faults.update({"rate_limit_next": 3, "retry_after_s": 1.0})
    await asyncio.sleep(1.5)
    sim.faults.update({"hang_next": 3, "hang_s": 2.0})  # timeouts
    await asyncio.sleep(2.0)
    sim.faults.update({"malformed_next": 4})
    await asyncio.sleep(1.0)
    sim.faults.update({"reject_token_next": 2})  # a page token rejected with 400
    sim.invalidate_page_tokens()
    await wait_completed(reader, topics, batches, timeout=90)
    balances = await reader.read_all(topics.balances)
    assert_exactly_once(balances, served_ids(sim, batches))
    codes = Counter(r.status for r in sim.request_log)
    assert codes[429] >= 3 and codes[500] + codes[502] + codes[503] >= 3 and codes[400] >= 1
    registry = service.metrics.registry
    assert (
        registry.get_sample_value(
            "rightfoot_poller_api_requests_total", {"endpoint": "balances", "code": "timeout"}
        )
        or 0
    ) >= 1
    assert (
        registry.get_sample_value(
            "rightfoot_poller_api_requests_total", {"endpoint": "balances", "code": "429"}
        )
        or 0
    ) >= 3


async def test_api_error_after_a_commit_keeps_the_progress_committed_in_that_poll(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: ServiceFactory,
) -> None:
    """A poll commits every 200 records; a later page of the same poll fails.

    The failure is recorded on top of what that poll committed, not on the state the
    poll started from: the next poll goes on from the committed cursor, and nothing
    that was published is published again.
    """
    sim = sim_server.sim
    batch = str(uuid.uuid4())
    sim.generate_batch(batch, 1000, spread_s=0.0, seed=41)
    sim.faults.update({"latency_s": 0.1, "only_batch": batch})
    await start_service(
        RFP_POLLING__MAX_RECORDS_PER_TRANSACTION="200",
        RFP_POLLING__INTERVAL_MIN_S="0.5",
        RFP_POLLING__INTERVAL_MAX_S="1",
    )
    await track(kafka, topics, batch, 1000)

    def pages_served() -> int:
        return sum(1 for r in sim.request_log if r.batch_id == batch and r.status == 200)

    await wait_for(lambda: pages_served() >= 4, 30, "two transactions of the first poll")
    sim.faults.update({"malformed_next": 1, "latency_s": 0.0})
    await wait_completed(reader, topics, [batch], timeout=60)
    assert sim.faults.malformed_next == 0, "the broken page was served"
    balances = await reader.read_all(topics.balances)
    assert_exactly_once(balances, served_ids(sim, [batch]))
    # the next poll resumed from the stored cursor: at most the 10 pages and the one
    # broken page, plus the page read again after it, were served
    assert pages_served() <= 12, pages_served()


async def test_a_batch_stored_by_state_version_1_resumes_without_duplicates(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: ServiceFactory,
) -> None:
    """An upgrade: the stored progress holds version 1 (BLAKE2b) fingerprints, inline.

    The record is written here as version 1 wrote it, not by today's encoder. The
    batch goes on from its first page (no cursor stored) and publishes only the
    records that progress does not hold.
    """
    sim = sim_server.sim
    batch = str(uuid.uuid4())
    sim.generate_batch(batch, 300, spread_s=0.0, seed=43)
    records = sim.all_records(batch)
    done, rest = records[:120], records[120:]
    first = await start_service()  # creates the topics
    await first.stop()

    def event_id(r: Any) -> str:  # the ids of a batch stored before version 4
        return timestamp_event_id(batch, r.authorizer_unique_id, r.timestamp)

    fps = array("Q", [legacy_fingerprint(event_id(r)) for r in done])
    value = json.dumps(
        {
            "v": 1,
            "batch_id": batch,
            "expected_count": 300,
            "generation": 1,
            "status": "tracking",
            "tracked_at": time.time(),
            "cursor": None,
            "published": len(done),
            "dead_lettered": 0,
            "counts": dict(Counter(status_name(r.balance_status_code) for r in done)),
            "seen": base64.b64encode(fps.tobytes()).decode(),
            "last_new_at": None,
            "last_poll_at": None,
            "not_found_since": None,
            "failures": 0,
            "reason": None,
        }
    ).encode()
    await produce(kafka, topics.state, batch.encode(), value)
    await start_service(RFP_INSTANCE_ID="test-upgraded")
    events = await wait_completed(reader, topics, [batch], timeout=60)
    assert events[batch] == ["completed"]
    balances = await reader.read_all(topics.balances)
    assert_exactly_once(balances, {event_id(r) for r in rest})


async def test_a_batch_stored_by_state_version_2_resumes_without_duplicates(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: ServiceFactory,
) -> None:
    """An upgrade from the previous release: a literal version 2 record (tests/fixtures).

    It was written by that release for the batch below with 120 of its 300 records
    published. The batch resumes, publishes the other 180 once, and its next commits
    move its fingerprints into chunks.
    """
    fixture = (Path(__file__).parent / "fixtures" / "state-v2.json").read_bytes().strip()
    batch = json.loads(fixture)["batch_id"]
    sim = sim_server.sim
    sim.generate_batch(batch, 300, spread_s=0.0, seed=43)
    records = sim.all_records(batch)
    first = await start_service()  # creates the topics
    await first.stop()
    await produce(kafka, topics.state, batch.encode(), fixture)
    await start_service(RFP_INSTANCE_ID="test-upgraded", RFP_POLLING__MAX_AGE_S="1e10")
    events = await wait_completed(reader, topics, [batch], timeout=60)
    assert events[batch] == ["completed"]
    balances = await reader.read_all(topics.balances)
    rest = {timestamp_event_id(batch, r.authorizer_unique_id, r.timestamp) for r in records[120:]}
    assert_exactly_once(balances, rest)


async def test_a_batch_stored_by_state_version_3_resumes_without_duplicates(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: ServiceFactory,
) -> None:
    """An upgrade from the previous release: literal version 3 records (tests/fixtures).

    A summary and a fingerprint chunk written by that release for the batch below, with
    120 of its 300 records published. Its events had ids without the record's content
    (``timestamp_event_id``); the batch keeps them until it finishes, so the other 180 are
    published once and the 120 are recognised. Its state is still written as version 3,
    which that release can read back after a rollback.
    """
    lines = (Path(__file__).parent / "fixtures" / "state-v3.jsonl").read_text().splitlines()
    stored = [(json.loads(x)["key"], base64.b64decode(json.loads(x)["value"])) for x in lines]
    batch = stored[-1][0]
    sim = sim_server.sim
    sim.generate_batch(batch, 300, spread_s=0.0, seed=43)
    records = sim.all_records(batch)
    first = await start_service()  # creates the topics
    await first.stop()
    partition = canonical_partition(batch, topics.partitions)  # chunks go with their summary
    for key, value in stored:
        await produce(kafka, topics.state, key.encode(), value, partition)
    await start_service(RFP_INSTANCE_ID="test-upgraded", RFP_POLLING__MAX_AGE_S="1e10")
    events = await wait_completed(reader, topics, [batch], timeout=60)
    assert events[batch] == ["completed"]
    balances = await reader.read_all(topics.balances)
    rest = {timestamp_event_id(batch, r.authorizer_unique_id, r.timestamp) for r in records[120:]}
    assert_exactly_once(balances, rest)
    summaries = [m for m in await reader.read_all(topics.state) if m.key == batch.encode()]
    assert json.loads(summaries[-1].value)["v"] == 3


def batch_in(service: PollerService, batch_id: str) -> BatchState | None:
    """The batch as a running in-process service holds it."""
    for worker in service.tracker.workers.values():
        if batch_id in worker.batches:
            return worker.batches[batch_id]
    return None


def sample(service: PollerService, name: str, **labels: str) -> float:
    return service.metrics.registry.get_sample_value(name, labels) or 0.0


async def stop_request(kafka: str, topics: Topics, batch_id: str) -> None:
    body = json.dumps({"batch_id": batch_id, "action": "stop"}).encode()
    await produce(kafka, topics.requests, batch_id.encode(), body)


async def test_a_batch_stopped_then_tracked_again_across_restarts_publishes_each_record_once(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: ServiceFactory,
) -> None:
    """A stopped batch holds no fingerprints in memory; they are read back from the state
    topic when it is tracked again, before any page: in the replica that stopped it, in a
    replica that restored it stopped, and in one that restored it after it was tracked
    again (the stopped summary still ahead of the chunks that followed it). Records are
    listed in submission order, so sweeps read the batch again from its first page."""
    sim = sim_server.sim
    batch = str(uuid.uuid4())
    sim.generate_batch(batch, 2000, spread_s=14.0, seed=71, order="submission")
    held = "rightfoot_poller_fingerprints_held"
    loaded = "rightfoot_poller_fingerprint_loads_total"

    def published(service: PollerService) -> int:
        b = batch_in(service, batch)
        return 0 if b is None else b.published

    first = await start_service(RFP_INSTANCE_ID="test-stop-a")
    await track(kafka, topics, batch)
    await wait_for(lambda: published(first) >= 200, 30, "records published")
    await stop_request(kafka, topics, batch)
    await wait_for(lambda: getattr(batch_in(first, batch), "status", "") == "stopped", 20, "stop")
    stopped = batch_in(first, batch)
    assert stopped is not None and len(stopped.seen) == 0 and sample(first, held) == 0
    # Tracked again in the replica that stopped it.
    await track(kafka, topics, batch)
    before = published(first)
    await wait_for(lambda: published(first) > before + 150, 30, "more records, after the load")
    assert sample(first, loaded, outcome="loaded") == 1
    await stop_request(kafka, topics, batch)
    await wait_for(lambda: getattr(batch_in(first, batch), "status", "") == "stopped", 20, "stop")
    await first.stop()

    # Restored stopped: nothing in memory until it is tracked again.
    second = await start_service(RFP_INSTANCE_ID="test-stop-b")
    restored = batch_in(second, batch)
    assert restored is not None and restored.status == "stopped" and not restored.seen_loaded
    assert sample(second, held) == 0
    await track(kafka, topics, batch)
    before = published(second)
    await wait_for(lambda: published(second) > before + 150, 30, "more records, after the load")
    assert sample(second, loaded, outcome="loaded") == 1
    await second.stop()

    # Restored active from a log where the stopped summary comes before its new chunks.
    third = await start_service(RFP_INSTANCE_ID="test-stop-c")
    restored = batch_in(third, batch)
    assert restored is not None and restored.active
    await track(kafka, topics, batch, 2000)
    await wait_completed(reader, topics, [batch], timeout=90)
    assert sample(third, loaded, outcome="loaded") == 1
    balances = await reader.read_all(topics.balances)
    assert_exactly_once(balances, served_ids(sim, [batch]))
    events = await lifecycle_by_batch(reader, topics)
    assert events[batch].count("stopped") == 2 and events[batch][-1] == "completed"


async def test_finished_batches_are_forgotten_after_the_retention_and_a_restart_keeps_none(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: ServiceFactory,
) -> None:
    """``polling.finished_retention_s`` 2 s: a completed batch and a stopped one are
    tombstoned on the state topic (the stopped one's fingerprint chunks too), leave the
    replica's memory and GET /v1/batches, and a restart restores neither. Tracking the
    completed one again starts it anew: its records are published a second time, with
    the same event ids."""
    sim = sim_server.sim
    done, stopped = str(uuid.uuid4()), str(uuid.uuid4())
    sim.generate_batch(done, 300, seed=90)
    sim.generate_batch(stopped, 3000, spread_s=20.0, seed=91)
    forgotten = "rightfoot_poller_batches_forgotten_total"
    first = await start_service(RFP_POLLING__FINISHED_RETENTION_S="2")
    await track(kafka, topics, done, 300)
    await track(kafka, topics, stopped)
    await wait_for(
        lambda: getattr(batch_in(first, stopped), "published", 0) >= 300, 30, "records published"
    )
    await stop_request(kafka, topics, stopped)
    await wait_completed(reader, topics, [done], timeout=60)
    await wait_for(
        lambda: (
            sample(first, forgotten, outcome="completed") == 1
            and sample(first, forgotten, outcome="stopped") == 1
        ),
        30,
        "both batches forgotten",
    )
    assert batch_in(first, done) is None and batch_in(first, stopped) is None
    assert sample(first, "rightfoot_poller_finished_batches") == 0
    await wait_for(
        lambda: first.view.get(done) is None and first.view.get(stopped) is None,
        30,
        "GET /v1/batches without them",
    )
    last: dict[bytes, bytes | None] = {}
    for msg in await reader.read_all(topics.state):
        last[msg.key] = msg.value
    theirs = {k for k in last if k.decode().split("/fp/")[0] in (done, stopped)}
    assert f"{stopped}/fp/0".encode() in theirs and done.encode() in theirs
    assert {k: last[k] for k in theirs if last[k] is not None} == {}
    await first.stop()

    second = await start_service(RFP_INSTANCE_ID="test-forget-b")
    assert batch_in(second, done) is None and batch_in(second, stopped) is None
    await track(kafka, topics, done, 300)

    async def done_twice() -> bool:
        return (await lifecycle_by_batch(reader, topics))[done].count("completed") == 2

    for _ in range(60):
        if await done_twice():
            break
        await asyncio.sleep(1.0)
    events = await lifecycle_by_batch(reader, topics)
    assert events[done] == ["tracking_started", "completed"] * 2
    values = [
        validate_message("balance", m.key, m.value, m.headers)
        for m in await reader.read_all(topics.balances)
    ]
    ids = Counter(v["event_id"] for v in values if v["batch_id"] == done)
    assert set(ids) == served_ids(sim, [done]) and set(ids.values()) == {2}


async def test_batches_tracked_again_at_once_share_the_reads_of_their_partition(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: ServiceFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Five batches of one partition, stopped, then tracked again together (as after an
    outage that failed many): each first poll needs the partition read, and the loads
    share reads instead of running five at once; every record is published once."""
    sim = sim_server.sim
    batches: list[str] = []
    while len(batches) < 5:
        batch = str(uuid.uuid4())
        if canonical_partition(batch, topics.partitions) == 0:
            batches.append(batch)
    for n, batch in enumerate(batches):
        sim.generate_batch(batch, 400, spread_s=12.0, seed=80 + n)
    service = await start_service()
    for batch in batches:
        await track(kafka, topics, batch)
    await wait_for(
        lambda: all(getattr(batch_in(service, b), "published", 0) >= 50 for b in batches),
        30,
        "records of every batch",
    )
    for batch in batches:
        await stop_request(kafka, topics, batch)
    await wait_for(
        lambda: all(getattr(batch_in(service, b), "status", "") == "stopped" for b in batches),
        20,
        "every batch stopped",
    )
    owner = service.partitions
    original = owner._read_partition
    reads: list[frozenset[str] | None] = []  # the batches each read is for (None: all)

    async def counted(
        p: int, restore: StateRestore, on_error: Callable[[str | None, ValueError], None]
    ) -> None:
        reads.append(restore.only)
        await original(p, restore, on_error)

    monkeypatch.setattr(owner, "_read_partition", counted)
    producer = AIOKafkaProducer(bootstrap_servers=kafka, enable_idempotence=True)
    await producer.start()
    try:  # the five requests together, as a client resubmitting a list would send them
        for batch in batches:
            body = json.dumps({"batch_id": batch, "expected_count": 400}).encode()
            await producer.send(topics.requests, body, key=batch.encode())
        await producer.flush()
    finally:
        await producer.stop()
    await wait_completed(reader, topics, batches, timeout=90)
    loaded = "rightfoot_poller_fingerprint_loads_total"
    assert sample(service, loaded, outcome="loaded") == 5
    assert None not in reads, reads  # every read one for the loads, none of a whole restore
    assert set().union(*filter(None, reads)) == set(batches)
    assert len(reads) <= 3, reads  # five loads, a read or two (three if the commits lag)
    balances = await reader.read_all(topics.balances)
    assert_exactly_once(balances, served_ids(sim, batches))


async def test_sigterm_during_poll_exits_zero_within_grace(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    service_processes: ServiceProcesses,
) -> None:
    sim = sim_server.sim
    batch = str(uuid.uuid4())
    sim.generate_batch(batch, 600, spread_s=6.0, seed=30)
    grace = 8.0
    env = service_env(
        topics, kafka, sim_server.url, RFP_INSTANCE_ID="sigterm", RFP_SHUTDOWN_GRACE_S=str(grace)
    )
    service = service_processes(env, "sigterm")
    service.start()
    await service.ready()
    await track(kafka, topics, batch, 600)
    await wait_for(lambda: any(r.batch_id == batch for r in sim.request_log), 20, "a poll")
    sim.faults.update({"latency_s": 0.5})  # so that the signal lands during a request
    await asyncio.sleep(0.7)
    sent = time.monotonic()
    service.signal(signal.SIGTERM)
    code = await service.wait(timeout=grace + 5)
    took = time.monotonic() - sent
    assert code == 0, service.tail()
    assert took < grace, f"stopped in {took:.1f}s"
    sim.faults.update({"latency_s": 0.0})
    service.start()
    await service.ready()
    await wait_completed(reader, topics, [batch], timeout=60)
    balances = await reader.read_all(topics.balances)
    assert_exactly_once(balances, served_ids(sim, [batch]))


async def test_at_least_once_loses_nothing_and_duplicates_keep_their_event_id(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    service_processes: ServiceProcesses,
) -> None:
    sim = sim_server.sim
    batches = [str(uuid.uuid4()) for _ in range(3)]
    for i, b in enumerate(batches):
        sim.generate_batch(b, 500, spread_s=15.0, seed=40 + i)
    env = service_env(
        topics, kafka, sim_server.url, RFP_INSTANCE_ID="alo", RFP_KAFKA__DELIVERY="at_least_once"
    )
    service = service_processes(env, "alo")
    service.start()
    await service.ready()
    for b in batches:
        await track(kafka, topics, b, 500)
    rng = random.Random(7)
    for _ in range(4):
        await asyncio.sleep(rng.uniform(0.5, 2.5))
        service.kill()
        service.start()
        await service.ready()
    await wait_completed(reader, topics, batches, timeout=90)
    balances = await reader.read_all(topics.balances)
    by_id: dict[str, set[bytes]] = {}
    for msg in balances:
        value = json.loads(msg.value)
        by_id.setdefault(value["event_id"], set()).add(msg.value)
    assert set(by_id) == served_ids(sim, batches)  # nothing lost
    # A duplicate is the same event: same event_id, same bytes.
    assert all(len(values) == 1 for values in by_id.values())


async def test_401_pauses_polling_turns_readiness_red_and_recovers(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: ServiceFactory,
) -> None:
    sim = sim_server.sim
    batch = str(uuid.uuid4())
    sim.generate_batch(batch, 300, spread_s=6.0, seed=50)
    service = await start_service()
    await track(kafka, topics, batch, 300)
    await wait_for(lambda: any(r.batch_id == batch for r in sim.request_log), 20, "a poll")
    good_keys = sim.api_keys
    sim.set_api_keys(["a-key-the-service-does-not-have"])
    await wait_for(lambda: not service.readiness()[0], 10, "readiness red")
    _ready, detail = service.readiness()
    assert detail["checks"]["api_key_accepted"] is False
    assert service.metrics.registry.get_sample_value("rightfoot_poller_api_unauthorized") == 1
    # Polling stops: only the occasional key probe (every 0.5 s here) reaches the API.
    await asyncio.sleep(0.5)
    before = len(sim.request_log)
    await asyncio.sleep(3.0)
    assert len(sim.request_log) - before <= 8
    view = service.view.get(batch)
    assert view is not None and view["status"] == "tracking"
    sim.set_api_keys(good_keys)
    await wait_for(lambda: service.readiness()[0], 10, "readiness green again")
    await wait_completed(reader, topics, [batch], timeout=60)
    balances = await reader.read_all(topics.balances)
    assert_exactly_once(balances, served_ids(sim, [batch]))


async def test_404_grace_survives_a_restart(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    service_processes: ServiceProcesses,
) -> None:
    missing = str(uuid.uuid4())  # never exists
    env = service_env(
        topics,
        kafka,
        sim_server.url,
        RFP_INSTANCE_ID="grace",
        RFP_POLLING__NOT_FOUND_GRACE_S="6",
    )
    service = service_processes(env, "grace")
    service.start()
    await service.ready()
    await track(kafka, topics, missing)
    await wait_for(
        lambda: sum(1 for r in sim_server.sim.request_log if r.batch_id == missing) >= 2,
        20,
        "two 404s",
    )
    first_404 = min(r.started for r in sim_server.sim.request_log if r.batch_id == missing)
    await asyncio.sleep(2.0)
    service.kill()
    restarted_at = sim_server.sim.clock()
    service.start()
    await service.ready()
    events = await lifecycle_by_batch(reader, topics)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while "failed" not in events.get(missing, []) and loop.time() < deadline:
        await asyncio.sleep(0.5)
        events = await lifecycle_by_batch(reader, topics)
    assert events[missing] == ["tracking_started", "failed"]
    asked = sorted(r.started for r in sim_server.sim.request_log if r.batch_id == missing)
    first_after_restart = min(t for t in asked if t > restarted_at)
    # The grace was counted from the first 404: not over before it...
    assert asked[-1] - first_404 >= 6
    # ...and not counted again from the restart, which would take 6 s from the new
    # process's first 404 (the restart itself takes from 1 to about 10 s: the group may
    # wait out the killed member's session).
    assert asked[-1] - first_after_restart < 6, (first_404, restarted_at, asked[-3:])


# ---- aimed kills: where a SIGKILL hurts most --------------------------------------------


class OpenTransactions:
    """Which partitions of a topic hold records of a transaction still open.

    A partition's high watermark (how far read_uncommitted reads) runs ahead of its last
    stable offset (how far read_committed reads) exactly while a transaction that wrote
    to it is neither committed nor aborted. The watermark is read first, so a
    transaction that ends between the two reads looks ended, never open.
    """

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self.partitions = [TopicPartition(topic, p) for p in range(partitions)]
        self._uncommitted = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, isolation_level="read_uncommitted"
        )
        self._committed = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, isolation_level="read_committed"
        )

    async def __aenter__(self) -> OpenTransactions:
        await self._uncommitted.start()
        await self._committed.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._uncommitted.stop()
        await self._committed.stop()

    async def uncommitted(self) -> dict[int, int]:
        """Records of open transactions, by partition (only partitions that hold some)."""
        high = await self._uncommitted.end_offsets(self.partitions)
        stable = await self._committed.end_offsets(self.partitions)
        return self._open(high, stable)

    async def perhaps_open(self) -> dict[int, int]:
        """``uncommitted`` in one round trip (both reads at once), to aim a kill, never to judge.

        Sooner, but a transaction that ends between the two reads may look open.
        """
        high, stable = await asyncio.gather(
            self._uncommitted.end_offsets(self.partitions),
            self._committed.end_offsets(self.partitions),
        )
        return self._open(high, stable)

    def _open(
        self, high: dict[TopicPartition, int], stable: dict[TopicPartition, int]
    ) -> dict[int, int]:
        return {
            tp.partition: high[tp] - stable[tp] for tp in self.partitions if high[tp] > stable[tp]
        }


async def sigkill_and_reap(service: ServiceProcess) -> None:
    """SIGKILL the service process (from a page hook too); back once it is gone and reaped."""
    proc = service.proc
    assert proc is not None, "the service was never started"
    proc.kill()
    await asyncio.to_thread(proc.wait)


async def test_sigkill_inside_an_open_transaction_aborts_it_and_repeats_nothing(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    service_processes: ServiceProcesses,
) -> None:
    """Killed in the middle of a poll, while its transaction has sent records uncommitted.

    One poll reads 6,000 records, 100 to a page, and commits every 500. Once a poll has
    read a transaction's worth, each of its page requests is held while the transaction
    of the pages before it runs, and the service is SIGKILLed as soon as the broker
    holds records of a transaction still open. (A transaction is open on the broker for
    milliseconds; one of 500 records is sent in several requests, which leaves room to
    land in it. A kill after the commit was sent misses: the service restarts, and the
    next poll is aimed at the same way.) The restart fences the dead producer, which
    aborts the transaction: its records are visible to read_uncommitted only, and
    read_committed sees every record exactly once.
    """
    sim = sim_server.sim
    batch = str(uuid.uuid4())
    # completion order: the hook aims by page offset, which that order's tokens carry
    sim.generate_batch(batch, 6000, spread_s=0.0, seed=60, order="completion")
    per_transaction = 500
    env = service_env(
        topics,
        kafka,
        sim_server.url,
        RFP_POLLING__MAX_RECORDS_PER_TRANSACTION=str(per_transaction),
        RFP_RIGHTFOOT__PAGE_LIMIT="100",
    )
    service = service_processes(env, "txn")
    loop = asyncio.get_running_loop()
    first_page: dict[str | None, PageRequest] = {}  # each instance's first page request
    killed: list[tuple[int | None, dict[int, int]]] = []  # page offset, open records
    # per kill: (page offset, open records seen before it, open records left after it)
    attempts: list[tuple[int | None, dict[int, int], dict[int, int]]] = []
    async with OpenTransactions(kafka, topics.balances, topics.partitions) as txns:

        async def kill_inside_a_transaction(req: PageRequest) -> None:
            first = first_page.setdefault(req.instance, req)
            read = (req.offset or 0) - (first.offset or 0)
            if killed or req.sequence - first.sequence < 2 or read < per_transaction:
                return
            deadline = loop.time() + 0.3
            while loop.time() < deadline:
                if open_now := await txns.perhaps_open():
                    killed.append((req.offset, open_now))
                    await sigkill_and_reap(service)
                    return

        sim.on_page_request = kill_inside_a_transaction
        # Measured alone: the first attempt hit in 7 runs of 12, none needed more than 4.
        # In one whole suite's run all of 5 attempts missed.
        for attempt in range(8):
            service.env["RFP_INSTANCE_ID"] = f"txn-{attempt}"
            killed.clear()
            service.start()
            if attempt == 0:
                await service.ready()
                await track(kafka, topics, batch, 6000)
            # (a restarted service may be killed before its readiness is seen)
            await wait_for(lambda: killed, 60, "a kill inside a transaction")
            await service.wait(timeout=5)
            await asyncio.sleep(0.5)  # a commit sent just before the kill has ended by now
            stuck = await txns.uncommitted()
            attempts.append((*killed[0], stuck))
            if stuck:
                break
        sim.on_page_request = None
    print(f"aimed kills (page offset, open before, open after): {attempts}")
    assert attempts[-1][2], f"every kill came after the commit was sent: {attempts}"
    service.env["RFP_INSTANCE_ID"] = "txn-last"
    service.start()
    await service.ready()
    events = await wait_completed(reader, topics, [batch], timeout=60)
    assert events[batch] == ["tracking_started", "completed"], events[batch]
    committed = await reader.read_all(topics.balances)
    everything = await reader.read_all(topics.balances, isolation_level="read_uncommitted")
    assert_exactly_once(committed, served_ids(sim, [batch]))
    # What read_uncommitted sees on top is the transaction the kill left open, aborted.
    aborted = sum(attempts[-1][2].values())
    assert len(everything) - len(committed) == aborted > 0, attempts


class AimedKill:
    """A page-request hook: SIGKILL the service on the page request that ``aim`` picks.

    ``aim`` gets the request and the page requests of the same instance so far (that
    one included). The page is held until the process is gone, so it is never served.
    """

    def __init__(
        self, service: ServiceProcess, aim: Callable[[PageRequest, list[PageRequest]], bool]
    ):
        self.service = service
        self.aim = aim
        self.requests: dict[str | None, list[PageRequest]] = defaultdict(list)
        self.kills: list[PageRequest] = []

    async def __call__(self, req: PageRequest) -> None:
        mine = self.requests[req.instance]
        mine.append(req)
        if any(k.instance == req.instance for k in self.kills) or not self.aim(req, mine):
            return
        self.kills.append(req)
        await sigkill_and_reap(self.service)


def first_poll_page(n: int, limit: int) -> Callable[[PageRequest, list[PageRequest]], bool]:
    """Aim at the n-th page of an instance's first poll (its first batch, pages in a row)."""

    def aim(req: PageRequest, mine: list[PageRequest]) -> bool:
        pages = [r for r in mine if r.batch_id == mine[0].batch_id]
        start = pages[0].offset
        in_a_row = start is not None and all(
            r.offset == start + i * limit for i, r in enumerate(pages)
        )  # a later poll would start on the last page read again
        return req.batch_id == mine[0].batch_id and len(pages) == n and in_a_row

    return aim


async def test_sigkill_in_the_first_poll_after_a_restart(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    service_processes: ServiceProcesses,
) -> None:
    """A restarted service is killed in its first poll: on its first page request, then
    (after the next restart) on the third page of its first poll, once that poll has
    queued the commit of its first 200 records.

    Each restart resumes from what was committed, and a backlog of records that arrived
    while it was down makes its first poll several pages long.
    """
    sim = sim_server.sim
    batches = [str(uuid.uuid4()) for _ in range(2)]
    for i, b in enumerate(batches):
        sim.generate_batch(b, 2000, spread_s=20.0, seed=70 + i, order="completion")
    limit = 100
    env = service_env(
        topics,
        kafka,
        sim_server.url,
        RFP_INSTANCE_ID="first-0",
        RFP_POLLING__MAX_RECORDS_PER_TRANSACTION="200",
        RFP_RIGHTFOOT__PAGE_LIMIT=str(limit),
    )
    service = service_processes(env, "first")
    service.start()
    await service.ready()
    for b in batches:
        await track(kafka, topics, b, 2000)
    await asyncio.sleep(3.0)
    service.kill()  # while records arrive: a backlog builds up while it is down
    aims = {"first-1": first_poll_page(1, limit), "first-2": first_poll_page(3, limit)}
    hook = AimedKill(
        service, lambda req, mine: req.instance in aims and aims[req.instance](req, mine)
    )
    sim.on_page_request = hook
    for n, instance in enumerate(aims, start=1):
        service.env["RFP_INSTANCE_ID"] = instance
        service.start()  # (killed before it may be seen ready)

        def killed(n: int = n) -> bool:
            return len(hook.kills) == n

        await wait_for(killed, 60, f"the kill of {instance}")
        await service.wait(timeout=5)
    sim.on_page_request = None
    killed_at = [(k.instance, k.batch_id[:8], k.offset) for k in hook.kills]
    print(f"killed at (instance, batch, page offset): {killed_at}")
    first_of_2 = hook.requests["first-2"][0]
    assert hook.kills[1].offset == (first_of_2.offset or 0) + 2 * limit, killed_at
    service.env["RFP_INSTANCE_ID"] = "first-3"
    service.start()
    await service.ready()
    events = await wait_completed(reader, topics, batches, timeout=90)
    balances = await reader.read_all(topics.balances)
    assert_exactly_once(balances, served_ids(sim, batches))
    for b in batches:
        assert events[b] == ["tracking_started", "completed"], events[b]


def partition_of(batch_id: str, partitions: int) -> int:
    """The requests and state partition of a batch: Kafka's default partitioner on its ID."""
    hashed: int = murmur2(batch_id.encode())  # (aiokafka has no type hints)
    return (hashed & 0x7FFFFFFF) % partitions


def batch_ids_on(partition: int, partitions: int, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        b = str(uuid.uuid4())
        if partition_of(b, partitions) == partition:
            out.append(b)
    return out


async def write_old_state(kafka: str, topics: Topics, partition: int, records: int) -> None:
    """Pad a state partition with the history of 50 batches finished long ago.

    Every summary each of them wrote is still there, as in a partition that was not
    yet compacted: ``records`` in all, the last one of each batch ``completed``.
    """
    olds = batch_ids_on(partition, topics.partitions, 50)
    per = records // len(olds)
    history = (
        (b.encode(), encode_state(state))
        for b in olds
        for i in range(per)
        for state in [
            BatchState(
                batch_id=b,
                partition=partition,
                expected_count=per,
                status="completed" if i == per - 1 else "tracking",
                tracked_at=time.time() - 86400,
                published=i + 1,
            )
        ]
    )
    producer = AIOKafkaProducer(bootstrap_servers=kafka, max_batch_size=256 * 1024)
    await producer.start()
    try:
        sent = []
        batch = producer.create_batch()
        for key, value in history:
            if batch.append(key=key, value=value, timestamp=None) is None:
                sent.append(await producer.send_batch(batch, topics.state, partition=partition))
                batch = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
        sent.append(await producer.send_batch(batch, topics.state, partition=partition))
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


def log_events(path: Path, offset: int) -> list[dict[str, Any]]:
    """The service's JSON log lines written from ``offset`` on."""
    out = []
    with path.open("rb") as f:
        f.seek(offset)
        for line in f.read().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


async def wait_for_logged(path: Path, offset: int, event: str, timeout: float) -> dict[str, Any]:
    """The first log line from ``offset`` on with this event, as soon as it is written."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    with path.open("rb") as f:
        f.seek(offset)
        partial = b""
        while loop.time() < deadline:
            chunk = f.read()
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()
            for line in lines:
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if isinstance(entry, dict) and entry.get("event") == event:
                        return entry
            await asyncio.sleep(0.005)
    raise AssertionError(f"{event} not logged within {timeout}s")


async def test_sigkill_during_a_restore(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    service_processes: ServiceProcesses,
) -> None:
    """Killed twice while restoring its state, before it is ready.

    State partition 0 holds 60,000 records (the history of old batches) besides the
    state of a batch being polled: its restore takes 0.5-2 s here, that of partition 1
    (one batch's state) under 0.15 s. After each restart, the service is SIGKILLed as
    soon as it logs its first ``partition_restored``; the log then shows partition 0
    not restored and no ``partitions_assigned``. The last restart finishes the
    batches, exactly once.
    """
    sim = sim_server.sim
    big = 0
    batches = [batch_ids_on(big, topics.partitions, 1)[0], batch_ids_on(1, topics.partitions, 1)[0]]
    for i, b in enumerate(batches):
        sim.generate_batch(b, 1500, spread_s=15.0, seed=80 + i)
    env = service_env(
        topics,
        kafka,
        sim_server.url,
        RFP_INSTANCE_ID="restore-0",
        RFP_POLLING__MAX_RECORDS_PER_TRANSACTION="100",
    )
    service = service_processes(env, "restore")
    service.start()
    await service.ready()  # the topics exist
    await write_old_state(kafka, topics, big, 60_000)
    for b in batches:
        await track(kafka, topics, b, 1500)
    await asyncio.sleep(3.0)
    service.kill()
    restored: list[list[int]] = []  # per kill: the partitions restored by then
    for instance in ("restore-1", "restore-2"):
        service.env["RFP_INSTANCE_ID"] = instance
        offset = service.log_path.stat().st_size
        service.start()
        await wait_for_logged(service.log_path, offset, "partition_restored", timeout=60)
        service.kill()
        life = log_events(service.log_path, offset)
        assert all(e.get("event") != "partitions_assigned" for e in life), service.tail()
        restored.append([e["partition"] for e in life if e.get("event") == "partition_restored"])
    print(f"partitions restored when killed: {restored}")
    assert all(big not in r for r in restored), restored
    service.env["RFP_INSTANCE_ID"] = "restore-3"
    service.start()
    await service.ready()
    events = await wait_completed(reader, topics, batches, timeout=90)
    balances = await reader.read_all(topics.balances)
    assert_exactly_once(balances, served_ids(sim, batches))
    for b in batches:
        assert events[b] == ["tracking_started", "completed"], events[b]
    took = [
        e["took_s"]
        for e in log_events(service.log_path, 0)
        if e.get("event") == "partition_restored" and e.get("partition") == big
    ]
    print(f"restores of partition {big} took {took} s")


async def test_partitions_added_to_the_topics_leave_each_batch_where_its_state_is(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: ServiceFactory,
) -> None:
    """Partitions added to the requests and state topics while batches are tracked: a
    batch's ID now hashes to another partition than the one its state is on. A request for
    it (a client tracking it again, a stop) must still reach it there: tracked again from
    its new partition it would publish every record again, and a stop would miss it. The
    replica that ran through the change takes the new count on at the next rebalance."""
    from aiokafka.admin import AIOKafkaAdminClient, NewPartitions

    sim = sim_server.sim
    topics.partitions = 2
    moved: list[str] = []
    while len(moved) < 3:
        batch = str(uuid.uuid4())
        if canonical_partition(batch, 2) != canonical_partition(batch, 5):
            moved.append(batch)
    again, stopped, left = moved
    for n, batch in enumerate(moved):
        spread = 60.0 if batch == stopped else 12.0  # so that it is stopped before its end
        sim.generate_batch(batch, 400, spread_s=spread, seed=90 + n, order="submission")

    first = await start_service(RFP_INSTANCE_ID="test-added-a")
    for batch in moved:
        await track(kafka, topics, batch, 400)

    def published_some() -> bool:
        return all(getattr(batch_in(first, b), "published", 0) >= 40 for b in moved)

    await wait_for(published_some, 30, "records of each batch published")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        await admin.create_partitions(
            {t: NewPartitions(total_count=5) for t in (topics.requests, topics.state)}
        )
    finally:
        await admin.close()

    second = await start_service(RFP_INSTANCE_ID="test-added-b")  # a rebalance for both
    assert second.tracker.partitions == 5

    def first_took_it_on() -> bool:
        return first.tracker.partitions == 5 and first.view.partitions == 5 and first.view.loaded

    await wait_for(first_took_it_on, 30, "the first replica to take the new count on")
    await track(kafka, topics, again, 400)  # lands on its hash's partition, which has no state
    await stop_request(kafka, topics, stopped)
    events = await wait_completed(reader, topics, [again, left], timeout=90)
    assert events[stopped][-1] == "stopped", events[stopped]
    for batch in moved:
        assert events[batch].count("tracking_started") == 1, (batch, events[batch])
    forwarded = sum(
        sample(s, "rightfoot_poller_tracking_requests_total", action=a, result="forwarded")
        for s in (first, second)
        for a in ("track", "stop")
    )
    assert forwarded >= 2
    balances = await reader.read_all(topics.balances)
    published = {
        validate_message("balance", m.key, m.value, m.headers)["event_id"] for m in balances
    }
    stopped_ids = {sim_event_id(stopped, r) for r in sim.all_records(stopped)} & published
    assert len(stopped_ids) < 400
    assert_exactly_once(balances, served_ids(sim, [again, left]) | stopped_ids)


async def test_no_request_is_taken_before_the_state_view_is_read(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: ServiceFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replica starts after partitions were added, and a request for a batch placed
    before waits on the partition its ID now hashes to. Only the state view tells that
    the batch lives on another partition. Here the view takes 3 s to read and the
    batch's own partition 6 s to restore: a request taken before the view is read would
    be routed by the hash, to where it landed, and would start the batch over (a second
    ``tracking_started``, every record published again)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewPartitions

    from service.partitions import PartitionOwner
    from service.view import StateView

    sim = sim_server.sim
    topics.partitions = 2
    while True:
        batch = str(uuid.uuid4())
        home = canonical_partition(batch, 2)
        if home != canonical_partition(batch, 5):
            break
    sim.generate_batch(batch, 400, spread_s=20.0, seed=95, order="submission")
    first = await start_service(RFP_INSTANCE_ID="test-unread-a")
    await track(kafka, topics, batch, 400)
    await wait_for(
        lambda: getattr(batch_in(first, batch), "published", 0) >= 40, 30, "records published"
    )
    await first.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        await admin.create_partitions(
            {t: NewPartitions(total_count=5) for t in (topics.requests, topics.state)}
        )
    finally:
        await admin.close()
    await track(kafka, topics, batch, 400)  # lands on its hash's partition, without state

    follow, read_state = StateView._follow, PartitionOwner._read_state

    async def slow_follow(view: StateView) -> None:
        await asyncio.sleep(3.0)
        await follow(view)

    async def slow_read_state(
        owner: PartitionOwner, p: int
    ) -> tuple[dict[str, BatchState], dict[str, str]]:
        if p == home:
            await asyncio.sleep(6.0)
        return await read_state(owner, p)

    monkeypatch.setattr(StateView, "_follow", slow_follow)
    monkeypatch.setattr(PartitionOwner, "_read_state", slow_read_state)
    second = await start_service(RFP_INSTANCE_ID="test-unread-b")
    assert second.tracker.partitions == 5
    events = await wait_completed(reader, topics, [batch], timeout=90)
    assert events[batch] == ["tracking_started", "completed"], events[batch]
    balances = await reader.read_all(topics.balances)
    assert_exactly_once(balances, served_ids(sim, [batch]))
