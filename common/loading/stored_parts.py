"""A source that shows pieces of stored tensors under the names a description uses.

An MoE checkpoint in transformers' in-memory layout stores each layer's experts fused
(``experts.gate_up_proj`` [E, 2I, H]); descriptions name them per expert, as
``save_pretrained`` writes them (``experts.3.gate_proj.weight`` [I, H]). One expert's band of
rows is contiguous in the file, so each piece is read by offset like any stored tensor (or
as a row block of one), and copied verbatim where the output keeps its bytes. The fused
tensors themselves are no longer listed: every byte of them is listed as some piece.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping

import torch

from mksuite.common.arch.stored_layout import StoredPart
from mksuite.common.errors import ShapeMismatchError
from mksuite.common.loading.buffers import typed_view
from mksuite.common.loading.source import ByteRange, TensorInfo, TensorSource, byte_range, read_bytes


class StoredPartSource(TensorSource):
    """``inner`` with each stored tensor that ``parts`` splits listed as its pieces instead."""

    def __init__(self, inner: TensorSource, parts: Mapping[str, StoredPart], *, model: str):
        self.inner = inner
        self._parts = dict(parts)
        self._infos = {
            name: _piece_info(name, part, inner.info(part.stored), model) for name, part in self._parts.items()
        }
        _check_complete(self._parts, inner, model)
        pieces: dict[str, list[str]] = {}
        for name, part in self._parts.items():
            pieces.setdefault(part.stored, []).append(name)
        listed: list[str] = []
        for name in inner.names():
            listed.extend(pieces.get(name, (name,)))
        self._names = list(dict.fromkeys(listed))
        self._listed = set(self._names)

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._listed

    def info(self, name: str) -> TensorInfo:
        if name in self._infos:
            return self._infos[name]
        return self.inner.info(name)

    def load(self, name: str) -> torch.Tensor:
        if name not in self._parts:
            return self.inner.load(name)
        return self.load_rows(name, 0, self._infos[name].shape[0])

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name not in self._parts:
            direct = getattr(self.inner, "load_rows", None)
            return direct(name, start, stop) if direct else self.inner.load(name)[start:stop].clone()
        info = self._infos[name]
        where = self.byte_range(name, (start, stop))
        if where is None:  # not plain bytes (a pickle, an adapter applied): load the whole and cut
            part = self._parts[name]
            first = self._first_row(part) + start
            whole = self.inner.load(part.stored)
            return whole.reshape(-1, *info.shape[1:])[first : first + stop - start].clone()
        buffer = read_bytes(where.fd, where.nbytes, where.offset, path=where.path, name=name)
        return typed_view(buffer, info.dtype, (stop - start, *info.shape[1:]))

    def byte_range(self, name: str, rows: tuple[int, int] | None = None) -> ByteRange | None:
        if name not in self._parts:
            return byte_range(self.inner, name, rows)
        if sys.byteorder != "little":
            return None
        part, info = self._parts[name], self._infos[name]
        start, stop = rows if rows is not None else (0, info.shape[0])
        if not 0 <= start <= stop <= info.shape[0]:
            raise ValueError(f"rows [{start}, {stop}) of tensor `{name}` with shape {list(info.shape)}")
        whole = byte_range(self.inner, part.stored)
        if whole is None:
            return None
        row_bytes = math.prod(info.shape[1:]) * info.dtype.itemsize
        offset = whole.offset + (self._first_row(part) + start) * row_bytes
        return ByteRange(whole.path, whole.fd, offset, (stop - start) * row_bytes)

    def _first_row(self, part: StoredPart) -> int:
        """The piece's first row, counting rows of the stored tensor with its first two dims flattened."""
        stored = self.inner.info(part.stored).shape
        if part.expert is None:
            return 0
        band = stored[1] // part.parts
        return part.expert * stored[1] + part.part * band

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return f"StoredPartSource({self.inner!r}, {len(self._parts)} pieces)"


def _piece_info(name: str, part: StoredPart, stored: TensorInfo, model: str) -> TensorInfo:
    if part.expert is None:
        return TensorInfo(name, stored.dtype, stored.shape)
    shape = stored.shape
    if len(shape) < 2 or part.expert >= shape[0] or shape[1] % part.parts:
        raise ShapeMismatchError(
            f"{model}: `{part.stored}` has shape {list(shape)}, which cannot hold `{name}` "
            f"(expert {part.expert}, row band {part.part + 1} of {part.parts})",
            hint="check the model's expert count and sizes in config.json against its weights",
        )
    return TensorInfo(name, stored.dtype, (shape[1] // part.parts, *shape[2:]))


def _check_complete(parts: Mapping[str, StoredPart], inner: TensorSource, model: str) -> None:
    """Each split tensor is covered exactly by its pieces: no expert is dropped unseen."""
    pieces: dict[str, set[tuple[int, int]]] = {}
    for part in parts.values():
        if part.expert is not None:
            pieces.setdefault(part.stored, set()).add((part.expert, part.part))
    for stored, seen in pieces.items():
        shape = inner.info(stored).shape
        count = next(p.parts for p in parts.values() if p.stored == stored)
        if len(seen) != shape[0] * count:
            experts = len({expert for expert, _ in seen})
            raise ShapeMismatchError(
                f"{model}: `{stored}` stacks {shape[0]} experts, but the model's config describes {experts}",
                hint="fix the expert count in config.json (num_local_experts / num_experts) to match the weights",
            )
