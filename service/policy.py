"""The batch policy: what a tracking request, a stop, a page or a failure does to a batch.

Pure: no I/O, no asyncio, no metrics. The runner (service.tracker) reads pages
and commits; it asks the policy what each thing it saw means and gets back a
``Step``: the batch's state after it, what to publish, and when to poll next.
Only the policy makes a batch's next state. The clock comes in as ``now``
(wall-clock seconds), the randomness from the injected ``random.Random``.

The runner applies a step's state at once, in memory, and queues its messages
on the partition's publisher, which commits them in order. So the state in
memory is always the newest one queued, every step starts from it, and a step
can never write an older cursor or fewer fingerprints than one queued before
it. A commit that fails makes the runner restore the partition from Kafka.
"""

from __future__ import annotations

import operator
import random
from collections import Counter
from dataclasses import dataclass, replace
from typing import cast

from service.config import PollingConfig
from service.errors import (
    ApiBadRequest,
    ApiError,
    ApiForbidden,
    ApiNotFound,
    ApiRateLimited,
    ApiUnauthorized,
    PageTokenLoop,
)
from service.records import MORE_WITHOUT_TOKEN, BalanceRecord, Page, status_name
from service.requests import TrackingRequest
from service.seen import SeenSet
from service.state import RESUMABLE, BatchState, Status
from service.step import Pending, Step, SweepReport, collect

# BalanceRecord.balance_status_code, read in C: counted once per record at each commit.
_STATUS_CODE = operator.itemgetter(BalanceRecord._fields.index("balance_status_code"))

# Restarts from the first page within one poll after page tokens are rejected (400);
# past that the poll fails like any transient failure and backs off.
MAX_TOKEN_RESTARTS = 3
# Failed polls in a row (5xx, timeouts, malformed pages: after their retries) at which a
# poll that fails at a page token tries the first page instead, once: a vendor may answer
# an old token (one sealed with a retired key, say) with a 500 for good, where it would
# answer it with the 400 that restarts a batch from its first page.
FAILING_PAGE_POLLS = 5
# Empty pages in a row that say more follow, after which a poll ends where it stands: an
# API that hands out a new token with every empty page would keep it reading for ever.
MAX_EMPTY_PAGES = 10
# What a track request did (Step.note of Policy.track; a label of tracking_requests_total).
TRACK_NOTES = ("started", "updated", "already_tracked", "already_finished")
# Exponents stop growing here: 2**20 windows is past any backoff cap.
MAX_DOUBLINGS = 20


@dataclass(slots=True)
class _FullRead:
    """A read of a whole batch from its first page, within one poll."""

    sweep: bool  # started at the end of the pages after the cursor (Policy.sweep_due)
    seen_before: int  # records seen when it began
    pages: int = 0
    # A sweep for records a count shows missing ends once the records seen reach it; one
    # before the batch may complete for idleness (None) reads the whole batch.
    until: int | None = None
    # A sweep that goes on where an earlier one was cut short (BatchState.sweep_from): when
    # that one began. Its pages before were read in earlier polls.
    resumed_from: float | None = None
    began_at: float = 0.0


