"""The simulated Rightfoot account: :class:`Simulator`.

It holds the accepted API keys, the batches (added as records, or generated: eager or
lazy, in completion or submission order), the :class:`~rightfoot_simulator.faults.Faults`
to inject and which request gets them, the page tokens, the request log
(:class:`RequestLogEntry`) and the optional page-request hook
(:attr:`Simulator.on_page_request`, called with a :class:`PageRequest` before a page is
served, for aimed fault tests). Time comes from an injectable clock. The HTTP side is in
:mod:`rightfoot_simulator.api` and :mod:`rightfoot_simulator.control`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import time
from array import array
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any

import structlog

from rightfoot_simulator.batches import (
    LAZY_THRESHOLD,
    MAX_LAZY_COUNT,
    LazyRecords,
    _Batch,
    _PageTokens,
    _Shape,
)
from rightfoot_simulator.data import (
    DEMO_CODES_BATCH_ID,
    DEMO_LARGE_BATCH_ID,
    DEMO_LARGE_COUNT,
    DEMO_LATE_AFTER_S,
    DEMO_LATE_BATCH_ID,
    DEMO_METADATA_BATCH_ID,
    SimRecord,
    _demo_code_records,
    _LazySource,
    _sorted_uniform_times,
    _synthetic_records,
)
from rightfoot_simulator.faults import MALFORMED_KINDS, Faults

log = structlog.get_logger("rightfoot_simulator")
_UNCHANGED: Any = object()  # amend_record: a field left as it is

DEFAULT_API_KEY = "sim-key"


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


@dataclass(frozen=True, slots=True)
class PageRequest:
    """A ``GET /v1/balances`` request about to be answered with a page.

    What :attr:`Simulator.on_page_request` is called with: the request is authenticated,
    names a batch that exists for its key, has a valid ``limit`` and, if it carries a page
    token, a valid one (faults that answer instead, 401, 400 and 404 never reach it).
    """

    batch_id: str
    #: The ``nextPageToken`` sent; None for the first page.
    token: str | None
    #: What the token names (see :meth:`Simulator.page_token_cursor`); None for the first
    #: page. Completion order: how many records were listed before this page; submission
    #: order: the position of the last record listed.
    cursor: int | None
    #: How many records are listed before this page, when known: 0 for the first page, the
    #: cursor in completion order; None for later pages in submission order.
    offset: int | None
    #: The page size asked for (``limit``, 1 to ``MAX_LIMIT``).
    limit: int
    #: 1 for the first page request of this batch to get here, then 2, 3, … (counted
    #: whether or not a hook is set, over the simulator's lifetime).
    sequence: int
    #: The text in parentheses of ``rightfoot-poller/<ver> (<instance>)`` in the
    #: User-Agent, as in :attr:`RequestLogEntry.instance`; else None.
    instance: str | None


#: The type of :attr:`Simulator.on_page_request`.
PageRequestHook = Callable[[PageRequest], Awaitable[None] | None]


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
        self._page_requests: dict[str, int] = {}
        #: Called for every ``GET /v1/balances`` request about to be answered with a page
        #: (see :class:`PageRequest`), after authentication and every check, before the
        #: page is read. If it returns an awaitable, the response waits for it (or for the
        #: server to shut down); records that appear meanwhile are in the page. An
        #: exception from it answers 500. None (the default): no hook.
        self.on_page_request: PageRequestHook | None = None

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
        order: str = "submission",
        total_processed: str = "exact",
        count_skew: int = 0,
        page_size: int | None = None,
        has_more: str = "exact",
        token_ttl_s: float | None = None,
        integers: str = "plain",
        gaps: int = 0,
    ) -> None:
        """Add a batch; it answers 404 for ``visible_after`` seconds, then exists.

        Record ``visible_at`` offsets count from the moment the batch becomes visible.
        ``owner_key`` None means every configured key may read it.

        ``order``: ``"submission"`` (the default, as the vendor's example lists its
        records) lists them in the given order, each once it has appeared, so a record can
        appear before positions a client has already paged past; ``"completion"`` lists
        records in the order they appear (sorted by ``visible_at``, ties in the given
        order), so new records only ever append.
        ``total_processed``: ``"exact"`` serves the visible count plus ``count_skew``
        (at least 0); ``"absent"`` omits the field (``count_skew`` is then unused);
        ``"negative"`` serves -1 ("not counted yet") until every record has appeared, then
        as ``"exact"``.
        ``page_size``: every page holds that many records (fewer only at the end), whatever
        ``limit`` the client asks for; None: ``limit``. ``has_more``: ``"exact"`` says
        whether records follow the page; ``"full_page"`` says so whenever the page is
        full, so a list that ends on a full page is followed by an empty one;
        ``"absent"`` leaves the field out (no field of the vendor's schema is required):
        only ``next_page_token`` tells that a page follows; ``"omit_empty"`` is
        ``"full_page"`` written as protobuf's JSON writes a message, leaving out fields at
        their default value: ``has_more`` false, an empty ``balances`` (the empty page
        that ends a list is then ``{"batch_id": ...}`` and its count), a
        ``total_processed`` of 0; ``"pending"`` is ``"exact"``, but the last page says
        ``has_more: true`` without a ``next_page_token`` while records are still to
        appear (more will come, with nothing yet to ask for them).
        ``token_ttl_s``: a page token is refused (400 INVALID_PAGE_TOKEN) once that many
        seconds have passed since it was issued; None: tokens do not expire.
        ``integers``: ``"plain"`` writes ``total_processed`` and the status codes as JSON
        integers; ``"fraction"`` as a serializer that holds numbers as doubles writes them
        (``3300.0``), which the schema's ``integer`` (JSON Schema 2020-12) allows.
        ``gaps``: after every page of records that has more after it, that many empty
        pages, each saying ``has_more`` with a new token, as a vendor paging a sparse scan
        (a database scan with a filter) serves them; 0: none.
        """
        shape = _Shape(
            order, total_processed, count_skew, page_size, has_more, token_ttl_s, integers, gaps
        )
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
        order: str = "submission",
        total_processed: str = "exact",
        count_skew: int = 0,
        page_size: int | None = None,
        has_more: str = "exact",
        token_ttl_s: float | None = None,
        integers: str = "plain",
        gaps: int = 0,
        lazy: bool | None = None,
    ) -> Sequence[SimRecord]:
        """Add a batch of ``count`` deterministic synthetic records and return them.

        Records appear at random times spread uniformly over ``spread_s`` seconds; in
        completion order in ascending ID order, in submission order each at its own
        random time, so they finish out of ID order. ``codes`` are assigned in turn
        (record i gets ``codes[i % len(codes)]``); without them about 85% succeed. The
        same (simulator seed, batch ID) or the same ``seed`` always gives the same
        records. ``order``, ``total_processed``, ``count_skew``, ``page_size``, ``has_more``,
        ``token_ttl_s``, ``integers`` and ``gaps``: see :meth:`add_batch`.

        ``lazy`` (default: when ``count`` > ``LAZY_THRESHOLD``) keeps no record objects:
        each record is derived from (seed, position) when read, at about 8 bytes per
        record in completion order and 17 in submission order. Lazy records are not the
        ones an eager batch of the same seed holds. The result is then a
        :class:`LazyRecords` view; otherwise the list of records. Both are in list order.
        """
        if codes is not None and not codes:
            raise ValueError("codes must not be empty")
        shape = _Shape(
            order, total_processed, count_skew, page_size, has_more, token_ttl_s, integers, gaps
        )
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
            page_size=page_size,
            has_more=has_more,
            token_ttl_s=token_ttl_s,
            integers=integers,
            gaps=gaps,
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

    def amend_record(
        self,
        batch_id: str,
        authorizer_unique_id: str,
        *,
        balance: Decimal | None = _UNCHANGED,
        balance_status_code: int = _UNCHANGED,
    ) -> SimRecord:
        """Change a record in place: same place in the list, same ``timestamp``.

        What a vendor does when it corrects a result without checking the balance again.
        Every read from now on lists the new version; returns it. Eager batches only.
        """
        batch = self._batches[batch_id]
        if batch.records is None:
            raise ValueError("records of a lazy batch cannot be amended")
        for position, record in enumerate(batch.records):
            if record.authorizer_unique_id == authorizer_unique_id:
                changes: dict[str, Any] = {}
                if balance is not _UNCHANGED:
                    changes["balance"] = balance
                if balance_status_code is not _UNCHANGED:
                    changes["balance_status_code"] = balance_status_code
                amended = dataclasses.replace(record, **changes)
                batch.records[position] = amended
                log.info("simulator record amended", batch_id=batch_id, position=position)
                return amended
        raise KeyError(authorizer_unique_id)

    def page_token_cursor(self, batch_id: str, token: str) -> int | None:
        """What a page token of this batch names, or None if it is not valid now.

        Completion order: how many records were listed before the next page. Submission
        order: the position (submission index) of the last record listed.
        """
        value = self._tokens.offset_for(token, batch_id)
        batch = self._batches.get(batch_id)
        if value is None or batch is None:
            return value
        return batch.shape.from_token(value)[0]

    def seed_demo(self, *, spread_s: float = 120.0) -> list[str]:
        """Add the demo batches and return their IDs, in this order:

        1. ``DEMO_CODES_BATCH_ID``: one record per documented status code plus the
           undocumented 3500, null balances for failures, a ``legacy_only`` record and
           exact balances such as 98765432109876543.21, -0.01 and 0.10;
        2. ``DEMO_LARGE_BATCH_ID``: 1,250 records (13 pages of 100), listed in submission
           order as the vendor's own example is (not in time order): records that finish
           late appear behind a reader's cursor;
        3. ``DEMO_LATE_BATCH_ID``: 404 for the first 20 s, then 40 records;
        4. ``DEMO_METADATA_BATCH_ID``: 25 records with metadata, all visible at once.

        Records of batches 1 to 3 appear over ``spread_s`` seconds. ``DEMO_MISSING_BATCH_ID``
        is never added.
        """
        self.add_batch(DEMO_CODES_BATCH_ID, _demo_code_records(spread_s))
        self.generate_batch(
            DEMO_LARGE_BATCH_ID, DEMO_LARGE_COUNT, spread_s=spread_s, order="submission"
        )
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

    def _next_page_sequence(self, batch_id: str) -> int:
        """Count one more page request of this batch; its sequence number (from 1)."""
        sequence = self._page_requests.get(batch_id, 0) + 1
        self._page_requests[batch_id] = sequence
        return sequence

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
        """429, 403 or a 5xx status to answer instead of the real response, if any."""
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
        if f.forbidden_next > 0:
            f.forbidden_next -= 1
            return 403
        return None

    def _take_token_reject(self, batch_id: str) -> bool:
        return self._take_next("reject_token_next", batch_id)

    def _take_token_loop(self, batch_id: str) -> bool:
        return self._take_next("token_loop_next", batch_id)

    def _take_next(self, counter: str, batch_id: str) -> bool:
        """Whether this request gets the fault counted by ``counter`` (which goes down)."""
        left = getattr(self.faults, counter)
        if left > 0 and self._in_scope([batch_id]):
            setattr(self.faults, counter, left - 1)
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
