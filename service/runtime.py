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

``memory_limit_bytes`` reads the container's memory limit, which the service exports
beside its resident memory so that an alert can warn before the limit is reached.
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path

GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc(thresholds: tuple[int, int, int] = GC_THRESHOLDS) -> None:
    """Collect once, freeze the survivors, then collect less often (see the module doc)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)


# Values at or above this in a cgroup v1 limit mean "no limit" (the kernel's page-rounded
# LONG_MAX, e.g. 9223372036854771712).
_UNLIMITED = 1 << 62


def memory_limit_files(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> list[Path]:
    """Where the process's memory limit may be read, in order: its own cgroup, as
    ``/proc/self/cgroup`` names it (``memory.max`` under cgroup v2, ``0::<path>``;
    ``memory.limit_in_bytes`` under v1, ``<n>:memory:<path>``), then the root's, as a
    container sees its own cgroup. The cgroup does not change; the limit in it may."""
    files: list[Path] = []
    with contextlib.suppress(OSError):
        for line in proc_cgroup.read_text().splitlines():
            fields = line.split(":", 2)
            if len(fields) != 3:
                continue
            _, controllers, where = fields
            if controllers == "":
                files.append(root / where.lstrip("/") / "memory.max")
            elif "memory" in controllers.split(","):
                files.append(root / "memory" / where.lstrip("/") / "memory.limit_in_bytes")
    files += [root / "memory.max", root / "memory" / "memory.limit_in_bytes"]
    return list(dict.fromkeys(files))  # a container's own cgroup is the root: once


def memory_limit_bytes(files: list[Path] | None = None) -> int | None:
    """The memory limit (a container's ``resources.limits.memory``) in the first of
    ``files`` (default: ``memory_limit_files()``) that can be read, or None when there
    is none or none can be read."""
    for path in memory_limit_files() if files is None else files:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        return value if 0 < value < _UNLIMITED else None
    return None
