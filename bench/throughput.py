"""Throughput: the service against the stack's ceilings and a peer, on the same pages, in one run.

The simulator (its own process, no added latency) serves ``--batches`` batches of
``--records`` records each, all visible at once (1,000,000 records by default). Then,
one after the other, against the same broker:

1. ``bench/ceiling.py`` fetches every page and produces every record with one
   ``send()`` per message (see its docstring);
2. ``bench/ceiling.py --batched``: the same through aiokafka's batch API, the raw record
   bytes forwarded: the fastest path of this stack;
3. the peer, Benthos 4.27 (``bench/peer.py``, ``bench/benthos.yaml``): the same job in a
   general pipeline tool, its output checked (distinct event IDs against the records
   served, every 100th event against the service's own for that record);
4. the service (``python -m service run``, its own process, fresh topics) with a
   zero-length polling window, no practical request-rate ceiling and
   ``kafka.delivery=exactly_once``: every batch is tracked at once through the requests
   topic with its ``expected_count``; the clock runs from the first tracking request to
   the moment the last ``completed`` lifecycle event is readable with read_committed
   (that event commits in the same transaction as the batch's last records); afterwards
   (off the clock) a read_committed consumer counts the balance events in the topic;
5. the same with ``kafka.delivery=at_least_once``.

That is one round; ``--rounds`` (default 3) are run, every other one in reverse order,
and the figures are the medians over rounds: this machine is shared and noisy, and
a ratio is taken within a round, between runs minutes apart. For each service run:
records/s, CPU seconds per million records (user + system of the service process,
from /proc), throughput_ratio = service records/s / the per-message ceiling's,
throughput_ratio_batched the same over the batched ceiling's, vs_peer_throughput =
service records/s / Benthos's, and vs_peer_cpu = service CPU per record / Benthos's.
The records the lifecycle events report, and the balance events a read_committed consumer reads,
are checked against the records served, and the ceiling topic's message count too.
``--py-spy DIR`` also records a py-spy profile of each service run there
(``uv run --with py-spy ...``); ``--runs ceiling_batched,exactly_once`` (say) does only
those runs, each round, and reports their medians without ratios;
``--service-env RFP_POLLING__MAX_RECORDS_IN_FLIGHT=10000`` (say) changes a setting of the
service's runs.

    uv run python bench/throughput.py --bootstrap 127.0.0.1:29092 [--batches 200 --records 5000]

Prints a line per run, a summary line, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import peer
from harness import (
    API_KEY,
    ROOT,
    SimulatorProcess,
    Topics,
    count_committed,
    create_topic,
    end_offsets_total,
    log,
    send_tracking_requests,
    service,
    service_env,
    simulator,
    wait_lifecycle,
)

from service.runtime import GC_THRESHOLDS


async def run_ceiling(
    sim: SimulatorProcess, bootstrap: str, batch_ids: list[str], *, batched: bool = False
) -> dict[str, Any]:
    topic = f"{Topics().prefix}.ceiling"
    await create_topic(bootstrap, topic)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "bench" / "ceiling.py"),
        *(["--batched"] if batched else []),
        "--api-url",
        sim.base_url,
        "--api-key",
        API_KEY,
        "--bootstrap",
        bootstrap,
        "--topic",
        topic,
        "--gc-threshold",
        ",".join(str(n) for n in GC_THRESHOLDS),
        *batch_ids,
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the ceiling script exited with {proc.returncode}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    produced = await end_offsets_total(bootstrap, topic)
    if produced != result["records"]:
        raise RuntimeError(f"ceiling: {produced} messages in {topic}, {result['records']} sent")
    result["cpu_s_per_million"] = round(result["cpu_s"] / result["records"] * 1e6, 3)
    return result


async def run_service(
    sim: SimulatorProcess,
    bootstrap: str,
    batch_ids: list[str],
    records: int,
    delivery: str,
    *,
    workdir: Path,
    py_spy: Path | None,
    timeout_s: float,
    service_command: list[str] | None = None,
    name: str | None = None,
    **env_overrides: str,
) -> dict[str, Any]:
    """One service run; ``name`` labels its log (default: the delivery), ``env_overrides``
    add to its configuration."""
    topics = Topics()
    env = service_env(
        topics,
        bootstrap,
        sim.base_url,
        RFP_KAFKA__DELIVERY=delivery,
        RFP_POLLING__INTERVAL_MIN_S="0",
        RFP_POLLING__INTERVAL_MAX_S="0",
        RFP_POLLING__COMPLETE_AFTER_IDLE_S="3600",
        RFP_RIGHTFOOT__MAX_REQUESTS_PER_S="1000000",
        **env_overrides,
    )
    command = ("-m", "service", "run") if not service_command else tuple(service_command)
    log_path = workdir / f"service-{name or delivery}.log"
    async with service(env, command=command, log_path=log_path) as svc:
        profiler = _start_py_spy(py_spy, svc.pid, delivery)
        watcher = asyncio.create_task(
            wait_lifecycle(bootstrap, topics.events, set(batch_ids), "completed", timeout_s)
        )
        cpu_before, started = svc.cpu_seconds(), time.monotonic()
        await send_tracking_requests(
            bootstrap, topics.requests, [(batch_id, records) for batch_id in batch_ids]
        )
        finished, completed = await watcher
        cpu = svc.cpu_seconds() - cpu_before
        memory = svc.memory_mb()
        _stop_py_spy(profiler)
    seconds = finished - started
    published = sum(int(event["records_published"]) for event in completed)
    expected = records * len(batch_ids)
    if published != expected:
        raise RuntimeError(f"{delivery}: {published} records published, {expected} served")
    in_topic, value_bytes = await count_committed(bootstrap, topics.balances)
    if in_topic != expected:
        raise RuntimeError(f"{delivery}: {in_topic} balance events readable, {expected} served")
    return {
        "delivery": delivery,
        "records": published,
        "seconds": round(seconds, 3),
        "records_per_s": round(published / seconds, 1),
        "cpu_s": round(cpu, 3),
        "cpu_s_per_million": round(cpu / published * 1e6, 3),
        "rss_peak_mb": round(memory.get("VmHWM", 0.0), 1),
        "bytes_per_event": round(value_bytes / in_topic, 1),
    }


def _start_py_spy(directory: Path | None, pid: int, name: str) -> subprocess.Popen[bytes] | None:
    if directory is None:
        return None
    exe = shutil.which("py-spy")
    if exe is None:
        log("py-spy is not installed (uv run --with py-spy ...): no profile")
        return None
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"throughput-{name}.speedscope.json"
    command = [exe, "record", "-p", str(pid), "-f", "speedscope", "-o", str(target), "-r", "50"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop_py_spy(profiler: subprocess.Popen[bytes] | None) -> None:
    if profiler is not None:
        profiler.send_signal(2)  # SIGINT: py-spy writes the profile and exits
        profiler.wait(timeout=60)


RUNS = ["ceiling", "ceiling_batched", "peer", "exactly_once", "at_least_once"]


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """``--rounds`` rounds of the two ceilings, the peer and both deliveries (every other one
    in reverse order)."""
    rounds: list[dict[str, dict[str, Any]]] = []
    benthos = peer.benthos_binary()
    async with simulator(workdir / "simulator.log") as sim:
        log(f"creating {args.batches} batches of {args.records} records")
        batch_ids = await sim.create_batches(args.batches, args.records)
        selected = set(args.runs.split(","))
        if selected - set(RUNS):
            raise SystemExit(f"unknown runs: {sorted(selected - set(RUNS))}; known: {RUNS}")
        for number in range(args.rounds):
            order = [name for name in RUNS if name in selected]
            runs: dict[str, dict[str, Any]] = {}
            for name in order if number % 2 == 0 else order[::-1]:
                log(f"round {number + 1}: {name}")
                if name in ("ceiling", "ceiling_batched"):
                    runs[name] = await run_ceiling(
                        sim, args.bootstrap, batch_ids, batched=name == "ceiling_batched"
                    )
                elif name == "peer":
                    runs[name] = await peer.run_peer(
                        benthos,
                        api_url=sim.base_url,
                        api_key=API_KEY,
                        bootstrap=args.bootstrap,
                        batch_ids=batch_ids,
                        records=args.records * len(batch_ids),
                        workdir=workdir,
                        timeout_s=args.timeout,
                    )
                else:
                    runs[name] = await run_service(
                        sim,
                        args.bootstrap,
                        batch_ids,
                        args.records,
                        name,
                        workdir=workdir,
                        py_spy=args.py_spy,
                        timeout_s=args.timeout,
                        service_command=args.service_command,
                        **service_settings(args.service_env),
                    )
            if len(order) < len(RUNS):
                for name in order:
                    print(f"round {number + 1}  {name:<15} {_line(runs[name])}", flush=True)
                rounds.append(runs)
                continue
            for name in ("exactly_once", "at_least_once"):
                run = runs[name]
                rps, cpu = run["records_per_s"], run["cpu_s_per_million"]
                run["throughput_ratio"] = round(rps / runs["ceiling"]["records_per_s"], 3)
                batched = runs["ceiling_batched"]["records_per_s"]
                run["throughput_ratio_batched"] = round(rps / batched, 3)
                run["vs_peer_throughput"] = round(rps / runs["peer"]["records_per_s"], 3)
                run["vs_peer_cpu"] = round(cpu / runs["peer"]["cpu_s_per_million"], 3)
            for name in order:
                print(f"round {number + 1}  {name:<15} {_line(runs[name])}", flush=True)
            rounds.append(runs)

    def median_of(name: str, key: str) -> float:
        return float(round(statistics.median(r[name][key] for r in rounds), 3))

    if len(selected) < len(RUNS):  # a part only: each run's median, no ratios
        return {
            "partial": True,
            **{
                f"{name}_{key}": median_of(name, key)
                for name in RUNS
                if name in selected
                for key in ("records_per_s", "cpu_s_per_million")
            },
            "runs": rounds,
        }

    return {
        "records": rounds[0]["exactly_once"]["records"],
        "batches": args.batches,
        "rounds": args.rounds,
        "ceiling_records_per_s": median_of("ceiling", "records_per_s"),
        "ceiling_cpu_s_per_million": median_of("ceiling", "cpu_s_per_million"),
        "ceiling_batched_records_per_s": median_of("ceiling_batched", "records_per_s"),
        "ceiling_batched_cpu_s_per_million": median_of("ceiling_batched", "cpu_s_per_million"),
        "peer_records_per_s": median_of("peer", "records_per_s"),
        "peer_cpu_s_per_million": median_of("peer", "cpu_s_per_million"),
        "records_per_s": median_of("exactly_once", "records_per_s"),
        "cpu_s_per_million": median_of("exactly_once", "cpu_s_per_million"),
        "throughput_ratio": median_of("exactly_once", "throughput_ratio"),
        "throughput_ratio_batched": median_of("exactly_once", "throughput_ratio_batched"),
        "vs_peer_throughput": median_of("exactly_once", "vs_peer_throughput"),
        "vs_peer_cpu": median_of("exactly_once", "vs_peer_cpu"),
        "alo_records_per_s": median_of("at_least_once", "records_per_s"),
        "alo_cpu_s_per_million": median_of("at_least_once", "cpu_s_per_million"),
        "alo_throughput_ratio": median_of("at_least_once", "throughput_ratio"),
        "alo_throughput_ratio_batched": median_of("at_least_once", "throughput_ratio_batched"),
        "alo_vs_peer_throughput": median_of("at_least_once", "vs_peer_throughput"),
        "alo_vs_peer_cpu": median_of("at_least_once", "vs_peer_cpu"),
        "service_rss_peak_mb": max(r["exactly_once"]["rss_peak_mb"] for r in rounds),
        "runs": rounds,
    }


def service_settings(pairs: Sequence[str]) -> dict[str, str]:
    """``--service-env`` pairs as a dict; each must be ``RFP_...=value``."""
    settings: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.startswith("RFP_"):
            raise SystemExit(f"--service-env takes RFP_KEY=VALUE, not {pair!r}")
        settings[key] = value
    return settings


def summary_line(result: dict[str, Any]) -> str:
    return (
        f"throughput: {result['records']:,} records, median of {result['rounds']} rounds: "
        f"ceiling {result['ceiling_records_per_s']:,.0f}/s "
        f"({result['ceiling_cpu_s_per_million']} CPU s/M); "
        f"batched ceiling {result['ceiling_batched_records_per_s']:,.0f}/s "
        f"({result['ceiling_batched_cpu_s_per_million']} CPU s/M); "
        f"peer (Benthos) {result['peer_records_per_s']:,.0f}/s "
        f"({result['peer_cpu_s_per_million']} CPU s/M); "
        f"exactly_once {result['records_per_s']:,.0f}/s ({result['cpu_s_per_million']} CPU s/M, "
        f"ratio {result['throughput_ratio']}, batched {result['throughput_ratio_batched']}, "
        f"vs peer {result['vs_peer_throughput']}x throughput, {result['vs_peer_cpu']}x CPU); "
        f"at_least_once {result['alo_records_per_s']:,.0f}/s "
        f"({result['alo_cpu_s_per_million']} CPU s/M, ratio {result['alo_throughput_ratio']}, "
        f"batched {result['alo_throughput_ratio_batched']})"
    )


def _line(run: dict[str, Any]) -> str:
    text = f"{run['records']:>9,} records in {run['seconds']:7.2f} s  "
    text += f"{run['records_per_s']:>9,.0f} records/s  CPU {run['cpu_s']:6.2f} s"
    text += f"  ({run['cpu_s_per_million']:.2f} CPU s/M"
    if "throughput_ratio" in run:
        text += f", ratio {run['throughput_ratio']:.3f}, batched "
        text += f"{run['throughput_ratio_batched']:.3f}, vs peer {run['vs_peer_throughput']:.3f}x"
        text += f" throughput, {run['vs_peer_cpu']:.3f}x CPU"
    return text + ")"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--records", type=int, default=5_000, help="records per batch")
    parser.add_argument("--rounds", type=int, default=3, help="median over this many rounds")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per service run")
    parser.add_argument("--py-spy", type=Path, help="record py-spy profiles of the service here")
    parser.add_argument(
        "--service-command",
        nargs="+",
        help="python arguments that run the service (default: -m service run)",
    )
    parser.add_argument("--workdir", type=Path, help="keep the logs here (default: a temp dir)")
    parser.add_argument(
        "--runs",
        default=",".join(RUNS),
        help=f"only these of {','.join(RUNS)} (the ratios and the summary need all of them)",
    )
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="RFP_KEY=VALUE",
        help="add this setting to the service's environment (repeatable)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers")
    add_arguments(parser)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        summary = asyncio.run(measure(args, workdir))
    if not summary.get("partial"):
        print(summary_line(summary), flush=True)
    print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
