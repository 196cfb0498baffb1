"""The state-topic form of a batch's progress: summary and fingerprint chunks.

Round trips through ``state_records`` and ``StateRestore`` (what the tracker writes
and what a restore reads back), the bounds that keep every record small whatever
the batch size, the cost of a commit, and the records of earlier versions.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import tracemalloc
from array import array
from collections.abc import Generator, Iterable
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_harness import config, read_back

from service import state as state_module
from service.config import KafkaConfig
from service.errors import ApiBadRequest
from service.policy import Policy
from service.records import (
    MAX_PAGE_TOKEN_BYTES,
    balance_event_id,
    fingerprint,
    legacy_fingerprint,
)
from service.requests import TrackingRequest
from service.seen import BUCKET_MAX, PART_RATIO, SeenLoader, SeenSet
from service.state import (
    CHUNK_FPS,
    EARLY_SEAL_LIMIT,
    MAX_CHUNK_SEQ,
    MAX_MESSAGE_BYTES,
    MAX_SUMMARY_BYTES,
    STATE_VERSION,
    BatchState,
    ChunkLog,
    StateRestore,
    Status,
    chunk_key,
    clear_records,
    decode_chunk,
    decode_state,
    encode_chunk,
    encode_state,
    forget_records,
    parse_key,
    state_records,
)
from service.view import StateView

FIXTURES = Path(__file__).parent / "fixtures"
SEEN = {
    fingerprint(balance_event_id("b-1", str(i), "2024-08-09T18:10:44Z", "1", 0)) for i in range(250)
}


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
        relisted=4,
        unkeyed=2,
        counts={"SUCCESS": 200, "NO_SSN_MATCH": 30, "UNKNOWN": 10},
        last_new_at=1_723_220_100.5,
        last_poll_at=1_723_220_130.75,
        not_found_since=1_723_220_001.0,
        failures=3,
        reason=None,
        total_processed=260,
        last_sweep_at=1_723_220_120.0,
        sweep_failures=2,
        next_sweep_at=1_723_220_300.0,
    )
    state.remember(SEEN | {0, 2**64 - 1})
    for name, value in changes.items():
        setattr(state, name, value)
    return state


class Topic:
    """A compacted state partition: every record kept in order, as a restore reads it."""

    def __init__(self) -> None:
        self.log: list[tuple[bytes, bytes | None]] = []

    def write(self, state: BatchState) -> list[tuple[bytes, bytes | None]]:
        records = state_records(state)
        self.log.extend(records)
        return records

    def restore(self, partition: int = 3) -> dict[str, BatchState]:
        restore = StateRestore(partition)
        for key, value in self.log:
            restore.apply(key, value)
        errors: list[tuple[str, ValueError]] = []
        batches = restore.batches(lambda b, e: errors.append((b, e)))
        assert not errors
        return batches

    def compacted(self) -> list[tuple[bytes, bytes | None]]:
        last = {key: value for key, value in self.log}
        return [(k, v) for k, v in last.items() if v is not None]


SCALARS = [
    "batch_id",
    "relisted",
    "expected_count",
    "generation",
    "status",
    "tracked_at",
    "cursor",
    "published",
    "dead_lettered",
    "relisted",
    "unkeyed",
    "counts",
    "last_new_at",
    "last_poll_at",
    "not_found_since",
    "failures",
    "reason",
    "total_processed",
    "last_sweep_at",
    "sweep_failures",
    "next_sweep_at",
    "seen_version",
]


def scalars(state: BatchState) -> dict[str, object]:
    return {name: getattr(state, name) for name in SCALARS}


def test_round_trip_keeps_everything() -> None:
    topic = Topic()
    state = full_state()
    topic.write(state)
    (back,) = topic.restore().values()
    assert scalars(back) == scalars(state)
    assert back.seen == SEEN | {0, 2**64 - 1}
    assert back.records_seen == 246  # 240 events and 10 dead letters, 4 of them relisted
    assert back.records_behind == 14
    assert back.partition == 3
    assert back.active


def test_round_trip_with_none_fields_and_empty_seen() -> None:
    topic = Topic()
    state = BatchState(batch_id="b:2", partition=0, tracked_at=5.0)
    assert [parse_key(k) for k, _ in topic.write(state)] == [("b:2", None)]  # no chunk
    (back,) = topic.restore(0).values()
    assert scalars(back) == scalars(state)
    assert back.seen == set()
    assert back.records_behind == 0


def test_partition_comes_from_where_it_was_read() -> None:
    topic = Topic()
    topic.write(full_state())
    assert topic.restore(partition=7)["b-1"].partition == 7


def test_summary_is_small_json_without_fingerprints() -> None:
    (summary,) = [v for k, v in state_records(full_state()) if parse_key(k)[1] is None]
    assert summary is not None
    doc = json.loads(summary)
    assert doc["v"] == STATE_VERSION == 5
    assert doc["fp"] == 4  # event ids of the record's content, and authorizers in the seen set
    assert "seen" not in doc
    assert len(summary) < 1000


def test_fingerprints_accumulate_across_commits_and_restores() -> None:
    rng = random.Random(7)
    topic = Topic()
    state = BatchState(batch_id="big", partition=1, tracked_at=1.0)
    everything: set[int] = set()
    for commit in range(60):
        new = {rng.getrandbits(64) for _ in range(rng.choice((1, 3, 250, 1000, 5000)))}
        everything |= new
        state.remember(new)
        state.published += len(new)
        topic.write(state)
        if commit % 17 == 16:  # a restart: go on from what the topic holds
            state = topic.restore(1)["big"]
            assert state.seen == everything
    restored = topic.restore(1)["big"]
    assert restored.seen == everything
    # What compaction keeps restores the same.
    topic.log = topic.compacted()
    assert topic.restore(1)["big"].seen == everything


def test_a_restore_holds_no_python_int_per_fingerprint() -> None:
    # 300,000 fingerprints in chunks, read back: the seen set is built a chunk at a
    # time (each chunk's bytes let go once taken), never from one list of them all.
    rng = random.Random(11)
    state = BatchState(batch_id="big", partition=1, tracked_at=1.0)
    everything = [rng.getrandbits(64) for _ in range(300_000)]
    for start in range(0, len(everything), 5000):
        state.remember(everything[start : start + 5000])
    topic = Topic()
    topic.write(state)
    topic.log = topic.compacted()
    del state
    restore = StateRestore(1)
    for key, value in topic.log:
        restore.apply(key, value)
    topic.log.clear()  # the restore holds the only copy of the chunks, as when reading
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        batches = restore.batches(lambda b, e: None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    seen = batches["big"].seen
    assert len(seen) == len(everything) and all(v in seen for v in everything[::997])
    # 8 bytes a fingerprint in the seen set, as the chunk's bytes are let go.
    assert (peak - before) / len(everything) <= 12


def test_every_record_is_bounded_whatever_the_commit_size() -> None:
    state = BatchState(batch_id="b", partition=0)
    state.remember(range(1, 10 * CHUNK_FPS + 17))
    records = state_records(state)
    assert len(records) == 12  # 11 chunks and the summary
    assert max(len(v or b"") for _, v in records) <= 2 + 8 * CHUNK_FPS
    assert 8 * CHUNK_FPS < MAX_SUMMARY_BYTES < MAX_MESSAGE_BYTES


def test_a_summary_with_the_longest_inputs_fits() -> None:
    # Page tokens are refused past 8,192 characters; the worst JSON escape is 6 bytes.
    state = full_state(cursor="\x01" * 8192, reason="\x02" * 50_000, batch_id="b" * 128)
    summary = encode_state(state)
    assert len(summary) <= MAX_SUMMARY_BYTES
    assert len(json.loads(summary)["reason"]) == 1024


def test_a_commit_writes_what_is_new_not_the_batch() -> None:
    """1,000,000 records in commits of 1,000: bytes per record stay flat and small."""
    state = BatchState(batch_id="1m", partition=0, tracked_at=1.0, expected_count=1_000_000)
    written = 0
    largest = 0
    for start in range(0, 1_000_000, 1000):
        state.remember(range(start + 1, start + 1001))
        state.published += 1000
        size = sum(len(k) + len(v or b"") for k, v in state_records(state))
        written += size
        largest = max(largest, size)
    assert written / 1_000_000 <= 32
    # At most the chunk it seals, the new fingerprints and the summary.
    assert largest <= 8 * CHUNK_FPS + 8 * 1000 + 1000


def test_a_trickle_seals_its_chunk_after_a_few_writes() -> None:
    state = BatchState(batch_id="slow", partition=0)
    keys = []
    for i in range(40):
        state.remember([i + 1])
        keys += [parse_key(k)[1] for k, _ in state_records(state)]
    chunks = {k for k in keys if k is not None}
    assert chunks == {0, 1, 2, 3, 4}  # sealed every 8 writes, so the rewrites stay small


@pytest.mark.parametrize("status", ["completed", "expired"])
def test_finished_for_good_tombstones_its_chunks(status: Status) -> None:
    topic = Topic()
    state = full_state()
    state.remember(range(1, 3 * CHUNK_FPS))
    topic.write(state)
    state.status, state.reason = status, "done"
    written = topic.write(state)
    tombstones = [parse_key(k) for k, v in written if v is None]
    assert tombstones == [("b-1", n) for n in range(4)]  # 252 + 6,143 fingerprints
    assert all(parse_key(k)[1] is None for k, _ in topic.compacted())  # only the summary
    back = topic.restore()["b-1"]
    assert back.seen == set()
    assert (back.status, back.published, back.reason) == (status, 240, "done")
    assert not back.active


def test_a_big_batch_finished_for_good_clears_its_chunks_a_bounded_number_a_commit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The commit that completes a batch tombstones its last CLEAR_CHUNKS_AT_FINISH chunks
    only; each later commit (``clear_records``) takes a bounded number more, from the top,
    and a restore at any point finds the batch completed, holding none of its chunks
    while it reads them, and knowing which are left."""
    monkeypatch.setattr(state_module, "CLEAR_CHUNKS_AT_FINISH", 3)
    topic = Topic()
    state = full_state()
    state.remember(range(1, 9 * CHUNK_FPS))
    topic.write(state)
    assert list(state.chunks.written()) == list(range(10))  # 9 full, the last open
    state.seen, state.seen_loaded = SeenSet(), False  # as the policy finishes it
    state.status, state.reason = "completed", "done"
    written = topic.write(state)
    assert [parse_key(k)[1] for k, v in written if v is None] == [7, 8, 9]
    left: list[int] = list(range(7))
    assert list(state.chunks.written()) == left
    while left:
        restore = StateRestore(3)
        for key, value in topic.log:
            restore.apply(key, value)
        assert not restore._chunks.get("b-1")  # once it reads "completed", none is held
        back = restore.batches(lambda b, e: pytest.fail(f"{b}: {e}"))["b-1"]
        assert back.status == "completed" and len(back.seen) == 0 and not back.active
        assert list(back.chunks.written()) == left
        cleared = clear_records(back, 3)
        assert [parse_key(k) for k, _ in cleared] == [("b-1", n) for n in left[-3:]]
        topic.log.extend(cleared)
        left = left[:-3]
    assert [k for k, _ in topic.compacted()] == [b"b-1"]  # only the summary
    assert list(topic.restore()["b-1"].chunks.written()) == []


