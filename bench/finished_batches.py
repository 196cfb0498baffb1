"""Finished batches: what keeping them costs a replica, and what forgetting them gives back.

A state partition is written on the broker at ``--bootstrap`` (a fresh topic of one
partition) as the service leaves it for ``--batches`` batches that completed (their
summaries only, as after compaction: a completed batch's fingerprint chunks are
tombstoned by the commit that completes it). Each summary is the service's own
(``service.state.state_records``) of a batch of ``--records`` records over four
statuses, finished through ``Policy``. Then, with the service's own code:

- ``restore``: the partition read as a replica reads it when it is assigned it
  (``PartitionOwner``): seconds, and the Python heap (``tracemalloc``) the restored
  batches keep, in MiB and bytes a batch;
- ``view``: the same records through ``StateView``, which every replica keeps of every
  partition for ``GET /v1/batches``: the heap it keeps;
- ``forget``: the restored batches past ``polling.finished_retention_s`` forgotten by
  ``Tracker.forget_finished`` (a commit takes no more batches once it holds
  ``MAX_FORGET_MESSAGES`` tombstones, as the service commits them): the CPU seconds of
  building them, the rounds, and the tombstones, which are then written to the
  partition;
- ``restore_after``: the partition read again once the tombstones are on it: seconds
  and heap kept. The broker's cleaner has not run yet, so the read still goes over
  every record; once it has, the summaries and then the tombstones
  (``delete.retention.ms`` later) are gone from the log as well.

Seconds come from one run, the heap from a second one under ``tracemalloc``.

    uv run python bench/finished_batches.py --bootstrap 127.0.0.1:29092 [--batches 100000]

Prints a summary line, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
import uuid
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from harness import create_topic, log
from stopped_batches import measured, owner

from service.config import KafkaConfig, Settings
from service.events import OutMessage, Publishable
from service.http_api import LIST_LIMIT
from service.policy import Policy
from service.state import BatchState, state_records
from service.tracker import MAX_FORGET_MESSAGES, Tracker
from service.view import StateView
from service.worker import PartitionWorker

STATUSES = ("AVAILABLE", "INSUFFICIENT_FUNDS", "NO_ACCOUNT", "INVALID_CREDENTIALS")


async def write(bootstrap: str, topic: str, records: Sequence[tuple[bytes, bytes | None]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks="all")
    await producer.start()
    try:
        for key, value in records:
            await producer.send(topic, value, key=key, partition=0)
        await producer.flush()
    finally:
        await producer.stop()


def finished_summaries(batches: list[str], records: int) -> list[tuple[bytes, bytes | None]]:
    """Each batch's last summary, completed through the policy as the service completes it."""
    rng = random.Random(11)
    policy = Policy(Settings().polling, 60.0, rng)
    out: list[tuple[bytes, bytes | None]] = []
    now = time.time()
    for batch_id in batches:
        state = BatchState(batch_id=batch_id, partition=0, tracked_at=now - 3600)
        state.expected_count = state.published = records
        state.counts = dict.fromkeys(STATUSES, records // len(STATUSES))
        state.total_processed = records
        state.cursor = f"token-{rng.getrandbits(64):016x}"
        step = policy._finish(state, "completed", "", now)
        out += [(k, v) for k, v in state_records(step.state) if v is not None]
    return out


async def read_view(bootstrap: str, topic: str) -> StateView:
    """A StateView fed every record of the partition, as a replica's view follows it."""
    view = StateView(KafkaConfig(bootstrap_servers=bootstrap, state_topic=topic), "bench")
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        while await consumer.position(tp) < end:
            for messages in (await consumer.getmany(timeout_ms=1000, max_records=5000)).values():
                for msg in messages:
                    view._apply(msg.key, msg.value, msg.partition)
    finally:
        await consumer.stop()
    return view


def list_pages(view: StateView) -> dict[str, float]:
    """GET /v1/batches over the view, walked to the end a page of LIST_LIMIT at a time:
    the first page (which sorts the IDs), the median page after it, a page after one new
    batch, and, in the same run, a sort of every ID: what each page cost when the view
    sorted its batches for every page. Milliseconds."""

    def page(after: str | None) -> tuple[float, str | None]:
        started = time.perf_counter()
        batches, more = view.list(after=after, limit=LIST_LIMIT)
        took = (time.perf_counter() - started) * 1000
        return took, batches[-1]["batch_id"] if more else None

    first, after = page(None)
    rest: list[float] = []
    while after is not None:
        took, after = page(after)
        rest.append(took)
    added = str(uuid.uuid4())
    view.put(added, {"batch_id": added, "status": "tracking"})
    after_add, _ = page(None)
    view.remove(added)
    started = time.perf_counter()
    sorted(view.batches)
    sort_all = (time.perf_counter() - started) * 1000
    return {
        "list_first_page_ms": round(first, 2),
        "list_page_ms": round(statistics.median(rest), 3) if rest else 0.0,
        "list_page_after_a_new_batch_ms": round(after_add, 3),
        "list_sort_of_every_id_ms": round(sort_all, 2),
    }


class Collect:
    """A committer that keeps what it is given (the bench writes it to the topic itself)."""

    def __init__(self) -> None:
        self.units: list[list[Publishable]] = []
        self.on_failure = None

    async def publish(
        self, messages: Sequence[Publishable], request_offset: int | None = None
    ) -> None:
        self.units.append(list(messages))

    async def close(self, timeout: float) -> None:
        return None


async def forget(tracker: Tracker, batches: dict[str, BatchState]) -> tuple[Collect, int, float]:
    """Every batch forgotten by the tracker's own rounds: the committer, rounds, CPU s."""
    committer = Collect()
    worker = PartitionWorker(partition=0, publisher=committer, batches=dict(batches))
    tracker.add_worker(worker)
    tracker.wall = lambda: time.time() + tracker.settings.polling.finished_retention_s
    rounds, started = 0, time.process_time()
    while True:
        rounds += 1
        more = tracker.forget_finished()
        await asyncio.sleep(0)
        if not more:
            break
    cpu = time.process_time() - started
    await asyncio.sleep(0)
    assert not worker.batches
    return committer, rounds, cpu


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:29092")
    parser.add_argument("--batches", type=int, default=100_000)
    parser.add_argument("--records", type=int, default=5_000, help="records of each batch")
    args = parser.parse_args()

    topic = f"bench-finished-{uuid.uuid4().hex[:8]}"
    await create_topic(args.bootstrap, topic, partitions=1)
    batches = [str(uuid.uuid4()) for _ in range(args.batches)]
    summaries = finished_summaries(batches, args.records)
    started = time.perf_counter()
    await write(args.bootstrap, topic, summaries)
    summary_bytes = sum(len(k) + len(v or b"") for k, v in summaries)
    log(f"{topic}: {len(summaries):,} summaries written in {time.perf_counter() - started:.1f} s")

    partitions = owner(args.bootstrap, topic)
    (restored, unreadable), restore_s, restore_peak, restore_kept = await measured(
        lambda: partitions._read_state(0)
    )
    assert not unreadable and len(restored) == args.batches
    assert all(b.status == "completed" for b in restored.values())
    view, view_s, _, view_kept = await measured(lambda: read_view(args.bootstrap, topic))
    assert len(view.batches) == args.batches
    listing = list_pages(view)

    committer, rounds, forget_cpu = await forget(partitions.tracker, restored)
    tombstones: list[tuple[bytes, bytes | None]] = [
        (m.key or b"", m.value)
        for unit in committer.units
        for m in unit
        if isinstance(m, OutMessage)
    ]
    assert len(tombstones) == args.batches and all(v is None for _, v in tombstones)
    assert max(len(unit) for unit in committer.units) <= MAX_FORGET_MESSAGES
    del restored
    await write(args.bootstrap, topic, tombstones)

    (after, _), after_s, after_peak, after_kept = await measured(
        lambda: owner(args.bootstrap, topic)._read_state(0)
    )
    assert not after
    view_after, _, _, view_after_kept = await measured(lambda: read_view(args.bootstrap, topic))
    assert not view_after.batches
    per_batch = 2**20 / args.batches
    figures: dict[str, Any] = {
        "batches": args.batches,
        "summary_bytes_per_batch": round(summary_bytes / args.batches, 1),
        "restore_s": round(restore_s, 3),
        "restore_heap_kept_mib": round(restore_kept, 1),
        "restore_heap_peak_mib": round(restore_peak, 1),
        "restore_bytes_per_batch": round(restore_kept * per_batch),
        "view_s": round(view_s, 3),
        "view_heap_kept_mib": round(view_kept, 1),
        "view_bytes_per_batch": round(view_kept * per_batch),
        **listing,
        "forget_cpu_s": round(forget_cpu, 3),
        "forget_rounds": rounds,
        "forget_commits": len(committer.units),
        "tombstones": len(tombstones),
        "restore_after_s": round(after_s, 3),
        "restore_after_heap_kept_mib": round(after_kept, 2),
        "restore_after_heap_peak_mib": round(after_peak, 1),
        "view_after_heap_kept_mib": round(view_after_kept, 2),
    }
    print(
        f"{args.batches:,} completed batches: restore {restore_s:.2f} s keeping "
        f"{restore_kept:.1f} MiB ({figures['restore_bytes_per_batch']} B a batch), every "
        f"replica's view {view_kept:.1f} MiB ({figures['view_bytes_per_batch']} B a batch); "
        f"forgotten in {len(committer.units)} commits ({forget_cpu:.2f} CPU s); then restore "
        f"{after_s:.2f} s keeping {after_kept:.2f} MiB, view {view_after_kept:.2f} MiB"
    )
    print(
        f"GET /v1/batches pages of {LIST_LIMIT}: the first {listing['list_first_page_ms']} ms, "
        f"then {listing['list_page_ms']} ms each, {listing['list_page_after_a_new_batch_ms']} "
        f"ms after a new batch; a sort of every ID (once each page before) "
        f"{listing['list_sort_of_every_id_ms']} ms"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
