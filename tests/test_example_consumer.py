"""The example consumer, run as its users would run it, against what the service published."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from decimal import Decimal

import pytest
from conftest import ROOT, ServiceFactory, SimServer, TopicReader, Topics, produce, wait_for

pytestmark = pytest.mark.kafka


async def test_example_consumer_prints_each_event_once_with_exact_balances(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    start_service: ServiceFactory,
    reader: TopicReader,
) -> None:
    sim = sim_server.sim
    batch = str(uuid.uuid4())
    records = sim.generate_batch(batch, 150, seed=9)
    service = await start_service()
    await produce(
        kafka,
        topics.requests,
        batch.encode(),
        json.dumps({"batch_id": batch, "expected_count": 150}).encode(),
    )
    await wait_for(
        lambda: (service.view.get(batch) or {}).get("status") == "completed", 30, "completed"
    )
    # A duplicate, as at_least_once may deliver after a crash: the consumer must skip it.
    first = (await reader.read_all(topics.balances))[0]
    await produce(kafka, topics.balances, first.key, first.value)

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "examples" / "consumer.py"),
        "--bootstrap-servers",
        kafka,
        "--topic",
        topics.balances,
        "--group-id",
        f"example-{uuid.uuid4().hex[:6]}",
        "--idle-timeout",
        "3",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    printed = [json.loads(line) for line in out.decode().splitlines()]
    assert len(printed) == 150
    assert len({p["event_id"] for p in printed}) == 150
    served = {r.authorizer_unique_id: r.balance for r in records}
    for p in printed:
        want = served[p["authorizer_unique_id"]]
        assert (Decimal(p["balance"]) if p["balance"] is not None else None) == want
