"""Where a described tensor lies in a checkpoint stored in transformers' in-memory layout.

transformers v5 holds MoE experts fused (``mlp.experts.gate_up_proj`` [E, 2I, H] and
``mlp.experts.down_proj`` [E, H, I]; Mixtral's router as ``mlp.gate``), while
``save_pretrained`` reverses its load-time conversion and writes one tensor per expert
(``block_sparse_moe.experts.3.w1.weight``). Descriptions (derived and JSON) name the saved,
per-expert layout; checkpoints written from a state dict hold the fused one, and transformers
loads both. This module reads the installed transformers' own conversion mapping for a
model type and says, for a per-expert name, which stored tensor holds it and which slice:
renamings give a whole tensor under another name, an expert-stacking conversion
(``MergeModulelist(dim=0)``, optionally then ``Concatenate(dim=1)`` of several projections)
gives one expert's row band. Other conversions are not read: their tensors stay
undescribed, which is an error naming them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class StoredPart:
    """A described tensor as a piece of a stored one.

    ``expert`` None: the whole stored tensor. Otherwise index ``expert`` of the stored
    tensor's first dimension, and of that, piece ``part`` of ``parts`` equal row bands.
    """

    stored: str
    expert: int | None = None
    part: int = 0
    parts: int = 1


@dataclass(frozen=True)
class _ExpertConverter:
    converter: object
    patterns: tuple[str, ...]
    expert_res: tuple[re.Pattern, ...]


def stored_parts(model_type: str | None, wanted: Iterable[str], stored: Collection[str]) -> dict[str, StoredPart]:
    """For each name in ``wanted`` that is not stored: the stored tensor transformers would
    load it into for ``model_type``, and the slice of it. Names with none are left out."""
    if not isinstance(model_type, str):
        return {}
    renamings, converters = _conversions(model_type)
    if not renamings and not converters:
        return {}
    from transformers.core_model_loading import apply_renamings

    present = set(stored)
    found: dict[str, StoredPart] = {}
    for name in wanted:
        if name in present:
            continue
        renamed = apply_renamings(name, renamings) if renamings else name
        part = _expert_part(renamed, converters, present)
        if part is not None:
            found[name] = part
        elif renamed != name and renamed in present:
            found[name] = StoredPart(renamed)
    return found


def _expert_part(renamed: str, converters: list[_ExpertConverter], present: set[str]) -> StoredPart | None:
    for entry in converters:
        target, pattern = entry.converter.rename_source_key(renamed)
        if pattern is None or target not in present:
            continue
        part = entry.patterns.index(pattern)
        match = entry.expert_res[part].search(renamed)
        if match is None:
            return None
        return StoredPart(target, expert=int(match.group(1)), part=part, parts=len(entry.patterns))
    return None


@functools.lru_cache(maxsize=32)
def _conversions(model_type: str) -> tuple[list, list[_ExpertConverter]]:
    """This type's plain renamings and the expert-stacking converters this module can read."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, WeightRenaming
    except ImportError:  # a transformers without conversion mappings stores what it saves
        return [], []
    mapping = get_checkpoint_conversion_mapping(model_type) or []
    renamings = [t for t in mapping if type(t) is WeightRenaming]
    converters = []
    for transform in mapping:
        if type(transform) is not WeightConverter or len(transform.target_patterns) != 1:
            continue
        ops = transform.operations
        stacks = bool(ops) and type(ops[0]) is MergeModulelist and ops[0].dim == 0
        joins = ops[1:] == [] or (len(ops) == 2 and type(ops[1]) is Concatenate and ops[1].dim == 1)
        patterns = tuple(transform.source_patterns)
        if (
            not (stacks and joins)
            or any(p.count("*") != 1 for p in patterns)
            or (len(ops) == 1) != (len(patterns) == 1)
        ):
            continue
        expert_res = tuple(re.compile(re.escape(p).replace(r"\*", r"(\d+)")) for p in patterns)
        converters.append(_ExpertConverter(transform, patterns, expert_res))
    return renamings, converters
