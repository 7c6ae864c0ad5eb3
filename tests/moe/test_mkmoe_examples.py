"""Every config in examples/moe/ builds, unchanged, a MoE that transformers loads and runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mkmoe.config import GATE_MODES, load_moe_config
from mkmoe.run import run_moe
from mksuite.common.build import BuildOptions

EXAMPLES = sorted((Path(__file__).resolve().parent.parent.parent / "examples" / "moe").glob("*.yml"))


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    """models/base, models/ft-a, models/ft-b as examples/demo.py lays them out (4-layer llama)."""
    from tiny_models import build_model

    root = tmp_path_factory.mktemp("moe-demo")
    base = build_model("llama", root / "models" / "base", layers=4, hidden=64, seed=0)
    build_model("llama", root / "models" / "ft-a", base=base, seed=1)
    build_model("llama", root / "models" / "ft-b", base=base, seed=2)
    return root


def test_there_is_an_example_for_every_gate_mode():
    assert {load_moe_config(path).gate_mode for path in EXAMPLES} == set(GATE_MODES)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_config_builds_a_loadable_moe(example, demo_models, monkeypatch):
    from tiny_models import load_causal_lm, logits

    monkeypatch.chdir(demo_models)
    out = demo_models / f"out-{example.stem}"
    run_moe(load_moe_config(example), out, BuildOptions(overwrite=True))
    model = load_causal_lm(out)
    assert "Mixtral" in type(model).__name__ or "Qwen2Moe" in type(model).__name__
    assert torch.isfinite(logits(model, [1, 4, 9, 2])).all()
    assert (out / "mergekit_moe_config.yml").read_text() == example.read_text()
