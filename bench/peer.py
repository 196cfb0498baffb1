"""The peer: Benthos 4.27 doing the service's job on the same pages (``bench/benthos.yaml``).

What a user would pick instead of this service is a general pipeline tool; Benthos
4.27.0 is its last MIT release, built here by ``scripts/benthos.sh`` (a small
distribution, ``scripts/benthos/``) into ``.cache/benthos/``. For the given batches it
pages every batch to the end and produces one event per record, with the service's
key, fields and headers, to its own topic (the configuration's comment says how).

The clock runs from the moment Benthos logs its input as active (start-up and
configuration parsing are not counted, as the service's start-up is not) to the
moment it logs that its pipeline has terminated (every message acknowledged); CPU is
the process's user + system time between the same two moments, from /proc. Then the
topic is read: the distinct event IDs must be exactly the records served, and every
100th event is checked against what the service's own ``EventFactory`` writes for the
same record (key, value as JSON, the set of headers).

    uv run python bench/peer.py --api-url URL --api-key KEY --bootstrap HOST:PORT \\
        --records N BATCH_ID [BATCH_ID ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from harness import ROOT, Topics, clean_env, cpu_seconds, create_topic, log, terminate

from service.events import EventFactory
from service.records import BalanceRecord, balance_event_id

CONFIG = ROOT / "bench" / "benthos.yaml"
BUILD = ROOT / "scripts" / "benthos.sh"
STARTED = "Input type file is now active"
FINISHED = "Pipeline has terminated"


def benthos_binary() -> Path:
    """The Benthos 4.27.0 binary, built by scripts/benthos.sh if it is not there yet."""
    out = subprocess.run([str(BUILD)], cwd=ROOT, check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


class _Event(msgspec.Struct):
    event_id: str
    batch_id: str
    authorizer_unique_id: str
    balance: str | None
    balance_status_code: int
    timestamp: str


_DECODE = msgspec.json.Decoder(_Event)


async def run_peer(
    binary: Path,
    *,
    api_url: str,
    api_key: str,
    bootstrap: str,
    batch_ids: list[str],
    records: int,
    workdir: Path,
    threads: int = 16,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """One Benthos run over ``batch_ids`` (``records`` in all); its figures, checked."""
    topic = f"{Topics().prefix}.peer"
    await create_topic(bootstrap, topic)
    ids_file = workdir / "peer-batch-ids.txt"
    ids_file.write_text("".join(f"{batch_id}\n" for batch_id in batch_ids))
    env = clean_env(
        API_URL=api_url.rstrip("/"),
        API_KEY=api_key,
        BATCH_IDS=str(ids_file),
        KAFKA_BROKERS=bootstrap,
        TOPIC=topic,
        THREADS=str(threads),
    )
    command = [str(binary), "--log.level", "INFO", "-c", str(CONFIG)]
    proc = await asyncio.create_subprocess_exec(
        *command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None  # Benthos logs to stdout
    marks: dict[str, tuple[float, float]] = {}
    try:
        with (workdir / "peer.log").open("ab") as sink:
            deadline = time.monotonic() + timeout_s
            while line := await asyncio.wait_for(
                proc.stdout.readline(), deadline - time.monotonic()
            ):
                for name, text in (("started", STARTED), ("finished", FINISHED)):
                    if text.encode() in line and name not in marks:
                        marks[name] = (time.monotonic(), cpu_seconds(proc.pid))
                sink.write(line)
            code = await asyncio.wait_for(proc.wait(), 60)
    finally:
        await terminate(proc)
    if code != 0 or len(marks) != 2:
        raise RuntimeError(f"benthos exited with {code} (log: {workdir / 'peer.log'})")
    seconds = marks["finished"][0] - marks["started"][0]
    cpu = marks["finished"][1] - marks["started"][1]
    messages, distinct = await check_events(bootstrap, topic, api_url.rstrip("/"))
    if distinct != records:
        raise RuntimeError(f"peer: {distinct} distinct records in {topic}, {records} served")
    return {
        "records": distinct,
        "messages": messages,
        "seconds": round(seconds, 3),
        "records_per_s": round(distinct / seconds, 1),
        "cpu_s": round(cpu, 3),
        "cpu_s_per_million": round(cpu / distinct * 1e6, 3),
    }


async def check_events(bootstrap: str, topic: str, api_url: str) -> tuple[int, int]:
    """(messages, distinct event IDs) in ``topic``; every 100th checked against the service's."""
    factory = EventFactory(
        balances_topic=topic, batch_events_topic="unused", source=api_url + "/v1/balances"
    )
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    seen: set[str] = set()
    messages = 0
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            chunk = await consumer.getmany(timeout_ms=500, max_records=50_000)
            for batch in chunk.values():
                for msg in batch:
                    event = _DECODE.decode(msg.value)
                    seen.add(event.event_id)
                    if messages % 100 == 0:
                        _check_one(factory, event, msg)
                    messages += 1
    finally:
        await consumer.stop()
    return messages, len(seen)


def _check_one(factory: EventFactory, event: _Event, msg: Any) -> None:
    """The peer's event is the service's event for the same record (fields, key, headers)."""
    event_id = balance_event_id(
        event.batch_id,
        event.authorizer_unique_id,
        event.timestamp,
        event.balance,
        event.balance_status_code,
    )
    record = BalanceRecord(
        event.authorizer_unique_id,
        event.balance,
        event.balance_status_code,
        event.timestamp,
        event_id,
    )
    key, value, headers = next(factory.balance_wire(event.batch_id, [record]))
    problems = []
    if json.loads(msg.value) != json.loads(value):
        problems.append(f"value {msg.value!r} != {value!r}")
    if msg.key != key:
        problems.append(f"key {msg.key!r} != {key!r}")
    if sorted(msg.headers) != sorted(headers):
        problems.append(f"headers {sorted(msg.headers)} != {sorted(headers)}")
    if problems:
        raise RuntimeError("peer: an event unlike the service's: " + "; ".join(problems))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--api-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--records", type=int, required=True, help="records served in all")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=Path("."))
    parser.add_argument("batch_ids", nargs="+", metavar="BATCH_ID")
    args = parser.parse_args(argv)
    binary = benthos_binary()
    log(f"peer: {binary}")
    result = asyncio.run(
        run_peer(
            binary,
            api_url=args.api_url,
            api_key=args.api_key,
            bootstrap=args.bootstrap,
            batch_ids=args.batch_ids,
            records=args.records,
            workdir=args.workdir,
            threads=args.threads,
        )
    )
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
