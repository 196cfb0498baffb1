"""The published event format: JSON Schemas, AsyncAPI document, validators, consumer example."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, cast

import eventschema
import pytest
import yaml
from eventschema import Kind
from jsonschema import Draft7Validator, Draft202012Validator, ValidationError, validators

REPO = Path(__file__).resolve().parent.parent
ASYNCAPI = REPO / "docs" / "asyncapi.yaml"
VALIDATE_SCRIPT = REPO / "scripts" / "asyncapi-validate.sh"
KINDS: tuple[Kind, ...] = ("balance", "batch", "dlq", "request")
STATUS_CODES = {
    "SUCCESS": 0,
    "NO_TAX_ID_MATCH": 3000,
    "NO_SSN_MATCH": 3001,
    "NO_DOB_MATCH": 3100,
    "ACCOUNT_CLOSED": 3200,
    "INSTITUTION_NOT_SUPPORTED": 3300,
    "INSTITUTION_IN_TESTING": 3310,
    "NO_AUTHORIZER_MATCH": 3400,
    "OTHER_ERROR": 9000,
}
# Keywords that mean the same in JSON Schema draft-07 and 2020-12: the AsyncAPI document
# declares the schemas as draft-07 (what the official parser supports).
PORTABLE_KEYWORDS = {
    "$schema", "$id", "$comment", "title", "description", "examples", "default",
    "type", "enum", "const", "format", "pattern", "minLength", "maxLength", "minimum",
    "maximum", "required", "properties", "additionalProperties", "propertyNames",
    "allOf", "anyOf", "oneOf", "not", "if", "then", "else",
}  # fmt: skip
SUBSCHEMA_MAPS = {"properties"}
SUBSCHEMA_LISTS = {"allOf", "anyOf", "oneOf"}
SUBSCHEMAS = {"additionalProperties", "propertyNames", "not", "if", "then", "else"}


def example(kind: Kind, index: int = 0, /, **changes: Any) -> dict[str, Any]:
    """A copy of a schema example with fields changed (a value of ... removes the field)."""
    doc: dict[str, Any] = copy.deepcopy(eventschema.load_schema(kind)["examples"][index])
    for key, value in changes.items():
        if value is ...:
            doc.pop(key)
        else:
            doc[key] = value
    return doc


def walk(schema: Any, where: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (sub)schema object, with its location."""
    if not isinstance(schema, dict):
        return
    yield where, schema
    for key, value in schema.items():
        if key in SUBSCHEMA_MAPS:
            for name, sub in value.items():
                yield from walk(sub, f"{where}/{key}/{name}")
        elif key in SUBSCHEMA_LISTS:
            for i, sub in enumerate(value):
                yield from walk(sub, f"{where}/{key}/{i}")
        elif key in SUBSCHEMAS:
            yield from walk(value, f"{where}/{key}")


def draft07(kind: Kind) -> Any:
    schema = {k: v for k, v in eventschema.load_schema(kind).items() if k != "$schema"}
    cls = validators.extend(  # type: ignore[no-untyped-call]  # untyped in jsonschema's stubs
        Draft7Validator, validators={"pattern": eventschema.ecma_pattern}
    )
    return cls(schema, format_checker=eventschema.FORMAT_CHECKER)


# --- the schema files -----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_schema_is_valid_json_schema_2020_12_and_draft_07(kind: Kind) -> None:
    schema = eventschema.load_schema(kind)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    Draft7Validator.check_schema({k: v for k, v in schema.items() if k != "$schema"})
    assert schema["$id"].startswith("urn:rightfoot-poller:schema:")
    assert schema["title"] and schema["description"] and schema["examples"]
    assert schema["type"] == "object"
    if kind == "request":  # the service rejects requests with unknown fields
        assert schema["additionalProperties"] is False
    else:
        assert schema["additionalProperties"] is True, "consumers must ignore unknown fields"
    for where, sub in walk(schema):
        unportable = set(sub) - PORTABLE_KEYWORDS
        assert not unportable, f"{kind} {where}: {unportable} differ in draft-07 or are unknown"
        assert "$ref" not in sub, f"{kind} {where}: keep the schemas self-contained"


