"""Memory and time of what a batch remembers of what it published, as the batch grows.

A tracked batch keeps one 64-bit fingerprint per record it published
(``service.seen.SeenSet``), and a replica rebuilds it from the state topic's chunks
when it takes the batch over (``service.state.StateRestore``). Both are timed and
weighed here, alone (no broker, no network), for batches of ``--sizes`` records:

- ``publish``: the fingerprints arrive as a poll commits them, a page of 100 at a
  time (``BatchState.remember``: into the seen set and the chunk log, the chunks
  written out as a commit writes them); each record is first looked up as
  ``step.collect`` does. Figures: µs per record, the Python heap at the end (bytes
  per record) and its peak at any moment (bytes per record).
- ``restore``: the batch's summary and chunks, as read from the state topic, rebuilt
  into a ``BatchState``. Figures: µs per record and the heap's peak during the
  rebuild, over what the chunk bytes themselves take (bytes per record).

Memory is the Python heap as ``tracemalloc`` counts it (arrays' buffers included),
measured in a run apart from the timed one. The fingerprints are those of real event
ids (uniform, from SHA-1). Prints a line per size, then one JSON line.

    uv run python bench/seen_memory.py [--sizes 100000,1000000,3000000]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import tracemalloc
from collections.abc import Sequence
from typing import Any

from service.records import fingerprint
from service.state import BatchState, StateRestore, chunk_key, encode_state

BATCH_ID = "4c1f6a3e-2b7d-4f0e-9a51-6c2f1e0b7d11"
PAGE = 100


def _fingerprints(n: int) -> list[int]:
    # The last 64 bits of random version-5 UUIDs: what fingerprint() takes from an event id.
    out = []
    for _ in range(n):
        h = os.urandom(16).hex()
        variant = "89ab"[int(h[16], 16) % 4]
        out.append(fingerprint(f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{variant}{h[17:20]}-{h[20:32]}"))
    return out


def _publish(fps: list[int], keep: bool = True) -> tuple[BatchState, dict[int, bytes]]:
    """The batch after publishing every fingerprint; with ``keep``, the chunks as the
    compacted state topic keeps them (the last value of each)."""
    state = BatchState(batch_id=BATCH_ID, partition=0)
    chunks: dict[int, bytes] = {}
    for start in range(0, len(fps), PAGE):
        page = fps[start : start + PAGE]
        fresh = [d for d in page if d not in state.seen]
        state.remember(fresh)
        state.published += len(fresh)
        written = state.chunks.flush()
        if keep:
            chunks.update(written)
    return state, chunks


def _restore(summary: bytes, chunks: dict[int, bytes]) -> BatchState:
    restore = StateRestore(0)
    restore.apply(BATCH_ID.encode(), summary)
    for seq, value in chunks.items():
        restore.apply(chunk_key(BATCH_ID, seq), value)
    out = restore.batches(lambda batch_id, exc: None)
    return out[BATCH_ID]


def measure(n: int) -> dict[str, Any]:
    fps = _fingerprints(n)
    gc.collect()
    started = time.perf_counter()
    state, chunks = _publish(fps)
    publish_s = time.perf_counter() - started
    assert len(state.seen) == n, "every fingerprint remembered"
    summary = encode_state(state)
    del state
    gc.collect()
    started = time.perf_counter()
    restored = _restore(summary, chunks)
    restore_s = time.perf_counter() - started
    assert len(restored.seen) == n and all(d in restored.seen for d in fps[:: max(1, n // 1000)])
    del restored
    gc.collect()

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    state, _ = _publish(fps, keep=False)
    end = tracemalloc.get_traced_memory()[0]
    peak = tracemalloc.get_traced_memory()[1]
    del state
    gc.collect()
    tracemalloc.reset_peak()
    before_restore = tracemalloc.get_traced_memory()[0]
    restored = _restore(summary, chunks)
    restore_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del restored
    return {
        "records": n,
        "publish_us_per_record": round(publish_s / n * 1e6, 3),
        "publish_end_bytes_per_record": round((end - base) / n, 1),
        "publish_peak_bytes_per_record": round((peak - base) / n, 1),
        "restore_us_per_record": round(restore_s / n * 1e6, 3),
        "restore_peak_bytes_per_record": round((restore_peak - before_restore) / n, 1),
    }


def summary_line(r: dict[str, Any]) -> str:
    return (
        f"seen set: {r['records']:,} records  publish {r['publish_us_per_record']:.3f} µs/rec, "
        f"{r['publish_end_bytes_per_record']:.1f} B/rec held, "
        f"peak {r['publish_peak_bytes_per_record']:.1f} B/rec  |  restore "
        f"{r['restore_us_per_record']:.3f} µs/rec, "
        f"peak {r['restore_peak_bytes_per_record']:.1f} B/rec"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default="100000,1000000,3000000", help="records per batch")
    args = parser.parse_args(argv)
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        results.append(measure(n))
        print(summary_line(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"seen_memory": results}, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
