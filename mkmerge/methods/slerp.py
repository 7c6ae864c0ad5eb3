"""`slerp`: spherical interpolation between the base and one other model (docs/methods.md)."""

from __future__ import annotations

import math

import torch

from mkmerge.methods import catalogue, fused
from mkmerge.methods.chunked import ChunkedForm
from mkmerge.methods.declaration import MergeMethod, MethodCall
from mkmerge.methods.reductions import (
    TORCH_SUM_INVARIANT_ELEMENTS,
    exact_sum,
    gram_partials,
    gram_sums,
    require_same_shape,
)
from mkmerge.methods.working_set import WorkingSet
from mksuite.common.errors import MergeError

# A fused slerp's row blocks, in default blocks. Its statistics pass is one cheap Gram sum, so
# reading a tensor twice costs little; with 4 its peak RSS grew from 0.5B to 3B models
# (~700 -> 750-810 MB), with 2 it is 570-670 MB at all three sizes (benchmarks/README.md).
SLERP_CHUNK_FACTOR = 2
# |cos θ| above this counts as (anti-)parallel: sin θ is too small to divide by.
PARALLEL_THRESHOLD = 0.9995
# Norms at or below this are not divided by (the vector is used as it is).
NORM_EPS = 1e-8


def slerp_merge(t: float, base: torch.Tensor, other: torch.Tensor, *, precise: bool = False) -> torch.Tensor:
    """Interpolate from ``base`` (t = 0) to ``other`` (t = 1) along the great circle.

    Both tensors are treated as one flat vector each, in float32. When they are nearly
    parallel or anti-parallel (``|cos θ| > 0.9995``) plain linear interpolation is used.
    The coefficients apply to the unnormalised tensors, so norms interpolate too. The
    result has the base's dtype; at t = 0 and t = 1 it is the endpoint bit for bit (and may
    be the very tensor passed in). Tensors of at most TORCH_SUM_INVARIANT_ELEMENTS get
    mergekit's coefficients (:func:`float32_slerp_scales`) unless ``precise``; otherwise dot
    products and norms are thread-invariant sums of float32 products with float64
    accumulation (see ``gram_sums``).
    """
    require_same_shape([base, other], what="slerp")
    if t == 0:
        return base
    if t == 1:
        return other.to(base.dtype)
    if not precise and base.numel() <= TORCH_SUM_INVARIANT_ELEMENTS:
        return _mix(base, other, *float32_slerp_scales(t, base, other))
    aa, cc, ac = gram_sums(base, other)
    return _mix(base, other, *slerp_scales(t, aa, cc, ac))


def float32_slerp_scales(t: float, base: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """The coefficients as mergekit computes them: every step a float32 tensor operation.

    Norms, normalised vectors, their dot product and the trigonometry all round to float32
    (float64 for float64 tensors), so the coefficients can differ from :func:`slerp_scales`
    in their last bits.
    """
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    a, c = base.reshape(-1).to(dtype), other.reshape(-1).to(dtype)
    norm_a, norm_c = a.norm(), c.norm()
    unit_a = a / norm_a if norm_a > NORM_EPS else a
    unit_c = c / norm_c if norm_c > NORM_EPS else c
    cos_theta = (unit_a * unit_c).sum()
    if abs(float(cos_theta)) > PARALLEL_THRESHOLD:
        return 1.0 - t, t
    theta = torch.arccos(cos_theta)
    sin_theta = torch.sin(theta)
    return float(torch.sin((1.0 - t) * theta) / sin_theta), float(torch.sin(t * theta) / sin_theta)


def slerp_scales(t: float, aa: float, cc: float, ac: float) -> tuple[float, float]:
    """The coefficients of the base and the other tensor, from their Gram sums."""
    cos_theta = ac / (_divisor_norm(aa) * _divisor_norm(cc))
    if abs(cos_theta) > PARALLEL_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(cos_theta)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def _mix(base: torch.Tensor, other: torch.Tensor, scale_a: float, scale_c: float) -> torch.Tensor:
    """``a·sa + c·sc`` in float32, each product rounded, then the sum; cast to the base dtype."""
    if fused.mix_applies([base, other]):
        return fused.mix(base, other, scale_a, scale_c)
    a = base.to(torch.float32, copy=True)
    out = a.mul_(scale_a).add_(other.to(torch.float32) * scale_c)
    return out.to(base.dtype)


def _divisor_norm(squared: float) -> float:
    """The norm a vector is normalised by: 1 (leave it) when it is too small to divide by."""
    norm = math.sqrt(squared)
    return norm if norm > NORM_EPS else 1.0


def slerp_chunked() -> ChunkedForm:
    """slerp over chunks: one pass for the Gram sums, then the same element-wise mix."""

    def passes(params, per_model, dtype):
        return 0 if float(params["t"]) in (0.0, 1.0) else 1

    def stats(index, call, state):
        (other,) = call.tensors
        return gram_partials(call.base, other)

    def combine(index, partials, state, call):
        aa, cc, ac = (exact_sum([x for part in partials for x in part[j]]) for j in range(3))
        return slerp_scales(float(call.params["t"]), aa, cc, ac)

    def apply(call, state):
        require_same_shape([call.base, *call.tensors], what="slerp")
        t = float(call.params["t"])
        (other,) = call.tensors
        if t == 0:
            return call.base
        if t == 1:
            return other.to(call.base.dtype)
        return _mix(call.base, other, *state)

    def fused_kernels(dtype, count):
        return dtype == torch.bfloat16 and fused.available()

    return ChunkedForm(
        passes=passes,
        apply=apply,
        stats=stats,
        combine=combine,
        fused=fused_kernels,
        fused_chunk_factor=SLERP_CHUNK_FACTOR,
    )


# --- declaration


def _run_slerp(call: MethodCall) -> torch.Tensor:
    present = ([call.base] if call.base is not None else []) + list(call.tensors)
    if len(present) == 1:
        return present[0]
    if call.base is None or len(call.tensors) != 1:
        raise MergeError(
            f"slerp merges the base model with exactly one other model; this tensor has "
            f"{len(call.tensors)} other input(s) and {'a' if call.base is not None else 'no'} base",
            hint="list exactly two models, one of them the `base_model`",
        )
    precise = bool(call.params.get("precise"))
    return slerp_merge(float(call.params["t"]), call.base, call.tensors[0], precise=precise)


MERGE_METHODS = (
    MergeMethod(
        name="slerp",
        pretty_name="SLERP",
        reference_url="https://en.wikipedia.org/wiki/Slerp",
        parameters=catalogue.parameters("slerp"),
        base_model="required",
        min_inputs=2,
        max_inputs=2,
        merge=_run_slerp,
        chunked=slerp_chunked(),
        embeddings="common rows",
        # float32 copies of both endpoints and one scaled product
        working_set=WorkingSet(copies=0, bytes_per_element=12, scratch_buffers=3),
        card_lists_base=True,
    ),
)
