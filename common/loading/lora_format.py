"""The PEFT LoRA adapter format: what adapter_config.json says and what each stored key means.

Facts of the format (PEFT's saved adapters, `adapter_model.safetensors` / `.bin`):

* Keys are the wrapped model's parameter names under ``base_model.model.``; the adapter-name
  segment (``default``) is normally stripped when saving but may be present.
* ``<module>.lora_A.weight`` is ``[r, in]`` and ``<module>.lora_B.weight`` is ``[out, r]``;
  the update of ``<module>.weight`` is ``s · B @ A`` (``[out, in]``). Layers that store their
  weight as ``[in, out]`` (GPT-2's Conv1D, ``fan_in_fan_out``) take its transpose.
* ``<module>.lora_embedding_A`` is ``[r, num_embeddings]`` and ``lora_embedding_B`` is
  ``[embedding_dim, r]``; the embedding's update is ``s · (B @ A)ᵀ``.
* ``s = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; ``rank_pattern`` and
  ``alpha_pattern`` override r and alpha per module: the first key (a regex) that matches a
  dot-bounded suffix of the module name wins.
* Any other key is a whole tensor that replaces the base model's (``modules_to_save``, trained
  biases, embedding layers saved after a vocabulary resize), written as ``<module>.<param>``,
  ``<module>.modules_to_save.<adapter>.<param>`` or ``<module>.base_layer.<param>``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from mksuite.common.errors import AdapterError

PEFT_PREFIX = "base_model.model."
# The adapter weight files PEFT saves, in the order they are looked for.
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_LINEAR_FACTORS = {"lora_A": "A", "lora_B": "B"}
_EMBEDDING_FACTORS = {"lora_embedding_A": "A", "lora_embedding_B": "B"}
# PEFT's defaults for fields an adapter_config.json may omit.
_DEFAULT_RANK = 8
_DEFAULT_ALPHA = 8


@dataclass(frozen=True)
class LoraConfig:
    """The fields of adapter_config.json that decide how an adapter is applied."""

    rank: int
    alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    target_modules: tuple[str, ...] | str | None = None

    def rank_of(self, module: str) -> int:
        """The configured rank of ``module`` (``rank_pattern``, else ``r``)."""
        return _pattern_value(self.rank_pattern, module, self.rank)

    def scale_of(self, module: str) -> float:
        """The factor ``s`` of ``module``'s update: alpha / r, or alpha / sqrt(r) (rsLoRA)."""
        rank = self.rank_of(module)
        alpha = _pattern_value(self.alpha_pattern, module, self.alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def targets(self, module: str) -> bool:
        """Whether ``target_modules`` selects ``module`` (a regex string, or names / name suffixes)."""
        targets = self.target_modules
        if targets is None or targets == "all-linear":
            return True  # "all-linear" depends on layer types, which headers do not tell
        if isinstance(targets, str):
            return re.fullmatch(targets, module) is not None
        return any(module == t or module.endswith("." + t) for t in targets)


def _pattern_value(patterns: tuple[tuple[str, object], ...], module: str, default):
    for pattern, value in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def parse_lora_config(raw: object, *, where: str) -> LoraConfig:
    """Validate the decoded adapter_config.json; ``where`` names the file in errors."""
    if not isinstance(raw, Mapping):
        raise AdapterError(f"{where} holds a JSON {type(raw).__name__}, not an object", path=where)
    peft_type = raw.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterError(f"{where} describes a {peft_type} adapter; only LoRA adapters can be applied", path=where)
    for flag, feature in (("use_dora", "DoRA"), ("layer_replication", "layer replication")):
        if raw.get(flag):
            raise AdapterError(
                f"{where} uses {feature} (`{flag}`), which changes more than W + s·B·A and is not supported",
                path=where,
                hint="merge this adapter into its model with peft (merge_and_unload) and reference the result",
            )
    return LoraConfig(
        rank=_positive_int(raw.get("r", _DEFAULT_RANK), "r", where),
        alpha=_number(raw.get("lora_alpha", _DEFAULT_ALPHA), "lora_alpha", where),
        use_rslora=bool(raw.get("use_rslora", False)),
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        rank_pattern=tuple(
            (str(k), _positive_int(v, f"rank_pattern.{k}", where)) for k, v in _mapping(raw, "rank_pattern", where)
        ),
        alpha_pattern=tuple(
            (str(k), _number(v, f"alpha_pattern.{k}", where)) for k, v in _mapping(raw, "alpha_pattern", where)
        ),
        target_modules=_target_modules(raw.get("target_modules"), where),
    )


def _positive_int(value: object, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterError(f"{where}: `{name}` must be a positive whole number, got {value!r}", path=where)
    return value


def _number(value: object, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AdapterError(f"{where}: `{name}` must be a finite number, got {value!r}", path=where)
    return float(value)


def _mapping(raw: Mapping, name: str, where: str) -> list[tuple[object, object]]:
    value = raw.get(name) or {}
    if not isinstance(value, Mapping):
        raise AdapterError(f"{where}: `{name}` must be an object of pattern -> value, got {value!r}", path=where)
    return list(value.items())


def _target_modules(value: object, where: str) -> tuple[str, ...] | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise AdapterError(f"{where}: `target_modules` must be a string or a list of names, got {value!r}", path=where)


@dataclass(frozen=True)
class AdapterKey:
    """What one stored adapter tensor is: a factor of a module's update, or a whole tensor.

    ``target`` is the base model tensor it changes (``<module>.weight`` for factors).
    """

    key: str
    kind: Literal["linear", "embedding", "full"]
    target: str
    module: str = ""
    factor: Literal["A", "B", ""] = ""


def parse_adapter_key(key: str, *, where: str) -> AdapterKey:
    """Classify one stored key (see the module docstring for the layouts)."""
    parts = key.removeprefix(PEFT_PREFIX).split(".")
    for index, part in enumerate(parts):
        module, rest = ".".join(parts[:index]), parts[index + 1 :]
        if part in _LINEAR_FACTORS and rest and rest[-1] == "weight" and len(rest) <= 2 and module:
            return AdapterKey(key, "linear", f"{module}.weight", module, _LINEAR_FACTORS[part])
        if part in _EMBEDDING_FACTORS and len(rest) <= 1 and module:
            return AdapterKey(key, "embedding", f"{module}.weight", module, _EMBEDDING_FACTORS[part])
        if part in _LINEAR_FACTORS or part in _EMBEDDING_FACTORS or part.startswith("lora_"):
            raise AdapterError(
                f"{where}: tensor `{key}` is a LoRA part this tool cannot apply "
                "(only lora_A/lora_B weights and lora_embedding_A/B are supported; no lora_bias or DoRA)",
                path=where,
            )
        if part == "modules_to_save" and len(rest) >= 2:
            return AdapterKey(key, "full", ".".join(parts[:index] + rest[1:]))
        if part == "base_layer" and rest:
            return AdapterKey(key, "full", ".".join(parts[:index] + rest))
    return AdapterKey(key, "full", ".".join(parts))
