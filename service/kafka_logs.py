"""aiokafka's log lines, made readable when a broker is lost; and which brokers are reachable.

aiokafka logs every failed connection, fetch, heartbeat and metadata request at
ERROR, from every client (the service has one producer per owned partition),
many times a second. A broker restart, which a rolling upgrade does to every
broker in turn, produced thousands of ERROR lines while nothing was wrong.

``BrokerLog`` is a logging filter on the service's handler. The conditions a
lost broker, a moving coordinator or a leader change cause (``TRANSIENT``) are
taken out of aiokafka's stream and reported per broker: one WARNING
``kafka_broker_unreachable`` when a broker starts failing, one WARNING
``kafka_broker_still_unreachable`` a minute (with how many lines it stood for)
while it stays so, and one INFO ``kafka_broker_reachable`` when it is back.
aiokafka's other warnings pass at most once a minute per kind, with a count.
Everything else aiokafka logs at ERROR stays ERROR: a refused login, a fenced
producer, an unknown topic, a transaction that cannot commit.

A broker is back when one of the watched clients is connected to it again, or
when nothing about it failed for ``QUIET_S`` (a broker no client talks to).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger(__name__)

# aiokafka's messages (their format strings) for conditions a broker loss causes, and the
# position of the argument that names the broker (None: the cluster, no broker named).
TRANSIENT: dict[str, int | None] = {
    "Unable connect to node with id %s: %s": 0,
    'Unable connect to "%s:%s": %s': 0,
    'Unable to request metadata from "%s:%s": %s': 0,
    "Unable to request metadata from node with id %s: %r": 0,
    "Unable to update metadata from %s": None,
    "Failed fetch messages from %s: %s": 0,
    "Failed fetch offsets from %s: %s": 0,
    "Error sending %s to node %s [%s] -- marking coordinator dead": 1,
    "Marking the coordinator dead (node %s)for group %s.": 0,
    "Heartbeat send request failed: %s. Will retry.": None,
    "Heartbeat session expired - marking coordinator dead": None,
    "Group Coordinator Request failed: %s": None,
    "FindCoordinator Request failed: %s": None,
    "Cannot send %r to %s: %r": 1,
    "Could not send %r: %r": None,
    "Got error produce response: %s": None,
    "Got error produce response on topic-partition %s, retrying. Error: %s": None,
    "Heartbeat failed for group %s: coordinator (node %s) is either not started or not valid": 1,
    "OffsetCommit failed for group %s due to group error (%s), will rejoin": None,
}
SUMMARY_EVERY_S = 60.0  # a line while a broker stays unreachable; and per kind of warning
QUIET_S = 30.0  # no failure about a broker for this long: it is back
CLUSTER = "cluster"  # failures that name no broker


@dataclass
class _Down:
    since: float
    last_line: float
    lines: int = 0  # aiokafka lines this stood for since the last line written
    last_failure: float = 0.0


class BrokerLog(logging.Filter):
    """Takes aiokafka's transient failures out of the log and reports brokers instead."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.clock = clock
        self.down: dict[str, _Down] = {}
        self._kinds: dict[str, tuple[float, int]] = {}  # warning kind -> (last line, held)
        self._lock = threading.Lock()  # aiokafka logs from the event loop; metrics scrape too
        self._clients: weakref.WeakSet[Any] = weakref.WeakSet()

    # ---- the filter ----------------------------------------------------------------

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("aiokafka") or record.levelno < logging.WARNING:
            return True
        template = str(record.msg)
        if template in TRANSIENT:
            self._failure(record, TRANSIENT[template])
            return False
        if record.levelno >= logging.ERROR:
            return True  # a real problem: as aiokafka says it
        return self._warning_due(template)

    def _failure(self, record: logging.LogRecord, position: int | None) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        broker = CLUSTER
        if position is not None and position < len(args):
            broker = str(args[position])
            if template_has_port(str(record.msg)) and position + 1 < len(args):
                broker = f"{args[position]}:{args[position + 1]}"
        now = self.clock()
        extra: dict[str, Any] = {}
        with self._lock:
            down = self.down.get(broker)
            if down is None:
                self.down[broker] = _Down(since=now, last_line=now, last_failure=now)
                line = "kafka_broker_unreachable"
            else:
                down.lines += 1
                down.last_failure = now
                if now - down.last_line < SUMMARY_EVERY_S:
                    return
                line, down.last_line = "kafka_broker_still_unreachable", now
                extra = {"down_for_s": round(now - down.since), "lines_held": down.lines}
                down.lines = 0
        log.warning(line, broker=broker, error=_message(record), **extra)

    def _warning_due(self, kind: str) -> bool:
        now = self.clock()
        with self._lock:
            last, held = self._kinds.get(kind, (-SUMMARY_EVERY_S, 0))
            if now - last < SUMMARY_EVERY_S:
                self._kinds[kind] = (last, held + 1)
                return False
            self._kinds[kind] = (now, 0)
        if held:
            log.warning("kafka_client_warnings_held", kind=kind, lines_held=held)
        return True

    # ---- recovery and state --------------------------------------------------------

    def watch(self, client: Any) -> None:
        """Take ``client`` (an aiokafka AIOKafkaClient) as a witness of which brokers answer."""
        if client is not None:
            self._clients.add(client)

    def connected(self) -> set[str]:
        """Brokers (node ids) a watched client holds an open connection to."""
        out: set[str] = set()
        for client in list(self._clients):
            for key, conn in list(getattr(client, "_conns", {}).items()):
                node = key[0] if isinstance(key, tuple) else key
                connected = getattr(conn, "connected", None)
                if callable(connected) and connected():
                    out.add(str(node))
        return out

    def known(self) -> set[str]:
        """Brokers in the watched clients' cluster metadata."""
        out: set[str] = set()
        for client in list(self._clients):
            cluster = getattr(client, "cluster", None)
            for broker in cluster.brokers() if cluster is not None else ():
                out.add(str(broker.nodeId))
        return out

    def refresh(self) -> dict[str, bool]:
        """Clear the brokers that are back; every known broker and whether it is reachable."""
        now = self.clock()
        connected = self.connected()
        back: list[tuple[str, _Down]] = []
        with self._lock:
            named = self.known() | connected | set(self.down)
            for broker, down in list(self.down.items()):
                if broker in connected or now - down.last_failure >= QUIET_S:
                    back.append((broker, self.down.pop(broker)))
            state = {b: b not in self.down for b in named}
        for broker, down in back:
            log.info(
                "kafka_broker_reachable",
                broker=broker,
                down_for_s=round(now - down.since),
                lines_held=down.lines,
            )
        state.pop(CLUSTER, None)
        return state


def template_has_port(template: str) -> bool:
    return template.startswith(('Unable connect to "', 'Unable to request metadata from "'))


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()[:300]
    except (TypeError, ValueError):
        return str(record.msg)[:300]


BROKERS = BrokerLog()


def install(handlers: Iterable[logging.Handler]) -> None:
    """Put the process's BrokerLog on ``handlers`` (the handlers of the root logger)."""
    for handler in handlers:
        if BROKERS not in handler.filters:
            handler.addFilter(BROKERS)
