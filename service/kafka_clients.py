"""Kafka clients: their settings (TLS, SASL), a probe that names why a broker refuses us,
the producer, and the topics the service creates or checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.conn import create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    AuthenticationMethodNotSupported,
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    IllegalSaslStateError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.helpers import create_ssl_context

from service.config import KafkaConfig, read_secret_file
from service.errors import (
    ConnectionErrorReason,
    KafkaConnectionProblem,
    PollerError,
    SecretFileTooLarge,
)
from service.logs import register_secret
from service.state import MAX_MESSAGE_BYTES

log = structlog.get_logger(__name__)


async def stop_client(client: AIOKafkaConsumer | AIOKafkaProducer, timeout_s: float = 10.0) -> None:
    """Stop an aiokafka client, as far as it will go; only the caller's cancellation escapes.

    With a broker out of reach, a consumer's ``stop()`` can raise CancelledError when nobody
    cancelled its caller: aiokafka's ``Fetcher.close()`` cancels its fetch tasks and awaits
    them, and one that was backing off after a failed fetch lets the cancellation out.
    Passed on, it would cut short a shutdown (the rest of the clients left open, exit not
    clean) or stand for a cancellation that never happened. That, a KafkaError or running
    past ``timeout_s`` ends the stop; the client is not used again either way.
    """
    try:
        await asyncio.wait_for(client.stop(), timeout_s)
        return
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        log.debug("kafka_client_stop_interrupted", client=type(client).__name__)
    except Exception as exc:
        log.debug("kafka_client_stop_failed", client=type(client).__name__, error=repr(exc))
    await _close_what_is_left(client)


async def _close_what_is_left(client: AIOKafkaConsumer | AIOKafkaProducer) -> None:
    """After a ``stop()`` that did not end: what aiokafka closes last, closed anyway.

    A producer's ``stop()`` waits for its records to be delivered before it stops its
    sender, and a transactional producer retries a partition that takes none (min ISR
    not met) for ever: a producer given up after a commit that took too long (kafka.py)
    kept its sender, its connections and its metadata task, one more at each such reset.
    Those are aiokafka's private parts (the sender; the client, ``_client`` in a
    consumer), closed as far as they exist, each within 5 s.
    """
    closers = [
        getattr(part, "close", None)
        for part in (
            getattr(client, "_sender", None),
            getattr(client, "client", None) or getattr(client, "_client", None),
        )
    ]
    for close in closers:
        if close is None:
            continue
        try:
            await asyncio.wait_for(close(), 5.0)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        except Exception as exc:
            log.debug("kafka_client_close_failed", client=type(client).__name__, error=repr(exc))


def sasl_password(cfg: KafkaConfig) -> str | None:
    """The SASL password in effect.

    A mounted password file (``RFP_KAFKA__SASL_PASSWORD_FILE``) is read again each time
    clients are made, so a rotated Secret is picked up by the next connection attempt
    without a restart; a file that cannot be read (not UTF-8, larger than 64 KiB) leaves
    the password read at start. ``RFP_KAFKA__SASL_PASSWORD`` takes precedence, as at start.
    A password read again is redacted from log lines from then on, as the one read at start.
    """
    configured = cfg.sasl_password.get_secret_value() if cfg.sasl_password else None
    path = os.environ.get("RFP_KAFKA__SASL_PASSWORD_FILE")
    if path and not os.environ.get("RFP_KAFKA__SASL_PASSWORD"):
        with contextlib.suppress(OSError, UnicodeDecodeError, SecretFileTooLarge):
            value = read_secret_file(path)
            register_secret(value)
            return value or configured
    return configured


def heartbeat_interval_ms(cfg: KafkaConfig) -> int:
    """The group consumer's heartbeat interval: a fifth of its session timeout."""
    return max(500, cfg.session_timeout_ms // 5)


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


# The state topic, as the service creates it.
STATE_TOPIC_CONFIGS: dict[str, str] = {
    "cleanup.policy": "compact",
    # What the producer may send (max_request_size), with room for the record batch's
    # own header.
    "max.message.bytes": str(MAX_MESSAGE_BYTES + 1024),
    # The cleaner compacts closed segments only. With the broker's defaults (1 GiB, 7
    # days) a partition would keep up to a week of superseded summaries, open chunks and
    # forgotten batches, which every restore, every fingerprint read-back and every
    # replica's view for GET /v1/batches read in full; an hour's segments bound that, as
    # Kafka's own compacted topics bound theirs (100 MiB).
    "segment.bytes": str(100 * 1024 * 1024),
    "segment.ms": str(3_600_000),
}


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
                topic_configs=STATE_TOPIC_CONFIGS,
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
        await _check_state_topic(admin, cfg.state_topic)
        counts = await _partition_counts(admin, [cfg.requests_topic, cfg.state_topic])
        if counts.get(cfg.requests_topic) != counts.get(cfg.state_topic):
            raise PollerError(
                f"kafka: {cfg.state_topic} has {counts.get(cfg.state_topic)} partitions but "
                f"{cfg.requests_topic} has {counts.get(cfg.requests_topic)}; they must match"
            )
        return counts[cfg.requests_topic]
    finally:
        await admin.close()


async def partition_counts(cfg: KafkaConfig, topics: list[str], client_id: str) -> dict[str, int]:
    """Each topic's partition count as the cluster has it now (a topic missing: absent)."""
    admin = AIOKafkaAdminClient(**client_args(cfg, client_id))
    await admin.start()
    try:
        return await _partition_counts(admin, topics, timeout_s=0.0)
    finally:
        await admin.close()


async def topic_configs(admin: AIOKafkaAdminClient, topic: str) -> dict[str, str]:
    """A topic's configuration as the broker describes it: name -> value."""
    described = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    return {e[0]: e[1] for r in described for res in r.resources for e in res[4]}


async def _check_state_topic(admin: AIOKafkaAdminClient, topic: str) -> None:
    """A WARNING if a state topic made by hand is not compacted: with ``delete`` its
    retention deletes the progress of batches tracked longer (they would start over and
    publish again), and nothing removes superseded progress or forgotten batches."""
    try:
        entries = await topic_configs(admin, topic)
    except KafkaError as exc:  # not allowed to describe it (ACLs), say: nothing to check
        log.info("state_topic_config_unknown", topic=topic, error=repr(exc)[:200])
        return
    policy = entries.get("cleanup.policy") or ""
    if "compact" not in policy.split(","):
        log.warning(
            "state_topic_not_compacted",
            topic=topic,
            cleanup_policy=policy,
            retention_ms=entries.get("retention.ms"),
            wanted=STATE_TOPIC_CONFIGS,
        )


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
