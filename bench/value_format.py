"""Value formats: the service with ``kafka.value_format`` json against json_sr, in one run.

The simulator serves ``--batches`` batches of ``--records`` records, all visible at
once. A schema registry (Apicurio, ``scripts/registry.sh`` on ``--registry-port``) is
started if none answers there. Then, in ``--rounds`` rounds (every other one in
reverse order), the service (``kafka.delivery=exactly_once``, fresh topics, a
zero-length polling window) publishes every batch once with ``json`` and once with
``json_sr`` (``throughput.run_service``: the clock runs from the first tracking request
to the moment the last ``completed`` event is readable with read_committed; off the
clock, a read_committed consumer counts the balance events and sums their value bytes).

For each format: records/s, CPU seconds per million records, and the mean bytes of a
balance event's value; ``json_sr_throughput_ratio`` is json_sr records/s over json's
within a round (medians over rounds).

    uv run python bench/value_format.py --bootstrap 127.0.0.1:29092
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness import ROOT, log, simulator
from throughput import run_service

FORMATS = ("json", "json_sr")


def registry(port: int, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "scripts" / "registry.sh"), command],
        env={**os.environ, "REGISTRY_PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    url = f"http://127.0.0.1:{args.registry_port}/apis/ccompat/v7"
    started = registry(args.registry_port, "status").returncode != 0
    if started:
        log(f"starting a schema registry on port {args.registry_port}")
        result = registry(args.registry_port, "start")
        if result.returncode != 0:
            raise RuntimeError(f"cannot start the registry:\n{result.stdout}\n{result.stderr}")
    rounds: list[dict[str, dict[str, Any]]] = []
    try:
        async with simulator(workdir / "simulator.log") as sim:
            batch_ids = await sim.create_batches(args.batches, args.records)
            for number in range(args.rounds):
                runs: dict[str, dict[str, Any]] = {}
                for fmt in FORMATS if number % 2 == 0 else FORMATS[::-1]:
                    log(f"round {number + 1}: {fmt}")
                    runs[fmt] = await run_service(
                        sim,
                        args.bootstrap,
                        batch_ids,
                        args.records,
                        "exactly_once",
                        workdir=workdir,
                        py_spy=None,
                        timeout_s=args.timeout,
                        name=fmt,
                        RFP_KAFKA__VALUE_FORMAT=fmt,
                        RFP_SCHEMA_REGISTRY__URL=url,
                    )
                    print(f"round {number + 1}  {fmt:<8} {json.dumps(runs[fmt])}", flush=True)
                rounds.append(runs)
    finally:
        if started:
            registry(args.registry_port, "stop")

    def median_of(fmt: str, key: str) -> float:
        return round(statistics.median(r[fmt][key] for r in rounds), 3)

    ratios = [r["json_sr"]["records_per_s"] / r["json"]["records_per_s"] for r in rounds]
    return {
        "records": rounds[0]["json"]["records"],
        "rounds": args.rounds,
        "json_records_per_s": median_of("json", "records_per_s"),
        "json_cpu_s_per_million": median_of("json", "cpu_s_per_million"),
        "json_bytes_per_event": median_of("json", "bytes_per_event"),
        "json_sr_records_per_s": median_of("json_sr", "records_per_s"),
        "json_sr_cpu_s_per_million": median_of("json_sr", "cpu_s_per_million"),
        "json_sr_bytes_per_event": median_of("json_sr", "bytes_per_event"),
        "json_sr_throughput_ratio": round(statistics.median(ratios), 3),
    }


def summary_line(result: dict[str, Any]) -> str:
    return (
        f"value formats: json {result['json_records_per_s']:.0f} records/s, "
        f"{result['json_bytes_per_event']} B/event; json_sr {result['json_sr_records_per_s']:.0f}"
        f" records/s, {result['json_sr_bytes_per_event']} B/event; "
        f"ratio {result['json_sr_throughput_ratio']}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--records", type=int, default=5_000, help="records per batch")
    parser.add_argument("--rounds", type=int, default=3, help="median over this many rounds")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per service run")
    parser.add_argument("--registry-port", type=int, default=28481)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers")
    add_arguments(parser)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-format-") as tmp:
        result = asyncio.run(measure(args, Path(tmp)))
    print(summary_line(result), flush=True)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
