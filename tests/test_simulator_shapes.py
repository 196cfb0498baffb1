"""The simulator's batch shapes that the vendor pages allow but the default does not make.

* ``order="submission"``: the list keeps submission order and each record is listed once
  it has finished, so records appear at positions a client has already paged past;
* ``total_processed="absent"`` and ``count_skew``: a count that is missing or wrong;
* ``page_size`` and ``has_more="full_page"``: pages of the vendor's own size, whatever
  ``limit`` asks, and ``has_more`` on every full page (an empty page can end the list);
* the ``token_loop_next`` fault: a page whose ``next_page_token`` leads back to itself;
* ``token_ttl_s``: page tokens that expire;
* lazy batches: a million records derived on demand, in a few seconds and a few MB.

All pure (no Kafka), over real HTTP on loopback with an injected clock.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import io
import json
import random
import time
import tracemalloc
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from test_simulator import FakeClock

from rightfoot_simulator import (
    EXPORT_COLUMNS,
    LAZY_THRESHOLD,
    LazyRecords,
    SimRecord,
    Simulator,
    build_app,
)

KEY = "sim-key"
BATCH = "11111111-2222-4333-8444-555555555555"
OTHER = "99999999-8888-4777-8666-555555555555"
MILLION = 1_000_000


@dataclass
class Api:
    sim: Simulator
    clock: FakeClock
    server: TestServer
    session: aiohttp.ClientSession

    async def get(
        self, path: str, params: Mapping[str, str] | list[tuple[str, str]] | None = None
    ) -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {KEY}"}
        url = self.server.make_url(path)
        async with self.session.get(url, params=params, headers=headers) as response:
            return response.status, await response.text()

    async def page(self, batch_id: str, token: str | None = None, limit: int = 100) -> Page:
        params = {"batchId": batch_id, "limit": str(limit)}
        if token is not None:
            params["nextPageToken"] = token
        status, text = await self.get("/v1/balances", params)
        assert status == 200, text
        return Page(json.loads(text, parse_float=Decimal))

    async def read_all(self, batch_id: str, token: str | None = None, limit: int = 100) -> Read:
        """Follow ``has_more`` from ``token`` (None: the first page) to the end."""
        pages = [await self.page(batch_id, token, limit)]
        while pages[-1].has_more:
            assert len(pages) < 1000, "paging does not end"
            pages.append(await self.page(batch_id, pages[-1].token, limit))
        return Read(pages)

    async def control(self, path: str, body: object) -> tuple[int, Any]:
        async with self.session.post(self.server.make_url(path), json=body) as response:
            return response.status, await response.json()

    async def inspect(self, path: str) -> Any:
        async with self.session.get(self.server.make_url(path)) as response:
            assert response.status == 200
            return await response.json()


@dataclass
class Page:
    body: dict[str, Any]

    @property
    def ids(self) -> list[str]:
        # "omit_empty": an empty page has no balances
        return [b["authorizer_unique_id"] for b in self.body.get("balances", [])]

    @property
    def has_more(self) -> bool:
        """``has_more``; a page without it (``has_more="absent"``) has more if it has a token."""
        if "has_more" not in self.body:
            return "next_page_token" in self.body
        value = self.body["has_more"]
        assert isinstance(value, bool)
        return value

    @property
    def token(self) -> str | None:
        return self.body.get("next_page_token")


@dataclass
class Read:
    pages: list[Page]

    @property
    def ids(self) -> list[str]:
        return [uid for p in self.pages for uid in p.ids]

    @property
    def last_token(self) -> str | None:
        """The last token the reader held: the one that fetched its last page."""
        tokens = [p.token for p in self.pages[:-1]]
        return tokens[-1] if tokens else None


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


def record(uid: str, at: float = 0.0, stamp: str = "2024-08-09T18:10:44Z") -> SimRecord:
    return SimRecord(
        authorizer_unique_id=uid,
        balance=Decimal("1.00"),
        balance_status_code=0,
        timestamp=stamp,
        visible_at=at,
    )


def ids(records: Sequence[SimRecord]) -> list[str]:
    return [r.authorizer_unique_id for r in records]


# --------------------------------------------------------------------------- submission order


async def test_submission_order_lists_records_by_position_once_they_finish(api: Api) -> None:
    finish = {"p0": 30, "p1": 0, "p2": 20, "p3": 0, "p4": 10}
    api.sim.add_batch(BATCH, [record(u, at) for u, at in finish.items()], order="submission")

    seen = []
    for _ in range(4):
        page = await api.page(BATCH)
        visible = [u for u, at in finish.items() if at <= api.clock.now - 1000]
        assert page.ids == visible  # submission order, only the finished ones
        assert page.body["total_processed"] == len(visible)
        assert ids(api.sim.records_served(BATCH)) == visible
        seen.append(page.ids)
        api.clock.advance(10)
    assert seen == [["p1", "p3"], ["p1", "p3", "p4"], ["p1", "p2", "p3", "p4"], list(finish)]
    assert ids(api.sim.all_records(BATCH)) == list(finish)
    assert api.sim.record_count(BATCH) == 5


async def test_resuming_from_the_last_token_misses_records_behind_the_cursor(api: Api) -> None:
    """The vendor's shape: a record finishing behind a client's cursor is never listed to
    a client that only resumes; a full re-read from the first page sees everything once."""
    late = {1, 3, 9}  # 1 and 3 finish behind where the client will be; 9 ahead of it
    records = [record(f"r{i}", at=50.0 if i in late else 0.0) for i in range(10)]
    api.sim.add_batch(BATCH, records, order="submission")

    first = await api.read_all(BATCH, limit=3)
    assert [p.ids for p in first.pages] == [["r0", "r2", "r4"], ["r5", "r6", "r7"], ["r8"]]
    assert first.pages[-1].token is None
    assert api.sim.page_token_cursor(BATCH, first.last_token or "") == 7

    api.clock.advance(60)
    resumed = await api.read_all(BATCH, first.last_token, limit=3)
    assert resumed.ids == ["r8", "r9"]  # r9 finished ahead of the cursor: seen
    have = set(first.ids) | set(resumed.ids)
    assert sorted({f"r{i}" for i in range(10)} - have) == ["r1", "r3"]  # missed for good
    assert resumed.pages[-1].body["total_processed"] == 10 > len(have)  # the count tells

    again = await api.read_all(BATCH, limit=3)
    assert again.ids == [f"r{i}" for i in range(10)]  # each visible record exactly once


async def test_completion_order_never_lists_behind_the_cursor(api: Api) -> None:
    """For contrast: the same batch, and resuming sees everything."""
    late = {1, 3, 9}
    records = [record(f"r{i}", at=50.0 if i in late else 0.0) for i in range(10)]
    api.sim.add_batch(BATCH, records, order="completion")
    first = await api.read_all(BATCH, limit=3)
    api.clock.advance(60)
    resumed = await api.read_all(BATCH, first.last_token, limit=3)
    assert set(first.ids) | set(resumed.ids) == {f"r{i}" for i in range(10)}


async def test_page_tokens_name_the_position_of_the_last_record_listed(api: Api) -> None:
    rng = random.Random(1)
    records = [record(f"r{i}", at=rng.choice([0.0, 99.0])) for i in range(40)]
    api.sim.add_batch(BATCH, records, order="submission")
    api.sim.add_batch(OTHER, records, order="completion")  # the token is a count
    positions = {r.authorizer_unique_id: i for i, r in enumerate(records)}

    read = await api.read_all(BATCH, limit=4)
    assert len(read.pages) > 2
    for page in read.pages[:-1]:
        assert page.token is not None
        assert api.sim.page_token_cursor(BATCH, page.token) == positions[page.ids[-1]]
        assert api.sim.page_token_cursor(OTHER, page.token) is None  # tied to its batch
    completion = await api.read_all(OTHER, limit=4)
    for n, page in enumerate(completion.pages[:-1], start=1):
        assert api.sim.page_token_cursor(OTHER, page.token or "") == 4 * n


def pages_by_model(visible: list[bool], limit: int) -> list[tuple[list[int], bool]]:
    """The documented paging, spelled out: after position p, the first ``limit`` visible
    positions > p; has_more iff a visible position follows the last one returned."""
    shown = [i for i, v in enumerate(visible) if v]
    pages, after = [], -1
    while True:
        page = [i for i in shown if i > after][:limit]
        last = page[-1] if page else after
        has_more = any(i > last for i in shown)
        pages.append((page, has_more))
        if not has_more:
            return pages
        after = last


@pytest.mark.parametrize("seed", range(6))
async def test_has_more_and_pages_match_the_documented_model(api: Api, seed: int) -> None:
    rng = random.Random(seed)
    count, limit = rng.randrange(0, 60), rng.randrange(1, 9)
    times = [rng.choice([0.0, 10.0, 20.0, 30.0]) for _ in range(count)]
    api.sim.add_batch(BATCH, [record(f"r{i}", t) for i, t in enumerate(times)], order="submission")
    for elapsed in (0.0, 10.0, 25.0, 30.0):
        api.clock.now = 1000.0 + elapsed
        visible = [t <= elapsed for t in times]
        read = await api.read_all(BATCH, limit=limit)
        got = [([int(u[1:]) for u in p.ids], p.has_more) for p in read.pages]
        assert got == pages_by_model(visible, limit), (count, limit, elapsed)
        assert {p.body["total_processed"] for p in read.pages} == {sum(visible)}


async def test_has_more_is_false_when_only_unfinished_records_follow(api: Api) -> None:
    records = [record("a"), record("b"), record("c", at=99), record("d")]
    api.sim.add_batch(BATCH, records, order="submission")
    page = await api.page(BATCH, limit=2)
    assert (page.ids, page.has_more) == (["a", "b"], True)
    last = await api.page(BATCH, page.token, limit=1)
    assert (last.ids, last.has_more, last.token) == (["d"], False, None)
    whole = await api.page(BATCH, limit=3)
    assert (whole.ids, whole.has_more) == (["a", "b", "d"], False)


async def test_generated_submission_batches_finish_out_of_order(api: Api) -> None:
    records = api.sim.generate_batch(BATCH, 300, spread_s=60, seed=4, order="submission")
    completion = Simulator().generate_batch(BATCH, 300, spread_s=60, seed=4, order="completion")
    times = [r.visible_at for r in records]
    assert times != sorted(times)  # each record has its own time: not sorted by index
    assert sorted(times) == [r.visible_at for r in completion]  # the same draws
    assert ids(records) == ids(completion)  # and otherwise the same records

    api.clock.advance(30)
    served = (await api.read_all(BATCH)).pages
    listed = [b for p in served for b in p.body["balances"]]
    by_id = {r.authorizer_unique_id: r for r in records}
    assert [b["authorizer_unique_id"] for b in listed] == [
        r.authorizer_unique_id for r in records if r.visible_at <= 30
    ]
    stamps = [b["timestamp"] for b in listed]
    assert stamps != sorted(stamps)  # out of time order, as in the vendor's example
    for b in listed:  # each timestamp is when that record finished
        finished = by_id[b["authorizer_unique_id"]]
        assert b["timestamp"] == finished.timestamp
    by_finish = sorted(records, key=lambda r: r.visible_at)
    assert [r.timestamp for r in by_finish] == sorted(r.timestamp for r in records)


def test_completion_order_generation_is_unchanged() -> None:
    """Completion order's generation, pinned to what it was before the shapes were added."""
    records = Simulator(seed=3).generate_batch(
        BATCH, 500, spread_s=60, with_metadata=True, order="completion"
    )
    text = "\n".join(
        f"{r.authorizer_unique_id}|{r.balance}|{r.balance_status_code}|{r.timestamp}|"
        f"{r.visible_at!r}|{r.phone}|{r.zip}|{r.institution}|{sorted(r.metadata.items())}"
        for r in records
    )
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert digest == "e1e6a9bab29f436c8ef8c266b29395755291348aee5a3ae8df151b21dabfb848"
    assert isinstance(records, list)


