"""Operating it, proven by the real tools: the logs of a full run, and a real Prometheus.

One run (the module fixture ``run``) of the service as a separate process
(``python -m service run``) against the in-process API simulator and the real broker,
scraped every second by a real Prometheus (the Debian package, installed by
``make tools``) that also evaluates ``deploy/prometheus/alerts.yaml``. The workload:

* five batches: one of 600 records appearing over 8 s (tracked over HTTP with its
  count), one with malformed records (dead-lettered), one that never exists (404, then
  ``failed``), one without a count (requests topic; completes when idle) and one
  stopped by ``DELETE``;
* on the big batch: a burst of 5xx longer than the client's retries, a 429 with
  Retry-After, a rejected page token and malformed pages;
* a period in which the API rejects the key (401: polling pauses, /readyz red), then
  the key works again;
* admin calls with the token (POST, DELETE), with a wrong token and with a bad body;
* SIGTERM once every batch has finished.

The tests then read what the run left behind: every line the service wrote, the
answers of its HTTP surface, and Prometheus' answer to every PromQL expression of the
dashboard and of the alert rules (``tests/promql.py``), each of which must return data.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import promql
import pytest
import yaml
from aiohttp.test_utils import TestServer
from conftest import (
    ADMIN_TOKEN,
    API_KEY,
    ServiceProcess,
    Topics,
    free_port,
    produce,
    service_env,
)

from rightfoot_simulator import SimRecord, Simulator, build_app

pytestmark = pytest.mark.kafka

SERVICE = Path(__file__).resolve().parents[1] / "service"
SECRETS = (API_KEY, ADMIN_TOKEN)
LEVELS = {"debug", "info", "warning", "error", "critical"}

# Events about one batch: each of their lines must carry batch_id. The ones in
# MUST_APPEAR are produced by the workload, so the check is not vacuous.
BATCH_EVENTS = frozenset(
    {
        "tracking_started",
        "track_ignored_finished",
        "batch_finished",
        "batch_not_found_yet",
        "poll_failed",
        "poll_crashed",
        "record_dead_lettered",
        "page_token_rejected",
        "api_key_rejected",
        "api_retry",
        "state_unreadable",
    }
)
MUST_APPEAR = frozenset(
    {
        "tracking_started",
        "batch_finished",
        "batch_not_found_yet",
        "poll_failed",
        "record_dead_lettered",
        "page_token_rejected",
        "api_key_rejected",
        "api_retry",
    }
)


# ---------------------------------------------------------------------------------
# How each expression is made to return data. Every expression not listed here is
# queried as shipped, at the end of the run, and must return a non-empty result.


@dataclass(frozen=True)
class Allowance:
    reason: str
    # (text, replacement): the threshold comparison taken out before querying.
    strip: tuple[tuple[str, str], ...] = ()
    # Queried as shipped, but at the instant the API key was being rejected (and
    # expected to be silent at the end of the run, once everything is healthy).
    at_unauthorized: bool = False


ALLOWANCES: dict[str, Allowance] = {
    "alert:RightfootApiErrorsHigh": Allowance(
        "fires above 10% failed requests over 10 minutes; the run's 5xx burst is a few "
        "requests among hundreds. The failure ratio itself is queried (its 5xx series "
        "exist from the burst and from the zero-initialised codes).",
        strip=((") > 0.1", ")"),),
    ),
    "alert:RightfootPollingStalled": Allowance(
        "fires when a poll is over 120 s late, which a healthy short run cannot produce; "
        "the lateness gauge and its 'unless unauthorized' guard are queried.",
        strip=((" > 120", ""),),
    ),
    "alert:RightfootPublishFailures": Allowance(
        "publish errors or aborted transactions, more than 3 in 10 minutes, need a broken "
        "broker (shared by other tests) or a fenced producer (which would leave the "
        "partition to a rebalance that never comes); increase() of the zero-initialised "
        "counters is queried.",
        strip=((") > 3", ")"),),
    ),
    "alert:RightfootBatchStateUnreadable": Allowance(
        "needs a state record of a newer service version on an owned partition; the run "
        "writes none. The gauge itself is queried (0 on every replica).",
        strip=((" > 0", ""),),
    ),
    "alert:RightfootMemoryNearLimit": Allowance(
        "fires above 85% of a container memory limit, which the test's service process "
        "has none of (the gauge is 0); the ratio to the gauge is queried without both "
        "conditions (resident memory over 0: +Inf).",
        strip=(
            ("(rightfoot_poller_memory_limit_bytes > 0)", "rightfoot_poller_memory_limit_bytes"),
            ("> 0.85", ""),
        ),
    ),
    "alert:RightfootApiUnauthorized": Allowance(
        "true only while the API rejects the key: queried at that instant of the run.",
        at_unauthorized=True,
    ),
    "alert:RightfootNoReadyReplica": Allowance(
        "true only while no replica is ready: /readyz is red while the key is rejected, "
        "so it is queried at that instant of the run.",
        at_unauthorized=True,
    ),
}


def prepared(source: str, expr: str) -> str:
    """The expression as sent to Prometheus (thresholds stripped where allowed)."""
    allowance = ALLOWANCES.get(source)
    for text, replacement in allowance.strip if allowance else ():
        assert text in expr, f"{source}: {text!r} is no longer in {expr!r}"
        expr = expr.replace(text, replacement)
    return expr


# ---------------------------------------------------------------------------------
# Prometheus


class Prometheus:
    """A real Prometheus server scraping one target every second, with the alert rules."""

    def __init__(self, binary: str, workdir: Path, target: str) -> None:
        self.binary = binary
        self.workdir = workdir
        self.target = target
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(promql.ALERTS)],
            "scrape_configs": [
                {
                    "job_name": "rightfoot-poller",
                    "scrape_timeout": "1s",
                    "static_configs": [{"targets": [self.target]}],
                }
            ],
        }
        config_file = self.workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        with (self.workdir / "prometheus.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=log,
            )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self) -> str:
        path = self.workdir / "prometheus.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-20:])

    async def api(self, path: str, **params: str) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{self.url}{path}", params=params) as resp,
        ):
            body: dict[str, Any] = await resp.json()
            return body

    async def query(self, expr: str, at: float | None = None) -> dict[str, Any]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return await self.api("/api/v1/query", **params)

    async def wait_for(self, expr: str, timeout: float, what: str) -> None:
        """Until the instant query returns a non-empty result."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: Any = None
        while loop.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.log_tail()}")
            try:
                last = await self.query(expr)
                if last.get("status") == "success" and last["data"]["result"]:
                    return
            except (aiohttp.ClientError, json.JSONDecodeError) as exc:
                last = exc
            await asyncio.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what} ({expr}): {last}")


