"""Router (gate) vectors for every layer, from prompts or at random (docs/moe.md).

The math is in small pure functions (states in, vectors out); :func:`compute_gates` feeds
them from the base model. Rows are the routed experts in config order, then (Qwen2-MoE) the
shared expert, whose row becomes ``shared_expert_gate``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mkmoe.config import ExpertConfig
from mkmoe.layouts import router_name
from mkmoe.plan import MoePlan
from mkmoe.prompts import encode_prompts, load_tokenizer, prompt_token_ids
from mkmoe.streaming import MERGEKIT_FORWARD, PRECISE_FORWARD, WeightCache, layer_input_states
from mksuite.common.graph import tensor_seed

CONDITION_LIMIT = 5.0
_EPS = 1e-8


# -- pure math ------------------------------------------------------------------------------------
def unit_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Each vector along the last dimension scaled to unit L2 norm (norms below 1e-8 count as 1e-8)."""
    return matrix / matrix.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def prompt_gate_vectors(
    states: torch.Tensor, positive: Sequence[Sequence[int]], negative: Sequence[Sequence[int]]
) -> torch.Tensor:
    """``[layers, rows, hidden]`` from per-prompt states ``[layers, prompts, hidden]``.

    Row r is the mean state of prompts ``positive[r]``, minus the mean of ``negative[r]`` when
    it has any, normalised per layer.
    """
    rows = []
    for pos, neg in zip(positive, negative):
        vector = states[:, list(pos)].mean(dim=1)
        if neg:
            vector = vector - states[:, list(neg)].mean(dim=1)
        rows.append(vector)
    return unit_rows(torch.stack(rows, dim=1))


def cheap_embed_vector(
    embedding: torch.Tensor, positive: Sequence[Sequence[int]], negative: Sequence[Sequence[int]]
) -> torch.Tensor:
    """unit(unit(Σ positive rows) − unit(Σ negative rows)); just unit(Σ positive rows) without negatives.

    ``positive`` and ``negative`` hold each prompt's token ids. The sums run in float32,
    over each prompt's tokens first and then over the prompts, the order mergekit-moe sums
    in (its float32 gates match bit for bit).
    """
    vector = unit_rows(_token_sum(embedding, positive))
    if negative:
        vector = unit_rows(vector - unit_rows(_token_sum(embedding, negative)))
    return vector


def _token_sum(embedding: torch.Tensor, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    per_prompt = [embedding[list(ids)].float().sum(dim=0) for ids in prompts if ids]
    return torch.stack(per_prompt).sum(dim=0)


def random_gate_matrix(seed: int, name: str, rows: int, hidden: int, *, uniform: bool) -> torch.Tensor:
    """Row r drawn from a generator seeded by (seed, name, r): standard normal, or U(±1/√hidden)."""
    matrix = torch.empty(rows, hidden)
    for row in range(rows):
        generator = torch.Generator().manual_seed(tensor_seed(seed, name, row))
        if uniform:
            bound = 1.0 / math.sqrt(hidden)
            matrix[row] = (torch.rand(hidden, generator=generator) * 2 - 1) * bound
        else:
            matrix[row] = torch.randn(hidden, generator=generator)
    return matrix


def condition_number(matrix: torch.Tensor) -> float:
    """Largest over smallest singular value (inf when the rows are linearly dependent)."""
    values = torch.linalg.svdvals(matrix.double())
    if matrix.shape[0] > matrix.shape[1] or values[-1] <= 0:
        return math.inf
    return float(values[0] / values[-1])


def closest_rows(matrix: torch.Tensor) -> tuple[int, int, float]:
    """The two rows with the highest cosine similarity, and that similarity."""
    unit = unit_rows(matrix.double())
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-math.inf)
    flat = int(similarity.argmax())
    first, second = divmod(flat, matrix.shape[0])
    return min(first, second), max(first, second), float(similarity[first, second])


@dataclass(frozen=True)
class Degenerate:
    layer: int
    condition: float
    experts: tuple[int, int]
    cosine: float


def degenerate_layers(gates: Sequence[torch.Tensor], limit: float = CONDITION_LIMIT) -> list[Degenerate]:
    """Layers whose gate matrix has condition number above ``limit``, with their closest expert pair."""
    found = []
    for layer, matrix in enumerate(gates):
        if matrix.shape[0] < 2:
            continue
        condition = condition_number(matrix)
        if condition > limit:
            first, second, cosine = closest_rows(matrix)
            found.append(Degenerate(layer, condition, (first, second), cosine))
    return found


