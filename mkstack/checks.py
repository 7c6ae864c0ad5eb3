"""Checks a stack must pass before any tensor is read: known architectures, matching shapes.

Everything here reads config.json and weight headers only.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence

from mksuite.common.arch.config_values import get_config_value
from mksuite.common.arch.roles import nests_language_model, text_role
from mksuite.common.errors import ArchitectureError, ShapeMismatchError
from mksuite.common.input_models import OpenedModel, open_input_models
from mksuite.common.loading import ModelReference

# Config fields that must agree for layers of different models to be stacked, by the names
# the architectures use (Llama-style, GPT-2, T5-style).
SHAPE_FIELDS: tuple[tuple[str, ...], ...] = (
    ("hidden_size", "n_embd", "d_model"),
    ("num_attention_heads", "n_head"),
    ("num_key_value_heads",),
    ("head_dim",),
    ("intermediate_size", "n_inner"),
)
_ABSENT = object()


def open_stack_inputs(
    refs: Iterable[ModelReference], *, allow_crimes: bool = False, cache_dir: str | None = None
) -> dict[ModelReference, OpenedModel]:
    """Open the models (headers only) and refuse any whose description had to be inferred.

    Mixed architectures are refused by the engine unless ``allow_crimes``.
    """
    refs = list(dict.fromkeys(refs))
    with warnings.catch_warnings():
        # The engine would infer a definition and warn; stacking refuses instead (below).
        warnings.filterwarnings("ignore", message="no architecture definition for")
        models = open_input_models(refs, allow_crimes=allow_crimes, cache_dir=cache_dir)
    for model in models.values():
        if model.arch.inferred:
            name = (model.config.get("architectures") or ["(none)"])[0]
            raise ArchitectureError(
                f"{model.ref} is `{name}` (model_type `{model.config.get('model_type')}`), which has no "
                "architecture definition (the installed transformers does not know it and no JSON describes it). "
                "Stacking needs one: "
                "without it the final norm and lm_head cannot be told from layer weights and the output's "
                "layer count cannot be set",
                hint=f"add architectures/{model.config.get('model_type') or 'NAME'}.json describing its "
                "pre-weights, layer templates and post-weights, or upgrade transformers",
            )
    return models


def check_same_shapes(models: Mapping[ModelReference, OpenedModel]) -> None:
    """Hidden size, heads and MLP width agree across all models; so do layer 0's tensor shapes."""
    listed = list(models.values())
    first = listed[0]
    for other in listed[1:]:
        for names in SHAPE_FIELDS:
            mine, theirs = _field(_layer_section(first), names), _field(_layer_section(other), names)
            if mine[1] is not _ABSENT and theirs[1] is not _ABSENT and mine[1] != theirs[1]:
                raise ShapeMismatchError(
                    f"{first.ref} has {mine[0]} = {mine[1]} but {other.ref} has {theirs[0]} = {theirs[1]}; "
                    "layers of models with different shapes cannot be stacked",
                    hint="stack models of one family and size (e.g. two fine-tunes of the same base)",
                )
        _compare_layer_tensors(first, other)


def check_vocabularies(first: OpenedModel, last: OpenedModel) -> None:
    """The embeddings (first slice's model) and the LM head (last slice's) share a vocabulary."""
    if first is last:
        return
    mine, theirs = _vocab(first), _vocab(last)
    if mine is not None and theirs is not None and mine != theirs:
        raise ShapeMismatchError(
            f"the embeddings come from {first.ref} (first slice, vocab_size {mine}) but the final norm and "
            f"lm_head from {last.ref} (last slice, vocab_size {theirs}); the output would not fit together",
            hint="start and end the stack with the same model",
        )


def _field(config: dict, names: Sequence[str]) -> tuple[str, object]:
    for name in names:
        if name in config:
            return name, config[name]
    return names[0], _ABSENT


def _layer_section(model: OpenedModel) -> dict:
    """The part of config.json that holds the layer-count key (``text_config`` for some models)."""
    key = model.arch.num_layers_config_key or ""
    if "." not in key:
        return model.config
    section = get_config_value(model.config, key.rsplit(".", 1)[0], default=None)
    return section if isinstance(section, dict) else model.config


def _vocab(model: OpenedModel) -> int | None:
    value = _layer_section(model).get("vocab_size", model.config.get("vocab_size"))
    return value if isinstance(value, int) else None


def _compare_layer_tensors(first: OpenedModel, other: OpenedModel) -> None:
    """A backstop for configs that name their sizes unusually: compare layer 0's headers."""
    if first.num_layers == 0 or other.num_layers == 0:
        return
    mine = first.arch.layer_weights(0, first.num_layers)
    theirs = other.arch.layer_weights(0, other.num_layers)
    if first.arch.name != other.arch.name:  # a VLM and its text-only twin: pair tensors by role
        mine_nested, theirs_nested = nests_language_model(first.arch), nests_language_model(other.arch)
        by_role = {text_role(w.name, theirs_nested): w for w in theirs}
        pairs = [(a, by_role[r]) for a in mine if (r := text_role(a.name, mine_nested)) in by_role]
    else:
        pairs = list(zip(mine, theirs))
    for a, b in pairs:
        name_a, name_b = first.locate(a), other.locate(b)
        if name_a is None or name_b is None:
            continue  # missing tensors are the planner's to report
        shape_a, shape_b = first.info(name_a).shape, other.info(name_b).shape
        if shape_a != shape_b:
            raise ShapeMismatchError(
                f"{a.name} has shape {list(shape_a)} in {first.ref} but {list(shape_b)} in {other.ref}; "
                "layers of models with different shapes cannot be stacked",
                hint="stack models of one family and size (e.g. two fine-tunes of the same base)",
            )
