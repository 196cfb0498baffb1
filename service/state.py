"""A tracked batch's progress, and its form on the compacted state topic.

The state topic is keyed by batch ID and has as many partitions as the
requests topic, so whoever owns requests partition *p* restores its batches
from state partition *p*. Nothing else stores the service's progress.

A batch takes two kinds of record there, both on its partition:

- its **summary**, key ``<batch_id>``: a small JSON document (cursor, counts,
  status, sweep schedule), rewritten by every commit;
- its **fingerprint chunks**, key ``<batch_id>/fp/<n>``: the 64-bit fingerprints
  of the events it published (and from version 5 of their authorizers, the two
  kinds told apart by their top bits), 8 bytes each, at most ``CHUNK_FPS`` to a
  chunk.
  Only the newest chunk is open: a commit rewrites it with the new
  fingerprints, and it is sealed once it is full or has been written
  ``CHUNK_MAX_WRITES`` times. So a commit writes O(new records) plus at most
  one open chunk, never the whole batch, and no record grows with the batch.

Batch IDs never contain ``/``, so the two kinds of key cannot collide. A batch
that finishes for good tombstones its chunks. A batch stopped or failed keeps its
chunks on the topic, since it may be tracked again, but not in memory: its seen set
is read back from its chunks (``StateRestore(p, only=[batch_id])``) by the first poll
after it is tracked again. Summaries of versions 1 and 2
carried the fingerprints inline; they are read as they are, and their
fingerprints move into chunks with the batch's next commit. Version 4 has the layout
of version 3; it marks a batch whose event ids cover the record's content, which a
version-3 reader would make differently (``FP_VERSION``). Version 5 has it too; it
marks a batch whose seen set holds its authorizers and whose summary counts the
events of records listed again (``relisted``), whose records a version-4 reader
would count wrongly.
"""

from __future__ import annotations

import base64
import json
import sys
from array import array
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from service.errors import UnknownStateVersion
from service.records import fingerprint, legacy_fingerprint, token_problem
from service.requests import BATCH_ID_PATTERN
from service.seen import SeenLoader, SeenSet

Status = Literal["tracking", "completed", "expired", "failed", "stopped"]
FINAL: frozenset[str] = frozenset({"completed", "expired", "failed", "stopped"})
# A re-track request resumes these; completed and expired batches are done for good.
RESUMABLE: frozenset[str] = frozenset({"failed", "stopped"})

# 5: as 4, and the seen set holds the authorizers too (fp 4); 4: summary and fingerprint
# chunks, event ids of the record's content; 3: the same
# layout, event ids without the content; 2 and 1: one record, fingerprints inline.
STATE_VERSION = 5
# What a batch's fingerprints are made of, stored as ``fp``:
# 4: as 3, plus records.authorizer_fingerprint of the authorizer of every event published,
#    with ``relisted`` counting the events whose authorizer had one already (version 5);
# 3: records.fingerprint of records.balance_event_id (batches first stored by version 4);
# 2: records.fingerprint of records.timestamp_event_id (versions 2 and 3);
# 1: records.legacy_fingerprint of records.timestamp_event_id (version 1).
# A batch keeps its kind until it finishes, so that what it published is recognised.
FP_VERSION = 4

