"""A read-only view of every tracked batch, from the state topic, for ``GET /v1/batches``.

Any replica answers for all of them: the view follows every state partition
(read_committed), not only the ones this replica owns. It also knows each batch's
partition (``home``): where a tracking request for it must go, which is not its ID's
hash modulo the partition count once partitions were added to the topics.
"""

from __future__ import annotations

import asyncio
import builtins
import itertools
from bisect import bisect_left, bisect_right
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from service.config import KafkaConfig
from service.kafka_clients import client_args, stop_client
from service.state import CHUNK_SEPARATOR, StateSummary

log = structlog.get_logger(__name__)

# Batches added or removed since the sorted IDs were last brought up to date: up to this
# many are put in or taken out one by one (each a move of the list's tail), beyond it the
# IDs are sorted anew when next asked for.
RESORT_AFTER = 64

# What GET /v1/batches shows of a batch's summary (the state topic's schema: StateSummary).
VIEW_FIELDS: set[str] = {
    "batch_id",
    "status",
    "expected_count",
    "published",
    "dead_lettered",
    "relisted",
    "counts",
    "tracked_at",
    "last_poll_at",
    "failures",
    "reason",
    "total_processed",
}


class StateView:
    def __init__(self, cfg: KafkaConfig, client_id: str) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.batches: dict[str, dict[str, Any]] = {}
        # The state partition that holds each batch's summary (one int a batch).
        self.homes: dict[str, int] = {}
        self.loaded = False
        # The batches' IDs in order, for listing: kept up to date by the few changes since
        # they were sorted, and sorted anew after many (the first read of the topic), so
        # that a page of GET /v1/batches costs no sort of every batch.
        self._sorted: list[str] | None = None
        self._changed: set[str] = set()
        self.partitions = cfg.partitions  # set to the topic's real count before run()
        self._consumer: AIOKafkaConsumer | None = None
        self._again = asyncio.Event()  # set_partitions: read the topic again

    def get(self, batch_id: str) -> dict[str, Any] | None:
        return self.batches.get(batch_id)

    def home(self, batch_id: str) -> int | None:
        """The partition whose state holds the batch, None if no partition does."""
        return self.homes.get(batch_id)

    def list(
        self,
        *,
        statuses: frozenset[str] | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> tuple[list[dict[str, Any]], bool]:
        """The batches by ID, after ``after``, of ``statuses`` (any if None), at most
        ``limit``; and whether more follow."""
        keys = self._sorted_ids()
        start = 0 if after is None else bisect_right(keys, after)
        out: list[dict[str, Any]] = []
        for key in itertools.islice(keys, start, None):
            batch = self.batches[key]
            if statuses is not None and batch["status"] not in statuses:
                continue
            if limit is not None and len(out) >= limit:
                return out, True
            out.append(batch)
        return out, False

    def put(self, batch_id: str, summary: dict[str, Any]) -> None:
        """A batch's summary as the view shows it (new, or in place of the last)."""
        if batch_id not in self.batches:
            self._note(batch_id)
        self.batches[batch_id] = summary

    def remove(self, batch_id: str) -> None:
        """A batch forgotten (its summary tombstoned)."""
        if self.batches.pop(batch_id, None) is not None:
            self._note(batch_id)

    def _note(self, batch_id: str) -> None:
        if self._sorted is None:
            return
        self._changed.add(batch_id)
        if len(self._changed) > RESORT_AFTER:
            self._sorted, self._changed = None, set()

    def _sorted_ids(self) -> builtins.list[str]:
        if self._sorted is None:
            self._sorted = sorted(self.batches)
        keys = self._sorted
        for key in self._changed:
            i = bisect_left(keys, key)
            listed = i < len(keys) and keys[i] == key
            if key in self.batches and not listed:
                keys.insert(i, key)
            elif key not in self.batches and listed:
                del keys[i]
        self._changed.clear()
        return keys

    def set_partitions(self, partitions: int) -> None:
        """Follow this many state partitions (partitions were added): the view reads them
        all again from the start, and is not ``loaded`` until it has."""
        if partitions != self.partitions:
            self.partitions = partitions
            self.loaded = False
            self._again.set()

    async def run(self) -> None:
        delay = 1.0
        while True:
            try:
                self._again.clear()
                await self._follow()
                await self.close()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("state_view_failed", error=repr(exc), retry_in_s=delay)
                await self.close()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _follow(self) -> None:
        consumer = AIOKafkaConsumer(
            **client_args(self.cfg, self.client_id),
            enable_auto_commit=False,
            isolation_level="read_committed",
            # Records deleted ahead of the position: an error, and the topic is read again
            # from its start (``run``), not skipped to its end (aiokafka's "latest").
            auto_offset_reset="none",
        )
        self._consumer = consumer
        await consumer.start()
        tps = [TopicPartition(self.cfg.state_topic, p) for p in range(self.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        while not self._again.is_set():
            chunk = await consumer.getmany(timeout_ms=1000, max_records=5000)
            for messages in chunk.values():
                for msg in messages:
                    self._apply(msg.key, msg.value, msg.partition)
            if not self.loaded:
                positions = [await consumer.position(tp) for tp in tps]
                caught_up = all(pos >= ends[tp] for pos, tp in zip(positions, tps, strict=True))
                self.loaded = caught_up and not self._again.is_set()

    def _apply(self, key: bytes | None, value: bytes | None, partition: int) -> None:
        if key is None or CHUNK_SEPARATOR.encode() in key:
            return  # a batch's fingerprints: the view reads summaries only
        batch_id = key.decode(errors="replace")
        if value is None:
            if self.homes.get(batch_id) == partition:
                del self.homes[batch_id]
                self.remove(batch_id)
            return
        # Its home even if the summary is not understood: the batch is there, unreadable.
        self.homes[batch_id] = partition
        try:
            summary = StateSummary.model_validate_json(value)
        except ValidationError:
            return  # counted by the owner that restores it
        if summary.batch_id != batch_id:
            return  # not understood either (StateRestore.rebuild)
        self.put(batch_id, summary.model_dump(include=VIEW_FIELDS))

    async def close(self) -> None:
        if self._consumer is not None:
            await stop_client(self._consumer)
            self._consumer = None
