"""Sharded safetensors output whose layout is decided before any tensor exists.

Names, dtypes and shapes of every output tensor are known from the plan, so the shard split,
each file's header and every tensor's byte offset are computed up front
(:func:`plan_shards`). Tensors are then written straight to their offsets as they are
computed, in any order: no shard is ever buffered in memory. The writer is an explicit state
machine (planned -> open -> finished) that refuses calls out of order, unknown or repeated
tensors, and tensors whose dtype or shape differ from the plan.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import math
import os
import struct
import sys
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from mksuite.common.dtypes import SAFETENSORS_CODES
from mksuite.common.errors import TensorFileError
from mksuite.common.loading.source import ByteRange, TensorInfo
from mksuite.common.writing import test_hooks
from mksuite.common.writing.journal import CHECKPOINT_BYTES, CHECKPOINT_SECONDS, Checksums, Journal

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    tensors: tuple[TensorInfo, ...]
    offsets: tuple[int, ...]  # data offset of each tensor, relative to the data section
    header: bytes  # 8-byte length prefix + padded JSON

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def file_bytes(self) -> int:
        return len(self.header) + self.data_bytes


def split_into_shards(tensors: Sequence[TensorInfo], max_shard_bytes: int) -> list[list[TensorInfo]]:
    """Greedy split in order: a shard closes when the next tensor would overflow it."""
    shards: list[list[TensorInfo]] = []
    current: list[TensorInfo] = []
    size = 0
    for tensor in tensors:
        if current and size + tensor.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(tensor)
        size += tensor.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def _header(tensors: Sequence[TensorInfo], metadata: dict[str, str]) -> tuple[bytes, tuple[int, ...]]:
    entries: dict[str, object] = {"__metadata__": dict(metadata)}
    offsets = []
    position = 0
    for tensor in tensors:
        if tensor.dtype not in SAFETENSORS_CODES:
            raise ValueError(f"safetensors cannot store dtype {tensor.dtype} ({tensor.name})")
        entries[tensor.name] = {
            "dtype": SAFETENSORS_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [position, position + tensor.nbytes],
        }
        offsets.append(position)
        position += tensor.nbytes
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * ((8 - (8 + len(body)) % 8) % 8)  # keep the data section 8-byte aligned
    return struct.pack("<Q", len(body)) + body, tuple(offsets)


def plan_shards(
    tensors: Sequence[TensorInfo],
    max_shard_bytes: int,
    metadata: dict[str, str] | None = None,
) -> list[ShardPlan]:
    """Decide files, headers and offsets for ``tensors`` (in the given order)."""
    metadata = {"format": "pt", **(metadata or {})}
    groups = split_into_shards(tensors, max_shard_bytes)
    count = len(groups)
    plans = []
    for number, group in enumerate(groups, start=1):
        filename = SINGLE_FILE if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
        header, offsets = _header(group, metadata)
        plans.append(ShardPlan(filename, tuple(group), offsets, header))
    return plans


def index_json(plans: Sequence[ShardPlan], extra_metadata: dict[str, object] | None = None) -> dict:
    """The ``model.safetensors.index.json`` content for a multi-shard layout."""
    weight_map = {t.name: plan.filename for plan in plans for t in plan.tensors}
    metadata = {"total_size": sum(p.data_bytes for p in plans), **(extra_metadata or {})}
    return {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}


class ShardedWriter:
    """Writes planned tensors straight to their offsets; refuses anything off-plan.

    With a ``journal``, finished tensors are recorded once their bytes are durable, so a
    killed run can resume (common/writing/journal.py). With ``checksums``, a crc32 of every
    tensor's bytes as written is kept for ``--verify``.
    """

    def __init__(
        self, directory: Path, plans: Sequence[ShardPlan], *, journal: Journal | None = None, checksums: bool = False
    ):
        self.directory = Path(directory)
        self.plans = list(plans)
        self._where: dict[str, tuple[int, int, TensorInfo]] = {}
        for shard, plan in enumerate(self.plans):
            for tensor, offset in zip(plan.tensors, plan.offsets):
                self._where[tensor.name] = (shard, len(plan.header) + offset, tensor)
        self._fds: list[int] = []
        self._written: set[str] = set()  # tensors with every row written
        self._rows_claimed: dict[str, list[tuple[int, int]]] = {}
        self._rows_finished: dict[str, int] = {}
        self.checksums: dict[str, Checksums] | None = {} if checksums else None
        self.journal = journal
        self._pending: list[str] = []  # finished, not yet journaled
        self._pending_bytes = 0
        self._journaled = 0
        self._lock = threading.Lock()
        self._journal_lock = threading.Lock()
        self.state = "planned"

    def open(self, done: Mapping[str, Checksums] | None = None) -> None:
        """Create the shard files, or reopen them to complete the tensors not in ``done``.

        ``done``: tensors a previous run journaled (their files were checked against the
        plan by :func:`partial_matches_plan`).
        """
        if self.state != "planned":
            raise RuntimeError(f"writer.open() called in state {self.state}")
        flags = os.O_RDWR | os.O_CREAT | (0 if done else os.O_TRUNC)
        for plan in self.plans:
            fd = os.open(self.directory / plan.filename, flags, 0o644)
            self._fds.append(fd)
            if not done:
                os.ftruncate(fd, plan.file_bytes)
                _pwrite_all(fd, plan.header, 0)
        for name, crc in (done or {}).items():
            planned = self._where[name][2]
            self._written.add(name)
            self._rows_claimed[name] = [(0, planned.shape[0] if planned.shape else 1)]
            if self.checksums is not None:
                self.checksums[name] = list(crc)
        self._journaled = len(done or {})
        self.state = "open"

    def write(self, name: str, tensor: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """Write a whole planned tensor, or rows ``[start, stop)`` of it (a part).

        Parts of one tensor may come in any order and from any thread; each row is written
        once, and the tensor counts as written when all its rows are.
        """
        shard, offset, span = self._claim(name, rows, tensor.dtype, tuple(tensor.shape))
        crc = None
        if tensor.numel():
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            _pwrite_all(self._fds[shard], memoryview(data), offset)
            start_writeback(self._fds[shard], offset, data.nbytes)
            if self.checksums is not None:
                crc = zlib.crc32(memoryview(data))
        self._finished(name, span, crc or 0)

    def copy(
        self, name: str, rows: tuple[int, int] | None, shape: tuple[int, ...], dtype: torch.dtype, where: ByteRange
    ) -> None:
        """Write a tensor (or part) whose bytes already lie, as stored, in another file.

        The kernel copies file to file (``copy_file_range``): no buffer in this process, so a
        passthrough tensor costs neither memory nor a trip through Python. ``shape`` and
        ``dtype`` are what the source stores at ``where``.
        """
        expected = math.prod(shape) * dtype.itemsize
        if where.nbytes != expected:
            raise ValueError(f"{name}: {dtype} {list(shape)} is {expected} bytes, the source range {where.nbytes}")
        shard, offset, span = self._claim(name, rows, dtype, shape)
        copy_file_bytes(where, self._fds[shard], offset, name=name)
        crc = 0
        if self.checksums is not None:  # of the bytes as they now lie in the output
            crc = file_crc32(self._fds[shard], offset, where.nbytes)
        self._finished(name, span, crc)

    def _claim(
        self, name: str, rows: tuple[int, int] | None, dtype: torch.dtype, shape: tuple[int, ...]
    ) -> tuple[int, int, tuple[int, int]]:
        """Check a write against the plan and reserve its rows: (shard index, file offset, rows)."""
        if self.state != "open":
            raise RuntimeError(f"writer.write() called in state {self.state}")
        if name not in self._where:
            raise KeyError(f"tensor {name} is not in the output plan")
        shard, offset, planned = self._where[name]
        total_rows = planned.shape[0] if planned.shape else 1
        start, stop = rows if rows is not None else (0, total_rows)
        expected = planned.shape if rows is None else (stop - start, *planned.shape[1:])
        if dtype != planned.dtype or tuple(shape) != tuple(expected) or not 0 <= start <= stop <= total_rows:
            raise ValueError(
                f"{name}{'' if rows is None else f' rows [{start}, {stop})'}: planned {planned.dtype} "
                f"{list(expected)} of {list(planned.shape)}, got {dtype} {list(shape)}"
            )
        with self._lock:
            claimed = self._rows_claimed.setdefault(name, [])
            if any(start < b and a < stop for a, b in claimed) or (start == stop and (start, stop) in claimed):
                raise ValueError(f"tensor {name} (rows [{start}, {stop})) written twice")
            claimed.append((start, stop))
        row_bytes = planned.nbytes // total_rows if total_rows else 0
        return shard, offset + start * row_bytes, (start, stop)

    def _finished(self, name: str, rows: tuple[int, int], crc: int) -> None:
        """Record rows whose bytes are written; journal the tensor once all its rows are."""
        planned = self._where[name][2]
        total_rows = planned.shape[0] if planned.shape else 1
        with self._lock:
            if self.checksums is not None:
                self.checksums.setdefault(name, []).append((rows[0], rows[1], crc))
            self._rows_finished[name] = self._rows_finished.get(name, 0) + rows[1] - rows[0]
            if self._rows_finished[name] != total_rows:
                return
            self._written.add(name)
            if self.journal is None:
                return
            self._pending.append(name)
            self._pending_bytes += planned.nbytes
            due = (
                self._pending_bytes >= CHECKPOINT_BYTES
                or time.monotonic() - self.journal.last_checkpoint >= CHECKPOINT_SECONDS
                or test_hooks.checkpoint_every_tensor()
            )
        if due:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Make the finished tensors durable, then journal them (in that order)."""
        if self.journal is None:
            return
        with self._journal_lock:
            with self._lock:
                names, self._pending, self._pending_bytes = self._pending, [], 0
            if not names:
                return
            for fd in self._fds:
                os.fdatasync(fd)
            sums = self.checksums or {}
            self.journal.append((name, sorted(sums[name]) if name in sums else None) for name in names)
            for _ in names:
                self._journaled += 1
                test_hooks.after_journaled(self._journaled)

    def finish(self) -> None:
        """Check completeness, flush to disk and write the index (when sharded)."""
        if self.state != "open":
            raise RuntimeError(f"writer.finish() called in state {self.state}")
        missing = [name for name in self._where if name not in self._written]
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensors were never written, e.g. {missing[0]}")
        for fd in self._fds:
            os.fsync(fd)
        self.close()
        if len(self.plans) > 1:
            with open(self.directory / INDEX_FILE, "w") as handle:
                json.dump(index_json(self.plans), handle, indent=2)
                handle.write("\n")
        self.state = "finished"

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if self.journal is not None:
            self.journal.close()