# The largest message the service produces, and the state topic's max.message.bytes:
# the producer refuses anything larger before it reaches a broker.
MAX_MESSAGE_BYTES = 1024 * 1024
CHUNK_FPS = 2048  # 16 KiB of fingerprints
CHUNK_MAX_WRITES = 8  # so a batch fed a few records at a time does not rewrite its chunk forever
CHUNK_MAGIC = b"F1"
CHUNK_SEPARATOR = "/fp/"
# Chunks are sealed before they are full (CHUNK_MAX_WRITES, a stop) only below this chunk
# number; past it, only a full chunk is sealed (a commit then rewrites at most one chunk of
# 16 KiB, as before), so a batch fed a few records at a time for months cannot number its
# chunks without bound.
EARLY_SEAL_LIMIT = 2**16
# The highest chunk number read. The largest batch tracked (``expected_count`` at most
# 100,000,000 records, each two fingerprints: its event's and its authorizer's) fills
# 97,657 full chunks of CHUNK_FPS, on top of at most EARLY_SEAL_LIMIT sealed early (and
# one a restart while the batch is stopped). A key past this is refused as not a state
# key: forgetting its batch would tombstone every chunk number up to it in one commit.
MAX_CHUNK_SEQ = 2**18 - 1  # 262,143
# The chunk tombstones that the commit finishing a batch for good carries (its last chunks,
# for a million records or so); the rest of a bigger batch's go in later commits, a bounded
# number each (``Tracker.forget_finished``), from the highest chunk number down, so that
# what is left on the topic is always chunks 0 to n.
CLEAR_CHUNKS_AT_FINISH = 1024
_MAX_SEQ_DIGITS = len(str(MAX_CHUNK_SEQ))
_SEPARATOR = CHUNK_SEPARATOR.encode()
# Strings that come from outside are bounded so that a summary always fits: a page token
# (records.MAX_PAGE_TOKEN_BYTES of UTF-8, longer ones are refused as a malformed page) and the
# reason, which may quote an API error message.
MAX_REASON_CHARS = 1024
MAX_SUMMARY_BYTES = 64 * 1024
# A summary read back is held to what the writer writes (``StateSummary``), so that one a
# restore takes can always be written again: its batch ID as a request's, its cursor a page
# token the API client keeps, its counts those of status names (records.ALL_STATUS_NAMES,
# 10 of them; a newer release may name more, so any of this form, up to this many) and the
# service's own counters below 2**63. At their largest (the cursor's 8 KiB of two-byte
# characters escaped as \uXXXX, 24 KiB; the reason's 1,024 characters, 12 KiB; a
# total_processed of the 4,300 digits the JSON parser takes) a summary is under 48 KiB.
MAX_COUNTS_KEYS = 64
COUNTS_KEY_PATTERN = r"^[A-Z0-9_]{1,64}$"
MAX_STORED_INT = 2**63 - 1
# The work of a step of ``StateRestore.rebuild``, a millisecond or two: a fingerprint
# taken from its chunk, or put into its bucket (``SeenLoader``), is one (some 0.2 µs);
# a summary decoded is SUMMARY_WORK (some 15 µs). A step ends after the chunk, the
# loader's part or the summary that reaches it.
STEP_WORK = 4 * CHUNK_FPS
SUMMARY_WORK = 64


def unpack_seen(text: str) -> array[int]:
    """The inline fingerprints of versions 1 and 2 (base64 of 8-byte little-endian ints)."""
    return _fp_array(base64.b64decode(text, validate=True))


def _fp_bytes(arr: array[int]) -> bytes:
    if sys.byteorder != "little":
        arr = array("Q", arr)
        arr.byteswap()
    return arr.tobytes()


def _fp_array(raw: bytes) -> array[int]:
    arr = array("Q")
    arr.frombytes(raw)  # ValueError unless a whole number of 8-byte fingerprints
    if sys.byteorder != "little":
        arr.byteswap()
    return arr


def chunk_key(batch_id: str, seq: int) -> bytes:
    return f"{batch_id}{CHUNK_SEPARATOR}{seq}".encode()


def parse_key(key: bytes) -> tuple[str, int | None]:
    """The batch ID of a state-topic key, and its chunk number (None for a summary);
    ValueError if it is not a state key. A chunk number is written as ``chunk_key``
    writes it (ASCII digits, no leading zero) and is at most ``MAX_CHUNK_SEQ``."""
    text = key.decode()
    batch_id, sep, seq = text.partition(CHUNK_SEPARATOR)
    if not sep:
        return text, None
    canonical = (
        seq.isascii()
        and seq.isdigit()
        and len(seq) <= _MAX_SEQ_DIGITS
        and (seq == "0" or not seq.startswith("0"))
    )
    if not canonical or not batch_id:
        raise ValueError(f"not a state key: {text[:200]!r}")
    number = int(seq)
    if number > MAX_CHUNK_SEQ:
        raise ValueError(f"chunk number past {MAX_CHUNK_SEQ}: {text[:200]!r}")
    return batch_id, number


def encode_chunk(fps: array[int]) -> bytes:
    return CHUNK_MAGIC + _fp_bytes(fps)


