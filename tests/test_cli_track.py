"""``rightfoot-poller track``: a bad argument is one line naming it and its rule, exit 2."""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytest

import service.intake
from service.cli import BATCH_ID_RULE, main
from service.config import Settings
from service.requests import BATCH_ID_PATTERN, TrackingRequest

RULE = "1-128 characters of A-Z a-z 0-9 . _ : -"


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[TrackingRequest]:
    """What ``track`` hands to Kafka, without a broker."""
    for name in list(os.environ):
        if name.startswith(("RFP_", "RIGHTFOOT_")):
            monkeypatch.delenv(name)
    got: list[TrackingRequest] = []

    async def send_requests(_settings: Settings, reqs: Sequence[TrackingRequest]) -> None:
        got.extend(reqs)

    monkeypatch.setattr(service.intake, "send_requests", send_requests)
    return got


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1, err
    assert "validation error" not in err
    return err.strip()


def test_valid_arguments_are_sent(
    sent: list[TrackingRequest], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["track", "b-1", "b:2", "--expected-count", "14"]) == 0
    assert sent == [
        TrackingRequest(batch_id="b-1", expected_count=14),
        TrackingRequest(batch_id="b:2", expected_count=14),
    ]
    assert "tracking requested: b-1" in capsys.readouterr().out


@pytest.mark.parametrize("batch_id", ["bad id", "", "b/1", "x" * 129, "b\n1"])
def test_a_bad_batch_id_names_the_argument_and_the_rule(
    sent: list[TrackingRequest], capsys: pytest.CaptureFixture[str], batch_id: str
) -> None:
    assert main(["track", "good-1", batch_id]) == 2
    err = one_line(capsys)
    assert err.startswith(f"rightfoot-poller track: BATCH_ID {batch_id[:64]!r}")
    assert err.endswith(f": {RULE}")
    assert sent == []  # nothing sent, not even the good one


def test_a_long_bad_batch_id_is_cut(
    sent: list[TrackingRequest], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["track", "y" * 5000]) == 2
    err = one_line(capsys)
    assert "y" * 64 in err and "y" * 65 not in err


@pytest.mark.parametrize("count", ["0", "-1", "100000001"])
def test_a_bad_expected_count_names_the_option_and_the_range(
    sent: list[TrackingRequest], capsys: pytest.CaptureFixture[str], count: str
) -> None:
    assert main(["track", "b-1", "--expected-count", count]) == 2
    err = one_line(capsys)
    assert (
        err == f"rightfoot-poller track: --expected-count {count}: an integer from 1 to 100000000"
    )
    assert sent == []


def test_arguments_are_checked_before_the_configuration(
    sent: list[TrackingRequest],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RFP_HTTP__PORT", "not-a-port")
    assert main(["track", "bad id"]) == 2
    assert "BATCH_ID 'bad id'" in one_line(capsys)


def test_the_rule_stated_is_the_pattern_checked() -> None:
    # If the pattern changes, so must BATCH_ID_RULE in service/cli.py.
    assert BATCH_ID_PATTERN == r"^[A-Za-z0-9._:-]{1,128}$"
    assert BATCH_ID_RULE == RULE
