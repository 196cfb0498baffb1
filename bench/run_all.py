"""``make bench``: throughput against the ceiling, scale, latency and big batches, on one broker.

Runs ``bench/throughput.py``, ``bench/scale.py``, ``bench/latency.py``,
``bench/big_batch.py``, ``bench/value_format.py`` and ``bench/seen_memory.py`` (no
broker) one after the other (each docstring says what it measures and how) against the
broker at ``--bootstrap``,
prints their figures, whether each performance target is met, and ends with one JSON
line:

    throughput_ratio            exactly_once records/s over the per-message ceiling's (>= 0.8)
    throughput_ratio_batched    exactly_once records/s over the batched ceiling's (>= 0.8)
    vs_peer_throughput          exactly_once records/s over Benthos's (>= 1.5)
    vs_peer_cpu                 exactly_once CPU per record over Benthos's (<= 0.5)
    peer_records_per_s          Benthos 4.27 (bench/benthos.yaml) records/s on the same pages
    peer_cpu_s_per_million      its CPU seconds per million records
    records_per_s               exactly_once records/s into Kafka
    cpu_s_per_million           service CPU seconds per million records (exactly_once)
    scale_p99_lateness_s        10,000 batches, 30-60 s window: poll lateness p99 (< 2)
    scale_rss_mb                peak RSS of that replica (< 300)
    loop_lag_p99_ms             its event-loop lag p99 (< 50)
    latency_p99_over_window_s   visible at the API -> readable in Kafka, p99 - window (<= 1)
    big_batch_resume_s          1,000,000 records, SIGKILL halfway: new process start ->
                                its first committed event (< 15)
    big_batch_peak_rss_mb       peak RSS of the service over both processes (< 300)
    big_batch_state_bytes_per_record
                                bytes written to the state topic per record (<= 32)
    big_batch_records_per_s     records / s from tracking to `completed` (records appear
                                over 60 s, and the kill is included)
    seen_peak_bytes_per_record  what a batch of 1,000,000 records remembers of what it
                                published, two 8-byte fingerprints a record
                                (bench/seen_memory.py): the heap's peak while it grows,
                                bytes per record (<= 64: never a Python int, some 40
                                bytes, per fingerprint at once)...
    seen_restore_peak_bytes_per_record
                                ...and while it is rebuilt from the state topic (<= 64)
    sweep_requests_per_record   100,000 records finishing out of order: sweep pages / records
                                the sweeps found (sweep_pages, sweep_records, sweeps beside)
    json_bytes_per_event        a balance event's value with kafka.value_format json...
    json_sr_bytes_per_event     ...and with json_sr (the Confluent wire format)
    json_sr_throughput_ratio    json_sr records/s over json's, same run (a schema registry,
                                Apicurio, started by scripts/registry.sh)

and more figures besides (at_least_once, the ceiling's own, request rates, ...). Every
service run is checked for exactly-once delivery and raises if it was not.
``--smoke`` runs all four at toy sizes in about a minute (tests/test_bench_smoke.py);
its figures mean nothing beyond "the benchmark works".

    uv run python bench/run_all.py --bootstrap 127.0.0.1:29092 [--smoke] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import big_batch
import latency
import scale
import seen_memory
import throughput
import value_format

SMOKE: dict[str, dict[str, Any]] = {
    "throughput": {"batches": 10, "records": 1000, "rounds": 1, "timeout": 60},
    "scale": {"batches": 300, "ramp": 2.0, "duration": 8.0, "window_min": 2.0, "window_max": 4.0},
    "latency": {
        "batches": 4,
        "records": 30,
        "spread": 5.0,
        "warmup": 1.0,
        "window_min": 0.5,
        "window_max": 1.0,
        "timeout": 30.0,
    },
    "value_format": {"batches": 4, "records": 500, "rounds": 1, "timeout": 60},
    "big_batch": {
        "records": 20_000,
        "spread": 5.0,
        "ooo_records": 5_000,
        "ooo_spread": 5.0,
        "timeout": 90.0,
    },
}

# name, JSON key, test, as printed
TARGETS: list[tuple[str, Callable[[float], bool], str]] = [
    ("throughput_ratio", lambda v: v >= 0.8, ">= 0.8"),
    ("throughput_ratio_batched", lambda v: v >= 0.8, ">= 0.8"),
    ("vs_peer_throughput", lambda v: v >= 1.5, ">= 1.5"),
    ("vs_peer_cpu", lambda v: v <= 0.5, "<= 0.5"),
    ("scale_p99_lateness_s", lambda v: v < 2, "< 2 s"),
    ("scale_rss_mb", lambda v: v < 300, "< 300 MiB"),
    ("loop_lag_p99_ms", lambda v: v < 50, "< 50 ms"),
    ("latency_p99_over_window_s", lambda v: v <= 1, "<= 1 s"),
    ("big_batch_state_bytes_per_record", lambda v: v <= 32, "<= 32 B"),
    ("big_batch_peak_rss_mb", lambda v: v < 300, "< 300 MiB"),
    ("big_batch_resume_s", lambda v: v < 15, "< 15 s"),
    ("seen_peak_bytes_per_record", lambda v: v <= 64, "<= 64 B"),
    ("seen_restore_peak_bytes_per_record", lambda v: v <= 64, "<= 64 B"),
]


def sub_args(
    add_arguments: Callable[[argparse.ArgumentParser], None], bootstrap: str, **overrides: Any
) -> argparse.Namespace:
    """A benchmark's defaults, with ``overrides``."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    vars(args).update(overrides, bootstrap=bootstrap)
    return args


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    sizes: dict[str, dict[str, Any]] = SMOKE if args.smoke else {}
    for name in ("throughput", "scale", "latency", "big_batch", "value_format"):
        (workdir / name).mkdir(parents=True, exist_ok=True)
    t = await throughput.measure(
        sub_args(throughput.add_arguments, args.bootstrap, **sizes.get("throughput", {})),
        workdir / "throughput",
    )
    print(throughput.summary_line(t), flush=True)
    s = await scale.measure(
        sub_args(scale.add_arguments, args.bootstrap, **sizes.get("scale", {})), workdir / "scale"
    )
    print(scale.summary_line(s), flush=True)
    lat = await latency.measure(
        sub_args(latency.add_arguments, args.bootstrap, **sizes.get("latency", {})),
        workdir / "latency",
    )
    print(latency.summary_line(lat), flush=True)
    bb = await big_batch.measure(
        sub_args(big_batch.add_arguments, args.bootstrap, **sizes.get("big_batch", {})),
        workdir / "big_batch",
    )
    print(big_batch.summary_line(bb), flush=True)
    vf = await value_format.measure(
        sub_args(value_format.add_arguments, args.bootstrap, **sizes.get("value_format", {})),
        workdir / "value_format",
    )
    print(value_format.summary_line(vf), flush=True)
    sm = seen_memory.measure(20_000 if args.smoke else 1_000_000)
    print(seen_memory.summary_line(sm), flush=True)
    big, ooo = bb["big"], bb["ooo"]
    return {
        "throughput_ratio": t["throughput_ratio"],
        "throughput_ratio_batched": t["throughput_ratio_batched"],
        "vs_peer_throughput": t["vs_peer_throughput"],
        "vs_peer_cpu": t["vs_peer_cpu"],
        "peer_records_per_s": t["peer_records_per_s"],
        "peer_cpu_s_per_million": t["peer_cpu_s_per_million"],
        "records_per_s": t["records_per_s"],
        "cpu_s_per_million": t["cpu_s_per_million"],
        "scale_p99_lateness_s": s["p99_lateness_s"],
        "scale_rss_mb": s["rss_mb"],
        "loop_lag_p99_ms": s["loop_lag_p99_ms"],
        "latency_p99_over_window_s": lat["p99_over_window_s"],
        "alo_throughput_ratio": t["alo_throughput_ratio"],
        "alo_records_per_s": t["alo_records_per_s"],
        "alo_cpu_s_per_million": t["alo_cpu_s_per_million"],
        "ceiling_records_per_s": t["ceiling_records_per_s"],
        "ceiling_cpu_s_per_million": t["ceiling_cpu_s_per_million"],
        "ceiling_batched_records_per_s": t["ceiling_batched_records_per_s"],
        "ceiling_batched_cpu_s_per_million": t["ceiling_batched_cpu_s_per_million"],
        "alo_throughput_ratio_batched": t["alo_throughput_ratio_batched"],
        "alo_vs_peer_throughput": t["alo_vs_peer_throughput"],
        "alo_vs_peer_cpu": t["alo_vs_peer_cpu"],
        "throughput_records": t["records"],
        "scale_batches": s["tracked"],
        "scale_duration_s": s["duration_s"],
        "scale_p50_lateness_s": s["p50_lateness_s"],
        "scale_max_lateness_s": s["max_lateness_s"],
        "scale_rps_mean": s["rps_mean"],
        "scale_rps_max_1s": s["rps_max_1s"],
        "scale_requests_max_100ms": s["requests_max_100ms"],
        "scale_rps_ceiling": s["rps_ceiling"],
        "loop_lag_max_ms": s["loop_lag_max_ms"],
        "latency_p50_s": lat["p50_s"],
        "latency_p99_s": lat["p99_s"],
        "latency_window_s": lat["window_s"],
        "big_batch_resume_s": big["resume_s"],
        "big_batch_peak_rss_mb": big["peak_rss_mb"],
        "big_batch_state_bytes_per_record": big["state_bytes_per_record"],
        "big_batch_records_per_s": big["records_per_s"],
        "big_batch_records": big["records"],
        "big_batch_killed_at_published": big["killed_at_published"],
        "big_batch_state_bytes": big["state_bytes"],
        "sweep_requests_per_record": ooo["sweep_requests_per_record"],
        "sweep_pages": ooo["sweep_pages"],
        "sweep_records": ooo["sweep_records"],
        "sweeps": ooo["sweeps"],
        "ooo_records": ooo["records"],
        "ooo_records_per_s": ooo["records_per_s"],
        "json_records_per_s": vf["json_records_per_s"],
        "json_bytes_per_event": vf["json_bytes_per_event"],
        "json_sr_records_per_s": vf["json_sr_records_per_s"],
        "json_sr_bytes_per_event": vf["json_sr_bytes_per_event"],
        "json_sr_cpu_s_per_million": vf["json_sr_cpu_s_per_million"],
        "json_sr_throughput_ratio": vf["json_sr_throughput_ratio"],
        "seen_records": sm["records"],
        "seen_publish_us_per_record": sm["publish_us_per_record"],
        "seen_held_bytes_per_record": sm["publish_end_bytes_per_record"],
        "seen_peak_bytes_per_record": sm["publish_peak_bytes_per_record"],
        "seen_restore_us_per_record": sm["restore_us_per_record"],
        "seen_restore_peak_bytes_per_record": sm["restore_peak_bytes_per_record"],
        "smoke": bool(args.smoke),
    }


def targets_line(result: dict[str, Any]) -> str:
    parts = []
    for key, test, wanted in TARGETS:
        value = result.get(key)
        ok = value is not None and not math.isnan(value) and test(value)
        parts.append(f"{key} {value} ({wanted}: {'met' if ok else 'MISSED'})")
    ceiling = result["scale_rps_ceiling"]
    ok = result["scale_rps_max_1s"] <= ceiling + 1
    parts.append(f"scale_rps_max_1s {result['scale_rps_max_1s']} (<= {ceiling:g}: ")
    parts[-1] += "met)" if ok else "MISSED)"
    return "targets: " + "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers")
    parser.add_argument("--smoke", action="store_true", help="toy sizes: checks that it runs")
    parser.add_argument("--workdir", type=Path, help="keep the logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        result = asyncio.run(run(args, workdir))
    print(targets_line(result), flush=True)
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
