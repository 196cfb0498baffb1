"""The HTTP surface: health, readiness, metrics and the admin API (tracking requests)."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import structlog
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiokafka.errors import KafkaTimeoutError
from test_metrics import PROCESS

from service.config import KafkaConfig
from service.http_api import LIST_LIMIT, HttpApi, MalformedRequestLogFilter, openapi_document
from service.metrics import Metrics
from service.requests import TrackingRequest
from service.view import StateView

TOKEN = "admin-token-0a1b2c3d4e5f"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Boundary:
    """What the HTTP API talks to: in-test stand-ins for the service behind it."""

    def __init__(self) -> None:
        self.submitted: list[TrackingRequest] = []
        self.ready = True
        self.ready_detail: dict[str, Any] = {"kafka": True, "state_restored": True}
        self.view = StateView(KafkaConfig(), "test")  # its batches set by the tests
        self.view.loaded = True  # as once the state topic is read; set False by the tests
        self.batches = self.view.batches
        self.view.put("b-1", {"batch_id": "b-1", "status": "tracking", "records_published": 12})
        self.submit_error: BaseException | None = None

    async def submit(self, req: TrackingRequest) -> None:
        if self.submit_error is not None:
            raise self.submit_error
        self.submitted.append(req)

    @property
    def loaded(self) -> bool:
        return self.view.loaded

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        return self.ready, dict(self.ready_detail)

    def get(self, batch_id: str) -> dict[str, Any] | None:
        return self.batches.get(batch_id)

    def list(self, **query: Any) -> tuple[list[dict[str, Any]], bool]:
        return self.view.list(**query)


class Http:
    def __init__(
        self, server: TestServer, boundary: Boundary, metrics: Metrics, api: HttpApi
    ) -> None:
        self.server = server
        self.boundary = boundary
        self.metrics = metrics
        self.api = api
        self.session = aiohttp.ClientSession()

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def call(
        self, method: str, path: str, *, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        data = body if isinstance(body, bytes | str) or body is None else json.dumps(body)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        async with self.session.request(method, self.url(path), data=data, headers=hdrs) as resp:
            text = await resp.text()
            try:
                parsed: Any = json.loads(text)
            except ValueError:
                parsed = text
            return resp.status, parsed, resp


async def serve(admin_token: str | None, max_body_bytes: int = 1024) -> tuple[TestServer, Http]:
    boundary, metrics = Boundary(), Metrics()
    api = HttpApi(
        metrics=metrics,
        readiness=boundary.readiness,
        submit=boundary.submit,
        view=boundary,
        admin_token=admin_token,
        max_body_bytes=max_body_bytes,
    )
    server = TestServer(api.app(), host="127.0.0.1")
    await server.start_server()
    return server, Http(server, boundary, metrics, api)


@pytest.fixture
async def http() -> AsyncIterator[Http]:
    server, client = await serve(TOKEN)
    try:
        yield client
    finally:
        await client.session.close()
        await server.close()


@pytest.fixture
async def http_without_token() -> AsyncIterator[Http]:
    server, client = await serve(None)
    try:
        yield client
    finally:
        await client.session.close()
        await server.close()


async def test_post_batch_accepted(http: Http) -> None:
    status, body, resp = await http.call(
        "POST",
        "/v1/batches",
        body={"batch_id": "5d3c6bbb-fc1a-46a4-93da-1ce4a54b0d83", "expected_count": 123},
        headers=AUTH,
    )
    assert status == 202
    assert body["batch_id"] == "5d3c6bbb-fc1a-46a4-93da-1ce4a54b0d83"
    assert resp.headers["Location"] == "/v1/batches/5d3c6bbb-fc1a-46a4-93da-1ce4a54b0d83"
    assert http.boundary.submitted == [
        TrackingRequest(batch_id="5d3c6bbb-fc1a-46a4-93da-1ce4a54b0d83", expected_count=123)
    ]


async def test_post_without_count_and_with_charset(http: Http) -> None:
    status, _, _ = await http.call(
        "POST",
        "/v1/batches",
        body=b'{"batch_id": "b-9"}',
        headers={**AUTH, "Content-Type": "application/json; charset=utf-8"},
    )
    assert status == 202
    assert http.boundary.submitted == [TrackingRequest(batch_id="b-9")]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[]", ""),
        (b"{}", "batch_id"),
        (b'{"batch_id": "has space"}', "batch_id"),
        (b'{"batch_id": "b", "expected_count": 0}', "expected_count"),
        (b'{"batch_id": "b", "expected_count": -1}', "expected_count"),
        (b'{"batch_id": "b", "colour": "red"}', "colour: unknown field"),
        (b'{"batch_id": "b", "action": "stop"}', "DELETE"),
    ],
)
async def test_post_bad_body_is_400_with_a_reason(http: Http, body: bytes, fragment: str) -> None:
    status, answer, _ = await http.call("POST", "/v1/batches", body=body, headers=AUTH)
    assert status == 400
    assert isinstance(answer["error"], str) and answer["error"]
    assert fragment in answer["error"]
    assert http.boundary.submitted == []


async def test_post_non_json_content_type_is_415(http: Http) -> None:
    status, answer, _ = await http.call(
        "POST",
        "/v1/batches",
        body=b"batch_id=b-1",
        headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 415
    assert "application/json" in answer["error"]
    assert http.boundary.submitted == []


async def test_post_over_max_body_is_413(http: Http) -> None:
    big = json.dumps({"batch_id": "b-1", "pad": "x" * 5000})
    status, answer, _ = await http.call("POST", "/v1/batches", body=big, headers=AUTH)
    assert status == 413
    assert "1024" in answer["error"]
    assert http.boundary.submitted == []


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": f"Bearer {TOKEN}x"},
    ],
    ids=["missing", "wrong", "basic", "no-scheme", "longer"],
)
async def test_wrong_token_is_401(http: Http, headers: dict[str, str]) -> None:
    status, answer, resp = await http.call(
        "POST", "/v1/batches", body={"batch_id": "b-1"}, headers=headers
    )
    assert status == 401
    assert "token" in answer["error"]
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    status, _, _ = await http.call("DELETE", "/v1/batches/b-1", headers=headers)
    assert status == 401
    assert http.boundary.submitted == []
    assert TOKEN not in json.dumps(answer)


async def test_bearer_scheme_is_case_insensitive(http: Http) -> None:
    status, _, _ = await http.call(
        "POST",
        "/v1/batches",
        body={"batch_id": "b-1"},
        headers={"Authorization": f"bearer {TOKEN}"},
    )
    assert status == 202


async def test_without_admin_token_mutations_are_403_with_how_to(
    http_without_token: Http,
) -> None:
    http = http_without_token
    for method, path, body in (
        ("POST", "/v1/batches", {"batch_id": "b-1"}),
        ("DELETE", "/v1/batches/b-1", None),
    ):
        status, answer, _ = await http.call(method, path, body=body, headers=AUTH)
        assert status == 403
        assert "RFP_HTTP__ADMIN_TOKEN" in answer["error"]
    assert http.boundary.submitted == []
    # Reading stays open.
    status, answer, _ = await http.call("GET", "/v1/batches")
    assert status == 200


async def test_delete_is_202_and_submits_a_stop(http: Http) -> None:
    status, answer, _ = await http.call("DELETE", "/v1/batches/b-1", headers=AUTH)
    assert status == 202
    assert answer["batch_id"] == "b-1"
    assert http.boundary.submitted == [TrackingRequest(batch_id="b-1", action="stop")]


async def test_delete_invalid_batch_id_is_400(http: Http) -> None:
    status, answer, _ = await http.call("DELETE", "/v1/batches/bad%20id", headers=AUTH)
    assert status == 400
    assert "batch_id" in answer["error"]
    assert http.boundary.submitted == []


async def test_get_list_and_one(http: Http) -> None:
    status, answer, _ = await http.call("GET", "/v1/batches")
    assert status == 200
    assert answer == {"batches": [http.boundary.batches["b-1"]], "next_after": None}
    status, answer, _ = await http.call("GET", "/v1/batches/b-1")
    assert status == 200
    assert answer == http.boundary.batches["b-1"]
    status, answer, _ = await http.call("GET", "/v1/batches/unknown")
    assert status == 404
    assert answer["error"]


@pytest.mark.parametrize("path", ["/v1/batches", "/v1/batches?status=tracking", "/v1/batches/b-1"])
async def test_gets_answer_503_while_the_state_view_is_loading(http: Http, path: str) -> None:
    """Not a 404 for a batch that is tracked, nor a list without it: the state topic is
    still being read (at start, or after partitions were added)."""
    http.boundary.view.loaded = False
    status, answer, resp = await http.call("GET", path)
    assert status == 503
    assert "loading" in answer["error"] and resp.headers["Retry-After"] == "5"
    http.boundary.view.loaded = True
    status, answer, _ = await http.call("GET", path)
    assert status == 200
    assert "b-1" in json.dumps(answer)


async def test_the_state_view_itself_says_whether_it_is_loaded() -> None:
    """As the service wires it: the StateView, not yet loaded, is the view."""
    view = StateView(KafkaConfig(), "test")
    view.put("b-1", {"batch_id": "b-1", "status": "tracking"})
    api = HttpApi(
        metrics=Metrics(),
        readiness=lambda: (True, {}),
        submit=Boundary().submit,
        view=view,
        admin_token=TOKEN,
        max_body_bytes=1024,
    )
    server = TestServer(api.app(), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            for path in ("/v1/batches", "/v1/batches/b-1", "/v1/batches/unknown"):
                async with session.get(server.make_url(path)) as resp:
                    assert resp.status == 503 and resp.headers["Retry-After"] == "5"
            view.loaded = True
            async with session.get(server.make_url("/v1/batches/b-1")) as resp:
                assert resp.status == 200
    finally:
        await server.close()


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (web.HTTPServiceUnavailable(text="not connected to Kafka yet"), "not connected to Kafka"),
        (KafkaTimeoutError(), "Kafka cannot take the request now"),
    ],
)
@pytest.mark.parametrize("method", ["POST", "DELETE"])
async def test_a_request_kafka_cannot_take_yet_is_503_with_retry_after(
    http: Http, error: BaseException, says: str, method: str
) -> None:
    """Before the service connects to Kafka (start-up) as when Kafka fails the send."""
    http.boundary.submit_error = error
    path = "/v1/batches" if method == "POST" else "/v1/batches/b-1"
    status, answer, resp = await http.call(method, path, body={"batch_id": "b-1"}, headers=AUTH)
    assert status == 503
    assert says in answer["error"] and resp.headers["Retry-After"] == "5"
    assert http.boundary.submitted == []


async def test_delete_of_a_batch_not_tracked_is_202_as_documented(http: Http) -> None:
    """A stop goes through the requests topic to the batch's owner, whose state this
    replica's view may not show yet: it is accepted whatever the batch, and does nothing
    to a batch that is not tracked. The document says so, and lists no 404."""
    status, answer, _ = await http.call("DELETE", "/v1/batches/never-tracked", headers=AUTH)
    assert (status, answer) == (202, {"batch_id": "never-tracked", "status": "stopping"})
    assert http.boundary.submitted == [TrackingRequest(batch_id="never-tracked", action="stop")]
    delete = yaml.safe_load(openapi_document())["paths"]["/v1/batches/{batch_id}"]["delete"]
    assert "404" not in delete["responses"] and "202" in delete["responses"]
    assert "not tracked" in delete["description"]


async def test_readyz_follows_readiness(http: Http) -> None:
    status, answer, _ = await http.call("GET", "/readyz")
    assert status == 200
    assert answer["status"] == "ready"
    assert answer["kafka"] is True
    http.boundary.ready = False
    http.boundary.ready_detail = {"api_credentials": "rejected"}
    status, answer, _ = await http.call("GET", "/readyz")
    assert status == 503
    assert answer["api_credentials"] == "rejected"
    http.boundary.ready = True
    status, _, _ = await http.call("GET", "/readyz")
    assert status == 200


async def test_healthz(http: Http) -> None:
    status, answer, _ = await http.call("GET", "/healthz")
    assert status == 200
    assert answer["status"] == "ok"


async def test_healthz_reports_a_stalled_loop() -> None:
    api = HttpApi(
        metrics=Metrics(),
        readiness=lambda: (True, {}),
        submit=Boundary().submit,
        view=Boundary(),
        admin_token=None,
        max_body_bytes=1024,
        liveness=lambda: False,
    )
    server = TestServer(api.app(), host="127.0.0.1")
    await server.start_server()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(str(server.make_url("/healthz"))) as resp,
        ):
            assert resp.status == 503
    finally:
        await server.close()


async def test_metrics_page(http: Http) -> None:
    await http.call("POST", "/v1/batches", body={"batch_id": "b-1"}, headers={})
    status, text, resp = await http.call("GET", "/metrics")
    assert status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert isinstance(text, str)
    names = {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert names
    own = {name for name in names if name.startswith("rightfoot_poller_")}
    assert names - own <= set(PROCESS), names  # beside its own, only the process series
    assert "process_resident_memory_bytes" in names
    assert "rightfoot_poller_build_info" in names
    assert 'rightfoot_poller_invalid_input_total{reason="unauthorized",source="http"} 1.0' in text


async def test_the_list_filters_by_status_and_pages_by_batch_id(http: Http) -> None:
    """``status`` (repeatable) filters, ``limit`` bounds a page, and ``next_after`` is the
    ``after`` of the next page: walked to the end, every batch of those statuses once, in
    batch-ID order; without ``limit`` a page holds at most LIST_LIMIT."""
    statuses = ("tracking", "completed", "stopped")
    http.boundary.view.remove("b-1")
    for n in range(2500):
        batch_id = f"b-{n:05d}"
        http.boundary.view.put(batch_id, {"batch_id": batch_id, "status": statuses[n % 3]})
    status, answer, _ = await http.call("GET", "/v1/batches")
    assert status == 200 and len(answer["batches"]) == LIST_LIMIT
    assert answer["next_after"] == f"b-{LIST_LIMIT - 1:05d}"

    seen: list[str] = []
    after: str | None = None
    while True:
        query = "status=tracking&status=stopped&limit=333" + (f"&after={after}" if after else "")
        status, answer, _ = await http.call("GET", f"/v1/batches?{query}")
        assert status == 200 and len(answer["batches"]) <= 333
        seen += [b["batch_id"] for b in answer["batches"]]
        after = answer["next_after"]
        if after is None:
            break
    wanted = sorted(b for b, v in http.boundary.batches.items() if v["status"] != "completed")
    assert seen == wanted
    status, answer, _ = await http.call("GET", "/v1/batches?status=failed")
    assert answer == {"batches": [], "next_after": None}


@pytest.mark.parametrize(
    "query",
    [
        "status=done",
        "limit=0",
        "limit=1001",
        "limit=ten",
        "limit=%EF%BC%91",  # a full-width digit: isdigit() but not ASCII
        "limit=5&limit=6",
        "after=a&after=b",
        "page=2",
    ],
)
async def test_a_bad_list_query_is_400_counted_and_says_why(http: Http, query: str) -> None:
    status, answer, _ = await http.call("GET", f"/v1/batches?{query}")
    assert status == 400 and answer["error"]
    counted = http.metrics.registry.get_sample_value(
        "rightfoot_poller_invalid_input_total", {"source": "http", "reason": "bad_query"}
    )
    assert counted == 1


def invalid_input(http: Http, reason: str) -> float:
    value = http.metrics.registry.get_sample_value(
        "rightfoot_poller_invalid_input_total", {"source": "http", "reason": reason}
    )
    return value or 0.0


async def post_encoded(
    http: Http, body: bytes, headers: dict[str, str], path: str = "/v1/batches"
) -> tuple[int, Any]:
    """A POST on a connection of its own (the server closes it after a bad body)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        hdrs = {"Content-Type": "application/json", "Content-Encoding": "gzip", **headers}
        async with session.post(http.url(path), data=body, headers=hdrs) as resp:
            text = await resp.text()
    await asyncio.sleep(0.05)  # the server drains the body after its answer
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, text


