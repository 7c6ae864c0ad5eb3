"""What every weight file offers: tensor metadata without data, and one tensor on demand."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from mksuite.common.errors import TensorFileError
from mksuite.common.loading.buffers import READ_BUFFERS


@dataclass(frozen=True)
class TensorInfo:
    """Name, dtype and shape of a stored tensor, known from headers alone."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@runtime_checkable
class TensorSource(Protocol):
    """One checkpoint file or a set of shards, read lazily.

    `info` touches metadata only. `load` returns a fresh, owned, contiguous CPU tensor and
    may be called concurrently from several reader threads.
    """

    def names(self) -> list[str]: ...

    def __contains__(self, name: object) -> bool: ...

    def info(self, name: str) -> TensorInfo: ...

    def load(self, name: str) -> torch.Tensor: ...

    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def load_rows(source: TensorSource, name: str, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of a tensor as a fresh, owned tensor.

    Sources that can read a row range directly (safetensors: rows are contiguous bytes)
    provide ``load_rows``; for the others the whole tensor is read and the rows copied out.
    """
    direct = getattr(source, "load_rows", None)
    if direct is not None:
        return direct(name, start, stop)
    return source.load(name)[start:stop].clone()


@dataclass(frozen=True)
class ByteRange:
    """Where a stored tensor's bytes (or a row block's) lie in a file, exactly as they are stored."""

    path: os.PathLike
    fd: int
    offset: int
    nbytes: int


def byte_range(source: TensorSource, name: str, rows: tuple[int, int] | None = None) -> ByteRange | None:
    """The file bytes of a tensor (or of rows ``[start, stop)``), when they can be copied verbatim.

    Only sources that store tensors as plain little-endian bytes on a little-endian host can say
    (safetensors); for the others (pickles, LoRA-applied weights) this is None and the tensor
    has to be loaded.
    """
    locate = getattr(source, "byte_range", None)
    return None if locate is None else locate(name, rows)


def read_bytes(fd: int, nbytes: int, offset: int, *, path: os.PathLike, name: str) -> torch.Tensor:
    """A uint8 tensor holding `nbytes` read from `fd` at `offset` (in a fresh or reused buffer)."""
    buffer = READ_BUFFERS.take(nbytes)
    read_into(fd, buffer, offset, path=path, name=name)
    return buffer


def read_into(fd: int, buffer: torch.Tensor, offset: int, *, path: os.PathLike, name: str) -> None:
    """Fill the contiguous uint8 CPU tensor ``buffer`` with the bytes of `fd` from `offset` on.

    Reads straight into the tensor's memory (no intermediate bytes object) and loops,
    because one positioned read may return short (Linux caps a read near 2 GiB).
    """
    nbytes = buffer.numel()
    view = memoryview(buffer.numpy()).cast("B")
    done = 0
    while done < nbytes:
        try:
            if hasattr(os, "preadv"):
                count = os.preadv(fd, [view[done:]], offset + done)
            else:
                chunk = os.pread(fd, min(nbytes - done, 1 << 30), offset + done)
                count = len(chunk)
                view[done : done + count] = chunk
        except OSError as error:
            raise TensorFileError(
                f"cannot read tensor `{name}` from {path}: {error.strerror or error}", path=str(path)
            ) from error
        if count == 0:
            raise TensorFileError(
                f"truncated: tensor `{name}` needs bytes up to {offset + nbytes} but {path} ended at {offset + done}",
                path=str(path),
                hint="the file is damaged or an interrupted download; download it again",
            )
        done += count
