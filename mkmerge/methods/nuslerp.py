"""`nuslerp`: slerp between two models, per vector, optionally of deltas from a third (SPEC §2.3)."""

from __future__ import annotations

import torch

from mkmerge.methods.reductions import require_same_shape
from mkmerge.methods.vectors import pair_gram

# Weight sums below this give t = 0.5 instead of a division by ~0.
WEIGHT_SUM_EPS = 1e-6
# Norms are floored at this before normalising.
NORM_FLOOR = 1e-7
# |sin θ| below this: the vectors are (anti-)parallel, interpolate linearly.
SIN_EPS = 1e-8


def nuslerp_fraction(first_weight: float, second_weight: float) -> float:
    """The interpolation factor ``t = w_2 / (w_1 + w_2)``; 0.5 when the weights cancel."""
    total = first_weight + second_weight
    if abs(total) < WEIGHT_SUM_EPS:
        return 0.5
    return second_weight / total


def nuslerp_merge(
    t: float,
    first: torch.Tensor,
    second: torch.Tensor,
    *,
    base: torch.Tensor | None = None,
    flatten: bool = True,
    row_wise: bool = False,
) -> torch.Tensor:
    """Slerp from ``first`` (t = 0) to ``second`` (t = 1), each vector pair on its own circle.

    Vectors: the whole tensor (``flatten``), else those along the last axis (each row of a
    matrix), or with ``row_wise`` those along the *first* axis (each column): mergekit's code
    does this, the reverse of what its documentation says, and recipes depend on the code.
    1-D tensors are one vector. With ``base`` the vectors are the deltas ``W − W_base`` and the
    result is added back to the base (task-vector mode).

    Computed in float32 (mergekit uses the load dtype, whose bfloat16 trigonometry is coarse)
    and cast back to the dtype of ``base`` (or ``first``).
    """
    require_same_shape([first, second] + ([base] if base is not None else []), what="nuslerp")
    dtype = (base if base is not None else first).dtype
    v0, v1 = first.to(torch.float32), second.to(torch.float32)
    anchor = base.to(torch.float32) if base is not None else None
    if anchor is not None:
        v0, v1 = v0 - anchor, v1 - anchor
    if flatten or v0.dim() <= 1:
        v0, v1, dim = v0.reshape(1, -1), v1.reshape(1, -1), -1
    else:
        dim = 0 if row_wise else -1
    norm0, norm1, products = pair_gram(v0, v1, dim)
    divisor = norm0.sqrt().clamp_min(NORM_FLOOR) * norm1.sqrt().clamp_min(NORM_FLOOR)
    # The cosine is rounded to float32, the precision of the computation: (anti-)parallel
    # vectors then give exactly ±1 and take the linear branch, where a float64 cosine one ulp
    # off ±1 would give sin θ ≈ 1.5e-8 and blow the coefficients up to ~1e8.
    cosine = (products / divisor).clamp(-1.0, 1.0).to(torch.float32).to(torch.float64)
    theta = cosine.arccos()
    sin_theta = theta.sin()
    parallel = sin_theta.abs() < SIN_EPS
    safe_sin = torch.where(parallel, torch.ones_like(sin_theta), sin_theta)
    scale0 = torch.where(parallel, torch.full_like(theta, 1.0 - t), ((1.0 - t) * theta).sin() / safe_sin)
    scale1 = torch.where(parallel, torch.full_like(theta, t), (t * theta).sin() / safe_sin)
    out = v0 * scale0.to(torch.float32) + v1 * scale1.to(torch.float32)
    out = out.reshape(first.shape)
    if anchor is not None:
        out += anchor
    return out.to(dtype)