def finish(state: BatchState, status: str) -> BatchState:
    """The batch as the policy finishes it (a stop request, or a poll's failure)."""
    policy = Policy(config(), 60.0, random.Random(1))
    if status == "stopped":
        step = policy.stop(state, 1_723_220_200.0)
        assert step is not None
        return step.state
    # A 400 for the batch fails it whatever it had read (a 403 would only for a batch never
    # read: this one has records).
    return policy.failed(state, ApiBadRequest("bad batch", status=400), 1_723_220_200.0).state


@pytest.mark.parametrize("status", ["failed", "stopped"])
def test_a_stopped_or_failed_batch_keeps_its_fingerprints_on_the_topic_not_in_memory(
    status: str,
) -> None:
    """It may be tracked again, so its chunks stay; the replica holds none of them, and
    a restore does not hold them either while it reads the partition."""
    topic = Topic()
    state = full_state()
    everything = SEEN | {0, 2**64 - 1} | set(range(1, 3 * CHUNK_FPS))
    state.remember(range(1, 3 * CHUNK_FPS))  # 252 + 6,143 fingerprints, 3 chunks and a bit
    topic.write(state)
    state.remember([7_777_777_777])  # published by the poll that the stop ends
    finished = finish(state, status)
    assert finished.status == status and len(finished.seen) == 0 and not finished.seen_loaded
    written = topic.write(finished)
    assert [parse_key(k)[1] for k, v in written if v is not None] == [3, None]
    assert not finished.chunks.open and finished.chunks.open_seq == 4  # sealed: nothing held
    everything.add(7_777_777_777)

    for log in (topic.log, topic.compacted()):
        restore, held = read_measured(log)
        assert held < 2_000, held  # the summaries only: 8 bytes a fingerprint would be 51 KB
        back = restore.batches(lambda b, e: pytest.fail(str(e)))["b-1"]
        assert (back.status, back.generation) == (status, 2)
        assert len(back.seen) == 0 and not back.seen_loaded
        assert back.chunks.open_seq == 4 and not back.chunks.open  # new chunks go after 3
        # What the first poll after it is tracked again reads back: every fingerprint.
        whole = read_one(log, "b-1")
        assert whole.seen == everything and whole.seen_loaded and whole.status == status


