"""`nuslerp`: slerp between two models, per vector, optionally of deltas from a third (docs/methods.md)."""

from __future__ import annotations

import torch

from mkmerge.methods import catalogue
from mkmerge.methods.declaration import MergeMethod, MethodCall
from mkmerge.methods.reductions import require_same_shape
from mkmerge.methods.vectors import norms_in_dtype, sums_in_dtype
from mksuite.common.errors import MergeError

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

    Every step is one torch op in the inputs' dtype, as mergekit 0.1.5 computes it (bit for
    bit on bfloat16 models, benchmarks/README.md): deltas, norms, unit vectors, the cosine,
    θ, the sines, and ``(sin((1−t)θ)·v0 + sin(tθ)·v1) / sin θ``, or ``(1−t)·v0 + t·v1`` where
    ``|sin θ| < 1e-8``. Sums that torch would split across threads (one vector longer than its
    grain) are accumulated exactly and rounded once instead (see ``model_stock_merge``).
    """
    require_same_shape([first, second] + ([base] if base is not None else []), what="nuslerp")
    dtype = torch.promote_types(first.dtype, second.dtype)
    if base is not None:
        dtype = torch.promote_types(dtype, base.dtype)
    v0, v1 = first.to(dtype), second.to(dtype)
    anchor = base.to(dtype) if base is not None else None
    if anchor is not None:
        v0, v1 = v0 - anchor, v1 - anchor
    if flatten or v0.dim() <= 1:
        v0, v1, dim = v0.reshape(1, -1), v1.reshape(1, -1), -1
    else:
        dim = 0 if row_wise else -1
    u0 = v0 / norms_in_dtype(v0, dim).clamp_min(NORM_FLOOR)
    u1 = v1 / norms_in_dtype(v1, dim).clamp_min(NORM_FLOOR)
    cosine = sums_in_dtype(u0 * u1, dim).clamp(-1, 1)
    del u0, u1
    theta = torch.acos(cosine)
    sin_theta = torch.sin(theta)
    curved = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    straight = (1 - t) * v0 + t * v1
    out = torch.where(sin_theta.abs() < SIN_EPS, straight, curved).reshape(first.shape)
    if anchor is not None:
        out = anchor + out
    return out.to((base if base is not None else first).dtype)


# --- declaration


def _run_nuslerp(call: MethodCall) -> torch.Tensor:
    if len(call.tensors) > 2:
        raise MergeError(
            f"nuslerp interpolates between exactly two models, but this tensor has {len(call.tensors)}",
            hint="list two models (plus, optionally, a third as `base_model`)",
        )
    if len(call.tensors) < 2:  # one of the two lacks this (optional) tensor: keep what is there
        return call.tensors[0] if call.tensors else call.base
    t = nuslerp_fraction(call.per_model[0]["weight"], call.per_model[1]["weight"])
    return nuslerp_merge(
        t,
        *call.tensors,
        base=call.base,
        flatten=bool(call.params["nuslerp_flatten"]),
        row_wise=bool(call.params["nuslerp_row_wise"]),
    )


MERGE_METHODS = (
    MergeMethod(
        name="nuslerp",
        pretty_name="NuSLERP",
        reference_url=None,
        parameters=catalogue.parameters("nuslerp"),
        base_model="optional",
        min_inputs=2,
        max_inputs=3,
        other_inputs=2,
        merge=_run_nuslerp,
        embeddings="common rows",
    ),
)
