"""The batch policy on its own: fake clock, seeded randomness, a vendor model, no broker."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_harness import BATCH, Driver, Vendor, config, record

from service.errors import (
    ApiBadRequest,
    ApiForbidden,
    ApiNotFound,
    ApiRateLimited,
    ApiServerError,
    ApiUnauthorized,
    PageTokenLoop,
)
from service.policy import (
    FAILING_PAGE_POLLS,
    MAX_EMPTY_PAGES,
    MAX_TOKEN_RESTARTS,
    Policy,
    Poll,
)
from service.records import InvalidRecord, Page, balance_event_id, parse_record
from service.requests import TrackingRequest
from service.state import BatchState


def make(seed: int = 1, backoff_max_s: float = 300.0, **cfg: float) -> Policy:
    return Policy(config(**cfg), backoff_max_s, random.Random(seed))


def driver(records: int = 0, **cfg: float) -> Driver:
    d = Driver(make(1, **cfg), Vendor([record(i) for i in range(records)]))
    d.track()
    return d


# ---- the polling window ---------------------------------------------------------------


def test_the_window_is_uniform_in_the_configured_range_and_due_times_do_not_drift() -> None:
    policy = make()
    windows = [policy.window() for _ in range(2000)]
    assert 30.0 <= min(windows) < 31.0 and 59.0 < max(windows) <= 60.0
    assert 44.0 < sum(windows) / len(windows) < 46.0  # uniform: mean in the middle
    # Each poll is due a window after the previous poll was *due*, however long it ran.
    due, now = 0.0, 0.0
    policy = make(seed=7)
    windows = []
    for _ in range(100):
        now = due + 5.0  # the poll took five seconds
        window = policy.window()
        windows.append(window)
        due = policy.next_due(due, window, now)
    assert due == pytest.approx(sum(windows))


def test_a_poll_later_than_its_next_due_time_is_scheduled_now_not_in_the_past() -> None:
    assert make().next_due(due=100.0, delay=30.0, now=200.0) == 200.0


# ---- failures -------------------------------------------------------------------------


def test_persistent_5xx_backs_off_exponentially_capped_and_other_batches_are_unaffected() -> None:
    policy = make(backoff_max_s=300.0, interval_min_s=30.0, interval_max_s=30.0)
    b = BatchState(batch_id=BATCH, partition=0, tracked_at=999_000.0)
    other = BatchState(batch_id="other", partition=0, tracked_at=999_000.0)
    delays: list[float] = []
    for _ in range(40):
        step = policy.failed(b, ApiServerError("boom", status=503), now=10.0)
        b = step.state
        assert step.poll_in is not None
        delays.append(step.poll_in)
    assert delays[:4] == [30.0, 60.0, 120.0, 240.0]
    # Past the cap, anywhere in its upper half: batches that failed together (an outage)
    # spread out instead of retrying together at every step.
    assert all(150.0 <= d <= 300.0 for d in delays[4:])
    assert len(set(delays[4:])) == len(delays[4:])
    assert b.failures == 40 and step.save and step.lifecycle is None
    # The other batch's next poll is a plain window, and one good poll resets the count.
    d = Driver(policy, Vendor([record(1)]), state=other)
    window = d.poll()
    assert window is not None and window.poll_in == 30.0
    d.state = b
    d.poll()
    assert d.state.failures == 0


def test_a_503_retry_after_is_a_lower_bound_of_the_poll_backoff() -> None:
    """A 503 that says when to come back (maintenance): the batch's next poll is no
    sooner; a 500 or a 503 without it backs off as usual."""
    policy = make(backoff_max_s=300.0)
    b = BatchState(batch_id=BATCH, partition=0, tracked_at=0.0)
    step = policy.failed(b, ApiServerError("down", status=503, retry_after=1800.0), 1.0)
    assert step.poll_in == 1800.0
    plain = policy.failed(b, ApiServerError("down", status=503), 1.0)
    assert plain.poll_in is not None and plain.poll_in <= 60.0
    other = policy.failed(b, ApiServerError("boom", status=500, retry_after=1800.0), 1.0)
    assert other.poll_in is not None and other.poll_in <= 60.0


def test_a_retry_after_longer_than_the_window_and_the_cap_is_honoured() -> None:
    policy = make(backoff_max_s=300.0)
    b = BatchState(batch_id=BATCH, partition=0, tracked_at=0.0)
    step = policy.failed(b, ApiRateLimited("slow down", status=429, retry_after=900.0), 1.0)
    assert step.poll_in == 900.0
    short = policy.failed(b, ApiRateLimited("slow down", status=429, retry_after=1.0), 1.0)
    assert short.poll_in is not None and 30.0 <= short.poll_in <= 60.0


def test_401_pauses_without_counting_a_failure_and_the_batch_resumes_as_it_was() -> None:
    d = driver(records=3)
    d.poll()
    before = d.state
    assert before is not None
    step = d.policy.failed(before, ApiUnauthorized("bad key", status=401), d.now)
    assert step.note == "unauthorized" and not step.save and step.lifecycle is None
    assert step.state is before and 30.0 <= (step.poll_in or 0) <= 60.0


def test_404_is_waited_for_during_the_grace_then_fails_the_batch() -> None:
    d = driver(not_found_grace_s=300.0)
    assert d.state is not None
    gone = ApiNotFound("no such batch", status=404)
    first = d.apply(d.policy.failed(d.state, gone, d.now))
    assert first is not None and first.save and first.lifecycle is None
    assert d.state.not_found_since == d.now
    d.now += 299.0
    waiting = d.apply(d.policy.failed(d.state, gone, d.now))
    assert waiting is not None and waiting.lifecycle is None
    d.now += 1.0
    last = d.apply(d.policy.failed(d.state, gone, d.now))
    assert last is not None and last.lifecycle == "failed" and d.state.status == "failed"
    assert d.state.reason is not None and d.state.reason.startswith("api_not_found")


def test_a_page_that_comes_after_404s_clears_the_grace() -> None:
    d = driver(records=1)
    assert d.state is not None
    d.apply(d.policy.failed(d.state, ApiNotFound("not yet", status=404), d.now))
    d.poll()
    assert d.state.not_found_since is None


def test_403_and_400_on_the_first_page_fail_the_batch_at_once() -> None:
    for exc in (ApiForbidden("no", status=403), ApiBadRequest("bad id", status=400)):
        d = driver()
        assert d.state is not None
        step = d.apply(d.policy.failed(d.state, exc, d.now))
        assert step is not None and step.lifecycle == "failed" and step.poll_in is None


def test_403_for_a_batch_read_before_is_retried_and_the_batch_kept() -> None:
    """A batch this key has read does not become another client's: a 403 later is the
    key's or the API's (a gateway, permissions changed). Retried with backoff as a 5xx;
    once the API answers again, the batch goes on from where it was."""
    d = driver(records=4)
    d.vendor.page_size = 2
    d.poll()
    assert d.state is not None and d.state.published == 4
    for n in (1, 2, 3):
        step = d.apply(d.policy.failed(d.state, ApiForbidden("denied", status=403), d.now))
        assert step is not None and step.lifecycle is None and step.poll_in is not None
        assert d.state.active and d.state.failures == n
    d.vendor.records.append(record(9))
    d.now += 60
    d.poll()
    assert d.state.active and d.state.failures == 0 and d.state.published == 5


def test_a_rejected_page_token_restarts_from_the_first_page_and_publishes_nothing_twice() -> None:
    d = driver(records=6)
    d.poll()  # reads all six; the cursor is at the last page
    assert d.state is not None and d.state.cursor == "t4"
    d.vendor.insert(0, record(100))  # the list changed: the stored token is now refused
    d.now += 60
    poll = d.begin()
    assert poll is not None and poll.token == "t4"
    assert poll.token_rejected(d.state)
    assert poll.token is None
    while not poll.done:
        d.page(poll)
    assert sorted(d.emitted) == sorted(r.event_id for r in d.vendor.records)
    assert len(d.emitted) == len(set(d.emitted))


def test_page_tokens_rejected_more_than_the_limit_end_the_poll() -> None:
    d = driver(records=4)
    d.poll()
    poll = d.begin()
    assert poll is not None and d.state is not None
    for _ in range(MAX_TOKEN_RESTARTS):
        assert poll.token_rejected(d.state)
        poll.token = "t2"  # the restart reached a later page, whose token is refused too
    assert not poll.token_rejected(d.state)


def looping_page(token: str | None, tail: int, loop: int) -> Page:
    """Page ``k`` (token ``f"t{k}"``) of an API whose tokens go round in a loop.

    Pages 0 .. tail-1 lead on; from ``tail`` on, the pages go round ``loop`` pages: the
    token after page tail+loop-1 names page ``tail`` again.
    """
    k = 0 if token is None else int(token[1:])
    following = k + 1 if k + 1 < tail + loop else tail
    return Page(BATCH, None, True, f"t{following}", [record(k)])


@pytest.mark.parametrize("tail", [0, 1, 2, 5, 17])
@pytest.mark.parametrize("loop", [1, 2, 3, 8, 33])
def test_a_page_token_loop_of_any_length_ends_the_poll(tail: int, loop: int) -> None:
    d = driver()
    poll = d.begin()
    assert poll is not None
    pages = 0
    with pytest.raises(PageTokenLoop, match="loop"):
        while pages < 10_000:
            pages += 1
            d.apply(poll.page(d.state, looping_page(poll.token, tail, loop), d.now))
    # Not before a token repeats; soon after (Brent: within about twice the loop's reach).
    assert tail + loop <= pages <= 2 * (tail + loop) + loop
    # Every distinct page was taken, but for the one whose token gave the loop away.
    assert tail + loop - 1 <= poll.pending.size <= tail + loop


def test_a_page_that_says_more_follow_without_a_token_is_kept_and_read_again() -> None:
    """More to come, nothing to ask for it with (records.MORE_WITHOUT_TOKEN): the page's
    records are published, the poll ends there without completing, and the next poll
    reads that page again (the cursor is the token that fetched it), then goes on."""
    d = driver(records=5)
    d.vendor.page_size = 2

    def page(token: str | None) -> Page:
        served = d.vendor.page(token)
        if token == "t2" and len(d.vendor.records) == 4:  # the fifth is still to come
            served.has_more, served.next_page_token = True, None
        return served

    fifth = d.vendor.records.pop()
    poll = d.begin()
    assert poll is not None
    steps = []
    while not poll.done:
        steps.append(d.apply(poll.page(d.state, page(poll.token), d.now)))
    last = steps[-1]
    assert last is not None and last.cut_short == "more_without_token"
    assert last.lifecycle is None and last.poll_in is not None
    assert sorted(d.emitted) == sorted(r.event_id for r in d.vendor.records)
    assert d.state is not None and d.state.cursor == "t2" and d.state.status == "tracking"
    d.vendor.records.append(fifth)  # it has appeared: the list goes on past the page
    d.now += 60
    poll = d.begin()
    assert poll is not None and poll.token == "t2"
    while not poll.done:
        d.apply(poll.page(d.state, page(poll.token), d.now))
    assert sorted(d.emitted) == sorted(r.event_id for r in d.vendor.records)
    assert len(d.emitted) == 5


def test_a_token_that_keeps_failing_is_given_up_for_the_first_page_every_few_polls() -> None:
    """A page token answered 5xx poll after poll (an API that can no longer open it): in
    every FAILING_PAGE_POLLS-th failed poll in a row, the poll tries the first page instead,
    once; the records behind the token are recognised, nothing is published twice."""
    d = driver(records=6)
    d.vendor.page_size = 2
    first = d.begin()
    assert first is not None
    d.apply(first.page(d.state, d.vendor.page(None), d.now))  # a page, then a failure
    assert d.state is not None and first.cursor == "t2"
    d.apply(first.flush(d.state, d.now))
    assert d.state.cursor == "t2"
    tried = []
    for n in range(1, 3 * FAILING_PAGE_POLLS + 1):
        poll = d.begin()
        assert poll is not None and poll.token == "t2"
        restarted = poll.token_failing(d.state)
        tried.append(restarted)
        if restarted:
            assert poll.token is None
            break
        d.apply(d.policy.failed(d.state, ApiServerError("boom", status=500), d.now))
        assert d.state.failures == n and d.state.cursor == "t2"
    assert tried == [False] * (FAILING_PAGE_POLLS - 1) + [True]
    assert poll is not None
    d.apply(poll.page(d.state, d.vendor.page(None), d.now))
    assert poll.token == "t2" and not poll.token_failing(d.state)  # once a poll
    while not poll.done:  # from the first page, to the end
        d.apply(poll.page(d.state, d.vendor.page(poll.token), d.now))
    assert sorted(d.emitted) == sorted(r.event_id for r in d.vendor.records)
    assert len(d.emitted) == len(set(d.emitted)) == 6
    assert d.state.failures == 0


def test_an_api_that_ignores_the_page_token_is_caught_by_its_pages() -> None:
    """The API serves the first page whatever token it is sent, with a new token every
    time (the time in it): no token repeats, but the page does, and following it would
    read the same page at the replica's whole request rate for ever."""
    d = driver(records=6)
    issued = 0

    def page(_token: str | None) -> Page:
        nonlocal issued
        issued += 1
        first = d.vendor.page(None)
        first.next_page_token = f"fresh-{issued}"
        return first

    poll = d.begin()
    assert poll is not None
    with pytest.raises(PageTokenLoop, match="ignore the nextPageToken"):
        while issued < 1000:
            d.apply(poll.page(d.state, page(poll.token), d.now))
    assert issued <= 3


