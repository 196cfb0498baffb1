"""Configuration: one YAML file, every key overridable by ``RFP_<SECTION>__<KEY>``.

Secrets (the API key, the admin token, the SASL password, the schema registry's
password) come only from the environment or from mounted files, never from the YAML file.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo

from service.errors import ConfigError, SecretFileTooLarge

ENV_PREFIX = "RFP_"
# RFP_* variables that are not configuration keys.
NOT_KEYS = {"RFP_CONFIG"}


@dataclass(frozen=True)
class SecretSource:
    """Where one secret comes from: environment variables in order of precedence, then a
    file named by a variable. A variable that is empty counts as unset: an empty
    ``RFP_RIGHTFOOT__API_KEY=""`` does not hide ``RIGHTFOOT_API_KEY`` or the key file."""

    section: str
    key: str
    env: tuple[str, ...]
    file_var: str | None = None


SECRET_SOURCES = (
    SecretSource(
        "rightfoot",
        "api_key",
        ("RFP_RIGHTFOOT__API_KEY", "RIGHTFOOT_API_KEY"),
        "RIGHTFOOT_API_KEY_FILE",
    ),
    SecretSource("http", "admin_token", ("RFP_HTTP__ADMIN_TOKEN",), "RFP_HTTP__ADMIN_TOKEN_FILE"),
    SecretSource(
        "kafka", "sasl_password", ("RFP_KAFKA__SASL_PASSWORD",), "RFP_KAFKA__SASL_PASSWORD_FILE"
    ),
    SecretSource(
        "schema_registry",
        "password",
        ("RFP_SCHEMA_REGISTRY__PASSWORD",),
        "RFP_SCHEMA_REGISTRY__PASSWORD_FILE",
    ),
)
SECRET_KEYS = {(s.section, s.key) for s in SECRET_SOURCES}
# What to do about a missing API key, in every command that needs one.
NO_API_KEY = "no API key: set RIGHTFOOT_API_KEY, RFP_RIGHTFOOT__API_KEY or RIGHTFOOT_API_KEY_FILE"
# Read by SecretSource, not as plain overrides. Any other RFP_ variable is a key, and one
# that names no key is refused: an unknown RFP_..._FILE too, never ignored.
SECRET_ENV = {name for s in SECRET_SOURCES for name in s.env} | {
    s.file_var for s in SECRET_SOURCES if s.file_var is not None
}


def _printable(value: str, *, spaces: bool) -> bool:
    """No control or invisible character (nor any whitespace, unless ``spaces``: then
    plain spaces pass)."""
    return value.isprintable() and (spaces or " " not in value)


def is_bearer_token(value: str) -> bool:
    """Whether an HTTP ``Authorization: Bearer`` header can carry ``value`` as it is."""
    return _printable(value, spaces=False)


def _bearer_token(value: SecretStr) -> SecretStr:
    if not is_bearer_token(value.get_secret_value()):
        raise ValueError(
            "contains whitespace or a control character, which an HTTP "
            "Authorization: Bearer header cannot carry"
        )
    return value


def _password(value: SecretStr) -> SecretStr:
    if not _printable(value.get_secret_value(), spaces=True):
        raise ValueError("contains a control or invisible character")
    return value


def _stripped(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


def _header_text(value: str) -> str:
    if not _printable(value, spaces=True):
        raise ValueError(
            "contains a control or invisible character, which the User-Agent header cannot carry"
        )
    return value


# Secrets go into HTTP headers (a Bearer token) or a login (a password): whitespace around
# them is removed when they are read (see SecretSource); what is left inside is checked.
BearerToken = Annotated[SecretStr, AfterValidator(_bearer_token)]
Password = Annotated[SecretStr, AfterValidator(_password)]


_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


def _topic_name(value: str) -> str:
    if not _TOPIC_NAME.fullmatch(value) or value in (".", ".."):
        raise ValueError("a Kafka topic name is 1-249 characters of A-Z a-z 0-9 . _ -")
    return value


TopicName = Annotated[str, AfterValidator(_topic_name)]


def _file_problem(path: Path) -> str | None:
    """Why ``path`` is not a regular file this process can read; None if it is one. Not
    opened unless regular: a pipe would block the opener."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return f"{path} is not a regular file"
        with open(path, "rb"):
            pass
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    return None


