"""The service's exceptions: one root, small classes that carry their data."""

from __future__ import annotations

from typing import Literal


class PollerError(Exception):
    """Root of every error this service raises on purpose."""


class ConfigError(PollerError, ValueError):
    """The configuration is invalid; the message names the key and the problem."""


class SecretFileTooLarge(PollerError):
    """A secret file larger than any secret: a wrong path, or /dev/zero. It is refused
    without being read whole (``config.read_secret_file``)."""


class ApiError(PollerError):
    """The Rightfoot API answered with an error, or not in a way we understand."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after = retry_after

    @property
    def metric_code(self) -> str:
        return str(self.status) if self.status is not None else "error"

    @property
    def kind(self) -> str:
        """What failed, for throttling its log lines: the class and the HTTP status (or the
        service's own code: timeout, connection_error...). Never the vendor's ``code``
        text, which a vendor or gateway may make different every time (a request ID in
        it): each answer would be a kind of its own, never throttled, and held on to."""
        return f"{type(self).__name__}:{self.metric_code}"

    def __str__(self) -> str:
        parts = [f"HTTP {self.status}" if self.status is not None else None, self.code]
        prefix = " ".join(p for p in parts if p)
        return f"{prefix}: {self.args[0]}" if prefix else str(self.args[0])


class ApiUnauthorized(ApiError):
    """401/403: the API key is missing, wrong or not allowed; retrying will not help."""


class ApiForbidden(ApiError):
    """403: this key may not read that batch."""


class ApiNotFound(ApiError):
    """404: the batch does not exist (yet)."""


class ApiBadRequest(ApiError):
    """400: the request was refused; for a page token, the token is no longer valid."""


class ApiRateLimited(ApiError):
    """429: wait at least ``retry_after`` seconds."""


class ApiServerError(ApiError):
    """5xx: a transient vendor failure."""


class ApiTransportError(ApiError):
    """Timeout or connection failure before an HTTP answer."""

    @property
    def metric_code(self) -> str:
        return self.code or "connection_error"


class ApiMalformedResponse(ApiError):
    """200 with a body that is not the documented shape."""

    @property
    def metric_code(self) -> str:
        return "malformed"


class PageTokenLoop(ApiMalformedResponse):
    """A ``next_page_token`` led back to a page already read: paging would never end."""


class PageTokenRejected(ApiError):
    """Page tokens kept being rejected (400) within one poll."""


class RequestAborted(ApiError):
    """The caller withdrew before the request was sent."""


class RequestRejected(PollerError, ValueError):
    """A tracking request (Kafka message or HTTP body) is not valid."""


# --------------------------------------------------------------------------- Kafka


class PublishFailed(PollerError):
    """A unit of work was not committed; the partition restarts from its stored state."""


class PartitionLost(PublishFailed):
    """Another instance took over this partition (this producer was fenced)."""


ConnectionErrorReason = Literal["authentication", "authorization", "tls", "unreachable"]
CONNECTION_ERROR_REASONS: tuple[ConnectionErrorReason, ...] = (
    "authentication",
    "authorization",
    "tls",
    "unreachable",
)


class KafkaConnectionProblem(PollerError):
    """The brokers cannot be used: ``reason`` is one of CONNECTION_ERROR_REASONS.

    The message is meant for operators: it names the broker, the cause and the setting to
    check, and never contains the SASL password.
    """

    def __init__(self, reason: ConnectionErrorReason, message: str) -> None:
        super().__init__(message)
        self.reason: ConnectionErrorReason = reason


# --------------------------------------------------------------------------- export


class ExportUsageError(PollerError, ValueError):
    """The command line cannot be used as given (a bad batch ID, an unusable output path)."""


class ExportWriteError(PollerError):
    """The CSV could not be written (disk full, permission denied, closed pipe…)."""


class UnknownStateVersion(PollerError, ValueError):
    """A batch's stored state was written by a newer version of the service."""


# --------------------------------------------------------------------------- schema registry

RegistryUnavailableReason = Literal["unreachable", "timeout", "tls", "server_error", "throttled"]


class RegistryError(PollerError):
    """The schema registry refused a request, or answered in a way we do not understand.

    ``subject`` is the subject the request was about (when it was about one), ``status``
    the HTTP status and ``error_code`` the registry's own code (Confluent API: 40401
    subject not found, 42201 invalid schema, …). Messages never contain the password.
    """

    def __init__(
        self,
        message: str,
        *,
        subject: str | None = None,
        status: int | None = None,
        error_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.subject = subject
        self.status = status
        self.error_code = error_code


class RegistryUnavailable(RegistryError):
    """The registry cannot be reached or failed (``reason``); retrying later may help."""

    def __init__(
        self,
        reason: RegistryUnavailableReason,
        message: str,
        *,
        subject: str | None = None,
        status: int | None = None,
        error_code: int | None = None,
    ) -> None:
        super().__init__(message, subject=subject, status=status, error_code=error_code)
        self.reason: RegistryUnavailableReason = reason


class RegistryUnauthorized(RegistryError):
    """401/403: the registry refused the credentials or what they may do."""


class SchemaIncompatible(RegistryError):
    """409: the subject's compatibility rule refused the schema; the message names both."""


class SchemaNotRegistered(RegistryError):
    """Lookup only (no auto-registration): the subject does not hold this schema."""


class SchemaInvalid(RegistryError, ValueError):
    """422: the registry does not accept the schema itself."""
