"""Task-vector family: task_arithmetic, ties, dare_*, breadcrumbs*, della* (docs/methods.md).

Every member is the same pipeline over deltas ``δ_i = W_i − W_b``: sparsify each delta,
weight it, optionally keep only the entries that agree with the elected sign, sum, optionally
normalise, scale by lambda, add back to the base. Members differ only in the sparsifier, the
sign consensus and two defaults (:data:`TASK_VECTOR_VARIANTS`); a new member is a new entry
in :data:`SPARSIFIERS` (math in :mod:`mkmerge.methods.sparsifiers`) plus a row in that table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mkmerge.methods import fused, sort_order
from mkmerge.methods.chunked import ChunkedForm
from mkmerge.methods.reductions import (
    BLOCK,
    STREAMED_TERMS_MAX,
    BlockSummer,
    Term,
    blocks,
    exact_sum,
    l1_norm,
    l1_partials,
    require_same_shape,
    stacked_sum,
)
from mkmerge.methods.sort_order import kth_in_histogram, order_keys
from mkmerge.methods.sparsifiers import (
    breadcrumbs_sparsify,
    dare_mask,
    della_sparsify,
    magnitude_sparsify,
    random_sparsify,
)

# Below this L1 norm (before or after sparsifying) the rescale factor is not trusted.
RESCALE_EPS = 1e-7
# |Σ w| below this is treated as zero when normalising without consensus.
WEIGHT_SUM_EPS = 1e-8


@dataclass(frozen=True)
class TaskVectorVariant:
    """What distinguishes one member of the family (docs/methods.md table)."""

    sparsifier: str  # key of SPARSIFIERS
    consensus: bool  # TIES sign election
    normalize_default: bool
    rescale_default: bool


# Note the inconsistent normalize defaults (ties and della true, dare_ties and
# breadcrumbs_ties false): recipes rely on them.
TASK_VECTOR_VARIANTS: dict[str, TaskVectorVariant] = {
    #                                  sparsifier   consensus  normalize  rescale
    "task_arithmetic": TaskVectorVariant("none", False, False, False),
    "ties": TaskVectorVariant("magnitude", True, True, False),
    "dare_linear": TaskVectorVariant("random", False, False, True),
    "dare_ties": TaskVectorVariant("random", True, False, True),
    "breadcrumbs": TaskVectorVariant("breadcrumbs", False, False, False),
    "breadcrumbs_ties": TaskVectorVariant("breadcrumbs", True, False, False),
    "della": TaskVectorVariant("della", True, True, True),
    "della_linear": TaskVectorVariant("della", False, False, True),
}


# --- sparsifiers: (delta, density, generator, options) -> delta with dropped entries zeroed


Sparsifier = Callable[[torch.Tensor, float, torch.Generator | None, Mapping[str, float]], torch.Tensor]
"""(delta, density, generator, per-model options such as gamma/epsilon) -> sparsified delta."""


def _keep_all(delta, density, generator, options):
    return delta


def _by_magnitude(delta, density, generator, options):
    return magnitude_sparsify(delta, density)


def _at_random(delta, density, generator, options):
    return random_sparsify(delta, density, _required(generator))


def _without_outliers(delta, density, generator, options):
    return breadcrumbs_sparsify(delta, density, float(options["gamma"]))


def _by_rank_at_random(delta, density, generator, options):
    return della_sparsify(delta, density, float(options["epsilon"]), _required(generator))


def _required(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        raise ValueError("a random sparsifier needs a torch.Generator for every input")
    return generator


SPARSIFIERS: dict[str, Sparsifier] = {
    "none": _keep_all,
    "magnitude": _by_magnitude,
    "random": _at_random,
    "breadcrumbs": _without_outliers,  # options: gamma
    "della": _by_rank_at_random,  # options: epsilon
}
RANDOM_SPARSIFIERS = frozenset({"random", "della"})
"""Sparsifiers that draw: each input needs its own seeded generator."""


def rescale_l1(original: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Scale ``kept`` so its L1 norm matches ``original``'s (skipped when either is ~0).

    The factor is a float64 ratio of thread-invariant float64 norms, applied as a scalar
    (float32 arithmetic for bfloat16/float16 tensors), so the rounding happens once.
    """
    before = l1_norm(original)
    after = l1_norm(kept)
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept * (before / after)


