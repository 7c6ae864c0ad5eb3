"""`nearswap`: take the other model's value where it is close to the base's (SPEC §2.9)."""

from __future__ import annotations

import torch

from mkmerge.methods.reductions import require_same_shape

# Differences are floored at this before dividing.
DIFFERENCE_FLOOR = 1e-6


def nearswap_merge(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per entry ``ω = clamp(t / |W_base − W_other|, 0, 1)``; ``ω·W_other + (1 − ω)·W_base``.

    Entries that differ by at most ``t`` come entirely from the other model, far-apart ones
    stay close to the base. Computed in float32 (where ω is 0 or 1 the result is an input's
    value exactly) and cast to the base's dtype.
    """
    require_same_shape([base, other], what="nearswap")
    b, o = base.to(torch.float32), other.to(torch.float32)
    weight = (t / (b - o).abs_().clamp_min_(DIFFERENCE_FLOOR)).clamp_(0.0, 1.0)
    out = weight * o
    out += (1.0 - weight).mul_(b)
    return out.to(base.dtype)