class Policy:
    """The rules for every batch; one per service, shared by every partition."""

    def __init__(self, cfg: PollingConfig, backoff_max_s: float, rng: random.Random) -> None:
        self.cfg = cfg
        self.backoff_max_s = backoff_max_s
        self.rng = rng

    # ---- scheduling ---------------------------------------------------------------

    def window(self) -> float:
        """The delay from one poll's due time to the next: uniform in the polling window."""
        return self.rng.uniform(self.cfg.interval_min_s, self.cfg.interval_max_s)

    def backoff(self, failures: int, cap: float, first: float | None = None) -> float:
        """The delay after ``failures`` failures in a row: ``first`` (default: a polling
        window) doubled each time; past ``cap``, anywhere from half of it to all of it, so
        that batches that failed together (an outage) do not retry together for ever."""
        base = self.window() if first is None else first
        delay = base * float(2 ** min(failures - 1, MAX_DOUBLINGS))
        return delay if delay <= cap else self.rng.uniform(cap / 2, cap)

    @staticmethod
    def next_due(due: float, delay: float, now: float) -> float:
        """The next poll's due time: ``delay`` after this one was due (no drift), not past."""
        return max(now, due + delay)

    def first_due_in(self, b: BatchState, now: float) -> float:
        """After a restore: how long until the batch's next poll."""
        if b.last_poll_at is None:
            return 0.0
        return max(0.0, b.last_poll_at + self.window() - now)

    # ---- requests -----------------------------------------------------------------

    def track(self, b: BatchState | None, req: TrackingRequest, partition: int, now: float) -> Step:
        """A track request; a step that does not save changes nothing (its note says why)."""
        if b is not None and b.active:
            # A new expected count replaces the one given before (a correction); none
            # leaves it as it is.
            if req.expected_count is not None and req.expected_count != b.expected_count:
                return Step(replace(b, expected_count=req.expected_count), "updated", save=True)
            return Step(b, "already_tracked")
        if b is not None and b.status not in RESUMABLE:
            return Step(b, "already_finished")
        if b is None:
            b = BatchState(batch_id=req.batch_id, partition=partition, tracked_at=now)
        else:  # failed or stopped before: resume where it stood
            b = replace(
                b,
                generation=b.generation + 1,
                status="tracking",
                reason=None,
                failures=0,
                not_found_since=None,
                tracked_at=now,
                # Idleness counts from now: a batch that had records can complete again.
                last_new_at=now if b.records_seen else None,
            )
        if req.expected_count:
            b.expected_count = req.expected_count
        return Step(b, "started", save=True, lifecycle="tracking_started", poll_in=0.0)

    def forgettable(self, b: BatchState, now: float) -> bool:
        """Whether a finished batch has been kept ``polling.finished_retention_s``.

        A batch's last poll is when it finished (``_finish`` sets it; a finished batch
        is never polled again); a summary without one counts from its tracking.
        """
        if b.active:
            return False
        finished_at = b.last_poll_at if b.last_poll_at is not None else b.tracked_at
        return now - finished_at >= self.cfg.finished_retention_s

    def stop(self, b: BatchState | None, now: float) -> Step | None:
        """A stop request: the batch is stopped at once; a poll under way is dropped."""
        if b is None or not b.active:
            return None
        return self._finish(b, "stopped", "stopped by request", now)

    # ---- polls --------------------------------------------------------------------

    def begin(self, b: BatchState, now: float) -> Poll | Step:
        """A poll that is due: the Poll that reads it, or the step that expires it."""
        if now - b.tracked_at >= self.cfg.max_age_s:
            reason = expired_reason(b, b.records_seen, b.total_processed)
            return self._finish(b, "expired", reason, now)
        return Poll(self, b)

    def failed(self, b: BatchState, exc: ApiError, now: float) -> Step:
        """A poll that ended with an API error, applied to the batch as it stands now."""
        if isinstance(exc, ApiUnauthorized):
            return Step(b, "unauthorized", poll_in=self.window())
        if isinstance(exc, ApiNotFound):
            first = b.not_found_since if b.not_found_since is not None else now
            if now - first >= self.cfg.not_found_grace_s:
                return self._finish(b, "failed", f"api_not_found: {exc.args[0]}", now)
            updated = replace(b, not_found_since=first, last_poll_at=now)
            return Step(updated, "not_found", save=True, poll_in=self.window())
        if isinstance(exc, ApiBadRequest) or (isinstance(exc, ApiForbidden) and not _read(b)):
            # The batch itself refused (a 400 on its first page; a 403: another client's).
            return self._finish(b, "failed", f"api_{exc.status}: {exc.args[0]}", now)
        # A 403 for a batch this key has read before is the key's or the API's (permissions
        # changed, a gateway), not the batch's, which does not become another client's: it
        # is retried with backoff, as a 5xx, the batch kept.
        failures = b.failures + 1
        delay = self.backoff(failures, self.backoff_max_s)
        # A 429's Retry-After, or a 503's (maintenance, say: RFC 9110 gives it both).
        if exc.retry_after is not None and (isinstance(exc, ApiRateLimited) or exc.status == 503):
            delay = max(delay, exc.retry_after)
        updated = replace(b, failures=failures, last_poll_at=now)
        return Step(updated, "error", save=True, poll_in=delay)

    def _finish(self, b: BatchState, status: str, reason: str, now: float) -> Step:
        updated = replace(b, status=cast(Status, status), reason=reason, last_poll_at=now)
        # Finished for good, its fingerprints are never needed again; stopped or failed, it
        # may be tracked again, and they stay on the state topic (the commit of this step
        # saves what is not there yet), to be read back by its first poll if it is.
        updated.seen = SeenSet()
        updated.seen_loaded = False
        updated.sweep_from = None
        return Step(updated, status, save=True, lifecycle=status)

    # ---- reconciliation and completion --------------------------------------------

    def idle(self, b: BatchState, pending: Pending, now: float) -> bool:
        """No new record for ``polling.complete_after_idle_s`` (and some record ever)."""
        return (
            pending.size == 0
            and b.last_new_at is not None
            and now - b.last_new_at >= self.cfg.complete_after_idle_s
        )

    def sweep_due(self, b: BatchState, pending: Pending, total: int | None, now: float) -> bool:
        """Whether a poll that reached the end should read the batch again from page 1.

        When the batch is idle and would complete: it completes for idleness only on a read
        of the whole batch in the same poll (``completion``), which is what finds a record
        listed behind the cursor that no count shows missing (a count may be low, or
        absent). When a count says records are missing (``missing``), as often as the
        backoff of fruitless reads allows. Without a count, also every
        ``sweep_interval_s``.
        """
        if self.idle(b, pending, now) and self._may_complete(b, seen_with(b, pending), total):
            return True
        if self.missing(b, pending, total, now):
            return b.next_sweep_at is None or now >= b.next_sweep_at
        return total is None and (
            b.last_sweep_at is None or now - b.last_sweep_at >= self.cfg.sweep_interval_s
        )

    def missing(self, b: BatchState, pending: Pending, total: int | None, now: float) -> int:
        """Records a count shows missing, for a sweep to look for: by the API's count; and,
        once the batch is idle, by its ``expected_count`` (until then the vendor may still be
        processing them; idle and short of it, the API's count may be the low one)."""
        seen = seen_with(b, pending)
        counts = [] if total is None else [total]
        if b.expected_count is not None and self.idle(b, pending, now):
            counts.append(b.expected_count)
        return max([0, *(c - seen for c in counts)])

    @staticmethod
    def _may_complete(b: BatchState, seen: int, total: int | None) -> bool:
        """Whether ``completion`` would let the batch complete for idleness."""
        if b.expected_count is not None:
            return seen >= b.expected_count
        return total is None or seen >= total

    def after_read(
        self,
        b: BatchState,
        pending: Pending,
        total: int | None,
        full: _FullRead | None,
        now: float,
    ) -> tuple[dict[str, object], SweepReport | None]:
        """What a poll that reached the end changes in the batch's reconciliation state."""
        updates: dict[str, object] = {"total_processed": total}
        if full is None:
            return updates, None
        seen = seen_with(b, pending)
        found = seen - full.seen_before
        behind = 0 if total is None else total - seen
        short = self.missing(b, pending, total, now)
        # A poll that began at the first page (a batch of one page, a new batch) is a full
        # read too; it stands for a sweep only when one was due.
        if not full.sweep and short <= 0 and not self.sweep_due(b, pending, total, now):
            return updates, None
        fruitless = short > 0 and found == 0
        failures = b.sweep_failures + 1 if fruitless else 0
        retry_in = self.backoff(failures, self.cfg.sweep_backoff_max_s) if fruitless else None
        updates.update(
            last_sweep_at=now,
            sweep_failures=failures,
            next_sweep_at=None if retry_in is None else now + retry_in,
        )
        if not full.sweep:
            return updates, None
        outcome = "reconciled" if behind <= 0 else "partial" if found else "nothing"
        report = SweepReport(outcome, found, full.pages, total, max(0, behind), retry_in)
        return updates, report

    def completion(
        self,
        b: BatchState,
        pending: Pending,
        updates: dict[str, object],
        now: float,
        read_all: bool,
    ) -> tuple[str, str] | None:
        """Whether the batch is finished, after a poll that read to the end (``read_all``:
        it read the whole batch, from its first page to its last).

        With ``expected_count``: once that many records were seen and the API counts no
        more; if it counts more (the expected count may be short), once it has them all
        too, or once no new record came for ``polling.complete_after_idle_s`` (the count
        may be wrong), the reason then saying how many it counts. Without it: once no
        new record came for ``polling.complete_after_idle_s`` and nothing is missing by
        the API's count, if it gives one. Completion for idleness takes a read of the
        whole batch in the same poll that finds nothing new: a record listed behind the
        cursor is found by no other read, and no count can be relied on to show it (the
        API's may be low or absent; the records seen may count a changed record twice).
        """
        seen = seen_with(b, pending)
        total = cast(int | None, updates.get("total_processed", b.total_processed))
        expected = b.expected_count
        # A record without a usable authorizer listed again with new content counts again:
        # the records seen may then be more than there are, and only the read of the whole
        # batch that completion for idleness takes can tell.
        exact = not (b.unkeyed or pending.unkeyed)
        whole = total is None or seen >= total
        if expected is not None and seen >= expected and whole and exact:
            return "completed", expected_reason(seen, expected, total)
        if read_all and self.idle(b, pending, now) and self._may_complete(b, seen, total):
            return "completed", idle_reason(seen, expected, total)
        if now - b.tracked_at >= self.cfg.max_age_s:
            return "expired", expired_reason(b, seen, total)
        return None

    def commit(
        self,
        b: BatchState,
        pending: Pending,
        cursor: str | None,
        outcome: tuple[str, str] | None,
        updates: dict[str, object],
        now: float,
    ) -> Step:
        """The batch after ``pending`` is committed; ``save`` is False when nothing changed."""
        unchanged = (
            not pending.size
            and outcome is None
            and cursor == b.cursor
            and b.failures == 0
            and b.not_found_since is None
            and all(getattr(b, name) == value for name, value in updates.items())
        )
        if unchanged:
            # Nothing new: the stored progress still holds, so nothing is written (a batch
            # that stays quiet costs no state writes). Only the local poll time moves.
            return Step(replace(b, last_poll_at=now), "unchanged")
        counts = Counter(b.counts)
        new_counts: Counter[str] = Counter()
        for code, n in Counter(map(_STATUS_CODE, pending.records)).items():
            new_counts[status_name(code)] += n
        counts.update(new_counts)
        updated = replace(
            b,
            cursor=cursor,
            published=b.published + len(pending.records),
            dead_lettered=b.dead_lettered + len(pending.invalid),
            relisted=b.relisted + pending.relisted,
            unkeyed=b.unkeyed + pending.unkeyed,
            counts=dict(counts),
            last_new_at=now if pending.size else b.last_new_at,
            last_poll_at=now,
            not_found_since=None,
            failures=0,
            **updates,  # type: ignore[arg-type]
        )
        if pending.digests:
            updated.remember(pending.digests)
        step = Step(
            updated,
            "progress",
            save=True,
            records=pending.records,
            invalid=pending.invalid,
            relisted=pending.relisted,
            counts=new_counts,
        )
        expected, total = b.expected_count, updated.total_processed
        if expected is not None and total is not None and total > expected:
            step.above_expected = b.total_processed is None or b.total_processed <= expected
        if outcome is not None:
            finish = self._finish(updated, outcome[0], outcome[1], now)
            step.state, step.note, step.lifecycle = finish.state, finish.note, finish.lifecycle
        return step


