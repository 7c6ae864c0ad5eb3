"""A merge method's working set: the memory it needs beyond its inputs, for the memory estimate.

Each method declares its own (in its module, counted from its code and checked against
measured peaks); mkmerge/memory_estimate.py adds them up over a plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mkmerge.methods.reductions import BLOCK, CHUNK, CHUNKS_PER_BLOCK, STREAMED_TERMS_MAX

# The largest float32 work buffer the methods allocate (a chunked L1 norm or dot product).
SCRATCH_ELEMENTS = max(BLOCK, CHUNK * CHUNKS_PER_BLOCK)


@dataclass(frozen=True)
class WorkingSet:
    """Memory a merge method needs beyond its inputs, for one output tensor of n elements.

    ``copies`` and ``copies_per_summand`` count whole tensors in the compute dtype alive at
    the method's worst moment (the result included); summands are the inputs other than the
    base (a delta is kept per fine-tune). ``bytes_per_element`` covers temporaries whose
    width does not follow the dtype (float32 copies, int32 keys, bool masks);
    ``scratch_buffers`` are float32 buffers of at most :data:`SCRATCH_ELEMENTS` elements.
    ``stacked`` replaces this set above ``STREAMED_TERMS_MAX`` summands, where the method
    materialises every term and stacks them; ``fused`` replaces it for results of one of
    ``fused_dtypes`` when the fused numba kernels are installed (mkmerge/methods/fused.py).
    """

    copies: float
    copies_per_summand: float = 0.0
    bytes_per_element: float = 0.0
    bytes_per_summand_element: float = 0.0
    scratch_buffers: int = 1
    stacked: WorkingSet | None = None
    fused: WorkingSet | None = None
    fused_dtypes: tuple[torch.dtype, ...] = ()

    def nbytes(self, numel: int, itemsize: int, summands: int, dtype: torch.dtype | None = None) -> int:
        """Bytes for ``summands`` terms of ``numel`` elements of ``itemsize`` bytes (of ``dtype``)."""
        chosen = self.stacked if self.stacked is not None and summands > STREAMED_TERMS_MAX else self
        if self.fused is not None and dtype in self.fused_dtypes and _fused_kernels():
            chosen = self.fused
        per_element = (
            (chosen.copies + chosen.copies_per_summand * summands) * itemsize
            + chosen.bytes_per_element
            + chosen.bytes_per_summand_element * summands
        )
        scratch = chosen.scratch_buffers * min(numel, SCRATCH_ELEMENTS) * 4
        return int(numel * per_element) + scratch


# For a method that declares none: as much as the hungriest declared streaming method (with
# the words of a replayed sort: breadcrumbs, sce).
DEFAULT_WORKING_SET = WorkingSet(copies=2, copies_per_summand=1, bytes_per_element=10, scratch_buffers=3)


def _fused_kernels() -> bool:
    from mkmerge.methods import fused

    return fused.available()