async def test_an_iterator_keeps_the_visible_set_of_when_it_was_made(api: Api) -> None:
    api.sim.add_batch(
        BATCH,
        [record("a"), record("b", at=10), record("c"), record("d", at=10)],
        order="submission",
    )
    snapshot = api.sim.iter_records(BATCH, visible_only=True)
    api.clock.advance(10)
    assert (await api.page(BATCH)).ids == ["a", "b", "c", "d"]  # the map moves on
    assert ids(list(snapshot)) == ["a", "c"]


# --------------------------------------------------------------------------- total_processed


async def test_total_processed_can_be_absent(api: Api) -> None:
    api.sim.add_batch(
        BATCH,
        [record(f"r{i}", at=5.0 * (i % 2)) for i in range(7)],
        total_processed="absent",
        count_skew=3,
        order="completion",
    )
    assert "total_processed" not in (await api.page(BATCH)).body
    api.clock.advance(5)
    read = await api.read_all(BATCH, limit=3)
    assert len(read.pages) == 3
    assert all("total_processed" not in p.body for p in read.pages)
    assert (
        read.ids == ids(api.sim.records_served(BATCH)) == ["r0", "r2", "r4", "r6", "r1", "r3", "r5"]
    )

    api.sim.generate_batch(OTHER, 0, total_processed="absent", order="submission")
    assert (await api.page(OTHER)).body == {"batch_id": OTHER, "balances": [], "has_more": False}