# -- from the plan --------------------------------------------------------------------------------
def compute_gates(
    plan: MoePlan, *, seed: int = 0, device: torch.device | None = None, precise: bool = False
) -> dict[str, torch.Tensor]:
    """Every gate matrix the plan loads, by output tensor name, float32; warns about degenerate routing.

    Hidden-state gates come from a bfloat16 forward pass (mergekit-moe's numbers), or a
    float32 one with ``precise``.
    """
    config = plan.config
    rows = list(config.experts) + (list(config.shared_experts[:1]) if plan.shared_gate_names else [])
    if config.gate_mode in ("random", "uniform_random"):
        uniform = config.gate_mode == "uniform_random"
        per_layer = [_random_layer(plan, layer, seed, uniform) for layer in range(plan.num_layers)]
    elif config.gate_mode == "cheap_embed":
        per_layer = [_cheap_embed_rows(plan, rows)] * plan.num_layers
    else:
        reduce = "mean" if config.gate_mode == "hidden_avg" else "last"
        per_layer = list(_hidden_rows(plan, rows, reduce, device, precise))
    experts = len(config.experts)
    _warn_if_degenerate(plan, [matrix[:experts] for matrix in per_layer])
    gates = {name: per_layer[layer][:experts].contiguous() for layer, name in enumerate(plan.router_names)}
    for layer, name in enumerate(plan.shared_gate_names):
        gates[name] = per_layer[layer][experts:].contiguous()
    return gates


def _random_layer(plan: MoePlan, layer: int, seed: int, uniform: bool) -> torch.Tensor:
    # Seeded by the classic router name, so both layouts get the same router.
    name = router_name(plan.arch, "classic", layer)
    matrix = random_gate_matrix(seed, name, plan.num_experts, plan.hidden_size, uniform=uniform)
    if plan.shared_gate_names:
        shared = random_gate_matrix(seed, plan.shared_gate_names[layer], 1, plan.hidden_size, uniform=uniform)
        matrix = torch.cat([matrix, shared])
    return matrix


def _cheap_embed_rows(plan: MoePlan, rows: list[ExpertConfig]) -> torch.Tensor:
    base = plan.base
    tokenizer = load_tokenizer(base.path)
    embed_name = base.locate(base.arch.pre_weights(base.num_layers)[0])
    embedding = base.files.tensors.load(embed_name)

    def ids(prompts) -> list[list[int]]:
        return [prompt_token_ids(tokenizer, prompt) for prompt in prompts]

    return torch.stack([cheap_embed_vector(embedding, ids(e.positive_prompts), ids(e.negative_prompts)) for e in rows])


def _hidden_rows(plan: MoePlan, rows: list[ExpertConfig], reduce: str, device, precise: bool) -> torch.Tensor:
    """``[layers, rows, hidden]`` from the base's hidden states for each row's prompts.

    By default as mergekit-moe computes them (its numbers, bit for bit): each expert's
    positive prompts, and its negative ones, go through the model as one batch of their
    own in bfloat16 (:data:`MERGEKIT_FORWARD`), and the means, difference and normalisation
    round to bfloat16. With ``precise``: one float32 pass over every distinct prompt at its
    own positions, float32 math.
    """
    tokenizer = load_tokenizer(plan.base.path)
    if precise:
        prompts: dict[str, int] = {}
        for expert in rows:
            for prompt in expert.positive_prompts + expert.negative_prompts:
                prompts.setdefault(prompt, len(prompts))
        batch = encode_prompts(tokenizer, list(prompts))
        states = layer_input_states(plan.base, batch, reduce=reduce, device=device, forward=PRECISE_FORWARD)
        positive = [[prompts[p] for p in expert.positive_prompts] for expert in rows]
        negative = [[prompts[p] for p in expert.negative_prompts] for expert in rows]
        return prompt_gate_vectors(states, positive, negative)
    cache = WeightCache()
    means: dict[tuple[str, ...], torch.Tensor] = {}

    def mean_state(group: tuple[str, ...]) -> torch.Tensor:  # [layers, hidden], bfloat16
        if group not in means:
            batch = encode_prompts(tokenizer, list(group))
            states = layer_input_states(
                plan.base, batch, reduce=reduce, device=device, forward=MERGEKIT_FORWARD, cache=cache
            )
            means[group] = states.to(MERGEKIT_FORWARD.dtype).mean(dim=1)
        return means[group]

    vectors = []
    for expert in rows:
        vector = mean_state(tuple(expert.positive_prompts))
        if expert.negative_prompts:
            vector = vector - mean_state(tuple(expert.negative_prompts))
        vectors.append(vector)
    return unit_rows(torch.stack(vectors, dim=1)).float()


def _warn_if_degenerate(plan: MoePlan, gates: list[torch.Tensor]) -> None:
    found = degenerate_layers(gates)
    if not found:
        return
    worst = max(found, key=lambda d: d.condition)
    first, second = worst.experts
    layers = ", ".join(str(d.layer) for d in found[:8]) + (", ..." if len(found) > 8 else "")
    warnings.warn(
        f"degenerate routing: the gate matrices of {len(found)} of {plan.num_layers} layers ({layers}) have "
        f"condition number above {CONDITION_LIMIT:g} (worst {worst.condition:.3g} at layer {worst.layer}); "
        f"the prompts are too similar for the router to tell experts apart. Closest there: "
        f"{plan.config.describe_expert(first)} and {plan.config.describe_expert(second)} "
        f"(cosine {worst.cosine:.3f}). Make their prompts more distinct, or add negative_prompts.",
        stacklevel=2,
    )