def sparsify(
    delta: torch.Tensor,
    density: float,
    *,
    sparsifier: str,
    rescale: bool,
    generator: torch.Generator | None = None,
    options: Mapping[str, float] | None = None,
) -> torch.Tensor:
    """One delta through its sparsifier and the optional L1 rescale; density ≥ 1 keeps all."""
    if sparsifier == "none" or density >= 1:
        return delta
    kept = SPARSIFIERS[sparsifier](delta, density, generator, options or {})
    return rescale_l1(delta, kept) if rescale else kept


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
) -> torch.Tensor:
    """``W_b + λ·merge(sparsify(W_i − W_b))``, computed in the base's dtype (docs/methods.md).

    Rounding follows the structure of mergekit's computation in that dtype: deltas, the
    weighted deltas ``ω_i = w_i·δ̃_i`` (w rounded to the dtype), the sign-election sum Σω,
    the masked sums D and S (float32 accumulation for half types, as torch sums a stacked
    dim 0), the division, the lambda scaling (skipped when λ = 1), the final addition.
    With no ordinary inputs the base is returned as it is. ``generators`` (one per input) are
    needed by the :data:`RANDOM_SPARSIFIERS`; ``sparsifier_options`` (one mapping per input)
    carry ``gamma`` for breadcrumbs and ``epsilon`` for della.
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
    if _fusable(sparsifier, rescale, base, tensors):
        rules = _fused_rules(base, tensors, weights, densities, sparsifier, rescale, generators)
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
        )
        # kept is always a fresh tensor here (at worst the delta itself), so scale in place.
        weighted.append(kept.mul_(torch.tensor(float(weights[i]), dtype=dtype, device=device)))
    return combine_weighted(base, weighted, weights, consensus=consensus, normalize=normalize, lambda_=lambda_)


def _fusable(sparsifier: str, rescale: bool, base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether :mod:`fused` computes this merge (magnitude with rescale stays in torch: rare)."""
    wanted = sparsifier in ("none", "random") or (sparsifier == "magnitude" and not rescale)
    return wanted and fused.applies(base, tensors)


def _equal_policy(kept: int, equal: int) -> int:
    """How many of the ``equal`` entries sitting on the threshold key are kept: all (-1), or the first n."""
    return -1 if kept >= equal else max(0, kept)


def _fused_rules(base, tensors, weights, densities, sparsifier, rescale, generators) -> list[fused.InputRule]:
    """Per input, what :func:`fused.merge` needs to sparsify it as :func:`sparsify` would."""
    numel = base.numel()
    magnitude = [i for i in range(len(tensors)) if sparsifier == "magnitude" and float(densities[i]) < 1]
    ks = [_top_k_count(numel, float(densities[i])) for i in magnitude]
    # input -> (k, threshold key, entries above it, entries on it)
    cuts = dict(zip(magnitude, _fused_cuts(base, [tensors[i] for i in magnitude], ks))) if magnitude else {}
    # Where only some of the entries on the threshold survive, the sort's choice, replayed
    # for all such inputs at once (each on one thread).
    replayed = [i for i, (k, key, above, equal) in cuts.items() if _sort_decides(k - above, equal, key)]
    listed = dict(
        zip(
            replayed, fused.each_on_a_thread(lambda i: _sorted_ties(base, tensors[i], cuts[i][1], cuts[i][0]), replayed)
        )
    )
    dropped = [i for i in range(len(tensors)) if sparsifier == "random" and float(densities[i]) < 1]
    # DARE: each input's draws, mask and L1 rescale factor, the inputs side by side
    masked = dict(zip(dropped, fused.each_on_a_thread(
        lambda i: _random_rule(base, tensors[i], float(weights[i]), float(densities[i]), rescale, _required(generators[i])), dropped)))  # fmt: skip
    rules = []
    for i in range(len(tensors)):
        weight = float(weights[i])
        if i in listed:
            rules.append(fused.InputRule(weight, fused.MODE_LISTED, key=cuts[i][1], equal=0, listed=listed[i]))
        elif i in cuts:
            k, key, above, equal = cuts[i]
            rules.append(fused.InputRule(weight, fused.MODE_MAGNITUDE, key=key, equal=_equal_policy(k - above, equal)))
        elif i in masked:
            rules.append(masked[i])
        else:
            rules.append(fused.InputRule(weight))
    return rules


