"""Output MoE architectures: which inputs each accepts, how one is chosen, its config.json (docs/moe.md).

Everything here reads configs only. :func:`check_inputs` and :func:`choose_architecture` raise
before any tensor data is read.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping

import transformers

from mkmoe.config import MoeConfig
from mkmoe.outputs import (
    MIXTRAL,
    OUTPUT_ARCHITECTURES,
    QWEN2_MOE,
    QWEN3_MOE,
    MoeShape,
    OutputArchitecture,
    supported_bases,
)
from mksuite.common.arch import get_config_value
from mksuite.common.arch.derived import EXPERT_COUNT_KEYS
from mksuite.common.errors import ArchitectureError, MkError, ShapeMismatchError
from mksuite.common.input_models import OpenedModel
from mksuite.common.loading import ModelReference


def check_inputs(config: MoeConfig, models: Mapping[ModelReference, OpenedModel]) -> str:
    """All inputs share the base's architecture, depth and hidden size; returns the base's model type."""
    base = models[config.base_model]
    _refuse_moe_base(base)
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
    return input_type(base)


def _refuse_moe_base(base: OpenedModel) -> None:
    """A base that is a MoE already has no dense MLP per layer to make experts of."""
    if input_type(base) in supported_bases():
        return
    counts = [get_config_value(base.config, key, default=None) for key in EXPERT_COUNT_KEYS]
    experts = next((n for n in counts if isinstance(n, int) and not isinstance(n, bool) and n > 1), None)
    if experts is not None:
        raise ArchitectureError(
            f"the base model {base.ref} is already a Mixture of Experts ({input_type(base)}, {experts} experts); "
            "mkmoe builds MoEs from dense models",
            hint=f"use dense base and expert models of a supported type: {', '.join(supported_bases())}",
        )


def input_type(model: OpenedModel) -> str:
    """The dense model type outputs are matched on: config.json's model_type (else the architecture's name)."""
    model_type = model.config.get("model_type")
    return model_type if isinstance(model_type, str) and model_type else model.arch.name


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
        f"no MoE output architecture is built from {input_arch} models: the installed transformers has no MoE "
        f"class whose layers match a {input_arch} layer exactly (mkmoe writes {accepted})",
        hint=f"use base and expert models of a supported type: {', '.join(supported_bases())}",
    )


def _rejection(arch: OutputArchitecture, config: MoeConfig, input_arch: str) -> MkError | None:
    if input_arch not in arch.inputs:
        return ArchitectureError(
            f"{arch.title} output is built from {' or '.join(arch.inputs)} models, but the inputs are {input_arch}",
            hint=_architecture_hint(input_arch),
        )
    if len(config.experts) < arch.min_experts:
        return config.error(
            f"{arch.title} needs at least {arch.min_experts} experts (its router ranks the top two scores of "
            f"each expert group), but {len(config.experts)} {'is' if len(config.experts) == 1 else 'are'} listed",
            ("experts",),
            hint=f"list at least {arch.min_experts} experts",
        )
    shared = config.shared_experts
    if not arch.gated_shared_expert and shared:
        return config.error(
            f"{arch.title} has no shared experts, but {len(shared)} {'is' if len(shared) == 1 else 'are'} listed",
            ("shared_experts",),
            hint="remove shared_experts, or use `architecture: qwen` (Qwen2-MoE, one gated shared expert)"
            if input_arch in QWEN2_MOE.inputs
            else f"remove shared_experts: no MoE output with shared experts is built from {input_arch} models",
        )
    if arch.gated_shared_expert and shared:
        if len(shared) > 1:
            return config.error(
                f"{arch.title} has at most one shared expert, but {len(shared)} are listed",
                ("shared_experts",),
                hint="list one `shared_experts` entry (source_model, and positive_prompts unless gates are random)",
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
    return f"mkmoe builds MoEs from {', '.join(supported_bases())} models"


def _hidden_size(model: OpenedModel) -> int | None:
    return get_config_value(model.config, "hidden_size", default=None)


# -- config.json ---------------------------------------------------------------------------------

# Keys of the dense config that mean nothing (or something wrong) in any MoE config.
_DROPPED_KEYS = ("architectures", "auto_map", "_name_or_path")


def moe_config(arch: OutputArchitecture, base_config: Mapping, shape: MoeShape) -> dict:
    """The output config.json (dtype not yet set): the base's config turned into ``arch``'s.

    Starts from the base's JSON so fields the installed transformers does not know survive,
    and is checked by building the installed transformers' config class from it.
    """
    copied = json.loads(json.dumps(dict(base_config)))  # deep copy; never mutate the base's dict
    dropped = _DROPPED_KEYS + arch.dropped_keys
    config = {key: value for key, value in copied.items() if key not in dropped}
    if "layer_types" not in arch.dropped_keys:
        # Spelled out: a MoE class may derive a different default pattern from the same fields.
        layer_types = _dense_layer_types(base_config)
        if layer_types is not None:
            config["layer_types"] = layer_types
    config.update(model_type=arch.model_type, architectures=[arch.class_name])
    config.update(transformers_version=transformers.__version__)
    for key in (
        "num_local_experts",
        "num_experts",
        "moe_num_experts",
        "n_routed_experts",
        "num_experts_per_tok",
        "moe_k",
    ):
        config.pop(key, None)
    config[arch.experts_key] = shape.experts
    config[arch.top_k_key] = shape.experts_per_token
    arch.configure(config, shape)
    _check_loadable(arch, config)
    return config


def _dense_layer_types(base_config: Mapping) -> list[str] | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fields = {k: v for k, v in base_config.items() if k not in ("model_type", "auto_map")}
            dense = transformers.AutoConfig.for_model(base_config.get("model_type"), **fields)
    except Exception:  # an unknown type: the MoE config check below names the problem
        return None
    layer_types = getattr(dense, "layer_types", None)
    return list(layer_types) if layer_types is not None else None


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


__all__ = ["MIXTRAL", "OUTPUT_ARCHITECTURES", "QWEN2_MOE", "QWEN3_MOE", "OutputArchitecture", "check_inputs",
           "choose_architecture", "input_type", "moe_config"]  # fmt: skip
