"""Tests of the CSV export (``service/export.py``), against the simulator over real HTTP.

Most tests run the simulator in-process (``TestServer`` on 127.0.0.1); connection drops
mid-body use a tiny raw TCP server; the command line, Ctrl-C and the memory test run
``python -m service`` in child processes, with the simulator in a process of its own
(the harness of ``bench/export_memory.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import errno
import gzip
import importlib.util
import io
import os
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer

from rightfoot_simulator import EXPORT_COLUMNS, SimRecord, Simulator, build_app, export_status
from service.api import ApiKey, RightfootClient
from service.config import Settings, load_settings
from service.errors import (
    ApiBadRequest,
    ApiError,
    ApiForbidden,
    ApiMalformedResponse,
    ApiTransportError,
    ApiUnauthorized,
    ExportUsageError,
    ExportWriteError,
)
from service.export import (
    DECODED_PIECE_BYTES,
    MAX_BATCH_IDS,
    BodyDecoder,
    CsvRowCounter,
    download_export,
    export_csv,
    export_main,
    validate_batch_ids,
)
from service.export_output import output_kind
from service.export_progress import ProgressPrinter, progress_wanted
from service.metrics import Metrics
from service.pacing import RateLimiter

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-export-test-7f3a9c2e41"
WRONG_KEY = "sk-wrong-export-key-5b1d08"
OTHER_KEY = "sk-other-requester-99d3e1"
BATCH = "11111111-2222-4333-8444-555555555555"
OTHER = "99999999-8888-4777-8666-555555555555"
MISSING = "00000000-0000-4000-8000-000000000404"
STAMP = "2024-08-09T18:10:44Z"
CSV_HEADER = b"Authorizer ID,Batch ID,Institution,Phone,Zip,Balance,Status,Creator,Timestamp\r\n"


def _load_bench() -> ModuleType:
    # As when the script runs: its own folder is on the path (for bench/harness.py).
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(
        "export_memory_bench", ROOT / "bench" / "export_memory.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


# --------------------------------------------------------------------------- fixtures


def make_settings(base_url: str, **overrides: str) -> Settings:
    env = {
        "RFP_RIGHTFOOT__BASE_URL": base_url,
        "RIGHTFOOT_API_KEY": KEY,
        "RFP_RIGHTFOOT__BACKOFF_BASE_S": "0.01",
        "RFP_RIGHTFOOT__BACKOFF_MAX_S": "0.05",
        "RFP_RIGHTFOOT__MAX_REQUESTS_PER_S": "1000",
        "RFP_INSTANCE_ID": "export-test",
        **overrides,
    }
    return load_settings(None, env=env)


def make_client(settings: Settings) -> RightfootClient:
    key = settings.rightfoot.api_key
    return RightfootClient(
        settings.rightfoot,
        instance_id=settings.instance_id,
        metrics=Metrics(),
        api_key=ApiKey(key.get_secret_value() if key else None),
        limiter=RateLimiter(settings.rightfoot.max_requests_per_s),
    )


@dataclass
class Api:
    sim: Simulator
    server: TestServer
    clients: list[RightfootClient] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def settings(self, **overrides: str) -> Settings:
        return make_settings(self.url, **overrides)

    async def client(self, **overrides: str) -> RightfootClient:
        client = make_client(self.settings(**overrides))
        await client.start()
        self.clients.append(client)
        return client

    def statuses(self) -> list[int]:
        return [entry.status for entry in self.sim.request_log]


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    sim = Simulator(api_keys=[KEY, OTHER_KEY], seed=11)
    server = TestServer(build_app(sim), host="127.0.0.1")
    await server.start_server()
    state = Api(sim, server)
    try:
        yield state
    finally:
        for client in state.clients:
            await client.close()
        await server.close()


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def expected_row(batch_id: str, r: SimRecord, meta_keys: list[str]) -> list[str]:
    return [
        r.authorizer_unique_id,
        batch_id,
        r.institution,
        r.phone,
        r.zip,
        "" if r.balance is None else str(r.balance),
        export_status(r.balance_status_code),
        r.creator,
        r.timestamp,
        *(r.metadata.get(k, "") for k in meta_keys),
    ]


def cli_args(batch_ids: list[str], output: Path | str, progress: str = "never") -> Any:
    return argparse.Namespace(batch_ids=batch_ids, output=str(output), progress=progress)


# --------------------------------------------------------------------------- content


async def test_export_matches_the_records_served(api: Api, tmp_path: Path) -> None:
    api.sim.generate_batch(BATCH, 700)
    client = await api.client()
    target = tmp_path / "balances.csv"

    result = await export_csv(client, [BATCH], target)

    served = api.sim.records_served(BATCH)
    rows = read_csv(target)
    assert rows[0] == list(EXPORT_COLUMNS)
    assert rows[1:] == [expected_row(BATCH, r, []) for r in served]
    assert result.rows == 700 == len(rows) - 1
    assert result.bytes == target.stat().st_size
    assert result.seconds > 0
    assert listing(tmp_path) == ["balances.csv"]
    # exact digits: negative, large and two-decimal balances survive as text
    balances = [Decimal(row[5]) for row in rows[1:] if row[5]]
    assert any(b < 0 for b in balances)
    assert any(b > 10**15 for b in balances)
    assert {row[5] for row in rows[1:] if row[5]} == {
        str(r.balance) for r in served if r.balance is not None
    }


async def test_request_carries_repeated_batch_ids_auth_and_user_agent(
    api: Api, tmp_path: Path
) -> None:
    api.sim.generate_batch(BATCH, 3)
    api.sim.generate_batch(OTHER, 2)
    client = await api.client()

    await export_csv(client, [BATCH, OTHER], tmp_path / "x.csv")

    (entry,) = api.sim.request_log
    assert entry.path == "/v1/balances/export"
    assert entry.query == f"batch_ids={BATCH}&batch_ids={OTHER}"
    assert entry.instance == "export-test"
    assert entry.status == 200
    assert client.metrics.api_requests.labels("export", "200")._value.get() == 1


async def test_several_batches_in_one_file_header_once(api: Api, tmp_path: Path) -> None:
    first = api.sim.generate_batch(BATCH, 40)
    second = api.sim.generate_batch(OTHER, 25)
    client = await api.client()
    target = tmp_path / "both.csv"

    result = await export_csv(client, [BATCH, OTHER, BATCH], target)  # duplicate sent once

    rows = read_csv(target)
    assert rows.count(list(EXPORT_COLUMNS)) == 1
    assert rows[1:] == [expected_row(BATCH, r, []) for r in first] + [
        expected_row(OTHER, r, []) for r in second
    ]
    assert result.rows == 65
    assert api.sim.request_log[0].query.count("batch_ids=") == 2


async def test_metadata_columns_sorted_and_quoted_values(api: Api, tmp_path: Path) -> None:
    api.sim.generate_batch(BATCH, 30, with_metadata=True)
    api.sim.generate_batch(OTHER, 5)  # no metadata: empty meta cells
    client = await api.client()
    target = tmp_path / "meta.csv"

    result = await export_csv(client, [BATCH, OTHER], target)

    rows = read_csv(target)
    meta_keys = ["customer_ref", "loan_officer", "region"]
    assert rows[0] == [*EXPORT_COLUMNS, *(f"meta_{k}" for k in meta_keys)]
    expected = [expected_row(BATCH, r, meta_keys) for r in api.sim.records_served(BATCH)]
    expected += [expected_row(OTHER, r, meta_keys) for r in api.sim.records_served(OTHER)]
    assert rows[1:] == expected
    assert any("," in row[-2] for row in rows[1:])  # "Officer 3, Branch 1" needed quoting
    assert result.rows == 35


async def test_rows_are_counted_exactly_with_quoted_newlines(api: Api, tmp_path: Path) -> None:
    records = [
        SimRecord(
            authorizer_unique_id=f"u{i}",
            balance=Decimal("1.50"),
            balance_status_code=0,
            timestamp="2024-08-09T18:10:44Z",
            visible_at=0,
            institution='First "Line"\nSecond line\r\nthird, with comma',
            creator="multi\n\nline",
            metadata={"note": 'a "quoted"\nnote'},
        )
        for i in range(50)
    ]
    api.sim.add_batch(BATCH, records)
    client = await api.client()
    target = tmp_path / "newlines.csv"

    result = await export_csv(client, [BATCH], target)

    rows = read_csv(target)
    assert len(rows) == 51
    assert rows[1][2] == 'First "Line"\nSecond line\r\nthird, with comma'
    assert result.rows == 50
    assert target.read_bytes().count(b"\n") > 200  # counting newlines would be wrong


# --------------------------------------------------------------------------- row counter


TRICKY = (
    b"Authorizer ID,Batch ID,Note\r\n"
    b'1,b,"multi\nline ""quoted"" text"\r\n'
    b"2,b,plain\r\n"
    b'3,b,"ends with newline\n"\r\n'
    b'4,b,""\r\n'
    b'5,b,"a,b"'
)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, len(TRICKY)])
def test_row_counter_is_exact_whatever_the_chunking(size: int) -> None:
    counter = CsvRowCounter()
    for i in range(0, len(TRICKY), size):
        counter.feed(TRICKY[i : i + size])
    expected = len(list(csv.reader(io.StringIO(TRICKY.decode(), newline="")))) - 1
    assert counter.finish() == expected == 5


def test_row_counter_partial_rows_and_edge_cases() -> None:
    counter = CsvRowCounter()
    counter.feed(b"h1,h2\r\n1,2\r\n3,")
    assert counter.rows == 1  # the open row is not complete yet
    assert counter.finish() == 2

    empty = CsvRowCounter()
    assert empty.finish() == 0
    header_only = CsvRowCounter()
    header_only.feed(b"h1,h2\r\n")
    assert header_only.finish() == 0


def test_row_counter_refuses_a_body_ending_inside_quotes() -> None:
    counter = CsvRowCounter()
    counter.feed(b'h\r\n"open quoted\nfield')
    with pytest.raises(ApiTransportError, match="truncated"):
        counter.finish()


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "bad",
    [
        "not-a-uuid",
        "",
        "11111111222243338444555555555555",  # no hyphens
        "{11111111-2222-4333-8444-555555555555}",
        " 11111111-2222-4333-8444-555555555555",
        "11111111-2222-4333-8444-55555555555g",
        "11111111-2222-4333-8444-555555555555&batch_ids=x",
    ],
)
async def test_invalid_batch_ids_rejected_before_any_request(
    api: Api, tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    api.sim.generate_batch(BATCH, 3)
    client = await api.client()
    with pytest.raises(ExportUsageError, match="not a valid batch ID") as info:
        await export_csv(client, [BATCH, bad], tmp_path / "x.csv")
    assert repr(bad) in str(info.value)

    code = await export_main(api.settings(), cli_args([BATCH, bad], tmp_path / "x.csv"))

    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and repr(bad) in err[0]
    assert api.sim.request_log == []
    assert listing(tmp_path) == []


def test_validate_batch_ids_keeps_order_and_drops_duplicates() -> None:
    lower = "abcdef01-2222-4333-8444-55555555555a"
    upper = lower.upper()  # sent as given: the API decides what case means
    assert validate_batch_ids([OTHER, lower, OTHER, upper]) == [OTHER, lower, upper]
    with pytest.raises(ExportUsageError):
        validate_batch_ids([])


def batch_ids(count: int) -> list[str]:
    return [str(uuid.UUID(int=0xABCDEF << 100 | i, version=4)) for i in range(count)]


async def test_as_many_batch_ids_as_allowed_fit_in_one_request(api: Api, tmp_path: Path) -> None:
    ids = batch_ids(MAX_BATCH_IDS)
    for batch_id in ids:
        api.sim.generate_batch(batch_id, 1)
    target = tmp_path / "x.csv"

    code = await export_main(api.settings(), cli_args([*ids, ids[0]], target))  # a duplicate

    assert code == 0
    assert len(read_csv(target)) == MAX_BATCH_IDS + 1
    assert api.statuses() == [200]


async def test_more_batch_ids_than_fit_in_a_request_are_refused_before_any(
    api: Api, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await export_main(
        api.settings(), cli_args(batch_ids(MAX_BATCH_IDS + 1), tmp_path / "x.csv")
    )
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"rightfoot-poller: too many batch IDs: {MAX_BATCH_IDS + 1}; at most {MAX_BATCH_IDS} "
        "fit in one export request (export them in several files)"
    )
    assert api.sim.request_log == []
    assert listing(tmp_path) == []


def test_the_batch_id_limit_keeps_the_request_line_under_8_kib() -> None:
    settings = make_settings("https://api.rightfoot.com")
    query = "&".join(f"batch_ids={batch_id}" for batch_id in batch_ids(MAX_BATCH_IDS))
    line = f"GET {settings.rightfoot.export_path}?{query} HTTP/1.1"
    assert len(line) + len(settings.rightfoot.base_url) + 1024 < 8192


@pytest.mark.parametrize("output", ["missing-dir/out.csv", "."])
async def test_unusable_output_path_is_a_usage_error(
    api: Api,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    output: str,
) -> None:
    api.sim.generate_batch(BATCH, 3)
    monkeypatch.chdir(tmp_path)
    code = await export_main(api.settings(), cli_args([BATCH], output))
    assert code == 2
    assert "-o" in capsys.readouterr().err
    assert api.sim.request_log == []
    assert listing(tmp_path) == []


async def test_missing_api_key_is_a_usage_error(
    api: Api, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = load_settings(None, env={"RFP_RIGHTFOOT__BASE_URL": api.url})
    code = await export_main(settings, cli_args([BATCH], tmp_path / "x.csv"))
    assert code == 2
    assert "RIGHTFOOT_API_KEY" in capsys.readouterr().err
    assert api.sim.request_log == []


# --------------------------------------------------------------------------- API errors


@dataclass
class ErrorCase:
    name: str
    setup: Callable[[Simulator], object]
    overrides: dict[str, str]
    message: str
    attempts: int


ERROR_CASES = [
    ErrorCase(
        "401",
        lambda sim: None,
        {"RIGHTFOOT_API_KEY": WRONG_KEY},
        "export failed: HTTP 401 UNAUTHORIZED: Invalid API key provided.",
        1,
    ),
    ErrorCase(
        "403",
        lambda sim: sim.generate_batch(OTHER, 5, owner_key=OTHER_KEY),
        {},
        "export failed: HTTP 403 FORBIDDEN: One or more requested batches don't belong to "
        "the authenticated requester.",
        1,
    ),
    ErrorCase(
        "403-unknown-batch",
        lambda sim: sim.generate_batch(BATCH, 5),
        {},
        "export failed: HTTP 403 FORBIDDEN: One or more requested batches",
        1,
    ),
    ErrorCase(
        "500",
        lambda sim: setattr(sim.faults, "error_5xx_next", 100),
        {"RFP_RIGHTFOOT__MAX_ATTEMPTS": "4"},
        "export failed: HTTP 500 INTERNAL_SERVER_ERROR: An unexpected error occurred. "
        "(gave up after 4 attempts)",
        4,
    ),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
async def test_api_errors_exit_1_with_the_api_message_and_leave_nothing(
    api: Api,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: ErrorCase,
    existing: bool,
) -> None:
    case.setup(api.sim)
    if case.name == "403":
        api.sim.generate_batch(BATCH, 5)
        batch_ids = [BATCH, OTHER]  # one of ours, one of another requester
    elif case.name == "403-unknown-batch":
        batch_ids = [BATCH, MISSING]
    else:
        api.sim.generate_batch(BATCH, 5)
        batch_ids = [BATCH]
    target = tmp_path / "out.csv"
    if existing:
        target.write_bytes(b"previous export\n")
        target.chmod(0o640)

    code = await export_main(api.settings(**case.overrides), cli_args(batch_ids, target))

    assert code == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert case.message in lines[0]
    assert KEY not in err and WRONG_KEY not in err
    assert len(api.sim.request_log) == case.attempts
    if existing:
        assert listing(tmp_path) == ["out.csv"]
        assert target.read_bytes() == b"previous export\n"
        assert stat.S_IMODE(target.stat().st_mode) == 0o640
    else:
        assert listing(tmp_path) == []


async def test_typed_errors_from_the_lower_level_function(api: Api, tmp_path: Path) -> None:
    api.sim.generate_batch(BATCH, 5)
    api.sim.generate_batch(OTHER, 5, owner_key=OTHER_KEY)
    client = await api.client()
    target = tmp_path / "out.csv"

    # 400 from the API itself: download_export does not validate, the simulator does
    with pytest.raises(ApiBadRequest) as bad:
        await download_export(client, ["not-a-uuid"], target)
    assert str(bad.value) == "HTTP 400 BAD_REQUEST: Not a valid UUID: 'not-a-uuid'."
    with pytest.raises(ApiForbidden):
        await download_export(client, [OTHER], target)
    wrong = await api.client(RIGHTFOOT_API_KEY=WRONG_KEY)
    with pytest.raises(ApiUnauthorized) as unauthorized:
        await download_export(wrong, [BATCH], target)
    assert WRONG_KEY not in str(unauthorized.value)
    assert listing(tmp_path) == []
    assert api.statuses() == [400, 403, 401]
    assert client.metrics.api_requests.labels("export", "400")._value.get() == 1


async def test_400_is_reported_with_the_api_message(
    api: Api, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """export_main validates first; skip that once to see how a 400 from the API reads."""
    monkeypatch.setattr("service.export.validate_batch_ids", list)
    code = await export_main(api.settings(), cli_args(["not-a-uuid"], tmp_path / "x.csv"))
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "rightfoot-poller: export failed: HTTP 400 BAD_REQUEST: Not a valid UUID: 'not-a-uuid'."
    )
    assert listing(tmp_path) == []


async def test_a_secret_echoed_by_the_api_is_redacted_from_the_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def echo(request: web.Request) -> web.Response:
        message = f"refused {request.headers['Authorization']}"
        return web.json_response({"error": {"code": "BAD_REQUEST", "message": message}}, status=400)

    app = web.Application()
    app.router.add_get("/v1/balances/export", echo)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        settings = make_settings(str(server.make_url("")).rstrip("/"))
        code = await export_main(settings, cli_args([BATCH], tmp_path / "x.csv"))
    finally:
        await server.close()
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err == "rightfoot-poller: export failed: HTTP 400 BAD_REQUEST: refused Bearer [redacted]"


async def test_the_apis_error_text_is_one_line_without_the_key_from_the_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The error itself (download_export's) carries neither the echoed key nor the
    message's newlines; the command's error line is one line."""

    async def echo(request: web.Request) -> web.Response:
        message = f"refused\n{request.headers['Authorization']}\r\nforged line"
        return web.json_response({"error": {"code": "FORBIDDEN", "message": message}}, status=403)

    app = web.Application()
    app.router.add_get("/v1/balances/export", echo)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        settings = make_settings(str(server.make_url("")).rstrip("/"))
        client = make_client(settings)
        await client.start()
        try:
            with pytest.raises(ApiForbidden) as info:
                await download_export(client, [BATCH], tmp_path / "x.csv")
        finally:
            await client.close()
        code = await export_main(settings, cli_args([BATCH], tmp_path / "x.csv"))
    finally:
        await server.close()
    assert str(info.value) == "HTTP 403 FORBIDDEN: refused Bearer [redacted] forged line"
    assert code == 1
    assert capsys.readouterr().err == (
        "rightfoot-poller: export failed: HTTP 403 FORBIDDEN: refused Bearer [redacted] "
        "forged line\n"
    )


