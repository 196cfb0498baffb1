"""A local simulator of the Rightfoot API, with injectable faults.

Not part of the product: the service (``service/``) never imports it; only
``rightfoot-poller simulate`` does, when that subcommand runs. Tests and benchmarks use it
in-process (:class:`Simulator` and :func:`build_app`) or as that subcommand.

It serves the two endpoints the project talks to, as the vendor pages describe them:

* ``GET /v1/balances?batchId=…&limit=…&nextPageToken=…`` — the processed results of one
  batch, paginated, with Bearer authentication and the documented error bodies;
* ``GET /v1/balances/export?batch_ids=…`` — the CSV export of one or more batches,
  streamed in chunks.

Batches are held in memory. Each record has a ``visible_at`` offset, so results appear
over time the way a batch being processed does. Time comes from an injectable clock, so
tests can move it by hand.

By default a batch is listed in submission order, as the vendor's own example is (its
timestamps are out of time order): each record is listed once it has finished, possibly
at a position a client has already paged past; a page token names the position of the
last record listed and the next page starts after it, so a client that only resumes
from its last token misses records that finish behind it (a full re-read from the first
page sees them). ``total_processed`` is the visible count. The vendor pages allow other
shapes (the order of the list is not documented; nothing bounds a batch's size), and a
batch can be given them (:meth:`Simulator.add_batch`, :meth:`Simulator.generate_batch`,
``POST /_sim/batches``):

* ``order="completion"``: records append as they finish, and a page token means "start
  after the first N records", which is stable because records only ever append;
* ``total_processed="absent"`` omits the field; ``count_skew`` (an integer) is added to
  the served count (at least 0), a count that disagrees with what is ever listed;
* ``lazy=True`` (automatic above ``LAZY_THRESHOLD`` = 100,000 records): no record objects
  are held; each record is derived from (seed, position) with splitmix64 when read, and
  the batch keeps about 8 bytes per record in completion order, 17 in submission order
  (finish times, finish order, its inverse, a visibility byte map). A million records
  take about a second to make. :meth:`Simulator.iter_records` and
  :meth:`Simulator.record_count` read them without materialising the batch;
  :meth:`Simulator.all_records` and :meth:`Simulator.records_served` build lists.

Faults (5xx, 429, latency, hangs, malformed bodies, rejected page tokens) are set on
:attr:`Simulator.faults`, directly or through the unauthenticated control API:

* ``GET|POST /_sim/faults`` — read, or partially update, the :class:`Faults` fields
  (``error_5xx_for_s`` sets ``error_5xx_until`` relative to the simulator clock, whose
  current value ``GET`` returns as ``now``);
* ``GET|POST /_sim/batches`` — list batches, or generate one
  (``{"batch_id", "count", "spread_s", "seed", "visible_after", "codes", "with_metadata",
  "owner_key", "order", "total_processed", "count_skew", "lazy"}``, see
  :meth:`Simulator.generate_batch`; a bad value answers 400 ``{"error": ...}``);
* ``GET /_sim/batches/{id}/records[?offset=&limit=]`` — the records visible now, in list
  order, balances as strings (streamed for lazy batches);
* ``GET /_sim/requests`` — the request log;
* ``POST /_sim/keys`` (``{"api_keys": [...]}``) and ``POST /_sim/invalidate-tokens``.

For faults aimed at one moment, :attr:`Simulator.on_page_request` (in-process only) is
called with a :class:`PageRequest` (batch, page token, cursor, offset, per-batch sequence
number, instance) for every ``GET /v1/balances`` request about to be answered with a page;
if it returns an awaitable, the response waits for it, so a test can hold a page, or kill
the service while a page request is outstanding.

``rightfoot-poller simulate`` runs it with a few demo batches (:meth:`Simulator.seed_demo`).

Plain HTTP on loopback stands in for the vendor's HTTPS.

Modules:

* :mod:`~rightfoot_simulator.data` — records, synthetic, lazy and demo data, serialisation;
* :mod:`~rightfoot_simulator.batches` — batch shapes, listing and paging, page tokens;
* :mod:`~rightfoot_simulator.faults` — :class:`Faults` and malformed bodies;
* :mod:`~rightfoot_simulator.simulator` — :class:`Simulator`, :class:`PageRequest`,
  :class:`RequestLogEntry`;
* :mod:`~rightfoot_simulator.api` — the vendor endpoints and the request log;
* :mod:`~rightfoot_simulator.control` — the ``/_sim/`` control API;
* :mod:`~rightfoot_simulator.server` — :func:`build_app`, :func:`run_simulator` and the
  ``simulate`` subcommand.
"""

from rightfoot_simulator.api import DOCS_URL, EXPORT_CHUNK_BYTES, MAX_LIMIT
from rightfoot_simulator.batches import (
    LAZY_THRESHOLD,
    MAX_LAZY_COUNT,
    ORDERS,
    TOTAL_PROCESSED_MODES,
    LazyRecords,
)
from rightfoot_simulator.data import (
    DEMO_CODES_BATCH_ID,
    DEMO_LARGE_BATCH_ID,
    DEMO_LARGE_COUNT,
    DEMO_LATE_AFTER_S,
    DEMO_LATE_BATCH_ID,
    DEMO_METADATA_BATCH_ID,
    DEMO_MISSING_BATCH_ID,
    DOCUMENTED_STATUS_CODES,
    EXPORT_COLUMNS,
    SimRecord,
    export_status,
)
from rightfoot_simulator.faults import MALFORMED_KINDS, Faults
from rightfoot_simulator.server import (
    add_simulate_arguments,
    build_app,
    run_simulator,
    simulate_main,
)
from rightfoot_simulator.simulator import (
    DEFAULT_API_KEY,
    PageRequest,
    PageRequestHook,
    RequestLogEntry,
    Simulator,
)

__all__ = [
    "DEFAULT_API_KEY",
    "DEMO_CODES_BATCH_ID",
    "DEMO_LARGE_BATCH_ID",
    "DEMO_LARGE_COUNT",
    "DEMO_LATE_AFTER_S",
    "DEMO_LATE_BATCH_ID",
    "DEMO_METADATA_BATCH_ID",
    "DEMO_MISSING_BATCH_ID",
    "DOCS_URL",
    "DOCUMENTED_STATUS_CODES",
    "EXPORT_CHUNK_BYTES",
    "EXPORT_COLUMNS",
    "LAZY_THRESHOLD",
    "MALFORMED_KINDS",
    "MAX_LAZY_COUNT",
    "MAX_LIMIT",
    "ORDERS",
    "TOTAL_PROCESSED_MODES",
    "Faults",
    "LazyRecords",
    "PageRequest",
    "PageRequestHook",
    "RequestLogEntry",
    "SimRecord",
    "Simulator",
    "add_simulate_arguments",
    "build_app",
    "export_status",
    "run_simulator",
    "simulate_main",
]
