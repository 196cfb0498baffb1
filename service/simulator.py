"""A local simulator of the Rightfoot API, with injectable faults.

It serves the two endpoints the project talks to, as the vendor pages describe them:

* ``GET /v1/balances?batchId=…&limit=…&nextPageToken=…`` — the processed results of one
  batch, paginated, with Bearer authentication and the documented error bodies;
* ``GET /v1/balances/export?batch_ids=…`` — the CSV export of one or more batches,
  streamed in chunks.

Batches are held in memory. Each record has a ``visible_at`` offset, so results appear
over time the way a batch being processed does. Time comes from an injectable clock, so
tests can move it by hand.

By default a batch is listed in completion order: records append as they finish,
``total_processed`` is the visible count, and a page token means "start after the first
N records", which is stable because records only ever append. The vendor pages allow
other shapes (the order of the list is not documented, and their example lists
timestamps out of time order; nothing bounds a batch's size), and a batch can be given
them (:meth:`Simulator.add_batch`, :meth:`Simulator.generate_batch`, ``POST /_sim/batches``):

* ``order="submission"``: the list is in submission order and each record is listed once
  it has finished, possibly at a position a client has already paged past; a page token
  names the position of the last record listed and the next page starts after it, so a
  client that only resumes from its last token misses records that finish behind it
  (a full re-read from the first page sees them). Timestamps (finish times) are then out
  of time order in the list;
* ``total_processed="absent"`` omits the field; ``count_skew`` (an integer) is added to
  the served count (at least 0), a count that disagrees with what is ever listed;
* ``lazy=True`` (automatic above ``LAZY_THRESHOLD`` = 100,000 records): no record objects
  are held; each record is derived from (seed, position) with splitmix64 when read, and
  the batch keeps about 8 bytes per record in completion order, 17 in submission order
  (finish times, finish order, its inverse, a visibility byte map). A million records
  take about a second to make. :meth:`Simulator.iter_records` and
  :meth:`Simulator.record_count` read them without materialising the batch;
  :meth:`Simulator.all_records` and :meth:`Simulator.records_served` build lists.

Faults (5xx, 429, latency, hangs, malformed bodies, rejected page tokens) are set on
:attr:`Simulator.faults`, directly or through the unauthenticated control API:

* ``GET|POST /_sim/faults`` — read, or partially update, the :class:`Faults` fields
  (``error_5xx_for_s`` sets ``error_5xx_until`` relative to the simulator clock, whose
  current value ``GET`` returns as ``now``);
* ``GET|POST /_sim/batches`` — list batches, or generate one
  (``{"batch_id", "count", "spread_s", "seed", "visible_after", "codes", "with_metadata",
  "owner_key", "order", "total_processed", "count_skew", "lazy"}``, see
  :meth:`Simulator.generate_batch`; a bad value answers 400 ``{"error": ...}``);
* ``GET /_sim/batches/{id}/records[?offset=&limit=]`` — the records visible now, in list
  order, balances as strings (streamed for lazy batches);
* ``GET /_sim/requests`` — the request log;
* ``POST /_sim/keys`` (``{"api_keys": [...]}``) and ``POST /_sim/invalidate-tokens``.

``rightfoot-poller simulate`` runs it with a few demo batches (:meth:`Simulator.seed_demo`).

Plain HTTP on loopback stands in for the vendor's HTTPS.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import contextlib
import csv
import hashlib
import hmac
import io
import itertools
import json
import math
import operator
import random
import re
import secrets
import signal
import time
import typing
import uuid
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

log = structlog.get_logger(__name__)

DEFAULT_API_KEY = "sim-key"
DOCS_URL = "https://api.rightfoot.com/docs"
MAX_LIMIT = 100
EXPORT_CHUNK_BYTES = 64 * 1024

#: The codes of the vendor's ``balance_status_code`` table (3001 is missing from its enum).
DOCUMENTED_STATUS_CODES = (0, 3000, 3001, 3100, 3200, 3300, 3310, 3400, 9000)
#: The fixed leading columns of the CSV export, in order.
EXPORT_COLUMNS = (
    "Authorizer ID",
    "Batch ID",
    "Institution",
    "Phone",
    "Zip",
    "Balance",
    "Status",
    "Creator",
    "Timestamp",
)
_EXPORT_STATUS = {
    0: "SUCCESS",
    3000: "NO_MATCH",
    3001: "NO_MATCH",
    3100: "NO_MATCH",
    3400: "NO_MATCH",
    3200: "ACCOUNT_CLOSED",
    3300: "BANK_UNSUPPORTED",
    3310: "BANK_UNSUPPORTED",
    9000: "PROCESSING_ERROR",
}

#: Demo batches (see :meth:`Simulator.seed_demo`); all valid UUIDs, so they can be exported.
DEMO_CODES_BATCH_ID = "5d3c6bbb-fc1a-46a4-93da-1ce4a54b0d83"
DEMO_LARGE_BATCH_ID = "6a1d2c3b-4e5f-4a6b-8c7d-000000001250"
DEMO_LATE_BATCH_ID = "7b2e3d4c-5f6a-4b7c-9d8e-000000000020"
DEMO_METADATA_BATCH_ID = "8c3f4e5d-6a7b-4c8d-ae9f-000000000004"
#: A batch that never exists: 404 forever.
DEMO_MISSING_BATCH_ID = "00000000-0000-4000-8000-000000000404"
DEMO_LARGE_COUNT = 1250
DEMO_LATE_AFTER_S = 20.0

#: How a batch lists its records (see :meth:`Simulator.add_batch`).
ORDERS = ("completion", "submission")
#: What a batch serves as ``total_processed`` (see :meth:`Simulator.add_batch`).
TOTAL_PROCESSED_MODES = ("exact", "absent")
#: :meth:`Simulator.generate_batch` makes bigger batches lazy unless told otherwise.
LAZY_THRESHOLD = 100_000
#: Positions of a lazy batch are 32-bit (``array("I")``).
MAX_LAZY_COUNT = 2**32 - 1

MALFORMED_KINDS = ("truncated_json", "not_an_object", "balances_not_a_list", "wrong_types")

_UUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_USER_AGENT_RE = re.compile(r"rightfoot-poller/\S+ \((?P<instance>[^)]*)\)")
_DIGITS_RE = re.compile(r"[0-9]{1,6}")
_TOKEN_MAC_BYTES = 16
_SYNTHETIC_EPOCH = datetime(2024, 8, 9, 12, 0, 0, tzinfo=UTC)
# splitmix64: the k-th value of a stream is mix(seed + k * gamma); each lazy record owns
# eight consecutive values (_G1.._G6 pick one).
_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_LAZY_STRIDE = 8 * _GAMMA
_G1, _G2, _G3, _G4, _G5, _G6 = (k * _GAMMA for k in range(1, 7))


# --------------------------------------------------------------------------- data


@dataclass(slots=True)
class SimRecord:
    """One BalanceRecord as served, plus the fields only the CSV export shows."""

    authorizer_unique_id: str
    balance: Decimal | None
    balance_status_code: int
    timestamp: str
    #: Seconds after the batch becomes visible at which this record appears.
    visible_at: float
    institution: str = ""
    phone: str = ""
    zip: str = ""
    creator: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    #: Serialise only the deprecated ``status_code``, without ``balance_status_code``.
    legacy_only: bool = False
    #: If set, this exact JSON text is served in place of the record.
    raw_override: str | None = None


@dataclass
class Faults:
    """Faults injected into the API endpoints; change them at any time.

    Counters (``*_next``) go down by one each time their fault is served. Faults apply to
    ``/v1/balances`` and the export (not to ``/_sim/``); with ``only_batch`` set, only to
    requests for that batch. Checked before authentication, in this order: latency, hang,
    5xx, 429; then, for a request that would otherwise succeed, rejected page token and
    malformed body.
    """

    #: The next N API requests answer 500, 502, 503 (cycling).
    error_5xx_next: int = 0
    #: API requests answer 5xx while the simulator clock is before this time.
    error_5xx_until: float = 0.0
    #: Probability (0..1) that an API request answers 5xx.
    error_5xx_rate: float = 0.0
    #: The next N API requests answer 429 with ``Retry-After``.
    rate_limit_next: int = 0
    #: Probability (0..1) that an API request answers 429.
    rate_limit_rate: float = 0.0
    #: Seconds announced by ``Retry-After`` (rounded up to whole seconds).
    retry_after_s: float = 1.0
    #: Delay added to every API request.
    latency_s: float = 0.0
    #: The next N API requests wait ``hang_s`` before answering.
    hang_next: int = 0
    hang_s: float = 60.0
    #: The next N answers that would be a 200 page carry a broken body (see MALFORMED_KINDS).
    malformed_next: int = 0
    #: The next N requests that carry a ``nextPageToken`` answer 400 INVALID_PAGE_TOKEN.
    reject_token_next: int = 0
    #: Restrict all faults to requests for this batch ID.
    only_batch: str | None = None

    def update(self, changes: Mapping[str, object]) -> None:
        """Apply a partial update, checking names and types; ValueError when invalid."""
        hints = typing.get_type_hints(Faults)
        checked = {
            name: _check_fault_value(name, hints.get(name), v) for name, v in changes.items()
        }
        for name, value in checked.items():
            setattr(self, name, value)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _check_fault_value(name: str, hint: object, value: object) -> object:
    if hint is None:
        known = ", ".join(f.name for f in fields(Faults))
        raise ValueError(f"unknown fault {name!r}; known: {known}")
    if hint == str | None:
        if value is None or isinstance(value, str):
            return value
        raise ValueError(f"{name} must be a string or null")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number")
    if hint is int and not isinstance(value, int):
        raise ValueError(f"{name} must be an integer")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0")
    return value if hint is int else float(value)


@dataclass
class RequestLogEntry:
    """One API request the simulator answered (control requests are not logged)."""

    started: float
    ended: float
    method: str
    path: str
    #: ``batchId``, or the comma-joined ``batch_ids`` of an export, else None.
    batch_id: str | None
    #: The HTTP status answered; 499 when the client went away or the server shut down.
    status: int
    #: The text in parentheses of ``rightfoot-poller/<ver> (<instance>)``, else None.
    instance: str | None
    user_agent: str
    query: str = ""

    def to_json(self) -> dict[str, object]:
        return asdict(self)


class _Shape:
    """How a batch is listed and counted (see :meth:`Simulator.add_batch`)."""

    __slots__ = ("count_skew", "order", "total_processed")

    def __init__(self, order: str, total_processed: str, count_skew: int) -> None:
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(map(repr, ORDERS))}")
        if total_processed not in TOTAL_PROCESSED_MODES:
            modes = ", ".join(map(repr, TOTAL_PROCESSED_MODES))
            raise ValueError(f"total_processed must be one of {modes}")
        if isinstance(count_skew, bool) or not isinstance(count_skew, int):
            raise ValueError("count_skew must be an integer")
        self.order = order
        self.total_processed = total_processed
        self.count_skew = count_skew


class _Batch:
    """One batch: its records by position, when each appears, and how it is listed.

    A record's *position* is its place in the full list. In completion order the list is
    sorted by ``visible_at`` (ties keep insertion order), so the visible records are a
    prefix and ``finish`` is None. In submission order the list keeps the submission
    order; ``finish[r]`` is the position of the r-th record to appear, ``rank`` its
    inverse, and ``visible`` a byte per position (1 once the record has appeared, kept up
    to date lazily up to ``advanced`` appearances). Either way ``appear`` holds the
    ``visible_at`` times in the order records appear, so the first ``k`` to appear by
    ``now`` are found by bisection, and "visible at now" is "among the first k".
    """

    __slots__ = (
        "added_at",
        "advanced",
        "appear",
        "batch_id",
        "count",
        "finish",
        "owner_key",
        "rank",
        "records",
        "shape",
        "source",
        "visible",
        "visible_after",
    )

    def __init__(
        self,
        batch_id: str,
        *,
        records: list[SimRecord] | None,
        source: _LazySource | None,
        appear: Sequence[float],
        finish: array[int] | None,
        shape: _Shape,
        added_at: float,
        visible_after: float,
        owner_key: str | None,
    ) -> None:
        self.batch_id = batch_id
        self.records = records  # eager batches: every record, by position
        self.source = source  # lazy batches: records derived on demand
        self.count = len(records) if records is not None else len(source or ())
        self.appear = appear
        self.finish = finish
        self.rank: array[int] | None = None
        self.visible: bytearray | None = None
        self.advanced = 0
        if finish is not None:
            self.rank = array("I", bytes(4 * self.count))
            for r, position in enumerate(finish):
                self.rank[position] = r
            self.visible = bytearray(self.count)
        self.shape = shape
        self.added_at = added_at
        self.visible_after = visible_after
        self.owner_key = owner_key

    @property
    def lazy(self) -> bool:
        return self.source is not None

    def visible_count(self, now: float) -> int | None:
        """How many records are visible at ``now``; None while the batch does not exist."""
        elapsed = now - self.added_at - self.visible_after
        if elapsed < 0:
            return None
        return bisect.bisect_right(self.appear, elapsed)

    def readable_by(self, key: str) -> bool:
        return self.owner_key is None or self.owner_key == key

    def reported_total(self, count: int) -> int | None:
        """``total_processed`` as served for ``count`` visible records; None: omitted."""
        if self.shape.total_processed == "absent":
            return None
        return max(0, count + self.shape.count_skew)

    def record_at(self, position: int) -> SimRecord:
        if self.records is not None:
            return self.records[position]
        assert self.source is not None
        return self.source.record(position)

    def positions_after(self, count: int, after: int) -> Iterator[int]:
        """Positions > ``after`` of the first ``count`` records to appear, in list order."""
        if self.finish is None:
            yield from range(max(after + 1, 0), count)
            return
        visible, rank = self._advance(count)
        position = visible.find(1, after + 1)
        while position != -1:
            # the map may run ahead of ``count`` (an older snapshot, or a newer request)
            if self.advanced == count or rank[position] < count:
                yield position
            position = visible.find(1, position + 1)

    def _advance(self, count: int) -> tuple[bytearray, array[int]]:
        """Bring the visibility map up to (at least) the first ``count`` appearances."""
        visible, finish, rank = self.visible, self.finish, self.rank
        assert visible is not None and finish is not None and rank is not None
        if count > self.advanced:
            if count == self.count:
                visible[:] = b"\x01" * self.count
            else:
                for position in finish[self.advanced : count]:
                    visible[position] = 1
            self.advanced = count
        return visible, rank

    def page(self, count: int, cursor: int | None, limit: int) -> tuple[Sequence[int], int | None]:
        """The positions of one page and the cursor of the next page (None: no more).

        The cursor is what a page token carries. Completion order: the number of records
        listed before the next page. Submission order: the position of the last record
        listed, the next page starting after it.
        """
        if self.finish is None:
            offset = cursor or 0
            end = min(offset + limit, count)
            return range(min(offset, count), end), (end if end < count else None)
        after = -1 if cursor is None else cursor
        positions = list(itertools.islice(self.positions_after(count, after), limit))
        last = positions[-1] if positions else after
        has_more = next(self.positions_after(count, last), None) is not None
        return positions, (last if has_more else None)

    def iter_visible(self, count: int) -> Iterator[SimRecord]:
        """The first ``count`` records to appear, in list order."""
        if self.records is not None and self.finish is None:
            return itertools.islice(self.records, count)
        return map(self.record_at, self.positions_after(count, -1))

    def iter_all(self) -> Iterator[SimRecord]:
        if self.records is not None:
            return iter(self.records)
        return map(self.record_at, range(self.count))

    def meta_keys(self, count: int) -> set[str]:
        """The metadata keys of the first ``count`` records to appear."""
        if self.source is None:
            keys: set[str] = set()
            for record in self.iter_visible(count):
                if record.metadata:
                    keys.update(record.metadata)
            return keys
        return self.source.meta_keys(self.positions_after(count, -1))


class _LazySource:
    """Synthetic records derived on demand from (key, position): no SimRecord is kept.

    Per record it holds only ``appear`` (8 bytes; the ``visible_at`` times in the order
    records appear) and, in submission order, the batch's ``rank`` (4 bytes) to find a
    position's time. Every other field comes from splitmix64 of the key and position.
    """

    __slots__ = ("_stamps", "appear", "codes", "first_id", "key", "rank", "start", "with_metadata")

    def __init__(
        self,
        key: int,
        appear: array[float],
        codes: Sequence[int] | None,
        with_metadata: bool,
    ) -> None:
        self.key = key
        self.appear = appear
        self.rank: array[int] | None = None  # set for submission order
        self.codes = tuple(codes) if codes else ()
        self.with_metadata = with_metadata
        self.first_id = 1_000_000 + _mix64(key) % 7_000_000
        self.start = _SYNTHETIC_EPOCH + timedelta(seconds=_mix64(key ^ 1) % (30 * 86_400))
        self._stamps: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.appear)

    def visible_at(self, position: int) -> float:
        return self.appear[position if self.rank is None else self.rank[position]]

    def record(self, i: int) -> SimRecord:
        if not 0 <= i < len(self.appear):
            raise IndexError(i)
        base = self.key + i * _LAZY_STRIDE
        visible_at = self.visible_at(i)
        code = self.codes[i % len(self.codes)] if self.codes else _lazy_code(_mix64(base + _G1))
        return SimRecord(
            authorizer_unique_id=f"{self.first_id + i:07d}",
            balance=_lazy_balance(base) if code == 0 else None,
            balance_status_code=code,
            timestamp=self._stamp(int(visible_at)),
            visible_at=visible_at,
            institution=_INSTITUTIONS[i % len(_INSTITUTIONS)],
            phone=f"+1{2_000_000_000 + _mix64(base + _G4) % 7_000_000_000}" if i % 3 else "",
            zip=f"{501 + _mix64(base + _G5) % 99_000:05d}",
            metadata=_synthetic_metadata(i) if self.with_metadata else {},
        )

    def _stamp(self, second: int) -> str:
        stamp = self._stamps.get(second)
        if stamp is None:
            if len(self._stamps) >= 4096:
                self._stamps.clear()
            stamp = self._stamps[second] = _iso(self.start + timedelta(seconds=second))
        return stamp

    def meta_keys(self, positions: Iterable[int]) -> set[str]:
        """The keys of :func:`_synthetic_metadata` over these positions, without records."""
        keys: set[str] = set()
        if not self.with_metadata:
            return keys
        for i in positions:
            keys.update(("customer_ref", "region"))
            if i % 3 == 0:
                keys.add("loan_officer")
                break
        return keys


class LazyRecords(Sequence[SimRecord]):
    """The records of a lazy batch, in list order, each derived when it is read.

    What :meth:`Simulator.generate_batch` returns for a lazy batch: ``len``, indexing and
    iteration work without holding the records; ``list(...)`` materialises them.
    """

    def __init__(self, batch: _Batch) -> None:
        self._batch = batch

    def __len__(self) -> int:
        return self._batch.count

    @typing.overload
    def __getitem__(self, index: int) -> SimRecord: ...

    @typing.overload
    def __getitem__(self, index: slice) -> list[SimRecord]: ...

    def __getitem__(self, index: int | slice) -> SimRecord | list[SimRecord]:
        if isinstance(index, slice):
            return [self._batch.record_at(i) for i in range(self._batch.count)[index]]
        if index < 0:
            index += self._batch.count
        return self._batch.record_at(index)

    def __iter__(self) -> Iterator[SimRecord]:
        return self._batch.iter_all()


class _BadRequest(Exception):
    """A control-API request body that cannot be used (answered 400)."""


# --------------------------------------------------------------------------- tokens


class _PageTokens:
    """Opaque, signed page tokens: base64url(mac || "generation:offset:batch_id").

    The number is the batch's cursor (see :meth:`_Batch.page`): in completion order how
    many records were listed before the next page, in submission order the position of
    the last record listed.
    """

    def __init__(self) -> None:
        self._secret = secrets.token_bytes(32)
        self.generation = 0

    def issue(self, batch_id: str, offset: int) -> str:
        payload = f"{self.generation}:{offset}:{batch_id}".encode()
        raw = self._mac(payload) + payload
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    def offset_for(self, token: str, batch_id: str) -> int | None:
        """The offset a token stands for, or None if it is not valid for this batch now."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except ValueError:
            return None
        mac, payload = raw[:_TOKEN_MAC_BYTES], raw[_TOKEN_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(payload)):
            return None
        generation, offset, token_batch = payload.decode().split(":", 2)
        if int(generation) != self.generation or token_batch != batch_id:
            return None
        return int(offset)

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()[:_TOKEN_MAC_BYTES]


