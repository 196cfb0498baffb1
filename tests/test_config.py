"""Configuration: the contract's defaults, YAML plus ``RFP_*`` overrides, secrets, refusals."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from service.cli import main
from service.config import Settings, load_settings
from service.errors import ConfigError

API_KEY = "rf_live_api_key_0123456789abcdef"
ADMIN_TOKEN = "admin-token-fedcba9876543210"
SASL_PASSWORD = "sasl-password-13579bdf"


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_the_contract_table(clean_env: pytest.MonkeyPatch) -> None:
    s = load_settings(None, env={})
    assert s.rightfoot.base_url == "https://api.rightfoot.com"
    assert s.rightfoot.page_limit == 100
    assert s.rightfoot.export_path == "/v1/balances/export"
    assert s.rightfoot.ca_bundle is None
    assert s.rightfoot.api_key is None
    assert (s.polling.interval_min_s, s.polling.interval_max_s) == (30, 60)
    assert s.kafka.bootstrap_servers == "localhost:9092"
    assert s.kafka.balances_topic == "rightfoot.balances"
    assert s.kafka.batch_events_topic == "rightfoot.batch-events"
    assert s.kafka.requests_topic == "rightfoot.batch-requests"
    assert s.kafka.dlq_topic == "rightfoot.balances.dlq"
    assert s.kafka.delivery == "exactly_once"
    assert s.kafka.security_protocol == "PLAINTEXT"
    assert s.kafka.sasl_mechanism is None
    assert s.kafka.sasl_username is None
    assert s.kafka.sasl_password is None
    assert (s.kafka.ssl_cafile, s.kafka.ssl_certfile, s.kafka.ssl_keyfile) == (None, None, None)
    assert (s.http.host, s.http.port) == ("0.0.0.0", 8080)
    assert s.http.admin_token is None
    assert s.instance_id == f"{socket.gethostname()}-{os.getpid()}"


def test_instance_id_defaults_to_the_pod_name(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("POD_NAME", "rightfoot-poller-7c9f-abcde")
    assert load_settings(None, env={}).instance_id == "rightfoot-poller-7c9f-abcde"
    assert load_settings(None, env={"RFP_INSTANCE_ID": "replica-a"}).instance_id == "replica-a"


def test_the_documented_example_file_is_valid_and_states_the_defaults() -> None:
    example = Path(__file__).resolve().parent.parent / "config.yaml"
    s = load_settings(example, env={})
    assert s.masked() | {"instance_id": None} == Settings().masked() | {"instance_id": None}


def test_yaml_values_and_env_overrides_env_wins(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
instance_id: from-yaml
rightfoot:
  page_limit: 50
  base_url: https://rightfoot.example.com
polling:
  interval_min_s: 10
  interval_max_s: 20
kafka:
  bootstrap_servers: yaml-broker:9092
  delivery: at_least_once
http:
  port: 9000
""",
    )
    env = {
        "RFP_KAFKA__BOOTSTRAP_SERVERS": "env-broker:9093",
        "RFP_RIGHTFOOT__PAGE_LIMIT": "25",
        "RFP_POLLING__INTERVAL_MAX_S": "45",
        "RFP_INSTANCE_ID": "from-env",
        "RFP_KAFKA__BALANCES_TOPIC": "team.balances",
    }
    s = load_settings(path, env=env)
    assert s.kafka.bootstrap_servers == "env-broker:9093"
    assert s.rightfoot.page_limit == 25
    assert s.polling.interval_max_s == 45
    assert s.instance_id == "from-env"
    assert s.kafka.balances_topic == "team.balances"
    assert s.kafka.dlq_topic == "team.balances.dlq"
    # Keys the environment does not set keep the file's values.
    assert s.rightfoot.base_url == "https://rightfoot.example.com"
    assert s.polling.interval_min_s == 10
    assert s.kafka.delivery == "at_least_once"
    assert s.http.port == 9000


def test_env_override_without_a_file() -> None:
    s = load_settings(None, env={"RFP_HTTP__PORT": "8181", "RFP_KAFKA__CREATE_TOPICS": "false"})
    assert s.http.port == 8181
    assert s.kafka.create_topics is False