def test_schema_ids_are_unique() -> None:
    ids = [eventschema.load_schema(kind)["$id"] for kind in KINDS]
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("kind", KINDS)
def test_schema_examples_are_valid_strictly_and_under_draft_07(kind: Kind) -> None:
    for doc in eventschema.load_schema(kind)["examples"]:
        assert eventschema.validate_event(kind, json.dumps(doc).encode()) == doc
        assert eventschema.validate_event(kind, doc, strict=False) is doc
        assert draft07(kind).is_valid(doc)


def test_balance_status_names_and_codes_are_the_documented_table() -> None:
    balance = eventschema.load_schema("balance")
    names = balance["properties"]["balance_status"]["enum"]
    assert names == [*STATUS_CODES, "UNKNOWN"]
    batch = eventschema.load_schema("batch")
    assert batch["properties"]["counts_by_status"]["propertyNames"]["enum"] == names
    rules = {
        rule["then"]["properties"]["balance_status"]["const"]: rule["if"]["properties"][
            "balance_status_code"
        ]
        for rule in balance["allOf"]
    }
    assert {name: rule["const"] for name, rule in rules.items() if "const" in rule} == STATUS_CODES
    assert sorted(rules["UNKNOWN"]["not"]["enum"]) == sorted(STATUS_CODES.values())


# --- good and bad events --------------------------------------------------------------

GOOD = [
    ("balance", example("balance", 1)),  # null balance
    ("balance", example("balance", balance="0")),
    ("balance", example("balance", balance="-0.5")),
    ("balance", example("balance", balance="100")),
    ("balance", example("balance", balance="00012.3400")),  # the digits as sent
    ("balance", example("balance", balance="98765432109876543.210000001")),
    ("balance", example("balance", balance_status_code=3001, balance_status="NO_SSN_MATCH")),
    ("balance", example("balance", balance_status_code=-7, balance_status="UNKNOWN")),
    ("balance", example("balance", balance_status_code=2**63, balance_status="UNKNOWN")),
    ("balance", example("balance", timestamp="2024-08-09T18:10:44.123456+02:00")),
    ("balance", example("balance", authorizer_unique_id="ß/ü 1")),
    ("batch", example("batch", 0, expected_count=None)),
    ("batch", example("batch", 1, reason="not needed but allowed")),
    ("batch", example("batch", 1, counts_by_status={})),
    ("batch", example("batch", 1, event="expired", reason="max_age_exceeded: tracked 7d")),
    ("batch", example("batch", 0, at="2024-08-09T17:50:02+00:00")),
    ("dlq", example("dlq", 1, reason="invalid_balance", raw="null")),
    ("request", {"batch_id": "a"}),
    ("request", {"batch_id": "A" * 128, "expected_count": 1, "action": "track"}),
    ("request", {"batch_id": "batch-1.v2:x_y", "action": "stop"}),
    ("request", {"batch_id": "a", "expected_count": None}),
    ("request", {"batch_id": "a", "expected_count": 100_000_000}),
]

