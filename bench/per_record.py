"""Per-record CPU, timed alone: the service's path, the batched ceiling's, and the floor.

No network, no broker, no event loop: the simulator's own pages (``--pages`` pages of
100 records, written by ``rightfoot_simulator.data`` as the API serves them) are built
in memory, and each path runs over all of them ``--repeat`` times; the best run counts.

- ``ceiling``: what ``bench/ceiling.py --batched`` does with a page: msgspec decodes it
  into each record's raw JSON and key, ``partition_for_key``, aiokafka's ``append``.
- ``service``: what the service does with a page up to the same ``append``, cumulative
  by stage: ``parse`` (``parse_page``: decode, validate, event ids), ``dedup`` (``collect``
  against a batch that has published ``--published`` records), ``event`` (each event's
  key, value and headers), ``partition`` (murmur2), ``append``.
- ``floor``: only what the event format and the dedup require of every record, each at
  its cheapest here: the SHA-1 of the uuid5 event id and its canonical text, the value
  JSON (msgspec), the headers that differ per record, and one fingerprint looked up in
  a set. No validation, no loop, no parse: a bound no implementation in this stack can
  beat, not a figure the service could reach.

Prints one JSON line, µs per record, and ``floor_ratio_bound``: the batched ceiling's
full-system CPU per record (``--ceiling-us``, from ``bench/throughput.py``) over itself
plus the floor, the most ``throughput_ratio_batched`` could be if the service did the
floor and nothing else the ceiling does not.

    uv run python bench/per_record.py --ceiling-us 5.2
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import random
import time
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import msgspec
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from ceiling import HEADERS

from rightfoot_simulator.data import _page_json, _record_json, _synthetic_records
from service.events import EventFactory, _BalanceValue, _encode_value
from service.kafka import murmur2, partition_for_key
from service.records import EVENT_NAMESPACE, fingerprint, parse_page
from service.seen import SeenSet
from service.step import Pending, collect

BATCH_ID = "4c1f6a3e-2b7d-4f0e-9a51-6c2f1e0b7d11"
PARTITIONS = 12
PAGE = 100
STAGES = ("parse", "dedup", "event", "partition", "append")


class _Page(msgspec.Struct):  # bench/ceiling.py's
    balances: list[msgspec.Raw]
    has_more: bool = False
    next_page_token: str | None = None


class _Key(msgspec.Struct):
    authorizer_unique_id: str


class _Batch:
    """What ``collect`` reads of a batch's state."""

    def __init__(self, published: int, rng: random.Random) -> None:
        self.fingerprint = fingerprint
        self.tracks_authorizers = True  # a batch of this release: its authorizers are kept
        self.seen = SeenSet(rng.getrandbits(64) for _ in range(published))