# --------------------------------------------------------------------------- simulator


class Simulator:
    """The simulated Rightfoot account: API keys, batches, faults and a request log."""

    def __init__(
        self,
        *,
        api_keys: Iterable[str] = (DEFAULT_API_KEY,),
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api_keys: frozenset[str] = frozenset(api_keys)
        self.seed = seed
        self.clock = clock
        self.faults = Faults()
        self.request_log: list[RequestLogEntry] = []
        self._batches: dict[str, _Batch] = {}
        self._tokens = _PageTokens()
        self._rng = random.Random(f"faults:{seed}")
        self._served_5xx = 0
        self._served_malformed = 0

    # -- accounts and batches

    def set_api_keys(self, keys: Iterable[str]) -> None:
        """Replace the accepted API keys (requests with any other key get 401)."""
        self.api_keys = frozenset(keys)
        log.info("simulator api keys set", count=len(self.api_keys))

    def invalidate_page_tokens(self) -> None:
        """Make every page token issued so far invalid (400 on use)."""
        self._tokens.generation += 1
        log.info("simulator page tokens invalidated", generation=self._tokens.generation)

    def add_batch(
        self,
        batch_id: str,
        records: list[SimRecord],
        *,
        owner_key: str | None = None,
        visible_after: float = 0.0,
        order: str = "completion",
        total_processed: str = "exact",
        count_skew: int = 0,
    ) -> None:
        """Add a batch; it answers 404 for ``visible_after`` seconds, then exists.

        Record ``visible_at`` offsets count from the moment the batch becomes visible.
        ``owner_key`` None means every configured key may read it.

        ``order``: ``"completion"`` lists records in the order they appear (sorted by
        ``visible_at``, ties in the given order), so new records only ever append;
        ``"submission"`` lists them in the given order, each once it has appeared, so a
        record can appear before positions a client has already paged past.
        ``total_processed``: ``"exact"`` serves the visible count plus ``count_skew``
        (at least 0); ``"absent"`` omits the field (``count_skew`` is then unused).
        """
        shape = _Shape(order, total_processed, count_skew)
        if batch_id in self._batches:
            raise ValueError(f"batch {batch_id!r} already exists")
        for record in records:
            if record.balance is not None and not record.balance.is_finite():
                raise ValueError(f"balance of {record.authorizer_unique_id!r} is not finite")
        finish: array[int] | None = None
        if order == "completion":
            listed = sorted(records, key=lambda r: r.visible_at)  # stable: ties keep their order
            appear = [r.visible_at for r in listed]
        else:
            listed = list(records)
            ranked = sorted(range(len(listed)), key=lambda i: listed[i].visible_at)
            finish = array("I", ranked)
            appear = [listed[i].visible_at for i in ranked]
        self._batches[batch_id] = _Batch(
            batch_id,
            records=listed,
            source=None,
            appear=appear,
            finish=finish,
            shape=shape,
            added_at=self.clock(),
            visible_after=visible_after,
            owner_key=owner_key,
        )
        log.info("simulator batch added", batch_id=batch_id, records=len(records), order=order)

    def generate_batch(
        self,
        batch_id: str,
        count: int,
        *,
        spread_s: float = 0.0,
        seed: int | None = None,
        codes: Sequence[int] | None = None,
        with_metadata: bool = False,
        owner_key: str | None = None,
        visible_after: float = 0.0,
        order: str = "completion",
        total_processed: str = "exact",
        count_skew: int = 0,
        lazy: bool | None = None,
    ) -> Sequence[SimRecord]:
        """Add a batch of ``count`` deterministic synthetic records and return them.

        Records appear at random times spread uniformly over ``spread_s`` seconds; in
        completion order in ascending ID order, in submission order each at its own
        random time, so they finish out of ID order. ``codes`` are assigned in turn
        (record i gets ``codes[i % len(codes)]``); without them about 85% succeed. The
        same (simulator seed, batch ID) or the same ``seed`` always gives the same
        records. ``order``, ``total_processed`` and ``count_skew``: see :meth:`add_batch`.

        ``lazy`` (default: when ``count`` > ``LAZY_THRESHOLD``) keeps no record objects:
        each record is derived from (seed, position) when read, at about 8 bytes per
        record in completion order and 17 in submission order. Lazy records are not the
        ones an eager batch of the same seed holds. The result is then a
        :class:`LazyRecords` view; otherwise the list of records. Both are in list order.
        """
        if codes is not None and not codes:
            raise ValueError("codes must not be empty")
        shape = _Shape(order, total_processed, count_skew)
        if lazy or (lazy is None and count > LAZY_THRESHOLD):
            return self._generate_lazy(
                batch_id,
                count,
                spread_s=spread_s,
                seed=seed,
                codes=codes,
                with_metadata=with_metadata,
                owner_key=owner_key,
                visible_after=visible_after,
                shape=shape,
            )
        rng = random.Random(f"batch:{self.seed}:{batch_id}" if seed is None else seed)
        sort_times = order == "completion"
        records = _synthetic_records(rng, count, spread_s, codes, with_metadata, sort_times)
        self.add_batch(
            batch_id,
            records,
            owner_key=owner_key,
            visible_after=visible_after,
            order=order,
            total_processed=total_processed,
            count_skew=count_skew,
        )
        return records

    def _generate_lazy(
        self,
        batch_id: str,
        count: int,
        *,
        spread_s: float,
        seed: int | None,
        codes: Sequence[int] | None,
        with_metadata: bool,
        owner_key: str | None,
        visible_after: float,
        shape: _Shape,
    ) -> LazyRecords:
        if batch_id in self._batches:
            raise ValueError(f"batch {batch_id!r} already exists")
        if not 0 <= count <= MAX_LAZY_COUNT:
            raise ValueError(f"count of a lazy batch must be from 0 to {MAX_LAZY_COUNT}")
        text = f"batch:{self.seed}:{batch_id}" if seed is None else f"seed:{seed}"
        key = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
        rng = random.Random(key)
        source = _LazySource(key, _sorted_uniform_times(rng, count, spread_s), codes, with_metadata)
        finish = None
        if shape.order == "submission":
            finish = array("I", range(count))
            rng.shuffle(finish)  # finish[r]: the position of the r-th record to appear
        batch = _Batch(
            batch_id,
            records=None,
            source=source,
            appear=source.appear,
            finish=finish,
            shape=shape,
            added_at=self.clock(),
            visible_after=visible_after,
            owner_key=owner_key,
        )
        source.rank = batch.rank
        self._batches[batch_id] = batch
        log.info("simulator lazy batch added", batch_id=batch_id, records=count, order=shape.order)
        return LazyRecords(batch)

    def batch_ids(self) -> list[str]:
        return list(self._batches)

    def record_count(self, batch_id: str) -> int:
        """How many records the batch holds, visible or not."""
        return self._batches[batch_id].count

    def visible_count(self, batch_id: str) -> int:
        """How many records are visible now (0 while the batch is not visible)."""
        return self._batches[batch_id].visible_count(self.clock()) or 0

    def iter_records(self, batch_id: str, *, visible_only: bool = False) -> Iterator[SimRecord]:
        """The batch's records in list order, each built as it is reached (lazy batches).

        ``visible_only``: only those visible now (the set is fixed when this is called).
        """
        batch = self._batches[batch_id]
        if not visible_only:
            return batch.iter_all()
        return batch.iter_visible(batch.visible_count(self.clock()) or 0)

    def records_served(self, batch_id: str) -> list[SimRecord]:
        """The records visible now, in served order ([] while the batch is not visible).

        Materialises them: for big lazy batches prefer :meth:`iter_records`.
        """
        return list(self.iter_records(batch_id, visible_only=True))

    def all_records(self, batch_id: str) -> list[SimRecord]:
        """Every record of the batch, visible or not, in served order.

        Materialises the whole batch (a list of ``record_count`` records): for big lazy
        batches prefer :meth:`iter_records` and :meth:`record_count`.
        """
        return list(self.iter_records(batch_id))

    def page_token_cursor(self, batch_id: str, token: str) -> int | None:
        """What a page token of this batch names, or None if it is not valid now.

        Completion order: how many records were listed before the next page. Submission
        order: the position (submission index) of the last record listed.
        """
        return self._tokens.offset_for(token, batch_id)

    def seed_demo(self, *, spread_s: float = 120.0) -> list[str]:
        """Add the demo batches and return their IDs, in this order:

        1. ``DEMO_CODES_BATCH_ID``: one record per documented status code plus the
           undocumented 3500, null balances for failures, a ``legacy_only`` record and
           exact balances such as 98765432109876543.21, -0.01 and 0.10;
        2. ``DEMO_LARGE_BATCH_ID``: 1,250 records (13 pages of 100);
        3. ``DEMO_LATE_BATCH_ID``: 404 for the first 20 s, then 40 records;
        4. ``DEMO_METADATA_BATCH_ID``: 25 records with metadata, all visible at once.

        Records of batches 1 to 3 appear over ``spread_s`` seconds. ``DEMO_MISSING_BATCH_ID``
        is never added.
        """
        self.add_batch(DEMO_CODES_BATCH_ID, _demo_code_records(spread_s))
        self.generate_batch(DEMO_LARGE_BATCH_ID, DEMO_LARGE_COUNT, spread_s=spread_s)
        self.generate_batch(
            DEMO_LATE_BATCH_ID, 40, spread_s=spread_s, visible_after=DEMO_LATE_AFTER_S
        )
        self.generate_batch(DEMO_METADATA_BATCH_ID, 25, with_metadata=True)
        return [
            DEMO_CODES_BATCH_ID,
            DEMO_LARGE_BATCH_ID,
            DEMO_LATE_BATCH_ID,
            DEMO_METADATA_BATCH_ID,
        ]

    # -- reading, as the API does

    def _readable(self, batch_id: str, key: str) -> tuple[_Batch, int] | None:
        """The batch and its visible count, if it exists now for this key."""
        batch = self._batches.get(batch_id)
        if batch is None or not batch.readable_by(key):
            return None
        count = batch.visible_count(self.clock())
        return None if count is None else (batch, count)

    # -- faults

    def _in_scope(self, batch_ids: Sequence[str]) -> bool:
        only = self.faults.only_batch
        return only is None or only in batch_ids

    def _take_hang(self, batch_ids: Sequence[str]) -> float:
        if self.faults.hang_next > 0 and self._in_scope(batch_ids):
            self.faults.hang_next -= 1
            return self.faults.hang_s
        return 0.0

    def _take_error_status(self, batch_ids: Sequence[str]) -> int | None:
        """429 or a 5xx status to answer instead of the real response, if any."""
        if not self._in_scope(batch_ids):
            return None
        f = self.faults
        if f.error_5xx_next > 0 or self.clock() < f.error_5xx_until or self._roll(f.error_5xx_rate):
            f.error_5xx_next = max(0, f.error_5xx_next - 1)
            status = (500, 502, 503)[self._served_5xx % 3]
            self._served_5xx += 1
            return status
        if f.rate_limit_next > 0 or self._roll(f.rate_limit_rate):
            f.rate_limit_next = max(0, f.rate_limit_next - 1)
            return 429
        return None

    def _take_token_reject(self, batch_id: str) -> bool:
        if self.faults.reject_token_next > 0 and self._in_scope([batch_id]):
            self.faults.reject_token_next -= 1
            return True
        return False

    def _take_malformed(self, batch_id: str) -> str | None:
        if self.faults.malformed_next > 0 and self._in_scope([batch_id]):
            self.faults.malformed_next -= 1
            kind = MALFORMED_KINDS[self._served_malformed % len(MALFORMED_KINDS)]
            self._served_malformed += 1
            return kind
        return None

    def _roll(self, rate: float) -> bool:
        return rate > 0 and self._rng.random() < rate


# --------------------------------------------------------------------------- synthetic data

_INSTITUTIONS = (
    "Chase",
    "Bank of America",
    "Wells Fargo Bank, N.A.",
    "Navy Federal Credit Union",
    'The "Hometown" Savings Bank',
    "Capital One",
)
_REGIONS = ("north", "south", "east", "west")
_FAILURE_CODES = (3000, 3001, 3100, 3200, 3300, 3310, 3400, 9000)


def _synthetic_records(
    rng: random.Random,
    count: int,
    spread_s: float,
    codes: Sequence[int] | None,
    with_metadata: bool,
    sort_times: bool = True,
) -> list[SimRecord]:
    # int(rng.random() * n) rather than randrange: several times faster, for big batches
    appear = None
    if spread_s > 0:
        appear = [spread_s * rng.random() for _ in range(count)]
        if sort_times:
            appear.sort()
    first_id = rng.randrange(1_000_000, 8_000_000)
    start = _SYNTHETIC_EPOCH + timedelta(seconds=rng.randrange(0, 30 * 86_400))
    stamps: dict[int, str] = {}
    records = []
    for i in range(count):
        visible_at = appear[i] if appear is not None else 0.0
        second = int(visible_at)
        if second not in stamps:
            stamps[second] = _iso(start + timedelta(seconds=second))
        code = codes[i % len(codes)] if codes else _synthetic_code(rng)
        records.append(
            SimRecord(
                authorizer_unique_id=f"{first_id + i:07d}",
                balance=_synthetic_balance(rng) if code == 0 else None,
                balance_status_code=code,
                timestamp=stamps[second],
                visible_at=visible_at,
                institution=_INSTITUTIONS[i % len(_INSTITUTIONS)],
                phone=f"+1{2_000_000_000 + int(rng.random() * 7e9)}" if i % 3 else "",
                zip=f"{501 + int(rng.random() * 99_000):05d}",
                metadata=_synthetic_metadata(i) if with_metadata else {},
            )
        )
    return records


def _synthetic_code(rng: random.Random) -> int:
    return 0 if rng.random() < 0.85 else rng.choice(_FAILURE_CODES)


def _synthetic_balance(rng: random.Random) -> Decimal:
    """Exact two-decimal amounts: mostly everyday, some negative, a few enormous."""
    roll = rng.random()
    if roll < 0.01:
        cents = rng.randrange(10**19, 10**20)
    elif roll < 0.11:
        cents = -1 - int(rng.random() * 500_000)
    else:
        cents = int(rng.random() * 5_000_000)
    return Decimal(cents).scaleb(-2)


def _sorted_uniform_times(rng: random.Random, count: int, spread_s: float) -> array[float]:
    """``count`` sorted uniform times over [0, spread_s], without sorting a list of them.

    The k-th of n sorted uniforms is the sum of k exponential gaps over the sum of n + 1;
    with gaps log(1 - u) (negative), every step runs in C iterators.
    """
    if spread_s <= 0 or count == 0:
        return array("d", bytes(8 * count))
    uniforms = itertools.islice(iter(rng.random, -1.0), count + 1)
    gaps = array("d", map(math.log, map(operator.sub, itertools.repeat(1.0), uniforms)))
    total = math.fsum(gaps)
    if total == 0:
        return array("d", bytes(8 * count))
    steps = itertools.accumulate(itertools.islice(gaps, count))
    times = array("d", map(operator.mul, steps, itertools.repeat(spread_s / total)))
    last = count - 1
    while last >= 0 and times[last] > spread_s:  # rounding, at the very end only
        times[last] = spread_s
        last -= 1
    return times


def _mix64(x: int) -> int:
    """splitmix64's output function: a cheap, well-mixed 64-bit hash of ``x``."""
    z = x & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _unit(h: int) -> float:
    """A 64-bit hash as a float in [0, 1)."""
    return (h >> 11) * 2.0**-53


def _lazy_code(h: int) -> int:
    return 0 if _unit(h) < 0.85 else _FAILURE_CODES[h % len(_FAILURE_CODES)]


def _lazy_balance(base: int) -> Decimal:
    """As :func:`_synthetic_balance`, from the hashes of one lazy record."""
    roll = _unit(_mix64(base + _G2))
    h = _mix64(base + _G3)
    if roll < 0.01:
        cents = 10**19 + ((h << 64) | _mix64(base + _G6)) % (9 * 10**19)
    elif roll < 0.11:
        cents = -1 - h % 500_000
    else:
        cents = h % 5_000_000
    return Decimal(cents).scaleb(-2)


def _synthetic_metadata(i: int) -> dict[str, str]:
    metadata = {"customer_ref": f"cust-{i:06d}", "region": _REGIONS[i % len(_REGIONS)]}
    if i % 3 == 0:
        metadata["loan_officer"] = f"Officer {i % 7}, Branch {i % 5}"
    return metadata


def _demo_code_records(spread_s: float) -> list[SimRecord]:
    rows: list[tuple[str, str | None, int]] = [
        ("1286672", "-83.68", 0),
        ("1258580", "3851.09", 0),
        ("1258831", None, 3300),
        ("1300001", "98765432109876543.21", 0),
        ("1300002", "-0.01", 0),
        ("1300003", "0.10", 0),
        ("1300004", None, 3000),
        ("1300005", None, 3001),
        ("1300006", None, 3100),
        ("1300007", None, 3200),
        ("1300008", None, 3310),
        ("1300009", None, 3400),
        ("1300010", None, 9000),
        ("1300011", None, 3500),
    ]
    start = datetime(2024, 8, 9, 17, 51, 34, tzinfo=UTC)
    step = spread_s / len(rows)
    return [
        SimRecord(
            authorizer_unique_id=uid,
            balance=None if balance is None else Decimal(balance),
            balance_status_code=code,
            timestamp=_iso(start + timedelta(seconds=37 * i)),
            visible_at=i * step,
            institution=_INSTITUTIONS[i % len(_INSTITUTIONS)],
            legacy_only=uid == "1258580",
        )
        for i, (uid, balance, code) in enumerate(rows)
    ]


# --------------------------------------------------------------------------- serialisation


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc_now() -> str:
    return _iso(datetime.now(UTC))


def _decimal_text(value: Decimal) -> str:
    """The Decimal's exact digits; also a valid JSON number for finite values."""
    return str(value)


def _record_json(record: SimRecord, index: int) -> str:
    """One BalanceRecord as JSON text; ``index`` is its position in served order."""
    if record.raw_override is not None:
        return record.raw_override
    balance = "null" if record.balance is None else _decimal_text(record.balance)
    code = int(record.balance_status_code)
    parts = [
        f'"authorizer_unique_id":{json.dumps(record.authorizer_unique_id)}',
        f'"balance":{balance}',
        f'"timestamp":{json.dumps(record.timestamp)}',
    ]
    if not record.legacy_only:
        parts.append(f'"balance_status_code":{code}')
    parts.append(f'"status_code":{code}')
    if index % 5 == 2:  # clients must tolerate fields they do not know
        parts.append(f'"institution_id":"ins_{index % 7}"')
    return "{" + ",".join(parts) + "}"


def _page_json(
    batch_id: str,
    total: int | None,
    balances_json: str,
    has_more: bool | str,
    token: str | None,
) -> str:
    """A page body; ``total`` None omits ``total_processed``."""
    text = f'{{"batch_id":{json.dumps(batch_id)},'
    if total is not None:
        text += f'"total_processed":{total},'
    text += f'"balances":{balances_json},"has_more":{json.dumps(has_more)}'
    if token is not None:
        text += f',"next_page_token":{json.dumps(token)}'
    return text + "}"


def _malformed_page(
    kind: str, batch_id: str, total: int | None, items: str, token: str | None
) -> str:
    """A 200 body that a careful client must refuse, of the given kind."""
    if kind == "not_an_object":
        return f"[{items}]"
    if kind == "balances_not_a_list":
        return _page_json(batch_id, total, f'{{"items":[{items}]}}', token is not None, token)
    if kind == "wrong_types":
        return _page_json(batch_id, total, f"[{items}]", "yes", token)
    full = _page_json(batch_id, total, f"[{items}]", token is not None, token)
    return full[: max(1, len(full) // 2)]


def export_status(code: int) -> str:
    """The CSV export's ``Status`` for a ``balance_status_code``."""
    return _EXPORT_STATUS.get(code, "RETRIEVAL_FAILED")


def _record_control_json(record: SimRecord) -> dict[str, object]:
    data = asdict(record)
    data["balance"] = None if record.balance is None else _decimal_text(record.balance)
    return data


# --------------------------------------------------------------------------- HTTP: errors

_SIM_KEY = web.AppKey("simulator", Simulator)
_CLOSING_KEY = web.AppKey("closing", asyncio.Event)

_SUGGESTIONS = {
    "BAD_REQUEST": "Please check the request parameters.",
    "INVALID_PAGE_TOKEN": "Restart from the first page, without a nextPageToken.",
    "UNAUTHORIZED": "Please check your API key.",
    "FORBIDDEN": "Please request only batches submitted with this API key.",
    "NOT_FOUND": "Please check the batch ID.",
    "RATE_LIMITED": "Please slow down and retry after the time given in Retry-After.",
    "INTERNAL_SERVER_ERROR": (
        "Please try again later. If the problem persists, contact our support team."
    ),
}
_PROXY_PAGES = {502: "502 Bad Gateway", 503: "503 Service Temporarily Unavailable"}


def _error(
    status: int,
    code: str,
    message: str,
    *,
    suggestion: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """A response with the vendor's ApiErrorResponse body."""
    body = {
        "status": "error",
        "status_code": status,
        "error": {
            "code": code,
            "message": message,
            "timestamp": _utc_now(),
            "suggestion": suggestion or _SUGGESTIONS.get(code, ""),
        },
        "documentation_url": DOCS_URL,
    }
    return web.json_response(body, status=status, headers=headers)


def _bad_request(message: str) -> web.Response:
    return _error(400, "BAD_REQUEST", message)


def _fault_response(status: int, retry_after_s: float) -> web.Response:
    if status == 429:
        seconds = max(0, math.ceil(retry_after_s))
        return _error(
            429,
            "RATE_LIMITED",
            "Too many requests.",
            headers={"Retry-After": str(seconds)},
        )
    if status in _PROXY_PAGES:
        title = _PROXY_PAGES[status]
        html = f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        html += f"<center><h1>{title}</h1></center>\r\n</body>\r\n</html>\r\n"
        return web.Response(status=status, text=html, content_type="text/html")
    return _error(500, "INTERNAL_SERVER_ERROR", "An unexpected error occurred.")


def _authenticate(request: web.Request, sim: Simulator) -> str | web.Response:
    """The caller's API key, or the 401 response."""
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    challenge = {"WWW-Authenticate": 'Bearer realm="rightfoot"'}
    if scheme.lower() != "bearer" or not key:
        return _error(401, "UNAUTHORIZED", "No API key was provided.", headers=challenge)
    if key not in sim.api_keys:
        return _error(401, "UNAUTHORIZED", "Invalid API key provided.", headers=challenge)
    return key


async def _pause(request: web.Request, seconds: float) -> None:
    """Sleep, but wake up early when the server shuts down."""
    if seconds <= 0:
        return
    closing = request.app[_CLOSING_KEY]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(closing.wait(), timeout=seconds)


async def _injected_fault(request: web.Request, batch_ids: Sequence[str]) -> web.Response | None:
    """Apply latency and hangs; the fault response to send instead, if any."""
    sim = request.app[_SIM_KEY]
    await _pause(request, sim.faults.latency_s)
    await _pause(request, sim._take_hang(batch_ids))
    status = sim._take_error_status(batch_ids)
    if status is None:
        return None
    log.debug("simulator fault", status=status, batch_ids=list(batch_ids))
    return _fault_response(status, sim.faults.retry_after_s)


# --------------------------------------------------------------------------- HTTP: balances


def _parse_limit(raw: str | None) -> int | None:
    if raw is None:
        return MAX_LIMIT
    if not _DIGITS_RE.fullmatch(raw) or not 1 <= int(raw) <= MAX_LIMIT:
        return None
    return int(raw)


async def _balances(request: web.Request) -> web.Response:
    sim = request.app[_SIM_KEY]
    batch_id = request.query.get("batchId", "")
    fault = await _injected_fault(request, [batch_id] if batch_id else [])
    if fault is not None:
        return fault
    key = _authenticate(request, sim)
    if isinstance(key, web.Response):
        return key
    if not batch_id:
        return _error(
            400,
            "BAD_REQUEST",
            "Batch ID was not provided in the request.",
            suggestion="Please provide a valid batch ID in the request URL.",
        )
    limit = _parse_limit(request.query.get("limit"))
    if limit is None:
        return _bad_request(f"limit must be an integer from 1 to {MAX_LIMIT}.")
    found = sim._readable(batch_id, key)
    if found is None:
        return _error(404, "NOT_FOUND", "The specified batch ID does not exist.")
    token = request.query.get("nextPageToken")
    offset = None if token is None else _token_offset(sim, token, batch_id)
    if token is not None and offset is None:
        return _error(400, "INVALID_PAGE_TOKEN", "The page token is invalid or has expired.")
    return _page_response(sim, found[0], found[1], offset, limit)


def _token_offset(sim: Simulator, token: str, batch_id: str) -> int | None:
    if sim._take_token_reject(batch_id):
        return None
    return sim._tokens.offset_for(token, batch_id)


def _page_response(
    sim: Simulator, batch: _Batch, total: int, offset: int | None, limit: int
) -> web.Response:
    """One page of the ``total`` visible records, after the page token's ``offset``."""
    positions, cursor = batch.page(total, offset, limit)
    items = ",".join(_record_json(batch.record_at(i), i) for i in positions)
    has_more = cursor is not None
    token = sim._tokens.issue(batch.batch_id, cursor) if cursor is not None else None
    reported = batch.reported_total(total)
    kind = sim._take_malformed(batch.batch_id)
    if kind is None:
        body = _page_json(batch.batch_id, reported, f"[{items}]", has_more, token)
    else:
        log.debug("simulator malformed page", batch_id=batch.batch_id, kind=kind)
        body = _malformed_page(kind, batch.batch_id, reported, items, token)
    return web.Response(text=body, content_type="application/json")


# --------------------------------------------------------------------------- HTTP: export


async def _export(request: web.Request) -> web.StreamResponse:
    sim = request.app[_SIM_KEY]
    batch_ids = list(dict.fromkeys(request.query.getall("batch_ids", [])))
    fault = await _injected_fault(request, batch_ids)
    if fault is not None:
        return fault
    key = _authenticate(request, sim)
    if isinstance(key, web.Response):
        return key
    if not batch_ids:
        return _bad_request("batch_ids was not provided in the request.")
    invalid = [b for b in batch_ids if not _UUID_RE.fullmatch(b)]
    if invalid:
        return _bad_request(f"Not a valid UUID: {invalid[0]!r}.")
    found = [sim._readable(b, key) for b in batch_ids]
    parts = [f for f in found if f is not None]
    if len(parts) != len(found):
        return _error(
            403,
            "FORBIDDEN",
            "One or more requested batches don't belong to the authenticated requester.",
        )
    return await _stream_csv(request, parts)


async def _stream_csv(request: web.Request, parts: list[tuple[_Batch, int]]) -> web.StreamResponse:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    response = web.StreamResponse(
        headers={"Content-Disposition": f'attachment; filename="batch-export-{stamp}.csv"'}
    )
    response.content_type = "text/csv"
    response.charset = "utf-8"
    await response.prepare(request)
    meta_keys = _meta_keys(parts)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*EXPORT_COLUMNS, *(f"meta_{k}" for k in meta_keys)])
    for row in _export_rows(parts, meta_keys):
        writer.writerow(row)
        if buffer.tell() >= EXPORT_CHUNK_BYTES:
            await response.write(buffer.getvalue().encode("utf-8"))
            buffer.seek(0)
            buffer.truncate()
    await response.write(buffer.getvalue().encode("utf-8"))
    await response.write_eof()
    return response


def _visible(parts: list[tuple[_Batch, int]]) -> Iterator[tuple[str, SimRecord]]:
    for batch, count in parts:
        for record in batch.iter_visible(count):
            yield batch.batch_id, record


def _meta_keys(parts: list[tuple[_Batch, int]]) -> list[str]:
    keys: set[str] = set()
    for batch, count in parts:
        keys.update(batch.meta_keys(count))
    return sorted(keys)


def _export_rows(parts: list[tuple[_Batch, int]], meta_keys: list[str]) -> Iterator[list[str]]:
    for batch_id, r in _visible(parts):
        yield [
            r.authorizer_unique_id,
            batch_id,
            r.institution,
            r.phone,
            r.zip,
            "" if r.balance is None else _decimal_text(r.balance),
            export_status(r.balance_status_code),
            r.creator,
            r.timestamp,
            *(r.metadata.get(k, "") for k in meta_keys),
        ]


# --------------------------------------------------------------------------- HTTP: control API


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise _BadRequest(f"body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise _BadRequest("body must be a JSON object")
    return body


def _optional(body: Mapping[str, Any], name: str, kind: type[Any]) -> Any:
    """``body[name]`` if present and of exactly this JSON type (bools are not numbers)."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise _BadRequest(f"{name} must be of type {kind.__name__}")
    return value


def _number(body: Mapping[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _BadRequest(f"{name} must be a number")
    return float(value)


@web.middleware
async def _control_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except _BadRequest as exc:
        return web.json_response({"error": str(exc)}, status=400)


async def _get_faults(request: web.Request) -> web.Response:
    sim = request.app[_SIM_KEY]
    return web.json_response({**sim.faults.to_json(), "now": sim.clock()})


async def _post_faults(request: web.Request) -> web.Response:
    sim = request.app[_SIM_KEY]
    body = await _json_object(request)
    for_s = body.pop("error_5xx_for_s", None)
    if for_s is not None:
        if isinstance(for_s, bool) or not isinstance(for_s, int | float):
            raise _BadRequest("error_5xx_for_s must be a number")
        body["error_5xx_until"] = sim.clock() + for_s
    try:
        sim.faults.update(body)
    except ValueError as exc:
        raise _BadRequest(str(exc)) from exc
    log.info("simulator faults set", **body)
    return await _get_faults(request)


async def _post_batch(request: web.Request) -> web.Response:
    sim = request.app[_SIM_KEY]
    body = await _json_object(request)
    batch_id = _optional(body, "batch_id", str) or str(uuid.uuid4())
    count = _optional(body, "count", int)
    if count is None or count < 0:
        raise _BadRequest("count must be an integer >= 0")
    codes = _optional(body, "codes", list)
    if codes is not None and not all(isinstance(c, int) and not isinstance(c, bool) for c in codes):
        raise _BadRequest("codes must be a non-empty list of integers")
    spread_s = _number(body, "spread_s", 0.0)
    visible_after = _number(body, "visible_after", 0.0)
    seed, owner_key = _optional(body, "seed", int), _optional(body, "owner_key", str)
    with_metadata = bool(_optional(body, "with_metadata", bool))
    shape = _shape_options(body)
    if batch_id in sim.batch_ids():
        return web.json_response({"error": f"batch {batch_id!r} already exists"}, status=409)
    try:
        records = sim.generate_batch(
            batch_id,
            count,
            spread_s=spread_s,
            seed=seed,
            codes=codes,
            with_metadata=with_metadata,
            owner_key=owner_key,
            visible_after=visible_after,
            **shape,
        )
    except ValueError as exc:
        raise _BadRequest(str(exc)) from exc
    return web.json_response({"batch_id": batch_id, "count": len(records)}, status=201)


def _shape_options(body: Mapping[str, Any]) -> dict[str, Any]:
    """``order``, ``total_processed``, ``count_skew`` and ``lazy`` of a batch, checked."""
    options: dict[str, Any] = {}
    order = _optional(body, "order", str)
    if order is not None:
        if order not in ORDERS:
            raise _BadRequest(f"order must be one of {', '.join(map(repr, ORDERS))}")
        options["order"] = order
    total = _optional(body, "total_processed", str)
    if total is not None:
        if total not in TOTAL_PROCESSED_MODES:
            modes = ", ".join(map(repr, TOTAL_PROCESSED_MODES))
            raise _BadRequest(f"total_processed must be one of {modes}")
        options["total_processed"] = total
    skew = _optional(body, "count_skew", int)
    if skew is not None:
        options["count_skew"] = skew
    lazy = _optional(body, "lazy", bool)
    if lazy is not None:
        options["lazy"] = lazy
    return options


async def _get_batches(request: web.Request) -> web.Response:
    sim = request.app[_SIM_KEY]
    batches = [
        {
            "batch_id": batch_id,
            "visible": sim.visible_count(batch_id),
            "total": sim.record_count(batch_id),
        }
        for batch_id in sim.batch_ids()
    ]
    return web.json_response({"batches": batches})


def _query_count(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    if not raw.isdigit() or not raw.isascii():
        raise _BadRequest(f"{name} must be an integer >= 0")
    return int(raw)


async def _get_batch_records(request: web.Request) -> web.StreamResponse:
    """The visible records in list order; ``?offset=&limit=`` select a slice of them.

    Lazy batches stream the (same) JSON in chunks rather than building it whole.
    """
    sim = request.app[_SIM_KEY]
    batch_id = request.match_info["batch_id"]
    if batch_id not in sim.batch_ids():
        return web.json_response({"error": f"no batch {batch_id!r}"}, status=404)
    offset = _query_count(request, "offset") or 0
    limit = _query_count(request, "limit")
    batch = sim._batches[batch_id]
    visible = batch.visible_count(sim.clock()) or 0
    end = visible if limit is None else min(visible, offset + limit)
    selected = itertools.islice(batch.iter_visible(visible), offset, end)
    if not batch.lazy:
        records = [_record_control_json(r) for r in selected]
        return web.json_response({"batch_id": batch_id, "count": len(records), "records": records})
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    head = json.dumps({"batch_id": batch_id, "count": max(0, end - offset)})
    buffer = [head[:-1], ', "records": [']
    size = 0
    for i, record in enumerate(selected):
        text = json.dumps(_record_control_json(record))
        buffer.append(f", {text}" if i else text)
        size += len(text)
        if size >= EXPORT_CHUNK_BYTES:
            await response.write("".join(buffer).encode())
            buffer, size = [], 0
    buffer.append("]}")
    await response.write("".join(buffer).encode())
    await response.write_eof()
    return response


async def _get_requests(request: web.Request) -> web.Response:
    entries = [e.to_json() for e in request.app[_SIM_KEY].request_log]
    return web.json_response({"requests": entries})


async def _post_keys(request: web.Request) -> web.Response:
    body = await _json_object(request)
    keys = body.get("api_keys")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise _BadRequest("api_keys must be a list of strings")
    request.app[_SIM_KEY].set_api_keys(keys)
    return web.json_response({"count": len(keys)})


async def _post_invalidate_tokens(request: web.Request) -> web.Response:
    request.app[_SIM_KEY].invalidate_page_tokens()
    return web.json_response({"invalidated": True})


# --------------------------------------------------------------------------- HTTP: app


def _logged_batch_id(request: web.Request) -> str | None:
    if "batch_ids" in request.query:
        return ",".join(request.query.getall("batch_ids"))
    return request.query.get("batchId")


def _instance(user_agent: str) -> str | None:
    match = _USER_AGENT_RE.match(user_agent)
    return match.group("instance") if match else None


@web.middleware
async def _request_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record every request outside ``/_sim/`` in :attr:`Simulator.request_log`."""
    if request.path.startswith("/_sim/"):
        return await handler(request)
    sim = request.app[_SIM_KEY]
    started = sim.clock()
    status = 499
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except Exception:
        status = 500
        raise
    finally:
        user_agent = request.headers.get("User-Agent", "")
        entry = RequestLogEntry(
            started=started,
            ended=sim.clock(),
            method=request.method,
            path=request.path,
            batch_id=_logged_batch_id(request),
            status=status,
            instance=_instance(user_agent),
            user_agent=user_agent,
            query=request.query_string,
        )
        sim.request_log.append(entry)
        log.debug("simulator request", **entry.to_json())


async def _wake_sleepers(app: web.Application) -> None:
    app[_CLOSING_KEY].set()


def build_app(sim: Simulator) -> web.Application:
    """The aiohttp application serving ``sim``: the API and the ``/_sim/`` control API."""
    app = web.Application(middlewares=[_request_log, _control_errors])
    app[_SIM_KEY] = sim
    app[_CLOSING_KEY] = asyncio.Event()
    app.on_shutdown.append(_wake_sleepers)
    app.router.add_get("/v1/balances", _balances, name="balances")
    app.router.add_get("/v1/balances/export", _export, name="export")
    app.router.add_get("/_sim/faults", _get_faults)
    app.router.add_post("/_sim/faults", _post_faults)
    app.router.add_get("/_sim/batches", _get_batches)
    app.router.add_post("/_sim/batches", _post_batch)
    app.router.add_get("/_sim/batches/{batch_id}/records", _get_batch_records)
    app.router.add_get("/_sim/requests", _get_requests)
    app.router.add_post("/_sim/keys", _post_keys)
    app.router.add_post("/_sim/invalidate-tokens", _post_invalidate_tokens)
    return app


async def run_simulator(host: str, port: int, sim: Simulator) -> None:
    """Serve ``sim`` on host:port until cancelled, then shut down cleanly."""
    runner = web.AppRunner(
        build_app(sim), handler_cancellation=True, shutdown_timeout=5.0, access_log=None
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        log.info("simulator listening", addresses=[str(a) for a in runner.addresses])
        await asyncio.Event().wait()
    finally:
        log.info("simulator stopping")
        await runner.cleanup()
        log.info("simulator stopped")


# --------------------------------------------------------------------------- CLI


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``rightfoot-poller simulate``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8099, help="port to listen on")
    parser.add_argument(
        "--api-key",
        action="append",
        dest="api_key",
        metavar="KEY",
        help=f"an accepted API key; repeatable (default: {DEFAULT_API_KEY})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--no-demo", action="store_true", help="start without demo batches")
    parser.add_argument(
        "--demo-spread-s",
        type=float,
        default=120.0,
        help="seconds over which demo records appear (default: 120)",
    )
    parser.add_argument(
        "--fault-5xx-rate", type=float, default=0.0, help="share of requests answered 5xx"
    )
    parser.add_argument(
        "--fault-429-rate", type=float, default=0.0, help="share of requests answered 429"
    )
    parser.add_argument(
        "--retry-after-s", type=float, default=1.0, help="Retry-After sent with 429"
    )
    parser.add_argument(
        "--latency-s", type=float, default=0.0, help="delay added to every API request"
    )


def _simulator_from_args(args: argparse.Namespace) -> Simulator:
    sim = Simulator(api_keys=args.api_key or [DEFAULT_API_KEY], seed=args.seed)
    sim.faults.update(
        {
            "error_5xx_rate": args.fault_5xx_rate,
            "rate_limit_rate": args.fault_429_rate,
            "retry_after_s": args.retry_after_s,
            "latency_s": args.latency_s,
        }
    )
    if not args.no_demo:
        ids = sim.seed_demo(spread_s=args.demo_spread_s)
        log.info(
            "simulator demo batches",
            codes=ids[0],
            large=ids[1],
            late=ids[2],
            metadata=ids[3],
            missing=DEMO_MISSING_BATCH_ID,
        )
    return sim


async def simulate_main(args: argparse.Namespace) -> int:
    """Run the simulator until SIGINT or SIGTERM; what ``rightfoot-poller simulate`` calls."""
    try:
        sim = _simulator_from_args(args)
    except ValueError as exc:
        log.error("simulator invalid option", error=str(exc))
        return 2
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server = asyncio.create_task(run_simulator(args.host, args.port, sim))
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({server, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        stopping.cancel()
        server.cancel()
    (outcome,) = await asyncio.gather(server, return_exceptions=True)
    if isinstance(outcome, OSError):
        log.error("simulator could not listen", error=str(outcome))
        return 1
    return 0