@pytest.mark.parametrize(("skew", "expected"), [(5, [7, 10]), (-3, [0, 2]), (-10, [0, 0])])
async def test_count_skew_makes_the_count_wrong(api: Api, skew: int, expected: list[int]) -> None:
    records = [record(f"r{i}", at=0.0 if i < 2 else 9.0) for i in range(5)]
    api.sim.add_batch(BATCH, records, count_skew=skew, order="submission")
    counts = []
    for _ in range(2):
        read = await api.read_all(BATCH, limit=2)
        counts.append(read.pages[0].body["total_processed"])
        assert {p.body["total_processed"] for p in read.pages} == {counts[-1]}
        api.clock.advance(10)
    assert counts == expected
    assert len((await api.read_all(BATCH)).ids) == 5  # what is listed does not change


async def test_skew_applies_in_completion_order_and_to_malformed_pages(api: Api) -> None:
    api.sim.generate_batch(BATCH, 120, count_skew=5)
    first = await api.page(BATCH)
    assert first.body["total_processed"] == 125
    last = await api.page(BATCH, first.token)
    assert (len(last.ids), last.has_more) == (20, False)  # five are never listed
    api.sim.faults.malformed_next = 4
    texts = [(await api.get("/v1/balances", {"batchId": BATCH}))[1] for _ in range(4)]
    assert '"total_processed":125' in texts[2]


