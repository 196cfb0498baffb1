"""The ceiling of this stack: fetch the pages with aiohttp, produce with aiokafka, nothing else.

For the given batches it reads every page of ``GET /v1/balances`` (``limit=100``,
following ``next_page_token``) with the same concurrency as the service
(``rightfoot.max_concurrent_requests``, 16), and sends one Kafka message per record
with a producer configured as ``service.kafka_clients.make_producer`` configures the
service's (idempotent, ``acks=all``, the same linger and batch size), to its own
topic. It takes nothing from the service's code (``--batched``, below, takes one
function).

What it produces, per record: key = ``authorizer_unique_id``; value = the record's
own JSON, re-serialised compactly (about 60% of the size of the service's event);
headers = a constant CloudEvents set with the service's names and value sizes. So:
the same number of messages with the same keys and comparable bytes. It validates
nothing, deduplicates nothing, keeps no state, commits no transaction, and keeps no
delivery future (``flush()`` at the end waits for every acknowledgement; the
benchmark checks the topic's end offsets against the records served). Whatever the
service does on top is its own cost: these figures are a ceiling, never a flattering
one. The benchmark runs it with the service's garbage-collector settings
(``--gc-threshold``, see ``service/runtime.py``), so that both interpreters are tuned
alike.

    uv run python bench/ceiling.py --api-url URL --api-key KEY --bootstrap HOST:PORT \\
        --topic TOPIC BATCH_ID [BATCH_ID ...]

With ``--batched``, the fastest path of the same stack: each page is decoded by
msgspec into its records' raw JSON bytes (forwarded as the values, not re-serialised)
and each record's key, and the records go through aiokafka's batch API
(``create_batch``, ``send_batch`` to an explicit partition): one open record batch
per partition, shared by all the workers and handed to the producer when full, no
future per message. The partition is the Java client's (``partition_for_key``, the
one thing taken from the service: the fastest murmur2 here, so that partitioning
costs both the same).

Prints one JSON line: records, pages, seconds (first request to the last
acknowledgement), records_per_s and cpu_s (this process, user + system).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import msgspec
from aiokafka import AIOKafkaProducer

from service.kafka import partition_for_key

# Same names and value sizes as the service's CloudEvents headers (ids are 36 characters).
HEADERS = [
    ("ce_specversion", b"1.0"),
    ("ce_id", b"00000000-0000-5000-8000-000000000000"),
    ("ce_type", b"com.rightfoot.balance.retrieved"),
    ("ce_source", b"http://127.0.0.1:00000/v1/balances"),
    ("ce_time", b"2024-08-09T12:00:00Z"),
    ("ce_subject", b"00000000-0000-4000-8000-000000000000"),
    ("content-type", b"application/json"),
]


async def fetch_and_produce(
    http: aiohttp.ClientSession,
    producer: AIOKafkaProducer,
    url: str,
    topic: str,
    batch_id: str,
) -> tuple[int, int]:
    """Every page of one batch, in order; (records, pages)."""
    records = pages = 0
    token: str | None = None
    while True:
        params = {"batchId": batch_id, "limit": "100"}
        if token:
            params["nextPageToken"] = token
        async with http.get(url, params=params) as resp:
            resp.raise_for_status()
            page = json.loads(await resp.read())
        pages += 1
        for record in page["balances"]:
            value = json.dumps(record, separators=(",", ":")).encode()
            key = record["authorizer_unique_id"].encode()
            await producer.send(topic, value, key=key, headers=HEADERS)
        records += len(page["balances"])
        if not page.get("has_more"):
            return records, pages
        token = page["next_page_token"]


class _Page(msgspec.Struct):
    balances: list[msgspec.Raw]
    has_more: bool = False
    next_page_token: str | None = None


class _Key(msgspec.Struct):
    authorizer_unique_id: str


_PAGE = msgspec.json.Decoder(_Page)
_KEY = msgspec.json.Decoder(_Key)


class Batches:
    """One open record batch per partition of the topic, shared by every worker."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, partitions: int) -> None:
        self.producer = producer
        self.topic = topic
        self.partitions = partitions
        self.open: dict[int, Any] = {}

    async def add(self, key: bytes, value: bytes) -> None:
        partition = partition_for_key(key, self.partitions)
        builder = self.open.get(partition)
        if builder is None:
            builder = self.open[partition] = self.producer.create_batch()
        if builder.append(key=key, value=value, timestamp=None, headers=HEADERS) is None:
            # Full: a new one takes its place before the wait, so no other worker sees it.
            fresh = self.open[partition] = self.producer.create_batch()
            fresh.append(key=key, value=value, timestamp=None, headers=HEADERS)
            await self.producer.send_batch(builder, self.topic, partition=partition)

    async def send_open(self) -> None:
        for partition, builder in list(self.open.items()):
            del self.open[partition]
            await self.producer.send_batch(builder, self.topic, partition=partition)