# (case id, kind, value, fragment of the error message)
BAD: list[tuple[str, Kind, Any, str]] = [
    *(
        (f"balance-missing-{field}", "balance", example("balance", **{field: ...}), field)
        for field in eventschema.load_schema("balance")["required"]
    ),
    ("balance-exponent", "balance", example("balance", balance="1e5"), "$.balance"),
    ("balance-trailing-dot", "balance", example("balance", balance="12."), "$.balance"),
    ("balance-leading-dot", "balance", example("balance", balance=".5"), "$.balance"),
    ("balance-plus", "balance", example("balance", balance="+1.00"), "$.balance"),
    ("balance-grouping", "balance", example("balance", balance="1,000.00"), "$.balance"),
    ("balance-empty", "balance", example("balance", balance=""), "$.balance"),
    ("balance-space", "balance", example("balance", balance=" 12.5"), "$.balance"),
    ("balance-newline", "balance", example("balance", balance="12.5\n"), "$.balance"),
    ("balance-nan", "balance", example("balance", balance="NaN"), "$.balance"),
    ("balance-non-ascii-digits", "balance", example("balance", balance="١٢"), "$.balance"),
    ("balance-float", "balance", example("balance", balance=1.5), "not of type"),
    ("balance-integer", "balance", example("balance", balance=100), "not of type"),
    ("status-unknown-name", "balance", example("balance", balance_status="FOO"), "FOO"),
    ("status-lowercase", "balance", example("balance", balance_status="success"), "success"),
    (
        "status-does-not-name-code",
        "balance",
        example("balance", balance_status="NO_SSN_MATCH"),
        "must name balance_status_code 0",
    ),
    (
        "status-known-code-called-unknown",
        "balance",
        example("balance", balance_status_code=3310, balance_status="UNKNOWN"),
        "INSTITUTION_IN_TESTING",
    ),
    (
        "status-unknown-code-called-success",
        "balance",
        example("balance", balance_status_code=4242),
        "UNKNOWN",
    ),
    ("code-string", "balance", example("balance", balance_status_code="0"), "integer"),
    ("code-bool", "balance", example("balance", balance_status_code=False), "integer"),
    ("event-id-not-uuid", "balance", example("balance", event_id="abc"), "$.event_id"),
    (
        "event-id-uuid4",
        "balance",
        example("balance", event_id="0d7f4a3e-8f2b-4c41-9a6d-2e1b7c9f0a13"),
        "$.event_id",
    ),
    (
        "event-id-uppercase",
        "balance",
        example("balance", event_id="0D7F4A3E-8F2B-5C41-9A6D-2E1B7C9F0A13"),
        "$.event_id",
    ),
    (
        "timestamp-no-zone",
        "balance",
        example("balance", timestamp="2024-08-09T18:10:44"),
        "RFC 3339",
    ),
    (
        "timestamp-space",
        "balance",
        example("balance", timestamp="2024-08-09 18:10:44Z"),
        "RFC 3339",
    ),
    (
        "timestamp-month-13",
        "balance",
        example("balance", timestamp="2024-13-09T18:10:44Z"),
        "month",
    ),
    ("batch-id-empty", "balance", example("balance", batch_id=""), "$.batch_id"),
    ("authorizer-empty", "balance", example("balance", authorizer_unique_id=""), "authorizer"),
    ("authorizer-int", "balance", example("balance", authorizer_unique_id=1286672), "authorizer"),
    *(
        (f"batch-missing-{field}", "batch", example("batch", 1, **{field: ...}), field)
        for field in eventschema.load_schema("batch")["required"]
    ),
    *(
        (
            f"{event}-without-counts",
            "batch",
            example("batch", 3, event=event, counts_by_status=...),
            "counts_by_status",
        )
        for event in ("completed", "expired", "failed", "stopped")
    ),
    *(
        (f"{event}-without-reason", "batch", example("batch", 3, event=event, reason=...), "reason")
        for event in ("expired", "failed", "stopped")
    ),
    ("batch-unknown-event", "batch", example("batch", 0, event="started"), "$.event"),
    (
        "counts-unknown-status",
        "batch",
        example("batch", 1, counts_by_status={"SUCCES": 3}),
        "counts_by_status",
    ),
    (
        "counts-negative",
        "batch",
        example("batch", 1, counts_by_status={"SUCCESS": -1}),
        "counts_by_status",
    ),
    (
        "counts-float",
        "batch",
        example("batch", 1, counts_by_status={"SUCCESS": 2.5}),
        "counts_by_status",
    ),
    ("expected-count-zero", "batch", example("batch", 0, expected_count=0), "expected_count"),
    ("records-negative", "batch", example("batch", 0, records_published=-1), "records_published"),
    ("at-not-utc", "batch", example("batch", 0, at="2024-08-09T19:50:02+02:00"), "$.at"),
    ("reason-empty", "batch", example("batch", 2, reason=""), "$.reason"),
    *(
        (f"dlq-missing-{field}", "dlq", example("dlq", **{field: ...}), field)
        for field in eventschema.load_schema("dlq")["required"]
    ),
    ("dlq-reason-prose", "dlq", example("dlq", reason="Not an object"), "$.reason"),
    ("dlq-raw-empty", "dlq", example("dlq", raw=""), "$.raw"),
    ("dlq-raw-object", "dlq", example("dlq", raw={"a": 1}), "$.raw"),
    ("request-empty", "request", {}, "batch_id"),
    ("request-batch-id-empty", "request", {"batch_id": ""}, "$.batch_id"),
    ("request-batch-id-long", "request", {"batch_id": "A" * 129}, "$.batch_id"),
    ("request-batch-id-slash", "request", {"batch_id": "a/b"}, "$.batch_id"),
    ("request-batch-id-space", "request", {"batch_id": "a b"}, "$.batch_id"),
    ("request-batch-id-newline", "request", {"batch_id": "ab\n"}, "$.batch_id"),
    ("request-batch-id-int", "request", {"batch_id": 12}, "$.batch_id"),
    ("request-count-zero", "request", {"batch_id": "a", "expected_count": 0}, "expected_count"),
    ("request-count-negative", "request", {"batch_id": "a", "expected_count": -1}, "expected"),
    ("request-count-string", "request", {"batch_id": "a", "expected_count": "9"}, "expected"),
    ("request-count-huge", "request", {"batch_id": "a", "expected_count": 10**8 + 1}, "expected"),
    ("request-count-float", "request", {"batch_id": "a", "expected_count": 9.5}, "expected"),
    ("request-unknown-field", "request", {"batch_id": "a", "expectedCount": 9}, "expectedCount"),
    ("request-action-unknown", "request", {"batch_id": "a", "action": "pause"}, "$.action"),
]