@pytest.mark.parametrize(
    "options",
    [
        {"order": "random"},
        {"total_processed": "approximate"},
        {"count_skew": 1.5},
        {"count_skew": True},
        {"page_size": 0},
        {"page_size": 2.0},
        {"page_size": True},
        {"has_more": "always"},
        {"token_ttl_s": 0},
        {"token_ttl_s": -1.0},
        {"token_ttl_s": True},
    ],
)
def test_bad_shapes_are_refused(options: dict[str, Any]) -> None:
    sim = Simulator()
    with pytest.raises(ValueError, match=next(iter(options))):
        sim.add_batch(BATCH, [record("a")], **options)
    with pytest.raises(ValueError, match=next(iter(options))):
        sim.generate_batch(BATCH, 5, lazy=True, **options)
    assert sim.batch_ids() == []


# --------------------------------------------------------------------------- control API


async def test_control_api_makes_every_shape(api: Api) -> None:
    body = {
        "batch_id": BATCH,
        "count": 250,
        "spread_s": 100,
        "seed": 3,
        "order": "submission",
        "total_processed": "exact",
        "count_skew": 4,
        "lazy": True,
    }
    status, created = await api.control("/_sim/batches", body)
    assert (status, created) == (201, {"batch_id": BATCH, "count": 250})
    status, _ = await api.control("/_sim/batches", {"batch_id": OTHER, "count": 9, "lazy": False})
    assert status == 201

    api.clock.advance(50)
    page = await api.page(BATCH)
    visible = api.sim.records_served(BATCH)
    assert page.body["total_processed"] == len(visible) + 4
    assert page.ids == ids(visible)[:100]
    assert ids(visible) == sorted(ids(visible))  # submission order is ascending IDs
    assert 0 < len(visible) < 250

    listing = (await api.inspect("/_sim/batches"))["batches"]
    assert listing == [
        {"batch_id": BATCH, "visible": len(visible), "total": 250},
        {"batch_id": OTHER, "visible": 9, "total": 9},
    ]
    status, _ = await api.control(
        "/_sim/batches",
        {"batch_id": str(BATCH[:-1] + "6"), "count": 3, "total_processed": "absent"},
    )
    assert status == 201
    assert "total_processed" not in (await api.page(BATCH[:-1] + "6")).body


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("order", "random", "order must be one of 'completion', 'submission'"),
        ("order", 1, "order must be of type str"),
        (
            "total_processed",
            "maybe",
            "total_processed must be one of 'exact', 'absent', 'negative'",
        ),
        ("total_processed", False, "total_processed must be of type str"),
        ("count_skew", "5", "count_skew must be of type int"),
        ("count_skew", 2.5, "count_skew must be of type int"),
        ("count_skew", True, "count_skew must be of type int"),
        ("lazy", "yes", "lazy must be of type bool"),
        ("lazy", 1, "lazy must be of type bool"),
        ("page_size", 0, "page_size must be an integer >= 1 (or null)"),
        ("page_size", "7", "page_size must be an integer >= 1 (or null)"),
        (
            "has_more",
            "always",
            "has_more must be one of 'exact', 'full_page', 'absent', 'omit_empty', 'pending'",
        ),
        ("token_ttl_s", 0, "token_ttl_s must be a number > 0 (or null)"),
        ("token_ttl_s", "5", "token_ttl_s must be a number > 0 (or null)"),
    ],
)
async def test_control_api_refuses_bad_shapes(
    api: Api, field: str, value: object, message: str
) -> None:
    status, body = await api.control("/_sim/batches", {"batch_id": BATCH, "count": 5, field: value})
    assert (status, body) == (400, {"error": message})
    assert api.sim.batch_ids() == []


