"""The task-vector merge over row blocks (see chunked.py), bit for bit the whole-tensor merge.

Statistics passes: top-k selection (one histogram pass for 16-bit magnitudes, two for
float32), a spill pass where torch's sort decides which entries on the threshold survive,
then, with ``rescale``, one pass for the kept deltas' L1 norms (a random mask is known up
front, so DARE needs only that one). Element-wise members need none.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from mkmerge.methods import fused, sort_order
from mkmerge.methods.chunked import ChunkedForm
from mkmerge.methods.reductions import STREAMED_TERMS_MAX, exact_sum, l1_partials
from mkmerge.methods.sort_order import kth_in_histogram, order_keys
from mkmerge.methods.sparsifiers import dare_mask
from mkmerge.methods.task_vector_core import TaskVectorVariant, combine_weighted, rescale_factor
from mkmerge.methods.task_vector_fused import equal_policy, fusable, sort_decides, top_k_count

# Which digit of the magnitude keys a selection histogram counts: all 16 bits of a half
# format's key, or float32's high 16 bits, then its low 16 inside the chosen high bucket.
SINGLE, HIGH, LOW = "single", "high", "low"


@dataclass
class InputPartial:
    """One input's partial from one chunk in one statistics pass (None where it has nothing)."""

    hist: torch.Tensor | None = None  # selection histogram of the delta's magnitude keys
    level: str | None = None  # SINGLE, HIGH or LOW: which digit ``hist`` counts
    spilled: bool = False  # the chunk's keys went to the input's spill file
    l1_before: list[float] | None = None  # L1 partials of the delta
    l1_after: list[float] | None = None  # L1 partials of the sparsified delta
    dtype: torch.dtype | None = None  # the merge dtype (the rescale factor is rounded to it)


@dataclass
class InputState:
    """What the statistics passes know of one input's whole delta."""

    k: int | None = None  # entries the top-k keeps
    bucket: int | None = None  # float32: the high digit of the threshold key
    above: int | None = None  # entries with keys above the bucket (float32, after the high pass)
    key: int | None = None  # the threshold key: the k-th largest magnitude key
    missing: int | None = None  # entries on the key that survive
    equal_before: tuple[int, ...] = ()  # per chunk, entries on the key in the chunks before it
    equal_counts: tuple[int, ...] = ()  # per chunk, entries on the key in it
    spill: sort_order.Spill | None = None  # open only during the spill pass
    listed: np.ndarray | None = None  # which entries on the key torch's sort keeps, in index order
    l1_before: float | None = None
    factor: float | None = None  # the L1 rescale factor (None: skipped)


