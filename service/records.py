"""The API's shapes: parsing a ``GET /v1/balances`` page into records, exactly.

Balances are parsed from the raw JSON digits into ``Decimal`` and never pass
through binary floating point. A record that cannot be understood does not
fail its page: it is returned apart, with the reason, for the dead-letter topic.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, NamedTuple

import msgspec
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
)
from xxhash import xxh3_64_intdigest

from service.errors import ApiMalformedResponse

# The one table of balance status codes (vendor page "Balance Status Codes";
# 3001 is in the table but not in the OpenAPI enum).
STATUS_NAMES: dict[int, str] = {
    0: "SUCCESS",
    3000: "NO_TAX_ID_MATCH",
    3001: "NO_SSN_MATCH",
    3100: "NO_DOB_MATCH",
    3200: "ACCOUNT_CLOSED",
    3300: "INSTITUTION_NOT_SUPPORTED",
    3310: "INSTITUTION_IN_TESTING",
    3400: "NO_AUTHORIZER_MATCH",
    9000: "OTHER_ERROR",
}
UNKNOWN_STATUS = "UNKNOWN"
ALL_STATUS_NAMES: tuple[str, ...] = (*STATUS_NAMES.values(), UNKNOWN_STATUS)

# A dead-lettered record keeps at most this much of its raw text, so that its event
# always fits in a Kafka message; longer authorizer IDs are refused for the same reason.
MAX_RAW_CHARS = 64 * 1024
MAX_ID_CHARS = 1024
# A page token is stored with the batch's progress, so it is bounded too: in UTF-8 bytes,
# and without control characters (which the state's JSON would write six bytes each).
MAX_PAGE_TOKEN_BYTES = 8 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A balance and a timestamp go into every event as text: bounded, so that one record can
# neither take the memory (a JSON exponent such as 1e999999999 written out in plain
# digits) nor make an event too large for Kafka. Far beyond any amount of money or any
# RFC 3339 date-time; a record past them is dead-lettered.
MAX_BALANCE_CHARS = 100
# The largest total_processed taken (a signed 64-bit count); any larger is no batch's.
MAX_TOTAL = 2**63 - 1
MAX_TIMESTAMP_CHARS = 64

EVENT_NAMESPACE = uuid.UUID("3f0c4a52-7d0e-5b8a-9a51-6c2f1e0b7d11")


def status_name(code: int) -> str:
    return STATUS_NAMES.get(code, UNKNOWN_STATUS)


_NAMESPACE_BYTES = EVENT_NAMESPACE.bytes


# The RFC 4122 variant bits (10xx) over the 17th hex digit of a SHA-1 digest.
_VARIANT = {f"{n:x}": f"{(n & 0x3) | 0x8:x}" for n in range(16)}


def balance_event_id(
    batch_id: str, authorizer_unique_id: str, timestamp: str, balance: str | None, code: int
) -> str:
    """Deterministic: the same record always gets the same id, and a different one a new id.

    The record is what its event carries from the API: batch, authorizer, timestamp,
    the balance's digits (``None``: null) and the status code. A record the API lists
    again with the same timestamp but another balance or code is a new event.

    ``str(uuid.uuid5(EVENT_NAMESPACE, name))``, computed without building a UUID object
    (once per record): SHA-1 of namespace and name, version 5, RFC 4122 variant, in the
    canonical 8-4-4-4-12 form. The name is the fields joined by U+001F, the balance as
    ``null`` when there is none.
    """
    shown = "null" if balance is None else balance
    return _event_id(batch_id, f"{authorizer_unique_id}\x1f{timestamp}\x1f{shown}\x1f{code}")


def timestamp_event_id(batch_id: str, authorizer_unique_id: str, timestamp: str) -> str:
    """The event id of batches first stored by state versions 1 to 3: without the content.

    Those batches keep it until they finish, so that what they published is recognised.
    """
    return _event_id(batch_id, f"{authorizer_unique_id}\x1f{timestamp}")


def _event_id(batch_id: str, rest: str) -> str:
    """uuid5 of the batch's prefix and ``rest``, in the canonical form (see above)."""
    sha = _event_id_base(batch_id)
    sha.update(rest.encode())
    h = sha.hexdigest()
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


def _event_id_base(batch_id: str) -> Any:
    """The SHA-1 of what every event id of a batch begins with: namespace, batch id, separator.

    ``_parse_page_fast`` copies it for each record of a page rather than hash those bytes
    again.
    """
    return hashlib.sha1(_NAMESPACE_BYTES + f"{batch_id}\x1f".encode())