async def test_the_error_line_is_one_line_whatever_the_error_says(
    api: Api,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A path with a newline in it, say, in a write error."""

    async def fails(*_args: Any, **_kwargs: Any) -> Any:
        raise ExportWriteError(f"cannot write {tmp_path}/a\nb.csv: No space left on device")

    monkeypatch.setattr("service.export.download_export", fails)
    code = await export_main(api.settings(), cli_args([BATCH], tmp_path / "x.csv"))
    assert code == 1
    assert capsys.readouterr().err == (
        f"rightfoot-poller: export failed: cannot write {tmp_path}/a b.csv: "
        "No space left on device\n"
    )


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_is_not_followed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], status: int
) -> None:
    followed: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        location = f"http://{request.host}/elsewhere?token=abc#part"
        return web.Response(status=status, headers={"Location": location})

    async def elsewhere(request: web.Request) -> web.Response:
        followed.append(request.path)
        return web.Response(body=CSV_BODY, content_type="text/csv")

    app = web.Application()
    app.router.add_get("/v1/balances/export", redirect)
    app.router.add_get("/elsewhere", elsewhere)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        url = str(server.make_url("")).rstrip("/")
        code = await export_main(make_settings(url), cli_args([BATCH], tmp_path / "x.csv"))
    finally:
        await server.close()
    assert code == 1
    assert followed == []
    assert capsys.readouterr().err.strip() == (
        f"rightfoot-poller: export failed: HTTP {status}: the API redirected to "
        f"{url}/elsewhere; redirects are not followed (check rightfoot.base_url and "
        "rightfoot.export_path)"
    )
    assert listing(tmp_path) == []


@pytest.mark.parametrize(
    ("location", "shown"),
    [
        ("https://user:pw@api.example/v2/export?token=abc", "to https://api.example/v2/export"),
        ("/v2/export?batch_ids=x", "to /v2/export"),
        ("", "without a Location"),
    ],
)
async def test_a_redirect_names_where_it_pointed_without_credentials_or_query(
    tmp_path: Path, location: str, shown: str
) -> None:
    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": location} if location else {})

    app = web.Application()
    app.router.add_get("/v1/balances/export", redirect)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    client = make_client(make_settings(str(server.make_url("")).rstrip("/")))
    await client.start()
    try:
        with pytest.raises(ApiError) as info:
            await export_csv(client, [BATCH], tmp_path / "x.csv")
    finally:
        await client.close()
        await server.close()
    assert f"the API redirected {shown};" in str(info.value)
    assert "pw" not in str(info.value) and "token" not in str(info.value)
    assert client.metrics.api_requests.labels("export", "302")._value.get() == 1


# --------------------------------------------------------------------------- retries


async def test_5xx_before_the_body_is_retried(api: Api, tmp_path: Path) -> None:
    api.sim.generate_batch(BATCH, 10)
    api.sim.faults.error_5xx_next = 2
    client = await api.client()
    result = await export_csv(client, [BATCH], tmp_path / "x.csv")
    assert result.rows == 10
    assert api.statuses() == [500, 502, 200]
    assert listing(tmp_path) == ["x.csv"]


async def test_429_waits_retry_after_then_succeeds(api: Api, tmp_path: Path) -> None:
    api.sim.generate_batch(BATCH, 10)
    api.sim.faults.rate_limit_next = 1
    api.sim.faults.retry_after_s = 0
    client = await api.client()
    result = await export_csv(client, [BATCH], tmp_path / "x.csv")
    assert result.rows == 10
    assert api.statuses() == [429, 200]


class FakeSleep:
    """An injected sleep (the client's and its limiter's): notes the waits, returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def sleepless_client(settings: Settings, sleep: FakeSleep) -> RightfootClient:
    return RightfootClient(
        settings.rightfoot,
        instance_id=settings.instance_id,
        metrics=Metrics(),
        api_key=ApiKey(KEY),
        limiter=RateLimiter(settings.rightfoot.max_requests_per_s, sleep=sleep),
        sleep=sleep,
    )


async def test_a_429_longer_than_the_backoff_cap_is_waited_in_full_with_a_note(
    api: Api, tmp_path: Path
) -> None:
    """backoff_max_s is 0.05 here: a Retry-After of 10 minutes is still waited (up to
    rightfoot.export_max_wait_s, an hour), and the wait is told with when it ends."""
    api.sim.generate_batch(BATCH, 10)
    api.sim.faults.rate_limit_next = 1
    api.sim.faults.retry_after_s = 600
    sleep = FakeSleep()
    client = sleepless_client(api.settings(), sleep)
    await client.start()
    notes: list[str] = []
    try:
        result = await download_export(client, [BATCH], tmp_path / "x.csv", notify=notes.append)
    finally:
        await client.close()
    assert result.rows == 10
    assert api.statuses() == [429, 200]
    assert 600.0 in sleep.delays
    (note,) = notes
    assert note.startswith("waiting 600 s (Retry-After), until ")
    assert note.endswith(", before attempt 2 of 4: HTTP 429 RATE_LIMITED: Too many requests.")


async def test_a_429_beyond_export_max_wait_s_fails_at_once_saying_why(
    api: Api, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api.sim.generate_batch(BATCH, 10)
    api.sim.faults.rate_limit_next = 1
    api.sim.faults.retry_after_s = 5
    settings = api.settings(RFP_RIGHTFOOT__EXPORT_MAX_WAIT_S="2")

    code = await export_main(settings, cli_args([BATCH], tmp_path / "x.csv"))

    assert code == 1
    assert capsys.readouterr().err.strip() == (
        "rightfoot-poller: export failed: HTTP 429 RATE_LIMITED: Too many requests. "
        "(Retry-After of 5 s is too long: over rightfoot.export_max_wait_s, 2 s)"
    )
    assert api.statuses() == [429]
    assert listing(tmp_path) == []


async def test_the_command_tells_a_long_wait_on_stderr(
    api: Api, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("service.export.NOTE_WAIT_S", 0.5)
    api.sim.generate_batch(BATCH, 10)
    api.sim.faults.rate_limit_next = 1
    api.sim.faults.retry_after_s = 1

    code = await export_main(api.settings(), cli_args([BATCH], tmp_path / "x.csv"))

    assert code == 0
    note, done = capsys.readouterr().err.strip().splitlines()
    assert note.startswith("rightfoot-poller: waiting 1 s (Retry-After), until ")
    assert note.endswith("before attempt 2 of 4: HTTP 429 RATE_LIMITED: Too many requests.")
    assert done.startswith("exported 10 rows")


@dataclass
class Unavailable:
    """An export that answers 503 with each Retry-After queued (``""``: none), then a CSV."""

    queue: list[str]
    statuses: list[int] = field(default_factory=list)

    async def export(self, request: web.Request) -> web.Response:
        if self.queue:
            self.statuses.append(503)
            value = self.queue.pop(0)
            headers = {"Retry-After": value} if value else {}
            return web.Response(status=503, text="<html>maintenance</html>", headers=headers)
        self.statuses.append(200)
        return web.Response(body=CSV_HEADER + ROW + b"\r\n", content_type="text/csv")


@pytest.fixture
async def unavailable() -> AsyncIterator[tuple[Unavailable, str]]:
    api = Unavailable([])
    app = web.Application()
    app.router.add_get("/v1/balances/export", api.export)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield api, str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


async def test_a_503s_retry_after_is_waited_too(
    unavailable: tuple[Unavailable, str], tmp_path: Path
) -> None:
    api, url = unavailable
    api.queue.extend(["120", "", "0"])
    sleep = FakeSleep()
    client = sleepless_client(make_settings(url), sleep)
    await client.start()
    notes: list[str] = []
    try:
        result = await download_export(client, [BATCH], tmp_path / "x.csv", notify=notes.append)
    finally:
        await client.close()
    assert result.rows == 1
    assert api.statuses == [503, 503, 503, 200]
    assert sleep.delays[0] == 120.0 and max(sleep.delays[1:]) <= 0.05  # then the backoff
    (note,) = notes
    assert note.startswith("waiting 120 s (Retry-After), until ")
    assert note.endswith("before attempt 2 of 4: HTTP 503: the API answered 503")


async def test_a_503s_retry_after_beyond_export_max_wait_s_fails_saying_why(
    unavailable: tuple[Unavailable, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api, url = unavailable
    api.queue.append("7200")
    settings = make_settings(url)  # export_max_wait_s: an hour

    code = await export_main(settings, cli_args([BATCH], tmp_path / "x.csv"))

    assert code == 1
    assert capsys.readouterr().err.strip() == (
        "rightfoot-poller: export failed: HTTP 503: the API answered 503 "
        "(Retry-After of 7200 s is too long: over rightfoot.export_max_wait_s, 3600 s)"
    )
    assert api.statuses == [503]


async def test_an_answer_slower_than_export_timeout_s_times_out_and_is_retried(
    api: Api, tmp_path: Path
) -> None:
    api.sim.generate_batch(BATCH, 10)
    api.sim.faults.hang_next = 1
    api.sim.faults.hang_s = 5
    client = await api.client(RFP_RIGHTFOOT__EXPORT_TIMEOUT_S="0.3")
    result = await export_csv(client, [BATCH], tmp_path / "x.csv")
    assert result.rows == 10
    assert client.metrics.api_requests.labels("export", "timeout")._value.get() == 1


async def test_an_answer_slower_than_timeout_s_is_waited_for(api: Api, tmp_path: Path) -> None:
    """A vendor that builds the CSV before it answers: the answer may take up to
    rightfoot.export_timeout_s to begin, however short timeout_s (a page's) is."""
    api.sim.generate_batch(BATCH, 10)
    api.sim.faults.hang_next = 1
    api.sim.faults.hang_s = 1.0
    client = await api.client(RFP_RIGHTFOOT__TIMEOUT_S="0.2", RFP_RIGHTFOOT__MAX_ATTEMPTS="1")
    result = await export_csv(client, [BATCH], tmp_path / "x.csv")
    assert result.rows == 10
    assert api.statuses() == [200]
    assert client.metrics.api_requests.labels("export", "timeout")._value.get() == 0


async def test_a_body_stalled_longer_than_timeout_s_times_out_and_is_retried(
    tmp_path: Path,
) -> None:
    """Once the answer has begun, timeout_s between two reads (export_timeout_s is only
    for its beginning)."""
    served: list[str] = []

    async def export(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/csv; charset=utf-8"})
        await resp.prepare(request)
        await resp.write(CSV_HEADER)
        if not served:
            served.append("stalled")
            await asyncio.sleep(3)
        else:
            served.append("whole")
        await resp.write(ROW + b"\r\n")
        return resp

    app = web.Application()
    app.router.add_get("/v1/balances/export", export)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    client = make_client(make_settings(url, RFP_RIGHTFOOT__TIMEOUT_S="0.3"))
    await client.start()
    try:
        started = time.monotonic()
        result = await export_csv(client, [BATCH], tmp_path / "x.csv")
        took = time.monotonic() - started
    finally:
        await client.close()
        await server.close()
    assert result.rows == 1
    assert served == ["stalled", "whole"]
    assert took < 2.5
    assert client.metrics.api_requests.labels("export", "timeout")._value.get() == 1


async def test_connection_refused_is_retried_then_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = make_settings(f"http://127.0.0.1:{port}", RFP_RIGHTFOOT__MAX_ATTEMPTS="2")
    code = await export_main(settings, cli_args([BATCH], tmp_path / "x.csv"))
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("rightfoot-poller: export failed: cannot reach the API (")
    assert err.endswith("(gave up after 2 attempts)")
    assert KEY not in err
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------- shared limits


class CountingApi:
    """A tiny API that holds each request a moment and notes how many it serves at once."""

    def __init__(self, hold_s: float = 0.2) -> None:
        self.hold_s = hold_s
        self.in_flight = 0
        self.peak = 0
        self.paths: list[str] = []
        self.app = web.Application()
        self.app.router.add_get("/v1/balances", self.page)
        self.app.router.add_get("/v1/balances/export", self.export)

    def _enter(self, request: web.Request) -> None:
        self.paths.append(request.path)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)

    async def page(self, request: web.Request) -> web.Response:
        self._enter(request)
        try:
            await asyncio.sleep(self.hold_s)
            return web.json_response({"batch_id": BATCH, "balances": [], "has_more": False})
        finally:
            self.in_flight -= 1

    async def export(self, request: web.Request) -> web.StreamResponse:
        self._enter(request)
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/csv; charset=utf-8"})
            await resp.prepare(request)
            await resp.write(CSV_HEADER)
            await asyncio.sleep(self.hold_s)
            await resp.write(f"1000001,{BATCH},Bank,,12345,1.00,SUCCESS,,{STAMP}\r\n".encode())
            return resp
        finally:
            self.in_flight -= 1


@pytest.fixture
async def counting_api() -> AsyncIterator[tuple[CountingApi, str]]:
    api = CountingApi()
    server = TestServer(api.app, host="127.0.0.1")
    await server.start_server()
    try:
        yield api, str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@pytest.mark.parametrize("limit", [1, 2])
async def test_the_export_takes_the_clients_concurrency_limit(
    counting_api: tuple[CountingApi, str], tmp_path: Path, limit: int
) -> None:
    """A page fetch and an export at once: never more requests in flight than the limit
    (with a limit of 2 the server does see both at once, so the check can fail)."""
    api, url = counting_api
    client = make_client(make_settings(url, RFP_RIGHTFOOT__MAX_CONCURRENT_REQUESTS=str(limit)))
    await client.start()
    try:
        page, result = await asyncio.gather(
            client.fetch_page(BATCH, None), export_csv(client, [BATCH], tmp_path / "x.csv")
        )
    finally:
        await client.close()
    assert page.records == [] and result.rows == 1
    assert sorted(api.paths) == ["/v1/balances", "/v1/balances/export"]
    assert api.peak == limit


async def test_the_export_waits_its_turn_at_the_clients_rate_ceiling(
    counting_api: tuple[CountingApi, str], tmp_path: Path
) -> None:
    api, url = counting_api
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    settings = make_settings(url)
    client = RightfootClient(
        settings.rightfoot,
        instance_id=settings.instance_id,
        metrics=Metrics(),
        api_key=ApiKey(KEY),
        limiter=RateLimiter(2.0, clock=lambda: 100.0, sleep=sleep),  # one request per 0.5 s
    )
    await client.start()
    try:
        await client.fetch_page(BATCH, None)
        assert waits == []
        await export_csv(client, [BATCH], tmp_path / "x.csv")
    finally:
        await client.close()
    assert waits == [0.5]
    assert api.paths == ["/v1/balances", "/v1/balances/export"]


# --------------------------------------------------------------------------- broken bodies

CSV_BODY = (
    CSV_HEADER
    + "".join(
        f'{1000000 + i},{BATCH},"Bank ""{i}"", N.A.",,12345,{i}.25,SUCCESS,,{STAMP}\r\n'
        for i in range(2000)
    ).encode()
)


# Cut in the middle of a row, outside any quotes: "...,Bank ""1000"", N.A.",,12345,1000.25"
CUT_MID_ROW = CSV_BODY.index(b",SUCCESS,", len(CSV_BODY) // 2)


def _gzip_cut_mid_row(body: bytes) -> bytes:
    """The gzip of ``body`` cut off where what it decompresses to ends in the middle of a
    row, outside quotes, a few rows short of the end (the CSV tells, and the gzip stream
    without its end: BodyDecoder)."""
    packed = gzip.compress(body)
    for cut in range(len(packed) // 2, len(packed)):
        prefix = zlib.decompressobj(wbits=31).decompress(packed[:cut])
        last = prefix[prefix.rfind(b"\n") + 1 :]
        if len(prefix) > len(body) // 2 and last.count(b'"') % 2 == 0 and last.count(b",") > 5:
            return packed[:cut]
    raise AssertionError("no cut found")


def _compressed_cut_on_a_row(body: bytes, wbits: int) -> bytes:
    """``body`` compressed (gzip for ``wbits`` 31, zlib 15, raw deflate -15) as a server
    streaming it does, flushed after each row, and cut off after the flush of a row some
    rows short of the end: what it decompresses to is whole rows, and only the compressed
    stream (no end, no gzip trailer) tells."""
    packer = zlib.compressobj(wbits=wbits)
    rows = body.splitlines(keepends=True)
    packed = b"".join(packer.compress(row) + packer.flush(zlib.Z_SYNC_FLUSH) for row in rows[:-3])
    assert zlib.decompressobj(wbits=wbits).decompress(packed) == b"".join(rows[:-3])
    return packed


def _compressed(body: bytes, wbits: int) -> bytes:
    packer = zlib.compressobj(wbits=wbits)
    return packer.compress(body) + packer.flush()


# Content-Encoding and body, by kind: whole, or cut on a row boundary.
COMPRESSED: dict[str, tuple[bytes, Callable[[bytes], bytes]]] = {
    "gzip": (b"gzip", lambda b: _compressed(b, 31)),
    "gzip-two-members": (b"gzip", lambda b: gzip.compress(b[:999]) + gzip.compress(b[999:])),
    "deflate": (b"deflate", lambda b: _compressed(b, 15)),
    "deflate-raw": (b"deflate", lambda b: _compressed(b, -15)),
    "cut-row-gzip": (b"gzip", lambda b: _compressed_cut_on_a_row(b, 31)),
    "cut-row-gzip-length": (b"gzip", lambda b: _compressed_cut_on_a_row(b, 31)),
    "cut-row-deflate": (b"deflate", lambda b: _compressed_cut_on_a_row(b, 15)),
    "cut-row-deflate-raw": (b"deflate", lambda b: _compressed_cut_on_a_row(b, -15)),
    "corrupt-gzip": (b"gzip", lambda b: _compressed(b, 31)[:-8] + b"\0\0\0\0\0\0\0\0"),
    "brotli": (b"br", lambda b: b"\x1b\x00\x00"),
}


@dataclass
class RawServer:
    """An HTTP/1.1 server written by hand, to break responses in ways aiohttp won't."""

    behaviours: list[str]
    body: bytes = CSV_BODY
    content_type: bytes = b"text/csv; charset=utf-8"
    connections: int = 0
    port: int = 0
    server: asyncio.Server | None = None
    requests: list[bytes] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            kind = self.behaviours[min(self.connections, len(self.behaviours) - 1)]
            self.connections += 1
            self.requests.append(request)
            writer.write(self._response(kind))
            await writer.drain()
        finally:
            writer.close()

    def _response(self, kind: str) -> bytes:
        body, half = self.body, self.body[: len(self.body) // 2]
        csv_type = b"Content-Type: " + self.content_type + b"\r\n"
        head = b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
        if kind == "full":
            return head + csv_type + b"Content-Length: %d\r\n\r\n" % len(body) + body
        if kind == "drop-content-length":
            return head + csv_type + b"Content-Length: %d\r\n\r\n" % len(body) + half
        if kind == "drop-chunked":
            chunk = b"%x\r\n" % len(body)
            return head + csv_type + b"Transfer-Encoding: chunked\r\n\r\n" + chunk + half
        if kind == "drop-inside-quotes":  # no length, no chunks: only the CSV can tell
            cut = body.index(b'"Bank ""1000""') + 8
            return head + csv_type + b"\r\n" + body[:cut]
        # The body ends in the middle of a row, outside quotes, and the HTTP framing cannot
        # tell: no length and no chunks, a length that matches, a chunked body ended with its
        # last chunk, a gzip stream cut off. Only the row's fields can.
        short = body[:CUT_MID_ROW]
        if kind == "cut-mid-row":
            return head + csv_type + b"\r\n" + short
        if kind == "cut-mid-row-length":
            return head + csv_type + b"Content-Length: %d\r\n\r\n" % len(short) + short
        if kind == "cut-mid-row-chunked":
            chunks = b"%x\r\n%s\r\n0\r\n\r\n" % (len(short), short)
            return head + csv_type + b"Transfer-Encoding: chunked\r\n\r\n" + chunks
        if kind == "cut-mid-row-gzip":
            gzip_type = b"Content-Encoding: gzip\r\n"
            return head + csv_type + gzip_type + b"\r\n" + _gzip_cut_mid_row(body)
        if kind in COMPRESSED:
            coding, pack = COMPRESSED[kind]
            packed = pack(body)
            coded = b"Content-Encoding: " + coding + b"\r\n"
            # A length that matches what was sent, or no length (the connection's close).
            length = b"Content-Length: %d\r\n" % len(packed) if "length" in kind else b""
            return head + csv_type + coded + length + b"\r\n" + packed
        if kind == "json":
            return head + b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        raise AssertionError(kind)


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[..., Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def start(*behaviours: str) -> RawServer:
        server = RawServer(list(behaviours))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


CUTS_MID_ROW = ["cut-mid-row", "cut-mid-row-length", "cut-mid-row-chunked", "cut-mid-row-gzip"]
# A compressed body cut off where its text ends on a row boundary: only the stream tells.
CUTS_ON_A_ROW = ["cut-row-gzip", "cut-row-gzip-length", "cut-row-deflate", "cut-row-deflate-raw"]
DROPS = [
    "drop-content-length",
    "drop-chunked",
    "drop-inside-quotes",
    *CUTS_MID_ROW,
    *CUTS_ON_A_ROW,
    "corrupt-gzip",
]


@pytest.mark.parametrize("drop", DROPS)
async def test_a_drop_mid_body_is_restarted_from_scratch(
    raw_server: Callable[..., Awaitable[RawServer]], tmp_path: Path, drop: str
) -> None:
    server = await raw_server(drop, "full")
    client = make_client(make_settings(server.url))
    await client.start()
    try:
        result = await export_csv(client, [BATCH], tmp_path / "x.csv")
    finally:
        await client.close()
    assert server.connections == 2
    assert (tmp_path / "x.csv").read_bytes() == CSV_BODY
    assert result.rows == 2000
    assert listing(tmp_path) == ["x.csv"]


@pytest.mark.parametrize("drop", DROPS)
@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
async def test_drops_until_attempts_run_out_leave_nothing(
    raw_server: Callable[..., Awaitable[RawServer]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    drop: str,
    existing: bool,
) -> None:
    server = await raw_server(drop)
    target = tmp_path / "x.csv"
    if existing:
        target.write_bytes(b"keep me\n")
    settings = make_settings(server.url, RFP_RIGHTFOOT__MAX_ATTEMPTS="3")

    code = await export_main(settings, cli_args([BATCH], target))

    assert code == 1
    assert server.connections == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("rightfoot-poller: export failed: ")
    assert "gave up after 3 attempts" in err
    assert listing(tmp_path) == (["x.csv"] if existing else [])
    if existing:
        assert target.read_bytes() == b"keep me\n"


async def test_a_quote_inside_an_unquoted_field_is_no_truncation(
    raw_server: Callable[..., Awaitable[RawServer]], tmp_path: Path
) -> None:
    # One quote in the last row, in an unquoted field, as csv.reader reads it: the body
    # holds an odd number of quotes, none of them left open.
    server = await raw_server("full")
    server.body = CSV_BODY + f'1258580,{BATCH},Bank 5" Branch,,12345,,NO_MATCH,,{STAMP}'.encode()
    client = make_client(make_settings(server.url))
    await client.start()
    try:
        result = await export_csv(client, [BATCH], tmp_path / "x.csv")
    finally:
        await client.close()
    assert server.connections == 1
    assert (tmp_path / "x.csv").read_bytes() == server.body
    assert result.rows == 2001
    assert listing(tmp_path) == ["x.csv"]


async def test_a_row_cut_short_is_named_in_the_error_and_counted(
    raw_server: Callable[..., Awaitable[RawServer]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = await raw_server("cut-mid-row-chunked")
    settings = make_settings(server.url, RFP_RIGHTFOOT__MAX_ATTEMPTS="2")
    client = make_client(settings)
    await client.start()
    try:
        with pytest.raises(ApiTransportError) as info:
            await export_csv(client, [BATCH], tmp_path / "x.csv")
    finally:
        await client.close()
    assert info.value.code == "truncated"
    assert str(info.value) == (
        "truncated: the export's last row has 6 of the header's 9 fields and no line ending: "
        "the body is truncated (gave up after 2 attempts)"
    )
    assert client.metrics.api_requests.labels("export", "truncated")._value.get() == 2
    assert listing(tmp_path) == []


@pytest.mark.parametrize("cut", CUTS_ON_A_ROW)
async def test_a_compressed_body_cut_on_a_row_boundary_is_truncated(
    raw_server: Callable[..., Awaitable[RawServer]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    cut: str,
) -> None:
    """Whole rows decompressed, but the stream has no end (gzip: no trailer): aiohttp says
    nothing of a gzip stream cut short; the export does, exit 1, no file."""
    server = await raw_server(cut)
    target = tmp_path / "x.csv"
    settings = make_settings(server.url, RFP_RIGHTFOOT__MAX_ATTEMPTS="2")

    code = await export_main(settings, cli_args([BATCH], target))

    assert code == 1
    coding = "gzip" if "gzip" in cut else "deflate"
    assert capsys.readouterr().err.strip() == (
        f"rightfoot-poller: export failed: the export's {coding} stream stopped short of its "
        "end: the body is truncated (gave up after 2 attempts)"
    )
    assert server.connections == 2
    assert listing(tmp_path) == []


@pytest.mark.parametrize("kind", ["gzip", "gzip-two-members", "deflate", "deflate-raw"])
async def test_a_compressed_body_is_decompressed_and_asked_for(
    raw_server: Callable[..., Awaitable[RawServer]], tmp_path: Path, kind: str
) -> None:
    server = await raw_server(kind)
    client = make_client(make_settings(server.url))
    await client.start()
    try:
        result = await export_csv(client, [BATCH], tmp_path / "x.csv")
    finally:
        await client.close()
    assert (tmp_path / "x.csv").read_bytes() == CSV_BODY
    assert result.rows == 2000 and result.bytes == len(CSV_BODY)
    assert b"\r\naccept-encoding: gzip, deflate\r\n" in server.requests[0].lower()


async def test_a_corrupt_gzip_body_is_retried_and_counted(
    raw_server: Callable[..., Awaitable[RawServer]], tmp_path: Path
) -> None:
    server = await raw_server("corrupt-gzip", "full")
    client = make_client(make_settings(server.url))
    await client.start()
    try:
        result = await export_csv(client, [BATCH], tmp_path / "x.csv")
    finally:
        await client.close()
    assert result.rows == 2000 and server.connections == 2
    assert client.metrics.api_requests.labels("export", "corrupt")._value.get() == 1


async def test_a_coding_not_asked_for_is_refused_without_retry(
    raw_server: Callable[..., Awaitable[RawServer]], tmp_path: Path
) -> None:
    server = await raw_server("brotli")
    client = make_client(make_settings(server.url))
    await client.start()
    try:
        with pytest.raises(ApiMalformedResponse, match="Content-Encoding 'br'"):
            await export_csv(client, [BATCH], tmp_path / "x.csv")
    finally:
        await client.close()
    assert server.connections == 1
    assert listing(tmp_path) == []


@pytest.mark.parametrize("wbits", [31, 15, -15], ids=["gzip", "zlib", "raw"])
@pytest.mark.parametrize("size", [1, 2, 7, 4096])
def test_body_decoder_whatever_the_chunking_and_every_cut(wbits: int, size: int) -> None:
    packed = _compressed(CSV_BODY[:5000], wbits)
    decoder = BodyDecoder("gzip" if wbits == 31 else "deflate")
    out = b"".join(
        piece for k in range(0, len(packed), size) for piece in decoder.feed(packed[k : k + size])
    )
    decoder.finish()
    assert out == CSV_BODY[:5000]
    for cut in range(0, len(packed), 7 if size == 1 else 97):
        short = BodyDecoder("gzip" if wbits == 31 else "deflate")
        for _ in short.feed(packed[:cut]):
            pass
        with pytest.raises(ApiTransportError, match="stopped short of its end") as info:
            short.finish()
        assert info.value.code == "truncated"


def test_body_decoder_hands_a_bomb_on_in_bounded_pieces() -> None:
    packed = gzip.compress(b"\0" * (20 * 1024 * 1024))
    decoder = BodyDecoder("x-gzip")
    sizes = [len(piece) for piece in decoder.feed(packed)]
    decoder.finish()
    assert sum(sizes) == 20 * 1024 * 1024
    assert max(sizes) <= DECODED_PIECE_BYTES


@pytest.mark.parametrize("fields", [9, 10])
async def test_a_last_row_without_line_ending_but_all_its_fields_is_complete(
    raw_server: Callable[..., Awaitable[RawServer]], tmp_path: Path, fields: int
) -> None:
    """The vendor's page does not promise a line ending after the last row."""
    server = await raw_server("full")
    server.body = CSV_BODY.removesuffix(b"\r\n") + b",extra" * (fields - 9)
    client = make_client(make_settings(server.url))
    await client.start()
    try:
        result = await export_csv(client, [BATCH], tmp_path / "x.csv")
    finally:
        await client.close()
    assert server.connections == 1
    assert (tmp_path / "x.csv").read_bytes() == server.body
    assert result.rows == 2000


HEADER_NAMES = CSV_HEADER.rstrip()
ROW = f"1,{BATCH},Bank,,12345,1.00,SUCCESS,,{STAMP}".encode()


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        pytest.param(b"", b"text/csv", "an empty body, not the CSV export", id="empty"),
        pytest.param(
            b"<html><body>Internal error</body></html>",
            b"text/csv",
            "column 1 is '<html><body>Internal error</body></html>', not 'Authorizer ID'",
            id="html",
        ),
        pytest.param(
            b"Batch ID,Authorizer ID,Institution,Phone,Zip,Balance,Status,Creator,Timestamp\r\n",
            b"text/csv",
            "column 1 is 'Batch ID', not 'Authorizer ID'",
            id="reordered",
        ),
        pytest.param(
            HEADER_NAMES.removesuffix(b",Timestamp") + b"\r\n",
            b"text/csv",
            "it has 8 of the 9 fixed columns: 'Timestamp' is missing",
            id="missing",
        ),
        pytest.param(
            HEADER_NAMES + b",Balance\r\n",
            b"text/csv",
            "column 10 is 'Balance': only meta_<key> columns may follow",
            id="repeated-fixed-column",
        ),
        pytest.param(
            HEADER_NAMES + b",meta_a,meta_a\r\n",
            b"text/csv",
            "column 11 repeats 'meta_a'",
            id="repeated-meta-column",
        ),
        pytest.param(
            HEADER_NAMES + b",meta_caf\xe9\r\n",
            b"text/csv",
            "the export's header is not UTF-8",
            id="header-not-utf-8",
        ),
        pytest.param(
            HEADER_NAMES + b",meta_" + b"x" * 70_000 + b"\r\n",
            b"text/csv",
            "the export's header line is longer than 64 KiB",
            id="header-too-long",
        ),
        pytest.param(
            CSV_HEADER + "1,b,Café Bank,,,1.00,SUCCESS,,t\r\n".encode("latin-1"),
            b"text/csv; charset=iso-8859-1",
            "Content-Type 'text/csv; charset=iso-8859-1': the export is UTF-8",
            id="latin-1",
        ),
    ],
)
async def test_an_answer_not_shaped_as_documented_is_refused_without_retry(
    raw_server: Callable[..., Awaitable[RawServer]],
    tmp_path: Path,
    body: bytes,
    content_type: bytes,
    message: str,
) -> None:
    server = await raw_server("full")
    rows = ROW + b"\r\n" if body.endswith(b"\n") else b""  # a data row after a header line
    server.body, server.content_type = body + rows, content_type
    client = make_client(make_settings(server.url))
    await client.start()
    try:
        with pytest.raises(ApiMalformedResponse) as info:
            await export_csv(client, [BATCH], tmp_path / "x.csv")
    finally:
        await client.close()
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert server.connections == 1
    assert client.metrics.api_requests.labels("export", "malformed")._value.get() == 1
    assert listing(tmp_path) == []


async def test_a_refused_answer_is_one_line_exit_1_and_keeps_the_old_file(
    raw_server: Callable[..., Awaitable[RawServer]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = await raw_server("full")
    server.body = b"<html><body>Internal error</body></html>\n"
    target = tmp_path / "x.csv"
    target.write_bytes(b"old\n")

    code = await export_main(make_settings(server.url), cli_args([BATCH], target))

    assert code == 1
    assert capsys.readouterr().err.strip() == (
        "rightfoot-poller: export failed: HTTP 200: the export's header is not the documented "
        "one: column 1 is '<html><body>Internal error</body></html>', not 'Authorizer ID'"
    )
    assert listing(tmp_path) == ["x.csv"]
    assert target.read_bytes() == b"old\n"


@pytest.mark.parametrize(
    ("header", "content_type"),
    [
        pytest.param(CSV_HEADER, b"text/csv", id="no-charset"),
        pytest.param(CSV_HEADER, b"text/csv; charset=UTF-8", id="charset-upper-case"),
        pytest.param(b"\xef\xbb\xbf" + CSV_HEADER, b"text/csv", id="byte-order-mark"),
        pytest.param(HEADER_NAMES + b",meta_a,meta_b\n", b"text/csv", id="meta"),
        pytest.param(
            HEADER_NAMES + b",meta_customer,meta_Region\r\n",
            b"text/csv",
            id="meta-alphabetical-ignoring-case",
        ),
        pytest.param(HEADER_NAMES, b"text/csv", id="header-alone-no-line-ending"),
    ],
)
async def test_documented_shapes_are_accepted(
    raw_server: Callable[..., Awaitable[RawServer]],
    tmp_path: Path,
    header: bytes,
    content_type: bytes,
) -> None:
    server = await raw_server("full")
    rows = 0 if header == HEADER_NAMES else 2
    server.body = header + (ROW + b",x,y\r\n") * rows
    server.content_type = content_type
    client = make_client(make_settings(server.url))
    await client.start()
    try:
        result = await export_csv(client, [BATCH], tmp_path / "x.csv")
    finally:
        await client.close()
    assert result.rows == rows
    assert (tmp_path / "x.csv").read_bytes() == server.body


@pytest.mark.parametrize(
    ("keys", "after"),
    [
        pytest.param(["école", "zone"], "école", id="accent-first-as-localeCompare"),
        pytest.param(["loanid", "loan_officer"], "loanid", id="punctuation-ignored-as-glibc"),
        pytest.param(["ref_2", "ref1"], "ref_2", id="digits-as-glibc"),
        pytest.param(["b", "a"], "b", id="no-collation-at-all"),
    ],
)
async def test_meta_columns_in_another_order_are_kept_with_a_warning(
    raw_server: Callable[..., Awaitable[RawServer]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    keys: list[str],
    after: str,
) -> None:
    """The page says "alphabetically", not by which collation: the export goes on, the
    bytes as sent, and one WARNING says where the order is neither by code point nor
    ignoring case."""
    server = await raw_server("full")
    header = HEADER_NAMES + "".join(f",meta_{k}" for k in keys).encode() + b"\r\n"
    server.body = header + (ROW + b",x,y\r\n") * 3
    target = tmp_path / "x.csv"

    with structlog.testing.capture_logs() as logs:
        code = await export_main(make_settings(server.url), cli_args([BATCH], target))

    assert code == 0, capsys.readouterr().err
    assert target.read_bytes() == server.body
    warnings = [e for e in logs if e["event"] == "export_meta_columns_unordered"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
    assert f"comes after 'meta_{after}'" in warnings[0]["detail"]


async def test_meta_columns_in_either_alphabetical_order_log_nothing(
    raw_server: Callable[..., Awaitable[RawServer]], tmp_path: Path
) -> None:
    server = await raw_server("full")
    server.body = HEADER_NAMES + b",meta_Zone,meta_a,meta_b\r\n" + ROW + b",x,y,z\r\n"
    client = make_client(make_settings(server.url))
    await client.start()
    try:
        with structlog.testing.capture_logs() as logs:
            result = await export_csv(client, [BATCH], tmp_path / "x.csv")
    finally:
        await client.close()
    assert result.rows == 1
    assert [e for e in logs if e["event"] == "export_meta_columns_unordered"] == []


async def test_a_body_that_is_not_csv_fails_without_retry(
    raw_server: Callable[..., Awaitable[RawServer]], tmp_path: Path
) -> None:
    server = await raw_server("json")
    client = make_client(make_settings(server.url))
    await client.start()
    try:
        with pytest.raises(ApiMalformedResponse, match=r"application/json.*not text/csv"):
            await export_csv(client, [BATCH], tmp_path / "x.csv")
    finally:
        await client.close()
    assert server.connections == 1
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------- disk and cancel


async def test_a_disk_error_leaves_nothing_and_keeps_the_old_file(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    api.sim.generate_batch(BATCH, 100)
    target = tmp_path / "x.csv"
    target.write_bytes(b"old\n")

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("service.export_output.os.fsync", full_disk)
    code = await export_main(api.settings(), cli_args([BATCH], target))

    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err == f"rightfoot-poller: export failed: cannot write {target}: No space left on device"
    assert listing(tmp_path) == ["x.csv"]
    assert target.read_bytes() == b"old\n"
    assert len(api.sim.request_log) == 1  # not retried


async def test_cancellation_mid_body_leaves_nothing(api: Api, tmp_path: Path) -> None:
    api.sim.generate_batch(BATCH, 5000)
    client = await api.client()
    target = tmp_path / "x.csv"
    target.write_bytes(b"old\n")
    seen: list[int] = []

    def progress(rows: int, size: int, elapsed: float) -> None:
        seen.append(size)
        parts = [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")]
        assert parts and parts[0].startswith(".x.csv.")  # a temp file beside the target
        if len(seen) == 2:
            task.cancel()

    task = asyncio.create_task(export_csv(client, [BATCH], target, progress=progress))
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(seen) == 2
    assert listing(tmp_path) == ["x.csv"]
    assert target.read_bytes() == b"old\n"


async def test_new_file_gets_the_usual_mode_and_replaces_the_old_one(
    api: Api, tmp_path: Path
) -> None:
    api.sim.generate_batch(BATCH, 5)
    client = await api.client()
    fresh = tmp_path / "fresh.csv"
    await export_csv(client, [BATCH], fresh)
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask

    old = tmp_path / "old.csv"
    old.write_bytes(b"old\n")
    old.chmod(0o600)
    await export_csv(client, [BATCH], old)
    assert old.read_bytes() == fresh.read_bytes()
    assert stat.S_IMODE(old.stat().st_mode) == 0o600


# --------------------------------------------------------------------------- -o targets


@pytest.mark.parametrize("existing", [True, False], ids=["existing", "dangling"])
async def test_a_symlink_target_replaces_the_file_it_points_to(
    api: Api, tmp_path: Path, existing: bool
) -> None:
    api.sim.generate_batch(BATCH, 5)
    client = await api.client()
    expected = tmp_path / "expected.csv"
    await export_csv(client, [BATCH], expected)
    (tmp_path / "real").mkdir()
    (tmp_path / "out").mkdir()
    real = tmp_path / "real" / "x.csv"
    if existing:
        real.write_bytes(b"old\n")
        real.chmod(0o600)
    link = tmp_path / "out" / "link.csv"
    link.symlink_to("../real/x.csv")

    code = await export_main(api.settings(), cli_args([BATCH], link))

    assert code == 0
    assert link.is_symlink() and os.readlink(link) == "../real/x.csv"
    assert real.read_bytes() == expected.read_bytes()
    if existing:
        assert stat.S_IMODE(real.stat().st_mode) == 0o600
    assert listing(tmp_path / "out") == ["link.csv"]
    assert listing(tmp_path / "real") == ["x.csv"]


def _read_fifo(path: Path, into: bytearray, *, limit: int | None = None) -> threading.Thread:
    """A reader of the FIFO ``path`` in a thread, opened a moment later (the export waits
    for it): all of it into ``into``, or ``limit`` bytes and then closed."""

    def read() -> None:
        time.sleep(0.3)
        with path.open("rb") as f:
            if limit is not None:
                into.extend(f.read(limit))
                return
            while chunk := f.read(65536):
                into.extend(chunk)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


async def test_a_fifo_target_is_written_to_as_it_is(api: Api, tmp_path: Path) -> None:
    api.sim.generate_batch(BATCH, 2000)
    client = await api.client()
    expected = tmp_path / "expected.csv"
    await export_csv(client, [BATCH], expected)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = bytearray()
    reader = _read_fifo(fifo, got)

    result = await export_csv(client, [BATCH], fifo)

    await asyncio.to_thread(reader.join, 10)
    assert bytes(got) == expected.read_bytes()
    assert result.rows == 2000
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert listing(tmp_path) == ["expected.csv", "fifo"]


async def test_a_fifo_whose_reader_leaves_fails_without_restarting(
    api: Api, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api.sim.generate_batch(BATCH, 5000)  # far more than a pipe holds
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = bytearray()
    reader = _read_fifo(fifo, got, limit=100)

    code = await export_main(api.settings(), cli_args([BATCH], fifo))

    await asyncio.to_thread(reader.join, 10)
    assert code == 1
    assert capsys.readouterr().err.strip() == (
        f"rightfoot-poller: export failed: cannot write {fifo}: Broken pipe"
    )
    assert api.statuses() == [200]
    assert listing(tmp_path) == ["fifo"]


def test_what_each_kind_of_target_is_written_as(tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(b"x")
    (tmp_path / "link").symlink_to("plain")
    (tmp_path / "null").symlink_to("/dev/null")
    os.mkfifo(tmp_path / "fifo")
    assert output_kind(tmp_path / "plain") == ("file", tmp_path / "plain")
    assert output_kind(tmp_path / "new") == ("file", tmp_path / "new")
    assert output_kind(tmp_path / "link") == ("file", tmp_path / "plain")
    assert output_kind(Path("/dev/null")) == ("direct", Path("/dev/null"))
    assert output_kind(tmp_path / "null") == ("direct", tmp_path / "null")
    assert output_kind(tmp_path / "fifo") == ("direct", tmp_path / "fifo")
    read, write = os.pipe()
    try:  # an open file of this process, through /proc: never renamed over
        assert output_kind(Path(f"/dev/fd/{write}"))[0] == "direct"
    finally:
        os.close(read)
        os.close(write)


async def test_a_link_to_a_device_writes_to_the_device(api: Api, tmp_path: Path) -> None:
    api.sim.generate_batch(BATCH, 5)
    link = tmp_path / "null"
    link.symlink_to("/dev/null")
    code = await export_main(api.settings(), cli_args([BATCH], link))
    assert code == 0
    assert link.is_symlink() and os.readlink(link) == "/dev/null"
    assert listing(tmp_path) == ["null"]


# --------------------------------------------------------------------------- stdout


class FakeStdout:
    """sys.stdout stand-in: text (logs, if any) stays apart from the bytes of ``buffer``."""

    def __init__(self) -> None:
        self.text = io.StringIO()
        self.buffer = io.BytesIO()

    def write(self, text: str) -> int:
        return self.text.write(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


async def test_export_to_stdout(api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api.sim.generate_batch(BATCH, 300, with_metadata=True)
    client = await api.client()
    await export_csv(client, [BATCH], tmp_path / "file.csv")
    fake = FakeStdout()
    monkeypatch.setattr(sys, "stdout", fake)

    result = await export_csv(client, [BATCH], None)

    assert fake.buffer.getvalue() == (tmp_path / "file.csv").read_bytes()
    assert result.rows == 300
    assert listing(tmp_path) == ["file.csv"]


async def test_stdout_is_not_restarted_once_written(
    raw_server: Callable[..., Awaitable[RawServer]], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await raw_server("drop-chunked", "full")
    fake = FakeStdout()
    monkeypatch.setattr(sys, "stdout", fake)
    client = make_client(make_settings(server.url))
    await client.start()
    try:
        with pytest.raises(ApiTransportError, match="stdout is incomplete"):
            await export_csv(client, [BATCH], None)
    finally:
        await client.close()
    assert server.connections == 1
    assert 0 < len(fake.buffer.getvalue()) < len(CSV_BODY)


async def test_stdout_is_retried_before_anything_is_written(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    api.sim.generate_batch(BATCH, 10)
    api.sim.faults.error_5xx_next = 1
    fake = FakeStdout()
    monkeypatch.setattr(sys, "stdout", fake)
    client = await api.client()
    result = await export_csv(client, [BATCH], None)
    assert result.rows == 10
    assert fake.buffer.getvalue().count(b"\r\n") == 11


# --------------------------------------------------------------------------- progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_on_a_terminal_redraws_in_place_and_throttles() -> None:
    out, clock = io.StringIO(), FakeClock()
    printer = ProgressPrinter(out, tty=True, clock=clock)
    printer(10, 1000, 0.1)  # too early: small exports show nothing
    assert out.getvalue() == ""
    for step in range(40):  # 40 chunks within 0.4 s: at most 2 redraws
        clock.now = 0.6 + step * 0.01
        printer(1000 + step, 100_000, clock.now)
    assert out.getvalue().count("\r") == 2
    assert "\n" not in out.getvalue()
    printer.finish(_result(5000, 3 * 1024 * 1024, 2.0))
    text = out.getvalue()
    assert text.endswith("\n")
    last = text.rsplit("\r", 1)[1]
    assert last.startswith("5,000 rows  3.0 MiB  2.0 s  2,500 rows/s  1.5 MiB/s")


def test_progress_not_shown_for_a_quick_export_and_newline_on_error() -> None:
    out = io.StringIO()
    printer = ProgressPrinter(out, tty=True, clock=FakeClock())
    printer(10, 100, 0.01)
    printer.finish(_result(10, 100, 0.02))
    assert out.getvalue() == ""

    clock = FakeClock()
    printer = ProgressPrinter(out, tty=True, clock=clock)
    clock.now = 1.0
    printer(10, 100, 1.0)
    printer.abort()
    assert out.getvalue().endswith("\n")


def test_progress_off_a_terminal_prints_whole_lines() -> None:
    out, clock = io.StringIO(), FakeClock()
    printer = ProgressPrinter(out, tty=False, clock=clock)
    for step in range(30):
        clock.now = 1 + step * 0.1
        printer(step, step * 10, clock.now)
    assert "\r" not in out.getvalue()
    assert 2 <= out.getvalue().count("\n") <= 4


@pytest.mark.parametrize(
    ("mode", "to_stdout", "tty", "wanted"),
    [
        ("auto", False, True, True),
        ("auto", False, False, False),
        ("always", False, False, True),
        ("never", False, True, False),
        ("auto", True, True, True),
        ("always", True, False, False),  # never mixed into piped output
        ("never", True, True, False),
    ],
)
def test_progress_wanted(mode: str, to_stdout: bool, tty: bool, wanted: bool) -> None:
    assert progress_wanted(mode, to_stdout=to_stdout, stderr_is_tty=tty) is wanted


def _result(rows: int, size: int, seconds: float) -> Any:
    from service.export import ExportResult

    return ExportResult(rows=rows, bytes=size, seconds=seconds)


# --------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def sim_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    log = tmp_path_factory.mktemp("sim") / "simulator.log"
    with bench.simulator(KEY, log=log) as sim:
        yield sim


def test_cli_end_to_end(sim_process: Any, tmp_path: Path) -> None:
    batch = sim_process.create_batch(1234, with_metadata=True)
    target = tmp_path / "out.csv"

    run = bench.run_export(sim_process.base_url, [batch], str(target), api_key=KEY)

    assert run.exit_code == 0, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1  # stderr is not a terminal: no progress with --progress auto
    assert lines[0].startswith(f"exported 1234 rows ({target.stat().st_size} bytes) to {target}")
    assert len(read_csv(target)) == 1235
    assert listing(tmp_path) == ["out.csv"]


def test_cli_to_stdout_never_mixes_progress_into_it(sim_process: Any, tmp_path: Path) -> None:
    batch = sim_process.create_batch(500)
    out = tmp_path / "stdout.csv"
    run = bench.run_export(
        sim_process.base_url,
        [batch],
        "-",
        api_key=KEY,
        extra_args=["--progress", "always"],
        stdout=out,
    )
    assert run.exit_code == 0, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"exported 500 rows ({out.stat().st_size} bytes) to stdout in {run.seconds:.2f} s"
    ]
    assert len(read_csv(out)) == 501


@pytest.mark.parametrize("via_link", [False, True], ids=["dev-stdout", "link-to-fd-1"])
def test_cli_to_dev_stdout_writes_to_stdout(
    sim_process: Any, tmp_path: Path, via_link: bool
) -> None:
    """``-o /dev/stdout`` is stdout, as ``-o -``: written to, never renamed over (a link in
    tmp_path to /proc/self/fd/1 stands for /dev/stdout in the check, so that a regression
    could not replace the system's /dev/stdout)."""
    batch = sim_process.create_batch(300)
    out = tmp_path / "stdout.csv"
    target = "/dev/stdout"
    if via_link:
        (tmp_path / "link").symlink_to("/proc/self/fd/1")
        target = str(tmp_path / "link")
    else:  # never run a build that would rename over the system's /dev/stdout
        assert output_kind(Path(target))[0] != "file"
    run = bench.run_export(sim_process.base_url, [batch], target, api_key=KEY, stdout=out)
    assert run.exit_code == 0, run.stderr
    assert run.stderr.strip().startswith(f"exported 300 rows ({out.stat().st_size} bytes) to ")
    assert len(read_csv(out)) == 301
    if via_link:
        assert (tmp_path / "link").is_symlink()
        assert listing(tmp_path) == ["link", "stdout.csv"]


def test_cli_progress_always_for_a_file_off_a_terminal(sim_process: Any, tmp_path: Path) -> None:
    batch = sim_process.create_batch(20)
    sim_process.control("/_sim/faults", {"latency_s": 0.8, "only_batch": batch})
    try:
        run = bench.run_export(
            sim_process.base_url,
            [batch],
            str(tmp_path / "x.csv"),
            api_key=KEY,
            extra_args=["--progress", "always"],
        )
    finally:
        sim_process.control("/_sim/faults", {"latency_s": 0, "only_batch": None})
    assert run.exit_code == 0, run.stderr
    lines = run.stderr.strip().splitlines()
    assert "\r" not in run.stderr  # not a terminal: whole lines
    assert lines[-2].startswith("20 rows  ") and "rows/s" in lines[-2]
    assert lines[-1].startswith("exported 20 rows")


@pytest.mark.parametrize(
    ("batch_ids", "key", "exit_code", "message"),
    [
        (["nope"], KEY, 2, "rightfoot-poller: not a valid batch ID: 'nope'"),
        ([MISSING], KEY, 1, "rightfoot-poller: export failed: HTTP 403 FORBIDDEN: "),
        ([MISSING], WRONG_KEY, 1, "rightfoot-poller: export failed: HTTP 401 UNAUTHORIZED: "),
    ],
)
def test_cli_failures(
    sim_process: Any,
    tmp_path: Path,
    batch_ids: list[str],
    key: str,
    exit_code: int,
    message: str,
) -> None:
    run = bench.run_export(sim_process.base_url, batch_ids, str(tmp_path / "x.csv"), api_key=key)
    assert run.exit_code == exit_code
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), run.stderr
    assert KEY not in run.stderr and WRONG_KEY not in run.stderr
    assert listing(tmp_path) == []


class _SlowCsvHandler(socketserver.BaseRequestHandler):
    """Sends a CSV body a little at a time, forever, until the client goes away."""

    def handle(self) -> None:
        self.request.recv(65536)
        self.request.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/csv\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n" % (len(CSV_HEADER), CSV_HEADER)
        )
        row = b"1234567," + BATCH.encode() + b",Bank,,12345,1.00,SUCCESS,,2024-08-09T18:10:44Z\r\n"
        try:
            while True:
                payload = row * 100
                self.request.sendall(b"%x\r\n%s\r\n" % (len(payload), payload))
                time.sleep(0.05)
        except OSError:
            return


@pytest.mark.parametrize(
    ("signum", "exit_code"),
    [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
    ids=["ctrl-c", "sigterm"],
)
def test_interrupted_mid_download_leaves_nothing(
    tmp_path: Path, signum: signal.Signals, exit_code: int
) -> None:
    """Ctrl-C, or SIGTERM (a Kubernetes Job, docker stop, timeout(1)), mid-download."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _SlowCsvHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    target = tmp_path / "x.csv"
    target.write_bytes(b"old\n")
    env = bench.clean_env(
        RFP_RIGHTFOOT__BASE_URL=f"http://127.0.0.1:{server.server_address[1]}",
        RIGHTFOOT_API_KEY=KEY,
    )
    # A terminal's Ctrl-C reaches a process whose SIGINT is at its default. A test run
    # started as a background job inherits SIGINT ignored, and an ignored SIGINT stays
    # ignored across exec (Python then installs no KeyboardInterrupt handler at all).
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "export", BATCH, "-o", str(target)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 30
        while not any(p.name.endswith(".part") for p in tmp_path.iterdir()):
            assert time.monotonic() < deadline, "the download never started"
            assert process.poll() is None
            time.sleep(0.02)
        process.send_signal(signum)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:  # failed: leave no process (nor its pipe) behind
            process.kill()
            process.communicate()
        server.shutdown()
        server.server_close()
    assert process.returncode == exit_code
    assert err.decode().splitlines() == [
        f"rightfoot-poller: export interrupted; {target} not written"
    ]
    assert listing(tmp_path) == ["x.csv"]
    assert target.read_bytes() == b"old\n"


def test_ctrl_c_while_the_command_loads_exits_130_without_a_traceback() -> None:
    """The command's imports take most of a second; a Ctrl-C then is no crash either."""
    script = Path(sys.executable).parent / "rightfoot-poller"
    # -X importtime writes a line per import as it ends: the signal lands mid-import.
    process = subprocess.Popen(
        [sys.executable, "-X", "importtime", str(script), "--help"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert process.stderr is not None
        seen = []
        for line in process.stderr:
            seen.append(line)
            if b"pydantic" in line:  # loaded by the command's configuration, mid-way
                process.send_signal(signal.SIGINT)
                break
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert any(b"pydantic" in line for line in seen)
    assert b"Traceback" not in err, err.decode()[-2000:]
    assert process.returncode == 130


# --------------------------------------------------------------------------- memory


def test_memory_stays_flat_for_a_250k_row_export(sim_process: Any, tmp_path: Path) -> None:
    """Peak RSS of the export process: 250,000 rows against 1,000 rows (about 250x the bytes)."""
    small = sim_process.create_batch(1_000)
    large = sim_process.create_batch(250_000)

    low = bench.run_export(sim_process.base_url, [small], str(tmp_path / "small.csv"), api_key=KEY)
    high = bench.run_export(sim_process.base_url, [large], str(tmp_path / "large.csv"), api_key=KEY)

    assert low.exit_code == 0 and high.exit_code == 0, (low.stderr, high.stderr)
    assert (low.rows, high.rows) == (1_000, 250_000)
    assert high.bytes > 100 * low.bytes
    assert (tmp_path / "large.csv").stat().st_size == high.bytes
    mib = 1024 * 1024
    assert high.peak_rss_bytes < 150 * mib, high.peak_rss_bytes / mib
    assert high.peak_rss_bytes - low.peak_rss_bytes < 30 * mib, (
        low.peak_rss_bytes / mib,
        high.peak_rss_bytes / mib,
    )
