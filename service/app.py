"""The running service: wires the parts together, starts and stops cleanly.

Replicas with the same configuration form one consumer group on the requests
topic; which partitions this one owns, and their restore, is service.partitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import structlog
from aiohttp import web
from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.errors import KafkaError, KafkaTimeoutError

from service.api import ApiKey, RightfootClient
from service.config import Settings
from service.errors import (
    ApiBadRequest,
    ApiError,
    ApiForbidden,
    ApiMalformedResponse,
    ApiNotFound,
    ApiUnauthorized,
    ConnectionErrorReason,
    KafkaConnectionProblem,
    PollerError,
)
from service.events import EventFactory
from service.http_api import HttpApi
from service.kafka_clients import (
    classify_connection_error,
    client_args,
    ensure_topics,
    heartbeat_interval_ms,
    make_producer,
    partition_counts,
    probe_brokers,
    stop_client,
)
from service.kafka_logs import BROKERS, BrokerLog
from service.logs import Throttle, redact
from service.metrics import Metrics
from service.pacing import RateLimiter
from service.partitions import PartitionOwner
from service.requests import TrackingRequest, is_forwarded
from service.runtime import memory_limit_bytes, memory_limit_files
from service.tracker import Tracker
from service.view import StateView
from service.wire import frames_when_available
from service.worker import PartitionWorker, done

log = structlog.get_logger(__name__)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: PartitionOwner, on_assigned: Callable[[], None]) -> None:
        self.owner = owner
        self.on_assigned = on_assigned

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.owner.release([tp.partition for tp in revoked])

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.owner.acquire([tp.partition for tp in assigned])
        self.on_assigned()


# The batch a key probe asks for when this replica tracks none.
AUTH_PROBE_BATCH_ID = "00000000-0000-0000-0000-000000000000"

KeyProbeOutcome = Literal["accepted", "rejected", "inconclusive"]


def key_probe_outcome(error: ApiError | None) -> KeyProbeOutcome:
    """What the answer to a key probe (None: a page) says about the API key.

    Only an answer from past the API's authentication says the key is accepted: a page,
    a 404 (the batch does not exist), a 400 or a body of the wrong shape. A 401 or 403
    says it is still rejected. A 5xx, a timeout, a connection failure or a 429 says
    nothing about the key: the state is kept and the key tried again later.
    """
    if error is None or isinstance(error, ApiNotFound | ApiBadRequest | ApiMalformedResponse):
        return "accepted"
    if isinstance(error, ApiUnauthorized | ApiForbidden):
        return "rejected"
    return "inconclusive"


def any_broker_reachable(brokers: Mapping[str, bool]) -> bool:
    """Whether Kafka answers, from ``BrokerLog.refresh()``: one broker is enough (the
    loss of one of several is the cluster's business, not a reason to leave the load
    balancer), and no broker known yet counts as reachable."""
    return not brokers or any(brokers.values())


def kafka_problem_is_transient(exc: BaseException, reason: ConnectionErrorReason) -> bool:
    """Whether a failed connection to Kafka is one that fixes itself: no broker answers
    yet (starting, restarting, a network path coming up). A refused login, a certificate
    or a missing permission are not, nor a broker's refusal that no retry changes."""
    if reason != "unreachable":
        return False
    return isinstance(exc, KafkaConnectionProblem | OSError | KafkaTimeoutError) or bool(
        getattr(exc, "retriable", False)
    )


class HttpListenError(PollerError):
    """The admin HTTP server cannot listen on http.host / http.port."""


