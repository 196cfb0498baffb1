"""The per-record fast paths give exactly what the general code gives.

``balance_event_id`` computes uuid5 without a UUID object, ``parse_page`` takes a
page of valid records in one pass of msgspec, ``parse_record`` skips pydantic when
the fields are of exactly the JSON types it accepts, and
``EventFactory.balance`` writes the event's JSON directly: each is checked here
against the general path on generated input (see bench/ and service/runtime.py
for why they exist).
"""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service import records
from service.errors import ApiMalformedResponse
from service.events import BalanceEvents, EventFactory
from service.records import (
    EVENT_NAMESPACE,
    BalanceRecord,
    balance_event_id,
    parse_record,
    timestamp_event_id,
)

text = st.text(max_size=24)
codes = st.one_of(st.none(), st.integers(-(2**70), 2**70), st.sampled_from([0, 3000, 3300]))
balances = st.one_of(
    st.none(),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.integers(-(10**30), 10**30),
    st.booleans(),
    text,
)
timestamps = st.one_of(
    st.sampled_from(
        ["2024-08-09T12:00:00Z", "2024-08-09T12:00:00.123+02:00", "2024-13-01T00:00:00Z"]
    ),
    text,
    st.integers(),
    st.none(),
)
fields = st.sampled_from(
    ["authorizer_unique_id", "balance", "balance_status_code", "status_code", "timestamp", "x"]
)


@st.composite
def record_items(draw: Any) -> Any:
    item: dict[str, Any] = {
        "authorizer_unique_id": draw(st.one_of(text, st.integers(), st.none())),
        "balance": draw(balances),
        "balance_status_code": draw(st.one_of(codes, st.booleans(), text)),
        "status_code": draw(st.one_of(codes, st.booleans())),
        "timestamp": draw(timestamps),
    }
    for name in draw(st.lists(fields, max_size=3)):
        item.pop(name, None)
    return item


@st.composite
def plausible_items(draw: Any) -> Any:
    """Mostly well-formed records: the shortcut's common case, with its edges."""
    item: dict[str, Any] = {
        "authorizer_unique_id": draw(st.text(min_size=1, max_size=12)),
        "balance": draw(
            st.one_of(st.none(), st.decimals(allow_nan=False, allow_infinity=False), st.integers())
        ),
        "balance_status_code": draw(codes),
        "status_code": draw(codes),
        "timestamp": draw(st.sampled_from(["2024-08-09T12:00:00Z", "2024-08-09t12:00:00.5-01:00"])),
        "institution_id": draw(text),
    }
    for name in draw(st.lists(fields, max_size=2)):
        item.pop(name, None)
    return item


@settings(max_examples=300, deadline=None)
@given(text, text, text, st.one_of(st.none(), st.from_regex(r"-?[0-9]+(\.[0-9]+)?")), codes)
def test_event_id_is_uuid5(
    batch_id: str, uid: str, timestamp: str, balance: str | None, code: int
) -> None:
    shown = "null" if balance is None else balance
    name = f"{batch_id}\x1f{uid}\x1f{timestamp}\x1f{shown}\x1f{code}"
    old_name = f"{batch_id}\x1f{uid}\x1f{timestamp}"
    try:
        expected = str(uuid.uuid5(EVENT_NAMESPACE, name))
        old = str(uuid.uuid5(EVENT_NAMESPACE, old_name))
    except UnicodeEncodeError:
        with pytest.raises(UnicodeEncodeError):
            balance_event_id(batch_id, uid, timestamp, balance, code)
        return
    assert balance_event_id(batch_id, uid, timestamp, balance, code) == expected
    assert timestamp_event_id(batch_id, uid, timestamp) == old


@settings(max_examples=400, deadline=None)
@given(
    batch_id=st.text(min_size=1, max_size=12),
    item=st.one_of(record_items(), plausible_items()),
)
def test_parse_record_same_with_and_without_the_shortcut(batch_id: str, item: Any) -> None:
    fast = parse_record(batch_id, item)
    with mock.patch.object(records, "_exact_fields", lambda _item: None):
        general = parse_record(batch_id, item)
    assert fast == general