def decode_chunk(value: bytes) -> array[int]:
    if not value.startswith(CHUNK_MAGIC):
        raise ValueError("not a fingerprint chunk")
    return _fp_array(value[len(CHUNK_MAGIC) :])


@dataclass(slots=True)
class ChunkLog:
    """Where a batch's fingerprints stand on the state topic.

    Chunks ``0 .. open_seq - 1`` are sealed; chunk ``open_seq`` holds ``open``.
    ``unsaved`` are fingerprints in the seen set that no chunk holds yet.
    """

    open_seq: int = 0
    open: array[int] = field(default_factory=lambda: array("Q"))
    writes: int = 0  # times the open chunk was written
    unsaved: array[int] = field(default_factory=lambda: array("Q"))

    def add(self, fps: Iterable[int]) -> None:
        self.unsaved.extend(fps)

    def flush(self) -> list[tuple[int, bytes]]:
        """The chunk records that save ``unsaved``: (chunk number, value) pairs."""
        if not self.unsaved:
            return []
        pending, self.unsaved = self.unsaved, array("Q")
        out: list[tuple[int, bytes]] = []
        start = 0
        while start < len(pending):
            room = CHUNK_FPS - len(self.open)
            self.open.extend(pending[start : start + room])
            start += room
            self.writes += 1
            out.append((self.open_seq, encode_chunk(self.open)))
            early = self.writes >= CHUNK_MAX_WRITES and self.open_seq < EARLY_SEAL_LIMIT
            if len(self.open) >= CHUNK_FPS or early:
                self.open_seq += 1
                self.open = array("Q")
                self.writes = 0
        return out

    def written(self) -> range:
        """The chunk numbers that may hold data on the topic."""
        return range(self.open_seq + (1 if self.open else 0))

    def drop_top(self, n: int) -> range:
        """Forget the last ``n`` chunks written (all of them if fewer), to be tombstoned:
        those left are chunks 0 to ``open_seq - 1``, sealed. For a batch finished (nothing
        unsaved)."""
        written = self.written()
        start = max(0, len(written) - max(0, n))
        self.open_seq, self.open, self.writes = start, array("Q"), 0
        return range(start, len(written))

    def seal(self) -> None:
        """Close the open chunk (once saved): the next fingerprints start a new one.

        Past ``EARLY_SEAL_LIMIT`` it stays open, and in memory (16 KiB at most)."""
        if self.open and self.open_seq < EARLY_SEAL_LIMIT:
            self.open_seq += 1
            self.open = array("Q")
            self.writes = 0


@dataclass(slots=True)
class BatchState:
    batch_id: str
    partition: int
    expected_count: int | None = None
    generation: int = 1
    status: Status = "tracking"
    tracked_at: float = 0.0  # wall-clock seconds
    cursor: str | None = None  # page token of the page to read next (None: the first page)
    published: int = 0  # balance events
    dead_lettered: int = 0  # records sent to the DLQ
    relisted: int = 0  # balance events of an authorizer that had one already (fp 4 only)
    # Dead letters without a usable authorizer: such a record listed again with new content
    # counts as a new one, so the records seen may be more than there are (Policy.completion).
    unkeyed: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    seen: SeenSet = field(default_factory=SeenSet)  # fingerprints of every event published
    seen_version: int = FP_VERSION  # the fingerprint function ``seen`` was made with
    # False: ``seen`` is empty and the batch's fingerprints are only on the state topic
    # (a batch stopped or failed); a poll reads them back before it reads a page.
    seen_loaded: bool = True
    chunks: ChunkLog = field(default_factory=ChunkLog)
    last_new_at: float | None = None
    last_poll_at: float | None = None
    not_found_since: float | None = None
    failures: int = 0
    reason: str | None = None
    # Reconciliation with the API's count (``total_processed``) of the records that exist.
    total_processed: int | None = None  # the last count the API gave (None: never given)
    last_sweep_at: float | None = None  # the last read of the whole batch from its first page
    sweep_failures: int = 0  # sweeps in a row that found nothing the count said was missing
    next_sweep_at: float | None = None  # no sweep before this (wall clock), after those
    # In memory only: where a sweep that a run of empty pages cut short stopped (its next
    # page token) and when that sweep began; the next sweep goes on from there
    # (``policy.Poll``). None: the next one starts at the first page. Lost with a restart,
    # which costs a sweep from the first page, nothing else.
    sweep_from: tuple[str, float] | None = None

    @property
    def active(self) -> bool:
        return self.status == "tracking"

    @property
    def chunks_to_clear(self) -> bool:
        """Finished for good with chunks still on the topic (``CLEAR_CHUNKS_AT_FINISH``)."""
        return self.status in FINAL and self.status not in RESUMABLE and bool(self.chunks.written())

    @property
    def fingerprint(self) -> Callable[[str], int]:
        """How ``seen`` fingerprints an event id: the way of the version that stored it."""
        return legacy_fingerprint if self.seen_version == 1 else fingerprint

    @property
    def content_ids(self) -> bool:
        """Whether the batch's event ids are those of the record's content (``fp`` 3)."""
        return self.seen_version >= 3

    @property
    def tracks_authorizers(self) -> bool:
        """Whether ``seen`` holds the authorizers too and ``relisted`` counts (``fp`` 4)."""
        return self.seen_version >= 4

    @property
    def records_seen(self) -> int:
        """Records as the API counts them (``total_processed``, ``expected_count``): one
        per authorizer, however many events its record was published as."""
        return self.published + self.dead_lettered - self.relisted

    @property
    def records_behind(self) -> int:
        """Records the API counts that the batch has not seen (0 when it gives no count)."""
        if self.total_processed is None:
            return 0
        return max(0, self.total_processed - self.records_seen)

    def remember(self, fps: Iterable[int]) -> None:
        """Record newly published fingerprints; they are saved with the next state write."""
        if not isinstance(fps, set | frozenset | list):
            fps = list(fps)
        self.seen.update(fps)
        self.chunks.add(fps)