def read_measured(log: list[tuple[bytes, bytes | None]]) -> tuple[StateRestore, int]:
    """A restore of ``log``, and the bytes it holds once it has read every record."""
    restore = StateRestore(3)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for key, value in log:  # as read from Kafka: each record a new bytes object
            restore.apply(key, None if value is None else bytes(bytearray(value)))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return restore, held


def read_one(log: list[tuple[bytes, bytes | None]], batch_id: str) -> BatchState:
    state = read_back(log, batch_id, 3)
    assert state is not None
    return state


def test_tracked_again_before_a_restart_it_is_restored_unloaded_and_read_back_whole() -> None:
    """Stopped, tracked again, published more, then the replica restarts before the log
    is compacted: the stopped summary is read before the chunks that followed it, so the
    batch comes back active without fingerprints, for its first poll to read them all."""
    topic = Topic()
    state = full_state()
    topic.write(state)
    stopped = finish(state, "stopped")
    topic.write(stopped)
    policy = Policy(config(), 60.0, random.Random(1))
    again = policy.track(stopped, TrackingRequest(batch_id="b-1"), 3, 1_723_220_300.0).state
    assert again.active and again.generation == 3 and not again.seen_loaded
    topic.write(again)
    # Its first poll read the fingerprints back, then published 5,000 more.
    again.seen, again.seen_loaded = read_one(topic.log, "b-1").seen, True
    again.remember(range(10**6, 10**6 + 5000))
    topic.write(again)
    everything = SEEN | {0, 2**64 - 1} | set(range(10**6, 10**6 + 5000))
    restore, held = read_measured(topic.log)
    assert held < 2_000, held  # not the 40 KB of chunks written after the stop
    back = restore.batches(lambda b, e: pytest.fail(str(e)))["b-1"]
    assert back.active and back.generation == 3 and not back.seen_loaded
    assert back.chunks.open_seq == 4  # chunk 0 (sealed by the stop), then 1 to 3
    assert read_one(topic.log, "b-1").seen == everything
    # Once compacted, the stopped summary is gone: a plain restore loads it all.
    compacted = Topic()
    compacted.log = topic.compacted()
    back = compacted.restore()["b-1"]
    assert back.seen_loaded and back.seen == everything


