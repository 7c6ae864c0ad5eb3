"""An output directory that appears only when complete.

Everything is written into a hidden sibling directory (``.NAME.partial-*``) and moved into
place by one rename at the end. An exception or Ctrl-C removes the partial directory; a
killed process leaves only a hidden ``.partial`` directory, never something at OUT that
looks like a model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from mksuite.common.errors import OutputError

PARTIAL_MARKER = ".partial-"


class OutputDirectory:
    """Context manager: ``with OutputDirectory(out) as staging: ...; staging.commit()``."""

    def __init__(self, final: Path | str, *, overwrite: bool = False):
        self.final = Path(final).expanduser().absolute()
        self.overwrite = overwrite
        self.path: Path | None = None
        self.committed = False
        self.checked = False

    def check(self) -> OutputDirectory:
        """Fail early (before planning work) if OUT cannot be produced.

        Checked once per object: entry points check the directory they are given before any
        work and hand the object down (``commit`` refuses what appeared since).
        """
        if self.checked:
            return self
        if self.final.exists():
            if not self.final.is_dir():
                raise OutputError(f"{self.final} exists and is not a directory")
            if any(self.final.iterdir()) and not self.overwrite:
                raise OutputError(
                    f"{self.final} already exists and is not empty",
                    hint="choose another output directory or pass --overwrite to replace it",
                )
        parent = self.final.parent
        if parent.exists() and not os.access(parent, os.W_OK):
            raise OutputError(f"cannot write into {parent}")
        self.checked = True
        return self

    def __enter__(self) -> OutputDirectory:
        self.check()
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.final.name}{PARTIAL_MARKER}", dir=self.final.parent))
        self.path.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; OUT follows the umask like any mkdir
        return self

    def commit(self) -> Path:
        """Move the finished directory into place (replacing OUT when overwriting)."""
        assert self.path is not None
        trash = None
        if self.final.exists():
            if any(self.final.iterdir()) and not self.overwrite:
                raise OutputError(f"{self.final} appeared while merging; refusing to replace it")
            trash = self.final.with_name(f".{self.final.name}.replaced-{os.getpid()}")
            os.rename(self.final, trash)
        os.rename(self.path, self.final)
        self.committed = True
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return self.final

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed and self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)


def output_directory(out: Path | str | OutputDirectory, *, overwrite: bool) -> OutputDirectory:
    """``out`` itself when the caller already made (and checked) it, else a new one for that path."""
    return out if isinstance(out, OutputDirectory) else OutputDirectory(out, overwrite=overwrite)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask
