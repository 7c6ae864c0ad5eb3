"""Reading tensors straight into GPU memory through small pinned staging buffers.

With ``--device cuda`` a tensor the GPU will use is not read into a pageable host buffer and
then copied (a copy from pageable memory goes through the driver's own bounce buffer and
blocks the thread that issues it). Instead each reader thread owns a CUDA stream and two
pinned host pieces of :data:`PIECE_BYTES`: the file is read into one piece while the other
is being copied to the device on the thread's stream, so disk (or page cache) reads and
host-to-device transfers overlap, and the compute thread's stream never waits for either.
Pinned memory stays at two pieces per reader thread, whatever the model size.

A tensor handed over is complete (the reader waits for its stream) and was allocated on the
reader's stream; the consumer calls :func:`claim` on its own stream so the caching allocator
does not give the memory to the next read while queued kernels may still use it.

The same code runs on the CPU (no stream, unpinned pieces, synchronous copies), which is how
the piece arithmetic is tested on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from mksuite.common.loading.source import ByteRange, read_into

PIECE_BYTES = 8 * 1024**2

_local = threading.local()


class _Staging:
    """One reader thread's stream, pinned pieces and the events that free them."""

    def __init__(self, device: torch.device, piece_bytes: int):
        cuda = device.type == "cuda"
        self.piece_bytes = piece_bytes
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.pieces = [torch.empty(piece_bytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
        self.copied = [torch.cuda.Event() if cuda else None for _ in range(2)]

    def on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def finish(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


def _staging(device: torch.device) -> _Staging:
    cache: dict | None = getattr(_local, "staging", None)
    if cache is None:
        cache = _local.staging = {}
    key = (str(device), PIECE_BYTES)
    stage = cache.get(key)
    if stage is None:
        stage = cache[key] = _Staging(device, PIECE_BYTES)
    return stage


def read_to_device(
    where: ByteRange, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device, *, name: str
) -> torch.Tensor:
    """The tensor stored as ``where``'s bytes, read piece by piece into memory on ``device``."""
    stage = _staging(device)
    with stage.on_stream():
        out = torch.empty(where.nbytes, dtype=torch.uint8, device=device)
        for index, start in enumerate(range(0, where.nbytes, stage.piece_bytes)):
            slot = index % 2
            event = stage.copied[slot]
            if event is not None:
                event.synchronize()  # the piece's previous copy has left it
            count = min(stage.piece_bytes, where.nbytes - start)
            piece = stage.pieces[slot][:count]
            read_into(where.fd, piece, where.offset + start, path=where.path, name=name)
            out[start : start + count].copy_(piece, non_blocking=True)
            if event is not None:
                event.record(stage.stream)
        stage.finish()
    return out.view(dtype).reshape(shape)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor (one that could not be read by offset: pickles, adapters) on ``device``.

    The copy runs on the reader thread's stream, like a staged read's.
    """
    stage = _staging(device)
    with stage.on_stream():
        moved = tensor.to(device, non_blocking=True)
        stage.finish()
    return moved


def to_host(tensor: torch.Tensor, ready: torch.cuda.Event | None) -> torch.Tensor:
    """A device tensor's values in host memory, copied on the calling thread's own stream.

    ``ready`` was recorded on the producing stream after the tensor's last kernel; the copy
    waits for it there, not on the host, so the thread that computes goes on computing.
    """
    if not tensor.is_cuda:
        return tensor.cpu()
    streams: dict | None = getattr(_local, "streams", None)
    if streams is None:
        streams = _local.streams = {}
    stream = streams.get(tensor.device)
    if stream is None:
        stream = streams[tensor.device] = torch.cuda.Stream(tensor.device)
    with torch.cuda.stream(stream):
        if ready is not None:
            stream.wait_event(ready)
        host = torch.empty(tensor.shape, dtype=tensor.dtype)
        host.copy_(tensor, non_blocking=True)
        stream.synchronize()
    return host


def claim(tensor: torch.Tensor) -> torch.Tensor:
    """Mark a tensor from a reader thread as used on the calling thread's current stream."""
    if tensor.is_cuda:
        tensor.record_stream(torch.cuda.current_stream(tensor.device))
    return tensor