def test_records_added_behind_the_reader_shift_the_pages_and_are_no_loop() -> None:
    """Offset tokens and a record added before the reader's place between two pages: the
    next page repeats the last record of the one before (a shift by one record), never a
    whole page; the read goes on to its end."""
    d = driver(records=12)
    d.vendor.page_size = 3
    poll = d.begin()
    assert poll is not None
    n = 100
    while not poll.done:
        d.apply(poll.page(d.state, d.vendor.page(poll.token), d.now))
        d.vendor.insert(0, record(n))
        n += 1
    assert d.state is not None and d.state.failures == 0
    assert set(r.event_id for r in d.vendor.records[-12:]) <= set(d.emitted)


def test_empty_pages_with_new_tokens_for_ever_end_the_poll_and_the_next_goes_on() -> None:
    """A tail page that is empty, says more follow and gives a new token every time (the
    time in it): no token repeats, so it is no loop, but followed it would keep the poll
    reading for ever, and the records it had read would never be committed. After a run
    of MAX_EMPTY_PAGES such pages the poll commits what it read, its cursor at the last
    token, and ends; the next poll goes on from there, and the batch does not complete."""
    d = driver(records=5)
    issued = 0

    def page(token: str | None) -> Page:
        nonlocal issued
        if token is None or token == "t2":
            return d.vendor.page(token)
        issued += 1
        return Page(BATCH, 5, True, f"t4-{issued}", [])

    d.vendor.page_size = 2
    poll = d.begin()
    assert poll is not None
    steps = []
    while not poll.done and issued < 1000:
        steps.append(d.apply(poll.page(d.state, page(poll.token), d.now)))
    assert poll.done and issued == MAX_EMPTY_PAGES
    last = steps[-1]
    assert last is not None and last.cut_short and last.lifecycle is None
    assert last.poll_in is not None
    assert sorted(d.emitted) == sorted(r.event_id for r in d.vendor.records[:4])
    assert d.state is not None and d.state.cursor == f"t4-{issued}"
    assert d.state.status == "tracking"
    # A page with records in the run starts it again.
    poll = d.begin()
    assert poll is not None and poll.token == f"t4-{issued}"
    fifth = d.vendor.records[4]
    assert not isinstance(fifth, InvalidRecord)
    for n in range(3 * MAX_EMPTY_PAGES):
        records = [fifth] if n == MAX_EMPTY_PAGES - 2 else []
        d.apply(poll.page(d.state, Page(BATCH, 5, True, f"u{n}", records), d.now))
        if poll.done:
            break
    assert n == 2 * MAX_EMPTY_PAGES - 2
    assert sorted(d.emitted) == sorted(r.event_id for r in d.vendor.records)


