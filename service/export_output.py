"""Where an export's CSV goes: a file replaced only once complete, or stdout.

A file is written to a temporary file beside it (``.<name>.<random>.part``), fsynced
and renamed over the target only on commit; on abort the temporary file is removed
and an existing target is left as it was. Stdout can only be restarted while nothing
has been written to it.

What ``-o`` names is looked at first (:func:`output_kind`):

* a symbolic link to a regular file (or to none yet) is followed: the file it resolves
  to is replaced, its temporary file in that file's directory; the link stays a link;
* an existing target that is not a regular file (a FIFO, a character device such as
  ``/dev/null`` or a terminal), or one reached through ``/proc`` (``/dev/fd/3``), is
  written to directly (:class:`DirectOutput`), as stdout is: no temporary file, no
  rename (which would swap the FIFO or the device for a plain file), restartable only
  while nothing has been written; a FIFO is opened once a reader has it open;
* such a target that is the process's stdout (``/dev/stdout``, ``/proc/self/fd/1``) is
  stdout, as for ``-o -``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import IO, BinaryIO, Literal, Protocol

import structlog

from service.errors import ExportWriteError

log = structlog.get_logger(__name__)


#: How long a FIFO is waited for between two tries to open it (until it has a reader).
FIFO_POLL_S = 0.1

OutputKind = Literal["stdout", "direct", "file"]


def output_kind(target: Path) -> tuple[OutputKind, Path]:
    """How ``-o target`` is written, and where: ``("file", the regular file to replace,
    symbolic links resolved)``, ``("direct", target)`` or ``("stdout", target)`` (see the
    module's docstring). OSError if the target cannot be looked at (a loop of links)."""
    try:
        st: os.stat_result | None = target.stat()  # through symbolic links
    except FileNotFoundError:
        st = None  # a new file, or a link to none yet: created where it points
    if st is not None and (not stat.S_ISREG(st.st_mode) or _through_proc(target)):
        return ("stdout" if _is_stdout(st) else "direct"), target
    return "file", Path(os.path.realpath(target))


def _through_proc(target: Path) -> bool:
    """Whether ``target`` leads, through links, to ``/proc`` (``/dev/stdout``, ``/dev/fd/N``:
    an open file of a process, which no rename should replace)."""
    path = os.path.abspath(target)
    for _ in range(40):  # the kernel's own limit on links followed
        parent = os.path.realpath(os.path.dirname(path))
        if parent == "/proc" or parent.startswith("/proc/"):
            return True
        path = os.path.join(parent, os.path.basename(path))
        if not os.path.islink(path):
            return False
        path = os.path.normpath(os.path.join(parent, os.readlink(path)))
    return False


def _is_stdout(st: os.stat_result) -> bool:
    try:
        out = os.fstat(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # no stdout, or not a real file
        return False
    return (out.st_dev, out.st_ino) == (st.st_dev, st.st_ino)


def open_output(dest: Path | None) -> Output:
    """The output for ``-o``: ``dest`` as :func:`output_kind` says, or stdout for None."""
    if dest is None:
        return StreamOutput(sys.stdout.buffer)
    try:
        kind, where = output_kind(dest)
    except OSError as exc:
        raise ExportWriteError(f"cannot write {dest}: {exc.strerror or exc}") from None
    if kind == "stdout":
        return StreamOutput(sys.stdout.buffer)
    if kind == "direct":
        return DirectOutput(where)
    return FileOutput(where)


class Output(Protocol):
    """Where one export goes: ``prepare`` once, ``begin`` starts each attempt afresh,
    ``close`` at the end whatever happened."""

    @property
    def restartable(self) -> bool: ...

    @property
    def name(self) -> str: ...

    async def prepare(self) -> None: ...

    def close(self) -> None: ...

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

    @property
    def name(self) -> str:
        return str(self.target)

    async def prepare(self) -> None:
        pass

    def close(self) -> None:
        self.abort()

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

    name = "stdout"

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.written = 0

    @property
    def restartable(self) -> bool:
        return self.written == 0

    async def prepare(self) -> None:
        pass

    def close(self) -> None:
        pass

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


class DirectOutput:
    """An existing file that no rename may replace (a FIFO, a character device, a file
    reached through ``/proc``), written to as it is: restartable only while nothing has
    been written, as stdout."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.written = 0
        self._file: IO[bytes] | None = None

    @property
    def name(self) -> str:
        return str(self.target)

    @property
    def restartable(self) -> bool:
        return self.written == 0

    async def prepare(self) -> None:
        """Open the target: a FIFO once it has a reader (waited for without blocking, so
        that Ctrl-C and SIGTERM still stop the command), anything else at once; a regular
        file (reached through ``/proc``) is appended to, as it is someone's open file."""
        try:
            regular = stat.S_ISREG(self.target.stat().st_mode)
            flags = os.O_WRONLY | os.O_NONBLOCK | (os.O_APPEND if regular else 0)
            waiting = False
            while True:
                try:
                    fd = os.open(self.target, flags)
                    break
                except OSError as exc:
                    if exc.errno != errno.ENXIO:  # ENXIO: a FIFO that no one reads yet
                        raise
                if not waiting:
                    log.info("export_waiting_for_reader", path=str(self.target))
                    waiting = True
                await asyncio.sleep(FIFO_POLL_S)
            os.set_blocking(fd, True)
            self._file = os.fdopen(fd, "wb")
        except OSError as exc:
            raise self._error(exc) from None

    def begin(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        assert self._file is not None
        try:
            self._file.write(data)
        except OSError as exc:
            raise self._error(exc) from None
        self.written += len(data)

    def commit(self) -> None:
        assert self._file is not None
        try:
            self._file.flush()
        except OSError as exc:
            raise self._error(exc) from None

    def abort(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def _error(self, exc: OSError) -> ExportWriteError:
        return ExportWriteError(f"cannot write {self.target}: {exc.strerror or exc}")
