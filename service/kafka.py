"""Where events are published: Kafka clients, topics, and per-partition commits.

Each requests-topic partition this replica owns has a ``PartitionPublisher``.
With ``exactly_once`` it owns a transactional producer whose id is derived from
the partition, so a new owner of the partition fences the old one; every unit
of work (a poll's events, lifecycle events and state update, plus the
requests-topic offset) commits in one transaction. Units queued while a
transaction is running are committed together in the next one.
With ``at_least_once`` a shared idempotent producer sends the events, then the
state, then the consumer commits the requests offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    AuthenticationMethodNotSupported,
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    IllegalSaslStateError,
    KafkaError,
    ProducerFenced,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.partitioner import murmur2

from service.config import KafkaConfig
from service.errors import ConnectionErrorReason, PollerError

# Still importable from here while callers move to service.errors.
from service.errors import KafkaConnectionProblem as KafkaConnectionProblem
from service.errors import PartitionLost as PartitionLost
from service.errors import PublishFailed as PublishFailed
from service.events import BalanceEvents, OutMessage, Publishable, message_count
from service.metrics import Metrics
from service.state import MAX_MESSAGE_BYTES

log = structlog.get_logger(__name__)


def canonical_partition(batch_id: str, partitions: int) -> int:
    """The requests/state partition of a batch: Kafka's default murmur2 partitioning."""
    hashed: int = murmur2(batch_id.encode())
    return (hashed & 0x7FFFFFFF) % partitions


def sasl_password(cfg: KafkaConfig) -> str | None:
    """The SASL password in effect.

    A mounted password file (``RFP_KAFKA__SASL_PASSWORD_FILE``) is read again each time
    clients are made, so a rotated Secret is picked up by the next connection attempt
    without a restart. ``RFP_KAFKA__SASL_PASSWORD`` takes precedence, as at start.
    """
    configured = cfg.sasl_password.get_secret_value() if cfg.sasl_password else None
    path = os.environ.get("RFP_KAFKA__SASL_PASSWORD_FILE")
    if path and not os.environ.get("RFP_KAFKA__SASL_PASSWORD"):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            return Path(path).read_text(encoding="utf-8").strip() or configured
    return configured


def client_args(cfg: KafkaConfig, client_id: str) -> dict[str, Any]:
    """Connection and security settings shared by every Kafka client.

    TLS (``SSL``, ``SASL_SSL``) always verifies the brokers' certificates and host names:
    against ``ssl_cafile`` when given, else the system CAs. ``ssl_certfile``/``ssl_keyfile``
    are the client certificate for mutual TLS.
    """
    args: dict[str, Any] = {
        "bootstrap_servers": cfg.bootstrap_servers,
        "client_id": client_id,
        "security_protocol": cfg.security_protocol,
    }
    if cfg.security_protocol in ("SSL", "SASL_SSL"):
        try:
            args["ssl_context"] = create_ssl_context(
                cafile=str(cfg.ssl_cafile) if cfg.ssl_cafile else None,
                certfile=str(cfg.ssl_certfile) if cfg.ssl_certfile else None,
                keyfile=str(cfg.ssl_keyfile) if cfg.ssl_keyfile else None,
            )
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise KafkaConnectionProblem(
                "tls",
                "cannot load the TLS files (kafka.ssl_cafile / ssl_certfile / ssl_keyfile): "
                f"{_describe_tls(exc)}",
            ) from None
    if cfg.security_protocol.startswith("SASL"):
        args["sasl_mechanism"] = cfg.sasl_mechanism
        args["sasl_plain_username"] = cfg.sasl_username
        args["sasl_plain_password"] = sasl_password(cfg)
    return args