def test_a_loop_back_to_the_page_a_poll_resumed_from_ends_it_at_once() -> None:
    d = driver(records=6)
    d.poll()
    assert d.state is not None and d.state.cursor == "t4"
    poll = d.begin()
    assert poll is not None and poll.token == "t4"
    page = d.vendor.page("t4")
    page.has_more, page.next_page_token = True, "t4"
    with pytest.raises(PageTokenLoop):
        poll.page(d.state, page, d.now)


def test_tokens_seen_before_a_restart_from_the_first_page_are_not_a_loop() -> None:
    d = driver(records=9)
    poll = d.begin()
    assert poll is not None and d.state is not None
    for _ in range(3):  # t2, t4, t6: the second is the one kept for comparing
        d.page(poll)
    poll.token = "t6"
    assert poll.token_rejected(d.state)  # read again from the first page: t2 comes again
    while not poll.done:
        d.page(poll)
    assert sorted(d.emitted) == sorted(r.event_id for r in d.vendor.records)


# ---- completion -----------------------------------------------------------------------


def test_with_an_expected_count_the_batch_completes_once_that_many_records_were_seen() -> None:
    d = Driver(make(), Vendor([record(i) for i in range(3)]))
    d.track(expected_count=5)
    d.poll()
    assert d.state is not None and d.state.status == "tracking"
    d.vendor.records += [record(3), record(4)]
    d.now += 45
    last = d.poll()
    assert last is not None and last.lifecycle == "completed"
    state = d.state  # read anew: mypy keeps d.state.status narrowed to "tracking" across poll()
    assert state is not None and state.status == "completed" and state.published == 5
    assert d.lifecycle == ["tracking_started", "completed"]


def test_an_expected_count_below_the_api_count_waits_for_the_records_the_api_counts() -> None:
    """The expected count is reached, but the API counts a record it does not list yet:
    completing then would leave it unpublished for good."""
    d = Driver(make(), Vendor([record(i) for i in range(4)], unlisted=1))
    d.track(expected_count=3)
    first = d.poll()  # 4 of 3 expected seen; the API counts 5, and a sweep finds no more
    assert first is not None and first.above_expected and first.lifecycle is None
    assert d.state is not None and d.state.status == "tracking"
    d.vendor.unlisted = 0
    d.vendor.records.append(record(4))  # listed at last
    d.now += 45
    last = d.poll()
    assert last is not None and last.lifecycle == "completed" and not last.above_expected
    assert sorted(d.emitted) == sorted(r.event_id for r in d.vendor.records)
    assert d.state.reason == "5 records published, 3 expected; the API counts 5"


def test_an_expected_count_reached_completes_after_idleness_if_the_api_count_never_is() -> None:
    """The API counts records it never lists (a wrong count): the batch does not wait for
    them for ever, and its reason says how many the API counts."""
    d = Driver(make(complete_after_idle_s=900.0), Vendor([record(i) for i in range(3)], unlisted=2))
    d.track(expected_count=3)
    d.poll()
    d.now += 899
    assert d.poll() is not None and d.state is not None and d.state.status == "tracking"
    d.now += 1
    last = d.poll()
    assert last is not None and last.lifecycle == "completed"
    assert d.state.reason == (
        "3 of 3 expected records published; the API counts 5, 2 never listed within "
        "polling.complete_after_idle_s"
    )
    assert sorted(d.emitted) == sorted(r.event_id for r in d.vendor.records)


