"""Secrets are redacted from log lines in every form a line may show them: escaped by
``repr()`` (backslashes doubled, quotes escaped), read again after a rotation, or made into
an HTTP basic-auth header."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from test_logs import logs_into

from service.api import ApiKey
from service.config import KafkaConfig, SchemaRegistryConfig
from service.kafka_clients import sasl_password
from service.logs import REDACTED, redact, secret_forms
from service.registry import RegistryClient, basic_credentials

# A password with a backslash and both quotes: repr() escapes each of them.
ODD = "p4ss\\w0rd'with\"quotes"
SINGLE = "p4ss\\w0rd'single"
BACKSLASH = "p4ss\\w0rd\\x"
PLAIN = "rf_live_0a1b2c3d4e5f6a7b8c9d"


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    """Logging into a buffer, with the secrets above (``test_logs.logs_into``)."""
    with logs_into("poller-r", [ODD, SINGLE, BACKSLASH, PLAIN]) as stream:
        yield stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def shows(text: str, secret: str) -> list[str]:
    """The forms of ``secret`` that ``text`` shows."""
    return [form for form in secret_forms(secret) if form in text]


@pytest.mark.parametrize("secret", [ODD, SINGLE, BACKSLASH])
@pytest.mark.parametrize("template", ["login failed for {}", 'login "failed" for {}'])
def test_the_repr_of_an_exception_with_a_backslash_secret_is_redacted(
    output: io.StringIO, secret: str, template: str
) -> None:
    """repr() doubles the backslash; it escapes a ' when it quotes with ' (a message with
    a " in it), not when it quotes with "."""
    exc = ValueError(template.format(secret))
    structlog.get_logger("t").warning("x", error=repr(exc))
    structlog.get_logger("t").warning("y", error=exc)  # repr'd by the redactor
    structlog.get_logger("t").warning("z", error=repr(repr(exc)))
    logging.getLogger("lib").warning("failed: %r", exc)
    text = output.getvalue()
    assert "w0rd" not in text
    docs = lines(output)
    assert len(docs) == 4
    for doc in docs:
        assert REDACTED in doc.get("error", doc["event"]), doc


def test_forms_of_a_secret_without_special_characters_are_the_secret() -> None:
    assert secret_forms(PLAIN) == {PLAIN}


def test_redact_of_error_text_covers_the_repr_form_too() -> None:
    text = f"cannot connect: {OSError(f'refused {ODD}')!r}"
    assert ODD not in redact(text, [ODD]) and "w0rd" not in redact(text, [ODD])


def test_a_rotated_api_key_read_from_its_file_is_redacted(
    output: io.StringIO, tmp_path: Path
) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(PLAIN + "\n")
    api_key = ApiKey(PLAIN, key_file)
    rotated = "rf_live_rotated_9f8e7d6c5b4a"
    key_file.write_text(rotated + "\n")
    api_key.refresh()
    assert api_key.get() == rotated
    structlog.get_logger("t").warning("echoed", error=f"Bearer {rotated} refused")
    logging.getLogger("aiohttp.client").warning("header Bearer %s", rotated)
    assert rotated not in output.getvalue()
    assert [d["error" if "error" in d else "event"] for d in lines(output)] == [
        f"Bearer {REDACTED} refused",
        f"header Bearer {REDACTED}",
    ]


def test_a_rotated_sasl_password_read_from_its_file_is_redacted(
    output: io.StringIO, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    password_file = tmp_path / "sasl-password"
    password_file.write_text("sasl-at-start-0a9b8c7d\n")
    rotated = "sasl-rotated-\\-5e4d3c2b1a"
    monkeypatch.delenv("RFP_KAFKA__SASL_PASSWORD", raising=False)
    monkeypatch.setenv("RFP_KAFKA__SASL_PASSWORD_FILE", str(password_file))
    cfg = KafkaConfig(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username="poller",
        sasl_password="sasl-at-start-0a9b8c7d",
    )
    password_file.write_text(rotated + "\n")  # the Secret rotated
    assert sasl_password(cfg) == rotated
    structlog.get_logger("t").warning("auth", error=repr(RuntimeError(f"bad {rotated}")))
    text = output.getvalue()
    assert shows(text, rotated) == []
    assert REDACTED in lines(output)[0]["error"]


async def test_the_registrys_basic_auth_credentials_are_redacted(output: io.StringIO) -> None:
    password = "registry-pass-1234"
    credentials = basic_credentials("poller", password)
    cfg = SchemaRegistryConfig(url="http://127.0.0.1:1", username="poller", password=password)
    async with RegistryClient(cfg) as client:
        assert client.credentials() == credentials
    structlog.get_logger("t").warning("request", headers={"Authorization": f"Basic {credentials}"})
    logging.getLogger("aiohttp.client").warning("Authorization: Basic %s", credentials)
    assert credentials not in output.getvalue()
    docs = lines(output)
    assert docs[0]["headers"] == {"Authorization": f"Basic {REDACTED}"}
    assert docs[1]["event"] == f"Authorization: Basic {REDACTED}"