def _fused_cuts(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], ks: Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """Per input, (k, the k-th largest magnitude key of its delta, keys above it, keys equal
    to it), by radix select over the fused histograms: one 16-bit digit for the half
    formats, two for float32."""
    histograms = fused.delta_histograms(base, tensors)
    found = [kth_in_histogram(h, k) for h, k in zip(histograms, ks)]  # (digit, above)
    if fused.key_bits(base.dtype) > 16:  # float32: the low digit inside each chosen high bucket
        histograms = fused.delta_histograms(base, tensors, [bucket for bucket, _ in found])
        low = [kth_in_histogram(h, k - above) for h, k, (_, above) in zip(histograms, ks, found)]
        found = [((bucket << 16) | digit, above + above_low) for (bucket, above), (digit, above_low) in zip(found, low)]
    return [(k, key, above, int(h[key & 0xFFFF].item())) for k, (key, above), h in zip(ks, found, histograms)]


def _random_rule(
    base, tensor, weight: float, density: float, rescale: bool, generator: torch.Generator
) -> fused.InputRule:
    """One input's DARE drop as a fused rule: its mask and, with ``rescale``, the L1 factor."""
    mask = dare_mask(base.shape, density, generator).numpy()
    factor = None
    if rescale:
        before, after = fused.delta_l1_partials(base, tensor, mask)
        factor = _rescale_factor(exact_sum(before), exact_sum(after))
    return fused.InputRule(weight, fused.MODE_MASK, mask=mask, factor=factor)


def _sort_decides(missing: int, equal: int, key: int) -> bool:
    """Whether the sort's choice among the ``equal`` entries on the threshold ``key``, of
    which ``missing`` survive, changes the merge. Not when all or none survive, nor when the
    threshold is zero: a zero delta masked is the same zero (δ·0 keeps δ's sign)."""
    return 0 < missing < equal and key != 0


def _sorted_ties(base: torch.Tensor, tensor: torch.Tensor, key: int, k: int) -> np.ndarray:
    """Which entries on the threshold ``key`` (in index order) torch's descending sort of
    the delta's magnitudes puts among the first ``k``."""
    words, count = fused.delta_words(base, tensor, key)
    (kept,) = sort_order.replay(words, np.full(count, key, dtype=np.uint32), [k], sort_order.DESCENDING)
    return kept


def _replay_spill(model_state: dict) -> np.ndarray:
    """:func:`sort_order.replay_spilled` of one input's spilled words (its chunked state)."""
    equal = sum(model_state["equal_counts"])
    return sort_order.replay_spilled(model_state["spill"], model_state["key"], model_state["k"], equal)


def _rescale_factor(before: float, after: float) -> float | None:
    """The L1 rescale factor of :func:`rescale_l1`, or None where it is skipped."""
    return None if before < RESCALE_EPS or after < RESCALE_EPS else before / after


