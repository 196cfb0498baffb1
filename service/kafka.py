"""Where events are published: the per-partition commits (clients: service.kafka_clients).

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
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    KafkaError,
    KafkaTimeoutError,
    ProducerFenced,
    RebalanceInProgressError,
    UnknownMemberIdError,
)
from murmurhash2 import murmurhash2 as _murmurhash2

from service.config import KafkaConfig
from service.errors import (
    PartitionLost,
    PublishFailed,
)
from service.events import BalanceEvents, OutMessage, Publishable, message_count
from service.kafka_clients import stop_client
from service.metrics import Metrics

log = structlog.get_logger(__name__)


# Kafka's murmur2 seed (``Utils.murmur2``).
MURMUR2_SEED = 0x9747B28C


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``), as an unsigned int.

    The reference MurmurHash2 with Kafka's seed, in compiled code (the ``murmurhash2``
    package): 0.2 µs for a short key, where the best pure-Python version took 0.85.
    tests/test_partitioner.py checks it against Kafka's own vectors, the Java client's
    partitions and aiokafka's line-by-line port of the Java code.
    """
    return _murmurhash2(data, MURMUR2_SEED)


def partition_for_key(key: bytes, partitions: int) -> int:
    """Where the Java client's default partitioner puts a keyed record.

    ``BuiltInPartitioner.partitionForKey``: ``toPositive(murmur2(key)) % numPartitions``.
    """
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def canonical_partition(batch_id: str, partitions: int) -> int:
    """The requests/state partition of a batch: Kafka's default murmur2 partitioning."""
    return partition_for_key(batch_id.encode(), partitions)


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


