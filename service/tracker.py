"""The runner: schedules every tracked batch, reads its pages and commits what the policy says.

Every decision about a batch is the policy's (service.policy). The runner does
the I/O through two small interfaces, a ``PageSource`` (the API client) and a
``Committer`` (the partition's publisher), and keeps the schedule.

A step's state is applied in memory at once, and its messages are queued on
the partition's committer, which commits them in order. So the state in memory
is the newest one queued, and every later step starts from it. If a commit
fails, the partition is restored from Kafka (the service's ``on_publish_failure``),
so nothing stands in memory that Kafka lacks for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence

import structlog

from service.budget import RecordBudget
from service.config import Settings
from service.errors import (
    ApiBadRequest,
    ApiError,
    ApiMalformedResponse,
    ApiNotFound,
    ApiServerError,
    ApiTransportError,
    ApiUnauthorized,
    PageTokenLoop,
    PageTokenRejected,
    PublishFailed,
    RequestAborted,
    RequestRejected,
    UnknownStateVersion,
)
from service.events import EventFactory, OutMessage, Publishable
from service.kafka import canonical_partition
from service.logs import Throttle
from service.metrics import Metrics
from service.policy import Policy, Poll
from service.records import Page
from service.requests import (
    FORWARDED_HEADER,
    TrackingRequest,
    decode_request,
    readable_batch_id,
    reject_reason,
)
from service.schedule import DueQueue
from service.state import BatchState
from service.step import Step
from service.worker import PageSource, PartitionWorker, abandon, committed, done, settled
from service.writer import StepWriter

log = structlog.get_logger(__name__)

# A poll goes on reading while this many of its commits are under way.
MAX_COMMITS_IN_FLIGHT = 2
# Finished batches forgotten in one commit: no batch is added once it holds this many
# tombstones, so a commit has at most this many plus one batch's (a batch stopped after a
# million records has some thousand chunks); the rest go in the next round.
MAX_FORGET_MESSAGES = 5000


def unreadable_reason(batch_id: str | None, exc: ValueError) -> str:
    """The ``invalid_input_total{source="state_topic"}`` reason of a state-topic record
    not understood: one without a key or with a key that is not a state key (``batch_id``
    None), or a batch's records."""
    if batch_id is None and str(exc) == "no key":
        return "no_key"
    if isinstance(exc, UnknownStateVersion):
        return "unknown_version"
    return "invalid_state"


def _ran(worker: PartitionWorker, batch_id: str, task: asyncio.Future[None] | None) -> None:
    """A poll's task is done: the batch has no poll running (from its done-callback too,
    for a task cancelled before it began, whose ``_poll`` never ran). Not the next poll's
    entry, if that one has begun since."""
    if task is not None and worker.running.get(batch_id) is task:
        del worker.running[batch_id]


def count_unreadable(metrics: Metrics, batch_id: str | None, exc: ValueError) -> str:
    """Count state-topic records that are not understood; their ``unreadable_reason``."""
    reason = unreadable_reason(batch_id, exc)
    metrics.invalid_input.labels("state_topic", reason).inc()
    return reason


def state_unreadable(metrics: Metrics, batch_id: str | None, exc: ValueError) -> None:
    """Count and log state-topic records that are not understood (``unreadable_reason``)."""
    reason = count_unreadable(metrics, batch_id, exc)
    log.error("state_unreadable", batch_id=batch_id, reason=reason, error=str(exc)[:300])


