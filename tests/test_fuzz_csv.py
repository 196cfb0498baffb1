"""Property tests of the CSV export's reader: whatever the API streams, rows are counted
as Python's ``csv`` module reads them or the export fails with a typed, counted error,
never anything else.

* ``CsvRowCounter`` against ``csv.reader`` (default dialect, ``strict=False``) on the
  whole body, for any bytes cut into any chunks: the same rows, the same fields in the
  header and in a last row without a line ending, and ``truncated`` exactly when the body
  ends inside a quoted field (where ``strict=True`` would say "unexpected end of data")
  or its last row has no line ending and fewer fields than the header; on any CSV that
  ``csv.writer`` can produce too;
* examples of what a quote-parity count got wrong or what chunking could break;
* the whole download (``download_export``) against a server streaming arbitrary bytes
  (after the documented header line, a wrong one or none) with an arbitrary Content-Type:
  the file holds exactly what was sent, or nothing is left behind and the error is typed
  and counted in ``api_requests_total``.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.api import ApiKey, RightfootClient
from service.config import load_settings
from service.errors import ApiError, ApiMalformedResponse, ApiTransportError
from service.export import EXPORT_COLUMNS, CsvRowCounter, download_export
from service.metrics import Metrics
from service.pacing import RateLimiter

FUZZ = settings(max_examples=300, deadline=None)
BATCH = "11111111-2222-4333-8444-555555555555"
KEY = "sk-fuzz-csv-0a1b2c3d4e5f"

fields = st.text(
    alphabet=st.sampled_from("ab ,\"\r\n;\t'é€😀\\") | st.characters(codec="utf-8"), max_size=12
)
rows = st.lists(st.lists(fields, min_size=1, max_size=5), min_size=0, max_size=12)
# Bytes made mostly of what matters to a CSV reader (quotes, commas, CR, LF), with some
# UTF-8, invalid UTF-8 and NUL; and any bytes at all.
csvish = st.lists(
    st.sampled_from(
        [
            *(b'"', b'"', b",", b"\r", b"\n", b"\r\n", b"a", b" ", b"\xc3\xa9", b"\xe9", b"\0"),
            *(b',"', b'",', b'"\r\n', b'\n"', b'""'),  # quoted fields, more often
        ]
    ),
    max_size=80,
).map(b"".join)
bodies = csvish | st.binary(max_size=400)
cuts_lists = st.lists(st.integers(0, 10**6), max_size=20)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at the given offsets (taken modulo its length)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def csv_reads(body: bytes) -> tuple[int, bool]:
    """What ``csv.reader`` makes of the whole body: its data rows, and whether it ends
    inside a quoted field.

    The counter works on bytes, csv on text: undecodable bytes become lone surrogates
    (quotes, commas, CR and LF are ASCII, and no multi-byte UTF-8 sequence holds an ASCII
    byte, so the structure is the same). With ``strict=False`` csv ends a body that stops
    inside a quoted field with that field as read so far, silently; what follows such a
    body becomes part of the field, which is how it is told here.
    """
    text = body.decode("utf-8", "surrogateescape")
    records = list(csv.reader(io.StringIO(text, newline="")))
    followed = list(csv.reader(io.StringIO(text + "\nEND", newline="")))
    inside_quotes = followed[-1] != ["END"]
    try:
        list(csv.reader(io.StringIO(text, newline=""), strict=True))
    except csv.Error as exc:
        # What strict=True says of a body ending inside a quoted field; it may stop before
        # the end, at a closing quote followed by anything but a comma or a newline.
        if "unexpected end of data" in str(exc):
            assert inside_quotes
    else:
        assert not inside_quotes
    return max(0, len(records) - 1), inside_quotes


def fields_read(body: bytes) -> tuple[int | None, int]:
    """The header's fields as ``csv.reader`` reads them (None while its line has not
    ended), and the fields of a last row without a line ending (0 if the body ends with
    one; an empty line has no fields)."""
    records = list(csv.reader(io.StringIO(body.decode("utf-8", "surrogateescape"), newline="")))
    open_row = bool(body) and body[-1:] not in (b"\r", b"\n")
    header = len(records[0]) if records and (len(records) > 1 or not open_row) else None
    return header, (len(records[-1]) if open_row else 0)


def cut_short(body: bytes) -> bool:
    """Whether the body's last row has no line ending and fewer fields than the header."""
    header, last = fields_read(body)
    return header is not None and 0 < last < header


def truncated_body(body: bytes) -> bool:
    return csv_reads(body)[1] or cut_short(body)


