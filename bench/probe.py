"""The service exactly as ``python -m service run`` runs it, plus exact samples for the benchmarks.

The service's own metrics are histograms; a benchmark wants every value. This
entry point builds the service with a ``Metrics`` whose poll-lateness and
event-loop-lag histograms also keep each observation (with its monotonic time),
and wraps the replica's rate limiter to note when each API request is let go.
Nothing else changes: same configuration (RFP_* variables), same logging, same
garbage-collector settings, same signals. On exit it writes the samples as JSON
to the file named by ``BENCH_PROBE_OUT``:

* ``poll_lateness``: [time, seconds] per poll, from its scheduled time to the
  moment the scheduler started it (what the service's histogram observes);
* ``request_lateness``: [time, seconds] per poll, from its scheduled time to the
  moment its first API request was let go by the rate limiter, i.e. including
  any wait for the replica-wide request ceiling;
* ``requests``: the time each API request was let go by the rate limiter;
* ``loop_lag``: [time, seconds] per check of the service's event-loop monitor.

The link between a poll and its first request is a context variable set when the
scheduler observes the poll's lateness, just before it creates the poll's task
(which copies the context). Monotonic times are comparable across processes.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from service import app
from service.cli import build_parser
from service.config import Settings, load_settings
from service.logs import configure_logging
from service.metrics import Metrics
from service.runtime import tune_gc

# [scheduled time, lateness of the first request or None] of the poll running in this context
_POLL: contextvars.ContextVar[list[float | None] | None] = contextvars.ContextVar(
    "bench_poll", default=None
)


class Samples:
    def __init__(self) -> None:
        self.poll_lateness: list[tuple[float, float]] = []
        self.request_lateness: list[tuple[float, float]] = []
        self.requests: list[float] = []
        self.loop_lag: list[tuple[float, float]] = []

    def to_json(self) -> dict[str, Any]:
        return {
            "poll_lateness": self.poll_lateness,
            "request_lateness": self.request_lateness,
            "requests": self.requests,
            "loop_lag": self.loop_lag,
        }


class _Recording:
    """A histogram that also hands every observed value to ``record``."""

    def __init__(self, histogram: Any, record: Any) -> None:
        self._histogram = histogram
        self._record = record

    def observe(self, value: float, *args: Any, **kwargs: Any) -> None:
        self._record(value)
        self._histogram.observe(value, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._histogram, name)


def probed_metrics(samples: Samples) -> Metrics:
    metrics = Metrics()

    def poll_started(lateness: float) -> None:
        now = time.monotonic()
        samples.poll_lateness.append((now, lateness))
        _POLL.set([now - lateness, None])  # copied into the poll task created next

    def loop_checked(lag: float) -> None:
        samples.loop_lag.append((time.monotonic(), lag))

    metrics.poll_lateness = _Recording(metrics.poll_lateness, poll_started)  # type: ignore[assignment]
    metrics.loop_lag = _Recording(metrics.loop_lag, loop_checked)  # type: ignore[assignment]
    return metrics


def probed_service_class(samples: Samples) -> type[app.PollerService]:
    class ProbedService(app.PollerService):
        def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
            super().__init__(settings, metrics=metrics or probed_metrics(samples))
            acquire = self.limiter.acquire

            async def acquire_and_note() -> None:
                await acquire()
                now = time.monotonic()
                samples.requests.append(now)
                poll = _POLL.get()
                if poll is not None and poll[1] is None:
                    assert poll[0] is not None
                    poll[1] = now - poll[0]
                    samples.request_lateness.append((now, poll[1]))

            self.limiter.acquire = acquire_and_note  # type: ignore[method-assign]

    return ProbedService


def main() -> int:
    args = build_parser().parse_args(["run", *sys.argv[1:]])
    settings = load_settings(args.config)
    configure_logging(
        level=settings.logging.level,
        fmt=settings.logging.format,
        instance_id=settings.instance_id,
        secrets=settings.secrets(),
    )
    samples = Samples()
    app.PollerService = probed_service_class(samples)  # type: ignore[misc]
    tune_gc()
    try:
        return asyncio.run(app.run_service(settings))
    finally:
        out = os.environ.get("BENCH_PROBE_OUT")
        if out:
            Path(out).write_text(json.dumps(samples.to_json()))


if __name__ == "__main__":
    sys.exit(main())
