"""`model+lora` inputs: a PEFT LoRA adapter applied to each tensor as it is loaded (docs/recipes.md).

A :class:`LoraSource` wraps the base model's tensor source. Loading a tensor the adapter
touches reads the base tensor (or the adapter's replacement for it) and the adapter's two
factors and adds ``s · B @ A``; nothing else changes. So no merged copy of the model is
written first (mergekit merges into a cache directory), peft is not needed, and only the
tensors in flight are ever in memory.

Opening reads adapter_config.json and the adapter weights' header only. Every stored key is
matched to a base tensor and every shape and rank is checked then, so a wrong adapter fails
at plan time, before any tensor data moves.

Precision: the update and the sum are computed in float32 (float64 for float64 weights) and
the result is cast to the base tensor's stored dtype, or to ``merge_dtype``
(``--lora-merge-dtype``) for every tensor of the model when one is given.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mksuite.common.errors import AdapterError, MissingTensorError, ModelNotFoundError, ShapeMismatchError, did_you_mean
from mksuite.common.loading.containment import contained, model_root
from mksuite.common.loading.lora_format import (
    ADAPTER_WEIGHTS,
    AdapterKey,
    LoraConfig,
    parse_adapter_key,
    parse_lora_config,
)
from mksuite.common.loading.model import open_tensor_file
from mksuite.common.loading.source import TensorInfo, TensorSource

ADAPTER_CONFIG = "adapter_config.json"
_FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class LowRankUpdate:
    """``scale · B @ A`` (its transpose when ``transpose``), B and A named by adapter keys."""

    a: str
    b: str
    scale: float
    transpose: bool


@dataclass(frozen=True)
class TensorPatch:
    """How the adapter changes one base tensor: optionally replaced, then optionally updated."""

    replacement: str | None = None
    update: LowRankUpdate | None = None


@dataclass
class LoraAdapter:
    """An opened adapter directory: its config and its (lazily read) weights."""

    path: Path
    config: LoraConfig
    tensors: TensorSource


def open_adapter(path: str | os.PathLike) -> LoraAdapter:
    """Read adapter_config.json and the adapter weights' header (no tensor data)."""
    path = Path(path)
    root = model_root(path)
    config_path = path / ADAPTER_CONFIG
    for name in (ADAPTER_CONFIG, *ADAPTER_WEIGHTS):
        if os.path.lexists(path / name):
            contained(root, path / name, what="adapter file")
    if not config_path.is_file():
        raise ModelNotFoundError(
            f"{path} has no {ADAPTER_CONFIG}, so it is not a PEFT adapter directory",
            model=str(path),
            hint="the part after `+` must name a LoRA adapter saved by peft (save_pretrained)",
        )
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterError(f"cannot read {config_path}: {error}", path=str(config_path)) from None
    config = parse_lora_config(raw, where=str(config_path))
    weights = next((path / name for name in ADAPTER_WEIGHTS if (path / name).is_file()), None)
    if weights is None:
        raise ModelNotFoundError(
            f"adapter {path} has no weights: expected {' or '.join(ADAPTER_WEIGHTS)}",
            model=str(path),
        )
    return LoraAdapter(path, config, open_tensor_file(weights))


def plan_patches(adapter: LoraAdapter, base: TensorSource, *, model: str) -> dict[str, TensorPatch]:
    """Match every adapter key to a tensor of ``base`` and check shapes and ranks (headers only).

    ``model`` names the base model in errors. Returns base tensor name -> patch.
    """
    where = str(adapter.path)
    keys = [parse_adapter_key(key, where=where) for key in adapter.tensors.names()]
    patches: dict[str, TensorPatch] = {}
    for key in keys:
        if key.kind == "full":
            _check_target(key, adapter, base, model)
            if patches.get(key.target, TensorPatch()).replacement is not None:
                other = patches[key.target].replacement
                raise AdapterError(f"{where}: `{other}` and `{key.key}` both replace `{key.target}`", path=where)
            _check_replacement(key, adapter, base, model)
            patches[key.target] = TensorPatch(replacement=key.key)
    for module_keys in _factors_by_module(keys).values():
        update, target = _low_rank_update(module_keys, adapter, base, model)
        patches[target] = replace(patches.get(target, TensorPatch()), update=update)
    return patches


def _factors_by_module(keys: Iterable[AdapterKey]) -> dict[str, list[AdapterKey]]:
    grouped: dict[str, list[AdapterKey]] = defaultdict(list)
    for key in keys:
        if key.kind != "full":
            grouped[key.module].append(key)
    return grouped


def _check_target(key: AdapterKey, adapter: LoraAdapter, base: TensorSource, model: str) -> None:
    if key.target not in base:
        raise MissingTensorError(
            f"adapter {adapter.path}: tensor `{key.key}` applies to `{key.target}`, which model {model} does not have",
            hint=did_you_mean(key.target, base.names())
            or "was the adapter trained on a different model (or a tied weight the checkpoint does not store)?",
        )


def _check_replacement(key: AdapterKey, adapter: LoraAdapter, base: TensorSource, model: str) -> None:
    stored, expected = adapter.tensors.info(key.key).shape, base.info(key.target).shape
    if stored != expected:
        raise ShapeMismatchError(
            f"adapter {adapter.path}: `{key.key}` has shape {list(stored)}, but `{key.target}` of model "
            f"{model} has shape {list(expected)}",
            hint="an adapter saved after resizing the vocabulary needs a base model resized the same way",
        )


