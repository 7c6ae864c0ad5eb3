"""Reused read buffers: a tensor read into memory the process already has costs no page faults.

Every tensor is read by offset into a buffer the process owns. A fresh buffer's pages are
faulted in (and zeroed by the kernel) on first touch, which costs as much as the read itself;
model tensors come in a handful of sizes that repeat every layer, so a buffer whose tensor is
no longer needed is kept, by size, for the next read of that size. The pool holds at most
``max_bytes`` of idle buffers (the oldest sizes make room for new ones), so it adds a bounded
amount to peak memory, and the executor empties it when a run ends.

A buffer comes back only when nothing else can still see it: the executor offers a loaded
tensor when its last consumer has run, and the pool takes it only if no other tensor shares
its storage (a view, an output that is the input itself) and no other Python reference holds
it. Where torch offers no way to tell, nothing is pooled.
"""

from __future__ import annotations

import sys
import threading

import torch

DEFAULT_POOL_BYTES = 128 * 1024**2


def _storage_users(tensor: torch.Tensor) -> int | None:
    counter = getattr(torch._C, "_storage_Use_Count", None)
    if counter is None:
        return None
    try:
        return counter(tensor.untyped_storage()._cdata)
    except (RuntimeError, AttributeError, TypeError):
        return None


class BufferPool:
    """Idle CPU storages by exact size, at most ``max_bytes`` of them."""

    def __init__(self, max_bytes: int = DEFAULT_POOL_BYTES):
        self.max_bytes = max_bytes
        self._free: dict[int, list[torch.UntypedStorage]] = {}
        self._held = 0
        self._lock = threading.Lock()
        self._ours: set[int] = set()  # addresses of the buffers this pool handed out
        self.reused = 0  # buffers handed out again (for tests and benchmarks)

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of ``nbytes`` with arbitrary contents: reused memory if some is idle."""
        with self._lock:
            idle = self._free.get(nbytes)
            storage = idle.pop() if idle else None
            if idle is not None and not idle:
                del self._free[nbytes]
            if storage is not None:
                self._held -= nbytes
                self.reused += 1
        if storage is None:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
            with self._lock:
                self._ours.add(buffer.data_ptr())
            return buffer
        return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,))

    def give(self, tensor: torch.Tensor) -> bool:
        """Keep ``tensor``'s memory for a later read if nothing else can see it; True if kept.

        Only a tensor that owns its whole storage (see :func:`typed_view`) qualifies. The
        caller must drop its own reference afterwards.
        """
        # References: the caller's variable, this argument, getrefcount's own.
        if sys.getrefcount(tensor) > 3 or tensor._base is not None or tensor.device.type != "cpu":
            return False
        if tensor.storage_offset() != 0 or not tensor.is_contiguous():
            return False
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._ours:  # e.g. a file mapping: not ours to keep
            return False
        nbytes = storage.nbytes()
        if nbytes == 0 or nbytes != tensor.numel() * tensor.element_size():
            return False
        if _storage_users(tensor) != 2:  # this tensor and the probe's own storage object
            return False
        if nbytes > self.max_bytes:
            return False
        with self._lock:
            while self._held + nbytes > self.max_bytes:  # make room: drop the oldest idle buffers
                oldest = next(iter(self._free))
                dropped = self._free[oldest].pop(0)
                self._held -= dropped.nbytes()
                if not self._free[oldest]:
                    del self._free[oldest]
            self._free.setdefault(nbytes, []).append(storage)
            self._held += nbytes
        return True

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._ours.clear()
            self._held = 0


def typed_view(buffer: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
    """``buffer``'s bytes as a tensor of ``dtype`` and ``shape`` that owns the storage itself.

    Unlike ``buffer.view(dtype).reshape(shape)`` the result is no view of ``buffer`` (it has
    no ``_base``), so once ``buffer`` is gone it is the storage's only user and can go back
    to the pool.
    """
    return torch.empty(0, dtype=dtype).set_(buffer.untyped_storage(), 0, tuple(shape))


READ_BUFFERS = BufferPool()
"""The pool every tensor source reads into and the executor returns finished inputs to."""
