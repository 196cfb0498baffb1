"""Where a record is fetched: the Rightfoot API client (aiohttp).

``GET /v1/balances`` with Bearer auth, timeouts, bounded retries with
exponential backoff and jitter on 5xx, timeouts and connection errors, 429
answered by waiting at least ``Retry-After``, and typed errors for the rest.
A 503's ``Retry-After`` is a lower bound of its backoff (service/retry.py); one longer
than MAX_INLINE_RETRY_AFTER_S ends the poll's retries, as a 429's does. Unlike a 429's,
it does not hold the replica's other requests back.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import UTC
from pathlib import Path
from typing import Any

import aiohttp
import structlog
import yarl
from pydantic import BaseModel, ConfigDict, ValidationError

from service import __version__
from service.config import SECRET_SOURCES, RightfootConfig, is_bearer_token, read_secret_file
from service.errors import (
    ApiBadRequest,
    ApiError,
    ApiForbidden,
    ApiMalformedResponse,
    ApiNotFound,
    ApiRateLimited,
    ApiServerError,
    ApiTransportError,
    ApiUnauthorized,
    RequestAborted,
    SecretFileTooLarge,
)
from service.logs import Throttle, redact, register_secret
from service.metrics import Metrics
from service.pacing import RateLimiter, Sleep
from service.records import Page, parse_page
from service.retry import RetryPolicy, retrying

log = structlog.get_logger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024
# A 429 (or a 503) asking for a longer wait than this ends the attempt; the batch is
# rescheduled.
MAX_INLINE_RETRY_AFTER_S = 30.0
# A 429 holds every request of the replica back for its Retry-After, however long: the
# vendor's wait is honoured in full. A wait over this long is honoured too, with a WARNING
# (retry_after_long): every request of the replica, and its batches' polls, stop that long.
LONG_RETRY_AFTER_S = 3600.0
# No plausible wait is longer than this. A Retry-After beyond it (a date years ahead, a
# number past any clock) would stop the replica for good: it counts as this, with a WARNING
# (retry_after_capped), and a 429 then may ask again.
MAX_RETRY_AFTER_S = 7 * 86400.0
# An error body's message (and code) is kept to this many characters in errors, and so in
# log lines, a failed batch's reason and the export's error line.
MAX_ERROR_MESSAGE_CHARS = 200
MAX_ERROR_CODE_CHARS = 100


class _ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="ignore")
    code: str | None = None
    message: str | None = None


class _ErrorBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    error: _ErrorDetail | None = None


def user_agent(instance_id: str) -> str:
    return f"rightfoot-poller/{__version__} ({instance_id})"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # "-0000" or asctime: an HTTP date is in GMT
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


# At most this much of a redirect's Location is repeated in an error.
SHOWN_LOCATION_CHARS = 200


def one_line(text: str) -> str:
    """``text`` with every run of whitespace, control and other unprintable characters (a
    newline, a bidi override) made one space: one line, that shows what it says."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def vendor_text(text: str, limit: int, secrets: Iterable[str | None] = ()) -> str:
    """Text the API sent, fit to put in an error: ``secrets`` (the API key, should the
    vendor echo it back) redacted, on one line (``one_line``), at most ``limit``
    characters (then ending with "…")."""
    text = one_line(redact(text, [s for s in secrets if s]))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def redirect_refused(
    resp: aiohttp.ClientResponse, settings: str, secrets: Iterable[str | None] = ()
) -> ApiError:
    """The error for a 3xx, which is not followed (it could lead anywhere, over plain HTTP):
    where it pointed (no user, password, query or fragment, nor ``secrets``), and the
    ``settings`` to check."""
    location = resp.headers.get("Location")
    where = "without a Location"
    if location:
        try:
            target = yarl.URL(location)
            if target.is_absolute():
                target = target.with_user(None)
            shown = str(target.with_query(None).with_fragment(None))
        except ValueError:
            where = "to a Location that is not a URL"
        else:
            where = f"to {vendor_text(shown, SHOWN_LOCATION_CHARS, secrets)}"
    return ApiError(
        f"the API redirected {where}; redirects are not followed (check {settings})",
        status=resp.status,
    )


