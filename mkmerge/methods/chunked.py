"""Running a merge method over row blocks of a big tensor, with the bits of the whole-tensor run.

Peak memory must not grow with model size, but the largest tensors (embeddings, the output
head, the MLP matrices of big models) grow with it. So a big tensor is merged as row blocks
("chunks"): rows are contiguous in a safetensors file, so a chunk is one positioned read,
and its result is written at its own offset in the output.

Element-wise methods (linear, task arithmetic, passthrough) merge chunk by chunk directly.
Methods that need whole-tensor quantities (slerp's norms and angle, TIES' top-k threshold,
DARE's L1 rescale) run in **passes**: each statistics pass reads every chunk and returns a
small partial (histograms, lists of partial sums); the partials are combined into a state;
after the last pass the merge pass reads the chunks once more and merges each with that state.
The extra read of the few big tensors costs far less than keeping them resident.

Results are bit-identical to the whole-tensor run: chunks start at multiples of
``reductions.CHUNK`` elements, so fixed-chunk partial sums concatenate to the whole tensor's
partials, histograms add, and every other operation is element-wise. A method declares a
:class:`ChunkedForm` when it can guarantee that; ``passes`` may also decline a particular
call (None), and the tensor is then merged whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import mkmerge.methods.reductions as reductions

ChunkState = Any
"""Whatever a method's statistics passes produce: small (scalars, per-chunk counts)."""


# With the default 8 MiB blocks: tensors up to 32 MiB (the MLP matrices of 1-3B models) are
# read once, not once per pass, at the price of holding their inputs whole, which the
# prefetch budget bounds anyway.
FUSED_CHUNK_FACTOR = 4


@dataclass(frozen=True)
class ChunkedForm:
    """How a method runs on chunks.

    * ``passes(params, per_model, dtype)``: statistics passes needed before merging (0 for
      element-wise work), or None when this call cannot be chunked exactly;
    * ``stats(index, call, state)``: the partial of one chunk in statistics pass ``index``;
    * ``combine(index, partials, state, call)``: the state after pass ``index`` from the
      partials of every chunk, in row order (``call`` carries the parameters, no tensors);
    * ``apply(call, state)``: one chunk of the output.

    ``call`` is a :class:`~mkmerge.methods.MethodCall` over the chunk's rows, with
    ``offset`` (the chunk's first element in the flattened tensor), ``chunk`` (its position)
    and ``full_shape`` set.
    """

    passes: Callable[[Mapping[str, Any], Sequence[Mapping[str, Any]], torch.dtype], int | None]
    apply: Callable[[Any, ChunkState], torch.Tensor]
    stats: Callable[[int, Any, ChunkState], Any] | None = None
    combine: Callable[[int, list[Any], ChunkState, Any], ChunkState] | None = None
    # (compute dtype, number of inputs) -> whether the merge runs in fused kernels, whose only
    # big allocation is the output: then a tensor that needs statistics passes is cut into
    # FUSED_CHUNK_FACTOR times bigger blocks, so fewer tensors are read once per pass.
    fused: Callable[[torch.dtype, int], bool] | None = None
    # How many times bigger those blocks are (slerp takes 2: see slerp.SLERP_CHUNK_FACTOR).
    fused_chunk_factor: int = FUSED_CHUNK_FACTOR


def elementwise(run: Callable[[Any], torch.Tensor], *, max_inputs: int | None = None) -> ChunkedForm:
    """The form of a method whose output element depends only on the inputs' same element.

    ``max_inputs`` bounds the inputs for which that holds bit for bit (torch's grouping of a
    sum over a stack of many inputs depends on the tensor's width).
    """

    def passes(params, per_model, dtype):
        return 0 if max_inputs is None or len(per_model) <= max_inputs else None

    return ChunkedForm(passes=passes, apply=lambda call, state: run(call))


def row_chunks(shape: Sequence[int], itemsize: int, max_bytes: int) -> list[tuple[int, int]] | None:
    """Row ranges ``[start, stop)`` cutting a tensor into blocks of at most ``max_bytes``.

    Every chunk but the last starts and ends at a multiple of ``reductions.CHUNK`` elements
    (what keeps chunked sums exact). None when the tensor fits in one chunk, is not at least
    2-D, or cannot be cut on such a boundary.
    """
    if len(shape) < 2 or shape[0] < 2:
        return None
    row_elements = math.prod(shape[1:])
    if row_elements == 0 or math.prod(shape) * itemsize <= max_bytes:
        return None
    align = reductions.CHUNK
    step = align // math.gcd(row_elements, align)  # fewest rows spanning whole CHUNKs
    rows_per_chunk = max(step, (max_bytes // (row_elements * itemsize)) // step * step)
    if rows_per_chunk >= shape[0]:
        return None
    return [(start, min(start + rows_per_chunk, shape[0])) for start in range(0, shape[0], rows_per_chunk)]