class _Version(BaseModel):
    model_config = ConfigDict(extra="ignore")

    v: int = Field(ge=1)


def _page_token(value: str | None) -> str | None:
    """A cursor as the API client keeps a page token (records.token_problem)."""
    problem = token_problem(value)
    if problem is not None:
        raise ValueError(f"cursor: {problem}")
    return value


_Count = Annotated[int, Field(ge=0, le=MAX_STORED_INT)]
_CountsKey = Annotated[str, Field(pattern=COUNTS_KEY_PATTERN)]


class StateSummary(BaseModel):
    """The schema of a batch's summary record (every version; ``v`` says which).

    Held to the bounds of what ``encode_state`` writes (``MAX_COUNTS_KEYS``): a record
    outside them (corrupt, or not this service's) is not understood, and its batch left
    unreadable, rather than restored as a batch whose next commit cannot be written."""

    model_config = ConfigDict(extra="ignore")

    v: int = Field(ge=1)
    fp: int | None = Field(default=None, ge=1, le=FP_VERSION)  # absent: 1 in v1, else 2
    batch_id: str = Field(pattern=BATCH_ID_PATTERN)
    expected_count: int | None = Field(default=None, ge=1, le=MAX_STORED_INT)
    generation: int = Field(ge=1, le=MAX_STORED_INT)
    status: Status
    tracked_at: float
    cursor: Annotated[str | None, AfterValidator(_page_token)] = None
    published: _Count
    dead_lettered: _Count = 0
    relisted: _Count = 0
    unkeyed: _Count = 0
    counts: dict[_CountsKey, _Count] = Field(default_factory=dict, max_length=MAX_COUNTS_KEYS)
    seen: str = ""  # versions 1 and 2 only
    last_new_at: float | None = None
    last_poll_at: float | None = None
    not_found_since: float | None = None
    failures: _Count = 0
    reason: str | None = None
    # As the API gave it: below 2**63 since records.parse_page takes no larger count, but
    # not bounded here, where releases before that kept any size.
    total_processed: int | None = Field(default=None, ge=0)
    last_sweep_at: float | None = None
    sweep_failures: _Count = 0
    next_sweep_at: float | None = None


