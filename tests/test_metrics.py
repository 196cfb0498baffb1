"""The metrics as exported: names, types, help texts, bounded label sets, zeros at start.

What Prometheus and the dashboard see is the exposition text of ``/metrics``, so the
checks read that text (prometheus_client's own parser) rather than the Python objects.
A second guard reads the service's source: every ``.labels(...)`` call either passes
a value from the declared sets or is listed below with the reason its values are
bounded.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from service import __version__
from service.errors import CONNECTION_ERROR_REASONS, RequestRejected
from service.metrics import (
    API_CODES,
    API_ENDPOINTS,
    BATCH_OUTCOMES,
    DLQ_REASONS,
    FINGERPRINT_LOAD_OUTCOMES,
    INVALID_INPUT,
    KAFKA_CONNECTION_ERROR_REASONS,
    POLL_RESULTS,
    PUBLISH_ERROR_KINDS,
    SWEEP_OUTCOMES,
    TRACKING_REQUESTS,
    TRANSACTION_RESULTS,
    Metrics,
)
from service.records import ALL_STATUS_NAMES, PAGE_NOTES, InvalidRecord, parse_page, parse_record
from service.requests import MAX_REQUEST_BYTES, decode_request, reject_reason
from service.state import FINAL

SERVICE = Path(__file__).resolve().parents[1] / "service"
PREFIX = "rightfoot_poller_"

# Every metric (as named in the exposition), its type and its label names: the whole
# label space. No label may carry a batch ID, a record field or any other open value.
EXPECTED: dict[str, tuple[str, tuple[str, ...]]] = {
    "rightfoot_poller_build_info": ("gauge", ("version", "python")),
    "rightfoot_poller_ready": ("gauge", ()),
    "rightfoot_poller_tracked_batches": ("gauge", ()),
    "rightfoot_poller_owned_partitions": ("gauge", ()),
    "rightfoot_poller_api_requests_total": ("counter", ("endpoint", "code")),
    "rightfoot_poller_api_request_duration_seconds": ("histogram", ("endpoint",)),
    "rightfoot_poller_polls_total": ("counter", ("result",)),
    "rightfoot_poller_records_published_total": ("counter", ("balance_status",)),
    "rightfoot_poller_batches_finished_total": ("counter", ("outcome",)),
    "rightfoot_poller_publish_errors_total": ("counter", ("kind",)),
    "rightfoot_poller_transactions_total": ("counter", ("result",)),
    "rightfoot_poller_publish_latency_seconds": ("histogram", ()),
    "rightfoot_poller_records_in_flight": ("gauge", ()),
    "rightfoot_poller_records_held": ("gauge", ()),
    "rightfoot_poller_dlq_records_total": ("counter", ("reason",)),
    "rightfoot_poller_invalid_input_total": ("counter", ("source", "reason")),
    "rightfoot_poller_oldest_overdue_poll_seconds": ("gauge", ()),
    "rightfoot_poller_batches_in_backoff": ("gauge", ()),
    "rightfoot_poller_batches_unreadable": ("gauge", ()),
    "rightfoot_poller_kafka_broker_reachable": ("gauge", ("broker",)),
    "rightfoot_poller_api_unauthorized": ("gauge", ()),
    "rightfoot_poller_poll_lateness_seconds": ("histogram", ()),
    "rightfoot_poller_event_loop_lag_seconds": ("histogram", ()),
    "rightfoot_poller_tracking_requests_total": ("counter", ("action", "result")),
    "rightfoot_poller_kafka_connection_errors_total": ("counter", ("reason",)),
    "rightfoot_poller_sweeps_total": ("counter", ("outcome",)),
    "rightfoot_poller_sweep_records_total": ("counter", ()),
    "rightfoot_poller_records_relisted_total": ("counter", ()),
    "rightfoot_poller_sweep_pages_total": ("counter", ()),
    "rightfoot_poller_records_behind": ("gauge", ()),
    "rightfoot_poller_state_bytes_total": ("counter", ()),
    "rightfoot_poller_fingerprints_held": ("gauge", ()),
    "rightfoot_poller_fingerprint_loads_total": ("counter", ("outcome",)),
    "rightfoot_poller_finished_batches": ("gauge", ()),
    "rightfoot_poller_batches_forgotten_total": ("counter", ("outcome",)),
    "rightfoot_poller_memory_limit_bytes": ("gauge", ()),
}
# prometheus_client's standard process series (Linux), which the memory alert reads.
PROCESS: dict[str, tuple[str, tuple[str, ...]]] = {
    "process_resident_memory_bytes": ("gauge", ()),
    "process_virtual_memory_bytes": ("gauge", ()),
    "process_start_time_seconds": ("gauge", ()),
    "process_cpu_seconds_total": ("counter", ()),
    "process_open_fds": ("gauge", ()),
    "process_max_fds": ("gauge", ()),
}

# What the contract ("Operating it") requires, with the labels it names.
CONTRACT: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "tracked batches": ("rightfoot_poller_tracked_batches", "gauge", ()),
    "API requests by endpoint and status": (
        "rightfoot_poller_api_requests_total",
        "counter",
        ("endpoint", "code"),
    ),
    "API request duration": (
        "rightfoot_poller_api_request_duration_seconds",
        "histogram",
        ("endpoint",),
    ),
    "records published by balance_status": (
        "rightfoot_poller_records_published_total",
        "counter",
        ("balance_status",),
    ),
    "batches finished by outcome": (
        "rightfoot_poller_batches_finished_total",
        "counter",
        ("outcome",),
    ),
    "publish errors": ("rightfoot_poller_publish_errors_total", "counter", ("kind",)),
    "age of the most overdue poll": (
        "rightfoot_poller_oldest_overdue_poll_seconds",
        "gauge",
        (),
    ),
    # The producer figures worth graphing, and a build_info.
    "records in flight": ("rightfoot_poller_records_in_flight", "gauge", ()),
    "transaction commits and aborts": (
        "rightfoot_poller_transactions_total",
        "counter",
        ("result",),
    ),
    "publish latency": ("rightfoot_poller_publish_latency_seconds", "histogram", ()),
    "build info": ("rightfoot_poller_build_info", "gauge", ("version", "python")),
}

# Label values present (at 0) before anything happened.
INITIAL: dict[str, set[tuple[str, ...]]] = {
    "rightfoot_poller_api_requests_total": {(e, c) for e in API_ENDPOINTS for c in API_CODES},
    "rightfoot_poller_api_request_duration_seconds": {(e,) for e in API_ENDPOINTS},
    "rightfoot_poller_polls_total": {(r,) for r in POLL_RESULTS},
    "rightfoot_poller_records_published_total": {(s,) for s in ALL_STATUS_NAMES},
    "rightfoot_poller_batches_finished_total": {(o,) for o in BATCH_OUTCOMES},
    "rightfoot_poller_batches_forgotten_total": {(o,) for o in BATCH_OUTCOMES},
    "rightfoot_poller_sweeps_total": {(o,) for o in SWEEP_OUTCOMES},
    "rightfoot_poller_fingerprint_loads_total": {(o,) for o in FINGERPRINT_LOAD_OUTCOMES},
    "rightfoot_poller_publish_errors_total": {(k,) for k in PUBLISH_ERROR_KINDS},
    "rightfoot_poller_transactions_total": {(r,) for r in TRANSACTION_RESULTS},
    "rightfoot_poller_dlq_records_total": {(r,) for r in DLQ_REASONS},
    "rightfoot_poller_invalid_input_total": set(INVALID_INPUT),
    "rightfoot_poller_tracking_requests_total": set(TRACKING_REQUESTS),
    "rightfoot_poller_kafka_connection_errors_total": {
        (r,) for r in KAFKA_CONNECTION_ERROR_REASONS
    },
}

# The `.labels(...)` arguments in service/ that are not string literals, and why the
# values they can take are a small closed set. Keyed by (metric attribute, source text).
NON_LITERAL_LABELS: dict[tuple[str, str], str] = {
    ("api_requests", "endpoint"): "the literal 'balances' passed by fetch_page",
    ("api_requests", "code"): "an HTTP status (100-599), timeout, connection_error or error",
    ("api_duration", "endpoint"): "the literal 'balances' passed by fetch_page",
    ("api_requests", "ENDPOINT"): "export.ENDPOINT = 'export' (the export CLI)",
    ("api_duration", "ENDPOINT"): "export.ENDPOINT = 'export' (the export CLI)",
    ("invalid_input", "reject_reason(exc)"): "requests.reject_reason: four values, tested below",
    ("invalid_input", "reason"): (
        "InvalidRecord.reason, one of DLQ_REASONS; requests.reject_reason; or one of the "
        "three state_topic reasons of tracker.state_unreadable, two of them (no_key, "
        "invalid_state) also of partitions._BadKeys (all tested below)"
    ),
    ("invalid_input", "note"): "a key of Page.notes, one of records.PAGE_NOTES (tested below)",
    ("dlq_records", "reason"): "InvalidRecord.reason, one of DLQ_REASONS (tested below)",
    ("records_published", "status"): "BalanceRecord.balance_status, one of ALL_STATUS_NAMES",
    ("batches_finished", "b.status"): "a final Status of state.py (BATCH_OUTCOMES)",
    ("batches_forgotten", "status"): "a finished batch's Status (BATCH_OUTCOMES): forgettable",
    ("requests_received", "req.action"): "TrackingRequest.action: Literal['track', 'stop']",
    (
        "publish_errors",
        '"fenced" if fenced else type(exc).__name__',
    ): "'fenced' or the class name of the exception a Kafka commit raised",
    ("kafka_broker_reachable", "broker"): (
        "a broker's node id from the cluster's metadata, or a bootstrap address: as many as "
        "the cluster has brokers"
    ),
    ("kafka_connection_errors", "reason"): (
        "kafka_clients.classify_connection_error: a Literal of four"
    ),
    ("sweeps", "sweep.outcome"): "policy.Policy.after_read: one of SWEEP_OUTCOMES",
    ("requests_received", "step.note"): "policy.Policy.track: one of policy.TRACK_NOTES",
    ("requests_received", "result"): "the literal 'stopped' or 'not_tracked'",
}
# Metric attribute -> the label values a string literal may have, per label position.
DECLARED: dict[str, list[set[str]]] = {
    "api_requests": [set(API_ENDPOINTS), set(API_CODES)],
    "polls": [set(POLL_RESULTS)],
    "batches_finished": [set(BATCH_OUTCOMES)],
    "batches_forgotten": [set(BATCH_OUTCOMES)],
    "sweeps": [set(SWEEP_OUTCOMES)],
    "fingerprint_loads": [set(FINGERPRINT_LOAD_OUTCOMES)],
    "publish_errors": [set(PUBLISH_ERROR_KINDS)],
    "transactions": [set(TRANSACTION_RESULTS)],
    "dlq_records": [set(DLQ_REASONS)],
    "invalid_input": [{s for s, _ in INVALID_INPUT}, {r for _, r in INVALID_INPUT}],
    "requests_received": [{a for a, _ in TRACKING_REQUESTS}, {r for _, r in TRACKING_REQUESTS}],
}


def exposition() -> dict[str, Metric]:
    text = generate_latest(Metrics().registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def exposition_text() -> str:
    return generate_latest(Metrics().registry).decode()


def family_key(family: Metric) -> str:
    """The name a query uses: counters with their _total suffix."""
    return f"{family.name}_total" if family.type == "counter" else family.name


def test_names_types_help_and_label_names() -> None:
    families = {family_key(f): f for f in exposition().values()}
    expected = {**EXPECTED, **PROCESS}
    assert set(families) == set(expected), (
        f"unexpected: {set(families) - set(expected)}, missing: {set(expected) - set(families)}"
    )
    for name, family in families.items():
        kind, labels = expected[name]
        assert name.startswith(PREFIX) or name in PROCESS, name
        assert family.type == kind, (name, family.type)
        help_text = family.documentation
        assert help_text and len(help_text.strip()) > 10, (name, help_text)
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == set(labels), (sample.name, sample.labels)
            assert not {"batch_id", "authorizer_unique_id", "instance_id"} & set(sample.labels)


def test_counters_end_in_total_and_no_created_series() -> None:
    text = exposition_text()
    for line in text.splitlines():
        if line.startswith("# TYPE ") and line.endswith(" counter"):
            assert line.split()[2].endswith("_total"), line
    samples = [line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"]
    assert all(s.startswith(PREFIX) or s in PROCESS for s in samples)
    assert not [s for s in samples if s.endswith("_created")], "one _created series per series"
    counters = [f for f in exposition().values() if f.type == "counter"]
    for family in counters:
        for sample in family.samples:
            assert sample.name.endswith("_total"), sample.name


def test_build_info_names_version_and_python() -> None:
    import platform

    (sample,) = exposition()["rightfoot_poller_build_info"].samples
    assert sample.labels == {"version": __version__, "python": platform.python_version()}
    assert sample.value == 1


@pytest.mark.parametrize("what", sorted(CONTRACT))
def test_contract_metric_exists(what: str) -> None:
    name, kind, labels = CONTRACT[what]
    assert EXPECTED[name] == (kind, labels), what


def test_every_known_label_value_starts_at_zero() -> None:
    families = {family_key(f): f for f in exposition().values()}
    for name, wanted in INITIAL.items():
        family = families[name]
        label_names = EXPECTED[name][1]
        present = {
            tuple(s.labels[n] for n in label_names)
            for s in family.samples
            if not s.name.endswith("_bucket")
        }
        assert present == wanted, (name, present ^ wanted)
        for sample in family.samples:
            assert sample.value == 0, (sample.name, sample.labels, sample.value)
    # Gauges and histograms without labels are there at 0 too.
    for name in (
        "rightfoot_poller_api_unauthorized",
        "rightfoot_poller_tracked_batches",
        "rightfoot_poller_records_in_flight",
        "rightfoot_poller_records_held",
        "rightfoot_poller_oldest_overdue_poll_seconds",
    ):
        assert [s.value for s in families[name].samples] == [0]
    assert families["rightfoot_poller_publish_latency_seconds"].samples


def test_declared_values_match_the_code_that_produces_them() -> None:
    assert set(BATCH_OUTCOMES) == FINAL
    bad_records: list[object] = [
        [1, 2],
        {"balance": 1},
        {"authorizer_unique_id": "a", "balance": "x", "timestamp": "2024-01-01T00:00:00Z"},
        {"authorizer_unique_id": "a", "balance": 1, "timestamp": "yesterday", "status_code": 0},
        {"authorizer_unique_id": "a", "balance": 1, "timestamp": "2024-01-01T00:00:00Z"},
    ]
    reasons = set()
    for item in bad_records:
        parsed = parse_record("b-1", item)
        assert isinstance(parsed, InvalidRecord), item
        reasons.add(parsed.reason)
    assert reasons == set(DLQ_REASONS)
    assert set(KAFKA_CONNECTION_ERROR_REASONS) == set(CONNECTION_ERROR_REASONS)
    rejects = set()
    for body in (None, b"{", b'{"batch_id": 3}', b" " * (MAX_REQUEST_BYTES + 1)):
        with pytest.raises(RequestRejected) as info:
            decode_request(body)
        rejects.add(reject_reason(info.value))
    assert len(rejects) == 4
    assert {(s, r) for s in ("requests_topic", "http") for r in rejects} <= set(INVALID_INPUT)
    assert {("state_topic", r) for r in ("no_key", "unknown_version", "invalid_state")} <= set(
        INVALID_INPUT
    )
    notes: set[str] = set()
    for odd in (b'{"balances": [], "has_more": true}', b'{"balances": [], "total_processed": -1}'):
        notes.update(parse_page("b-1", odd).notes)
    assert notes == set(PAGE_NOTES)
    assert {("api", n) for n in PAGE_NOTES} <= set(INVALID_INPUT)


def label_calls() -> list[tuple[str, str, list[ast.expr], str]]:
    """(file, metric attribute, args, source) of every `<x>.<metric>.labels(...)` in service/."""
    calls = []
    for path in sorted(SERVICE.glob("*.py")):
        if path.name == "metrics.py":
            continue
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "labels"
                and isinstance(node.func.value, ast.Attribute)
            ):
                calls.append((path.name, node.func.value.attr, node.args, source))
    return calls


def test_label_values_come_from_bounded_sets() -> None:
    calls = label_calls()
    assert len(calls) > 20
    used_exceptions = set()
    for filename, metric, args, source in calls:
        assert not any(isinstance(a, ast.Starred) for a in args), (filename, metric)
        for position, arg in enumerate(args):
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                assert metric in DECLARED, f"{filename}: {metric} has no declared label values"
                assert arg.value in DECLARED[metric][position], (
                    f"{filename}: {metric} label {arg.value!r} is not declared in "
                    "service/metrics.py (add it there, so it is exported at 0 from the start)"
                )
                continue
            text = ast.get_source_segment(source, arg)
            key = (metric, str(text))
            assert key in NON_LITERAL_LABELS, (
                f"{filename}: {metric}.labels({text}) - a computed label value; declare why "
                "its values are bounded in NON_LITERAL_LABELS"
            )
            used_exceptions.add(key)
    assert set(NON_LITERAL_LABELS) == used_exceptions, (
        f"stale entries: {set(NON_LITERAL_LABELS) - used_exceptions}"
    )
