"""Faults from outside the program: OS errors while writing, termination signals.

An OS error met while producing the output (disk full, quota, read-only file system, a name
too long, no permission) becomes one :class:`OutputError` (exit 8) naming the path and the
cause. SIGTERM and SIGHUP are turned into :class:`Terminated`, a ``KeyboardInterrupt``, so
they unwind exactly like Ctrl-C: the partial output is removed and the tool exits 128+signal.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mksuite.common.errors import OutputError

_CAUSES = {
    errno.ENOSPC: ("no space left on the device", "free some space or choose an output on another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose an output on another disk"),
    errno.EFBIG: ("file too large for this file system", "use a smaller --shard-size or another file system"),
    errno.EROFS: ("read-only file system", "choose an output directory on a writable file system"),
    errno.ENAMETOOLONG: ("file name or path too long", "choose a shorter output directory name or path"),
    errno.EACCES: ("permission denied", "choose an output directory you can write to"),
    errno.EPERM: ("operation not permitted", "choose an output directory you can write to"),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "check the output path"),
    errno.EEXIST: ("the path already exists", "choose another output directory"),
    errno.EIO: ("input/output error from the device", "check the disk (dmesg) and try again"),
}
# Errors that mean "this output location cannot take the model", wherever they surface.
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def output_os_error(error: OSError, out: Path | str) -> OutputError:
    """One clear OutputError for an OS error met while writing ``out``."""
    cause, hint = _CAUSES.get(error.errno, (error.strerror or str(error), None))
    where = error.filename if error.filename is not None else out
    return OutputError(f"cannot write the output {out}: {cause} (at {where})", hint=hint)


@contextmanager
def writing_to(out: Path | str) -> Iterator[None]:
    """Turn OS errors raised inside into OutputErrors about ``out``."""
    try:
        yield
    except OSError as error:
        raise output_os_error(error, out) from None


def check_free_space(directory: Path, needed: int, out: Path | str) -> None:
    """Refuse early when ``needed`` more bytes cannot fit on ``directory``'s file system."""
    try:
        free = _free_bytes(directory)
    except OSError:
        return  # no figure to compare with: the writes themselves will tell
    if needed > free:
        raise OutputError(
            f"the output {out} needs {_size(needed)} but its file system has {_size(free)} free",
            hint="free some space, or choose an output directory on another disk",
        )


def _free_bytes(directory: Path) -> int:
    path = Path(directory)
    while not path.exists() and path.parent != path:
        path = path.parent
    stats = os.statvfs(path)
    # f_bavail: blocks an unprivileged writer may use (root's reserve excluded).
    return stats.f_bavail * stats.f_frsize


def _size(count: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count} B"


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived; unwinds like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


# Set once a termination signal arrived; slow waits (test hooks) poll it.
terminating = threading.Event()
TERMINATION_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s)


@contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """Within, SIGTERM and SIGHUP raise :class:`Terminated` in the main thread (once: a second
    signal during the cleanup is ignored, so the cleanup finishes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        if terminating.is_set():
            return
        terminating.set()
        raise Terminated(signum)

    previous = {}
    for signum in TERMINATION_SIGNALS:
        try:
            previous[signum] = signal.signal(signum, handle)
        except (OSError, ValueError):
            pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        terminating.clear()