def _ca_file_problem(path: Path) -> str | None:
    """Why ``path`` is not a CA bundle a TLS client can load; None if it is one."""
    problem = _file_problem(path)
    if problem is not None:
        return problem
    try:
        ssl.create_default_context().load_verify_locations(cafile=str(path))
    except ssl.SSLError:  # an OSError too: first
        return f"{path} is not a PEM certificate bundle (no certificate found)"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    return None


def _ca_bundle(path: Path | None) -> Path | None:
    """A CA bundle the API client can load, checked now: found later, when the first
    request is made, it was a traceback instead of a refusal."""
    if path is None:
        return None
    problem = _ca_file_problem(path)
    if problem is not None:
        raise ValueError(problem)
    return path


CaBundle = Annotated[Path, AfterValidator(_ca_bundle)]


def tls_files_problem(
    section: str, cafile: Path | None, certfile: Path | None, keyfile: Path | None
) -> str | None:
    """Why the TLS files of ``section`` (``ssl_cafile``, ``ssl_certfile``, ``ssl_keyfile``)
    cannot be used, in one line naming the key; None if they can.

    Each file named must be a regular file this process can read; the CA file must hold
    certificates; the certificate and its key go together, the key unencrypted (the service
    has no passphrase to give) and the key of that certificate. Found later, when a client
    connected, it was a retry forever (Kafka) or a refusal on the first request (registry).
    """
    for key, path in (("ssl_cafile", cafile), ("ssl_certfile", certfile), ("ssl_keyfile", keyfile)):
        problem = _file_problem(path) if path is not None else None
        if problem is not None:
            return f"{section}.{key}: {problem}"
    if certfile is not None and keyfile is None:
        return f"{section}.ssl_keyfile: required with ssl_certfile (the client certificate's key)"
    if keyfile is not None and certfile is None:
        return f"{section}.ssl_certfile: required with ssl_keyfile (the client certificate)"
    if cafile is not None:
        problem = _ca_file_problem(cafile)
        if problem is not None:
            return f"{section}.ssl_cafile: {problem}"
    if certfile is None or keyfile is None:
        return None
    return _key_pair_problem(section, certfile, keyfile)