@pytest.mark.parametrize(("kind", "doc"), GOOD, ids=[f"{k}-{i}" for i, (k, _) in enumerate(GOOD)])
def test_good_events_are_accepted(kind: Kind, doc: dict[str, Any]) -> None:
    assert eventschema.validate_event(kind, json.dumps(doc).encode()) == doc


@pytest.mark.parametrize(("kind", "doc", "fragment"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_events_are_rejected_clearly(kind: Kind, doc: Any, fragment: str) -> None:
    for strict in (True, False):
        with pytest.raises(ValidationError) as caught:
            eventschema.validate_event(kind, doc, strict=strict)
        message = caught.value.message
        assert message.startswith(f"{kind} event ({eventschema.SCHEMA_FILES[kind]})"), message
        assert fragment in message, message
    assert not draft07(kind).is_valid(doc), "draft-07 and 2020-12 readings must agree"


@pytest.mark.parametrize(
    ("kind", "doc"),
    [
        ("balance", example("balance", balance_status_code=0.0)),
        ("batch", example("batch", 1, records_published=3.0)),
        ("request", {"batch_id": "a", "expected_count": 9.0}),
        ("balance", example("balance", extra="new field")),
        ("batch", example("batch", 0, extra={"x": 1})),
        ("dlq", example("dlq", extra=None)),
    ],
)
def test_strict_mode_catches_drift_the_published_schema_allows(kind: Kind, doc: Any) -> None:
    assert eventschema.validate_event(kind, doc, strict=False) == doc
    with pytest.raises(ValidationError, match=r"integer|strict mode forbids fields"):
        eventschema.validate_event(kind, doc)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"\xff{}", "not UTF-8"),
        (b"{", "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"balance": NaN}', "NaN is not valid JSON"),
        (b"[]", "must be a JSON object, got list"),
        (b"null", "must be a JSON object, got NoneType"),
        (b'{"batch_id": "a", "batch_id": "b"}', "duplicate key 'batch_id'"),
    ],
)
def test_undecodable_values_are_rejected(raw: bytes, fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        eventschema.validate_event("request", raw)


def test_validate_event_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown event kind"):
        eventschema.validate_event(cast(Any, "balances"), {})


# --- headers and keys -----------------------------------------------------------------


def ce_headers(kind: Kind, doc: dict[str, Any], **changes: str | None) -> list[tuple[str, bytes]]:
    headers = {
        "ce_specversion": "1.0",
        "ce_id": doc["event_id"],
        "ce_type": {
            "balance": "com.rightfoot.balance.retrieved",
            "dlq": "com.rightfoot.balance.invalid",
        }.get(kind, f"com.rightfoot.batch.{doc.get('event')}"),
        "ce_source": "rightfoot-poller"
        if kind == "batch"
        else "https://api.rightfoot.com/v1/balances",
        "ce_time": doc["timestamp" if kind == "balance" else "at"],
        "ce_subject": doc["batch_id"],
        "content-type": "application/json",
    } | changes
    return [(name, value.encode()) for name, value in headers.items() if value is not None]


HEADER_CASES = [("balance", 0), ("balance", 1), ("batch", 0), ("batch", 1), ("batch", 2)]
HEADER_CASES += [("dlq", 0), ("dlq", 1)]


@pytest.mark.parametrize(("kind", "index"), HEADER_CASES)
def test_good_headers_and_keys_are_accepted(kind: Kind, index: int) -> None:
    doc = example(kind, index)
    key = (doc["authorizer_unique_id"] if kind == "balance" else doc["batch_id"]).encode()
    headers = ce_headers(kind, doc)
    eventschema.validate_headers(kind, headers, doc)
    eventschema.validate_headers(kind, (*headers, ("traceparent", b"00-ab")), doc)
    value = json.dumps(doc).encode()
    assert eventschema.validate_message(kind, key, value, headers) == doc


def test_ce_time_may_be_the_same_instant_written_differently() -> None:
    doc = example("batch", 1)  # at 2024-08-09T18:11:31.504Z
    headers = ce_headers("batch", doc, ce_time="2024-08-09T18:11:31.504000+00:00")
    eventschema.validate_headers("batch", headers, doc)


@pytest.mark.parametrize(
    ("kind", "changes", "fragment"),
    [
        ("balance", {"ce_specversion": "0.3"}, "ce_specversion"),
        ("balance", {"ce_id": "0d7f4a3e-8f2b-5c41-9a6d-2e1b7c9f0a14"}, "ce_id"),
        ("balance", {"ce_type": "com.rightfoot.balance.invalid"}, "ce_type"),
        ("dlq", {"ce_type": "com.rightfoot.balance.retrieved"}, "ce_type"),
        ("batch", {"ce_type": "com.rightfoot.batch.started"}, "ce_type"),
        ("batch", {"ce_source": "https://api.rightfoot.com/v1/balances"}, "ce_source"),
        ("balance", {"ce_source": "rightfoot-poller"}, "ce_source"),
        ("dlq", {"ce_source": "not a uri"}, "ce_source"),
        ("balance", {"ce_time": "yesterday"}, "ce_time"),
        ("balance", {"ce_time": "2024-08-09T18:10:45Z"}, "is not the timestamp"),
        ("batch", {"ce_time": "2024-08-09T18:11:31Z"}, "is not the at"),
        ("balance", {"ce_subject": "another-batch"}, "ce_subject"),
        ("dlq", {"ce_subject": None}, r"missing headers \['ce_subject'\]"),
        ("balance", {"content-type": "text/plain"}, "content-type"),
        (
            "batch",
            {"content-type": None, "ce_id": None},
            r"missing headers \['ce_id', 'content-type'\]",
        ),
    ],
)
def test_bad_headers_are_rejected(kind: Kind, changes: dict[str, Any], fragment: str) -> None:
    doc = example(kind, 1)
    with pytest.raises(ValidationError, match=rf"^{kind} event .*{fragment}"):
        eventschema.validate_headers(kind, ce_headers(kind, doc, **changes), doc)


def test_malformed_header_lists_are_rejected() -> None:
    doc = example("balance")
    good = ce_headers("balance", doc)
    with pytest.raises(ValidationError, match="'ce_id' appears more than once"):
        eventschema.validate_headers("balance", [*good, ("ce_id", doc["event_id"].encode())], doc)
    with pytest.raises(ValidationError, match="'ce_type' is not UTF-8"):
        eventschema.validate_headers("balance", [*good[:2], ("ce_type", b"\xff"), *good[3:]], doc)
    with pytest.raises(ValidationError, match="'ce_id' has no value"):
        eventschema.validate_headers("balance", [("ce_id", None)], doc)
    with pytest.raises(ValidationError, match="missing headers"):
        eventschema.validate_headers("balance", [], doc)


def test_expected_source_is_checked_exactly_when_given() -> None:
    doc = example("balance")
    headers = ce_headers("balance", doc, ce_source="http://127.0.0.1:8099/v1/balances")
    eventschema.validate_headers(
        "balance", headers, doc, source="http://127.0.0.1:8099/v1/balances"
    )
    with pytest.raises(ValidationError, match="ce_source"):
        eventschema.validate_headers(
            "balance", headers, doc, source="http://127.0.0.1:1/v1/balances"
        )


def test_requests_need_no_headers_but_a_content_type_must_be_json() -> None:
    doc = {"batch_id": "b1"}
    eventschema.validate_headers("request", [], doc)
    eventschema.validate_headers("request", [("content-type", b"application/json")], doc)
    with pytest.raises(ValidationError, match="content-type"):
        eventschema.validate_headers("request", [("content-type", b"text/plain")], doc)


@pytest.mark.parametrize(
    ("kind", "key"),
    [("balance", b"5d3c6bbb-fc1a-46a4-93da-1ce4a54b0d83"), ("batch", b"1286672"), ("dlq", None)],
)
def test_wrong_keys_are_rejected(kind: Kind, key: bytes | None) -> None:
    doc = example(kind)
    with pytest.raises(ValidationError, match="key is"):
        eventschema.validate_key(kind, key, doc)


# --- the AsyncAPI document ------------------------------------------------------------


@pytest.fixture(scope="module")
def asyncapi() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(ASYNCAPI.read_text("utf-8"))
    return doc


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def kind_of(message: dict[str, Any]) -> Kind | None:
    ref = message["payload"].get("schema", {}).get("$ref", "")
    by_file = {f"../schemas/{eventschema.SCHEMA_FILES[kind]}": kind for kind in KINDS}
    return by_file.get(ref)


def test_asyncapi_references_exactly_the_four_schema_files(asyncapi: dict[str, Any]) -> None:
    external = [ref for ref in refs(asyncapi) if not ref.startswith("#")]
    expected = [f"../schemas/{name}" for name in eventschema.SCHEMA_FILES.values()]
    assert sorted(external) == sorted(expected)  # each exactly once
    for ref in external:
        assert (ASYNCAPI.parent / ref).is_file()
    assert sorted(p.name for p in (REPO / "schemas").glob("*.json")) == sorted(
        eventschema.SCHEMA_FILES.values()
    )
    messages = asyncapi["components"]["messages"]
    for name, message in messages.items():
        if kind_of(message):
            assert message["payload"]["schemaFormat"] == "application/schema+json;version=draft-07"
        else:
            assert name == "batchState", f"message {name} has no published schema"


def test_asyncapi_channels_operations_and_bindings(asyncapi: dict[str, Any]) -> None:
    assert asyncapi["asyncapi"] == "3.0.0"
    channels = asyncapi["channels"]
    assert {c["address"] for c in channels.values()} == {
        "rightfoot.balances",
        "rightfoot.batch-events",
        "rightfoot.balances.dlq",
        "rightfoot.batch-requests",
        "rightfoot.batch-state",
    }
    state = next(c for c in channels.values() if c["address"] == "rightfoot.batch-state")
    assert state["bindings"]["kafka"]["topicConfiguration"]["cleanup.policy"] == ["compact"]
    for channel in channels.values():
        if channel["address"] in ("rightfoot.balances", "rightfoot.batch-events"):
            assert channel["bindings"]["kafka"]["x-consumer-isolation-level"] == "read_committed"
    actions = {
        op["channel"]["$ref"].removeprefix("#/channels/"): op["action"]
        for op in asyncapi["operations"].values()
        if op["channel"]["$ref"] != "#/channels/batchState"
    }
    assert actions == {
        "balances": "send",
        "batchEvents": "send",
        "invalidBalanceRecords": "send",
        "batchRequests": "receive",
    }
    assert "read_committed" in asyncapi["info"]["description"]
    assert all(s["protocol"].startswith("kafka") for s in asyncapi["servers"].values())
    for name, message in asyncapi["components"]["messages"].items():
        assert "key" in message["bindings"]["kafka"], f"message {name} has no key schema"


def test_asyncapi_examples_are_valid_events(asyncapi: dict[str, Any]) -> None:
    checked = set()
    for message in asyncapi["components"]["messages"].values():
        kind = kind_of(message)
        if kind is None:
            continue
        for ex in message.get("examples", []):
            doc = eventschema.validate_event(kind, ex["payload"])
            headers = [(k, str(v).encode()) for k, v in ex.get("headers", {}).items()]
            eventschema.validate_headers(kind, headers, doc)
            checked.add(kind)
    assert checked == set(KINDS)


def run_validator(*args: str) -> subprocess.CompletedProcess[str]:
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: the AsyncAPI document is validated with the "
            "official parser, which needs Node.js >= 18 and npm (Debian: apt-get install nodejs "
            "npm). Then run `make asyncapi`."
        )
    return subprocess.run(
        [str(VALIDATE_SCRIPT), *args], capture_output=True, text=True, timeout=280, check=False
    )