def test_without_a_count_idleness_completes_only_when_the_api_count_is_reached() -> None:
    d = driver(records=4, complete_after_idle_s=900.0)
    d.poll()
    d.vendor.counts = True
    d.vendor.records.insert(0, record(99))  # listed behind the cursor, counted
    d.vendor.records = d.vendor.records  # the count now says 5
    d.now += 1000  # idle for longer than complete_after_idle_s
    step = d.poll()  # the count is ahead: it sweeps and finds the record
    assert step is not None and step.sweep is not None and step.sweep.found == 1
    assert d.state is not None and d.state.status == "tracking"  # a new record: not idle
    d.now += 1000
    last = d.poll()
    assert last is not None and last.lifecycle == "completed"
    assert len(d.emitted) == 5 == len(set(d.emitted))


def test_with_no_count_at_all_completion_needs_a_full_read_after_the_last_new_record() -> None:
    d = Driver(make(complete_after_idle_s=900.0, sweep_interval_s=10_000.0), Vendor(counts=False))
    d.vendor.records = [record(i) for i in range(4)]
    d.track()
    d.poll()  # a first read from page 1: a full read, but the records in it are new
    d.vendor.insert(0, record(50))  # behind the cursor; no count tells
    d.now += 1000
    step = d.poll()  # idle now, but no full read since the last new record: it sweeps
    assert step is not None and step.lifecycle is None
    assert d.state is not None and d.state.published == 5
    d.now += 1000
    last = d.poll()
    assert last is not None and last.lifecycle == "completed"


def test_a_batch_tracked_longer_than_max_age_expires_and_says_what_is_missing() -> None:
    d = Driver(make(max_age_s=3600.0), Vendor([record(1)]))
    d.track(expected_count=3)
    d.poll()
    d.now += 3600
    assert d.begin() is None
    assert d.state is not None and d.state.status == "expired"
    assert "2 of 3 expected records never listed" in (d.state.reason or "")
    assert d.lifecycle[-1] == "expired"


def test_an_expiry_short_by_records_listed_twice_says_so() -> None:
    """Records are counted by authorizer. A vendor that lists two entries for one
    authorizer and a client whose expected_count counts entries: every event is
    published, and the batch expires short by one; the reason says that entries listed
    again may be the difference, so that it does not read as a record lost."""
    again = record(1)._replace(balance="9.99")
    again = again._replace(
        event_id=balance_event_id(BATCH, again.authorizer_unique_id, again.timestamp, "9.99", 1)
    )
    d = Driver(make(max_age_s=3600.0), Vendor([record(1), record(2), again]))
    d.track(expected_count=3)
    d.poll()
    assert len(d.emitted) == 3
    d.now += 3600
    assert d.begin() is None
    assert d.state is not None and d.state.status == "expired"
    assert d.state.reason == (
        "tracked longer than polling.max_age_s; 1 of 3 expected records never listed (1 entry "
        "listed again for an authorizer already seen: if the count is of entries rather than "
        "authorizers, that may be the difference)"
    )


# ---- requests -------------------------------------------------------------------------


def test_stop_then_track_again_resumes_where_it_stood_with_a_new_generation() -> None:
    d = driver(records=4)
    d.poll()
    stopped = d.stop()
    assert stopped is not None and stopped.lifecycle == "stopped" and stopped.save
    assert d.stop() is None  # a second stop changes nothing
    assert d.state is not None and d.state.status == "stopped"
    cursor = d.state.cursor
    again = d.track()
    assert again.note == "started" and again.lifecycle == "tracking_started"
    assert d.state.generation == 2 and d.state.cursor == cursor and d.state.published == 4
    d.vendor.records.append(record(4))
    d.poll()
    assert len(d.emitted) == 5 == len(set(d.emitted))


def test_track_of_a_completed_batch_is_ignored_and_track_of_an_active_one_changes_nothing() -> None:
    d = driver(records=1)
    assert d.track().note == "already_tracked"
    assert d.state is not None
    d.state.status = "completed"
    step = d.track()
    assert step.note == "already_finished" and not step.save


def test_a_stop_during_a_poll_drops_the_rest_of_that_poll() -> None:
    d = driver(records=6, max_records_per_transaction=2)
    poll = d.begin()
    assert poll is not None
    d.page(poll)  # two records read and committed
    d.stop()
    assert d.page(poll) is None and poll.done
    assert d.state is not None and d.state.status == "stopped"
    assert len(d.emitted) == 2 and d.lifecycle == ["tracking_started", "stopped"]


def test_a_poll_of_an_earlier_generation_commits_nothing_after_stop_and_track() -> None:
    d = driver(records=6, max_records_per_transaction=2)
    old = d.begin()
    assert old is not None
    d.page(old)
    d.stop()
    d.track()
    assert d.page(old) is None and old.done  # the old poll ends; the new one reads
    d.poll()
    assert len(d.emitted) == 6 == len(set(d.emitted))


def test_a_poll_of_a_forgotten_batch_commits_nothing_to_the_batch_tracked_anew() -> None:
    """Stopped, forgotten (``finished_retention_s``) and tracked anew while a poll of the
    first tracking still waits for a page: the new batch has generation 1 again, and the
    old poll must still see that it is not its batch."""
    d = driver(records=6, max_records_per_transaction=2)
    old = d.begin()
    assert old is not None
    d.page(old)
    d.stop()
    d.state = None  # forgotten
    d.now += 1.0
    d.track()
    assert d.state is not None and d.state.generation == old.generation
    assert d.page(old) is None and old.done
    assert d.state.cursor is None and d.state.published == 0
    d.poll()
    assert d.emitted.count(record(0).event_id) == 2  # anew: published again
    assert sorted(set(d.emitted)) == sorted(record(i).event_id for i in range(6))


def test_an_expected_count_given_during_a_poll_is_kept_and_the_cursor_never_goes_back() -> None:
    d = driver(records=6, max_records_per_transaction=2)
    poll = d.begin()
    assert poll is not None
    d.page(poll)  # commits two records, cursor t2
    assert d.state is not None and d.state.cursor == "t2"
    update = d.policy.track(d.state, TrackingRequest(batch_id=BATCH, expected_count=6), 0, d.now)
    assert update.note == "updated" and update.save
    d.apply(update)
    assert d.state.cursor == "t2" and d.state.published == 2  # built on the newest state
    while not poll.done:
        d.page(poll)
    assert d.state.expected_count == 6 and d.state.status == "completed"
    cursors = [int(s.cursor[1:]) if s.cursor else 0 for s in d.saved]
    assert cursors == sorted(cursors)