def test_reading_one_batch_skips_the_others_unparsed() -> None:
    topic = Topic()
    topic.write(full_state())
    topic.write(full_state(batch_id="b-10", published=1))
    topic.log.insert(0, (b"b-1x/fp/not-a-number", b"junk"))
    one = read_one(topic.log, "b-1")
    assert one.published == 240 and one.seen == SEEN | {0, 2**64 - 1}
    assert read_one(topic.log, "b-10").published == 1
    both = StateRestore(3, only=["b-1", "b-10"])
    for key, value in topic.log:
        both.apply(key, value)
    read = both.batches(lambda b, e: pytest.fail(str(e)))
    assert {b: s.published for b, s in read.items()} == {"b-1": 240, "b-10": 1}
    with pytest.raises(TypeError):
        StateRestore(3, only="b-1")


def test_a_version_2_record_resumes_and_moves_its_fingerprints_into_chunks() -> None:
    # Written by the previous version of the service (fingerprints inline, base64).
    literal = (FIXTURES / "state-v2.json").read_bytes().strip()
    doc = json.loads(literal)
    assert doc["v"] == 2
    topic = Topic()
    topic.log.append((b"v2-fixture-batch", literal))
    state = topic.restore(0)["v2-fixture-batch"]
    assert (state.published, state.expected_count, state.cursor) == (120, 300, None)
    assert len(state.seen) == 120
    assert state.fingerprint is fingerprint
    assert not state.content_ids  # its events had ids without the content: it keeps them
    inline = array("Q")
    inline.frombytes(base64.b64decode(doc["seen"]))
    assert state.seen == set(inline)
    # The next write saves them as chunks and a version 3 summary (fingerprints: kind 2).
    records = topic.write(state)
    assert [parse_key(k)[1] for k, _ in records] == [0, None]
    summary = json.loads(records[-1][1] or b"")
    assert (summary["v"], summary["fp"]) == (3, 2)
    topic.log = topic.compacted()
    assert topic.restore(0)["v2-fixture-batch"].seen == set(inline)


def test_a_version_1_record_keeps_its_fingerprint_function() -> None:
    # Version 1 fingerprints are BLAKE2b of the event id; the batch keeps using them.
    fps = array("Q", [legacy_fingerprint(f"id-{i}") for i in range(10)])
    literal = json.dumps(
        {
            "v": 1,
            "batch_id": "old",
            "expected_count": 20,
            "generation": 1,
            "status": "tracking",
            "tracked_at": 1.0,
            "cursor": None,
            "published": 10,
            "counts": {"SUCCESS": 10},
            "seen": base64.b64encode(fps.tobytes()).decode(),
        }
    ).encode()
    topic = Topic()
    topic.log.append((b"old", literal))
    state = topic.restore()["old"]
    assert state.fingerprint is legacy_fingerprint
    assert state.seen == set(fps)
    topic.write(state)
    topic.log = topic.compacted()
    again = topic.restore()["old"]
    assert again.fingerprint is legacy_fingerprint
    assert not again.content_ids
    assert again.seen == set(fps)
    assert full_state().fingerprint is fingerprint


def _fixture(name: str) -> Topic:
    """A state partition holding the literal records of a fixture (one JSON line each)."""
    topic = Topic()
    for line in (FIXTURES / name).read_text().splitlines():
        doc = json.loads(line)
        topic.log.append((doc["key"].encode(), base64.b64decode(doc["value"])))
    return topic


@pytest.mark.parametrize(
    ("fixture", "version", "fp", "content_ids"),
    [("state-v3.jsonl", 3, 2, False), ("state-v4.jsonl", 4, 3, True)],
)
def test_a_batch_of_an_earlier_release_keeps_its_kind_and_stays_readable_by_it(
    fixture: str, version: int, fp: int, content_ids: bool
) -> None:
    """Literal records of earlier releases. Version 3's ids had no content; neither
    version's seen set holds authorizers, so their batches go on counting events as
    records. Each is written back as it was, so that a rollback can still read it."""
    topic = _fixture(fixture)
    batch_id = f"v{version}-fixture-batch"
    assert json.loads(topic.log[-1][1] or b"")["v"] == version
    state = topic.restore(0)[batch_id]
    assert (state.published, state.seen_version, state.content_ids) == (120, fp, content_ids)
    assert not state.tracks_authorizers and state.relisted == 0 and state.records_seen == 120
    assert len(state.seen) == 120
    state.remember([12345])
    records = topic.write(state)
    summary = json.loads(records[-1][1] or b"")
    assert (summary["v"], summary["fp"]) == (version, fp)
    assert topic.restore(0)[batch_id].seen == state.seen