def error_from_response(
    status: int, body: bytes, retry_after: float | None, secrets: Iterable[str | None] = ()
) -> ApiError:
    """The typed error for an answer that is not 200, with the API's ``error.code`` and
    ``error.message`` made one short line without ``secrets`` (see ``vendor_text``): the
    text goes on to log lines, a failed batch's ``reason`` and the export's error line."""
    code = message = None
    try:
        parsed = _ErrorBody.model_validate_json(body)
        if parsed.error is not None:
            code, message = parsed.error.code, parsed.error.message
    except ValidationError:
        pass
    secrets = list(secrets)
    if message is not None:
        message = vendor_text(message, MAX_ERROR_MESSAGE_CHARS, secrets)
    if code is not None:
        code = vendor_text(code, MAX_ERROR_CODE_CHARS, secrets) or None
    text = message or f"the API answered {status}"
    cls: type[ApiError]
    if status == 400:
        cls = ApiBadRequest
    elif status == 401:
        cls = ApiUnauthorized
    elif status == 403:
        cls = ApiForbidden
    elif status == 404:
        cls = ApiNotFound
    elif status == 429:
        cls = ApiRateLimited
    elif status >= 500:
        cls = ApiServerError
    else:
        cls = ApiError
    return cls(text, status=status, code=code, retry_after=retry_after)


# Where the API key comes from: variables first, then a file (config.SECRET_SOURCES).
_API_KEY_SOURCE = next(s for s in SECRET_SOURCES if (s.section, s.key) == ("rightfoot", "api_key"))


class ApiKey:
    """The API key; re-read from ``RIGHTFOOT_API_KEY_FILE`` when asked (rotation), if that
    is where it came from."""

    def __init__(self, value: str | None, file: Path | None = None) -> None:
        self._value = value
        self._file = file

    @classmethod
    def from_env(cls, value: str | None, env: Mapping[str, str] | None = None) -> ApiKey:
        """The key ``value`` the configuration resolved, with the file to re-read it from
        only when it came from the file: a variable (``RIGHTFOOT_API_KEY`` or
        ``RFP_RIGHTFOOT__API_KEY``, not empty) wins over the file, after a 401 as at start,
        by the configuration's own rule (``config.SecretSource``)."""
        env = os.environ if env is None else env
        source = _API_KEY_SOURCE
        if any(env.get(var, "").strip() for var in source.env) or source.file_var is None:
            return cls(value)
        path = env.get(source.file_var)
        return cls(value, Path(path) if path else None)

    def get(self) -> str | None:
        return self._value

    def refresh(self) -> None:
        """Read the key file again; a file that cannot be read, is larger than 64 KiB, or
        whose text no Bearer header can carry, leaves the key as it was (one WARNING,
        never the text). What was read is redacted from log lines from then on, as the key
        read at start, even a text refused as a key (it may be one still)."""
        if self._file is None:
            return
        try:
            value = read_secret_file(self._file)
        except OSError as exc:
            log.warning("api_key_file_unreadable", error=exc.strerror)
            return
        except UnicodeDecodeError:
            log.warning("api_key_file_unreadable", error="the file is not UTF-8 text")
            return
        except SecretFileTooLarge as exc:
            log.warning("api_key_file_unreadable", error=str(exc))
            return
        register_secret(value)
        if not is_bearer_token(value):  # the rule the configuration applies at start
            log.warning(
                "api_key_file_unreadable",
                error="the key has whitespace or a control character inside",
            )
            return
        self._value = value or self._value


