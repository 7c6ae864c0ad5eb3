"""The Python API (mksuite.merge / stack / moe): the command line's output, byte for byte, as a function."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import mksuite
from mkmerge.cli import merge_app
from mkmoe.cli import app as moe_app
from mkstack.cli import stack_app
from mksuite.common.errors import MkError, OutputError, RecipeError

from run_helpers import invoke
from tiny_models import read_tensors


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def ties_recipe(base, a, b) -> str:
    return (
        f"merge_method: ties\nbase_model: {base}\nparameters: {{normalize: true}}\nmodels:\n"
        f"  - model: {a}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.4, density: 0.7}}\ndtype: float32\n"
    )


def test_importing_mksuite_does_not_import_torch():
    code = "import sys, mksuite\nassert callable(mksuite.merge) and mksuite.__version__\nprint('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


def test_merge_writes_what_the_command_line_writes(family, tmp_path):
    base, a, b = family
    recipe = tmp_path / "ties.yml"
    recipe.write_text(ties_recipe(base, a, b))
    assert invoke(merge_app, recipe, tmp_path / "cli" / "merged", "--shard-size", "20k").exit_code == 0
    result = mksuite.merge(recipe, tmp_path / "api" / "merged", shard_size="20k")
    written = files(tmp_path / "api" / "merged")
    assert written == files(tmp_path / "cli" / "merged")
    assert len([n for n in written if n.endswith(".safetensors")]) > 1  # the shard size was applied
    assert result.out == tmp_path / "api" / "merged"
    assert result.tensors == len(read_tensors(result.out)) and result.bytes_written > 0
    assert result.plan.method.name == "ties"
    assert "config.json" in result.files


def test_a_recipe_given_as_text_or_a_dict_merges_the_same_tensors(family, tmp_path):
    base, a, b = family
    text = ties_recipe(base, a, b)
    recipe = tmp_path / "ties.yml"
    recipe.write_text(text)
    mksuite.merge(recipe, tmp_path / "file" / "m")
    mksuite.merge(text, tmp_path / "text" / "m")
    mksuite.merge(yaml.safe_load(text), tmp_path / "dict" / "m")
    assert files(tmp_path / "text" / "m") == files(tmp_path / "file" / "m")  # the recipe copy is the same text
    expected = read_tensors(tmp_path / "file" / "m")
    merged = read_tensors(tmp_path / "dict" / "m")
    assert merged.keys() == expected.keys()
    assert all(merged[k].equal(expected[k]) for k in expected)


def test_stack_in_a_mode_writes_what_mkstack_writes(family, tmp_path):
    _, a, _ = family
    assert invoke(stack_app, tmp_path / "cli" / "up", "--upscale", a, "--overlap", "1").exit_code == 0
    result = mksuite.stack(None, tmp_path / "api" / "up", upscale=str(a), overlap=1)
    assert files(tmp_path / "api" / "up") == files(tmp_path / "cli" / "up")
    depth = json.loads((a / "config.json").read_text())["num_hidden_layers"]
    assert result.plan.num_layers == 2 * (depth - 1)  # layers [0, L-1) then [1, L)
    with pytest.raises(RecipeError, match="not both"):
        mksuite.stack(tmp_path / "recipe.yml", tmp_path / "x", upscale=str(a), overlap=1)


def test_moe_writes_what_mkmoe_writes(family, tmp_path):
    from mkmoe_helpers import moe_yaml

    base, a, b = family
    config = tmp_path / "moe.yml"
    config.write_text(moe_yaml(base, [a, b], gate_mode="random"))
    assert invoke(moe_app, config, tmp_path / "cli" / "moe", "--seed", "3").exit_code == 0
    result = mksuite.moe(config, tmp_path / "api" / "moe", seed=3)
    assert files(tmp_path / "api" / "moe") == files(tmp_path / "cli" / "moe")
    assert result.plan.num_experts == 2


def test_multi_stage_reports_each_stage(family, tmp_path):
    base, a, b = family
    text = (
        f"name: soup\nmerge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n"
        f"  - model: {b}\n    parameters: {{weight: 1}}\n---\n"
        f"merge_method: linear\nmodels:\n  - model: soup\n    parameters: {{weight: 1}}\n"
        f"  - model: {base}\n    parameters: {{weight: 1}}\n"
    )
    first = mksuite.merge(text, tmp_path / "final")
    assert [(s.name, s.reused) for s in first.stages] == [("soup", False), (None, False)]
    with pytest.raises(OutputError):  # OUT exists: the one --overwrite rule
        mksuite.merge(text, tmp_path / "final")
    again = mksuite.merge(text, tmp_path / "final", overwrite=True)
    assert [(s.name, s.reused) for s in again.stages] == [("soup", True), (None, False)]


def test_errors_are_raised_with_the_command_lines_exit_codes(family, tmp_path):
    base, a, b = family
    with pytest.raises(RecipeError) as bad:
        mksuite.merge("merge_method: linaer\nmodels:\n  - model: x\n", tmp_path / "out")
    assert bad.value.exit_code == 2 and "linaer" in str(bad.value)
    with pytest.raises(MkError) as missing:
        mksuite.merge(tmp_path / "nowhere.yml", tmp_path / "out")
    assert missing.value.exit_code in (2, 3)
    with pytest.raises(RecipeError) as typo:
        mksuite.merge(ties_recipe(base, a, b), tmp_path / "out", shard_sise="2G")
    assert "shard_sise" in str(typo.value) and "did you mean `shard_size`" in typo.value.render()
    with pytest.raises(RecipeError, match="command-line option only"):
        mksuite.merge(ties_recipe(base, a, b), tmp_path / "out", quiet=True)
    with pytest.raises(RecipeError, match="--threads"):
        mksuite.merge(ties_recipe(base, a, b), tmp_path / "out", threads=0)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError) as taken:
        mksuite.merge(ties_recipe(base, a, b), tmp_path / "taken")
    assert taken.value.exit_code == 8 and (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "out").exists()


def test_progress_callback_hears_every_tensor(family, tmp_path):
    base, a, b = family
    events = []
    result = mksuite.merge(ties_recipe(base, a, b), tmp_path / "out", progress=events.append)
    written = [e for e in events if e.kind == "tensor_written"]
    assert written and written[-1].tensors_done == result.tensors == written[-1].tensors_total


def test_dry_run_returns_the_plan_document_the_command_prints(family, tmp_path, no_tensor_reads):
    import json

    from typer.testing import CliRunner

    from mkmoe_helpers import moe_yaml

    base, a, b = family
    recipe = tmp_path / "ties.yml"
    recipe.write_text(ties_recipe(base, a, b))
    printed = CliRunner().invoke(merge_app, [str(recipe), str(tmp_path / "out"), "--dry-run", "--json"])
    document = mksuite.merge(recipe, tmp_path / "out", dry_run=True)
    drop = ("memory",)  # measured from this process's size at the time
    assert {k: v for k, v in document.items() if k not in drop} == {
        k: v for k, v in json.loads(printed.stdout).items() if k not in drop
    }
    stacked = mksuite.stack(None, tmp_path / "up", upscale=str(a), overlap=1, dry_run=True)
    assert stacked["tool"] == "mkstack" and stacked["layer_map"]
    config = moe_yaml(base, [a, b], gate_mode="random")
    assert mksuite.moe(config, tmp_path / "moe", dry_run=True)["moe"]["experts"] == 2
    assert not any((tmp_path / name).exists() for name in ("out", "up", "moe"))