def file_crc32(fd: int, offset: int, nbytes: int) -> int:
    """crc32 of ``nbytes`` of an open file from ``offset``, read in pieces."""
    crc = 0
    done = 0
    while done < nbytes:
        chunk = os.pread(fd, min(nbytes - done, COPY_CHUNK_BYTES), offset + done)
        if not chunk:
            break
        crc = zlib.crc32(chunk, crc)
        done += len(chunk)
    return crc


# Bytes per copy_file_range call, and per fallback read/write through a buffer.
COPY_CHUNK_BYTES = 64 * 1024**2
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM, errno.EBADF}


def copy_file_bytes(where: ByteRange, fd: int, offset: int, *, name: str) -> None:
    """Copy ``where``'s bytes to ``fd`` at ``offset``, in the kernel where it can."""
    kernel_copy = hasattr(os, "copy_file_range")
    done = 0
    while done < where.nbytes:
        count = min(where.nbytes - done, COPY_CHUNK_BYTES)
        if kernel_copy:
            try:
                copied = os.copy_file_range(where.fd, fd, count, where.offset + done, offset + done)
            except OSError as error:
                if error.errno not in _NO_KERNEL_COPY:
                    raise
                kernel_copy = False  # another filesystem, or a kernel without it: copy through a buffer
                continue
        else:
            chunk = os.pread(where.fd, count, where.offset + done)
            copied = len(chunk)
            _pwrite_all(fd, chunk, offset + done)
        if copied == 0:
            raise TensorFileError(
                f"truncated: tensor `{name}` needs bytes up to {where.offset + where.nbytes} "
                f"but {where.path} ended at {where.offset + done}",
                path=str(where.path),
                hint="the file is damaged or an interrupted download; download it again",
            )
        start_writeback(fd, offset + done, copied)
        done += copied


_SYNC_FILE_RANGE_WRITE = 2


@cache
def _sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing a just-written range to disk now, without waiting.

    Left alone, dirty pages pile up until the kernel throttles the writer (measured here:
    2.2 GB took 1.5-8 s to write, then ~0.9 s to fsync); started range by range, the same
    bytes take ~1 s in all and the final fsync has almost nothing left to do.
    """
    function = _sync_file_range()
    if function is not None and nbytes:
        function(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # advisory: a failure changes nothing


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
