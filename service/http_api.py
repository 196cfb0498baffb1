"""The HTTP surface: /healthz, /readyz, /metrics and the admin API on one aiohttp server.

Described by ``service/openapi.yaml`` (served at ``GET /openapi.yaml``). Every answer
but /metrics and that document is JSON, errors included: an unknown path (404), a method
a path does not support (405, with ``Allow``), a body over ``http.max_body_bytes`` (413)
and anything unexpected (500, logged, with no detail) all get ``{"error": ...}``.
"""

from __future__ import annotations

import hmac
import logging
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Protocol

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiokafka.errors import KafkaError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.errors import RequestRejected
from service.logs import Throttle
from service.metrics import Metrics
from service.requests import (
    BATCH_ID_PATTERN,
    TrackingRequest,
    decode_request,
    readable_batch_id,
    reject_reason,
)

log = structlog.get_logger(__name__)


class BatchView(Protocol):
    """What ``GET /v1/batches`` reads (``view.StateView``). While ``loaded`` is False (the
    state topic still being read, at start or after partitions were added), what it holds
    is not whole yet: those GETs answer 503."""

    @property
    def loaded(self) -> bool: ...
    def get(self, batch_id: str) -> dict[str, Any] | None: ...
    def list(
        self,
        *,
        statuses: frozenset[str] | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> tuple[list[dict[str, Any]], bool]: ...


# GET /v1/batches: at most this many batches a page (and by default).
LIST_LIMIT = 1000
LIST_STATUSES = ("tracking", "completed", "expired", "failed", "stopped")


Submit = Callable[[TrackingRequest], Awaitable[None]]

# The Retry-After of a 503: Kafka cannot take a request now, or the state view is loading.
RETRY_AFTER_S = 5
Readiness = Callable[[], tuple[bool, dict[str, Any]]]

_NO_TOKEN = (
    "the admin API is disabled: set RFP_HTTP__ADMIN_TOKEN (or RFP_HTTP__ADMIN_TOKEN_FILE) "
    "to enable POST and DELETE /v1/batches"
)


# At most this much of a path, batch ID or reason from a request is repeated in a log line:
# a URL may be ~8 KB from anyone who can connect.
LOGGED_CHARS = 128


def _clip(text: str) -> str:
    return text if len(text) <= LOGGED_CHARS else text[:LOGGED_CHARS] + "..."


def _payload_problem(exc: BaseException) -> str:
    """What aiohttp found wrong with a body (``Can not decode content-encoding: gzip``)."""
    cause = exc.__cause__
    text = cause.message if isinstance(cause, HttpProcessingError) else str(exc)
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return _clip(lines[-1] if lines else type(exc).__name__)


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _unavailable(message: str) -> web.Response:
    """A 503 that says when to try again."""
    response = _error(503, message)
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def _list_query_problem(query: Any) -> str | None:
    """What is wrong with the query of GET /v1/batches, if anything."""
    unknown = sorted(set(query) - {"status", "after", "limit"})
    if unknown:
        return f"unknown query parameter {unknown[0]!r}: use status, after and limit"
    if any(s not in LIST_STATUSES for s in query.getall("status", ())):
        return f"status must be one of {', '.join(LIST_STATUSES)} (repeat it for several)"
    for name in ("after", "limit"):
        if len(query.getall(name, ())) > 1:
            return f"{name} given more than once"
    limit = query.get("limit")
    if limit is not None and not (
        limit.isascii() and limit.isdigit() and 1 <= int(limit) <= LIST_LIMIT
    ):
        return f"limit must be an integer from 1 to {LIST_LIMIT}"
    return None


def openapi_document() -> bytes:
    """The OpenAPI document of this API, as packaged with the service."""
    return resources.files("service").joinpath("openapi.yaml").read_bytes()


# Body errors (RequestPayloadError) a handler has answered, counted and logged. aiohttp
# raises the same error again when it drains the rest of the body after the answer, and
# logs it as an unhandled ERROR: that second time is dropped (MalformedRequestLogFilter).
_answered_payload_errors: weakref.WeakSet[BaseException] = weakref.WeakSet()


class MalformedRequestLogFilter(logging.Filter):
    """aiohttp logs a request it cannot parse (bad header bytes, a broken request line, a
    body its Content-Encoding does not decode) as an ERROR with a traceback, one per
    request: anyone who can connect could flood the logs. Such a request (answered 400 by
    aiohttp, or its body found bad only after the handler answered) becomes one WARNING
    line without the traceback, at most ``burst`` per ``window_s``; the rest are only
    counted. A body error the handler answered itself was counted and logged there.
    """

    def __init__(self, metrics: Metrics | None = None, burst: int = 5, window_s: float = 60.0):
        super().__init__("malformed-http")
        self.metrics = metrics
        self.burst = burst
        self.window_s = window_s
        self._recent: deque[float] = deque()

    def reset(self) -> None:
        self._recent.clear()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, web.RequestPayloadError):
            if exc in _answered_payload_errors:
                return False
            line = f"malformed HTTP request body ignored: {_payload_problem(exc)}"
        elif isinstance(exc, HttpProcessingError):
            detail = (exc.message or type(exc).__name__).splitlines()[0][:200]
            line = f"malformed HTTP request refused (400): {detail}"
        else:
            return True
        if self.metrics is not None:
            self.metrics.invalid_input.labels("http", "malformed_http").inc()
        now = time.monotonic()
        while self._recent and now - self._recent[0] > self.window_s:
            self._recent.popleft()
        if len(self._recent) >= self.burst:
            return False
        self._recent.append(now)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = line, ()
        record.exc_info, record.exc_text = None, None
        return True


