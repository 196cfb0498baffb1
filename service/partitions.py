"""Partition ownership: acquire (fence, restore), release, and reset after a failed commit.

When this replica is assigned requests partition *p* it fences any previous
owner (exactly_once: by initialising the partition's transactional producer),
restores the batches of state partition *p* and hands them to the tracker. On
revocation it stops polling them before the partition moves. A commit that
fails drops the partition's memory and restores it from Kafka, with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Iterable

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, KafkaTimeoutError

from service.config import Settings
from service.errors import PartitionLost, UnknownStateVersion
from service.kafka import PartitionPublisher, canonical_partition
from service.kafka_clients import client_args, heartbeat_interval_ms, make_producer, stop_client
from service.logs import Throttle
from service.metrics import Metrics
from service.state import BatchState, StateRestore
from service.tracker import Tracker, count_unreadable, state_unreadable, unreadable_reason
from service.worker import PartitionWorker

log = structlog.get_logger(__name__)

# Partition resets closer together than this count as one streak, and back off.
RESET_STREAK_WINDOW_S = 60.0
# A partition whose restore fails is tried again after 1 s, then twice as long each time,
# up to 30 s.
RESET_RETRY_MIN_S = 1.0
RESET_RETRY_MAX_S = 30.0
# The longest a restore waits for its transactional producer to start (to initialise its
# transactional id: InitProducerId waits while the coordinator ends the previous owner's
# transaction) and for the requests partition's committed offset: it holds the lock that
# a rebalance waits for. Past it the restore fails, and is tried again with backoff.
RESTORE_CALL_TIMEOUT_S = 30.0
# The longest a read of a state partition goes on without getting further (its leader
# offline, say): it holds the same lock. Past it the read fails (KafkaTimeoutError), and the
# restore is tried again with backoff.
RESTORE_STALL_S = RESTORE_CALL_TIMEOUT_S


class PartitionOwner:
    """The requests partitions this replica owns, and their restore from the state topic."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics,
        tracker: Tracker,
        consumer: Callable[[], AIOKafkaConsumer | None],
        producer: Callable[[], AIOKafkaProducer | None],
        stopping: asyncio.Event,
    ) -> None:
        self.settings = settings
        self.kcfg = settings.kafka
        self.metrics = metrics
        self.tracker = tracker
        self._consumer = consumer
        self._producer = producer
        self._stopping = stopping
        self.transactional = self.kcfg.delivery == "exactly_once"
        self.instance = settings.instance_id
        self.lock = asyncio.Lock()
        self.assigned: set[int] = set()
        self.restored: set[int] = set()
        self.joined = False
        self._resets: dict[int, tuple[float, int]] = {}
        # How long a partition fenced while assigned here waits for a rebalance (_reset):
        # a session timeout and two heartbeats.
        heartbeat_ms = heartbeat_interval_ms(self.kcfg)
        self.fence_settle_s = (self.kcfg.session_timeout_ms + 2 * heartbeat_ms) / 1000
        self._reset_tasks: set[asyncio.Task[None]] = set()
        # partition_reset_failed: Kafka down fails the restore of every partition at each
        # retry; one line a kind of failure a minute, the rest at DEBUG.
        self._reset_failures = Throttle()
        # load_batch: the batches waiting for a read of their partition, and its reader.
        self._loads: dict[int, dict[str, list[asyncio.Future[BatchState | None]]]] = {}
        self._load_tasks: dict[int, asyncio.Task[None]] = {}
        self._load_lock = asyncio.Lock()
        tracker.on_publish_failure = self._on_publish_failure
        tracker.load_batch = self.load_batch

    @property
    def all_restored(self) -> bool:
        return self.assigned <= self.restored

    @property
    def owned(self) -> list[int]:
        return sorted(self.restored & self.assigned)

    async def acquire(self, partitions: list[int]) -> None:
        self.joined = True
        async with self.lock:
            self.assigned = set(partitions)
            results = await asyncio.gather(
                *(self._restore(p) for p in partitions), return_exceptions=True
            )
            for p, result in zip(partitions, results, strict=True):
                if isinstance(result, KafkaError | OSError):  # TimeoutError is one
                    # Kafka unreachable or refusing, a transient condition, as in _reset.
                    log.warning("restore_failed", partition=p, error=repr(result)[:300])
                    self._schedule_reset(p)
                elif isinstance(result, BaseException):
                    log.error(
                        "restore_failed", partition=p, error=repr(result)[:300], exc_info=result
                    )
                    self._schedule_reset(p)
            self._count_owned()
        log.info("partitions_assigned", partitions=sorted(partitions))

    async def release(self, partitions: list[int]) -> None:
        async with self.lock:
            timeout = min(10.0, self.settings.shutdown_grace_s)
            await asyncio.gather(*(self.tracker.remove_worker(p, timeout) for p in partitions))
            self.assigned -= set(partitions)
            self.restored -= set(partitions)
            self._count_owned()
        if partitions:
            log.info("partitions_revoked", partitions=sorted(partitions))

    async def release_all(self, timeout: float) -> None:
        """At shutdown: stop polling, commit what is queued (within ``timeout``), close."""
        tasks = [*self._reset_tasks, *self._load_tasks.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        async with self.lock:
            workers = list(self.tracker.workers)
            await asyncio.gather(*(self.tracker.remove_worker(p, timeout) for p in workers))
            self.restored.clear()
            self._count_owned()

    def _count_owned(self) -> None:
        """``owned_partitions``, after every change of the partitions restored here."""
        self.metrics.owned_partitions.set(len(self.restored))

    async def _restore(self, p: int, *, seek: bool = False) -> None:
        """Take partition p up: fence its previous owner, read its state, start its worker.

        ``seek`` (a reset): the requests partition is read again from its committed offset,
        looked up once the new producer has started: its start ends the partition's last
        transaction (a commit whose outcome was not learnt), so the offset read is final.
        """
        if self._stopping.is_set():
            return
        started = time.monotonic()
        if self.transactional:
            producer = make_producer(
                self.kcfg,
                f"rightfoot-poller-{self.instance}-p{p}",
                transactional_id=f"{self.kcfg.group_id}.{self.kcfg.requests_topic}.{p}",
            )
        else:
            shared = self._producer()
            assert shared is not None
            producer = shared
        try:
            if self.transactional:
                # Initialises the transactional id: fences the old owner. A start that
                # fails or takes too long leaves a client started all the same (its
                # connections, its metadata task): stopped below, as after a failed read.
                await asyncio.wait_for(producer.start(), RESTORE_CALL_TIMEOUT_S)
            if seek:
                await asyncio.wait_for(self._seek_to_committed(p), RESTORE_CALL_TIMEOUT_S)
            batches, unreadable = await self._read_state(p)
        except BaseException:
            if self.transactional:
                await stop_client(producer)
            raise
        publisher = PartitionPublisher(
            partition=p,
            cfg=self.kcfg,
            metrics=self.metrics,
            producer=producer,
            transactional=self.transactional,
            commit_offsets=self._commit_offsets,
            owns_producer=self.transactional,
        )
        publisher.start()
        worker = PartitionWorker(
            partition=p, publisher=publisher, batches=batches, unreadable=unreadable
        )
        self.tracker.add_worker(worker)
        self.restored.add(p)
        consumer = self._consumer()
        if consumer is not None:
            with contextlib.suppress(KafkaError, AssertionError):
                consumer.resume(TopicPartition(self.kcfg.requests_topic, p))
        log.info(
            "partition_restored",
            partition=p,
            batches=len(batches),
            active=sum(1 for b in batches.values() if b.active),
            unreadable=len(unreadable),
            # Batches placed before partitions were added: they stay here (Tracker.route).
            elsewhere_by_hash=sum(
                canonical_partition(b, self.tracker.partitions) != p for b in batches
            ),
            took_s=round(time.monotonic() - started, 3),
        )

    async def _seek_to_committed(self, p: int) -> None:
        """Take requests partition p up again from its committed offset; from its beginning
        when it has none, as the consumer does (``auto_offset_reset="earliest"``).

        Not ``seek_to_committed``: aiokafka seeks there only to a committed offset above 0,
        and leaves the position where it is otherwise, past the requests whose commit
        failed (lost, though their HTTP request was answered 202).
        """
        consumer = self._consumer()
        if consumer is None:
            return
        tp = TopicPartition(self.kcfg.requests_topic, p)
        committed = await consumer.committed(tp)
        if committed is not None:
            consumer.seek(tp, committed)
        elif not await consumer.seek_to_beginning(tp):
            raise KafkaTimeoutError(f"{tp}: no reply to the look-up of its first offset")

    async def _read_state(self, p: int) -> tuple[dict[str, BatchState], dict[str, str]]:
        """Every batch of state partition p as last committed, and those not understood."""
        restore = StateRestore(p)
        unreadable: dict[str, str] = {}
        bad_keys = _BadKeys(self.metrics, p)
        try:
            await self._read_partition(p, restore, bad_keys.add)
        finally:
            bad_keys.close()
        newer = _NewerVersions(self.metrics, p)

        def refused(batch_id: str, exc: ValueError) -> None:
            unreadable[batch_id] = str(exc)[:300]
            if isinstance(exc, UnknownStateVersion):
                newer.add(batch_id, exc)
            else:
                self._state_unreadable(batch_id, exc)

        try:
            return await _rebuilt(restore, refused), unreadable
        finally:
            newer.close()

    async def load_batch(self, p: int, batch_id: str) -> BatchState | None:
        """One batch of state partition p as last committed, with all its fingerprints
        (None if it has no summary there); ValueError if its records are not understood.

        Each load reads the whole partition, so loads wait for each other: one partition
        is read at a time, and the batches asked for meanwhile share the next read (a
        hundred batches tracked again at once cost a read or two of their partition, and
        one consumer's buffers at a time).
        """
        waiter: asyncio.Future[BatchState | None] = asyncio.get_running_loop().create_future()
        self._loads.setdefault(p, {}).setdefault(batch_id, []).append(waiter)
        if p not in self._load_tasks:
            task = asyncio.create_task(self._load_batches(p), name=f"load-batches-{p}")
            self._load_tasks[p] = task
        return await waiter

    async def _load_batches(self, p: int) -> None:
        try:
            while self._loads.get(p):
                async with self._load_lock:
                    wanted = self._loads.pop(p)  # all those that waited for the lock too
                    try:
                        found, errors = await self._read_batches(p, wanted)
                    except Exception as exc:  # Kafka unreachable: each poll retries
                        if isinstance(exc, ValueError):
                            # Records not understood are reported per batch, as a
                            # ValueError: a read that failed is never taken for one.
                            exc = RuntimeError(f"reading state partition {p}: {exc!r}")
                        found, errors = {}, dict.fromkeys(wanted, exc)
                for batch_id, waiters in wanted.items():
                    for waiter in waiters:
                        if waiter.done():
                            continue
                        if batch_id in errors:
                            waiter.set_exception(errors[batch_id])
                        else:
                            waiter.set_result(found.get(batch_id))
        finally:
            self._load_tasks.pop(p, None)

    async def _read_batches(
        self, p: int, batch_ids: Iterable[str]
    ) -> tuple[dict[str, BatchState], dict[str, Exception]]:
        """Those batches of state partition p, whole; and the errors of those not understood.

        Another batch's records are skipped unparsed (the restore reported them).
        """
        restore = StateRestore(p, only=batch_ids)
        errors: dict[str, Exception] = {}

        def refused(batch_id: str | None, exc: ValueError) -> None:
            if batch_id is not None:
                errors[batch_id] = exc

        await self._read_partition(p, restore, refused)
        log.debug("state_partition_read", partition=p, batches=len(restore.only or ()))
        return await _rebuilt(restore, refused), errors

    async def _read_partition(
        self,
        p: int,
        restore: StateRestore,
        on_error: Callable[[str | None, ValueError], None],
    ) -> None:
        """Read state partition p from its beginning to its last committed record;
        KafkaTimeoutError (or TimeoutError) once it gets no further for ``RESTORE_STALL_S``."""
        stall = RESTORE_STALL_S
        tp = TopicPartition(self.kcfg.state_topic, p)
        consumer = AIOKafkaConsumer(
            **client_args(self.kcfg, f"rightfoot-poller-restore-{self.instance}"),
            enable_auto_commit=False,
            isolation_level="read_committed",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            # The log's start moved past the position (records deleted while it read): an
            # error (OffsetOutOfRangeError), so that the restore fails and is tried again,
            # where aiokafka's default, "latest", went to the end and ended the read there,
            # a part of the partition taken for all of it.
            auto_offset_reset="none",
        )
        await consumer.start()
        try:
            consumer.assign([tp])
            await asyncio.wait_for(consumer.seek_to_beginning(tp), stall)
            end = (await asyncio.wait_for(consumer.end_offsets([tp]), stall))[tp]
            position = await asyncio.wait_for(consumer.position(tp), stall)
            progress_at = time.monotonic()
            while position < end:
                chunk = await asyncio.wait_for(
                    consumer.getmany(tp, timeout_ms=1000, max_records=5000), stall
                )
                for msg in chunk.get(tp, []):
                    try:
                        restore.apply(msg.key, msg.value)
                    except ValueError as exc:
                        on_error(None, exc)
                now = await asyncio.wait_for(consumer.position(tp), stall)
                if now > position:
                    position, progress_at = now, time.monotonic()
                elif time.monotonic() - progress_at >= stall:
                    raise KafkaTimeoutError(
                        f"state partition {p}: no record read for {stall} s "
                        f"at offset {position} of {end}"
                    )
        finally:
            await stop_client(consumer)

    def _state_unreadable(self, batch_id: str | None, exc: ValueError) -> None:
        state_unreadable(self.metrics, batch_id, exc)

    async def _commit_offsets(self, offsets: dict[TopicPartition, int]) -> None:
        consumer = self._consumer()
        if consumer is None:
            raise KafkaError("consumer closed")
        await consumer.commit(offsets)

    def _on_publish_failure(self, partition: int, exc: BaseException) -> None:
        if isinstance(exc, PartitionLost):
            log.warning("partition_fenced", partition=partition)
        self._schedule_reset(partition, fenced=isinstance(exc, PartitionLost))

    def _schedule_reset(self, partition: int, fenced: bool = False) -> None:
        task = asyncio.create_task(self._reset(partition, fenced), name=f"reset-{partition}")
        self._reset_tasks.add(task)
        task.add_done_callback(self._reset_tasks.discard)
        task.add_done_callback(functools.partial(_reset_ended, partition))

    async def _reset(self, p: int, fenced: bool) -> None:
        """Drop a partition's in-memory state and restore it from Kafka, with backoff.

        Failures that repeat (a broker that is down, a message Kafka refuses) back off
        exponentially, so a partition that cannot commit does not hammer the API or Kafka.
        """
        tp = TopicPartition(self.kcfg.requests_topic, p)
        async with self.lock:
            if p not in self.assigned:
                return
            try:
                await self.tracker.remove_worker(p, timeout=5.0)
            except Exception:  # its polls and commits are dropped all the same
                log.exception("partition_release_failed", partition=p)
            self.restored.discard(p)
            self._count_owned()
            consumer = self._consumer()
            if consumer is not None:
                with contextlib.suppress(KafkaError, AssertionError):
                    consumer.pause(tp)
        if fenced and not await self._still_ours_after_fence(p):
            return
        now = time.monotonic()
        last, streak = self._resets.get(p, (0.0, 0))
        streak = streak + 1 if now - last < RESET_STREAK_WINDOW_S else 0
        self._resets[p] = (now, streak)
        delay = min(RESET_RETRY_MAX_S, 0.5 * 2**streak) if streak else 0.0
        failed = False  # the last round's failure was logged with its own line
        while not self._stopping.is_set():
            if delay:
                # One line a cause: after a failure's line, the wait it brings is DEBUG.
                (log.debug if failed else log.warning)(
                    "partition_reset_backoff", partition=p, delay_s=delay
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                if self._stopping.is_set():
                    return
            async with self.lock:
                if p not in self.assigned or p in self.restored:
                    return
                try:
                    await self._restore(p, seek=True)
                    self._count_owned()
                    return
                except (KafkaError, OSError) as exc:
                    # Kafka unreachable or refusing, a transient condition: the partition
                    # waits, not ready, and is tried again. Every partition's reset fails
                    # alike: one WARNING a kind of failure a minute, the rest at DEBUG.
                    delay = min(max(delay * 2, RESET_RETRY_MIN_S), RESET_RETRY_MAX_S)
                    self._reset_failures.log(
                        type(exc).__name__,
                        log,
                        "warning",
                        "partition_reset_failed",
                        partition=p,
                        error=repr(exc)[:300],
                        retry_in_s=delay,
                    )
                    failed = True
                    continue
                except Exception as exc:
                    # Not a failure of Kafka: a fault of this service. The partition stays
                    # paused, so it is tried again like one, not left for dead. One ERROR
                    # with its traceback a kind of fault a minute, the rest at DEBUG.
                    self._reset_failures.log(
                        f"fault:{type(exc).__name__}",
                        log,
                        "exception",
                        "partition_reset_failed",
                        partition=p,
                        error=repr(exc)[:300],
                    )
                    failed = True
            delay = min(max(delay * 2, RESET_RETRY_MIN_S), RESET_RETRY_MAX_S)

    async def _still_ours_after_fence(self, p: int) -> bool:
        """After partition p was fenced: whether it is still assigned here once the group
        has had the time to take it away (then it is restored), or was revoked meanwhile.

        Fenced means that a newer producer of p's transactional id exists. Another replica
        that took p over made it (its restore fences us), but so does the broker when it
        aborts a transaction open past kafka.transaction_timeout_ms (kafka.py gives a
        commit up before that, but a stalled event loop or a slow abort can still get
        there), and so does a former owner's reset that has not yet heard it lost p. Only
        the first means p is no longer ours, and then the group has moved it. With the
        eager protocol a member that rejoins revokes all it had first, so another replica
        can be given p while it is still assigned here only if the coordinator expelled
        this one (no heartbeat for a session timeout); our consumer hears so at its next
        heartbeat (every fifth of a session timeout once the coordinator answers), rejoins
        and revokes: ``release`` takes p out of ``assigned``. So p waits a session timeout
        and two heartbeats, paused: still assigned then, it is ours, and is restored, its
        new producer fencing whoever fenced it. Left waiting for a rebalance that the
        broker's abort never brings, it was never polled again until a restart.

        Not a rejoin of the group instead: that would make every replica release and
        restore all its partitions (eager protocol), through aiokafka's private
        coordinator, for the one case it handles better: a replica that cannot reach the
        group coordinator at all is never told it was expelled, and fences the real owner
        in turn, which does the same a wait later. That is churn, never a duplicate (a
        commit is only made by the newest producer, after reading the state the previous
        one committed), and what the reset after any other failed commit does at once.
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), self.fence_settle_s)
        async with self.lock:  # a revocation under way ends first
            still = not self._stopping.is_set() and p in self.assigned and p not in self.restored
        if still:
            log.warning(
                "partition_fenced_still_assigned",
                partition=p,
                waited_s=self.fence_settle_s,
                detail="no rebalance took it away: restored (the broker aborted a "
                "transaction past kafka.transaction_timeout_ms, or a former owner's "
                "producer fenced it)",
            )
        return still


class _BadKeys:
    """The records of one restore of a state partition that have no key, or a key that is
    not a state key. Each is counted in ``invalid_input_total{source="state_topic"}``
    with the reason ``tracker.unreadable_reason`` gives it; the first is logged as an ERROR
    ``state_unreadable``, the others at DEBUG, and at the end of the restore one ERROR
    ``state_keys_unreadable`` says how many there were. One cause, one line (and its sum):
    a partition holding thousands of them does not log thousands of ERRORs each time it is
    restored. (A batch whose records are not understood keeps its own ERROR: each is a
    batch an operator must look at.)"""

    def __init__(self, metrics: Metrics, partition: int) -> None:
        self.metrics = metrics
        self.partition = partition
        self.count = 0
        self.first: str | None = None

    def add(self, batch_id: str | None, exc: ValueError) -> None:
        """``_read_partition``'s ``on_error``: ``batch_id`` is None there."""
        reason = unreadable_reason(batch_id, exc)
        self.metrics.invalid_input.labels("state_topic", reason).inc()
        self.count += 1
        error = str(exc)[:300]
        fields = {"partition": self.partition, "reason": reason, "error": error}
        if self.count == 1:
            self.first = error
            log.error("state_unreadable", batch_id=batch_id, **fields)
        else:
            log.debug("state_unreadable", batch_id=batch_id, **fields)

    def close(self) -> None:
        """At the end of the restore, finished or not: how many there were, the first
        included (nothing more if it was the only one)."""
        if self.count > 1:
            log.error(
                "state_keys_unreadable",
                partition=self.partition,
                count=self.count,
                first=self.first,
            )


class _NewerVersions:
    """The batches of one restore of a state partition whose summary a newer version of
    the service wrote (after a rollback): each is counted in
    ``invalid_input_total{source="state_topic",reason="unknown_version"}`` and left
    unreadable (``batches_unreadable``), its own line at DEBUG; at the end of the restore
    one WARNING ``state_unreadable`` says how many there were, with a few of their IDs. One
    cause, one line: a rollback is a decision, not a fault in each batch, and a partition
    of thousands of batches does not log thousands of lines at each restore."""

    EXAMPLES = 5

    def __init__(self, metrics: Metrics, partition: int) -> None:
        self.metrics = metrics
        self.partition = partition
        self.batch_ids: list[str] = []  # the first EXAMPLES
        self.count = 0
        self.first: str | None = None

    def add(self, batch_id: str, exc: ValueError) -> None:
        reason = count_unreadable(self.metrics, batch_id, exc)
        self.count += 1
        error = str(exc)[:300]
        if self.first is None:
            self.first = error
        if len(self.batch_ids) < self.EXAMPLES:
            self.batch_ids.append(batch_id)
        log.debug(
            "state_unreadable",
            batch_id=batch_id,
            partition=self.partition,
            reason=reason,
            error=error,
        )

    def close(self) -> None:
        if not self.count:
            return
        log.warning(
            "state_unreadable",
            batch_id=self.batch_ids[0],
            partition=self.partition,
            reason="unknown_version",
            count=self.count,
            batch_ids=self.batch_ids,
            error=self.first,
            detail="written by a newer version of the service (a rollback?): left as they "
            "are, not polled, until a version that reads them owns the partition",
        )


def _reset_ended(partition: int, task: asyncio.Task[None]) -> None:
    """A reset ends when its partition is restored, released or the service stops; one
    that ends otherwise is a fault, said rather than left silent."""
    if not task.cancelled() and task.exception() is not None:
        log.error("partition_reset_crashed", partition=partition, exc_info=task.exception())


async def _rebuilt(
    restore: StateRestore, on_error: Callable[[str, ValueError], None]
) -> dict[str, BatchState]:
    """``restore.batches``, a step at a time with the event loop let go between steps:
    putting millions of fingerprints into seen sets at once held the loop for seconds (the
    consumer's heartbeats, the other partitions' polls, /healthz)."""
    out: dict[str, BatchState] = {}
    for _ in restore.rebuild(on_error, out):
        await asyncio.sleep(0)
    return out
