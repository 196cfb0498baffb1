"""The wire format of event values, and the schema ids it needs, fetched at start.

``kafka.value_format: json`` writes each event's JSON as it is. ``json_sr`` writes the
Confluent wire format: a zero byte, the schema's id as 4 bytes big-endian, then the
same JSON. The ids come from the schema registry (service.registry) before the
service connects to Kafka; until they do, ``/readyz`` says why not.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from service.config import Settings
from service.errors import RegistryError, RegistryUnavailable
from service.logs import Throttle, redact
from service.registry import (
    MAGIC_BYTE,
    RegistryClient,
    event_schemas,
    schema_ids_when_available,
)

log = structlog.get_logger(__name__)


async def frames_when_available(
    settings: Settings,
    *,
    stopping: asyncio.Event,
    on_problem: Callable[[dict[str, str] | None], None],
) -> dict[str, bytes] | None:
    """The wire-format frame of each event topic, from the registry; None if stopped first.

    An unavailable registry is tried again with backoff: unreachable, timing out, failing
    (5xx) or throttling (429, reason ``throttled``; a 429's or 503's Retry-After is waited,
    up to ``schema_registry.backoff_max_s``), which is expected to pass, is one WARNING at
    the first attempt and then at most one a minute a reason (like Kafka at start); a TLS
    failure, which no retry fixes, one ERROR line per attempt. A refusal (credentials, an
    incompatible or invalid schema, a schema not registered while ``auto_register`` is
    off) gives one ERROR line naming the subject and is tried again every
    ``schema_registry.backoff_max_s``, in case it is fixed. ``on_problem`` gets what
    /readyz shows, then None once it is solved.
    """
    cfg = settings.schema_registry
    secrets = settings.secrets()

    waits = Throttle(every_s=60.0)

    def unavailable(exc: RegistryUnavailable, failures: int, delay: float) -> None:
        message = redact(str(exc), secrets)
        on_problem({"reason": exc.reason, "error": message})
        fields = {
            "reason": exc.reason,
            "error": message,
            "attempt": failures,
            "retry_in_s": round(delay, 1),
        }
        if exc.reason == "tls":
            log.error("schema_registry_unavailable", **fields)
        elif (held := waits.admit(exc.reason)) is None:
            log.debug("schema_registry_unavailable", **fields)
        else:
            log.warning("schema_registry_unavailable", **fields, attempts_held=held)

    schemas = event_schemas(settings.kafka)
    async with RegistryClient(cfg, instance_id=settings.instance_id) as client:
        credentials = client.credentials()
        if credentials is not None:
            secrets.append(credentials)
        while not stopping.is_set():
            try:
                ids = await schema_ids_when_available(client, schemas, on_retry=unavailable)
            except RegistryError as exc:
                message = redact(str(exc), secrets)
                on_problem({"reason": type(exc).__name__, "error": message})
                log.error(
                    "schema_registry_refused",
                    subject=exc.subject,
                    error=message,
                    retry_in_s=cfg.backoff_max_s,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), cfg.backoff_max_s)
                continue
            on_problem(None)
            log.info("schema_registry_ready", schema_ids=ids)
            return {topic: frame(schema_id) for topic, schema_id in ids.items()}
    return None


def frame(schema_id: int) -> bytes:
    """The 5 bytes before the JSON in the Confluent wire format."""
    if not 0 <= schema_id < 2**31:
        raise ValueError(f"schema id out of range: {schema_id}")
    return bytes((MAGIC_BYTE,)) + schema_id.to_bytes(4, "big")


def unframe(value: bytes) -> tuple[int, bytes]:
    """Schema id and JSON of a value in the Confluent wire format; ValueError if it is not."""
    if len(value) < 5 or value[0] != MAGIC_BYTE:
        raise ValueError("not the Confluent wire format (no zero magic byte and schema id)")
    return int.from_bytes(value[1:5], "big"), value[5:]