def fingerprint(event_id: str) -> int:
    """A 64-bit fingerprint of an event id, to remember what was published compactly.

    An event id is a name-based UUID, a SHA-1 digest already: its last 64 bits
    (62 of them from SHA-1, 2 fixed variant bits) serve as they are.
    """
    return int(event_id[19:23] + event_id[24:], 16)


def authorizer_fingerprint(authorizer_unique_id: str) -> int:
    """A 62-bit fingerprint of an authorizer id (XXH3), to tell a record listed again.

    Its top two bits are 0 where an event fingerprint's are 1 and 0 (the UUID variant),
    so both kinds live in one seen set without ever being mistaken for each other.
    XXH3 rather than a cryptographic hash: it runs for every record, a collision costs
    no record (README, "Limits"), and the ids come from the vendor, not from an attacker.
    """
    return xxh3_64_intdigest(authorizer_unique_id.encode()) >> 2


def legacy_fingerprint(event_id: str) -> int:
    """The fingerprint of state version 1 (64-bit BLAKE2b), kept to resume its batches."""
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "big")


class BalanceRecord(NamedTuple):
    """A valid record, as the event carries it (a tuple: one is built per record)."""

    authorizer_unique_id: str
    balance: str | None  # plain decimal notation, exactly the digits the API sent
    balance_status_code: int
    timestamp: str
    event_id: str

    @property
    def balance_status(self) -> str:
        return status_name(self.balance_status_code)


@dataclass(slots=True, frozen=True)
class InvalidRecord:
    reason: str  # machine-readable: not_an_object, missing_authorizer_unique_id, ...
    detail: str
    raw: str  # at most MAX_RAW_CHARS of the record's JSON text
    event_id: str
    raw_truncated: bool = False
    # The record's authorizer, when it has a usable one: a dead letter is a record too, and
    # a corrected version of it that is valid is not a new one.
    authorizer_unique_id: str | None = None


@dataclass(slots=True)
class Page:
    batch_id: str | None
    total_processed: int | None
    has_more: bool
    next_page_token: str | None
    records: list[BalanceRecord] = field(default_factory=list)
    invalid: list[InvalidRecord] = field(default_factory=list)
    # What was odd about the page and taken as it is said here, keyed by its
    # ``invalid_input_total`` reason (``PAGE_NOTES``), with the detail for the log line.
    notes: dict[str, str] = field(default_factory=dict)


# A page whose envelope has one of these is still read (its records are what matters):
# total_processed not a count (negative, 2**63 or more, not a whole number): taken as absent
TOTAL_UNUSABLE = "total_unusable"
MORE_WITHOUT_TOKEN = "more_without_token"  # has_more, no token: the poll ends at this page
PAGE_NOTES = (TOTAL_UNUSABLE, MORE_WITHOUT_TOKEN)


def _integral(value: Any) -> Any:
    """A JSON number written with a fraction or an exponent that is a whole number (3300.0,
    3e2) as the integer it is: JSON Schema's ``integer``, which the vendor's OpenAPI 3.1
    schema uses, takes it. Anything else as it was, for the field's own check."""
    if (
        type(value) is Decimal
        and value.is_finite()
        and value.adjusted() < 19  # a count or a code, not a number of a million digits
        and value == value.to_integral_value()
    ):
        return int(value)
    return value


_Integral = Annotated[StrictInt, BeforeValidator(_integral)]


def _count(value: Any) -> tuple[int | None, str | None]:
    """``total_processed`` as sent: the count, or None and why it is not one. It is
    advisory (the records are what matters), so a count that is not one is taken as
    absent rather than refusing the page: the schema's integer has no bounds (-1 for "not
    counted yet", say), a number no batch can reach would overflow a gauge, and a
    serializer may write a 64-bit integer as a string (protobuf's JSON does)."""
    if value is None:
        return None, None
    value = _integral(value)
    if type(value) is int:
        if 0 <= value <= MAX_TOTAL:
            return value, None
        return None, f"negative ({value})" if -MAX_TOTAL <= value < 0 else "out of range"
    if type(value) is Decimal and value.is_finite() and value == value.to_integral_value():
        return None, "out of range"  # a whole number of over 19 digits, however written
    return None, f"not a whole number ({type(value).__name__})"