def test_a_new_batch_is_written_as_version_5_which_version_4_would_refuse() -> None:
    state = BatchState(batch_id="new", partition=0, tracked_at=1.0)
    assert state.content_ids and state.tracks_authorizers and state.seen_version == 4
    state.published, state.relisted = 7, 2
    summary = json.loads(encode_state(state))
    assert (summary["v"], summary["fp"], summary["relisted"]) == (5, 4, 2)
    again = decode_state(encode_state(state), partition=0)
    assert (again.relisted, again.records_seen) == (2, 5)
    # Versions 3 and 4 refused any v above their own (UnknownStateVersion): the batch is
    # left alone by a rollback rather than read with its events counted as records.


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
        ("tracked_at", "yesterday"),
        ("total_processed", -1),
        ("v", 0),
        ("v", 6),  # written by a newer version: refused, not read as this one
        ("fp", 5),
        ("relisted", -1),
        ("fp", 0),
    ],
)
def test_invalid_fields_are_a_value_error(field: str, value: object) -> None:
    doc = json.loads(encode_state(full_state()))
    doc[field] = value
    with pytest.raises(ValueError):
        decode_state(json.dumps(doc).encode(), partition=0)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (b"b-1/fp/0", b"XX" + b"\x00" * 8),  # not a chunk
        (b"b-1/fp/0", b"F1" + b"\x00" * 7),  # not whole fingerprints
    ],
)
def test_a_broken_chunk_leaves_out_its_batch_only(key: bytes, value: bytes) -> None:
    topic = Topic()
    topic.write(full_state())
    other = full_state(batch_id="other")
    topic.write(other)
    topic.log.append((key, value))
    restore = StateRestore(3)
    for k, v in topic.log:
        restore.apply(k, v)
    errors: list[str] = []
    batches = restore.batches(lambda b, e: errors.append(b))
    assert errors == ["b-1"]
    assert list(batches) == ["other"]


@pytest.mark.parametrize("key", [None, b"b-1/fp/x", b"/fp/1"])
def test_keys_that_are_not_state_keys_are_refused(key: bytes | None) -> None:
    with pytest.raises(ValueError):
        StateRestore(0).apply(key, b"{}")


@pytest.mark.parametrize(
    "summary",
    [
        b'{"status":' + b"[" * 4000 + b"]" * 4000 + b"}",  # RecursionError in json
        b'{"status":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"status": [1]}',  # an unhashable status: TypeError
        b'{"status": {"a": 1}}',
        b'"stopped"',
    ],
)
def test_a_summary_not_understood_leaves_out_its_batch_only_and_never_raises(
    summary: bytes,
) -> None:
    topic = Topic()
    topic.write(full_state())
    topic.log.append((b"odd", summary))
    topic.write(full_state(batch_id="stopped", status="stopped"))
    restore = StateRestore(3)
    for key, value in topic.log:
        restore.apply(key, value)
    errors: list[tuple[str, ValueError]] = []
    batches = restore.batches(lambda b, e: errors.append((b, e)))
    assert [b for b, _ in errors] == ["odd"]
    assert isinstance(errors[0][1], ValueError)
    assert sorted(batches) == ["b-1", "stopped"]
    only = StateRestore(3, only=["odd"])
    for key, value in topic.log:
        only.apply(key, value)
    assert only.batches(lambda b, e: errors.append((b, e))) == {}
    assert [b for b, _ in errors] == ["odd", "odd"]


@pytest.mark.parametrize(
    "key",
    [
        f"b-1/fp/{MAX_CHUNK_SEQ + 1}".encode(),
        b"b-1/fp/3000000",
        b"b-1/fp/100000000000000000000",
        b"b-1/fp/" + b"9" * 5000,
        b"b-1/fp/03",  # chunk 3 is written b-1/fp/3
        "b-1/fp/\u0663".encode(),  # an Arabic-Indic three
        "b-1/fp/\u00b2".encode(),  # a superscript two: isdigit(), not int()
        b"b-1/fp/-1",
        b"b-1/fp/+1",
        b"b-1/fp/ 1",
        b"b-1/fp/\xff",
    ],
)
def test_a_chunk_key_not_as_written_or_past_the_last_chunk_is_refused(key: bytes) -> None:
    with pytest.raises(ValueError, match=r"state key|chunk number past|decode"):
        parse_key(key)
    with pytest.raises(ValueError):
        StateRestore(0).apply(key, b"F1")


