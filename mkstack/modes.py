"""Command-line stacking modes -> slices: pure functions of model names, depths and mode numbers.

Every mode ends as a plain list of :class:`StackSlice` values, which become an ordinary
``passthrough`` recipe (:mod:`mkstack.recipe_text`), so what ``--print-recipe`` shows is
exactly what runs. Ranges are half-open and 0-based, as in recipes.

The interleave rule (Goliath-style): window k covers layers ``[k·s, k·s + W)`` of model A
for even k and model B for odd k, with stride ``s = W − O``; windows continue until one
reaches the last layer (its end is clipped to the depth). From the third window on, each
window starts one layer later (``k·s + 1``). That is the convention of the Goliath-120B
recipe, whose ranges ``0-16, 17-32, 33-48, …`` read like inclusive ranges; half-open, it
drops one layer per window. For two 80-layer models, W=16, O=8 this gives
A[0,16) B[8,24) A[17,32) B[25,40) … A[65,80): 9 windows, 16+16+7·15 = 137 layers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mksuite.common.arch import ArchitectureDefinition
from mksuite.common.errors import ArchitectureError, RecipeError


@dataclass(frozen=True)
class StackSlice:
    """Layers ``[start, end)`` of ``model``, with optional per-tensor ``scale`` settings.

    ``model`` is a model reference string as a recipe would hold it (path, Hub id,
    ``id@revision``). ``scale`` lists ``(filter, value)`` pairs tried in order against each
    tensor name (substring match); tensors no filter matches keep scale 1.
    """

    model: str
    start: int
    end: int
    scale: tuple[tuple[str, float], ...] = ()

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SliceArg:
    """One ``--slice MODEL:START-END`` argument, parsed but not yet checked against a depth."""

    text: str
    model: str
    start: int
    end: int


_SLICE = re.compile(r"^(?P<model>.+):(?P<start>-?\d+)-(?P<end>-?\d+)$")


def parse_slice_arg(text: str, aliases: Mapping[str, str] | None = None) -> SliceArg:
    """Read ``MODEL:START-END`` (half-open); MODEL may be an alias from ``--model NAME=REF``."""
    match = _SLICE.match(text.strip())
    if match is None:
        raise RecipeError(
            f"cannot read `--slice {text}`",
            field="--slice",
            hint="write MODEL:START-END with a half-open range, e.g. --slice org/model:0-16 (layers 0..15)",
        )
    model = match["model"]
    return SliceArg(text, (aliases or {}).get(model, model), int(match["start"]), int(match["end"]))


def slices_from_args(args: Sequence[SliceArg], depths: Mapping[str, int]) -> list[StackSlice]:
    """``--slice`` arguments as slices, each range checked against its model's depth."""
    slices = []
    for arg in args:
        depth = depths[arg.model]
        if arg.start < 0 or arg.end <= arg.start:
            raise RecipeError(
                f"`--slice {arg.text}` selects no layers: [{arg.start}, {arg.end}) is empty",
                field="--slice",
                hint="ranges are half-open and 0-based: MODEL:0-16 selects layers 0..15",
            )
        if arg.end > depth:
            raise RecipeError(
                f"`--slice {arg.text}` reaches layer {arg.end - 1}, "
                f"but {arg.model} has {depth} layers (0..{depth - 1})",
                field="--slice",
                hint=f"the end is exclusive: {arg.model}:{arg.start}-{depth} runs to the last layer",
            )
        slices.append(StackSlice(arg.model, arg.start, arg.end))
    return slices


def interleave_slices(model_a: str, model_b: str, *, depth: int, window: int, overlap: int) -> list[StackSlice]:
    """Goliath-style alternation of two same-depth models (the rule is in the module docstring)."""
    if not 0 < overlap < window:
        raise RecipeError(
            f"--overlap {overlap} must be at least 1 and smaller than --window {window}",
            field="--overlap",
            hint="Goliath-120B used --window 16 --overlap 8",
        )
    if window >= depth:
        raise RecipeError(
            f"--window {window} covers all {depth} layers, so there is nothing to alternate",
            field="--window",
            hint=f"choose a window smaller than {depth}, e.g. {max(2, depth // 5)}",
        )
    stride = window - overlap
    slices: list[StackSlice] = []
    end, k = 0, 0
    while end < depth:
        start = k * stride + (1 if k >= 2 else 0)
        end = min(k * stride + window, depth)
        slices.append(StackSlice(model_a if k % 2 == 0 else model_b, start, end))
        k += 1
    return slices


