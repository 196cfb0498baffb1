"""Every record, on every data shape the vendor's page allows, through the real service.

The vendor does not document the order of the list. Here the simulator lists
records in submission order while they finish in random order, so most of them
appear behind the cursor of a poller that has already paged past their place;
it may also omit ``total_processed`` or give a count that is wrong, serve pages of its
own size whatever ``limit`` asks, say ``has_more`` on a full last page (an empty page
then ends the list), hand out a page token that leads back to a page already read, let
page tokens expire between polls, or correct a record in place (same timestamp, another
balance).
Every case reads the balances topic with read_committed: every record listed exactly
once, and the lifecycle events say what happened, gaps included.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from decimal import Decimal
from typing import Any, TypedDict

import pytest
import structlog
from conftest import ServiceFactory, SimServer, TopicReader, Topics, sim_event_id, wait_for
from eventschema import validate_message
from test_durability import assert_exactly_once, served_ids, track

from rightfoot_simulator import Simulator
from service.app import PollerService

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


def sweeps(sim: Simulator, batch_id: str) -> int:
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
    start_service: ServiceFactory,
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
    start_service: ServiceFactory,
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
        assert "a read of the whole batch" in final["reason"]  # not on idleness alone


@pytest.mark.parametrize("expected", [None, 300], ids=["no_count", "expected_count"])
async def test_a_count_that_never_reconciles_is_said_in_the_final_event(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: ServiceFactory,
    expected: int | None,
) -> None:
    """The API counts five records it never lists: the batch does not complete as if whole.

    Without an expected count it expires, saying what is missing. With one that it
    reaches, it waits for the five while records still come, then completes after
    idleness, saying what the API counts (one warning line when the count passes it).
    """
    sim = sim_server.sim
    batch = str(uuid.uuid4())
    sim.generate_batch(batch, 300, spread_s=1.0, seed=61, order="submission", count_skew=5)
    with structlog.testing.capture_logs() as logs:
        await start_service(
            RFP_POLLING__COMPLETE_AFTER_IDLE_S="1" if expected is None else "4",
            RFP_POLLING__MAX_AGE_S="12",
            RFP_POLLING__SWEEP_BACKOFF_MAX_S="3",
        )
        await track(kafka, topics, batch, expected)
        events = await final_events(reader, topics, [batch], timeout=60)
    assert_exactly_once(await reader.read_all(topics.balances), served_ids(sim, [batch]))
    (final,) = [e for e in events[batch] if e["event"] != "tracking_started"]
    warned = [e for e in logs if e["event"] == "count_above_expected"]
    if expected is None:
        assert final["event"] == "expired"
        assert "5 of the 305 records the API counts never listed" in final["reason"]
        assert not warned
    else:
        assert final["event"] == "completed" and final["records_published"] == 300
        assert final["reason"] == (
            "300 of 300 expected records published; the API counts 305, 5 never listed "
            "within polling.complete_after_idle_s"
        )
        assert len(warned) == 1 and warned[0]["total_processed"] == 305, warned
    # Sweeps that find nothing are spaced out (polls every 0.2-0.4 s would make ~40).
    assert 2 <= sweeps(sim, batch) <= 15


async def test_a_smaller_count_than_seen_completes(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: ServiceFactory,
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
    # A count below the records seen proves nothing: the batch completes on the one read
    # of the whole batch that its idleness calls for.
    assert sweeps(sim, batch) == 1


class PageShape(TypedDict, total=False):
    """How the simulator lists a batch (``Simulator.generate_batch``'s keywords)."""

    page_size: int
    has_more: str
    order: str
    integers: str


async def test_pages_of_any_size_and_lists_that_end_on_an_empty_page(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: ServiceFactory,
) -> None:
    """Pages shorter and longer than ``limit``, ``has_more`` on every full page, and pages
    without ``has_more``."""
    sim = sim_server.sim
    shapes: list[PageShape] = [
        {"page_size": 7, "has_more": "full_page", "order": "completion"},
        {"page_size": 250, "has_more": "full_page", "order": "submission"},
        {"page_size": 250, "order": "completion"},
        {"page_size": 1, "has_more": "full_page", "order": "submission"},
        {"has_more": "full_page"},
        # No has_more at all (no field is required): only the page token says more follow.
        {"page_size": 50, "has_more": "absent", "order": "submission"},
        # As protobuf writes JSON: the empty page at the end is only {"batch_id": ...}.
        {"page_size": 7, "has_more": "omit_empty", "order": "completion"},
        {"has_more": "absent"},
        # Whole numbers written as a serializer holding doubles writes them: 3300.0.
        {"page_size": 50, "integers": "fraction", "order": "submission"},
    ]
    batches = [str(uuid.uuid4()) for _ in shapes]
    for i, (b, shape) in enumerate(zip(batches, shapes, strict=True)):
        # Counts that end on a full page of each size, appearing over 4 s.
        count = {7: 700, 250: 1000, 1: 120}.get(shape.get("page_size", 0), 400)
        sim.generate_batch(b, count, spread_s=4.0, seed=70 + i, **shape)
    offsets: set[tuple[str, int | None]] = set()
    sim.on_page_request = lambda r: offsets.add((r.batch_id, r.offset))
    await start_service(
        RFP_POLLING__COMPLETE_AFTER_IDLE_S="2", RFP_POLLING__MAX_RECORDS_PER_TRANSACTION="150"
    )
    for i, b in enumerate(batches):
        await track(kafka, topics, b, sim.record_count(b) if i % 2 else None)
    events = await final_events(reader, topics, batches, timeout=90)
    assert_exactly_once(await reader.read_all(topics.balances), served_ids(sim, batches))
    for b in batches:
        (final,) = [e for e in events[b] if e["event"] != "tracking_started"]
        assert (final["event"], final["records_published"]) == ("completed", sim.record_count(b))
    # The first batch was read up to its end, where an empty page says has_more: false,
    # and so was the seventh (without an expected count, like the first: it completes on
    # a read to the end), where the empty page has no balances at all.
    assert (batches[0], sim.record_count(batches[0])) in offsets
    assert (batches[6], sim.record_count(batches[6])) in offsets


@pytest.mark.parametrize("fault", ["token_loop_next", "ignore_token_next"])
async def test_a_page_token_loop_fails_the_poll_and_nothing_else(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: ServiceFactory,
    fault: str,
) -> None:
    """A ``next_page_token`` that leads back to a page already read (``token_loop_next``),
    or an API that ignores the token it is sent and serves the first page again under a
    new one each time (``ignore_token_next``): the poll must end.

    Followed blindly, the poll reads the same page for ever, at the replica's whole request
    rate, and its batch never gets further. The poll is failed as a malformed answer and
    backs off; the other batches carry on; once the API pages properly again, the batch
    completes with every record once.
    """
    sim = sim_server.sim
    looping, other = str(uuid.uuid4()), str(uuid.uuid4())
    sim.generate_batch(looping, 450, seed=80)
    sim.generate_batch(other, 300, spread_s=3.0, seed=81)
    sim.faults.only_batch = looping
    setattr(sim.faults, fault, 1_000_000)
    with structlog.testing.capture_logs() as logs:
        service = await start_service(RFP_POLLING__COMPLETE_AFTER_IDLE_S="1")
        await track(kafka, topics, looping)
        await track(kafka, topics, other)
        events = await final_events(reader, topics, [other], timeout=60)
        await wait_for(lambda: loop_failures(service) >= 3, 30, "three polls ended by the loop")
        requests = sum(1 for r in sim.request_log if r.batch_id == looping)
        # Each failed poll read a few pages before it saw the loop, then backed off.
        assert requests <= 40 * loop_failures(service), requests
        assert [e["event"] for e in events[other]] == ["tracking_started", "completed"]
        setattr(sim.faults, fault, 0)
        events = await final_events(reader, topics, [looping], timeout=60)
    assert_exactly_once(await reader.read_all(topics.balances), served_ids(sim, [looping, other]))
    (final,) = [e for e in events[looping] if e["event"] != "tracking_started"]
    assert (final["event"], final["records_published"]) == ("completed", 450)
    warned = [e for e in logs if e["event"] == "poll_failed" and e["log_level"] == "warning"]
    assert 1 <= len(warned) <= 2, warned  # one line for the cause, not one per poll
    assert "loop" in warned[0]["error"]


def loop_failures(service: PollerService) -> float:
    registry = service.metrics.registry
    value = registry.get_sample_value(
        "rightfoot_poller_invalid_input_total", {"source": "api", "reason": "page_token_loop"}
    )
    return value or 0.0


async def test_a_record_corrected_in_place_is_a_new_event(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: ServiceFactory,
) -> None:
    """Same authorizer, same timestamp, another balance: published again, with a new id.

    The last page is read again by every poll, so a correction there is seen. Before, the
    corrected record had the id of the first version and was dropped as already published.
    """
    sim = sim_server.sim
    batch = str(uuid.uuid4())
    sim.generate_batch(batch, 250, seed=90)
    first = {sim_event_id(batch, r) for r in sim.all_records(batch)}
    last = sim.all_records(batch)[-1]
    await start_service(RFP_POLLING__COMPLETE_AFTER_IDLE_S="4")
    await track(kafka, topics, batch)
    await wait_for(
        lambda: sum(1 for r in sim.request_log if r.batch_id == batch and r.status == 200) >= 4,
        30,
        "a poll after the first",
    )
    balance = (last.balance or Decimal(0)) + Decimal("0.01")
    amended = sim.amend_record(batch, last.authorizer_unique_id, balance=balance)
    assert amended.timestamp == last.timestamp
    events = await final_events(reader, topics, [batch], timeout=60)
    balances = await reader.read_all(topics.balances)
    assert_exactly_once(balances, first | {sim_event_id(batch, amended)})
    (final,) = [e for e in events[batch] if e["event"] != "tracking_started"]
    assert (final["event"], final["records_published"]) == ("completed", 251)
    versions = [
        json.loads(m.value) for m in balances if m.key == last.authorizer_unique_id.encode()
    ]
    assert len(versions) == 2
    assert versions[0]["timestamp"] == versions[1]["timestamp"]
    # In the order published (one key, one partition): the correction comes second.
    assert [v["balance"] for v in versions] == [format(b, "f") for b in (last.balance, balance)]


async def test_a_correction_does_not_stand_in_for_a_record_behind_the_cursor(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: ServiceFactory,
) -> None:
    """A correction is a new event but no new record: the counts go by authorizers.

    The first record finishes late, at the head of the list, behind the cursor; before it
    does, the last record is corrected. Counting events, the batch would have its 250
    records (249 and the correction) and complete without the first one.
    """
    sim = sim_server.sim
    batch = str(uuid.uuid4())
    records = list(sim.generate_batch(str(uuid.uuid4()), 250, seed=91))
    records[0] = dataclasses.replace(records[0], visible_at=20.0)
    records[1:] = [dataclasses.replace(r, visible_at=0.0) for r in records[1:]]
    sim.add_batch(batch, records, order="submission")
    service = await start_service(RFP_POLLING__COMPLETE_AFTER_IDLE_S="3")
    await track(kafka, topics, batch, 250)
    last = records[-1]
    await wait_for(
        lambda: sum(1 for r in sim.request_log if r.batch_id == batch and r.status == 200) >= 4,
        30,
        "a poll after the first",
    )
    amended = sim.amend_record(
        batch, last.authorizer_unique_id, balance=(last.balance or Decimal(0)) + 1
    )

    def relisted() -> float:
        registry = service.metrics.registry
        return registry.get_sample_value("rightfoot_poller_records_relisted_total") or 0.0

    await wait_for(lambda: relisted() == 1, 15, "the correction published")
    assert sim.visible_count(batch) == 249, "the first record has not finished yet"
    events = await final_events(reader, topics, [batch], timeout=60)
    balances = await reader.read_all(topics.balances)
    served = {sim_event_id(batch, r) for r in records}
    assert_exactly_once(balances, served | {sim_event_id(batch, amended)})
    (final,) = [e for e in events[batch] if e["event"] != "tracking_started"]
    assert (final["event"], final["records_published"]) == ("completed", 251)
    # What a consumer reconciles with: 251 events, one of them a correction, 250 records.
    assert (final["records_relisted"], final["records_dead_lettered"]) == (1, 0)


@pytest.mark.parametrize(
    ("order", "with_404"), [("completion", False), ("submission", False), ("submission", True)]
)
async def test_page_tokens_that_expire_between_polls(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: ServiceFactory,
    order: str,
    with_404: bool,
) -> None:
    """Every poll's stored token has expired: each poll reads again from the first page.

    The pages say nothing of how long a token lives. Polls 0.2-0.4 s apart, tokens that
    live 0.1 s: the cursor a poll resumes from is always refused, so the batch is read
    from its first page every time, what was published is recognised, and one warning a
    minute says so, not one per poll. ``with_404``: the expired token is answered 404, as
    if the batch were gone (taken so, the batch failed once the 404s outlasted
    ``polling.not_found_grace_s``).
    """
    sim = sim_server.sim
    sim.faults.reject_token_with_404 = with_404
    batches = [str(uuid.uuid4()) for _ in range(2)]
    for i, b in enumerate(batches):
        sim.generate_batch(b, 450, spread_s=4.0, seed=95 + i, order=order, token_ttl_s=0.1)
    with structlog.testing.capture_logs() as logs:
        service = await start_service(RFP_POLLING__COMPLETE_AFTER_IDLE_S="2")
        for b in batches:
            await track(kafka, topics, b)
        events = await final_events(reader, topics, batches, timeout=90)
    assert_exactly_once(await reader.read_all(topics.balances), served_ids(sim, batches))
    for b in batches:
        (final,) = [e for e in events[b] if e["event"] != "tracking_started"]
        assert (final["event"], final["records_published"]) == ("completed", 450)
    rejected = service.metrics.registry.get_sample_value(
        "rightfoot_poller_invalid_input_total", {"source": "api", "reason": "page_token_rejected"}
    )
    assert rejected is not None and rejected >= 10  # most polls met an expired token
    warned = [
        e for e in logs if e["event"] == "page_token_rejected" and e["log_level"] == "warning"
    ]
    assert len(warned) == 1, warned  # one cause, one line (a minute)


async def test_page_tokens_that_expire_answered_500_for_good(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: ServiceFactory,
) -> None:
    """An expired token is answered 500, every time (a vendor that can no longer open an
    old token), never the 400 that would restart the batch: each poll from the stored
    cursor fails after its retries. Every FAILING_PAGE_POLLS-th failed poll in a row
    reads from the first page instead, so the batch goes on and completes, each record
    once; one warning a minute says so."""
    sim = sim_server.sim
    sim.faults.reject_token_with_500 = True
    batch = str(uuid.uuid4())
    sim.generate_batch(batch, 450, spread_s=4.0, seed=97, order="submission", token_ttl_s=0.1)
    with structlog.testing.capture_logs() as logs:
        service = await start_service(RFP_POLLING__COMPLETE_AFTER_IDLE_S="2")
        await track(kafka, topics, batch)
        events = await final_events(reader, topics, [batch], timeout=120)
    assert_exactly_once(await reader.read_all(topics.balances), served_ids(sim, [batch]))
    (final,) = [e for e in events[batch] if e["event"] != "tracking_started"]
    assert (final["event"], final["records_published"]) == ("completed", 450)
    restarted = service.metrics.registry.get_sample_value(
        "rightfoot_poller_invalid_input_total", {"source": "api", "reason": "page_failing"}
    )
    assert restarted is not None and restarted >= 1
    warned = [e for e in logs if e["event"] == "page_failing" and e["log_level"] == "warning"]
    assert len(warned) == 1, warned


@pytest.mark.parametrize("with_count", [True, False], ids=["expected_count", "no_count"])
async def test_more_to_come_without_a_token_and_a_count_of_minus_one(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: ServiceFactory,
    with_count: bool,
) -> None:
    """Until every record has appeared, the last page says ``has_more: true`` without a
    token (more will come, nothing to ask for it with) and ``total_processed`` is -1 ("not
    counted yet"). Neither refuses a page: its records are published, the poll ends at
    that page and the next reads it again; the count is taken as absent. Each record
    once, the batch completes, and each oddity is counted and logged once."""
    sim = sim_server.sim
    batch = str(uuid.uuid4())
    sim.generate_batch(
        batch,
        600,
        spread_s=5.0,
        seed=98,
        order="submission",
        has_more="pending",
        total_processed="negative",
    )
    with structlog.testing.capture_logs() as logs:
        service = await start_service(RFP_POLLING__COMPLETE_AFTER_IDLE_S="2")
        await track(kafka, topics, batch, 600 if with_count else None)
        events = await final_events(reader, topics, [batch], timeout=90)
    assert_exactly_once(await reader.read_all(topics.balances), served_ids(sim, [batch]))
    (final,) = [e for e in events[batch] if e["event"] != "tracking_started"]
    assert (final["event"], final["records_published"]) == ("completed", 600)
    for reason in ("more_without_token", "total_unusable"):
        counted = service.metrics.registry.get_sample_value(
            "rightfoot_poller_invalid_input_total", {"source": "api", "reason": reason}
        )
        assert counted is not None and counted >= 1, reason
        warned = [
            e
            for e in logs
            if e["event"] == "page_odd" and e["log_level"] == "warning" and e["reason"] == reason
        ]
        assert len(warned) == 1, warned
    malformed = service.metrics.registry.get_sample_value(
        "rightfoot_poller_invalid_input_total", {"source": "api", "reason": "malformed_page"}
    )
    assert malformed == 0


async def test_a_403_for_a_batch_read_before_is_retried_and_the_batch_completes(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: ServiceFactory,
) -> None:
    """A batch the key has read does not become another client's: a 403 in the middle of
    its tracking (a gateway that denies the key for a while) is retried with backoff, and
    the batch goes on and completes, each record once, instead of failing for good."""
    sim = sim_server.sim
    batch = str(uuid.uuid4())
    sim.generate_batch(batch, 400, spread_s=6.0, seed=99, order="submission")
    await start_service(RFP_POLLING__COMPLETE_AFTER_IDLE_S="2")
    await track(kafka, topics, batch)

    for _ in range(100):  # until the first records are published (some 30 s at most)
        if await reader.read_all(topics.balances, idle_s=0.2):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("no record published")
    sim.faults.only_batch = batch
    sim.faults.forbidden_next = 6
    events = await final_events(reader, topics, [batch], timeout=90)
    assert sim.faults.forbidden_next == 0  # every 403 was met
    assert_exactly_once(await reader.read_all(topics.balances), served_ids(sim, [batch]))
    (final,) = [e for e in events[batch] if e["event"] != "tracking_started"]
    assert (final["event"], final["records_published"]) == ("completed", 400)


@pytest.mark.parametrize("counts", ["exact", "absent"])
async def test_runs_of_empty_pages_longer_than_a_poll_reads(
    kafka: str,
    topics: Topics,
    sim_server: SimServer,
    reader: TopicReader,
    start_service: ServiceFactory,
    counts: str,
) -> None:
    """A vendor paging a sparse scan: after every page of records, 12 empty pages that each
    say more follow, more than a poll reads in a row (MAX_EMPTY_PAGES). Records listed in
    submission order appear behind the cursor, past such runs. The ordered reading gets
    past a run over several polls, its cursor kept; so must the sweeps that look for the
    records behind it (and the read of the whole batch that completes it without a count):
    each goes on where the last was cut short. Every record once, and the batch completes.
    """
    sim = sim_server.sim
    batch = str(uuid.uuid4())
    sim.generate_batch(
        batch,
        400,
        spread_s=4.0,
        seed=96,
        order="submission",
        page_size=50,
        gaps=12,
        total_processed=counts,
    )
    await start_service(RFP_POLLING__COMPLETE_AFTER_IDLE_S="2")
    await track(kafka, topics, batch)
    events = await final_events(reader, topics, [batch], timeout=120)
    assert_exactly_once(await reader.read_all(topics.balances), served_ids(sim, [batch]))
    (final,) = [e for e in events[batch] if e["event"] != "tracking_started"]
    assert (final["event"], final["records_published"]) == ("completed", 400)