def test_the_last_chunk_number_fits_the_largest_batch() -> None:
    assert parse_key(f"b-1/fp/{MAX_CHUNK_SEQ}".encode()) == ("b-1", MAX_CHUNK_SEQ)
    assert parse_key(b"b-1/fp/0") == ("b-1", 0)
    # The largest expected_count (100,000,000 records), an event's and an authorizer's
    # fingerprint each, in full chunks, after every chunk that may be sealed early.
    assert MAX_CHUNK_SEQ + 1 > EARLY_SEAL_LIMIT + -(-2 * 100_000_000 // CHUNK_FPS) + 1000


def test_past_the_early_seal_limit_chunks_are_sealed_only_when_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch fed one record a commit (and stopped now and then) for ever: below the
    limit every CHUNK_MAX_WRITES writes seal a chunk, past it none does, so its chunk
    numbers stay below MAX_CHUNK_SEQ and every fingerprint is still on the topic."""
    monkeypatch.setattr(state_module, "EARLY_SEAL_LIMIT", 3)
    log, topic = ChunkLog(), dict[int, bytes]()
    for fp in range(1, 3000):
        log.add([fp])
        topic.update(log.flush())
        if fp % 50 == 0:
            log.seal()  # a stop: the seen set let go
    assert max(topic) == 4  # chunks 0-2 sealed early, 3 filled (2,048), 4 open
    assert sorted(fp for v in topic.values() for fp in decode_chunk(v)) == list(range(1, 3000))


@pytest.mark.parametrize("status", ["stopped", "tracking"])
def test_a_chunk_past_the_last_does_not_make_forgetting_its_batch_unbounded(status: str) -> None:
    topic = Topic()
    topic.write(full_state(status=status))
    topic.log.append((b"b-1/fp/3000000", encode_chunk(array("Q", [7]))))
    restore = StateRestore(3)
    refused = []
    for key, value in topic.log:
        try:
            restore.apply(key, value)
        except ValueError as exc:
            refused.append((key, exc))
    assert [key for key, _ in refused] == [b"b-1/fp/3000000"]
    [state] = restore.batches(lambda b, e: pytest.fail(f"{b}: {e}")).values()
    assert len(forget_records(state)) <= 3


@pytest.mark.parametrize("error", [RecursionError("deep"), TypeError("odd"), KeyError("k")])
def test_whatever_a_decoder_raises_is_a_batch_not_understood(
    monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    topic = Topic()
    topic.write(full_state(batch_id="odd"))
    topic.write(full_state())
    real = decode_state

    def decode(value: bytes, partition: int) -> BatchState:
        if b'"odd"' in value:
            raise error
        return real(value, partition)

    monkeypatch.setattr("service.state.decode_state", decode)
    restore = StateRestore(3)
    for key, value in topic.log:
        restore.apply(key, value)
    errors: list[tuple[str, ValueError]] = []
    batches = restore.batches(lambda b, e: errors.append((b, e)))
    assert list(batches) == ["b-1"]
    [(batch_id, exc)] = errors
    assert batch_id == "odd" and isinstance(exc, ValueError) and exc.__cause__ is error
    assert str(exc) == f"not understood: {error!r}"


def test_the_view_knows_each_batch_by_the_partition_of_its_summary() -> None:
    """What requests are routed by (Tracker.route): the partition a batch's summary is on,
    whatever its ID hashes to; a tombstone elsewhere (a copy of another layout, forgotten)
    leaves it, one where it is forgets it; a summary not understood still places it."""
    view = StateView(KafkaConfig(), "test")
    summary = encode_state(BatchState(batch_id="a", partition=3))
    view._apply(b"a", summary, 3)
    view._apply(chunk_key("b", 0), b"F1", 1)  # fingerprints place nothing
    view._apply(b"c", b"{not json", 4)
    assert (view.home("a"), view.home("b"), view.home("c")) == (3, None, 4)
    assert view.get("a") is not None and view.get("c") is None
    view._apply(b"a", None, 0)
    assert view.home("a") == 3 and view.get("a") is not None
    view._apply(b"a", None, 3)
    assert view.home("a") is None and view.get("a") is None


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["put", "remove", "list"]),
            st.integers(0, 150),
            st.integers(1, 40),
        ),
        max_size=400,
    )
)
def test_the_view_lists_batches_in_id_order_through_any_adds_and_removals(
    steps: list[tuple[str, int, int]],
) -> None:
    """The view keeps its batches' IDs sorted between pages of GET /v1/batches (a few
    changes put in one by one, many sorted anew): whatever the changes and however
    many between two pages, a page is the batches after ``after`` in ID order, as a sort
    of every batch would give them."""
    view = StateView(KafkaConfig(), "test")
    model: dict[str, str] = {}
    for action, n, limit in steps:
        batch_id = f"b-{n * 7919 % 151:03d}"
        if action == "put":
            status = ("tracking", "completed")[limit % 2]
            view.put(batch_id, {"batch_id": batch_id, "status": status})
            model[batch_id] = status
        elif action == "remove":
            view.remove(batch_id)
            model.pop(batch_id, None)
        else:
            page, more = view.list(after=batch_id if limit % 3 else None, limit=limit)
            after = batch_id if limit % 3 else ""
            expected = [b for b in sorted(model) if b > after]
            assert [b["batch_id"] for b in page] == expected[:limit]
            assert more == (len(expected) > limit)
    listed, more = view.list(statuses=frozenset({"completed"}))
    assert [b["batch_id"] for b in listed] == sorted(
        b for b, status in model.items() if status == "completed"
    )
    assert not more


def _busy_partition() -> tuple[list[tuple[bytes, bytes | None]], dict[str, int]]:
    """A state partition as compacted: a batch of 60,000 fingerprints written over 30
    commits, one stopped, 600 completed, two small ones tracking; and how many
    fingerprints a restore puts into each batch's seen set."""
    rng = random.Random(17)
    topic = Topic()
    big = BatchState(batch_id="big", partition=3, tracked_at=1.0)
    for _ in range(30):
        big.remember({rng.getrandbits(64) for _ in range(2000)})
        topic.write(big)
    for i in range(600):
        topic.write(full_state(batch_id=f"done-{i}", status="completed"))
    topic.write(full_state(batch_id="small-1"))
    stopped = full_state(batch_id="stopped")
    topic.write(stopped)
    topic.write(finish(stopped, "stopped"))
    topic.write(full_state(batch_id="small-2", published=1))
    sizes = {"big": len(big.seen), "small-1": len(SEEN) + 2, "small-2": len(SEEN) + 2}
    return topic.compacted(), sizes


