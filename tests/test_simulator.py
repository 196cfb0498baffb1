"""Tests of the Rightfoot API simulator, over real HTTP on loopback."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from rightfoot_simulator import (
    DEMO_CODES_BATCH_ID,
    DEMO_LARGE_BATCH_ID,
    DEMO_LATE_BATCH_ID,
    DEMO_METADATA_BATCH_ID,
    DEMO_MISSING_BATCH_ID,
    DOCUMENTED_STATUS_CODES,
    EXPORT_COLUMNS,
    PageRequest,
    SimRecord,
    Simulator,
    add_simulate_arguments,
    build_app,
    run_simulator,
    simulate_main,
)

ROOT = Path(__file__).resolve().parent.parent
KEY = "sim-key"
BATCH = "11111111-2222-4333-8444-555555555555"
OTHER = "99999999-8888-4777-8666-555555555555"
USER_AGENT = "rightfoot-poller/0.1.0 (pod-a)"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Api:
    sim: Simulator
    clock: FakeClock
    server: TestServer
    session: aiohttp.ClientSession

    async def get(
        self,
        path: str,
        params: Mapping[str, str] | list[tuple[str, str]] | None = None,
        *,
        key: str | None = KEY,
        timeout_s: float | None = None,
    ) -> tuple[aiohttp.ClientResponse, str]:
        headers = {"User-Agent": USER_AGENT}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        client_timeout = aiohttp.ClientTimeout(total=timeout_s)
        url = self.server.make_url(path)
        async with self.session.get(
            url, params=params, headers=headers, timeout=client_timeout
        ) as response:
            return response, await response.text()

    async def page(self, batch_id: str, **params: str) -> dict[str, Any]:
        response, text = await self.get("/v1/balances", {"batchId": batch_id, **params})
        assert response.status == 200, text
        body: dict[str, Any] = json.loads(text, parse_float=Decimal)
        return body

    async def control(self, path: str, body: object) -> tuple[int, Any]:
        async with self.session.post(self.server.make_url(path), json=body) as response:
            return response.status, await response.json()


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    clock = FakeClock()
    sim = Simulator(clock=clock, seed=7)
    server = TestServer(build_app(sim))
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield Api(sim, clock, server, session)
    finally:
        await server.close()


def record(uid: str, balance: str | None = "1.00", code: int = 0, at: float = 0.0) -> SimRecord:
    return SimRecord(
        authorizer_unique_id=uid,
        balance=None if balance is None else Decimal(balance),
        balance_status_code=code,
        timestamp="2024-08-09T18:10:44Z",
        visible_at=at,
    )


def error_code(text: str) -> str:
    code: str = json.loads(text)["error"]["code"]
    return code


# --------------------------------------------------------------------------- auth and validation


@pytest.mark.parametrize("key", [None, "wrong-key", ""])
async def test_unauthorized_has_the_documented_body(api: Api, key: str | None) -> None:
    api.sim.generate_batch(BATCH, 3)
    response, text = await api.get("/v1/balances", {"batchId": BATCH}, key=key)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    body = json.loads(text)
    assert set(body) == {"status", "status_code", "error", "documentation_url"}
    assert body["status"] == "error"
    assert body["status_code"] == 401
    assert set(body["error"]) == {"code", "message", "timestamp", "suggestion"}
    assert body["error"]["code"] == "UNAUTHORIZED"
    assert body["error"]["timestamp"].endswith("Z")


async def test_missing_batch_id_is_a_bad_request(api: Api) -> None:
    response, text = await api.get("/v1/balances")
    assert response.status == 400
    body = json.loads(text)
    assert body["error"]["code"] == "BAD_REQUEST"
    assert body["error"]["message"] == "Batch ID was not provided in the request."


@pytest.mark.parametrize("limit", ["0", "101", "abc", "", "1.5", "-1", "+5", "99999999999"])
async def test_invalid_limit_is_a_bad_request(api: Api, limit: str) -> None:
    api.sim.generate_batch(BATCH, 3)
    response, text = await api.get("/v1/balances", {"batchId": BATCH, "limit": limit})
    assert response.status == 400
    assert error_code(text) == "BAD_REQUEST"


@pytest.mark.parametrize(("limit", "size"), [("1", 1), ("100", 100), (None, 100)])
async def test_limit_bounds_the_page(api: Api, limit: str | None, size: int) -> None:
    api.sim.generate_batch(BATCH, 150)
    params = {} if limit is None else {"limit": limit}
    body = await api.page(BATCH, **params)
    assert len(body["balances"]) == size


async def test_snake_case_page_token_parameter_is_ignored(api: Api) -> None:
    api.sim.generate_batch(BATCH, 150)
    first = await api.page(BATCH)
    again = await api.page(BATCH, next_page_token=first["next_page_token"])
    assert again["balances"] == first["balances"]


# --------------------------------------------------------------------------- pagination


async def test_pages_through_a_250_record_batch(api: Api) -> None:
    records = api.sim.generate_batch(BATCH, 250)
    pages = [await api.page(BATCH, limit="100")]
    while pages[-1]["has_more"]:
        pages.append(await api.page(BATCH, limit="100", nextPageToken=pages[-1]["next_page_token"]))

    assert [len(p["balances"]) for p in pages] == [100, 100, 50]
    assert [p["has_more"] for p in pages] == [True, True, False]
    assert all(p["total_processed"] == 250 and p["batch_id"] == BATCH for p in pages)
    assert "next_page_token" not in pages[-1]
    tokens = [p["next_page_token"] for p in pages[:-1]]
    assert tokens[0] != tokens[1]
    assert all(BATCH not in t and "100" not in t for t in tokens)
    served = [b["authorizer_unique_id"] for p in pages for b in p["balances"]]
    assert served == [r.authorizer_unique_id for r in records]
    assert len(set(served)) == 250


async def test_records_appear_over_time_and_append(api: Api) -> None:
    api.sim.add_batch(
        BATCH, [record("c", at=20), record("a", at=0), record("b", at=10)], order="completion"
    )
    assert (await api.page(BATCH))["total_processed"] == 1

    api.clock.advance(15)
    first = await api.page(BATCH, limit="1")
    assert [b["authorizer_unique_id"] for b in first["balances"]] == ["a"]
    assert first["total_processed"] == 2

    api.clock.advance(10)  # "c" appears after the token was issued
    second = await api.page(BATCH, limit="1", nextPageToken=first["next_page_token"])
    assert [b["authorizer_unique_id"] for b in second["balances"]] == ["b"]
    assert second["has_more"] is True
    third = await api.page(BATCH, limit="1", nextPageToken=second["next_page_token"])
    assert [b["authorizer_unique_id"] for b in third["balances"]] == ["c"]
    assert third["has_more"] is False
    assert [r.authorizer_unique_id for r in api.sim.records_served(BATCH)] == ["a", "b", "c"]


async def test_an_empty_visible_batch_is_a_page_of_nothing(api: Api) -> None:
    api.sim.add_batch(BATCH, [record("a", at=30)])
    body = await api.page(BATCH)
    assert body == {"batch_id": BATCH, "total_processed": 0, "balances": [], "has_more": False}


# --------------------------------------------------------------------------- 404 and tokens


async def test_unknown_late_and_foreign_batches_are_not_found(api: Api) -> None:
    api.sim.set_api_keys([KEY, "other-key"])
    api.sim.generate_batch(BATCH, 5, visible_after=20)
    api.sim.generate_batch(OTHER, 5, owner_key="other-key")

    for batch_id in (BATCH, OTHER, DEMO_MISSING_BATCH_ID):
        response, text = await api.get("/v1/balances", {"batchId": batch_id})
        assert response.status == 404
        assert json.loads(text)["error"] == {
            "code": "NOT_FOUND",
            "message": "The specified batch ID does not exist.",
            "timestamp": json.loads(text)["error"]["timestamp"],
            "suggestion": "Please check the batch ID.",
        }
    assert api.sim.records_served(BATCH) == []

    api.clock.advance(20)
    assert (await api.page(BATCH))["total_processed"] == 5
    response, _ = await api.get("/v1/balances", {"batchId": OTHER}, key="other-key")
    assert response.status == 200


async def test_visible_at_counts_from_when_the_batch_appears(api: Api) -> None:
    api.sim.add_batch(BATCH, [record("a", at=0), record("b", at=5)], visible_after=10)
    api.clock.advance(12)
    assert [r.authorizer_unique_id for r in api.sim.records_served(BATCH)] == ["a"]


@pytest.mark.parametrize("tamper", ["invalidate", "flip", "garbage", "other_batch", "empty"])
async def test_bad_page_tokens_are_rejected(api: Api, tamper: str) -> None:
    api.sim.generate_batch(BATCH, 150)
    api.sim.generate_batch(OTHER, 150)
    token = (await api.page(BATCH))["next_page_token"]
    batch_id = BATCH
    if tamper == "invalidate":
        api.sim.invalidate_page_tokens()
    elif tamper == "flip":
        token = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    elif tamper == "garbage":
        token = "not a token!"
    elif tamper == "empty":
        token = ""
    else:
        batch_id = OTHER
    response, text = await api.get("/v1/balances", {"batchId": batch_id, "nextPageToken": token})
    assert response.status == 400
    assert error_code(text) == "INVALID_PAGE_TOKEN"
    assert (await api.page(batch_id))["total_processed"] == 150  # the first page still works


# --------------------------------------------------------------------------- record bodies


async def test_balances_are_sent_with_their_exact_digits(api: Api) -> None:
    values = ["123456789012345678.91", "-83.68", "0.10", "-0.01", "98765432109876543.21"]
    api.sim.add_batch(BATCH, [record(str(i), v) for i, v in enumerate(values)])
    response, text = await api.get("/v1/balances", {"batchId": BATCH})
    assert response.status == 200
    for value in values:
        assert f'"balance":{value},' in text
    body = json.loads(text, parse_float=Decimal)
    assert [str(b["balance"]) for b in body["balances"]] == values


async def test_record_shapes(api: Api) -> None:
    legacy = record("legacy", "5.00")
    legacy.legacy_only = True
    broken = record("broken")
    broken.raw_override = '"not an object"'
    partial = record("partial")
    partial.raw_override = '{"balance": 1}'
    failed = record("failed", None, 3300)
    api.sim.add_batch(BATCH, [legacy, failed, record("extra"), broken, partial])

    body = await api.page(BATCH)
    first, second, third, fourth, fifth = body["balances"]
    assert first == {
        "authorizer_unique_id": "legacy",
        "balance": Decimal("5.00"),
        "timestamp": "2024-08-09T18:10:44Z",
        "status_code": 0,
    }
    assert second["balance"] is None
    assert second["balance_status_code"] == second["status_code"] == 3300
    assert "institution_id" in third  # an unknown field clients must tolerate
    assert fourth == "not an object"
    assert fifth == {"balance": 1}


def test_non_finite_balances_are_refused() -> None:
    with pytest.raises(ValueError, match="not finite"):
        Simulator().add_batch(BATCH, [record("a", "NaN")])


def test_duplicate_batches_are_refused() -> None:
    sim = Simulator()
    sim.generate_batch(BATCH, 1)
    with pytest.raises(ValueError, match="already exists"):
        sim.generate_batch(BATCH, 1)


# --------------------------------------------------------------------------- faults


async def test_5xx_faults_cycle_through_500_502_503(api: Api) -> None:
    api.sim.generate_batch(BATCH, 5)
    api.sim.faults.error_5xx_next = 4
    answers = [await api.get("/v1/balances", {"batchId": BATCH}) for _ in range(5)]
    assert [r.status for r, _ in answers] == [500, 502, 503, 500, 200]
    assert error_code(answers[0][1]) == "INTERNAL_SERVER_ERROR"
    assert json.loads(answers[0][1])["status_code"] == 500
    assert answers[1][0].content_type == "text/html"
    assert "502 Bad Gateway" in answers[1][1]
    assert api.sim.faults.error_5xx_next == 0


async def test_5xx_until_a_clock_time(api: Api) -> None:
    api.sim.generate_batch(BATCH, 5)
    api.sim.faults.error_5xx_until = api.clock.now + 30
    response, _ = await api.get("/v1/balances", {"batchId": BATCH})
    assert response.status >= 500
    api.clock.advance(30)
    response, _ = await api.get("/v1/balances", {"batchId": BATCH})
    assert response.status == 200


async def test_rate_limit_sends_retry_after_rounded_up(api: Api) -> None:
    api.sim.generate_batch(BATCH, 5)
    api.sim.faults.rate_limit_next = 1
    api.sim.faults.retry_after_s = 1.2
    response, text = await api.get("/v1/balances", {"batchId": BATCH})
    assert response.status == 429
    assert response.headers["Retry-After"] == "2"
    assert error_code(text) == "RATE_LIMITED"
    response, _ = await api.get("/v1/balances", {"batchId": BATCH})
    assert response.status == 200


async def test_fault_rates_are_seeded_probabilities(api: Api) -> None:
    api.sim.generate_batch(BATCH, 5)
    api.sim.faults.error_5xx_rate = 1.0
    response, _ = await api.get("/v1/balances", {"batchId": BATCH})
    assert response.status == 500
    api.sim.faults.error_5xx_rate = 0.0
    api.sim.faults.rate_limit_rate = 1.0
    response, _ = await api.get("/v1/balances", {"batchId": BATCH})
    assert response.status == 429


async def test_latency_delays_every_api_request(api: Api) -> None:
    api.sim.generate_batch(BATCH, 5)
    api.sim.faults.latency_s = 0.2
    started = time.monotonic()
    response, _ = await api.get("/v1/balances", {"batchId": BATCH})
    assert response.status == 200
    assert time.monotonic() - started >= 0.2


async def test_hang_outlasts_the_client_timeout(api: Api) -> None:
    api.sim.generate_batch(BATCH, 5)
    api.sim.faults.hang_next = 1
    api.sim.faults.hang_s = 30
    with pytest.raises(asyncio.TimeoutError):
        await api.get("/v1/balances", {"batchId": BATCH}, timeout_s=0.3)
    response, _ = await api.get("/v1/balances", {"batchId": BATCH}, timeout_s=5)
    assert response.status == 200
    for _ in range(50):  # the abandoned request is logged once its handler is cancelled
        if len(api.sim.request_log) == 2:
            break
        await asyncio.sleep(0.02)
    assert sorted(e.status for e in api.sim.request_log) == [200, 499]


async def test_a_hanging_request_does_not_hold_up_shutdown() -> None:
    sim = Simulator()
    sim.generate_batch(BATCH, 5)
    sim.faults.hang_next = 1
    server = TestServer(build_app(sim))
    await server.start_server()
    async with aiohttp.ClientSession() as session:
        url = server.make_url("/v1/balances")
        headers = {"Authorization": f"Bearer {KEY}"}
        request = asyncio.create_task(session.get(url, params={"batchId": BATCH}, headers=headers))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await server.close()
        assert time.monotonic() - started < 10
        outcome = (await asyncio.gather(request, return_exceptions=True))[0]
        if isinstance(outcome, aiohttp.ClientResponse):
            outcome.release()


async def test_malformed_bodies_cycle_through_their_kinds(api: Api) -> None:
    api.sim.generate_batch(BATCH, 150)
    api.sim.faults.malformed_next = 4
    texts = [(await api.get("/v1/balances", {"batchId": BATCH}))[1] for _ in range(5)]
    with pytest.raises(json.JSONDecodeError):
        json.loads(texts[0])
    assert isinstance(json.loads(texts[1]), list)
    assert isinstance(json.loads(texts[2])["balances"], dict)
    assert json.loads(texts[3])["has_more"] == "yes"
    assert json.loads(texts[4])["has_more"] is True


async def test_reject_token_only_touches_requests_with_a_token(api: Api) -> None:
    api.sim.generate_batch(BATCH, 250)
    api.sim.faults.reject_token_next = 1
    first = await api.page(BATCH)
    token = first["next_page_token"]
    response, text = await api.get("/v1/balances", {"batchId": BATCH, "nextPageToken": token})
    assert response.status == 400
    assert error_code(text) == "INVALID_PAGE_TOKEN"
    again = await api.page(BATCH, nextPageToken=token)
    assert len(again["balances"]) == 100


async def test_a_rejected_token_can_be_answered_404(api: Api) -> None:
    api.sim.generate_batch(BATCH, 250)
    api.sim.faults.update({"reject_token_next": 1, "reject_token_with_404": True})
    token = (await api.page(BATCH))["next_page_token"]
    response, text = await api.get("/v1/balances", {"batchId": BATCH, "nextPageToken": token})
    assert response.status == 404 and error_code(text) == "NOT_FOUND"
    assert len((await api.page(BATCH, nextPageToken=token))["balances"]) == 100


async def test_a_rejected_token_can_be_answered_500_every_time(api: Api) -> None:
    api.sim.generate_batch(BATCH, 250, token_ttl_s=5)
    api.sim.faults.reject_token_with_500 = True
    token = (await api.page(BATCH))["next_page_token"]
    assert len((await api.page(BATCH, nextPageToken=token))["balances"]) == 100  # still fresh
    api.clock.advance(6)
    for _ in range(3):
        response, text = await api.get("/v1/balances", {"batchId": BATCH, "nextPageToken": token})
        assert response.status == 500 and error_code(text) == "INTERNAL_SERVER_ERROR"
    assert len((await api.page(BATCH))["balances"]) == 100  # the first page still answers


async def test_pending_says_more_without_a_token_and_negative_counts_until_all_appear(
    api: Api,
) -> None:
    records = [record("a", at=0), record("b", at=0), record("c", at=10)]
    api.sim.add_batch(BATCH, records, has_more="pending", total_processed="negative")
    first = await api.page(BATCH, limit="2")  # all that has appeared: a and b
    assert [r["authorizer_unique_id"] for r in first["balances"]] == ["a", "b"]
    assert first["has_more"] is True and first["total_processed"] == -1
    assert first.get("next_page_token") is None
    api.clock.advance(11)
    first = await api.page(BATCH, limit="2")
    last = await api.page(BATCH, limit="2", nextPageToken=first["next_page_token"])
    assert [r["authorizer_unique_id"] for r in last["balances"]] == ["c"]
    assert last["has_more"] is False and last["total_processed"] == 3


async def test_an_ignored_token_serves_the_first_page_again(api: Api) -> None:
    api.sim.generate_batch(BATCH, 250)
    first = await api.page(BATCH)
    api.sim.faults.ignore_token_next = 2
    for _ in range(2):
        again = await api.page(BATCH, nextPageToken=first["next_page_token"])
        assert again["balances"] == first["balances"] and again["has_more"] is True
    after = await api.page(BATCH, nextPageToken=first["next_page_token"])
    assert after["balances"] != first["balances"]  # the fault is used up: page two


async def test_forbidden_next_answers_403_with_an_error_body(api: Api) -> None:
    api.sim.generate_batch(BATCH, 5)
    api.sim.faults.forbidden_next = 1
    response, text = await api.get("/v1/balances", {"batchId": BATCH})
    assert response.status == 403 and error_code(text) == "FORBIDDEN"
    assert len((await api.page(BATCH))["balances"]) == 5


@pytest.mark.parametrize("order", ["completion", "submission"])
async def test_gaps_put_runs_of_empty_pages_between_the_pages_of_records(
    api: Api, order: str
) -> None:
    api.sim.generate_batch(BATCH, 5, order=order, gaps=3)
    pages: list[list[str]] = []
    body = await api.page(BATCH, limit="2")
    tokens = set()
    while True:
        pages.append([r["authorizer_unique_id"] for r in body["balances"]])
        if not body["has_more"]:
            break
        token = body["next_page_token"]
        assert token not in tokens  # a new token every page
        tokens.add(token)
        body = await api.page(BATCH, limit="2", nextPageToken=token)
    assert [len(p) for p in pages] == [2, 0, 0, 0, 2, 0, 0, 0, 1]
    listed = [uid for p in pages for uid in p]
    assert sorted(listed) == sorted(r.authorizer_unique_id for r in api.sim.all_records(BATCH))


async def test_only_batch_scopes_the_faults(api: Api) -> None:
    api.sim.generate_batch(BATCH, 5)
    api.sim.generate_batch(OTHER, 5)
    api.sim.faults.error_5xx_next = 1
    api.sim.faults.only_batch = OTHER
    response, _ = await api.get("/v1/balances", {"batchId": BATCH})
    assert response.status == 200
    response, _ = await api.get("/v1/balances", {"batchId": OTHER})
    assert response.status == 500


# --------------------------------------------------------------------------- CSV export


def parse_csv(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


async def test_export_columns_metadata_and_statuses(api: Api) -> None:
    codes = [0, 3000, 3001, 3100, 3200, 3300, 3310, 3400, 9000, 3500]
    records = [record(f"r{code}", "1.00" if code == 0 else None, code) for code in codes]
    records[0].metadata = {"zeta": "z, with comma", "alpha": "a"}
    records[1].metadata = {"beta": 'say "hi"'}
    records[0].institution = "Wells Fargo Bank, N.A."
    api.sim.add_batch(BATCH, records)
    api.sim.add_batch(OTHER, [record("o1", "123456789012345678.91")])

    response, text = await api.get(
        "/v1/balances/export", [("batch_ids", OTHER), ("batch_ids", BATCH)]
    )
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/csv; charset=utf-8"
    disposition = response.headers["Content-Disposition"]
    assert disposition.startswith('attachment; filename="batch-export-')
    assert disposition.endswith('.csv"')
    rows = parse_csv(text)
    assert rows[0] == [*EXPORT_COLUMNS, "meta_alpha", "meta_beta", "meta_zeta"]
    assert rows[1][:2] == ["o1", OTHER]
    assert rows[1][5] == "123456789012345678.91"
    by_id = {row[0]: row for row in rows[2:]}
    assert [row[1] for row in rows[2:]] == [BATCH] * len(codes)
    assert {code: by_id[f"r{code}"][6] for code in codes} == {
        0: "SUCCESS",
        3000: "NO_MATCH",
        3001: "NO_MATCH",
        3100: "NO_MATCH",
        3200: "ACCOUNT_CLOSED",
        3300: "BANK_UNSUPPORTED",
        3310: "BANK_UNSUPPORTED",
        3400: "NO_MATCH",
        9000: "PROCESSING_ERROR",
        3500: "RETRIEVAL_FAILED",
    }
    assert by_id["r0"][2] == "Wells Fargo Bank, N.A."
    assert by_id["r0"][5] == "1.00"
    assert by_id["r0"][9:] == ["a", "", "z, with comma"]
    assert by_id["r3000"][5] == ""
    assert by_id["r3000"][9:] == ["", 'say "hi"', ""]


async def test_export_without_metadata_has_nine_columns(api: Api) -> None:
    api.sim.add_batch(BATCH, [record("a"), record("late", at=60)])
    response, text = await api.get("/v1/balances/export", {"batch_ids": BATCH})
    assert response.status == 200
    assert parse_csv(text) == [
        list(EXPORT_COLUMNS),
        ["a", BATCH, "", "", "", "1.00", "SUCCESS", "", "2024-08-09T18:10:44Z"],
    ]


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ([], 400),
        ([("batch_ids", "not-a-uuid")], 400),
        ([("batch_ids", BATCH), ("batch_ids", "batch_12345ABCDE")], 400),
        ([("batch_ids", BATCH), ("batch_ids", DEMO_MISSING_BATCH_ID)], 403),
        ([("batch_ids", OTHER)], 403),
    ],
)
async def test_export_refusals(api: Api, params: list[tuple[str, str]], status: int) -> None:
    api.sim.set_api_keys([KEY, "other-key"])
    api.sim.generate_batch(BATCH, 3)
    api.sim.generate_batch(OTHER, 3, owner_key="other-key")
    response, text = await api.get("/v1/balances/export", params)
    assert response.status == status
    assert json.loads(text)["status_code"] == status


async def test_export_auth_and_5xx(api: Api) -> None:
    api.sim.generate_batch(BATCH, 3)
    response, _ = await api.get("/v1/balances/export", {"batch_ids": BATCH}, key=None)
    assert response.status == 401
    api.sim.faults.error_5xx_next = 1
    response, text = await api.get("/v1/balances/export", {"batch_ids": BATCH})
    assert response.status == 500
    assert error_code(text) == "INTERNAL_SERVER_ERROR"


async def test_export_streams_a_large_batch(api: Api) -> None:
    api.sim.generate_batch(BATCH, 250_000, with_metadata=True)
    url = api.server.make_url("/v1/balances/export")
    headers = {"Authorization": f"Bearer {KEY}"}
    lines = chunks = 0
    async with api.session.get(url, params={"batch_ids": BATCH}, headers=headers) as response:
        assert response.status == 200
        assert response.headers.get("Transfer-Encoding") == "chunked"
        async for chunk in response.content.iter_any():
            chunks += 1
            lines += chunk.count(b"\n")
    assert lines == 250_001
    assert chunks > 10


# --------------------------------------------------------------------------- request log


async def test_request_log_records_instance_and_batches(api: Api) -> None:
    api.sim.generate_batch(BATCH, 3)
    await api.page(BATCH, limit="2")
    await api.get("/v1/balances/export", [("batch_ids", BATCH), ("batch_ids", OTHER)])
    async with api.session.get(
        api.server.make_url("/v1/balances"), headers={"User-Agent": "curl/8.0"}
    ) as response:
        assert response.status == 401
    await api.control("/_sim/invalidate-tokens", {})

    first, export, anonymous = api.sim.request_log
    assert (first.method, first.path, first.batch_id, first.status) == (
        "GET",
        "/v1/balances",
        BATCH,
        200,
    )
    assert first.instance == "pod-a"
    assert first.user_agent == USER_AGENT
    assert "limit=2" in first.query
    assert first.started <= first.ended
    assert (export.batch_id, export.status) == (f"{BATCH},{OTHER}", 403)
    assert (anonymous.instance, anonymous.batch_id) == (None, None)


# --------------------------------------------------------------------------- control API


async def test_control_api(api: Api) -> None:
    status, faults = await api.control("/_sim/faults", {"error_5xx_next": 2, "only_batch": BATCH})
    assert status == 200
    assert (faults["error_5xx_next"], faults["only_batch"], faults["hang_s"]) == (2, BATCH, 60.0)
    assert api.sim.faults.error_5xx_next == 2
    status, faults = await api.control("/_sim/faults", {"error_5xx_for_s": 10})
    assert faults["error_5xx_until"] == api.clock.now + 10
    for bad in ({"nope": 1}, {"hang_next": "2"}, {"hang_next": 1.5}, {"latency_s": -1}, [1]):
        status, _ = await api.control("/_sim/faults", bad)
        assert status == 400, bad
    async with api.session.get(api.server.make_url("/_sim/faults")) as response:
        assert (await response.json())["error_5xx_next"] == 2

    status, created = await api.control(
        "/_sim/batches", {"batch_id": OTHER, "count": 7, "codes": [0, 3300], "seed": 1}
    )
    assert (status, created) == (201, {"batch_id": OTHER, "count": 7})
    status, _ = await api.control("/_sim/batches", {"batch_id": OTHER, "count": 7})
    assert status == 409
    status, _ = await api.control("/_sim/batches", {"count": "7"})
    assert status == 400
    async with api.session.get(api.server.make_url(f"/_sim/batches/{OTHER}/records")) as response:
        listed = await response.json()
    assert listed["count"] == 7
    assert isinstance(listed["records"][0]["balance"], str)
    assert listed["records"][1]["balance"] is None

    status, _ = await api.control("/_sim/keys", {"api_keys": ["new-key"]})
    assert status == 200
    response, _ = await api.get("/v1/balances", {"batchId": OTHER})
    assert response.status == 401
    response, _ = await api.get("/v1/balances", {"batchId": OTHER}, key="new-key")
    assert response.status == 200
    async with api.session.get(api.server.make_url("/_sim/requests")) as response:
        logged = (await response.json())["requests"]
    assert [e["status"] for e in logged] == [401, 200]


# --------------------------------------------------------------------------- generation and demo


def test_generated_batches_are_deterministic_and_well_formed() -> None:
    first = Simulator(seed=3).generate_batch(BATCH, 2000, spread_s=60, order="completion")
    again = Simulator(seed=3).generate_batch(BATCH, 2000, spread_s=60, order="completion")
    other = Simulator(seed=4).generate_batch(BATCH, 2000, spread_s=60, order="completion")
    assert first == again
    assert first != other
    assert len({r.authorizer_unique_id for r in first}) == 2000
    assert [r.visible_at for r in first] == sorted(r.visible_at for r in first)
    assert all(0 <= r.visible_at <= 60 for r in first)
    for r in first:
        assert (r.balance is None) == (r.balance_status_code != 0)
        assert r.balance is None or r.balance.as_tuple().exponent == -2
        assert r.timestamp.endswith("Z")
    balances = [r.balance for r in first if r.balance is not None]
    assert min(balances) < 0
    assert max(balances) > Decimal("10") ** 17


def test_generated_codes_are_assigned_in_turn() -> None:
    records = Simulator().generate_batch(BATCH, 6, codes=[0, 3300, 3500], seed=9)
    assert [r.balance_status_code for r in records] == [0, 3300, 3500] * 2
    with pytest.raises(ValueError, match="codes"):
        Simulator().generate_batch(BATCH, 6, codes=[])


def test_a_quarter_million_records_are_generated_quickly() -> None:
    started = time.monotonic()
    Simulator().generate_batch(BATCH, 250_000, spread_s=120)
    assert time.monotonic() - started < 10


async def test_demo_batches(api: Api) -> None:
    ids = api.sim.seed_demo(spread_s=120)
    assert ids == [
        DEMO_CODES_BATCH_ID,
        DEMO_LARGE_BATCH_ID,
        DEMO_LATE_BATCH_ID,
        DEMO_METADATA_BATCH_ID,
    ]
    codes = api.sim.all_records(DEMO_CODES_BATCH_ID)
    assert set(DOCUMENTED_STATUS_CODES) < {r.balance_status_code for r in codes}
    assert 3500 in {r.balance_status_code for r in codes}
    assert sum(r.legacy_only for r in codes) == 1
    assert Decimal("98765432109876543.21") in {r.balance for r in codes}
    assert len(api.sim.all_records(DEMO_LARGE_BATCH_ID)) == 1250
    assert all(r.metadata for r in api.sim.all_records(DEMO_METADATA_BATCH_ID))

    response, _ = await api.get("/v1/balances", {"batchId": DEMO_LATE_BATCH_ID})
    assert response.status == 404
    api.clock.advance(200)
    assert (await api.page(DEMO_LATE_BATCH_ID))["total_processed"] == 40
    assert (await api.page(DEMO_CODES_BATCH_ID))["total_processed"] == len(codes)


# --------------------------------------------------------------------------- serving


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_until_serving(url: str) -> int:
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            try:
                async with session.get(url) as response:
                    return response.status
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.02)
    raise AssertionError(f"nothing answered at {url}")


async def test_run_simulator_serves_until_cancelled() -> None:
    port = free_port()
    task = asyncio.create_task(run_simulator("127.0.0.1", port, Simulator()))
    assert await wait_until_serving(f"http://127.0.0.1:{port}/_sim/faults") == 200
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_simulate_main_stops_on_sigterm() -> None:
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    port = free_port()
    args = parser.parse_args(["--port", str(port), "--api-key", "k1", "--demo-spread-s", "5"])
    task = asyncio.create_task(simulate_main(args))
    url = f"http://127.0.0.1:{port}/_sim/batches"
    assert await wait_until_serving(url) == 200
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # else SIGTERM kills pytest
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(task, timeout=10) == 0


# --------------------------------------------------------------------------- page-request hook


async def test_the_page_request_hook_sees_batch_token_cursor_and_sequence(api: Api) -> None:
    api.sim.generate_batch(BATCH, 250, order="completion")
    api.sim.add_batch(OTHER, [record("x", at=2), record("y", at=1)], order="submission")
    api.clock.advance(5)
    seen: list[PageRequest] = []
    api.sim.on_page_request = seen.append  # a plain function: nothing to wait for

    pages = [await api.page(BATCH, limit="100")]
    while pages[-1]["has_more"]:
        pages.append(await api.page(BATCH, limit="100", nextPageToken=pages[-1]["next_page_token"]))
    await api.page(BATCH, limit="100")  # a re-read from the first page
    tokens = [p["next_page_token"] for p in pages[:-1]]
    assert seen == [
        PageRequest(BATCH, None, None, 0, 100, 1, "pod-a"),
        PageRequest(BATCH, tokens[0], 100, 100, 100, 2, "pod-a"),
        PageRequest(BATCH, tokens[1], 200, 200, 100, 3, "pod-a"),
        PageRequest(BATCH, None, None, 0, 100, 4, "pod-a"),
    ]

    # Submission order: the cursor is the position of the last record listed, not an offset.
    first = await api.page(OTHER, limit="1")
    await api.page(OTHER, limit="1", nextPageToken=first["next_page_token"])
    assert seen[-2:] == [
        PageRequest(OTHER, None, None, 0, 1, 1, "pod-a"),
        PageRequest(OTHER, first["next_page_token"], 0, None, 1, 2, "pod-a"),
    ]

    # Requests that are not answered with a page never reach it, nor count.
    await api.get("/v1/balances", {"batchId": BATCH}, key="wrong-key")  # 401
    await api.get("/v1/balances", {"batchId": BATCH, "limit": "0"})  # 400
    await api.get("/v1/balances", {"batchId": DEMO_MISSING_BATCH_ID})  # 404
    await api.get("/v1/balances", {"batchId": BATCH, "nextPageToken": "garbage"})  # 400
    api.sim.faults.error_5xx_next = 1
    await api.get("/v1/balances", {"batchId": BATCH})  # 500
    await api.get("/v1/balances/export", [("batch_ids", BATCH)])  # not a page
    assert len(seen) == 6
    response, _ = await api.get("/v1/balances", {"batchId": BATCH})
    assert response.status == 200
    assert seen[-1].sequence == 5
    async with api.session.get(
        api.server.make_url("/v1/balances"),
        params={"batchId": BATCH},
        headers={"Authorization": f"Bearer {KEY}", "User-Agent": "curl/8.0"},
    ) as anonymous:
        assert anonymous.status == 200
    assert (seen[-1].instance, seen[-1].sequence) == (None, 6)


async def test_an_awaiting_page_request_hook_holds_the_response(api: Api) -> None:
    api.sim.add_batch(BATCH, [record("a", at=0), record("b", at=10)])
    called, release = asyncio.Event(), asyncio.Event()

    async def hold(page_request: PageRequest) -> None:
        called.set()
        await release.wait()

    api.sim.on_page_request = hold
    response = asyncio.create_task(api.get("/v1/balances", {"batchId": BATCH}))
    await asyncio.wait_for(called.wait(), timeout=5)
    await asyncio.sleep(0.2)
    assert not response.done()
    assert api.sim.request_log == []  # still outstanding
    api.clock.advance(10)  # "b" appears while the page is held: the page shows it
    release.set()
    answer, text = await asyncio.wait_for(response, timeout=5)
    assert answer.status == 200
    body = json.loads(text)
    assert body["total_processed"] == 2
    assert [b["authorizer_unique_id"] for b in body["balances"]] == ["a", "b"]
    assert [e.status for e in api.sim.request_log] == [200]


async def test_without_a_page_request_hook_pages_are_unchanged(api: Api) -> None:
    api.sim.generate_batch(BATCH, 150)
    params = {"batchId": BATCH, "limit": "100"}
    _, plain = await api.get("/v1/balances", params)
    token = json.loads(plain)["next_page_token"]
    _, plain_next = await api.get("/v1/balances", {**params, "nextPageToken": token})

    async def nothing(page_request: PageRequest) -> None:
        return None

    for hook in (lambda page_request: None, nothing):
        api.sim.on_page_request = hook
        assert (await api.get("/v1/balances", params))[1] == plain
        assert (await api.get("/v1/balances", {**params, "nextPageToken": token}))[1] == plain_next
    api.sim.on_page_request = None
    assert (await api.get("/v1/balances", params))[1] == plain


async def test_a_failing_page_request_hook_answers_500(api: Api) -> None:
    api.sim.generate_batch(BATCH, 3)

    async def fail(page_request: PageRequest) -> None:
        raise RuntimeError("boom")

    api.sim.on_page_request = fail
    response, _ = await api.get("/v1/balances", {"batchId": BATCH})
    assert response.status == 500
    assert [e.status for e in api.sim.request_log] == [500]


async def test_a_held_page_does_not_hold_up_shutdown() -> None:
    sim = Simulator()
    sim.generate_batch(BATCH, 5)
    held: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    sim.on_page_request = lambda page_request: held  # never resolved by the test
    server = TestServer(build_app(sim))
    await server.start_server()
    async with aiohttp.ClientSession() as session:
        url = server.make_url("/v1/balances")
        headers = {"Authorization": f"Bearer {KEY}"}
        request = asyncio.create_task(session.get(url, params={"batchId": BATCH}, headers=headers))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await server.close()
        assert time.monotonic() - started < 10
        assert not held.cancelled()  # the hook's own future is left alone
        outcome = (await asyncio.gather(request, return_exceptions=True))[0]
        if isinstance(outcome, aiohttp.ClientResponse):
            outcome.release()


# --------------------------------------------------------------------------- not in the product


def test_the_service_never_loads_the_simulator() -> None:
    """No module of ``service`` imports ``rightfoot_simulator``, nor does any command but
    ``simulate`` (whose options come from it, added only when it is parsed)."""
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        import service, service.app, service.cli

        for module in pkgutil.iter_modules(service.__path__):
            if module.name != "__main__":
                importlib.import_module(f"service.{module.name}")
        parser = service.cli.build_parser()
        for argv in (["run"], ["track", "b"], ["export", "b", "-o", "-"], ["check-config"]):
            parser.parse_args(argv)
        loaded = [m for m in sys.modules if m.split(".")[0] == "rightfoot_simulator"]
        assert not loaded, f"the service loaded {loaded}"
        args = parser.parse_args(["simulate", "--port", "8100", "--no-demo"])
        assert (args.port, args.no_demo, args.log_level) == (8100, True, "INFO")
        assert "rightfoot_simulator" in sys.modules
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