async def test_control_records_of_a_lazy_batch_stream_and_slice(api: Api) -> None:
    api.sim.generate_batch(BATCH, 5000, spread_s=10, order="submission", lazy=True)
    api.clock.advance(5)
    visible = api.sim.records_served(BATCH)
    whole = await api.inspect(f"/_sim/batches/{BATCH}/records")
    assert whole["count"] == len(visible) == len(whole["records"])
    assert [r["authorizer_unique_id"] for r in whole["records"]] == ids(visible)
    assert whole["records"][0]["visible_at"] == visible[0].visible_at
    assert {type(r["balance"]) for r in whole["records"]} == {str, type(None)}
    part = await api.inspect(f"/_sim/batches/{BATCH}/records?offset=10&limit=7")
    assert part["count"] == 7
    assert part["records"] == whole["records"][10:17]
    api.sim.generate_batch(OTHER, 30)  # eager: the same slicing
    part = await api.inspect(f"/_sim/batches/{OTHER}/records?offset=25&limit=10")
    assert [r["authorizer_unique_id"] for r in part["records"]] == ids(api.sim.all_records(OTHER))[
        25:
    ]
    async with api.session.get(
        api.server.make_url(f"/_sim/batches/{OTHER}/records?limit=-1")
    ) as response:
        assert response.status == 400


# --------------------------------------------------------------------------- lazy batches


def test_lazy_is_automatic_above_the_threshold_and_can_be_refused() -> None:
    sim = Simulator()
    small = sim.generate_batch("small", 50)
    big = sim.generate_batch("big", LAZY_THRESHOLD + 1)
    forced = sim.generate_batch("forced", 50, lazy=True)
    assert isinstance(small, list)
    assert isinstance(big, LazyRecords) and len(big) == LAZY_THRESHOLD + 1
    assert isinstance(forced, LazyRecords)
    assert isinstance(sim.generate_batch("eager", LAZY_THRESHOLD + 1, lazy=False), list)
    assert isinstance(sim.generate_batch("edge", LAZY_THRESHOLD), list)
    with pytest.raises(ValueError, match="already exists"):
        sim.generate_batch("big", 5, lazy=True)
    with pytest.raises(ValueError, match="count"):
        sim.generate_batch("negative", -1, lazy=True)


@pytest.mark.parametrize("order", ["completion", "submission"])
def test_lazy_records_are_well_formed(order: str) -> None:
    sim = Simulator(seed=2)
    records = sim.generate_batch(BATCH, 20_000, spread_s=60, order=order, lazy=True)
    listed = list(records)
    assert listed == list(sim.iter_records(BATCH)) == sim.all_records(BATCH)
    assert records[-1] == listed[-1] and records[5:8] == listed[5:8]
    assert len({r.authorizer_unique_id for r in listed}) == 20_000
    assert ids(listed) == sorted(ids(listed))  # list order: ascending IDs in both orders
    times = [r.visible_at for r in listed]
    assert all(0 <= t <= 60 for t in times)
    assert (times == sorted(times)) == (order == "completion")
    for r in listed:
        assert (r.balance is None) == (r.balance_status_code != 0)
        assert r.balance is None or r.balance.as_tuple().exponent == -2
        assert r.timestamp.endswith("Z")
    finished = sorted(listed, key=lambda r: r.visible_at)
    assert [r.timestamp for r in finished] == sorted(r.timestamp for r in listed)
    balances = [r.balance for r in listed if r.balance is not None]
    assert min(balances) < 0 and max(balances) > Decimal(10) ** 17
    success = sum(r.balance_status_code == 0 for r in listed) / len(listed)
    assert 0.82 < success < 0.88
    assert {r.balance_status_code for r in listed} > {0, 3001, 9000}
    assert sum(bool(r.phone) for r in listed) == sum(1 for i in range(20_000) if i % 3)


