"""Parsing ``GET /v1/balances`` pages: exact balances, status codes, invalid records apart."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from service.errors import ApiMalformedResponse
from service.records import (
    MAX_RAW_CHARS,
    BalanceRecord,
    InvalidRecord,
    authorizer_fingerprint,
    balance_event_id,
    fingerprint,
    legacy_fingerprint,
    parse_page,
    parse_record,
    timestamp_event_id,
)

BATCH = "5d3c6bbb-fc1a-46a4-93da-1ce4a54b0d83"

# The 200 example of the vendor's page, verbatim (as JSON).
VENDOR_EXAMPLE = b"""{
  "batch_id": "5d3c6bbb-fc1a-46a4-93da-1ce4a54b0d83",
  "total_processed": 3,
  "balances": [
    {"authorizer_unique_id": "1286672", "balance": -83.68,
     "timestamp": "2024-08-09T18:10:44Z", "balance_status_code": 0, "status_code": 0},
    {"authorizer_unique_id": "1258580", "balance": 3851.09,
     "timestamp": "2024-08-09T17:51:34Z", "balance_status_code": 0, "status_code": 0},
    {"authorizer_unique_id": "1258831", "balance": null,
     "timestamp": "2024-08-09T17:55:25Z", "balance_status_code": 3300, "status_code": 3300}
  ],
  "has_more": true,
  "next_page_token": "eyJ0ZXN0IjogImN1cnNvciJ9"
}"""


def page_of(
    *items: str, has_more: bool = False, token: str | None = None, batch_id: str = "b"
) -> bytes:
    """A page body whose records are given as raw JSON text (to keep their exact digits)."""
    text = '{"batch_id":' + json.dumps(batch_id) + ',"balances":[' + ",".join(items) + "]"
    text += f',"has_more":{json.dumps(has_more)}'
    if token is not None:
        text += f',"next_page_token":{json.dumps(token)}'
    return (text + "}").encode()


def record_text(balance: str = "1.00", **fields: Any) -> str:
    doc: dict[str, Any] = {
        "authorizer_unique_id": "a-1",
        "timestamp": "2024-08-09T18:10:44Z",
        "balance_status_code": 0,
    }
    doc.update(fields)
    body = json.dumps(doc)
    return body[:-1] + f', "balance": {balance}}}'


def one_record(text: str) -> BalanceRecord:
    page = parse_page("b", page_of(text))
    assert page.invalid == []
    assert len(page.records) == 1
    return page.records[0]


def one_invalid(text: str) -> InvalidRecord:
    page = parse_page("b", page_of(text))
    assert page.records == []
    assert len(page.invalid) == 1
    return page.invalid[0]


def test_vendor_example_page() -> None:
    page = parse_page(BATCH, VENDOR_EXAMPLE)
    assert page.batch_id == BATCH
    assert page.total_processed == 3
    assert page.has_more is True
    assert page.next_page_token == "eyJ0ZXN0IjogImN1cnNvciJ9"
    assert page.invalid == []
    got = [
        (r.authorizer_unique_id, r.balance, r.balance_status_code, r.balance_status, r.timestamp)
        for r in page.records
    ]
    assert got == [
        ("1286672", "-83.68", 0, "SUCCESS", "2024-08-09T18:10:44Z"),
        ("1258580", "3851.09", 0, "SUCCESS", "2024-08-09T17:51:34Z"),
        ("1258831", None, 3300, "INSTITUTION_NOT_SUPPORTED", "2024-08-09T17:55:25Z"),
    ]
    for r in page.records:
        assert r.event_id == balance_event_id(
            BATCH, r.authorizer_unique_id, r.timestamp, r.balance, r.balance_status_code
        )


def test_last_page_has_no_token() -> None:
    page = parse_page("b", page_of(record_text(), has_more=False, token="ignored"))
    assert page.has_more is False
    assert page.next_page_token is None


def test_has_more_defaults_to_false_and_empty_page_is_fine() -> None:
    page = parse_page("b", b'{"balances": []}')
    assert (page.has_more, page.next_page_token, page.records, page.invalid) == (
        False,
        None,
        [],
        [],
    )


# Both paths: a valid record alone goes through the fast one; beside a record to
# dead-letter, through the general one.
BOTH_PATHS = pytest.mark.parametrize("beside", [(), ("[]",)], ids=["fast", "general"])


@BOTH_PATHS
def test_a_page_without_has_more_that_gives_a_token_has_a_next_page(beside: tuple[str]) -> None:
    """No field of the vendor's schema is required. Taken as the last page, a page without
    ``has_more`` would leave the pages after it unread; its token says there are more."""
    body = '{"balances":[' + ",".join([record_text(), *beside]) + '],"next_page_token":"t2"}'
    page = parse_page("b", body.encode())
    assert (page.has_more, page.next_page_token, len(page.records)) == (True, "t2", 1)
    ended = parse_page("b", ('{"balances":[' + ",".join([record_text(), *beside]) + "]}").encode())
    assert (ended.has_more, ended.next_page_token) == (False, None)


@BOTH_PATHS
def test_a_page_of_another_batch_is_refused(beside: tuple[str]) -> None:
    """Published as this batch's, its records would be wrong for good; an ID echoed in
    another case is the same batch."""
    items = (record_text(), *beside)
    with pytest.raises(ApiMalformedResponse, match="of batch 'other'"):
        parse_page("b", page_of(*items, batch_id="other"))
    assert len(parse_page(BATCH, page_of(*items, batch_id=BATCH.upper())).records) == 1


@BOTH_PATHS
@pytest.mark.parametrize(
    "balance",
    ["1e999999999", "-1E+100", "0." + "0" * 98 + "1", "1" * 101, "-" + "9" * 100, "9" * 5000],
)
def test_a_balance_too_long_to_write_is_dead_lettered_alone(
    balance: str, beside: tuple[str]
) -> None:
    """Written out in plain digits, 1e999999999 would take a gigabyte; 5,000 digits are past
    what CPython reads as an int (and would have failed the whole page)."""
    good = record_text(authorizer_unique_id="good")
    page = parse_page("b", page_of(record_text(balance=balance), good, *beside))
    assert [r.authorizer_unique_id for r in page.records] == ["good"]
    bad = page.invalid[0]
    assert bad.reason == "invalid_balance" and "over 100 characters" in bad.detail
    assert len(bad.raw) <= MAX_RAW_CHARS


@pytest.mark.parametrize("balance", ["1" * 100, "-" + "9" * 99, "-0." + "0" * 96 + "1", "1E+99"])
def test_a_balance_of_up_to_100_characters_keeps_its_digits(balance: str) -> None:
    text = one_record(record_text(balance=balance)).balance
    assert text is not None and len(text) <= 100 and Decimal(text) == Decimal(balance)


@BOTH_PATHS
def test_a_timestamp_too_long_is_dead_lettered(beside: tuple[str]) -> None:
    long = "2024-08-09T18:10:44." + "1" * 50 + "Z"
    page = parse_page("b", page_of(record_text(timestamp=long), *beside))
    assert page.records == [] and page.invalid[0].reason == "invalid_field"
    assert one_record(record_text(timestamp="2024-08-09T18:10:44.123456789+05:30"))


@BOTH_PATHS
def test_a_field_named_twice_keeps_its_last_value_as_the_vendors_samples_read_it(
    beside: tuple[str],
) -> None:
    twice = record_text(balance="1.00")[:-1] + ', "balance": 2.00}'
    (rec,) = parse_page("b", page_of(twice, *beside)).records
    assert rec.balance == "2.00" and json.loads(twice)["balance"] == 2.0


def test_a_leap_second_is_dead_lettered_for_a_person_to_look_at() -> None:
    bad = one_invalid(record_text(timestamp="2016-12-31T23:59:60Z"))
    assert bad.reason == "invalid_field" and "timestamp" in bad.detail


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("123456789012345678.91", "123456789012345678.91"),
        ("98765432109876543.21", "98765432109876543.21"),
        ("-0.01", "-0.01"),
        ("0.10", "0.10"),
        ("-83.68", "-83.68"),
        ("1E+3", "1000"),
        ("1e5", "100000"),
        ("2.5e-3", "0.0025"),
        ("5", "5"),
        ("-7", "-7"),
        ("0", "0"),
        ("100000000000000000000000000001", "100000000000000000000000000001"),
    ],
)
def test_balance_keeps_exactly_the_digits_sent(raw: str, expected: str) -> None:
    assert one_record(record_text(balance=raw)).balance == expected


def test_null_and_missing_balance() -> None:
    rec = one_record(record_text(balance="null", balance_status_code=3000))
    assert rec.balance is None
    assert rec.balance_status == "NO_TAX_ID_MATCH"
    missing = json.dumps(
        {"authorizer_unique_id": "x", "timestamp": "2024-08-09T18:10:44Z", "status_code": 9000}
    )
    rec = one_record(missing)
    assert rec.balance is None
    assert rec.balance_status == "OTHER_ERROR"


def test_unknown_fields_are_tolerated() -> None:
    text = record_text(institution_id="ins_3", extra={"nested": [1, 2]})
    assert one_record(text).authorizer_unique_id == "a-1"
    body = json.loads(page_of(record_text()))
    body["something_new"] = {"x": 1}
    assert len(parse_page("b", json.dumps(body).encode()).records) == 1


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (0, "SUCCESS"),
        (3000, "NO_TAX_ID_MATCH"),
        (3001, "NO_SSN_MATCH"),
        (3100, "NO_DOB_MATCH"),
        (3200, "ACCOUNT_CLOSED"),
        (3300, "INSTITUTION_NOT_SUPPORTED"),
        (3310, "INSTITUTION_IN_TESTING"),
        (3400, "NO_AUTHORIZER_MATCH"),
        (9000, "OTHER_ERROR"),
        (3500, "UNKNOWN"),
        (-1, "UNKNOWN"),
        (1, "UNKNOWN"),
    ],
)
def test_status_names(code: int, name: str) -> None:
    rec = one_record(record_text(balance="null", balance_status_code=code))
    assert rec.balance_status_code == code
    assert rec.balance_status == name


def test_status_code_is_the_fallback_and_balance_status_code_wins() -> None:
    legacy = json.dumps(
        {"authorizer_unique_id": "x", "timestamp": "2024-08-09T18:10:44Z", "status_code": 3001}
    )
    assert one_record(legacy).balance_status_code == 3001
    both = record_text(balance="null", balance_status_code=3200, status_code=3300)
    assert one_record(both).balance_status_code == 3200
    assert one_record(both).balance_status == "ACCOUNT_CLOSED"
    null_new = record_text(balance="null", balance_status_code=None, status_code=3310)
    assert one_record(null_new).balance_status_code == 3310


@pytest.mark.parametrize("legacy", ['"x"', "0.5", "true", "[3300]", '{"code": 1}'])
def test_a_status_code_that_is_not_read_does_not_set_the_record_aside(legacy: str) -> None:
    """``status_code`` is read only when ``balance_status_code`` is missing: whatever it
    holds beside a valid ``balance_status_code`` is no reason to dead-letter the record."""
    text = (
        record_text(balance="2.00", balance_status_code=3200)[:-1] + f', "status_code": {legacy}}}'
    )
    record = one_record(text)
    assert (record.balance_status_code, record.balance) == (3200, "2.00")
    # With balance_status_code missing, the same status_code is read, and refused.
    missing = record_text(balance="2.00")
    missing = missing.replace('"balance_status_code": 0', f'"status_code": {legacy}')
    assert one_invalid(missing).reason == "invalid_field"


@pytest.mark.parametrize(
    ("written", "code"), [("3300.0", 3300), ("3.3e3", 3300), ("0.0", 0), ("-0", 0), ("9E+3", 9000)]
)
def test_whole_numbers_written_with_a_fraction_or_an_exponent_are_integers(
    written: str, code: int
) -> None:
    """The vendor's schema is OpenAPI 3.1 (JSON Schema 2020-12), whose ``integer`` takes
    any number with a zero fraction: a serializer holding numbers as doubles writes
    ``3300.0``. Refused, every record of such a vendor would be dead-lettered, and a page
    whose ``total_processed`` is one would stop its batch for good."""
    text = record_text(balance="1.00").replace(
        '"balance_status_code": 0', f'"balance_status_code": {written}'
    )
    assert one_record(text).balance_status_code == code
    legacy = record_text(balance="1.00").replace(
        '"balance_status_code": 0', f'"status_code": {written}'
    )
    assert one_record(legacy).balance_status_code == code
    # The same record written either way is the same event.
    plain = record_text(balance="1.00").replace(
        '"balance_status_code": 0', f'"balance_status_code": {code}'
    )
    assert one_record(text).event_id == one_record(plain).event_id
    body = b'{"batch_id": "b", "balances": [], "total_processed": ' + written.encode() + b"}"
    assert parse_page("b", body).total_processed == code


@pytest.mark.parametrize("written", ["3300.5", "1e19", "1e400000", "3.3e-3"])
def test_a_status_code_with_a_fraction_is_still_refused(written: str) -> None:
    text = record_text(balance="1.00").replace(
        '"balance_status_code": 0', f'"balance_status_code": {written}'
    )
    assert one_invalid(text).reason == "invalid_field"
    # As a page's count, none is one: it is taken as absent, the page kept.
    body = b'{"batch_id": "b", "balances": [], "total_processed": ' + written.encode() + b"}"
    page = parse_page("b", body)
    assert page.total_processed is None and list(page.notes) == ["total_unusable"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('"not an object"', "not_an_object"),
        ("[1, 2]", "not_an_object"),
        ("42", "not_an_object"),
        ("null", "not_an_object"),
        (
            '{"balance": 1.5, "timestamp": "2024-08-09T18:10:44Z", "balance_status_code": 0}',
            "missing_authorizer_unique_id",
        ),
        (record_text(authorizer_unique_id=""), "missing_authorizer_unique_id"),
        (record_text(authorizer_unique_id=1286672), "missing_authorizer_unique_id"),
        (record_text(authorizer_unique_id=None), "missing_authorizer_unique_id"),
        (record_text(balance="true"), "invalid_balance"),
        (record_text(balance="false"), "invalid_balance"),
        (record_text(balance='"12.50"'), "invalid_balance"),
        (record_text(balance="[1]"), "invalid_balance"),
        (record_text(balance="{}"), "invalid_balance"),
        (record_text(timestamp=None), "invalid_field"),
        (record_text(timestamp=1723227044), "invalid_field"),
        (record_text(balance_status_code="0"), "invalid_field"),
        (record_text(balance_status_code=True), "invalid_field"),
        (record_text(balance_status_code=0.5), "invalid_field"),
        (record_text(balance_status_code=None), "invalid_field"),
    ],
)
def test_invalid_records_are_returned_apart_with_reason_and_raw_text(
    text: str, reason: str
) -> None:
    body = page_of(
        record_text(authorizer_unique_id="good-1"), text, record_text(authorizer_unique_id="good-2")
    )
    page = parse_page("b", body)
    assert [r.authorizer_unique_id for r in page.records] == ["good-1", "good-2"]
    assert len(page.invalid) == 1
    bad = page.invalid[0]
    assert bad.reason == reason
    assert bad.detail
    # The raw text is the record as sent (same JSON value, same digits).
    assert json.loads(bad.raw) == json.loads(text)
    if "1.5" in text:
        assert "1.5" in bad.raw


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_balance_is_one_invalid_record(literal: str) -> None:
    body = page_of(record_text(balance=literal), record_text(authorizer_unique_id="ok"))
    page = parse_page("b", body)
    assert [r.authorizer_unique_id for r in page.records] == ["ok"]
    assert [i.reason for i in page.invalid] == ["invalid_balance"]
    assert literal in page.invalid[0].raw


def test_parse_record_rejects_non_finite_decimal() -> None:
    from decimal import Decimal

    item = {
        "authorizer_unique_id": "x",
        "balance": Decimal("NaN"),
        "timestamp": "2024-08-09T18:10:44Z",
        "balance_status_code": 0,
    }
    parsed = parse_record("b", item)
    assert isinstance(parsed, InvalidRecord)
    assert parsed.reason == "invalid_balance"
    item["balance"] = Decimal("-Infinity")
    parsed = parse_record("b", item)
    assert isinstance(parsed, InvalidRecord)
    assert parsed.reason == "invalid_balance"


def test_invalid_record_keeps_exact_digits_in_raw() -> None:
    bad = one_invalid('{"balance": 123456789012345678.91, "note": "no id"}')
    assert bad.reason == "missing_authorizer_unique_id"
    assert "123456789012345678.91" in bad.raw


def test_invalid_record_event_id_is_deterministic() -> None:
    text = '{"balance": 1.5}'
    first, second = one_invalid(text), one_invalid(text)
    assert first.event_id == second.event_id
    other = page_of(text, batch_id="other")
    assert parse_page("other", other).invalid[0].event_id != first.event_id


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b'{"balances": [',
        b"\xff\xfe\x00garbage",
        b"[]",
        b'"balances"',
        b"null",
        b"{}",
        b'{"balances": {"items": []}}',
        b'{"balances": "none"}',
        b'{"balances": [], "has_more": "yes", "next_page_token": "t"}',
        b'{"balances": [], "has_more": 1, "next_page_token": "t"}',
        b'{"balances": [], "has_more": true, "next_page_token": 17}',
        b'{"balances": [], "batch_id": 5}',
    ],
)
def test_malformed_envelopes_raise(body: bytes) -> None:
    with pytest.raises(ApiMalformedResponse) as info:
        parse_page("b", body)
    assert info.value.status == 200
    assert info.value.metric_code == "malformed"


@pytest.mark.parametrize("token", ["", ', "next_page_token": ""', ', "next_page_token": null'])
def test_more_without_a_token_keeps_the_records_and_notes_it(token: str) -> None:
    """The schema marks no field required: a page that says more follow but gives no
    token still has records, which are kept (the poll ends at that page)."""
    rec = record_text(authorizer_unique_id="kept")
    body = f'{{"batch_id": "b", "balances": [{rec}], "has_more": true{token}}}'.encode()
    page = parse_page("b", body)
    assert [r.authorizer_unique_id for r in page.records] == ["kept"]
    assert page.has_more and page.next_page_token is None
    assert list(page.notes) == ["more_without_token"]


@pytest.mark.parametrize(
    "total",
    ["-1", "-3e2", "-0.0", str(2**63), "9" * 400, '"3"', "3.5", "true", "{}", "[]"],
)
def test_a_total_processed_that_is_no_count_is_taken_as_absent_and_the_records_kept(
    total: str,
) -> None:
    rec = record_text(authorizer_unique_id="kept")
    body = f'{{"batch_id": "b", "balances": [{rec}], "total_processed": {total}}}'.encode()
    page = parse_page("b", body)
    assert [r.authorizer_unique_id for r in page.records] == ["kept"]
    if total == "-0.0":  # zero, written oddly: a count like any other
        assert page.total_processed == 0 and not page.notes
    else:
        assert page.total_processed is None
        assert list(page.notes) == ["total_unusable"]


def test_a_well_formed_page_has_no_notes() -> None:
    rec = record_text(authorizer_unique_id="a")
    body = f'{{"batch_id": "b", "balances": [{rec}], "total_processed": 5}}'.encode()
    page = parse_page("b", body)
    assert page.total_processed == 5 and page.notes == {}


@pytest.mark.parametrize("depth", [600, 5000])
def test_deeply_nested_values_do_not_escape_as_recursion_error(depth: int) -> None:
    nested = "[" * depth + "]" * depth
    body = page_of(record_text(authorizer_unique_id="ok"), nested)
    try:
        page = parse_page("b", body)
    except ApiMalformedResponse:
        return
    assert [r.authorizer_unique_id for r in page.records] == ["ok"]
    assert [i.reason for i in page.invalid] == ["not_an_object"]


@pytest.mark.parametrize("beside", [(), (record_text(authorizer_unique_id="other"),)])
def test_an_authorizer_id_of_1024_characters_is_kept_and_one_longer_is_dead_lettered(
    beside: tuple[str],
) -> None:
    """The limit, at its edge, on both paths: a page whose records are all valid is read
    by the fast decoder, one with a record to set aside by the general parser."""
    at_limit, over = "7" * 1024, "8" * 1025
    page = parse_page("b", page_of(record_text(authorizer_unique_id=at_limit), *beside))
    assert [r.authorizer_unique_id for r in page.records][:1] == [at_limit]
    assert not page.invalid
    page = parse_page("b", page_of(record_text(authorizer_unique_id=over), *beside))
    assert [r.authorizer_unique_id for r in page.records] == ["other"] * len(beside)
    assert [(i.reason, i.detail) for i in page.invalid] == [
        ("invalid_field", "authorizer_unique_id is over 1024 chars")
    ]


@pytest.mark.parametrize("depth", [900, 1000, 100_000])
def test_a_deeply_nested_unknown_field_is_a_malformed_page_at_worst(depth: int) -> None:
    """Nested values in a field nobody reads are skipped by the fast decoder, which has a
    depth limit of its own: past it the page goes to the general parser, which either
    reads it or calls it malformed (an error the poll handles), never a crash."""
    nested = "[" * depth + "]" * depth
    text = record_text(authorizer_unique_id="ok")
    body = page_of(text[:-1] + f', "extra": {nested}}}')
    try:
        page = parse_page("b", body)
    except ApiMalformedResponse as exc:
        assert depth >= 1000 and "not JSON" in str(exc)
        return
    assert depth < 1000
    assert [r.authorizer_unique_id for r in page.records] == ["ok"] and not page.invalid


@pytest.mark.parametrize("timestamp", ["", "yesterday", "2024-08-09 18:10:44", "2024-08-09"])
def test_record_with_unusable_timestamp_is_invalid(timestamp: str) -> None:
    bad = one_invalid(record_text(timestamp=timestamp))
    assert bad.reason == "invalid_field"
    assert "timestamp" in bad.detail


@pytest.mark.parametrize(
    "timestamp",
    [
        "2024-08-09T18:10:44Z",
        "2024-08-09T18:10:44.123456Z",
        "2024-08-09T18:10:44+02:00",
        "2024-08-09T18:10:44.5-05:30",
    ],
)
def test_rfc3339_timestamps_are_kept_as_sent(timestamp: str) -> None:
    assert one_record(record_text(timestamp=timestamp)).timestamp == timestamp


@pytest.mark.parametrize(
    "timestamp",
    [
        "2024-08-09T18:10Z",
        "2024-08-09T18Z",
        "20240809T181044Z",
        "2024-W32-5T18:10:44Z",
        "2024-08-09T18:10:44+0200",
        "2024-08-09T18:10:44+02",
        "2024-08-09T18:10:44,5Z",
    ],
)
def test_iso8601_timestamps_that_are_not_rfc3339_are_invalid(timestamp: str) -> None:
    bad = one_invalid(record_text(timestamp=timestamp))
    assert bad.reason == "invalid_field"


def test_event_id_deterministic_and_sensitive_to_every_field_of_the_record() -> None:
    ts = "2024-08-09T18:10:44Z"
    a = balance_event_id(BATCH, "1286672", ts, "-83.68", 0)
    assert a == balance_event_id(BATCH, "1286672", ts, "-83.68", 0)
    assert a != balance_event_id(BATCH, "1286672", "2024-08-09T18:10:45Z", "-83.68", 0)
    assert a != balance_event_id(BATCH, "1286673", ts, "-83.68", 0)
    assert a != balance_event_id("other-batch", "1286672", ts, "-83.68", 0)
    # The content: another balance (digits count: 1.5 is not 1.50), none, another code.
    assert a != balance_event_id(BATCH, "1286672", ts, "-83.69", 0)
    assert balance_event_id(BATCH, "1", ts, "1.5", 0) != balance_event_id(BATCH, "1", ts, "1.50", 0)
    assert a != balance_event_id(BATCH, "1286672", ts, None, 0)
    assert a != balance_event_id(BATCH, "1286672", ts, "-83.68", 9000)
    # Field boundaries are unambiguous.
    assert balance_event_id("a", "bc", "t", None, 0) != balance_event_id("ab", "c", "t", None, 0)
    assert balance_event_id("a", "b", "t", "1", 0) != balance_event_id("a", "b", "t", "10", 0)


def test_a_record_listed_again_with_another_balance_is_a_new_event() -> None:
    """Same authorizer and timestamp, other content: a new id; batches of state v1-v3 not."""
    before = parse_page(BATCH, page_of(record_text(balance="1.00"), batch_id=BATCH)).records[0]
    after = parse_page(BATCH, page_of(record_text(balance="2.00"), batch_id=BATCH)).records[0]
    again = parse_page(BATCH, page_of(record_text(balance="1.00"), batch_id=BATCH)).records[0]
    assert before.event_id != after.event_id
    assert before.event_id == again.event_id
    old = parse_page(
        BATCH, page_of(record_text(balance="1.00"), batch_id=BATCH), content_ids=False
    ).records[0]
    assert old.event_id == timestamp_event_id(BATCH, old.authorizer_unique_id, old.timestamp)
    old_after = parse_page(
        BATCH, page_of(record_text(balance="2.00"), batch_id=BATCH), content_ids=False
    )
    assert old_after.records[0].event_id == old.event_id


def test_same_record_on_two_reads_has_the_same_event_id() -> None:
    first = parse_page(BATCH, VENDOR_EXAMPLE).records
    second = parse_page(BATCH, VENDOR_EXAMPLE).records
    assert [r.event_id for r in first] == [r.event_id for r in second]
    assert len({r.event_id for r in first}) == 3


def test_fingerprint_is_stable_and_64_bit() -> None:
    event_id = balance_event_id(BATCH, "1286672", "2024-08-09T18:10:44Z", "-83.68", 0)
    assert event_id == "a4c73ef3-d0f0-5f70-97ec-af72d6f1408c"
    # The ids of batches stored by state versions 1 to 3, pinned as they were.
    old = timestamp_event_id(BATCH, "1286672", "2024-08-09T18:10:44Z")
    assert old == "3361b78a-e60b-5718-a976-4e54f772e8a9"
    # Stable across processes and releases: the state topic stores fingerprints and
    # consumers deduplicate on event ids. The last 64 bits of the id, as they are.
    assert fingerprint(old) == 0xA9764E54F772E8A9
    assert fingerprint("00000000-0000-5000-8000-000000000000") == 2**63
    assert fingerprint("ffffffff-ffff-5fff-bfff-ffffffffffff") == 2**64 - 1 - 2**62
    ids = [balance_event_id(BATCH, str(i), "2024-08-09T18:10:44Z", "1", 0) for i in range(20_000)]
    assert len({fingerprint(i) for i in ids}) == 20_000
    assert all(0 <= fingerprint(i) < 2**64 for i in ids)


def test_authorizer_fingerprint_is_stable_and_never_an_event_fingerprint() -> None:
    # Stored on the state topic (version 5) beside the events': pinned as it is.
    assert authorizer_fingerprint("1286672") == 4144327974361685157
    assert authorizer_fingerprint("") == 811105335370900784
    uids = [str(i) for i in range(20_000)]
    fps = {authorizer_fingerprint(u) for u in uids}
    assert len(fps) == 20_000
    # Top two bits 00; an event fingerprint's are 10 (the UUID variant): never equal.
    assert all(0 <= a < 2**62 for a in fps)
    ids = [balance_event_id(BATCH, u, "2024-08-09T18:10:44Z", "1", 0) for u in uids[:2000]]
    assert all(fingerprint(i) >> 62 == 0b10 for i in ids)


def test_legacy_fingerprint_is_version_1s() -> None:
    # What state version 1 stored; batches restored from it go on with it.
    assert legacy_fingerprint("00000000-0000-5000-8000-000000000000") == 3997677677201542975


@pytest.mark.parametrize(
    "body",
    [
        {"batch_id": "b1", "total_processed": 3, "has_more": False},
        {"batch_id": "b1"},  # protobuf's JSON of an empty last page: defaults left out
        {"batch_id": "b1", "balances": None},
    ],
)
def test_a_page_without_balances_that_names_its_batch_is_an_empty_page(
    body: dict[str, Any],
) -> None:
    """No field of the vendor's schema is required, and a serializer that leaves out empty
    lists sends the empty page that ends a list without ``balances``: refused as malformed,
    every poll failed on it and the batch never completed."""
    page = parse_page("b1", json.dumps(body).encode())
    assert (page.records, page.invalid, page.has_more) == ([], [], False)
    assert page.total_processed == body.get("total_processed")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"total_processed": 3},
        {"status": "error", "error": {"code": "INTERNAL", "message": "try again"}},
        {"batch_id": "b1", "status": "error", "error": {"code": "INTERNAL"}},
    ],
)
def test_a_body_without_balances_that_is_no_page_of_the_batch_is_refused(
    body: dict[str, Any],
) -> None:
    """An error body answered with 200, or an object that says nothing of the batch, is
    not taken as an empty page (which could complete the batch)."""
    with pytest.raises(ApiMalformedResponse, match="no balances"):
        parse_page("b1", json.dumps(body).encode())


@pytest.mark.parametrize(
    ("token", "problem"),
    [
        ("😀" * 2049, "over 8192 bytes"),  # 2,049 characters, 8,196 bytes
        ("a" * 8193, "over 8192 bytes"),
        ("tok\nen", "control character"),
        ("tok\x7fen", "control character"),
        ("tok\ud800en", "not valid Unicode"),
    ],
)
def test_a_page_token_that_cannot_be_kept_with_the_progress_is_refused(
    token: str, problem: str
) -> None:
    """A token is stored with the batch's progress, whose summary must fit its message:
    bounded in UTF-8 bytes (not characters), with no control character (six bytes each in
    the summary's JSON). A summary that did not fit would fail the commit of every poll
    after the batch's state had moved on in memory."""
    body = json.dumps({"batch_id": "b", "balances": [], "has_more": True, "next_page_token": token})
    with pytest.raises(ApiMalformedResponse, match=problem):
        parse_page("b", body.encode())


def test_the_largest_page_token_and_reason_still_fit_the_summary() -> None:
    from service.state import MAX_REASON_CHARS, MAX_SUMMARY_BYTES, BatchState, encode_state

    for token in ("😀" * 2048, '"\\' * 4096, "\u00e9" * 4096):
        body = json.dumps(
            {"batch_id": "b", "balances": [], "has_more": True, "next_page_token": token}
        )
        page = parse_page("b", body.encode())
        assert page.next_page_token == token
        b = BatchState(batch_id="b" * 128, partition=0, cursor=token, expected_count=10**18)
        b.status, b.reason = "failed", "😀" * MAX_REASON_CHARS
        assert len(encode_state(b)) <= MAX_SUMMARY_BYTES