def combine_weighted(
    base: torch.Tensor,
    weighted: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """Steps 5–7 of docs/methods.md: (elected) sum of the weighted deltas, normalise, λ, add to base.

    Element-wise throughout, so a chunk of the inputs gives that chunk of the output.
    """
    count = len(weighted)
    if count == 0:
        return base
    dtype, device = base.dtype, base.device
    w = torch.tensor([float(x) for x in weights], dtype=dtype, device=device)
    if not consensus:
        divisor = w.sum()
        if abs(divisor.item()) < WEIGHT_SUM_EPS:
            divisor = torch.ones((), dtype=dtype, device=device)
    if count > STREAMED_TERMS_MAX:  # torch's grouping of many rows: only the real stack matches
        if consensus:
            mixed, divisor = _consensus_sums(weighted, w, base.shape, dtype, device)
        else:
            mixed = stacked_sum([_part(x) for x in weighted], base.shape, dtype, device)
        return _finish(base, mixed, divisor if normalize else None, lambda_)
    out = torch.empty(base.shape, dtype=dtype, device=device)
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    flats = [x.reshape(-1) for x in weighted]
    summer = BlockSummer(dtype, device, min(base.numel(), BLOCK))
    for block in blocks(base.numel()):
        parts = [f[block] for f in flats]
        if consensus:
            mixed, block_divisor = _consensus_block(parts, w, summer)
        else:
            mixed, block_divisor = summer.sum_into(torch.empty_like(parts[0]), parts), divisor
        flat_out[block] = _finish(flat_base[block], mixed, block_divisor if normalize else None, lambda_)
    return out


def _finish(base: torch.Tensor, mixed: torch.Tensor, divisor: torch.Tensor | None, lambda_: float) -> torch.Tensor:
    """``base + λ·(D / S)``: divide when normalising, skip the multiply when λ = 1."""
    if divisor is not None:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return (base + mixed).to(base.dtype)


def _consensus_block(parts: list[torch.Tensor], w: torch.Tensor, summer: BlockSummer):
    """One block of the TIES "sum" election (see :func:`_consensus_sums`)."""
    positive = summer.sum_into(torch.empty_like(parts[0]), parts) >= 0
    agrees = [torch.where(positive, x > 0, x < 0) for x in parts]
    mixed = summer.sum_into(torch.empty_like(parts[0]), [x * a for x, a in zip(parts, agrees)])
    divisor = summer.sum_into(torch.empty_like(parts[0]), [a.to(w.dtype) * w[i] for i, a in enumerate(agrees)])
    divisor.masked_fill_(divisor == 0, 1)
    return mixed, divisor


def _consensus_sums(
    weighted: list[torch.Tensor],
    w: torch.Tensor,
    shape: torch.Size,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES "sum" election: D = Σ ω_i where sign(ω_i) = elected sign; S = Σ w_i there (0 → 1).

    The elected sign is + where the dtype-rounded Σω ≥ 0. Entries with ω_i = 0 (dropped by
    the sparsifier, or a zero weight) never agree with either sign. (Whole-tensor form, used
    with more than STREAMED_TERMS_MAX inputs; :func:`_consensus_block` is the same per block.)
    """
    positive = stacked_sum([_part(x) for x in weighted], shape, dtype, device) >= 0
    agrees = [torch.where(positive, x > 0, x < 0) for x in weighted]
    del positive
    mixed = stacked_sum([_part(x * a) for x, a in zip(weighted, agrees)], shape, dtype, device)
    divisor = stacked_sum([_part(a.to(dtype) * w[i]) for i, a in enumerate(agrees)], shape, dtype, device)
    divisor.masked_fill_(divisor == 0, 1)
    return mixed, divisor


def _part(tensor: torch.Tensor) -> Term:
    flat = tensor.reshape(-1)
    return lambda block: flat[block]


# --- chunked form (see chunked.py): the same merge over row blocks, bit for bit


def task_vector_chunked(variant: TaskVectorVariant) -> ChunkedForm:
    """Passes: top-k selection (one histogram pass for 16-bit magnitudes, two for float32),
    then, with ``rescale``, one pass for the kept deltas' L1 norms (a random mask is known
    up front, so DARE needs only that one). Element-wise members need none."""

    def active(density: float) -> bool:
        return variant.sparsifier != "none" and float(density) < 1

    def selection_passes(dtype: torch.dtype) -> int | None:
        if variant.sparsifier != "magnitude":
            return 0
        return {torch.bfloat16: 1, torch.float16: 1, torch.float32: 2}.get(dtype)

    def passes(params, per_model, dtype):
        # per_model includes the base's parameters; a density set for it changes nothing but
        # may cost a pass.
        if len(per_model) > STREAMED_TERMS_MAX + 1 or variant.sparsifier not in ("none", "magnitude", "random"):
            return None
        if not any(active(p.get("density", 1.0)) for p in per_model):
            return 0
        selection = selection_passes(dtype)
        if selection is None or (selection and not sort_order.replayable()):
            return None  # without numba, only a whole-tensor sort picks the sort's ties
        spill = 1 if selection else 0
        return selection + spill + (1 if params["rescale"] else 0)

    def stats(index: int, call, state):
        base, dtype = call.base, call.base.dtype
        rescale = bool(call.params["rescale"])
        selection = selection_passes(dtype)
        parts = []
        for i, tensor in enumerate(call.tensors):
            density = float(call.per_model[i]["density"])
            part: dict[str, Any] = {}
            parts.append(part)
            if not active(density):
                continue
            if (
                variant.sparsifier == "magnitude"
                and index < selection
                and not rescale
                and fused.applies(base, [tensor])
            ):
                if index == 0:
                    (part["hist"],) = fused.delta_histograms(base, [tensor])
                    part["level"] = "single" if selection == 1 else "high"
                else:  # float32: the low digit inside the chosen high bucket
                    (part["hist"],) = fused.delta_histograms(base, [tensor], [state[i]["bucket"]])
                    part["level"] = "low"
                continue
            if variant.sparsifier == "magnitude" and index == selection:  # the spill pass
                if "spill" in state[i]:
                    chosen = state[i]
                    chosen["spill"].write_keys(
                        call.offset, _chunk_keys(base, tensor), chosen["key"], chosen["equal_before"][call.chunk]
                    )
                    part["spilled"] = True
                continue
            if variant.sparsifier == "random":
                mask = dare_mask(base.shape, density, call.generator(i), call.offset)
                if fused.applies(base, [tensor]):
                    part["l1_before"], part["l1_after"] = fused.delta_l1_partials(base, tensor, mask.numpy())
                else:
                    delta = tensor.to(dtype) - base
                    part["l1_before"], part["l1_after"] = l1_partials(delta), l1_partials(delta * mask.to(delta.device))
                continue
            delta = tensor.to(dtype) - base
            keys = order_keys(delta.abs().reshape(-1))
            if index == 0:
                part["hist"] = torch.bincount(keys if selection == 1 else keys >> 16, minlength=1 << 16).cpu()
                part["level"] = "single" if selection == 1 else "high"
                if rescale:
                    part["l1_before"] = l1_partials(delta)
            elif index < selection:  # float32: the low 16 bits inside the chosen high bucket
                bucket = state[i]["bucket"]
                part["hist"] = torch.bincount(keys[(keys >> 16) == bucket] & 0xFFFF, minlength=1 << 16).cpu()
                part["level"] = "low"
            else:
                part["l1_after"] = l1_partials(delta * _chunk_top_mask(keys, state[i], call.chunk).view(delta.shape))
        return parts

    def combine(index: int, partials: list, state, call):
        numel = math.prod(call.full_shape)
        new_state = [dict(s) for s in state] if state is not None else [{} for _ in call.per_model]
        spilled = [i for i in range(len(new_state)) if partials and partials[0][i] and partials[0][i].get("spilled")]
        if spilled:  # the sort's choices, replayed on the scratch files, the inputs side by side
            try:
                replays = fused.each_on_a_thread(lambda i: _replay_spill(new_state[i]), spilled)
            finally:
                for i in spilled:
                    new_state[i].pop("spill").close()
            for i, listed in zip(spilled, replays):
                new_state[i]["listed"] = listed
        for i, model_state in enumerate(new_state):
            parts = [chunk_parts[i] for chunk_parts in partials]
            if not parts or not parts[0]:
                continue
            if "hist" in parts[0]:
                _combine_selection(model_state, parts, numel, float(call.per_model[i]["density"]))
                if "key" in model_state and _sort_decides(
                    model_state["missing"], sum(model_state["equal_counts"]), model_state["key"]
                ):
                    model_state["spill"] = sort_order.Spill(numel, call.scratch_dir)  # the sort decides some ties
            if "l1_before" in parts[0]:
                model_state["l1_before"] = exact_sum([x for p in parts for x in p["l1_before"]])
            if "l1_after" in parts[0]:
                after = exact_sum([x for p in parts for x in p["l1_after"]])
                before = model_state["l1_before"]
                model_state["factor"] = None if before < RESCALE_EPS or after < RESCALE_EPS else before / after
        return new_state

    def apply(call, state):
        base, dtype = call.base, call.base.dtype
        rescale = bool(call.params["rescale"])
        if _fusable(variant.sparsifier, rescale and variant.sparsifier == "magnitude", base, call.tensors):
            return _fused_chunk(call, state)
        weighted = []
        for i, tensor in enumerate(call.tensors):
            density = float(call.per_model[i]["density"])
            kept = tensor.to(dtype) - base
            if active(density):
                if variant.sparsifier == "random":
                    mask = dare_mask(kept.shape, density, call.generator(i), call.offset).to(kept.device)
                else:
                    mask = _chunk_top_mask(order_keys(kept.abs().reshape(-1)), state[i], call.chunk).view(kept.shape)
                kept = kept * mask
                if rescale and state[i].get("factor") is not None:
                    kept = kept * state[i]["factor"]
            weighted.append(
                kept.mul_(torch.tensor(float(call.per_model[i]["weight"]), dtype=dtype, device=kept.device))
            )
        return combine_weighted(
            base,
            weighted,
            [p["weight"] for p in call.per_model],
            consensus=variant.consensus,
            normalize=bool(call.params["normalize"]),
            lambda_=float(call.params["lambda"]),
        )

    def _fused_chunk(call, state):
        rules = []
        for i in range(len(call.tensors)):
            density, weight = float(call.per_model[i]["density"]), float(call.per_model[i]["weight"])
            if not active(density):
                rules.append(fused.InputRule(weight))
            elif variant.sparsifier == "random":
                mask = dare_mask(call.base.shape, density, call.generator(i), call.offset).numpy()
                factor = state[i].get("factor") if bool(call.params["rescale"]) else None
                rules.append(fused.InputRule(weight, fused.MODE_MASK, mask=mask, factor=factor))
            else:
                selection = state[i]
                key, start = selection["key"], selection["equal_before"][call.chunk]
                if "listed" in selection:
                    rules.append(
                        fused.InputRule(weight, fused.MODE_LISTED, key=key, equal=start, listed=selection["listed"])
                    )
                    continue
                equal_here = selection["equal_counts"][call.chunk]
                need = max(0, min(equal_here, selection["missing"] - start))
                rules.append(
                    fused.InputRule(weight, fused.MODE_MAGNITUDE, key=key, equal=_equal_policy(need, equal_here))
                )
        return fused.merge(
            call.base,
            call.tensors,
            rules,
            consensus=variant.consensus,
            normalize=bool(call.params["normalize"]),
            lambda_=float(call.params["lambda"]),
        )

    def fused_kernels(dtype, count):
        return (
            dtype in fused.DTYPES
            and 1 <= count <= 4
            and fused.available()
            and variant.sparsifier in ("none", "magnitude", "random")
        )

    return ChunkedForm(passes=passes, apply=apply, stats=stats, combine=combine, fused=fused_kernels)


def _combine_selection(state: dict, parts: list[dict], numel: int, density: float) -> None:
    """Fold one selection pass's per-chunk histograms into ``state`` (see kth_largest_key)."""
    hists = [p["hist"] for p in parts]
    total = torch.stack(hists).sum(0)
    level = parts[0]["level"]
    if level == "high":
        state["k"] = _top_k_count(numel, density)
        state["bucket"], state["above"] = kth_in_histogram(total, state["k"])
        return
    if level == "single":
        state["k"] = _top_k_count(numel, density)
        digit, above = kth_in_histogram(total, state["k"])
        key = digit
    else:
        digit, above_low = kth_in_histogram(total, state["k"] - state["above"])
        key, above = (state["bucket"] << 16) | digit, state["above"] + above_low
    equal = [int(h[digit].item()) for h in hists]
    state["key"], state["missing"] = key, state["k"] - above
    state["equal_before"] = tuple(sum(equal[:c]) for c in range(len(equal)))
    state["equal_counts"] = tuple(equal)


def _top_k_count(numel: int, density: float) -> int:
    k = int(density * numel)
    if k <= 0:
        magnitude_sparsify(torch.empty(numel, dtype=torch.uint8), density)  # raises the k = 0 error
    return k


def _chunk_keys(base: torch.Tensor, tensor: torch.Tensor) -> np.ndarray:
    """int32 magnitude keys of one chunk's delta (flattened), for the spill."""
    if fused.applies(base, [tensor]):
        return fused.delta_keys(base, tensor)
    return order_keys((tensor.to(base.dtype) - base).abs().reshape(-1)).cpu().numpy()


def _chunk_top_mask(keys: torch.Tensor, selection: Mapping[str, Any], chunk: int) -> torch.Tensor:
    """This chunk's part of the whole tensor's top-k mask. Of the entries on the threshold
    key: those the sort puts first (``listed``), else the first in index order, which is
    used only where the choice cannot change the merge (all or none survive, or zeros)."""
    key = selection["key"]
    keep, equal = keys > key, keys == key
    if "listed" in selection:
        positions = equal.nonzero().reshape(-1)
        start = selection["equal_before"][chunk]
        listed = torch.from_numpy(selection["listed"][start : start + positions.numel()]).to(keys.device)
        keep[positions[listed]] = True
        return keep
    equal_here = int(torch.count_nonzero(equal).item())
    need = max(0, min(equal_here, selection["missing"] - selection["equal_before"][chunk]))
    if need == equal_here:
        keep |= equal
    elif need > 0:
        keep[equal.nonzero().reshape(-1)[:need]] = True
    return keep
