"""Memory and time of what a batch remembers of what it published, as the batch grows.

A tracked batch keeps two 64-bit fingerprints per record it published, its event's
and its authorizer's (``service.seen.SeenSet``), and a replica rebuilds them from the
state topic's chunks when it takes the batch over (``service.state.StateRestore``).
Both are timed and weighed here, alone (no broker, no network), for batches of
``--sizes`` records:

- ``publish``: the records arrive as polls read and commit them, a page of 100 at a
  time: ``step.collect`` (each record looked up), then what a commit keeps
  (``BatchState.remember``: into the seen set and the chunk log, the chunks written
  out). Figures: µs per record in those steps (not in making the records), the longest
  of them for one page (ms: what one commit keeps the event loop busy with, which
  must not grow with the batch), the Python heap at the end (bytes per record) and
  its peak at any moment (bytes per record).
- ``restore``: the batch's summary and chunks, as read from the state topic, rebuilt
  into a ``BatchState`` a step at a time (``StateRestore.rebuild``, whose steps a
  caller on the event loop pauses between). Figures: µs per record, the longest step
  (ms: the longest the event loop waits for it), and the heap's peak during the
  rebuild, over what the chunk bytes themselves take (bytes per record).

The longest page and step are the process's CPU time (``time.process_time``), so that
another process taking the core meanwhile does not count; the other times are wall
clock. Memory is the Python heap as ``tracemalloc`` counts it (arrays' buffers included),
measured in a run apart from the timed one. The records' event ids are real ones
(uniform, from SHA-1). Prints a line per size, then one JSON line.

    uv run python bench/seen_memory.py [--sizes 100000,1000000,3000000]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import tracemalloc
from collections.abc import Sequence
from typing import Any

from service.records import BalanceRecord, balance_event_id, fingerprint
from service.state import BatchState, StateRestore, chunk_key, encode_state
from service.step import Pending, collect

BATCH_ID = "4c1f6a3e-2b7d-4f0e-9a51-6c2f1e0b7d11"
PAGE = 100


def _page(start: int, n: int) -> list[BalanceRecord]:
    """Records ``start`` .. of a batch of ``n``, as a page of the API gives them."""
    out = []
    for i in range(start, min(start + PAGE, n)):
        uid, ts, balance = f"{i:08d}", "2026-11-28T10:00:00Z", f"{i}.25"
        out.append(
            BalanceRecord(uid, balance, 0, ts, balance_event_id(BATCH_ID, uid, ts, balance, 0))
        )
    return out


def _publish(n: int, keep: bool = True) -> tuple[BatchState, dict[int, bytes], float, float]:
    """The batch after publishing ``n`` records a page at a time, as a poll commits them:
    ``collect`` then what ``Policy.commit`` keeps; with ``keep``, the chunks as the
    compacted state topic keeps them (the last value of each). Also the seconds spent
    in those (not in making the records), and the most CPU seconds for one page."""
    state = BatchState(batch_id=BATCH_ID, partition=0)
    chunks: dict[int, bytes] = {}
    spent = longest = 0.0
    for start in range(0, n, PAGE):
        page = _page(start, n)
        began, cpu = time.perf_counter(), time.process_time()
        pending = Pending()
        collect(state, page, [], pending)
        state.remember(pending.digests)
        state.published += len(pending.records)
        written = state.chunks.flush()
        spent += time.perf_counter() - began
        longest = max(longest, time.process_time() - cpu)
        if keep:
            chunks.update(written)
    return state, chunks, spent, longest


def _restore(summary: bytes, chunks: dict[int, bytes]) -> tuple[BatchState, float]:
    """The batch rebuilt from its records, and the longest step of the rebuild (CPU s)."""
    restore = StateRestore(0)
    restore.apply(BATCH_ID.encode(), summary)
    for seq, value in chunks.items():
        restore.apply(chunk_key(BATCH_ID, seq), value)
    out: dict[str, BatchState] = {}
    longest = 0.0
    steps = restore.rebuild(lambda batch_id, exc: None, out)
    while True:
        began = time.process_time()
        done = next(steps, True)
        longest = max(longest, time.process_time() - began)
        if done:
            return out[BATCH_ID], longest


def measure(n: int) -> dict[str, Any]:
    gc.collect()
    state, chunks, publish_s, publish_longest = _publish(n)
    assert state.published == n and state.records_seen == n
    assert len(state.seen) == 2 * n, "each record's event and authorizer remembered"
    summary = encode_state(state)
    del state
    gc.collect()
    started = time.perf_counter()
    restored, restore_longest = _restore(summary, chunks)
    restore_s = time.perf_counter() - started
    sample = [r for start in range(0, n, max(PAGE, n // 10)) for r in _page(start, n)]
    assert len(restored.seen) == 2 * n
    assert all(fingerprint(r.event_id) in restored.seen for r in sample)
    del restored
    gc.collect()

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    state, _, _, _ = _publish(n, keep=False)
    end = tracemalloc.get_traced_memory()[0]
    peak = tracemalloc.get_traced_memory()[1]
    del state
    gc.collect()
    tracemalloc.reset_peak()
    before_restore = tracemalloc.get_traced_memory()[0]
    restored, _ = _restore(summary, chunks)
    restore_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del restored
    return {
        "records": n,
        "publish_us_per_record": round(publish_s / n * 1e6, 3),
        "publish_longest_page_ms": round(publish_longest * 1e3, 2),
        "publish_end_bytes_per_record": round((end - base) / n, 1),
        "publish_peak_bytes_per_record": round((peak - base) / n, 1),
        "restore_us_per_record": round(restore_s / n * 1e6, 3),
        "restore_longest_step_ms": round(restore_longest * 1e3, 2),
        "restore_peak_bytes_per_record": round((restore_peak - before_restore) / n, 1),
    }


def summary_line(r: dict[str, Any]) -> str:
    return (
        f"seen set: {r['records']:,} records  publish {r['publish_us_per_record']:.3f} µs/rec, "
        f"longest page {r['publish_longest_page_ms']:.2f} ms, "
        f"{r['publish_end_bytes_per_record']:.1f} B/rec held, "
        f"peak {r['publish_peak_bytes_per_record']:.1f} B/rec  |  restore "
        f"{r['restore_us_per_record']:.3f} µs/rec, "
        f"longest step {r['restore_longest_step_ms']:.2f} ms, "
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
