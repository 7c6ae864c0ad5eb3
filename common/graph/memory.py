"""Keep freed tensor memory from lingering in the process (glibc only).

glibc serves allocations below its mmap threshold from heap arenas and raises that threshold
(up to 32 MB) each time a large block is freed, so layer-sized tensors soon all come from
arenas, and freed arena memory is rarely handed back: the process keeps the high-water mark
of every tensor that was ever alive, and peak RSS creeps up with model size. Forcing every
buffer into its own mapping fixes that but costs a page fault per fresh page (measured: ~50%
more wall time on 2 cores). Instead the executor calls :func:`trim_freed_memory` every few
hundred megabytes of work: ``malloc_trim`` returns the free pages of every arena to the
kernel, so RSS tracks the tensors in flight at the cost of one sweep per trim.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache

# Bytes of output between trims: small enough to bound the creep, large enough to be cheap.
TRIM_EVERY_BYTES = 256 * 1024**2


@cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def trim_freed_memory() -> bool:
    """Hand free heap pages back to the kernel; False where the allocator cannot."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
