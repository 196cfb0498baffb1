"""Logs are for people: one cause gives one line (a WARNING a minute with ``suppressed``,
the rest at DEBUG), an expected condition is not an ERROR, and the metrics still count
every occurrence. Each test here makes one cause repeat and counts the lines it gives."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import pytest
import structlog
from aiokafka.errors import (
    CommitFailedError,
    KafkaConnectionError,
    KafkaTimeoutError,
    ProducerFenced,
    RecordTooLargeError,
)
from test_app_requests import RequestsConsumer, service  # noqa: F401 (a fixture)
from test_http_api import AUTH, TOKEN, Boundary, Http, http  # noqa: F401 (a fixture)
from test_partitions import owner, state_topic  # noqa: F401 (a fixture)
from test_publisher_faults import MESSAGE, Producer
from test_runner import HeldCommitter, invalid_input, runner_of

from service.app import PollerService
from service.config import Settings
from service.errors import ApiNotFound, ApiServerError, ApiTransportError, PublishFailed
from service.events import EventFactory
from service.http_api import HttpApi
from service.kafka import PartitionPublisher
from service.metrics import Metrics
from service.records import InvalidRecord
from service.requests import TrackingRequest
from service.state import BatchState, state_records
from service.step import Step
from service.worker import PartitionWorker
from service.writer import StepWriter

Logs = list[MutableMapping[str, Any]]


def levels(logs: Logs, event: str) -> list[str]:
    return [e["log_level"] for e in logs if e["event"] == event]


# --------------------------------------------------------------------------- publish_failed


async def publish_failure(exc: BaseException, *, transactional: bool) -> Logs:
    """The log lines of a commit that fails with ``exc``: in the transaction's commit, or
    (at_least_once) in the consumer's offset commit."""

    async def raises(*_: object) -> None:
        raise exc

    cfg = Settings.model_validate({"kafka": {"partitions": 1}}).kafka
    pub = PartitionPublisher(
        partition=0,
        cfg=cfg,
        metrics=Metrics(),
        producer=Producer(commit=raises if transactional else None),
        transactional=transactional,
        commit_offsets=raises,
    )
    pub.start()
    try:
        with structlog.testing.capture_logs() as logs, pytest.raises(PublishFailed):
            await pub.publish([MESSAGE], request_offset=7)  # (PartitionLost: fenced)
    finally:
        await pub.close(1.0)
    return logs


@pytest.mark.parametrize(
    ("exc", "transactional", "level"),
    [
        # The metadata of a partition whose leader moved, a batch expired: a broker lost.
        (KafkaTimeoutError("Batch for TopicPartition(...) is expired"), True, "warning"),
        # at_least_once: the offsets refused while the group rebalances.
        (CommitFailedError(), False, "warning"),
        # A takeover: partition_fenced (partitions.py) is the WARNING, this the detail.
        (ProducerFenced(), True, "info"),
        # A real failure stays an ERROR.
        (RecordTooLargeError("the message is 2000000 bytes"), True, "error"),
    ],
)
async def test_an_expected_commit_failure_is_not_an_error_and_names_its_class_once(
    exc: BaseException, transactional: bool, level: str
) -> None:
    logs = await publish_failure(exc, transactional=transactional)
    [line] = [e for e in logs if e["event"] == "publish_failed"]
    assert line["log_level"] == level
    assert line["error"].count(type(exc).__name__) <= 1 and "\n" not in line["error"]
    assert len(line["error"]) <= 340


# --------------------------------------------------------------------------- StepWriter


def writer() -> StepWriter:
    factory = EventFactory(balances_topic="balances", batch_events_topic="events", source="s")
    return StepWriter(factory=factory, metrics=Metrics(), state_topic="state")


def api_invalid(w: StepWriter, reason: str) -> float | None:
    return w.metrics.registry.get_sample_value(
        "rightfoot_poller_invalid_input_total", {"source": "api", "reason": reason}
    )


def test_a_vendor_code_that_differs_every_time_does_not_defeat_the_poll_failed_throttle() -> None:
    """A gateway putting a request ID in ``error.code``: 200 batches' 502s are one WARNING,
    and the throttle holds one kind, not one per answer."""
    w = writer()
    with structlog.testing.capture_logs() as logs:
        for i in range(200):
            step = Step(state=BatchState(batch_id=f"b-{i}", partition=0), note="failed")
            w.poll_failed(step, ApiServerError("bad gateway", status=502, code=f"req-{i:08x}"))
    assert levels(logs, "poll_failed") == ["warning"] + ["debug"] * 199
    assert len(w.failures._last) == 1
    sample = w.metrics.registry.get_sample_value
    assert sample("rightfoot_poller_polls_total", {"result": "error"}) == 200
    # Kinds the service names itself stay apart.
    timeout = ApiTransportError("no answer", code="timeout")
    refused = ApiTransportError("refused", code="connection_error")
    assert timeout.kind != refused.kind


