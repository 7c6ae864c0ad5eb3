"""`slerp`: spherical interpolation between the base and one other model (SPEC §2.2)."""

from __future__ import annotations

import math

import torch

from mkmerge.methods.reductions import gram_sums, require_same_shape

# |cos θ| above this counts as (anti-)parallel: sin θ is too small to divide by.
PARALLEL_THRESHOLD = 0.9995
# Norms at or below this are not divided by (the vector is used as it is).
NORM_EPS = 1e-8


def slerp_merge(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Interpolate from ``base`` (t = 0) to ``other`` (t = 1) along the great circle.

    Both tensors are treated as one flat vector each, in float32. When they are nearly
    parallel or anti-parallel (``|cos θ| > 0.9995``) plain linear interpolation is used.
    The coefficients apply to the unnormalised tensors, so norms interpolate too. The
    result has the base's dtype; at t = 0 and t = 1 it is the endpoint bit for bit (and may
    be the very tensor passed in). Dot products and norms are thread-invariant sums of
    float32 products with float64 accumulation (see ``gram_sums``).
    """
    require_same_shape([base, other], what="slerp")
    if t == 0:
        return base
    if t == 1:
        return other.to(base.dtype)
    a = base.to(torch.float32, copy=True)
    c = other.to(torch.float32)
    aa, cc, ac = gram_sums(a, c)
    cos_theta = ac / (_divisor_norm(aa) * _divisor_norm(cc))
    if abs(cos_theta) > PARALLEL_THRESHOLD:
        scale_a, scale_c = 1.0 - t, t
    else:
        theta = math.acos(cos_theta)
        sin_theta = math.sin(theta)
        scale_a, scale_c = math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta
    # a·sa + c·sc with each product rounded to float32, then the sum: in place, no temporaries
    # beyond one product.
    out = a.mul_(scale_a).add_(c * scale_c)
    return out.to(base.dtype)


def _divisor_norm(squared: float) -> float:
    """The norm a vector is normalised by: 1 (leave it) when it is too small to divide by."""
    norm = math.sqrt(squared)
    return norm if norm > NORM_EPS else 1.0