class Poll:
    """One poll of one batch: what each page means, when to commit, when it ends.

    Pages are read from the batch's cursor to the end. The API lists a batch in an
    order it does not document, and a record may be listed behind the cursor after
    a poll has passed its place. When the last page's ``total_processed`` is ahead
    of the records seen, the poll sweeps: it reads the batch again from its first
    page, keeps what is new (fingerprints recognise the rest) and stops once the
    count is reached. The cursor moves only with pages read in order, never with a
    sweep. Progress is committed every ``polling.max_records_per_transaction``
    records and when the poll reaches the end.
    """

    def __init__(self, policy: Policy, b: BatchState) -> None:
        self.policy = policy
        self.batch_id = b.batch_id
        self.generation = b.generation
        # A batch forgotten (finished_retention_s) and tracked anew starts again at
        # generation 1: its tracking time tells the two apart.
        self.tracked_at = b.tracked_at
        self.content_ids = b.content_ids  # which event ids the batch's records get
        self.token = b.cursor  # the page to read next
        self.cursor = b.cursor  # where the next poll starts
        self.full = None if b.cursor is not None else _FullRead(False, b.records_seen)
        self.restarts = 0  # page tokens rejected in this poll
        self.empty_run = 0  # empty pages in a row that said more follow
        self.pending = Pending()
        self.done = False
        self._loop_watch(self.token)

    def current(self, b: BatchState | None) -> bool:
        """Whether the poll still stands for ``b`` (not stopped or re-tracked meanwhile)."""
        return (
            b is not None
            and b.active
            and b.generation == self.generation
            and b.tracked_at == self.tracked_at
        )

    def page(self, b: BatchState | None, page: Page, now: float) -> Step | None:
        """Take one page; a step when there is progress to commit.

        ``b`` is the batch as it stands now: if it was stopped (or stopped and tracked
        again) since the poll began, the poll ends and what it read is dropped.
        """
        if b is None or not self.current(b):
            self.done = True
            return None
        if page.has_more and page.next_page_token is None:
            # More follow, but no token to ask for them (records.MORE_WITHOUT_TOKEN): the
            # page's records are kept, and the next poll reads this page again.
            collect(b, page.records, page.invalid, self.pending)
            if self.full is None or not self.full.sweep:
                self.cursor = self.token
            return self._cut_short(b, now, MORE_WITHOUT_TOKEN)
        if page.has_more:
            self._loop_check(page.next_page_token, page)
        collect(b, page.records, page.invalid, self.pending)
        last = self._advance(b, page, now)
        self.empty_run = 0 if last or page.records or page.invalid else self.empty_run + 1
        if self.empty_run >= MAX_EMPTY_PAGES:
            return self._cut_short(b, now, "empty_pages")
        size = self.pending.size
        if not last and size < self.policy.cfg.max_records_per_transaction:
            return None
        self.done = last
        updates: dict[str, object] = {}
        outcome = sweep = None
        if last:
            updates, sweep = self.policy.after_read(
                b, self.pending, page.total_processed, self.full, now
            )
            read_all = self.full is not None and not page.has_more and self._whole(b)
            outcome = self.policy.completion(b, self.pending, updates, now, read_all)
        step = self._commit(b, outcome, updates, now)
        step.sweep = sweep
        if last and self.full is not None and self.full.sweep:
            step.state.sweep_from = None  # this sweep got to its end: the next starts anew
        if last and step.lifecycle is None:
            step.poll_in = self.policy.window()
        return step

    def _cut_short(self, b: BatchState, now: float, why: str) -> Step:
        """End the poll before the end of the list: after ``MAX_EMPTY_PAGES`` empty pages
        in a row that said more follow (``why`` = ``empty_pages``), or at a page that said
        more follow without a token to ask for them (``more_without_token``).

        Empty pages each came with a new token (one that led back would be a loop): a list
        that goes on empty for ever cannot be told from a long run of empty pages, so the
        poll stops reading, commits what it has (the cursor at the last token, if it read
        in order) and the next poll goes on from there. It has not read to the end: no
        completion.
        """
        self.done = True
        step = self._commit(b, None, {}, now)
        step.cut_short = why
        full = self.full
        if full is not None and full.sweep and self.token is not None:
            # The next sweep goes on from here: from the first page, it would meet the same
            # run of empty pages, and never get past it.
            began = full.began_at if full.resumed_from is None else full.resumed_from
            step.state.sweep_from = (self.token, began)
        step.poll_in = self.policy.window()
        return step

    def flush(self, b: BatchState | None, now: float) -> Step | None:
        """Commit what the poll has read so far, before its size calls for it; None if nothing.

        The runner asks for it when the replica's room for uncommitted records
        (``polling.max_records_in_flight``) is full of what waiting polls gathered: their
        records go to their commit, which frees the room. The same progress commit as
        every ``max_records_per_transaction`` records: the records and the cursor of the
        pages read in order so far. If the batch was stopped meanwhile, the poll ends and
        what it read is dropped, as with a page.
        """
        if b is None or not self.current(b):
            self.done = True
            return None
        if not self.pending.size:
            return None
        return self._commit(b, None, {}, now)

    def _commit(
        self,
        b: BatchState,
        outcome: tuple[str, str] | None,
        updates: dict[str, object],
        now: float,
    ) -> Step:
        step = self.policy.commit(b, self.pending, self.cursor, outcome, updates, now)
        self.pending = Pending()
        return step

    def token_rejected(self, b: BatchState) -> bool:
        """The API refused the page token: True to read again from the first page."""
        if self.token is None:
            return False
        self.restarts += 1
        if self.restarts > MAX_TOKEN_RESTARTS:
            return False
        self.token = None
        self._loop_watch(None)
        if self.full is None:
            self.full = _FullRead(False, seen_with(b, self.pending))
        else:
            self.full.resumed_from = None  # read from the first page after all
        return True

    def token_failing(self, b: BatchState) -> bool:
        """The page of the poll's token failed after its retries: True to read again from
        the first page (``token_rejected``), in every ``FAILING_PAGE_POLLS``-th failed poll in
        a row and at most once a poll. Its records are recognised by their fingerprints; if
        the first page fails as well, the poll fails as it would have, its cursor kept."""
        if self.token is None or self.restarts or (b.failures + 1) % FAILING_PAGE_POLLS:
            return False
        return self.token_rejected(b)

    def _loop_watch(self, token: str | None) -> None:
        """Start watching for a loop in a read that begins with the page of ``token``."""
        self._tokens = _Brent(token)
        self._pages = _Brent(None)  # what the pages held (``_page_key``), empty ones aside

    def _loop_check(self, token: str | None, page: Page) -> None:
        """PageTokenLoop if ``token`` leads back to a page this read has already had, or
        ``page`` is one it has already had under another token.

        Followed, such a token makes the API serve the same pages for ever. Within one read
        from a given page, tokens only move forward; only a fault in the API repeats one.
        An API that ignores the token it is sent and hands out a new one each time (the
        time in it, say: the vendor's own Python sample spells the parameter otherwise)
        serves the same page under tokens that never repeat: the pages' contents do. A
        page repeated whole under a new token, records and all, is no list moving on (a
        record added behind the reader shifts the pages by one record, not by a page);
        empty pages are left to ``MAX_EMPTY_PAGES``.
        """
        if self._tokens.again(token):
            raise PageTokenLoop(
                "next_page_token leads back to a page already read in this poll "
                "(the API's pages go round in a loop)",
                status=200,
                code="page_token_loop",
            )
        if (page.records or page.invalid) and self._pages.again(_page_key(page)):
            raise PageTokenLoop(
                "the API's pages go round in a loop: a page already read in this poll "
                "came again under a new next_page_token (does it ignore the nextPageToken "
                "it is sent?)",
                status=200,
                code="page_token_loop",
            )

    def _advance(self, b: BatchState, page: Page, now: float) -> bool:
        """Move past ``page``; True when the poll has read all it will."""
        used = self.token
        if page.has_more:
            self.token = page.next_page_token
        last = not page.has_more
        total = page.total_processed
        full = self.full
        sweeping = full is not None and full.sweep
        if full is not None:
            full.pages += 1
        if not sweeping:
            self.cursor = used if last else self.token
        elif (
            full is not None and full.until is not None and seen_with(b, self.pending) >= full.until
        ):
            return True  # the sweep found every record the counts say exist
        if last and full is None and self.policy.sweep_due(b, self.pending, total, now):
            seen = seen_with(b, self.pending)
            missing = self.policy.missing(b, self.pending, total, now)
            until = seen + missing if missing else None
            self.full = _FullRead(True, seen, until=until, began_at=now)
            self.token = None
            if b.sweep_from is not None:  # an earlier sweep was cut short there
                self.token, self.full.resumed_from = b.sweep_from
            self._loop_watch(self.token)
            return False
        return last

    def _whole(self, b: BatchState) -> bool:
        """Whether the full read now at its end read the whole batch with nothing new: a
        sweep that went on from where an earlier one was cut short did, if nothing new
        was committed since that one began (what a poll has not committed yet makes it
        not idle)."""
        full = self.full
        if full is None or full.resumed_from is None:
            return True
        return b.last_new_at is None or b.last_new_at < full.resumed_from


