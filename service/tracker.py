"""The tracker: schedules every tracked batch, polls it, and decides its outcome.

A newly tracked batch is polled at once, then at a random time in the polling
window after each poll's scheduled time (no drift). A poll pages from the
batch's stored cursor to the end, publishes only records not yet published and
commits its progress with its events. Errors back off per batch; a 401 pauses
all polling until the key works again. Every change of a batch's progress goes
through its partition's publisher, so what is in Kafka is the truth: after a
failed commit the partition is restored from the state topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import random
import time
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import cast

import structlog

from service.api import ApiForbidden, RequestAborted, RightfootClient
from service.config import Settings
from service.errors import (
    ApiBadRequest,
    ApiError,
    ApiNotFound,
    ApiRateLimited,
    ApiUnauthorized,
)
from service.events import BalanceEvents, EventFactory, OutMessage, Publishable
from service.kafka import PartitionPublisher, PublishFailed, canonical_partition
from service.metrics import Metrics
from service.records import BalanceRecord, InvalidRecord, Page, fingerprint, status_name
from service.requests import TrackingRequest
from service.seen import SeenSet
from service.state import RESUMABLE, BatchState, Status, state_records

log = structlog.get_logger(__name__)

# Restarts from the first page within one poll after page tokens are rejected (400);
# past that the poll backs off like any transient failure and tries again later.
MAX_TOKEN_RESTARTS = 3
# A poll goes on reading while this many of its commits are under way.
MAX_COMMITS_IN_FLIGHT = 2


class PageTokenRejected(ApiError):
    """Page tokens kept being rejected within one poll."""


@dataclass(slots=True)
class PartitionWorker:
    """The batches of one owned requests partition and the publisher that commits them."""

    partition: int
    publisher: PartitionPublisher
    batches: dict[str, BatchState] = field(default_factory=dict)
    polls: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    epoch: int = 0
    closed: bool = False


@dataclass(slots=True)
class _Pending:
    """What one poll has read and not yet committed."""

    messages: list[OutMessage] = field(default_factory=list)  # dead letters
    records: list[BalanceRecord] = field(default_factory=list)  # new, to publish as events
    digests: set[int] = field(default_factory=set)  # fingerprints
    dead_lettered: int = 0
    dlq_reasons: Counter[str] = field(default_factory=Counter)
    received_at: float = 0.0

    @property
    def new_records(self) -> int:
        return len(self.records)

    @property
    def size(self) -> int:
        return self.new_records + self.dead_lettered

    @property
    def counts(self) -> Counter[str]:
        """New records per ``balance_status`` name."""
        counts: Counter[str] = Counter()
        for code, n in Counter(rec.balance_status_code for rec in self.records).items():
            counts[status_name(code)] += n
        return counts


@dataclass(slots=True)
class _FullRead:
    """A read of a whole batch from its first page, within one poll."""

    sweep: bool  # started because the API's count was ahead of the records seen
    seen_before: int  # records seen when it began
    pages: int = 0


@dataclass(slots=True)
class _Read:
    """Where one poll stands in its batch's pages."""

    token: str | None  # the page to read next
    cursor: str | None  # where the next poll starts: moves only with pages read in order
    full: _FullRead | None = None  # set while the poll reads the batch from its first page
    restarts: int = 0  # page tokens rejected in this poll


@dataclass(slots=True)
class _Commit:
    """A poll's progress, ready to publish: the state after it and its messages."""

    state: BatchState
    messages: list[Publishable]
    counts: Counter[str]
    dlq_reasons: Counter[str]


async def _settled(commits: deque[asyncio.Future[None]]) -> None:
    """Wait for each commit in order; the first failure is raised (the later ones fail too)."""
    try:
        while commits:
            commit = commits.popleft()
            if not commit.cancelled():
                await commit
    finally:
        for commit in commits:
            commit.add_done_callback(lambda f: f.cancelled() or f.exception())
        commits.clear()