_AUTHENTICATION_ERRORS = (
    SaslAuthenticationFailed,
    AuthenticationFailedError,
    AuthenticationMethodNotSupported,
    UnsupportedSaslMechanismError,
    IllegalSaslStateError,
)
_AUTHORIZATION_ERRORS = (
    TopicAuthorizationFailedError,
    GroupAuthorizationFailedError,
    ClusterAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _describe_tls(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return f"{type(exc).__name__}: {exc}"


def classify_connection_error(exc: BaseException) -> ConnectionErrorReason:
    """Why a Kafka client could not connect or was refused."""
    chain = _chain(exc)
    if any(isinstance(e, KafkaConnectionProblem) for e in chain):
        return next(e.reason for e in chain if isinstance(e, KafkaConnectionProblem))
    if any(isinstance(e, _AUTHENTICATION_ERRORS) for e in chain):
        return "authentication"
    if any(isinstance(e, _AUTHORIZATION_ERRORS) for e in chain):
        return "authorization"
    if any(isinstance(e, ssl.SSLError) for e in chain):
        return "tls"
    return "unreachable"


def _problem(cfg: KafkaConfig, address: str, exc: BaseException) -> KafkaConnectionProblem:
    reason = classify_connection_error(exc)
    tls = next((e for e in _chain(exc) if isinstance(e, ssl.SSLError)), None)
    if reason == "authentication":
        return KafkaConnectionProblem(
            reason,
            f"Kafka authentication failed at {address} for user {cfg.sasl_username!r} "
            f"({cfg.sasl_mechanism}): {exc}; check kafka.sasl_username and the password "
            "(RFP_KAFKA__SASL_PASSWORD or the file named by RFP_KAFKA__SASL_PASSWORD_FILE)",
        )
    if reason == "tls" and tls is not None:
        hint = (
            "check kafka.ssl_cafile (the CA that signed the brokers' certificates)"
            if isinstance(tls, ssl.SSLCertVerificationError)
            else "check kafka.security_protocol and, for mutual TLS, "
            "kafka.ssl_certfile / ssl_keyfile"
        )
        return KafkaConnectionProblem(
            reason, f"TLS to the Kafka broker {address} failed: {_describe_tls(tls)}; {hint}"
        )
    detail = str(exc) or type(exc).__name__
    return KafkaConnectionProblem(
        reason, f"cannot connect to the Kafka broker {address}: {type(exc).__name__}: {detail}"
    )


def _bootstrap_addresses(bootstrap: str) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for item in bootstrap.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host:
            host, port = port, "9092"
        with contextlib.suppress(ValueError):
            out.append((host.strip("[]"), int(port)))
    return out


async def probe_brokers(cfg: KafkaConfig, client_id: str, timeout_s: float = 10.0) -> None:
    """Open one connection to a bootstrap broker, with TLS and SASL as configured.

    aiokafka reports a refused password or an untrusted certificate only as
    "Unable to bootstrap"; this probe finds the real cause first. Raises
    KafkaConnectionProblem (the cause of the first broker tried) when none accepts us.
    """
    args = client_args(cfg, client_id)
    first: KafkaConnectionProblem | None = None
    for host, port in _bootstrap_addresses(cfg.bootstrap_servers):
        try:
            conn = await create_conn(
                host,
                port,
                client_id=client_id,
                request_timeout_ms=int(timeout_s * 1000),
                ssl_context=args.get("ssl_context"),
                security_protocol=cfg.security_protocol,
                sasl_mechanism=args.get("sasl_mechanism"),
                sasl_plain_username=args.get("sasl_plain_username"),
                sasl_plain_password=args.get("sasl_plain_password"),
            )
        except (OSError, TimeoutError, KafkaError) as exc:
            first = first or _problem(cfg, f"{host}:{port}", exc)
            continue
        conn.close()
        return
    raise first or KafkaConnectionProblem(
        "unreachable", f"kafka.bootstrap_servers names no broker: {cfg.bootstrap_servers!r}"
    )


def make_producer(
    cfg: KafkaConfig, client_id: str, transactional_id: str | None = None
) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        **client_args(cfg, client_id),
        enable_idempotence=True,
        acks="all",
        linger_ms=2,
        max_batch_size=256 * 1024,
        max_request_size=MAX_MESSAGE_BYTES,
        transactional_id=transactional_id,
        transaction_timeout_ms=cfg.transaction_timeout_ms,
    )


async def ensure_topics(cfg: KafkaConfig, client_id: str) -> int:
    """Create missing topics; refuse a state topic not co-partitioned with the requests topic.

    Returns the partition count of the requests topic.
    """
    admin = AIOKafkaAdminClient(**client_args(cfg, client_id))
    await admin.start()
    try:
        rf = cfg.replication_factor
        if rf == -1:
            cluster = await admin.describe_cluster()
            rf = max(1, min(3, len(cluster.get("brokers", []))))
        wanted = [
            NewTopic(cfg.requests_topic, cfg.partitions, rf),
            NewTopic(
                cfg.state_topic,
                cfg.partitions,
                rf,
                topic_configs={
                    "cleanup.policy": "compact",
                    # What the producer may send (max_request_size), with room for the
                    # record batch's own header.
                    "max.message.bytes": str(MAX_MESSAGE_BYTES + 1024),
                },
            ),
            NewTopic(cfg.balances_topic, cfg.partitions, rf),
            NewTopic(cfg.batch_events_topic, cfg.partitions, rf),
            NewTopic(cfg.dlq_topic, 1 if cfg.partitions < 3 else 3, rf),
        ]
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t.name not in existing]
        if missing and cfg.create_topics:
            for topic in missing:
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics([topic])
                log.info("topic_created", topic=topic.name, partitions=topic.num_partitions)
        elif missing:
            names = ", ".join(t.name for t in missing)
            raise PollerError(f"kafka: missing topics ({names}) and kafka.create_topics is false")
        counts = await _partition_counts(admin, [cfg.requests_topic, cfg.state_topic])
        if counts.get(cfg.requests_topic) != counts.get(cfg.state_topic):
            raise PollerError(
                f"kafka: {cfg.state_topic} has {counts.get(cfg.state_topic)} partitions but "
                f"{cfg.requests_topic} has {counts.get(cfg.requests_topic)}; they must match"
            )
        return counts[cfg.requests_topic]
    finally:
        await admin.close()


