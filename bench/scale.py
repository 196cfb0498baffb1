"""Scale: 10,000 tracked batches on one replica, on the production 30-60 s polling window.

The simulator (its own process) holds ``--batches`` batches whose few records appear
slowly (``--records`` each over an hour), so every poll is a real request that mostly
finds nothing new, and no batch completes (no expected count, a long idle rule). The
service runs as ``bench/probe.py`` (the service plus exact samples, see there) with
``kafka.delivery=exactly_once`` and a request ceiling of ``--max-rps`` (default 300/s;
10,000 batches every 45 s on average need 222/s).

The batches are tracked through the requests topic over a ramp of ``--ramp`` seconds
(default 90 s, twice the mean window, as a book builds up rather than arriving in one
instant: 10,000 polls due in the same second would wait ~33 s for the request ceiling
by design). Then, for ``--duration`` seconds (default 180) with every batch tracked:

* poll lateness against schedule, p50/p99/max: from each poll's scheduled time to its
  first API request leaving the rate limiter (so including any wait for the ceiling);
  the scheduler-side lateness (what ``rightfoot_poller_poll_lateness_seconds`` observes)
  is reported too;
* requests per second as the API saw them (the simulator's request log): mean, the
  most in any 1-second window (must not exceed the ceiling) and in any 100 ms window
  (reported: the limiter lets 2% of the ceiling go at once and the rest spaced, at most
  35 in 100 ms at 300/s as it lets them go; the simulator, when it falls behind, counts
  up to ``max_concurrent_requests`` of them as arriving together);
* RSS of the service (peak VmHWM and the last VmRSS), its CPU use, and the p99 of the
  event-loop lag seen by the service's own loop monitor.

    uv run python bench/scale.py --bootstrap 127.0.0.1:29092 [--batches 10000 --duration 180]

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
    log,
    percentile,
    rounded,
    send_tracking_requests,
    service,
    service_env,
    simulator,
)


def max_in_window(times: Sequence[float], width: float) -> int:
    """The most events in any window [t, t + width) of sorted times."""
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= width:
            start += 1
        best = max(best, end - start + 1)
    return best


def in_window(samples: list[list[float]], start: float, end: float) -> list[float]:
    return [value for t, value in samples if start <= t <= end]


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    async with simulator(workdir / "simulator.log") as sim:
        log(f"creating {args.batches} batches")
        batch_ids = await sim.create_batches(args.batches, args.records, spread_s=3600.0)
        topics = Topics()
        probe_out = workdir / "probe.json"
        env = service_env(
            topics,
            args.bootstrap,
            sim.base_url,
            RFP_POLLING__INTERVAL_MIN_S=str(args.window_min),
            RFP_POLLING__INTERVAL_MAX_S=str(args.window_max),
            RFP_POLLING__COMPLETE_AFTER_IDLE_S="86400",
            RFP_RIGHTFOOT__MAX_REQUESTS_PER_S=str(args.max_rps),
            BENCH_PROBE_OUT=str(probe_out),
        )
        command = (str(Path(__file__).with_name("probe.py")),)
        async with service(env, command=command, log_path=workdir / "service.log") as svc:
            log(f"tracking {args.batches} batches over {args.ramp:.0f} s")
            await send_tracking_requests(
                args.bootstrap,
                topics.requests,
                [(batch_id, None) for batch_id in batch_ids],
                per_second=args.batches / args.ramp if args.ramp > 0 else None,
            )
            tracked = await _wait_tracked(svc, args.batches, timeout_s=120)
            log(f"{args.batches} batches tracked; measuring for {args.duration:.0f} s")
            start, cpu_before = time.monotonic(), svc.cpu_seconds()
            rss_max = 0.0
            while time.monotonic() - start < args.duration:
                await asyncio.sleep(1.0)
                rss_max = max(rss_max, svc.memory_mb().get("VmRSS", 0.0))
            end, cpu = time.monotonic(), svc.cpu_seconds() - cpu_before
            memory = svc.memory_mb()
            metrics = await svc.metrics()
        requests = await sim.request_log()
    samples = json.loads(probe_out.read_text())
    api_times = sorted(
        r["started"]
        for r in requests
        if r["path"] == "/v1/balances" and start <= r["started"] <= end
    )
    lateness = in_window(samples["request_lateness"], start, end)
    scheduler = in_window(samples["poll_lateness"], start, end)
    lag = in_window(samples["loop_lag"], start, end)
    sent = sorted(t for t in samples["requests"] if start <= t <= end)
    tracked_metric = sum(v for _, v in metrics.get("rightfoot_poller_tracked_batches", []))
    return {
        "batches": args.batches,
        "tracked": int(tracked_metric or tracked),
        "window_s": [args.window_min, args.window_max],
        "duration_s": round(end - start, 1),
        "polls": len(lateness),
        "p50_lateness_s": rounded(percentile(lateness, 50)),
        "p99_lateness_s": rounded(percentile(lateness, 99)),
        "max_lateness_s": rounded(max(lateness, default=float("nan"))),
        "scheduler_p99_lateness_s": rounded(percentile(scheduler, 99)),
        "scheduler_max_lateness_s": rounded(max(scheduler, default=float("nan"))),
        "rps_ceiling": args.max_rps,
        "rps_mean": round(len(api_times) / (end - start), 1),
        "rps_max_1s": max_in_window(api_times, 1.0),
        "requests_max_100ms": max_in_window(api_times, 0.1),
        "sent_max_1s": max_in_window(sent, 1.0),
        "sent_max_100ms": max_in_window(sent, 0.1),
        "rss_mb": round(max(memory.get("VmHWM", 0.0), rss_max), 1),
        "rss_now_mb": round(memory.get("VmRSS", 0.0), 1),
        "cpu_share": round(cpu / (end - start), 3),
        "loop_lag_p99_ms": rounded(percentile(lag, 99) * 1000, 1),
        "loop_lag_max_ms": rounded(max(lag, default=float("nan")) * 1000, 1),
    }


async def _wait_tracked(svc: Any, count: int, timeout_s: float) -> int:
    """Wait until the service tracks ``count`` batches (its tracked_batches gauge)."""
    deadline = time.monotonic() + timeout_s
    tracked = 0
    while time.monotonic() < deadline:
        metrics = await svc.metrics()
        tracked = int(sum(v for _, v in metrics.get("rightfoot_poller_tracked_batches", [])))
        if tracked >= count:
            return tracked
        await asyncio.sleep(0.5)
    raise RuntimeError(f"only {tracked} of {count} batches tracked after {timeout_s} s")


def summary_line(result: dict[str, Any]) -> str:
    return (
        f"scale: {result['tracked']:,} batches for {result['duration_s']:.0f} s, "
        f"{result['polls']:,} polls; lateness p50 {result['p50_lateness_s']} s, "
        f"p99 {result['p99_lateness_s']} s, max {result['max_lateness_s']} s; "
        f"{result['rps_mean']} req/s (max {result['rps_max_1s']} in 1 s, "
        f"{result['requests_max_100ms']} in 100 ms, ceiling {result['rps_ceiling']}); "
        f"RSS {result['rss_mb']} MiB; loop lag p99 {result['loop_lag_p99_ms']} ms"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", type=int, default=10_000)
    parser.add_argument("--records", type=int, default=3, help="records per batch (over 1 h)")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds measured")
    parser.add_argument("--ramp", type=float, default=90.0, help="seconds to track them all")
    parser.add_argument("--max-rps", type=float, default=300.0, help="request ceiling")
    parser.add_argument("--window-min", type=float, default=30.0)
    parser.add_argument("--window-max", type=float, default=60.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers")
    parser.add_argument("--workdir", type=Path, help="keep the logs here (default: a temp dir)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(measure(args, workdir))
    print(summary_line(result), flush=True)
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
