"""Secrets from the environment and mounted files: read, cleaned and checked at load.

Every refusal is one line naming where the secret came from, and never holds the secret.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from service.cli import main
from service.config import load_settings
from service.errors import ConfigError
from service.kafka_clients import sasl_password

API_KEY = "rf_live_api_key_0123456789abcdef"
ADMIN_TOKEN = "admin-token-fedcba9876543210"
SASL_PASSWORD = "sasl-password-13579bdf"
REGISTRY_PASSWORD = "registry-password-2468ace0"

SASL = {
    "RFP_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
    "RFP_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
    "RFP_KAFKA__SASL_USERNAME": "poller",
}
REGISTRY = {
    "RFP_SCHEMA_REGISTRY__URL": "https://registry:8081",
    "RFP_SCHEMA_REGISTRY__USERNAME": "poller",
}


def refusal(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(None, env=env)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- a secret file that is not UTF-8 ------------------------------------------------------


@pytest.mark.parametrize(
    ("var", "extra"),
    [
        ("RIGHTFOOT_API_KEY_FILE", {}),
        ("RFP_HTTP__ADMIN_TOKEN_FILE", {}),
        ("RFP_KAFKA__SASL_PASSWORD_FILE", SASL),
        ("RFP_SCHEMA_REGISTRY__PASSWORD_FILE", REGISTRY),
    ],
)
def test_a_secret_file_that_is_not_utf8_is_one_line_naming_the_variable(
    tmp_path: Path, var: str, extra: dict[str, str]
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"\xff\xfek\x00e\x00y\x00")  # UTF-16, as some editors save it
    message = refusal({var: str(secret), **extra})
    assert message.startswith(f"{var}: ")
    assert "UTF-8" in message


# --- a secret file larger than any secret ---------------------------------------------------

SECRET_FILES = [
    ("RIGHTFOOT_API_KEY_FILE", {}, "rightfoot.api_key"),
    ("RFP_HTTP__ADMIN_TOKEN_FILE", {}, "http.admin_token"),
    ("RFP_KAFKA__SASL_PASSWORD_FILE", SASL, "kafka.sasl_password"),
    ("RFP_SCHEMA_REGISTRY__PASSWORD_FILE", REGISTRY, "schema_registry.password"),
]


@pytest.mark.parametrize(("var", "extra", "key"), SECRET_FILES)
def test_a_secret_file_over_64_kib_is_refused_in_one_line_naming_the_variable(
    tmp_path: Path, var: str, extra: dict[str, str], key: str
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"k" * (64 * 1024))  # the largest accepted
    settings = load_settings(None, env={var: str(secret), **extra})
    assert "k" * (64 * 1024) in settings.secrets()
    secret.write_bytes(b"k" * (64 * 1024 + 1))
    assert refusal({var: str(secret), **extra}) == (f"{var}: the secret file is larger than 64 KiB")


@pytest.fixture(params=["fifo", "device"])
def not_a_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A path that is no regular file: a pipe nobody writes to (opening it to read would
    wait for a writer, for ever) or /dev/zero (reading it would never end)."""
    if request.param == "device":
        return Path("/dev/zero")
    fifo = tmp_path / "secret-fifo"
    os.mkfifo(fifo)
    return fifo


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("var", "extra", "key"), SECRET_FILES)
def test_a_secret_path_that_is_not_a_regular_file_is_refused_at_once(
    not_a_file: Path, var: str, extra: dict[str, str], key: str
) -> None:
    assert refusal({var: str(not_a_file), **extra}) == (
        f"{var}: cannot read the secret file: not a regular file (a pipe, a device or a directory)"
    )