def test_asyncapi_document_is_valid_for_the_official_parser() -> None:
    result = run_validator("--dump-payloads")
    assert result.returncode == 0, f"scripts/asyncapi-validate.sh failed:\n{result.stderr}"
    payloads = json.loads(result.stdout)
    for kind, name in eventschema.SCHEMA_FILES.items():
        embedded = [p["schema"] for p in payloads.values() if p.get("schema", {}).get("$id")]
        assert eventschema.load_schema(kind) in embedded, f"{name} not embedded as is"
    assert len(payloads) == 5


@pytest.mark.parametrize(
    ("old", "new", "diagnostic"),
    [
        (
            "balance: '-83.68'",
            "balance: -83.68",
            "examples[0] (success) payload (2020-12): /balance",
        ),
        ("ce_source: rightfoot-poller\n", "ce_source: rightfoot\n", "headers: /ce_source"),
        ("- compact", "compact", '"cleanup.policy" property type must be array'),
        ("../schemas/dlq-event", "../schemas/dlq", "invalid-ref"),
    ],
)
def test_asyncapi_validation_fails_on_a_broken_document(
    tmp_path: Path, old: str, new: str, diagnostic: str
) -> None:
    shutil.copytree(REPO / "schemas", tmp_path / "schemas")
    (tmp_path / "docs").mkdir()
    text = ASYNCAPI.read_text("utf-8")
    assert old in text
    (tmp_path / "docs" / "asyncapi.yaml").write_text(text.replace(old, new, 1), "utf-8")
    result = run_validator(str(tmp_path / "docs" / "asyncapi.yaml"))
    assert result.returncode == 1, result.stderr
    assert diagnostic in result.stderr
    assert "INVALID" in result.stderr


