"""Latency: from a record becoming visible at the simulator to its event being readable in Kafka.

The simulator (its own process) gets ``--batches`` batches of ``--records`` records
that appear at random moments over ``--spread`` seconds (the simulator's
``visible_at``); the service (``python -m service run``, its own process,
``exactly_once``) tracks them all at once with a polling window of
``--window-min``..``--window-max`` seconds (1-2 s by default), and a
read_committed consumer in this process (``fetch_max_wait_ms=100``) notes when each
event arrives. A record's latency is its event's arrival minus the moment the record
became visible: the batch's creation time (taken just before its creation request,
so a latency is never understated) plus its ``visible_at``. All clocks are the same
CLOCK_MONOTONIC, in every process.

A record can become visible just after a poll, and then waits a whole window for the
next one, so latency is bounded below by the window; what the service adds on top
is p99 minus the window's maximum. Records visible in the first ``--warmup`` seconds
(while the batches are being tracked) are not counted.

    uv run python bench/latency.py --bootstrap 127.0.0.1:29092 [--batches 20 --records 100]

Prints a summary line, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness import (
    Topics,
    committed_consumer,
    log,
    percentile,
    rounded,
    send_tracking_requests,
    service,
    service_env,
    simulator,
)


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    async with simulator(workdir / "simulator.log") as sim:
        topics = Topics()
        env = service_env(
            topics,
            args.bootstrap,
            sim.base_url,
            RFP_POLLING__INTERVAL_MIN_S=str(args.window_min),
            RFP_POLLING__INTERVAL_MAX_S=str(args.window_max),
            RFP_RIGHTFOOT__MAX_REQUESTS_PER_S="1000",
        )
        async with service(env, log_path=workdir / "service.log"):
            consumer = committed_consumer(args.bootstrap, topics.balances, fetch_max_wait_ms=100)
            await consumer.start()
            try:
                created: dict[str, float] = {}
                for _ in range(args.batches):
                    before = time.monotonic()
                    (batch_id,) = await sim.create_batches(1, args.records, spread_s=args.spread)
                    created[batch_id] = before
                await send_tracking_requests(
                    args.bootstrap, topics.requests, [(b, args.records) for b in created]
                )
                log(f"{args.batches} batches tracked; records appear over {args.spread:.0f} s")
                arrivals = await _read_events(consumer, args.batches * args.records, args)
            finally:
                await consumer.stop()
        visible = {}
        for batch_id, at in created.items():
            body = await sim.control(f"/_sim/batches/{batch_id}/records")
            for record in body["records"]:
                visible[(batch_id, record["authorizer_unique_id"])] = at + record["visible_at"]
    counted_from = min(created.values()) + args.warmup
    latencies = [
        arrival - visible[key] for key, arrival in arrivals.items() if visible[key] >= counted_from
    ]
    p99 = percentile(latencies, 99)
    return {
        "records": len(latencies),
        "window_s": [args.window_min, args.window_max],
        "p50_s": rounded(percentile(latencies, 50)),
        "p99_s": rounded(p99),
        "max_s": rounded(max(latencies, default=float("nan"))),
        "p99_over_window_s": rounded(p99 - args.window_max),
    }


async def _read_events(
    consumer: Any, count: int, args: argparse.Namespace
) -> dict[tuple[str, str], float]:
    """Arrival time of each balance event, by (batch ID, authorizer ID)."""
    arrivals: dict[tuple[str, str], float] = {}
    deadline = time.monotonic() + args.spread + args.timeout
    while len(arrivals) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(arrivals)} of {count} events arrived in time")
        chunk = await consumer.getmany(timeout_ms=200)
        now = time.monotonic()
        for messages in chunk.values():
            for msg in messages:
                value = json.loads(msg.value)
                arrivals.setdefault((value["batch_id"], value["authorizer_unique_id"]), now)
    return arrivals


def summary_line(result: dict[str, Any]) -> str:
    low, high = result["window_s"]
    return (
        f"latency: {result['records']:,} records, window {low}-{high} s: "
        f"p50 {result['p50_s']} s, p99 {result['p99_s']} s, max {result['max_s']} s; "
        f"p99 - window max = {result['p99_over_window_s']} s"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--records", type=int, default=100, help="records per batch")
    parser.add_argument("--spread", type=float, default=60.0, help="seconds records appear over")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds not counted")
    parser.add_argument("--window-min", type=float, default=1.0)
    parser.add_argument("--window-max", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds past the spread")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers")
    parser.add_argument("--workdir", type=Path, help="keep the logs here (default: a temp dir)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(measure(args, workdir))
    print(summary_line(result), flush=True)
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
