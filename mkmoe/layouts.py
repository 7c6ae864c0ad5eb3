"""One layer's MoE block as output tensors: router, experts, shared expert (docs/moe.md).

Two tensor layouts, named per output architecture in :mod:`mkmoe.outputs`:

* ``classic`` (default): what transformers 5 writes with ``save_pretrained`` for that class,
  which is also what llama.cpp, vLLM and Hub checkpoints use: one tensor per expert and
  projection for most (Mixtral's ``block_sparse_moe.experts.{e}.w1/w2/w3``, Qwen's
  ``mlp.experts.{e}.{gate,up,down}_proj``), GraniteMoe's stacked ``input_linear`` /
  ``output_linear``. transformers fuses them into its in-memory layout when loading.
* ``fused``: transformers 5's in-memory layout, ``mlp.experts.gate_up_proj`` ``[E, 2I, H]``
  (each expert's gate rows, then its up rows) and ``mlp.experts.down_proj`` ``[E, H, I]``.

Noise is seeded by the per-expert tensor name of the classic Mixtral/Qwen style (a name of
that form for outputs whose classic layout is stacked), in both layouts, so a fused output
holds exactly the classic one's tensors, stacked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mkmoe.outputs import PROJECTIONS, OutputArchitecture
from mkmoe.tasks import GATES_SOURCE, AddNoise, ConcatRows, StackTensors, ZerosTensor
from mksuite.common.graph import CastTensor, LoadTensor, OutputTensor, ScaleTensor, Task

LAYOUTS = ("classic", "fused")


@dataclass(frozen=True)
class ExpertMlp:
    """One expert's dense MLP in one layer: where its three matrices are stored and their shapes."""

    model_key: str
    names: dict[str, str]  # projection -> stored tensor name
    shapes: dict[str, tuple[int, ...]]
    nbytes: dict[str, int]
    noise_scale: float | None
    residual_scale: float | None
    # projection -> [start, stop) rows of the stored tensor (a fused gate_up_proj); absent: all of it
    rows: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def intermediate_size(self) -> int:
        return self.shapes["gate"][0]


def block_prefix(arch: OutputArchitecture, layout: str, layer: int) -> str:
    return f"model.layers.{layer}.{arch.names(layout).block}"


def is_block_weight(name: str) -> bool:
    """Whether a definition's layer weight belongs to the MoE block (rather than attention or norms)."""
    return ".mlp." in name or ".block_sparse_moe." in name


def router_name(arch: OutputArchitecture, layout: str, layer: int) -> str:
    return f"{block_prefix(arch, layout, layer)}.{arch.names(layout).router}"


def shared_gate_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.shared_expert_gate.weight"


def classic_expert_name(arch: OutputArchitecture, layer: int, expert: int, projection: str) -> str:
    """The classic per-expert tensor name (the noise seed); a name of Qwen's form where that layout is stacked."""
    names = arch.classic
    if names.per_expert:
        template = names.experts[PROJECTIONS.index(projection)]
        return f"{block_prefix(arch, 'classic', layer)}.{template.format(e=expert)}"
    return f"{block_prefix(arch, 'classic', layer)}.experts.{expert}.{projection}_proj.weight"


def block_outputs(
    arch: OutputArchitecture,
    layout: str,
    layer: int,
    experts: list[ExpertMlp],
    shared: ExpertMlp | None,
    *,
    hidden_size: int,
    dtype: torch.dtype,
) -> list[OutputTensor]:
    """Router, experts, zero-initialised block tensors and (Qwen2-MoE) shared expert, in this order."""
    names = arch.names(layout)
    outputs = [_gate_output(router_name(arch, layout, layer), (len(experts), hidden_size), dtype)]
    if names.per_expert:
        for e, expert in enumerate(experts):
            for projection in PROJECTIONS:
                template = names.experts[PROJECTIONS.index(projection)]
                name = f"{block_prefix(arch, layout, layer)}.{template.format(e=e)}"
                seed_name = classic_expert_name(arch, layer, e, projection)
                task = expert_task(expert, projection, dtype, seed_name=seed_name, index=e)
                outputs.append(OutputTensor(name, dtype, expert.shapes[projection], task))
    else:
        outputs += _fused_outputs(arch, layout, layer, experts, dtype)
    for name, shape_of in arch.zero_tensors:
        shape = shape_of(len(experts), hidden_size)
        outputs.append(
            OutputTensor(f"{block_prefix(arch, layout, layer)}.{name}", dtype, shape, ZerosTensor(shape, dtype))
        )
    if arch.gated_shared_expert:
        outputs += _shared_outputs(layer, shared, hidden_size, dtype)
    return outputs


