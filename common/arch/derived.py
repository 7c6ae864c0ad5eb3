"""Architecture definitions derived from transformers' own model classes.

The model class is built from the config on the meta device (no memory, no weights, never
remote code), and its parameters are renamed the way ``save_pretrained`` writes them
(transformers v5 reverts its load-time conversions on save: fused experts are written per
expert, VLM language models under their legacy prefixes). From that we read which tensors
sit in the text layer stack, which are vocabulary-indexed, and which are tied.

Derivations are cached per config (minus fields that cannot change tensor names), so
planning many inputs of one model family builds the class once.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from .definition import ArchitectureDefinition

# Fields that never change which tensors a model has; left out of the cache key.
_IRRELEVANT_KEYS = frozenset(
    {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "auto_map", "_commit_hash", "architectures"}
)
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_moe_experts")
DERIVED_PREFIX = "transformers:"


@dataclass(frozen=True)
class ModelClass:
    """A transformers model class chosen for a config: its name and model_type."""

    name: str
    model_type: str


def derive_architecture(config: dict) -> ArchitectureDefinition | None:
    """The definition transformers' own class for ``config`` implies; None when it cannot say.

    None when the model_type is unknown to the installed transformers, no causal-LM or
    image-text-to-text class fits, or building the class on the meta device fails.
    """
    key = json.dumps({k: v for k, v in config.items() if k not in _IRRELEVANT_KEYS}, sort_keys=True, default=str)
    names = config.get("architectures")
    wanted = names[0] if isinstance(names, list) and len(names) == 1 and isinstance(names[0], str) else None
    return _derive(key, wanted)


def model_classes_for(config: dict, wanted: str | None = None) -> list[ModelClass]:
    """The transformers classes that may describe ``config``, best first.

    The class config.json names comes first when it belongs to the config's model_type;
    then the model_type's causal-LM and image-text-to-text classes (exaone checkpoints name
    ``LlamaForCausalLM`` but hold ``transformer.h.*`` tensors: their own class describes them).
    """
    from transformers.models.auto import configuration_auto, modeling_auto

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in configuration_auto.CONFIG_MAPPING_NAMES:
        return []
    own = [
        name
        for mapping in (
            modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        )
        for name in _as_names(mapping.get(model_type))
    ]
    if wanted in own:
        own.remove(wanted)
        own.insert(0, wanted)
    return [ModelClass(name, model_type) for name in dict.fromkeys(own)]


def _as_names(entry) -> Iterable[str]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


@functools.lru_cache(maxsize=128)
def _derive(config_key: str, wanted: str | None) -> ArchitectureDefinition | None:
    from .derived_names import describe_saved_tensors

    config = json.loads(config_key)
    for chosen in model_classes_for(config, wanted):
        model = _meta_model(config, chosen)
        if model is not None and (described := describe_saved_tensors(model, config, chosen)) is not None:
            return described
    return None


def _meta_model(config: dict, chosen: ModelClass):
    """The model class instantiated on the meta device, or None when transformers refuses."""
    import torch
    import transformers

    cls = getattr(transformers, chosen.name, None)
    if cls is None:
        return None
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fields = {k: v for k, v in config.items() if k not in ("model_type", "auto_map")}
            built = transformers.AutoConfig.for_model(chosen.model_type, **fields)
            with torch.device("meta"):
                return cls(built)
    except Exception:  # a config its own class rejects, a missing optional dependency: nothing to learn
        return None
    finally:
        transformers.logging.set_verbosity(verbosity)