# --- the example consumer -------------------------------------------------------------


@pytest.fixture(scope="module")
def consumer() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "consumer_example", REPO / "examples" / "consumer.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def record(doc: Any) -> SimpleNamespace:
    return SimpleNamespace(value=json.dumps(doc).encode(), offset=0, topic="t", partition=0)


def test_consumer_parses_money_as_decimal_and_ignores_unknown_fields(consumer: ModuleType) -> None:
    seen = consumer.RecentIds()
    event = consumer.handle(record(example("balance", 2, new_field=1)), seen)
    assert event.balance == Decimal("98765432109876543.21")
    assert isinstance(event.balance, Decimal)
    assert consumer.handle(record(example("balance", 1)), seen).balance is None


def test_consumer_skips_duplicates_with_a_bounded_memory(consumer: ModuleType) -> None:
    seen = consumer.RecentIds(size=2)
    handle: Callable[[Any], Any] = lambda doc: consumer.handle(record(doc), seen)  # noqa: E731
    first, second, third = (example("balance", i) for i in range(3))
    assert handle(first) is not None
    assert handle(first) is None
    assert handle(second) is not None
    assert handle(third) is not None  # evicts the first
    assert handle(first) is not None


@pytest.mark.parametrize(
    "doc",
    [example("balance", balance=1.5), example("balance", balance="1e5"), {"event_id": "x"}, [1]],
)
def test_consumer_rejects_malformed_records(consumer: ModuleType, doc: Any) -> None:
    with pytest.raises(ValueError, match="not a balance event"):
        consumer.handle(record(doc), consumer.RecentIds())
    with pytest.raises(ValueError):
        consumer.handle(SimpleNamespace(value=None), consumer.RecentIds())