def test_rfp_config_variable_is_not_a_configuration_key(tmp_path: Path) -> None:
    path = write(tmp_path, "http:\n  port: 9001\n")
    s = load_settings(path, env={"RFP_CONFIG": str(path)})
    assert s.http.port == 9001


@pytest.mark.parametrize(
    "env",
    [
        {"RIGHTFOOT_API_KEY": API_KEY},
        {"RFP_RIGHTFOOT__API_KEY": API_KEY},
        {"RFP_RIGHTFOOT__API_KEY": API_KEY, "RIGHTFOOT_API_KEY": "other-key-0000"},
    ],
    ids=["RIGHTFOOT_API_KEY", "RFP_RIGHTFOOT__API_KEY", "RFP_wins"],
)
def test_api_key_from_the_environment(env: dict[str, str]) -> None:
    s = load_settings(None, env=env)
    assert s.rightfoot.api_key is not None
    assert s.rightfoot.api_key.get_secret_value() == API_KEY
    assert API_KEY in s.secrets()


def test_api_key_from_a_mounted_file(tmp_path: Path) -> None:
    key_file = write(tmp_path, API_KEY + "\n", name="api-key")
    s = load_settings(None, env={"RIGHTFOOT_API_KEY_FILE": str(key_file)})
    assert s.rightfoot.api_key is not None
    assert s.rightfoot.api_key.get_secret_value() == API_KEY


def test_unreadable_api_key_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^RIGHTFOOT_API_KEY_FILE: "):
        load_settings(None, env={"RIGHTFOOT_API_KEY_FILE": str(tmp_path / "missing")})


def test_admin_token_and_sasl_password_from_the_environment(tmp_path: Path) -> None:
    pw_file = write(tmp_path, SASL_PASSWORD, name="sasl")
    env = {
        "RFP_HTTP__ADMIN_TOKEN": ADMIN_TOKEN,
        "RFP_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "RFP_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
        "RFP_KAFKA__SASL_USERNAME": "poller",
        "RFP_KAFKA__SASL_PASSWORD_FILE": str(pw_file),
    }
    s = load_settings(None, env=env)
    assert s.http.admin_token is not None
    assert s.http.admin_token.get_secret_value() == ADMIN_TOKEN
    assert s.kafka.sasl_password is not None
    assert s.kafka.sasl_password.get_secret_value() == SASL_PASSWORD
    env["RFP_KAFKA__SASL_PASSWORD"] = "from-env-password"
    s = load_settings(None, env=env)
    assert s.kafka.sasl_password is not None
    assert s.kafka.sasl_password.get_secret_value() == "from-env-password"


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("rightfoot:\n  api_key: abc\n", "rightfoot.api_key"),
        ("http:\n  admin_token: abc\n", "http.admin_token"),
        ("kafka:\n  sasl_password: abc\n", "kafka.sasl_password"),
    ],
)
def test_secrets_in_the_yaml_are_refused_naming_the_key(
    tmp_path: Path, yaml_text: str, key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, yaml_text), env={})
    message = str(info.value)
    assert message.startswith(f"{key}: ")
    assert "environment" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8099",
        "http://localhost:8099",
        "http://[::1]:8099",
        "https://api.rightfoot.com",
        "https://rightfoot.internal.example:8443/",
    ],
)
def test_base_url_accepted(url: str) -> None:
    assert load_settings(None, env={"RFP_RIGHTFOOT__BASE_URL": url}).rightfoot.base_url == url