def _restore_of(log: list[tuple[bytes, bytes | None]]) -> StateRestore:
    restore = StateRestore(3)
    for key, value in log:
        restore.apply(key, value)
    return restore


def test_a_restore_rebuilds_in_bounded_steps_what_batches_gives_at_once() -> None:
    """Each step of ``rebuild`` decodes summaries and reads chunks into seen sets for
    about STEP_WORK fingerprints' worth, whatever the partition holds, and a batch is
    given out only once whole; in the end, the batches are those ``batches`` gives."""
    log, sizes = _busy_partition()
    whole = _restore_of(log).batches(lambda b, e: pytest.fail(f"{b}: {e}"))
    assert {b: len(s.seen) for b, s in whole.items() if len(s.seen)} == sizes

    work = [0]
    real_decode = state_module.decode_state

    def decode(value: bytes, partition: int) -> BatchState:
        work[0] += state_module.SUMMARY_WORK
        return real_decode(value, partition)

    class Loader(SeenLoader):
        """Counts the fingerprints taken, then those put into buckets."""

        def add(self, values: Iterable[int]) -> None:
            values = array("Q", values)
            work[0] += len(values)
            super().add(values)

        def build(self) -> Generator[int, None, SeenSet]:
            steps, built = super().build(), 0
            while True:
                try:
                    taken = next(steps)
                except StopIteration as end:
                    work[0] += len(self.seen) - built
                    return end.value  # type: ignore[no-any-return]
                work[0] += len(self.seen) - built
                built = len(self.seen)
                yield taken

    restore = _restore_of(log)
    out: dict[str, BatchState] = {}
    steps: list[int] = []
    with (
        mock.patch.object(state_module, "SeenLoader", Loader),
        mock.patch.object(state_module, "decode_state", decode),
    ):
        for _ in restore.rebuild(lambda b, e: pytest.fail(f"{b}: {e}"), out):
            steps.append(work[0])
            work[0] = 0
            for batch_id, state in out.items():  # each batch given out whole
                assert len(state.seen) == sizes.get(batch_id, 0)
    steps.append(work[0])
    # Each fingerprint taken, then put into a bucket; a summary decoded.
    total = 2 * sum(sizes.values()) + 604 * state_module.SUMMARY_WORK
    assert sum(steps) == total
    # A step ends after the chunk or the part of the loader that reaches STEP_WORK.
    most = state_module.STEP_WORK + PART_RATIO * BUCKET_MAX
    assert max(steps) <= most, steps
    assert len(steps) >= total // most
    assert sorted(out) == sorted(whole)
    for batch_id, state in out.items():
        expected = whole[batch_id]
        assert scalars(state) == scalars(expected), batch_id
        assert state.seen == expected.seen and state.seen_loaded == expected.seen_loaded
        assert state.chunks == expected.chunks, batch_id


async def test_a_restore_on_the_event_loop_lets_the_rest_run_between_its_steps() -> None:
    """As ``PartitionOwner`` would use it: a pause between steps, in which other tasks
    (the consumer's heartbeat, polls, probes) run."""
    log, _ = _busy_partition()
    restore = _restore_of(log)
    ticks, steps = 0, 0

    async def other() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(other())
    await asyncio.sleep(0)
    out: dict[str, BatchState] = {}
    for _ in restore.rebuild(lambda b, e: pytest.fail(f"{b}: {e}"), out):
        steps += 1
        before = ticks
        await asyncio.sleep(0)
        assert ticks == before + 1
    task.cancel()
    assert steps > 10 and len(out) == 604


def test_a_restore_left_unfinished_gives_the_batches_done_and_lets_go_of_the_rest() -> None:
    log, sizes = _busy_partition()
    restore = _restore_of(log)
    out: dict[str, BatchState] = {}
    steps = restore.rebuild(lambda b, e: pytest.fail(f"{b}: {e}"), out)
    while len(out) < 2:  # the big batch, then a completed one
        next(steps)
    steps.close()  # its caller cancelled, the partition revoked meanwhile
    assert 0 < len(out) < 604
    assert all(len(s.seen) == sizes.get(b, 0) for b, s in out.items())
    assert restore.batches(lambda b, e: pytest.fail(f"{b}: {e}")) == {}


