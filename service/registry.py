"""The schema registry: the event schemas under ``<topic>-value``, and the wire format.

With ``kafka.value_format: json_sr`` each message value is the Confluent wire format: a
zero byte, the schema's id as 4 bytes big-endian, then the event's JSON, unchanged. The
ids come from a registry's Confluent-compatible REST API (Confluent Schema Registry,
Apicurio Registry's ``/apis/ccompat/v7``, …): at start the service registers its
schemas (``schemas/*.schema.json``) under the subjects of its topics, or, with
``schema_registry.auto_register: false``, only looks them up.

The registered schemas are the published ones declared as JSON Schema draft-07 (see
:func:`registry_schema`): Apicurio's compatibility checks cannot read draft 2020-12.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import ssl
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import aiohttp

from service import __version__
from service.api import parse_retry_after
from service.config import KafkaConfig, SchemaRegistryConfig
from service.errors import (
    ConfigError,
    RegistryError,
    RegistryUnauthorized,
    RegistryUnavailable,
    RegistryUnavailableReason,
    SchemaIncompatible,
    SchemaInvalid,
    SchemaNotRegistered,
)
from service.logs import register_secret
from service.pacing import Sleep, backoff_delay

SUBJECT_SUFFIX = "-value"
CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
MAGIC_BYTE = 0
#: What the registered schemas declare (see :func:`registry_schema`).
REGISTRY_DRAFT = "http://json-schema.org/draft-07/schema#"
#: The published schemas: in the package when installed (the wheel carries them), else the
#: repository's ``schemas/`` folder.
_PACKAGED = Path(__file__).resolve().parent / "schemas"
SCHEMA_DIR = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parent.parent / "schemas"
SCHEMA_FILES: dict[str, str] = {
    "balances": "balance-event.schema.json",
    "lifecycle": "batch-event.schema.json",
    "dlq": "dlq-event.schema.json",
}
Compatibility = Literal[
    "NONE", "BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE", "FULL",
    "FULL_TRANSITIVE",
]  # fmt: skip

# Keywords that JSON Schema draft-07 does not know (2019-09 and 2020-12 only): a schema
# using one of them cannot be declared draft-07 without changing what it means.
_NEWER_KEYWORDS = frozenset(
    {
        "$anchor",
        "$defs",
        "$dynamicAnchor",
        "$dynamicRef",
        "$recursiveAnchor",
        "$recursiveRef",
        "$vocabulary",
        "dependentRequired",
        "dependentSchemas",
        "maxContains",
        "minContains",
        "prefixItems",
        "unevaluatedItems",
        "unevaluatedProperties",
    }
)
# Keywords whose value maps names to schemas, and keywords whose value is data.
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "definitions", "$defs"})
_DATA = frozenset({"const", "default", "enum", "examples"})
_MAX_MESSAGE_CHARS = 500


def subject_for(topic: str) -> str:
    """The subject of a topic's values (TopicNameStrategy)."""
    return topic + SUBJECT_SUFFIX


# --------------------------------------------------------------------------- schemas


def _newer_keywords(node: Any, where: str = "#") -> Iterator[str]:
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from _newer_keywords(item, f"{where}/{i}")
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in _NEWER_KEYWORDS:
            yield f"{where}/{key}"
        if key in _DATA:
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                yield from _newer_keywords(sub, f"{where}/{key}/{name}")
        else:
            yield from _newer_keywords(value, f"{where}/{key}")


def registry_schema(published: str) -> str:
    """The text to register for a published schema: the same schema, declared draft-07.

    The published schemas declare draft 2020-12 but use only keywords draft-07 has
    (``if``/``then``, ``const``, ``propertyNames``, ``examples``…), so they mean the same
    under either. Apicurio Registry checks compatibility with a draft-07 library and
    answers a 2020-12 schema with HTTP 500 ("could not determine version") as soon as a
    subject has a compatibility rule; confluent-kafka's deserializer validates either.
    The text is compact and deterministic, so registering it again finds the same id.

    Raises ValueError if the schema uses a keyword draft-07 does not have.
    """
    doc = json.loads(published)
    if not isinstance(doc, dict):
        raise ValueError("a schema must be a JSON object")
    newer = list(_newer_keywords(doc))
    if newer:
        raise ValueError(f"keywords draft-07 does not have, at {', '.join(newer)}")
    doc["$schema"] = REGISTRY_DRAFT
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class TopicSchema:
    """The schema of one topic's values, as registered."""

    topic: str
    schema: str

    @property
    def subject(self) -> str:
        return subject_for(self.topic)


