"""Tiny random models of any model type the installed transformers has, for tests and the sweep.

A type's default config is shrunk field by field (sizes, heads, layers, experts, sub-configs);
the model class is the type's own causal-LM or image-text-to-text class, saved with
save_pretrained so the files hold exactly the names real checkpoints of that type have.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import transformers

VOCAB = 128
HIDDEN = 32
HEADS = 4

# field -> tiny value, applied wherever the field exists (top level and sub-configs)
_SIZES = {
    "vocab_size": VOCAB, "hidden_size": HIDDEN, "n_embd": HIDDEN, "d_model": HIDDEN, "dim": HIDDEN,
    "intermediate_size": 2 * HIDDEN, "n_inner": 2 * HIDDEN, "ffn_hidden_size": 2 * HIDDEN,
    "moe_intermediate_size": HIDDEN, "shared_expert_intermediate_size": HIDDEN,
    "intermediate_size_mlp": 2 * HIDDEN,
    "num_attention_heads": HEADS, "n_head": HEADS, "num_heads": HEADS,
    "num_key_value_heads": 2, "multi_query_group_num": 2, "head_dim": HIDDEN // HEADS,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
    "max_position_embeddings": 256, "n_positions": 256, "sliding_window": 16,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "rotary_dim": 4, "partial_rotary_factor": 0.5, "state_size": 4, "expand": 2, "conv_kernel": 4,
    "time_step_rank": 4,
    "image_size": 32, "patch_size": 8, "num_channels": 3, "mm_tokens_per_image": 4,
    "vision_output_dim": HIDDEN, "projector_input_dim": HIDDEN, "projector_output_dim": HIDDEN,
    "out_hidden_size": HIDDEN, "spatial_merge_size": 2, "temporal_patch_size": 2, "embed_dim": HIDDEN,
    "depth": 2, "num_global_layers": 0,
}  # fmt: skip
_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_DROP = ("layer_types", "mlp_only_layers", "moe_layers", "no_rope_layers", "sliding_window_pattern", "full_attn_idxs")


def model_class(model_type: str) -> type | None:
    """The type's own causal-LM class, else its image-text-to-text class."""
    from transformers.models.auto import modeling_auto

    for mapping in (
        modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    ):
        name = mapping.get(model_type)
        if isinstance(name, str) and hasattr(transformers, name):
            return getattr(transformers, name)
    return None


def _shrink(section: dict, layers: int) -> dict:
    out = {}
    for key, value in section.items():
        if key in _DROP:
            continue
        if isinstance(value, dict) and key.endswith("_config"):
            out[key] = _shrink(value, layers if key == "text_config" else 2)
        elif key in _LAYER_KEYS and isinstance(value, int):
            out[key] = layers
        elif key in _SIZES and isinstance(value, int | float) and not isinstance(value, bool) and value:
            out[key] = _SIZES[key]
        elif key in _TOKEN_IDS and isinstance(value, int):
            out[key] = _TOKEN_IDS[key]
        else:
            out[key] = value
    for key, value in _TOKEN_IDS.items():
        out.setdefault(key, value)
    if "rope_theta" in out and out["rope_theta"] is None:
        out["rope_theta"] = 10000.0
    return out


def tiny_type_config(model_type: str, *, layers: int = 4) -> transformers.PretrainedConfig:
    """The default config of ``model_type`` at toy size, with ``layers`` text layers."""
    default = transformers.AutoConfig.for_model(model_type).to_dict()
    fields = _shrink(default, layers)
    fields.pop("model_type", None)
    for key in ("first_k_dense_replace",):
        if isinstance(fields.get(key), int):
            fields[key] = min(fields[key], 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.AutoConfig.for_model(model_type, **fields)
        for section in (config, getattr(config, "text_config", None)):
            if section is not None:
                _fit_derived_sizes(section)
        return config


def _fit_derived_sizes(section: transformers.PretrainedConfig) -> None:
    """Derived head sizes that agree with the shrunk ones.

    Shrinking leaves derived fields at their full-size values: MLA's ``qk_head_dim`` is the
    sum of its nope and rope parts, and multimodal rope splits half a head's dimensions into
    ``mrope_section`` (temporal, height, width), whose default assumes 128-wide heads.
    """
    nope, rope = getattr(section, "qk_nope_head_dim", None), getattr(section, "qk_rope_head_dim", None)
    if isinstance(nope, int) and isinstance(rope, int) and hasattr(section, "qk_head_dim"):
        section.qk_head_dim = nope + rope
    if isinstance(getattr(section, "kv_lora_rank", None), int) and hasattr(section, "num_key_value_heads"):
        # MLA expands its latent to one key per query head: grouping them again would not fit
        section.num_key_value_heads = section.num_attention_heads
    parameters = getattr(section, "rope_parameters", None)
    if "mrope_section" in getattr(type(section), "ignore_keys_at_rope_validation", ()) and isinstance(parameters, dict):
        half = (getattr(section, "head_dim", None) or section.hidden_size // section.num_attention_heads) // 2
        parameters["mrope_section"] = [half - 2 * (half // 4), half // 4, half // 4]


def build_type_model(model_type: str, out_dir: Path | str, *, seed: int = 0, layers: int = 4, base=None) -> Path:
    """A saved random tiny model of ``model_type`` (``base``: a seeded perturbation of that model)."""
    out_dir = Path(out_dir)
    cls = model_class(model_type)
    if base is not None:
        # The base's own config class: a type whose class is another's (exaone's LlamaForCausalLM)
        # would otherwise be re-saved as that other type with its own tensor names.
        config = transformers.AutoConfig.from_pretrained(base)
        model = cls.from_pretrained(base, config=config, dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.02 * torch.randn(param.shape, generator=generator) * param.abs().mean())
    else:
        torch.manual_seed(seed)
        model = cls(tiny_type_config(model_type, layers=layers))
    model.save_pretrained(out_dir)
    return out_dir
