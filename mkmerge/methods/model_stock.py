"""`model_stock`: move from the base towards the fine-tunes' average by their agreement (SPEC §2.8)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import torch

from common.errors import MergeError
from mkmerge.methods.reductions import require_same_shape
from mkmerge.methods.vectors import as_vectors, vector_dots

# The product of two delta norms is floored at this before dividing.
NORM_PRODUCT_FLOOR = 1e-6


def model_stock_merge(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    filter_wise: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``t·mean_i(W_i) + (1 − t)·W_base`` and the ratio ``t`` (per vector), Model Stock's rule.

    ``c`` is the mean pairwise cosine of the deltas ``W_i − W_base`` and
    ``t = N·c / (1 + (N − 1)·c)``. Vectors: the whole tensor, or with ``filter_wise`` each row
    along the last axis (1-D tensors are one row). ``t`` is not clamped, as in mergekit (the
    caller may warn when it leaves [0, 1]); a non-finite ``t`` (mean cosine exactly
    ``−1/(N − 1)``) is an error rather than a tensor of inf/NaN. Computed in float32, cast to
    the base's dtype; ``t`` is returned in float64, shaped [vectors, 1].
    """
    count = len(tensors)
    if count < 2:
        raise MergeError(
            f"model_stock needs at least two models besides the base, but this tensor has {count}",
            hint="list two or more fine-tuned models and the base model",
        )
    require_same_shape([base, *tensors], what="model_stock")
    anchor = base.to(torch.float32)
    deltas = [as_vectors(t.to(torch.float32) - anchor, flatten=not filter_wise) for t in tensors]
    norms = [vector_dots(d, d, -1).sqrt() for d in deltas]
    cosine_sum = torch.zeros_like(norms[0])
    for i, j in combinations(range(count), 2):
        divisor = (norms[i] * norms[j]).clamp_min(NORM_PRODUCT_FLOOR)
        cosine_sum += (vector_dots(deltas[i], deltas[j], -1) / divisor).clamp(-1.0, 1.0)
    del deltas
    cosine = cosine_sum / (count * (count - 1) // 2)
    t = count * cosine / (1 + (count - 1) * cosine)
    if not bool(torch.isfinite(t).all()):
        raise MergeError(
            f"the deltas of the {count} models from the base have mean cosine exactly {-1 / (count - 1):g}, "
            "so model_stock's interpolation ratio t = N·c/(1 + (N−1)·c) is infinite",
            hint="these fine-tunes pull in opposite directions; use another method for this tensor",
        )
    mean = torch.zeros_like(anchor)
    for tensor in tensors:
        mean += tensor.to(torch.float32)
    mean /= count
    ratio = t.to(torch.float32)
    out = as_vectors(mean, flatten=not filter_wise) * ratio + as_vectors(anchor, flatten=not filter_wise) * (1 - ratio)
    return out.reshape(base.shape).to(base.dtype), t
