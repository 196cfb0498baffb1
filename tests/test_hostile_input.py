"""Hostile records through the real service: simulator → service → Kafka.

Pages mixing good records with records that cannot be understood (not objects, missing
or mistyped fields, bad timestamps, huge or deeply nested values, oversized IDs, and
random mutations of good records): every good record arrives once on the balances
topic, every bad one on the dead-letter topic with its reason and raw text, each
failure is counted, and the service stays up and ready throughout.
"""

from __future__ import annotations

import json
import random
import uuid
from collections import Counter
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from conftest import ADMIN_TOKEN, ServiceFactory, SimServer, TopicReader, Topics, wait_for

from rightfoot_simulator import SimRecord
from service.records import BalanceRecord, parse_record

pytestmark = pytest.mark.kafka

TS = "2026-03-01T12:00:00Z"


def good(uid: str, code: int = 0) -> dict[str, Any]:
    return {
        "authorizer_unique_id": uid,
        "balance": 12.34,
        "timestamp": TS,
        "balance_status_code": code,
    }


def raw(value: Any) -> str:
    return json.dumps(value)


def record_text(uid: str, balance: str, code_field: str = "balance_status_code") -> str:
    """A record's JSON text with the balance written exactly as given (digits, true, null)."""
    return (
        f'{{"authorizer_unique_id":"{uid}","balance":{balance},"timestamp":"{TS}",'
        f'"{code_field}":3200}}'
    )


# Records a vendor bug, a proxy or an attacker could put on a page, with the reason the
# dead-letter event must give.
CATALOGUE: list[tuple[str, str]] = [
    ("[]", "not_an_object"),
    ("null", "not_an_object"),
    ('"a string"', "not_an_object"),
    ("-0.000000000000000000001", "not_an_object"),
    ("{}", "missing_authorizer_unique_id"),
    (raw({**good("x"), "authorizer_unique_id": None}), "missing_authorizer_unique_id"),
    (raw({**good("x"), "authorizer_unique_id": 42}), "missing_authorizer_unique_id"),
    (raw({**good("x"), "authorizer_unique_id": ""}), "missing_authorizer_unique_id"),
    (raw({**good("x"), "authorizer_unique_id": ["a"]}), "missing_authorizer_unique_id"),
    (raw({**good("long"), "authorizer_unique_id": "L" * 5000}), "invalid_field"),
    (record_text("b1", '"12.34"', "status_code"), "invalid_balance"),
    (record_text("b2", "true", "status_code"), "invalid_balance"),
    (record_text("b3", '{"v":1}', "status_code"), "invalid_balance"),
    (raw({**good("t1"), "timestamp": "yesterday"}), "invalid_field"),
    (raw({**good("t2"), "timestamp": "2026-02-30T00:00:00Z"}), "invalid_field"),
    (raw({**good("t3"), "timestamp": "2026-03-01T12:00:00"}), "invalid_field"),
    (raw({k: v for k, v in good("t4").items() if k != "timestamp"}), "invalid_field"),
    (raw({**good("c1"), "balance_status_code": "0"}), "invalid_field"),
    (raw({**good("c2"), "balance_status_code": 1.5}), "invalid_field"),
    (raw({k: v for k, v in good("c3").items() if k != "balance_status_code"}), "invalid_field"),
    # Deep nesting, and a value too big to keep whole, in records that are not valid.
    ('{"nested":' + "[" * 200 + "]" * 200 + "}", "missing_authorizer_unique_id"),
    (raw({"authorizer_unique_id": 7, "blob": "x" * 200_000}), "missing_authorizer_unique_id"),
]

# Good records in disguise: these must be published, not dead-lettered.
ODD_BUT_GOOD: list[str] = [
    raw({**good("g-extra"), "unknown_field": {"deep": [1, 2, {"x": None}]}}),
    record_text("g-legacy", "null", "status_code"),
    record_text("g-exact", "-98765432109876543.21"),
    record_text("g-exp", "1E+3"),
    raw({**good("g-unknown-code"), "balance_status_code": 10**20}),
    raw({**good("g-unicode-ключ-😀"), "note": "\u0000\u202e"}),
    raw({**good("g-blob"), "blob": "y" * 100_000}),
]


def mutations(rng: random.Random, n: int) -> list[str]:
    """Good records with one field replaced, removed or retyped at random."""
    values: list[Any] = [
        None,
        True,
        0,
        -1,
        2**70,
        1.5,
        "",
        "x",
        "12.34",
        [],
        [1],
        {},
        {"a": 1},
        "\u00e9",
        "2026-03-01T12:00:00+02:00",
        "2026-03-01",
        TS,
    ]
    out = []
    for i in range(n):
        record = good(f"m-{i}", rng.choice([0, 3000, 3400, 9000]))
        key = rng.choice([*record, "authorizer_unique_id", "extra"])
        if rng.random() < 0.2:
            record.pop(key, None)
        else:
            record[key] = rng.choice(values)
        out.append(raw(record))
    return out


def sim_record(uid: str, raw_json: str | None, visible_at: float) -> SimRecord:
    return SimRecord(
        authorizer_unique_id=uid,
        balance=Decimal("1.00"),
        balance_status_code=0,
        timestamp=TS,
        visible_at=visible_at,
        raw_override=raw_json,
    )


async def post_batch(port: int, batch_id: str) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"http://127.0.0.1:{port}/v1/batches",
            json={"batch_id": batch_id},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as resp,
    ):
        assert resp.status == 202