# ---------------------------------------------------------------------------------
# The run


@dataclass
class Run:
    instance_id: str
    batches: dict[str, str]  # role -> batch ID
    exit_code: int
    took_s: float
    log_text: str
    http_texts: dict[str, str] = field(default_factory=dict)
    admin_statuses: dict[str, int] = field(default_factory=dict)
    unauthorized_at: float = 0.0
    # source -> (query as sent, Prometheus' answer)
    answers: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    healthy_answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    rules: list[dict[str, Any]] = field(default_factory=list)
    alerts_unauthorized: dict[str, Any] = field(default_factory=dict)
    alerts_end: dict[str, Any] = field(default_factory=dict)
    series_text: str = ""

    @property
    def log_lines(self) -> list[str]:
        return self.log_text.splitlines()

    def docs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_lines]


def dlq_records() -> list[SimRecord]:
    good = [
        SimRecord(
            authorizer_unique_id=f"auth-{i:03d}",
            balance=Decimal(f"{i}.{i % 100:02d}"),
            balance_status_code=(0, 3000, 3200)[i % 3],
            timestamp=f"2024-08-09T12:{i % 60:02d}:00Z",
            visible_at=0.0,
        )
        for i in range(30)
    ]
    raws = [
        '"not an object"',
        '{"balance": 1.5, "balance_status_code": 0, "timestamp": "2024-08-09T12:00:00Z"}',
        '{"authorizer_unique_id": "bad-balance", "balance": "12", "balance_status_code": 0,'
        ' "timestamp": "2024-08-09T12:00:00Z"}',
        '{"authorizer_unique_id": "bad-time", "balance": 1, "balance_status_code": 0,'
        ' "timestamp": "yesterday"}',
    ]
    bad = [
        SimRecord(
            authorizer_unique_id=f"bad-{i}",
            balance=None,
            balance_status_code=0,
            timestamp="2024-08-09T12:00:00Z",
            visible_at=0.0,
            raw_override=raw,
        )
        for i, raw in enumerate(raws)
    ]
    return good + bad