@pytest.mark.timeout(10)
def test_a_sasl_password_file_re_read_over_64_kib_keeps_the_password_of_the_start(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "password"
    secret.write_text(SASL_PASSWORD + "\n", encoding="utf-8")
    clean_env.setenv("RFP_KAFKA__SASL_PASSWORD_FILE", str(secret))
    cfg = load_settings(None, env={**os.environ, **SASL}).kafka
    secret.write_text("rotated-password\n", encoding="utf-8")
    assert sasl_password(cfg) == "rotated-password"
    secret.write_bytes(b"k" * (64 * 1024 + 1))
    assert sasl_password(cfg) == SASL_PASSWORD
    clean_env.setenv("RFP_KAFKA__SASL_PASSWORD_FILE", "/dev/zero")
    assert sasl_password(cfg) == SASL_PASSWORD


@pytest.mark.timeout(10)
def test_a_sasl_password_file_replaced_by_a_pipe_keeps_the_password_without_waiting(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, not_a_file: Path
) -> None:
    """Read again each time clients are made, in the event loop: a pipe there would stop
    the whole service until someone wrote to it."""
    secret = tmp_path / "password"
    secret.write_text(SASL_PASSWORD + "\n", encoding="utf-8")
    clean_env.setenv("RFP_KAFKA__SASL_PASSWORD_FILE", str(secret))
    cfg = load_settings(None, env={**os.environ, **SASL}).kafka
    clean_env.setenv("RFP_KAFKA__SASL_PASSWORD_FILE", str(not_a_file))
    assert sasl_password(cfg) == SASL_PASSWORD


def test_check_config_with_a_secret_file_that_is_not_utf8_exits_2_with_one_line(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "api-key"
    secret.write_bytes(b"rf_live_\xe9\xff")
    clean_env.setenv("RIGHTFOOT_API_KEY_FILE", str(secret))
    assert main(["check-config"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert "RIGHTFOOT_API_KEY_FILE" in err
    assert "rf_live_" not in err


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"instance_id: r\xe9plica\n")  # Latin-1
    with pytest.raises(ConfigError, match=r"^config file .*: not UTF-8 text") as info:
        load_settings(path, env={})
    assert "\n" not in str(info.value)


# --- an empty variable counts as unset ------------------------------------------------------


def test_an_empty_rfp_api_key_does_not_hide_rightfoot_api_key() -> None:
    s = load_settings(None, env={"RFP_RIGHTFOOT__API_KEY": "", "RIGHTFOOT_API_KEY": API_KEY})
    assert s.rightfoot.api_key is not None
    assert s.rightfoot.api_key.get_secret_value() == API_KEY


def test_empty_api_key_variables_do_not_hide_the_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(API_KEY + "\n", encoding="utf-8")
    env = {
        "RFP_RIGHTFOOT__API_KEY": "",
        "RIGHTFOOT_API_KEY": "",
        "RIGHTFOOT_API_KEY_FILE": str(key_file),
    }
    s = load_settings(None, env=env)
    assert s.rightfoot.api_key is not None
    assert s.rightfoot.api_key.get_secret_value() == API_KEY


@pytest.mark.parametrize(
    ("var", "file_var", "extra", "section", "key"),
    [
        (
            "RFP_KAFKA__SASL_PASSWORD",
            "RFP_KAFKA__SASL_PASSWORD_FILE",
            SASL,
            "kafka",
            "sasl_password",
        ),
        (
            "RFP_SCHEMA_REGISTRY__PASSWORD",
            "RFP_SCHEMA_REGISTRY__PASSWORD_FILE",
            REGISTRY,
            "schema_registry",
            "password",
        ),
    ],
)
def test_an_empty_password_variable_does_not_hide_the_password_file(
    tmp_path: Path, var: str, file_var: str, extra: dict[str, str], section: str, key: str
) -> None:
    pw_file = tmp_path / "password"
    pw_file.write_text(SASL_PASSWORD + "\n", encoding="utf-8")
    s = load_settings(None, env={var: "", file_var: str(pw_file), **extra})
    value = getattr(getattr(s, section), key)
    assert value is not None
    assert value.get_secret_value() == SASL_PASSWORD


def test_an_empty_admin_token_leaves_the_admin_api_disabled() -> None:
    s = load_settings(None, env={"RFP_HTTP__ADMIN_TOKEN": ""})
    assert s.http.admin_token is None
    assert s.masked()["http"]["admin_token"] is None


# --- the admin token from a mounted file -------------------------------------------------


def test_the_admin_token_from_a_file_is_read_trimmed_and_masked(tmp_path: Path) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n", encoding="utf-8")
    env = {"RFP_HTTP__ADMIN_TOKEN_FILE": str(token_file)}
    s = load_settings(None, env=env)
    assert s.http.admin_token is not None
    assert s.http.admin_token.get_secret_value() == ADMIN_TOKEN
    assert s.masked()["http"]["admin_token"] == "********"
    assert ADMIN_TOKEN in s.secrets()
    # The variable wins over the file, and an empty one does not hide it.
    s = load_settings(None, env={**env, "RFP_HTTP__ADMIN_TOKEN": "other-token"})
    assert s.http.admin_token is not None
    assert s.http.admin_token.get_secret_value() == "other-token"
    s = load_settings(None, env={**env, "RFP_HTTP__ADMIN_TOKEN": ""})
    assert s.http.admin_token is not None
    assert s.http.admin_token.get_secret_value() == ADMIN_TOKEN


def test_an_empty_admin_token_file_leaves_the_admin_api_disabled(tmp_path: Path) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text(" \n", encoding="utf-8")
    s = load_settings(None, env={"RFP_HTTP__ADMIN_TOKEN_FILE": str(token_file)})
    assert s.http.admin_token is None


def test_a_missing_admin_token_file_is_refused_naming_the_variable(tmp_path: Path) -> None:
    message = refusal({"RFP_HTTP__ADMIN_TOKEN_FILE": str(tmp_path / "missing")})
    assert message.startswith("RFP_HTTP__ADMIN_TOKEN_FILE: cannot read the secret file")


@pytest.mark.parametrize(
    ("var", "key"),
    [
        ("RFP_HTTP__NOPE_FILE", "http.nope_file"),
        ("RFP_NOPE_FILE", "nope_file"),
        # The API key's file variable is RIGHTFOOT_API_KEY_FILE: this name is a mistake.
        ("RFP_RIGHTFOOT__API_KEY_FILE", "rightfoot.api_key_file"),
    ],
)
def test_an_unknown_rfp_file_variable_is_refused_as_an_unknown_key(
    tmp_path: Path, var: str, key: str
) -> None:
    """Refused as any RFP_ variable that names no key is (RFP_HTTP__NOPE is
    ``http.nope: unknown key``), never ignored."""
    secret = tmp_path / "secret"
    secret.write_text(ADMIN_TOKEN + "\n", encoding="utf-8")
    assert refusal({var: str(secret)}) == f"{key}: unknown key"


# --- whitespace around a secret is removed; what an HTTP header cannot carry is refused ----


@pytest.mark.parametrize("around", ["\n", "\r\n", " ", "\t", "  \n\n"])
@pytest.mark.parametrize(
    ("var", "extra", "section", "key"),
    [
        ("RIGHTFOOT_API_KEY", {}, "rightfoot", "api_key"),
        ("RFP_RIGHTFOOT__API_KEY", {}, "rightfoot", "api_key"),
        ("RFP_HTTP__ADMIN_TOKEN", {}, "http", "admin_token"),
        ("RFP_KAFKA__SASL_PASSWORD", SASL, "kafka", "sasl_password"),
        ("RFP_SCHEMA_REGISTRY__PASSWORD", REGISTRY, "schema_registry", "password"),
    ],
)
def test_whitespace_around_a_secret_from_the_environment_is_removed(
    var: str, extra: dict[str, str], section: str, key: str, around: str
) -> None:
    # A Secret set with `echo token | kubectl create secret ...` ends with a newline.
    s = load_settings(None, env={var: ADMIN_TOKEN + around, **extra})
    value = getattr(getattr(s, section), key)
    assert value is not None
    assert value.get_secret_value() == ADMIN_TOKEN
    assert ADMIN_TOKEN in s.secrets()


@pytest.mark.parametrize("around", ["", "\n", " "])
def test_a_whitespace_only_secret_counts_as_unset(around: str) -> None:
    env = {"RFP_RIGHTFOOT__API_KEY": " \n" + around, "RIGHTFOOT_API_KEY": API_KEY}
    s = load_settings(None, env={**env, "RFP_HTTP__ADMIN_TOKEN": "\n" + around})
    assert s.rightfoot.api_key is not None
    assert s.rightfoot.api_key.get_secret_value() == API_KEY
    assert s.http.admin_token is None


@pytest.mark.parametrize("inside", ["\n", "\r", " ", "\t", "\x00", "\x7f", "\u00a0", "\u200b"])
@pytest.mark.parametrize(
    ("var", "key"),
    [
        ("RIGHTFOOT_API_KEY", "rightfoot.api_key"),
        ("RFP_RIGHTFOOT__API_KEY", "rightfoot.api_key"),
        ("RFP_HTTP__ADMIN_TOKEN", "http.admin_token"),
    ],
)
def test_a_bearer_token_with_whitespace_or_a_control_character_inside_is_refused(
    var: str, key: str, inside: str
) -> None:
    secret = f"{API_KEY[:16]}{inside}{API_KEY[16:]}"
    message = refusal({var: secret + "\n"})
    assert message.startswith(f"{key}: ")
    assert var in message
    assert "header" in message
    assert API_KEY[:16] not in message and API_KEY[16:] not in message


@pytest.mark.parametrize(
    ("var", "extra", "key"),
    [
        ("RFP_KAFKA__SASL_PASSWORD", SASL, "kafka.sasl_password"),
        ("RFP_SCHEMA_REGISTRY__PASSWORD", REGISTRY, "schema_registry.password"),
    ],
)
def test_a_password_may_hold_spaces_but_no_control_character(
    var: str, extra: dict[str, str], key: str
) -> None:
    s = load_settings(None, env={var: "correct horse battery\n", **extra})
    assert "correct horse battery" in s.secrets()
    message = refusal({var: "correct\x00horse\n", **extra})
    assert message.startswith(f"{key}: contains a control")
    assert var in message
    assert "correct" not in message and "horse" not in message


@pytest.mark.parametrize(
    ("var", "extra", "key"),
    [
        ("RIGHTFOOT_API_KEY_FILE", {}, "rightfoot.api_key"),
        ("RFP_HTTP__ADMIN_TOKEN_FILE", {}, "http.admin_token"),
        ("RFP_KAFKA__SASL_PASSWORD_FILE", SASL, "kafka.sasl_password"),
        ("RFP_SCHEMA_REGISTRY__PASSWORD_FILE", REGISTRY, "schema_registry.password"),
    ],
)
def test_a_secret_file_of_two_lines_is_refused_naming_the_file_variable(
    tmp_path: Path, var: str, extra: dict[str, str], key: str
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("first-line-secret\nsecond-line-secret\n", encoding="utf-8")
    message = refusal({var: str(secret), **extra})
    assert message.startswith(f"{key}: ")
    assert var in message
    assert "first-line-secret" not in message and "second-line-secret" not in message


def test_check_config_refuses_a_bad_admin_token_in_one_line_without_it(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("RFP_HTTP__ADMIN_TOKEN", f"{ADMIN_TOKEN}\r\n{ADMIN_TOKEN}")
    assert main(["check-config"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert "http.admin_token" in err and "RFP_HTTP__ADMIN_TOKEN" in err
    assert ADMIN_TOKEN not in err


# --- instance_id goes in the User-Agent header ----------------------------------------------


def test_whitespace_around_instance_id_is_removed(clean_env: pytest.MonkeyPatch) -> None:
    assert load_settings(None, env={"RFP_INSTANCE_ID": "replica-a\n"}).instance_id == "replica-a"
    clean_env.setenv("POD_NAME", "rightfoot-poller-7c9f-abcde\n")
    assert load_settings(None, env={}).instance_id == "rightfoot-poller-7c9f-abcde"


def test_a_blank_pod_name_falls_back_to_host_and_pid(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("POD_NAME", " \n")
    assert load_settings(None, env={}).instance_id.endswith(f"-{os.getpid()}")


@pytest.mark.parametrize("bad", ["replica\na", "replica\ta", "replica\x1b[31m", "replica\u2028a"])
def test_instance_id_with_a_control_character_is_refused(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, bad: str
) -> None:
    message = refusal({"RFP_INSTANCE_ID": bad})
    assert message.startswith("instance_id: ") and "User-Agent" in message
    config = tmp_path / "config.yaml"
    config.write_text(f"instance_id: {bad!r}\n".replace("'", '"'), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^instance_id: .*User-Agent"):
        load_settings(config, env={})
    clean_env.setenv("POD_NAME", bad)  # the default is checked too
    assert refusal({}).startswith("instance_id: ")


def test_instance_id_may_hold_spaces_and_letters_beyond_ascii() -> None:
    assert load_settings(None, env={"RFP_INSTANCE_ID": "réplica a"}).instance_id == "réplica a"


# --- run and check-config need the API key; track and simulate do not ------------------


@pytest.fixture
def commands(clean_env: pytest.MonkeyPatch) -> list[str]:
    """The commands that got past their configuration: what each then does is faked."""
    reached: list[str] = []

    def fake(command: str) -> Any:
        async def done(*_: object) -> int:
            reached.append(command)
            return 0

        return done

    clean_env.setattr("service.app.run_service", fake("run"))
    clean_env.setattr("service.intake.send_requests", fake("track"))
    clean_env.setattr("rightfoot_simulator.simulate_main", fake("simulate"))
    # No process-wide change from the commands that do get there.
    clean_env.setattr("service.cli.configure_logging", lambda **_: None)
    clean_env.setattr("service.runtime.tune_gc", lambda: None)
    return reached


NO_KEY = (
    "rightfoot-poller: invalid configuration: rightfoot.api_key: no API key: set "
    "RIGHTFOOT_API_KEY, RFP_RIGHTFOOT__API_KEY or RIGHTFOOT_API_KEY_FILE\n"
)


@pytest.mark.parametrize(
    "env",
    [{}, {"RIGHTFOOT_API_KEY": "", "RFP_RIGHTFOOT__API_KEY": " ", "RIGHTFOOT_API_KEY_FILE": ""}],
    ids=["unset", "empty"],
)
@pytest.mark.parametrize("command", ["run", "check-config"])
def test_run_and_check_config_refuse_to_go_on_without_an_api_key(
    commands: list[str],
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
    env: dict[str, str],
) -> None:
    """Before, check-config showed api_key: null and exited 0, and run started and got a
    401 for every request."""
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert main([command]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", NO_KEY)
    assert commands == []


@pytest.mark.parametrize("source", ["RIGHTFOOT_API_KEY", "RFP_RIGHTFOOT__API_KEY", "file"])
def test_run_and_check_config_go_on_with_an_api_key_from_each_source(
    commands: list[str],
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    source: str,
) -> None:
    if source == "file":
        key_file = tmp_path / "api-key"
        key_file.write_text(API_KEY + "\n", encoding="utf-8")
        clean_env.setenv("RIGHTFOOT_API_KEY_FILE", str(key_file))
    else:
        clean_env.setenv(source, API_KEY)
    assert main(["run"]) == 0
    assert commands == ["run"]
    assert main(["check-config"]) == 0
    out, err = capsys.readouterr()
    assert "api_key: '********'" in out and API_KEY not in out + err


def test_track_and_simulate_need_no_api_key(
    commands: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """track talks to Kafka (or the running service), simulate is the fake vendor."""
    assert main(["track", "5d3c6bbb-fc1a-46a4-93da-1ce4a54b0d83"]) == 0
    assert main(["simulate", "--port", "0", "--no-demo"]) == 0
    assert commands == ["track", "simulate"]
    assert "API key" not in capsys.readouterr().err


def test_a_config_error_is_said_before_a_missing_api_key(
    commands: list[str], clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("RFP_KAFKA__DELIVERY", "twice")
    assert main(["run"]) == 2
    assert "kafka.delivery" in capsys.readouterr().err
