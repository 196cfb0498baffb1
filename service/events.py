"""Where a record becomes an event: keys, JSON values and CloudEvents headers.

The event format is a public contract (see docs/consuming.md and schemas/);
this module is the one place that writes it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import NamedTuple

import msgspec

from service.records import (
    EVENT_NAMESPACE,
    STATUS_NAMES,
    UNKNOWN_STATUS,
    BalanceRecord,
    InvalidRecord,
)

BALANCE_TYPE = "com.rightfoot.balance.retrieved"
INVALID_TYPE = "com.rightfoot.balance.invalid"
LIFECYCLE_TYPE_PREFIX = "com.rightfoot.batch."
LIFECYCLE_SOURCE = "rightfoot-poller"
LIFECYCLE_EVENTS = ("tracking_started", "completed", "expired", "failed", "stopped")

Headers = list[tuple[str, bytes]]


class OutMessage(NamedTuple):
    """One Kafka message to publish (a tuple: one is built per record)."""

    topic: str
    key: bytes
    value: bytes | None
    headers: Headers
    partition: int | None = None


class BalanceEvents:
    """The balance events of one batch's new records, written only as they are sent.

    A poll holds its new records until their transaction; building each event right
    before the producer copies it, rather than holding thousands of built messages,
    keeps the per-record work in the CPU's cache (docs/performance.md).
    """

    __slots__ = ("_factory", "batch_id", "records")

    def __init__(self, factory: EventFactory, batch_id: str, records: list[BalanceRecord]):
        self._factory = factory
        self.batch_id = batch_id
        self.records = records

    @property
    def topic(self) -> str:
        return self._factory.balances_topic

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[OutMessage]:
        topic = self.topic
        for key, value, headers in self.wire():
            yield OutMessage(topic, key, value, headers)

    def wire(self) -> Iterator[tuple[bytes, bytes, Headers]]:
        """Key, value and headers of each event: what the producer takes."""
        return self._factory.balance_wire(self.batch_id, self.records)


# What a unit of work publishes: single messages, and balance events written when sent.
Publishable = OutMessage | BalanceEvents


def message_count(parts: Sequence[Publishable]) -> int:
    return sum(len(part) if isinstance(part, BalanceEvents) else 1 for part in parts)


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _headers(event_id: str, ce_type: str, source: str, time: str, subject: str) -> Headers:
    return [
        ("ce_specversion", b"1.0"),
        ("ce_id", event_id.encode()),
        ("ce_type", ce_type.encode()),
        ("ce_source", source.encode()),
        ("ce_time", time.encode()),
        ("ce_subject", subject.encode()),
        ("content-type", b"application/json"),
    ]


_SPECVERSION = ("ce_specversion", b"1.0")
_BALANCE_TYPE_HEADER = ("ce_type", BALANCE_TYPE.encode())
_CONTENT_TYPE = ("content-type", b"application/json")


class _BalanceValue(msgspec.Struct, gc=False):
    """A balance event's value, as ``_dumps`` writes its dict: these keys, in this order.

    msgspec's encoder writes it in one C call, with the same compact separators and the
    same string escapes as ``json.dumps(..., ensure_ascii=False)`` (tests/test_fast_paths.py
    compares the bytes).
    """

    event_id: str
    batch_id: str
    authorizer_unique_id: str
    balance: str | None
    balance_status_code: int
    balance_status: str
    timestamp: str


_encode_value = msgspec.json.Encoder().encode


def _dumps(value: Mapping[str, object]) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


class EventFactory:
    """Builds the messages of one deployment's topics."""

    def __init__(self, *, balances_topic: str, batch_events_topic: str, source: str) -> None:
        self.balances_topic = balances_topic
        self.batch_events_topic = batch_events_topic
        self.dlq_topic = f"{balances_topic}.dlq"
        self.source = source
        # What goes before each value's JSON, per topic: nothing (kafka.value_format json),
        # or the Confluent wire format's zero byte and schema id (json_sr, set_prefixes).
        self._prefix: dict[str, bytes] = {}

    def set_prefixes(self, prefixes: Mapping[str, bytes]) -> None:
        """Write every value of these topics after these bytes (the wire format's frame)."""
        self._prefix = dict(prefixes)

    def balance(self, batch_id: str, rec: BalanceRecord) -> OutMessage:
        """The event of one valid record."""
        key, value, headers = next(self.balance_wire(batch_id, (rec,)))
        return OutMessage(self.balances_topic, key, value, headers)

    def balance_wire(
        self, batch_id: str, records: Iterable[BalanceRecord]
    ) -> Iterator[tuple[bytes, bytes, Headers]]:
        """Key, value and headers of each record's event, in order: once per record.

        The value is written by msgspec (``_BalanceValue``), byte for byte what ``_dumps``
        writes for the same dict; what is the same for the whole batch is written once,
        and the constant headers are shared. Anything unusual takes the general path.
        """
        if type(batch_id) is not str:
            for rec in records:
                yield self._balance_general_wire(batch_id, rec)
            return
        encode, value_of, names = _encode_value, _BalanceValue, STATUS_NAMES.get
        subject = ("ce_subject", batch_id.encode())
        source = ("ce_source", self.source.encode())
        prefix = self._prefix.get(self.balances_topic, b"")
        for rec in records:
            uid, balance, code, timestamp, event_id = rec
            if not (
                type(uid) is str
                and type(event_id) is str
                and type(timestamp) is str
                and type(code) is int
                and (balance is None or type(balance) is str)
            ):
                yield self._balance_general_wire(batch_id, rec)
                continue
            status = names(code, UNKNOWN_STATUS)
            value = encode(value_of(event_id, batch_id, uid, balance, code, status, timestamp))
            yield (
                uid.encode(),
                prefix + value if prefix else value,
                [
                    _SPECVERSION,
                    ("ce_id", event_id.encode()),
                    _BALANCE_TYPE_HEADER,
                    source,
                    ("ce_time", timestamp.encode()),
                    subject,
                    _CONTENT_TYPE,
                ],
            )

    def _balance_general(self, batch_id: str, rec: BalanceRecord) -> OutMessage:
        return OutMessage(self.balances_topic, *self._balance_general_wire(batch_id, rec))

    def _balance_general_wire(
        self, batch_id: str, rec: BalanceRecord
    ) -> tuple[bytes, bytes, Headers]:
        value = {
            "event_id": rec.event_id,
            "batch_id": batch_id,
            "authorizer_unique_id": rec.authorizer_unique_id,
            "balance": rec.balance,
            "balance_status_code": rec.balance_status_code,
            "balance_status": rec.balance_status,
            "timestamp": rec.timestamp,
        }
        return (
            rec.authorizer_unique_id.encode(),
            self._prefix.get(self.balances_topic, b"") + _dumps(value),
            _headers(rec.event_id, BALANCE_TYPE, self.source, rec.timestamp, batch_id),
        )

    def invalid(self, batch_id: str, rec: InvalidRecord) -> OutMessage:
        at = utc_now_iso()
        value: dict[str, object] = {
            "event_id": rec.event_id,
            "batch_id": batch_id,
            "reason": rec.reason,
            "detail": rec.detail,
            "raw": rec.raw,
            "at": at,
        }
        if rec.raw_truncated:
            value["raw_truncated"] = True
        return OutMessage(
            topic=self.dlq_topic,
            key=batch_id.encode(),
            value=self._prefix.get(self.dlq_topic, b"") + _dumps(value),
            headers=_headers(rec.event_id, INVALID_TYPE, self.source, at, batch_id),
        )

    def lifecycle(
        self,
        batch_id: str,
        event: str,
        *,
        generation: int,
        tracked_at: float,
        expected_count: int | None,
        records_published: int,
        counts_by_status: dict[str, int] | None = None,
        reason: str | None = None,
        records_dead_lettered: int | None = None,
        total_processed: int | None = None,
        records_relisted: int | None = None,
    ) -> OutMessage:
        """A lifecycle event; its id is deterministic per batch, tracking and event: the
        tracking is its generation and when it began (``tracked_at``), as a batch forgotten
        after its retention and tracked anew starts again at generation 1, and its events
        must not take the ids of the first tracking's (a consumer would drop them)."""
        if event not in LIFECYCLE_EVENTS:
            raise ValueError(f"unknown lifecycle event {event!r}")
        name = f"{batch_id}\x1f{generation}\x1f{event}\x1f{tracked_at!r}"
        event_id = str(uuid.uuid5(EVENT_NAMESPACE, name))
        at = utc_now_iso()
        value: dict[str, object] = {
            "event_id": event_id,
            "batch_id": batch_id,
            "event": event,
            "at": at,
            "expected_count": expected_count,
            "records_published": records_published,
        }
        if event != "tracking_started":
            value["counts_by_status"] = counts_by_status or {}
            value["records_dead_lettered"] = records_dead_lettered or 0
            value["records_relisted"] = records_relisted or 0
            if total_processed is not None:
                value["total_processed"] = total_processed
        if reason is not None:
            value["reason"] = reason
        return OutMessage(
            topic=self.batch_events_topic,
            key=batch_id.encode(),
            value=self._prefix.get(self.batch_events_topic, b"") + _dumps(value),
            headers=_headers(
                event_id, LIFECYCLE_TYPE_PREFIX + event, LIFECYCLE_SOURCE, at, batch_id
            ),
        )
