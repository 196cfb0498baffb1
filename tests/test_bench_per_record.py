"""``bench/per_record.py`` at toy size (no broker): the per-record breakdown runs and reports."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from conftest import ROOT


def test_per_record_bench_reports_every_stage() -> None:
    """``bench/per_record.py`` at toy size: every stage timed, every record through the path."""
    args = ["--pages", "2", "--repeat", "1", "--ceiling-us", "5"]
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "per_record.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["records"] == 200
    stages = ("parse", "dedup", "event", "partition", "append")
    for key in ("ceiling_us", "floor_us", *(f"service_{s}_us" for s in stages)):
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    assert 0 < result["floor_ratio_bound"] < 1