# --- the service writes what the schemas say ------------------------------------------


BATCH = "5d3c6bbb-fc1a-46a4-93da-1ce4a54b0d83"
# Raw JSON text: the balances' digits must reach the parser as the API wrote them.
API_PAGE = b"""{"batch_id": "5d3c6bbb-fc1a-46a4-93da-1ce4a54b0d83", "has_more": false, "balances": [
  {"authorizer_unique_id": "1", "balance": -83.68, "timestamp": "2024-08-09T18:10:44Z",
   "balance_status_code": 0, "status_code": 0},
  {"authorizer_unique_id": "2", "balance": 98765432109876543.21,
   "timestamp": "2024-08-09T17:51:34Z", "balance_status_code": 0},
  {"authorizer_unique_id": "3", "balance": null, "timestamp": "2024-08-09T17:55:25Z",
   "status_code": 3300},
  {"authorizer_unique_id": "4", "balance": 1e5, "timestamp": "2024-08-09T17:55:25Z",
   "balance_status_code": 4242},
  {"authorizer_unique_id": "5", "balance": 100, "timestamp": "2024-08-09T17:55:25.5+02:00",
   "balance_status_code": 3001},
  "not an object",
  {"balance": 1.5, "timestamp": "2024-08-09T18:10:44Z", "balance_status_code": 0},
  {"authorizer_unique_id": "6", "balance": "12.5", "timestamp": "2024-08-09T18:10:44Z",
   "balance_status_code": 0},
  {"authorizer_unique_id": "7", "balance": 1, "timestamp": "2024-08-09T18:10:44Z"}
]}"""
SOURCE = "http://127.0.0.1:8099/v1/balances"