class Tracker:
    def __init__(
        self,
        settings: Settings,
        *,
        source: PageSource,
        metrics: Metrics,
        factory: EventFactory,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        max_concurrent_polls: int = 512,
    ) -> None:
        self.settings = settings
        self.source = source
        self.metrics = metrics
        self.writer = StepWriter(
            factory=factory, metrics=metrics, state_topic=settings.kafka.state_topic
        )
        self.clock = clock
        self.wall = wall
        self.policy = Policy(
            settings.polling, settings.rightfoot.backoff_max_s, rng or random.Random()
        )
        self.workers: dict[int, PartitionWorker] = {}
        self.partitions = settings.kafka.partitions
        # The partition whose state holds a batch (StateView.home), None if none does.
        self.home_of: Callable[[str], int | None] = lambda _batch_id: None
        self._epochs = itertools.count(1)
        self._by_epoch: dict[int, PartitionWorker] = {}
        self.due = DueQueue()
        # Set when a batch finished for good has chunks left on the topic (forget_loop).
        self._clear_soon = asyncio.Event()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(max_concurrent_polls)
        self.room = RecordBudget(settings.polling.max_records_in_flight, metrics.records_held)
        # An API whose page tokens expire between polls has every poll's token refused.
        self._token_rejections = Throttle()
        # A producer that gets the format wrong sends every message wrong.
        self._request_rejections = Throttle(clock=lambda: self.clock())
        # One cause, many lines: Kafka down fails the fingerprint reads of every batch
        # tracked again, at each retry; a producer retrying requests for unreadable batches.
        self._repeats = Throttle(clock=lambda: self.clock())
        self._stopping = False
        self.unauthorized = False
        self._auth_ok = asyncio.Event()
        self._auth_ok.set()
        self.on_publish_failure: Callable[[int, BaseException], None] | None = None
        # Reads one batch back from the state topic, all its fingerprints included
        # (PartitionOwner.load_batch): for a batch tracked again after it stopped or failed.
        self.load_batch: Callable[[int, str], Awaitable[BatchState | None]] | None = None
        self._load_attempts: dict[str, int] = {}
        # Gauges over every batch are computed when scraped, not on each poll.
        metrics.tracked_batches.set_function(lambda: len(self._active()))
        metrics.records_behind.set_function(lambda: sum(b.records_behind for b in self._active()))
        metrics.batches_in_backoff.set_function(lambda: sum(b.failures > 0 for b in self._active()))
        metrics.batches_unreadable.set_function(
            lambda: sum(len(w.unreadable) for w in self.workers.values())
        )
        metrics.finished_batches.set_function(
            lambda: sum(not b.active for w in self.workers.values() for b in w.batches.values())
        )
        metrics.fingerprints_held.set_function(
            lambda: sum(len(b.seen) for w in self.workers.values() for b in w.batches.values())
        )

    # ---- partitions -------------------------------------------------------------------

    def add_worker(self, worker: PartitionWorker) -> None:
        worker.epoch = next(self._epochs)
        self.workers[worker.partition] = worker
        self._by_epoch[worker.epoch] = worker
        self.due.live_epochs.add(worker.epoch)
        worker.publisher.on_failure = lambda exc: self._publisher_failed(worker, exc)
        now, wall = self.clock(), self.wall()
        for b in worker.batches.values():
            if b.active:
                self._schedule(worker, b.batch_id, now + self.policy.first_due_in(b, wall))
            elif self.policy.forgettable(b, wall) or b.chunks_to_clear:
                self._clear_soon.set()  # due, or restored while its chunks were cleared

    async def remove_worker(self, partition: int, timeout: float) -> None:
        """Stop polling a partition's batches and close its committer (revocation, shutdown)."""
        worker = self.workers.pop(partition, None)
        if worker is None:
            return
        worker.closed = True
        if worker.deferred is not None:
            worker.deferred.cancel()
        self._by_epoch.pop(worker.epoch, None)
        self.due.live_epochs.discard(worker.epoch)
        for batch_id in worker.batches:
            self.due.drop(batch_id)
        if worker.polls:
            _done, pending = await asyncio.wait(worker.polls, timeout=max(0.0, timeout / 2))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await worker.publisher.close(timeout=max(0.1, timeout / 2))

    def _publisher_failed(self, worker: PartitionWorker, exc: BaseException) -> None:
        if self.on_publish_failure is not None and not worker.closed:
            self.on_publish_failure(worker.partition, exc)

    # ---- requests ---------------------------------------------------------------------

    def read_request(
        self, key: bytes | None, value: bytes | None, partition: int, offset: int
    ) -> TrackingRequest | None:
        """A message of the requests topic as a request; None if it is refused, which is
        counted (every one) and logged (one WARNING a kind a minute, the rest at DEBUG)."""
        try:
            return decode_request(value, key)
        except RequestRejected as exc:
            reason = reject_reason(exc)
            self.metrics.invalid_input.labels("requests_topic", reason).inc()
            fields: dict[str, object] = {"partition": partition, "offset": offset}
            batch_id = readable_batch_id(value, key)
            if batch_id is not None:
                fields["batch_id"] = batch_id
            fields["reason"] = str(exc)
            self._request_rejections.log(
                reason, log, "warning", "tracking_request_rejected", **fields
            )
            return None

    def route(self, w: PartitionWorker, batch_id: str) -> int:
        """The partition a request for the batch belongs to: the one whose state holds the
        batch (this one, or another as the state view knows it); for a batch no partition
        holds, its ID's hash modulo the partition count (``canonical_partition``).

        The two differ for batches placed before partitions were added to the topics:
        routing by the hash alone would start such a batch again, from its first record,
        on another partition, and a stop would not reach it."""
        if batch_id in w.batches or batch_id in w.unreadable:
            return w.partition
        home = self.home_of(batch_id)
        if home is not None and 0 <= home < self.partitions:
            return home
        return canonical_partition(batch_id, self.partitions)

    def handle_request(
        self,
        w: PartitionWorker,
        req: TrackingRequest | None,
        offset: int,
        *,
        forwarded: bool = False,
    ) -> asyncio.Future[None]:
        """Apply one request of the partition (in order) and queue its unit of work;
        ``req`` None (refused by ``read_request``) only moves the offset on. A request
        that another partition ``forwarded`` here (``FORWARDED_HEADER``) is taken here.

        Its effect is applied at once, a stop included: nothing waits for a poll. Except
        for a batch being forgotten (kept past ``polling.finished_retention_s``): its
        chunks go a bounded number a commit, and until it is gone the request waits (a
        new batch of its ID would write chunks of the same keys), and so do the
        partition's later requests, in order.
        """
        if self._waiting(w) or (req is not None and self._forgetting(w, req.batch_id)):
            return self._defer(w, req, offset, forwarded)
        return self._handle(w, req, offset, forwarded)

    def _forgetting(self, w: PartitionWorker, batch_id: str) -> bool:
        b = w.batches.get(batch_id)
        return b is not None and self.policy.forgettable(b, self.wall())

    @staticmethod
    def _waiting(w: PartitionWorker) -> bool:
        return w.deferred is not None and not w.deferred.done()

    def _defer(
        self, w: PartitionWorker, req: TrackingRequest | None, offset: int, forwarded: bool
    ) -> asyncio.Future[None]:
        before = w.deferred

        async def later() -> None:
            if before is not None:
                with contextlib.suppress(Exception):
                    await before
            if req is not None:
                while self._forgetting(w, req.batch_id) and not w.closed:
                    self._clear_soon.set()
                    await asyncio.sleep(0.2)
            if w.closed:
                raise asyncio.CancelledError  # read again by the partition's next owner
            await self._handle(w, req, offset, forwarded)

        w.deferred = asyncio.ensure_future(later())
        return w.deferred

    def _handle(
        self, w: PartitionWorker, req: TrackingRequest | None, offset: int, forwarded: bool
    ) -> asyncio.Future[None]:
        try:
            return self._handle_now(w, req, offset, forwarded)
        except Exception as exc:
            self.request_failed(w, req, offset, exc)
            return self._send(w, [], offset + 1)

    def request_failed(
        self, w: PartitionWorker, req: TrackingRequest | None, offset: int, exc: Exception
    ) -> None:
        """Count and log a request whose handling raised (a fault of this service, or a
        batch whose state cannot be written: ``_apply``), which is then left, its offset
        committed with nothing else, as a refused request's is: counted in
        ``tracking_requests_total{result="unreadable"}``, one ERROR with its batch ID. Nothing
        of it was queued (``_apply`` raises before it changes the batch in memory), so the
        batch stays as Kafka has it. Read again instead (a reset), the request would fail
        again, at every owner of its partition, and hold up the partition's requests."""
        # Counted as a request for a batch whose state cannot be used: the one cause known
        # (a summary the writer refuses); the ERROR line tells it from the others.
        if req is not None and req.action == "stop":
            self.metrics.requests_received.labels("stop", "unreadable").inc()
        else:
            self.metrics.requests_received.labels("track", "unreadable").inc()
        action = req.action if req is not None else None
        log.error(
            "tracking_request_failed",
            batch_id=req.batch_id if req is not None else None,
            action=action,
            partition=w.partition,
            offset=offset,
            error=repr(exc)[:300],
            exc_info=exc,
        )

    def _handle_now(
        self, w: PartitionWorker, req: TrackingRequest | None, offset: int, forwarded: bool
    ) -> asyncio.Future[None]:
        next_offset = offset + 1
        if req is None:
            return self._send(w, [], next_offset)
        target = w.partition if forwarded else self.route(w, req.batch_id)
        if target != w.partition:
            # Requests may come with any partitioner; each batch lives on one partition.
            # The request is forwarded as it was read, in its own encoding: not the message,
            # whose whitespace and escapes have no bound of their own. It is marked, and
            # taken where it lands: two replicas that disagree on a batch's partition (a
            # view behind the other's) cannot send it back and forth.
            forward = OutMessage(
                topic=self.settings.kafka.requests_topic,
                key=req.batch_id.encode(),
                value=req.encode(),
                headers=[FORWARDED_HEADER],
                partition=target,
            )
            self.metrics.requests_received.labels(req.action, "forwarded").inc()
            return self._send(w, [forward], next_offset)
        if req.batch_id in w.unreadable:
            self.metrics.requests_received.labels(req.action, "unreadable").inc()
            self._repeats.log(
                "request_for_unreadable_batch",
                log,
                "warning",
                "request_for_unreadable_batch",
                batch_id=req.batch_id,
                action=req.action,
                error=w.unreadable[req.batch_id],
            )
            return self._send(w, [], next_offset)
        b, now = w.batches.get(req.batch_id), self.wall()
        if req.action == "stop":
            step = self.policy.stop(b, now)
            result = "stopped" if step else "not_tracked"
            self.metrics.requests_received.labels("stop", result).inc()
        else:
            step = self.policy.track(b, req, w.partition, now)
            self.metrics.requests_received.labels("track", step.note).inc()
        if step is None or not step.save:
            if step is not None and step.note == "already_finished":
                log.info("track_ignored_finished", batch_id=req.batch_id, status=step.state.status)
            return self._send(w, [], next_offset)
        fut = self._apply(w, step, next_offset)
        if step.note == "started":
            log.info(
                "tracking_started", batch_id=req.batch_id, expected_count=step.state.expected_count
            )
            if step.state.seen_loaded:
                self._schedule(w, req.batch_id, self.clock() + (step.poll_in or 0.0))
            else:
                # Tracked again: its first poll reads its fingerprints back from the state
                # topic, which shows them once this commit is done.
                w.resuming[req.batch_id] = fut
                fut.add_done_callback(lambda f: self._resumed(w, req.batch_id, f))
        return fut

    def _resumed(self, w: PartitionWorker, batch_id: str, commit: asyncio.Future[None]) -> None:
        """The commit that tracked a batch again is done: its first poll is due now.

        Not if the batch was tracked again once more meanwhile (that commit's end
        schedules it), nor while a poll of the batch runs (one of the generation before,
        which was still under way: at most one poll of a batch runs at a time, and that
        one schedules the batch when it ends, ``_poll``)."""
        if w.resuming.get(batch_id) is commit:
            del w.resuming[batch_id]
        elif batch_id in w.resuming:
            return  # tracked again once more: its own commit's end schedules it
        if commit.cancelled() or commit.exception() is not None or w.closed:
            return  # (a failed commit: the partition is restored from Kafka)
        current = w.batches.get(batch_id)
        if (
            current is not None
            and current.active
            and batch_id not in self.due
            and batch_id not in w.running
        ):
            self._schedule(w, batch_id, self.clock())

    def _send(
        self, w: PartitionWorker, messages: Sequence[Publishable], next_offset: int | None
    ) -> asyncio.Future[None]:
        return asyncio.ensure_future(w.publisher.publish(messages, next_offset))

    def _apply(
        self, w: PartitionWorker, step: Step, next_offset: int | None = None
    ) -> asyncio.Future[None]:
        """Make ``step`` the batch's state and queue what it publishes; the commit's future.

        The messages are made first: should they fail (a summary too large to write,
        ``state.encode_state``), the exception is raised with the batch in memory as it
        was, nothing queued (``state_records`` leaves its chunk log as it was too).

        The partition released (``w.closed``), its polls still finish the page they
        were reading, and their steps are committed by the publisher's close: the batch
        in memory is the step's all the same, so that a step made after it (a poll's
        failure after the flush of what it read) is made from it. Made from the batch
        as it stood before, it would commit a summary behind the one committed just
        before (its cursor and counts gone back, with the records' fingerprints kept),
        and the partition's next owner would never count those records."""
        b = step.state
        messages = self.writer.messages(step)
        w.batches[b.batch_id] = b
        if step.finished and not w.closed:  # (a closed partition's batches left due)
            self.due.drop(b.batch_id)
        if b.chunks_to_clear:
            self._clear_soon.set()  # chunks left on the topic (a big batch finished for good)
        if not messages and next_offset is None:
            return done()
        fut = self._send(w, messages, next_offset)
        fut.add_done_callback(lambda f: self._committed(f, step))
        return fut

    def _commit_held(self, w: PartitionWorker, step: Step) -> asyncio.Future[None]:
        """``_apply`` for a poll's step, whose records give their room back once committed.

        A step whose messages cannot be made is a commit that failed: its records' room is
        given back, and the partition is restored from Kafka (PublishFailed), since the
        poll put its fingerprints into the seen set it shares with the batch in memory
        (``Policy.commit``): left there, the records not published would be taken for
        published ones by the next poll."""
        held = step.size
        try:
            fut = self._apply(w, step)
        except Exception as exc:
            self.room.drop(held)
            log.error(
                "commit_not_made",
                batch_id=step.state.batch_id,
                partition=w.partition,
                error=repr(exc)[:300],
                detail="the partition is restored from Kafka",
            )
            failure = PublishFailed(f"partition {w.partition}: {exc!r}"[:300])
            self._publisher_failed(w, failure)
            raise failure from exc
        if held:
            self.room.to_commit(held)
            fut.add_done_callback(lambda _: self.room.committed(held))
        return fut

    def _committed(self, fut: asyncio.Future[None], step: Step) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.writer.committed(step)  # (a failed commit: the partition is restored)

    # ---- finished batches -------------------------------------------------------------

    def forget_finished(self) -> bool:
        """Forget the finished batches kept ``polling.finished_retention_s``: each owned
        partition's are dropped from memory and tombstoned, their chunks first and their
        summary last, in one commit of at most about ``MAX_FORGET_MESSAGES`` tombstones
        (queued behind the partition's other commits, so a tracking request applied after
        this starts a new batch, written after the tombstones). A batch with more chunks
        than that has them tombstoned over several rounds, its last chunks first, and is
        dropped with the round that takes its last ones (a request for it waits till
        then: ``handle_request``). A batch finished for good has the chunks that its
        finishing commit left tombstoned the same way at once, and is forgotten once its
        retention is over. A round waits for the previous round's commit. True if some
        are left for next time."""
        now, more = self.wall(), False
        for w in list(self.workers.values()):
            if w.closed:
                continue
            if w.clearing is not None and not w.clearing.done():
                more = True
                continue
            messages: list[Publishable] = []
            forgotten: Counter[str] = Counter()
            for b in list(w.batches.values()):
                forget = self.policy.forgettable(b, now)
                if not forget and not b.chunks_to_clear:
                    continue
                room = MAX_FORGET_MESSAGES - len(messages)
                if room <= 0:
                    more = True
                    break
                if len(b.chunks.written()) >= room:  # (its summary goes with its last chunk)
                    messages.extend(self.writer.clear(b, room))
                    more = True
                    continue
                if not forget:  # finished for good: its chunks go now, it stays
                    messages.extend(self.writer.clear(b, room))
                    continue
                del w.batches[b.batch_id]
                self._load_attempts.pop(b.batch_id, None)  # a failed read, then a stop
                messages.extend(self.writer.forget(b))
                forgotten[b.status] += 1
            if not messages:
                continue
            fut = self._send(w, messages, None)
            w.clearing = fut
            fut.add_done_callback(functools.partial(self._forgot, w.partition, forgotten))
        return more

    def _forgot(self, partition: int, forgotten: Counter[str], fut: asyncio.Future[None]) -> None:
        if fut.cancelled() or fut.exception() is not None or not forgotten:
            return  # (a failed commit: the partition is restored, and they are forgotten again)
        for status, n in forgotten.items():
            self.metrics.batches_forgotten.labels(status).inc(n)
        log.info(
            "batches_forgotten",
            partition=partition,
            batches=sum(forgotten.values()),
            by_status=dict(forgotten),
            retention_s=self.settings.polling.finished_retention_s,
        )

    async def forget_loop(self) -> None:
        """``forget_finished`` a few times per retention period (at most every 10 minutes),
        and again within a second while a round leaves some; until cancelled."""
        every = min(600.0, self.settings.polling.finished_retention_s / 4)
        delay = every
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._clear_soon.wait(), delay)
            self._clear_soon.clear()
            delay = 1.0 if self.forget_finished() else every

    # ---- scheduling -------------------------------------------------------------------

    def _schedule(self, w: PartitionWorker, batch_id: str, due: float) -> None:
        self.due.put(batch_id, due, w.epoch)
        self._wake.set()

    async def run(self) -> None:
        """Start polls when they are due, until stop()."""
        while not self._stopping:
            if self.unauthorized:
                await self._auth_ok.wait()
                continue
            head = self.due.head()
            now = self.clock()
            if head is None or head[0] > now:
                self._wake.clear()
                timeout = None if head is None else head[0] - now
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                continue
            await self._slots.acquire()
            head = self.due.head()
            if head is None or head[0] > self.clock() or self.unauthorized:
                self._slots.release()
                continue
            self.due.pop()
            due, epoch, batch_id = head
            worker = self._by_epoch[epoch]
            b = worker.batches.get(batch_id)
            if b is None or not b.active or batch_id in worker.running:
                # A poll of the batch runs still (one of a generation before, stopped and
                # tracked again meanwhile): two at once would publish its records twice.
                # That one schedules the batch when it ends (_poll).
                self._slots.release()
                continue
            self.metrics.poll_lateness.observe(max(0.0, self.clock() - due))
            task = asyncio.create_task(self._poll(worker, batch_id, due), name=f"poll-{batch_id}")
            worker.running[batch_id] = task
            worker.polls.add(task)
            task.add_done_callback(worker.polls.discard)
            task.add_done_callback(functools.partial(_ran, worker, batch_id))
            task.add_done_callback(lambda _t: self._slots.release())

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._auth_ok.set()

    def oldest_overdue(self) -> float:
        head = self.due.head()
        return max(0.0, self.clock() - head[0]) if head else 0.0

    def _active(self) -> list[BatchState]:
        return [b for w in self.workers.values() for b in w.batches.values() if b.active]

    def any_tracked_batch(self) -> str | None:
        return next((b.batch_id for b in self._active()), None)

    # ---- polling ----------------------------------------------------------------------

    async def _poll(self, w: PartitionWorker, batch_id: str, due: float) -> None:
        """One poll of a batch, the only one of the batch running (``PartitionWorker.
        running``); when it ends, the batch's next poll is scheduled.

        A poll stands for the batch's generation as it began. If the batch was stopped
        and tracked again meanwhile, the poll's delay is not the batch's (every path:
        its normal end, a retry of its fingerprints, a failure, a crash): the batch as it
        stands now gets its first poll at once, the one it would have had without this
        poll (or when the commit that tracked it again is done, ``_resumed``)."""
        delay: float | None = None
        b = w.batches.get(batch_id)
        began = None if b is None else (b.generation, b.tracked_at)
        try:
            # Every line logged during the poll (the API client's retries too) names the batch.
            with structlog.contextvars.bound_contextvars(batch_id=batch_id):
                delay = await self._poll_batch(w, batch_id)
        except PublishFailed:
            self.metrics.polls.labels("publish_failed").inc()
            return  # the partition is being restored from Kafka
        except Exception:
            self.metrics.polls.labels("error").inc()
            log.exception("poll_crashed", batch_id=batch_id)
            delay = self.policy.window()
        finally:
            _ran(w, batch_id, asyncio.current_task())
        if w.closed or self._stopping:
            return
        current = w.batches.get(batch_id)
        if current is None or not current.active or batch_id in self.due:
            return
        if (current.generation, current.tracked_at) != began:
            # Tracked again while this poll ran: its first poll was left to this one's end.
            if batch_id not in w.resuming:
                self._schedule(w, batch_id, self.clock())
            return
        if delay is not None:
            # A poll's window counts from when it was due (no drift), a failed poll's
            # backoff from when it failed: a poll that ran long (timeouts, many pages) would
            # otherwise retry at once, and lose a step of its backoff.
            start = self.clock() if current.failures else due
            self._schedule(w, batch_id, self.policy.next_due(start, delay, self.clock()))

    async def _poll_batch(self, w: PartitionWorker, batch_id: str) -> float | None:
        """Poll once; the delay to the next poll, or None if none is to follow from it."""
        b = await self._ready(w, batch_id)
        if not isinstance(b, BatchState):
            return b
        begun = self.policy.begin(b, self.wall())
        if isinstance(begun, Step):  # expired
            await self._apply(w, begun)
            return None
        poll = begun
        committing: deque[asyncio.Future[None]] = deque()
        last: Step | None = None
        room, page_room = self.room, self.settings.rightfoot.page_limit
        reserved = 0  # room held for the page being read
        try:
            while not poll.done:
                if not await room.reserve(page_room, poll.pending.size):
                    # Stalled (service/budget.py): commit what this poll gathered, ask again.
                    last = self._flush(w, poll, committing) or last
                    continue
                reserved = page_room
                page = await self._fetch(w, poll)
                while len(committing) >= MAX_COMMITS_IN_FLIGHT:
                    await committed(committing.popleft())
                # No await from here until the step is applied: a step is made from the
                # batch as it stands, and nothing may change the batch in between.
                before = poll.pending.size
                step = poll.page(w.batches.get(batch_id), page, self.wall())
                # Room is kept for the new records the page brought, the rest given back.
                kept = poll.pending.size - before + (step.size if step is not None else 0)
                room.settle(reserved, kept)
                reserved = 0
                if step is not None:
                    last = step
                    committing.append(self._commit_held(w, step))
            await settled(committing)
        except RequestAborted:
            await settled(committing)
            return None  # the partition is being released
        except ApiError as exc:
            # What the poll read before the error stands: the pages were read in order, so
            # their records go to a commit with the cursor past them (dropped, they would be
            # read again and dropped again for as long as the failing page lasts). The error
            # is recorded on top of it, on the batch as it stands then.
            if isinstance(exc, PageTokenLoop):
                self.metrics.invalid_input.labels("api", "page_token_loop").inc()
            self._flush(w, poll, committing)
            await settled(committing)
            return await self._poll_failed(w, poll, exc)
        except asyncio.CancelledError:
            # Cancelled (its partition released, the poll still running at half of the
            # release's timeout: remove_worker): its commits under way are not waited
            # for, or the release would wait for them, shielded, up to their deadline (kafka.
            # COMMIT_SHARE_OF_TRANSACTION_TIMEOUT). Each lands, or fails (the publisher's
            # close ends it; the next owner's producer fences it); their callbacks count
            # them and give their room back. The batch in memory may be ahead of Kafka
            # meanwhile, only in the worker being released, dropped with it.
            abandon(committing)
            raise
        except BaseException:
            await settled(committing)
            raise
        finally:
            if reserved:  # the page was not read
                room.settle(reserved, 0)
            room.drop(poll.pending.size)  # read and not committed: dropped with the poll
        if last is None or not poll.current(w.batches.get(batch_id)):
            # Stopped (or tracked again) while it read, or while its last commit was under
            # way: that poll is dropped, and its delay is not the batch's.
            return None
        self.metrics.polls.labels("ok").inc()
        return last.poll_in

    def _flush(
        self, w: PartitionWorker, poll: Poll, committing: deque[asyncio.Future[None]]
    ) -> Step | None:
        """Commit what ``poll`` has read so far (``Poll.flush``); the step, if any."""
        flushed = poll.flush(w.batches.get(poll.batch_id), self.wall())
        if flushed is not None:
            committing.append(self._commit_held(w, flushed))
        return flushed

    async def _ready(self, w: PartitionWorker, batch_id: str) -> BatchState | float | None:
        """The batch to poll, its fingerprints in memory; else the delay before trying
        again, or None if it is no longer to be polled."""
        b = w.batches.get(batch_id)
        if b is not None and b.active and not b.seen_loaded:
            retry = await self._load_seen(w, b)
            if retry is not None:
                return retry
            b = w.batches.get(batch_id)
        if b is None or not b.active or not b.seen_loaded:
            return None
        return b

    async def _load_seen(self, w: PartitionWorker, b: BatchState) -> float | None:
        """Read back the fingerprints of a batch tracked again after it stopped or failed:
        None once its seen set holds them (or the batch changed meanwhile, or its records
        are not understood: it is left unreadable, as a restore leaves it), else the delay
        before the poll that tries again. Nothing of the batch is read from the API before.
        """
        batch_id, started = b.batch_id, self.clock()
        try:
            if self.load_batch is None:
                raise RuntimeError("no state topic to read fingerprints from")
            stored = await self.load_batch(w.partition, batch_id)
        except ValueError as exc:  # its records are not understood: reading again won't do
            if self._unloaded(w, b) is not None:
                self._unreadable(w, batch_id, exc)
            return None
        except Exception as exc:  # the read failed (Kafka unreachable): it is tried again
            self.metrics.fingerprint_loads.labels("failed").inc()
            if self._unloaded(w, b) is None:
                # Stopped or tracked again while it read: the batch as it stands is not
                # this poll's to retry (its own first poll reads its fingerprints).
                self._load_attempts.pop(batch_id, None)
                return None
            delay = self.policy.backoff(self._load_attempt(batch_id), self.policy.backoff_max_s)
            self._repeats.log(
                f"fingerprints_load_failed:{type(exc).__name__}",
                log,
                "warning",
                "fingerprints_load_failed",
                batch_id=batch_id,
                error=repr(exc)[:300],
                retry_in_s=round(delay, 2),
            )
            return delay
        current = self._unloaded(w, b)
        if current is None:
            self._load_attempts.pop(batch_id, None)
            return None  # stopped or tracked again while it read, or loaded by another poll
        if stored is None or stored.generation != current.generation or not stored.active:
            # The commit that tracked it again is not yet visible to a read_committed
            # consumer (its transaction's markers follow the commit): read again shortly.
            self.metrics.fingerprint_loads.labels("not_visible").inc()
            attempt = self._load_attempt(batch_id)
            delay = self.policy.backoff(attempt, self.policy.backoff_max_s, first=0.1)
            log.debug("fingerprints_not_visible_yet", batch_id=batch_id, retry_in_s=delay)
            return delay
        self._load_attempts.pop(batch_id, None)
        current.seen, current.seen_loaded = stored.seen, True
        self.metrics.fingerprint_loads.labels("loaded").inc()
        log.info(
            "fingerprints_loaded",
            batch_id=batch_id,
            fingerprints=len(stored.seen),
            took_s=round(self.clock() - started, 3),
        )
        return None

    def _unloaded(self, w: PartitionWorker, b: BatchState) -> BatchState | None:
        """The batch ``b`` as it stands now if its fingerprints are still to be read back;
        None if it was stopped or tracked again meanwhile, or its fingerprints loaded."""
        current = w.batches.get(b.batch_id)
        if (
            current is None
            or not current.active
            or current.generation != b.generation
            or current.seen_loaded
        ):
            return None
        return current

    def _unreadable(self, w: PartitionWorker, batch_id: str, exc: ValueError) -> None:
        """Leave a batch whose stored records are not understood as a restore leaves it:
        not polled, its requests refused, its state on the topic as it is."""
        w.batches.pop(batch_id, None)
        w.unreadable[batch_id] = str(exc)[:300]
        self.due.drop(batch_id)
        self._load_attempts.pop(batch_id, None)
        self.metrics.fingerprint_loads.labels("failed").inc()
        state_unreadable(self.metrics, batch_id, exc)

    def _load_attempt(self, batch_id: str) -> int:
        """Count a read of a batch's fingerprints that did not load them: how many in a row."""
        attempts = self._load_attempts[batch_id] = self._load_attempts.get(batch_id, 0) + 1
        return attempts

    async def _fetch(self, w: PartitionWorker, poll: Poll) -> Page:
        """The poll's next page; a rejected page token restarts from the first page."""
        while True:
            try:
                return await self.source.fetch_page(
                    poll.batch_id, poll.token, stop=lambda: w.closed, content_ids=poll.content_ids
                )
            except (ApiBadRequest, ApiNotFound) as exc:
                b = w.batches.get(poll.batch_id)
                if poll.token is None or b is None:
                    raise
                # The page token is no longer valid (400; or 404, which the pages document
                # only for the batch: a vendor may say so of a page it no longer has): read
                # again from the first page, whose 404 would be the batch's own. What was
                # published is recognised by its fingerprint and skipped.
                self.metrics.invalid_input.labels("api", "page_token_rejected").inc()
                self._token_rejections.log(
                    "page_token_rejected",
                    log,
                    "warning",
                    "page_token_rejected",
                    batch_id=poll.batch_id,
                    restarts=poll.restarts,
                )
                if not poll.token_rejected(b):
                    raise PageTokenRejected(str(exc.args[0]), status=400) from None
            except (ApiServerError, ApiTransportError, ApiMalformedResponse) as exc:
                b = w.batches.get(poll.batch_id)
                if b is None or not poll.token_failing(b):
                    raise
                # The page at this token keeps failing, poll after poll: the API may no
                # longer take the token (Policy.token_failing). The first page is tried.
                self.metrics.invalid_input.labels("api", "page_failing").inc()
                self._token_rejections.log(
                    "page_failing",
                    log,
                    "warning",
                    "page_failing",
                    batch_id=poll.batch_id,
                    failures=b.failures + 1,
                    error=str(exc),
                )

    async def _poll_failed(self, w: PartitionWorker, poll: Poll, exc: ApiError) -> float | None:
        current = w.batches.get(poll.batch_id)
        if current is None or not poll.current(current):
            return None
        step = self.policy.failed(current, exc, self.wall())
        self.writer.poll_failed(step, exc)
        if isinstance(exc, ApiUnauthorized):
            self._set_unauthorized(exc, poll.batch_id)
        await self._apply(w, step)
        if not poll.current(w.batches.get(poll.batch_id)):
            return None  # stopped or tracked again while it committed: not its delay
        return step.poll_in

    def _set_unauthorized(self, exc: ApiError, batch_id: str) -> None:
        if not self.unauthorized:
            log.error("api_key_rejected", batch_id=batch_id, error=str(exc))
        self.unauthorized = True
        self._auth_ok.clear()
        self.metrics.api_unauthorized.set(1)

    def set_authorized(self) -> None:
        if self.unauthorized:
            log.info("api_key_accepted")
        self.unauthorized = False
        self.metrics.api_unauthorized.set(0)
        self._auth_ok.set()
        self._wake.set()
