"""`multislerp`: spherical weighted mean of several models, optionally of deltas (docs/methods.md)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mkmerge.methods import catalogue
from mkmerge.methods.declaration import MergeMethod, MethodCall, PlannedInputs
from mkmerge.methods.reductions import TORCH_SUM_INVARIANT_ELEMENTS, require_same_shape
from mkmerge.methods.vectors import combine, gram_matrix, quadratic_norm
from mksuite.common.errors import MergeError


def multislerp_merge(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    base: torch.Tensor | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
    precise: bool = False,
) -> torch.Tensor:
    """The weighted mean direction of the inputs, scaled to their weighted mean norm.

    Tensors of at most TORCH_SUM_INVARIANT_ELEMENTS entries are computed as mergekit does
    (:func:`dtype_multislerp`) unless ``precise``; the rest as follows.

    mergekit takes a tangent step at the weighted mean ``m`` of the unit vectors, but the
    tangent vectors there sum to zero by construction, so its result is, up to rounding, the
    closed form computed here: ``m/‖m‖ · Σ w_i‖x_i‖`` with ``m = Σ w_i x_i/(‖x_i‖ + eps)``.
    Each tensor is one flat vector; with ``base`` the vectors are the deltas ``W − W_base``
    and the result is added back to the base. When ``‖m‖ < eps`` (inputs cancel out) two inputs
    fall back to ``Σ w_i x_i``; more is an error.

    Dot products are float64 sums (the Gram matrix of the x_i); the output is combined in
    float32 and cast to the dtype of ``base`` (or the first tensor). One input: returned as is.
    """
    if len(tensors) != len(weights):
        raise ValueError(f"{len(tensors)} tensors but {len(weights)} weights")
    if not tensors:
        raise MergeError("multislerp was given no input tensors besides the base", hint="list at least one model")
    if len(tensors) == 1:
        return tensors[0]
    require_same_shape(list(tensors) + ([base] if base is not None else []), what="multislerp")
    dtype = (base if base is not None else tensors[0]).dtype
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if normalize_weights:
        total = float(w.sum())
        if total == 0:
            raise MergeError(
                f"multislerp weights sum to zero ({', '.join(f'{x:g}' for x in w.tolist())}), "
                "so normalising them divides by zero",
                hint="change the weights, or set `normalize_weights: false`",
            )
        w = w / total
    if not precise and tensors[0].numel() <= TORCH_SUM_INVARIANT_ELEMENTS:
        return dtype_multislerp(tensors, weights, base=base, normalize_weights=normalize_weights, eps=eps)
    anchor = base.to(torch.float32) if base is not None else None
    vectors = [t.to(torch.float32) - anchor if anchor is not None else t.to(torch.float32) for t in tensors]
    gram = gram_matrix(vectors)
    norms = gram.diagonal().sqrt()
    unit_weights = w / (norms + eps)  # m = Σ unit_weights_i · x_i
    mean_norm = quadratic_norm(gram, unit_weights)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise MergeError(
                f"the {len(tensors)} inputs cancel out (their weighted mean direction has norm "
                f"{mean_norm:.3g} < eps {eps:g}), so multislerp has no direction to follow",
                hint="change the weights or leave out one of the opposing models",
            )
        coefficients = w
    else:
        coefficients = unit_weights * (float(w @ norms) / mean_norm)
    return combine(vectors, coefficients.tolist(), dtype=dtype, base=anchor)


def dtype_multislerp(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    base: torch.Tensor | None,
    normalize_weights: bool,
    eps: float,
) -> torch.Tensor:
    """multislerp as mergekit computes it: every step a tensor operation in the merge dtype.

    The unit vectors ``u_i``, their weighted mean ``m``, the tangent vectors at ``m̂`` and
    their weighted sum ``T`` (zero up to rounding), then ``r = m̂·cos(‖T‖+eps) +
    T·(sin(‖T‖+eps)/(‖T‖+eps))`` scaled by ``Σ w_i‖x_i‖``; in bfloat16 each step rounds to
    bfloat16, which is what the result then carries.
    """
    dtype = (base if base is not None else tensors[0]).dtype
    shape = tensors[0].shape
    vectors = torch.stack([t.to(dtype).reshape(-1) for t in tensors])
    if base is not None:
        vectors = vectors - base.reshape(1, -1)
    w = torch.tensor([float(x) for x in weights], dtype=dtype)
    if normalize_weights:
        w = w / w.sum()
    w = w[:, None]
    norms = vectors.norm(dim=-1, keepdim=True)
    units = vectors / (norms + eps)
    mean = (w * units).sum(0)
    if float(mean.norm()) < eps:
        if len(tensors) != 2:
            raise MergeError(
                f"the {len(tensors)} inputs cancel out (their weighted mean direction has norm "
                f"{float(mean.norm()):.3g} < eps {eps:g}), so multislerp has no direction to follow",
                hint="change the weights or leave out one of the opposing models",
            )
        out = (w * vectors).sum(0)
    else:
        direction = mean / mean.norm()
        tangents = units - (units * direction).sum(-1, keepdim=True) * direction
        step = (w * tangents).sum(0)
        length = step.norm()
        turned = direction * torch.cos(length + eps) + step * (torch.sin(length + eps) / (length + eps))
        out = turned * (w * norms).sum(0)
    if base is not None:
        out = out + base.reshape(-1)
    return out.reshape(shape)


# --- declaration


def _run_multislerp(call: MethodCall) -> torch.Tensor:
    if not call.tensors:
        return call.base
    return multislerp_merge(
        call.tensors,
        [p["weight"] for p in call.per_model],
        base=call.base,
        normalize_weights=bool(call.params["normalize_weights"]),
        eps=float(call.params["eps"]),
        precise=bool(call.params.get("precise")),
    )


def _check_weight_sum(planned: PlannedInputs) -> None:
    others = planned.others()
    if not planned.params.get("normalize_weights", True) or len(others) < 2:
        return
    if sum(p["weight"] for _, p in others) == 0:
        listing = ", ".join(f"{m}: {p['weight']}" for m, p in others)
        raise MergeError(
            f"the `weight` values of tensor {planned.tensor_name} sum to zero, so normalising them divides by "
            f"zero ({listing})",
            hint="change the weights, or set `normalize_weights: false`",
        )


MERGE_METHODS = (
    MergeMethod(
        name="multislerp",
        pretty_name="Multi-SLERP",
        reference_url=None,
        parameters=catalogue.parameters("multislerp"),
        base_model="optional",
        min_inputs=1,
        max_inputs=None,
        merge=_run_multislerp,
        check=_check_weight_sum,
    ),
)
