"""A tracked batch's progress, and its form on the compacted state topic.

The state topic is keyed by batch ID and has as many partitions as the
requests topic, so whoever owns requests partition *p* restores its batches
from state partition *p*. Nothing else stores the service's progress.
"""

from __future__ import annotations

import base64
import json
import sys
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.records import fingerprint, legacy_fingerprint

Status = Literal["tracking", "completed", "expired", "failed", "stopped"]
FINAL: frozenset[str] = frozenset({"completed", "expired", "failed", "stopped"})
# A re-track request resumes these; completed and expired batches are done for good.
RESUMABLE: frozenset[str] = frozenset({"failed", "stopped"})
# 2: ``seen`` holds records.fingerprint values; 1: records.legacy_fingerprint values.
STATE_VERSION = 2


def pack_seen(seen: set[int]) -> str:
    arr = array("Q", seen)
    if sys.byteorder != "little":
        arr.byteswap()
    return base64.b64encode(arr.tobytes()).decode()


def unpack_seen(text: str) -> set[int]:
    arr = array("Q")
    arr.frombytes(base64.b64decode(text, validate=True))
    if sys.byteorder != "little":
        arr.byteswap()
    return set(arr)


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
    counts: dict[str, int] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)  # fingerprints of every event published
    seen_version: int = STATE_VERSION  # the state version whose fingerprints ``seen`` holds
    last_new_at: float | None = None
    last_poll_at: float | None = None
    not_found_since: float | None = None
    failures: int = 0
    reason: str | None = None

    @property
    def active(self) -> bool:
        return self.status == "tracking"

    @property
    def fingerprint(self) -> Callable[[str], int]:
        """How ``seen`` fingerprints an event id: the way of the version that stored it."""
        return fingerprint if self.seen_version == STATE_VERSION else legacy_fingerprint

    @property
    def records_seen(self) -> int:
        return self.published + self.dead_lettered


class _StateDoc(BaseModel):
    model_config = ConfigDict(extra="ignore")

    v: int = Field(ge=1)
    batch_id: str = Field(min_length=1)
    expected_count: int | None = Field(default=None, ge=1)
    generation: int = Field(ge=1)
    status: Status
    tracked_at: float
    cursor: str | None = None
    published: int = Field(ge=0)
    dead_lettered: int = Field(default=0, ge=0)
    counts: dict[str, int] = Field(default_factory=dict)
    seen: str = ""
    last_new_at: float | None = None
    last_poll_at: float | None = None
    not_found_since: float | None = None
    failures: int = Field(default=0, ge=0)
    reason: str | None = None


def encode_state(state: BatchState) -> bytes:
    keep_seen = state.status == "tracking" or state.status in RESUMABLE
    doc: dict[str, Any] = {
        "v": state.seen_version,
        "batch_id": state.batch_id,
        "expected_count": state.expected_count,
        "generation": state.generation,
        "status": state.status,
        "tracked_at": state.tracked_at,
        "cursor": state.cursor,
        "published": state.published,
        "dead_lettered": state.dead_lettered,
        "counts": state.counts,
        "seen": pack_seen(state.seen) if keep_seen else "",
        "last_new_at": state.last_new_at,
        "last_poll_at": state.last_poll_at,
        "not_found_since": state.not_found_since,
        "failures": state.failures,
        "reason": state.reason,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_state(value: bytes, partition: int) -> BatchState:
    """Raise ValueError if the stored state is not understood."""
    doc = _StateDoc.model_validate_json(value)
    return BatchState(
        batch_id=doc.batch_id,
        partition=partition,
        expected_count=doc.expected_count,
        generation=doc.generation,
        status=doc.status,
        tracked_at=doc.tracked_at,
        cursor=doc.cursor,
        published=doc.published,
        dead_lettered=doc.dead_lettered,
        counts=dict(doc.counts),
        seen=unpack_seen(doc.seen) if doc.seen else set(),
        last_new_at=doc.last_new_at,
        last_poll_at=doc.last_poll_at,
        not_found_since=doc.not_found_since,
        failures=doc.failures,
        reason=doc.reason,
        seen_version=1 if doc.v == 1 else STATE_VERSION,
    )
