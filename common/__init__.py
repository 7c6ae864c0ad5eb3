"""The engine shared by mkmerge, mkstack and mkmoe.

Speed/memory trade-off left to the user: ``THP_MEM_ALLOC_ENABLE=1`` (read by torch at its first
allocation) puts big tensor buffers on transparent huge pages. Fresh buffers then fault in per
2 MiB instead of per 4 KiB (measured ~20% faster merges on a 16-core VM) but peak RSS rises by
~300 MB (0.5B linear merge: 955 -> 1295 MB), so it is off by default; read buffers are reused
instead (common/loading/buffers.py), which saves most of the faults at no memory cost.
"""