def encode_state(state: BatchState) -> bytes:
    """The batch's summary record (without its fingerprints: see ``state_records``)."""
    reason = state.reason
    if reason is not None and len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 1] + "…"
    doc: dict[str, Any] = {
        # Each batch is written as the oldest version that reads it right, which older
        # readers leave alone: one whose seen set holds its authorizers as 5 (a version-4
        # reader would count its events as records), one whose ids a version-3 reader
        # would make differently as 4; the others stay readable by both (a rollback).
        "v": STATE_VERSION if state.tracks_authorizers else 4 if state.content_ids else 3,
        "fp": state.seen_version,
        "batch_id": state.batch_id,
        "expected_count": state.expected_count,
        "generation": state.generation,
        "status": state.status,
        "tracked_at": state.tracked_at,
        "cursor": state.cursor,
        "published": state.published,
        "dead_lettered": state.dead_lettered,
        "relisted": state.relisted,
        "unkeyed": state.unkeyed,
        "counts": state.counts,
        "last_new_at": state.last_new_at,
        "last_poll_at": state.last_poll_at,
        "not_found_since": state.not_found_since,
        "failures": state.failures,
        "reason": reason,
        "total_processed": state.total_processed,
        "last_sweep_at": state.last_sweep_at,
        "sweep_failures": state.sweep_failures,
        "next_sweep_at": state.next_sweep_at,
    }
    value = json.dumps(doc, separators=(",", ":")).encode()
    if len(value) > MAX_SUMMARY_BYTES:  # bounded inputs make this unreachable; never send it
        raise ValueError(f"state summary of {state.batch_id} is {len(value)} bytes")
    return value


def state_records(state: BatchState) -> list[tuple[bytes, bytes | None]]:
    """Every state-topic record (key, value) that saves the batch as it stands now.

    The fingerprints not yet saved go into chunks; a batch finished for good
    tombstones its chunks (its last ``CLEAR_CHUNKS_AT_FINISH``: later commits take the
    rest, see ``clear_records``); one whose seen set was let go (stopped or failed) seals
    its open chunk, so that memory keeps nothing of it. The summary comes last, so that
    with ``at_least_once`` (no transaction) a summary is never ahead of its fingerprints.

    The summary is encoded first: should it not be written (ValueError, too large), the
    batch's chunk log is left as it was, as Kafka has it.
    """
    summary = encode_state(state)
    out: list[tuple[bytes, bytes | None]] = []
    if state.status in FINAL and state.status not in RESUMABLE:
        state.chunks.unsaved = array("Q")  # never needed again
        out.extend(clear_records(state, CLEAR_CHUNKS_AT_FINISH))
    else:
        out.extend((chunk_key(state.batch_id, n), v) for n, v in state.chunks.flush())
        if not state.seen_loaded:
            state.chunks.seal()
    out.append((state.batch_id.encode(), summary))
    return out


def clear_records(state: BatchState, at_most: int) -> list[tuple[bytes, bytes | None]]:
    """Tombstones of at most ``at_most`` of the chunks left on the topic by a batch
    finished for good (those its finishing commit did not take), its last first."""
    return [(chunk_key(state.batch_id, n), None) for n in state.chunks.drop_top(at_most)]


def forget_records(state: BatchState) -> list[tuple[bytes, bytes | None]]:
    """The tombstones that forget a finished batch: its chunks (those of a batch stopped
    or failed are still on the topic), then its summary. The summary goes last: should
    the write stop halfway (``at_least_once`` has no transaction), the summary still
    stands, and the batch is forgotten again, chunks and all; chunks whose summary were
    gone would stay on the topic with nothing left to find them by."""
    out: list[tuple[bytes, bytes | None]] = [
        (chunk_key(state.batch_id, n), None) for n in state.chunks.written()
    ]
    out.append((state.batch_id.encode(), None))
    return out