def test_lazy_codes_and_metadata_follow_the_eager_rules() -> None:
    sim = Simulator()
    records = sim.generate_batch(BATCH, 7, codes=[0, 3300, 3500], with_metadata=True, lazy=True)
    eager = Simulator().generate_batch(BATCH, 7, codes=[0, 3300, 3500], with_metadata=True)
    assert [r.balance_status_code for r in records] == [0, 3300, 3500] * 2 + [0]
    assert [r.metadata for r in records] == [r.metadata for r in eager]


@pytest.mark.parametrize("order", ["completion", "submission"])
async def test_a_million_lazy_records(api: Api, order: str) -> None:
    records = api.sim.generate_batch(BATCH, MILLION, spread_s=1000, seed=11, order=order)
    assert isinstance(records, LazyRecords)  # made as they are read, not all at once
    assert api.sim.record_count(BATCH) == len(records) == MILLION

    api.clock.advance(1)  # about a thousand visible: read them all over HTTP
    visible = list(api.sim.iter_records(BATCH, visible_only=True))
    assert 800 < len(visible) < 1200
    read = await api.read_all(BATCH)
    assert read.ids == ids(visible)
    assert {p.body["total_processed"] for p in read.pages} == {len(visible)}
    first_id = int(records[0].authorizer_unique_id)
    first_ids = [f"{first_id + i:07d}" for i in range(MILLION)]
    if order == "completion":  # a prefix; in submission order spread over the list
        assert read.ids == first_ids[: len(visible)]
    else:
        assert int(read.ids[-1]) - int(read.ids[0]) > 900_000

    api.clock.advance(1000)  # all visible: pages stay cheap
    page = await api.page(BATCH)
    assert page.body["total_processed"] == MILLION
    assert page.ids == first_ids[:100] == ids(records[:100])
    started = time.monotonic()
    token = page.token
    for _ in range(50):
        page = await api.page(BATCH, token)
        token = page.token
    per_page = (time.monotonic() - started) / 50
    assert page.ids == first_ids[5000:5100]
    assert per_page < 0.05, per_page  # HTTP included; the page itself is well under 2 ms

    served = page.body["balances"]
    for got, want in zip(served, records[5000:5100], strict=True):
        assert got["authorizer_unique_id"] == want.authorizer_unique_id
        assert got["balance"] == want.balance
        assert got["timestamp"] == want.timestamp
        assert got["status_code"] == want.balance_status_code


def test_lazy_records_are_deterministic() -> None:
    def sample(sim: Simulator, batch_id: str, **options: Any) -> list[SimRecord]:
        records = sim.generate_batch(
            batch_id, MILLION, spread_s=600, order="submission", lazy=True, **options
        )
        return [records[i] for i in (0, 1, 2, 77_777, 500_000, MILLION - 1)]

    first = sample(Simulator(seed=1), BATCH)
    assert first == sample(Simulator(seed=1), BATCH)  # same (simulator seed, batch)
    assert first != sample(Simulator(seed=2), BATCH)
    assert first != sample(Simulator(seed=1), OTHER)
    seeded = sample(Simulator(seed=1), BATCH, seed=5)
    assert seeded == sample(Simulator(seed=9), OTHER, seed=5)  # same explicit seed
    assert seeded != first


@pytest.mark.parametrize(("order", "limit_mb"), [("completion", 12), ("submission", 25)])
def test_a_million_lazy_records_cost_a_few_megabytes(order: str, limit_mb: int) -> None:
    sim = Simulator()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        records = sim.generate_batch(BATCH, MILLION, spread_s=60, order=order, lazy=True)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(records) == MILLION
    used_mb = (after - before) / 1e6
    assert used_mb < limit_mb, used_mb  # about 8 and 17.5 bytes per record