def _low_rank_update(
    keys: list[AdapterKey], adapter: LoraAdapter, base: TensorSource, model: str
) -> tuple[LowRankUpdate, str]:
    """The checked update for one module from its A and B keys."""
    where = str(adapter.path)
    by_factor = {key.factor: key for key in keys}
    first = keys[0]
    if len(keys) != 2 or set(by_factor) != {"A", "B"} or keys[0].kind != keys[1].kind:
        listing = ", ".join(f"`{key.key}`" for key in keys)
        raise AdapterError(
            f"{where}: module `{first.module}` needs one A and one B factor, found {listing}", path=where
        )
    a_key, b_key = by_factor["A"], by_factor["B"]
    config = adapter.config
    if not config.targets(first.module):
        raise AdapterError(
            f"{where}: `{a_key.key}` adapts module `{first.module}`, which the adapter's "
            f"target_modules ({config.target_modules!r}) does not select; peft would not load it",
            path=where,
        )
    _check_target(a_key, adapter, base, model)
    a, b = adapter.tensors.info(a_key.key), adapter.tensors.info(b_key.key)
    for info in (a, b):
        if len(info.shape) != 2 or info.dtype not in _FACTOR_DTYPES:  # float8 factors would need scales
            raise AdapterError(
                f"{where}: `{info.name}` must be a 2-D floating-point matrix, got {list(info.shape)} {info.dtype}",
                path=where,
            )
    rank = config.rank_of(first.module)
    if a.shape[0] != rank or b.shape[1] != rank:
        raise ShapeMismatchError(
            f"adapter {where}: module `{first.module}` has rank {rank} in {ADAPTER_CONFIG}, but its factors "
            f"are {list(a.shape)} (A) and {list(b.shape)} (B)",
            hint="A must be [r, in] and B [out, r]; check r / rank_pattern or re-save the adapter",
        )
    target = base.info(a_key.target)
    transpose = _orientation(first, a, b, target, config, model, where)
    return LowRankUpdate(a_key.key, b_key.key, config.scale_of(first.module), transpose), a_key.target


def _orientation(
    key: AdapterKey, a: TensorInfo, b: TensorInfo, target: TensorInfo, config: LoraConfig, model: str, where: str
) -> bool:
    """Whether B @ A is transposed before it is added to ``target``.

    Embeddings always are. Linear layers follow ``fan_in_fan_out``, unless the base shape
    admits only the other orientation: peft decides by layer type (Conv1D stores [in, out])
    and overrides the flag, so a non-square shape settles it.
    """
    product = (b.shape[0], a.shape[1])
    flipped = (a.shape[1], b.shape[0])
    if key.kind == "embedding":
        candidates = [True]
    else:
        candidates = [config.fan_in_fan_out, not config.fan_in_fan_out]
    for transpose in candidates:
        if target.shape == (flipped if transpose else product):
            return transpose
    raise ShapeMismatchError(
        f"adapter {where}: the update of `{target.name}` is {list(product)} "
        f"(B {list(b.shape)} @ A {list(a.shape)}), which does not fit its shape {list(target.shape)} in model {model}",
        hint="was the adapter trained on a model of a different size?",
    )


def add_low_rank(
    weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, *, transpose: bool
) -> torch.Tensor:
    """``weight + (B @ A) · scale`` (``(B @ A)ᵀ`` when ``transpose``), in float32 or wider.

    The update is scaled before it is added, as peft does. The result stays in the compute
    dtype; the caller casts it. ``weight`` may be modified in place.
    """
    compute = torch.promote_types(weight.dtype, torch.float32)
    delta = (b.to(compute) @ a.to(compute)).mul_(scale)
    if transpose:
        delta = delta.T
    return weight.to(compute).add_(delta)


class LoraSource(TensorSource):
    """A base model's tensors as the adapter changes them; same names and shapes."""

    def __init__(
        self,
        base: TensorSource,
        adapter: LoraAdapter,
        patches: dict[str, TensorPatch],
        *,
        merge_dtype: torch.dtype | None = None,
    ):
        self.base = base
        self.adapter = adapter
        self.patches = patches
        self.merge_dtype = merge_dtype

    def names(self) -> list[str]:
        return self.base.names()

    def __contains__(self, name: object) -> bool:
        return name in self.base

    def info(self, name: str) -> TensorInfo:
        info = self.base.info(name)
        return info if self.merge_dtype is None else replace(info, dtype=self.merge_dtype)

    def load(self, name: str) -> torch.Tensor:
        patch = self.patches.get(name)
        dtype = self.info(name).dtype
        if patch is None:
            return self.base.load(name).to(dtype)
        tensors = self.adapter.tensors
        weight = tensors.load(patch.replacement) if patch.replacement else self.base.load(name)
        if patch.update is not None:
            update = patch.update
            weight = add_low_rank(
                weight, tensors.load(update.a), tensors.load(update.b), update.scale, transpose=update.transpose
            )
        return weight.to(dtype)

    def close(self) -> None:
        self.base.close()
        self.adapter.tensors.close()

    def __repr__(self) -> str:
        return f"LoraSource({self.base!r} + {self.adapter.path}, {len(self.patches)} tensors changed)"


def with_adapter(
    base: TensorSource, adapter_path: str | os.PathLike, *, model: str, merge_dtype: torch.dtype | None = None
) -> LoraSource:
    """Open the adapter at ``adapter_path`` over ``base`` and check it against base's headers."""
    adapter = open_adapter(adapter_path)
    try:
        patches = plan_patches(adapter, base, model=model)
    except BaseException:
        adapter.tensors.close()
        raise
    return LoraSource(base, adapter, patches, merge_dtype=merge_dtype)
