"""Peak memory and throughput of ``rightfoot-poller export``: a small batch against a big one.

The simulator runs in its own process (``python -m service simulate``); the batches are
created through its control API (``POST /_sim/batches``); each export runs as
``python -m service export … -o FILE`` in another process, whose peak RSS (VmHWM) is
read from ``/proc`` until it exits. Streaming means the peak barely moves while the file grows
a few hundred times.

    uv run python bench/export_memory.py [--small 1000] [--large 250000] [--keep DIR]

Prints one line per export, then one line of JSON. ``tests/test_export.py`` uses the same
harness for its memory test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness import clean_env, free_port

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "bench-export-key"
MIB = 1024 * 1024
_SUMMARY_RE = re.compile(r"exported (\d+) rows \((\d+) bytes\) to .* in ([0-9.]+) s")


@dataclass
class SimulatorProcess:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def control(self, path: str, body: object | None = None) -> object:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base_url + path,
            data=data,
            method="GET" if body is None else "POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    def create_batch(self, count: int, *, with_metadata: bool = False) -> str:
        batch_id = str(uuid.uuid4())
        self.control(
            "/_sim/batches",
            # all visible at once: both orders list the same records, this one cheapest
            {
                "batch_id": batch_id,
                "count": count,
                "with_metadata": with_metadata,
                "order": "completion",
            },
        )
        return batch_id

    def requests(self) -> list[dict[str, object]]:
        body = self.control("/_sim/requests")
        assert isinstance(body, dict)
        entries: list[dict[str, object]] = body["requests"]
        return entries


@contextlib.contextmanager
def simulator(api_key: str = API_KEY, *, log: Path | None = None) -> Iterator[SimulatorProcess]:
    """``python -m service simulate`` on a free loopback port, stopped with SIGTERM."""
    port = free_port()
    command = [sys.executable, "-m", "service", "simulate", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--no-demo", "--api-key", api_key, "--log-level", "WARNING"]
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(log.open("wb")) if log is not None else subprocess.DEVNULL
        process = subprocess.Popen(
            command, cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL, stderr=sink
        )
        sim = SimulatorProcess(port, process)
        try:
            _wait_until_serving(sim)
            yield sim
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_serving(sim: SimulatorProcess, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sim.process.poll() is not None:
            raise RuntimeError(f"the simulator exited with {sim.process.returncode}")
        try:
            sim.control("/_sim/faults")
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.05)
    raise RuntimeError(f"the simulator did not answer on port {sim.port}")


@dataclass
class ExportRun:
    exit_code: int
    rows: int
    bytes: int
    #: As measured by the export itself (from its summary line).
    seconds: float
    #: Including interpreter start-up.
    wall_seconds: float
    peak_rss_bytes: int
    stderr: str

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def peak_rss_mib(self) -> float:
        return self.peak_rss_bytes / MIB


def run_export(
    base_url: str,
    batch_ids: Sequence[str],
    output: str,
    *,
    api_key: str = API_KEY,
    extra_args: Sequence[str] = (),
    timeout_s: float = 300.0,
    stdout: Path | None = None,
) -> ExportRun:
    """``python -m service export`` in a child process, and its own peak RSS."""
    command = [sys.executable, "-m", "service", "export", *batch_ids, "-o", output, *extra_args]
    env = clean_env(
        RFP_RIGHTFOOT__BASE_URL=base_url,
        RIGHTFOOT_API_KEY=api_key,
        RFP_RIGHTFOOT__BACKOFF_BASE_S="0.01",
        RFP_RIGHTFOOT__BACKOFF_MAX_S="0.1",
    )
    with tempfile.TemporaryFile() as err, contextlib.ExitStack() as stack:
        out = stack.enter_context(stdout.open("wb")) if stdout is not None else subprocess.DEVNULL
        started = time.monotonic()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err)
        timer = threading.Timer(timeout_s, process.kill)
        timer.start()
        try:
            status, peak = _wait_peak_rss(process.pid)
        finally:
            timer.cancel()
        wall = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read().decode("utf-8", "replace")
    match = _SUMMARY_RE.search(text)
    rows, size, seconds = (int(match[1]), int(match[2]), float(match[3])) if match else (0, 0, 0.0)
    return ExportRun(process.returncode, rows, size, seconds, wall, peak, text)


def _vm_hwm(pid: int) -> int:
    """The process's own peak RSS in bytes (VmHWM), 0 if it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _wait_peak_rss(pid: int) -> tuple[int, int]:
    """Wait for the child; its wait status and peak RSS in bytes.

    Read from /proc (VmHWM, which starts afresh at exec) until it exits: wait4()'s
    ru_maxrss would also count the parent's memory, which the child carries from the
    fork until its exec. Elsewhere than Linux, ru_maxrss it is.
    """
    peak = 0
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            if not sys.platform.startswith("linux"):
                # ru_maxrss is in KiB on Linux, in bytes on macOS
                peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
            return status, peak
        peak = max(peak, _vm_hwm(pid))
        time.sleep(0.02)


def measure(small: int, large: int, directory: Path) -> dict[str, object]:
    results: list[tuple[int, ExportRun]] = []
    with simulator() as sim:
        batches = [(count, sim.create_batch(count)) for count in (small, large)]
        for count, batch_id in batches:
            target = directory / f"export-{count}.csv"
            run = run_export(
                sim.base_url, [batch_id], str(target), extra_args=["--progress", "never"]
            )
            if run.exit_code != 0:
                raise RuntimeError(f"export of {count} rows failed: {run.stderr.strip()}")
            results.append((count, run))
            print(
                f"{run.rows:>9,} rows  {run.bytes / MIB:8.1f} MiB  {run.seconds:6.2f} s  "
                f"{run.rows_per_s:>9,.0f} rows/s  peak RSS {run.peak_rss_mib:6.1f} MiB  "
                f"(wall {run.wall_seconds:.2f} s with start-up)"
            )
    (_, low), (_, high) = results
    return {
        "exports": [
            {
                "rows": run.rows,
                "bytes": run.bytes,
                "seconds": run.seconds,
                "rows_per_s": round(run.rows_per_s),
                "peak_rss_mib": round(run.peak_rss_mib, 1),
            }
            for _, run in results
        ],
        "rss_growth_mib": round(high.peak_rss_mib - low.peak_rss_mib, 1),
        "size_ratio": round(high.bytes / low.bytes, 1) if low.bytes else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--small", type=int, default=1_000, help="rows of the small batch")
    parser.add_argument("--large", type=int, default=250_000, help="rows of the large batch")
    parser.add_argument("--keep", type=Path, help="write the CSV files here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        summary = measure(args.small, args.large, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
            summary = measure(args.small, args.large, Path(tmp))
    print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