def test_dead_letters_of_one_reason_in_many_batches_are_one_warning_and_all_counted() -> None:
    w = writer()

    def bad(n: int) -> InvalidRecord:
        return InvalidRecord("not_an_object", "a record is not a JSON object", '"x"', f"e-{n}")

    with structlog.testing.capture_logs() as logs:
        for i in range(100):
            state = BatchState(batch_id=f"b-{i}", partition=0)
            w.messages(Step(state=state, note="ok", invalid=[bad(2 * i), bad(2 * i + 1)]))
        other = InvalidRecord("missing_authorizer_unique_id", "no id", "{}", "e-x")
        w.messages(Step(state=BatchState(batch_id="b-x", partition=0), note="ok", invalid=[other]))
    lines = [e for e in logs if e["event"] == "record_dead_lettered"]
    assert [e["log_level"] for e in lines] == ["warning"] + ["debug"] * 99 + ["warning"]
    assert lines[0]["batch_id"] == "b-0" and lines[0]["suppressed"] == 0
    assert lines[-1]["detail"] == "no id" and lines[-1]["reasons"] == {
        "missing_authorizer_unique_id": 1
    }
    assert api_invalid(w, "not_an_object") == 200


def test_batches_not_found_yet_are_one_info_a_minute() -> None:
    w = writer()
    with structlog.testing.capture_logs() as logs:
        for i in range(50):
            state = BatchState(batch_id=f"b-{i}", partition=0, not_found_since=0.0)
            state.last_poll_at = 30.0
            w.poll_failed(
                Step(state=state, note="failed"), ApiNotFound("no such batch", status=404)
            )
    assert levels(logs, "batch_not_found_yet") == ["info"] + ["debug"] * 49
    assert all(e["batch_id"] for e in logs)
    sample = w.metrics.registry.get_sample_value
    assert sample("rightfoot_poller_polls_total", {"result": "not_found"}) == 50


# --------------------------------------------------------------------------- the state topic


def newer_summary(batch_id: str) -> tuple[bytes, bytes]:
    key, value = state_records(BatchState(batch_id=batch_id, partition=0))[-1]
    doc = json.loads(value or b"")
    doc["v"] = 99
    return key, json.dumps(doc).encode()


async def test_batches_written_by_a_newer_version_are_one_warning_a_restore(
    state_topic: Any,  # noqa: F811
) -> None:
    """After a rollback: one WARNING for the partition, with the count and a few IDs, not
    an ERROR per batch; each is still counted and left unreadable."""
    fine = list(state_records(BatchState(batch_id="fine", partition=0)))
    state_topic.records = [*fine, *(newer_summary(f"new-{i}") for i in range(40))]
    o = owner()
    try:
        with structlog.testing.capture_logs() as logs:
            await o.acquire([0])
        assert sorted(o.tracker.workers[0].batches) == ["fine"]
        assert len(o.tracker.workers[0].unreadable) == 40
        sample = o.metrics.registry.get_sample_value
        labels = {"source": "state_topic", "reason": "unknown_version"}
        assert sample("rightfoot_poller_invalid_input_total", labels) == 40
        assert sample("rightfoot_poller_batches_unreadable") == 40
        lines = [e for e in logs if e["event"] == "state_unreadable"]
        [warning] = [e for e in lines if e["log_level"] != "debug"]
        assert warning["log_level"] == "warning" and warning["count"] == 40
        assert warning["batch_ids"] == [f"new-{i}" for i in range(5)]
        assert warning["batch_id"] == "new-0" and "newer" in warning["error"]
        assert len(lines) == 41
    finally:
        await o.release_all(1.0)


# --------------------------------------------------------------------------- the tracker


async def test_requests_for_unreadable_batches_are_one_warning_a_minute() -> None:
    tracker = runner_of(1)
    worker = PartitionWorker(
        partition=0,
        publisher=HeldCommitter(),
        unreadable={f"b-{i}": "state version 99 is newer" for i in range(30)},
    )
    tracker.add_worker(worker)
    with structlog.testing.capture_logs() as logs:
        for i in range(30):
            await tracker.handle_request(worker, TrackingRequest(batch_id=f"b-{i}"), i)
    assert levels(logs, "request_for_unreadable_batch") == ["warning"] + ["debug"] * 29
    labels = {"action": "track", "result": "unreadable"}
    sample = tracker.metrics.registry.get_sample_value
    assert sample("rightfoot_poller_tracking_requests_total", labels) == 30


