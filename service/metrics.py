"""Every metric the service exports, in one place.

Names start with ``rightfoot_poller_``; label values come from small fixed sets
(HTTP codes, status names, outcomes), never from batch IDs or record contents.
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service import __version__

PREFIX = "rightfoot_poller"

# Why a connection to Kafka failed (service.kafka.classify_connection_error).
KAFKA_CONNECTION_ERROR_REASONS: tuple[str, ...] = (
    "authentication",
    "authorization",
    "tls",
    "unreachable",
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    """The service's metrics, registered in the registry passed in."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.build_info = Gauge(
            f"{PREFIX}_build_info",
            "Version of the running service.",
            ["version", "python"],
            registry=r,
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.ready = Gauge(f"{PREFIX}_ready", "1 when /readyz answers 200.", registry=r)
        self.tracked_batches = Gauge(
            f"{PREFIX}_tracked_batches", "Batches this replica is tracking now.", registry=r
        )
        self.owned_partitions = Gauge(
            f"{PREFIX}_owned_partitions",
            "Requests-topic partitions this replica owns and has restored.",
            registry=r,
        )
        self.api_requests = Counter(
            f"{PREFIX}_api_requests",
            "Requests to the Rightfoot API by endpoint and HTTP status (or timeout, "
            "connection_error, malformed).",
            ["endpoint", "code"],
            registry=r,
        )
        self.api_duration = Histogram(
            f"{PREFIX}_api_request_duration_seconds",
            "Duration of requests to the Rightfoot API.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.polls = Counter(
            f"{PREFIX}_polls", "Polls of a batch by result.", ["result"], registry=r
        )
        self.records_published = Counter(
            f"{PREFIX}_records_published",
            "Balance events published (committed), by balance_status.",
            ["balance_status"],
            registry=r,
        )
        self.batches_finished = Counter(
            f"{PREFIX}_batches_finished", "Batches finished, by outcome.", ["outcome"], registry=r
        )
        self.publish_errors = Counter(
            f"{PREFIX}_publish_errors",
            "Failures to publish to Kafka, by kind.",
            ["kind"],
            registry=r,
        )
        self.transactions = Counter(
            f"{PREFIX}_transactions",
            "Kafka transactions (or at-least-once publish rounds) by result.",
            ["result"],
            registry=r,
        )
        self.publish_latency = Histogram(
            f"{PREFIX}_publish_latency_seconds",
            "From a page being received to its events being committed in Kafka.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.records_in_flight = Gauge(
            f"{PREFIX}_records_in_flight",
            "Events handed to the producer and not yet committed.",
            registry=r,
        )
        self.dlq_records = Counter(
            f"{PREFIX}_dlq_records",
            "Records sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=r,
        )
        self.invalid_input = Counter(
            f"{PREFIX}_invalid_input",
            "Input rejected, by source (api, requests_topic, state_topic, http) and reason.",
            ["source", "reason"],
            registry=r,
        )
        self.oldest_overdue_poll = Gauge(
            f"{PREFIX}_oldest_overdue_poll_seconds",
            "How late the most overdue poll is, in seconds (0 when none is late).",
            registry=r,
        )
        self.batches_in_backoff = Gauge(
            f"{PREFIX}_batches_in_backoff",
            "Batches whose next poll is delayed by backoff after errors.",
            registry=r,
        )
        self.api_unauthorized = Gauge(
            f"{PREFIX}_api_unauthorized",
            "1 while the API rejects the API key (polling paused).",
            registry=r,
        )
        self.poll_lateness = Histogram(
            f"{PREFIX}_poll_lateness_seconds",
            "How long after its scheduled time a poll started.",
            buckets=(*_LAG_BUCKETS, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.loop_lag = Histogram(
            f"{PREFIX}_event_loop_lag_seconds",
            "Delay of the event loop in running a scheduled callback.",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.requests_received = Counter(
            f"{PREFIX}_tracking_requests",
            "Tracking requests handled, by action and result.",
            ["action", "result"],
            registry=r,
        )
        self.kafka_connection_errors = Counter(
            f"{PREFIX}_kafka_connection_errors",
            "Failed attempts to connect to Kafka, by reason (authentication, authorization, "
            "tls, unreachable).",
            ["reason"],
            registry=r,
        )
        for reason in KAFKA_CONNECTION_ERROR_REASONS:
            self.kafka_connection_errors.labels(reason)
