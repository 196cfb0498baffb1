"""The vendor endpoints: ``GET /v1/balances`` and ``GET /v1/balances/export``.

As the vendor pages describe them: Bearer authentication, ``limit`` validation, opaque
page tokens, the documented ApiErrorResponse bodies (and the proxies' HTML pages for 502
and 503), the CSV export streamed in chunks. Faults (:attr:`Simulator.faults`) are applied
before authentication; the page-request hook (:attr:`Simulator.on_page_request`) runs
after it, just before a page is served. The :func:`_request_log` middleware records every
request outside ``/_sim/`` in :attr:`Simulator.request_log`.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import inspect
import io
import math
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from email.utils import formatdate

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from rightfoot_simulator.batches import _Batch
from rightfoot_simulator.data import (
    EXPORT_COLUMNS,
    SimRecord,
    _decimal_text,
    _page_json,
    _record_json,
    _utc_now,
    export_status,
)
from rightfoot_simulator.faults import _malformed_page
from rightfoot_simulator.simulator import (
    PageRequest,
    PageRequestHook,
    RequestLogEntry,
    Simulator,
)

log = structlog.get_logger("rightfoot_simulator")

DOCS_URL = "https://api.rightfoot.com/docs"
MAX_LIMIT = 100
EXPORT_CHUNK_BYTES = 64 * 1024

_UUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_USER_AGENT_RE = re.compile(r"rightfoot-poller/\S+ \((?P<instance>[^)]*)\)")
_DIGITS_RE = re.compile(r"[0-9]{1,6}")

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


def _fault_response(status: int, retry_after_s: float, as_date: bool = False) -> web.Response:
    if status == 429:
        seconds = max(0, math.ceil(retry_after_s))
        when = formatdate(time.time() + seconds, usegmt=True) if as_date else str(seconds)
        return _error(429, "RATE_LIMITED", "Too many requests.", headers={"Retry-After": when})
    if status == 403:
        return _error(403, "FORBIDDEN", "This API key is not allowed to do this.")
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
    return _fault_response(status, sim.faults.retry_after_s, sim.faults.retry_after_date)


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
    batch, count = found
    token = request.query.get("nextPageToken")
    if token is not None and sim._take_next("ignore_token_next", batch_id):
        token = None  # read as if not sent: the first page, and a new token
    offset = None if token is None else _token_offset(sim, batch, token)
    if token is not None and offset is None:
        if sim.faults.reject_token_with_404:
            return _error(404, "NOT_FOUND", "The page token was not found.")
        if sim.faults.reject_token_with_500:
            return _error(500, "INTERNAL_SERVER_ERROR", "An unexpected error occurred.")
        return _error(400, "INVALID_PAGE_TOKEN", "The page token is invalid or has expired.")
    if offset is not None and batch.shape.gaps:
        offset, gap = batch.shape.from_token(offset)
        if gap:  # an empty page of the run after the page that ended at ``offset``
            nxt = gap + 1 if gap < batch.shape.gaps else 0
            value = batch.shape.token_value(offset, nxt)
            empty = _page_json(
                batch.batch_id,
                batch.reported_total(count),
                "[]",
                True,
                sim._tokens.issue(batch.batch_id, value, sim.clock()),
            )
            return web.Response(text=empty, content_type="application/json")
    sequence = sim._next_page_sequence(batch_id)
    if sim.on_page_request is not None:
        page_request = PageRequest(
            batch_id=batch_id,
            token=token,
            cursor=offset,
            offset=_listed_before(batch, offset),
            limit=limit,
            sequence=sequence,
            instance=_instance(request.headers.get("User-Agent", "")),
        )
        await _call_page_hook(request, sim.on_page_request, page_request)
        count = max(count, batch.visible_count(sim.clock()) or 0)  # records only appear
    return _page_response(sim, batch, count, offset, limit, token)


def _listed_before(batch: _Batch, cursor: int | None) -> int | None:
    """How many records are listed before the page at ``cursor``, if that is known."""
    if cursor is None:
        return 0
    return cursor if batch.shape.order == "completion" else None


async def _call_page_hook(
    request: web.Request, hook: PageRequestHook, page_request: PageRequest
) -> None:
    """Call :attr:`Simulator.on_page_request`; wait for what it returns, if awaitable.

    The wait ends early when the server shuts down (as :func:`_pause` does); a task made
    here for a coroutine is then cancelled, a future the hook handed over is left alone.
    """
    outcome = hook(page_request)
    if not inspect.isawaitable(outcome):
        return
    waiting = asyncio.ensure_future(outcome)
    closing = asyncio.ensure_future(request.app[_CLOSING_KEY].wait())
    try:
        await asyncio.wait((waiting, closing), return_when=asyncio.FIRST_COMPLETED)
    finally:
        closing.cancel()
        if waiting is not outcome and not waiting.done():
            waiting.cancel()
    if waiting.done() and not waiting.cancelled():
        waiting.result()  # the hook's exception, if any, answers 500


def _token_offset(sim: Simulator, batch: _Batch, token: str) -> int | None:
    if sim._take_token_reject(batch.batch_id):
        return None
    ttl_s = batch.shape.token_ttl_s
    return sim._tokens.offset_for(token, batch.batch_id, now=sim.clock(), ttl_s=ttl_s)


def _page_response(
    sim: Simulator,
    batch: _Batch,
    total: int,
    offset: int | None,
    limit: int,
    asked_with: str | None = None,
) -> web.Response:
    """One page of the ``total`` visible records, after the page token's ``offset``.

    ``asked_with``: the request's page token, which a looping page hands back as it is.
    """
    positions, cursor = batch.page(total, offset, limit)
    fraction = batch.shape.integers == "fraction"
    items = ",".join(_record_json(batch.record_at(i), i, fraction) for i in positions)
    if sim._take_token_loop(batch.batch_id):
        log.debug("simulator page token loop", batch_id=batch.batch_id, offset=offset)
        if asked_with is None:  # the first page: a token for it, the same one every time
            first = batch.shape.token_value(batch.first_cursor())
            asked_with = sim._tokens.issue(batch.batch_id, first)
        token: str | None = asked_with
    else:
        value = None if cursor is None else batch.shape.token_value(cursor, 1)
        token = None if value is None else sim._tokens.issue(batch.batch_id, value, sim.clock())
    # "absent": no has_more at all; the token alone says that a page follows
    has_more = None if batch.shape.has_more == "absent" else token is not None
    if batch.shape.has_more == "pending" and token is None and total < batch.count:
        has_more = True  # more will come, and there is nothing yet to ask for them with
    reported = batch.reported_total(total)
    kind = sim._take_malformed(batch.batch_id)
    if kind is None:
        omit_empty = batch.shape.has_more == "omit_empty"
        body = _page_json(
            batch.batch_id, reported, f"[{items}]", has_more, token, omit_empty, fraction
        )
    else:
        log.debug("simulator malformed page", batch_id=batch.batch_id, kind=kind)
        body = _malformed_page(kind, batch.batch_id, reported, items, token)
    response = web.Response(text=body, content_type="application/json")
    if sim.faults.compress_pages:
        response.enable_compression()
    return response


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


# --------------------------------------------------------------------------- request log


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
