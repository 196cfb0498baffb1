"""Wait until a Kafka broker can really serve the poller, not just accept TCP.

Each attempt, with the project's own client library (aiokafka):

1. metadata round trip (the broker lists itself) and creation of a throwaway
   topic if missing (auto.create.topics.enable=false on the dev broker);
2. a transactional producer: InitProducerId via the transaction coordinator
   (aiokafka's implicit ``init_transactions`` in ``start()``), then one
   begin/send/commit transaction;
3. a consumer in a throwaway group (read_committed): join, read back the record
   just committed, commit its offset and fetch the committed offset again,
   which proves the group coordinator.

For a cluster (``scripts/kafka.sh cluster-start``): ``--brokers 3`` also waits until
the metadata lists three live brokers, ``--replication-factor 3`` creates the probe
topic on all of them, and ``--in-sync`` (after a node was restarted) waits until every
partition of every topic, the internal ones included, has a leader and its whole
replica set in sync again.

Retries until all pass or ``--timeout`` runs out. Exit codes: 0 ready,
1 not ready in time, 3 a broker process given by ``--pid`` (repeatable) died, 4 nothing
accepted TCP connections on any bootstrap address for ``--down-grace`` seconds.

Usage: uv run --frozen python scripts/kafka_ready.py --bootstrap 127.0.0.1:9092 --timeout 120
       uv run --frozen python scripts/kafka_ready.py --bootstrap 127.0.0.1:9192,127.0.0.1:9193,\
           127.0.0.1:9194 --brokers 3 --replication-factor 3 --in-sync
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

try:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
except ImportError:  # not in the project venv: re-run through uv (syncs .venv first)
    _uv = shutil.which("uv")
    if _uv is None or os.environ.get("KAFKA_READY_REEXEC"):
        raise
    os.environ["KAFKA_READY_REEXEC"] = "1"
    _root = str(Path(__file__).resolve().parent.parent)
    os.execv(_uv, [_uv, "run", "--frozen", "--quiet", "--project", _root, "python", *sys.argv])

PROBE_TOPIC = "kafka-ready-probe"
PROBE_PREFIX = "kafka-ready"
ERR_TOPIC_ALREADY_EXISTS = 36
REQUEST_TIMEOUT_MS = 10_000


class NotReadyError(Exception):
    """The broker answered but cannot serve yet."""


@dataclass(frozen=True)
class Expect:
    """What "ready" means beyond the round trips: cluster size and replication."""

    brokers: int = 1
    replication_factor: int = 1
    in_sync: bool = False


def admin_client(bootstrap: str) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id=PROBE_PREFIX,
        request_timeout_ms=REQUEST_TIMEOUT_MS,
    )


async def check_metadata(bootstrap: str, expect: Expect) -> None:
    admin = admin_client(bootstrap)
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
        brokers = cluster.get("brokers") or []
        if len(brokers) < expect.brokers:
            raise NotReadyError(f"metadata lists {len(brokers)} of {expect.brokers} brokers")
        if PROBE_TOPIC in await admin.list_topics():
            return
        topic = NewTopic(PROBE_TOPIC, 1, expect.replication_factor)
        response = await admin.create_topics([topic])
        for topic, code, *rest in response.topic_errors:
            if code not in (0, ERR_TOPIC_ALREADY_EXISTS):
                raise NotReadyError(f"create topic {topic}: error {code} {rest}")
    finally:
        await admin.close()


async def check_transaction(bootstrap: str, marker: bytes) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        client_id=PROBE_PREFIX,
        transactional_id=f"{PROBE_PREFIX}-{marker.decode()}",
        enable_idempotence=True,
        acks="all",
        request_timeout_ms=REQUEST_TIMEOUT_MS,
        transaction_timeout_ms=30_000,
    )
    try:
        await producer.start()  # FindCoordinator(TRANSACTION) + InitProducerId
        async with producer.transaction():
            await producer.send_and_wait(PROBE_TOPIC, value=marker, key=b"kafka-ready")
    finally:
        await producer.stop()


async def check_group(bootstrap: str, marker: bytes) -> None:
    consumer = AIOKafkaConsumer(
        PROBE_TOPIC,
        bootstrap_servers=bootstrap,
        client_id=PROBE_PREFIX,
        group_id=f"{PROBE_PREFIX}-{marker.decode()}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        request_timeout_ms=REQUEST_TIMEOUT_MS,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=1_000,
    )
    try:
        await consumer.start()
        while True:  # bounded by the caller's timeout
            batches = await consumer.getmany(timeout_ms=500)
            for tp, records in batches.items():
                for record in records:
                    if record.value == marker:
                        await commit_and_verify(consumer, tp, record.offset + 1)
                        return
    finally:
        await consumer.stop()


async def commit_and_verify(consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> None:
    await consumer.commit({tp: offset})
    committed = await consumer.committed(tp)
    if committed != offset:
        raise NotReadyError(f"committed offset {committed}, expected {offset}")


async def check_in_sync(bootstrap: str) -> None:
    """Every partition of every topic has a leader and all its replicas in sync."""
    admin = admin_client(bootstrap)
    await admin.start()
    try:
        lagging = []
        for topic in await admin.describe_topics():
            if topic["error_code"]:
                lagging.append(f"{topic['topic']} (error {topic['error_code']})")
            for p in topic["partitions"]:
                if p["error_code"] or p["leader"] < 0 or set(p["isr"]) != set(p["replicas"]):
                    lagging.append(f"{topic['topic']}-{p['partition']} isr {sorted(p['isr'])}")
        if lagging:
            raise NotReadyError(f"{len(lagging)} partitions not in sync, e.g. {lagging[:3]}")
    finally:
        await admin.close()


async def attempt(bootstrap: str, expect: Expect) -> None:
    marker = uuid.uuid4().hex.encode()
    await check_metadata(bootstrap, expect)
    await check_transaction(bootstrap, marker)
    await check_group(bootstrap, marker)
    if expect.in_sync:
        await check_in_sync(bootstrap)


def process_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


async def watch_pids(pids: list[int]) -> int:
    """Returns the first of ``pids`` found dead."""
    # Polling /proc: there is no event for "some other process exited".
    while True:
        for pid in pids:
            if not process_alive(pid):
                return pid
        await asyncio.sleep(0.5)


async def address_open(address: str) -> bool:
    host, _, port = address.strip().rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 2)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def port_open(bootstrap: str) -> bool:
    """Does any of the bootstrap addresses accept a connection?"""
    opened = await asyncio.gather(*(address_open(a) for a in bootstrap.split(",")))
    return any(opened)


async def wait_ready(
    bootstrap: str,
    budget_s: float,
    pids: list[int],
    down_grace: float | None,
    verbose: bool,
    expect: Expect | None = None,
) -> int:
    expect = expect or Expect()
    start = time.monotonic()
    deadline = start + budget_s
    last_error = "no attempt made"
    last_report = start
    down_since: float | None = None
    while (remaining := deadline - time.monotonic()) > 0:
        if down_grace is not None:
            if await port_open(bootstrap):
                down_since = None
            else:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since >= down_grace:
                    print(f"kafka_ready: nothing listens on {bootstrap}", file=sys.stderr)
                    return 4
        task = asyncio.create_task(
            asyncio.wait_for(attempt(bootstrap, expect), min(remaining, 30.0))
        )
        watcher = asyncio.create_task(watch_pids(pids)) if pids else None
        waiting = {task} if watcher is None else {task, watcher}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if watcher is not None:
            if watcher.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                print(f"kafka_ready: broker process {watcher.result()} exited", file=sys.stderr)
                return 3
            watcher.cancel()
        try:
            task.result()
        except TimeoutError:
            last_error = "attempt did not finish in time (coordinator not available?)"
        except (Exception, asyncio.CancelledError) as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        else:
            if verbose:
                elapsed = time.monotonic() - start
                print(f"kafka_ready: {bootstrap} ready after {elapsed:.1f}s", file=sys.stderr)
            return 0
        now = time.monotonic()
        if verbose or now - last_report >= 15:
            print(f"kafka_ready: waiting for {bootstrap}: {last_error}", file=sys.stderr)
            last_report = now
        await asyncio.sleep(min(0.5, max(0.0, deadline - now)))
    print(f"kafka_ready: {bootstrap} not ready in {budget_s:.0f}s: {last_error}", file=sys.stderr)
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds (default 120)")
    parser.add_argument(
        "--pid",
        type=int,
        action="append",
        default=[],
        help="give up as soon as this broker process dies (repeatable)",
    )
    parser.add_argument(
        "--brokers", type=int, default=1, help="live brokers the metadata must list (default 1)"
    )
    parser.add_argument(
        "--replication-factor",
        type=int,
        default=1,
        help="replication factor of the probe topic when it is created (default 1)",
    )
    parser.add_argument(
        "--in-sync",
        action="store_true",
        help="also wait until every partition has a leader and its full replica set in sync",
    )
    parser.add_argument(
        "--down-grace",
        type=float,
        help="exit 4 once the address has refused connections for this many seconds",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    # aiokafka logs every refused connection at ERROR while the broker starts.
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.CRITICAL)
    expect = Expect(args.brokers, args.replication_factor, args.in_sync)
    return asyncio.run(
        wait_ready(args.bootstrap, args.timeout, args.pid, args.down_grace, args.verbose, expect)
    )


if __name__ == "__main__":
    sys.exit(main())
