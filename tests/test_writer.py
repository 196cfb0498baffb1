"""What the step writer hands the committer for a step's dead letters."""

from __future__ import annotations

from eventschema import validate_message
from policy_harness import BATCH

from service.events import EventFactory, OutMessage
from service.metrics import Metrics
from service.records import MAX_RAW_CHARS, InvalidRecord, dumps_exact, parse_record
from service.state import BatchState
from service.step import Step
from service.writer import StepWriter


def nameless(note: str) -> InvalidRecord:
    """A record without its authorizer, with ``note`` to make its raw text as long as needed."""
    bad = parse_record(BATCH, {"balance": "1.00", "note": note})
    assert isinstance(bad, InvalidRecord)
    return bad


def test_a_dead_letter_cut_at_64_kib_says_so_and_one_not_cut_does_not() -> None:
    """The raw text of a dead letter is cut to 65,536 characters so that the event fits in
    a Kafka message; the event then carries ``raw_truncated: true``, else a consumer would
    take the cut text for the record. One at the limit or under it is whole, and the field
    is absent (the schema allows only ``true``)."""
    overhead = len(dumps_exact({"balance": "1.00", "note": ""}))
    at_limit = nameless("x" * (MAX_RAW_CHARS - overhead))
    over = nameless("x" * (MAX_RAW_CHARS - overhead + 1))
    short = nameless("x")
    assert len(at_limit.raw) == MAX_RAW_CHARS and not at_limit.raw_truncated
    assert over.raw_truncated
    writer = StepWriter(
        factory=EventFactory(balances_topic="balances", batch_events_topic="be", source="s"),
        metrics=Metrics(),
        state_topic="state",
    )
    step = Step(BatchState(batch_id=BATCH, partition=0), "page", invalid=[over, at_limit, short])
    out = writer.messages(step)
    assert all(isinstance(m, OutMessage) and m.topic == "balances.dlq" for m in out)
    docs = [
        validate_message("dlq", m.key, m.value or b"", m.headers)
        for m in out
        if isinstance(m, OutMessage)
    ]
    assert [doc["event_id"] for doc in docs] == [over.event_id, at_limit.event_id, short.event_id]
    cut, whole, small = docs
    assert cut["raw_truncated"] is True and len(cut["raw"]) == MAX_RAW_CHARS
    assert "raw_truncated" not in whole and len(whole["raw"]) == MAX_RAW_CHARS
    assert "raw_truncated" not in small and small["raw"] == dumps_exact(
        {"balance": "1.00", "note": "x"}
    )