def event_schemas(kafka: KafkaConfig, schema_dir: Path = SCHEMA_DIR) -> list[TopicSchema]:
    """The schemas of the topics the service writes events to: balances, lifecycle, DLQ."""
    topics = {
        "balances": kafka.balances_topic,
        "lifecycle": kafka.batch_events_topic,
        "dlq": kafka.dlq_topic,
    }
    found = []
    for kind, name in SCHEMA_FILES.items():
        path = schema_dir / name
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"schemas: cannot read {path}: {exc.strerror}") from None
        try:
            found.append(TopicSchema(topics[kind], registry_schema(text)))
        except ValueError as exc:
            raise ConfigError(f"schemas: {path} cannot be registered: {exc}") from None
    return found


# --------------------------------------------------------------------------- client


class RegistryClient:
    """A small client for the Confluent-compatible REST API of a schema registry.

    Use as ``async with RegistryClient(cfg) as client:``, or ``start()`` then ``close()``.
    Every failure raises a :class:`~service.errors.RegistryError`: unreachable, timed out,
    TLS, 408 or 5xx → ``RegistryUnavailable`` (retryable), 429 and 503 as
    :class:`RegistryThrottled` with their Retry-After; 401/403 → ``RegistryUnauthorized``;
    409 → ``SchemaIncompatible``; 422 → ``SchemaInvalid``; a lookup that finds nothing →
    ``SchemaNotRegistered``.
    """

    def __init__(self, cfg: SchemaRegistryConfig, *, instance_id: str = "-") -> None:
        if not cfg.url:
            raise ConfigError("schema_registry.url: required to talk to a schema registry")
        self.cfg = cfg
        self.base = cfg.url.rstrip("/")
        self.user_agent = f"rightfoot-poller/{__version__} ({instance_id})"
        self._session: aiohttp.ClientSession | None = None

    def credentials(self) -> str | None:
        """The credentials of HTTP basic auth (``basic_credentials``) when a username and
        a password are configured: a secret, as the password is."""
        if self.cfg.username and self.cfg.password is not None:
            return basic_credentials(self.cfg.username, self.cfg.password.get_secret_value())
        return None

    def ssl_context(self) -> ssl.SSLContext:
        """Verifies the registry against ``ssl_cafile`` when given, else the system CAs."""
        cfg = self.cfg
        try:
            ctx = ssl.create_default_context(cafile=str(cfg.ssl_cafile) if cfg.ssl_cafile else None)
            if cfg.ssl_certfile is not None and cfg.ssl_keyfile is not None:
                ctx.load_cert_chain(str(cfg.ssl_certfile), str(cfg.ssl_keyfile))
        except OSError as exc:  # ssl.SSLError is an OSError
            raise ConfigError(
                "schema_registry.ssl_cafile / ssl_certfile / ssl_keyfile: cannot load the TLS "
                f"files: {exc.strerror or exc}"
            ) from None
        return ctx

    async def start(self) -> None:
        if self._session is not None:
            return
        headers = {"User-Agent": self.user_agent, "Accept": f"{CONTENT_TYPE}, application/json"}
        credentials = self.credentials()
        if credentials is not None:
            # The header is made of the password: it is redacted from log lines as the
            # password is (neither is logged, but a library's line might show a header).
            register_secret(credentials)
            headers["Authorization"] = "Basic " + credentials
        ssl_arg: ssl.SSLContext | bool = (
            self.ssl_context() if self.base.startswith("https:") else False
        )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_arg, limit=4),
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
            headers=headers,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> RegistryClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ the API

    async def register(self, subject: str, schema: str) -> int:
        """Register a JSON Schema under ``subject``; its id (the same id if already there)."""
        body = await self._request(
            "POST",
            f"/subjects/{quote(subject, safe='')}/versions",
            subject,
            {"schemaType": "JSON", "schema": schema},
        )
        return _schema_id(body, subject)

    async def lookup(self, subject: str, schema: str) -> int:
        """The id of ``schema`` as registered under ``subject``; SchemaNotRegistered if not."""
        body = await self._request(
            "POST",
            f"/subjects/{quote(subject, safe='')}",
            subject,
            {"schemaType": "JSON", "schema": schema},
            lookup=True,
        )
        return _schema_id(body, subject)

    async def schema_id(self, subject: str, schema: str) -> int:
        """Register or, with ``auto_register: false``, look up: the id to write."""
        if self.cfg.auto_register:
            return await self.register(subject, schema)
        return await self.lookup(subject, schema)

    async def schema_ids(self, schemas: Iterable[TopicSchema]) -> dict[str, int]:
        """The id of each topic's schema (topic → id), in order; the first failure raises."""
        return {s.topic: await self.schema_id(s.subject, s.schema) for s in schemas}

    async def set_compatibility(self, subject: str, level: Compatibility) -> None:
        """Set a subject's compatibility rule (``PUT /config/{subject}``)."""
        await self._request(
            "PUT", f"/config/{quote(subject, safe='')}", subject, {"compatibility": level}
        )

    # ------------------------------------------------------------------ transport

    async def _request(
        self,
        method: str,
        path: str,
        subject: str | None,
        payload: Mapping[str, object],
        *,
        lookup: bool = False,
    ) -> Any:
        if self._session is None:
            raise RuntimeError("RegistryClient.start() must be awaited first")
        url = self.base + path
        where = f"schema registry {self.base}"
        try:
            async with self._session.request(
                method, url, json=payload, headers={"Content-Type": CONTENT_TYPE}
            ) as resp:
                text = await resp.text(errors="replace")
                status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        except aiohttp.ClientConnectorCertificateError as exc:
            raise RegistryUnavailable(
                "tls",
                f"{where}: its TLS certificate is not trusted ({exc.certificate_error}); "
                "check schema_registry.ssl_cafile",
                subject=subject,
            ) from None
        except aiohttp.ClientSSLError as exc:
            raise RegistryUnavailable(
                "tls", f"{where}: TLS handshake failed: {exc}", subject=subject
            ) from None
        except TimeoutError:
            raise RegistryUnavailable(
                "timeout",
                f"{where}: no answer within schema_registry.timeout_s={self.cfg.timeout_s:g}s",
                subject=subject,
            ) from None
        except aiohttp.ClientError as exc:
            raise RegistryUnavailable(
                "unreachable", f"{where} is unreachable: {exc}", subject=subject
            ) from None
        body = _json_or_none(text)
        if 200 <= status < 300:
            return body
        raise _error(status, body, text, subject, where, lookup=lookup, retry_after=retry_after)