async def _partition_counts(
    admin: AIOKafkaAdminClient, topics: list[str], timeout_s: float = 10.0
) -> dict[str, int]:
    """Partition count of each topic; a just-created topic may show none for a moment."""
    deadline = time.monotonic() + timeout_s
    while True:
        described = await admin.describe_topics(topics)
        counts = {d["topic"]: len(d["partitions"]) for d in described}
        if all(counts.get(t) for t in topics) or time.monotonic() >= deadline:
            return counts
        await asyncio.sleep(0.2)


async def delivered(futures: list[asyncio.Future[Any]]) -> None:
    """Wait for every delivery future; raise the first failure, as ``gather(*futures)`` would.

    ``gather`` adds a done-callback to every future, one scheduled call per message.
    A produce request settles all the futures of its batch at once, so waiting on
    the first one not yet done leaves the others of its batch done already: one wait
    per batch, then a plain check of each future (which marks its exception retrieved).
    """
    for future in futures:
        if not future.done():
            await asyncio.wait((future,))
    failure: BaseException | None = None
    for future in futures:
        exc = future.exception()  # CancelledError if it was cancelled, as gather raises
        if exc is not None and failure is None:
            failure = exc
    if failure is not None:
        raise failure


@dataclass(slots=True)
class Unit:
    """Messages that commit together, with the requests offset they consume up to."""

    messages: Sequence[Publishable]
    request_offset: int | None
    received_at: float
    size: int  # messages, balance events included
    future: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


OffsetCommitter = Callable[[dict[TopicPartition, int]], Awaitable[None]]


