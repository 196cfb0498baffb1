"""The schema registry client and the Confluent wire format (kafka.value_format json_sr).

Pure parts (the wire format, the registered form of the schemas) are unit tests. The
client runs against a real Apicurio Registry (the ``registry`` fixture starts it with
scripts/registry.sh), and against a small local server only for what Apicurio in its
test setup cannot show: basic auth refused, TLS, server errors. The events are read
back with confluent-kafka's JSONDeserializer and SchemaRegistryClient, as a consumer
team would.
"""

from __future__ import annotations

import base64
import copy
import json
import random
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import jsonschema
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from certs import CertificateAuthority
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.json_schema import JSONDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext, SerializationError
from conftest import free_port

from service.config import KafkaConfig, SchemaRegistryConfig
from service.errors import (
    ConfigError,
    RegistryError,
    RegistryUnauthorized,
    RegistryUnavailable,
    SchemaIncompatible,
    SchemaInvalid,
    SchemaNotRegistered,
)
from service.events import EventFactory
from service.records import BalanceRecord, InvalidRecord, balance_event_id
from service.registry import (
    REGISTRY_DRAFT,
    SCHEMA_DIR,
    SCHEMA_FILES,
    RegistryClient,
    TopicSchema,
    event_schemas,
    registry_schema,
    schema_ids_when_available,
    subject_for,
)
from service.wire import frame, unframe

EXACT_BALANCE = "12345678901234567890.123456789"
PASSWORD = "registry-password-for-tests-5150"


def published(kind: str) -> str:
    return (SCHEMA_DIR / SCHEMA_FILES[kind]).read_text(encoding="utf-8")


def kafka_config(prefix: str) -> KafkaConfig:
    return KafkaConfig(
        balances_topic=f"{prefix}.balances", batch_events_topic=f"{prefix}.batch-events"
    )


def factory_for(cfg: KafkaConfig) -> EventFactory:
    return EventFactory(
        balances_topic=cfg.balances_topic,
        batch_events_topic=cfg.batch_events_topic,
        source="rightfoot-poller/test",
    )


def sample_values(factory: EventFactory) -> dict[str, bytes]:
    """One real event value per topic, as the service writes them."""
    batch = "batch_sr_1"
    ts = "2024-08-09T18:10:44Z"
    event_id = balance_event_id(batch, "1286672", ts, EXACT_BALANCE, 0)
    rec = BalanceRecord("1286672", EXACT_BALANCE, 0, ts, event_id)
    bad = InvalidRecord(
        reason="missing_authorizer_unique_id",
        detail="record has no authorizer_unique_id",
        raw='{"balance": 12.5}',
        event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, "bad")),
    )
    done = factory.lifecycle(
        batch,
        "completed",
        generation=1,
        tracked_at=0.0,
        expected_count=1,
        records_published=1,
        counts_by_status={"SUCCESS": 1},
    )
    values = {
        factory.balances_topic: factory.balance(batch, rec).value,
        factory.batch_events_topic: done.value,
        factory.dlq_topic: factory.invalid(batch, bad).value,
    }
    return {topic: value for topic, value in values.items() if value is not None}


# --------------------------------------------------------------------------- wire format


def test_json_sr_is_a_zero_byte_the_id_big_endian_then_the_json() -> None:
    assert frame(7) == b"\x00\x00\x00\x00\x07"
    assert frame(2**31 - 1) == b"\x00\x7f\xff\xff\xff"
    assert unframe(frame(2**31 - 1) + b"{}") == (2**31 - 1, b"{}")


def test_the_factory_frames_every_event_topic_only_once_told_to() -> None:
    cfg = kafka_config("t")
    factory = factory_for(cfg)
    plain = sample_values(factory)
    assert all(value[:1] == b"{" for value in plain.values())  # json: the bytes as they were
    ids = {cfg.balances_topic: 7, cfg.batch_events_topic: 8, cfg.dlq_topic: 2**31 - 1}
    factory.set_prefixes({topic: frame(i) for topic, i in ids.items()})
    framed = sample_values(factory)
    assert set(framed) == set(plain) == set(ids)
    for topic, value in framed.items():
        schema_id, text = unframe(value)
        assert schema_id == ids[topic]
        assert json.loads(text).keys() == json.loads(plain[topic]).keys()
    assert framed[cfg.balances_topic] == frame(7) + plain[cfg.balances_topic]  # the fast path