def _first_sight(b: BatchState, pending: _Pending, event_id: str) -> bool:
    """True, and remembered, if this event was neither published nor read earlier in this poll."""
    d = b.fingerprint(event_id)
    if d in b.seen or d in pending.digests:
        return False
    pending.digests.add(d)
    return True


class Tracker:
    def __init__(
        self,
        settings: Settings,
        *,
        client: RightfootClient,
        metrics: Metrics,
        factory: EventFactory,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        max_concurrent_polls: int = 512,
    ) -> None:
        self.settings = settings
        self.cfg = settings.polling
        self.client = client
        self.metrics = metrics
        self.factory = factory
        self.clock = clock
        self.wall = wall
        self.rng = rng or random.Random()
        self.workers: dict[int, PartitionWorker] = {}
        self.partitions = settings.kafka.partitions
        self._epochs = itertools.count(1)
        self._by_epoch: dict[int, PartitionWorker] = {}
        self._seq = itertools.count()
        self._heap: list[tuple[float, int, int, str]] = []
        self._due: dict[str, tuple[float, int]] = {}
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(max_concurrent_polls)
        self._stopping = False
        self.unauthorized = False
        self._auth_ok = asyncio.Event()
        self._auth_ok.set()
        self._backoff: set[str] = set()
        self.on_publish_failure: Callable[[int, BaseException], None] | None = None
        # Gauges over every batch are computed when scraped, not on each poll.
        metrics.tracked_batches.set_function(lambda: len(self._active()))
        metrics.records_behind.set_function(lambda: sum(b.records_behind for b in self._active()))
        metrics.batches_in_backoff.set_function(lambda: len(self._backoff))

    # ---- partitions -------------------------------------------------------------------

    def add_worker(self, worker: PartitionWorker) -> None:
        worker.epoch = next(self._epochs)
        self.workers[worker.partition] = worker
        self._by_epoch[worker.epoch] = worker
        worker.publisher.on_failure = lambda exc: self._publisher_failed(worker, exc)
        now, wall = self.clock(), self.wall()
        for b in worker.batches.values():
            if b.active:
                if b.last_poll_at is None:
                    due = now
                else:
                    due = now + max(0.0, b.last_poll_at + self._window() - wall)
                self._schedule(worker, b.batch_id, due)

    async def remove_worker(self, partition: int, timeout: float) -> None:
        """Stop polling a partition's batches and close its publisher (revocation, shutdown)."""
        worker = self.workers.pop(partition, None)
        if worker is None:
            return
        worker.closed = True
        self._by_epoch.pop(worker.epoch, None)
        for batch_id in worker.batches:
            self._due.pop(batch_id, None)
            self._backoff.discard(batch_id)
        polls = list(worker.polls.values())
        if polls:
            _done, pending = await asyncio.wait(polls, timeout=max(0.0, timeout / 2))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await worker.publisher.close(timeout=max(0.1, timeout / 2))

    def _publisher_failed(self, worker: PartitionWorker, exc: BaseException) -> None:
        if self.on_publish_failure is not None and not worker.closed:
            self.on_publish_failure(worker.partition, exc)

    # ---- requests ---------------------------------------------------------------------

    def handle_request(
        self, worker: PartitionWorker, req: TrackingRequest | None, raw: bytes | None, offset: int
    ) -> asyncio.Future[None]:
        """Apply one request of the partition (in order) and queue its unit of work.

        The in-memory effect is applied at once; if the unit fails to commit, the
        partition is restored from Kafka, so nothing is applied that Kafka lacks.
        """
        next_offset = offset + 1
        if req is None:
            return self._publish(worker, [], next_offset)
        target = canonical_partition(req.batch_id, self.partitions)
        if target != worker.partition:
            # Requests may come with any partitioner; each batch lives on one partition.
            forward = OutMessage(
                topic=self.settings.kafka.requests_topic,
                key=req.batch_id.encode(),
                value=raw,
                headers=[],
                partition=target,
            )
            self.metrics.requests_received.labels(req.action, "forwarded").inc()
            return self._publish(worker, [forward], next_offset)
        existing = worker.batches.get(req.batch_id)
        if req.action == "stop":
            return self._stop(worker, existing, next_offset)
        return self._track(worker, req, existing, next_offset)

    def _track(
        self, w: PartitionWorker, req: TrackingRequest, b: BatchState | None, next_offset: int
    ) -> asyncio.Future[None]:
        if b is not None and b.active:
            if req.expected_count is not None and b.expected_count is None:
                b.expected_count = req.expected_count
                self.metrics.requests_received.labels("track", "updated").inc()
                return self._publish(w, self._state_msgs(b), next_offset)
            self.metrics.requests_received.labels("track", "already_tracked").inc()
            return self._publish(w, [], next_offset)
        if b is not None and b.status not in RESUMABLE:
            self.metrics.requests_received.labels("track", "already_finished").inc()
            log.info("track_ignored_finished", batch_id=req.batch_id, status=b.status)
            return self._publish(w, [], next_offset)
        now = self.wall()
        if b is None:
            b = BatchState(batch_id=req.batch_id, partition=w.partition, tracked_at=now)
        else:  # failed or stopped before: resume where it stood
            b.generation += 1
            b.status, b.reason, b.failures, b.not_found_since = "tracking", None, 0, None
            b.tracked_at, b.last_new_at = now, None
        b.expected_count = req.expected_count if req.expected_count else b.expected_count
        w.batches[b.batch_id] = b
        started = self.factory.lifecycle(
            b.batch_id,
            "tracking_started",
            generation=b.generation,
            expected_count=b.expected_count,
            records_published=b.published,
        )
        self.metrics.requests_received.labels("track", "started").inc()
        log.info("tracking_started", batch_id=b.batch_id, expected_count=b.expected_count)
        fut = self._publish(w, [started, *self._state_msgs(b)], next_offset)
        self._schedule(w, b.batch_id, self.clock())
        return fut

    def _stop(
        self, w: PartitionWorker, b: BatchState | None, next_offset: int
    ) -> asyncio.Future[None]:
        if b is None or not b.active:
            self.metrics.requests_received.labels("stop", "not_tracked").inc()
            return self._publish(w, [], next_offset)
        self.metrics.requests_received.labels("stop", "stopped").inc()

        async def stop_after_poll() -> None:
            poll = w.polls.get(b.batch_id)
            if poll is not None:
                await asyncio.wait({poll})
            current = w.batches[b.batch_id]
            if current.active:
                await self._finish(w, current, "stopped", "stopped by request", next_offset)
            else:
                await w.publisher.publish([], next_offset)

        self._due.pop(b.batch_id, None)
        return asyncio.ensure_future(stop_after_poll())

    def _publish(
        self, w: PartitionWorker, messages: list[OutMessage], next_offset: int | None = None
    ) -> asyncio.Future[None]:
        return asyncio.ensure_future(w.publisher.publish(messages, next_offset))

    # ---- scheduling -------------------------------------------------------------------

    def _window(self) -> float:
        return self.rng.uniform(self.cfg.interval_min_s, self.cfg.interval_max_s)

    def _schedule(self, w: PartitionWorker, batch_id: str, due: float) -> None:
        self._due[batch_id] = (due, w.epoch)
        heapq.heappush(self._heap, (due, next(self._seq), w.epoch, batch_id))
        self._wake.set()

    def _next_due(self) -> tuple[float, int, str] | None:
        while self._heap:
            due, _, epoch, batch_id = self._heap[0]
            if self._due.get(batch_id) == (due, epoch) and epoch in self._by_epoch:
                return due, epoch, batch_id
            heapq.heappop(self._heap)
        return None

    async def run(self) -> None:
        """Start polls when they are due, until stop()."""
        while not self._stopping:
            if self.unauthorized:
                await self._auth_ok.wait()
                continue
            head = self._next_due()
            now = self.clock()
            if head is None or head[0] > now:
                self._wake.clear()
                timeout = None if head is None else head[0] - now
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                continue
            await self._slots.acquire()
            head = self._next_due()
            if head is None or head[0] > self.clock() or self.unauthorized:
                self._slots.release()
                continue
            due, epoch, batch_id = head
            heapq.heappop(self._heap)
            del self._due[batch_id]
            worker = self._by_epoch[epoch]
            b = worker.batches.get(batch_id)
            if b is None or not b.active:
                self._slots.release()
                continue
            lateness = max(0.0, self.clock() - due)
            self.metrics.poll_lateness.observe(lateness)
            task = asyncio.create_task(self._poll(worker, b, due), name=f"poll-{batch_id}")
            worker.polls[batch_id] = task
            task.add_done_callback(lambda _t: self._slots.release())

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._auth_ok.set()

    def oldest_overdue(self) -> float:
        head = self._next_due()
        return max(0.0, self.clock() - head[0]) if head else 0.0

    def _active(self) -> list[BatchState]:
        return [b for w in self.workers.values() for b in w.batches.values() if b.active]

    # ---- polling ----------------------------------------------------------------------

    async def _poll(self, w: PartitionWorker, b: BatchState, due: float) -> None:
        delay: float | None
        try:
            # Every line logged during the poll (the API client's retries too) names the batch.
            with structlog.contextvars.bound_contextvars(batch_id=b.batch_id):
                delay = await self._poll_batch(w, b)
        except PublishFailed:
            self.metrics.polls.labels("publish_failed").inc()
            return  # the partition is being restored from Kafka
        except Exception:
            self.metrics.polls.labels("error").inc()
            log.exception("poll_crashed", batch_id=b.batch_id)
            delay = self._window()
        finally:
            w.polls.pop(b.batch_id, None)
        if delay is None or w.closed or self._stopping:
            return
        current = w.batches.get(b.batch_id)
        if current is not None and current.active and b.batch_id not in self._due:
            self._schedule(w, b.batch_id, max(self.clock(), due + delay))

    async def _poll_batch(self, w: PartitionWorker, b: BatchState) -> float | None:
        """Poll once; return the delay to the next poll, or None if the batch finished."""
        if self.wall() - b.tracked_at >= self.cfg.max_age_s:
            reason = self._expired_reason(b, b.records_seen, b.total_processed)
            await self._finish(w, b, "expired", reason)
            return None
        try:
            finished = await self._read_pages(w, b)
        except RequestAborted:
            return None  # the partition is being released
        except ApiError as exc:
            # A long poll commits as it goes: what it committed before the error stands,
            # and the error is recorded on top of it, not on the state the poll began with.
            return await self._poll_failed(w, w.batches.get(b.batch_id, b), exc)
        self.metrics.polls.labels("ok").inc()
        self._backoff.discard(b.batch_id)
        return None if finished else self._window()

    async def _poll_failed(self, w: PartitionWorker, b: BatchState, exc: ApiError) -> float | None:
        """Record a failed poll; return the delay to the next poll, or None if the batch failed."""
        if isinstance(exc, ApiUnauthorized):
            self.metrics.polls.labels("unauthorized").inc()
            self._set_unauthorized(exc, w, b)
            return self._window()
        if isinstance(exc, ApiNotFound):
            return await self._not_found(w, b, exc)
        if isinstance(exc, ApiForbidden | ApiBadRequest):
            self.metrics.polls.labels("error").inc()
            await self._finish(w, b, "failed", f"api_{exc.status}: {exc.args[0]}")
            return None
        return await self._backing_off(w, b, exc)

    async def _not_found(self, w: PartitionWorker, b: BatchState, exc: ApiNotFound) -> float | None:
        self.metrics.polls.labels("not_found").inc()
        now = self.wall()
        first = b.not_found_since if b.not_found_since is not None else now
        if now - first >= self.cfg.not_found_grace_s:
            await self._finish(w, b, "failed", f"api_not_found: {exc.args[0]}")
            return None
        log.info("batch_not_found_yet", batch_id=b.batch_id, since_s=round(now - first, 1))
        updated = replace(b, not_found_since=first, last_poll_at=now)
        await w.publisher.publish(self._state_msgs(updated))
        self._commit_local(w, updated)
        return self._window()

    async def _backing_off(self, w: PartitionWorker, b: BatchState, exc: ApiError) -> float:
        self.metrics.polls.labels("error").inc()
        failures = b.failures + 1
        delay: float = min(
            self.settings.rightfoot.backoff_max_s,
            self._window() * float(2 ** min(failures - 1, 20)),
        )
        if isinstance(exc, ApiRateLimited) and exc.retry_after is not None:
            delay = max(delay, exc.retry_after)
        log.warning(
            "poll_failed",
            batch_id=b.batch_id,
            error=str(exc),
            failures=failures,
            retry_in_s=round(delay, 2),
        )
        updated = replace(b, failures=failures, last_poll_at=self.wall())
        await w.publisher.publish(self._state_msgs(updated))
        self._commit_local(w, updated)
        self._backoff.add(b.batch_id)
        return delay

    def _set_unauthorized(self, exc: ApiError, w: PartitionWorker, b: BatchState) -> None:
        if not self.unauthorized:
            log.error("api_key_rejected", batch_id=b.batch_id, error=str(exc))
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

    def any_tracked_batch(self) -> str | None:
        for w in self.workers.values():
            for b in w.batches.values():
                if b.active:
                    return b.batch_id
        return None

    async def _read_pages(self, w: PartitionWorker, b: BatchState) -> bool:
        """Page from the cursor to the end, sweeping if the API's count says so.

        Returns True if the batch finished. Progress is committed every
        ``polling.max_records_per_transaction`` records, and the next pages are read
        while that commit is under way: at most MAX_COMMITS_IN_FLIGHT commits of the
        poll are in flight, and the partition's publisher keeps them in order.

        The API lists a batch in an order it does not document, and a record may be
        listed behind the cursor after the poll has passed its place. When the last
        page's ``total_processed`` is ahead of the records seen, the poll sweeps: it
        reads the batch again from its first page, keeps what is new (fingerprints
        recognise the rest) and stops once the count is reached. The cursor moves only
        with the pages read in order, never with a sweep.
        """
        read = _Read(token=b.cursor, cursor=b.cursor)
        if b.cursor is None:
            read.full = _FullRead(sweep=False, seen_before=b.records_seen)
        pending = _Pending()
        committing: deque[asyncio.Future[None]] = deque()
        try:
            while True:
                page = await self._fetch(w, b, read, pending)
                if not pending.received_at:
                    pending.received_at = self.clock()
                self._collect(b, page.records, page.invalid, pending)
                last = self._advance(b, read, page, pending)
                if last or pending.size >= self.cfg.max_records_per_transaction:
                    total = page.total_processed
                    updates = self._after_read(b, pending, total, read.full) if last else {}
                    outcome = self._completion(b, pending, updates) if last else None
                    commit = self._prepare_commit(b, pending, read.cursor, outcome, updates)
                    pending = _Pending()
                    if commit is not None:
                        b = commit.state
                        if len(committing) >= MAX_COMMITS_IN_FLIGHT:
                            await committing.popleft()
                        committing.append(asyncio.ensure_future(self._publish_commit(w, commit)))
                if last:
                    await _settled(committing)
                    return b.status != "tracking"
        except BaseException:
            # What this poll committed stands; a commit that failed (the partition is
            # being restored) outranks the error that ended the poll.
            await _settled(committing)
            raise

    async def _fetch(
        self, w: PartitionWorker, b: BatchState, read: _Read, pending: _Pending
    ) -> Page:
        """The page at ``read.token``; a rejected page token restarts from the first page."""
        while True:
            try:
                return await self.client.fetch_page(b.batch_id, read.token, stop=lambda: w.closed)
            except ApiBadRequest as exc:
                if read.token is None:
                    raise
                # The page token is no longer valid: read again from the first page;
                # what was published is recognised by its fingerprint and skipped.
                log.warning("page_token_rejected", batch_id=b.batch_id, restarts=read.restarts)
                self.metrics.invalid_input.labels("api", "page_token_rejected").inc()
                read.restarts += 1
                if read.restarts > MAX_TOKEN_RESTARTS:
                    raise PageTokenRejected(str(exc.args[0]), status=400) from None
                read.token = None
                if read.full is None:
                    read.full = _FullRead(sweep=False, seen_before=b.records_seen + pending.size)

    def _advance(self, b: BatchState, read: _Read, page: Page, pending: _Pending) -> bool:
        """Move past ``page``; True when the poll has read all it will."""
        used = read.token
        if page.has_more:
            read.token = page.next_page_token
        last = not page.has_more
        total = page.total_processed
        sweeping = read.full is not None and read.full.sweep
        if read.full is not None:
            read.full.pages += 1
        if not sweeping:
            read.cursor = used if last else read.token
        elif total is not None and b.records_seen + pending.size >= total:
            return True  # the sweep found every record the count says exists
        if last and read.full is None and self._sweep_due(b, pending, total):
            read.full = _FullRead(sweep=True, seen_before=b.records_seen + pending.size)
            read.token = None
            return False
        return last

    def _collect(
        self,
        b: BatchState,
        records: list[BalanceRecord],
        invalid: list[InvalidRecord],
        pending: _Pending,
    ) -> None:
        # Once per record: _first_sight and the counters inlined, lookups hoisted; the
        # events are written when they are sent (events.BalanceEvents).
        fresh, append = pending.digests, pending.records.append
        if b.fingerprint is not fingerprint:  # a batch resumed from an older state version
            for rec in records:
                if _first_sight(b, pending, rec.event_id):
                    append(rec)
        else:
            recent, remembered = b.seen.recent, b.seen.sorted  # SeenSet.__contains__, inlined
            n = len(remembered)
            for rec in records:
                eid = rec.event_id
                d = int(eid[19:23] + eid[24:], 16)  # records.fingerprint, inlined
                if d in recent or d in fresh:
                    continue
                if n:
                    i = bisect_left(remembered, d)
                    if i < n and remembered[i] == d:
                        continue
                fresh.add(d)
                append(rec)
        for bad in invalid:
            if not _first_sight(b, pending, bad.event_id):
                continue
            pending.messages.append(self.factory.invalid(b.batch_id, bad))
            pending.dead_lettered += 1
            pending.dlq_reasons[bad.reason] += 1
            self.metrics.invalid_input.labels("api", bad.reason).inc()
            log.warning(
                "record_dead_lettered", batch_id=b.batch_id, reason=bad.reason, detail=bad.detail
            )

    # ---- reconciliation and completion ---------------------------------------------------

    def _idle(self, b: BatchState, pending: _Pending, now: float) -> bool:
        """No new record for ``polling.complete_after_idle_s`` (and some record ever)."""
        return (
            pending.size == 0
            and b.last_new_at is not None
            and now - b.last_new_at >= self.cfg.complete_after_idle_s
        )

    def _sweep_due(self, b: BatchState, pending: _Pending, total: int | None) -> bool:
        """Whether a poll that reached the end should read the batch again from page 1."""
        now = self.wall()
        if total is not None:
            if total <= b.records_seen + pending.size:
                return False  # nothing missing by the count (a smaller count: see README)
            return b.next_sweep_at is None or now >= b.next_sweep_at
        # No count: only a full read can tell what was listed behind the cursor. One runs
        # every sweep_interval_s, and one more before the batch completes for idleness.
        if b.last_sweep_at is None or now - b.last_sweep_at >= self.cfg.sweep_interval_s:
            return True
        return (
            self._idle(b, pending, now)
            and b.last_new_at is not None
            and b.last_sweep_at < b.last_new_at
        )

    def _after_read(
        self, b: BatchState, pending: _Pending, total: int | None, full: _FullRead | None
    ) -> dict[str, object]:
        """What a poll that reached the end changes in the batch's reconciliation state."""
        updates: dict[str, object] = {"total_processed": total}
        if full is None:
            return updates
        now = self.wall()
        seen = b.records_seen + pending.size
        found = seen - full.seen_before
        behind = 0 if total is None else total - seen
        # A poll that began at the first page (a batch of one page, a new batch) is a full
        # read too; it stands for a sweep only when one was due.
        if (
            not full.sweep
            and behind <= 0
            and (total is not None or not self._sweep_due(b, pending, None))
        ):
            return updates
        fruitless = behind > 0 and found == 0
        failures = b.sweep_failures + 1 if fruitless else 0
        retry_in: float | None = None
        if fruitless:  # the count may be wrong: space the next sweeps out
            retry_in = min(
                self.cfg.sweep_backoff_max_s, self._window() * float(2 ** min(failures - 1, 20))
            )
        updates.update(
            last_sweep_at=now,
            sweep_failures=failures,
            next_sweep_at=None if retry_in is None else now + retry_in,
        )
        if full.sweep:
            outcome = "reconciled" if behind <= 0 else "partial" if found else "nothing"
            self.metrics.sweeps.labels(outcome).inc()
            self.metrics.sweep_records.inc(found)
            self.metrics.sweep_pages.inc(full.pages)
            log.info(
                "sweep_finished",
                batch_id=b.batch_id,
                outcome=outcome,
                found=found,
                pages=full.pages,
                total_processed=total,
                behind=max(0, behind),
                next_sweep_in_s=None if retry_in is None else round(retry_in, 1),
            )
        return updates

    def _completion(
        self, b: BatchState, pending: _Pending, updates: dict[str, object]
    ) -> tuple[str, str] | None:
        """Whether the batch is finished, after a poll that read to the end.

        With ``expected_count``: once that many records were seen. Without it: once no
        new record came for ``polling.complete_after_idle_s`` and nothing is missing by
        the API's count; when the API gives no count, once a full read of the batch
        after the last new record found nothing more.
        """
        now = self.wall()
        seen = b.records_seen + pending.size
        total = cast(int | None, updates.get("total_processed", b.total_processed))
        if b.expected_count is not None:
            if seen >= b.expected_count:
                return "completed", f"{seen} of {b.expected_count} expected records published"
        elif self._idle(b, pending, now):
            last_full = cast(float | None, updates.get("last_sweep_at", b.last_sweep_at))
            if total is not None and seen >= total:
                return "completed", (
                    f"no new records for polling.complete_after_idle_s; {seen} records seen, "
                    f"the API counts {total}"
                )
            if total is None and last_full is not None and last_full >= cast(float, b.last_new_at):
                return "completed", (
                    "no new records for polling.complete_after_idle_s, nor in a full read of "
                    "the batch (the API gives no count)"
                )
        if now - b.tracked_at >= self.cfg.max_age_s:
            return "expired", self._expired_reason(b, seen, total)
        return None

    @staticmethod
    def _expired_reason(b: BatchState, seen: int, total: int | None) -> str:
        reason = "tracked longer than polling.max_age_s"
        if b.expected_count is not None and seen < b.expected_count:
            missing = b.expected_count - seen
            return f"{reason}; {missing} of {b.expected_count} expected records never listed"
        if total is not None and seen < total:
            return f"{reason}; {total - seen} of the {total} records the API counts never listed"
        return reason

    def _prepare_commit(
        self,
        b: BatchState,
        pending: _Pending,
        cursor: str | None,
        outcome: tuple[str, str] | None,
        updates: dict[str, object],
    ) -> _Commit | None:
        """The progress to commit after ``pending``; None when nothing needs writing."""
        now = self.wall()
        unchanged = (
            not pending.messages
            and not pending.records
            and outcome is None
            and cursor == b.cursor
            and b.failures == 0
            and b.not_found_since is None
            and all(getattr(b, name) == value for name, value in updates.items())
        )
        if unchanged:
            # Nothing new: the stored progress still holds, so nothing is written (a batch
            # that stays quiet costs no state writes). Only the local poll time moves.
            b.last_poll_at = now
            return None
        new_counts = pending.counts
        counts = Counter(b.counts)
        counts.update(new_counts)
        updated = replace(
            b,
            cursor=cursor,
            published=b.published + pending.new_records,
            dead_lettered=b.dead_lettered + pending.dead_lettered,
            counts=dict(counts),
            last_new_at=now if pending.size else b.last_new_at,
            last_poll_at=now,
            not_found_since=None,
            failures=0,
            **updates,  # type: ignore[arg-type]
        )
        if pending.digests:
            updated.remember(pending.digests)
        messages: list[Publishable] = [*pending.messages]
        if pending.records:
            messages.append(BalanceEvents(self.factory, b.batch_id, pending.records))
        if outcome is not None:
            updated.status, updated.reason = cast(Status, outcome[0]), outcome[1]
            messages.append(self._lifecycle(updated, outcome[0]))
        messages.extend(self._state_msgs(updated))
        return _Commit(updated, messages, new_counts, pending.dlq_reasons)

    async def _publish_commit(self, w: PartitionWorker, commit: _Commit) -> None:
        await w.publisher.publish(commit.messages)
        updated = commit.state
        self._commit_local(w, updated)
        for status, n in commit.counts.items():
            self.metrics.records_published.labels(status).inc(n)
        for reason, n in commit.dlq_reasons.items():
            self.metrics.dlq_records.labels(reason).inc(n)
        if updated.status != "tracking":
            self._finished(updated)

    async def _finish(
        self,
        w: PartitionWorker,
        b: BatchState,
        outcome: str,
        reason: str,
        next_offset: int | None = None,
    ) -> None:
        updated = replace(b, status=cast(Status, outcome), reason=reason, last_poll_at=self.wall())
        await w.publisher.publish(
            [self._lifecycle(updated, outcome), *self._state_msgs(updated)], next_offset
        )
        self._commit_local(w, updated)
        self._finished(updated)

    def _finished(self, b: BatchState) -> None:
        self._due.pop(b.batch_id, None)
        self._backoff.discard(b.batch_id)
        self.metrics.batches_finished.labels(b.status).inc()
        log.info(
            "batch_finished",
            batch_id=b.batch_id,
            outcome=b.status,
            reason=b.reason,
            records=b.published,
            dead_lettered=b.dead_lettered,
        )
        if b.status not in RESUMABLE:
            b.seen = SeenSet()  # never needed again: a finished batch is not tracked again

    def _commit_local(self, w: PartitionWorker, b: BatchState) -> None:
        if not w.closed:
            w.batches[b.batch_id] = b

    def _lifecycle(self, b: BatchState, event: str) -> OutMessage:
        return self.factory.lifecycle(
            b.batch_id,
            event,
            generation=b.generation,
            expected_count=b.expected_count,
            records_published=b.published,
            counts_by_status=dict(b.counts),
            reason=b.reason,
            records_dead_lettered=b.dead_lettered,
            total_processed=b.total_processed,
        )

    def _state_msgs(self, b: BatchState) -> list[OutMessage]:
        """The state-topic messages that save ``b`` (its summary, and chunks as needed)."""
        topic = self.settings.kafka.state_topic
        out = [
            OutMessage(topic=topic, key=key, value=value, headers=[], partition=b.partition)
            for key, value in state_records(b)
        ]
        self.metrics.state_bytes.inc(sum(len(m.key or b"") + len(m.value or b"") for m in out))
        return out
