"""Task-vector family: task_arithmetic, ties, dare_*, breadcrumbs*, della* (docs/methods.md).

Every member is the same pipeline over deltas ``δ_i = W_i − W_b``: sparsify each delta,
weight it, optionally keep only the entries that agree with the elected sign, sum, optionally
normalise, scale by lambda, add back to the base. Members differ only in the sparsifier, the
sign consensus and two defaults (:data:`TASK_VECTOR_VARIANTS`); a new member is a new entry
in :data:`SPARSIFIERS` (math in :mod:`mkmerge.methods.sparsifiers`) plus a row in that table.

This module is the whole-tensor torch form; the variants table and the shared final steps
are in :mod:`~mkmerge.methods.task_vector_core`, the fused-kernel rules in
:mod:`~mkmerge.methods.task_vector_fused`, the row-block form in
:mod:`~mkmerge.methods.task_vector_chunked`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from mkmerge.methods import fused
from mkmerge.methods.reductions import l1_norm, require_same_shape
from mkmerge.methods.sparsifiers import (
    breadcrumbs_sparsify,
    della_sparsify,
    magnitude_sparsify,
    random_sparsify,
)
from mkmerge.methods.task_vector_chunked import task_vector_chunked
from mkmerge.methods.task_vector_core import (
    RESCALE_EPS,
    TASK_VECTOR_VARIANTS,
    WEIGHT_SUM_EPS,
    TaskVectorVariant,
    combine_weighted,
    required_generator,
    rescale_factor,
)
from mkmerge.methods.task_vector_fused import fusable, fused_rules

__all__ = [
    "RANDOM_SPARSIFIERS",
    "RESCALE_EPS",
    "SPARSIFIERS",
    "TASK_VECTOR_VARIANTS",
    "WEIGHT_SUM_EPS",
    "Sparsifier",
    "TaskVectorVariant",
    "combine_weighted",
    "rescale_l1",
    "sparsify",
    "task_vector_chunked",
    "task_vector_merge",
]


# --- sparsifiers: (delta, density, generator, options) -> delta with dropped entries zeroed


Sparsifier = Callable[[torch.Tensor, float, torch.Generator | None, Mapping[str, float]], torch.Tensor]
"""(delta, density, generator, per-model options such as gamma/epsilon) -> sparsified delta."""


def _keep_all(delta, density, generator, options):
    return delta


def _by_magnitude(delta, density, generator, options):
    return magnitude_sparsify(delta, density)


def _at_random(delta, density, generator, options):
    return random_sparsify(delta, density, required_generator(generator))


def _without_outliers(delta, density, generator, options):
    return breadcrumbs_sparsify(delta, density, float(options["gamma"]))


def _by_rank_at_random(delta, density, generator, options):
    return della_sparsify(delta, density, float(options["epsilon"]), required_generator(generator))


SPARSIFIERS: dict[str, Sparsifier] = {
    "none": _keep_all,
    "magnitude": _by_magnitude,
    "random": _at_random,
    "breadcrumbs": _without_outliers,  # options: gamma
    "della": _by_rank_at_random,  # options: epsilon
}
RANDOM_SPARSIFIERS = frozenset({"random", "della"})
"""Sparsifiers that draw: each input needs its own seeded generator."""


def rescale_l1(original: torch.Tensor, kept: torch.Tensor, *, precise: bool = False) -> torch.Tensor:
    """Scale ``kept`` so its L1 norm matches ``original``'s (skipped when either is ~0).

    The norms are thread-invariant float64 sums. By default the factor is computed as
    mergekit does, from the norms rounded to the tensor's dtype (:func:`rescale_factor`);
    with ``precise`` it is their float64 ratio. Either way it is applied as one scalar.
    """
    factor = rescale_factor(l1_norm(original), l1_norm(kept), None if precise else kept.dtype)
    return kept if factor is None else kept * factor


def sparsify(
    delta: torch.Tensor,
    density: float,
    *,
    sparsifier: str,
    rescale: bool,
    generator: torch.Generator | None = None,
    options: Mapping[str, float] | None = None,
    precise: bool = False,
) -> torch.Tensor:
    """One delta through its sparsifier and the optional L1 rescale; density ≥ 1 keeps all."""
    if sparsifier == "none" or density >= 1:
        return delta
    kept = SPARSIFIERS[sparsifier](delta, density, generator, options or {})
    return rescale_l1(delta, kept, precise=precise) if rescale else kept


# --- the merge


def task_vector_merge(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    sparsifier: str = "none",
    consensus: bool = False,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    generators: Sequence[torch.Generator | None] | None = None,
    sparsifier_options: Sequence[Mapping[str, float]] | None = None,
    precise: bool = False,
) -> torch.Tensor:
    """``W_b + λ·merge(sparsify(W_i − W_b))``, computed in the base's dtype (docs/methods.md).

    Rounding follows the structure of mergekit's computation in that dtype: deltas, the
    weighted deltas ``ω_i = w_i·δ̃_i`` (w rounded to the dtype), the sign-election sum Σω,
    the masked sums D and S (float32 accumulation for half types, as torch sums a stacked
    dim 0), the division, the lambda scaling (skipped when λ = 1), the final addition.
    With no ordinary inputs the base is returned as it is. ``generators`` (one per input) are
    needed by the :data:`RANDOM_SPARSIFIERS`; ``sparsifier_options`` (one mapping per input)
    carry ``gamma`` for breadcrumbs and ``epsilon`` for della. ``precise``: the L1 rescale
    factor as a float64 ratio instead of mergekit's, rounded to the dtype (:func:`rescale_l1`).
    """
    count = len(tensors)
    if not (len(weights) == len(densities) == count):
        raise ValueError(f"{count} tensors, {len(weights)} weights, {len(densities)} densities")
    if sparsifier not in SPARSIFIERS:
        raise ValueError(f"unknown sparsifier {sparsifier!r}; known: {', '.join(SPARSIFIERS)}")
    if count == 0:
        return base
    require_same_shape([base, *tensors], what="task-vector merge")
    generators = list(generators) if generators is not None else [None] * count
    options = list(sparsifier_options) if sparsifier_options is not None else [{}] * count
    if fusable(sparsifier, rescale, base, tensors):
        rules = fused_rules(base, tensors, weights, densities, sparsifier, rescale, generators, precise=precise)
        return fused.merge(base, tensors, rules, consensus=consensus, normalize=normalize, lambda_=lambda_)
    dtype, device = base.dtype, base.device

    weighted: list[torch.Tensor] = []
    for i, tensor in enumerate(tensors):
        delta = tensor.to(dtype) - base
        kept = sparsify(
            delta,
            float(densities[i]),
            sparsifier=sparsifier,
            rescale=rescale,
            generator=generators[i],
            options=options[i],
            precise=precise,
        )
        # kept is always a fresh tensor here (at worst the delta itself), so scale in place.
        weighted.append(kept.mul_(torch.tensor(float(weights[i]), dtype=dtype, device=device)))
    return combine_weighted(base, weighted, weights, consensus=consensus, normalize=normalize, lambda_=lambda_)
