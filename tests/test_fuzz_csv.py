"""Property tests of the CSV export's reader: whatever the API streams, rows are counted
exactly or the export fails with a typed, counted error, never anything else.

* ``CsvRowCounter`` against Python's ``csv`` module on any CSV that ``csv.writer`` can
  produce (quotes, commas, CR and LF inside fields, non-ASCII), cut into any chunks;
* ``CsvRowCounter`` on arbitrary bytes: never raises while fed, the same count
  however the bytes are chunked, and only the typed ``truncated`` error at the end;
* the whole download (``download_export``) against a server streaming arbitrary bytes
  with an arbitrary Content-Type: the file holds exactly what was sent, or nothing is
  left behind and the error is typed and counted in ``api_requests_total``.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.api import ApiKey, RightfootClient
from service.config import load_settings
from service.errors import ApiError, ApiMalformedResponse, ApiTransportError
from service.export import CsvRowCounter, download_export
from service.metrics import Metrics
from service.pacing import RateLimiter

FUZZ = settings(max_examples=150, deadline=None)
BATCH = "11111111-2222-4333-8444-555555555555"
KEY = "sk-fuzz-csv-0a1b2c3d4e5f"

fields = st.text(
    alphabet=st.sampled_from("ab ,\"\r\n;\t'é€😀\\") | st.characters(codec="utf-8"), max_size=12
)
rows = st.lists(st.lists(fields, min_size=1, max_size=5), min_size=0, max_size=12)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at the given offsets (taken modulo its length)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def count(chunks: list[bytes]) -> int:
    counter = CsvRowCounter()
    for chunk in chunks:
        counter.feed(chunk)
    return counter.finish()


@FUZZ
@given(rows, st.sampled_from(["\r\n", "\n"]), st.booleans(), st.lists(st.integers(0, 10**6)))
def test_counts_every_csv_the_csv_module_reads(
    table: list[list[str]], terminator: str, final_newline: bool, cuts: list[int]
) -> None:
    if terminator == "\n":
        # A row ends at LF. csv.writer leaves a CR unquoted when the line terminator is
        # LF alone, which RFC 4180 does not allow, and Python's reader then ends a row at
        # that bare CR: such bodies are not CSV the counter is meant to agree on.
        table = [[f.replace("\r", "") for f in row] for row in table]
    out = io.StringIO(newline="")
    csv.writer(out, lineterminator=terminator, quoting=csv.QUOTE_MINIMAL).writerows(table)
    text = out.getvalue()
    if not final_newline and text.endswith(terminator):
        text = text[: -len(terminator)]
    expected = max(0, len(list(csv.reader(io.StringIO(text, newline="")))) - 1)
    assert count(chunked(text.encode(), cuts)) == expected


@FUZZ
@given(st.binary(max_size=400), st.lists(st.integers(0, 10**6), max_size=20))
def test_arbitrary_bytes_never_crash_and_chunking_does_not_matter(
    body: bytes, cuts: list[int]
) -> None:
    whole = CsvRowCounter()
    whole.feed(body)
    counter = CsvRowCounter()
    previous = 0
    for chunk in chunked(body, cuts):
        counter.feed(chunk)  # never raises
        assert counter.rows >= previous  # progress never goes backwards
        previous = counter.rows
    assert counter.in_quotes == whole.in_quotes == (body.count(b'"') % 2 == 1)
    if counter.in_quotes:
        with pytest.raises(ApiTransportError) as caught:
            counter.finish()
        assert caught.value.code == "truncated"
    else:
        assert counter.finish() == whole.finish() >= 0


@FUZZ
@given(rows.filter(lambda t: len(t) > 1), st.data())
def test_a_body_cut_inside_a_quoted_field_is_truncated(
    table: list[list[str]], data: st.DataObject
) -> None:
    out = io.StringIO(newline="")
    csv.writer(out, lineterminator="\r\n", quoting=csv.QUOTE_ALL).writerows(table)
    body = out.getvalue().encode()
    # Cut just after an opening quote: the body ends inside a quoted field.
    opening = [i + 1 for i in range(len(body)) if body[: i + 1].count(b'"') % 2 == 1]
    cut = data.draw(st.sampled_from(opening))
    counter = CsvRowCounter()
    counter.feed(body[:cut])
    with pytest.raises(ApiTransportError, match="truncated"):
        counter.finish()


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


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.binary(max_size=2000) | rows.map(lambda t: _csv_bytes(t)),
    st.lists(st.integers(0, 10**6), max_size=8),
    st.sampled_from(["text/csv", "text/csv; charset=utf-8", "application/json", "text/html"]),
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
        if not content_type.startswith("text/csv"):
            assert isinstance(exc, ApiMalformedResponse)
            assert streamed.requests == 1 and code == {"malformed": 1}
        else:
            assert isinstance(exc, ApiTransportError) and exc.code == "truncated"
            assert body.count(b'"') % 2 == 1
            assert streamed.requests == 2 and code == {"truncated": 2}
        assert KEY not in str(exc)
    else:
        assert content_type.startswith("text/csv")
        assert target.read_bytes() == body
        assert result.bytes == len(body)
        assert result.rows == count([body])
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
