"""One `.safetensors` file: header parsed and validated at open, tensors read by offset.

A tensor of at least MAP_MIN_BYTES is a private, copy-on-write mapping of its own bytes
(:func:`mapped_bytes`): the page cache's pages are mapped rather than copied, which on this
2-core machine made reading a 1.1B model ~4x cheaper in CPU than copying it into buffers. The
mapping lives exactly as long as the tensor, so its pages count toward RSS only while the
tensor is in flight (a mapping of the whole file would keep every page touched). Smaller
tensors are read with `os.preadv` into owned (pooled) buffers, where a mapping costs more
than it saves. `pread` needs no shared file position, so concurrent loads need no lock.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from mksuite.common.dtypes import SAFETENSORS_DTYPES
from mksuite.common.errors import MissingTensorError, TensorFileError, did_you_mean
from mksuite.common.loading.buffers import typed_view
from mksuite.common.loading.source import ByteRange, TensorInfo, TensorSource, read_bytes

# Tensors of at least this many bytes are mapped rather than read (see mapped_bytes).
MAP_MIN_BYTES = 1024**2

# The reference implementation refuses headers above 100 MB; a larger length field means
# the file is not safetensors (or its first bytes are damaged).
MAX_HEADER_BYTES = 100_000_000


class SafetensorsFile(TensorSource):
    """A single safetensors file; `metadata` is its `__metadata__` string map."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._fd: int | None = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as error:
            raise TensorFileError(f"cannot open {self.path}: {error.strerror or error}", path=str(self.path)) from error
        self._close_lock = threading.Lock()
        try:
            size = os.fstat(self._fd).st_size
            fd = self._fd
            self.metadata, self._entries, self._data_start = read_header(
                lambda count, offset: os.pread(fd, count, offset), size, self.path
            )
        except OSError as error:  # e.g. a directory, or an I/O error
            self.close()
            raise TensorFileError(f"cannot read {self.path}: {error.strerror or error}", path=str(self.path)) from error
        except BaseException:
            self.close()
            raise

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def info(self, name: str) -> TensorInfo:
        return self._entry(name)[0]

    def load(self, name: str) -> torch.Tensor:
        info, begin = self._entry(name)
        fd = self._fd
        if fd is None:
            raise TensorFileError(f"{self.path} was closed before tensor `{name}` was read", path=str(self.path))
        buffer = self._bytes(fd, info.nbytes, self._data_start + begin, name)
        if sys.byteorder != "little":
            buffer = _to_native(buffer, info.dtype)
        return typed_view(buffer, info.dtype, info.shape)

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of a tensor: one contiguous positioned read, nothing else."""
        info, offset, nbytes = self._span(name, (start, stop))
        fd = self._fd
        if fd is None:
            raise TensorFileError(f"{self.path} was closed before tensor `{name}` was read", path=str(self.path))
        buffer = self._bytes(fd, nbytes, offset, name)
        if sys.byteorder != "little":
            buffer = _to_native(buffer, info.dtype)
        return typed_view(buffer, info.dtype, (stop - start, *info.shape[1:]))

    def _bytes(self, fd: int, nbytes: int, offset: int, name: str) -> torch.Tensor:
        if nbytes >= MAP_MIN_BYTES and sys.byteorder == "little":
            return mapped_bytes(fd, nbytes, offset)
        return read_bytes(fd, nbytes, offset, path=self.path, name=name)

    def byte_range(self, name: str, rows: tuple[int, int] | None = None) -> ByteRange | None:
        """Where the tensor's bytes (or rows ``[start, stop)`` of it) lie in this file.

        None on a big-endian host, where stored bytes are not the tensor's native bytes.
        """
        if sys.byteorder != "little" or self._fd is None:
            return None
        _, offset, nbytes = self._span(name, rows)
        return ByteRange(self.path, self._fd, offset, nbytes)

    def _span(self, name: str, rows: tuple[int, int] | None) -> tuple[TensorInfo, int, int]:
        """(info, file offset, byte count) of a tensor, or of rows ``[start, stop)`` of it."""
        info, begin = self._entry(name)
        offset = self._data_start + begin
        if rows is None:
            return info, offset, info.nbytes
        start, stop = rows
        if not info.shape or not 0 <= start <= stop <= info.shape[0]:
            raise ValueError(f"rows [{start}, {stop}) of tensor `{name}` with shape {list(info.shape)}")
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        return info, offset + start * row_bytes, (stop - start) * row_bytes

    def close(self) -> None:
        with self._close_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _entry(self, name: str) -> tuple[TensorInfo, int]:
        try:
            return self._entries[name]
        except KeyError:
            raise MissingTensorError(
                f"tensor `{name}` is not in {self.path}", hint=did_you_mean(name, self._entries)
            ) from None

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self._entries)} tensors)"


def read_header(
    read: Callable[[int, int], bytes], size: int, path: Path | str
) -> tuple[dict[str, str], dict[str, tuple[TensorInfo, int]], int]:
    """Parse and validate the header: (metadata, name -> (info, data begin), data start).

    ``read(count, offset)`` returns bytes of the file (a positioned read of a local file, or
    a range request to the Hub); ``size`` is the file's length; ``path`` names it in errors.
    """

    def corrupt(what: str) -> TensorFileError:
        return TensorFileError(
            f"corrupt header in {path}: {what}",
            path=str(path),
            hint="the file is damaged or not a safetensors file; download or convert it again",
        )

    if size < 8:
        raise TensorFileError(
            f"truncated: {path} has {size} bytes, too few for a safetensors header length",
            path=str(path),
            hint="the file is damaged or an interrupted download; download it again",
        )
    (header_len,) = struct.unpack("<Q", read(8, 0))
    if header_len > MAX_HEADER_BYTES:
        raise corrupt(f"header length field says {header_len} bytes (limit {MAX_HEADER_BYTES})")
    if 8 + header_len > size:
        raise TensorFileError(
            f"truncated: {path} header needs bytes up to {8 + header_len} but file has {size}",
            path=str(path),
            hint="the file is damaged or an interrupted download; download it again",
        )
    raw = read(header_len, 8)
    if len(raw) != header_len:
        raise TensorFileError(
            f"truncated: reading the {header_len}-byte header of {path} returned {len(raw)} bytes", path=str(path)
        )
    header = _parse_json_header(raw, corrupt)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt("`__metadata__` is not an object of strings")
    data_start = 8 + header_len
    data_size = size - data_start
    entries = {}
    spans = []
    for name, entry in header.items():
        info, begin, end = _parse_entry(name, entry, corrupt)
        if end > data_size:
            raise TensorFileError(
                f"truncated: tensor `{name}` needs bytes up to {data_start + end} but file {path} has {size}",
                path=str(path),
                hint="the file is damaged or an interrupted download; download it again",
            )
        entries[name] = (info, begin)
        spans.append((begin, end, name))
    _check_layout(spans, data_size, corrupt)
    return metadata, entries, data_start


def _parse_json_header(raw: bytes, corrupt) -> dict:
    """The header's JSON object; duplicate keys, NaN/Infinity and absurd nesting are corrupt."""

    def unique_keys(pairs: list[tuple[str, object]]) -> dict:
        result = {}
        for key, value in pairs:
            if key in result:
                raise corrupt(f"`{key}` appears twice in the header")
            result[key] = value
        return result

    def no_constants(token: str):
        raise corrupt(f"header holds the non-JSON number {token}")

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys, parse_constant=no_constants)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise corrupt(f"header is not valid JSON ({error})") from None
    except RecursionError:
        raise corrupt("header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise corrupt(f"header is a JSON {type(header).__name__}, expected an object")
    return header


def _check_layout(spans: list[tuple[int, int, str]], data_size: int, corrupt) -> None:
    """Tensors tile the data section: in order, no overlap, no gap, nothing after the last.

    An overlap would let one tensor silently alias another's bytes; a gap or trailing bytes
    mean the header does not describe the file (the reference implementation refuses both).
    """
    position, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < position:
            raise corrupt(f"tensors `{previous}` and `{name}` overlap (bytes {begin} to {position} of the data)")
        if begin > position:
            after = f"after tensor `{previous}`" if previous else "before the first tensor"
            raise corrupt(
                f"{begin - position} unused bytes in the data section {after} (tensor `{name}` starts at {begin})"
            )
        position, previous = end, name
    if position != data_size:
        after = f"after the last tensor `{previous}`" if previous else "but no tensors"
        raise corrupt(f"the data section has {data_size - position} bytes {after}")


def _parse_entry(name: str, entry: object, corrupt) -> tuple[TensorInfo, int, int]:
    if not isinstance(entry, dict):
        raise corrupt(f"entry for `{name}` is not an object")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if code not in SAFETENSORS_DTYPES:
        supported = ", ".join(SAFETENSORS_DTYPES)
        raise corrupt(f"tensor `{name}` has unsupported dtype {code!r} (supported: {supported})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise corrupt(f"tensor `{name}` has invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise corrupt(f"tensor `{name}` has invalid data_offsets {offsets!r}")
    info = TensorInfo(name, SAFETENSORS_DTYPES[code], tuple(shape))
    begin, end = offsets
    if end - begin != info.nbytes:
        raise corrupt(
            f"tensor `{name}` is {code}{list(shape)} = {info.nbytes} bytes but data_offsets span {end - begin}"
        )
    return info, begin, end


def mapped_bytes(fd: int, nbytes: int, offset: int) -> torch.Tensor:
    """A uint8 tensor over ``nbytes`` of the file at ``offset``: a private (copy-on-write) mapping.

    The page cache's pages are mapped, not copied (reading a 2.2 GB model this way costs a
    fraction of copying it into buffers); a write to the tensor copies just the page written.
    The mapping lives exactly as long as the tensor, so mapped pages count toward RSS only
    while the tensor is in flight. The file's size was checked against its header at open.
    """
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    mapping = mmap.mmap(fd, nbytes + offset - start, access=mmap.ACCESS_COPY, offset=start)
    return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=offset - start)


def _to_native(buffer: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Byte-swap little-endian element data on a big-endian host."""
    width = dtype.itemsize
    if width == 1 or buffer.numel() == 0:
        return buffer
    return buffer.view(-1, width).flip(-1).contiguous().view(-1)
