"""What a partial output already holds, durably: the resume journal and the run fingerprint.

A tensor is journaled only after its bytes are on disk (the shard files are fdatasync'd
first), so after a kill -9 or a power loss every journaled tensor can be trusted and the
next run with the same command writes only the rest. The journal is valid for one
*fingerprint*: a hash of everything that decides the output bytes (the planned layout, each
output's task graph, the seed and device, and every input file's identity: path, size,
mtime, inode). Any change there and the partial directory is discarded.

Journal lines are JSON objects ``{"tensor": name, "crc": [[start, stop, crc32], ...]}``; a
line cut short by the kill is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

JOURNAL_FILE = ".mksuite-journal"
# Group commit: one fdatasync + journal fsync per this many bytes or seconds of finished tensors.
CHECKPOINT_BYTES = 256 * 1024**2
CHECKPOINT_SECONDS = 2.0
# A source held in memory (e.g. mkmoe's gates) is hashed by value up to this size.
_MEMORY_HASH_LIMIT = 256 * 1024**2

_COMMIT = re.compile(r"[0-9a-f]{40}")

Checksums = list[tuple[int, int, int]]  # (row start, row stop, crc32 of those rows' bytes)


def run_fingerprint(layout: Sequence, outputs: Sequence, sources: Mapping[str, object], *, seed: int, device) -> str:
    """A hash of everything that decides the output bytes (see the module docstring)."""
    digest = hashlib.sha256()
    for plan in layout:
        digest.update(plan.filename.encode() + b"\0" + plan.header)
    for output in outputs:
        digest.update(repr((output.name, output.rows, output.task)).encode())
    digest.update(repr((seed, torch.device(device).type)).encode())
    for key in sorted(sources):
        digest.update(key.encode() + b"\0")
        _hash_source(digest, sources[key])
    return digest.hexdigest()


def _hash_source(digest, source) -> None:
    files = source_files(source)
    if files:
        for path in files:
            if _in_hub_snapshot(Path(path)):
                # Its path names the commit, which fixes its bytes, whether it is downloaded yet
                # or not (a run resumed after its shards arrived matches the first).
                digest.update(repr((str(path), "hub snapshot")).encode())
                continue
            stat = os.stat(path)
            digest.update(repr((str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)).encode())
        return
    total = 0
    names = sorted(source.names()) if hasattr(source, "names") else []
    for name in names:
        tensor = source.load(name)
        total += tensor.numel() * tensor.element_size()
        if total > _MEMORY_HASH_LIMIT:
            digest.update(os.urandom(16))  # too big to hash: never resumable
            return
        digest.update(name.encode() + repr((tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    if not names:
        digest.update(repr(type(source)).encode() + os.urandom(16))


def _in_hub_snapshot(path: Path) -> bool:
    """Whether ``path`` lies in a Hugging Face cache snapshot: models--org--name/snapshots/<commit>/."""
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots" and _COMMIT.fullmatch(parts[i + 2]):
            return True
    return False


def source_files(source) -> list[Path]:
    """The files a tensor source reads (a LoRA source: its model's and its adapter's)."""
    found: list[Path] = []
    if hasattr(source, "files") and callable(source.files):
        found.extend(Path(p) for p in source.files())
    elif getattr(source, "path", None) is not None:
        found.append(Path(source.path))
    for part in ("base", "adapter"):
        inner = getattr(source, part, None)
        if inner is not None:
            found.extend(source_files(inner))
    return found


def partial_matches_plan(directory: Path, plans: Sequence) -> bool:
    """Whether a partial directory's shard files have the planned sizes and headers."""
    for plan in plans:
        path = Path(directory) / plan.filename
        try:
            if path.stat().st_size != plan.file_bytes:
                return False
            with open(path, "rb") as handle:
                if handle.read(len(plan.header)) != plan.header:
                    return False
        except OSError:
            return False
    return True


class Journal:
    """Appends finished tensors to the partial directory's journal, durably."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / JOURNAL_FILE
        self._fd: int | None = None
        self.last_checkpoint = time.monotonic()

    def read(self) -> dict[str, Checksums]:
        """Tensors journaled so far (name -> checksums); nothing when there is no journal."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return {}
        done: dict[str, Checksums] = {}
        for line in text.splitlines():
            try:
                entry = json.loads(line)
                done[str(entry["tensor"])] = [tuple(int(v) for v in part) for part in entry.get("crc") or []]
            except (ValueError, KeyError, TypeError):
                continue  # the line being written when the run was killed
        return done

    def append(self, entries: Iterable[tuple[str, Checksums | None]]) -> None:
        lines = "".join(json.dumps({"tensor": name, "crc": crc}) + "\n" for name, crc in entries)
        if not lines:
            return
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        data = lines.encode()
        while data:
            data = data[os.write(self._fd, data) :]
        os.fsync(self._fd)
        self.last_checkpoint = time.monotonic()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