async def test_the_export_streams_the_visible_records_of_a_lazy_batch(api: Api) -> None:
    api.sim.generate_batch(
        BATCH, 3000, spread_s=100, order="submission", with_metadata=True, lazy=True
    )
    api.clock.advance(40)
    visible = list(api.sim.iter_records(BATCH, visible_only=True))
    status, text = await api.get("/v1/balances/export", {"batch_ids": BATCH})
    assert status == 200
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == [*EXPORT_COLUMNS, "meta_customer_ref", "meta_loan_officer", "meta_region"]
    assert [row[0] for row in rows[1:]] == ids(visible)
    first, want = rows[1], visible[0]
    assert first[1:9] == [
        BATCH,
        want.institution,
        want.phone,
        want.zip,
        "" if want.balance is None else str(want.balance),
        first[6],
        "",
        want.timestamp,
    ]
    assert first[9:] == [
        want.metadata["customer_ref"],
        want.metadata.get("loan_officer", ""),
        want.metadata["region"],
    ]


async def test_lazy_batches_serve_every_shape(api: Api) -> None:
    api.sim.generate_batch(
        BATCH, 400, spread_s=10, order="submission", total_processed="absent", lazy=True
    )
    api.sim.generate_batch(OTHER, 400, spread_s=10, count_skew=-50, lazy=True)
    api.clock.advance(5)
    read = await api.read_all(BATCH, limit=7)
    assert all("total_processed" not in p.body for p in read.pages)
    assert read.ids == ids(api.sim.records_served(BATCH))
    other = await api.page(OTHER)
    assert other.body["total_processed"] == max(0, api.sim.visible_count(OTHER) - 50)


# --------------------------------------------------------------------------- page size and has_more


def pages_by_size(listed: list[str], size: int, full_page: bool) -> list[tuple[list[str], bool]]:
    """How a vendor serving ``size`` records a page lists ``listed`` (list order)."""
    pages = []
    for start in range(0, len(listed) + 1, size):
        page = listed[start : start + size]
        more = start + size < len(listed) or (full_page and len(page) == size)
        pages.append((page, more))
        if not more:
            return pages
    raise AssertionError("unreachable")


@pytest.mark.parametrize("seed", range(8))
async def test_pages_of_the_vendors_size_and_has_more_on_full_pages(api: Api, seed: int) -> None:
    """Every visible record once, in list order, in pages of ``page_size`` whatever the limit."""
    rng = random.Random(seed)
    order = rng.choice(["completion", "submission"])
    has_more = rng.choice(["exact", "full_page", "absent", "omit_empty"])
    size, limit = rng.choice([1, 3, 7, 250]), rng.randrange(1, 101)
    count = rng.choice([0, size, 2 * size, rng.randrange(0, 600)])
    lazy = rng.random() < 0.5
    api.sim.generate_batch(
        BATCH,
        count,
        spread_s=20,
        seed=seed,
        order=order,
        page_size=size,
        has_more=has_more,
        lazy=lazy,
    )
    for elapsed in (10.0, 30.0):
        api.clock.now = 1000.0 + elapsed
        served = ids(api.sim.records_served(BATCH))
        read = await api.read_all(BATCH, limit=limit)
        got = [(p.ids, p.has_more) for p in read.pages]
        want = pages_by_size(served, size, has_more in ("full_page", "omit_empty"))
        assert got == want, (order, has_more, size, count, elapsed)


@pytest.mark.parametrize("order", ["completion", "submission"])
async def test_without_has_more_only_the_token_says_that_a_page_follows(
    api: Api, order: str
) -> None:
    api.sim.generate_batch(BATCH, 250, seed=3, has_more="absent", order=order)
    read = await api.read_all(BATCH)
    assert all("has_more" not in p.body for p in read.pages)
    assert [(len(p.ids), p.token is not None) for p in read.pages] == [
        (100, True),
        (100, True),
        (50, False),
    ]
    assert read.ids == ids(api.sim.records_served(BATCH))


async def test_a_list_ending_on_a_full_page_is_followed_by_an_empty_one(api: Api) -> None:
    api.sim.generate_batch(BATCH, 200, seed=1, has_more="full_page")
    api.sim.generate_batch(OTHER, 150, seed=1, has_more="full_page", order="submission")
    read = await api.read_all(BATCH)
    assert [(len(p.ids), p.has_more) for p in read.pages] == [(100, True), (100, True), (0, False)]
    assert read.pages[-1].token is None
    other = await api.read_all(OTHER)
    assert [(len(p.ids), p.has_more) for p in other.pages] == [(100, True), (50, False)]


