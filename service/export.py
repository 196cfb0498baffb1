"""The CSV export: ``rightfoot-poller export BATCH_ID… -o FILE``.

``GET <base_url><export_path>?batch_ids=<id>&batch_ids=<id>`` through the same
:class:`RightfootClient` the poller uses (its session, User-Agent, API key,
rate limiter, concurrency limit and metrics, endpoint label ``export``): a
download holds one of ``rightfoot.max_concurrent_requests`` slots while it runs.

* Every batch ID is checked to be a UUID before any request is made, and there may be
  at most MAX_BATCH_IDS of them (duplicates left out): the IDs go in the query string,
  47 bytes each, and a request line much over 8 KiB is refused by common servers.
* The answer is checked against the vendor's page before anything is written: a
  ``text/csv`` Content-Type whose charset, if given, is UTF-8, and a body that starts
  with the documented header line (read up to 64 KiB, UTF-8, a byte order mark
  allowed): the 9 fixed columns in order, then only ``meta_<key>`` columns, each once.
  The page says the ``meta_`` columns are appended alphabetically, not by which
  collation: an order that is alphabetical neither by code point nor ignoring case
  (Node's localeCompare, a glibc locale: ``meta_école`` before ``meta_ref1``) is logged
  once (WARNING ``export_meta_columns_unordered``) and the export goes on: the body is
  passed through as it is, and nothing here depends on that order.
  Any other answer (an empty body, an error page sent as text/csv, columns missing,
  reordered or repeated) is ApiMalformedResponse, counted with code ``malformed``
  and not retried: the same request would get the same answer.
* The export asks for ``Accept-Encoding: gzip, deflate`` and decompresses the body itself
  (:class:`BodyDecoder`, aiohttp's decompression off): a compressed body must reach the
  end of its stream (gzip: its trailer), else it is truncated, like a connection dropped
  mid-body, even when what it decompresses to ends on a row boundary. Another
  Content-Encoding is ApiMalformedResponse.
* The body is streamed to disk in 64 KiB chunks, never held in memory, into a
  temporary file in the target's directory (``.<name>.<random>.part``), which is
  fsynced and renamed over the target only once complete. On any failure
  (HTTP error, connection dropped mid-body, disk error, cancellation) the
  temporary file is removed and an existing target is left as it was. A symbolic link
  is followed (the file it resolves to is replaced); a FIFO or a device (``/dev/null``)
  is written to directly, as stdout is, and ``/dev/stdout`` is stdout. SIGTERM
  cancels the export as Ctrl-C does; the command then exits 143 (Ctrl-C: 130).
* A redirect is not followed (the target could be any host, over plain HTTP): a 3xx
  is an error naming where it pointed, not retried.
* 5xx, 429, timeouts and connection errors are retried by the poller's own
  retry loop (service/retry.py), ``rightfoot.max_attempts`` attempts in all; a
  Retry-After of a 429 or a 503 is waited in full up to ``rightfoot.export_max_wait_s`` (an
  hour by default; a longer one fails the export at once, saying so), and a wait of
  NOTE_WAIT_S or more is told on stderr with the time the export resumes. The CSV has no
  resume: a download that fails after its body started is restarted from
  scratch into a fresh temporary file (to stdout, only while nothing has been
  written yet).
* Timeouts are per read: ``connect_timeout_s`` to connect, ``export_timeout_s``
  (300 s by default) for the answer to begin, as a vendor may build the whole CSV
  before it answers, then ``timeout_s`` between two reads of the body: an export may
  legitimately take far longer than one page.
* Rows are counted as Python's ``csv.reader`` reads them (:class:`CsvRowCounter`):
  a quote opens a quoted field only at the start of a field, a newline (LF, CRLF
  or a bare CR) inside a quoted field does not end a row, and the header row is
  not counted. A body is truncated, and treated like a connection dropped
  mid-body, when it ends inside a quoted field, or when its last row has no line
  ending and fewer fields than the header (a body cut between two fields or in the
  middle of one, where the HTTP framing could not tell: a connection-close body, a
  chunked body ended early). The vendor's page does not promise
  a line ending after the last row, so a last row without one that has all the
  header's fields is taken as complete: a cut inside the last field of the last
  row cannot be told from the end of the export.

The outputs (file or stdout) are in service/export_output.py, the progress line
in service/export_progress.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import os
import random
import re
import signal
import sys
import time
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import structlog

from service.api import ApiKey, RightfootClient, one_line, redirect_refused
from service.config import Settings
from service.errors import (
    ApiError,
    ApiMalformedResponse,
    ApiTransportError,
    ExportUsageError,
    ExportWriteError,
    PollerError,
)
from service.export_output import Output, open_output, output_kind
from service.export_progress import ProgressPrinter, progress_wanted
from service.logs import redact
from service.metrics import Metrics
from service.pacing import RateLimiter
from service.retry import RetryPolicy, retry_after, retrying

log = structlog.get_logger(__name__)

ENDPOINT = "export"
CHUNK_BYTES = 64 * 1024
MAX_ERROR_BODY_BYTES = 64 * 1024
MAX_HEADER_BYTES = 64 * 1024
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TERMINATED = 143  # SIGTERM, 128 + 15 as for Ctrl-C's 130: the export did not complete
#: A wait before a new attempt at least this long is told on stderr (when it resumes).
NOTE_WAIT_S = 5.0
#: Batch IDs in one export: 150 x 47 bytes (``batch_ids=<uuid>&``) is 7,050 bytes of query
#: string, which leaves over 1 KiB of an 8 KiB request line for the rest of the URL.
MAX_BATCH_IDS = 150

_UUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)

#: The fixed leading columns of the export, in order, as the vendor's page lists them.
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
#: The prefix of the columns that may follow them, one per metadata key.
META_PREFIX = "meta_"
#: At most this much of a column name is repeated in an error.
SHOWN_CHARS = 40

#: ``progress(rows, bytes, elapsed_s)``, called after each chunk written.
ProgressCallback = Callable[[int, int, float], None]


@dataclass(frozen=True, slots=True)
class ExportResult:
    rows: int
    bytes: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------- arguments


def validate_batch_ids(batch_ids: Sequence[str]) -> list[str]:
    """The batch IDs, duplicates removed (first occurrence kept), each checked to be a UUID,
    at most MAX_BATCH_IDS of them."""
    if not batch_ids:
        raise ExportUsageError("at least one batch ID is required")
    for batch_id in batch_ids:
        if not _UUID_RE.fullmatch(batch_id):
            raise ExportUsageError(
                f"not a valid batch ID: {batch_id!r} (expected a UUID such as "
                "5d3c6bbb-fc1a-46a4-93da-1ce4a54b0d83)"
            )
    unique = list(dict.fromkeys(batch_ids))
    if len(unique) > MAX_BATCH_IDS:
        raise ExportUsageError(
            f"too many batch IDs: {len(unique)}; at most {MAX_BATCH_IDS} fit in one export "
            "request (export them in several files)"
        )
    return unique


def output_path(value: str) -> Path | None:
    """The target file of ``-o``, checked to be writable; None for ``-`` (stdout). A
    symbolic link's directory is that of the file it resolves to; a FIFO or a device is
    written to as it is (service/export_output.py)."""
    if value == "-":
        return None
    if not value:
        raise ExportUsageError("-o: the output file name is empty")
    target = Path(value)
    if target.is_dir():
        raise ExportUsageError(f"-o {value}: is a directory")
    try:
        kind, where = output_kind(target)
    except OSError as exc:
        raise ExportUsageError(f"-o {value}: {exc.strerror or exc}") from None
    if kind != "file":
        return target  # it exists, and is written to as it is
    parent = where.parent  # a symbolic link's file is replaced where it is
    if not parent.is_dir():
        raise ExportUsageError(f"-o {value}: the directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportUsageError(f"-o {value}: cannot create files in {str(parent)!r}")
    return target


# --------------------------------------------------------------------------- row counting

# Where CsvRowCounter stands after the last byte fed (the states of CPython's csv reader
# that matter to counting rows).
_RECORD_START = 0  # at the start of a row
_AFTER_CR = 1  # at the start of a row that ended with CR: a LF next is the same row end
_FIELD_START = 2  # after a comma
_IN_FIELD = 3  # inside an unquoted field, or after the closing quote of a quoted one
_QUOTED = 4  # inside a quoted field
_QUOTE_IN_QUOTED = 5  # after a quote inside a quoted field: its end, or the first of ""

_QUOTE = 0x22
_LF = 0x0A
_CR = 0x0D
_FIELD_ENDS = b",\r\n"  # a quote right after one of these (or first in the body) opens a field
# The rest of a quoted field, up to its closing quote or the end of the chunk: anything but a
# quote, and escaped quotes "". The first stops at a CR or LF too (rare in a quoted field).
_QUOTED_TEXT = re.compile(rb'[^"\r\n]*(?:""[^"\r\n]*)*')
_QUOTED_TEXT_NEWLINES = re.compile(rb'[^"]*(?:""[^"]*)*')
# Closed quoted fields without CR or LF, each followed by commas or newlines: fields that
# need no other look (any number of them, none at all included).
_QUOTED_FIELDS = re.compile(rb'(?:"[^"\r\n]*+(?:""[^"\r\n]*+)*+"[,\r\n]++)*+')
_BARE_CR = re.compile(rb"\r(?!\n)")  # at the end of the range too: counted exactly then
# An unquoted field, or what follows a quoted field's closing quote: up to a separator.
_UNQUOTED_TEXT = re.compile(rb"[^,\r\n]*")
_COMMA = 0x2C


#: The state after an unquoted stretch, by its last byte (any other: _IN_FIELD).
_STATE_AFTER = {_CR: _AFTER_CR, _LF: _RECORD_START, ord(","): _FIELD_START}


def _matched_end(pattern: re.Pattern[bytes], data: bytes, pos: int) -> int:
    """Where ``pattern``, which matches the empty string, stops matching at ``pos``."""
    match = pattern.match(data, pos)
    assert match is not None
    return match.end()


def _resume(state: int, chunk: bytes) -> tuple[int, int]:
    """The state and the position to go on from in ``chunk``, after what the previous
    chunk left pending at its last byte: chunk[pos] is then inside a quoted field, or
    outside quotes and opening none."""
    pos = 0
    if state == _AFTER_CR:
        state = _RECORD_START
        if chunk[0] == _LF:  # a CRLF split across chunks
            pos = 1
    elif state == _QUOTE_IN_QUOTED:
        # "" split across chunks (an escaped quote), or the field was closed.
        return (_QUOTED, 1) if chunk[0] == _QUOTE else (_IN_FIELD, 0)
    if state in (_RECORD_START, _FIELD_START) and chunk[pos : pos + 1] == b'"':
        return _QUOTED, pos + 1
    return state, pos


def _opening_quote(chunk: bytes, start: int) -> int:
    """The first quote from ``start`` (> 0) that opens a field, -1 if none: one right after
    a comma or a newline (a quote anywhere else is an ordinary character)."""
    quote = chunk.find(b'"', start)
    while quote != -1 and chunk[quote - 1] not in _FIELD_ENDS:
        quote = chunk.find(b'"', quote + 1)
    return quote


def _scan_fields(
    data: bytes, state: int, commas: int, header: int | None
) -> tuple[int, int, int | None]:
    """Field by field through ``data``, from ``state`` with ``commas`` separators already
    in the open row: the state at its end, the separators of the row then open, and the
    header's fields (``header``, or the fields of the first row that ends here if None;
    an empty line has none, as csv.reader reads it).

    A little Python per field: only what the open row needs is scanned this way
    (:class:`CsvRowCounter` keeps the chunk where that row starts).
    """
    pos, n = 0, len(data)
    while pos < n:
        if state == _QUOTED:
            end = _matched_end(_QUOTED_TEXT_NEWLINES, data, pos)
            if end >= n - 1:  # inside the field, or at a quote that may be the first of ""
                return (_QUOTED if end == n else _QUOTE_IN_QUOTED), commas, header
            state, pos = _IN_FIELD, end + 1  # closed: what follows is unquoted
            continue
        byte = data[pos]
        if state == _QUOTE_IN_QUOTED:
            if byte == _QUOTE:  # the second quote of "" split across chunks
                state, pos = _QUOTED, pos + 1
                continue
            state = _IN_FIELD
        elif state == _AFTER_CR:
            state = _RECORD_START
            if byte == _LF:  # the LF of a CRLF
                pos += 1
                continue
        if byte == _QUOTE and state in (_RECORD_START, _FIELD_START):
            state, pos = _QUOTED, pos + 1
            continue
        end = _matched_end(_UNQUOTED_TEXT, data, pos)
        if end == n:
            return _IN_FIELD, commas, header
        if data[end] == _COMMA:
            commas, state = commas + 1, _FIELD_START
        else:  # a row end
            if header is None:
                header = 0 if state == _RECORD_START and end == pos else commas + 1
            commas, state = 0, (_AFTER_CR if data[end] == _CR else _RECORD_START)
        pos = end + 1
    return state, commas, header


def _row_ends(data: bytes, start: int, end: int) -> int:
    """The row ends in ``data[start:end]`` as if nothing were quoted: LF, CRLF, bare CR."""
    lf = data.count(b"\n", start, end)
    if data.find(b"\r", start, end) == -1 or not _BARE_CR.search(data, start, end):
        return lf  # no CR, or only in CRLFs (counting CRLFs costs more than this search)
    return lf + data.count(b"\r", start, end) - data.count(b"\r\n", start, end)


class CsvRowCounter:
    """Counts the rows of a CSV byte stream, fed in chunks, excluding the header row.

    The rows are those Python's ``csv.reader`` reads (default dialect, ``strict=False``,
    on the body decoded from UTF-8, opened with ``newline=""``), whatever the chunking:

    * a quote opens a quoted field only at the start of a field (first in a row, or after
      a comma); anywhere else it is an ordinary character (``Bank 5" Branch``);
    * inside a quoted field, ``""`` is an escaped quote and a quote followed by anything
      else closes the field (what follows is the rest of the field, unquoted);
    * outside quotes, LF, CRLF and a bare CR each end a row (an empty line is a row);
      inside quotes they are part of the field;
    * a last row without a final newline counts.

    :meth:`finish` raises (the body is truncated) when the body ends inside a quoted field
    (``csv.reader`` with ``strict=True`` refuses it: "unexpected end of data"), or when its
    last row has no line ending and fewer fields than the header (it was cut short).

    The bytes are scanned with ``bytes.count``/``find`` and regular expressions: a chunk
    costs a few passes in C plus a little Python per quoted field (and per quote inside an
    unquoted field). Chunks may be cut anywhere (between CR and LF, between the quotes of
    ``""``, inside a UTF-8 character); nothing is kept from one chunk to the next but the
    state, not even a field. ``csv.reader`` itself is not used: it cannot stop in the middle
    of a row to wait for the next chunk, it refuses a field longer than
    ``csv.field_size_limit()`` (128 KiB unless changed for the whole process), and it builds
    every field, for no use here.

    Fields are counted only where they matter, the header and the row open at the end:
    the last chunk is kept (a reference, not a copy) with the state before it, and scanned
    field by field (:func:`_scan_fields`) only when the row open at its end runs on through
    the next chunk, or at :meth:`finish`. A chunk in which a row ends replaces it unscanned.
    """

    def __init__(self) -> None:
        self.records = 0  # row ends seen outside quotes (the header's included)
        self._state = _RECORD_START
        # The chunk where the open row starts (or runs on) and what stood before it: the
        # state, and the separators of the open row in the chunks before.
        self._tail = b""
        self._tail_state = _RECORD_START
        self._tail_commas = 0
        self._header_fields: int | None = None  # known once a scan saw the header end

    @property
    def in_quotes(self) -> bool:
        """Whether the bytes fed so far end inside a quoted field."""
        return self._state == _QUOTED

    def feed(self, chunk: bytes) -> None:
        n = len(chunk)
        if not n:
            return
        before = self._state
        # Every row end in the chunk as if nothing were quoted, less those inside quoted
        # fields below (a CRLF never straddles a quote, so the parts add up).
        records = self.records + _row_ends(chunk, 0, n)
        state, pos = _resume(self._state, chunk)
        if self._state == _AFTER_CR and chunk[0] == _LF:
            records -= 1  # the LF of a CRLF split across chunks: no second row end
        # From here chunk[pos] is outside quotes but opens no field, or inside a quoted field.
        while True:
            if state != _QUOTED:
                quote = _opening_quote(chunk, pos + 1)
                if quote == -1:
                    if pos < n:
                        state = _STATE_AFTER.get(chunk[n - 1], _IN_FIELD)
                    break
                # Quoted fields one after the other (every field quoted), in one go.
                pos = _matched_end(_QUOTED_FIELDS, chunk, quote)
                if pos == n:
                    state = _STATE_AFTER[chunk[n - 1]]
                    break
                if pos > quote and chunk[pos] != _QUOTE:  # at an unquoted field
                    continue
                state, pos = _QUOTED, pos + 1
            # Inside a quoted field: on to its closing quote.
            end = _matched_end(_QUOTED_TEXT, chunk, pos)
            if end < n and chunk[end] != _QUOTE:  # a CR or LF inside the field
                end = _matched_end(_QUOTED_TEXT_NEWLINES, chunk, end)
                records -= _row_ends(chunk, pos, end)
            if end >= n - 1:  # inside the field, or at a quote that may be the first of ""
                state = _QUOTED if end == n else _QUOTE_IN_QUOTED
                break
            # Closed (the byte after the quote is not another one): outside quotes again.
            state, pos = _IN_FIELD, end + 1
        row_ended = records > self.records
        self.records = records
        self._state = state
        if not row_ended or self._header_fields is None:
            self._scan_tail()  # the open row (or the header) runs on through this chunk
        self._tail, self._tail_state = chunk, before

    def _scan_tail(self) -> None:
        state, commas, header = _scan_fields(
            self._tail, self._tail_state, self._tail_commas, self._header_fields
        )
        self._tail, self._tail_state, self._tail_commas = b"", state, commas
        self._header_fields = header

    def open_row_fields(self) -> int:
        """The fields of the row open at the end of what was fed (0 if none is open), as
        csv.reader reads them: the separators outside quotes, plus one."""
        if self._state in (_RECORD_START, _AFTER_CR):
            return 0
        self._scan_tail()
        return self._tail_commas + 1

    @property
    def header_fields(self) -> int | None:
        """The header's fields, once its line has ended (None before)."""
        if self._header_fields is None and self.records:
            self._scan_tail()
        return self._header_fields

    @property
    def rows(self) -> int:
        """Complete data rows so far."""
        return max(0, self.records - 1)

    def finish(self) -> int:
        """Data rows of the whole body, counting a last row without a final newline.

        Raises ApiTransportError (code ``truncated``) if the body ends inside a quoted
        field, or if its last row has no line ending and fewer fields than the header.
        """
        if self._state == _QUOTED:
            raise ApiTransportError(
                "the export ended inside a quoted field: the body is truncated",
                code="truncated",
            )
        fields = self.open_row_fields()
        header = self.header_fields
        if fields and header is not None and fields < header:
            raise ApiTransportError(
                f"the export's last row has {fields} of the header's {header} fields and "
                "no line ending: the body is truncated",
                code="truncated",
            )
        return max(0, self.records + (fields > 0) - 1)


# --------------------------------------------------------------------------- content coding

#: What the export asks for (``Accept-Encoding``): the codings :class:`BodyDecoder` reads.
ACCEPT_ENCODING = "gzip, deflate"
#: Decompressed bytes handed on at a time: a small compressed chunk may expand a thousandfold.
DECODED_PIECE_BYTES = 1024 * 1024
_IDENTITY, _GZIP, _DEFLATE = "identity", "gzip", "deflate"
_CODINGS = {
    "": _IDENTITY,
    "identity": _IDENTITY,
    "gzip": _GZIP,
    "x-gzip": _GZIP,
    "deflate": _DEFLATE,
}


class BodyDecoder:
    """The export's body from its Content-Encoding: as it is, gzip or deflate.

    aiohttp's own decompression is off for the export: it checks that a deflate stream
    reached its end but not a gzip one, so a gzip body cut off where what it decompresses
    to ends on a row boundary would pass for a whole export. Here a compressed body must
    reach the end of its stream (``zlib``'s ``eof``: for gzip, the trailer with the CRC and
    length checked), else :meth:`finish` raises ApiTransportError ``truncated``, retried
    like a connection dropped mid-body; data zlib cannot read is ``corrupt``, retried too.

    gzip may hold several members one after another (NUL padding between them is skipped);
    deflate is the zlib format, or raw deflate as some servers send it (as aiohttp reads it).
    Another coding (br, zstd, a list) is ApiMalformedResponse: the export asks for gzip or
    deflate only (``ACCEPT_ENCODING``).
    """

    def __init__(self, content_encoding: str | None) -> None:
        value = (content_encoding or "").strip().lower()
        coding = _CODINGS.get(value)
        if coding is None:
            raise _malformed(
                f"the API answered with Content-Encoding {_shown(content_encoding or '')}: "
                f"the export asks for {ACCEPT_ENCODING} (or none) and reads no other"
            )
        self.coding = coding
        self._zlib: Any = None  # zlib's Decompress object, once the stream's format is known
        self._pending = b""  # the first byte of a deflate body, until the second tells zlib/raw

    @property
    def compressed(self) -> bool:
        return self.coding != _IDENTITY

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The decoded bytes of ``data`` (the next bytes of the body as sent), in pieces of
        at most DECODED_PIECE_BYTES."""
        if not self.compressed:
            if data:
                yield data
            return
        data = self._pending + data
        self._pending = b""
        while data:
            if self._zlib is None or self._zlib.eof:
                data = self._next_stream(data)
                if self._zlib is None or not data:
                    return
            try:
                out = self._zlib.decompress(data, DECODED_PIECE_BYTES)
                if out:
                    yield out
                # More output may be held back when the piece was full, input or not.
                while len(out) == DECODED_PIECE_BYTES and not self._zlib.eof:
                    out = self._zlib.decompress(self._zlib.unconsumed_tail, DECODED_PIECE_BYTES)
                    if out:
                        yield out
            except zlib.error as exc:
                raise self._corrupt(exc) from None
            data = self._zlib.unused_data if self._zlib.eof else self._zlib.unconsumed_tail

    def finish(self) -> None:
        """The body ended: ApiTransportError ``truncated`` if its compressed stream did not."""
        if not self.compressed:
            return
        if self._pending or self._zlib is None or not self._zlib.eof:
            raise ApiTransportError(
                f"the export's {self.coding} stream stopped short of its end: "
                "the body is truncated",
                code="truncated",
            )

    def _next_stream(self, data: bytes) -> bytes:
        """Start the (next) compressed stream at ``data``: what is left of ``data`` to feed
        it (empty while a deflate body's format cannot be told yet)."""
        if self.coding == _GZIP:
            if self._zlib is not None:  # another member may follow the first, after NULs
                data = data.lstrip(b"\0")
                if not data:
                    return b""
            self._zlib = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            return data
        if self._zlib is not None:
            raise self._corrupt(None)  # bytes after the end of the deflate stream
        if len(data) < 2:
            self._pending = data
            return b""
        # A zlib header: compression method 8, and the two bytes a multiple of 31.
        zlib_header = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
        self._zlib = zlib.decompressobj(wbits=zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS)
        return data

    def _corrupt(self, exc: zlib.error | None) -> ApiTransportError:
        why = f" ({exc})" if exc is not None else ": data after its end"
        return ApiTransportError(
            f"the export's {self.coding} stream cannot be decompressed{why}", code="corrupt"
        )


async def raw_reads(
    content: aiohttp.StreamReader, read_timeout_s: float
) -> AsyncGenerator[bytes, None]:
    """The body as sent, as it comes (up to CHUNK_BYTES a read); TimeoutError when no byte
    comes for ``read_timeout_s``."""
    while True:
        async with asyncio.timeout(read_timeout_s):
            raw = await content.read(CHUNK_BYTES)
        if not raw:
            return
        yield raw


async def decoded_body(
    content: aiohttp.StreamReader, decoder: BodyDecoder, read_timeout_s: float
) -> AsyncGenerator[bytes, None]:
    """The body, decoded, in pieces; at its end, ``decoder.finish()`` (truncation) first.
    TimeoutError when no byte comes for ``read_timeout_s``."""
    async with contextlib.aclosing(raw_reads(content, read_timeout_s)) as reads:
        async for raw in reads:
            for piece in decoder.feed(raw):
                yield piece
    decoder.finish()


# --------------------------------------------------------------------------- header


def _shown(value: str) -> str:
    return repr(value[:SHOWN_CHARS]) + ("…" if len(value) > SHOWN_CHARS else "")


def header_problem(columns: Sequence[str]) -> str | None:
    """What keeps ``columns`` from being the export's documented header; None if nothing."""
    fixed = len(EXPORT_COLUMNS)
    for i, name in enumerate(EXPORT_COLUMNS):
        if i == len(columns):
            return f"it has {i} of the {fixed} fixed columns: {name!r} is missing"
        if columns[i] != name:
            return f"column {i + 1} is {_shown(columns[i])}, not {name!r}"
    meta = list(columns[fixed:])
    seen: set[str] = set()
    for i, name in enumerate(meta, start=fixed + 1):
        if not name.startswith(META_PREFIX):
            return f"column {i} is {_shown(name)}: only {META_PREFIX}<key> columns may follow"
        if name in seen:
            return f"column {i} repeats {_shown(name)}"
        seen.add(name)
    return None


def header_order_note(columns: Sequence[str]) -> str | None:
    """Where the ``meta_`` columns of a documented header are in an order alphabetical
    neither by code point nor ignoring case; None if they are in either. Not a reason to
    refuse the export (the vendor may sort by another collation): a note for a WARNING."""
    meta = list(columns[len(EXPORT_COLUMNS) :])
    if meta == sorted(meta) or meta == sorted(meta, key=str.casefold):
        return None
    k = next(k for k in range(1, len(meta)) if meta[k] < meta[k - 1])
    return (
        f"column {len(EXPORT_COLUMNS) + k + 1} {_shown(meta[k])} comes after "
        f"{_shown(meta[k - 1])}: the {META_PREFIX} columns are not in alphabetical order "
        "by code point nor ignoring case"
    )


def _header_columns(head: bytes) -> list[str]:
    """The first row of ``head`` as csv.reader reads it, from UTF-8 (a byte order mark
    before it left out); ApiMalformedResponse if it is not UTF-8."""
    text = head.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    try:
        columns = next(csv.reader(io.StringIO(text, newline="")), [])
    except csv.Error as exc:
        raise _malformed(f"the export's header cannot be read as CSV ({exc})") from None
    try:
        "".join(columns).encode("utf-8")
    except UnicodeEncodeError:  # a byte that is not UTF-8, kept as a lone surrogate
        raise _malformed("the export's header is not UTF-8") from None
    return columns


def _malformed(message: str) -> ApiMalformedResponse:
    return ApiMalformedResponse(message, status=200)


def _check_content_type(resp: aiohttp.ClientResponse) -> None:
    """A text/csv answer whose charset, if given, is UTF-8."""
    content_type = resp.headers.get("Content-Type", "")
    if resp.content_type != "text/csv":
        raise _malformed(
            f"the API answered 200 with Content-Type {content_type or 'none'!r}, not text/csv"
        )
    if resp.charset is not None and resp.charset.lower() != "utf-8":
        raise _malformed(
            f"the API answered 200 with Content-Type {content_type!r}: the export is UTF-8"
        )


async def _read_header(body: AsyncIterator[bytes], counter: CsvRowCounter) -> bytes:
    """The body's first bytes (``body``: decoded), fed to ``counter``, up to the end of its
    header line (and the rest of that piece), after checking that line;
    ApiMalformedResponse if it is not the documented one, or longer than MAX_HEADER_BYTES."""
    head = bytearray()
    while not counter.records:
        if len(head) >= MAX_HEADER_BYTES:
            raise _malformed(
                f"the export's header line is longer than {MAX_HEADER_BYTES // 1024} KiB"
            )
        chunk = await anext(body, b"")
        if not chunk:
            break
        counter.feed(chunk)
        head += chunk
    if not head:
        raise _malformed("the API answered 200 with an empty body, not the CSV export")
    if not counter.records and counter.in_quotes:
        counter.finish()  # the body ended inside the header: truncated
    columns = _header_columns(bytes(head))
    problem = header_problem(columns)
    if problem is not None:
        raise _malformed(f"the export's header is not the documented one: {problem}")
    note = header_order_note(columns)
    if note is not None:
        log.warning("export_meta_columns_unordered", detail=note)
    return bytes(head)


# --------------------------------------------------------------------------- download


async def export_csv(
    client: RightfootClient,
    batch_ids: Sequence[str],
    dest: Path | None,
    *,
    progress: ProgressCallback | None = None,
) -> ExportResult:
    """Export the batches' CSV to ``dest`` (None: stdout), after validating the batch IDs.

    ``client`` must be started. Raises ExportUsageError before any request for a bad
    batch ID, ApiError (typed, see service.errors) when the API refuses or cannot be
    reached within ``max_attempts``, ExportWriteError when the output cannot be written.
    """
    return await download_export(client, validate_batch_ids(batch_ids), dest, progress=progress)


async def download_export(
    client: RightfootClient,
    batch_ids: Sequence[str],
    dest: Path | None,
    *,
    progress: ProgressCallback | None = None,
    rng: random.Random | None = None,
    notify: Callable[[str], None] | None = None,
) -> ExportResult:
    """:func:`export_csv` without validating the batch IDs: the API judges them.

    ``notify(text)`` hears of each wait of NOTE_WAIT_S or more before a new attempt (a
    Retry-After, a long backoff): why, and when the export resumes."""
    output = open_output(dest)
    try:
        await output.prepare()
        return await _download_to(client, batch_ids, output, progress, rng, notify)
    finally:
        output.close()


async def _download_to(
    client: RightfootClient,
    batch_ids: Sequence[str],
    output: Output,
    progress: ProgressCallback | None,
    rng: random.Random | None,
    notify: Callable[[str], None] | None,
) -> ExportResult:
    cfg = client.cfg
    # A 429's Retry-After is waited up to rightfoot.export_max_wait_s (an hour by default):
    # a one-off command has nothing else to do meanwhile, and says when it resumes.
    policy = RetryPolicy.from_config(
        cfg,
        max_retry_after_s=cfg.export_max_wait_s,
        max_retry_after_name="rightfoot.export_max_wait_s",
    )
    started = time.monotonic()

    def blocker() -> str | None:
        return None if output.restartable else f"the output on {output.name} is incomplete"

    def on_retry(exc: ApiError, failures: int, delay: float) -> None:
        log.info("export_retry", error=str(exc), attempt=failures, delay_s=round(delay, 3))
        if notify is not None and delay >= NOTE_WAIT_S:
            notify(_wait_note(exc, failures, delay, cfg.max_attempts))

    rows, size = await retrying(
        lambda: _attempt(client, batch_ids, output, progress, started),
        policy,
        rng=rng or client.rng,
        sleep=client.sleep,
        blocker=blocker,
        on_retry=on_retry,
        give_up=_gave_up,
    )
    return ExportResult(rows=rows, bytes=size, seconds=time.monotonic() - started)


def _wait_note(exc: ApiError, failures: int, delay: float, attempts: int) -> str:
    """``waiting 600 s (Retry-After), until 14:05:09, before attempt 2 of 4: HTTP 429 …``."""
    asked = retry_after(exc)
    cause = "Retry-After" if asked is not None and asked >= delay else "backoff"
    resume = time.time() + delay
    same_day = time.localtime(resume)[:3] == time.localtime()[:3]
    at = time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S", time.localtime(resume))
    why = one_line(_describe_failure(exc))  # the API's text: without the key already
    return (
        f"waiting {delay:.0f} s ({cause}), until {at}, before attempt {failures + 1} of "
        f"{attempts}: {why}"
    )


def _gave_up(exc: ApiError, why: str) -> ApiError:
    return type(exc)(
        f"{exc.args[0]} ({why})", status=exc.status, code=exc.code, retry_after=exc.retry_after
    )


async def _attempt(
    client: RightfootClient,
    batch_ids: Sequence[str],
    output: Output,
    progress: ProgressCallback | None,
    started: float,
) -> tuple[int, int]:
    """One request, in its turn (a slot, then the rate: ``RightfootClient.turn``)."""
    async with client.turn():
        return await _download(client, batch_ids, output, progress, started)


async def _download(
    client: RightfootClient,
    batch_ids: Sequence[str],
    output: Output,
    progress: ProgressCallback | None,
    started: float,
) -> tuple[int, int]:
    """One request; the CSV committed to the output, or everything written undone."""
    cfg = client.cfg
    url = cfg.base_url.rstrip("/") + cfg.export_path
    params = [("batch_ids", batch_id) for batch_id in batch_ids]
    # The answer may take export_timeout_s to begin (a vendor building the CSV before it
    # answers); then every read of the body timeout_s at most (raw_reads).
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=cfg.connect_timeout_s, sock_read=cfg.export_timeout_s
    )
    headers: dict[str, str] = {
        **client.request_args()["headers"],
        "Accept-Encoding": ACCEPT_ENCODING,
    }
    request_started = time.perf_counter()
    code = "error"
    answered = begun = False  # a 200 being read; the output begun
    try:
        # Decompressed here, not by aiohttp (BodyDecoder: a gzip body cut short is caught).
        async with client.session.get(
            url,
            params=params,
            headers=headers,
            timeout=timeout,
            allow_redirects=False,
            auto_decompress=False,
        ) as resp:
            code = str(resp.status)
            if 300 <= resp.status < 400:
                raise redirect_refused(
                    resp, "rightfoot.base_url and rightfoot.export_path", client.secrets()
                )
            if resp.status != 200:
                raise await _error_response(client, resp)
            _check_content_type(resp)
            decoder = BodyDecoder(resp.headers.get("Content-Encoding"))
            answered = True
            counter = CsvRowCounter()
            reading = decoded_body(resp.content, decoder, cfg.timeout_s)
            async with contextlib.aclosing(reading) as body:
                head = await _read_header(body, counter)
                output.begin()
                begun = True
                output.write(head)
                size = len(head)
                if progress is not None:
                    progress(counter.rows, size, time.monotonic() - started)
                async for chunk in body:
                    output.write(chunk)
                    size += len(chunk)
                    counter.feed(chunk)
                    if progress is not None:
                        progress(counter.rows, size, time.monotonic() - started)
            rows = counter.finish()
            output.commit()
            return rows, size
    except BaseException as exc:
        if begun:
            output.abort()
        if isinstance(exc, TimeoutError):
            code = "timeout"
            what = (
                f"the download stalled: no data for {cfg.timeout_s:g} s"
                if answered
                else f"the API did not answer within {cfg.export_timeout_s:g} s "
                "(rightfoot.export_timeout_s)"
            )
            raise ApiTransportError(what, code="timeout") from None
        if isinstance(exc, aiohttp.ClientError):
            code = "connection_error"
            raise ApiTransportError(_describe(exc, answered), code="connection_error") from None
        if isinstance(exc, ApiTransportError) and exc.code in ("truncated", "corrupt"):
            code = exc.code
        if isinstance(exc, ApiMalformedResponse):
            code = "malformed"
        raise
    finally:
        client.metrics.api_requests.labels(ENDPOINT, code).inc()
        client.metrics.api_duration.labels(ENDPOINT).observe(time.perf_counter() - request_started)


def _describe(exc: aiohttp.ClientError, during_body: bool) -> str:
    detail = str(exc).splitlines()[0][:200] if str(exc) else ""
    what = type(exc).__name__ + (f": {detail}" if detail else "")
    if during_body:
        return f"the connection failed during the download ({what})"
    return f"cannot reach the API ({what})"


async def _error_response(client: RightfootClient, resp: aiohttp.ClientResponse) -> ApiError:
    """The typed error for a non-200 answer, its body read up to a bound; the API's text
    in it one short line without the key (``RightfootClient.error_from``)."""
    body = bytearray()
    try:  # decoded as far as it goes: the status is what matters, the text is a help
        decoder = BodyDecoder(resp.headers.get("Content-Encoding"))
        async for raw in raw_reads(resp.content, client.cfg.timeout_s):
            for chunk in decoder.feed(raw):
                body += chunk[: MAX_ERROR_BODY_BYTES - len(body)]
                if len(body) >= MAX_ERROR_BODY_BYTES:
                    break
            if len(body) >= MAX_ERROR_BODY_BYTES:
                break
    except ApiError:
        pass
    return client.error_from(resp, bytes(body))


# --------------------------------------------------------------------------- command


def _describe_failure(exc: PollerError) -> str:
    """``HTTP 403 FORBIDDEN: <the API's message>``; without an HTTP status, just the message."""
    if isinstance(exc, ApiError) and exc.status is None:
        return str(exc.args[0])
    return str(exc)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


_SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class _OnSigterm:
    """While in use, SIGTERM cancels the running task as Ctrl-C does (``asyncio.run``
    turns SIGINT into a cancellation of its main task), and notes that it did."""

    def __init__(self) -> None:
        self.received = False
        self._previous: _SignalHandler = None
        self._installed = False

    def __enter__(self) -> _OnSigterm:
        task = asyncio.current_task()
        assert task is not None

        def terminate() -> None:
            self.received = True
            task.cancel()

        self._previous = signal.getsignal(signal.SIGTERM)
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, terminate)
        except (NotImplementedError, RuntimeError, ValueError):
            return self  # no signal handlers here (not the main thread, or not Unix)
        self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
            if self._previous is not None:
                signal.signal(signal.SIGTERM, self._previous)


