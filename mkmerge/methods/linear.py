"""`linear`: weighted average of the inputs (SPEC §2.1)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from common.errors import MergeError
from mkmerge.methods import fused
from mkmerge.methods.reductions import Term, require_same_shape, stacked_sum


def linear_merge(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    normalize: bool = True,
) -> torch.Tensor:
    """``Σ w_i·W_i``, divided by ``Σ w_i`` when ``normalize``; computed in the inputs' dtype.

    Rounding follows SPEC §2.1 ("computed in the load dtype"): each weight is rounded to the dtype, each product
    ``w_i·W_i`` is rounded to the dtype, the products are summed exactly as
    ``torch.stack(products).sum(dim=0)`` sums them (float32 accumulation for bfloat16 and
    float16), and the division is by the weight sum rounded to the dtype. The stack itself is
    not built for up to four inputs (see ``stacked_sum``). (mergekit 0.1.5's own bf16 outputs
    differ from this in the last bit for some elements; see benchmarks/README.md.)
    """
    if not tensors:
        raise MergeError("linear merge was given no input tensors", hint="list at least one model")
    if len(weights) != len(tensors):
        raise ValueError(f"{len(tensors)} tensors but {len(weights)} weights")
    require_same_shape(tensors, what="linear merge")
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    device = tensors[0].device
    w = torch.tensor([float(x) for x in weights], dtype=dtype, device=device)
    if normalize and w.sum().item() == 0:
        listed = ", ".join(f"{float(x):g}" for x in weights)
        raise MergeError(
            f"weights sum to zero ({listed}), so the normalised linear merge would divide by zero",
            hint="change the weights, or set `normalize: false` to keep the plain weighted sum",
        )
    if fused.linear_applies(tensors):
        return fused.linear(tensors, weights, normalize)

    flats = [t.reshape(-1) for t in tensors]

    def product(i: int) -> Term:
        return lambda block: flats[i][block].to(dtype) * w[i]

    total = stacked_sum(
        [product(i) for i in range(len(tensors))], tensors[0].shape, dtype, device
    )
    return total / w.sum() if normalize else total
