"""Rebuild the per-layer settings of config.json for a stacked model (docs/stacking.md "Config").

Output layer j takes the entry of the source layer it was copied from, in that source
model's own config: lists whose length equals the source depth (``layer_types``,
``no_rope_layers``, ``mlp_layer_types``, ...) are re-indexed; lists of layer *indices*
(``mlp_only_layers``) are re-mapped; ``layer_types`` that a config implies without storing
(Gemma 2's alternation, Gemma 3's ``sliding_window_pattern``, Qwen 2's defaults) is asked
from the transformers config class and written explicitly. Which layers are MoE
(``decoder_sparse_step``, ``mlp_only_layers``, ``first_k_dense_replace``) follows the source
layers too (``sparse_layers``), or the stack is refused. Other scalar thresholds that describe
layers by position (``max_window_layers``) cannot be remapped and are reported as warnings.

The settings live next to the architecture's layer-count key, so for a dotted key such as
``text_config.num_hidden_layers`` they are read and written inside ``text_config``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

from mkstack.layer_map import LayerSource, layer_sources
from mkstack.sparse_layers import rebuild_sparse_layers

# Top-level lists that are not per-layer even when their length happens to equal the depth.
NOT_PER_LAYER = frozenset(
    {
        "architectures", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
        "decoder_start_token_id", "suppress_tokens", "begin_suppress_tokens", "bad_words_ids",
        "forced_decoder_ids", "image_size", "patch_size",
    }
)  # fmt: skip
# Lists of layer indices (a layer is "in" the set), not one entry per layer.
INDEX_LISTS = ("mlp_only_layers", "moe_layers")


def _max_window_active(section: dict, value) -> bool:
    return bool(section.get("use_sliding_window")) and isinstance(value, int)


# Scalars that single out layers by position; each maps to "does this value matter here".
POSITIONAL_SCALARS: dict[str, Callable[[dict, object], bool]] = {
    "max_window_layers": _max_window_active,
    "first_k_dense_replace": lambda section, value: isinstance(value, int) and value > 0,
    "decoder_sparse_step": lambda section, value: isinstance(value, int) and value > 1,
    "interleave_moe_layer_step": lambda section, value: isinstance(value, int) and value > 1,
    "num_kv_shared_layers": lambda section, value: isinstance(value, int) and value > 0,
}


@dataclass(frozen=True)
class SourceLayout:
    """A source model's config.json and depth."""

    config: dict
    depth: int


@dataclass(frozen=True)
class ConfigFixup:
    config: dict
    warnings: tuple[str, ...]


def rebuild_layer_config(
    config: dict,
    *,
    layer_key: str,
    layers: Sequence[LayerSource],
    sources: Mapping[Hashable, SourceLayout],
) -> ConfigFixup:
    """``config`` (not modified) with the layer count and every per-layer setting rebuilt for ``layers``.

    ``sources`` maps each ``LayerSource.model`` to its layout. A setting that only some of
    the participating models have is left as the donor wrote it, with a warning.
    """
    *parents, leaf = layer_key.split(".")
    result = copy.deepcopy(config)
    section = _section(result, parents)
    notes: list[str] = []
    if section is None:
        return ConfigFixup(result, (f"config.json has no `{'.'.join(parents)}`; per-layer settings were not rebuilt",))
    section[leaf] = len(layers)
    used = list(dict.fromkeys(source.model for source in layers))
    per_layer = {
        model: _per_layer_lists(_source_section(sources[model].config, parents), sources[model]) for model in used
    }
    for key in sorted({key for lists in per_layer.values() for key in lists}):
        lacking = [str(model) for model in used if key not in per_layer[model]]
        if lacking:
            notes.append(
                f"`{key}` is not rebuilt for the new depth: {', '.join(lacking)} has no per-layer `{key}`; "
                "the donor's list is kept and may not match the layers"
            )
            continue
        section[key] = [copy.deepcopy(per_layer[s.model][key][s.layer]) for s in layers]
    for key in INDEX_LISTS:
        member_sets = {model: _index_set(_source_section(sources[model].config, parents), key) for model in used}
        if all(members is None for members in member_sets.values()):
            continue
        section[key] = [j for j, s in enumerate(layers) if s.layer in (member_sets[s.model] or set())]
    sections = {model: _section(sources[model].config, parents) or {} for model in used}
    remapped = rebuild_sparse_layers(section, layers, sections)
    notes += _positional_warnings(sources, used, parents, skip=remapped)
    return ConfigFixup(result, tuple(dict.fromkeys(notes)))


