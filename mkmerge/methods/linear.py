"""`linear`: weighted average of the inputs (docs/methods.md)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from mkmerge.methods import catalogue, fused
from mkmerge.methods.chunked import elementwise
from mkmerge.methods.declaration import MergeMethod, MethodCall, PlannedInputs
from mkmerge.methods.reductions import blocks, fused_multiply_add, require_same_shape
from mkmerge.methods.working_set import WorkingSet
from mksuite.common.errors import MergeError


def linear_merge(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    normalize: bool = True,
) -> torch.Tensor:
    """``Σ w_i·W_i``, divided by ``Σ w_i`` when ``normalize``; the result in the inputs' dtype.

    The arithmetic is the one mergekit 0.1.5 performs for bfloat16, float16 and float32
    inputs (established bit for bit, black box, on its outputs; see benchmarks/README.md):
    weights rounded to float32; an accumulator that starts at +0 and takes each input in
    order as one fused multiply-add in float32 (``acc = fma(W_i, w_i, acc)``, a single
    rounding per step); then, with ``normalize``, one float32 division by the float32 sum of
    the weights; finally one rounding to the dtype. float64 inputs are accumulated in float64
    with a separate rounding for product and sum.
    """
    if not tensors:
        raise MergeError("linear merge was given no input tensors", hint="list at least one model")
    if len(weights) != len(tensors):
        raise ValueError(f"{len(tensors)} tensors but {len(weights)} weights")
    require_same_shape(tensors, what="linear merge")
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    wide = accumulation_dtype(dtype)
    w = torch.tensor([float(x) for x in weights], dtype=wide)
    divisor = float(w.sum())
    if normalize and divisor == 0:
        listed = ", ".join(f"{float(x):g}" for x in weights)
        raise MergeError(
            f"weights sum to zero ({listed}), so the normalised linear merge would divide by zero",
            hint="change the weights, or set `normalize: false` to keep the plain weighted sum",
        )
    if fused.linear_applies(tensors):
        return fused.linear(tensors, w.tolist(), divisor if normalize else None)

    device = tensors[0].device
    # A tensor on the accumulator's device, not a Python number: CUDA divides by a host scalar
    # as a multiplication by its reciprocal (one more rounding); by a device tensor it divides
    # correctly rounded, as the CPU and the fused kernel do.
    by = torch.tensor(divisor, dtype=wide, device=device)
    out = torch.empty(tensors[0].shape, dtype=dtype, device=device)
    flat_out = out.view(-1)
    flats = [t.reshape(-1) for t in tensors]
    for block in blocks(flat_out.numel()):
        acc = torch.zeros(block.stop - block.start, dtype=wide, device=device)
        for flat, weight in zip(flats, w.tolist()):
            acc = fused_multiply_add(flat[block], weight, acc)
        if normalize:
            acc.div_(by)
        flat_out[block] = acc
    return out


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything narrower."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- declaration


def _run_linear(call: MethodCall) -> torch.Tensor:
    tensors, params = list(call.tensors), list(call.per_model)
    if call.base is not None:  # the engine passes it as an ordinary input; accept it either way
        tensors.append(call.base)
        params.append(call.base_params)
    weights = [p["weight"] for p in params]
    return linear_merge(tensors, weights, normalize=bool(call.params["normalize"]))


def _check_weight_sum(planned: PlannedInputs) -> None:
    if not planned.params.get("normalize", True):
        return
    if sum(p.get("weight", 0.0) for p in planned.per_model) == 0:
        listing = ", ".join(f"{m}: {p.get('weight')}" for m, p in zip(planned.models, planned.per_model))
        raise MergeError(
            f"the `weight` values of tensor {planned.tensor_name} sum to zero, so normalising divides by zero "
            f"({listing})",
            hint="change the weights, or set `normalize: false`",
        )


MERGE_METHODS = (
    MergeMethod(
        name="linear",
        pretty_name="Linear",
        reference_url="https://arxiv.org/abs/2203.05482",
        parameters=catalogue.parameters("linear"),
        base_model="none",
        min_inputs=1,
        max_inputs=None,
        merge=_run_linear,
        chunked=elementwise(_run_linear),  # a per-element FMA chain: any number of inputs
        embeddings="common rows",
        # the result, and per 1M-element block the float64 temporaries of the emulated fused
        # multiply-add (measured: ~83 MB beside a 50 MB result, any number of inputs); fused: the result
        working_set=WorkingSet(
            copies=1, scratch_buffers=6, fused=WorkingSet(copies=1, scratch_buffers=0), fused_dtypes=fused.DTYPES
        ),
        check=_check_weight_sum,
    ),
)
