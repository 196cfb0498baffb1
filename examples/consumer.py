"""Example consumer of rightfoot-poller balance events (aiokafka).

Prints one JSON line per new balance event. Reads `read_committed` (required to see each
event exactly once), commits offsets after processing, skips duplicate `event_id`s and keeps
money as `Decimal`. Stops on SIGINT/SIGTERM, after --max-messages records or --idle-timeout
seconds without one. Run: uv run python examples/consumer.py --group-id demo
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import signal
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from decimal import Decimal
from typing import Protocol

from aiokafka import AIOKafkaConsumer

log = logging.getLogger("balance-consumer")
DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?")


class Record(Protocol):
    value: bytes | None


@dataclass(frozen=True)
class BalanceEvent:
    event_id: str
    batch_id: str
    authorizer_unique_id: str
    balance: Decimal | None  # never float: money stays exact
    balance_status_code: int
    balance_status: str
    timestamp: str

    @classmethod
    def from_json(cls, raw: bytes) -> BalanceEvent:
        data = json.loads(raw)
        values = {f.name: data[f.name] for f in fields(cls)}  # unknown fields are ignored
        balance, code = values.pop("balance"), values["balance_status_code"]
        if balance is not None and not (isinstance(balance, str) and DECIMAL.fullmatch(balance)):
            raise ValueError(f"balance {balance!r} is not a decimal string")
        strings = [v for k, v in values.items() if k != "balance_status_code"]
        if type(code) is not int or not all(type(v) is str for v in strings):
            raise ValueError(f"unexpected field types in {values!r}")
        return cls(balance=None if balance is None else Decimal(balance), **values)


class RecentIds:
    """Bounded LRU of processed event ids: drops the duplicates of a redelivery. A real
    consumer keeps processed ids in its own store, in the same transaction as its effects."""

    def __init__(self, size: int = 100_000) -> None:
        self.size, self._ids = size, OrderedDict[str, None]()

    def add(self, event_id: str) -> bool:
        """Remembers `event_id`; False if it was already there."""
        known = event_id in self._ids
        self._ids[event_id] = None
        self._ids.move_to_end(event_id)
        if len(self._ids) > self.size:
            self._ids.popitem(last=False)
        return not known


SEEN = RecentIds()


def handle(record: Record, seen: RecentIds = SEEN) -> BalanceEvent | None:
    """Parses one record; None if its event was already processed; ValueError if malformed."""
    try:
        event = BalanceEvent.from_json(record.value or b"")
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a balance event: {exc!r}") from exc
    return event if seen.add(event.event_id) else None


async def consume(args: argparse.Namespace) -> int:
    stop, loop = asyncio.Event(), asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    consumer = AIOKafkaConsumer(
        args.topic,
        bootstrap_servers=args.bootstrap_servers,
        group_id=args.group_id,
        isolation_level="read_committed",  # never see events of aborted transactions
        enable_auto_commit=False,
        auto_offset_reset=args.offset_reset,
    )
    await consumer.start()
    count, idle_since = 0, loop.time()
    try:
        while not stop.is_set() and (args.max_messages is None or count < args.max_messages):
            left = None if args.max_messages is None else args.max_messages - count
            batches = await consumer.getmany(timeout_ms=500, max_records=left)
            records = [record for batch in batches.values() for record in batch]
            if not records:
                if args.idle_timeout is not None and loop.time() - idle_since > args.idle_timeout:
                    break
                continue
            for record in records:
                try:
                    if (event := handle(record)) is not None:  # the "effect": print it
                        print(json.dumps(asdict(event), default=str), flush=True)
                except ValueError as exc:  # a poison record must not block its partition
                    log.warning("skipping offset %s: %s", record.offset, exc)
            await consumer.commit()  # after processing: at worst a redelivery, never a loss
            count, idle_since = count + len(records), loop.time()
    finally:
        await consumer.stop()
    log.info("consumed %d records", count)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Consume rightfoot-poller balance events.")
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    parser.add_argument("--topic", default="rightfoot.balances")
    parser.add_argument("--group-id", default="balance-consumer-example")
    parser.add_argument("--offset-reset", choices=["earliest", "latest"], default="earliest")
    parser.add_argument("--max-messages", type=int, help="stop after N records")
    parser.add_argument("--idle-timeout", type=float, help="stop after S seconds without any")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return asyncio.run(consume(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