def upscale_slices(model: str, *, depth: int, overlap: int) -> list[StackSlice]:
    """SOLAR-style depth up-scaling: ``[0, L−O)`` then ``[O, L)`` of the same model."""
    if not 0 <= overlap < depth:
        raise RecipeError(
            f"--overlap {overlap} must lie in [0, {depth}) for a {depth}-layer model",
            field="--overlap",
            hint="SOLAR-10.7B used --overlap 8 on a 32-layer model (48 layers out)",
        )
    return [StackSlice(model, 0, depth - overlap), StackSlice(model, overlap, depth)]


def expand_slices(model: str, *, depth: int, every: int, zero_filters: Sequence[str]) -> list[StackSlice]:
    """Block expansion (LLaMA Pro): after every ``every``-th layer, a copy of it whose residual writes are zero.

    The copy's output projections (``zero_filters``, from :func:`residual_write_filters`)
    get scale 0, so the copy adds nothing to the residual stream and the expanded model
    computes what the original computes.
    """
    if not 1 <= every <= depth:
        raise RecipeError(
            f"--every {every} must lie in [1, {depth}] for a {depth}-layer model",
            field="--every",
            hint="LLaMA Pro used --every 4 on a 32-layer model (40 layers out)",
        )
    zeroed = tuple((name, 0.0) for name in zero_filters)
    slices: list[StackSlice] = []
    for end in range(every, depth + 1, every):
        slices.append(StackSlice(model, end - every, end))
        slices.append(StackSlice(model, end - 1, end, zeroed))
    if depth % every:
        slices.append(StackSlice(model, depth - depth % every, depth))
    return slices


# Tensor-name filters (substrings) of the projections through which a layer writes into the
# residual stream, by role. Zeroing every one of them (weights and biases, which the filters
# also match) makes a pre-norm layer an identity map: what a zero write passes through a
# post-norm (Gemma's) is still zero.
RESIDUAL_WRITES: tuple[tuple[str, str], ...] = (
    ("self_attn.o_proj.", "attention"),  # llama, mistral, qwen2/3, gemma2/3, phi3, mixtral, qwen MoE, gpt-oss
    ("attn.c_proj.", "attention"),  # gpt2, gpt_bigcode
    ("attention.dense.", "attention"),  # gpt_neox; falcon's self_attention.dense
    ("self_attn.dense.", "attention"),  # phi
    ("attn.out_proj.", "attention"),  # gptj
    ("attention.out_proj.", "attention"),  # exaone
    ("down_proj.", "mlp"),  # dense MLPs, MoE experts and shared experts
    ("experts.down_proj", "mlp"),  # experts stored fused, with their bias (gpt-oss)
    ("mlp.c_proj.", "mlp"),  # gpt2, gpt_bigcode, starcoder2, exaone
    ("mlp.dense_4h_to_h.", "mlp"),  # gpt_neox, falcon
    ("mlp.fc2.", "mlp"),  # phi
    ("mlp.fc_out.", "mlp"),  # gptj
    (".w2.", "mlp"),  # mixtral and phimoe experts (w1/w3 feed the activation)
    ("block_sparse_moe.output_linear.", "mlp"),  # granitemoe
    ("mixer.out_proj.", "mixer"),  # mamba: the whole block writes through it
)
# Role sets whose zeroing makes a layer an identity: attention and MLP, or a single mixer.
IDENTITY_ROLES = ({"attention", "mlp"}, {"mixer"})


def residual_write_filters(arch: ArchitectureDefinition) -> tuple[str, ...]:
    """Filters that select the output projections of ``arch``'s layers; ArchitectureError if unknown."""
    names = [t.name for t in arch.layer_weight_templates]
    found = [(pattern, role) for pattern, role in RESIDUAL_WRITES if any(pattern in n for n in names)]
    roles = {role for _, role in found}
    if not any(needed <= roles for needed in IDENTITY_ROLES):
        missing = " and ".join(sorted({"attention", "mlp"} - roles))
        raise ArchitectureError(
            f"block expansion does not know the {missing} output projection of architecture `{arch.name}`, "
            "so it cannot make an inserted layer an identity",
            hint="use --slice or a recipe whose `scale` filter list zeroes those projections",
        )
    return tuple(pattern for pattern, _ in found)