def test_a_new_expected_count_replaces_the_old_one_and_none_keeps_it() -> None:
    """A client that tracks a batch again with a corrected count (as the admin API's
    document says): the new count is the one the batch completes at."""
    d = Driver(make(1), Vendor([record(i) for i in range(8)]))
    d.track(expected_count=10)
    d.poll()
    assert d.state is not None and d.state.status == "tracking"  # 8 of 10
    for count, note in ((8, "updated"), (8, "already_tracked"), (None, "already_tracked")):
        req = TrackingRequest(batch_id=BATCH, expected_count=count)
        step = d.policy.track(d.state, req, 0, d.now)
        assert step.note == note
        d.apply(step)
    assert d.state.expected_count == 8
    d.now += 60
    d.poll()
    final = d.state
    assert final.status == "completed"
    assert final.reason == "8 of 8 expected records published"


# ---- properties -----------------------------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.integers(0, 40)),
        st.tuples(st.just("amend"), st.integers(0, 40)),
        st.tuples(st.just("page"), st.just(0)),
        st.tuples(st.just("flush"), st.just(0)),
        st.tuples(st.just("poll"), st.just(0)),
        st.tuples(st.just("fail"), st.sampled_from([404, 429, 500, 401])),
        st.tuples(st.just("stop"), st.just(0)),
        st.tuples(st.just("track"), st.integers(0, 1)),
        st.tuples(st.just("tick"), st.integers(1, 2000)),
    ),
    max_size=60,
)


def _fail(d: Driver, status: int) -> None:
    exc = {
        404: ApiNotFound("x", status=404),
        429: ApiRateLimited("x", status=429, retry_after=5.0),
        500: ApiServerError("x", status=500),
        401: ApiUnauthorized("x", status=401),
    }[status]
    if d.state is not None and d.state.active:
        d.apply(d.policy.failed(d.state, exc, d.now))


def _in_poll(d: Driver, poll: Poll | None, op: str) -> Poll | None:
    """A page of the poll under way (begun if there is none), or its flush."""
    assert d.state is not None
    if op == "flush":  # the replica is short of room: the poll commits what it holds
        if poll is not None and not poll.done:
            d.apply(poll.flush(d.state, d.now))
        return poll
    if poll is None or poll.done:
        poll = d.begin() if d.state.active else None
    if poll is not None and not poll.done:
        d.page(poll)
    return poll


def _do(d: Driver, poll: Poll | None, op: str, arg: int) -> Poll | None:
    """Apply one generated operation; the poll under way after it."""
    assert d.state is not None
    if op == "insert":
        d.vendor.insert(arg, record(len(d.vendor.records)))
    elif op == "amend" and d.vendor.records:  # a record corrected in place
        d.vendor.amend(arg % len(d.vendor.records))
    elif op in ("page", "flush"):
        poll = _in_poll(d, poll, op)
    elif op == "poll":  # one poll of a batch at a time, as the runner's schedule has it
        if poll is not None and not poll.done:
            while not poll.done:
                d.page(poll)
        elif d.state.active:
            d.poll()
    elif op == "fail":
        _fail(d, arg)
    elif op == "stop":
        d.stop()
    elif op == "track":
        d.track(expected_count=None)
    elif op == "tick":
        d.now += arg
    return poll


@settings(max_examples=300, deadline=None)
@given(ops=OPS, per_txn=st.integers(1, 5), counts=st.booleans(), seed=st.integers(0, 2**16))
def test_any_sequence_keeps_the_cursor_forward_emits_nothing_twice_and_loses_nothing(
    ops: list[tuple[str, int]], per_txn: int, counts: bool, seed: int
) -> None:
    d = Driver(
        make(
            seed=seed,
            max_records_per_transaction=per_txn,
            complete_after_idle_s=600.0,
            sweep_interval_s=5000.0,
            max_age_s=1e9,
        ),
        Vendor(counts=counts),
    )
    d.track()
    poll: Poll | None = None
    amended = False
    for op, arg in ops:
        assert d.state is not None
        stopped = d.state.status == "stopped"
        emitted = len(d.emitted)
        poll = _do(d, poll, op, arg)
        amended = amended or (op == "amend" and bool(d.vendor.records))
        if stopped and op != "track":  # a stopped batch stays stopped and publishes nothing
            assert d.state.status == "stopped" and len(d.emitted) == emitted
    # The cursor saved within a generation never moves backwards (no token was refused).
    by_generation: dict[int, list[int]] = {}
    for s in d.saved:
        by_generation.setdefault(s.generation, []).append(int(s.cursor[1:]) if s.cursor else 0)
    for cursors in by_generation.values():
        assert cursors == sorted(cursors)
    assert len(d.emitted) == len(set(d.emitted))
    # Nothing is lost: tracked again and polled until it completes, every record listed by
    # then is published (a record listed after the batch completed cannot be).
    if d.state is not None and d.state.status in ("stopped", "failed"):
        d.track()
    for _ in range(50):
        if d.state is None or not d.state.active:
            break
        d.now += 700
        d.poll()
    assert d.state is not None
    if not d.vendor.records:  # nothing ever listed: no idleness to complete on
        assert d.state.status == "tracking" and not d.emitted
        return
    assert d.state.status == "completed" and d.authorizers_at_completion is not None
    # Every record listed has an event (a correction in place of one behind the cursor is
    # only read by a sweep: README, "Limits"), and a record not corrected has its own.
    assert d.authorizers_at_completion <= d.authorizers
    if not amended:
        assert sorted(d.emitted) == sorted(d.listed_at_completion or [])
    assert len(d.emitted) == len(set(d.emitted))


def test_every_result_of_a_track_request_is_a_declared_metric_label() -> None:
    from service.metrics import TRACKING_REQUESTS
    from service.policy import TRACK_NOTES

    assert {("track", note) for note in TRACK_NOTES} <= set(TRACKING_REQUESTS)


# ---- records corrected in place: the count is of authorizers, not of events -------------


