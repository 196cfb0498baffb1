"""structlog setup: one JSON object per line, ``instance_id`` on every line, secrets redacted.

The libraries' own log records (aiokafka, aiohttp) go through the same
processors, so they are JSON and redacted too.
"""

from __future__ import annotations

import json
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

    def log(self, kind: str, logger: Any, level: str, event: str, **fields: Any) -> None:
        """One line ``event`` of ``kind`` through ``logger``: at ``level`` ("info",
        "warning", "exception"...), with ``suppressed``, when :meth:`admit` lets it
        through; at DEBUG when it is held back."""
        held = self.admit(kind)
        if held is None:
            logger.debug(event, **fields)
        else:
            getattr(logger, level)(event, **fields, suppressed=held)


def secret_forms(secret: str) -> set[str]:
    """``secret`` as text may show it: as written; as ``repr()`` writes it inside a string
    (backslashes doubled, quotes and unprintable characters escaped), once or twice over
    (the repr of an exception whose message holds a repr); and as JSON writes it.

    A ``'`` is escaped in a repr quoted with ``'``, not in one quoted with ``"``; which
    quote a repr uses depends on the whole text around the secret, so both forms count.
    """
    forms = {secret}
    for _ in range(2):
        for form in list(forms):
            quoted = repr(form)
            inner = quoted[1:-1]
            forms.add(inner)
            if quoted.startswith('"'):  # it has a ' and no ": in a '-quoted repr, \'
                forms.add(inner.replace("'", "\\'"))
    forms.add(json.dumps(secret)[1:-1])
    forms.add(json.dumps(secret, ensure_ascii=False)[1:-1])
    return forms


def _all_forms(secrets: Iterable[str]) -> list[str]:
    """Every form of every secret (``secret_forms``), the longer first: a secret that
    contains another is replaced whole, not left half shown."""
    forms: set[str] = set()
    for secret in secrets:
        forms |= secret_forms(secret)
    return sorted(forms, key=len, reverse=True)


def _replace(text: str, forms: Iterable[str]) -> str:
    for form in forms:
        if form in text:
            text = text.replace(form, REDACTED)
    return text


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret in it replaced by ``[redacted]``, in every form that
    text may show it (``secret_forms``: escaped by ``repr()`` or JSON too).

    The one redaction of the service, for log lines and the error messages it prints.
    Empty secrets are ignored; longer ones go first, so that a secret containing
    another is not left half shown.
    """
    return _replace(text, _all_forms(s for s in secrets if s))


class Redactor:
    """Replaces every known secret value, wherever it appears in a log line, in every form
    text may show it (``secret_forms``).

    In log lines, secrets shorter than 4 characters are not redacted, so that a trivial
    value cannot mangle every line. A secret read later (a rotated key or password, read
    again from its file) is added with :meth:`add`, or :func:`register_secret`.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = {s for s in secrets if len(s) >= 4}
        self.forms = _all_forms(self._secrets)

    @property
    def secrets(self) -> frozenset[str]:
        return frozenset(self._secrets)

    def add(self, secret: str | None) -> None:
        """Redact ``secret`` from now on too (kept for good: lines may still show an old
        value). The list of forms is replaced whole, never changed in place, so a line
        being redacted meanwhile uses the one list or the other."""
        if secret is None or len(secret) < 4 or secret in self._secrets:
            return
        self._secrets = self._secrets | {secret}
        self.forms = _all_forms(self._secrets)

    def _clean(self, value: Any, forms: list[str]) -> Any:
        if isinstance(value, str):
            return _replace(value, forms)
        if isinstance(value, dict):
            return {k: self._clean(v, forms) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(v, forms) for v in value]
        if isinstance(value, BaseException):
            return self._clean(repr(value), forms)
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, bytes | bytearray):
            return self._clean(bytes(value).decode("utf-8", "replace"), forms)
        if isinstance(value, set | frozenset):
            return [self._clean(v, forms) for v in value]
        return self._clean(repr(value), forms)  # what the JSON renderer would print, redacted

    def __call__(
        self, _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        forms = self.forms
        if not forms:
            return event_dict
        for key, value in list(event_dict.items()):
            event_dict[key] = self._clean(value, forms)
        return event_dict


# The redactor of the logging configured last (configure_logging), for register_secret.
_redactor: Redactor | None = None


def register_secret(secret: str | None) -> None:
    """Redact ``secret`` from log lines from now on: a value read after start (a rotated API
    key or password, read again from its file; a header made of a password). Before
    logging is configured there is nothing to add it to (configure_logging is given the
    secrets of the configuration)."""
    if _redactor is not None:
        _redactor.add(secret)


def configure_logging(
    *,
    level: str = "INFO",
    fmt: str = "json",
    instance_id: str | None = None,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    global _redactor
    redactor = _redactor = Redactor(secrets)
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
