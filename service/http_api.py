"""The HTTP surface: /healthz, /readyz, /metrics and the admin API on one aiohttp server."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.errors import RequestRejected
from service.metrics import Metrics
from service.requests import BATCH_ID_PATTERN, TrackingRequest, decode_request, reject_reason

log = structlog.get_logger(__name__)


class BatchView(Protocol):
    def get(self, batch_id: str) -> dict[str, Any] | None: ...
    def list(self) -> list[dict[str, Any]]: ...


Submit = Callable[[TrackingRequest], Awaitable[None]]
Readiness = Callable[[], tuple[bool, dict[str, Any]]]

_NO_TOKEN = (
    "the admin API is disabled: set RFP_HTTP__ADMIN_TOKEN to enable POST and DELETE /v1/batches"
)


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


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

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes)
        app.add_routes(
            [
                web.get("/healthz", self.healthz),
                web.get("/readyz", self.readyz),
                web.get("/metrics", self.metrics_page),
                web.post("/v1/batches", self.post_batch),
                web.get("/v1/batches", self.list_batches),
                web.get("/v1/batches/{batch_id}", self.get_batch),
                web.delete("/v1/batches/{batch_id}", self.delete_batch),
            ]
        )
        return app

    async def healthz(self, _request: web.Request) -> web.Response:
        if self.liveness():
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "event loop stalled"}, status=503)

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
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected):
            self.metrics.invalid_input.labels("http", "unauthorized").inc()
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
        try:
            req = decode_request(body)
        except RequestRejected as exc:
            self.metrics.invalid_input.labels("http", reject_reason(exc)).inc()
            log.info("http_request_rejected", reason=str(exc))
            return _error(400, str(exc))
        if req.action != "track":
            return _error(400, "action: use DELETE /v1/batches/{batch_id} to stop tracking")
        await self.submit(req)
        return web.json_response(
            {"batch_id": req.batch_id, "status": "accepted"},
            status=202,
            headers={"Location": f"/v1/batches/{req.batch_id}"},
        )

    async def delete_batch(self, request: web.Request) -> web.Response:
        denied = self._authorize(request)
        if denied is not None:
            return denied
        batch_id = request.match_info["batch_id"]
        try:
            req = TrackingRequest(batch_id=batch_id, action="stop")
        except ValueError:
            return _error(400, f"batch_id must match {BATCH_ID_PATTERN}")
        await self.submit(req)
        return web.json_response({"batch_id": batch_id, "status": "stopping"}, status=202)

    async def list_batches(self, _request: web.Request) -> web.Response:
        return web.json_response({"batches": self.view.list()})

    async def get_batch(self, request: web.Request) -> web.Response:
        found = self.view.get(request.match_info["batch_id"])
        if found is None:
            return _error(404, "this batch is not tracked")
        return web.json_response(found)