def pages(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    records = _synthetic_records(rng, count * PAGE, 0.0, None, False)
    bodies = []
    for p in range(count):
        chunk = records[p * PAGE : (p + 1) * PAGE]
        text = "[" + ",".join(_record_json(r, p * PAGE + i) for i, r in enumerate(chunk)) + "]"
        bodies.append(_page_json(BATCH_ID, count * PAGE, text, p < count - 1, f"t{p + 1}").encode())
    return bodies


def _builder() -> Any:
    return DefaultRecordBatchBuilder(2, 0, 1, 1, 0, 0, 256 * 1024)


def _append(
    open_batches: dict[int, Any], partition: int, key: bytes, value: bytes, headers: Any
) -> None:
    """Into the partition's open record batch; a new one when it is full."""
    builder = open_batches.get(partition) or open_batches.setdefault(partition, _builder())
    if builder.append(0, None, key=key, value=value, headers=headers) is None:
        builder = open_batches[partition] = _builder()
        builder.append(0, None, key=key, value=value, headers=headers)


def ceiling(bodies: list[bytes]) -> None:
    page_of, key_of = msgspec.json.Decoder(_Page).decode, msgspec.json.Decoder(_Key).decode
    open_batches: dict[int, Any] = {}
    for body in bodies:
        for raw in page_of(body).balances:
            key, value = key_of(raw).authorizer_unique_id.encode(), bytes(raw)
            _append(open_batches, partition_for_key(key, PARTITIONS), key, value, HEADERS)


def service(bodies: list[bytes], stage: str, batch: _Batch) -> int:
    """The path up to ``stage``; the records that reached it."""
    factory = EventFactory(
        balances_topic="rightfoot.balances", batch_events_topic="e", source="http://x/v1"
    )
    upto = STAGES.index(stage)
    open_batches: dict[int, Any] = {}
    reached = 0
    for body in bodies:
        page = parse_page(BATCH_ID, body)
        if upto < 1:
            reached += len(page.records)
            continue
        pending = Pending()
        collect(cast(Any, batch), page.records, page.invalid, pending)  # a stand-in BatchState
        if upto < 2:
            reached += len(pending.records)
            continue
        for key, value, headers in factory.balance_wire(BATCH_ID, pending.records):
            reached += 1
            if upto < 3:
                continue
            partition = (murmur2(key) & 0x7FFFFFFF) % PARTITIONS
            if upto < 4:
                continue
            _append(open_batches, partition, key, value, headers)
    return reached


def floor(count: int) -> float:
    """µs per record of the floor, each part timed over ``count`` calls with locals only."""
    prefix = hashlib.sha1(EVENT_NAMESPACE.bytes + f"{BATCH_ID}\x1f".encode())
    uid, stamp, balance = "1286672", "2024-08-09T18:10:44Z", "12345.67"
    event_id = "3361b78a-e60b-5718-a976-4e54f772e8a9"
    seen = set(range(10_000))

    def sha() -> object:
        s = prefix.copy()
        s.update(f"{uid}\x1f{stamp}\x1f{balance}\x1f{0}".encode())
        return s.digest()

    def text() -> object:
        h = "3361b78ae60b0718e9764e54f772e8a9"
        return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{h[16]}{h[17:20]}-{h[20:32]}"

    def value() -> object:
        return _encode_value(_BalanceValue(event_id, BATCH_ID, uid, balance, 0, "SUCCESS", stamp))

    def headers() -> object:
        return [("ce_id", event_id.encode()), ("ce_time", stamp.encode())]

    def lookup() -> object:
        return 12_345_678 in seen

    def nothing() -> object:
        return None

    # Each part is timed as calls of a function; the calls themselves are not the floor's.
    call = best(lambda: _calls(nothing, count), 5)
    parts: list[Callable[[], object]] = [sha, text, value, headers, lookup]
    total = sum(best(partial(_calls, f, count), 5) - call for f in parts)
    return total / count * 1e6


def _calls(f: Callable[[], object], count: int) -> None:
    for _ in range(count):
        f()


def best(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pages", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--published", type=int, default=20_000)
    parser.add_argument("--ceiling-us", type=float, help="batched ceiling, CPU µs per record")
    args = parser.parse_args(argv)
    bodies = pages(args.pages, seed=1)
    records = args.pages * PAGE
    batch = _Batch(args.published, random.Random(2))
    gc.freeze()
    out: dict[str, Any] = {"records": records}
    out["ceiling_us"] = round(best(lambda: ceiling(bodies), args.repeat) / records * 1e6, 3)
    for stage in STAGES:
        if service(bodies, stage, batch) != records:  # every record valid, none published
            raise SystemExit(f"the service path lost records at {stage}")
        seconds = best(partial(service, bodies, stage, batch), args.repeat)
        out[f"service_{stage}_us"] = round(seconds / records * 1e6, 3)
    out["service_us"] = out["service_append_us"]
    out["floor_us"] = round(floor(100_000), 3)
    out["isolated_ratio"] = round(out["ceiling_us"] / out["service_us"], 3)
    if args.ceiling_us:
        out["floor_ratio_bound"] = round(args.ceiling_us / (args.ceiling_us + out["floor_us"]), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