@settings(max_examples=300, deadline=None)
@given(
    batch_id=text,
    uid=text,
    balance=st.one_of(st.none(), text, st.decimals(allow_nan=False).map(str)),
    code=st.integers(-(2**70), 2**70),
    timestamp=text,
    event_id=text,
)
def test_balance_event_bytes_match_the_general_path(
    batch_id: str, uid: str, balance: str | None, code: int, timestamp: str, event_id: str
) -> None:
    factory = EventFactory(balances_topic="b", batch_events_topic="e", source="http://x/v1")
    rec = BalanceRecord(uid, balance, code, timestamp, event_id)
    try:
        general = factory._balance_general(batch_id, rec)
    except UnicodeEncodeError:
        with pytest.raises(UnicodeEncodeError):
            factory.balance(batch_id, rec)
        return
    assert factory.balance(batch_id, rec) == general
    # and again for the same batch (what is written once per batch is shared)
    assert factory.balance(batch_id, rec) == general


def test_balance_event_general_path_for_unusual_types() -> None:
    factory = EventFactory(balances_topic="b", batch_events_topic="e", source="http://x/v1")
    rec = BalanceRecord("a", "1.5", True, "2024-08-09T12:00:00Z", "id")
    assert factory.balance("batch", rec) == factory._balance_general("batch", rec)
    assert json.loads(factory.balance("batch", rec).value or b"")["balance_status_code"] is True
    assert factory.balance("", rec) == factory._balance_general("", rec)
    assert Decimal(json.loads(factory.balance("x", rec).value or b"")["balance"]) == Decimal("1.5")


def _general_or_error(batch_id: str, body: bytes, content_ids: bool = True) -> records.Page | str:
    try:
        return records._parse_page_general(batch_id, body, content_ids)
    except ApiMalformedResponse as exc:
        return f"malformed: {exc}"


@st.composite
def page_bodies(draw: Any) -> bytes:
    """Pages as the API might send them: envelope variations, odd records, odd bytes."""
    items = draw(st.lists(st.one_of(plausible_items(), record_items()), max_size=6))
    doc: dict[str, Any] = {"balances": items}
    if draw(st.booleans()):
        # "b" is the batch the tests below ask for, mostly: its own page, another's
        doc["batch_id"] = draw(
            st.one_of(st.sampled_from(["b", "B"]), text, st.none(), st.integers())
        )
    if draw(st.booleans()):
        doc["total_processed"] = draw(st.one_of(st.integers(-(2**70), 2**70), st.none(), text))
    has_more = draw(st.one_of(st.booleans(), st.none(), st.integers(0, 1)))
    if has_more is not None:
        doc["has_more"] = has_more
    if draw(st.booleans()):
        doc["next_page_token"] = draw(st.one_of(text, st.none()))
    for name in draw(st.lists(st.sampled_from(["balances", "has_more", "x"]), max_size=1)):
        doc.pop(name, None)
    body = records.dumps_exact(doc).encode("utf-8", "surrogatepass")
    cut = draw(st.one_of(st.none(), st.integers(0, max(len(body) - 1, 0))))
    if cut is not None and draw(st.integers(0, 4)) == 0:  # now and then: broken bytes
        body = body[:cut] + draw(st.binary(max_size=3)) + body[cut + 1 :]
    return body


@settings(max_examples=500, deadline=None)
@given(
    batch_id=st.one_of(st.just("b"), st.text(min_size=1, max_size=12)),
    body=page_bodies(),
    content_ids=st.booleans(),
)
def test_parse_page_fast_path_agrees_with_the_general_path(
    batch_id: str, body: bytes, content_ids: bool
) -> None:
    fast = records._parse_page_fast(batch_id, body, content_ids)
    general = _general_or_error(batch_id, body, content_ids)
    if fast is not None:
        assert fast == general
    # A page that names another batch is refused, whichever path read it.
    another = (
        not isinstance(general, str)
        and general.batch_id is not None
        and general.batch_id.casefold() != batch_id.casefold()
    )
    if isinstance(general, str) or another:
        with pytest.raises(ApiMalformedResponse):
            records.parse_page(batch_id, body, content_ids=content_ids)
    else:
        assert records.parse_page(batch_id, body, content_ids=content_ids) == general


