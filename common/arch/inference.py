"""Definitions for architectures nobody wrote down, inferred from tensor names (docs/architectures.md).

Works from names alone, never instantiating a model, so it cannot see tied-weight
patterns or embedding modules; embeddings and heads are recognised by their module name.
Only single-module inference is supported: when names with layer numbers sit under
several prefixes (say ``model.layers.N`` and ``vision.blocks.N``), the prefix with the most
layer tensors becomes the layer stack and every other numbered name becomes a fixed-name
pre-weight. Stacking such a model therefore copies the other stack whole from the first
slice's model instead of slicing it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from mksuite.common.errors import ArchitectureError

from .definition import ArchitectureDefinition, WeightInfo

INFERRED_NAME = "inferred"

# The first ".<integer>." segment marks a layer: text before it is the stack's prefix.
_LAYER_SEGMENT = re.compile(r"\.(\d+)\.")

_HEAD_MODULES = frozenset({"lm_head", "embed_out"})
_INPUT_EMBEDDING_MODULES = frozenset({"wte", "tok_embeddings"})


@dataclass(frozen=True)
class _LayerName:
    prefix: str
    index: int
    template: str


def infer_architecture(tensor_names: Sequence[Sequence[str]], config: dict) -> ArchitectureDefinition:
    """Infer a definition from each model's tensor names (one sequence per model).

    Layer templates come from the chosen prefix; every other name is a pre-weight; there
    are no post-weights and no layer-count key (the count is fixed at the largest index + 1).
    A weight is optional when some model lacks it (a layer template: when some model lacks
    it at one of its own layers).
    """
    models = _as_models(tensor_names)
    ordered = list(dict.fromkeys(name for names in models for name in names))
    layered = {name: split for name in ordered if (split := _split_layer_name(name))}
    prefix = _layer_prefix(ordered, layered)

    stack = {name: split for name, split in layered.items() if split.prefix == prefix}
    present = [set(names) for names in models]
    depths = [_depth(names, stack) for names in present]
    templates = list(dict.fromkeys(split.template for split in stack.values()))
    layer_weights = tuple(
        WeightInfo(name=template, optional=not _template_everywhere(template, present, depths))
        for template in templates
    )
    pre_names = [name for name in ordered if name not in stack]
    pre_weights = tuple(_pre_weight(name, pre_names, present) for name in pre_names)

    architectures = config.get("architectures") or []
    return ArchitectureDefinition(
        name=INFERRED_NAME,
        model_type=str(config.get("model_type") or ""),
        architectures=tuple(a for a in architectures if isinstance(a, str)),
        num_layers_config_key=None,
        override_num_layers=max(depths, default=0),
        inferred=True,
        pre_weight_templates=pre_weights,
        layer_weight_templates=layer_weights,
        post_weight_templates=(),
        source="inferred from tensor names",
    )


def _as_models(tensor_names: Sequence[Sequence[str]]) -> list[list[str]]:
    # A bare list of names is a Sequence[Sequence[str]] too (of characters); refuse it.
    if isinstance(tensor_names, str) or any(isinstance(n, str) for n in tensor_names):
        raise TypeError("tensor_names takes one sequence of names per model")
    models = [list(names) for names in tensor_names]
    if not models:
        raise ArchitectureError("cannot infer an architecture without any model's tensor names.")
    return models


def _split_layer_name(name: str) -> _LayerName | None:
    match = _LAYER_SEGMENT.search(name)
    if match is None:
        return None
    prefix, rest = name[: match.start()], name[match.end() :]
    return _LayerName(prefix, int(match.group(1)), f"{prefix}.${{layer_index}}.{rest}")


def _layer_prefix(ordered: list[str], layered: dict[str, _LayerName]) -> str | None:
    """The prefix with the most layer tensors; ties go to the prefix seen first."""
    counts: dict[str, int] = {}
    for name in ordered:
        if name in layered:
            counts[layered[name].prefix] = counts.get(layered[name].prefix, 0) + 1
    return max(counts, key=counts.__getitem__, default=None)


def _depth(names: set[str], stack: dict[str, _LayerName]) -> int:
    return max((stack[n].index + 1 for n in names if n in stack), default=0)


def _template_everywhere(template: str, present: list[set[str]], depths: list[int]) -> bool:
    for names, depth in zip(present, depths):
        if depth == 0 or any(template.replace("${layer_index}", str(i)) not in names for i in range(depth)):
            return False
    return True


def _pre_weight(name: str, pre_names: list[str], present: list[set[str]]) -> WeightInfo:
    optional = not all(name in names for names in present)
    tied: tuple[str, ...] = ()
    if optional and _module_of(name) in _HEAD_MODULES:
        # A head missing from some model is most likely tied to the input embedding; point
        # at it when there is exactly one candidate, so those models can still supply it.
        candidates = [n for n in pre_names if _is_input_embedding(n)]
        if len(candidates) == 1:
            tied = (candidates[0],)
    return WeightInfo(name=name, is_embed=_is_embedding(name), optional=optional, tied_names=tied)


def _module_of(name: str) -> str:
    """The module holding a parameter: "model.embed_tokens.weight" -> "embed_tokens"."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else ""


def _is_input_embedding(name: str) -> bool:
    module = _module_of(name)
    if module in _HEAD_MODULES:
        return False
    if module in _INPUT_EMBEDDING_MODULES:
        return True
    # Position embeddings are indexed by position, not by vocabulary.
    return "embed" in module.lower() and "pos" not in module.lower()


def _is_embedding(name: str) -> bool:
    return _module_of(name) in _HEAD_MODULES or _is_input_embedding(name)
