"""The engine shared by mkmerge, mkstack and mkmoe."""

import os

# Big tensor buffers on transparent huge pages: torch then aligns allocations of 2 MiB and
# more to huge pages and advises the kernel to back them so, which makes the first touch of
# a fresh buffer one page fault per 2 MiB instead of one per 4 KiB (measured: 3-4x less time
# spent faulting in freshly read tensors). torch reads this once, at its first allocation,
# so it is set here, before anything imports torch; a user's own setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
