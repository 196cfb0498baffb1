"""Where an export's CSV goes: a file replaced only once complete, or stdout.

A file is written to a temporary file beside it (``.<name>.<random>.part``), fsynced
and renamed over the target only on commit; on abort the temporary file is removed
and an existing target is left as it was. Stdout can only be restarted while nothing
has been written to it.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import IO, BinaryIO, Protocol

import structlog

from service.errors import ExportWriteError

log = structlog.get_logger(__name__)


def open_output(dest: Path | None) -> Output:
    """The output for ``-o``: the file ``dest``, or stdout for None."""
    return StreamOutput(sys.stdout.buffer) if dest is None else FileOutput(dest)


class Output(Protocol):
    """Where one export goes; ``begin`` starts each attempt afresh."""

    @property
    def restartable(self) -> bool: ...

    def begin(self) -> None: ...

    def write(self, data: bytes) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


def _new_file_mode(target: Path) -> int:
    """The mode ``open()`` would give the target: an existing file's, else 0666 & ~umask."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except OSError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


class FileOutput:
    """A temporary file next to the target, renamed over it once complete."""

    restartable = True

    def __init__(self, target: Path) -> None:
        self.target = target
        self._file: IO[bytes] | None = None
        self.temp_path: Path | None = None

    def begin(self) -> None:
        self.abort()
        try:
            self._file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in commit/abort
                dir=self.target.parent,
                prefix=f".{self.target.name}.",
                suffix=".part",
                delete=False,
            )
        except OSError as exc:
            raise self._error(exc) from None
        self.temp_path = Path(self._file.name)

    def write(self, data: bytes) -> None:
        assert self._file is not None
        try:
            self._file.write(data)
        except OSError as exc:
            raise self._error(exc) from None

    def commit(self) -> None:
        assert self._file is not None and self.temp_path is not None
        try:
            self._file.flush()
            os.fchmod(self._file.fileno(), _new_file_mode(self.target))
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.temp_path, self.target)
        except OSError as exc:
            raise self._error(exc) from None
        self._file = self.temp_path = None
        _fsync_directory(self.target.parent)

    def abort(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        if self.temp_path is not None:
            try:
                self.temp_path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("export_temp_file_left", path=str(self.temp_path), error=exc.strerror)
            self.temp_path = None

    def _error(self, exc: OSError) -> ExportWriteError:
        return ExportWriteError(f"cannot write {self.target}: {exc.strerror or exc}")


def _fsync_directory(path: Path) -> None:
    """Make the rename durable; not every platform or file system supports it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class StreamOutput:
    """A binary stream (stdout): can restart only while nothing has been written."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.written = 0

    @property
    def restartable(self) -> bool:
        return self.written == 0

    def begin(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        try:
            self.stream.write(data)
        except OSError as exc:
            raise self._error(exc) from None
        self.written += len(data)

    def commit(self) -> None:
        try:
            self.stream.flush()
        except OSError as exc:
            raise self._error(exc) from None

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.stream.flush()

    def _error(self, exc: OSError) -> ExportWriteError:
        if isinstance(exc, BrokenPipeError):
            _silence_stdout()
        return ExportWriteError(f"cannot write to stdout: {exc.strerror or exc}")


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter exits quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