def counted(chunks: list[bytes]) -> tuple[int, bool]:
    """What ``CsvRowCounter`` makes of the chunks: rows (0 if truncated) and truncated."""
    counter = CsvRowCounter()
    for chunk in chunks:
        counter.feed(chunk)
    try:
        return counter.finish(), False
    except ApiTransportError as exc:
        assert exc.code == "truncated"
        assert counter.in_quotes or 0 < counter.open_row_fields() < (counter.header_fields or 0)
        return 0, True


def expected(body: bytes) -> tuple[int, bool]:
    rows, truncated = csv_reads(body)[0], truncated_body(body)
    return (0 if truncated else rows), truncated


def every_chunking(body: bytes) -> Iterator[list[bytes]]:
    """The body whole, byte by byte, and cut in two at every offset."""
    yield [body]
    yield [body[i : i + 1] for i in range(len(body))]
    for i in range(1, len(body)):
        yield [body[:i], body[i:]]


@FUZZ
@given(bodies, cuts_lists)
def test_any_bytes_any_chunking_counted_as_csv_reader_reads_them(
    body: bytes, cuts: list[int]
) -> None:
    counter = CsvRowCounter()
    previous = 0
    for chunk in chunked(body, cuts):
        counter.feed(chunk)  # never raises
        assert counter.rows >= previous  # progress never goes backwards
        previous = counter.rows
    rows, inside_quotes = csv_reads(body)
    assert counter.in_quotes == inside_quotes
    if not inside_quotes:
        assert (counter.header_fields, counter.open_row_fields()) == fields_read(body)
    truncated = truncated_body(body)
    if truncated:
        with pytest.raises(ApiTransportError) as caught:
            counter.finish()
        assert caught.value.code == "truncated"
    else:
        assert counter.finish() == rows
        assert counter.rows <= rows
    # A cut anywhere (between CR and LF, between the quotes of "", inside a UTF-8
    # character...), and every byte a chunk of its own.
    for chunks in every_chunking(body):
        assert counted(chunks) == ((0, True) if truncated else (rows, False)), chunks


@FUZZ
@given(
    rows,
    st.sampled_from(["\r\n", "\n", "\r"]),
    st.booleans(),
    st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]),
    cuts_lists,
)
def test_counts_every_csv_the_csv_module_writes(
    table: list[list[str]],
    terminator: str,
    final_newline: bool,
    quoting: Literal[0, 1, 2, 3],
    cuts: list[int],
) -> None:
    # With QUOTE_MINIMAL, csv.writer quotes a field holding a CR or LF only if that
    # character is in its line terminator ('a\rb' stays unquoted with '\n'), and
    # csv.reader then ends a row at it: the counter agrees with the reader all the same.
    out = io.StringIO(newline="")
    csv.writer(out, lineterminator=terminator, quoting=quoting).writerows(table)
    text = out.getvalue()
    if not final_newline and text.endswith(terminator):
        text = text[: -len(terminator)]
    body = text.encode()
    assert counted(chunked(body, cuts)) == expected(body)


@FUZZ
@given(rows.filter(lambda t: len(t) > 1), st.data())
def test_a_body_cut_inside_a_quoted_field_is_truncated(
    table: list[list[str]], data: st.DataObject
) -> None:
    out = io.StringIO(newline="")
    csv.writer(out, lineterminator="\r\n", quoting=csv.QUOTE_ALL).writerows(table)
    body = out.getvalue().encode()
    # With every field quoted, every quote opens or closes a field or is one of "": after
    # an odd number of them the body is inside a quoted field.
    opening = [i + 1 for i in range(len(body)) if body[: i + 1].count(b'"') % 2 == 1]
    cut = data.draw(st.sampled_from(opening))
    assert csv_reads(body[:cut])[1]
    counter = CsvRowCounter()
    counter.feed(body[:cut])
    with pytest.raises(ApiTransportError, match="truncated"):
        counter.finish()


# --------------------------------------------------------------------------- examples


@pytest.mark.parametrize(
    ("body", "rows", "truncated"),
    [
        # A quote inside an unquoted field is an ordinary character (an odd number of
        # quotes in the body, which a quote-parity count took for a truncated body).
        pytest.param(
            b"Authorizer ID,Institution,Zip\r\n"
            b'1258580,Bank 5" Branch,88627\r\n'
            b"1258581,Chase,00517\r\n",
            2,
            False,
            id="quote-inside-unquoted-field",
        ),
        pytest.param(b'h1,h2\r\n1,5" and 6"\r\n2,x"\r\n3,"q"\r\n', 3, False, id="quotes-unquoted"),
        # After a quoted field is closed, what follows is unquoted: a quote there opens
        # nothing (csv reads the field as 'ab"c').
        pytest.param(b'h\n"a"b"c,d\n1,2\n', 2, False, id="quote-after-closed-field"),
        pytest.param(b"h1,h2\r1,2\r3,4\r", 2, False, id="bare-cr"),
        pytest.param(b"h1,h2\r1,2\r3,4", 2, False, id="bare-cr-no-final"),
        pytest.param(b"h\r\r\n\n\r1\n", 4, False, id="empty-lines-are-rows"),
        pytest.param(b'h\r\n1,"say ""hi"", ok",x\r\n2,"""",y\r\n', 2, False, id="escaped-quotes"),
        # Newlines of every kind inside a quoted field end no row.
        pytest.param(
            b'h1,h2\r\n1,"line 1\r\nline 2\nline 3\rline 4"\r\n2,"\n"\r\n3,"a\r"\r\n',
            3,
            False,
            id="quoted-newlines",
        ),
        pytest.param(b'h\r\n1,"open\r\nfield', 0, True, id="ends-inside-quotes"),
        pytest.param(b'h\r\n1,"a""', 0, True, id="ends-after-escaped-quote"),
        pytest.param(b'h\r\n1,"', 0, True, id="ends-after-opening-quote"),
        pytest.param(b'h\r\n1,"a"', 1, False, id="ends-after-closing-quote"),
        pytest.param(b"", 0, False, id="empty"),
        # A last row without a line ending and fewer fields than the header was cut short;
        # with all of them (or more) it is complete, whatever its last field holds.
        pytest.param(b"h1,h2,h3\r\n1,2,3\r\n4,5", 0, True, id="last-row-short"),
        pytest.param(b'h1,h2,h3\r\n1,"a,b"', 0, True, id="last-row-short-quoted-comma"),
        pytest.param(b'h1,h2,h3\r\n1,"a""b"\r\n2,"x"', 0, True, id="short-after-quote"),
        pytest.param(b"h1,h2\r\n1,2\r\n3,", 2, False, id="last-field-empty"),
        pytest.param(b"h1,h2\r\n1,2,3", 1, False, id="last-row-longer"),
        pytest.param(b"h1,h2,h3", 0, False, id="header-only-no-line-ending"),
        pytest.param(b"\r\n1", 1, False, id="empty-header-line"),
    ],
)
def test_examples_whatever_the_chunking(body: bytes, rows: int, truncated: bool) -> None:
    assert expected(body) == (rows, truncated)
    for chunks in every_chunking(body):
        assert counted(chunks) == (rows, truncated), chunks


def test_the_truncated_body_is_what_strict_csv_refuses_at_its_end() -> None:
    text = 'h\r\n1,"open\r\nfield'
    # strict=False reads a last row, silently; strict=True says where it stopped.
    assert list(csv.reader(io.StringIO(text, newline=""))) == [["h"], ["1", "open\r\nfield"]]
    with pytest.raises(csv.Error, match="unexpected end of data"):
        list(csv.reader(io.StringIO(text, newline=""), strict=True))
    assert counted([text.encode()]) == (0, True)


def test_a_crlf_split_across_chunks_is_one_row_end() -> None:
    counter = CsvRowCounter()
    counter.feed(b"h\r\n1,a\r")
    assert counter.rows == 1  # the CR ended the row
    counter.feed(b'\n"2\r\n",b\r')  # the LF ends no other row; a quoted field follows
    assert counter.rows == 2
    counter.feed(b"\n")
    counter.feed(b"\r")  # a bare CR: an empty row
    assert counter.finish() == 3 == csv_reads(b'h\r\n1,a\r\n"2\r\n",b\r\n\r')[0]


def test_escaped_quote_split_across_chunks_stays_inside_the_field() -> None:
    # 'a"' + LF + 'b' is one field: taking the first quote for the field's end would make
    # the second an ordinary character and the LF a row end.
    body = b'h\n"a""\nb"\n'
    assert csv_reads(body) == (1, False)
    counter = CsvRowCounter()
    counter.feed(b'h\n"a"')
    assert not counter.in_quotes  # a closing quote, or the first of "": the next byte says
    counter.feed(b'"\nb"\n')
    assert counter.finish() == 1


def test_multi_byte_characters_split_across_chunks() -> None:
    body = 'h\n"é€😀, ""x""\n",😀\n€,é\n'.encode()
    for chunks in every_chunking(body):
        assert counted(chunks) == (2, False)


# --------------------------------------------------------------------------- the download


@dataclass
class Streamed:
    """What the fake export endpoint sends next."""

    chunks: list[bytes] = field(default_factory=list)
    content_type: str = "text/csv"
    requests: int = 0


@pytest.fixture(scope="module")
async def export_server() -> AsyncIterator[tuple[str, Streamed]]:
    streamed = Streamed()

    async def export(request: web.Request) -> web.StreamResponse:
        streamed.requests += 1
        resp = web.StreamResponse(headers={"Content-Type": streamed.content_type})
        await resp.prepare(request)
        for chunk in streamed.chunks:
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/v1/balances/export", export)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), streamed
    finally:
        await server.close()


