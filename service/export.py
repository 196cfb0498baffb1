"""The CSV export: ``rightfoot-poller export BATCH_ID… -o FILE``.

``GET <base_url><export_path>?batch_ids=<id>&batch_ids=<id>`` through the same
:class:`RightfootClient` the poller uses (its session, User-Agent, API key,
rate limiter, concurrency limit and metrics, endpoint label ``export``): a
download holds one of ``rightfoot.max_concurrent_requests`` slots while it runs.

* Every batch ID is checked to be a UUID before any request is made.
* The body is streamed to disk in 64 KiB chunks, never held in memory, into a
  temporary file in the target's directory (``.<name>.<random>.part``), which is
  fsynced and renamed over the target only once complete. On any failure
  (HTTP error, connection dropped mid-body, disk error, cancellation) the
  temporary file is removed and an existing target is left as it was.
* 5xx, 429, timeouts and connection errors are retried by the poller's own
  retry loop (service/retry.py), ``rightfoot.max_attempts`` attempts in all; a
  429 may ask for a wait up to ``rightfoot.backoff_max_s``. The CSV has no
  resume: a download that fails after its body started is restarted from
  scratch into a fresh temporary file (to stdout, only while nothing has been
  written yet).
* Timeouts are per read (``timeout_s`` between two reads, ``connect_timeout_s``
  to connect): an export may legitimately take far longer than one page.
* Rows are counted exactly: a newline inside a quoted field (RFC 4180) does not
  end a row, and the header row is not counted. A body that ends inside a
  quoted field is truncated, and treated like a connection dropped mid-body.

The outputs (file or stdout) are in service/export_output.py, the progress line
in service/export_progress.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import structlog

from service.api import ApiKey, RightfootClient, error_from_response
from service.config import Settings
from service.errors import (
    ApiError,
    ApiMalformedResponse,
    ApiTransportError,
    ExportUsageError,
    ExportWriteError,
    PollerError,
)
from service.export_output import Output, open_output
from service.export_progress import ProgressPrinter, progress_wanted
from service.logs import redact
from service.metrics import Metrics
from service.pacing import RateLimiter
from service.retry import RetryPolicy, retrying

log = structlog.get_logger(__name__)

ENDPOINT = "export"
CHUNK_BYTES = 64 * 1024
MAX_ERROR_BODY_BYTES = 64 * 1024
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_UUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)

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
    """The batch IDs, duplicates removed (first occurrence kept), each checked to be a UUID."""
    if not batch_ids:
        raise ExportUsageError("at least one batch ID is required")
    for batch_id in batch_ids:
        if not _UUID_RE.fullmatch(batch_id):
            raise ExportUsageError(
                f"not a valid batch ID: {batch_id!r} (expected a UUID such as "
                "5d3c6bbb-fc1a-46a4-93da-1ce4a54b0d83)"
            )
    return list(dict.fromkeys(batch_ids))


def output_path(value: str) -> Path | None:
    """The target file of ``-o``, checked to be writable; None for ``-`` (stdout)."""
    if value == "-":
        return None
    if not value:
        raise ExportUsageError("-o: the output file name is empty")
    target = Path(value)
    if target.is_dir():
        raise ExportUsageError(f"-o {value}: is a directory")
    parent = target.parent
    if not parent.is_dir():
        raise ExportUsageError(f"-o {value}: the directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportUsageError(f"-o {value}: cannot create files in {str(parent)!r}")
    return target


# --------------------------------------------------------------------------- row counting


class CsvRowCounter:
    """Counts the rows of a CSV byte stream, fed in chunks, excluding the header row.

    A row ends at a newline outside quotes. Inside a quoted field an escaped quote is
    written ``""``: two toggles, so tracking the parity of quote characters is exact.
    """

    def __init__(self) -> None:
        self.records = 0
        self.in_quotes = False
        self._open_record = False  # bytes seen after the last row end

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        if b'"' not in chunk:
            if not self.in_quotes:
                self.records += chunk.count(b"\n")
        else:
            for i, part in enumerate(chunk.split(b'"')):
                if i:
                    self.in_quotes = not self.in_quotes
                if not self.in_quotes:
                    self.records += part.count(b"\n")
        self._open_record = self.in_quotes or not chunk.endswith(b"\n")

    @property
    def rows(self) -> int:
        """Complete data rows so far."""
        return max(0, self.records - 1)

    def finish(self) -> int:
        """Data rows of the whole body, counting a last row without a final newline.

        Raises ApiTransportError if the body ends inside a quoted field (truncated).
        """
        if self.in_quotes:
            raise ApiTransportError(
                "the export ended inside a quoted field: the body is truncated",
                code="truncated",
            )
        return max(0, self.records + (1 if self._open_record else 0) - 1)


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
) -> ExportResult:
    """:func:`export_csv` without validating the batch IDs: the API judges them."""
    output = open_output(dest)
    # A 429 may ask for no longer a wait than the backoff's own cap.
    policy = RetryPolicy.from_config(client.cfg, max_retry_after_s=client.cfg.backoff_max_s)
    started = time.monotonic()

    def blocker() -> str | None:
        return None if output.restartable else "the output on stdout is incomplete"

    def on_retry(exc: ApiError, failures: int, delay: float) -> None:
        log.info("export_retry", error=str(exc), attempt=failures, delay_s=round(delay, 3))

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
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=cfg.connect_timeout_s, sock_read=cfg.timeout_s
    )
    headers: dict[str, str] = client.request_args()["headers"]
    request_started = time.perf_counter()
    code = "error"
    begun = False
    try:
        async with client.session.get(url, params=params, headers=headers, timeout=timeout) as resp:
            code = str(resp.status)
            if resp.status != 200:
                raise await _error_response(client, resp)
            content_type = resp.headers.get("Content-Type", "")
            if not content_type.lower().startswith("text/csv"):
                code = "malformed"
                raise ApiMalformedResponse(
                    f"the API answered 200 with Content-Type {content_type or 'none'!r}, "
                    "not text/csv",
                    status=resp.status,
                )
            output.begin()
            begun = True
            counter = CsvRowCounter()
            size = 0
            async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
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
                if begun
                else "the API did not answer in time"
            )
            raise ApiTransportError(what, code="timeout") from None
        if isinstance(exc, aiohttp.ClientError):
            code = "connection_error"
            raise ApiTransportError(_describe(exc, begun), code="connection_error") from None
        if isinstance(exc, ApiTransportError) and exc.code == "truncated":
            code = "truncated"
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
    """The typed error for a non-200 answer, its body read up to a bound."""
    body = bytearray()
    async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
        body += chunk[: MAX_ERROR_BODY_BYTES - len(body)]
        if len(body) >= MAX_ERROR_BODY_BYTES:
            break
    retry_after = client.retry_after(resp)
    if resp.status == 429:
        client.rate_limited(retry_after)
    return error_from_response(resp.status, bytes(body), retry_after)


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


async def export_main(settings: Settings, args: argparse.Namespace) -> int:
    """``rightfoot-poller export``: 0 when exported, 1 on API, network or disk errors,
    2 on bad arguments. One line on stderr either way (plus progress, when wanted)."""
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
    try:
        await client.start()
        result = await download_export(client, batch_ids, dest, progress=printer)
    except (ApiError, ExportWriteError) as exc:
        if printer is not None:
            printer.abort()
        print(
            f"rightfoot-poller: export failed: {redact(_describe_failure(exc), secrets)}", file=err
        )
        return EXIT_FAILED
    except asyncio.CancelledError:
        if printer is not None:
            printer.abort()
        left = "the output on stdout is incomplete" if dest is None else f"{dest} not written"
        print(f"rightfoot-poller: export interrupted; {left}", file=err)
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
