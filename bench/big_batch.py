"""Big batches: one of 1,000,000 records killed halfway, and one whose records finish out of order.

Both against the broker at ``--bootstrap``, with the simulator in its own process and
the service (``python -m service run``, its own process, one replica,
``exactly_once``, a 1-2 s polling window, at most 2,000 requests/s) on fresh topics.
Each batch is created (``lazy``: the simulator derives its records on demand) once
the service is ready, and tracked at once through the requests topic with its
``expected_count``.

A. **Killed halfway.** A batch of ``--records`` records (1,000,000) listed in
   completion order (``order: "completion"``: new records only ever append), appearing
   at random moments over ``--spread`` seconds (60). This process reads the service's
   /metrics; once ``records_published_total`` (summed) reaches half the batch, the
   service gets SIGKILL and a new process is started at once. Figures:

   * ``resume_s``: from starting the new process to its first committed event (its
     ``records_published_total`` above 0, /metrics read every 50 ms). It covers the
     interpreter's start, joining the consumer group (whose dead member must time out
     first), restoring the batch from the state topic, a poll and its commit.
     ``resume_ready_s``: the same process's first 200 on /readyz (group joined,
     partitions restored, the state view loaded), read every 50 ms as well; it may
     come after the first commit.
   * ``peak_rss_mb``: the highest VmRSS or VmHWM of either process, read from
     /proc every 0.5 s while it runs and right before the kill (a killed process's
     VmHWM is gone with it).
   * ``state_bytes_per_record``: the bytes of every message on the state topic (key
     plus value), read from its beginning with a ``read_uncommitted`` consumer so
     that the writes of aborted transactions count too, over ``--records``. The
     topic is compacted, but the cleaner only touches rolled segments, which a single
     run does not fill. The service's own ``state_bytes_total`` (the last reading of
     each process) is reported beside it as ``state_bytes_metric``.
   * ``records_per_s``: records over the seconds from the tracking request to the
     ``completed`` lifecycle event (readable with read_committed). Records only
     appear over ``--spread`` seconds and the run includes the kill and the restart,
     so this is bounded by the batch, not by the service.

B. **Out of order.** A batch of ``--ooo-records`` records (100,000) listed in
   submission order (``order: "submission"``): each is listed once it has finished,
   at its place in the submission order, so most finish behind the poller's cursor
   and only a sweep (the batch re-read from page 1 when the API's ``total_processed``
   is ahead of the records seen) finds them. They finish over ``--ooo-spread``
   seconds (60); no kill. Once ``completed``, the service's /metrics give
   ``sweep_pages`` (``sweep_pages_total``), ``sweep_records``
   (``sweep_records_total``), ``sweeps`` (``sweeps_total``, all outcomes) and
   ``sweep_requests_per_record`` = sweep pages / sweep records: API requests spent per
   record found behind the cursor.

Both runs are checked for exactly-once: a read_committed read of the balances topic
must give exactly as many messages as the batch has records, with as many distinct
event ids (the ``ce_id`` header); anything else raises.

    uv run python bench/big_batch.py --bootstrap 127.0.0.1:29092 [--records 1000000 --spread 60]

Prints a summary line, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition
from harness import (
    ROOT,
    SimulatorProcess,
    Topics,
    clean_env,
    free_port,
    log,
    memory_mb,
    parse_metrics,
    rounded,
    send_tracking_requests,
    service_env,
    simulator,
    terminate,
    wait_lifecycle,
)

PUBLISHED = "rightfoot_poller_records_published_total"
SWEEPS = "rightfoot_poller_sweeps_total"
SWEEP_PAGES = "rightfoot_poller_sweep_pages_total"
SWEEP_RECORDS = "rightfoot_poller_sweep_records_total"
STATE_BYTES = "rightfoot_poller_state_bytes_total"
RSS_EVERY_S = 0.5


# --------------------------------------------------------------------------- a replica


@dataclass
class Replica:
    """One ``python -m service run`` process that can be SIGKILLed; its memory is sampled."""

    process: asyncio.subprocess.Process
    port: int
    http: aiohttp.ClientSession
    started: float  # monotonic, just before the process was created
    peak_rss_mb: float = 0.0
    last_metrics: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    def sample_memory(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            memory = memory_mb(self.process.pid)
            self.peak_rss_mb = max(self.peak_rss_mb, *memory.values(), 0.0)

    async def _sample_forever(self) -> None:
        while self.process.returncode is None:
            self.sample_memory()
            await asyncio.sleep(RSS_EVERY_S)

    async def metrics_text(self) -> str | None:
        """/metrics as text; None while the process does not answer."""
        try:
            url = f"http://127.0.0.1:{self.port}/metrics"
            async with self.http.get(url) as resp:
                return await resp.text() if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def published(self) -> float:
        """Its ``records_published_total``, summed over labels (0 while it does not answer)."""
        text = await self.metrics_text()
        if text is None:
            return 0.0
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(PUBLISHED)
        )

    async def read_metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        text = await self.metrics_text()
        if text is not None:
            self.last_metrics = parse_metrics(text)
        return self.last_metrics

    async def ready(self) -> bool:
        try:
            async with self.http.get(f"http://127.0.0.1:{self.port}/readyz") as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not await self.ready():
            if self.process.returncode is not None:
                raise RuntimeError(f"the service exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service did not get ready in {timeout_s} s")
            await asyncio.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush, no leaving the group."""
        self.sample_memory()
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)