@settings(max_examples=200, deadline=None)
@given(
    batch_id=st.text(min_size=1, max_size=12),
    items=st.lists(
        st.fixed_dictionaries(
            {
                "authorizer_unique_id": st.text(min_size=1, max_size=12),
                "balance": st.one_of(
                    st.none(), st.decimals(allow_nan=False, allow_infinity=False), st.integers()
                ),
                "balance_status_code": st.integers(0, 9999),
                "timestamp": st.sampled_from(["2024-08-09T12:00:00Z", "2024-08-09T12:00:01.5Z"]),
            }
        ),
        max_size=5,
    ),
)
def test_parse_page_fast_path_takes_pages_of_valid_records(
    batch_id: str, items: list[dict[str, Any]]
) -> None:
    body = records.dumps_exact({"balances": items, "has_more": False}).encode(
        "utf-8", "surrogatepass"
    )
    general = _general_or_error(batch_id, body)
    assert isinstance(general, records.Page)
    if general.invalid:  # e.g. a lone surrogate in an ID: only the general path dead-letters
        assert records._parse_page_fast(batch_id, body) is None
        return
    fast = records._parse_page_fast(batch_id, body)
    assert fast == general
    # exactly the built-in types, which the event writer's own fast path requires
    assert fast is not None and all(
        type(r) is BalanceRecord and type(r.balance) in (str, type(None)) for r in fast.records
    )


def test_parse_page_fast_path_keeps_every_digit() -> None:
    body = (
        b'{"balances":[{"authorizer_unique_id":"a","balance":98765432109876543.21,'
        b'"balance_status_code":0,"timestamp":"2024-08-09T12:00:00Z"},'
        b'{"authorizer_unique_id":"b","balance":1E-7,"status_code":3200,'
        b'"timestamp":"2024-08-09T12:00:00Z"},'
        b'{"authorizer_unique_id":"c","balance":123456789012345678901234567890,'
        b'"balance_status_code":0,"timestamp":"2024-08-09T12:00:00Z"}],"has_more":false}'
    )
    page = records._parse_page_fast("b-1", body)
    assert page is not None
    assert [r.balance for r in page.records] == [
        "98765432109876543.21",
        "0.0000001",
        "123456789012345678901234567890",
    ]
    assert [r.balance_status_code for r in page.records] == [0, 3200, 0]


@settings(max_examples=200, deadline=None)
@given(
    batch_id=st.one_of(text, st.just("b-1")),
    rows=st.lists(
        st.tuples(
            st.text(min_size=1, max_size=12),
            st.one_of(st.none(), st.decimals(allow_nan=False).map(str), st.booleans()),
            st.one_of(st.integers(-(2**70), 2**70), st.booleans()),
            text,
            text,
        ),
        max_size=6,
    ),
)
def test_balance_events_of_a_poll_match_the_general_path(
    batch_id: str, rows: list[tuple[Any, ...]]
) -> None:
    factory = EventFactory(balances_topic="b", batch_events_topic="e", source="http://x/v1")
    recs = [BalanceRecord(*row) for row in rows]
    try:
        general = [factory._balance_general(batch_id, rec) for rec in recs]
    except UnicodeEncodeError:
        with pytest.raises(UnicodeEncodeError):
            list(BalanceEvents(factory, batch_id, recs))
        return
    events = BalanceEvents(factory, batch_id, recs)
    assert len(events) == len(recs)
    assert list(events) == general
    assert [("b", *wire) for wire in events.wire()] == [m[:4] for m in general]
