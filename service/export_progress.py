"""The export's progress line on stderr: rows, bytes and rates while it downloads."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, TextIO


class Totals(Protocol):
    """What an export did (service.export.ExportResult)."""

    @property
    def rows(self) -> int: ...

    @property
    def bytes(self) -> int: ...

    @property
    def seconds(self) -> float: ...


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def progress_wanted(mode: str, *, to_stdout: bool, stderr_is_tty: bool) -> bool:
    """``--progress``: auto shows it on a terminal; nothing ever mixes with piped CSV."""
    if mode == "never":
        return False
    if mode == "auto" or to_stdout:
        return stderr_is_tty
    return True


class ProgressPrinter:
    """Rows, bytes and rates on stderr: redrawn with ``\\r`` at most a few times per second
    on a terminal, one line per second otherwise; nothing for exports shorter than
    ``delay_s``."""

    def __init__(
        self,
        stream: TextIO,
        *,
        tty: bool,
        delay_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.tty = tty
        self.delay_s = delay_s
        self.interval_s = 0.25 if tty else 1.0
        self._clock = clock
        self._last = -float("inf")
        self._width = 0
        self.shown = False

    def __call__(self, rows: int, size: int, elapsed: float) -> None:
        now = self._clock()
        if elapsed < self.delay_s or now - self._last < self.interval_s:
            return
        self._last = now
        self._emit(self._line(rows, size, elapsed), final=False)

    def finish(self, result: Totals) -> None:
        """The final figures, if progress was shown at all."""
        if self.shown:
            self._emit(self._line(result.rows, result.bytes, result.seconds), final=True)

    def abort(self) -> None:
        """End a half-drawn line so that an error message starts on its own line."""
        if self.shown and self.tty:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False

    @staticmethod
    def _line(rows: int, size: int, elapsed: float) -> str:
        rate = rows / elapsed if elapsed > 0 else 0.0
        speed = size / elapsed if elapsed > 0 else 0.0
        return (
            f"{rows:,} rows  {_human_bytes(size)}  {elapsed:.1f} s  "
            f"{rate:,.0f} rows/s  {_human_bytes(speed)}/s"
        )

    def _emit(self, line: str, *, final: bool) -> None:
        if self.tty:
            padded = line.ljust(self._width)
            self._width = len(line)
            self.stream.write("\r" + padded + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.shown = not final