@pytest.fixture
def server_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """aiohttp.server's records, with a fresh budget of malformed-request warnings."""
    caplog.set_level("DEBUG", logger="aiohttp.server")
    for installed in logging.getLogger("aiohttp.server").filters:
        if isinstance(installed, MalformedRequestLogFilter):
            installed.reset()
    return caplog


def server_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "aiohttp.server"]


async def test_a_gzip_body_that_is_not_gzip_is_400_counted_and_one_line(
    http: Http, server_log: pytest.LogCaptureFixture
) -> None:
    with structlog.testing.capture_logs() as logs:
        status, answer = await post_encoded(http, b'{"batch_id": "b-1"}', AUTH)
    assert status == 400
    assert "cannot be read" in answer["error"] and "content-encoding" in answer["error"]
    assert invalid_input(http, "malformed_http") == 1
    assert [(e["event"], e["log_level"]) for e in logs] == [("http_request_rejected", "info")]
    assert "content-encoding" in logs[0]["reason"]
    assert server_records(server_log) == []  # no ERROR with a traceback, no second line
    assert http.boundary.submitted == []
    # A real gzip body is still read.
    status, answer = await post_encoded(http, gzip.compress(b'{"batch_id": "b-1"}'), AUTH)
    assert status == 202
    assert http.boundary.submitted == [TrackingRequest(batch_id="b-1")]