def _key_pair_problem(section: str, certfile: Path, keyfile: Path) -> str | None:
    """Why a client certificate and its key, both readable files, do not load together."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cafile=str(certfile))
    except (ssl.SSLError, OSError):
        return f"{section}.ssl_certfile: {certfile} is not a PEM certificate (no certificate found)"
    asked: list[bool] = []

    def passphrase() -> bytes:
        asked.append(True)  # the key is encrypted: OpenSSL would prompt on a terminal
        return b""

    try:
        ctx.load_cert_chain(str(certfile), str(keyfile), password=passphrase)
    except ssl.SSLError as exc:  # an OSError too: first
        if exc.reason == "KEY_VALUES_MISMATCH":
            return (
                f"{section}.ssl_keyfile: {keyfile} is not the key of the certificate "
                "in ssl_certfile"
            )
        if not asked:  # else: encrypted, said below
            return f"{section}.ssl_keyfile: {keyfile} is not a PEM private key"
    except OSError as exc:
        return f"{section}.ssl_keyfile: cannot read {keyfile}: {exc.strerror or exc}"
    if asked:
        return (
            f"{section}.ssl_keyfile: {keyfile} is encrypted with a passphrase, which the service "
            "cannot give: use an unencrypted key (a mounted Secret)"
        )
    return None


def _port_error(port: str) -> str | None:
    """Why ``port`` (the text after the colon) is not a TCP port; None if it is one."""
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        return "the port must be a number from 1 to 65535"
    return None


def _broker_error(entry: str) -> str | None:
    """Why one entry of ``bootstrap_servers`` is not ``host``, ``host:port``, ``[v6]``,
    ``[v6]:port`` or a bare IPv6 address (aiokafka's forms, port 9092 if none); None if
    it is one of them."""
    port: str | None = None
    if entry.startswith("["):
        host, closed, rest = entry[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            return "an IPv6 address is written [address] or [address]:port"
        port = rest[1:] if rest else None
    elif entry.count(":") > 1:
        host = entry
        try:
            ipaddress.IPv6Address(entry)
        except ValueError:
            return "not host:port (an IPv6 address with a port is written [address]:port)"
    else:
        host, colon, after = entry.partition(":")
        port = after if colon else None
    if not host or not _printable(host, spaces=False) or "/" in host or "@" in host:
        return "not host:port"
    return _port_error(port) if port is not None else None


def _bootstrap_servers(value: str) -> str:
    entries = value.split(",")
    if not value.strip():
        raise ValueError("names no broker: give host:port[,host:port...]")
    for number, entry in enumerate(entries, 1):
        problem = "an empty entry" if not entry.strip() else _broker_error(entry.strip())
        if problem is not None:
            raise ValueError(f"entry {number} of {len(entries)}: {problem}")
    return value


BootstrapServers = Annotated[str, AfterValidator(_bootstrap_servers)]


class _Section(BaseModel):
    # An error never repeats the value given: it may be a secret. Every number is finite:
    # inf or nan in a duration or a rate would stall or spin the service.
    model_config = ConfigDict(
        extra="forbid", frozen=True, hide_input_in_errors=True, allow_inf_nan=False
    )


class RightfootConfig(_Section):
    base_url: str = "https://api.rightfoot.com"
    page_limit: int = Field(100, ge=1, le=100)
    export_path: str = "/v1/balances/export"
    api_key: BearerToken | None = None
    ca_bundle: CaBundle | None = None
    timeout_s: float = Field(10.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    max_requests_per_s: float = Field(20.0, gt=0)
    max_concurrent_requests: int = Field(16, ge=1)
    backoff_base_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(300.0, gt=0)
    max_attempts: int = Field(4, ge=1, description="attempts of one request within a poll")
    unauthorized_retry_s: float = Field(60.0, gt=0)
    #: The export command waits a 429's (or 503's) Retry-After up to this long, then fails.
    export_max_wait_s: float = Field(3600.0, ge=0, le=7 * 86400.0)
    #: The export's answer may take this long to begin (the vendor may build the CSV first);
    #: its body then timeout_s between two reads.
    export_timeout_s: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _check_url(self) -> RightfootConfig:
        parts = urlsplit(self.base_url)
        if parts.username is not None or parts.password is not None:
            # Refused rather than masked: the API takes the key as a Bearer token (aiohttp
            # would refuse every request with both), and the URL is the source of every event.
            raise ValueError(
                "base_url must not contain a user or password (user:password@): the API key "
                "is set as RIGHTFOOT_API_KEY or RIGHTFOOT_API_KEY_FILE"
            )
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError("base_url must be an absolute https:// URL")
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise ValueError(
                "base_url: plain http:// is only allowed for a loopback host; the API is HTTPS only"
            )
        try:
            port = parts.port
        except ValueError:  # not a number, or above 65535
            port = -1
        if port is not None and not 1 <= port <= 65535:
            raise ValueError("base_url: the port must be a number from 1 to 65535")
        # The API's paths are added to base_url: a query or fragment would swallow them.
        if "?" in self.base_url or "#" in self.base_url:
            raise ValueError("base_url must not have a query (?...) or a fragment (#...)")
        if not self.export_path.startswith("/"):
            raise ValueError("export_path must start with '/'")
        if "?" in self.export_path or "#" in self.export_path:
            raise ValueError("export_path must not have a query (?...) or a fragment (#...)")
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError("backoff_max_s must be >= backoff_base_s")
        return self


class PollingConfig(_Section):
    interval_min_s: float = Field(30.0, ge=0)
    interval_max_s: float = Field(60.0, ge=0)
    not_found_grace_s: float = Field(300.0, ge=0)
    complete_after_idle_s: float = Field(900.0, gt=0)
    max_age_s: float = Field(7 * 86400.0, gt=0)
    max_records_per_transaction: int = Field(1000, ge=1)
    max_records_in_flight: int = Field(
        50_000,
        ge=1,
        description="records read and not yet committed, over all polls of the replica",
    )
    # Reconciliation with the API's count (total_processed) of a batch's records.
    sweep_interval_s: float = Field(
        300.0, gt=0, description="without a count from the API: read the whole batch this often"
    )
    sweep_backoff_max_s: float = Field(
        3600.0, gt=0, description="longest wait between sweeps that keep finding nothing"
    )
    # A finished batch (completed, expired, failed, stopped) is kept this long, then
    # forgotten: its state tombstoned, so that what a replica holds and restores does not
    # grow with every batch it ever tracked.
    finished_retention_s: float = Field(
        30 * 86400.0,
        gt=0,
        description="how long a finished batch's state is kept (GET /v1/batches, "
        "a repeated tracking request ignored, a stopped or failed batch resumed)",
    )

    @model_validator(mode="after")
    def _check_window(self) -> PollingConfig:
        if self.interval_max_s < self.interval_min_s:
            raise ValueError("interval_max_s must be >= interval_min_s")
        return self


class KafkaConfig(_Section):
    bootstrap_servers: BootstrapServers = "localhost:9092"
    balances_topic: TopicName = "rightfoot.balances"
    batch_events_topic: TopicName = "rightfoot.batch-events"
    requests_topic: TopicName = "rightfoot.batch-requests"
    state_topic: TopicName = "rightfoot.batch-state"
    group_id: str = "rightfoot-poller"
    delivery: Literal["exactly_once", "at_least_once"] = "exactly_once"
    partitions: int = Field(12, ge=1)
    replication_factor: int = Field(
        -1, ge=-1, description="-1: three, or the number of brokers if fewer"
    )
    create_topics: bool = True
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: Password | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    session_timeout_ms: int = Field(10000, ge=1000)
    transaction_timeout_ms: int = Field(60000, ge=1000)
    value_format: Literal["json", "json_sr"] = Field(
        "json",
        description="json: plain UTF-8 JSON; json_sr: the Confluent wire format (a zero byte, "
        "the 4-byte schema id, then the same JSON), schemas in schema_registry",
    )

    @property
    def dlq_topic(self) -> str:
        return f"{self.balances_topic}.dlq"

    @model_validator(mode="after")
    def _check_topics(self) -> KafkaConfig:
        """Each topic holds one kind of message: no two may be the same."""
        if len(self.dlq_topic) > 249:
            raise ValueError("balances_topic must be at most 245 characters (its DLQ adds .dlq)")
        topics = {
            "balances_topic": self.balances_topic,
            "the DLQ topic <balances_topic>.dlq": self.dlq_topic,
            "batch_events_topic": self.batch_events_topic,
            "requests_topic": self.requests_topic,
            "state_topic": self.state_topic,
        }
        seen: dict[str, str] = {}
        for key, topic in topics.items():
            if topic in seen:
                raise ValueError(
                    f"{key} must differ from {seen[topic]} (both {topic!r}): "
                    "each topic holds one kind of message"
                )
            seen[topic] = key
        return self

    @model_validator(mode="after")
    def _check_security(self) -> KafkaConfig:
        if self.security_protocol.startswith("SASL"):
            if not self.sasl_mechanism:
                raise ValueError("sasl_mechanism is required with a SASL security_protocol")
            if not self.sasl_username:
                raise ValueError("sasl_username is required with a SASL security_protocol")
            if self.sasl_password is None:
                raise ValueError(
                    "the SASL password is required: set RFP_KAFKA__SASL_PASSWORD "
                    "or RFP_KAFKA__SASL_PASSWORD_FILE"
                )
        return self


class SchemaRegistryConfig(_Section):
    """The schema registry (Confluent API) used when kafka.value_format is ``json_sr``."""

    url: str | None = Field(None, description="e.g. https://registry:8081 or …/apis/ccompat/v7")
    username: str | None = None
    password: Password | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    auto_register: bool = Field(
        True, description="register the schemas at start; false: only look them up"
    )
    timeout_s: float = Field(10.0, gt=0)
    backoff_base_s: float = Field(1.0, gt=0, description="retries while it is unavailable")
    backoff_max_s: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> SchemaRegistryConfig:
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError("backoff_max_s must be >= backoff_base_s")
        if self.url is not None:
            parts = urlsplit(self.url)
            if parts.scheme not in ("https", "http") or not parts.hostname:
                raise ValueError("url must be an absolute https:// or http:// URL")
            if parts.username is not None or parts.password is not None:
                raise ValueError(
                    "url must not contain credentials: set username, and the password as "
                    "RFP_SCHEMA_REGISTRY__PASSWORD or RFP_SCHEMA_REGISTRY__PASSWORD_FILE"
                )
        if self.username and self.password is None:
            raise ValueError(
                "the registry password is required with a username: set "
                "RFP_SCHEMA_REGISTRY__PASSWORD or RFP_SCHEMA_REGISTRY__PASSWORD_FILE"
            )
        if self.password is not None and not self.username:
            raise ValueError("username is required when a registry password is set")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together (client certificate)")
        return self


class HttpConfig(_Section):
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)
    admin_token: BearerToken | None = None
    max_body_bytes: int = Field(16384, ge=256)


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "console"] = "json"


def default_instance_id() -> str:
    return os.environ.get("POD_NAME", "").strip() or f"{socket.gethostname()}-{os.getpid()}"


class Settings(_Section):
    """The effective configuration of one replica."""

    # In the User-Agent header, the logs and Kafka client ids; the default is checked too.
    instance_id: Annotated[str, BeforeValidator(_stripped), AfterValidator(_header_text)] = Field(
        default_factory=default_instance_id, min_length=1, max_length=128, validate_default=True
    )
    shutdown_grace_s: float = Field(20.0, gt=0)
    rightfoot: RightfootConfig = RightfootConfig()
    polling: PollingConfig = PollingConfig()
    kafka: KafkaConfig = KafkaConfig()
    schema_registry: SchemaRegistryConfig = SchemaRegistryConfig()
    http: HttpConfig = HttpConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _check_value_format(self) -> Settings:
        if self.kafka.value_format == "json_sr" and not self.schema_registry.url:
            # Names its key itself: errors of the whole document carry no location.
            raise ValueError(
                "schema_registry.url: required when kafka.value_format is json_sr "
                "(set it, or RFP_SCHEMA_REGISTRY__URL)"
            )
        return self

    @model_validator(mode="after")
    def _check_tls_files(self) -> Settings:
        """The Kafka and schema registry TLS files, checked when the configuration is
        loaded. Here rather than on their sections: a section built in code (the tests of
        how the clients report a file that has gone since) is not refused."""
        for section, cfg in (("kafka", self.kafka), ("schema_registry", self.schema_registry)):
            problem = tls_files_problem(section, cfg.ssl_cafile, cfg.ssl_certfile, cfg.ssl_keyfile)
            if problem is not None:
                raise ValueError(problem)  # names its key: see _check_value_format
        return self

    def require_api_key(self) -> None:
        """Raises ConfigError unless an API key is set: ``run`` and ``check-config`` need
        one (without it every request is a 401); ``track`` and ``simulate`` do not."""
        if self.rightfoot.api_key is None:
            raise ConfigError(f"rightfoot.api_key: {NO_API_KEY}")

    def secrets(self) -> list[str]:
        """Every secret value in effect, for redaction."""
        values = [
            self.rightfoot.api_key,
            self.http.admin_token,
            self.kafka.sasl_password,
            self.schema_registry.password,
        ]
        return [v.get_secret_value() for v in values if v is not None and v.get_secret_value()]

    def masked(self) -> dict[str, Any]:
        """The effective configuration as plain data, secrets masked."""
        data: dict[str, Any] = self.model_dump(mode="json")
        for section, key in SECRET_KEYS:
            value = data.get(section, {}).get(key)
            data[section][key] = "********" if value else None
        return data


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# A secret is a token or a password: a file larger than this is not one.
SECRET_FILE_MAX_BYTES = 64 * 1024


def read_secret_file(path: str | os.PathLike[str]) -> str:
    """The text of a secret file, whitespace around it removed.

    Only a regular file is read (a mounted Secret is one, through its symlinks): a pipe
    would block the reader until someone writes to it (the event loop, for a rotated
    secret read again) and a device need not end. It is opened without blocking, so that
    even a pipe is refused at once. At most ``SECRET_FILE_MAX_BYTES`` + 1 bytes are read,
    so that a wrong path (a log, a disk image) is refused rather than read into memory.

    Raises OSError (``strerror`` says why), UnicodeDecodeError (not UTF-8) or
    SecretFileTooLarge.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a pipe, a device or a directory)")
        data = file.read(SECRET_FILE_MAX_BYTES + 1)
    if len(data) > SECRET_FILE_MAX_BYTES:
        raise SecretFileTooLarge(
            f"the secret file is larger than {SECRET_FILE_MAX_BYTES // 1024} KiB"
        )
    return data.decode("utf-8").strip()