@pytest.mark.parametrize("expected", [None, 5])
def test_a_correction_does_not_stand_in_for_a_record_still_behind_the_cursor(
    expected: int | None,
) -> None:
    d = Driver(make(complete_after_idle_s=900.0), Vendor([record(i) for i in range(4)]))
    d.track(expected_count=expected)
    d.poll()  # reads both pages; the cursor is at the second
    d.vendor.insert(0, record(4))  # finishes behind the cursor: the count says 5
    d.vendor.amend(4)  # and record 3 is corrected, ahead of it: a new event, no new record
    for _ in range(4):
        if d.state is None or not d.state.active:
            break
        d.now += 1000
        d.poll()
    assert d.state is not None and d.state.status == "completed"
    assert record(4).event_id in d.emitted
    assert d.authorizers_at_completion is not None
    assert d.authorizers_at_completion <= d.authorizers
    assert d.state.relisted == 1 and d.state.published == 6 and d.state.records_seen == 5


def test_a_finished_batch_is_forgettable_once_kept_for_the_retention() -> None:
    """Counted from its finish (the last poll ``_finish`` sets), or from its tracking when
    a summary has no poll; a batch still tracking never is, however old."""
    policy = make(finished_retention_s=100.0)
    tracking = BatchState(batch_id=BATCH, partition=0, tracked_at=0.0, last_poll_at=0.0)
    assert not policy.forgettable(tracking, 10_000.0)
    stop = policy.stop(tracking, 500.0)
    assert stop is not None
    stopped = stop.state
    assert not policy.forgettable(stopped, 599.0)
    assert policy.forgettable(stopped, 600.0)
    never_polled = BatchState(batch_id=BATCH, partition=0, status="failed", tracked_at=50.0)
    assert not policy.forgettable(never_polled, 149.0)
    assert policy.forgettable(never_polled, 150.0)


# ---- completion for idleness takes a read of the whole batch in the same poll ----------


def listed_behind_the_cursor_after(
    d: Driver, position: int, *, step_s: float, until_s: float
) -> bool:
    """Polls every ``step_s`` until ``until_s``, then lists a record at ``position`` (behind
    the cursor, which is at the end), and polls until the batch finishes: whether the
    record was published."""
    while d.now < until_s:
        d.now += step_s
        d.poll()
    late = record(999)
    d.vendor.insert(position, late)
    while d.state is not None and d.state.active:
        d.now += step_s
        d.poll()
    return late.authorizer_unique_id in d.authorizers


@pytest.mark.parametrize("expected", [None, 5])
def test_a_count_one_short_does_not_hide_a_record_listed_behind_the_cursor(
    expected: int | None,
) -> None:
    """The API counts one record fewer than it lists. A record then listed behind the
    cursor brings the count level with the records seen: by the count nothing is missing.
    Without an expected count the batch completed without it; with one (which it is short
    of) no sweep ever ran and the batch expired, the record listed on page 1 all along."""
    d = Driver(
        make(complete_after_idle_s=900.0, max_age_s=86400.0),
        Vendor([record(i) for i in range(1, 5)], unlisted=-1),
    )
    d.track(expected_count=expected)
    d.poll()
    assert listed_behind_the_cursor_after(d, 0, step_s=1000.0, until_s=0.0)
    assert d.state is not None and d.state.status == "completed", d.state


def test_without_a_count_the_read_that_completes_a_batch_is_made_in_that_poll() -> None:
    """No count: the batch was read whole every sweep_interval_s, and completed for
    idleness on the last of those reads, up to sweep_interval_s old. A record listed
    behind the cursor after that read was never published."""
    d = Driver(
        make(complete_after_idle_s=900.0, sweep_interval_s=400.0),
        Vendor([record(i) for i in range(1, 5)], counts=False),
    )
    d.track()
    d.poll()
    assert listed_behind_the_cursor_after(d, 0, step_s=50.0, until_s=850.0)
    assert d.state is not None and d.state.status == "completed"
    assert d.state.reason is not None and "nor in a read of the whole batch" in d.state.reason


def test_a_batch_short_of_its_expected_count_is_not_swept_while_records_still_come() -> None:
    """Records still being processed are short of the expected count without being behind
    the cursor: sweeping for them would read the whole batch at every poll. Only once the
    batch is idle does the expected count call for sweeps."""
    vendor = Vendor([record(i) for i in range(10)])
    d = Driver(make(complete_after_idle_s=900.0), vendor)
    first_pages = 0
    page = vendor.page

    def counted(token: str | None) -> Page:
        nonlocal first_pages
        first_pages += token is None
        return page(token)

    vendor.page = counted  # type: ignore[method-assign]
    d.track(expected_count=100)
    for n in range(1, 10):
        d.poll()
        vendor.records += [record(i) for i in range(10 * n, 10 * n + 10)]
        d.now += 60
    assert first_pages == 1  # the first poll's, and no sweep
    assert d.state is not None and d.state.active
    d.poll()
    assert d.state.status == "completed" and first_pages == 1


def test_a_record_without_an_authorizer_that_changes_does_not_complete_a_batch_early() -> None:
    """A record refused for having no authorizer ID is told apart by its whole text only:
    listed again with new content, it counts as one more record. With an expected count
    that the extra one reaches, the batch completed at once, without the record listed
    behind the cursor meanwhile. It now completes on a read of the whole batch, once idle."""

    def nameless(balance: str) -> InvalidRecord:
        bad = parse_record(BATCH, {"balance": balance, "timestamp": "2026-11-28T10:00:00Z"})
        assert isinstance(bad, InvalidRecord) and bad.authorizer_unique_id is None
        return bad

    vendor = Vendor([record(i) for i in range(1, 5)] + [nameless("n/a")])
    d = Driver(make(complete_after_idle_s=900.0), vendor)
    d.track(expected_count=6)
    d.poll()
    assert d.state is not None and d.state.records_seen == 5 and d.state.unkeyed == 1
    vendor.records[-1] = nameless("none")  # the vendor updates it
    late = record(0)
    vendor.insert(0, late)  # listed behind the cursor: 6 records, as expected
    while d.state.active:
        d.now += 60
        d.poll()
    assert late.authorizer_unique_id in d.authorizers
    assert d.state.status == "completed" and d.state.unkeyed == 2
    assert d.state.reason is not None and "read of the whole batch" in d.state.reason