def _shared_outputs(layer: int, shared: ExpertMlp | None, hidden: int, dtype) -> list[OutputTensor]:
    prefix = f"model.layers.{layer}.mlp"
    if shared is None:
        # A zero-width shared expert contributes exactly zero; its gate is then irrelevant (zeros).
        shapes = {"gate": (0, hidden), "up": (0, hidden), "down": (hidden, 0)}
        outputs = [
            OutputTensor(f"{prefix}.shared_expert.{p}_proj.weight", dtype, shapes[p], ZerosTensor(shapes[p], dtype))
            for p in PROJECTIONS
        ]
        return outputs + [OutputTensor(shared_gate_name(layer), dtype, (1, hidden), ZerosTensor((1, hidden), dtype))]
    outputs = []
    for projection in PROJECTIONS:
        name = f"{prefix}.shared_expert.{projection}_proj.weight"
        task = expert_task(shared, projection, dtype, seed_name=name, index=0)
        outputs.append(OutputTensor(name, dtype, shared.shapes[projection], task))
    return outputs + [_gate_output(shared_gate_name(layer), (1, hidden), dtype)]


def _fused_outputs(arch, layout, layer, experts: list[ExpertMlp], dtype) -> list[OutputTensor]:
    prefix = block_prefix(arch, layout, layer)
    gate_up_name, down_name = arch.names(layout).experts

    def task(e: int, projection: str) -> Task:
        seed_name = classic_expert_name(arch, layer, e, projection)
        return expert_task(experts[e], projection, dtype, seed_name=seed_name, index=e)

    gate_up = StackTensors(tuple(ConcatRows((task(e, "gate"), task(e, "up"))) for e in range(len(experts))))
    down = StackTensors(tuple(task(e, "down") for e in range(len(experts))))
    intermediate, hidden = experts[0].shapes["gate"]
    return [
        OutputTensor(f"{prefix}.{gate_up_name}", dtype, (len(experts), 2 * intermediate, hidden), gate_up),
        OutputTensor(f"{prefix}.{down_name}", dtype, (len(experts), hidden, intermediate), down),
    ]


def pairs_to_halves_order(rows: int, head_dim: int, rotary_dim: int) -> tuple[int, ...]:
    """Row order turning a q/k projection for interleaved RoPE (pairs 2i, 2i+1 rotate by
    frequency i) into one for half-split RoPE (i and i + rotary_dim/2 rotate by frequency i).

    Within each head the rotary dims become evens then odds; the rest keep their place. q and
    k permuted alike give the same dot products, so attention is unchanged.
    """
    within = [*range(0, rotary_dim, 2), *range(1, rotary_dim, 2), *range(rotary_dim, head_dim)]
    return tuple(head * head_dim + i for head in range(rows // head_dim) for i in within)


def expert_task(expert: ExpertMlp, projection: str, dtype: torch.dtype, *, seed_name: str, index: int) -> Task:
    """Load one dense MLP matrix, cast it, add the expert's noise, scale ``down`` by its residual_scale."""
    load = LoadTensor(
        expert.model_key, expert.names[projection], expert.nbytes[projection], rows=expert.rows.get(projection)
    )
    task: Task = CastTensor(load, dtype)
    if expert.noise_scale:
        task = AddNoise(task, float(expert.noise_scale), seed_name, index)
    if projection == "down" and expert.residual_scale is not None:
        task = ScaleTensor(task, float(expert.residual_scale))
    return task


def _gate_output(name: str, shape: tuple[int, int], dtype: torch.dtype) -> OutputTensor:
    load = LoadTensor(GATES_SOURCE, name, shape[0] * shape[1] * 4)  # gates are computed in float32
    return OutputTensor(name, dtype, shape, CastTensor(load, dtype))
