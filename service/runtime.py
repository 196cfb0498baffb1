"""Process-wide settings of the Python runtime for the long-running service.

The service allocates a few small objects per record (parsed fields, the event's
bytes, its headers, the producer's futures), and up to a few hundred thousand of
them are alive at once while polls wait for their transaction. With CPython's
default thresholds (700, 10, 10) the cyclic garbage collector runs every 700
allocations and keeps promoting those short-lived objects, so that full
collections over the whole heap become frequent: profiles of the throughput
benchmark (bench/throughput.py) showed about 40% of the service's CPU time in
the collector. Almost all of this garbage is freed by reference counting anyway;
the collector only has to find the rare reference cycles.

``tune_gc`` freezes what start-up allocated (modules, schemas, metrics: never
garbage) out of every future collection, and raises the thresholds so that a
young collection runs every 50,000 allocations. Memory stays bounded: cycles
are still collected, only less often.
"""

from __future__ import annotations

import gc

GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc(thresholds: tuple[int, int, int] = GC_THRESHOLDS) -> None:
    """Collect once, freeze the survivors, then collect less often (see the module doc)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)
