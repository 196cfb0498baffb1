"""Broker loss: a three-node cluster loses each broker in turn while two replicas publish.

The cluster is ``scripts/kafka.sh cluster-start`` on ports of its own
(``KAFKA_CLUSTER_TEST_PORT``, default 61092: brokers 61092-61094, controllers
62092-62094, outside Linux's ephemeral port range, so no client socket takes them),
started for this module and stopped after it. The service creates its topics with
replication factor 3; the cluster keeps min.insync.replicas=2, so one broker down
leaves every partition writable.

Two replicas (separate processes) poll batches whose records appear over the whole
run. Each node in turn is SIGKILLed while records are being published, kept down long
enough for the controller to fence it (leaders move, ISRs shrink, and a lost
controller is replaced), then started again with the same properties and data and
waited for until every partition is back in sync. Then every record is on the
balances topic exactly once (read_committed), every batch completed once, both
replicas are still the processes started at the beginning and ready, and their logs
hold few ERROR lines: a broker loss the cluster absorbs is not an error of the service.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from conftest import (
    ROOT,
    ServiceProcess,
    ServiceProcesses,
    SimServer,
    TopicReader,
    Topics,
    service_env,
)
from test_durability import assert_exactly_once, served_ids, track, wait_completed

pytestmark = [pytest.mark.kafka, pytest.mark.cluster, pytest.mark.faults]

CLUSTER_PORT = int(os.environ.get("KAFKA_CLUSTER_TEST_PORT", "61092"))
NODES = 3
CLUSTER_BOOTSTRAP = ",".join(f"127.0.0.1:{CLUSTER_PORT + n}" for n in range(NODES))
# A broker stays down this long: past broker.session.timeout.ms (4 s in scripts/kafka.sh),
# so the controller fences it, moves its leaders and shrinks the ISRs.
DOWN_S = 5.0
# ERROR lines the two replicas may log over the whole run, three broker losses included.
MAX_ERROR_LINES = 10


def cluster_script(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KAFKA_DIR", "KAFKA_CONTROLLER_PORT")}
    env["KAFKA_PORT"] = str(CLUSTER_PORT)
    env.update(extra)
    return subprocess.run(
        [str(ROOT / "scripts" / "kafka.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def kafka_cluster() -> Iterator[str]:
    """A ready three-node cluster; started (and later stopped) here if none was running."""
    started = time.monotonic()
    result = cluster_script("cluster-start")
    if result.returncode != 0:
        cluster_script("cluster-stop")
        pytest.fail(f"cannot start the Kafka cluster:\n{result.stdout}\n{result.stderr}")
    print(f"\ncluster: {result.stdout.strip()} in {time.monotonic() - started:.1f}s")
    yield CLUSTER_BOOTSTRAP
    if "[already running]" not in result.stdout:
        # Its data is thrown away: three nodes stopping at once wait on each other's
        # controlled shutdown for the whole timeout (30 s), so they are killed after 3.
        cluster_script("cluster-stop", KAFKA_STOP_TIMEOUT="3")


async def replication_factors(bootstrap: str, topics: list[str]) -> dict[str, set[int]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    return {t["topic"]: {len(p["replicas"]) for p in t["partitions"]} for t in described}


def log_summary(paths: list[Path]) -> tuple[Counter[str], Counter[str]]:
    """Lines by level (non-JSON lines as "not-json"), and ERROR lines by logger and event."""
    levels: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                levels["not-json"] += 1
                continue
            level = str(entry.get("level", "?")) if isinstance(entry, dict) else "?"
            levels[level] += 1
            if level in ("error", "critical"):
                event = " ".join(str(entry.get("event", "")).split())[:120]
                errors[f"{entry.get('logger', '?')}: {event}"] += 1
    return levels, errors


async def test_each_broker_lost_in_turn_while_two_replicas_publish(
    kafka_cluster: str,
    sim_server: SimServer,
    service_processes: ServiceProcesses,
) -> None:
    run_started = time.monotonic()
    bootstrap = kafka_cluster
    topics = Topics(prefix=f"t{uuid.uuid4().hex[:10]}", partitions=6)
    sim = sim_server.sim
    batches = [str(uuid.uuid4()) for _ in range(4)]
    for i, b in enumerate(batches):
        sim.generate_batch(b, 400 + 100 * i, spread_s=45.0, seed=300 + i)

    replicas: list[ServiceProcess] = []
    for name in ("loss-0", "loss-1"):
        env = service_env(
            topics,
            bootstrap,
            sim_server.url,
            RFP_INSTANCE_ID=name,
            RFP_KAFKA__REPLICATION_FACTOR="3",
        )
        replicas.append(service_processes(env, name))
    for r in replicas:
        r.start()
    await asyncio.gather(*(r.ready() for r in replicas))
    pids = [r.proc.pid for r in replicas if r.proc is not None]
    names = [topics.requests, topics.state, topics.balances, topics.events, topics.dlq]
    assert await replication_factors(bootstrap, names) == {t: {3} for t in names}
    for b in batches:
        await track(bootstrap, topics, b, len(sim.all_records(b)))

    timings: list[str] = []
    try:
        for node in range(1, NODES + 1):
            timings.append(await lose_and_restore(node, replicas, sim_server, topics, batches))
        reader = TopicReader(bootstrap)
        events = await wait_completed(reader, topics, batches, timeout=90)
        balances = await reader.read_all(topics.balances)
    finally:
        levels, errors = log_summary([r.log_path for r in replicas])
        error_lines = levels["error"] + levels["critical"]
        print("\n".join(["", *timings, f"run {time.monotonic() - run_started:.1f}s"]))
        print(f"log lines by level: {dict(levels)}")
        print(f"ERROR {error_lines}, WARNING {levels['warning']}; top ERROR events:")
        for event, n in errors.most_common(8):
            print(f"  {n:5d}  {event}")

    for b in batches:
        assert Counter(events[b]) == {"tracking_started": 1, "completed": 1}, (b, events[b])
    assert_exactly_once(balances, served_ids(sim, batches))
    for r, pid in zip(replicas, pids, strict=True):
        assert r.proc is not None and r.proc.pid == pid and r.proc.poll() is None, r.tail()
        await r.ready(timeout=30)
    assert error_lines <= MAX_ERROR_LINES, (
        f"{error_lines} ERROR lines (at most {MAX_ERROR_LINES}), e.g. {errors.most_common(5)}"
    )


async def lose_and_restore(
    node: int,
    replicas: list[ServiceProcess],
    sim_server: SimServer,
    topics: Topics,
    batches: list[str],
) -> str:
    """SIGKILL one node while records are being published, start it again; what it took."""
    sim = sim_server.sim
    # A batch of its own for each loss, so that records arrive during it whatever the timing.
    extra = str(uuid.uuid4())
    sim.generate_batch(extra, 400, spread_s=15.0, seed=310 + node)
    await track(CLUSTER_BOOTSTRAP, topics, extra, 400)
    batches.append(extra)
    await asyncio.sleep(2.0)
    requests_before = len(sim.request_log)
    killed = await asyncio.to_thread(cluster_script, "node-kill", str(node))
    assert killed.returncode == 0, killed.stdout + killed.stderr
    lost_at = time.monotonic()
    await asyncio.sleep(DOWN_S)
    for r in replicas:
        assert r.proc is not None and r.proc.poll() is None, f"a replica died: {r.tail()}"
    restarted = await asyncio.to_thread(cluster_script, "node-start", str(node))
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    back_at = time.monotonic()
    await asyncio.gather(*(r.ready(timeout=60) for r in replicas))  # /readyz 200 again
    return (
        f"node {node}: down {DOWN_S:.0f}s + restart and ISR {back_at - lost_at - DOWN_S:.1f}s, "
        f"replicas ready {time.monotonic() - back_at:.1f}s later, "
        f"{len(sim.request_log) - requests_before} API requests meanwhile"
    )
