"""Tiny MoE checkpoints in both layouts transformers v5 reads.

``save_pretrained`` writes experts one tensor each (``experts.3.w1.weight``); a state dict
saved as the model holds it keeps them fused (``experts.gate_up_proj`` [E, 2I, H]). Both
load into the same model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "granitemoe")  # granitemoe: renamed, not split


def save_fused(saved: Path | str, out: Path | str) -> Path:
    """A copy of the per-expert checkpoint ``saved`` with its tensors under in-memory names."""
    from arch_models import model_class

    saved, out = Path(saved), Path(out)
    shutil.copytree(saved, out, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    config = __import__("json").loads((saved / "config.json").read_text())
    model = model_class(config["model_type"]).from_pretrained(saved, dtype=torch.float32)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if model.config.get_text_config().tie_word_embeddings:
        state.pop("lm_head.weight", None)
    assert any(name.endswith("experts.gate_up_proj") for name in state), "the model holds no fused experts"
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out
