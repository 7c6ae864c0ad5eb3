"""Input models: references resolved to files, config and architecture (metadata only).

Opening an input reads ``config.json`` and the weight files' headers, never tensor data,
so everything here is cheap and happens before the first byte of weights moves.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from mksuite.common.arch import ArchitectureDefinition, WeightInfo, infer_architecture
from mksuite.common.arch.registry import candidate_architectures, choose_architecture, fits, undescribed_tensors
from mksuite.common.arch.roles import are_twins
from mksuite.common.arch.stored_layout import stored_parts
from mksuite.common.errors import ArchitectureError, MkError
from mksuite.common.loading import ModelFiles, ModelReference, TensorInfo, open_model, resolve_model_path
from mksuite.common.loading.lora import with_adapter
from mksuite.common.loading.stored_parts import StoredPartSource


@dataclass(frozen=True, eq=False)
class OpenedModel:
    """One resolved input: where it lives, what it holds, how its tensors are laid out."""

    ref: ModelReference
    path: Path
    files: ModelFiles
    arch: ArchitectureDefinition
    num_layers: int

    @property
    def key(self) -> str:
        return str(self.ref)

    @property
    def config(self) -> dict:
        return self.files.config

    def locate(self, weight: WeightInfo) -> str | None:
        """The stored name of ``weight`` in this model: its name, an alias, or a tied name."""
        tensors = self.files.tensors
        for name in (weight.name, *weight.aliases, *weight.tied_names):
            if name in tensors:
                return name
        return None

    def has_own(self, weight: WeightInfo) -> bool:
        """Whether the model stores ``weight`` itself (by name or alias), not only via a tie."""
        tensors = self.files.tensors
        return any(name in tensors for name in (weight.name, *weight.aliases))

    def info(self, name: str) -> TensorInfo:
        return self.files.tensors.info(name)


def open_input_models(
    refs: Iterable[ModelReference],
    *,
    allow_crimes: bool = False,
    cache_dir: str | None = None,
    lora_merge_dtype: torch.dtype | None = None,
) -> dict[ModelReference, OpenedModel]:
    """Resolve and open each distinct reference (document order kept); check architectures agree.

    A `model+lora` reference reads its model through the adapter (common.loading.lora);
    ``lora_merge_dtype`` is the dtype such a model's tensors come out in (default: as stored).
    """
    opened: dict[ModelReference, OpenedModel] = {}
    for ref in refs:
        if ref in opened:
            continue
        path = resolve_model_path(ref, cache_dir=cache_dir)
        files = open_model(path)
        if ref.lora is not None:
            files.tensors = _with_lora(files, ref, cache_dir, lora_merge_dtype)
        config = dict(files.config)
        if ref.override_architecture:
            config["architectures"] = [ref.override_architecture]
            files.config = config
        opened[ref] = OpenedModel(ref=ref, path=path, files=files, arch=None, num_layers=0)  # type: ignore[arg-type]
    _assign_architectures(list(opened.values()), allow_crimes)
    return opened


def _with_lora(files: ModelFiles, ref: ModelReference, cache_dir: str | None, dtype: torch.dtype | None):
    """The model's tensors seen through its adapter; errors from the adapter name it already."""
    try:
        try:
            adapter_path = resolve_model_path(ref.lora, cache_dir=cache_dir)
        except MkError as error:
            raise error.within(f"the LoRA adapter of `{ref}`") from None
        return with_adapter(files.tensors, adapter_path, model=str(files.path), merge_dtype=dtype)
    except MkError:
        files.close()
        raise


def _assign_architectures(models: list[OpenedModel], allow_crimes: bool) -> None:
    for model in models:
        _read_in_saved_layout(model)
    known = {id(m): choose_architecture(m.config, m.files.tensors.names()) for m in models}
    if any(arch is None for arch in known.values()):
        names = [sorted(m.files.tensors.names()) for m in models]
        inferred = infer_architecture(names, models[0].config)
        unknown = sorted({str((m.config.get("architectures") or ["?"])[0]) for m in models if known[id(m)] is None})
        warnings.warn(
            f"no architecture definition for {', '.join(unknown)}; inferred one from tensor names "
            "(final norm and lm_head are treated as pre-weights, layer count is not updated in config.json)",
            stacklevel=2,
        )
        known = {id(m): known[id(m)] or inferred for m in models}
    first = known[id(models[0])]
    for model in models:
        arch = known[id(model)]
        twin = arch.name != first.name and not first.inferred and not arch.inferred and are_twins(first, arch)
        if arch.name != first.name and not allow_crimes and not twin:
            raise ArchitectureError(
                f"inputs have different architectures: {models[0].ref} is {first.name}, {model.ref} is {arch.name}",
                hint="pass --allow-crimes to merge them anyway (the first model's architecture is used)",
            )
        # A VLM and its text-only twin keep their own descriptions: the planner matches
        # their language-model tensors by role (common/arch/roles.py).
        chosen = first if allow_crimes and not twin else arch
        object.__setattr__(model, "arch", chosen)
        object.__setattr__(model, "num_layers", _layers(model, chosen))
        if not chosen.inferred and not allow_crimes:
            _check_described(model)


# A tensor of all experts at once: `experts.` followed by a name, not an expert index.
_FUSED_LOOKING = re.compile(r"(^|\.)experts\.[A-Za-z_]")


def _read_in_saved_layout(model: OpenedModel) -> None:
    """An input stored in transformers' in-memory layout (fused MoE experts) is read as the
    per-expert tensors ``save_pretrained`` writes, which descriptions name (docs/architectures.md)."""
    config, tensors = model.config, model.files.tensors
    names = tensors.names()
    if not any(_FUSED_LOOKING.search(name) for name in names):
        return  # checked first: reading transformers' conversion mapping imports transformers
    for candidate in candidate_architectures(config):
        try:
            depth = candidate.num_layers(config)
            wanted = [w.name for w in candidate.all_weights(depth)]
        except ArchitectureError:
            continue
        if fits(candidate, config, names) and not undescribed_tensors(candidate, depth, names):
            return  # stored as described (gpt-oss saves its experts fused)
        parts = stored_parts(config.get("model_type"), wanted, names)
        if parts and fits(candidate, config, {*names, *parts}):
            model.files.tensors = StoredPartSource(tensors, parts, model=str(model.ref))
            return


def _check_described(model: OpenedModel) -> None:
    """Every stored tensor is part of the description: none may be dropped silently."""
    extra = undescribed_tensors(model.arch, model.num_layers, model.files.tensors.names())
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        raise ArchitectureError(
            f"{model.ref} stores {len(extra)} tensor(s) that architecture `{model.arch.name}` "
            f"({model.arch.source or 'shipped'}) does not describe: {shown}; merging would drop them",
            hint="check that config.json matches the weights (layer count, model_type), or describe the "
            "model in an architectures/*.json override",
        )


def _layers(model: OpenedModel, arch: ArchitectureDefinition) -> int:
    try:
        return arch.num_layers(model.config)
    except ArchitectureError as error:
        raise ArchitectureError(f"{model.ref}: {error.message}", hint=error.hint) from None