class RegistryThrottled(RegistryUnavailable):
    """429 (too many requests) or 503 (unavailable for now): the registry asks to be left
    alone a while, ``retry_after_s`` seconds if it sent a Retry-After (else None).

    Its ``reason`` is ``throttled`` for a 429, ``server_error`` for a 503 (as any 5xx).
    """

    def __init__(
        self,
        message: str,
        *,
        subject: str | None = None,
        status: int | None = None,
        error_code: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        reason: RegistryUnavailableReason = "throttled" if status == 429 else "server_error"
        super().__init__(reason, message, subject=subject, status=status, error_code=error_code)
        self.retry_after_s = retry_after_s


def retry_delay(
    exc: RegistryUnavailable, failures: int, cfg: SchemaRegistryConfig, rng: random.Random
) -> float:
    """The wait before trying again after ``failures`` failed attempts, the last ``exc``.

    Backoff with jitter (``schema_registry.backoff_base_s`` … ``backoff_max_s``); after a
    429 or 503 that sent a Retry-After, at least that long, but never longer than
    ``backoff_max_s``: a registry asking for an hour is asked again sooner, and answers
    with another wait if it still means it.
    """
    delay = backoff_delay(failures, cfg.backoff_base_s, cfg.backoff_max_s, rng)
    if isinstance(exc, RegistryThrottled) and exc.retry_after_s is not None:
        delay = max(delay, min(exc.retry_after_s, cfg.backoff_max_s))
    return delay


#: ``on_retry(error, failures, delay_s)``: called before each wait (logs, readiness, metrics).
OnRetry = Callable[[RegistryUnavailable, int, float], None]


async def schema_ids_when_available(
    client: RegistryClient,
    schemas: Iterable[TopicSchema],
    *,
    rng: random.Random | None = None,
    sleep: Sleep = asyncio.sleep,
    on_retry: OnRetry | None = None,
) -> dict[str, int]:
    """:meth:`RegistryClient.schema_ids`, tried again for as long as the registry is
    unavailable (unreachable, timed out, TLS, 5xx, 429), with exponential backoff and jitter
    (``schema_registry.backoff_base_s`` … ``backoff_max_s``), at least a 429's or 503's
    Retry-After up to ``backoff_max_s`` (:func:`retry_delay`); cancel the task to give up.
    Any other error (credentials refused, incompatible or invalid schema, not registered)
    raises at once: trying again would not change the answer.
    """
    schemas = list(schemas)
    rng = rng or random.Random()
    failures = 0
    while True:
        try:
            return await client.schema_ids(schemas)
        except RegistryUnavailable as exc:
            failures += 1
            delay = retry_delay(exc, failures, client.cfg, rng)
            if on_retry is not None:
                on_retry(exc, failures, delay)
            await sleep(delay)


def basic_credentials(username: str, password: str) -> str:
    """The credentials of HTTP basic auth: ``user:password`` in base64 (UTF-8, RFC 7617)."""
    return base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def basic_auth(username: str, password: str) -> str:
    """The ``Authorization`` header value of HTTP basic auth (UTF-8, RFC 7617)."""
    return "Basic " + basic_credentials(username, password)


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _schema_id(body: Any, subject: str) -> int:
    sid = body.get("id") if isinstance(body, dict) else None
    if type(sid) is not int or not 0 <= sid < 2**31:
        raise RegistryError(
            f"schema registry: no schema id in its answer for subject {subject!r}",
            subject=subject,
        )
    return sid


def _error(
    status: int,
    body: Any,
    text: str,
    subject: str | None,
    where: str,
    *,
    lookup: bool,
    retry_after: float | None = None,
) -> RegistryError:
    """The exception for an error answer (Confluent API: ``{"error_code", "message"}``)."""
    code = body.get("error_code") if isinstance(body, dict) else None
    error_code = code if type(code) is int else None
    message = body.get("message") if isinstance(body, dict) else None
    if not isinstance(message, str) or not message:
        message = text.strip() or "(no message)"
    if len(message) > _MAX_MESSAGE_CHARS:
        message = message[:_MAX_MESSAGE_CHARS] + "…"
    about = f" for subject {subject!r}" if subject else ""
    detail = f"{where} answered HTTP {status}{about}: {message}"
    kw: dict[str, Any] = {"subject": subject, "status": status, "error_code": error_code}
    if status in (401, 403):
        return RegistryUnauthorized(
            f"{detail} (check schema_registry.username and the password, "
            "RFP_SCHEMA_REGISTRY__PASSWORD)",
            **kw,
        )
    if status == 409:
        return SchemaIncompatible(
            f"schema for subject {subject!r} is incompatible with the subject's registered "
            f"versions under its compatibility rule: {message}",
            **kw,
        )
    if status == 404 and lookup:
        return SchemaNotRegistered(
            f"subject {subject!r} does not hold this schema, and schema_registry.auto_register "
            f"is false: register it first ({where}: {message})",
            **kw,
        )
    if status == 404:
        return RegistryError(
            f"{detail} (check schema_registry.url: the root of a Confluent-compatible API, "
            "for Apicurio Registry ending in /apis/ccompat/v7)",
            **kw,
        )
    if status == 422:
        return SchemaInvalid(f"{where} refused the schema{about}: {message}", **kw)
    if status in (429, 503):
        return RegistryThrottled(detail, **kw, retry_after_s=retry_after)
    if status >= 500 or status == 408:
        return RegistryUnavailable("server_error", detail, **kw)
    return RegistryError(detail, **kw)


# --------------------------------------------------------------------------- wire format
