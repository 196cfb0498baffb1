"""Every record, on every data shape the vendor's page allows, through the real service.

The vendor does not document the order of the list. Here the simulator lists
records in submission order while they finish in random order, so most of them
appear behind the cursor of a poller that has already paged past their place;
it may also omit ``total_processed`` or give a count that is wrong. Every case
reads the balances topic with read_committed: every record listed exactly once,
and the lifecycle events say what happened, gaps included.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from conftest import SimServer, TopicReader, Topics
from eventschema import validate_message
from test_durability import assert_exactly_once, served_ids, track

pytestmark = [pytest.mark.kafka]


async def final_events(
    reader: TopicReader, topics: Topics, batch_ids: list[str], timeout: float
) -> dict[str, list[dict[str, Any]]]:
    """Every lifecycle event of each batch, once each has a final one."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        out: dict[str, list[dict[str, Any]]] = {}
        for msg in await reader.read_all(topics.events, idle_s=1.0):
            value = validate_message("batch", msg.key, msg.value, msg.headers)
            out.setdefault(value["batch_id"], []).append(value)
        if all(any(e["event"] != "tracking_started" for e in out.get(b, [])) for b in batch_ids):
            return out
        if loop.time() > deadline:
            raise AssertionError(f"not all batches finished: {out}")
        await asyncio.sleep(1.0)


def sweeps(sim: Any, batch_id: str) -> int:
    """Requests for the first page of a batch after its first one: reads from the start."""
    firsts = [
        r
        for r in sim.request_log
        if r.batch_id == batch_id and r.status == 200 and "nextPageToken" not in r.query
    ]
    return len(firsts) - 1


@pytest.mark.parametrize("with_count", [True, False], ids=["expected_count", "no_count"])
async def test_records_that_finish_behind_the_cursor_are_all_published_once(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: Any,
    with_count: bool,
) -> None:
    sim = sim_server.sim
    batches = [str(uuid.uuid4()) for _ in range(2)]
    for i, b in enumerate(batches):
        sim.generate_batch(b, 1200 + 300 * i, spread_s=8.0, seed=50 + i, order="submission")
    service = await start_service(
        RFP_POLLING__COMPLETE_AFTER_IDLE_S="3", RFP_POLLING__MAX_RECORDS_PER_TRANSACTION="250"
    )
    for b in batches:
        await track(kafka, topics, b, sim.record_count(b) if with_count else None)
    events = await final_events(reader, topics, batches, timeout=90)
    balances = await reader.read_all(topics.balances)
    assert_exactly_once(balances, served_ids(sim, batches))
    for b in batches:
        final = [e for e in events[b] if e["event"] != "tracking_started"]
        assert [e["event"] for e in final] == ["completed"]
        assert final[0]["records_published"] == sim.record_count(b)
        assert sweeps(sim, b) >= 1  # the records behind the cursor were found by sweeping
    found = service.metrics.registry.get_sample_value("rightfoot_poller_sweep_records_total")
    assert found is not None and found > 0


@pytest.mark.parametrize("with_count", [True, False], ids=["expected_count", "no_count"])
async def test_without_total_processed_full_reads_find_them(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: Any,
    with_count: bool,
) -> None:
    sim = sim_server.sim
    batch = str(uuid.uuid4())
    sim.generate_batch(
        batch, 900, spread_s=6.0, seed=60, order="submission", total_processed="absent"
    )
    await start_service(RFP_POLLING__COMPLETE_AFTER_IDLE_S="3", RFP_POLLING__SWEEP_INTERVAL_S="2")
    await track(kafka, topics, batch, 900 if with_count else None)
    events = await final_events(reader, topics, [batch], timeout=90)
    assert_exactly_once(await reader.read_all(topics.balances), served_ids(sim, [batch]))
    (final,) = [e for e in events[batch] if e["event"] != "tracking_started"]
    assert final["event"] == "completed"
    assert "total_processed" not in final
    if not with_count:
        assert "full read" in final["reason"]  # not completed on idleness alone


async def test_a_count_that_never_reconciles_is_said_in_the_final_event(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: Any,
) -> None:
    """The API counts five records it never lists: the batch does not complete as if whole."""
    sim = sim_server.sim
    batch = str(uuid.uuid4())
    sim.generate_batch(batch, 300, spread_s=1.0, seed=61, order="submission", count_skew=5)
    await start_service(
        RFP_POLLING__COMPLETE_AFTER_IDLE_S="1",
        RFP_POLLING__MAX_AGE_S="12",
        RFP_POLLING__SWEEP_BACKOFF_MAX_S="3",
    )
    await track(kafka, topics, batch)
    events = await final_events(reader, topics, [batch], timeout=60)
    assert_exactly_once(await reader.read_all(topics.balances), served_ids(sim, [batch]))
    (final,) = [e for e in events[batch] if e["event"] != "tracking_started"]
    assert final["event"] == "expired"
    assert "5 of the 305 records the API counts never listed" in final["reason"]
    # Sweeps that find nothing are spaced out (polls every 0.2-0.4 s would make ~40).
    assert 2 <= sweeps(sim, batch) <= 15


async def test_a_smaller_count_than_seen_completes(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: Any,
) -> None:
    sim = sim_server.sim
    batch = str(uuid.uuid4())
    sim.generate_batch(batch, 200, spread_s=1.0, seed=62, count_skew=-20)
    await start_service(RFP_POLLING__COMPLETE_AFTER_IDLE_S="1")
    await track(kafka, topics, batch)
    events = await final_events(reader, topics, [batch], timeout=60)
    assert_exactly_once(await reader.read_all(topics.balances), served_ids(sim, [batch]))
    (final,) = [e for e in events[batch] if e["event"] != "tracking_started"]
    assert final["event"] == "completed"
    assert sweeps(sim, batch) == 0