class PollerService:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.kcfg = settings.kafka
        self.metrics = metrics or Metrics()
        # Read when scraped (a pod's limits can be resized in place), from files found once.
        limit_files = memory_limit_files()
        self.metrics.memory_limit.set_function(lambda: memory_limit_bytes(limit_files) or 0)
        self.instance = settings.instance_id
        self.transactional = self.kcfg.delivery == "exactly_once"
        self.limiter = RateLimiter(settings.rightfoot.max_requests_per_s)
        self.client = RightfootClient(
            settings.rightfoot,
            instance_id=self.instance,
            metrics=self.metrics,
            api_key=ApiKey.from_env(
                settings.rightfoot.api_key.get_secret_value()
                if settings.rightfoot.api_key
                else None
            ),
            limiter=self.limiter,
        )
        source = settings.rightfoot.base_url.rstrip("/") + "/v1/balances"
        self.factory = EventFactory(
            balances_topic=self.kcfg.balances_topic,
            batch_events_topic=self.kcfg.batch_events_topic,
            source=source,
        )
        self.tracker = Tracker(
            settings, source=self.client, metrics=self.metrics, factory=self.factory
        )
        self.view = StateView(self.kcfg, client_id=f"rightfoot-poller-view-{self.instance}")
        self.tracker.home_of = self.view.home
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None  # intake, and events in at_least_once
        self._stopping = asyncio.Event()
        self.partitions = PartitionOwner(
            settings,
            metrics=self.metrics,
            tracker=self.tracker,
            consumer=lambda: self.consumer,
            producer=lambda: self.producer,
            stopping=self._stopping,
        )
        self._kafka_ok = False
        # Whether any Kafka broker answers (BrokerLog.refresh, every 5 s): /readyz's kafka.
        self.brokers: BrokerLog = BROKERS
        self._brokers_reachable = True
        self._kafka_problem: dict[str, Any] | None = None  # why Kafka refuses us, for /readyz
        self._registry_problem: dict[str, str] | None = None  # json_sr: why no schema ids
        self._monitor: asyncio.Task[None] | None = None
        # Tasks that take work (stopped first at shutdown), then the state view.
        self._workers: list[asyncio.Task[None]] = []
        self._view_task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._last_tick = time.monotonic()
        self.dead_task: str | None = None  # one of the service's loops that ended (a fault)
        self.http_port: int | None = None
        # Set by every rebalance: the partition count may have changed (see _partition_count).
        self._count_check = asyncio.Event()
        self._count_problems = Throttle(every_s=60.0)
        # kafka_unavailable for a broker out of reach: the first, then one a minute.
        self._kafka_waits = Throttle(every_s=60.0)
        # requests_consume_failed: a fetch that keeps failing fails every second.
        self._consume_failures = Throttle(every_s=60.0)

    # ---- readiness --------------------------------------------------------------------

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether this replica is ready, and why not (a query: it changes nothing)."""
        kafka = self._kafka_ok and self._brokers_reachable
        checks = {
            "kafka": kafka,
            "group_joined": self.partitions.joined,
            "partitions_restored": self.partitions.all_restored,
            "api_key_accepted": not self.tracker.unauthorized,
            "view_loaded": self.view.loaded,
            "schema_registry": self._registry_problem is None,
        }
        ready = all(checks.values()) and not self._stopping.is_set()
        detail: dict[str, Any] = {
            "checks": checks,
            "owned_partitions": self.partitions.owned,
            "instance_id": self.instance,
        }
        if self._kafka_problem is not None and not self._kafka_ok:
            detail["kafka_error"] = self._kafka_problem
        elif not kafka:
            detail["kafka_error"] = {
                "reason": "unreachable",
                "error": "no Kafka broker is reachable (connected before; the clients retry)",
            }
        if self._registry_problem is not None:
            detail["schema_registry_error"] = self._registry_problem
        return ready, detail

    def liveness(self) -> bool:
        return self.dead_task is None and time.monotonic() - self._last_tick < 30

    # ---- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        log.info("starting", delivery=self.kcfg.delivery, bootstrap=self.kcfg.bootstrap_servers)
        await self._start_http()
        self._monitor = asyncio.create_task(self._loop_monitor(), name="loop-monitor")
        if self.kcfg.value_format == "json_sr":
            self._registry_problem = {"reason": "starting", "error": "no schema ids yet"}
            frames = await frames_when_available(
                self.settings, stopping=self._stopping, on_problem=self._registry_state
            )
            if frames is None:
                return  # stopped while waiting for the registry
            self.factory.set_prefixes(frames)
        await self._connect_kafka()
        await self.client.start()
        self._workers = [
            asyncio.create_task(self.tracker.run(), name="scheduler"),
            asyncio.create_task(self.tracker.forget_loop(), name="forget-finished"),
            asyncio.create_task(self._consume(), name="requests-consumer"),
            asyncio.create_task(self._auth_probe(), name="auth-probe"),
        ]
        self._view_task = asyncio.create_task(self.view.run(), name="state-view")
        for task in (*self._workers, self._view_task):
            task.add_done_callback(self._task_ended)
        log.info("started", http_port=self.http_port)

    def _task_ended(self, task: asyncio.Task[Any]) -> None:
        """Each of the service's loops runs until the service stops. One that ends before
        (a fault of this service) leaves a part of it dead while the rest looks well: it is
        said in one ERROR, and /healthz fails from then on, so that the pod is restarted."""
        if task.cancelled() or self._stopping.is_set():
            return
        self.dead_task = task.get_name()
        exc = task.exception()
        log.error("task_ended", task=self.dead_task, exc_info=exc or False)

    def _registry_state(self, problem: dict[str, str] | None) -> None:
        self._registry_problem = problem

    async def _connect_kafka(self) -> None:
        """Connect, retrying with backoff: a broker that is down or refuses us is waited for.

        Every failed attempt sets ``kafka_error`` on /readyz and counts in
        ``kafka_connection_errors_total{reason}``; attempts back off from 1 s to 60 s. A
        refused password, an untrusted certificate or a missing permission, which no
        retry fixes, is one ERROR line per attempt (reason and what to check). No broker
        answering yet is expected (a broker starting with the service): one WARNING
        ``kafka_unavailable`` at the first attempt, then at most one a minute (with how
        many attempts it stands for).
        """
        delay = 1.0
        while not self._stopping.is_set():
            try:
                # aiokafka reports a refused login or certificate only as "Unable to
                # bootstrap": one probe connection first names the real cause.
                await probe_brokers(self.kcfg, f"rightfoot-poller-probe-{self.instance}")
                partitions = await ensure_topics(
                    self.kcfg, f"rightfoot-poller-admin-{self.instance}"
                )
                self.tracker.partitions = self.view.partitions = partitions
                self.producer = make_producer(self.kcfg, f"rightfoot-poller-{self.instance}")
                await self.producer.start()
                self.consumer = AIOKafkaConsumer(
                    self.kcfg.requests_topic,
                    **client_args(self.kcfg, f"rightfoot-poller-{self.instance}"),
                    group_id=self.kcfg.group_id,
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",
                    isolation_level="read_committed",
                    session_timeout_ms=self.kcfg.session_timeout_ms,
                    heartbeat_interval_ms=heartbeat_interval_ms(self.kcfg),
                    max_poll_records=500,
                )
                self.consumer.subscribe(
                    [self.kcfg.requests_topic],
                    listener=_Rebalance(self.partitions, self._count_check.set),
                )
                await self.consumer.start()
                self.brokers.watch(self.producer.client)
                self.brokers.watch(self.consumer._client)
                self._kafka_ok = self._brokers_reachable = True
                self._kafka_problem = None
                return
            except (KafkaConnectionProblem, KafkaError, OSError, ApiError) as exc:
                reason = classify_connection_error(exc)
                message = (
                    str(exc)
                    if isinstance(exc, KafkaConnectionProblem)
                    else f"{type(exc).__name__}: {exc}"
                )
                message = redact(message, self.settings.secrets())
                self.metrics.publish_errors.labels("connect").inc()
                self.metrics.kafka_connection_errors.labels(reason).inc()
                self._kafka_problem = {"reason": reason, "error": message}
                fields = {"reason": reason, "error": message, "retry_in_s": delay}
                if not kafka_problem_is_transient(exc, reason):
                    log.error("kafka_unavailable", **fields)
                elif (held := self._kafka_waits.admit(reason)) is None:
                    log.debug("kafka_unavailable", **fields)
                else:
                    log.warning("kafka_unavailable", **fields, attempts_held=held)
                await self._close_clients()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                delay = min(delay * 2, 60.0)

    async def _start_http(self) -> None:
        api = HttpApi(
            metrics=self.metrics,
            readiness=self.readiness,
            submit=self.submit,
            view=self.view,
            admin_token=(
                self.settings.http.admin_token.get_secret_value()
                if self.settings.http.admin_token
                else None
            ),
            max_body_bytes=self.settings.http.max_body_bytes,
            liveness=self.liveness,
        )
        host, port = self.settings.http.host, self.settings.http.port
        try:
            self._runner, self.http_port = await api.serve(host, port)
        except OSError as exc:  # a host that is no address here, a port in use
            raise HttpListenError(
                f"http.host / http.port: cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None

    async def submit(self, req: TrackingRequest) -> None:
        """Send a tracking request to the requests topic (HTTP intake)."""
        if self.producer is None:
            raise web.HTTPServiceUnavailable(text="not connected to Kafka yet")
        await self.producer.send_and_wait(
            self.kcfg.requests_topic, req.encode(), key=req.batch_id.encode()
        )

    async def stop(self) -> None:
        """Stop taking work, let in-flight polls finish or abandon them, commit, close."""
        grace = self.settings.shutdown_grace_s
        started = time.monotonic()
        log.info("stopping", grace_s=grace)
        self._stopping.set()
        self.tracker.stop()
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        await self.partitions.release_all(grace * 0.6)
        rest = [t for t in (self._view_task, self._monitor) if t is not None]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)
        await self._close_clients()
        await self.view.close()
        await self.client.close()
        if self._runner is not None:
            await self._runner.cleanup()
        log.info("stopped", took_s=round(time.monotonic() - started, 3))

    async def _close_clients(self) -> None:
        if self.consumer is not None:
            await stop_client(self.consumer)
            self.consumer = None
        if self.producer is not None:
            await stop_client(self.producer)
            self.producer = None

    # ---- loops ------------------------------------------------------------------------

    async def _consume(self) -> None:
        assert self.consumer is not None
        consumer = self.consumer
        while not self._stopping.is_set():
            if not await self._partition_count(consumer):
                await asyncio.sleep(5.0)
                continue
            if not self.view.loaded:
                # Requests are routed to the partition that holds their batch, which only
                # the whole state tells (Tracker.route): none is taken before it is read.
                await asyncio.sleep(0.1)
                continue
            try:
                batch = await consumer.getmany(timeout_ms=500, max_records=1000)
            except KafkaError as exc:
                # Tried again every second: one WARNING a kind of failure a minute, with
                # how many were held back since, the rest at DEBUG.
                self._consume_failures.log(
                    type(exc).__name__,
                    log,
                    "warning",
                    "requests_consume_failed",
                    error=repr(exc)[:300],
                )
                await asyncio.sleep(1.0)
                continue
            for tp, messages in batch.items():
                worker = self.tracker.workers.get(tp.partition)
                if worker is None or worker.closed:
                    # Not restored (yet): read these again once it is.
                    with contextlib.suppress(KafkaError, AssertionError):
                        consumer.seek(tp, messages[0].offset)
                        consumer.pause(tp)
                    continue
                waits = [self._take_request(worker, msg) for msg in messages]
                self._hold_until_committed(consumer, tp, worker, waits)

    def _take_request(
        self, worker: PartitionWorker, msg: ConsumerRecord[Any, Any]
    ) -> asyncio.Future[None]:
        """Read and handle one message of the requests topic; the future of its commit.

        A request whose handling raises is counted and logged (``Tracker.request_failed``:
        the tracker does so itself for a request it takes) and left, its offset committed
        alone: this loop goes on with the next one, and the partition with it."""
        req: TrackingRequest | None = None
        try:
            req = self.tracker.read_request(msg.key, msg.value, worker.partition, msg.offset)
            forwarded = is_forwarded(msg.headers)
            return self.tracker.handle_request(worker, req, msg.offset, forwarded=forwarded)
        except Exception as exc:
            self.tracker.request_failed(worker, req, msg.offset, exc)
        try:
            return self.tracker.handle_request(worker, None, msg.offset)
        except Exception:  # the next request's commit takes its offset
            return done()

    def _hold_until_committed(
        self,
        consumer: AIOKafkaConsumer,
        tp: TopicPartition,
        worker: PartitionWorker,
        waits: list[asyncio.Future[None]],
    ) -> None:
        """Read no more of a requests partition until these requests of it are committed,
        while the other partitions go on: a partition whose commits are slow (its
        leader's broker lost, say) holds up only its own requests."""
        with contextlib.suppress(KafkaError, AssertionError):
            consumer.pause(tp)

        def resume(_: asyncio.Future[Any]) -> None:
            # A partition released or reset meanwhile is resumed by its next restore.
            if worker.closed or self.tracker.workers.get(tp.partition) is not worker:
                return
            with contextlib.suppress(KafkaError, AssertionError):
                consumer.resume(tp)

        asyncio.gather(*waits, return_exceptions=True).add_done_callback(resume)

    async def _partition_count(self, consumer: AIOKafkaConsumer) -> bool:
        """Whether requests may be taken: the tracker routes by the requests topic's
        partition count as it is now.

        Partitions added to the topics while the service runs show in the consumer's
        metadata (refreshed every few minutes, and the group rebalances then), and after
        each rebalance the count is asked of the cluster. A new count is taken on once the
        state topic has as many partitions: the tracker routes new batches by it, and the
        state view reads the new partitions too (requests wait until it has). Until then
        no request is taken, with one WARNING a minute. Batches stay on the partition
        that holds their state whatever the count (Tracker.route)."""
        known = consumer.partitions_for_topic(self.kcfg.requests_topic) or ()
        if not self._count_check.is_set() and len(known) <= self.tracker.partitions:
            return True
        try:
            counts = await partition_counts(
                self.kcfg,
                [self.kcfg.requests_topic, self.kcfg.state_topic],
                f"rightfoot-poller-admin-{self.instance}",
            )
        except (KafkaError, OSError) as exc:
            self._count_problem("partition_count_unknown", error=repr(exc)[:300])
            return False
        requests, state = counts.get(self.kcfg.requests_topic), counts.get(self.kcfg.state_topic)
        if not requests or requests != state:
            self._count_problem(
                "topic_partitions_differ",
                requests_topic=self.kcfg.requests_topic,
                requests_partitions=requests,
                state_topic=self.kcfg.state_topic,
                state_partitions=state,
            )
            return False
        self._count_check.clear()
        if requests != self.tracker.partitions:
            log.warning(
                "topic_partitions_changed",
                was=self.tracker.partitions,
                now=requests,
                note="batches stay on the partition that holds their state; new ones hash "
                "to the new count",
            )
            self.tracker.partitions = requests
            self.view.set_partitions(requests)
            # The consumer's own metadata may be minutes old: the group leader assigns the
            # new partitions only once its metadata shows them (aiokafka rejoins then).
            with contextlib.suppress(KafkaError):
                await consumer._client.force_metadata_update()
        return True

    def _count_problem(self, event: str, **fields: Any) -> None:
        self._count_problems.log(event, log, "warning", event, **fields, retry_in_s=5.0)

    async def _auth_probe(self) -> None:
        """While the API key is rejected, try it again now and then (re-reading a key file).

        The key counts as accepted again only on an answer from past the API's
        authentication (``key_probe_outcome``); an answer that says nothing about the key
        (a 5xx, a timeout, a 429) is one WARNING, and the key is tried again at the next
        interval, still rejected until then."""
        interval = self.settings.rightfoot.unauthorized_retry_s
        while not self._stopping.is_set():
            await asyncio.sleep(min(interval, 5.0) if not self.tracker.unauthorized else interval)
            if not self.tracker.unauthorized:
                continue
            # With no batch left to poll here (stopped, or moved to another replica), a
            # batch that cannot exist: the key is accepted if the answer is a 404.
            batch_id = self.tracker.any_tracked_batch() or AUTH_PROBE_BATCH_ID
            self.client.api_key.refresh()
            error: ApiError | None = None
            try:
                await self.client.fetch_page(batch_id, None, limit=1)
            except ApiError as exc:
                error = exc
            outcome = key_probe_outcome(error)
            if outcome == "rejected":
                log.warning("api_key_still_rejected", error=str(error), retry_in_s=interval)
            elif outcome == "inconclusive":
                log.warning(
                    "api_key_probe_inconclusive",
                    error=str(error),
                    error_kind=type(error).__name__,
                    note="the answer says nothing about the key; still taken as rejected",
                    retry_in_s=interval,
                )
            else:
                self.tracker.set_authorized()

    async def _loop_monitor(self) -> None:
        interval, brokers_every = 0.25, 20  # brokers: every 5 s
        for tick in itertools.count():
            before = time.monotonic()
            await asyncio.sleep(interval)
            now = time.monotonic()
            self._last_tick = now
            self.metrics.loop_lag.observe(max(0.0, now - before - interval))
            self.metrics.oldest_overdue_poll.set(self.tracker.oldest_overdue())
            self.metrics.ready.set(1 if self.readiness()[0] else 0)
            if tick % brokers_every == 0:
                self._check_brokers()

    def _check_brokers(self) -> None:
        """Which brokers answer: the metric of each, and /readyz's kafka check."""
        brokers = self.brokers.refresh()
        for broker, up in brokers.items():
            self.metrics.kafka_broker_reachable.labels(broker).set(1 if up else 0)
        self._brokers_reachable = any_broker_reachable(brokers)


async def run_service(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; exit 0 after a clean stop."""
    service = PollerService(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        starting = asyncio.create_task(service.start())
        done, _ = await asyncio.wait(
            {starting, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED
        )
        if starting in done:
            starting.result()
            await stop.wait()
        else:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
    finally:
        try:
            await asyncio.wait_for(service.stop(), settings.shutdown_grace_s)
        except TimeoutError:
            log.error("stop_timed_out", grace_s=settings.shutdown_grace_s)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0