async def test_fingerprint_reads_failing_while_kafka_is_down_are_one_warning_a_minute() -> None:
    tracker = runner_of(1)
    worker = PartitionWorker(partition=0, publisher=HeldCommitter())
    tracker.add_worker(worker)

    async def down(_partition: int, _batch_id: str) -> BatchState | None:
        raise KafkaConnectionError("the broker is down")

    tracker.load_batch = down
    batches = [BatchState(batch_id=f"b-{i}", partition=0, seen_loaded=False) for i in range(20)]
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):  # three rounds of retries
            for b in batches:
                worker.batches[b.batch_id] = b
                assert await tracker._load_seen(worker, b) is not None
    assert levels(logs, "fingerprints_load_failed") == ["warning"] + ["debug"] * 59
    sample = tracker.metrics.registry.get_sample_value
    assert sample("rightfoot_poller_fingerprint_loads_total", {"outcome": "failed"}) == 60


def test_a_refused_request_names_its_batch_when_it_can_be_read() -> None:
    tracker = runner_of(1)
    with structlog.testing.capture_logs() as logs:
        tracker.read_request(b"b-2", b'{"batch_id":"b-1"}', 0, 1)  # keyed by another batch
        tracker.clock = lambda: 1e9  # past the throttle's minute
        tracker.read_request(b"b-3", b'{"batch_id":"b-3","expected_count":0}', 0, 2)
        tracker.read_request(None, b"{not json", 0, 3)
    assert [e.get("batch_id") for e in logs] == ["b-1", "b-3", None]
    assert invalid_input(tracker, "requests_topic", "invalid_field") == 2


# --------------------------------------------------------------------------- the service


async def test_a_requests_fetch_that_keeps_failing_is_one_warning_a_minute(
    service: PollerService,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service.view.loaded = True
    consumer = RequestsConsumer(service, service.kcfg.requests_topic, [])
    fetches = [0]

    async def failing(**_: Any) -> dict[Any, list[Any]]:
        fetches[0] += 1
        if fetches[0] > 30:
            service._stopping.set()
        raise KafkaConnectionError("the broker is down")

    consumer.getmany = failing  # type: ignore[method-assign]
    service.consumer = consumer
    real_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    async def no_wait(_delay: float, *_: Any) -> None:
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", no_wait)
    with structlog.testing.capture_logs() as logs:
        await asyncio.wait_for(service._consume(), 5)
    assert levels(logs, "requests_consume_failed") == ["warning"] + ["debug"] * 30


# --------------------------------------------------------------------------- the HTTP API


async def test_a_client_that_goes_away_mid_body_is_counted_not_an_error() -> None:
    """The body cut short by the client: counted as a malformed request, one INFO line
    without a traceback; not an ERROR http_handler_failed. (Served as the service serves:
    aiohttp's test server cancels the handler of a lost connection instead.)"""
    boundary, metrics = Boundary(), Metrics()
    api = HttpApi(
        metrics=metrics,
        readiness=boundary.readiness,
        submit=boundary.submit,
        view=boundary,
        admin_token=TOKEN,
        max_body_bytes=1024,
    )
    runner, port = await api.serve("127.0.0.1", 0)
    labels = {"source": "http", "reason": "malformed_http"}
    sample = metrics.registry.get_sample_value
    try:
        with structlog.testing.capture_logs() as logs:
            _, writer_ = await asyncio.open_connection("127.0.0.1", port)
            writer_.write(
                b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: {AUTH['Authorization']}\r\n".encode()
                + b'Content-Length: 500\r\n\r\n{"batch_id": "b-'
            )
            await writer_.drain()
            await asyncio.sleep(0.05)  # the handler is reading the body
            writer_.close()
            for _ in range(100):
                if logs:
                    break
                await asyncio.sleep(0.01)
    finally:
        await runner.cleanup()
    assert [(e["event"], e["log_level"]) for e in logs] == [("http_request_rejected", "info")]
    assert "exc_info" not in logs[0] and "closed the connection" in logs[0]["reason"]
    assert sample("rightfoot_poller_invalid_input_total", labels) == 1
    assert boundary.submitted == []


async def test_a_rejected_post_names_its_batch(http: Http) -> None:  # noqa: F811
    with structlog.testing.capture_logs() as logs:
        body = {"batch_id": "b-7", "expected_count": 0}
        status, _, _ = await http.call("POST", "/v1/batches", body=body, headers=AUTH)
        assert status == 400
        body = {"batch_id": "b-8", "action": "stop"}
        status, _, _ = await http.call("POST", "/v1/batches", body=body, headers=AUTH)
        assert status == 400
    assert [(e["event"], e.get("batch_id")) for e in logs] == [
        ("http_request_rejected", "b-7"),
        ("http_request_rejected", "b-8"),
    ]
    labels = {"source": "http", "reason": "invalid_field"}
    assert http.metrics.registry.get_sample_value("rightfoot_poller_invalid_input_total", labels)