class PartitionPublisher:
    """Commits the units of work of one owned requests partition, in order."""

    MAX_MESSAGES_PER_COMMIT = 5000

    def __init__(
        self,
        *,
        partition: int,
        cfg: KafkaConfig,
        metrics: Metrics,
        producer: AIOKafkaProducer,
        transactional: bool,
        commit_offsets: OffsetCommitter,
        owns_producer: bool = False,
    ) -> None:
        self.partition = partition
        self.owns_producer = owns_producer  # stopped on close (a transactional producer)
        self.cfg = cfg
        self.metrics = metrics
        self.producer = producer
        self.transactional = transactional
        self._commit_offsets = commit_offsets
        self._tp = TopicPartition(cfg.requests_topic, partition)
        self._queue: asyncio.Queue[Unit] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None
        self.on_failure: Callable[[BaseException], None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"publisher-{self.partition}")

    async def publish(
        self, messages: Sequence[Publishable], request_offset: int | None = None
    ) -> None:
        """Queue a unit of work and wait until it is committed; PublishFailed otherwise."""
        if self.failure is not None:
            raise PublishFailed(f"partition {self.partition} publisher failed: {self.failure}")
        unit = Unit(messages, request_offset, time.monotonic(), message_count(messages))
        self.metrics.records_in_flight.inc(unit.size)
        self._queue.put_nowait(unit)
        try:
            await asyncio.shield(unit.future)
        finally:
            if not unit.future.done():
                unit.future.cancel()

    async def close(self, timeout: float) -> None:
        """Commit what is queued (within ``timeout``), then stop."""
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained(), timeout)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail_pending(PublishFailed("publisher closed"))
        if self.owns_producer:
            with contextlib.suppress(Exception):
                await self.producer.stop()

    async def _drained(self) -> None:
        await self._queue.join()

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            units = [first]
            size = first.size
            while not self._queue.empty() and size < self.MAX_MESSAGES_PER_COMMIT:
                unit = self._queue.get_nowait()
                units.append(unit)
                size += unit.size
            try:
                await self._commit(units)
            except asyncio.CancelledError:
                self._settle(units, PublishFailed("publisher stopped"))
                raise
            except BaseException as exc:
                self._fail(units, exc)
                return
            self._settle(units, None)

    def _settle(self, units: list[Unit], exc: BaseException | None) -> None:
        now = time.monotonic()
        for unit in units:
            self._queue.task_done()
            self.metrics.records_in_flight.dec(unit.size)
            if unit.future.done():
                continue
            if exc is None:
                self.metrics.publish_latency.observe(now - unit.received_at)
                unit.future.set_result(None)
            else:
                unit.future.set_exception(exc)

    def _fail(self, units: list[Unit], exc: BaseException) -> None:
        fenced = isinstance(exc, ProducerFenced)
        err: PublishFailed = (
            PartitionLost(f"partition {self.partition}: fenced by a newer owner")
            if fenced
            else PublishFailed(f"partition {self.partition}: {type(exc).__name__}: {exc}")
        )
        self.failure = err
        self.metrics.publish_errors.labels("fenced" if fenced else type(exc).__name__).inc()
        log.error("publish_failed", partition=self.partition, error=str(err))
        self._settle(units, err)
        self._fail_pending(err)
        if self.on_failure is not None:
            self.on_failure(err)

    def _fail_pending(self, exc: BaseException) -> None:
        pending: list[Unit] = []
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())
        self._settle(pending, exc)

    async def _commit(self, units: list[Unit]) -> None:
        offsets = [u.request_offset for u in units if u.request_offset is not None]
        commit_to = {self._tp: max(offsets)} if offsets else None
        messages = [m for u in units for m in u.messages]
        if self.transactional:
            await self._commit_transaction(messages, commit_to)
        else:
            await self._commit_at_least_once(messages, commit_to)

    async def _send_all(self, parts: list[Publishable]) -> None:
        send = self.producer.send
        futures: list[asyncio.Future[Any]] = []
        append = futures.append
        for part in parts:
            if isinstance(part, BalanceEvents):
                topic = part.topic
                for key, value, headers in part.wire():
                    append(await send(topic, value, key=key, headers=headers))
            else:
                append(
                    await send(
                        part.topic,
                        part.value,
                        key=part.key,
                        headers=part.headers,
                        partition=part.partition,
                    )
                )
        await delivered(futures)

    async def _commit_transaction(
        self, messages: list[Publishable], commit_to: dict[TopicPartition, int] | None
    ) -> None:
        await self.producer.begin_transaction()
        try:
            await self._send_all(messages)
            if commit_to:
                await self.producer.send_offsets_to_transaction(commit_to, self.cfg.group_id)
            await self.producer.commit_transaction()
        except ProducerFenced:
            self.metrics.transactions.labels("abort").inc()
            raise
        except BaseException:
            self.metrics.transactions.labels("abort").inc()
            with contextlib.suppress(KafkaError, asyncio.CancelledError):
                await self.producer.abort_transaction()
            raise
        self.metrics.transactions.labels("commit").inc()

    async def _commit_at_least_once(
        self, messages: list[Publishable], commit_to: dict[TopicPartition, int] | None
    ) -> None:
        # Events first, then the state that says they were published, then the offsets.
        def is_state(m: Publishable) -> bool:
            return type(m) is OutMessage and m.topic == self.cfg.state_topic

        state = [m for m in messages if is_state(m)]
        events = [m for m in messages if not is_state(m)]
        await self._send_all(events)
        await self._send_all(state)
        if commit_to:
            await self._commit_offsets(commit_to)
        self.metrics.transactions.labels("commit").inc()
