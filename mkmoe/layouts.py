"""One layer's MoE block as output tensors: router, experts, shared expert (docs/moe.md).

Two tensor layouts:

* ``classic`` (default): one tensor per expert and projection, the names in
  ``architectures/{mixtral,qwen2_moe,qwen3_moe}.json``: Mixtral's
  ``block_sparse_moe.experts.{e}.w1/w2/w3`` and Qwen's ``mlp.experts.{e}.{gate,up,down}_proj``.
  This is what llama.cpp, vLLM and most Hub checkpoints use, and what transformers 5 writes
  with ``save_pretrained``; it fuses them into its in-memory layout when loading.
* ``fused``: transformers 5's in-memory layout, ``mlp.experts.gate_up_proj`` ``[E, 2I, H]``
  (each expert's gate rows, then its up rows) and ``mlp.experts.down_proj`` ``[E, H, I]``.

Noise is seeded by the classic per-expert tensor name in both layouts, so a fused output
holds exactly the classic one's tensors, stacked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mkmoe.architectures import MIXTRAL, QWEN2_MOE, OutputArchitecture
from mkmoe.tasks import GATES_SOURCE, AddNoise, ConcatRows, StackTensors
from mksuite.common.graph import CastTensor, LoadTensor, OutputTensor, ScaleTensor, Task

PROJECTIONS = ("gate", "up", "down")
_MIXTRAL_NAMES = {"gate": "w1", "down": "w2", "up": "w3"}


@dataclass(frozen=True)
class ExpertMlp:
    """One expert's dense MLP in one layer: where its three matrices are stored and their shapes."""

    model_key: str
    names: dict[str, str]  # projection -> stored tensor name
    shapes: dict[str, tuple[int, ...]]
    nbytes: dict[str, int]
    noise_scale: float | None
    residual_scale: float | None

    @property
    def intermediate_size(self) -> int:
        return self.shapes["gate"][0]


def block_prefix(arch: OutputArchitecture, layout: str, layer: int) -> str:
    module = "block_sparse_moe" if arch is MIXTRAL and layout == "classic" else "mlp"
    return f"model.layers.{layer}.{module}"


def is_block_weight(name: str) -> bool:
    """Whether a definition's layer weight belongs to the MoE block (rather than attention or norms)."""
    return ".mlp." in name or ".block_sparse_moe." in name


def router_name(arch: OutputArchitecture, layout: str, layer: int) -> str:
    return f"{block_prefix(arch, layout, layer)}.gate.weight"


def shared_gate_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.shared_expert_gate.weight"


def classic_expert_name(arch: OutputArchitecture, layer: int, expert: int, projection: str) -> str:
    if arch is MIXTRAL:
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{_MIXTRAL_NAMES[projection]}.weight"
    return f"model.layers.{layer}.mlp.experts.{expert}.{projection}_proj.weight"


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
    """Router, experts and (Qwen2-MoE) shared expert of one layer, in this order."""
    router = router_name(arch, layout, layer)
    outputs = [_gate_output(router, (len(experts), hidden_size), dtype)]
    if layout == "classic":
        for e, expert in enumerate(experts):
            for projection in PROJECTIONS:
                name = classic_expert_name(arch, layer, e, projection)
                task = expert_task(expert, projection, dtype, seed_name=name, index=e)
                outputs.append(OutputTensor(name, dtype, expert.shapes[projection], task))
    else:
        outputs += _fused_outputs(arch, layout, layer, experts, dtype)
    if arch is QWEN2_MOE and shared is not None:
        for projection in PROJECTIONS:
            name = f"model.layers.{layer}.mlp.shared_expert.{projection}_proj.weight"
            task = expert_task(shared, projection, dtype, seed_name=name, index=0)
            outputs.append(OutputTensor(name, dtype, shared.shapes[projection], task))
        outputs.append(_gate_output(shared_gate_name(layer), (1, hidden_size), dtype))
    return outputs


def _fused_outputs(arch, layout, layer, experts: list[ExpertMlp], dtype) -> list[OutputTensor]:
    prefix = f"{block_prefix(arch, layout, layer)}.experts"

    def task(e: int, projection: str) -> Task:
        seed_name = classic_expert_name(arch, layer, e, projection)
        return expert_task(experts[e], projection, dtype, seed_name=seed_name, index=e)

    gate_up = StackTensors(tuple(ConcatRows((task(e, "gate"), task(e, "up"))) for e in range(len(experts))))
    down = StackTensors(tuple(task(e, "down") for e in range(len(experts))))
    intermediate, hidden = experts[0].shapes["gate"]
    return [
        OutputTensor(f"{prefix}.gate_up_proj", dtype, (len(experts), 2 * intermediate, hidden), gate_up),
        OutputTensor(f"{prefix}.down_proj", dtype, (len(experts), hidden, intermediate), down),
    ]


def expert_task(expert: ExpertMlp, projection: str, dtype: torch.dtype, *, seed_name: str, index: int) -> Task:
    """Load one dense MLP matrix, cast it, add the expert's noise, scale ``down`` by its residual_scale."""
    task: Task = CastTensor(LoadTensor(expert.model_key, expert.names[projection], expert.nbytes[projection]), dtype)
    if expert.noise_scale:
        task = AddNoise(task, float(expert.noise_scale), seed_name, index)
    if projection == "down" and expert.residual_scale is not None:
        task = ScaleTensor(task, float(expert.residual_scale))
    return task


def _gate_output(name: str, shape: tuple[int, int], dtype: torch.dtype) -> OutputTensor:
    load = LoadTensor(GATES_SOURCE, name, shape[0] * shape[1] * 4)  # gates are computed in float32
    return OutputTensor(name, dtype, shape, CastTensor(load, dtype))