def _read_secret_file(var: str, env: dict[str, str]) -> str | None:
    path = env.get(var)
    if not path:
        return None
    try:
        return read_secret_file(path)
    except OSError as exc:
        raise ConfigError(f"{var}: cannot read the secret file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{var}: the secret file is not UTF-8 text") from None
    except SecretFileTooLarge as exc:
        raise ConfigError(f"{var}: {exc}") from None


def _secret(source: SecretSource, env: dict[str, str]) -> tuple[str, str] | None:
    """The secret's value, whitespace around it removed, from its first source that gives
    one (empty counts as unset); and the variable it came from."""
    for var in source.env:
        value = env.get(var, "").strip()
        if value:
            return value, var
    if source.file_var is not None:
        from_file = _read_secret_file(source.file_var, env)
        if from_file:
            return from_file, source.file_var
    return None


def _format_error(exc: ValidationError, origins: dict[tuple[str, ...], str] | None = None) -> str:
    first = exc.errors()[0]
    msg = first["msg"].removeprefix("Value error, ")
    if not first["loc"] and first["type"] == "value_error":
        return msg  # a check across sections, whose message names its key
    loc = ".".join(str(p) for p in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    origin = (origins or {}).get(tuple(str(p) for p in first["loc"]))
    if origin is not None:
        msg = f"{msg} (from {origin})"
    return f"{loc}: {msg}"


def load_settings(path: Path | str | None, env: dict[str, str] | None = None) -> Settings:
    """Read the YAML file (if any), apply environment overrides and validate.

    Raises ConfigError with one line naming the key and the problem.
    """
    env = dict(os.environ if env is None else env)
    data: dict[str, Any] = {} if path is None else _read_config_file(path)
    for section, key in sorted(SECRET_KEYS):
        block = data.get(section)
        if isinstance(block, dict) and key in block:
            raise ConfigError(
                f"{section}.{key}: secrets are not read from the config file; "
                "use the environment or a mounted file"
            )
    _apply_env_overrides(data, env)
    origins: dict[tuple[str, ...], str] = {}
    for source in SECRET_SOURCES:
        found = _secret(source, env)
        if found is not None:
            block = data.setdefault(source.section, {})
            if isinstance(block, dict):
                block[source.key], origins[(source.section, source.key)] = found
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, origins)) from None