@pytest.mark.parametrize(("path", "headers"), [("/v1/batches", {}), ("/healthz", AUTH)])
async def test_a_bad_gzip_body_the_handler_never_reads_is_a_warning_not_a_traceback(
    http: Http, server_log: pytest.LogCaptureFixture, path: str, headers: dict[str, str]
) -> None:
    for _ in range(8):
        await post_encoded(http, b"not gzip at all", headers, path=path)
    records = server_records(server_log)
    assert 1 <= len(records) <= 5
    assert all(r.levelname == "WARNING" and r.exc_info is None for r in records)
    assert "content-encoding" in records[0].getMessage()
    assert invalid_input(http, "malformed_http") == 8


async def test_delete_with_a_bad_batch_id_is_counted_and_logged(http: Http) -> None:
    with structlog.testing.capture_logs() as logs:
        status, answer, _ = await http.call("DELETE", "/v1/batches/" + "%20" * 2000, headers=AUTH)
    assert status == 400 and "batch_id" in answer["error"]
    # As a bad batch_id in a POST body.
    assert invalid_input(http, "invalid_field") == 1
    [line] = logs
    assert line["event"] == "http_request_rejected" and "batch_id" in line["reason"]
    assert line["batch_id"].startswith("   ") and len(line["batch_id"]) <= 131


