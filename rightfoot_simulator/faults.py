"""The faults the simulator can inject into the API endpoints.

:class:`Faults` holds what is injected (5xx, 429 with ``Retry-After``, latency, hangs,
malformed bodies, rejected page tokens, optionally only for one batch); it is set directly
on :attr:`Simulator.faults` or through ``POST /_sim/faults``, whose partial updates
:meth:`Faults.update` checks. :func:`_malformed_page` builds the broken 200 bodies
(``MALFORMED_KINDS``). Which request gets which fault is decided by the ``_take_*``
methods of :class:`~rightfoot_simulator.simulator.Simulator`, and how a fault is answered
by :mod:`rightfoot_simulator.api`.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from rightfoot_simulator.data import _page_json

MALFORMED_KINDS = ("truncated_json", "not_an_object", "balances_not_a_list", "wrong_types")


@dataclass
class Faults:
    """Faults injected into the API endpoints; change them at any time.

    Counters (``*_next``) go down by one each time their fault is served. Faults apply to
    ``/v1/balances`` and the export (not to ``/_sim/``); with ``only_batch`` set, only to
    requests for that batch. Checked before authentication, in this order: latency, hang,
    5xx, 429; then, for a request that would otherwise succeed, rejected page token, page
    token loop and malformed body.
    """

    #: The next N API requests answer 500, 502, 503 (cycling).
    error_5xx_next: int = 0
    #: API requests answer 5xx while the simulator clock is before this time.
    error_5xx_until: float = 0.0
    #: Probability (0..1) that an API request answers 5xx.
    error_5xx_rate: float = 0.0
    #: The next N API requests answer 429 with ``Retry-After``.
    rate_limit_next: int = 0
    #: The next N API requests answer 403 FORBIDDEN (a gateway that denies the key for a
    #: while, say: the export page documents a 403, the balances page none).
    forbidden_next: int = 0
    #: Probability (0..1) that an API request answers 429.
    rate_limit_rate: float = 0.0
    #: Seconds announced by ``Retry-After`` (rounded up to whole seconds).
    retry_after_s: float = 1.0
    #: Announce them as an HTTP date instead (``Sun, 06 Nov 1994 08:49:37 GMT``, by the
    #: wall clock), the other form RFC 9110 allows.
    retry_after_date: bool = False
    #: Compress pages (gzip or deflate, as the request's Accept-Encoding allows), as a
    #: vendor behind a CDN may.
    compress_pages: bool = False
    #: Delay added to every API request.
    latency_s: float = 0.0
    #: The next N API requests wait ``hang_s`` before answering.
    hang_next: int = 0
    hang_s: float = 60.0
    #: The next N answers that would be a 200 page carry a broken body (see MALFORMED_KINDS).
    malformed_next: int = 0
    #: The next N requests that carry a ``nextPageToken`` answer 400 INVALID_PAGE_TOKEN.
    reject_token_next: int = 0
    #: A rejected or expired page token is answered 404 NOT_FOUND, as a vendor that looks
    #: the page up and finds none might, instead of 400 INVALID_PAGE_TOKEN (the pages
    #: document only the batch's 404).
    reject_token_with_404: bool = False
    #: ... or answered 500 INTERNAL_SERVER_ERROR, every time, as a vendor might that can no
    #: longer open an old token (sealed with a key it has since retired, say).
    reject_token_with_500: bool = False
    #: The next N answers that would be a 200 page say ``has_more: true`` and hand back,
    #: as ``next_page_token``, the token they were asked with (for the first page, one
    #: token naming it, the same each time): a client that follows it reads the same
    #: page for ever.
    token_loop_next: int = 0
    #: The next N requests that carry a ``nextPageToken`` are answered as if they carried
    #: none: the first page, with a new token each time (as an API would that reads the
    #: parameter under another name: the vendor's Python sample spells it
    #: ``next_page_token``). A client that follows it reads the first page for ever.
    ignore_token_next: int = 0
    #: Restrict all faults to requests for this batch ID.
    only_batch: str | None = None

    def update(self, changes: Mapping[str, object]) -> None:
        """Apply a partial update, checking names and types; ValueError when invalid."""
        hints = typing.get_type_hints(Faults)
        checked = {
            name: _check_fault_value(name, hints.get(name), v) for name, v in changes.items()
        }
        for name, value in checked.items():
            setattr(self, name, value)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _check_fault_value(name: str, hint: object, value: object) -> object:
    if hint is None:
        known = ", ".join(f.name for f in fields(Faults))
        raise ValueError(f"unknown fault {name!r}; known: {known}")
    if hint == str | None:
        if value is None or isinstance(value, str):
            return value
        raise ValueError(f"{name} must be a string or null")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be true or false")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number")
    if hint is int and not isinstance(value, int):
        raise ValueError(f"{name} must be an integer")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0")
    return value if hint is int else float(value)


def _malformed_page(
    kind: str, batch_id: str, total: int | None, items: str, token: str | None
) -> str:
    """A 200 body that a careful client must refuse, of the given kind."""
    if kind == "not_an_object":
        return f"[{items}]"
    if kind == "balances_not_a_list":
        return _page_json(batch_id, total, f'{{"items":[{items}]}}', token is not None, token)
    if kind == "wrong_types":
        return _page_json(batch_id, total, f"[{items}]", "yes", token)
    full = _page_json(batch_id, total, f"[{items}]", token is not None, token)
    return full[: max(1, len(full) // 2)]
