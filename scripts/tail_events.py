"""Print the service's events as they are committed, one line each (used by `make run`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

from aiokafka import AIOKafkaConsumer


def describe(topic: str, value: dict[str, object]) -> str:
    if "event" in value:
        extra = value.get("counts_by_status") or value.get("reason") or ""
        return f"[{topic}] {value['event']:<16} batch={value['batch_id']} {extra}"
    return (
        f"[{topic}] batch={value['batch_id']} authorizer={value['authorizer_unique_id']} "
        f"balance={value['balance']} status={value['balance_status']}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    parser.add_argument("topics", nargs="+")
    args = parser.parse_args()
    consumer = AIOKafkaConsumer(
        *args.topics,
        bootstrap_servers=args.bootstrap_servers,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await consumer.start()
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=500)
            for tp, messages in batch.items():
                for msg in messages:
                    print(describe(tp.topic, json.loads(msg.value or b"{}")), flush=True)
    finally:
        await consumer.stop()


if __name__ == "__main__":
    asyncio.run(main())