# --- a summary restored can always be written again ------------------------------------


def _summary(**fields: object) -> bytes:
    doc = json.loads(encode_state(BatchState(batch_id="A", partition=0, tracked_at=1.0)))
    doc.update(fields)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "fields",
    [
        {"cursor": "x" * 70_000},
        {"cursor": "x" * 8193},
        {"cursor": "a\nb"},
        {"counts": {f"S{i}": 0 for i in range(9000)}},
        {"counts": {"SUCCESS": 1, "not a status": 1}},
        {"counts": {"X" * 65: 1}},
        {"counts": {"SUCCESS": -1}},
        {"batch_id": "A" * 70_000},
        {"batch_id": "has/fp/slash"},
        {"published": 2**63},
        {"generation": 10**4000},
    ],
    ids=lambda fields: next(iter(fields)) + str(len(json.dumps(fields))),
)
def test_a_summary_the_writer_would_not_write_is_not_understood(fields: dict[str, object]) -> None:
    """What restore takes, the next commit of the batch writes again: a summary outside
    what ``encode_state`` writes (corrupt, or not this service's) is a batch not
    understood, left unreadable, rather than one whose next commit raises."""
    value = _summary(**fields)
    with pytest.raises(ValueError):
        decode_state(value, 0)
    errors: list[tuple[str, ValueError]] = []
    restore = StateRestore(0)
    restore.apply(b"A", value)
    assert restore.batches(lambda b, e: errors.append((b, e))) == {}
    assert [b for b, _ in errors] == ["A"]


def test_the_largest_summary_a_restore_takes_is_written_again() -> None:
    """Every bound at its largest, each string of the characters JSON escapes longest."""
    value = _summary(
        batch_id="B" * 128,
        cursor="é" * (MAX_PAGE_TOKEN_BYTES // 2),
        reason="\U0001f600" * 100_000,  # cut to MAX_REASON_CHARS when written
        counts={
            f"{i:02d}".rjust(64, "Z"): state_module.MAX_STORED_INT
            for i in range(state_module.MAX_COUNTS_KEYS)
        },
        published=state_module.MAX_STORED_INT,
        dead_lettered=state_module.MAX_STORED_INT,
        relisted=state_module.MAX_STORED_INT,
        unkeyed=state_module.MAX_STORED_INT,
        failures=state_module.MAX_STORED_INT,
        sweep_failures=state_module.MAX_STORED_INT,
        generation=state_module.MAX_STORED_INT,
        expected_count=state_module.MAX_STORED_INT,
        total_processed=int("9" * 4000),
        tracked_at=-1.2345678901234567e-300,
        last_new_at=-1.2345678901234567e-300,
        last_poll_at=-1.2345678901234567e-300,
        not_found_since=-1.2345678901234567e-300,
        last_sweep_at=-1.2345678901234567e-300,
        next_sweep_at=-1.2345678901234567e-300,
    )
    state = decode_state(value, 0)
    records = state_records(state)
    assert len(records[-1][1] or b"") <= MAX_SUMMARY_BYTES
    assert decode_state(records[-1][1] or b"", 0).cursor == state.cursor


def test_a_summary_that_cannot_be_written_leaves_the_chunk_log_as_it_was() -> None:
    """``state_records`` raises before it takes anything from the batch's chunk log: the
    fingerprints not yet saved are still to be saved, as Kafka has them."""
    state = BatchState(batch_id="A", partition=0, tracked_at=1.0, status="stopped")
    state.remember([1, 2, 3])
    state.cursor = "x" * (MAX_SUMMARY_BYTES + 1)  # (no longer possible from a restore)
    with pytest.raises(ValueError, match="state summary"):
        state_records(state)
    assert list(state.chunks.unsaved) == [1, 2, 3]
    assert (state.chunks.open_seq, len(state.chunks.open), state.chunks.writes) == (0, 0, 0)


def test_a_summary_under_another_batchs_key_is_not_understood() -> None:
    """A summary says which batch it is of: under another key (corrupt, or copied) it is
    refused, not restored as a second copy of that batch under the key's ID (polled by
    nobody, counted as tracked, and a stop of the key's batch writing the other's)."""
    a = encode_state(BatchState(batch_id="A", partition=0, tracked_at=1.0))
    restore = StateRestore(0)
    restore.apply(b"B", a)
    restore.apply(b"A", a)
    errors: list[tuple[str, ValueError]] = []
    batches = restore.batches(lambda b, e: errors.append((b, e)))
    assert {k: v.batch_id for k, v in batches.items()} == {"A": "A"}
    assert [(b, "under key 'B'" in str(e)) for b, e in errors] == [("B", True)]
    view = StateView(KafkaConfig(), "test")
    view._apply(b"B", a, 0)
    assert view.get("B") is None and view.home("B") == 0
