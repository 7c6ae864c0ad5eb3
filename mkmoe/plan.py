"""MoE config + input headers -> a plan: every output tensor, the output config, the gate slots.

Planning reads config.json files and weight headers only. Every problem knowable from them
(architectures, depths, hidden and intermediate sizes, missing or unplaceable tensors) is
raised here, before any tensor data is read and before the gates' forward pass.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch

from mkmoe.architectures import check_inputs, choose_architecture, moe_config
from mkmoe.config import MoeConfig
from mkmoe.layouts import (
    LAYOUTS,
    ExpertMlp,
    block_outputs,
    is_block_weight,
    pairs_to_halves_order,
    router_name,
    shared_gate_name,
)
from mkmoe.outputs import MIXTRAL, QWEN2_MOE, MoeShape, OutputArchitecture
from mkmoe.tasks import PermuteRows, ZerosTensor
from mksuite.common.arch import ArchitectureDefinition, WeightInfo, load_definitions
from mksuite.common.arch.derived import derive_architecture
from mksuite.common.dtypes import FLOAT_DTYPES
from mksuite.common.errors import ArchitectureError, MissingTensorError, ShapeMismatchError
from mksuite.common.graph import CastTensor, LoadTensor, OutputTensor, Task
from mksuite.common.input_models import OpenedModel, open_input_models
from mksuite.common.loading import ModelReference

_ZERO_BIASES = ("q_proj.bias", "k_proj.bias", "v_proj.bias")
_QK_PROJECTION = re.compile(r"\.self_attn\.[qk]_proj\.(weight|bias)$")


@dataclass
class MoePlan:
    config: MoeConfig
    models: dict[ModelReference, OpenedModel]
    base: OpenedModel
    arch: OutputArchitecture
    layout: str
    num_layers: int
    hidden_size: int
    dtype: torch.dtype
    outputs: list[OutputTensor]
    output_config: dict
    router_names: list[str]  # per layer: the gate matrix [E, hidden]
    shared_gate_names: list[str] = field(default_factory=list)  # per layer: [1, hidden] (Qwen2-MoE)

    @property
    def num_experts(self) -> int:
        return len(self.config.experts)

    @property
    def output_bytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)

    def tensor_sources(self) -> dict[str, object]:
        return {model.key: model.files.tensors for model in self.models.values()}


def plan_moe(config: MoeConfig, *, layout: str = "classic", cache_dir: str | None = None) -> MoePlan:
    """Open the inputs (headers only), check them, choose the output architecture, list every tensor."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    models = open_models(config, cache_dir=cache_dir)
    input_arch = check_inputs(config, models)
    arch = choose_architecture(config, input_arch)
    base = models[config.base_model]
    layers, hidden = base.num_layers, int(base.config["hidden_size"])
    dtype = config.dtype or _config_dtype(base)
    experts = [[_expert_mlp(config, models, i, layer) for i in range(len(config.experts))] for layer in range(layers)]
    has_shared = arch.gated_shared_expert and bool(config.shared_experts)
    shared = [_expert_mlp(config, models, 0, layer, shared=True) if has_shared else None for layer in range(layers)]
    shape = MoeShape(
        layers=layers,
        experts=len(config.experts),
        experts_per_token=config.experts_per_token,
        intermediate_size=_common_intermediate_size(config, experts),
        shared_intermediate_size=shared[0].intermediate_size if shared[0] is not None else None,
    )
    output_config = moe_config(arch, base.config, shape)
    outputs = _BaseTensors(base, arch, dtype).plan(output_config, layers, layout, experts, shared, hidden)
    if arch is MIXTRAL and len(config.experts) & (len(config.experts) - 1):
        warnings.warn(
            f"{len(config.experts)} experts is not a power of two; llama.cpp and some kernels expect one",
            stacklevel=2,
        )
    return MoePlan(
        config=config,
        models=models,
        base=base,
        arch=arch,
        layout=layout,
        num_layers=layers,
        hidden_size=hidden,
        dtype=dtype,
        outputs=outputs,
        output_config=output_config,
        router_names=[router_name(arch, layout, layer) for layer in range(layers)],
        shared_gate_names=[shared_gate_name(layer) for layer in range(layers)] if has_shared else [],
    )


