"""Configuration refusals: non-finite numbers, topic names, credentials in base_url.

Each refusal is one line naming the key and the problem, and a non-zero exit of
``check-config``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from service.cli import main
from service.config import SECRET_KEYS, Settings, load_settings
from service.errors import ConfigError


def refusal(env: dict[str, str], path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, env=env)
    message = str(info.value)
    assert "\n" not in message
    return message


def float_keys() -> list[tuple[str, ...]]:
    """Every float setting, as (key,) or (section, key): found, not listed, so that a new
    one is covered too."""
    keys: list[tuple[str, ...]] = []
    for name, field in Settings.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            for key, sub in section.model_fields.items():
                if sub.annotation is float:
                    keys.append((name, key))
        elif field.annotation is float:
            keys.append((name,))
    return keys


def test_the_float_settings_are_found() -> None:
    keys = float_keys()
    assert ("polling", "interval_max_s") in keys
    assert ("shutdown_grace_s",) in keys
    assert len(keys) > 15


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity", "NaN"])
@pytest.mark.parametrize("key", float_keys(), ids=".".join)
def test_every_float_setting_must_be_finite(key: tuple[str, ...], value: str) -> None:
    var = "RFP_" + "__".join(key).upper()
    message = refusal({var: value})
    assert message.startswith(".".join(key) + ": ")
    assert "finite" in message


def test_a_non_finite_number_in_the_yaml_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("polling:\n  interval_max_s: .inf\n", encoding="utf-8")
    assert refusal({}, path).startswith("polling.interval_max_s: ")


@pytest.mark.parametrize(
    "key", ["balances_topic", "batch_events_topic", "requests_topic", "state_topic"]
)
@pytest.mark.parametrize("value", ["", "with space", ".", "..", "t" * 250, "topic/name", "tópico"])
def test_a_topic_name_kafka_would_refuse_is_refused(tmp_path: Path, key: str, value: str) -> None:
    # From the file: an empty RFP_ variable is refused before any check of the value.
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"kafka": {key: value}}), encoding="utf-8")
    message = refusal({}, path)
    assert message.startswith(f"kafka.{key}: a Kafka topic name is 1-249 characters")


def test_a_balances_topic_whose_dlq_name_is_too_long_is_refused() -> None:
    assert load_settings(None, env={"RFP_KAFKA__BALANCES_TOPIC": "b" * 245}).kafka.dlq_topic
    message = refusal({"RFP_KAFKA__BALANCES_TOPIC": "b" * 246})
    assert message.startswith("kafka: balances_topic must be at most 245 characters")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"RFP_KAFKA__STATE_TOPIC": "rightfoot.batch-requests"},
            "state_topic must differ from requests_topic",
        ),
        (
            {"RFP_KAFKA__STATE_TOPIC": "rightfoot.balances"},
            "state_topic must differ from balances_topic",
        ),
        (
            {"RFP_KAFKA__REQUESTS_TOPIC": "rightfoot.balances"},
            "requests_topic must differ from balances_topic",
        ),
        (
            {"RFP_KAFKA__BATCH_EVENTS_TOPIC": "rightfoot.balances.dlq"},
            "batch_events_topic must differ from the DLQ topic <balances_topic>.dlq",
        ),
        (
            {"RFP_KAFKA__STATE_TOPIC": "rightfoot.batch-events"},
            "state_topic must differ from batch_events_topic",
        ),
    ],
)
def test_two_settings_naming_the_same_topic_are_refused(env: dict[str, str], expected: str) -> None:
    message = refusal(env)
    assert message.startswith(f"kafka: {expected} (both ")


@pytest.mark.parametrize(
    "url",
    [
        "https://poller:hunter2-secret@api.rightfoot.com",
        "https://poller@api.rightfoot.com",
        "https://:hunter2-secret@api.rightfoot.com/",
        "http://poller:hunter2-secret@127.0.0.1:8099",
    ],
)
def test_credentials_in_base_url_are_refused_without_repeating_them(url: str) -> None:
    message = refusal({"RFP_RIGHTFOOT__BASE_URL": url})
    assert message.startswith("rightfoot: base_url must not contain a user or password")
    assert "RIGHTFOOT_API_KEY" in message
    assert "hunter2" not in message and "poller" not in message


def test_check_config_refuses_credentials_in_base_url_and_prints_none(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "rightfoot:\n  base_url: https://poller:hunter2-secret@api.rightfoot.com\n",
        encoding="utf-8",
    )
    assert main(["check-config", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "base_url" in err
    assert "hunter2" not in out + err


@pytest.mark.parametrize(
    "env",
    [
        {"RFP_KAFKA__STATE_TOPIC": ""},
        {"RFP_KAFKA__STATE_TOPIC": "rightfoot.batch-requests"},
        {"RFP_POLLING__INTERVAL_MAX_S": "inf"},
    ],
)
def test_check_config_exits_2_with_one_line_on_each_refusal(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: dict[str, str]
) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert main(["check-config"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("rightfoot-poller: invalid configuration: ")
    assert err.count("\n") == 1


# --- an empty RFP_ variable -----------------------------------------------------------------


def plain_keys() -> list[tuple[tuple[str, ...], bool]]:
    """Every key an ``RFP_`` variable sets (not the secrets, read by their own rule), and
    whether it is optional (no default: unset unless given)."""
    keys: list[tuple[tuple[str, ...], bool]] = []
    for name, field in Settings.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            for key, sub in section.model_fields.items():
                if (name, key) not in SECRET_KEYS:
                    keys.append(((name, key), sub.default is None))
        else:
            keys.append(((name,), field.default is None and field.default_factory is None))
    return keys


def test_the_keys_are_found() -> None:
    keys = dict(plain_keys())
    assert keys[("kafka", "ssl_cafile")] and keys[("schema_registry", "url")]
    assert not keys[("kafka", "bootstrap_servers")] and not keys[("instance_id",)]
    assert ("rightfoot", "api_key") not in keys


@pytest.mark.parametrize("value", ["", " ", "\n"])
@pytest.mark.parametrize(
    ("key", "optional"), plain_keys(), ids=[".".join(k) for k, _ in plain_keys()]
)
def test_an_empty_variable_unsets_an_optional_key_and_is_refused_for_others(
    key: tuple[str, ...], optional: bool, value: str
) -> None:
    """It was taken as a value: "." for a path (ssl_cafile, ca_bundle), a bad URL, a bad
    SASL mechanism; for a key with a default, whatever its check made of it (an empty
    group_id passed)."""
    var = "RFP_" + "__".join(key).upper()
    if not optional:
        assert refusal({var: value}) == (
            f"{'.'.join(key)}: {var} is empty: set a value, or unset the variable to keep "
            "the config file's value or the default"
        )
        return
    settings = load_settings(None, env={var: value})
    section = getattr(settings, key[0]) if len(key) == 2 else settings
    assert getattr(section, key[-1]) is None


def test_an_empty_variable_unsets_what_the_file_says(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "rightfoot:\n  ca_bundle: /nonexistent/ca.pem\n"
        "kafka:\n  ssl_cafile: /nonexistent/ca.crt\n  sasl_mechanism: PLAIN\n"
        "schema_registry:\n  url: https://registry:8081\n",
        encoding="utf-8",
    )
    env = {
        "RFP_RIGHTFOOT__CA_BUNDLE": "",
        "RFP_KAFKA__SSL_CAFILE": "",
        "RFP_KAFKA__SASL_MECHANISM": "",
        "RFP_SCHEMA_REGISTRY__URL": "",
    }
    settings = load_settings(path, env=env)
    assert settings.rightfoot.ca_bundle is None and settings.kafka.ssl_cafile is None
    assert settings.kafka.sasl_mechanism is None and settings.schema_registry.url is None


def test_what_an_empty_variable_leaves_unset_is_still_required_where_it_is() -> None:
    message = refusal({"RFP_KAFKA__VALUE_FORMAT": "json_sr", "RFP_SCHEMA_REGISTRY__URL": ""})
    assert message.startswith("schema_registry.url: required when kafka.value_format is json_sr")
    message = refusal(
        {
            "RFP_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
            "RFP_KAFKA__SASL_MECHANISM": "",
            "RFP_KAFKA__SASL_USERNAME": "poller",
            "RFP_KAFKA__SASL_PASSWORD": "pw",
        }
    )
    assert message == "kafka: sasl_mechanism is required with a SASL security_protocol"


def test_an_empty_variable_of_an_unknown_key_is_refused_as_unknown() -> None:
    assert refusal({"RFP_KAFKA__SSL_CAFIEL": ""}) == "kafka.ssl_cafiel: unknown key"
