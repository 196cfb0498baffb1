"""structlog setup: one JSON object per line, ``instance_id`` on every line, secrets redacted.

The libraries' own log records (aiokafka, aiohttp) go through the same
processors, so they are JSON and redacted too.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, TextIO

import structlog

from service import kafka_logs

REDACTED = "[redacted]"

# One line a kind of failure per this many seconds (see Throttle).
THROTTLE_S = 60.0


class Throttle:
    """At most one line a kind per ``every_s`` seconds: one cause, one line, not thousands.

    An API outage or a network fault makes every batch's poll fail alike, and a replica
    polls thousands of batches: a line for each failure would bury everything else. The
    caller asks ``admit(kind)`` before each line. The answer is how many lines of that
    kind were held back since the last one let through (0 for the first), to be logged
    with it; or None, to hold this one back (the caller logs it at DEBUG instead). The
    metrics count every failure either way.
    """

    def __init__(
        self, every_s: float = THROTTLE_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.every_s = every_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def admit(self, kind: str) -> int | None:
        now = self.clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.every_s:
            self._held[kind] = self._held.get(kind, 0) + 1
            return None
        self._last[kind] = now
        return self._held.pop(kind, 0)


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret in it replaced by ``[redacted]``.

    The one redaction of the service, for log lines and the error messages it prints.
    Empty secrets are ignored; longer ones go first, so that a secret containing
    another is not left half shown.
    """
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


class Redactor:
    """Replaces every known secret value, wherever it appears in a log line.

    In log lines, secrets shorter than 4 characters are not redacted, so that a trivial
    value cannot mangle every line.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return redact(value, self.secrets)
        if isinstance(value, dict):
            return {k: self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(v) for v in value]
        if isinstance(value, BaseException):
            return self._clean(repr(value))
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, bytes | bytearray):
            return self._clean(bytes(value).decode("utf-8", "replace"))
        if isinstance(value, set | frozenset):
            return [self._clean(v) for v in value]
        return self._clean(repr(value))  # what the JSON renderer would print, redacted

    def __call__(
        self, _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if not self.secrets:
            return event_dict
        for key, value in list(event_dict.items()):
            event_dict[key] = self._clean(value)
        return event_dict


def configure_logging(
    *,
    level: str = "INFO",
    fmt: str = "json",
    instance_id: str | None = None,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    redactor = Redactor(secrets)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if instance_id:
        shared.append(_bind_instance(instance_id))
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redactor,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    kafka_logs.install([handler])
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiokafka is chatty at INFO about group membership; keep its warnings.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _bind_instance(instance_id: str) -> Any:
    def processor(
        _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event_dict.setdefault("instance_id", instance_id)
        return event_dict

    return processor
