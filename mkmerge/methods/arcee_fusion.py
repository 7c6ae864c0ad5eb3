"""`arcee_fusion`: take the other model's entries where they matter most (docs/methods.md)."""

from __future__ import annotations

import numpy as np
import torch

from mkmerge.methods.declaration import MergeMethod, MethodCall, base_and_one_other
from mkmerge.methods.reductions import require_same_shape
from mkmerge.methods.vectors import as_vectors, vector_dots

# Importance thresholds are estimated from at most this many entries.
SAMPLE_LIMIT = 10**6
# Added to both softmax distributions so the log ratio stays finite.
PROBABILITY_FLOOR = 1e-8


def fusion_importance(base: torch.Tensor, other: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``|B − A| ⊙ KL(softmax(B_row) ‖ softmax(A_row))`` in ``dtype``, rows along the last axis.

    The KL divergence of each row (1-D tensors: one row) treats the raw weights as logits, a
    heuristic of the method; it is broadcast over the row. In float32 (``--precise``) the row
    sums are thread-invariant dot products; in the merge dtype (mergekit's rounding, the
    default) every step rounds to that dtype as mergekit's does.
    """
    a = as_vectors(base.to(dtype), flatten=False)
    b = as_vectors(other.to(dtype), flatten=False)
    p = torch.softmax(b, dim=-1) + PROBABILITY_FLOOR
    q = torch.softmax(a, dim=-1) + PROBABILITY_FLOOR
    if dtype == torch.float32:
        divergence = vector_dots(p, (p / q).log_(), -1).to(torch.float32)
    else:
        divergence = (p * (p / q).log_()).sum(dim=-1, keepdim=True)
    return ((b - a).abs_() * divergence).reshape(base.shape)


def fusion_threshold(importance: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``median + 1.5·(q75 − q25)`` of the importance (not the usual ``q75 + 1.5·IQR``), in its dtype.

    Quantile q is the element at index ``floor(q·(n − 1))`` of the sorted values. Tensors with
    more than SAMPLE_LIMIT entries are estimated from SAMPLE_LIMIT of them drawn without
    replacement by NumPy's PCG64 seeded with ``generator.initial_seed()``: a serial stream, so
    the sample depends on the seed and the tensor, never on threads or device.
    """
    flat = importance.reshape(-1)
    if flat.numel() > SAMPLE_LIMIT:
        draws = np.random.Generator(np.random.PCG64(generator.initial_seed()))
        picked = draws.choice(flat.numel(), size=SAMPLE_LIMIT, replace=False)
        flat = flat[torch.from_numpy(picked).to(flat.device)]
    ordered = flat.sort().values
    last = ordered.numel() - 1
    q25, median, q75 = (ordered[int(q * last)] for q in (0.25, 0.5, 0.75))
    return median + 1.5 * (q75 - q25)


def arcee_fusion_merge(
    base: torch.Tensor, other: torch.Tensor, generator: torch.Generator, *, precise: bool = False
) -> torch.Tensor:
    """The base with its entries of outstanding importance (≥ the threshold) taken from ``other``.

    By default as mergekit computes it: importance, threshold and mask in the merge dtype (the
    base's), and the result ``A + mask·(B − A)`` with the masked delta rounded to that dtype
    and the sum in float32, so the result is float32 (the method's default output dtype).
    With ``precise`` the importance is float32 and the selected entries are copied
    (``where``), bit-exact, in the base's dtype.
    """
    require_same_shape([base, other], what="arcee_fusion")
    dtype = torch.float32 if precise else base.dtype
    importance = fusion_importance(base, other, dtype)
    chosen = importance >= fusion_threshold(importance, generator)
    if precise:
        return torch.where(chosen, other.to(base.dtype), base)
    delta = chosen.to(base.dtype) * (other.to(base.dtype) - base)
    return base.to(torch.float32) + delta.to(torch.float32)


# --- declaration


def _run_arcee_fusion(call: MethodCall) -> torch.Tensor:
    alone = base_and_one_other(call, "arcee_fusion")
    if alone is not None:
        return alone
    precise = bool(call.params.get("precise"))
    return arcee_fusion_merge(call.base, call.tensors[0], call.generator(0), precise=precise)


MERGE_METHODS = (
    MergeMethod(
        name="arcee_fusion",
        pretty_name="Arcee Fusion",
        reference_url=None,
        parameters=(),
        base_model="required",
        min_inputs=2,
        max_inputs=2,
        merge=_run_arcee_fusion,
        embeddings="common rows",
        random=True,
        default_out_dtype="float32",
    ),
)
