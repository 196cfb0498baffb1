"""End to end: simulator → service → real Kafka → a read_committed consumer.

Several batches (one of over 1,000 records, records appearing across several
polls, a 5xx burst and a 429 in the middle), tracked through each of the three
doors; every record arrives exactly once with the contract's key, fields,
headers and exact balance, and every batch gets its lifecycle events.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from conftest import (
    ADMIN_TOKEN,
    ServiceFactory,
    SimServer,
    TopicReader,
    Topics,
    produce,
    run_cli,
    service_env,
    sim_event_id,
    wait_for,
)
from eventschema import validate_message

from rightfoot_simulator import DEMO_CODES_BATCH_ID, DEMO_MISSING_BATCH_ID, SimRecord
from service.records import status_name

pytestmark = pytest.mark.kafka


def expected_event(batch_id: str, rec: Any) -> dict[str, Any]:
    return {
        "event_id": sim_event_id(batch_id, rec),
        "batch_id": batch_id,
        "authorizer_unique_id": rec.authorizer_unique_id,
        "balance": None if rec.balance is None else str(rec.balance),
        "balance_status_code": rec.balance_status_code,
        "balance_status": status_name(rec.balance_status_code),
        "timestamp": rec.timestamp,
    }


async def post_batch(port: int, body: dict[str, Any], token: str = ADMIN_TOKEN) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"http://127.0.0.1:{port}/v1/batches",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
        ) as resp,
    ):
        return resp.status


async def test_three_doors_every_record_exactly_once(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    start_service: ServiceFactory,
    reader: TopicReader,
) -> None:
    sim = sim_server.sim
    big = str(uuid.uuid4())  # > 1,000 records appearing over several polls
    trickle = str(uuid.uuid4())  # no expected count: completes when idle
    sim.generate_batch(big, 1_234, spread_s=3.0, seed=1)
    sim.generate_batch(trickle, 150, spread_s=2.0, seed=2)
    sim.seed_demo(spread_s=1.0)
    codes_count = len(sim.all_records(DEMO_CODES_BATCH_ID))

    service = await start_service()
    assert service.http_port is not None

    # Door 1: HTTP.
    assert await post_batch(service.http_port, {"batch_id": big, "expected_count": 1234}) == 202
    assert await post_batch(service.http_port, {"batch_id": DEMO_MISSING_BATCH_ID}) == 202
    # Door 2: a message on the requests topic.
    await produce(
        kafka,
        topics.requests,
        DEMO_CODES_BATCH_ID.encode(),
        json.dumps({"batch_id": DEMO_CODES_BATCH_ID, "expected_count": codes_count}).encode(),
    )
    # Door 3: the CLI.
    env = service_env(topics, kafka, sim_server.url)
    cli = run_cli("track", trickle, env=env)
    assert cli.returncode == 0, cli.stderr
    # Tracking the same batch again is one tracking.
    assert await post_batch(service.http_port, {"batch_id": big}) == 202

    # A 5xx burst and a 429 in the middle of the big batch.
    await wait_for(lambda: sum(1 for r in sim.request_log if r.batch_id == big) >= 3, 20, "polls")
    sim.faults.update({"error_5xx_next": 3, "rate_limit_next": 1, "retry_after_s": 1.0})

    outcomes = {big: "completed", trickle: "completed", DEMO_CODES_BATCH_ID: "completed"}
    outcomes[DEMO_MISSING_BATCH_ID] = "failed"

    def finished() -> bool:
        return all(
            (service.view.get(b) or {}).get("status") == outcome for b, outcome in outcomes.items()
        )

    await wait_for(finished, 60, "every batch finished")

    balances = await reader.read_all(topics.balances)
    lifecycle = await reader.read_all(topics.events)

    # Every record exactly once, with key, fields and exact balances.
    got: dict[str, dict[str, Any]] = {}
    for msg in balances:
        value = validate_message("balance", msg.key, msg.value, msg.headers)
        assert msg.key == value["authorizer_unique_id"].encode()
        assert value["event_id"] not in got, f"duplicate event {value}"
        got[value["event_id"]] = value
    expected = {
        e["event_id"]: e
        for b in (big, trickle, DEMO_CODES_BATCH_ID)
        for e in (expected_event(b, r) for r in sim.all_records(b))
    }
    assert got == expected
    headers = dict(balances[0].headers)
    assert headers["ce_specversion"] == b"1.0"
    assert headers["ce_type"] == b"com.rightfoot.balance.retrieved"
    assert headers["content-type"] == b"application/json"

    # Lifecycle: tracking_started once, then the outcome, with per-status counts.
    by_batch: dict[str, list[dict[str, Any]]] = {}
    for msg in lifecycle:
        value = validate_message("batch", msg.key, msg.value, msg.headers)
        by_batch.setdefault(value["batch_id"], []).append(value)
    for batch_id, outcome in outcomes.items():
        events = [e["event"] for e in by_batch[batch_id]]
        assert events == ["tracking_started", outcome], (batch_id, events)
    for batch_id in (big, trickle, DEMO_CODES_BATCH_ID):
        done = by_batch[batch_id][-1]
        want = Counter(status_name(r.balance_status_code) for r in sim.all_records(batch_id))
        assert done["counts_by_status"] == dict(want)
        assert done["records_published"] == len(sim.all_records(batch_id))
    failed = by_batch[DEMO_MISSING_BATCH_ID][-1]
    assert "not_found" in failed["reason"]

    # The demo batch covers every documented code, null balances, an unknown code
    # and balances that a float would not keep.
    codes = {v["balance_status"] for v in got.values() if v["batch_id"] == DEMO_CODES_BATCH_ID}
    assert "UNKNOWN" in codes and "NO_SSN_MATCH" in codes and "SUCCESS" in codes
    demo_balances = {v["balance"] for v in got.values() if v["batch_id"] == DEMO_CODES_BATCH_ID}
    assert None in demo_balances
    assert any(b and len(b.replace("-", "").replace(".", "")) > 17 for b in demo_balances)

    # The faults were served and recovered from; the request pages of the big batch
    # were read with the documented parameters and a User-Agent naming the instance.
    statuses = Counter(r.status for r in sim.request_log)
    assert statuses[429] >= 1 and statuses[500] + statuses[502] + statuses[503] >= 3
    assert {r.instance for r in sim.request_log if r.path == "/v1/balances"} == {"test-0"}

    # Once finished, a batch is polled no more.
    seen = len(sim.request_log)
    await asyncio.sleep(1.0)
    assert all(r.batch_id not in outcomes for r in sim.request_log[seen:])


async def test_a_huge_malformed_record_is_dead_lettered_truncated_and_blocks_nothing(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    start_service: ServiceFactory,
    reader: TopicReader,
) -> None:
    sim = sim_server.sim
    batch = str(uuid.uuid4())
    good = sim.generate_batch(batch, 5, seed=3)
    huge = '{"authorizer_unique_id": 7, "note": "' + "x" * 2_000_000 + '"}'
    sim.add_batch(
        f"{batch}-x",
        [
            *(replace(r, visible_at=0.0) for r in good),
            SimRecord(
                authorizer_unique_id="",
                balance=None,
                balance_status_code=0,
                timestamp="2024-08-09T18:10:44Z",
                visible_at=0.0,
                raw_override=huge,
            ),
        ],
    )
    await start_service()
    bad_batch = f"{batch}-x"
    await produce(
        kafka,
        topics.requests,
        bad_batch.encode(),
        json.dumps({"batch_id": bad_batch, "expected_count": 6}).encode(),
    )
    events = []
    for _ in range(60):
        events = [json.loads(m.value) for m in await reader.read_all(topics.events, idle_s=0.5)]
        if any(e["event"] == "completed" for e in events):
            break
    assert [e["event"] for e in events] == ["tracking_started", "completed"]
    balances = await reader.read_all(topics.balances)
    assert len(balances) == 5
    dlq = await reader.read_all(topics.dlq)
    assert len(dlq) == 1
    value = validate_message("dlq", dlq[0].key, dlq[0].value, dlq[0].headers)
    assert value["raw_truncated"] is True and value["reason"] == "missing_authorizer_unique_id"
    assert len(value["raw"]) == 64 * 1024 and value["raw"].startswith('{"authorizer_unique_id":7')


async def test_a_partition_whose_commits_hang_holds_up_only_its_own_requests(
    kafka: str, topics: Topics, sim_server: SimServer, start_service: ServiceFactory
) -> None:
    """Requests of one partition wait for its commits (their order is the partition's);
    a partition whose commits hang (its leader's broker lost, say) must not hold up the
    requests of the others."""
    from service.kafka import canonical_partition

    topics.partitions = 2
    service = await start_service()
    held, other = (
        next(b for b in (str(uuid.uuid4()) for _ in range(100)) if canonical_partition(b, 2) == p)
        for p in (0, 1)
    )
    for b in (held, other):
        sim_server.sim.generate_batch(b, 5)
    worker = service.tracker.workers[0]
    publish = worker.publisher.publish
    gate, entered = asyncio.Event(), asyncio.Event()

    async def hanging(messages: Any, request_offset: int | None = None) -> None:
        entered.set()
        await gate.wait()
        await publish(messages, request_offset)

    worker.publisher.publish = hanging  # type: ignore[method-assign]
    await produce(kafka, topics.requests, held.encode(), json.dumps({"batch_id": held}).encode())
    await asyncio.wait_for(entered.wait(), 20)
    await produce(kafka, topics.requests, other.encode(), json.dumps({"batch_id": other}).encode())
    workers = service.tracker.workers
    await wait_for(lambda: other in workers[1].batches, 20, "the other partition's request")
    await wait_for(lambda: workers[1].batches[other].published == 5, 20, "its records")
    gate.set()
    await wait_for(
        lambda: getattr(workers[0].batches.get(held), "published", 0) == 5, 20, "the held one's"
    )
