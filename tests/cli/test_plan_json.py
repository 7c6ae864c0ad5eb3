"""`--dry-run --json` of all three tools: one document shape, from config.json files and headers only."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mkmerge.cli import merge_app
from mkmoe.cli import app as moe_app
from mkstack.cli import stack_app

SHARED_KEYS = {"schema", "tool", "recipe", "method", "inputs", "output", "config", "tensors", "shards"}
TENSOR_KEYS = {"name", "dtype", "shape", "bytes", "shard", "computed_as", "inputs"}


def hollow_copy(model: Path, where: Path) -> Path:
    """A copy whose weight files keep their headers but whose tensor data is all zero bytes (a hole)."""
    shutil.copytree(model, where)
    for weights in where.glob("*.safetensors"):
        size = weights.stat().st_size
        header = struct.unpack("<Q", weights.read_bytes()[:8])[0]
        os.truncate(weights, 8 + header)  # the data section is gone...
        os.truncate(weights, size)  # ...and the file its old length again: reads would see zeros
    return where


def plan_of(app, *args) -> dict:
    result = CliRunner().invoke(app, [*map(str, args), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _commands(tool: str, base: Path, a: Path, b: Path, tmp_path: Path) -> tuple:
    if tool == "mkmerge":
        recipe = tmp_path / "recipe.yml"
        recipe.write_text(
            f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1, density: 0.5}}\n"
            f"  - model: {b}\n    parameters: {{weight: 1, density: 0.5}}\n"
        )
        return merge_app, (recipe, tmp_path / "out")
    if tool == "mkstack":
        return stack_app, (tmp_path / "out", "--upscale", a, "--overlap", "1")
    from mkmoe_helpers import moe_yaml

    config = tmp_path / "moe.yml"
    config.write_text(moe_yaml(base, [a, b], gate_mode="random"))
    return moe_app, (config, tmp_path / "out")


@pytest.mark.parametrize("tool", ["mkmerge", "mkstack", "mkmoe"])
def test_every_tool_prints_one_plan_shape_from_headers_only(tool, family, tmp_path, no_tensor_reads):
    base, a, b = family
    hollow = [hollow_copy(m, tmp_path / "models" / m.name) for m in (base, a, b)]
    app, args = _commands(tool, *hollow, tmp_path)
    plan = plan_of(app, *args, "--shard-size", "40k")
    assert SHARED_KEYS <= plan.keys() and plan["tool"] == tool and plan["schema"] == "mkmerge-plan/1"
    assert not (tmp_path / "out").exists()
    # every output tensor: its dtype, shape, size, file and the input tensors it is made from
    assert plan["output"]["tensors"] == len(plan["tensors"]) > 0
    for tensor in plan["tensors"]:
        assert TENSOR_KEYS <= tensor.keys(), tensor
        count = 1
        for size in tensor["shape"]:
            count *= size
        assert tensor["bytes"] == count * 4  # the tiny family is float32
        assert tensor["inputs"] and all(i["model"] for i in tensor["inputs"])
    assert plan["output"]["bytes"] == sum(t["bytes"] for t in plan["tensors"])
    shards = {s["file"]: s for s in plan["shards"]}
    assert len(shards) > 1  # --shard-size was applied
    assert {t["shard"] for t in plan["tensors"]} == set(shards)
    for name, shard in shards.items():
        assert shard["tensors"] == sum(1 for t in plan["tensors"] if t["shard"] == name)
    labels = {i["label"] for i in plan["inputs"]}
    assert {i["model"] for t in plan["tensors"] for i in t["inputs"]} <= labels | {"gates"}
    # the zeroed data changes nothing: the plan of the intact models is the same but for paths
    (tmp_path / "intact").mkdir()
    intact_app, intact_args = _commands(tool, base, a, b, tmp_path / "intact")
    intact = plan_of(intact_app, *intact_args, "--shard-size", "40k")
    assert intact["tensors"] == plan["tensors"] and intact["shards"] == plan["shards"]
    assert intact["config"] == plan["config"]


def test_config_changes_name_what_the_output_config_changes(family, tmp_path):
    base, a, b = family
    depth = json.loads((a / "config.json").read_text())["num_hidden_layers"]
    stacked = plan_of(stack_app, tmp_path / "up", "--upscale", a, "--overlap", "1")
    assert stacked["config"]["changes"]["num_hidden_layers"] == {"from": depth, "to": 2 * (depth - 1)}
    assert [row["source_layers"] for row in stacked["layer_map"]] == [[0, depth - 2], [1, depth - 1]]
    _, args = _commands("mkmoe", base, a, b, tmp_path)
    moe = plan_of(moe_app, *args)
    changes = moe["config"]["changes"]
    assert changes["num_local_experts"] == {"to": 2}  # added: no "from"
    assert changes["architectures"]["to"] == ["MixtralForCausalLM"]
    assert moe["output"]["architecture"] == "MixtralForCausalLM"
    assert moe["moe"]["experts"] == 2 and moe["moe"]["gate_mode"] == "random"
    gates = [t for t in moe["tensors"] if t["inputs"][0]["model"] == "gates"]
    assert len(gates) == depth
    app, args = _commands("mkmerge", base, a, b, tmp_path)
    assert plan_of(app, *args)["config"]["changes"] == {}  # same depth, same vocabulary


@pytest.mark.parametrize("tool", ["mkstack", "mkmoe"])
def test_json_needs_dry_run(tool, family, tmp_path):
    app, args = _commands(tool, *family, tmp_path)
    result = CliRunner().invoke(app, [*map(str, args), "--json"])
    assert result.exit_code == 2 and "--dry-run" in result.output
    assert not (tmp_path / "out").exists()


def test_the_text_dry_runs_show_the_plan(family, tmp_path):
    base, a, b = family
    stacked = CliRunner().invoke(stack_app, [str(tmp_path / "up"), "--upscale", str(a), "--overlap", "1", "--dry-run"])
    assert stacked.exit_code == 0, stacked.output
    assert "layer map" in stacked.stdout and "output tensors" in stacked.stdout
    assert "config.json changes" in stacked.stdout and "num_hidden_layers" in stacked.stdout
    _, args = _commands("mkmoe", base, a, b, tmp_path)
    moe = CliRunner().invoke(moe_app, [*map(str, args), "--dry-run"])
    assert moe.exit_code == 0, moe.output
    assert "num_local_experts: (absent) -> 2" in moe.stdout
