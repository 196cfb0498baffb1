"""What a policy step publishes, and what its commit counts.

The runner hands each ``Step`` here twice: before the commit, for the messages
that carry it (dead letters, balance events, a lifecycle event, the state), and
after the commit, for the metrics and log lines of what was committed.
"""

from __future__ import annotations

from collections import Counter

import structlog

from service.errors import ApiError, ApiNotFound, ApiUnauthorized
from service.events import BalanceEvents, EventFactory, OutMessage, Publishable
from service.logs import Throttle
from service.metrics import Metrics
from service.policy import MAX_EMPTY_PAGES
from service.state import BatchState, clear_records, forget_records, state_records
from service.step import Step

log = structlog.get_logger(__name__)


class StepWriter:
    def __init__(self, *, factory: EventFactory, metrics: Metrics, state_topic: str) -> None:
        self.factory = factory
        self.metrics = metrics
        self.state_topic = state_topic
        self.failures = Throttle()  # poll_failed: one line a kind of failure a minute
        # record_dead_lettered (one line a reason a minute: a vendor's format change makes
        # every batch's records bad alike) and batch_not_found_yet (many batches 404).
        self.notes = Throttle()

    def messages(self, step: Step) -> list[Publishable]:
        """The messages that commit ``step``, in the order they are to be written."""
        b = step.state
        out: list[Publishable] = [self.factory.invalid(b.batch_id, bad) for bad in step.invalid]
        if step.invalid:
            self._dead_lettered(step)
        if step.records:
            out.append(BalanceEvents(self.factory, b.batch_id, step.records))
        if step.lifecycle is not None:
            out.append(self.lifecycle(b, step.lifecycle))
        if step.save:
            out.extend(self.state(b))
        if step.sweep is not None:
            self._swept(b, step)
        if step.cut_short:
            self._cut_short(step)
        return out

    def _dead_lettered(self, step: Step) -> None:
        """Count a step's dead letters, every one; log them, one WARNING a reason a minute
        (with ``suppressed``, the lines of that reason held back since), the rest at DEBUG.
        The line is a WARNING if one of its reasons is let through; its ``detail`` is of
        a record of such a reason."""
        reasons = Counter(bad.reason for bad in step.invalid)
        admitted: dict[str, int] = {}
        for reason, n in reasons.items():
            self.metrics.invalid_input.labels("api", reason).inc(n)
            held = self.notes.admit(f"record_dead_lettered:{reason}")
            if held is not None:
                admitted[reason] = held
        first = next((bad for bad in step.invalid if bad.reason in admitted), step.invalid[0])
        fields = {
            "batch_id": step.state.batch_id,
            "reasons": dict(reasons),
            "detail": first.detail,
        }
        if admitted:
            log.warning("record_dead_lettered", **fields, suppressed=sum(admitted.values()))
        else:
            log.debug("record_dead_lettered", **fields)

    def committed(self, step: Step) -> None:
        """Count what ``step`` committed."""
        for status, n in step.counts.items():
            self.metrics.records_published.labels(status).inc(n)
        for reason, n in Counter(bad.reason for bad in step.invalid).items():
            self.metrics.dlq_records.labels(reason).inc(n)
        if step.relisted:
            self.metrics.records_relisted.inc(step.relisted)
        if step.above_expected:
            b = step.state
            log.warning(
                "count_above_expected",
                batch_id=b.batch_id,
                expected_count=b.expected_count,
                total_processed=b.total_processed,
                records_seen=b.records_seen,
                detail="the API counts more records than expected_count; the batch completes "
                "once it has them all",
            )
        if step.finished:
            b = step.state
            self.metrics.batches_finished.labels(b.status).inc()
            log.info(
                "batch_finished",
                batch_id=b.batch_id,
                outcome=b.status,
                reason=b.reason,
                records=b.published,
                dead_lettered=b.dead_lettered,
                relisted=b.relisted,
            )

    def poll_failed(self, step: Step, exc: ApiError) -> None:
        """Count and log a poll that ended with an API error (``step``: what it did)."""
        b = step.state
        if isinstance(exc, ApiUnauthorized):
            self.metrics.polls.labels("unauthorized").inc()
        elif isinstance(exc, ApiNotFound):
            self.metrics.polls.labels("not_found").inc()
            if not step.finished and b.not_found_since is not None and b.last_poll_at is not None:
                since = round(b.last_poll_at - b.not_found_since, 1)
                self.notes.log(
                    "batch_not_found_yet",
                    log,
                    "info",
                    "batch_not_found_yet",
                    batch_id=b.batch_id,
                    since_s=since,
                )
        else:
            self.metrics.polls.labels("error").inc()
            if not step.finished:
                self.failures.log(
                    exc.kind,
                    log,
                    "warning",
                    "poll_failed",
                    batch_id=b.batch_id,
                    error=str(exc),
                    failures=b.failures,
                    retry_in_s=round(step.poll_in or 0.0, 2),
                )

    def _cut_short(self, step: Step) -> None:
        """Count and log a poll ended by a run of empty pages that said more follow (a page
        that said so without a token is counted and logged where it is read, api.py)."""
        if step.cut_short != "empty_pages":
            return
        self.metrics.invalid_input.labels("api", "empty_pages").inc()
        held = self.failures.admit("empty_pages")
        if held is not None:
            log.warning(
                "poll_cut_short",
                batch_id=step.state.batch_id,
                reason=f"{MAX_EMPTY_PAGES} empty pages in a row, each saying more follow",
                suppressed=held,
            )

    def _swept(self, b: BatchState, step: Step) -> None:
        sweep = step.sweep
        assert sweep is not None
        self.metrics.sweeps.labels(sweep.outcome).inc()
        self.metrics.sweep_records.inc(sweep.found)
        self.metrics.sweep_pages.inc(sweep.pages)
        retry_in = sweep.next_sweep_in_s
        log.info(
            "sweep_finished",
            batch_id=b.batch_id,
            outcome=sweep.outcome,
            found=sweep.found,
            pages=sweep.pages,
            total_processed=sweep.total_processed,
            behind=sweep.behind,
            next_sweep_in_s=None if retry_in is None else round(retry_in, 1),
        )

    def lifecycle(self, b: BatchState, event: str) -> OutMessage:
        """The event (the factory leaves out what ``tracking_started`` does not carry)."""
        return self.factory.lifecycle(
            b.batch_id,
            event,
            generation=b.generation,
            tracked_at=b.tracked_at,
            expected_count=b.expected_count,
            records_published=b.published,
            counts_by_status=dict(b.counts),
            reason=b.reason,
            records_dead_lettered=b.dead_lettered,
            total_processed=b.total_processed,
            records_relisted=b.relisted,
        )

    def state(self, b: BatchState) -> list[OutMessage]:
        """The state-topic messages that save ``b`` (its summary, and chunks as needed)."""
        return self._state_messages(b, state_records(b))

    def clear(self, b: BatchState, at_most: int) -> list[OutMessage]:
        """Tombstones of at most ``at_most`` chunks left by ``b``, finished for good."""
        return self._state_messages(b, clear_records(b, at_most))

    def forget(self, b: BatchState) -> list[OutMessage]:
        """The state-topic tombstones that forget the finished batch ``b``."""
        return self._state_messages(b, forget_records(b))

    def _state_messages(
        self, b: BatchState, records: list[tuple[bytes, bytes | None]]
    ) -> list[OutMessage]:
        out = [
            OutMessage(
                topic=self.state_topic, key=key, value=value, headers=[], partition=b.partition
            )
            for key, value in records
        ]
        self.metrics.state_bytes.inc(sum(len(m.key or b"") + len(m.value or b"") for m in out))
        return out
