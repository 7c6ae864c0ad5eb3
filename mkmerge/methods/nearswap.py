"""`nearswap`: take the other model's value where it is close to the base's (docs/methods.md)."""

from __future__ import annotations

import torch

from mkmerge.methods import catalogue
from mkmerge.methods.declaration import MergeMethod, MethodCall, base_and_one_other
from mkmerge.methods.reductions import require_same_shape

# Differences are floored at this before dividing.
DIFFERENCE_FLOOR = 1e-6


def nearswap_merge(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per entry ``ω = clamp(t / |W_base − W_other|, 0, 1)``; ``ω·W_other + (1 − ω)·W_base``.

    Entries that differ by at most ``t`` come entirely from the other model, far-apart ones
    stay close to the base. Every step is one op in the inputs' dtype, rounded to it (torch
    computes a bfloat16 op in float32 and rounds once): mergekit 0.1.5's arithmetic, whose
    bfloat16 outputs this reproduces bit for bit (benchmarks/README.md).
    """
    require_same_shape([base, other], what="nearswap")
    dtype = torch.promote_types(base.dtype, other.dtype)
    b, o = base.to(dtype), other.to(dtype)
    weight = (t / (b - o).abs_().clamp_min_(DIFFERENCE_FLOOR)).clamp_(0.0, 1.0)
    out = weight * o
    out += (1.0 - weight).mul_(b)
    return out.to(base.dtype)


# --- declaration


def _run_nearswap(call: MethodCall) -> torch.Tensor:
    alone = base_and_one_other(call, "nearswap")
    return alone if alone is not None else nearswap_merge(float(call.params["t"]), call.base, call.tensors[0])


MERGE_METHODS = (
    MergeMethod(
        name="nearswap",
        pretty_name="NearSwap",
        reference_url=None,
        parameters=catalogue.parameters("nearswap"),
        base_model="required",
        min_inputs=2,
        max_inputs=2,
        merge=_run_nearswap,
    ),
)