HEADER = ",".join(EXPORT_COLUMNS).encode()
# The documented header line (with meta_ columns, after a byte order mark), a wrong one, none.
header_lines = st.tuples(
    st.sampled_from(
        [
            HEADER,
            HEADER + b",meta_a,meta_b",
            b"\xef\xbb\xbf" + HEADER,
            HEADER + b",meta_b,meta_a",
            b"Batch ID,Authorizer ID",
            b"",
        ]
    ),
    st.sampled_from([b"\r\n", b"\n", b""]),
).map(b"".join)


def documented_header(body: bytes) -> bool:
    """Whether the body's first row is the documented header, as csv.reader reads it (the
    meta_ columns in any order: one in neither alphabetical order is only a WARNING)."""
    text = body.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    first = next(csv.reader(io.StringIO(text, newline="")), [])
    meta = first[len(EXPORT_COLUMNS) :]
    return (
        not any("\udc80" <= ch <= "\udcff" for name in first for ch in name)
        and tuple(first[: len(EXPORT_COLUMNS)]) == EXPORT_COLUMNS
        and all(name.startswith("meta_") for name in meta)
        and len(set(meta)) == len(meta)
    )


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.tuples(
        header_lines, st.binary(max_size=2000) | csvish | rows.map(lambda t: _csv_bytes(t))
    ).map(b"".join),
    st.lists(st.integers(0, 10**6), max_size=8),
    st.sampled_from(
        [
            "text/csv",
            "text/csv; charset=utf-8",
            "text/csv; charset=UTF-8",
            "text/csv; charset=iso-8859-1",
            "application/json",
            "text/html",
        ]
    ),
)
async def test_download_of_any_body_is_exact_or_a_typed_counted_error(
    export_server: tuple[str, Streamed],
    tmp_path: Path,
    body: bytes,
    cuts: list[int],
    content_type: str,
) -> None:
    url, streamed = export_server
    streamed.chunks = chunked(body, cuts)
    streamed.content_type = content_type
    streamed.requests = 0
    target = tmp_path / "out.csv"
    target.unlink(missing_ok=True)
    cfg = load_settings(
        None,
        env={
            "RFP_RIGHTFOOT__BASE_URL": url,
            "RIGHTFOOT_API_KEY": KEY,
            "RFP_RIGHTFOOT__MAX_ATTEMPTS": "2",
            "RFP_RIGHTFOOT__BACKOFF_BASE_S": "0.001",
            "RFP_RIGHTFOOT__BACKOFF_MAX_S": "0.002",
            "RFP_RIGHTFOOT__MAX_REQUESTS_PER_S": "10000",
        },
    ).rightfoot
    metrics = Metrics()
    client = RightfootClient(
        cfg, instance_id="fuzz", metrics=metrics, api_key=ApiKey(KEY), limiter=RateLimiter(1e4)
    )
    await client.start()
    try:
        result = await download_export(client, [BATCH], target)
    except ApiError as exc:
        # Typed and counted; nothing left behind, not even a temporary file.
        assert os.listdir(tmp_path) == []
        code = _counted(metrics)
        if isinstance(exc, ApiMalformedResponse):  # not retried: the same answer again
            assert streamed.requests == 1 and code == {"malformed": 1}
            assert (
                not content_type.startswith("text/csv")
                or "iso-8859-1" in content_type
                or not body
                or not documented_header(body)
            )
        else:
            assert isinstance(exc, ApiTransportError) and exc.code == "truncated"
            assert truncated_body(body)  # ends inside a quoted field, or its last row short
            assert streamed.requests == 2 and code == {"truncated": 2}
        assert KEY not in str(exc)
    else:
        assert content_type in ("text/csv", "text/csv; charset=utf-8", "text/csv; charset=UTF-8")
        assert documented_header(body)
        assert target.read_bytes() == body
        assert result.bytes == len(body)
        assert not truncated_body(body)
        assert result.rows == csv_reads(body)[0]
        assert _counted(metrics) == {"200": 1}
    finally:
        await client.close()


def _csv_bytes(table: list[list[str]]) -> bytes:
    out = io.StringIO(newline="")
    csv.writer(out, lineterminator="\r\n").writerows(table)
    return out.getvalue().encode()


def _counted(metrics: Metrics) -> dict[str, int]:
    """The export requests counted in rightfoot_poller_api_requests_total, by code."""
    out: dict[str, int] = {}
    for family in metrics.registry.collect():
        if family.name != "rightfoot_poller_api_requests":
            continue
        for sample in family.samples:
            total = sample.name.endswith("_total")
            if total and sample.labels["endpoint"] == "export" and sample.value:
                out[sample.labels["code"]] = int(sample.value)
    return out
