"""Which tensor of an input model plays the part of an output tensor (docs/vlm.md).

Inputs of one architecture share its description, so the weight at the same position of
their description is the counterpart. A vision-language model merged with its text-only
twin has another description: there the counterpart is the weight with the same text role
(common/arch/roles.py), and tensors with no text role (vision tower, projector) have none
in the text-only model: ``None``, the model takes no part in that tensor.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

from mkmerge.methods import MergeMethod
from mksuite.common.arch import ArchitectureDefinition, WeightInfo
from mksuite.common.arch.roles import holds_vision, nests_language_model, text_role
from mksuite.common.input_models import OpenedModel
from mksuite.common.loading import ModelReference

PRE, POST = "pre", "post"


class Counterparts:
    """Counterparts of the output description's weights in each input model."""

    def __init__(self, arch: ArchitectureDefinition):
        self.arch = arch
        self._roles: dict[tuple[int, int | None], dict[str, WeightInfo]] = {}  # (model id, layer) -> roles
        # (model id, layer) -> that source layer's weights: derived once, not once per tensor
        self._layers: dict[tuple[int, int], list[WeightInfo]] = {}
        self._nested = nests_language_model(arch)

    def fixed(self, model: OpenedModel, section: str, index: int, out_weight: WeightInfo) -> WeightInfo | None:
        """The counterpart of pre-weight (``section`` PRE) or post-weight ``index``."""
        if self._same(model):
            listing = model.arch.pre_weights if section == PRE else model.arch.post_weights
            return listing(model.num_layers)[index]
        return self._by_role(out_weight.name, self._role_table(model, None))

    def layer(self, model: OpenedModel, layer: int, index: int) -> WeightInfo | None:
        """The counterpart in ``model``'s layer ``layer`` of the output's ``index``-th layer weight."""
        if self._same(model):
            key = (id(model), layer)
            if key not in self._layers:
                self._layers[key] = model.arch.layer_weights(layer, model.num_layers)
            return self._layers[key][index]
        out_weight = self.arch.layer_weights(layer, model.num_layers)[index]
        return self._by_role(out_weight.name, self._role_table(model, layer))

    def _role_table(self, model: OpenedModel, layer: int | None) -> dict[str, WeightInfo]:
        """Text role -> weight, for ``model``'s fixed weights (``layer`` None) or one layer's."""
        key = (id(model), layer)
        if key not in self._roles:
            arch, depth = model.arch, model.num_layers
            weights = (
                (*arch.pre_weights(depth), *arch.post_weights(depth))
                if layer is None
                else arch.layer_weights(layer, depth)
            )
            nested = nests_language_model(arch)
            self._roles[key] = {role: w for w in weights if (role := text_role(w.name, nested)) is not None}
        return self._roles[key]

    def _same(self, model: OpenedModel) -> bool:
        return model.arch.name == self.arch.name

    def _by_role(self, out_name: str, roles: dict[str, WeightInfo]) -> WeightInfo | None:
        role = text_role(out_name, self._nested)
        if role is None:
            return None  # a vision-tower or projector tensor: not the text-only model's
        # A language-model tensor the model lacks: named by role, so the planner reports it missing.
        return roles.get(role) or WeightInfo(name=role)


def vision_mergeable(method: MergeMethod, is_base: Sequence[bool], has_base: bool, weights: Sequence) -> bool:
    """Whether the method can merge a vision-tower or projector tensor from just the VLM inputs
    that have it; else the planner copies it from one of them. Not when there is one of them,
    fewer than the method takes, a base among the text-only inputs, or `weight` values (given as
    numbers) that sum to zero, which a normalised merge would divide by."""
    if len(is_base) < max(2, method.min_inputs) or (has_base and not any(is_base)):
        return False
    takes_weight = any(spec.name == "weight" and spec.per_model for spec in method.parameters)
    return not (takes_weight and all(isinstance(w, float) for w in weights) and sum(weights) == 0)


def warn_vision_left_out(donor: OpenedModel, models: Mapping[ModelReference, OpenedModel]) -> None:
    """A text-only output takes nothing of the VLM inputs' vision towers and projectors: say so."""
    if holds_vision(donor.arch):
        return
    vlms = [str(m.ref) for m in models.values() if holds_vision(m.arch)]
    if vlms:
        warnings.warn(
            f"the output takes the architecture of {donor.ref} ({donor.arch.name}), which has no vision tower: "
            f"the vision tower and projector of {', '.join(vlms)} are left out",
            stacklevel=3,
        )
