"""The unauthenticated control API under ``/_sim/``, for tests, benchmarks and demos.

* ``GET|POST /_sim/faults``: read, or partially update, :attr:`Simulator.faults`;
* ``GET|POST /_sim/batches``: list batches, or generate one;
* ``GET /_sim/batches/{id}/records``: the records visible now, in list order;
* ``GET /_sim/requests``: the request log;
* ``POST /_sim/keys`` and ``POST /_sim/invalidate-tokens``.

A body that cannot be used answers 400 ``{"error": ...}`` (:func:`_control_errors`).
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Mapping
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from rightfoot_simulator.api import _SIM_KEY, EXPORT_CHUNK_BYTES
from rightfoot_simulator.batches import ORDERS, TOTAL_PROCESSED_MODES
from rightfoot_simulator.data import _record_control_json

log = structlog.get_logger("rightfoot_simulator")


class _BadRequest(Exception):
    """A control-API request body that cannot be used (answered 400)."""


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise _BadRequest(f"body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise _BadRequest("body must be a JSON object")
    return body


def _optional(body: Mapping[str, Any], name: str, kind: type[Any]) -> Any:
    """``body[name]`` if present and of exactly this JSON type (bools are not numbers)."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise _BadRequest(f"{name} must be of type {kind.__name__}")
    return value


def _number(body: Mapping[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _BadRequest(f"{name} must be a number")
    return float(value)


@web.middleware
async def _control_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except _BadRequest as exc:
        return web.json_response({"error": str(exc)}, status=400)


async def _get_faults(request: web.Request) -> web.Response:
    sim = request.app[_SIM_KEY]
    return web.json_response({**sim.faults.to_json(), "now": sim.clock()})


async def _post_faults(request: web.Request) -> web.Response:
    sim = request.app[_SIM_KEY]
    body = await _json_object(request)
    for_s = body.pop("error_5xx_for_s", None)
    if for_s is not None:
        if isinstance(for_s, bool) or not isinstance(for_s, int | float):
            raise _BadRequest("error_5xx_for_s must be a number")
        body["error_5xx_until"] = sim.clock() + for_s
    try:
        sim.faults.update(body)
    except ValueError as exc:
        raise _BadRequest(str(exc)) from exc
    log.info("simulator faults set", **body)
    return await _get_faults(request)


async def _post_batch(request: web.Request) -> web.Response:
    sim = request.app[_SIM_KEY]
    body = await _json_object(request)
    batch_id = _optional(body, "batch_id", str) or str(uuid.uuid4())
    count = _optional(body, "count", int)
    if count is None or count < 0:
        raise _BadRequest("count must be an integer >= 0")
    codes = _optional(body, "codes", list)
    if codes is not None and not all(isinstance(c, int) and not isinstance(c, bool) for c in codes):
        raise _BadRequest("codes must be a non-empty list of integers")
    spread_s = _number(body, "spread_s", 0.0)
    visible_after = _number(body, "visible_after", 0.0)
    seed, owner_key = _optional(body, "seed", int), _optional(body, "owner_key", str)
    with_metadata = bool(_optional(body, "with_metadata", bool))
    shape = _shape_options(body)
    if batch_id in sim.batch_ids():
        return web.json_response({"error": f"batch {batch_id!r} already exists"}, status=409)
    try:
        records = sim.generate_batch(
            batch_id,
            count,
            spread_s=spread_s,
            seed=seed,
            codes=codes,
            with_metadata=with_metadata,
            owner_key=owner_key,
            visible_after=visible_after,
            **shape,
        )
    except ValueError as exc:
        raise _BadRequest(str(exc)) from exc
    return web.json_response({"batch_id": batch_id, "count": len(records)}, status=201)


def _shape_options(body: Mapping[str, Any]) -> dict[str, Any]:
    """``order``, ``total_processed``, ``count_skew``, ``page_size``, ``has_more``,
    ``token_ttl_s``, ``integers``, ``gaps`` and ``lazy`` of a batch, checked."""
    options: dict[str, Any] = {}
    order = _optional(body, "order", str)
    if order is not None:
        if order not in ORDERS:
            raise _BadRequest(f"order must be one of {', '.join(map(repr, ORDERS))}")
        options["order"] = order
    total = _optional(body, "total_processed", str)
    if total is not None:
        if total not in TOTAL_PROCESSED_MODES:
            modes = ", ".join(map(repr, TOTAL_PROCESSED_MODES))
            raise _BadRequest(f"total_processed must be one of {modes}")
        options["total_processed"] = total
    skew = _optional(body, "count_skew", int)
    if skew is not None:
        options["count_skew"] = skew
    # Their values are checked where the batch is made (a ValueError there answers 400).
    for name in ("page_size", "has_more", "token_ttl_s", "integers", "gaps"):
        if body.get(name) is not None:
            options[name] = body[name]
    lazy = _optional(body, "lazy", bool)
    if lazy is not None:
        options["lazy"] = lazy
    return options


async def _get_batches(request: web.Request) -> web.Response:
    sim = request.app[_SIM_KEY]
    batches = [
        {
            "batch_id": batch_id,
            "visible": sim.visible_count(batch_id),
            "total": sim.record_count(batch_id),
        }
        for batch_id in sim.batch_ids()
    ]
    return web.json_response({"batches": batches})


def _query_count(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    if not raw.isdigit() or not raw.isascii():
        raise _BadRequest(f"{name} must be an integer >= 0")
    return int(raw)


async def _get_batch_records(request: web.Request) -> web.StreamResponse:
    """The visible records in list order; ``?offset=&limit=`` select a slice of them.

    Lazy batches stream the (same) JSON in chunks rather than building it whole.
    """
    sim = request.app[_SIM_KEY]
    batch_id = request.match_info["batch_id"]
    if batch_id not in sim.batch_ids():
        return web.json_response({"error": f"no batch {batch_id!r}"}, status=404)
    offset = _query_count(request, "offset") or 0
    limit = _query_count(request, "limit")
    batch = sim._batches[batch_id]
    visible = batch.visible_count(sim.clock()) or 0
    end = visible if limit is None else min(visible, offset + limit)
    selected = itertools.islice(batch.iter_visible(visible), offset, end)
    if not batch.lazy:
        records = [_record_control_json(r) for r in selected]
        return web.json_response({"batch_id": batch_id, "count": len(records), "records": records})
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    head = json.dumps({"batch_id": batch_id, "count": max(0, end - offset)})
    buffer = [head[:-1], ', "records": [']
    size = 0
    for i, record in enumerate(selected):
        text = json.dumps(_record_control_json(record))
        buffer.append(f", {text}" if i else text)
        size += len(text)
        if size >= EXPORT_CHUNK_BYTES:
            await response.write("".join(buffer).encode())
            buffer, size = [], 0
    buffer.append("]}")
    await response.write("".join(buffer).encode())
    await response.write_eof()
    return response


async def _get_requests(request: web.Request) -> web.Response:
    entries = [e.to_json() for e in request.app[_SIM_KEY].request_log]
    return web.json_response({"requests": entries})


async def _post_keys(request: web.Request) -> web.Response:
    body = await _json_object(request)
    keys = body.get("api_keys")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise _BadRequest("api_keys must be a list of strings")
    request.app[_SIM_KEY].set_api_keys(keys)
    return web.json_response({"count": len(keys)})


async def _post_invalidate_tokens(request: web.Request) -> web.Response:
    request.app[_SIM_KEY].invalidate_page_tokens()
    return web.json_response({"invalidated": True})
