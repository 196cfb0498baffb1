"""The state-topic form of a batch's progress: round trip, what is kept, what is refused."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from service.records import balance_event_id, fingerprint, legacy_fingerprint
from service.state import BatchState, decode_state, encode_state, pack_seen, unpack_seen

SEEN = {fingerprint(balance_event_id("b-1", str(i), "2024-08-09T18:10:44Z")) for i in range(250)}


def full_state(**changes: object) -> BatchState:
    state = BatchState(
        batch_id="b-1",
        partition=3,
        expected_count=250,
        generation=2,
        status="tracking",
        tracked_at=1_723_220_000.25,
        cursor="eyJvZmZzZXQiOiAxMDB9",
        published=240,
        dead_lettered=10,
        counts={"SUCCESS": 200, "NO_SSN_MATCH": 30, "UNKNOWN": 10},
        seen=set(SEEN) | {0, 2**64 - 1},
        last_new_at=1_723_220_100.5,
        last_poll_at=1_723_220_130.75,
        not_found_since=1_723_220_001.0,
        failures=3,
        reason=None,
    )
    for name, value in changes.items():
        setattr(state, name, value)
    return state


def test_round_trip_keeps_everything() -> None:
    state = full_state()
    back = decode_state(encode_state(state), partition=3)
    assert asdict(back) == asdict(state)
    assert back.seen == state.seen
    assert back.records_seen == 250
    assert back.active


def test_round_trip_with_none_fields_and_empty_seen() -> None:
    state = BatchState(batch_id="b:2", partition=0, tracked_at=5.0)
    back = decode_state(encode_state(state), partition=0)
    assert asdict(back) == asdict(state)
    assert back.expected_count is None
    assert back.cursor is None
    assert back.last_new_at is None
    assert back.last_poll_at is None
    assert back.not_found_since is None
    assert back.seen == set()


def test_partition_comes_from_where_it_was_read() -> None:
    back = decode_state(encode_state(full_state()), partition=7)
    assert back.partition == 7


def test_encoded_state_is_compact_json() -> None:
    value = encode_state(full_state())
    doc = json.loads(value)
    assert doc["v"] == 2
    assert doc["batch_id"] == "b-1"
    # 8 bytes per fingerprint, base64: far smaller than the event ids themselves.
    assert len(value) < 8 * len(SEEN) * 4 // 3 + 1000


@pytest.mark.parametrize("status", ["completed", "expired"])
def test_finished_for_good_drops_the_seen_set(status: str) -> None:
    state = full_state(status=status, reason="done")
    back = decode_state(encode_state(state), partition=3)
    assert back.seen == set()
    assert back.status == status
    assert (back.published, back.counts, back.reason) == (240, state.counts, "done")
    assert not back.active


@pytest.mark.parametrize("status", ["failed", "stopped"])
def test_resumable_outcomes_keep_the_seen_set(status: str) -> None:
    state = full_state(status=status, reason="api_not_found: gone")
    back = decode_state(encode_state(state), partition=3)
    assert back.seen == state.seen
    assert back.status == status
    assert back.reason == "api_not_found: gone"


def test_pack_unpack_seen() -> None:
    values = {0, 1, 2**63, 2**64 - 1, *SEEN}
    assert unpack_seen(pack_seen(values)) == values
    assert unpack_seen(pack_seen(set())) == set()


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"\x00\xff\xfe garbage",
        b"not json",
        b"[]",
        b"{}",
        b'{"v": 1}',
        b"null",
    ],
)
def test_garbage_is_a_value_error(value: bytes) -> None:
    with pytest.raises(ValueError):
        decode_state(value, partition=0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("status", "paused"),
        ("batch_id", ""),
        ("generation", 0),
        ("published", -1),
        ("expected_count", 0),
        ("seen", "not base64!"),
        ("seen", "AAAA"),  # valid base64, not a whole number of 8-byte digests
        ("tracked_at", "yesterday"),
        ("v", 0),
    ],
)
def test_invalid_fields_are_a_value_error(field: str, value: object) -> None:
    doc = json.loads(encode_state(full_state()))
    doc[field] = value
    with pytest.raises(ValueError):
        decode_state(json.dumps(doc).encode(), partition=0)


def test_new_states_are_version_2() -> None:
    state = full_state()
    assert state.seen_version == 2
    assert json.loads(encode_state(state))["v"] == 2
    assert decode_state(encode_state(state), 3).seen_version == 2


def test_a_version_1_state_keeps_its_fingerprints_and_version() -> None:
    # Written before fingerprints were taken from the event id: its seen set holds
    # BLAKE2b fingerprints, which the tracker keeps using for this batch.
    doc = json.loads(encode_state(full_state()))
    doc["v"] = 1
    restored = decode_state(json.dumps(doc).encode(), 3)
    assert restored.seen_version == 1
    assert restored.fingerprint is legacy_fingerprint
    assert full_state().fingerprint is fingerprint
    assert restored.seen == full_state().seen
    assert json.loads(encode_state(restored))["v"] == 1