def task_vector_chunked(variant: TaskVectorVariant) -> ChunkedForm:
    """The :class:`ChunkedForm` of one member of the family (module docstring)."""

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

    def stats(index: int, call, state: list[InputState] | None) -> list[InputPartial | None]:
        selection = selection_passes(call.base.dtype)
        rescale = bool(call.params["rescale"])
        return [
            _input_partial(index, call, i, tensor, state, selection, rescale)
            if active(call.per_model[i]["density"])
            else None
            for i, tensor in enumerate(call.tensors)
        ]

    def _input_partial(index, call, i, tensor, state, selection, rescale) -> InputPartial | None:
        base, dtype = call.base, call.base.dtype
        density = float(call.per_model[i]["density"])
        part = InputPartial(dtype=dtype)
        if variant.sparsifier == "magnitude" and index < selection and not rescale and fused.applies(base, [tensor]):
            if index == 0:
                (part.hist,) = fused.delta_histograms(base, [tensor])
                part.level = SINGLE if selection == 1 else HIGH
            else:  # float32: the low digit inside the chosen high bucket
                (part.hist,) = fused.delta_histograms(base, [tensor], [state[i].bucket])
                part.level = LOW
            return part
        if variant.sparsifier == "magnitude" and index == selection:  # the spill pass
            chosen = state[i]
            if chosen.spill is None:
                return None
            chosen.spill.write_keys(call.offset, _chunk_keys(base, tensor), chosen.key, chosen.equal_before[call.chunk])
            part.spilled = True
            return part
        if variant.sparsifier == "random":
            mask = dare_mask(base.shape, density, call.generator(i), call.offset)
            if fused.applies(base, [tensor]):
                part.l1_before, part.l1_after = fused.delta_l1_partials(base, tensor, mask.numpy())
            else:
                delta = tensor.to(dtype) - base
                part.l1_before, part.l1_after = l1_partials(delta), l1_partials(delta * mask.to(delta.device))
            return part
        delta = tensor.to(dtype) - base
        keys = order_keys(delta.abs().reshape(-1))
        if index == 0:
            part.hist = torch.bincount(keys if selection == 1 else keys >> 16, minlength=1 << 16).cpu()
            part.level = SINGLE if selection == 1 else HIGH
            if rescale:
                part.l1_before = l1_partials(delta)
        elif index < selection:  # float32: the low 16 bits inside the chosen high bucket
            bucket = state[i].bucket
            part.hist = torch.bincount(keys[(keys >> 16) == bucket] & 0xFFFF, minlength=1 << 16).cpu()
            part.level = LOW
        else:
            part.l1_after = l1_partials(delta * _chunk_top_mask(keys, state[i], call.chunk).view(delta.shape))
        return part

    def combine(index: int, partials: list, state: list[InputState] | None, call) -> list[InputState]:
        numel = math.prod(call.full_shape)
        new_state = (
            [dataclasses.replace(s) for s in state] if state is not None else [InputState() for _ in call.per_model]
        )
        spilled = [i for i in range(len(new_state)) if partials and partials[0][i] and partials[0][i].spilled]
        if spilled:  # the sort's choices, replayed on the scratch files, the inputs side by side
            try:
                replays = fused.each_on_a_thread(lambda i: _replay_spill(new_state[i]), spilled)
            finally:
                for i in spilled:
                    spill, new_state[i].spill = new_state[i].spill, None
                    spill.close()
            for i, listed in zip(spilled, replays):
                new_state[i].listed = listed
        for i, model_state in enumerate(new_state):
            parts = [chunk_parts[i] for chunk_parts in partials]
            if not parts or not parts[0]:
                continue
            if parts[0].hist is not None:
                _combine_selection(model_state, parts, numel, float(call.per_model[i]["density"]))
                if model_state.key is not None and sort_decides(
                    model_state.missing, sum(model_state.equal_counts), model_state.key
                ):
                    model_state.spill = sort_order.Spill(numel, call.scratch_dir)  # the sort decides some ties
            if parts[0].l1_before is not None:
                model_state.l1_before = exact_sum([x for p in parts for x in p.l1_before])
            if parts[0].l1_after is not None:
                after = exact_sum([x for p in parts for x in p.l1_after])
                before = model_state.l1_before
                dtype = None if call.params.get("precise") else parts[0].dtype
                model_state.factor = rescale_factor(before, after, dtype)
        return new_state

    def apply(call, state: list[InputState] | None):
        base, dtype = call.base, call.base.dtype
        rescale = bool(call.params["rescale"])
        if fusable(variant.sparsifier, rescale and variant.sparsifier == "magnitude", base, call.tensors):
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
                if rescale and state[i].factor is not None:
                    kept = kept * state[i].factor
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

    def _fused_chunk(call, state: list[InputState] | None):
        rules = []
        for i in range(len(call.tensors)):
            density, weight = float(call.per_model[i]["density"]), float(call.per_model[i]["weight"])
            if not active(density):
                rules.append(fused.InputRule(weight))
            elif variant.sparsifier == "random":
                mask = dare_mask(call.base.shape, density, call.generator(i), call.offset).numpy()
                factor = state[i].factor if bool(call.params["rescale"]) else None
                rules.append(fused.InputRule(weight, fused.MODE_MASK, mask=mask, factor=factor))
            else:
                selection = state[i]
                key, start = selection.key, selection.equal_before[call.chunk]
                if selection.listed is not None:
                    rules.append(
                        fused.InputRule(weight, fused.MODE_LISTED, key=key, equal=start, listed=selection.listed)
                    )
                    continue
                equal_here = selection.equal_counts[call.chunk]
                need = max(0, min(equal_here, selection.missing - start))
                rules.append(
                    fused.InputRule(weight, fused.MODE_MAGNITUDE, key=key, equal=equal_policy(need, equal_here))
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


def _replay_spill(model_state: InputState) -> np.ndarray:
    """:func:`sort_order.replay_spilled` of one input's spilled words (its chunked state)."""
    equal = sum(model_state.equal_counts)
    return sort_order.replay_spilled(model_state.spill, model_state.key, model_state.k, equal)


def _combine_selection(state: InputState, parts: list[InputPartial], numel: int, density: float) -> None:
    """Fold one selection pass's per-chunk histograms into ``state`` (see kth_largest_key)."""
    hists = [p.hist for p in parts]
    total = torch.stack(hists).sum(0)
    level = parts[0].level
    if level == HIGH:
        state.k = top_k_count(numel, density)
        state.bucket, state.above = kth_in_histogram(total, state.k)
        return
    if level == SINGLE:
        state.k = top_k_count(numel, density)
        digit, above = kth_in_histogram(total, state.k)
        key = digit
    else:
        digit, above_low = kth_in_histogram(total, state.k - state.above)
        key, above = (state.bucket << 16) | digit, state.above + above_low
    equal = [int(h[digit].item()) for h in hists]
    state.key, state.missing = key, state.k - above
    state.equal_before = tuple(sum(equal[:c]) for c in range(len(equal)))
    state.equal_counts = tuple(equal)


def _chunk_keys(base: torch.Tensor, tensor: torch.Tensor) -> np.ndarray:
    """int32 magnitude keys of one chunk's delta (flattened), for the spill."""
    if fused.applies(base, [tensor]):
        return fused.delta_keys(base, tensor)
    return order_keys((tensor.to(base.dtype) - base).abs().reshape(-1)).cpu().numpy()


def _chunk_top_mask(keys: torch.Tensor, selection: InputState, chunk: int) -> torch.Tensor:
    """This chunk's part of the whole tensor's top-k mask. Of the entries on the threshold
    key: those the sort puts first (``listed``), else the first in index order, which is
    used only where the choice cannot change the merge (all or none survive, or zeros)."""
    key = selection.key
    keep, equal = keys > key, keys == key
    if selection.listed is not None:
        positions = equal.nonzero().reshape(-1)
        start = selection.equal_before[chunk]
        listed = torch.from_numpy(selection.listed[start : start + positions.numel()]).to(keys.device)
        keep[positions[listed]] = True
        return keep
    equal_here = int(torch.count_nonzero(equal).item())
    need = max(0, min(equal_here, selection.missing - selection.equal_before[chunk]))
    if need == equal_here:
        keep |= equal
    elif need > 0:
        keep[equal.nonzero().reshape(-1)[:need]] = True
    return keep