class Admin:
    """The service's HTTP surface, as an operator calls it."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    async def call(
        self, method: str, path: str, *, token: str | None = ADMIN_TOKEN, body: Any = None
    ) -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, self.base + path, json=body, headers=headers) as resp,
        ):
            return resp.status, await resp.text()

    async def status_of(self, batch_id: str) -> str | None:
        code, text = await self.call("GET", f"/v1/batches/{batch_id}", token=None)
        return str(json.loads(text)["status"]) if code == 200 else None


async def until(cond: Any, timeout: float, what: str, interval: float = 0.2) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await cond():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def observed_run(kafka: str, tmp: Path) -> Run:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "prometheus is not installed: run `make tools` (installs the Debian package "
            "'prometheus', which also provides promtool)"
        )
    started = time.monotonic()
    topics = Topics(prefix=f"t{uuid.uuid4().hex[:10]}")
    sim = Simulator(api_keys=[API_KEY], seed=5)
    server = TestServer(build_app(sim), host="127.0.0.1", port=free_port())
    await server.start_server()
    api_url = str(server.make_url("")).rstrip("/")
    instance_id = f"obs-{uuid.uuid4().hex[:8]}"
    env = service_env(topics, kafka, api_url, RFP_INSTANCE_ID=instance_id)
    service = ServiceProcess(env, tmp / "service.log")
    prometheus = Prometheus(binary, tmp / "prometheus", f"127.0.0.1:{service.port}")
    batches = {
        "big": str(uuid.uuid4()),
        "dlq": str(uuid.uuid4()),
        "missing": str(uuid.uuid4()),
        "idle": str(uuid.uuid4()),
        "stopped": str(uuid.uuid4()),
    }
    outcomes = {
        "big": "completed",
        "dlq": "completed",
        "missing": "failed",
        "idle": "completed",
        "stopped": "stopped",
    }
    run = Run(instance_id=instance_id, batches=batches, exit_code=-1, took_s=0, log_text="")
    try:
        prometheus.start()
        service.start()
        await service.ready()
        admin = Admin(service.port)
        # Two scrapes before anything happens: every counter is seen at 0 first, so
        # increase() counts the first event.
        await prometheus.wait_for(
            'count_over_time(rightfoot_poller_build_info{job="rightfoot-poller"}[1m]) >= 2',
            30,
            "two scrapes of the service",
        )

        sim.generate_batch(batches["big"], 600, spread_s=8.0, seed=1)
        records = dlq_records()
        sim.add_batch(batches["dlq"], records)
        sim.generate_batch(batches["idle"], 20, spread_s=1.0, seed=2)
        sim.generate_batch(batches["stopped"], 40, spread_s=120.0, seed=3)

        statuses = run.admin_statuses
        for role, body in (
            ("big", {"batch_id": batches["big"], "expected_count": 600}),
            ("dlq", {"batch_id": batches["dlq"], "expected_count": len(records)}),
            ("missing", {"batch_id": batches["missing"]}),
            # With its count it cannot complete on idleness (its records appear over
            # 120 s) before the DELETE below, however long the faults before it take.
            ("stopped", {"batch_id": batches["stopped"], "expected_count": 40}),
        ):
            statuses[f"post_{role}"], _ = await admin.call("POST", "/v1/batches", body=body)
        idle_request = json.dumps({"batch_id": batches["idle"]}).encode()
        await produce(kafka, topics.requests, batches["idle"].encode(), idle_request)
        statuses["post_wrong_token"], _ = await admin.call(
            "POST", "/v1/batches", token="not-the-token", body={"batch_id": batches["big"]}
        )
        statuses["delete_wrong_token"], _ = await admin.call(
            "DELETE", f"/v1/batches/{batches['stopped']}", token="not-the-token"
        )
        statuses["post_bad_body"], _ = await admin.call(
            "POST", "/v1/batches", body={"batch_id": "no spaces allowed"}
        )

        # API faults on the big batch once it is being read.
        big = batches["big"]

        async def big_polled() -> bool:
            return sum(1 for r in sim.request_log if r.batch_id == big) >= 3

        await until(big_polled, 20, "polls of the big batch")
        sim.faults.update(
            {
                "only_batch": big,
                "error_5xx_next": 5,  # more than the client's 4 attempts: one poll fails
                "rate_limit_next": 1,
                "retry_after_s": 1.0,
                "reject_token_next": 1,
                "malformed_next": 3,  # three polls in a row: RightfootApiPagesNotUnderstood
            }
        )

        async def faults_served() -> bool:
            f = sim.faults
            return f.error_5xx_next + f.rate_limit_next + f.reject_token_next == 0 and (
                f.malformed_next == 0
            )

        await until(faults_served, 30, "the injected faults to be served")
        sim.faults.update({"only_batch": None})

        # The API rejects the key for a while.
        sim.set_api_keys(["a-rotated-key-the-service-does-not-have"])

        async def readyz(code: int) -> bool:
            status, text = await admin.call("GET", "/readyz", token=None)
            if status == code:
                run.http_texts[f"readyz_{code}"] = text
            return status == code

        await until(lambda: readyz(503), 15, "/readyz red while the key is rejected")
        await asyncio.sleep(3.0)  # scraped and evaluated at least twice in this state
        run.unauthorized_at = time.time()
        _, run.http_texts["metrics_unauthorized"] = await admin.call("GET", "/metrics")
        sim.set_api_keys([API_KEY])
        await until(lambda: readyz(200), 15, "/readyz green once the key works again")

        statuses["delete"], _ = await admin.call("DELETE", f"/v1/batches/{batches['stopped']}")

        async def all_finished() -> bool:
            for role, outcome in outcomes.items():
                if await admin.status_of(batches[role]) != outcome:
                    return False
            return True

        await until(all_finished, 60, f"every batch finished as {outcomes}", interval=0.3)

        # Prometheus has scraped the final state.
        await prometheus.wait_for(
            f"sum(rightfoot_poller_batches_finished_total) >= {len(batches)}",
            15,
            "the finished batches scraped",
        )
        await asyncio.sleep(2.0)  # and evaluated the rules on it

        for source, expr in promql.all_expressions():
            allowance = ALLOWANCES.get(source)
            sent = prepared(source, expr)
            at = run.unauthorized_at if allowance and allowance.at_unauthorized else None
            run.answers[source] = (sent, await prometheus.query(sent, at))
            if allowance and allowance.at_unauthorized:
                run.healthy_answers[source] = await prometheus.query(sent)
        run.rules = [
            rule
            for group in (await prometheus.api("/api/v1/rules"))["data"]["groups"]
            for rule in group["rules"]
        ]
        run.alerts_unauthorized = await prometheus.query("ALERTS", run.unauthorized_at)
        run.alerts_end = await prometheus.query("ALERTS")
        run.series_text = json.dumps(
            await prometheus.query('{__name__=~"rightfoot_poller_.+"}')
        ) + json.dumps(await prometheus.api("/api/v1/targets"))

        for path in ("/metrics", "/readyz", "/healthz", "/v1/batches"):
            _, run.http_texts[path] = await admin.call("GET", path)
        for role, batch_id in batches.items():
            _, run.http_texts[f"batch_{role}"] = await admin.call("GET", f"/v1/batches/{batch_id}")

        service.signal(signal.SIGTERM)
        run.exit_code = await service.wait(30)
    finally:
        service.kill()
        prometheus.stop()
        await server.close()
    run.log_text = service.log_path.read_text(errors="replace")
    run.took_s = time.monotonic() - started
    # Kept next to the logs, to read when a check fails.
    (tmp / "answers.json").write_text(json.dumps(run.answers, indent=1))
    return run


@pytest.fixture(scope="module")
async def run(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Run]:
    yield await observed_run(kafka, tmp_path_factory.mktemp("observability"))


# ---------------------------------------------------------------------------------
# a. The logs of the full run


def test_service_stops_cleanly_on_sigterm(run: Run) -> None:
    assert run.exit_code == 0, "\n".join(run.log_lines[-20:])
    events = [d["event"] for d in run.docs()]
    assert events[-1] == "stopped"
    assert run.admin_statuses == {
        "post_big": 202,
        "post_dlq": 202,
        "post_missing": 202,
        "post_stopped": 202,
        "post_wrong_token": 401,
        "delete_wrong_token": 401,
        "post_bad_body": 400,
        "delete": 202,
    }


def test_every_line_is_a_json_object_with_instance_timestamp_level_event(run: Run) -> None:
    assert len(run.log_lines) > 30
    for number, line in enumerate(run.log_lines, 1):
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"line {number} is not JSON: {line[:300]}")
        assert isinstance(doc, dict), f"line {number}: {line[:300]}"
        missing = {"instance_id", "timestamp", "level", "event"} - set(doc)
        assert not missing, f"line {number} lacks {missing}: {line[:300]}"
        assert doc["instance_id"] == run.instance_id, line
        assert doc["level"] in LEVELS, line
        assert isinstance(doc["event"], str) and doc["event"], line
        assert datetime.fromisoformat(doc["timestamp"]).utcoffset() is not None, line


def test_every_line_about_a_batch_names_it(run: Run) -> None:
    docs = run.docs()
    seen = {d["event"] for d in docs}
    assert not MUST_APPEAR - seen, f"the workload did not produce {MUST_APPEAR - seen}"
    ids = set(run.batches.values())
    for doc in docs:
        if doc["event"] in BATCH_EVENTS:
            assert doc.get("batch_id") in ids, f"{doc['event']} without its batch_id: {doc}"
        # Whatever its event, a line that mentions one of the run's batches names it.
        mentioned = {b for b in ids if b in json.dumps(doc)}
        if mentioned:
            assert doc.get("batch_id") in mentioned, f"mentions {mentioned}: {doc}"
    finished = {d["batch_id"]: d["outcome"] for d in docs if d["event"] == "batch_finished"}
    assert finished == {
        run.batches["big"]: "completed",
        run.batches["dlq"]: "completed",
        run.batches["missing"]: "failed",
        run.batches["idle"]: "completed",
        run.batches["stopped"]: "stopped",
    }
    dead = [d for d in docs if d["event"] == "record_dead_lettered"]
    # One line per commit that dead-letters records, with the count of each reason.
    assert {d["batch_id"] for d in dead} == {run.batches["dlq"]}
    assert sum(n for d in dead for n in d["reasons"].values()) == 4
    retries = {d["batch_id"] for d in docs if d["event"] == "api_retry"}
    assert run.batches["big"] in retries  # the 5xx burst and the 429 were retried there


def test_secrets_appear_nowhere(run: Run) -> None:
    places = {"the service's log": run.log_text, "Prometheus' series": run.series_text}
    places.update({f"GET {path}": text for path, text in run.http_texts.items()})
    for expected in ("/metrics", "/readyz", "/v1/batches", "metrics_unauthorized", "readyz_503"):
        assert expected in run.http_texts
    for where, text in places.items():
        assert text
        for secret in SECRETS:
            assert secret not in text, f"a secret appears in {where}"
        # Nor a recognisable part of one (a prefix long enough to identify it).
        for secret in SECRETS:
            assert secret[:12] not in text, f"part of a secret appears in {where}"
    assert '"api_key_accepted": false' in run.http_texts["readyz_503"]


def test_runbooks_point_at_log_events_the_service_writes() -> None:
    """An `event=<name>` in a runbook is a line an operator can find in the logs."""
    named = set(re.findall(r"event=([a-z_]+)", promql.ALERTS.read_text()))
    assert named
    source = "\n".join(p.read_text() for p in SERVICE.glob("*.py"))
    logged = set(re.findall(r"\blog\.(?:debug|info|warning|error|exception)\(\s*\"(\w+)\"", source))
    # and lines throttled through Throttle.log(kind, log, level, event, ...)
    levels = r"(?:debug|info|warning|error|exception)"
    logged |= set(re.findall(rf'\blog,\s*"{levels}",\s*"(\w+)"', source))
    assert named <= logged, f"runbooks name log events that do not exist: {named - logged}"


# ---------------------------------------------------------------------------------
# b. Every dashboard and alert expression, through a real Prometheus


def test_allowances_still_match_the_shipped_expressions() -> None:
    expressions = dict(promql.all_expressions())
    assert set(ALLOWANCES) <= set(expressions), set(ALLOWANCES) - set(expressions)
    for source, allowance in ALLOWANCES.items():
        assert allowance.reason
        assert bool(allowance.strip) != allowance.at_unauthorized, source
        assert prepared(source, expressions[source]) != expressions[source] or (
            allowance.at_unauthorized
        )
    # Only alerts are allowed any help: every dashboard panel returns data as shipped.
    assert all(source.startswith("alert:") for source in ALLOWANCES)


def test_every_expression_returns_data(run: Run) -> None:
    expected = {source for source, _ in promql.all_expressions()}
    assert set(run.answers) == expected
    empty = {}
    for source, (sent, answer) in run.answers.items():
        assert answer.get("status") == "success", f"{source}: {sent}\n{answer}"
        assert answer["data"]["resultType"] == "vector", (source, answer)
        if not answer["data"]["result"]:
            empty[source] = sent
    assert not empty, f"expressions without data: {json.dumps(empty, indent=1)}"


def test_fault_only_alert_expressions_are_silent_when_healthy(run: Run) -> None:
    assert set(run.healthy_answers) == {s for s, a in ALLOWANCES.items() if a.at_unauthorized}
    for source, answer in run.healthy_answers.items():
        assert answer["status"] == "success"
        assert answer["data"]["result"] == [], f"{source} returns data in a healthy state"


def test_alert_rules_evaluate_and_go_pending_or_firing(run: Run) -> None:
    alerts = {name.removeprefix("alert:") for name, _ in promql.alert_expressions()}
    assert {r["name"] for r in run.rules} == alerts
    for rule in run.rules:
        assert rule["health"] == "ok", rule
        assert not rule.get("lastError"), rule

    def states(answer: dict[str, Any]) -> dict[str, str]:
        return {
            r["metric"]["alertname"]: r["metric"]["alertstate"] for r in answer["data"]["result"]
        }

    during = states(run.alerts_unauthorized)
    assert during.get("RightfootApiUnauthorized") == "pending", during
    assert during.get("RightfootNoReadyReplica") == "pending", during
    end = states(run.alerts_end)
    assert end.get("RightfootRecordsDeadLettered") == "firing", end
    assert "RightfootApiUnauthorized" not in end and "RightfootNoReadyReplica" not in end, end


def test_the_run_took_a_reasonable_time(run: Run) -> None:
    assert run.took_s < 100, f"the observed run took {run.took_s:.0f} s"
