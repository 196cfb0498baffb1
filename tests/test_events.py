"""Balance, dead-letter and lifecycle messages: exactly the contract's key, value and headers."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from eventschema import parse_rfc3339, validate_message

from service.events import EventFactory
from service.records import parse_page

BATCH = "5d3c6bbb-fc1a-46a4-93da-1ce4a54b0d83"
SOURCE = "https://api.rightfoot.com/v1/balances"
PAGE = """{"batch_id": "5d3c6bbb-fc1a-46a4-93da-1ce4a54b0d83", "has_more": false, "balances": [
 {"authorizer_unique_id": "1286672", "balance": -83.68, "timestamp": "2024-08-09T18:10:44Z",
  "balance_status_code": 0, "status_code": 0},
 {"authorizer_unique_id": "Zoë-ü-1", "balance": 123456789012345678.91,
  "timestamp": "2024-08-09T17:51:34Z", "status_code": 3001},
 {"authorizer_unique_id": "1258831", "balance": null, "timestamp": "2024-08-09T17:55:25Z",
  "balance_status_code": 4242},
 {"authorizer_unique_id": "1258832", "balance": 0.10, "timestamp": "2024-08-09T17:55:25+02:00",
  "balance_status_code": 0},
 {"balance": 12.5, "timestamp": "2024-08-09T17:55:25Z", "balance_status_code": 0},
 "not an object"
]}""".encode()


@pytest.fixture
def factory() -> EventFactory:
    return EventFactory(
        balances_topic="rightfoot.balances",
        batch_events_topic="rightfoot.batch-events",
        source=SOURCE,
    )


def headers_of(headers: list[tuple[str, bytes]]) -> dict[str, bytes]:
    names = [name for name, _ in headers]
    assert len(names) == len(set(names)), f"duplicate headers: {names}"
    return dict(headers)


def test_balance_event_is_exactly_the_contract(factory: EventFactory) -> None:
    page = parse_page(BATCH, PAGE)
    rec = page.records[0]
    msg = factory.balance(BATCH, rec)
    assert msg.topic == "rightfoot.balances"
    assert msg.key == b"1286672"
    assert msg.value is not None
    value = json.loads(msg.value.decode("utf-8"))
    assert value == {
        "event_id": rec.event_id,
        "batch_id": BATCH,
        "authorizer_unique_id": "1286672",
        "balance": "-83.68",
        "balance_status_code": 0,
        "balance_status": "SUCCESS",
        "timestamp": "2024-08-09T18:10:44Z",
    }
    assert isinstance(value["balance_status_code"], int)
    h = headers_of(msg.headers)
    assert h["ce_specversion"] == b"1.0"
    assert h["ce_id"] == rec.event_id.encode()
    assert h["ce_type"] == b"com.rightfoot.balance.retrieved"
    assert h["ce_source"] == SOURCE.encode()
    assert h["ce_time"] == b"2024-08-09T18:10:44Z"
    assert h["content-type"] == b"application/json"
    assert uuid.UUID(rec.event_id).version == 5


def test_balance_value_is_utf8_json_with_string_balances(factory: EventFactory) -> None:
    page = parse_page(BATCH, PAGE)
    by_id = {r.authorizer_unique_id: r for r in page.records}
    msg = factory.balance(BATCH, by_id["Zoë-ü-1"])
    assert msg.key == "Zoë-ü-1".encode()
    assert msg.value is not None
    assert "Zoë-ü-1".encode() in msg.value  # UTF-8, not \\u escapes
    value = json.loads(msg.value.decode("utf-8"))
    assert value["balance"] == "123456789012345678.91"
    assert value["balance_status_code"] == 3001
    assert value["balance_status"] == "NO_SSN_MATCH"
    # The number never went through a float: its JSON type is a string.
    assert b'"balance":"123456789012345678.91"' in msg.value.replace(b" ", b"")

    unknown = json.loads(factory.balance(BATCH, by_id["1258831"]).value or b"")
    assert unknown["balance"] is None
    assert (unknown["balance_status_code"], unknown["balance_status"]) == (4242, "UNKNOWN")
    trailing = json.loads(factory.balance(BATCH, by_id["1258832"]).value or b"")
    assert trailing["balance"] == "0.10"


def test_every_produced_event_matches_the_published_schemas(factory: EventFactory) -> None:
    page = parse_page(BATCH, PAGE)
    assert len(page.records) == 4
    assert len(page.invalid) == 2
    for rec in page.records:
        msg = factory.balance(BATCH, rec)
        assert msg.value is not None
        doc = validate_message("balance", msg.key, msg.value, msg.headers, source=SOURCE)
        assert doc["event_id"] == rec.event_id
    for bad in page.invalid:
        msg = factory.invalid(BATCH, bad)
        assert msg.topic == "rightfoot.balances.dlq"
        assert msg.value is not None
        doc = validate_message("dlq", msg.key, msg.value, msg.headers, source=SOURCE)
        assert doc["reason"] == bad.reason
        assert doc["raw"] == bad.raw
    counts = {"SUCCESS": 2, "NO_SSN_MATCH": 1, "UNKNOWN": 1}
    for event in ("tracking_started", "completed", "expired", "failed", "stopped"):
        msg = factory.lifecycle(
            BATCH,
            event,
            generation=2,
            tracked_at=0.0,
            expected_count=4 if event == "completed" else None,
            records_published=4,
            counts_by_status=counts,
            reason=None if event == "tracking_started" else f"{event}: because",
            records_dead_lettered=2,
        )
        assert msg.value is not None
        validate_message("batch", msg.key, msg.value, msg.headers)


def test_dlq_event_carries_the_raw_record_and_reason(factory: EventFactory) -> None:
    bad = parse_page(BATCH, PAGE).invalid[0]
    msg = factory.invalid(BATCH, bad)
    assert msg.key == BATCH.encode()
    value = json.loads(msg.value or b"")
    assert value["reason"] == "missing_authorizer_unique_id"
    assert json.loads(value["raw"]) == {
        "balance": 12.5,
        "timestamp": "2024-08-09T17:55:25Z",
        "balance_status_code": 0,
    }
    h = headers_of(msg.headers)
    assert h["ce_type"] == b"com.rightfoot.balance.invalid"
    assert h["ce_id"] == bad.event_id.encode()


def test_lifecycle_event_value_and_headers(factory: EventFactory) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    msg = factory.lifecycle(
        BATCH,
        "completed",
        generation=1,
        tracked_at=0.0,
        expected_count=3,
        records_published=3,
        counts_by_status={"SUCCESS": 2, "INSTITUTION_NOT_SUPPORTED": 1},
        records_dead_lettered=0,
    )
    after = datetime.now(UTC) + timedelta(seconds=1)
    assert msg.topic == "rightfoot.batch-events"
    assert msg.key == BATCH.encode()
    value = json.loads(msg.value or b"")
    assert value["batch_id"] == BATCH
    assert value["event"] == "completed"
    assert value["counts_by_status"] == {"SUCCESS": 2, "INSTITUTION_NOT_SUPPORTED": 1}
    assert value["records_published"] == 3
    assert value["expected_count"] == 3
    assert before <= parse_rfc3339(value["at"]) <= after
    h = headers_of(msg.headers)
    assert h["ce_type"] == b"com.rightfoot.batch.completed"
    assert h["ce_specversion"] == b"1.0"
    assert h["ce_id"] == value["event_id"].encode()
    assert h["ce_time"] == value["at"].encode()
    assert h["content-type"] == b"application/json"


def test_failed_event_carries_its_reason(factory: EventFactory) -> None:
    msg = factory.lifecycle(
        BATCH,
        "failed",
        generation=1,
        tracked_at=0.0,
        expected_count=None,
        records_published=0,
        reason="404",
    )
    value = json.loads(msg.value or b"")
    assert value["reason"] == "404"
    assert value["counts_by_status"] == {}
    assert value["records_dead_lettered"] == 0
    assert value["records_relisted"] == 0


def test_terminal_events_say_how_many_were_relisted(factory: EventFactory) -> None:
    for event in ("completed", "expired", "failed", "stopped"):
        msg = factory.lifecycle(
            BATCH,
            event,
            generation=1,
            tracked_at=0.0,
            expected_count=None,
            records_published=302,
            records_dead_lettered=1,
            records_relisted=3,
            total_processed=300,
            reason="r",
        )
        assert msg.value is not None
        value = json.loads(msg.value)
        assert (value["records_relisted"], value["total_processed"]) == (3, 300), event
        validate_message("batch", msg.key, msg.value, msg.headers)
    started = factory.lifecycle(
        BATCH,
        "tracking_started",
        generation=1,
        tracked_at=0.0,
        expected_count=None,
        records_published=0,
    )
    assert "records_relisted" not in json.loads(started.value or b"")


def lifecycle_id(factory: EventFactory, batch: str, generation: int, event: str) -> str:
    msg = factory.lifecycle(
        batch,
        event,
        generation=generation,
        tracked_at=0.0,
        expected_count=None,
        records_published=0,
    )
    return str(json.loads(msg.value or b"")["event_id"])


def test_lifecycle_event_ids_are_deterministic_per_batch_generation_event(
    factory: EventFactory,
) -> None:
    other_factory = EventFactory(
        balances_topic="x.balances", batch_events_topic="x.events", source="https://h/v1/balances"
    )
    a = lifecycle_id(factory, BATCH, 1, "tracking_started")
    assert a == lifecycle_id(factory, BATCH, 1, "tracking_started")
    assert a == lifecycle_id(other_factory, BATCH, 1, "tracking_started")
    ids = {
        lifecycle_id(factory, batch, generation, event)
        for batch in (BATCH, "other")
        for generation in (1, 2)
        for event in ("tracking_started", "completed", "stopped")
    }
    assert len(ids) == 12


@pytest.mark.parametrize("event", ["started", "complete", "", "COMPLETED", "deleted"])
def test_unknown_lifecycle_event_refused(factory: EventFactory, event: str) -> None:
    with pytest.raises(ValueError, match="unknown lifecycle event"):
        factory.lifecycle(
            BATCH, event, generation=1, tracked_at=0.0, expected_count=None, records_published=0
        )