@contextlib.asynccontextmanager
async def replica(env: dict[str, str], log_path: Path) -> AsyncIterator[Replica]:
    """Start the service with ``env`` (not waiting for it), sample its memory; SIGTERM after."""
    port = free_port()
    full_env = clean_env(**env, RFP_HTTP__PORT=str(port))
    with log_path.open("ab") as sink:
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service", "run", cwd=ROOT, env=full_env, stdout=sink, stderr=sink
        )
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            rep = Replica(process, port, http, started)
            sampler = asyncio.create_task(rep._sample_forever())
            try:
                yield rep
            finally:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
                code = await terminate(process)
                if code not in (0, -signal.SIGTERM, -signal.SIGKILL):
                    log(f"the service exited with {code}")


# --------------------------------------------------------------------------- Kafka reads


async def _read_all(
    bootstrap: str, topic: str, isolation: str, timeout_s: float
) -> AsyncIterator[Any]:
    """Every message of a topic from its beginning up to its end offsets, as they are now."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level=isolation,
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        if not tps:
            raise RuntimeError(f"{topic}: no partitions")
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)  # read_committed: the last stable offsets
        deadline = time.monotonic() + timeout_s
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: not read to its end in {timeout_s} s")
            batches = await consumer.getmany(timeout_ms=500, max_records=50_000)
            for tp, messages in batches.items():
                for msg in messages:
                    if msg.offset < ends[tp]:
                        yield msg
    finally:
        await consumer.stop()


async def check_exactly_once(bootstrap: str, topic: str, records: int, what: str) -> None:
    """A read_committed read must give ``records`` messages with ``records`` distinct event ids."""
    count, ids = 0, set()
    async for msg in _read_all(bootstrap, topic, "read_committed", timeout_s=600):
        count += 1
        event_id = next((v for k, v in msg.headers or () if k == "ce_id"), None)
        ids.add(event_id if event_id is not None else json.loads(msg.value)["event_id"])
    if count != records or len(ids) != records:
        raise RuntimeError(
            f"{what}: {count} balance events readable with {len(ids)} distinct event ids, "
            f"{records} records served"
        )
    log(f"{what}: {count:,} balance events, {len(ids):,} distinct event ids: exactly once")


async def state_topic_bytes(bootstrap: str, topic: str) -> tuple[int, int]:
    """(messages, bytes of keys and values) on the state topic, aborted writes included."""
    count = size = 0
    async for msg in _read_all(bootstrap, topic, "read_uncommitted", timeout_s=300):
        count += 1
        size += len(msg.key or b"") + len(msg.value or b"")
    return count, size


def total(metrics: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    return sum(value for _, value in metrics.get(name, []))


# --------------------------------------------------------------------------- the runs


async def _progress(
    svc: Replica, watcher: asyncio.Task[tuple[float, list[dict[str, Any]]]]
) -> tuple[float, list[dict[str, Any]]]:
    """The watcher's result; meanwhile, what the service has done, every 10 s on stderr."""
    while not watcher.done():
        await asyncio.wait([watcher], timeout=10)
        if not watcher.done():
            m = await svc.read_metrics()
            log(
                f"published {total(m, PUBLISHED):,.0f}, sweeps {total(m, SWEEPS):,.0f}, "
                f"sweep pages {total(m, SWEEP_PAGES):,.0f}, "
                f"sweep records {total(m, SWEEP_RECORDS):,.0f}, "
                f"behind {total(m, 'rightfoot_poller_records_behind'):,.0f}"
            )
    return watcher.result()


