"""``mkmoe CONFIG OUT --dry-run``: the MoE a build would write, from config.json files and weight headers.

The JSON form has the keys every tool's plan has (schema ``mkmerge-plan/1``,
mkmerge/plan_json.py): ``inputs``, ``output``, ``config`` (the fields of the base's
config.json the MoE changes), ``tensors`` (dtype, shape, bytes, shard, how it is made and
from which input tensors) and ``shards``; and ``moe`` (experts, gates, layout). Input labels:
``base`` for the base model, ``A``, ``B``, ... for the other models in config order, ``gates``
for the router weights the build computes (from the base model's hidden states or at random).
"""

from __future__ import annotations

from mkmoe.plan import MoePlan
from mkmoe.tasks import GATES_SOURCE
from mksuite.common.build import BuildOptions, output_layout
from mksuite.common.graph import LoadTensor, Task
from mksuite.common.plan_document import (
    SCHEMA,
    architecture_name,
    config_changes,
    dtype_text,
    input_json,
    letters,
    shard_of,
    shards_json,
)
from mksuite.common.writing.model_files import output_config

# How each task of an MoE output reads in a plan.
_VERBS = {"CastTensor": "cast", "AddNoise": "noise", "ConcatRows": "concat", "StackTensors": "stack"}


def moe_plan_json(plan: MoePlan, options: BuildOptions, *, out: str | None = None) -> dict:
    """The plan document of an MoE build (see the module docstring)."""
    labels = _labels(plan)
    layout = output_layout(plan.outputs, options.shard_size)
    shards = shard_of(layout)
    written = output_config(plan.output_config, dtype=plan.dtype)
    whole = {}  # a tensor written in row blocks is one tensor of the output
    for output in plan.outputs:
        whole.setdefault(output.name, []).append(output)
    tensors = [_tensor_json(parts, labels, plan, shards[name]) for name, parts in whole.items()]
    config = plan.config
    return {
        "schema": SCHEMA,
        "tool": "mkmoe",
        "recipe": config.source_name,
        "method": "moe",
        "out": out,
        "inputs": [
            input_json(model, labels[model.key], is_base=model.key == plan.base.key) for model in plan.models.values()
        ],
        "output": {
            "architecture": str((written.get("architectures") or [plan.arch.title])[0]),
            "layers": plan.num_layers,
            "config_from": "base",
            "dtypes": sorted({t["dtype"] for t in tensors}),
            "tensors": len(tensors),
            "bytes": sum(t["bytes"] for t in tensors),
        },
        "config": {"from": "base", "changes": config_changes(plan.base.config, written)},
        "moe": {
            "experts": plan.num_experts,
            "experts_per_token": config.experts_per_token,
            "gate_mode": config.gate_mode,
            "layout": plan.layout,
            "base_architecture": architecture_name(plan.base),
        },
        "tensors": tensors,
        "shards": shards_json(layout),
    }


def _labels(plan: MoePlan) -> dict[str, str]:
    others = letters()
    labels = {model.key: ("base" if model.key == plan.base.key else next(others)) for model in plan.models.values()}
    labels[GATES_SOURCE] = "gates"
    return labels


def _tensor_json(parts: list, labels: dict[str, str], plan: MoePlan, shard: str) -> dict:
    first = parts[0]
    loads = [load for part in parts for load in _loads(part.task)]
    models = {model.key: model for model in plan.models.values()}
    return {
        "name": first.name,
        "dtype": dtype_text(first.dtype),
        "shape": list(first.shape),
        "bytes": sum(part.nbytes for part in parts),
        "shard": shard,
        "computed_as": _describe(first.task, labels) if len(parts) == 1 else f"{len(parts)} row blocks",
        "row_blocks": len(parts),
        "inputs": [_input_tensor(load, labels, models) for load in dict.fromkeys(loads)],
    }


def _input_tensor(load: LoadTensor, labels: dict[str, str], models: dict) -> dict:
    model = models.get(load.model)
    info = model.info(load.name) if model is not None else None
    return {
        "model": labels.get(load.model, load.model),
        "tensor": load.name,
        "dtype": dtype_text(info.dtype) if info is not None else "float32",
        "shape": list(info.shape) if info is not None else None,
    }


def _loads(task: Task) -> list[LoadTensor]:
    if isinstance(task, LoadTensor):
        return [task]
    return [load for child in task.dependencies() for load in _loads(child)]


def _describe(task: Task, labels: dict[str, str]) -> str:
    """``stack(A, B)``, ``cast(base)``, ``gates``: how an output tensor is made, by input label."""
    if isinstance(task, LoadTensor):
        return labels.get(task.model, task.model)
    children = task.dependencies()
    name = type(task).__name__
    if not children:
        return "zeros" if name == "ZerosTensor" else name
    verb = _VERBS.get(name, name)
    return f"{verb}({', '.join(_describe(child, labels) for child in children)})"