async def run_page_mix(
    start_service: ServiceFactory,
    sim_server: SimServer,
    topics: Topics,
    reader: TopicReader,
    hostile: list[str],
    seed: int,
) -> dict[str, Any]:
    """Serve ``hostile`` among good records, 7 to a page, and collect what comes out."""
    rng = random.Random(seed)
    batch = str(uuid.uuid4())
    items: list[tuple[str, str | None]] = [(f"ok-{i}", None) for i in range(40)]
    items += [(f"odd-{i}", r) for i, r in enumerate(ODD_BUT_GOOD)]
    items += [(f"bad-{i}", r) for i, r in enumerate(hostile)]
    rng.shuffle(items)
    records = [sim_record(uid, r, visible_at=0.6 * (i // 20)) for i, (uid, r) in enumerate(items)]
    sim_server.sim.add_batch(batch, records)

    service = await start_service(RFP_RIGHTFOOT__PAGE_LIMIT="7")
    assert service.http_port is not None
    await post_batch(service.http_port, batch)

    def finished() -> bool:
        found = service.view.get(batch)
        return found is not None and found["status"] == "completed"

    await wait_for(finished, 60, "the batch completed despite its hostile records")
    assert service.readiness()[0], service.readiness()[1]

    # The oracle for each record: the parser (property-tested in tests/test_fuzz.py).
    expected_good: set[str] = set()
    expected_bad: Counter[str] = Counter()
    for rec in records:
        text = rec.raw_override
        if text is None:
            expected_good.add(rec.authorizer_unique_id)
            continue
        parsed = parse_record(batch, json.loads(text, parse_float=Decimal))
        if isinstance(parsed, BalanceRecord):
            expected_good.add(parsed.authorizer_unique_id)
        else:
            expected_bad[parsed.reason] += 1

    # The topics are this test's own.
    published = [json.loads(m.value) for m in await reader.read_all(topics.balances)]
    dlq = [json.loads(m.value) for m in await reader.read_all(topics.dlq)]
    assert {v["batch_id"] for v in published} | {d["batch_id"] for d in dlq} == {batch}
    got_good = Counter(v["authorizer_unique_id"] for v in published)
    assert set(got_good) == expected_good
    assert all(n == 1 for n in got_good.values()), "a record was published twice"
    assert Counter(d["reason"] for d in dlq) == expected_bad
    for d in dlq:
        assert d["detail"] and d["raw"], d
        assert d["event_id"] and d["at"]

    view = service.view.get(batch)
    assert view is not None and view["published"] == len(expected_good)
    assert view["dead_lettered"] == sum(expected_bad.values())
    return {"service": service, "dlq": dlq, "published": published, "bad": expected_bad}


async def test_a_page_of_hostile_records_loses_no_good_record(
    start_service: ServiceFactory, sim_server: SimServer, topics: Topics, reader: TopicReader
) -> None:
    hostile = [r for r, _ in CATALOGUE] + mutations(random.Random(8), 40)
    seen = await run_page_mix(start_service, sim_server, topics, reader, hostile, seed=1)
    # Every catalogued record went to the DLQ with the reason it deserves.
    by_raw = {
        json.dumps(json.loads(d["raw"]), sort_keys=True): d
        for d in seen["dlq"]
        if not d.get("raw_truncated")
    }
    truncated = [d for d in seen["dlq"] if d.get("raw_truncated")]
    for text, reason in CATALOGUE:
        key = json.dumps(json.loads(text), sort_keys=True)
        compact = json.dumps(json.loads(text), separators=(",", ":"))
        found = by_raw.get(key) or next(
            (d for d in truncated if compact.startswith(d["raw"][:1000])), None
        )
        assert found is not None, f"not dead-lettered: {text[:120]}"
        assert found["reason"] == reason, (text[:120], found["reason"], found["detail"])
    # Exact balances of the odd-but-good records survived.
    balances = {v["authorizer_unique_id"]: v["balance"] for v in seen["published"]}
    assert balances["g-exact"] == "-98765432109876543.21"
    assert balances["g-legacy"] is None
    assert balances["g-exp"] == "1000"
    # Counted: the DLQ metric and the invalid-input metric match what was dead-lettered.
    registry = seen["service"].metrics.registry
    for reason, n in seen["bad"].items():
        dlq_total = registry.get_sample_value(
            "rightfoot_poller_dlq_records_total", {"reason": reason}
        )
        invalid_total = registry.get_sample_value(
            "rightfoot_poller_invalid_input_total", {"source": "api", "reason": reason}
        )
        assert dlq_total == invalid_total == n, (reason, dlq_total, invalid_total, n)


# JSON can escape a lone UTF-16 surrogate ("\ud800"): valid JSON, but not a string that
# can be encoded as UTF-8 (for a Kafka key, an event id, a log line).
SURROGATES: list[tuple[str, str]] = [
    (record_text("a\\ud800", "1"), "invalid_field"),
    (record_text("s1", "1").replace(TS, TS + "\\udfff"), "invalid_field"),
    ('{"authorizer_unique_id":7,"x":"\\udc80"}', "missing_authorizer_unique_id"),
    ('"\\ud83d"', "not_an_object"),
]


async def test_lone_surrogates_are_dead_lettered_not_a_crash(
    start_service: ServiceFactory, sim_server: SimServer, topics: Topics, reader: TopicReader
) -> None:
    seen = await run_page_mix(
        start_service, sim_server, topics, reader, [r for r, _ in SURROGATES], seed=2
    )
    assert sorted(seen["bad"].elements()) == sorted(reason for _, reason in SURROGATES)
    assert (
        seen["service"].metrics.registry.get_sample_value(
            "rightfoot_poller_polls_total", {"result": "error"}
        )
        == 0
    )
