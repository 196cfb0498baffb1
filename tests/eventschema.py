"""Checks consumed Kafka messages against the published event format (``schemas/``).

Used by the schema tests and by the end-to-end tests on every consumed event::

    value = validate_event("balance", msg.value)          # JSON Schema, strict by default
    validate_headers("balance", msg.headers, value)       # CloudEvents headers
    validate_key("balance", msg.key, value)                # Kafka key
    # or all three at once:
    value = validate_message("balance", msg.key, msg.value, msg.headers)

``strict=True`` (the default) checks what the service must emit: no field the schema does
not declare (the published schemas allow unknown fields, for consumers), JSON integers
only (no ``3000.0``), no duplicate JSON keys. ``strict=False`` is the consumer's view:
the published schema as it is. Both assert the ``date-time`` and ``uuid`` formats and
anchor ``pattern`` the ECMA-262 way (``$`` does not match before a trailing newline).

Every failure raises :class:`jsonschema.ValidationError` whose message names the kind,
the schema file, the JSON path and the rule. Validators are compiled once and cached.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from jsonschema import Draft202012Validator, FormatChecker, ValidationError, validators
from jsonschema.exceptions import best_match

Kind = Literal["balance", "batch", "dlq", "request"]

SCHEMA_DIR: Final = Path(__file__).resolve().parent.parent / "schemas"
SCHEMA_FILES: Final[dict[str, str]] = {
    "balance": "balance-event.schema.json",
    "batch": "batch-event.schema.json",
    "dlq": "dlq-event.schema.json",
    "request": "batch-request.schema.json",
}
CE_TYPES: Final[dict[str, str]] = {
    "balance": "com.rightfoot.balance.retrieved",
    "dlq": "com.rightfoot.balance.invalid",
}
BATCH_CE_TYPE_PREFIX: Final = "com.rightfoot.batch."
BATCH_CE_SOURCE: Final = "rightfoot-poller"
CE_HEADERS: Final = (
    "ce_specversion",
    "ce_id",
    "ce_type",
    "ce_source",
    "ce_time",
    "ce_subject",
    "content-type",
)

_RFC3339: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def parse_rfc3339(text: str) -> datetime:
    """Parses an RFC 3339 date-time (with offset); raises ValueError otherwise."""
    if not _RFC3339.fullmatch(text):
        raise ValueError(f"{text!r} is not an RFC 3339 date-time")
    return datetime.fromisoformat(text.upper())


FORMAT_CHECKER: Final = FormatChecker(formats=())


def _is_date_time(instance: object) -> bool:
    if isinstance(instance, str):
        parse_rfc3339(instance)
    return True


def _is_uuid(instance: object) -> bool:
    return not isinstance(instance, str) or str(uuid.UUID(instance)) == instance.lower()


FORMAT_CHECKER.checks("date-time", raises=ValueError)(_is_date_time)
FORMAT_CHECKER.checks("uuid", raises=ValueError)(_is_uuid)


@cache
def _regex(pattern: str) -> re.Pattern[str]:
    # ECMA-262 `$` (no multiline) matches only at the very end; Python's also before a "\n".
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


def ecma_pattern(
    validator: Any, pattern: str, instance: object, schema: Any
) -> Iterator[ValidationError]:
    """The `pattern` keyword with ECMA-262 semantics for `$` (use with validators.extend)."""
    if isinstance(instance, str) and not _regex(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _json_integer(checker: object, instance: object) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


# validators.extend has no annotations in jsonschema's stubs (types-jsonschema).
_Lenient = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator, validators={"pattern": ecma_pattern}
)
_Strict = validators.extend(  # type: ignore[no-untyped-call]
    _Lenient, type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _json_integer)
)


@cache
def load_schema(kind: Kind) -> dict[str, Any]:
    """The published schema for ``kind`` (do not mutate)."""
    if kind not in SCHEMA_FILES:
        raise ValueError(f"unknown event kind {kind!r}; expected one of {sorted(SCHEMA_FILES)}")
    schema: dict[str, Any] = json.loads((SCHEMA_DIR / SCHEMA_FILES[kind]).read_text("utf-8"))
    return schema


def _closed(node: Any) -> Any:
    """A copy of a schema where every `additionalProperties: true` object is closed."""
    if isinstance(node, list):
        return [_closed(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _closed(value) for key, value in node.items()}
    if "properties" in out and out.get("additionalProperties") is True:
        out["additionalProperties"] = False
    return out


@cache
def _validator(kind: Kind, strict: bool) -> Any:
    schema = load_schema(kind)
    if strict:
        return _Strict(_closed(schema), format_checker=FORMAT_CHECKER)
    return _Lenient(schema, format_checker=FORMAT_CHECKER)


def _fail(kind: str, what: str) -> ValidationError:
    return ValidationError(f"{kind} event ({SCHEMA_FILES.get(kind, '?')}): {what}")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode(kind: Kind, value: bytes | bytearray | memoryview, *, strict: bool = True) -> Any:
    """Decodes a message value as UTF-8 JSON, raising ValidationError on bad input."""
    try:
        text = bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(kind, f"value is not UTF-8: {exc}") from exc
    try:
        return json.loads(
            text,
            object_pairs_hook=_no_duplicate_keys if strict else None,
            parse_constant=_reject_constant,
        )
    except ValueError as exc:
        raise _fail(kind, f"value is not valid JSON: {exc}; value={text[:200]!r}") from exc


def validate_event(
    kind: Kind, value: bytes | bytearray | memoryview | dict[str, Any], *, strict: bool = True
) -> dict[str, Any]:
    """Validates one message value against the schema of ``kind``; returns it as a dict."""
    validator = _validator(kind, strict)
    doc = value if isinstance(value, dict) else decode(kind, value, strict=strict)
    if not isinstance(doc, dict):
        raise _fail(kind, f"value must be a JSON object, got {type(doc).__name__}: {doc!r}")
    errors = list(validator.iter_errors(doc))
    if not errors:
        return doc
    # A property's own rules (type, enum, pattern) explain more than the cross-field ones.
    error = best_match(e for e in errors if e.schema_path[0] != "allOf") or best_match(errors)
    rule = "/".join(str(part) for part in error.schema_path)
    cause = f" ({error.cause})" if error.cause else ""
    message = f"invalid at {error.json_path}: {error.message}{cause} (rule {rule})"
    if kind == "balance" and error.schema_path and error.schema_path[0] == "allOf":
        message += (
            f"; balance_status must name balance_status_code {doc.get('balance_status_code')!r}"
        )
    if strict and error.validator == "additionalProperties":
        message += (
            "; strict mode forbids fields the schema does not declare: add the field to "
            f"schemas/{SCHEMA_FILES[kind]} if it is intended, or pass strict=False"
        )
    others = [f"{e.json_path}: {e.message}" for e in errors if e is not error]
    if others:
        message += f"; {len(others)} more: " + "; ".join(others[:3])
    raise ValidationError(
        f"{kind} event ({SCHEMA_FILES[kind]}) {message}",
        validator=error.validator,
        path=error.path,
        schema_path=error.schema_path,
        instance=error.instance,
        schema=error.schema,
        validator_value=error.validator_value,
    ) from error


def _header_map(kind: str, headers: Iterable[tuple[str, bytes | None]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, raw in headers or ():
        if name in out:
            raise _fail(kind, f"header {name!r} appears more than once")
        if raw is None:
            raise _fail(kind, f"header {name!r} has no value")
        try:
            out[name] = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _fail(kind, f"header {name!r} is not UTF-8: {raw!r}") from exc
    return out


def _expect(kind: str, name: str, actual: str, expected: object) -> None:
    if actual != expected:
        raise _fail(kind, f"header {name} is {actual!r}, expected {expected!r}")


def _check_source(kind: str, source: str, expected: str | None) -> None:
    if expected is not None:
        _expect(kind, "ce_source", source, expected)
    elif kind == "batch":
        _expect(kind, "ce_source", source, BATCH_CE_SOURCE)
    elif kind == "balance":
        url = urlsplit(source)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise _fail(kind, f"header ce_source {source!r} is not the API's balances URL")
    elif not source or any(c.isspace() for c in source):
        raise _fail(kind, f"header ce_source {source!r} is not a URI-reference")


def _check_time(kind: str, ce_time: str, field: str, value: dict[str, Any]) -> None:
    try:
        header_time = parse_rfc3339(ce_time)
    except ValueError as exc:
        raise _fail(kind, f"header ce_time: {exc}") from exc
    try:
        field_time = parse_rfc3339(str(value.get(field)))
    except ValueError as exc:
        raise _fail(kind, f"field {field}: {exc}") from exc
    if header_time != field_time:
        raise _fail(kind, f"header ce_time {ce_time!r} is not the {field} {value.get(field)!r}")


def validate_headers(
    kind: Kind,
    headers: Iterable[tuple[str, bytes | None]],
    value: dict[str, Any],
    *,
    source: str | None = None,
) -> None:
    """Checks the CloudEvents 1.0 (Kafka binary mode) headers of an event.

    ``value`` is the decoded payload (from :func:`validate_event`). ``source``, when
    given, is the exact ``ce_source`` expected (e.g. the simulator's balances URL).
    Tracking requests need no headers; only a ``content-type`` they carry is checked.
    """
    found = _header_map(kind, headers)
    if kind == "request":
        if "content-type" in found:
            _expect(kind, "content-type", found["content-type"], "application/json")
        return
    if kind not in CE_TYPES and kind != "batch":
        raise ValueError(f"unknown event kind {kind!r}; expected one of {sorted(SCHEMA_FILES)}")
    missing = [name for name in CE_HEADERS if name not in found]
    if missing:
        raise _fail(kind, f"missing headers {missing}; present: {sorted(found)}")
    _expect(kind, "ce_specversion", found["ce_specversion"], "1.0")
    _expect(kind, "ce_id", found["ce_id"], value.get("event_id"))
    if kind == "batch":
        _expect(kind, "ce_type", found["ce_type"], BATCH_CE_TYPE_PREFIX + str(value.get("event")))
    else:
        _expect(kind, "ce_type", found["ce_type"], CE_TYPES[kind])
    _check_source(kind, found["ce_source"], source)
    _check_time(kind, found["ce_time"], "timestamp" if kind == "balance" else "at", value)
    _expect(kind, "ce_subject", found["ce_subject"], value.get("batch_id"))
    _expect(kind, "content-type", found["content-type"], "application/json")


def validate_key(kind: Kind, key: bytes | None, value: dict[str, Any]) -> None:
    """Checks the Kafka key: ``authorizer_unique_id`` for balance events, else ``batch_id``."""
    field = "authorizer_unique_id" if kind == "balance" else "batch_id"
    expected = str(value.get(field)).encode("utf-8")
    if key != expected:
        raise _fail(kind, f"key is {key!r}, expected the {field} {expected!r}")


def validate_message(
    kind: Kind,
    key: bytes | None,
    value: bytes | bytearray | memoryview,
    headers: Iterable[tuple[str, bytes | None]],
    *,
    strict: bool = True,
    source: str | None = None,
) -> dict[str, Any]:
    """validate_event + validate_key + validate_headers; returns the decoded value."""
    doc = validate_event(kind, value, strict=strict)
    validate_key(kind, key, doc)
    validate_headers(kind, headers, doc, source=source)
    return doc
