"""How a batch is held, listed and paged, and the page tokens that name a place in it.

* :class:`_Shape`: the listing order (``ORDERS``) and what ``total_processed`` serves
  (``TOTAL_PROCESSED_MODES``, ``count_skew``);
* :class:`_Batch`: the records by position (or a :class:`~rightfoot_simulator.data._LazySource`
  for a lazy batch), when each appears, which are visible at a given moment, and one page
  of them after a cursor;
* :class:`LazyRecords`: the read-only sequence :meth:`Simulator.generate_batch` returns for
  a lazy batch;
* :class:`_PageTokens`: opaque, HMAC-signed page tokens carrying a batch's cursor; all
  tokens issued so far can be invalidated at once.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import hmac
import itertools
import secrets
import typing
from array import array
from collections.abc import Iterator, Sequence

from rightfoot_simulator.data import SimRecord, _LazySource

#: How a batch lists its records (see :meth:`Simulator.add_batch`).
ORDERS = ("completion", "submission")
#: What a batch serves as ``total_processed`` (see :meth:`Simulator.add_batch`).
TOTAL_PROCESSED_MODES = ("exact", "absent", "negative")
#: When a page of a batch says ``has_more`` (see :meth:`Simulator.add_batch`).
HAS_MORE_MODES = ("exact", "full_page", "absent", "omit_empty", "pending")
#: At most this many empty pages after each page of records (``gaps``).
MAX_GAPS = 1000
#: How a batch writes its whole numbers (see :meth:`Simulator.add_batch`).
INTEGER_MODES = ("plain", "fraction")
#: :meth:`Simulator.generate_batch` makes bigger batches lazy unless told otherwise.
LAZY_THRESHOLD = 100_000
#: Positions of a lazy batch are 32-bit (``array("I")``).
MAX_LAZY_COUNT = 2**32 - 1

_TOKEN_MAC_BYTES = 16


class _Shape:
    """How a batch is listed, paged and counted (see :meth:`Simulator.add_batch`)."""

    __slots__ = (
        "count_skew",
        "gaps",
        "has_more",
        "integers",
        "order",
        "page_size",
        "token_ttl_s",
        "total_processed",
    )

    def __init__(
        self,
        order: str,
        total_processed: str,
        count_skew: int,
        page_size: int | None = None,
        has_more: str = "exact",
        token_ttl_s: float | None = None,
        integers: str = "plain",
        gaps: int = 0,
    ) -> None:
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(map(repr, ORDERS))}")
        if total_processed not in TOTAL_PROCESSED_MODES:
            modes = ", ".join(map(repr, TOTAL_PROCESSED_MODES))
            raise ValueError(f"total_processed must be one of {modes}")
        if isinstance(count_skew, bool) or not isinstance(count_skew, int):
            raise ValueError("count_skew must be an integer")
        if page_size is not None and (
            isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1
        ):
            raise ValueError("page_size must be an integer >= 1 (or null)")
        if has_more not in HAS_MORE_MODES:
            raise ValueError(f"has_more must be one of {', '.join(map(repr, HAS_MORE_MODES))}")
        if token_ttl_s is not None and (
            isinstance(token_ttl_s, bool)
            or not isinstance(token_ttl_s, int | float)
            or not token_ttl_s > 0
        ):
            raise ValueError("token_ttl_s must be a number > 0 (or null)")
        self.order = order
        self.total_processed = total_processed
        self.count_skew = count_skew
        self.page_size = page_size
        self.has_more = has_more
        self.token_ttl_s = token_ttl_s
        if integers not in INTEGER_MODES:
            raise ValueError(f"integers must be one of {', '.join(map(repr, INTEGER_MODES))}")
        self.integers = integers
        if isinstance(gaps, bool) or not isinstance(gaps, int) or not 0 <= gaps <= MAX_GAPS:
            raise ValueError(f"gaps must be an integer from 0 to {MAX_GAPS}")
        self.gaps = gaps

    def token_value(self, cursor: int, gap: int = 0) -> int:
        """What a page token carries: the cursor, and with ``gaps`` which empty page after
        the page that ends at it (0: the records after it)."""
        return cursor * (self.gaps + 1) + gap if self.gaps else cursor

    def from_token(self, value: int) -> tuple[int, int]:
        """(cursor, gap) of a token's value (``token_value``)."""
        return divmod(value, self.gaps + 1) if self.gaps else (value, 0)


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
        if self.shape.total_processed == "negative" and count < self.count:
            return -1  # "not counted yet", until every record has appeared
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
        listed, the next page starting after it. A page holds ``shape.page_size`` records
        when that is set, whatever ``limit`` asks; with ``has_more="full_page"`` a full
        page always says there is more, so a list that ends on a full page is followed by
        an empty one.
        """
        size = self.shape.page_size or limit
        full_page = self.shape.has_more in ("full_page", "omit_empty")
        if self.finish is None:
            offset = cursor or 0
            end = min(offset + size, count)
            more = end < count or (full_page and end - offset == size)
            return range(min(offset, count), end), (end if more else None)
        after = -1 if cursor is None else cursor
        positions = list(itertools.islice(self.positions_after(count, after), size))
        last = positions[-1] if positions else after
        if full_page:
            more = len(positions) == size
        else:
            more = next(self.positions_after(count, last), None) is not None
        return positions, (last if more else None)

    def first_cursor(self) -> int:
        """The cursor that names the first page."""
        return 0 if self.finish is None else -1

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


# --------------------------------------------------------------------------- tokens


class _PageTokens:
    """Opaque, signed page tokens: base64url(mac || "generation:offset:issued:batch_id").

    The number is the batch's cursor (see :meth:`_Batch.page`): in completion order how
    many records were listed before the next page, in submission order the position of
    the last record listed. ``issued`` is the simulator clock when the token was made,
    for batches whose tokens expire.
    """

    def __init__(self) -> None:
        self._secret = secrets.token_bytes(32)
        self.generation = 0

    def issue(self, batch_id: str, offset: int, now: float = 0.0) -> str:
        payload = f"{self.generation}:{offset}:{now!r}:{batch_id}".encode()
        raw = self._mac(payload) + payload
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    def offset_for(
        self, token: str, batch_id: str, *, now: float = 0.0, ttl_s: float | None = None
    ) -> int | None:
        """The offset a token stands for, or None if it is not valid for this batch now.

        With ``ttl_s``, a token issued more than that long before ``now`` has expired.
        """
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except ValueError:
            return None
        mac, payload = raw[:_TOKEN_MAC_BYTES], raw[_TOKEN_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(payload)):
            return None
        generation, offset, issued, token_batch = payload.decode().split(":", 3)
        if int(generation) != self.generation or token_batch != batch_id:
            return None
        if ttl_s is not None and now - float(issued) > ttl_s:
            return None
        return int(offset)

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()[:_TOKEN_MAC_BYTES]