class _Sparse(Vendor):
    """A list with a run of empty pages in it (a vendor paging a sparse scan): two pages
    of records, then ``run`` empty pages that each say more follow, then the rest of the
    records two a page. Tokens: ``t<offset>`` for pages of records, ``e<n>`` in the run."""

    run: int = MAX_EMPTY_PAGES + 3

    def page(self, token: str | None) -> Page:
        if token is not None and token.startswith("e"):
            n = int(token[1:])
            nxt = f"e{n + 1}" if n < self.run else "t4"
            return Page(BATCH, self.total(), True, nxt, [])
        served = super().page(token)
        if served.next_page_token == "t4" and (token or "t0") == "t2":
            served.next_page_token = "e1"  # the run comes after the second page
        return served

    def total(self) -> int | None:
        return len(self.records) + self.unlisted if self.counts else None


@pytest.mark.parametrize("counts", [True, False], ids=["count", "no_count"])
def test_a_sweep_gets_past_a_run_of_empty_pages_over_several_polls(counts: bool) -> None:
    """A run of more than MAX_EMPTY_PAGES empty pages cuts every reading short; the
    ordered reading gets past it because its cursor is kept, and a sweep (or the whole
    read that completion for idleness takes) must too: it goes on where the last one was
    cut short instead of starting from the first page again, so a record that appears
    behind the cursor past the run is found, and the batch completes."""
    vendor = _Sparse([record(i) for i in range(8)], counts=counts)
    d = Driver(make(complete_after_idle_s=900.0, sweep_interval_s=600.0), vendor)
    d.track()
    for _ in range(5):  # the ordered reading, ten empty pages a poll
        d.poll()
        d.now += 45
    assert d.state is not None and sorted(d.emitted) == sorted(r.event_id for r in vendor.records)
    late = record(50)
    vendor.insert(5, late)  # past the run, behind the cursor
    for _ in range(60):
        d.now += 45
        d.poll()
        if d.state.status != "tracking":
            break
    assert late.event_id in d.emitted
    assert sorted(d.emitted) == sorted(r.event_id for r in vendor.records)
    assert d.state.status == "completed", d.state.reason


def test_a_sweep_resumed_after_something_new_does_not_complete_the_batch() -> None:
    """Completion for idleness takes a read of the whole batch with nothing new in it. A
    sweep that goes on where an earlier one was cut short read its first pages back then:
    if anything new was committed since, the pages before the run must be read again
    (from the first page) before the batch completes, since a record may have appeared
    there meanwhile."""
    vendor = _Sparse([record(i) for i in range(8)], counts=False)
    d = Driver(make(complete_after_idle_s=900.0, sweep_interval_s=100_000.0), vendor)
    d.track()
    for _ in range(5):
        d.poll()
        d.now += 45
    assert d.state is not None and len(d.emitted) == 8
    d.now += 900  # idle: the poll sweeps before completing, and the run cuts it short
    d.poll()
    assert d.state.active and d.state.sweep_from is not None
    began = d.state.sweep_from[1]
    vendor.records.append(record(60))  # at the end: the ordered reading finds it
    d.now += 45
    d.poll()
    assert d.state.last_new_at is not None and d.state.last_new_at > began
    assert record(60).event_id in d.emitted
    firsts: list[float] = []  # when a read of the batch started at its first page
    served = vendor.page

    def logged(token: str | None) -> Page:
        if token is None:
            firsts.append(d.now)
        return served(token)

    vendor.page = logged  # type: ignore[method-assign]
    for _ in range(100):
        d.now += 45
        d.poll()
        if d.state.status != "tracking":
            break
    assert d.state.status == "completed", d.state.reason
    # The sweep it completed on started at the first page after the last new record.
    assert firsts and firsts[-1] > d.state.last_new_at


# ---- idleness completes only what the counts allow ----------------------------------------


@pytest.mark.parametrize(
    ("expected", "unlisted", "missing"),
    [
        (None, 1, "1 of the 5 records the API counts never listed"),
        (5, 0, "1 of 5 expected records never listed"),
    ],
    ids=["api_count_above_seen", "expected_one_above_seen"],
)
def test_an_idle_batch_short_of_its_count_never_completes_and_expires(
    expected: int | None, unlisted: int, missing: str
) -> None:
    """Four records listed, and no more ever: the API counts five (no expected count), or
    the API counts four and five are expected. Idle as it gets, the batch is short of a
    count: it never completes, goes on tracking, and expires after max_age_s, its reason
    saying what is missing."""
    d = Driver(
        make(complete_after_idle_s=900.0, max_age_s=20_000.0),
        Vendor([record(i) for i in range(4)], unlisted=unlisted),
    )
    d.track(expected_count=expected)
    tracked = d.now
    while d.state is not None and d.state.active and d.now < tracked + 19_900.0:
        d.poll()
        d.now += 500
    assert d.state is not None and d.state.status == "tracking" and d.state.records_seen == 4
    d.now = tracked + 20_000.0  # max_age_s
    assert d.begin() is None
    state = d.state  # read anew: mypy keeps d.state.status narrowed to "tracking"
    assert state.status == "expired" and d.lifecycle == ["tracking_started", "expired"]
    assert state.reason == f"tracked longer than polling.max_age_s; {missing}"
    assert len(d.emitted) == 4


def test_a_batch_tracked_again_waits_for_idleness_anew() -> None:
    """Stopped, then tracked again after longer than complete_after_idle_s: idleness counts
    from the new tracking. Its first poll does not complete it on the old quiet; it completes
    once complete_after_idle_s has passed since it was tracked again."""
    d = driver(records=4, complete_after_idle_s=900.0)
    d.poll()
    assert d.state is not None and d.state.status == "tracking" and d.state.published == 4
    d.stop()
    d.now += 5000
    d.track()
    tracked_again = d.now
    d.now += 60
    d.poll()
    assert d.state.status == "tracking", d.state.reason
    d.now = tracked_again + 899
    d.poll()
    assert d.state.status == "tracking", d.state.reason
    d.now = tracked_again + 900
    d.poll()
    state = d.state  # read anew: mypy keeps d.state.status narrowed to "tracking"
    assert state.status == "completed"
    assert d.lifecycle == ["tracking_started", "stopped", "tracking_started", "completed"]
    assert len(d.emitted) == 4


# ---- a poll's cursor ----------------------------------------------------------------------