def test_service_events_match_the_schemas_and_headers() -> None:
    from service import events, records

    factory = events.EventFactory(
        balances_topic="rightfoot.balances",
        batch_events_topic="rightfoot.batch-events",
        source=SOURCE,
    )
    page = records.parse_page(BATCH, API_PAGE)
    out = [factory.balance(BATCH, rec) for rec in page.records]
    out += [factory.invalid(BATCH, rec) for rec in page.invalid]
    counts = {"SUCCESS": 2, "INSTITUTION_NOT_SUPPORTED": 1, "UNKNOWN": 1, "NO_SSN_MATCH": 1}
    for event in ("tracking_started", "completed", "expired", "failed", "stopped"):
        out.append(
            factory.lifecycle(
                BATCH,
                event,
                generation=1,
                tracked_at=0.0,
                expected_count=9 if event == "completed" else None,
                records_published=len(page.records),
                counts_by_status=None if event == "tracking_started" else counts,
                reason=None if event in ("tracking_started", "completed") else "why: because",
                records_dead_lettered=len(page.invalid),
            )
        )
    kinds: dict[str, Kind] = {"rightfoot.balances": "balance", "rightfoot.batch-events": "batch"}
    seen = []
    for msg in out:
        kind = kinds.get(msg.topic, "dlq")
        source = SOURCE if kind != "batch" else None
        assert msg.value is not None
        doc = eventschema.validate_message(kind, msg.key, msg.value, msg.headers, source=source)
        seen.append((kind, doc.get("balance", doc.get("reason", doc.get("event")))))
    assert seen[:5] == [
        ("balance", "-83.68"),
        ("balance", "98765432109876543.21"),
        ("balance", None),
        ("balance", "100000"),
        ("balance", "100"),
    ]
    assert [kind for kind, _ in seen].count("dlq") == 4  # string, no id, "12.5", no code


def test_service_request_parser_agrees_with_the_request_schema() -> None:
    from service import errors, requests

    for kind, doc in GOOD:
        if kind == "request":
            requests.decode_request(json.dumps(doc).encode())
    for _case, kind, doc, _ in BAD:
        if kind == "request":
            with pytest.raises(errors.RequestRejected):
                requests.decode_request(json.dumps(doc).encode())
    encoded = requests.TrackingRequest(batch_id="b:1", expected_count=9).encode()
    assert eventschema.validate_event("request", encoded) == {
        "batch_id": "b:1",
        "expected_count": 9,
        "action": "track",
    }