@pytest.mark.parametrize(
    "url",
    ["http://api.rightfoot.com", "http://10.0.0.5:8099", "http://0.0.0.0:8099", "ftp://x/"],
)
def test_plain_http_refused_unless_loopback(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^rightfoot: base_url.*(?i:https)"):
        load_settings(None, env={"RFP_RIGHTFOOT__BASE_URL": url})


@pytest.mark.parametrize("limit", ["1", "100"])
def test_page_limit_bounds_accepted(limit: str) -> None:
    s = load_settings(None, env={"RFP_RIGHTFOOT__PAGE_LIMIT": limit})
    assert s.rightfoot.page_limit == int(limit)


@pytest.mark.parametrize("limit", ["0", "101", "-5", "ten"])
def test_page_limit_out_of_range_refused(limit: str) -> None:
    with pytest.raises(ConfigError, match=r"^rightfoot\.page_limit: "):
        load_settings(None, env={"RFP_RIGHTFOOT__PAGE_LIMIT": limit})


def test_export_max_wait_s_defaults_to_an_hour_and_is_bounded() -> None:
    assert load_settings(None, env={}).rightfoot.export_max_wait_s == 3600
    env = {"RFP_RIGHTFOOT__EXPORT_MAX_WAIT_S": "0"}
    assert load_settings(None, env=env).rightfoot.export_max_wait_s == 0
    for bad in ("-1", "604801"):
        with pytest.raises(ConfigError, match=r"^rightfoot\.export_max_wait_s: "):
            load_settings(None, env={"RFP_RIGHTFOOT__EXPORT_MAX_WAIT_S": bad})


def test_export_timeout_s_defaults_to_five_minutes_apart_from_timeout_s() -> None:
    s = load_settings(None, env={"RFP_RIGHTFOOT__TIMEOUT_S": "3"}).rightfoot
    assert (s.timeout_s, s.export_timeout_s) == (3, 300)
    with pytest.raises(ConfigError, match=r"^rightfoot\.export_timeout_s: "):
        load_settings(None, env={"RFP_RIGHTFOOT__EXPORT_TIMEOUT_S": "0"})


def test_polling_window_must_not_be_inverted(tmp_path: Path) -> None:
    path = write(tmp_path, "polling:\n  interval_min_s: 60\n  interval_max_s: 30\n")
    with pytest.raises(ConfigError, match=r"^polling: interval_max_s must be >= interval_min_s$"):
        load_settings(path, env={})
    equal = write(tmp_path, "polling:\n  interval_min_s: 45\n  interval_max_s: 45\n", "eq.yaml")
    assert load_settings(equal, env={}).polling.interval_max_s == 45


@pytest.mark.parametrize(
    ("yaml_text", "env", "key"),
    [
        ("rightfoot:\n  page_limitt: 10\n", {}, "rightfoot.page_limitt"),
        ("kafkaa:\n  bootstrap_servers: x\n", {}, "kafkaa"),
        ("", {"RFP_KAFKA__BOOTSTRAP": "x:1"}, "kafka.bootstrap"),
    ],
)
def test_unknown_key_refused_naming_it(
    tmp_path: Path, yaml_text: str, env: dict[str, str], key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, yaml_text), env=env)
    assert str(info.value) == f"{key}: unknown key"


def test_a_section_with_every_key_commented_out_is_an_empty_one(tmp_path: Path) -> None:
    # `kafka:` with nothing under it is YAML null: the section's defaults, and the
    # environment can still set its keys.
    path = write(
        tmp_path,
        "kafka:\n  # bootstrap_servers: broker:9092\nhttp:\n  port: 9002\nlogging:\n",
    )
    s = load_settings(path, env={})
    assert s.kafka.bootstrap_servers == "localhost:9092"
    assert s.logging.level == "INFO"
    assert s.http.port == 9002
    s = load_settings(path, env={"RFP_KAFKA__BOOTSTRAP_SERVERS": "broker-1:9092"})
    assert s.kafka.bootstrap_servers == "broker-1:9092"
    s = load_settings(
        path, env={"RFP_KAFKA__SASL_USERNAME": "poller", "RFP_KAFKA__SASL_PASSWORD": SASL_PASSWORD}
    )
    assert s.kafka.sasl_password is not None
    assert s.kafka.sasl_password.get_secret_value() == SASL_PASSWORD


def test_a_null_value_is_not_taken_for_an_empty_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^shutdown_grace_s: "):
        load_settings(write(tmp_path, "shutdown_grace_s:\n"), env={})
    with pytest.raises(ConfigError, match=r"^kafka\.bootstrap_servers: "):
        load_settings(write(tmp_path, "kafka:\n  bootstrap_servers:\n"), env={})