# One lock per producer and partition around send_batch: with a producer shared by
# several publishers (at_least_once), aiokafka's send_batch lets one caller at a time
# add a batch to a partition and makes the others wait for its drain in a loop whose
# timeout shrinks by all the time waited so far at every turn; under contention that
# raised KafkaTimeoutError long before request_timeout_ms. Waiting here first leaves it
# at most one batch to wait for.
_SEND_LOCKS: weakref.WeakKeyDictionary[AIOKafkaProducer, dict[TopicPartition, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def _send_locks(producer: AIOKafkaProducer) -> dict[TopicPartition, asyncio.Lock]:
    locks = _SEND_LOCKS.get(producer)
    if locks is None:
        locks = _SEND_LOCKS[producer] = {}
    return locks


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a task's exception retrieved: whoever awaits it raises it, or it no longer matters."""
    if not task.cancelled():
        task.exception()


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

# Failures of a commit that an ordinary day brings, after which the partition is restored
# and its work done again: the client's retriable errors; a timeout (KafkaTimeoutError: the
# metadata of a partition whose leader moved or whose broker is lost, a batch expired
# unsent); a connection lost; and, with at_least_once, the consumer's offset commit refused
# because the group is rebalancing (aiokafka raises CommitFailedError for the three group
# errors behind it).
TRANSIENT_COMMIT_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError,
    ConnectionError,
    KafkaTimeoutError,
    CommitFailedError,
    RebalanceInProgressError,
    IllegalGenerationError,
    UnknownMemberIdError,
)
# The most of a failure's text repeated in a log line (CommitFailedError's is a paragraph).
MAX_ERROR_CHARS = 300


def transient(exc: BaseException) -> bool:
    """Whether a failed commit is an expected, passing condition (TRANSIENT_COMMIT_ERRORS)."""
    return bool(getattr(exc, "retriable", False)) or isinstance(exc, TRANSIENT_COMMIT_ERRORS)


def describe(exc: BaseException) -> str:
    """A failure on one short line, its class named once: aiokafka's own text already
    starts with it (``KafkaTimeoutError: ...``, ``[Error 27] RebalanceInProgressError``)."""
    text = " ".join(str(exc).split())
    name = type(exc).__name__
    if name not in text:
        text = f"{name}: {text}" if text else name
    return text[:MAX_ERROR_CHARS]


# A transaction not committed within this share of kafka.transaction_timeout_ms is given
# up and aborted, a failure like any other (the partition is restored from Kafka). Let
# run, the broker would abort it at the timeout and bump the producer's epoch; its next
# request would then be refused as if another replica had fenced it (ProducerFenced: an
# idempotent producer retries a partition that will not take its records for ever).
COMMIT_SHARE_OF_TRANSACTION_TIMEOUT = 0.75
# The longest an abort is waited for (aiokafka flushes the transaction's records first).
ABORT_TIMEOUT_S = 10.0


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
        self.commit_timeout_s = (
            cfg.transaction_timeout_ms / 1000 * COMMIT_SHARE_OF_TRANSACTION_TIMEOUT
        )
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
        """Commit what is queued (within ``timeout``), then stop.

        A caller cancelled meanwhile (``wait_for(service.stop(), grace)`` running out) is
        cancelled: the publisher task is stopped (its transaction aborted, or fenced by
        the partition's next producer) and what was queued fails, but close() does not
        go on waiting for the task's abort, nor stop the producer."""
        try:
            if self._task is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._drained(), timeout)
                self._task.cancel()
                try:
                    await self._task
                except asyncio.CancelledError:
                    # The task's own end (cancelled above) is expected; the caller's is
                    # not swallowed: who bounds close() by a timeout gets it.
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise
        finally:
            if self._task is not None:
                self._task.cancel()
            self._fail_pending(PublishFailed("publisher closed"))
        if self.owns_producer:
            await stop_client(self.producer)

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
            else PublishFailed(f"partition {self.partition}: {describe(exc)}")
        )
        self.failure = err
        self.metrics.publish_errors.labels("fenced" if fenced else type(exc).__name__).inc()
        if fenced:
            # Another owner took the partition over (or the broker aborted a transaction):
            # the owner's WARNING partition_fenced says so, one line for the cause.
            log.info("publish_failed", partition=self.partition, error=str(err), fenced=True)
        elif transient(exc):
            # A broker lost, a leader or coordinator moving, a rebalance: the partition is
            # restored from Kafka and its work done again; nothing is wrong for long.
            log.warning("publish_failed", partition=self.partition, error=str(err), transient=True)
        else:
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
        await delivered(await self._send(parts))

    async def _send(self, parts: list[Publishable]) -> list[asyncio.Future[Any]]:
        """Hand every message to the producer; their delivery futures."""
        send = self.producer.send
        futures: list[asyncio.Future[Any]] = []
        append = futures.append
        builders: dict[str, dict[int, Any]] = {}  # open record batches, by topic and partition
        for part in parts:
            if isinstance(part, BalanceEvents):
                await self._send_balance_events(part, builders, futures)
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
        for topic, open_batches in builders.items():
            for partition, builder in open_batches.items():
                await self._send_batch(builder, topic, partition, futures)
        return futures

    async def _send_batch(
        self, builder: Any, topic: str, partition: int, futures: list[asyncio.Future[Any]]
    ) -> None:
        producer = self.producer
        tp = TopicPartition(topic, partition)
        locks = _send_locks(producer)
        lock = locks.get(tp)
        if lock is None:
            lock = locks[tp] = asyncio.Lock()
        async with lock:
            futures.append(await producer.send_batch(builder, topic, partition=partition))

    async def _send_balance_events(
        self,
        events: BalanceEvents,
        builders: dict[str, dict[int, Any]],
        futures: list[asyncio.Future[Any]],
    ) -> None:
        """Balance events through aiokafka's batch API: one future per full record batch.

        ``producer.send()`` costs one future, one metadata wait and a pure-Python murmur2
        (aiokafka's) per message. Here each event goes into the open record batch of its
        partition (the Java client's: ``partition_for_key``), and a batch is handed to the
        producer when it is full. The open batches (``builders``) are the whole commit's:
        the balance events of all its units fill them together, and ``_send`` hands over
        what is left once every unit is in. Inside a transaction, ``send_batch`` adds
        the partition to it as ``send()`` does: the batches commit or abort with the
        state and the offsets. ``send_batch`` waits while the partition's previous batch
        is not yet drained, as ``send()`` does when a batch is full.
        """
        producer = self.producer
        topic = events.topic
        count = len(await producer.partitions_for(topic))
        open_batches = builders.setdefault(topic, {})
        hash_of, seed = _murmurhash2, MURMUR2_SEED
        for key, value, headers in events.wire():
            partition = (hash_of(key, seed) & 0x7FFFFFFF) % count  # partition_for_key, inlined
            builder = open_batches.get(partition)
            if builder is None:
                builder = open_batches[partition] = producer.create_batch()
            if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
                await self._send_batch(builder, topic, partition, futures)
                builder = open_batches[partition] = producer.create_batch()
                # An empty batch takes any one record (a too-large one fails its send).
                builder.append(key=key, value=value, timestamp=None, headers=headers)

    async def _commit_transaction(
        self, messages: list[Publishable], commit_to: dict[TopicPartition, int] | None
    ) -> None:
        await self.producer.begin_transaction()
        adding_offsets: asyncio.Task[None] | None = None
        # Started before the broker's own timer (at the transaction's first partition).
        deadline = asyncio.timeout(self.commit_timeout_s)
        try:
            async with deadline:
                futures = await self._send(messages)
                if commit_to:
                    # Offsets join the transaction while its records are on their way
                    # (their requests go to the coordinators, not the partition leaders);
                    # the commit comes only when both are done, every record delivered.
                    adding_offsets = asyncio.create_task(
                        self.producer.send_offsets_to_transaction(commit_to, self.cfg.group_id)
                    )
                    adding_offsets.add_done_callback(_retrieve)
                await delivered(futures)
                if adding_offsets is not None:
                    await adding_offsets
                await self.producer.commit_transaction()
        except ProducerFenced:
            self.metrics.transactions.labels("abort").inc()
            raise
        except BaseException:
            self.metrics.transactions.labels("abort").inc()
            if adding_offsets is not None and not adding_offsets.done():
                # Settled before the abort: its outcome no longer matters.
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(adding_offsets), 10)
            await self._abort()
            if deadline.expired():
                raise TimeoutError(
                    f"not committed within {self.commit_timeout_s:g} s "
                    f"({COMMIT_SHARE_OF_TRANSACTION_TIMEOUT:g} of kafka.transaction_timeout_ms)"
                ) from None
            raise
        self.metrics.transactions.labels("commit").inc()

    async def _abort(self) -> None:
        """Abort the transaction that failed, if it still can be; the failure that ended it
        is what is raised, counted and logged, never a failure of the abort.

        aiokafka's transaction manager refuses with an AssertionError the abort of a
        transaction it is committing (a commit that failed or was cut short) or of a
        producer in FATAL_ERROR (its sender died: fenced, say). Either way the producer is
        not used again: the partition is restored with a new one, whose start ends the
        transaction on the broker.
        """
        try:
            await asyncio.wait_for(self.producer.abort_transaction(), ABORT_TIMEOUT_S)
        except (KafkaError, AssertionError, TimeoutError, asyncio.CancelledError) as exc:
            log.debug("transaction_abort_failed", partition=self.partition, error=repr(exc))

    async def _commit_at_least_once(
        self, messages: list[Publishable], commit_to: dict[TopicPartition, int] | None
    ) -> None:
        # Events first, then the state that says they were published, then the offsets.
        def is_state(m: Publishable) -> bool:
            return type(m) is OutMessage and m.topic == self.cfg.state_topic

        state = [m for m in messages if is_state(m)]
        events = [m for m in messages if not is_state(m)]
        try:
            await self._send_all(events)
            await self._send_all(state)
            if commit_to:
                await self._commit_offsets(commit_to)
        except BaseException:
            # A failed round, as an aborted transaction is: its work is done again.
            self.metrics.transactions.labels("abort").inc()
            raise
        self.metrics.transactions.labels("commit").inc()
