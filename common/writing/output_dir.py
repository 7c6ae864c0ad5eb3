"""An output directory that appears only when complete, and never at an input's expense.

Everything is written into a hidden sibling directory (``.NAME.partial-*``) and moved into
place by one rename at the end. An exception, Ctrl-C, SIGTERM or SIGHUP removes the partial
directory. A process killed outright (kill -9, OOM killer, power loss) leaves it behind; the
next run into the same OUT finds it and resumes from it when it was made by the same run
(same fingerprint, common/writing/journal.py), or removes it and says so.

A partial directory is ours only if it holds the marker file written at its creation; the
running process holds an exclusive lock on that marker, so a directory whose marker is
locked belongs to a run still in progress and is left alone. Anything without a marker is
never removed, only mentioned.

Replacing an existing OUT (``--overwrite``): the new directory is complete first; then the
old OUT is renamed aside, the new one renamed in, and only then is the old one deleted.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

from mksuite.common.errors import OutputError
from mksuite.common.faults import writing_to
from mksuite.common.writing.journal import JOURNAL_FILE
from mksuite.common.writing.output_guard import RunInput, check_not_an_input, check_replaceable

PARTIAL_MARKER = ".partial-"
MARKER_FILE = ".mksuite-partial"
REPLACED_MARKER = ".replaced-"
# tempfile.mkdtemp adds 8 random characters to the prefix.
_RANDOM_SUFFIX = 8


class OutputNotice(UserWarning):
    """Something about the output location the user should hear (a stale partial removed...)."""

    ungrouped = True  # each notice is about a different directory: never folded into a count


class OutputDirectory:
    """Context manager: ``with OutputDirectory(out) as staging: ...; staging.commit()``.

    ``inputs``: every path the run reads (refused as OUT, around OUT or inside OUT).
    ``fingerprint``: identifies the run's output bytes; an interrupted partial directory with
    the same fingerprint is resumed (``self.resumed``), any other one of ours is removed.
    """

    def __init__(
        self,
        final: Path | str,
        *,
        overwrite: bool = False,
        inputs: Sequence[RunInput] = (),
        fingerprint: str | None = None,
    ):
        self.final = Path(final).expanduser().absolute()
        self.overwrite = overwrite
        self.inputs = list(inputs)
        self.fingerprint = fingerprint
        self.path: Path | None = None
        self.committed = False
        self.resumed = False
        self._lock_fd: int | None = None
        self._checked_inputs: tuple[RunInput, ...] | None = None

    @property
    def checked(self) -> bool:
        """Whether the full check has run (later calls only check inputs added since)."""
        return self._checked_inputs is not None

    def check(self) -> OutputDirectory:
        """Fail early (before planning work) if OUT cannot be produced, or producing it could
        destroy an input or a user's files.

        Checked once per object and set of inputs: entry points check the directory they are
        given before any work and hand the object down; inputs learnt later (when the plan has
        opened every model) are checked when they are added.
        """
        inputs = tuple(self.inputs)
        if self._checked_inputs is not None:
            if inputs != self._checked_inputs:
                with writing_to(self.final):
                    check_not_an_input(self.final, self.inputs)
                self._checked_inputs = inputs
            return self
        with writing_to(self.final):
            self._check_name()
            check_not_an_input(self.final, self.inputs)
            if self.final.exists() or self.final.is_symlink():
                if not self.final.is_dir():
                    raise OutputError(f"{self.final} exists and is not a directory")
                if any(self.final.iterdir()):
                    if not self.overwrite:
                        raise OutputError(
                            f"{self.final} already exists and is not empty",
                            hint="choose another output directory or pass --overwrite to replace it",
                        )
                    check_replaceable(self.final)
            existing = _nearest_existing(self.final.parent)
            if not existing.is_dir():
                raise OutputError(f"cannot create {self.final}: {existing} is a file, not a directory")
            if not os.access(existing, os.W_OK | os.X_OK):
                raise OutputError(
                    f"cannot write into {existing}"
                    + (": read-only file system" if _read_only(existing) else ": permission denied"),
                    hint="choose an output directory you can write to",
                )
        self._checked_inputs = inputs
        return self

    def _check_name(self) -> None:
        # The partial directory's name is longer than OUT's: check that one fits too.
        longest = len(f".{self.final.name}{PARTIAL_MARKER}".encode()) + _RANDOM_SUFFIX
        existing = _nearest_existing(self.final.parent)
        try:
            name_max = os.pathconf(existing, "PC_NAME_MAX")
            path_max = os.pathconf(existing, "PC_PATH_MAX")
        except (OSError, ValueError):
            name_max, path_max = 255, 4096
        too_long = [p for p in self.final.parts if len(p.encode()) > name_max] or longest > name_max
        if too_long or len(str(self.final).encode()) + _RANDOM_SUFFIX + 16 > path_max:
            raise OutputError(
                f"the output path {str(self.final)[:120]}{'...' if len(str(self.final)) > 120 else ''} is too long "
                f"(names up to {name_max - len(PARTIAL_MARKER) - _RANDOM_SUFFIX - 1} bytes, paths up to {path_max})",
                hint="choose a shorter output directory name",
            )

    def __enter__(self) -> OutputDirectory:
        self.check()
        with writing_to(self.final):
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self._handle_leftovers()
            if self.path is None:
                self.path = Path(tempfile.mkdtemp(prefix=f".{self.final.name}{PARTIAL_MARKER}", dir=self.final.parent))
                self._write_marker()
        return self

    def _write_marker(self) -> None:
        marker = self.path / MARKER_FILE
        fd = os.open(marker, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        record = {"out": str(self.final), "pid": os.getpid(), "host": socket.gethostname()}
        record["fingerprint"] = self.fingerprint
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._lock_fd = fd

    def _handle_leftovers(self) -> None:
        """Resume from, remove or mention what interrupted runs left next to OUT."""
        for candidate in sorted(self.final.parent.glob(f".{glob_escape(self.final.name)}{PARTIAL_MARKER}*")):
            if not candidate.is_dir() or candidate.is_symlink():
                continue
            claim = _claim_partial(candidate)
            if claim is None:
                warnings.warn(OutputNotice(_unproven(candidate)), stacklevel=3)
                continue
            fd, record = claim
            if record.get("out") != str(self.final):
                os.close(fd)
                continue
            if self.path is None and self.fingerprint and record.get("fingerprint") == self.fingerprint:
                self.path, self._lock_fd, self.resumed = candidate, fd, True
                continue
            size = _tree_bytes(candidate)
            shutil.rmtree(candidate, ignore_errors=True)
            os.close(fd)
            warnings.warn(
                OutputNotice(
                    f"removed {candidate} ({size / 1e6:.1f} MB), left by an interrupted run of a different "
                    "recipe, options or inputs"
                ),
                stacklevel=3,
            )
        for replaced in self.final.parent.glob(f".{glob_escape(self.final.name)}{REPLACED_MARKER}*"):
            warnings.warn(
                OutputNotice(
                    f"{replaced} holds the previous {self.final.name}, left when a run was killed while replacing "
                    "it; it was not touched: delete it or move it back yourself"
                ),
                stacklevel=3,
            )

    def discard_progress(self, reason: str) -> None:
        """Empty a resumed partial directory (keeping its marker) and start over."""
        assert self.path is not None
        for entry in self.path.iterdir():
            if entry.name != MARKER_FILE:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        self.resumed = False
        warnings.warn(
            OutputNotice(f"discarded the interrupted run's partial output in {self.path}: {reason}"), stacklevel=2
        )

    def commit(self) -> Path:
        """Move the finished directory into place (replacing OUT when overwriting)."""
        assert self.path is not None
        with writing_to(self.final):
            return self._commit()

    def _commit(self) -> Path:
        (self.path / JOURNAL_FILE).unlink(missing_ok=True)
        (self.path / MARKER_FILE).unlink(missing_ok=True)
        os.chmod(self.path, 0o777 & ~_umask())  # mkdtemp made it private; OUT is a normal directory
        trash = None
        if self.final.exists() or self.final.is_symlink():
            if self.final.is_dir() and any(self.final.iterdir()):
                if not self.overwrite:
                    raise OutputError(f"{self.final} appeared while merging; refusing to replace it")
                check_replaceable(self.final)
            trash = self.final.with_name(f".{self.final.name}{REPLACED_MARKER}{os.getpid()}")
            os.rename(self.final, trash)
        try:
            os.rename(self.path, self.final)
        except OSError:
            if trash is not None:
                os.rename(trash, self.final)  # put the old OUT back
            raise
        self.committed = True
        self._unlock()
        if trash is not None:
            if trash.is_symlink() or not trash.is_dir():
                trash.unlink()
            else:
                shutil.rmtree(trash, ignore_errors=True)
        return self.final

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed and self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        self._unlock()


def _claim_partial(directory: Path) -> tuple[int, dict] | None:
    """(locked marker fd, marker record) when ``directory`` is ours and no live run holds it."""
    try:
        fd = os.open(directory / MARKER_FILE, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        record = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
        if isinstance(record, dict):
            return fd, record
    except (OSError, ValueError):
        pass  # locked by a running process, or not our marker
    os.close(fd)
    return None


def _unproven(directory: Path) -> str:
    if (directory / MARKER_FILE).exists():
        return f"{directory} belongs to a run still in progress; it was left alone"
    return f"{directory} looks like an interrupted output but has no mksuite marker; it was left alone"


def _tree_bytes(directory: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path.parent != path:
        path = path.parent
    return path


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def output_directory(
    out: Path | str | OutputDirectory,
    *,
    overwrite: bool,
    inputs: Sequence[RunInput] = (),
    fingerprint: str | None = None,
) -> OutputDirectory:
    """``out`` itself when the caller already made (and checked) it, else a new one for that path;
    either way it knows the run's inputs and fingerprint."""
    if not isinstance(out, OutputDirectory):
        return OutputDirectory(out, overwrite=overwrite, inputs=inputs, fingerprint=fingerprint)
    out.inputs = list(dict.fromkeys([*out.inputs, *inputs]))
    out.fingerprint = fingerprint
    return out
