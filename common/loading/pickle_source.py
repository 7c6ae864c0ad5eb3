"""Legacy `pytorch_model*.bin` checkpoints (torch.save zip format), read without torch.load.

Opening reads the zip directory and `data.pkl` (through the restricted unpickler of
`pickle_restricted`), which yields (storage key, dtype, offset, size, stride) per tensor
and no tensor bytes. `load()` then reads only the byte window a tensor spans from its
storage member (torch stores members uncompressed, so that is one positioned read at the
member's data offset) and copies views out so each result owns just its elements.
"""

from __future__ import annotations

import os
import struct
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import torch

from mksuite.common.errors import MissingTensorError, TensorFileError, did_you_mean
from mksuite.common.loading.pickle_restricted import RESAVE_HINT, PickledTensor, read_state_dict
from mksuite.common.loading.source import TensorInfo, TensorSource, read_bytes


class PickleCheckpoint(TensorSource):
    """A legacy `torch.save` zip checkpoint, indexed from data.pkl and read lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._fd: int | None = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as error:
            raise TensorFileError(f"cannot open {self.path}: {error.strerror or error}", path=str(self.path)) from error
        self._zip: zipfile.ZipFile | None = None
        self._zip_lock = threading.Lock()
        self._data_offsets: dict[str, int] = {}
        try:
            self._open_archive()
        except OSError as error:  # e.g. a directory, or an I/O error
            self.close()
            raise TensorFileError(f"cannot read {self.path}: {error.strerror or error}", path=str(self.path)) from error
        except BaseException:
            self.close()
            raise

    def _open_archive(self) -> None:
        if not zipfile.is_zipfile(self.path):
            raise _not_a_zip_error(self.path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as error:
            raise TensorFileError(f"{self.path} is a damaged zip archive: {error}", path=str(self.path)) from error
        members = {info.filename: info for info in self._zip.infolist()}
        pickles = sorted((n for n in members if n == "data.pkl" or n.endswith("/data.pkl")), key=len)
        if not pickles:
            raise TensorFileError(
                f"{self.path} is a zip archive without data.pkl, so not a torch checkpoint",
                path=str(self.path),
            )
        prefix = pickles[0][: -len("data.pkl")]
        self._big_endian = _read_byteorder(self._zip, members, prefix) == "big"
        records = read_state_dict(self._zip.read(pickles[0]), self.path)
        self._storages = {}
        for name, record in records.items():
            member = members.get(f"{prefix}data/{record.storage_key}")
            if member is None:
                raise TensorFileError(
                    f"{self.path}: tensor `{name}` refers to storage {record.storage_key!r}, which the archive lacks",
                    path=str(self.path),
                )
            needed = (record.storage_offset + record.span) * record.dtype.itemsize
            if record.span and needed > member.file_size:
                raise TensorFileError(
                    f"truncated: tensor `{name}` needs bytes up to {needed} of storage "
                    f"{record.storage_key!r} but {self.path} stores {member.file_size}",
                    path=str(self.path),
                )
            self._storages[record.storage_key] = member
        self._records = records

    def names(self) -> list[str]:
        return list(self._records)

    def __contains__(self, name: object) -> bool:
        return name in self._records

    def info(self, name: str) -> TensorInfo:
        record = self._record(name)
        return TensorInfo(name, record.dtype, record.size)

    def load(self, name: str) -> torch.Tensor:
        record = self._record(name)
        if record.span == 0:
            return torch.empty(record.size, dtype=record.dtype)
        width = record.dtype.itemsize
        start, nbytes = record.storage_offset * width, record.span * width
        raw = self._read_storage(record.storage_key, start, nbytes, name)
        if self._big_endian != (sys.byteorder == "big") and width > 1:
            raw = raw.view(-1, width).flip(-1).contiguous().view(-1)
        flat = raw.view(record.dtype)
        strided = flat.as_strided(record.size, record.stride)
        if strided.is_contiguous():
            return flat.view(record.size)
        # A view (slice, transpose, shared storage): copy out so the result owns only its data.
        return strided.contiguous()

    def close(self) -> None:
        with self._zip_lock:
            if self._zip is not None:
                self._zip.close()
                self._zip = None
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _record(self, name: str) -> PickledTensor:
        try:
            return self._records[name]
        except KeyError:
            raise MissingTensorError(
                f"tensor `{name}` is not in {self.path}", hint=did_you_mean(name, self._records)
            ) from None

    def _read_storage(self, key: str, start: int, nbytes: int, name: str) -> torch.Tensor:
        member = self._storages[key]
        fd = self._fd
        if fd is None:
            raise self._closed_error(name)
        if member.compress_type == zipfile.ZIP_STORED:
            offset = self._data_offsets.get(key)
            if offset is None:
                offset = self._data_offsets[key] = _member_data_offset(fd, member, self.path)
            return read_bytes(fd, nbytes, offset + start, path=self.path, name=name)
        with self._zip_lock:  # compressed members: zipfile must inflate from the start
            if self._zip is None:
                raise self._closed_error(name)
            with self._zip.open(member) as stream:
                stream.seek(start)
                data = stream.read(nbytes)
        if len(data) != nbytes:
            raise TensorFileError(f"truncated: storage {key!r} of {self.path} ends early", path=str(self.path))
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def _closed_error(self, name: str) -> TensorFileError:
        return TensorFileError(f"{self.path} was closed before tensor `{name}` was read", path=str(self.path))

    def __repr__(self) -> str:
        return f"PickleCheckpoint({str(self.path)!r}, {len(self._records)} tensors)"


def _read_byteorder(archive: zipfile.ZipFile, members: dict, prefix: str) -> str:
    # Archives written before torch recorded byte order are little-endian.
    if f"{prefix}byteorder" not in members:
        return "little"
    return archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()


def _member_data_offset(fd: int, member: zipfile.ZipInfo, path: Path) -> int:
    """Where a stored member's bytes begin: after its local header, whose extra field
    (torch pads it for alignment) may differ in length from the central directory's."""
    header = os.pread(fd, 30, member.header_offset)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise TensorFileError(f"{path}: damaged zip entry for {member.filename}", path=str(path))
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return member.header_offset + 30 + name_len + extra_len


def _not_a_zip_error(path: Path) -> TensorFileError:
    with open(path, "rb") as file:
        head = file.read(4)
    if head.startswith(b"PK"):
        return TensorFileError(
            f"{path} starts like a zip archive but its directory is missing: truncated or damaged",
            path=str(path),
            hint="the file is probably an interrupted download; download it again",
        )
    if head[:1] == b"\x80" or tarfile.is_tarfile(path):
        return TensorFileError(
            f"{path} uses torch's legacy (pre-1.6, non-zip) serialization format, which is not read here",
            path=str(path),
            hint=RESAVE_HINT,
        )
    return TensorFileError(f"{path} is not a torch checkpoint (neither a zip archive nor a pickle)", path=str(path))