class _Envelope(BaseModel):
    """BatchBalancesResponse; unknown fields are tolerated."""

    model_config = ConfigDict(extra="ignore")

    batch_id: StrictStr | None = None
    total_processed: Any = None  # see _count
    # No field of the schema is required: a serializer that leaves out empty lists (as
    # protobuf's JSON does) sends an empty page without it. See _parse_page_general.
    balances: list[Any] | None = None
    has_more: StrictBool | None = None
    next_page_token: StrictStr | None = None

    @property
    def more(self) -> bool:
        return _more(self.has_more, self.next_page_token)


def token_problem(token: str | None) -> str | None:
    """Why ``next_page_token`` cannot be kept with the batch's progress (its cursor, on the
    state topic too: ``state.StateSummary``); None if it can."""
    if not token:
        return None
    try:
        size = len(token) if token.isascii() else len(token.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate, escaped in the JSON
        return "next_page_token is not valid Unicode"
    if size > MAX_PAGE_TOKEN_BYTES:
        return f"next_page_token is over {MAX_PAGE_TOKEN_BYTES} bytes"
    if _CONTROL.search(token):
        return "next_page_token has a control character"
    return None


def _more(has_more: bool | None, next_page_token: str | None) -> bool:
    """Whether a page has a next one. ``has_more`` says so; a page without it (no field
    of the vendor's schema is marked required) has one if it gives a ``next_page_token``:
    taken as the last page, the pages after it would never be read."""
    return has_more if has_more is not None else bool(next_page_token)


class _Record(BaseModel):
    """BalanceRecord; unknown fields and unknown status codes are tolerated."""

    model_config = ConfigDict(extra="ignore")

    authorizer_unique_id: StrictStr
    balance: Decimal | None = None
    balance_status_code: _Integral | None = None
    # Read only when balance_status_code is missing (see _codes): it is deprecated.
    status_code: _Integral | None = None
    timestamp: StrictStr


class _Fields(NamedTuple):
    """A record's fields of exactly the JSON types ``_Record`` takes as they are."""

    authorizer_unique_id: str
    balance: Decimal | None
    balance_status_code: int | None
    status_code: int | None
    timestamp: str


def _exact_fields(item: dict[str, Any]) -> _Fields | None:
    """The fields, when ``_Record.model_validate`` could neither fail nor change them.

    That is the common case (str, str, finite Decimal or null, int or null), and the
    per-record cost of pydantic is worth skipping there; anything else (an integer
    balance, a wrong type, a missing field) goes through pydantic and its exact errors.
    """
    get = item.get
    uid, timestamp, balance = get("authorizer_unique_id"), get("timestamp"), get("balance")
    code, legacy = get("balance_status_code"), get("status_code")
    if (
        type(uid) is str
        and type(timestamp) is str
        and (balance is None or type(balance) is Decimal)
        and (code is None or type(code) is int)
        and (legacy is None or type(legacy) is int)
    ):
        return _Fields(uid, balance, code, legacy, timestamp)
    return None


def _codes(item: dict[str, Any]) -> dict[str, Any]:
    """The record with the deprecated ``status_code`` left out when ``balance_status_code``
    is given: only the latter is read then, and whatever the former holds is no reason to
    set the record aside."""
    if item.get("balance_status_code") is None or "status_code" not in item:
        return item
    return {k: v for k, v in item.items() if k != "status_code"}


def _parse_int(text: str) -> int | Decimal:
    """A JSON integer; past MAX_BALANCE_CHARS digits a Decimal, which no field takes as an
    integer (CPython will not read an int of over 4,300 digits, and json.loads would refuse
    the whole body: one record would then stop its page)."""
    return int(text) if len(text) <= MAX_BALANCE_CHARS else Decimal(text)


def loads_exact(text: str | bytes) -> Any:
    """json.loads with every non-integer number as an exact Decimal."""
    return json.loads(text, parse_float=Decimal, parse_int=_parse_int, parse_constant=Decimal)


class _Text(str):
    """JSON text already rendered, on dumps_exact's work stack."""


def dumps_exact(value: Any) -> str:
    """JSON text of a value from ``loads_exact``, numbers with their original digits.

    Iterative, so whatever nesting json.loads accepted can be written back.
    """
    out: list[str] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Text):
            out.append(item)
        elif isinstance(item, Decimal):
            out.append(str(item))
        elif isinstance(item, dict):
            parts: list[Any] = [_Text("{")]
            for i, (k, v) in enumerate(item.items()):
                parts += [_Text(("," if i else "") + json.dumps(str(k)) + ":"), v]
            stack.extend(reversed([*parts, _Text("}")]))
        elif isinstance(item, list):
            parts = [_Text("[")]
            for i, v in enumerate(item):
                parts += [_Text(","), v] if i else [v]
            stack.extend(reversed([*parts, _Text("]")]))
        else:
            out.append(json.dumps(item))
    return "".join(out)