def _read_config_file(path: Path | str) -> dict[str, Any]:
    """The YAML file's mapping; ConfigError, in one line, if it cannot be read as one."""
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path}: not UTF-8 text (byte {exc.start} cannot be decoded)"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"config file {path}: not valid YAML{where}: {problem}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping")
    for section in _SECTIONS:
        # A section whose keys are all commented out (``kafka:`` alone) is YAML null: it
        # means the defaults, as an empty section does. A null scalar key stays null.
        if section in loaded and loaded[section] is None:
            loaded[section] = {}
    return loaded


# The top-level keys that are sections (``kafka:``...), not values (``instance_id``...).
_SECTIONS = tuple(
    name
    for name, info in Settings.model_fields.items()
    if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
)


def _field(path: list[str]) -> FieldInfo | None:
    """The field of the key at ``path`` (``[section, key]`` or ``[key]``); None if there is
    none (an unknown key: refused as such when validated)."""
    model: type[BaseModel] | None = Settings
    field: FieldInfo | None = None
    for part in path:
        if model is None:
            return None
        field = model.model_fields.get(part)
        if field is None:
            return None
        kind = field.annotation
        model = kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None
    return field


def _apply_env_overrides(data: dict[str, Any], env: dict[str, str]) -> None:
    """``RFP_SECTION__KEY=value`` sets ``section.key``; ``RFP_KEY`` a top-level key.

    An empty (or blank) value unsets a key without a default (``ssl_cafile``,
    ``schema_registry.url``...), whatever the file says; for a key with a default it is
    refused, naming the key: an empty broker list or topic is a mistake, not the default.
    """
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name in NOT_KEYS:
            continue
        if name in SECRET_ENV:  # see SecretSource
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        target = data
        for part in path[:-1]:
            child = target.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: {part} is not a section")
            target = child
        field = _field(path) if not value.strip() else None
        if field is None:
            target[path[-1]] = value
        elif field.default is None and field.default_factory is None:
            target[path[-1]] = None
        else:
            raise ConfigError(
                f"{'.'.join(path)}: {name} is empty: set a value, or unset the variable to keep "
                "the config file's value or the default"
            )
