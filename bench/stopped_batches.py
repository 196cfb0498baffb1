"""Batches stopped or failed: what a replica holds of them, and what tracking one again costs.

A state partition is written on the broker at ``--bootstrap`` (a fresh topic of one
partition) the way the service writes it: ``--batches`` batches of ``--records``
records each (two fingerprints a record, its event's and its authorizer's), each
saved by commits of ``--per-commit`` records (``service.state.state_records``), then
stopped (``Policy.stop``). Then, with the service's own code (``PartitionOwner``):

- ``restore``: the partition read back as a replica does when it is assigned the
  partition. Figures: seconds, the fingerprints it holds afterwards (all batches
  stopped: none) and the Python heap's peak during the read over the heap before
  (``tracemalloc``, aiokafka's buffers included) and what the restored batches keep
  once it is done, in MiB. Seconds come from one run, the heap from a second one under
  ``tracemalloc`` (which slows allocation many times over).
- ``read_only_*``: the same read keeping nothing: what the consumer itself takes.
- ``tracking_*``: the same restore of the same batches left tracking (as every
  stopped batch was restored before this release: with its fingerprints).
- ``load``: one batch read back whole, as its first poll does once it is tracked
  again (``PartitionOwner.load_batch``: the whole partition read, that batch's chunks
  kept). Figures: seconds, fingerprints read, the heap's peak over the heap before.

    uv run python bench/stopped_batches.py --bootstrap 127.0.0.1:29092 \
        [--batches 10 --records 100000]

Prints a summary line, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from harness import create_topic, log

from service.config import Settings
from service.events import EventFactory
from service.metrics import Metrics
from service.partitions import PartitionOwner
from service.policy import Policy
from service.state import BatchState, StateRestore, state_records
from service.tracker import Tracker


async def write_partition(
    bootstrap: str, topic: str, batches: list[str], records: int, per_commit: int, stop: bool
) -> int:
    """Write the batches' state records (stopped, or left tracking); the fingerprints stored."""
    rng = random.Random(7)
    policy = Policy(Settings().polling, 60.0, rng)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks="all")
    await producer.start()
    stored = 0
    try:
        for batch_id in batches:
            state = BatchState(batch_id=batch_id, partition=0, tracked_at=time.time())
            for start in range(0, records, per_commit):
                n = min(per_commit, records - start)
                state.remember([rng.getrandbits(64) for _ in range(2 * n)])
                state.published += n
                stored += 2 * n
                for key, value in state_records(state):
                    await producer.send(topic, value, key=key, partition=0)
            if not stop:
                continue
            step = policy.stop(state, time.time())
            assert step is not None
            for key, value in state_records(step.state):
                await producer.send(topic, value, key=key, partition=0)
        await producer.flush()
    finally:
        await producer.stop()
    return stored


def owner(bootstrap: str, topic: str) -> PartitionOwner:
    settings = Settings.model_validate(
        {"kafka": {"bootstrap_servers": bootstrap, "state_topic": topic, "partitions": 1}}
    )
    metrics = Metrics()
    factory = EventFactory(balances_topic="b", batch_events_topic="e", source="bench")
    tracker = Tracker(settings, source=None, metrics=metrics, factory=factory)  # type: ignore[arg-type]
    return PartitionOwner(
        settings,
        metrics=metrics,
        tracker=tracker,
        consumer=lambda: None,
        producer=lambda: None,
        stopping=asyncio.Event(),
    )


async def measured(run: Callable[[], Awaitable[Any]]) -> tuple[Any, float, float, float]:
    """``run()``'s result, its seconds, and over the heap before (MiB) the heap's peak
    and what its result holds, in a second run under ``tracemalloc`` (which slows
    allocation many times over)."""
    started = time.perf_counter()
    await run()
    took = time.perf_counter() - started
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = await run()
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, took, (peak - before) / 2**20, (current - before) / 2**20


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:29092")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--per-commit", type=int, default=1000)
    args = parser.parse_args()

    topic = f"bench-stopped-{uuid.uuid4().hex[:8]}"
    tracking = f"bench-tracking-{uuid.uuid4().hex[:8]}"
    batches = [str(uuid.uuid4()) for _ in range(args.batches)]
    for name, stop in ((topic, True), (tracking, False)):
        await create_topic(args.bootstrap, name, partitions=1)
        started = time.perf_counter()
        stored = await write_partition(
            args.bootstrap, name, batches, args.records, args.per_commit, stop
        )
        log(f"{name}: {stored:,} fingerprints written in {time.perf_counter() - started:.1f} s")

    # What the consumer itself holds while it reads the partition (no record kept).
    _, read_s, read_peak, _ = await measured(
        lambda: owner(args.bootstrap, topic)._read_partition(
            0, StateRestore(0, only=[]), lambda _b, e: None
        )
    )
    tracking_owner = owner(args.bootstrap, tracking)
    (active, _), active_s, active_peak, active_kept = await measured(
        lambda: tracking_owner._read_state(0)
    )
    active_held = sum(len(b.seen) for b in active.values())
    assert active_held == stored
    del active
    partitions = owner(args.bootstrap, topic)
    (restored, unreadable), restore_s, restore_peak, restore_kept = await measured(
        lambda: partitions._read_state(0)
    )
    assert not unreadable and len(restored) == args.batches
    assert all(b.status == "stopped" and not b.seen_loaded for b in restored.values())
    held = sum(len(b.seen) for b in restored.values())
    target = batches[len(batches) // 2]
    loaded, load_s, load_peak, load_kept = await measured(lambda: partitions.load_batch(0, target))
    assert loaded is not None and len(loaded.seen) == 2 * args.records
    figures = {
        "batches": args.batches,
        "records_per_batch": args.records,
        "fingerprints_stored": stored,
        "read_only_s": round(read_s, 3),
        "read_only_heap_peak_mib": round(read_peak, 1),
        "restore_s": round(restore_s, 3),
        "restore_fingerprints_held": held,
        "restore_heap_peak_mib": round(restore_peak, 1),
        "restore_heap_kept_mib": round(restore_kept, 2),
        "tracking_restore_s": round(active_s, 3),
        "tracking_fingerprints_held": active_held,
        "tracking_heap_peak_mib": round(active_peak, 1),
        "tracking_heap_kept_mib": round(active_kept, 2),
        "load_s": round(load_s, 3),
        "load_fingerprints": len(loaded.seen),
        "load_heap_peak_mib": round(load_peak, 1),
        "load_heap_kept_mib": round(load_kept, 2),
    }
    print(
        f"{args.batches} stopped batches of {args.records:,} records: restored in "
        f"{restore_s:.2f} s holding {held} fingerprints, {restore_kept:.2f} MiB kept "
        f"(left tracking: {active_s:.2f} s, {active_held:,}, {active_kept:.1f} MiB); "
        f"one read back ({len(loaded.seen):,} fingerprints) in {load_s:.2f} s "
        f"({load_kept:.1f} MiB kept)"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