def decode_state(value: bytes, partition: int) -> BatchState:
    """A summary record; raise ValueError if it is not understood.

    The state of versions 1 and 2 carries its fingerprints inline: they are in the
    seen set and marked unsaved, so the next state write puts them into chunks.
    """
    version = _Version.model_validate_json(value).v  # first: a newer form may differ in all
    if version > STATE_VERSION:
        raise UnknownStateVersion(
            f"state version {version} is newer than this service reads (up to {STATE_VERSION}); "
            "the batch is left as it is until a newer version of the service owns it"
        )
    doc = StateSummary.model_validate_json(value)
    inline = unpack_seen(doc.seen) if doc.seen and doc.v < 3 else array("Q")
    state = BatchState(
        batch_id=doc.batch_id,
        partition=partition,
        expected_count=doc.expected_count,
        generation=doc.generation,
        status=doc.status,
        tracked_at=doc.tracked_at,
        cursor=doc.cursor,
        published=doc.published,
        dead_lettered=doc.dead_lettered,
        relisted=doc.relisted,
        unkeyed=doc.unkeyed,
        counts=dict(doc.counts),
        seen=SeenSet(inline),
        seen_version=1 if doc.v == 1 else doc.fp or 2,
        last_new_at=doc.last_new_at,
        last_poll_at=doc.last_poll_at,
        not_found_since=doc.not_found_since,
        failures=doc.failures,
        reason=doc.reason,
        total_processed=doc.total_processed,
        last_sweep_at=doc.last_sweep_at,
        sweep_failures=doc.sweep_failures,
        next_sweep_at=doc.next_sweep_at,
    )
    state.chunks.add(inline)
    return state


class StateRestore:
    """Rebuilds the batches of one state partition from its records, read in order.

    A batch whose summary says stopped or failed at any point of the read is restored
    without its fingerprints (``seen_loaded`` False), and its chunks are not kept while
    the partition is read, only their numbers: what a replica holds, during a restore
    too, does not grow with the batches that were stopped or failed over time. If such
    a batch was tracked again later in the log, it is restored active and unloaded, and
    its first poll reads its fingerprints back.

    ``only``: read those batches alone, whatever their status, with every fingerprint
    (the read that loads batches tracked again).
    """

    def __init__(self, partition: int, only: Iterable[str] | None = None) -> None:
        if isinstance(only, str):
            raise TypeError("only: a collection of batch IDs, not one")
        self.partition = partition
        self.only = None if only is None else frozenset(only)
        self._only_keys = None if only is None else frozenset(b.encode() for b in only)
        self._summaries: dict[str, bytes] = {}
        self._chunks: dict[str, dict[int, bytes]] = {}
        self._parked: set[str] = set()  # batches whose chunks are not kept
        self._last_chunk: dict[str, int] = {}  # of those: the highest chunk number written

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """Take one record; ValueError if its key is not a state key (the record is left
        out; a value that is not understood is reported by ``batches``)."""
        if key is None:
            raise ValueError("no key")
        if self._only_keys is not None and key.partition(_SEPARATOR)[0] not in self._only_keys:
            return  # another batch's record (not parsed: its errors were counted at restore)
        try:
            batch_id, seq = parse_key(key)
        except Exception as exc:
            raise _not_understood(exc) from exc
        if seq is None:
            if value is None:  # forgotten: what follows is a new batch of that ID
                self._summaries.pop(batch_id, None)
                self._chunks.pop(batch_id, None)
                self._parked.discard(batch_id)
                self._last_chunk.pop(batch_id, None)
                return
            self._summaries[batch_id] = value
            if self.only is None and batch_id not in self._parked and _parked(value):
                self._parked.add(batch_id)
                chunks = self._chunks.pop(batch_id, {})
                if chunks:
                    self._last_chunk[batch_id] = max(chunks)
        elif batch_id in self._parked:
            last = self._last_chunk.get(batch_id, -1)
            if value is not None:
                self._last_chunk[batch_id] = max(seq, last)
            elif seq <= last:  # cleared from the last chunk down: chunks 0 to seq - 1 left
                self._last_chunk[batch_id] = seq - 1
        elif value is None:
            self._chunks.get(batch_id, {}).pop(seq, None)
        else:
            self._chunks.setdefault(batch_id, {})[seq] = value

    def batches(self, on_error: Callable[[str, ValueError], None]) -> dict[str, BatchState]:
        """The restored batches; a batch whose records are not understood, whatever the
        decoder raised, is left out (and given to ``on_error`` as a ValueError).

        All at once: for a partition of millions of fingerprints, seconds. A caller on
        the event loop uses ``rebuild`` instead."""
        out: dict[str, BatchState] = {}
        for _ in self.rebuild(on_error, out):
            pass
        return out

    def rebuild(
        self, on_error: Callable[[str, ValueError], None], out: dict[str, BatchState]
    ) -> Generator[None, None, None]:
        """``batches`` a step at a time, for a caller that must not block for long: each
        step (``next``) decodes summaries and builds seen sets of chunks, ``STEP_WORK``
        worth (a millisecond or two, whatever the batches), then yields, so that a caller
        on the event loop lets the rest run between steps::

            batches: dict[str, BatchState] = {}
            for _ in restore.rebuild(refused, batches):
                await asyncio.sleep(0)

        Each batch goes into ``out`` once it is whole (its fingerprints all in): when
        the iterator ends, ``out`` holds what ``batches`` returns. No record may be
        applied once it has begun; closed before its end (its caller cancelled), it
        leaves in ``out`` the batches done so far, and lets go of the rest.
        """
        work = 0
        try:
            for batch_id, value in self._summaries.items():
                chunks = self._chunks.pop(batch_id, {})
                try:
                    state = decode_state(value, self.partition)
                    if state.batch_id != batch_id:  # corrupt, or written under another key
                        raise ValueError(
                            f"the summary under key {batch_id!r} is of batch {state.batch_id!r}"
                        )
                    # (Versions 1 and 2: the fingerprints inline, at most a message's.)
                    work += SUMMARY_WORK + len(state.seen)
                    if self._wanted(state, batch_id):
                        for taken in _load_chunks(state, chunks):
                            work += taken
                            if work >= STEP_WORK:
                                work = 0
                                yield
                except Exception as exc:  # (RecursionError, TypeError… as much as ValueError)
                    on_error(batch_id, _not_understood(exc))
                    continue
                out[batch_id] = state
                if work >= STEP_WORK:
                    work = 0
                    yield
        finally:
            self._summaries.clear()
            self._chunks.clear()
            self._parked.clear()
            self._last_chunk.clear()

    def _wanted(self, state: BatchState, batch_id: str) -> bool:
        """Whether the batch's chunks are to be read into its seen set; if not, it is left
        without them (``_park``), unless its fingerprints are inline (versions 1 and 2)."""
        # A batch finished for good never needs its fingerprints again. (A summary of
        # versions 1 and 2 carries its fingerprints inline: those stay in memory until a
        # commit puts them into chunks.)
        wanted = state.active or state.status in RESUMABLE or self.only is not None
        if state.status in FINAL and self.only is None:
            # (Finished for good: its chunks left to clear, if any.)
            if not state.chunks.unsaved:
                _park(state, self._last_chunk.get(batch_id))
            return False
        if wanted and batch_id in self._parked and not state.chunks.unsaved:
            _park(state, self._last_chunk.get(batch_id))
            return False
        return wanted