def test_invalid_yaml_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "rightfoot: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(path, env={})


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(write(tmp_path, "- a\n- b\n"), env={})


def test_missing_config_file_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        load_settings(tmp_path / "missing.yaml", env={})


@pytest.mark.parametrize("value", ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"])
def test_security_protocols(value: str) -> None:
    env = {"RFP_KAFKA__SECURITY_PROTOCOL": value}
    if value.startswith("SASL"):
        env |= {
            "RFP_KAFKA__SASL_MECHANISM": "PLAIN",
            "RFP_KAFKA__SASL_USERNAME": "u",
            "RFP_KAFKA__SASL_PASSWORD": SASL_PASSWORD,
        }
    assert load_settings(None, env=env).kafka.security_protocol == value


def test_sasl_without_password_refused() -> None:
    env = {
        "RFP_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "RFP_KAFKA__SASL_MECHANISM": "SCRAM-SHA-256",
        "RFP_KAFKA__SASL_USERNAME": "poller",
    }
    with pytest.raises(ConfigError, match=r"^kafka: .*RFP_KAFKA__SASL_PASSWORD"):
        load_settings(None, env=env)


def test_unknown_delivery_refused() -> None:
    with pytest.raises(ConfigError, match=r"^kafka\.delivery: "):
        load_settings(None, env={"RFP_KAFKA__DELIVERY": "at_most_once"})


def test_masked_never_contains_the_secrets() -> None:
    env = {
        "RIGHTFOOT_API_KEY": API_KEY,
        "RFP_HTTP__ADMIN_TOKEN": ADMIN_TOKEN,
        "RFP_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "RFP_KAFKA__SASL_MECHANISM": "PLAIN",
        "RFP_KAFKA__SASL_USERNAME": "poller",
        "RFP_KAFKA__SASL_PASSWORD": SASL_PASSWORD,
    }
    s = load_settings(None, env=env)
    masked = s.masked()
    text = yaml.safe_dump(masked) + repr(masked) + repr(s) + str(s)
    for secret in (API_KEY, ADMIN_TOKEN, SASL_PASSWORD):
        assert secret not in text
    assert masked["rightfoot"]["api_key"] == "********"
    assert masked["http"]["admin_token"] == "********"
    assert masked["kafka"]["sasl_password"] == "********"
    assert masked["kafka"]["sasl_username"] == "poller"
    assert sorted(s.secrets()) == sorted([API_KEY, ADMIN_TOKEN, SASL_PASSWORD])


def test_masked_shows_unset_secrets_as_null() -> None:
    masked = load_settings(None, env={}).masked()
    assert masked["rightfoot"]["api_key"] is None
    assert masked["http"]["admin_token"] is None


def test_check_config_prints_masked_configuration(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("RIGHTFOOT_API_KEY", API_KEY)
    clean_env.setenv("RFP_HTTP__ADMIN_TOKEN", ADMIN_TOKEN)
    clean_env.setenv("RFP_KAFKA__BOOTSTRAP_SERVERS", "broker-1:9092")
    path = write(tmp_path, "rightfoot:\n  page_limit: 42\n")
    assert main(["check-config", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert API_KEY not in out + err
    assert ADMIN_TOKEN not in out + err
    printed = yaml.safe_load(out)
    assert printed["rightfoot"]["page_limit"] == 42
    assert printed["rightfoot"]["api_key"] == "********"
    assert printed["http"]["admin_token"] == "********"
    assert printed["kafka"]["bootstrap_servers"] == "broker-1:9092"


@pytest.mark.parametrize(
    ("yaml_text", "env", "needle"),
    [
        ("rightfoot:\n  page_limit: 500\n", {}, "rightfoot.page_limit"),
        ("rightfoot:\n  api_key: in-the-file\n", {}, "rightfoot.api_key"),
        ("", {"RFP_RIGHTFOOT__BASE_URL": "http://api.rightfoot.com"}, "base_url"),
        ("http:\n  nope: 1\n", {}, "http.nope: unknown key"),
    ],
)
def test_check_config_invalid_exits_2_with_one_line(
    tmp_path: Path,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    yaml_text: str,
    env: dict[str, str],
    needle: str,
) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    path = write(tmp_path, yaml_text)
    assert main(["check-config", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("\n")
    assert err.count("\n") == 1
    assert needle in err


def test_check_config_invalid_yaml_is_one_line(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "rightfoot:\n  page_limit: [1,\n")
    assert main(["check-config", "--config", str(path)]) == 2
    _, err = capsys.readouterr()
    assert "not valid YAML" in err
    assert err.count("\n") == 1


# --- schema registry (kafka.value_format json_sr) --------------------------------------

REGISTRY_PASSWORD = "registry-password-2468ace0"


def test_value_format_defaults_to_plain_json(clean_env: pytest.MonkeyPatch) -> None:
    s = load_settings(None, env={})
    assert s.kafka.value_format == "json"
    assert s.schema_registry.url is None
    assert s.schema_registry.auto_register is True
    assert s.schema_registry.password is None


def test_json_sr_without_a_registry_url_names_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, env={"RFP_KAFKA__VALUE_FORMAT": "json_sr"})
    message = str(info.value)
    assert message.startswith("schema_registry.url: required when kafka.value_format is json_sr")
    assert "\n" not in message


def test_unknown_value_format_refused() -> None:
    with pytest.raises(ConfigError, match=r"^kafka\.value_format: "):
        load_settings(None, env={"RFP_KAFKA__VALUE_FORMAT": "protobuf"})


def test_json_sr_with_registry_settings_from_yaml_and_env(tmp_path: Path) -> None:
    from certs import CertificateAuthority

    ca = CertificateAuthority(tmp_path / "registry-tls", name="ca")
    path = write(
        tmp_path,
        "kafka:\n  value_format: json_sr\n"
        "schema_registry:\n  url: https://registry.internal:8081/apis/ccompat/v7\n"
        f"  username: poller\n  ssl_cafile: {ca.cert}\n  auto_register: false\n",
    )
    s = load_settings(path, env={"RFP_SCHEMA_REGISTRY__PASSWORD": REGISTRY_PASSWORD})
    assert s.kafka.value_format == "json_sr"
    assert s.schema_registry.url == "https://registry.internal:8081/apis/ccompat/v7"
    assert s.schema_registry.username == "poller"
    assert s.schema_registry.ssl_cafile == ca.cert
    assert s.schema_registry.auto_register is False
    assert s.schema_registry.password is not None
    assert s.schema_registry.password.get_secret_value() == REGISTRY_PASSWORD


def test_registry_password_from_a_mounted_file_env_wins(tmp_path: Path) -> None:
    pw_file = write(tmp_path, REGISTRY_PASSWORD + "\n", name="registry-password")
    env = {
        "RFP_SCHEMA_REGISTRY__URL": "http://127.0.0.1:8081",
        "RFP_SCHEMA_REGISTRY__USERNAME": "poller",
        "RFP_SCHEMA_REGISTRY__PASSWORD_FILE": str(pw_file),
    }
    s = load_settings(None, env=env)
    assert s.schema_registry.password is not None
    assert s.schema_registry.password.get_secret_value() == REGISTRY_PASSWORD
    env["RFP_SCHEMA_REGISTRY__PASSWORD"] = "from-env-password"
    s = load_settings(None, env=env)
    assert s.schema_registry.password is not None
    assert s.schema_registry.password.get_secret_value() == "from-env-password"


def test_registry_password_in_the_yaml_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^schema_registry\.password: .*environment"):
        load_settings(write(tmp_path, "schema_registry:\n  password: abc\n"), env={})


def test_registry_username_without_password_refused() -> None:
    env = {"RFP_SCHEMA_REGISTRY__URL": "https://r:8081", "RFP_SCHEMA_REGISTRY__USERNAME": "u"}
    with pytest.raises(ConfigError, match=r"^schema_registry: .*RFP_SCHEMA_REGISTRY__PASSWORD"):
        load_settings(None, env=env)


@pytest.mark.parametrize(
    "url", ["registry:8081", "ftp://registry", "https://", "https://user:pw@registry:8081"]
)
def test_bad_registry_url_refused(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, env={"RFP_SCHEMA_REGISTRY__URL": url})
    assert str(info.value).startswith("schema_registry: url must")
    assert "pw@" not in str(info.value)


def test_registry_password_is_masked_and_redacted() -> None:
    env = {
        "RFP_SCHEMA_REGISTRY__URL": "https://registry:8081",
        "RFP_SCHEMA_REGISTRY__USERNAME": "poller",
        "RFP_SCHEMA_REGISTRY__PASSWORD": REGISTRY_PASSWORD,
    }
    s = load_settings(None, env=env)
    masked = s.masked()
    assert REGISTRY_PASSWORD not in yaml.safe_dump(masked) + repr(masked) + repr(s) + str(s)
    assert masked["schema_registry"]["password"] == "********"
    assert masked["schema_registry"]["username"] == "poller"
    assert REGISTRY_PASSWORD in s.secrets()


def test_registry_backoff_must_not_be_inverted() -> None:
    env = {"RFP_SCHEMA_REGISTRY__BACKOFF_BASE_S": "10", "RFP_SCHEMA_REGISTRY__BACKOFF_MAX_S": "5"}
    with pytest.raises(ConfigError, match=r"^schema_registry: backoff_max_s must be >="):
        load_settings(None, env=env)


# --- values that passed validation and failed at run time --------------------------------


def test_a_ca_bundle_that_loads_is_accepted(tmp_path: Path) -> None:
    from certs import CertificateAuthority

    ca = CertificateAuthority(tmp_path / "ca")
    s = load_settings(None, env={"RFP_RIGHTFOOT__CA_BUNDLE": str(ca.cert)})
    assert s.rightfoot.ca_bundle == ca.cert


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda d: d / "missing.pem", "cannot read .*missing.pem: No such file or directory"),
        (lambda d: d, "is not a regular file"),
        (lambda d: write(d, "not a certificate\n", "ca.pem"), "not a PEM certificate bundle"),
        (lambda d: write(d, "", "empty.pem"), "not a PEM certificate bundle"),
    ],
    ids=["missing", "directory", "not-a-certificate", "empty"],
)
def test_a_ca_bundle_the_client_cannot_load_is_refused_naming_the_key(
    tmp_path: Path, make: Callable[[Path], Path], reason: str
) -> None:
    """Accepted before, it was a traceback out of the API client's first request."""
    with pytest.raises(ConfigError, match=rf"^rightfoot\.ca_bundle: .*{reason}"):
        load_settings(None, env={"RFP_RIGHTFOOT__CA_BUNDLE": str(make(tmp_path))})


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_ca_bundle_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "x", "ca.pem")
    path.chmod(0)
    with pytest.raises(ConfigError, match=r"^rightfoot\.ca_bundle: cannot read .*Permission"):
        load_settings(None, env={"RFP_RIGHTFOOT__CA_BUNDLE": str(path)})


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://api.rightfoot.com:99999", "base_url: the port must be a number from 1 to 65535"),
        ("https://api.rightfoot.com:abc", "base_url: the port must be a number from 1 to 65535"),
        ("https://api.rightfoot.com:0", "base_url: the port must be a number from 1 to 65535"),
        ("https://api.rightfoot.com/?region=eu", "base_url must not have a query"),
        ("https://api.rightfoot.com/?", "base_url must not have a query"),
        ("https://api.rightfoot.com/#top", "base_url must not have a query (?...) or a fragment"),
    ],
)
def test_base_url_with_a_bad_port_a_query_or_a_fragment_is_refused(url: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, env={"RFP_RIGHTFOOT__BASE_URL": url})
    assert str(info.value).startswith(f"rightfoot: {reason}")
    assert "region" not in str(info.value)  # the value is not repeated: it may hold a secret


