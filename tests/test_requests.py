"""Tracking requests: the one format of the requests topic, the HTTP API and the CLI."""

from __future__ import annotations

import json

import pytest

from service.errors import RequestRejected
from service.metrics import INVALID_INPUT
from service.requests import MAX_REQUEST_BYTES, TrackingRequest, decode_request, reject_reason


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            b'{"batch_id": "5d3c6bbb-fc1a-46a4-93da-1ce4a54b0d83", "expected_count": 123}',
            TrackingRequest(batch_id="5d3c6bbb-fc1a-46a4-93da-1ce4a54b0d83", expected_count=123),
        ),
        (b'{"batch_id": "batch_12345ABCDE"}', TrackingRequest(batch_id="batch_12345ABCDE")),
        (
            b'{"batch_id": "b.1:x-y_z", "expected_count": null}',
            TrackingRequest(batch_id="b.1:x-y_z"),
        ),
        (
            b'{"batch_id": "b", "action": "stop"}',
            TrackingRequest(batch_id="b", action="stop"),
        ),
        (
            json.dumps({"batch_id": "x" * 128, "expected_count": 100_000_000}).encode(),
            TrackingRequest(batch_id="x" * 128, expected_count=100_000_000),
        ),
    ],
)
def test_accepts_the_contract_value(value: bytes, expected: TrackingRequest) -> None:
    req = decode_request(value)
    assert req == expected
    assert req.action in ("track", "stop")


def test_defaults() -> None:
    req = decode_request(b'{"batch_id": "b-1"}')
    assert (req.batch_id, req.expected_count, req.action) == ("b-1", None, "track")


def test_encode_round_trip() -> None:
    req = TrackingRequest(batch_id="b-1", expected_count=9)
    assert json.loads(req.encode()) == {"batch_id": "b-1", "expected_count": 9, "action": "track"}
    assert decode_request(req.encode()) == req
    bare = TrackingRequest(batch_id="b-2")
    assert "expected_count" not in json.loads(bare.encode())
    assert decode_request(bare.encode()) == bare


@pytest.mark.parametrize(
    ("value", "label", "fragment"),
    [
        (None, "empty", "empty"),
        (b"", "invalid_json", "not valid JSON"),
        (b"{not json", "invalid_json", "not valid JSON"),
        (b'{"batch_id": "b"', "invalid_json", "not valid JSON"),
        (b"\xff\xfe\x00", "invalid_json", "not valid JSON"),
        (b"[]", "invalid_field", ""),
        (b'"b-1"', "invalid_field", ""),
        (b"{}", "invalid_field", "batch_id"),
        (b'{"batch_id": "b", "expectedCount": 5}', "invalid_field", "expectedCount: unknown field"),
        (b'{"batch_id": "b", "extra": 1}', "invalid_field", "extra: unknown field"),
        (b'{"batch_id": "b", "expected_count": 0}', "invalid_field", "expected_count"),
        (b'{"batch_id": "b", "expected_count": -3}', "invalid_field", "expected_count"),
        (b'{"batch_id": "b", "expected_count": 1.5}', "invalid_field", "expected_count"),
        (
            b'{"batch_id": "b", "expected_count": 100000001}',
            "invalid_field",
            "expected_count",
        ),
        (b'{"batch_id": "b", "expected_count": "many"}', "invalid_field", "expected_count"),
        (b'{"batch_id": "has space"}', "invalid_field", "batch_id"),
        (b'{"batch_id": ""}', "invalid_field", "batch_id"),
        (b'{"batch_id": "b/../c"}', "invalid_field", "batch_id"),
        (b'{"batch_id": "b\\n"}', "invalid_field", "batch_id"),
        (json.dumps({"batch_id": "x" * 129}).encode(), "invalid_field", "batch_id"),
        (b'{"batch_id": 12345}', "invalid_field", "batch_id"),
        (b'{"batch_id": null}', "invalid_field", "batch_id"),
        (b'{"batch_id": "b", "action": "delete"}', "invalid_field", "action"),
        (b'{"batch_id": "b", "action": "TRACK"}', "invalid_field", "action"),
        (b'{"batch_id": "b", "action": null}', "invalid_field", "action"),
    ],
)
def test_rejects_with_a_reason_and_a_bounded_label(
    value: bytes | None, label: str, fragment: str
) -> None:
    with pytest.raises(RequestRejected) as info:
        decode_request(value)
    message = str(info.value)
    assert message
    assert fragment in message
    assert "\n" not in message
    assert reject_reason(info.value) == label


@pytest.mark.parametrize("count", ['"5"', "5.0", "true"])
def test_expected_count_must_be_a_json_integer(count: str) -> None:
    with pytest.raises(RequestRejected, match="expected_count"):
        decode_request(f'{{"batch_id": "b", "expected_count": {count}}}'.encode())


def test_reject_reason_labels_are_bounded() -> None:
    labels = {
        reject_reason(RequestRejected(text))
        for text in (
            "empty message value",
            "not valid JSON: x",
            "too large: 70000 bytes (at most 65536)",
            "batch_id: String should match pattern",
            "anything else at all",
            "",
        )
    }
    assert labels == {"empty", "invalid_json", "too_large", "invalid_field"}


def test_a_value_over_the_bound_is_refused_as_too_large_before_it_is_parsed() -> None:
    # Valid JSON, 5 MB of it whitespace: compressed on the wire it passes the broker, and
    # forwarded as it came it would pass the producer's 1 MiB limit.
    huge = b'{"batch_id":"abc"' + b" " * 5_000_000 + b"}"
    with pytest.raises(RequestRejected) as info:
        decode_request(huge)
    assert reject_reason(info.value) == "too_large"
    assert str(info.value) == f"too large: {len(huge)} bytes (at most {MAX_REQUEST_BYTES})"
    assert ("requests_topic", "too_large") in INVALID_INPUT
    assert ("http", "too_large") in INVALID_INPUT
    at_bound = b'{"batch_id":"abc"' + b" " * (MAX_REQUEST_BYTES - 18) + b"}"
    assert len(at_bound) == MAX_REQUEST_BYTES
    assert decode_request(at_bound) == TrackingRequest(batch_id="abc")
    with pytest.raises(RequestRejected, match="too large"):
        decode_request(at_bound + b" ")


@pytest.mark.parametrize("key", [None, b"b-1"])
def test_a_request_keyed_by_its_batch_id_or_not_keyed_is_accepted(key: bytes | None) -> None:
    assert decode_request(b'{"batch_id": "b-1"}', key) == TrackingRequest(batch_id="b-1")


@pytest.mark.parametrize("key", [b"b-2", b"", b"B-1", b"b-1 ", b"\xff\xfe"])
def test_a_request_keyed_by_another_batch_id_is_refused(key: bytes) -> None:
    with pytest.raises(RequestRejected) as info:
        decode_request(b'{"batch_id": "b-1"}', key)
    assert reject_reason(info.value) == "invalid_field"
    message = str(info.value)
    assert message.startswith("batch_id: must equal the message key, which is ")
    assert "\n" not in message


def test_a_long_key_is_quoted_in_part() -> None:
    with pytest.raises(RequestRejected) as info:
        decode_request(b'{"batch_id": "b-1"}', b"k" * 10_000)
    assert len(str(info.value)) < 250
