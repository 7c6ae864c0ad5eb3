"""A model's module tree: its description cut into the parts mergekit's ``modules:`` recipes name.

A vision-language model's description has one layer stack (the text decoder's); its vision
tower's layers are fixed-name weights there. Cut into modules, each part gets its own
description: ``text_decoder`` keeps the text stack and the language model's fixed weights;
a vision module gets a layer stack of its own, found from the numbered names under it (the
prefix with the most of them), with the count its config section states; the projector has
fixed weights only. A text-only model is one module, ``text_decoder``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from .config_values import get_config_value
from .definition import ArchitectureDefinition, WeightInfo
from .roles import TEXT_DECODER, module_of, nests_language_model
from .templates import LAYER

_LAYER_SEGMENT = re.compile(r"\.(\d+)\.")
_DEPTH_KEYS = ("num_hidden_layers", "num_layers", "depth", "n_layers")
_SECTIONS = ("vision_config", "visual_config", "vision_tower_config")


@dataclass(frozen=True)
class ModulePart:
    """One module of a model: its own description and depth."""

    name: str
    arch: ArchitectureDefinition
    num_layers: int


def model_modules(arch: ArchitectureDefinition, config: dict, num_layers: int) -> dict[str, ModulePart]:
    """The modules of a model described by ``arch`` (bound to ``config``), in description order."""
    nested = nests_language_model(arch)
    order: list[str] = []
    fixed: dict[str, list[tuple[str, WeightInfo]]] = {}
    for section, weights in (("pre", arch.pre_weight_templates), ("post", arch.post_weight_templates)):
        for weight in weights:
            module = module_of(weight.name, nested)
            if module not in order:
                order.append(module)
            fixed.setdefault(module, []).append((section, weight))
    if TEXT_DECODER not in order:
        order.insert(0, TEXT_DECODER)
    parts = {}
    for module in order:
        own = fixed.get(module, [])
        if module == TEXT_DECODER:
            parts[module] = ModulePart(
                module,
                dataclasses.replace(
                    arch,
                    name=f"{arch.name}/{module}",
                    pre_weight_templates=tuple(w for s, w in own if s == "pre"),
                    post_weight_templates=tuple(w for s, w in own if s == "post"),
                ),
                num_layers,
            )
        else:
            parts[module] = _side_module(arch, config, module, [w for _, w in own])
    return parts


def _side_module(arch: ArchitectureDefinition, config: dict, module: str, weights: list[WeightInfo]) -> ModulePart:
    """A vision tower or projector: its numbered weights become a layer stack when it has one;
    the others are cut around it in the model's module order where the description knows it."""
    rank = {name: i for i, name in enumerate(arch.module_order)}
    weights = sorted(weights, key=lambda w: rank.get(w.name, len(rank)))
    numbered: dict[str, list[tuple[int, str, WeightInfo]]] = {}
    for weight in weights:
        match = _LAYER_SEGMENT.search(weight.name)
        if match:
            prefix = weight.name[: match.start()]
            template = f"{prefix}.${{{LAYER}}}.{weight.name[match.end() :]}"
            numbered.setdefault(prefix, []).append((int(match.group(1)), template, weight))
    stack = max(numbered, key=lambda p: len(numbered[p]), default=None)
    entries = numbered.get(stack, [])
    depth = max((index + 1 for index, _, _ in entries), default=0)
    in_stack = {id(w) for _, _, w in entries}
    templates: dict[str, set[int]] = {}
    flags: dict[str, WeightInfo] = {}
    for index, template, weight in entries:
        templates.setdefault(template, set()).add(index)
        flags.setdefault(template, weight)
    layer_weights = tuple(
        dataclasses.replace(
            flags[t],
            name=t,
            aliases=_templated(flags[t].aliases, stack or ""),
            optional=flags[t].optional or len(layers) < depth,
        )
        for t, layers in templates.items()
    )
    fixed = [w for w in weights if id(w) not in in_stack]
    first_layer = min((i for i, w in enumerate(weights) if id(w) in in_stack), default=len(weights))
    key = _depth_key(config, depth) if depth else None
    described = dataclasses.replace(
        arch,
        name=f"{arch.name}/{module}",
        num_layers_config_key=key,
        override_num_layers=None if key else depth,
        pre_weight_templates=tuple(w for w in fixed if weights.index(w) < first_layer),
        layer_weight_templates=layer_weights,
        post_weight_templates=tuple(w for w in fixed if weights.index(w) >= first_layer),
        num_experts_config_keys=(),
        num_experts=None,
    )
    return ModulePart(module, described, depth)


def _templated(aliases: tuple[str, ...], stack: str) -> tuple[str, ...]:
    """A layer weight's other stored names as templates: the layer number after the stack's last
    segment (``layers.1.`` in ``vision_tower.vision_model.encoder.layers.1.*``) becomes the placeholder."""
    tail = stack.rsplit(".", 1)[-1]
    pattern = re.compile(rf"(^|\.){re.escape(tail)}\.(\d+)\.")
    templated = []
    for alias in aliases:
        match = pattern.search(alias)
        if match:
            templated.append(f"{alias[: match.start(2)]}${{{LAYER}}}{alias[match.end(2) :]}")
    return tuple(templated)


def _depth_key(config: dict, depth: int) -> str | None:
    """The config key stating a vision stack's depth (``vision_config.num_hidden_layers``)."""
    for section in _SECTIONS:
        for key in _DEPTH_KEYS:
            if get_config_value(config, f"{section}.{key}", default=None) == depth:
                return f"{section}.{key}"
    return None