def _read(b: BatchState) -> bool:
    """Whether the API has let this service read the batch before: a page of it."""
    return bool(b.published or b.dead_lettered) or (
        b.cursor is not None or b.total_processed is not None or b.last_new_at is not None
    )


class _Brent:
    """Brent's cycle detection over the values of one read, in constant memory: each is
    compared with one kept from earlier in the read, replaced after 1, 2, 4, ... values,
    so a loop of any length is caught within about twice its length plus the values
    before it."""

    __slots__ = ("mark", "since", "span")

    def __init__(self, first: object) -> None:
        self.mark = first  # the value the next ones are compared with
        self.since = 0  # values since it was taken
        self.span = 1  # how many values it is kept before a newer one takes its place

    def again(self, value: object) -> bool:
        """Whether ``value`` is the one kept (the read goes round); else take it in."""
        if value == self.mark:
            return True
        self.since += 1
        if self.since == self.span:
            self.mark, self.since, self.span = value, 0, self.span * 2
        return False


def _page_key(page: Page) -> tuple[str, ...]:
    """What a page held, as its records' event ids in order (dead letters' too)."""
    return (*(r.event_id for r in page.records), *(bad.event_id for bad in page.invalid))


def seen_with(b: BatchState, pending: Pending) -> int:
    """The batch's records as the API counts them, those the poll has not committed included."""
    return b.records_seen + pending.new_records


