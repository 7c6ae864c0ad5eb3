"""Output MoE architectures: which inputs each accepts, how one is chosen, its config.json (docs/moe.md).

Everything here reads configs only. :func:`check_inputs` and :func:`choose_architecture` raise
before any tensor data is read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import transformers

from mkmoe.config import MoeConfig
from mksuite.common.arch import get_config_value
from mksuite.common.errors import ArchitectureError, MkError, ShapeMismatchError
from mksuite.common.input_models import OpenedModel
from mksuite.common.loading import ModelReference


@dataclass(frozen=True)
class OutputArchitecture:
    """One MoE architecture mkmoe writes."""

    key: str  # the config's `architecture` value
    title: str
    definition: str  # architectures/<definition>.json describes its tensors
    model_type: str
    class_name: str
    inputs: tuple[str, ...]  # input architecture names it is built from
    gated_shared_expert: bool  # exactly one shared expert, with a sigmoid gate (Qwen2-MoE)
    experts_key: str  # config key holding the number of experts


MIXTRAL = OutputArchitecture(
    "mixtral", "Mixtral", "mixtral", "mixtral", "MixtralForCausalLM", ("llama", "mistral"), False, "num_local_experts"
)
QWEN2_MOE = OutputArchitecture(
    "qwen", "Qwen2-MoE", "qwen2_moe", "qwen2_moe", "Qwen2MoeForCausalLM", ("llama", "mistral", "qwen2"), True,
    "num_experts",
)  # fmt: skip
QWEN3_MOE = OutputArchitecture(
    "qwen3", "Qwen3-MoE", "qwen3_moe", "qwen3_moe", "Qwen3MoeForCausalLM", ("qwen3",), False, "num_experts"
)
OUTPUT_ARCHITECTURES = {arch.key: arch for arch in (MIXTRAL, QWEN2_MOE, QWEN3_MOE)}


def check_inputs(config: MoeConfig, models: Mapping[ModelReference, OpenedModel]) -> str:
    """All inputs share the base's architecture, depth and hidden size; returns that architecture's name."""
    base = models[config.base_model]
    base_hidden = _hidden_size(base)
    entries = [(False, i, e) for i, e in enumerate(config.experts)]
    entries += [(True, i, e) for i, e in enumerate(config.shared_experts)]
    for shared, index, expert in entries:
        model = models[expert.source_model]
        where = config.describe_expert(index, shared=shared)
        if model.arch.name != base.arch.name:
            raise ArchitectureError(
                f"{where} is a {model.arch.name} model but the base model {base.ref} is {base.arch.name}; "
                "every expert must have the base model's architecture",
                hint="use experts fine-tuned from the base model",
            )
        if model.num_layers != base.num_layers:
            raise ShapeMismatchError(
                f"{where} has {model.num_layers} layers but the base model {base.ref} has {base.num_layers}; "
                "expert e of layer l is taken from layer l of its model, so depths must match",
                hint="use experts fine-tuned from the base model (same depth)",
            )
        if _hidden_size(model) != base_hidden:
            raise ShapeMismatchError(
                f"{where} has hidden size {_hidden_size(model)} but the base model {base.ref} has {base_hidden}",
                hint="use experts fine-tuned from the base model (same hidden size)",
            )
    return base.arch.name


def choose_architecture(config: MoeConfig, input_arch: str) -> OutputArchitecture:
    """The requested output architecture if it accepts these inputs, else the inferred one (docs/moe.md)."""
    if config.architecture is not None:
        arch = OUTPUT_ARCHITECTURES[config.architecture]
        problem = _rejection(arch, config, input_arch)
        if problem is not None:
            raise problem
        return arch
    rejected = {key: _rejection(arch, config, input_arch) for key, arch in OUTPUT_ARCHITECTURES.items()}
    for key, problem in rejected.items():
        if problem is None:
            return OUTPUT_ARCHITECTURES[key]
    # Prefer the complaint of an architecture that takes these inputs (a shared-expert rule)
    # and whose shared-expert support matches what the config asks for.
    fitting = [
        (OUTPUT_ARCHITECTURES[key].gated_shared_expert != bool(config.shared_experts), problem)
        for key, problem in rejected.items()
        if input_arch in OUTPUT_ARCHITECTURES[key].inputs
    ]
    if fitting:
        raise min(fitting, key=lambda pair: pair[0])[1]
    accepted = "; ".join(f"{arch.title} from {' or '.join(arch.inputs)}" for arch in OUTPUT_ARCHITECTURES.values())
    raise ArchitectureError(
        f"no MoE output architecture is built from {input_arch} models (mkmoe writes {accepted})",
        hint="use base and expert models of one of those architectures",
    )


def _rejection(arch: OutputArchitecture, config: MoeConfig, input_arch: str) -> MkError | None:
    if input_arch not in arch.inputs:
        return ArchitectureError(
            f"{arch.title} output is built from {' or '.join(arch.inputs)} models, but the inputs are {input_arch}",
            hint=_architecture_hint(input_arch),
        )
    shared = config.shared_experts
    if not arch.gated_shared_expert and shared:
        return config.error(
            f"{arch.title} has no shared experts, but {len(shared)} {'is' if len(shared) == 1 else 'are'} listed",
            ("shared_experts",),
            hint="remove shared_experts, or use `architecture: qwen` (Qwen2-MoE, one gated shared expert)",
        )
    if arch.gated_shared_expert:
        if len(shared) != 1:
            only = f"; {input_arch} inputs can only become {arch.title}" if input_arch not in MIXTRAL.inputs else ""
            return config.error(
                f"{arch.title} needs exactly one shared expert, but {len(shared)} are listed{only}",
                ("shared_experts",),
                hint="list exactly one `shared_experts` entry (source_model, and positive_prompts unless "
                "gates are random)",
            )
        if config.uses_prompts and not shared[0].positive_prompts:
            return config.error(
                f"the shared expert of a {arch.title} is gated, and gate_mode `{config.gate_mode}` computes that "
                "gate from its positive_prompts, which are missing (an ungated shared expert would be DeepSeek-MoE, "
                "which mkmoe does not write)",
                ("shared_experts", 0, "positive_prompts"),
                hint="give the shared expert positive_prompts, or use gate_mode: random",
            )
    return None


def _architecture_hint(input_arch: str) -> str:
    for arch in OUTPUT_ARCHITECTURES.values():
        if input_arch in arch.inputs:
            return f"set `architecture: {arch.key}`, or leave it out to infer it"
    return "mkmoe builds MoEs from llama, mistral, qwen2 or qwen3 models"


def _hidden_size(model: OpenedModel) -> int | None:
    return get_config_value(model.config, "hidden_size", default=None)


# -- config.json ---------------------------------------------------------------------------------

# Keys of the dense config that mean nothing (or something wrong) in the MoE config.
_DROPPED_KEYS = ("architectures", "auto_map", "_name_or_path", "layer_types", "use_sliding_window", "max_window_layers")


def moe_config(
    arch: OutputArchitecture,
    base_config: Mapping,
    *,
    num_experts: int,
    experts_per_token: int,
    intermediate_size: int,
    shared_intermediate_size: int | None = None,
) -> dict:
    """The output config.json (dtype not yet set): the base's config turned into ``arch``'s.

    Starts from the base's JSON so fields the installed transformers does not know survive,
    and is checked by building the installed transformers' config class from it.
    """
    copied = json.loads(json.dumps(dict(base_config)))  # deep copy; never mutate the base's dict
    config = {key: value for key, value in copied.items() if key not in _DROPPED_KEYS}
    layers = config.get("num_hidden_layers")
    config.update(
        model_type=arch.model_type,
        architectures=[arch.class_name],
        num_experts_per_tok=experts_per_token,
        transformers_version=transformers.__version__,
    )
    config.pop("num_local_experts" if arch.experts_key == "num_experts" else "num_experts", None)
    config[arch.experts_key] = num_experts
    if arch is MIXTRAL:
        # mergekit converts to Mistral first, which clears the sliding window.
        config.update(sliding_window=None, intermediate_size=intermediate_size)
    else:
        config.update(decoder_sparse_step=1, norm_topk_prob=True, moe_intermediate_size=intermediate_size)
        config.pop("mlp_only_layers", None)
    if arch is QWEN2_MOE:
        config.update(
            sliding_window=None,
            use_sliding_window=False,
            qkv_bias=True,  # zero biases are written for Llama/Mistral bases
            shared_expert_intermediate_size=shared_intermediate_size,
            layer_types=["full_attention"] * layers if isinstance(layers, int) else None,
        )
    elif arch is QWEN3_MOE:
        for key in ("use_sliding_window", "max_window_layers"):
            if key in base_config:
                config[key] = base_config[key]
    _check_loadable(arch, config)
    return config


def _check_loadable(arch: OutputArchitecture, config: dict) -> None:
    """Fail now, not after writing gigabytes, if the installed transformers rejects the config."""
    try:
        transformers.AutoConfig.for_model(**config)
    except Exception as error:  # transformers raises several types for a bad config
        raise ArchitectureError(
            f"the {arch.title} config built from the base model's config is rejected by transformers "
            f"{transformers.__version__}: {error}",
            hint="check the base model's config.json",
        ) from None
