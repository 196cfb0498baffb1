"""Property tests: what the API, the requests topic or the state topic send us never crashes us.

Each parser may refuse its input only with its own typed error; a page's good records
survive whatever else is on the page.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from service.errors import ApiMalformedResponse, RequestRejected
from service.records import Page, balance_event_id, parse_page
from service.requests import TrackingRequest, decode_request
from service.seen import SeenSet
from service.state import BatchState, decode_state, encode_state

FUZZ = settings(max_examples=200, deadline=None)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=8,
)
record_like = st.fixed_dictionaries(
    {},
    optional={
        "authorizer_unique_id": json_values,
        "balance": json_values,
        "timestamp": json_values,
        "balance_status_code": json_values,
        "status_code": json_values,
    },
)


def parse_or_refuse(body: bytes) -> Page | None:
    try:
        page = parse_page("fuzz-batch", body)
    except ApiMalformedResponse:
        return None
    assert isinstance(page, Page)
    return page


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_into_parse_page(body: bytes) -> None:
    parse_or_refuse(body)


@FUZZ
@given(json_values)
def test_arbitrary_json_into_parse_page(value: Any) -> None:
    parse_or_refuse(json.dumps(value).encode())


@FUZZ
@given(
    st.lists(json_values | record_like, max_size=6),
    st.booleans(),
    st.none() | st.text(max_size=10),
)
def test_arbitrary_records_in_a_valid_envelope(
    items: list[Any], has_more: bool, token: str | None
) -> None:
    body = {"balances": items, "has_more": has_more, "next_page_token": token}
    page = parse_or_refuse(json.dumps(body).encode())
    if page is not None:
        assert len(page.records) + len(page.invalid) == len(items)
        for bad in page.invalid:
            assert bad.reason
            json.loads(bad.raw)


good_records = st.fixed_dictionaries(
    {
        "authorizer_unique_id": st.text(min_size=1, max_size=12),
        "balance": st.none()
        | st.decimals(places=2, min_value=-(10**20), max_value=10**20).map(str),
        "timestamp": st.datetimes(
            min_value=datetime(1970, 1, 1), max_value=datetime(2100, 1, 1)
        ).map(lambda d: d.strftime("%Y-%m-%dT%H:%M:%SZ")),
        "balance_status_code": st.sampled_from([0, 3000, 3001, 3100, 3300, 9000, 4242]),
    }
)


def record_json(record: dict[str, Any]) -> str:
    balance = "null" if record["balance"] is None else record["balance"]
    fields = {k: v for k, v in record.items() if k != "balance"}
    return json.dumps(fields)[:-1] + f', "balance": {balance}}}'


@FUZZ
@given(st.lists(st.tuples(st.booleans(), good_records, json_values | record_like), max_size=6))
def test_good_records_survive_any_neighbours(rows: list[tuple[bool, Any, Any]]) -> None:
    items: list[str] = []
    good: list[dict[str, Any]] = []
    for is_good, record, junk in rows:
        if is_good:
            good.append(record)
            items.append(record_json(record))
        else:
            items.append(json.dumps(junk))
    body = '{"balances": [' + ",".join(items) + '], "has_more": false}'
    page = parse_page("b", body.encode())
    assert len(page.records) + len(page.invalid) == len(items)
    # Every good record is there, unchanged and in order, whatever surrounds it.
    parsed = iter(page.records)
    for record in good:
        balance = None if record["balance"] is None else format(Decimal(record["balance"]), "f")
        uid, code, timestamp = (
            record["authorizer_unique_id"],
            record["balance_status_code"],
            record["timestamp"],
        )
        expected = (
            uid,
            balance,
            code,
            timestamp,
            balance_event_id("b", uid, timestamp, balance, code),
        )
        assert any(
            (r.authorizer_unique_id, r.balance, r.balance_status_code, r.timestamp, r.event_id)
            == expected
            for r in parsed
        ), expected


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_into_decode_request(value: bytes) -> None:
    try:
        req = decode_request(value)
    except RequestRejected:
        return
    assert isinstance(req, TrackingRequest)


@FUZZ
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "batch_id": json_values,
            "expected_count": json_values,
            "action": json_values,
            "other": json_values,
        },
    )
)
def test_arbitrary_request_documents(doc: dict[str, Any]) -> None:
    try:
        req = decode_request(json.dumps(doc).encode())
    except RequestRejected:
        return
    assert set(doc) <= {"batch_id", "expected_count", "action"}
    assert req.batch_id == doc["batch_id"]
    assert req.action in ("track", "stop")
    assert req.expected_count is None or 1 <= req.expected_count <= 100_000_000


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_into_decode_state(value: bytes) -> None:
    try:
        decode_state(value, partition=0)
    except ValueError:
        return


VALID_STATE = json.loads(
    encode_state(BatchState(batch_id="b", partition=0, seen=SeenSet({1, 2, 3}), tracked_at=1.0))
)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(sorted(VALID_STATE)) | st.text(max_size=8), json_values, max_size=4
    )
)
def test_corrupted_state_documents(changes: dict[str, Any]) -> None:
    doc = {**VALID_STATE, **changes}
    try:
        state = decode_state(json.dumps(doc).encode(), partition=2)
    except ValueError:
        return
    assert isinstance(state, BatchState)
    assert state.partition == 2