async def fetch_and_produce_batched(
    http: aiohttp.ClientSession, batches: Batches, url: str, batch_id: str
) -> tuple[int, int]:
    """Every page of one batch, in order, through the batch API; (records, pages)."""
    records = pages = 0
    token: str | None = None
    add = batches.add
    while True:
        params = {"batchId": batch_id, "limit": "100"}
        if token:
            params["nextPageToken"] = token
        async with http.get(url, params=params) as resp:
            resp.raise_for_status()
            page = _PAGE.decode(await resp.read())
        pages += 1
        for raw in page.balances:
            await add(_KEY.decode(raw).authorizer_unique_id.encode(), bytes(raw))
        records += len(page.balances)
        if not page.has_more:
            return records, pages
        token = page.next_page_token


async def run(args: argparse.Namespace) -> dict[str, object]:
    producer = AIOKafkaProducer(
        bootstrap_servers=args.bootstrap,
        client_id="rightfoot-poller-ceiling",
        enable_idempotence=True,
        acks="all",
        linger_ms=2,
        max_batch_size=256 * 1024,
    )
    await producer.start()
    headers = {"Authorization": f"Bearer {args.api_key}", "User-Agent": "bench-ceiling"}
    connector = aiohttp.TCPConnector(limit=args.concurrency * 2)
    url = args.api_url.rstrip("/") + "/v1/balances"
    queue: asyncio.Queue[str] = asyncio.Queue()
    for batch_id in args.batch_ids:
        queue.put_nowait(batch_id)
    totals = [0, 0]
    try:
        batches = Batches(producer, args.topic, len(await producer.partitions_for(args.topic)))
        async with aiohttp.ClientSession(connector=connector, headers=headers) as http:

            async def worker() -> None:
                while not queue.empty():
                    batch_id = queue.get_nowait()
                    if args.batched:
                        records, pages = await fetch_and_produce_batched(
                            http, batches, url, batch_id
                        )
                    else:
                        records, pages = await fetch_and_produce(
                            http, producer, url, args.topic, batch_id
                        )
                    totals[0] += records
                    totals[1] += pages

            cpu_before, started = os.times(), time.monotonic()
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            await batches.send_open()
            await producer.flush()  # every message acknowledged (acks=all)
            seconds, cpu_after = time.monotonic() - started, os.times()
    finally:
        await producer.stop()
    cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    return {
        "records": totals[0],
        "pages": totals[1],
        "seconds": round(seconds, 3),
        "records_per_s": round(totals[0] / seconds, 1) if seconds > 0 else None,
        "cpu_s": round(cpu, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--api-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument(
        "--batched", action="store_true", help="raw record bytes through the batch API"
    )
    parser.add_argument(
        "--gc-threshold",
        help="A,B,C: freeze start-up objects and set these GC thresholds, as the service does",
    )
    parser.add_argument("batch_ids", nargs="+", metavar="BATCH_ID")
    args = parser.parse_args(argv)
    if args.gc_threshold:
        gc.collect()
        gc.freeze()
        gc.set_threshold(*(int(n) for n in args.gc_threshold.split(",")))
    print(json.dumps(asyncio.run(run(args)), separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