def _install_malformed_request_filter(metrics: Metrics) -> None:
    server_log = logging.getLogger("aiohttp.server")
    for existing in server_log.filters:
        if isinstance(existing, MalformedRequestLogFilter):
            existing.metrics = metrics
            return
    server_log.addFilter(MalformedRequestLogFilter(metrics))


# Headers of an aiohttp HTTPException worth keeping on its JSON replacement.
_KEPT_HEADERS = ("Allow", "WWW-Authenticate", "Retry-After", "Location")


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own error answers (404, 405, 413, ...) and crashes as JSON ``Error``s."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else None
        response = _error(exc.status, message or exc.reason)
        for name in _KEPT_HEADERS:
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except Exception:
        log.exception("http_handler_failed", method=request.method, path=_clip(request.path))
        return _error(500, "internal error (logged)")


class HttpApi:
    def __init__(
        self,
        *,
        metrics: Metrics,
        readiness: Readiness,
        submit: Submit,
        view: BatchView,
        admin_token: str | None,
        max_body_bytes: int,
        liveness: Callable[[], bool] = lambda: True,
    ) -> None:
        self.metrics = metrics
        self.readiness = readiness
        self.submit = submit
        self.view = view
        self.admin_token = admin_token
        self.max_body_bytes = max_body_bytes
        self.liveness = liveness
        # Lines about requests anyone who can connect may send: one a kind a minute at
        # WARNING (with ``suppressed``), the rest at DEBUG; the metrics count every one.
        self.log_throttle = Throttle()

    async def serve(self, host: str, port: int) -> tuple[web.AppRunner, int]:
        """Listen on host:port (0: any free port); the runner to clean up, and the port."""
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        return runner, sockets[0].getsockname()[1] if sockets else port

    def app(self) -> web.Application:
        _install_malformed_request_filter(self.metrics)
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[json_errors])
        app.add_routes(
            [
                web.get("/healthz", self.healthz),
                web.get("/readyz", self.readyz),
                web.get("/metrics", self.metrics_page),
                web.get("/openapi.yaml", self.openapi),
                web.post("/v1/batches", self.post_batch),
                web.get("/v1/batches", self.list_batches),
                web.get("/v1/batches/{batch_id}", self.get_batch),
                web.delete("/v1/batches/{batch_id}", self.delete_batch),
            ]
        )
        return app

    async def openapi(self, _request: web.Request) -> web.Response:
        return web.Response(body=openapi_document(), content_type="application/yaml")

    async def _submit(self, req: TrackingRequest) -> web.Response | None:
        """Hand a request to Kafka; a 503 answer if Kafka cannot take it now."""
        try:
            await self.submit(req)
        except web.HTTPServiceUnavailable as exc:  # not connected to Kafka yet (at start)
            return _unavailable(exc.text or "Kafka cannot take the request now; try again later")
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning("http_submit_failed", batch_id=req.batch_id, error=type(exc).__name__)
            return _unavailable("Kafka cannot take the request now; try again later")
        return None

    def _view_loading(self) -> web.Response | None:
        """A 503 while the state view is not whole yet (see BatchView): not a 404 for a
        batch that is tracked, nor a list without it."""
        if self.view.loaded:
            return None
        return _unavailable("the state view is still loading (the service is starting); try again")

    async def healthz(self, _request: web.Request) -> web.Response:
        if self.liveness():
            return web.json_response({"status": "ok"})
        return web.json_response(
            {"status": "event loop stalled, or one of the service's loops ended (see its logs)"},
            status=503,
        )

    async def readyz(self, _request: web.Request) -> web.Response:
        ready, detail = self.readiness()
        return web.json_response(
            {"status": "ready" if ready else "not ready", **detail}, status=200 if ready else 503
        )

    async def metrics_page(self, _request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _authorize(self, request: web.Request) -> web.Response | None:
        if not self.admin_token:
            return _error(403, _NO_TOKEN)
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        expected = self.admin_token.encode()
        # Header bytes that are not UTF-8 arrive as surrogate escapes: compare them as sent.
        given = token.encode("utf-8", "surrogateescape")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, expected):
            self.metrics.invalid_input.labels("http", "unauthorized").inc()
            fields: dict[str, Any] = {
                "method": request.method,
                "path": _clip(request.path),
                "remote": request.remote,
                "token_given": bool(token),
            }
            if "batch_id" in request.match_info:
                fields["batch_id"] = _clip(request.match_info["batch_id"])
            self.log_throttle.log(
                "admin_request_unauthorized", log, "warning", "admin_request_unauthorized", **fields
            )
            return web.json_response(
                {"error": "missing or wrong admin token"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="rightfoot-poller"'},
            )
        return None

    async def post_batch(self, request: web.Request) -> web.Response:
        denied = self._authorize(request)
        if denied is not None:
            return denied
        if request.content_type != "application/json":
            self.metrics.invalid_input.labels("http", "content_type").inc()
            return _error(415, "the body must be application/json")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self.metrics.invalid_input.labels("http", "too_large").inc()
            return _error(413, f"the body is larger than {self.max_body_bytes} bytes")
        except web.RequestPayloadError as exc:
            # A body its Content-Encoding does not decode (not gzip), a broken chunk...
            _answered_payload_errors.add(exc)
            problem = f"the body cannot be read: {_payload_problem(exc)}"
            self.metrics.invalid_input.labels("http", "malformed_http").inc()
            log.info("http_request_rejected", reason=problem, path=_clip(request.path))
            return _error(400, problem)
        except ConnectionResetError:
            # The client went away before sending the whole body: nothing to answer, not a
            # fault of the service. A malformed request, counted as one; one INFO a minute.
            self.metrics.invalid_input.labels("http", "malformed_http").inc()
            self.log_throttle.log(
                "body_cut_short",
                log,
                "info",
                "http_request_rejected",
                reason="the client closed the connection before sending the whole body",
                path=_clip(request.path),
            )
            return _error(400, "the connection was closed before the whole body was sent")
        try:
            req = decode_request(body)
        except RequestRejected as exc:
            self.metrics.invalid_input.labels("http", reject_reason(exc)).inc()
            batch_id = readable_batch_id(body)
            fields = {} if batch_id is None else {"batch_id": batch_id}
            log.info("http_request_rejected", reason=_clip(str(exc)), **fields)
            return _error(400, str(exc))
        if req.action != "track":
            problem = "action: use DELETE /v1/batches/{batch_id} to stop tracking"
            self.metrics.invalid_input.labels("http", "invalid_field").inc()
            log.info("http_request_rejected", reason=problem, batch_id=req.batch_id)
            return _error(400, problem)
        failed = await self._submit(req)
        if failed is not None:
            return failed
        return web.json_response(
            {"batch_id": req.batch_id, "status": "accepted"},
            status=202,
            headers={"Location": f"/v1/batches/{req.batch_id}"},
        )

    async def delete_batch(self, request: web.Request) -> web.Response:
        """202 for any valid batch ID: the stop goes through the requests topic to the
        batch's owner, whose state this replica's view may not show yet; for a batch that
        is not tracked it does nothing (as documented: no 404)."""
        denied = self._authorize(request)
        if denied is not None:
            return denied
        batch_id = request.match_info["batch_id"]
        try:
            req = TrackingRequest(batch_id=batch_id, action="stop")
        except ValueError:
            problem = f"batch_id must match {BATCH_ID_PATTERN}"
            # As a bad batch_id in a POST body (see reject_reason).
            self.metrics.invalid_input.labels("http", "invalid_field").inc()
            log.info("http_request_rejected", reason=problem, batch_id=_clip(batch_id))
            return _error(400, problem)
        failed = await self._submit(req)
        if failed is not None:
            return failed
        return web.json_response({"batch_id": batch_id, "status": "stopping"}, status=202)

    async def list_batches(self, request: web.Request) -> web.Response:
        """A page of batches by ID, after ``after``, of the given statuses (any by default);
        ``next_after`` is what to pass as ``after`` for the next page (null: the last)."""
        query = request.query
        problem = _list_query_problem(query)
        if problem is not None:
            self.metrics.invalid_input.labels("http", "bad_query").inc()
            # GET is open to anyone who can connect: throttled as unauthorized requests are.
            self.log_throttle.log(
                "bad_query",
                log,
                "info",
                "http_request_rejected",
                reason=_clip(problem),
                path=_clip(request.path),
            )
            return _error(400, problem)
        loading = self._view_loading()
        if loading is not None:
            return loading
        statuses = frozenset(query.getall("status", ())) or None
        limit = int(query.get("limit", LIST_LIMIT))
        page, more = self.view.list(statuses=statuses, after=query.get("after"), limit=limit)
        return web.json_response(
            {"batches": page, "next_after": page[-1]["batch_id"] if more else None}
        )

    async def get_batch(self, request: web.Request) -> web.Response:
        loading = self._view_loading()
        if loading is not None:
            return loading
        found = self.view.get(request.match_info["batch_id"])
        if found is None:
            return _error(404, "this batch is not tracked")
        return web.json_response(found)