def expected_reason(seen: int, expected: int, total: int | None) -> str:
    """How a batch with an expected count completed."""
    if seen == expected:
        reason = f"{seen} of {expected} expected records published"
    else:
        reason = f"{seen} records published, {expected} expected"
    return reason if total is None or total <= expected else f"{reason}; the API counts {total}"


def idle_reason(seen: int, expected: int | None, total: int | None) -> str:
    """How a batch completed for idleness, on a read of the whole batch that found nothing
    new (``Policy.completion``)."""
    if expected is not None:
        if total is not None and total > seen:
            return (
                f"{expected_reason(seen, expected, total)}, "
                f"{total - seen} never listed within polling.complete_after_idle_s"
            )
        return (
            f"{expected_reason(seen, expected, total)}, and nothing new in a read of the whole "
            "batch (records without an authorizer ID count once per version)"
        )
    quiet = "no new records for polling.complete_after_idle_s, nor in a read of the whole batch"
    if total is None:
        return f"{quiet} (the API gives no count)"
    return f"{quiet}; {seen} records seen, the API counts {total}"


def expired_reason(b: BatchState, seen: int, total: int | None) -> str:
    reason = "tracked longer than polling.max_age_s"
    if b.expected_count is not None and seen < b.expected_count:
        missing = b.expected_count - seen
        reason = f"{reason}; {missing} of {b.expected_count} expected records never listed"
    elif total is not None and seen < total:
        missing = total - seen
        reason = f"{reason}; {missing} of the {total} records the API counts never listed"
    else:
        return reason
    if b.relisted:
        # Records are counted by authorizer; a count of entries would hold these too.
        entries = "1 entry" if b.relisted == 1 else f"{b.relisted} entries"
        reason += (
            f" ({entries} listed again for an authorizer already seen: if the count is of "
            "entries rather than authorizers, that may be the difference)"
        )
    return reason
