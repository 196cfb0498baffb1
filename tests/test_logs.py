"""Logs: one JSON object per line, instance_id on every line, secrets never written."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

import service.logs
from service.logs import REDACTED, Throttle, configure_logging, redact

SECRET = "rf_live_9c8b7a6d5e4f3a2b1c0d"
TOKEN = "admin-tok-0f1e2d3c4b5a"


@contextlib.contextmanager
def logs_into(instance_id: str, secrets: list[str]) -> Iterator[io.StringIO]:
    """configure_logging into a buffer; the previous logging setup (the redactor that
    register_secret adds to included) is restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_structlog, saved_redactor = structlog.get_config(), service.logs._redactor
    stream = io.StringIO()
    configure_logging(instance_id=instance_id, secrets=secrets, stream=stream)
    try:
        yield stream
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        structlog.configure(**saved_structlog)
        service.logs._redactor = saved_redactor


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    with logs_into("poller-7", [SECRET, TOKEN]) as stream:
        yield stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    out = []
    for line in text.splitlines():
        doc = json.loads(line)
        assert isinstance(doc, dict), line
        assert doc["instance_id"] == "poller-7"
        out.append(doc)
    return out


def assert_no_secret(stream: io.StringIO) -> None:
    text = stream.getvalue()
    assert SECRET not in text
    assert TOKEN not in text


def test_structlog_lines_are_json_with_instance_and_redacted(output: io.StringIO) -> None:
    log = structlog.get_logger("service.test")
    log.info(f"calling with key {SECRET}")
    log.info("request", authorization=f"Bearer {SECRET}", batch_id="b-1")
    log.warning("nested", detail={"headers": {"Authorization": f"Bearer {TOKEN}"}, "n": 3})
    log.info("in a list", items=["a", f"x{SECRET}y", ("t", SECRET)])
    docs = lines(output)
    assert len(docs) == 4
    assert_no_secret(output)
    assert docs[0]["event"] == f"calling with key {REDACTED}"
    assert docs[1]["authorization"] == f"Bearer {REDACTED}"
    assert docs[1]["batch_id"] == "b-1"
    assert docs[1]["level"] == "info"
    assert docs[2]["detail"] == {"headers": {"Authorization": f"Bearer {REDACTED}"}, "n": 3}
    assert docs[2]["level"] == "warning"
    assert docs[3]["items"][1] == f"x{REDACTED}y"
    for doc in docs:
        assert "timestamp" in doc


def test_structlog_exception_is_redacted(output: io.StringIO) -> None:
    log = structlog.get_logger("service.test")
    try:
        raise RuntimeError(f"the API refused key {SECRET}")
    except RuntimeError:
        log.exception("poll_failed", batch_id="b-2")
    log.error("as a value", error=ValueError(f"token {TOKEN}"))
    docs = lines(output)
    assert len(docs) == 2
    assert_no_secret(output)
    assert "RuntimeError" in docs[0]["exception"]
    assert REDACTED in docs[0]["exception"]
    assert docs[0]["batch_id"] == "b-2"
    assert REDACTED in docs[1]["error"]


def test_stdlib_lines_are_json_and_redacted(output: io.StringIO) -> None:
    lib = logging.getLogger("aiohttp.client")
    lib.warning("connecting with %s", SECRET)
    lib.error(f"header Authorization: Bearer {TOKEN}")
    try:
        raise ConnectionError(f"refused for {SECRET}")
    except ConnectionError:
        lib.exception("request failed")
    docs = lines(output)
    assert len(docs) == 3
    assert_no_secret(output)
    assert docs[0]["event"] == f"connecting with {REDACTED}"
    assert docs[0]["logger"] == "aiohttp.client"
    assert docs[1]["level"] == "error"
    assert "ConnectionError" in docs[2]["exception"]


def test_levels_below_the_configured_one_are_dropped(output: io.StringIO) -> None:
    structlog.get_logger("service.test").debug("hidden", secret=SECRET)
    logging.getLogger("x").debug("hidden too")
    structlog.get_logger("service.test").info("shown")
    assert [d["event"] for d in lines(output)] == ["shown"]


def test_short_strings_are_not_treated_as_secrets() -> None:
    with logs_into("p", ["", "ab", SECRET]) as stream:
        structlog.get_logger("t").info("abc table", key=SECRET)
        (doc,) = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert doc["event"] == "abc table"
        assert doc["key"] == REDACTED


class Holder:
    def __repr__(self) -> str:
        return f"Holder(key={SECRET})"


@pytest.mark.parametrize(
    "make",
    [lambda: SECRET.encode(), lambda: {SECRET}, Holder],
    ids=["bytes", "set", "object"],
)
def test_secret_inside_other_values_is_redacted(
    output: io.StringIO, make: Callable[[], object]
) -> None:
    structlog.get_logger("service.test").info("value", value=make())
    lines(output)
    assert_no_secret(output)


def test_redact_replaces_every_secret_everywhere() -> None:
    text = f"key={SECRET}; again {SECRET}; token {TOKEN}."
    assert redact(text, [SECRET, TOKEN]) == f"key={REDACTED}; again {REDACTED}; token {REDACTED}."
    assert redact(text, []) == text
    assert redact("nothing to hide", [SECRET]) == "nothing to hide"


def test_redact_ignores_empty_secrets() -> None:
    assert redact("plain text", ["", SECRET]) == "plain text"


def test_redact_replaces_the_longer_of_two_overlapping_secrets_whole() -> None:
    """A secret that contains another (a rotated key with a common prefix, say)."""
    short, long = "sk-live-1234", "sk-live-1234-extra-5678"
    for secrets in ([short, long], [long, short]):
        assert redact(f"key {long}", secrets) == f"key {REDACTED}"
        assert redact(f"key {short}", secrets) == f"key {REDACTED}"


def test_throttle_lets_one_line_a_kind_through_a_window_and_counts_the_rest() -> None:
    now = [100.0]
    throttle = Throttle(every_s=60.0, clock=lambda: now[0])
    assert throttle.admit("ApiServerError:") == 0  # the first line of a kind
    assert [throttle.admit("ApiServerError:") for _ in range(3)] == [None, None, None]
    assert throttle.admit("ApiTransportError:timeout") == 0  # another kind: its own line
    now[0] += 59.9
    assert throttle.admit("ApiServerError:") is None
    now[0] += 0.1
    assert throttle.admit("ApiServerError:") == 4  # a minute on: the line, and how many held
    assert throttle.admit("ApiServerError:") is None
    now[0] += 600
    assert throttle.admit("ApiTransportError:timeout") == 0