@pytest.mark.parametrize("bad_id", [-1, 2**31])
def test_schema_ids_out_of_range_refused(bad_id: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        frame(bad_id)


@pytest.mark.parametrize("value", [b'{"a":1}', b"\x00\x00\x01", b"\x01\x00\x00\x00\x01{}"])
def test_unframe_refuses_what_is_not_the_wire_format(value: bytes) -> None:
    with pytest.raises(ValueError, match="wire format"):
        unframe(value)


# --------------------------------------------------------------------------- schemas


def test_subjects_follow_the_topics() -> None:
    cfg = kafka_config("acme")
    schemas = event_schemas(cfg)
    assert [(s.topic, s.subject) for s in schemas] == [
        ("acme.balances", "acme.balances-value"),
        ("acme.batch-events", "acme.batch-events-value"),
        ("acme.balances.dlq", "acme.balances.dlq-value"),
    ]
    assert subject_for("x") == "x-value"


@pytest.mark.parametrize("kind", sorted(SCHEMA_FILES))
def test_registered_form_is_the_published_schema_declared_draft_07(kind: str) -> None:
    original = json.loads(published(kind))
    registered = registry_schema(published(kind))
    assert registered == registry_schema(published(kind)), "deterministic text"
    assert "\n" not in registered
    doc = json.loads(registered)
    assert original["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert doc["$schema"] == REGISTRY_DRAFT
    assert doc == original | {"$schema": REGISTRY_DRAFT}
    jsonschema.Draft7Validator.check_schema(doc)


def _variants(example: dict[str, Any], schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The example, and ways of breaking it: each required field missing or mistyped."""
    out = [example]
    for field in schema["required"]:
        missing = copy.deepcopy(example)
        missing.pop(field, None)
        out.append(missing)
        wrong: object
        for wrong in (1.5, "x", None, [], {}):
            changed = copy.deepcopy(example)
            changed[field] = wrong
            out.append(changed)
    return out


@pytest.mark.parametrize("kind", sorted(SCHEMA_FILES))
def test_registered_form_accepts_and_refuses_exactly_what_the_published_one_does(
    kind: str,
) -> None:
    original = json.loads(published(kind))
    registered = json.loads(registry_schema(published(kind)))
    v2020 = jsonschema.Draft202012Validator(original)
    v7 = jsonschema.Draft7Validator(registered)
    instances = [v for example in original["examples"] for v in _variants(example, original)]
    factory = factory_for(kafka_config("t"))
    topic = {
        "balances": factory.balances_topic,
        "lifecycle": factory.batch_events_topic,
        "dlq": factory.dlq_topic,
    }[kind]
    instances.append(json.loads(sample_values(factory)[topic]))
    if kind == "balances":  # the if/then rules: status must be the name of the code
        mismatch = dict(original["examples"][0], balance_status="NO_SSN_MATCH")
        instances.append(mismatch)
        assert not v2020.is_valid(mismatch)
    verdicts = [(v2020.is_valid(i), v7.is_valid(i)) for i in instances]
    assert all(a == b for a, b in verdicts)
    assert {a for a, _ in verdicts} == {True, False}


def test_keywords_draft_07_lacks_are_refused_names_are_not() -> None:
    bad = {"type": "object", "$defs": {"x": {"type": "string"}}}
    with pytest.raises(ValueError, match=r"#/\$defs"):
        registry_schema(json.dumps(bad))
    nested = {"type": "object", "properties": {"a": {"prefixItems": [{"type": "string"}]}}}
    with pytest.raises(ValueError, match="#/properties/a/prefixItems"):
        registry_schema(json.dumps(nested))
    # A property called like a keyword, or data that looks like one, is fine.
    fine = {
        "type": "object",
        "properties": {"$defs": {"type": "string"}},
        "examples": [{"prefixItems": 1}],
    }
    assert json.loads(registry_schema(json.dumps(fine)))["properties"] == fine["properties"]


def test_unreadable_schema_dir_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="schemas: cannot read"):
        event_schemas(kafka_config("t"), tmp_path)


def test_client_needs_a_url() -> None:
    with pytest.raises(ConfigError, match=r"^schema_registry\.url"):
        RegistryClient(SchemaRegistryConfig())


# --------------------------------------------------------------------------- a local server

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class LocalServer(Protocol):
    """The ``local_server`` fixture: serves ``handler`` (``ssl=`` for TLS); the base URL."""

    def __call__(self, handler: Handler, **kwargs: Any) -> Awaitable[str]: ...


@pytest.fixture
async def local_server() -> AsyncIterator[LocalServer]:
    """Serves one handler for every path; returns its base URL."""
    servers: list[TestServer] = []

    async def serve(handler: Handler, **kwargs: Any) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        server = TestServer(app, host="127.0.0.1", port=free_port())
        await server.start_server(**kwargs)
        servers.append(server)
        scheme = "https" if "ssl" in kwargs else "http"
        return f"{scheme}://127.0.0.1:{server.port}/apis/ccompat/v7"

    yield serve
    for server in servers:
        await server.close()


def answer(status: int, body: object) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(body, status=status)

    return handler


async def test_basic_auth_is_sent_and_a_refusal_is_clear(local_server: LocalServer) -> None:
    seen: list[tuple[str, str, str | None]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append((request.method, request.path, request.headers.get("Authorization")))
        auth = request.headers.get("Authorization", "")
        if auth != "Basic " + base64.b64encode(f"poller:{PASSWORD}".encode()).decode():
            return web.json_response({"error_code": 401, "message": "Unauthorized"}, status=401)
        return web.json_response({"id": 42})

    url = await local_server(handler)
    good = SchemaRegistryConfig(url=url, username="poller", password=PASSWORD)
    async with RegistryClient(good) as client:
        assert await client.register("t.balances-value", '{"type":"object"}') == 42
    assert seen[-1][:2] == ("POST", "/apis/ccompat/v7/subjects/t.balances-value/versions")

    wrong = SchemaRegistryConfig(url=url, username="poller", password="not-the-password")
    async with RegistryClient(wrong) as client:
        with pytest.raises(RegistryUnauthorized) as info:
            await client.register("t.balances-value", '{"type":"object"}')
    message = str(info.value)
    assert "HTTP 401" in message
    assert "schema_registry.username" in message
    assert "not-the-password" not in message and PASSWORD not in message
    assert info.value.subject == "t.balances-value"


@pytest.mark.parametrize(
    ("status", "body", "error", "words"),
    [
        (403, {"error_code": 40301, "message": "forbidden"}, RegistryUnauthorized, "HTTP 403"),
        (500, {"error_code": 50001, "message": "store error"}, RegistryUnavailable, "store error"),
        (503, "<html>busy</html>", RegistryUnavailable, "HTTP 503"),
        (422, {"error_code": 42201, "message": "bad schema"}, SchemaInvalid, "bad schema"),
        (409, {"error_code": 409, "message": "nope"}, SchemaIncompatible, "'s-value'"),
        (404, "Not Found", RegistryError, "/apis/ccompat/v7"),
    ],
)
async def test_error_answers_are_typed(
    local_server: LocalServer, status: int, body: object, error: type[Exception], words: str
) -> None:
    url = await local_server(answer(status, body))
    async with RegistryClient(SchemaRegistryConfig(url=url)) as client:
        with pytest.raises(error) as info:
            await client.register("s-value", "{}")
    assert words in str(info.value)


async def test_an_answer_without_an_id_is_an_error(local_server: LocalServer) -> None:
    url = await local_server(answer(200, {"version": 1}))
    async with RegistryClient(SchemaRegistryConfig(url=url)) as client:
        with pytest.raises(RegistryError, match="no schema id") as info:
            await client.register("s-value", "{}")
    assert not isinstance(info.value, RegistryUnavailable)


async def test_tls_verified_against_ssl_cafile(local_server: LocalServer, tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "tls", name="registry-ca")
    leaf = ca.issue("registry")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(leaf.cert, leaf.key)
    url = await local_server(answer(200, {"id": 3}), ssl=ctx)
    async with RegistryClient(SchemaRegistryConfig(url=url, ssl_cafile=ca.cert)) as client:
        assert await client.register("s-value", "{}") == 3
    async with RegistryClient(SchemaRegistryConfig(url=url)) as client:  # system CAs only
        with pytest.raises(RegistryUnavailable) as info:
            await client.register("s-value", "{}")
    assert info.value.reason == "tls"
    assert "schema_registry.ssl_cafile" in str(info.value)


async def test_unreachable_registry_is_retryable() -> None:
    url = f"http://127.0.0.1:{free_port()}/apis/ccompat/v7"
    async with RegistryClient(SchemaRegistryConfig(url=url, timeout_s=2)) as client:
        with pytest.raises(RegistryUnavailable) as info:
            await client.register("s-value", "{}")
    assert info.value.reason == "unreachable"
    assert url.removesuffix("/apis/ccompat/v7") in str(info.value)


async def test_start_up_waits_with_backoff_while_the_registry_is_unavailable(
    local_server: LocalServer,
) -> None:
    answers = [(503, {"message": "starting"}), (500, {"message": "store error"})]

    async def handler(request: web.Request) -> web.StreamResponse:
        status, body = answers.pop(0) if answers else (200, {"id": 5})
        return web.json_response(body, status=status)

    url = await local_server(handler)
    cfg = SchemaRegistryConfig(url=url, backoff_base_s=1, backoff_max_s=60)
    slept: list[float] = []
    retries: list[tuple[str, int, float]] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)

    schemas = event_schemas(kafka_config("t"))
    async with RegistryClient(cfg) as client:
        ids = await schema_ids_when_available(
            client,
            schemas,
            rng=random.Random(1),
            sleep=sleep,
            on_retry=lambda exc, n, d: retries.append((exc.reason, n, d)),
        )
    assert ids == {s.topic: 5 for s in schemas}
    assert [(reason, n) for reason, n, _ in retries] == [("server_error", 1), ("server_error", 2)]
    assert slept == [d for _, _, d in retries]
    assert 0.5 <= slept[0] <= 1 and 1 <= slept[1] <= 2


async def test_start_up_does_not_retry_what_retrying_cannot_fix(local_server: LocalServer) -> None:
    url = await local_server(answer(401, {"error_code": 401, "message": "Unauthorized"}))
    slept: list[float] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)

    async with RegistryClient(SchemaRegistryConfig(url=url)) as client:
        with pytest.raises(RegistryUnauthorized):
            await schema_ids_when_available(client, event_schemas(kafka_config("t")), sleep=sleep)
    assert slept == []


# --------------------------------------------------------------------------- real Apicurio


@pytest.fixture
def prefix() -> str:
    return f"sr{uuid.uuid4().hex[:10]}"


@pytest.mark.kafka
@pytest.mark.registry
async def test_register_each_schema_again_and_look_it_up(registry: str, prefix: str) -> None:
    schemas = event_schemas(kafka_config(prefix))
    async with RegistryClient(SchemaRegistryConfig(url=registry)) as client:
        ids = await client.schema_ids(schemas)
        assert list(ids) == [s.topic for s in schemas]
        assert len(set(ids.values())) == 3
        assert await client.schema_ids(schemas) == ids, "registering again: the same ids"
    lookup_only = SchemaRegistryConfig(url=registry, auto_register=False)
    async with RegistryClient(lookup_only) as client:
        assert await client.schema_ids(schemas) == ids


@pytest.mark.kafka
@pytest.mark.registry
async def test_lookup_of_a_schema_not_registered_names_the_subject(
    registry: str, prefix: str
) -> None:
    schemas = event_schemas(kafka_config(prefix))
    lookup_only = SchemaRegistryConfig(url=registry, auto_register=False)
    async with RegistryClient(lookup_only) as client:
        with pytest.raises(SchemaNotRegistered) as info:
            await client.schema_ids(schemas)
        assert f"'{prefix}.balances-value'" in str(info.value)
        assert "auto_register" in str(info.value)
        # The subject exists, but holds another schema.
        async with RegistryClient(SchemaRegistryConfig(url=registry)) as registering:
            await registering.register(schemas[0].subject, schemas[0].schema)
        with pytest.raises(SchemaNotRegistered):
            await client.lookup(schemas[0].subject, schemas[1].schema)


def _changed(schema: TopicSchema, change: Callable[[dict[str, Any]], None]) -> str:
    doc = json.loads(schema.schema)
    change(doc)
    return json.dumps(doc)


def _retype_code(doc: dict[str, Any]) -> None:
    doc["properties"]["balance_status_code"]["type"] = "string"


def _require_new_field(doc: dict[str, Any]) -> None:
    doc["properties"]["branch"] = {"type": "string"}
    doc["required"].append("branch")


@pytest.mark.kafka
@pytest.mark.registry
@pytest.mark.parametrize("change", [_retype_code, _require_new_field], ids=["retype", "require"])
async def test_incompatible_change_refused_naming_the_subject(
    registry: str, prefix: str, change: Callable[[dict[str, Any]], None]
) -> None:
    balances = event_schemas(kafka_config(prefix))[0]
    async with RegistryClient(SchemaRegistryConfig(url=registry)) as client:
        first = await client.register(balances.subject, balances.schema)
        await client.set_compatibility(balances.subject, "BACKWARD")
        assert await client.register(balances.subject, balances.schema) == first
        with pytest.raises(SchemaIncompatible) as info:
            await client.register(balances.subject, _changed(balances, change))
    message = str(info.value)
    assert f"'{balances.subject}'" in message
    assert "ncompatible" in message
    assert info.value.subject == balances.subject
    assert info.value.status == 409


@pytest.mark.kafka
@pytest.mark.registry
async def test_a_compatible_change_is_a_new_version(registry: str, prefix: str) -> None:
    balances = event_schemas(kafka_config(prefix))[0]

    def describe(doc: dict[str, Any]) -> None:
        doc["description"] = "A clearer description."

    async with RegistryClient(SchemaRegistryConfig(url=registry)) as client:
        first = await client.register(balances.subject, balances.schema)
        await client.set_compatibility(balances.subject, "BACKWARD")
        second = await client.register(balances.subject, _changed(balances, describe))
    assert second != first


@pytest.mark.kafka
@pytest.mark.registry
async def test_events_read_back_with_confluent_kafkas_json_deserializer(
    registry: str, prefix: str
) -> None:
    cfg = kafka_config(prefix)
    factory = factory_for(cfg)
    async with RegistryClient(SchemaRegistryConfig(url=registry)) as client:
        ids = await client.schema_ids(event_schemas(cfg))
    factory.set_prefixes({topic: frame(schema_id) for topic, schema_id in ids.items()})
    with SchemaRegistryClient({"url": registry, "timeout": 10}) as sr_client:
        deserializer = JSONDeserializer(None, schema_registry_client=sr_client)
        check_read_back(cfg, ids, deserializer, sample_values(factory))


def check_read_back(
    cfg: KafkaConfig,
    ids: dict[str, int],
    deserializer: JSONDeserializer,
    values: dict[str, bytes],
) -> None:
    """``values``: as the factory writes them with the registry's ids (framed)."""
    decoded: dict[str, dict[str, Any]] = {}
    for topic, framed in values.items():
        schema_id, text = unframe(framed)
        assert schema_id == ids[topic]
        # A dict, though confluent-kafka annotates JSONDeserializer.__call__ as bytes | None.
        value: object = deserializer(framed, SerializationContext(topic, MessageField.VALUE))
        assert isinstance(value, dict)
        decoded[topic] = value
        assert value == json.loads(text)

    balance = decoded[cfg.balances_topic]
    ts = "2024-08-09T18:10:44Z"
    assert balance == {
        "event_id": balance_event_id("batch_sr_1", "1286672", ts, EXACT_BALANCE, 0),
        "batch_id": "batch_sr_1",
        "authorizer_unique_id": "1286672",
        "balance": EXACT_BALANCE,
        "balance_status_code": 0,
        "balance_status": "SUCCESS",
        "timestamp": ts,
    }
    assert isinstance(balance["balance"], str) and balance["balance"] == EXACT_BALANCE
    assert decoded[cfg.batch_events_topic]["event"] == "completed"
    assert decoded[cfg.dlq_topic]["reason"] == "missing_authorizer_unique_id"

    # The deserializer validates against the registered schema: a value the schema
    # refuses (status not the name of its code; a balance as a number) is refused.
    for broken in (
        dict(balance, balance_status="NO_SSN_MATCH"),
        dict(balance, balance=12345.5),
    ):
        framed = frame(ids[cfg.balances_topic]) + json.dumps(broken).encode()
        with pytest.raises(SerializationError):
            deserializer(framed, SerializationContext(cfg.balances_topic, MessageField.VALUE))


@pytest.mark.kafka
@pytest.mark.registry
async def test_published_2020_12_text_breaks_apicurio_compatibility_checks(
    registry: str, prefix: str
) -> None:
    """Why the registered form is draft-07: with a compatibility rule, Apicurio cannot
    check a 2020-12 schema and answers HTTP 500, which the client treats as retryable."""
    subject = subject_for(f"{prefix}.balances")
    async with RegistryClient(SchemaRegistryConfig(url=registry)) as client:
        await client.register(subject, published("balances"))
        await client.set_compatibility(subject, "BACKWARD")
        changed = json.loads(published("balances"))
        changed["description"] = "A clearer description."
        with pytest.raises(RegistryUnavailable) as info:
            await client.register(subject, json.dumps(changed))
    assert info.value.status == 500
    assert "could not determine version" in str(info.value)


@pytest.mark.kafka
@pytest.mark.registry
async def test_a_url_without_the_api_root_says_so(registry: str) -> None:
    root = registry.removesuffix("/apis/ccompat/v7")
    async with RegistryClient(SchemaRegistryConfig(url=root)) as client:
        with pytest.raises(RegistryError) as info:
            await client.register("s-value", registry_schema(published("dlq")))
    assert info.value.status == 404
    assert not isinstance(info.value, RegistryUnavailable)
    assert "/apis/ccompat/v7" in str(info.value)


def test_the_wheel_carries_the_event_schemas(tmp_path: Path) -> None:
    """An installed service registers its schemas: they must be in the package."""
    import subprocess
    import zipfile

    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        ["uv", "build", "--wheel", "--out-dir", str(tmp_path), str(root)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in SCHEMA_FILES.values():
        assert f"service/schemas/{name}" in names


# Every text an earlier release registered for an event schema that has changed since,
# and whether a BACKWARD rule takes this release's after it (README, "Upgrades").
EARLIER = {
    "balance-event.before-content-ids": True,  # descriptions only
    "batch-event.before-records-relisted": False,  # records_relisted added
}
KINDS = {"balance-event": "balances", "batch-event": "lifecycle", "dlq-event": "dlq"}
FIXTURES = Path(__file__).parent / "fixtures" / "schemas"


def test_every_earlier_schema_text_is_listed() -> None:
    assert {p.stem for p in FIXTURES.glob("*.json")} == set(EARLIER)


@pytest.mark.kafka
@pytest.mark.registry
@pytest.mark.parametrize("earlier", sorted(EARLIER))
async def test_an_upgrade_registers_under_forward_compatibility(
    registry: str, prefix: str, earlier: str
) -> None:
    """The schemas evolve by adding optional fields to open objects: events of this
    release are read by consumers of an earlier schema (FORWARD), so a subject holding
    an earlier release's schema under a FORWARD rule takes this one as a new version.
    BACKWARD refuses any property added to an open object; where that happened the
    README's upgrade notes say so, and the rollout waits, naming the subject."""
    kind = KINDS[earlier.split(".")[0]]
    text = registry_schema((FIXTURES / f"{earlier}.json").read_text("utf-8"))
    async with RegistryClient(SchemaRegistryConfig(url=registry)) as client:
        for level in ("FORWARD_TRANSITIVE", "BACKWARD"):
            subject = subject_for(f"{prefix}.{level.lower()}.{kind}")
            first = await client.register(subject, text)
            await client.set_compatibility(subject, level)
            if level == "BACKWARD" and not EARLIER[earlier]:
                with pytest.raises(SchemaIncompatible) as info:
                    await client.register(subject, registry_schema(published(kind)))
                assert f"'{subject}'" in str(info.value)
                continue
            assert await client.register(subject, registry_schema(published(kind))) != first
