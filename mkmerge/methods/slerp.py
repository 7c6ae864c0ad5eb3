"""`slerp`: spherical interpolation between the base and one other model (SPEC §2.2)."""

from __future__ import annotations

import math

import torch

from mkmerge.methods.reductions import dot, require_same_shape, squared_norm

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
    be the very tensor passed in). Dot products and norms are float64, thread-invariant
    sums, so the cosine is exact to float64 rounding rather than float32's.
    """
    require_same_shape([base, other], what="slerp")
    if t == 0:
        return base
    if t == 1:
        return other.to(base.dtype)
    a = base.to(torch.float32)
    c = other.to(torch.float32)
    cos_theta = dot(a, c) / (_divisor_norm(a) * _divisor_norm(c))
    if abs(cos_theta) > PARALLEL_THRESHOLD:
        out = a * (1.0 - t) + c * t
    else:
        theta = math.acos(cos_theta)
        sin_theta = math.sin(theta)
        out = a * (math.sin((1.0 - t) * theta) / sin_theta) + c * (math.sin(t * theta) / sin_theta)
    return out.to(base.dtype)


def _divisor_norm(x: torch.Tensor) -> float:
    """The norm a vector is normalised by: 1 (leave it) when it is too small to divide by."""
    norm = math.sqrt(squared_norm(x))
    return norm if norm > NORM_EPS else 1.0
