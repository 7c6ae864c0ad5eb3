"""Keep the allocator from page-faulting every tensor in, and from hoarding freed memory (glibc only).

Two costs pull against each other. glibc hands blocks above its mmap threshold straight to the
kernel and back: every such tensor is fresh pages, and faulting them in cost more than the
math itself (measured: a float32 multiply of 11.5M elements took 3.9 ms into an existing
buffer and 25 ms into a fresh one; a 1.1B slerp took 3.6M page faults). Blocks below the
threshold come from heap arenas and are reused without faults, but freed arena memory is
rarely handed back, so RSS keeps the high-water mark of everything ever alive.

So the executor (:func:`configure_allocator`) fixes the mmap threshold at glibc's largest
(32 MiB: the engine merges big tensors in row blocks below that, so nearly every tensor is a
heap block, reused), lets freed heap memory stay until the next trim, and calls
:func:`trim_freed_memory` every :data:`TRIM_EVERY_BYTES` of output: ``malloc_trim`` returns
the free pages of every arena to the kernel, so RSS tracks the tensors in flight.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache

# Bytes of output between trims: rare enough that reused blocks seldom fault again, often
# enough that RSS follows the working set (measured on 1.1B merges: ~1 GB peak either way).
TRIM_EVERY_BYTES = 2 * 1024**3
# glibc's ceiling for M_MMAP_THRESHOLD on 64-bit: blocks below it may come from the heap.
HEAP_BLOCK_LIMIT = 32 * 1024**2
# Free memory at the top of the heap kept for reuse between trims.
HEAP_TOP_KEPT = 1024**3

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - glibc, not musl
        return libc
    except (OSError, AttributeError):
        return None


@cache
def configure_allocator() -> bool:
    """Serve blocks below 32 MiB from the heap and keep freed ones for reuse (once per process).

    False where the allocator is not glibc's.
    """
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, HEAP_TOP_KEPT)
    )


def trim_freed_memory() -> bool:
    """Hand free heap pages back to the kernel; False where the allocator cannot."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