async def test_unauthorized_requests_are_one_warning_a_minute_and_all_counted(
    http: Http,
) -> None:
    now = [1000.0]
    http.api.log_throttle.clock = lambda: now[0]
    long_id = "b" * 6000  # a path of ~6 KB, from anyone who can connect
    with structlog.testing.capture_logs() as logs:
        for _ in range(30):
            status, _, _ = await http.call("DELETE", f"/v1/batches/{long_id}")
            assert status == 401
        status, _, _ = await http.call("POST", "/v1/batches", body={"batch_id": "b-1"})
        assert status == 401
        now[0] += 61.0
        await http.call("DELETE", "/v1/batches/b-1", headers={"Authorization": "Bearer nope"})
    assert invalid_input(http, "unauthorized") == 32
    assert {e["event"] for e in logs} == {"admin_request_unauthorized"}
    warned = [e for e in logs if e["log_level"] == "warning"]
    assert [e["suppressed"] for e in warned] == [0, 30]
    assert len([e for e in logs if e["log_level"] == "debug"]) == 30
    for line in logs:  # echoed path and ID cut to a prefix
        assert len(line["path"]) <= len("/v1/batches/") + 131
        assert len(line.get("batch_id", "")) <= 131
    assert warned[0]["batch_id"] == "b" * 128 + "..."
    assert warned[1]["batch_id"] == "b-1" and warned[1]["token_given"] is True


async def test_bad_list_queries_from_anyone_are_one_line_a_minute(http: Http) -> None:
    now = [1000.0]
    http.api.log_throttle.clock = lambda: now[0]
    with structlog.testing.capture_logs() as logs:
        for _ in range(20):
            status, _, _ = await http.call("GET", "/v1/batches?" + "p" * 5000 + "=1")
            assert status == 400
    assert invalid_input(http, "bad_query") == 20
    [info] = [e for e in logs if e["log_level"] == "info"]
    assert info["suppressed"] == 0 and len(info["reason"]) <= 131
    assert len([e for e in logs if e["log_level"] == "debug"]) == 19


async def test_a_rejected_body_is_logged_with_its_reason_cut(http: Http) -> None:
    body = json.dumps({"batch_id": "b-1", "f" * 900: 1}).encode()  # under the 1024-byte limit
    with structlog.testing.capture_logs() as logs:
        status, answer, _ = await http.call("POST", "/v1/batches", body=body, headers=AUTH)
    assert status == 400 and "unknown field" in answer["error"]
    [line] = logs
    assert len(line["reason"]) <= 131
