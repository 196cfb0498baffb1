"""Every metric the service exports, in one place.

Names start with ``rightfoot_poller_``, beside the standard ``process_*`` series of
prometheus_client (resident memory, CPU, open file descriptors); label values come from
small fixed sets (HTTP codes, status names, outcomes), never from batch IDs or record
contents.

Every label value known in advance is exported at 0 from the start, so a
dashboard shows zero instead of nothing and ``increase()``/``rate()`` see the
first event (a series that appears with value 1 has no increase to Prometheus).
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client import disable_created_metrics as _disable_created_metrics

from service import __version__
from service.records import ALL_STATUS_NAMES, PAGE_NOTES

PREFIX = "rightfoot_poller"

# No ``*_created`` series next to every counter and histogram: they would double the
# number of series (every label value below is pre-initialised) and nothing reads them.
_disable_created_metrics()  # type: ignore[no-untyped-call]

# The label values known in advance (pre-initialised at 0). Other values may still
# appear (an HTTP status the API is not documented to send, an exception class name as
# a publish error kind), but every label comes from a small, closed set of such values.
API_ENDPOINTS: tuple[str, ...] = ("balances",)  # "export" is used by the export CLI only
API_CODES: tuple[str, ...] = (
    "200",
    "400",
    "401",
    "403",
    "404",
    "429",
    "500",
    "502",
    "503",
    "504",
    "timeout",
    "connection_error",
)
POLL_RESULTS: tuple[str, ...] = ("ok", "error", "not_found", "unauthorized", "publish_failed")
BATCH_OUTCOMES: tuple[str, ...] = ("completed", "expired", "failed", "stopped")
# What a sweep (a read of a whole batch again, because the API's count says records
# are missing) came to: it found them all, found some, or found none.
SWEEP_OUTCOMES: tuple[str, ...] = ("reconciled", "partial", "nothing")
# Reads of a batch's fingerprints back from the state topic, when it is tracked again:
# done; the commit that tracked it again not yet visible (read again shortly); Kafka failed.
FINGERPRINT_LOAD_OUTCOMES: tuple[str, ...] = ("loaded", "not_visible", "failed")
TRANSACTION_RESULTS: tuple[str, ...] = ("commit", "abort")
# "connect": the broker could not be reached at start; "fenced": another replica took
# the partition over; any other failure is counted under its exception class name.
PUBLISH_ERROR_KINDS: tuple[str, ...] = ("connect", "fenced")
DLQ_REASONS: tuple[str, ...] = (
    "not_an_object",
    "missing_authorizer_unique_id",
    "invalid_balance",
    "invalid_field",
)
_REQUEST_REJECTS = ("invalid_json", "empty", "invalid_field")
INVALID_INPUT: tuple[tuple[str, str], ...] = (
    *(
        ("api", r)
        for r in (
            *DLQ_REASONS,
            "malformed_page",
            "page_token_rejected",
            "page_token_loop",
            "empty_pages",
            "retry_after",
            *PAGE_NOTES,
            "page_failing",
        )
    ),
    *(("requests_topic", r) for r in (*_REQUEST_REJECTS, "too_large")),
    *(("state_topic", r) for r in ("no_key", "invalid_state", "unknown_version")),
    *(
        ("http", r)
        for r in (
            "unauthorized",
            "content_type",
            "too_large",
            "malformed_http",
            "bad_query",
            *_REQUEST_REJECTS,
        )
    ),
)
TRACKING_REQUESTS: tuple[tuple[str, str], ...] = (
    *(
        ("track", r)
        for r in (
            "started",
            "updated",
            "already_tracked",
            "already_finished",
            "forwarded",
            "unreadable",
        )
    ),
    *(("stop", r) for r in ("stopped", "not_tracked", "forwarded", "unreadable")),
)

# Why a connection to Kafka failed (service.kafka_clients.classify_connection_error).
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
        # The standard process_* series (resident memory, CPU, file descriptors).
        ProcessCollector(registry=r)
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
            "connection_error, error).",
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
        self.records_held = Gauge(
            f"{PREFIX}_records_held",
            "Records read from the API and not yet committed, with room for pages being "
            "read (at most polling.max_records_in_flight, or one page).",
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
        self.batches_unreadable = Gauge(
            f"{PREFIX}_batches_unreadable",
            "Batches of owned partitions whose stored state this version cannot read: "
            "not polled, their requests refused, their state left as it is.",
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
        self.sweeps = Counter(
            f"{PREFIX}_sweeps",
            "Reads of a whole batch from its first page because the API's count "
            "(total_processed) was ahead of the records seen, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.sweep_records = Counter(
            f"{PREFIX}_sweep_records",
            "Records found by sweeps: listed behind the cursor after it had passed them.",
            registry=r,
        )
        self.records_relisted = Counter(
            f"{PREFIX}_records_relisted",
            "Balance events of records the API listed again with new content (a correction "
            "in place, or a record listed twice): published, not counted as new records.",
            registry=r,
        )
        self.sweep_pages = Counter(
            f"{PREFIX}_sweep_pages",
            "Pages read by sweeps (each one API request that succeeded).",
            registry=r,
        )
        self.records_behind = Gauge(
            f"{PREFIX}_records_behind",
            "Records the API counts (total_processed) that tracked batches have not seen.",
            registry=r,
        )
        self.fingerprints_held = Gauge(
            f"{PREFIX}_fingerprints_held",
            "Fingerprints held in memory for the batches of this replica's partitions (one "
            "or two per record seen, 10 to 16 bytes each): the memory that grows with them.",
            registry=r,
        )
        self.fingerprint_loads = Counter(
            f"{PREFIX}_fingerprint_loads",
            "Reads of a batch's fingerprints back from the state topic, by outcome: a batch "
            "stopped or failed holds none in memory until it is tracked again.",
            ["outcome"],
            registry=r,
        )
        self.finished_batches = Gauge(
            f"{PREFIX}_finished_batches",
            "Finished batches (completed, expired, failed, stopped) this replica's partitions "
            "still keep: each is forgotten polling.finished_retention_s after it finished.",
            registry=r,
        )
        self.batches_forgotten = Counter(
            f"{PREFIX}_batches_forgotten",
            "Finished batches forgotten once kept polling.finished_retention_s (their state "
            "tombstoned), by how they had finished.",
            ["outcome"],
            registry=r,
        )
        self.memory_limit = Gauge(
            f"{PREFIX}_memory_limit_bytes",
            "The memory limit of the replica's container (its cgroup), 0 when none is set. "
            "Its resident memory is process_resident_memory_bytes.",
            registry=r,
        )
        self.state_bytes = Counter(
            f"{PREFIX}_state_bytes",
            "Bytes (keys and values) written to the state topic.",
            registry=r,
        )
        self.kafka_broker_reachable = Gauge(
            f"{PREFIX}_kafka_broker_reachable",
            "Whether each Kafka broker answers this replica (1) or has been failing (0); "
            "brokers by node id, or by bootstrap address before the first metadata.",
            ["broker"],
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
        self._initialise_labels()

    def _initialise_labels(self) -> None:
        """Export every known label value at 0 (see the module docstring)."""
        for endpoint in API_ENDPOINTS:
            self.api_duration.labels(endpoint)
            for code in API_CODES:
                self.api_requests.labels(endpoint, code)
        for result in POLL_RESULTS:
            self.polls.labels(result)
        for status in ALL_STATUS_NAMES:
            self.records_published.labels(status)
        for outcome in BATCH_OUTCOMES:
            self.batches_finished.labels(outcome)
            self.batches_forgotten.labels(outcome)
        for outcome in SWEEP_OUTCOMES:
            self.sweeps.labels(outcome)
        for outcome in FINGERPRINT_LOAD_OUTCOMES:
            self.fingerprint_loads.labels(outcome)
        for kind in PUBLISH_ERROR_KINDS:
            self.publish_errors.labels(kind)
        for result in TRANSACTION_RESULTS:
            self.transactions.labels(result)
        for reason in DLQ_REASONS:
            self.dlq_records.labels(reason)
        for source, reason in INVALID_INPUT:
            self.invalid_input.labels(source, reason)
        for action, result in TRACKING_REQUESTS:
            self.requests_received.labels(action, result)
        self.api_unauthorized.set(0)