def _plain(balance: Decimal) -> str:
    return format(balance, "f")


def _plain_within_bound(number: str) -> str | None:
    """The plain notation of a JSON number's text; None past ``MAX_BALANCE_CHARS``."""
    value = Decimal(number)
    return format(value, "f") if _plain_chars(value) <= MAX_BALANCE_CHARS else None


# An int balance is at most MAX_BALANCE_CHARS characters, its sign included.
_INT_MAX, _INT_MIN = 10**MAX_BALANCE_CHARS, -(10 ** (MAX_BALANCE_CHARS - 1))


def _plain_chars(balance: Decimal) -> int:
    """len(_plain(balance)) of a finite Decimal, without writing out a huge exponent."""
    sign, digits, exp = balance.as_tuple()
    exp = int(exp)
    if exp >= 0:
        body = 1 if digits == (0,) else len(digits) + exp
    else:  # the digits, with "0." and zeros before them when there are fewer than -exp
        body = max(len(digits), 1 - exp) + 1
    return body + sign


# The fields of the vendor's BalanceRecord: what a dead letter of a known authorizer is.
RECORD_FIELDS = frozenset(
    ("authorizer_unique_id", "balance", "balance_status_code", "status_code", "timestamp")
)


def _invalid(batch_id: str, item: Any, reason: str, detail: str) -> InvalidRecord:
    raw = dumps_exact(item)
    truncated = len(raw) > MAX_RAW_CHARS
    uid = item.get("authorizer_unique_id") if isinstance(item, dict) else None
    if type(uid) is int:
        # An ID sent as a JSON number is refused, but names the authorizer all the same: a
        # changed version of the record is not a new record (records are counted by it).
        uid = str(uid)
    usable = isinstance(uid, str) and 0 < len(uid) <= MAX_ID_CHARS and _is_utf8(uid)
    # A dead letter is the same one as long as its record's fields are: a field outside the
    # schema that changes with every response (a request id, a time) would make it a new
    # dead letter at every poll, and the batch would never be idle. Without a usable
    # authorizer, the whole text tells two records apart, as nothing else can.
    identity = raw
    if usable and isinstance(item, dict):
        identity = dumps_exact({k: v for k, v in item.items() if k in RECORD_FIELDS})
    event_id = str(uuid.uuid5(EVENT_NAMESPACE, f"{batch_id}\x1finvalid\x1f{identity}"))
    return InvalidRecord(
        reason=reason,
        detail=detail,
        raw=raw[:MAX_RAW_CHARS] if truncated else raw,
        event_id=event_id,
        raw_truncated=truncated,
        authorizer_unique_id=uid if usable else None,
    )


_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


@functools.lru_cache(maxsize=4096)  # records of a page often share their second
def _is_timestamp(text: str) -> bool:
    """RFC 3339 date-time with an offset, as the event schema and ce_time require."""
    if not _RFC3339.fullmatch(text):
        return False
    try:
        datetime.fromisoformat(text.upper())  # also refuses month 13, hour 25...
    except ValueError:
        return False
    return True