def test_a_poll_that_reads_only_empty_pages_keeps_the_cursor_it_reached() -> None:
    """A run of empty pages longer than two polls can read: the second poll reads nothing
    new, only empty pages, but its cursor moved past them and is kept, so the third poll
    gets past the run and publishes the records listed after it."""
    vendor = _Sparse([record(i) for i in range(8)])
    vendor.run = 2 * MAX_EMPTY_PAGES + 3
    d = Driver(make(complete_after_idle_s=900.0), vendor)
    d.track()
    d.poll()  # two pages of records, then the first empty pages
    assert d.state is not None and len(d.emitted) == 4
    cursor = d.state.cursor
    assert cursor is not None and cursor.startswith("e")
    d.now += 45
    second = d.poll()  # nothing but empty pages
    assert second is not None and second.cut_short == "empty_pages"
    assert len(d.emitted) == 4 and d.state.cursor != cursor
    for _ in range(2):
        d.now += 45
        d.poll()
    assert sorted(d.emitted) == sorted(r.event_id for r in vendor.records)


def test_a_sweep_that_stops_at_the_count_does_not_move_the_cursor() -> None:
    """A record listed behind the cursor: the poll reads on in order to the end, then sweeps
    from the first page and stops there, the count reached. The cursor stays where the
    ordered reading left it, not at the page the sweep stopped at."""
    d = driver(records=6)
    d.poll()
    assert d.state is not None and d.state.cursor == "t4"
    late = record(100)
    d.vendor.insert(0, late)  # behind the cursor: the count says 7, and the list shifts
    d.now += 45
    step = d.poll()
    assert step is not None and step.sweep is not None
    assert step.sweep.found == 1 and step.sweep.pages == 1  # stopped mid-list, at the count
    assert late.event_id in d.emitted and len(d.emitted) == 7 == len(set(d.emitted))
    assert d.state.cursor == "t6"  # the last page of the ordered reading, which had shifted
    assert [s.cursor for s in d.saved[-1:]] == ["t6"]


# ---- when sweeps run ----------------------------------------------------------------------


def _first_pages(d: Driver) -> list[float]:
    """When each read of the batch from its first page started, from now on."""
    firsts: list[float] = []
    served = d.vendor.page

    def logged(token: str | None) -> Page:
        if token is None:
            firsts.append(d.now)
        return served(token)

    d.vendor.page = logged  # type: ignore[method-assign]
    return firsts


def test_fruitless_sweeps_back_off_and_none_runs_before_its_time() -> None:
    """The API counts a record it never lists: every sweep for it finds nothing. Each sets
    the next one's earliest time further off (next_sweep_at), and no poll sweeps before it:
    polled every 45 s for an hour, the batch is swept a handful of times, not at every
    poll."""
    d = Driver(make(complete_after_idle_s=900.0), Vendor([record(i) for i in range(4)], unlisted=1))
    d.track()
    d.poll()
    assert d.state is not None and d.state.published == 4
    firsts = _first_pages(d)
    polls = 80
    for _ in range(polls):
        d.now += 45
        not_before = d.state.next_sweep_at
        step = d.poll()
        assert step is not None
        if step.sweep is not None:
            assert not_before is None or d.now >= not_before
            assert step.sweep.outcome == "nothing" and step.sweep.next_sweep_in_s is not None
            assert d.state.next_sweep_at == d.now + step.sweep.next_sweep_in_s
        else:
            assert not_before is not None and d.now < not_before
    assert d.state.status == "tracking" and d.state.sweep_failures == len(firsts)
    assert 3 <= len(firsts) <= 8, firsts


def test_without_a_count_a_record_behind_the_cursor_is_found_within_the_sweep_interval() -> None:
    """No count, and records keep coming at the end of the list, so the batch is never idle:
    the periodic sweep (every sweep_interval_s) is what finds a record listed behind the
    cursor meanwhile."""
    d = Driver(
        make(complete_after_idle_s=900.0, sweep_interval_s=600.0),
        Vendor([record(i) for i in range(4)], counts=False),
    )
    d.track()
    d.poll()
    late = record(999)
    listed_at = found_at = None
    for n in range(4, 60):
        d.now += 45
        d.vendor.records.append(record(n))
        if n == 10:
            d.vendor.insert(0, late)
            listed_at = d.now
        d.poll()
        if found_at is None and late.event_id in d.emitted:
            found_at = d.now
    assert d.state is not None and d.state.status == "tracking"
    assert listed_at is not None and found_at is not None, "never found"
    assert found_at - listed_at <= 600.0 + 45.0
    assert sorted(d.emitted) == sorted(r.event_id for r in d.vendor.records)


def test_sweeps_that_find_nothing_when_nothing_is_missing_do_not_delay_later_sweeps() -> None:
    """Without a count, the periodic sweeps find nothing, and nothing was missing: they are
    not fruitless, and set no backoff. So when the API starts counting and its count shows a
    record missing (listed behind the cursor), the very next poll sweeps for it, instead of
    waiting out a backoff built up by those sweeps."""
    d = Driver(
        make(complete_after_idle_s=100_000.0, sweep_interval_s=100.0),
        Vendor([record(i) for i in range(4)], counts=False),
    )
    d.track()
    d.poll()
    sweeps = 0
    for _ in range(30):
        d.now += 45
        step = d.poll()
        assert step is not None and d.state is not None
        if step.sweep is not None:
            sweeps += 1
            assert step.sweep.found == 0 and step.sweep.next_sweep_in_s is None
    assert d.state is not None and sweeps >= 8
    assert d.state.sweep_failures == 0 and d.state.next_sweep_at is None
    late = record(999)
    d.vendor.insert(0, late)
    d.vendor.counts = True  # the API counts five now
    d.now += 45
    step = d.poll()
    assert step is not None and step.sweep is not None and step.sweep.found == 1
    assert late.event_id in d.emitted


@pytest.mark.parametrize(
    ("unlisted", "outcome", "behind"),
    [(0, "reconciled", 0), (1, "partial", 1)],
)
def test_a_sweep_reports_whether_it_found_every_record_the_count_shows(
    unlisted: int, outcome: str, behind: int
) -> None:
    """A record listed behind the cursor, and maybe one more that the API counts but does
    not list: the sweep that finds the one listed reports ``reconciled`` when the records
    seen then reach the count, ``partial`` when some are still missing. Either way it found
    something: it sets no backoff for the next sweep."""
    d = driver(records=4)
    d.poll()
    late = record(100)
    d.vendor.insert(0, late)
    d.vendor.unlisted = unlisted
    d.now += 45
    step = d.poll()
    assert step is not None and step.sweep is not None
    assert step.sweep.outcome == outcome and step.sweep.found == 1
    assert step.sweep.behind == behind and step.sweep.total_processed == 5 + unlisted
    assert step.sweep.next_sweep_in_s is None
    assert d.state is not None and d.state.sweep_failures == 0 and d.state.next_sweep_at is None
    assert late.event_id in d.emitted
