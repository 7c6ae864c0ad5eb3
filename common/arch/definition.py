"""Architecture definitions as immutable values: which tensors a model has, per layer.

A definition holds weight *templates*; asking it for the weights of a given depth
substitutes the placeholders. Definitions come from JSON (``parsing``) or are inferred
from tensor names (``inference``); both produce the same type.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from mksuite.common.errors import ArchitectureError

from .config_values import get_config_value
from .templates import COUNT, EXPERT, LAYER, TemplatePattern, substitute, variables_in


@dataclass(frozen=True)
class WeightInfo:
    """One tensor of a model, or a template for one (docs/architectures.md)."""

    name: str
    is_embed: bool = False
    optional: bool = False
    aliases: tuple[str, ...] = ()
    tied_names: tuple[str, ...] = ()
    force_dtype: str | None = None

    def substituted(self, values: dict[str, int]) -> WeightInfo:
        """This weight with placeholders in name, aliases and tied names replaced."""
        return dataclasses.replace(
            self,
            name=substitute(self.name, values),
            aliases=tuple(substitute(a, values) for a in self.aliases),
            tied_names=tuple(substitute(t, values) for t in self.tied_names),
        )

    @property
    def per_expert(self) -> bool:
        """True when the name is repeated once per MoE expert (`${expert_index}`)."""
        return EXPERT in variables_in(self.name)


@dataclass(frozen=True)
class ArchitectureDefinition:
    """A single-module architecture: pre weights, per-layer templates, post weights.

    ``num_experts`` is set only on definitions bound to a config with :meth:`for_config`
    (``find_architecture`` does that); definitions with per-expert templates cannot list
    their weights before they are bound.
    """

    name: str
    model_type: str
    architectures: tuple[str, ...]
    num_layers_config_key: str | None
    override_num_layers: int | None
    inferred: bool = False
    pre_weight_templates: tuple[WeightInfo, ...] = ()
    layer_weight_templates: tuple[WeightInfo, ...] = ()
    post_weight_templates: tuple[WeightInfo, ...] = ()
    num_experts_config_keys: tuple[str, ...] = ()
    num_experts: int | None = None
    source: str = ""
    # Derived descriptions: every fixed weight's name in the model's module order (the pre and
    # post lists follow the saved order); used to cut a vision tower around its own layers.
    module_order: tuple[str, ...] = ()

    def num_layers(self, config: dict) -> int:
        """The model's depth: ``override_num_layers`` if set, else the config key's value."""
        if self.override_num_layers is not None:
            return self.override_num_layers
        if self.num_layers_config_key is None:
            raise ArchitectureError(
                f"architecture `{self.name}` names no layer-count config key and no fixed count.",
                hint="add num_layers_config_key or override_num_layers to the definition.",
            )
        value = get_config_value(config, self.num_layers_config_key, default=_ABSENT)
        if value is _ABSENT:
            raise ArchitectureError(
                f"config.json has no `{self.num_layers_config_key}`, which architecture "
                f"`{self.name}` reads the number of layers from.",
                hint="check that the model really is this architecture, or fix its config.json.",
            )
        if not _is_count(value):
            raise ArchitectureError(
                f"config.json `{self.num_layers_config_key}` is {value!r}; architecture "
                f"`{self.name}` needs a non-negative integer layer count there."
            )
        return value

    def for_config(self, config: dict) -> ArchitectureDefinition:
        """This definition with the expert count read from ``config`` (self if it has none).

        The first of ``num_experts_config_keys`` present in the config is used: transformers
        renames some of these keys on save (Qwen3-MoE writes ``num_local_experts`` where
        Hub checkpoints say ``num_experts``).
        """
        if not self.num_experts_config_keys:
            return self
        key, value = next(
            (
                (key, found)
                for key in self.num_experts_config_keys
                if (found := get_config_value(config, key, default=_ABSENT)) is not _ABSENT
            ),
            (" or ".join(self.num_experts_config_keys), _ABSENT),
        )
        if not _is_count(value) or value == 0:
            shown = "missing" if value is _ABSENT else repr(value)
            raise ArchitectureError(
                f"config.json `{key}` is {shown}; architecture `{self.name}` needs the number "
                "of experts there (a positive integer).",
                hint="fix the model's config.json.",
            )
        return dataclasses.replace(self, num_experts=value)

    def pre_weights(self, num_layers: int) -> list[WeightInfo]:
        """Weights before the first layer (embeddings), in definition order."""
        return [w.substituted({COUNT: num_layers}) for w in self.pre_weight_templates]

    def layer_weights(self, layer_index: int, num_layers: int) -> list[WeightInfo]:
        """Weights of one layer; per-expert templates expand to experts 0..E-1 in place."""
        if not 0 <= layer_index < num_layers:
            raise ValueError(f"layer {layer_index} is outside [0, {num_layers})")
        values = {LAYER: layer_index, COUNT: num_layers}
        weights: list[WeightInfo] = []
        for template in self.layer_weight_templates:
            if template.per_expert:
                for expert in range(self._bound_num_experts()):
                    weights.append(template.substituted({**values, EXPERT: expert}))
            else:
                weights.append(template.substituted(values))
        return weights

    def post_weights(self, num_layers: int) -> list[WeightInfo]:
        """Weights after the last layer (final norm, LM head), in definition order."""
        return [w.substituted({COUNT: num_layers}) for w in self.post_weight_templates]

    def all_weights(self, num_layers: int) -> list[WeightInfo]:
        """Every weight: pre, then each layer in order, then post."""
        weights = self.pre_weights(num_layers)
        for layer_index in range(num_layers):
            weights.extend(self.layer_weights(layer_index, num_layers))
        weights.extend(self.post_weights(num_layers))
        return weights

    def layer_index_of(self, tensor_name: str) -> int | None:
        """The layer a concrete tensor name (or one of its aliases) belongs to; None otherwise."""
        for pattern in self._layer_patterns:
            index = pattern.layer_index(tensor_name)
            if index is not None:
                return index
        return None

    @cached_property
    def _layer_patterns(self) -> tuple[TemplatePattern, ...]:
        texts = [text for w in self.layer_weight_templates for text in (w.name, *w.aliases)]
        return tuple(TemplatePattern.compile(text) for text in texts)

    def _bound_num_experts(self) -> int:
        if self.num_experts is None:
            raise ArchitectureError(
                f"architecture `{self.name}` has per-expert tensors, but no expert count is known yet.",
                hint="bind the definition to the model's config with for_config(config) (find_architecture does this).",
            )
        return self.num_experts


_ABSENT = object()


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