@pytest.mark.parametrize("path", ["/v1/balances/export?format=csv", "/v1/export#x"])
def test_export_path_with_a_query_or_a_fragment_is_refused(path: str) -> None:
    with pytest.raises(ConfigError, match=r"^rightfoot: export_path must not have a query"):
        load_settings(None, env={"RFP_RIGHTFOOT__EXPORT_PATH": path})


@pytest.mark.parametrize(
    "servers",
    ["kafka:9092", "a:9092,b:9093", "a:9092, b:9093", "kafka", "[::1]:9092", "::1", "[fe80::1]"],
)
def test_bootstrap_servers_accepted(servers: str) -> None:
    s = load_settings(None, env={"RFP_KAFKA__BOOTSTRAP_SERVERS": servers})
    assert s.kafka.bootstrap_servers == servers


@pytest.mark.parametrize(
    ("servers", "reason"),
    [
        ("", "names no broker"),
        ("  ", "names no broker"),
        ("kafka:abc", "entry 1 of 1: the port must be a number from 1 to 65535"),
        ("a:9092,b:99999", "entry 2 of 2: the port must be a number from 1 to 65535"),
        ("kafka:0", "entry 1 of 1: the port must be a number from 1 to 65535"),
        ("kafka:", "entry 1 of 1: the port must be a number from 1 to 65535"),
        ("a:9092,,b:9092", "entry 2 of 3: an empty entry"),
        ("a:9092,", "entry 2 of 2: an empty entry"),
        (":9092", "entry 1 of 1: not host:port"),
        ("kafka://a:9092", "entry 1 of 1: not host:port"),
        ("a:1:2", "entry 1 of 1: not host:port"),
        ("[::1", "entry 1 of 1: an IPv6 address is written"),
    ],
)
def test_bootstrap_servers_that_name_no_usable_broker_are_refused(
    tmp_path: Path, servers: str, reason: str
) -> None:
    # From the file: an empty RFP_ variable is refused before any check of the value.
    path = write(tmp_path, yaml.safe_dump({"kafka": {"bootstrap_servers": servers}}))
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert str(info.value).startswith(f"kafka.bootstrap_servers: {reason}")