def _is_utf8(text: str) -> bool:
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"), which no UTF-8 key can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_record(
    batch_id: str, item: Any, *, content_ids: bool = True
) -> BalanceRecord | InvalidRecord:
    """One record of a page; ``content_ids`` False: ids of ``timestamp_event_id``."""
    if not isinstance(item, dict):
        return _invalid(batch_id, item, "not_an_object", "the record is not a JSON object")
    uid = item.get("authorizer_unique_id")
    if isinstance(uid, str) and len(uid) > MAX_ID_CHARS:
        return _invalid(
            batch_id, item, "invalid_field", f"authorizer_unique_id is over {MAX_ID_CHARS} chars"
        )
    if not isinstance(uid, str) or not uid:
        return _invalid(
            batch_id,
            item,
            "missing_authorizer_unique_id",
            "authorizer_unique_id is missing or not a non-empty string",
        )
    if not _is_utf8(uid):
        return _invalid(
            batch_id,
            item,
            "invalid_field",
            "authorizer_unique_id is not valid Unicode (a lone surrogate escape)",
        )
    balance = item.get("balance")
    if balance is not None and (
        isinstance(balance, bool) or not isinstance(balance, int | Decimal)
    ):
        return _invalid(batch_id, item, "invalid_balance", "balance is not a JSON number or null")
    if isinstance(balance, Decimal) and not balance.is_finite():
        return _invalid(batch_id, item, "invalid_balance", "balance is not a finite number")
    if isinstance(balance, Decimal) and _plain_chars(balance) > MAX_BALANCE_CHARS:
        return _invalid(
            batch_id,
            item,
            "invalid_balance",
            f"balance is over {MAX_BALANCE_CHARS} characters in plain notation",
        )
    fields = _codes(item)
    rec: _Fields | _Record | None = _exact_fields(fields)
    if rec is None:
        try:
            rec = _Record.model_validate(fields)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            return _invalid(batch_id, item, "invalid_field", f"{where}: {err['msg']}")
    if len(rec.timestamp) > MAX_TIMESTAMP_CHARS or not _is_timestamp(rec.timestamp):
        return _invalid(
            batch_id,
            item,
            "invalid_field",
            "timestamp is not an ISO-8601 date-time with a time zone",
        )
    code = rec.balance_status_code if rec.balance_status_code is not None else rec.status_code
    if code is None:
        return _invalid(
            batch_id, item, "invalid_field", "neither balance_status_code nor status_code is given"
        )
    uid, timestamp = rec.authorizer_unique_id, rec.timestamp
    balance = None if rec.balance is None else _plain(rec.balance)
    return BalanceRecord(
        authorizer_unique_id=uid,
        balance=balance,
        balance_status_code=code,
        timestamp=timestamp,
        event_id=balance_event_id(batch_id, uid, timestamp, balance, code)
        if content_ids
        else timestamp_event_id(batch_id, uid, timestamp),
    )


class _Number(str):
    """The JSON text of a non-integer number, exactly as the API sent it."""


class _FastRecord(msgspec.Struct, gc=False):
    """BalanceRecord as ``_parse_page_fast`` reads it (unknown fields are skipped)."""

    authorizer_unique_id: str
    timestamp: str
    balance: Any = None  # a _Number (see _FAST_PAGE), an int, or anything to refuse
    balance_status_code: int | None = None
    status_code: int | None = None


class _FastPage(msgspec.Struct, gc=False):
    balances: list[_FastRecord]
    batch_id: str | None = None
    total_processed: int | None = None
    has_more: bool | None = None
    next_page_token: str | None = None


# Non-integer numbers reach float_hook as their JSON text, which is kept as it is.
_FAST_PAGE = msgspec.json.Decoder(_FastPage, float_hook=_Number)