def open_models(config: MoeConfig, *, cache_dir: str | None = None) -> dict[ModelReference, OpenedModel]:
    """Each distinct input opened on its own, so each keeps its own architecture (checked later)."""
    refs = [config.base_model] + [e.source_model for e in config.experts + config.shared_experts]
    models: dict[ModelReference, OpenedModel] = {}
    for ref in refs:
        if ref not in models:
            models[ref] = open_input_models([ref], cache_dir=cache_dir)[ref]
    return models


def _config_dtype(base: OpenedModel) -> torch.dtype:
    name = base.config.get("torch_dtype") or base.config.get("dtype")
    if isinstance(name, str) and name.removeprefix("torch.") in FLOAT_DTYPES:
        return FLOAT_DTYPES[name.removeprefix("torch.")]
    embed = base.locate(base.arch.pre_weights(base.num_layers)[0])
    found = base.info(embed).dtype if embed is not None else torch.float32
    return found if found in FLOAT_DTYPES.values() else torch.float32


def _expert_mlp(config: MoeConfig, models, index: int, layer: int, *, shared: bool = False) -> ExpertMlp:
    """Where expert ``index``'s dense MLP of ``layer`` is stored; checks it exists and is bias-free.

    ``gate_proj``/``up_proj``/``down_proj``, or a fused ``gate_up_proj`` (gate rows, then up
    rows: GLM), which is then read half by half.
    """
    expert = (config.shared_experts if shared else config.experts)[index]
    model = models[expert.source_model]
    label = config.describe_expert(index, shared=shared)
    prefix = f"model.layers.{layer}.mlp"
    fused = model.locate(WeightInfo(f"{prefix}.gate_up_proj.weight"))
    stored = {"gate_up": fused} if fused is not None else {"gate": None, "up": None}
    names, shapes, nbytes, rows = {}, {}, {}, {}
    for part in (*stored, "down"):
        dense = f"{prefix}.{part}_proj"
        name = model.locate(WeightInfo(f"{dense}.weight"))
        if name is None:
            raise MissingTensorError(
                f"{label} has no tensor {dense}.weight, the dense MLP an expert is made of",
                hint="experts must be dense models with gate_proj/up_proj/down_proj (or gate_up_proj) MLPs",
            )
        if f"{dense}.bias" in model.files.tensors:
            raise ArchitectureError(
                f"{label} has MLP biases ({dense}.bias); MoE experts have none",
                hint="use experts without mlp_bias",
            )
        info = model.info(name)
        if part == "gate_up":
            half = info.shape[0] // 2
            for projection, start in (("gate", 0), ("up", half)):
                names[projection], shapes[projection] = name, (half, *info.shape[1:])
                nbytes[projection], rows[projection] = info.nbytes // 2, (start, start + half)
        else:
            names[part], shapes[part], nbytes[part] = name, tuple(info.shape), info.nbytes
    inner, outer = shapes["gate"]
    if shapes["up"] != (inner, outer) or shapes["down"] != (outer, inner):
        raise ShapeMismatchError(
            f"{label}: the MLP of layer {layer} has inconsistent shapes "
            f"(gate {list(shapes['gate'])}, up {list(shapes['up'])}, down {list(shapes['down'])})"
        )
    return ExpertMlp(model.key, names, shapes, nbytes, expert.noise_scale, expert.residual_scale, rows)


def _common_intermediate_size(config: MoeConfig, experts: list[list[ExpertMlp]]) -> int:
    for layer_experts in experts:
        first = layer_experts[0].intermediate_size
        for index, expert in enumerate(layer_experts):
            if expert.intermediate_size != first:
                raise ShapeMismatchError(
                    f"{config.describe_expert(index)} has MLP intermediate size {expert.intermediate_size} but "
                    f"{config.describe_expert(0)} has {first}; all experts of a MoE layer share one size",
                    hint="use experts fine-tuned from the same base model",
                )
    return experts[0][0].intermediate_size