async def export_main(settings: Settings, args: argparse.Namespace) -> int:
    """``rightfoot-poller export``: 0 when exported, 1 on API, network or disk errors,
    2 on bad arguments, 143 on SIGTERM (Ctrl-C raises KeyboardInterrupt: 130). One line
    on stderr either way (plus progress, when wanted)."""
    err = sys.stderr
    secrets = settings.secrets()
    try:
        batch_ids = validate_batch_ids(args.batch_ids)
        dest = output_path(args.output)
    except ExportUsageError as exc:
        print(f"rightfoot-poller: {exc}", file=err)
        return EXIT_USAGE
    if settings.rightfoot.api_key is None:
        print(
            "rightfoot-poller: no API key: set RIGHTFOOT_API_KEY (or RIGHTFOOT_API_KEY_FILE)",
            file=err,
        )
        return EXIT_USAGE
    tty = _stderr_is_tty()
    printer = (
        ProgressPrinter(err, tty=tty)
        if progress_wanted(args.progress, to_stdout=dest is None, stderr_is_tty=tty)
        else None
    )
    client = RightfootClient(
        settings.rightfoot,
        instance_id=settings.instance_id,
        metrics=Metrics(),
        api_key=ApiKey.from_env(settings.rightfoot.api_key.get_secret_value()),
        limiter=RateLimiter(settings.rightfoot.max_requests_per_s),
    )

    def notify(text: str) -> None:
        if printer is not None:
            printer.abort()  # a half-drawn progress line ended first
        print(f"rightfoot-poller: {one_line(redact(text, secrets))}", file=err, flush=True)

    sigterm = _OnSigterm()
    try:
        with sigterm:
            await client.start()
            result = await download_export(client, batch_ids, dest, progress=printer, notify=notify)
    except (ApiError, ExportWriteError) as exc:
        if printer is not None:
            printer.abort()
        # One line whatever the message holds (a path with a newline in it, say).
        why = one_line(redact(_describe_failure(exc), secrets))
        print(f"rightfoot-poller: export failed: {why}", file=err)
        return EXIT_FAILED
    except asyncio.CancelledError:
        if printer is not None:
            printer.abort()
        if dest is None or output_kind(dest)[0] != "file":
            where = "stdout" if dest is None else str(dest)
            left = f"the output on {where} is incomplete"
        else:
            left = f"{dest} not written"
        print(f"rightfoot-poller: export interrupted; {left}", file=err)
        if sigterm.received:
            return EXIT_TERMINATED
        raise
    finally:
        await client.close()
    if printer is not None:
        printer.finish(result)
    where = "stdout" if dest is None else str(dest)
    print(
        f"exported {result.rows} rows ({result.bytes} bytes) to {where} in {result.seconds:.2f} s",
        file=err,
    )
    return EXIT_OK
