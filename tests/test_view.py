"""The state view's read of the state topic (``StateView._follow``) through a fake consumer."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
from aiokafka import TopicPartition
from aiokafka.errors import OffsetOutOfRangeError

from service import view as view_module
from service.config import KafkaConfig
from service.state import BatchState, encode_state
from service.view import StateView


def summary(batch_id: str) -> tuple[bytes, bytes]:
    return batch_id.encode(), encode_state(BatchState(batch_id=batch_id, partition=0))


class MovingStart:
    """State partition 0 of four summaries whose log start moves past the reader after the
    first (record 1 deleted); the fetcher then does as its ``auto_offset_reset`` says, as
    aiokafka's does."""

    records = [summary(b) for b in ("a", "b", "c", "d")]
    log_start = 0
    moved = False

    def __init__(self, **kwargs: Any) -> None:
        self.reset = kwargs.get("auto_offset_reset", "latest")
        self.pos = 0

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def assign(self, _tps: list[TopicPartition]) -> None:
        pass

    async def seek_to_beginning(self, *_tps: TopicPartition) -> None:
        self.pos = type(self).log_start

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: len(self.records) for tp in tps}

    async def position(self, _tp: TopicPartition) -> int:
        return self.pos

    async def getmany(self, **_: Any) -> dict[TopicPartition, list[SimpleNamespace]]:
        cls, tp = type(self), TopicPartition("state", 0)
        await asyncio.sleep(0.001)
        if not cls.moved and self.pos > 0:
            cls.moved, cls.log_start = True, 2
        if self.pos < cls.log_start:
            if self.reset == "none":
                raise OffsetOutOfRangeError({tp: self.pos})
            self.pos = len(self.records) if self.reset == "latest" else cls.log_start
            return {}
        if self.pos >= len(self.records):
            return {}
        key, value = self.records[self.pos]
        self.pos += 1
        return {tp: [SimpleNamespace(key=key, value=value, partition=0)]}


async def test_a_view_whose_log_start_moves_past_it_reads_the_topic_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not loaded with the records read before the move alone (aiokafka's default reset,
    "latest", skipped to the end): the read fails, one WARNING, and the topic is read again
    from its new start."""
    monkeypatch.setattr(view_module, "AIOKafkaConsumer", type("C", (MovingStart,), {}))
    view = StateView(KafkaConfig(partitions=1), "test")
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(view.run())
        try:
            for _ in range(500):
                if view.loaded:
                    break
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await view.close()
    assert view.loaded and view.get("c") is not None and view.get("d") is not None
    lines = [(e["event"], e["log_level"]) for e in logs if e["log_level"] != "debug"]
    assert lines == [("state_view_failed", "warning")]
