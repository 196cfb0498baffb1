"""The simulator's data: records, synthetic and demo batches, and how they are written.

* :class:`SimRecord`: one BalanceRecord as served, plus the fields only the CSV export
  shows, with the ``visible_at`` offset at which it appears;
* synthetic records: :func:`_synthetic_records` draws a batch from a seeded
  ``random.Random`` (what :meth:`Simulator.generate_batch` holds for an eager batch);
  :class:`_LazySource` derives each record of a lazy batch from (key, position) with
  splitmix64 when it is read, keeping only the appearance times;
* the demo batches' IDs and records (:meth:`Simulator.seed_demo`);
* serialisation: a record and a page as the vendor's JSON (built as text, so balances keep
  their exact digits), the CSV export's ``Status`` (:func:`export_status`), and a record
  as the control API shows it.

No HTTP here.
"""

from __future__ import annotations

import itertools
import json
import math
import operator
import random
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

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

_SYNTHETIC_EPOCH = datetime(2024, 8, 9, 12, 0, 0, tzinfo=UTC)
# splitmix64: the k-th value of a stream is mix(seed + k * gamma); each lazy record owns
# eight consecutive values (_G1.._G6 pick one).
_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_LAZY_STRIDE = 8 * _GAMMA
_G1, _G2, _G3, _G4, _G5, _G6 = (k * _GAMMA for k in range(1, 7))


# --------------------------------------------------------------------------- records


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


# --------------------------------------------------------------------------- lazy records


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


# --------------------------------------------------------------------------- serialisation


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc_now() -> str:
    return _iso(datetime.now(UTC))


def _decimal_text(value: Decimal) -> str:
    """The Decimal's exact digits; also a valid JSON number for finite values."""
    return str(value)


def _record_json(record: SimRecord, index: int, fraction: bool = False) -> str:
    """One BalanceRecord as JSON text; ``index`` is its position in served order.
    ``fraction``: the status codes written with a fraction (``3300.0``)."""
    if record.raw_override is not None:
        return record.raw_override
    balance = "null" if record.balance is None else _decimal_text(record.balance)
    code = f"{int(record.balance_status_code)}{'.0' if fraction else ''}"
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
    has_more: bool | str | None,
    token: str | None,
    omit_empty: bool = False,
    fraction: bool = False,
) -> str:
    """A page body; ``total`` None omits ``total_processed``, ``has_more`` None ``has_more``.

    ``omit_empty``: as protobuf's JSON writes a message, fields at their default value are
    left out (``total_processed`` 0, an empty ``balances``, ``has_more`` false).
    ``fraction``: ``total_processed`` written with a fraction (``12.0``).
    """
    fields = [f'"batch_id":{json.dumps(batch_id)}']
    if total is not None and not (omit_empty and total == 0):
        fields.append(f'"total_processed":{total}{".0" if fraction else ""}')
    if not (omit_empty and balances_json == "[]"):
        fields.append(f'"balances":{balances_json}')
    if has_more is not None and not (omit_empty and has_more is False):
        fields.append(f'"has_more":{json.dumps(has_more)}')
    if token is not None:
        fields.append(f'"next_page_token":{json.dumps(token)}')
    return "{" + ",".join(fields) + "}"


def export_status(code: int) -> str:
    """The CSV export's ``Status`` for a ``balance_status_code``."""
    return _EXPORT_STATUS.get(code, "RETRIEVAL_FAILED")


def _record_control_json(record: SimRecord) -> dict[str, object]:
    data = asdict(record)
    data["balance"] = None if record.balance is None else _decimal_text(record.balance)
    return data
