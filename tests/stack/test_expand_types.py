"""Block expansion is exact across model families: each inserted layer is an identity, so the
expanded model computes bit for bit what the original computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mkstack.cli import stack_app

from arch_models import build_type_model, model_class
from moe_layouts import save_fused
from run_helpers import invoke
from tiny_models import read_tensors

TOKENS = [1, 5, 9, 17, 33, 65, 7, 3]


def _logits(path: Path) -> torch.Tensor:
    config = json.loads((path / "config.json").read_text())
    model = model_class(config["model_type"]).from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([TOKENS])).logits


def _expand_is_exact(model: Path, out: Path, same_as: Path | None = None) -> dict[str, torch.Tensor]:
    """Expand ``model``; its logits must equal those of ``same_as`` (default: the model itself)."""
    result = invoke(stack_app, out, "--expand", model, "--every", 2)  # layers 0 1 1' 2 3 3'
    assert result.exit_code == 0, result.output
    assert torch.equal(_logits(out), _logits(same_as or model))
    return read_tensors(out)


# One type per way a layer writes into the residual stream (see mkstack/modes.py RESIDUAL_WRITES).
@pytest.mark.parametrize("model_type", ["phi", "gptj", "exaone", "granitemoe", "gpt_oss", "mamba"])
def test_block_expansion_is_exact_for_each_kind_of_output_projection(tmp_path, model_type):
    model = build_type_model(model_type, tmp_path / "model", layers=4)
    expanded = _expand_is_exact(model, tmp_path / "out")
    original = read_tensors(model)
    inserted = [n for n in expanded if ".5." in n and n.replace(".5.", ".3.", 1) in original]
    zeroed = [n for n in inserted if not expanded[n].any() and original[n.replace(".5.", ".3.", 1)].any()]
    assert zeroed, "no output projection of the inserted layer was zeroed"


def test_block_expansion_of_an_moe_stored_fused_is_exact(tmp_path):
    saved = build_type_model("qwen3_moe", tmp_path / "saved", layers=4)
    fused = save_fused(saved, tmp_path / "fused")
    # written per expert: transformers computes it as the per-expert original (fused memory rounds apart)
    expanded = _expand_is_exact(fused, tmp_path / "out", same_as=saved)
    assert "model.layers.5.mlp.experts.3.down_proj.weight" in expanded
    assert not expanded["model.layers.5.mlp.experts.3.down_proj.weight"].any()