def _not_understood(exc: Exception) -> ValueError:
    """Any failure to decode state-topic bytes as the ValueError its callers handle."""
    if isinstance(exc, ValueError):
        return exc
    error = ValueError(f"not understood: {exc!r}"[:300])
    error.__cause__ = exc
    return error


def _parked(summary: bytes) -> bool:
    """Whether a summary record is of a batch finished, stopped or failed (False if not
    understood, however deeply nested or mistyped: ``batches`` reports it)."""
    try:
        return json.loads(summary).get("status") in FINAL
    except Exception:
        return False


def _park(state: BatchState, last_chunk: int | None) -> None:
    """A batch restored without its fingerprints: new ones go after its last chunk."""
    state.seen_loaded = False
    state.chunks = ChunkLog(open_seq=0 if last_chunk is None else last_chunk + 1)


def _load_chunks(state: BatchState, chunks: dict[int, bytes]) -> Iterator[int]:
    """Put a batch's chunks into its seen set: each taken into a ``SeenLoader`` (its bytes
    let go once taken), then the set built of them; yields the fingerprints each step
    took."""
    if not chunks:
        return
    last = max(chunks)
    log = state.chunks
    loader = SeenLoader(len(state.seen) + sum(len(v) for v in chunks.values()) // 8)
    if state.seen:  # inline (versions 1 and 2), should a batch have chunks too
        loader.add(state.seen)
        yield len(state.seen)
    for seq in sorted(chunks):
        fps = decode_chunk(chunks.pop(seq))
        loader.add(fps)
        if seq == last:
            log.open_seq, log.open = last, fps
        yield len(fps)
    state.seen = yield from loader.build()
    if len(log.open) >= CHUNK_FPS:
        log.open_seq, log.open = last + 1, array("Q")
