"""Tensor roles across a vision-language model and its text-only twin (docs/vlm.md).

A VLM checkpoint stores its language model under a prefix (``language_model.model.*`` and
``language_model.lm_head.*`` as transformers writes them, ``model.language_model.*`` in
checkpoints saved by its internal layout); the text-only twin stores the same tensors
without it. A tensor's *text role* is the name it has in the text-only model, so the two
can be matched tensor by tensor. Vision towers and projectors have no text role.

The *module* of a tensor is the part of the model it belongs to, named as mergekit's
``modules:`` recipes name them: ``text_decoder``, ``vision_tower`` (``vision_model`` in
Llama 4) and ``multi_modal_projector``.
"""

from __future__ import annotations

from collections.abc import Iterable

from .definition import ArchitectureDefinition

TEXT_DECODER = "text_decoder"
PROJECTOR = "multi_modal_projector"

# Stored prefix -> the text model's name for what follows it, most specific first.
_TEXT_PREFIXES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
    ("model.text_model.", "model."),
    ("language_model.", "model."),
    ("text_model.", "model."),
)
# Top-level parts of a VLM that its text-only twin lacks, with the module each belongs to.
_VISION_PARTS = {
    "vision_tower": "vision_tower",
    "vision_model": "vision_model",
    "visual": "visual",
    "vision_encoder": "vision_encoder",
    "multi_modal_projector": PROJECTOR,
    "mm_projector": PROJECTOR,
    "connector": PROJECTOR,
}


def text_role(name: str, nested: bool = False) -> str | None:
    """The name ``name`` has in the text-only twin; None for vision-tower and projector tensors.

    ``nested``: the model keeps its language model under a prefix (see :func:`nests_language_model`);
    then every other tensor but the LM head is part of the vision side (``image_newline``).
    """
    for prefix, text_prefix in _TEXT_PREFIXES:
        if name.startswith(prefix):
            return text_prefix + name[len(prefix) :]
    if module_of(name, nested) != TEXT_DECODER:
        return None
    return name


def module_of(name: str, nested: bool = False) -> str:
    """The module ``name`` belongs to: ``text_decoder`` unless it sits in a vision part.

    In a model that nests its language model (``nested``), a tensor outside it, the LM head and
    the known vision parts (a learned ``image_newline``) belongs to the projector.
    """
    parts = name.split(".")
    top = parts[1] if parts[0] == "model" and len(parts) > 2 else parts[0]
    if top in _VISION_PARTS:
        return _VISION_PARTS[top]
    if nested and not name.startswith("lm_head.") and not any(name.startswith(p) for p, _ in _TEXT_PREFIXES):
        return PROJECTOR
    return TEXT_DECODER


def nests_language_model(arch: ArchitectureDefinition) -> bool:
    """Whether ``arch`` keeps its language model under a prefix (``language_model.model.*``)."""
    return any(w.name.startswith(p) for w in arch.layer_weight_templates for p, _ in _TEXT_PREFIXES)


def holds_vision(arch: ArchitectureDefinition) -> bool:
    """Whether ``arch`` has tensors outside its language model (a vision tower, a projector)."""
    nested = nests_language_model(arch)
    return any(module_of(w.name, nested) != TEXT_DECODER for w in _fixed(arch))


def are_twins(first: ArchitectureDefinition, other: ArchitectureDefinition) -> bool:
    """Whether two different descriptions hold the same language model (by text role).

    Every required tensor of either language model must have a counterpart in the other,
    and at least one of them must be a multi-part (vision-language) model: two text-only
    families whose names happen to agree stay "different architectures".
    """
    if not (holds_vision(first) or holds_vision(other)):
        return False
    return _text_roles(first, required=True) <= _text_roles(other, required=False) and _text_roles(
        other, required=True
    ) <= _text_roles(first, required=False)


def _text_roles(arch: ArchitectureDefinition, *, required: bool) -> set[str]:
    nested = nests_language_model(arch)
    roles = set()
    for weight in (*_fixed(arch), *arch.layer_weight_templates):
        if required and weight.optional:
            continue
        role = text_role(weight.name, nested)
        if role is not None:
            roles.add(role)
    return roles


def _fixed(arch: ArchitectureDefinition) -> Iterable:
    return (*arch.pre_weight_templates, *arch.post_weight_templates)
