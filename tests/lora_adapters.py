"""Hand-written PEFT LoRA adapters for tests (peft itself is not a dependency).

The files follow PEFT's saved format: adapter_config.json, and adapter_model.safetensors (or
a torch-pickled adapter_model.bin) whose keys are `base_model.model.<module>.lora_A.weight`
([r, in]), `...lora_B.weight` ([out, r]), `...lora_embedding_A` ([r, num_embeddings]),
`...lora_embedding_B` ([dim, r]), and whole tensors for modules_to_save.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

PREFIX = "base_model.model."


def adapter_config(**overrides) -> dict:
    """An adapter_config.json as peft writes it, with r=4 and lora_alpha=8 unless overridden."""
    config = {
        "alpha_pattern": {},
        "base_model_name_or_path": "tiny-base",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "layers_to_transform": None,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": 4,
        "rank_pattern": {},
        "target_modules": ["q_proj", "v_proj"],
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
    config.update(overrides)
    return config


def linear_factors(module: str, rank: int, fan_in: int, fan_out: int, seed: int, *, adapter_name: str = ""):
    """Random lora_A [rank, fan_in] and lora_B [fan_out, rank] under PEFT key names."""
    g = torch.Generator().manual_seed(seed)
    segment = f".{adapter_name}" if adapter_name else ""
    return {
        f"{PREFIX}{module}.lora_A{segment}.weight": torch.randn(rank, fan_in, generator=g),
        f"{PREFIX}{module}.lora_B{segment}.weight": torch.randn(fan_out, rank, generator=g),
    }


def embedding_factors(module: str, rank: int, num_embeddings: int, dim: int, seed: int):
    """Random lora_embedding_A [rank, num_embeddings] and lora_embedding_B [dim, rank]."""
    g = torch.Generator().manual_seed(seed)
    return {
        f"{PREFIX}{module}.lora_embedding_A": torch.randn(rank, num_embeddings, generator=g),
        f"{PREFIX}{module}.lora_embedding_B": torch.randn(dim, rank, generator=g),
    }


def write_adapter(
    directory: Path | str, tensors: dict[str, torch.Tensor], config: dict, *, fmt: str = "safetensors"
) -> Path:
    """Save an adapter directory; `fmt` "safetensors" or "bin" (torch.save of the state dict)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    tensors = {name: t.contiguous() for name, t in tensors.items()}
    if fmt == "safetensors":
        save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(tensors, directory / "adapter_model.bin")
    return directory
