"""The TLS files of Kafka and of the schema registry, checked when the configuration loads.

Accepted before whatever they held (a missing file, ``/etc/passwd``): ``check-config``
exited 0 and ``run`` retried the brokers forever (``kafka_unavailable``, /readyz red).
Each refusal is one line naming the key.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from certs import CertificateAuthority, Issued
from cryptography.hazmat.primitives import serialization

from service.cli import main
from service.config import load_settings, tls_files_problem
from service.errors import ConfigError

SECTIONS = {"kafka": "RFP_KAFKA__", "schema_registry": "RFP_SCHEMA_REGISTRY__"}


@dataclass(frozen=True)
class Tls:
    ca: CertificateAuthority
    client: Issued
    other: Issued  # another client certificate of the same CA
    directory: Path

    def file(self, name: str, content: bytes) -> Path:
        path = self.directory / name
        path.write_bytes(content)
        return path


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tls]:
    directory = tmp_path_factory.mktemp("tls")
    ca = CertificateAuthority(directory / "ca")
    yield Tls(ca, ca.issue("client", server=False), ca.issue("other", server=False), directory)


def env_of(section: str, **files: Path | str) -> dict[str, str]:
    return {SECTIONS[section] + key.upper(): str(path) for key, path in files.items()}


def refusal(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(None, env=env)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("section", SECTIONS)
def test_files_that_load_are_accepted(section: str, tls: Tls) -> None:
    env = env_of(
        section, ssl_cafile=tls.ca.cert, ssl_certfile=tls.client.cert, ssl_keyfile=tls.client.key
    )
    settings = load_settings(None, env=env)
    cfg = settings.kafka if section == "kafka" else settings.schema_registry
    assert (cfg.ssl_cafile, cfg.ssl_certfile, cfg.ssl_keyfile) == (
        tls.ca.cert,
        tls.client.cert,
        tls.client.key,
    )
    assert load_settings(None, env=env_of(section, ssl_cafile=tls.ca.cert))


def test_a_certificate_and_its_key_in_one_file_are_accepted(tls: Tls) -> None:
    both = tls.file("both.pem", tls.client.cert.read_bytes() + tls.client.key.read_bytes())
    assert load_settings(None, env=env_of("kafka", ssl_certfile=both, ssl_keyfile=both))


@pytest.mark.parametrize("section", SECTIONS)
@pytest.mark.parametrize("key", ["ssl_cafile", "ssl_certfile", "ssl_keyfile"])
def test_a_missing_file_is_refused_naming_the_key(section: str, key: str, tls: Tls) -> None:
    files: dict[str, Path | str] = {
        "ssl_cafile": tls.ca.cert,
        "ssl_certfile": tls.client.cert,
        "ssl_keyfile": tls.client.key,
    }
    files[key] = tls.directory / "missing.pem"
    message = refusal(env_of(section, **files))
    assert message == (
        f"{section}.{key}: cannot read {tls.directory / 'missing.pem'}: No such file or directory"
    )


@pytest.mark.parametrize("section", SECTIONS)
def test_a_directory_or_a_pipe_is_refused_at_once(section: str, tls: Tls) -> None:
    assert refusal(env_of(section, ssl_cafile=tls.directory)) == (
        f"{section}.ssl_cafile: {tls.directory} is not a regular file"
    )
    fifo = tls.directory / f"{section}.fifo"
    os.mkfifo(fifo)
    try:  # opened, it would block until someone writes to it
        message = refusal(env_of(section, ssl_certfile=fifo, ssl_keyfile=tls.client.key))
    finally:
        fifo.unlink()
    assert message == f"{section}.ssl_certfile: {fifo} is not a regular file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_refused(tls: Tls) -> None:
    path = tls.file("unreadable.key", b"x")
    path.chmod(0)
    message = refusal(env_of("kafka", ssl_certfile=tls.client.cert, ssl_keyfile=path))
    assert message.startswith("kafka.ssl_keyfile: cannot read ") and "Permission" in message


@pytest.mark.parametrize("section", SECTIONS)
@pytest.mark.parametrize(
    "make",
    [
        lambda t: t.file("passwd", b"root:x:0:0:root:/root:/bin/bash\n"),
        lambda t: t.file("empty.pem", b""),
        lambda t: t.client.key,
    ],
    ids=["text", "empty", "a-key"],
)
def test_a_ca_file_without_certificates_is_refused(
    section: str, tls: Tls, make: Callable[[Tls], Path]
) -> None:
    path = make(tls)
    assert refusal(env_of(section, ssl_cafile=path)) == (
        f"{section}.ssl_cafile: {path} is not a PEM certificate bundle (no certificate found)"
    )


@pytest.mark.parametrize("section", SECTIONS)
def test_a_certificate_without_its_key_or_a_key_alone_is_refused(section: str, tls: Tls) -> None:
    message = refusal(env_of(section, ssl_certfile=tls.client.cert))
    assert message.startswith(f"{section}") and "ssl_keyfile" in message
    message = refusal(env_of(section, ssl_keyfile=tls.client.key))
    assert message.startswith(f"{section}") and "ssl_certfile" in message


def test_kafka_certificate_and_key_go_together(tls: Tls) -> None:
    """In Kafka's own words (the registry's section says it first, in its own)."""
    assert refusal(env_of("kafka", ssl_certfile=tls.client.cert)) == (
        "kafka.ssl_keyfile: required with ssl_certfile (the client certificate's key)"
    )
    assert refusal(env_of("kafka", ssl_keyfile=tls.client.key)) == (
        "kafka.ssl_certfile: required with ssl_keyfile (the client certificate)"
    )
    # Files are looked at first: a missing one is named as such.
    missing = tls.directory / "missing.crt"
    assert tls_files_problem("kafka", None, missing, None) == (
        f"kafka.ssl_certfile: cannot read {missing}: No such file or directory"
    )


@pytest.mark.parametrize("section", SECTIONS)
def test_a_pair_that_does_not_load_together_is_refused_naming_the_key(
    section: str, tls: Tls
) -> None:
    c, k = tls.client, tls.other
    cases = [
        (
            c.cert,
            k.key,
            "ssl_keyfile",
            f"{k.key} is not the key of the certificate in ssl_certfile",
        ),
        (c.key, c.cert, "ssl_certfile", f"{c.key} is not a PEM certificate (no certificate found)"),
        (c.cert, c.cert, "ssl_keyfile", f"{c.cert} is not a PEM private key"),
    ]
    for cert, key, named, problem in cases:
        message = refusal(env_of(section, ssl_certfile=cert, ssl_keyfile=key))
        assert message == f"{section}.{named}: {problem}"


@pytest.mark.parametrize("section", SECTIONS)
def test_an_encrypted_key_is_refused_without_asking_for_its_passphrase(
    section: str, tls: Tls
) -> None:
    """OpenSSL would prompt for it on a terminal, and the service has no passphrase."""
    key = serialization.load_pem_private_key(tls.client.key.read_bytes(), None)
    encrypted = tls.file(
        "encrypted.key",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        ),
    )
    message = refusal(env_of(section, ssl_certfile=tls.client.cert, ssl_keyfile=encrypted))
    assert message.startswith(f"{section}.ssl_keyfile: {encrypted} is encrypted with a passphrase")


@pytest.mark.parametrize("section", SECTIONS)
def test_the_files_are_checked_from_the_yaml_file_too(
    section: str, tls: Tls, tmp_path: Path
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"{section}:\n  ssl_cafile: {tls.client.key}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{section}\.ssl_cafile: .* is not a PEM certificate"):
        load_settings(path, env={})


@pytest.mark.parametrize("value", ["/nonexistent", "passwd"])
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_check_config_and_run_refuse_a_bad_kafka_ca_file(
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tls: Tls,
    command: str,
    value: str,
) -> None:
    """The audit's case: exit 0 before, then ERROR kafka_unavailable forever."""
    path = value if value.startswith("/") else str(tls.file(value, b"root:x:0:0::/root:/bin/sh\n"))

    def started(*_: object) -> int:
        raise AssertionError(f"{command} went on with ssl_cafile={path}")

    clean_env.setattr("service.app.run_service", started)
    clean_env.setenv("RIGHTFOOT_API_KEY", "rf_live_api_key_0123456789abcdef")
    clean_env.setenv("RFP_KAFKA__SECURITY_PROTOCOL", "SSL")
    clean_env.setenv("RFP_KAFKA__SSL_CAFILE", path)
    assert main([command, "--config", "config.yaml"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("rightfoot-poller: invalid configuration: kafka.ssl_cafile: ")
    assert err.count("\n") == 1