class RightfootClient:
    def __init__(
        self,
        cfg: RightfootConfig,
        *,
        instance_id: str,
        metrics: Metrics,
        api_key: ApiKey,
        limiter: RateLimiter,
        rng: random.Random | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.api_key = api_key
        self.limiter = limiter
        self.user_agent = user_agent(instance_id)
        self.rng = rng or random.Random()
        self.sleep = sleep
        self.retry_policy = RetryPolicy.from_config(cfg, max_retry_after_s=MAX_INLINE_RETRY_AFTER_S)
        # Every request of this client holds one of these while in flight, the export's too.
        self.concurrency = asyncio.Semaphore(cfg.max_concurrent_requests)
        self.retries = Throttle()  # api_retry: one line a kind of failure a minute
        self.warnings = Throttle()  # retry_after_long, retry_after_capped
        self._session: aiohttp.ClientSession | None = None
        self._base = cfg.base_url.rstrip("/")

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        if self.cfg.ca_bundle is not None:
            ctx.load_verify_locations(cafile=str(self.cfg.ca_bundle))
        return ctx

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                ssl=self.ssl_context(), limit=self.cfg.max_concurrent_requests * 2
            )
            timeout = aiohttp.ClientTimeout(
                total=self.cfg.timeout_s, sock_connect=self.cfg.connect_timeout_s
            )
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=timeout, headers={"User-Agent": self.user_agent}
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("RightfootClient.start() must be awaited first")
        return self._session

    def _auth_headers(self, key: str | None = None) -> dict[str, str]:
        """The Authorization header for ``key`` (by default the current key)."""
        key = key or self.api_key.get()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def secrets(self, sent: str | None = None) -> tuple[str | None, ...]:
        """What an error must not show: the API key ``sent`` and the current one."""
        return (sent, self.api_key.get())

    def error_from(
        self, resp: aiohttp.ClientResponse, body: bytes, sent: str | None = None
    ) -> ApiError:
        """The typed error for an answer that is neither 200 nor a redirect: its text
        without the API key (``secrets``), whatever the vendor echoes back. A 429 holds
        every request of this client back for its Retry-After."""
        secrets = self.secrets(sent)
        retry_after = self.retry_after(resp)
        if resp.status == 429:
            self.rate_limited(retry_after)
        return error_from_response(resp.status, body, retry_after, secrets)

    async def fetch_page(
        self,
        batch_id: str,
        token: str | None,
        limit: int | None = None,
        *,
        stop: Callable[[], bool] | None = None,
        content_ids: bool = True,
    ) -> Page:
        """One page of a batch, retried within bounds; typed ApiError otherwise.

        ``stop`` is asked before every attempt: once it is true, no new request is sent
        (the batch is moving to another replica) and RequestAborted is raised.
        ``content_ids``: see ``records.parse_page``.
        """
        params = {"batchId": batch_id, "limit": str(limit or self.cfg.page_limit)}
        if token:
            params["nextPageToken"] = token
        # A page that cannot be read (a body over MAX_BODY_BYTES, from _read_body; one not of
        # the documented shape, from parse_page) is counted here; the poll that fails with it
        # is logged where polls are (writer.poll_failed: one line a kind a minute).
        try:
            # Lines logged while fetching (retries) name the batch, whoever asked for the page.
            with structlog.contextvars.bound_contextvars(batch_id=batch_id):
                body = await self._get_with_retries("balances", "/v1/balances", params, stop)
            page = parse_page(batch_id, body, content_ids=content_ids)
        except ApiMalformedResponse:
            self.metrics.invalid_input.labels("api", "malformed_page").inc()
            raise
        for note, detail in page.notes.items():
            self.metrics.invalid_input.labels("api", note).inc()
            self.warnings.log(
                note, log, "warning", "page_odd", batch_id=batch_id, reason=note, detail=detail
            )
        return page

    async def _get_with_retries(
        self,
        endpoint: str,
        path: str,
        params: dict[str, str] | list[tuple[str, str]],
        stop: Callable[[], bool] | None = None,
    ) -> bytes:
        """One GET, retried as ``retry_policy`` says; ``stop`` is asked before every attempt."""

        async def attempt() -> bytes:
            if stop is not None and stop():
                raise RequestAborted("stopped before sending the request")
            return await self._get_once(endpoint, path, params)

        def on_retry(exc: ApiError, _failures: int, delay: float) -> None:
            fields = {"endpoint": endpoint, "error": str(exc), "delay_s": round(delay, 3)}
            self.retries.log(exc.kind, log, "info", "api_retry", **fields)

        return await retrying(
            attempt, self.retry_policy, rng=self.rng, sleep=self.sleep, on_retry=on_retry
        )

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """A request's turn to be sent: one of ``max_concurrent_requests``, then the rate.

        In that order. A request waiting for a slot has not used the rate's allowance:
        however long the requests in flight take, the ones let go after them reach the
        API spaced by ``max_requests_per_s``. (Allowance taken while waiting for a slot
        would be spent all at once when the API answers again after a slow spell.)
        """
        async with self.concurrency:
            await self.limiter.acquire()
            yield

    async def _get_once(
        self, endpoint: str, path: str, params: dict[str, str] | list[tuple[str, str]]
    ) -> bytes:
        async with self.turn():
            started = time.perf_counter()
            code = "error"
            sent = self.api_key.get()
            try:
                # A redirect is not followed: it could lead to plain HTTP, or elsewhere
                # than rightfoot.base_url names. It fails the request, saying where it led.
                async with self.session.get(
                    self._base + path,
                    params=params,
                    headers=self._auth_headers(sent),
                    allow_redirects=False,
                ) as resp:
                    code = str(resp.status)
                    body = await self._read_body(resp)
                    if resp.status == 200:
                        return body
                    if 300 <= resp.status < 400:
                        raise redirect_refused(resp, "rightfoot.base_url", self.secrets(sent))
                    raise self.error_from(resp, body, sent)
            except TimeoutError:
                code = "timeout"
                raise ApiTransportError("the API did not answer in time", code="timeout") from None
            except aiohttp.ClientError as exc:
                code = "connection_error"
                raise ApiTransportError(
                    f"cannot reach the API: {type(exc).__name__}", code="connection_error"
                ) from None
            finally:
                self.metrics.api_requests.labels(endpoint, code).inc()
                self.metrics.api_duration.labels(endpoint).observe(time.perf_counter() - started)

    def retry_after(self, resp: aiohttp.ClientResponse) -> float | None:
        """The answer's Retry-After in seconds, in full up to ``MAX_RETRY_AFTER_S``."""
        value = parse_retry_after(resp.headers.get("Retry-After"))
        if value is None or value <= LONG_RETRY_AFTER_S:
            return value
        if value <= MAX_RETRY_AFTER_S:
            held = self.warnings.admit("retry_after_long")
            if held is not None:
                log.warning(
                    "retry_after_long",
                    retry_after_s=round(value),
                    suppressed=held,
                    detail="the API asked for a wait over an hour; every request waits it",
                )
            return value
        self.metrics.invalid_input.labels("api", "retry_after").inc()
        held = self.warnings.admit("retry_after_capped")
        if held is not None:
            log.warning(
                "retry_after_capped",
                retry_after_s=round(value) if value < 1e18 else value,
                waited_s=MAX_RETRY_AFTER_S,
                suppressed=held,
                detail="the API asked for a wait longer than 7 days; waiting 7 days",
            )
        return MAX_RETRY_AFTER_S

    def rate_limited(self, retry_after: float | None) -> None:
        """A 429 applies to the whole API key: hold every request of this client back."""
        self.limiter.pause_until(
            time.monotonic() + (retry_after if retry_after is not None else 1.0)
        )

    async def _read_body(self, resp: aiohttp.ClientResponse) -> bytes:
        if resp.content_length is not None and resp.content_length > MAX_BODY_BYTES:
            raise ApiMalformedResponse("response body too large", status=resp.status)
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(65536):
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise ApiMalformedResponse("response body too large", status=resp.status)
            chunks.append(chunk)
        return b"".join(chunks)

    # Used by the CSV export (service/export.py), with turn().
    def request_args(self) -> dict[str, Any]:
        return {"headers": self._auth_headers()}
