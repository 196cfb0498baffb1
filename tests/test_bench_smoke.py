"""``make bench`` at toy sizes: the four benchmarks run and report every figure.

``bench/run_all.py --smoke`` against the test broker: throughput (both ceilings,
the Benthos peer, exactly_once, at_least_once), scale, latency and big batches
(killed halfway, out of order), each with its own simulator and service processes.
Only that the scripts work is checked, never a timing target: those are for
``make bench`` on its full sizes.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.kafka

POSITIVE = (
    "throughput_ratio",
    "throughput_ratio_batched",
    "vs_peer_throughput",
    "vs_peer_cpu",
    "peer_records_per_s",
    "peer_cpu_s_per_million",
    "ceiling_batched_records_per_s",
    "records_per_s",
    "cpu_s_per_million",
    "alo_throughput_ratio",
    "ceiling_records_per_s",
    "scale_rss_mb",
    "scale_rps_mean",
    "latency_p50_s",
    "latency_p99_s",
    "big_batch_resume_s",
    "big_batch_peak_rss_mb",
    "big_batch_state_bytes_per_record",
    "big_batch_records_per_s",
    "json_bytes_per_event",
    "json_sr_bytes_per_event",
    "json_sr_throughput_ratio",
    "seen_publish_us_per_record",
    "seen_held_bytes_per_record",
    "seen_peak_bytes_per_record",
    "seen_restore_us_per_record",
    "seen_restore_peak_bytes_per_record",
)
NOT_NEGATIVE = (
    "scale_p99_lateness_s",
    "scale_max_lateness_s",
    "loop_lag_p99_ms",
    "sweep_pages",
    "sweep_records",
    "sweeps",
)


def test_bench_smoke(kafka: str) -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_all.py"), "--bootstrap", kafka, "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,  # the first run also builds Benthos (scripts/benthos.sh, ~1-3 min)
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert lines[-2].startswith("targets: ")
    for key in (*POSITIVE, *NOT_NEGATIVE, "latency_p99_over_window_s"):
        value = result[key]
        assert isinstance(value, int | float) and math.isfinite(value), (key, value)
    for key in POSITIVE:
        assert result[key] > 0, (key, result[key])
    for key in NOT_NEGATIVE:
        assert result[key] >= 0, (key, result[key])
    assert result["scale_batches"] == 300
    assert result["scale_rps_max_1s"] <= result["scale_rps_ceiling"] + 1
    assert result["throughput_records"] == 10_000
    # big_batch.py raises unless each batch was published exactly once.
    assert result["big_batch_records"] == 20_000
    assert 0 < result["big_batch_killed_at_published"] < 20_000
    assert result["ooo_records"] == 5_000
    assert result["seen_records"] == 20_000
    assert result["smoke"] is True


@pytest.mark.parametrize(
    ("script", "args", "keys"),
    [
        (
            "finished_batches.py",
            ["--batches", "300", "--records", "100"],
            ("restore_bytes_per_batch", "view_bytes_per_batch", "forget_commits"),
        ),
        (
            "stopped_batches.py",
            ["--batches", "3", "--records", "3000"],
            ("restore_s", "tracking_heap_kept_mib", "load_fingerprints"),
        ),
    ],
)
def test_state_benchmarks_at_toy_sizes(
    kafka: str, script: str, args: list[str], keys: tuple[str, ...]
) -> None:
    """The two benchmarks of what a replica keeps of finished and stopped batches (not
    part of ``make bench``) run and report their figures; each checks its own results."""
    run = subprocess.run(
        [sys.executable, script, "--bootstrap", kafka, *args],
        cwd=ROOT / "bench",
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert all(result[key] > 0 for key in keys), result
    if script == "finished_batches.py":
        assert result["tombstones"] == 300 and result["restore_after_heap_kept_mib"] < 0.05
