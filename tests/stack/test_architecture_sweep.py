"""A representative subset of scripts/sweep_architectures.py: merge and stack across model families."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "sweep_architectures.py"


def _sweep():
    spec = importlib.util.spec_from_file_location("sweep_architectures", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tensors(path: Path) -> dict:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


# qwen2: layer_types that must follow the stack; olmoe: an MoE type with no JSON;
# gemma3: a vision-language model (stack inside the VLM).
@pytest.mark.parametrize("model_type", ["qwen2", "olmoe", "gemma3"])
def test_merges_and_stacks_load_with_the_right_depth_and_mkmerge_builds_what_mkstack_builds(model_type, tmp_path):
    sweep = _sweep()
    row = sweep.sweep_type(model_type, tmp_path)
    merged_and_stacked = {column: row[column] for column in ("linear", "ties", "slerp", "stack")}
    assert merged_and_stacked == {"linear": "ok", "ties": "ok", "slerp": "ok", "stack": "ok"}
    assert sweep.check_expand(tmp_path) == "ok"
    stacked, merged = tmp_path / "stack", tmp_path / "stack_mkmerge"
    assert json.loads((stacked / "config.json").read_text()) == json.loads((merged / "config.json").read_text())
    ours, theirs = _tensors(stacked), _tensors(merged)
    assert ours.keys() == theirs.keys()
    assert all(ours[name].equal(theirs[name]) for name in ours)
    # Layer 4 of the output is ft2's layer 1, bit for bit.
    ft2 = _tensors(tmp_path / "ft2")
    from mksuite.common.arch.registry import choose_architecture

    config = json.loads((tmp_path / "ft2" / "config.json").read_text())
    arch = choose_architecture(config, list(ft2))
    for source, out in zip(arch.layer_weights(1, 4), arch.layer_weights(4, 7)):
        if source.name in ft2:
            assert ours[out.name].equal(ft2[source.name]), out.name