def _env(topics: Topics, args: argparse.Namespace, api_url: str) -> dict[str, str]:
    return service_env(
        topics,
        args.bootstrap,
        api_url,
        RFP_POLLING__INTERVAL_MIN_S="1",
        RFP_POLLING__INTERVAL_MAX_S="2",
        RFP_RIGHTFOOT__MAX_REQUESTS_PER_S="2000",
    )


async def _create_batch(
    sim: SimulatorProcess, count: int, spread_s: float, order: str, seed: int
) -> str:
    batch_id = str(uuid.uuid4())
    body = {
        "batch_id": batch_id,
        "count": count,
        "spread_s": spread_s,
        "seed": seed,
        "lazy": True,
        "order": order,
        "total_processed": "exact",
    }
    created = await sim.control("/_sim/batches", body)
    if created["count"] != count:
        raise RuntimeError(f"the simulator made {created['count']} records, not {count}")
    return batch_id


async def kill_and_resume(
    sim: SimulatorProcess, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """A: one big batch appearing over time, the replica SIGKILLed halfway and replaced."""
    topics = Topics()
    env = _env(topics, args, sim.base_url)
    records, log_path = args.records, workdir / "service-big.log"
    peak, state_metric = 0.0, 0.0
    async with replica(env, log_path) as first:
        await first.wait_ready(args.ready_timeout)
        batch_id = await _create_batch(sim, records, args.spread, "completion", args.seed)
        watcher = asyncio.create_task(
            wait_lifecycle(
                args.bootstrap, topics.events, {batch_id}, "completed", args.spread + args.timeout
            )
        )
        tracked = time.monotonic()
        await send_tracking_requests(args.bootstrap, topics.requests, [(batch_id, records)])
        log(f"{records:,} records appear over {args.spread:g} s; SIGKILL at half of them")
        deadline = tracked + args.spread + args.timeout
        while (done := await first.published()) < records / 2:
            if first.process.returncode is not None:
                raise RuntimeError(f"the service exited with {first.process.returncode}")
            if time.monotonic() > deadline or watcher.done():
                watcher.cancel()
                raise RuntimeError(f"only {done:,.0f} of {records:,} records published in time")
            await asyncio.sleep(0.05)
        await first.read_metrics()
        first.kill()
        killed_at = time.monotonic()
        await first.process.wait()
        peak, state_metric = (
            first.peak_rss_mb,
            total(first.last_metrics, STATE_BYTES),
        )
    if done >= records:
        raise RuntimeError(f"all {records:,} records were published before the kill")
    log(f"killed at {done:,.0f} published ({killed_at - tracked:.1f} s after tracking)")
    async with replica(env, log_path) as second:
        resume_deadline, ready_s = second.started + args.timeout, float("nan")
        while await second.published() <= 0:
            if second.process.returncode is not None:
                raise RuntimeError(f"the new service exited with {second.process.returncode}")
            if time.monotonic() > resume_deadline:
                raise RuntimeError(f"the new service committed nothing in {args.timeout} s")
            if math.isnan(ready_s) and await second.ready():
                ready_s = time.monotonic() - second.started
            await asyncio.sleep(0.05)
        resume_s = time.monotonic() - second.started
        while math.isnan(ready_s) and time.monotonic() < resume_deadline:
            if await second.ready():  # /readyz may only answer 200 after the first commit
                ready_s = time.monotonic() - second.started
            await asyncio.sleep(0.05)
        log(
            f"the new process committed its first events {resume_s:.2f} s after its start "
            f"(ready after {ready_s:.2f} s)"
        )
        finished, _ = await _progress(second, watcher)
        metrics = await second.read_metrics()
        peak = max(peak, second.peak_rss_mb)
        state_metric += total(metrics, STATE_BYTES)
    seconds = finished - tracked
    await check_exactly_once(args.bootstrap, topics.balances, records, "big batch")
    state_messages, state_bytes = await state_topic_bytes(args.bootstrap, topics.state)
    return {
        "records": records,
        "spread_s": args.spread,
        "killed_at_published": int(done),
        "resume_s": round(resume_s, 3),
        "resume_ready_s": rounded(ready_s),
        "peak_rss_mb": round(peak, 1),
        "state_messages": state_messages,
        "state_bytes": state_bytes,
        "state_bytes_per_record": round(state_bytes / records, 3),
        "state_bytes_metric": int(state_metric),
        "seconds": round(seconds, 3),
        "records_per_s": round(records / seconds, 1),
    }


async def out_of_order(
    sim: SimulatorProcess, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """B: a batch whose records finish in random order, most behind the poller's cursor."""
    topics = Topics()
    env = _env(topics, args, sim.base_url)
    records = args.ooo_records
    async with replica(env, workdir / "service-ooo.log") as svc:
        await svc.wait_ready(args.ready_timeout)
        batch_id = await _create_batch(sim, records, args.ooo_spread, "submission", args.seed + 1)
        watcher = asyncio.create_task(
            wait_lifecycle(
                args.bootstrap,
                topics.events,
                {batch_id},
                "completed",
                args.ooo_spread + args.timeout,
            )
        )
        tracked = time.monotonic()
        await send_tracking_requests(args.bootstrap, topics.requests, [(batch_id, records)])
        log(f"{records:,} records finish out of order over {args.ooo_spread:g} s")
        finished, _ = await _progress(svc, watcher)
        metrics = await svc.read_metrics()
        peak = svc.peak_rss_mb
    seconds = finished - tracked
    await check_exactly_once(args.bootstrap, topics.balances, records, "out of order")
    pages = total(metrics, SWEEP_PAGES)
    found = total(metrics, SWEEP_RECORDS)
    return {
        "records": records,
        "spread_s": args.ooo_spread,
        "seconds": round(seconds, 3),
        "records_per_s": round(records / seconds, 1),
        "sweeps": int(total(metrics, SWEEPS)),
        "sweeps_by_outcome": {
            labels.get("outcome", ""): int(value) for labels, value in metrics.get(SWEEPS, [])
        },
        "sweep_pages": int(pages),
        "sweep_records": int(found),
        "sweep_requests_per_record": rounded(pages / found if found else float("nan"), 4),
        "peak_rss_mb": round(peak, 1),
    }


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    async with simulator(workdir / "simulator.log") as sim:
        big = await kill_and_resume(sim, args, workdir)
        ooo = await out_of_order(sim, args, workdir)
    return {"big": big, "ooo": ooo}


def summary_line(result: dict[str, Any]) -> str:
    big, ooo = result["big"], result["ooo"]
    return (
        f"big batch: {big['records']:,} records over {big['spread_s']:g} s, SIGKILL at "
        f"{big['killed_at_published']:,} published: resumed in {big['resume_s']} s, "
        f"peak RSS {big['peak_rss_mb']} MiB, state {big['state_bytes_per_record']} B/record "
        f"({big['state_bytes']:,} B in {big['state_messages']:,} messages), "
        f"{big['records_per_s']:,.0f} records/s; out of order: {ooo['records']:,} records over "
        f"{ooo['spread_s']:g} s, {ooo['sweeps']} sweeps, {ooo['sweep_pages']:,} sweep pages for "
        f"{ooo['sweep_records']:,} records ({ooo['sweep_requests_per_record']} requests/record)"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--records", type=int, default=1_000_000, help="records of the big batch")
    parser.add_argument("--spread", type=float, default=60.0, help="seconds they appear over")
    parser.add_argument("--ooo-records", type=int, default=100_000, help="out-of-order records")
    parser.add_argument("--ooo-spread", type=float, default=60.0, help="seconds they finish over")
    parser.add_argument("--seed", type=int, default=1_000_000, help="simulator seed of the batches")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds past the spread")
    parser.add_argument("--ready-timeout", type=float, default=120.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers")
    parser.add_argument("--workdir", type=Path, help="keep the logs here (default: a temp dir)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-big-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(measure(args, workdir))
    print(summary_line(result), flush=True)
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