def output_definition(arch: OutputArchitecture, output_config: dict) -> ArchitectureDefinition:
    """The output's tensor names: its shipped definition, else what transformers' own class saves."""
    if arch.definition is not None:
        return load_definitions()[arch.definition].for_config(output_config)
    derived = derive_architecture(output_config)
    if derived is None:
        raise ArchitectureError(
            f"the installed transformers cannot build {arch.class_name} from the output config, "
            "so its tensor names are unknown",
            hint="check the base model's config.json",
        )
    return derived.for_config(output_config)


def rotary_geometry(base_config: dict) -> tuple[int, int]:
    """(head_dim, rotary_dim) of the base, as its transformers config class resolves them."""
    import transformers

    fields = {k: v for k, v in base_config.items() if k not in ("model_type", "auto_map")}
    try:
        config = transformers.AutoConfig.for_model(base_config["model_type"], **fields)
    except Exception as error:  # transformers raises several types for a bad config
        raise ArchitectureError(
            f"the base model's config is rejected by transformers {transformers.__version__}: {error}",
            hint="check the base model's config.json",
        ) from None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    return head_dim, int(head_dim * factor)


class _BaseTensors:
    """Plans every output tensor; non-MLP tensors come from the base model, cast to the output dtype."""

    def __init__(self, base: OpenedModel, arch: OutputArchitecture, dtype: torch.dtype):
        self.base, self.arch, self.dtype = base, arch, dtype
        self.used: set[str] = set()
        self.rope = rotary_geometry(base.config) if arch.rope_pairs_to_halves else None

    def plan(self, output_config, layers, layout, experts, shared, hidden) -> list[OutputTensor]:
        definition = output_definition(self.arch, output_config)
        outputs = [o for w in definition.pre_weights(layers) if (o := self._copy(w)) is not None]
        for layer in range(layers):
            for weight in definition.layer_weights(layer, layers):
                if not is_block_weight(weight.name) and (output := self._copy(weight)) is not None:
                    outputs.append(output)
            outputs += block_outputs(
                self.arch, layout, layer, experts[layer], shared[layer], hidden_size=hidden, dtype=self.dtype
            )
        outputs += [o for w in definition.post_weights(layers) if (o := self._copy(w)) is not None]
        self._check_all_placed()
        return outputs

    def _copy(self, weight: WeightInfo) -> OutputTensor | None:
        tensors = self.base.files.tensors
        # Tied names are not followed: a tied base gets no lm_head, and the config keeps the tie.
        name = next((n for n in (weight.name, *weight.aliases) if n in tensors), None)
        if name is None:
            return self._missing(weight)
        self.used.add(name)
        info = self.base.info(name)
        task: Task = CastTensor(LoadTensor(self.base.key, name, info.nbytes), self.dtype)
        if self.rope is not None and _QK_PROJECTION.search(weight.name):
            task = PermuteRows(task, pairs_to_halves_order(info.shape[0], *self.rope))
        return OutputTensor(weight.name, self.dtype, tuple(info.shape), task)

    def _missing(self, weight: WeightInfo) -> OutputTensor | None:
        if self.arch is QWEN2_MOE and weight.name.endswith(_ZERO_BIASES):
            matrix = weight.name.removesuffix("bias") + "weight"
            rows = self.base.info(self.base.locate(WeightInfo(matrix)) or matrix).shape[0]
            return OutputTensor(weight.name, self.dtype, (rows,), ZerosTensor((rows,), self.dtype))
        if weight.optional:
            return None
        raise MissingTensorError(
            f"the base model {self.base.ref} has no tensor {weight.name}, which a {self.arch.title} needs",
            hint=f"is the base model really a {' or '.join(self.arch.inputs)} model? check its weight files",
        )

    def _check_all_placed(self) -> None:
        left = [
            name
            for name in self.base.files.tensors.names()
            if name not in self.used and ".mlp." not in name and not name.endswith("rotary_emb.inv_freq")
        ]
        if left:
            shown = ", ".join(sorted(left)[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")
            raise ArchitectureError(
                f"the base model {self.base.ref} has tensors a {self.arch.title} has no place for: {shown}",
                hint="this output architecture has no slot for them (e.g. attention output biases); "
                "use a base model without them",
            )
