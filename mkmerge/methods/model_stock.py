"""`model_stock`: move from the base towards the fine-tunes' average by their agreement (docs/methods.md)."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from itertools import combinations

import torch

from mkmerge.methods import catalogue
from mkmerge.methods.declaration import MergeMethod, MethodCall
from mkmerge.methods.reductions import require_same_shape
from mkmerge.methods.vectors import as_vectors, norms_in_dtype, sums_in_dtype
from mksuite.common.errors import MergeError

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
    ``−1/(N − 1)``) is an error rather than a tensor of inf/NaN.

    Every step is one op in the inputs' dtype, as mergekit 0.1.5 computes it (bit for bit on
    bfloat16 models, benchmarks/README.md): deltas, norms, element products and their sums,
    cosines, ``t``, the mean and the mix are each rounded to the dtype. A sum that torch would
    split across threads (one vector longer than its grain, ``reductions.split_by_torch``), in
    a thread-count-dependent order, is accumulated exactly and rounded once instead: for
    bfloat16 that agrees with torch's float32 order unless its error crosses a bfloat16
    rounding boundary (~1e-4 of such sums); float32 sums of that size can differ in the last
    bit. ``t`` is returned in float64, shaped [vectors, 1].
    """
    count = len(tensors)
    if count < 2:
        raise MergeError(
            f"model_stock needs at least two models besides the base, but this tensor has {count}",
            hint="list two or more fine-tuned models and the base model",
        )
    require_same_shape([base, *tensors], what="model_stock")
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors), base.dtype)
    anchor = as_vectors(base.to(dtype), flatten=not filter_wise)
    deltas = [as_vectors(t.to(dtype), flatten=not filter_wise) - anchor for t in tensors]
    norms = [norms_in_dtype(d) for d in deltas]
    cosines = []
    for i, j in combinations(range(count), 2):
        divisor = (norms[i] * norms[j]).clamp(min=NORM_PRODUCT_FLOOR)
        cosines.append((sums_in_dtype(deltas[i] * deltas[j]) / divisor).clamp(-1, 1))
    del deltas
    cosine = torch.stack(cosines).mean(dim=0)
    t = (count * cosine) / (1 + (count - 1) * cosine)
    if not bool(torch.isfinite(t).all()):
        raise MergeError(
            f"the deltas of the {count} models from the base have mean cosine exactly {-1 / (count - 1):g}, "
            "so model_stock's interpolation ratio t = N·c/(1 + (N−1)·c) is infinite",
            hint="these fine-tunes pull in opposite directions; use another method for this tensor",
        )
    mean = as_vectors(tensors[0].to(dtype), flatten=not filter_wise)
    for tensor in tensors[1:]:
        mean = mean + as_vectors(tensor.to(dtype), flatten=not filter_wise)
    mean = mean / count
    out = t * mean + (1 - t) * anchor
    return out.reshape(base.shape).to(base.dtype), t.to(torch.float64)


# --- declaration


def _run_model_stock(call: MethodCall) -> torch.Tensor:
    if call.base is None:
        raise MergeError("model_stock moves from the base model, but no base tensor was given", hint="set `base_model`")
    if not call.tensors:
        return call.base
    merged, t = model_stock_merge(call.base, call.tensors, filter_wise=bool(call.params["filter_wise"]))
    outside = (t < 0) | (t > 1)
    if bool(outside.any()):
        where = (
            f"t = {float(t.reshape(-1)[0]):.4g}"
            if t.numel() == 1
            else (
                f"t outside [0, 1] in {int(outside.sum())} of {t.numel()} rows "
                f"(range {float(t.min()):.4g} to {float(t.max()):.4g})"
            )
        )
        warnings.warn(
            f"model_stock, tensor {call.tensor_name}: {where}, so the merge extrapolates beyond the "
            "base and the models' average (their deltas disagree in direction)",
            stacklevel=2,
        )
    return merged


MERGE_METHODS = (
    MergeMethod(
        name="model_stock",
        pretty_name="Model Stock",
        reference_url="https://arxiv.org/abs/2403.19522",
        parameters=catalogue.parameters("model_stock"),
        base_model="required",
        min_inputs=3,
        max_inputs=None,
        merge=_run_model_stock,
        embeddings="common rows",
        needs_min_inputs_per_tensor=True,
    ),
)
