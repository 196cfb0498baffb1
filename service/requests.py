"""Tracking requests: the one format shared by the requests topic, the HTTP API and the CLI."""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from service.errors import RequestRejected

BATCH_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
_BATCH_ID = re.compile(BATCH_ID_PATTERN)
# The largest request value read. A real one is under 300 bytes; a larger one is refused
# before it is parsed, so that nothing a request makes (its forward to its batch's
# partition included) comes near the producer's 1 MiB limit.
MAX_REQUEST_BYTES = 64 * 1024
# The header of a request that a replica forwarded to its batch's partition: whoever owns
# that partition takes it there, and never forwards it again.
FORWARDED_HEADER = ("rightfoot-poller-forwarded", b"1")


def is_forwarded(headers: object) -> bool:
    """Whether a requests-topic message's headers (aiokafka's: pairs) mark it forwarded."""
    return isinstance(headers, list | tuple) and FORWARDED_HEADER in headers


class TrackingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_id: str = Field(pattern=BATCH_ID_PATTERN)
    expected_count: StrictInt | None = Field(default=None, ge=1, le=100_000_000)
    action: Literal["track", "stop"] = "track"

    def encode(self) -> bytes:
        return json.dumps(self.model_dump(exclude_none=True), separators=(",", ":")).encode()


def decode_request(value: bytes | None, key: bytes | None = None) -> TrackingRequest:
    """Raise RequestRejected with a reason a person can act on.

    ``key``: the Kafka message's key, which must be the batch ID when there is one.
    """
    if value is None:
        raise RequestRejected("empty message value")
    if len(value) > MAX_REQUEST_BYTES:
        raise RequestRejected(f"too large: {len(value)} bytes (at most {MAX_REQUEST_BYTES})")
    try:
        req = TrackingRequest.model_validate_json(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        msg = err["msg"]
        if err["type"] == "json_invalid":
            raise RequestRejected(f"not valid JSON: {msg}") from None
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        raise RequestRejected(f"{where}: {msg}") from None
    if key is not None and key != req.batch_id.encode():
        shown = key[:140].decode("utf-8", "replace")
        raise RequestRejected(f"batch_id: must equal the message key, which is {shown!r}")
    return req


def reject_reason(exc: RequestRejected) -> str:
    """A bounded label for metrics."""
    text = str(exc)
    if text.startswith("not valid JSON"):
        return "invalid_json"
    if text.startswith("empty"):
        return "empty"
    if text.startswith("too large"):
        return "too_large"
    return "invalid_field"


def readable_batch_id(value: bytes | None, key: bytes | None = None) -> str | None:
    """The batch a refused tracking request is about, for its log line, when it can be
    read: the ``batch_id`` of its JSON body if that is a valid batch ID, else its Kafka key
    if that is one; None otherwise."""
    candidates: list[object] = []
    if value is not None and len(value) <= MAX_REQUEST_BYTES:
        try:
            doc = json.loads(value)
        except (ValueError, RecursionError):
            doc = None
        if isinstance(doc, dict):
            candidates.append(doc.get("batch_id"))
    if key is not None:
        candidates.append(key.decode("utf-8", "replace"))
    for candidate in candidates:
        if isinstance(candidate, str) and _BATCH_ID.fullmatch(candidate):
            return candidate
    return None