async def test_omit_empty_leaves_out_the_fields_at_their_default_value(api: Api) -> None:
    """As protobuf writes JSON: the empty page that ends a list ending on a full page is the
    batch's ID and count alone, and an empty batch's only page its ID alone."""
    api.sim.generate_batch(BATCH, 200, seed=1, has_more="omit_empty")
    api.sim.generate_batch(OTHER, 0, seed=1, has_more="omit_empty")
    read = await api.read_all(BATCH)
    assert [(len(p.ids), p.has_more) for p in read.pages] == [(100, True), (100, True), (0, False)]
    assert [p.body.get("has_more") for p in read.pages] == [True, True, None]
    assert read.pages[-1].body == {"batch_id": BATCH, "total_processed": 200}
    assert (await api.read_all(OTHER)).pages[-1].body == {"batch_id": OTHER}


async def test_integers_fraction_writes_counts_and_codes_as_doubles_do(api: Api) -> None:
    api.sim.generate_batch(BATCH, 30, seed=1, integers="fraction")
    status, text = await api.get("/v1/balances", {"batchId": BATCH, "limit": "100"})
    assert status == 200
    assert '"total_processed":30.0' in text
    page = json.loads(text)
    codes = [r["balance_status_code"] for r in page["balances"]]
    assert codes and all(isinstance(c, float) and c == int(c) for c in codes)
    assert [r["status_code"] for r in page["balances"]] == codes
    with pytest.raises(ValueError, match="integers must be one of"):
        api.sim.generate_batch(OTHER, 3, seed=1, integers="double")


@pytest.mark.parametrize("order", ["completion", "submission"])
async def test_a_token_loop_leads_back_to_the_page_just_served(api: Api, order: str) -> None:
    api.sim.generate_batch(BATCH, 250, seed=2, order=order)
    api.sim.faults.token_loop_next = 3
    first = await api.page(BATCH)
    assert first.has_more and len(first.ids) == 100
    again = await api.page(BATCH, first.token)
    assert (again.ids, again.has_more) == (first.ids, True)
    assert again.token == first.token  # handed back as it was: the same string
    assert api.sim.page_token_cursor(BATCH, first.token or "") == (
        0 if order == "completion" else -1
    )
    third = await api.page(BATCH, again.token)
    assert third.ids == first.ids  # the third looping answer
    assert api.sim.faults.token_loop_next == 0
    rest = await api.read_all(BATCH, third.token)  # spent: its token names the first page
    assert rest.ids == ids(api.sim.records_served(BATCH))


# --------------------------------------------------------------------------- token lifetime


@pytest.mark.parametrize("order", ["completion", "submission"])
async def test_page_tokens_expire_after_token_ttl_s(api: Api, order: str) -> None:
    api.sim.generate_batch(BATCH, 250, seed=5, order=order, token_ttl_s=30.0)
    api.sim.generate_batch(OTHER, 250, seed=5, order=order)  # no lifetime: never expire
    first = await api.page(BATCH)
    other = await api.page(OTHER)
    api.clock.advance(29.5)
    second = await api.page(BATCH, first.token)  # still fresh
    assert second.ids == ids(api.sim.records_served(BATCH))[100:200]
    api.clock.advance(1.0)  # 30.5 s after the first token, 1 s after the second
    status, text = await api.get(
        "/v1/balances", {"batchId": BATCH, "limit": "100", "nextPageToken": first.token or ""}
    )
    assert (status, json.loads(text)["error"]["code"]) == (400, "INVALID_PAGE_TOKEN")
    assert (await api.page(BATCH, second.token)).has_more is False
    api.clock.advance(1_000.0)
    assert len((await api.page(OTHER, other.token)).ids) == 100


async def test_the_control_api_sets_a_token_lifetime(api: Api) -> None:
    status, _ = await api.control(
        "/_sim/batches", {"batch_id": BATCH, "count": 150, "token_ttl_s": 2}
    )
    assert status == 201
    first = await api.page(BATCH)
    api.clock.advance(3)
    status, _ = await api.get(
        "/v1/balances", {"batchId": BATCH, "limit": "100", "nextPageToken": first.token or ""}
    )
    assert status == 400
