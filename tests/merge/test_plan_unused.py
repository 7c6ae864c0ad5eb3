"""The plan accounts for every input tensor: those no output reads are listed, per input."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from typer.testing import CliRunner

from mkmerge.cli import plan_app


def stored(model: Path) -> list[str]:
    names = []
    for file in sorted(model.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            names.extend(handle.keys())
    return names


def plan(tmp_path: Path, recipe: str, *options: str):
    path = tmp_path / "recipe.yml"
    path.write_text(recipe)
    result = CliRunner().invoke(plan_app, [str(path), *options], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result


def test_layers_a_stack_leaves_out_and_the_head_of_the_first_model_are_listed(tiny_family, tmp_path, no_tensor_reads):
    _, (a, b) = tiny_family("llama", tie=False)  # 3 layers, an lm_head of its own
    recipe = (
        f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 2]\n"
        f"  - sources:\n      - model: {b}\n        layer_range: [2, 3]\n"
    )
    document = json.loads(plan(tmp_path, recipe, "--json").stdout)
    unused = {entry["model"]: entry for entry in document["unused_inputs"]}
    # Independently: A gives the embeddings and layers 0-1, B layer 2, the final norm and the head.
    a_names, b_names = stored(a), stored(b)
    expected_a = [n for n in a_names if ".layers.2." in n or n in ("model.norm.weight", "lm_head.weight")]
    expected_b = [n for n in b_names if ".layers.0." in n or ".layers.1." in n or n == "model.embed_tokens.weight"]
    assert sorted(unused["A"]["names"]) == sorted(expected_a)
    assert sorted(unused["B"]["names"]) == sorted(expected_b)
    per_layer = sum(".layers.0." in n for n in a_names)
    assert unused["B"]["layers"] == [
        {
            "layers": [0, 1],
            "tensors_each": per_layer,
            "complete": True,
            "tensors": [n.replace(".0.", ".*.", 1) for n in b_names if ".layers.0." in n],
        }
    ]
    assert sorted(unused["A"]["other"]) == ["lm_head.weight", "model.norm.weight"]
    assert unused["B"]["other"] == ["model.embed_tokens.weight"]
    # Every stored tensor is read by some output or listed: the plan's inputs plus the unused add up.
    read = {(i["model"], i["tensor"]) for t in document["tensors"] for i in t["inputs"]}
    for label, names in (("A", a_names), ("B", b_names)):
        listed = set(unused[label]["names"])
        assert all((label, n) in read or n in listed for n in names)
        assert not any((label, n) in read for n in listed)

    text = plan(tmp_path, recipe).output
    assert "input tensors no output uses" in text
    assert f"layers 0–1 (all {per_layer} tensors each); model.embed_tokens.weight" in text


def test_a_plan_that_reads_every_input_tensor_lists_none(family, tmp_path):
    base, a, b = family
    recipe = f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
    document = json.loads(plan(tmp_path, recipe, "--json").stdout)
    assert document["unused_inputs"] == []
    assert "input tensors no output uses" not in plan(tmp_path, recipe).output