def stack_config_transform(plan, config: dict) -> dict:
    """``run_merge``'s ``config_transform``: the rebuilt config (warnings are left to :func:`plan_config_warnings`)."""
    return _fixup(plan, config).config


def plan_config_warnings(plan) -> tuple[str, ...]:
    """What :func:`stack_config_transform` will not be able to remap, known before the run."""
    return _fixup(plan, plan.donor.config).warnings


def _fixup(plan, config: dict) -> ConfigFixup:
    key = plan.arch.num_layers_config_key
    if key is None:  # unreachable for stacks: inferred architectures are refused before planning
        return ConfigFixup(config, ())
    layers = layer_sources(getattr(plan, "layer_recipe", None) or plan.recipe, plan.models)
    sources = {ref: SourceLayout(model.config, model.num_layers) for ref, model in plan.models.items()}
    return rebuild_layer_config(config, layer_key=key, layers=layers, sources=sources)


# --- reading one source's settings --------------------------------------------------------


def _source_section(config: dict, parents: Sequence[str]) -> dict:
    """A source's layer settings: its ``parents`` section, or its top level when it has none
    (the text-only twin of a VLM keeps at the top what the VLM keeps in ``text_config``)."""
    section = _section(config, parents)
    return section if section is not None else config


def _section(config: dict, parents: Sequence[str]) -> dict | None:
    node = config
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def _per_layer_lists(section: dict, layout: SourceLayout) -> dict[str, list]:
    lists = {
        key: value
        for key, value in section.items()
        if isinstance(value, list)
        and len(value) == layout.depth
        and key not in NOT_PER_LAYER
        and key not in INDEX_LISTS
    }
    if "layer_types" not in section:
        implied = implied_layer_types(section, layout.config.get("model_type"), layout.depth)
        if implied is not None:
            lists["layer_types"] = implied
    return lists


def _index_set(section: dict, key: str) -> set[int] | None:
    value = section.get(key)
    if isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        return set(value)
    return None


def implied_layer_types(section: dict, model_type: str | None, depth: int) -> list[str] | None:
    """``layer_types`` as transformers' config class computes it for ``section``, or None.

    None when transformers does not know the model type, the class has no ``layer_types``,
    or the class refuses the config. Used for configs that predate explicit ``layer_types``
    (Gemma 2 alternation, Gemma 3 ``sliding_window_pattern``, Qwen 2 ``max_window_layers``).
    """
    kind = section.get("model_type") or model_type
    if not kind:
        return None
    import transformers

    fields = {k: v for k, v in section.items() if k != "model_type"}
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = transformers.AutoConfig.for_model(kind, **fields)
    except Exception:  # unknown model type or a config the class rejects: nothing to learn from it
        return None
    finally:
        transformers.logging.set_verbosity(verbosity)
    if isinstance(getattr(type(built), "layer_types", None), property):
        return None  # computed from other fields (Mamba): the class refuses it as a stored field
    layer_types = getattr(built, "layer_types", None)
    if isinstance(layer_types, list | tuple) and len(layer_types) == depth:
        return list(layer_types)
    return None


def _positional_warnings(
    sources: Mapping[Hashable, SourceLayout], used: Sequence, parents: Sequence[str], skip: frozenset[str] = frozenset()
) -> list[str]:
    notes = []
    for model in used:
        section = _source_section(sources[model].config, parents)
        for key, matters in POSITIONAL_SCALARS.items():
            if key not in skip and key in section and matters(section, section[key]):
                notes.append(
                    f"`{key}: {section[key]}` ({model}) singles out layers by position and cannot be "
                    "remapped for the new layer order; check it in the output's config.json"
                )
    return notes