@pytest.mark.parametrize(
    ("var", "value", "needle"),
    [
        ("RFP_RIGHTFOOT__CA_BUNDLE", "/nonexistent/ca.pem", "rightfoot.ca_bundle: cannot read"),
        ("RFP_RIGHTFOOT__BASE_URL", "https://api.rightfoot.com:99999", "base_url: the port"),
        ("RFP_KAFKA__BOOTSTRAP_SERVERS", "kafka:x", "kafka.bootstrap_servers: entry 1"),
        ("RFP_KAFKA__SSL_CAFILE", "/nonexistent/ca.crt", "kafka.ssl_cafile: cannot read"),
        ("RFP_KAFKA__BOOTSTRAP_SERVERS", "", "kafka.bootstrap_servers: RFP_KAFKA__BOOTSTRAP"),
    ],
)
@pytest.mark.parametrize("command", ["check-config", "run", "export", "track"])
def test_each_command_refuses_them_in_one_line_before_doing_anything(
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
    var: str,
    value: str,
    needle: str,
) -> None:
    clean_env.setenv(var, value)

    def started(*_: object) -> int:
        raise AssertionError(f"{command} went on with {var}={value}")

    # What each command does once its configuration is loaded: not reached.
    for module, name in [
        ("service.app", "run_service"),
        ("service.export", "export_main"),
        ("service.intake", "send_requests"),
    ]:
        clean_env.setattr(f"{module}.{name}", started)
    args = {
        "check-config": [],
        "run": [],
        "export": ["5d3c6bbb-fc1a-46a4-93da-1ce4a54b0d83", "-o", "-"],
        "track": ["5d3c6bbb-fc1a-46a4-93da-1ce4a54b0d83"],
    }[command]
    assert main([command, *args]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("rightfoot-poller: invalid configuration: ")
    assert err.count("\n") == 1 and needle in err