def _parse_page_fast(batch_id: str, body: bytes, content_ids: bool = True) -> Page | None:
    """The page, when every record in it is valid; None when anything needs a closer look.

    The common case, decoded and type-checked in one pass of msgspec's C decoder. It
    is stricter than the general path (``_parse_page_general``), never looser: any
    page it does not take whole (invalid JSON for its decoder, a wrong type, a record
    to dead-letter) goes through the general path, which gives the exact errors.
    ``tests/test_fast_paths.py`` checks that both agree wherever this one answers.
    """
    try:
        # msgspec does not check the UTF-8 of what it skips (unknown fields); json does.
        body.decode("utf-8")
        env = _FAST_PAGE.decode(body)
    except (UnicodeDecodeError, msgspec.DecodeError, RecursionError):  # ValidationError too
        return None
    more = _more(env.has_more, env.next_page_token)
    if more and not env.next_page_token:
        return None
    if (more and token_problem(env.next_page_token)) or (
        env.total_processed is not None and not 0 <= env.total_processed <= MAX_TOTAL
    ):
        return None
    records: list[BalanceRecord] = []
    append, new_record, is_timestamp = records.append, tuple.__new__, _is_timestamp
    base, variant = _event_id_base(batch_id), _VARIANT
    for r in env.balances:
        uid, timestamp, balance = r.authorizer_unique_id, r.timestamp, r.balance
        code = r.balance_status_code
        if code is None:
            code = r.status_code
            if code is None:
                return None
        if (
            not uid
            or len(uid) > MAX_ID_CHARS
            or len(timestamp) > MAX_TIMESTAMP_CHARS
            or not is_timestamp(timestamp)
        ):
            return None
        kind = type(balance)
        if kind is _Number:
            # JSON's digits are plain decimal notation already, unless there is an exponent
            if "e" in balance or "E" in balance or len(balance) > MAX_BALANCE_CHARS:
                text: str | None = _plain_within_bound(balance)
                if text is None:
                    return None
            else:
                text = str(balance)
        elif balance is None:
            text = None
        elif kind is int and _INT_MIN < balance < _INT_MAX:
            text = str(balance)
        else:
            return None
        sha = base.copy()  # balance_event_id (or timestamp_event_id), inlined
        if content_ids:
            shown = "null" if text is None else text
            sha.update(f"{uid}\x1f{timestamp}\x1f{shown}\x1f{code}".encode())
        else:
            sha.update(f"{uid}\x1f{timestamp}".encode())
        h = sha.hexdigest()
        event_id = f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{variant[h[16]]}{h[17:20]}-{h[20:32]}"
        # tuple.__new__: the same BalanceRecord, without the Python-level __new__ per record
        append(new_record(BalanceRecord, (uid, text, code, timestamp, event_id)))
    return Page(
        batch_id=env.batch_id,
        total_processed=env.total_processed,
        has_more=more,
        next_page_token=env.next_page_token if more else None,
        records=records,
    )


def parse_page(batch_id: str, body: bytes, *, content_ids: bool = True) -> Page:
    """Parse one response body; raise ApiMalformedResponse if the envelope is not understood.

    Event ids are those of ``balance_event_id``; with ``content_ids`` False, those of
    ``timestamp_event_id`` (batches first stored by state versions 1 to 3).
    """
    page = _parse_page_fast(batch_id, body, content_ids)
    if page is None:
        page = _parse_page_general(batch_id, body, content_ids)
    # A page of another batch (an API that mixed up its answers): its records published
    # as this batch's would be wrong for good. Case aside: an ID may be echoed normalised.
    if page.batch_id is not None and page.batch_id.casefold() != batch_id.casefold():
        raise ApiMalformedResponse(
            f"the page is of batch {page.batch_id[:MAX_ID_CHARS]!r}, not of the batch asked for",
            status=200,
        )
    return page


def _parse_page_general(batch_id: str, body: bytes, content_ids: bool = True) -> Page:
    """Every page: records that cannot be understood are returned apart, with the reason."""
    try:
        data = loads_exact(body)
    except (ValueError, RecursionError) as exc:
        raise ApiMalformedResponse(f"response body is not JSON: {exc}", status=200) from None
    if not isinstance(data, dict):
        raise ApiMalformedResponse("response body is not a JSON object", status=200)
    try:
        env = _Envelope.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ApiMalformedResponse(f"response {where}: {err['msg']}", status=200) from None
    if env.balances is None and (env.batch_id is None or "error" in data):
        # An error body answered with 200, or an object that says nothing of the batch: an
        # empty page is taken only from a page that names its batch.
        raise ApiMalformedResponse(
            "response has no balances and is not a page of the batch (no batch_id, or an error)",
            status=200,
        )
    more = env.more
    notes: dict[str, str] = {}
    if more and not env.next_page_token:
        # More to come but no way to ask for it (the vendor's schema marks no field
        # required): the records are kept, and the poll ends here (``Poll.page``).
        notes[MORE_WITHOUT_TOKEN] = (
            "has_more is true but next_page_token is missing: the page's records are kept "
            "and the poll ends there, to read that page again next time"
        )
    problem = token_problem(env.next_page_token) if more else None
    if problem is not None:
        raise ApiMalformedResponse(problem, status=200)
    total, problem = _count(env.total_processed)
    if problem is not None:
        notes[TOTAL_UNUSABLE] = f"total_processed is {problem}: taken as absent"
    page = Page(
        batch_id=env.batch_id,
        total_processed=total,
        has_more=more,
        next_page_token=env.next_page_token if more and env.next_page_token else None,
        notes=notes,
    )
    for item in env.balances or ():
        parsed = parse_record(batch_id, item, content_ids=content_ids)
        if isinstance(parsed, BalanceRecord):
            page.records.append(parsed)
        else:
            page.invalid.append(parsed)
    return page
